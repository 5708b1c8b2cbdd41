//! The agent runtime (`bulkhead agent run`): loads the eBPF programs, follows a rule-set file
//! or the controller, realizes each rule set in the kernel through the data-plane thread,
//! reads flow events, forwards them to the controller, and serves `/metrics`, `/healthz`,
//! `/flows` and `/connections` over HTTP.
//!
//! - [`dataplane_thread`]: the thread that owns the enforcer (in the node's network namespace);
//! - [`follow`]: following a file or the controller, and forwarding flow records;
//! - [`http`]: the two HTTP endpoints.

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, Mutex, RwLock},
};

use anyhow::{Context, bail};
use bulkhead_proto::client::ControllerTarget;
use bulkhead_ruleset::RuleSet;

use crate::{
    flows::{FlowContext, FlowRecord, FlowVerdict, RecentFlows, read_events},
    loader::{Dataplane, PrefilterHook, remove_pins},
    metrics::AgentMetrics,
    sync::Enforcer,
};

mod dataplane_thread;
mod follow;
mod http;
pub mod names;

use dataplane_thread::{DataplaneThread, Realizer, log_names, log_report};

/// Where the rule sets come from.
#[derive(Clone, Debug)]
pub enum RuleSource {
    /// A rule-set file (`-`: standard input, read once), watched and re-applied on change.
    File(PathBuf),
    /// The controller's address and our TLS files, read anew at every connection so that
    /// rotated certificates (cert-manager renews them in place) are picked up without a
    /// restart.
    Controller(Box<ControllerTarget>),
}

/// What `bulkhead agent run` was asked to do.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// This node's name (selects the rule set and names the pin directory).
    pub node: String,
    pub source: RuleSource,
    /// bpffs directory for this node's maps and links ([`default_pin_dir`] unless given).
    pub pin_dir: PathBuf,
    /// Apply once and exit (a file source only).
    pub once: bool,
    /// `/metrics` and `/healthz`.
    pub metrics_addr: SocketAddr,
    /// `/flows` and `/connections`.
    pub http_addr: SocketAddr,
    /// Serve `/flows` and `/connections` on a non-loopback address.
    pub http_unauthenticated: bool,
    /// Flow records kept in memory for `/flows`.
    pub flow_buffer: usize,
    /// Enforce on the interfaces of this named network namespace.
    pub netns: Option<String>,
    /// Uplinks that get the prefilter.
    pub uplinks: Vec<String>,
    /// Where the prefilter runs on the uplinks (`None`: nowhere).
    pub prefilter: Option<PrefilterHook>,
    /// Learning of DNS answers: the agent's own resolvers and the TTL bounds.
    pub fqdn: names::FqdnSettings,
}

/// The pin directory of a node unless one is given.
pub fn default_pin_dir(node: &str) -> PathBuf {
    PathBuf::from("/sys/fs/bpf/bulkhead").join(node)
}

/// `bulkhead agent reset`: removes the node's pinned programs, links and maps.
pub fn reset(pin_dir: &Path) -> anyhow::Result<()> {
    remove_pins(pin_dir).with_context(|| format!("remove pins under {}", pin_dir.display()))
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

pub(super) fn load_file(path: &Path, node: &str) -> anyhow::Result<RuleSet> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("read rule set from stdin")?
    } else {
        fs::read_to_string(path).with_context(|| format!("read rule set {}", path.display()))?
    };
    read_ruleset(&text, node)
}

