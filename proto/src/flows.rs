//! Conversions between flow records in the contract's vocabulary (`bulkhead_ruleset::flow`)
//! and their protobuf messages (`FlowRecord`, `StoredFlow`). Encoding cannot fail; decoding
//! refuses what the contract cannot hold — an enum value it does not know (or none), an
//! address that is neither 4 nor 16 bytes, a port or protocol out of range, a name that is
//! empty, too long or holds what no Kubernetes name holds, a missing part — and names the
//! field, so the controller can count what it refused by field. Decoding takes the message by
//! value and moves its strings: the controller decodes every record agents report.

use std::fmt;

use bulkhead_ruleset::{self as rs, flow};

use crate::{
    convert::{
        PatternProblem, addr_bytes, addr_of, direction_of, direction_to, pattern_from, pattern_to,
        rule_kind_of, rule_kind_to, rule_to,
    },
    v1::{self as pb, flow_record, flow_rule, stored_flow},
};

/// A field of a flow record (or of a quarantine event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowField {
    Endpoint,
    Direction,
    Src,
    Dst,
    SrcPort,
    DstPort,
    Protocol,
    Kind,
    Verdict,
    Rule,
    Peer,
    Reason,
    /// A quarantine event's pod.
    Pod,
    /// A quarantine event's action.
    Action,
    /// A stored flow's record or event.
    Entry,
    /// The staged view's outcome.
    Staged,
    /// The DNS names of the peer.
    PeerNames,
}

impl FlowField {
    pub fn as_str(self) -> &'static str {
        match self {
            FlowField::Endpoint => "endpoint",
            FlowField::Direction => "direction",
            FlowField::Src => "src",
            FlowField::Dst => "dst",
            FlowField::SrcPort => "src_port",
            FlowField::DstPort => "dst_port",
            FlowField::Protocol => "protocol",
            FlowField::Kind => "kind",
            FlowField::Verdict => "verdict",
            FlowField::Rule => "rule",
            FlowField::Peer => "peer",
            FlowField::Reason => "reason",
            FlowField::Pod => "pod",
            FlowField::Action => "action",
            FlowField::Entry => "entry",
            FlowField::Staged => "staged",
            FlowField::PeerNames => "peer_names",
        }
    }
}

impl fmt::Display for FlowField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is wrong with the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowProblem {
    #[error("unknown value {0} (a newer agent or controller?)")]
    Enum(i32),
    #[error("an address must be 4 or 16 bytes, not {0}")]
    Address(usize),
    #[error("{value} is out of range (at most {max})")]
    Range { value: u32, max: u32 },
    #[error("missing")]
    Missing,
    #[error("its {part} {problem}")]
    Name {
        part: &'static str,
        problem: flow::BadName,
    },
    #[error("{0}")]
    NamePattern(rs::BadNamePattern),
    #[error("{text:?} is not in normal form: send {normal:?}")]
    NameNotNormal { text: String, normal: String },
    #[error("{count} names, more than {max}")]
    TooMany { count: usize, max: usize },
}

/// A flow record (or stored flow) the contract cannot hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("flow record {field}: {problem}")]
pub struct FlowRecordError {
    pub field: FlowField,
    pub problem: FlowProblem,
}

type Result<T> = std::result::Result<T, FlowRecordError>;

fn refuse<T>(field: FlowField, problem: FlowProblem) -> Result<T> {
    Err(FlowRecordError { field, problem })
}

fn pod_to(p: &rs::PodKey) -> pb::PodRef {
    pb::PodRef {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
    }
}

fn pod_into(p: rs::PodKey) -> pb::PodRef {
    pb::PodRef {
        namespace: p.namespace,
        name: p.name,
    }
}

fn pod_from(field: FlowField, p: pb::PodRef) -> Result<rs::PodKey> {
    let pod = rs::PodKey {
        namespace: p.namespace,
        name: p.name,
    };
    match pod.check() {
        Ok(()) => Ok(pod),
        Err((part, problem)) => refuse(field, FlowProblem::Name { part, problem }),
    }
}

/// A record's peer: a pod [`pod_from`] takes, or a peer cluster's pod as the controller names
/// it (namespace `cluster/namespace`, see [`rs::cluster`]), the cluster a cluster name and the
/// rest a namespace. Agents name only their own node's pods; the controller names the others,
/// remote ones included, in what it stores and serves.
fn peer_from(p: pb::PodRef) -> Result<rs::PodKey> {
    let Some((cluster, namespace)) = p.namespace.split_once('/') else {
        return pod_from(FlowField::Peer, p);
    };
    if cluster.parse::<rs::ClusterName>().is_err() {
        return refuse(
            FlowField::Peer,
            FlowProblem::Name {
                part: "namespace",
                problem: flow::BadName::Character('/'),
            },
        );
    }
    pod_from(
        FlowField::Peer,
        pb::PodRef {
            namespace: namespace.to_string(),
            name: p.name.clone(),
        },
    )?;
    Ok(rs::PodKey {
        namespace: p.namespace,
        name: p.name,
    })
}

