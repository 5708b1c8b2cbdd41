//! Answers from the recorded flows: recommendations and the flow history on disk.

use super::*;

/// `/api/recommend` learns from the admitted records the controller holds (the denied ones
/// teach nothing): the backend admits the frontend on 8080 and nothing else; every shop workload
/// is isolated both ways. A bad query is a 400 naming the problem.
#[tokio::test]
async fn recommend_learns_from_admitted_records_only() {
    let f = serve("127.0.0.1:9961", HttpConfig::default(), false).await;
    let (status, body) = get_json(f.addr, "/api/recommend?namespaces=shop").await;
    assert_eq!(status, 200, "{body}");
    let r: crate::recommend::Recommendation = serde_json::from_value(body).expect("typed");
    let names: Vec<String> = r.policies.iter().map(|p| p.workload.to_string()).collect();
    assert_eq!(
        names,
        ["shop/Pod/backend", "shop/Pod/db", "shop/Pod/frontend"]
    );
    assert_eq!(r.records, 1, "one admitted record");
    let backend = r.policies[0]
        .network_policy()
        .and_then(|p| p.spec.as_ref())
        .expect("spec");
    let ingress = backend.ingress.as_ref().expect("ingress");
    assert_eq!(ingress.len(), 1);
    let peer = &ingress[0].from.as_ref().expect("from")[0];
    assert_eq!(
        peer.pod_selector
            .as_ref()
            .and_then(|s| s.match_labels.clone()),
        Some([("app".to_string(), "frontend".to_string())].into())
    );
    assert_eq!(backend.egress.as_ref().map(Vec::len), Some(0));
    let yaml = r.to_yaml().expect("yaml");
    assert_eq!(yaml.matches("kind: NetworkPolicy").count(), 3, "{yaml}");

    let (status, _) = get_json(f.addr, "/api/recommend?namespaces=nowhere").await;
    assert_eq!(status, 200);
    let (status, err) = get_json(f.addr, "/api/recommend?since=yesterday").await;
    assert_eq!(status, 400);
    assert!(
        err["error"].as_str().unwrap_or("").contains("since"),
        "{err}"
    );
}

/// A controller's state for the demo shop with a flow history in `dir`, served on a loopback
/// port; with `restore`, read back from the history first (as `bulkhead controller` starts).
async fn serve_with_history(
    dir: &std::path::Path,
    restore: bool,
) -> (
    SocketAddr,
    Arc<crate::flows::history::FlowHistory>,
    Arc<crate::flows::FlowPipeline>,
    tokio::task::JoinHandle<()>,
) {
    use crate::flows::history::{FlowHistory, HistoryConfig};
    let mut source = ManifestSource::new(vec![dir.join("manifests")]);
    let reload = source.reload();
    assert!(reload.errors.is_empty(), "{:?}", reload.errors);
    let mut engine = PolicyEngine::empty(EngineConfig::default());
    engine
        .apply_batch(reload.changes)
        .expect("compile the shop");
    let hub = Arc::new(Hub::new(engine));
    let history =
        Arc::new(FlowHistory::open(HistoryConfig::new(dir.join("history"))).expect("history"));
    let flows = Arc::new(Mutex::new(
        FlowStore::new(100).with_history(history.clone()),
    ));
    let graph = Arc::new(Mutex::new(ServiceGraph::default()));
    let pipeline = Arc::new(crate::flows::FlowPipeline::new(
        flows.clone(),
        graph.clone(),
        hub.clone(),
    ));
    if restore {
        pipeline.restore_from(&history, 0).expect("restore");
    }
    let state = ApiState::new(
        "127.0.0.1:9961".parse().expect("address"),
        &HttpConfig::default(),
        hub,
        flows,
        graph,
        None,
        Arc::new(auth::WebAuth::Off),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router(state)).await;
    });
    (addr, history, pipeline, server)
}

