//! `bulkhead lab probe`: real connections from every pod to every pod, in parallel (bounded),
//! printed as the same matrix as `bulkhead policy evaluate`.

use std::{
    collections::BTreeMap,
    io::Read,
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    path::Path,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::bail;
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

/// `{"ns/src": {"ns/dst": reachable}}` for every ordered pair (pod to itself included).
pub fn matrix(
    state: &LabState,
    port: u16,
    protocol: &str,
    ipv6: bool,
    timeout: Duration,
) -> anyhow::Result<BTreeMap<String, BTreeMap<String, bool>>> {
    let udp = match protocol.to_uppercase().as_str() {
        "TCP" => false,
        "UDP" => true,
        "SCTP" => bail!("the lab's built-in servers speak TCP and UDP, not SCTP"),
        other => bail!("unknown protocol {other:?}: use TCP or UDP"),
    };
    let pods: Vec<LabPod> = state.pods.values().cloned().collect();
    let mut jobs = Vec::new();
    for src in &pods {
        for dst in &pods {
            let ip = dst.ips.iter().copied().find(|i| i.is_ipv6() == ipv6);
            jobs.push((src.clone(), dst.key(), ip));
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

pub fn run(dir: &Path, args: ProbeArgs) -> anyhow::Result<ExitCode> {
    let state = LabState::load(dir)?;
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
