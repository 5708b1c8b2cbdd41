//! The what-if on the demo shop: frontend → backend:8080, backend → db:5432 (each seen at both
//! ends), debug → backend:8080 (denied at the backend), frontend → 192.0.2.7:443 (denied by
//! `no-world`).

use std::{path::Path, time::SystemTime};

use super::*;
use crate::{
    load_str,
    ruleset::{FlowKind, FlowRule},
};

const SHOP: &str = include_str!("../../../examples/demo/shop.yaml");
const POLICIES: &str = include_str!("../../../examples/demo/policies.yaml");

fn shop() -> (Vec<Object>, SystemTime) {
    let mut objects = load_str(Path::new("shop.yaml"), SHOP).objects;
    let policies = load_str(Path::new("policies.yaml"), POLICIES);
    assert!(policies.errors.is_empty(), "{:?}", policies.errors);
    objects.extend(policies.objects);
    let now = SystemTime::now();
    // As the controller would hand them over: through a live engine.
    let engine = PolicyEngine::new_at(EngineConfig::default(), objects, now).expect("compile");
    (engine.objects(), now)
}

fn rec(
    endpoint: &str,
    direction: Direction,
    (src, dst): (&str, &str),
    port: u16,
    verdict: FlowVerdict,
    peer: Option<&str>,
) -> FlowRecord {
    FlowRecord {
        time_unix_nanos: 1_700_000_000_000_000_000,
        endpoint: endpoint.parse().expect("endpoint"),
        direction,
        src: src.parse().expect("ip"),
        dst: dst.parse().expect("ip"),
        src_port: 40000,
        dst_port: port,
        protocol: 6,
        kind: if verdict == FlowVerdict::Denied {
            FlowKind::Denied
        } else {
            FlowKind::New
        },
        verdict,
        rule: FlowRule::DefaultAllow,
        rule_id: 0,
        local_identity: 0,
        peer_identity: 0,
        peer: peer.map(|p| p.parse().expect("pod")),
        reason: if verdict == FlowVerdict::Denied {
            FlowReason::DeniedPolicy
        } else {
            FlowReason::AllowedNew
        },
        packets: 1,
        bytes: 60,
        peer_names: Vec::new(),
        staged: None,
    }
}

const FRONTEND: &str = "10.203.0.10";
const BACKEND: &str = "10.203.0.20";
const DB: &str = "10.203.0.30";
const DEBUG: &str = "10.203.0.40";

fn traffic() -> Edges {
    use Direction::{Egress, Ingress};
    use FlowVerdict::{Allowed, Denied};
    let mut records = Vec::new();
    for _ in 0..3 {
        records.push(rec(
            "shop/frontend",
            Egress,
            (FRONTEND, BACKEND),
            8080,
            Allowed,
            Some("shop/backend"),
        ));
        records.push(rec(
            "shop/backend",
            Ingress,
            (FRONTEND, BACKEND),
            8080,
            Allowed,
            Some("shop/frontend"),
        ));
    }
    records.push(rec(
        "shop/backend",
        Egress,
        (BACKEND, DB),
        5432,
        Allowed,
        Some("shop/db"),
    ));
    records.push(rec(
        "shop/db",
        Ingress,
        (BACKEND, DB),
        5432,
        Allowed,
        Some("shop/backend"),
    ));
    records.push(rec(
        "tools/debug",
        Egress,
        (DEBUG, BACKEND),
        8080,
        Allowed,
        Some("shop/backend"),
    ));
    records.push(rec(
        "shop/backend",
        Ingress,
        (DEBUG, BACKEND),
        8080,
        Denied,
        Some("tools/debug"),
    ));
    records.push(rec(
        "shop/frontend",
        Egress,
        (FRONTEND, "192.0.2.7"),
        443,
        Denied,
        None,
    ));
    // A pod that is gone, and a packet no policy judged.
    records.push(rec(
        "shop/old",
        Egress,
        ("10.203.0.99", DB),
        5432,
        Allowed,
        Some("shop/db"),
    ));
    let mut malformed = rec("shop/db", Ingress, (BACKEND, DB), 5432, Denied, None);
    malformed.reason = FlowReason::DropMalformed;
    records.push(malformed);
    Edges::fold(records)
}

