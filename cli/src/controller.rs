//! `bulkhead controller`: the policy engine fed from manifests, serving rule sets to agents over
//! gRPC (mTLS), with `/metrics`, `/healthz` and a small JSON API over HTTP.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context, bail};
use bulkhead_controller::kubernetes::{Gate, KubernetesOptions, Running};
use bulkhead_controller::{
    EngineConfig, PolicyEngine,
    distribution::{
        AdminService, DistributionService, FlowStore, Hub, ManifestSource,
        quarantine::QuarantineControl,
    },
    flows::{FlowPipeline, ServiceGraph},
    supervise::{Backoff, TaskRestarts, spawn_supervised},
};
use bulkhead_proto::v1::admin_server::AdminServer;
use clap::Args;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

#[derive(Args)]
pub struct ControllerArgs {
    /// Directories or files of Kubernetes YAML (Namespaces, Pods, Nodes, policies); re-read when
    /// they change. Required unless --kubernetes.
    #[arg(
        long = "manifests",
        short = 'f',
        required_unless_present = "kubernetes"
    )]
    pub manifests: Vec<PathBuf>,
    /// gRPC address for agents and admin clients.
    #[arg(long, default_value = "127.0.0.1:9960")]
    pub listen: SocketAddr,
    /// HTTP address of the web UI and the JSON API (`/api/*`: the map, flows, policies,
    /// quarantine). Loopback by default; see --http-auth.
    #[arg(long, default_value = "127.0.0.1:9961")]
    pub http: SocketAddr,
    /// HTTP address of `/metrics`, `/healthz` and `/readyz` (Prometheus and probes; counters
    /// by node, policy and namespace pair, no addresses or individual flows).
    #[arg(long, default_value = "127.0.0.1:9963")]
    pub metrics: SocketAddr,
    /// Server certificate (PEM); with --tls-key and --client-ca, agents must present a
    /// certificate signed by that CA (mTLS).
    #[arg(long, requires_all = ["tls_key", "client_ca"])]
    pub tls_cert: Option<PathBuf>,
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    #[arg(long)]
    pub client_ca: Option<PathBuf>,
    /// Serve without TLS (anyone who can reach the port can pull rule sets).
    #[arg(long, conflicts_with = "tls_cert")]
    pub insecure: bool,
    /// Flow records kept in memory (oldest evicted first).
    #[arg(long, default_value_t = 100_000)]
    pub flow_store: usize,
    /// Edges of the service graph not seen for this long are forgotten (and workloads with
    /// them), so the graph follows the cluster instead of growing with every pod that ever ran.
    /// `0s` keeps every edge.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub graph_ttl: Duration,
    /// Where quarantines made through the API are kept (as Quarantine manifests, so they
    /// survive restarts) with their audit log. Default: `quarantines/` in the first manifest
    /// directory.
    #[arg(long)]
    pub quarantine_dir: Option<PathBuf>,
    /// How often the manifests are checked for changes, in milliseconds.
    #[arg(long, default_value_t = 300)]
    pub reload_ms: u64,
    /// Common name of a client certificate that may act as the agent of any node (a certificate
    /// shared by all agents, as a Helm install issues). Other agents' certificates must name
    /// their own node.
    #[arg(long = "any-node-client", default_value = "bulkhead-agent")]
    pub any_node_clients: Vec<String>,
    /// Common name of a client certificate that may quarantine and release pods.
    #[arg(long = "admin-client", default_value = "admin")]
    pub admin_clients: Vec<String>,
    /// An agent with an --any-node-client certificate must also send its pod's
    /// service-account token (`agent run --token-file`); the API server reviews it, and the
    /// agent may act only for the node that pod runs on. Needs --kubernetes.
    #[arg(long, requires_all = ["kubernetes", "agent_service_account"])]
    pub agent_token_review: bool,
    /// The agents' service account, `NAMESPACE/NAME`, whose tokens --agent-token-review accepts.
    #[arg(long)]
    pub agent_service_account: Option<String>,
    /// The audience the agents' projected tokens are issued for.
    #[arg(long, default_value = "bulkhead-controller")]
    pub agent_token_audience: String,
    #[command(flatten)]
    pub kube: KubernetesArgs,
    #[command(flatten)]
    pub web: crate::web::WebArgs,
}

