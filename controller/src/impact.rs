//! What-if before applying (`bulkhead policy impact`, issue 18): the recorded flows replayed
//! against the current policies and against the current policies changed by a proposal, and
//! every edge whose verdict or deciding rule would change.
//!
//! * **The proposal** is multi-document YAML of NetworkPolicy, ClusterNetworkPolicy and
//!   ServicePolicy objects, read by the manifest loader ([`crate::load::load_str`]: the same
//!   validation as a manifest file). An object with the kind, namespace and name of a current
//!   policy replaces it (an edit), another one is added; deletions are named apart, as
//!   `KIND/NAMESPACE/NAME` (`ClusterNetworkPolicy/NAME`) ([`parse_delete`]), because a
//!   document cannot both be valid and say "gone".
//! * **Before and after** are two engines compiled from the live engine's inputs
//!   ([`crate::PolicyEngine::objects`], at its clock, so Quarantines are as in force): one as
//!   they are, one with the proposal applied. The live engine is only read, under its lock, for
//!   the time it takes to copy its objects: nothing a what-if does reaches enforcement.
//! * **Edges**: the flow records are folded first ([`Edges`]) by where the verdict was made
//!   (the reporting pod and direction), the peer (its pod when the record names one, else its
//!   address), protocol and destination port, with counts and first/last seen. Each edge is
//!   decided once per engine with [`crate::ruleset::decide_direction`] on the policy group of
//!   the pod's endpoint in that engine's rule set — the reference decision the data plane is
//!   tested against — and the peer's identity in that engine (its pod's, else what the rule
//!   set's ipcache says of its address).
//! * **Reported**: every edge whose enforced verdict, deciding rule, or audit verdict changes,
//!   rules named as everywhere else (`NetworkPolicy shop/db ingress[0]`). An edge *breaks* when
//!   it was observed admitted, is allowed now and would be denied: `--fail-on-deny` fails on
//!   those.
//!
//! Records that no policy decided (malformed, spoofed, unparseable packets, endpoints locked
//! down) are not replayed, and records of pods the controller no longer has cannot be: both are
//! counted.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
    time::SystemTime,
};

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::{
    EngineConfig, PolicyEngine,
    model::{Object, Policy, PolicyKey},
    ruleset::{
        Decision, Direction, EndpointRef, FlowReason, FlowRecord, FlowVerdict, Identity, PodKey,
        Protocol, RuleId, RuleKind, RuleSet, Verdict, decide_direction,
    },
};

/// The largest proposal read (the API refuses a larger body before reading it).
pub const MAX_PROPOSAL_BYTES: usize = 4 << 20;

/// The kinds a proposal may hold.
pub const PROPOSAL_KINDS: [RuleKind; 3] = [
    RuleKind::NetworkPolicy,
    RuleKind::ClusterNetworkPolicy,
    RuleKind::ServicePolicy,
];

/// Why a proposal cannot be judged. Every one is the user's to fix (an HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposalError {
    #[error("the proposal is not valid:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
    #[error(
        "the proposal holds {0}: a proposal holds only NetworkPolicy, ClusterNetworkPolicy and ServicePolicy objects"
    )]
    UnsupportedKind(String),
    #[error(
        "delete {0:?}: name the policy as KIND/NAMESPACE/NAME (ClusterNetworkPolicy/NAME), KIND one of NetworkPolicy, ClusterNetworkPolicy, ServicePolicy"
    )]
    BadDelete(String),
    #[error("delete {0}: there is no such policy")]
    NoSuchPolicy(String),
    #[error("the proposal both changes and deletes {0}: keep one")]
    ChangedAndDeleted(String),
    #[error("the proposal is empty: give policies to add or change, or policies to delete")]
    Empty,
    #[error("the proposal is {0} bytes; at most {MAX_PROPOSAL_BYTES} are read")]
    TooLarge(usize),
    #[error("the changed policies do not compile: {0}")]
    Compile(String),
}

/// A proposed change: policies to add or replace, and policies to delete.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Proposal {
    pub upserts: Vec<Policy>,
    pub deletes: Vec<PolicyKey>,
    /// Documents the loader skipped on purpose (kinds it does not read).
    pub warnings: Vec<String>,
}

