//! `bulkhead flows` (like `hubble observe`) and `bulkhead graph`, against a running controller's
//! HTTP API (or a lab's), or its gRPC admin API (`--controller`, mTLS; `--lab DIR --grpc`).

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::{Context, bail};
use bulkhead_controller::ruleset::{ClusterName, NamePattern};
use bulkhead_controller::{
    flows::{FlowFilter, Graph},
    server::api::{FlowLine, FlowQuery, FlowView},
};
use bulkhead_proto::v1::{self as pb, admin_client::AdminClient};
use clap::{Args, ValueEnum};

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
    /// A file holding the bearer token for a controller whose HTTP API authenticates
    /// (`--http-auth tokens|kubernetes`): the token of a `viewer` (or `admin`) line of its
    /// --http-tokens file, or a Kubernetes service-account token.
    #[arg(long, env = "BULKHEAD_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    tls: ClientTlsArgs,
}

type Admin = AdminClient<tonic::transport::Channel>;

impl Source {
    pub(crate) fn uses_grpc(&self) -> bool {
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

    pub(crate) fn port(&self) -> anyhow::Result<u16> {
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

    pub(crate) fn get(&self, path: &str) -> anyhow::Result<String> {
        self.get_within(path, Duration::from_secs(2))
    }

    /// [`Source::get`], waiting up to `timeout` for the answer.
    pub(crate) fn get_within(&self, path: &str, timeout: Duration) -> anyhow::Result<String> {
        let port = self.port()?;
        let token = self.token()?;
        crate::lab::http_get_as(port, path, timeout, token.as_deref())
            .with_context(|| format!("no answer from the controller on 127.0.0.1:{port}{path}"))
    }

    /// The bearer token of --token-file, if any.
    pub(crate) fn token(&self) -> anyhow::Result<Option<String>> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read the token file {}", path.display()))?;
        let token = text.trim();
        if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!(
                "{}: expected one token (no spaces, no line breaks)",
                path.display()
            );
        }
        Ok(Some(token.to_string()))
    }

    /// Runs `call` with a client of the controller's gRPC admin API, to completion.
    pub(crate) fn block_on<T>(
        &self,
        call: impl AsyncFnOnce(Admin) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("start the async runtime")?;
        rt.block_on(async {
            let admin = self.admin().await?;
            call(admin).await
        })
    }
}

