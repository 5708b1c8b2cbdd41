//! The web UI's quarantine endpoints: `GET /api/quarantines`, `POST /api/quarantine` and
//! `POST /api/quarantine/release`, with the checks every write passes (see the module comment
//! of [`super`]). Names and durations are checked here for a clear 400 and again by the
//! [`QuarantineControl`] (names must be Kubernetes names; a quarantine lasts at most 10 years).

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use bulkhead_controller::distribution::{Hub, quarantine::QuarantineControl};
use bulkhead_proto::v1 as pb;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    ACTION_HEADER, ApiError, WebState,
    auth::{Caller, Want},
};
use axum::Extension;

pub(super) fn quarantine_json(q: &pb::QuarantineInfo) -> Value {
    json!({
        "pod": format!("{}/{}", q.namespace, q.pod), "namespace": q.namespace, "name": q.name,
        "reason": q.reason, "created_at": q.created_at, "expires_at": q.expires_at,
        "actor": q.actor, "enforced_at": q.enforced_at, "connections_cut": q.connections_cut,
    })
}

pub(super) async fn list_quarantines(State(s): State<WebState>) -> Result<Response, ApiError> {
    let q = s.quarantine.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "this controller has no quarantine directory (--quarantine-dir)",
        )
    })?;
    let list = tokio::task::spawn_blocking(move || q.list())
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(axum::Json(list.iter().map(quarantine_json).collect::<Vec<_>>()).into_response())
}

use super::host_check::is_loopback_host;

/// The checks every write request passes before it is read (see the module comment).
fn check_write(s: &WebState, headers: &HeaderMap) -> Result<Arc<QuarantineControl>, ApiError> {
    if let Err(why) = &s.actions {
        return Err(ApiError::new(StatusCode::FORBIDDEN, why.clone()));
    }
    let text = |h: header::HeaderName| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let content_type = text(header::CONTENT_TYPE);
    if content_type.split(';').next().map(str::trim) != Some("application/json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the request body as JSON with content-type: application/json",
        ));
    }
    if headers.get(ACTION_HEADER).and_then(|v| v.to_str().ok()) != Some("1") {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "write requests need the header x-bulkhead-action: 1 (this refuses cross-site requests)",
        ));
    }
    let host = text(header::HOST);
    if s.loopback && !is_loopback_host(&host) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "write requests to a loopback listener must name a loopback host, not {host:?}"
            ),
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default();
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .unwrap_or_default();
        if authority.is_empty() || !authority.eq_ignore_ascii_case(&host) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("cross-site request refused: origin {origin:?} is not this server"),
            ));
        }
    }
    s.quarantine.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "this controller has no quarantine directory (--quarantine-dir)",
        )
    })
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("malformed request body: {}", e.to_string().to_lowercase()),
        )
    })
}

fn split_pod(s: &str) -> Result<(String, String), ApiError> {
    let pod: bulkhead_ruleset::PodKey = s.parse().map_err(|e: bulkhead_ruleset::BadPodKey| {
        ApiError::new(StatusCode::BAD_REQUEST, e.to_string())
    })?;
    Ok((pod.namespace, pod.name))
}

/// Who acted, for the audit log: the page, and the browser it ran in.
fn actor(headers: &HeaderMap, caller: Option<&Caller>) -> String {
    let agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let browser = [
        "Firefox/",
        "Edg/",
        "HeadlessChrome/",
        "Chrome/",
        "Safari/",
        "curl/",
    ]
    .iter()
    .find_map(|p| agent.split_whitespace().find(|t| t.starts_with(p)))
    .or_else(|| agent.split_whitespace().next())
    .unwrap_or("unknown client");
    let browser: String = browser.chars().take(40).collect();
    match caller {
        // The authenticated name, not anything the request claims.
        Some(c) => format!("{} via web UI ({browser})", c.name),
        None => format!("web UI ({browser})"),
    }
}

