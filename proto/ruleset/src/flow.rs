//! Flow records in the contract's vocabulary: what an agent reports about a packet its
//! endpoint's policy decided, and the quarantine actions the controller keeps among them.
//!
//! Every enumerated value prints (`Display`) and parses (`FromStr`) as the exact text the
//! agent, the controller's API and the CLI have always shown (`ingress`, `audit-would-deny`,
//! `denied_policy`, …), and serialises as that text; [`FlowRule`] prints the deciding rule as
//! agents described it before records were typed. Nothing parses those texts back: the parts
//! travel as fields.

use std::{fmt, net::IpAddr, str::FromStr};

use serde::{Serialize, Serializer};

use crate::{
    Direction, Identity, NamePattern, PodKey, RULE_DEFAULT_ALLOW, RULE_MISSING_POLICY,
    RULE_UNRELATED_ICMP_ERROR, RuleId, RuleKind, RuleRef, RuleSet,
};

/// A name that is none of an enumeration's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}: expected one of {expected}")]
pub struct UnknownValue {
    /// What was being parsed (`flow verdict`, …).
    pub what: &'static str,
    pub value: String,
    /// The accepted values, comma-separated.
    pub expected: &'static str,
}

/// An enumeration whose values are named by fixed texts: `ALL`, `as_str`, `Display`, `FromStr`
/// and `Serialize` from one table.
macro_rules! named {
    (
        $(#[$meta:meta])*
        pub enum $name:ident ($what:literal, $expected:literal) {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )*
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            /// The value's text.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )*
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;

            fn from_str(s: &str) -> Result<$name, UnknownValue> {
                match s {
                    $( $text => Ok($name::$variant), )*
                    _ => Err(UnknownValue {
                        what: $what,
                        value: s.to_string(),
                        expected: $expected,
                    }),
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

named! {
    /// What made the agent report a flow.
    pub enum FlowKind ("flow kind", "new, denied, revoked, audit") {
        /// First packet of a new connection.
        New => "new",
        /// A packet the policy refused (rate-limited per flow).
        Denied => "denied",
        /// A tracked connection cut because the policy no longer admits it.
        Revoked => "revoked",
        /// Admitted, reported because audit-mode policy would deny it.
        Audit => "audit",
    }
}

named! {
    /// What happened to the flow.
    pub enum FlowVerdict ("flow verdict", "allowed, denied, audit-would-deny") {
        Allowed => "allowed",
        Denied => "denied",
        /// Allowed, but an audit-mode policy would have denied it.
        AuditWouldDeny => "audit-would-deny",
    }
}

named! {
    /// Why the programs handled the packet as they did: the kernel's per-endpoint counter
    /// reasons (`bulkhead_common::reason`, in that order), and `unknown` for a code this build
    /// does not know (programs newer than the agent).
    pub enum FlowReason ("flow reason", "allowed_new, allowed_tracked, audit_would_deny, denied_policy, drop_malformed, drop_spoofed, drop_quarantine, drop_lockdown, drop_revoked, drop_unparseable, passed_non_ip, drop_prefilter, allowed_untracked, unknown") {
        AllowedNew => "allowed_new",
        AllowedTracked => "allowed_tracked",
        AuditWouldDeny => "audit_would_deny",
        DeniedPolicy => "denied_policy",
        DropMalformed => "drop_malformed",
        DropSpoofed => "drop_spoofed",
        DropQuarantine => "drop_quarantine",
        DropLockdown => "drop_lockdown",
        DropRevoked => "drop_revoked",
        DropUnparseable => "drop_unparseable",
        PassedNonIp => "passed_non_ip",
        DropPrefilter => "drop_prefilter",
        AllowedUntracked => "allowed_untracked",
        Unknown => "unknown",
    }
}

impl FlowReason {
    /// The reason of a kernel reason code (`bulkhead_common::reason`).
    pub fn from_code(code: u32) -> FlowReason {
        match FlowReason::ALL.get(code as usize) {
            Some(r) if *r != FlowReason::Unknown => *r,
            _ => FlowReason::Unknown,
        }
    }
}

named! {
    /// A quarantine action the controller records among the flows.
    pub enum QuarantineAction ("quarantine action", "quarantine, release, expire") {
        Quarantine => "quarantine",
        Release => "release",
        /// The quarantine's time ran out.
        Expire => "expire",
    }
}

impl QuarantineAction {
    /// The verdict the flow views show for it: a release and an expiry both lift it.
    pub fn verdict(self) -> &'static str {
        match self {
            QuarantineAction::Quarantine => "quarantined",
            QuarantineAction::Release | QuarantineAction::Expire => "released",
        }
    }
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Direction {
    type Err = UnknownValue;

    fn from_str(s: &str) -> Result<Direction, UnknownValue> {
        match s {
            "ingress" => Ok(Direction::Ingress),
            "egress" => Ok(Direction::Egress),
            _ => Err(UnknownValue {
                what: "direction",
                value: s.to_string(),
                expected: "ingress, egress",
            }),
        }
    }
}

/// Longest namespace (a DNS label, as Kubernetes limits it).
pub const MAX_NAMESPACE_BYTES: usize = 63;
/// Longest object name (a DNS subdomain, as Kubernetes limits it).
pub const MAX_NAME_BYTES: usize = 253;

/// Why a text cannot be a namespace or a name in a flow record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadName {
    #[error("is empty")]
    Empty,
    #[error("is {len} bytes, longer than {max}")]
    TooLong { len: usize, max: usize },
    #[error("holds {0:?}, which no Kubernetes name holds")]
    Character(char),
}

/// A namespace or name within `max` bytes, without whitespace, control characters or `/`
/// (so that the texts of two different records' names never read the same); empty only
/// where `may_be_empty` (a cluster-scoped policy's namespace).
pub fn check_name(s: &str, max: usize, may_be_empty: bool) -> Result<(), BadName> {
    if s.is_empty() && !may_be_empty {
        return Err(BadName::Empty);
    }
    if s.len() > max {
        return Err(BadName::TooLong { len: s.len(), max });
    }
    // The controller checks every name of every record agents report: ASCII without spaces,
    // control characters or `/` (every Kubernetes name) passes on a look at its bytes.
    if !s.bytes().any(|b| b <= b' ' || b == b'/' || b >= 0x7f) {
        return Ok(());
    }
    match s
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || *c == '/')
    {
        Some(c) => Err(BadName::Character(c)),
        None => Ok(()),
    }
}

impl PodKey {
    /// Whether the pod's namespace and name are ones Kubernetes could have given it (see
    /// [`check_name`]); the error says which part is not.
    pub fn check(&self) -> Result<(), (&'static str, BadName)> {
        check_name(&self.namespace, MAX_NAMESPACE_BYTES, false).map_err(|e| ("namespace", e))?;
        check_name(&self.name, MAX_NAME_BYTES, false).map_err(|e| ("name", e))
    }
}

impl Serialize for PodKey {
    /// As `namespace/name`.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The endpoint at which a verdict was made: its pod, or, when the agent could not name it,
/// its node-local id (written `endpoint#ID`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EndpointRef {
    Pod(PodKey),
    Unnamed(u32),
}

impl EndpointRef {
    pub fn pod(&self) -> Option<&PodKey> {
        match self {
            EndpointRef::Pod(p) => Some(p),
            EndpointRef::Unnamed(_) => None,
        }
    }
}

impl fmt::Display for EndpointRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointRef::Pod(p) => p.fmt(f),
            EndpointRef::Unnamed(id) => write!(f, "endpoint#{id}"),
        }
    }
}

