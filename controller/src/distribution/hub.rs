//! The distribution hub: per node, the version last handed out and the agents that follow it.
//! The rule sets themselves are the engine's: a snapshot is materialized from the engine when an
//! agent subscribes (under the same lock as the fan-out, so nothing falls between the snapshot
//! and the deltas queued after it). The hub keeps no copy of them: at 5,000 nodes the copies
//! cost hundreds of MiB, a second build of every rule set at start and, per quarantine, an
//! update of all 5,000 of them. Changes go into the engine once; each resulting node delta is serialised once and handed
//! to that node's subscribers through bounded queues. A subscriber whose queue is full is cut
//! loose (its queue closed) and resynchronises with a snapshot, so a slow or dead agent never
//! holds up the others and never receives a gap.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{
        Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use tokio::sync::{mpsc, watch};

use bulkhead_ruleset::cluster::is_remote_namespace;

use crate::{
    Change, EngineError, PolicyEngine,
    ruleset::{Endpoint, NodeDelta, RuleKind, RuleRef, RuleSet},
};

/// CPU time the calling thread has used, in nanoseconds (0 where the clock is unavailable).
fn thread_cpu_nanos() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own and reads nothing else.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Updates queued per subscriber before it is cut loose and resynchronised.
pub const SUBSCRIBER_QUEUE: usize = 256;

/// One update for a subscriber, already serialised.
#[derive(Debug, Clone)]
pub struct Update {
    pub from: u64,
    pub version: u64,
    /// The `ControllerMessage` carrying the delta, encoded once for every agent of the node,
    /// with what it has in common with other nodes' deltas of the same change encoded once for
    /// all of them (see [`bulkhead_proto::fanout`]).
    pub message: bulkhead_proto::fanout::EncodedMessage,
    pub priority: bool,
    /// When the change entered the hub (for propagation latency).
    pub created: Instant,
}

#[derive(Debug, Default)]
struct NodeEntry {
    /// The version of the last delta queued for the node (the engine's version of its rule
    /// set, while the engine produces deltas in order): a delta that does not start from it
    /// makes the node's followers resynchronise.
    version: u64,
    /// Under a lock of its own: subscribing and unsubscribing take the hub's state for reading
    /// only, so agents connecting at once materialize their snapshots in parallel.
    subscribers: Mutex<HashMap<u64, mpsc::Sender<Update>>>,
}

/// What a node's agents acknowledged. Kept under its own lock: acks arrive on the async
/// runtime's threads while a change fans out, and must not wait for the whole fan-out.
#[derive(Debug, Default)]
struct AckState {
    acked: u64,
    last_error: String,
    /// Recent successful acks: (version, when, connections cut), oldest first.
    log: std::collections::VecDeque<(u64, std::time::SystemTime, u64)>,
}

/// Successful acks remembered per node (for quarantine status).
const ACK_LOG: usize = 256;

struct HubState {
    engine: PolicyEngine,
    nodes: BTreeMap<String, NodeEntry>,
}

/// What one subscription starts from: a snapshot and the queue of what follows it.
pub struct Subscription {
    pub id: u64,
    pub snapshot: RuleSet,
    pub updates: mpsc::Receiver<Update>,
}

/// Per-policy realization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRealization {
    pub kind: RuleKind,
    pub namespace: String,
    pub name: String,
    pub nodes: u32,
    pub realized: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    pub node: String,
    pub version: u64,
    pub realized: u64,
    pub connected: bool,
    pub last_error: String,
    pub endpoints: u32,
}

/// Counters the hub keeps (exported as metrics by the controller process).
#[derive(Debug, Default)]
pub struct HubCounters {
    pub deltas_sent: AtomicU64,
    pub resyncs: AtomicU64,
    pub snapshots: AtomicU64,
    pub changes_applied: AtomicU64,
    /// Acks refused: for a version the stream was never sent (a forged or confused agent).
    pub acks_refused: AtomicU64,
    /// Sync calls and flow reports refused because they named a node the inventory does not
    /// have.
    pub unknown_nodes: AtomicU64,
    /// CPU time of the thread applying changes, by part (nanoseconds, summed): the engine
    /// (compiling the change and building the node deltas), the fan-out (encoding and queueing
    /// each node's delta), and bringing the hub's own copies of the rule sets up to date. CPU
    /// rather than wall time: during a wide fan-out the thread shares the cores with the
    /// streams it just woke.
    pub engine_nanos: AtomicU64,
    pub fanout_nanos: AtomicU64,
    pub copies_nanos: AtomicU64,
}

