//! The service graph: flow records from every agent folded into edges between workloads.
//!
//! Nodes are workloads (the pod's owner — Deployment, StatefulSet, … — else the pod) grouped by
//! namespace, plus `world` (addresses of no pod) and `host`. An edge is (source workload,
//! destination workload, port, protocol) with counts by verdict, bytes, first and last seen, and
//! the rules that decided. A connection between two pods is reported by both enforcement points
//! (the source's egress and the destination's ingress); it is counted once: allowed at its last
//! enforcement point (the destination pod's ingress, else the source's egress), denied where it
//! was denied.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use bulkhead_proto::v1 as pb;
use serde::Serialize;

use crate::ruleset::RuleSet;

/// Where an address belongs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Workload {
    pub namespace: String,
    /// `Deployment/web`, `Pod/debug`, or `world` / `host`.
    pub name: String,
}

impl Workload {
    fn world() -> Workload {
        Workload {
            namespace: String::new(),
            name: "world".into(),
        }
    }

    pub fn id(&self) -> String {
        if self.namespace.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.namespace, self.name)
        }
    }
}

/// Addresses and pods of the cluster, from the rule sets of all nodes.
#[derive(Debug, Default, Clone)]
pub struct Directory {
    by_ip: HashMap<IpAddr, Workload>,
    by_pod: HashMap<String, Workload>,
    pod_by_ip: HashMap<IpAddr, String>,
}

