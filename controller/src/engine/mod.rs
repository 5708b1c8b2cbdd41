//! The policy compiler: inventory + policies → one [`RuleSet`] per node, kept up to date
//! incrementally.
//!
//! # How the work is shared
//! Everything is computed per *identity*, never per pod: all pods of an identity have the same
//! labels, namespace, service account, named ports and CIDR class, so they are selected by the
//! same policies and get the same [`DirectionPolicy`]s. Selectors are interned ("selections"):
//! equal selectors in different policies are evaluated once, and each selection keeps the set of
//! identities it matches. A selection used as a policy subject keeps the merged rules of all
//! policies with that subject, keyed by their shape (peer selection, ports, tier, priority,
//! action), so ten thousand policies that say the same thing cost one entry.
//!
//! Every endpoint of an identity therefore shares one policy group in the [`RuleSet`], numbered
//! after the identity: a change of an identity's policy is one group change per node, however
//! many endpoints use it.
//!
//! # Incremental updates
//! [`PolicyEngine::apply`] changes the inputs, marks the identities whose policy may change
//! (subjects of a changed policy; subjects of rules whose peer selection gained or lost an
//! identity), recomputes only those, and then updates only the nodes where an affected identity
//! has an endpoint or is a referenced peer. Per node it keeps reference counts of the peer
//! identities and rules its endpoints use, which decide which pod addresses its ipcache needs.
//! The ipcache itself is not stored: it is computed when a rule set is materialized, and a
//! delta compares an address's entry now with the entry rebuilt from the journal (the touched
//! pods' snapshots and the node's earlier peer references), so a change costs what it touches.
//!
//! # Quarantines
//! A Quarantine selects pods, not identities: the endpoints of the pods it selects leave their
//! identity's group for a quarantine group (one per set of active Quarantines selecting a pod,
//! numbered from [`FIRST_QUARANTINE_GROUP`] by ordered slots, so the number depends only on the
//! sets in use). That group holds only the quarantines' entries — exceptions at priority 0, the
//! deny-all at [`QUARANTINE_DENY_PRIORITY`] under the Quarantine's default rule id (index
//! `None`) — since nothing below the quarantine tier can be reached. Pods keep their identity,
//! so no other endpoint's policy changes. Exceptions' CIDRs get identities like any policy
//! CIDR while the Quarantine is active. Quarantines expire against the engine's clock, set by
//! [`PolicyEngine::new_at`] and advanced by [`PolicyEngine::expire`].
//!
//! # What a node's ipcache holds
//! Every CIDR identity; the addresses of the node's own endpoints; the addresses of every
//! quarantined pod (flagged [`IpCacheEntry::quarantined`]), on every node; the addresses of
//! every pod whose identity is a peer of some entry on the node; and, when an entry names the `world`
//! entity, every pod address (so that pods are never mistaken for the world). Other pod addresses
//! would only resolve to identities no entry on the node names, and CIDR identities are matched
//! exactly like the pods they contain, so leaving them out cannot change a verdict.
//!
//! A quarantined address's entry also lists the peer identities its Quarantines' exceptions
//! admit ([`IpCacheEntry::quarantine_allow`], for the XDP prefilter). The list belongs to the
//! pod's quarantine group and depends on exactly what the group's policy depends on, so it is
//! recomputed with it; when it changes, the group's pods' addresses are re-checked on every
//! node, against the list the group had before the change (kept in the journal).
//!
//! # Placement
//! A pod is placed on its `spec.nodeName`, or on [`EngineConfig::unscheduled_node`] when it has
//! none. It is an endpoint when it has an address (host-network pods are ignored entirely, as
//! upstream policies ignore them). Endpoint ids are the lowest free id on the node, from 1 and
//! below [`MAX_ENDPOINT_ID`], and stay fixed while the pod stays on the node.
//!
//! # Where things are
//! This module holds the engine's state, its queries, and the entry points that apply changes
//! and journal them; each concern's methods live in a module of its own: `inventory` (pods,
//! nodes, namespaces, endpoint ids), `identities` (pod and CIDR identities and their slots),
//! `selectors` (the selector cache), `repository` (policies, their contributions and each
//! identity's compiled policy), `quarantine`, `span` (what each node's rule set must carry) and
//! `delta` (the journal turned into per-node deltas).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use ipnetwork::IpNetwork;
use rustc_hash::{FxHashMap, FxHashSet};

use crate::error::EngineError;
use crate::identity::{
    IdentityKey, LabelFilter, Move, OrderedSlots, cidr_hash, cidr_identity_slots,
    pod_identity_slots,
};
use crate::model::{
    CidrPeer, Isolation, Labels, NAMESPACE_NAME_LABEL, Namespace, NamespaceScope, Node, Object,
    Peer, Pod, PodKey, PodSelection, Policy, PolicyKey, PortSpec,
};
use crate::ruleset::{
    Action, Direction, DirectionPolicy, Endpoint, EndpointDelta, EndpointPolicy, Identity,
    IpCacheEntry, NodeDelta, PolicyDelta, PolicyEntry, PolicyGroupId, PortRange, Protocol, RuleId,
    RuleRef, RuleSet, Tier, identity,
};