/// A ServicePolicy that denies the backend at the db.
const DB_LOCKDOWN: &str = r#"
apiVersion: bulkhead.dev/v1alpha1
kind: ServicePolicy
metadata: {name: db-lockdown, namespace: shop}
spec:
  subject: {serviceAccount: db}
  ingress:
  - action: Deny
    from: [{service: {serviceAccount: backend}}]
"#;

/// The same, in audit mode.
const DB_AUDIT: &str = r#"
apiVersion: bulkhead.dev/v1alpha1
kind: ServicePolicy
metadata: {name: db-audit, namespace: shop}
spec:
  mode: Audit
  subject: {serviceAccount: db}
  ingress:
  - action: Deny
    from: [{service: {serviceAccount: backend}}]
"#;

fn what_if(yaml: &str, deletes: &[&str]) -> Impact {
    let (objects, now) = shop();
    let deletes: Vec<String> = deletes.iter().map(|d| d.to_string()).collect();
    let proposal = parse_proposal(yaml, &deletes).expect("a valid proposal");
    WhatIf::new(EngineConfig::default(), objects, now, &proposal)
        .expect("compile")
        .replay(&traffic())
}

fn edge<'a>(i: &'a Impact, src: &str, dst: &str, at: &str) -> &'a EdgeImpact {
    i.changed
        .iter()
        .find(|e| e.src == src && e.dst == dst && e.at == at)
        .unwrap_or_else(|| panic!("no changed edge {src} -> {dst} at {at}: {i:#?}"))
}

#[test]
fn the_engines_objects_compile_to_the_same_rule_sets() {
    let mut objects = load_str(Path::new("shop.yaml"), SHOP).objects;
    objects.extend(load_str(Path::new("policies.yaml"), POLICIES).objects);
    let now = SystemTime::now();
    let engine = PolicyEngine::new_at(EngineConfig::default(), objects, now).expect("compile");
    let again =
        PolicyEngine::new_at(EngineConfig::default(), engine.objects(), now).expect("compile");
    assert_eq!(engine.rulesets(), again.rulesets());
}

#[test]
fn an_added_deny_breaks_observed_traffic_and_names_the_rule() {
    let i = what_if(DB_LOCKDOWN, &[]);
    assert_eq!(i.proposal.added, ["ServicePolicy/shop/db-lockdown"]);
    assert_eq!(i.records, 13);
    assert_eq!(i.not_replayed, 1, "the malformed packet");
    assert_eq!(i.unknown_pods, 1, "shop/old is gone");
    assert_eq!(i.changed.len(), 1, "{i:#?}");
    let e = edge(&i, "shop/backend", "shop/db", "shop/db");
    assert_eq!(e.change, EdgeChange::NewlyDenied);
    assert!(e.breaks);
    assert_eq!((e.allowed, e.denied, e.port), (1, 0, 5432));
    assert_eq!(e.protocol, "TCP");
    assert_eq!(e.before.verdict, Verdict::Allow);
    assert_eq!(e.before.rule, "ServicePolicy shop/db ingress[0]");
    assert_eq!(e.after.verdict, Verdict::Deny);
    assert_eq!(e.after.rule, "ServicePolicy shop/db-lockdown ingress[0]");
    assert_eq!(i.breaks, 1);
}

#[test]
fn an_edit_that_closes_a_port_breaks_the_edges_that_used_it() {
    let i = what_if(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: backend-api, namespace: shop}
spec:
  podSelector: {matchLabels: {app: backend}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: frontend}}}]
    ports: [{port: 9090}]
  egress:
  - to: [{podSelector: {matchLabels: {app: db}}}]
    ports: [{port: 5432, protocol: TCP}]
