//! Tier 3: `bulkhead lab` — real namespaces, agents, controller. The lab's probe (real TCP
//! connections across two nodes) agrees with `bulkhead policy evaluate` on upstream-style
//! scenarios (three namespaces × three pods, after the Kubernetes NetworkPolicy documentation
//! and the upstream conformance matrix); `lab down` leaves nothing behind; a bad manifest gives
//! the policy engine's errors and creates nothing.

mod common;

use common::*;

use std::{collections::BTreeMap, path::Path, process::Command, time::Instant};

use bulkhead_agent::privileged::check_privileged_test;

type Matrix = BTreeMap<String, BTreeMap<String, bool>>;

const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {ns: y}}
---
apiVersion: v1
kind: Namespace
metadata: {name: z, labels: {ns: z}}
"#;

fn pods_yaml() -> String {
    let mut out = String::from(BASE);
    for (ni, ns) in ["x", "y", "z"].iter().enumerate() {
        for (pi, pod) in ["a", "b", "c"].iter().enumerate() {
            out += &format!(
                r#"---
apiVersion: v1
kind: Pod
metadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}
spec:
  nodeName: node-{node}
  containers:
  - name: cont
    image: agnhost
    ports:
    - {{name: serve-80-tcp, containerPort: 80, protocol: TCP}}
    - {{name: serve-81-tcp, containerPort: 81, protocol: TCP}}
status: {{podIP: 10.241.{ni}.{ip}}}
"#,
                node = 1 + (ni * 3 + pi) % 2,
                ip = 10 + pi
            );
        }
    }
    out
}

/// (name, policy YAML) — each applied alone on top of the pods.
fn scenarios() -> Vec<(&'static str, String)> {
    let np = |ns: &str, name: &str, spec: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
        )
    };
    vec![
        ("no policy", String::new()),
        (
            "default deny ingress in x",
            np("x", "deny", "  podSelector: {}\n  policyTypes: [Ingress]\n"),
        ),
        (
            "allow from the same namespace",
            np(
                "x",
                "same-ns",
                "  podSelector: {}\n  ingress:\n  - from: [{podSelector: {}}]\n",
            ),
        ),
        (
            "namespace selector",
            np(
                "x",
                "from-y",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]\n",
            ),
        ),
        (
            "namespace AND pod selector in one peer",
            np(
                "x",
                "and",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]\n",
            ),
        ),
        (
            "namespace OR pod selector in two peers",
            np(
                "x",
                "or",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: y}}}, {podSelector: {matchLabels: {pod: b}}}]\n",
            ),
        ),
        (
            "named port",
            np(
                "x",
                "named",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports: [{port: serve-81-tcp}]\n",
            ),
        ),
        (
            "port range with endPort",
            np(
                "y",
                "range",
                "  podSelector: {}\n  ingress:\n  - ports: [{port: 79, endPort: 80, protocol: TCP}]\n",
            ),
        ),
        (
            "ipBlock with except",
            np(
                "x",
                "cidr",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.241.0.0/16, except: [10.241.1.0/24]}}]\n",
            ),
        ),
        (
            "egress to pod b anywhere on 80",
            np(
                "x",
                "egress",
                "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: b}}}]\n    ports: [{port: 80}]\n",
            ),
        ),
        (
            "deny all egress in z",
            np(
                "z",
                "deny-egress",
                "  podSelector: {}\n  policyTypes: [Egress]\n",
            ),
        ),
    ]
}

fn run_ok(args: &[&str], files: &[&Path]) -> String {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    for f in files {
        cmd.arg("-f").arg(f);
    }
    let out = cmd.output().expect("run bulkhead");
    assert!(
        out.status.success(),
        "bulkhead {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn without_self(mut m: Matrix) -> Matrix {
    for (src, row) in m.iter_mut() {
        row.remove(src);
    }
    m
}

fn leftovers(state: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/var/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with(&netns_prefix(state)) {
            found.push(format!("netns {name}"));
        }
    }
    for entry in std::fs::read_dir("/sys/fs/bpf/bulkhead")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with(&pin_prefix(state)) {
            found.push(format!("pins {name}"));
        }
    }
    let needle = state.to_string_lossy().to_string();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            let zombie = std::fs::read_to_string(entry.path().join("stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true);
            if cmd.contains(&needle)
                && cmd.contains("bulkhead")
                && !cmd.contains("lab_e2e")
                && !zombie
            {
                found.push(format!("process {cmd}"));
            }
        }
    }
    if state.exists() {
        found.push(format!("state {}", state.display()));
    }
    found
}