pub fn run(args: ControllerArgs) -> anyhow::Result<ExitCode> {
    let tls = match (
        &args.tls_cert,
        &args.tls_key,
        &args.client_ca,
        args.insecure,
    ) {
        (Some(c), Some(k), Some(ca), false) => Some(std::sync::Arc::new(
            crate::certs::ReloadingServerTls::new(c, k, ca)?,
        )),
        (_, _, _, true) => None,
        _ => bail!(
            "mTLS is on by default: pass --tls-cert, --tls-key and --client-ca (see `bulkhead certs generate`), or --insecure"
        ),
    };
    check_http_exposure(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(serve(args, tls))
}

/// The API shows every flow and workload and can quarantine: refuse to serve it beyond
/// loopback without authentication unless told so, and refuse auth settings that cannot work.
fn check_http_exposure(args: &ControllerArgs) -> anyhow::Result<()> {
    use crate::web::auth::HttpAuthMode;
    let web = &args.web;
    match web.http_auth {
        HttpAuthMode::None if !args.http.ip().is_loopback() && !web.http_unauthenticated => bail!(
            "--http {} would serve every flow and workload to anyone who reaches it: pass --http-auth tokens (with --http-tokens) or --http-auth kubernetes, keep it on loopback, or pass --http-unauthenticated",
            args.http
        ),
        HttpAuthMode::Tokens if web.http_tokens.is_none() => {
            bail!("--http-auth tokens needs --http-tokens FILE (lines `ROLE NAME TOKEN`)")
        }
        HttpAuthMode::Kubernetes if !args.kube.kubernetes => {
            bail!("--http-auth kubernetes reviews tokens with the Kubernetes API: add --kubernetes")
        }
        _ => {}
    }
    if web.http_tokens.is_some() && web.http_auth != HttpAuthMode::Tokens {
        bail!("--http-tokens is read only with --http-auth tokens");
    }
    if let Some(sa) = &args.agent_service_account {
        parse_service_account(sa)?;
    }
    Ok(())
}

/// `NAMESPACE/NAME`.
fn parse_service_account(sa: &str) -> anyhow::Result<(String, String)> {
    match sa.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => bail!("--agent-service-account {sa:?}: write it as NAMESPACE/NAME"),
    }
}

struct ControllerMetrics {
    registry: Registry,
    agents_connected: IntGauge,
    nodes: IntGauge,
    deltas_sent: IntGauge,
    resyncs: IntGauge,
    snapshots: IntGauge,
    input_errors: IntCounter,
    policy_nodes: IntGaugeVec,
    policy_realized: IntGaugeVec,
    flows_stored: IntGauge,
    flows_evicted: IntGauge,
    flows_accepted: IntGauge,
    flows_dropped_by_agents: IntGauge,
    flows_by_verdict: IntCounterVec,
    flows_by_namespace_pair: IntCounterVec,
    drops_by_rule: IntCounterVec,
    graph_nodes: IntGauge,
    graph_edges: IntGauge,
    kubernetes_source: IntCounterVec,
    flows_rejected: IntCounterVec,
    graph_edges_refused: IntGauge,
    acks_refused: IntGauge,
    unknown_nodes: IntGauge,
    task_restarts: IntCounterVec,
    /// Connections to the HTTP endpoint closed on accept: too many were open.
    http_connections_refused: IntCounter,
}

