//! The service graph and the flow pipeline, on records as agents send them.

use super::*;
use crate::ruleset::{
    Direction, Endpoint, FlowKind, FlowReason, FlowRule, FlowVerdict, QuarantineAction,
    QuarantineEvent, RuleKind, RuleRef, RuleSet,
};

fn ep(id: u32, ns: &str, pod: &str, workload: Option<&str>, ip: &str) -> Endpoint {
    Endpoint {
        id,
        namespace: ns.into(),
        pod: pod.into(),
        workload: workload.map(str::to_string),
        identity: 300 + id,
        ips: vec![ip.parse().expect("ip")],
        interface: None,
        quarantined: false,
        policy: 300 + id,
    }
}

/// A rule of a policy in namespace `ns`: `name` with `[index]` when given.
fn rule(name: &str) -> FlowRule {
    let (name, index) = match name.split_once('[') {
        Some((n, i)) => (n, i.trim_end_matches(']').parse().ok()),
        None => (name, None),
    };
    FlowRule::Rule(RuleRef {
        kind: RuleKind::NetworkPolicy,
        namespace: "shop".into(),
        name: name.into(),
        direction: Direction::Ingress,
        index,
    })
}

fn rec(
    endpoint: &str,
    direction: &str,
    src: &str,
    dst: &str,
    verdict: &str,
    rule: FlowRule,
) -> FlowRecord {
    FlowRecord {
        time_unix_nanos: 5,
        endpoint: endpoint.parse().expect("endpoint"),
        direction: direction.parse().expect("direction"),
        src: src.parse().expect("ip"),
        dst: dst.parse().expect("ip"),
        src_port: 0,
        dst_port: 80,
        protocol: 6,
        kind: FlowKind::New,
        verdict: verdict.parse().expect("verdict"),
        rule,
        rule_id: 0,
        local_identity: 0,
        peer_identity: 0,
        peer: None,
        reason: FlowReason::AllowedNew,
        packets: 0,
        bytes: 60,
        peer_names: Vec::new(),
        staged: None,
    }
}

/// Rule labels stop at the cap; denials by further rules are counted as "other".
#[test]
fn rule_labels_beyond_the_cap_are_counted_as_other() {
    let mut g = ServiceGraph::default();
    let dir = Directory::default();
    let extra = 500;
    for i in 0..MAX_RULE_LABELS + extra {
        let r = rec(
            "ns/p",
            "ingress",
            "192.0.2.1",
            "192.0.2.2",
            "denied",
            FlowRule::Unnamed(i as u32),
        );
        g.add(&dir, &r);
    }
    assert_eq!(g.rule_labels(), MAX_RULE_LABELS + 1);
    let drops: Vec<(&str, u64)> = g.drops_by_rule().collect();
    assert_eq!(drops.len(), MAX_RULE_LABELS + 1);
    assert!(
        drops.contains(&(OTHER_RULES, extra as u64)),
        "{:?}",
        &drops[..3]
    );
    // A rule already labelled keeps its label after the cap is reached.
    let r = rec(
        "ns/p",
        "ingress",
        "192.0.2.1",
        "192.0.2.2",
        "denied",
        FlowRule::Unnamed(7),
    );
    g.add(&dir, &r);
    assert!(
        g.drops_by_rule()
            .any(|(name, n)| name == "rule #7" && n == 2)
    );
    // The one edge names its first rules and counts the rest together.
    let graph = g.to_proto("");
    assert_eq!(graph.edges.len(), 1);
    let edge = &graph.edges[0];
    assert_eq!(edge.rules.len(), MAX_RULES_PER_EDGE + 1, "{:?}", edge.rules);
    let count = |rule: &str| edge.rules.iter().find(|r| r.rule == rule).map(|r| r.count);
    assert_eq!(
        count(OTHER_RULES),
        Some((MAX_RULE_LABELS + extra - MAX_RULES_PER_EDGE) as u64)
    );
    assert_eq!(count("rule #7"), Some(2));
}

