//! Issue 21, findings 5, 7, 8 and 9, over HTTP against a real `bulkhead controller` process (its
//! web UI's quarantine API, no agents; nothing here needs privileges):
//! - quarantines of look-alike pods (`a/b--c`, `a--b/c`) are kept and released apart, and a
//!   release names a Kubernetes pod;
//! - a duration over 10 years is a 400, not a 500 from a panic;
//! - an expired quarantine leaves `/api/quarantines` and the map, with an `expire` audit line;
//! - a request whose headers never finish is closed.

mod common;

use common::*;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a}
---
apiVersion: v1
kind: Namespace
metadata: {name: a--b}
---
apiVersion: v1
kind: Namespace
metadata: {name: tools}
---
apiVersion: v1
kind: Pod
metadata: {name: b--c, namespace: a, labels: {app: x}}
spec: {nodeName: n1, containers: [{name: c, image: x}]}
status: {podIP: 10.207.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: a--b, labels: {app: y}}
spec: {nodeName: n1, containers: [{name: c, image: x}]}
status: {podIP: 10.207.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: debug, namespace: tools, labels: {app: debug}}
spec: {nodeName: n1, containers: [{name: c, image: x}]}
status: {podIP: 10.207.0.3}
"#;

/// A controller process on loopback ports of its own, reading a temporary manifest directory
/// (its quarantines in `quarantines/` there).
struct Controller {
    child: Child,
    dir: PathBuf,
    http: u16,
    metrics: u16,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(name: &str) -> Controller {
    let dir = std::env::temp_dir().join(format!("bh-qh-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("manifests")).expect("temp dir");
    std::fs::write(dir.join("manifests/cluster.yaml"), MANIFESTS).expect("write manifests");
    let (grpc, http, metrics) = (free_port(), free_port(), free_port());
    let child = Command::new(bin())
        .args(["controller", "--insecure", "-f"])
        .arg(dir.join("manifests"))
        .args(["--listen", &format!("127.0.0.1:{grpc}")])
        .args(["--http", &format!("127.0.0.1:{http}")])
        .args(["--metrics", &format!("127.0.0.1:{metrics}")])
        .args(["--reload-ms", "100"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the controller");
    let c = Controller {
        child,
        dir,
        http,
        metrics,
    };
    wait_until("the controller answers", Duration::from_secs(30), || {
        http_get(c.http, "/healthz").is_some_and(|b| b.trim() == "ok")
    });
    c
}

/// A write as the page sends it: (status, JSON body).
fn post(c: &Controller, path: &str, body: &Value) -> (u16, Value) {
    let body = body.to_string();
    let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], c.http))).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nX-Bulkhead-Action: 1\r\nContent-Length: {}\r\n\r\n{body}",
        c.http,
        body.len()
    )
    .expect("send");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    (
        status,
        serde_json::from_str(body).unwrap_or(Value::String(body.into())),
    )
}

fn get(c: &Controller, path: &str) -> Value {
    let body = http_get(c.http, path).unwrap_or_else(|| panic!("GET {path}"));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// `namespace/pod` of every quarantine `/api/quarantines` lists.
fn listed(c: &Controller) -> Vec<String> {
    get(c, "/api/quarantines")
        .as_array()
        .expect("a list")
        .iter()
        .map(|q| q["pod"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Whether the map draws the workload `id` as quarantined.
fn map_quarantined(c: &Controller, id: &str) -> bool {
    get(c, "/api/map")["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["id"] == id))
        .unwrap_or_else(|| panic!("the map has {id}"))["quarantined"]
        == true
}

fn audit_actions(c: &Controller) -> Vec<(String, String)> {
    std::fs::read_to_string(c.dir.join("manifests/quarantines/audit.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| {
            (
                v["action"].as_str().unwrap_or_default().to_string(),
                format!(
                    "{}/{}",
                    v["namespace"].as_str().unwrap_or_default(),
                    v["pod"].as_str().unwrap_or_default()
                ),
            )
        })
        .collect()
}

/// Before: both pods' quarantines were `a--b--c.yaml`: the second overwrote the first (which
/// stopped being enforced, with no audit line) and one release lifted both.
#[test]
fn look_alike_pods_are_quarantined_and_released_apart() {
    let c = start("names");
    for pod in ["a/b--c", "a--b/c"] {
        let (status, out) = post(
            &c,
            "/api/quarantine",
            &json!({"pod": pod, "reason": "look-alike"}),
        );
        assert_eq!(status, 200, "{pod}: {out}");
    }
    assert_eq!(listed(&c), ["a/b--c", "a--b/c"]);
    assert!(map_quarantined(&c, "a/Pod/b--c") && map_quarantined(&c, "a--b/Pod/c"));

    let (status, out) = post(&c, "/api/quarantine/release", &json!({"pod": "a/b--c"}));
    assert_eq!(status, 200, "{out}");
    assert_eq!(listed(&c), ["a--b/c"], "the other pod stays quarantined");
    assert!(map_quarantined(&c, "a--b/Pod/c"));

    // A release names a Kubernetes pod: `..` never reaches a path.
    let (status, out) = post(&c, "/api/quarantine/release", &json!({"pod": "tools/.."}));
    assert_eq!(status, 400, "{out}");
    assert!(
        out["error"]
            .as_str()
            .is_some_and(|e| e.contains("not a Kubernetes pod name")),
        "{out}"
    );
}

/// Before: `"for": "10000y"` was a 500 ("Display implementation returned an error") and
/// `"300000000000y"` a 500 ("overflow when adding duration"), both panics.
#[test]
fn durations_over_ten_years_are_refused_with_a_400() {
    let c = start("durations");
    for duration in ["10000y", "300000000000y", "11y"] {
        let (status, out) = post(
            &c,
            "/api/quarantine",
            &json!({"pod": "tools/debug", "reason": "long", "for": duration}),
        );
        assert_eq!(status, 400, "{duration}: {out}");
        assert!(
            out["error"]
                .as_str()
                .is_some_and(|e| e.contains("at most 10 years")),
            "{duration}: {out}"
        );
    }
    assert!(listed(&c).is_empty());
    let (status, out) = post(
        &c,
        "/api/quarantine",
        &json!({"pod": "tools/debug", "reason": "long", "for": "10y"}),
    );
    assert_eq!(status, 200, "ten years is allowed: {out}");
}

/// Before: after a `for: 2s` quarantine expired, `/api/quarantines` and the map still showed it
/// and `audit.log` had no line for it.
#[test]
fn an_expired_quarantine_leaves_the_listing_and_the_map_with_an_audit_line() {
    let c = start("expiry");
    let (status, out) = post(
        &c,
        "/api/quarantine",
        &json!({"pod": "tools/debug", "reason": "short", "for": "2s"}),
    );
    assert_eq!(status, 200, "{out}");
    assert!(
        out["quarantine"]["expires_at"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{out}"
    );
    wait_until(
        "the expired quarantine is lifted everywhere it is shown",
        Duration::from_secs(30),
        || {
            listed(&c).is_empty()
                && !map_quarantined(&c, "tools/Pod/debug")
                && audit_actions(&c).contains(&("expire".into(), "tools/debug".into()))
        },
    );
    assert!(
        !c.dir
            .join("manifests/quarantines/tools/debug.yaml")
            .exists(),
        "its manifest is gone"
    );
    assert_eq!(
        audit_actions(&c),
        [
            ("quarantine".to_string(), "tools/debug".to_string()),
            ("expire".into(), "tools/debug".into()),
        ]
    );
}

/// Finding 9: the controller's HTTP endpoint closes a request whose headers never finish (one
/// stayed open over 90 s before), and still serves whole ones.
#[test]
fn a_half_sent_request_is_closed_by_the_controller() {
    let c = start("half-sent");
    let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], c.http))).expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .expect("half a request");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let started = Instant::now();
    let mut buf = [0u8; 512];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            // hyper may answer 408 before closing.
            Ok(_) => continue,
            Err(e) => {
                break !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                );
            }
        }
    };
    assert!(
        closed,
        "the half-sent request was still open after {:?}",
        started.elapsed()
    );
    assert!(http_get(c.http, "/healthz").is_some_and(|b| b.trim() == "ok"));
}

