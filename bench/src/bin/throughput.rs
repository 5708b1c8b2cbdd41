//! TCP throughput with iperf3 over a veth between two network namespaces: no enforcement vs.
//! Bulkhead enforcing a 10,000-entry ingress policy vs. iptables with 10,000 non-matching rules
//! on the same path. Figures, not a test: run as root.
//!
//! `cargo run --release -p bulkhead-bench --bin throughput [-- --rounds 3 --seconds 5]`
//!
//! Every configuration gets its own, identically built pair of namespaces, so that switching
//! between them costs nothing and no state of one (a TCX link, a netfilter table) can leak into
//! another's measurement:
//! * `…-node`: `pod0` (10.210.0.1/24), the node side of the pod's veth, and the iperf3 client;
//! * `…-pod`: `eth0` (10.210.0.2/24), the pod, running a one-off iperf3 server per run.
//!
//! Configurations:
//! * `none`: nothing attached, no netfilter table in the namespaces.
//! * `bulkhead`: the agent library (`Dataplane` + `Enforcer`) attaches with TCX on `pod0`. The
//!   pod's ingress policy holds N entries, one per peer identity (TCP/5201), and only the last
//!   admits the client's identity; the ipcache maps the N peers' addresses (the client's among
//!   them) and the pod's. Client→server packets meet `bulkhead_to_pod` (the pod's ingress
//!   policy), the server's ACKs meet `bulkhead_from_pod` (its egress: no policy isolates it,
//!   and they are replies of a tracked connection anyway).
//! * `iptables`: in the node namespace, `OUTPUT -o pod0` jumps to a chain of N rules that do
//!   not match the client's address, then one that accepts it. No conntrack shortcut, so every
//!   client→server packet walks the whole chain: the set-up the issue measured before work began.
//!
//! Runs are interleaved (round r starts with a different configuration than round r-1) and each
//! configuration's median is compared with `none`, as is its best run. These machines are
//! shared, and a build running beside the benchmark halves a run at random: iperf3 runs at
//! nice -20 with client and server on separate CPUs, each run records the CPU pressure (the
//! share of time some task waited for a CPU, /proc/pressure/cpu), and runs above 20% are
//! marked busy and left out of the medians (unless a configuration has no other).
//!
//! Before measuring, a client at an address no entry admits must fail to connect through
//! Bulkhead; afterwards, the Bulkhead and iptables counters must show that the measured traffic
//! really went through them.
//!
//! Namespaces, pins, iptables rules (they live in the namespaces) and iperf3 processes are
//! removed when the benchmark ends, also on an error or Ctrl-C.

use std::{
    fmt::Write as _,
    io::{Read, Write as _},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use bulkhead_agent::{
    loader::{Dataplane, remove_pins},
    netns::{Netns, veth_pair},
    privileged::missing_privileges,
    sync::{ApplyReport, Enforcer, RouteResolver},
};
use bulkhead_common::reason;
use bulkhead_controller::ruleset::{
    Action, DirectionPolicy, Endpoint, EndpointPolicy, IpCacheEntry, PolicyEntry, PortRange,
    Protocol, RuleSet, Stage, Tier,
};
use clap::Parser;

const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 1);
const POD_ADDR: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 2);
/// A second node-side address that no policy entry admits: proves that Bulkhead is enforcing.
const STRANGER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 3);
const PORT: u16 = 5201;
const POD_ENDPOINT_ID: u32 = 1;
const POD_IDENTITY: u32 = 300;
const FIRST_PEER_IDENTITY: u32 = 1000;
const NODE_IFACE: &str = "pod0";
const POD_IFACE: &str = "eth0";
const CHAIN: &str = "BH-BENCH";

#[derive(Parser)]
struct Args {
    /// Rounds; each runs every configuration once, the median per configuration is reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Policy entries (Bulkhead) and non-matching rules (iptables).
    #[arg(long, default_value_t = 10_000)]
    entries: u32,
    /// Let the scheduler place client and server (by default, with two or more CPUs, the client
    /// runs on CPU 0 and the server on CPU 1: sharing one CPU halves a run's figure at random).
    #[arg(long)]
    no_affinity: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    None,
    Bulkhead,
    Iptables,
}

