//! Egress by DNS name, the controller side (issue 19): ClusterNetworkPolicy `domainNames` and
//! ServicePolicy `fqdn` are validated as NPEP-133 specifies, compile to entries keyed by name
//! identities, reach exactly the nodes whose pods they select (with their patterns), and decide
//! with the one precedence when a destination was learned as a name.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use bulkhead_controller::ruleset::{
    self, Direction, NamePattern, PacketTuple, Protocol, RuleKind, RuleSet, Verdict,
    decide_with_names, identity, name_identity,
};
use bulkhead_controller::{Change, InputError, Object, load_str};
use common::*;

fn errors(yaml: &str) -> Vec<(String, String)> {
    load_str(Path::new("in.yaml"), yaml)
        .errors
        .into_iter()
        .map(|e| match e {
            InputError::Invalid { path, reason, .. } => (path, reason),
            other => (String::new(), other.to_string()),
        })
        .collect()
}

#[track_caller]
fn assert_error(yaml: &str, path: &str, reason: &str) {
    let errs = errors(yaml);
    assert!(
        errs.iter().any(|(p, r)| p == path && r.contains(reason)),
        "expected {path}: …{reason}… in {errs:#?}"
    );
}

fn admin_egress(action: &str, peer: &str) -> String {
    cnp(
        "names",
        &format!(
            "tier: Admin\npriority: 5\nsubject:\n  namespaces: {{matchLabels: {{ns: x}}}}\negress:\n- action: {action}\n  to:\n  - {peer}\n  protocols: [{{tcp: {{destinationPort: {{number: 443}}}}}}]"
        ),
    )
}

fn pattern(s: &str) -> NamePattern {
    NamePattern::parse(s).expect("a valid pattern")
}

#[test]
fn domain_names_are_egress_accept_admin_only_and_valid_dns_names() {
    let at = "spec.egress[0].to[0].domainNames";
    assert!(
        errors(&admin_egress(
            "Accept",
            "domainNames: [api.example.com, '*.Example.ORG.']"
        ))
        .is_empty()
    );
    assert_error(
        &admin_egress("Deny", "domainNames: [api.example.com]"),
        at,
        "only allowed in Accept rules",
    );
    assert_error(
        &admin_egress("Pass", "domainNames: [api.example.com]"),
        at,
        "only allowed in Accept rules",
    );
    assert_error(
        &admin_egress("Accept", "domainNames: []"),
        at,
        "at least one name",
    );
    assert_error(
        &admin_egress("Accept", "domainNames: [api.example.com]")
            .replace("tier: Admin", "tier: Baseline"),
        at,
        "only allowed in the Admin tier",
    );
    let ingress = cnp(
        "names",
        "tier: Admin\npriority: 5\nsubject:\n  namespaces: {}\ningress:\n- action: Accept\n  from:\n  - domainNames: [api.example.com]",
    );
    assert_error(
        &ingress,
        "spec.ingress[0].from[0].domainNames",
        "only allowed in egress rules",
    );
    for (name, reason) in [
        ("com", "single label"),
        ("'*.com'", "single label"),
        ("'api.*.example.com'", "'*'"),
        ("'*example.com'", "'*'"),
        ("api_.example.com", "begins or ends"),
        ("'api!.example.com'", "character '!'"),
        ("-api.example.com", "begins or ends"),
        ("api..example.com", "empty label"),
    ] {
        assert_error(
            &admin_egress("Accept", &format!("domainNames: [api.example.com, {name}]")),
            &format!("{at}[1]"),
            reason,
        );
    }
    let long = format!("{}.com", "a".repeat(64));
    assert_error(
        &admin_egress("Accept", &format!("domainNames: [{long}]")),
        &format!("{at}[0]"),
        "at most 63",
    );
    assert_error(
        &admin_egress("Accept", "domainNames: [api.example.com]").replace(
            "protocols: [{tcp: {destinationPort: {number: 443}}}]",
            "protocols: [{destinationNamedPort: https}]",
        ),
        "spec.egress[0].protocols[0].destinationNamedPort",
        "domainNames peers cannot be used with named ports",
    );
    assert_error(
        &admin_egress(
            "Accept",
            "{domainNames: [api.example.com], networks: [10.0.0.0/8]}",
        ),
        "spec.egress[0].to[0]",
        "exactly one of namespaces, pods, networks, nodes or domainNames",
    );
}

