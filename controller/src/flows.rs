//! Flows from every agent: checked ([`check_record`]), kept in memory and on disk ([`history`]),
//! filtered ([`FlowFilter`]), and folded into the service graph ([`ServiceGraph`], in `graph`):
//!
//! Nodes are workloads (the pod's owner — Deployment, StatefulSet, … — else the pod) grouped by
//! namespace, plus `world` (addresses of no pod) and `host`. A peer cluster's pods (namespace
//! `cluster/namespace`, imported by peering) are workloads too, `west/shop/Deployment/web`, with
//! their cluster. An edge is (source workload, destination workload, port, protocol) with counts
//! by verdict, bytes, first and last seen, and the rules that decided. A connection between two
//! pods is reported by both enforcement points (the source's egress and the destination's
//! ingress); it is counted once: allowed at its last enforcement point here (the destination
//! pod's ingress, else — no pod, or a peer cluster's — the source's egress), denied where it
//! was denied.

use std::{
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use bulkhead_proto::v1 as pb;
use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::{
    Pod,
    distribution::{FlowStore, Hub},
    ruleset::{
        ClusterName, Endpoint, EndpointRef, FlowEntry, FlowRecord, NamePattern, PodKey, RuleSet,
        cluster,
    },
};

mod checks;
mod graph;
pub mod history;

pub use checks::{FlowRejection, check_record};
pub use graph::{Counted, Edge, Graph, GraphNode, ServiceGraph, StagedDenies, StagedEdge};

/// Distinct rules the graph and the `drops_by_rule` metric name; denials by further rules are
/// counted under [`OTHER_RULES`]. What an agent reports is a claim: without this, every
/// distinct rule it makes up would stay in the controller's memory and in every scrape for good.
pub const MAX_RULE_LABELS: usize = 1024;
/// The label of the rules beyond [`MAX_RULE_LABELS`].
pub const OTHER_RULES: &str = "other rules (more distinct rules than the controller labels)";
/// Rules an edge names; denials and admissions by further rules on that edge are counted under
/// [`OTHER_RULES`].
pub const MAX_RULES_PER_EDGE: usize = 32;
/// Edges the graph holds; a record for a new edge beyond this is counted by verdict but not
/// drawn (and counted in [`ServiceGraph::edges_refused`]) until edges expire.
pub const MAX_EDGES: usize = 250_000;
/// Named world nodes (`world: api.example.com`) the graph holds; a record naming a further one
/// is drawn at plain `world`. Agents report names (checked patterns, at most
/// [`crate::ruleset::flow::MAX_PEER_NAMES`] a record), and a made-up name per record must not
/// grow the controller's memory without bound.
pub const MAX_NAMED_WORLDS: usize = 1024;

/// The workload id of a peer outside the cluster: `world`, or, when its endpoint had learned
/// DNS names for its address, `world: NAME` with the first of them (exact names sort before
/// wildcards, so the most specific one). One node per flow, not one per name: the graph counts
/// each connection once on one edge, and a flow counted under each of its names would show
/// as several connections in the edge counts and the per-namespace metrics.
pub fn world_id(peer_names: &[NamePattern]) -> String {
    match peer_names.first() {
        Some(name) => format!("{WORLD_NAMED_PREFIX}{name}"),
        None => "world".to_string(),
    }
}

/// What a named world node's id starts with; the name (pattern) follows.
pub const WORLD_NAMED_PREFIX: &str = "world: ";

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

    /// `world: NAME`: the world at an address its endpoint learned for this DNS name.
    fn named_world(name: &NamePattern) -> Workload {
        Workload {
            namespace: String::new(),
            name: world_id(std::slice::from_ref(name)),
        }
    }

    /// The DNS name of a named world workload.
    pub fn domain(&self) -> Option<&str> {
        if !self.namespace.is_empty() {
            return None;
        }
        self.name.strip_prefix(WORLD_NAMED_PREFIX)
    }

    /// The peer cluster of a remote workload (namespace `cluster/namespace`); `None` for a
    /// local one, the world and the host.
    pub fn cluster(&self) -> Option<ClusterName> {
        cluster::split_namespace(&self.namespace)
            .0
            .and_then(|c| c.parse().ok())
    }

    pub fn id(&self) -> String {
        if self.namespace.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.namespace, self.name)
        }
    }
}