mod delta;
mod identities;
mod inventory;
mod quarantine;
mod repository;
mod selectors;
mod span;

/// Endpoint ids are below this: the data plane's per-node tables are sized by it
/// (`bulkhead_common::MAX_ENDPOINTS`, through the rule-set contract).
pub const MAX_ENDPOINT_ID: u32 = crate::ruleset::MAX_ENDPOINTS;

/// Priority of a Quarantine's deny-all entry; its exceptions have priority 0.
pub const QUARANTINE_DENY_PRIORITY: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    pub label_filter: LabelFilter,
    /// Node that pods without `spec.nodeName` are placed on.
    pub unscheduled_node: String,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            label_filter: LabelFilter::default(),
            unscheduled_node: "node-1".into(),
        }
    }
}

/// One change of the inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    UpsertNamespace(Namespace),
    /// The Namespace object is gone; its pods and policies are removed by their own changes.
    DeleteNamespace(String),
    UpsertPod(Pod),
    DeletePod(PodKey),
    UpsertNode(Node),
    DeleteNode(String),
    UpsertPolicy(Policy),
    DeletePolicy(PolicyKey),
}

impl From<Object> for Change {
    fn from(o: Object) -> Change {
        match o {
            Object::Namespace(n) => Change::UpsertNamespace(n),
            Object::Pod(p) => Change::UpsertPod(p),
            Object::Node(n) => Change::UpsertNode(n),
            Object::Policy(p) => Change::UpsertPolicy(p),
        }
    }
}

/// Rule ids: 22 bits of policy slot, 1 bit of direction, 9 bits of position (0 = the policy's
/// isolation default, i + 1 = rule i).
fn rule_id(slot: u32, direction: Direction, index: Option<u32>) -> RuleId {
    (slot << 10) | ((direction as u32) << 9) | index.map_or(0, |i| i + 1)
}

fn policy_slots() -> OrderedSlots<Arc<PolicyKey>> {
    OrderedSlots::new("policy", 1, (1 << 22) - 1 - 4096, 4096)
}