fn kind_to(k: rs::FlowKind) -> pb::FlowKind {
    match k {
        rs::FlowKind::New => pb::FlowKind::New,
        rs::FlowKind::Denied => pb::FlowKind::Denied,
        rs::FlowKind::Revoked => pb::FlowKind::Revoked,
        rs::FlowKind::Audit => pb::FlowKind::Audit,
    }
}

fn kind_from(v: i32) -> Result<rs::FlowKind> {
    match pb::FlowKind::try_from(v) {
        Ok(pb::FlowKind::New) => Ok(rs::FlowKind::New),
        Ok(pb::FlowKind::Denied) => Ok(rs::FlowKind::Denied),
        Ok(pb::FlowKind::Revoked) => Ok(rs::FlowKind::Revoked),
        Ok(pb::FlowKind::Audit) => Ok(rs::FlowKind::Audit),
        _ => refuse(FlowField::Kind, FlowProblem::Enum(v)),
    }
}

fn verdict_to(v: rs::FlowVerdict) -> pb::FlowVerdict {
    match v {
        rs::FlowVerdict::Allowed => pb::FlowVerdict::Allowed,
        rs::FlowVerdict::Denied => pb::FlowVerdict::Denied,
        rs::FlowVerdict::AuditWouldDeny => pb::FlowVerdict::AuditWouldDeny,
    }
}

fn verdict_from(v: i32) -> Result<rs::FlowVerdict> {
    match pb::FlowVerdict::try_from(v) {
        Ok(pb::FlowVerdict::Allowed) => Ok(rs::FlowVerdict::Allowed),
        Ok(pb::FlowVerdict::Denied) => Ok(rs::FlowVerdict::Denied),
        Ok(pb::FlowVerdict::AuditWouldDeny) => Ok(rs::FlowVerdict::AuditWouldDeny),
        _ => refuse(FlowField::Verdict, FlowProblem::Enum(v)),
    }
}

fn reason_to(r: rs::FlowReason) -> pb::FlowReason {
    use rs::FlowReason as R;
    match r {
        R::AllowedNew => pb::FlowReason::AllowedNew,
        R::AllowedTracked => pb::FlowReason::AllowedTracked,
        R::AuditWouldDeny => pb::FlowReason::AuditWouldDeny,
        R::DeniedPolicy => pb::FlowReason::DeniedPolicy,
        R::DropMalformed => pb::FlowReason::DropMalformed,
        R::DropSpoofed => pb::FlowReason::DropSpoofed,
        R::DropQuarantine => pb::FlowReason::DropQuarantine,
        R::DropLockdown => pb::FlowReason::DropLockdown,
        R::DropRevoked => pb::FlowReason::DropRevoked,
        R::DropUnparseable => pb::FlowReason::DropUnparseable,
        R::PassedNonIp => pb::FlowReason::PassedNonIp,
        R::DropPrefilter => pb::FlowReason::DropPrefilter,
        R::AllowedUntracked => pb::FlowReason::AllowedUntracked,
        R::Unknown => pb::FlowReason::Unknown,
    }
}

fn reason_from(v: i32) -> Result<rs::FlowReason> {
    use rs::FlowReason as R;
    Ok(match pb::FlowReason::try_from(v) {
        Ok(pb::FlowReason::AllowedNew) => R::AllowedNew,
        Ok(pb::FlowReason::AllowedTracked) => R::AllowedTracked,
        Ok(pb::FlowReason::AuditWouldDeny) => R::AuditWouldDeny,
        Ok(pb::FlowReason::DeniedPolicy) => R::DeniedPolicy,
        Ok(pb::FlowReason::DropMalformed) => R::DropMalformed,
        Ok(pb::FlowReason::DropSpoofed) => R::DropSpoofed,
        Ok(pb::FlowReason::DropQuarantine) => R::DropQuarantine,
        Ok(pb::FlowReason::DropLockdown) => R::DropLockdown,
        Ok(pb::FlowReason::DropRevoked) => R::DropRevoked,
        Ok(pb::FlowReason::DropUnparseable) => R::DropUnparseable,
        Ok(pb::FlowReason::PassedNonIp) => R::PassedNonIp,
        Ok(pb::FlowReason::DropPrefilter) => R::DropPrefilter,
        Ok(pb::FlowReason::AllowedUntracked) => R::AllowedUntracked,
        Ok(pb::FlowReason::Unknown) => R::Unknown,
        Ok(pb::FlowReason::Unspecified) | Err(_) => {
            return refuse(FlowField::Reason, FlowProblem::Enum(v));
        }
    })
}

