//! ClusterNetworkPolicy tiers, priorities and Pass; ServicePolicy; explanations.

mod common;

use bulkhead_controller::reachability::{Reachability, parse_pod_key};
use bulkhead_controller::ruleset::{Protocol, RuleKind, Verdict};
use common::*;

/// network-policy-api v0.3.0 graduated ClusterNetworkPolicy to `v1beta1` with the schema of
/// `v1alpha2`: the same policies in a file at either version compile to the same rule sets
/// on every node (and mixing the two in one file is fine).
#[test]
fn cluster_network_policy_v1beta1_and_v1alpha2_compile_to_the_same_rule_sets() {
    let policies = format!(
        "{}{}",
        cnp(
            "deny-y-to-x",
            "tier: Admin\npriority: 10\nsubject:\n  namespaces: {matchLabels: {ns: x}}\ningress:\n- action: Deny\n  from:\n  - namespaces: {matchLabels: {ns: y}}\n- action: Pass\n  from:\n  - namespaces: {matchLabels: {ns: z}}"
        ),
        cnp(
            "baseline-isolate",
            "tier: Baseline\npriority: 3\nsubject:\n  pods:\n    namespaceSelector: {}\n    podSelector: {matchLabels: {pod: a}}\negress:\n- action: Deny\n  to:\n  - networks: [10.0.3.0/24]"
        )
    );
    let alpha = "apiVersion: policy.networking.k8s.io/v1alpha2";
    let beta = "apiVersion: policy.networking.k8s.io/v1beta1";
    assert_eq!(policies.matches(alpha).count(), 2);
    let rulesets = |policies: &str| engine(&format!("{}{policies}", fixture())).rulesets();
    let at_alpha = rulesets(&policies);
    assert!(
        at_alpha.values().any(|rs| rs
            .rules
            .values()
            .any(|r| r.kind == RuleKind::ClusterNetworkPolicy && r.name == "baseline-isolate")),
        "the policies are in force"
    );
    let at_beta = rulesets(&policies.replace(alpha, beta));
    assert_eq!(at_alpha.len(), 2, "node-a and node-b");
    assert_eq!(at_alpha, at_beta);
    let mixed = rulesets(&policies.replacen(alpha, beta, 1));
    assert_eq!(at_alpha, mixed);
    // And they decide the same: y→x denied at either version.
    assert_matrix(&tcp80(&policies.replace(alpha, beta)), &tcp80(&policies));
}

#[test]
fn admin_deny_overrides_network_policy_allow() {
    let p = format!(
        "{}{}",
        np("x", "allow-all", "podSelector: {}\ningress:\n- {}"),
        cnp(
            "deny-y-to-x",
            "tier: Admin\npriority: 10\nsubject:\n  namespaces: {matchLabels: {ns: x}}\ningress:\n- action: Deny\n  from:\n  - namespaces: {matchLabels: {ns: y}}"
        )
    );
    assert_matrix(
        &tcp80(&p),
        &expect(|from, to| !(ns(to) == "x" && ns(from) == "y")),
    );
}

#[test]
fn admin_accept_overrides_network_policy_isolation() {
    let p = format!(
        "{}{}",
        np("x", "deny", "podSelector: {}\npolicyTypes: [Ingress]"),
        cnp(
            "accept-y",
            "tier: Admin\npriority: 10\nsubject:\n  namespaces: {}\ningress:\n- action: Accept\n  from:\n  - pods:\n      namespaceSelector: {matchLabels: {ns: y}}\n      podSelector: {matchLabels: {pod: a}}"
        )
    );
    assert_matrix(
        &tcp80(&p),
        &expect(|from, to| ns(to) != "x" || from == "y/a"),
    );
}

#[test]
fn pass_hands_over_to_network_policy_then_baseline() {
    let pass = cnp(
        "pass-y",
        "tier: Admin\npriority: 5\nsubject:\n  namespaces: {matchLabels: {ns: x}}\ningress:\n- action: Pass\n  from:\n  - namespaces: {matchLabels: {ns: y}}",
    );
    let deny_all = cnp(
        "admin-deny",
        "tier: Admin\npriority: 50\nsubject:\n  namespaces: {matchLabels: {ns: x}}\ningress:\n- action: Deny\n  from:\n  - namespaces: {}",
    );
    let baseline_deny = cnp(
        "baseline-deny",
        "tier: Baseline\npriority: 0\nsubject:\n  namespaces: {}\ningress:\n- action: Deny\n  from:\n  - namespaces: {matchLabels: {ns: y}}",
    );
    // y -> x passes the admin deny and then meets the baseline deny (no NetworkPolicy selects x);
    // the baseline also denies y to everyone else.
    assert_matrix(
        &tcp80(&format!("{pass}{deny_all}{baseline_deny}")),
        &expect(|from, to| ns(from) != "y" && ns(to) != "x"),
    );
    // A NetworkPolicy allowing y into x decides before the baseline.
    let allow = np(
        "x",
        "allow-y",
        "podSelector: {}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {ns: y}}",
    );
    assert_matrix(
        &tcp80(&format!("{pass}{deny_all}{baseline_deny}{allow}")),
        &expect(|from, to| {
            if ns(to) == "x" {
                ns(from) == "y"
            } else {
                ns(from) != "y"
            }
        }),
    );
}