impl Setup {
    const ALL: [Setup; 3] = [Setup::None, Setup::Bulkhead, Setup::Iptables];

    fn short(self) -> &'static str {
        match self {
            Setup::None => "none",
            Setup::Bulkhead => "bulkhead",
            Setup::Iptables => "iptables",
        }
    }
}

/// Set by SIGINT/SIGTERM: the run stops at the next check and the guards clean up. The iperf3
/// children get the terminal's SIGINT too, which ends a run in progress with an error.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn catch_interrupts() -> anyhow::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &action) }.context("install signal handler")?;
    }
    Ok(())
}

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

/// A child process killed and reaped on drop.
struct Process {
    child: Child,
}

impl Process {
    /// Waits at most `limit` for the process to exit; `None` if it is still running.
    fn wait_for(&mut self, limit: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bpffs pin directory, removed (links first, so the programs detach, then maps) on drop.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = remove_pins(&self.0) {
            eprintln!(
                "warning: cannot remove pins under {}: {e}",
                self.0.display()
            );
        }
    }
}

/// Runs `argv` inside `ns`, feeding it `stdin`, and returns its stdout; killed after `limit`.
fn run_bounded(ns: &Netns, argv: &[&str], stdin: &[u8], limit: Duration) -> anyhow::Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.name()])
        .args(argv)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut process = Process {
        child: cmd.spawn().with_context(|| format!("spawn {}", argv[0]))?,
    };
    let mut input = process.child.stdin.take().context("stdin")?;
    let stdin = stdin.to_vec();
    let writer = thread::spawn(move || input.write_all(&stdin));
    let mut out = process.child.stdout.take().context("stdout")?;
    let reader = thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).map(|_| s)
    });
    let mut err = process.child.stderr.take().context("stderr")?;
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = process.wait_for(limit)?;
    // Killing the process (by dropping it) closes its pipes, so the threads below finish.
    drop(process);
    let stdout = reader
        .join()
        .map_err(|_| anyhow::anyhow!("stdout reader panicked"))?
        .context("read stdout")?;
    let stderr = err_reader.join().unwrap_or_default();
    let _ = writer.join();
    match status {
        None => bail!("`{}` did not finish within {limit:?}", argv.join(" ")),
        Some(s) if !s.success() && stdout.is_empty() => {
            bail!("`{}` failed ({s}): {}", argv.join(" "), stderr.trim())
        }
        // iperf3 -J reports its errors in the JSON on stdout: the caller reads them there.
        Some(_) => Ok(stdout),
    }
}

/// One pair of namespaces: node side (`pod0`, iperf3 client) ↔ pod (`eth0`, iperf3 server).
struct Topology {
    setup: Setup,
    node: Netns,
    pod: Netns,
    /// CPUs for the iperf3 client and server (`iperf3 -A`), if pinned.
    affinity: Option<(u32, u32)>,
}

impl Topology {
    fn build(setup: Setup, tag: u32, affinity: Option<(u32, u32)>) -> anyhow::Result<Topology> {
        let node = Netns::create(&format!("bh-tput-{tag}-{}-node", setup.short()))?;
        let pod = Netns::create(&format!("bh-tput-{tag}-{}-pod", setup.short()))?;
        // No IPv6: router solicitations and neighbour discovery would be judged (and counted)
        // by the pod's policy, blurring the check that only the stranger was refused.
        for ns in [&node, &pod] {
            for key in ["all", "default"] {
                ns.exec(&[
                    "sysctl",
                    "-qw",
                    &format!("net.ipv6.conf.{key}.disable_ipv6=1"),
                ])?;
            }
        }
        veth_pair(NODE_IFACE, Some(&node), POD_IFACE, Some(&pod))?;
        for (ns, iface, addr) in [(&node, NODE_IFACE, NODE_ADDR), (&pod, POD_IFACE, POD_ADDR)] {
            ns.exec(&["ip", "addr", "add", &format!("{addr}/24"), "dev", iface])?;
            ns.exec(&["ip", "link", "set", iface, "up"])?;
        }
        Ok(Topology {
            setup,
            node,
            pod,
            affinity,
        })
    }

