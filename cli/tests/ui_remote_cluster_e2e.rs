//! A peer cluster's workloads, end to end without privileges and without a second cluster: the
//! controller's own HTTP API and page, served in-process over a hub that holds the demo shop and
//! a peer cluster's pods entered as peering enters them (namespaces qualified `west/shop`,
//! `Change::UpsertPod` with no node), and flows folded by the controller's flow pipeline as a
//! batch from an agent is. The graph names the remote workload `west/shop/Deployment/web` with
//! its cluster; `bulkhead flows --cluster west` finds its flows and prints the remote pod as
//! `west/shop/web-0`; and the web UI, in headless Chromium (`ui/e2e/ui.mjs --remote`), draws
//! it labelled `west/shop/web` in a box of cluster west and opens it.
//!
//! What this does not cover: the import of the peer's pods over gRPC (peering), which fills the
//! hub the same way.

mod common;

use common::*;

use std::{
    process::Command,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use bulkhead_controller::{
    Change, EngineConfig, Pod, PolicyEngine,
    distribution::{FlowStore, Hub, ManifestSource},
    flows::{FlowPipeline, ServiceGraph},
    model::Namespace,
    ruleset::{
        Direction, FlowKind, FlowReason, FlowRecord, FlowRule, FlowVerdict, RuleKind, RuleRef,
    },
    server::{HttpConfig, api, auth::WebAuth, ui},
};
use bulkhead_proto::v1 as pb;

const SHOP: &str = include_str!("../../examples/demo/shop.yaml");
const POLICIES: &str = include_str!("../../examples/demo/policies.yaml");

fn remote_pod(ns: &str, name: &str, workload: &str, ip: &str) -> Pod {
    Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: [("app".to_string(), name.to_string())].into(),
        service_account: "default".into(),
        node_name: None,
        ips: vec![ip.parse().expect("ip")],
        synthetic_ips: false,
        ports: Vec::new(),
        workload: Some(workload.into()),
        host_network: false,
    }
}

/// A flow reported by the demo node's agent: `endpoint` (`ns/pod`, at `here`) to or from
/// `peer`.
fn record(
    endpoint: &str,
    direction: Direction,
    here: &str,
    peer: &str,
    port: u16,
    verdict: FlowVerdict,
    t: u64,
) -> pb::FlowRecord {
    let denied = verdict == FlowVerdict::Denied;
    let (src, dst) = match direction {
        Direction::Egress => (here, peer),
        Direction::Ingress => (peer, here),
    };
    let r = FlowRecord {
        time_unix_nanos: t,
        endpoint: endpoint.parse().expect("endpoint"),
        direction,
        src: src.parse().expect("ip"),
        dst: dst.parse().expect("ip"),
        src_port: 40000,
        dst_port: port,
        protocol: 6,
        kind: if denied {
            FlowKind::Denied
        } else {
            FlowKind::New
        },
        verdict,
        rule: if denied {
            FlowRule::Rule(RuleRef {
                kind: RuleKind::NetworkPolicy,
                namespace: "shop".into(),
                name: "backend-api".into(),
                direction,
                index: None,
            })
        } else {
            FlowRule::DefaultAllow
        },
        rule_id: 0,
        local_identity: 0,
        peer_identity: 0,
        peer: None,
        peer_names: Vec::new(),
        reason: if denied {
            FlowReason::DeniedPolicy
        } else {
            FlowReason::AllowedNew
        },
        packets: 1,
        bytes: 60,
        staged: None,
    };
    (&r).into()
}

fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).expect("a JSON flow"))
        .collect()
}

