use std::path::Path;

use super::*;
use crate::{
    EngineConfig, PolicyEngine,
    load::load_str,
    model::Object,
    reachability::Reachability,
    ruleset::{EndpointRef, FlowKind, FlowReason, FlowRule},
};

const MINUTE: u64 = 60_000_000_000;
/// 2026-12-07T10:00:00Z.
const T0: u64 = 1_796_637_600_000_000_000;

fn pod(ns: &str, name: &str, ip: &str, owner: Option<(&str, &str)>, labels: &str) -> String {
    let owner = owner
        .map(|(kind, n)| {
            format!(
                "  ownerReferences: [{{apiVersion: apps/v1, kind: {kind}, name: {n}, uid: u-{n}, controller: true}}]\n"
            )
        })
        .unwrap_or_default();
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{{labels}}}\n{owner}\
         spec: {{nodeName: node-1, containers: [{{name: c, image: x}}]}}\nstatus: {{podIP: \"{ip}\"}}\n"
    )
}

/// Namespaces `shop`, `tools`, `kube-system`; web (2 replicas), api, db (a StatefulSet), a bare
/// debug pod, and the cluster DNS.
fn cluster() -> String {
    let mut y = String::from("apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\n");
    for ns in ["shop", "tools", "kube-system"] {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"
        ));
    }
    let rs = Some(("ReplicaSet", "web-5d8f"));
    y += &pod(
        "shop",
        "web-5d8f-a",
        "10.0.0.1",
        rs,
        "app: web, pod-template-hash: 5d8f",
    );
    y += &pod(
        "shop",
        "web-5d8f-b",
        "10.0.0.2",
        rs,
        "app: web, pod-template-hash: 5d8f",
    );
    y += &pod(
        "shop",
        "api-77c4-a",
        "10.0.0.3",
        Some(("ReplicaSet", "api-77c4")),
        "app: api, tier: backend, pod-template-hash: 77c4",
    );
    y += &pod(
        "shop",
        "db-0",
        "10.0.0.4",
        Some(("StatefulSet", "db")),
        "app: db, statefulset.kubernetes.io/pod-name: db-0",
    );
    y += &pod("tools", "debug", "10.0.1.1", None, "run: debug");
    y += &pod(
        "kube-system",
        "coredns-9a-a",
        "10.0.2.1",
        Some(("ReplicaSet", "coredns-9a")),
        "k8s-app: kube-dns, pod-template-hash: 9a",
    );
    y
}

fn objects(yaml: &str) -> Vec<Object> {
    let loaded = load_str(Path::new("test.yaml"), yaml);
    assert!(loaded.is_clean(), "{:?}", loaded.errors);
    loaded.objects
}

