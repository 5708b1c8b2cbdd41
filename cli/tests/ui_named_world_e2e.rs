//! World peers named by DNS, end to end without privileges: a real `bulkhead controller`
//! receives flow reports over gRPC (as agents send them) whose world peers carry the DNS names
//! their pods had learned for the address; the service graph draws `world: api.example.com` as
//! a node of its own beside plain `world`; `bulkhead flows --peer-name` finds those flows (HTTP
//! and gRPC admin API alike) and `bulkhead graph` lists the named node; and the web UI, in
//! headless Chromium (`ui/e2e/ui.mjs --named-world`), draws the node and lists its flows with
//! the name.

mod common;

use common::*;

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bulkhead_controller::ruleset::{
    Direction, FlowKind, FlowReason, FlowRecord, FlowRule, FlowVerdict, NamePattern, RuleKind,
    RuleRef,
};
use bulkhead_proto::v1 as pb;

const SHOP: &str = include_str!("../../examples/demo/shop.yaml");
const POLICIES: &str = include_str!("../../examples/demo/policies.yaml");

struct Controller {
    child: Child,
    grpc: u16,
    http: u16,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &std::path::Path) -> Controller {
    let (grpc, http, metrics) = (free_port(), free_port(), free_port());
    let child = Command::new(bin())
        .args(["controller", "--insecure", "-f"])
        .arg(dir.join("manifests"))
        .args(["--reload-ms", "100", "--flow-history"])
        .arg(dir.join("history"))
        .args([
            "--listen",
            &format!("127.0.0.1:{grpc}"),
            "--http",
            &format!("127.0.0.1:{http}"),
            "--metrics",
            &format!("127.0.0.1:{metrics}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the controller");
    let c = Controller { child, grpc, http };
    wait_until("the controller answers", Duration::from_secs(60), || {
        http_get(c.http, "/healthz").is_some_and(|b| b.trim() == "ok")
    });
    c
}

/// shop/backend's egress to `dst:443`, its peer named by `names`.
fn record(dst: &str, names: &[&str], verdict: FlowVerdict, t: u64) -> pb::FlowRecord {
    let denied = verdict == FlowVerdict::Denied;
    let r = FlowRecord {
        time_unix_nanos: t,
        endpoint: "shop/backend".parse().expect("endpoint"),
        direction: Direction::Egress,
        src: "10.203.0.20".parse().expect("ip"),
        dst: dst.parse().expect("ip"),
        src_port: 40000,
        dst_port: 443,
        protocol: 6,
        kind: if denied {
            FlowKind::Denied
        } else {
            FlowKind::New
        },
        verdict,
        rule: FlowRule::Rule(RuleRef {
            kind: RuleKind::NetworkPolicy,
            namespace: "shop".into(),
            name: "backend-api".into(),
            direction: Direction::Egress,
            index: (!denied).then_some(0),
        }),
        rule_id: 0,
        local_identity: 0,
        peer_identity: bulkhead_controller::ruleset::identity::WORLD,
        peer: None,
        peer_names: names
            .iter()
            .map(|n| NamePattern::parse(n).expect("a name"))
            .collect(),
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

fn report(grpc: u16, records: Vec<pb::FlowRecord>) -> u64 {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async move {
            let mut client = pb::distribution_client::DistributionClient::connect(format!(
                "http://127.0.0.1:{grpc}"
            ))
            .await
            .expect("connect");
            let batch = pb::FlowBatch {
                node: "demo-node".into(),
                records,
                dropped: 0,
            };
            client
                .report_flows(tokio_stream::iter([batch]))
                .await
                .expect("report")
                .into_inner()
                .accepted
        })
}

fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).expect("a JSON flow"))
        .collect()
}