#[test]
fn baseline_only_applies_to_pods_no_network_policy_isolates() {
    let base = cnp(
        "baseline-deny-all",
        "tier: Baseline\npriority: 1\nsubject:\n  namespaces: {}\ningress:\n- action: Deny\n  from:\n  - namespaces: {}",
    );
    let allow = np(
        "x",
        "allow-x",
        "podSelector: {}\ningress:\n- from:\n  - podSelector: {}",
    );
    assert_matrix(
        &tcp80(&format!("{base}{allow}")),
        &expect(|from, to| ns(to) == "x" && ns(from) == "x"),
    );
}

#[test]
fn lower_priority_number_wins_and_rule_order_counts_within_a_policy() {
    let accept = cnp(
        "p10-accept-y",
        "tier: Admin\npriority: 10\nsubject:\n  namespaces: {matchLabels: {ns: x}}\ningress:\n- action: Accept\n  from:\n  - namespaces: {matchLabels: {ns: y}}",
    );
    let deny = cnp(
        "p20-deny-all",
        "tier: Admin\npriority: 20\nsubject:\n  namespaces: {matchLabels: {ns: x}}\ningress:\n- action: Deny\n  from:\n  - namespaces: {}",
    );
    let expected = expect(|from, to| ns(to) != "x" || ns(from) == "y");
    assert_matrix(&tcp80(&format!("{accept}{deny}")), &expected);
    // The same as two rules of one policy: the earlier Accept beats the later Deny.
    let ordered = cnp(
        "ordered",
        "tier: Admin\npriority: 10\nsubject:\n  namespaces: {matchLabels: {ns: x}}\ningress:\n- action: Accept\n  from:\n  - namespaces: {matchLabels: {ns: y}}\n- action: Deny\n  from:\n  - namespaces: {}",
    );
    assert_matrix(&tcp80(&ordered), &expected);
    // Reversed order: the Deny comes first and wins for everyone.
    let reversed = cnp(
        "reversed",
        "tier: Admin\npriority: 10\nsubject:\n  namespaces: {matchLabels: {ns: x}}\ningress:\n- action: Deny\n  from:\n  - namespaces: {}\n- action: Accept\n  from:\n  - namespaces: {matchLabels: {ns: y}}",
    );
    assert_matrix(&tcp80(&reversed), &expect(|_, to| ns(to) != "x"));
}

#[test]
fn cnp_ports_ranges_and_networks() {
    let p = cnp(
        "deny-range",
        "tier: Admin\npriority: 1\nsubject:\n  pods:\n    namespaceSelector: {}\n    podSelector: {matchLabels: {pod: a}}\ningress:\n- action: Deny\n  from:\n  - namespaces: {}\n  protocols:\n  - tcp:\n      destinationPort:\n        range: {start: 79, end: 80}",
    );
    assert_matrix(&tcp80(&p), &expect(|_, to| name(to) != "a"));
    assert_matrix(&matrix(&p, Protocol::Tcp, 81), &expect(|_, _| true));
    assert_matrix(&matrix(&p, Protocol::Udp, 80), &expect(|_, _| true));
    let n = cnp(
        "deny-net",
        "tier: Admin\npriority: 1\nsubject:\n  namespaces: {matchLabels: {ns: x}}\negress:\n- action: Deny\n  to:\n  - networks: [10.0.2.0/24]",
    );
    assert_matrix(
        &tcp80(&n),
        &expect(|from, to| !(ns(from) == "x" && ns(to) == "y")),
    );
    let named = cnp(
        "deny-named",
        "tier: Admin\npriority: 1\nsubject:\n  namespaces: {}\ningress:\n- action: Deny\n  from:\n  - namespaces: {}\n  protocols:\n  - destinationNamedPort: serve-81-udp",
    );
    assert_matrix(&matrix(&named, Protocol::Udp, 81), &expect(|_, _| false));
    assert_matrix(&matrix(&named, Protocol::Tcp, 81), &expect(|_, _| true));
}

fn service_fixture() -> String {
    let mut out = String::new();
    for (name, sa, ip) in [
        ("api", "api", "10.5.0.1"),
        ("web", "web", "10.5.0.2"),
        ("batch", "batch", "10.5.0.3"),
    ] {
        out += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{namespace: shop, name: {name}, labels: {{app: {name}}}}}\nspec: {{nodeName: n1, serviceAccountName: {sa}}}\nstatus: {{podIP: {ip}}}\n"
        );
    }
    out += "---\napiVersion: v1\nkind: Pod\nmetadata: {namespace: ops, name: probe, labels: {app: probe}}\nspec: {nodeName: n2, serviceAccountName: probe}\nstatus: {podIP: 10.6.0.1}\n";
    out
}

