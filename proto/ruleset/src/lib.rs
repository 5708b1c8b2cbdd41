//! The compiled, per-node rule set: the contract between the policy compiler and the data plane.
//!
//! A [`RuleSet`] lists the endpoints that live on one node, the IP/CIDR → identity entries they
//! need, and their compiled policies: per direction a flat list of [`PolicyEntry`]s. Every entry
//! carries its tier, priority, action and the id of the rule it came from, so the data plane can
//! report *which* rule decided a packet.
//!
//! Policies are shared: an [`Endpoint`] names a policy group ([`Endpoint::policy`]) and
//! [`RuleSet::policies`] holds each group once, however many endpoints use it. Endpoints of one
//! identity always have the same policy, so the controller makes one group per identity, numbered
//! after it; consumers must treat group ids as opaque. A policy change that concerns every pod
//! is then one group change per node, and the agent writes each group's map keys once.
//!
//! [`resolve`] is the one place where precedence is defined. [`decide`] applies it to the entries
//! that match one packet; the agent applies the very same function to every map key it writes, so
//! the kernel and this reference cannot disagree about precedence, only about matching — which is
//! what the differential tests check.
//!
//! The [`flow`] module holds the vocabulary of flow records (verdicts, kinds, reasons, the
//! deciding rule), which agents report and the controller keeps.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

pub mod cluster;
pub mod conntrack;
pub mod flow;
pub mod names;
pub mod precedence;

pub use cluster::{BadClusterName, CLUSTER_LABEL, ClusterName};
pub use flow::{
    EndpointRef, FlowEntry, FlowKind, FlowReason, FlowRecord, FlowRule, FlowVerdict,
    QuarantineAction, QuarantineEvent, StagedOutcome,
};
pub use names::{BadNamePattern, NameEntry, NamePattern, name_identity};
pub use precedence::{Rank, Resolution};

/// Numeric security identity of a set of endpoints (or of a CIDR).
pub type Identity = u32;
/// Id of a rule, resolvable through [`RuleSet::rules`].
pub type RuleId = u32;
/// Id of a policy group, a key of [`RuleSet::policies`].
pub type PolicyGroupId = u32;

/// Reserved identities (defined once, in `bulkhead-common`, for the programs and this contract).
pub mod identity {
    pub use bulkhead_common::identity::*;
}

/// Reserved rule ids (defined in `bulkhead-common`): the built-in default allow, the rule blamed
/// for an endpoint whose policy group is missing, and the one reported for unrelated ICMP errors.
pub use bulkhead_common::{RULE_DEFAULT_ALLOW, RULE_MISSING_POLICY, RULE_UNRELATED_ICMP_ERROR};

/// Most endpoints one node's rule set may hold; endpoint ids lie below it (the programs' map
/// sizes).
pub use bulkhead_common::MAX_ENDPOINTS;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Traffic entering the endpoint (its ingress policy).
    Ingress,
    /// Traffic leaving the endpoint (its egress policy).
    Egress,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Icmp,
    Icmpv6,
}

impl Protocol {
    pub const ALL: [Protocol; 5] = [
        Protocol::Tcp,
        Protocol::Udp,
        Protocol::Sctp,
        Protocol::Icmp,
        Protocol::Icmpv6,
    ];

    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
            Protocol::Icmp => 1,
            Protocol::Icmpv6 => 58,
        }
    }

    pub fn from_number(n: u8) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.number() == n)
    }

    /// Whether the protocol has ports; for the others only port-less entries can match.
    pub fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp | Protocol::Sctp)
    }
}

/// Precedence tiers, highest first. See the README's "Policy tiers" section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Quarantine overrides: above everything.
    Quarantine,
    /// ClusterNetworkPolicy `tier: Admin`.
    Admin,
    /// NetworkPolicy and ServicePolicy: the application tier. An endpoint selected by any
    /// policy of this tier for a direction is isolated: what no entry admits is denied.
    Application,
    /// ClusterNetworkPolicy `tier: Baseline`.
    Baseline,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
    /// Skip the rest of the current tier (ClusterNetworkPolicy `Pass`).
    Pass,
}

/// Ports an entry matches: an inclusive range. Port-less protocols (ICMP) only match `ALL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const ALL: PortRange = PortRange {
        first: 0,
        last: u16::MAX,
    };

    pub fn single(port: u16) -> PortRange {
        PortRange {
            first: port,
            last: port,
        }
    }

    pub fn is_all(&self) -> bool {
        *self == PortRange::ALL
    }

    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

