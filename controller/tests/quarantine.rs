//! Quarantine: loading and validation, compiled entries and flags, exceptions in both
//! directions, the ipcache on every node, expiry, and release restoring the rule set exactly.

use std::path::Path;
use std::time::{Duration, SystemTime};

use bulkhead_controller::load::parse_rfc3339;
use bulkhead_controller::model::PolicyKey;
use bulkhead_controller::reachability::Reachability;
use bulkhead_controller::ruleset::{
    Action, Direction, PacketTuple, Protocol, RuleKind, RuleSet, Tier, Verdict, decide, identity,
};
use bulkhead_controller::{Change, EngineConfig, Object, PodKey, PolicyEngine, load_str};

const INVENTORY: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: tools}
---
apiVersion: v1
kind: Namespace
metadata: {name: sec, labels: {team: security}}
---
apiVersion: v1
kind: Pod
metadata: {namespace: tools, name: debug, labels: {app: debug}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {namespace: tools, name: debug-2, labels: {app: debug}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {namespace: tools, name: web, labels: {app: web}}
spec: {nodeName: n2}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {namespace: sec, name: forensics, labels: {app: forensics}}
spec: {nodeName: n3}
status: {podIP: 10.0.0.4}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: tools, name: web}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: debug}}}]}]
";

const QUARANTINE: &str = "
apiVersion: bulkhead.dev/v1alpha1
kind: Quarantine
metadata: {name: q1, namespace: tools}
spec:
  pods: [debug]
  reason: port scan from debug
  allow:
  - namespaceSelector: {matchLabels: {team: security}}
    podSelector: {matchLabels: {app: forensics}}
    ports: [{port: 22, protocol: TCP}]
  - ipBlock: {cidr: 10.9.0.53/32}
  expiresAt: \"2100-12-01T00:00:00Z\"
";

fn objects(yaml: &str) -> Vec<Object> {
    let l = load_str(Path::new("t.yaml"), yaml);
    assert!(l.errors.is_empty(), "{:?}", l.errors);
    l.objects
}

fn quarantine_change(yaml: &str) -> Change {
    match objects(yaml).into_iter().next() {
        Some(Object::Policy(p)) => Change::UpsertPolicy(p),
        other => panic!("expected a policy, got {other:?}"),
    }
}

fn q1() -> PolicyKey {
    PolicyKey {
        kind: RuleKind::Quarantine,
        namespace: "tools".into(),
        name: "q1".into(),
    }
}

fn pod(ns: &str, name: &str) -> PodKey {
    PodKey {
        namespace: ns.into(),
        name: name.into(),
    }
}

fn start() -> SystemTime {
    parse_rfc3339("2100-01-01T00:00:00Z").expect("time")
}

fn engine() -> PolicyEngine {
    PolicyEngine::new_at(EngineConfig::default(), objects(INVENTORY), start()).expect("compiles")
}

fn strip_version(mut rs: RuleSet) -> RuleSet {
    rs.version = 0;
    rs
}

fn packet(src: &str, dst: &str, port: u16) -> PacketTuple {
    PacketTuple {
        src: src.parse().expect("ip"),
        dst: dst.parse().expect("ip"),
        protocol: Some(Protocol::Tcp),
        dst_port: Some(port),
    }
}

