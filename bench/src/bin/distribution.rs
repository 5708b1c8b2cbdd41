//! Rule-set distribution at scale: one controller (the real hub and gRPC service) and 1,000
//! simulated agents (lightweight gRPC clients in this process that follow their node's stream
//! and ack as they receive) on loopback, over Antrea's 100k-pod scenario. Measures the time
//! from a policy edit, and from a pod relabel, to the last affected agent's ack.
//!
//! `cargo run --release -p bulkhead-bench --bin distribution [-- --samples 200]`
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

/// (node, version, when the agent had it)
type Seen = (String, u64, Instant);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
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
    let engine = PolicyEngine::new(EngineConfig::default(), objects).context("compile")?;
    let hub = Arc::new(Hub::new(engine));
    println!("compiled in {:.2} s", started.elapsed().as_secs_f64());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let service = DistributionService::new(hub.clone(), Arc::new(Mutex::new(FlowStore::new(1024))));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service.into_server())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    // 1,000 agents, each following its node and reporting what it received.
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Seen>();
    let nodes = hub.node_states();
    let connect_started = Instant::now();
    for n in &nodes {
        let node = n.node.clone();
        let tx = seen_tx.clone();
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
                        let _ = tx.send((rs.node.clone(), rs.version, Instant::now()));
                        async { Ok(Default::default()) }
                    },
                    || {},
                )
                .await;
            }
        });
    }
    let mut have: HashMap<String, u64> = HashMap::new();
    while have.len() < nodes.len() {
        let (node, version, _) = seen_rx.recv().await.context("agents")?;
        have.insert(node, version);
    }
    println!(
        "{} agents connected and realized their snapshots in {:.2} s",
        nodes.len(),
        connect_started.elapsed().as_secs_f64()
    );

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
            let deltas = {
                let hub = hub.clone();
                tokio::task::spawn_blocking(move || hub.apply(vec![change], priority)).await??
            };
            apply_times.push(t0.elapsed());
            let mut waiting: HashMap<String, u64> =
                deltas.iter().map(|d| (d.node.clone(), d.version)).collect();
            affected_total += waiting.len();
            let mut last = t0;
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
                latencies.push(last - t0);
            }
        }
        let mut a = apply_times;
        println!(
            "{kind}: controller-side apply (engine + deltas + queueing) p50 {:.2} ms, p99 {:.2} ms",
            percentile(&mut a, 0.5).as_secs_f64() * 1e3,
            percentile(&mut a, 0.99).as_secs_f64() * 1e3
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
    println!(
        "\nprocess (controller + 1,000 agents): RSS {} MiB (peak {} MiB; {} MiB before the changes); CPU {:.2} s over {:.2} s wall ({:.0}% of one core)",
        rss_kib("VmRSS:") / 1024,
        rss_kib("VmHWM:") / 1024,
        rss_before / 1024,
        cpu,
        wall,
        cpu / wall * 100.0
    );
    Ok(())
}
