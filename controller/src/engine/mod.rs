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
//! # The parts, what each owns and returns
//! The engine is split by concern, the way Cilium's `pkg/policy` (repository, selector cache,
//! map state) and Antrea's network-policy controller (internal policies, address groups,
//! applied-to groups = spans) are. Each part is a struct with private fields; it changes only
//! its own state and returns what changed, and never reads another part's fields (some take
//! another part by shared reference to *read* it through its methods).
//!
//! | part | owns | returns |
//! |---|---|---|
//! | `Inventory` (`inventory`) | namespaces' labels, pods and their state, pods by address, nodes (declared, pod count, rule-set version, endpoint ids), each group's endpoints per node | placements: the (node, group) pairs whose presence on a node may have changed |
//! | `Identities` (`identities`) | pod, CIDR and quarantine-group numbers in their ordered slots, the pods holding each, pod identities by namespace, CIDR use counts | `IdentityChanges`: numbers created, destroyed, renumbered (with the pods that moved), CIDRs' identities before, CIDRs that came or went |
//! | `SelectorCache` (`selectors`) | interned selections, the identities each matches, and the reverse index | `MemberChanges`: (selection, identity, joined/left) |
//! | `Repository` (`repository`) | policies and their rule-id slots (shared with Quarantines), the merged rules per subject selection, which subjects use a selection as peer, each identity's compiled policy and contribution | the subject whose members must be recomputed; the replaced policy when an install changed it; `dependents(selection)` |
//! | `Quarantines` (`quarantine`) | the clock, each Quarantine's entries, the quarantined pods, each group's exception identities | `ClockChange` (Quarantines that expired or came back); a group's old exception list when it changed |
//! | `NodeSpan` (`span`) | per node: each local group's contribution and reference counts of peers and rules; which nodes reference each peer and the `world` | `SpanChange`: whether the node had the group, peers and rules whose count went from or to zero |
//! | `Journal` (`delta`) | what one step touched and the state before it | at the end of a step, one [`NodeDelta`] per changed node |
//!
//! [`PolicyEngine`] holds the parts and threads the change sets (`apply` for the inventory
//! side, `compile` for the policy side; `ipcache` computes a node's pod entries from the parts
//! and owns nothing). The selector cache evaluates selectors against a `View` of the
//! inventory (namespace labels) and identities (kinds), its `Universe`. For one step:
//!
//! 1. **placement**: a pod change goes to the inventory (after a snapshot in the journal); a
//!    namespace relabel re-evaluates namespace-scoped selections; a policy or Quarantine goes to
//!    the repository or the quarantines, which intern their selections, and its CIDRs to the
//!    identities;
//! 2. **identities**: acquiring or releasing a pod identity, a CIDR identity or a quarantine
//!    group returns `IdentityChanges`; destroyed numbers leave their selections and lose their
//!    compiled policy (journaled as the old one), created ones join theirs, renumbered pods
//!    move in the inventory (their groups re-placed);
//! 3. **selector cache**: every `MemberChanges` is turned into dirty identities through the
//!    repository's `dependents` (a subject's new member; every member of a subject whose rule
//!    names the selection) and the quarantines (every group, when an exception names it);
//! 4. **contributions**: at the end of the step each dirty identity's policy is computed from
//!    the repository (or the quarantines) and the selector cache and installed; a change flags
//!    the nodes where the group has endpoints;
//! 5. **node spans**: each flagged (node, group) is re-spanned with the group's contribution;
//!    the `SpanChange` journals the group's, peers' and rules' presence before, and the pod
//!    addresses to re-check where a peer came or went;
//! 6. **deltas**: the journal is turned into per-node deltas, each comparing the node's groups,
//!    rules and ipcache entries before and now.
//!
//! A full build ([`PolicyEngine::new_at`]) runs the same parts in bulk with the journal off.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use ipnetwork::IpNetwork;
use rustc_hash::{FxHashMap, FxHashSet};

use crate::error::EngineError;
use crate::identity::{
    IdentityKey, LabelFilter, Move, NodeIdentityKey, OrderedSlots, cidr_hash, cidr_identity_slots,
    node_identity_slots, pod_identity_slots, remote_identity_slots,
};
use crate::model::{
    CidrPeer, Isolation, Labels, NAMESPACE_NAME_LABEL, Namespace, NamespaceScope, Node, Object,
    Peer, Pod, PodKey, PodSelection, Policy, PolicyKey, PortSpec,
};
use crate::ruleset::{
    Action, Direction, DirectionPolicy, Endpoint, EndpointDelta, EndpointPolicy, Identity,
    IpCacheEntry, NodeDelta, PolicyDelta, PolicyEntry, PolicyGroupId, PortRange, Protocol, RuleId,
    RuleRef, RuleSet, Stage, Tier, identity,
};
use crate::ruleset::{
    CLUSTER_LABEL, ClusterName, cluster::is_remote_namespace, cluster::split_namespace,
};

