//! `networking.k8s.io/v1` NetworkPolicy, as k8s-openapi defines it.

use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};

use super::MAX_RULES_PER_DIRECTION;
use super::meta::{meta_name, meta_namespace};
use super::peers::{
    NpPeer, convert_np_peer, convert_np_ports, policy_port, selector_spec, too_many_rules,
};
use crate::error::FieldError;
use crate::model::{Isolation, NamespaceScope, Peer, PodSelection, Policy, PolicyKey, Rule};
use crate::ruleset::{Action, Direction, RuleKind, Tier};
use crate::selector::Selector;

/// A NetworkPolicy: its subject isolated in the directions of `policyTypes`, allow rules.
pub(super) fn convert(
    d: &NetworkPolicy,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Policy> {
    let before = errors.len();
    let name = meta_name(&d.metadata, prefix, true, errors);
    let namespace = meta_namespace(&d.metadata, prefix, errors);
    let spec = d.spec.as_ref();
    let pod_selector = Selector::parse(
        &spec
            .and_then(|s| s.pod_selector.as_ref())
            .map(selector_spec)
            .unwrap_or_default(),
        &format!("{prefix}spec.podSelector"),
        errors,
    );
    let ingress = spec.and_then(|s| s.ingress.as_deref()).unwrap_or_default();
    let egress = spec.and_then(|s| s.egress.as_deref()).unwrap_or_default();
    let (mut has_ingress, mut has_egress) = (false, false);
    match spec.and_then(|s| s.policy_types.as_ref()) {
        Some(types) => {
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => has_ingress = true,
                    "Egress" => has_egress = true,
                    other => errors.push(FieldError::new(
                        format!("{prefix}spec.policyTypes[{i}]"),
                        format!("unknown policy type {other:?}: use Ingress or Egress"),
                    )),
                }
            }
        }
        None => {
            has_ingress = true;
            has_egress = !egress.is_empty();
        }
    }
    too_many_rules(
        ingress.len(),
        MAX_RULES_PER_DIRECTION,
        &format!("{prefix}spec.ingress"),
        errors,
    );
    too_many_rules(
        egress.len(),
        MAX_RULES_PER_DIRECTION,
        &format!("{prefix}spec.egress"),
        errors,
    );
    let ns = namespace.clone().unwrap_or_default();
    let mut rules = Vec::new();
    let mut convert = |direction: Direction,
                       index: usize,
                       peers: Option<&Vec<NetworkPolicyPeer>>,
                       ports: Option<&Vec<NetworkPolicyPort>>,
                       path: String,
                       peer_field: &str,
                       errors: &mut Vec<FieldError>| {
        let peers = match peers.filter(|p| !p.is_empty()) {
            None => vec![Peer::Any],
            Some(list) => {
                list.iter()
                    .enumerate()
                    .filter_map(|(i, p)| {
                        let peer = NpPeer {
                            pod_selector: p.pod_selector.as_ref().map(selector_spec),
                            namespace_selector: p.namespace_selector.as_ref().map(selector_spec),
                            ip_block: p.ip_block.as_ref().map(|b| {
                                (b.cidr.as_str(), b.except.as_deref().unwrap_or_default())
                            }),
                        };
                        convert_np_peer(&peer, &ns, &format!("{path}.{peer_field}[{i}]"), errors)
                    })
                    .collect()
            }
        };
        let ports: Option<Vec<_>> = ports.map(|list| list.iter().map(policy_port).collect());
        let ports = convert_np_ports(ports.as_ref(), &format!("{path}.ports"), false, errors);
        rules.push(Rule {
            direction,
            index: index as u32,
            peers,
            ports,
            tier: Tier::Application,
            priority: 0,
            action: Action::Allow,
            audit: false,
        });
    };
    for (i, r) in ingress.iter().enumerate() {
        convert(
            Direction::Ingress,
            i,
            r.from.as_ref(),
            r.ports.as_ref(),
            format!("{prefix}spec.ingress[{i}]"),
            "from",
            errors,
        );
    }
    for (i, r) in egress.iter().enumerate() {
        convert(
            Direction::Egress,
            i,
            r.to.as_ref(),
            r.ports.as_ref(),
            format!("{prefix}spec.egress[{i}]"),
            "to",
            errors,
        );
    }
    if errors.len() > before {
        return None;
    }
    // Rules of a direction the policy does not declare in policyTypes have no effect.
    rules.retain(|r| match r.direction {
        Direction::Ingress => has_ingress,
        Direction::Egress => has_egress,
    });
    let namespace = namespace?;
    Some(Policy {
        key: PolicyKey {
            kind: RuleKind::NetworkPolicy,
            namespace: namespace.clone(),
            name: name?,
        },
        subject: PodSelection {
            namespaces: NamespaceScope::Named(namespace),
            pods: pod_selector?,
            service_account: None,
        },
        ingress_isolation: if has_ingress {
            Isolation::Enforce
        } else {
            Isolation::None
        },
        egress_isolation: if has_egress {
            Isolation::Enforce
        } else {
            Isolation::None
        },
        rules,
        quarantine: None,
    })
}
