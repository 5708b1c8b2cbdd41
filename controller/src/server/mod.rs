//! The controller runtime (`bulkhead controller`): the policy engine fed from manifests or the
//! Kubernetes API, serving rule sets to agents over gRPC (mTLS), with `/metrics`, `/healthz`
//! and `/readyz` on one HTTP listener and the web UI and its JSON API on another.
//!
//! - [`api`]: the HTTP/JSON API (`/api/*`), one set of typed answers for the web UI and the
//!   `bulkhead` commands;
//! - [`auth`]: who may read the API and act through it (`--http-auth`);
//! - [`ui`]: the web UI's page and assets, embedded in the binary;
//! - `metrics`, `tasks`, `tls`: Prometheus counters, background tasks, the TLS acceptor.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, bail};
use bulkhead_proto::v1::admin_server::AdminServer;

use crate::{
    EngineConfig, PolicyEngine,
    distribution::{
        AdminService, DistributionService, FlowStore, Hub, ManifestSource,
        quarantine::QuarantineControl,
    },
    flows::{
        FlowPipeline, ServiceGraph,
        history::{FlowHistory, HistoryConfig, now_unix_nanos},
    },
    kubernetes::Gate,
    supervise::{Backoff, TaskRestarts, spawn_supervised},
};

pub mod api;
pub mod auth;
mod metrics;
mod tasks;
pub mod tls;
pub mod ui;

use metrics::ControllerMetrics;

/// What `bulkhead controller` was asked to do (its flags, parsed).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Directories or files of Kubernetes YAML, re-read when they change.
    pub manifests: Vec<PathBuf>,
    /// gRPC address for agents and admin clients.
    pub listen: SocketAddr,
    /// HTTP address of the web UI and the JSON API.
    pub http: SocketAddr,
    /// HTTP address of `/metrics`, `/healthz` and `/readyz`.
    pub metrics: SocketAddr,
    /// Server certificate, its key and the CA client certificates must chain to (mTLS).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    /// Serve without TLS.
    pub insecure: bool,
    /// Flow records kept in memory.
    pub flow_store: usize,
    /// Edges of the service graph not seen for this long are forgotten (zero: never).
    pub graph_ttl: Duration,
    /// The flow history on disk.
    pub flow_history: FlowHistoryConfig,
    /// Where quarantines made through the API are kept (default: `quarantines/` in the first
    /// manifest directory).
    pub quarantine_dir: Option<PathBuf>,
    /// How often the manifests are checked for changes, in milliseconds.
    pub reload_ms: u64,
    /// The cluster's DNS resolvers, when given (else the `kube-system` pods labelled
    /// `k8s-app: kube-dns` and the kube-dns Service's cluster IPs):
    /// [`EngineConfig::dns_resolvers`].
    pub dns_resolvers: Option<Vec<std::net::IpAddr>>,
    /// Client certificate names that may act as the agent of any node.
    pub any_node_clients: Vec<String>,
    /// Client certificate names that may quarantine and release pods.
    pub admin_clients: Vec<String>,
    /// Agents with an any-node certificate must send their pod's token (needs Kubernetes).
    pub agent_token_review: bool,
    /// The agents' service account, `NAMESPACE/NAME`.
    pub agent_service_account: Option<String>,
    /// The audience the agents' projected tokens are issued for.
    pub agent_token_audience: String,
    pub kube: KubernetesConfig,
    pub web: HttpConfig,
    /// Importing peer clusters' inventories and exporting ours (issue 20).
    pub peering: crate::peering::PeeringConfig,
}

/// Where and how much flow history the controller keeps on disk.
#[derive(Clone, Debug)]
pub struct FlowHistoryConfig {
    /// Keep a flow history at all.
    pub enabled: bool,
    /// Its directory (default: `flow-history/` in the first manifest directory; in Kubernetes
    /// mode it must be given).
    pub dir: Option<PathBuf>,
    pub max_age: Duration,
    pub max_bytes: u64,
}