impl Directory {
    pub fn from_rulesets<'a>(rulesets: impl IntoIterator<Item = &'a RuleSet>) -> Directory {
        let mut d = Directory::default();
        for rs in rulesets {
            for e in &rs.endpoints {
                let w = Workload {
                    namespace: e.namespace.clone(),
                    name: e
                        .workload
                        .clone()
                        .unwrap_or_else(|| format!("Pod/{}", e.pod)),
                };
                for ip in &e.ips {
                    d.by_ip.insert(*ip, w.clone());
                    d.pod_by_ip.insert(*ip, e.name());
                }
                d.by_pod.insert(e.name(), w);
            }
        }
        d
    }

    /// `namespace/pod` of an address, when a pod has it.
    pub fn pod_of(&self, ip: &str) -> Option<&str> {
        ip.parse::<IpAddr>()
            .ok()
            .and_then(|ip| self.pod_by_ip.get(&ip))
            .map(String::as_str)
    }

    fn of_ip(&self, ip: &str) -> Option<&Workload> {
        ip.parse::<IpAddr>().ok().and_then(|ip| self.by_ip.get(&ip))
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Edge {
    pub src: String,
    pub dst: String,
    pub port: u32,
    pub protocol: u32,
    pub allowed: u64,
    pub denied: u64,
    pub audit_would_deny: u64,
    pub bytes: u64,
    pub first_seen_unix_nanos: u64,
    pub last_seen_unix_nanos: u64,
    /// Rules that decided, with how often.
    pub rules: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GraphNode {
    pub id: String,
    pub namespace: String,
    pub workload: String,
}

/// What [`ServiceGraph::add`] counted for one record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counted {
    /// The record was folded in (by verdict).
    pub record: bool,
    /// The connection was counted for this (source namespace, destination namespace, verdict).
    pub pair: Option<(String, String, String)>,
    /// It was a drop, counted for the record's rule.
    pub drop: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Graph {
    pub nodes: Vec<GraphNode>,
    pub edges: Vec<Edge>,
}

/// The aggregated graph and the counters behind the controller's flow metrics.
#[derive(Debug, Default)]
pub struct ServiceGraph {
    edges: BTreeMap<(Workload, Workload, u32, u32), Edge>,
    /// Records folded in, by verdict.
    pub by_verdict: BTreeMap<String, u64>,
    /// Counted connections by (source namespace, destination namespace, verdict).
    pub by_namespace_pair: BTreeMap<(String, String, String), u64>,
    /// Denials by deciding rule.
    pub drops_by_rule: BTreeMap<String, u64>,
}

impl ServiceGraph {
    /// Folds one record in and says what it counted. Quarantine/release audit records (no
    /// addresses) are skipped.
    pub fn add(&mut self, dir: &Directory, r: &pb::FlowRecord) -> Counted {
        let mut counted = Counted::default();
        if r.src.is_empty() || r.dst.is_empty() {
            return counted;
        }
        counted.record = true;
        *self.by_verdict.entry(r.verdict.clone()).or_default() += 1;
        let here = dir.by_pod.get(&r.endpoint).cloned();
        let (src, dst) = if r.direction == "ingress" {
            (dir.of_ip(&r.src).cloned(), here.clone())
        } else {
            (here.clone(), dir.of_ip(&r.dst).cloned())
        };
        let allowed = r.verdict == "allowed";
        // Count an allowed connection once, at its last enforcement point: the destination
        // pod's ingress, or the source's egress when the destination is no pod. (Its source may
        // allow what its destination then denies; the denial is counted where it happens.)
        if allowed && r.direction == "egress" && dst.is_some() {
            return counted;
        }
        let src = src.unwrap_or_else(Workload::world);
        let dst = dst.unwrap_or_else(Workload::world);
        let key = (src.clone(), dst.clone(), r.dst_port, r.protocol);
        let e = self.edges.entry(key).or_insert_with(|| Edge {
            src: src.id(),
            dst: dst.id(),
            port: r.dst_port,
            protocol: r.protocol,
            first_seen_unix_nanos: r.time_unix_nanos,
            ..Default::default()
        });
        match r.verdict.as_str() {
            "allowed" => e.allowed += 1,
            "audit-would-deny" => e.audit_would_deny += 1,
            _ => e.denied += 1,
        }
        e.bytes += r.bytes;
        e.first_seen_unix_nanos = e.first_seen_unix_nanos.min(r.time_unix_nanos);
        e.last_seen_unix_nanos = e.last_seen_unix_nanos.max(r.time_unix_nanos);
        *e.rules.entry(r.rule.clone()).or_default() += 1;
        let pair = (
            src.namespace.clone(),
            dst.namespace.clone(),
            r.verdict.clone(),
        );
        *self.by_namespace_pair.entry(pair.clone()).or_default() += 1;
        counted.pair = Some(pair);
        if !allowed && r.verdict != "audit-would-deny" {
            *self.drops_by_rule.entry(r.rule.clone()).or_default() += 1;
            counted.drop = true;
        }
        counted
    }

    pub fn graph(&self) -> Graph {
        let mut nodes: BTreeSet<(String, String, String)> = BTreeSet::new();
        for (src, dst, _, _) in self.edges.keys() {
            for w in [src, dst] {
                nodes.insert((w.id(), w.namespace.clone(), w.name.clone()));
            }
        }
        Graph {
            nodes: nodes
                .into_iter()
                .map(|(id, namespace, workload)| GraphNode {
                    id,
                    namespace,
                    workload,
                })
                .collect(),
            edges: self.edges.values().cloned().collect(),
        }
    }

    pub fn len(&self) -> (usize, usize) {
        let g = self.graph();
        (g.nodes.len(), g.edges.len())
    }
}

fn proto_name(p: u32) -> String {
    match p {
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        1 => "ICMP".into(),
        58 => "ICMPv6".into(),
        n => format!("proto {n}"),
    }
}

impl Graph {
    /// Graphviz: namespaces as clusters, edges red when anything was denied.
    pub fn to_dot(&self) -> String {
        let mut out = String::from("digraph bulkhead {\n  rankdir=LR;\n  node [shape=box];\n");
        let mut by_ns: BTreeMap<&str, Vec<&GraphNode>> = BTreeMap::new();
        for n in &self.nodes {
            by_ns.entry(n.namespace.as_str()).or_default().push(n);
        }
        for (i, (ns, nodes)) in by_ns.iter().enumerate() {
            if ns.is_empty() {
                for n in nodes {
                    out += &format!("  \"{}\" [shape=ellipse];\n", n.id);
                }
                continue;
            }
            out += &format!("  subgraph cluster_{i} {{\n    label=\"{ns}\";\n");
            for n in nodes {
                out += &format!("    \"{}\" [label=\"{}\"];\n", n.id, n.workload);
            }
            out += "  }\n";
        }
        for e in &self.edges {
            let color = if e.denied > 0 {
                "red"
            } else if e.audit_would_deny > 0 {
                "orange"
            } else {
                "darkgreen"
            };
            out += &format!(
                "  \"{}\" -> \"{}\" [label=\"{}/{} ✓{} ✗{}\", color={color}];\n",
                e.src,
                e.dst,
                e.port,
                proto_name(e.protocol),
                e.allowed,
                e.denied
            );
        }
        out += "}\n";
        out
    }
}

#[cfg(test)]
mod tests {
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
        assert_eq!(g.drops_by_rule.values().sum::<u64>(), 1);
        assert_eq!(graph.nodes.len(), 4);
        let dot = graph.to_dot();
        assert!(
            dot.contains("cluster_") && dot.contains("color=red"),
            "{dot}"
        );
    }
}
