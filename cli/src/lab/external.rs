//! Hosts outside the pod network, declared by lab-only `ExternalHost` objects (never sent to the
//! controller):
//!
//! ```yaml
//! apiVersion: lab.bulkhead.dev/v1alpha1
//! kind: ExternalHost
//! metadata: {name: example-api}
//! spec:
//!   addresses: [198.51.100.10]
//!   names: [api.example.com]
//!   aliases: [{name: www.example.com, target: api.example.com}]
//!   ports: [{port: 443, protocol: TCP}]
//!   ttl: 30
//! ```
//!
//! All hosts live in one `external` network namespace on the lab's fabric bridge (at
//! 10.239.0.254 and fd00:239::fe), holding their addresses; every node routes them there and
//! the namespace routes every pod address back through the pod's node. Nothing is translated:
//! a host sees the pod's own address. Each host's ports are served by the lab's built-in server
//! bound to the host's addresses; its names and aliases are records of the cluster DNS.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
};

use anyhow::{Context, bail};
use bulkhead_agent::netns::{Netns, ip};
use bulkhead_controller::ruleset::NamePattern;
use serde::{Deserialize, Serialize};
use serde_yaml::Value;

use super::state::{ContainerPort, LabPod, LabState, netns_prefix};

pub const API_VERSION: &str = "lab.bulkhead.dev/v1alpha1";
pub const KIND: &str = "ExternalHost";
/// TTL of a host's records when `spec.ttl` is not given (CoreDNS's default for cluster records).
pub const DEFAULT_TTL: u32 = 30;
/// The external namespace's address on the fabric (node addresses are 10.239.0.1-100).
pub const FABRIC_V4: Ipv4Addr = Ipv4Addr::new(10, 239, 0, 254);
pub const FABRIC_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x239, 0, 0, 0, 0, 0, 0xfe);

/// One alias (a CNAME record): `name` points to `target`, a name or another alias of the same
/// host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Alias {
    pub name: String,
    pub target: String,
}

