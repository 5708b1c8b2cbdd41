use bulkhead_http::is_loopback_host;
use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::{
    EngineConfig, PolicyEngine,
    distribution::ManifestSource,
    flows::Directory,
    ruleset::{Direction, FlowKind, FlowReason, FlowRecord, FlowRule, RuleKind, RuleRef, RuleSet},
    server::HttpConfig,
};
use serde_json::{Value, json};
use std::{collections::BTreeSet, time::SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

const SHOP: &str = include_str!("../../../../examples/demo/shop.yaml");
const POLICIES: &str = include_str!("../../../../examples/demo/policies.yaml");

pub(super) struct Fixture {
    pub(super) addr: SocketAddr,
    dir: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The rule `index` of a policy (`None`: its default deny).
fn policy(
    kind: RuleKind,
    namespace: &str,
    name: &str,
    direction: Direction,
    index: Option<u32>,
) -> FlowRule {
    FlowRule::Rule(RuleRef {
        kind,
        namespace: namespace.into(),
        name: name.into(),
        direction,
        index,
    })
}

fn record(
    endpoint: &str,
    direction: &str,
    src: &str,
    dst: &str,
    port: u16,
    verdict: &str,
    rule: FlowRule,
) -> FlowRecord {
    FlowRecord {
        time_unix_nanos: 1_700_000_000_000_000_000,
        endpoint: endpoint.parse().expect("endpoint"),
        direction: direction.parse().expect("direction"),
        src: src.parse().expect("ip"),
        dst: dst.parse().expect("ip"),
        src_port: 40000,
        dst_port: port,
        protocol: 6,
        kind: if verdict == "allowed" {
            FlowKind::New
        } else {
            FlowKind::Denied
        },
        verdict: verdict.parse().expect("verdict"),
        rule,
        rule_id: 0,
        local_identity: 0,
        peer_identity: 0,
        peer: None,
        reason: FlowReason::DeniedPolicy,
        packets: 1,
        bytes: 60,
        peer_names: Vec::new(),
        staged: None,
    }
}

/// A controller's state for the demo shop (no agents), with a few flows, served on a
/// loopback port by the UI's router alone.
pub(super) async fn serve(http: &str, args: HttpConfig, quarantine: bool) -> Fixture {
    serve_with_auth(http, args, quarantine, |_| auth::WebAuth::Off).await
}

/// [`serve`] with the authentication `auth` makes (given the fixture's directory).
pub(super) async fn serve_with_auth(
    http: &str,
    args: HttpConfig,
    quarantine: bool,
    auth: impl FnOnce(&std::path::Path) -> auth::WebAuth,
) -> Fixture {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "bh-web-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("quarantines")).expect("temp dir");
    std::fs::write(dir.join("shop.yaml"), SHOP).expect("write");
    std::fs::write(dir.join("policies.yaml"), POLICIES).expect("write");
    let mut source = ManifestSource::new(vec![dir.clone()]);
    let reload = source.reload();
    assert!(reload.errors.is_empty(), "{:?}", reload.errors);
    let mut engine = PolicyEngine::empty(EngineConfig::default());
    engine
        .apply_batch(reload.changes)
        .expect("compile the shop");
    let hub = Arc::new(Hub::new(engine));
    let flows = Arc::new(Mutex::new(FlowStore::new(100)));
    let graph = Arc::new(Mutex::new(ServiceGraph::default()));
    let rulesets: Vec<RuleSet> = hub
        .node_states()
        .iter()
        .filter_map(|n| hub.ruleset(&n.node))
        .collect();
    let directory = Directory::from_rulesets(&rulesets);
    let node = rulesets.first().map(|r| r.node.clone()).expect("a node");
    for r in [
        record(
            "shop/backend",
            "ingress",
            "10.203.0.40",
            "10.203.0.20",
            8080,
            "denied",
            policy(
                RuleKind::NetworkPolicy,
                "shop",
                "backend-api",
                Direction::Ingress,
                None,
            ),
        ),
        record(
            "shop/backend",
            "ingress",
            "10.203.0.10",
            "10.203.0.20",
            8080,
            "allowed",
            policy(
                RuleKind::NetworkPolicy,
                "shop",
                "backend-api",
                Direction::Ingress,
                Some(0),
            ),
        ),
        record(
            "shop/frontend",
            "egress",
            "10.203.0.10",
            "192.0.2.7",
            443,
            "denied",
            policy(
                RuleKind::ServicePolicy,
                "shop",
                "no-world",
                Direction::Egress,
                Some(0),
            ),
        ),
    ] {
        graph.lock().expect("graph").add(&directory, &r);
        flows.lock().expect("flows").push_batch(&node, [r]);
    }
    let quarantine = quarantine.then(|| {
        Arc::new(QuarantineControl::new(
            dir.join("quarantines"),
            Arc::new(Mutex::new(source)),
            hub.clone(),
            flows.clone(),
        ))
    });
    let http: SocketAddr = http.parse().expect("address");
    let auth = Arc::new(auth(&dir));
    let mut state = ApiState::new(http, &args, hub, flows, graph, quarantine, auth);
    state.enforce_wait = Duration::ZERO;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        axum::serve(listener, router(state).merge(crate::server::ui::router())).await
    });
    Fixture { addr, dir }
}