/// `kind/namespace/name` as users write it (`ClusterNetworkPolicy/name`).
pub fn policy_name(key: &PolicyKey) -> String {
    if key.namespace.is_empty() {
        format!("{}/{}", key.kind, key.name)
    } else {
        format!("{}/{}/{}", key.kind, key.namespace, key.name)
    }
}

/// Parses a deletion: `KIND/NAMESPACE/NAME`, or `ClusterNetworkPolicy/NAME` (cluster-scoped);
/// the kind in any case.
pub fn parse_delete(s: &str) -> Result<PolicyKey, ProposalError> {
    let bad = || ProposalError::BadDelete(s.to_string());
    let parts: Vec<&str> = s.split('/').collect();
    let kind = PROPOSAL_KINDS
        .into_iter()
        .find(|k| {
            parts
                .first()
                .is_some_and(|p| p.eq_ignore_ascii_case(k.as_str()))
        })
        .ok_or_else(bad)?;
    let (namespace, name) = match (&kind, parts.as_slice()) {
        (RuleKind::ClusterNetworkPolicy, [_, name]) => (String::new(), *name),
        (RuleKind::NetworkPolicy | RuleKind::ServicePolicy, [_, ns, name]) if !ns.is_empty() => {
            (ns.to_string(), *name)
        }
        _ => return Err(bad()),
    };
    if name.is_empty() {
        return Err(bad());
    }
    Ok(PolicyKey {
        kind,
        namespace,
        name: name.to_string(),
    })
}

/// Reads a proposal: `text` (multi-document YAML, may be empty when only deleting) and the
/// policies to delete (`KIND/NAMESPACE/NAME`).
pub fn parse_proposal(text: &str, deletes: &[String]) -> Result<Proposal, ProposalError> {
    let keys = deletes
        .iter()
        .map(|d| parse_delete(d.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    proposal(text, keys)
}

/// Checks a policy to delete named by its parts: a kind a proposal may hold, a namespace
/// exactly for the namespaced kinds, a name.
pub fn check_delete(key: &PolicyKey) -> Result<(), ProposalError> {
    let namespaced = match key.kind {
        RuleKind::ClusterNetworkPolicy => false,
        RuleKind::NetworkPolicy | RuleKind::ServicePolicy => true,
        _ => return Err(ProposalError::BadDelete(policy_name(key))),
    };
    if key.name.is_empty() || key.namespace.is_empty() == namespaced {
        return Err(ProposalError::BadDelete(policy_name(key)));
    }
    Ok(())
}

/// [`parse_proposal`] with the policies to delete given as keys.
pub fn proposal(text: &str, deletes: Vec<PolicyKey>) -> Result<Proposal, ProposalError> {
    if text.len() > MAX_PROPOSAL_BYTES {
        return Err(ProposalError::TooLarge(text.len()));
    }
    let loaded = crate::load::load_str(Path::new("proposal"), text);
    if !loaded.errors.is_empty() {
        return Err(ProposalError::Invalid(
            loaded.errors.iter().map(ToString::to_string).collect(),
        ));
    }
    let mut upserts = Vec::new();
    for o in loaded.objects {
        match o {
            Object::Policy(p) if PROPOSAL_KINDS.contains(&p.key.kind) => upserts.push(p),
            Object::Policy(p) => return Err(ProposalError::UnsupportedKind(policy_name(&p.key))),
            Object::Namespace(n) => {
                return Err(ProposalError::UnsupportedKind(format!(
                    "Namespace {}",
                    n.name
                )));
            }
            Object::Node(n) => {
                return Err(ProposalError::UnsupportedKind(format!("Node {}", n.name)));
            }
            Object::Pod(p) => {
                return Err(ProposalError::UnsupportedKind(format!(
                    "Pod {}/{} (or a Deployment's)",
                    p.namespace, p.name
                )));
            }
        }
    }
    let mut deleted = Vec::new();
    for key in deletes {
        check_delete(&key)?;
        if upserts.iter().any(|p| p.key == key) {
            return Err(ProposalError::ChangedAndDeleted(policy_name(&key)));
        }
        if !deleted.contains(&key) {
            deleted.push(key);
        }
    }
    if upserts.is_empty() && deleted.is_empty() {
        return Err(ProposalError::Empty);
    }
    Ok(Proposal {
        upserts,
        deletes: deleted,
        warnings: loaded.skipped.iter().map(ToString::to_string).collect(),
    })
}

/// What the proposal does to the current policies, by name (`kind/namespace/name`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProposalSummary {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    /// Given, but equal to the current policy.
    pub unchanged: Vec<String>,
    pub deleted: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Applies a proposal to a set of objects: what the "after" engine compiles.
pub fn apply_proposal(
    objects: &mut Vec<Object>,
    proposal: &Proposal,
) -> Result<ProposalSummary, ProposalError> {
    let mut summary = ProposalSummary {
        warnings: proposal.warnings.clone(),
        ..ProposalSummary::default()
    };
    let mut current: BTreeMap<PolicyKey, usize> = BTreeMap::new();
    for (i, o) in objects.iter().enumerate() {
        if let Object::Policy(p) = o {
            current.insert(p.key.clone(), i);
        }
    }
    let mut gone: BTreeSet<usize> = BTreeSet::new();
    for key in &proposal.deletes {
        let i = *current
            .get(key)
            .ok_or_else(|| ProposalError::NoSuchPolicy(policy_name(key)))?;
        gone.insert(i);
        summary.deleted.push(policy_name(key));
    }
    for p in &proposal.upserts {
        match current.get(&p.key) {
            Some(&i) => {
                let same = matches!(&objects[i], Object::Policy(old) if old == p);
                if same {
                    summary.unchanged.push(policy_name(&p.key));
                } else {
                    summary.changed.push(policy_name(&p.key));
                    objects[i] = Object::Policy(p.clone());
                }
            }
            None => {
                summary.added.push(policy_name(&p.key));
                objects.push(Object::Policy(p.clone()));
            }
        }
    }
    if !gone.is_empty() {
        let mut i = 0;
        objects.retain(|_| {
            let keep = !gone.contains(&i);
            i += 1;
            keep
        });
    }
    Ok(summary)
}

/// Where a verdict was made and about what: the reporting pod and direction, the peer, the
/// protocol and the destination port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EdgeKey {
    pub endpoint: PodKey,
    pub direction: Direction,
    pub peer: PeerRef,
    pub protocol: u8,
    pub port: u16,
}

/// The other end of an edge: a pod when the record named one, else an address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerRef {
    Pod(PodKey),
    Address(IpAddr),
}