/// One compiled policy entry of an endpoint in one direction.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyEntry {
    /// Peer identity, or [`identity::ANY`].
    pub peer: Identity,
    /// `None` matches every protocol (including ones without ports).
    pub protocol: Option<Protocol>,
    pub ports: PortRange,
    pub tier: Tier,
    /// Within a tier, lower numbers take precedence. NetworkPolicy and ServicePolicy use 0.
    /// ClusterNetworkPolicy uses `priority × 32 + position of the rule in its list` (priority
    /// 0–1000, at most 25 rules per direction), because upstream orders the rules of one policy
    /// by position: an earlier `Accept` beats a later `Deny` of the same policy, which plain
    /// "deny wins at equal priority" would get wrong. Quarantine exceptions use 0 and the
    /// quarantine deny 1.
    pub priority: u16,
    pub action: Action,
    /// Which view of the policy the entry belongs to (enforced, staged only, or superseded).
    pub stage: Stage,
    pub rule: RuleId,
}

/// The views of an endpoint's policy an entry belongs to. The data plane enforces the
/// *enforced* view and reports, for every flow, the verdict of the *staged* view: the policies
/// in force with every staged policy (a `StagedNetworkPolicy`, a `StagedClusterNetworkPolicy`,
/// an audit-mode ServicePolicy) in force too, and each staged policy replacing the enforced one
/// of the same name.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// In force, and in the staged view.
    #[default]
    Enforced,
    /// Only in the staged view: reported as what it would do, never enforced.
    Staged,
    /// In force, but not in the staged view: a staged policy of the same name replaces it.
    Superseded,
}

impl Stage {
    /// Whether the entry counts in the enforced view.
    pub fn enforced(self) -> bool {
        self != Stage::Staged
    }

    /// Whether the entry counts in the staged view.
    pub fn staged(self) -> bool {
        self != Stage::Superseded
    }
}

impl PolicyEntry {
    pub fn matches(&self, peer: Identity, protocol: Option<Protocol>, port: Option<u16>) -> bool {
        if self.peer != identity::ANY && self.peer != peer {
            return false;
        }
        match (self.protocol, protocol) {
            (None, _) => {}
            (Some(p), Some(q)) if p == q => {}
            _ => return false,
        }
        if self.ports.is_all() {
            return true;
        }
        // A packet whose port cannot be read (a non-first fragment) or whose protocol has no
        // ports only matches entries that admit every port.
        matches!(port, Some(port) if self.ports.contains(port))
    }
}

/// How a direction of an endpoint behaves when no entry matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionPolicy {
    /// Set when an enforcing application-tier policy selects the endpoint for this direction:
    /// the rule id to blame for default-deny drops.
    pub isolated_by: Option<RuleId>,
    /// The same with the staged view's policies: the rule id to blame for what the staged view
    /// denies by default (`None`: the staged view does not isolate this direction). Not relative
    /// to `isolated_by`: a staged policy that replaces the only isolating one makes it `None`.
    pub staged_isolated_by: Option<RuleId>,
    pub entries: Vec<PolicyEntry>,
}

/// The policy of an endpoint in both directions; shared by every endpoint of its group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointPolicy {
    pub ingress: DirectionPolicy,
    pub egress: DirectionPolicy,
}

