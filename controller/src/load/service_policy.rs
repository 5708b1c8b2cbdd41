//! `bulkhead.dev/v1alpha1` ServicePolicy: policy by service identity.

use super::MAX_RULES_PER_DIRECTION;
use super::meta::{dns_label_problem, meta_name, meta_namespace};
use super::names::{name_peer_problem, parse_name};
use super::peers::{convert_np_ports, parse_cidr_peer, too_many_rules};
use crate::error::FieldError;
use crate::kubernetes::crd::{FqdnPeer, ServicePeer, ServicePolicy};
use crate::model::{Isolation, NamespaceScope, Peer, PodSelection, Policy, PolicyKey, Rule};
use crate::ruleset::{Action, CLUSTER_LABEL, ClusterName, Direction, NamePattern, RuleKind, Tier};
use crate::selector::{Selector, dns_subdomain_problem};

/// A ServicePolicy: application-tier rules by service identity, enforced or audited.
pub(super) fn convert(
    d: &ServicePolicy,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Policy> {
    let before = errors.len();
    let name = meta_name(&d.metadata, prefix, true, errors);
    let namespace = meta_namespace(&d.metadata, prefix, errors);
    let ns = namespace.clone().unwrap_or_default();
    let sp = format!("{prefix}spec");
    let spec = &d.spec;
    let audit = match spec.mode.as_deref().unwrap_or("Enforce") {
        "Enforce" => false,
        "Audit" => true,
        other => {
            errors.push(FieldError::new(
                format!("{sp}.mode"),
                format!("unknown mode {other:?}: use Enforce or Audit"),
            ));
            false
        }
    };
    let subject = spec.subject.clone().unwrap_or_default();
    let subject_pods = match &subject.pod_selector {
        Some(s) => Selector::parse(s, &format!("{sp}.subject.podSelector"), errors),
        None => Some(Selector::everything()),
    };
    if let Some(sa) = &subject.service_account
        && let Some(problem) = dns_subdomain_problem(sa)
    {
        errors.push(FieldError::new(
            format!("{sp}.subject.serviceAccount"),
            problem,
        ));
    }
    let mut rules = Vec::new();
    let mut isolation = [Isolation::None; 2];
    for (direction, list, field, peer_field) in [
        (Direction::Ingress, &spec.ingress, "ingress", "from"),
        (Direction::Egress, &spec.egress, "egress", "to"),
    ] {
        let list = list.as_deref().unwrap_or_default();
        if too_many_rules(
            list.len(),
            MAX_RULES_PER_DIRECTION,
            &format!("{sp}.{field}"),
            errors,
        ) {
            continue;
        }
        for (i, r) in list.iter().enumerate() {
            let rp = format!("{sp}.{field}[{i}]");
            let action = match r.action.as_deref().unwrap_or("Allow") {
                "Allow" => Action::Allow,
                "Deny" => Action::Deny,
                other => {
                    errors.push(FieldError::new(
                        format!("{rp}.action"),
                        format!("unknown action {other:?}: use Allow or Deny"),
                    ));
                    continue;
                }
            };
            let (peers_doc, wrong) = match direction {
                Direction::Ingress => (&r.from, r.to.is_some().then_some("to")),
                Direction::Egress => (&r.to, r.from.is_some().then_some("from")),
            };
            if let Some(w) = wrong {
                errors.push(FieldError::new(
                    format!("{rp}.{w}"),
                    format!("{field} rules have no {w}: use {peer_field}"),
                ));
            }
            let peers = match peers_doc.as_ref().filter(|p| !p.is_empty()) {
                None => vec![Peer::Any],
                Some(list) => list
                    .iter()
                    .enumerate()
                    .filter_map(|(j, p)| {
                        let pp = format!("{rp}.{peer_field}[{j}]");
                        if let Some(fqdn) = &p.fqdn {
                            if let Some(problem) = name_peer_problem(
                                direction == Direction::Ingress,
                                action == Action::Allow,
                                "Allow",
                            ) {
                                errors.push(FieldError::new(format!("{pp}.fqdn"), problem));
                                return None;
                            }
                            if p.service.is_none() && p.cidr.is_none() && p.entity.is_none() {
                                return convert_fqdn(fqdn, &format!("{pp}.fqdn"), errors)
                                    .map(Peer::Name);
                            }
                        }
                        convert_service_peer(p, &ns, &pp, errors)
                    })
                    .collect(),
            };
            let ports = convert_np_ports(r.ports.as_ref(), &format!("{rp}.ports"), true, errors);
            if action == Action::Allow {
                isolation[direction as usize] = if audit {
                    Isolation::Audit
                } else {
                    Isolation::Enforce
                };
            }
            rules.push(Rule {
                direction,
                index: i as u32,
                peers,
                ports,
                tier: Tier::Application,
                priority: 0,
                action,
                audit,
            });
        }
    }
    if errors.len() > before {
        return None;
    }
    Some(Policy {
        key: PolicyKey {
            kind: RuleKind::ServicePolicy,
            namespace: ns.clone(),
            name: name?,
        },
        subject: PodSelection {
            namespaces: NamespaceScope::Named(ns),
            pods: subject_pods?,
            service_account: subject.service_account,
        },
        ingress_isolation: isolation[Direction::Ingress as usize],
        egress_isolation: isolation[Direction::Egress as usize],
        rules,
        quarantine: None,
    })
}

fn convert_service_peer(
    p: &ServicePeer,
    namespace: &str,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Peer> {
    let set = [
        p.service.is_some(),
        p.cidr.is_some(),
        p.entity.is_some(),
        p.fqdn.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if set != 1 {
        errors.push(FieldError::new(
            path,
            "set exactly one of service, cidr, entity or fqdn",
        ));
        return None;
    }
    if p.except.is_some() && p.cidr.is_none() {
        errors.push(FieldError::new(
            format!("{path}.except"),
            "except needs cidr",
        ));
        return None;
    }
    if let Some(cidr) = &p.cidr {
        return parse_cidr_peer(
            cidr,
            p.except.as_deref().unwrap_or_default(),
            &format!("{path}.cidr"),
            &format!("{path}.except"),
            errors,
        )
        .map(Peer::Cidr);
    }
    if let Some(entity) = &p.entity {
        return match entity.as_str() {
            "world" => Some(Peer::World),
            "cluster" => Some(Peer::Cluster),
            "host" => Some(Peer::Host),
            other => {
                errors.push(FieldError::new(
                    format!("{path}.entity"),
                    format!("unknown entity {other:?}: use world, cluster or host"),
                ));
                None
            }
        };
    }
    let s = p.service.as_ref()?;
    let sp = format!("{path}.service");
    let before = errors.len();
    // `cluster: west` is the pod selector's requirement `bulkhead.dev/cluster: west`, which is
    // what lets a selection match a peer cluster's pods.
    let mut pod_selector = s.pod_selector.clone();
    if let Some(c) = &s.cluster {
        match c.parse::<ClusterName>() {
            Err(e) => errors.push(FieldError::new(format!("{sp}.cluster"), e.to_string())),
            Ok(c) => {
                let sel = pod_selector.get_or_insert_with(Default::default);
                let names_it = sel
                    .match_labels
                    .as_ref()
                    .is_some_and(|l| l.contains_key(CLUSTER_LABEL))
                    || sel
                        .match_expressions
                        .iter()
                        .flatten()
                        .any(|r| r.key == CLUSTER_LABEL);
                if names_it {
                    errors.push(FieldError::new(
                        format!("{sp}.podSelector"),
                        format!("name the cluster in {sp}.cluster only, not as {CLUSTER_LABEL} in the selector"),
                    ));
                }
                sel.match_labels
                    .get_or_insert_with(Default::default)
                    .insert(CLUSTER_LABEL.to_string(), c.to_string());
            }
        }
    }
    let pods = match &pod_selector {
        Some(sel) => Selector::parse(sel, &format!("{sp}.podSelector"), errors),
        None => Some(Selector::everything()),
    };
    let namespaces = match (&s.namespace, &s.namespace_selector) {
        (Some(_), Some(_)) => {
            errors.push(FieldError::new(
                sp.clone(),
                "set at most one of namespace or namespaceSelector",
            ));
            None
        }
        (Some(n), None) => match dns_label_problem(n) {
            Some(problem) => {
                errors.push(FieldError::new(format!("{sp}.namespace"), problem));
                None
            }
            None => Some(NamespaceScope::Named(n.clone())),
        },
        (None, Some(sel)) => Selector::parse(sel, &format!("{sp}.namespaceSelector"), errors)
            .map(NamespaceScope::Selected),
        (None, None) => Some(NamespaceScope::Named(namespace.to_string())),
    };
    if let Some(sa) = &s.service_account
        && let Some(problem) = dns_subdomain_problem(sa)
    {
        errors.push(FieldError::new(format!("{sp}.serviceAccount"), problem));
    }
    if errors.len() > before {
        return None;
    }
    Some(Peer::Pods(PodSelection {
        namespaces: namespaces?,
        pods: pods?,
        service_account: s.service_account.clone(),
    }))
}

/// An `fqdn` peer: exactly one of `matchName` (an exact name) and `matchPattern` (`*.` and a
/// name), with the matching of ClusterNetworkPolicy `domainNames`.
fn convert_fqdn(f: &FqdnPeer, path: &str, errors: &mut Vec<FieldError>) -> Option<NamePattern> {
    match (&f.match_name, &f.match_pattern) {
        (Some(name), None) => {
            let field = format!("{path}.matchName");
            let p = parse_name(name, &field, errors)?;
            if p.is_wildcard() {
                errors.push(FieldError::new(
                    field,
                    format!("{name:?} is a pattern: write it as matchPattern"),
                ));
                return None;
            }
            Some(p)
        }
        (None, Some(pattern)) => {
            let field = format!("{path}.matchPattern");
            let p = parse_name(pattern, &field, errors)?;
            if !p.is_wildcard() {
                errors.push(FieldError::new(
                    field,
                    format!(
                        "{pattern:?} has no leading \"*.\": write one name as matchName, or a pattern such as *.{p}"
                    ),
                ));
                return None;
            }
            Some(p)
        }
        _ => {
            errors.push(FieldError::new(
                path,
                "set exactly one of matchName or matchPattern",
            ));
            None
        }
    }
}