#[test]
fn edges_not_seen_since_the_cutoff_expire_with_their_lone_workloads() {
    let rs = RuleSet {
        node: "n1".into(),
        endpoints: vec![
            ep(1, "shop", "web-0", Some("Deployment/web"), "10.0.0.1"),
            ep(2, "shop", "api-0", Some("Deployment/api"), "10.0.0.2"),
            ep(3, "tools", "debug", None, "10.0.0.3"),
        ],
        ..Default::default()
    };
    let dir = Directory::from_rulesets([&rs]);
    let mut g = ServiceGraph::default();
    let at = |mut r: FlowRecord, t: u64| {
        r.time_unix_nanos = t;
        r
    };
    let old = rec(
        "shop/api-0",
        "ingress",
        "10.0.0.3",
        "10.0.0.2",
        "denied",
        rule("d"),
    );
    // A pod-to-pod connection counts where it arrives.
    let new = rec(
        "shop/api-0",
        "ingress",
        "10.0.0.1",
        "10.0.0.2",
        "allowed",
        rule("a[0]"),
    );
    g.add(&dir, &at(old, 100));
    g.add(&dir, &at(new.clone(), 100));
    g.add(&dir, &at(new, 300));
    assert_eq!(g.len(), (3, 2));
    assert_eq!(g.expire(50), 0, "nothing is older than 50");
    assert_eq!(g.expire(200), 1, "debug → api was last seen at 100");
    assert_eq!(g.len(), (2, 1), "tools/debug left with its only edge");
    let ids: Vec<String> = g.graph().nodes.into_iter().map(|n| n.id).collect();
    assert!(!ids.iter().any(|id| id.contains("debug")), "{ids:?}");
    assert_eq!(
        g.by_verdict().map(|(_, n)| n).sum::<u64>(),
        3,
        "the metric counters keep every record"
    );
    assert_eq!(g.expire(400), 1);
    assert_eq!(g.len(), (0, 0));
}

#[test]
fn a_connection_counts_once_and_denials_name_their_rule() {
    let rs = RuleSet {
        node: "n1".into(),
        endpoints: vec![
            ep(1, "shop", "web-0", Some("Deployment/web"), "10.0.0.1"),
            ep(2, "shop", "api-0", Some("Deployment/api"), "10.0.0.2"),
            ep(3, "tools", "debug", None, "10.0.0.3"),
        ],
        ..Default::default()
    };
    let dir = Directory::from_rulesets([&rs]);
    let mut g = ServiceGraph::default();
    // web → api allowed, reported at both ends.
    g.add(
        &dir,
        &rec(
            "shop/web-0",
            "egress",
            "10.0.0.1",
            "10.0.0.2",
            "allowed",
            FlowRule::DefaultAllow,
        ),
    );
    g.add(
        &dir,
        &rec(
            "shop/api-0",
            "ingress",
            "10.0.0.1",
            "10.0.0.2",
            "allowed",
            rule("api[0]"),
        ),
    );
    // debug → api denied at api's ingress.
    g.add(
        &dir,
        &rec(
            "shop/api-0",
            "ingress",
            "10.0.0.3",
            "10.0.0.2",
            "denied",
            rule("api"),
        ),
    );
    // world → web allowed at web's ingress.
    g.add(
        &dir,
        &rec(
            "shop/web-0",
            "ingress",
            "192.0.2.7",
            "10.0.0.1",
            "allowed",
            FlowRule::DefaultAllow,
        ),
    );
    let graph = g.graph();
    let edge = |s: &str, d: &str| {
        graph
            .edges
            .iter()
            .find(|e| e.src == s && e.dst == d)
            .cloned()
    };
    let web_api = edge("shop/Deployment/web", "shop/Deployment/api").expect("web → api");
    assert_eq!((web_api.allowed, web_api.denied), (1, 0));
    let debug_api = edge("tools/Pod/debug", "shop/Deployment/api").expect("debug → api");
    assert_eq!((debug_api.allowed, debug_api.denied), (0, 1));
    assert!(
        debug_api
            .rules
            .contains_key("NetworkPolicy shop/api ingress default-deny")
    );
    assert!(edge("world", "shop/Deployment/web").is_some());
    assert_eq!(g.drops_by_rule().map(|(_, c)| c).sum::<u64>(), 1);
    assert_eq!(g.records(), 4);
    assert_eq!(g.len(), (4, 3));
    assert_eq!(graph.nodes.len(), 4);
    // The JSON written straight from the aggregate is the JSON of the graph, byte for byte.
    assert_eq!(
        g.to_json(),
        serde_json::to_vec(&graph).expect("json"),
        "{}",
        String::from_utf8_lossy(&g.to_json())
    );
    let p = g.to_proto("tools");
    assert_eq!((p.nodes.len(), p.edges.len()), (2, 1));
    assert_eq!(Graph::from(g.to_proto("")).to_dot(), graph.to_dot());
    let dot = graph.to_dot();
    assert!(
        dot.contains("cluster_") && dot.contains("color=red"),
        "{dot}"
    );
}

