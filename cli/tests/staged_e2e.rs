//! Tier 3: staged policies in the lab, with real connections (issue 18, part 3). A staged edit
//! of an enforced NetworkPolicy changes no connection; every flow it would decide differently
//! says so (`bulkhead flows --staged-verdict`), naming the staged rule; `bulkhead policy
//! promote` enforces the edit in one change, after which exactly what the flows predicted is
//! denied and allowed.

mod common;

use common::*;

use std::time::{Duration, Instant};

use bulkhead_agent::privileged::check_privileged_test;

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  nodeName: node-1
  containers: [{name: c, image: x, ports: [{containerPort: 5432}, {containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: shop, labels: {app: api}}
spec:
  nodeName: node-2
  containers: [{name: c, image: x, ports: [{containerPort: 5432}, {containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec:
  nodeName: node-1
  containers: [{name: c, image: x, ports: [{containerPort: 5432}, {containerPort: 8080}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-ingress, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}, {podSelector: {matchLabels: {app: api}}}]
    ports: [{port: 5432}]
"#;

/// The edit under review: only api may reach the database, on 5432 and now 8080 too.
const STAGED: &str = r#"
apiVersion: bulkhead.dev/v1alpha1
kind: StagedNetworkPolicy
metadata: {name: db-ingress, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: api}}}]
    ports: [{port: 5432}, {port: 8080}]
"#;

/// `bulkhead flows --lab STATE --pod shop/db ARGS -o json`: one JSON flow per line.
fn flows(state: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["flows", "--lab", state, "--pod", "shop/db", "-o", "json"];
    all.extend_from_slice(args);
    run_ok(&all)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON flow"))
        .collect()
}

/// The flows at the database's ingress from `peer` to `port`.
fn at_db<'a>(
    flows: &'a [serde_json::Value],
    peer: &'a str,
    port: u16,
) -> impl Iterator<Item = &'a serde_json::Value> + 'a {
    flows.iter().filter(move |f| {
        f["endpoint"] == "shop/db"
            && f["direction"] == "ingress"
            && f["peer"] == peer
            && f["dst_port"] == port
    })
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let started = Instant::now();
    while !f() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_staged_edit_reports_what_it_would_break_and_promote_enforces_exactly_that() {
    if !check_privileged_test(
        "a_staged_edit_reports_what_it_would_break_and_promote_enforces_exactly_that",
    ) {
        return;
    }
    let lab = TestLab::up("staged-e2e", MANIFESTS, 19400);
    let s = lab.arg();
    let p = pods(&lab.state);
    let (web, api, db) = (&p["shop/web"], &p["shop/api"], &p["shop/db"]);

    let staged = lab.dir.join("staged.yaml");
    std::fs::write(&staged, STAGED).expect("write");
    run_ok(&[
        "lab",
        "--state",
        &s,
        "apply",
        "-f",
        &staged.to_string_lossy(),
    ]);

    // Staged: nothing changes for real connections.
    assert!(connects(web, db, 5432), "web → db:5432 is still allowed");
    assert!(connects(api, db, 5432), "api → db:5432 is allowed");
    assert!(!connects(api, db, 8080), "api → db:8080 is still denied");

    // What the edit would break: web → db:5432, allowed now, denied by the staged policy.
    wait_for("the would-deny flow", || {
        at_db(
            &flows(&s, &["--staged-verdict", "denied"]),
            "shop/web",
            5432,
        )
        .next()
        .is_some()
    });
    let denied = flows(&s, &["--staged-verdict", "denied"]);
    let f = at_db(&denied, "shop/web", 5432).next().expect("a flow");
    assert_eq!(f["verdict"], "audit-would-deny", "{f}");
    assert_eq!(f["staged_verdict"], "denied", "{f}");
    assert!(
        f["staged_rule"]
            .as_str()
            .is_some_and(|r| r.starts_with("StagedNetworkPolicy shop/db-ingress")),
        "{f}"
    );
    assert!(
        at_db(&denied, "shop/api", 5432).next().is_none(),
        "api → db:5432 stays allowed with the edit: {denied:?}"
    );
    // Counted per staged policy on the controller's /metrics (port base + 2).
    wait_for("the would-deny counter", || {
        http_get(19402, "/metrics").is_some_and(|m| {
            m.lines().any(|l| {
                l.starts_with(
                    "bulkhead_controller_staged_would_deny_total{policy=\"StagedNetworkPolicy shop/db-ingress\"} ",
                )
            })
        })
    });
    // What it would newly admit: api → db:8080, denied now.
    wait_for("the would-allow flow", || {
        at_db(
            &flows(&s, &["--staged-verdict", "allowed"]),
            "shop/api",
            8080,
        )
        .next()
        .is_some()
    });
    let allowed = flows(&s, &["--staged-verdict", "allowed"]);
    let f = at_db(&allowed, "shop/api", 8080).next().expect("a flow");
    assert_eq!(
        (&f["verdict"], &f["staged_verdict"]),
        (&"denied".into(), &"allowed".into()),
        "{f}"
    );
    assert!(
        f["staged_rule"]
            .as_str()
            .is_some_and(|r| r.starts_with("StagedNetworkPolicy shop/db-ingress ingress[0]")),
        "{f}"
    );
    // The table says it too.
    let table = run_ok(&[
        "flows",
        "--lab",
        &s,
        "--pod",
        "shop/db",
        "--staged-verdict",
        "denied",
    ]);
    assert!(
        table.contains("(staged: would be denied by StagedNetworkPolicy shop/db-ingress"),
        "{table}"
    );

    // Promote: the edit is enforced, the staged object gone, in one change.
    let out = run_ok(&["policy", "promote", "shop/db-ingress", "--lab", &s]);
    assert!(out.contains("promoted StagedNetworkPolicy"), "{out}");
    assert!(
        !connects(web, db, 5432),
        "web → db:5432 is denied once promoted"
    );
    assert!(connects(api, db, 5432), "api → db:5432 still allowed");
    assert!(
        connects(api, db, 8080),
        "api → db:8080 allowed once promoted"
    );
    let manifest =
        std::fs::read_to_string(lab.state.join("manifests").join("lab.yaml")).unwrap_or_default();
    assert!(!manifest.contains("StagedNetworkPolicy"), "{manifest}");
    // Nothing staged any more: the newest api → db:8080 flow carries no staged outcome.
    wait_for("an allowed api → db:8080 flow", || {
        at_db(&flows(&s, &["--verdict", "allowed"]), "shop/api", 8080)
            .next()
            .is_some()
    });
    let now = flows(&s, &["--verdict", "allowed"]);
    let f = at_db(&now, "shop/api", 8080).next().expect("a flow");
    assert!(f.get("staged_verdict").is_none(), "{f}");
    assert!(
        f["rule"]
            .as_str()
            .is_some_and(|r| r.starts_with("NetworkPolicy shop/db-ingress ingress[0]")),
        "{f}"
    );
    // Promoting again: there is nothing staged of that name.
    let again = std::process::Command::new(bin())
        .args(["policy", "promote", "shop/db-ingress", "--lab", &s])
        .output()
        .expect("run");
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("the lab has no StagedNetworkPolicy"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}
