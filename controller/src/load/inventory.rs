//! The inventory kinds, as k8s-openapi defines them: `v1` Namespace, Node and Pod, and
//! `apps/v1` Deployment (expanded into its replicas' pods).

use std::net::IpAddr;
use std::str::FromStr;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    Namespace as NamespaceObject, Node as NodeObject, Pod as PodObject, PodSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::meta::{labels, meta_name, meta_namespace};
use super::peers::{parse_protocol, port_name_problem, port_number};
use crate::error::FieldError;
use crate::model::{ContainerPort, Labels, Namespace, Node, Pod};

/// A `v1` Namespace.
pub(super) fn convert_namespace(
    d: &NamespaceObject,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Namespace> {
    name_and_labels(&d.metadata, prefix, errors).map(|(name, labels)| Namespace { name, labels })
}

/// A `v1` Node: its name, labels and addresses (`status.addresses` of type `InternalIP` or
/// `ExternalIP`, the ones upstream's `nodes` peers select; `Hostname` and the DNS kinds are
/// names, not addresses, and are left out).
pub(super) fn convert_node(
    d: &NodeObject,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Node> {
    let before = errors.len();
    let named = name_and_labels(&d.metadata, prefix, errors);
    let listed = d
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or_default();
    let mut addresses = Vec::new();
    for (i, a) in listed.iter().enumerate() {
        if !matches!(a.type_.as_str(), "InternalIP" | "ExternalIP") {
            continue;
        }
        match IpAddr::from_str(&a.address) {
            Ok(ip) => addresses.push(ip),
            Err(_) => errors.push(FieldError::new(
                format!("{prefix}status.addresses[{i}].address"),
                format!(
                    "{:?} is not an IP address (an {} must be one)",
                    a.address, a.type_
                ),
            )),
        }
    }
    if errors.len() > before {
        return None;
    }
    addresses.sort_unstable();
    addresses.dedup();
    named.map(|(name, labels)| Node {
        name,
        labels,
        addresses,
    })
}

/// The name and, if the name is valid, the labels of a cluster-scoped object.
fn name_and_labels(
    meta: &ObjectMeta,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Option<(String, Labels)> {
    let name = meta_name(meta, prefix, false, errors)?;
    let labels = labels(meta, prefix, errors)?;
    Some((name, labels))
}

/// A `v1` Pod.
pub(super) fn convert_pod(
    d: &PodObject,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Pod> {
    let before = errors.len();
    let name = meta_name(&d.metadata, prefix, true, errors);
    let namespace = meta_namespace(&d.metadata, prefix, errors);
    let labels = labels(&d.metadata, prefix, errors);
    let spec = d.spec.as_ref();
    let ports = container_ports(spec, &format!("{prefix}spec"), errors);
    let mut ips = Vec::new();
    let status = d.status.as_ref();
    let listed = status
        .and_then(|s| s.pod_ips.as_deref())
        .unwrap_or_default();
    let raw = listed
        .iter()
        .enumerate()
        .map(|(i, ip)| (Some(i), ip.ip.as_str()))
        .chain(
            status
                .and_then(|s| s.pod_ip.as_deref())
                .map(|ip| (None, ip)),
        );
    for (i, s) in raw {
        match IpAddr::from_str(s) {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) => errors.push(FieldError::new(
                match i {
                    Some(i) => format!("{prefix}status.podIPs[{i}].ip"),
                    None => format!("{prefix}status.podIP"),
                },
                format!("{s:?} is not an IP address"),
            )),
        }
    }
    if errors.len() > before {
        return None;
    }
    let workload = d.metadata.owner_references.as_ref().and_then(|refs| {
        refs.iter()
            .find(|r| r.controller.unwrap_or(true))
            .map(|r| format!("{}/{}", r.kind, r.name))
    });
    Some(Pod {
        namespace: namespace?,
        name: name?,
        labels: labels?,
        service_account: service_account(spec),
        node_name: spec
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty()),
        ips,
        synthetic_ips: false,
        ports,
        workload,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
    })
}

fn service_account(spec: Option<&PodSpec>) -> String {
    spec.and_then(|s| {
        s.service_account_name
            .clone()
            .or_else(|| s.service_account.clone())
    })
    .filter(|s| !s.is_empty())
    .unwrap_or_else(|| "default".into())
}

fn container_ports(
    spec: Option<&PodSpec>,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Vec<ContainerPort> {
    let mut out = Vec::new();
    let containers = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
    for (c, container) in containers.iter().enumerate() {
        for (i, p) in container.ports.iter().flatten().enumerate() {
            let pp = format!("{path}.containers[{c}].ports[{i}]");
            let Some(port) = port_number(
                i64::from(p.container_port),
                &format!("{pp}.containerPort"),
                errors,
            ) else {
                continue;
            };
            let Some(protocol) = parse_protocol(
                p.protocol.as_deref(),
                &format!("{pp}.protocol"),
                false,
                errors,
            ) else {
                continue;
            };
            if let Some(name) = &p.name
                && let Some(problem) = port_name_problem(name)
            {
                errors.push(FieldError::new(format!("{pp}.name"), problem));
                continue;
            }
            out.push(ContainerPort {
                name: p.name.clone(),
                port,
                protocol,
            });
        }
    }
    out.sort();
    out.dedup();
    out
}

/// An `apps/v1` Deployment: one pod per replica, named `<deployment>-<i>`, without IPs.
pub(super) fn convert_deployment(
    d: &Deployment,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Vec<Pod> {
    let before = errors.len();
    let name = meta_name(&d.metadata, prefix, true, errors);
    let namespace = meta_namespace(&d.metadata, prefix, errors);
    let template = d.spec.as_ref().map(|s| &s.template);
    let labels = labels(
        template
            .and_then(|t| t.metadata.as_ref())
            .unwrap_or(&ObjectMeta::default()),
        &format!("{prefix}spec.template."),
        errors,
    );
    let pod_spec = template.and_then(|t| t.spec.as_ref());
    let ports = container_ports(pod_spec, &format!("{prefix}spec.template.spec"), errors);
    let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    if !(0..=10_000).contains(&replicas) {
        errors.push(FieldError::new(
            format!("{prefix}spec.replicas"),
            format!("replicas {replicas} is out of range: use 0-10000"),
        ));
    }
    if errors.len() > before {
        return Vec::new();
    }
    let (Some(name), Some(namespace), Some(labels)) = (name, namespace, labels) else {
        return Vec::new();
    };
    (0..replicas)
        .map(|i| Pod {
            namespace: namespace.clone(),
            name: format!("{name}-{i}"),
            labels: labels.clone(),
            service_account: service_account(pod_spec),
            node_name: pod_spec.and_then(|s| s.node_name.clone()),
            ips: Vec::new(),
            synthetic_ips: false,
            ports: ports.clone(),
            workload: Some(format!("Deployment/{name}")),
            host_network: pod_spec.and_then(|s| s.host_network).unwrap_or(false),
        })
        .collect()
}
