//! `bulkhead agent`: enforce a node's rule set.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::{Context, bail};
use bulkhead_agent::sync::ApplyReport;
use std::sync::{Arc, Mutex, RwLock};

use bulkhead_agent::{
    flows::{FlowContext, FlowRecord, FlowVerdict, RecentFlows, read_events},
    loader::{Dataplane, remove_pins},
    metrics::AgentMetrics,
    sync::{Enforcer, RouteResolver},
};
use bulkhead_ruleset::RuleSet;
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct AgentArgs {
    #[command(subcommand)]
    command: AgentCommand,
}

#[derive(Args)]
struct RunArgs {
    /// This node's name (selects the rule set and names the pin directory).
    #[arg(long, env = "BULKHEAD_NODE")]
    node: String,
    /// Rule-set file; `-` reads standard input once. Either this or --controller.
    #[arg(
        long,
        required_unless_present = "controller",
        conflicts_with = "controller"
    )]
    ruleset: Option<PathBuf>,
    /// Controller to follow over gRPC (`host:port`): snapshot, then deltas, acked once
    /// realized. While it is unreachable the last rule set stays enforced.
    #[arg(long)]
    controller: Option<String>,
    #[command(flatten)]
    tls: crate::certs::ClientTlsArgs,
    /// bpffs directory for this node's maps and links.
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// Apply once and exit. The pinned programs keep enforcing after the agent is gone.
    #[arg(long)]
    once: bool,
    /// Address of the HTTP endpoint serving `/metrics` (Prometheus) and `/healthz`: counters
    /// (per endpoint pod, reason, rule), no addresses or individual flows.
    #[arg(long, default_value = "127.0.0.1:9962")]
    metrics_addr: std::net::SocketAddr,
    /// Address of the HTTP endpoint serving `/flows` (recent flow records) and `/connections`
    /// (the connection-tracking tables): every pod's traffic on this node, unauthenticated, so
    /// loopback only unless --http-unauthenticated.
    #[arg(long = "http", default_value = "127.0.0.1:9964")]
    http_addr: std::net::SocketAddr,
    /// Serve `/flows` and `/connections` on a non-loopback --http address, to anyone who
    /// reaches it.
    #[arg(long)]
    http_unauthenticated: bool,
    /// A file holding this agent pod's service-account token (a projected token with the
    /// controller's audience), sent to the controller on every connection and re-read at each,
    /// so that a controller with --agent-token-review can tell which node a shared agent
    /// certificate speaks for.
    #[arg(long, requires = "controller")]
    token_file: Option<PathBuf>,
    /// Flow records kept in memory for `/flows` (oldest evicted first).
    #[arg(long, default_value_t = 10_000)]
    flow_buffer: usize,
    /// Enforce on the interfaces of this named network namespace (`ip netns add`), e.g. a
    /// lab node. Only the data-plane thread enters it: the controller connection and the
    /// metrics endpoint stay in the agent's own namespace, and pins land on the host's
    /// bpffs (under `ip netns exec`, which remounts /sys, they would vanish with the agent).
    #[arg(long)]
    netns: Option<String>,
    /// Attach the prefilter (drops traffic from quarantined addresses, and from identities a
    /// local pod's policy denies outright, as it arrives on the node) to this uplink
    /// interface; repeatable.
    #[arg(long)]
    uplink: Vec<String>,
    /// Where the prefilter runs on the uplinks: `tc` (TC ingress after GRO: no throughput
    /// cost), `xdp` (before the stack: the cheapest drop under a flood, but native XDP on veth
    /// and virtio_net turns GRO off and costs most of a TCP stream's throughput), or `off`.
    #[arg(long, value_enum, default_value_t = PrefilterChoice::Tc)]
    prefilter: PrefilterChoice,
}

/// `--prefilter`.
#[derive(
    clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PrefilterChoice {
    Tc,
    Xdp,
    Off,
}

impl std::fmt::Display for PrefilterChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PrefilterChoice::Tc => "tc",
            PrefilterChoice::Xdp => "xdp",
            PrefilterChoice::Off => "off",
        })
    }
}