impl Default for FlowHistoryConfig {
    fn default() -> Self {
        FlowHistoryConfig {
            enabled: true,
            dir: None,
            max_age: HistoryConfig::DEFAULT_MAX_AGE,
            max_bytes: HistoryConfig::DEFAULT_MAX_BYTES,
        }
    }
}

/// Inventory and policies from the Kubernetes API, with leader election.
#[derive(Clone, Debug, Default)]
pub struct KubernetesConfig {
    /// Watch the Kubernetes API instead of reading manifests.
    pub kubernetes: bool,
    /// Only the holder of the Lease serves agents.
    pub leader_elect: bool,
    /// Name of the coordination.k8s.io/v1 Lease.
    pub lease_name: String,
    /// Namespace of the Lease.
    pub lease_namespace: Option<String>,
    /// This replica's identity in the Lease and in Events.
    pub identity: Option<String>,
}

/// Who may use the HTTP API and the web UI's write actions.
#[derive(Clone, Debug, Default)]
pub struct HttpConfig {
    /// Allow quarantine and release from the web UI on a non-loopback listener.
    pub web_actions: bool,
    /// How `/api/*` requests are authenticated.
    pub http_auth: auth::HttpAuthMode,
    /// With [`auth::HttpAuthMode::Tokens`]: the file of `ROLE NAME TOKEN` lines.
    pub http_tokens: Option<PathBuf>,
    /// Serve `/api/*` without authentication on a non-loopback address.
    pub http_unauthenticated: bool,
    /// Names the HTTP API answers to besides loopback names and the listener's own address.
    pub http_hosts: Vec<String>,
}

/// Runs the controller until it is stopped (Ctrl-C, SIGTERM, or the loss of leadership).
pub fn run(config: ServerConfig) -> anyhow::Result<()> {
    let tls = match (
        &config.tls_cert,
        &config.tls_key,
        &config.client_ca,
        config.insecure,
    ) {
        (Some(c), Some(k), Some(ca), false) => {
            Some(Arc::new(tls::ReloadingServerTls::new(c, k, ca)?))
        }
        (_, _, _, true) => None,
        _ => bail!(
            "mTLS is on by default: pass --tls-cert, --tls-key and --client-ca (see `bulkhead certs generate`), or --insecure"
        ),
    };
    check_http_exposure(&config)?;
    config
        .peering
        .check(config.tls_cert.is_some() && config.tls_key.is_some())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(serve(config, tls))
}

/// The API shows every flow and workload and can quarantine: refuse to serve it beyond
/// loopback without authentication unless told so, and refuse auth settings that cannot work.
fn check_http_exposure(args: &ServerConfig) -> anyhow::Result<()> {
    use auth::HttpAuthMode;
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

/// Opens the flow history (`None` when it is off). A store that cannot be used stops the
/// start with an error that says why: history is not given up silently.
fn open_flow_history(args: &ServerConfig) -> anyhow::Result<Option<Arc<FlowHistory>>> {
    let h = &args.flow_history;
    if !h.enabled {
        tracing::info!("flow history off (--no-flow-history)");
        return Ok(None);
    }
    let dir = h.dir.clone().or_else(|| {
        args.manifests
            .first()
            .filter(|p| p.is_dir())
            .map(|p| p.join("flow-history"))
    });
    let Some(dir) = dir else {
        tracing::warn!("flow history off: pass --flow-history DIR to keep flow records on disk");
        return Ok(None);
    };
    let config = HistoryConfig {
        max_age: h.max_age,
        max_bytes: h.max_bytes,
        ..HistoryConfig::new(dir)
    };
    Ok(Some(Arc::new(FlowHistory::open(config)?)))
}

/// Starts the importers (one per `--peer`) and the peering listener (`--peering-listen`), each
/// when configured ([`crate::peering::PeeringConfig::check`] passed).
async fn start_peering(
    args: &ServerConfig,
    hub: &Arc<Hub>,
    peers: &Arc<crate::peering::PeerStates>,
) -> anyhow::Result<()> {
    use crate::peering::{Importer, PeeringService, RetryPolicy, import};
    let p = &args.peering;
    let Some(cluster) = p.cluster.clone() else {
        return Ok(());
    };
    if let (Some(cert), Some(key)) = (&p.cert, &p.key)
        && !p.peers.is_empty()
    {
        let importer = Arc::new(Importer::new(
            hub.clone(),
            cluster.clone(),
            p.pod_cidrs.clone(),
            peers.clone(),
        ));
        import::start(
            importer,
            &p.peers,
            cert.clone(),
            key.clone(),
            RetryPolicy::default(),
        );
        tracing::info!(cluster = %cluster, peers = p.peers.len(), "importing the peer clusters' inventories");
    }
    if let Some(addr) = p.listen {
        let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
            bail!("--peering-listen needs --tls-cert and --tls-key");
        };
        let cas: Vec<PathBuf> = p.peers.iter().map(|peer| peer.ca.clone()).collect();
        let tls = Arc::new(
            tls::ReloadingServerTls::with_client_cas(cert, key, &cas)
                .context("the peering listener's TLS (the peers' ca= files)")?,
        );
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind the peering address {addr}"))?;
        tracing::info!(%addr, cluster = %cluster, "serving our inventory to peer clusters (client certificates of the peers' CAs only)");
        let service = PeeringService::new(hub.clone(), cluster, p.pod_cidrs.clone());
        tokio::spawn(serve_peering(listener, tls, service));
    }
    Ok(())
}

