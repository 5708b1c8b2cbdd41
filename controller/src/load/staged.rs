//! `bulkhead.dev/v1alpha1` StagedNetworkPolicy and StagedClusterNetworkPolicy: the policy of
//! their spec, read by the same conversion as the enforced kind, with every rule and isolation
//! staged (reported, never enforced) and the staged kind in its key.

use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::{cluster_network_policy, network_policy};
use crate::error::FieldError;
use crate::kubernetes::crd::{
    ClusterNetworkPolicy, StagedClusterNetworkPolicy, StagedNetworkPolicy,
};
use crate::model::{Isolation, Policy};
use crate::ruleset::RuleKind;

pub(super) fn convert_network_policy(
    d: &StagedNetworkPolicy,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Policy> {
    let np = NetworkPolicy {
        metadata: d.metadata.clone(),
        spec: Some(d.spec.policy.clone()),
    };
    network_policy::convert(&np, prefix, errors).map(|p| stage(p, RuleKind::StagedNetworkPolicy))
}

pub(super) fn convert_cluster_network_policy(
    d: &StagedClusterNetworkPolicy,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Policy> {
    let cnp = ClusterNetworkPolicy {
        metadata: d.metadata.clone(),
        spec: d.spec.policy.clone(),
    };
    cluster_network_policy::convert(&cnp, prefix, errors)
        .map(|p| stage(p, RuleKind::StagedClusterNetworkPolicy))
}

/// The staged form of an enforced policy: the same subject and rules, reported only.
pub fn stage(mut policy: Policy, kind: RuleKind) -> Policy {
    policy.key.kind = kind;
    for rule in &mut policy.rules {
        rule.audit = true;
    }
    for isolation in [&mut policy.ingress_isolation, &mut policy.egress_isolation] {
        if *isolation == Isolation::Enforce {
            *isolation = Isolation::Audit;
        }
    }
    policy
}
