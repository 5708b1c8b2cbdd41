//! Tier 3: the web UI in headless Chromium against a lab with real traffic. The demo shop runs
//! on two lab nodes under its least-privilege policies; real connections (allowed and denied)
//! reach the controller as flows; `ui/e2e/ui.mjs` (playwright-core driving Debian's chromium)
//! checks that the workloads and a denied edge appear, that the filters work, that clicking the
//! edge lists its flows with the rule that denied them, and quarantines a pod with the page's
//! button, then opens the pod's flow history (one click: what it talked to in the 24 h before
//! its quarantine). The quarantine is then checked from the CLI, and released from the page. A staged
//! edit of a policy is listed with what it would deny, and its connections open from the list.
//!
//! The screenshot goes to `target/ui-e2e/ui.png`; `BULKHEAD_UI_SCREENSHOT=docs/ui.png` refreshes
//! the README's.

mod common;

use common::*;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use bulkhead_agent::privileged::check_privileged_test;

/// This test's own loopback ports (controller gRPC at BASE, HTTP at BASE+1, agents above).
const PORT_BASE: u16 = 19460;

/// A staged edit of the demo's backend-api policy.
const STAGED_EDIT: &str = "apiVersion: bulkhead.dev/v1alpha1
kind: StagedNetworkPolicy
metadata: {name: backend-api, namespace: shop}
spec:
  podSelector: {matchLabels: {app: backend}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: gateway}}}]
    ports: [{port: api}]
  egress:
  - to: [{podSelector: {matchLabels: {app: db}}}]
    ports: [{port: 5432, protocol: TCP}]
";
const STAGED_POLICY: &str = "StagedNetworkPolicy shop/backend-api";

fn bulkhead(state: &Path, args: &[&str]) -> String {
    let out = Command::new(bin())
        .current_dir(repo())
        .arg("lab")
        .arg("--state")
        .arg(state)
        .args(args)
        .output()
        .expect("run bulkhead lab");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "bulkhead lab {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn quarantine_list(state: &Path) -> String {
    let out = Command::new(bin())
        .args(["quarantine", "list", "--lab"])
        .arg(state)
        .output()
        .expect("run bulkhead quarantine list");
    assert!(
        out.status.success(),
        "bulkhead quarantine list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn ui_script(args: &[&str]) {
    let out = Command::new("node")
        .current_dir(repo())
        .arg("ui/e2e/ui.mjs")
        .args(args)
        .output()
        .expect("run node ui/e2e/ui.mjs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the browser checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("ui: all checks passed"), "{stdout}");
}

#[test]
fn the_web_ui_shows_the_live_map_and_quarantines_a_pod() {
    const NAME: &str = "the_web_ui_shows_the_live_map_and_quarantines_a_pod";
    if !check_privileged_test(NAME) {
        return;
    }
    if let Some(why) = missing_browser_tools() {
        if std::env::var("BULKHEAD_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
            panic!("{NAME}: cannot run ({why}) and BULKHEAD_REQUIRE_PRIVILEGED=1");
        }
        eprintln!("skipping {NAME}: {why}");
        return;
    }
    let state = std::env::temp_dir().join(format!("bh-ui-e2e-{}", std::process::id()));
    let _down = LabDown(state.clone());
    let port = PORT_BASE.to_string();
    bulkhead(
        &state,
        &[
            "up",
            "-f",
            "examples/demo/shop.yaml",
            "--nodes",
            "2",
            "--port-base",
            &port,
        ],
    );
    // Open first (allowed traffic), then least privilege (denied attempts name their rules).
    bulkhead(&state, &["probe", "--port", "80"]);
    bulkhead(&state, &["apply", "-f", "examples/demo/policies.yaml"]);
    // A staged edit under review: backend-api admitting a gateway instead of the frontend. It
    // enforces nothing; the page lists what it would deny (frontend → backend:8080).
    let staged = state.with_extension("staged.yaml");
    std::fs::write(&staged, STAGED_EDIT).expect("write the staged policy");
    bulkhead(&state, &["apply", "-f", &staged.to_string_lossy()]);
    let _ = std::fs::remove_file(&staged);
    for p in ["80", "8080", "5432"] {
        bulkhead(&state, &["probe", "--port", p]);
    }
    // And `world`: the shop may not leave the cluster (ServicePolicy shop/no-world). The target
    // is the lab node's own side of the pod's veth (169.254.1.1, in this test's namespaces),
    // an address of no pod; whether the attempt fails does not matter, its flow does.
    let _ = Command::new(bin())
        .arg("lab")
        .arg("--state")
        .arg(&state)
        .args(["exec", "shop/frontend", "--", "bash", "-c"])
        .arg("timeout 2 bash -c 'exec 3<>/dev/tcp/169.254.1.1/80' || true")
        .output();
    let http = PORT_BASE + 1;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let map: serde_json::Value = http_get(http, "/api/map")
            .and_then(|b| serde_json::from_str(&b).ok())
            .unwrap_or_default();
        let denied = |src: &str, dst: Option<&str>| {
            map["edges"].as_array().is_some_and(|edges| {
                edges.iter().any(|e| {
                    e["src"] == src
                        && dst.is_none_or(|d| e["dst"] == d)
                        && e["denied"].as_u64() > Some(0)
                })
            })
        };
        let staged_seen = map["staged"].as_array().is_some_and(|p| {
            p.iter()
                .any(|p| p["policy"] == STAGED_POLICY && p["flows"].as_u64() > Some(0))
        });
        if denied("tools/Pod/debug", None)
            && denied("shop/Pod/frontend", Some("world"))
            && staged_seen
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no denied edges from tools/debug and to world, or no would-deny flow of {STAGED_POLICY}, reached the controller: {map}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    let screenshot = std::env::var("BULKHEAD_UI_SCREENSHOT")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { repo().join(p) })
        .unwrap_or_else(|_| repo().join("target/ui-e2e/ui.png"));
    if let Some(dir) = screenshot.parent() {
        std::fs::create_dir_all(dir).expect("screenshot directory");
    }
    let url = format!("http://127.0.0.1:{http}/");
    ui_script(&[
        "--url",
        &url,
        "--expect",
        "shop/Pod/frontend,shop/Pod/backend,shop/Pod/db,tools/Pod/debug,world",
        "--denied-from",
        "tools/Pod/debug",
        "--staged",
        STAGED_POLICY,
        "--quarantine",
        "tools/debug",
        "--screenshot",
        &screenshot.to_string_lossy(),
    ]);
    let png = std::fs::read(&screenshot).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );

    // The page's quarantine is the real one: the CLI sees it, with the page as its actor, and
    // it is enforced (tools/debug reaches nothing, though frontend's port 80 is open to all).
    let list = quarantine_list(&state);
    assert!(
        list.contains("tools/debug") && list.contains("port scan against the shop"),
        "{list}"
    );
    assert!(list.contains("by web UI"), "{list}");
    let probe = bulkhead(&state, &["probe", "--port", "80", "-o", "json"]);
    let matrix: serde_json::Value = serde_json::from_str(&probe).expect("probe JSON");
    assert_eq!(
        matrix["tools/debug"]["shop/frontend"], false,
        "quarantined tools/debug still reaches shop/frontend:80: {probe}"
    );

    ui_script(&["--url", &url, "--release", "tools/debug"]);
    let list = quarantine_list(&state);
    assert!(list.contains("no pod is quarantined"), "{list}");
}
