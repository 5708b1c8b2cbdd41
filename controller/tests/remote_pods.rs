//! A peer cluster's pods in the engine (issue 20): imported pods live in qualified namespaces
//! (`west/shop`), get identities of their own range, are never endpoints, and are selected only
//! by selectors that name `bulkhead.dev/cluster` — every other policy keeps meaning "this
//! cluster". Verdicts are the reference decision over the compiled rule sets.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use bulkhead_controller::model::{Namespace, Pod};
use bulkhead_controller::ruleset::{
    ClusterName, Direction, PacketTuple, Protocol, Verdict, decide, identity,
};
use bulkhead_controller::{Change, EngineConfig, Object, PodKey, PolicyEngine, load_str};

const WEB: &str = "10.1.0.10";
const CLIENT: &str = "10.1.0.11";
/// A local pod claiming the peer cluster's label.
const IMPOSTOR: &str = "10.1.0.12";
const WEST_API: &str = "10.2.0.20";
const WEST_OTHER_API: &str = "10.2.0.21";
const WEST_SHOP_DB: &str = "10.2.0.22";
const NORTH_API: &str = "10.3.0.30";

fn west() -> ClusterName {
    "west".parse().expect("a cluster name")
}

fn local_yaml(policies: &str) -> Vec<Object> {
    let yaml = format!(
        "
apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{team: a}}}}
---
apiVersion: v1
kind: Pod
metadata: {{namespace: shop, name: web, labels: {{app: web}}}}
spec: {{nodeName: node-1}}
status: {{podIP: {WEB}}}
---
apiVersion: v1
kind: Pod
metadata: {{namespace: shop, name: client, labels: {{app: api}}}}
spec: {{nodeName: node-1}}
status: {{podIP: {CLIENT}}}
---
apiVersion: v1
kind: Pod
metadata: {{namespace: shop, name: impostor, labels: {{app: api, bulkhead.dev/cluster: west}}}}
spec: {{nodeName: node-1}}
status: {{podIP: {IMPOSTOR}}}
{policies}"
    );
    let l = load_str(Path::new("local.yaml"), &yaml);
    assert!(l.errors.is_empty(), "{:?}", l.errors);
    l.objects
}

fn remote_namespace(cluster: &str, ns: &str, team: &str) -> Change {
    let c: ClusterName = cluster.parse().expect("a cluster name");
    Change::UpsertNamespace(Namespace {
        name: c.qualify(ns),
        labels: [("team".to_string(), team.to_string())].into(),
    })
}

fn remote_pod(cluster: &str, ns: &str, name: &str, app: &str, ip: &str) -> Change {
    let c: ClusterName = cluster.parse().expect("a cluster name");
    Change::UpsertPod(Pod {
        namespace: c.qualify(ns),
        name: name.into(),
        labels: [("app".to_string(), app.to_string())].into(),
        service_account: "default".into(),
        node_name: None,
        ips: vec![ip.parse().expect("ip")],
        synthetic_ips: false,
        ports: Vec::new(),
        workload: Some(format!("Deployment/{app}")),
        host_network: false,
    })
}

/// The peer clusters' inventory: `west/shop` (api, db), `west/other` (api), `north/shop` (api).
fn remote_changes() -> Vec<Change> {
    vec![
        remote_namespace("west", "shop", "a"),
        remote_namespace("west", "other", "b"),
        remote_namespace("north", "shop", "a"),
        remote_pod("west", "shop", "api-0", "api", WEST_API),
        remote_pod("west", "shop", "db-0", "db", WEST_SHOP_DB),
        remote_pod("west", "other", "api-0", "api", WEST_OTHER_API),
        remote_pod("north", "shop", "api-0", "api", NORTH_API),
    ]
}

fn engine(policies: &str) -> PolicyEngine {
    let config = EngineConfig {
        cluster_name: Some("east".parse().expect("a cluster name")),
        ..EngineConfig::default()
    };
    let mut e = PolicyEngine::new(config, local_yaml(policies)).expect("compiles");
    e.apply_batch(remote_changes()).expect("imports");
    e
}

