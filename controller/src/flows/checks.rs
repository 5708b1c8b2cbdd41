//! What an agent reports is a claim: a record is kept only if the contract can hold it
//! (`bulkhead_proto::flows`): enumerated fields hold values the contract knows, addresses are 4
//! or 16 bytes, ports and protocol fit, names stay within Kubernetes' limits and hold no
//! whitespace, control characters or `/`. So what one record can make the controller keep (in
//! the store, in the graph, as a metric label) is bounded.

use bulkhead_proto::{
    flows::{FlowField, FlowRecordError},
    v1 as pb,
};

use crate::ruleset::FlowRecord;

/// Why the controller refused a flow record an agent reported. Refused records are counted by
/// reason and neither stored nor folded into the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum FlowRejection {
    #[error("the direction is not one of ingress, egress")]
    Direction,
    #[error("the kind is not one of new, denied, revoked, audit")]
    Kind,
    #[error("the verdict is not one of allowed, denied, audit-would-deny")]
    Verdict,
    #[error("an address is not 4 or 16 bytes")]
    Address,
    #[error("a port or the protocol is out of range")]
    Range,
    #[error(
        "the endpoint or peer is missing or not a namespace/pod name within Kubernetes' limits"
    )]
    Name,
    #[error("the rule or reason is missing, unknown, or names a policy beyond Kubernetes' limits")]
    Text,
    #[error(
        "the peer's DNS names are more than the contract holds, or not valid, normalized names"
    )]
    PeerNames,
}

impl FlowRejection {
    pub const ALL: [FlowRejection; 8] = [
        FlowRejection::Direction,
        FlowRejection::Kind,
        FlowRejection::Verdict,
        FlowRejection::Address,
        FlowRejection::Range,
        FlowRejection::Name,
        FlowRejection::Text,
        FlowRejection::PeerNames,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            FlowRejection::Direction => "direction",
            FlowRejection::Kind => "kind",
            FlowRejection::Verdict => "verdict",
            FlowRejection::Address => "address",
            FlowRejection::Range => "range",
            FlowRejection::Name => "name",
            FlowRejection::Text => "text",
            FlowRejection::PeerNames => "peer_names",
        }
    }

    /// The reason a record refused for `field` is counted under.
    pub fn of(field: FlowField) -> FlowRejection {
        match field {
            FlowField::Direction => FlowRejection::Direction,
            FlowField::Kind | FlowField::Action => FlowRejection::Kind,
            FlowField::Verdict => FlowRejection::Verdict,
            FlowField::Src | FlowField::Dst => FlowRejection::Address,
            FlowField::SrcPort | FlowField::DstPort | FlowField::Protocol => FlowRejection::Range,
            FlowField::Endpoint | FlowField::Peer | FlowField::Pod => FlowRejection::Name,
            FlowField::Rule | FlowField::Reason | FlowField::Entry | FlowField::Staged => {
                FlowRejection::Text
            }
            FlowField::PeerNames => FlowRejection::PeerNames,
        }
    }
}

impl From<&FlowRecordError> for FlowRejection {
    fn from(e: &FlowRecordError) -> FlowRejection {
        FlowRejection::of(e.field)
    }
}