#[test]
fn service_policy_fqdn_peers_are_allow_egress_with_the_same_matching() {
    let egress = |rule: &str| sp("x", "s", &format!("egress:\n- {rule}"));
    assert!(
        errors(&egress(
            "to: [{fqdn: {matchName: API.example.com}}, {fqdn: {matchPattern: '*.example.org'}}]"
        ))
        .is_empty()
    );
    let at = "spec.egress[0].to[0].fqdn";
    assert_error(
        &egress("{action: Deny, to: [{fqdn: {matchName: api.example.com}}]}"),
        at,
        "only allowed in Allow rules",
    );
    assert_error(
        &sp(
            "x",
            "s",
            "ingress:\n- from: [{fqdn: {matchName: api.example.com}}]",
        ),
        "spec.ingress[0].from[0].fqdn",
        "only allowed in egress rules",
    );
    assert_error(
        &egress("to: [{fqdn: {}}]"),
        at,
        "exactly one of matchName or matchPattern",
    );
    assert_error(
        &egress("to: [{fqdn: {matchName: a.example.com, matchPattern: '*.example.com'}}]"),
        at,
        "exactly one of matchName or matchPattern",
    );
    assert_error(
        &egress("to: [{fqdn: {matchName: '*.example.com'}}]"),
        &format!("{at}.matchName"),
        "write it as matchPattern",
    );
    assert_error(
        &egress("to: [{fqdn: {matchPattern: example.com}}]"),
        &format!("{at}.matchPattern"),
        "no leading \"*.\"",
    );
    assert_error(
        &egress("to: [{fqdn: {matchPattern: '*.com'}}]"),
        &format!("{at}.matchPattern"),
        "single label",
    );
    assert_error(
        &egress("to: [{fqdn: {matchName: a.example.com}, cidr: 10.0.0.0/8}]"),
        "spec.egress[0].to[0]",
        "exactly one of service, cidr, entity or fqdn",
    );
}

/// x's pods (on node-a) may reach api.example.com and *.example.org on 443 by an Admin Accept;
/// a NetworkPolicy isolates x's egress.
fn named_policies() -> String {
    format!(
        "{}{}",
        admin_egress("Accept", "domainNames: [api.example.com, '*.Example.org.']"),
        np("x", "isolate", "podSelector: {}\npolicyTypes: [Egress]")
    )
}

fn packet(ruleset: &RuleSet, pod: &str, dst: &str, port: u16) -> (ruleset::Endpoint, PacketTuple) {
    let (ns, name) = pod.split_once('/').expect("ns/pod");
    let ep = ruleset
        .endpoint_by_name(ns, name)
        .expect("endpoint")
        .clone();
    let packet = PacketTuple {
        src: ep.ips[0],
        dst: dst.parse().expect("ip"),
        protocol: Some(Protocol::Tcp),
        dst_port: Some(port),
    };
    (ep, packet)
}

