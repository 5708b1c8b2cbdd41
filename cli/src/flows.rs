//! `bulkhead flows` (like `hubble observe`) and `bulkhead graph`, against a running controller's
//! HTTP API (or a lab's), or its gRPC admin API (`--controller`, mTLS; `--lab DIR --grpc`).

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::{Context, bail};
use bulkhead_controller::flows::{FlowFilter, Graph};
use bulkhead_proto::v1::{self as pb, admin_client::AdminClient};
use clap::{Args, ValueEnum};
use serde_json::Value;

use crate::certs::ClientTlsArgs;

#[derive(Args, Clone)]
pub struct Source {
    /// The controller's HTTP address (`bulkhead controller --http`).
    #[arg(long, default_value = "127.0.0.1:9961")]
    http: String,
    /// Use the controller of the lab in this state directory.
    #[arg(long)]
    lab: Option<PathBuf>,
    /// Ask the controller's gRPC admin API at this address (`https://HOST:9960` or
    /// `HOST:PORT`), with the client certificate given by --tls-cert/--tls-key/--ca.
    #[arg(long, conflicts_with = "lab")]
    controller: Option<String>,
    /// With --lab: use the lab controller's gRPC admin API (and the lab's admin certificate)
    /// instead of its HTTP API.
    #[arg(long, requires = "lab")]
    grpc: bool,
    #[command(flatten)]
    tls: ClientTlsArgs,
}

type Admin = AdminClient<tonic::transport::Channel>;

impl Source {
    fn uses_grpc(&self) -> bool {
        self.controller.is_some() || self.grpc
    }