type SelId = u32;
/// A pod's key, shared by the engine's indexes (one allocation per pod, not one per index).
type PodRef = Arc<PodKey>;
type NodeIdx = u32;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum SelectionSpec {
    Pods(PodSelection),
    Cidr(CidrPeer),
    World,
    Cluster,
    Host,
    /// Every pod identity (egress named ports towards "anywhere").
    AllPods,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum PeerRef {
    Any,
    Sel(SelId),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Shape {
    peer: PeerRef,
    port: PortSpec,
    tier: Tier,
    priority: u16,
    action: Action,
    audit: bool,
}

#[derive(Debug, Default)]
struct SubjectData {
    refs: u32,
    shapes: [FxHashMap<Shape, BTreeSet<RuleId>>; 2],
    isolation: [BTreeSet<RuleId>; 2],
    audit_isolation: [BTreeSet<RuleId>; 2],
}

#[derive(Debug)]
struct Selection {
    /// Shared with the key of `sel_by_spec`.
    spec: Arc<SelectionSpec>,
    refs: u32,
    matched: FxHashSet<Identity>,
    subject: Option<Box<SubjectData>>,
    /// Subject selections whose shapes use this selection as peer, with use counts.
    peer_users: FxHashMap<SelId, u32>,
}

#[derive(Debug, Clone)]
enum IdentityKind {
    Pod(Arc<IdentityKey>),
    /// Not an identity but the policy group of the endpoints selected by exactly this set of
    /// active Quarantines (sorted): it is never a peer and no address resolves to it.
    Quarantine(QuarantineSet),
    Cidr(IpNetwork),
    World,
    Host,
}

/// Peer identities and rules an identity's policy uses: what a node must carry for it.
#[derive(Debug, Default, PartialEq, Eq)]
struct Contribution {
    peers: Vec<Identity>,
    rules: Vec<RuleId>,
}

type Policies = Arc<EndpointPolicy>;
/// What a node's ipcache gives a pod address: its identity, and its quarantine group when the
/// pod is quarantined (whose exception identities the entry carries).
type PodEntry = (Identity, Option<Identity>);
/// Keys of the active Quarantines that select one pod, sorted.
type QuarantineSet = Arc<Vec<PolicyKey>>;

/// Policy group numbers of quarantined endpoints start here (above every identity).
pub const FIRST_QUARANTINE_GROUP: PolicyGroupId = 0x4000_0000;

fn quarantine_group_slots() -> OrderedSlots<QuarantineSet> {
    OrderedSlots::new(
        "quarantine group",
        FIRST_QUARANTINE_GROUP,
        (1 << 20) - 4096,
        4096,
    )
}

fn quarantine_set_hash(set: &[PolicyKey]) -> u64 {
    let mut h = crate::identity::Fnv::default();
    for k in set {
        for part in [&k.namespace, "\0", &k.name, "\u{1}"] {
            h.write(part.as_bytes());
        }
    }
    h.finish()
}

/// A Quarantine as the engine keeps it: its entries, ready to expand for the endpoints it
/// selects.
struct QuarantineState {
    policy: Policy,
    slot: u32,
    /// Per direction: the exceptions and the deny-all, with their rule ids.
    shapes: [Vec<(Shape, RuleId)>; 2],
    /// Not expired at the engine's clock.
    active: bool,
}

#[derive(Debug)]
struct IdentityState {
    kind: IdentityKind,
    pods: FxHashSet<PodRef>,
    member_of: FxHashSet<SelId>,
    policy: Policies,
    contribution: Arc<Contribution>,
    endpoints: FxHashMap<NodeIdx, BTreeSet<u32>>,
    /// Quarantine groups only: the peer identities the group's exceptions admit (what the
    /// ipcache entries of its pods carry as [`IpCacheEntry::quarantine_allow`]); empty for the
    /// other kinds. Kept up to date with the group's policy.
    quarantine_allow: Arc<Vec<Identity>>,
}

#[derive(Debug, Clone)]
struct PodState {
    /// Without labels when `labels_in_key`.
    pod: Pod,
    /// The pod's labels are exactly its identity's (no label was filtered out): the identity
    /// key holds them, one copy for all its pods.
    labels_in_key: bool,
    identity: Identity,
    node: NodeIdx,
    endpoint: Option<u32>,
    /// The quarantine group the pod's endpoint uses instead of its identity's.
    quarantine: Option<Identity>,
}

impl PodState {
    /// The policy group of the pod's endpoint.
    fn group(&self) -> Identity {
        self.quarantine.unwrap_or(self.identity)
    }
}

#[derive(Debug, Clone, PartialEq)]
struct PodSnap {
    identity: Identity,
    node: NodeIdx,
    ips: Vec<IpAddr>,
    endpoint: Option<u32>,
    workload: Option<String>,
    quarantine: Option<Identity>,
}

#[derive(Debug, Default)]
struct NodeState {
    name: String,
    declared: bool,
    pods: u32,
    version: u64,
    endpoints: BTreeMap<u32, PodRef>,
    contrib: FxHashMap<Identity, Arc<Contribution>>,
    peer_refs: FxHashMap<Identity, u32>,
    rule_refs: FxHashMap<RuleId, u32>,
}

impl NodeState {
    fn exists(&self) -> bool {
        self.declared || self.pods > 0
    }
}

/// What [`PolicyEngine::node_delta`] needs of one node beyond the journal.
struct NodeParts<'a> {
    /// Pod addresses whose entry may have changed here.
    ip_checks: &'a [(NodeIdx, IpAddr)],
    /// (identity, had its group before), this node's only.
    groups: &'a [(NodeIdx, (Identity, bool))],
    /// (rule, was referenced before), this node's only.
    rules: &'a [(NodeIdx, (RuleId, bool))],
    /// Change of each identity's policy (`None`: unchanged).
    policy_deltas: &'a FxHashMap<Identity, Option<PolicyDelta>>,
    /// Touched pods by the addresses they had before the change.
    old_at: &'a FxHashMap<IpAddr, Vec<(&'a PodKey, &'a PodSnap)>>,
}

struct PolicyState {
    policy: Policy,
    slot: u32,
    subject: SelId,
}

/// What one `apply` touched; empty (and inactive) between changes and during a full build.
#[derive(Default)]
struct Journal {
    active: bool,
    dirty: FxHashSet<Identity>,
    old_policy: FxHashMap<Identity, Policies>,
    pods: FxHashMap<PodKey, Option<PodSnap>>,
    flags: FxHashSet<(NodeIdx, Identity)>,
    dp_changed: FxHashSet<Identity>,
    /// (node, pod address) whose ipcache entry may have changed.
    ip_checks: Vec<(NodeIdx, IpAddr)>,
    /// Nodes where every pod address must be re-checked (their `world` reference flipped).
    all_ips: FxHashSet<NodeIdx>,
    /// Whether a node referenced a peer identity before the change.
    peer_old: FxHashMap<(NodeIdx, Identity), bool>,
    rule_old: FxHashMap<(NodeIdx, RuleId), bool>,
    /// Whether a node had an identity's policy group before the change.
    group_old: FxHashMap<(NodeIdx, Identity), bool>,
    renamed_rules: FxHashSet<RuleId>,
    cidr_old: BTreeMap<IpNetwork, Option<Identity>>,
    /// A quarantine group's exception identities before the change (groups whose list changed
    /// or that went away).
    allow_old: FxHashMap<Identity, Arc<Vec<Identity>>>,
    node_existed: FxHashMap<NodeIdx, bool>,
}

/// The policy engine. Build it with [`PolicyEngine::new`] from a full inventory, read per-node
/// rule sets with [`PolicyEngine::ruleset`], feed it changes with [`PolicyEngine::apply`].
pub struct PolicyEngine {
    config: EngineConfig,
    namespaces: FxHashMap<String, Labels>,
    pods: FxHashMap<PodRef, PodState>,
    /// Pods by address, each list sorted by key (nearly always one pod: a list is far smaller
    /// than a set).
    pods_by_ip: BTreeMap<IpAddr, Vec<PodRef>>,
    identities: FxHashMap<Identity, IdentityState>,
    identities_by_ns: FxHashMap<String, FxHashSet<Identity>>,
    pod_slots: OrderedSlots<Arc<IdentityKey>>,
    cidr_slots: OrderedSlots<IpNetwork>,
    cidr_refs: BTreeMap<IpNetwork, u32>,
    policies: BTreeMap<PolicyKey, PolicyState>,
    policy_slots: OrderedSlots<Arc<PolicyKey>>,
    selections: Vec<Option<Selection>>,
    free_selections: Vec<SelId>,
    sel_by_spec: FxHashMap<Arc<SelectionSpec>, SelId>,
    sel_by_ns: FxHashMap<String, FxHashSet<SelId>>,
    sel_global: FxHashSet<SelId>,
    nodes: Vec<NodeState>,
    node_by_name: FxHashMap<String, NodeIdx>,
    ref_nodes: FxHashMap<Identity, FxHashSet<NodeIdx>>,
    world_nodes: FxHashSet<NodeIdx>,
    journal: Journal,
    /// Endpoint id kept across a pod update: set when the old pod is detached, taken when the
    /// new one is attached.
    reserved_endpoint: Option<(PodKey, u32)>,
    /// The engine's clock: quarantines expire against it (see [`PolicyEngine::expire`]).
    now: SystemTime,
    quarantines: BTreeMap<PolicyKey, QuarantineState>,
    quarantine_slots: OrderedSlots<QuarantineSet>,
    /// Quarantine groups in use (their identity states have kind `Quarantine`).
    quarantine_groups: BTreeSet<Identity>,
    /// Selections quarantines use as exception peers, with use counts.
    quarantine_peer_sels: FxHashMap<SelId, u32>,
    /// Pods in a quarantine group.
    quarantined_pods: BTreeSet<PodRef>,
}

impl PolicyEngine {
    /// An engine with nothing in it.
    pub fn empty(config: EngineConfig) -> PolicyEngine {
        let mut engine = PolicyEngine {
            config,
            namespaces: FxHashMap::default(),
            pods: FxHashMap::default(),
            pods_by_ip: BTreeMap::new(),
            identities: FxHashMap::default(),
            identities_by_ns: FxHashMap::default(),
            pod_slots: pod_identity_slots(),
            cidr_slots: cidr_identity_slots(),
            cidr_refs: BTreeMap::new(),
            policies: BTreeMap::new(),
            policy_slots: policy_slots(),
            selections: Vec::new(),
            free_selections: Vec::new(),
            sel_by_spec: FxHashMap::default(),
            sel_by_ns: FxHashMap::default(),
            sel_global: FxHashSet::default(),
            nodes: Vec::new(),
            node_by_name: FxHashMap::default(),
            ref_nodes: FxHashMap::default(),
            world_nodes: FxHashSet::default(),
            journal: Journal::default(),
            reserved_endpoint: None,
            now: SystemTime::now(),
            quarantines: BTreeMap::new(),
            quarantine_slots: quarantine_group_slots(),
            quarantine_groups: BTreeSet::new(),
            quarantine_peer_sels: FxHashMap::default(),
            quarantined_pods: BTreeSet::new(),
        };
        engine.create_identity(identity::WORLD, IdentityKind::World);
        engine.create_identity(identity::HOST, IdentityKind::Host);
        engine
    }

    /// Full compile of `objects` (later duplicates replace earlier ones), with the clock at
    /// the current time. Every node starts at version 1.
    pub fn new(
        config: EngineConfig,
        objects: impl IntoIterator<Item = Object>,
    ) -> Result<PolicyEngine, EngineError> {
        PolicyEngine::new_at(config, objects, SystemTime::now())
    }

    /// [`PolicyEngine::new`] with the engine's clock at `now`: Quarantines whose `expiresAt`
    /// is not after `now` are inactive.
    pub fn new_at(
        config: EngineConfig,
        objects: impl IntoIterator<Item = Object>,
        now: SystemTime,
    ) -> Result<PolicyEngine, EngineError> {
        let mut engine = PolicyEngine::empty(config);
        engine.now = now;
        let mut pods = Vec::new();
        let mut policies = BTreeMap::new();
        for o in objects {
            match o {
                Object::Namespace(n) => {
                    engine
                        .namespaces
                        .insert(n.name.clone(), namespace_labels(&n));
                }
                Object::Node(n) => {
                    let idx = engine.node_idx(&n.name);
                    engine.nodes[idx as usize].declared = true;
                }
                Object::Pod(p) => pods.push(p),
                Object::Policy(p) => {
                    policies.insert(p.key.clone(), p);
                }
            }
        }
        for p in policies.values() {
            engine
                .policy_slots
                .insert(Arc::new(p.key.clone()), slot_hash(&p.key))?;
            for c in engine.live_cidrs(p) {
                *engine.cidr_refs.entry(c).or_default() += 1;
            }
        }
        let cidrs: Vec<IpNetwork> = engine.cidr_refs.keys().copied().collect();
        for c in cidrs {
            engine.cidr_slots.insert(c, cidr_hash(&c))?;
        }
        let cidr_ids: Vec<(IpNetwork, Identity)> = engine
            .cidr_refs
            .keys()
            .filter_map(|c| engine.cidr_slots.get(c).map(|id| (*c, id)))
            .collect();
        for (c, id) in cidr_ids {
            engine.create_identity(id, IdentityKind::Cidr(c));
        }
        for (key, p) in policies {
            let slot = engine.policy_slots.get(&key).unwrap_or_default();
            if p.quarantine.is_some() {
                engine.add_quarantine(p, slot);
            } else {
                engine.add_policy(p, slot);
            }
        }
        // Pods: identities first (in sorted key order, which the ordered slots do not need but
        // which keeps the build reproducible), then placement.
        // Later duplicates replace earlier ones: reversed, the stable sort puts the last
        // occurrence of a key first, and dedup keeps the first of each run.
        pods.reverse();
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        pods.dedup_by(|b, a| a.namespace == b.namespace && a.name == b.name);
        engine.pods.reserve(pods.len());
        // Pods with addresses, in key order: the order endpoints are numbered in.
        let mut with_ips: Vec<PodRef> = Vec::with_capacity(pods.len());
        for mut pod in pods {
            if pod.host_network {
                continue;
            }
            let key = engine.identity_key(&pod);
            let labels_in_key = strip_labels(&mut pod, &key);
            let id = engine.acquire_pod_identity(key)?;
            let node = match &pod.node_name {
                Some(name) => engine.node_idx(name),
                None => {
                    let name = engine.config.unscheduled_node.clone();
                    engine.node_idx(&name)
                }
            };
            let pk: PodRef = Arc::new(pod.key());
            engine.nodes[node as usize].pods += 1;
            if let Some(st) = engine.identities.get_mut(&id) {
                st.pods.insert(pk.clone());
            }
            if !pod.ips.is_empty() {
                for ip in &pod.ips {
                    sorted_insert(engine.pods_by_ip.entry(*ip).or_default(), &pk);
                }
                with_ips.push(pk.clone());
            }
            engine.pods.insert(
                pk,
                PodState {
                    pod,
                    labels_in_key,
                    identity: id,
                    node,
                    endpoint: None,
                    quarantine: None,
                },
            );
        }
        // Quarantined pods join their quarantine groups (before endpoints are numbered).
        if !engine.quarantines.is_empty() {
            let mut keys: Vec<PodRef> = engine.pods.keys().cloned().collect();
            keys.sort();
            for pk in keys {
                engine.requarantine_pod(&pk)?;
            }
        }
        // Every identity's policy, computed on all cores (each reads the engine only).
        let ids: Vec<Identity> = engine.identities.keys().copied().collect();
        for (id, policy) in engine.compute_policies(&ids) {
            engine.install_policy(id, policy);
        }
        // Endpoints, in pod order per node.
        for pk in with_ips {
            engine.assign_endpoint(&pk);
        }
        let locals: Vec<(NodeIdx, Identity)> = engine
            .identities
            .iter()
            .flat_map(|(id, s)| s.endpoints.keys().map(move |n| (*n, *id)))
            .collect();
        for (n, id) in locals {
            engine.update_contribution(n, id);
        }
        for n in &mut engine.nodes {
            n.version = 1;
        }
        Ok(engine)
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Names of the nodes that currently have a rule set, sorted.
    pub fn nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.exists())
            .map(|n| n.name.clone())
            .collect();
        v.sort();
        v
    }

    pub fn version(&self, node: &str) -> Option<u64> {
        self.node_by_name
            .get(node)
            .map(|i| &self.nodes[*i as usize])
            .filter(|n| n.exists())
            .map(|n| n.version)
    }

    /// Number of identities in use (pod and CIDR identities, not the reserved ones).
    pub fn identity_count(&self) -> usize {
        self.pod_slots.len() + self.cidr_slots.len()
    }

    /// The identity of a pod, if the pod is known.
    pub fn identity_of_pod(&self, pod: &PodKey) -> Option<Identity> {
        self.pods.get(pod).map(|p| p.identity)
    }

    /// The node a pod is placed on.
    pub fn node_of_pod(&self, pod: &PodKey) -> Option<&str> {
        self.pods
            .get(pod)
            .map(|p| self.nodes[p.node as usize].name.as_str())
    }

    /// A pod as the engine has it (the last version applied).
    pub fn pod(&self, pod: &PodKey) -> Option<Pod> {
        self.pods.get(pod).map(|p| self.full_pod(p))
    }

    /// The labels a pod's state stands for: its own, or its identity's when they are the same
    /// (then the state does not keep a copy).
    fn pod_labels<'a>(&'a self, st: &'a PodState) -> &'a Labels {
        if st.labels_in_key
            && let Some(IdentityKind::Pod(key)) = self.identities.get(&st.identity).map(|s| &s.kind)
        {
            return &key.labels;
        }
        &st.pod.labels
    }

    fn full_pod(&self, st: &PodState) -> Pod {
        let mut pod = st.pod.clone();
        if st.labels_in_key {
            pod.labels = self.pod_labels(st).clone();
        }
        pod
    }

    fn same_pod(&self, st: &PodState, pod: &Pod) -> bool {
        // Destructured so that a new field cannot be forgotten here.
        let Pod {
            namespace,
            name,
            labels: _,
            service_account,
            node_name,
            ips,
            synthetic_ips,
            ports,
            workload,
            host_network,
        } = &st.pod;
        *namespace == pod.namespace
            && *name == pod.name
            && *service_account == pod.service_account
            && *node_name == pod.node_name
            && *ips == pod.ips
            && *synthetic_ips == pod.synthetic_ips
            && *ports == pod.ports
            && *workload == pod.workload
            && *host_network == pod.host_network
            && *self.pod_labels(st) == pod.labels
    }

    /// Every pod, sorted by namespace and name.
    pub fn pod_keys(&self) -> Vec<PodKey> {
        let mut v: Vec<PodKey> = self.pods.keys().map(|k| PodKey::clone(k)).collect();
        v.sort();
        v
    }

    /// The policy an identity's direction compiles to (what every endpoint of it gets).
    pub fn identity_policy(&self, id: Identity, direction: Direction) -> Option<&DirectionPolicy> {
        self.identities
            .get(&id)
            .map(|s| s.policy.direction(direction))
    }

    /// Identity key of a pod identity.
    pub fn identity_key(&self, pod: &Pod) -> IdentityKey {
        let mut named_ports: Vec<(String, Protocol, u16)> = pod
            .ports
            .iter()
            .filter_map(|p| p.name.clone().map(|n| (n, p.protocol, p.port)))
            .collect();
        named_ports.sort();
        named_ports.dedup();
        let cidr_class = if pod.synthetic_ips {
            Vec::new()
        } else {
            self.cidr_refs
                .keys()
                .filter(|c| pod.ips.iter().any(|ip| c.contains(*ip)))
                .copied()
                .collect()
        };
        IdentityKey {
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
            labels: self.config.label_filter.apply(&pod.labels),
            named_ports,
            cidr_class,
        }
    }

    /// What a rule id stands for.
    pub fn rule_ref(&self, rule: RuleId) -> Option<RuleRef> {
        let key = self.policy_slots.key_of(rule >> 10)?;
        let direction = if (rule >> 9) & 1 == 1 {
            Direction::Egress
        } else {
            Direction::Ingress
        };
        let index = match rule & 0x1ff {
            0 => None,
            i => Some(i - 1),
        };
        Some(RuleRef {
            kind: key.kind.clone(),
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            direction,
            index,
        })
    }

    /// The current rule set of `node`.
    pub fn ruleset(&self, node: &str) -> Result<RuleSet, EngineError> {
        let idx = *self
            .node_by_name
            .get(node)
            .ok_or_else(|| EngineError::UnknownNode(node.to_string()))?;
        let n = &self.nodes[idx as usize];
        if !n.exists() {
            return Err(EngineError::UnknownNode(node.to_string()));
        }
        let endpoints = n
            .endpoints
            .iter()
            .filter_map(|(id, pk)| self.endpoint(*id, pk))
            .collect();
        let mut cache: BTreeMap<IpNetwork, Identity> = BTreeMap::new();
        for c in self.cidr_refs.keys() {
            if let Some(id) = self.cidr_slots.get(c) {
                cache.insert(*c, id);
            }
        }
        let pod_entries = self.pod_entries(idx);
        let mut ipcache: Vec<IpCacheEntry> = Vec::with_capacity(pod_entries.len() + cache.len());
        // Merge two sorted lists; a pod address wins over a CIDR identity of the same prefix.
        let mut cidrs = cache.into_iter().peekable();
        for (net, (id, group)) in &pod_entries {
            while let Some((c, cid)) = cidrs.peek() {
                if c < net {
                    ipcache.push(IpCacheEntry::new(*c, *cid));
                    cidrs.next();
                } else {
                    if c == net {
                        cidrs.next();
                    }
                    break;
                }
            }
            ipcache.push(IpCacheEntry {
                cidr: *net,
                identity: *id,
                quarantined: group.is_some(),
                quarantine_allow: group.map(|g| self.allow_of(g).to_vec()).unwrap_or_default(),
            });
        }
        ipcache.extend(cidrs.map(|(cidr, identity)| IpCacheEntry::new(cidr, identity)));
        let rules = n
            .rule_refs
            .keys()
            .filter_map(|r| self.rule_ref(*r).map(|rr| (*r, rr)))
            .collect();
        // One group per identity with endpoints here (those are the node's contributions).
        let policies = n
            .contrib
            .keys()
            .filter_map(|id| {
                self.identities
                    .get(id)
                    .map(|s| (*id, EndpointPolicy::clone(&s.policy)))
            })
            .collect();
        Ok(RuleSet {
            node: n.name.clone(),
            version: n.version,
            endpoints,
            policies,
            ipcache,
            rules,
        })
    }

    /// Rule sets of every node.
    /// Rule sets of every node, built on all available cores (each node's is independent).
    pub fn rulesets(&self) -> BTreeMap<String, RuleSet> {
        let nodes = self.nodes();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(nodes.len() / 64 + 1);
        let build = |names: &[String]| -> Vec<(String, RuleSet)> {
            names
                .iter()
                .filter_map(|n| self.ruleset(n).ok().map(|r| (n.clone(), r)))
                .collect()
        };
        if threads <= 1 {
            return build(&nodes).into_iter().collect();
        }
        let chunk = nodes.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let workers: Vec<_> = nodes
                .chunks(chunk)
                .map(|names| scope.spawn(move || build(names)))
                .collect();
            workers
                .into_iter()
                // A worker only panics if `ruleset` does, which it does not: re-raise if so.
                .flat_map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        })
    }

    fn endpoint(&self, id: u32, pk: &PodKey) -> Option<Endpoint> {
        let st = self.pods.get(pk)?;
        Some(Endpoint {
            id,
            namespace: pk.namespace.clone(),
            pod: pk.name.clone(),
            workload: st.pod.workload.clone(),
            identity: st.identity,
            ips: st.pod.ips.clone(),
            interface: None,
            quarantined: st.quarantine.is_some(),
            policy: group_of(st.group()),
        })
    }

    // -----------------------------------------------------------------------------------------
    // Incremental changes.

    /// Applies one change and returns the deltas of the nodes whose rule set changed.
    pub fn apply(&mut self, change: Change) -> Result<Vec<NodeDelta>, EngineError> {
        self.apply_batch(std::iter::once(change))
    }

    /// Applies several changes as one step: one delta (and one new version) per changed node.
    pub fn apply_batch(
        &mut self,
        changes: impl IntoIterator<Item = Change>,
    ) -> Result<Vec<NodeDelta>, EngineError> {
        self.journaled(|e| {
            for change in changes {
                e.apply_one(change)?;
            }
            Ok(())
        })
    }

    /// Runs `f` with the journal on, then brings policies and node bookkeeping up to date and
    /// returns one delta per changed node.
    fn journaled(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<(), EngineError>,
    ) -> Result<Vec<NodeDelta>, EngineError> {
        self.journal = Journal {
            active: true,
            ..Journal::default()
        };
        let result = f(self);
        let dirty: Vec<Identity> = self.journal.dirty.drain().collect();
        for id in dirty {
            self.refresh_policy(id);
        }
        let flags: Vec<(NodeIdx, Identity)> = self.journal.flags.drain().collect();
        for (n, id) in flags {
            self.update_contribution(n, id);
        }
        let deltas = self.build_deltas();
        self.journal = Journal::default();
        result.map(|_| deltas)
    }

    fn apply_one(&mut self, change: Change) -> Result<(), EngineError> {
        tracing::trace!(?change, "policy engine change");
        match change {
            Change::UpsertNamespace(ns) => {
                let labels = namespace_labels(&ns);
                self.set_namespace_labels(&ns.name, labels);
            }
            Change::DeleteNamespace(name) => {
                let labels = namespace_labels(&Namespace {
                    name: name.clone(),
                    labels: Labels::new(),
                });
                self.set_namespace_labels(&name, labels);
            }
            Change::UpsertPod(pod) => {
                let pk = pod.key();
                if self.pods.get(&pk).is_some_and(|s| self.same_pod(s, &pod)) {
                    return Ok(());
                }
                self.remove_pod(&pk, Some(&pod))?;
                if !pod.host_network {
                    self.insert_pod(pod)?;
                }
            }
            Change::DeletePod(pk) => self.remove_pod(&pk, None)?,
            Change::UpsertNode(node) => {
                let idx = self.node_idx(&node.name);
                self.note_node(idx);
                self.nodes[idx as usize].declared = true;
            }
            Change::DeleteNode(name) => {
                if let Some(idx) = self.node_by_name.get(&name).copied() {
                    self.note_node(idx);
                    self.nodes[idx as usize].declared = false;
                }
            }
            Change::UpsertPolicy(policy) => self.upsert_policy(policy)?,
            Change::DeletePolicy(key) => self.delete_policy(&key)?,
        }
        Ok(())
    }
}