/// The ingress verdict at shop/web for a TCP connection from `src` to port 80.
fn ingress_to_web(e: &PolicyEngine, src: &str) -> Verdict {
    let rs = e.ruleset("node-1").expect("rule set");
    let ep = rs.endpoint_by_name("shop", "web").expect("endpoint");
    let packet = PacketTuple {
        src: src.parse().expect("ip"),
        dst: WEB.parse().expect("ip"),
        protocol: Some(Protocol::Tcp),
        dst_port: Some(80),
    };
    decide(&rs, ep, Direction::Ingress, &packet).verdict
}

fn verdicts(e: &PolicyEngine) -> BTreeMap<&'static str, Verdict> {
    [
        ("client", CLIENT),
        ("impostor", IMPOSTOR),
        ("west/shop/api", WEST_API),
        ("west/shop/db", WEST_SHOP_DB),
        ("west/other/api", WEST_OTHER_API),
        ("north/shop/api", NORTH_API),
    ]
    .into_iter()
    .map(|(n, ip)| (n, ingress_to_web(e, ip)))
    .collect()
}

fn expect(e: &PolicyEngine, allowed: &[&str]) {
    let got = verdicts(e);
    let want: BTreeMap<&str, Verdict> = got
        .keys()
        .map(|k| {
            let v = if allowed.contains(k) {
                Verdict::Allow
            } else {
                Verdict::Deny
            };
            (*k, v)
        })
        .collect();
    assert_eq!(got, want);
}

const ISOLATE_WEB: &str = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: shop, name: web}
spec:
  podSelector: {matchLabels: {app: web}}
";

fn web_from(peer: &str) -> String {
    format!("{ISOLATE_WEB}  ingress: [{{from: [{peer}]}}]\n")
}

#[test]
fn policies_that_do_not_name_the_cluster_label_keep_meaning_this_cluster() {
    // Same namespace, every namespace, every namespace with team a: local pods only (the
    // impostor is local whatever label it claims).
    for peer in [
        "{podSelector: {matchLabels: {app: api}}}",
        "{namespaceSelector: {}}",
        "{namespaceSelector: {matchLabels: {team: a}}}",
        "{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: shop}}}",
    ] {
        let e = engine(&web_from(peer));
        expect(&e, &["client", "impostor"]);
    }
}

#[test]
fn importing_a_peer_changes_no_verdict_of_a_policy_that_does_not_name_it() {
    let config = EngineConfig {
        cluster_name: Some("east".parse().expect("a cluster name")),
        ..EngineConfig::default()
    };
    let sp = |peer: &str| {
        format!(
            "---\napiVersion: bulkhead.dev/v1alpha1\nkind: ServicePolicy\nmetadata: {{namespace: shop, name: web}}\nspec:\n  subject: {{podSelector: {{matchLabels: {{app: web}}}}}}\n  ingress: [{{from: [{peer}]}}]\n"
        )
    };
    let cnp = |action: &str, peer: &str| {
        format!(
            "---\napiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\nmetadata: {{name: c}}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  ingress: [{{action: {action}, from: [{peer}]}}]\n"
        )
    };
    for policies in [
        String::new(),
        ISOLATE_WEB.to_string(),
        web_from("{namespaceSelector: {}}"),
        web_from("{podSelector: {}}"),
        web_from("{ipBlock: {cidr: 10.2.0.0/16, except: [10.2.0.21/32]}}"),
        web_from("{ipBlock: {cidr: 0.0.0.0/0}}"),
        format!("{ISOLATE_WEB}  ingress: [{{}}]\n"),
        sp("{entity: world}"),
        sp("{entity: cluster}"),
        sp("{cidr: 10.3.0.0/16}"),
        cnp(
            "Deny",
            "{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: api}}}}",
        ) + &format!("{ISOLATE_WEB}  ingress: [{{}}]\n"),
        cnp("Accept", "{namespaces: {}}") + &web_from("{podSelector: {}}"),
    ] {
        let before = PolicyEngine::new(config.clone(), local_yaml(&policies)).expect("compiles");
        let after = engine(&policies);
        assert_eq!(verdicts(&before), verdicts(&after), "{policies}");
    }
}

