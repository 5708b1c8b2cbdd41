use bulkhead_proto::v1 as pb;

use super::*;
use crate::ruleset::RuleKind;

/// What a client sends converts to the question the controller answers, and back.
#[test]
fn questions_survive_the_wire() {
    let q = RecommendQuestion {
        namespaces: ["shop".to_string(), "tools".to_string()].into(),
        since_unix_nanos: 7,
        learning_window: std::time::Duration::from_secs(60),
        kind: RecommendKind::ServicePolicy,
    };
    assert_eq!(
        RecommendQuestion::try_from(pb::RecommendRequest::from(&q)).unwrap(),
        q
    );
    // Unset fields are the defaults.
    let d = RecommendQuestion::try_from(pb::RecommendRequest::default()).unwrap();
    assert_eq!(d.learning_window, RecommendQuestion::DEFAULT_LEARNING);
    assert_eq!(d.kind, RecommendKind::NetworkPolicy);
    assert!(d.namespaces.is_empty());

    let q = ImpactQuestion {
        proposal_yaml: "kind: NetworkPolicy\n".into(),
        delete: vec![
            PolicyKey {
                kind: RuleKind::ClusterNetworkPolicy,
                namespace: String::new(),
                name: "a".into(),
            },
            PolicyKey {
                kind: RuleKind::NetworkPolicy,
                namespace: "shop".into(),
                name: "b".into(),
            },
        ],
        since_unix_nanos: 1,
        until_unix_nanos: u64::MAX,
    };
    let wire = pb::ImpactRequest::from(&q);
    assert_eq!(wire.until_unix_nanos, 0, "up to now");
    assert_eq!(ImpactQuestion::try_from(wire).unwrap(), q);
}

/// Garbage from a peer is refused with the field that is wrong, never taken as a default.
#[test]
fn garbage_is_refused_naming_the_field() {
    let err = |e: WireError| e.to_string();
    assert_eq!(
        err(RecommendQuestion::try_from(pb::RecommendRequest {
            kind: 99,
            ..Default::default()
        })
        .unwrap_err()),
        "kind: unknown value 99"
    );
    assert_eq!(
        err(ImpactQuestion::try_from(pb::ImpactRequest {
            delete: vec![pb::PolicyName {
                kind: 42,
                namespace: "shop".into(),
                name: "x".into(),
            }],
            ..Default::default()
        })
        .unwrap_err()),
        "delete.kind: unknown value 42"
    );
    let policy = |p| pb::RecommendResponse {
        status: pb::RecommendationStatus::Stable.into(),
        policies: vec![pb::RecommendedPolicy {
            workload: Some(pb::WorkloadRef {
                namespace: "shop".into(),
                name: "Deployment/web".into(),
            }),
            status: pb::RecommendationStatus::Stable.into(),
            policy: p,
        }],
        ..Default::default()
    };
    assert!(
        err(Recommendation::try_from(policy(Some(
            pb::recommended_policy::Policy::NetworkPolicyJson(b"{not json".to_vec())
        )))
        .unwrap_err())
        .starts_with("policies.network_policy_json: not a valid NetworkPolicy")
    );
    assert_eq!(
        err(Recommendation::try_from(policy(None)).unwrap_err()),
        "policies.policy: missing"
    );
    assert_eq!(
        err(Recommendation::try_from(pb::RecommendResponse::default()).unwrap_err()),
        "status: unknown value 0"
    );
    let edge = pb::EdgeImpact {
        change: pb::EdgeChange::NewlyDenied.into(),
        direction: pb::Direction::Ingress.into(),
        protocol: 6,
        port: 70_000,
        before: Some(pb::Judgement {
            verdict: pb::FlowVerdict::Allowed.into(),
            ..Default::default()
        }),
        after: Some(pb::Judgement {
            verdict: pb::FlowVerdict::Denied.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let impact = |e: pb::EdgeImpact| pb::ImpactResponse {
        proposal: Some(pb::ProposalSummary::default()),
        changed: vec![e],
        ..Default::default()
    };
    assert_eq!(
        err(Impact::try_from(impact(edge.clone())).unwrap_err()),
        "changed.port: 70000 is out of range"
    );
    let mut audit = edge.clone();
    audit.port = 80;
    audit.after.as_mut().unwrap().verdict = pb::FlowVerdict::AuditWouldDeny.into();
    assert_eq!(
        err(Impact::try_from(impact(audit)).unwrap_err()),
        "changed.after: unknown value 3"
    );
    let mut fine = edge;
    fine.port = 80;
    let i = Impact::try_from(impact(fine)).unwrap();
    assert_eq!(
        (i.changed[0].protocol.as_str(), i.changed[0].port),
        ("TCP", 80)
    );
    assert_eq!(
        err(Impact::try_from(pb::ImpactResponse::default()).unwrap_err()),
        "proposal: missing"
    );
}