impl EndpointPolicy {
    pub fn direction(&self, direction: Direction) -> &DirectionPolicy {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    pub fn direction_mut(&mut self, direction: Direction) -> &mut DirectionPolicy {
        match direction {
            Direction::Ingress => &mut self.ingress,
            Direction::Egress => &mut self.egress,
        }
    }
}

/// What an endpoint whose policy group is missing gets: nothing passes.
static MISSING_POLICY: EndpointPolicy = EndpointPolicy {
    ingress: DirectionPolicy {
        isolated_by: Some(RULE_MISSING_POLICY),
        staged_isolated_by: Some(RULE_MISSING_POLICY),
        entries: Vec::new(),
    },
    egress: DirectionPolicy {
        isolated_by: Some(RULE_MISSING_POLICY),
        staged_isolated_by: Some(RULE_MISSING_POLICY),
        entries: Vec::new(),
    },
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Node-local endpoint id, stable for the endpoint's life on the node (< 65536).
    pub id: u32,
    pub namespace: String,
    pub pod: String,
    /// Owning workload (`Deployment/name`, `StatefulSet/name`, …) when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    pub identity: Identity,
    pub ips: Vec<IpAddr>,
    /// Host-side interface, when the source knows it; otherwise the agent finds it by route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// Selected by an active Quarantine: its group holds only the quarantine's entries (tier
    /// [`Tier::Quarantine`]), and the agent cuts its tracked connections and counts its drops
    /// as quarantine drops. Its identity is unchanged.
    #[serde(default)]
    pub quarantined: bool,
    /// The endpoint's policy: a key of [`RuleSet::policies`].
    pub policy: PolicyGroupId,
}

impl Endpoint {
    pub fn name(&self) -> String {
        format!("{}/{}", self.namespace, self.pod)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpCacheEntry {
    pub cidr: IpNetwork,
    pub identity: Identity,
    /// The address belongs to a pod under an active Quarantine. Every node's rule set carries
    /// the addresses of all quarantined pods (flagged), whether or not a local policy names
    /// them, so that each node can drop their traffic early (XDP prefilter).
    #[serde(default)]
    pub quarantined: bool,
    /// For a quarantined address: the peer identities its active Quarantines' exceptions admit,
    /// in either direction and on any port (pod-selector exceptions: the selected pods'
    /// identities; ipBlock exceptions: the CIDR identities allocated for them, and the
    /// identities of pods whose addresses they contain), sorted and free of duplicates. When an
    /// exception admits every pod (e.g. `namespaceSelector: {}` without a pod restriction) the
    /// list is exactly `[identity::ANY]`. Empty when the address is not quarantined or its
    /// Quarantines have no exceptions.
    ///
    /// This is what a node's XDP prefilter lets through to and from a quarantined address
    /// instead of dropping it early; ports and the exact verdict are enforced by the policy of
    /// the quarantined endpoint on its own node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quarantine_allow: Vec<Identity>,
}

impl IpCacheEntry {
    /// An entry of an address that is not quarantined.
    pub fn new(cidr: IpNetwork, identity: Identity) -> IpCacheEntry {
        IpCacheEntry {
            cidr,
            identity,
            quarantined: false,
            quarantine_allow: Vec::new(),
        }
    }

    /// Whether the prefilter lets traffic between this (quarantined) address and an address of
    /// identity `peer` through: `peer` is in [`IpCacheEntry::quarantine_allow`], or the list
    /// holds [`identity::ANY`].
    pub fn quarantine_admits(&self, peer: Identity) -> bool {
        self.quarantine_allow.last() == Some(&identity::ANY)
            || self.quarantine_allow.binary_search(&peer).is_ok()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RuleKind {
    NetworkPolicy,
    ClusterNetworkPolicy,
    ServicePolicy,
    Quarantine,
    Default,
    /// `bulkhead.dev/v1alpha1` StagedNetworkPolicy: a NetworkPolicy reported, never enforced.
    StagedNetworkPolicy,
    /// `bulkhead.dev/v1alpha1` StagedClusterNetworkPolicy.
    StagedClusterNetworkPolicy,
}

impl RuleKind {
    pub const ALL: [RuleKind; 7] = [
        RuleKind::NetworkPolicy,
        RuleKind::ClusterNetworkPolicy,
        RuleKind::ServicePolicy,
        RuleKind::Quarantine,
        RuleKind::Default,
        RuleKind::StagedNetworkPolicy,
        RuleKind::StagedClusterNetworkPolicy,
    ];

    /// The kind a staged kind becomes when promoted (and whose object of the same name it
    /// replaces in the staged view); `None` for kinds that are not staged ones.
    pub fn promoted(&self) -> Option<RuleKind> {
        match self {
            RuleKind::StagedNetworkPolicy => Some(RuleKind::NetworkPolicy),
            RuleKind::StagedClusterNetworkPolicy => Some(RuleKind::ClusterNetworkPolicy),
            _ => None,
        }
    }

    /// The staged kind of an enforced one, when it has one.
    pub fn staged(&self) -> Option<RuleKind> {
        match self {
            RuleKind::NetworkPolicy => Some(RuleKind::StagedNetworkPolicy),
            RuleKind::ClusterNetworkPolicy => Some(RuleKind::StagedClusterNetworkPolicy),
            _ => None,
        }
    }

    /// The kind's name as users see it (the Kubernetes kind, or `Default`).
    pub fn as_str(&self) -> &'static str {
        match self {
            RuleKind::NetworkPolicy => "NetworkPolicy",
            RuleKind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
            RuleKind::ServicePolicy => "ServicePolicy",
            RuleKind::Quarantine => "Quarantine",
            RuleKind::Default => "Default",
            RuleKind::StagedNetworkPolicy => "StagedNetworkPolicy",
            RuleKind::StagedClusterNetworkPolicy => "StagedClusterNetworkPolicy",
        }
    }
}

impl std::fmt::Display for RuleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a [`RuleKind`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown rule kind {0:?}: expected one of NetworkPolicy, ClusterNetworkPolicy, ServicePolicy, Quarantine, Default, StagedNetworkPolicy, StagedClusterNetworkPolicy"
)]
pub struct UnknownRuleKind(pub String);

impl std::str::FromStr for RuleKind {
    type Err = UnknownRuleKind;

    fn from_str(s: &str) -> Result<RuleKind, UnknownRuleKind> {
        RuleKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownRuleKind(s.to_string()))
    }
}

/// A pod, by namespace and name; written and parsed as `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Text that is not `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("name the pod as NAMESPACE/POD, not {0:?}")]
pub struct BadPodKey(pub String);

impl std::str::FromStr for PodKey {
    type Err = BadPodKey;

