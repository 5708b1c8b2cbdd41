//! The upstream e2e / cyclonus fixture: namespaces x, y, z (labeled ns=<name>), pods a, b, c in
//! each (labeled pod=<name>), every pod serving 80 and 81 over TCP and UDP on named ports.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use bulkhead_controller::reachability::{Reachability, assign_synthetic_ips};
use bulkhead_controller::ruleset::Protocol;
use bulkhead_controller::{EngineConfig, PolicyEngine, load_str};

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];

pub fn pod_ip(ns: &str, pod: &str) -> String {
    let n = NAMESPACES
        .iter()
        .position(|x| *x == ns)
        .expect("fixture ns")
        + 1;
    let p = PODS.iter().position(|x| *x == pod).expect("fixture pod") + 1;
    format!("10.0.{n}.{p}")
}

pub fn fixture() -> String {
    let mut out = String::new();
    for (i, ns) in NAMESPACES.iter().enumerate() {
        out += &format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n"
        );
        for pod in PODS {
            let node = if i % 2 == 0 { "node-a" } else { "node-b" };
            out += &format!(
                "---
apiVersion: v1
kind: Pod
metadata: {{namespace: {ns}, name: {pod}, labels: {{pod: {pod}}}}}
spec:
  nodeName: {node}
  containers:
  - name: c
    ports:
    - {{name: serve-80-tcp, containerPort: 80, protocol: TCP}}
    - {{name: serve-81-tcp, containerPort: 81, protocol: TCP}}
    - {{name: serve-80-udp, containerPort: 80, protocol: UDP}}
    - {{name: serve-81-udp, containerPort: 81, protocol: UDP}}
status: {{podIP: {ip}}}
",
                ip = pod_ip(ns, pod)
            );
        }
    }
    out
}

pub fn engine(yaml: &str) -> PolicyEngine {
    let loaded = load_str(Path::new("test.yaml"), yaml);
    assert!(
        loaded.errors.is_empty(),
        "fixture errors: {:?}",
        loaded.errors
    );
    let mut objects = loaded.objects;
    assign_synthetic_ips(&mut objects);
    PolicyEngine::new(EngineConfig::default(), objects).expect("compiles")
}

pub type Matrix = BTreeMap<String, BTreeMap<String, bool>>;

/// Reachability of the fixture plus `policies`.
pub fn matrix(policies: &str, protocol: Protocol, port: u16) -> Matrix {
    let e = engine(&format!("{}{}", fixture(), policies));
    Reachability::new(&e).matrix(protocol, port)
}

pub fn tcp80(policies: &str) -> Matrix {
    matrix(policies, Protocol::Tcp, 80)
}

/// The matrix `f(from, to)` gives, over the fixture pods.
pub fn expect(f: impl Fn(&str, &str) -> bool) -> Matrix {
    let mut out = Matrix::new();
    let all: Vec<String> = NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
        .collect();
    for from in &all {
        out.insert(
            from.clone(),
            all.iter().map(|to| (to.clone(), f(from, to))).collect(),
        );
    }
    out
}

/// Diff-friendly comparison: lists the cells that differ.
#[track_caller]
pub fn assert_matrix(actual: &Matrix, expected: &Matrix) {
    let mut wrong = Vec::new();
    for (from, row) in expected {
        for (to, want) in row {
            let got = actual.get(from).and_then(|r| r.get(to)).copied();
            if got != Some(*want) {
                wrong.push(format!("{from} -> {to}: expected {want}, got {got:?}"));
            }
        }
    }
    assert!(
        actual.len() == expected.len(),
        "matrix has {} rows",
        actual.len()
    );
    assert!(
        wrong.is_empty(),
        "{} wrong cells:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

pub fn ns(p: &str) -> &str {
    p.split('/').next().unwrap_or("")
}

pub fn name(p: &str) -> &str {
    p.split('/').nth(1).unwrap_or("")
}

pub fn np(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{namespace: {ns}, name: {name}}}\nspec:\n{}\n",
        indent(spec)
    )
}

pub fn cnp(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n{}\n",
        indent(spec)
    )
}

pub fn sp(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: bulkhead.dev/v1alpha1\nkind: ServicePolicy\nmetadata: {{namespace: {ns}, name: {name}}}\nspec:\n{}\n",
        indent(spec)
    )
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