#[test]
fn selectors_naming_the_cluster_label_select_that_cluster() {
    let cases: [(&str, &[&str]); 6] = [
        // Every namespace of west.
        (
            "{namespaceSelector: {matchLabels: {bulkhead.dev/cluster: west}}}",
            &["west/shop/api", "west/shop/db", "west/other/api"],
        ),
        // The policy's own namespace name, in west: west/shop only.
        (
            "{podSelector: {matchLabels: {bulkhead.dev/cluster: west, app: api}}}",
            &["west/shop/api"],
        ),
        // Namespaces named shop in every cluster but ours (east is the local cluster's name).
        (
            "{namespaceSelector: {matchExpressions: [{key: bulkhead.dev/cluster, operator: NotIn, values: [east]}, {key: kubernetes.io/metadata.name, operator: In, values: [shop]}]}, podSelector: {matchLabels: {app: api}}}",
            &["west/shop/api", "north/shop/api"],
        ),
        // Every cluster, local included: the local pods carry the local cluster's name.
        (
            "{namespaceSelector: {matchExpressions: [{key: bulkhead.dev/cluster, operator: Exists}]}, podSelector: {matchLabels: {app: api}}}",
            &[
                "client",
                "impostor",
                "west/shop/api",
                "west/other/api",
                "north/shop/api",
            ],
        ),
        // The local cluster by name: never a peer's pod, and never the impostor's claim.
        (
            "{namespaceSelector: {matchLabels: {bulkhead.dev/cluster: east}}}",
            &["client", "impostor"],
        ),
        // Team b in west (namespace labels travel with the import).
        (
            "{namespaceSelector: {matchLabels: {bulkhead.dev/cluster: west, team: b}}}",
            &["west/other/api"],
        ),
    ];
    for (peer, allowed) in cases {
        let e = engine(&web_from(peer));
        let got = verdicts(&e);
        for (k, v) in &got {
            let want = if allowed.contains(k) {
                Verdict::Allow
            } else {
                Verdict::Deny
            };
            assert_eq!(*v, want, "{peer}: {k}");
        }
    }
}

#[test]
fn the_cluster_entity_and_a_cluster_network_policy_follow_the_same_rule() {
    // ServicePolicy entity `cluster`: this cluster's pods.
    let sp = "---
apiVersion: bulkhead.dev/v1alpha1
kind: ServicePolicy
metadata: {namespace: shop, name: web}
spec:
  subject: {podSelector: {matchLabels: {app: web}}}
  ingress: [{from: [{entity: cluster}]}]
";
    expect(&engine(sp), &["client", "impostor"]);
    // A ServicePolicy peer with `cluster: west`.
    let sp_west = "---
apiVersion: bulkhead.dev/v1alpha1
kind: ServicePolicy
metadata: {namespace: shop, name: web}
spec:
  subject: {podSelector: {matchLabels: {app: web}}}
  ingress: [{from: [{service: {cluster: west, namespaceSelector: {}, podSelector: {matchLabels: {app: api}}}}]}]
";
    expect(&engine(sp_west), &["west/shop/api", "west/other/api"]);
    // Its own namespace by default, in west.
    let sp_west_own = sp_west.replace("namespaceSelector: {}, ", "");
    expect(&engine(&sp_west_own), &["west/shop/api"]);
    // A bad cluster name, or the label in the selector besides, are refused by field.
    for (bad, field) in [
        ("cluster: West", ".cluster"),
        (
            "cluster: west, podSelector: {matchLabels: {bulkhead.dev/cluster: west}}",
            ".podSelector",
        ),
    ] {
        let yaml = format!(
            "---\napiVersion: bulkhead.dev/v1alpha1\nkind: ServicePolicy\nmetadata: {{namespace: shop, name: bad}}\nspec:\n  ingress: [{{from: [{{service: {{{bad}}}}}]}}]\n"
        );
        let l = load_str(Path::new("bad.yaml"), &yaml);
        assert!(
            l.errors.iter().any(|e| e.to_string().contains(field)),
            "{bad}: {:?}",
            l.errors
        );
    }
    // An Admin CNP denying west's pods from namespaces labelled team a, then accepting all.
    let cnp = "---
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {name: no-west}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {}}
  ingress:
  - {action: Deny, from: [{namespaces: {matchLabels: {bulkhead.dev/cluster: west, team: a}}}]}
";
    let e = engine(&format!(
        "{cnp}{}",
        web_from(
            "{namespaceSelector: {matchExpressions: [{key: bulkhead.dev/cluster, operator: Exists}]}}"
        )
    ));
    expect(
        &e,
        &["client", "impostor", "west/other/api", "north/shop/api"],
    );
}