    /// Starts a one-off iperf3 server in the pod and waits until it listens.
    fn start_server(&self) -> anyhow::Result<Process> {
        let port = PORT.to_string();
        let addr = POD_ADDR.to_string();
        let mut argv = vec![
            "nice", "-n", "-20", "iperf3", "-s", "-1", "-B", &addr, "-p", &port,
        ];
        let cpu = self.affinity.map(|(_, server)| server.to_string());
        if let Some(cpu) = &cpu {
            argv.extend(["-A", cpu]);
        }
        let child = Command::new("ip")
            .args(["netns", "exec", self.pod.name()])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn iperf3 server")?;
        let mut server = Process { child };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let listening = self
                .pod
                .exec(&["ss", "-Htln", "sport", "=", &format!(":{PORT}")])?;
            if !listening.trim().is_empty() {
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "iperf3 server in {} exited early: {status}",
                    self.pod.name()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "iperf3 server in {} does not listen after 5 s",
                self.pod.name()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs the iperf3 client in the node namespace (from `bind`, if given) and returns its JSON
    /// report, which carries `error` when the test failed.
    fn client(&self, bind: Option<Ipv4Addr>, seconds: u32) -> anyhow::Result<serde_json::Value> {
        let server = POD_ADDR.to_string();
        let port = PORT.to_string();
        let secs = seconds.to_string();
        let mut argv = vec![
            "nice",
            "-n",
            "-20",
            "iperf3",
            "-c",
            &server,
            "-p",
            &port,
            "-t",
            &secs,
            "-J",
            "--connect-timeout",
            "2000",
        ];
        let bind = bind.map(|a| a.to_string());
        if let Some(b) = &bind {
            argv.extend(["-B", b]);
        }
        let cpu = self.affinity.map(|(client, _)| client.to_string());
        if let Some(cpu) = &cpu {
            argv.extend(["-A", cpu]);
        }
        let limit = Duration::from_secs(u64::from(seconds) + 20);
        let out = run_bounded(&self.node, &argv, &[], limit)?;
        serde_json::from_str(&out).context("iperf3 client printed no JSON report")
    }

    /// One measurement: bits per second received by the server, and sender/receiver CPU %.
    fn measure(&self, seconds: u32) -> anyhow::Result<Run> {
        let mut server = self.start_server()?;
        let pressure_before = cpu_pressure_us();
        let started = Instant::now();
        let report = self.client(None, seconds)?;
        let elapsed = started.elapsed().as_secs_f64();
        let pressure_after = cpu_pressure_us();
        if let Some(e) = report.get("error") {
            bail!("iperf3 ({}): {e}", self.setup.short());
        }
        let number = |pointer: &str| {
            report
                .pointer(pointer)
                .and_then(serde_json::Value::as_f64)
                .with_context(|| format!("iperf3 report lacks {pointer}"))
        };
        let run = Run {
            bits_per_second: number("/end/sum_received/bits_per_second")?,
            cpu_sender: number("/end/cpu_utilization_percent/host_total")?,
            cpu_receiver: number("/end/cpu_utilization_percent/remote_total")?,
            stalled: match (pressure_before, pressure_after) {
                (Some(b), Some(a)) => Some(a.saturating_sub(b) as f64 / 1e6 / elapsed),
                _ => None,
            },
        };
        // The one-off server exits after its client; if not, dropping it kills it.
        let _ = server.wait_for(Duration::from_secs(5))?;
        Ok(run)
    }
}

/// Microseconds during which some runnable task waited for a CPU (pressure stall information).
fn cpu_pressure_us() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/pressure/cpu").ok()?;
    let some = text.lines().find(|l| l.starts_with("some "))?;
    some.split_whitespace()
        .find_map(|f| f.strip_prefix("total="))?
        .parse()
        .ok()
}

/// A run during which some task waited for a CPU longer than this share of the time is marked
/// busy: with client and server pinned to separate CPUs, waiting means other work competed.
const BUSY_STALL: f64 = 0.2;

#[derive(Debug, Clone, Copy)]
struct Run {
    bits_per_second: f64,
    cpu_sender: f64,
    cpu_receiver: f64,
    /// Share of the run during which some task waited for a CPU, if the kernel reports it.
    stalled: Option<f64>,
}

impl Run {
    fn busy(&self) -> bool {
        self.stalled.is_some_and(|s| s > BUSY_STALL)
    }
}

fn peer_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a40_0000 + i)
}

