//! The controller's HTTP/JSON API: one set of routes and one set of typed answers
//! ([`types`]) for the web UI and the `bulkhead` commands (`flows`, `graph`, the lab and the
//! demo), all behind the authentication layer ([`super::auth`]): a viewer reads, an admin also
//! quarantines and releases.
//!
//! | route | answer |
//! |---|---|
//! | `GET /api/nodes` | [`NodeView`]s |
//! | `GET /api/policies` | [`PolicyView`]s |
//! | `GET /api/graph` | the service [`Graph`] |
//! | `GET /api/graph.dot` | the graph in Graphviz DOT (text) |
//! | `GET /api/flows?FILTERS` (also `/api/flows/query`) | [`FlowView`]s, filtered by [`FlowQuery`] |
//! | `GET /api/map` | [`MapView`]: everything the page draws |
//! | `GET /api/quarantines` | [`QuarantineView`]s |
//! | `GET /api/recommend?namespaces=a,b&since=NANOS` | a [`crate::recommend::Recommendation`] (see [`recommend`]) |
//! | `POST /api/impact?since=NANOS&until=NANOS&delete=KIND/NS/NAME` (YAML proposal) | a [`crate::impact::Impact`] (see [`impact`]); reads only |
//! | `POST /api/quarantine` ([`QuarantineBody`]), `POST /api/quarantine/release` ([`ReleaseBody`]) | [`QuarantineAnswer`] |
//!
//! Errors are [`ErrorBody`]s with a 4xx/5xx status.
//!
//! Write actions (quarantine, release) change enforcement cluster-wide, so they are refused
//! unless the HTTP listener is on loopback or `--web-actions` says otherwise, and a request must
//! prove it is not a cross-site form or fetch: `Content-Type: application/json` plus the
//! `X-Bulkhead-Action: 1` header (neither can be sent cross-site without a CORS preflight, which
//! this server never grants), an `Origin`, when present, naming the host the request was sent
//! to, and on a loopback listener a loopback `Host` (against DNS rebinding).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};

use super::{
    HttpConfig,
    auth::{self, WebAuth},
};
use crate::{
    distribution::{
        FlowStore, Hub,
        quarantine::{QuarantineControl, QuarantineError},
    },
    flows::ServiceGraph,
};

mod flows;
pub mod impact;
mod map;
pub mod quarantine;
pub mod recommend;
pub mod types;

pub use types::*;

/// The header a write request must carry (a browser sends it cross-site only after a CORS
/// preflight, which this server never grants).
pub const ACTION_HEADER: &str = "x-bulkhead-action";

/// What the API's handlers read and act on: the controller's own state, shared.
#[derive(Clone)]
pub struct ApiState {
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
    pub auth: Arc<WebAuth>,
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

impl ApiState {
    /// The map changed (a quarantine or release from this UI): the next request computes it.
    pub(crate) fn map_changed(&self) {
        self.map_cache
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl ApiState {
    pub fn new(
        http: SocketAddr,
        args: &HttpConfig,
        hub: Arc<Hub>,
        flows: Arc<Mutex<FlowStore>>,
        graph: Arc<Mutex<ServiceGraph>>,
        quarantine: Option<Arc<QuarantineControl>>,
        auth: Arc<WebAuth>,
    ) -> ApiState {
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
        ApiState {
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

/// Every `/api` route, behind the authentication layer: each needs a reader, the writes an
/// admin (merged into the controller's HTTP router with the page and the probes).
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/api/nodes", get(nodes))
        .route("/api/policies", get(policies))
        .route("/api/graph", get(graph))
        .route("/api/graph.dot", get(graph_dot))
        .route("/api/flows", get(flows::flows))
        // The web UI's former path of the same answer.
        .route("/api/flows/query", get(flows::flows))
        .route("/api/map", get(map::map))
        .route("/api/recommend", get(recommend::recommend))
        .route(
            "/api/impact",
            post(impact::impact)
                .layer(axum::extract::DefaultBodyLimit::max(impact::MAX_BODY_BYTES)),
        )
        .route("/api/quarantines", get(quarantine::list_quarantines))
        .route("/api/quarantine", post(quarantine::quarantine))
        .route("/api/quarantine/release", post(quarantine::release))
        .route_layer(axum::middleware::from_fn_with_state(
            state.auth.clone(),
            auth::require,
        ))
        .with_state(state)
}

async fn nodes(State(s): State<ApiState>) -> axum::Json<Vec<NodeView>> {
    axum::Json(
        s.hub
            .node_states()
            .into_iter()
            .map(NodeView::from)
            .collect(),
    )
}

async fn policies(State(s): State<ApiState>) -> axum::Json<Vec<PolicyView>> {
    axum::Json(
        s.hub
            .policy_status()
            .into_iter()
            .map(PolicyView::from)
            .collect(),
    )
}

/// A [`Graph`], written straight from the aggregate ([`ServiceGraph::to_json`], byte for byte
/// what serializing the [`Graph`] writes): no copy of the graph on the way.
async fn graph(State(s): State<ApiState>) -> Response {
    let body = s
        .graph
        .lock()
        .map(|g| g.to_json())
        .unwrap_or_else(|_| br#"{"nodes":[],"edges":[]}"#.to_vec());
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn graph_dot(State(s): State<ApiState>) -> String {
    s.graph
        .lock()
        .map(|g| g.graph().to_dot())
        .unwrap_or_default()
}

/// An error the page can show: `{"error": "..."}` with a 4xx/5xx status.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError(status, message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.0, axum::Json(ErrorBody { error: self.1 })).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"bulkhead\""),
            );
        }
        response
    }
}

impl From<crate::answers::AnswerError> for ApiError {
    fn from(e: crate::answers::AnswerError) -> ApiError {
        use crate::answers::AnswerError;
        let status = match &e {
            AnswerError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            AnswerError::Proposal(_) => StatusCode::BAD_REQUEST,
            AnswerError::History(h) => {
                tracing::error!(error = %h, "reading the flow history");
                StatusCode::INTERNAL_SERVER_ERROR
            }
            AnswerError::Poisoned => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
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

#[cfg(test)]
mod impact_tests;
#[cfg(test)]
mod tests;
