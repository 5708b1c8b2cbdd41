//! The compiled, per-node rule set: the contract between the policy compiler and the data plane.
//!
//! A [`RuleSet`] lists the endpoints that live on one node, the IP/CIDR → identity entries they
//! need, and for each endpoint and direction a flat list of [`PolicyEntry`]s. Every entry carries
//! its tier, priority, action and the id of the rule it came from, so the data plane can report
//! *which* rule decided a packet.
//!
//! [`resolve`] is the one place where precedence is defined. [`decide`] applies it to the entries
//! that match one packet; the agent applies the very same function to every map key it writes, so
//! the kernel and this reference cannot disagree about precedence, only about matching — which is
//! what the differential tests check.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

/// Numeric security identity of a set of endpoints (or of a CIDR).
pub type Identity = u32;
/// Id of a rule, resolvable through [`RuleSet::rules`].
pub type RuleId = u32;

/// Reserved identities. Allocated identities start at [`FIRST_ALLOCATED_IDENTITY`]; CIDR identities
/// at [`FIRST_CIDR_IDENTITY`].
pub mod identity {
    use super::Identity;
    /// No identity is known for the address. Matches only wildcard entries.
    pub const UNKNOWN: Identity = 0;
    /// The node itself (host network namespace).
    pub const HOST: Identity = 1;
    /// Anything outside the cluster that no CIDR identity covers.
    pub const WORLD: Identity = 2;
    pub const FIRST_ALLOCATED_IDENTITY: Identity = 256;
    pub const FIRST_CIDR_IDENTITY: Identity = 1 << 24;
    /// Wildcard peer in a [`super::PolicyEntry`]: the entry matches every peer identity.
    pub const ANY: Identity = u32::MAX;
}

/// Rule id of the built-in "no policy applies: allowed" default.
pub const RULE_DEFAULT_ALLOW: RuleId = 0;

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
    /// Within a tier, lower numbers take precedence (ClusterNetworkPolicy priority 0–1000;
    /// quarantine exceptions use 0 and the quarantine deny 1).
    pub priority: u16,
    pub action: Action,
    /// Audit-mode entry: reported as what it would do, never enforced.
    pub audit: bool,
    pub rule: RuleId,
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
    /// Set when only audit-mode policies isolate the endpoint for this direction.
    pub audit_isolated_by: Option<RuleId>,
    pub entries: Vec<PolicyEntry>,
}

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
    #[serde(default)]
    pub quarantined: bool,
    pub ingress: DirectionPolicy,
    pub egress: DirectionPolicy,
}