/// Runs the agent until it is stopped (Ctrl-C), or applies once with [`AgentConfig::once`]
/// (exit code 3 when interfaces are missing).
pub fn run(config: AgentConfig) -> anyhow::Result<ExitCode> {
    let AgentConfig {
        node,
        source,
        pin_dir: dir,
        once,
        metrics_addr,
        http_addr,
        http_unauthenticated,
        flow_buffer,
        netns,
        uplinks: uplink,
        prefilter,
        fqdn,
    } = config;
    if !http_addr.ip().is_loopback() && !http_unauthenticated {
        bail!(
            "--http {http_addr} would show every flow and connection of this node to anyone who reaches it: keep it on loopback (127.0.0.1), or pass --http-unauthenticated"
        );
    }
    if let RuleSource::Controller(target) = &source {
        // Bad flags or unreadable certificates fail here, at start; later reads (every
        // reconnection) retry instead.
        target.endpoint()?;
    }
    // Until the first rule set arrives, whatever the pinned maps hold stays enforced.
    let rs = match &source {
        RuleSource::File(path) => load_file(path, &node)?,
        RuleSource::Controller(_) => RuleSet {
            node: node.clone(),
            ..Default::default()
        },
    };
    let mut dp = Dataplane::load(&dir).context("load the data plane")?;
    let events = dp
        .take_map("EVENTS")
        .context("the eBPF object has no EVENTS map")?;
    let enforcer = Enforcer::new(dp).context("open the pinned maps")?;
    let dataplane = DataplaneThread::start(enforcer, netns, uplink, prefilter, fqdn)?;
    if once {
        if !matches!(source, RuleSource::File(_)) {
            bail!("--once applies a rule-set file; it does not follow a controller");
        }
        let applied = dataplane.apply_blocking(Arc::new(rs))?;
        log_report(&applied.report);
        log_names(&applied.names);
        let report = applied.report;
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

struct Serve {
    node: String,
    source: RuleSource,
    pin_dir: PathBuf,
    ruleset: RuleSet,
    dataplane: DataplaneThread,
    events: aya::maps::Map,
    metrics_addr: std::net::SocketAddr,
    http_addr: std::net::SocketAddr,
    flow_buffer: usize,
}

pub(super) struct Shared {
    pub(super) metrics: AgentMetrics,
    pub(super) flows: Mutex<RecentFlows>,
    /// Flow records not forwarded to the controller (queue full, or the stream broke before
    /// they left), not yet reported to it.
    pub(super) flows_dropped: std::sync::atomic::AtomicU64,
}

impl Shared {
    /// Counts `n` flow records the controller will not get; the next batch reports them.
    pub(super) fn drop_flows(&self, n: u64) {
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
    let forward_flows = matches!(s.source, RuleSource::Controller(_));

    // Flow events: kernel ring buffer → flow records.
    let ring = aya::maps::RingBuf::try_from(s.events).context("EVENTS is not a ring buffer")?;
    // What endpoints learned from DNS names world peers in flow records; without it they
    // are plain world peers.
    let learned = crate::fqdn::LearnedMaps::open(&s.pin_dir)
        .inspect_err(
            |e| tracing::warn!(error = %e, "flow records will not name peers learned from DNS"),
        )
        .ok();
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
            if let Err(e) = read_events(ring, context, learned, sink, move || malformed.inc()).await
            {
                tracing::error!(error = %e, "flow event reader stopped");
            }
        });
    }

    // HTTP: counters on the metrics address (Prometheus scrapes it, often from another host);
    // flows and connections, which name every pod's peers, on a loopback one by default.
    http::serve_metrics(s.metrics_addr, shared.clone()).await?;
    http::serve_flows(
        s.http_addr,
        s.pin_dir.clone(),
        context.clone(),
        shared.clone(),
    )
    .await?;

    let realizer = Realizer {
        dataplane: s.dataplane,
        last: Mutex::new(None),
        shared: shared.clone(),
        names,
        context,
        name_patterns: Default::default(),
    };
    // Ctrl-C, or SIGTERM: how Kubernetes and container runtimes stop a container. As the
    // container's PID 1 the agent has no default action for SIGTERM, so without this it was
    // killed only after the whole grace period.
    let stop = async {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        tracing::info!("stopping; the pinned programs keep enforcing the last rule set");
    };
    // What the endpoints learned expires with its TTL: cleared every second.
    let sweep = async {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            realizer.sweep().await;
        }
    };
    match s.source {
        RuleSource::File(path) => {
            tokio::select! {
                r = follow::follow_file(&realizer, &s.node, path, s.ruleset) => r?,
                _ = sweep => {}
                _ = stop => {}
            }
        }
        RuleSource::Controller(target) => {
            let flows =
                follow::flow_forwarder((*target).clone(), s.node.clone(), flow_rx, shared.clone());
            tokio::spawn(flows);
            tokio::select! {
                _ = follow::follow_controller(&realizer, &s.node, *target) => {}
                _ = sweep => {}
                _ = stop => {}
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
