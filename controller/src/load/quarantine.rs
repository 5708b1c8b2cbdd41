//! `bulkhead.dev/v1alpha1` Quarantine: isolating pods above every other tier.

use super::MAX_RULES_PER_DIRECTION;
use super::meta::{meta_name, meta_namespace};
use super::peers::{NpPeer, convert_np_peer, convert_np_ports, too_many_rules};
use super::rfc3339::parse_rfc3339;
use crate::error::FieldError;
use crate::kubernetes::crd::{IntOrString, Quarantine};
use crate::model::{
    Isolation, NamespaceScope, PodSelection, Policy, PolicyKey, QuarantineSpec, Rule,
};
use crate::ruleset::{Action, Direction, RuleKind, Tier};
use crate::selector::{Selector, dns_subdomain_problem};

/// `bulkhead.dev/v1alpha1` Quarantine: see [`crate::model::Policy`] for what it becomes.
pub(super) fn convert(
    d: &Quarantine,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Policy> {
    let before = errors.len();
    let name = meta_name(&d.metadata, prefix, true, errors);
    let namespace = meta_namespace(&d.metadata, prefix, errors);
    let ns = namespace.clone().unwrap_or_default();
    let sp = format!("{prefix}spec");
    let spec = &d.spec;
    let (pods, selector) = match (&spec.pods, &spec.pod_selector) {
        (Some(_), Some(_)) | (None, None) => {
            errors.push(FieldError::new(
                sp.clone(),
                "set exactly one of pods (pod names) or podSelector to choose the pods to quarantine",
            ));
            (None, None)
        }
        (Some(names), None) => {
            if names.is_empty() {
                errors.push(FieldError::new(
                    format!("{sp}.pods"),
                    "pods is empty: name at least one pod of the namespace",
                ));
            }
            for (i, n) in names.iter().enumerate() {
                if let Some(problem) = dns_subdomain_problem(n) {
                    errors.push(FieldError::new(format!("{sp}.pods[{i}]"), problem));
                }
            }
            let mut names = names.clone();
            names.sort();
            names.dedup();
            (Some(names), Some(Selector::everything()))
        }
        (None, Some(sel)) => (
            None,
            Selector::parse(sel, &format!("{sp}.podSelector"), errors),
        ),
    };
    let reason = spec.reason.as_deref().map(str::trim).unwrap_or_default();
    if reason.is_empty() {
        errors.push(FieldError::new(
            format!("{sp}.reason"),
            "reason is required: say why the pods are quarantined",
        ));
    }
    let expires_at = spec.expires_at.as_deref().and_then(|t| {
        parse_rfc3339(t)
            .map_err(|problem| {
                errors.push(FieldError::new(
                    format!("{sp}.expiresAt"),
                    format!(
                        "{t:?} is not an RFC 3339 time ({problem}): write e.g. 2026-12-01T00:00:00Z"
                    ),
                ))
            })
            .ok()
    });
    let allow = spec.allow.as_deref().unwrap_or_default();
    too_many_rules(
        allow.len(),
        MAX_RULES_PER_DIRECTION,
        &format!("{sp}.allow"),
        errors,
    );
    let mut rules = Vec::new();
    for (i, a) in allow.iter().enumerate() {
        let ap = format!("{sp}.allow[{i}]");
        let peer_doc = NpPeer {
            pod_selector: a.pod_selector.clone(),
            namespace_selector: a.namespace_selector.clone(),
            ip_block: a
                .ip_block
                .as_ref()
                .map(|b| (b.cidr.as_str(), b.except.as_deref().unwrap_or_default())),
        };
        let peer = convert_np_peer(&peer_doc, &ns, &ap, errors);
        for (j, p) in a.ports.iter().flatten().enumerate() {
            if let Some(IntOrString::Str(_)) = p.port {
                errors.push(FieldError::new(
                    format!("{ap}.ports[{j}].port"),
                    "named ports cannot be used in quarantine exceptions: use the port number",
                ));
            }
        }
        let ports = convert_np_ports(a.ports.as_ref(), &format!("{ap}.ports"), true, errors);
        let Some(peer) = peer else {
            continue;
        };
        for direction in Direction::ALL {
            rules.push(Rule {
                direction,
                index: i as u32,
                peers: vec![peer.clone()],
                ports: ports.clone(),
                tier: Tier::Quarantine,
                priority: 0,
                action: Action::Allow,
                audit: false,
            });
        }
    }
    if errors.len() > before {
        return None;
    }
    Some(Policy {
        key: PolicyKey {
            kind: RuleKind::Quarantine,
            namespace: ns.clone(),
            name: name?,
        },
        subject: PodSelection {
            namespaces: NamespaceScope::Named(namespace?),
            pods: selector?,
            service_account: None,
        },
        ingress_isolation: Isolation::Enforce,
        egress_isolation: Isolation::Enforce,
        rules,
        quarantine: Some(QuarantineSpec {
            pods,
            reason: reason.to_string(),
            expires_at,
        }),
    })
}
