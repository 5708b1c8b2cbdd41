//! The controller's web UI: the live service map page (a committed bundle, embedded in the
//! binary), the JSON it polls, and quarantine/release from the page.
//!
//! The page is built from `ui/` by `cargo xtask ui` into `cli/assets/ui/`, which is committed so
//! that building Bulkhead needs no npm; `cargo xtask test` rebuilds it and fails on drift.
//!
//! Write actions (quarantine, release) change enforcement cluster-wide, so they are refused
//! unless the HTTP listener is on loopback or `--web-actions` says otherwise, and a request must
//! prove it is not a cross-site form or fetch: `Content-Type: application/json` plus the
//! `X-Bulkhead-Action: 1` header (neither can be sent cross-site without a CORS preflight, which
//! this server never grants), an `Origin`, when present, naming the host the request was sent
//! to, and on a loopback listener a loopback `Host` (against DNS rebinding).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use bulkhead_controller::{
    distribution::{
        FlowStore, Hub,
        quarantine::{QuarantineControl, QuarantineError},
    },
    flows::ServiceGraph,
    ruleset::{Direction, FlowEntry, FlowRecord, FlowRule, PodKey},
};
use bulkhead_proto::v1 as pb;
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

const INDEX_HTML: &str = include_str!("../assets/ui/index.html");
const APP_JS: &str = include_str!("../assets/ui/app.js");
const APP_CSS: &str = include_str!("../assets/ui/app.css");

/// The header a write request must carry (a browser sends it cross-site only after a CORS
/// preflight, which this server never grants).
pub const ACTION_HEADER: &str = "x-bulkhead-action";

#[derive(Args, Clone, Debug, Default)]
pub struct WebArgs {
    /// Allow quarantine and release from the web UI even though `--http` is not a loopback
    /// address (anyone who can reach the port and send the UI's headers could then isolate
    /// pods: put an authenticating proxy in front).
    #[arg(long)]
    pub web_actions: bool,
    /// How `/api/*` requests are authenticated: `none` (loopback only, unless
    /// --http-unauthenticated), `tokens` (bearer tokens of --http-tokens), or `kubernetes`
    /// (bearer tokens reviewed by the API server, requests authorized by its RBAC; needs
    /// --kubernetes).
    #[arg(long, value_enum, default_value_t = auth::HttpAuthMode::None)]
    pub http_auth: auth::HttpAuthMode,
    /// With `--http-auth tokens`: a file of `ROLE NAME TOKEN` lines (`viewer` reads, `admin`
    /// also quarantines and releases), re-read when it changes.
    #[arg(long)]
    pub http_tokens: Option<std::path::PathBuf>,
    /// Serve `/api/*` without authentication on a non-loopback --http address: anyone who
    /// reaches it reads every flow and workload.
    #[arg(long)]
    pub http_unauthenticated: bool,
    /// A name (without port) the HTTP API answers to besides loopback names and the listener's
    /// own address, e.g. the controller's Service name; repeatable. Other `Host`s get 421
    /// (DNS rebinding); `/metrics` and `/healthz` answer to any.
    #[arg(long = "http-host")]
    pub http_hosts: Vec<String>,
}

/// What the UI's handlers read and act on: the controller's own state, shared.
#[derive(Clone)]
pub struct WebState {
    pub hub: Arc<Hub>,
    pub flows: Arc<Mutex<FlowStore>>,
    pub graph: Arc<Mutex<ServiceGraph>>,
    pub quarantine: Option<Arc<QuarantineControl>>,
    /// Whether quarantine/release are served, and if not, why.
    pub actions: Result<(), String>,
    /// On a loopback listener, write requests must name a loopback host (DNS rebinding).
    pub loopback: bool,
    /// How long a quarantine or release waits for the affected agents to ack it.
    pub enforce_wait: Duration,
    /// The last `/api/map` answer (see [`map`]).
    map_cache: Arc<MapCache>,
    /// Who may read and act (see [`auth`]).
    pub auth: Arc<auth::WebAuth>,
}

