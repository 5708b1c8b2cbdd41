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

    fn set_namespace_labels(&mut self, ns: &str, labels: Labels) {
        if self.namespaces.get(ns) == Some(&labels) {
            return;
        }
        self.namespaces.insert(ns.to_string(), labels);
        let ids: Vec<Identity> = self
            .identities_by_ns
            .get(ns)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let sels: Vec<SelId> = self
            .sel_global
            .iter()
            .copied()
            .filter(|s| {
                matches!(
                    *self.sel(*s).spec,
                    SelectionSpec::Pods(PodSelection {
                        namespaces: NamespaceScope::Selected(_),
                        ..
                    })
                )
            })
            .collect();
        for s in sels {
            for id in &ids {
                let on = self.spec_matches(&self.sel(s).spec, *id);
                self.set_member(s, *id, on);
            }
        }
    }

    fn note_node(&mut self, idx: NodeIdx) {
        if self.journal.active {
            let existed = self.nodes[idx as usize].exists();
            self.journal.node_existed.entry(idx).or_insert(existed);
        }
    }

    /// Records a pod's state before the change, and marks its old addresses for re-checking on
    /// every node that may hold them.
    fn touch_pod(&mut self, pk: &PodKey) {
        if !self.journal.active || self.journal.pods.contains_key(pk) {
            return;
        }
        let snap = self.pods.get(pk).map(|s| PodSnap {
            identity: s.identity,
            node: s.node,
            ips: s.pod.ips.clone(),
            endpoint: s.endpoint,
            workload: s.pod.workload.clone(),
            quarantine: s.quarantine,
        });
        if let Some(s) = &snap
            && !s.ips.is_empty()
        {
            let mut nodes: Vec<NodeIdx> = vec![s.node];
            if s.quarantine.is_some() {
                // Every node carries a quarantined pod's addresses.
                nodes.extend(0..self.nodes.len() as NodeIdx);
            }
            if let Some(r) = self.ref_nodes.get(&s.identity) {
                nodes.extend(r.iter().copied());
            }
            nodes.extend(self.world_nodes.iter().copied());
            for n in nodes {
                self.journal
                    .ip_checks
                    .extend(s.ips.iter().map(|ip| (n, *ip)));
            }
        }
        self.journal.pods.insert(pk.clone(), snap);
    }

    fn remove_pod(&mut self, pk: &PodKey, replacement: Option<&Pod>) -> Result<(), EngineError> {
        let Some(old) = self.pods.get(pk) else {
            return Ok(());
        };
        if let Some(new) = replacement
            && self.same_pod(old, new)
        {
            return Ok(());
        }
        // Keep the endpoint id when the pod stays an endpoint on the same node.
        let keep = replacement.is_some_and(|p| {
            !p.host_network && !p.ips.is_empty() && self.node_idx_of(p) == Some(old.node)
        });
        self.detach_pod(pk, keep);
        Ok(())
    }

    fn detach_pod(&mut self, pk: &PodKey, keep_endpoint: bool) {
        self.touch_pod(pk);
        let Some(st) = self.pods.remove(pk) else {
            return;
        };
        self.note_node(st.node);
        self.nodes[st.node as usize].pods -= 1;
        if let Some(ep) = st.endpoint {
            if keep_endpoint {
                self.reserved_endpoint = Some((pk.clone(), ep));
            }
            self.nodes[st.node as usize].endpoints.remove(&ep);
            self.detach_endpoint(st.node, st.group(), ep);
        }
        if let Some(group) = st.quarantine {
            self.quarantined_pods.remove(pk);
            self.leave_quarantine_group(group, pk);
        }
        for ip in &st.pod.ips {
            if let Some(set) = self.pods_by_ip.get_mut(ip) {
                set.retain(|k| **k != *pk);
                if set.is_empty() {
                    self.pods_by_ip.remove(ip);
                }
            }
        }
        let empty = match self.identities.get_mut(&st.identity) {
            Some(s) => {
                s.pods.remove(pk);
                s.pods.is_empty()
            }
            None => false,
        };
        if empty {
            self.release_pod_identity(st.identity);
        }
    }

    fn insert_pod(&mut self, mut pod: Pod) -> Result<(), EngineError> {
        let pk: PodRef = Arc::new(pod.key());
        self.touch_pod(&pk);
        let key = self.identity_key(&pod);
        let labels_in_key = strip_labels(&mut pod, &key);
        let id = self.acquire_pod_identity(key)?;
        let node_name = pod
            .node_name
            .clone()
            .unwrap_or_else(|| self.config.unscheduled_node.clone());
        let node = self.node_idx(&node_name);
        self.note_node(node);
        self.nodes[node as usize].pods += 1;
        if let Some(s) = self.identities.get_mut(&id) {
            s.pods.insert(pk.clone());
        }
        for ip in &pod.ips {
            sorted_insert(self.pods_by_ip.entry(*ip).or_default(), &pk);
        }
        let has_ips = !pod.ips.is_empty();
        self.pods.insert(
            pk.clone(),
            PodState {
                pod,
                labels_in_key,
                identity: id,
                node,
                endpoint: None,
                quarantine: None,
            },
        );
        if !self.quarantines.is_empty() {
            self.requarantine_pod(&pk)?;
        }
        if has_ips {
            self.assign_endpoint(&pk);
        }
        self.reserved_endpoint = None;
        Ok(())
    }

    fn node_idx_of(&self, pod: &Pod) -> Option<NodeIdx> {
        let name = pod
            .node_name
            .as_deref()
            .unwrap_or(&self.config.unscheduled_node);
        self.node_by_name.get(name).copied()
    }

    fn node_idx(&mut self, name: &str) -> NodeIdx {
        if let Some(i) = self.node_by_name.get(name) {
            return *i;
        }
        let idx = self.nodes.len() as NodeIdx;
        self.nodes.push(NodeState {
            name: name.to_string(),
            ..NodeState::default()
        });
        self.node_by_name.insert(name.to_string(), idx);
        if self.journal.active {
            self.journal.node_existed.insert(idx, false);
        }
        idx
    }

    /// Gives a pod with addresses an endpoint id on its node.
    fn assign_endpoint(&mut self, pk: &PodRef) {
        let Some(st) = self.pods.get(pk) else {
            return;
        };
        let (node, identity) = (st.node, st.group());
        let n = &mut self.nodes[node as usize];
        let reserved = self
            .reserved_endpoint
            .take()
            .filter(|(k, ep)| *k == **pk && !n.endpoints.contains_key(ep))
            .map(|(_, ep)| ep);
        let id = reserved.or_else(|| {
            // Without gaps the next id is simply one past the last.
            let len = n.endpoints.len() as u32;
            if n.endpoints.keys().next_back().copied().unwrap_or(0) == len {
                return (len + 1 < MAX_ENDPOINT_ID).then_some(len + 1);
            }
            let mut next = 1;
            for k in n.endpoints.keys() {
                if *k != next {
                    break;
                }
                next += 1;
            }
            (next < MAX_ENDPOINT_ID).then_some(next)
        });
        let Some(id) = id else {
            tracing::error!(
                node = %n.name,
                pod = %pk,
                "node has {} endpoints, the most a node can have: the pod gets no policy enforcement",
                MAX_ENDPOINT_ID - 1
            );
            return;
        };
        n.endpoints.insert(id, pk.clone());
        if let Some(st) = self.pods.get_mut(pk) {
            st.endpoint = Some(id);
        }
        if let Some(s) = self.identities.get_mut(&identity) {
            s.endpoints.entry(node).or_default().insert(id);
        }
        if self.journal.active {
            self.journal.flags.insert((node, identity));
        }
    }

    fn detach_endpoint(&mut self, node: NodeIdx, identity: Identity, ep: u32) {
        if let Some(s) = self.identities.get_mut(&identity)
            && let Some(set) = s.endpoints.get_mut(&node)
        {
            set.remove(&ep);
            if set.is_empty() {
                s.endpoints.remove(&node);
            }
        }
        if self.journal.active {
            self.journal.flags.insert((node, identity));
        }
    }

    fn upsert_policy(&mut self, policy: Policy) -> Result<(), EngineError> {
        if policy.quarantine.is_some() || self.quarantines.contains_key(&policy.key) {
            return self.upsert_quarantine(policy);
        }
        if self
            .policies
            .get(&policy.key)
            .is_some_and(|s| s.policy == policy)
        {
            return Ok(());
        }
        let key = policy.key.clone();
        let new_cidrs: Vec<IpNetwork> = policy.cidrs().collect();
        let old_cidrs: Vec<IpNetwork> = match self.policies.get(&key) {
            Some(s) => s.policy.cidrs().collect(),
            None => Vec::new(),
        };
        let slot = match self.policies.get(&key) {
            Some(s) => s.slot,
            None => {
                let (slot, moves) = self
                    .policy_slots
                    .insert(Arc::new(key.clone()), slot_hash(&key))?;
                self.move_policies(moves);
                slot
            }
        };
        self.remove_policy_contributions(&key);
        self.adjust_cidrs(&old_cidrs, &new_cidrs)?;
        self.add_policy(policy, slot);
        Ok(())
    }

    fn delete_policy(&mut self, key: &PolicyKey) -> Result<(), EngineError> {
        if self.quarantines.contains_key(key) {
            return self.delete_quarantine(key);
        }
        let Some(st) = self.policies.get(key) else {
            return Ok(());
        };
        let old_cidrs: Vec<IpNetwork> = st.policy.cidrs().collect();
        let slot = st.slot;
        self.remove_policy_contributions(key);
        self.policies.remove(key);
        self.note_renamed_slot(slot);
        let moves = self.policy_slots.remove(key);
        self.move_policies(moves);
        self.adjust_cidrs(&old_cidrs, &[])?;
        Ok(())
    }

    fn note_renamed_slot(&mut self, slot: u32) {
        if !self.journal.active {
            return;
        }
        for d in Direction::ALL {
            for i in 0..=crate::load::MAX_RULES_PER_DIRECTION as u32 {
                let idx = if i == 0 { None } else { Some(i - 1) };
                self.journal.renamed_rules.insert(rule_id(slot, d, idx));
            }
        }
    }

    /// Policies renumbered by a slot collision: re-add them under their new rule ids.
    fn move_policies(&mut self, moves: Vec<Move<Arc<PolicyKey>>>) {
        for m in moves {
            self.note_renamed_slot(m.from);
            self.note_renamed_slot(m.to);
            if let Some(policy) = self.policies.get(&*m.key).map(|s| s.policy.clone()) {
                self.remove_policy_contributions(&m.key);
                self.add_policy(policy, m.to);
            }
            if let Some(q) = self.quarantines.remove(&*m.key) {
                self.release_quarantine_shapes(&q);
                self.add_quarantine(q.policy, m.to);
                self.dirty_quarantine_groups();
            }
        }
    }

    fn adjust_cidrs(&mut self, old: &[IpNetwork], new: &[IpNetwork]) -> Result<(), EngineError> {
        let mut gone = Vec::new();
        let mut added = Vec::new();
        for c in new {
            let r = self.cidr_refs.entry(*c).or_default();
            *r += 1;
            if *r == 1 {
                added.push(*c);
            }
        }
        for c in old {
            if let Some(r) = self.cidr_refs.get_mut(c) {
                *r -= 1;
                if *r == 0 {
                    self.cidr_refs.remove(c);
                    gone.push(*c);
                }
            }
        }
        for c in &added {
            if self.journal.active {
                let before = self.cidr_slots.get(c);
                self.journal.cidr_old.entry(*c).or_insert(before);
            }
            let (id, moves) = self.cidr_slots.insert(*c, cidr_hash(c))?;
            self.move_cidr_identities(moves);
            self.create_identity(id, IdentityKind::Cidr(*c));
        }
        for c in &gone {
            if let Some(id) = self.cidr_slots.get(c) {
                if self.journal.active {
                    self.journal.cidr_old.entry(*c).or_insert(Some(id));
                }
                self.destroy_identity(id);
                let moves = self.cidr_slots.remove(c);
                self.move_cidr_identities(moves);
            }
        }
        // Pods inside a CIDR that appeared or disappeared change CIDR class.
        let mut rekey: BTreeSet<PodRef> = BTreeSet::new();
        for c in added.iter().chain(gone.iter()) {
            for (ip, pods) in self.pods_by_ip.range(c.network()..=c.broadcast()) {
                if c.contains(*ip) {
                    rekey.extend(pods.iter().cloned());
                }
            }
        }
        for pk in rekey {
            if let Some(st) = self.pods.get(&pk) {
                let pod = self.full_pod(st);
                if self.identity_key(&pod) != *self.pod_identity_key(st.identity) {
                    let keep = st.endpoint.is_some();
                    self.detach_pod(&pk, keep);
                    self.insert_pod(pod)?;
                }
            }
        }
        Ok(())
    }

    fn pod_identity_key(&self, id: Identity) -> Arc<IdentityKey> {
        match self.identities.get(&id).map(|s| &s.kind) {
            Some(IdentityKind::Pod(k)) => k.clone(),
            _ => Arc::new(IdentityKey {
                namespace: String::new(),
                service_account: String::new(),
                labels: BTreeMap::new(),
                named_ports: Vec::new(),
                cidr_class: Vec::new(),
            }),
        }
    }

    fn move_cidr_identities(&mut self, moves: Vec<Move<IpNetwork>>) {
        let mut taken = Vec::new();
        for m in &moves {
            if self.journal.active {
                self.journal.cidr_old.entry(m.key).or_insert(Some(m.from));
            }
            taken.push(self.destroy_identity(m.from));
        }
        for m in moves {
            self.create_identity(m.to, IdentityKind::Cidr(m.key));
        }
        drop(taken);
    }

    // -----------------------------------------------------------------------------------------
    // Identities.

    fn acquire_pod_identity(&mut self, key: IdentityKey) -> Result<Identity, EngineError> {
        if let Some(id) = self.pod_slots.get(&key) {
            return Ok(id);
        }
        let hash = key.home_hash();
        let key = Arc::new(key);
        let (id, moves) = self.pod_slots.insert(key.clone(), hash)?;
        self.move_pod_identities(moves);
        self.create_identity(id, IdentityKind::Pod(key));
        Ok(id)
    }

    fn release_pod_identity(&mut self, id: Identity) {
        let Some(state) = self.destroy_identity(id) else {
            return;
        };
        if let IdentityKind::Pod(key) = &state.kind {
            let moves = self.pod_slots.remove(key);
            self.move_pod_identities(moves);
        }
    }

    /// Identities renumbered by a collision: their pods and endpoints move to the new number.
    fn move_pod_identities(&mut self, moves: Vec<Move<Arc<IdentityKey>>>) {
        let mut taken = Vec::new();
        for m in moves {
            if let Some(state) = self.destroy_identity(m.from) {
                taken.push((m, state));
            }
        }
        for (m, old) in taken {
            self.create_identity(m.to, old.kind.clone());
            for pk in &old.pods {
                self.touch_pod(pk);
                let Some(st) = self.pods.get_mut(pk) else {
                    continue;
                };
                st.identity = m.to;
                let (node, ep) = (st.node, st.endpoint);
                // A quarantined pod's endpoint stays in its quarantine group.
                let ep = ep.filter(|_| st.quarantine.is_none());
                if let Some(s) = self.identities.get_mut(&m.to) {
                    s.pods.insert(pk.clone());
                    if let Some(ep) = ep {
                        s.endpoints.entry(node).or_default().insert(ep);
                    }
                }
                if ep.is_some() && self.journal.active {
                    self.journal.flags.insert((node, m.from));
                    self.journal.flags.insert((node, m.to));
                }
            }
        }
    }

    fn create_identity(&mut self, id: Identity, kind: IdentityKind) {
        let ns = match &kind {
            IdentityKind::Pod(k) => Some(k.namespace.clone()),
            _ => None,
        };
        self.identities.insert(
            id,
            IdentityState {
                kind,
                pods: FxHashSet::default(),
                member_of: FxHashSet::default(),
                policy: Arc::default(),
                contribution: Arc::new(Contribution::default()),
                endpoints: FxHashMap::default(),
                quarantine_allow: Arc::default(),
            },
        );
        let mut candidates: Vec<SelId> = self.sel_global.iter().copied().collect();
        if let Some(ns) = &ns {
            self.identities_by_ns
                .entry(ns.clone())
                .or_default()
                .insert(id);
            if let Some(s) = self.sel_by_ns.get(ns) {
                candidates.extend(s.iter().copied());
            }
        }
        for s in candidates {
            if self.spec_matches(&self.sel(s).spec, id) {
                self.set_member(s, id, true);
            }
        }
        if self.journal.active {
            self.journal.dirty.insert(id);
        }
    }

    fn destroy_identity(&mut self, id: Identity) -> Option<IdentityState> {
        let member_of: Vec<SelId> = self
            .identities
            .get(&id)?
            .member_of
            .iter()
            .copied()
            .collect();
        for s in member_of {
            self.set_member(s, id, false);
        }
        let state = self.identities.remove(&id)?;
        if self.journal.active {
            self.journal
                .old_policy
                .entry(id)
                .or_insert_with(|| state.policy.clone());
            if matches!(state.kind, IdentityKind::Quarantine(_)) {
                self.journal
                    .allow_old
                    .entry(id)
                    .or_insert_with(|| state.quarantine_allow.clone());
            }
        }
        if let IdentityKind::Pod(k) = &state.kind
            && let Some(set) = self.identities_by_ns.get_mut(&k.namespace)
        {
            set.remove(&id);
            if set.is_empty() {
                self.identities_by_ns.remove(&k.namespace);
            }
        }
        Some(state)
    }

    // -----------------------------------------------------------------------------------------
    // Selections.

    fn sel(&self, id: SelId) -> &Selection {
        match self.selections.get(id as usize) {
            Some(Some(s)) => s,
            _ => unreachable!("selection ids are only held while the selection exists"),
        }
    }

    fn sel_mut(&mut self, id: SelId) -> &mut Selection {
        match self.selections.get_mut(id as usize) {
            Some(Some(s)) => s,
            _ => unreachable!("selection ids are only held while the selection exists"),
        }
    }

    fn ns_labels(&self, ns: &str) -> std::borrow::Cow<'_, Labels> {
        match self.namespaces.get(ns) {
            Some(l) => std::borrow::Cow::Borrowed(l),
            None => std::borrow::Cow::Owned(
                [(NAMESPACE_NAME_LABEL.to_string(), ns.to_string())]
                    .into_iter()
                    .collect(),
            ),
        }
    }

    fn spec_matches(&self, spec: &SelectionSpec, id: Identity) -> bool {
        let Some(st) = self.identities.get(&id) else {
            return false;
        };
        match (spec, &st.kind) {
            (SelectionSpec::Pods(sel), IdentityKind::Pod(key)) => {
                let ns_ok = match &sel.namespaces {
                    NamespaceScope::Named(n) => *n == key.namespace,
                    NamespaceScope::Selected(s) => s.matches(&self.ns_labels(&key.namespace)),
                };
                ns_ok
                    && sel
                        .service_account
                        .as_ref()
                        .is_none_or(|sa| *sa == key.service_account)
                    && sel.pods.matches(&key.labels)
            }
            (SelectionSpec::Cidr(c), IdentityKind::Pod(key)) => {
                key.cidr_class.contains(&c.cidr)
                    && !c.except.iter().any(|e| key.cidr_class.contains(e))
            }
            (SelectionSpec::Cidr(c), IdentityKind::Cidr(net)) => {
                is_within(net, &c.cidr) && !c.except.iter().any(|e| is_within(net, e))
            }
            (SelectionSpec::World, IdentityKind::World | IdentityKind::Cidr(_)) => true,
            (SelectionSpec::Cluster, IdentityKind::Pod(_) | IdentityKind::Host) => true,
            (SelectionSpec::Host, IdentityKind::Host) => true,
            (SelectionSpec::AllPods, IdentityKind::Pod(_)) => true,
            _ => false,
        }
    }

    fn intern(&mut self, spec: SelectionSpec) -> SelId {
        if let Some(id) = self.sel_by_spec.get(&spec).copied() {
            self.sel_mut(id).refs += 1;
            return id;
        }
        let id = match self.free_selections.pop() {
            Some(id) => id,
            None => {
                self.selections.push(None);
                (self.selections.len() - 1) as SelId
            }
        };
        let candidates: Vec<Identity> = match &spec {
            SelectionSpec::Pods(PodSelection {
                namespaces: NamespaceScope::Named(ns),
                ..
            }) => {
                self.sel_by_ns.entry(ns.clone()).or_default().insert(id);
                self.identities_by_ns
                    .get(ns)
                    .map(|s| s.iter().copied().collect())
                    .unwrap_or_default()
            }
            SelectionSpec::Pods(PodSelection {
                namespaces: NamespaceScope::Selected(nsel),
                ..
            }) => {
                self.sel_global.insert(id);
                self.identities_by_ns
                    .iter()
                    .filter(|(ns, _)| nsel.matches(&self.ns_labels(ns)))
                    .flat_map(|(_, ids)| ids.iter().copied())
                    .collect()
            }
            _ => {
                self.sel_global.insert(id);
                self.identities.keys().copied().collect()
            }
        };
        let matched: FxHashSet<Identity> = candidates
            .into_iter()
            .filter(|c| self.spec_matches(&spec, *c))
            .collect();
        for m in &matched {
            if let Some(st) = self.identities.get_mut(m) {
                st.member_of.insert(id);
            }
        }
        let spec = Arc::new(spec);
        self.sel_by_spec.insert(spec.clone(), id);
        self.selections[id as usize] = Some(Selection {
            spec,
            refs: 1,
            matched,
            subject: None,
            peer_users: FxHashMap::default(),
        });
        id
    }

    fn release(&mut self, id: SelId) {
        let s = self.sel_mut(id);
        s.refs -= 1;
        if s.refs > 0 {
            return;
        }
        let Some(s) = self.selections[id as usize].take() else {
            return;
        };
        for m in &s.matched {
            if let Some(st) = self.identities.get_mut(m) {
                st.member_of.remove(&id);
            }
        }
        self.sel_by_spec.remove(&s.spec);
        match &*s.spec {
            SelectionSpec::Pods(PodSelection {
                namespaces: NamespaceScope::Named(ns),
                ..
            }) => {
                if let Some(set) = self.sel_by_ns.get_mut(ns) {
                    set.remove(&id);
                    if set.is_empty() {
                        self.sel_by_ns.remove(ns);
                    }
                }
            }
            _ => {
                self.sel_global.remove(&id);
            }
        }
        self.free_selections.push(id);
    }

    fn set_member(&mut self, sel: SelId, id: Identity, on: bool) {
        let s = self.sel_mut(sel);
        let changed = if on {
            s.matched.insert(id)
        } else {
            s.matched.remove(&id)
        };
        if !changed {
            return;
        }
        if let Some(st) = self.identities.get_mut(&id) {
            if on {
                st.member_of.insert(sel);
            } else {
                st.member_of.remove(&sel);
            }
        }
        if !self.journal.active {
            return;
        }
        let s = self.sel(sel);
        let mut dirty: Vec<Identity> = Vec::new();
        if s.subject.is_some() {
            dirty.push(id);
        }
        for user in s.peer_users.keys() {
            dirty.extend(self.sel(*user).matched.iter().copied());
        }
        if self.quarantine_peer_sels.contains_key(&sel) {
            dirty.extend(self.quarantine_groups.iter().copied());
        }
        self.journal.dirty.extend(dirty);
    }

    fn add_policy(&mut self, policy: Policy, slot: u32) {
        let subject = self.intern(SelectionSpec::Pods(policy.subject.clone()));
        let mut shapes: Vec<(Direction, Shape, RuleId)> = Vec::new();
        for rule in &policy.rules {
            let id = rule_id(slot, rule.direction, Some(rule.index));
            for peer in &rule.peers {
                for port in &rule.ports {
                    let named = matches!(port, PortSpec::Named { .. });
                    let peer_ref = match peer {
                        Peer::Any if named && rule.direction == Direction::Egress => {
                            PeerRef::Sel(self.intern(SelectionSpec::AllPods))
                        }
                        Peer::Any => PeerRef::Any,
                        Peer::Pods(s) => PeerRef::Sel(self.intern(SelectionSpec::Pods(s.clone()))),
                        Peer::Cidr(c) => PeerRef::Sel(self.intern(SelectionSpec::Cidr(c.clone()))),
                        Peer::World => PeerRef::Sel(self.intern(SelectionSpec::World)),
                        Peer::Cluster => PeerRef::Sel(self.intern(SelectionSpec::Cluster)),
                        Peer::Host => PeerRef::Sel(self.intern(SelectionSpec::Host)),
                    };
                    shapes.push((
                        rule.direction,
                        Shape {
                            peer: peer_ref,
                            port: port.clone(),
                            tier: rule.tier,
                            priority: rule.priority,
                            action: rule.action,
                            audit: rule.audit,
                        },
                        id,
                    ));
                }
            }
        }
        for (direction, shape, id) in shapes {
            if let PeerRef::Sel(p) = shape.peer {
                *self.sel_mut(p).peer_users.entry(subject).or_default() += 1;
            }
            let data = self
                .sel_mut(subject)
                .subject
                .get_or_insert_with(Default::default);
            data.shapes[direction as usize]
                .entry(shape)
                .or_default()
                .insert(id);
        }
        let data = self
            .sel_mut(subject)
            .subject
            .get_or_insert_with(Default::default);
        data.refs += 1;
        for d in Direction::ALL {
            let id = rule_id(slot, d, None);
            match policy.isolation(d) {
                Isolation::None => {}
                Isolation::Enforce => {
                    data.isolation[d as usize].insert(id);
                }
                Isolation::Audit => {
                    data.audit_isolation[d as usize].insert(id);
                }
            }
        }
        self.mark_subject_dirty(subject);
        self.policies.insert(
            policy.key.clone(),
            PolicyState {
                policy,
                slot,
                subject,
            },
        );
    }

    fn remove_policy_contributions(&mut self, key: &PolicyKey) {
        let Some(st) = self.policies.get(key) else {
            return;
        };
        let (subject, slot) = (st.subject, st.slot);
        let policy = st.policy.clone();
        self.mark_subject_dirty(subject);
        let mut releases = Vec::new();
        for rule in &policy.rules {
            let id = rule_id(slot, rule.direction, Some(rule.index));
            for peer in &rule.peers {
                for port in &rule.ports {
                    let named = matches!(port, PortSpec::Named { .. });
                    let spec = match peer {
                        Peer::Any if named && rule.direction == Direction::Egress => {
                            Some(SelectionSpec::AllPods)
                        }
                        Peer::Any => None,
                        Peer::Pods(s) => Some(SelectionSpec::Pods(s.clone())),
                        Peer::Cidr(c) => Some(SelectionSpec::Cidr(c.clone())),
                        Peer::World => Some(SelectionSpec::World),
                        Peer::Cluster => Some(SelectionSpec::Cluster),
                        Peer::Host => Some(SelectionSpec::Host),
                    };
                    let peer_ref = match spec.and_then(|s| self.sel_by_spec.get(&s).copied()) {
                        Some(p) => PeerRef::Sel(p),
                        None => PeerRef::Any,
                    };
                    let shape = Shape {
                        peer: peer_ref,
                        port: port.clone(),
                        tier: rule.tier,
                        priority: rule.priority,
                        action: rule.action,
                        audit: rule.audit,
                    };
                    if let Some(data) = self.sel_mut(subject).subject.as_mut() {
                        let map = &mut data.shapes[rule.direction as usize];
                        if let Some(set) = map.get_mut(&shape) {
                            set.remove(&id);
                            if set.is_empty() {
                                map.remove(&shape);
                            }
                        }
                    }
                    if let PeerRef::Sel(p) = peer_ref {
                        let users = &mut self.sel_mut(p).peer_users;
                        if let Some(c) = users.get_mut(&subject) {
                            *c -= 1;
                            if *c == 0 {
                                users.remove(&subject);
                            }
                        }
                        releases.push(p);
                    }
                }
            }
        }
        for p in releases {
            self.release(p);
        }
        let s = self.sel_mut(subject);
        if let Some(data) = s.subject.as_mut() {
            for d in Direction::ALL {
                let id = rule_id(slot, d, None);
                data.isolation[d as usize].remove(&id);
                data.audit_isolation[d as usize].remove(&id);
            }
            data.refs -= 1;
            if data.refs == 0 {
                s.subject = None;
            }
        }
        self.release(subject);
        // The state itself is dropped or replaced by the caller.
    }

    fn mark_subject_dirty(&mut self, subject: SelId) {
        if self.journal.active {
            let ids: Vec<Identity> = self.sel(subject).matched.iter().copied().collect();
            self.journal.dirty.extend(ids);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Quarantines.
    //
    // A Quarantine applies to pods, not identities: the endpoints of the pods it selects leave
    // their identity's policy group for a quarantine group — one per set of active Quarantines
    // selecting a pod, numbered from FIRST_QUARANTINE_GROUP by the set (like identities, by
    // ordered slots: the numbers depend only on the sets in use). The group holds only the
    // quarantines' entries: nothing below the quarantine tier could decide anyway, since the
    // deny-all matches every packet. Identities never change, so no other endpoint's policy does.

    /// The engine's clock, against which Quarantines expire.
    pub fn now(&self) -> SystemTime {
        self.now
    }

    /// A Quarantine the engine has (active or expired).
    pub fn quarantine(&self, key: &PolicyKey) -> Option<&Policy> {
        self.quarantines.get(key).map(|q| &q.policy)
    }

    /// Whether the Quarantine `key` exists and has not expired at the engine's clock.
    pub fn quarantine_active(&self, key: &PolicyKey) -> bool {
        self.quarantines.get(key).is_some_and(|q| q.active)
    }

    /// The active Quarantines that select `pod`, sorted (empty when it is not quarantined).
    pub fn quarantines_of_pod(&self, pod: &PodKey) -> Vec<PolicyKey> {
        let group = self.pods.get(pod).and_then(|st| st.quarantine);
        match group.and_then(|g| self.identities.get(&g)).map(|s| &s.kind) {
            Some(IdentityKind::Quarantine(set)) => set.to_vec(),
            _ => Vec::new(),
        }
    }

    /// Every quarantined pod, sorted.
    pub fn quarantined_pods(&self) -> Vec<PodKey> {
        self.quarantined_pods
            .iter()
            .map(|pk| PodKey::clone(pk))
            .collect()
    }

    /// The earliest `expiresAt` of an active Quarantine: when [`Self::expire`] next has work.
    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.quarantines
            .values()
            .filter(|q| q.active)
            .filter_map(|q| q.policy.quarantine.as_ref()?.expires_at)
            .min()
    }

    /// Advances the engine's clock to `now` (it never goes back) and deactivates the
    /// Quarantines whose `expiresAt` is not after it, as if they had been deleted; returns the
    /// deltas of the nodes that changed (none, and no version bump, when nothing expired). The
    /// controller calls it periodically — or at [`Self::next_expiry`] — with
    /// `SystemTime::now()`; tests pass any instant.
    pub fn expire(&mut self, now: SystemTime) -> Result<Vec<NodeDelta>, EngineError> {
        let now = self.now.max(now);
        let due = self.quarantines.values().any(|q| {
            q.active
                != q.policy
                    .quarantine
                    .as_ref()
                    .is_some_and(|s| s.active_at(now))
        });
        if !due {
            self.now = now;
            return Ok(Vec::new());
        }
        self.journaled(|e| e.set_clock(now))
    }

    fn set_clock(&mut self, now: SystemTime) -> Result<(), EngineError> {
        self.now = now;
        let mut namespaces = BTreeSet::new();
        let mut cidrs: (Vec<IpNetwork>, Vec<IpNetwork>) = (Vec::new(), Vec::new());
        for (key, q) in self.quarantines.iter_mut() {
            let active = q
                .policy
                .quarantine
                .as_ref()
                .is_some_and(|s| s.active_at(now));
            if active != q.active {
                q.active = active;
                namespaces.insert(key.namespace.clone());
                let list = if active { &mut cidrs.1 } else { &mut cidrs.0 };
                list.extend(q.policy.cidrs());
            }
        }
        self.adjust_cidrs(&cidrs.0, &cidrs.1)?;
        for ns in namespaces {
            self.requarantine_namespace(&ns)?;
        }
        Ok(())
    }

    /// The CIDRs of a policy that have identities: an inactive (expired) Quarantine's have
    /// none, so that it leaves no trace.
    fn live_cidrs(&self, policy: &Policy) -> Vec<IpNetwork> {
        match &policy.quarantine {
            Some(spec) if !spec.active_at(self.now) => Vec::new(),
            _ => policy.cidrs().collect(),
        }
    }

    fn upsert_quarantine(&mut self, policy: Policy) -> Result<(), EngineError> {
        if policy.quarantine.is_none() {
            // The key no longer names a Quarantine.
            self.delete_quarantine(&policy.key)?;
            return self.upsert_policy(policy);
        }
        if self.policies.contains_key(&policy.key) {
            self.delete_policy(&policy.key)?;
        }
        if self
            .quarantines
            .get(&policy.key)
            .is_some_and(|q| q.policy == policy)
        {
            return Ok(());
        }
        let key = policy.key.clone();
        let new_cidrs = self.live_cidrs(&policy);
        let old = self.quarantines.remove(&key);
        let old_cidrs: Vec<IpNetwork> = old
            .as_ref()
            .map(|q| self.live_cidrs(&q.policy))
            .unwrap_or_default();
        let slot = match &old {
            Some(q) => {
                self.release_quarantine_shapes(q);
                q.slot
            }
            None => {
                let (slot, moves) = self
                    .policy_slots
                    .insert(Arc::new(key.clone()), slot_hash(&key))?;
                self.move_policies(moves);
                slot
            }
        };
        self.adjust_cidrs(&old_cidrs, &new_cidrs)?;
        self.add_quarantine(policy, slot);
        self.dirty_quarantine_groups();
        self.requarantine_namespace(&key.namespace)
    }

    fn delete_quarantine(&mut self, key: &PolicyKey) -> Result<(), EngineError> {
        let Some(q) = self.quarantines.remove(key) else {
            return Ok(());
        };
        self.release_quarantine_shapes(&q);
        let old_cidrs = self.live_cidrs(&q.policy);
        self.note_renamed_slot(q.slot);
        let moves = self.policy_slots.remove(key);
        self.move_policies(moves);
        self.adjust_cidrs(&old_cidrs, &[])?;
        self.dirty_quarantine_groups();
        self.requarantine_namespace(&key.namespace)
    }

    /// Interns the Quarantine's exception peers and records its entries: each exception in
    /// its direction (priority 0), and the deny-all (priority 1) under the policy's default
    /// rule id in both directions.
    fn add_quarantine(&mut self, policy: Policy, slot: u32) {
        let mut shapes: [Vec<(Shape, RuleId)>; 2] = Default::default();
        for rule in &policy.rules {
            let id = rule_id(slot, rule.direction, Some(rule.index));
            for peer in &rule.peers {
                for port in &rule.ports {
                    let peer_ref = match peer {
                        Peer::Any => PeerRef::Any,
                        Peer::Pods(s) => PeerRef::Sel(self.intern(SelectionSpec::Pods(s.clone()))),
                        Peer::Cidr(c) => PeerRef::Sel(self.intern(SelectionSpec::Cidr(c.clone()))),
                        Peer::World => PeerRef::Sel(self.intern(SelectionSpec::World)),
                        Peer::Cluster => PeerRef::Sel(self.intern(SelectionSpec::Cluster)),
                        Peer::Host => PeerRef::Sel(self.intern(SelectionSpec::Host)),
                    };
                    if let PeerRef::Sel(p) = peer_ref {
                        *self.quarantine_peer_sels.entry(p).or_default() += 1;
                    }
                    shapes[rule.direction as usize].push((
                        Shape {
                            peer: peer_ref,
                            port: port.clone(),
                            tier: rule.tier,
                            priority: rule.priority,
                            action: rule.action,
                            audit: rule.audit,
                        },
                        id,
                    ));
                }
            }
        }
        for d in Direction::ALL {
            shapes[d as usize].push((
                Shape {
                    peer: PeerRef::Any,
                    port: PortSpec::ANY,
                    tier: Tier::Quarantine,
                    priority: QUARANTINE_DENY_PRIORITY,
                    action: Action::Deny,
                    audit: false,
                },
                rule_id(slot, d, None),
            ));
        }
        let active = policy
            .quarantine
            .as_ref()
            .is_some_and(|s| s.active_at(self.now));
        self.quarantines.insert(
            policy.key.clone(),
            QuarantineState {
                policy,
                slot,
                shapes,
                active,
            },
        );
    }

    fn release_quarantine_shapes(&mut self, q: &QuarantineState) {
        for (shape, _) in q.shapes.iter().flatten() {
            if let PeerRef::Sel(p) = shape.peer {
                if let Some(c) = self.quarantine_peer_sels.get_mut(&p) {
                    *c -= 1;
                    if *c == 0 {
                        self.quarantine_peer_sels.remove(&p);
                    }
                }
                self.release(p);
            }
        }
    }

    fn dirty_quarantine_groups(&mut self) {
        if self.journal.active {
            self.journal
                .dirty
                .extend(self.quarantine_groups.iter().copied());
        }
    }

    /// The active Quarantines selecting a pod, sorted by key.
    fn quarantine_set_of(&self, st: &PodState) -> Vec<PolicyKey> {
        let labels = self.pod_labels(st);
        self.quarantines
            .iter()
            .filter(|(key, q)| {
                q.active
                    && key.namespace == st.pod.namespace
                    && match q.policy.quarantine.as_ref().and_then(|s| s.pods.as_ref()) {
                        Some(names) => names.contains(&st.pod.name),
                        None => q.policy.subject.pods.matches(labels),
                    }
            })
            .map(|(key, _)| key.clone())
            .collect()
    }

    fn requarantine_namespace(&mut self, ns: &str) -> Result<(), EngineError> {
        let mut pods: Vec<PodRef> = self
            .identities_by_ns
            .get(ns)
            .into_iter()
            .flatten()
            .filter_map(|id| self.identities.get(id))
            .flat_map(|s| s.pods.iter().cloned())
            .collect();
        pods.sort();
        for pk in pods {
            self.requarantine_pod(&pk)?;
        }
        Ok(())
    }

    /// Puts a pod's endpoint in the group its Quarantines call for (its identity's when none).
    fn requarantine_pod(&mut self, pk: &PodRef) -> Result<(), EngineError> {
        let Some(st) = self.pods.get(pk) else {
            return Ok(());
        };
        let set = self.quarantine_set_of(st);
        let current = st
            .quarantine
            .and_then(|g| match &self.identities.get(&g)?.kind {
                IdentityKind::Quarantine(s) => Some(s.clone()),
                _ => None,
            });
        let unchanged = match &current {
            None => set.is_empty(),
            Some(c) => **c == set,
        };
        if unchanged {
            return Ok(());
        }
        self.touch_pod(pk);
        let Some(st) = self.pods.get_mut(pk) else {
            return Ok(());
        };
        let (node, endpoint, old_group) = (st.node, st.endpoint, st.group());
        let old_quarantine = st.quarantine.take();
        if let Some(ep) = endpoint {
            self.detach_endpoint(node, old_group, ep);
        }
        if let Some(g) = old_quarantine {
            self.quarantined_pods.remove(pk);
            self.leave_quarantine_group(g, pk);
        }
        if !set.is_empty() {
            let g = self.acquire_quarantine_group(Arc::new(set))?;
            if let Some(s) = self.identities.get_mut(&g) {
                s.pods.insert(pk.clone());
            }
            if let Some(st) = self.pods.get_mut(pk) {
                st.quarantine = Some(g);
            }
            self.quarantined_pods.insert(pk.clone());
        }
        if let Some(ep) = endpoint {
            let group = self.pods.get(pk).map_or(old_group, |st| st.group());
            self.attach_endpoint(node, group, ep);
        }
        Ok(())
    }

    fn attach_endpoint(&mut self, node: NodeIdx, group: Identity, ep: u32) {
        if let Some(s) = self.identities.get_mut(&group) {
            s.endpoints.entry(node).or_default().insert(ep);
        }
        if self.journal.active {
            self.journal.flags.insert((node, group));
        }
    }

    fn acquire_quarantine_group(&mut self, set: QuarantineSet) -> Result<Identity, EngineError> {
        if let Some(id) = self.quarantine_slots.get(&set) {
            return Ok(id);
        }
        let hash = quarantine_set_hash(&set);
        let (id, moves) = self.quarantine_slots.insert(set.clone(), hash)?;
        self.move_quarantine_groups(moves);
        self.create_identity(id, IdentityKind::Quarantine(set));
        self.quarantine_groups.insert(id);
        Ok(id)
    }

    /// Takes `pk` out of quarantine group `g` (its endpoint already detached); the last member
    /// out releases the group.
    fn leave_quarantine_group(&mut self, g: Identity, pk: &PodKey) {
        let empty = match self.identities.get_mut(&g) {
            Some(s) => {
                s.pods.remove(pk);
                s.pods.is_empty()
            }
            None => false,
        };
        if !empty {
            return;
        }
        self.quarantine_groups.remove(&g);
        if let Some(state) = self.destroy_identity(g)
            && let IdentityKind::Quarantine(set) = &state.kind
        {
            let moves = self.quarantine_slots.remove(set);
            self.move_quarantine_groups(moves);
        }
    }

    /// Quarantine groups renumbered by a collision: their pods' endpoints move with them.
    fn move_quarantine_groups(&mut self, moves: Vec<Move<QuarantineSet>>) {
        let mut taken = Vec::new();
        for m in moves {
            self.quarantine_groups.remove(&m.from);
            if let Some(state) = self.destroy_identity(m.from) {
                taken.push((m, state));
            }
        }
        for (m, old) in taken {
            self.create_identity(m.to, old.kind.clone());
            self.quarantine_groups.insert(m.to);
            for pk in &old.pods {
                self.touch_pod(pk);
                let Some(st) = self.pods.get_mut(pk) else {
                    continue;
                };
                st.quarantine = Some(m.to);
                let (node, ep) = (st.node, st.endpoint);
                if let Some(s) = self.identities.get_mut(&m.to) {
                    s.pods.insert(pk.clone());
                    if let Some(ep) = ep {
                        s.endpoints.entry(node).or_default().insert(ep);
                    }
                }
                if ep.is_some() && self.journal.active {
                    self.journal.flags.insert((node, m.from));
                    self.journal.flags.insert((node, m.to));
                }
            }
        }
    }

    /// A quarantine group's policy: the entries of its Quarantines, and nothing else.
    fn compute_quarantine_policy(&self, set: &[PolicyKey]) -> EndpointPolicy {
        // Exceptions have no named ports (the loader refuses them), so no key is consulted.
        let none = IdentityKey {
            namespace: String::new(),
            service_account: String::new(),
            labels: BTreeMap::new(),
            named_ports: Vec::new(),
            cidr_class: Vec::new(),
        };
        let mut out = EndpointPolicy::default();
        for d in Direction::ALL {
            let mut entries = Vec::new();
            for key in set {
                let Some(q) = self.quarantines.get(key) else {
                    continue;
                };
                for (shape, rule) in &q.shapes[d as usize] {
                    self.expand(shape, *rule, d, &none, &mut entries);
                }
            }
            dedup_entries(&mut entries);
            out.direction_mut(d).entries = entries;
        }
        out
    }

    /// The peer identities a quarantine group's exceptions admit, in either direction and on
    /// any port, sorted: the identities each exception's selection matches, or exactly
    /// `[identity::ANY]` when an exception admits every pod. Depends on what the group's policy
    /// depends on, so it is recomputed whenever that is.
    fn compute_quarantine_allow(&self, set: &[PolicyKey]) -> Vec<Identity> {
        let mut out = Vec::new();
        for key in set {
            let Some(q) = self.quarantines.get(key) else {
                continue;
            };
            for (shape, _) in q.shapes.iter().flatten() {
                if shape.action != Action::Allow {
                    continue;
                }
                let PeerRef::Sel(s) = shape.peer else {
                    return vec![identity::ANY];
                };
                let sel = self.sel(s);
                if admits_every_pod(&sel.spec) {
                    return vec![identity::ANY];
                }
                out.extend(sel.matched.iter().copied());
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Brings a quarantine group's exception identities up to date; when they change, its
    /// pods' addresses are re-checked on every node (every node carries them).
    fn refresh_quarantine_allow(&mut self, id: Identity) {
        let Some(IdentityKind::Quarantine(set)) = self.identities.get(&id).map(|s| &s.kind) else {
            return;
        };
        let new = self.compute_quarantine_allow(set);
        let Some(st) = self.identities.get_mut(&id) else {
            return;
        };
        if *st.quarantine_allow == new {
            return;
        }
        let old = std::mem::replace(&mut st.quarantine_allow, Arc::new(new));
        if !self.journal.active {
            return;
        }
        self.journal.allow_old.entry(id).or_insert(old);
        let nodes = self.nodes.len() as NodeIdx;
        let ips: Vec<IpAddr> = st
            .pods
            .iter()
            .filter_map(|pk| self.pods.get(pk))
            .flat_map(|p| p.pod.ips.iter().copied())
            .collect();
        for n in 0..nodes {
            self.journal.ip_checks.extend(ips.iter().map(|ip| (n, *ip)));
        }
    }

    // -----------------------------------------------------------------------------------------
    // Per-identity policy.

    fn compute_policy(&self, id: Identity) -> EndpointPolicy {
        let mut out = EndpointPolicy::default();
        let Some(st) = self.identities.get(&id) else {
            return out;
        };
        if let IdentityKind::Quarantine(set) = &st.kind {
            return self.compute_quarantine_policy(set);
        }
        let IdentityKind::Pod(own_key) = &st.kind else {
            return out;
        };
        for d in Direction::ALL {
            let di = d as usize;
            let mut isolated: Option<RuleId> = None;
            let mut audit_isolated: Option<RuleId> = None;
            let mut entries: Vec<PolicyEntry> = Vec::new();
            for sel in &st.member_of {
                let Some(data) = self.sel(*sel).subject.as_ref() else {
                    continue;
                };
                if let Some(r) = data.isolation[di].first() {
                    isolated = Some(isolated.map_or(*r, |x| x.min(*r)));
                }
                if let Some(r) = data.audit_isolation[di].first() {
                    audit_isolated = Some(audit_isolated.map_or(*r, |x| x.min(*r)));
                }
                for (shape, rules) in &data.shapes[di] {
                    let Some(rule) = rules.first().copied() else {
                        continue;
                    };
                    self.expand(shape, rule, d, own_key, &mut entries);
                }
            }
            dedup_entries(&mut entries);
            *out.direction_mut(d) = DirectionPolicy {
                isolated_by: isolated,
                audit_isolated_by: if isolated.is_some() {
                    None
                } else {
                    audit_isolated
                },
                entries,
            };
        }
        out
    }

    fn expand(
        &self,
        shape: &Shape,
        rule: RuleId,
        direction: Direction,
        own_key: &IdentityKey,
        out: &mut Vec<PolicyEntry>,
    ) {
        let mut push = |peer: Identity, protocol: Option<Protocol>, ports: PortRange| {
            out.push(PolicyEntry {
                peer,
                protocol,
                ports,
                tier: shape.tier,
                priority: shape.priority,
                action: shape.action,
                audit: shape.audit,
                rule,
            })
        };
        let emit = |peer: Identity, push: &mut dyn FnMut(Identity, Option<Protocol>, PortRange)| {
            match &shape.port {
                PortSpec::Range { protocol, ports } => push(peer, *protocol, *ports),
                PortSpec::Named { protocol, name } => {
                    let target: Option<&IdentityKey> = match direction {
                        Direction::Ingress => Some(own_key),
                        Direction::Egress => match self.identities.get(&peer).map(|s| &s.kind) {
                            Some(IdentityKind::Pod(k)) => Some(k),
                            _ => None,
                        },
                    };
                    if let Some(target) = target {
                        for (proto, port) in target.named_port(name, *protocol) {
                            push(peer, Some(proto), PortRange::single(port));
                        }
                    }
                }
            }
        };
        match shape.peer {
            PeerRef::Any => emit(identity::ANY, &mut push),
            PeerRef::Sel(s) => {
                for m in &self.sel(s).matched {
                    emit(*m, &mut push);
                }
            }
        }
    }

    fn compute_policies(&self, ids: &[Identity]) -> Vec<(Identity, EndpointPolicy)> {
        let compute = |ids: &[Identity]| -> Vec<(Identity, EndpointPolicy)> {
            ids.iter()
                .map(|id| (*id, self.compute_policy(*id)))
                .collect()
        };
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(ids.len() / 1024 + 1);
        if threads <= 1 {
            return compute(ids);
        }
        std::thread::scope(|scope| {
            let workers: Vec<_> = ids
                .chunks(ids.len().div_ceil(threads))
                .map(|chunk| scope.spawn(move || compute(chunk)))
                .collect();
            workers
                .into_iter()
                // A worker only panics if `compute_policy` does, which it does not: re-raise.
                .flat_map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        })
    }

    fn refresh_policy(&mut self, id: Identity) {
        if !self.identities.contains_key(&id) {
            return;
        }
        let new = self.compute_policy(id);
        self.install_policy(id, new);
    }

    fn install_policy(&mut self, id: Identity, new: EndpointPolicy) {
        self.refresh_quarantine_allow(id);
        let Some(st) = self.identities.get_mut(&id) else {
            return;
        };
        if *st.policy == new {
            return;
        }
        let mut peers: Vec<Identity> = [&new.ingress, &new.egress]
            .into_iter()
            .flat_map(|d| d.entries.iter().map(|e| e.peer))
            .filter(|p| *p != identity::ANY)
            .collect();
        peers.sort_unstable();
        peers.dedup();
        let mut rules: Vec<RuleId> = [&new.ingress, &new.egress]
            .into_iter()
            .flat_map(|d| {
                d.entries
                    .iter()
                    .map(|e| e.rule)
                    .chain(d.isolated_by)
                    .chain(d.audit_isolated_by)
            })
            .collect();
        rules.sort_unstable();
        rules.dedup();
        let old = std::mem::replace(&mut st.policy, Arc::new(new));
        st.contribution = Arc::new(Contribution { peers, rules });
        if self.journal.active {
            self.journal.old_policy.entry(id).or_insert(old);
            self.journal.dp_changed.insert(id);
            for n in st.endpoints.keys() {
                self.journal.flags.insert((*n, id));
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Per-node bookkeeping.

    /// Brings node `n`'s reference counts in line with identity `id`'s current contribution
    /// (or with its absence when `id` no longer has an endpoint on `n`).
    fn update_contribution(&mut self, n: NodeIdx, id: Identity) {
        let new: Option<Arc<Contribution>> = self
            .identities
            .get(&id)
            .filter(|s| s.endpoints.get(&n).is_some_and(|e| !e.is_empty()))
            .map(|s| s.contribution.clone());
        let active = self.journal.active;
        let node = &mut self.nodes[n as usize];
        let old = node.contrib.remove(&id);
        if active {
            self.journal
                .group_old
                .entry((n, id))
                .or_insert(old.is_some());
        }
        if let Some(c) = &new {
            node.contrib.insert(id, c.clone());
        }
        if let (Some(a), Some(b)) = (&old, &new)
            && Arc::ptr_eq(a, b)
        {
            return;
        }
        let empty = Contribution::default();
        let old_c = old.as_deref().unwrap_or(&empty);
        let new_c = new.as_deref().unwrap_or(&empty);
        let mut flips = Vec::new();
        for_each_diff(&old_c.peers, &new_c.peers, |p, added| {
            let c = node.peer_refs.entry(p).or_default();
            if added {
                *c += 1;
                if *c == 1 {
                    flips.push((p, true));
                }
            } else {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    node.peer_refs.remove(&p);
                    flips.push((p, false));
                }
            }
        });
        let rule_old = &mut self.journal.rule_old;
        for_each_diff(&old_c.rules, &new_c.rules, |r, added| {
            let c = node.rule_refs.entry(r).or_default();
            if added {
                *c += 1;
                if *c == 1 && active {
                    rule_old.entry((n, r)).or_insert(false);
                }
            } else {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    node.rule_refs.remove(&r);
                    if active {
                        rule_old.entry((n, r)).or_insert(true);
                    }
                }
            }
        });
        for (p, on) in flips {
            self.peer_flip(n, p, on);
        }
    }

    fn peer_flip(&mut self, n: NodeIdx, peer: Identity, on: bool) {
        if self.journal.active {
            self.journal.peer_old.entry((n, peer)).or_insert(!on);
        }
        let set = self.ref_nodes.entry(peer).or_default();
        if on {
            set.insert(n);
        } else {
            set.remove(&n);
            if set.is_empty() {
                self.ref_nodes.remove(&peer);
            }
        }
        if peer == identity::WORLD {
            if on {
                self.world_nodes.insert(n);
            } else {
                self.world_nodes.remove(&n);
            }
            if self.journal.active {
                self.journal.all_ips.insert(n);
            }
            return;
        }
        if !self.journal.active {
            return;
        }
        let Some(st) = self.identities.get(&peer) else {
            return;
        };
        let ips = st
            .pods
            .iter()
            .filter_map(|pk| self.pods.get(pk))
            .flat_map(|p| p.pod.ips.iter().map(move |ip| (n, *ip)));
        self.journal.ip_checks.extend(ips);
    }

    /// The identity (and quarantine group) node `n`'s ipcache gives a pod address, if it
    /// carries it: the first pod (by name) with that address that is local to the node,
    /// quarantined, or whose identity the node references.
    fn pod_entry(&self, n: NodeIdx, ip: &IpAddr) -> Option<PodEntry> {
        let node = &self.nodes[n as usize];
        let world = node.peer_refs.contains_key(&identity::WORLD);
        self.pods_by_ip.get(ip)?.iter().find_map(|pk| {
            let st = self.pods.get(pk)?;
            let local = st.node == n && st.endpoint.is_some();
            let quarantined = st.quarantine.is_some();
            (local || world || quarantined || node.peer_refs.contains_key(&st.identity))
                .then_some((st.identity, st.quarantine))
        })
    }

    /// A quarantine group's exception identities now.
    fn allow_of(&self, group: Identity) -> Arc<Vec<Identity>> {
        self.identities
            .get(&group)
            .map(|s| s.quarantine_allow.clone())
            .unwrap_or_default()
    }

    /// A quarantine group's exception identities before the change in the journal.
    fn old_allow_of(&self, group: Identity, j: &Journal) -> Arc<Vec<Identity>> {
        match j.allow_old.get(&group) {
            Some(old) => old.clone(),
            None => self.allow_of(group),
        }
    }

    /// [`Self::pod_entry`] as it was before the change in the journal: from the pods' snapshots
    /// and the node's earlier peer references.
    fn old_pod_entry(
        &self,
        n: NodeIdx,
        ip: &IpAddr,
        j: &Journal,
        old_at: &FxHashMap<IpAddr, Vec<(&PodKey, &PodSnap)>>,
    ) -> Option<PodEntry> {
        let node = &self.nodes[n as usize];
        let had = |peer: Identity| {
            j.peer_old
                .get(&(n, peer))
                .copied()
                .unwrap_or_else(|| node.peer_refs.contains_key(&peer))
        };
        let world = had(identity::WORLD);
        let carried = |node_of: NodeIdx, id: Identity, endpoint: bool, quarantined: bool| {
            node_of == n && endpoint || world || quarantined || had(id)
        };
        // Pods at the address before: untouched ones as they are (already in key order)…
        let untouched = self.pods_by_ip.get(ip).and_then(|set| {
            set.iter().find_map(|pk| {
                if j.pods.contains_key(&**pk) {
                    return None;
                }
                let st = self.pods.get(pk)?;
                carried(
                    st.node,
                    st.identity,
                    st.endpoint.is_some(),
                    st.quarantine.is_some(),
                )
                .then_some((&**pk, (st.identity, st.quarantine)))
            })
        });
        // …and touched ones as they were; the first by key of both wins.
        let touched = old_at.get(ip).and_then(|snaps| {
            snaps
                .iter()
                .filter(|(_, s)| {
                    carried(
                        s.node,
                        s.identity,
                        s.endpoint.is_some(),
                        s.quarantine.is_some(),
                    )
                })
                .map(|(pk, s)| (*pk, (s.identity, s.quarantine)))
                .min_by(|a, b| a.0.cmp(b.0))
        });
        match (untouched, touched) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a.1 } else { b.1 }),
            (a, b) => a.or(b).map(|x| x.1),
        }
    }

    /// The pod addresses node `n`'s ipcache carries, sorted.
    fn pod_entries(&self, n: NodeIdx) -> Vec<(IpNetwork, PodEntry)> {
        let node = &self.nodes[n as usize];
        // Every (address, identity, quarantine group) the node carries; an address shared by
        // pods of different identities or groups (stale pod data) is settled by `pod_entry`.
        type Entries = Vec<(IpNetwork, PodEntry)>;
        let mut entries: Entries = Vec::new();
        let push_pod = |st: &PodState, entries: &mut Entries| {
            entries.extend(
                st.pod
                    .ips
                    .iter()
                    .map(|ip| (host_net(*ip), (st.identity, st.quarantine))),
            );
        };
        for pk in &self.quarantined_pods {
            if let Some(st) = self.pods.get(pk) {
                push_pod(st, &mut entries);
            }
        }
        if node.peer_refs.contains_key(&identity::WORLD) {
            for pks in self.pods_by_ip.values() {
                for pk in pks {
                    if let Some(st) = self.pods.get(pk) {
                        push_pod(st, &mut entries);
                    }
                }
            }
        } else {
            for pk in node.endpoints.values() {
                if let Some(st) = self.pods.get(pk) {
                    push_pod(st, &mut entries);
                }
            }
            for peer in node.peer_refs.keys() {
                if let Some(ps) = self.identities.get(peer) {
                    for pk in &ps.pods {
                        if let Some(st) = self.pods.get(pk) {
                            push_pod(st, &mut entries);
                        }
                    }
                }
            }
        }
        entries.sort_unstable();
        entries.dedup();
        let mut out: Entries = Vec::with_capacity(entries.len());
        let mut i = 0;
        while i < entries.len() {
            let net = entries[i].0;
            let mut j = i + 1;
            while j < entries.len() && entries[j].0 == net {
                j += 1;
            }
            if j - i == 1 {
                out.push(entries[i]);
            } else if let Some(id) = self.pod_entry(n, &net.ip()) {
                out.push((net, id));
            }
            i = j;
        }
        out
    }

    fn cidr_identity(&self, net: &IpNetwork) -> Option<Identity> {
        self.cidr_refs
            .contains_key(net)
            .then(|| self.cidr_slots.get(net))
            .flatten()
    }

    fn build_deltas(&mut self) -> Vec<NodeDelta> {
        let mut j = std::mem::take(&mut self.journal);
        let mut nodes: Vec<NodeIdx> = Vec::new();
        for snap in j.pods.values().flatten() {
            nodes.push(snap.node);
        }
        for pk in j.pods.keys() {
            if let Some(st) = self.pods.get(pk) {
                nodes.push(st.node);
            }
        }
        for id in &j.dp_changed {
            if let Some(st) = self.identities.get(id) {
                nodes.extend(st.endpoints.keys().copied());
            }
        }
        nodes.extend(j.all_ips.iter().copied());
        nodes.extend(j.node_existed.keys().copied());
        // Per node, sorted: which groups and rules it had before the change.
        let mut groups: Vec<(NodeIdx, Identity, bool)> = j
            .group_old
            .iter()
            .map(|((n, id), had)| (*n, *id, *had))
            .collect();
        groups.sort_unstable();
        let mut rules: Vec<(NodeIdx, RuleId, bool)> = j
            .rule_old
            .iter()
            .map(|((n, r), was)| (*n, *r, *was))
            .collect();
        rules.sort_unstable();
        nodes.extend(groups.iter().map(|g| g.0));
        nodes.extend(rules.iter().map(|r| r.0));
        // A group's change is the same on every node that has it: computed once.
        let mut policy_deltas: FxHashMap<Identity, Option<PolicyDelta>> = FxHashMap::default();
        for (_, id, had) in &groups {
            if !*had || policy_deltas.contains_key(id) {
                continue;
            }
            let change = match (j.old_policy.get(id), self.identities.get(id)) {
                (Some(old), Some(st)) if !Arc::ptr_eq(old, &st.policy) => {
                    let d = PolicyDelta::between(old, &st.policy);
                    (!d.is_empty_against(old)).then_some(d)
                }
                _ => None,
            };
            policy_deltas.insert(*id, change);
        }
        // Pods' new addresses must be (re)checked wherever they may now be carried.
        let mut ip_checks = std::mem::take(&mut j.ip_checks);
        let all: Vec<NodeIdx> = (0..self.nodes.len() as NodeIdx).collect();
        for pk in j.pods.keys() {
            if let Some(st) = self.pods.get(pk) {
                // Every node carries a quarantined pod's addresses.
                let everywhere: &[NodeIdx] = if st.quarantine.is_some() { &all } else { &[] };
                let on = std::iter::once(st.node)
                    .chain(
                        self.ref_nodes
                            .get(&st.identity)
                            .into_iter()
                            .flatten()
                            .copied(),
                    )
                    .chain(self.world_nodes.iter().copied())
                    .chain(everywhere.iter().copied());
                for n in on {
                    ip_checks.extend(st.pod.ips.iter().map(|ip| (n, *ip)));
                }
            }
        }
        // A node that appears gets every quarantined pod's addresses.
        for (n, existed) in &j.node_existed {
            if !*existed && self.nodes[*n as usize].exists() {
                for pk in &self.quarantined_pods {
                    if let Some(st) = self.pods.get(pk) {
                        ip_checks.extend(st.pod.ips.iter().map(|ip| (*n, *ip)));
                    }
                }
            }
        }
        ip_checks.sort_unstable();
        ip_checks.dedup();
        nodes.extend(ip_checks.iter().map(|c| c.0));
        let all_nodes = !j.cidr_old.is_empty() || !j.renamed_rules.is_empty();
        if all_nodes {
            nodes.extend(0..self.nodes.len() as NodeIdx);
        }
        nodes.sort_unstable();
        nodes.dedup();
        // Touched pods by the addresses they had.
        let mut old_at: FxHashMap<IpAddr, Vec<(&PodKey, &PodSnap)>> = FxHashMap::default();
        for (pk, snap) in &j.pods {
            if let Some(s) = snap {
                for ip in &s.ips {
                    old_at.entry(*ip).or_default().push((pk, s));
                }
            }
        }
        fn of_node<T>(v: &[(NodeIdx, T)], n: NodeIdx) -> &[(NodeIdx, T)] {
            &v[v.partition_point(|x| x.0 < n)..v.partition_point(|x| x.0 <= n)]
        }
        let groups: Vec<(NodeIdx, (Identity, bool))> = groups
            .into_iter()
            .map(|(n, id, had)| (n, (id, had)))
            .collect();
        let rules: Vec<(NodeIdx, (RuleId, bool))> =
            rules.into_iter().map(|(n, r, was)| (n, (r, was))).collect();
        let mut deltas = Vec::with_capacity(nodes.len());
        for n in nodes {
            let parts = NodeParts {
                ip_checks: of_node(&ip_checks, n),
                groups: of_node(&groups, n),
                rules: of_node(&rules, n),
                policy_deltas: &policy_deltas,
                old_at: &old_at,
            };
            if let Some(d) = self.node_delta(n, &j, parts) {
                deltas.push(d);
            }
        }
        deltas
    }

    fn node_delta(&mut self, n: NodeIdx, j: &Journal, parts: NodeParts<'_>) -> Option<NodeDelta> {
        let NodeParts {
            ip_checks,
            groups,
            rules,
            policy_deltas,
            old_at,
        } = parts;
        let existed = j
            .node_existed
            .get(&n)
            .copied()
            .unwrap_or_else(|| self.nodes[n as usize].exists());
        let exists = self.nodes[n as usize].exists();
        if !existed && !exists {
            return None;
        }
        let mut delta = NodeDelta {
            node: self.nodes[n as usize].name.clone(),
            from_version: if existed {
                self.nodes[n as usize].version
            } else {
                0
            },
            ..NodeDelta::default()
        };
        // Endpoints of touched pods.
        let mut touched: Vec<&PodKey> = j.pods.keys().collect();
        touched.sort();
        for pk in touched {
            let old = j
                .pods
                .get(pk)
                .and_then(|s| s.as_ref())
                .filter(|s| s.node == n && s.endpoint.is_some());
            let new = self
                .pods
                .get(pk)
                .filter(|s| s.node == n && s.endpoint.is_some());
            match (old, new) {
                (None, None) => {}
                (Some(o), None) => delta.endpoints_removed.extend(o.endpoint),
                (None, Some(s)) => {
                    if let Some(ep) = s.endpoint.and_then(|id| self.endpoint(id, pk)) {
                        delta.endpoints_added.push(ep);
                    }
                }
                (Some(o), Some(s)) => {
                    let (Some(oid), Some(nid)) = (o.endpoint, s.endpoint) else {
                        continue;
                    };
                    if oid != nid {
                        delta.endpoints_removed.push(oid);
                        if let Some(ep) = self.endpoint(nid, pk) {
                            delta.endpoints_added.push(ep);
                        }
                        continue;
                    }
                    let unchanged = o.identity == s.identity
                        && o.ips == s.pod.ips
                        && o.workload == s.pod.workload
                        && o.quarantine == s.quarantine;
                    if !unchanged {
                        delta.endpoints_changed.push(EndpointDelta {
                            id: nid,
                            identity: s.identity,
                            ips: s.pod.ips.clone(),
                            workload: s.pod.workload.clone(),
                            policy: group_of(s.group()),
                            quarantined: s.quarantine.is_some(),
                        });
                    }
                }
            }
        }
        delta.endpoints_removed.sort_unstable();
        delta.endpoints_added.sort_by_key(|e| e.id);
        delta.endpoints_changed.sort_by_key(|e| e.id);
        // Policy groups: one per identity with endpoints on the node.
        for &(_, (id, had)) in groups {
            let has = self.nodes[n as usize].contrib.contains_key(&id);
            match (had, has) {
                (false, false) => {}
                (true, false) => delta.policies_removed.push(group_of(id)),
                (false, true) => {
                    if let Some(st) = self.identities.get(&id) {
                        delta
                            .policies_added
                            .insert(group_of(id), EndpointPolicy::clone(&st.policy));
                    }
                }
                (true, true) => {
                    if let Some(change) = policy_deltas.get(&id).and_then(Option::as_ref) {
                        delta.policies_changed.insert(group_of(id), change.clone());
                    }
                }
            }
        }
        // ipcache: pod entries that may have changed, and CIDR identities that did.
        // (prefix, pod entry before, pod entry now); a prefix may come twice, with equal values.
        // An entry is the identity and, for a quarantined address, its exception identities.
        type Entry = Option<(Identity, Option<Arc<Vec<Identity>>>)>;
        let mut keys: Vec<(IpNetwork, Entry, Entry)> = Vec::new();
        let pod_key = |this: &Self, ip: IpAddr, keys: &mut Vec<_>, always: bool| {
            let net = host_net(ip);
            let new = if exists {
                this.pod_entry(n, &ip)
                    .map(|(id, g)| (id, g.map(|g| this.allow_of(g))))
            } else {
                None
            };
            let old = if existed {
                this.old_pod_entry(n, &ip, j, old_at)
                    .map(|(id, g)| (id, g.map(|g| this.old_allow_of(g, j))))
            } else {
                None
            };
            if always || new != old {
                keys.push((net, old, new));
            }
        };
        if j.all_ips.contains(&n) {
            let mut all: Vec<IpAddr> = self.pods_by_ip.keys().copied().collect();
            all.extend(old_at.keys().copied());
            all.sort_unstable();
            all.dedup();
            for ip in all {
                pod_key(self, ip, &mut keys, false);
            }
        } else {
            for &(_, ip) in ip_checks {
                pod_key(self, ip, &mut keys, false);
            }
        }
        let mut cidr_keys: Vec<IpNetwork> = j.cidr_old.keys().copied().collect();
        if !existed && exists {
            cidr_keys.extend(self.cidr_refs.keys().copied());
        }
        for c in cidr_keys {
            if c.prefix() == host_net(c.ip()).prefix() {
                pod_key(self, c.ip(), &mut keys, true);
            } else {
                keys.push((c, None, None));
            }
        }
        keys.sort_unstable_by_key(|k| k.0);
        keys.dedup_by_key(|k| k.0);
        for (k, old_p, new_p) in keys {
            let old_c = match j.cidr_old.get(&k) {
                Some(v) => *v,
                None => self.cidr_identity(&k),
            };
            let old_eff = if existed {
                old_p.or(old_c.map(|id| (id, None)))
            } else {
                None
            };
            let new_eff = if exists {
                new_p.or_else(|| self.cidr_identity(&k).map(|id| (id, None)))
            } else {
                None
            };
            match (old_eff, new_eff) {
                (a, b) if a == b => {}
                (_, Some((id, allow))) => delta.ipcache_upserted.push(IpCacheEntry {
                    cidr: k,
                    identity: id,
                    quarantined: allow.is_some(),
                    quarantine_allow: allow.map(|a| a.to_vec()).unwrap_or_default(),
                }),
                (Some(_), None) => delta.ipcache_removed.push(k),
                (None, None) => {}
            }
        }
        // Rules.
        for &(_, (r, was)) in rules {
            let is = self.nodes[n as usize].rule_refs.contains_key(&r);
            if is && (!was || j.renamed_rules.contains(&r)) {
                if let Some(rr) = self.rule_ref(r) {
                    delta.rules_upserted.insert(r, rr);
                }
            } else if !is && was {
                delta.rules_removed.push(r);
            }
        }
        if !j.renamed_rules.is_empty() {
            let renamed: Vec<RuleId> = self.nodes[n as usize]
                .rule_refs
                .keys()
                .filter(|r| {
                    j.renamed_rules.contains(r) && rules.binary_search_by(|x| x.1.0.cmp(r)).is_err()
                })
                .copied()
                .collect();
            for r in renamed {
                if let Some(rr) = self.rule_ref(r) {
                    delta.rules_upserted.insert(r, rr);
                }
            }
        }
        delta.rules_removed.sort_unstable();
        if existed && !exists {
            let node = &mut self.nodes[n as usize];
            node.version += 1;
            return Some(NodeDelta {
                node: node.name.clone(),
                from_version: delta.from_version,
                version: node.version,
                node_removed: true,
                ..NodeDelta::default()
            });
        }
        if existed && delta.is_empty() {
            return None;
        }
        let node = &mut self.nodes[n as usize];
        node.version += 1;
        delta.version = node.version;
        Some(delta)
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