/// Text that is neither `namespace/pod` nor `endpoint#ID`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("name the endpoint as NAMESPACE/POD or endpoint#ID, not {0:?}")]
pub struct BadEndpointRef(pub String);

impl FromStr for EndpointRef {
    type Err = BadEndpointRef;

    fn from_str(s: &str) -> Result<EndpointRef, BadEndpointRef> {
        if let Some(id) = s.strip_prefix("endpoint#") {
            return id
                .parse()
                .map(EndpointRef::Unnamed)
                .map_err(|_| BadEndpointRef(s.to_string()));
        }
        s.parse()
            .map(EndpointRef::Pod)
            .map_err(|_| BadEndpointRef(s.to_string()))
    }
}

impl Serialize for EndpointRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What decided a flow: a rule of the node's rule set, or one of the reserved cases the
/// programs report.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FlowRule {
    /// A rule of the rule set in force (a policy's rule or its isolation default).
    Rule(RuleRef),
    /// No policy applies: allowed by default ([`RULE_DEFAULT_ALLOW`]).
    DefaultAllow,
    /// The endpoint's policy group is missing from the rule set: it is locked down
    /// ([`RULE_MISSING_POLICY`]).
    MissingPolicy,
    /// An ICMP error that relates to no tracked connection, dropped
    /// ([`RULE_UNRELATED_ICMP_ERROR`]).
    UnrelatedIcmpError,
    /// An id the rule set in force does not name.
    Unnamed(RuleId),
}

impl FlowRule {
    /// The rule as the service graph and the metrics count it, one per text: a `Default`
    /// rule's text names only its direction, so its namespace, name and index are left out.
    pub fn label_key(&self) -> std::borrow::Cow<'_, FlowRule> {
        use std::borrow::Cow;
        match self {
            FlowRule::Rule(r)
                if r.kind == RuleKind::Default
                    && (!r.namespace.is_empty() || !r.name.is_empty() || r.index.is_some()) =>
            {
                Cow::Owned(FlowRule::Rule(RuleRef {
                    kind: RuleKind::Default,
                    namespace: String::new(),
                    name: String::new(),
                    direction: r.direction,
                    index: None,
                }))
            }
            _ => Cow::Borrowed(self),
        }
    }
}

