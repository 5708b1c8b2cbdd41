//! Peers, ports, protocols and CIDRs: the NetworkPolicy shapes that ServicePolicy and Quarantine
//! reuse, and the checks ClusterNetworkPolicy rules and container ports share with them. Ports
//! are checked in the CRD's [`PolicyPort`] (NetworkPolicy's `NetworkPolicyPort` with any
//! integer, so that an out-of-range number is reported as one); a NetworkPolicy's ports and
//! selectors are read into those shapes by [`policy_port`] and [`selector_spec`].

use std::str::FromStr;

use ipnetwork::IpNetwork;
use k8s_openapi::api::networking::v1::NetworkPolicyPort;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr;

use crate::error::FieldError;
use crate::kubernetes::crd::{IntOrString, PolicyPort};
use crate::model::{CidrPeer, NamespaceScope, Peer, PodSelection, PortSpec};
use crate::ruleset::{PortRange, Protocol};
use crate::selector::{LabelSelectorRequirementSpec, LabelSelectorSpec, Selector};

/// A NetworkPolicy peer (a Quarantine exception's peer has the same fields): selectors, or an
/// ipBlock's CIDR and exceptions.
pub(super) struct NpPeer<'a> {
    pub(super) pod_selector: Option<LabelSelectorSpec>,
    pub(super) namespace_selector: Option<LabelSelectorSpec>,
    pub(super) ip_block: Option<(&'a str, &'a [String])>,
}

/// Kubernetes' `LabelSelector` in the shape [`Selector::parse`] checks.
pub(super) fn selector_spec(s: &LabelSelector) -> LabelSelectorSpec {
    LabelSelectorSpec {
        match_labels: s.match_labels.clone(),
        match_expressions: s.match_expressions.as_ref().map(|list| {
            list.iter()
                .map(|r| LabelSelectorRequirementSpec {
                    key: r.key.clone(),
                    operator: r.operator.clone(),
                    values: r.values.clone(),
                })
                .collect()
        }),
    }
}

/// A NetworkPolicy port in the CRD's [`PolicyPort`] shape, which the port checks read.
pub(super) fn policy_port(p: &NetworkPolicyPort) -> PolicyPort {
    PolicyPort {
        protocol: p.protocol.clone(),
        port: p.port.as_ref().map(|port| match port {
            intstr::IntOrString::Int(n) => IntOrString::Int(i64::from(*n)),
            intstr::IntOrString::String(name) => IntOrString::Str(name.clone()),
        }),
        end_port: p.end_port.map(i64::from),
    }
}

pub(super) fn parse_protocol(
    s: Option<&str>,
    path: &str,
    allow_icmp: bool,
    errors: &mut Vec<FieldError>,
) -> Option<Protocol> {
    match s.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        "ICMP" if allow_icmp => Some(Protocol::Icmp),
        "ICMPv6" if allow_icmp => Some(Protocol::Icmpv6),
        other => {
            errors.push(FieldError::new(
                path,
                format!(
                    "unsupported protocol {other:?}: use {}",
                    if allow_icmp {
                        "TCP, UDP, SCTP, ICMP or ICMPv6"
                    } else {
                        "TCP, UDP or SCTP"
                    }
                ),
            ));
            None
        }
    }
}

pub(super) fn port_number(n: i64, path: &str, errors: &mut Vec<FieldError>) -> Option<u16> {
    if (1..=65535).contains(&n) {
        Some(n as u16)
    } else {
        errors.push(FieldError::new(
            path,
            format!("port {n} is out of range: use 1-65535"),
        ));
        None
    }
}