#[test]
fn loads_and_validates() {
    let l = load_str(Path::new("q.yaml"), QUARANTINE);
    assert!(l.errors.is_empty(), "{:?}", l.errors);
    let Some(Object::Policy(p)) = l.objects.first() else {
        panic!("expected a policy");
    };
    assert_eq!(p.key, q1());
    let spec = p.quarantine.as_ref().expect("a quarantine");
    assert_eq!(spec.pods.as_deref(), Some(&["debug".to_string()][..]));
    assert_eq!(spec.reason, "port scan from debug");
    assert_eq!(
        spec.expires_at,
        Some(parse_rfc3339("2100-12-01T00:00:00Z").expect("time"))
    );
    // Two exceptions, each in both directions.
    assert_eq!(p.rules.len(), 4);
    assert!(
        p.rules
            .iter()
            .all(|r| r.tier == Tier::Quarantine && r.priority == 0 && r.action == Action::Allow)
    );

    // A QuarantineList works too.
    let list = "apiVersion: bulkhead.dev/v1alpha1\nkind: QuarantineList\nitems:\n- apiVersion: bulkhead.dev/v1alpha1\n  kind: Quarantine\n  metadata: {name: a, namespace: tools}\n  spec: {podSelector: {matchExpressions: [{key: app, operator: In, values: [debug]}]}, reason: x}\n";
    let l = load_str(Path::new("l.yaml"), list);
    assert!(l.errors.is_empty(), "{:?}", l.errors);
    assert_eq!(l.objects.len(), 1);

    let bad = [
        (
            "spec: {reason: x}",
            "q.yaml: document 1: spec: set exactly one of pods (pod names) or podSelector",
        ),
        (
            "spec: {pods: [a], podSelector: {}, reason: x}",
            "q.yaml: document 1: spec: set exactly one of pods",
        ),
        (
            "spec: {pods: [], reason: x}",
            "q.yaml: document 1: spec.pods: pods is empty",
        ),
        (
            "spec: {pods: [a]}",
            "q.yaml: document 1: spec.reason: reason is required",
        ),
        (
            "spec: {pods: [a], reason: '  '}",
            "q.yaml: document 1: spec.reason: reason is required",
        ),
        (
            "spec: {pods: [Bad_Name], reason: x}",
            "q.yaml: document 1: spec.pods[0]:",
        ),
        (
            "spec: {pods: [a], reason: x, expiresAt: tomorrow}",
            "q.yaml: document 1: spec.expiresAt: \"tomorrow\" is not an RFC 3339 time",
        ),
        (
            "spec: {pods: [a], reason: x, expiresAt: '2026-02-30T00:00:00Z'}",
            "q.yaml: document 1: spec.expiresAt: \"2026-02-30T00:00:00Z\" is not an RFC 3339 time (day 30 does not exist in month 2)",
        ),
        (
            "spec: {pods: [a], reason: x, allow: [{}]}",
            "q.yaml: document 1: spec.allow[0]: must specify a peer",
        ),
        (
            "spec: {pods: [a], reason: x, allow: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}",
            "q.yaml: document 1: spec.allow[0]: ipBlock cannot be combined",
        ),
        (
            "spec: {pods: [a], reason: x, allow: [{podSelector: {}, ports: [{port: ssh}]}]}",
            "q.yaml: document 1: spec.allow[0].ports[0].port: named ports cannot be used in quarantine exceptions",
        ),
        (
            "spec: {pods: [a], reason: x, allow: [{podSelector: {matchExpressions: [{key: a, operator: Bogus}]}}]}",
            "q.yaml: document 1: spec.allow[0].podSelector.matchExpressions[0].operator:",
        ),
        (
            "spec: {pods: [a], reason: x, allow: [{ipBlock: {cidr: 10.0.0.1}}]}",
            "q.yaml: document 1: spec.allow[0].ipBlock.cidr: \"10.0.0.1\" is not a CIDR",
        ),
        (
            "spec: {pods: [a], reason: x, ttl: 5}",
            "q.yaml: document 1: spec.ttl: unknown field `ttl`",
        ),
    ];
    for (spec, want) in bad {
        let doc = format!(
            "apiVersion: bulkhead.dev/v1alpha1\nkind: Quarantine\nmetadata: {{name: q, namespace: tools}}\n{spec}\n"
        );
        let l = load_str(Path::new("q.yaml"), &doc);
        assert!(l.objects.is_empty(), "{spec}");
        let errors: Vec<String> = l.errors.iter().map(|e| e.to_string()).collect();
        assert!(
            errors.iter().any(|e| e.starts_with(want)),
            "{spec}: want {want:?}, got {errors:?}"
        );
    }
    let l = load_str(
        Path::new("q.yaml"),
        "apiVersion: bulkhead.dev/v1\nkind: Quarantine\nmetadata: {name: q, namespace: tools}\nspec: {pods: [a], reason: x}\n",
    );
    assert_eq!(
        l.errors[0].to_string(),
        "q.yaml: document 1: apiVersion: Quarantine must have apiVersion bulkhead.dev/v1alpha1, not \"bulkhead.dev/v1\""
    );
    // Like every namespaced kind, no namespace means `default`.
    let l = load_str(
        Path::new("q.yaml"),
        "apiVersion: bulkhead.dev/v1alpha1\nkind: Quarantine\nmetadata: {name: q}\nspec: {pods: [a], reason: x}\n",
    );
    assert!(l.errors.is_empty(), "{:?}", l.errors);
    let Some(Object::Policy(p)) = l.objects.first() else {
        panic!("expected a policy");
    };
    assert_eq!(p.key.namespace, "default");
}