// The lab's naming, restated here so the test checks it independently of the code under test.
fn tag(dir: &Path) -> String {
    let mut h: u32 = 0x811c9dc5;
    for b in dir.to_string_lossy().bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    format!("{:04x}", h & 0xffff)
}
fn netns_prefix(dir: &Path) -> String {
    format!("bhl{}-", tag(dir))
}
fn pin_prefix(dir: &Path) -> String {
    format!("lab{}-", tag(dir))
}

#[test]
fn lab_probe_agrees_with_policy_evaluate_and_down_leaves_nothing() {
    if !check_privileged_test("lab_probe_agrees_with_policy_evaluate_and_down_leaves_nothing") {
        return;
    }
    let tmp = std::env::temp_dir().join(format!("bh-lab-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("tmp");
    let state = tmp.join("state");
    let state_arg = state.to_string_lossy().to_string();
    let _down = LabDown(state.clone());
    let pods = tmp.join("pods.yaml");
    std::fs::write(&pods, pods_yaml()).expect("write pods");

    // A bad manifest: the policy engine's errors, and nothing created.
    let bad = tmp.join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: broken, namespace: x}\nspec:\n  podSelector: {matchExpressions: [{key: pod, operator: In}]}\n",
    )
    .expect("write bad");
    let out = Command::new(bin())
        .args(["lab", "--state", &state_arg, "up", "-f"])
        .arg(&pods)
        .arg("-f")
        .arg(&bad)
        .output()
        .expect("lab up");
    assert!(!out.status.success(), "a bad manifest must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let evaluate = Command::new(bin())
        .args([
            "policy",
            "evaluate",
            "--port",
            "80",
            "--protocol",
            "TCP",
            "-f",
        ])
        .arg(&bad)
        .output()
        .expect("evaluate");
    let evaluate_err = String::from_utf8_lossy(&evaluate.stderr);
    let first_error = evaluate_err
        .lines()
        .next()
        .expect("evaluate reports the error");
    assert!(
        stderr.contains(first_error),
        "lab up: {stderr}\nevaluate: {evaluate_err}"
    );
    assert!(
        leftovers(&state).is_empty(),
        "a failed lab up left {:?}",
        leftovers(&state)
    );

    // Nine pods on two nodes.
    let started = Instant::now();
    run_ok(
        &[
            "lab",
            "--state",
            &state_arg,
            "up",
            "--nodes",
            "2",
            "--port-base",
            "19760",
        ],
        &[&pods],
    );
    println!(
        "lab up of 9 pods on 2 nodes: {:.2} s (target ≤ 10 s)",
        started.elapsed().as_secs_f64()
    );

    for (name, policy) in scenarios() {
        let policy_file = tmp.join("policy.yaml");
        let files: Vec<&Path> = if policy.is_empty() {
            vec![&pods]
        } else {
            std::fs::write(&policy_file, &policy).expect("write policy");
            run_ok(&["lab", "--state", &state_arg, "apply"], &[&policy_file]);
            vec![&pods, &policy_file]
        };
        for port in ["80", "81"] {
            let started = Instant::now();
            let probed: Matrix = serde_json::from_str(&run_ok(
                &[
                    "lab",
                    "--state",
                    &state_arg,
                    "probe",
                    "--port",
                    port,
                    "--protocol",
                    "TCP",
                    "-o",
                    "json",
                ],
                &[],
            ))
            .expect("probe json");
            let probe_time = started.elapsed();
            let mut args = vec![
                "policy",
                "evaluate",
                "--port",
                port,
                "--protocol",
                "TCP",
                "-o",
                "json",
            ];
            args.push("--default-node");
            args.push("node-1");
            let expected: Matrix =
                serde_json::from_str(&run_ok(&args, &files)).expect("evaluate json");
            assert_eq!(probed.len(), 9, "{name}: the probe covers all nine pods");
            assert_eq!(
                without_self(probed),
                without_self(expected),
                "scenario {name:?}, port {port}: the lab's real connections disagree with policy evaluate"
            );
            println!(
                "scenario {name:?} port {port}: probe ({:.1} s) agrees with evaluate",
                probe_time.as_secs_f64()
            );
        }
        if !policy.is_empty() {
            run_ok(&["lab", "--state", &state_arg, "delete"], &[&policy_file]);
        }
    }

    // The probes above left flows: the graph shows denied edges naming their rules, and
    // `bulkhead flows` names pods on other nodes too.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let graph: serde_json::Value =
        serde_json::from_str(&run_ok(&["graph", "--lab", &state_arg, "-o", "json"], &[]))
            .expect("graph json");
    let denied_edge = graph["edges"].as_array().expect("edges").iter().any(|e| {
        e["denied"].as_u64().unwrap_or(0) > 0
            && e["rules"]
                .as_object()
                .is_some_and(|r| r.keys().any(|k| k.contains("NetworkPolicy x/")))
    });
    assert!(denied_edge, "no denied edge naming a policy of x: {graph}");
    let flows = run_ok(
        &[
            "flows",
            "--lab",
            &state_arg,
            "--verdict",
            "denied",
            "--namespace",
            "x",
            "-o",
            "json",
        ],
        &[],
    );
    assert!(
        flows
            .lines()
            .any(|l| l.contains(r#""peer":"y/"#) || l.contains(r#""peer":"z/"#)),
        "denied flows name their peers: {flows}"
    );

    let started = Instant::now();
    run_ok(&["lab", "--state", &state_arg, "down"], &[]);
    println!(
        "lab down: {:.2} s (target ≤ 5 s)",
        started.elapsed().as_secs_f64()
    );
    assert!(
        leftovers(&state).is_empty(),
        "lab down left {:?}",
        leftovers(&state)
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Dual-stack: the same agreement over IPv6, across two nodes.
#[test]
fn lab_ipv6_probe_agrees_with_policy_evaluate() {
    if !check_privileged_test("lab_ipv6_probe_agrees_with_policy_evaluate") {
        return;
    }
    let tmp = std::env::temp_dir().join(format!("bh-lab6-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("tmp");
    let state = tmp.join("state");
    let state_arg = state.to_string_lossy().to_string();
    let _down = LabDown(state.clone());
    let manifests = tmp.join("v6.yaml");
    std::fs::write(
        &manifests,
        r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: v6, labels: {app: a}}
spec: {nodeName: node-1, containers: [{name: c, image: x, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: v6, labels: {app: b}}
spec: {nodeName: node-2, containers: [{name: c, image: x, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: v6, labels: {app: c}}
spec: {nodeName: node-1, containers: [{name: c, image: x, ports: [{containerPort: 80}]}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-a, namespace: v6}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress: [{from: [{podSelector: {matchLabels: {app: a}}}]}]
"#,
    )
    .expect("write");
    run_ok(
        &[
            "lab",
            "--state",
            &state_arg,
            "up",
            "--ipv6",
            "--port-base",
            "19720",
        ],
        &[&manifests],
    );
    let probed: Matrix = serde_json::from_str(&run_ok(
        &[
            "lab", "--state", &state_arg, "probe", "--port", "80", "--ipv6", "-o", "json",
        ],
        &[],
    ))
    .expect("probe json");
    let expected: Matrix = serde_json::from_str(&run_ok(
        &[
            "policy",
            "evaluate",
            "--port",
            "80",
            "--protocol",
            "TCP",
            "-o",
            "json",
        ],
        &[&manifests],
    ))
    .expect("evaluate json");
    assert_eq!(
        without_self(probed),
        without_self(expected),
        "IPv6 probe vs evaluate"
    );
    run_ok(&["lab", "--state", &state_arg, "down"], &[]);
    assert!(
        leftovers(&state).is_empty(),
        "lab down left {:?}",
        leftovers(&state)
    );
    let _ = std::fs::remove_dir_all(&tmp);
}
