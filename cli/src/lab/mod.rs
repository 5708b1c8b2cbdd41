//! `bulkhead lab`: a real multi-node cluster of network namespaces on one machine.
//!
//! Every lab node is a network namespace that routes for its pods and runs its own agent; every
//! pod is a network namespace behind a veth to its node, wired as a CNI would, with a small
//! built-in server on each declared container port. Nodes reach each other over a bridge in a
//! `fabric` namespace. One controller process serves all agents over gRPC with mTLS (a
//! throwaway CA). Every lab has a cluster DNS (`kube-system/kube-dns`, see [`dns`]) and may have
//! hosts outside the pod network (`ExternalHost`, see [`external`]). Nothing touches the host's
//! own network namespace.

pub mod cluster;
pub mod dns;
pub mod external;
mod input;
mod probe;
mod processes;
mod serve;
pub mod state;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bulkhead_agent::netns::{Netns, ip};
use bulkhead_controller::server::api::NodeView;
use clap::{Args, Subcommand};
use serde_yaml::Value;

use input::{Declared, classify, object_key, pod_ports, read_documents, str_at};
use processes::{exe, spawn_detached, start_agent, start_controller, start_server, stop};
use state::{LabNode, LabPod, LabState, alive, netns_prefix, pin_prefix};

#[derive(Args)]
pub struct LabArgs {
    /// Where the lab keeps its state, manifests, certificates and logs.
    #[arg(long, global = true, default_value_os_t = state::default_state_dir())]
    state: PathBuf,
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Build the lab from Kubernetes YAML: nodes, pods (Pods and Deployments), policies, and
    /// the lab's own `ExternalHost` objects (hosts outside the pod network, named in the
    /// cluster DNS at A.B.1.10 of the pod CIDR: 10.240.1.10 by default).
    ///
    /// Two clusters side by side: bring each up with its own `--state`, `--port-base`,
    /// `--cluster` and `--pod-cidr`, then connect them with `lab peer`, e.g.
    /// `lab --state /tmp/east up --cluster east --pod-cidr 10.241.0.0/16 --port-base 20100 -f …`,
    /// `lab --state /tmp/west up --cluster west --pod-cidr 10.242.0.0/16 --port-base 20200 -f …`,
    /// `lab --state /tmp/east peer --with /tmp/west`.
    Up {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Number of lab nodes (`node-1` … `node-N`).
        #[arg(long, default_value_t = 2)]
        nodes: u32,
        /// Give pods IPv6 addresses too.
        #[arg(long)]
        ipv6: bool,
        /// Ports on 127.0.0.1: controller gRPC at BASE, its HTTP (UI, API) at BASE+1, its
        /// metrics at BASE+2, agent i's metrics at BASE+10+i and its flows at BASE+110+i.
        #[arg(long, default_value_t = 19960)]
        port_base: u16,
        /// Where each node's agent runs the prefilter on its uplink (`fabric0`): `tc`, `xdp`
        /// or `off` (see `agent run --prefilter`).
        #[arg(long, value_enum, default_value_t = crate::agent::PrefilterChoice::Tc)]
        prefilter: crate::agent::PrefilterChoice,
        /// The cluster this lab is (a DNS label such as `east`): a lab that other labs may be
        /// peered with (`lab peer`). Give each cluster its own `--pod-cidr`.
        #[arg(long, value_name = "NAME")]
        cluster: Option<bulkhead_ruleset::ClusterName>,
        /// Where pods get their addresses: an IPv4 /16 `A.B.0.0/16` (pods at A.B.<node>.<host>,
        /// the cluster DNS at A.B.1.10) and, with `--ipv6`, an IPv6 /96 (pods at
        /// <prefix>::<node>:<host>); repeat for both. Default 10.240.0.0/16 and fd00:240::/96.
        /// Pods whose manifest gives `status.podIP` keep it.
        #[arg(long = "pod-cidr", value_name = "CIDR")]
        pod_cidr: Vec<ipnetwork::IpNetwork>,
    },
    /// Connect this lab's pod network with another lab's (both brought up with `--cluster` and
    /// pod CIDRs that do not overlap): a veth between the two fabric namespaces, each routing
    /// the other's pod CIDRs, so pods reach the other cluster's pods by their addresses through
    /// both clusters' agents. `lab down` of either lab removes the link.
    Peer {
        /// The other lab's state directory.
        #[arg(long = "with", value_name = "STATE")]
        with: PathBuf,
    },
    /// Remove the link and routes `lab peer` made between this lab and another.
    Unpeer {
        /// The other lab's state directory.
        #[arg(long = "with", value_name = "STATE")]
        with: PathBuf,
    },
    /// Add or change objects in a running lab (policies, pod labels, new pods, external hosts).
    Apply {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// Remove the objects in these files from the lab.
    Delete {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// Run a command inside a pod's network namespace.
    Exec {
        /// `namespace/pod`
        pod: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Nodes, pods, addresses, agents and realized versions.
    Status,
    /// Open a real connection from every pod to every pod and print the reachability matrix
    /// (the same format as `bulkhead policy evaluate`).
    Probe(probe::ProbeArgs),
    /// Restart whatever lab process died (controller, agents, pod servers); enforcement never
    /// stopped, and restarted agents resync.
    Heal,
    /// Remove everything the lab made: processes, pins, namespaces, links, state.
    Down,
    /// (internal) The built-in server of one pod.
    #[command(hide = true)]
    Serve(serve::ServeArgs),
}

pub fn run(args: LabArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        LabCommand::Up {
            files,
            nodes,
            ipv6,
            port_base,
            prefilter,
            cluster,
            pod_cidr,
        } => {
            let choice = cluster::ClusterChoice {
                name: cluster,
                pod_cidrs: cluster::PodCidrs::from_args(&pod_cidr, ipv6)?,
            };
            up(
                &args.state,
                &files,
                nodes,
                ipv6,
                port_base,
                prefilter,
                choice,
            )
        }
        LabCommand::Peer { with } => peer(&args.state, &with),
        LabCommand::Unpeer { with } => unpeer(&args.state, &with),
        LabCommand::Apply { files } => apply(&args.state, &files, false),
        LabCommand::Delete { files } => apply(&args.state, &files, true),
        LabCommand::Exec { pod, command } => exec(&args.state, &pod, &command),
        LabCommand::Status => status(&args.state),
        LabCommand::Heal => heal(&args.state),
        LabCommand::Probe(p) => probe::run(&args.state, p),
        LabCommand::Down => {
            let started = Instant::now();
            down(&args.state)?;
            println!("lab down in {:.1} s", started.elapsed().as_secs_f64());
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Serve(s) => serve::run(s),
    }
}

// ---------------------------------------------------------------------------------------------
// Topology

fn fabric_ns(state: &LabState) -> String {
    format!("{}fabric", netns_prefix(&state.dir))
}

fn node_fabric_v4(index: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 239, 0, index as u8)
}

fn node_fabric_v6(index: u32) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x239, 0, 0, 0, 0, 0, index as u16)
}

