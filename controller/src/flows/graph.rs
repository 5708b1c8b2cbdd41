//! The service graph ([`ServiceGraph`]): flow records folded into edges between workloads,
//! counted once per connection, with the rules that decided and what staged policies would deny;
//! and its wire and JSON forms ([`Graph`]).

use std::collections::BTreeMap;

use bulkhead_proto::v1 as pb;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use super::{
    Directory, MAX_EDGES, MAX_NAMED_WORLDS, MAX_RULE_LABELS, MAX_RULES_PER_EDGE, OTHER_RULES,
    Workload,
};
use crate::ruleset::{ClusterName, Direction, EndpointRef, FlowRecord, FlowRule, FlowVerdict};

/// The flows allowed now that one staged policy would deny, and on which edges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedDenies {
    /// `Kind namespace/name` (`Kind name` for a cluster-scoped one).
    pub policy: String,
    pub flows: u64,
    /// The most denied first (at most [`MAX_STAGED_EDGES`]).
    pub edges: Vec<StagedEdge>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedEdge {
    pub src: String,
    pub dst: String,
    pub port: u32,
    pub protocol: u32,
    pub flows: u64,
}

/// Edges a staged policy's would-deny count names; further flows are counted, not placed.
pub const MAX_STAGED_EDGES: usize = 1000;

#[derive(Debug, Default)]
struct StagedCounts {
    flows: u64,
    edges: FxHashMap<EdgeKey, u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GraphNode {
    pub id: String,
    pub namespace: String,
    pub workload: String,
    /// For `world: NAME`, the DNS name (or `*.suffix` pattern) its flows' endpoints had
    /// learned the peer's address for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// For a peer cluster's workload (namespace `cluster/namespace`), that cluster; `None`
    /// for local workloads, the world and the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterName>,
}

/// What [`ServiceGraph::add`] counted for one record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counted {
    /// The record was folded in (by verdict).
    pub record: bool,
    /// The connection was counted on an edge (and for its namespace pair).
    pub connection: bool,
    /// It was a drop, counted for the record's rule.
    pub drop: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Graph {
    pub nodes: Vec<GraphNode>,
    pub edges: Vec<Edge>,
}

/// Rules numbered in order of first sight, by [`FlowRule::label_key`] (one number per text),
/// each with its text (the label). Number [`RULE_OTHER`] is [`OTHER_RULES`].
#[derive(Debug)]
struct RuleLabels {
    names: Vec<String>,
    numbers: FxHashMap<FlowRule, u32>,
}

impl Default for RuleLabels {
    fn default() -> Self {
        RuleLabels {
            names: vec![OTHER_RULES.to_string()],
            numbers: FxHashMap::default(),
        }
    }
}

impl RuleLabels {
    /// The rule's number; once `cap` labels are held a new rule gets [`RULE_OTHER`].
    fn number_within(&mut self, rule: &FlowRule, cap: usize) -> u32 {
        let key = rule.label_key();
        if let Some(&n) = self.numbers.get(&*key) {
            return n;
        }
        if self.names.len() >= cap {
            return RULE_OTHER;
        }
        let n = self.names.len() as u32;
        self.names.push(key.to_string());
        self.numbers.insert(key.into_owned(), n);
        n
    }

    fn name(&self, n: u32) -> &str {
        &self.names[n as usize]
    }
}

/// Strings numbered in order of first sight.
#[derive(Debug, Default)]
struct Interner {
    names: Vec<String>,
    numbers: FxHashMap<String, u32>,
}

impl Interner {
    fn number(&mut self, s: &str) -> u32 {
        if let Some(&n) = self.numbers.get(s) {
            return n;
        }
        let n = self.names.len() as u32;
        self.names.push(s.to_string());
        self.numbers.insert(s.to_string(), n);
        n
    }