impl Endpoint {
    pub fn direction(&self, direction: Direction) -> &DirectionPolicy {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    pub fn name(&self) -> String {
        format!("{}/{}", self.namespace, self.pod)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpCacheEntry {
    pub cidr: IpNetwork,
    pub identity: Identity,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RuleKind {
    NetworkPolicy,
    ClusterNetworkPolicy,
    ServicePolicy,
    Quarantine,
    Default,
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
            Some(i) => write!(f, "{:?} {object} {dir}[{i}]", self.kind),
            None => write!(f, "{:?} {object} {dir} default-deny", self.kind),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSet {
    pub node: String,
    /// Strictly increasing per node within one controller epoch.
    pub version: u64,
    pub endpoints: Vec<Endpoint>,
    pub ipcache: Vec<IpCacheEntry>,
    pub rules: BTreeMap<RuleId, RuleRef>,
}

impl RuleSet {
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
            None => format!("rule #{rule}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

/// The outcome of [`resolve`]: the enforced verdict, and what audit-mode policies would have done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Decision {
    pub verdict: Verdict,
    pub rule: RuleId,
    /// The verdict with audit-mode policies treated as enforced.
    pub audit_verdict: Verdict,
    pub audit_rule: RuleId,
}

impl Decision {
    /// Allowed, but audit-mode policies would have denied it.
    pub fn audit_would_deny(&self) -> bool {
        self.verdict == Verdict::Allow && self.audit_verdict == Verdict::Deny
    }
}

/// Precedence, once: among `matching` entries (all of which match the packet), walk the tiers
/// from the top. Within a tier the lowest priority number wins, and at equal priority deny beats
/// allow beats pass. `Pass` skips the rest of its tier. In the application tier an isolated
/// endpoint denies what no entry admits; otherwise the baseline tier decides, else allow.
pub fn resolve(policy: &DirectionPolicy, matching: &[&PolicyEntry]) -> Decision {
    let (verdict, rule) = resolve_one(matching, false, policy.isolated_by);
    let (audit_verdict, audit_rule) = resolve_one(
        matching,
        true,
        policy.isolated_by.or(policy.audit_isolated_by),
    );
    Decision {
        verdict,
        rule,
        audit_verdict,
        audit_rule,
    }
}

fn resolve_one(
    matching: &[&PolicyEntry],
    include_audit: bool,
    isolated_by: Option<RuleId>,
) -> (Verdict, RuleId) {
    for tier in [
        Tier::Quarantine,
        Tier::Admin,
        Tier::Application,
        Tier::Baseline,
    ] {
        let best = matching
            .iter()
            .filter(|e| e.tier == tier && (include_audit || !e.audit))
            .min_by_key(|e| (e.priority, action_rank(e.action), e.rule));
        match best {
            Some(e) if e.action == Action::Allow => return (Verdict::Allow, e.rule),
            Some(e) if e.action == Action::Deny => return (Verdict::Deny, e.rule),
            // Pass, or no entry: fall through to the next tier.
            _ => {}
        }
        if tier == Tier::Application
            && let Some(rule) = isolated_by
        {
            return (Verdict::Deny, rule);
        }
    }
    (Verdict::Allow, RULE_DEFAULT_ALLOW)
}

fn action_rank(action: Action) -> u8 {
    match action {
        Action::Deny => 0,
        Action::Allow => 1,
        Action::Pass => 2,
    }
}

/// The reference decision for one direction of one endpoint.
pub fn decide_direction(
    policy: &DirectionPolicy,
    peer: Identity,
    protocol: Option<Protocol>,
    port: Option<u16>,
) -> Decision {
    let matching: Vec<&PolicyEntry> = policy
        .entries
        .iter()
        .filter(|e| e.matches(peer, protocol, port))
        .collect();
    resolve(policy, &matching)
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
/// from the ipcache (source address for ingress, destination for egress).
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
        endpoint.direction(direction),
        peer,
        packet.protocol,
        packet.dst_port,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        peer: Identity,
        tier: Tier,
        priority: u16,
        action: Action,
        rule: RuleId,
    ) -> PolicyEntry {
        PolicyEntry {
            peer,
            protocol: Some(Protocol::Tcp),
            ports: PortRange::single(80),
            tier,
            priority,
            action,
            audit: false,
            rule,
        }
    }

    #[test]
    fn admin_deny_beats_application_allow() {
        let p = DirectionPolicy {
            isolated_by: Some(9),
            audit_isolated_by: None,
            entries: vec![
                entry(300, Tier::Application, 0, Action::Allow, 1),
                entry(identity::ANY, Tier::Admin, 10, Action::Deny, 2),
            ],
        };
        let d = decide_direction(&p, 300, Some(Protocol::Tcp), Some(80));
        assert_eq!((d.verdict, d.rule), (Verdict::Deny, 2));
    }

    #[test]
    fn pass_skips_to_application_tier_and_isolation_denies() {
        let p = DirectionPolicy {
            isolated_by: Some(9),
            audit_isolated_by: None,
            entries: vec![
                entry(300, Tier::Admin, 5, Action::Pass, 1),
                entry(300, Tier::Admin, 6, Action::Allow, 2),
                entry(300, Tier::Baseline, 0, Action::Allow, 3),
            ],
        };
        let d = decide_direction(&p, 300, Some(Protocol::Tcp), Some(80));
        assert_eq!((d.verdict, d.rule), (Verdict::Deny, 9));
    }

    #[test]
    fn baseline_applies_only_when_not_isolated() {
        let mut p = DirectionPolicy {
            isolated_by: None,
            audit_isolated_by: None,
            entries: vec![entry(300, Tier::Baseline, 0, Action::Deny, 3)],
        };
        let d = decide_direction(&p, 300, Some(Protocol::Tcp), Some(80));
        assert_eq!((d.verdict, d.rule), (Verdict::Deny, 3));
        p.entries
            .push(entry(300, Tier::Application, 0, Action::Allow, 4));
        let d = decide_direction(&p, 300, Some(Protocol::Tcp), Some(80));
        assert_eq!((d.verdict, d.rule), (Verdict::Allow, 4));
    }

    #[test]
    fn deny_wins_at_equal_priority_and_audit_only_reports() {
        let mut deny = entry(identity::ANY, Tier::Application, 0, Action::Deny, 5);
        deny.audit = true;
        let p = DirectionPolicy {
            isolated_by: None,
            audit_isolated_by: None,
            entries: vec![entry(300, Tier::Application, 0, Action::Allow, 4), deny],
        };
        let d = decide_direction(&p, 300, Some(Protocol::Tcp), Some(80));
        assert_eq!((d.verdict, d.rule), (Verdict::Allow, 4));
        assert_eq!((d.audit_verdict, d.audit_rule), (Verdict::Deny, 5));
        assert!(d.audit_would_deny());
    }

    #[test]
    fn fragments_match_only_all_port_entries() {
        let mut all = entry(300, Tier::Application, 0, Action::Allow, 1);
        all.ports = PortRange::ALL;
        let one = entry(300, Tier::Application, 0, Action::Allow, 2);
        assert!(all.matches(300, Some(Protocol::Tcp), None));
        assert!(!one.matches(300, Some(Protocol::Tcp), None));
        assert!(!one.matches(301, Some(Protocol::Tcp), Some(80)));
        assert!(one.matches(300, Some(Protocol::Tcp), Some(80)));
    }
}
