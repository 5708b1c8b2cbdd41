//! Rule-set distribution at scale: one controller (the real hub and gRPC service) and 1,000
//! simulated agents (lightweight gRPC clients that follow their node's stream and ack as they
//! receive) on loopback, over Antrea's 100k-pod scenario. Measures the time from a policy edit,
//! a pod relabel and a quarantine to the last affected agent having it.
//!
//! `cargo run --release -p bulkhead-bench --bin distribution [-- --samples 200]`
//!
//! The simulated agents run in a child process (this binary again, with `--agents-for`), so the
//! controller's CPU and memory are measured apart from theirs; `--agents-in-process` runs them
//! beside the controller as earlier versions of this benchmark did. Times cross the two
//! processes as CLOCK_MONOTONIC readings, which every process on the machine shares.
//!
//! Plaintext gRPC on loopback: mTLS costs a handshake per connection, not per delta.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use bulkhead_bench::{Rng, small_namespaces};
use bulkhead_controller::{
    Change, EngineConfig, Object, PolicyEngine,
    distribution::{DistributionService, FlowStore, Hub},
    model::PortSpec,
    ruleset::{PortRange, Protocol},
};
use bulkhead_proto::follower::{Follower, run_session};
use clap::Parser;
use tokio::sync::mpsc;

#[derive(Parser)]
struct Args {
    /// Changes measured per kind.
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// Namespaces in the scenario (4 pods each).
    #[arg(long, default_value_t = 25_000)]
    namespaces: usize,
    #[arg(long, default_value_t = 1_000)]
    nodes: usize,
    /// Run the simulated agents in this process (as before agents had their own process); the
    /// process figures then include them.
    #[arg(long)]
    agents_in_process: bool,
    /// Internal: be the agents' process. Follows the nodes named on stdin (one a line) from the
    /// controller at this address and prints `node version monotonic-ns` per realized rule set.
    #[arg(long, hide = true)]
    agents_for: Option<String>,
}