pub struct Hub {
    epoch: u64,
    /// Written by changes; read (in parallel) by subscriptions and status queries.
    state: RwLock<HubState>,
    /// Per node. Lock order: `state`, then `acks`.
    acks: Mutex<HashMap<String, AckState>>,
    /// The names of `state.nodes`, apart: every flow batch asks, and must not wait for a change
    /// being compiled under `state`. Only grows, like `state.nodes`. Lock order: `state`, then
    /// this.
    known: RwLock<HashSet<String>>,
    next_subscriber: AtomicU64,
    /// Bumped whenever some node's rule set changes (so the flow pipeline knows when to
    /// rebuild its address directory, without copying rule sets to find out).
    generation: AtomicU64,
    /// Bumped after every apply that touched a local (not a peer cluster's) pod or namespace:
    /// the peering exporters wait on it. A watch holds only the newest value, so a burst of
    /// changes wakes an exporter once.
    local_inventory: watch::Sender<u64>,
    /// Bumped whenever a change touches a peer cluster's namespaces or pods: these are on no
    /// local node, so their changes may move no rule set (and not `generation`), yet the flow
    /// pipeline names their addresses.
    remote_generation: AtomicU64,
    pub counters: HubCounters,
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(
        "the hub's state lock is poisoned (a previous change panicked); restart the controller"
    )]
    Poisoned,
    #[error(
        "node {0} is not in the controller's inventory; check the agent's --node against the cluster's Node names"
    )]
    UnknownNode(String),
}

impl Hub {
    /// A hub over `engine`. The epoch is taken from the clock, so a restarted controller is
    /// never mistaken for the previous one.
    pub fn new(engine: PolicyEngine) -> Hub {
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            .max(1);
        Hub::with_epoch(engine, epoch)
    }

    pub fn with_epoch(engine: PolicyEngine, epoch: u64) -> Hub {
        let nodes: BTreeMap<String, NodeEntry> = engine
            .nodes()
            .into_iter()
            .map(|name| {
                let version = engine.version(&name).unwrap_or_default();
                (
                    name,
                    NodeEntry {
                        version,
                        ..Default::default()
                    },
                )
            })
            .collect();
        Hub {
            epoch,
            known: RwLock::new(nodes.keys().cloned().collect()),
            state: RwLock::new(HubState { engine, nodes }),
            acks: Mutex::new(HashMap::new()),
            next_subscriber: AtomicU64::new(1),
            generation: AtomicU64::new(1),
            local_inventory: watch::Sender::new(0),
            remote_generation: AtomicU64::new(1),
            counters: HubCounters::default(),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    fn lock(&self) -> Result<std::sync::RwLockReadGuard<'_, HubState>, HubError> {
        self.state.read().map_err(|_| HubError::Poisoned)
    }

    fn lock_mut(&self) -> Result<std::sync::RwLockWriteGuard<'_, HubState>, HubError> {
        self.state.write().map_err(|_| HubError::Poisoned)
    }

    /// Applies changes to the engine and queues each node's delta for its subscribers.
    /// Returns the deltas (nodes whose rule set did not change get none).
    pub fn apply(&self, changes: Vec<Change>, priority: bool) -> Result<Vec<NodeDelta>, HubError> {
        let n = changes.len() as u64;
        self.counters
            .changes_applied
            .fetch_add(n, Ordering::Relaxed);
        let local = changes.iter().any(touches_local_inventory);
        let remote = changes.iter().any(touches_remote);
        let result = self.update(priority, |engine| engine.apply_batch(changes));
        if local {
            // Even after an error: exporters diff against what they sent, so a wake-up that
            // finds nothing new costs a comparison and sends nothing.
            self.local_inventory.send_modify(|v| *v = v.wrapping_add(1));
        }
        // Even after an error: part of the batch may have been applied.
        if remote {
            self.remote_generation.fetch_add(1, Ordering::Release);
        }
        result
    }

    /// Wakes whenever a change touched a local pod or namespace (see [`Hub::local_inventory`]).
    pub fn watch_local_inventory(&self) -> watch::Receiver<u64> {
        self.local_inventory.subscribe()
    }