    fn name(&self, n: u32) -> &str {
        &self.names[n as usize]
    }
}

/// The rule number of [`OTHER_RULES`].
const RULE_OTHER: u32 = 0;
/// The workload number of `world`.
const WORLD: u32 = 0;
/// A directory workload not numbered in the graph yet.
const UNNUMBERED: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct EdgeKey {
    src: u32,
    dst: u32,
    port: u32,
    protocol: u32,
}

#[derive(Debug, Default)]
struct EdgeCounts {
    allowed: u64,
    denied: u64,
    audit_would_deny: u64,
    bytes: u64,
    first_seen_unix_nanos: u64,
    last_seen_unix_nanos: u64,
    /// (rule number, count); an edge is decided by a handful of rules.
    rules: Vec<(u32, u64)>,
}

/// The aggregated graph and the counters behind the controller's flow metrics.
///
/// Workloads, namespaces and rules are numbered once, so folding a record in costs two hash
/// lookups in the directory, one for the edge and one for the rule, and allocates nothing
/// unless it names something new.
#[derive(Debug)]
pub struct ServiceGraph {
    workloads: Vec<Workload>,
    /// Namespace number of each workload.
    workload_namespace: Vec<u32>,
    /// Whether a workload is an end of some edge (a node of the graph).
    in_graph: Vec<bool>,
    nodes: usize,
    workload_numbers: FxHashMap<Workload, u32>,
    namespaces: Interner,
    rules: RuleLabels,
    edges: FxHashMap<EdgeKey, EdgeCounts>,
    /// The directory whose workload numbers `translation` maps to ours.
    directory_generation: u64,
    translation: Vec<u32>,
    /// Records folded in, by verdict (in [`FlowVerdict::ALL`] order).
    by_verdict: [u64; 3],
    /// Counted connections by (source namespace, destination namespace, verdict).
    by_namespace_pair: FxHashMap<(u32, u32, FlowVerdict), u64>,
    /// Denials by rule number.
    drops_by_rule: Vec<u64>,
    /// Flows allowed now that the staged view denies, by the staged policy that would deny
    /// them (`Kind namespace/name`; at most [`MAX_RULE_LABELS`], further ones under
    /// [`OTHER_RULES`]).
    staged_denies: FxHashMap<String, StagedCounts>,
    /// Named world workloads numbered (at most [`MAX_NAMED_WORLDS`]).
    named_worlds: usize,
    /// Records that would have made an edge beyond [`MAX_EDGES`].
    pub edges_refused: u64,
}

impl Default for ServiceGraph {
    fn default() -> Self {
        let mut g = ServiceGraph {
            workloads: Vec::new(),
            workload_namespace: Vec::new(),
            in_graph: Vec::new(),
            nodes: 0,
            workload_numbers: FxHashMap::default(),
            namespaces: Interner::default(),
            rules: RuleLabels::default(),
            edges: FxHashMap::default(),
            directory_generation: 0,
            translation: Vec::new(),
            by_verdict: [0; 3],
            by_namespace_pair: FxHashMap::default(),
            drops_by_rule: Vec::new(),
            staged_denies: FxHashMap::default(),
            named_worlds: 0,
            edges_refused: 0,
        };
        let world = g.number(&Workload::world());
        debug_assert_eq!(world, WORLD);
        g
    }
}

fn bump(counts: &mut Vec<u64>, n: u32) {
    let i = n as usize;
    if i >= counts.len() {
        counts.resize(i + 1, 0);
    }
    counts[i] += 1;
}

impl ServiceGraph {
    fn number(&mut self, w: &Workload) -> u32 {
        if let Some(&n) = self.workload_numbers.get(w) {
            return n;
        }
        let n = self.workloads.len() as u32;
        let ns = self.namespaces.number(&w.namespace);
        self.workloads.push(w.clone());
        self.workload_namespace.push(ns);
        self.in_graph.push(false);
        self.workload_numbers.insert(w.clone(), n);
        n
    }

    /// Our number for the directory's workload `d`.
    fn number_of_directory_workload(&mut self, dir: &Directory, d: u32) -> u32 {
        if self.directory_generation != dir.generation {
            self.directory_generation = dir.generation;
            self.translation.clear();
            self.translation.resize(dir.workloads.len(), UNNUMBERED);
        }
        let slot = self.translation[d as usize];
        if slot != UNNUMBERED {
            return slot;
        }
        let n = self.number(&dir.workloads[d as usize]);
        self.translation[d as usize] = n;
        n
    }