/// A `Default` rule prints only its direction: rules that print the same are one label, so an
/// agent cannot fill the labels with variants of one text.
#[test]
fn rules_that_print_the_same_are_one_label() {
    let mut g = ServiceGraph::default();
    let dir = Directory::default();
    for i in 0..100 {
        let r = rec(
            "ns/p",
            "ingress",
            "192.0.2.1",
            "192.0.2.2",
            "denied",
            FlowRule::Rule(RuleRef {
                kind: RuleKind::Default,
                namespace: format!("ns-{i}"),
                name: format!("p-{i}"),
                direction: Direction::Ingress,
                index: Some(i),
            }),
        );
        g.add(&dir, &r);
    }
    let drops: Vec<(&str, u64)> = g.drops_by_rule().collect();
    assert_eq!(drops, [("default (ingress)", 100)]);
    assert_eq!(g.rule_labels(), 2, "the label and the overflow label");
}

fn quarantine_event(action: QuarantineAction) -> FlowEntry {
    FlowEntry::Quarantine(QuarantineEvent {
        time_unix_nanos: 9,
        pod: "tools/debug".parse().expect("pod"),
        action,
        quarantine: "debug".into(),
        reason: "port scan".into(),
        actor: "web UI".into(),
    })
}

/// A flow as `bulkhead flows -o json` prints it.
fn flow_text(node: &str, e: &FlowEntry) -> String {
    serde_json::to_string(&crate::server::api::FlowLine::of(node, e)).expect("json")
}

fn flow_json(node: &str, e: &FlowEntry) -> serde_json::Value {
    serde_json::from_str(&flow_text(node, e)).expect("json")
}

/// `/api/flows` and `bulkhead flows -o json` show what they showed when records were texts.
#[test]
fn flows_and_quarantine_actions_read_as_before() {
    let mut r = rec(
        "shop/api-0",
        "ingress",
        "10.0.0.1",
        "2001:db8::2",
        "audit-would-deny",
        rule("api"),
    );
    r.kind = FlowKind::Audit;
    r.reason = FlowReason::AuditWouldDeny;
    r.peer = Some("shop/web-0".parse().expect("pod"));
    assert_eq!(
        flow_text("n1", &FlowEntry::Flow(r.clone())),
        r#"{"direction":"ingress","dst":"2001:db8::2","dst_port":80,"endpoint":"shop/api-0","kind":"audit","node":"n1","peer":"shop/web-0","protocol":6,"reason":"audit_would_deny","rule":"NetworkPolicy shop/api ingress default-deny","src":"10.0.0.1","src_port":0,"time_unix_nanos":5,"verdict":"audit-would-deny"}"#
    );
    r.peer = None;
    r.endpoint = EndpointRef::Unnamed(3);
    let v = flow_json("n1", &FlowEntry::Flow(r));
    assert_eq!(
        (v["peer"].as_str(), v["endpoint"].as_str()),
        (Some(""), Some("endpoint#3"))
    );
    assert_eq!(
        flow_text(
            "controller",
            &quarantine_event(QuarantineAction::Quarantine)
        ),
        r#"{"direction":"","dst":"","dst_port":0,"endpoint":"tools/debug","kind":"quarantine","node":"controller","peer":"","protocol":0,"reason":"by web UI","rule":"Quarantine tools/debug: port scan","src":"","src_port":0,"time_unix_nanos":9,"verdict":"quarantined"}"#
    );
    for (action, verdict) in [
        (QuarantineAction::Release, "released"),
        (QuarantineAction::Expire, "released"),
    ] {
        let v = flow_json("controller", &quarantine_event(action));
        assert_eq!(
            (v["kind"].as_str(), v["verdict"].as_str()),
            (Some(action.as_str()), Some(verdict))
        );
    }
}