mod apply;
mod compile;
mod delta;
mod identities;
mod inventory;
mod ipcache;
mod names;
mod nodes;
mod quarantine;
mod repository;
mod resolvers;
mod selectors;
mod span;

use apply::{View, is_quarantine_group};
use delta::Journal;
use identities::{Identities, IdentityChanges};
use inventory::{Inventory, Placed};
use nodes::NodeTable;
use quarantine::Quarantines;
use repository::Repository;
pub use resolvers::{CLUSTER_DNS_LABEL, CLUSTER_DNS_NAMESPACE};
use selectors::{MemberChanges, SelectorCache, Universe};
use span::NodeSpan;

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
    /// The cluster's DNS resolvers, when given; `None`: the pods of [`CLUSTER_DNS_NAMESPACE`]
    /// labelled [`CLUSTER_DNS_LABEL`] and the cluster DNS Service's cluster IPs (see
    /// [`PolicyEngine::dns_resolvers`]).
    pub dns_resolvers: Option<Vec<IpAddr>>,
    /// This cluster's name (`--cluster-name`): every local pod and namespace carries it as
    /// [`CLUSTER_LABEL`]. Without one the label is taken off local objects. Either way a value
    /// a local object sets itself never stands, so a local pod cannot pass for a peer
    /// cluster's.
    pub cluster_name: Option<ClusterName>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            label_filter: LabelFilter::default(),
            unscheduled_node: "node-1".into(),
            dns_resolvers: None,
            cluster_name: None,
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
    /// Node identities whose labels the selector matches (ClusterNetworkPolicy `nodes`).
    Nodes(crate::selector::Selector),
    /// The one name identity of a DNS name pattern (see [`names`]): it matches no pod, CIDR or
    /// entity identity, so entries by name never admit anything but learned addresses.
    Name(crate::ruleset::NamePattern),
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
    stage: Stage,
}

