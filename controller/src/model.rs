//! The engine's input model: inventory objects and policies in one normalized form.
//!
//! The loaders ([`crate::load`]) turn Kubernetes YAML (NetworkPolicy, ClusterNetworkPolicy,
//! ServicePolicy) into [`Policy`]; the engine never sees the upstream shapes, so every policy
//! kind is compiled by the same code.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::SystemTime;

use ipnetwork::IpNetwork;

use crate::ruleset::{Action, Direction, NamePattern, PortRange, Protocol, RuleKind, Tier};
use crate::selector::Selector;

pub type Labels = BTreeMap<String, String>;

/// The label the API server puts on every namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    /// As written; the engine adds [`NAMESPACE_NAME_LABEL`].
    pub labels: Labels,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub labels: Labels,
    /// The `InternalIP` and `ExternalIP` addresses of `status.addresses` (both families),
    /// sorted, without duplicates: what a ClusterNetworkPolicy `nodes` peer selects.
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// `default` when the manifest names none.
    pub service_account: String,
    /// `spec.nodeName`; pods without one are placed on [`crate::EngineConfig::unscheduled_node`].
    pub node_name: Option<String>,
    /// `status.podIPs` (or `status.podIP`), at most one per family in practice.
    pub ips: Vec<IpAddr>,
    /// The addresses were made up (the pod had none): they never match ipBlock/CIDR peers.
    pub synthetic_ips: bool,
    pub ports: Vec<ContainerPort>,
    /// Owning workload, `Kind/name`.
    pub workload: Option<String>,
    /// Host-network pods are not endpoints and are never selected (as upstream).
    pub host_network: bool,
}

impl Pod {
    pub fn key(&self) -> PodKey {
        PodKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

/// A pod by namespace and name (the contract's, shared with the agent).
pub use crate::ruleset::PodKey;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub kind: RuleKind,
    /// Empty for cluster-scoped policies.
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{:?} {}", self.kind, self.name)
        } else {
            write!(f, "{:?} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// Which namespaces a pod selection looks in.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NamespaceScope {
    /// Exactly this namespace (a namespaced policy's own, or a named one).
    Named(String),
    /// Namespaces whose labels (including `kubernetes.io/metadata.name`) match.
    Selected(Selector),
}

/// A set of pods, by namespace, labels and optionally service account.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodSelection {
    pub namespaces: NamespaceScope,
    pub pods: Selector,
    pub service_account: Option<String>,
}

impl PodSelection {
    /// Whether the selection names [`crate::ruleset::CLUSTER_LABEL`] (in its namespace or pod
    /// selector, with any operator): only such a selection may match a peer cluster's pods, so
    /// every policy written before peering keeps meaning "this cluster".
    pub fn names_cluster(&self) -> bool {
        let named = |s: &Selector| s.keys().any(|k| k == crate::ruleset::CLUSTER_LABEL);
        named(&self.pods) || matches!(&self.namespaces, NamespaceScope::Selected(s) if named(s))
    }
}

/// An ipBlock / network peer: addresses in `cidr` but in none of `except`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CidrPeer {
    pub cidr: IpNetwork,
    pub except: Vec<IpNetwork>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    /// Every address, inside the cluster or not (NetworkPolicy rule without from/to).
    Any,
    Pods(PodSelection),
    /// Addresses in a CIDR. Pods whose (real) address falls inside match too.
    Cidr(CidrPeer),
    /// Everything outside the cluster (ServicePolicy entity `world`).
    World,
    /// Every pod, and the host (ServicePolicy entity `cluster`).
    Cluster,
    /// The node's host network namespace (ServicePolicy entity `host`).
    Host,
    /// The addresses of the Nodes whose labels the selector matches (ClusterNetworkPolicy
    /// `nodes`, egress only, as upstream). Each Node's addresses carry a node identity with its
    /// labels; see [`crate::engine`].
    Nodes(Selector),
    /// Destinations the pod resolved through DNS to a name the pattern matches
    /// (ClusterNetworkPolicy `domainNames`, ServicePolicy `fqdn`). Egress `Allow` rules only:
    /// the loaders refuse it anywhere else (see [`crate::ruleset::names`] for why).
    Name(NamePattern),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortSpec {
    /// `protocol: None` means every protocol (with `ports` = all).
    Range {
        protocol: Option<Protocol>,
        ports: PortRange,
    },
    /// A container port name, resolved against the destination pod. `protocol: None` matches the
    /// named port whatever its protocol (ClusterNetworkPolicy `destinationNamedPort`).
    Named {
        protocol: Option<Protocol>,
        name: String,
    },
}

impl PortSpec {
    pub const ANY: PortSpec = PortSpec::Range {
        protocol: None,
        ports: PortRange::ALL,
    };
}

/// Whether a policy isolates its subject for a direction (what no rule admits is denied).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Isolation {
    #[default]
    None,
    Enforce,
    /// Audit-mode ServicePolicy: reported as denied, not enforced.
    Audit,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub direction: Direction,
    /// Position in the policy's list for `direction` (what rule ids and explanations name).
    pub index: u32,
    /// Non-empty.
    pub peers: Vec<Peer>,
    /// Non-empty; [`PortSpec::ANY`] for "all ports".
    pub ports: Vec<PortSpec>,
    pub tier: Tier,
    pub priority: u16,
    pub action: Action,
    pub audit: bool,
}