/// The pod's rule set: ingress isolated, `entries` entries, one per peer identity (TCP/5201);
/// the last one is the client's.
fn pod_ruleset(entries: u32) -> RuleSet {
    let client_identity = FIRST_PEER_IDENTITY + entries - 1;
    let policy = (0..entries)
        .map(|i| PolicyEntry {
            peer: FIRST_PEER_IDENTITY + i,
            protocol: Some(Protocol::Tcp),
            ports: PortRange::single(PORT),
            tier: Tier::Application,
            priority: 0,
            action: Action::Allow,
            stage: Stage::Enforced,
            rule: 10 + i,
        })
        .collect();
    let host = |ip: Ipv4Addr, identity| {
        IpCacheEntry::new(format!("{ip}/32").parse().expect("host cidr"), identity)
    };
    let mut ipcache: Vec<IpCacheEntry> = (0..entries - 1)
        .map(|i| host(peer_ip(i), FIRST_PEER_IDENTITY + i))
        .collect();
    ipcache.push(host(NODE_ADDR, client_identity));
    ipcache.push(host(POD_ADDR, POD_IDENTITY));
    RuleSet {
        node: "bench-throughput".into(),
        version: 1,
        endpoints: vec![Endpoint {
            id: POD_ENDPOINT_ID,
            namespace: "bench".into(),
            pod: "iperf3-server".into(),
            workload: None,
            identity: POD_IDENTITY,
            ips: vec![IpAddr::V4(POD_ADDR)],
            interface: Some(NODE_IFACE.into()),
            quarantined: false,
            policy: POD_IDENTITY,
        }],
        policies: [(
            POD_IDENTITY,
            EndpointPolicy {
                ingress: DirectionPolicy {
                    isolated_by: Some(1),
                    staged_isolated_by: Some(1),
                    entries: policy,
                },
                egress: DirectionPolicy::default(),
            },
        )]
        .into_iter()
        .collect(),
        ipcache,
        rules: Default::default(),
        names: Vec::new(),
        dns_resolvers: Vec::new(),
    }
}

/// Loads the programs and applies the pod's rule set from a thread in the node namespace, where
/// `pod0` is.
fn enforce_with_bulkhead(
    t: &Topology,
    pins: &Path,
    entries: u32,
) -> anyhow::Result<(Enforcer, ApplyReport)> {
    let ruleset = pod_ruleset(entries);
    let pin_dir = pins.to_path_buf();
    let (enforcer, report) = t
        .node
        .run(move || -> anyhow::Result<(Enforcer, ApplyReport)> {
            let dataplane = Dataplane::load(&pin_dir).context("load the eBPF object")?;
            let mut enforcer = Enforcer::new(dataplane).context("enforcer")?;
            let report = enforcer
                .apply(&ruleset, &RouteResolver)
                .context("apply the rule set")?;
            Ok((enforcer, report))
        })
        .context("enter the node namespace")??;
    ensure!(
        report.missing_interfaces.is_empty() && report.locked_down.is_empty(),
        "the pod's policy was not realized: {report:?}"
    );
    ensure!(report.endpoints_written == 1, "{report:?}");
    Ok((enforcer, report))
}