fn flow_rule_to(r: &rs::FlowRule) -> pb::FlowRule {
    pb::FlowRule {
        rule: Some(match r {
            rs::FlowRule::Rule(r) => flow_rule::Rule::Policy(rule_to(r)),
            rs::FlowRule::DefaultAllow => {
                flow_rule::Rule::Reserved(pb::ReservedRule::DefaultAllow as i32)
            }
            rs::FlowRule::MissingPolicy => {
                flow_rule::Rule::Reserved(pb::ReservedRule::MissingPolicy as i32)
            }
            rs::FlowRule::UnrelatedIcmpError => {
                flow_rule::Rule::Reserved(pb::ReservedRule::UnrelatedIcmpError as i32)
            }
            rs::FlowRule::Unnamed(id) => flow_rule::Rule::Unnamed(*id),
        }),
    }
}

fn flow_rule_from(r: Option<pb::FlowRule>) -> Result<rs::FlowRule> {
    const F: FlowField = FlowField::Rule;
    let Some(rule) = r.and_then(|r| r.rule) else {
        return refuse(F, FlowProblem::Missing);
    };
    match rule {
        flow_rule::Rule::Policy(r) => {
            let Some(kind) = rule_kind_of(r.kind) else {
                return refuse(F, FlowProblem::Enum(r.kind));
            };
            let Some(direction) = direction_of(r.direction) else {
                return refuse(F, FlowProblem::Enum(r.direction));
            };
            let name = |part, s: &str, max, may_be_empty| {
                flow::check_name(s, max, may_be_empty).map_err(|problem| FlowRecordError {
                    field: F,
                    problem: FlowProblem::Name { part, problem },
                })
            };
            name("namespace", &r.namespace, flow::MAX_NAMESPACE_BYTES, true)?;
            name("name", &r.name, flow::MAX_NAME_BYTES, false)?;
            Ok(rs::FlowRule::Rule(rs::RuleRef {
                kind,
                namespace: r.namespace,
                name: r.name,
                direction,
                index: r.index,
            }))
        }
        flow_rule::Rule::Reserved(v) => match pb::ReservedRule::try_from(v) {
            Ok(pb::ReservedRule::DefaultAllow) => Ok(rs::FlowRule::DefaultAllow),
            Ok(pb::ReservedRule::MissingPolicy) => Ok(rs::FlowRule::MissingPolicy),
            Ok(pb::ReservedRule::UnrelatedIcmpError) => Ok(rs::FlowRule::UnrelatedIcmpError),
            _ => refuse(F, FlowProblem::Enum(v)),
        },
        flow_rule::Rule::Unnamed(id) => Ok(rs::FlowRule::Unnamed(id)),
    }
}

fn endpoint_to(e: &rs::EndpointRef) -> flow_record::Endpoint {
    match e {
        rs::EndpointRef::Pod(p) => flow_record::Endpoint::Pod(pod_to(p)),
        rs::EndpointRef::Unnamed(id) => flow_record::Endpoint::EndpointId(*id),
    }
}

fn bounded(field: FlowField, value: u32, max: u32) -> Result<u32> {
    if value > max {
        return refuse(field, FlowProblem::Range { value, max });
    }
    Ok(value)
}

fn address(field: FlowField, b: &[u8]) -> Result<std::net::IpAddr> {
    match addr_of(b) {
        Some(a) => Ok(a),
        None => refuse(field, FlowProblem::Address(b.len())),
    }
}

