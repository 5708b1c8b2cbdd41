//! The path a user's pods take, in the lab: TCP throughput (iperf3) and request/response latency
//! from `bench/client` on node-1 to `bench/server` on node-2 (cross-node: pod veth, node-1's
//! routing, the fabric, node-2's uplink with the prefilter, node-2's routing, pod veth) and to
//! `bench/local` on node-1 (same node), for:
//!
//! * `none`: the same lab with every agent stopped and its pins removed (no program anywhere);
//! * `tc`: Bulkhead as `lab up` starts it (prefilter at TC ingress of the uplink, the default);
//! * `xdp`: the prefilter at XDP on the uplink (`--prefilter xdp`);
//!
//! each with no policy selecting the pods and with a policy of 10,000 entries on the servers.
//! Rounds interleave the setups, so a ratio compares runs minutes apart, not a warm and a cold
//! machine. Then a flood from a quarantined address (UDP from node-1's fabric address with the
//! quarantined pod's address as source, so node-1's own pod programs do not stop it first) and
//! how many packets per second node-2's prefilter drops on each hook.
//!
//! Figures, never a test: run as root after `cargo build --release -p bulkhead`:
//! `cargo run --release -p bulkhead-bench --bin crossnode [-- --rounds 3 --seconds 4]`

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use bulkhead_agent::netns::Netns;
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Rounds; each measures every setup once (0: only the flood).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 4)]
    seconds: u32,
    /// Request/response round trips per latency measurement.
    #[arg(long, default_value_t = 5000)]
    round_trips: usize,
    /// Policy entries of the large policy.
    #[arg(long, default_value_t = 10_000)]
    entries: u32,
    /// Seconds of the quarantined-source flood per hook.
    #[arg(long, default_value_t = 3)]
    flood_seconds: u64,
    /// The bulkhead binary that runs the lab.
    #[arg(long, default_value = "target/release/bulkhead")]
    bulkhead: PathBuf,
}

/// No container ports: the lab would start its own servers on them.
const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bench}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench, labels: {app: client}}
spec: {nodeName: node-1, containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: local, namespace: bench, labels: {app: server}}
spec: {nodeName: node-1, containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bench, labels: {app: server}}
spec: {nodeName: node-2, containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: victim, namespace: bench, labels: {app: victim}}
spec: {nodeName: node-1, containers: [{name: c, image: x}]}
"#;

/// iperf3's port, and the request/response echo's.
const IPERF: u16 = 5201;
const ECHO: u16 = 5202;
const PORT_BASE: &str = "19660";
const HTTP_PORT: u16 = 19661;

/// The servers admit the client (and `entries - 1` addresses that never send) on both ports.
fn big_policy(entries: u32) -> String {
    let mut blocks = String::new();
    for i in 0..entries.saturating_sub(1) {
        let a = Ipv4Addr::from(0x0a64_0000 + i);
        blocks.push_str(&format!("    - ipBlock: {{cidr: {a}/32}}\n"));
    }
    format!(
        r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: big, namespace: bench}}
spec:
  podSelector: {{matchLabels: {{app: server}}}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector: {{matchLabels: {{app: client}}}}
{blocks}    ports: [{{port: {IPERF}, protocol: TCP}}, {{port: {ECHO}, protocol: TCP}}]
"#
    )
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Hook {
    None,
    Tc,
    Xdp,
}

impl Hook {
    fn name(self) -> &'static str {
        match self {
            Hook::None => "none",
            Hook::Tc => "tc",
            Hook::Xdp => "xdp",
        }
    }
}

struct Lab {
    bulkhead: PathBuf,
    state: PathBuf,
    dir: PathBuf,
}