    /// `namespace/name`, both non-empty; a peer cluster's pod is `cluster/namespace/name` (its
    /// namespace is qualified, see [`cluster`]). (Whether they are valid Kubernetes names is for
    /// the caller to check where it matters.)
    fn from_str(s: &str) -> Result<PodKey, BadPodKey> {
        let bad = || BadPodKey(s.to_string());
        let (ns, name) = s.rsplit_once('/').ok_or_else(bad)?;
        let ns_ok = ns.split('/').count() <= 2 && ns.split('/').all(|p| !p.is_empty());
        if !ns_ok || name.is_empty() {
            return Err(bad());
        }
        Ok(PodKey {
            namespace: ns.to_string(),
            name: name.to_string(),
        })
    }
}

/// Where a rule id points back to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RuleRef {
    pub kind: RuleKind,
    /// Empty for cluster-scoped objects.
    pub namespace: String,
    pub name: String,
    pub direction: Direction,
    /// Index of the rule inside the policy's ingress/egress list; `None` for the policy's
    /// isolation default (default deny).
    pub index: Option<u32>,
}

impl std::fmt::Display for RuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dir = match self.direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        if self.kind == RuleKind::Default {
            return write!(f, "default ({dir})");
        }
        let object = if self.namespace.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.namespace, self.name)
        };
        match self.index {
            Some(i) => write!(f, "{} {object} {dir}[{i}]", self.kind),
            None => write!(f, "{} {object} {dir} default-deny", self.kind),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSet {
    pub node: String,
    /// Strictly increasing per node within one controller epoch.
    pub version: u64,
    pub endpoints: Vec<Endpoint>,
    /// Policy groups, each shared by the endpoints that name it; only groups some endpoint uses.
    #[serde(default)]
    pub policies: BTreeMap<PolicyGroupId, EndpointPolicy>,
    pub ipcache: Vec<IpCacheEntry>,
    pub rules: BTreeMap<RuleId, RuleRef>,
    /// The DNS name patterns that entries of this node's policies name as peers, each with its
    /// name identity ([`names`]), sorted by identity; empty on a node none of whose endpoints
    /// has an egress peer by name. The data plane learns addresses for these names only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<NameEntry>,
    /// The cluster's DNS resolvers, sorted and unique: the only sources whose answers teach the
    /// data plane addresses for [`RuleSet::names`] (an answer from anywhere else could come from
    /// the pod itself, or from whoever it asks). The controller finds the cluster DNS (the
    /// `kube-system` pods labelled `k8s-app: kube-dns`) unless it is told the addresses; an
    /// agent may add node-local caches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_resolvers: Vec<IpAddr>,
}

impl RuleSet {
    /// The policy of `endpoint`. An endpoint whose group is missing denies everything, blamed on
    /// [`RULE_MISSING_POLICY`]: a malformed rule set never opens anything.
    pub fn policy_of(&self, endpoint: &Endpoint) -> &EndpointPolicy {
        self.policies
            .get(&endpoint.policy)
            .unwrap_or(&MISSING_POLICY)
    }

    /// Endpoints that name a policy group the rule set lacks (empty for every rule set the
    /// controller makes).
    pub fn dangling_policies(&self) -> Vec<(u32, PolicyGroupId)> {
        self.endpoints
            .iter()
            .filter(|e| !self.policies.contains_key(&e.policy))
            .map(|e| (e.id, e.policy))
            .collect()
    }

    /// Identity of an address: longest-prefix match over the ipcache, else [`identity::WORLD`].
    pub fn identity_of(&self, ip: IpAddr) -> Identity {
        self.ipcache
            .iter()
            .filter(|e| e.cidr.contains(ip))
            .max_by_key(|e| e.cidr.prefix())
            .map(|e| e.identity)
            .unwrap_or(identity::WORLD)
    }

    pub fn endpoint(&self, id: u32) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.id == id)
    }

    pub fn endpoint_by_name(&self, namespace: &str, pod: &str) -> Option<&Endpoint> {
        self.endpoints
            .iter()
            .find(|e| e.namespace == namespace && e.pod == pod)
    }

    pub fn describe(&self, rule: RuleId) -> String {
        match self.rules.get(&rule) {
            Some(r) => r.to_string(),
            None if rule == RULE_DEFAULT_ALLOW => "default allow (no policy applies)".into(),
            None if rule == RULE_MISSING_POLICY => {
                "policy group missing from the rule set: endpoint locked down".into()
            }
            None => format!("rule #{rule}"),
        }
    }
}