    /// The workload of a peer outside the cluster: `world: NAME` for the first of its names
    /// (see [`super::world_id`]), plain `world` without names or once [`MAX_NAMED_WORLDS`]
    /// are held.
    fn world_of(&mut self, r: &FlowRecord) -> u32 {
        let Some(name) = r.peer_names.first() else {
            return WORLD;
        };
        let w = Workload::named_world(name);
        if let Some(&n) = self.workload_numbers.get(&w) {
            return n;
        }
        if self.named_worlds >= MAX_NAMED_WORLDS {
            return WORLD;
        }
        self.named_worlds += 1;
        self.number(&w)
    }

    /// Folds one record in and says what it counted.
    pub fn add(&mut self, dir: &Directory, r: &FlowRecord) -> Counted {
        let mut counted = Counted {
            record: true,
            ..Counted::default()
        };
        let verdict = r.verdict;
        self.by_verdict[verdict as usize] += 1;
        let ingress = r.direction == Direction::Ingress;
        let here = match &r.endpoint {
            EndpointRef::Pod(p) => dir.by_pod.get(p).copied(),
            EndpointRef::Unnamed(_) => None,
        };
        let peer = dir.of_ip(r.peer_address());
        let (src, dst) = if ingress { (peer, here) } else { (here, peer) };
        let allowed = verdict == FlowVerdict::Allowed;
        // Count an allowed connection once, at its last enforcement point here: the destination
        // pod's ingress, or the source's egress when the destination is no pod or a peer
        // cluster's (whose ingress reports to its own controller). (Its source may allow what
        // its destination then denies; the denial is counted where it happens.)
        if allowed && !ingress && dst.is_some_and(|d| !dir.is_remote(d)) {
            return counted;
        }
        // The peer outside the cluster is named by what its endpoint learned from DNS; the
        // reporting end is a pod (or an endpoint the agent could not name: plain world).
        let peer_world = if peer.is_none() {
            self.world_of(r)
        } else {
            WORLD
        };
        let (src_world, dst_world) = if ingress {
            (peer_world, WORLD)
        } else {
            (WORLD, peer_world)
        };
        let src = src.map_or(src_world, |d| self.number_of_directory_workload(dir, d));
        let dst = dst.map_or(dst_world, |d| self.number_of_directory_workload(dir, d));
        let key = EdgeKey {
            src,
            dst,
            port: r.dst_port as u32,
            protocol: r.protocol as u32,
        };
        if verdict != FlowVerdict::Denied && r.staged_verdict() == FlowVerdict::Denied {
            self.count_staged_deny(r, key);
        }
        // The first label is OTHER_RULES itself, hence the one extra.
        let rule = self.rules.number_within(&r.rule, MAX_RULE_LABELS + 1);
        if self.edges.len() >= MAX_EDGES && !self.edges.contains_key(&key) {
            self.edges_refused += 1;
            return counted;
        }
        let e = self.edges.entry(key).or_insert_with(|| EdgeCounts {
            first_seen_unix_nanos: r.time_unix_nanos,
            ..Default::default()
        });
        match verdict {
            FlowVerdict::Allowed => e.allowed += 1,
            FlowVerdict::AuditWouldDeny => e.audit_would_deny += 1,
            FlowVerdict::Denied => e.denied += 1,
        }
        e.bytes += r.bytes;
        e.first_seen_unix_nanos = e.first_seen_unix_nanos.min(r.time_unix_nanos);
        e.last_seen_unix_nanos = e.last_seen_unix_nanos.max(r.time_unix_nanos);
        // An edge names its first rules; further ones are counted together, so records that
        // vary only their rule cannot grow one edge without bound.
        let slot = match e.rules.iter().position(|(n, _)| *n == rule) {
            Some(i) => Some(i),
            None if e.rules.len() >= MAX_RULES_PER_EDGE => {
                e.rules.iter().position(|(n, _)| *n == RULE_OTHER)
            }
            None => None,
        };
        match slot {
            Some(i) => e.rules[i].1 += 1,
            None if e.rules.len() >= MAX_RULES_PER_EDGE => e.rules.push((RULE_OTHER, 1)),
            None => e.rules.push((rule, 1)),
        }
        for w in [src, dst] {
            if !self.in_graph[w as usize] {
                self.in_graph[w as usize] = true;
                self.nodes += 1;
            }
        }
        let pair = (
            self.workload_namespace[src as usize],
            self.workload_namespace[dst as usize],
            verdict,
        );
        *self.by_namespace_pair.entry(pair).or_default() += 1;
        counted.connection = true;
        if verdict == FlowVerdict::Denied {
            bump(&mut self.drops_by_rule, rule);
            counted.drop = true;
        }
        counted
    }