fn short_hash(s: &str) -> String {
    format!("{:08x}", state::fnv1a(s))
}

fn ns_exec(ns: &str, argv: &[&str]) -> anyhow::Result<()> {
    let mut args = vec!["netns", "exec", ns];
    args.extend_from_slice(argv);
    ip(&args)?;
    Ok(())
}

/// Addresses in a lab are unique by construction: duplicate address detection would only keep
/// new IPv6 addresses (link-local ones included) tentative, and the first connections failing.
fn no_dad(ns: &Netns) -> anyhow::Result<()> {
    for scope in ["all", "default"] {
        ns.exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{scope}.accept_dad=0"),
        ])?;
    }
    Ok(())
}

fn create_fabric(state: &LabState) -> anyhow::Result<()> {
    let fabric = Netns::create(&fabric_ns(state))?.keep();
    fabric.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
    fabric.exec(&["ip", "link", "set", "br0", "up"])?;
    Ok(())
}

fn create_node(state: &LabState, node: &LabNode) -> anyhow::Result<()> {
    let ipv6 = state.ipv6;
    let fabric = fabric_ns(state);
    let ns = Netns::create(&node.netns)?.keep();
    if ipv6 {
        no_dad(&ns)?;
    }
    bulkhead_agent::netns::enable_forwarding(&ns)?;
    ns.exec(&["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"])?;
    let fab_if = format!("fab-{}", node.index);
    bulkhead_agent::netns::veth_pair(
        &fab_if,
        Some(&Netns::existing(&fabric)),
        "fabric0",
        Some(&ns),
    )?;
    ns_exec(
        &fabric,
        &["ip", "link", "set", &fab_if, "master", "br0", "up"],
    )?;
    ns.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{}/24", node_fabric_v4(node.index)),
        "dev",
        "fabric0",
    ])?;
    if ipv6 {
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
        ns.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{}/64", node_fabric_v6(node.index)),
            "dev",
            "fabric0",
            "nodad",
        ])?;
    }
    ns.exec(&["ip", "link", "set", "fabric0", "up"])?;
    Ok(())
}

