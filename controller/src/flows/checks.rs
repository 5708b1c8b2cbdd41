//! What an agent reports is a claim: the checks a flow record passes before the controller
//! keeps it. Enumerated fields hold the values an agent writes, addresses parse, names and
//! texts stay within Kubernetes' limits, so what one record can make the controller keep (in the
//! store, in the graph, as a metric label) is bounded.

use std::net::IpAddr;

use bulkhead_proto::v1 as pb;

/// Longest `namespace/pod` a record may name: a namespace is a DNS label (63), a pod name a DNS
/// subdomain (253), as Kubernetes limits them.
pub const MAX_POD_REF_BYTES: usize = 63 + 1 + 253;
/// Longest rule description: a policy kind, a namespace, a name (both as Kubernetes limits
/// them) and the rule's place in the policy fit with room to spare.
pub const MAX_RULE_BYTES: usize = 512;
/// Longest reason (the agent's are short identifiers such as `denied_policy`).
pub const MAX_REASON_BYTES: usize = 64;
/// The values the agent writes into a record's enumerated fields (see the agent's `FlowKind`,
/// `FlowVerdict` and `Direction`).
pub const DIRECTIONS: [&str; 2] = ["ingress", "egress"];
pub const KINDS: [&str; 4] = ["new", "denied", "revoked", "audit"];
pub const VERDICTS: [&str; 3] = ["allowed", "denied", "audit-would-deny"];

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
    #[error("an address is not an IP address")]
    Address,
    #[error("a port or the protocol is out of range")]
    Range,
    #[error("the endpoint or peer is not a namespace/pod name within Kubernetes' limits")]
    Name,
    #[error("the rule or reason is too long or holds control characters")]
    Text,
}

impl FlowRejection {
    pub const ALL: [FlowRejection; 7] = [
        FlowRejection::Direction,
        FlowRejection::Kind,
        FlowRejection::Verdict,
        FlowRejection::Address,
        FlowRejection::Range,
        FlowRejection::Name,
        FlowRejection::Text,
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
        }
    }
}

fn plain_text(s: &str, max: usize) -> bool {
    s.len() <= max && !s.chars().any(char::is_control)
}

/// `namespace/pod` within Kubernetes' limits, or the agent's `endpoint#N` for an endpoint it
/// could not name.
fn pod_ref(s: &str) -> bool {
    if !plain_text(s, MAX_POD_REF_BYTES) {
        return false;
    }
    match s.split_once('/') {
        Some((ns, pod)) => !ns.is_empty() && ns.len() <= 63 && !pod.is_empty() && pod.len() <= 253,
        None => s
            .strip_prefix("endpoint#")
            .is_some_and(|n| n.parse::<u32>().is_ok()),
    }
}

