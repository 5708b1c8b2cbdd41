use std::net::IpAddr;

use proptest::prelude::*;
use prost::Message;

use super::*;

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|a| IpAddr::V4(a.into())),
        any::<[u8; 16]>().prop_map(|a| IpAddr::V6(a.into())),
    ]
}

fn pod() -> impl Strategy<Value = rs::PodKey> {
    ("[a-z0-9-]{1,63}", "[a-z0-9.-]{1,253}")
        .prop_map(|(namespace, name)| rs::PodKey { namespace, name })
}

fn rule() -> impl Strategy<Value = rs::FlowRule> {
    let policy = (
        prop::sample::select(rs::RuleKind::ALL.to_vec()),
        "[a-z0-9-]{0,63}",
        "[a-z0-9.-]{1,253}",
        prop::sample::select(rs::Direction::ALL.to_vec()),
        prop::option::of(any::<u32>()),
    )
        .prop_map(|(kind, namespace, name, direction, index)| {
            rs::FlowRule::Rule(rs::RuleRef {
                kind,
                namespace,
                name,
                direction,
                index,
            })
        });
    prop_oneof![
        4 => policy,
        1 => Just(rs::FlowRule::DefaultAllow),
        1 => Just(rs::FlowRule::MissingPolicy),
        1 => Just(rs::FlowRule::UnrelatedIcmpError),
        1 => any::<u32>().prop_map(rs::FlowRule::Unnamed),
    ]
}