impl ControllerMetrics {
    fn new() -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("bulkhead_controller".into()), None)?;
        let g = |name: &str, help: &str| IntGauge::new(name, help);
        let m = ControllerMetrics {
            agents_connected: g(
                "agents_connected",
                "Nodes with at least one agent stream open",
            )?,
            nodes: g("nodes", "Nodes with a rule set")?,
            deltas_sent: g("deltas_sent_total", "Deltas queued to agent streams")?,
            resyncs: g(
                "resyncs_total",
                "Agent streams cut loose because they fell behind (they resync with a snapshot)",
            )?,
            snapshots: g("snapshots_total", "Full snapshots sent")?,
            input_errors: IntCounter::new("input_errors_total", "Invalid manifest documents seen")?,
            policy_nodes: IntGaugeVec::new(
                Opts::new("policy_nodes", "Nodes whose rule set a policy concerns"),
                &["kind", "namespace", "name"],
            )?,
            policy_realized: IntGaugeVec::new(
                Opts::new(
                    "policy_realized_nodes",
                    "Of those, nodes whose agent acked the current version",
                ),
                &["kind", "namespace", "name"],
            )?,
            flows_stored: g("flows_stored", "Flow records in the store")?,
            flows_evicted: g("flows_evicted_total", "Flow records evicted from the store")?,
            flows_accepted: g("flows_accepted_total", "Flow records received from agents")?,
            flows_dropped_by_agents: g(
                "flows_dropped_by_agents_total",
                "Flow records agents dropped before sending (backpressure)",
            )?,
            flows_by_verdict: IntCounterVec::new(
                Opts::new(
                    "flows_total",
                    "Flow records folded into the service graph, by verdict",
                ),
                &["verdict"],
            )?,
            flows_by_namespace_pair: IntCounterVec::new(
                Opts::new(
                    "namespace_pair_flows_total",
                    "Connections counted in the graph, by source and destination namespace and verdict",
                ),
                &["src_namespace", "dst_namespace", "verdict"],
            )?,
            drops_by_rule: IntCounterVec::new(
                Opts::new(
                    "drops_by_rule_total",
                    "Denied flows by the rule that denied them",
                ),
                &["rule"],
            )?,
            graph_nodes: g("graph_nodes", "Workloads in the service graph")?,
            graph_edges: g("graph_edges", "Edges in the service graph")?,
            kubernetes_source: IntCounterVec::new(
                Opts::new(
                    "kubernetes_source_total",
                    "What the Kubernetes source did: watch events handled, model changes applied, hub updates, watch errors (each retried; 410 Gone re-lists), status patches written and refused, Events published",
                ),
                &["what"],
            )?,
            flows_rejected: IntCounterVec::new(
                Opts::new(
                    "flow_records_rejected_total",
                    "Flow records refused at ingest (an unknown verdict, kind or direction, an address that is no IP, a name or text over its limit), by reason; neither stored nor drawn",
                ),
                &["reason"],
            )?,
            graph_edges_refused: g(
                "graph_edges_refused_total",
                "Records not drawn because the service graph holds its maximum of edges",
            )?,
            acks_refused: g(
                "acks_refused_total",
                "Agent acks refused for naming a version their stream was not sent (the stream is closed)",
            )?,
            unknown_nodes: g(
                "unknown_nodes_total",
                "Agent streams (Sync and flow reports) refused for naming a node the inventory does not have",
            )?,
            task_restarts: IntCounterVec::new(
                Opts::new(
                    "task_restarts_total",
                    "Background tasks (Kubernetes source and status writer, manifest reload, quarantine expiry, graph TTL) restarted after they panicked or stopped, by task",
                ),
                &["task"],
            )?,
            http_connections_refused: IntCounter::new(
                "http_connections_refused_total",
                "Connections to the HTTP endpoint (API, web UI, metrics) closed on accept because too many were open",
            )?,
            registry,
        };
        for c in [
            Box::new(m.agents_connected.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.nodes.clone()),
            Box::new(m.deltas_sent.clone()),
            Box::new(m.resyncs.clone()),
            Box::new(m.snapshots.clone()),
            Box::new(m.input_errors.clone()),
            Box::new(m.policy_nodes.clone()),
            Box::new(m.policy_realized.clone()),
            Box::new(m.flows_stored.clone()),
            Box::new(m.flows_evicted.clone()),
            Box::new(m.flows_accepted.clone()),
            Box::new(m.flows_dropped_by_agents.clone()),
            Box::new(m.flows_by_verdict.clone()),
            Box::new(m.flows_by_namespace_pair.clone()),
            Box::new(m.drops_by_rule.clone()),
            Box::new(m.flows_rejected.clone()),
            Box::new(m.graph_edges_refused.clone()),
            Box::new(m.acks_refused.clone()),
            Box::new(m.unknown_nodes.clone()),
            Box::new(m.graph_nodes.clone()),
            Box::new(m.graph_edges.clone()),
            Box::new(m.kubernetes_source.clone()),
            Box::new(m.task_restarts.clone()),
            Box::new(m.http_connections_refused.clone()),
        ] {
            m.registry.register(c)?;
        }
        Ok(m)
    }

    /// Brings the Kubernetes source's counters up to its own.
    fn sync_kubernetes_counters(&self, stats: &bulkhead_controller::kubernetes::SourceStats) {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        for (what, n) in [
            ("watch_events", load(&stats.events)),
            ("changes", load(&stats.changes)),
            ("applies", load(&stats.applies)),
            ("watch_errors", load(&stats.watch_errors)),
            ("status_writes", load(&stats.status_writes)),
            ("status_errors", load(&stats.status_errors)),
            ("events_published", load(&stats.events_published)),
        ] {
            let c = self.kubernetes_source.with_label_values(&[what]);
            c.inc_by(n.saturating_sub(c.get()));
        }
    }

    /// Brings the restart counters up to the supervisor's.
    fn sync_task_restarts(&self, restarts: &TaskRestarts) {
        for (task, n) in restarts.all() {
            let c = self.task_restarts.with_label_values(&[task]);
            c.inc_by(n.saturating_sub(c.get()));
        }
    }

    /// Brings the flow counters up to the graph's (which counts every record as it is folded
    /// in, so the ingest path never touches a label set).
    fn sync_flow_counters(&self, graph: &Mutex<ServiceGraph>, pipeline: &FlowPipeline) {
        let catch_up = |c: IntCounter, total: u64| c.inc_by(total.saturating_sub(c.get()));
        for (why, n) in pipeline.rejected() {
            catch_up(self.flows_rejected.with_label_values(&[why.label()]), n);
        }
        let Ok(g) = graph.lock() else { return };
        self.graph_edges_refused.set(g.edges_refused as i64);
        for (verdict, n) in g.by_verdict() {
            catch_up(self.flows_by_verdict.with_label_values(&[verdict]), n);
        }
        for ((src, dst, verdict), n) in g.by_namespace_pair() {
            catch_up(
                self.flows_by_namespace_pair
                    .with_label_values(&[src, dst, verdict]),
                n,
            );
        }
        for (rule, n) in g.drops_by_rule() {
            catch_up(self.drops_by_rule.with_label_values(&[rule]), n);
        }
        let (nodes, edges) = g.len();
        self.graph_nodes.set(nodes as i64);
        self.graph_edges.set(edges as i64);
    }

    fn render(&self, hub: &Hub, flows: &Mutex<FlowStore>) -> String {
        let nodes = hub.node_states();
        self.nodes.set(nodes.len() as i64);
        self.agents_connected
            .set(nodes.iter().filter(|n| n.connected).count() as i64);
        self.deltas_sent
            .set(hub.counters.deltas_sent.load(Ordering::Relaxed) as i64);
        self.resyncs
            .set(hub.counters.resyncs.load(Ordering::Relaxed) as i64);
        self.snapshots
            .set(hub.counters.snapshots.load(Ordering::Relaxed) as i64);
        self.acks_refused
            .set(hub.counters.acks_refused.load(Ordering::Relaxed) as i64);
        self.unknown_nodes
            .set(hub.counters.unknown_nodes.load(Ordering::Relaxed) as i64);
        self.policy_nodes.reset();
        self.policy_realized.reset();
        for p in hub.policy_status() {
            let kind = p.kind.as_str();
            let labels = [kind, p.namespace.as_str(), p.name.as_str()];
            self.policy_nodes
                .with_label_values(&labels)
                .set(p.nodes as i64);
            self.policy_realized
                .with_label_values(&labels)
                .set(p.realized as i64);
        }
        if let Ok(f) = flows.lock() {
            self.flows_stored.set(f.len() as i64);
            self.flows_evicted.set(f.evicted as i64);
            self.flows_accepted.set(f.accepted as i64);
            self.flows_dropped_by_agents.set(f.dropped_by_agents as i64);
        }
        let mut buf = String::new();
        if let Err(e) =
            prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut buf)
        {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        buf
    }
}

