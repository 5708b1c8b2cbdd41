//! The agent → controller flow pipeline at scale: simulated agents stream synthetic flow records
//! over real gRPC on loopback (`Distribution.ReportFlows`, plaintext) into the controller's real
//! ingest path — the `FlowPipeline` behind `bulkhead controller`: every batch folded into the
//! service graph (with the counters behind its metrics) and kept in the bounded store — while a
//! scraper reads the metric counters every second, as `/metrics` does.
//!
//! Reports flow events ingested per second of controller CPU (the CPU clocks of the
//! controller's own runtime threads: gRPC, HTTP/2, decoding, graph, store, scrapes), the loss
//! accounting (generated = accepted + dropped and reported by agents; accepted = stored +
//! evicted), and the time to serve the service graph of 10,000 workloads (`/api/graph`: build
//! and serialise the JSON; `Admin.GetGraph` over gRPC).
//!
//! `cargo run --release -p bulkhead-bench --bin flows_ingest [-- --seconds 5 --agents 8]`
//! `--rate N` offers N events/s in total instead of as many as the controller takes; agents then
//! drop (and report) what their bounded queues cannot hold, like the real agent.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use bulkhead_bench::{Rng, node_name, pod, pod_ip};
use bulkhead_controller::{
    EngineConfig, Object, PolicyEngine,
    distribution::{AdminService, DistributionService, FlowStore, Hub},
    flows::{
        FlowPipeline, ServiceGraph, check_record,
        history::{FlowHistory, HistoryConfig},
    },
    model::{Namespace, Node},
    ruleset::{
        Direction, EndpointRef, FlowKind, FlowReason, FlowRecord, FlowRule, FlowVerdict, PodKey,
        RuleKind, RuleRef,
    },
};
use bulkhead_proto::prost::{self, Message};
use bulkhead_proto::v1 as pb;
use clap::Parser;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

#[derive(Parser)]
struct Args {
    /// Workloads (Deployments) in the cluster.
    #[arg(long, default_value_t = 10_000)]
    workloads: usize,
    /// Pods per workload.
    #[arg(long, default_value_t = 2)]
    pods_per_workload: usize,
    /// Workloads per namespace.
    #[arg(long, default_value_t = 20)]
    workloads_per_namespace: usize,
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Peers each workload talks to.
    #[arg(long, default_value_t = 4)]
    peers: usize,
    /// Simulated agents (one ReportFlows stream each).
    #[arg(long, default_value_t = 8)]
    agents: usize,
    /// Records per batch (the agent sends 512).
    #[arg(long, default_value_t = 512)]
    batch: usize,
    /// Ingest phase length.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Events/s offered in total; 0: as many as the controller takes (agents wait on gRPC
    /// flow control, nothing is dropped).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// The controller's flow store capacity (the controller's default).
    #[arg(long, default_value_t = 100_000)]
    store: usize,
    /// Worker threads of the controller's runtime.
    #[arg(long, default_value_t = 1)]
    controller_threads: usize,
    /// Graph serving samples.
    #[arg(long, default_value_t = 50)]
    graph_samples: usize,
    /// Keep a flow history in this directory (the controller's --flow-history; removed first
    /// and at the end): persistence on.
    #[arg(long)]
    history: Option<std::path::PathBuf>,
}

/// CPU time of a runtime's threads: each thread's CPU clock, read while it lives, plus what
/// threads that ended had used.
#[derive(Default)]
struct ThreadCpu {
    clocks: Mutex<Vec<libc::clockid_t>>,
    retired_nanos: AtomicU64,
}

