//! The lab's long-running processes: the controller, one agent per node, each pod's built-in
//! server, all detached from the CLI that starts them (own process group, output to a log).

use std::{
    ffi::OsString,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;

use super::{
    dns,
    state::{LabNode, LabPod, LabState, alive},
};

pub(super) fn exe() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("find the bulkhead executable")
}

/// Starts a process that outlives this CLI (own process group, output to a log file).
pub(super) fn spawn_detached(cmd: &mut Command, log: &Path) -> anyhow::Result<u32> {
    let out = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let err = out.try_clone()?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("start {:?}", cmd.get_program()))?;
    Ok(child.id())
}

pub(super) fn stop(pid: u32) {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_millis(800);
    while Instant::now() < deadline && alive(pid.as_raw() as u32) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
}

/// The client certificate (`certs/peering.pem`) a named cluster's controller presents to its
/// peers' controllers.
pub(super) const PEERING_CERT: &str = "peering";

/// A named cluster's controller flags: its name and pod CIDRs, where it serves its peers, and
/// each peer lab's controller (its peering port and the CA its certificate chains to).
pub(super) fn cluster_args(state: &LabState) -> Vec<OsString> {
    let Some(name) = &state.cluster else {
        return Vec::new();
    };
    let certs = state.certs_dir();
    let mut args: Vec<OsString> = vec!["--cluster-name".into(), name.to_string().into()];
    for cidr in state.pod_cidrs.in_use(state.ipv6) {
        args.extend(["--pod-cidr".into(), cidr.to_string().into()]);
    }
    // Peering needs a peer: a cluster without one serves and imports nothing.
    if state.peers.is_empty() {
        return args;
    }
    args.extend([
        "--peering-listen".into(),
        format!("127.0.0.1:{}", state.peering_port()).into(),
    ]);
    for p in state.peers.values() {
        let mut peer = OsString::from(format!(
            "name={},address=https://127.0.0.1:{},ca=",
            p.cluster, p.peering_port
        ));
        peer.push(&p.ca);
        args.extend(["--peer".into(), peer]);
    }
    args.extend([
        "--peering-cert".into(),
        certs.join(format!("{PEERING_CERT}.pem")).into(),
        "--peering-key".into(),
        certs.join(format!("{PEERING_CERT}-key.pem")).into(),
    ]);
    args
}

/// (Re)starts the controller of a lab whose peers changed, so it runs with their flags
/// ([`cluster_args`]); waits until it serves.
pub(super) fn restart_controller_for_peers(state: &mut LabState) -> anyhow::Result<bool> {
    if state.cluster.is_none() {
        return Ok(false);
    }
    if let Some(pid) = state.controller_pid {
        stop(pid);
    }
    state.controller_pid = Some(start_controller(state)?);
    state.save()?;
    super::wait_controller(state)?;
    Ok(true)
}

pub(super) fn start_controller(state: &LabState) -> anyhow::Result<u32> {
    let certs = state.certs_dir();
    let cluster = cluster_args(state);
    spawn_detached(
        Command::new(exe()?)
            .args(["controller", "-f"])
            .arg(state.manifests_dir())
            .args(["--listen", &format!("127.0.0.1:{}", state.grpc_port)])
            .args(["--http", &format!("127.0.0.1:{}", state.http_port)])
            .args(["--metrics", &format!("127.0.0.1:{}", state.metrics_port())])
            .arg("--tls-cert")
            .arg(certs.join("controller.pem"))
            .arg("--tls-key")
            .arg(certs.join("controller-key.pem"))
            .arg("--client-ca")
            .arg(certs.join("ca.pem"))
            .args(["--reload-ms", "100"])
            .args(cluster),
        &state.logs_dir().join("controller.log"),
    )
}

pub(super) fn start_agent(state: &LabState, node: &LabNode) -> anyhow::Result<u32> {
    let certs = state.certs_dir();
    spawn_detached(
        Command::new(exe()?)
            .args(["agent", "run", "--node", &node.name, "--netns", &node.netns])
            .args(["--uplink", "fabric0"])
            .args(["--prefilter", &state.prefilter.to_string()])
            .args(["--controller", &format!("127.0.0.1:{}", state.grpc_port)])
            .arg("--tls-cert")
            .arg(certs.join(format!("{}.pem", node.name)))
            .arg("--tls-key")
            .arg(certs.join(format!("{}-key.pem", node.name)))
            .arg("--ca")
            .arg(certs.join("ca.pem"))
            .arg("--pin-dir")
            .arg(state.pin_dir(&node.name))
            .args([
                "--metrics-addr",
                &format!("127.0.0.1:{}", node.metrics_port),
            ])
            .args(["--http", &format!("127.0.0.1:{}", node.http_port())]),
        &state.logs_dir().join(format!("agent-{}.log", node.name)),
    )
}

/// Starts a pod's process: the built-in server on its ports, or dnsmasq in the cluster DNS pod.
pub(super) fn start_server(state: &LabState, pod: &LabPod) -> anyhow::Result<u32> {
    if pod.key() == dns::POD_KEY {
        return dns::start(state, pod);
    }
    let mut cmd = Command::new(exe()?);
    cmd.args(["lab", "--state"]).arg(&state.dir).args([
        "serve",
        "--netns",
        &pod.netns,
        "--name",
        &pod.key(),
    ]);
    for p in &pod.ports {
        cmd.args(["--port", &format!("{}/{}", p.port, p.protocol)]);
    }
    spawn_detached(
        &mut cmd,
        &state.logs_dir().join(format!("pod-{}.log", pod.netns)),
    )
}