/// Directories get distinct generations, so a graph can tell which one its cached translation
/// of workload numbers belongs to.
static DIRECTORY_GENERATION: AtomicU64 = AtomicU64::new(1);

/// Addresses and pods of the cluster, from the rule sets of all nodes. Workloads are numbered;
/// lookups by address or pod name answer the number.
#[derive(Debug, Default, Clone)]
pub struct Directory {
    generation: u64,
    workloads: Vec<Workload>,
    /// By workload number: a peer cluster's (no local enforcement point reports its side).
    remote: Vec<bool>,
    by_ip: FxHashMap<IpAddr, u32>,
    by_pod: FxHashMap<PodKey, u32>,
    pod_by_ip: FxHashMap<IpAddr, PodKey>,
}

impl Directory {
    pub fn from_rulesets<'a>(rulesets: impl IntoIterator<Item = &'a RuleSet>) -> Directory {
        Directory::from_endpoints(rulesets.into_iter().flat_map(|rs| &rs.endpoints))
    }

    /// The directory of these endpoints (every node's, as their rule sets list them).
    pub fn from_endpoints<'a>(endpoints: impl IntoIterator<Item = &'a Endpoint>) -> Directory {
        Directory::from_inventory(endpoints, [])
    }

    /// The directory of these endpoints and of peer clusters' pods (`remote`, namespaces
    /// `cluster/namespace`): a flow to a remote pod's address names that pod and its workload
    /// (`west/shop/Deployment/web`), not the world. Remote pods whose addresses were made up
    /// or are their node's (host network) name nobody: the same address may be anyone's.
    /// An address listed by both a local endpoint and a remote pod is the local pod's.
    pub fn from_inventory<'a>(
        endpoints: impl IntoIterator<Item = &'a Endpoint>,
        remote: impl IntoIterator<Item = &'a Pod>,
    ) -> Directory {
        let mut d = Directory {
            generation: DIRECTORY_GENERATION.fetch_add(1, Ordering::Relaxed),
            ..Default::default()
        };
        let mut numbers: FxHashMap<Workload, u32> = FxHashMap::default();
        for e in endpoints {
            d.add(
                &mut numbers,
                &e.namespace,
                &e.pod,
                e.workload.as_deref(),
                &e.ips,
                true,
            );
        }
        for p in remote {
            if p.host_network || p.synthetic_ips {
                continue;
            }
            d.add(
                &mut numbers,
                &p.namespace,
                &p.name,
                p.workload.as_deref(),
                &p.ips,
                false,
            );
        }
        d
    }

    /// Numbers the pod's workload and files its addresses (over earlier ones when `over`).
    fn add(
        &mut self,
        numbers: &mut FxHashMap<Workload, u32>,
        namespace: &str,
        pod: &str,
        workload: Option<&str>,
        ips: &[IpAddr],
        over: bool,
    ) {
        let w = Workload {
            namespace: namespace.to_string(),
            name: workload.map_or_else(|| format!("Pod/{pod}"), str::to_string),
        };
        let n = *numbers.entry(w).or_insert_with_key(|w| {
            self.workloads.push(w.clone());
            self.remote.push(cluster::is_remote_namespace(namespace));
            self.workloads.len() as u32 - 1
        });
        let key = PodKey {
            namespace: namespace.to_string(),
            name: pod.to_string(),
        };
        for ip in ips {
            if !over && self.by_ip.contains_key(ip) {
                continue;
            }
            self.by_ip.insert(*ip, n);
            self.pod_by_ip.insert(*ip, key.clone());
        }
        self.by_pod.insert(key, n);
    }

    /// The pod that has an address, if one has it.
    pub fn pod_of(&self, ip: IpAddr) -> Option<&PodKey> {
        self.pod_by_ip.get(&ip)
    }

    fn of_ip(&self, ip: IpAddr) -> Option<u32> {
        self.by_ip.get(&ip).copied()
    }

    /// Whether workload `n` is a peer cluster's: its pods' own side of a connection is
    /// enforced, and reported, in their cluster, not here.
    fn is_remote(&self, n: u32) -> bool {
        self.remote.get(n as usize).copied().unwrap_or(false)
    }

    /// Workloads known (pods' owners, else pods).
    pub fn workloads(&self) -> usize {
        self.workloads.len()
    }

    /// Names the record's peer when the reporting agent could not (a pod of another node).
    pub fn name_peer(&self, r: &mut FlowRecord) {
        if r.peer.is_none()
            && let Some(p) = self.pod_of(r.peer_address())
        {
            r.peer = Some(p.clone());
        }
    }

    /// [`Directory::name_peer`] for a flow (a quarantine action has no peer).
    pub fn name_peer_of(&self, e: &mut FlowEntry) {
        if let FlowEntry::Flow(r) = e {
            self.name_peer(r);
        }
    }
}

