//! `bulkhead agent`: enforce a node's rule set.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::{Context, bail};
use std::sync::{Arc, Mutex, RwLock};

use bulkhead_agent::{
    flows::{FlowContext, FlowRecord, FlowVerdict, RecentFlows, read_events},
    loader::{Dataplane, remove_pins},
    metrics::AgentMetrics,
    sync::{Enforcer, RouteResolver},
};
use bulkhead_controller::ruleset::RuleSet;
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct AgentArgs {
    #[command(subcommand)]
    command: AgentCommand,
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Enforce the rule set in FILE (JSON, as `bulkhead policy compile` prints it: one RuleSet,
    /// or an object of them keyed by node name). The file is watched and re-applied when it
    /// changes; endpoints whose interface is missing are retried.
    Run {
        /// This node's name (selects the rule set and names the pin directory).
        #[arg(long, env = "BULKHEAD_NODE")]
        node: String,
        /// Rule-set file; `-` reads standard input once.
        #[arg(long)]
        ruleset: PathBuf,
        /// bpffs directory for this node's maps and links.
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        /// Apply once and exit. The pinned programs keep enforcing after the agent is gone.
        #[arg(long)]
        once: bool,
        /// Address of the HTTP endpoint serving `/metrics` (Prometheus), `/healthz` and
        /// `/flows` (recent flow records as JSON).
        #[arg(long, default_value = "127.0.0.1:9962")]
        metrics_addr: std::net::SocketAddr,
        /// Flow records kept in memory for `/flows` (oldest evicted first).
        #[arg(long, default_value_t = 10_000)]
        flow_buffer: usize,
        /// Run in this named network namespace (`ip netns add`), e.g. a lab node. The agent
        /// enters only the network namespace, so its pins land on the host's bpffs and outlive
        /// it; under `ip netns exec`, which also remounts /sys, they would vanish with it.
        #[arg(long)]
        netns: Option<String>,
    },
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
        AgentCommand::Run {
            node,
            ruleset,
            pin_dir,
            once,
            metrics_addr,
            flow_buffer,
            netns,
        } => {
            if let Some(name) = &netns {
                // Still single-threaded here: every thread started later inherits it.
                bulkhead_agent::netns::enter(&bulkhead_agent::netns::netns_path(name), name)
                    .with_context(|| format!("enter network namespace {name}"))?;
            }
            let dir = pin_dir.unwrap_or_else(|| default_pin_dir(&node));
            let rs = load_file(&ruleset, &node)?;
            let mut dp = Dataplane::load(&dir).context("load the data plane")?;
            let events = dp
                .take_map("EVENTS")
                .context("the eBPF object has no EVENTS map")?;
            let mut enforcer = Enforcer::new(dp).context("open the pinned maps")?;
            if once {
                let report = enforcer.apply(&rs, &RouteResolver)?;
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
                ruleset_path: ruleset,
                pin_dir: dir,
                ruleset: rs,
                enforcer,
                events,
                metrics_addr,
                flow_buffer,
            }))
        }
    }
}

struct Serve {
    node: String,
    ruleset_path: PathBuf,
    pin_dir: PathBuf,
    ruleset: RuleSet,
    enforcer: Enforcer,
    events: aya::maps::Map,
    metrics_addr: std::net::SocketAddr,
    flow_buffer: usize,
}

struct Shared {
    metrics: AgentMetrics,
    flows: Mutex<RecentFlows>,
}

async fn serve(s: Serve) -> anyhow::Result<ExitCode> {
    let names: Arc<RwLock<Vec<(u32, String)>>> = Arc::default();
    let context = Arc::new(RwLock::new(FlowContext::new(&s.ruleset)));
    let metrics = AgentMetrics::new(&s.pin_dir, names.clone()).context("register metrics")?;
    let shared = Arc::new(Shared {
        metrics,
        flows: Mutex::new(RecentFlows::new(s.flow_buffer)),
    });

    // Flow events: kernel ring buffer → flow records.
    let ring = aya::maps::RingBuf::try_from(s.events).context("EVENTS is not a ring buffer")?;
    {
        let shared = shared.clone();
        let malformed = shared.metrics.malformed_events.clone();
        let context = context.clone();
        tokio::spawn(async move {
            let sink = |r: FlowRecord| {
                let verdict = match r.verdict {
                    FlowVerdict::Allowed => "allowed",
                    FlowVerdict::Denied => "denied",
                    FlowVerdict::AuditWouldDeny => "audit-would-deny",
                };
                shared
                    .metrics
                    .flow_records
                    .with_label_values(&[verdict])
                    .inc();
                if r.verdict != FlowVerdict::Allowed {
                    tracing::info!(
                        endpoint = %r.endpoint, direction = ?r.direction, verdict,
                        flow = %format!("{}:{} -> {}:{} proto {}", r.src, r.src_port, r.dst, r.dst_port, r.protocol),
                        peer = r.peer.as_deref().unwrap_or("-"), rule = %r.rule, "flow"
                    );
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

    // HTTP: /metrics, /healthz, /flows.
    let listener = tokio::net::TcpListener::bind(s.metrics_addr)
        .await
        .with_context(|| format!("bind metrics address {}", s.metrics_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /flows");
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get({
                let shared = shared.clone();
                move || async move { shared.metrics.render() }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }))
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
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });

    // Apply loop: the rule-set file is watched; missing interfaces are retried.
    let enforcer = Arc::new(Mutex::new(s.enforcer));
    let mut rs = s.ruleset;
    let mut pending = true;
    let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen: Option<SystemTime> = mtime(&s.ruleset_path);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("stopping; the pinned programs keep enforcing the last rule set");
                return Ok(ExitCode::SUCCESS);
            }
        }
        let now = mtime(&s.ruleset_path);
        if s.ruleset_path != Path::new("-") && now != seen {
            seen = now;
            match load_file(&s.ruleset_path, &s.node) {
                Ok(new) => {
                    rs = new;
                    pending = true;
                }
                // Keep enforcing what we have: a bad file never opens anything.
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "rule set not applied; the previous one stays in force")
                }
            }
        }
        if !pending {
            continue;
        }
        let apply_rs = rs.clone();
        let enforcer = enforcer.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut e = enforcer
                .lock()
                .map_err(|_| anyhow::anyhow!("enforcer lock poisoned"))?;
            let report = e
                .apply(&apply_rs, &RouteResolver)
                .map_err(anyhow::Error::from)?;
            Ok::<_, anyhow::Error>((report, e.policy_key_count()))
        })
        .await
        .context("apply task")?;
        let m = &shared.metrics;
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
                pending = !report.missing_interfaces.is_empty();
                if let Ok(mut n) = names.write() {
                    *n = rs.endpoints.iter().map(|e| (e.id, e.name())).collect();
                }
                if let Ok(mut c) = context.write() {
                    *c = FlowContext::new(&rs);
                }
            }
            Err(e) => {
                m.apply_errors.inc();
                pending = false;
                tracing::error!(error = %format!("{e:#}"), "apply failed; the previous rule set stays in force");
            }
        }
    }
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
        apply_ms = r.duration.as_secs_f64() * 1e3,
        "rule set realized"
    );
    for m in &r.missing_interfaces {
        tracing::warn!(endpoint = %m, "interface not found yet; will retry");
    }
    for l in &r.locked_down {
        tracing::error!(endpoint = %l, "endpoint locked down: its policy does not fit in the maps");
    }
}