impl fmt::Display for FlowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlowRule::Rule(r) => r.fmt(f),
            FlowRule::DefaultAllow => f.write_str("default allow (no policy applies)"),
            FlowRule::MissingPolicy => {
                f.write_str("policy group missing from the rule set: endpoint locked down")
            }
            FlowRule::UnrelatedIcmpError => {
                f.write_str("ICMP error unrelated to any tracked connection")
            }
            FlowRule::Unnamed(id) => write!(f, "rule #{id}"),
        }
    }
}

impl Serialize for FlowRule {
    /// As its text.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl RuleSet {
    /// What the rule id of a flow event stands for in this rule set: an unrelated ICMP error,
    /// else one of its rules, else the reserved case the id is reserved for, else an unnamed
    /// id. Its text is what [`RuleSet::describe`] says, but for unrelated ICMP errors.
    pub fn flow_rule(&self, rule: RuleId) -> FlowRule {
        if rule == RULE_UNRELATED_ICMP_ERROR {
            return FlowRule::UnrelatedIcmpError;
        }
        match self.rules.get(&rule) {
            Some(r) => FlowRule::Rule(r.clone()),
            None if rule == RULE_DEFAULT_ALLOW => FlowRule::DefaultAllow,
            None if rule == RULE_MISSING_POLICY => FlowRule::MissingPolicy,
            None => FlowRule::Unnamed(rule),
        }
    }
}

/// One flow record as an agent reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowRecord {
    pub time_unix_nanos: u64,
    /// The endpoint at which the verdict was made.
    pub endpoint: EndpointRef,
    pub direction: Direction,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    /// IANA protocol number.
    pub protocol: u8,
    pub kind: FlowKind,
    pub verdict: FlowVerdict,
    pub rule: FlowRule,
    pub rule_id: RuleId,
    pub local_identity: Identity,
    pub peer_identity: Identity,
    /// The pod at the other end, when known.
    pub peer: Option<PodKey>,
    /// The DNS names (patterns of the rule set's `names`: an exact name, or `*.suffix` for a
    /// wildcard) the endpoint had learned the peer's address for when the packet was seen,
    /// sorted, at most [`MAX_PEER_NAMES`]; empty for peers not learned from DNS (every pod peer,
    /// and records of agents before names).
    pub peer_names: Vec<NamePattern>,
    pub reason: FlowReason,
    pub packets: u64,
    pub bytes: u64,
    /// What the staged view (every staged policy in force, each replacing the enforced policy
    /// of its name) makes of the flow, when its verdict or deciding rule differs from the
    /// enforced one; `None` when they agree.
    pub staged: Option<StagedOutcome>,
}

/// Most names one flow record carries for its peer: the kernel keeps 4 per learned address;
/// the contract leaves room for more without letting a record carry an unbounded list.
pub const MAX_PEER_NAMES: usize = 8;

/// The staged view's verdict of a flow and the rule that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedOutcome {
    /// [`FlowVerdict::Allowed`] or [`FlowVerdict::Denied`].
    pub verdict: FlowVerdict,
    pub rule: FlowRule,
    pub rule_id: RuleId,
}

impl FlowRecord {
    /// The verdict with the staged policies in force.
    pub fn staged_verdict(&self) -> FlowVerdict {
        match (&self.staged, self.verdict) {
            (Some(s), _) => s.verdict,
            (None, FlowVerdict::AuditWouldDeny) => FlowVerdict::Denied,
            (None, v) => v,
        }
    }

    /// The address at the other end from the reporting endpoint.
    pub fn peer_address(&self) -> IpAddr {
        match self.direction {
            Direction::Ingress => self.src,
            Direction::Egress => self.dst,
        }
    }
}

/// A quarantine action, kept among the flows so that the flow views show when a pod was cut
/// off and let go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantineEvent {
    pub time_unix_nanos: u64,
    /// The pod quarantined or released.
    pub pod: PodKey,
    pub action: QuarantineAction,
    /// The Quarantine object (in the pod's namespace).
    pub quarantine: String,
    /// Why the pod was quarantined.
    pub reason: String,
    /// Who acted.
    pub actor: String,
}

impl QuarantineEvent {
    /// The text the flow views show as its rule.
    pub fn rule_text(&self) -> String {
        format!(
            "Quarantine {}/{}: {}",
            self.pod.namespace, self.quarantine, self.reason
        )
    }

    /// The text the flow views show as its reason.
    pub fn reason_text(&self) -> String {
        format!("by {}", self.actor)
    }
}

/// What the controller's flow store holds: a flow an agent reported, or a quarantine action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlowEntry {
    Flow(FlowRecord),
    Quarantine(QuarantineEvent),
}

impl FlowEntry {
    pub fn time_unix_nanos(&self) -> u64 {
        match self {
            FlowEntry::Flow(r) => r.time_unix_nanos,
            FlowEntry::Quarantine(q) => q.time_unix_nanos,
        }
    }

    /// The verdict's text (a quarantine action's is `quarantined` or `released`).
    pub fn verdict_str(&self) -> &'static str {
        match self {
            FlowEntry::Flow(r) => r.verdict.as_str(),
            FlowEntry::Quarantine(q) => q.action.verdict(),
        }
    }
}

#[cfg(test)]
mod tests;
