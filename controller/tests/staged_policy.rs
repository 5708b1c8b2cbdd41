//! Staged policies (issue 18): a StagedNetworkPolicy / StagedClusterNetworkPolicy never changes
//! a verdict; the staged view — what the verdict would be with them in force, each replacing
//! the enforced policy of its name — is computed beside it and names the staged rule.

mod common;

use bulkhead_controller::reachability::{Explanation, Reachability, parse_pod_key};
use bulkhead_controller::ruleset::{Protocol, Verdict};
use common::*;

fn snp(ns: &str, name: &str, spec: &str) -> String {
    np(ns, name, spec).replace(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy",
        "apiVersion: bulkhead.dev/v1alpha1\nkind: StagedNetworkPolicy",
    )
}

fn scnp(name: &str, spec: &str) -> String {
    cnp(name, spec).replace(
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy",
        "apiVersion: bulkhead.dev/v1alpha1\nkind: StagedClusterNetworkPolicy",
    )
}

fn explain(policies: &str, from: &str, to: &str, port: u16) -> Explanation {
    let e = engine(&format!("{}{policies}", fixture()));
    Reachability::new(&e)
        .explain(
            &parse_pod_key(from).expect("key"),
            &parse_pod_key(to).expect("key"),
            Protocol::Tcp,
            port,
        )
        .expect("known pods")
}

/// (enforced, staged) verdict of the ingress side, and the staged note.
fn ingress(policies: &str, from: &str, to: &str) -> (Verdict, Verdict, Option<String>) {
    let x = explain(policies, from, to, 80);
    (x.ingress.verdict, x.ingress.staged_verdict, x.ingress.audit)
}

/// The fixture's pods as `ns/name`.
fn pods() -> Vec<String> {
    let m = tcp80("");
    m.keys().cloned().collect()
}

#[test]
fn a_staged_network_policy_changes_no_verdict_and_reports_what_it_would_deny() {
    let staged = snp(
        "x",
        "only-from-x",
        "podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n  - podSelector: {}",
    );
    // Enforcement: exactly as without it.
    assert_matrix(&tcp80(&staged), &tcp80(""));
    let (v, s, note) = ingress(&staged, "y/a", "x/a");
    assert_eq!((v, s), (Verdict::Allow, Verdict::Deny));
    let note = note.expect("a staged note");
    assert!(
        note.contains("would be denied") && note.contains("StagedNetworkPolicy x/only-from-x"),
        "{note}"
    );
    // What the staged policy admits stays allowed in both views, with no note.
    let (v, s, note) = ingress(&staged, "x/b", "x/a");
    assert_eq!((v, s), (Verdict::Allow, Verdict::Allow));
    // … by the staged rule, where enforcement allows by default: the note names it.
    let note = note.expect("the deciding rule differs");
    assert!(
        note.contains("would be allowed by StagedNetworkPolicy x/only-from-x ingress[0]"),
        "{note}"
    );
}

#[test]
fn the_staged_view_equals_enforcing_the_staged_policy() {
    // For every pair of fixture pods: the staged verdict with the policy staged equals the
    // enforced verdict with the same policy enforced.
    let spec = "podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {ns: y}}\negress:\n- to:\n  - podSelector: {matchLabels: {pod: b}}";
    let staged = snp("x", "p", spec);
    let enforced = np("x", "p", spec);
    let es = engine(&format!("{}{staged}", fixture()));
    let ee = engine(&format!("{}{enforced}", fixture()));
    let (rs, re) = (Reachability::new(&es), Reachability::new(&ee));
    let all = pods();
    assert!(all.len() >= 6, "{all:?}");
    for from in &all {
        for to in &all {
            let (f, t) = (parse_pod_key(from).unwrap(), parse_pod_key(to).unwrap());
            let s = rs.explain(&f, &t, Protocol::Tcp, 80).unwrap();
            let e = re.explain(&f, &t, Protocol::Tcp, 80).unwrap();
            for (sd, ed) in [(&s.egress, &e.egress), (&s.ingress, &e.ingress)] {
                assert_eq!(sd.staged_verdict, ed.verdict, "{from} -> {to}");
                assert_eq!(
                    sd.verdict,
                    Verdict::Allow,
                    "{from} -> {to}: nothing enforced"
                );
            }
        }
    }
}

#[test]
fn a_staged_policy_replaces_the_enforced_one_of_its_name_in_the_staged_view() {
    // Enforced: x/a admits only x/b. Staged edit of the same policy: x/a admits only x/c.
    let enforced = np(
        "x",
        "a-ingress",
        "podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n  - podSelector: {matchLabels: {pod: b}}",
    );
    let staged = snp(
        "x",
        "a-ingress",
        "podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n  - podSelector: {matchLabels: {pod: c}}",
    );
    let both = format!("{enforced}{staged}");
    // Enforcement unchanged by the staged edit.
    assert_matrix(&tcp80(&both), &tcp80(&enforced));
    // x/b: allowed now, denied once the edit is promoted (not "still allowed by the old one").
    let (v, s, note) = ingress(&both, "x/b", "x/a");
    assert_eq!((v, s), (Verdict::Allow, Verdict::Deny), "{note:?}");
    assert!(
        note.as_deref()
            .is_some_and(|n| n.contains("StagedNetworkPolicy x/a-ingress")),
        "{note:?}"
    );
    // x/c: denied now, allowed once promoted.
    let (v, s, _) = ingress(&both, "x/c", "x/a");
    assert_eq!((v, s), (Verdict::Deny, Verdict::Allow));
    // A staged policy that selects nobody the enforced one selected: the staged view does not
    // isolate x/a any more.
    let elsewhere = snp(
        "x",
        "a-ingress",
        "podSelector: {matchLabels: {pod: nobody}}\ningress: []",
    );
    let (v, s, _) = ingress(&format!("{enforced}{elsewhere}"), "y/c", "x/a");
    assert_eq!((v, s), (Verdict::Deny, Verdict::Allow));
    // Deleting the staged policy brings the staged view back to the enforced one: order of
    // objects does not matter either.
    let (v, s, note) = ingress(&format!("{staged}{enforced}"), "x/b", "x/a");
    assert_eq!((v, s), (Verdict::Allow, Verdict::Deny), "{note:?}");
    let (v, s, note) = ingress(&enforced, "x/b", "x/a");
    assert_eq!((v, s, note), (Verdict::Allow, Verdict::Allow, None));
}