fn allowed(yaml: &str, from: &str, to: &str) -> bool {
    let e = engine(&format!("{}{yaml}", service_fixture()));
    Reachability::new(&e)
        .allowed(
            &parse_pod_key(from).expect("key"),
            &parse_pod_key(to).expect("key"),
            Protocol::Tcp,
            8080,
        )
        .expect("known pods")
}

#[test]
fn service_policy_isolates_by_service_account_and_admits_named_services() {
    let p = sp(
        "shop",
        "api",
        "subject: {serviceAccount: api}\ningress:\n- from:\n  - service: {serviceAccount: web}\n  - service: {serviceAccount: probe, namespace: ops}\n  ports: [{protocol: TCP, port: 8080}]",
    );
    assert!(allowed(&p, "shop/web", "shop/api"));
    assert!(allowed(&p, "ops/probe", "shop/api"));
    assert!(!allowed(&p, "shop/batch", "shop/api"));
    assert!(
        allowed(&p, "shop/batch", "shop/web"),
        "only the subject is isolated"
    );
}

#[test]
fn service_policy_deny_beats_network_policy_allow() {
    let allow = np("shop", "allow-all", "podSelector: {}\ningress:\n- {}");
    let deny = sp(
        "shop",
        "no-batch",
        "subject: {podSelector: {matchLabels: {app: api}}}\ningress:\n- action: Deny\n  from:\n  - service: {serviceAccount: batch}",
    );
    let both = format!("{allow}{deny}");
    assert!(!allowed(&both, "shop/batch", "shop/api"));
    assert!(allowed(&both, "shop/web", "shop/api"));
    // A deny-only ServicePolicy does not isolate.
    assert!(allowed(&deny, "ops/probe", "shop/api"));
}

#[test]
fn audit_mode_reports_but_does_not_enforce() {
    let p = sp(
        "shop",
        "audit",
        "mode: Audit\nsubject: {serviceAccount: api}\ningress:\n- from:\n  - service: {serviceAccount: web}",
    );
    assert!(allowed(&p, "shop/batch", "shop/api"));
    let e = engine(&format!("{}{p}", service_fixture()));
    let x = Reachability::new(&e)
        .explain(
            &parse_pod_key("shop/batch").expect("key"),
            &parse_pod_key("shop/api").expect("key"),
            Protocol::Tcp,
            8080,
        )
        .expect("explains");
    assert_eq!(x.verdict, Verdict::Allow);
    let audit = x.ingress.audit.expect("audit note");
    assert!(
        audit.contains("would be denied") && audit.contains("ServicePolicy shop/audit"),
        "{audit}"
    );
}

#[test]
fn entities_world_cluster_host() {
    // Denying egress to the world leaves pod-to-pod traffic alone.
    let world = sp(
        "shop",
        "no-world",
        "subject: {}\negress:\n- action: Deny\n  to: [{entity: world}]",
    );
    assert!(allowed(&world, "shop/web", "ops/probe"));
    // Allowing only the cluster keeps pods reachable and isolates egress.
    let cluster = sp(
        "shop",
        "cluster-only",
        "subject: {}\negress:\n- to: [{entity: cluster}]",
    );
    assert!(allowed(&cluster, "shop/web", "ops/probe"));
    let host = sp(
        "shop",
        "host-only",
        "subject: {}\negress:\n- to: [{entity: host}]",
    );
    assert!(!allowed(&host, "shop/web", "ops/probe"));
    let e = engine(&format!("{}{world}", service_fixture()));
    // A node with a world entry carries every pod address, so no pod looks like the world.
    let rs = e.ruleset("n1").expect("n1");
    assert!(
        rs.ipcache
            .iter()
            .any(|c| c.cidr.to_string() == "10.6.0.1/32")
    );
}

#[test]
fn explain_gives_reasons_per_direction() {
    let p = format!(
        "{}{}",
        np(
            "x",
            "default-deny",
            "podSelector: {}\npolicyTypes: [Ingress]"
        ),
        np(
            "x",
            "allow-a",
            "podSelector: {matchLabels: {pod: b}}\ningress:\n- from:\n  - podSelector: {matchLabels: {pod: a}}"
        ),
    );
    let e = engine(&format!("{}{p}", fixture()));
    let r = Reachability::new(&e);
    let k = |s: &str| parse_pod_key(s).expect("key");
    let x = r
        .explain(&k("x/c"), &k("x/b"), Protocol::Tcp, 80)
        .expect("ok");
    assert_eq!(x.verdict, Verdict::Deny);
    assert_eq!(
        x.egress.reason,
        "no policy selects x/c for egress: allowed by default"
    );
    assert_eq!(
        x.ingress.reason,
        "x/b is isolated for ingress by NetworkPolicy x/default-deny; no rule admits 80/TCP from x/c"
    );
    let x = r
        .explain(&k("x/a"), &k("x/b"), Protocol::Tcp, 80)
        .expect("ok");
    assert_eq!(x.verdict, Verdict::Allow);
    assert_eq!(
        x.ingress.reason,
        "allowed by NetworkPolicy x/allow-a ingress[0]"
    );
}
