//! The answers of [`super`] as protobuf messages (the gRPC admin API's `Recommend` and
//! `Impact`), and back. What the controller sends converts back to the same value, so that
//! `bulkhead policy recommend|impact --controller` print what the HTTP path prints.
//!
//! A recommended policy travels as its Kubernetes JSON encoding (the form the API server and
//! `kubectl` exchange); everything else is typed fields. A message that does not convert (an
//! unknown enum value, a policy that is not valid JSON of its kind) is refused with an error
//! naming the field.

use bulkhead_proto::{
    convert::{direction_of, direction_to, rule_kind_of, rule_kind_to},
    v1 as pb,
};

use super::{ImpactQuestion, RecommendQuestion};
use crate::{
    PolicyKey,
    impact::{
        EdgeChange, EdgeImpact, Impact, Judgement, ProposalSummary, protocol_name, protocol_number,
    },
    recommend::{
        RecommendKind, Recommendation, RecommendationStatus, RecommendedObject, RecommendedPolicy,
        WorkloadRef,
    },
    ruleset::Verdict,
};

/// A message that does not convert.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{field}: unknown value {value}")]
    Enum { field: &'static str, value: i32 },
    #[error("{field}: missing")]
    Missing { field: &'static str },
    #[error("{field}: not a valid {kind} ({source})")]
    Policy {
        field: &'static str,
        kind: &'static str,
        source: serde_json::Error,
    },
    #[error("{field}: {value} is out of range")]
    Range { field: &'static str, value: u64 },
}

type Result<T> = std::result::Result<T, WireError>;

fn kind_to(k: RecommendKind) -> pb::RecommendKind {
    match k {
        RecommendKind::NetworkPolicy => pb::RecommendKind::NetworkPolicy,
        RecommendKind::ServicePolicy => pb::RecommendKind::ServicePolicy,
    }
}

fn kind_from(v: i32) -> Result<RecommendKind> {
    match pb::RecommendKind::try_from(v) {
        Ok(pb::RecommendKind::Unspecified | pb::RecommendKind::NetworkPolicy) => {
            Ok(RecommendKind::NetworkPolicy)
        }
        Ok(pb::RecommendKind::ServicePolicy) => Ok(RecommendKind::ServicePolicy),
        Err(_) => Err(WireError::Enum {
            field: "kind",
            value: v,
        }),
    }
}

impl From<&RecommendQuestion> for pb::RecommendRequest {
    fn from(q: &RecommendQuestion) -> Self {
        pb::RecommendRequest {
            namespaces: q.namespaces.iter().cloned().collect(),
            since_unix_nanos: q.since_unix_nanos,
            learning_seconds: q.learning_window.as_secs(),
            kind: kind_to(q.kind).into(),
        }
    }
}

impl TryFrom<pb::RecommendRequest> for RecommendQuestion {
    type Error = WireError;

    fn try_from(r: pb::RecommendRequest) -> Result<Self> {
        Ok(RecommendQuestion {
            namespaces: r
                .namespaces
                .into_iter()
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect(),
            since_unix_nanos: r.since_unix_nanos,
            learning_window: match r.learning_seconds {
                0 => RecommendQuestion::DEFAULT_LEARNING,
                s => std::time::Duration::from_secs(s),
            },
            kind: kind_from(r.kind)?,
        })
    }
}

fn status_to(s: RecommendationStatus) -> pb::RecommendationStatus {
    match s {
        RecommendationStatus::Learning => pb::RecommendationStatus::Learning,
        RecommendationStatus::Stable => pb::RecommendationStatus::Stable,
    }
}

fn status_from(field: &'static str, v: i32) -> Result<RecommendationStatus> {
    match pb::RecommendationStatus::try_from(v) {
        Ok(pb::RecommendationStatus::Learning) => Ok(RecommendationStatus::Learning),
        Ok(pb::RecommendationStatus::Stable) => Ok(RecommendationStatus::Stable),
        _ => Err(WireError::Enum { field, value: v }),
    }
}

fn workload_to(w: &WorkloadRef) -> pb::WorkloadRef {
    pb::WorkloadRef {
        namespace: w.namespace.clone(),
        name: w.name.clone(),
    }
}

fn workload_from(field: &'static str, w: Option<pb::WorkloadRef>) -> Result<WorkloadRef> {
    let w = w.ok_or(WireError::Missing { field })?;
    Ok(WorkloadRef {
        namespace: w.namespace,
        name: w.name,
    })
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // A Kubernetes object of k8s-openapi's or ours always serializes.
    serde_json::to_vec(v).unwrap_or_default()
}

impl From<&Recommendation> for pb::RecommendResponse {
    fn from(r: &Recommendation) -> Self {
        pb::RecommendResponse {
            status: status_to(r.status).into(),
            policies: r
                .policies
                .iter()
                .map(|p| pb::RecommendedPolicy {
                    workload: Some(workload_to(&p.workload)),
                    status: status_to(p.status).into(),
                    policy: Some(match &p.policy {
                        RecommendedObject::NetworkPolicy(o) => {
                            pb::recommended_policy::Policy::NetworkPolicyJson(json(o))
                        }
                        RecommendedObject::ServicePolicy(o) => {
                            pb::recommended_policy::Policy::ServicePolicyJson(json(o))
                        }
                    }),
                })
                .collect(),
            records: r.records,
            from_history: r.from_history,
            edges: r.edges as u64,
            unknown_pods: r.unknown_pods,
            icmp_edges: r.icmp_edges as u64,
            not_covered: r
                .not_covered
                .iter()
                .map(|(w, why)| pb::NotCovered {
                    workload: Some(workload_to(w)),
                    reason: why.clone(),
                })
                .collect(),
            broad_selectors: r
                .broad_selectors
                .iter()
                .map(|(w, also)| pb::BroadSelector {
                    workload: Some(workload_to(w)),
                    also: also.iter().map(workload_to).collect(),
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::RecommendResponse> for Recommendation {
    type Error = WireError;

    fn try_from(r: pb::RecommendResponse) -> Result<Self> {
        let policies = r
            .policies
            .into_iter()
            .map(|p| {
                let policy = match p.policy {
                    Some(pb::recommended_policy::Policy::NetworkPolicyJson(b)) => {
                        RecommendedObject::NetworkPolicy(serde_json::from_slice(&b).map_err(
                            |source| WireError::Policy {
                                field: "policies.network_policy_json",
                                kind: "NetworkPolicy",
                                source,
                            },
                        )?)
                    }
                    Some(pb::recommended_policy::Policy::ServicePolicyJson(b)) => {
                        RecommendedObject::ServicePolicy(serde_json::from_slice(&b).map_err(
                            |source| WireError::Policy {
                                field: "policies.service_policy_json",
                                kind: "ServicePolicy",
                                source,
                            },
                        )?)
                    }
                    None => {
                        return Err(WireError::Missing {
                            field: "policies.policy",
                        });
                    }
                };
                Ok(RecommendedPolicy {
                    workload: workload_from("policies.workload", p.workload)?,
                    status: status_from("policies.status", p.status)?,
                    policy,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Recommendation {
            status: status_from("status", r.status)?,
            policies,
            records: r.records,
            from_history: r.from_history,
            edges: usize::try_from(r.edges).map_err(|_| WireError::Range {
                field: "edges",
                value: r.edges,
            })?,
            unknown_pods: r.unknown_pods,
            icmp_edges: usize::try_from(r.icmp_edges).map_err(|_| WireError::Range {
                field: "icmp_edges",
                value: r.icmp_edges,
            })?,
            not_covered: r
                .not_covered
                .into_iter()
                .map(|n| Ok((workload_from("not_covered.workload", n.workload)?, n.reason)))
                .collect::<Result<_>>()?,
            broad_selectors: r
                .broad_selectors
                .into_iter()
                .map(|b| {
                    Ok((
                        workload_from("broad_selectors.workload", b.workload)?,
                        b.also
                            .into_iter()
                            .map(|w| workload_from("broad_selectors.also", Some(w)))
                            .collect::<Result<_>>()?,
                    ))
                })
                .collect::<Result<_>>()?,
        })
    }
}

fn policy_name_to(k: &PolicyKey) -> pb::PolicyName {
    pb::PolicyName {
        kind: rule_kind_to(&k.kind).into(),
        namespace: k.namespace.clone(),
        name: k.name.clone(),
    }
}

impl From<&ImpactQuestion> for pb::ImpactRequest {
    fn from(q: &ImpactQuestion) -> Self {
        pb::ImpactRequest {
            proposal_yaml: q.proposal_yaml.clone(),
            delete: q.delete.iter().map(policy_name_to).collect(),
            since_unix_nanos: q.since_unix_nanos,
            until_unix_nanos: if q.until_unix_nanos == u64::MAX {
                0
            } else {
                q.until_unix_nanos
            },
        }
    }
}

impl TryFrom<pb::ImpactRequest> for ImpactQuestion {
    type Error = WireError;

    /// The kinds of the policies to delete are checked here; whether each is one a proposal may
    /// delete, and exists, is the proposal's to say.
    fn try_from(r: pb::ImpactRequest) -> Result<Self> {
        Ok(ImpactQuestion {
            proposal_yaml: r.proposal_yaml,
            delete: r
                .delete
                .into_iter()
                .map(|d| {
                    Ok(PolicyKey {
                        kind: rule_kind_of(d.kind).ok_or(WireError::Enum {
                            field: "delete.kind",
                            value: d.kind,
                        })?,
                        namespace: d.namespace,
                        name: d.name,
                    })
                })
                .collect::<Result<_>>()?,
            since_unix_nanos: r.since_unix_nanos,
            until_unix_nanos: match r.until_unix_nanos {
                0 => u64::MAX,
                t => t,
            },
        })
    }
}

fn change_to(c: EdgeChange) -> pb::EdgeChange {
    match c {
        EdgeChange::NewlyDenied => pb::EdgeChange::NewlyDenied,
        EdgeChange::NewlyAllowed => pb::EdgeChange::NewlyAllowed,
        EdgeChange::Rule => pb::EdgeChange::Rule,
        EdgeChange::Audit => pb::EdgeChange::Audit,
    }
}

fn change_from(v: i32) -> Result<EdgeChange> {
    match pb::EdgeChange::try_from(v) {
        Ok(pb::EdgeChange::NewlyDenied) => Ok(EdgeChange::NewlyDenied),
        Ok(pb::EdgeChange::NewlyAllowed) => Ok(EdgeChange::NewlyAllowed),
        Ok(pb::EdgeChange::Rule) => Ok(EdgeChange::Rule),
        Ok(pb::EdgeChange::Audit) => Ok(EdgeChange::Audit),
        _ => Err(WireError::Enum {
            field: "changed.change",
            value: v,
        }),
    }
}

fn judgement_to(j: &Judgement) -> pb::Judgement {
    pb::Judgement {
        verdict: match j.verdict {
            Verdict::Allow => pb::FlowVerdict::Allowed,
            Verdict::Deny => pb::FlowVerdict::Denied,
        }
        .into(),
        rule: j.rule.clone(),
        audit_would_deny: j.audit_would_deny.clone(),
    }
}

fn judgement_from(field: &'static str, j: Option<pb::Judgement>) -> Result<Judgement> {
    let j = j.ok_or(WireError::Missing { field })?;
    Ok(Judgement {
        verdict: match pb::FlowVerdict::try_from(j.verdict) {
            Ok(pb::FlowVerdict::Allowed) => Verdict::Allow,
            Ok(pb::FlowVerdict::Denied) => Verdict::Deny,
            _ => {
                return Err(WireError::Enum {
                    field,
                    value: j.verdict,
                });
            }
        },
        rule: j.rule,
        audit_would_deny: j.audit_would_deny,
    })
}

impl From<&Impact> for pb::ImpactResponse {
    fn from(i: &Impact) -> Self {
        let p = &i.proposal;
        pb::ImpactResponse {
            proposal: Some(pb::ProposalSummary {
                added: p.added.clone(),
                changed: p.changed.clone(),
                unchanged: p.unchanged.clone(),
                deleted: p.deleted.clone(),
                warnings: p.warnings.clone(),
            }),
            records: i.records,
            edges: i.edges,
            not_replayed: i.not_replayed,
            unknown_pods: i.unknown_pods,
            breaks: i.breaks,
            changed: i
                .changed
                .iter()
                .map(|e| pb::EdgeImpact {
                    change: change_to(e.change).into(),
                    src: e.src.clone(),
                    dst: e.dst.clone(),
                    at: e.at.clone(),
                    direction: direction_to(e.direction).into(),
                    // The name was made from the number (`protocol_name`).
                    protocol: protocol_number(&e.protocol).map_or(0, u32::from),
                    port: e.port.into(),
                    allowed: e.allowed,
                    denied: e.denied,
                    first_seen_unix_nanos: e.first_seen_unix_nanos,
                    last_seen_unix_nanos: e.last_seen_unix_nanos,
                    before: Some(judgement_to(&e.before)),
                    after: Some(judgement_to(&e.after)),
                    breaks: e.breaks,
                })
                .collect(),
            from_history: i.from_history,
        }
    }
}

impl TryFrom<pb::ImpactResponse> for Impact {
    type Error = WireError;

    fn try_from(r: pb::ImpactResponse) -> Result<Self> {
        let p = r.proposal.ok_or(WireError::Missing { field: "proposal" })?;
        let changed = r
            .changed
            .into_iter()
            .map(|e| {
                Ok(EdgeImpact {
                    change: change_from(e.change)?,
                    src: e.src,
                    dst: e.dst,
                    at: e.at,
                    direction: direction_of(e.direction).ok_or(WireError::Enum {
                        field: "changed.direction",
                        value: e.direction,
                    })?,
                    protocol: protocol_name(u8::try_from(e.protocol).map_err(|_| {
                        WireError::Range {
                            field: "changed.protocol",
                            value: e.protocol.into(),
                        }
                    })?),
                    port: u16::try_from(e.port).map_err(|_| WireError::Range {
                        field: "changed.port",
                        value: e.port.into(),
                    })?,
                    allowed: e.allowed,
                    denied: e.denied,
                    first_seen_unix_nanos: e.first_seen_unix_nanos,
                    last_seen_unix_nanos: e.last_seen_unix_nanos,
                    before: judgement_from("changed.before", e.before)?,
                    after: judgement_from("changed.after", e.after)?,
                    breaks: e.breaks,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Impact {
            proposal: ProposalSummary {
                added: p.added,
                changed: p.changed,
                unchanged: p.unchanged,
                deleted: p.deleted,
                warnings: p.warnings,
            },
            records: r.records,
            edges: r.edges,
            not_replayed: r.not_replayed,
            unknown_pods: r.unknown_pods,
            breaks: r.breaks,
            changed,
            from_history: r.from_history,
        })
    }
}

#[cfg(test)]
mod tests;