/// The policy group of an identity's endpoints: every endpoint of an identity has the same
/// policy, so the group is numbered after the identity. A quarantine group's "identity" is its
/// number already.
fn group_of(identity: Identity) -> PolicyGroupId {
    identity
}

/// Whether a selection matches every pod identity, whatever the inventory. A quarantine
/// exception with it would list every pod identity; its allow list is `[identity::ANY]` instead.
/// That is coarser (the prefilter then lets the world through too), which is fine for an early
/// drop: the quarantined endpoint's own node still enforces the exact exceptions.
fn admits_every_pod(spec: &SelectionSpec) -> bool {
    match spec {
        SelectionSpec::Pods(PodSelection {
            namespaces: NamespaceScope::Selected(ns),
            pods,
            service_account: None,
        }) => ns.is_everything() && pods.is_everything(),
        SelectionSpec::Cluster | SelectionSpec::AllPods => true,
        _ => false,
    }
}

/// Sorts entries and drops those equal to an earlier one but for the rule id: they decide
/// alike, and resolve() would blame the lowest rule id, so keeping only that one changes no
/// decision.
fn dedup_entries(entries: &mut Vec<PolicyEntry>) {
    entries.sort_unstable();
    entries.dedup_by(|later, first| {
        later.peer == first.peer
            && later.protocol == first.protocol
            && later.ports == first.ports
            && later.tier == first.tier
            && later.priority == first.priority
            && later.action == first.action
            && later.audit == first.audit
    });
}