/// A validated `ExternalHost`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExternalHost {
    pub name: String,
    pub addresses: Vec<IpAddr>,
    pub names: Vec<String>,
    pub aliases: Vec<Alias>,
    pub ports: Vec<ContainerPort>,
    pub ttl: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExternalHostState {
    pub spec: ExternalHost,
    /// PID of the host's built-in server (none when it declares no ports).
    pub server_pid: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Document {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: Spec,
}

/// Labels and annotations are accepted (as on any object) and mean nothing to the lab.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: String,
    #[serde(default, rename = "labels")]
    _labels: BTreeMap<String, String>,
    #[serde(default, rename = "annotations")]
    _annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    addresses: Vec<String>,
    names: Vec<String>,
    #[serde(default)]
    aliases: Vec<Alias>,
    #[serde(default)]
    ports: Vec<PortSpec>,
    ttl: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PortSpec {
    port: u32,
    #[serde(default = "tcp")]
    protocol: String,
}

fn tcp() -> String {
    "TCP".into()
}

pub fn is_external_host(doc: &Value) -> bool {
    doc.get("kind").and_then(Value::as_str) == Some(KIND)
}

/// A host's name: an exact DNS name, with the syntax policies use for names
/// ([`NamePattern`]), so every name a host has can be named by a policy.
fn dns_name(field: &str, raw: &str) -> anyhow::Result<String> {
    match NamePattern::parse(raw) {
        Ok(NamePattern::Exact(name)) => Ok(name),
        Ok(NamePattern::Wildcard(_)) => {
            bail!("{field}: {raw:?} is a wildcard; a host has exact names (write each one)")
        }
        Err(e) => bail!("{field}: {e}"),
    }
}

/// Parses and validates one `ExternalHost` document.
pub fn parse(doc: &Value) -> anyhow::Result<ExternalHost> {
    let d: Document = serde_yaml::from_value(doc.clone()).map_err(|e| {
        anyhow::anyhow!(
            "ExternalHost {:?}: {e}",
            doc.get("metadata")
                .and_then(|m| m.get("name"))
                .and_then(Value::as_str)
                .unwrap_or_default()
        )
    })?;
    let host = &d.metadata.name;
    let result = (|| -> anyhow::Result<ExternalHost> {
        if d.api_version != API_VERSION {
            bail!("apiVersion must be {API_VERSION}, not {:?}", d.api_version);
        }
        if d.kind != KIND {
            bail!("kind must be {KIND}");
        }
        let label = |s: &str| {
            (1..=63).contains(&s.len())
                && !s.starts_with('-')
                && !s.ends_with('-')
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        if !label(host) {
            bail!(
                "metadata.name: {host:?} must be a DNS label (lower-case letters, digits, inner hyphens)"
            );
        }
        if d.spec.addresses.is_empty() {
            bail!("spec.addresses: give at least one IPv4 or IPv6 address");
        }
        let mut addresses = Vec::new();
        for (i, a) in d.spec.addresses.iter().enumerate() {
            let addr: IpAddr = a.parse().map_err(|_| {
                anyhow::anyhow!("spec.addresses[{i}]: {a:?} is not an IPv4 or IPv6 address")
            })?;
            if addr.is_unspecified() || addr.is_loopback() || addr.is_multicast() {
                bail!("spec.addresses[{i}]: {a} cannot be a host's address");
            }
            if addresses.contains(&addr) {
                bail!("spec.addresses[{i}]: {a} is listed twice");
            }
            addresses.push(addr);
        }
        if d.spec.names.is_empty() {
            bail!("spec.names: give at least one DNS name (e.g. api.example.com)");
        }
        let mut names = Vec::new();
        for (i, n) in d.spec.names.iter().enumerate() {
            let n = dns_name(&format!("spec.names[{i}]"), n)?;
            if !names.contains(&n) {
                names.push(n);
            }
        }
        let mut aliases: Vec<Alias> = Vec::new();
        for (i, a) in d.spec.aliases.iter().enumerate() {
            let name = dns_name(&format!("spec.aliases[{i}].name"), &a.name)?;
            let target = dns_name(&format!("spec.aliases[{i}].target"), &a.target)?;
            if names.contains(&name) || aliases.iter().any(|x| x.name == name) {
                bail!("spec.aliases[{i}].name: {name} is already a name or an alias of this host");
            }
            aliases.push(Alias { name, target });
        }
        for (i, a) in aliases.iter().enumerate() {
            // Every chain ends at one of the host's names, without a loop.
            let mut seen = BTreeSet::new();
            let mut at = a.name.as_str();
            loop {
                if !seen.insert(at) {
                    bail!("spec.aliases[{i}]: the chain from {} loops", a.name);
                }
                if names.iter().any(|n| n == at) {
                    break;
                }
                match aliases.iter().find(|x| x.name == at) {
                    Some(next) => at = &next.target,
                    None => bail!(
                        "spec.aliases[{i}].target: {at} is neither a name nor an alias of this host"
                    ),
                }
            }
        }
        let mut ports = Vec::new();
        for (i, p) in d.spec.ports.iter().enumerate() {
            if !(1..=65535).contains(&p.port) {
                bail!("spec.ports[{i}].port: {} is not a port (1-65535)", p.port);
            }
            let protocol = p.protocol.to_ascii_uppercase();
            if protocol != "TCP" && protocol != "UDP" {
                bail!(
                    "spec.ports[{i}].protocol: unknown protocol {:?}: use TCP or UDP",
                    p.protocol
                );
            }
            let port = ContainerPort {
                port: p.port as u16,
                protocol,
            };
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        Ok(ExternalHost {
            name: host.clone(),
            addresses,
            names,
            aliases,
            ports,
            ttl: d.spec.ttl.unwrap_or(DEFAULT_TTL),
        })
    })();
    result.with_context(|| format!("ExternalHost {host:?}"))
}

/// Checks that no two hosts share an address or a name (the cluster DNS would mix them up).
pub fn check_unique(hosts: &BTreeMap<String, ExternalHost>) -> anyhow::Result<()> {
    let mut addresses: BTreeMap<IpAddr, &str> = BTreeMap::new();
    let mut names: BTreeMap<&str, &str> = BTreeMap::new();
    for (key, h) in hosts {
        for a in &h.addresses {
            if let Some(other) = addresses.insert(*a, key) {
                bail!("ExternalHosts {other:?} and {key:?} both have the address {a}");
            }
        }
        for n in h.names.iter().chain(h.aliases.iter().map(|a| &a.name)) {
            if let Some(other) = names.insert(n, key) {
                bail!("ExternalHosts {other:?} and {key:?} both have the name {n}");
            }
        }
    }
    Ok(())
}

impl ExternalHost {
    /// `(alias, target)` with every alias after its target.
    pub fn aliases_in_chain_order(&self) -> Vec<(String, String)> {
        let depth = |alias: &Alias| {
            let mut d = 0;
            let mut at = alias.target.as_str();
            while let Some(next) = self.aliases.iter().find(|a| a.name == at) {
                d += 1;
                at = &next.target;
                if d > self.aliases.len() {
                    break;
                }
            }
            d
        };
        let mut out: Vec<(usize, &Alias)> = self.aliases.iter().map(|a| (depth(a), a)).collect();
        out.sort_by_key(|(d, _)| *d);
        out.into_iter()
            .map(|(_, a)| (a.name.clone(), a.target.clone()))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The network

pub fn netns(state: &LabState) -> String {
    format!("{}external", netns_prefix(&state.dir))
}

fn exists(state: &LabState) -> bool {
    bulkhead_agent::netns::netns_path(&netns(state)).exists()
}

fn family(addr: &IpAddr) -> &'static str {
    if addr.is_ipv6() { "-6" } else { "-4" }
}

fn host_prefix(addr: &IpAddr) -> String {
    format!("{addr}/{}", if addr.is_ipv6() { 128 } else { 32 })
}

/// Creates the external namespace on the fabric with routes back to every pod (once).
fn ensure_network(state: &LabState) -> anyhow::Result<()> {
    if exists(state) {
        return Ok(());
    }
    let ns = Netns::create(&netns(state))?.keep();
    super::no_dad(&ns)?;
    let fabric = Netns::existing(&super::fabric_ns(state));
    bulkhead_agent::netns::veth_pair("ext0", Some(&fabric), "fabric0", Some(&ns))?;
    fabric.exec(&["ip", "link", "set", "ext0", "master", "br0", "up"])?;
    ns.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{FABRIC_V4}/24"),
        "dev",
        "fabric0",
    ])?;
    if state.ipv6 {
        ns.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{FABRIC_V6}/64"),
            "dev",
            "fabric0",
            "nodad",
        ])?;
    }
    ns.exec(&["ip", "link", "set", "fabric0", "up"])?;
    for pod in state.pods.values() {
        route_pod(state, pod)?;
    }
    Ok(())
}