fn clock_nanos(clock: libc::clockid_t) -> Option<u64> {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime fills the struct we own; a clock of an ended thread fails.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    (rc == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

impl ThreadCpu {
    fn register(&self) {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: asks for the CPU clock of the calling thread.
        if unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) } == 0
            && let Ok(mut c) = self.clocks.lock()
        {
            c.push(clock);
        }
    }

    fn retire(&self) {
        if let Some(n) = clock_nanos(libc::CLOCK_THREAD_CPUTIME_ID) {
            self.retired_nanos.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn seconds(&self) -> f64 {
        let live: u64 = self
            .clocks
            .lock()
            .map(|c| c.iter().filter_map(|c| clock_nanos(*c)).sum())
            .unwrap_or(0);
        (live + self.retired_nanos.load(Ordering::Relaxed)) as f64 / 1e9
    }
}

fn process_cpu_seconds() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn runtime(
    name: &str,
    threads: usize,
    cpu: Arc<ThreadCpu>,
) -> anyhow::Result<tokio::runtime::Runtime> {
    let stop = cpu.clone();
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name(name)
        .thread_keep_alive(Duration::from_secs(3600))
        .on_thread_start(move || cpu.register())
        .on_thread_stop(move || stop.retire())
        .enable_all()
        .build()?)
}

/// A batch as an agent sends it, its records encoded once up front so the simulated agents
/// spend their CPU on the wire, not on building records: protobuf fields concatenate, so
/// node + records + dropped is a valid `FlowBatch`.
#[derive(Clone)]
struct EncodedBatch {
    node: Arc<Vec<u8>>,
    records: Arc<Vec<u8>>,
    dropped: u64,
}

struct BatchEncoder;

impl Encoder for BatchEncoder {
    type Item = EncodedBatch;
    type Error = tonic::Status;
    fn encode(&mut self, b: EncodedBatch, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&b.node);
        dst.put_slice(&b.records);
        if b.dropped > 0 {
            prost::encoding::uint64::encode(3, &b.dropped, dst);
        }
        Ok(())
    }
}

struct SummaryDecoder;