impl PrefilterChoice {
    fn hook(self) -> Option<bulkhead_agent::loader::PrefilterHook> {
        match self {
            PrefilterChoice::Tc => Some(bulkhead_agent::loader::PrefilterHook::Tc),
            PrefilterChoice::Xdp => Some(bulkhead_agent::loader::PrefilterHook::Xdp),
            PrefilterChoice::Off => None,
        }
    }
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Enforce the rule set in FILE (JSON, as `bulkhead policy compile` prints it: one RuleSet,
    /// or an object of them keyed by node name). The file is watched and re-applied when it
    /// changes; endpoints whose interface is missing are retried.
    Run(Box<RunArgs>),
    /// Remove this node's pinned programs, links and maps: enforcement stops.
    Reset {
        #[arg(long, env = "BULKHEAD_NODE")]
        node: String,
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
}

fn default_pin_dir(node: &str) -> PathBuf {
    PathBuf::from("/sys/fs/bpf/bulkhead").join(node)
}

/// Reads a rule set for `node` from JSON: a RuleSet, or `{ "<node>": RuleSet, … }`.
pub fn read_ruleset(text: &str, node: &str) -> anyhow::Result<RuleSet> {
    if let Ok(rs) = serde_json::from_str::<RuleSet>(text) {
        if rs.node != node {
            bail!(
                "the rule set is for node {:?}, not {node:?}; pass --node {:?}",
                rs.node,
                rs.node
            );
        }
        return Ok(rs);
    }
    let all: BTreeMap<String, RuleSet> = serde_json::from_str(text)
        .context("rule set is neither a RuleSet nor an object of RuleSets keyed by node")?;
    match all.get(node) {
        Some(rs) => Ok(rs.clone()),
        // A node without endpoints gets an empty rule set: nothing to enforce, nothing lost.
        None => Ok(RuleSet {
            node: node.to_string(),
            ..Default::default()
        }),
    }
}

fn load_file(path: &Path, node: &str) -> anyhow::Result<RuleSet> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("read rule set from stdin")?
    } else {
        fs::read_to_string(path).with_context(|| format!("read rule set {}", path.display()))?
    };
    read_ruleset(&text, node)
}

pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        AgentCommand::Reset { node, pin_dir } => {
            let dir = pin_dir.unwrap_or_else(|| default_pin_dir(&node));
            remove_pins(&dir).with_context(|| format!("remove pins under {}", dir.display()))?;
            println!("removed {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        AgentCommand::Run(run) => {
            let RunArgs {
                node,
                ruleset,
                controller,
                tls,
                pin_dir,
                once,
                metrics_addr,
                http_addr,
                http_unauthenticated,
                token_file,
                flow_buffer,
                netns,
                uplink,
                prefilter,
            } = *run;
            if !http_addr.ip().is_loopback() && !http_unauthenticated {
                bail!(
                    "--http {http_addr} would show every flow and connection of this node to anyone who reaches it: keep it on loopback (127.0.0.1), or pass --http-unauthenticated"
                );
            }
            let dir = pin_dir.unwrap_or_else(|| default_pin_dir(&node));
            let source = match (ruleset, controller) {
                (Some(path), _) => Source::File(path),
                (None, Some(addr)) => {
                    let target = crate::certs::ControllerTarget {
                        addr,
                        tls,
                        token_file,
                    };
                    // Bad flags or unreadable certificates fail here, at start; later reads
                    // (every reconnection) retry instead.
                    target.endpoint()?;
                    Source::Controller(Box::new(target))
                }
                (None, None) => bail!("pass --ruleset FILE or --controller ADDR"),
            };
            // Until the first rule set arrives, whatever the pinned maps hold stays enforced.
            let rs = match &source {
                Source::File(path) => load_file(path, &node)?,
                Source::Controller(_) => RuleSet {
                    node: node.clone(),
                    ..Default::default()
                },
            };
            let mut dp = Dataplane::load(&dir).context("load the data plane")?;
            let events = dp
                .take_map("EVENTS")
                .context("the eBPF object has no EVENTS map")?;
            let enforcer = Enforcer::new(dp).context("open the pinned maps")?;
            let dataplane = DataplaneThread::start(enforcer, netns, uplink, prefilter.hook())?;
            if once {
                if !matches!(source, Source::File(_)) {
                    bail!("--once applies a rule-set file; it does not follow a controller");
                }
                let (report, _) = dataplane.apply_blocking(Arc::new(rs))?;
                log_report(&report);
                return Ok(if report.missing_interfaces.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(3)
                });
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("start the async runtime")?;
            runtime.block_on(serve(Serve {
                node,
                source,
                pin_dir: dir,
                ruleset: rs,
                dataplane,
                events,
                metrics_addr,
                http_addr,
                flow_buffer,
            }))
        }
    }
}