    /// The local namespaces and pods (not those imported from peer clusters, whose namespaces
    /// are qualified `cluster/namespace`), sorted by name, and the engine's identity label
    /// filter: what this cluster exports to its peers.
    pub fn local_inventory(
        &self,
    ) -> Option<(
        Vec<crate::model::Namespace>,
        Vec<crate::Pod>,
        crate::identity::LabelFilter,
    )> {
        let state = self.lock().ok()?;
        let namespaces = state
            .engine
            .namespaces()
            .into_iter()
            .filter(|n| !is_remote_namespace(&n.name))
            .collect();
        let pods = state.engine.local_pods();
        Some((namespaces, pods, state.engine.config().label_filter.clone()))
    }

    /// This cluster's own pods at an address (a peer cluster's are left out).
    pub fn local_pods_at(&self, ip: &std::net::IpAddr) -> Vec<crate::PodKey> {
        self.lock()
            .map(|s| {
                s.engine
                    .pods_at(ip)
                    .into_iter()
                    .filter(|k| !is_remote_namespace(&k.namespace))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The cluster DNS Service's cluster IPs are now `ips`
    /// ([`PolicyEngine::set_cluster_dns_service`]): every node gets the new resolvers.
    pub fn set_cluster_dns_service(
        &self,
        ips: Vec<std::net::IpAddr>,
    ) -> Result<Vec<NodeDelta>, HubError> {
        self.update(false, |engine| engine.set_cluster_dns_service(ips))
    }

    /// Lifts the quarantines whose time has come (`expiresAt`), with priority delivery. Cheap
    /// when nothing is due; the controller calls it on every tick.
    pub fn expire(&self, now: std::time::SystemTime) -> Result<Vec<NodeDelta>, HubError> {
        self.update(true, |engine| engine.expire(now))
    }

    /// Runs one engine update and hands each resulting node delta to that node's followers.
    fn update(
        &self,
        priority: bool,
        change: impl FnOnce(&mut PolicyEngine) -> Result<Vec<NodeDelta>, crate::EngineError>,
    ) -> Result<Vec<NodeDelta>, HubError> {
        let created = Instant::now();
        let mut state = self.lock_mut()?;
        let cpu_started = thread_cpu_nanos();
        let deltas = change(&mut state.engine)?;
        let engine_done = thread_cpu_nanos();
        self.counters
            .engine_nanos
            .fetch_add(engine_done.saturating_sub(cpu_started), Ordering::Relaxed);
        // Under the same lock as subscriptions: one sees either the engine before the change and
        // this delta queued after its snapshot, or the engine after it and no delta.
        let mut encoder = bulkhead_proto::fanout::FanoutEncoder::new(self.epoch);
        for delta in &deltas {
            if !state.nodes.contains_key(&delta.node)
                && let Ok(mut known) = self.known.write()
            {
                known.insert(delta.node.clone());
            }
            let entry = state.nodes.entry(delta.node.clone()).or_default();
            if entry.version != delta.from_version {
                // A node that vanished and came back starts again from version 0; its followers
                // start over from a snapshot of the engine's view (after whatever was queued
                // for them, which the snapshot supersedes).
                tracing::warn!(node = %delta.node, have = entry.version, from = delta.from_version, "delta does not follow the node's last version; resynchronising");
                entry.version = delta.version;
                let subscribers = entry
                    .subscribers
                    .get_mut()
                    .map_err(|_| HubError::Poisoned)?;
                self.counters
                    .resyncs
                    .fetch_add(subscribers.len() as u64, Ordering::Relaxed);
                subscribers.clear();
                continue;
            }
            entry.version = delta.version;
            let subscribers = entry
                .subscribers
                .get_mut()
                .map_err(|_| HubError::Poisoned)?;
            if subscribers.is_empty() {
                continue;
            }
            let update = Update {
                from: delta.from_version,
                version: delta.version,
                message: encoder.delta(delta, priority),
                priority,
                created,
            };
            subscribers.retain(|_, tx| match tx.try_send(update.clone()) {
                Ok(()) => {
                    self.counters.deltas_sent.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(_) => {
                    // Full or gone: closing the queue makes the stream resynchronise.
                    self.counters.resyncs.fetch_add(1, Ordering::Relaxed);
                    false
                }
            });
        }
        let fanout_done = thread_cpu_nanos();
        self.counters
            .fanout_nanos
            .fetch_add(fanout_done.saturating_sub(engine_done), Ordering::Relaxed);
        if !deltas.is_empty() {
            self.generation.fetch_add(1, Ordering::Release);
        }
        // No copies to bring up to date any more (the counter stays, at 0, for the metrics and
        // the benchmark that print it).
        self.counters.copies_nanos.fetch_add(
            thread_cpu_nanos().saturating_sub(fanout_done),
            Ordering::Relaxed,
        );
        Ok(deltas)
    }

    /// Changes whenever some node's rule set changed.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Changes whenever a change touched a peer cluster's namespaces or pods.
    pub fn remote_generation(&self) -> u64 {
        self.remote_generation.load(Ordering::Acquire)
    }

    /// The pods of peer clusters (namespace `cluster/namespace`) as the engine has them, in
    /// key order: the flow pipeline names their addresses, which no local rule set lists as
    /// endpoints.
    pub fn remote_pods(&self) -> Option<Vec<crate::Pod>> {
        let state = self.lock().ok()?;
        Some(
            state
                .engine
                .pod_keys()
                .iter()
                .filter(|k| crate::ruleset::cluster::is_remote_namespace(&k.namespace))
                .filter_map(|k| state.engine.pod(k))
                .collect(),
        )
    }

    /// Every node's endpoints, as their rule sets list them (for the flow pipeline's address
    /// directory), node by node in name order. The state lock is taken per node, not for the
    /// whole walk (250,000 endpoints at fleet scale): a change waiting to be applied, a
    /// quarantine, waits for one node's endpoints at most.
    pub fn endpoints(&self) -> Option<Vec<Endpoint>> {
        let mut nodes: Vec<String> = self.known.read().ok()?.iter().cloned().collect();
        nodes.sort_unstable();
        let mut all = Vec::new();
        for node in &nodes {
            all.extend(self.lock().ok()?.engine.endpoints(node));
        }
        Some(all)
    }

    /// The endpoints of one node's current rule set.
    pub fn node_endpoints(&self, node: &str) -> Option<Vec<Endpoint>> {
        let state = self.lock().ok()?;
        state
            .nodes
            .contains_key(node)
            .then(|| state.engine.endpoints(node))
    }

    /// The version of one node's current rule set and the rules it names (its `rules`),
    /// without the rest of it.
    pub fn node_rules(&self, node: &str) -> Option<(u64, Vec<RuleRef>)> {
        let state = self.lock().ok()?;
        let version = state.nodes.get(node)?.version;
        let rules = state
            .engine
            .node_rules(node)
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        Some((version, rules))
    }

    /// Whether `node` has (or had) a rule set: a node of the inventory. Only such nodes may be
    /// followed or report flows, so what agents call themselves never adds to the hub's state.
    /// Does not wait for a change being compiled.
    pub fn knows_node(&self, node: &str) -> bool {
        self.known.read().is_ok_and(|k| k.contains(node))
    }

    /// Starts following `node`: a snapshot of its current rule set and the queue of updates
    /// after it, taken atomically so nothing falls between them. Refused for a node the
    /// inventory never had.
    pub fn subscribe(&self, node: &str) -> Result<Subscription, HubError> {
        // For reading: a change (which writes) comes wholly before or after this.
        let state = self.lock()?;
        let Some(entry) = state.nodes.get(node) else {
            self.counters.unknown_nodes.fetch_add(1, Ordering::Relaxed);
            return Err(HubError::UnknownNode(node.to_string()));
        };
        let id = self.next_subscriber.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        entry
            .subscribers
            .lock()
            .map_err(|_| HubError::Poisoned)?
            .insert(id, tx);
        let snapshot = current_ruleset(&state, node);
        drop(state);
        self.counters.snapshots.fetch_add(1, Ordering::Relaxed);
        Ok(Subscription {
            id,
            snapshot,
            updates: rx,
        })
    }

    pub fn unsubscribe(&self, node: &str, id: u64) {
        if let Ok(state) = self.lock()
            && let Some(entry) = state.nodes.get(node)
            && let Ok(mut subscribers) = entry.subscribers.lock()
        {
            subscribers.remove(&id);
        }
    }

    /// Counts an ack refused by the stream it came on (see [`SentVersions`]).
    pub fn refuse_ack(&self) {
        self.counters.acks_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Records an agent's acknowledgement. Acks from another epoch are ignored. The caller
    /// checks that the version was sent to that agent ([`SentVersions`]): the hub believes what
    /// it is told here.
    pub fn ack(
        &self,
        node: &str,
        epoch: u64,
        version: u64,
        error: Option<String>,
        connections_cut: u64,
    ) {
        if epoch != self.epoch {
            return;
        }
        if let Ok(mut acks) = self.acks.lock() {
            // Every node acks every change: no new key (an allocation) once it acked once.
            if !acks.contains_key(node) {
                acks.insert(node.to_string(), AckState::default());
            }
            let Some(entry) = acks.get_mut(node) else {
                return;
            };
            match error {
                None => {
                    entry.acked = entry.acked.max(version);
                    entry.last_error.clear();
                    if entry.log.len() == ACK_LOG {
                        entry.log.pop_front();
                    }
                    entry
                        .log
                        .push_back((version, std::time::SystemTime::now(), connections_cut));
                }
                Some(e) => entry.last_error = e,
            }
        }
    }

    /// When `node` first acked `version` or later, and the connections that ack cut: the
    /// moment a change was in that node's kernel.
    pub fn enforced(&self, node: &str, version: u64) -> Option<(std::time::SystemTime, u64)> {
        let acks = self.acks.lock().ok()?;
        acks.get(node)?
            .log
            .iter()
            .find(|(v, _, _)| *v >= version)
            .map(|(_, t, cut)| (*t, *cut))
    }

    /// The controller's current rule set for a node.
    /// Whether the engine has this pod.
    pub fn has_pod(&self, pod: &crate::PodKey) -> bool {
        self.lock()
            .is_ok_and(|s| s.engine.identity_of_pod(pod).is_some())
    }

    /// Every pod as the engine has it, and the engine's identity label filter (for
    /// recommendations).
    pub fn pods(&self) -> Option<(Vec<crate::Pod>, crate::identity::LabelFilter)> {
        let state = self.lock().ok()?;
        Some((
            state.engine.pods(),
            state.engine.config().label_filter.clone(),
        ))
    }

    /// The engine's inputs, its configuration and its clock: what a what-if
    /// ([`crate::impact`]) compiles its own copies from, so the live engine is only read.
    pub fn objects(
        &self,
    ) -> Option<(
        Vec<crate::Object>,
        crate::EngineConfig,
        std::time::SystemTime,
    )> {
        let state = self.lock().ok()?;
        Some((
            state.engine.objects(),
            state.engine.config().clone(),
            state.engine.now(),
        ))
    }

    /// The Quarantine `key` as the engine has it (active or expired).
    pub fn quarantine(&self, key: &crate::PolicyKey) -> Option<crate::Policy> {
        self.lock()
            .ok()
            .and_then(|s| s.engine.quarantine(key).cloned())
    }

    pub fn ruleset(&self, node: &str) -> Option<RuleSet> {
        let state = self.lock().ok()?;
        state
            .nodes
            .contains_key(node)
            .then(|| current_ruleset(&state, node))
    }

    /// The engine's own (full) view of a node's rule set.
    pub fn engine_ruleset(&self, node: &str) -> Result<RuleSet, HubError> {
        Ok(self.lock()?.engine.ruleset(node)?)
    }

    pub fn node_states(&self) -> Vec<NodeState> {
        let Ok(state) = self.lock() else {
            return Vec::new();
        };
        let Ok(acks) = self.acks.lock() else {
            return Vec::new();
        };
        state
            .nodes
            .iter()
            .map(|(name, e)| {
                let ack = acks.get(name);
                NodeState {
                    node: name.clone(),
                    version: e.version,
                    realized: ack.map_or(0, |a| a.acked),
                    connected: e.subscribers.lock().is_ok_and(|s| !s.is_empty()),
                    last_error: ack.map(|a| a.last_error.clone()).unwrap_or_default(),
                    endpoints: state.engine.endpoint_count(name) as u32,
                }
            })
            .collect()
    }

    /// Per policy: the nodes whose rule set mentions it, and how many of them acked their
    /// current version.
    pub fn policy_status(&self) -> Vec<PolicyRealization> {
        let Ok(state) = self.lock() else {
            return Vec::new();
        };
        let Ok(acks) = self.acks.lock() else {
            return Vec::new();
        };
        let mut by_policy: BTreeMap<(RuleKind, String, String), (BTreeSet<&str>, u32)> =
            BTreeMap::new();
        for (node, e) in &state.nodes {
            let realized = acks.get(node).map_or(0, |a| a.acked) >= e.version;
            let policies: BTreeSet<(RuleKind, String, String)> = state
                .engine
                .node_rules(node)
                .into_iter()
                .map(|(_, r)| r)
                .filter(|r| r.kind != RuleKind::Default)
                .map(|r| (r.kind, r.namespace, r.name))
                .collect();
            for p in policies {
                let slot = by_policy.entry(p).or_default();
                if slot.0.insert(node.as_str()) && realized {
                    slot.1 += 1;
                }
            }
        }
        by_policy
            .into_iter()
            .map(
                |((kind, namespace, name), (nodes, realized))| PolicyRealization {
                    kind,
                    namespace,
                    name,
                    nodes: nodes.len() as u32,
                    realized,
                },
            )
            .collect()
    }
}

/// Whether a change is about a local pod or namespace (not one imported from a peer cluster).
fn touches_local_inventory(change: &Change) -> bool {
    match change {
        Change::UpsertNamespace(n) => !is_remote_namespace(&n.name),
        Change::DeleteNamespace(n) => !is_remote_namespace(n),
        Change::UpsertPod(p) => !is_remote_namespace(&p.namespace),
        Change::DeletePod(k) => !is_remote_namespace(&k.namespace),
        _ => false,
    }
}

/// Whether a change adds, alters or removes a peer cluster's namespace or pod.
fn touches_remote(c: &Change) -> bool {
    match c {
        Change::UpsertNamespace(n) => is_remote_namespace(&n.name),
        Change::DeleteNamespace(n) => is_remote_namespace(n),
        Change::UpsertPod(p) => is_remote_namespace(&p.namespace),
        Change::DeletePod(k) => is_remote_namespace(&k.namespace),
        Change::UpsertNode(_)
        | Change::DeleteNode(_)
        | Change::UpsertPolicy(_)
        | Change::DeletePolicy(_) => false,
    }
}

/// The rule set of a node the hub has: the engine's, or, for a node the engine no longer has
/// (no pods and no longer declared), an empty one at the last version handed out.
fn current_ruleset(state: &HubState, node: &str) -> RuleSet {
    state.engine.ruleset(node).unwrap_or_else(|_| RuleSet {
        node: node.to_string(),
        version: state.nodes.get(node).map_or(0, |e| e.version),
        ..RuleSet::default()
    })
}

/// What one stream may ack: a version from the last one its agent acked (at first, the first one
/// sent) up to the newest one sent. A version is recorded before it is sent, so an honest ack
/// always falls inside; an ack for a version never sent on the stream (a future one, one sent to
/// another stream before this one opened) falls outside and is refused. A new stream starts empty:
/// a reconnect resets what may be acked. (A version skipped by a resynchronisation lies inside;
/// acking it claims less than the stream was sent, never more.)
#[derive(Debug, Default)]
pub struct SentVersions {
    /// (lowest that may be acked, newest sent).
    range: Mutex<Option<(u64, u64)>>,
}

impl SentVersions {
    pub fn sent(&self, version: u64) {
        if let Ok(mut r) = self.range.lock() {
            *r = Some(match *r {
                None => (version, version),
                Some((low, newest)) => (low, newest.max(version)),
            });
        }
    }

    /// Whether `version` may be acked on this stream; acking it retires every older one (an
    /// agent acks in order). The same version may be acked twice: a resync snapshot of the
    /// version a delta just brought is acked again.
    pub fn take_ack(&self, version: u64) -> bool {
        let Ok(mut r) = self.range.lock() else {
            return false;
        };
        match r.as_mut() {
            Some((low, newest)) if *low <= version && version <= *newest => {
                *low = version;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod sent_versions_tests {
    use super::SentVersions;

    #[test]
    fn only_versions_sent_and_not_yet_passed_may_be_acked() {
        let s = SentVersions::default();
        assert!(!s.take_ack(0), "nothing sent yet");
        s.sent(5);
        assert!(!s.take_ack(4) && !s.take_ack(6) && !s.take_ack(u64::MAX));
        s.sent(6);
        s.sent(7);
        assert!(s.take_ack(6));
        assert!(!s.take_ack(5), "older than an ack");
        assert!(s.take_ack(6) && s.take_ack(7));
        assert!(!s.take_ack(8));
        // A resync snapshot of the version already sent.
        s.sent(7);
        assert!(s.take_ack(7));
    }
}