/// `/api/map` costs seconds in a large cluster (3.3 s at 100k pods) and every open page polls
/// it: one answer is computed at a time, and reused by requests within [`MAP_CACHE_TTL`] of it
/// unless a write from this UI happened since.
#[derive(Default)]
struct MapCache {
    /// Held while an answer is computed: concurrent requests wait for it instead of computing
    /// their own.
    last: tokio::sync::Mutex<Option<(std::time::Instant, u64, axum::body::Bytes)>>,
    /// Bumped by quarantine and release, so the next map shows them.
    generation: std::sync::atomic::AtomicU64,
}

/// How long one `/api/map` answer is reused.
pub const MAP_CACHE_TTL: Duration = Duration::from_secs(1);

impl WebState {
    /// The map changed (a quarantine or release from this UI): the next request computes it.
    pub(crate) fn map_changed(&self) {
        self.map_cache
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl WebState {
    pub fn new(
        http: SocketAddr,
        args: &WebArgs,
        hub: Arc<Hub>,
        flows: Arc<Mutex<FlowStore>>,
        graph: Arc<Mutex<ServiceGraph>>,
        quarantine: Option<Arc<QuarantineControl>>,
        auth: Arc<auth::WebAuth>,
    ) -> WebState {
        let loopback = http.ip().is_loopback();
        let actions = if quarantine.is_none() {
            Err("this controller has no quarantine directory (--quarantine-dir)".into())
        } else if loopback || args.web_actions || auth.enabled() {
            Ok(())
        } else {
            Err(format!(
                "write actions are off because the HTTP listener ({http}) is not on loopback; start the controller with --web-actions to allow them"
            ))
        };
        WebState {
            hub,
            flows,
            graph,
            quarantine,
            actions,
            loopback,
            enforce_wait: Duration::from_secs(5),
            map_cache: Arc::default(),
            auth,
        }
    }
}

pub mod auth;
pub mod host_check;
mod quarantine_api;
use quarantine_api::{list_quarantines, quarantine, quarantine_json, release};

/// The page, its assets, and the UI's JSON API (merged into the controller's HTTP router).
pub fn router(state: WebState) -> Router {
    Router::new()
        .route("/api/map", get(map))
        .route("/api/flows/query", get(query_flows))
        .route("/api/quarantines", get(list_quarantines))
        .route("/api/quarantine", post(quarantine))
        .route("/api/quarantine/release", post(release))
        // Every route above needs a reader (and the writes an admin); the page below holds no
        // data.
        .route_layer(axum::middleware::from_fn_with_state(
            state.auth.clone(),
            auth::require,
        ))
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .with_state(state)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
            ),
        ],
        body,
    )
        .into_response()
}

/// An error the page can show: `{"error": "..."}` with a 4xx/5xx status.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError(status, message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.0, axum::Json(json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"bulkhead\""),
            );
        }
        response
    }
}