/// The filter of `bulkhead flows`: a pod at either end, a namespace at either end, each on its
/// own; peers named from the directory when the agent could not.
#[test]
fn filters_match_either_end() {
    let rs = RuleSet {
        node: "n1".into(),
        endpoints: vec![
            ep(1, "shop", "web-0", None, "10.0.0.1"),
            ep(2, "data", "db-0", None, "10.0.0.2"),
        ],
        ..Default::default()
    };
    let dir = Directory::from_rulesets([&rs]);
    // web-0 → db-0 seen at web's egress; the agent did not name db-0.
    let flow = FlowEntry::Flow(rec(
        "shop/web-0",
        "egress",
        "10.0.0.1",
        "10.0.0.2",
        "denied",
        rule("x"),
    ));
    let filter = |ns: Option<&str>, pod: Option<&str>, verdict: Option<&str>| FlowFilter {
        namespace: ns.map(str::to_string),
        pod: pod.map(str::to_string),
        verdict: verdict.map(str::to_string),
        staged_verdict: None,
        since_unix_nanos: 0,
        peer_name: None,
        cluster: None,
    };
    let cases = [
        (filter(None, None, None), true),
        (filter(None, None, Some("denied")), true),
        (filter(None, None, Some("allowed")), false),
        (filter(Some("shop"), None, None), true),
        (filter(Some("data"), None, None), true),
        (filter(Some("tools"), None, None), false),
        (filter(None, Some("shop/web-0"), None), true),
        (filter(None, Some("data/db-0"), None), true),
        (filter(None, Some("data/db"), None), false),
        (filter(None, Some("shop/web-0x"), None), false),
        (filter(None, Some("shop"), None), false),
        // Each on its own: the pod at one end, the namespace at the other.
        (filter(Some("data"), Some("shop/web-0"), None), true),
    ];
    for (f, want) in cases {
        assert_eq!(f.matches(&dir, &flow), want, "{f:?}");
    }
    let since = FlowFilter {
        since_unix_nanos: 6,
        ..filter(None, None, None)
    };
    assert!(!since.matches(&dir, &flow), "observed at 5");
    // The staged verdict: the enforced one when the staged view agrees, else the staged one.
    let staged = |v: &str| FlowFilter {
        staged_verdict: Some(v.to_string()),
        ..filter(None, None, None)
    };
    assert!(staged("denied").matches(&dir, &flow));
    assert!(!staged("allowed").matches(&dir, &flow));
    let FlowEntry::Flow(mut would_allow) = flow.clone() else {
        unreachable!()
    };
    would_allow.staged = Some(bulkhead_ruleset::StagedOutcome {
        verdict: FlowVerdict::Allowed,
        rule: rule("y"),
        rule_id: 7,
    });
    let would_allow = FlowEntry::Flow(would_allow);
    assert!(staged("allowed").matches(&dir, &would_allow));
    assert!(!staged("denied").matches(&dir, &would_allow));
    // An endpoint the agent could not name matches its own text only.
    let unnamed = FlowEntry::Flow(rec(
        "endpoint#4",
        "ingress",
        "192.0.2.1",
        "192.0.2.2",
        "denied",
        rule("x"),
    ));
    assert!(filter(None, Some("endpoint#4"), None).matches(&dir, &unnamed));
    assert!(!filter(None, Some("endpoint#5"), None).matches(&dir, &unnamed));
    assert!(!filter(Some("endpoint#4"), None, None).matches(&dir, &unnamed));
    // A quarantine action: its pod, its verdict.
    let q = quarantine_event(QuarantineAction::Quarantine);
    assert!(filter(Some("tools"), Some("tools/debug"), Some("quarantined")).matches(&dir, &q));
    assert!(!filter(None, None, Some("released")).matches(&dir, &q));
    assert!(!filter(Some("shop"), None, None).matches(&dir, &q));
}

#[test]
fn flows_the_staged_policies_would_deny_are_counted_by_staged_policy() {
    let mut g = ServiceGraph::default();
    let dir = Directory::default();
    let staged = |name: &str, verdict: FlowVerdict| bulkhead_ruleset::StagedOutcome {
        verdict,
        rule: FlowRule::Rule(RuleRef {
            kind: RuleKind::StagedNetworkPolicy,
            namespace: "shop".into(),
            name: name.into(),
            direction: Direction::Ingress,
            index: None,
        }),
        rule_id: 9,
    };
    let with = |verdict: &str, outcome: Option<bulkhead_ruleset::StagedOutcome>| {
        let mut r = rec(
            "shop/api-0",
            "ingress",
            "10.0.0.1",
            "10.0.0.2",
            verdict,
            rule("x"),
        );
        r.staged = outcome;
        r
    };
    // Would deny: an allowed record the staged view denies (twice), and an audit record.
    g.add(
        &dir,
        &with("allowed", Some(staged("db", FlowVerdict::Denied))),
    );
    g.add(
        &dir,
        &with("allowed", Some(staged("db", FlowVerdict::Denied))),
    );
    let mut audit = with("audit-would-deny", Some(staged("web", FlowVerdict::Denied)));
    audit.rule = staged("web", FlowVerdict::Denied).rule;
    g.add(&dir, &audit);
    // Not counted: denied now (whatever the staged view says), or allowed by both.
    g.add(
        &dir,
        &with("denied", Some(staged("db", FlowVerdict::Denied))),
    );
    g.add(
        &dir,
        &with("denied", Some(staged("db", FlowVerdict::Allowed))),
    );
    g.add(&dir, &with("allowed", None));
    let mut counts: Vec<(String, u64)> =
        g.staged_denies().map(|(p, n)| (p.to_string(), n)).collect();
    counts.sort();
    assert_eq!(
        counts,
        [
            ("StagedNetworkPolicy shop/db".to_string(), 2),
            ("StagedNetworkPolicy shop/web".to_string(), 1)
        ]
    );
    // With the edges they were on (for the map).
    let staged = g.staged();
    assert_eq!(
        staged
            .iter()
            .map(|s| (s.policy.as_str(), s.flows, s.edges.len()))
            .collect::<Vec<_>>(),
        [
            ("StagedNetworkPolicy shop/db", 2, 1),
            ("StagedNetworkPolicy shop/web", 1, 1)
        ]
    );
    let e = &staged[0].edges[0];
    assert_eq!((e.port, e.protocol, e.flows), (80, 6, 2));
    // (The directory names no pod here: both ends are addresses of no known pod.)
    assert_eq!((e.src.as_str(), e.dst.as_str()), ("world", "world"));
}