#[test]
fn names_reach_only_the_nodes_whose_pods_they_select_keyed_by_name_identity() {
    let e = engine(&format!("{}{}", fixture(), named_policies()));
    let a = e.ruleset("node-a").expect("node-a");
    let b = e.ruleset("node-b").expect("node-b");
    let api = pattern("api.example.com");
    let org = pattern("*.example.org");
    let want: BTreeSet<(u32, String)> = [&api, &org]
        .into_iter()
        .map(|p| (name_identity(p), p.to_string()))
        .collect();
    let got: BTreeSet<(u32, String)> = a
        .names
        .iter()
        .map(|n| (n.identity, n.pattern.to_string()))
        .collect();
    assert_eq!(got, want);
    assert!(a.names.is_sorted(), "sorted by identity");
    assert!(b.names.is_empty(), "node-b has no pod of x: {:?}", b.names);
    // x's egress entries by name name their rule; no address maps to a name identity.
    let ep = a.endpoint_by_name("x", "a").expect("x/a");
    let egress = &a.policy_of(ep).egress;
    for id in [name_identity(&api), name_identity(&org)] {
        let e = egress
            .entries
            .iter()
            .find(|e| e.peer == id)
            .unwrap_or_else(|| panic!("an entry for {id:#x}"));
        let rule = &a.rules[&e.rule];
        assert_eq!(
            (
                rule.kind.clone(),
                rule.name.as_str(),
                rule.direction,
                rule.index
            ),
            (
                RuleKind::ClusterNetworkPolicy,
                "names",
                Direction::Egress,
                Some(0)
            )
        );
        assert_eq!(
            (e.protocol, e.ports.first, e.ports.last),
            (Some(Protocol::Tcp), 443, 443)
        );
    }
    assert!(a.ipcache.iter().all(|c| !identity::is_name(c.identity)));
    // z's pods are on node-a too, but their policy names nothing.
    let z = a.endpoint_by_name("z", "a").expect("z/a");
    assert!(
        a.policy_of(z)
            .egress
            .entries
            .iter()
            .all(|e| !identity::is_name(e.peer))
    );
}

#[test]
fn a_learned_name_decides_with_the_one_precedence() {
    let e = engine(&format!("{}{}", fixture(), named_policies()));
    let a = e.ruleset("node-a").expect("node-a");
    let api = name_identity(&pattern("api.example.com"));
    let (ep, to_api) = packet(&a, "x/a", "203.0.113.5", 443);
    // Admin Accept by name beats the NetworkPolicy's default deny…
    let d = decide_with_names(&a, &ep, Direction::Egress, &to_api, &[api]);
    assert_eq!(d.verdict, Verdict::Allow);
    assert_eq!(a.rules[&d.rule].name, "names");
    // …the address alone, or another port, is denied by it.
    let d = decide_with_names(&a, &ep, Direction::Egress, &to_api, &[]);
    assert_eq!(
        (d.verdict, a.rules[&d.rule].name.as_str()),
        (Verdict::Deny, "isolate")
    );
    let (_, to_api_80) = packet(&a, "x/a", "203.0.113.5", 80);
    let d = decide_with_names(&a, &ep, Direction::Egress, &to_api_80, &[api]);
    assert_eq!(d.verdict, Verdict::Deny);
    // A stronger Admin deny of the address still denies.
    let deny_world = cnp(
        "deny-world",
        "tier: Admin\npriority: 1\nsubject:\n  namespaces: {}\negress:\n- action: Deny\n  to:\n  - networks: [0.0.0.0/0]",
    );
    let e = engine(&format!("{}{}{deny_world}", fixture(), named_policies()));
    let a = e.ruleset("node-a").expect("node-a");
    let (ep, to_api) = packet(&a, "x/a", "203.0.113.5", 443);
    let d = decide_with_names(&a, &ep, Direction::Egress, &to_api, &[api]);
    assert_eq!(
        (d.verdict, a.rules[&d.rule].name.as_str()),
        (Verdict::Deny, "deny-world")
    );
}

fn policy_objects(yaml: &str) -> Vec<bulkhead_controller::Policy> {
    load_str(Path::new("p.yaml"), yaml)
        .objects
        .into_iter()
        .filter_map(|o| match o {
            Object::Policy(p) => Some(p),
            _ => None,
        })
        .collect()
}