impl std::fmt::Display for PeerRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerRef::Pod(p) => p.fmt(f),
            PeerRef::Address(a) => a.fmt(f),
        }
    }
}

/// What was observed of an edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeStats {
    /// Records admitted (allowed, or allowed while an audit policy would deny).
    pub allowed: u64,
    pub denied: u64,
    pub first_seen: u64,
    pub last_seen: u64,
    /// The peer's address in the latest record (for a peer pod the engine no longer has).
    pub peer_address: IpAddr,
}

/// Flow records folded into edges.
#[derive(Debug, Default)]
pub struct Edges {
    pub edges: FxHashMap<EdgeKey, EdgeStats>,
    /// Every record offered.
    pub records: u64,
    /// Records no policy decided (malformed, spoofed, unparseable, locked down, not IP), or of
    /// an endpoint without a pod name: nothing to replay.
    pub not_replayed: u64,
}

/// Whether a policy decided the record (so that another policy could decide it otherwise).
fn decided_by_policy(reason: FlowReason) -> bool {
    matches!(
        reason,
        FlowReason::AllowedNew
            | FlowReason::AllowedTracked
            | FlowReason::AllowedUntracked
            | FlowReason::AuditWouldDeny
            | FlowReason::DeniedPolicy
            | FlowReason::DropQuarantine
            | FlowReason::DropPrefilter
            | FlowReason::DropRevoked
    )
}

impl Edges {
    pub fn fold(records: impl IntoIterator<Item = FlowRecord>) -> Edges {
        let mut e = Edges::default();
        for r in records {
            e.add(r);
        }
        e
    }