/// The change of one node's [`RuleSet`] from version `from_version` to `version`: what the
/// distribution layer streams after the first snapshot. [`RuleSet::apply_delta`] applied to the
/// `from_version` rule set yields exactly the controller's `version` rule set.
///
/// A policy change reaches the endpoints through their groups: it is one `policies_changed`
/// item per group, whatever the number of endpoints sharing it. Endpoints appear only when they
/// come, go, or change identity, addresses, workload, group or quarantine flag.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDelta {
    pub node: String,
    /// Version the delta applies to; 0 when the node is new (apply it to an empty rule set).
    pub from_version: u64,
    pub version: u64,
    /// The node no longer has endpoints nor a Node object: the rule set is empty and may be
    /// dropped.
    #[serde(default)]
    pub node_removed: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints_removed: Vec<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints_added: Vec<Endpoint>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints_changed: Vec<EndpointDelta>,
    /// Groups no endpoint of the node uses any more.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies_removed: Vec<PolicyGroupId>,
    /// Groups new on the node, in full.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub policies_added: BTreeMap<PolicyGroupId, EndpointPolicy>,
    /// Groups that stay on the node but whose content changed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub policies_changed: BTreeMap<PolicyGroupId, PolicyDelta>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ipcache_removed: Vec<IpNetwork>,
    /// New entries, and entries whose identity, quarantine flag or quarantine exceptions
    /// ([`IpCacheEntry::quarantine_allow`]) changed, in full.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ipcache_upserted: Vec<IpCacheEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules_removed: Vec<RuleId>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rules_upserted: BTreeMap<RuleId, RuleRef>,
    /// Name identities no entry of the node names any more: the data plane forgets what it
    /// learned for them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names_removed: Vec<Identity>,
    /// Name patterns new on the node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names_added: Vec<NameEntry>,
    /// [`RuleSet::dns_resolvers`] after the change, when they changed (the whole list: it is
    /// short, and the same on every node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_resolvers: Option<Vec<IpAddr>>,
}

impl NodeDelta {
    /// Whether the delta changes nothing but the version.
    pub fn is_empty(&self) -> bool {
        !self.node_removed
            && self.endpoints_removed.is_empty()
            && self.endpoints_added.is_empty()
            && self.endpoints_changed.is_empty()
            && self.policies_removed.is_empty()
            && self.policies_added.is_empty()
            && self.policies_changed.is_empty()
            && self.ipcache_removed.is_empty()
            && self.ipcache_upserted.is_empty()
            && self.rules_removed.is_empty()
            && self.rules_upserted.is_empty()
            && self.names_removed.is_empty()
            && self.names_added.is_empty()
            && self.dns_resolvers.is_none()
    }

    /// Number of individual changes it carries: endpoints, groups (a changed group counts one
    /// plus its entry changes, a new group one plus its entries), ipcache entries, rules.
    pub fn size(&self) -> usize {
        self.endpoints_removed.len()
            + self.endpoints_added.len()
            + self.endpoints_changed.len()
            + self.policies_removed.len()
            + self
                .policies_added
                .values()
                .map(|p| 1 + p.ingress.entries.len() + p.egress.entries.len())
                .sum::<usize>()
            + self
                .policies_changed
                .values()
                .map(|p| {
                    1 + p.ingress.added.len()
                        + p.ingress.removed.len()
                        + p.egress.added.len()
                        + p.egress.removed.len()
                })
                .sum::<usize>()
            + self.ipcache_removed.len()
            + self.ipcache_upserted.len()
            + self.rules_removed.len()
            + self.rules_upserted.len()
            + self.names_removed.len()
            + self.names_added.len()
            + usize::from(self.dns_resolvers.is_some())
    }
}

/// An endpoint that stays on the node but whose identity, addresses, workload or policy group
/// changed. Changes of the group's content travel in [`NodeDelta::policies_changed`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointDelta {
    pub id: u32,
    /// The endpoint's identity after the change.
    pub identity: Identity,
    /// The endpoint's addresses after the change.
    pub ips: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// The endpoint's policy group after the change.
    pub policy: PolicyGroupId,
    /// [`Endpoint::quarantined`] after the change.
    #[serde(default)]
    pub quarantined: bool,
}

/// Entry-level change of a policy group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDelta {
    pub ingress: DirectionDelta,
    pub egress: DirectionDelta,
}

impl PolicyDelta {
    /// The delta that turns `old` into `new`; their entries must be sorted and duplicate-free.
    pub fn between(old: &EndpointPolicy, new: &EndpointPolicy) -> PolicyDelta {
        PolicyDelta {
            ingress: DirectionDelta::between(&old.ingress, &new.ingress),
            egress: DirectionDelta::between(&old.egress, &new.egress),
        }
    }

    /// Whether applying it to `old` changes nothing.
    pub fn is_empty_against(&self, old: &EndpointPolicy) -> bool {
        self.ingress.is_empty_against(&old.ingress) && self.egress.is_empty_against(&old.egress)
    }