/// Any policy kind, normalized.
///
/// A Quarantine (`key.kind` [`RuleKind::Quarantine`], `quarantine` set) is a policy too: its
/// subject is its namespace and pod selector (or, with [`QuarantineSpec::pods`], the named pods),
/// its rules are the `allow` exceptions — each once per direction, same index, tier
/// [`Tier::Quarantine`], priority 0, `Allow`. The engine always adds the deny-all below them
/// (tier Quarantine, priority 1, every peer, protocol and port, blamed on the policy's default
/// rule: index `None`); the loader marks it with `Enforce` isolation in both directions. Unlike other kinds it applies to the
/// selected *pods*, not to their identities: see [`crate::engine`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Policy {
    pub key: PolicyKey,
    pub subject: PodSelection,
    pub ingress_isolation: Isolation,
    pub egress_isolation: Isolation,
    pub rules: Vec<Rule>,
    /// Set exactly for Quarantine policies.
    pub quarantine: Option<QuarantineSpec>,
}

/// What a Quarantine has beyond a policy's fields.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QuarantineSpec {
    /// Pods of the policy's namespace by name (sorted, no duplicates); `None`: the subject's pod
    /// selector decides.
    pub pods: Option<Vec<String>>,
    /// Why (shown by explanations and flows); never empty.
    pub reason: String,
    /// From this instant on the quarantine is inactive (as if deleted).
    pub expires_at: Option<SystemTime>,
}

impl QuarantineSpec {
    /// Whether the quarantine is in force at `now`.
    pub fn active_at(&self, now: SystemTime) -> bool {
        self.expires_at.is_none_or(|t| now < t)
    }
}

impl Policy {
    pub fn isolation(&self, direction: Direction) -> Isolation {
        match direction {
            Direction::Ingress => self.ingress_isolation,
            Direction::Egress => self.egress_isolation,
        }
    }

    /// Every DNS name pattern the policy's rules name as peers.
    pub fn names(&self) -> impl Iterator<Item = &NamePattern> + '_ {
        self.rules
            .iter()
            .flat_map(|r| r.peers.iter())
            .filter_map(|p| match p {
                Peer::Name(n) => Some(n),
                _ => None,
            })
    }

    /// Whether some rule names a `nodes` peer (node identities exist while one does).
    pub fn uses_nodes(&self) -> bool {
        self.rules
            .iter()
            .flat_map(|r| r.peers.iter())
            .any(|p| matches!(p, Peer::Nodes(_)))
    }

    /// Every CIDR the policy mentions (including `except` ones): each gets its own identity.
    pub fn cidrs(&self) -> impl Iterator<Item = IpNetwork> + '_ {
        self.rules
            .iter()
            .flat_map(|r| r.peers.iter())
            .filter_map(|p| match p {
                Peer::Cidr(c) => Some(c),
                _ => None,
            })
            .flat_map(|c| std::iter::once(c.cidr).chain(c.except.iter().copied()))
    }
}

/// One input object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Node(Node),
    Policy(Policy),
}