#[test]
fn what_the_staged_view_denies_by_default_is_blamed_on_the_staged_policy() {
    // x/a is isolated by an enforced catch-all and admits x/b by a-ingress; the staged edit of
    // a-ingress admits x/c instead. x/b → x/a would be denied: by the staged edit, not by the
    // catch-all that isolated x/a all along.
    let all = np(
        "x",
        "all-isolated",
        "podSelector: {}\npolicyTypes: [Ingress]",
    );
    let enforced = np(
        "x",
        "a-ingress",
        "podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n  - podSelector: {matchLabels: {pod: b}}",
    );
    let staged = snp(
        "x",
        "a-ingress",
        "podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n  - podSelector: {matchLabels: {pod: c}}",
    );
    let (v, s, note) = ingress(&format!("{all}{enforced}{staged}"), "x/b", "x/a");
    assert_eq!((v, s), (Verdict::Allow, Verdict::Deny));
    let note = note.expect("a staged note");
    assert!(
        note.contains("StagedNetworkPolicy x/a-ingress") && !note.contains("all-isolated"),
        "{note}"
    );
    // Without a staged policy isolating, the enforced isolation is blamed as before.
    let (v, s, note) = ingress(&format!("{all}{enforced}"), "y/b", "x/a");
    assert_eq!((v, s, note), (Verdict::Deny, Verdict::Deny, None));
}

#[test]
fn a_staged_cluster_network_policy_reports_admin_denies() {
    let staged = scnp(
        "no-y-to-x",
        "tier: Admin\npriority: 5\nsubject:\n  namespaces: {matchLabels: {ns: x}}\ningress:\n- action: Deny\n  from:\n  - namespaces: {matchLabels: {ns: y}}",
    );
    assert_matrix(&tcp80(&staged), &tcp80(""));
    let (v, s, note) = ingress(&staged, "y/a", "x/b");
    assert_eq!((v, s), (Verdict::Allow, Verdict::Deny));
    assert!(
        note.as_deref()
            .is_some_and(|n| n.contains("StagedClusterNetworkPolicy no-y-to-x")),
        "{note:?}"
    );
}

#[test]
fn invalid_staged_policies_are_reported_at_their_field() {
    let bad = snp(
        "x",
        "bad",
        "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Sideways]",
    );
    let loaded = bulkhead_controller::load::load_str(std::path::Path::new("t.yaml"), &bad);
    assert!(loaded.objects.is_empty());
    let text = loaded.errors[0].to_string();
    assert!(
        text.contains("spec.policyTypes[0]") && text.contains("Sideways"),
        "{text}"
    );
    let wrong_version = bad.replace("bulkhead.dev/v1alpha1", "networking.k8s.io/v1");
    let loaded =
        bulkhead_controller::load::load_str(std::path::Path::new("t.yaml"), &wrong_version);
    assert!(
        loaded.errors[0]
            .to_string()
            .contains("apiVersion bulkhead.dev/v1alpha1"),
        "{:?}",
        loaded.errors
    );
}

#[test]
fn staging_and_unstaging_on_a_running_engine_matches_a_fresh_build() {
    use bulkhead_controller::Change;
    use bulkhead_controller::model::{Object, PolicyKey};
    use bulkhead_controller::ruleset::RuleKind;

    let enforced = np(
        "x",
        "a-ingress",
        "podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n  - podSelector: {matchLabels: {pod: b}}",
    );
    let staged = snp(
        "x",
        "a-ingress",
        "podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n  - podSelector: {matchLabels: {pod: c}}",
    );
    let mut e = engine(&format!("{}{enforced}", fixture()));
    let loaded = bulkhead_controller::load::load_str(std::path::Path::new("s.yaml"), &staged);
    let Some(Object::Policy(policy)) = loaded.objects.into_iter().next() else {
        panic!("a staged policy: {:?}", loaded.errors);
    };
    let staged_view = |e: &bulkhead_controller::PolicyEngine, from: &str| {
        let x = Reachability::new(e)
            .explain(
                &parse_pod_key(from).unwrap(),
                &parse_pod_key("x/a").unwrap(),
                Protocol::Tcp,
                80,
            )
            .unwrap();
        (x.ingress.verdict, x.ingress.staged_verdict)
    };
    e.apply(Change::UpsertPolicy(policy)).expect("staged");
    assert_eq!(staged_view(&e, "x/b"), (Verdict::Allow, Verdict::Deny));
    assert_eq!(staged_view(&e, "x/c"), (Verdict::Deny, Verdict::Allow));
    e.apply(Change::DeletePolicy(PolicyKey {
        kind: RuleKind::StagedNetworkPolicy,
        namespace: "x".into(),
        name: "a-ingress".into(),
    }))
    .expect("unstaged");
    assert_eq!(staged_view(&e, "x/b"), (Verdict::Allow, Verdict::Allow));
    assert_eq!(staged_view(&e, "x/c"), (Verdict::Deny, Verdict::Deny));
}