#[test]
fn rfc3339_times() {
    let t = |s: &str| parse_rfc3339(s).expect(s);
    let epoch = SystemTime::UNIX_EPOCH;
    assert_eq!(t("1970-01-01T00:00:00Z"), epoch);
    assert_eq!(
        t("2026-12-01T00:00:00Z"),
        epoch + Duration::from_secs(1_796_083_200)
    );
    assert_eq!(t("2026-12-01T01:30:00+01:30"), t("2026-12-01T00:00:00Z"));
    assert_eq!(
        t("2026-12-01t00:00:00.25z"),
        t("2026-12-01T00:00:00Z") + Duration::from_millis(250)
    );
    assert_eq!(t("1969-12-31T23:59:59Z"), epoch - Duration::from_secs(1));
    for bad in [
        "2026-12-01",
        "2026-13-01T00:00:00Z",
        "2026-12-01T24:00:00Z",
        "2026-12-01T00:00:00",
        "2026-12-01T00:00:00+0100",
        "2026-12-01T00:00:00.Z",
    ] {
        assert!(parse_rfc3339(bad).is_err(), "{bad}");
    }
}

#[test]
fn compiles_to_quarantine_entries_without_changing_identities() {
    let mut e = engine();
    let before = e.rulesets();
    let identities: Vec<_> = e.pod_keys().iter().map(|p| e.identity_of_pod(p)).collect();
    let deltas = e.apply(quarantine_change(QUARANTINE)).expect("applies");
    let after: Vec<_> = e.pod_keys().iter().map(|p| e.identity_of_pod(p)).collect();
    assert_eq!(identities, after, "no identity changes");
    // Every node hears of it (the ipcache of each carries the quarantined address).
    let mut nodes: Vec<&str> = deltas.iter().map(|d| d.node.as_str()).collect();
    nodes.sort();
    assert_eq!(nodes, vec!["n1", "n2", "n3"]);

    let n1 = e.ruleset("n1").expect("n1");
    let debug = n1.endpoint_by_name("tools", "debug").expect("debug");
    let debug2 = n1.endpoint_by_name("tools", "debug-2").expect("debug-2");
    assert!(debug.quarantined);
    assert!(!debug2.quarantined, "only the named pod");
    assert_eq!(debug.identity, debug2.identity, "same identity");
    assert_ne!(debug.policy, debug2.policy, "a group of its own");
    assert_eq!(
        n1.policies[&debug2.policy], before["n1"].policies[&debug2.policy],
        "the identity's group is untouched"
    );
    let forensics = e
        .identity_of_pod(&pod("sec", "forensics"))
        .expect("identity");
    let policy = &n1.policies[&debug.policy];
    for d in Direction::ALL {
        let dp = policy.direction(d);
        assert_eq!(dp.isolated_by, None);
        let deny: Vec<_> = dp
            .entries
            .iter()
            .filter(|x| x.action == Action::Deny)
            .collect();
        assert_eq!(deny.len(), 1, "{d:?}: {dp:?}");
        assert_eq!(deny[0].peer, identity::ANY);
        assert_eq!(deny[0].protocol, None);
        assert!(deny[0].ports.is_all());
        assert_eq!((deny[0].tier, deny[0].priority), (Tier::Quarantine, 1));
        let rule = &n1.rules[&deny[0].rule];
        assert_eq!(
            (
                rule.kind.clone(),
                rule.namespace.as_str(),
                rule.name.as_str()
            ),
            (RuleKind::Quarantine, "tools", "q1")
        );
        assert_eq!(rule.index, None, "the deny-all is the default rule");
        assert_eq!(
            n1.describe(deny[0].rule),
            format!(
                "Quarantine tools/q1 {} default-deny",
                if d == Direction::Ingress {
                    "ingress"
                } else {
                    "egress"
                }
            )
        );
        let allow: Vec<_> = dp
            .entries
            .iter()
            .filter(|x| x.action == Action::Allow)
            .collect();
        assert_eq!(allow.len(), 2, "{d:?}: {dp:?}");
        assert!(
            allow
                .iter()
                .all(|x| x.tier == Tier::Quarantine && x.priority == 0)
        );
        let ssh = allow
            .iter()
            .find(|x| x.peer == forensics)
            .expect("forensics exception");
        assert_eq!(ssh.protocol, Some(Protocol::Tcp));
        assert_eq!((ssh.ports.first, ssh.ports.last), (22, 22));
        assert_eq!(n1.rules[&ssh.rule].index, Some(0));
        assert_eq!(n1.rules[&ssh.rule].direction, d);
    }

    // The quarantined address is in every node's ipcache, flagged; others are not flagged.
    for (name, rs) in e.rulesets() {
        let entry = rs
            .ipcache
            .iter()
            .find(|x| x.cidr.ip().to_string() == "10.0.0.1")
            .unwrap_or_else(|| panic!("{name} carries 10.0.0.1: {:?}", rs.ipcache));
        assert!(entry.quarantined, "{name}");
        assert_eq!(entry.identity, debug.identity);
        assert!(
            rs.ipcache
                .iter()
                .filter(|x| x.cidr.ip().to_string() != "10.0.0.1")
                .all(|x| !x.quarantined),
            "{name}: {:?}",
            rs.ipcache
        );
    }
    // n3 has nothing to do with tools/debug but for the quarantine.
    assert!(
        !before["n3"]
            .ipcache
            .iter()
            .any(|x| x.cidr.ip().to_string() == "10.0.0.1")
    );
    assert_eq!(e.quarantined_pods(), vec![pod("tools", "debug")]);
    assert_eq!(e.quarantines_of_pod(&pod("tools", "debug")), vec![q1()]);
}