/// `POST /api/quarantine` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuarantineBody {
    /// `namespace/pod`
    pod: String,
    reason: String,
    /// Exceptions, as `bulkhead quarantine --allow` takes them.
    #[serde(default)]
    allow: Vec<String>,
    /// Lift it after this long (`30m`, `1h`).
    #[serde(default, rename = "for")]
    duration: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    pod: String,
}

/// Waits (bounded) until every node the change went to has acked it.
async fn wait_enforced(hub: &Hub, nodes: &BTreeMap<String, u64>, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        let states = hub.node_states();
        let done = nodes.iter().all(|(node, version)| {
            states
                .iter()
                .any(|n| &n.node == node && n.realized >= *version)
        });
        if done {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn answer(
    s: &WebState,
    started: Instant,
    resp: pb::QuarantineResponse,
) -> Result<Response, ApiError> {
    let nodes: BTreeMap<String, u64> = resp.nodes.into_iter().collect();
    let enforced = wait_enforced(&s.hub, &nodes, s.enforce_wait).await;
    Ok(axum::Json(json!({
        "quarantine": resp.quarantine.as_ref().map(quarantine_json),
        "nodes": nodes,
        "enforced": enforced,
        "elapsed_ms": started.elapsed().as_secs_f64() * 1e3,
    }))
    .into_response())
}

/// A write request admitted: the checks every write passes, its body read, its pod named, and
/// its caller allowed to do `want` in the pod's namespace.
struct Admitted<T> {
    control: Arc<QuarantineControl>,
    body: T,
    namespace: String,
    pod: String,
}

async fn admit<T: serde::de::DeserializeOwned>(
    s: &WebState,
    caller: Option<&Caller>,
    headers: &HeaderMap,
    body: &Bytes,
    pod_of: impl Fn(&T) -> &str,
    want: impl Fn(String) -> Want,
) -> Result<Admitted<T>, ApiError> {
    let control = check_write(s, headers)?;
    let body: T = parse_body(body)?;
    let (namespace, pod) = split_pod(pod_of(&body))?;
    s.auth.authorize(caller, &want(namespace.clone())).await?;
    Ok(Admitted {
        control,
        body,
        namespace,
        pod,
    })
}

pub(super) async fn quarantine(
    State(s): State<WebState>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let caller = caller.map(|Extension(c)| c);
    let Admitted {
        control,
        body: b,
        namespace,
        pod,
    } = admit(
        &s,
        caller.as_ref(),
        &headers,
        &body,
        |b: &QuarantineBody| &b.pod,
        Want::Quarantine,
    )
    .await?;
    if b.reason.trim().is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "a quarantine needs a reason",
        ));
    }
    let allow = b
        .allow
        .iter()
        .filter(|a| !a.trim().is_empty())
        .map(|a| crate::quarantine::parse_allow(a.trim()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    // At most 10 years: longer ones overflowed the clock or the year (HTTP 500).
    let duration_seconds = match b.duration.as_deref().map(str::trim) {
        None | Some("") => 0,
        Some(d) => crate::quarantine::parse_for(d)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?
            .as_secs()
            .max(1),
    };
    let request = pb::QuarantineRequest {
        namespace,
        pod,
        reason: b.reason.trim().to_string(),
        allow,
        duration_seconds,
        actor: actor(&headers, caller.as_ref()),
    };
    let resp = tokio::task::spawn_blocking(move || control.quarantine(request))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()));
    s.map_changed();
    answer(&s, started, resp??).await
}

pub(super) async fn release(
    State(s): State<WebState>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let caller = caller.map(|Extension(c)| c);
    let Admitted {
        control,
        namespace,
        pod,
        ..
    } = admit(
        &s,
        caller.as_ref(),
        &headers,
        &body,
        |b: &ReleaseBody| &b.pod,
        Want::Release,
    )
    .await?;
    let request = pb::ReleaseRequest {
        namespace,
        pod,
        actor: actor(&headers, caller.as_ref()),
    };
    let resp = tokio::task::spawn_blocking(move || control.release(request))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()));
    s.map_changed();
    answer(&s, started, resp??).await
}