fn name(text: &str) -> NamePattern {
    NamePattern::parse(text).expect("a valid pattern")
}

/// A world peer with DNS names is a node of its own, `world: NAME` for its first name (an
/// exact name before a wildcard), distinct from plain `world`; the connection counts once.
#[test]
fn world_peers_with_names_are_nodes_of_their_own() {
    let rs = RuleSet {
        node: "n1".into(),
        endpoints: vec![ep(1, "shop", "api-0", Some("Deployment/api"), "10.0.0.2")],
        ..Default::default()
    };
    let dir = Directory::from_rulesets([&rs]);
    let mut g = ServiceGraph::default();
    let egress = |dst: &str, verdict: &str, names: &[&str]| FlowRecord {
        peer_names: names.iter().map(|n| name(n)).collect(),
        ..rec(
            "shop/api-0",
            "egress",
            "10.0.0.2",
            dst,
            verdict,
            rule("api"),
        )
    };
    g.add(
        &dir,
        &egress(
            "203.0.113.7",
            "denied",
            &["api.example.com", "*.example.com"],
        ),
    );
    g.add(&dir, &egress("203.0.113.8", "denied", &["api.example.com"]));
    g.add(&dir, &egress("203.0.113.9", "allowed", &["*.example.com"]));
    g.add(&dir, &egress("198.51.100.1", "allowed", &[]));
    // An ingress record from a named address names the source.
    g.add(
        &dir,
        &FlowRecord {
            peer_names: vec![name("api.example.com")],
            ..rec(
                "shop/api-0",
                "ingress",
                "203.0.113.7",
                "10.0.0.2",
                "denied",
                rule("api"),
            )
        },
    );
    let graph = g.graph();
    let ids: Vec<&str> = graph.nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "shop/Deployment/api",
            "world",
            "world: *.example.com",
            "world: api.example.com"
        ]
    );
    let node = |id: &str| graph.nodes.iter().find(|n| n.id == id).expect(id);
    assert_eq!(
        node("world: api.example.com").domain.as_deref(),
        Some("api.example.com")
    );
    assert_eq!(node("world: api.example.com").namespace, "");
    assert_eq!(node("world").domain, None);
    let edge = |src: &str, dst: &str| {
        graph
            .edges
            .iter()
            .find(|e| e.src == src && e.dst == dst)
            .map(|e| (e.allowed, e.denied))
    };
    assert_eq!(
        edge("shop/Deployment/api", "world: api.example.com"),
        Some((0, 2)),
        "both attempts, each once"
    );
    assert_eq!(
        edge("shop/Deployment/api", "world: *.example.com"),
        Some((1, 0))
    );
    assert_eq!(edge("shop/Deployment/api", "world"), Some((1, 0)));
    assert_eq!(
        edge("world: api.example.com", "shop/Deployment/api"),
        Some((0, 1))
    );
    // Counted once per connection: five records, five connections.
    assert_eq!(g.records(), 5);
    // The JSON written straight from the aggregate is the graph's, domains included; the wire
    // form carries the domain too, and reads back.
    assert_eq!(
        g.to_json(),
        serde_json::to_vec(&graph).expect("json"),
        "to_json drifted from the graph"
    );
    let wire = g.to_proto("");
    let back = Graph::from(wire);
    assert_eq!(
        back.nodes
            .iter()
            .map(|n| (n.id.as_str(), n.domain.as_deref()))
            .collect::<Vec<_>>(),
        graph
            .nodes
            .iter()
            .map(|n| (n.id.as_str(), n.domain.as_deref()))
            .collect::<Vec<_>>()
    );
    // The namespace's graph keeps the named world it talks to.
    assert!(
        g.graph_of_namespace("shop")
            .nodes
            .iter()
            .any(|n| n.id == "world: api.example.com")
    );
}

