//! `bulkhead lab probe`: real connections from every pod to every pod, in parallel (bounded),
//! printed as the same matrix as `bulkhead policy evaluate`; or, with `--to`, from every pod to
//! one name (resolved through the cluster DNS from each pod's namespace) or address. The lab's
//! own cluster DNS pod is neither a source nor a destination: it serves DNS, not the probe. In a
//! peered lab (`lab peer`) the peer clusters' pods are destinations too, named
//! `cluster/namespace/pod`.

use std::{
    collections::BTreeMap,
    io::Read,
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    path::Path,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};

use super::state::{LabPod, LabState};

#[derive(Clone, Copy, ValueEnum)]
pub enum Output {
    Json,
    Table,
}

#[derive(Args)]
pub struct ProbeArgs {
    #[arg(long)]
    port: u16,
    #[arg(long, default_value = "TCP")]
    protocol: String,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
    /// How long one connection attempt may take.
    #[arg(long, default_value_t = 500)]
    timeout_ms: u64,
    /// Probe IPv6 addresses instead of IPv4.
    #[arg(long)]
    ipv6: bool,
    /// Probe only this destination from every pod: a DNS name (e.g. an ExternalHost's, resolved
    /// by each pod through the cluster DNS as its libc would) or an address.
    #[arg(long)]
    to: Option<String>,
}

/// Attempts at once (each on its own thread inside the source pod's namespace).
const PARALLEL: usize = 64;

fn attempt(src: &LabPod, dst: IpAddr, port: u16, udp: bool, timeout: Duration) -> bool {
    let ns = bulkhead_agent::netns::netns_path(&src.netns);
    if bulkhead_agent::netns::enter(&ns, &src.netns).is_err() {
        return false;
    }
    let addr = SocketAddr::new(dst, port);
    let mut buf = [0u8; 256];
    if udp {
        let bind = if dst.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
        let Ok(s) = UdpSocket::bind(bind) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(timeout));
        s.send_to(b"probe", addr).is_ok() && s.recv(&mut buf).is_ok_and(|n| n > 0)
    } else {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, timeout) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(timeout));
        s.read(&mut buf).is_ok_and(|n| n > 0)
    }
}