    fn apply(&self, policy: &mut EndpointPolicy) {
        self.ingress.apply(&mut policy.ingress);
        self.egress.apply(&mut policy.egress);
    }
}

/// Entry-level change of one direction of a policy group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionDelta {
    /// The value after the change.
    pub isolated_by: Option<RuleId>,
    /// The value after the change.
    pub staged_isolated_by: Option<RuleId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<PolicyEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub added: Vec<PolicyEntry>,
}

impl DirectionDelta {
    /// The delta that turns `old` into `new`; both must have sorted, duplicate-free entries.
    pub fn between(old: &DirectionPolicy, new: &DirectionPolicy) -> DirectionDelta {
        let mut removed = Vec::new();
        let mut added = Vec::new();
        let (mut i, mut j) = (0, 0);
        while i < old.entries.len() || j < new.entries.len() {
            match (old.entries.get(i), new.entries.get(j)) {
                (Some(a), Some(b)) if a == b => {
                    i += 1;
                    j += 1;
                }
                (Some(a), Some(b)) if a < b => {
                    removed.push(a.clone());
                    i += 1;
                }
                (Some(_), Some(b)) => {
                    added.push(b.clone());
                    j += 1;
                }
                (Some(a), None) => {
                    removed.push(a.clone());
                    i += 1;
                }
                (None, Some(b)) => {
                    added.push(b.clone());
                    j += 1;
                }
                (None, None) => break,
            }
        }
        DirectionDelta {
            isolated_by: new.isolated_by,
            staged_isolated_by: new.staged_isolated_by,
            removed,
            added,
        }
    }

    pub fn is_empty_against(&self, old: &DirectionPolicy) -> bool {
        self.removed.is_empty()
            && self.added.is_empty()
            && self.isolated_by == old.isolated_by
            && self.staged_isolated_by == old.staged_isolated_by
    }

    fn apply(&self, policy: &mut DirectionPolicy) {
        policy.isolated_by = self.isolated_by;
        policy.staged_isolated_by = self.staged_isolated_by;
        if !self.removed.is_empty() {
            let removed: BTreeSet<&PolicyEntry> = self.removed.iter().collect();
            policy.entries.retain(|e| !removed.contains(e));
        }
        policy.entries.extend(self.added.iter().cloned());
        policy.entries.sort();
        policy.entries.dedup();
    }
}

/// Why a [`NodeDelta`] could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error("delta for node {delta} cannot be applied to the rule set of node {ruleset}")]
    WrongNode { ruleset: String, delta: String },
    #[error(
        "delta applies to version {expected} but the rule set has version {actual}: request a fresh snapshot"
    )]
    VersionMismatch { expected: u64, actual: u64 },
    #[error(
        "delta changes endpoint {0}, which the rule set does not have: request a fresh snapshot"
    )]
    UnknownEndpoint(u32),
    #[error(
        "delta changes policy group {0}, which the rule set does not have: request a fresh snapshot"
    )]
    UnknownPolicyGroup(PolicyGroupId),
    #[error(
        "after the delta endpoint {endpoint} would name policy group {group}, which the rule set would not have: request a fresh snapshot"
    )]
    DanglingPolicyGroup { endpoint: u32, group: PolicyGroupId },
}

