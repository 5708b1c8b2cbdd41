//! ClusterNetworkPolicy ([`ClusterNetworkPolicy`], `policy.networking.k8s.io/v1beta1` or its
//! identical `v1alpha2`): the Admin and Baseline tiers.

use super::meta::meta_name;
use super::names::{MAX_DOMAIN_NAMES, name_peer_problem, parse_name};
use super::peers::{parse_cidr, port_name_problem, port_number, too_many_rules};
use crate::error::FieldError;
use crate::kubernetes::crd::{ClusterNetworkPolicy, CnpNamespacedPod, CnpPort, CnpRule};
use crate::model::{
    CidrPeer, Isolation, NamespaceScope, Peer, PodSelection, Policy, PolicyKey, PortSpec, Rule,
};
use crate::ruleset::{Action, Direction, PortRange, Protocol, RuleKind, Tier};
use crate::selector::Selector;

/// Upstream allows at most 25 rules per direction and 25 peers per rule.
const CNP_MAX_ITEMS: usize = 25;
/// Rule positions are folded into the entry priority: `priority × CNP_PRIORITY_STRIDE + index`.
pub const CNP_PRIORITY_STRIDE: u16 = 32;

/// A ClusterNetworkPolicy: rules of the Admin or Baseline tier, ordered by priority and position.
pub(super) fn convert(
    d: &ClusterNetworkPolicy,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Policy> {
    let before = errors.len();
    let name = meta_name(&d.metadata, prefix, false, errors);
    let spec = &d.spec;
    let sp = format!("{prefix}spec");
    let tier = match spec.tier.as_str() {
        "Admin" => Some(Tier::Admin),
        "Baseline" => Some(Tier::Baseline),
        other => {
            errors.push(FieldError::new(
                format!("{sp}.tier"),
                format!("unknown tier {other:?}: use Admin or Baseline"),
            ));
            None
        }
    };
    if !(0..=1000).contains(&spec.priority) {
        errors.push(FieldError::new(
            format!("{sp}.priority"),
            format!("priority {} is out of range: use 0-1000", spec.priority),
        ));
    }
    let subject = match (&spec.subject.namespaces, &spec.subject.pods) {
        (Some(ns), None) => {
            Selector::parse(ns, &format!("{sp}.subject.namespaces"), errors).map(|s| PodSelection {
                namespaces: NamespaceScope::Selected(s),
                pods: Selector::everything(),
                service_account: None,
            })
        }
        (None, Some(p)) => namespaced_pod(p, &format!("{sp}.subject.pods"), errors),
        _ => {
            errors.push(FieldError::new(
                format!("{sp}.subject"),
                "set exactly one of namespaces or pods",
            ));
            None
        }
    };
    let mut rules = Vec::new();
    for (direction, list, field) in [
        (Direction::Ingress, &spec.ingress, "ingress"),
        (Direction::Egress, &spec.egress, "egress"),
    ] {
        let list = list.as_deref().unwrap_or_default();
        if too_many_rules(list.len(), CNP_MAX_ITEMS, &format!("{sp}.{field}"), errors) {
            continue;
        }
        for (i, r) in list.iter().enumerate() {
            let rp = format!("{sp}.{field}[{i}]");
            if let Some(rule) = convert_cnp_rule(r, direction, i, tier, spec.priority, &rp, errors)
            {
                rules.push(rule);
            }
        }
    }
    if errors.len() > before {
        return None;
    }
    Some(Policy {
        key: PolicyKey {
            kind: RuleKind::ClusterNetworkPolicy,
            namespace: String::new(),
            name: name?,
        },
        subject: subject?,
        ingress_isolation: Isolation::None,
        egress_isolation: Isolation::None,
        rules,
        quarantine: None,
    })
}

fn namespaced_pod(
    p: &CnpNamespacedPod,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Option<PodSelection> {
    let ns = Selector::parse(
        &p.namespace_selector,
        &format!("{path}.namespaceSelector"),
        errors,
    );
    let pods = Selector::parse(&p.pod_selector, &format!("{path}.podSelector"), errors);
    Some(PodSelection {
        namespaces: NamespaceScope::Selected(ns?),
        pods: pods?,
        service_account: None,
    })
}

fn convert_cnp_rule(
    r: &CnpRule,
    direction: Direction,
    index: usize,
    tier: Option<Tier>,
    priority: i64,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Rule> {
    let before = errors.len();
    let action = match r.action.as_str() {
        "Accept" => Some(Action::Allow),
        "Deny" => Some(Action::Deny),
        "Pass" => Some(Action::Pass),
        other => {
            errors.push(FieldError::new(
                format!("{path}.action"),
                format!("unknown action {other:?}: use Accept, Deny or Pass"),
            ));
            None
        }
    };
    let (peers_doc, field, other) = match direction {
        Direction::Ingress => (&r.from, "from", &r.to),
        Direction::Egress => (&r.to, "to", &r.from),
    };
    if other.is_some() {
        let wrong = if field == "from" { "to" } else { "from" };
        errors.push(FieldError::new(
            format!("{path}.{wrong}"),
            format!(
                "{} rules have no {wrong}: use {field}",
                if field == "from" { "ingress" } else { "egress" }
            ),
        ));
    }
    let peers_doc = peers_doc.as_deref().unwrap_or_default();
    if peers_doc.is_empty() {
        errors.push(FieldError::new(
            format!("{path}.{field}"),
            format!("{field} must list at least one peer"),
        ));
    }
    too_many_rules(
        peers_doc.len(),
        CNP_MAX_ITEMS,
        &format!("{path}.{field}"),
        errors,
    );
    let mut peers = Vec::new();
    let mut has_network = false;
    let mut has_names = false;
    let mut has_nodes = false;
    for (i, p) in peers_doc.iter().enumerate() {
        let pp = format!("{path}.{field}[{i}]");
        let set = [
            p.namespaces.is_some(),
            p.pods.is_some(),
            p.networks.is_some(),
            p.nodes.is_some(),
            p.domain_names.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if set != 1 {
            errors.push(FieldError::new(
                pp,
                "set exactly one of namespaces, pods, networks, nodes or domainNames",
            ));
            continue;
        }
        if let Some(ns) = &p.namespaces {
            if let Some(s) = Selector::parse(ns, &format!("{pp}.namespaces"), errors) {
                peers.push(Peer::Pods(PodSelection {
                    namespaces: NamespaceScope::Selected(s),
                    pods: Selector::everything(),
                    service_account: None,
                }));
            }
        } else if let Some(pods) = &p.pods {
            if let Some(s) = namespaced_pod(pods, &format!("{pp}.pods"), errors) {
                peers.push(Peer::Pods(s));
            }
        } else if let Some(networks) = &p.networks {
            if direction == Direction::Ingress {
                errors.push(FieldError::new(
                    format!("{pp}.networks"),
                    "networks peers are only allowed in egress rules",
                ));
                continue;
            }
            has_network = true;
            if networks.is_empty() {
                errors.push(FieldError::new(
                    format!("{pp}.networks"),
                    "networks must list at least one CIDR",
                ));
            }
            for (j, n) in networks.iter().enumerate() {
                if let Some(c) = parse_cidr(n, &format!("{pp}.networks[{j}]"), errors) {
                    peers.push(Peer::Cidr(CidrPeer {
                        cidr: c,
                        except: Vec::new(),
                    }));
                }
            }
        } else if let Some(nodes) = &p.nodes {
            // Upstream's ingress peers have no `nodes` (ClusterNetworkPolicyIngressPeer):
            // refused there like `networks`.
            if direction == Direction::Ingress {
                errors.push(FieldError::new(
                    format!("{pp}.nodes"),
                    "nodes peers are only allowed in egress rules",
                ));
                continue;
            }
            has_nodes = true;
            if let Some(s) = Selector::parse(nodes, &format!("{pp}.nodes"), errors) {
                peers.push(Peer::Nodes(s));
            }
        } else if let Some(names) = &p.domain_names {
            // NPEP-133: egress, Accept, Admin tier only.
            let np = format!("{pp}.domainNames");
            if let Some(problem) = name_peer_problem(
                direction == Direction::Ingress,
                matches!(action, Some(Action::Allow) | None),
                "Accept",
            ) {
                errors.push(FieldError::new(np, problem));
                continue;
            }
            if tier == Some(Tier::Baseline) {
                errors.push(FieldError::new(
                    np,
                    "domainNames peers are only allowed in the Admin tier (as upstream specifies): use tier Admin",
                ));
                continue;
            }
            if names.is_empty() {
                errors.push(FieldError::new(
                    np.clone(),
                    "domainNames must list at least one name",
                ));
            }
            if too_many_rules(names.len(), MAX_DOMAIN_NAMES, &np, errors) {
                continue;
            }
            has_names = true;
            for (j, n) in names.iter().enumerate() {
                if let Some(pattern) = parse_name(n, &format!("{np}[{j}]"), errors) {
                    peers.push(Peer::Name(pattern));
                }
            }
        }
    }
    let mut ports = Vec::new();
    match &r.protocols {
        None => ports.push(PortSpec::ANY),
        Some(list) => {
            if list.is_empty() {
                errors.push(FieldError::new(
                    format!("{path}.protocols"),
                    "protocols must list at least one entry, or be left out to match all",
                ));
            }
            for (i, proto) in list.iter().enumerate() {
                let pp = format!("{path}.protocols[{i}]");
                let set = [
                    proto.tcp.is_some(),
                    proto.udp.is_some(),
                    proto.sctp.is_some(),
                    proto.destination_named_port.is_some(),
                ]
                .iter()
                .filter(|x| **x)
                .count();
                if set != 1 {
                    errors.push(FieldError::new(
                        pp,
                        "set exactly one of tcp, udp, sctp or destinationNamedPort",
                    ));
                    continue;
                }
                if let Some(name) = &proto.destination_named_port {
                    if has_names {
                        errors.push(FieldError::new(
                            format!("{pp}.destinationNamedPort"),
                            "domainNames peers cannot be used with named ports: they have no named ports",
                        ));
                    } else if has_nodes {
                        errors.push(FieldError::new(
                            format!("{pp}.destinationNamedPort"),
                            "nodes peers cannot be used with named ports: they have no named ports",
                        ));
                    } else if has_network {
                        errors.push(FieldError::new(
                            format!("{pp}.destinationNamedPort"),
                            "networks peers cannot be used with named ports: they have no named ports",
                        ));
                    } else if let Some(problem) = port_name_problem(name) {
                        errors.push(FieldError::new(
                            format!("{pp}.destinationNamedPort"),
                            problem,
                        ));
                    } else {
                        ports.push(PortSpec::Named {
                            protocol: None,
                            name: name.clone(),
                        });
                    }
                    continue;
                }
                let (protocol, m, field) = if let Some(m) = &proto.tcp {
                    (Protocol::Tcp, m, "tcp")
                } else if let Some(m) = &proto.udp {
                    (Protocol::Udp, m, "udp")
                } else if let Some(m) = &proto.sctp {
                    (Protocol::Sctp, m, "sctp")
                } else {
                    continue;
                };
                let dp = format!("{pp}.{field}.destinationPort");
                let range = match &m.destination_port {
                    None => Some(PortRange::ALL),
                    Some(CnpPort {
                        number: Some(n),
                        range: None,
                    }) => port_number(*n, &format!("{dp}.number"), errors).map(PortRange::single),
                    Some(CnpPort {
                        number: None,
                        range: Some(r),
                    }) => {
                        let s = port_number(r.start, &format!("{dp}.range.start"), errors);
                        let e = port_number(r.end, &format!("{dp}.range.end"), errors);
                        match (s, e) {
                            (Some(s), Some(e)) if s < e => Some(PortRange { first: s, last: e }),
                            (Some(_), Some(_)) => {
                                errors.push(FieldError::new(
                                    format!("{dp}.range"),
                                    "start port must be less than end port",
                                ));
                                None
                            }
                            _ => None,
                        }
                    }
                    Some(_) => {
                        errors.push(FieldError::new(dp, "set exactly one of number or range"));
                        None
                    }
                };
                if let Some(ports_range) = range {
                    ports.push(PortSpec::Range {
                        protocol: Some(protocol),
                        ports: ports_range,
                    });
                }
            }
        }
    }
    if errors.len() > before {
        return None;
    }
    ports.sort();
    ports.dedup();
    Some(Rule {
        direction,
        index: index as u32,
        peers,
        ports,
        tier: tier?,
        priority: (priority as u16) * CNP_PRIORITY_STRIDE + index as u16,
        action: action?,
        audit: false,
    })
}