#[test]
fn exceptions_apply_in_both_directions() {
    let mut e = engine();
    e.apply(quarantine_change(QUARANTINE)).expect("applies");
    let n1 = e.ruleset("n1").expect("n1");
    let debug = n1.endpoint_by_name("tools", "debug").expect("debug");
    let verdict = |d: Direction, p: &PacketTuple| decide(&n1, debug, d, p).verdict;
    // forensics -> debug:22 and debug -> forensics:22 pass; other ports do not.
    assert_eq!(
        verdict(Direction::Ingress, &packet("10.0.0.4", "10.0.0.1", 22)),
        Verdict::Allow
    );
    assert_eq!(
        verdict(Direction::Egress, &packet("10.0.0.1", "10.0.0.4", 22)),
        Verdict::Allow
    );
    assert_eq!(
        verdict(Direction::Ingress, &packet("10.0.0.4", "10.0.0.1", 80)),
        Verdict::Deny
    );
    // The CIDR exception, any port, both ways.
    assert_eq!(
        verdict(Direction::Egress, &packet("10.0.0.1", "10.9.0.53", 53)),
        Verdict::Allow
    );
    assert_eq!(
        verdict(Direction::Ingress, &packet("10.9.0.53", "10.0.0.1", 9999)),
        Verdict::Allow
    );
    // Everything else is denied, whatever the web policy admits.
    let d = decide(
        &n1,
        debug,
        Direction::Egress,
        &packet("10.0.0.1", "10.0.0.3", 80),
    );
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(
        n1.describe(d.rule),
        "Quarantine tools/q1 egress default-deny"
    );
    assert_eq!(
        verdict(Direction::Ingress, &packet("10.0.0.2", "10.0.0.1", 80)),
        Verdict::Deny
    );
    // An unknown protocol and a fragment are denied too.
    let mut odd = packet("10.0.0.1", "10.0.0.3", 80);
    odd.protocol = None;
    odd.dst_port = None;
    assert_eq!(verdict(Direction::Egress, &odd), Verdict::Deny);
}