impl RuleSet {
    /// Applies `delta`, checking that it was computed against this version and that every
    /// endpoint still names a group the rule set has; on error the rule set is unchanged. The
    /// result keeps the canonical order the controller produces (endpoints by id, ipcache by
    /// CIDR, entries sorted).
    pub fn apply_delta(&mut self, delta: &NodeDelta) -> Result<(), DeltaError> {
        if !self.node.is_empty() && self.node != delta.node {
            return Err(DeltaError::WrongNode {
                ruleset: self.node.clone(),
                delta: delta.node.clone(),
            });
        }
        if self.version != delta.from_version {
            return Err(DeltaError::VersionMismatch {
                expected: delta.from_version,
                actual: self.version,
            });
        }
        if delta.node_removed {
            self.node = delta.node.clone();
            self.version = delta.version;
            self.endpoints.clear();
            self.policies.clear();
            self.ipcache.clear();
            self.rules.clear();
            self.names.clear();
            self.dns_resolvers.clear();
            return Ok(());
        }
        if !delta.endpoints_changed.is_empty() {
            let ids: BTreeSet<u32> = self.endpoints.iter().map(|e| e.id).collect();
            for change in &delta.endpoints_changed {
                if !ids.contains(&change.id) {
                    return Err(DeltaError::UnknownEndpoint(change.id));
                }
            }
        }
        for group in delta.policies_changed.keys() {
            if !self.policies.contains_key(group) || delta.policies_removed.contains(group) {
                return Err(DeltaError::UnknownPolicyGroup(*group));
            }
        }
        // Every endpoint left after the delta must name a group left after it.
        let has_group = |g: &PolicyGroupId| {
            delta.policies_added.contains_key(g)
                || (self.policies.contains_key(g) && !delta.policies_removed.contains(g))
        };
        let changed: BTreeMap<u32, &EndpointDelta> =
            delta.endpoints_changed.iter().map(|c| (c.id, c)).collect();
        let added: BTreeMap<u32, &Endpoint> =
            delta.endpoints_added.iter().map(|e| (e.id, e)).collect();
        let removed: BTreeSet<u32> = delta.endpoints_removed.iter().copied().collect();
        // Only a removed group or an endpoint's changed group can leave an endpoint already
        // here without its group: a delta with neither (a quarantined address in the ipcache,
        // a policy group's entries changing) need not read every endpoint. (A rule set already
        // holding such an endpoint, which the controller never sends, keeps denying it
        // everything.)
        let may_dangle = !delta.policies_removed.is_empty() || !delta.endpoints_changed.is_empty();
        for e in self.endpoints.iter().filter(|_| may_dangle) {
            if removed.contains(&e.id) || added.contains_key(&e.id) {
                continue;
            }
            let group = changed.get(&e.id).map_or(e.policy, |c| c.policy);
            if !has_group(&group) {
                return Err(DeltaError::DanglingPolicyGroup {
                    endpoint: e.id,
                    group,
                });
            }
        }
        for e in &delta.endpoints_added {
            if !has_group(&e.policy) {
                return Err(DeltaError::DanglingPolicyGroup {
                    endpoint: e.id,
                    group: e.policy,
                });
            }
        }

        if self.node != delta.node {
            self.node = delta.node.clone();
        }
        self.version = delta.version;
        for group in &delta.policies_removed {
            self.policies.remove(group);
        }
        for (group, change) in &delta.policies_changed {
            if let Some(p) = self.policies.get_mut(group) {
                change.apply(p);
            }
        }
        for (group, policy) in &delta.policies_added {
            self.policies.insert(*group, policy.clone());
        }
        for e in &mut self.endpoints {
            if let Some(change) = changed.get(&e.id) {
                e.identity = change.identity;
                e.ips = change.ips.clone();
                e.workload = change.workload.clone();
                e.policy = change.policy;
                e.quarantined = change.quarantined;
            }
        }
        if !removed.is_empty() || !added.is_empty() {
            self.endpoints
                .retain(|e| !removed.contains(&e.id) && !added.contains_key(&e.id));
            self.endpoints.extend(added.into_values().cloned());
            self.endpoints.sort_by_key(|e| e.id);
        }
        self.apply_ipcache(&delta.ipcache_removed, &delta.ipcache_upserted);
        for rule in &delta.rules_removed {
            self.rules.remove(rule);
        }
        for (id, rule) in &delta.rules_upserted {
            self.rules.insert(*id, rule.clone());
        }
        if !delta.names_removed.is_empty() || !delta.names_added.is_empty() {
            let removed: BTreeSet<Identity> = delta.names_removed.iter().copied().collect();
            let added: BTreeSet<Identity> = delta.names_added.iter().map(|n| n.identity).collect();
            self.names
                .retain(|n| !removed.contains(&n.identity) && !added.contains(&n.identity));
            self.names.extend(delta.names_added.iter().cloned());
            self.names.sort();
        }
        if let Some(resolvers) = &delta.dns_resolvers {
            self.dns_resolvers.clone_from(resolvers);
            self.dns_resolvers.sort_unstable();
            self.dns_resolvers.dedup();
        }
        Ok(())
    }

