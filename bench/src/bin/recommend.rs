//! `bulkhead policy recommend` at scale: the time to learn least-privilege NetworkPolicies
//! (`bulkhead_controller::recommend`, what `/api/recommend` runs) from the flow records of a
//! cluster of 10,000 workloads whose observed traffic has 34,000 edges, and to write the YAML.
//!
//! Each workload (a Deployment, `pods_per_workload` pods on `nodes` nodes, labels `app` and
//! `tier` plus a `pod-template-hash` the filter drops) talks to `edges / workloads` peers, some
//! in other namespaces, some outside the cluster; each connection is reported at both ends
//! (egress of the source, ingress of the destination) `records_per_edge` times.
//!
//! `cargo run --release -p bulkhead-bench --bin recommend [-- --workloads 10000 --edges 34000]`

use std::time::{Duration, Instant};

use bulkhead_bench::{Rng, labels, node_name, pod, pod_ip};
use bulkhead_controller::{
    identity::LabelFilter,
    model::Pod,
    recommend::{RecommendKind, RecommendOptions, recommend},
    ruleset::{
        Direction, EndpointRef, FlowKind, FlowReason, FlowRecord, FlowRule, FlowVerdict, PodKey,
    },
};
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    workloads: usize,
    /// Distinct (source, destination, port) edges observed.
    #[arg(long, default_value_t = 34_000)]
    edges: usize,
    #[arg(long, default_value_t = 2)]
    pods_per_workload: usize,
    #[arg(long, default_value_t = 20)]
    workloads_per_namespace: usize,
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Connections recorded per edge (each reported at both ends).
    #[arg(long, default_value_t = 3)]
    records_per_edge: usize,
    #[arg(long, default_value_t = 5)]
    samples: usize,
}

const T0: u64 = 1_796_637_600_000_000_000;

fn main() {
    let a = Args::parse();
    let mut pods: Vec<Pod> = Vec::with_capacity(a.workloads * a.pods_per_workload);
    let ns_of = |w: usize| format!("ns-{}", w / a.workloads_per_namespace);
    for w in 0..a.workloads {
        for r in 0..a.pods_per_workload {
            let i = w * a.pods_per_workload + r;
            let app = format!("app-{w}");
            let mut p = pod(
                &ns_of(w),
                &format!("w{w}-5d8f-{r}"),
                labels(&[
                    ("app", &app),
                    ("tier", if w % 3 == 0 { "backend" } else { "web" }),
                    ("pod-template-hash", "5d8f"),
                ]),
                node_name(i % a.nodes),
                pod_ip(i),
            );
            p.workload = Some(format!("ReplicaSet/w{w}-5d8f"));
            pods.push(p);
        }
    }
    let mut rng = Rng::new(7);
    let mut records = Vec::with_capacity(a.edges * a.records_per_edge * 2);
    let per = a.edges.div_ceil(a.workloads);
    let mut edges = 0;
    'outer: for w in 0..a.workloads {
        for k in 0..per {
            if edges == a.edges {
                break 'outer;
            }
            edges += 1;
            let src_pod = w * a.pods_per_workload + (k % a.pods_per_workload);
            // One edge in ten leaves the cluster; the others go to the next workloads (the
            // same namespace or the next one) on one of a few ports: distinct edges.
            let world = rng.next_u64().is_multiple_of(10);
            let dst_w = (w + 1 + k) % a.workloads;
            let dst_pod = dst_w * a.pods_per_workload;
            let port = [80u16, 443, 5432, 8080, 9090][(rng.next_u64() % 5) as usize];
            let src_ip = pod_ip(src_pod);
            let dst_ip = if world {
                format!("198.51.{}.{}", (w / 250) % 250, k + 1)
                    .parse()
                    .expect("ip")
            } else {
                pod_ip(dst_pod)
            };
            let key = |i: usize| PodKey {
                namespace: pods[i].namespace.clone(),
                name: pods[i].name.clone(),
            };
            for n in 0..a.records_per_edge {
                let time = T0 + ((edges * a.records_per_edge + n) as u64) * 1_000_000;
                let rec = |at: usize, direction, peer: Option<PodKey>| FlowRecord {
                    time_unix_nanos: time,
                    endpoint: EndpointRef::Pod(key(at)),
                    direction,
                    src: src_ip,
                    dst: dst_ip,
                    src_port: 40000,
                    dst_port: port,
                    protocol: 6,
                    kind: FlowKind::New,
                    verdict: FlowVerdict::Allowed,
                    rule: FlowRule::DefaultAllow,
                    rule_id: 0,
                    local_identity: 300,
                    peer_identity: 301,
                    peer,
                    reason: FlowReason::AllowedNew,
                    packets: 1,
                    bytes: 60,
                    peer_names: Vec::new(),
                    staged: None,
                };
                // The reporting agent names only its own node's pods.
                records.push(rec(src_pod, Direction::Egress, None));
                if !world {
                    records.push(rec(dst_pod, Direction::Ingress, Some(key(src_pod))));
                }
            }
        }
    }
    println!(
        "recommend: {} workloads ({} pods, {} namespaces), {edges} edges, {} flow records, 2 CPUs",
        a.workloads,
        pods.len(),
        a.workloads.div_ceil(a.workloads_per_namespace),
        records.len()
    );
    let opts = RecommendOptions {
        kind: RecommendKind::NetworkPolicy,
        namespaces: Default::default(),
        learning_window: Duration::from_secs(600),
        now_unix_nanos: T0 + 3_600_000_000_000,
        label_filter: LabelFilter::default(),
    };
    let mut learn = Vec::new();
    let mut yaml = Vec::new();
    let mut size = 0;
    for _ in 0..a.samples {
        let t = Instant::now();
        let r = recommend(&records, &pods, &opts);
        learn.push(t.elapsed());
        let t = Instant::now();
        let out = r.to_yaml().expect("yaml");
        yaml.push(t.elapsed());
        size = out.len();
        assert_eq!(r.policies.len(), a.workloads, "one policy per workload");
        assert!(r.edges >= edges, "every edge learned");
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64()
    };
    let (l, y) = (median(&mut learn), median(&mut yaml));
    println!(
        "  learn {:.3} s, YAML {:.3} s ({:.1} MB), total {:.3} s (target ≤ 1 s: {:.2}× of it); median of {}",
        l,
        y,
        size as f64 / 1e6,
        l + y,
        (l + y) / 1.0,
        a.samples
    );
}