prop_compose! {
    fn record()(
        (time_unix_nanos, endpoint, direction, src, dst) in (
            any::<u64>(),
            prop_oneof![
                pod().prop_map(rs::EndpointRef::Pod),
                any::<u32>().prop_map(rs::EndpointRef::Unnamed),
            ],
            prop::sample::select(rs::Direction::ALL.to_vec()),
            ip(),
            ip(),
        ),
        (src_port, dst_port, protocol, kind, verdict) in (
            any::<u16>(),
            any::<u16>(),
            any::<u8>(),
            prop::sample::select(rs::FlowKind::ALL),
            prop::sample::select(rs::FlowVerdict::ALL),
        ),
        (rule, rule_id, local_identity, peer_identity, peer) in (
            rule(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            prop::option::of(pod()),
        ),
        (reason, packets, bytes) in (
            prop::sample::select(rs::FlowReason::ALL),
            any::<u64>(),
            any::<u64>(),
        ),
        staged in prop::option::of((
            prop::sample::select(vec![rs::FlowVerdict::Allowed, rs::FlowVerdict::Denied]),
            rule(),
            any::<u32>(),
        ).prop_map(|(verdict, rule, rule_id)| rs::StagedOutcome { verdict, rule, rule_id })),
        // Sorted and distinct, as agents send them (a set's order is the patterns' order).
        peer_names in prop::collection::btree_set(
            crate::convert::names::tests::name_entry().prop_map(|e| e.pattern),
            0..4,
        ).prop_map(|s| s.into_iter().collect::<Vec<_>>()),
    ) -> rs::FlowRecord {
        rs::FlowRecord {
            time_unix_nanos, endpoint, direction, src, dst, src_port, dst_port, protocol, kind,
            verdict, rule, rule_id, local_identity, peer_identity, peer, peer_names, reason,
            packets, bytes, staged,
        }
    }
}

prop_compose! {
    fn quarantine_event()(
        time_unix_nanos in any::<u64>(),
        pod in pod(),
        action in prop::sample::select(rs::QuarantineAction::ALL),
        quarantine in "[a-z0-9-]{1,20}",
        reason in any::<String>(),
        actor in any::<String>(),
    ) -> rs::QuarantineEvent {
        rs::QuarantineEvent { time_unix_nanos, pod, action, quarantine, reason, actor }
    }
}

fn decode<M: Message + Default>(m: &M) -> M {
    M::decode(m.encode_to_vec().as_slice()).expect("decodes")
}

proptest! {
    #[test]
    fn a_flow_record_survives_the_wire(r in record()) {
        let by_ref = pb::FlowRecord::from(&r);
        let by_value = pb::FlowRecord::from(r.clone());
        prop_assert_eq!(&by_ref, &by_value);
        prop_assert_eq!(rs::FlowRecord::try_from(decode(&by_ref)), Ok(r));
    }

    #[test]
    fn stored_flows_survive_the_wire(r in record(), q in quarantine_event()) {
        for entry in [rs::FlowEntry::Flow(r.clone()), rs::FlowEntry::Quarantine(q.clone())] {
            let stored = pb::StoredFlow {
                node: "n1".into(),
                entry: Some((&entry).into()),
                sequence: 7,
            };
            prop_assert_eq!(decode(&stored).into_entry(), Ok(entry));
        }
    }

    /// Whatever bytes arrive, decoding gives a record or an error, never a panic.
    #[test]
    fn garbage_is_an_error_or_a_record(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(m) = pb::FlowRecord::decode(bytes.as_slice()) {
            let _ = rs::FlowRecord::try_from(m);
        }
        if let Ok(m) = pb::StoredFlow::decode(bytes.as_slice()) {
            let _ = m.into_entry();
        }
    }
}

/// Every value of every enumeration crosses the wire as itself.
#[test]
fn every_enumerated_value_survives_the_wire() {
    let base = good();
    let rs_base = rs::FlowRecord::try_from(base).expect("a good record");
    let check = |r: rs::FlowRecord| {
        assert_eq!(
            rs::FlowRecord::try_from(decode(&pb::FlowRecord::from(&r))),
            Ok(r)
        );
    };
    for direction in rs::Direction::ALL {
        check(rs::FlowRecord {
            direction,
            ..rs_base.clone()
        });
    }
    for kind in rs::FlowKind::ALL {
        check(rs::FlowRecord {
            kind: *kind,
            ..rs_base.clone()
        });
    }
    for verdict in rs::FlowVerdict::ALL {
        check(rs::FlowRecord {
            verdict: *verdict,
            ..rs_base.clone()
        });
    }
    for reason in rs::FlowReason::ALL {
        check(rs::FlowRecord {
            reason: *reason,
            ..rs_base.clone()
        });
        // The wire names follow the contract's (code + 1, as the proto says).
        assert_eq!(
            reason_to(*reason).as_str_name(),
            format!("FLOW_REASON_{}", reason.as_str().to_uppercase())
        );
    }
    for kind in rs::RuleKind::ALL {
        check(rs::FlowRecord {
            rule: rs::FlowRule::Rule(rs::RuleRef {
                kind,
                namespace: String::new(),
                name: "p".into(),
                direction: rs::Direction::Egress,
                index: None,
            }),
            ..rs_base.clone()
        });
    }
    for action in rs::QuarantineAction::ALL {
        let q = rs::QuarantineEvent {
            time_unix_nanos: 1,
            pod: "shop/web-0".parse().expect("pod"),
            action: *action,
            quarantine: "q".into(),
            reason: "r".into(),
            actor: "a".into(),
        };
        assert_eq!(
            rs::QuarantineEvent::try_from(decode(&pb::QuarantineEvent::from(&q))),
            Ok(q)
        );
    }
}

fn pod_ref(namespace: &str, name: &str) -> pb::PodRef {
    pb::PodRef {
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn good() -> pb::FlowRecord {
    pb::FlowRecord {
        time_unix_nanos: 1,
        endpoint: Some(flow_record::Endpoint::Pod(pod_ref("shop", "web-0"))),
        direction: pb::Direction::Ingress as i32,
        src: vec![10, 0, 0, 1].into(),
        dst: vec![10, 0, 0, 2].into(),
        src_port: 40000,
        dst_port: 80,
        protocol: 6,
        kind: pb::FlowKind::Denied as i32,
        verdict: pb::FlowVerdict::Denied as i32,
        rule: Some(pb::FlowRule {
            rule: Some(flow_rule::Rule::Policy(pb::RuleRef {
                kind: pb::RuleKind::NetworkPolicy as i32,
                namespace: "shop".into(),
                name: "web".into(),
                direction: pb::Direction::Ingress as i32,
                index: None,
            })),
        }),
        peer: Some(pod_ref("tools", "debug")),
        reason: pb::FlowReason::DeniedPolicy as i32,
        ..Default::default()
    }
}

fn policy(f: impl FnOnce(&mut pb::RuleRef)) -> impl FnOnce(&mut pb::FlowRecord) {
    move |r| {
        if let Some(pb::FlowRule {
            rule: Some(flow_rule::Rule::Policy(p)),
        }) = &mut r.rule
        {
            f(p);
        }
    }
}

/// What the contract cannot hold is refused, naming the field and what is wrong with it.
#[test]
fn garbage_records_are_refused_by_field() {
    let r = rs::FlowRecord::try_from(good()).expect("a good record");
    assert_eq!(
        r.rule.to_string(),
        "NetworkPolicy shop/web ingress default-deny"
    );
    type Damage = Box<dyn FnOnce(&mut pb::FlowRecord)>;
    let long_ns = "n".repeat(64);
    let long_name = "p".repeat(254);
    let cases: Vec<(Damage, FlowField, &str)> = vec![
        (
            Box::new(|r| r.endpoint = None),
            FlowField::Endpoint,
            "missing",
        ),
        (
            Box::new(move |r| {
                r.endpoint = Some(flow_record::Endpoint::Pod(pod_ref(&long_ns, "p")))
            }),
            FlowField::Endpoint,
            "namespace is 64 bytes, longer than 63",
        ),
        (
            Box::new(|r| r.endpoint = Some(flow_record::Endpoint::Pod(pod_ref("shop", "")))),
            FlowField::Endpoint,
            "name is empty",
        ),
        (
            Box::new(|r| r.endpoint = Some(flow_record::Endpoint::Pod(pod_ref("shop", "a/b")))),
            FlowField::Endpoint,
            "'/'",
        ),
        (
            Box::new(|r| r.direction = 0),
            FlowField::Direction,
            "unknown value 0",
        ),
        (
            Box::new(|r| r.direction = 3),
            FlowField::Direction,
            "unknown value 3",
        ),
        (
            Box::new(|r| r.src = Vec::new().into()),
            FlowField::Src,
            "4 or 16 bytes, not 0",
        ),
        (
            Box::new(|r| r.src = vec![10, 0, 0].into()),
            FlowField::Src,
            "not 3",
        ),
        (
            Box::new(|r| r.dst = vec![0; 5].into()),
            FlowField::Dst,
            "not 5",
        ),
        (
            Box::new(|r| r.dst = vec![0; 17].into()),
            FlowField::Dst,
            "not 17",
        ),
        (
            Box::new(|r| r.src_port = 65536),
            FlowField::SrcPort,
            "65536 is out of range (at most 65535)",
        ),
        (
            Box::new(|r| r.dst_port = u32::MAX),
            FlowField::DstPort,
            "at most 65535",
        ),
        (
            Box::new(|r| r.protocol = 256),
            FlowField::Protocol,
            "at most 255",
        ),
        (Box::new(|r| r.kind = 0), FlowField::Kind, "unknown value 0"),
        (Box::new(|r| r.kind = 5), FlowField::Kind, "unknown value 5"),
        (
            Box::new(|r| r.verdict = 0),
            FlowField::Verdict,
            "unknown value 0",
        ),
        (
            Box::new(|r| r.verdict = -1),
            FlowField::Verdict,
            "unknown value -1",
        ),
        (Box::new(|r| r.rule = None), FlowField::Rule, "missing"),
        (
            Box::new(|r| r.rule = Some(pb::FlowRule { rule: None })),
            FlowField::Rule,
            "missing",
        ),
        (
            Box::new(|r| {
                r.rule = Some(pb::FlowRule {
                    rule: Some(flow_rule::Rule::Reserved(0)),
                })
            }),
            FlowField::Rule,
            "unknown value 0",
        ),
        (
            Box::new(|r| {
                r.rule = Some(pb::FlowRule {
                    rule: Some(flow_rule::Rule::Reserved(4)),
                })
            }),
            FlowField::Rule,
            "unknown value 4",
        ),
        (
            Box::new(policy(|p| p.kind = 0)),
            FlowField::Rule,
            "unknown value 0",
        ),
        (
            Box::new(policy(|p| p.kind = 8)),
            FlowField::Rule,
            "unknown value 8",
        ),
        (
            Box::new(policy(|p| p.direction = 9)),
            FlowField::Rule,
            "unknown value 9",
        ),
        (
            Box::new(policy(|p| p.namespace = "n".repeat(64))),
            FlowField::Rule,
            "namespace is 64 bytes",
        ),
        (
            Box::new(policy(|p| p.name = "x".repeat(1 << 20))),
            FlowField::Rule,
            "name is 1048576 bytes, longer than 253",
        ),
        (
            Box::new(policy(|p| p.name.clear())),
            FlowField::Rule,
            "name is empty",
        ),
        (
            Box::new(policy(|p| p.name = "web ingress[0]".into())),
            FlowField::Rule,
            "' '",
        ),
        (
            Box::new(policy(|p| p.namespace = "sh\nop".into())),
            FlowField::Rule,
            "'\\n'",
        ),
        (
            Box::new(move |r| r.peer = Some(pod_ref("shop", &long_name))),
            FlowField::Peer,
            "name is 254 bytes",
        ),
        (
            Box::new(|r| r.peer = Some(pod_ref("", "debug"))),
            FlowField::Peer,
            "namespace is empty",
        ),
        (
            Box::new(|r| r.reason = 0),
            FlowField::Reason,
            "unknown value 0",
        ),
        (
            Box::new(|r| {
                r.staged = Some(pb::StagedOutcome {
                    verdict: pb::FlowVerdict::AuditWouldDeny as i32,
                    rule: None,
                    rule_id: 0,
                })
            }),
            FlowField::Staged,
            "unknown value 3",
        ),
        (
            Box::new(|r| {
                r.staged = Some(pb::StagedOutcome {
                    verdict: pb::FlowVerdict::Denied as i32,
                    rule: None,
                    rule_id: 0,
                })
            }),
            FlowField::Staged,
            "missing",
        ),
        (
            Box::new(|r| r.reason = 15),
            FlowField::Reason,
            "unknown value 15",
        ),
    ];
    for (damage, field, says) in cases {
        let mut r = good();
        damage(&mut r);
        let err = rs::FlowRecord::try_from(decode(&r)).expect_err(says);
        assert_eq!(err.field, field, "{err}");
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("flow record {field}: ")) && text.contains(says),
            "{text:?} should name {field} and say {says:?}"
        );
    }
    // A cluster-scoped policy has no namespace; an endpoint the agent could not name has its id.
    let mut r = good();
    policy(|p| p.namespace.clear())(&mut r);
    r.endpoint = Some(flow_record::Endpoint::EndpointId(17));
    r.peer = None;
    let r = rs::FlowRecord::try_from(r).expect("accepted");
    assert_eq!(r.endpoint.to_string(), "endpoint#17");
    assert_eq!(r.rule.to_string(), "NetworkPolicy web ingress default-deny");
}

#[test]
fn garbage_stored_flows_are_refused_by_field() {
    let missing = pb::StoredFlow::default()
        .into_entry()
        .expect_err("no entry");
    assert_eq!(missing.to_string(), "flow record entry: missing");
    let event = |f: fn(&mut pb::QuarantineEvent)| {
        let mut q = pb::QuarantineEvent {
            pod: Some(pod_ref("shop", "web-0")),
            action: pb::QuarantineAction::Quarantine as i32,
            ..Default::default()
        };
        f(&mut q);
        pb::StoredFlow {
            entry: Some(stored_flow::Entry::Quarantine(q)),
            ..Default::default()
        }
        .into_entry()
    };
    assert!(event(|_| {}).is_ok());
    assert_eq!(
        event(|q| q.pod = None).map_err(|e| e.field),
        Err(FlowField::Pod)
    );
    assert_eq!(
        event(|q| q.pod = Some(pod_ref("shop", " "))).map_err(|e| e.field),
        Err(FlowField::Pod)
    );
    assert_eq!(
        event(|q| q.action = 0).map_err(|e| e.field),
        Err(FlowField::Action)
    );
    assert_eq!(
        event(|q| q.action = 4).map_err(|e| e.field),
        Err(FlowField::Action)
    );
    let bad_record = pb::StoredFlow {
        entry: Some(stored_flow::Entry::Record(pb::FlowRecord {
            protocol: 300,
            ..good()
        })),
        ..Default::default()
    };
    assert_eq!(
        bad_record.into_entry().map_err(|e| e.field),
        Err(FlowField::Protocol)
    );
}

/// A record of an agent from before (text in the now reserved fields) carries none of the
/// fields that replaced them: it is refused, not misread.
#[test]
fn a_record_of_an_agent_from_before_is_refused() {
    use prost::encoding::{WireType, encode_key, encode_varint};
    let mut old = Vec::new();
    for (field, text) in [
        (2u32, "shop/web-0"),
        (3, "ingress"),
        (4, "10.0.0.1"),
        (5, "10.0.0.2"),
        (9, "denied"),
        (10, "denied"),
        (11, "NetworkPolicy shop/web ingress default-deny"),
        (16, "denied_policy"),
    ] {
        encode_key(field, WireType::LengthDelimited, &mut old);
        encode_varint(text.len() as u64, &mut old);
        old.extend_from_slice(text.as_bytes());
    }
    let m = pb::FlowRecord::decode(old.as_slice()).expect("unknown fields are skipped");
    let err = rs::FlowRecord::try_from(m).expect_err("refused");
    assert_eq!(err.to_string(), "flow record endpoint: missing");
}

fn pattern(text: &str) -> rs::NamePattern {
    rs::NamePattern::parse(text).expect("a valid pattern")
}

/// A record of an agent before names (no field 30) reads as one without names; a record with
/// names reads back with them; a reader before names skips them and reads the rest.
#[test]
fn peer_names_cross_the_wire_and_old_records_have_none() {
    let old_bytes = good().encode_to_vec();
    let old =
        rs::FlowRecord::try_from(pb::FlowRecord::decode(old_bytes.as_slice()).expect("decodes"))
            .expect("a good record");
    assert!(old.peer_names.is_empty());

    let named = rs::FlowRecord {
        // In the patterns' order, as agents send them: exact names before wildcards.
        peer_names: vec![pattern("api.example.com"), pattern("*.example.com")],
        ..old.clone()
    };
    let wire = pb::FlowRecord::from(&named);
    assert_eq!(
        wire.peer_names,
        vec![
            pb::NamePattern {
                kind: Some(pb::name_pattern::Kind::Exact("api.example.com".into()))
            },
            pb::NamePattern {
                kind: Some(pb::name_pattern::Kind::WildcardSuffix("example.com".into()))
            },
        ]
    );
    assert_eq!(rs::FlowRecord::try_from(decode(&wire)), Ok(named.clone()));

    /// The message as readers before names knew it (a few of its fields).
    #[derive(Clone, PartialEq, prost::Message)]
    struct Before {
        #[prost(uint64, tag = "1")]
        time_unix_nanos: u64,
        #[prost(uint32, tag = "7")]
        dst_port: u32,
        #[prost(bytes = "vec", tag = "23")]
        dst: Vec<u8>,
    }
    let before = Before::decode(wire.encode_to_vec().as_slice()).expect("field 30 is skipped");
    assert_eq!(
        (before.time_unix_nanos, before.dst_port, before.dst),
        (1, 80, vec![10, 0, 0, 2])
    );
}

/// Names a record cannot hold are refused by field; names out of order or repeated are put in
/// order once.
#[test]
fn bad_peer_names_are_refused_and_others_normalized() {
    use pb::name_pattern::Kind;
    let with = |kinds: Vec<Option<Kind>>| {
        rs::FlowRecord::try_from(pb::FlowRecord {
            peer_names: kinds
                .into_iter()
                .map(|kind| pb::NamePattern { kind })
                .collect(),
            ..good()
        })
    };
    let exact = |s: &str| Some(Kind::Exact(s.into()));
    for (kinds, want) in [
        (vec![None], "missing"),
        (vec![exact("com")], "single label"),
        (vec![exact("*.example.com")], "'*'"),
        (vec![exact("API.example.com")], "normal form"),
        (
            vec![Some(Kind::WildcardSuffix("example.com.".into()))],
            "normal form",
        ),
        (
            (0..9)
                .map(|i| exact(&format!("h{i}.example.com")))
                .collect(),
            "9 names, more than 8",
        ),
    ] {
        let err = with(kinds).expect_err(want);
        assert_eq!(err.field, FlowField::PeerNames, "{err}");
        assert!(err.to_string().contains(want), "{err}");
    }
    let r = with(vec![
        exact("b.example.com"),
        exact("a.example.com"),
        exact("b.example.com"),
    ])
    .expect("good names");
    assert_eq!(
        r.peer_names,
        vec![pattern("a.example.com"), pattern("b.example.com")]
    );
}
