//! Tier 3: what-if before applying, in the lab with real traffic (issue 18). Pods of two
//! namespaces on two nodes connect (web → api:8080, api → db:5432) with nothing enforced;
//! `bulkhead policy impact` replays the flows the controller received against a proposal that
//! would deny web → api (it lists that edge, and `--fail-on-deny` exits 1), against a harmless
//! proposal (exit 0), and nothing of either reaches enforcement: the connections still work.
//! Then, with least privilege enforced, the deletion of an allow rule lists exactly the edge it
//! would break.

mod common;

use common::*;

use std::{
    io::Read,
    net::{SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use bulkhead_agent::privileged::check_privileged_test;

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: tools}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  nodeName: node-1
  containers: [{name: c, image: x, ports: [{containerPort: 80}, {containerPort: 8080}, {containerPort: 5432}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: shop, labels: {app: api}}
spec:
  nodeName: node-2
  containers: [{name: c, image: x, ports: [{containerPort: 80}, {containerPort: 8080}, {containerPort: 5432}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec:
  nodeName: node-1
  containers: [{name: c, image: x, ports: [{containerPort: 80}, {containerPort: 8080}, {containerPort: 5432}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: debug, namespace: tools, labels: {run: debug}}
spec:
  nodeName: node-2
  containers: [{name: c, image: x, ports: [{containerPort: 80}, {containerPort: 8080}, {containerPort: 5432}]}]
"#;

/// The api admits only the db: web → api:8080, observed admitted, would be denied.
const DENY_WEB: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-ingress, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: db}}}]
"#;

/// Isolates tools/debug, which received nothing.
const HARMLESS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: debug-ingress, namespace: tools}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"#;

/// Least privilege for the shop: isolated, web → api:8080 and api → db:5432 allowed.
const ENFORCED: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: shop}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-web-to-api, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 8080}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-api-to-db, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: api}}}]
    ports: [{port: 5432}]
"#;

fn connects(from: &Pod, to: &Pod, port: u16) -> bool {
    let addr = SocketAddr::new(to.ip, port);
    in_pod(from, move || {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(700)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(700)));
        let mut banner = [0u8; 64];
        s.read(&mut banner).is_ok_and(|n| n > 0)
    })
}