async fn serve(
    args: ControllerArgs,
    tls: Option<Arc<crate::certs::ReloadingServerTls>>,
) -> anyhow::Result<ExitCode> {
    let metrics = Arc::new(ControllerMetrics::new().context("register metrics")?);
    // The long-lived tasks run supervised: one that dies is logged, counted and restarted.
    let restarts = Arc::new(TaskRestarts::default());
    let quarantine_dir = args.quarantine_dir.clone().or_else(|| {
        args.manifests
            .first()
            .filter(|p| p.is_dir())
            .map(|p| p.join("quarantines"))
    });
    let mut roots = args.manifests.clone();
    if let Some(q) = &quarantine_dir {
        std::fs::create_dir_all(q).with_context(|| format!("create {}", q.display()))?;
        if !roots.iter().any(|r| q.starts_with(r)) {
            roots.push(q.clone());
        }
    }
    let mut source = ManifestSource::new(roots);
    let first = source.reload();
    for e in &first.errors {
        eprintln!("{e}");
    }
    metrics.input_errors.inc_by(first.errors.len() as u64);
    let mut engine = PolicyEngine::empty(EngineConfig::default());
    engine
        .apply_batch(first.changes)
        .context("compile the initial manifests")?;
    let hub = Arc::new(Hub::new(engine));
    let kubernetes = start_kubernetes(&args.kube, hub.clone(), restarts.clone()).await?;
    let gate = kubernetes
        .as_ref()
        .map_or_else(|| Arc::new(Gate::open()), |k| k.gate.clone());
    let source = Arc::new(Mutex::new(source));
    tracing::info!(
        epoch = hub.epoch(),
        nodes = hub.node_states().len(),
        "policy engine ready"
    );
    let flows = Arc::new(Mutex::new(FlowStore::new(args.flow_store)));

    // Manifests: re-read on change; each change reaches only the nodes it affects.
    {
        let hub = hub.clone();
        let source = source.clone();
        let metrics = metrics.clone();
        let period = Duration::from_millis(args.reload_ms.max(50));
        spawn_supervised(
            "manifest_reload",
            restarts.clone(),
            Backoff::default(),
            move || reload_manifests(hub.clone(), source.clone(), metrics.clone(), period),
        );
    }
    // Flow records are folded into the service graph as they arrive (the agents' streams go
    // through the pipeline: graph, then store); /metrics reads the graph's counters.
    let graph = Arc::new(Mutex::new(ServiceGraph::default()));
    let flow_pipeline = Arc::new(FlowPipeline::new(flows.clone(), graph.clone(), hub.clone()));
    if !args.graph_ttl.is_zero() {
        let (graph, ttl) = (graph.clone(), args.graph_ttl);
        spawn_supervised(
            "graph_ttl",
            restarts.clone(),
            Backoff::default(),
            move || {
                let graph = graph.clone();
                async move {
                    let mut tick = tokio::time::interval(
                        (ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(60)),
                    );
                    loop {
                        tick.tick().await;
                        let cutoff = std::time::SystemTime::now()
                            .checked_sub(ttl)
                            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                            .map_or(0, |d| d.as_nanos() as u64);
                        let expired = graph.lock().map(|mut g| g.expire(cutoff)).unwrap_or(0);
                        if expired > 0 {
                            tracing::info!(expired, ttl = ?ttl, "service graph: edges not seen within the TTL forgotten");
                        }
                    }
                }
            },
        );
    }

    // One quarantine control for the admin API and the web UI (it tracks each quarantine's status).
    // In Kubernetes mode quarantines are Quarantine objects in the API, written with the
    // source's client (its watch brings them to the hub); otherwise manifests in the directory.
    let quarantine = match &kubernetes {
        Some(k) => {
            tracing::info!("quarantines kept as Quarantine objects in the Kubernetes API");
            Some(Arc::new(QuarantineControl::kubernetes(
                k.client.clone(),
                tokio::runtime::Handle::current(),
                args.kube
                    .identity
                    .as_deref()
                    .filter(|i| !i.is_empty())
                    .unwrap_or("bulkhead-controller"),
                hub.clone(),
                flows.clone(),
            )))
        }
        None => quarantine_dir.clone().map(|dir| {
            tracing::info!(dir = %dir.display(), "quarantines kept in");
            Arc::new(QuarantineControl::new(
                dir,
                source.clone(),
                hub.clone(),
                flows.clone(),
            ))
        }),
    };
    // Quarantines made through the API whose time has come leave the directory (and so the
    // listing and the map) with an `expire` line in the audit log; the engine stopped enforcing
    // them on the reload tick. In Kubernetes mode the status writer announces expiries.
    if kubernetes.is_none()
        && let Some(control) = quarantine.clone()
    {
        spawn_supervised(
            "quarantine_expiry",
            restarts.clone(),
            Backoff::default(),
            move || expire_quarantines(control.clone()),
        );
    }
    let auth = Arc::new(match (args.web.http_auth, &kubernetes) {
        (crate::web::auth::HttpAuthMode::None, _) => crate::web::auth::WebAuth::Off,
        (crate::web::auth::HttpAuthMode::Tokens, _) => {
            crate::web::auth::WebAuth::Tokens(crate::web::auth::TokenFile::open(
                args.web
                    .http_tokens
                    .as_deref()
                    .context("--http-auth tokens needs --http-tokens")?,
            )?)
        }
        (crate::web::auth::HttpAuthMode::Kubernetes, Some(k)) => {
            crate::web::auth::WebAuth::Kubernetes(
                bulkhead_controller::kubernetes::review::Reviewer::new(k.client.clone(), vec![]),
            )
        }
        (crate::web::auth::HttpAuthMode::Kubernetes, None) => {
            bail!("--http-auth kubernetes needs --kubernetes")
        }
    });
    let web = crate::web::WebState::new(
        args.http,
        &args.web,
        hub.clone(),
        flows.clone(),
        graph.clone(),
        quarantine.clone(),
        auth.clone(),
    );

    // HTTP: metrics and health on their own listener; the UI and the JSON API on another.
    let metrics_listener = tokio::net::TcpListener::bind(args.metrics)
        .await
        .with_context(|| format!("bind metrics address {}", args.metrics))?;
    tracing::info!(addr = %metrics_listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    let listener = tokio::net::TcpListener::bind(args.http)
        .await
        .with_context(|| format!("bind HTTP address {}", args.http))?;
    tracing::info!(addr = %listener.local_addr()?, auth = ?args.web.http_auth, "serving the web UI on / and the API on /api/nodes, /api/policies, /api/flows, /api/graph, /api/graph.dot, /api/map");
    let metrics_app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get({
                let (hub, flows, metrics) = (hub.clone(), flows.clone(), metrics.clone());
                let (graph, pipeline) = (graph.clone(), flow_pipeline.clone());
                let kube_stats = kubernetes.as_ref().map(|k| k.stats.clone());
                let restarts = restarts.clone();
                move || async move {
                    metrics.sync_flow_counters(&graph, &pipeline);
                    metrics.sync_task_restarts(&restarts);
                    if let Some(stats) = &kube_stats {
                        metrics.sync_kubernetes_counters(stats);
                    }
                    metrics.render(&hub, &flows)
                }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route("/readyz", readyz(gate.clone()));
    let app = axum::Router::new()
        .route(
            "/api/nodes",
            axum::routing::get({
                let hub = hub.clone();
                move || async move {
                    axum::Json(
                        hub.node_states()
                            .into_iter()
                            .map(|n| {
                                serde_json::json!({
                                    "node": n.node, "version": n.version, "realized": n.realized,
                                    "connected": n.connected, "endpoints": n.endpoints,
                                    "last_error": n.last_error,
                                })
                            })
                            .collect::<Vec<_>>(),
                    )
                }
            }),
        )
        .route(
            "/api/policies",
            axum::routing::get({
                let hub = hub.clone();
                move || async move {
                    axum::Json(
                        hub.policy_status()
                            .into_iter()
                            .map(|p| {
                                serde_json::json!({
                                    "kind": p.kind.as_str(), "namespace": p.namespace,
                                    "name": p.name, "nodes": p.nodes, "realized": p.realized,
                                })
                            })
                            .collect::<Vec<_>>(),
                    )
                }
            }),
        )
        .route(
            "/api/graph",
            axum::routing::get({
                let graph = graph.clone();
                move || async move {
                    // Written straight from the aggregate: no copy of the graph on the way.
                    let body = graph
                        .lock()
                        .map(|g| g.to_json())
                        .unwrap_or_else(|_| br#"{"nodes":[],"edges":[]}"#.to_vec());
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        body,
                    )
                }
            }),
        )
        .route(
            "/api/graph.dot",
            axum::routing::get({
                let graph = graph.clone();
                move || async move { graph.lock().map(|g| g.graph().to_dot()).unwrap_or_default() }
            }),
        )
        .route(
            "/api/flows",
            axum::routing::get({
                let flows = flows.clone();
                let pipeline = flow_pipeline.clone();
                move || async move {
                    let mut recent = flows.lock().map(|f| f.recent(1000)).unwrap_or_default();
                    // Agents name only their own node's pods: name the rest here, with the
                    // pipeline's directory (rebuilt only when a rule set changes).
                    let directory = pipeline.directory();
                    for (_, e) in &mut recent {
                        directory.name_peer_of(e);
                    }
                    axum::Json(
                        recent
                            .iter()
                            .map(|(node, e)| bulkhead_controller::flows::flow_json(node, e))
                            .collect::<Vec<_>>(),
                    )
                }
            }),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            auth,
            crate::web::auth::require,
        ))
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route("/readyz", readyz(gate.clone()))
        .merge(crate::web::router(web));
    let app = app.layer(axum::middleware::from_fn_with_state(
        crate::web::host_check::AllowedHosts::new(args.http, &args.web.http_hosts),
        crate::web::host_check::check_host,
    ));
    {
        let refused = metrics.http_connections_refused.clone();
        tokio::spawn(async move {
            let limits = crate::http_server::Limits {
                max_connections: 128,
                ..Default::default()
            };
            if let Err(e) =
                crate::http_server::serve(metrics_listener, metrics_app, limits, refused).await
            {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
    }
    let refused = metrics.http_connections_refused.clone();
    tokio::spawn(async move {
        // Headers within 10 s, at most 512 connections: a slow or flooding client cannot hold
        // the API (issue 21, finding 9).
        let limits = crate::http_server::Limits {
            max_connections: 512,
            ..Default::default()
        };
        if let Err(e) = crate::http_server::serve(listener, app, limits, refused).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });

    // gRPC.
    let agent_tokens = match (&kubernetes, args.agent_token_review) {
        (Some(k), true) => {
            let (namespace, name) = parse_service_account(
                args.agent_service_account
                    .as_deref()
                    .context("--agent-token-review needs --agent-service-account")?,
            )?;
            tracing::info!(service_account = %format!("{namespace}/{name}"), audience = %args.agent_token_audience, "agents with a shared certificate must send their pod's token");
            Some(Arc::new(
                bulkhead_controller::kubernetes::review::AgentTokenReview::new(
                    k.client.clone(),
                    args.agent_token_audience.clone(),
                    namespace,
                    name,
                ),
            ))
        }
        (None, true) => bail!("--agent-token-review needs --kubernetes"),
        (_, false) => None,
    };
    let clients = bulkhead_controller::distribution::ClientPolicy {
        any_node: args.any_node_clients.clone(),
        admins: args.admin_clients.clone(),
        agent_tokens,
    };
    let mut admin = AdminService::new(hub.clone())
        .with_flows(flow_pipeline.clone())
        .with_client_policy(clients.clone());
    if let Some(q) = quarantine {
        admin = admin.with_quarantine(q);
    }
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .tcp_nodelay(true)
        // With its message size limits (large rule sets travel in parts).
        .add_service(tonic::service::interceptor::InterceptedService::new(
            DistributionService::with_flow_pipeline(hub.clone(), flow_pipeline.clone())
                .with_client_policy(clients)
                .into_server(),
            gate.interceptor(),
        ))
        .add_service(AdminServer::new(admin));
    tracing::info!(addr = %args.listen, tls = !args.insecure, "serving rule sets to agents");
    let shutdown = shutdown_signal(kubernetes.as_ref());
    match tls {
        // Our own acceptor, so that certificates rotated on disk reach new connections.
        Some(tls) => {
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("listen on {}", args.listen))?;
            router
                .serve_with_incoming_shutdown(crate::certs::tls_incoming(listener, tls), shutdown)
                .await
        }
        None => router.serve_with_shutdown(args.listen, shutdown).await,
    }
    .with_context(|| format!("gRPC server on {}", args.listen))?;
    if let Some(k) = kubernetes
        && let Some(reason) = k.shutdown().await
    {
        bail!(reason);
    }
    Ok(ExitCode::SUCCESS)
}

/// Re-reads the manifests every `period` and applies what changed; lifts quarantines whose
/// `expiresAt` passed. Runs until the controller stops (supervised).
async fn reload_manifests(
    hub: Arc<Hub>,
    source: Arc<Mutex<ManifestSource>>,
    metrics: Arc<ControllerMetrics>,
    period: Duration,
) {
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let reload = match source.lock() {
            Ok(mut s) => s.reload(),
            Err(_) => {
                tracing::error!("manifest source lock poisoned; restart the controller");
                continue;
            }
        };
        for e in &reload.errors {
            tracing::error!(error = %e, "invalid manifest; the objects it had stay in force");
        }
        metrics.input_errors.inc_by(reload.errors.len() as u64);
        match hub.expire(std::time::SystemTime::now()) {
            Ok(deltas) if !deltas.is_empty() => {
                tracing::warn!(nodes = deltas.len(), "quarantines expired and were lifted")
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "could not lift expired quarantines"),
        }
        if reload.changes.is_empty() {
            continue;
        }
        let n = reload.changes.len();
        let hub = hub.clone();
        let result = tokio::task::spawn_blocking(move || hub.apply(reload.changes, false)).await;
        match result {
            Ok(Ok(deltas)) => tracing::info!(
                changes = n,
                nodes = deltas.len(),
                "manifests changed; deltas sent"
            ),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "could not apply manifest changes; the previous rule sets stay in force")
            }
            Err(e) => tracing::error!(error = %e, "apply task failed"),
        }
    }
}

/// Every second: removes the quarantines of the directory whose `expiresAt` passed, with their
/// audit lines. Runs until the controller stops (supervised).
async fn expire_quarantines(control: Arc<QuarantineControl>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let control = control.clone();
        match tokio::task::spawn_blocking(move || control.expire_due(std::time::SystemTime::now()))
            .await
        {
            Ok(Ok(expired)) => {
                for q in expired {
                    tracing::warn!(namespace = %q.namespace, pod = %q.pod, expires_at = %q.expires_at, "quarantine expired and was lifted");
                }
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "could not remove expired quarantines; retrying")
            }
            // A panic in the blocking task: let the supervisor count and restart this task.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => tracing::error!(error = %e, "the quarantine expiry task was cancelled"),
        }
    }
}