/// Packets and bytes the programs counted for the pod's endpoint under `why`, over all CPUs.
fn bulkhead_counter(enforcer: &mut Enforcer, why: u32) -> anyhow::Result<(u64, u64)> {
    let counters = enforcer.dataplane().counters()?;
    let per_cpu = counters
        .get(&(POD_ENDPOINT_ID * reason::COUNT + why), 0)
        .context("read COUNTERS")?;
    Ok(per_cpu
        .iter()
        .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes)))
}

/// A connection from an address that no entry admits must not get through.
fn check_stranger_refused(t: &Topology, enforcer: &mut Enforcer) -> anyhow::Result<()> {
    t.node.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{STRANGER_ADDR}/24"),
        "dev",
        NODE_IFACE,
    ])?;
    let (denied_before, _) = bulkhead_counter(enforcer, reason::DENIED_POLICY)?;
    // The server listens, so a failure here is the policy's drop, not a refused port.
    let _server = t.start_server()?;
    let report = t.client(Some(STRANGER_ADDR), 1)?;
    ensure!(
        report.get("error").is_some(),
        "a client at {STRANGER_ADDR}, which no entry admits, got through: Bulkhead is not enforcing"
    );
    let (denied_after, _) = bulkhead_counter(enforcer, reason::DENIED_POLICY)?;
    ensure!(
        denied_after > denied_before,
        "the stranger's connection failed, but not by a policy drop: {}",
        report["error"]
    );
    eprintln!(
        "check: {STRANGER_ADDR} (no entry admits it) cannot connect: {} SYN(s) denied by policy",
        denied_after - denied_before
    );
    Ok(())
}