/// The way back from the external hosts to a pod: through its node.
pub fn route_pod(state: &LabState, pod: &LabPod) -> anyhow::Result<()> {
    if !exists(state) {
        return Ok(());
    }
    let node = state.node(&pod.node).context("pod on an unknown node")?;
    let ns = Netns::existing(&netns(state));
    for addr in &pod.ips {
        let via = match addr {
            IpAddr::V4(_) => super::node_fabric_v4(node.index).to_string(),
            IpAddr::V6(_) if state.ipv6 => super::node_fabric_v6(node.index).to_string(),
            IpAddr::V6(_) => continue,
        };
        ns.exec(&[
            "ip",
            family(addr),
            "route",
            "replace",
            &host_prefix(addr),
            "via",
            &via,
        ])?;
    }
    Ok(())
}

pub fn unroute_pod(state: &LabState, pod: &LabPod) {
    if !exists(state) {
        return;
    }
    for addr in &pod.ips {
        let _ = ip(&[
            "-n",
            &netns(state),
            family(addr),
            "route",
            "del",
            &host_prefix(addr),
        ]);
    }
}

/// A host's addresses in the external namespace and the nodes' routes to them.
fn add_host(state: &LabState, host: &ExternalHost) -> anyhow::Result<()> {
    let ns = Netns::existing(&netns(state));
    for addr in &host.addresses {
        ns.exec(&["ip", "addr", "add", &host_prefix(addr), "dev", "lo"])?;
        let via = match addr {
            IpAddr::V4(_) => FABRIC_V4.to_string(),
            IpAddr::V6(_) if state.ipv6 => FABRIC_V6.to_string(),
            IpAddr::V6(_) => {
                eprintln!(
                    "warning: ExternalHost {:?}: {addr} is served by the cluster DNS but unreachable (the lab has no IPv6: `lab up --ipv6`)",
                    host.name
                );
                continue;
            }
        };
        for node in &state.nodes {
            ip(&[
                "-n",
                &node.netns,
                family(addr),
                "route",
                "replace",
                &host_prefix(addr),
                "via",
                &via,
            ])?;
        }
    }
    Ok(())
}