/// `bulkhead flows --since 24h` and `--before-quarantine` ask `/api/flows?history=true`: the
/// answer comes from the history on disk, and is the same after the controller restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_history_answers_over_http_and_survives_a_restart() {
    use crate::{
        flows::history::now_unix_nanos,
        ruleset::{FlowEntry, QuarantineAction, QuarantineEvent},
    };
    const HOUR: u64 = 3600 * 1_000_000_000;
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "bh-history-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("manifests")).expect("temp dir");
    std::fs::write(dir.join("manifests/shop.yaml"), SHOP).expect("write");
    std::fs::write(dir.join("manifests/policies.yaml"), POLICIES).expect("write");
    let _cleanup = Fixture {
        addr: "127.0.0.1:0".parse().expect("address"),
        dir: dir.clone(),
    };

    let (addr, history, pipeline, server) = serve_with_history(&dir, false).await;
    let now = now_unix_nanos();
    let t = |h: u64| now - h * HOUR;
    // For 30 hours tools/debug (on another node: unnamed) probes shop/backend, which the
    // frontend uses.
    for h in (0..30).rev() {
        let at = |mut r: FlowRecord, t: u64| {
            r.time_unix_nanos = t;
            bulkhead_proto::v1::FlowRecord::from(&r)
        };
        let probe = record(
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
        );
        let used = record(
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
        );
        pipeline
            .ingest(
                "demo-node",
                vec![at(probe, t(h) + 1), at(used, t(h) + 2)],
                0,
            )
            .expect("ingest");
    }
    let quarantined_at = t(0) + 3;
    pipeline.store().lock().expect("store").push(
        "controller",
        FlowEntry::Quarantine(QuarantineEvent {
            time_unix_nanos: quarantined_at,
            pod: "tools/debug".parse().expect("pod"),
            action: QuarantineAction::Quarantine,
            quarantine: "debug".into(),
            reason: "port scan".into(),
            actor: "test".into(),
        }),
    );
    history.flush().expect("flush");

    let get = |addr: SocketAddr, q: FlowQuery| async move {
        let (status, _, body) = request(addr, "GET", &q.path(), &[], "").await;
        assert_eq!(status, 200, "{}: {body}", q.path());
        let parsed: Vec<FlowView> = serde_json::from_str(&body).expect("flows");
        (body, parsed)
    };
    let day = FlowQuery {
        pod: Some("tools/debug".into()),
        since: Some(t(24)),
        history: Some(true),
        ..FlowQuery::default()
    };
    let (day_body, debug_day) = get(addr, day.clone()).await;
    assert_eq!(debug_day.len(), 25 + 1, "hours 24..0 and the quarantine");
    assert!(
        debug_day
            .iter()
            .filter(|v| v.line.verdict == "denied")
            .all(|v| v.line.peer == "tools/debug" && v.src_workload == "tools/Pod/debug"),
        "{debug_day:?}"
    );
    // Newest first, as the records in memory.
    let times: Vec<u64> = debug_day.iter().map(|v| v.line.time_unix_nanos).collect();
    let mut sorted = times.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(times, sorted);
    // The 24 hours before the quarantine, up to ten hours ago.
    let before = FlowQuery {
        pod: Some("tools/debug".into()),
        since: Some(quarantined_at - 24 * HOUR),
        until: Some(t(10) + 1),
        history: Some(true),
        ..FlowQuery::default()
    };
    let (before_body, older) = get(addr, before.clone()).await;
    assert_eq!(older.len(), 24 - 10, "hours 23..10");
    let quarantines = FlowQuery {
        pod: Some("tools/debug".into()),
        verdict: Some("quarantined".into()),
        history: Some(true),
        limit: Some(1),
        ..FlowQuery::default()
    };
    let (_, q) = get(addr, quarantines.clone()).await;
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].line.time_unix_nanos, quarantined_at);
    let (_, _, graph_before) = request(addr, "GET", "/api/graph", &[], "").await;

    // The controller stops and starts again.
    server.abort();
    let _ = server.await;
    drop(pipeline);
    history.close();
    drop(history);
    let (addr, history, _pipeline, _server) = serve_with_history(&dir, true).await;
    assert_eq!(get(addr, day).await.0, day_body);
    assert_eq!(get(addr, before).await.0, before_body);
    assert_eq!(get(addr, quarantines).await.1.len(), 1);
    let (_, _, graph_after) = request(addr, "GET", "/api/graph", &[], "").await;
    assert_eq!(
        graph_after, graph_before,
        "the graph is rebuilt from the history"
    );
    assert!(graph_after.contains("tools/Pod/debug"), "{graph_after}");
    // Read back, nothing was written again.
    history.flush().expect("flush");
    assert_eq!(history.stats().written, 0);

    // A controller without a history says so.
    let plain = serve("127.0.0.1:9961", HttpConfig::default(), false).await;
    let (status, err) = get_json(plain.addr, "/api/flows?history=true&since=1").await;
    assert_eq!(status, 409);
    assert!(
        err["error"]
            .as_str()
            .is_some_and(|e| e.contains("no flow history")),
        "{err}"
    );
}