/// What `bulkhead flows` and the flow API filter on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowFilter {
    /// From or to a pod of this namespace (the reporting endpoint or the named peer).
    pub namespace: Option<String>,
    /// From or to this pod, `namespace/pod`.
    pub pod: Option<String>,
    pub verdict: Option<String>,
    /// `allowed` or `denied`: the verdict with the staged policies in force (quarantine
    /// actions never match).
    pub staged_verdict: Option<String>,
    /// Observed at or after this time.
    pub since_unix_nanos: u64,
    /// To or from a peer outside the cluster named by DNS (see [`peer_name_matches`]);
    /// quarantine actions never match.
    pub peer_name: Option<NamePattern>,
    /// From or to a pod of this peer cluster (namespace `cluster/namespace`). Kept as text: a
    /// name that is not a cluster name (from the wire) matches nothing, as no pod has it.
    pub cluster: Option<String>,
}

/// Whether the pod is in the peer cluster `cluster` (its namespace is `cluster/namespace`).
pub fn pod_in_cluster(pod: &PodKey, cluster: &str) -> bool {
    cluster::split_namespace(&pod.namespace).0 == Some(cluster)
}

/// Whether a record whose peer has `names` matches the filter's `wanted` name: a name equal to
/// it; for an exact name, a wildcard of the record that covers it (the peer was learned for
/// some name of that wildcard, possibly this one); for a wildcard, an exact name of the record
/// it covers. A user asking for `api.example.com` is shown the flows to addresses learned under
/// `*.example.com` too, as these may be the ones that failed.
pub fn peer_name_matches(names: &[NamePattern], wanted: &NamePattern) -> bool {
    names.iter().any(|n| {
        n == wanted
            || match (n, wanted) {
                (NamePattern::Wildcard(_), NamePattern::Exact(w)) => n.matches(w),
                (NamePattern::Exact(e), NamePattern::Wildcard(_)) => wanted.matches(e),
                _ => false,
            }
    })
}

impl FlowFilter {
    pub fn from_proto(f: Option<&pb::FlowFilter>) -> FlowFilter {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
        f.map(|f| FlowFilter {
            namespace: some(&f.namespace),
            pod: some(&f.pod),
            verdict: some(&f.verdict),
            staged_verdict: some(&f.staged_verdict),
            since_unix_nanos: f.since_unix_nanos,
            // A pattern that does not parse matches nothing rather than everything: no record
            // names its peer by the empty name, and no wildcard covers it.
            peer_name: (!f.peer_name.is_empty()).then(|| {
                NamePattern::parse(&f.peer_name).unwrap_or(NamePattern::Exact(String::new()))
            }),
            cluster: some(&f.cluster),
        })
        .unwrap_or_default()
    }

    pub fn to_proto(&self) -> pb::FlowFilter {
        pb::FlowFilter {
            namespace: self.namespace.clone().unwrap_or_default(),
            pod: self.pod.clone().unwrap_or_default(),
            verdict: self.verdict.clone().unwrap_or_default(),
            staged_verdict: self.staged_verdict.clone().unwrap_or_default(),
            since_unix_nanos: self.since_unix_nanos,
            peer_name: self
                .peer_name
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            cluster: self.cluster.clone().unwrap_or_default(),
        }
    }

