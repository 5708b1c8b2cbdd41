//! The API's quarantine endpoints: `GET /api/quarantines`, `POST /api/quarantine` and
//! `POST /api/quarantine/release`, with the checks every write passes (see the module comment
//! of [`super`]). Names and durations are checked here for a clear 400 and again by the
//! [`QuarantineControl`] (names must be Kubernetes names; a quarantine lasts at most 10 years).

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::Extension;
use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use bulkhead_http::is_loopback_host;
use bulkhead_proto::v1 as pb;

use super::{
    ACTION_HEADER, ApiError, ApiState, QuarantineAnswer, QuarantineBody, QuarantineView,
    ReleaseBody,
};
use crate::{
    distribution::{Hub, quarantine::QuarantineControl},
    server::auth::{Caller, Want},
};

pub(super) async fn list_quarantines(State(s): State<ApiState>) -> Result<Response, ApiError> {
    let q = s.quarantine.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "this controller has no quarantine directory (--quarantine-dir)",
        )
    })?;
    let list = tokio::task::spawn_blocking(move || q.list())
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(axum::Json(list.iter().map(QuarantineView::from).collect::<Vec<_>>()).into_response())
}

/// The checks every write request passes before it is read (see the module comment).
fn check_write(s: &ApiState, headers: &HeaderMap) -> Result<Arc<QuarantineControl>, ApiError> {
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
    s: &ApiState,
    started: Instant,
    resp: pb::QuarantineResponse,
) -> Result<Response, ApiError> {
    let nodes: BTreeMap<String, u64> = resp.nodes.into_iter().collect();
    let enforced = wait_enforced(&s.hub, &nodes, s.enforce_wait).await;
    Ok(axum::Json(QuarantineAnswer {
        quarantine: resp.quarantine.as_ref().map(QuarantineView::from),
        nodes,
        enforced,
        elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
    })
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
    s: &ApiState,
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
    State(s): State<ApiState>,
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
        .map(|a| parse_allow(a.trim()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    // At most 10 years: longer ones overflowed the clock or the year (HTTP 500).
    let duration_seconds = match b.duration.as_deref().map(str::trim) {
        None | Some("") => 0,
        Some(d) => parse_for(d)
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
    State(s): State<ApiState>,
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

/// How long a quarantine lasts, as `--for` and the web UI's `for` take it: a duration (`30m`,
/// `2h`, `7d`) of at most 10 years, the controller's limit
/// ([`crate::distribution::quarantine::MAX_DURATION`]).
pub fn parse_for(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("for {s:?}: {}", e.to_string().to_lowercase()))?;
    if d > crate::distribution::quarantine::MAX_DURATION {
        return Err(format!(
            "for {s:?}: a quarantine can last at most 10 years; leave the duration out to quarantine until released"
        ));
    }
    Ok(d)
}

/// An exception to a quarantine, as `--allow` and the web UI take it:
/// `ns=NAMESPACE[,label=value…][@PORT[/PROTO]]` or `CIDR[@PORT[/PROTO]]`.
pub fn parse_allow(s: &str) -> Result<pb::QuarantineAllow, String> {
    let (peer, port) = match s.split_once('@') {
        Some((p, port)) => (p, Some(port)),
        None => (s, None),
    };
    let mut a = pb::QuarantineAllow::default();
    if peer.contains('/') && !peer.contains('=') {
        peer.parse::<ipnetwork::IpNetwork>()
            .map_err(|_| format!("allow {s:?}: not a CIDR"))?;
        a.cidr = peer.to_string();
    } else {
        for kv in peer.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("allow {s:?}: expected ns=NAMESPACE[,label=value…]"))?;
            if k == "ns" || k == "namespace" {
                a.namespace = v.to_string();
            } else {
                a.labels.insert(k.to_string(), v.to_string());
            }
        }
    }
    if let Some(port) = port {
        let (p, proto) = port.split_once('/').unwrap_or((port, "TCP"));
        a.port = p
            .parse()
            .map_err(|_| format!("allow {s:?}: bad port {p:?}"))?;
        a.protocol = proto.to_uppercase();
    }
    Ok(a)
}
