//! Precedence with names: the combination of per-identity resolutions is `resolve` over the
//! union, and `decide_with_names` follows the examples.

use proptest::prelude::*;

use super::*;

const NAME_A: Identity = identity::FIRST_NAME_IDENTITY + 5;
const NAME_B: Identity = identity::FIRST_NAME_IDENTITY + 9;
const CIDR: Identity = identity::FIRST_CIDR_IDENTITY + 1;

fn entry(peer: Identity, tier: Tier, priority: u16, action: Action, rule: RuleId) -> PolicyEntry {
    PolicyEntry {
        peer,
        protocol: Some(Protocol::Tcp),
        ports: PortRange::single(443),
        tier,
        priority,
        action,
        stage: Stage::Enforced,
        rule,
    }
}

fn arb_entry() -> impl Strategy<Value = PolicyEntry> {
    (
        prop::sample::select(vec![identity::ANY, identity::WORLD, CIDR, NAME_A, NAME_B]),
        prop::sample::select(vec![
            Tier::Quarantine,
            Tier::Admin,
            Tier::Application,
            Tier::Baseline,
        ]),
        0u16..4,
        prop::sample::select(vec![Action::Allow, Action::Deny, Action::Pass]),
        prop::sample::select(vec![Stage::Enforced, Stage::Staged, Stage::Superseded]),
        1u32..6,
        prop::sample::select(vec![
            PortRange::single(443),
            PortRange::ALL,
            PortRange::single(80),
        ]),
    )
        .prop_map(
            |(peer, tier, priority, action, stage, rule, ports)| PolicyEntry {
                peer,
                protocol: Some(Protocol::Tcp),
                ports,
                tier,
                priority,
                action,
                stage,
                rule,
            },
        )
}

proptest! {
    /// k + 1 per-identity resolutions, combined, decide exactly as `resolve` over the entries
    /// that match any of the identities: passes, stages and isolation included.
    #[test]
    fn combine_equals_resolve_over_the_union(
        entries in prop::collection::vec(arb_entry(), 0..24),
        isolated_by in prop::option::of(100u32..103),
        staged_isolated_by in prop::option::of(100u32..103),
        address in prop::sample::select(vec![identity::WORLD, CIDR]),
        names in prop::sample::subsequence(vec![NAME_A, NAME_B], 0..=2),
        port in prop::sample::select(vec![443u16, 80, 22]),
    ) {
        let policy = DirectionPolicy { isolated_by, staged_isolated_by, entries };
        let mut peers = vec![address];
        peers.extend(names.iter().copied());
        let union = decide_direction_peers(&policy, &peers, Some(Protocol::Tcp), Some(port));
        let combined = peers
            .iter()
            .map(|p| Resolution::for_peer(&policy, *p, Some(Protocol::Tcp), Some(port)))
            .reduce(|a, b| a.combine(&b))
            .map(|r| r.decision());
        prop_assert_eq!(Some(union), combined);
        // One identity alone: the per-identity path is the plain one.
        prop_assert_eq!(
            decide_direction(&policy, address, Some(Protocol::Tcp), Some(port)),
            decide_direction_peers(&policy, &[address], Some(Protocol::Tcp), Some(port))
        );
    }
}

fn egress_ruleset(entries: Vec<PolicyEntry>, isolated_by: Option<RuleId>) -> (RuleSet, Endpoint) {
    let ep = Endpoint {
        id: 1,
        namespace: "shop".into(),
        pod: "web-0".into(),
        workload: None,
        identity: 300,
        ips: vec!["10.0.0.1".parse().expect("ip")],
        interface: None,
        quarantined: false,
        policy: 300,
    };
    let mut entries = entries;
    entries.sort();
    let policy = EndpointPolicy {
        egress: DirectionPolicy {
            isolated_by,
            staged_isolated_by: isolated_by,
            entries,
        },
        ..EndpointPolicy::default()
    };
    let rs = RuleSet {
        node: "n1".into(),
        version: 1,
        endpoints: vec![ep.clone()],
        policies: [(300, policy)].into(),
        ipcache: vec![IpCacheEntry::new(
            "198.51.100.0/24".parse().expect("net"),
            CIDR,
        )],
        names: vec![NameEntry {
            identity: NAME_A,
            pattern: NamePattern::parse("api.example.com").expect("pattern"),
        }],
        ..RuleSet::default()
    };
    (rs, ep)
}

fn to(dst: &str) -> PacketTuple {
    PacketTuple {
        src: "10.0.0.1".parse().expect("ip"),
        dst: dst.parse().expect("ip"),
        protocol: Some(Protocol::Tcp),
        dst_port: Some(443),
    }
}

