//! NetworkPolicy semantics, modeled on the upstream docs and the e2e / cyclonus matrix.

mod common;

use bulkhead_controller::ruleset::Protocol;
use common::*;

#[test]
fn no_policy_allows_everything() {
    assert_matrix(&tcp80(""), &expect(|_, _| true));
}

#[test]
fn default_deny_ingress_isolates_only_selected_pods() {
    let p = np("x", "deny", "podSelector: {}\npolicyTypes: [Ingress]");
    // Including a pod talking to itself.
    assert_matrix(&tcp80(&p), &expect(|_, to| ns(to) != "x"));
}

#[test]
fn allow_from_same_namespace() {
    let p = np(
        "x",
        "same-ns",
        "podSelector: {}\ningress:\n- from:\n  - podSelector: {}",
    );
    assert_matrix(
        &tcp80(&p),
        &expect(|from, to| ns(to) != "x" || ns(from) == "x"),
    );
}

#[test]
fn allow_from_namespace_selector() {
    let p = np(
        "x",
        "from-y",
        "podSelector: {}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {ns: y}}",
    );
    assert_matrix(
        &tcp80(&p),
        &expect(|from, to| ns(to) != "x" || ns(from) == "y"),
    );
}

#[test]
fn implicit_namespace_name_label_selects() {
    let p = np(
        "x",
        "from-z",
        "podSelector: {}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: z}}",
    );
    assert_matrix(
        &tcp80(&p),
        &expect(|from, to| ns(to) != "x" || ns(from) == "z"),
    );
}

#[test]
fn pod_and_namespace_selector_in_one_peer_is_and() {
    let p = np(
        "x",
        "and",
        "podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {ns: y}}\n    podSelector: {matchLabels: {pod: b}}",
    );
    assert_matrix(&tcp80(&p), &expect(|from, to| to != "x/a" || from == "y/b"));
}

#[test]
fn pod_and_namespace_selector_in_two_peers_is_or() {
    let p = np(
        "x",
        "or",
        "podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {ns: y}}\n  - podSelector: {matchLabels: {pod: b}}",
    );
    assert_matrix(
        &tcp80(&p),
        &expect(|from, to| to != "x/a" || ns(from) == "y" || from == "x/b"),
    );
}

#[test]
fn match_expressions_select() {
    let p = np(
        "x",
        "expr",
        "podSelector: {matchExpressions: [{key: pod, operator: NotIn, values: [a]}]}\ningress:\n- from:\n  - namespaceSelector: {matchExpressions: [{key: ns, operator: In, values: [y, z]}]}\n    podSelector: {matchExpressions: [{key: pod, operator: Exists}]}",
    );
    assert_matrix(
        &tcp80(&p),
        &expect(|from, to| ns(to) != "x" || name(to) == "a" || ns(from) != "x"),
    );
}

#[test]
fn named_port_is_resolved_on_the_destination_with_its_protocol() {
    let p = np(
        "x",
        "named",
        "podSelector: {}\ningress:\n- ports:\n  - {port: serve-81-tcp}",
    );
    assert_matrix(&matrix(&p, Protocol::Tcp, 81), &expect(|_, _| true));
    assert_matrix(&tcp80(&p), &expect(|_, to| ns(to) != "x"));
    // serve-80-udp exists but is UDP: a TCP rule naming it matches nothing.
    let p = np(
        "x",
        "named-udp",
        "podSelector: {}\ningress:\n- ports:\n  - {port: serve-80-udp, protocol: TCP}",
    );
    assert_matrix(&tcp80(&p), &expect(|_, to| ns(to) != "x"));
    let p = np(
        "x",
        "named-udp",
        "podSelector: {}\ningress:\n- ports:\n  - {port: serve-80-udp, protocol: UDP}",
    );
    assert_matrix(&matrix(&p, Protocol::Udp, 80), &expect(|_, _| true));
    assert_matrix(
        &matrix(&p, Protocol::Udp, 81),
        &expect(|_, to| ns(to) != "x"),
    );
}