/// Finding 4 (DNS rebinding): the API answers only to loopback names, the listener's address
/// and `--http-host` names; `/metrics` and `/healthz` to any host.
#[test]
fn the_api_answers_only_to_its_own_host_names() {
    let c = start("host");
    let status_on = |port: u16, path: &str, host: &str| -> u16 {
        let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").expect("send");
        let mut response = String::new();
        s.read_to_string(&mut response).expect("read");
        response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status")
    };
    let status = |path: &str, host: &str| status_on(c.http, path, host);
    let port = c.http;
    for path in ["/api/map", "/api/flows", "/api/quarantines", "/"] {
        assert_eq!(status(path, "rebound.evil.example"), 421, "{path}");
        assert_eq!(
            status(path, &format!("rebound.evil.example:{port}")),
            421,
            "{path}"
        );
        assert_eq!(status(path, &format!("127.0.0.1:{port}")), 200, "{path}");
        assert_eq!(status(path, &format!("localhost:{port}")), 200, "{path}");
    }
    // Metrics and probes have their own listener, which answers to any host (scrapers and
    // the kubelet use addresses) and serves nothing else.
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(status_on(c.metrics, path, "10.0.0.7:9963"), 200, "{path}");
    }
    for path in ["/api/map", "/api/flows", "/"] {
        assert_eq!(status_on(c.metrics, path, "127.0.0.1"), 404, "{path}");
    }
    assert_eq!(status("/metrics", &format!("127.0.0.1:{port}")), 404);
    assert_eq!(status("/healthz", "10.0.0.7:9961"), 200);
}

/// Finding 4: the API is not served beyond loopback without authentication unless asked
/// for, and authentication settings that cannot work are refused at start, with what to do.
#[test]
fn an_unauthenticated_api_stays_on_loopback() {
    let dir = std::env::temp_dir().join(format!("bh-qh-exposure-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("cluster.yaml"), MANIFESTS).expect("write manifests");
    let refused = |extra: &[&str], want: &str| {
        let out = Command::new(bin())
            .args(["controller", "--insecure", "-f"])
            .arg(&dir)
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--metrics", &format!("127.0.0.1:{}", free_port())])
            .args(extra)
            .output()
            .expect("run the controller");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} started");
        assert!(err.contains(want), "{extra:?}: {err}");
    };
    let public = format!("0.0.0.0:{}", free_port());
    refused(&["--http", &public], "--http-auth");
    refused(&["--http-auth", "tokens"], "--http-tokens");
    refused(&["--http-auth", "kubernetes"], "--kubernetes");
    let missing = dir.join("no-such-tokens").display().to_string();
    refused(
        &["--http-auth", "tokens", "--http-tokens", &missing],
        "no-such-tokens",
    );
    refused(
        &["--agent-token-review", "--agent-service-account", "a/b"],
        "--kubernetes",
    );
    // The agent's flows and connections likewise (checked before anything is loaded).
    let out = Command::new(bin())
        .args(["agent", "run", "--node", "n1", "--ruleset"])
        .arg(dir.join("cluster.yaml"))
        .args(["--http", "0.0.0.0:19964"])
        .output()
        .expect("run the agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--http-unauthenticated"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