/// Past the cap, further names are drawn at plain `world`: a made-up name per record cannot
/// grow the graph's workloads without bound.
#[test]
fn named_world_nodes_stop_at_the_cap() {
    let dir = Directory::default();
    let mut g = ServiceGraph::default();
    for i in 0..MAX_NAMED_WORLDS + 3 {
        g.add(
            &dir,
            &FlowRecord {
                peer_names: vec![name(&format!("h{i}.example.com"))],
                ..rec(
                    "endpoint#1",
                    "egress",
                    "10.0.0.9",
                    "203.0.113.1",
                    "denied",
                    rule("x"),
                )
            },
        );
    }
    let named = g
        .graph()
        .nodes
        .iter()
        .filter(|n| n.domain.is_some())
        .count();
    assert_eq!(named, MAX_NAMED_WORLDS);
    // A name already held keeps its node.
    g.add(
        &dir,
        &FlowRecord {
            peer_names: vec![name("h0.example.com")],
            ..rec(
                "endpoint#1",
                "egress",
                "10.0.0.9",
                "203.0.113.1",
                "denied",
                rule("x"),
            )
        },
    );
    assert_eq!(
        g.graph()
            .edges
            .iter()
            .filter(|e| e.dst == "world: h0.example.com")
            .map(|e| e.denied)
            .sum::<u64>(),
        2
    );
}

/// `--peer-name`: the name itself, a wildcard of the record that covers it, or for a wildcard
/// the exact names it covers; quarantine actions and flows without names never match.
#[test]
fn the_peer_name_filter_matches_names_and_covering_wildcards() {
    let dir = Directory::default();
    let flow = |names: &[&str]| {
        FlowEntry::Flow(FlowRecord {
            peer_names: names.iter().map(|n| name(n)).collect(),
            ..rec(
                "shop/web-0",
                "egress",
                "10.0.0.1",
                "203.0.113.7",
                "denied",
                rule("x"),
            )
        })
    };
    let by = |wanted: &str| FlowFilter {
        peer_name: Some(name(wanted)),
        ..FlowFilter::default()
    };
    let cases = [
        (&["api.example.com"][..], "api.example.com", true),
        (&["api.example.com"], "www.example.com", false),
        (&["*.example.com"], "api.example.com", true),
        (&["*.example.com"], "example.com", false),
        (&["api.example.com"], "*.example.com", true),
        (&["*.example.com"], "*.example.com", true),
        (&["*.a.example.com"], "*.example.com", false),
        (&[], "api.example.com", false),
    ];
    for (names, wanted, want) in cases {
        assert_eq!(
            by(wanted).matches(&dir, &flow(names)),
            want,
            "{names:?} {wanted}"
        );
    }
    assert!(!by("api.example.com").matches(&dir, &quarantine_event(QuarantineAction::Quarantine)));
    // On the wire: the text, and a text that is no pattern matches nothing.
    let f = by("*.example.com");
    assert_eq!(FlowFilter::from_proto(Some(&f.to_proto())), f);
    let garbled = FlowFilter::from_proto(Some(&pb::FlowFilter {
        peer_name: "not a name".into(),
        ..Default::default()
    }));
    assert!(!garbled.matches(&dir, &flow(&["*.example.com"])));
}

/// A pod as the engine takes it: `ns/name` with one address, owned by `workload`, on `node`
/// (a peer cluster's pods are on none).
fn engine_pod(
    ns: &str,
    name: &str,
    workload: Option<&str>,
    ip: &str,
    node: Option<&str>,
) -> crate::Pod {
    crate::Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: [("app".to_string(), name.to_string())].into(),
        service_account: "default".into(),
        node_name: node.map(str::to_string),
        ips: vec![ip.parse().expect("ip")],
        synthetic_ips: false,
        ports: Vec::new(),
        workload: workload.map(str::to_string),
        host_network: false,
    }
}

fn namespace(name: &str) -> crate::Change {
    crate::Change::UpsertNamespace(crate::model::Namespace {
        name: name.into(),
        labels: Default::default(),
    })
}

/// A hub with the local shop/web-0 (10.0.0.1, on node-1) and the peer cluster west's
/// west/shop/web-0 (10.9.0.1, Deployment/web).
fn hub_with_a_peer_cluster() -> Arc<Hub> {
    let hub = Arc::new(Hub::new(crate::PolicyEngine::empty(
        crate::EngineConfig::default(),
    )));
    hub.apply(
        vec![
            namespace("shop"),
            crate::Change::UpsertPod(engine_pod(
                "shop",
                "web-0",
                Some("Deployment/web"),
                "10.0.0.1",
                Some("node-1"),
            )),
            namespace("west/shop"),
            crate::Change::UpsertPod(engine_pod(
                "west/shop",
                "web-0",
                Some("Deployment/web"),
                "10.9.0.1",
                None,
            )),
        ],
        false,
    )
    .expect("apply");
    hub
}