enum Source {
    File(PathBuf),
    /// The controller's address and our TLS files, read anew at every connection so that
    /// rotated certificates (cert-manager renews them in place) are picked up without a
    /// restart.
    Controller(Box<crate::certs::ControllerTarget>),
}

struct Serve {
    node: String,
    source: Source,
    pin_dir: PathBuf,
    ruleset: RuleSet,
    dataplane: DataplaneThread,
    events: aya::maps::Map,
    metrics_addr: std::net::SocketAddr,
    http_addr: std::net::SocketAddr,
    flow_buffer: usize,
}

struct Shared {
    metrics: AgentMetrics,
    flows: Mutex<RecentFlows>,
    /// Flow records not forwarded to the controller (queue full, or the stream broke before
    /// they left), not yet reported to it.
    flows_dropped: std::sync::atomic::AtomicU64,
}

impl Shared {
    /// Counts `n` flow records the controller will not get; the next batch reports them.
    fn drop_flows(&self, n: u64) {
        self.flows_dropped
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        self.metrics.flow_records_dropped.inc_by(n);
    }
}

async fn serve(s: Serve) -> anyhow::Result<ExitCode> {
    let names: Arc<RwLock<Vec<(u32, String)>>> = Arc::default();
    let context = Arc::new(RwLock::new(FlowContext::new(&s.ruleset)));
    let metrics = AgentMetrics::new(&s.pin_dir, names.clone()).context("register metrics")?;
    let shared = Arc::new(Shared {
        metrics,
        flows: Mutex::new(RecentFlows::new(s.flow_buffer)),
        flows_dropped: Default::default(),
    });
    let (flow_tx, flow_rx) = tokio::sync::mpsc::channel::<bulkhead_ruleset::FlowRecord>(8192);
    let forward_flows = matches!(s.source, Source::Controller(_));

    // Flow events: kernel ring buffer → flow records.
    let ring = aya::maps::RingBuf::try_from(s.events).context("EVENTS is not a ring buffer")?;
    {
        let shared = shared.clone();
        let malformed = shared.metrics.malformed_events.clone();
        let context = context.clone();
        tokio::spawn(async move {
            let sink = |r: FlowRecord| {
                let f = &r.flow;
                let verdict = f.verdict.as_str();
                shared
                    .metrics
                    .flow_records
                    .with_label_values(&[verdict])
                    .inc();
                if f.verdict != FlowVerdict::Allowed {
                    tracing::info!(
                        endpoint = %f.endpoint, direction = ?f.direction, verdict,
                        flow = %format!("{}:{} -> {}:{} proto {}", f.src, f.src_port, f.dst, f.dst_port, f.protocol),
                        peer = %f.peer.as_ref().map_or_else(|| "-".to_string(), ToString::to_string),
                        rule = %f.rule, "flow"
                    );
                }
                if forward_flows && flow_tx.try_send(r.to_contract()).is_err() {
                    shared.drop_flows(1);
                }
                if let Ok(mut f) = shared.flows.lock() {
                    f.push(r);
                }
            };
            if let Err(e) = read_events(ring, context, sink, move || malformed.inc()).await {
                tracing::error!(error = %e, "flow event reader stopped");
            }
        });
    }

    // HTTP: counters on the metrics address (Prometheus scrapes it, often from another host);
    // flows and connections, which name every pod's peers, on a loopback one by default.
    let listener = tokio::net::TcpListener::bind(s.metrics_addr)
        .await
        .with_context(|| format!("bind metrics address {}", s.metrics_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz");
    let metrics_app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get({
                let shared = shared.clone();
                move || async move { shared.metrics.render() }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    let refused = shared.metrics.http_connections_refused.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::http_server::serve(
            listener,
            metrics_app,
            crate::http_server::Limits::default(),
            refused,
        )
        .await
        {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    let listener = tokio::net::TcpListener::bind(s.http_addr)
        .await
        .with_context(|| format!("bind HTTP address {}", s.http_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "serving /flows, /connections");
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/connections",
            axum::routing::get({
                let (pin_dir, context) = (s.pin_dir.clone(), context.clone());
                move |q: axum::extract::Query<ConnectionsQuery>| async move {
                    let ctx = context.read().map(|c| c.clone()).unwrap_or_default();
                    let pin_dir = pin_dir.clone();
                    let (offset, limit) = (
                        q.offset.unwrap_or(0),
                        q.limit
                            .unwrap_or(DEFAULT_CONNECTIONS_PAGE)
                            .clamp(1, bulkhead_agent::flows::MAX_CONNECTIONS_PAGE),
                    );
                    let (page, total) = tokio::task::spawn_blocking(move || {
                        bulkhead_agent::flows::connections(&pin_dir, &ctx, offset, limit)
                    })
                    .await
                    .unwrap_or_default();
                    connections_page(page, total, offset, limit)
                }
            }),
        )
        .route(
            "/flows",
            axum::routing::get({
                let shared = shared.clone();
                move |q: axum::extract::Query<FlowQuery>| async move {
                    let age = Duration::from_secs(q.since_seconds.unwrap_or(300));
                    let flows = shared
                        .flows
                        .lock()
                        .map(|f| f.since(age))
                        .unwrap_or_default();
                    axum::Json(flows)
                }
            }),
        )
        // A page on another site cannot read them through a rebound DNS name.
        .layer(axum::middleware::from_fn_with_state(
            crate::web::host_check::AllowedHosts::new(s.http_addr, &[]),
            crate::web::host_check::check_host,
        ));
    let refused = shared.metrics.http_connections_refused.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::http_server::serve(
            listener,
            app,
            crate::http_server::Limits::default(),
            refused,
        )
        .await
        {
            tracing::error!(error = %e, "flows server stopped");
        }
    });

    let realizer = Realizer {
        dataplane: s.dataplane,
        last: Mutex::new(None),
        shared: shared.clone(),
        names,
        context,
    };
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("stopping; the pinned programs keep enforcing the last rule set");
    };
    match s.source {
        Source::File(path) => {
            tokio::select! {
                r = follow_file(&realizer, &s.node, path, s.ruleset) => r?,
                _ = stop => {}
            }
        }
        Source::Controller(target) => {
            let flows = flow_forwarder((*target).clone(), s.node.clone(), flow_rx, shared.clone());
            tokio::spawn(flows);
            tokio::select! {
                _ = follow_controller(&realizer, &s.node, *target) => {}
                _ = stop => {}
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

type ApplyResult = anyhow::Result<(ApplyReport, usize)>;

/// The thread that owns the enforcer: it lives in the node's network namespace (when there is
/// one), so attaching, interface lookups and route lookups see that namespace, while the rest
/// of the agent stays where it started.
struct DataplaneThread {
    tx: std::sync::mpsc::Sender<Request>,
}

enum Request {
    Apply(Arc<RuleSet>, tokio::sync::oneshot::Sender<ApplyResult>),
    /// Whether an enforced endpoint's interface went away or was created again.
    InterfacesChanged(tokio::sync::oneshot::Sender<bool>),
}

impl DataplaneThread {
    fn start(
        mut enforcer: Enforcer,
        netns: Option<String>,
        uplinks: Vec<String>,
        prefilter: Option<bulkhead_agent::loader::PrefilterHook>,
    ) -> anyhow::Result<DataplaneThread> {
        let (tx, rx) = std::sync::mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        std::thread::Builder::new()
            .name("dataplane".into())
            .spawn(move || {
                if let Some(name) = &netns {
                    let entered = bulkhead_agent::netns::enter(
                        &bulkhead_agent::netns::netns_path(name),
                        name,
                    )
                    .with_context(|| format!("enter network namespace {name}"));
                    let failed = entered.is_err();
                    let _ = ready_tx.send(entered);
                    if failed {
                        return;
                    }
                } else {
                    let _ = ready_tx.send(Ok(()));
                }
                // The prefilter is best effort: enforcement does not depend on it. Uplinks an
                // earlier agent prefiltered that are no longer asked for (or all, with
                // `--prefilter off`) lose it.
                let dp = enforcer.dataplane();
                for (ifname, hook) in dp.prefiltered_interfaces() {
                    if prefilter.is_none() || !uplinks.contains(&ifname) {
                        dp.detach_prefilter(&ifname);
                        tracing::info!(uplink = %ifname, %hook, "prefilter detached");
                    }
                }
                for uplink in uplinks.iter().filter(|_| prefilter.is_some()) {
                    let hook = prefilter.unwrap_or_default();
                    match dp.attach_prefilter(uplink, hook) {
                        Ok(()) => tracing::info!(uplink = %uplink, %hook, "prefilter attached"),
                        Err(e) => tracing::warn!(uplink = %uplink, %hook, error = %e, "prefilter not attached"),
                    }
                }
                for request in rx {
                    match request {
                        Request::Apply(rs, reply) => {
                            let result = enforcer
                                .apply(&rs, &RouteResolver)
                                .map(|report| (report, enforcer.policy_key_count()))
                                .map_err(anyhow::Error::from);
                            let _ = reply.send(result);
                        }
                        Request::InterfacesChanged(reply) => {
                            let _ = reply.send(enforcer.interfaces_changed());
                        }
                    }
                }
            })
            .context("start the data-plane thread")?;
        ready_rx.recv().context("data-plane thread")??;
        Ok(DataplaneThread { tx })
    }

    async fn apply(&self, rs: Arc<RuleSet>) -> ApplyResult {
        let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Request::Apply(rs, reply_tx))
            .map_err(|_| anyhow::anyhow!("the data-plane thread is gone"))?;
        reply_rx.await.context("the data-plane thread is gone")?
    }

    /// False when the thread is gone (the next apply says so).
    async fn interfaces_changed(&self) -> bool {
        let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Request::InterfacesChanged(reply_tx)).is_err() {
            return false;
        }
        reply_rx.await.unwrap_or(false)
    }

    fn apply_blocking(&self, rs: Arc<RuleSet>) -> ApplyResult {
        let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Request::Apply(rs, reply_tx))
            .map_err(|_| anyhow::anyhow!("the data-plane thread is gone"))?;
        reply_rx
            .blocking_recv()
            .context("the data-plane thread is gone")?
    }
}

/// Writes rule sets into the kernel and keeps the metrics and flow naming in step.
struct Realizer {
    dataplane: DataplaneThread,
    /// The rule set last realized (for retries of missing interfaces).
    last: Mutex<Option<Arc<RuleSet>>>,
    shared: Arc<Shared>,
    names: Arc<RwLock<Vec<(u32, String)>>>,
    context: Arc<RwLock<FlowContext>>,
}

impl Realizer {
    async fn realize(&self, rs: &Arc<RuleSet>) -> anyhow::Result<ApplyReport> {
        let result = self.dataplane.apply(rs.clone()).await;
        let m = &self.shared.metrics;
        match result {
            Ok((report, keys)) => {
                log_report(&report);
                m.apply_seconds.observe(report.duration.as_secs_f64());
                m.realized_version.set(report.version as i64);
                m.missing_interfaces
                    .set(report.missing_interfaces.len() as i64);
                m.endpoints_locked_down.set(report.locked_down.len() as i64);
                m.endpoints.set(rs.endpoints.len() as i64);
                m.policy_entries.set(keys as i64);
                if let Ok(mut n) = self.names.write() {
                    *n = rs.endpoints.iter().map(|e| (e.id, e.name())).collect();
                }
                if let Ok(mut c) = self.context.write() {
                    *c = FlowContext::new(rs);
                }
                Ok(report)
            }
            Err(e) => {
                m.apply_errors.inc();
                tracing::error!(error = %format!("{e:#}"), "apply failed; the previous rule set stays in force");
                Err(e)
            }
        }
    }
}

/// File mode: the rule-set file is watched; missing interfaces are retried, and an interface
/// that went away or was created again is caught on the next tick.
async fn follow_file(r: &Realizer, node: &str, path: PathBuf, rs: RuleSet) -> anyhow::Result<()> {
    let mut rs = Arc::new(rs);
    let mut pending = true;
    let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen: Option<SystemTime> = mtime(&path);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let now = mtime(&path);
        if path != Path::new("-") && now != seen {
            seen = now;
            match load_file(&path, node) {
                Ok(new) => {
                    rs = Arc::new(new);
                    pending = true;
                }
                // Keep enforcing what we have: a bad file never opens anything.
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "rule set not applied; the previous one stays in force")
                }
            }
        }
        if pending || r.dataplane.interfaces_changed().await {
            pending = match r.realize(&rs).await {
                Ok(report) => !report.missing_interfaces.is_empty(),
                Err(_) => false,
            };
        }
    }
}