#[test]
fn named_port_per_destination_pod_in_egress() {
    // x/a's "web" is 80, x/b's "web" is 81: an egress rule to port "web" allows exactly those.
    let pods = "---
apiVersion: v1
kind: Pod
metadata: {namespace: w, name: a, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: web, containerPort: 80}]}]}
status: {podIP: 10.9.0.1}
---
apiVersion: v1
kind: Pod
metadata: {namespace: w, name: b, labels: {app: web}}
spec: {nodeName: n2, containers: [{name: c, ports: [{name: web, containerPort: 81}]}]}
status: {podIP: 10.9.0.2}
---
apiVersion: v1
kind: Pod
metadata: {namespace: w, name: client, labels: {app: client}}
spec: {nodeName: n1}
status: {podIP: 10.9.0.3}
";
    let p = np(
        "w",
        "egress-web",
        "podSelector: {matchLabels: {app: client}}\npolicyTypes: [Egress]\negress:\n- ports:\n  - {port: web}",
    );
    let e = engine(&format!("{pods}{p}"));
    let r = bulkhead_controller::reachability::Reachability::new(&e);
    let key = |n: &str| bulkhead_controller::reachability::parse_pod_key(n).expect("key");
    let ok = |to: &str, port| {
        r.allowed(&key("w/client"), &key(to), Protocol::Tcp, port)
            .expect("known")
    };
    assert!(ok("w/a", 80));
    assert!(!ok("w/a", 81));
    assert!(ok("w/b", 81));
    assert!(!ok("w/b", 80));
}

#[test]
fn end_port_ranges() {
    let p = np(
        "x",
        "range",
        "podSelector: {}\ningress:\n- ports:\n  - {port: 79, endPort: 80}",
    );
    assert_matrix(&tcp80(&p), &expect(|_, _| true));
    assert_matrix(
        &matrix(&p, Protocol::Tcp, 81),
        &expect(|_, to| ns(to) != "x"),
    );
    assert_matrix(
        &matrix(&p, Protocol::Udp, 80),
        &expect(|_, to| ns(to) != "x"),
    );
}

#[test]
fn protocol_only_port_entry_allows_every_port_of_it() {
    let p = np(
        "x",
        "udp",
        "podSelector: {}\ningress:\n- ports:\n  - {protocol: UDP}",
    );
    assert_matrix(&matrix(&p, Protocol::Udp, 81), &expect(|_, _| true));
    assert_matrix(&tcp80(&p), &expect(|_, to| ns(to) != "x"));
}

#[test]
fn ip_block_with_except_matches_pod_addresses() {
    let p = np(
        "x",
        "cidr",
        "podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n  - ipBlock: {cidr: 10.0.0.0/16, except: [10.0.2.0/24]}",
    );
    assert_matrix(
        &tcp80(&p),
        &expect(|from, to| to != "x/a" || ns(from) != "y"),
    );
}

#[test]
fn ip_block_of_one_pod_splits_an_identity_exactly() {
    // x/a and x/a2 share labels (one identity without the ipBlock); only x/a's address is allowed.
    let extra = "---
apiVersion: v1
kind: Pod
metadata: {namespace: x, name: a2, labels: {pod: a}}
spec: {nodeName: node-a}
status: {podIP: 10.0.1.9}
";
    let p = np(
        "y",
        "only-xa",
        "podSelector: {}\ningress:\n- from:\n  - ipBlock: {cidr: 10.0.1.1/32}",
    );
    let e = engine(&format!("{}{extra}{p}", fixture()));
    let key = |n: &str| bulkhead_controller::reachability::parse_pod_key(n).expect("key");
    assert_ne!(
        e.identity_of_pod(&key("x/a")),
        e.identity_of_pod(&key("x/a2"))
    );
    let r = bulkhead_controller::reachability::Reachability::new(&e);
    assert!(
        r.allowed(&key("x/a"), &key("y/b"), Protocol::Tcp, 80)
            .expect("known")
    );
    assert!(
        !r.allowed(&key("x/a2"), &key("y/b"), Protocol::Tcp, 80)
            .expect("known")
    );
}