    fn count_staged_deny(&mut self, r: &FlowRecord, key: EdgeKey) {
        let rule = r.staged.as_ref().map_or(&r.rule, |s| &s.rule);
        let policy = match rule {
            FlowRule::Rule(rule) if rule.namespace.is_empty() => {
                format!("{} {}", rule.kind, rule.name)
            }
            FlowRule::Rule(rule) => format!("{} {}/{}", rule.kind, rule.namespace, rule.name),
            _ => OTHER_RULES.to_string(),
        };
        let policy = if self.staged_denies.contains_key(&policy)
            || self.staged_denies.len() < MAX_RULE_LABELS
        {
            policy
        } else {
            OTHER_RULES.to_string()
        };
        let c = self.staged_denies.entry(policy).or_default();
        c.flows += 1;
        let room = c.edges.len() < MAX_STAGED_EDGES;
        match c.edges.get_mut(&key) {
            Some(n) => *n += 1,
            None if room => {
                c.edges.insert(key, 1);
            }
            None => {}
        }
    }

    /// Flows allowed now that the staged policies would deny, by the staged policy.
    pub fn staged_denies(&self) -> impl Iterator<Item = (&str, u64)> {
        self.staged_denies
            .iter()
            .map(|(p, c)| (p.as_str(), c.flows))
    }

    /// The same with the edges, by policy name; each policy's edges the most denied first.
    pub fn staged(&self) -> Vec<StagedDenies> {
        let mut out: Vec<StagedDenies> = self
            .staged_denies
            .iter()
            .map(|(policy, c)| {
                let mut edges: Vec<StagedEdge> = c
                    .edges
                    .iter()
                    .map(|(k, n)| StagedEdge {
                        src: self.workloads[k.src as usize].id(),
                        dst: self.workloads[k.dst as usize].id(),
                        port: k.port,
                        protocol: k.protocol,
                        flows: *n,
                    })
                    .collect();
                edges.sort_by(|a, b| {
                    b.flows.cmp(&a.flows).then_with(|| {
                        (&a.src, &a.dst, a.port, a.protocol)
                            .cmp(&(&b.src, &b.dst, b.port, b.protocol))
                    })
                });
                StagedDenies {
                    policy: policy.clone(),
                    flows: c.flows,
                    edges,
                }
            })
            .collect();
        out.sort_by(|a, b| a.policy.cmp(&b.policy));
        out
    }

    /// Records folded in, by verdict.
    pub fn by_verdict(&self) -> impl Iterator<Item = (&'static str, u64)> {
        FlowVerdict::ALL
            .iter()
            .zip(self.by_verdict)
            .filter(|(_, c)| *c > 0)
            .map(|(v, c)| (v.as_str(), c))
    }

    /// Counted connections by (source namespace, destination namespace, verdict).
    pub fn by_namespace_pair(&self) -> impl Iterator<Item = ((&str, &str, &str), u64)> {
        self.by_namespace_pair.iter().map(|((s, d, v), c)| {
            (
                (
                    self.namespaces.name(*s),
                    self.namespaces.name(*d),
                    v.as_str(),
                ),
                *c,
            )
        })
    }