/// (status, content type, body) of one HTTP/1.1 request.
pub(super) async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req += &format!("Host: {addr}\r\n");
    }
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += &format!("Content-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).await.expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    (status, content_type, body.to_string())
}

async fn get_json(addr: SocketAddr, path: &str) -> (u16, Value) {
    let (status, ct, body) = request(addr, "GET", path, &[], "").await;
    assert!(ct.starts_with("application/json"), "{path}: {ct} {body}");
    (status, serde_json::from_str(&body).expect("JSON"))
}

const JSON: (&str, &str) = ("Content-Type", "application/json");
const ACTION: (&str, &str) = ("X-Bulkhead-Action", "1");

/// Finding 4: one map is computed at a time and reused for a second, so a burst of pages
/// (six at once used to take 1.93 GB at 100k pods) costs one computation; a quarantine from
/// the UI shows on the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_map_is_computed_once_for_a_burst_and_again_after_a_write() {
    let f = serve("127.0.0.1:9961", HttpConfig::default(), true).await;
    let burst: Vec<_> = (0..6)
        .map(|_| tokio::spawn(get_json(f.addr, "/api/map")))
        .collect();
    let mut times = BTreeSet::new();
    for r in burst {
        let (status, map) = r.await.expect("join");
        assert_eq!(status, 200);
        times.insert(map["time_unix_ms"].as_u64().expect("time"));
    }
    assert_eq!(
        times.len(),
        1,
        "one computation served the burst: {times:?}"
    );
    let (_, again) = get_json(f.addr, "/api/map").await;
    assert_eq!(
        again["time_unix_ms"].as_u64(),
        times.first().copied(),
        "reused within the second"
    );
    // A quarantine from the UI: the next map shows it.
    let (status, _, body) = request(
        f.addr,
        "POST",
        "/api/quarantine",
        &[JSON, ACTION],
        r#"{"pod": "shop/backend", "reason": "test"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, after) = get_json(f.addr, "/api/map").await;
    assert!(
        after["quarantines"]
            .as_array()
            .is_some_and(|q| q.iter().any(|q| q["pod"] == "shop/backend")),
        "{after}"
    );
    tokio::time::sleep(MAP_CACHE_TTL + Duration::from_millis(50)).await;
    let (_, later) = get_json(f.addr, "/api/map").await;
    assert!(later["time_unix_ms"].as_u64() > after["time_unix_ms"].as_u64());
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_from_the_binary() {
    let f = serve("127.0.0.1:9961", HttpConfig::default(), true).await;
    let (status, ct, body) = request(f.addr, "GET", "/", &[], "").await;
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/html"), "{ct}");
    assert!(body.contains("/ui/app.js") && body.contains("Bulkhead"));
    let (status, ct, body) = request(f.addr, "GET", "/ui/app.js", &[], "").await;
    assert_eq!((status, ct.starts_with("text/javascript")), (200, true));
    assert!(
        body.contains("cytoscape") || body.len() > 100_000,
        "the bundle"
    );
    let (status, ct, _) = request(f.addr, "GET", "/ui/app.css", &[], "").await;
    assert_eq!((status, ct.starts_with("text/css")), (200, true));
}

#[tokio::test]
async fn the_map_has_workloads_grouped_by_namespace_edges_and_world() {
    let f = serve("127.0.0.1:9961", HttpConfig::default(), true).await;
    let (status, map) = get_json(f.addr, "/api/map").await;
    assert_eq!(status, 200);
    assert_eq!(map["namespaces"], json!(["shop", "tools"]));
    let ids: Vec<&str> = map["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    for id in [
        "shop/Pod/frontend",
        "shop/Pod/backend",
        "shop/Pod/db",
        "tools/Pod/debug",
        "world",
    ] {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }
    let debug = map["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["id"] == "tools/Pod/debug"))
        .expect("debug");
    assert_eq!(debug["pods"][0]["pod"], "tools/debug");
    assert_eq!(debug["pods"][0]["ips"], json!(["10.203.0.40"]));
    let denied = map["edges"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["src"] == "tools/Pod/debug"))
        .expect("the denied edge");
    assert_eq!(
        (denied["dst"].as_str(), denied["denied"].as_u64()),
        (Some("shop/Pod/backend"), Some(1))
    );
    assert_eq!(map["actions"]["enabled"], true);
}

#[tokio::test]
async fn flows_are_filtered_server_side_and_name_the_deciding_rule() {
    let f = serve("127.0.0.1:9961", HttpConfig::default(), true).await;
    let (_, edge) = get_json(
        f.addr,
        "/api/flows/query?src=tools/Pod/debug&dst=shop/Pod/backend&port=8080&protocol=6",
    )
    .await;
    let edge = edge.as_array().expect("a list");
    assert_eq!(edge.len(), 1, "{edge:?}");
    assert_eq!(edge[0]["src_pod"], "tools/debug");
    assert_eq!(edge[0]["dst_pod"], "shop/backend");
    assert_eq!(
        edge[0]["decided_by"],
        json!({"kind": "NetworkPolicy", "namespace": "shop", "name": "backend-api",
               "direction": "ingress", "index": null,
               "text": "NetworkPolicy shop/backend-api ingress default-deny"})
    );
    let (_, backend) = get_json(f.addr, "/api/flows/query?workload=shop/Pod/backend").await;
    assert_eq!(backend.as_array().map(Vec::len), Some(2));
    let (_, allowed) = get_json(
        f.addr,
        "/api/flows/query?workload=shop/Pod/backend&verdict=allowed",
    )
    .await;
    assert_eq!(allowed[0]["decided_by"]["index"], 0);
    let (_, world) = get_json(f.addr, "/api/flows/query?dst=world").await;
    assert_eq!(world[0]["src_workload"], "shop/Pod/frontend");
    assert_eq!(world[0]["decided_by"]["kind"], "ServicePolicy");
    let (_, tools) = get_json(f.addr, "/api/flows/query?namespace=tools&limit=5").await;
    assert_eq!(tools.as_array().map(Vec::len), Some(1));
    let (status, err) = get_json(f.addr, "/api/flows/query?port=eighty").await;
    assert_eq!(status, 400);
    assert!(
        err["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("bad query")),
        "{err}"
    );
}

/// One API for the page and the commands: every answer reads back as its type, and
/// `/api/flows` (what `bulkhead flows` asks, with the filters it passes) is filtered by the
/// server, newest first, peers named where the agent could not.
#[tokio::test]
async fn every_answer_reads_back_as_its_type_and_flows_filter_for_the_cli() {
    let f = serve("127.0.0.1:9961", HttpConfig::default(), true).await;
    let typed = |path: &'static str| async move {
        let (status, _, body) = request(f.addr, "GET", path, &[], "").await;
        assert_eq!(status, 200, "{path}: {body}");
        body
    };
    let nodes: Vec<NodeView> = serde_json::from_str(&typed("/api/nodes").await).expect("nodes");
    assert!(!nodes.is_empty() && nodes.iter().all(|n| !n.connected));
    let policies: Vec<PolicyView> =
        serde_json::from_str(&typed("/api/policies").await).expect("policies");
    assert!(
        policies.iter().any(|p| p.name == "backend-api"),
        "{policies:?}"
    );
    let graph_body = typed("/api/graph").await;
    let graph: Graph = serde_json::from_str(&graph_body).expect("graph");
    assert_eq!(serde_json::to_string(&graph).expect("json"), graph_body);
    let map: MapView = serde_json::from_str(&typed("/api/map").await).expect("map");
    assert!(map.user.is_none() && map.actions.enabled && !map.nodes.is_empty());
    let _: Vec<QuarantineView> =
        serde_json::from_str(&typed("/api/quarantines").await).expect("quarantines");

    let flows = |q: FlowQuery| async move {
        let (status, _, body) = request(f.addr, "GET", &q.path(), &[], "").await;
        assert_eq!(status, 200, "{}: {body}", q.path());
        serde_json::from_str::<Vec<FlowView>>(&body).expect("flows")
    };
    let all = flows(FlowQuery::default()).await;
    assert_eq!(all.len(), 3, "{all:?}");
    // The agent did not name the peer of the denied record; the API does.
    assert!(
        all.iter()
            .any(|v| v.line.verdict == "denied" && v.line.peer == "tools/debug"),
        "{all:?}"
    );
    let denied = flows(FlowQuery {
        verdict: Some("denied".into()),
        ..FlowQuery::default()
    })
    .await;
    assert_eq!(denied.len(), 2);
    let debug = flows(FlowQuery {
        pod: Some("tools/debug".into()),
        ..FlowQuery::default()
    })
    .await;
    assert_eq!(debug.len(), 1);
    assert_eq!(debug[0].line.endpoint, "shop/backend");
    let shop = flows(FlowQuery {
        namespace: Some("shop".into()),
        limit: Some(2),
        ..FlowQuery::default()
    })
    .await;
    assert_eq!(shop.len(), 2);
    let later = flows(FlowQuery {
        since: Some(1_700_000_000_000_000_001),
        ..FlowQuery::default()
    })
    .await;
    assert!(later.is_empty(), "{later:?}");
}

#[tokio::test]
async fn quarantine_and_release_from_the_page() {
    let f = serve("127.0.0.1:9961", HttpConfig::default(), true).await;
    let body =
        r#"{"pod":"tools/debug","reason":"port scan","allow":["ns=shop@22/TCP"],"for":"1h"}"#;
    let (status, _, out) = request(f.addr, "POST", "/api/quarantine", &[JSON, ACTION], body).await;
    assert_eq!(status, 200, "{out}");
    let out: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(out["quarantine"]["pod"], "tools/debug");
    assert!(
        out["quarantine"]["actor"]
            .as_str()
            .is_some_and(|a| a.starts_with("web UI"))
    );
    assert!(
        out["nodes"].as_object().is_some_and(|n| !n.is_empty()),
        "{out}"
    );
    let written = std::fs::read_to_string(f.dir.join("quarantines/tools/debug.yaml"))
        .expect("the Quarantine manifest");
    assert!(written.contains("reason: port scan") && written.contains("expiresAt"));
    let (_, list) = get_json(f.addr, "/api/quarantines").await;
    assert_eq!(list[0]["pod"], "tools/debug");
    let (_, map) = get_json(f.addr, "/api/map").await;
    let debug = map["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["id"] == "tools/Pod/debug"))
        .expect("debug");
    assert_eq!(debug["quarantined"], true);
    let (_, audit) = get_json(
        f.addr,
        "/api/flows/query?pod=tools/debug&verdict=quarantined",
    )
    .await;
    assert_eq!(
        audit.as_array().map(Vec::len),
        Some(1),
        "the audit record is a flow"
    );

    let release = r#"{"pod":"tools/debug"}"#;
    let (status, _, out) = request(
        f.addr,
        "POST",
        "/api/quarantine/release",
        &[JSON, ACTION],
        release,
    )
    .await;
    assert_eq!(status, 200, "{out}");
    let (_, list) = get_json(f.addr, "/api/quarantines").await;
    assert_eq!(list, json!([]));
    let (status, _, out) = request(
        f.addr,
        "POST",
        "/api/quarantine/release",
        &[JSON, ACTION],
        release,
    )
    .await;
    assert_eq!(status, 404, "{out}");
    assert!(
        out.contains("\"error\":\"pod tools/debug is not quarantined\""),
        "{out}"
    );
}

#[tokio::test]
async fn bad_write_requests_are_refused_with_a_json_error() {
    let f = serve("127.0.0.1:9961", HttpConfig::default(), true).await;
    let good = r#"{"pod":"tools/debug","reason":"x"}"#;
    // (headers, body, status, what the error says)
    type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, u16, &'a str);
    let cases: Vec<Case> = vec![
        (vec![ACTION], good, 415, "content-type: application/json"),
        (
            vec![("Content-Type", "text/plain"), ACTION],
            good,
            415,
            "application/json",
        ),
        (vec![JSON], good, 403, "x-bulkhead-action: 1"),
        (
            vec![JSON, ACTION, ("Origin", "http://evil.example")],
            good,
            403,
            "cross-site",
        ),
        (
            vec![JSON, ACTION, ("Origin", "null")],
            good,
            403,
            "cross-site",
        ),
        (
            vec![
                JSON,
                ACTION,
                ("Host", "evil.example:9961"),
                ("Origin", "http://evil.example:9961"),
            ],
            good,
            403,
            "loopback host",
        ),
        (
            vec![JSON, ACTION],
            "{not json",
            400,
            "malformed request body",
        ),
        (
            vec![JSON, ACTION],
            r#"{"pod":"tools/debug"}"#,
            400,
            "malformed request body",
        ),
        (
            vec![JSON, ACTION],
            r#"{"pod":"debug","reason":"x"}"#,
            400,
            "namespace/pod",
        ),
        (
            vec![JSON, ACTION],
            r#"{"pod":"tools/debug","reason":"  "}"#,
            400,
            "needs a reason",
        ),
        (
            vec![JSON, ACTION],
            r#"{"pod":"tools/nope","reason":"x"}"#,
            404,
            "no pod tools/nope",
        ),
        (
            vec![JSON, ACTION],
            r#"{"pod":"tools/debug","reason":"x","for":"soon"}"#,
            400,
            "for \"soon\"",
        ),
        (
            vec![JSON, ACTION],
            r#"{"pod":"tools/debug","reason":"x","allow":["10.0.0.0/99"]}"#,
            400,
            "not a cidr",
        ),
        (
            vec![JSON, ACTION],
            r#"{"pod":"Tools/Debug","reason":"x"}"#,
            400,
            "is not a kubernetes namespace name",
        ),
        (
            vec![JSON, ACTION],
            r#"{"pod":"tools/..","reason":"x"}"#,
            400,
            "is not a kubernetes pod name",
        ),
        // Issue 21, finding 7: these were HTTP 500s (a panic formatting year 12026, an
        // overflow adding the duration to the clock).
        (
            vec![JSON, ACTION],
            r#"{"pod":"tools/debug","reason":"x","for":"10000y"}"#,
            400,
            "at most 10 years",
        ),
        (
            vec![JSON, ACTION],
            r#"{"pod":"tools/debug","reason":"x","for":"300000000000y"}"#,
            400,
            "at most 10 years",
        ),
        (
            vec![JSON, ACTION],
            r#"{"pod":"tools/debug","reason":"x","for":"soon"}"#,
            400,
            "for \"soon\"",
        ),
    ];
    for (headers, body, want, message) in cases {
        let (status, ct, out) = request(f.addr, "POST", "/api/quarantine", &headers, body).await;
        assert_eq!(status, want, "{headers:?} {body}: {out}");
        assert!(ct.starts_with("application/json"), "{ct}");
        let v: Value = serde_json::from_str(&out).expect("a JSON error");
        let e = v["error"].as_str().expect("an error message");
        assert!(
            e.to_lowercase().contains(&message.to_lowercase()),
            "{body}: {e:?} lacks {message:?}"
        );
    }
    // Issue 21, finding 5: a release names a Kubernetes pod too (it used to go straight
    // into the path it deletes).
    for pod in ["../tools/debug", "tools/..", "a--b/../c"] {
        let body = json!({ "pod": pod }).to_string();
        let (status, _, out) = request(
            f.addr,
            "POST",
            "/api/quarantine/release",
            &[JSON, ACTION],
            &body,
        )
        .await;
        assert_eq!(status, 400, "{pod}: {out}");
    }
    // Same origin, loopback host: accepted (and nothing above changed anything).
    let (_, list) = get_json(f.addr, "/api/quarantines").await;
    assert_eq!(list, json!([]));
    let origin = format!("http://{}", f.addr);
    let (status, _, out) = request(
        f.addr,
        "POST",
        "/api/quarantine",
        &[JSON, ACTION, ("Origin", origin.as_str())],
        good,
    )
    .await;
    assert_eq!(status, 200, "{out}");
}

#[tokio::test]
async fn actions_are_off_on_a_public_listener_unless_asked_for() {
    let f = serve("0.0.0.0:9961", HttpConfig::default(), true).await;
    let (_, map) = get_json(f.addr, "/api/map").await;
    assert_eq!(map["actions"]["enabled"], false);
    assert!(
        map["actions"]["why"]
            .as_str()
            .is_some_and(|w| w.contains("--web-actions"))
    );
    let good = r#"{"pod":"tools/debug","reason":"x"}"#;
    let (status, _, out) = request(f.addr, "POST", "/api/quarantine", &[JSON, ACTION], good).await;
    assert_eq!(status, 403, "{out}");
    assert!(out.contains("--web-actions"), "{out}");

    let f = serve(
        "0.0.0.0:9961",
        HttpConfig {
            web_actions: true,
            ..Default::default()
        },
        true,
    )
    .await;
    let (status, _, out) = request(
        f.addr,
        "POST",
        "/api/quarantine",
        &[JSON, ACTION, ("Host", "controller.example:9961")],
        good,
    )
    .await;
    assert_eq!(status, 200, "{out}");

    let f = serve("127.0.0.1:9961", HttpConfig::default(), false).await;
    let (status, _, out) = request(f.addr, "POST", "/api/quarantine", &[JSON, ACTION], good).await;
    assert_eq!(status, 403, "{out}");
    assert!(out.contains("quarantine directory"), "{out}");
    let (status, _) = get_json(f.addr, "/api/quarantines").await;
    assert_eq!(status, 501);
}

/// The deciding rule as the API writes it.
fn decided_by(rule: Option<&FlowRule>, text: &str) -> Value {
    serde_json::to_value(DecidedBy::of(rule, text)).expect("json")
}

#[test]
fn the_deciding_rule_is_structured_from_its_parts() {
    let decided = |rule: Option<&FlowRule>| {
        let text = rule.map_or("Quarantine tools/q: port scan".to_string(), |r| {
            r.to_string()
        });
        decided_by(rule, &text)
    };
    let p = decided(Some(&policy(
        RuleKind::ClusterNetworkPolicy,
        "",
        "deny-all",
        Direction::Egress,
        Some(3),
    )));
    assert_eq!(
        p,
        json!({"kind": "ClusterNetworkPolicy", "namespace": "", "name": "deny-all",
               "direction": "egress", "index": 3,
               "text": "ClusterNetworkPolicy deny-all egress[3]"})
    );
    let p = decided(Some(&policy(
        RuleKind::Quarantine,
        "tools",
        "quarantine-debug",
        Direction::Ingress,
        None,
    )));
    assert_eq!(
        (p["kind"].as_str(), p["name"].as_str(), p["index"].is_null()),
        (Some("Quarantine"), Some("quarantine-debug"), true)
    );
    assert_eq!(
        decided(Some(&FlowRule::DefaultAllow)),
        json!({"kind": "Default", "namespace": "", "name": "", "direction": "", "index": null,
               "text": "default allow (no policy applies)"})
    );
    for other in [
        FlowRule::MissingPolicy,
        FlowRule::UnrelatedIcmpError,
        FlowRule::Unnamed(9),
    ] {
        let p = decided(Some(&other));
        assert_eq!(
            (p["kind"].as_str(), p["text"].as_str()),
            (Some(""), Some(other.to_string().as_str()))
        );
    }
    // A quarantine action has no deciding rule, only its text.
    let p = decided(None);
    assert_eq!(
        (p["kind"].as_str(), p["text"].as_str()),
        (Some(""), Some("Quarantine tools/q: port scan"))
    );
    assert!(
        is_loopback_host("127.0.0.1:9961")
            && is_loopback_host("localhost")
            && is_loopback_host("[::1]:80")
    );
    assert!(!is_loopback_host("evil.example:9961") && !is_loopback_host("10.0.0.1"));
}

pub(super) const VIEWER: &str = "viewer-token-0123456789abcdef";
const ADMIN: &str = "admin-token-0123456789abcdef";

/// A tokens file with one viewer (`vera`) and one admin (`adam`) in the fixture's directory.
pub(super) fn token_auth(dir: &std::path::Path) -> auth::WebAuth {
    let path = dir.join("tokens");
    std::fs::write(
        &path,
        format!("# role name token\nviewer vera {VIEWER}\n\nadmin adam {ADMIN}\n"),
    )
    .expect("write tokens");
    auth::WebAuth::Tokens(auth::TokenFile::open(&path).expect("tokens"))
}

pub(super) fn bearer(token: &str) -> (&'static str, String) {
    ("Authorization", format!("Bearer {token}"))
}

mod history;
mod tokens;
