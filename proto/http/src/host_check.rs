//! Which `Host` the controller's HTTP API answers to (issue 21, finding 4, DNS rebinding): a
//! page on another site can make a browser send requests to `127.0.0.1` or to a port-forward
//! under a name the attacker controls (DNS rebinding), and read the answers as same-origin. So
//! every route but `/metrics` and `/healthz` (scraped and probed by address) answers only to a
//! loopback name (`localhost`, `127.0.0.1`, `[::1]`), the listener's own address, or a name given
//! with `--http-host`; anything else gets 421 Misdirected Request.

use std::{collections::BTreeSet, net::SocketAddr, sync::Arc};

use axum::{
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};

/// The names (without port) the API answers to besides loopback ones.
#[derive(Debug, Clone, Default)]
pub struct AllowedHosts(Arc<BTreeSet<String>>);

impl AllowedHosts {
    /// The listener's own address (unless it is unspecified) and the `--http-host` names.
    pub fn new(listener: SocketAddr, extra: &[String]) -> AllowedHosts {
        let mut names: BTreeSet<String> = extra.iter().map(|h| h.to_ascii_lowercase()).collect();
        if !listener.ip().is_unspecified() {
            names.insert(listener.ip().to_string());
        }
        AllowedHosts(Arc::new(names))
    }

    /// Whether a request with this `Host` header is for us.
    pub fn admits(&self, host: &str) -> bool {
        is_loopback_host(host) || self.0.contains(&host_name(host))
    }
}

/// The name part of a `Host` header or an origin's authority (port and brackets off, lower
/// case, without a trailing dot).
fn host_name(host: &str) -> String {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Is `host` (a `Host` header or an origin's authority, with or without a port) a loopback
/// name?
pub fn is_loopback_host(host: &str) -> bool {
    let name = host_name(host);
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The body of an error answer: `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

impl ErrorBody {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| r#"{"error":""}"#.to_string())
    }
}

/// Axum middleware: refuses requests for another host, except on `/metrics` and `/healthz`.
pub async fn check_host(State(allowed): State<AllowedHosts>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path == "/metrics" || path == "/healthz" {
        return next.run(req).await;
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    if allowed.admits(host) {
        return next.run(req).await;
    }
    (
        StatusCode::MISDIRECTED_REQUEST,
        [(header::CONTENT_TYPE, "application/json")],
        ErrorBody {
            error: format!(
                "this controller does not answer to host {host:?}; use 127.0.0.1 (e.g. through kubectl port-forward) or start it with --http-host {}",
                host.rsplit_once(':').map_or(host, |(h, _)| h)
            ),
        }
        .to_json(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_the_listener_and_named_hosts_are_admitted_others_not() {
        let a = AllowedHosts::new(
            "10.1.2.3:9961".parse().expect("addr"),
            &["bulkhead-controller.bulkhead.svc".into()],
        );
        for ok in [
            "localhost:9961",
            "LOCALHOST",
            "127.0.0.1:8080",
            "127.9.9.9",
            "[::1]:9961",
            "10.1.2.3:9961",
            "bulkhead-controller.bulkhead.svc:9961",
            "bulkhead-controller.bulkhead.svc.",
        ] {
            assert!(a.admits(ok), "{ok}");
        }
        for refused in [
            "",
            "evil.example:9961",
            "localhost.evil.example",
            "10.1.2.4:9961",
            "bulkhead-controller",
            "[::2]:9961",
        ] {
            assert!(!a.admits(refused), "{refused}");
        }
        // An unspecified listener adds no address of its own.
        let any = AllowedHosts::new("0.0.0.0:9961".parse().expect("addr"), &[]);
        assert!(!any.admits("0.0.0.0:9961") && any.admits("127.0.0.1:9961"));
    }
}
