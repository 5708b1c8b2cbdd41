//! Issue 21, finding 1: a node floods a running controller's `ReportFlows` with records naming
//! huge policies, then with many distinct rules; prints the controller's RSS before and after
//! each flood, what it accepted, and the size of one `/metrics` scrape.
//!
//! ```sh
//! bulkhead controller --insecure -f MANIFESTS --listen 127.0.0.1:9960 --metrics 127.0.0.1:9963 &
//! cargo run --release -p bulkhead-bench --bin flow_flood -- --node NODE --pid $! \
//!     --controller 127.0.0.1:9960 --metrics 127.0.0.1:9963
//! ```

use std::{
    io::{Read, Write},
    net::SocketAddr,
    time::Duration,
};

use anyhow::Context;
use bulkhead_proto::v1::{self as pb, distribution_client::DistributionClient};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// The controller's gRPC address (plaintext: run it with --insecure).
    #[arg(long, default_value = "127.0.0.1:9960")]
    controller: SocketAddr,
    /// The controller's metrics address (`--metrics`, for `/metrics`).
    #[arg(long, default_value = "127.0.0.1:9963")]
    metrics: SocketAddr,
    /// A node of the controller's inventory to report as.
    #[arg(long)]
    node: String,
    /// The controller's process id (for its RSS).
    #[arg(long)]
    pid: u32,
    /// Batches of one record with a huge rule name (the issue's repro: 40 × 3 MB).
    #[arg(long, default_value_t = 40)]
    big_batches: usize,
    #[arg(long, default_value_t = 3_000_000)]
    rule_bytes: usize,
    /// Well-formed denied records, each with a rule name never seen before.
    #[arg(long, default_value_t = 100_000)]
    distinct_rules: usize,
}

fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read the status of process {pid}"))?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in the process status")?;
    Ok(kib / 1024.0)
}

/// The body size of one `/metrics` scrape.
fn metrics_bytes(http: SocketAddr) -> anyhow::Result<usize> {
    let mut s = std::net::TcpStream::connect_timeout(&http, Duration::from_secs(5))
        .with_context(|| format!("connect to {http}"))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = Vec::new();
    s.read_to_end(&mut body)?;
    let head = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no HTTP header end")?;
    Ok(body.len() - head - 4)
}

/// A denied record at `flood/pod-0`, decided by the first ingress rule of the NetworkPolicy
/// `flood/<policy>`.
fn record(policy: String) -> pb::FlowRecord {
    pb::FlowRecord {
        time_unix_nanos: 1,
        endpoint: Some(pb::flow_record::Endpoint::Pod(pb::PodRef {
            namespace: "flood".into(),
            name: "pod-0".into(),
        })),
        direction: pb::Direction::Ingress as i32,
        src: vec![192, 0, 2, 1].into(),
        dst: vec![192, 0, 2, 2].into(),
        src_port: 40000,
        dst_port: 80,
        protocol: 6,
        kind: pb::FlowKind::Denied as i32,
        verdict: pb::FlowVerdict::Denied as i32,
        rule: Some(pb::FlowRule {
            rule: Some(pb::flow_rule::Rule::Policy(pb::RuleRef {
                kind: pb::RuleKind::NetworkPolicy as i32,
                namespace: "flood".into(),
                name: policy,
                direction: pb::Direction::Ingress as i32,
                index: Some(0),
            })),
        }),
        reason: pb::FlowReason::DeniedPolicy as i32,
        packets: 1,
        bytes: 60,
        ..Default::default()
    }
}

async fn report(
    client: &mut DistributionClient<tonic::transport::Channel>,
    node: &str,
    batches: Vec<Vec<pb::FlowRecord>>,
) -> anyhow::Result<u64> {
    let node = node.to_string();
    let stream = tokio_stream::iter(batches.into_iter().map(move |records| pb::FlowBatch {
        node: node.clone(),
        records,
        dropped: 0,
    }));
    Ok(client.report_flows(stream).await?.into_inner().accepted)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let mut client = DistributionClient::connect(format!("http://{}", a.controller))
        .await
        .context("connect to the controller")?
        .max_encoding_message_size(64 << 20);
    let scrape = |what: &str| -> anyhow::Result<()> {
        println!(
            "{what:<42} RSS {:>7.1} MiB   /metrics {:>11} bytes",
            rss_mib(a.pid)?,
            metrics_bytes(a.metrics)?
        );
        Ok(())
    };
    scrape("before")?;

    let big: Vec<Vec<pb::FlowRecord>> = (0..a.big_batches)
        .map(|i| vec![record(format!("{i}-{}", "x".repeat(a.rule_bytes)))])
        .collect();
    let accepted = report(&mut client, &a.node, big).await?;
    println!(
        "{} records with a {}-byte rule: {accepted} accepted",
        a.big_batches, a.rule_bytes
    );
    scrape("after the big-string flood")?;

    let distinct: Vec<Vec<pb::FlowRecord>> = (0..a.distinct_rules)
        .collect::<Vec<_>>()
        .chunks(500)
        .map(|c| {
            c.iter()
                .map(|i| record(format!("made-up-{i:08}")))
                .collect()
        })
        .collect();
    let accepted = report(&mut client, &a.node, distinct).await?;
    println!(
        "{} records with distinct rules: {accepted} accepted",
        a.distinct_rules
    );
    scrape("after the distinct-rule flood")?;
    Ok(())
}