fn hub_pipeline(hub: Arc<Hub>) -> FlowPipeline {
    FlowPipeline::new(
        Arc::new(Mutex::new(FlowStore::new(100))),
        Arc::new(Mutex::new(ServiceGraph::default())),
        hub,
    )
}

/// The local web egressing to `dst`.
fn egress_to(dst: &str) -> pb::FlowRecord {
    (&rec(
        "shop/web-0",
        "egress",
        "10.0.0.1",
        dst,
        "allowed",
        rule("allow-web"),
    ))
        .into()
}

fn graph_json(p: &FlowPipeline) -> serde_json::Value {
    serde_json::from_slice(&p.graph().lock().expect("graph").to_json()).expect("graph json")
}

/// A flow to a peer cluster's pod names that pod (`west/shop/web-0`) and draws its workload as
/// `west/shop/Deployment/web`, with its cluster in the graph's JSON and proto; the local
/// workload has no cluster. Flows, the graph's JSON and its proto agree.
#[test]
fn flows_to_a_peer_clusters_pod_name_it_by_cluster() {
    let p = hub_pipeline(hub_with_a_peer_cluster());
    assert_eq!(
        p.ingest("node-1", vec![egress_to("10.9.0.1")], 0)
            .expect("ingest"),
        1
    );

    let dir = p.directory();
    let peer = dir.pod_of("10.9.0.1".parse().expect("ip")).expect("named");
    assert_eq!(peer.to_string(), "west/shop/web-0");
    let mut r = rec(
        "shop/web-0",
        "egress",
        "10.0.0.1",
        "10.9.0.1",
        "allowed",
        rule("a"),
    );
    dir.name_peer(&mut r);
    assert_eq!(
        r.peer.map(|p| p.to_string()).as_deref(),
        Some("west/shop/web-0")
    );

    let g = graph_json(&p);
    let nodes = g["nodes"].as_array().expect("nodes");
    let remote = nodes
        .iter()
        .find(|n| n["id"] == "west/shop/Deployment/web")
        .unwrap_or_else(|| panic!("no remote node in {g}"));
    assert_eq!(remote["namespace"], "west/shop");
    assert_eq!(remote["workload"], "Deployment/web");
    assert_eq!(remote["cluster"], "west");
    let local = nodes
        .iter()
        .find(|n| n["id"] == "shop/Deployment/web")
        .unwrap_or_else(|| panic!("no local node in {g}"));
    assert!(local.get("cluster").is_none(), "{local}");
    assert!(!nodes.iter().any(|n| n["id"] == "world"), "{g}");
    assert_eq!(g["edges"][0]["src"], "shop/Deployment/web");
    assert_eq!(g["edges"][0]["dst"], "west/shop/Deployment/web");

    let graph = p.graph().lock().expect("graph");
    let typed = graph.graph();
    let cluster_of = |id: &str| {
        typed
            .nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| n.cluster.as_ref().map(ClusterName::as_str))
    };
    assert_eq!(cluster_of("west/shop/Deployment/web"), Some(Some("west")));
    assert_eq!(cluster_of("shop/Deployment/web"), Some(None));
    let proto = graph.to_proto("");
    let remote = proto
        .nodes
        .iter()
        .find(|n| n.id == "west/shop/Deployment/web")
        .expect("remote node in the proto");
    assert_eq!(remote.cluster, "west");
    let back = Graph::from(proto.clone());
    assert_eq!(
        back.nodes
            .iter()
            .find(|n| n.id == remote.id)
            .and_then(|n| n.cluster.clone()),
        Some("west".parse().expect("cluster"))
    );
    assert!(
        proto
            .nodes
            .iter()
            .filter(|n| n.id != remote.id)
            .all(|n| n.cluster.is_empty())
    );
}