/// Drops the pod's labels when its identity key keeps all of them; returns whether it did.
fn strip_labels(pod: &mut Pod, key: &IdentityKey) -> bool {
    let same = key.labels == pod.labels;
    if same {
        pod.labels = Labels::new();
    }
    same
}

fn sorted_insert(list: &mut Vec<PodRef>, pk: &PodRef) {
    if let Err(i) = list.binary_search_by(|k| (**k).cmp(pk)) {
        list.insert(i, pk.clone());
    }
}

/// Calls `f(x, false)` for each `x` only in `old` and `f(x, true)` for each only in `new`; both
/// sorted and duplicate-free.
fn for_each_diff<T: Ord + Copy>(old: &[T], new: &[T], mut f: impl FnMut(T, bool)) {
    let (mut i, mut k) = (0, 0);
    loop {
        match (old.get(i), new.get(k)) {
            (Some(a), Some(b)) if a == b => {
                i += 1;
                k += 1;
            }
            (Some(a), Some(b)) if a < b => {
                f(*a, false);
                i += 1;
            }
            (Some(_), Some(b)) => {
                f(*b, true);
                k += 1;
            }
            (Some(a), None) => {
                f(*a, false);
                i += 1;
            }
            (None, Some(b)) => {
                f(*b, true);
                k += 1;
            }
            (None, None) => break,
        }
    }
}