/// Controller mode: reconnects with backoff forever; enforcement never depends on the stream.
/// Endpoints whose interface does not exist yet are retried every second, and an enforced
/// interface that went away or was created again (a pod's sandbox recreated under the same
/// veth name) is applied again within a second.
async fn follow_controller(r: &Realizer, node: &str, target: crate::certs::ControllerTarget) {
    use bulkhead_proto::follower::{Follower, run_session_with_token};
    let mut follower = Follower::new(node);
    let mut backoff = Duration::from_millis(100);
    let missing = std::sync::atomic::AtomicBool::new(false);
    let retry = async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let due = missing.load(std::sync::atomic::Ordering::Relaxed)
                || r.dataplane.interfaces_changed().await;
            if due
                && let Some(rs) = r.last.lock().ok().and_then(|l| l.clone())
                && let Ok(report) = r.realize(&rs).await
            {
                missing.store(
                    !report.missing_interfaces.is_empty(),
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
        }
    };
    let follow = async {
        loop {
            let started = std::time::Instant::now();
            let connected = match (target.endpoint(), target.token()) {
                (Ok(endpoint), Ok(token)) => endpoint
                    .connect()
                    .await
                    .map(|c| (c, token))
                    .map_err(anyhow::Error::from),
                (Err(e), _) | (_, Err(e)) => Err(e),
            };
            let result = match connected {
                Ok((channel, token)) => run_session_with_token(
                    channel,
                    token.as_deref(),
                    &mut follower,
                    |rs| async {
                        let result = r.realize(&rs).await;
                        match result {
                            Ok(report) => {
                                missing.store(
                                    !report.missing_interfaces.is_empty(),
                                    std::sync::atomic::Ordering::Relaxed,
                                );
                                if let Ok(mut l) = r.last.lock() {
                                    *l = Some(rs);
                                }
                                Ok(bulkhead_proto::follower::Realized {
                                    connections_cut: report.connections_cut as u64,
                                })
                            }
                            Err(e) => Err(format!("{e:#}")),
                        }
                    },
                    || {
                        r.shared.metrics.controller_connected.set(1);
                        tracing::info!("following the controller");
                    },
                )
                .await
                .map_err(anyhow::Error::from),
                Err(e) => Err(e.context("connect to the controller")),
            };
            if let Err(e) = result {
                tracing::warn!(error = %format!("{e:#}"), "controller stream lost; the last rule set stays enforced");
            }
            r.shared.metrics.controller_connected.set(0);
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    };
    tokio::select! {
        _ = retry => {}
        _ = follow => {}
    }
}

/// Flow records to the controller in batches; when the controller is away or slow, records are
/// dropped and counted, never queued without bound.
async fn flow_forwarder(
    target: crate::certs::ControllerTarget,
    node: String,
    mut rx: tokio::sync::mpsc::Receiver<bulkhead_ruleset::FlowRecord>,
    shared: Arc<Shared>,
) {
    use bulkhead_proto::v1 as pb;
    loop {
        let (Ok(endpoint), Ok(token)) = (target.endpoint(), target.token()) else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let Ok(channel) = endpoint.connect().await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let mut client = pb::distribution_client::DistributionClient::new(channel);
        let (btx, brx) = tokio::sync::mpsc::channel::<pb::FlowBatch>(4);
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(brx));
        if let Some(token) = &token
            && let Ok(value) = bulkhead_proto::follower::bearer_value(token)
        {
            request.metadata_mut().insert("authorization", value);
        }
        let call = tokio::spawn(async move { client.report_flows(request).await });
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut batch: Vec<pb::FlowRecord> = Vec::new();
        // Records handed to this stream; the controller's summary says how many it took.
        let mut sent = 0u64;
        loop {
            tokio::select! {
                r = rx.recv() => match r {
                    Some(rec) => {
                        batch.push(pb::FlowRecord::from(rec));
                        if batch.len() < 512 { continue; }
                    }
                    None => return,
                },
                _ = tick.tick() => {}
            }
            if batch.is_empty() {
                continue;
            }
            let dropped = shared
                .flows_dropped
                .swap(0, std::sync::atomic::Ordering::Relaxed);
            let b = pb::FlowBatch {
                node: node.clone(),
                records: std::mem::take(&mut batch),
                dropped,
            };
            let n = b.records.len() as u64;
            if let Err(unsent) = btx.send(b).await {
                // The stream is gone: these never left, and their drop count goes with the
                // next batch that does.
                shared.drop_flows(unsent.0.records.len() as u64);
                shared
                    .flows_dropped
                    .fetch_add(unsent.0.dropped, std::sync::atomic::Ordering::Relaxed);
                break;
            }
            sent += n;
        }
        drop(btx);
        match call.await {
            Ok(Ok(summary)) => {
                let lost = sent.saturating_sub(summary.into_inner().accepted);
                if lost > 0 {
                    shared.drop_flows(lost);
                }
            }
            // Sent, but whether they arrived is unknown: counted apart, not as dropped, so the
            // controller's and the agent's figures never count a record twice.
            _ => shared.metrics.flow_records_unconfirmed.inc_by(sent),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Connections one `/connections` page holds unless `limit` says otherwise.
const DEFAULT_CONNECTIONS_PAGE: usize = 1_000;

/// `/connections?offset=N&limit=M`: a page of the tracked connections.
#[derive(serde::Deserialize)]
struct ConnectionsQuery {
    offset: Option<usize>,
    limit: Option<usize>,
}

/// A page of connections as a JSON array, with the total in `X-Total-Count` and, when more
/// follow, the next page in a `Link: <…>; rel="next"` header.
fn connections_page(
    page: Vec<bulkhead_agent::flows::Connection>,
    total: usize,
    offset: usize,
    limit: usize,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut response = axum::Json(page).into_response();
    let headers = response.headers_mut();
    headers.insert("x-total-count", total.into());
    let next = offset.saturating_add(limit);
    if next < total
        && let Ok(link) =
            format!("</connections?offset={next}&limit={limit}>; rel=\"next\"").parse()
    {
        headers.insert(axum::http::header::LINK, link);
    }
    response
}

#[derive(serde::Deserialize)]
struct FlowQuery {
    since_seconds: Option<u64>,
}

fn log_report(r: &bulkhead_agent::sync::ApplyReport) {
    tracing::info!(
        version = r.version,
        endpoints_written = r.endpoints_written,
        endpoints_removed = r.endpoints_removed,
        policy_entries = r.policy_entries_written,
        groups_written = r.groups_written,
        connections_cut = r.connections_cut,
        apply_ms = r.duration.as_secs_f64() * 1e3,
        "rule set realized"
    );
    for m in &r.missing_interfaces {
        tracing::warn!(endpoint = %m, "interface not found yet; will retry");
    }
    for l in &r.locked_down {
        tracing::error!(endpoint = %l, "endpoint locked down: its policy group does not fit in the maps or is missing");
    }
}