impl From<QuarantineError> for ApiError {
    fn from(e: QuarantineError) -> ApiError {
        let status = match e {
            QuarantineError::Invalid(_) | QuarantineError::Rejected(_) => StatusCode::BAD_REQUEST,
            QuarantineError::NotQuarantined(_) | QuarantineError::NoPod(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

/// A pod as the UI shows it.
#[derive(Debug, Clone, Serialize)]
struct PodView {
    /// `namespace/pod`
    pod: String,
    node: String,
    ips: Vec<IpAddr>,
    quarantined: bool,
}

/// Who is where, from every node's rule set: the UI's view of the cluster.
#[derive(Default)]
struct Cluster {
    /// Workload id (`ns/Kind/name`) → its pods.
    workloads: BTreeMap<String, (String, String, Vec<PodView>)>,
    /// Pod → workload id.
    workload_of_pod: HashMap<PodKey, String>,
    /// Address → workload id.
    workload_of_ip: HashMap<IpAddr, String>,
    /// Address → pod.
    pod_of_ip: HashMap<IpAddr, PodKey>,
}

fn workload_id(namespace: &str, workload: &str) -> String {
    if namespace.is_empty() {
        workload.to_string()
    } else {
        format!("{namespace}/{workload}")
    }
}

impl Cluster {
    fn of(hub: &Hub) -> Cluster {
        let mut c = Cluster::default();
        for n in hub.node_states() {
            let Some(rs) = hub.ruleset(&n.node) else {
                continue;
            };
            for e in &rs.endpoints {
                let workload = e
                    .workload
                    .clone()
                    .unwrap_or_else(|| format!("Pod/{}", e.pod));
                let id = workload_id(&e.namespace, &workload);
                let pod = PodKey {
                    namespace: e.namespace.clone(),
                    name: e.pod.clone(),
                };
                for ip in &e.ips {
                    c.workload_of_ip.insert(*ip, id.clone());
                    c.pod_of_ip.insert(*ip, pod.clone());
                }
                c.workload_of_pod.insert(pod, id.clone());
                c.workloads
                    .entry(id)
                    .or_insert_with(|| (e.namespace.clone(), workload, Vec::new()))
                    .2
                    .push(PodView {
                        pod: e.name(),
                        node: rs.node.clone(),
                        ips: e.ips.clone(),
                        quarantined: e.quarantined,
                    });
            }
        }
        c
    }

    /// (source workload, destination workload, source pod, destination pod) of a record, the
    /// way the service graph names them (`world` for addresses of no pod).
    fn ends(&self, r: &FlowRecord) -> (String, String, String, String) {
        let here = r
            .endpoint
            .pod()
            .and_then(|p| self.workload_of_pod.get(p))
            .cloned()
            .unwrap_or_else(|| "world".into());
        let peer_ip = r.peer_address();
        let peer = self
            .workload_of_ip
            .get(&peer_ip)
            .cloned()
            .unwrap_or_else(|| "world".into());
        let peer_pod = r
            .peer
            .as_ref()
            .or_else(|| self.pod_of_ip.get(&peer_ip))
            .map(PodKey::to_string)
            .unwrap_or_default();
        let endpoint = r.endpoint.to_string();
        match r.direction {
            Direction::Ingress => (peer, here, peer_pod, endpoint),
            Direction::Egress => (here, peer, endpoint, peer_pod),
        }
    }
}

/// The deciding rule of a flow, structured: a rule of a policy with its parts; a default or
/// another reserved case (and a quarantine action) with its text alone, `kind` `Default` for
/// the default allow.
fn decided_by(rule: Option<&FlowRule>, text: &str) -> Value {
    match rule {
        Some(FlowRule::Rule(r)) => json!({
            "kind": r.kind.as_str(), "namespace": r.namespace, "name": r.name,
            "direction": r.direction.as_str(), "index": r.index, "text": text,
        }),
        other => {
            let kind = if other == Some(&FlowRule::DefaultAllow) {
                "Default"
            } else {
                ""
            };
            json!({ "kind": kind, "namespace": "", "name": "", "direction": "", "index": null, "text": text })
        }
    }
}

/// `/api/map`: everything the page draws, in one poll.
async fn map(State(s): State<WebState>, caller: Option<axum::Extension<auth::Caller>>) -> Response {
    let response = cached_map(&s).await;
    match caller {
        Some(axum::Extension(c)) if response.status().is_success() => {
            with_user(response, &c.name).await
        }
        _ => response,
    }
}

/// The map answer with `"user": NAME` first (the cached body is shared by every caller).
async fn with_user(response: Response, user: &str) -> Response {
    let body = match axum::body::to_bytes(response.into_body(), usize::MAX).await {
        Ok(b) => b,
        Err(_) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "cannot draw the map").into_response();
        }
    };
    let Some(rest) = body.strip_prefix(b"{") else {
        return json_bytes(body);
    };
    let mut out = format!("{{\"user\":{},", Value::String(user.to_string())).into_bytes();
    if rest.starts_with(b"}") {
        out.pop();
    }
    out.extend_from_slice(rest);
    json_bytes(out.into())
}

async fn cached_map(s: &WebState) -> Response {
    let mut last = s.map_cache.last.lock().await;
    let generation = s
        .map_cache
        .generation
        .load(std::sync::atomic::Ordering::Relaxed);
    if let Some((at, g, body)) = &*last
        && *g == generation
        && at.elapsed() < MAP_CACHE_TTL
    {
        return json_bytes(body.clone());
    }
    let body = match build_map(s).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot draw the map");
            return (StatusCode::INTERNAL_SERVER_ERROR, "cannot draw the map").into_response();
        }
    };
    *last = Some((std::time::Instant::now(), generation, body.clone()));
    json_bytes(body)
}