impl Lab {
    fn run(&self, a: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.bulkhead)
            .arg("lab")
            .arg("--state")
            .arg(&self.state)
            .args(a)
            .output()?;
        if !out.status.success() {
            bail!("lab {a:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    fn json(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&std::fs::read_to_string(
            self.state.join("lab.json"),
        )?)?)
    }

    /// (netns, first address) of a pod.
    fn pod(&self, key: &str) -> anyhow::Result<(String, Ipv4Addr)> {
        let j = self.json()?;
        let p = &j["pods"][key];
        Ok((
            p["netns"].as_str().context("pod netns")?.to_string(),
            p["ips"][0].as_str().context("pod address")?.parse()?,
        ))
    }

    /// Stops every agent and removes its pins: no Bulkhead program anywhere.
    fn remove_bulkhead(&self) -> anyhow::Result<()> {
        let j = self.json()?;
        for n in j["nodes"].as_array().context("nodes")? {
            if let Some(pid) = n["agent_pid"].as_u64() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let name = n["name"].as_str().context("node name")?;
            let netns = n["netns"].as_str().context("node netns")?;
            // `bhl<tag>-node-1` → `/sys/fs/bpf/bulkhead/lab<tag>-node-1` (cli/src/lab/state.rs).
            let pins = Path::new("/sys/fs/bpf/bulkhead")
                .join(format!("lab{}", netns.strip_prefix("bhl").unwrap_or(netns)));
            let out = Command::new(&self.bulkhead)
                .args(["agent", "reset", "--node", name, "--pin-dir"])
                .arg(&pins)
                .output()?;
            ensure!(
                out.status.success(),
                "agent reset {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Restarts the agents with the prefilter at `hook` and waits until every node realized
    /// its rule set.
    fn agents_at(&self, hook: Hook) -> anyhow::Result<()> {
        self.remove_bulkhead()?;
        let mut j = self.json()?;
        j["prefilter"] = serde_json::Value::String(hook.name().into());
        std::fs::write(self.state.join("lab.json"), serde_json::to_vec_pretty(&j)?)?;
        self.run(&["heal"])?;
        self.wait_realized()
    }

    fn wait_realized(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(nodes) = http_get(HTTP_PORT, "/api/nodes")
                .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
                .and_then(|v| v.as_array().cloned())
            {
                let done = nodes.iter().all(|n| {
                    n["connected"] == true
                        && n["version"].as_u64().is_some()
                        && n["version"] == n["realized"]
                });
                if done && !nodes.is_empty() {
                    return Ok(());
                }
            }
            ensure!(
                Instant::now() < deadline,
                "the agents did not realize their rule sets"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// Gbit/s of one iperf3 run from `client_ns` to `server`.
fn iperf(client_ns: &str, server_ns: &str, server: Ipv4Addr, seconds: u32) -> anyhow::Result<f64> {
    let mut srv = Command::new("ip")
        .args(["netns", "exec", server_ns, "iperf3", "-s", "-1", "-p"])
        .arg(IPERF.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start iperf3 -s (is iperf3 installed? `cargo xtask setup`)")?;
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("ip")
        .args(["netns", "exec", client_ns, "iperf3", "-J", "-c"])
        .arg(server.to_string())
        .args(["-p", &IPERF.to_string(), "-t", &seconds.to_string()])
        .output()?;
    let _ = srv.kill();
    let _ = srv.wait();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 said: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(e) = report["error"].as_str() {
        bail!("iperf3: {e}");
    }
    Ok(report
        .pointer("/end/sum_received/bits_per_second")
        .and_then(|v| v.as_f64())
        .context("iperf3 report lacks the received rate")?
        / 1e9)
}

/// Median and 99th percentile (µs) of `n` one-byte request/response round trips over one TCP
/// connection from `client_ns` to an echo in `server_ns`.
fn round_trips(
    client_ns: &str,
    server_ns: &str,
    server: Ipv4Addr,
    n: usize,
) -> anyhow::Result<(f64, f64)> {
    let listener = Netns::existing(server_ns).run(|| TcpListener::bind(("0.0.0.0", ECHO)))??;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 1];
        while s.read_exact(&mut b).is_ok() {
            s.write_all(&b)?;
        }
        Ok(())
    });
    let addr = SocketAddr::from((server, ECHO));
    let mut c = Netns::existing(client_ns)
        .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))??;
    c.set_nodelay(true)?;
    let mut times = Vec::with_capacity(n);
    let mut b = [7u8; 1];
    for _ in 0..n {
        let t = Instant::now();
        c.write_all(&b)?;
        c.read_exact(&mut b)?;
        times.push(t.elapsed());
    }
    drop(c);
    let _ = echo.join();
    times.sort();
    let at = |p: f64| times[((times.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    Ok((at(0.5), at(0.99)))
}

#[derive(Default, Clone, Copy)]
struct Sample {
    cross: f64,
    same: f64,
    rr_p50: f64,
    rr_p99: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.bulkhead.exists(),
        "{} not found: build it first (cargo build --release -p bulkhead)",
        args.bulkhead.display()
    );
    let dir = std::env::temp_dir().join(format!("bh-bench-crossnode-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let lab = Lab {
        bulkhead: args.bulkhead.clone(),
        state: dir.join("state"),
        dir: dir.clone(),
    };
    std::fs::write(dir.join("pods.yaml"), PODS)?;
    std::fs::write(dir.join("big.yaml"), big_policy(args.entries))?;
    lab.run(&[
        "up",
        "--port-base",
        PORT_BASE,
        "-f",
        &dir.join("pods.yaml").to_string_lossy(),
    ])?;
    let result = measure(&args, &lab);
    let _ = lab.run(&["down"]);
    let _ = std::fs::remove_dir_all(&lab.dir);
    result
}

fn measure(args: &Args, lab: &Lab) -> anyhow::Result<()> {
    let (client_ns, _) = lab.pod("bench/client")?;
    let (server_ns, server) = lab.pod("bench/server")?;
    let (local_ns, local) = lab.pod("bench/local")?;
    // Policy size outer, hook inner: the policy changes while agents run (a lab apply waits
    // for them to realize it).
    let setups: Vec<(Hook, bool)> = [false, true]
        .into_iter()
        .flat_map(|big| [Hook::None, Hook::Tc, Hook::Xdp].map(|h| (h, big)))
        .collect();
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); setups.len()];
    let mut policy = false;
    for round in 0..args.rounds {
        for (i, (hook, big)) in setups.iter().enumerate() {
            if *big != policy {
                lab.agents_at(Hook::Tc)?;
                let f = lab.dir.join("big.yaml");
                lab.run(&[
                    if *big { "apply" } else { "delete" },
                    "-f",
                    &f.to_string_lossy(),
                ])?;
                policy = *big;
            }
            match hook {
                Hook::None => lab.remove_bulkhead()?,
                h => lab.agents_at(*h)?,
            }
            let cross = iperf(&client_ns, &server_ns, server, args.seconds)?;
            let same = iperf(&client_ns, &local_ns, local, args.seconds)?;
            let (rr_p50, rr_p99) = round_trips(&client_ns, &server_ns, server, args.round_trips)?;
            let s = Sample {
                cross,
                same,
                rr_p50,
                rr_p99,
            };
            println!(
                "round {}/{} {:<5} {:>6} entries  cross-node {:>6.2} Gbit/s  same-node {:>6.2} Gbit/s  RR p50 {:>6.1} µs p99 {:>6.1} µs",
                round + 1,
                args.rounds,
                hook.name(),
                if *big { args.entries } else { 0 },
                s.cross,
                s.same,
                s.rr_p50,
                s.rr_p99
            );
            samples[i].push(s);
        }
    }
    if args.rounds == 0 {
        return flood(args, lab);
    }
    println!();
    println!(
        "median of {} rounds       cross-node  ratio   same-node  ratio   RR p50  ratio   RR p99",
        args.rounds
    );
    let base = |big: bool| {
        let i = setups
            .iter()
            .position(|s| *s == (Hook::None, big))
            .unwrap_or(0);
        let v = &samples[i];
        (
            median(v.iter().map(|s| s.cross).collect()),
            median(v.iter().map(|s| s.same).collect()),
            median(v.iter().map(|s| s.rr_p50).collect()),
        )
    };
    for (i, (hook, big)) in setups.iter().enumerate() {
        let v = &samples[i];
        let (c, s, r) = (
            median(v.iter().map(|s| s.cross).collect()),
            median(v.iter().map(|s| s.same).collect()),
            median(v.iter().map(|s| s.rr_p50).collect()),
        );
        let p99 = median(v.iter().map(|s| s.rr_p99).collect());
        let (bc, bs, br) = base(*big);
        println!(
            "{:<5} {:>6} entries   {:>7.2} Gbit/s {:>5.2}x  {:>6.2} Gbit/s {:>5.2}x  {:>6.1} µs {:>5.2}x  {:>6.1} µs",
            hook.name(),
            if *big { args.entries } else { 0 },
            c,
            c / bc,
            s,
            s / bs,
            r,
            r / br,
            p99
        );
    }
    if policy {
        lab.agents_at(Hook::Tc)?;
        lab.run(&["delete", "-f", &lab.dir.join("big.yaml").to_string_lossy()])?;
    }
    println!();
    flood(args, lab)
}

/// The prefilter's drops per second on node-2 for a flood from a quarantined address, per hook.
fn flood(args: &Args, lab: &Lab) -> anyhow::Result<()> {
    let (_, victim) = lab.pod("bench/victim")?;
    let (_, server) = lab.pod("bench/server")?;
    let out = Command::new(&lab.bulkhead)
        .args(["quarantine", "--lab"])
        .arg(&lab.state)
        .args(["bench/victim", "--reason", "flood benchmark"])
        .output()?;
    ensure!(
        out.status.success(),
        "quarantine: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = lab.json()?;
    let node1 = j["nodes"][0]["netns"]
        .as_str()
        .context("node-1 netns")?
        .to_string();
    let node2_metrics = j["nodes"][1]["metrics_port"]
        .as_u64()
        .context("metrics port")? as u16;
    // What sending alone costs: the same flood to an address node-1 routes into a veth whose
    // peer is down (built, routed, handed to the device and freed there; nothing crosses the
    // fabric). A blackhole route would refuse the send instead.
    let sink = Ipv4Addr::new(192, 0, 2, 1);
    let n1 = Netns::existing(&node1);
    n1.exec(&[
        "ip", "link", "add", "bhsink0", "type", "veth", "peer", "name", "bhsink1",
    ])?;
    n1.exec(&["ip", "link", "set", "bhsink0", "up"])?;
    n1.exec(&["ip", "route", "replace", "192.0.2.1/32", "dev", "bhsink0"])?;
    n1.exec(&[
        "ip",
        "neigh",
        "replace",
        "192.0.2.1",
        "lladdr",
        "02:00:00:00:00:01",
        "dev",
        "bhsink0",
        "nud",
        "permanent",
    ])?;
    let busy = CpuBusy::now()?;
    let sent = send_flood(
        &node1,
        victim,
        sink,
        Duration::from_secs(args.flood_seconds),
    )?;
    let send_ns = busy.ns_since()? / sent.max(1) as f64;
    let _ = n1.exec(&["ip", "link", "del", "bhsink0"]);
    ensure!(sent > 0, "the sink refused every packet");
    println!(
        "sending alone (node-1 drops it): {:>10.0} packets/s, {send_ns:.0} ns of CPU per packet",
        sent as f64 / args.flood_seconds as f64
    );
    for hook in [Hook::Tc, Hook::Xdp] {
        lab.agents_at(hook)?;
        let before = prefilter_drops(node2_metrics)?;
        let busy = CpuBusy::now()?;
        let sent = send_flood(
            &node1,
            victim,
            server,
            Duration::from_secs(args.flood_seconds),
        )?;
        // The counters are read at scrape time from the kernel: nothing to wait for but the
        // last packets in flight.
        std::thread::sleep(Duration::from_millis(200));
        let cpu_ns = busy.ns_since()?;
        let dropped = prefilter_drops(node2_metrics)? - before;
        let secs = args.flood_seconds as f64;
        // CPU per packet beyond sending it: the fabric and node-2 up to the drop.
        let drop_ns = (cpu_ns / sent.max(1) as f64 - send_ns).max(1.0);
        println!(
            "flood from a quarantined address, prefilter at {:<3}: sent {:>10.0} packets/s, node-2 dropped {:>10.0} packets/s ({:.0}% of sent); {:.0} ns of CPU per packet beyond sending, one core drops {:.2} M packets/s",
            hook.name(),
            sent as f64 / secs,
            dropped as f64 / secs,
            100.0 * dropped as f64 / sent.max(1) as f64,
            drop_ns,
            1e3 / drop_ns,
        );
    }
    Ok(())
}

/// The machine's busy CPU time (all CPUs, `/proc/stat`: everything but idle and iowait), to
/// cost a flood per packet whichever CPU and context (the sender's system call, soft
/// interrupts) did the work. Other load on the machine counts too: run it on a quiet machine.
struct CpuBusy(u64);

impl CpuBusy {
    fn read() -> anyhow::Result<u64> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let cpu = stat.lines().next().context("/proc/stat is empty")?;
        let fields: Vec<u64> = cpu
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        ensure!(fields.len() >= 5, "unexpected /proc/stat: {cpu}");
        // user nice system idle iowait irq softirq steal ...
        Ok(fields.iter().sum::<u64>() - fields[3] - fields[4])
    }

    fn now() -> anyhow::Result<CpuBusy> {
        Ok(CpuBusy(CpuBusy::read()?))
    }

    /// Busy CPU nanoseconds since `now`.
    fn ns_since(&self) -> anyhow::Result<f64> {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Ok((CpuBusy::read()? - self.0) as f64 * 1e9 / hz)
    }
}

/// The sum of node-2's `drop_prefilter` packet counters.
fn prefilter_drops(metrics_port: u16) -> anyhow::Result<u64> {
    let body = http_get(metrics_port, "/metrics").context("scrape node-2's agent")?;
    Ok(body
        .lines()
        .filter(|l| {
            l.starts_with("bulkhead_agent_packets_total") && l.contains("reason=\"drop_prefilter\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

/// UDP from node-1's own namespace with `source` (a quarantined pod's address, written into a
/// raw IPv4 header: the kernel routes a raw packet by its destination, whatever its source) to
/// `target`, as fast as one thread sends, for `duration`. Returns how many left.
fn send_flood(
    node_ns: &str,
    source: Ipv4Addr,
    target: Ipv4Addr,
    duration: Duration,
) -> anyhow::Result<u64> {
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = Netns::existing(node_ns)
        .run(|| unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) })?;
    ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor just returned by socket(2), owned from here on.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // IPv4 (20 bytes; the kernel fills in length and checksum) + UDP (8, checksum 0) + 36.
    let mut packet = [0u8; 64];
    packet[0] = 0x45;
    packet[8] = 64; // TTL
    packet[9] = libc::IPPROTO_UDP as u8;
    packet[12..16].copy_from_slice(&source.octets());
    packet[16..20].copy_from_slice(&target.octets());
    packet[20..22].copy_from_slice(&40000u16.to_be_bytes());
    packet[22..24].copy_from_slice(&9u16.to_be_bytes());
    packet[24..26].copy_from_slice(&44u16.to_be_bytes());
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(target.octets()),
        },
        sin_zero: [0; 8],
    };
    let (started, mut sent) = (Instant::now(), 0u64);
    while started.elapsed() < duration {
        for _ in 0..256 {
            // SAFETY: a valid buffer and address of the sizes given.
            let n = unsafe {
                libc::sendto(
                    raw,
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&to as *const libc::sockaddr_in).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if n > 0 {
                sent += 1;
            }
        }
    }
    Ok(sent)
}