#[test]
fn explain_and_evaluate_honour_the_quarantine() {
    let mut e = engine();
    e.apply(quarantine_change(QUARANTINE)).expect("applies");
    let r = Reachability::new(&e);
    let x = r
        .explain(
            &pod("tools", "debug"),
            &pod("tools", "web"),
            Protocol::Tcp,
            80,
        )
        .expect("explains");
    assert_eq!(x.verdict, Verdict::Deny);
    assert_eq!(
        x.egress.reason,
        "tools/debug is quarantined by Quarantine tools/q1: port scan from debug; 80/TCP to tools/web is not one of its exceptions"
    );
    assert_eq!(
        x.ingress.verdict,
        Verdict::Allow,
        "web's own policy admits debug"
    );
    let x = r
        .explain(
            &pod("sec", "forensics"),
            &pod("tools", "debug"),
            Protocol::Tcp,
            22,
        )
        .expect("explains");
    assert_eq!(x.verdict, Verdict::Allow);
    assert_eq!(
        x.ingress.reason,
        "tools/debug is quarantined by Quarantine tools/q1: port scan from debug; allowed by its exception Quarantine tools/q1 ingress[0]"
    );
    let m = r.matrix(Protocol::Tcp, 80);
    assert!(!m["tools/debug"]["tools/web"]);
    assert!(m["tools/debug-2"]["tools/web"]);
    assert!(!m["tools/debug-2"]["tools/debug"]);
}

#[test]
fn release_restores_the_rule_sets_exactly() {
    let mut e = engine();
    let before = e.rulesets();
    let mut rebuilt = before.clone();
    let mut apply = |deltas: Vec<bulkhead_controller::ruleset::NodeDelta>| {
        for d in &deltas {
            rebuilt
                .get_mut(&d.node)
                .expect("known node")
                .apply_delta(d)
                .expect("delta applies");
        }
    };
    apply(e.apply(quarantine_change(QUARANTINE)).expect("applies"));
    let n1 = e.ruleset("n1").expect("n1");
    assert!(
        n1.endpoint_by_name("tools", "debug")
            .expect("debug")
            .quarantined
    );
    apply(e.apply(Change::DeletePolicy(q1())).expect("releases"));
    let after = e.rulesets();
    assert_eq!(after, rebuilt, "deltas rebuild the rule sets");
    for (node, rs) in &before {
        assert_eq!(
            strip_version(rs.clone()),
            strip_version(after[node].clone()),
            "{node}"
        );
        assert!(after[node].version > rs.version);
    }
    assert!(e.quarantined_pods().is_empty());
}

