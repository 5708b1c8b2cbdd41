//! The service graph and the flow pipeline, on records as agents send them.

use super::*;
use crate::ruleset::{Endpoint, RuleSet};

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

fn rec(
    endpoint: &str,
    direction: &str,
    src: &str,
    dst: &str,
    verdict: &str,
    rule: &str,
) -> pb::FlowRecord {
    pb::FlowRecord {
        endpoint: endpoint.into(),
        direction: direction.into(),
        src: src.into(),
        dst: dst.into(),
        dst_port: 80,
        protocol: 6,
        verdict: verdict.into(),
        rule: rule.into(),
        time_unix_nanos: 5,
        bytes: 60,
        ..Default::default()
    }
}

/// Rule labels stop at the cap; denials by further rules are counted as "other".
#[test]
fn rule_labels_beyond_the_cap_are_counted_as_other() {
    let mut g = ServiceGraph::default();
    let dir = Directory::default();
    let extra = 500;
    for i in 0..MAX_RULE_LABELS + extra {
        let mut r = rec("ns/p", "ingress", "192.0.2.1", "192.0.2.2", "denied", "");
        r.rule = format!("rule {i}");
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
    let mut r = rec(
        "ns/p",
        "ingress",
        "192.0.2.1",
        "192.0.2.2",
        "denied",
        "rule 7",
    );
    r.rule = "rule 7".into();
    g.add(&dir, &r);
    assert!(
        g.drops_by_rule()
            .any(|(name, n)| name == "rule 7" && n == 2)
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
    assert_eq!(count("rule 7"), Some(2));
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
    let at = |mut r: pb::FlowRecord, t: u64| {
        r.time_unix_nanos = t;
        r
    };
    let old = rec(
        "shop/api-0",
        "ingress",
        "10.0.0.3",
        "10.0.0.2",
        "denied",
        "d",
    );
    // A pod-to-pod connection counts where it arrives.
    let new = rec(
        "shop/api-0",
        "ingress",
        "10.0.0.1",
        "10.0.0.2",
        "allowed",
        "a",
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
            "default allow",
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
            "NetworkPolicy shop/api ingress[0]",
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
            "NetworkPolicy shop/api ingress default-deny",
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
            "default allow",
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