    pub fn add(&mut self, r: FlowRecord) {
        self.records += 1;
        let EndpointRef::Pod(endpoint) = r.endpoint else {
            self.not_replayed += 1;
            return;
        };
        if !decided_by_policy(r.reason) {
            self.not_replayed += 1;
            return;
        }
        let peer_address = match r.direction {
            Direction::Ingress => r.src,
            Direction::Egress => r.dst,
        };
        let key = EdgeKey {
            endpoint,
            direction: r.direction,
            peer: match r.peer {
                Some(p) => PeerRef::Pod(p),
                None => PeerRef::Address(peer_address),
            },
            protocol: r.protocol,
            port: r.dst_port,
        };
        let allowed = u64::from(r.verdict != FlowVerdict::Denied);
        let t = r.time_unix_nanos;
        self.edges
            .entry(key)
            .and_modify(|s| {
                s.allowed += allowed;
                s.denied += 1 - allowed;
                if t < s.first_seen {
                    s.first_seen = t;
                }
                if t >= s.last_seen {
                    s.last_seen = t;
                    s.peer_address = peer_address;
                }
            })
            .or_insert(EdgeStats {
                allowed,
                denied: 1 - allowed,
                first_seen: t,
                last_seen: t,
                peer_address,
            });
    }
}

/// One engine's compiled rule sets, indexed for deciding edges.
struct Judge {
    engine: PolicyEngine,
    rulesets: Vec<RuleSet>,
    /// Pod → (rule set, endpoint) positions.
    endpoints: FxHashMap<PodKey, (usize, usize)>,
}

impl Judge {
    fn new(
        config: EngineConfig,
        objects: Vec<Object>,
        now: SystemTime,
    ) -> Result<Judge, ProposalError> {
        let engine = PolicyEngine::new_at(config, objects, now)
            .map_err(|e| ProposalError::Compile(e.to_string()))?;
        let rulesets: Vec<RuleSet> = engine.rulesets().into_values().collect();
        let mut endpoints = FxHashMap::default();
        for (r, rs) in rulesets.iter().enumerate() {
            for (e, ep) in rs.endpoints.iter().enumerate() {
                endpoints.insert(
                    PodKey {
                        namespace: ep.namespace.clone(),
                        name: ep.pod.clone(),
                    },
                    (r, e),
                );
            }
        }
        Ok(Judge {
            engine,
            rulesets,
            endpoints,
        })
    }

    /// The decision for an edge, with the rule set that named its rules; `None` when the pod
    /// has no endpoint here.
    fn decide(
        &self,
        key: &EdgeKey,
        stats: &EdgeStats,
        addresses: &mut FxHashMap<(usize, IpAddr), Identity>,
    ) -> Option<(Decision, &RuleSet)> {
        let &(r, e) = self.endpoints.get(&key.endpoint)?;
        let rs = &self.rulesets[r];
        let ep = &rs.endpoints[e];
        let by_address = |ip: IpAddr, addresses: &mut FxHashMap<(usize, IpAddr), Identity>| {
            *addresses
                .entry((r, ip))
                .or_insert_with(|| rs.identity_of(ip))
        };
        let peer = match &key.peer {
            PeerRef::Pod(p) => match self.engine.identity_of_pod(p) {
                Some(id) => id,
                None => by_address(stats.peer_address, addresses),
            },
            PeerRef::Address(ip) => by_address(*ip, addresses),
        };
        let protocol = Protocol::from_number(key.protocol);
        let port = protocol.filter(|p| p.has_ports()).map(|_| key.port);
        let d = decide_direction(
            rs.policy_of(ep).direction(key.direction),
            peer,
            protocol,
            port,
        );
        Some((d, rs))
    }
}

/// A verdict with the rule that made it, as one engine decides an edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Judgement {
    pub verdict: Verdict,
    /// The deciding rule, named as flows name it.
    pub rule: String,
    /// Allowed, but an audit-mode policy would deny: the rule it would deny by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_would_deny: Option<String>,
}

impl Judgement {
    fn of(d: &Decision, rs: &RuleSet) -> Judgement {
        Judgement {
            verdict: d.verdict,
            rule: rs.flow_rule(d.rule).to_string(),
            audit_would_deny: d
                .audit_would_deny()
                .then(|| rs.flow_rule(d.audit_rule).to_string()),
        }
    }
}