#[test]
fn quarantine_by_selector_and_flag_changes_travel_in_deltas() {
    let mut e = engine();
    let n1_before = e.ruleset("n1").expect("n1");
    let sel = "apiVersion: bulkhead.dev/v1alpha1\nkind: Quarantine\nmetadata: {name: all-debug, namespace: tools}\nspec: {podSelector: {matchLabels: {app: debug}}, reason: lateral movement}\n";
    let deltas = e.apply(quarantine_change(sel)).expect("applies");
    let n1 = deltas.iter().find(|d| d.node == "n1").expect("n1 delta");
    // Both debug pods switch group and flag, keeping id and identity.
    assert_eq!(n1.endpoints_changed.len(), 2, "{n1:?}");
    assert!(n1.endpoints_changed.iter().all(|c| c.quarantined));
    assert!(n1.endpoints_added.is_empty() && n1.endpoints_removed.is_empty());
    let ids: Vec<_> = n1_before
        .endpoints
        .iter()
        .filter(|x| x.pod.starts_with("debug"))
        .map(|x| (x.id, x.identity))
        .collect();
    let changed: Vec<_> = n1
        .endpoints_changed
        .iter()
        .map(|c| (c.id, c.identity))
        .collect();
    assert_eq!(ids, changed);
    // Their addresses are upserted with the flag (n1 carried them already, unflagged).
    let flagged: Vec<String> = n1
        .ipcache_upserted
        .iter()
        .filter(|x| x.quarantined)
        .map(|x| x.cidr.ip().to_string())
        .collect();
    assert_eq!(flagged, vec!["10.0.0.1", "10.0.0.2"]);
    let n3 = deltas.iter().find(|d| d.node == "n3").expect("n3 delta");
    assert_eq!(n3.ipcache_upserted.len(), 2);
    assert!(n3.ipcache_upserted.iter().all(|x| x.quarantined));
    assert!(n3.endpoints_changed.is_empty() && n3.policies_added.is_empty());
    // Both pods share one quarantine group.
    let rs = e.ruleset("n1").expect("n1");
    let groups: std::collections::BTreeSet<_> = rs
        .endpoints
        .iter()
        .filter(|x| x.pod.starts_with("debug"))
        .map(|x| x.policy)
        .collect();
    assert_eq!(groups.len(), 1);
    assert!(rs.dangling_policies().is_empty());
    // A second quarantine on one of them gives that one a group of its own (both sets).
    e.apply(quarantine_change(QUARANTINE)).expect("applies");
    let rs = e.ruleset("n1").expect("n1");
    let a = rs.endpoint_by_name("tools", "debug").expect("debug");
    let b = rs.endpoint_by_name("tools", "debug-2").expect("debug-2");
    assert_ne!(a.policy, b.policy);
    assert_eq!(e.quarantines_of_pod(&pod("tools", "debug")).len(), 2);
    // A new pod matching the selector is quarantined on arrival, on a brand-new node.
    let newcomer = "apiVersion: v1\nkind: Pod\nmetadata: {namespace: tools, name: debug-3, labels: {app: debug}}\nspec: {nodeName: n9}\nstatus: {podIP: 10.0.0.9}\n";
    let Some(Object::Pod(p)) = objects(newcomer).into_iter().next() else {
        panic!("a pod");
    };
    e.apply(Change::UpsertPod(p)).expect("applies");
    let n9 = e.ruleset("n9").expect("n9");
    assert!(
        n9.endpoint_by_name("tools", "debug-3")
            .expect("ep")
            .quarantined
    );
    let flagged = n9.ipcache.iter().filter(|x| x.quarantined).count();
    assert_eq!(flagged, 3, "{:?}", n9.ipcache);
}

#[test]
fn expiry_deactivates_without_sleeping() {
    let mut e = engine();
    let before = e.rulesets();
    e.apply(quarantine_change(QUARANTINE)).expect("applies");
    let expires = parse_rfc3339("2100-12-01T00:00:00Z").expect("time");
    assert_eq!(e.next_expiry(), Some(expires));
    assert!(e.quarantine_active(&q1()));
    // Not yet: nothing changes, no version moves.
    let v = e.version("n1");
    assert!(
        e.expire(expires - Duration::from_secs(1))
            .expect("ticks")
            .is_empty()
    );
    assert_eq!(e.version("n1"), v);
    // Due: the quarantine is inactive and the rule sets are what they were.
    let deltas = e.expire(expires).expect("ticks");
    assert_eq!(deltas.len(), 3);
    assert!(!e.quarantine_active(&q1()));
    assert!(e.quarantine(&q1()).is_some(), "still known, just inactive");
    assert_eq!(e.next_expiry(), None);
    for (node, rs) in e.rulesets() {
        assert_eq!(strip_version(rs), strip_version(before[&node].clone()));
    }
    // The clock does not go back.
    assert!(e.expire(start()).expect("ticks").is_empty());
    assert_eq!(e.now(), expires);
    // An already expired quarantine is ignored from the start, in a full compile too.
    let mut objs = objects(INVENTORY);
    objs.extend(objects(QUARANTINE));
    let late =
        PolicyEngine::new_at(EngineConfig::default(), objs.clone(), expires).expect("compiles");
    assert!(late.quarantined_pods().is_empty());
    let early = PolicyEngine::new_at(EngineConfig::default(), objs, start()).expect("compiles");
    assert_eq!(early.quarantined_pods(), vec![pod("tools", "debug")]);
}