#[test]
fn an_admin_accept_by_name_beats_a_network_policy_default_deny() {
    let (rs, ep) = egress_ruleset(
        vec![entry(NAME_A, Tier::Admin, 320, Action::Allow, 7)],
        Some(9),
    );
    let d = decide_with_names(&rs, &ep, Direction::Egress, &to("203.0.113.5"), &[NAME_A]);
    assert_eq!((d.verdict, d.rule), (Verdict::Allow, 7));
    // Without the learned name the default deny stands.
    let d = decide_with_names(&rs, &ep, Direction::Egress, &to("203.0.113.5"), &[]);
    assert_eq!((d.verdict, d.rule), (Verdict::Deny, 9));
    // Ingress ignores names.
    let d = decide_with_names(&rs, &ep, Direction::Ingress, &to("203.0.113.5"), &[NAME_A]);
    assert_eq!((d.verdict, d.rule), (Verdict::Allow, RULE_DEFAULT_ALLOW));
}

#[test]
fn a_stronger_admin_deny_of_the_address_still_denies_a_named_destination() {
    let entries = vec![
        entry(identity::WORLD, Tier::Admin, 10 * 32, Action::Deny, 5),
        entry(NAME_A, Tier::Admin, 20 * 32, Action::Allow, 7),
    ];
    let (rs, ep) = egress_ruleset(entries, None);
    let d = decide_with_names(&rs, &ep, Direction::Egress, &to("203.0.113.5"), &[NAME_A]);
    assert_eq!((d.verdict, d.rule), (Verdict::Deny, 5));
    // A weaker deny loses to the name's accept.
    let entries = vec![
        entry(CIDR, Tier::Admin, 30 * 32, Action::Deny, 5),
        entry(NAME_A, Tier::Admin, 20 * 32, Action::Allow, 7),
    ];
    let (rs, ep) = egress_ruleset(entries, None);
    let d = decide_with_names(&rs, &ep, Direction::Egress, &to("198.51.100.10"), &[NAME_A]);
    assert_eq!((d.verdict, d.rule), (Verdict::Allow, 7));
}

#[test]
fn a_stronger_admin_pass_of_the_address_hands_the_named_accept_down_a_tier() {
    let entries = vec![
        entry(identity::WORLD, Tier::Admin, 32, Action::Pass, 4),
        entry(NAME_A, Tier::Admin, 64, Action::Allow, 7),
    ];
    let (rs, ep) = egress_ruleset(entries, Some(9));
    let d = decide_with_names(&rs, &ep, Direction::Egress, &to("203.0.113.5"), &[NAME_A]);
    assert_eq!((d.verdict, d.rule), (Verdict::Deny, 9));
}

#[test]
fn identities_outside_the_name_range_are_not_taken_as_names() {
    let (rs, ep) = egress_ruleset(
        vec![entry(301, Tier::Application, 0, Action::Allow, 7)],
        Some(9),
    );
    let d = decide_with_names(&rs, &ep, Direction::Egress, &to("203.0.113.5"), &[301]);
    assert_eq!((d.verdict, d.rule), (Verdict::Deny, 9));
}

#[test]
fn names_never_change_the_decision_for_an_address_inside_the_cluster() {
    // A pod's address (identity 301 in the ipcache) that a DNS answer also named: decided by
    // the pod's identity alone, as the kernel does (`identity::names_apply_to`).
    let (mut rs, ep) = egress_ruleset(
        vec![entry(NAME_A, Tier::Admin, 320, Action::Allow, 7)],
        Some(9),
    );
    rs.ipcache
        .push(IpCacheEntry::new("10.0.0.9/32".parse().expect("net"), 301));
    let d = decide_with_names(&rs, &ep, Direction::Egress, &to("10.0.0.9"), &[NAME_A]);
    assert_eq!((d.verdict, d.rule), (Verdict::Deny, 9));
    // The same name for an address outside the cluster admits it.
    let d = decide_with_names(&rs, &ep, Direction::Egress, &to("203.0.113.5"), &[NAME_A]);
    assert_eq!((d.verdict, d.rule), (Verdict::Allow, 7));
}

#[test]
fn name_deltas_add_and_remove_patterns() {
    let (mut rs, _) = egress_ruleset(Vec::new(), None);
    let b = NameEntry::of(NamePattern::parse("*.example.org").expect("pattern"));
    let delta = NodeDelta {
        node: "n1".into(),
        from_version: 1,
        version: 2,
        names_removed: vec![NAME_A],
        names_added: vec![b.clone()],
        ..NodeDelta::default()
    };
    assert!(!delta.is_empty());
    assert_eq!(delta.size(), 2);
    rs.apply_delta(&delta).expect("applies");
    assert_eq!(rs.names, vec![b]);
    let json = serde_json::to_string(&rs).expect("json");
    assert_eq!(serde_json::from_str::<RuleSet>(&json).expect("back"), rs);
}