/// An answer of the controller's HTTP API as `T`, or the error it gave.
pub(crate) fn parse_answer<T: serde::de::DeserializeOwned>(
    body: &str,
    what: &str,
) -> anyhow::Result<T> {
    match serde_json::from_str(body) {
        Ok(t) => Ok(t),
        Err(e) => match serde_json::from_str::<bulkhead_controller::server::api::ErrorBody>(body) {
            Ok(err) => bail!("the controller says: {}", err.error),
            Err(_) => Err(e).with_context(|| {
                format!(
                    "the controller's answer is not a {what}: {}",
                    body.chars().take(200).collect::<String>()
                )
            }),
        },
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum FlowFormat {
    Table,
    Json,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum StagedVerdictArg {
    Allowed,
    Denied,
}

impl StagedVerdictArg {
    fn as_str(self) -> &'static str {
        match self {
            StagedVerdictArg::Allowed => "allowed",
            StagedVerdictArg::Denied => "denied",
        }
    }
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
    /// Only flows whose verdict with the staged policies in force is this: `denied` lists
    /// what promoting them would break (and what is denied already).
    #[arg(long, value_enum)]
    staged_verdict: Option<StagedVerdictArg>,
    /// Only flows to or from a peer outside the cluster whose address the pod had learned from
    /// DNS for this name (`api.example.com`) or pattern (`*.example.com`); a name also finds
    /// flows to addresses learned under a wildcard that covers it.
    #[arg(long, value_name = "NAME", value_parser = parse_peer_name)]
    peer_name: Option<NamePattern>,
    /// Only flows from or to a pod of this peer cluster (remote pods are named
    /// `cluster/namespace/pod`). Every flow's reporting endpoint is a local pod: this selects
    /// flows by their peer.
    #[arg(long, value_name = "NAME")]
    cluster: Option<ClusterName>,
    /// Only flows seen within this long (`30s`, `5m`, `24h`, …). Without --follow the answer
    /// comes from the controller's flow history on disk, so it reaches back past a restart.
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// Only flows seen at or before this time: RFC 3339 (`2026-12-07T10:00:00Z`) or a while
    /// ago (`2h`). Reads the flow history.
    #[arg(long, value_parser = parse_time, conflicts_with = "follow")]
    until: Option<u64>,
    /// Forensics: the flows of --pod in the --since (default 24h) before its latest quarantine,
    /// from the flow history.
    #[arg(long, requires = "pod", conflicts_with_all = ["follow", "until"])]
    before_quarantine: bool,
    /// At most this many flows, the newest (from the flow history at most 10,000, else 1,000).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: FlowFormat,
    #[command(flatten)]
    source: Source,
}

fn parse_peer_name(s: &str) -> Result<NamePattern, String> {
    NamePattern::parse(s).map_err(|e| e.to_string())
}

/// RFC 3339, or a duration before now; nanoseconds since the Unix epoch.
fn parse_time(s: &str) -> Result<u64, String> {
    let t = match humantime::parse_duration(s) {
        Ok(ago) => SystemTime::now()
            .checked_sub(ago)
            .ok_or_else(|| format!("{s:?} reaches before the Unix epoch"))?,
        Err(_) => humantime::parse_rfc3339_weak(s).map_err(|e| {
            format!("{s:?}: expected an RFC 3339 time (2026-12-07T10:00:00Z) or a duration ago (2h): {e}")
        })?,
    };
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .map_err(|_| format!("{s:?} is before the Unix epoch"))
}

fn proto_name(p: u64) -> String {
    match p {
        6 => "TCP".to_string(),
        17 => "UDP".to_string(),
        132 => "SCTP".to_string(),
        1 => "ICMP".to_string(),
        58 => "ICMPv6".to_string(),
        0 => String::new(),
        n => format!("proto {n}"),
    }
}

fn print_flow(f: &FlowLine) {
    println!("{}", flow_text(f));
}

/// One flow as a line of the table: the peer by its pod, else by its address and the DNS names
/// its endpoint had learned for it (`203.0.113.7 (api.example.com)`).
fn flow_text(f: &FlowLine) -> String {
    let time = humantime::format_rfc3339_millis(
        SystemTime::UNIX_EPOCH + Duration::from_nanos(f.time_unix_nanos),
    );
    let named = |name: &str, addr: &str| if name.is_empty() { addr } else { name }.to_string();
    let peer = |addr: &str| match (f.peer.is_empty(), f.peer_names.is_empty()) {
        (true, false) => format!("{addr} ({})", f.peer_names.join(", ")),
        _ => named(&f.peer, addr),
    };
    let (from, to) = if f.direction == "ingress" {
        (peer(&f.src), named(&f.endpoint, &f.dst))
    } else {
        (named(&f.endpoint, &f.src), peer(&f.dst))
    };
    let proto = proto_name(f.protocol.into());
    let staged = if f.staged_verdict.is_empty() {
        String::new()
    } else {
        format!(
            "  (staged: would be {} by {})",
            f.staged_verdict, f.staged_rule
        )
    };
    format!(
        "{time}  {:<8} {from} -> {to}:{} {proto:<6} {:<16} {}{staged}",
        f.node,
        f.dst_port,
        f.verdict.to_uppercase(),
        f.rule
    )
}

fn print_line(output: FlowFormat, f: &FlowLine) -> anyhow::Result<()> {
    match output {
        FlowFormat::Json => println!("{}", serde_json::to_string(f)?),
        FlowFormat::Table => print_flow(f),
    }
    Ok(())
}

/// One stored flow as `/api/flows` shows it; `None` (said on stderr) for one this build
/// cannot read.
fn flow_line(f: pb::StoredFlow) -> Option<FlowLine> {
    let node = f.node.clone();
    match f.into_entry() {
        Ok(e) => Some(FlowLine::of(&node, &e)),
        Err(e) => {
            eprintln!("(a flow the controller sent is left out: {e})");
            None
        }
    }
}

fn print_flows(output: FlowFormat, flows: Vec<pb::StoredFlow>) -> anyhow::Result<()> {
    for f in flows.into_iter().filter_map(flow_line) {
        print_line(output, &f)?;
    }
    Ok(())
}

/// Through the admin API: the controller filters; a time range without `--follow` reads its
/// flow history; `--follow` is a server stream.
fn flows_grpc(a: FlowsArgs, floor: u64) -> anyhow::Result<ExitCode> {
    let filter = FlowFilter {
        namespace: a.namespace.clone(),
        pod: a.pod.clone(),
        verdict: a.verdict.clone(),
        staged_verdict: a.staged_verdict.map(|v| v.as_str().to_string()),
        since_unix_nanos: floor,
        peer_name: a.peer_name.clone(),
        cluster: a.cluster.as_ref().map(ToString::to_string),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    rt.block_on(async move {
        let mut client = a.source.admin().await?;
        if !a.follow {
            let history = a.since.is_some() || a.until.is_some() || a.before_quarantine;
            let (mut filter, mut until) = (filter, a.until);
            if a.before_quarantine {
                let pod = a
                    .pod
                    .as_deref()
                    .context("--before-quarantine needs --pod")?;
                let latest = client
                    .get_flows(pb::GetFlowsRequest {
                        filter: Some(
                            FlowFilter {
                                pod: Some(pod.to_string()),
                                verdict: Some("quarantined".into()),
                                ..FlowFilter::default()
                            }
                            .to_proto(),
                        ),
                        limit: 1,
                        history: true,
                        until_unix_nanos: 0,
                    })
                    .await?
                    .into_inner();
                let t = latest
                    .flows
                    .into_iter()
                    .filter_map(flow_line)
                    .next()
                    .map(|f| f.time_unix_nanos)
                    .with_context(|| format!("the flow history has no quarantine of {pod}"))?;
                filter.since_unix_nanos = before_quarantine(pod, t, a.since);
                until = Some(t);
            }
            let most = if history {
                FlowQuery::MAX_HISTORY_LIMIT
            } else {
                FlowQuery::MAX_LIMIT
            };
            let limit = a.limit.map_or(most, |l| (l as usize).min(most));
            let request = |history: bool| pb::GetFlowsRequest {
                filter: Some(filter.to_proto()),
                limit: limit as u32,
                history,
                until_unix_nanos: until.unwrap_or(0),
            };
            let resp = match client.get_flows(request(history)).await {
                // `--since` alone still answers, from memory, where no history is kept.
                Err(s) if history
                    && until.is_none()
                    && s.code() == tonic::Code::FailedPrecondition =>
                {
                    eprintln!(
                        "(the controller keeps no flow history: these are the records it holds in memory)"
                    );
                    client.get_flows(request(false)).await?
                }
                r => r?,
            }
            .into_inner();
            if resp.flows.len() >= limit {
                eprintln!(
                    "(the newest {limit} matching flows; narrow the time range or the filters, or pass --limit)"
                );
            }
            print_flows(a.output, resp.flows)?;
            return Ok(ExitCode::SUCCESS);
        }
        let mut stream = client
            .watch_flows(pb::WatchFlowsRequest {
                filter: Some(filter.to_proto()),
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
            print_flows(a.output, msg.flows)?;
        }
        bail!("the controller closed the flow stream")
    })
}

fn nanos_ago(d: Duration) -> u64 {
    SystemTime::now()
        .checked_sub(d)
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64)
}

/// How long a query of the flow history may take to answer.
const HISTORY_WAIT: Duration = Duration::from_secs(120);

/// `/api/flows` with `query`: the flows, newest first.
fn get_flows(source: &Source, query: &FlowQuery) -> anyhow::Result<Vec<FlowView>> {
    let path = query.path();
    let body = if query.history == Some(true) {
        source.get_within(&path, HISTORY_WAIT)?
    } else {
        source.get(&path)?
    };
    parse_answer(&body, "list of flows")
}

/// The start of the window before `pod`'s quarantine at `t` (`--since`, default a day), said on
/// stderr.
fn before_quarantine(pod: &str, t: u64, window: Option<Duration>) -> u64 {
    let window = window.unwrap_or(Duration::from_secs(24 * 3600));
    let since = t.saturating_sub(window.as_nanos() as u64);
    let at =
        |n: u64| humantime::format_rfc3339_millis(SystemTime::UNIX_EPOCH + Duration::from_nanos(n));
    eprintln!(
        "({pod} was quarantined at {}; its flows from {} on)",
        at(t),
        at(since)
    );
    since
}

/// The time of `pod`'s latest quarantine in the flow history.
fn latest_quarantine(source: &Source, pod: &str) -> anyhow::Result<u64> {
    let query = FlowQuery {
        pod: Some(pod.to_string()),
        verdict: Some("quarantined".into()),
        history: Some(true),
        limit: Some(1),
        ..FlowQuery::default()
    };
    get_flows(source, &query)?
        .first()
        .map(|f| f.line.time_unix_nanos)
        .with_context(|| format!("the flow history has no quarantine of {pod}"))
}

pub fn flows(a: FlowsArgs) -> anyhow::Result<ExitCode> {
    let floor = a.since.map_or(0, nanos_ago);
    if a.source.uses_grpc() {
        return flows_grpc(a, floor);
    }
    // A time range without --follow is a question for the history on disk.
    let mut history = !a.follow && (a.since.is_some() || a.until.is_some() || a.before_quarantine);
    let (mut since, mut until) = (floor, a.until);
    if a.before_quarantine {
        let pod = a
            .pod
            .as_deref()
            .context("--before-quarantine needs --pod")?;
        let t = latest_quarantine(&a.source, pod)?;
        since = before_quarantine(pod, t, a.since);
        until = Some(t);
    }
    let limit = |history: bool| {
        let most = if history {
            FlowQuery::MAX_HISTORY_LIMIT
        } else {
            FlowQuery::MAX_LIMIT
        };
        a.limit.map_or(most, |l| (l as usize).min(most))
    };
    let mut last_printed = since;
    loop {
        let limit = limit(history);
        // The controller filters; the newest `limit` that match come back.
        let query = FlowQuery {
            namespace: a.namespace.clone(),
            pod: a.pod.clone(),
            verdict: a.verdict.clone(),
            staged_verdict: a.staged_verdict.map(|v| v.as_str().to_string()),
            peer_name: a.peer_name.as_ref().map(ToString::to_string),
            cluster: a.cluster.as_ref().map(ToString::to_string),
            since: (last_printed > 0).then_some(last_printed),
            until,
            history: history.then_some(true),
            limit: Some(limit),
            ..FlowQuery::default()
        };
        let mut records = match get_flows(&a.source, &query) {
            // `--since` alone still answers, from memory, where no history is kept.
            Err(e)
                if history
                    && until.is_none()
                    && e.to_string().contains("keeps no flow history") =>
            {
                eprintln!(
                    "(the controller keeps no flow history: these are the records it holds in memory)"
                );
                history = false;
                continue;
            }
            r => r?,
        };
        if !a.follow && records.len() >= limit {
            eprintln!(
                "(the newest {limit} matching flows; narrow the time range or the filters, or pass --limit)"
            );
        }
        // The API answers newest first; print oldest first.
        records.reverse();
        let fresh: Vec<&FlowLine> = records
            .iter()
            .map(|f| &f.line)
            .filter(|f| f.time_unix_nanos > last_printed || (!a.follow && last_printed == since))
            .collect();
        if let Some(t) = fresh.iter().map(|f| f.time_unix_nanos).max() {
            last_printed = last_printed.max(t);
        }
        for f in fresh {
            print_line(a.output, f)?;
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
    if let (GraphFormat::Dot, false) = (a.output, a.source.uses_grpc()) {
        print!("{}", a.source.get("/api/graph.dot")?);
        return Ok(ExitCode::SUCCESS);
    }
    let g: Graph = if a.source.uses_grpc() {
        graph_grpc(&a.source)?
    } else {
        parse_answer(&a.source.get("/api/graph")?, "graph")
            .context("the controller's /api/graph is not a graph")?
    };
    match a.output {
        GraphFormat::Dot => print!("{}", g.to_dot()),
        GraphFormat::Json => println!("{}", serde_json::to_string(&g)?),
        GraphFormat::Table => {
            println!(
                "{:<36} {:<36} {:>10} {:>8} {:>8}  RULES",
                "FROM", "TO", "PORT", "ALLOWED", "DENIED"
            );
            for e in &g.edges {
                let rules: Vec<String> =
                    e.rules.iter().map(|(r, n)| format!("{r} ({n})")).collect();
                println!(
                    "{:<36} {:<36} {:>10} {:>8} {:>8}  {}",
                    e.src,
                    e.dst,
                    format!("{}/{}", e.port, proto_name(e.protocol.into())),
                    e.allowed,
                    e.denied,
                    rules.join("; ")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A world peer is shown by its address and the names its endpoint had learned for it; a
    /// pod peer by its pod, as before.
    #[test]
    fn a_named_world_peer_shows_its_names() {
        let f = FlowLine {
            direction: "egress".into(),
            src: "10.0.0.2".into(),
            dst: "203.0.113.7".into(),
            dst_port: 443,
            endpoint: "shop/api-0".into(),
            node: "n1".into(),
            peer_names: vec!["api.example.com".into(), "*.example.com".into()],
            protocol: 6,
            verdict: "denied".into(),
            rule: "NetworkPolicy shop/api egress default-deny".into(),
            ..FlowLine::default()
        };
        let text = flow_text(&f);
        assert!(
            text.contains("shop/api-0 -> 203.0.113.7 (api.example.com, *.example.com):443 TCP"),
            "{text}"
        );
        let pod = FlowLine {
            peer: "shop/db-0".into(),
            peer_names: Vec::new(),
            ..f
        };
        assert!(flow_text(&pod).contains("shop/api-0 -> shop/db-0:443"));
    }

    #[test]
    fn peer_names_are_checked_patterns() {
        assert_eq!(
            parse_peer_name("API.example.com."),
            Ok(NamePattern::Exact("api.example.com".into()))
        );
        assert!(parse_peer_name("*.com").is_err());
    }
}