/// The quarantined address's entry on `rs`, by address.
fn ipcache_entry<'a>(rs: &'a RuleSet, ip: &str) -> &'a bulkhead_controller::ruleset::IpCacheEntry {
    rs.ipcache
        .iter()
        .find(|x| x.cidr.ip().to_string() == ip && x.cidr.prefix() == 32)
        .unwrap_or_else(|| panic!("{} carries {ip}: {:?}", rs.node, rs.ipcache))
}

#[test]
fn every_node_carries_the_exception_identities_of_quarantined_addresses() {
    let mut e = engine();
    let mut rebuilt = e.rulesets();
    fn apply_to(
        rebuilt: &mut std::collections::BTreeMap<String, RuleSet>,
        deltas: &[bulkhead_controller::ruleset::NodeDelta],
    ) {
        for d in deltas {
            rebuilt
                .entry(d.node.clone())
                .or_default()
                .apply_delta(d)
                .expect("delta applies");
        }
    }
    let deltas = e.apply(quarantine_change(QUARANTINE)).expect("applies");
    apply_to(&mut rebuilt, &deltas);
    let forensics = e
        .identity_of_pod(&pod("sec", "forensics"))
        .expect("identity");
    // The ipBlock exception's CIDR identity, the same on every node.
    let cidr = ipcache_entry(&e.ruleset("n1").expect("n1"), "10.9.0.53").identity;
    assert!(cidr >= identity::FIRST_CIDR_IDENTITY);
    let mut both = vec![forensics, cidr];
    both.sort();
    for (name, rs) in e.rulesets() {
        let q = ipcache_entry(&rs, "10.0.0.1");
        assert!(q.quarantined, "{name}");
        assert_eq!(q.quarantine_allow, both, "{name}");
        assert!(q.quarantine_admits(forensics) && q.quarantine_admits(cidr));
        let web = e.identity_of_pod(&pod("tools", "web")).expect("identity");
        assert!(!q.quarantine_admits(web), "{name}");
        // Nothing else carries a list.
        assert!(
            rs.ipcache
                .iter()
                .filter(|x| x.cidr != q.cidr)
                .all(|x| x.quarantine_allow.is_empty()),
            "{name}: {:?}",
            rs.ipcache
        );
    }
    // The new lists travel in the deltas, on every node.
    for d in &deltas {
        let up = d
            .ipcache_upserted
            .iter()
            .find(|x| x.cidr.ip().to_string() == "10.0.0.1")
            .unwrap_or_else(|| panic!("{}: {d:?}", d.node));
        assert_eq!(up.quarantine_allow, both, "{}", d.node);
    }

    // forensics leaves the exception (relabeled): every node's list drops its identity.
    let relabeled = "apiVersion: v1\nkind: Pod\nmetadata: {namespace: sec, name: forensics, labels: {app: idle}}\nspec: {nodeName: n3}\nstatus: {podIP: 10.0.0.4}\n";
    let Some(Object::Pod(p)) = objects(relabeled).into_iter().next() else {
        panic!("a pod");
    };
    let deltas = e.apply(Change::UpsertPod(p)).expect("applies");
    apply_to(&mut rebuilt, &deltas);
    let mut nodes: Vec<&str> = deltas.iter().map(|d| d.node.as_str()).collect();
    nodes.sort();
    assert_eq!(nodes, vec!["n1", "n2", "n3"]);
    for d in &deltas {
        let up = d
            .ipcache_upserted
            .iter()
            .find(|x| x.cidr.ip().to_string() == "10.0.0.1")
            .unwrap_or_else(|| panic!("{}: {d:?}", d.node));
        assert!(up.quarantined);
        assert_eq!(up.quarantine_allow, vec![cidr], "{}", d.node);
    }
    // A new pod matching it (a fresh identity, on a new node) joins every node's list.
    let newcomer = "apiVersion: v1\nkind: Pod\nmetadata: {namespace: sec, name: forensics-2, labels: {app: forensics, shift: night}}\nspec: {nodeName: n4}\nstatus: {podIP: 10.0.0.5}\n";
    let Some(Object::Pod(p)) = objects(newcomer).into_iter().next() else {
        panic!("a pod");
    };
    apply_to(
        &mut rebuilt,
        &e.apply(Change::UpsertPod(p)).expect("applies"),
    );
    let f2 = e
        .identity_of_pod(&pod("sec", "forensics-2"))
        .expect("identity");
    assert_ne!(f2, forensics);
    let mut now = vec![f2, cidr];
    now.sort();
    let rulesets = e.rulesets();
    assert_eq!(rulesets.len(), 4);
    for (name, rs) in &rulesets {
        assert_eq!(
            ipcache_entry(rs, "10.0.0.1").quarantine_allow,
            now,
            "{name}"
        );
    }
    assert_eq!(rebuilt, rulesets, "deltas rebuild the rule sets");
    // A full compile agrees.
    let mut objs: Vec<Object> = objects(INVENTORY)
        .into_iter()
        .filter(|o| !matches!(o, Object::Pod(p) if p.name == "forensics"))
        .collect();
    objs.extend(objects(QUARANTINE));
    objs.extend(objects(relabeled));
    objs.extend(objects(newcomer));
    let full = PolicyEngine::new_at(EngineConfig::default(), objs, start()).expect("compiles");
    for (name, rs) in full.rulesets() {
        assert_eq!(strip_version(rs), strip_version(rulesets[&name].clone()));
    }

    // An exception admitting every pod: [ANY], whatever the pods.
    let open = "apiVersion: bulkhead.dev/v1alpha1\nkind: Quarantine\nmetadata: {name: q1, namespace: tools}\nspec:\n  pods: [debug]\n  reason: port scan from debug\n  allow: [{namespaceSelector: {}, ports: [{port: 22}]}]\n";
    apply_to(
        &mut rebuilt,
        &e.apply(quarantine_change(open)).expect("applies"),
    );
    for (name, rs) in e.rulesets() {
        let q = ipcache_entry(&rs, "10.0.0.1");
        assert_eq!(q.quarantine_allow, vec![identity::ANY], "{name}");
        assert!(q.quarantine_admits(identity::WORLD));
    }
    // No exceptions: flagged, empty list (left out of the JSON).
    let closed = "apiVersion: bulkhead.dev/v1alpha1\nkind: Quarantine\nmetadata: {name: q1, namespace: tools}\nspec: {pods: [debug], reason: port scan from debug}\n";
    apply_to(
        &mut rebuilt,
        &e.apply(quarantine_change(closed)).expect("applies"),
    );
    for (name, rs) in e.rulesets() {
        let q = ipcache_entry(&rs, "10.0.0.1");
        assert!(q.quarantined && q.quarantine_allow.is_empty(), "{name}");
        let json = serde_json::to_string(q).expect("serializes");
        assert!(!json.contains("quarantine_allow"), "{json}");
    }
    // Released: no flag, no list.
    apply_to(
        &mut rebuilt,
        &e.apply(Change::DeletePolicy(q1())).expect("releases"),
    );
    for (name, rs) in e.rulesets() {
        assert!(
            rs.ipcache
                .iter()
                .all(|x| !x.quarantined && x.quarantine_allow.is_empty()),
            "{name}"
        );
    }
    assert_eq!(rebuilt, e.rulesets(), "deltas rebuild the rule sets");
}