/// CLOCK_MONOTONIC now: comparable between the controller's and the agents' processes.
fn monotonic() -> Duration {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime fills the struct we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// (CPU seconds, RSS KiB, peak RSS KiB) of another process, from /proc.
fn process_usage(pid: u32) -> (f64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the state.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = (ticks(11) + ticks(12)) as f64 / hz;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (cpu, field("VmRSS:"), field("VmHWM:"))
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn cpu_seconds() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// The hub's CPU time in the engine, the fan-out and its own copies, in nanoseconds so far.
fn hub_parts(hub: &Hub) -> [u64; 3] {
    use std::sync::atomic::Ordering::Relaxed;
    let c = &hub.counters;
    [
        c.engine_nanos.load(Relaxed),
        c.fanout_nanos.load(Relaxed),
        c.copies_nanos.load(Relaxed),
    ]
}

/// (node, version, when the agent had it, as a CLOCK_MONOTONIC reading)
type Seen = (String, u64, Duration);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.agents_for.clone() {
        Some(addr) => rt.block_on(agents_process(addr)),
        None => rt.block_on(run(args)),
    }
}

/// One simulated agent per node: the agent's own protocol follower (decode, continuity check,
/// delta applied to the full rule set, then ack), reporting each rule set it realizes.
fn spawn_agents(
    addr: &str,
    nodes: Vec<String>,
    tx: mpsc::UnboundedSender<Seen>,
) -> anyhow::Result<()> {
    for node in nodes {
        let tx = tx.clone();
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?;
        tokio::spawn(async move {
            let mut follower = Follower::new(&node);
            loop {
                let Ok(channel) = endpoint.connect().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let _ = run_session(
                    channel,
                    &mut follower,
                    |rs| {
                        let _ = tx.send((rs.node.clone(), rs.version, monotonic()));
                        async { Ok(Default::default()) }
                    },
                    || {},
                )
                .await;
            }
        });
    }
    Ok(())
}

/// The agents' process: nodes from stdin, what they realized to stdout.
///
/// The lines are written by a thread of their own, not by a task of the agents' runtime: a
/// blocking write to a full pipe would stall one of the runtime's workers, and with it the
/// agents queued on it (the time an agent realized a version is read before it is reported, so
/// batching the reports changes no figure).
async fn agents_process(addr: String) -> anyhow::Result<()> {
    use std::io::{BufRead, Write};
    let nodes: Vec<String> = std::io::stdin()
        .lock()
        .lines()
        .collect::<Result<_, _>>()
        .context("node names on stdin")?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Seen>();
    spawn_agents(&addr, nodes, tx)?;
    let writer = std::thread::Builder::new()
        .name("bench-agents-writer".into())
        .spawn(move || -> std::io::Result<()> {
            let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
            while let Some((node, version, at)) = rx.blocking_recv() {
                writeln!(out, "{node} {version} {}", at.as_nanos())?;
                // Flush when nothing else is waiting: batches under load, prompt when idle.
                if rx.is_empty() {
                    out.flush()?;
                }
            }
            Ok(())
        })?;
    tokio::task::spawn_blocking(move || writer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the agents' writer thread panicked"))??;
    Ok(())
}

/// The agents' process, stopped when the benchmark ends (or fails).
struct AgentsProcess(std::process::Child);

impl Drop for AgentsProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the agents' process for `nodes`; what they realize arrives on `tx`.
fn agents_child(
    addr: &str,
    nodes: &[String],
    tx: mpsc::UnboundedSender<Seen>,
) -> anyhow::Result<AgentsProcess> {
    use std::io::{BufRead, Write};
    let child = std::process::Command::new(std::env::current_exe()?)
        .args(["--agents-for", addr])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("start the agents' process")?;
    let mut child = AgentsProcess(child);
    let mut stdin = child.0.stdin.take().context("agents' stdin")?;
    for n in nodes {
        writeln!(stdin, "{n}")?;
    }
    drop(stdin);
    let stdout = child.0.stdout.take().context("agents' stdout")?;
    // Room for a whole fan-out's reports (5,000 lines of ~40 bytes), so the agents' writer
    // rarely waits for this reader; where the kernel refuses, the default pipe still works.
    {
        use std::os::fd::AsRawFd;
        // SAFETY: F_SETPIPE_SZ on a pipe we own; failure leaves the pipe as it was.
        unsafe { libc::fcntl(stdout.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
    }
    std::thread::Builder::new()
        .name("bench-agents-reader".into())
        .spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let mut f = line.split(' ');
                let (Some(node), Some(version), Some(at)) = (f.next(), f.next(), f.next()) else {
                    continue;
                };
                let (Ok(version), Ok(at)) = (version.parse::<u64>(), at.parse::<u64>()) else {
                    continue;
                };
                if tx
                    .send((node.to_string(), version, Duration::from_nanos(at)))
                    .is_err()
                {
                    return;
                }
            }
        })?;
    Ok(child)
}

async fn run(args: Args) -> anyhow::Result<()> {
    println!(
        "distribution: {} namespaces × 4 pods on {} nodes, {} simulated agents, {} CPUs",
        args.namespaces,
        args.nodes,
        args.nodes,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let objects = small_namespaces(args.namespaces, args.nodes, 7);
    let policies: Vec<bulkhead_controller::Policy> = objects
        .iter()
        .filter_map(|o| match o {
            Object::Policy(p) if p.key.name == "np-1" => Some(p.clone()),
            _ => None,
        })
        .collect();
    let pods: Vec<bulkhead_controller::Pod> = objects
        .iter()
        .filter_map(|o| match o {
            Object::Pod(p) => Some(p.clone()),
            _ => None,
        })
        .collect();
    let started = Instant::now();
    let cpu_started = cpu_seconds();
    let engine = PolicyEngine::new(EngineConfig::default(), objects).context("compile")?;
    let engine_built = started.elapsed().as_secs_f64();
    let hub = Arc::new(Hub::new(engine));
    println!(
        "compiled in {:.2} s (the engine {:.2} s, every node's rule set for the hub {:.2} s; CPU {:.2} s)",
        started.elapsed().as_secs_f64(),
        engine_built,
        started.elapsed().as_secs_f64() - engine_built,
        cpu_seconds() - cpu_started
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let service = DistributionService::new(hub.clone(), Arc::new(Mutex::new(FlowStore::new(1024))));
    // Accepted sockets without Nagle's delay, as the controller's own acceptor sets them
    // (controller/src/server/tls.rs) and tonic's when it binds itself.
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |s| {
            if let Ok(s) = &s {
                let _ = s.set_nodelay(true);
            }
            s
        },
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service.into_server())
            .serve_with_incoming(incoming),
    );

    // One agent per node, each following its node and reporting what it received.
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Seen>();
    let nodes = hub.node_states();
    let names: Vec<String> = nodes.iter().map(|n| n.node.clone()).collect();
    let connect_started = Instant::now();
    let child = if args.agents_in_process {
        spawn_agents(&addr.to_string(), names, seen_tx)?;
        None
    } else {
        Some(agents_child(&addr.to_string(), &names, seen_tx)?)
    };
    let mut have: HashMap<String, u64> = HashMap::new();
    while have.len() < nodes.len() {
        let (node, version, _) = seen_rx.recv().await.context("agents")?;
        have.insert(node, version);
    }
    println!(
        "{} agents connected and realized their snapshots in {:.2} s ({})",
        nodes.len(),
        connect_started.elapsed().as_secs_f64(),
        if child.is_some() {
            "agents in their own process"
        } else {
            "agents in the controller's process"
        }
    );
    let agents_before = child.as_ref().map(|c| process_usage(c.0.id()));

    let mut rng = Rng::new(11);
    let rss_before = rss_kib("VmRSS:");
    let cpu_before = cpu_seconds();
    let wall_before = Instant::now();
    let mut results: Vec<(&str, Vec<Duration>, usize)> = Vec::new();
    // Quarantines alternate: odd samples release the pod the even sample quarantined.
    let mut quarantined: Option<bulkhead_controller::PolicyKey> = None;
    for kind in ["policy edit", "pod relabel", "quarantine"] {
        let mut latencies = Vec::new();
        let mut apply_times = Vec::new();
        // For quarantines: (is a release, latency) of each sample.
        let mut by_action: Vec<(bool, Duration)> = Vec::new();
        let parts_before = hub_parts(&hub);
        let mut affected_total = 0;
        for i in 0..args.samples {
            let change = if kind == "policy edit" {
                let mut p = policies[rng.below(policies.len())].clone();
                // Alternate the admitted port so every edit is a real change.
                for r in &mut p.rules {
                    r.ports = vec![PortSpec::Range {
                        protocol: Some(Protocol::Tcp),
                        ports: PortRange::single(if i % 2 == 0 { 8080 } else { 80 }),
                    }];
                }
                Change::UpsertPolicy(p)
            } else if kind == "pod relabel" {
                let mut p = pods[rng.below(pods.len())].clone();
                p.labels.insert("canary".into(), format!("{}", i % 2));
                Change::UpsertPod(p)
            } else if let Some(key) = quarantined.take() {
                Change::DeletePolicy(key)
            } else {
                // Every node learns the quarantined address (for its XDP prefilter): the widest
                // delta there is.
                let p = &pods[rng.below(pods.len())];
                let yaml = format!(
                    "apiVersion: bulkhead.dev/v1alpha1\nkind: Quarantine\nmetadata: {{name: q, namespace: {}}}\nspec: {{pods: [{}], reason: bench}}\n",
                    p.namespace, p.name
                );
                let loaded =
                    bulkhead_controller::load_str(std::path::Path::new("bench.yaml"), &yaml);
                anyhow::ensure!(
                    loaded.errors.is_empty(),
                    "quarantine manifest: {:?}",
                    loaded.errors
                );
                let Some(Object::Policy(q)) = loaded.objects.into_iter().next() else {
                    anyhow::bail!("the quarantine manifest yielded no policy");
                };
                quarantined = Some(q.key.clone());
                Change::UpsertPolicy(q)
            };
            let priority = kind == "quarantine";
            let t0 = Instant::now();
            let t0_mono = monotonic();
            let deltas = {
                let hub = hub.clone();
                tokio::task::spawn_blocking(move || hub.apply(vec![change], priority)).await??
            };
            apply_times.push(t0.elapsed());
            let mut waiting: HashMap<String, u64> =
                deltas.iter().map(|d| (d.node.clone(), d.version)).collect();
            affected_total += waiting.len();
            let mut last = t0_mono;
            let deadline = Instant::now() + Duration::from_secs(10);
            while !waiting.is_empty() {
                let Ok(Some((node, version, at))) =
                    tokio::time::timeout_at(deadline.into(), seen_rx.recv()).await
                else {
                    anyhow::bail!(
                        "{} agents did not receive their delta within 10 s",
                        waiting.len()
                    );
                };
                if waiting.get(&node).is_some_and(|v| version >= *v) {
                    waiting.remove(&node);
                    last = last.max(at);
                }
            }
            if !deltas.is_empty() {
                latencies.push(last.saturating_sub(t0_mono));
                by_action.push((i % 2 == 1, last.saturating_sub(t0_mono)));
            }
        }
        let mut a = apply_times;
        println!(
            "{kind}: controller-side apply (engine + deltas + queueing) p50 {:.2} ms, p99 {:.2} ms",
            percentile(&mut a, 0.5).as_secs_f64() * 1e3,
            percentile(&mut a, 0.99).as_secs_f64() * 1e3
        );
        if kind == "quarantine" {
            for (release, what) in [(false, "quarantines"), (true, "releases")] {
                let mut l: Vec<Duration> = by_action
                    .iter()
                    .filter(|(r, _)| *r == release)
                    .map(|(_, d)| *d)
                    .collect();
                if !l.is_empty() {
                    println!(
                        "quarantine: {what} alone to every node p50 {:.2} ms, p99 {:.2} ms ({} samples)",
                        percentile(&mut l, 0.5).as_secs_f64() * 1e3,
                        percentile(&mut l, 0.99).as_secs_f64() * 1e3,
                        l.len()
                    );
                }
            }
        }
        let parts = hub_parts(&hub);
        let per_change = |i: usize| (parts[i] - parts_before[i]) as f64 / 1e6 / args.samples as f64;
        println!(
            "{kind}: CPU per change (mean), the engine {:.2} ms, encoding and queueing the deltas {:.2} ms, the hub's own rule-set copies {:.2} ms",
            per_change(0),
            per_change(1),
            per_change(2)
        );
        results.push((kind, latencies, affected_total));
    }
    let wall = wall_before.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    println!(
        "\n{:<12} | {:>7} | {:>9} | {:>9} | {:>9} | {:>14}",
        "change", "samples", "p50", "p99", "max", "nodes/change"
    );
    for (kind, mut l, affected) in results {
        if l.is_empty() {
            println!("{kind:<12} | no change reached any node");
            continue;
        }
        let n = l.len();
        let p50 = percentile(&mut l, 0.5);
        let p99 = percentile(&mut l, 0.99);
        let max = percentile(&mut l, 1.0);
        println!(
            "{kind:<12} | {n:>7} | {:>7.2}ms | {:>7.2}ms | {:>7.2}ms | {:>14.1}   (p99 / 200 ms target = {:.3})",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3,
            affected as f64 / n as f64,
            p99.as_secs_f64() * 1e3 / 200.0
        );
    }
    let rss = rss_kib("VmRSS:");
    let peak = rss_kib("VmHWM:");
    match (&child, agents_before) {
        (Some(c), Some((agents_cpu_before, agents_rss_before, _))) => {
            let (agents_cpu, agents_rss, agents_peak) = process_usage(c.0.id());
            println!(
                "\ncontroller process (hub, engine, gRPC service; the benchmark's driver and its copy of the scenario): RSS {} MiB (peak {} MiB; {} MiB before the changes); CPU {:.2} s over {:.2} s wall ({:.0}% of one core)",
                rss / 1024,
                peak / 1024,
                rss_before / 1024,
                cpu,
                wall,
                cpu / wall * 100.0
            );
            println!(
                "agents' process ({} simulated agents): RSS {} MiB (peak {} MiB; {} MiB before the changes); CPU {:.2} s over the same wall ({:.0}% of one core)",
                nodes.len(),
                agents_rss / 1024,
                agents_peak / 1024,
                agents_rss_before / 1024,
                agents_cpu - agents_cpu_before,
                (agents_cpu - agents_cpu_before) / wall * 100.0
            );
        }
        _ => println!(
            "\nprocess (controller + {} agents): RSS {} MiB (peak {} MiB; {} MiB before the changes); CPU {:.2} s over {:.2} s wall ({:.0}% of one core)",
            nodes.len(),
            rss / 1024,
            peak / 1024,
            rss_before / 1024,
            cpu,
            wall,
            cpu / wall * 100.0
        ),
    }
    Ok(())
}