fn create_pod(state: &LabState, pod: &LabPod) -> anyhow::Result<()> {
    let node = state.node(&pod.node).context("pod on an unknown node")?;
    let pod_ns = Netns::create(&pod.netns)?.keep();
    if state.ipv6 {
        no_dad(&pod_ns)?;
    }
    let node_ns = Netns::existing(&node.netns);
    let v4 = pod.ips.iter().find_map(|ip| match ip {
        IpAddr::V4(v) => Some(*v),
        _ => None,
    });
    match v4 {
        Some(v4) => bulkhead_agent::netns::wire_pod(&node_ns, &pod_ns, &pod.host_if, v4)?,
        None => {
            bulkhead_agent::netns::veth_pair(&pod.host_if, Some(&node_ns), "eth0", Some(&pod_ns))?
        }
    }
    for ip6 in pod.ips.iter().filter(|i| i.is_ipv6()) {
        pod_ns.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{ip6}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        pod_ns.exec(&["ip", "link", "set", "eth0", "up"])?;
        pod_ns.exec(&[
            "ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
        ])?;
        node_ns.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            "fe80::1/64",
            "dev",
            &pod.host_if,
            "nodad",
        ])?;
        node_ns.exec(&["ip", "link", "set", &pod.host_if, "up"])?;
        node_ns.exec(&[
            "ip",
            "-6",
            "route",
            "add",
            &format!("{ip6}/128"),
            "dev",
            &pod.host_if,
        ])?;
    }
    // Other nodes reach this pod through its node's fabric address.
    for other in state.nodes.iter().filter(|n| n.name != node.name) {
        for addr in &pod.ips {
            let via = match addr {
                IpAddr::V4(_) => node_fabric_v4(node.index).to_string(),
                IpAddr::V6(_) => node_fabric_v6(node.index).to_string(),
            };
            let family = if addr.is_ipv6() { "-6" } else { "-4" };
            ns_exec(
                &other.netns,
                &[
                    "ip",
                    family,
                    "route",
                    "replace",
                    &format!("{addr}/{}", if addr.is_ipv6() { 128 } else { 32 }),
                    "via",
                    &via,
                ],
            )?;
        }
    }
    external::route_pod(state, pod)?;
    cluster::route_pod(state, pod)?;
    dns::write_resolv_conf(state, pod)
}