    /// Denials by the rule that denied them.
    pub fn drops_by_rule(&self) -> impl Iterator<Item = (&str, u64)> {
        self.drops_by_rule
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(r, c)| (self.rules.name(r as u32), *c))
    }

    /// Distinct rule labels held (at most [`MAX_RULE_LABELS`] and [`OTHER_RULES`]).
    pub fn rule_labels(&self) -> usize {
        self.rules.names.len()
    }

    /// Records folded in (all verdicts).
    pub fn records(&self) -> u64 {
        self.by_verdict.iter().sum()
    }

    /// The graph, nodes sorted by id and edges by (source, destination, port, protocol).
    pub fn graph(&self) -> Graph {
        self.graph_where(|_, _| true)
    }

    /// The edges from or to `namespace` and the nodes they join.
    pub fn graph_of_namespace(&self, namespace: &str) -> Graph {
        self.graph_where(|src, dst| src.namespace == namespace || dst.namespace == namespace)
    }

    /// Nodes sorted by id, and the edges that `keep` keeps sorted by (source, destination,
    /// port, protocol): what every rendering of the graph walks.
    fn layout(&self, keep: impl Fn(&Workload, &Workload) -> bool) -> Layout<'_> {
        let edges: Vec<(&EdgeKey, &EdgeCounts)> = self
            .edges
            .iter()
            .filter(|(k, _)| {
                keep(
                    &self.workloads[k.src as usize],
                    &self.workloads[k.dst as usize],
                )
            })
            .collect();
        let mut used = vec![false; self.workloads.len()];
        for (k, _) in &edges {
            used[k.src as usize] = true;
            used[k.dst as usize] = true;
        }
        let mut nodes: Vec<(String, u32)> = used
            .iter()
            .enumerate()
            .filter(|(_, u)| **u)
            .map(|(w, _)| (self.workloads[w].id(), w as u32))
            .collect();
        nodes.sort_unstable();
        // Rank of each workload in node order, so edges sort on integers.
        let mut rank = vec![0u32; self.workloads.len()];
        for (i, (_, w)) in nodes.iter().enumerate() {
            rank[*w as usize] = i as u32;
        }
        // Sort on one precomputed integer per edge.
        let key = |k: &EdgeKey| {
            (rank[k.src as usize] as u128) << 96
                | (rank[k.dst as usize] as u128) << 64
                | (k.port as u128) << 32
                | k.protocol as u128
        };
        let mut keyed: Vec<(u128, &EdgeKey, &EdgeCounts)> =
            edges.iter().map(|(k, c)| (key(k), *k, *c)).collect();
        keyed.sort_unstable_by_key(|e| e.0);
        let edges = keyed.into_iter().map(|(_, k, c)| (k, c)).collect();
        Layout {
            graph: self,
            nodes,
            rank,
            edges,
        }
    }

    fn graph_where(&self, keep: impl Fn(&Workload, &Workload) -> bool) -> Graph {
        let l = self.layout(keep);
        let edges = l
            .edges
            .iter()
            .map(|(k, c)| Edge {
                src: l.id(k.src).to_string(),
                dst: l.id(k.dst).to_string(),
                port: k.port,
                protocol: k.protocol,
                allowed: c.allowed,
                denied: c.denied,
                audit_would_deny: c.audit_would_deny,
                bytes: c.bytes,
                first_seen_unix_nanos: c.first_seen_unix_nanos,
                last_seen_unix_nanos: c.last_seen_unix_nanos,
                rules: c
                    .rules
                    .iter()
                    .map(|(r, n)| (self.rules.name(*r).to_string(), *n))
                    .collect(),
            })
            .collect();
        Graph {
            nodes: l
                .nodes
                .into_iter()
                .map(|(id, w)| {
                    let w = &self.workloads[w as usize];
                    GraphNode {
                        id,
                        namespace: w.namespace.clone(),
                        workload: w.name.clone(),
                        domain: w.domain().map(str::to_string),
                        cluster: w.cluster(),
                    }
                })
                .collect(),
            edges,
        }
    }

    /// The JSON of [`ServiceGraph::graph`] (`/api/graph`), byte for byte, written straight
    /// from the aggregate: no copy of the graph is made, and each id and rule is escaped once
    /// however many edges name it.
    pub fn to_json(&self) -> Vec<u8> {
        let l = self.layout(|_, _| true);
        let quoted = |s: &str| serde_json::to_vec(s).unwrap_or_else(|_| b"\"\"".to_vec());
        let ids: Vec<Vec<u8>> = l.nodes.iter().map(|(id, _)| quoted(id)).collect();
        let mut rules: Vec<Option<Vec<u8>>> = vec![None; self.rules.names.len()];
        let mut out = Vec::with_capacity(64 + l.nodes.len() * 96 + l.edges.len() * 320);
        out.extend_from_slice(b"{\"nodes\":[");
        for (i, (_, w)) in l.nodes.iter().enumerate() {
            let w = &self.workloads[*w as usize];
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"id\":");
            out.extend_from_slice(&ids[i]);
            out.extend_from_slice(b",\"namespace\":");
            out.extend_from_slice(&quoted(&w.namespace));
            out.extend_from_slice(b",\"workload\":");
            out.extend_from_slice(&quoted(&w.name));
            if let Some(domain) = w.domain() {
                out.extend_from_slice(b",\"domain\":");
                out.extend_from_slice(&quoted(domain));
            }
            if let Some(cluster) = w.cluster() {
                out.extend_from_slice(b",\"cluster\":");
                out.extend_from_slice(&quoted(cluster.as_str()));
            }
            out.push(b'}');
        }
        out.extend_from_slice(b"],\"edges\":[");
        let mut sorted_rules: Vec<(&str, u64, u32)> = Vec::new();
        for (i, (k, c)) in l.edges.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"src\":");
            out.extend_from_slice(&ids[l.rank[k.src as usize] as usize]);
            out.extend_from_slice(b",\"dst\":");
            out.extend_from_slice(&ids[l.rank[k.dst as usize] as usize]);
            for (name, n) in [
                (&b",\"port\":"[..], k.port as u64),
                (b",\"protocol\":", k.protocol as u64),
                (b",\"allowed\":", c.allowed),
                (b",\"denied\":", c.denied),
                (b",\"audit_would_deny\":", c.audit_would_deny),
                (b",\"bytes\":", c.bytes),
                (b",\"first_seen_unix_nanos\":", c.first_seen_unix_nanos),
                (b",\"last_seen_unix_nanos\":", c.last_seen_unix_nanos),
            ] {
                out.extend_from_slice(name);
                put_u64(&mut out, n);
            }
            out.extend_from_slice(b",\"rules\":{");
            sorted_rules.clear();
            sorted_rules.extend(c.rules.iter().map(|(r, n)| (self.rules.name(*r), *n, *r)));
            sorted_rules.sort_unstable();
            for (j, (name, n, r)) in sorted_rules.iter().enumerate() {
                if j > 0 {
                    out.push(b',');
                }
                let q = rules[*r as usize].get_or_insert_with(|| quoted(name));
                out.extend_from_slice(q);
                out.push(b':');
                put_u64(&mut out, *n);
            }
            out.extend_from_slice(b"}}");
        }
        out.extend_from_slice(b"]}");
        out
    }

    /// The graph as the admin API sends it (from or to `namespace` only, unless empty).
    pub fn to_proto(&self, namespace: &str) -> pb::GetGraphResponse {
        let l = self.layout(|src, dst| {
            namespace.is_empty() || src.namespace == namespace || dst.namespace == namespace
        });
        pb::GetGraphResponse {
            nodes: l
                .nodes
                .iter()
                .map(|(id, w)| {
                    let w = &self.workloads[*w as usize];
                    pb::GraphNode {
                        id: id.clone(),
                        namespace: w.namespace.clone(),
                        workload: w.name.clone(),
                        domain: w.domain().unwrap_or_default().to_string(),
                        cluster: w.cluster().map(String::from).unwrap_or_default(),
                    }
                })
                .collect(),
            edges: l
                .edges
                .iter()
                .map(|(k, c)| pb::GraphEdge {
                    src: l.id(k.src).to_string(),
                    dst: l.id(k.dst).to_string(),
                    port: k.port,
                    protocol: k.protocol,
                    allowed: c.allowed,
                    denied: c.denied,
                    audit_would_deny: c.audit_would_deny,
                    bytes: c.bytes,
                    first_seen_unix_nanos: c.first_seen_unix_nanos,
                    last_seen_unix_nanos: c.last_seen_unix_nanos,
                    rules: l
                        .sorted_rules(c)
                        .into_iter()
                        .map(|(rule, count)| pb::RuleCount {
                            rule: rule.to_string(),
                            count,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// (nodes, edges) of the graph.
    /// Forgets the edges not seen since `cutoff_unix_nanos`; a workload leaves the graph with its
    /// last edge. The counters behind the metrics keep counting. Returns how many edges went.
    pub fn expire(&mut self, cutoff_unix_nanos: u64) -> usize {
        let before = self.edges.len();
        self.edges
            .retain(|_, c| c.last_seen_unix_nanos >= cutoff_unix_nanos);
        let removed = before - self.edges.len();
        if removed > 0 {
            self.in_graph.iter_mut().for_each(|b| *b = false);
            for k in self.edges.keys() {
                self.in_graph[k.src as usize] = true;
                self.in_graph[k.dst as usize] = true;
            }
            self.nodes = self.in_graph.iter().filter(|b| **b).count();
        }
        removed
    }

    pub fn len(&self) -> (usize, usize) {
        (self.nodes, self.edges.len())
    }

    pub fn is_empty(&self) -> bool {
        self.edges.is_empty()
    }
}

/// A graph ready to render: nodes in id order, edges in (source, destination, port,
/// protocol) order, borrowed from the [`ServiceGraph`].
struct Layout<'a> {
    graph: &'a ServiceGraph,
    /// (id, workload number)
    nodes: Vec<(String, u32)>,
    /// Position in `nodes` by workload number.
    rank: Vec<u32>,
    edges: Vec<(&'a EdgeKey, &'a EdgeCounts)>,
}

impl Layout<'_> {
    fn id(&self, w: u32) -> &str {
        &self.nodes[self.rank[w as usize] as usize].0
    }

    /// An edge's rules by name, as [`Edge::rules`] orders them.
    fn sorted_rules(&self, c: &EdgeCounts) -> Vec<(&str, u64)> {
        let mut rules: Vec<(&str, u64)> = c
            .rules
            .iter()
            .map(|(r, n)| (self.graph.rules.name(*r), *n))
            .collect();
        rules.sort_unstable();
        rules
    }
}

/// Decimal digits of `n`, as JSON writes them.
fn put_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

impl From<pb::GetGraphResponse> for Graph {
    fn from(g: pb::GetGraphResponse) -> Self {
        Graph {
            nodes: g
                .nodes
                .into_iter()
                .map(|n| GraphNode {
                    id: n.id,
                    namespace: n.namespace,
                    workload: n.workload,
                    domain: (!n.domain.is_empty()).then_some(n.domain),
                    // A name that is not a cluster name is a malformed answer: drawn as local
                    // rather than refused, like the rest of the graph it comes with.
                    cluster: n.cluster.parse().ok(),
                })
                .collect(),
            edges: g
                .edges
                .into_iter()
                .map(|e| Edge {
                    src: e.src,
                    dst: e.dst,
                    port: e.port,
                    protocol: e.protocol,
                    allowed: e.allowed,
                    denied: e.denied,
                    audit_would_deny: e.audit_would_deny,
                    bytes: e.bytes,
                    first_seen_unix_nanos: e.first_seen_unix_nanos,
                    last_seen_unix_nanos: e.last_seen_unix_nanos,
                    rules: e.rules.into_iter().map(|r| (r.rule, r.count)).collect(),
                })
                .collect(),
        }
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