/// `bulkhead policy impact --lab STATE ARGS…`: (exit code, stdout, stderr).
fn impact(state: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(["policy", "impact", "--lab", state])
        .args(args)
        .output()
        .expect("run bulkhead");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn impact_lists_observed_connections_a_proposal_would_deny() {
    if !check_privileged_test("impact_lists_observed_connections_a_proposal_would_deny") {
        return;
    }
    let lab = TestLab::up("impact-e2e", MANIFESTS, 19540);
    let s = lab.arg();
    let p = pods(&lab.state);
    let deny = lab.dir.join("deny-web.yaml");
    std::fs::write(&deny, DENY_WEB).expect("write");
    let harmless = lab.dir.join("harmless.yaml");
    std::fs::write(&harmless, HARMLESS).expect("write");
    let (deny, harmless) = (deny.to_string_lossy(), harmless.to_string_lossy());

    // Real connections, nothing enforced.
    assert!(connects(&p["shop/web"], &p["shop/api"], 8080), "web → api");
    assert!(connects(&p["shop/api"], &p["shop/db"], 5432), "api → db");

    // The controller has the records once the agents have sent them: the edge at the api's
    // ingress shows up.
    let started = Instant::now();
    let report = loop {
        let (code, out, err) = impact(&s, &["-f", &deny, "-o", "json"]);
        assert_eq!(code, 0, "without --fail-on-deny: {err}");
        let r: serde_json::Value = serde_json::from_str(&out).expect("json");
        if r["breaks"].as_u64() >= Some(1) {
            break r;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the web → api edge never appeared: {r}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(
        report["proposal"]["added"][0],
        "NetworkPolicy/shop/api-ingress"
    );
    let broken: Vec<&serde_json::Value> = report["changed"]
        .as_array()
        .expect("changed")
        .iter()
        .filter(|e| e["breaks"] == true)
        .collect();
    assert_eq!(broken.len(), 1, "{report}");
    let e = broken[0];
    assert_eq!(
        (e["src"].as_str(), e["dst"].as_str(), e["at"].as_str()),
        (Some("shop/web"), Some("shop/api"), Some("shop/api")),
        "{report}"
    );
    assert_eq!(
        (e["port"].as_u64(), e["protocol"].as_str()),
        (Some(8080), Some("TCP"))
    );
    assert_eq!(e["before"]["verdict"], "allow");
    assert_eq!(e["after"]["verdict"], "deny");
    assert_eq!(
        e["after"]["rule"], "NetworkPolicy shop/api-ingress ingress default-deny",
        "{report}"
    );
    // api → db is not touched.
    assert!(
        !report["changed"]
            .as_array()
            .expect("changed")
            .iter()
            .any(|e| e["dst"] == "shop/db"),
        "{report}"
    );

    // For CI: --fail-on-deny exits 1, and the table names the edge and the rule.
    let (code, out, err) = impact(&s, &["-f", &deny, "--fail-on-deny"]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.lines().any(|l| l.starts_with("newly-denied!")
            && l.contains("shop/web -> shop/api")
            && l.contains("TCP/8080")
            && l.contains("NetworkPolicy shop/api-ingress ingress default-deny")),
        "{out}"
    );
    assert!(
        err.contains("observed as admitted would be denied"),
        "{err}"
    );

    // A harmless proposal passes.
    let (code, out, err) = impact(&s, &["-f", &harmless, "--fail-on-deny"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("no edge observed as admitted would be denied"),
        "{err}"
    );

    // Errors are 2, apart from --fail-on-deny's 1.
    let (code, _, err) = impact(
        &s,
        &["--delete", "NetworkPolicy/shop/nope", "--fail-on-deny"],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no such policy"), "{err}");
    let (code, _, err) = impact(&s, &["-f", &deny, "--grpc", "--delete", "nope"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("KIND/NAMESPACE/NAME"), "{err}");
    let (code, _, err) = impact(&s, &["--grpc", "--delete", "NetworkPolicy/shop/nope"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("the controller refused the proposal") && err.contains("no such policy"),
        "{err}"
    );

    // The gRPC admin API (`--grpc`: the lab controller's, with the lab's admin certificate)
    // answers exactly what the HTTP API answers, exit codes included.
    let same = (0..5).any(|_| {
        let (_, http, _) = impact(&s, &["-f", &deny, "-o", "json"]);
        let (code, grpc, err) = impact(&s, &["-f", &deny, "-o", "json", "--grpc"]);
        assert_eq!(code, 0, "{err}");
        let (_, again, _) = impact(&s, &["-f", &deny, "-o", "json"]);
        // Records that arrive between the questions change the counts: ask again.
        http == again && grpc == http
    });
    assert!(same, "--grpc answers differ from the HTTP API's");
    let (code, out, _) = impact(&s, &["-f", &deny, "--fail-on-deny", "--grpc"]);
    assert_eq!(code, 1, "{out}");

    // Nothing reached enforcement.
    assert!(
        connects(&p["shop/web"], &p["shop/api"], 8080),
        "web → api still works"
    );
    assert!(
        connects(&p["shop/api"], &p["shop/db"], 5432),
        "api → db still works"
    );

    // With least privilege in force (the shop isolated, web → api and api → db allowed by one
    // policy each), deleting the allow rule of web → api lists exactly that edge: observed
    // admitted, denied after by the shop's default deny; api → db and the rest do not change.
    let enforced = lab.dir.join("enforced.yaml");
    std::fs::write(&enforced, ENFORCED).expect("write");
    run_ok(&[
        "lab",
        "--state",
        &s,
        "apply",
        "-f",
        &enforced.to_string_lossy(),
    ]);
    assert!(
        connects(&p["shop/web"], &p["shop/api"], 8080),
        "allowed: web → api"
    );
    assert!(
        connects(&p["shop/api"], &p["shop/db"], 5432),
        "allowed: api → db"
    );
    assert!(
        !connects(&p["shop/web"], &p["shop/db"], 5432),
        "denied: web → db"
    );
    let delete = [
        "--delete",
        "NetworkPolicy/shop/allow-web-to-api",
        "-o",
        "json",
    ];
    let started = Instant::now();
    let report = loop {
        let (code, out, err) = impact(&s, &delete);
        assert_eq!(code, 0, "{err}");
        let r: serde_json::Value = serde_json::from_str(&out).expect("json");
        if r["breaks"].as_u64() >= Some(1) {
            break r;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the deletion never showed the web → api edge: {r}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(
        report["proposal"]["deleted"][0],
        "NetworkPolicy/shop/allow-web-to-api"
    );
    let changed = report["changed"].as_array().expect("changed");
    assert_eq!(changed.len(), 1, "exactly the affected edge: {report}");
    let e = &changed[0];
    assert_eq!(
        (e["src"].as_str(), e["dst"].as_str(), e["at"].as_str()),
        (Some("shop/web"), Some("shop/api"), Some("shop/api")),
        "{report}"
    );
    assert_eq!(
        (e["change"].as_str(), e["breaks"].as_bool()),
        (Some("newly-denied"), Some(true))
    );
    assert_eq!(e["port"].as_u64(), Some(8080));
    assert!(
        e["before"]["rule"]
            .as_str()
            .is_some_and(|r| r.starts_with("NetworkPolicy shop/allow-web-to-api ingress")),
        "{report}"
    );
    assert_eq!(
        e["after"]["rule"], "NetworkPolicy shop/default-deny ingress default-deny",
        "{report}"
    );
    assert_eq!(report["breaks"], 1);
    // Asking changed nothing.
    assert!(
        connects(&p["shop/web"], &p["shop/api"], 8080),
        "web → api still allowed"
    );
}