/// How an edge's decision changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EdgeChange {
    /// Allowed now, denied after.
    NewlyDenied,
    /// Denied now, allowed after.
    NewlyAllowed,
    /// Same verdict, another rule decides.
    Rule,
    /// Same enforced verdict and rule; what audit-mode policies would do changes.
    Audit,
}

impl EdgeChange {
    pub fn as_str(self) -> &'static str {
        match self {
            EdgeChange::NewlyDenied => "newly-denied",
            EdgeChange::NewlyAllowed => "newly-allowed",
            EdgeChange::Rule => "rule",
            EdgeChange::Audit => "audit",
        }
    }
}

/// One edge whose decision the proposal changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeImpact {
    pub change: EdgeChange,
    /// Source and destination: pods as `namespace/name`, other peers by address.
    pub src: String,
    pub dst: String,
    /// The pod whose policy decides, and in which direction.
    pub at: String,
    pub direction: Direction,
    /// `TCP`, `UDP`, … (`proto N` for others).
    pub protocol: String,
    pub port: u16,
    /// Records observed admitted / denied.
    pub allowed: u64,
    pub denied: u64,
    pub first_seen_unix_nanos: u64,
    pub last_seen_unix_nanos: u64,
    pub before: Judgement,
    pub after: Judgement,
    /// Observed admitted, allowed now, denied after.
    pub breaks: bool,
}

/// The answer of a what-if.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Impact {
    pub proposal: ProposalSummary,
    /// Records read, and the edges they fold into.
    pub records: u64,
    pub edges: u64,
    /// Records no policy decided (see [`Edges::not_replayed`]).
    pub not_replayed: u64,
    /// Records of pods the controller no longer has (or that have no endpoint).
    pub unknown_pods: u64,
    /// Edges observed admitted that would be denied (what `--fail-on-deny` fails on).
    pub breaks: u64,
    /// Every changed edge: the ones that break first, then by records, most first.
    pub changed: Vec<EdgeImpact>,
    /// Read from the controller's flow history (else the records it holds in memory).
    #[serde(default)]
    pub from_history: bool,
}

/// The number of a protocol [`protocol_name`] named.
pub fn protocol_number(name: &str) -> Option<u8> {
    (0..=u8::MAX).find(|&p| protocol_name(p) == name)
}

pub fn protocol_name(p: u8) -> String {
    match Protocol::from_number(p) {
        Some(Protocol::Tcp) => "TCP".into(),
        Some(Protocol::Udp) => "UDP".into(),
        Some(Protocol::Sctp) => "SCTP".into(),
        Some(Protocol::Icmp) => "ICMP".into(),
        Some(Protocol::Icmpv6) => "ICMPv6".into(),
        None => format!("proto {p}"),
    }
}

/// The current state and the proposed one, compiled apart from the live engine.
pub struct WhatIf {
    before: Judge,
    after: Judge,
    pub summary: ProposalSummary,
}

impl WhatIf {
    /// Compiles `objects` (the live engine's, [`PolicyEngine::objects`]) as they are and with
    /// `proposal` applied, both at the clock `now`.
    pub fn new(
        config: EngineConfig,
        objects: Vec<Object>,
        now: SystemTime,
        proposal: &Proposal,
    ) -> Result<WhatIf, ProposalError> {
        let mut changed = objects.clone();
        let summary = apply_proposal(&mut changed, proposal)?;
        let (before, after) = std::thread::scope(|s| {
            let before = s.spawn(|| Judge::new(config.clone(), objects, now));
            let after = Judge::new(config.clone(), changed, now);
            (
                before
                    .join()
                    .unwrap_or_else(|e| std::panic::resume_unwind(e)),
                after,
            )
        });
        Ok(WhatIf {
            before: before?,
            after: after?,
            summary,
        })
    }