    /// The ipcache with `removed` taken out, then `upserted` put in (an upserted prefix wins
    /// over a removed one), sorted by prefix with one entry each.
    ///
    /// A delta usually touches a few entries of a list of hundreds (a quarantine adds one address
    /// to every node's): those are found by binary search in the sorted list and changed in
    /// place, not by rebuilding the whole list. A list that is not sorted with unique prefixes
    /// (never one the controller sends), or a large change, is rebuilt through a map.
    fn apply_ipcache(&mut self, removed: &[IpNetwork], upserted: &[IpCacheEntry]) {
        if removed.is_empty() && upserted.is_empty() {
            return;
        }
        let small = removed.len() + upserted.len() <= 32;
        if small && self.ipcache.is_sorted_by(|a, b| a.cidr < b.cidr) {
            for cidr in removed {
                if let Ok(i) = self.ipcache.binary_search_by(|e| e.cidr.cmp(cidr)) {
                    self.ipcache.remove(i);
                }
            }
            for e in upserted {
                match self.ipcache.binary_search_by(|x| x.cidr.cmp(&e.cidr)) {
                    Ok(i) => self.ipcache[i] = e.clone(),
                    Err(i) => self.ipcache.insert(i, e.clone()),
                }
            }
            return;
        }
        let mut cache: BTreeMap<IpNetwork, IpCacheEntry> = std::mem::take(&mut self.ipcache)
            .into_iter()
            .map(|e| (e.cidr, e))
            .collect();
        for cidr in removed {
            cache.remove(cidr);
        }
        for e in upserted {
            cache.insert(e.cidr, e.clone());
        }
        self.ipcache = cache.into_values().collect();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

/// The outcome of [`resolve`]: the enforced verdict, and the verdict of the staged view (what the
/// staged policies would make of it; the same as the enforced one when none applies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Decision {
    pub verdict: Verdict,
    pub rule: RuleId,
    /// The verdict of the staged view ([`Stage`]).
    pub audit_verdict: Verdict,
    pub audit_rule: RuleId,
}

impl Decision {
    /// Allowed, but the staged view would deny it.
    pub fn audit_would_deny(&self) -> bool {
        self.verdict == Verdict::Allow && self.audit_verdict == Verdict::Deny
    }
}

/// Precedence, once: among `matching` entries (all of which match the packet), walk the tiers
/// from the top. Within a tier the lowest priority number wins, and at equal priority deny beats
/// allow beats pass. `Pass` skips the rest of its tier. In the application tier an isolated
/// endpoint denies what no entry admits; otherwise the baseline tier decides, else allow.
/// Defined by [`Resolution`], whose per-identity form combines across peer identities.
pub fn resolve(policy: &DirectionPolicy, matching: &[&PolicyEntry]) -> Decision {
    Resolution::of(policy, matching).decision()
}

/// The reference decision for one direction of one endpoint.
pub fn decide_direction(
    policy: &DirectionPolicy,
    peer: Identity,
    protocol: Option<Protocol>,
    port: Option<u16>,
) -> Decision {
    decide_direction_peers(policy, &[peer], protocol, port)
}

/// A packet as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketTuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// `None` for protocols Bulkhead does not know: only protocol-wildcard entries match.
    pub protocol: Option<Protocol>,
    /// Destination port; `None` for port-less protocols and non-first fragments.
    pub dst_port: Option<u16>,
}

/// The decision of one node for a packet seen at `endpoint` in `direction`: the peer identity comes
/// from the ipcache (source address for ingress, destination for egress), the policy from the
/// endpoint's group ([`RuleSet::policy_of`]).
pub fn decide(
    ruleset: &RuleSet,
    endpoint: &Endpoint,
    direction: Direction,
    packet: &PacketTuple,
) -> Decision {
    let peer_ip = match direction {
        Direction::Ingress => packet.src,
        Direction::Egress => packet.dst,
    };
    let peer = ruleset.identity_of(peer_ip);
    decide_direction(
        ruleset.policy_of(endpoint).direction(direction),
        peer,
        packet.protocol,
        packet.dst_port,
    )
}

/// The reference decision over several peer identities at once: the entries matching any of
/// `peers`, resolved together (see [`precedence`]).
pub fn decide_direction_peers(
    policy: &DirectionPolicy,
    peers: &[Identity],
    protocol: Option<Protocol>,
    port: Option<u16>,
) -> Decision {
    let matching: Vec<&PolicyEntry> = policy
        .entries
        .iter()
        .filter(|e| peers.iter().any(|p| e.matches(*p, protocol, port)))
        .collect();
    resolve(policy, &matching)
}

/// [`decide`] for a packet whose destination address the endpoint learned, from DNS answers,
/// as the names of the name identities `names` ([`names::matching_names`]): in the egress
/// direction the entries of the address's own identity and of every name identity decide
/// together, with the one precedence. (Names describe destinations outside the cluster: in
/// the ingress direction, with no names, and for an address whose own identity is not `world`
/// or a CIDR identity ([`identity::names_apply_to`]: a pod, the host, a node), this is
/// [`decide`] — what a pod learned from DNS never changes how its traffic to another workload
/// is decided.)
pub fn decide_with_names(
    ruleset: &RuleSet,
    endpoint: &Endpoint,
    direction: Direction,
    packet: &PacketTuple,
    names: &[Identity],
) -> Decision {
    if direction == Direction::Ingress || names.is_empty() {
        return decide(ruleset, endpoint, direction, packet);
    }
    let own = ruleset.identity_of(packet.dst);
    if !identity::names_apply_to(own) {
        return decide(ruleset, endpoint, direction, packet);
    }
    let mut peers = Vec::with_capacity(names.len() + 1);
    peers.push(own);
    peers.extend(names.iter().copied().filter(|n| identity::is_name(*n)));
    decide_direction_peers(
        ruleset.policy_of(endpoint).direction(direction),
        &peers,
        packet.protocol,
        packet.dst_port,
    )
}

#[cfg(test)]
mod names_tests;
#[cfg(test)]
mod tests;