    async fn admin(&self) -> anyhow::Result<Admin> {
        let (addr, tls) = match (&self.controller, &self.lab) {
            (Some(addr), _) => (addr.clone(), self.tls.clone()),
            (None, Some(dir)) => crate::lab::state::LabState::load(dir)?.admin_connection(),
            (None, None) => bail!("name the controller: --controller ADDRESS or --lab DIR"),
        };
        // The graph of a large cluster is megabytes: let it come without waiting for window
        // updates.
        let channel = crate::certs::endpoint(&addr, &tls)?
            .initial_stream_window_size(Some(16 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .connect()
            .await
            .with_context(|| format!("connect to the controller at {addr}"))?;
        Ok(AdminClient::new(channel).max_decoding_message_size(256 << 20))
    }

    fn port(&self) -> anyhow::Result<u16> {
        match &self.lab {
            Some(dir) => Ok(crate::lab::state::LabState::load(dir)?.http_port),
            None => {
                let (host, port) = self
                    .http
                    .rsplit_once(':')
                    .with_context(|| format!("--http {:?}: expected HOST:PORT", self.http))?;
                if host != "127.0.0.1" && host != "localhost" {
                    bail!(
                        "--http: the controller's HTTP API listens on loopback; use 127.0.0.1:PORT"
                    );
                }
                port.parse()
                    .with_context(|| format!("--http {:?}: bad port", self.http))
            }
        }
    }

    fn get(&self, path: &str) -> anyhow::Result<String> {
        let port = self.port()?;
        crate::lab::http_get(port, path)
            .with_context(|| format!("no answer from the controller on 127.0.0.1:{port}{path}"))
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum FlowFormat {
    Table,
    Json,
}

#[derive(Args)]
pub struct FlowsArgs {
    /// Keep printing new flows as they arrive.
    #[arg(long)]
    follow: bool,
    /// Only flows from or to this namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Only flows from or to this pod, `namespace/pod`.
    #[arg(long)]
    pod: Option<String>,
    /// Only this verdict: allowed, denied, audit-would-deny.
    #[arg(long)]
    verdict: Option<String>,
    /// Only flows seen within this long (`30s`, `5m`, …).
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: FlowFormat,
    #[command(flatten)]
    source: Source,
}

fn s(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or_default().to_string()
}

fn matches(a: &FlowsArgs, f: &Value, floor_nanos: u64) -> bool {
    if f["time_unix_nanos"].as_u64().unwrap_or(0) < floor_nanos {
        return false;
    }
    if let Some(v) = &a.verdict
        && &s(f, "verdict") != v
    {
        return false;
    }
    let endpoint = s(f, "endpoint");
    let peer = s(f, "peer");
    if let Some(p) = &a.pod
        && &endpoint != p
        && &peer != p
    {
        return false;
    }
    if let Some(ns) = &a.namespace {
        let in_ns = |x: &str| x.split_once('/').is_some_and(|(n, _)| n == ns);
        if !in_ns(&endpoint) && !in_ns(&peer) {
            return false;
        }
    }
    true
}

fn proto_name(p: &Value) -> String {
    match p.as_u64().unwrap_or(0) {
        6 => "TCP".to_string(),
        17 => "UDP".to_string(),
        132 => "SCTP".to_string(),
        1 => "ICMP".to_string(),
        58 => "ICMPv6".to_string(),
        0 => String::new(),
        n => format!("proto {n}"),
    }
}

fn print_flow(f: &Value) {
    let t = f["time_unix_nanos"].as_u64().unwrap_or(0);
    let time = humantime::format_rfc3339_millis(SystemTime::UNIX_EPOCH + Duration::from_nanos(t));
    let endpoint = s(f, "endpoint");
    let peer = s(f, "peer");
    let named = |name: String, addr: String| if name.is_empty() { addr } else { name };
    let (from, to) = if s(f, "direction") == "ingress" {
        (named(peer, s(f, "src")), named(endpoint, s(f, "dst")))
    } else {
        (named(endpoint, s(f, "src")), named(peer, s(f, "dst")))
    };
    let proto = proto_name(&f["protocol"]);
    println!(
        "{time}  {:<8} {from} -> {to}:{} {proto:<6} {:<16} {}",
        s(f, "node"),
        f["dst_port"],
        s(f, "verdict").to_uppercase(),
        s(f, "rule")
    );
}

/// One stored flow as `/api/flows` shows it; `None` (said on stderr) for one this build
/// cannot read.
fn flow_json(f: pb::StoredFlow) -> Option<Value> {
    let node = f.node.clone();
    match f.into_entry() {
        Ok(e) => Some(bulkhead_controller::flows::flow_json(&node, &e)),
        Err(e) => {
            eprintln!("(a flow the controller sent is left out: {e})");
            None
        }
    }
}

fn print_flows(output: FlowFormat, flows: Vec<pb::StoredFlow>) {
    for v in flows.into_iter().filter_map(flow_json) {
        match output {
            FlowFormat::Json => println!("{v}"),
            FlowFormat::Table => print_flow(&v),
        }
    }
}

/// Through the admin API: the controller filters; `--follow` is a server stream.
fn flows_grpc(a: FlowsArgs, floor: u64) -> anyhow::Result<ExitCode> {
    let filter = FlowFilter {
        namespace: a.namespace.clone(),
        pod: a.pod.clone(),
        verdict: a.verdict.clone(),
        since_unix_nanos: floor,
    }
    .to_proto();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    rt.block_on(async move {
        let mut client = a.source.admin().await?;
        if !a.follow {
            let resp = client
                .get_flows(pb::GetFlowsRequest {
                    filter: Some(filter),
                    limit: 1000,
                })
                .await?
                .into_inner();
            print_flows(a.output, resp.flows);
            return Ok(ExitCode::SUCCESS);
        }
        let mut stream = client
            .watch_flows(pb::WatchFlowsRequest {
                filter: Some(filter),
                backlog: 1000,
            })
            .await?
            .into_inner();
        while let Some(msg) = stream.message().await? {
            if msg.missed > 0 {
                eprintln!(
                    "({} flow records were evicted from the controller's store before they could be shown)",
                    msg.missed
                );
            }
            print_flows(a.output, msg.flows);
        }
        bail!("the controller closed the flow stream")
    })
}

pub fn flows(a: FlowsArgs) -> anyhow::Result<ExitCode> {
    let floor = a.since.map_or(0, |d| {
        SystemTime::now()
            .checked_sub(d)
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64)
    });
    if a.source.uses_grpc() {
        return flows_grpc(a, floor);
    }
    let mut last_printed = floor;
    loop {
        let body = a.source.get("/api/flows")?;
        let mut records: Vec<Value> =
            serde_json::from_str(&body).context("the controller's /api/flows is not JSON")?;
        // The API answers newest first; print oldest first.
        records.reverse();
        let fresh: Vec<&Value> = records
            .iter()
            .filter(|f| {
                f["time_unix_nanos"].as_u64().unwrap_or(0) > last_printed
                    || (!a.follow && last_printed == floor)
            })
            .filter(|f| matches(&a, f, floor))
            .collect();
        if let Some(t) = fresh
            .iter()
            .filter_map(|f| f["time_unix_nanos"].as_u64())
            .max()
        {
            last_printed = last_printed.max(t);
        }
        match a.output {
            FlowFormat::Json => {
                for f in &fresh {
                    println!("{f}");
                }
            }
            FlowFormat::Table => fresh.iter().for_each(|f| print_flow(f)),
        }
        if !a.follow {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum GraphFormat {
    Table,
    Json,
    Dot,
}

#[derive(Args)]
pub struct GraphArgs {
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: GraphFormat,
    #[command(flatten)]
    source: Source,
}

fn graph_grpc(source: &Source) -> anyhow::Result<Graph> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    rt.block_on(async {
        let resp = source
            .admin()
            .await?
            .get_graph(pb::GetGraphRequest::default())
            .await?
            .into_inner();
        Ok(Graph::from(resp))
    })
}

pub fn graph(a: GraphArgs) -> anyhow::Result<ExitCode> {
    let grpc = if a.source.uses_grpc() {
        Some(graph_grpc(&a.source)?)
    } else {
        None
    };
    match a.output {
        GraphFormat::Dot => match &grpc {
            Some(g) => print!("{}", g.to_dot()),
            None => print!("{}", a.source.get("/api/graph.dot")?),
        },
        GraphFormat::Json => match &grpc {
            Some(g) => println!("{}", serde_json::to_string(g)?),
            None => println!("{}", a.source.get("/api/graph")?),
        },
        GraphFormat::Table => {
            let g: Value = match &grpc {
                Some(g) => serde_json::to_value(g)?,
                None => serde_json::from_str(&a.source.get("/api/graph")?)
                    .context("the controller's /api/graph is not JSON")?,
            };
            println!(
                "{:<36} {:<36} {:>10} {:>8} {:>8}  RULES",
                "FROM", "TO", "PORT", "ALLOWED", "DENIED"
            );
            for e in g["edges"].as_array().into_iter().flatten() {
                let rules: Vec<String> = e["rules"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(r, n)| format!("{r} ({n})"))
                    .collect();
                println!(
                    "{:<36} {:<36} {:>10} {:>8} {:>8}  {}",
                    s(e, "src"),
                    s(e, "dst"),
                    format!("{}/{}", e["port"], proto_name(&e["protocol"])),
                    e["allowed"],
                    e["denied"],
                    rules.join("; ")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
