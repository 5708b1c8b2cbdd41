//! The inventory kinds: `v1` Namespace, Node and Pod, and `apps/v1` Deployment (expanded into
//! its replicas' pods).

use std::net::IpAddr;
use std::str::FromStr;

use serde::Deserialize;

use super::meta::{Meta, labels, meta_name, meta_namespace};
use super::peers::{parse_protocol, port_name_problem, port_number};
use crate::error::FieldError;
use crate::model::{ContainerPort, Labels, Namespace, Node, Pod};

/// A Namespace or a Node: only the metadata matters.
#[derive(Deserialize)]
pub(super) struct NamespaceDoc {
    #[serde(default)]
    metadata: Meta,
}

#[derive(Deserialize)]
pub(super) struct PodDoc {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    spec: PodSpecDoc,
    #[serde(default)]
    status: PodStatusDoc,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodSpecDoc {
    #[serde(default)]
    service_account_name: Option<String>,
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    host_network: Option<bool>,
    #[serde(default)]
    containers: Vec<ContainerDoc>,
}

#[derive(Deserialize, Default)]
struct ContainerDoc {
    #[serde(default)]
    ports: Vec<ContainerPortDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerPortDoc {
    #[serde(default)]
    name: Option<String>,
    container_port: i64,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodStatusDoc {
    #[serde(default, rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pod_ips: Option<Vec<PodIpDoc>>,
}

#[derive(Deserialize)]
struct PodIpDoc {
    ip: String,
}

#[derive(Deserialize)]
pub(super) struct DeploymentDoc {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    spec: DeploymentSpecDoc,
}

#[derive(Deserialize, Default)]
struct DeploymentSpecDoc {
    #[serde(default)]
    replicas: Option<i64>,
    #[serde(default)]
    template: PodTemplateDoc,
}

#[derive(Deserialize, Default)]
struct PodTemplateDoc {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    spec: PodSpecDoc,
}

/// A `v1` Namespace.
pub(super) fn convert_namespace(
    d: &NamespaceDoc,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Namespace> {
    name_and_labels(d, prefix, errors).map(|(name, labels)| Namespace { name, labels })
}

/// A `v1` Node (only its name and labels matter).
pub(super) fn convert_node(
    d: &NamespaceDoc,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Node> {
    name_and_labels(d, prefix, errors).map(|(name, labels)| Node { name, labels })
}

/// The name and, if the name is valid, the labels of a cluster-scoped object.
fn name_and_labels(
    d: &NamespaceDoc,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Option<(String, Labels)> {
    let name = meta_name(&d.metadata, prefix, false, errors)?;
    let labels = labels(&d.metadata, prefix, errors)?;
    Some((name, labels))
}

/// A `v1` Pod.
pub(super) fn convert_pod(d: &PodDoc, prefix: &str, errors: &mut Vec<FieldError>) -> Option<Pod> {
    let before = errors.len();
    let name = meta_name(&d.metadata, prefix, true, errors);
    let namespace = meta_namespace(&d.metadata, prefix, errors);
    let labels = labels(&d.metadata, prefix, errors);
    let ports = container_ports(&d.spec, &format!("{prefix}spec"), errors);
    let mut ips = Vec::new();
    let mut raw: Vec<(String, String)> = Vec::new();
    if let Some(list) = &d.status.pod_ips {
        for (i, ip) in list.iter().enumerate() {
            raw.push((format!("{prefix}status.podIPs[{i}].ip"), ip.ip.clone()));
        }
    }
    if let Some(ip) = &d.status.pod_ip {
        raw.push((format!("{prefix}status.podIP"), ip.clone()));
    }
    for (path, s) in raw {
        match IpAddr::from_str(&s) {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) => errors.push(FieldError::new(path, format!("{s:?} is not an IP address"))),
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
        service_account: service_account(&d.spec),
        node_name: d.spec.node_name.clone().filter(|n| !n.is_empty()),
        ips,
        synthetic_ips: false,
        ports,
        workload,
        host_network: d.spec.host_network.unwrap_or(false),
    })
}

fn service_account(spec: &PodSpecDoc) -> String {
    spec.service_account_name
        .clone()
        .or_else(|| spec.service_account.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into())
}

fn container_ports(
    spec: &PodSpecDoc,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Vec<ContainerPort> {
    let mut out = Vec::new();
    for (c, container) in spec.containers.iter().enumerate() {
        for (i, p) in container.ports.iter().enumerate() {
            let pp = format!("{path}.containers[{c}].ports[{i}]");
            let Some(port) = port_number(p.container_port, &format!("{pp}.containerPort"), errors)
            else {
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
    d: &DeploymentDoc,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Vec<Pod> {
    let before = errors.len();
    let name = meta_name(&d.metadata, prefix, true, errors);
    let namespace = meta_namespace(&d.metadata, prefix, errors);
    let labels = labels(
        &d.spec.template.metadata,
        &format!("{prefix}spec.template."),
        errors,
    );
    let ports = container_ports(
        &d.spec.template.spec,
        &format!("{prefix}spec.template.spec"),
        errors,
    );
    let replicas = d.spec.replicas.unwrap_or(1);
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
            service_account: service_account(&d.spec.template.spec),
            node_name: d.spec.template.spec.node_name.clone(),
            ips: Vec::new(),
            synthetic_ips: false,
            ports: ports.clone(),
            workload: Some(format!("Deployment/{name}")),
            host_network: d.spec.template.spec.host_network.unwrap_or(false),
        })
        .collect()
}