#[derive(Debug, Clone)]
enum IdentityKind {
    Pod(Arc<IdentityKey>),
    /// Not an identity but the policy group of the endpoints selected by exactly this set of
    /// active Quarantines (sorted): it is never a peer and no address resolves to it.
    Quarantine(QuarantineSet),
    Cidr(IpNetwork),
    /// The addresses of the nodes with this key (see [`nodes`]).
    Node(Arc<NodeIdentityKey>),
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

/// The policy engine. Build it with [`PolicyEngine::new`] from a full inventory, read per-node
/// rule sets with [`PolicyEngine::ruleset`], feed it changes with [`PolicyEngine::apply`].
///
/// It holds one part per concern and threads their change sets (see the module docs).
pub struct PolicyEngine {
    config: EngineConfig,
    inventory: Inventory,
    identities: Identities,
    selectors: SelectorCache,
    repository: Repository,
    quarantines: Quarantines,
    span: NodeSpan,
    /// Nodes' labels, addresses and node identities.
    node_table: NodeTable,
    journal: Journal,
    /// [`PolicyEngine::dns_resolvers`].
    dns_resolvers: Vec<IpAddr>,
    /// The cluster IPs of the cluster DNS Service ([`PolicyEngine::set_cluster_dns_service`]).
    cluster_dns_service: Vec<IpAddr>,
}

impl PolicyEngine {
    /// An engine with nothing in it.
    pub fn empty(config: EngineConfig) -> PolicyEngine {
        let mut engine = PolicyEngine {
            inventory: Inventory::default(),
            config,
            identities: Identities::default(),
            selectors: SelectorCache::default(),
            repository: Repository::default(),
            quarantines: Quarantines::new(SystemTime::now()),
            span: NodeSpan::default(),
            node_table: NodeTable::default(),
            journal: Journal::default(),
            dns_resolvers: Vec::new(),
            cluster_dns_service: Vec::new(),
        };
        engine.inventory.local_cluster = engine.config.cluster_name.clone();
        engine.refresh_dns_resolvers();
        // The reserved identities, which the identities start with.
        let reserved: Vec<Identity> = engine.identities.all().collect();
        for id in reserved {
            engine.repository.init(id);
        }
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
    ///
    /// The same parts as an incremental change, in bulk and with the journal off: policy slots
    /// and CIDR identities, then policies and Quarantines (interning their selections), then
    /// pods (identities, placement, quarantine groups), every identity's policy on all cores,
    /// endpoints, and last the node spans.
    pub fn new_at(
        config: EngineConfig,
        objects: impl IntoIterator<Item = Object>,
        now: SystemTime,
    ) -> Result<PolicyEngine, EngineError> {
        let mut engine = PolicyEngine::empty(config);
        engine.quarantines = Quarantines::new(now);
        let mut pods = Vec::new();
        let mut policies = BTreeMap::new();
        for o in objects {
            match o {
                Object::Namespace(n) => {
                    engine.inventory.set_namespace_labels(
                        &n.name,
                        namespace_labels(&n, engine.config.cluster_name.as_ref()),
                    );
                }
                Object::Node(n) => {
                    let idx = engine.node_idx(&n.name);
                    engine.inventory.set_declared(idx, true);
                    engine.node_table.set(&n.name, &n.labels, &n.addresses);
                }
                Object::Pod(p) => pods.push(p),
                Object::Policy(p) => {
                    policies.insert(p.key.clone(), p);
                }
            }
        }
        let mut cidrs: BTreeMap<IpNetwork, u32> = BTreeMap::new();
        for p in policies.values() {
            engine.repository.allocate_slot(&p.key)?;
            for c in engine.quarantines.live_cidrs(p) {
                *cidrs.entry(c).or_default() += 1;
            }
        }
        let ch = engine.identities.add_cidrs(cidrs)?;
        engine.identities_changed(ch);
        // Node identities (with their CIDR classes), if a policy names `nodes` peers.
        for p in policies.values() {
            engine.node_table.set_user(&p.key, p.uses_nodes());
        }
        engine.rekey_nodes()?;
        // Staged policies first: an enforced policy that one of them replaces goes in as
        // superseded.
        let (staged, enforced): (Vec<_>, Vec<_>) = policies
            .into_iter()
            .partition(|(k, _)| k.kind.promoted().is_some());
        for (key, p) in staged.into_iter().chain(enforced) {
            let slot = engine.repository.slot(&key).unwrap_or_default();
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
        engine.inventory.reserve(pods.len());
        // Pods with addresses, in key order: the order endpoints are numbered in.
        let mut with_ips: Vec<PodRef> = Vec::with_capacity(pods.len());
        for mut pod in pods {
            if pod.host_network {
                continue;
            }
            let pk: PodRef = Arc::new(pod.key());
            let (remote, _) = split_namespace(&pod.namespace);
            set_cluster_label(&mut pod.labels, remote, engine.config.cluster_name.as_ref());
            let key = engine
                .identities
                .key_of_pod(&pod, &engine.config.label_filter);
            let labels_in_key = strip_labels(&mut pod, &key);
            let (id, ch) = engine.identities.acquire_pod_identity(key, &pk)?;
            engine.identities_changed(ch);
            let name = engine.placement(&pod).into_owned();
            let node = engine.node_idx(&name);
            if !pod.ips.is_empty() {
                with_ips.push(pk.clone());
            }
            engine.inventory.insert_pod(
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
            let mut keys: Vec<PodRef> = engine.inventory.pods().map(|(k, _)| k.clone()).collect();
            keys.sort();
            for pk in keys {
                engine.requarantine_pod(&pk)?;
            }
        }
        // Every identity's policy, computed on all cores (each reads the engine only).
        let ids: Vec<Identity> = engine.identities.all().collect();
        for (id, policy) in engine.compute_policies(&ids) {
            engine.install_policy(id, policy);
        }
        // Endpoints, in pod order per node.
        for pk in with_ips {
            engine.inventory.assign_endpoint(&pk);
        }
        for (n, id) in engine.inventory.placements() {
            engine.update_contribution(n, id);
        }
        engine.refresh_dns_resolvers();
        engine.inventory.set_versions(1);
        Ok(engine)
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Names of the nodes that currently have a rule set, sorted.
    pub fn nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = (0..self.inventory.node_count() as NodeIdx)
            .filter(|n| self.inventory.node_exists(*n))
            .map(|n| self.inventory.node_name(n).to_string())
            .collect();
        v.sort();
        v
    }

    pub fn version(&self, node: &str) -> Option<u64> {
        self.inventory
            .find_node(node)
            .filter(|n| self.inventory.node_exists(*n))
            .map(|n| self.inventory.version(n))
    }

    /// Number of identities in use (pod and CIDR identities, not the reserved ones).
    pub fn identity_count(&self) -> usize {
        self.identities.count()
    }

    /// The identity of a pod, if the pod is known.
    pub fn identity_of_pod(&self, pod: &PodKey) -> Option<Identity> {
        self.inventory.pod(pod).map(|p| p.identity)
    }

    /// The node a pod is placed on.
    /// The node a pod is placed on; `None` for a peer cluster's pod (and unknown pods).
    pub fn node_of_pod(&self, pod: &PodKey) -> Option<&str> {
        self.inventory
            .pod(pod)
            .filter(|p| !is_remote_namespace(&p.pod.namespace))
            .map(|p| self.inventory.node_name(p.node))
    }

    /// The pods at an address (nearly always one), by key.
    pub fn pods_at(&self, ip: &IpAddr) -> Vec<PodKey> {
        self.inventory
            .pods_at(ip)
            .iter()
            .map(|k| (**k).clone())
            .collect()
    }

    /// The namespaces with labels (as selectors see them: with the name and cluster labels), by
    /// name.
    pub fn namespaces(&self) -> Vec<Namespace> {
        let mut v: Vec<Namespace> = self
            .inventory
            .namespaces()
            .map(|(name, labels)| Namespace {
                name: name.clone(),
                labels: labels.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// This cluster's own pods (not a peer cluster's), sorted by namespace and name.
    pub fn local_pods(&self) -> Vec<Pod> {
        let mut v: Vec<Pod> = self
            .inventory
            .pods()
            .filter(|(k, _)| !is_remote_namespace(&k.namespace))
            .map(|(_, st)| self.full_pod(st))
            .collect();
        v.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        v
    }

    /// A pod as the engine has it (the last version applied).
    pub fn pod(&self, pod: &PodKey) -> Option<Pod> {
        self.inventory.pod(pod).map(|p| self.full_pod(p))
    }

    /// The labels a pod's state stands for: its own, or its identity's when they are the same
    /// (then the state does not keep a copy).
    fn pod_labels<'a>(&'a self, st: &'a PodState) -> &'a Labels {
        if st.labels_in_key
            && let Some(IdentityKind::Pod(key)) = self.identities.kind(st.identity)
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

    /// Every pod as the engine has it, sorted by namespace and name.
    pub fn pods(&self) -> Vec<Pod> {
        let mut v: Vec<Pod> = self
            .inventory
            .pods()
            .map(|(_, st)| self.full_pod(st))
            .collect();
        v.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        v
    }

    /// Every pod, sorted by namespace and name.
    pub fn pod_keys(&self) -> Vec<PodKey> {
        let mut v: Vec<PodKey> = self
            .inventory
            .pods()
            .map(|(k, _)| PodKey::clone(k))
            .collect();
        v.sort();
        v
    }

    /// The engine's inputs as objects (namespaces, declared nodes, pods, policies and
    /// Quarantines): [`PolicyEngine::new_at`] with them and [`PolicyEngine::now`] compiles the
    /// same rule sets, so a what-if can compile a changed copy without touching this engine.
    pub fn objects(&self) -> Vec<Object> {
        let mut out: Vec<Object> = self
            .inventory
            .namespaces()
            .map(|(name, labels)| {
                Object::Namespace(Namespace {
                    name: name.clone(),
                    labels: labels.clone(),
                })
            })
            .collect();
        out.extend(
            (0..self.inventory.node_count() as NodeIdx)
                .filter(|n| self.inventory.declared(*n))
                .map(|n| {
                    let name = self.inventory.node_name(n);
                    Object::Node(self.node_table.node(name).unwrap_or_else(|| Node {
                        name: name.to_string(),
                        labels: Labels::new(),
                        addresses: Vec::new(),
                    }))
                }),
        );
        out.extend(self.pods().into_iter().map(Object::Pod));
        out.extend(
            self.repository
                .policies()
                .chain(self.quarantines.policies())
                .cloned()
                .map(Object::Policy),
        );
        out
    }

    /// The policy an identity's direction compiles to (what every endpoint of it gets).
    pub fn identity_policy(&self, id: Identity, direction: Direction) -> Option<&DirectionPolicy> {
        self.repository.compiled(id).map(|p| p.direction(direction))
    }

    /// Identity key of a pod identity.
    pub fn identity_key(&self, pod: &Pod) -> IdentityKey {
        self.identities.key_of_pod(pod, &self.config.label_filter)
    }

    /// What a rule id stands for.
    pub fn rule_ref(&self, rule: RuleId) -> Option<RuleRef> {
        self.repository.rule_ref(rule)
    }

    /// The current rule set of `node`.
    pub fn ruleset(&self, node: &str) -> Result<RuleSet, EngineError> {
        let idx = self
            .inventory
            .find_node(node)
            .filter(|n| self.inventory.node_exists(*n))
            .ok_or_else(|| EngineError::UnknownNode(node.to_string()))?;
        let endpoints = self
            .inventory
            .endpoints(idx)
            .iter()
            .filter_map(|(id, pk)| self.endpoint(*id, pk))
            .collect();
        let mut cache: BTreeMap<IpNetwork, Identity> = self.identities.cidr_identities().collect();
        // A node address's node identity wins over a CIDR identity of the same prefix (and a
        // pod address over both, below).
        cache.extend(self.node_table.entries());
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
        let rules = self
            .span
            .rules(idx)
            .filter_map(|r| self.rule_ref(r).map(|rr| (r, rr)))
            .collect();
        // One group per identity with endpoints here (those are the node's contributions).
        let policies = self
            .span
            .groups(idx)
            .filter_map(|id| {
                self.repository
                    .compiled(id)
                    .map(|p| (id, EndpointPolicy::clone(p)))
            })
            .collect();
        Ok(RuleSet {
            node: self.inventory.node_name(idx).to_string(),
            version: self.inventory.version(idx),
            endpoints,
            policies,
            ipcache,
            rules,
            names: self.node_names(idx),
            dns_resolvers: self.dns_resolvers.clone(),
        })
    }

    /// The endpoints of `node`, as its rule set lists them (empty for a node the engine does not
    /// have): what readers that need only who is where (the flow directory, the map) take
    /// instead of materializing whole rule sets.
    pub fn endpoints(&self, node: &str) -> Vec<Endpoint> {
        let Some(idx) = self
            .inventory
            .find_node(node)
            .filter(|n| self.inventory.node_exists(*n))
        else {
            return Vec::new();
        };
        self.inventory
            .endpoints(idx)
            .iter()
            .filter_map(|(id, pk)| self.endpoint(*id, pk))
            .collect()
    }

    /// How many endpoints `node`'s rule set lists.
    pub fn endpoint_count(&self, node: &str) -> usize {
        self.inventory
            .find_node(node)
            .filter(|n| self.inventory.node_exists(*n))
            .map_or(0, |n| self.inventory.endpoints(n).len())
    }

    /// What the rules of `node`'s rule set stand for (the values of [`RuleSet::rules`]), in
    /// rule-id order, without materializing the rest of the rule set.
    pub fn node_rules(&self, node: &str) -> Vec<(RuleId, RuleRef)> {
        let Some(idx) = self
            .inventory
            .find_node(node)
            .filter(|n| self.inventory.node_exists(*n))
        else {
            return Vec::new();
        };
        let mut rules: Vec<(RuleId, RuleRef)> = self
            .span
            .rules(idx)
            .filter_map(|r| self.rule_ref(r).map(|rr| (r, rr)))
            .collect();
        rules.sort_unstable_by_key(|r| r.0);
        rules
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
        let st = self.inventory.pod(pk)?;
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
    // Quarantines.

    /// The engine's clock, against which Quarantines expire.
    pub fn now(&self) -> SystemTime {
        self.quarantines.now()
    }

    /// A Quarantine the engine has (active or expired).
    pub fn quarantine(&self, key: &PolicyKey) -> Option<&Policy> {
        self.quarantines.policy(key)
    }

    /// Whether the Quarantine `key` exists and has not expired at the engine's clock.
    pub fn quarantine_active(&self, key: &PolicyKey) -> bool {
        self.quarantines.is_active(key)
    }

    /// The active Quarantines that select `pod`, sorted (empty when it is not quarantined).
    pub fn quarantines_of_pod(&self, pod: &PodKey) -> Vec<PolicyKey> {
        self.inventory
            .pod(pod)
            .and_then(|st| st.quarantine)
            .and_then(|g| self.identities.quarantine_set(g))
            .map(|set| set.to_vec())
            .unwrap_or_default()
    }

    /// Every quarantined pod, sorted.
    pub fn quarantined_pods(&self) -> Vec<PodKey> {
        self.quarantines
            .pods()
            .iter()
            .map(|pk| PodKey::clone(pk))
            .collect()
    }

    /// The earliest `expiresAt` of an active Quarantine: when [`Self::expire`] next has work.
    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.quarantines.next_expiry()
    }

    /// Advances the engine's clock to `now` (it never goes back) and deactivates the
    /// Quarantines whose `expiresAt` is not after it, as if they had been deleted; returns the
    /// deltas of the nodes that changed (none, and no version bump, when nothing expired). The
    /// controller calls it periodically — or at [`Self::next_expiry`] — with
    /// `SystemTime::now()`; tests pass any instant.
    pub fn expire(&mut self, now: SystemTime) -> Result<Vec<NodeDelta>, EngineError> {
        let now = self.quarantines.now().max(now);
        if !self.quarantines.due(now) {
            self.quarantines.advance(now);
            return Ok(Vec::new());
        }
        self.journaled(|e| e.set_clock(now))
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
        self.journal.resolvers_changed = self.dns_resolvers_after_step();
        let deltas = self.build_deltas();
        self.journal = Journal::default();
        result.map(|_| deltas)
    }

    fn apply_one(&mut self, change: Change) -> Result<(), EngineError> {
        tracing::trace!(?change, "policy engine change");
        match change {
            Change::UpsertNamespace(ns) => {
                let labels = namespace_labels(&ns, self.config.cluster_name.as_ref());
                self.set_namespace_labels(&ns.name, labels);
            }
            Change::DeleteNamespace(name) => {
                let labels = namespace_labels(
                    &Namespace {
                        name: name.clone(),
                        labels: Labels::new(),
                    },
                    self.config.cluster_name.as_ref(),
                );
                self.set_namespace_labels(&name, labels);
            }
            Change::UpsertPod(mut pod) => {
                let (remote, _) = split_namespace(&pod.namespace);
                set_cluster_label(&mut pod.labels, remote, self.config.cluster_name.as_ref());
                let pk = pod.key();
                if self
                    .inventory
                    .pod(&pk)
                    .is_some_and(|s| self.same_pod(s, &pod))
                {
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
                self.inventory.set_declared(idx, true);
                self.set_node_info(&node)?;
            }
            Change::DeleteNode(name) => {
                if let Some(idx) = self.inventory.find_node(&name) {
                    self.note_node(idx);
                    self.inventory.set_declared(idx, false);
                }
                self.remove_node_info(&name);
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
            && later.stage == first.stage
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
    let kind = key.kind.as_str();
    let mut h = crate::identity::Fnv::default();
    for part in [kind, "\0", &key.namespace, "\0", &key.name] {
        h.write(part.as_bytes());
    }
    h.finish()
}

/// A namespace's labels as selectors see them: as written, with [`NAMESPACE_NAME_LABEL`] (a peer
/// cluster's namespace `west/shop` is `shop` there, as in its own cluster) and [`CLUSTER_LABEL`]
/// (see [`set_cluster_label`]).
fn namespace_labels(ns: &Namespace, local: Option<&ClusterName>) -> Labels {
    let mut labels = ns.labels.clone();
    let (cluster, name) = split_namespace(&ns.name);
    labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.to_string());
    set_cluster_label(&mut labels, cluster, local);
    labels
}

/// Sets [`CLUSTER_LABEL`] to the object's cluster: the peer cluster `remote` for an imported
/// object, else the local cluster's name, or no label when the local cluster has none. Whatever
/// value the object carried is overwritten: a local pod must not pass for a peer cluster's.
fn set_cluster_label(labels: &mut Labels, remote: Option<&str>, local: Option<&ClusterName>) {
    match remote.or(local.map(ClusterName::as_str)) {
        Some(c) => {
            labels.insert(CLUSTER_LABEL.to_string(), c.to_string());
        }
        None => {
            labels.remove(CLUSTER_LABEL);
        }
    }
}

/// The pseudo-node holding a peer cluster's pods: never a node of this cluster (a Node name has
/// no `/`), it has no rule set and its pods are no endpoints.
fn peer_cluster_node(cluster: &str) -> String {
    format!("{cluster}/")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ruleset::RuleKind;

    /// Rule ids derive from this hash: it must stay what it was when it was a formatted string.
    #[test]
    fn slot_hash_is_the_hash_of_the_formatted_key() {
        for kind in RuleKind::ALL {
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