fn pods(objects: &[Object]) -> Vec<Pod> {
    objects
        .iter()
        .filter_map(|o| match o {
            Object::Pod(p) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

fn key(s: &str) -> PodKey {
    let (namespace, name) = s.split_once('/').unwrap();
    PodKey {
        namespace: namespace.into(),
        name: name.into(),
    }
}

/// The record of one enforcement point: at `at` (a pod), about a connection from `src` to
/// `dst` (pods as `ns/name` with their address, or a bare address).
#[allow(clippy::too_many_arguments)]
fn record(
    at: &str,
    direction: Direction,
    src: (&str, Option<&str>),
    dst: (&str, Option<&str>),
    protocol: Protocol,
    port: u16,
    verdict: FlowVerdict,
    time: u64,
) -> FlowRecord {
    let peer = match direction {
        Direction::Ingress => src.1,
        Direction::Egress => dst.1,
    };
    FlowRecord {
        time_unix_nanos: time,
        endpoint: EndpointRef::Pod(key(at)),
        direction,
        src: src.0.parse().unwrap(),
        dst: dst.0.parse().unwrap(),
        src_port: 40000,
        dst_port: port,
        protocol: protocol.number(),
        kind: FlowKind::New,
        verdict,
        rule: FlowRule::DefaultAllow,
        rule_id: 0,
        local_identity: 300,
        peer_identity: 301,
        peer: peer.map(key),
        reason: FlowReason::AllowedNew,
        packets: 1,
        bytes: 60,
        peer_names: Vec::new(),
        staged: None,
    }
}

/// A connection between two pods, reported at both ends (egress of the source, ingress of the
/// destination), as the data plane reports it.
fn both_ends(
    src: (&str, &str),
    dst: (&str, &str),
    protocol: Protocol,
    port: u16,
    time: u64,
) -> [FlowRecord; 2] {
    let s = (src.1, Some(src.0));
    let d = (dst.1, Some(dst.0));
    [
        record(
            src.0,
            Direction::Egress,
            s,
            d,
            protocol,
            port,
            FlowVerdict::Allowed,
            time,
        ),
        record(
            dst.0,
            Direction::Ingress,
            s,
            d,
            protocol,
            port,
            FlowVerdict::Allowed,
            time,
        ),
    ]
}

const WEB_A: (&str, &str) = ("shop/web-5d8f-a", "10.0.0.1");
const WEB_B: (&str, &str) = ("shop/web-5d8f-b", "10.0.0.2");
const API: (&str, &str) = ("shop/api-77c4-a", "10.0.0.3");
const DB: (&str, &str) = ("shop/db-0", "10.0.0.4");
const DEBUG: (&str, &str) = ("tools/debug", "10.0.1.1");
const DNS: (&str, &str) = ("kube-system/coredns-9a-a", "10.0.2.1");

/// The observed pattern: web → api:8080, api → db:5432, every shop pod → DNS (UDP 53),
/// debug → web:80, api → 203.0.113.9:443 (outside the cluster), and a denied web → db.
fn observed() -> Vec<FlowRecord> {
    let mut v = Vec::new();
    let mut t = T0;
    let mut next = || {
        t += MINUTE;
        t
    };
    v.extend(both_ends(WEB_A, API, Protocol::Tcp, 8080, next()));
    v.extend(both_ends(WEB_B, API, Protocol::Tcp, 8080, next()));
    v.extend(both_ends(WEB_A, API, Protocol::Tcp, 8080, next()));
    v.extend(both_ends(API, DB, Protocol::Tcp, 5432, next()));
    for p in [WEB_A, WEB_B, API, DB] {
        v.extend(both_ends(p, DNS, Protocol::Udp, 53, next()));
    }
    v.extend(both_ends(DEBUG, WEB_B, Protocol::Tcp, 80, next()));
    v.push(record(
        API.0,
        Direction::Egress,
        (API.1, Some(API.0)),
        ("203.0.113.9", None),
        Protocol::Tcp,
        443,
        FlowVerdict::Allowed,
        next(),
    ));
    v.push(record(
        WEB_A.0,
        Direction::Egress,
        (WEB_A.1, Some(WEB_A.0)),
        (DB.1, Some(DB.0)),
        Protocol::Tcp,
        5432,
        FlowVerdict::Denied,
        next(),
    ));
    v
}

fn options(now: u64) -> RecommendOptions {
    RecommendOptions {
        kind: RecommendKind::NetworkPolicy,
        namespaces: BTreeSet::from(["shop".to_string()]),
        learning_window: Duration::from_secs(600),
        now_unix_nanos: now,
        label_filter: LabelFilter::default(),
    }
}

/// Applied as enforced, the recommendation admits every observed connection and denies every
/// other connection of a covered workload — checked on the compiled rule sets (the function the
/// data plane is tested against), after a round trip of the YAML through the loader.
#[test]
fn applied_it_admits_exactly_what_was_observed() {
    let objs = objects(&cluster());
    let r = recommend(observed(), &pods(&objs), &options(T0 + 60 * MINUTE));
    assert_eq!(r.policies.len(), 3, "web, api, db: {:?}", r.policies);
    assert!(r.not_covered.is_empty() && r.broad_selectors.is_empty());
    assert_eq!(r.unknown_pods, 0);
    let yaml = r.to_yaml().unwrap();
    let mut all = objects(&cluster());
    let policies = objects(&yaml);
    assert_eq!(policies.len(), 3, "{yaml}");
    all.extend(policies);
    let engine = PolicyEngine::new(EngineConfig::default(), all).unwrap();
    let reach = Reachability::new(&engine);
    let may = |a: (&str, &str), b: (&str, &str), proto: Protocol, port: u16| {
        reach.allowed(&key(a.0), &key(b.0), proto, port).unwrap()
    };
    // Observed: admitted (also for the web replica that was not seen on this edge: the rule
    // is per workload).
    for (a, b, proto, port) in [
        (WEB_A, API, Protocol::Tcp, 8080),
        (WEB_B, API, Protocol::Tcp, 8080),
        (API, DB, Protocol::Tcp, 5432),
        (WEB_A, DNS, Protocol::Udp, 53),
        (DB, DNS, Protocol::Udp, 53),
        (DEBUG, WEB_B, Protocol::Tcp, 80),
        (DEBUG, WEB_A, Protocol::Tcp, 80),
    ] {
        assert!(
            may(a, b, proto, port),
            "{a:?} → {b:?} {proto:?}/{port} observed: admitted\n{yaml}"
        );
    }
    // Not observed: denied (the denied attempt taught nothing).
    for (a, b, proto, port) in [
        (WEB_A, DB, Protocol::Tcp, 5432),
        (WEB_A, API, Protocol::Tcp, 8081),
        (API, WEB_A, Protocol::Tcp, 80),
        (DB, API, Protocol::Tcp, 8080),
        (DEBUG, API, Protocol::Tcp, 8080),
        (API, DNS, Protocol::Tcp, 53),
        (WEB_A, WEB_B, Protocol::Tcp, 80),
    ] {
        assert!(
            !may(a, b, proto, port),
            "{a:?} → {b:?} {proto:?}/{port} not observed: denied\n{yaml}"
        );
    }
    // Uncovered namespaces keep their (default) behaviour.
    assert!(may(DEBUG, DNS, Protocol::Tcp, 53));
    // The world destination is an ipBlock of the api's egress.
    assert!(yaml.contains("cidr: 203.0.113.9/32"), "{yaml}");
}

/// Staged, the same recommendation enforces nothing, and its staged view is exactly the
/// enforced recommendation's verdicts.
#[test]
fn staged_it_changes_no_verdict_and_its_staged_view_is_the_recommendation() {
    let objs = objects(&cluster());
    let r = recommend(observed(), &pods(&objs), &options(T0 + 60 * MINUTE));
    let staged_yaml = r.to_staged_yaml().unwrap();
    assert_eq!(
        staged_yaml.matches("kind: StagedNetworkPolicy").count(),
        3,
        "{staged_yaml}"
    );
    assert!(
        !staged_yaml.contains("kind: NetworkPolicy"),
        "{staged_yaml}"
    );
    let build = |yaml: &str| {
        let mut all = objects(&cluster());
        all.extend(objects(yaml));
        PolicyEngine::new(EngineConfig::default(), all).unwrap()
    };
    let (staged, enforced, none) = (build(&staged_yaml), build(&r.to_yaml().unwrap()), build(""));
    let (rs, re, rn) = (
        Reachability::new(&staged),
        Reachability::new(&enforced),
        Reachability::new(&none),
    );
    for a in [WEB_A, WEB_B, API, DB, DEBUG, DNS] {
        for b in [WEB_A, WEB_B, API, DB, DEBUG, DNS] {
            for (proto, port) in [
                (Protocol::Tcp, 80),
                (Protocol::Tcp, 8080),
                (Protocol::Tcp, 5432),
                (Protocol::Udp, 53),
            ] {
                let (f, t) = (key(a.0), key(b.0));
                let s = rs.explain(&f, &t, proto, port).unwrap();
                let e = re.explain(&f, &t, proto, port).unwrap();
                let n = rn.explain(&f, &t, proto, port).unwrap();
                assert_eq!(
                    s.verdict, n.verdict,
                    "{a:?} → {b:?} {port}: staged changes nothing"
                );
                for (sd, ed) in [(&s.egress, &e.egress), (&s.ingress, &e.ingress)] {
                    assert_eq!(
                        sd.staged_verdict, ed.verdict,
                        "{a:?} → {b:?} {proto:?}/{port}"
                    );
                }
            }
        }
    }
    // ServicePolicies stage as audit mode.
    let mut sp = options(T0 + 60 * MINUTE);
    sp.kind = RecommendKind::ServicePolicy;
    let yaml = recommend(observed(), &pods(&objs), &sp)
        .to_staged_yaml()
        .unwrap();
    assert!(
        yaml.contains("mode: Audit") && yaml.contains("kind: ServicePolicy"),
        "{yaml}"
    );
    assert!(!objects(&yaml).is_empty(), "loads: {yaml}");
}

#[test]
fn selectors_use_stable_labels_and_rules_say_what_they_learned_from() {
    let cluster = objects(&cluster());
    let r = recommend(observed(), &pods(&cluster), &options(T0 + 60 * MINUTE));
    let yaml = r.to_yaml().unwrap();
    assert!(!yaml.contains("pod-template-hash"), "{yaml}");
    assert!(
        !yaml.contains("statefulset.kubernetes.io/pod-name"),
        "{yaml}"
    );
    let api = r
        .policies
        .iter()
        .find(|p| p.workload.name == "ReplicaSet/api-77c4")
        .unwrap();
    assert_eq!(
        api.network_policy().unwrap().metadata.name.as_deref(),
        Some("api-77c4-replicaset")
    );
    let spec = api.network_policy().unwrap().spec.as_ref().unwrap();
    assert_eq!(
        spec.pod_selector.as_ref().unwrap().match_labels,
        Some(BTreeMap::from([
            ("app".to_string(), "api".to_string()),
            ("tier".to_string(), "backend".to_string())
        ]))
    );
    let notes = api
        .network_policy()
        .unwrap()
        .metadata
        .annotations
        .as_ref()
        .unwrap();
    assert_eq!(
        notes[&format!("{LEARNED_ANNOTATION}.ingress.0")],
        "from shop/ReplicaSet/web-5d8f TCP/8080: 3 connections, first seen 2026-12-07T10:01:00Z, last seen 2026-12-07T10:03:00Z"
    );
    // DNS in another namespace: by its namespace's name label and its pods' labels.
    let egress = spec.egress.as_ref().unwrap();
    let dns = egress
        .iter()
        .find(|e| e.ports.as_ref().unwrap()[0].port == Some(IntOrString::Int(53)))
        .unwrap();
    let peer = &dns.to.as_ref().unwrap()[0];
    assert_eq!(
        peer.namespace_selector.as_ref().unwrap().match_labels,
        Some(BTreeMap::from([(
            NAMESPACE_NAME_LABEL.to_string(),
            "kube-system".to_string()
        )]))
    );
    assert_eq!(
        peer.pod_selector.as_ref().unwrap().match_labels,
        Some(BTreeMap::from([(
            "k8s-app".to_string(),
            "kube-dns".to_string()
        )]))
    );
}

/// The same window gives byte-identical YAML whatever the order of the records; a new edge
/// changes only the policies of its two ends.
#[test]
fn deterministic_and_a_new_edge_is_a_minimal_diff() {
    let cluster = pods(&objects(&cluster()));
    let opts = options(T0 + 60 * MINUTE);
    let records = observed();
    let a = recommend(&records, &cluster, &opts).to_yaml().unwrap();
    let mut reversed = records.clone();
    reversed.reverse();
    let b = recommend(&reversed, &cluster, &opts).to_yaml().unwrap();
    assert_eq!(a, b);

    let mut more = records;
    more.extend(both_ends(WEB_A, DB, Protocol::Tcp, 5432, T0 + 30 * MINUTE));
    let c = recommend(&more, &cluster, &opts);
    let before = recommend(observed(), &cluster, &opts);
    for (old, new) in before.policies.iter().zip(&c.policies) {
        assert_eq!(old.workload, new.workload);
        let yaml = |p: &RecommendedPolicy| serde_json::to_string(&p.policy).unwrap();
        let changed = yaml(old) != yaml(new);
        let touched =
            ["ReplicaSet/web-5d8f", "StatefulSet/db"].contains(&new.workload.name.as_str());
        assert_eq!(changed, touched, "{}", new.workload);
    }
}

#[test]
fn learning_until_no_new_edge_within_the_window() {
    let cluster = pods(&objects(&cluster()));
    let records = observed();
    let last = records.iter().map(|r| r.time_unix_nanos).max().unwrap();
    let r = recommend(&records, &cluster, &options(last + MINUTE));
    assert_eq!(r.status, RecommendationStatus::Learning);
    assert!(
        r.to_yaml()
            .unwrap()
            .contains("bulkhead.dev/recommendation: learning")
    );
    let r = recommend(&records, &cluster, &options(last + 60 * MINUTE));
    assert_eq!(r.status, RecommendationStatus::Stable);
    // The db's only new edge (api → db) is older than the window ends of the others.
    let r = recommend(&records, &cluster, &options(T0 + 4 * MINUTE + 11 * MINUTE));
    let db = r
        .policies
        .iter()
        .find(|p| p.workload.name == "StatefulSet/db")
        .unwrap();
    assert_eq!(
        db.status,
        RecommendationStatus::Learning,
        "db → dns was first seen at +8 min"
    );
}

/// Pods the controller no longer knows teach nothing (counted); ICMP is counted, not admitted;
/// a workload whose pods share no stable label gets no policy, and is selected by address as a
/// peer.
/// The cluster with a pod whose labels are all unstable (`shop/lonely`), and the observed
/// traffic plus what a NetworkPolicy cannot say: a pod that is gone, ICMP, the lonely pod.
fn inexpressible() -> (Vec<Pod>, Vec<FlowRecord>) {
    let mut yaml = cluster();
    yaml += &pod("shop", "lonely", "10.0.0.9", None, "pod-template-hash: x");
    let cluster = pods(&objects(&yaml));
    let mut records = observed();
    records.extend(both_ends(
        ("shop/gone", "10.0.0.50"),
        API,
        Protocol::Tcp,
        8080,
        T0,
    ));
    records.extend(both_ends(WEB_A, API, Protocol::Icmp, 0, T0));
    records.extend(both_ends(
        ("shop/lonely", "10.0.0.9"),
        API,
        Protocol::Tcp,
        9090,
        T0,
    ));
    (cluster, records)
}

#[test]
fn what_cannot_be_expressed_is_reported() {
    let (cluster, records) = inexpressible();
    let r = recommend(&records, &cluster, &options(T0 + 60 * MINUTE));
    assert_eq!(r.unknown_pods, 2);
    assert_eq!(r.icmp_edges, 1);
    assert_eq!(r.not_covered.len(), 1);
    assert_eq!(r.not_covered[0].0.name, "Pod/lonely");
    let api = r
        .policies
        .iter()
        .find(|p| p.workload.name == "ReplicaSet/api-77c4")
        .unwrap();
    let by_address = api
        .network_policy()
        .unwrap()
        .spec
        .as_ref()
        .unwrap()
        .ingress
        .as_ref()
        .unwrap()
        .iter()
        .any(|rule| {
            rule.from.as_ref().unwrap()[0]
                .ip_block
                .as_ref()
                .is_some_and(|b| b.cidr == "10.0.0.9/32")
        });
    assert!(by_address, "{}", r.to_yaml().unwrap());
}

/// An agent names only the pods of its own node: a peer it left unnamed is found by address.
#[test]
fn unnamed_peers_are_found_by_address() {
    let cluster = pods(&objects(&cluster()));
    let opts = options(T0 + 60 * MINUTE);
    let named = recommend(observed(), &cluster, &opts).to_yaml().unwrap();
    let mut unnamed = observed();
    unnamed.iter_mut().for_each(|r| r.peer = None);
    assert_eq!(
        recommend(&unnamed, &cluster, &opts).to_yaml().unwrap(),
        named
    );
}

/// ServicePolicies, one per service identity, peers by service account: applied as enforced
/// they admit exactly the observed connections (ICMP included, which a ServicePolicy can name),
/// and a service identity with nothing observed in a direction is closed in it.
#[test]
fn service_policies_admit_exactly_what_was_observed() {
    // Each workload runs as its own service account.
    let yaml = cluster().replace(
        "spec: {nodeName: node-1,",
        "spec: {nodeName: node-1, serviceAccountName: SA,",
    );
    let mut with_accounts = String::new();
    for doc in yaml.split("---\n") {
        let sa = ["web", "api", "db", "debug", "coredns"]
            .into_iter()
            .find(|n| doc.contains(&format!("name: {n}")))
            .unwrap_or("default");
        with_accounts.push_str("---\n");
        with_accounts.push_str(&doc.replace(
            "serviceAccountName: SA",
            &format!("serviceAccountName: {sa}"),
        ));
    }
    let objs = objects(&with_accounts);
    let mut records = observed();
    records.extend(both_ends(WEB_A, API, Protocol::Icmp, 0, T0));
    let mut opts = options(T0 + 60 * MINUTE);
    opts.kind = RecommendKind::ServicePolicy;
    let r = recommend(&records, &pods(&objs), &opts);
    let names: Vec<String> = r.policies.iter().map(|p| p.workload.to_string()).collect();
    assert_eq!(
        names,
        [
            "shop/ServiceAccount/api",
            "shop/ServiceAccount/db",
            "shop/ServiceAccount/web"
        ]
    );
    assert_eq!(r.icmp_edges, 0);
    let out = r.to_yaml().unwrap();
    assert_eq!(out.matches("kind: ServicePolicy").count(), 3, "{out}");
    let mut all = objects(&with_accounts);
    all.extend(objects(&out));
    let engine = PolicyEngine::new(EngineConfig::default(), all).unwrap();
    let reach = Reachability::new(&engine);
    let may = |a: (&str, &str), b: (&str, &str), proto: Protocol, port: u16| {
        reach.allowed(&key(a.0), &key(b.0), proto, port).unwrap()
    };
    for (a, b, proto, port) in [
        (WEB_A, API, Protocol::Tcp, 8080),
        (WEB_B, API, Protocol::Tcp, 8080),
        (WEB_A, API, Protocol::Icmp, 0),
        (API, DB, Protocol::Tcp, 5432),
        (DB, DNS, Protocol::Udp, 53),
        (DEBUG, WEB_A, Protocol::Tcp, 80),
    ] {
        assert!(
            may(a, b, proto, port),
            "{a:?} → {b:?} {proto:?}/{port}\n{out}"
        );
    }
    for (a, b, proto, port) in [
        (WEB_A, DB, Protocol::Tcp, 5432),
        (API, WEB_A, Protocol::Tcp, 80),
        (DB, API, Protocol::Tcp, 8080),
        (DEBUG, API, Protocol::Tcp, 8080),
        (DEBUG, DB, Protocol::Tcp, 5432),
        (DB, WEB_A, Protocol::Icmp, 0),
    ] {
        assert!(
            !may(a, b, proto, port),
            "{a:?} → {b:?} {proto:?}/{port}\n{out}"
        );
    }
    // The db initiates nothing but DNS; nothing observed reaches the web but debug's.
    assert!(out.contains("serviceAccount: debug"), "{out}");
}

/// The gRPC admin API's `Recommend` carries a recommendation that converts back to the same
/// value (compared as the JSON `-o json` prints), network policies and service policies alike,
/// with what could not be expressed.
#[test]
fn a_recommendation_survives_the_wire() {
    use bulkhead_proto::{prost::Message, v1 as pb};
    let (cluster, records) = inexpressible();
    for kind in [RecommendKind::NetworkPolicy, RecommendKind::ServicePolicy] {
        let mut opts = options(T0 + 60 * MINUTE);
        opts.kind = kind;
        let mut r = recommend(&records, &cluster, &opts);
        r.from_history = true;
        assert!(!r.policies.is_empty());
        let bytes = pb::RecommendResponse::from(&r).encode_to_vec();
        let back = Recommendation::try_from(pb::RecommendResponse::decode(&bytes[..]).unwrap())
            .expect("converts back");
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&r).unwrap()
        );
        assert_eq!(back.to_yaml().unwrap(), r.to_yaml().unwrap());
    }
}