fn remove_pod(state: &LabState, pod: &LabPod) {
    if let Some(pid) = pod.server_pid {
        stop(pid);
    }
    external::unroute_pod(state, pod);
    cluster::unroute_pod(state, pod);
    dns::remove_resolv_conf(&pod.netns);
    let _ = ip(&["netns", "del", &pod.netns]);
    for other in &state.nodes {
        for addr in &pod.ips {
            let family = if addr.is_ipv6() { "-6" } else { "-4" };
            let _ = ns_exec(
                &other.netns,
                &["ip", family, "route", "del", &addr.to_string()],
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Manifests for the controller

/// Writes what the controller reads: the user's objects, lab nodes, and pods with their node
/// and addresses filled in. Written to a temporary file and renamed, so the controller never
/// reads half a file.
fn write_manifests(state: &LabState) -> anyhow::Result<()> {
    let mut out = String::new();
    for n in &state.nodes {
        out += "---\n";
        out += &serde_yaml::to_string(&node_doc(state, n))?;
    }
    for doc in state.objects.values() {
        out += "---\n";
        out += &serde_yaml::to_string(doc)?;
    }
    for (key, doc) in &state.pod_docs {
        let Some(pod) = state.pods.get(key) else {
            continue;
        };
        let mut doc = doc.clone();
        if doc.get("spec").is_none() {
            doc["spec"] = Value::Mapping(Default::default());
        }
        doc["spec"]["nodeName"] = Value::String(pod.node.clone());
        let ips: Vec<Value> = pod
            .ips
            .iter()
            .map(|ip| serde_yaml::from_str(&format!("{{ip: \"{ip}\"}}")).expect("static"))
            .collect();
        let mut status = serde_yaml::Mapping::new();
        status.insert("podIP".into(), Value::String(pod.ips[0].to_string()));
        status.insert("podIPs".into(), Value::Sequence(ips));
        doc["status"] = Value::Mapping(status);
        out += "---\n";
        out += &serde_yaml::to_string(&doc)?;
    }
    let dir = state.manifests_dir();
    std::fs::create_dir_all(&dir)?;
    let tmp = state.dir.join("lab.yaml.tmp");
    std::fs::write(&tmp, out)?;
    std::fs::rename(&tmp, dir.join("lab.yaml"))?;
    Ok(())
}

/// A lab node as a Node object: the labels a kubelet sets (`kubernetes.io/hostname`,
/// `kubernetes.io/os`), those the manifests' Node object gives it (which win), and its fabric
/// addresses as `InternalIP`s (what ClusterNetworkPolicy `nodes` peers select).
fn node_doc(state: &LabState, node: &LabNode) -> Value {
    let mut labels = serde_yaml::Mapping::new();
    labels.insert("kubernetes.io/hostname".into(), node.name.clone().into());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    for (k, v) in state.node_labels.get(&node.name).into_iter().flatten() {
        labels.insert(k.clone().into(), v.clone().into());
    }
    let mut addresses = vec![node_fabric_v4(node.index).to_string()];
    if state.ipv6 {
        addresses.push(node_fabric_v6(node.index).to_string());
    }
    let addresses: Vec<Value> = addresses
        .into_iter()
        .map(|a| {
            let mut m = serde_yaml::Mapping::new();
            m.insert("type".into(), "InternalIP".into());
            m.insert("address".into(), a.into());
            Value::Mapping(m)
        })
        .collect();
    let mut meta = serde_yaml::Mapping::new();
    meta.insert("name".into(), node.name.clone().into());
    meta.insert("labels".into(), Value::Mapping(labels));
    let mut status = serde_yaml::Mapping::new();
    status.insert("addresses".into(), Value::Sequence(addresses));
    let mut doc = serde_yaml::Mapping::new();
    doc.insert("apiVersion".into(), "v1".into());
    doc.insert("kind".into(), "Node".into());
    doc.insert("metadata".into(), Value::Mapping(meta));
    doc.insert("status".into(), Value::Mapping(status));
    Value::Mapping(doc)
}

/// Node objects may only name the lab's nodes.
fn check_node_names(
    state: &LabState,
    labels: &BTreeMap<String, BTreeMap<String, String>>,
) -> anyhow::Result<()> {
    for name in labels.keys() {
        if state.node(name).is_none() {
            bail!(
                "Node {name}: this lab's nodes are node-1 … node-{} (a Node object only labels one of them)",
                state.nodes.len()
            );
        }
    }
    Ok(())
}

/// Places new pods (by `spec.nodeName` when it names a lab node, else round-robin) and gives
/// them addresses (`status.podIP(s)` when given, else from the node's pod CIDR).
fn place_pods(
    state: &mut LabState,
    pod_docs: &BTreeMap<String, Value>,
) -> anyhow::Result<Vec<String>> {
    let mut created = Vec::new();
    // The cluster DNS sits on node-1 and does not shift the round-robin.
    let mut rr = state.user_pods().count();
    for (key, doc) in pod_docs {
        let ports = pod_ports(doc);
        if let Some(existing) = state.pods.get_mut(key) {
            existing.ports = ports;
            continue;
        }
        let (namespace, name) = key.split_once('/').context("pod key")?;
        let wanted = str_at(doc, &["spec", "nodeName"]);
        let node = match wanted.and_then(|w| state.node(w)) {
            Some(n) => n.clone(),
            None => {
                let n = state.nodes[rr % state.nodes.len()].clone();
                rr += 1;
                n
            }
        };
        let mut ips: Vec<IpAddr> = Vec::new();
        if let Some(Value::Sequence(list)) = doc.get("status").and_then(|s| s.get("podIPs")) {
            for i in list {
                if let Some(Ok(ip)) = i.get("ip").and_then(Value::as_str).map(str::parse) {
                    ips.push(ip);
                }
            }
        }
        if ips.is_empty()
            && let Some(Ok(ip)) = str_at(doc, &["status", "podIP"]).map(str::parse::<IpAddr>)
        {
            ips.push(ip);
        }
        if ips.is_empty() {
            let host = state.next_host.entry(node.name.clone()).or_insert(10);
            *host += 1;
            if *host > 250 {
                bail!(
                    "node {} has no pod addresses left (250 pods per lab node)",
                    node.name
                );
            }
            ips.push(IpAddr::V4(state.pod_cidrs.pod_v4(node.index, *host)));
            if state.ipv6 {
                ips.push(IpAddr::V6(state.pod_cidrs.pod_v6(node.index, *host)));
            }
        }
        let hash = short_hash(key);
        state.pods.insert(
            key.clone(),
            LabPod {
                namespace: namespace.to_string(),
                name: name.to_string(),
                node: node.name.clone(),
                ips,
                netns: format!("{}p-{hash}", netns_prefix(&state.dir)),
                host_if: format!("bhp{hash}"),
                ports,
                server_pid: None,
            },
        );
        created.push(key.clone());
    }
    Ok(created)
}

// ---------------------------------------------------------------------------------------------
// Commands

/// The reachability matrix of the lab over IPv4 (see `bulkhead lab probe`).
pub fn probe_matrix(
    state: &LabState,
    port: u16,
    protocol: &str,
    timeout: Duration,
) -> anyhow::Result<BTreeMap<String, BTreeMap<String, bool>>> {
    probe::matrix(state, port, protocol, false, timeout)
}

pub fn http_get(port: u16, path: &str) -> Option<String> {
    http_get_within(port, path, Duration::from_secs(2))
}

/// [`http_get`], waiting up to `timeout` for the answer (a query of the flow history reads
/// many records).
pub fn http_get_within(port: u16, path: &str, timeout: Duration) -> Option<String> {
    http_get_as(port, path, timeout, None)
}

/// [`http_get_within`], with `Authorization: Bearer TOKEN` when a token is given (a controller
/// with `--http-auth tokens|kubernetes`).
pub fn http_get_as(
    port: u16,
    path: &str,
    timeout: Duration,
    token: Option<&str>,
) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(300),
    )
    .ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n{auth}\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// Per node: (version, realized, connected).
pub fn node_versions(state: &LabState) -> BTreeMap<String, (u64, u64, bool)> {
    http_get(state.http_port, "/api/nodes")
        .and_then(|b| serde_json::from_str::<Vec<NodeView>>(&b).ok())
        .unwrap_or_default()
        .into_iter()
        .map(|n| (n.node, (n.version, n.realized, n.connected)))
        .collect()
}

/// Waits until every lab node's agent has realized the controller's current version, and that
/// version reflects `at_least` (a change the controller may not have read yet).
fn wait_realized(state: &LabState, timeout: Duration, settle: bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    // The controller re-reads manifests every 100 ms: give it a moment to see a fresh write.
    if settle {
        std::thread::sleep(Duration::from_millis(250));
    }
    loop {
        let v = node_versions(state);
        let done = state.nodes.iter().all(|n| {
            v.get(&n.name)
                .is_some_and(|(version, realized, connected)| *connected && realized >= version)
        });
        if done {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "agents did not realize their rule sets within {} s; see {}",
                timeout.as_secs(),
                state.logs_dir().display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn up(
    dir: &Path,
    files: &[PathBuf],
    nodes: u32,
    ipv6: bool,
    port_base: u16,
    prefilter: crate::agent::PrefilterChoice,
    choice: cluster::ClusterChoice,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    if let Ok(existing) = LabState::load(dir)
        && existing.controller_pid.is_some_and(alive)
    {
        bail!(
            "a lab is already up at {}; `bulkhead lab down` first",
            dir.display()
        );
    }
    if !(1..=200).contains(&nodes) {
        bail!("--nodes must be between 1 and 200");
    }
    if nodes > 100 {
        bail!("a lab has at most 100 nodes (each takes two ports above --port-base)");
    }
    if port_base > u16::MAX - 220 {
        bail!("--port-base leaves no room for the agents' ports");
    }
    let docs = read_documents(files)?;
    let Declared {
        pods: mut pod_docs,
        objects,
        external_hosts,
        node_labels,
    } = classify(docs, choice.pod_cidrs.dns_v4())?;
    // Leftovers of a crashed lab go first.
    down(dir)?;
    std::fs::create_dir_all(dir.join("logs"))?;
    pod_docs.insert(
        dns::POD_KEY.to_string(),
        dns::pod_doc(&choice.pod_cidrs, ipv6)?,
    );
    let mut state = LabState {
        dir: dir.to_path_buf(),
        ipv6,
        nodes: (1..=nodes)
            .map(|i| LabNode {
                name: format!("node-{i}"),
                netns: format!("{}node-{i}", netns_prefix(dir)),
                index: i,
                agent_pid: None,
                metrics_port: port_base + 10 + i as u16,
            })
            .collect(),
        pods: BTreeMap::new(),
        objects,
        pod_docs: pod_docs.clone(),
        controller_pid: None,
        grpc_port: port_base,
        http_port: port_base + 1,
        next_host: BTreeMap::new(),
        prefilter,
        external_hosts: BTreeMap::new(),
        node_labels,
        cluster: choice.name,
        pod_cidrs: choice.pod_cidrs,
        peers: BTreeMap::new(),
    };
    check_node_names(&state, &state.node_labels)?;
    let result = (|| -> anyhow::Result<()> {
        place_pods(&mut state, &pod_docs)?;
        state.save()?;
        create_fabric(&state)?;
        for n in &state.nodes {
            create_node(&state, n)?;
        }
        let pods: Vec<LabPod> = state.pods.values().cloned().collect();
        for p in &pods {
            create_pod(&state, p)?;
        }
        external::sync(&mut state, external_hosts)?;
        state.save()?;
        let mut node_names: Vec<String> = state.nodes.iter().map(|n| n.name.clone()).collect();
        // `bulkhead quarantine --lab` speaks to the controller as `admin`.
        node_names.push("admin".into());
        // (`generate` also writes the controller's peering client certificate, `peering.pem`.)
        crate::certs::generate(&state.certs_dir(), &node_names, &[])?;
        write_manifests(&state)?;
        state.controller_pid = Some(start_controller(&state)?);
        state.save()?;
        wait_controller(&state)?;
        for i in 0..state.nodes.len() {
            let pid = start_agent(&state, &state.nodes[i])?;
            state.nodes[i].agent_pid = Some(pid);
        }
        for key in state.pods.keys().cloned().collect::<Vec<_>>() {
            let pid = start_server(&state, &state.pods[&key])?;
            if let Some(p) = state.pods.get_mut(&key) {
                p.server_pid = Some(pid);
            }
        }
        state.save()?;
        wait_realized(&state, Duration::from_secs(30), false)
    })();
    if let Err(e) = result {
        eprintln!("lab up failed: {e:#}; cleaning up");
        let _ = down(dir);
        return Err(e);
    }
    println!(
        "lab up: {} nodes, {} pods, agents realized in {:.1} s (state in {})",
        state.nodes.len(),
        state.user_pods().count(),
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    print_status(&state);
    Ok(ExitCode::SUCCESS)
}

pub fn apply(dir: &Path, files: &[PathBuf], delete: bool) -> anyhow::Result<ExitCode> {
    let mut state = LabState::load(dir)?;
    let docs = read_documents(files)?;
    let Declared {
        pods: pod_docs,
        objects,
        external_hosts,
        node_labels,
    } = classify(docs, state.pod_cidrs.dns_v4())?;
    check_node_names(&state, &node_labels)?;
    if delete {
        for name in node_labels.keys() {
            state.node_labels.remove(name);
        }
    } else {
        state.node_labels.extend(node_labels);
    }
    let mut hosts: BTreeMap<String, external::ExternalHost> = state
        .external_hosts
        .iter()
        .map(|(k, h)| (k.clone(), h.spec.clone()))
        .collect();
    if delete {
        hosts.retain(|k, _| !external_hosts.contains_key(k));
    } else {
        hosts.extend(external_hosts);
    }
    external::sync(&mut state, hosts)?;
    dns::reload(&mut state)?;
    if delete {
        for key in objects.keys() {
            state.objects.remove(key);
        }
        for key in pod_docs.keys() {
            if let Some(pod) = state.pods.remove(key) {
                remove_pod(&state, &pod);
            }
            state.pod_docs.remove(key);
        }
    } else {
        state.objects.extend(objects);
        for (k, v) in &pod_docs {
            state.pod_docs.insert(k.clone(), v.clone());
        }
        let created = place_pods(&mut state, &pod_docs)?;
        for key in &created {
            let pod = state.pods[key].clone();
            create_pod(&state, &pod)?;
            let pid = start_server(&state, &pod)?;
            if let Some(p) = state.pods.get_mut(key) {
                p.server_pid = Some(pid);
            }
        }
        // Changed ports of existing pods: restart their servers.
        for key in pod_docs.keys().filter(|k| !created.contains(k)) {
            let pod = state.pods[key].clone();
            if let Some(pid) = pod.server_pid {
                stop(pid);
            }
            let pid = start_server(&state, &pod)?;
            if let Some(p) = state.pods.get_mut(key) {
                p.server_pid = Some(pid);
            }
        }
    }
    state.save()?;
    let started = Instant::now();
    write_manifests(&state)?;
    wait_realized(&state, Duration::from_secs(20), true)?;
    println!(
        "{} realized on all nodes in {:.0} ms",
        if delete { "deletion" } else { "change" },
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(ExitCode::SUCCESS)
}

/// `bulkhead policy promote --lab`: the staged object (the first of `candidates` the lab has)
/// is replaced by its enforced form in one write of the lab's manifest.
pub fn promote(
    dir: &Path,
    candidates: &[crate::promote::StagedTarget],
) -> anyhow::Result<ExitCode> {
    let mut state = LabState::load(dir)?;
    let found: Vec<(String, &crate::promote::StagedTarget)> = candidates
        .iter()
        .flat_map(|t| {
            state
                .objects
                .iter()
                .filter(|(_, d)| crate::promote::is_target(d, t))
                .map(move |(k, _)| (k.clone(), t))
        })
        .collect();
    let (key, target) = match found.as_slice() {
        [one] => one.clone(),
        [] => bail!(
            "the lab has no {} {}",
            candidates
                .iter()
                .map(|c| c.kind)
                .collect::<Vec<_>>()
                .join(" or "),
            candidates
                .first()
                .map(|c| if c.namespace.is_empty() {
                    c.name.clone()
                } else {
                    format!("{}/{}", c.namespace, c.name)
                })
                .unwrap_or_default()
        ),
        _ => bail!(
            "both a StagedNetworkPolicy and a ServicePolicy have this name: say which with --kind"
        ),
    };
    let staged = state.objects[&key].clone();
    let enforced = crate::promote::promoted(&staged)?;
    crate::promote::validate(&enforced)?;
    state.objects.remove(&key);
    let enforced_key = object_key(&enforced);
    let replaced = state
        .objects
        .insert(enforced_key.clone(), enforced)
        .is_some();
    state.save()?;
    let started = Instant::now();
    write_manifests(&state)?;
    wait_realized(&state, Duration::from_secs(20), true)?;
    let what = enforced_key.replace("/default/", "/");
    println!(
        "promoted {} {}: {what} {} realized on all nodes in {:.0} ms",
        target.kind,
        key.split_once('/').map_or(key.as_str(), |(_, rest)| rest),
        if replaced {
            "replaced and"
        } else {
            "created and"
        },
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(ExitCode::SUCCESS)
}

fn exec(dir: &Path, pod: &str, command: &[String]) -> anyhow::Result<ExitCode> {
    let state = LabState::load(dir)?;
    let p = state
        .pods
        .get(pod)
        .with_context(|| format!("no pod {pod} in the lab (see `bulkhead lab status`)"))?;
    let status = Command::new("ip")
        .args(["netns", "exec", &p.netns])
        .args(command)
        .status()
        .context("run ip netns exec")?;
    Ok(ExitCode::from(
        status.code().unwrap_or(1).clamp(0, 255) as u8
    ))
}

fn print_status(state: &LabState) {
    let versions = node_versions(state);
    println!(
        "controller: pid {} {}  grpc 127.0.0.1:{}  http 127.0.0.1:{}  metrics 127.0.0.1:{}",
        state
            .controller_pid
            .map(|p| p.to_string())
            .unwrap_or("-".into()),
        if state.controller_pid.is_some_and(alive) {
            "running"
        } else {
            "NOT RUNNING"
        },
        state.grpc_port,
        state.http_port,
        state.metrics_port()
    );
    for n in &state.nodes {
        let (v, r, c) = versions.get(&n.name).copied().unwrap_or((0, 0, false));
        println!(
            "{:<8} agent pid {:<7} {:<11} version {v:<4} realized {r:<4} {}  metrics 127.0.0.1:{}  flows 127.0.0.1:{}",
            n.name,
            n.agent_pid.map(|p| p.to_string()).unwrap_or("-".into()),
            if n.agent_pid.is_some_and(alive) {
                "running"
            } else {
                "NOT RUNNING"
            },
            if c { "connected" } else { "disconnected" },
            n.metrics_port,
            n.http_port()
        );
    }
    for p in state.pods.values() {
        let ips: Vec<String> = p.ips.iter().map(|i| i.to_string()).collect();
        let ports: Vec<String> = p
            .ports
            .iter()
            .map(|c| format!("{}/{}", c.port, c.protocol))
            .collect();
        println!(
            "  {:<28} {:<8} {:<28} ports {:<16} netns {}",
            p.key(),
            p.node,
            ips.join(","),
            ports.join(","),
            p.netns
        );
    }
    if let Some(name) = &state.cluster {
        let cidrs: Vec<String> = state
            .pod_cidrs
            .in_use(state.ipv6)
            .iter()
            .map(|c| c.to_string())
            .collect();
        let peering = if !state.peers.is_empty() {
            format!("  peering 127.0.0.1:{}", state.peering_port())
        } else {
            String::new()
        };
        println!("cluster {name}: pod CIDR {}{peering}", cidrs.join(","));
        for p in state.peers.values() {
            let cidrs: Vec<String> = p.pod_cidrs.iter().map(|c| c.to_string()).collect();
            println!(
                "  peer {:<10} pod CIDR {:<30} via {} ({} {} → {})  lab {}",
                p.cluster,
                cidrs.join(","),
                cluster::ROUTER_V4,
                p.link_if,
                p.local_v4,
                p.remote_v4,
                p.dir.display()
            );
        }
    }
    println!(
        "cluster DNS: {} ({}, dnsmasq); pods resolve through it with egress to {}/k8s-app=kube-dns on port 53",
        state.pod_cidrs.dns_v4(),
        dns::POD_KEY,
        dns::NAMESPACE
    );
    for h in state.external_hosts.values() {
        let h = &h.spec;
        let show = |v: Vec<String>| v.join(",");
        println!(
            "  external/{:<19} {:<37} ports {:<16} names {}",
            h.name,
            show(h.addresses.iter().map(|a| a.to_string()).collect()),
            show(
                h.ports
                    .iter()
                    .map(|c| format!("{}/{}", c.port, c.protocol))
                    .collect()
            ),
            show(
                h.names
                    .iter()
                    .chain(h.aliases.iter().map(|a| &a.name))
                    .cloned()
                    .collect()
            )
        );
    }
}

fn heal(dir: &Path) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let mut state = LabState::load(dir)?;
    let mut restarted = Vec::new();
    if !state.controller_pid.is_some_and(alive) {
        state.controller_pid = Some(start_controller(&state)?);
        restarted.push("controller".to_string());
        wait_controller(&state)?;
    }
    for i in 0..state.nodes.len() {
        if !state.nodes[i].agent_pid.is_some_and(alive) {
            let pid = start_agent(&state, &state.nodes[i])?;
            state.nodes[i].agent_pid = Some(pid);
            restarted.push(format!("agent {}", state.nodes[i].name));
        }
    }
    for key in state.pods.keys().cloned().collect::<Vec<_>>() {
        if !state.pods[&key].server_pid.is_some_and(alive) {
            let pid = start_server(&state, &state.pods[&key])?;
            if let Some(p) = state.pods.get_mut(&key) {
                p.server_pid = Some(pid);
            }
            restarted.push(format!("server {key}"));
        }
    }
    restarted.extend(external::heal(&mut state)?);
    state.save()?;
    wait_realized(&state, Duration::from_secs(30), false)?;
    if restarted.is_empty() {
        println!("nothing to heal: every lab process is running");
    } else {
        println!(
            "restarted {} and realized in {:.1} s",
            restarted.join(", "),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits until the lab's controller serves (its `/healthz` answers).
fn wait_controller(state: &LabState) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(state.http_port, "/healthz").is_none() {
        if Instant::now() > deadline || !state.controller_pid.is_some_and(alive) {
            bail!(
                "the controller did not start; see {}",
                state.logs_dir().join("controller.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    Ok(())
}

fn peer(dir: &Path, with: &Path) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    cluster::peer(dir, with)?;
    let mut restarted = Vec::new();
    for d in [dir, with] {
        let mut state = LabState::load(d)?;
        if processes::restart_controller_for_peers(&mut state)? {
            wait_realized(&state, Duration::from_secs(30), false)?;
            restarted.push(state.cluster.map(|c| c.to_string()).unwrap_or_default());
        }
    }
    let state = LabState::load(dir)?;
    let other = LabState::load(with)?;
    let name = |s: &LabState| {
        s.cluster
            .as_ref()
            .map(|c| c.to_string())
            .unwrap_or_default()
    };
    println!(
        "peered {} and {}: pod CIDRs routed both ways{} in {:.1} s",
        name(&state),
        name(&other),
        if restarted.is_empty() {
            String::new()
        } else {
            format!(
                ", controllers of {} restarted with their peers",
                restarted.join(" and ")
            )
        },
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn unpeer(dir: &Path, with: &Path) -> anyhow::Result<ExitCode> {
    let mut state = LabState::load(dir)?;
    let other = LabState::load(with)?;
    let name = other
        .cluster
        .with_context(|| format!("the lab at {} is no named cluster", with.display()))?;
    cluster::unpeer(&mut state, name.as_str())?;
    for d in [dir, with] {
        let mut s = LabState::load(d)?;
        if processes::restart_controller_for_peers(&mut s)? {
            wait_realized(&s, Duration::from_secs(30), false)?;
        }
    }
    println!("unpeered {name}: link and routes removed");
    Ok(ExitCode::SUCCESS)
}

fn status(dir: &Path) -> anyhow::Result<ExitCode> {
    let state = LabState::load(dir)?;
    print_status(&state);
    Ok(ExitCode::SUCCESS)
}

/// Removes everything a lab made. Works without a state file too (after a crash): processes are
/// found by their command line naming the state directory, namespaces and pins by prefix.
pub fn down(dir: &Path) -> anyhow::Result<()> {
    let mut pids: Vec<u32> = Vec::new();
    if let Ok(mut state) = LabState::load(dir) {
        // The peers' routes to this lab go with it (and the links, with its fabric namespace).
        cluster::unpeer_all(&mut state);
        pids.extend(state.pods.values().filter_map(|p| p.server_pid));
        pids.extend(state.nodes.iter().filter_map(|n| n.agent_pid));
        pids.extend(state.controller_pid);
        pids.extend(state.external_hosts.values().filter_map(|h| h.server_pid));
    }
    let needle = dir.to_string_lossy().to_string();
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            // The cluster DNS's dnsmasq names the state directory in its `--conf-file`.
            let program = cmdline.split(' ').next().unwrap_or_default();
            if cmdline.contains(&needle)
                && (cmdline.contains("bulkhead") || program.ends_with("dnsmasq"))
            {
                pids.push(pid);
            }
        }
    }
    pids.sort();
    pids.dedup();
    // Servers and agents, then the controller: SIGTERM, then SIGKILL for stragglers.
    for pid in &pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let deadline = Instant::now() + Duration::from_millis(800);
    while Instant::now() < deadline && pids.iter().any(|p| alive(*p)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in pids.iter().filter(|p| alive(**p)) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    // Pins (links first: that detaches the programs), then namespaces (and their links).
    let pins = pin_prefix(dir);
    let namespaces = netns_prefix(dir);
    for entry in std::fs::read_dir("/sys/fs/bpf/bulkhead")
        .into_iter()
        .flatten()
        .flatten()
    {
        if entry.file_name().to_string_lossy().starts_with(&pins) {
            bulkhead_agent::loader::remove_pins(&entry.path())
                .with_context(|| format!("remove pins {}", entry.path().display()))?;
        }
    }
    for entry in std::fs::read_dir("/var/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with(&namespaces) {
            ip(&["netns", "del", &name]).with_context(|| format!("delete namespace {name}"))?;
        }
    }
    dns::remove_resolv_confs(&namespaces)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    Ok(())
}