fn remove_host(state: &LabState, host: &ExternalHostState) {
    if let Some(pid) = host.server_pid {
        super::stop(pid);
    }
    for addr in &host.spec.addresses {
        let _ = ip(&[
            "-n",
            &netns(state),
            "addr",
            "del",
            &host_prefix(addr),
            "dev",
            "lo",
        ]);
        for node in &state.nodes {
            let _ = ip(&[
                "-n",
                &node.netns,
                family(addr),
                "route",
                "del",
                &host_prefix(addr),
            ]);
        }
    }
}

/// Starts the built-in server of a host on its ports, bound to its addresses.
pub fn start_server(state: &LabState, host: &ExternalHost) -> anyhow::Result<Option<u32>> {
    if host.ports.is_empty() {
        return Ok(None);
    }
    let mut cmd = Command::new(super::exe()?);
    cmd.args(["lab", "--state"]).arg(&state.dir).args([
        "serve",
        "--netns",
        &netns(state),
        "--name",
        &format!("external/{}", host.name),
    ]);
    for a in &host.addresses {
        cmd.args(["--address", &a.to_string()]);
    }
    for p in &host.ports {
        cmd.args(["--port", &format!("{}/{}", p.port, p.protocol)]);
    }
    let log = state.logs_dir().join(format!("external-{}.log", host.name));
    super::spawn_detached(&mut cmd, &log).map(Some)
}

/// Makes the lab's external hosts what `wanted` declares: new and changed hosts (re)made,
/// removed ones taken away, their servers running. The cluster DNS's records are the caller's.
pub fn sync(state: &mut LabState, wanted: BTreeMap<String, ExternalHost>) -> anyhow::Result<()> {
    // Refused before anything is taken down.
    check_unique(&wanted)?;
    let current = std::mem::take(&mut state.external_hosts);
    let mut next: BTreeMap<String, ExternalHostState> = BTreeMap::new();
    for (key, host) in &current {
        match wanted.get(key) {
            Some(w) if *w == host.spec => {
                next.insert(key.clone(), host.clone());
            }
            _ => remove_host(state, host),
        }
    }
    for (key, spec) in wanted {
        next.entry(key).or_insert(ExternalHostState {
            spec,
            server_pid: None,
        });
    }
    if !next.is_empty() {
        ensure_network(state)?;
    }
    for (key, host) in next.iter_mut() {
        if current.get(key).is_some_and(|c| c.spec == host.spec) {
            continue;
        }
        add_host(state, &host.spec)?;
        host.server_pid = start_server(state, &host.spec)?;
    }
    state.external_hosts = next;
    Ok(())
}

