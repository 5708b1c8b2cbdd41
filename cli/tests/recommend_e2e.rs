//! Tier 3: recommended policies in the lab, from real traffic. Pods of two namespaces on two
//! nodes talk in a pattern (web → api:8080, api → db:5432, debug → web:80); `bulkhead policy
//! recommend` learns NetworkPolicies from the flows the controller received; applied as
//! enforced, `lab probe` (real connections) shows every observed connection admitted and every
//! other connection between the covered pods, on the pattern's ports, denied. Staged first
//! (`--staged`), the same policies change nothing and no flow of the pattern would be denied;
//! promoted one by one, they are the enforced recommendation.

mod common;

use common::*;

use std::{
    collections::BTreeMap,
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
metadata: {name: web, namespace: shop, labels: {app: web, pod-template-hash: 5d8f}}
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

/// The observed pattern: (source, destination, port).
const PATTERN: [(&str, &str, u16); 3] = [
    ("shop/web", "shop/api", 8080),
    ("shop/api", "shop/db", 5432),
    ("tools/debug", "shop/web", 80),
];

type Matrix = BTreeMap<String, BTreeMap<String, bool>>;

fn probe(state: &str, port: u16) -> Matrix {
    serde_json::from_str(&run_ok(&[
        "lab",
        "--state",
        state,
        "probe",
        "--port",
        &port.to_string(),
        "-o",
        "json",
    ]))
    .expect("probe json")
}

#[test]
fn recommended_policies_admit_exactly_the_observed_traffic() {
    if !check_privileged_test("recommended_policies_admit_exactly_the_observed_traffic") {
        return;
    }
    let lab = TestLab::up("recommend-e2e", MANIFESTS, 19600);
    let s = lab.arg();
    let p = pods(&lab.state);

    // The pattern, as real connections (nothing enforced yet: all are admitted).
    for (from, to, port) in PATTERN {
        assert!(connects(&p[from], &p[to], port), "{from} → {to}:{port}");
    }

    // The controller learns the edges as the agents' flow records arrive.
    let recommend = |output: &str| {
        run_ok(&[
            "policy",
            "recommend",
            "--lab",
            &s,
            "-n",
            "shop",
            "-n",
            "tools",
            "-o",
            output,
        ])
    };
    let started = Instant::now();
    let learned = loop {
        let r: serde_json::Value = serde_json::from_str(&recommend("json")).expect("json");
        if r["edges"].as_u64() >= Some(PATTERN.len() as u64) {
            break r;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the controller did not learn the pattern's edges: {r}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(learned["edges"], PATTERN.len(), "{learned}");
    assert_eq!(learned["status"], "learning", "the edges are new");
    let yaml = recommend("yaml");
    println!("{yaml}");
    // The gRPC admin API (`--grpc`: the lab controller's, with the lab's admin certificate)
    // gives the same recommendation, byte for byte.
    let same = (0..5).any(|_| {
        let http = recommend("yaml");
        let grpc = run_ok(&[
            "policy",
            "recommend",
            "--lab",
            &s,
            "--grpc",
            "-n",
            "shop",
            "-n",
            "tools",
        ]);
        // A record that arrives between the questions changes an annotation: ask again.
        grpc == http && recommend("yaml") == http
    });
    assert!(same, "--grpc recommends otherwise than the HTTP API");
    assert_eq!(yaml.matches("kind: NetworkPolicy").count(), 4, "{yaml}");
    assert!(!yaml.contains("pod-template-hash"), "{yaml}");

    // Staged first: nothing changes, and the pattern shows no would-deny flow. A connection
    // outside the pattern (allowed now, denied by the recommendation) is the sync point.
    let staged_yaml = run_ok(&[
        "policy",
        "recommend",
        "--lab",
        &s,
        "-n",
        "shop",
        "-n",
        "tools",
        "--staged",
    ]);
    assert_eq!(
        staged_yaml.matches("kind: StagedNetworkPolicy").count(),
        4,
        "{staged_yaml}"
    );
    let staged = lab.dir.join("staged.yaml");
    std::fs::write(&staged, &staged_yaml).expect("write");
    run_ok(&[
        "lab",
        "--state",
        &s,
        "apply",
        "-f",
        &staged.to_string_lossy(),
    ]);
    for (from, to, port) in PATTERN {
        assert!(
            connects(&p[from], &p[to], port),
            "staged: {from} → {to}:{port}"
        );
    }
    assert!(
        connects(&p["shop/db"], &p["shop/api"], 8080),
        "staged: enforces nothing"
    );
    let would_deny = || -> Vec<(String, String, u16)> {
        run_ok(&[
            "flows",
            "--lab",
            &s,
            "--staged-verdict",
            "denied",
            "-o",
            "json",
        ])
        .lines()
        .map(|l| {
            let f: serde_json::Value = serde_json::from_str(l).expect("json");
            let (ep, peer) = (
                f["endpoint"].as_str().unwrap_or_default().to_string(),
                f["peer"].as_str().unwrap_or_default().to_string(),
            );
            let port = f["dst_port"].as_u64().unwrap_or_default() as u16;
            if f["direction"] == "ingress" {
                (peer, ep, port)
            } else {
                (ep, peer, port)
            }
        })
        .collect()
    };
    let started = Instant::now();
    let seen = loop {
        let seen = would_deny();
        if seen.contains(&("shop/db".into(), "shop/api".into(), 8080)) {
            break seen;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "db → api:8080 never showed as would-deny: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    for (from, to, port) in PATTERN {
        assert!(
            !seen.contains(&(from.into(), to.into(), port)),
            "{from} → {to}:{port} was observed, so the staged recommendation admits it: {seen:?}"
        );
    }
    // Promoted, one by one: the staged policies become the recommendation, enforced.
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&staged_yaml)
        .map(|d| serde::Deserialize::deserialize(d).expect("a YAML document"))
        .collect();
    for d in &docs {
        let target = format!(
            "{}/{}",
            d["metadata"]["namespace"].as_str().expect("namespace"),
            d["metadata"]["name"].as_str().expect("name")
        );
        let out = run_ok(&["policy", "promote", &target, "--lab", &s]);
        assert!(out.contains("promoted StagedNetworkPolicy"), "{out}");
    }
    // Exactly the enforced recommendation: applying it changes nothing.
    let file = lab.dir.join("recommended.yaml");
    std::fs::write(&file, &yaml).expect("write");
    // The lab's NetworkPolicies, by name (mappings compare whatever their key order).
    let policies = |lab: &TestLab| -> Vec<(String, serde_yaml::Value)> {
        let text = std::fs::read_to_string(lab.state.join("manifests").join("lab.yaml"))
            .unwrap_or_default();
        assert!(!text.contains("StagedNetworkPolicy"), "{text}");
        let mut out: Vec<(String, serde_yaml::Value)> = serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde::Deserialize::deserialize(d).expect("a YAML document"))
            .filter(|d: &serde_yaml::Value| d["kind"] == "NetworkPolicy")
            .map(|d| {
                (
                    d["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    d,
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    };
    let promoted = policies(&lab);
    assert_eq!(promoted.len(), 4, "{promoted:?}");
    run_ok(&["lab", "--state", &s, "apply", "-f", &file.to_string_lossy()]);
    let applied = policies(&lab);
    assert_eq!(applied.len(), promoted.len(), "{applied:?}");
    for ((name, p), (_, a)) in promoted.iter().zip(&applied) {
        assert_eq!(
            p["spec"], a["spec"],
            "{name}: the promoted policy is the recommendation"
        );
    }
    for port in [80, 8080, 5432] {
        let m = probe(&s, port);
        for (src, row) in &m {
            for (dst, &admitted) in row {
                if src == dst {
                    continue;
                }
                let observed = PATTERN.contains(&(src.as_str(), dst.as_str(), port));
                assert_eq!(
                    admitted, observed,
                    "{src} → {dst}:{port}: observed {observed}, admitted {admitted}\n{yaml}"
                );
            }
        }
    }
    for (from, to, port) in PATTERN {
        assert!(
            connects(&p[from], &p[to], port),
            "{from} → {to}:{port} still works"
        );
    }
}