"#,
        &[],
    );
    assert_eq!(i.proposal.changed, ["NetworkPolicy/shop/backend-api"]);
    assert_eq!(i.changed.len(), 1, "{i:#?}");
    let e = edge(&i, "shop/frontend", "shop/backend", "shop/backend");
    assert_eq!(e.direction, Direction::Ingress);
    assert!(e.breaks);
    assert_eq!(e.allowed, 3, "three connections observed");
    assert_eq!(e.before.rule, "NetworkPolicy shop/backend-api ingress[0]");
    assert_eq!(e.after.verdict, Verdict::Deny);
    assert!(
        e.after.rule.ends_with("ingress default-deny"),
        "{}",
        e.after.rule
    );
}

#[test]
fn a_deletion_that_only_changes_the_deciding_rule_is_reported_as_such() {
    // frontend → world stays denied without `no-world`, by the shop's default deny.
    let i = what_if("", &["ServicePolicy/shop/no-world"]);
    assert_eq!(i.proposal.deleted, ["ServicePolicy/shop/no-world"]);
    assert_eq!(i.changed.len(), 1, "{i:#?}");
    let e = edge(&i, "shop/frontend", "192.0.2.7", "shop/frontend");
    assert_eq!(e.change, EdgeChange::Rule);
    assert!(!e.breaks);
    assert_eq!(
        (e.before.verdict, e.after.verdict),
        (Verdict::Deny, Verdict::Deny)
    );
    assert_eq!(e.before.rule, "ServicePolicy shop/no-world egress[0]");
    assert!(
        e.after.rule.ends_with("egress default-deny"),
        "{}",
        e.after.rule
    );
    assert_eq!(i.breaks, 0);
}

#[test]
fn a_deletion_that_opens_and_closes_edges() {
    // Without backend-api the default deny holds the backend in both directions.
    let i = what_if("", &["networkpolicy/shop/backend-api"]);
    let ingress = edge(&i, "shop/frontend", "shop/backend", "shop/backend");
    assert!(ingress.breaks);
    let egress = edge(&i, "shop/backend", "shop/db", "shop/backend");
    assert!(egress.breaks);
    assert_eq!(i.breaks, 2, "{i:#?}");
    // Breaking edges come first.
    assert!(i.changed[0].breaks && i.changed[1].breaks);
}

#[test]
fn a_proposal_that_opens_a_denied_edge_does_not_break_anything() {
    let i = what_if(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: debug-to-backend, namespace: shop}
spec:
  podSelector: {matchLabels: {app: backend}}
  policyTypes: [Ingress]
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: platform}}}]
    ports: [{port: 8080}]
"#,
        &[],
    );
    assert_eq!(i.changed.len(), 1, "{i:#?}");
    let e = edge(&i, "tools/debug", "shop/backend", "shop/backend");
    assert_eq!(e.change, EdgeChange::NewlyAllowed);
    assert_eq!((e.allowed, e.denied), (0, 1));
    assert_eq!(
        e.after.rule,
        "NetworkPolicy shop/debug-to-backend ingress[0]"
    );
    assert_eq!(i.breaks, 0);
}

#[test]
fn a_proposal_equal_to_the_current_policies_changes_nothing() {
    let i = what_if(POLICIES, &[]);
    assert_eq!(i.proposal.unchanged.len(), 6, "{:?}", i.proposal);
    assert!(i.proposal.added.is_empty() && i.proposal.changed.is_empty());
    assert!(i.changed.is_empty(), "{i:#?}");
    assert_eq!(i.edges, 8, "shop/old's edge is folded too");
    // A policy for pods that saw no traffic: added, and no edge changes.
    let i = what_if(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: nothing-here, namespace: elsewhere}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"#,
        &[],
    );
    assert_eq!(i.proposal.added, ["NetworkPolicy/elsewhere/nothing-here"]);
    assert!(i.changed.is_empty(), "{i:#?}");
}