/// `{"ns/src": {"ns/dst": reachable}}` for every ordered pair (pod to itself included), and
/// from every pod to every pod of the peer clusters (`{"ns/src": {"cluster/ns/dst": …}}`).
pub fn matrix(
    state: &LabState,
    port: u16,
    protocol: &str,
    ipv6: bool,
    timeout: Duration,
) -> anyhow::Result<BTreeMap<String, BTreeMap<String, bool>>> {
    let udp = is_udp(protocol)?;
    let pods: Vec<LabPod> = state.user_pods().cloned().collect();
    // Every local pod, and every pod of the peer clusters as `cluster/namespace/pod`.
    let mut targets: Vec<(String, Option<IpAddr>)> = Vec::new();
    let address = |p: &LabPod| p.ips.iter().copied().find(|i| i.is_ipv6() == ipv6);
    for dst in &pods {
        targets.push((dst.key(), address(dst)));
    }
    for peer in state.peers.values() {
        let remote = LabState::load(&peer.dir)
            .with_context(|| format!("read the pods of peer cluster {}", peer.cluster))?;
        for dst in remote.user_pods() {
            targets.push((format!("{}/{}", peer.cluster, dst.key()), address(dst)));
        }
    }
    let mut jobs = Vec::new();
    for src in &pods {
        for (dst, ip) in &targets {
            jobs.push((src.clone(), dst.clone(), *ip));
        }
    }
    let result = Arc::new(Mutex::new(BTreeMap::<String, BTreeMap<String, bool>>::new()));
    let jobs = Arc::new(Mutex::new(jobs));
    let workers: Vec<_> = (0..PARALLEL)
        .map(|_| {
            let jobs = jobs.clone();
            let result = result.clone();
            std::thread::spawn(move || {
                loop {
                    let Some((src, dst, ip)) = jobs.lock().ok().and_then(|mut j| j.pop()) else {
                        return;
                    };
                    // Each attempt on a fresh thread: entering a namespace is per thread.
                    let ok = match ip {
                        Some(ip) => {
                            let s = src.clone();
                            std::thread::spawn(move || attempt(&s, ip, port, udp, timeout))
                                .join()
                                .unwrap_or(false)
                        }
                        None => false,
                    };
                    if let Ok(mut r) = result.lock() {
                        r.entry(src.key()).or_default().insert(dst, ok);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let out = result.lock().map(|r| r.clone()).unwrap_or_default();
    Ok(out)
}

/// Whether `protocol` is UDP (the lab's servers speak TCP and UDP).
fn is_udp(protocol: &str) -> anyhow::Result<bool> {
    match protocol.to_uppercase().as_str() {
        "TCP" => Ok(false),
        "UDP" => Ok(true),
        "SCTP" => bail!("the lab's built-in servers speak TCP and UDP, not SCTP"),
        other => bail!("unknown protocol {other:?}: use TCP or UDP"),
    }
}

/// What one source pod got when it probed a target: the address it tried, or why it had none.
pub struct TargetOutcome {
    pub reached: bool,
    pub detail: String,
}

/// From every pod to `target` (a name, resolved from the pod's own namespace through the
/// cluster DNS, or an address), by `namespace/pod`.
pub fn to_target(
    state: &LabState,
    target: &str,
    port: u16,
    protocol: &str,
    ipv6: bool,
    timeout: Duration,
) -> anyhow::Result<BTreeMap<String, TargetOutcome>> {
    let udp = is_udp(protocol)?;
    let literal: Option<IpAddr> = target.parse().ok();
    let dns = state.pod_cidrs.dns_v4();
    let handles: Vec<_> = state
        .user_pods()
        .cloned()
        .map(|src| {
            let target = target.to_string();
            std::thread::spawn(move || {
                let ns = bulkhead_agent::netns::netns_path(&src.netns);
                if let Err(e) = bulkhead_agent::netns::enter(&ns, &src.netns) {
                    return (
                        src.key(),
                        TargetOutcome {
                            reached: false,
                            detail: e.to_string(),
                        },
                    );
                }
                let addr = match literal {
                    Some(a) => a,
                    None => {
                        match super::dns::resolve(dns, &src.namespace, &target, ipv6, timeout) {
                            Ok(found) => found[0],
                            Err(e) => {
                                return (
                                    src.key(),
                                    TargetOutcome {
                                        reached: false,
                                        detail: format!("{e:#}"),
                                    },
                                );
                            }
                        }
                    }
                };
                // A fresh thread for the attempt, which enters the namespace itself.
                let s = src.clone();
                let reached = std::thread::spawn(move || attempt(&s, addr, port, udp, timeout))
                    .join()
                    .unwrap_or(false);
                (
                    src.key(),
                    TargetOutcome {
                        reached,
                        detail: addr.to_string(),
                    },
                )
            })
        })
        .collect();
    Ok(handles.into_iter().filter_map(|h| h.join().ok()).collect())
}

pub fn run(dir: &Path, args: ProbeArgs) -> anyhow::Result<ExitCode> {
    let state = LabState::load(dir)?;
    if let Some(target) = &args.to {
        let outcomes = to_target(
            &state,
            target,
            args.port,
            &args.protocol,
            args.ipv6,
            Duration::from_millis(args.timeout_ms),
        )?;
        match args.output {
            Output::Json => {
                let m: BTreeMap<&String, BTreeMap<&String, bool>> = outcomes
                    .iter()
                    .map(|(src, o)| (src, BTreeMap::from([(target, o.reached)])))
                    .collect();
                println!("{}", serde_json::to_string(&m)?);
            }
            Output::Table => {
                println!(
                    "{}/{} to {target}: ✓ reached, ✗ not; rows are sources",
                    args.port,
                    args.protocol.to_uppercase()
                );
                let width = outcomes
                    .keys()
                    .map(|k| k.chars().count())
                    .max()
                    .unwrap_or(4);
                for (src, o) in &outcomes {
                    println!(
                        "  {src:<width$}  {}  {}",
                        if o.reached { "✓" } else { "✗" },
                        o.detail
                    );
                }
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let m = matrix(
        &state,
        args.port,
        &args.protocol,
        args.ipv6,
        Duration::from_millis(args.timeout_ms),
    )?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string(&m)?),
        Output::Table => {
            let proto = match args.protocol.to_uppercase().as_str() {
                "UDP" => bulkhead_controller::ruleset::Protocol::Udp,
                _ => bulkhead_controller::ruleset::Protocol::Tcp,
            };
            crate::policy::write_table(&mut std::io::stdout().lock(), &m, proto, args.port)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