/// The record an agent reported, if the contract can hold it; else why it is refused.
pub fn check_record(r: pb::FlowRecord) -> Result<FlowRecord, FlowRejection> {
    let r = FlowRecord::try_from(r).map_err(|e| FlowRejection::from(&e))?;
    // The contract holds a peer cluster's pod as a peer (the controller names them in what it
    // stores), but an agent names only pods of its own node, never a remote one.
    if r.peer
        .as_ref()
        .is_some_and(|p| crate::ruleset::cluster::is_remote_namespace(&p.namespace))
    {
        return Err(FlowRejection::Name);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    //! The flow-report path under arbitrary input: what is kept is what the contract holds,
    //! everything is accounted for, and what is kept per distinct rule stays bounded.

    use proptest::prelude::*;

    use super::*;
    use std::sync::{Arc, Mutex};

    use bulkhead_proto::v1::{flow_record, flow_rule};

    use crate::{
        distribution::FlowStore,
        flows::{Directory, FlowPipeline, MAX_RULE_LABELS, ServiceGraph},
        ruleset::{Direction, FlowEntry, FlowKind, FlowReason, FlowVerdict, RuleKind, RuleRef},
    };

    /// Sometimes a value the contract knows (`known`), sometimes anything.
    fn enum_value(known: std::ops::RangeInclusive<i32>) -> impl Strategy<Value = i32> {
        prop_oneof![4 => known, 1 => any::<i32>()]
    }

    fn address() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            3 => any::<[u8; 4]>().prop_map(|a| a.to_vec()),
            2 => any::<[u8; 16]>().prop_map(|a| a.to_vec()),
            1 => prop::collection::vec(any::<u8>(), 0..20),
        ]
    }

    fn text(ok: &'static str) -> impl Strategy<Value = String> {
        prop_oneof![
            4 => ok,
            1 => any::<String>(),
            1 => "[a-z]{1,4}".prop_map(|s| s.repeat(100)),
        ]
    }

    fn pod() -> impl Strategy<Value = pb::PodRef> {
        (text("[a-z0-9-]{1,63}"), text("[a-z0-9.-]{1,253}"))
            .prop_map(|(namespace, name)| pb::PodRef { namespace, name })
    }

    fn rule() -> impl Strategy<Value = Option<pb::FlowRule>> {
        let policy = (
            enum_value(1..=5),
            text("[a-z0-9-]{0,12}"),
            text("[a-z0-9.-]{1,40}"),
            enum_value(1..=2),
            prop::option::of(any::<u32>()),
        )
            .prop_map(|(kind, namespace, name, direction, index)| {
                flow_rule::Rule::Policy(pb::RuleRef {
                    kind,
                    namespace,
                    name,
                    direction,
                    index,
                })
            });
        prop::option::weighted(
            0.95,
            prop::option::weighted(
                0.95,
                prop_oneof![
                    4 => policy,
                    1 => enum_value(1..=3).prop_map(flow_rule::Rule::Reserved),
                    1 => any::<u32>().prop_map(flow_rule::Rule::Unnamed),
                ],
            )
            .prop_map(|rule| pb::FlowRule { rule }),
        )
    }

    prop_compose! {
        fn record()(
            endpoint in prop::option::weighted(0.95, prop_oneof![
                4 => pod().prop_map(flow_record::Endpoint::Pod),
                1 => any::<u32>().prop_map(flow_record::Endpoint::EndpointId),
            ]),
            direction in enum_value(1..=2),
            src in address(),
            dst in address(),
            kind in enum_value(1..=4),
            verdict in enum_value(1..=3),
            rule in rule(),
            peer in prop::option::of(pod()),
            reason in enum_value(1..=14),
            src_port in prop_oneof![0u32..=65535, any::<u32>()],
            dst_port in 0u32..=65535,
            protocol in prop_oneof![Just(6u32), any::<u32>()],
        ) -> pb::FlowRecord {
            pb::FlowRecord {
                endpoint, direction, src: src.into(), dst: dst.into(), kind, verdict, rule, peer,
                reason,
                src_port, dst_port, protocol, time_unix_nanos: 1, bytes: 60,
                ..Default::default()
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn what_is_kept_is_what_the_contract_holds_and_stays_bounded(
            batches in prop::collection::vec(prop::collection::vec(record(), 0..40), 1..8),
        ) {
            let store = Arc::new(Mutex::new(FlowStore::new(10_000)));
            let graph = Arc::new(Mutex::new(ServiceGraph::default()));
            let pipeline = FlowPipeline::with_directory(store.clone(), graph.clone(), Directory::default());
            let total: usize = batches.iter().map(Vec::len).sum();
            let valid: Vec<FlowRecord> = batches
                .iter()
                .flatten()
                .filter_map(|r| check_record(r.clone()).ok())
                .collect();
            let mut accepted = 0;
            for b in batches {
                accepted += pipeline.ingest("n1", b, 0).expect("ingest");
            }
            let rejected: u64 = pipeline.rejected().map(|(_, n)| n).sum();
            prop_assert_eq!(accepted as usize, valid.len());
            prop_assert_eq!(accepted + rejected, total as u64);
            let store = store.lock().expect("store");
            let (_, kept) = store.since(0);
            let kept: Vec<&FlowRecord> = kept
                .map(|(_, e, _)| match e {
                    FlowEntry::Flow(r) => r,
                    FlowEntry::Quarantine(q) => panic!("an agent cannot report {q:?}"),
                })
                .collect();
            prop_assert_eq!(kept, valid.iter().collect::<Vec<_>>());
            for r in &valid {
                prop_assert!(r.rule.to_string().len() <= 512, "{}", r.rule);
                prop_assert!(r.endpoint.to_string().len() <= 63 + 1 + 253);
            }
            let g = graph.lock().expect("graph");
            prop_assert!(g.rule_labels() <= MAX_RULE_LABELS + 1);
            prop_assert_eq!(g.records(), accepted);
        }
    }

    fn good() -> pb::FlowRecord {
        pb::FlowRecord::from(&FlowRecord {
            time_unix_nanos: 1,
            endpoint: "shop/web-0".parse().expect("endpoint"),
            direction: Direction::Ingress,
            src: "10.0.0.1".parse().expect("ip"),
            dst: "2001:db8::1".parse().expect("ip"),
            src_port: 65535,
            dst_port: 443,
            protocol: 132,
            kind: FlowKind::Denied,
            verdict: FlowVerdict::Denied,
            rule: crate::ruleset::FlowRule::Rule(RuleRef {
                kind: RuleKind::NetworkPolicy,
                namespace: "shop".into(),
                name: "api".into(),
                direction: Direction::Ingress,
                index: None,
            }),
            rule_id: 7,
            local_identity: 300,
            peer_identity: 301,
            peer: Some("data/db-0".parse().expect("pod")),
            reason: FlowReason::DeniedPolicy,
            packets: 1,
            bytes: 60,
            peer_names: Vec::new(),
            staged: None,
        })
    }

    /// Records as the agent writes them pass, at the longest names Kubernetes allows and
    /// with every value of every enumeration.
    #[test]
    fn what_agents_write_passes() {
        let longest = |r: &mut pb::FlowRecord| {
            let pod = pb::PodRef {
                namespace: "n".repeat(63),
                name: "p".repeat(253),
            };
            r.endpoint = Some(flow_record::Endpoint::Pod(pod.clone()));
            r.peer = Some(pod);
            r.rule = Some(pb::FlowRule {
                rule: Some(flow_rule::Rule::Policy(pb::RuleRef {
                    kind: pb::RuleKind::ClusterNetworkPolicy as i32,
                    namespace: "n".repeat(63),
                    name: "p".repeat(253),
                    direction: pb::Direction::Egress as i32,
                    index: Some(u32::MAX),
                })),
            });
        };
        let mut r = good();
        longest(&mut r);
        let kept = check_record(r).expect("the longest names pass");
        assert!(kept.rule.to_string().len() <= 512);
        for (direction, kind, verdict) in [(1, 1, 1), (2, 2, 2), (1, 3, 2), (2, 4, 3)] {
            for reason in 1..=14 {
                let r = pb::FlowRecord {
                    direction,
                    kind,
                    verdict,
                    reason,
                    endpoint: Some(flow_record::Endpoint::EndpointId(17)),
                    peer: None,
                    ..good()
                };
                assert!(check_record(r.clone()).is_ok(), "{r:?}");
            }
        }
    }

    /// Each field a record can be refused for is counted under its reason (the metric's
    /// labels are those of the string checks before records were typed).
    #[test]
    fn each_refusal_is_counted_under_its_reason() {
        assert!(check_record(good()).is_ok());
        type Damage = fn(&mut pb::FlowRecord);
        let cases: [(Damage, FlowRejection); 14] = [
            (|r| r.direction = 7, FlowRejection::Direction),
            (|r| r.kind = 0, FlowRejection::Kind),
            (|r| r.verdict = 9, FlowRejection::Verdict),
            (
                |r| r.dst = vec![10, 0, 0, 3, 0].into(),
                FlowRejection::Address,
            ),
            (|r| r.src = Vec::new().into(), FlowRejection::Address),
            (|r| r.src_port = 65536, FlowRejection::Range),
            (|r| r.protocol = 256, FlowRejection::Range),
            (|r| r.endpoint = None, FlowRejection::Name),
            (
                |r| {
                    r.peer = Some(pb::PodRef {
                        namespace: "shop".into(),
                        name: "q".repeat(300),
                    })
                },
                FlowRejection::Name,
            ),
            (|r| r.rule = None, FlowRejection::Text),
            (
                |r| {
                    r.rule = Some(pb::FlowRule {
                        rule: Some(flow_rule::Rule::Policy(pb::RuleRef {
                            kind: 1,
                            name: "x".repeat(1 << 20),
                            direction: 1,
                            ..Default::default()
                        })),
                    })
                },
                FlowRejection::Text,
            ),
            (|r| r.reason = 99, FlowRejection::Text),
            (
                |r| r.peer_names = vec![pb::NamePattern { kind: None }],
                FlowRejection::PeerNames,
            ),
            (
                |r| {
                    r.peer_names = (0..9)
                        .map(|i| pb::NamePattern {
                            kind: Some(pb::name_pattern::Kind::Exact(format!("h{i}.example.com"))),
                        })
                        .collect()
                },
                FlowRejection::PeerNames,
            ),
        ];
        for (damage, why) in cases {
            let mut r = good();
            damage(&mut r);
            assert_eq!(check_record(r.clone()).err(), Some(why), "{r:?}");
        }
        let labels: Vec<&str> = FlowRejection::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(
            labels,
            [
                "direction",
                "kind",
                "verdict",
                "address",
                "range",
                "name",
                "text",
                "peer_names"
            ]
        );
    }
}