#[test]
fn remote_workloads_are_named_by_cluster_in_flows_the_graph_and_the_ui() {
    const NAME: &str = "remote_workloads_are_named_by_cluster_in_flows_the_graph_and_the_ui";
    let tmp = TempDir(std::env::temp_dir().join(format!("bh-remote-ui-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&tmp.0);
    std::fs::create_dir_all(&tmp.0).expect("temp dir");
    std::fs::write(tmp.0.join("shop.yaml"), SHOP).expect("write");
    std::fs::write(tmp.0.join("policies.yaml"), POLICIES).expect("write");

    // The local cluster from the demo manifests, as `bulkhead controller -f` loads them …
    let mut source = ManifestSource::new(vec![tmp.0.clone()]);
    let reload = source.reload();
    assert!(reload.errors.is_empty(), "{:?}", reload.errors);
    let mut engine = PolicyEngine::empty(EngineConfig::default());
    engine
        .apply_batch(reload.changes)
        .expect("compile the shop");
    let hub = Arc::new(Hub::new(engine));
    // … and the peer cluster west's pods, as peering enters them.
    hub.apply(
        vec![
            Change::UpsertNamespace(Namespace {
                name: "west/shop".into(),
                labels: Default::default(),
            }),
            Change::UpsertNamespace(Namespace {
                name: "west/payments".into(),
                labels: Default::default(),
            }),
            Change::UpsertPod(remote_pod(
                "west/shop",
                "web-0",
                "Deployment/web",
                "10.9.0.1",
            )),
            Change::UpsertPod(remote_pod(
                "west/shop",
                "web-1",
                "Deployment/web",
                "10.9.0.2",
            )),
            Change::UpsertPod(remote_pod(
                "west/payments",
                "api-0",
                "Deployment/api",
                "10.9.1.1",
            )),
        ],
        false,
    )
    .expect("the peer cluster's pods");

    let flows = Arc::new(Mutex::new(FlowStore::new(1000)));
    let graph = Arc::new(Mutex::new(ServiceGraph::default()));
    let pipeline = FlowPipeline::new(flows.clone(), graph.clone(), hub.clone());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64;
    let s = 1_000_000_000;
    let batch = vec![
        record(
            "shop/backend",
            Direction::Egress,
            "10.203.0.20",
            "10.9.0.1",
            443,
            FlowVerdict::Allowed,
            now - 4 * s,
        ),
        record(
            "shop/backend",
            Direction::Egress,
            "10.203.0.20",
            "10.9.1.1",
            8443,
            FlowVerdict::Denied,
            now - 3 * s,
        ),
        record(
            "shop/frontend",
            Direction::Ingress,
            "10.203.0.10",
            "10.9.0.2",
            80,
            FlowVerdict::Allowed,
            now - 2 * s,
        ),
        record(
            "shop/backend",
            Direction::Ingress,
            "10.203.0.20",
            "10.203.0.10",
            8080,
            FlowVerdict::Allowed,
            now - s,
        ),
    ];
    assert_eq!(pipeline.ingest("demo-node", batch, 0).expect("ingest"), 4);

    // The controller's HTTP router (API and page), on a loopback port.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let state = api::ApiState::new(
        addr,
        &HttpConfig::default(),
        hub,
        flows,
        graph,
        None,
        Arc::new(WebAuth::Off),
    );
    runtime.spawn(async move {
        let _ = axum::serve(listener, api::router(state).merge(ui::router())).await;
    });
    let port = addr.port();

    // The graph: the remote workloads by cluster/namespace/workload, with their cluster.
    let graph: serde_json::Value =
        serde_json::from_str(&http_get(port, "/api/graph").expect("graph")).expect("json");
    let nodes = graph["nodes"].as_array().expect("nodes");
    let node = |id: &str| nodes.iter().find(|n| n["id"] == id).cloned();
    let web = node("west/shop/Deployment/web").unwrap_or_else(|| panic!("{graph}"));
    assert_eq!(
        (web["namespace"].as_str(), web["cluster"].as_str()),
        (Some("west/shop"), Some("west"))
    );
    assert_eq!(
        node("west/payments/Deployment/api").map(|n| n["cluster"].clone()),
        Some(serde_json::json!("west"))
    );
    let backend = node("shop/Pod/backend").unwrap_or_else(|| panic!("{graph}"));
    assert!(backend.get("cluster").is_none(), "{backend}");
    assert!(
        node("world").is_none(),
        "remote addresses are not the world: {graph}"
    );
    let map: serde_json::Value =
        serde_json::from_str(&http_get(port, "/api/map").expect("map")).expect("json");
    let on_map = map["nodes"]
        .as_array()
        .expect("map nodes")
        .iter()
        .find(|n| n["id"] == "west/shop/Deployment/web")
        .cloned()
        .unwrap_or_else(|| panic!("{map}"));
    assert_eq!(on_map["cluster"], "west");

    // `bulkhead flows`: remote pods by cluster/namespace/pod; --cluster finds their flows, and
    // a namespace filter tells the peer's `west/shop` from the local `shop`.
    let http = format!("127.0.0.1:{port}");
    let flows = |extra: &[&str]| {
        let mut args = vec!["flows", "--http", &http, "-o", "json"];
        args.extend_from_slice(extra);
        json_lines(&run_ok(&args))
    };
    let west = flows(&["--cluster", "west"]);
    assert_eq!(west.len(), 3, "{west:?}");
    let mut peers: Vec<String> = west
        .iter()
        .map(|f| {
            format!(
                "{} {}",
                f["endpoint"].as_str().unwrap_or(""),
                f["peer"].as_str().unwrap_or("")
            )
        })
        .collect();
    peers.sort();
    assert_eq!(
        peers,
        [
            "shop/backend west/payments/api-0",
            "shop/backend west/shop/web-0",
            "shop/frontend west/shop/web-1",
        ],
        "{west:?}"
    );
    assert!(flows(&["--cluster", "east"]).is_empty());
    assert_eq!(flows(&["--namespace", "west/shop"]).len(), 2);
    assert_eq!(flows(&["--namespace", "shop"]).len(), 4);
    let table = run_ok(&["flows", "--http", &http, "--cluster", "west"]);
    assert!(
        table.contains("shop/backend -> west/shop/web-0:443"),
        "{table}"
    );
    assert!(
        table.contains("west/shop/web-1 -> shop/frontend:80"),
        "{table}"
    );
    let bad = Command::new(bin())
        .args(["flows", "--http", &http, "--cluster", "West"])
        .output()
        .expect("run bulkhead");
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("not a valid cluster name"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    // The web UI groups the remote workloads by cluster.
    if let Some(why) = missing_browser_tools() {
        if std::env::var("BULKHEAD_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
            panic!(
                "{NAME}: cannot run the browser checks ({why}) and BULKHEAD_REQUIRE_PRIVILEGED=1"
            );
        }
        eprintln!("{NAME}: browser checks skipped: {why}");
        return;
    }
    let out = Command::new("node")
        .current_dir(repo())
        .arg("ui/e2e/ui.mjs")
        .args([
            "--url",
            &format!("http://{http}/"),
            "--expect",
            "shop/Pod/backend,west/shop/Deployment/web,west/payments/Deployment/api",
            "--remote",
            "west/shop/Deployment/web",
        ])
        .output()
        .expect("run node ui/e2e/ui.mjs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the browser checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ui: remote workload drawn as west/shop/web"),
        "{stdout}"
    );
    assert!(stdout.contains("ui: all checks passed"), "{stdout}");
    drop(runtime);
}
