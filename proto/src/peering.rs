//! Peering between clusters (`peering.proto`): a peer cluster's inventory export as typed values
//! and its protobuf messages, converted at the edge. Decoding refuses what no Kubernetes cluster
//! could have exported (an address that is neither 4 nor 16 bytes, a namespace that is not a DNS
//! label, a pod name that is not a DNS subdomain, a port of 0 or beyond 65535, a protocol that is
//! not a container port's, a cluster name that is not a [`ClusterName`]) and names the field:
//! a garbled or hostile peer is an error, never a wrong inventory.

use std::{collections::BTreeMap, net::IpAddr};

use bulkhead_ruleset::{self as rs, cluster::ClusterName};
use ipnetwork::IpNetwork;

use crate::convert::{addr_bytes, addr_of, cidr_to};
use crate::v1 as pb;

pub type Labels = BTreeMap<String, String>;

/// A namespace of the exporting cluster, under its own (unqualified) name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedNamespace {
    pub name: String,
    pub labels: Labels,
}

/// A named container port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExportedPort {
    pub name: String,
    pub protocol: rs::Protocol,
    pub port: u16,
}

/// A pod of the exporting cluster, in its own (unqualified) namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedPod {
    pub namespace: String,
    pub name: String,
    /// Sorted, without duplicates.
    pub addresses: Vec<IpAddr>,
    pub service_account: String,
    /// Identity labels (the exporter's label filter applied).
    pub labels: Labels,
    pub ports: Vec<ExportedPort>,
    pub workload: Option<String>,
}

impl ExportedPod {
    pub fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone())
    }
}

/// Everything a cluster exports, at one version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub cluster: ClusterName,
    pub epoch: u64,
    pub version: u64,
    pub pod_cidrs: Vec<IpNetwork>,
    pub namespaces: Vec<ExportedNamespace>,
    pub pods: Vec<ExportedPod>,
}

/// What changed since the previous version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    pub epoch: u64,
    pub version: u64,
    pub namespaces_upserted: Vec<ExportedNamespace>,
    pub namespaces_deleted: Vec<String>,
    pub pods_upserted: Vec<ExportedPod>,
    /// (namespace, name).
    pub pods_deleted: Vec<(String, String)>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.namespaces_upserted.is_empty()
            && self.namespaces_deleted.is_empty()
            && self.pods_upserted.is_empty()
            && self.pods_deleted.is_empty()
    }
}

/// One message of an export stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Export {
    Snapshot(Snapshot),
    Delta(Delta),
}

