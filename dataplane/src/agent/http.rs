//! The agent's two HTTP endpoints: `/metrics` and `/healthz` on the metrics address (counters,
//! no addresses or individual flows), `/flows` and `/connections` on a loopback one by default
//! (every pod's peers on this node).

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context;

use super::Shared;
use crate::flows::FlowContext;

/// Binds `addr` and serves `/metrics` and `/healthz` on it from a task.
pub(super) async fn serve_metrics(addr: SocketAddr, shared: Arc<Shared>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind metrics address {addr}"))?;
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
        if let Err(e) = bulkhead_http::serve(
            listener,
            metrics_app,
            bulkhead_http::Limits::default(),
            refused,
        )
        .await
        {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}

/// Binds `addr` and serves `/flows`, `/connections` and `/healthz` on it from a task.
pub(super) async fn serve_flows(
    addr: SocketAddr,
    pin_dir: PathBuf,
    context: Arc<RwLock<FlowContext>>,
    shared: Arc<Shared>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind HTTP address {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "serving /flows, /connections");
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/connections",
            axum::routing::get({
                move |q: axum::extract::Query<ConnectionsQuery>| async move {
                    let ctx = context.read().map(|c| c.clone()).unwrap_or_default();
                    let pin_dir = pin_dir.clone();
                    let (offset, limit) = (
                        q.offset.unwrap_or(0),
                        q.limit
                            .unwrap_or(DEFAULT_CONNECTIONS_PAGE)
                            .clamp(1, crate::flows::MAX_CONNECTIONS_PAGE),
                    );
                    let (page, total) = tokio::task::spawn_blocking(move || {
                        crate::flows::connections(&pin_dir, &ctx, offset, limit)
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
            bulkhead_http::AllowedHosts::new(addr, &[]),
            bulkhead_http::check_host,
        ));
    let refused = shared.metrics.http_connections_refused.clone();
    tokio::spawn(async move {
        if let Err(e) =
            bulkhead_http::serve(listener, app, bulkhead_http::Limits::default(), refused).await
        {
            tracing::error!(error = %e, "flows server stopped");
        }
    });
    Ok(())
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
    page: Vec<crate::flows::Connection>,
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