/// Whether a record an agent reported is one an agent could have produced: enumerated fields
/// hold known values, addresses parse, names and texts stay within their limits.
pub fn check_record(r: &pb::FlowRecord) -> Result<(), FlowRejection> {
    if !DIRECTIONS.contains(&r.direction.as_str()) {
        return Err(FlowRejection::Direction);
    }
    if !KINDS.contains(&r.kind.as_str()) {
        return Err(FlowRejection::Kind);
    }
    if !VERDICTS.contains(&r.verdict.as_str()) {
        return Err(FlowRejection::Verdict);
    }
    if r.src.len() > 64
        || r.dst.len() > 64
        || r.src.parse::<IpAddr>().is_err()
        || r.dst.parse::<IpAddr>().is_err()
    {
        return Err(FlowRejection::Address);
    }
    if r.src_port > u16::MAX as u32 || r.dst_port > u16::MAX as u32 || r.protocol > u8::MAX as u32 {
        return Err(FlowRejection::Range);
    }
    if !pod_ref(&r.endpoint) || !(r.peer.is_empty() || pod_ref(&r.peer)) {
        return Err(FlowRejection::Name);
    }
    if !plain_text(&r.rule, MAX_RULE_BYTES) || !plain_text(&r.reason, MAX_REASON_BYTES) {
        return Err(FlowRejection::Text);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The flow-report path under arbitrary input: what is kept always passes the checks,
    //! everything is accounted for, and what is kept per distinct string stays bounded.

    use proptest::prelude::*;

    use super::*;
    use std::sync::{Arc, Mutex};

    use crate::{
        distribution::FlowStore,
        flows::{Directory, FlowPipeline, MAX_RULE_LABELS, ServiceGraph},
        ruleset::{Direction, RuleKind, RuleRef},
    };

    /// Sometimes a value an agent writes, sometimes anything (long, control characters).
    fn field(known: &'static [&'static str]) -> impl Strategy<Value = String> {
        prop_oneof![
            3 => prop::sample::select(known).prop_map(str::to_string),
            1 => any::<String>(),
            1 => "[a-z]{0,8}".prop_map(|s| s.repeat(100)),
        ]
    }

    fn address() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => any::<std::net::IpAddr>().prop_map(|a| a.to_string()),
            1 => any::<String>(),
        ]
    }

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => ("[a-z0-9-]{1,63}", "[a-z0-9.-]{1,253}").prop_map(|(n, p)| format!("{n}/{p}")),
            1 => any::<u32>().prop_map(|n| format!("endpoint#{n}")),
            1 => any::<String>(),
            1 => "[a-z]{1,4}".prop_map(|s| format!("ns/{}", s.repeat(200))),
        ]
    }

    prop_compose! {
        fn record()(
            direction in field(&DIRECTIONS),
            kind in field(&KINDS),
            verdict in field(&VERDICTS),
            src in address(),
            dst in address(),
            endpoint in name(),
            peer in prop_oneof![Just(String::new()), name()],
            rule in prop_oneof![
                4 => "[A-Za-z /-]{1,40}",
                1 => any::<String>(),
                1 => "[a-z]{1,4}".prop_map(|s| s.repeat(300)),
            ],
            reason in field(&["denied_policy", "allowed_new"]),
            src_port in prop_oneof![0u32..=65535, any::<u32>()],
            dst_port in 0u32..=65535,
            protocol in prop_oneof![Just(6u32), any::<u32>()],
        ) -> pb::FlowRecord {
            pb::FlowRecord {
                direction, kind, verdict, src, dst, endpoint, peer, rule, reason,
                src_port, dst_port, protocol, time_unix_nanos: 1, bytes: 60,
                ..Default::default()
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn what_is_kept_passes_and_stays_bounded(batches in prop::collection::vec(prop::collection::vec(record(), 0..40), 1..8)) {
            let store = Arc::new(Mutex::new(FlowStore::new(10_000)));
            let graph = Arc::new(Mutex::new(ServiceGraph::default()));
            let pipeline = FlowPipeline::with_directory(store.clone(), graph.clone(), Directory::default());
            let total: usize = batches.iter().map(Vec::len).sum();
            let valid: usize = batches.iter().flatten().filter(|r| check_record(r).is_ok()).count();
            let mut accepted = 0;
            for b in batches {
                accepted += pipeline.ingest("n1", b, 0).expect("ingest");
            }
            let rejected: u64 = pipeline.rejected().map(|(_, n)| n).sum();
            prop_assert_eq!(accepted as usize, valid);
            prop_assert_eq!(accepted + rejected, total as u64);
            let store = store.lock().expect("store");
            let (_, kept) = store.since(0);
            for (_, r, _) in kept {
                prop_assert!(check_record(r).is_ok(), "{:?}", r);
                prop_assert!(r.rule.len() <= MAX_RULE_BYTES && r.endpoint.len() <= MAX_POD_REF_BYTES);
            }
            let g = graph.lock().expect("graph");
            prop_assert_eq!(g.verdict_labels(), VERDICTS.len());
            prop_assert!(g.rule_labels() <= MAX_RULE_LABELS + 1);
            prop_assert_eq!(g.records(), accepted);
        }
    }

    /// Records as the agent writes them pass, at the longest names and rules Kubernetes allows.
    #[test]
    fn what_agents_write_passes() {
        let longest_rule = RuleRef {
            kind: RuleKind::ClusterNetworkPolicy,
            namespace: "n".repeat(63),
            name: "p".repeat(253),
            direction: Direction::Ingress,
            index: Some(u32::MAX),
        }
        .to_string();
        let longest_pod = format!("{}/{}", "n".repeat(63), "p".repeat(253));
        for (direction, kind, verdict) in [
            ("ingress", "new", "allowed"),
            ("egress", "denied", "denied"),
            ("ingress", "revoked", "denied"),
            ("egress", "audit", "audit-would-deny"),
        ] {
            for (endpoint, peer, rule) in [
                (
                    "shop/web-0",
                    "",
                    "NetworkPolicy shop/api ingress default-deny",
                ),
                (
                    "endpoint#17",
                    "data/db-0",
                    "default allow (no policy applies)",
                ),
                (
                    longest_pod.as_str(),
                    longest_pod.as_str(),
                    longest_rule.as_str(),
                ),
            ] {
                let r = pb::FlowRecord {
                    direction: direction.into(),
                    kind: kind.into(),
                    verdict: verdict.into(),
                    src: "10.0.0.1".into(),
                    dst: "2001:db8::1".into(),
                    src_port: 65535,
                    dst_port: 443,
                    protocol: 132,
                    endpoint: endpoint.into(),
                    peer: peer.into(),
                    rule: rule.into(),
                    reason: "denied_policy".into(),
                    ..Default::default()
                };
                assert_eq!(check_record(&r), Ok(()), "{r:?}");
            }
        }
    }

    #[test]
    fn each_refusal_names_its_field() {
        let good = pb::FlowRecord {
            direction: "ingress".into(),
            kind: "denied".into(),
            verdict: "denied".into(),
            src: "10.0.0.1".into(),
            dst: "10.0.0.2".into(),
            endpoint: "shop/web-0".into(),
            rule: "default (ingress)".into(),
            reason: "denied_policy".into(),
            ..Default::default()
        };
        assert_eq!(check_record(&good), Ok(()));
        type Damage = fn(&mut pb::FlowRecord);
        let cases: [(Damage, FlowRejection); 9] = [
            (|r| r.direction = "Ingress".into(), FlowRejection::Direction),
            (|r| r.kind = String::new(), FlowRejection::Kind),
            (|r| r.verdict = "maybe".into(), FlowRejection::Verdict),
            (|r| r.dst = "10.0.0.300".into(), FlowRejection::Address),
            (|r| r.src_port = 65536, FlowRejection::Range),
            (|r| r.protocol = 256, FlowRejection::Range),
            (|r| r.endpoint = "web-0".into(), FlowRejection::Name),
            (
                |r| r.rule = "x".repeat(MAX_RULE_BYTES + 1),
                FlowRejection::Text,
            ),
            (|r| r.reason = "denied\npolicy".into(), FlowRejection::Text),
        ];
        for (damage, why) in cases {
            let mut r = good.clone();
            damage(&mut r);
            assert_eq!(check_record(&r), Err(why), "{r:?}");
        }
    }
}
