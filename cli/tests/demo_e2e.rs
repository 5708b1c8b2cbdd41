//! Tier 3: the README's main job, `bulkhead demo`, runs end to end and tells its story: open
//! traffic, least privilege enforced, denied flows naming rules, a quarantine, the graph.

use std::process::Command;

use bulkhead_agent::privileged::check_privileged_test;

#[test]
fn the_demo_runs_and_tells_its_story() {
    if !check_privileged_test("the_demo_runs_and_tells_its_story") {
        return;
    }
    let state = std::env::temp_dir().join(format!("bh-demo-e2e-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args(["demo", "--state"])
        .arg(&state)
        .output()
        .expect("run bulkhead demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "reached by [shop/backend, shop/db, tools/debug]",
        "shop/db          :5432   reached by [shop/backend]",
        "by NetworkPolicy shop/",
        "quarantined tools/debug: enforced on",
        "tools/debug reaches shop/frontend:80: false",
        "denied by Quarantine tools/",
        "FROM",
        "demo finished",
    ] {
        assert!(
            stdout.contains(expected),
            "the demo's output lacks {expected:?}:\n{stdout}"
        );
    }
    assert!(!state.exists(), "the demo cleans up after itself");
}