/// IANA service name: 1-15 lower-case alphanumerics or '-', at least one letter, no leading,
/// trailing or doubled '-'.
pub(super) fn port_name_problem(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.chars().any(|c| c.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    (!ok).then(|| {
        format!("invalid port name {name:?}: use 1-15 lower-case alphanumerics or '-' with at least one letter")
    })
}

pub(super) fn parse_cidr(s: &str, path: &str, errors: &mut Vec<FieldError>) -> Option<IpNetwork> {
    if !s.contains('/') {
        errors.push(FieldError::new(
            path,
            format!("{s:?} is not a CIDR: write it as address/prefix, e.g. 10.0.0.0/8"),
        ));
        return None;
    }
    match IpNetwork::from_str(s) {
        Ok(net) => IpNetwork::new(net.network(), net.prefix()).ok(),
        Err(e) => {
            errors.push(FieldError::new(
                path,
                format!(
                    "{s:?} is not a valid CIDR ({e}): write it as address/prefix, e.g. 10.0.0.0/8"
                ),
            ));
            None
        }
    }
}

pub(super) fn parse_cidr_peer(
    cidr: &str,
    except: &[String],
    path: &str,
    except_path: &str,
    errors: &mut Vec<FieldError>,
) -> Option<CidrPeer> {
    let before = errors.len();
    let net = parse_cidr(cidr, path, errors)?;
    let mut excepts = Vec::new();
    for (i, e) in except.iter().enumerate() {
        let p = format!("{except_path}[{i}]");
        let Some(ex) = parse_cidr(e, &p, errors) else {
            continue;
        };
        let inside = ex.is_ipv4() == net.is_ipv4()
            && ex.prefix() > net.prefix()
            && net.contains(ex.network());
        if !inside {
            errors.push(FieldError::new(
                p,
                format!("except {e:?} must be a strict subset of cidr {cidr:?}"),
            ));
            continue;
        }
        excepts.push(ex);
    }
    if errors.len() > before {
        return None;
    }
    excepts.sort();
    excepts.dedup();
    Some(CidrPeer {
        cidr: net,
        except: excepts,
    })
}

/// NetworkPolicy / ServicePolicy `ports` entries.
pub(super) fn convert_np_ports(
    ports: Option<&Vec<PolicyPort>>,
    path: &str,
    allow_icmp: bool,
    errors: &mut Vec<FieldError>,
) -> Vec<PortSpec> {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        return vec![PortSpec::ANY];
    };
    let mut out = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let pp = format!("{path}[{i}]");
        let Some(protocol) = parse_protocol(
            p.protocol.as_deref(),
            &format!("{pp}.protocol"),
            allow_icmp,
            errors,
        ) else {
            continue;
        };
        match (&p.port, p.end_port) {
            (None, Some(_)) => errors.push(FieldError::new(
                format!("{pp}.endPort"),
                "endPort needs a numeric port: set port to the first port of the range",
            )),
            (Some(_), _) if !protocol.has_ports() => errors.push(FieldError::new(
                format!("{pp}.port"),
                format!("protocol {protocol:?} has no ports: remove port"),
            )),
            (None, None) => out.push(PortSpec::Range {
                protocol: Some(protocol),
                ports: PortRange::ALL,
            }),
            (Some(IntOrString::Str(name)), end) => {
                if end.is_some() {
                    errors.push(FieldError::new(
                        format!("{pp}.endPort"),
                        "endPort cannot be used with a named port: use a numeric port",
                    ));
                } else if let Some(problem) = port_name_problem(name) {
                    errors.push(FieldError::new(format!("{pp}.port"), problem));
                } else {
                    out.push(PortSpec::Named {
                        protocol: Some(protocol),
                        name: name.clone(),
                    });
                }
            }
            (Some(IntOrString::Int(n)), end) => {
                let Some(first) = port_number(*n, &format!("{pp}.port"), errors) else {
                    continue;
                };
                let last = match end {
                    None => first,
                    Some(e) => {
                        let Some(last) = port_number(e, &format!("{pp}.endPort"), errors) else {
                            continue;
                        };
                        if last < first {
                            errors.push(FieldError::new(
                                format!("{pp}.endPort"),
                                format!(
                                    "endPort {last} is below port {first}: it must be at least port"
                                ),
                            ));
                            continue;
                        }
                        last
                    }
                };
                out.push(PortSpec::Range {
                    protocol: Some(protocol),
                    ports: PortRange { first, last },
                });
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

pub(super) fn too_many_rules(
    n: usize,
    max: usize,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> bool {
    if n > max {
        errors.push(FieldError::new(
            path,
            format!("{n} rules is more than the {max} allowed: split the policy"),
        ));
        return true;
    }
    false
}

pub(super) fn convert_np_peer(
    p: &NpPeer,
    namespace: &str,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Peer> {
    match (&p.pod_selector, &p.namespace_selector, &p.ip_block) {
        (None, None, None) => {
            errors.push(FieldError::new(
                path,
                "must specify a peer: set podSelector, namespaceSelector or ipBlock",
            ));
            None
        }
        (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
            errors.push(FieldError::new(
                path,
                "ipBlock cannot be combined with podSelector or namespaceSelector: use separate peers",
            ));
            None
        }
        (None, None, Some((cidr, except))) => parse_cidr_peer(
            cidr,
            except,
            &format!("{path}.ipBlock.cidr"),
            &format!("{path}.ipBlock.except"),
            errors,
        )
        .map(Peer::Cidr),
        (pods, nss, None) => {
            let pods = match pods {
                Some(s) => Selector::parse(s, &format!("{path}.podSelector"), errors)?,
                None => Selector::everything(),
            };
            let namespaces = match nss {
                Some(s) => NamespaceScope::Selected(Selector::parse(
                    s,
                    &format!("{path}.namespaceSelector"),
                    errors,
                )?),
                None => NamespaceScope::Named(namespace.to_string()),
            };
            Some(Peer::Pods(PodSelection {
                namespaces,
                pods,
                service_account: None,
            }))
        }
    }
}