#[test]
fn egress_policy_restricts_the_source() {
    let p = np(
        "x",
        "egress",
        "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Egress]\negress:\n- to:\n  - podSelector: {matchLabels: {pod: b}}",
    );
    assert_matrix(&tcp80(&p), &expect(|from, to| from != "x/a" || to == "x/b"));
}

#[test]
fn egress_to_ip_block_except_pod_range() {
    let p = np(
        "x",
        "egress-ext",
        "podSelector: {}\npolicyTypes: [Egress]\negress:\n- to:\n  - ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/16]}",
    );
    assert_matrix(&tcp80(&p), &expect(|from, _| ns(from) != "x"));
}

#[test]
fn both_sides_must_allow() {
    let p = format!(
        "{}{}",
        np("y", "deny-egress", "podSelector: {}\npolicyTypes: [Egress]"),
        np(
            "x",
            "allow-from-y",
            "podSelector: {}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {ns: y}}"
        )
    );
    assert_matrix(
        &tcp80(&p),
        &expect(|from, to| ns(from) != "y" && (ns(to) != "x" || ns(from) == "y")),
    );
}

#[test]
fn policy_types_default_from_rules() {
    // Egress rules without policyTypes: both directions isolated.
    let p = np(
        "x",
        "both",
        "podSelector: {matchLabels: {pod: a}}\negress:\n- to:\n  - podSelector: {matchLabels: {pod: b}}",
    );
    assert_matrix(
        &tcp80(&p),
        &expect(|from, to| (from != "x/a" || to == "x/b") && to != "x/a"),
    );
    // policyTypes [Egress] with ingress rules: ingress rules are ignored, ingress stays open.
    let p = np(
        "x",
        "egress-only",
        "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Egress]\ningress:\n- from:\n  - podSelector: {matchLabels: {pod: c}}\negress:\n- {}",
    );
    assert_matrix(&tcp80(&p), &expect(|_, _| true));
}

#[test]
fn empty_versus_absent() {
    // One empty rule: allow everything.
    assert_matrix(
        &tcp80(&np("x", "p", "podSelector: {}\ningress:\n- {}")),
        &expect(|_, _| true),
    );
    // from: [] and ports: [] mean "all".
    assert_matrix(
        &tcp80(&np(
            "x",
            "p",
            "podSelector: {}\ningress:\n- from: []\n  ports: []",
        )),
        &expect(|_, _| true),
    );
    // ingress: [] denies all ingress.
    assert_matrix(
        &tcp80(&np("x", "p", "podSelector: {}\ningress: []")),
        &expect(|_, to| ns(to) != "x"),
    );
    // egress: [] with policyTypes [Egress] denies all egress.
    assert_matrix(
        &tcp80(&np(
            "x",
            "p",
            "podSelector: {}\npolicyTypes: [Egress]\negress: []",
        )),
        &expect(|from, _| ns(from) != "x"),
    );
}

#[test]
fn policies_are_a_union() {
    let p = format!(
        "{}{}",
        np(
            "x",
            "from-y",
            "podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {ns: y}}"
        ),
        np(
            "x",
            "from-z",
            "podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {ns: z}}"
        ),
    );
    assert_matrix(
        &tcp80(&p),
        &expect(|from, to| to != "x/a" || ns(from) != "x"),
    );
}

#[test]
fn a_policy_in_one_namespace_does_not_select_pods_of_another() {
    let p = np(
        "y",
        "deny",
        "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Ingress]",
    );
    assert_matrix(&tcp80(&p), &expect(|_, to| to != "y/a"));
}