/// `--kubernetes`: inventory and policies from the Kubernetes API, with leader election.
#[derive(Args)]
pub struct KubernetesArgs {
    /// Watch the Kubernetes API (in-cluster service account, else kubeconfig) for Namespaces,
    /// Pods, Nodes, NetworkPolicies, ClusterNetworkPolicies, ServicePolicies and Quarantines,
    /// instead of reading manifests.
    #[arg(long)]
    pub kubernetes: bool,
    /// Run as one of several replicas: only the holder of the Lease serves agents (followers
    /// answer UNAVAILABLE and `/readyz` 503).
    #[arg(long, requires = "kubernetes")]
    pub leader_elect: bool,
    /// Name of the coordination.k8s.io/v1 Lease.
    #[arg(long, default_value = "bulkhead-controller")]
    pub lease_name: String,
    /// Namespace of the Lease.
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// This replica's identity in the Lease and in Events (its pod name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
}

async fn start_kubernetes(
    args: &KubernetesArgs,
    hub: Arc<Hub>,
    restarts: Arc<TaskRestarts>,
) -> anyhow::Result<Option<Running>> {
    if !args.kubernetes {
        return Ok(None);
    }
    let running = bulkhead_controller::kubernetes::start(
        hub,
        KubernetesOptions {
            leader_elect: args.leader_elect,
            lease_name: args.lease_name.clone(),
            lease_namespace: args.lease_namespace.clone(),
            identity: args.identity.clone(),
            restarts,
        },
    )
    .await?;
    tracing::info!(leader_elect = args.leader_elect, identity = ?args.identity, "watching the Kubernetes API");
    Ok(Some(running))
}

/// `/readyz`: 200 where agents should connect (the leader, or the only controller, once it
/// has listed the cluster); 503 with the reason elsewhere. The chart's Service routes by it.
fn readyz(gate: Arc<Gate>) -> axum::routing::MethodRouter {
    axum::routing::get(move || async move {
        match gate.serving() {
            Ok(()) => (axum::http::StatusCode::OK, "ok".to_string()),
            Err(why) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, why),
        }
    })
}

/// Ctrl-C, SIGTERM (how Kubernetes stops a pod), or the loss of leadership.
async fn shutdown_signal(kubernetes: Option<&Running>) {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    let lost = async {
        match kubernetes {
            Some(k) => {
                let reason = k.lost().await;
                tracing::error!(%reason, "stopping");
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
        _ = lost => {}
    }
}