/// The peer's names: at most [`flow::MAX_PEER_NAMES`], each valid and normalized, sorted and
/// without repeats (what agents send), so two records of one flow compare equal.
fn peer_names_from(list: Vec<pb::NamePattern>) -> Result<Vec<rs::NamePattern>> {
    const F: FlowField = FlowField::PeerNames;
    if list.len() > flow::MAX_PEER_NAMES {
        return refuse(
            F,
            FlowProblem::TooMany {
                count: list.len(),
                max: flow::MAX_PEER_NAMES,
            },
        );
    }
    let mut out = Vec::with_capacity(list.len());
    for p in &list {
        match pattern_from(Some(p)) {
            Ok(p) => out.push(p),
            Err(PatternProblem::Missing) => return refuse(F, FlowProblem::Missing),
            Err(PatternProblem::Bad(b)) => return refuse(F, FlowProblem::NamePattern(b)),
            Err(PatternProblem::NotNormal { text, normal }) => {
                return refuse(F, FlowProblem::NameNotNormal { text, normal });
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn staged_to(o: &rs::StagedOutcome) -> pb::StagedOutcome {
    pb::StagedOutcome {
        verdict: verdict_to(o.verdict) as i32,
        rule: Some(flow_rule_to(&o.rule)),
        rule_id: o.rule_id,
    }
}

fn staged_from(o: pb::StagedOutcome) -> Result<rs::StagedOutcome> {
    let verdict = match verdict_from(o.verdict) {
        Ok(v @ (rs::FlowVerdict::Allowed | rs::FlowVerdict::Denied)) => v,
        _ => return refuse(FlowField::Staged, FlowProblem::Enum(o.verdict)),
    };
    Ok(rs::StagedOutcome {
        verdict,
        rule: flow_rule_from(o.rule).map_err(|e| FlowRecordError {
            field: FlowField::Staged,
            problem: e.problem,
        })?,
        rule_id: o.rule_id,
    })
}

impl From<&rs::FlowRecord> for pb::FlowRecord {
    fn from(r: &rs::FlowRecord) -> pb::FlowRecord {
        pb::FlowRecord {
            time_unix_nanos: r.time_unix_nanos,
            endpoint: Some(endpoint_to(&r.endpoint)),
            direction: direction_to(r.direction) as i32,
            src: addr_bytes(&r.src).into(),
            dst: addr_bytes(&r.dst).into(),
            src_port: r.src_port as u32,
            dst_port: r.dst_port as u32,
            protocol: r.protocol as u32,
            kind: kind_to(r.kind) as i32,
            verdict: verdict_to(r.verdict) as i32,
            rule: Some(flow_rule_to(&r.rule)),
            rule_id: r.rule_id,
            local_identity: r.local_identity,
            peer_identity: r.peer_identity,
            peer: r.peer.as_ref().map(pod_to),
            reason: reason_to(r.reason) as i32,
            packets: r.packets,
            bytes: r.bytes,
            staged: r.staged.as_ref().map(staged_to),
            peer_names: r.peer_names.iter().map(pattern_to).collect(),
        }
    }
}

impl From<rs::FlowRecord> for pb::FlowRecord {
    /// Like the conversion of a reference, moving the names instead of copying them.
    fn from(r: rs::FlowRecord) -> pb::FlowRecord {
        let endpoint = match r.endpoint {
            rs::EndpointRef::Pod(p) => flow_record::Endpoint::Pod(pod_into(p)),
            rs::EndpointRef::Unnamed(id) => flow_record::Endpoint::EndpointId(id),
        };
        let rule = match r.rule {
            rs::FlowRule::Rule(rule) => pb::FlowRule {
                rule: Some(flow_rule::Rule::Policy(pb::RuleRef {
                    kind: rule_kind_to(&rule.kind) as i32,
                    namespace: rule.namespace,
                    name: rule.name,
                    direction: direction_to(rule.direction) as i32,
                    index: rule.index,
                })),
            },
            other => flow_rule_to(&other),
        };
        pb::FlowRecord {
            time_unix_nanos: r.time_unix_nanos,
            endpoint: Some(endpoint),
            direction: direction_to(r.direction) as i32,
            src: addr_bytes(&r.src).into(),
            dst: addr_bytes(&r.dst).into(),
            src_port: r.src_port as u32,
            dst_port: r.dst_port as u32,
            protocol: r.protocol as u32,
            kind: kind_to(r.kind) as i32,
            verdict: verdict_to(r.verdict) as i32,
            rule: Some(rule),
            rule_id: r.rule_id,
            local_identity: r.local_identity,
            peer_identity: r.peer_identity,
            peer: r.peer.map(pod_into),
            reason: reason_to(r.reason) as i32,
            packets: r.packets,
            bytes: r.bytes,
            staged: r.staged.map(|o| staged_to(&o)),
            peer_names: r.peer_names.iter().map(pattern_to).collect(),
        }
    }
}

impl TryFrom<pb::FlowRecord> for rs::FlowRecord {
    type Error = FlowRecordError;

    fn try_from(r: pb::FlowRecord) -> Result<rs::FlowRecord> {
        let endpoint = match r.endpoint {
            Some(flow_record::Endpoint::Pod(p)) => {
                rs::EndpointRef::Pod(pod_from(FlowField::Endpoint, p)?)
            }
            Some(flow_record::Endpoint::EndpointId(id)) => rs::EndpointRef::Unnamed(id),
            None => return refuse(FlowField::Endpoint, FlowProblem::Missing),
        };
        let Some(direction) = direction_of(r.direction) else {
            return refuse(FlowField::Direction, FlowProblem::Enum(r.direction));
        };
        Ok(rs::FlowRecord {
            time_unix_nanos: r.time_unix_nanos,
            endpoint,
            direction,
            src: address(FlowField::Src, &r.src)?,
            dst: address(FlowField::Dst, &r.dst)?,
            src_port: bounded(FlowField::SrcPort, r.src_port, u16::MAX as u32)? as u16,
            dst_port: bounded(FlowField::DstPort, r.dst_port, u16::MAX as u32)? as u16,
            protocol: bounded(FlowField::Protocol, r.protocol, u8::MAX as u32)? as u8,
            kind: kind_from(r.kind)?,
            verdict: verdict_from(r.verdict)?,
            rule: flow_rule_from(r.rule)?,
            rule_id: r.rule_id,
            local_identity: r.local_identity,
            peer_identity: r.peer_identity,
            peer: r.peer.map(peer_from).transpose()?,
            reason: reason_from(r.reason)?,
            packets: r.packets,
            bytes: r.bytes,
            staged: r.staged.map(staged_from).transpose()?,
            peer_names: peer_names_from(r.peer_names)?,
        })
    }
}

fn action_to(a: rs::QuarantineAction) -> pb::QuarantineAction {
    match a {
        rs::QuarantineAction::Quarantine => pb::QuarantineAction::Quarantine,
        rs::QuarantineAction::Release => pb::QuarantineAction::Release,
        rs::QuarantineAction::Expire => pb::QuarantineAction::Expire,
    }
}

fn action_from(v: i32) -> Result<rs::QuarantineAction> {
    match pb::QuarantineAction::try_from(v) {
        Ok(pb::QuarantineAction::Quarantine) => Ok(rs::QuarantineAction::Quarantine),
        Ok(pb::QuarantineAction::Release) => Ok(rs::QuarantineAction::Release),
        Ok(pb::QuarantineAction::Expire) => Ok(rs::QuarantineAction::Expire),
        _ => refuse(FlowField::Action, FlowProblem::Enum(v)),
    }
}

impl From<&rs::QuarantineEvent> for pb::QuarantineEvent {
    fn from(q: &rs::QuarantineEvent) -> pb::QuarantineEvent {
        pb::QuarantineEvent {
            time_unix_nanos: q.time_unix_nanos,
            pod: Some(pod_to(&q.pod)),
            action: action_to(q.action) as i32,
            quarantine: q.quarantine.clone(),
            reason: q.reason.clone(),
            actor: q.actor.clone(),
        }
    }
}

impl TryFrom<pb::QuarantineEvent> for rs::QuarantineEvent {
    type Error = FlowRecordError;

    fn try_from(q: pb::QuarantineEvent) -> Result<rs::QuarantineEvent> {
        let Some(pod) = q.pod else {
            return refuse(FlowField::Pod, FlowProblem::Missing);
        };
        Ok(rs::QuarantineEvent {
            time_unix_nanos: q.time_unix_nanos,
            pod: pod_from(FlowField::Pod, pod)?,
            action: action_from(q.action)?,
            quarantine: q.quarantine,
            reason: q.reason,
            actor: q.actor,
        })
    }
}

impl From<&rs::FlowEntry> for stored_flow::Entry {
    fn from(e: &rs::FlowEntry) -> stored_flow::Entry {
        match e {
            rs::FlowEntry::Flow(r) => stored_flow::Entry::Record(r.into()),
            rs::FlowEntry::Quarantine(q) => stored_flow::Entry::Quarantine(q.into()),
        }
    }
}

impl TryFrom<stored_flow::Entry> for rs::FlowEntry {
    type Error = FlowRecordError;

    fn try_from(e: stored_flow::Entry) -> Result<rs::FlowEntry> {
        Ok(match e {
            stored_flow::Entry::Record(r) => rs::FlowEntry::Flow(r.try_into()?),
            stored_flow::Entry::Quarantine(q) => rs::FlowEntry::Quarantine(q.try_into()?),
        })
    }
}

impl pb::StoredFlow {
    /// The stored record or event in the contract's vocabulary (refused when it holds
    /// neither).
    pub fn into_entry(self) -> Result<rs::FlowEntry> {
        match self.entry {
            Some(e) => e.try_into(),
            None => refuse(FlowField::Entry, FlowProblem::Missing),
        }
    }
}

#[cfg(test)]
mod tests;