#[test]
fn remote_pods_are_no_endpoints_and_their_identities_have_their_own_range() {
    let local_only = {
        let config = EngineConfig {
            cluster_name: Some("east".parse().expect("a cluster name")),
            ..EngineConfig::default()
        };
        PolicyEngine::new(config, local_yaml(&web_from("{namespaceSelector: {}}")))
            .expect("compiles")
    };
    let e = engine(&web_from("{namespaceSelector: {}}"));
    // No node appears for the peers, and node-1's endpoints are the local pods.
    assert_eq!(e.nodes(), vec!["node-1".to_string()]);
    let rs = e.ruleset("node-1").expect("rule set");
    let mut names: Vec<String> = rs.endpoints.iter().map(|ep| ep.pod.clone()).collect();
    names.sort();
    assert_eq!(names, ["client", "impostor", "web"]);
    // Local identities are untouched by the import; remote ones are in the remote range.
    for name in ["web", "client", "impostor"] {
        let k = PodKey {
            namespace: "shop".into(),
            name: name.into(),
        };
        let id = e.identity_of_pod(&k).expect("identity");
        assert_eq!(Some(id), local_only.identity_of_pod(&k), "{name}");
        assert!(!identity::is_remote(id));
    }
    let api: PodKey = "west/shop/api-0".parse().expect("a pod key");
    let id = e.identity_of_pod(&api).expect("a remote identity");
    assert!(identity::is_remote(id), "{id:#x}");
    assert_eq!(e.node_of_pod(&api), None, "a remote pod is on no node");
    // The same inventory in another order numbers the same (restart of either side).
    let mut other = local_only;
    let mut changes = remote_changes();
    changes.reverse();
    other.apply_batch(changes).expect("imports");
    assert_eq!(other.identity_of_pod(&api), Some(id));
    // The engine labels remote objects with their cluster and their own namespace's name.
    let pod = e.pod(&api).expect("the pod");
    assert_eq!(
        pod.labels.get("bulkhead.dev/cluster").map(String::as_str),
        Some("west")
    );
    let impostor = e
        .pod(&PodKey {
            namespace: "shop".into(),
            name: "impostor".into(),
        })
        .expect("the pod");
    assert_eq!(
        impostor
            .labels
            .get("bulkhead.dev/cluster")
            .map(String::as_str),
        Some("east")
    );
}

#[test]
fn a_remote_relabel_or_removal_reaches_the_nodes_that_use_it() {
    let mut e = engine(&web_from(
        "{namespaceSelector: {matchLabels: {bulkhead.dev/cluster: west}}, podSelector: {matchLabels: {app: api}}}",
    ));
    assert_eq!(ingress_to_web(&e, WEST_API), Verdict::Allow);
    let v = e.version("node-1").expect("version");
    // Relabelled in west: no longer an api pod.
    let deltas = e
        .apply(remote_pod("west", "shop", "api-0", "batch", WEST_API))
        .expect("applies");
    assert!(deltas.iter().any(|d| d.node == "node-1"), "{deltas:?}");
    assert!(e.version("node-1").expect("version") > v);
    assert_eq!(ingress_to_web(&e, WEST_API), Verdict::Deny);
    // Back, then gone from the peer's inventory: its address is nobody's.
    e.apply(remote_pod("west", "shop", "api-0", "api", WEST_API))
        .expect("applies");
    assert_eq!(ingress_to_web(&e, WEST_API), Verdict::Allow);
    e.apply(Change::DeletePod("west/shop/api-0".parse().expect("key")))
        .expect("applies");
    assert_eq!(ingress_to_web(&e, WEST_API), Verdict::Deny);
    let rs = e.ruleset("node-1").expect("rule set");
    let ip: IpAddr = WEST_API.parse().expect("ip");
    assert!(
        !rs.ipcache
            .iter()
            .any(|c| c.cidr.contains(ip) && c.cidr.prefix() == 32),
        "the removed pod's address left the ipcache"
    );
    // A namespace relabel in west reaches the selection too.
    let mut e = engine(&web_from(
        "{namespaceSelector: {matchLabels: {bulkhead.dev/cluster: west, team: b}}}",
    ));
    assert_eq!(ingress_to_web(&e, WEST_API), Verdict::Deny);
    e.apply(remote_namespace("west", "shop", "b"))
        .expect("applies");
    assert_eq!(ingress_to_web(&e, WEST_API), Verdict::Allow);
    assert_eq!(west().qualify("shop"), "west/shop");
}