/// The peering listener: only the `Peering` service, over mTLS with the peers' CAs.
pub async fn serve_peering(
    listener: tokio::net::TcpListener,
    tls: Arc<tls::ReloadingServerTls>,
    service: crate::peering::PeeringService,
) {
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .tcp_nodelay(true)
        .add_service(service.into_server())
        .serve_with_incoming(tls::tls_incoming(listener, tls))
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "peering listener stopped");
    }
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

async fn serve(
    args: ServerConfig,
    tls: Option<Arc<tls::ReloadingServerTls>>,
) -> anyhow::Result<()> {
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
    let mut engine = PolicyEngine::empty(EngineConfig {
        dns_resolvers: args.dns_resolvers.clone(),
        cluster_name: args.peering.cluster.clone(),
        ..EngineConfig::default()
    });
    engine
        .apply_batch(first.changes)
        .context("compile the initial manifests")?;
    let hub = Arc::new(Hub::new(engine));
    let peers = Arc::new(crate::peering::PeerStates::default());
    start_peering(&args, &hub, &peers).await?;
    let kubernetes = tasks::start_kubernetes(&args.kube, hub.clone(), restarts.clone()).await?;
    let gate = kubernetes
        .as_ref()
        .map_or_else(|| Arc::new(Gate::open()), |k| k.gate.clone());
    let source = Arc::new(Mutex::new(source));
    tracing::info!(
        epoch = hub.epoch(),
        nodes = hub.node_states().len(),
        "policy engine ready"
    );
    let history = open_flow_history(&args)?;
    let mut store = FlowStore::new(args.flow_store);
    if let Some(h) = &history {
        store = store.with_history(h.clone());
    }
    let flows = Arc::new(Mutex::new(store));

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
            move || tasks::reload_manifests(hub.clone(), source.clone(), metrics.clone(), period),
        );
    }
    // Flow records are folded into the service graph as they arrive (the agents' streams go
    // through the pipeline: graph, then store); /metrics reads the graph's counters.
    let graph = Arc::new(Mutex::new(ServiceGraph::default()));
    let flow_pipeline = Arc::new(FlowPipeline::new(flows.clone(), graph.clone(), hub.clone()));
    if let Some(h) = &history {
        // The graph and the recent flows as they were: before any agent reports.
        let since = if args.graph_ttl.is_zero() {
            0
        } else {
            now_unix_nanos().saturating_sub(args.graph_ttl.as_nanos() as u64)
        };
        let started = std::time::Instant::now();
        let (folded, restored) =
            tokio::task::block_in_place(|| flow_pipeline.restore_from(h, since))
                .context("read the flow history back")?;
        tracing::info!(graph_records = folded, store_records = restored, took = ?started.elapsed(), "service graph and recent flows rebuilt from the flow history");
    }
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
            move || tasks::expire_quarantines(control.clone()),
        );
    }
    let auth = Arc::new(match (args.web.http_auth, &kubernetes) {
        (auth::HttpAuthMode::None, _) => auth::WebAuth::Off,
        (auth::HttpAuthMode::Tokens, _) => auth::WebAuth::Tokens(auth::TokenFile::open(
            args.web
                .http_tokens
                .as_deref()
                .context("--http-auth tokens needs --http-tokens")?,
        )?),
        (auth::HttpAuthMode::Kubernetes, Some(k)) => auth::WebAuth::Kubernetes(
            crate::kubernetes::review::Reviewer::new(k.client.clone(), vec![]),
        ),
        (auth::HttpAuthMode::Kubernetes, None) => {
            bail!("--http-auth kubernetes needs --kubernetes")
        }
    });
    let state = api::ApiState::new(
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
    tracing::info!(addr = %listener.local_addr()?, auth = ?args.web.http_auth, "serving the web UI on / and the API on /api/nodes, /api/policies, /api/flows, /api/graph, /api/graph.dot, /api/map, /api/recommend, /api/impact, /api/quarantines, /api/quarantine");
    let metrics_app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get({
                let (hub, flows, metrics) = (hub.clone(), flows.clone(), metrics.clone());
                let (graph, pipeline) = (graph.clone(), flow_pipeline.clone());
                let kube_stats = kubernetes.as_ref().map(|k| k.stats.clone());
                let restarts = restarts.clone();
                let peers = peers.clone();
                move || async move {
                    metrics.sync_peers(&peers, std::time::SystemTime::now());
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
        .route("/readyz", tasks::readyz(gate.clone()));
    // The API (every route behind the authentication layer), the page, and the probes.
    let app = api::router(state)
        .merge(ui::router())
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route("/readyz", tasks::readyz(gate.clone()))
        .layer(axum::middleware::from_fn_with_state(
            bulkhead_http::AllowedHosts::new(args.http, &args.web.http_hosts),
            bulkhead_http::check_host,
        ));
    {
        let refused = metrics.http_connections_refused.clone();
        tokio::spawn(async move {
            let limits = bulkhead_http::Limits {
                max_connections: 128,
                ..Default::default()
            };
            if let Err(e) =
                bulkhead_http::serve(metrics_listener, metrics_app, limits, refused).await
            {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
    }
    let refused = metrics.http_connections_refused.clone();
    tokio::spawn(async move {
        // Headers within 10 s, at most 512 connections: a slow or flooding client cannot hold
        // the API (issue 21, finding 9).
        let limits = bulkhead_http::Limits {
            max_connections: 512,
            ..Default::default()
        };
        if let Err(e) = bulkhead_http::serve(listener, app, limits, refused).await {
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
            Some(Arc::new(crate::kubernetes::review::AgentTokenReview::new(
                k.client.clone(),
                args.agent_token_audience.clone(),
                namespace,
                name,
            )))
        }
        (None, true) => bail!("--agent-token-review needs --kubernetes"),
        (_, false) => None,
    };
    let clients = crate::distribution::ClientPolicy {
        any_node: args.any_node_clients.clone(),
        admins: args.admin_clients.clone(),
        agent_tokens,
    };
    let mut admin = AdminService::new(hub.clone())
        .with_flows(flow_pipeline.clone())
        .with_client_policy(clients.clone())
        .with_peers(peers.clone());
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
    let shutdown = tasks::shutdown_signal(kubernetes.as_ref());
    match tls {
        // Our own acceptor, so that certificates rotated on disk reach new connections.
        Some(tls) => {
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("listen on {}", args.listen))?;
            router
                .serve_with_incoming_shutdown(tls::tls_incoming(listener, tls), shutdown)
                .await
        }
        None => router.serve_with_shutdown(args.listen, shutdown).await,
    }
    .with_context(|| format!("gRPC server on {}", args.listen))?;
    if let Some(h) = &history {
        // What the writer holds reaches the disk before the process ends.
        tokio::task::block_in_place(|| h.close());
    }
    if let Some(k) = kubernetes
        && let Some(reason) = k.shutdown().await
    {
        bail!(reason);
    }
    Ok(())
}