#[test]
fn deltas_add_and_remove_patterns_as_the_full_rule_sets_do() {
    let mut e = engine(&format!(
        "{}{}",
        fixture(),
        np("x", "isolate", "podSelector: {}\npolicyTypes: [Egress]")
    ));
    let mut before = e.rulesets();
    let sp_names = sp(
        "x",
        "to-api",
        "egress:\n- to: [{fqdn: {matchName: api.example.com}}, {fqdn: {matchPattern: '*.example.net'}}]",
    );
    let [added] = policy_objects(&sp_names).try_into().expect("one policy");
    let key = added.key.clone();
    for change in [Change::UpsertPolicy(added), Change::DeletePolicy(key)] {
        let deltas = e.apply(change).expect("applies");
        let after = e.rulesets();
        for d in &deltas {
            let rs = before.get_mut(&d.node).expect("known node");
            rs.apply_delta(d).expect("delta applies");
        }
        assert_eq!(before, after, "deltas give the full rule sets");
        let a_delta = deltas.iter().find(|d| d.node == "node-a");
        assert!(deltas.iter().all(
            |d| d.node == "node-a" || (d.names_added.is_empty() && d.names_removed.is_empty())
        ));
        assert!(
            a_delta.is_some_and(|d| d.names_added.len() + d.names_removed.len() == 2),
            "{deltas:#?}"
        );
    }
    assert!(before["node-a"].names.is_empty());
}

#[test]
fn a_pattern_whose_identity_another_pattern_has_admits_nothing() {
    // Find two patterns with the same name identity (a birthday search in 2^28).
    let mut seen = std::collections::HashMap::new();
    let (first, second) = (0u32..)
        .find_map(|i| {
            let p = pattern(&format!("n{i}.example.com"));
            let id = name_identity(&p);
            seen.insert(id, p.clone()).map(|q| (q, p))
        })
        .expect("a collision");
    let policies = |a: &NamePattern, b: &NamePattern| {
        format!(
            "{}{}",
            sp(
                "x",
                "one",
                &format!("egress:\n- to: [{{fqdn: {{matchName: {a}}}}}]")
            ),
            sp(
                "x",
                "two",
                &format!("egress:\n- to: [{{fqdn: {{matchName: {b}}}}}]")
            )
        )
    };
    let e = engine(&format!("{}{}", fixture(), policies(&first, &second)));
    let a = e.ruleset("node-a").expect("node-a");
    assert_eq!(a.names.len(), 1, "one number, one pattern: {:?}", a.names);
    let ids: Vec<u32> = a.names.iter().map(|n| n.identity).collect();
    assert_eq!(ids, vec![name_identity(&first)]);
    // The number's entries come from one policy only: the other's peer admits nothing.
    let ep = a.endpoint_by_name("x", "a").expect("x/a");
    let owners: BTreeSet<String> = a
        .policy_of(ep)
        .egress
        .entries
        .iter()
        .filter(|e| identity::is_name(e.peer))
        .map(|e| a.rules[&e.rule].name.clone())
        .collect();
    assert_eq!(owners.len(), 1, "{owners:?}");
    let pattern_of_owner = if owners.contains("one") {
        &first
    } else {
        &second
    };
    assert_eq!(&a.names[0].pattern, pattern_of_owner);
}

#[test]
fn policy_explain_answers_for_a_name() {
    use bulkhead_controller::reachability::{Reachability, parse_pod_key};
    let e = engine(&format!("{}{}", fixture(), named_policies()));
    let reach = Reachability::new(&e);
    let from = parse_pod_key("x/a").expect("pod");
    let address = "192.0.2.1".parse().expect("ip");
    let allowed = reach
        .explain_to_name(&from, "WWW.example.org.", address, Protocol::Tcp, 443)
        .expect("an answer");
    assert_eq!(allowed.verdict, Verdict::Allow);
    assert_eq!(allowed.to, "www.example.org");
    assert!(
        allowed
            .egress
            .reason
            .contains("ClusterNetworkPolicy names egress[0]"),
        "{}",
        allowed.egress.reason
    );
    let denied = reach
        .explain_to_name(&from, "example.org", address, Protocol::Tcp, 443)
        .expect("an answer");
    assert_eq!(denied.verdict, Verdict::Deny);
    assert!(
        denied
            .egress
            .reason
            .contains("no name pattern of its node matches example.org"),
        "{}",
        denied.egress.reason
    );
    for bad in ["*.example.org", "org", "a!b.example.org"] {
        assert!(
            reach
                .explain_to_name(&from, bad, address, Protocol::Tcp, 443)
                .is_err(),
            "{bad}"
        );
    }
}
