//! The controller's flow history on disk (`--flow-history`): what persistence adds to the ingest
//! path, how fast its writer thread keeps records, and how long queries of a 24-hour window of
//! 10 M records take.
//!
//! 1. Ingest cost: `FlowStore::push_batch` (what the ingest path does after folding into the
//!    graph) with the history off and on, CPU of the calling thread per record. With it on, the
//!    batch is copied and handed to the writer over a bounded channel; the disk is never waited
//!    for.
//! 2. Writer: `--records` records spread evenly over 24 hours, offered in agent-sized batches as
//!    fast as the writer takes them (the producer waits at a flush every few batches, so nothing
//!    is dropped): records per second written, the writer thread's CPU, bytes per record.
//! 3. Queries of the 24 hours: every record (oldest first), one busy pod's (`bulkhead flows
//!    --pod NS/POD --since 24h`: it is in every chunk), the forensics query of a pod that talked
//!    during one hour of the 24 (`tools/debug`, one record in 1,000 of that hour) with the
//!    history's pod index and without it (every chunk of the range decoded and filtered, as
//!    before the index), the newest 10,000 of a namespace (the API's answer), and a restart:
//!    reopening the store and rebuilding the graph of the last hour.
//!
//! `cargo run --release -p bulkhead-bench --bin flow_history [-- --records 10000000 --dir DIR]`
//! Figures only: nothing here fails on time.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use bulkhead_bench::pod_ip;
use bulkhead_controller::{
    distribution::FlowStore,
    flows::{
        Directory, FlowFilter, FlowPipeline, ServiceGraph,
        history::{FlowHistory, HistoryConfig, HistoryQuery, now_unix_nanos},
    },
    ruleset::{
        Direction, EndpointRef, FlowEntry, FlowKind, FlowReason, FlowRecord, FlowRule, FlowVerdict,
        PodKey, RuleKind, RuleRef,
    },
};

/// The pod of the forensics query: it talks only during [`DEBUG_HOUR`].
const DEBUG_POD: &str = "tools/debug";
/// The hour of the 24 (counted from the start) in which tools/debug talks.
const DEBUG_HOUR: u64 = 20;
/// One record in this many of that hour is tools/debug's.
const DEBUG_EVERY: u64 = 1000;
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Records written over the 24 hours.
    #[arg(long, default_value_t = 10_000_000)]
    records: u64,
    /// Records per batch (the agent sends 512).
    #[arg(long, default_value_t = 512)]
    batch: usize,
    /// Pods reporting (in namespaces of 20).
    #[arg(long, default_value_t = 2_000)]
    pods: usize,
    /// Where the store goes (a fresh directory under the system's temporary one by default;
    /// removed at the end unless given).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Size limit of the store, MiB (the controller's default is 1024).
    #[arg(long, default_value_t = 4096)]
    max_mib: u64,
}

const HOUR: u64 = 3600 * 1_000_000_000;
const DAY: u64 = 24 * HOUR;

