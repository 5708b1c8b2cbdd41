//! What a lab is made of, kept in `<state>/lab.json` so that `lab status`, `apply`, `probe` and
//! `down` find it again after the CLI that built it has exited.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// FNV-1a: stable across runs and versions, unlike std's hasher (names built from it must not
/// change between the CLI that made a lab and the one that takes it down).
pub fn fnv1a(s: &str) -> u32 {
    let mut h: u32 = 0x811c9dc5;
    for b in s.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    h
}

/// A short tag derived from the state directory: it prefixes the lab's namespaces and pin
/// directories, so `lab down` finds them after a crash and two labs never touch each other.
pub fn tag(dir: &Path) -> String {
    format!("{:04x}", fnv1a(&dir.to_string_lossy()) & 0xffff)
}

/// Prefix of every network namespace of the lab in `dir`.
pub fn netns_prefix(dir: &Path) -> String {
    format!("bhl{}-", tag(dir))
}

/// Prefix of the pin directories (under `/sys/fs/bpf/bulkhead`) of the lab in `dir`.
pub fn pin_prefix(dir: &Path) -> String {
    format!("lab{}-", tag(dir))
}

pub fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/run/bulkhead/lab")
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContainerPort {
    pub port: u16,
    pub protocol: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabPod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    /// Network namespace of the pod.
    pub netns: String,
    /// Node-side veth.
    pub host_if: String,
    pub ports: Vec<ContainerPort>,
    /// PID of the pod's built-in server.
    pub server_pid: Option<u32>,
}

impl LabPod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabNode {
    pub name: String,
    pub netns: String,
    /// Index from 1; the node's fabric address is 10.239.0.<index>.
    pub index: u32,
    pub agent_pid: Option<u32>,
    pub metrics_port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub dir: PathBuf,
    pub ipv6: bool,
    pub nodes: Vec<LabNode>,
    pub pods: BTreeMap<String, LabPod>,
    /// User objects that are not pods, by `kind/namespace/name`, as YAML documents.
    pub objects: BTreeMap<String, serde_yaml::Value>,
    /// Pod documents as given (before the lab fills in node and addresses), by `namespace/name`.
    pub pod_docs: BTreeMap<String, serde_yaml::Value>,
    pub controller_pid: Option<u32>,
    pub grpc_port: u16,
    pub http_port: u16,
    /// Next host number for pod addresses, per node.
    pub next_host: BTreeMap<String, u32>,
    /// The agents' `--prefilter` (a lab written before the choice existed ran XDP).
    #[serde(default = "xdp_before_the_choice")]
    pub prefilter: crate::agent::PrefilterChoice,
    /// Hosts outside the pod network (lab-only `ExternalHost` objects), by name.
    #[serde(default)]
    pub external_hosts: BTreeMap<String, super::external::ExternalHostState>,
    /// Labels given to lab nodes by Node objects in the manifests, by node name.
    #[serde(default)]
    pub node_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// The cluster this lab is (`lab up --cluster`); none for a lab that is no named cluster.
    #[serde(default)]
    pub cluster: Option<bulkhead_ruleset::ClusterName>,
    /// Where its pods (and its cluster DNS) get their addresses (`lab up --pod-cidr`).
    #[serde(default)]
    pub pod_cidrs: super::cluster::PodCidrs,
    /// The labs it is peered with (`lab peer`), by cluster name.
    #[serde(default)]
    pub peers: BTreeMap<String, super::cluster::LabPeer>,
}

fn xdp_before_the_choice() -> crate::agent::PrefilterChoice {
    crate::agent::PrefilterChoice::Xdp
}

impl LabNode {
    /// The agent's `/flows` and `/connections` (100 above its metrics port).
    pub fn http_port(&self) -> u16 {
        self.metrics_port + 100
    }
}

impl LabState {
    /// The pods the user declared: every pod but the lab's own cluster DNS.
    pub fn user_pods(&self) -> impl Iterator<Item = &LabPod> {
        self.pods
            .values()
            .filter(|p| p.key() != super::dns::POD_KEY)
    }

    /// The controller's `/metrics`, `/healthz`, `/readyz` (the port after its HTTP API's).
    pub fn metrics_port(&self) -> u16 {
        self.http_port + 1
    }

    /// Where the controller of a named cluster serves its peers (`--port-base` + 3).
    pub fn peering_port(&self) -> u16 {
        self.grpc_port + 3
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join("lab.json")
    }

    pub fn load(dir: &Path) -> anyhow::Result<LabState> {
        let path = LabState::path(dir);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no lab at {} (start one with `bulkhead lab up -f …`)",
                dir.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("corrupt lab state {}", path.display()))
    }

    pub fn save(&self) -> anyhow::Result<()> {
        let path = LabState::path(&self.dir);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    pub fn manifests_dir(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    pub fn certs_dir(&self) -> PathBuf {
        self.dir.join("certs")
    }

    /// The controller's gRPC address and the lab's admin certificate, for admin clients.
    pub fn admin_connection(&self) -> (String, crate::certs::ClientTlsArgs) {
        let certs = self.certs_dir();
        (
            format!("127.0.0.1:{}", self.grpc_port),
            crate::certs::ClientTlsArgs {
                tls_cert: Some(certs.join("admin.pem")),
                tls_key: Some(certs.join("admin-key.pem")),
                ca: Some(certs.join("ca.pem")),
                insecure: false,
            },
        )
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    pub fn node(&self, name: &str) -> Option<&LabNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn pin_dir(&self, node: &str) -> PathBuf {
        PathBuf::from("/sys/fs/bpf/bulkhead").join(format!("{}{node}", pin_prefix(&self.dir)))
    }
}

/// Whether a process is alive (and not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}
