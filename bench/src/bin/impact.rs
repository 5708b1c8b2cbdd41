//! `bulkhead policy impact` at scale (issue 18): a proposal replayed against 1 M recorded flow
//! records — what `POST /api/impact` runs: compile the current policies and the changed ones
//! (two engines, built from the live engine's objects), fold the records into edges, decide
//! every edge twice.
//!
//! The cluster is Antrea's small-namespaces scenario (`--namespaces` namespaces of 4 pods and 3
//! NetworkPolicies on `--nodes` nodes). Every ordered pair of pods of a namespace talks on
//! ports 80, 443 and 8080, each connection reported at both ends; `--records` records in all.
//! The proposal edits `np-1` of one namespace in ten to admit only port 8080 (so its edges on
//! 80 and 443 break) and deletes one `np-2`.
//!
//! Measured, median of `--samples`: the compilation, the fold, the replay, and the same fold
//! reading the records back from a flow history on disk (`--flow-history`), as the controller
//! does when it keeps one (the history decodes its chunks on other threads while the fold runs:
//! the CPU time of the process during that part is printed beside the wall time, because on a
//! shared machine the wall time says how busy the other cores were as much as what it costs).
//!
//! `cargo run --release -p bulkhead-bench --bin impact [-- --records 1000000]`
//! Figures only: nothing here fails on time.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bulkhead_bench::{pod_ip, small_namespaces};
use bulkhead_controller::{
    EngineConfig, PolicyEngine,
    answers::{self, ImpactQuestion},
    distribution::{FlowStore, Hub},
    flows::{
        FlowFilter,
        history::{FlowHistory, HistoryConfig, HistoryQuery, HistoryRecord, now_unix_nanos},
    },
    impact::{Edges, WhatIf, parse_delete, parse_proposal},
    ruleset::{
        Direction, EndpointRef, FlowEntry, FlowKind, FlowReason, FlowRecord, FlowRule, FlowVerdict,
        PodKey,
    },
};
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 2_500)]
    namespaces: usize,
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    #[arg(long, default_value_t = 1_000_000)]
    records: usize,
    #[arg(long, default_value_t = 5)]
    samples: usize,
}

const PODS: [(&str, &str); 4] = [
    ("pod1", "app-1"),
    ("pod2", "app-1"),
    ("pod3", "app-2"),
    ("pod4", "app-2"),
];
const PORTS: [u16; 3] = [80, 443, 8080];