    /// Whether the record or quarantine action matches; `dir` names a peer the agent could
    /// not.
    pub fn matches(&self, dir: &Directory, e: &FlowEntry) -> bool {
        if e.time_unix_nanos() < self.since_unix_nanos {
            return false;
        }
        if let Some(v) = &self.verdict
            && e.verdict_str() != v
        {
            return false;
        }
        if let Some(v) = &self.staged_verdict
            && !matches!(e, FlowEntry::Flow(r) if r.staged_verdict().as_str() == v)
        {
            return false;
        }
        if let Some(wanted) = &self.peer_name
            && !matches!(e, FlowEntry::Flow(r) if peer_name_matches(&r.peer_names, wanted))
        {
            return false;
        }
        if self.pod.is_none() && self.namespace.is_none() && self.cluster.is_none() {
            return true;
        }
        let (endpoint, peer) = match e {
            FlowEntry::Flow(r) => (
                &r.endpoint,
                r.peer.as_ref().or_else(|| dir.pod_of(r.peer_address())),
            ),
            // A quarantine action concerns its pod alone.
            FlowEntry::Quarantine(q) => {
                return self.pod.as_ref().is_none_or(|p| pod_is(&q.pod, p))
                    && self
                        .namespace
                        .as_ref()
                        .is_none_or(|ns| q.pod.namespace == *ns)
                    && self
                        .cluster
                        .as_ref()
                        .is_none_or(|c| pod_in_cluster(&q.pod, c));
            }
        };
        // The pod at either end, the namespace at either end, each on its own.
        if let Some(p) = &self.pod
            && !(endpoint_is(endpoint, p) || peer.is_some_and(|q| pod_is(q, p)))
        {
            return false;
        }
        if let Some(ns) = &self.namespace {
            let in_ns = |pod: &PodKey| pod.namespace == *ns;
            if !(endpoint.pod().is_some_and(in_ns) || peer.is_some_and(in_ns)) {
                return false;
            }
        }
        if let Some(c) = &self.cluster {
            let in_cluster = |pod: &PodKey| pod_in_cluster(pod, c);
            if !(endpoint.pod().is_some_and(in_cluster) || peer.is_some_and(in_cluster)) {
                return false;
            }
        }
        true
    }
}

/// Whether `text` is the pod's `namespace/name`.
fn pod_is(pod: &PodKey, text: &str) -> bool {
    text.len() == pod.namespace.len() + 1 + pod.name.len()
        && text.starts_with(pod.namespace.as_str())
        && text.as_bytes()[pod.namespace.len()] == b'/'
        && text.ends_with(pod.name.as_str())
}

/// Whether `text` names the endpoint (`namespace/name`, or `endpoint#ID` for one the agent
/// could not name).
fn endpoint_is(e: &EndpointRef, text: &str) -> bool {
    match e {
        EndpointRef::Pod(p) => pod_is(p, text),
        EndpointRef::Unnamed(id) => text.strip_prefix("endpoint#") == Some(id.to_string().as_str()),
    }
}

/// The controller's flow ingest path: each batch an agent reports is folded into the service
/// graph as it arrives and then kept in the bounded store, so the graph never misses a record
/// the store evicted, and nothing is copied on the way.
pub struct FlowPipeline {
    store: Arc<Mutex<FlowStore>>,
    graph: Arc<Mutex<ServiceGraph>>,
    hub: Option<Arc<Hub>>,
    /// The directory and the hub generations (rule sets, peer clusters' pods) it was built
    /// from.
    directory: Mutex<((u64, u64), Arc<Directory>)>,
    /// Records refused by [`check_record`], by [`FlowRejection`] (in [`FlowRejection::ALL`]
    /// order).
    rejected: [AtomicU64; FlowRejection::ALL.len()],
}

#[derive(Debug, thiserror::Error)]
pub enum FlowPipelineError {
    #[error(
        "the flow store or graph lock is poisoned (a previous update panicked); restart the controller"
    )]
    Poisoned,
}