/// With a flow history, `/api/recommend` learns from it: an edge seen 30 hours ago, long pushed
/// out of the in-memory store (100 records here) by newer traffic, is still learned, also after
/// the controller restarted; `since` bounds the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recommend_learns_from_the_flow_history_across_a_restart() {
    use crate::flows::history::now_unix_nanos;
    const HOUR: u64 = 3600 * 1_000_000_000;
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "bh-recommend-history-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("manifests")).expect("temp dir");
    std::fs::write(dir.join("manifests/shop.yaml"), SHOP).expect("write");
    let _cleanup = Fixture {
        addr: "127.0.0.1:0".parse().expect("address"),
        dir: dir.clone(),
    };
    let allowed = |endpoint: &str, direction: &str, src: &str, dst: &str, port: u16, t: u64| {
        let mut r = record(
            endpoint,
            direction,
            src,
            dst,
            port,
            "allowed",
            FlowRule::DefaultAllow,
        );
        r.time_unix_nanos = t;
        bulkhead_proto::v1::FlowRecord::from(&r)
    };
    let now = now_unix_nanos();
    let (_, history, pipeline, server) = serve_with_history(&dir, false).await;
    // 30 h ago: the backend used the database. Since then, 300 frontend → backend connections.
    pipeline
        .ingest(
            "demo-node",
            vec![allowed(
                "shop/db",
                "ingress",
                "10.203.0.20",
                "10.203.0.30",
                5432,
                now - 30 * HOUR,
            )],
            0,
        )
        .expect("ingest");
    for i in 0..300 {
        pipeline
            .ingest(
                "demo-node",
                vec![allowed(
                    "shop/backend",
                    "ingress",
                    "10.203.0.10",
                    "10.203.0.20",
                    8080,
                    now - HOUR + i,
                )],
                0,
            )
            .expect("ingest");
    }
    history.flush().expect("flush");
    server.abort();
    drop(pipeline);
    drop(history);

    let (addr, _history, _pipeline, _server) = serve_with_history(&dir, true).await;
    let learn = |since: u64| async move {
        let (status, body) = get_json(
            addr,
            &format!("/api/recommend?namespaces=shop&since={since}"),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_value::<crate::recommend::Recommendation>(body).expect("typed")
    };
    let ingress_peers = |r: &crate::recommend::Recommendation, workload: &str| -> Vec<String> {
        let p = r
            .policies
            .iter()
            .find(|p| p.workload.name == workload)
            .and_then(|p| p.network_policy())
            .and_then(|p| p.spec.clone())
            .expect("policy");
        p.ingress
            .unwrap_or_default()
            .iter()
            .flat_map(|rule| rule.from.clone().unwrap_or_default())
            .filter_map(|peer| peer.pod_selector.and_then(|s| s.match_labels))
            .map(|l| l["app"].clone())
            .collect()
    };
    let day2 = learn(now - 48 * HOUR).await;
    assert!(day2.from_history);
    assert_eq!(day2.records, 301, "every admitted record of the window");
    assert_eq!(ingress_peers(&day2, "Pod/db"), ["backend"]);
    assert_eq!(ingress_peers(&day2, "Pod/backend"), ["frontend"]);
    let day1 = learn(now - 24 * HOUR).await;
    assert_eq!(day1.records, 300);
    assert!(
        ingress_peers(&day1, "Pod/db").is_empty(),
        "older than the window"
    );
}