fn json_bytes(body: axum::body::Bytes) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The map's JSON: workloads with their pods, the graph's edges, quarantines, agents.
async fn build_map(s: &WebState) -> Result<axum::body::Bytes, String> {
    // `list` may call the Kubernetes API synchronously: off the runtime's workers. The map is
    // still drawn when it fails (without quarantine marks); `/api/quarantines` reports the error.
    let quarantines = match s.quarantine.clone() {
        Some(q) => match tokio::task::spawn_blocking(move || q.list()).await {
            Ok(Ok(list)) => list,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the map shows no quarantines: cannot list them");
                Vec::new()
            }
            Err(e) => {
                tracing::warn!(error = %e, "the map shows no quarantines: the listing task failed");
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    // The rest is CPU work (seconds in a large cluster): off the runtime's workers.
    let s = s.clone();
    tokio::task::spawn_blocking(move || draw_map(&s, quarantines))
        .await
        .map_err(|e| e.to_string())?
}

fn draw_map(
    s: &WebState,
    quarantines: Vec<pb::QuarantineInfo>,
) -> Result<axum::body::Bytes, String> {
    let cluster = Cluster::of(&s.hub);
    let graph = s.graph.lock().map(|g| g.graph()).unwrap_or_default();
    let quarantined: BTreeSet<String> = quarantines
        .iter()
        .map(|q| format!("{}/{}", q.namespace, q.pod))
        .collect();
    let mut nodes: BTreeMap<String, Value> = BTreeMap::new();
    for (id, (namespace, workload, pods)) in &cluster.workloads {
        let q = pods
            .iter()
            .any(|p| p.quarantined || quarantined.contains(&p.pod));
        nodes.insert(
            id.clone(),
            json!({
                "id": id, "namespace": namespace, "workload": workload, "kind": "workload",
                "pods": pods, "quarantined": q,
            }),
        );
    }
    for n in &graph.nodes {
        nodes.entry(n.id.clone()).or_insert_with(|| {
            let kind = if n.namespace.is_empty() {
                n.workload.as_str()
            } else {
                "workload"
            };
            json!({
                "id": n.id, "namespace": n.namespace, "workload": n.workload, "kind": kind,
                "pods": [], "quarantined": false,
            })
        });
    }
    let namespaces: BTreeSet<&str> = nodes
        .values()
        .filter_map(|n| n["namespace"].as_str())
        .filter(|n| !n.is_empty())
        .collect();
    let agents: Vec<Value> = s
        .hub
        .node_states()
        .into_iter()
        .map(|n| json!({"node": n.node, "connected": n.connected, "version": n.version, "realized": n.realized}))
        .collect();
    serde_json::to_vec(&json!({
        "time_unix_ms": unix_ms(SystemTime::now()),
        "actions": { "enabled": s.actions.is_ok(), "why": s.actions.as_ref().err() },
        "namespaces": namespaces,
        "nodes": nodes.into_values().collect::<Vec<_>>(),
        "edges": graph.edges,
        "quarantines": quarantines.iter().map(quarantine_json).collect::<Vec<_>>(),
        "agents": agents,
    }))
    .map(axum::body::Bytes::from)
    .map_err(|e| e.to_string())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Filters of `/api/flows/query`; every one given must match.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowQuery {
    /// Flows from or to this workload (`ns/Kind/name`, or `world`).
    workload: Option<String>,
    /// Flows of one edge: source and destination workload (with `port`/`protocol`).
    src: Option<String>,
    dst: Option<String>,
    port: Option<u32>,
    protocol: Option<u32>,
    /// Flows from or to this pod, `namespace/pod`.
    pod: Option<String>,
    /// Flows from or to this namespace.
    namespace: Option<String>,
    /// `allowed`, `denied`, `audit-would-deny` (or `audit`).
    verdict: Option<String>,
    /// At most this many records, newest first (default 100, at most 1000).
    limit: Option<usize>,
}

/// `/api/flows/query`: recent flows filtered server-side, each with its two ends named as the
/// service graph names them and its deciding rule structured.
async fn query_flows(
    State(s): State<WebState>,
    query: Result<Query<FlowQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("bad query: {}", e.body_text().to_lowercase()),
        )
    })?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let records = s.flows.lock().map(|f| f.recent(20_000)).unwrap_or_default();
    let cluster = Cluster::of(&s.hub);
    let in_ns = |id: &str, ns: &str| id.split_once('/').is_some_and(|(n, _)| n == ns);
    let mut out = Vec::new();
    for (node, e) in records {
        let (src, dst, src_pod, dst_pod) = match &e {
            FlowEntry::Quarantine(q) => {
                let w = cluster
                    .workload_of_pod
                    .get(&q.pod)
                    .cloned()
                    .unwrap_or_default();
                (w.clone(), w, q.pod.to_string(), q.pod.to_string())
            }
            FlowEntry::Flow(r) => cluster.ends(r),
        };
        let (record, audit) = match &e {
            FlowEntry::Flow(r) => (Some(r), false),
            FlowEntry::Quarantine(_) => (None, true),
        };
        let (dst_port, protocol) =
            record.map_or((0, 0), |r| (r.dst_port as u32, r.protocol as u32));
        if let Some(w) = &q.workload
            && &src != w
            && &dst != w
        {
            continue;
        }
        if (q.src.is_some() || q.dst.is_some()) && audit {
            continue;
        }
        if q.src.as_ref().is_some_and(|w| &src != w)
            || q.dst.as_ref().is_some_and(|w| &dst != w)
            || q.port.is_some_and(|p| dst_port != p)
            || q.protocol.is_some_and(|p| protocol != p)
        {
            continue;
        }
        if let Some(p) = &q.pod
            && &src_pod != p
            && &dst_pod != p
        {
            continue;
        }
        if let Some(ns) = &q.namespace
            && !in_ns(&src, ns)
            && !in_ns(&dst, ns)
        {
            continue;
        }
        if let Some(v) = &q.verdict {
            let want = if v == "audit" { "audit-would-deny" } else { v };
            if e.verdict_str() != want {
                continue;
            }
        }
        // The fields `/api/flows` shows, and more.
        let mut flow = bulkhead_controller::flows::flow_json(&node, &e);
        let decided = decided_by(
            record.map(|r| &r.rule),
            flow["rule"].as_str().unwrap_or_default(),
        );
        if let Value::Object(fields) = &mut flow {
            for (k, v) in [
                ("rule_id", json!(record.map_or(0, |r| r.rule_id))),
                ("decided_by", decided),
                ("packets", json!(record.map_or(0, |r| r.packets))),
                ("bytes", json!(record.map_or(0, |r| r.bytes))),
                ("src_workload", json!(src)),
                ("dst_workload", json!(dst)),
                ("src_pod", json!(src_pod)),
                ("dst_pod", json!(dst_pod)),
            ] {
                fields.insert(k.to_string(), v);
            }
        }
        out.push(flow);
        if out.len() >= limit {
            break;
        }
    }
    Ok(axum::Json(out).into_response())
}

#[cfg(test)]
mod tests;
