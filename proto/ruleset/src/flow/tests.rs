use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::RuleSet;

/// Every value prints its text, reads back from it and serialises as it; other texts are
/// refused with the accepted ones listed.
fn round_trips<T>(all: &[T], texts: &[&str])
where
    T: Copy + fmt::Debug + PartialEq + fmt::Display + FromStr<Err = UnknownValue> + Serialize,
{
    assert_eq!(all.len(), texts.len());
    for (v, text) in all.iter().zip(texts) {
        assert_eq!(v.to_string(), *text);
        assert_eq!(text.parse::<T>(), Ok(*v));
        assert_eq!(
            serde_json::to_string(v).expect("json"),
            format!("\"{text}\"")
        );
        for bad in [text.to_uppercase(), format!(" {text}"), format!("{text}x")] {
            let err = bad.parse::<T>().expect_err(&bad);
            assert!(err.to_string().contains(texts[0]), "{err}");
        }
    }
    assert!("".parse::<T>().is_err());
}

#[test]
fn every_value_reads_back_what_it_prints() {
    round_trips(
        &Direction::ALL,
        &["ingress", "egress"], // as agents wrote them
    );
    round_trips(FlowKind::ALL, &["new", "denied", "revoked", "audit"]);
    round_trips(FlowVerdict::ALL, &["allowed", "denied", "audit-would-deny"]);
    round_trips(QuarantineAction::ALL, &["quarantine", "release", "expire"]);
    let mut reasons: Vec<&str> = bulkhead_common::reason::NAMES.to_vec();
    reasons.push("unknown");
    round_trips(FlowReason::ALL, &reasons);
}

#[test]
fn reasons_follow_the_kernel_codes() {
    for (code, name) in bulkhead_common::reason::NAMES.iter().enumerate() {
        assert_eq!(FlowReason::from_code(code as u32).as_str(), *name);
    }
    for code in [bulkhead_common::reason::COUNT, 200, u32::MAX] {
        assert_eq!(FlowReason::from_code(code), FlowReason::Unknown);
    }
}

#[test]
fn endpoints_read_back_what_they_print() {
    for text in ["shop/web-0", "endpoint#17", "endpoint#0"] {
        let e: EndpointRef = text.parse().expect(text);
        assert_eq!(e.to_string(), text);
        assert_eq!(
            serde_json::to_string(&e).expect("json"),
            format!("\"{text}\"")
        );
    }
    assert_eq!(
        "endpoint#17".parse::<EndpointRef>(),
        Ok(EndpointRef::Unnamed(17))
    );
    for bad in [
        "",
        "web-0",
        "endpoint#",
        "endpoint#-1",
        "endpoint#x",
        "a/b/c/d",
    ] {
        let err = bad.parse::<EndpointRef>().expect_err(bad);
        assert!(err.to_string().contains("endpoint#ID"), "{err}");
    }
}

#[test]
fn names_are_checked_against_kubernetes_limits() {
    let pod = |ns: &str, name: &str| PodKey {
        namespace: ns.into(),
        name: name.into(),
    };
    assert_eq!(pod(&"n".repeat(63), &"p".repeat(253)).check(), Ok(()));
    assert_eq!(
        pod(&"n".repeat(64), "p").check(),
        Err(("namespace", BadName::TooLong { len: 64, max: 63 }))
    );
    assert_eq!(
        pod("n", &"p".repeat(254)).check(),
        Err(("name", BadName::TooLong { len: 254, max: 253 }))
    );
    assert_eq!(pod("", "p").check(), Err(("namespace", BadName::Empty)));
    assert_eq!(pod("n", "").check(), Err(("name", BadName::Empty)));
    for c in ['/', ' ', '\n', '\u{7f}', '\u{2028}'] {
        assert_eq!(
            pod("n", &format!("a{c}b")).check(),
            Err(("name", BadName::Character(c)))
        );
    }
    assert_eq!(check_name("", 63, true), Ok(()));
}

fn rule(kind: RuleKind, ns: &str, name: &str, direction: Direction, index: Option<u32>) -> RuleRef {
    RuleRef {
        kind,
        namespace: ns.into(),
        name: name.into(),
        direction,
        index,
    }
}