/// A record read back at start; a damaged chunk is skipped with a warning (the rest of the
/// history is still worth having), any other error stops the start.
fn readable(
    r: Result<history::HistoryRecord, history::HistoryError>,
) -> Result<Option<history::HistoryRecord>, history::HistoryError> {
    match r {
        Ok(r) => Ok(Some(r)),
        Err(e @ history::HistoryError::Chunk(_)) => {
            tracing::warn!(error = %e, "flow history: a damaged chunk was skipped");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

impl FlowPipeline {
    /// Names addresses from `hub`'s rule sets (rebuilt when they change).
    pub fn new(
        store: Arc<Mutex<FlowStore>>,
        graph: Arc<Mutex<ServiceGraph>>,
        hub: Arc<Hub>,
    ) -> FlowPipeline {
        FlowPipeline {
            store,
            graph,
            hub: Some(hub),
            directory: Mutex::new(((0, 0), Arc::new(Directory::default()))),
            rejected: Default::default(),
        }
    }

    /// A pipeline with a fixed directory (tests, benchmarks without a policy engine).
    pub fn with_directory(
        store: Arc<Mutex<FlowStore>>,
        graph: Arc<Mutex<ServiceGraph>>,
        directory: Directory,
    ) -> FlowPipeline {
        FlowPipeline {
            store,
            graph,
            hub: None,
            directory: Mutex::new(((0, 0), Arc::new(directory))),
            rejected: Default::default(),
        }
    }

    pub fn store(&self) -> &Arc<Mutex<FlowStore>> {
        &self.store
    }

    pub fn graph(&self) -> &Arc<Mutex<ServiceGraph>> {
        &self.graph
    }

    /// Who has which address, as of the hub's current rule sets and peer clusters' pods.
    pub fn directory(&self) -> Arc<Directory> {
        let Ok(mut cached) = self.directory.lock() else {
            return Arc::new(Directory::default());
        };
        if let Some(hub) = &self.hub {
            // Both read before the inventory: a change landing meanwhile moves one of them
            // again, and the next call rebuilds.
            let generation = (hub.generation(), hub.remote_generation());
            if cached.0 != generation
                && let Some(endpoints) = hub.endpoints()
                && let Some(remote) = hub.remote_pods()
            {
                let d = Directory::from_inventory(&endpoints, &remote);
                *cached = (generation, Arc::new(d));
            }
        }
        cached.1.clone()
    }

    /// At start, reads the history back: the records seen at or after `graph_since` are folded
    /// into the graph, and the newest records (as many as the store holds) fill the store, so
    /// the graph and `/api/flows` look as they did before the restart. Returns the records
    /// folded into the graph and those put in the store.
    pub fn restore_from(
        &self,
        history: &history::FlowHistory,
        graph_since: u64,
    ) -> Result<(u64, u64), history::HistoryError> {
        let directory = self.directory();
        let mut folded = 0;
        {
            let query = history::HistoryQuery {
                filter: FlowFilter {
                    since_unix_nanos: graph_since,
                    ..FlowFilter::default()
                },
                ..Default::default()
            };
            let mut graph = self
                .graph
                .lock()
                .map_err(|_| history::HistoryError::Poisoned)?;
            for r in history.query(query)? {
                if let Some(FlowEntry::Flow(f)) = readable(r)?.map(|r| r.entry) {
                    graph.add(&directory, &f);
                    folded += 1;
                }
            }
        }
        let mut store = self
            .store
            .lock()
            .map_err(|_| history::HistoryError::Poisoned)?;
        let newest = history::HistoryQuery {
            newest_first: true,
            ..Default::default()
        };
        let mut recent = Vec::new();
        for r in history.query(newest)? {
            if recent.len() == store.capacity() {
                break;
            }
            recent.extend(readable(r)?);
        }
        let restored = recent.len() as u64;
        for r in recent.into_iter().rev() {
            store.restore(&r.node, r.entry);
        }
        Ok((folded, restored))
    }

    /// Records refused so far, by reason.
    pub fn rejected(&self) -> impl Iterator<Item = (FlowRejection, u64)> + '_ {
        FlowRejection::ALL
            .iter()
            .zip(&self.rejected)
            .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
    }

    /// One agent's batch: records that fail [`check_record`] (that the contract cannot hold)
    /// are counted and dropped; the rest folded into the graph, then stored. Returns the records
    /// accepted.
    pub fn ingest(
        &self,
        node: &str,
        records: Vec<pb::FlowRecord>,
        dropped_by_agent: u64,
    ) -> Result<u64, FlowPipelineError> {
        let mut checked: Vec<FlowRecord> = Vec::with_capacity(records.len());
        for r in records {
            match check_record(r) {
                Ok(r) => checked.push(r),
                Err(why) => {
                    if let Some(i) = FlowRejection::ALL.iter().position(|w| *w == why) {
                        self.rejected[i].fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        let records = checked;
        let directory = self.directory();
        {
            let mut graph = self.graph.lock().map_err(|_| FlowPipelineError::Poisoned)?;
            for r in &records {
                graph.add(&directory, r);
            }
        }
        let n = records.len() as u64;
        let mut store = self.store.lock().map_err(|_| FlowPipelineError::Poisoned)?;
        store.dropped_by_agents += dropped_by_agent;
        store.set_directory(directory);
        store.push_batch(node, records);
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
