//! `bulkhead policy …` end to end: the real binary on manifest files.

use std::path::PathBuf;
use std::process::Command;

fn bulkhead() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bulkhead"))
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write test input");
    p
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bulkhead-policy-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

const INVENTORY: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: v1
kind: Pod
metadata: {namespace: x, name: a, labels: {pod: a}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {namespace: x, name: b, labels: {pod: b}}
spec: {nodeName: n2}
status: {podIP: 10.0.0.2}
";

const POLICIES: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: x, name: default-deny}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: x, name: allow-a}
spec:
  podSelector: {matchLabels: {pod: b}}
  ingress: [{from: [{podSelector: {matchLabels: {pod: a}}}], ports: [{port: 80}]}]
";

#[test]
fn evaluate_prints_the_exact_json_matrix() {
    let d = tempdir("evaluate");
    write(&d, "inventory.yaml", INVENTORY);
    write(&d, "policies.yml", POLICIES);
    let out = bulkhead()
        .args(["policy", "evaluate", "-f"])
        .arg(&d)
        .args(["--port", "80", "--protocol", "TCP", "-o", "json"])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        v,
        serde_json::json!({
            "x/a": {"x/a": false, "x/b": true},
            "x/b": {"x/a": false, "x/b": false},
        })
    );
    let out = bulkhead()
        .args(["policy", "evaluate", "-f"])
        .arg(&d)
        .args(["--port", "81"])
        .output()
        .expect("runs");
    let table = String::from_utf8_lossy(&out.stdout);
    // Nothing reaches port 81 of x/b, and x/a is isolated: no cell is allowed.
    let rows: Vec<&str> = table.lines().skip(2).collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(
        rows.iter().all(|r| r.contains('✗') && !r.contains('✓')),
        "{table}"
    );
}

#[test]
fn explain_names_the_deciding_rules() {
    let d = tempdir("explain");
    let f = write(&d, "all.yaml", &format!("{INVENTORY}\n---\n{POLICIES}"));
    let out = bulkhead()
        .args(["policy", "explain", "-f"])
        .arg(&f)
        .args(["--from", "x/b", "--to", "x/a", "--port", "80", "-o", "json"])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["verdict"], "deny");
    assert_eq!(v["egress"]["verdict"], "allow");
    assert_eq!(
        v["egress"]["reason"],
        "no policy selects x/b for egress: allowed by default"
    );
    assert_eq!(v["ingress"]["verdict"], "deny");
    let reason = v["ingress"]["reason"].as_str().expect("reason");
    assert!(
        reason.contains("x/a is isolated for ingress by NetworkPolicy x/default-deny"),
        "{reason}"
    );
    assert!(reason.contains("no rule admits"), "{reason}");
    let out = bulkhead()
        .args(["policy", "explain", "-f"])
        .arg(&f)
        .args(["--from", "x/a", "--to", "x/b"])
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("allowed by NetworkPolicy x/allow-a ingress[0]"),
        "{text}"
    );
    let out = bulkhead()
        .args(["policy", "explain", "-f"])
        .arg(&f)
        .args(["--from", "x/a", "--to", "x/zzz"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn compile_prints_rule_sets_the_agent_can_read() {
    let d = tempdir("compile");
    let f = write(&d, "all.yaml", &format!("{INVENTORY}\n---\n{POLICIES}"));
    let out = bulkhead()
        .args(["policy", "compile", "-f"])
        .arg(&f)
        .args(["--node", "n2"])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rs: bulkhead_controller::ruleset::RuleSet =
        serde_json::from_slice(&out.stdout).expect("a RuleSet");
    assert_eq!(rs.node, "n2");
    assert_eq!(rs.endpoints.len(), 1);
    assert!(rs.policy_of(&rs.endpoints[0]).ingress.isolated_by.is_some());
    let out = bulkhead()
        .args(["policy", "compile", "-f"])
        .arg(&f)
        .output()
        .expect("runs");
    let all: std::collections::BTreeMap<String, bulkhead_controller::ruleset::RuleSet> =
        serde_json::from_slice(&out.stdout).expect("rule sets by node");
    assert_eq!(all.keys().collect::<Vec<_>>(), vec!["n1", "n2"]);
}

#[test]
fn invalid_documents_are_reported_and_valid_ones_still_used() {
    let d = tempdir("invalid");
    let bad = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: x, name: bad}
spec:
  podSelector: {}
  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]
";
    let f = write(
        &d,
        "all.yaml",
        &format!("{INVENTORY}\n---\n{POLICIES}\n---\n{bad}"),
    );
    let out = bulkhead()
        .args(["policy", "evaluate", "-o", "json", "-f"])
        .arg(&f)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("all.yaml: document 6: spec.ingress[0].from[0].ipBlock.cidr:"),
        "{stderr}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["x/a"]["x/b"], true);
    let out = bulkhead()
        .args(["policy", "evaluate", "--protocol", "XTP", "-f"])
        .arg(&f)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn evaluate_and_explain_honour_quarantines() {
    let d = tempdir("quarantine");
    let quarantine = "
apiVersion: bulkhead.dev/v1alpha1
kind: Quarantine
metadata: {namespace: x, name: q1}
spec:
  pods: [a]
  reason: port scan from a
  allow: [{podSelector: {matchLabels: {pod: b}}, ports: [{port: 22, protocol: TCP}]}]
---
apiVersion: bulkhead.dev/v1alpha1
kind: Quarantine
metadata: {namespace: x, name: old}
spec: {pods: [b], reason: long over, expiresAt: '2000-01-01T00:00:00Z'}
";
    let f = write(
        &d,
        "all.yaml",
        &format!("{INVENTORY}\n---\n{POLICIES}\n---\n{quarantine}"),
    );
    let out = bulkhead()
        .args(["policy", "evaluate", "-f"])
        .arg(&f)
        .args(["--port", "80", "-o", "json"])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    // x/a may no longer reach x/b:80, which allow-a admits; the expired quarantine of x/b is
    // ignored.
    assert_eq!(
        v,
        serde_json::json!({
            "x/a": {"x/a": false, "x/b": false},
            "x/b": {"x/a": false, "x/b": false},
        })
    );
    let out = bulkhead()
        .args(["policy", "explain", "-f"])
        .arg(&f)
        .args(["--from", "x/a", "--to", "x/b", "--port", "80"])
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "egress  at x/a: denied — x/a is quarantined by Quarantine x/q1: port scan from a; 80/TCP to x/b is not one of its exceptions"
        ),
        "{text}"
    );
    let out = bulkhead()
        .args(["policy", "explain", "-f"])
        .arg(&f)
        .args(["--from", "x/b", "--to", "x/a", "--port", "22", "-o", "json"])
        .output()
        .expect("runs");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["ingress"]["verdict"], "allow");
    assert_eq!(
        v["ingress"]["reason"],
        "x/a is quarantined by Quarantine x/q1: port scan from a; allowed by its exception Quarantine x/q1 ingress[0]"
    );
    // default-deny isolates x/a, but the quarantine exception decides first.
    assert_eq!(v["verdict"], "allow");
}