impl Decoder for SummaryDecoder {
    type Item = pb::FlowReportSummary;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut DecodeBuf<'_>,
    ) -> Result<Option<pb::FlowReportSummary>, tonic::Status> {
        pb::FlowReportSummary::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

struct ReportCodec;

impl Codec for ReportCodec {
    type Encode = EncodedBatch;
    type Decode = pb::FlowReportSummary;
    type Encoder = BatchEncoder;
    type Decoder = SummaryDecoder;
    fn encoder(&mut self) -> BatchEncoder {
        BatchEncoder
    }
    fn decoder(&mut self) -> SummaryDecoder {
        SummaryDecoder
    }
}

struct Deployment {
    namespace: String,
    name: String,
    /// (pod name, address)
    pods: Vec<(String, IpAddr)>,
}

struct Cluster {
    objects: Vec<Object>,
    workloads: Vec<Deployment>,
}

fn cluster(a: &Args) -> Cluster {
    let mut rng = Rng::new(17);
    let mut objects = Vec::new();
    for n in 0..a.nodes {
        objects.push(Object::Node(Node {
            name: node_name(n),
            labels: BTreeMap::new(),
            addresses: Vec::new(),
        }));
    }
    let mut workloads = Vec::with_capacity(a.workloads);
    let mut ip = 0;
    for w in 0..a.workloads {
        let ns = format!("ns-{:04}", w / a.workloads_per_namespace.max(1));
        if w % a.workloads_per_namespace.max(1) == 0 {
            objects.push(Object::Namespace(Namespace {
                name: ns.clone(),
                labels: BTreeMap::new(),
            }));
        }
        let name = format!("app-{w:05}");
        let mut pods = Vec::new();
        for p in 0..a.pods_per_workload {
            let pod_name = format!("{name}-{p}");
            let mut labels = BTreeMap::new();
            labels.insert("app".to_string(), name.clone());
            let mut obj = pod(
                &ns,
                &pod_name,
                labels,
                node_name(rng.below(a.nodes)),
                pod_ip(ip),
            );
            obj.workload = Some(format!("Deployment/{name}"));
            pods.push((pod_name, pod_ip(ip)));
            objects.push(Object::Pod(obj));
            ip += 1;
        }
        workloads.push(Deployment {
            namespace: ns,
            name,
            pods,
        });
    }
    Cluster { objects, workloads }
}

/// Pre-encoded batches: each workload talks to `peers` others (and now and then to the
/// internet), on one port each; a connection between pods is reported by both ends.
fn batches(a: &Args, c: &Cluster, count: usize) -> (Vec<Arc<Vec<u8>>>, u64) {
    let mut rng = Rng::new(23);
    let ports = [80u32, 443, 8080, 5432, 6379];
    let talks: Vec<Vec<(usize, u32)>> = (0..c.workloads.len())
        .map(|_| {
            (0..a.peers)
                .map(|_| (rng.below(c.workloads.len()), ports[rng.below(ports.len())]))
                .collect()
        })
        .collect();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut out = Vec::with_capacity(count);
    let mut total = 0u64;
    for b in 0..count {
        let mut records = Vec::with_capacity(a.batch);
        while records.len() < a.batch {
            let w = rng.below(c.workloads.len());
            let Deployment {
                namespace: src_ns,
                pods: src_pods,
                ..
            } = &c.workloads[w];
            let (src_pod, src_ip) = &src_pods[rng.below(src_pods.len())];
            let src_pod = PodKey {
                namespace: src_ns.clone(),
                name: src_pod.clone(),
            };
            let roll = rng.below(100);
            let time = now + (b * a.batch + records.len()) as u64 * 1000;
            let base = FlowRecord {
                time_unix_nanos: time,
                endpoint: EndpointRef::Pod(src_pod.clone()),
                direction: Direction::Egress,
                src: *src_ip,
                dst: *src_ip,
                src_port: 32768 + rng.below(28000) as u16,
                dst_port: 443,
                protocol: 6,
                kind: FlowKind::New,
                verdict: FlowVerdict::Allowed,
                rule: FlowRule::DefaultAllow,
                rule_id: 0,
                local_identity: 256 + w as u32,
                peer_identity: 2,
                peer: None,
                reason: FlowReason::AllowedNew,
                packets: 1,
                bytes: 60 + rng.below(1400) as u64,
                peer_names: Vec::new(),
                staged: None,
            };
            if roll < 3 {
                // To the internet: allowed at the source's egress.
                records.push(pb::FlowRecord::from(FlowRecord {
                    dst: IpAddr::V4(Ipv4Addr::new(203, 0, 113, rng.below(250) as u8 + 1)),
                    ..base
                }));
                continue;
            }
            let (peer, port) = talks[w][rng.below(a.peers)];
            let Deployment {
                namespace: dst_ns,
                name: dst_name,
                pods: dst_pods,
            } = &c.workloads[peer];
            let (dst_pod, dst_ip) = &dst_pods[rng.below(dst_pods.len())];
            let rule = |kind, name: String, index| {
                FlowRule::Rule(RuleRef {
                    kind,
                    namespace: dst_ns.clone(),
                    name,
                    direction: Direction::Ingress,
                    index,
                })
            };
            let (verdict, kind, rule, rule_id, reason) = match roll {
                3..=14 => (
                    FlowVerdict::Denied,
                    FlowKind::Denied,
                    rule(RuleKind::NetworkPolicy, "default-deny".into(), None),
                    7,
                    FlowReason::DeniedPolicy,
                ),
                15..=19 => (
                    FlowVerdict::AuditWouldDeny,
                    FlowKind::Audit,
                    rule(RuleKind::ServicePolicy, format!("{dst_name}-audit"), None),
                    9,
                    FlowReason::AuditWouldDeny,
                ),
                _ => (
                    FlowVerdict::Allowed,
                    FlowKind::New,
                    rule(RuleKind::NetworkPolicy, dst_name.clone(), Some(0)),
                    8,
                    FlowReason::AllowedNew,
                ),
            };
            let r = FlowRecord {
                dst: *dst_ip,
                dst_port: port as u16,
                peer_identity: 256 + peer as u32,
                ..base
            };
            // The source's egress allowed it (reported by the source's agent; it names peers
            // on its own node only) …
            records.push(pb::FlowRecord::from(&r));
            // … and the destination's ingress decided.
            records.push(pb::FlowRecord::from(FlowRecord {
                endpoint: EndpointRef::Pod(PodKey {
                    namespace: dst_ns.clone(),
                    name: dst_pod.clone(),
                }),
                direction: Direction::Ingress,
                kind,
                verdict,
                rule,
                rule_id,
                reason,
                ..r
            }));
        }
        records.truncate(a.batch);
        total += records.len() as u64;
        out.push(Arc::new(
            pb::FlowBatch {
                node: String::new(),
                records,
                dropped: 0,
            }
            .encode_to_vec(),
        ));
    }
    (out, total / count as u64)
}

#[derive(Default)]
struct AgentCounts {
    generated: AtomicU64,
    dropped: AtomicU64,
    reported_dropped: AtomicU64,
    accepted_by_summary: AtomicU64,
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "flows_ingest: {} workloads × {} pods in {} namespaces on {} nodes; {} simulated agents, batches of {}; {} controller runtime thread(s); {} CPUs",
        a.workloads,
        a.pods_per_workload,
        a.workloads.div_ceil(a.workloads_per_namespace.max(1)),
        a.nodes,
        a.agents,
        a.batch,
        a.controller_threads,
        cpus
    );
    let t0 = Instant::now();
    let c = cluster(&a);
    let engine =
        PolicyEngine::new(EngineConfig::default(), c.objects.clone()).context("compile")?;
    let hub = Arc::new(Hub::new(engine));
    let (pool, per_batch) = batches(&a, &c, 256);
    println!(
        "scenario compiled and {} distinct batches encoded ({:.0} B/record on the wire) in {:.2} s",
        pool.len(),
        pool.iter().map(|b| b.len()).sum::<usize>() as f64 / (pool.len() as u64 * per_batch) as f64,
        t0.elapsed().as_secs_f64()
    );

    // Where the controller's time goes, one stage at a time on this thread (no gRPC, no
    // HTTP/2): protobuf decoding, the contract's checks (the conversion to typed records),
    // folding into a fresh graph, storing (with evictions).
    {
        let thread_cpu = || clock_nanos(libc::CLOCK_THREAD_CPUTIME_ID).unwrap_or(0);
        let rounds = 8;
        let mut decoded = Vec::new();
        let c0 = thread_cpu();
        for _ in 0..rounds {
            decoded.clear();
            for b in &pool {
                decoded.push(pb::FlowBatch::decode(b.as_slice())?);
            }
        }
        let decode = thread_cpu() - c0;
        let mut checked: Vec<Vec<FlowRecord>> = Vec::new();
        let c0 = thread_cpu();
        for _ in 0..rounds {
            checked = decoded
                .iter()
                .map(|b| {
                    let mut out = Vec::with_capacity(b.records.len());
                    out.extend(
                        b.records
                            .iter()
                            .cloned()
                            .filter_map(|r| check_record(r).ok()),
                    );
                    out
                })
                .collect();
        }
        let check_and_clone = thread_cpu() - c0;
        let c0 = thread_cpu();
        for _ in 0..rounds {
            for b in &decoded {
                std::hint::black_box(b.records.clone());
            }
        }
        let clone_decoded = thread_cpu() - c0;
        let directory = bulkhead_controller::flows::FlowPipeline::new(
            Arc::new(Mutex::new(FlowStore::new(1))),
            Arc::new(Mutex::new(ServiceGraph::default())),
            hub.clone(),
        )
        .directory();
        let mut g = ServiceGraph::default();
        let c0 = thread_cpu();
        for _ in 0..rounds {
            for b in &checked {
                for r in b {
                    g.add(&directory, r);
                }
            }
        }
        let fold = thread_cpu() - c0;
        let mut s = FlowStore::new(a.store);
        let c0 = thread_cpu();
        for _ in 0..rounds {
            for b in &checked {
                s.push_batch("node-0000", b.iter().cloned());
            }
        }
        let store_and_clone = thread_cpu() - c0;
        let c0 = thread_cpu();
        for _ in 0..rounds {
            for b in &checked {
                std::hint::black_box(b.clone());
            }
        }
        let clone_only = thread_cpu() - c0;
        let n = (rounds * pool.len()) as f64 * per_batch as f64;
        println!(
            "stages, ns of CPU per record: protobuf decode {:.0}, contract checks {:.0} (beyond copying the decoded record), fold into the graph {:.0}, store push + evict {:.0} (beyond allocating and freeing the record)",
            decode as f64 / n,
            check_and_clone.saturating_sub(clone_decoded) as f64 / n,
            fold as f64 / n,
            store_and_clone.saturating_sub(clone_only) as f64 / n
        );
    }

    // The controller: its own runtime, so its CPU is measured apart from the agents'.
    let controller_cpu = Arc::new(ThreadCpu::default());
    let controller = runtime("controller", a.controller_threads, controller_cpu.clone())?;
    let history = match &a.history {
        Some(dir) => {
            let _ = std::fs::remove_dir_all(dir);
            Some(Arc::new(FlowHistory::open(HistoryConfig::new(dir))?))
        }
        None => None,
    };
    let mut flow_store = FlowStore::new(a.store);
    if let Some(h) = &history {
        flow_store = flow_store.with_history(h.clone());
    }
    let store = Arc::new(Mutex::new(flow_store));
    let graph = Arc::new(Mutex::new(ServiceGraph::default()));
    let pipeline = Arc::new(FlowPipeline::new(store.clone(), graph.clone(), hub.clone()));
    let directory = pipeline.directory();
    println!("directory: {} workloads", directory.workloads());
    let addr = controller.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(
                    DistributionService::with_flow_pipeline(hub.clone(), pipeline.clone())
                        .into_server(),
                )
                .add_service(
                    pb::admin_server::AdminServer::new(
                        AdminService::new(hub.clone()).with_flows(pipeline.clone()),
                    )
                    .max_encoding_message_size(usize::MAX),
                )
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        anyhow::Ok(addr)
    })?;
    // The metrics scrape, once a second, as `/metrics` does (bulkhead controller's
    // sync_flow_counters: every counter of the graph read under its lock).
    let scrapes = Arc::new(AtomicU64::new(0));
    {
        let (graph, scrapes) = (graph.clone(), scrapes.clone());
        controller.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if let Ok(g) = graph.lock() {
                    let mut series = 0usize;
                    series += g.by_verdict().count();
                    series += g.by_namespace_pair().count();
                    series += g.drops_by_rule().count();
                    std::hint::black_box((series, g.len()));
                }
                scrapes.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    // The agents.
    let agent_cpu = Arc::new(ThreadCpu::default());
    let agents_rt = runtime("agents", 1, agent_cpu.clone())?;
    let counts = Arc::new(AgentCounts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let pool = Arc::new(pool);
    let cpu_before = controller_cpu.seconds();
    let agent_cpu_before = agent_cpu.seconds();
    let process_before = process_cpu_seconds();
    let started = Instant::now();
    let mut handles = Vec::new();
    for i in 0..a.agents {
        let (counts, stop, pool) = (counts.clone(), stop.clone(), pool.clone());
        let node = Arc::new(
            pb::FlowBatch {
                node: node_name(i),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let per_agent_rate = a.rate as f64 / a.agents as f64;
        handles.push(agents_rt.spawn(async move {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                .tcp_nodelay(true)
                .connect()
                .await?;
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            // The agent's bounded queue: 16 batches = its 8,192 records.
            let (tx, rx) = tokio::sync::mpsc::channel::<EncodedBatch>(16);
            let call = tokio::spawn(async move {
                grpc.client_streaming(
                    tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
                    tonic::codegen::http::uri::PathAndQuery::from_static(
                        "/bulkhead.v1.Distribution/ReportFlows",
                    ),
                    ReportCodec,
                )
                .await
            });
            let mut next = i * 31;
            let mut dropped = 0u64;
            let mut owed = 0.0f64;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            while !stop.load(Ordering::Relaxed) {
                let b = EncodedBatch {
                    node: node.clone(),
                    records: pool[next % pool.len()].clone(),
                    dropped,
                };
                next += 1;
                if per_agent_rate <= 0.0 {
                    counts.generated.fetch_add(per_batch, Ordering::Relaxed);
                    counts
                        .reported_dropped
                        .fetch_add(dropped, Ordering::Relaxed);
                    dropped = 0;
                    if tx.send(b).await.is_err() {
                        break;
                    }
                    continue;
                }
                // Offered load: a batch's worth of events whenever they are due.
                while owed < per_batch as f64 {
                    tick.tick().await;
                    owed += per_agent_rate / 100.0;
                }
                owed -= per_batch as f64;
                counts.generated.fetch_add(per_batch, Ordering::Relaxed);
                match tx.try_send(b) {
                    Ok(()) => {
                        counts
                            .reported_dropped
                            .fetch_add(dropped, Ordering::Relaxed);
                        dropped = 0;
                    }
                    Err(_) => {
                        dropped += per_batch;
                        counts.dropped.fetch_add(per_batch, Ordering::Relaxed);
                    }
                }
            }
            // What is still owed a report goes with one last (empty) batch.
            if dropped > 0 {
                let b = EncodedBatch {
                    node: node.clone(),
                    records: Arc::new(Vec::new()),
                    dropped,
                };
                if tx.send(b).await.is_ok() {
                    counts
                        .reported_dropped
                        .fetch_add(dropped, Ordering::Relaxed);
                }
            }
            drop(tx);
            let summary = call.await??.into_inner();
            counts
                .accepted_by_summary
                .fetch_add(summary.accepted, Ordering::Relaxed);
            anyhow::Ok(())
        }));
    }
    std::thread::sleep(Duration::from_secs_f64(a.seconds));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        agents_rt.block_on(h)??;
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = controller_cpu.seconds() - cpu_before;
    let agents_cpu = agent_cpu.seconds() - agent_cpu_before;
    let process = process_cpu_seconds() - process_before;

    let stats = store
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .stats();
    let (folded, nodes, edges) = {
        let g = graph.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let (n, e) = g.len();
        (g.records(), n, e)
    };
    let generated = counts.generated.load(Ordering::Relaxed);
    let dropped = counts.dropped.load(Ordering::Relaxed);
    let reported = counts.reported_dropped.load(Ordering::Relaxed);
    let by_summary = counts.accepted_by_summary.load(Ordering::Relaxed);
    let rate = stats.accepted as f64 / cpu;
    println!(
        "\ningest: {} events in {:.2} s wall = {:.0} events/s; controller CPU {:.2} s ({:.0}% of a core) → {:.0} events/s per controller core (target ≥ 500,000: ratio {:.2})",
        stats.accepted,
        wall,
        stats.accepted as f64 / wall,
        cpu,
        cpu / wall * 100.0,
        rate,
        rate / 500_000.0
    );
    println!(
        "  agents' CPU {:.2} s, whole process {:.2} s; {:.2} µs of controller CPU per event; {} metric scrapes",
        agents_cpu,
        process,
        cpu * 1e6 / stats.accepted.max(1) as f64,
        scrapes.load(Ordering::Relaxed)
    );
    if let Some(h) = &history {
        // The writer thread is not the controller runtime's: its CPU is the process's less the
        // runtimes' (and this thread's, which sleeps).
        let flushed = Instant::now();
        h.flush()?;
        let st = h.stats();
        println!(
            "  flow history on ({}): {} of {} accepted written ({:.1}%), {} dropped because the writer was behind (kept in memory and the graph); writer finished {:.2} s after ingest stopped; writer and other threads' CPU during ingest {:.2} s ({:.0}% of a core); {:.1} MiB",
            h.path().display(),
            st.written,
            stats.accepted,
            st.written as f64 * 100.0 / stats.accepted.max(1) as f64,
            st.dropped_backlog,
            flushed.elapsed().as_secs_f64(),
            process - cpu - agents_cpu,
            (process - cpu - agents_cpu) / wall * 100.0,
            st.bytes as f64 / (1 << 20) as f64
        );
    }
    let unaccounted = generated as i128 - stats.accepted as i128 - stats.dropped_by_agents as i128;
    println!("\nloss accounting:");
    println!("  generated by agents               {generated:>12}");
    println!(
        "  dropped by agents (queue full)    {dropped:>12}   reported to the controller {reported} (controller counted {})",
        stats.dropped_by_agents
    );
    println!(
        "  accepted by the controller        {:>12}   (agents' call summaries: {by_summary})",
        stats.accepted
    );
    println!(
        "    stored                          {:>12}   (capacity {})",
        stats.stored, stats.capacity
    );
    println!("    evicted (oldest first, counted) {:>12}", stats.evicted);
    println!("    folded into the graph           {folded:>12}");
    println!(
        "  unaccounted = generated − accepted − dropped-and-reported = {unaccounted}; accepted − stored − evicted = {}; accepted − folded = {}",
        stats.accepted as i128 - stats.stored as i128 - stats.evicted as i128,
        stats.accepted as i128 - folded as i128
    );

    // Serving the graph.
    println!("\ngraph: {nodes} nodes (workloads + world), {edges} edges");
    // `/api/graph` as the controller serves it: under the graph's lock, JSON written straight
    // from the aggregate. Wall time, and this thread's CPU time (the machine may be busy).
    let thread_cpu = || clock_nanos(libc::CLOCK_THREAD_CPUTIME_ID).unwrap_or(0);
    let mut http = Vec::new();
    let mut http_cpu = Vec::new();
    let mut json_bytes = 0;
    for _ in 0..a.graph_samples {
        let (t, c0) = (Instant::now(), thread_cpu());
        let body = graph
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .to_json();
        http.push(t.elapsed());
        http_cpu.push(Duration::from_nanos(thread_cpu() - c0));
        json_bytes = body.len();
    }
    // The same JSON through a copy of the graph (`ServiceGraph::graph` + serde), as before.
    let mut copied = Vec::new();
    for _ in 0..a.graph_samples.min(10) {
        let (t, c0) = (Instant::now(), thread_cpu());
        let g = graph
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .graph();
        let body = serde_json::to_vec(&g)?;
        copied.push(Duration::from_nanos(thread_cpu() - c0));
        std::hint::black_box((t, body.len()));
    }
    let mut grpc = Vec::new();
    agents_rt.block_on(async {
        // Receive windows as `bulkhead graph --controller` sets them (the graph is megabytes).
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .initial_stream_window_size(Some(16 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .connect()
            .await?;
        let mut client =
            pb::admin_client::AdminClient::new(channel).max_decoding_message_size(usize::MAX);
        for _ in 0..a.graph_samples {
            let t = Instant::now();
            let g = client
                .get_graph(pb::GetGraphRequest::default())
                .await?
                .into_inner();
            grpc.push(t.elapsed());
            std::hint::black_box(g.edges.len());
        }
        anyhow::Ok(())
    })?;
    let mut dot = Vec::new();
    for _ in 0..a.graph_samples.min(10) {
        let c0 = thread_cpu();
        let d = graph
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .graph()
            .to_dot();
        dot.push(Duration::from_nanos(thread_cpu() - c0));
        std::hint::black_box(d.len());
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "  (load average while measuring: {})",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "  /api/graph JSON ({:.1} MB)          wall p50 {:>6.1} ms  p99 {:>6.1} ms   (target ≤ 100 ms: p99 ratio {:.2}); CPU p50 {:.1} ms  p99 {:.1} ms",
        json_bytes as f64 / 1e6,
        ms(percentile(&mut http, 0.5)),
        ms(percentile(&mut http, 0.99)),
        ms(percentile(&mut http, 0.99)) / 100.0,
        ms(percentile(&mut http_cpu, 0.5)),
        ms(percentile(&mut http_cpu, 0.99)),
    );
    println!(
        "    the same through a copy (graph() + serde_json)       CPU p50 {:>6.1} ms  ({:.1}× the direct JSON)",
        ms(percentile(&mut copied, 0.5)),
        ms(percentile(&mut copied, 0.5)) / ms(percentile(&mut http_cpu, 0.5)).max(1e-9)
    );
    println!(
        "  Admin.GetGraph over gRPC (client decode included) wall p50 {:>6.1} ms  p99 {:>6.1} ms   (ratio {:.2})",
        ms(percentile(&mut grpc, 0.5)),
        ms(percentile(&mut grpc, 0.99)),
        ms(percentile(&mut grpc, 0.99)) / 100.0
    );
    println!(
        "  /api/graph.dot                                        CPU p50 {:>6.1} ms  p99 {:>6.1} ms",
        ms(percentile(&mut dot, 0.5)),
        ms(percentile(&mut dot, 0.99))
    );
    controller.shutdown_background();
    agents_rt.shutdown_background();
    if let (Some(h), Some(dir)) = (&history, &a.history) {
        h.close();
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}