/// Loads `entries` non-matching rules and a final ACCEPT for the client into a chain that
/// `OUTPUT -o pod0` jumps to, with one `iptables-restore`. Returns `iptables -V`, which names
/// the backend (nf_tables or legacy).
fn enforce_with_iptables(t: &Topology, entries: u32) -> anyhow::Result<String> {
    let version = t.node.exec(&["iptables", "-V"])?;
    let backend = if version.contains("nf_tables") {
        "nf_tables"
    } else if version.contains("legacy") {
        "legacy"
    } else {
        "unknown backend"
    };
    let mut rules = String::with_capacity(entries as usize * 64 + 256);
    rules.push_str("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    writeln!(rules, ":{CHAIN} - [0:0]")?;
    writeln!(rules, "-A OUTPUT -o {NODE_IFACE} -j {CHAIN}")?;
    for i in 0..entries {
        writeln!(
            rules,
            "-A {CHAIN} -s {}/32 -p tcp -m tcp --dport {PORT} -j ACCEPT",
            peer_ip(i)
        )?;
    }
    writeln!(
        rules,
        "-A {CHAIN} -s {NODE_ADDR}/32 -p tcp -m tcp --dport {PORT} -j ACCEPT"
    )?;
    rules.push_str("COMMIT\n");
    let started = Instant::now();
    run_bounded(
        &t.node,
        &["iptables-restore"],
        rules.as_bytes(),
        Duration::from_secs(120),
    )?;
    eprintln!(
        "iptables ({backend}): {} rules loaded with iptables-restore in {:.0} ms",
        entries + 1,
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(version.trim().to_string())
}

/// Packet and byte counters of rule `rulenum` of `chain` in the node namespace.
fn iptables_counter(t: &Topology, chain: &str, rulenum: u32) -> anyhow::Result<(u64, u64)> {
    let out = t.node.exec(&[
        "iptables",
        "-L",
        chain,
        &rulenum.to_string(),
        "-v",
        "-x",
        "-n",
    ])?;
    let mut fields = out.split_whitespace().map(str::parse::<u64>);
    match (fields.next(), fields.next()) {
        (Some(Ok(p)), Some(Ok(b))) => Ok((p, b)),
        _ => bail!("cannot read the counters of {chain} rule {rulenum} from {out:?}"),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.rounds > 0 && args.seconds > 0,
        "rounds and seconds must be positive"
    );
    ensure!(args.entries > 0, "at least one entry (the client's)");
    if let Some(why) = missing_privileges() {
        bail!("this benchmark creates namespaces and loads eBPF programs: {why}");
    }
    let iperf = Command::new("iperf3")
        .arg("--version")
        .output()
        .context("cannot run iperf3: install the `iperf3` package")?;
    let iperf = String::from_utf8_lossy(&iperf.stdout)
        .lines()
        .next()
        .unwrap_or("iperf3")
        .to_string();
    catch_interrupts()?;

    // Drop order (reverse of declaration) does the cleanup: enforcer, pins, then the namespaces
    // (with their veths and netfilter tables). Servers and clients never outlive a run.
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let affinity = (!args.no_affinity && cpus >= 2).then_some((0, 1));
    let tag = std::process::id();
    let mut topologies = Vec::new();
    for setup in Setup::ALL {
        topologies.push(Topology::build(setup, tag, affinity)?);
    }
    let topology = |s: Setup| &topologies[Setup::ALL.iter().position(|x| *x == s).expect("setup")];
    let pins = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/bulkhead-bench-throughput-{tag}"
    )));
    let _ = remove_pins(&pins.0);

    let (mut enforcer, report) =
        enforce_with_bulkhead(topology(Setup::Bulkhead), &pins.0, args.entries)?;
    eprintln!(
        "bulkhead: {} policy keys and {} ipcache entries applied in {:.0} ms, TCX on {NODE_IFACE}",
        report.policy_entries_written,
        args.entries + 1,
        report.duration.as_secs_f64() * 1e3
    );
    check_stranger_refused(topology(Setup::Bulkhead), &mut enforcer)?;
    let iptables = enforce_with_iptables(topology(Setup::Iptables), args.entries)?;
    let (allowed_new_before, _) = bulkhead_counter(&mut enforcer, reason::ALLOWED_NEW)?;

    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); Setup::ALL.len()];
    for round in 0..args.rounds {
        for k in 0..Setup::ALL.len() {
            check_interrupted()?;
            let i = (k + round) % Setup::ALL.len();
            let setup = Setup::ALL[i];
            let run = topology(setup).measure(args.seconds)?;
            eprintln!(
                "round {}/{} {:<9} {:6.2} Gbit/s (iperf3 cpu sender {:.0}%, receiver {:.0}%; \
                 cpu pressure {:.0}%)",
                round + 1,
                args.rounds,
                setup.short(),
                run.bits_per_second / 1e9,
                run.cpu_sender,
                run.cpu_receiver,
                run.stalled.unwrap_or(f64::NAN) * 100.0
            );
            runs[i].push(run);
        }
    }
    check_interrupted()?;

    // The traffic really went through each filter.
    let (allowed_new, _) = bulkhead_counter(&mut enforcer, reason::ALLOWED_NEW)?;
    let (tracked_packets, tracked_bytes) =
        bulkhead_counter(&mut enforcer, reason::ALLOWED_TRACKED)?;
    let new_connections = allowed_new - allowed_new_before;
    ensure!(
        new_connections >= 2 * args.rounds as u64,
        "Bulkhead admitted {new_connections} new connections, expected ≥ 2 per run (control + data)"
    );
    let ipt = topology(Setup::Iptables);
    let (jumped, _) = iptables_counter(ipt, "OUTPUT", 1)?;
    let (first_rule, _) = iptables_counter(ipt, CHAIN, 1)?;
    let (accepted, accepted_bytes) = iptables_counter(ipt, CHAIN, args.entries + 1)?;
    ensure!(
        jumped > 0 && accepted == jumped && first_rule == 0,
        "iptables counters do not show every packet walking the chain: \
         jumped {jumped}, first rule {first_rule}, final ACCEPT {accepted}"
    );

    let gbits = |r: &Run| r.bits_per_second / 1e9;
    // Other work on these shared machines only ever slows a run down. The median is taken over
    // the runs during which the rest of the machine stayed (nearly) idle, if every
    // configuration has one; else over all runs. The best run estimates what the path carries.
    let all_have_quiet = runs.iter().all(|r| r.iter().any(|x| !x.busy()));
    let medians: Vec<f64> = runs
        .iter()
        .map(|r| {
            median(
                r.iter()
                    .filter(|x| !all_have_quiet || !x.busy())
                    .map(gbits)
                    .collect(),
            )
        })
        .collect();
    let bests: Vec<f64> = runs
        .iter()
        .map(|r| r.iter().map(gbits).fold(0.0, f64::max))
        .collect();
    let n = args.entries;
    let labels = [
        "no enforcement".to_string(),
        format!("Bulkhead, {n} ingress entries (TCX)"),
        format!("iptables, {n} rules + ACCEPT (OUTPUT)"),
    ];
    let placement = match affinity {
        Some((c, s)) => format!("client on CPU {c}, server on CPU {s}"),
        None => "unpinned".to_string(),
    };
    println!(
        "\nTCP throughput, {iperf}, {} s per run, {} rounds interleaved, veth between two \
         namespaces, {placement} ({cpus} CPUs), nice -20; Gbit/s",
        args.seconds, args.rounds
    );
    println!(
        "{:<39} | {:>6} {:>6} | {:>6} {:>6} | {:>5} | runs in order (* = busy machine)",
        "configuration", "median", "×none", "best", "×none", "quiet"
    );
    for (i, label) in labels.iter().enumerate() {
        let each: Vec<String> = runs[i]
            .iter()
            .map(|r| format!("{:.2}{}", gbits(r), if r.busy() { "*" } else { "" }))
            .collect();
        let quiet = runs[i].iter().filter(|r| !r.busy()).count();
        println!(
            "{label:<39} | {:>6.2} {:>6.3} | {:>6.2} {:>6.3} | {:>2}/{:<2} | {}",
            medians[i],
            medians[i] / medians[0],
            bests[i],
            bests[i] / bests[0],
            quiet,
            runs[i].len(),
            each.join(" ")
        );
    }
    println!(
        "median over {}; busy = some task waited for a CPU during more than {:.0}% of the run \
         (/proc/pressure/cpu)",
        if all_have_quiet {
            "the quiet runs"
        } else {
            "all runs (some configuration had no quiet run: figures are disturbed)"
        },
        BUSY_STALL * 100.0
    );
    println!("iptables backend: {iptables}");
    println!(
        "bulkhead counters: {new_connections} new connections admitted by policy, \
         {tracked_packets} tracked packets ({} bytes on average, both directions)",
        tracked_bytes.checked_div(tracked_packets).unwrap_or(0)
    );
    // The time per client→server packet on the bottleneck, from the packet size iptables saw
    // (veth carries unsegmented GSO packets, so there are far fewer packets than MTU frames).
    if accepted > 0 {
        let size = accepted_bytes as f64 / accepted as f64;
        // Throughputs in Gbit/s: bits / (Gbit/s) = ns.
        let per_packet_ns = |gbps: f64| size * 8.0 / gbps;
        let base = per_packet_ns(bests[0]);
        let ipt_extra = per_packet_ns(bests[2]) - base;
        println!(
            "iptables counters: {accepted} packets walked all {n} rules to the final ACCEPT \
             ({size:.0} bytes on average)"
        );
        println!(
            "time per client→server packet of that size, best runs: none {:.0} ns, Bulkhead {:+.0} ns, \
             iptables {:+.0} ns (≈ {:.1} ns per rule)",
            base,
            per_packet_ns(bests[1]) - base,
            ipt_extra,
            ipt_extra / f64::from(n + 1)
        );
    }
    Ok(())
}