fn host_net(ip: IpAddr) -> IpNetwork {
    let prefix = if ip.is_ipv4() { 32 } else { 128 };
    // A host prefix is always valid for its family.
    IpNetwork::new(ip, prefix).unwrap_or_else(|_| IpNetwork::from(ip))
}

fn is_within(inner: &IpNetwork, outer: &IpNetwork) -> bool {
    inner.is_ipv4() == outer.is_ipv4()
        && inner.prefix() >= outer.prefix()
        && outer.contains(inner.network())
}

/// FNV of `"{kind:?}\0{namespace}\0{name}"`, written piece by piece (no formatting).
fn slot_hash(key: &PolicyKey) -> u64 {
    use crate::ruleset::RuleKind;
    let kind = match key.kind {
        RuleKind::NetworkPolicy => "NetworkPolicy",
        RuleKind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
        RuleKind::ServicePolicy => "ServicePolicy",
        RuleKind::Quarantine => "Quarantine",
        RuleKind::Default => "Default",
    };
    let mut h = crate::identity::Fnv::default();
    for part in [kind, "\0", &key.namespace, "\0", &key.name] {
        h.write(part.as_bytes());
    }
    h.finish()
}

fn namespace_labels(ns: &Namespace) -> Labels {
    let mut labels = ns.labels.clone();
    labels.insert(NAMESPACE_NAME_LABEL.to_string(), ns.name.clone());
    labels
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ruleset::RuleKind;

    /// Rule ids derive from this hash: it must stay what it was when it was a formatted string.
    #[test]
    fn slot_hash_is_the_hash_of_the_formatted_key() {
        for kind in [
            RuleKind::NetworkPolicy,
            RuleKind::ClusterNetworkPolicy,
            RuleKind::ServicePolicy,
            RuleKind::Quarantine,
            RuleKind::Default,
        ] {
            let key = PolicyKey {
                kind: kind.clone(),
                namespace: "team-a".into(),
                name: "allow-web".into(),
            };
            let formatted = format!("{:?}\0{}\0{}", kind, key.namespace, key.name);
            assert_eq!(
                slot_hash(&key),
                crate::identity::Fnv::hash_str(&formatted),
                "{kind:?}"
            );
        }
    }
}