/// A peer cluster's pod that leaves the inventory (its cluster stopped exporting it) names
/// nobody: later flows to its address go to the world. Flows to local pods are unaffected.
#[test]
fn a_remote_pod_that_leaves_makes_its_address_the_worlds_again() {
    let hub = hub_with_a_peer_cluster();
    let p = hub_pipeline(hub.clone());
    p.ingest("node-1", vec![egress_to("10.9.0.1")], 0)
        .expect("ingest");
    let remote = hub.remote_generation();
    let rules = hub.generation();
    hub.apply(
        vec![crate::Change::DeletePod(PodKey {
            namespace: "west/shop".into(),
            name: "web-0".into(),
        })],
        false,
    )
    .expect("delete");
    assert!(
        hub.remote_generation() > remote,
        "a remote change moves its generation"
    );
    assert!(
        p.directory()
            .pod_of("10.9.0.1".parse().expect("ip"))
            .is_none()
    );
    // A change of local pods alone does not move it.
    let remote = hub.remote_generation();
    hub.apply(
        vec![crate::Change::UpsertPod(engine_pod(
            "shop",
            "db-0",
            Some("StatefulSet/db"),
            "10.0.0.2",
            Some("node-1"),
        ))],
        false,
    )
    .expect("add db");
    assert_eq!(hub.remote_generation(), remote);
    assert!(hub.generation() > rules);

    let mut later = egress_to("10.9.0.1");
    later.time_unix_nanos = 9;
    // Between local pods, an allowed connection counts at the destination's ingress.
    let mut local: pb::FlowRecord = (&rec(
        "shop/db-0",
        "ingress",
        "10.0.0.1",
        "10.0.0.2",
        "allowed",
        rule("allow-db"),
    ))
        .into();
    local.time_unix_nanos = 9;
    p.ingest("node-1", vec![later, local], 0).expect("ingest");
    let g = graph_json(&p);
    let edges: Vec<(String, String)> = g["edges"]
        .as_array()
        .expect("edges")
        .iter()
        .map(|e| (e["src"].to_string(), e["dst"].to_string()))
        .collect();
    for want in [
        "\"west/shop/Deployment/web\"",
        "\"world\"",
        "\"shop/StatefulSet/db\"",
    ] {
        assert!(
            edges
                .iter()
                .any(|(s, d)| s == "\"shop/Deployment/web\"" && d == want),
            "no edge to {want} in {edges:?}"
        );
    }
}

/// Directory rules for peer clusters' pods: a local endpoint keeps an address a remote pod
/// also claims; a remote pod with made-up or host-network addresses names nobody.
#[test]
fn local_endpoints_keep_their_addresses_over_remote_pods() {
    let local = [ep(1, "shop", "web-0", Some("Deployment/web"), "10.0.0.1")];
    let clash = engine_pod("west/shop", "api-0", None, "10.0.0.1", None);
    let mut synthetic = engine_pod("west/shop", "made-up", None, "10.9.0.2", None);
    synthetic.synthetic_ips = true;
    let mut host = engine_pod("west/kube-system", "proxy", None, "10.9.0.3", None);
    host.host_network = true;
    let fine = engine_pod("west/shop", "api-1", None, "10.9.0.4", None);
    let remote = [clash, synthetic, host, fine];
    let d = Directory::from_inventory(&local, &remote);
    let pod = |ip: &str| d.pod_of(ip.parse().expect("ip")).map(ToString::to_string);
    assert_eq!(pod("10.0.0.1").as_deref(), Some("shop/web-0"));
    assert_eq!(pod("10.9.0.2"), None);
    assert_eq!(pod("10.9.0.3"), None);
    assert_eq!(pod("10.9.0.4").as_deref(), Some("west/shop/api-1"));
    let w = Workload {
        namespace: "west/shop".into(),
        name: "Pod/api-1".into(),
    };
    assert_eq!(w.cluster().map(String::from).as_deref(), Some("west"));
    assert_eq!(w.id(), "west/shop/Pod/api-1");
    assert_eq!(Workload::world().cluster(), None);
}

/// A peer cluster's pod is a peer the contract holds (the controller names it in what it
/// stores and serves, and reads it back), but no agent may claim one: agents name only their
/// own node's pods. A qualified namespace whose cluster is not a cluster name is refused.
#[test]
fn remote_peers_are_read_back_but_never_taken_from_agents() {
    let mut named = rec(
        "shop/web-0",
        "egress",
        "10.0.0.1",
        "10.9.0.1",
        "allowed",
        rule("a"),
    );
    named.peer = Some("west/shop/web-0".parse().expect("a remote pod"));
    let wire: pb::FlowRecord = (&named).into();
    assert_eq!(
        FlowRecord::try_from(wire.clone()).expect("read back"),
        named
    );
    assert_eq!(check_record(wire), Err(FlowRejection::Name));
    for bad in ["West/shop", "west/", "/shop", "west/sh op"] {
        let mut r = named.clone();
        r.peer = Some(PodKey {
            namespace: bad.into(),
            name: "web-0".into(),
        });
        let wire: pb::FlowRecord = (&r).into();
        assert!(FlowRecord::try_from(wire).is_err(), "{bad}");
    }
}