/// Restarts the servers of hosts whose server died; the hosts restarted.
pub fn heal(state: &mut LabState) -> anyhow::Result<Vec<String>> {
    let mut restarted = Vec::new();
    let keys: Vec<String> = state.external_hosts.keys().cloned().collect();
    for key in keys {
        let host = state.external_hosts[&key].clone();
        if host.spec.ports.is_empty() || host.server_pid.is_some_and(super::state::alive) {
            continue;
        }
        let pid = start_server(state, &host.spec)?;
        if let Some(h) = state.external_hosts.get_mut(&key) {
            h.server_pid = pid;
        }
        restarted.push(format!("external host {key}"));
    }
    Ok(restarted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(spec: &str) -> Value {
        serde_yaml::from_str(&format!(
            "apiVersion: lab.bulkhead.dev/v1alpha1\nkind: ExternalHost\nmetadata: {{name: example-api}}\nspec: {spec}\n"
        ))
        .expect("yaml")
    }

    fn error(spec: &str) -> String {
        format!("{:#}", parse(&doc(spec)).expect_err("invalid"))
    }

    #[test]
    fn a_host_with_an_alias_chain_parses() {
        let h = parse(&doc(
            "{addresses: [198.51.100.10, '2001:db8::10'], names: [API.example.com.], ttl: 7, ports: [{port: 443}], aliases: [{name: cdn.example.net, target: www.example.com}, {name: www.example.com, target: api.example.com}]}",
        ))
        .expect("valid");
        assert_eq!(h.names, ["api.example.com"]);
        assert_eq!(h.ttl, 7);
        assert_eq!(h.ports[0].protocol, "TCP");
        assert_eq!(
            h.aliases_in_chain_order(),
            [
                ("www.example.com".to_string(), "api.example.com".to_string()),
                ("cdn.example.net".to_string(), "www.example.com".to_string())
            ]
        );
    }

    #[test]
    fn the_example_is_valid() {
        let text = include_str!("../../../examples/lab/external-api.yaml");
        let hosts: Vec<ExternalHost> = serde_yaml::Deserializer::from_str(text)
            .map(|d| serde::Deserialize::deserialize(d).expect("yaml"))
            .filter(is_external_host)
            .map(|d: Value| parse(&d).expect("a valid ExternalHost"))
            .collect();
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0].names, ["api.example.com"]);
    }

    #[test]
    fn two_hosts_may_not_share_a_name_or_an_address() {
        let a = parse(&doc("{addresses: [198.51.100.1], names: [a.example.com]}")).expect("a");
        let mut b = a.clone();
        b.name = "other".into();
        b.addresses = vec!["198.51.100.2".parse().expect("addr")];
        let both = BTreeMap::from([("a".to_string(), a.clone()), ("other".to_string(), b)]);
        assert!(
            format!("{:#}", check_unique(&both).expect_err("shared name"))
                .contains("a.example.com")
        );
        let mut c = a.clone();
        c.names = vec!["c.example.com".into()];
        let both = BTreeMap::from([("a".to_string(), a), ("c".to_string(), c)]);
        assert!(
            format!("{:#}", check_unique(&both).expect_err("shared address"))
                .contains("198.51.100.1")
        );
    }

    #[test]
    fn invalid_hosts_say_what_is_wrong() {
        let ok = "names: [a.example.com]";
        assert!(
            error(&format!("{{addresses: [198.51.100.300], {ok}}}")).contains("spec.addresses[0]")
        );
        assert!(error("{addresses: [198.51.100.1], names: []}").contains("spec.names"));
        assert!(
            error("{addresses: [198.51.100.1], names: ['bad!name.com']}")
                .contains("spec.names[0]: \"bad!name.com\" has the character '!'")
        );
        assert!(
            error("{addresses: [198.51.100.1], names: ['*.example.com']}")
                .contains("is a wildcard")
        );
        assert!(
            error(&format!(
                "{{addresses: [198.51.100.1], {ok}, ports: [{{port: 0}}]}}"
            ))
            .contains("spec.ports[0].port")
        );
        assert!(
            error(&format!(
                "{{addresses: [198.51.100.1], {ok}, ports: [{{port: 1, protocol: ICMP}}]}}"
            ))
            .contains("unknown protocol")
        );
        assert!(
            error(&format!("{{addresses: [198.51.100.1], {ok}, colour: red}}"))
                .contains("unknown field `colour`")
        );
        assert!(error(&format!("{{addresses: [198.51.100.1], {ok}, aliases: [{{name: b.example.com, target: c.example.com}}]}}")).contains("neither a name nor an alias"));
        assert!(error(&format!("{{addresses: [198.51.100.1], {ok}, aliases: [{{name: b.example.com, target: c.example.com}}, {{name: c.example.com, target: b.example.com}}]}}")).contains("loops"));
    }
}