/// An export message no Kubernetes cluster could have sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error("{field}: an address must be 4 or 16 bytes, not {len}")]
    Address { field: &'static str, len: usize },
    #[error("{field}: {addr}/{prefix} is not a network (prefix too long)")]
    Prefix {
        field: &'static str,
        addr: IpAddr,
        prefix: u32,
    },
    #[error("{field}: {value} is not a port (1 to 65535)")]
    Port { field: &'static str, value: u32 },
    #[error("{field}: {value} is not a container port's protocol (TCP, UDP or SCTP)")]
    Protocol { field: &'static str, value: i32 },
    #[error("{field}: {value:?} is not a DNS label (at most 63 lower-case alphanumerics or '-')")]
    Namespace { field: &'static str, value: String },
    #[error(
        "{field}: {value:?} is not a DNS subdomain (at most 253 lower-case alphanumerics, '-' or '.')"
    )]
    Name { field: &'static str, value: String },
    #[error("{field}: {value:?} is not a label key or value Kubernetes accepts")]
    Label { field: &'static str, value: String },
    #[error("snapshot cluster: {0}")]
    Cluster(#[from] rs::cluster::BadClusterName),
    #[error("an export message with neither a snapshot nor a delta")]
    Empty,
}

type Result<T> = std::result::Result<T, ExportError>;

/// A DNS label (RFC 1123): what a namespace name is.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS subdomain (RFC 1123): what a pod name is.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn namespace(field: &'static str, s: String) -> Result<String> {
    if is_dns_label(&s) {
        Ok(s)
    } else {
        Err(ExportError::Namespace { field, value: s })
    }
}

fn name(field: &'static str, s: String) -> Result<String> {
    if is_dns_subdomain(&s) {
        Ok(s)
    } else {
        Err(ExportError::Name { field, value: s })
    }
}

/// Label keys (prefix/name, at most 317 bytes) and values (at most 63) without whitespace or
/// control characters; the exact Kubernetes grammar is the exporting API server's business, this
/// keeps what cannot be a label out of selectors and logs.
fn labels(field: &'static str, labels: Labels) -> Result<Labels> {
    for (k, v) in &labels {
        let bad = |s: &str, max: usize| {
            s.len() > max || s.chars().any(|c| c.is_whitespace() || c.is_control())
        };
        if k.is_empty() || bad(k, 317) {
            return Err(ExportError::Label {
                field,
                value: k.clone(),
            });
        }
        if bad(v, 63) {
            return Err(ExportError::Label {
                field,
                value: v.clone(),
            });
        }
    }
    Ok(labels)
}

fn protocol_to(p: rs::Protocol) -> pb::Protocol {
    match p {
        rs::Protocol::Tcp => pb::Protocol::Tcp,
        rs::Protocol::Udp => pb::Protocol::Udp,
        rs::Protocol::Sctp => pb::Protocol::Sctp,
        rs::Protocol::Icmp => pb::Protocol::Icmp,
        rs::Protocol::Icmpv6 => pb::Protocol::Icmpv6,
    }
}

fn protocol_from(field: &'static str, v: i32) -> Result<rs::Protocol> {
    match pb::Protocol::try_from(v) {
        Ok(pb::Protocol::Tcp) => Ok(rs::Protocol::Tcp),
        Ok(pb::Protocol::Udp) => Ok(rs::Protocol::Udp),
        Ok(pb::Protocol::Sctp) => Ok(rs::Protocol::Sctp),
        _ => Err(ExportError::Protocol { field, value: v }),
    }
}

impl From<&ExportedNamespace> for pb::ExportedNamespace {
    fn from(n: &ExportedNamespace) -> Self {
        pb::ExportedNamespace {
            name: n.name.clone(),
            labels: n.labels.clone(),
        }
    }
}

impl TryFrom<pb::ExportedNamespace> for ExportedNamespace {
    type Error = ExportError;
    fn try_from(n: pb::ExportedNamespace) -> Result<Self> {
        Ok(ExportedNamespace {
            name: namespace("namespace name", n.name)?,
            labels: labels("namespace labels", n.labels)?,
        })
    }
}

impl From<&ExportedPod> for pb::ExportedPod {
    fn from(p: &ExportedPod) -> Self {
        pb::ExportedPod {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            addresses: p.addresses.iter().map(addr_bytes).collect(),
            service_account: p.service_account.clone(),
            labels: p.labels.clone(),
            ports: p
                .ports
                .iter()
                .map(|port| pb::ExportedPort {
                    name: port.name.clone(),
                    protocol: protocol_to(port.protocol) as i32,
                    port: port.port as u32,
                })
                .collect(),
            workload: p.workload.clone(),
        }
    }
}

impl TryFrom<pb::ExportedPod> for ExportedPod {
    type Error = ExportError;
    fn try_from(p: pb::ExportedPod) -> Result<Self> {
        let mut addresses = p
            .addresses
            .iter()
            .map(|a| {
                addr_of(a).ok_or(ExportError::Address {
                    field: "pod addresses",
                    len: a.len(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        addresses.sort_unstable();
        addresses.dedup();
        let mut ports =
            p.ports
                .into_iter()
                .map(|port| {
                    let number = u16::try_from(port.port).ok().filter(|n| *n != 0).ok_or(
                        ExportError::Port {
                            field: "pod port",
                            value: port.port,
                        },
                    )?;
                    Ok(ExportedPort {
                        name: port.name,
                        protocol: protocol_from("pod port protocol", port.protocol)?,
                        port: number,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
        ports.sort();
        ports.dedup();
        let service_account = if p.service_account.is_empty() {
            "default".to_string()
        } else {
            name("pod service account", p.service_account)?
        };
        Ok(ExportedPod {
            namespace: namespace("pod namespace", p.namespace)?,
            name: name("pod name", p.name)?,
            addresses,
            service_account,
            labels: labels("pod labels", p.labels)?,
            ports,
            workload: p.workload,
        })
    }
}

fn cidr_from(field: &'static str, c: &pb::Cidr) -> Result<IpNetwork> {
    let ip = addr_of(&c.addr).ok_or(ExportError::Address {
        field,
        len: c.addr.len(),
    })?;
    let prefix = || ExportError::Prefix {
        field,
        addr: ip,
        prefix: c.prefix,
    };
    let p = u8::try_from(c.prefix).map_err(|_| prefix())?;
    IpNetwork::new(ip, p).map_err(|_| prefix())
}

impl From<&Export> for pb::InventoryExport {
    fn from(e: &Export) -> Self {
        use pb::inventory_export::Export as E;
        let export = match e {
            Export::Snapshot(s) => E::Snapshot(pb::InventorySnapshot {
                cluster: s.cluster.to_string(),
                epoch: s.epoch,
                version: s.version,
                pod_cidrs: s.pod_cidrs.iter().map(cidr_to).collect(),
                namespaces: s.namespaces.iter().map(Into::into).collect(),
                pods: s.pods.iter().map(Into::into).collect(),
            }),
            Export::Delta(d) => E::Delta(pb::InventoryDelta {
                epoch: d.epoch,
                version: d.version,
                namespaces_upserted: d.namespaces_upserted.iter().map(Into::into).collect(),
                namespaces_deleted: d.namespaces_deleted.clone(),
                pods_upserted: d.pods_upserted.iter().map(Into::into).collect(),
                pods_deleted: d
                    .pods_deleted
                    .iter()
                    .map(|(namespace, name)| pb::ExportedPodKey {
                        namespace: namespace.clone(),
                        name: name.clone(),
                    })
                    .collect(),
            }),
        };
        pb::InventoryExport {
            export: Some(export),
        }
    }
}

impl TryFrom<pb::InventoryExport> for Export {
    type Error = ExportError;
    fn try_from(e: pb::InventoryExport) -> Result<Self> {
        use pb::inventory_export::Export as E;
        Ok(match e.export.ok_or(ExportError::Empty)? {
            E::Snapshot(s) => Export::Snapshot(Snapshot {
                cluster: s.cluster.parse()?,
                epoch: s.epoch,
                version: s.version,
                pod_cidrs: s
                    .pod_cidrs
                    .iter()
                    .map(|c| cidr_from("snapshot pod CIDRs", c))
                    .collect::<Result<_>>()?,
                namespaces: s
                    .namespaces
                    .into_iter()
                    .map(TryInto::try_into)
                    .collect::<Result<_>>()?,
                pods: s
                    .pods
                    .into_iter()
                    .map(TryInto::try_into)
                    .collect::<Result<_>>()?,
            }),
            E::Delta(d) => Export::Delta(Delta {
                epoch: d.epoch,
                version: d.version,
                namespaces_upserted: d
                    .namespaces_upserted
                    .into_iter()
                    .map(TryInto::try_into)
                    .collect::<Result<_>>()?,
                namespaces_deleted: d
                    .namespaces_deleted
                    .into_iter()
                    .map(|n| namespace("deleted namespace", n))
                    .collect::<Result<_>>()?,
                pods_upserted: d
                    .pods_upserted
                    .into_iter()
                    .map(TryInto::try_into)
                    .collect::<Result<_>>()?,
                pods_deleted: d
                    .pods_deleted
                    .into_iter()
                    .map(|k| {
                        Ok((
                            namespace("deleted pod namespace", k.namespace)?,
                            name("deleted pod name", k.name)?,
                        ))
                    })
                    .collect::<Result<_>>()?,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> ExportedPod {
        ExportedPod {
            namespace: "shop".into(),
            name: "web-1".into(),
            addresses: vec!["10.1.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
            service_account: "web".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            ports: vec![ExportedPort {
                name: "http".into(),
                protocol: rs::Protocol::Tcp,
                port: 8080,
            }],
            workload: Some("Deployment/web".into()),
        }
    }

    #[test]
    fn exports_round_trip() {
        let snap = Export::Snapshot(Snapshot {
            cluster: "west".parse().unwrap(),
            epoch: 7,
            version: 1,
            pod_cidrs: vec!["10.1.0.0/16".parse().unwrap()],
            namespaces: vec![ExportedNamespace {
                name: "shop".into(),
                labels: [("team".to_string(), "a".to_string())].into(),
            }],
            pods: vec![pod()],
        });
        let back: Export = pb::InventoryExport::from(&snap).try_into().unwrap();
        assert_eq!(back, snap);
        let delta = Export::Delta(Delta {
            epoch: 7,
            version: 2,
            namespaces_deleted: vec!["old".into()],
            pods_deleted: vec![("shop".into(), "web-0".into())],
            pods_upserted: vec![pod()],
            ..Delta::default()
        });
        let back: Export = pb::InventoryExport::from(&delta).try_into().unwrap();
        assert_eq!(back, delta);
    }

    #[test]
    fn garbage_is_refused_by_field() {
        let mut p = pb::ExportedPod::from(&pod());
        p.addresses.push(vec![1, 2, 3]);
        let e = ExportedPod::try_from(p).unwrap_err();
        assert_eq!(
            e.to_string(),
            "pod addresses: an address must be 4 or 16 bytes, not 3"
        );
        let mut p = pb::ExportedPod::from(&pod());
        p.namespace = "west/shop".into();
        assert!(
            ExportedPod::try_from(p)
                .unwrap_err()
                .to_string()
                .contains("pod namespace: \"west/shop\" is not a DNS label")
        );
        let mut p = pb::ExportedPod::from(&pod());
        p.ports[0].protocol = pb::Protocol::Any as i32;
        assert!(matches!(
            ExportedPod::try_from(p),
            Err(ExportError::Protocol { .. })
        ));
        let mut p = pb::ExportedPod::from(&pod());
        p.ports[0].port = 70000;
        assert!(matches!(
            ExportedPod::try_from(p),
            Err(ExportError::Port { value: 70000, .. })
        ));
        let e = Export::try_from(pb::InventoryExport {
            export: Some(pb::inventory_export::Export::Snapshot(
                pb::InventorySnapshot {
                    cluster: "West".into(),
                    ..Default::default()
                },
            )),
        })
        .unwrap_err();
        assert!(e.to_string().contains("not a valid cluster name"), "{e}");
        let e = Export::try_from(pb::InventoryExport {
            export: Some(pb::inventory_export::Export::Snapshot(
                pb::InventorySnapshot {
                    cluster: "west".into(),
                    pod_cidrs: vec![pb::Cidr {
                        addr: vec![10, 0, 0, 0],
                        prefix: 33,
                    }],
                    ..Default::default()
                },
            )),
        })
        .unwrap_err();
        assert!(e.to_string().contains("10.0.0.0/33"), "{e}");
        assert_eq!(
            Export::try_from(pb::InventoryExport { export: None }),
            Err(ExportError::Empty)
        );
    }
}