/// CPU time of the whole process (all its threads), seconds.
fn process_cpu() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn median(v: &mut [Duration]) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64()
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let objects = small_namespaces(a.namespaces, a.nodes, 1);
    let now = std::time::SystemTime::now();
    // The controller's engine, whose objects a what-if starts from.
    let live = PolicyEngine::new_at(EngineConfig::default(), objects, now)?;

    // The traffic: every ordered pair of a namespace's pods on three ports, at both ends; the
    // ingress record admitted within an app (np-1/np-2), denied across; egress denied
    // (default-deny-all isolates egress).
    let start = now_unix_nanos() - 3_600_000_000_000;
    let mut records = Vec::with_capacity(a.records);
    let mut i = 0usize;
    'outer: loop {
        for ns in 0..a.namespaces {
            let name = format!("ns-{ns:05}");
            for (s, (sp, sapp)) in PODS.iter().enumerate() {
                for (d, (dp, dapp)) in PODS.iter().enumerate() {
                    if s == d {
                        continue;
                    }
                    for port in PORTS {
                        for (direction, at, peer) in
                            [(Direction::Egress, sp, dp), (Direction::Ingress, dp, sp)]
                        {
                            if records.len() == a.records {
                                break 'outer;
                            }
                            let allowed = direction == Direction::Ingress && sapp == dapp;
                            records.push(FlowRecord {
                                time_unix_nanos: start + i as u64 * 1_000,
                                endpoint: EndpointRef::Pod(PodKey {
                                    namespace: name.clone(),
                                    name: at.to_string(),
                                }),
                                direction,
                                src: pod_ip(ns * 4 + s),
                                dst: pod_ip(ns * 4 + d),
                                src_port: 40_000 + (i % 20_000) as u16,
                                dst_port: port,
                                protocol: 6,
                                kind: if allowed {
                                    FlowKind::New
                                } else {
                                    FlowKind::Denied
                                },
                                verdict: if allowed {
                                    FlowVerdict::Allowed
                                } else {
                                    FlowVerdict::Denied
                                },
                                rule: FlowRule::DefaultAllow,
                                rule_id: 0,
                                local_identity: 0,
                                peer_identity: 0,
                                peer: Some(PodKey {
                                    namespace: name.clone(),
                                    name: peer.to_string(),
                                }),
                                reason: if allowed {
                                    FlowReason::AllowedNew
                                } else {
                                    FlowReason::DeniedPolicy
                                },
                                packets: 1,
                                bytes: 60,
                                peer_names: Vec::new(),
                                staged: None,
                            });
                            i += 1;
                        }
                    }
                }
            }
        }
    }

    // The proposal: np-1 of one namespace in ten admits only 8080; one np-2 goes.
    let mut yaml = String::new();
    for ns in (0..a.namespaces).step_by(10) {
        yaml += &format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np-1, namespace: ns-{ns:05}}}\nspec:\n  podSelector: {{matchLabels: {{app-1: scale-1}}}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app-1: scale-1}}}}}}]\n    ports: [{{port: 8080}}]\n"
        );
    }
    let deletes = vec![format!("NetworkPolicy/ns-{:05}/np-2", a.namespaces - 1)];
    println!(
        "impact: {} namespaces ({} pods, {} policies) on {} nodes; {} flow records; a proposal of {} changed policies and 1 deletion ({:.0} kB of YAML); 2 CPUs shared",
        a.namespaces,
        a.namespaces * 4,
        a.namespaces * 3,
        a.nodes,
        records.len(),
        a.namespaces.div_ceil(10),
        yaml.len() as f64 / 1e3,
    );

    let (mut parse, mut copy, mut compile, mut fold, mut replay) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut last = None;
    for _ in 0..a.samples {
        let t = Instant::now();
        let proposal = parse_proposal(&yaml, &deletes)?;
        parse.push(t.elapsed());
        let t = Instant::now();
        let objects = live.objects();
        copy.push(t.elapsed());
        let t = Instant::now();
        let what_if = WhatIf::new(EngineConfig::default(), objects, live.now(), &proposal)?;
        compile.push(t.elapsed());
        let input = records.clone();
        let t = Instant::now();
        let edges = Edges::fold(input);
        fold.push(t.elapsed());
        let t = Instant::now();
        let impact = what_if.replay(&edges);
        replay.push(t.elapsed());
        last = Some(impact);
    }
    let impact = last.expect("a sample");
    let (p, c, k, f, r) = (
        median(&mut parse),
        median(&mut copy),
        median(&mut compile),
        median(&mut fold),
        median(&mut replay),
    );
    println!(
        "  {} edges, {} changed, {} break (observed admitted, denied after)",
        impact.edges,
        impact.changed.len(),
        impact.breaks
    );
    println!(
        "  in memory: parse {p:.3} s, copy the objects {c:.3} s, compile before+after {k:.3} s, fold {f:.3} s, replay {r:.3} s; total {:.3} s (target ≤ 2 s: {:.2}× of it); median of {}",
        p + c + k + f + r,
        (p + c + k + f + r) / 2.0,
        a.samples
    );

    // The same records read back from a flow history, as the API does with --flow-history.
    let dir = std::env::temp_dir().join(format!("bulkhead-impact-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let history = Arc::new(FlowHistory::open(HistoryConfig {
        max_bytes: 4 << 30,
        queue_batches: 256,
        ..HistoryConfig::new(&dir)
    })?);
    let node: Arc<str> = Arc::from("node-0000");
    for (n, chunk) in records.chunks(512).enumerate() {
        let entries = chunk
            .iter()
            .map(|r| Arc::new(FlowEntry::Flow(r.clone())))
            .collect();
        history.offer(node.clone(), (n * 512) as u64, entries, None);
        if n % 128 == 127 {
            history.flush()?;
        }
    }
    history.flush()?;
    let proposal = parse_proposal(&yaml, &deletes)?;
    let what_if = WhatIf::new(
        EngineConfig::default(),
        live.objects(),
        live.now(),
        &proposal,
    )?;
    let mut read = Vec::new();
    let mut total = Vec::new();
    let mut read_cpu = Vec::new();
    for _ in 0..a.samples {
        let t = Instant::now();
        let cpu = process_cpu();
        let query = HistoryQuery {
            filter: FlowFilter::default(),
            until_unix_nanos: None,
            newest_first: false,
        };
        let edges = Edges::fold(history.query(query)?.filter_map(|r| match r {
            Ok(HistoryRecord {
                entry: FlowEntry::Flow(f),
                ..
            }) => Some(f),
            _ => None,
        }));
        read.push(t.elapsed());
        read_cpu.push(Duration::from_secs_f64(process_cpu() - cpu));
        let got = what_if.replay(&edges);
        total.push(t.elapsed());
        assert_eq!(
            got.records as usize,
            records.len(),
            "every record read back"
        );
        assert_eq!(got.breaks, impact.breaks);
    }
    let (rd, tt, rc) = (median(&mut read), median(&mut total), median(&mut read_cpu));
    println!(
        "  from the flow history: read + fold {rd:.3} s (CPU of all threads {rc:.3} s), + replay {tt:.3} s; with parse, copy and compile {:.3} s (target ≤ 2 s: {:.2}× of it)",
        tt + p + c + k,
        (tt + p + c + k) / 2.0
    );

    // The whole question as the API asks it (`answers::impact`: the proposal parsed and the
    // engines compiled on a thread of their own while the history is read and folded).
    let hub = Hub::new(live);
    let store = std::sync::Mutex::new(FlowStore::new(1).with_history(history.clone()));
    let question = ImpactQuestion {
        proposal_yaml: yaml.clone(),
        delete: deletes
            .iter()
            .map(|d| parse_delete(d))
            .collect::<Result<_, _>>()?,
        since_unix_nanos: 0,
        until_unix_nanos: u64::MAX,
    };
    let mut asked = Vec::new();
    for _ in 0..a.samples {
        let t = Instant::now();
        let got = answers::impact(&hub, &store, &question)?;
        asked.push(t.elapsed());
        assert!(got.from_history);
        assert_eq!(got.breaks, impact.breaks);
    }
    let q = median(&mut asked);
    println!(
        "  the API's question from the flow history (answers::impact), end to end: {q:.3} s (target ≤ 2 s: {:.2}× of it)",
        q / 2.0
    );
    history.close();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