#[test]
fn world_peers_named_by_dns_are_graph_nodes_flows_and_drawn_in_the_ui() {
    const NAME: &str = "world_peers_named_by_dns_are_graph_nodes_flows_and_drawn_in_the_ui";
    let tmp = TempDir(std::env::temp_dir().join(format!("bh-named-world-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&tmp.0);
    let manifests = tmp.0.join("manifests");
    std::fs::create_dir_all(&manifests).expect("temp dir");
    std::fs::write(manifests.join("shop.yaml"), SHOP).expect("write");
    std::fs::write(manifests.join("policies.yaml"), POLICIES).expect("write");
    let c = start(&tmp.0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64;
    let records = vec![
        // Denied attempts to an address learned for api.example.com (and a wildcard) …
        record(
            "203.0.113.7",
            &["api.example.com", "*.example.com"],
            FlowVerdict::Denied,
            now - 3_000_000_000,
        ),
        record(
            "203.0.113.7",
            &["api.example.com", "*.example.com"],
            FlowVerdict::Denied,
            now - 2_000_000_000,
        ),
        // … one learned under the wildcard alone, and one to an address learned for nothing.
        record(
            "203.0.113.9",
            &["*.example.com"],
            FlowVerdict::Denied,
            now - 1_500_000_000,
        ),
        record(
            "198.51.100.1",
            &[],
            FlowVerdict::Denied,
            now - 1_000_000_000,
        ),
    ];
    assert_eq!(report(c.grpc, records), 4);

    // The graph: one node per first name, plain world apart.
    wait_until(
        "the graph holds the named world",
        Duration::from_secs(30),
        || http_get(c.http, "/api/graph").is_some_and(|g| g.contains("world: api.example.com")),
    );
    let graph: serde_json::Value =
        serde_json::from_str(&http_get(c.http, "/api/graph").expect("graph")).expect("json");
    let nodes = graph["nodes"].as_array().expect("nodes");
    let node = |id: &str| nodes.iter().find(|n| n["id"] == id).cloned();
    let api = node("world: api.example.com").expect("the named node");
    assert_eq!(
        (api["domain"].as_str(), api["namespace"].as_str()),
        (Some("api.example.com"), Some(""))
    );
    assert!(node("world: *.example.com").is_some(), "{nodes:?}");
    let plain = node("world").expect("plain world");
    assert!(plain.get("domain").is_none(), "{plain}");
    let denied_to = |dst: &str| {
        graph["edges"]
            .as_array()
            .expect("edges")
            .iter()
            .filter(|e| e["dst"] == dst && e["src"] == "shop/Pod/backend")
            .map(|e| e["denied"].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    assert_eq!(denied_to("world: api.example.com"), 2, "{graph}");
    assert_eq!(denied_to("world: *.example.com"), 1, "{graph}");
    assert_eq!(denied_to("world"), 1, "{graph}");

    // `bulkhead flows --peer-name`: the name finds its flows and those learned under a wildcard
    // covering it; the wildcard finds every flow under it. HTTP and gRPC answer alike.
    let http = format!("127.0.0.1:{}", c.http);
    let grpc = format!("127.0.0.1:{}", c.grpc);
    for (name, want) in [
        ("api.example.com", 3),
        ("*.example.com", 3),
        ("other.org", 0),
    ] {
        let by_http = json_lines(&run_ok(&[
            "flows",
            "--http",
            &http,
            "-o",
            "json",
            "--peer-name",
            name,
        ]));
        let by_grpc = json_lines(&run_ok(&[
            "flows",
            "--controller",
            &grpc,
            "--insecure",
            "-o",
            "json",
            "--peer-name",
            name,
        ]));
        assert_eq!(by_http.len(), want, "{name}: {by_http:?}");
        assert_eq!(by_grpc, by_http, "{name}");
    }
    let exact = json_lines(&run_ok(&[
        "flows",
        "--http",
        &http,
        "-o",
        "json",
        "--peer-name",
        "API.example.com.",
    ]));
    assert!(
        exact
            .iter()
            .filter(|f| f["dst"] == "203.0.113.7")
            .all(|f| f["peer_names"] == serde_json::json!(["api.example.com", "*.example.com"])),
        "{exact:?}"
    );
    let table = run_ok(&["flows", "--http", &http, "--peer-name", "api.example.com"]);
    assert!(
        table.contains("shop/backend -> 203.0.113.7 (api.example.com, *.example.com):443"),
        "{table}"
    );
    let graph_table = run_ok(&["graph", "--http", &http]);
    assert!(
        graph_table.contains("world: api.example.com"),
        "{graph_table}"
    );

    // The web UI draws the node and opens it.
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
            &format!("http://127.0.0.1:{}/", c.http),
            "--named-world",
            "api.example.com",
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
        stdout.contains("ui: named world node drawn and opened"),
        "{stdout}"
    );
    assert!(stdout.contains("ui: all checks passed"), "{stdout}");
}