#[test]
fn promote_needs_a_place_and_says_when_kubernetes_is_out_of_reach() {
    let out = bulkhead()
        .args(["policy", "promote", "shop/db"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--lab") && err.contains("--kubernetes"),
        "{err}"
    );

    let empty = tempdir("promote-kube");
    let out = bulkhead()
        .args(["policy", "promote", "shop/db", "--kubernetes"])
        .env("KUBECONFIG", empty.join("missing"))
        .env("HOME", &empty)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the Kubernetes API"), "{err}");

    let out = bulkhead()
        .args(["policy", "promote", "a/b/c", "--kubernetes"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NAMESPACE/NAME"), "{err}");
}

#[test]
fn explain_answers_for_a_destination_by_dns_name() {
    let d = tempdir("explain-name");
    write(&d, "inventory.yaml", INVENTORY);
    write(
        &d,
        "names.yaml",
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: x, name: isolate}
spec: {podSelector: {}, policyTypes: [Egress]}
---
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {name: to-api}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {matchLabels: {ns: x}}}
  egress:
  - action: Accept
    to: [{domainNames: ['*.example.com']}]
    protocols: [{tcp: {destinationPort: {number: 443}}}]
",
    );
    let explain = |name: &str, extra: &[&str]| {
        let out = bulkhead()
            .args(["policy", "explain", "-f"])
            .arg(&d)
            .args(["--from", "x/a", "--to-name", name, "--port", "443"])
            .args(extra)
            .output()
            .expect("runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, _) = explain("api.example.com", &["--address", "198.51.100.10"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("x/a -> api.example.com 443/TCP: allowed"),
        "{out}"
    );
    assert!(
        out.contains("ClusterNetworkPolicy to-api egress[0]"),
        "{out}"
    );
    let (_, out, _) = explain("example.com", &[]);
    assert!(out.contains("x/a -> example.com 443/TCP: denied"), "{out}");
    let (code, _, err) = explain("*.example.com", &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("is a pattern"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}