fn thread_cpu() -> f64 {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime fills the struct we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn process_cpu() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn pod_key(i: usize) -> PodKey {
    PodKey {
        namespace: format!("ns-{:03}", i / 20),
        name: format!("web-{i:05}-7d9f8c6b5-x{:04}", i * 7919 % 10_000),
    }
}

/// Record `n` of the run: pod `n % pods` reports a connection from another pod (named on half
/// the records, as an agent names the pods of its own node), at time `t`.
fn record(n: u64, pods: usize, t: u64) -> FlowRecord {
    let here = (n as usize * 31) % pods;
    let peer = (n as usize * 17 + 5) % pods;
    let denied = n.is_multiple_of(10);
    FlowRecord {
        time_unix_nanos: t,
        endpoint: EndpointRef::Pod(pod_key(here)),
        direction: Direction::Ingress,
        src: pod_ip(peer),
        dst: pod_ip(here),
        src_port: 32768 + (n % 28000) as u16,
        dst_port: [80, 443, 5432, 6379][n as usize % 4],
        protocol: 6,
        kind: FlowKind::New,
        verdict: if denied {
            FlowVerdict::Denied
        } else {
            FlowVerdict::Allowed
        },
        rule: FlowRule::Rule(RuleRef {
            kind: RuleKind::NetworkPolicy,
            namespace: pod_key(here).namespace,
            name: format!("allow-{}", here % 50),
            direction: Direction::Ingress,
            index: Some((n % 3) as u32),
        }),
        rule_id: (n % 1000) as u32,
        local_identity: 1000 + here as u32,
        peer_identity: 1000 + peer as u32,
        peer: n.is_multiple_of(2).then(|| pod_key(peer)),
        reason: if denied {
            FlowReason::DeniedPolicy
        } else {
            FlowReason::AllowedNew
        },
        packets: 1,
        bytes: 60 + n % 1400,
        peer_names: Vec::new(),
        staged: None,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "flow_history: {} records over 24 h from {} pods, batches of {}; {} CPUs",
        a.records, a.pods, a.batch, cpus
    );
    let (dir, remove) = match &a.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!(
                "bulkhead-flow-history-bench-{}",
                std::process::id()
            )),
            true,
        ),
    };
    let _ = std::fs::remove_dir_all(&dir);
    let config = HistoryConfig {
        max_bytes: a.max_mib << 20,
        queue_batches: 256,
        ..HistoryConfig::new(&dir)
    };
    let now = now_unix_nanos();
    let start = now - DAY;
    let step = DAY / a.records.max(1);

    // 1. The ingest path's share: push_batch with the history off and on.
    {
        let batches: Vec<Vec<FlowRecord>> = (0..256u64)
            .map(|b| {
                (0..a.batch as u64)
                    .map(|i| record(b * a.batch as u64 + i, a.pods, now))
                    .collect()
            })
            .collect();
        let rounds = 20;
        let n = (rounds * batches.len() * a.batch) as f64;
        let mut off = FlowStore::new(100_000);
        let c0 = thread_cpu();
        for _ in 0..rounds {
            for b in &batches {
                off.push_batch("node-0000", b.iter().cloned());
            }
        }
        let off_ns = (thread_cpu() - c0) * 1e9 / n;
        let scratch = dir.with_extension("ingest");
        let _ = std::fs::remove_dir_all(&scratch);
        let history = Arc::new(FlowHistory::open(HistoryConfig::new(&scratch))?);
        let mut on = FlowStore::new(100_000).with_history(history.clone());
        let c0 = thread_cpu();
        for _ in 0..rounds {
            for b in &batches {
                on.push_batch("node-0000", b.iter().cloned());
            }
        }
        let on_ns = (thread_cpu() - c0) * 1e9 / n;
        history.flush()?;
        let st = history.stats();
        println!(
            "ingest path, store push per record (CPU of the ingesting thread): history off {off_ns:.0} ns, on {on_ns:.0} ns (+{:.0} ns: the records shared with the writer and handed over); pushed as fast as one thread can: {} written, {} dropped because the writer was behind (counted, still in memory)",
            on_ns - off_ns,
            st.written,
            st.dropped_backlog
        );
        drop(on);
        drop(history);
        let _ = std::fs::remove_dir_all(&scratch);
    }

    // 2. The writer: 24 hours of records, as fast as it takes them.
    let history = FlowHistory::open(config.clone())?;
    let node: Arc<str> = Arc::from("node-0000");
    let wall = Instant::now();
    let cpu0 = process_cpu();
    let producer0 = thread_cpu();
    let mut n = 0u64;
    let mut since_flush = 0;
    while n < a.records {
        let size = (a.batch as u64).min(a.records - n);
        let entries: Vec<Arc<FlowEntry>> = (n..n + size)
            .map(|i| {
                let t = start + i * step;
                let mut r = record(i, a.pods, t);
                if (t - start) / HOUR == DEBUG_HOUR && i.is_multiple_of(DEBUG_EVERY) {
                    r.endpoint = EndpointRef::Pod(DEBUG_POD.parse().expect("a pod name"));
                    r.direction = Direction::Egress;
                }
                Arc::new(FlowEntry::Flow(r))
            })
            .collect();
        history.offer(node.clone(), n, entries, None);
        n += size;
        since_flush += 1;
        // Keep the queue from overflowing: wait for the writer now and then.
        if since_flush == 128 {
            history.flush()?;
            since_flush = 0;
        }
    }
    history.flush()?;
    let wall = wall.elapsed();
    let producer = thread_cpu() - producer0;
    let writer_cpu = process_cpu() - cpu0 - producer;
    let st = history.stats();
    let file = std::fs::metadata(history.path())?.len();
    println!(
        "writer: {} records in {:.1} s = {:.0} records/s ({:.0} per second of writer CPU: {:.1} s; the producer making the records used {:.1} s); {} dropped; {} chunks; {:.1} MiB on disk = {:.1} B/record",
        st.written,
        wall.as_secs_f64(),
        st.written as f64 / wall.as_secs_f64(),
        st.written as f64 / writer_cpu.max(1e-9),
        writer_cpu,
        producer,
        st.dropped_backlog + st.dropped_write_errors,
        st.chunks_written,
        file as f64 / (1 << 20) as f64,
        file as f64 / st.written.max(1) as f64
    );

    // 3. Queries of the 24 hours.
    let window = |filter: FlowFilter, newest_first: bool| HistoryQuery {
        filter: FlowFilter {
            since_unix_nanos: start,
            ..filter
        },
        until_unix_nanos: Some(now),
        newest_first,
    };
    let t = Instant::now();
    let mut all = 0u64;
    for r in history.query(window(FlowFilter::default(), false))? {
        r?;
        all += 1;
    }
    let full = t.elapsed();
    println!(
        "query, every record of the 24 h (oldest first): {all} in {:.0} ms = {:.0} records/s",
        ms(full),
        all as f64 / full.as_secs_f64()
    );
    let of_pod = |pod: &str, namespace: Option<&str>| -> anyhow::Result<_> {
        let t = Instant::now();
        let mut n = 0u64;
        let mut records = history.query(window(
            FlowFilter {
                pod: Some(pod.to_string()),
                namespace: namespace.map(str::to_string),
                ..FlowFilter::default()
            },
            false,
        ))?;
        for r in records.by_ref() {
            r?;
            n += 1;
        }
        Ok((n, t.elapsed(), records.stats()))
    };
    let target = pod_key(7).to_string();
    let (n, took, st) = of_pod(&target, None)?;
    println!(
        "query, one busy pod's 24 h (bulkhead flows --pod {target} --since 24h): {n} records in {:.0} ms; {} of {} chunks decoded (the pod is in every chunk)",
        ms(took),
        st.chunks_decoded,
        st.chunks_in_range
    );
    // Forensics: a pod that talked during one hour. With the index, then without it (what a
    // query did before the index: decode every chunk of the range, filter every record).
    let (indexed, took, st) = of_pod(DEBUG_POD, None)?;
    println!(
        "query, {DEBUG_POD}'s 24 h (active during one hour), with the pod index: {indexed} records in {:.0} ms; {} of {} chunks decoded",
        ms(took),
        st.chunks_decoded,
        st.chunks_in_range
    );
    let debug_filter = FlowFilter {
        pod: Some(DEBUG_POD.to_string()),
        ..FlowFilter::default()
    };
    let t = Instant::now();
    let mut scanned = 0u64;
    let mut records = history.query(window(FlowFilter::default(), false))?;
    for r in records.by_ref() {
        if debug_filter.matches(&Directory::default(), &r?.entry) {
            scanned += 1;
        }
    }
    let took_scan = t.elapsed();
    anyhow::ensure!(
        scanned == indexed,
        "the index answered {indexed} records, the full scan {scanned}"
    );
    println!(
        "query, {DEBUG_POD}'s 24 h without the index (every chunk decoded and filtered): {scanned} records in {:.0} ms; {} of {} chunks decoded; the index: {:.1}x faster",
        ms(took_scan),
        records.stats().chunks_decoded,
        records.stats().chunks_in_range,
        took_scan.as_secs_f64() / took.as_secs_f64().max(1e-9)
    );
    let t = Instant::now();
    let mut newest = 0u64;
    for r in history
        .query(window(
            FlowFilter {
                namespace: Some("ns-003".into()),
                verdict: Some("denied".into()),
                ..FlowFilter::default()
            },
            true,
        ))?
        .take(10_000)
    {
        r?;
        newest += 1;
    }
    println!(
        "query, the newest 10,000 denied flows of one namespace in the 24 h (the API's largest answer): {newest} in {:.0} ms",
        ms(t.elapsed())
    );
    drop(history);

    // A restart: open the store, rebuild the graph of the last hour and the recent flows.
    let t = Instant::now();
    let history = FlowHistory::open(config)?;
    let opened = t.elapsed();
    let pipeline = FlowPipeline::with_directory(
        Arc::new(Mutex::new(FlowStore::new(100_000))),
        Arc::new(Mutex::new(ServiceGraph::default())),
        Directory::default(),
    );
    let (folded, restored) = pipeline
        .restore_from(&history, now - HOUR)
        .context("restore")?;
    println!(
        "restart: store opened in {:.0} ms; graph rebuilt from the last hour ({folded} records) and the newest {restored} flows restored in {:.0} ms in all",
        ms(opened),
        ms(t.elapsed())
    );
    drop(history);
    if remove {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
