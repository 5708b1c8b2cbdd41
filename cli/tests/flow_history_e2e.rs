//! The flow history end to end, without privileges: a real `bulkhead controller` process receives
//! flow reports over gRPC (as agents send them) and a quarantine from the API; `bulkhead flows
//! --since 24h` and `--before-quarantine` answer from the history, and answer the same after the
//! controller was stopped (SIGTERM) and started again on the same directory, with the service
//! graph rebuilt. A history the controller cannot use stops it at start with what to do.

mod common;

use common::*;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bulkhead_controller::ruleset::{
    Direction, FlowKind, FlowReason, FlowRecord, FlowRule, FlowVerdict, RuleKind, RuleRef,
};
use bulkhead_proto::v1 as pb;

const SHOP: &str = include_str!("../../examples/demo/shop.yaml");
const POLICIES: &str = include_str!("../../examples/demo/policies.yaml");
const HOUR: u64 = 3600 * 1_000_000_000;

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

fn controller(manifests: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(["controller", "--insecure", "-f"])
        .arg(manifests)
        .args(["--reload-ms", "100"])
        .args(extra);
    cmd
}

fn start(manifests: &Path) -> Controller {
    let (grpc, http, metrics) = (free_port(), free_port(), free_port());
    let child = controller(
        manifests,
        &[
            "--listen",
            &format!("127.0.0.1:{grpc}"),
            "--http",
            &format!("127.0.0.1:{http}"),
            "--metrics",
            &format!("127.0.0.1:{metrics}"),
        ],
    )
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

/// Stops the controller as Kubernetes does (SIGTERM) and waits for it to exit cleanly.
fn stop(mut c: Controller) {
    let pid = nix::unistd::Pid::from_raw(c.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = c.child.try_wait().expect("wait") {
            assert!(status.success(), "the controller stopped with {status}");
            return;
        }
        assert!(Instant::now() < deadline, "the controller did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A record shop/backend's agent reports: a connection from `src` to its port 8080.
fn record(src: &str, verdict: FlowVerdict, t: u64) -> pb::FlowRecord {
    let r = FlowRecord {
        time_unix_nanos: t,
        endpoint: "shop/backend".parse().expect("endpoint"),
        direction: Direction::Ingress,
        src: src.parse().expect("ip"),
        dst: "10.203.0.20".parse().expect("ip"),
        src_port: 40000,
        dst_port: 8080,
        protocol: 6,
        kind: if verdict == FlowVerdict::Denied {
            FlowKind::Denied
        } else {
            FlowKind::New
        },
        verdict,
        rule: FlowRule::Rule(RuleRef {
            kind: RuleKind::NetworkPolicy,
            namespace: "shop".into(),
            name: "backend-api".into(),
            direction: Direction::Ingress,
            index: (verdict == FlowVerdict::Allowed).then_some(0),
        }),
        rule_id: 0,
        local_identity: 0,
        peer_identity: 0,
        peer: None,
        reason: if verdict == FlowVerdict::Denied {
            FlowReason::DeniedPolicy
        } else {
            FlowReason::AllowedNew
        },
        packets: 1,
        bytes: 60,
        peer_names: Vec::new(),
        staged: None,
    };
    (&r).into()
}

/// Reports `records` for demo-node as its agent would.
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

fn quarantine(http: u16, pod: &str) {
    let body = format!(r#"{{"pod":"{pod}","reason":"port scan"}}"#);
    let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], http))).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        s,
        "POST /api/quarantine HTTP/1.0\r\nHost: 127.0.0.1:{http}\r\nContent-Type: application/json\r\nX-Bulkhead-Action: 1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("read");
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
}

/// `bulkhead flows --http 127.0.0.1:PORT ARGS -o json`: one JSON flow per line.
fn flows(http: u16, args: &[&str]) -> Vec<serde_json::Value> {
    let addr = format!("127.0.0.1:{http}");
    let mut all = vec!["flows", "--http", &addr, "-o", "json"];
    all.extend_from_slice(args);
    run_ok(&all)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON flow"))
        .collect()
}

/// The same through the gRPC admin API (`--controller`; this controller runs --insecure).
fn flows_grpc(grpc: u16, args: &[&str]) -> Vec<serde_json::Value> {
    let addr = format!("127.0.0.1:{grpc}");
    let mut all = vec!["flows", "--controller", &addr, "--insecure", "-o", "json"];
    all.extend_from_slice(args);
    run_ok(&all)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON flow"))
        .collect()
}

#[test]
fn flows_of_the_last_day_and_before_a_quarantine_survive_a_controller_restart() {
    let tmp = TempDir(std::env::temp_dir().join(format!("bh-history-e2e-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&tmp.0);
    let manifests = tmp.0.join("manifests");
    std::fs::create_dir_all(&manifests).expect("temp dir");
    std::fs::write(manifests.join("shop.yaml"), SHOP).expect("write");
    std::fs::write(manifests.join("policies.yaml"), POLICIES).expect("write");

    let c = start(&manifests);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64;
    let t = |h: u64| now - h * HOUR;
    // For 30 hours tools/debug (10.203.0.40) probed shop/backend, which the frontend uses.
    let mut records = Vec::new();
    for h in (0..30).rev() {
        records.push(record("10.203.0.40", FlowVerdict::Denied, t(h) + 1));
        records.push(record("10.203.0.10", FlowVerdict::Allowed, t(h) + 2));
    }
    assert_eq!(report(c.grpc, records), 60);
    quarantine(c.http, "tools/debug");

    let day = ["--since", "24h", "--pod", "tools/debug"];
    let expect_day = 24 + 1; // hours 23..0, and the quarantine action
    wait_until(
        "the flow history holds the last day",
        Duration::from_secs(30),
        || flows(c.http, &day).len() == expect_day,
    );
    let before_restart = flows(c.http, &day);
    assert!(
        before_restart
            .iter()
            .filter(|f| f["verdict"] == "denied")
            .all(|f| f["peer"] == "tools/debug" && f["endpoint"] == "shop/backend"),
        "{before_restart:?}"
    );
    let forensics = ["--pod", "tools/debug", "--before-quarantine"];
    let before_quarantine = flows(c.http, &forensics);
    // Hours 23..0 (the 24 h before the quarantine) and the quarantine itself, oldest first.
    assert_eq!(before_quarantine.len(), 24 + 1, "{before_quarantine:?}");
    assert_eq!(
        before_quarantine.last().map(|f| f["verdict"].clone()),
        Some("quarantined".into())
    );
    let ten_hours = flows(
        c.http,
        &["--pod", "tools/debug", "--since", "30h", "--until", "10h"],
    );
    assert_eq!(ten_hours.len(), 20, "hours 29..10");
    // The gRPC admin API reads the same history.
    for args in [&day[..], &forensics[..]] {
        assert_eq!(flows_grpc(c.grpc, args), flows(c.http, args), "{args:?}");
    }
    let window = ["--pod", "tools/debug", "--since", "30h", "--until", "10h"];
    assert_eq!(flows_grpc(c.grpc, &window), ten_hours);
    assert_eq!(
        flows_grpc(
            c.grpc,
            &["--pod", "tools/debug", "--since", "30h", "--limit", "3"]
        )
        .len(),
        3
    );

    stop(c);
    let c = start(&manifests);
    assert_eq!(flows(c.http, &day), before_restart);
    assert_eq!(flows(c.http, &forensics), before_quarantine);
    assert_eq!(flows_grpc(c.grpc, &day), before_restart);
    assert_eq!(flows_grpc(c.grpc, &forensics), before_quarantine);
    // The graph of the last hour (--graph-ttl) is back before any agent reported again.
    let graph = http_get(c.http, "/api/graph").expect("graph");
    assert!(
        graph.contains("\"tools/Pod/debug\"") && graph.contains("backend"),
        "{graph}"
    );
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
    };
    let history = manifests.join("flow-history");
    assert_eq!(mode(&history), 0o700);
    assert_eq!(mode(&history.join("flows.sqlite")), 0o600);
    stop(c);

    // A file that is not a flow history stops the start, with what to do.
    std::fs::write(history.join("flows.sqlite"), "not a database ".repeat(200)).expect("write");
    let _ = std::fs::remove_file(history.join("flows.sqlite-wal"));
    let _ = std::fs::remove_file(history.join("flows.sqlite-shm"));
    let out = controller(
        &manifests,
        &[
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--http",
            &format!("127.0.0.1:{}", free_port()),
            "--metrics",
            &format!("127.0.0.1:{}", free_port()),
        ],
    )
    .output()
    .expect("run the controller");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started on a damaged history");
    assert!(
        err.contains("flows.sqlite") && err.contains("move it away"),
        "{err}"
    );
}