    /// Decides every edge before and after; the edges that change. The edges are shared out
    /// over the available cores (each engine is only read).
    pub fn replay(&self, edges: &Edges) -> Impact {
        let mut impact = Impact {
            proposal: self.summary.clone(),
            records: edges.records,
            edges: edges.edges.len() as u64,
            not_replayed: edges.not_replayed,
            ..Impact::default()
        };
        let list: Vec<(&EdgeKey, &EdgeStats)> = edges.edges.iter().collect();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(list.len() / 20_000 + 1);
        let chunk = list.len().div_ceil(threads).max(1);
        let parts: Vec<(Vec<EdgeImpact>, u64)> = std::thread::scope(|s| {
            let workers: Vec<_> = list
                .chunks(chunk)
                .map(|part| s.spawn(move || self.replay_part(part)))
                .collect();
            workers
                .into_iter()
                // A worker only panics if deciding does, which it does not: re-raise if so.
                .map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        for (changed, unknown) in parts {
            impact.changed.extend(changed);
            impact.unknown_pods += unknown;
        }
        impact.breaks = impact.changed.iter().filter(|e| e.breaks).count() as u64;
        impact.changed.sort_by(|x, y| {
            (!x.breaks, x.change, std::cmp::Reverse(x.allowed + x.denied))
                .cmp(&(!y.breaks, y.change, std::cmp::Reverse(y.allowed + y.denied)))
                .then_with(|| {
                    (&x.src, &x.dst, &x.protocol, x.port, x.direction).cmp(&(
                        &y.src,
                        &y.dst,
                        &y.protocol,
                        y.port,
                        y.direction,
                    ))
                })
        });
        impact
    }

    /// [`WhatIf::replay`] of some edges: the changed ones, and the records of edges whose pod
    /// has no endpoint.
    fn replay_part(&self, edges: &[(&EdgeKey, &EdgeStats)]) -> (Vec<EdgeImpact>, u64) {
        let (mut changed, mut unknown) = (Vec::new(), 0);
        let mut before_cache = FxHashMap::default();
        let mut after_cache = FxHashMap::default();
        // Rule ids may differ between the two compilations: compare what they name. A rule id
        // names the same rule on every node of one engine, so each is named once.
        let mut before_names: FxHashMap<RuleId, String> = FxHashMap::default();
        let mut after_names: FxHashMap<RuleId, String> = FxHashMap::default();
        fn name<'n>(names: &'n mut FxHashMap<RuleId, String>, rs: &RuleSet, id: RuleId) -> &'n str {
            names
                .entry(id)
                .or_insert_with(|| rs.flow_rule(id).to_string())
        }
        for &(key, stats) in edges {
            let (Some((b, brs)), Some((a, ars))) = (
                self.before.decide(key, stats, &mut before_cache),
                self.after.decide(key, stats, &mut after_cache),
            ) else {
                unknown += stats.allowed + stats.denied;
                continue;
            };
            let same_rule =
                name(&mut before_names, brs, b.rule) == name(&mut after_names, ars, a.rule);
            let same_audit = match (b.audit_would_deny(), a.audit_would_deny()) {
                (false, false) => true,
                (true, true) => {
                    name(&mut before_names, brs, b.audit_rule)
                        == name(&mut after_names, ars, a.audit_rule)
                }
                _ => false,
            };
            if b.verdict == a.verdict && same_rule && same_audit {
                continue;
            }
            let (before, after) = (Judgement::of(&b, brs), Judgement::of(&a, ars));
            let change = match (b.verdict, a.verdict) {
                (Verdict::Allow, Verdict::Deny) => EdgeChange::NewlyDenied,
                (Verdict::Deny, Verdict::Allow) => EdgeChange::NewlyAllowed,
                _ if !same_rule => EdgeChange::Rule,
                _ => EdgeChange::Audit,
            };
            let breaks = change == EdgeChange::NewlyDenied && stats.allowed > 0;
            let at = key.endpoint.to_string();
            let (src, dst) = match key.direction {
                Direction::Ingress => (key.peer.to_string(), at.clone()),
                Direction::Egress => (at.clone(), key.peer.to_string()),
            };
            changed.push(EdgeImpact {
                change,
                src,
                dst,
                at,
                direction: key.direction,
                protocol: protocol_name(key.protocol),
                port: key.port,
                allowed: stats.allowed,
                denied: stats.denied,
                first_seen_unix_nanos: stats.first_seen,
                last_seen_unix_nanos: stats.last_seen,
                before,
                after,
                breaks,
            });
        }
        (changed, unknown)
    }
}

#[cfg(test)]
mod tests;