#[test]
fn an_audit_policy_shows_what_it_would_deny() {
    let i = what_if(DB_AUDIT, &[]);
    assert_eq!(i.changed.len(), 1, "{i:#?}");
    let e = &i.changed[0];
    assert_eq!(e.change, EdgeChange::Audit);
    assert!(!e.breaks);
    assert_eq!(e.after.verdict, Verdict::Allow);
    assert_eq!(
        e.after.audit_would_deny.as_deref(),
        Some("ServicePolicy shop/db-audit ingress[0]")
    );
}

#[test]
fn malformed_proposals_are_refused_with_what_is_wrong() {
    let err = |yaml: &str, deletes: &[&str]| {
        let deletes: Vec<String> = deletes.iter().map(|d| d.to_string()).collect();
        parse_proposal(yaml, &deletes)
            .expect_err("refused")
            .to_string()
    };
    let e = err("kind: [unclosed", &[]);
    assert!(e.contains("not valid YAML"), "{e}");
    let e = err(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: shop}\nspec:\n  podSelector: {}\n  ingress:\n  - ports: [{port: 70000}]\n",
        &[],
    );
    assert!(e.contains("document 1") && e.contains("ingress"), "{e}");
    let e = err(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop}\nspec: {containers: []}\n",
        &[],
    );
    assert!(e.contains("Pod shop/p"), "{e}");
    assert!(err("", &[]).contains("empty"));
    assert!(err("# only a comment\n", &[]).contains("empty"));
    for bad in [
        "NetworkPolicy/x",
        "Pod/shop/x",
        "ClusterNetworkPolicy/a/b",
        "NetworkPolicy//x",
        "NetworkPolicy/shop/",
    ] {
        assert!(err("", &[bad]).contains("KIND/NAMESPACE/NAME"), "{bad}");
    }
    let both = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: shop}\nspec: {podSelector: {}}\n";
    assert!(err(both, &["NetworkPolicy/shop/x"]).contains("both changes and deletes"));
    // Deleting what does not exist is found against the current policies.
    let (objects, now) = shop();
    let p = parse_proposal("", &["NetworkPolicy/shop/nope".into()]).expect("parsed");
    let e = WhatIf::new(EngineConfig::default(), objects, now, &p)
        .err()
        .expect("no such policy")
        .to_string();
    assert_eq!(e, "delete NetworkPolicy/shop/nope: there is no such policy");
    assert!(matches!(
        parse_proposal(&"#".repeat(MAX_PROPOSAL_BYTES + 1), &[]),
        Err(ProposalError::TooLarge(_))
    ));
}

/// The gRPC admin API's `Impact` carries the answer so that it converts back to the same value:
/// changed rules, newly denied and audit edges, the proposal summary.
#[test]
fn an_impact_survives_the_wire() {
    use bulkhead_proto::{prost::Message, v1 as pb};
    let mut answers = vec![what_if(DB_LOCKDOWN, &[]), what_if(DB_AUDIT, &[])];
    answers[1].from_history = true;
    for i in answers {
        assert!(!i.changed.is_empty());
        let bytes = pb::ImpactResponse::from(&i).encode_to_vec();
        let back = Impact::try_from(pb::ImpactResponse::decode(&bytes[..]).unwrap())
            .expect("converts back");
        assert_eq!(back, i);
    }
}

/// Policies to delete named by their parts are checked as `KIND/NAMESPACE/NAME` strings are.
#[test]
fn deletions_by_key_are_checked() {
    let key = |kind, ns: &str, name: &str| PolicyKey {
        kind,
        namespace: ns.into(),
        name: name.into(),
    };
    for bad in [
        key(RuleKind::NetworkPolicy, "", "x"),
        key(RuleKind::ClusterNetworkPolicy, "shop", "x"),
        key(RuleKind::ServicePolicy, "shop", ""),
        key(RuleKind::Quarantine, "shop", "x"),
    ] {
        assert!(
            matches!(
                proposal("", vec![bad.clone()]),
                Err(ProposalError::BadDelete(_))
            ),
            "{bad:?}"
        );
    }
    assert_eq!(
        parse_delete("ClusterNetworkPolicy/x").unwrap(),
        key(RuleKind::ClusterNetworkPolicy, "", "x")
    );
}