/// Each form the deciding rule took as text, unchanged.
#[test]
fn every_form_of_the_deciding_rule_prints_as_before() {
    use Direction::*;
    use RuleKind::*;
    let cases: Vec<(FlowRule, &str)> = vec![
        (
            FlowRule::Rule(rule(NetworkPolicy, "shop", "backend-api", Ingress, Some(0))),
            "NetworkPolicy shop/backend-api ingress[0]",
        ),
        (
            FlowRule::Rule(rule(NetworkPolicy, "shop", "backend-api", Ingress, None)),
            "NetworkPolicy shop/backend-api ingress default-deny",
        ),
        (
            FlowRule::Rule(rule(ClusterNetworkPolicy, "", "deny-all", Egress, Some(3))),
            "ClusterNetworkPolicy deny-all egress[3]",
        ),
        (
            FlowRule::Rule(rule(ServicePolicy, "shop", "no-world", Egress, Some(0))),
            "ServicePolicy shop/no-world egress[0]",
        ),
        (
            FlowRule::Rule(rule(Quarantine, "tools", "debug", Ingress, None)),
            "Quarantine tools/debug ingress default-deny",
        ),
        (
            FlowRule::Rule(rule(Default, "", "", Egress, None)),
            "default (egress)",
        ),
        (
            FlowRule::Rule(rule(Default, "x", "y", Ingress, Some(4))),
            "default (ingress)",
        ),
        (FlowRule::DefaultAllow, "default allow (no policy applies)"),
        (
            FlowRule::MissingPolicy,
            "policy group missing from the rule set: endpoint locked down",
        ),
        (
            FlowRule::UnrelatedIcmpError,
            "ICMP error unrelated to any tracked connection",
        ),
        (FlowRule::Unnamed(42), "rule #42"),
    ];
    for (rule, text) in cases {
        assert_eq!(rule.to_string(), text);
        assert_eq!(
            serde_json::to_string(&rule).expect("json"),
            format!("\"{text}\"")
        );
    }
}

/// The agent's text for a flow event's rule id before records were typed: the dataplane's
/// special case, then `RuleSet::describe` with `RuleRef`'s text, written out again here.
fn text_before_typed_records(rs: &RuleSet, id: RuleId) -> String {
    if id == RULE_UNRELATED_ICMP_ERROR {
        return "ICMP error unrelated to any tracked connection".to_string();
    }
    match rs.rules.get(&id) {
        Some(r) => {
            let dir = match r.direction {
                Direction::Ingress => "ingress",
                Direction::Egress => "egress",
            };
            if r.kind == RuleKind::Default {
                return format!("default ({dir})");
            }
            let object = if r.namespace.is_empty() {
                r.name.clone()
            } else {
                format!("{}/{}", r.namespace, r.name)
            };
            match r.index {
                Some(i) => format!("{:?} {object} {dir}[{i}]", r.kind),
                None => format!("{:?} {object} {dir} default-deny", r.kind),
            }
        }
        None if id == RULE_DEFAULT_ALLOW => "default allow (no policy applies)".into(),
        None if id == RULE_MISSING_POLICY => {
            "policy group missing from the rule set: endpoint locked down".into()
        }
        None => format!("rule #{id}"),
    }
}

fn rule_ref() -> impl Strategy<Value = RuleRef> {
    (
        prop::sample::select(RuleKind::ALL.to_vec()),
        "[a-z0-9-]{0,12}",
        "[a-z0-9.-]{1,20}",
        prop::sample::select(Direction::ALL.to_vec()),
        prop::option::of(any::<u32>()),
    )
        .prop_map(|(kind, namespace, name, direction, index)| RuleRef {
            kind,
            namespace,
            name,
            direction,
            index,
        })
}

fn rule_id() -> impl Strategy<Value = RuleId> {
    prop_oneof![
        0u32..64,
        Just(RULE_DEFAULT_ALLOW),
        Just(RULE_MISSING_POLICY),
        Just(RULE_UNRELATED_ICMP_ERROR),
        any::<u32>(),
    ]
}

proptest! {
    /// Whatever the rule set and the id, the typed rule prints what the agent wrote before.
    #[test]
    fn the_deciding_rule_prints_what_agents_wrote(
        rules in prop::collection::btree_map(0u32..64, rule_ref(), 0..16),
        id in rule_id(),
    ) {
        let rs = RuleSet { rules: rules.into_iter().collect::<BTreeMap<_, _>>(), ..Default::default() };
        prop_assert_eq!(rs.flow_rule(id).to_string(), text_before_typed_records(&rs, id));
    }

    /// Rules count as one exactly when they print the same.
    #[test]
    fn label_keys_are_equal_exactly_when_texts_are(a in rule_ref(), b in rule_ref()) {
        let (a, b) = (FlowRule::Rule(a), FlowRule::Rule(b));
        prop_assert_eq!(a.label_key() == b.label_key(), a.to_string() == b.to_string());
        prop_assert_eq!(a.label_key().to_string(), a.to_string());
    }

    #[test]
    fn pods_and_endpoints_read_back_what_they_print(
        ns in "[a-z0-9-]{1,63}",
        name in "[a-z0-9.-]{1,253}",
        id in any::<u32>(),
    ) {
        let pod = PodKey { namespace: ns, name };
        prop_assert_eq!(pod.check(), Ok(()));
        let e = EndpointRef::Pod(pod);
        prop_assert_eq!(e.to_string().parse::<EndpointRef>(), Ok(e));
        let e = EndpointRef::Unnamed(id);
        prop_assert_eq!(e.to_string().parse::<EndpointRef>(), Ok(e));
    }
}
