use super::*;

#[test]
fn pod_keys_and_rule_kinds_read_back_what_they_print() {
    let pod: PodKey = "shop/web-0".parse().expect("a pod");
    assert_eq!(
        (pod.namespace.as_str(), pod.name.as_str()),
        ("shop", "web-0")
    );
    assert_eq!(pod.to_string().parse::<PodKey>(), Ok(pod));
    let remote: PodKey = "west/shop/web-0".parse().expect("a peer cluster's pod");
    assert_eq!(
        (remote.namespace.as_str(), remote.name.as_str()),
        ("west/shop", "web-0")
    );
    assert_eq!(remote.to_string().parse::<PodKey>(), Ok(remote));
    for bad in ["", "shop", "/web", "shop/", "a//c", "/b/c", "a/b/c/d"] {
        let err = bad.parse::<PodKey>().expect_err(bad);
        assert!(err.to_string().contains("NAMESPACE/POD"), "{err}");
    }
    for kind in RuleKind::ALL {
        assert_eq!(kind.to_string().parse::<RuleKind>(), Ok(kind.clone()));
        // The names the API printed with `{:?}` before, unchanged.
        assert_eq!(kind.to_string(), format!("{kind:?}"));
    }
    assert!("Networkpolicy".parse::<RuleKind>().is_err());
}

fn entry(peer: Identity, tier: Tier, priority: u16, action: Action, rule: RuleId) -> PolicyEntry {
    PolicyEntry {
        peer,
        protocol: Some(Protocol::Tcp),
        ports: PortRange::single(80),
        tier,
        priority,
        action,
        stage: Stage::Enforced,
        rule,
    }
}

#[test]
fn admin_deny_beats_application_allow() {
    let p = DirectionPolicy {
        isolated_by: Some(9),
        staged_isolated_by: Some(9),
        entries: vec![
            entry(300, Tier::Application, 0, Action::Allow, 1),
            entry(identity::ANY, Tier::Admin, 10, Action::Deny, 2),
        ],
    };
    let d = decide_direction(&p, 300, Some(Protocol::Tcp), Some(80));
    assert_eq!((d.verdict, d.rule), (Verdict::Deny, 2));
}

#[test]
fn pass_skips_to_application_tier_and_isolation_denies() {
    let p = DirectionPolicy {
        isolated_by: Some(9),
        staged_isolated_by: Some(9),
        entries: vec![
            entry(300, Tier::Admin, 5, Action::Pass, 1),
            entry(300, Tier::Admin, 6, Action::Allow, 2),
            entry(300, Tier::Baseline, 0, Action::Allow, 3),
        ],
    };
    let d = decide_direction(&p, 300, Some(Protocol::Tcp), Some(80));
    assert_eq!((d.verdict, d.rule), (Verdict::Deny, 9));
}

#[test]
fn baseline_applies_only_when_not_isolated() {
    let mut p = DirectionPolicy {
        isolated_by: None,
        staged_isolated_by: None,
        entries: vec![entry(300, Tier::Baseline, 0, Action::Deny, 3)],
    };
    let d = decide_direction(&p, 300, Some(Protocol::Tcp), Some(80));
    assert_eq!((d.verdict, d.rule), (Verdict::Deny, 3));
    p.entries
        .push(entry(300, Tier::Application, 0, Action::Allow, 4));
    let d = decide_direction(&p, 300, Some(Protocol::Tcp), Some(80));
    assert_eq!((d.verdict, d.rule), (Verdict::Allow, 4));
}

#[test]
fn deny_wins_at_equal_priority_and_audit_only_reports() {
    let mut deny = entry(identity::ANY, Tier::Application, 0, Action::Deny, 5);
    deny.stage = Stage::Staged;
    let p = DirectionPolicy {
        isolated_by: None,
        staged_isolated_by: None,
        entries: vec![entry(300, Tier::Application, 0, Action::Allow, 4), deny],
    };
    let d = decide_direction(&p, 300, Some(Protocol::Tcp), Some(80));
    assert_eq!((d.verdict, d.rule), (Verdict::Allow, 4));
    assert_eq!((d.audit_verdict, d.audit_rule), (Verdict::Deny, 5));
    assert!(d.audit_would_deny());
}

#[test]
fn a_staged_policy_replaces_the_enforced_one_of_its_name_only_in_the_staged_view() {
    // Enforced: NetworkPolicy 1 isolates and admits port 80 (superseded by a staged version
    // of itself that admits nothing on 80, and isolates with rule 7).
    let mut old = entry(300, Tier::Application, 0, Action::Allow, 4);
    old.stage = Stage::Superseded;
    let p = DirectionPolicy {
        isolated_by: Some(6),
        staged_isolated_by: Some(7),
        entries: vec![old],
    };
    let d = decide_direction(&p, 300, Some(Protocol::Tcp), Some(80));
    assert_eq!((d.verdict, d.rule), (Verdict::Allow, 4));
    assert_eq!((d.audit_verdict, d.audit_rule), (Verdict::Deny, 7));
    assert!(d.audit_would_deny());

    // A staged view without isolation (the staged replacement selects other pods): what
    // enforcement denies by default, the staged view allows, and says so.
    let p = DirectionPolicy {
        isolated_by: Some(6),
        staged_isolated_by: None,
        entries: vec![],
    };
    let d = decide_direction(&p, 300, Some(Protocol::Tcp), Some(80));
    assert_eq!((d.verdict, d.rule), (Verdict::Deny, 6));
    assert_eq!(
        (d.audit_verdict, d.audit_rule),
        (Verdict::Allow, RULE_DEFAULT_ALLOW)
    );
    assert!(!d.audit_would_deny());

    // A staged entry never decides the enforced verdict; a superseded one never the staged.
    for (stage, enforced, staged) in [
        (Stage::Enforced, true, true),
        (Stage::Staged, false, true),
        (Stage::Superseded, true, false),
    ] {
        assert_eq!(
            (stage.enforced(), stage.staged()),
            (enforced, staged),
            "{stage:?}"
        );
    }
}

#[test]
fn rule_sets_and_deltas_survive_json() {
    let policy = EndpointPolicy {
        ingress: DirectionPolicy {
            isolated_by: Some(9),
            staged_isolated_by: Some(9),
            entries: vec![entry(301, Tier::Application, 0, Action::Allow, 4)],
        },
        egress: DirectionPolicy::default(),
    };
    let endpoint = Endpoint {
        id: 1,
        namespace: "x".into(),
        pod: "a".into(),
        workload: None,
        identity: 300,
        ips: vec!["10.0.0.1".parse().expect("ip")],
        interface: None,
        quarantined: false,
        policy: 300,
    };
    let rs = RuleSet {
        node: "n1".into(),
        version: 3,
        endpoints: vec![endpoint],
        policies: [(300, policy.clone())].into_iter().collect(),
        ipcache: vec![],
        rules: BTreeMap::new(),
        names: Vec::new(),
        dns_resolvers: Vec::new(),
    };
    let text = serde_json::to_string(&rs).expect("serializes");
    assert_eq!(serde_json::from_str::<RuleSet>(&text).expect("parses"), rs);
    let mut changed = policy.clone();
    changed.ingress.entries.clear();
    let delta = NodeDelta {
        node: "n1".into(),
        from_version: 3,
        version: 4,
        policies_changed: [(300, PolicyDelta::between(&policy, &changed))]
            .into_iter()
            .collect(),
        ..NodeDelta::default()
    };
    let text = serde_json::to_string(&delta).expect("serializes");
    let parsed: NodeDelta = serde_json::from_str(&text).expect("parses");
    assert_eq!(parsed, delta);
    let mut applied = rs.clone();
    applied.apply_delta(&parsed).expect("applies");
    assert_eq!(applied.policies[&300], changed);
    assert_eq!(applied.version, 4);
}

#[test]
fn quarantine_allow_lists_travel_in_deltas_and_default_to_empty() {
    let net = |s: &str| -> IpNetwork { s.parse().expect("net") };
    // Rule sets written before the field existed still parse; empty lists are left out.
    let old = r#"{"cidr":"10.0.0.1/32","identity":300,"quarantined":true}"#;
    let e: IpCacheEntry = serde_json::from_str(old).expect("parses");
    assert!(e.quarantined && e.quarantine_allow.is_empty());
    assert!(!e.quarantine_admits(301));
    let plain =
        serde_json::to_string(&IpCacheEntry::new(net("10.0.0.2/32"), 301)).expect("serializes");
    assert!(!plain.contains("quarantine_allow"), "{plain}");
    let mut rs = RuleSet {
        node: "n1".into(),
        version: 1,
        ipcache: vec![e.clone(), IpCacheEntry::new(net("10.0.0.2/32"), 301)],
        ..RuleSet::default()
    };
    let mut upserted = e;
    upserted.quarantine_allow = vec![301, identity::FIRST_CIDR_IDENTITY];
    let delta = NodeDelta {
        node: "n1".into(),
        from_version: 1,
        version: 2,
        ipcache_upserted: vec![upserted.clone()],
        ..NodeDelta::default()
    };
    let text = serde_json::to_string(&delta).expect("serializes");
    rs.apply_delta(&serde_json::from_str(&text).expect("parses"))
        .expect("applies");
    assert_eq!(rs.ipcache[0], upserted);
    assert!(rs.ipcache[0].quarantine_admits(301));
    assert!(!rs.ipcache[0].quarantine_admits(302));
    let mut any = upserted;
    any.quarantine_allow = vec![identity::ANY];
    assert!(any.quarantine_admits(302));
}

#[test]
fn an_endpoint_without_its_group_is_denied_everything() {
    let rs = RuleSet {
        endpoints: vec![Endpoint {
            id: 1,
            namespace: "x".into(),
            pod: "a".into(),
            workload: None,
            identity: 300,
            ips: vec!["10.0.0.1".parse().expect("ip")],
            interface: None,
            quarantined: false,
            policy: 42,
        }],
        ..RuleSet::default()
    };
    assert_eq!(rs.dangling_policies(), vec![(1, 42)]);
    let packet = PacketTuple {
        src: "10.0.0.1".parse().expect("ip"),
        dst: "10.0.0.2".parse().expect("ip"),
        protocol: Some(Protocol::Tcp),
        dst_port: Some(80),
    };
    for d in Direction::ALL {
        let decision = decide(&rs, &rs.endpoints[0], d, &packet);
        assert_eq!(
            (decision.verdict, decision.rule),
            (Verdict::Deny, RULE_MISSING_POLICY)
        );
    }
}

#[test]
fn fragments_match_only_all_port_entries() {
    let mut all = entry(300, Tier::Application, 0, Action::Allow, 1);
    all.ports = PortRange::ALL;
    let one = entry(300, Tier::Application, 0, Action::Allow, 2);
    assert!(all.matches(300, Some(Protocol::Tcp), None));
    assert!(!one.matches(300, Some(Protocol::Tcp), None));
    assert!(!one.matches(301, Some(Protocol::Tcp), Some(80)));
    assert!(one.matches(300, Some(Protocol::Tcp), Some(80)));
}

mod ipcache_delta {
    use proptest::prelude::*;

    use super::*;

    /// What applying an ipcache change meant before the in-place path: nothing when the delta
    /// has no ipcache change, else removals, then upserts, through a map.
    fn through_a_map(
        list: &[IpCacheEntry],
        removed: &[IpNetwork],
        upserted: &[IpCacheEntry],
    ) -> Vec<IpCacheEntry> {
        if removed.is_empty() && upserted.is_empty() {
            return list.to_vec();
        }
        let mut m: BTreeMap<IpNetwork, IpCacheEntry> =
            list.iter().map(|e| (e.cidr, e.clone())).collect();
        for c in removed {
            m.remove(c);
        }
        for e in upserted {
            m.insert(e.cidr, e.clone());
        }
        m.into_values().collect()
    }

    fn net() -> impl Strategy<Value = IpNetwork> {
        // Few distinct prefixes, so removals and upserts hit existing entries often.
        (0u8..24, prop::sample::select(vec![24u8, 32])).prop_map(|(last, prefix)| {
            IpNetwork::new(std::net::IpAddr::from([10, 0, 0, last * 8]), prefix)
                .expect("valid prefix")
        })
    }

    fn entry() -> impl Strategy<Value = IpCacheEntry> {
        (
            net(),
            0u32..5,
            any::<bool>(),
            prop::collection::vec(0u32..4, 0..2),
        )
            .prop_map(
                |(cidr, identity, quarantined, quarantine_allow)| IpCacheEntry {
                    cidr,
                    identity,
                    quarantined,
                    quarantine_allow,
                },
            )
    }

    proptest! {
        /// Sorted or not, small change or large: the same list as rebuilding it through a map.
        #[test]
        fn an_ipcache_change_gives_what_the_map_gives(
            list in prop::collection::vec(entry(), 0..40),
            sort in any::<bool>(),
            removed in prop::collection::vec(net(), 0..40),
            upserted in prop::collection::vec(entry(), 0..40),
        ) {
            let list = if sort {
                let sorted: std::collections::BTreeMap<IpNetwork, IpCacheEntry> =
                    list.into_iter().map(|e| (e.cidr, e)).collect();
                sorted.into_values().collect()
            } else {
                list
            };
            let mut rs = RuleSet {
                node: "n".into(),
                version: 1,
                ipcache: list.clone(),
                ..Default::default()
            };
            let delta = NodeDelta {
                node: "n".into(),
                from_version: 1,
                version: 2,
                ipcache_removed: removed.clone(),
                ipcache_upserted: upserted.clone(),
                ..Default::default()
            };
            rs.apply_delta(&delta).expect("applies");
            prop_assert_eq!(rs.ipcache, through_a_map(&list, &removed, &upserted));
        }
    }
}

#[test]
fn a_delta_that_would_leave_an_endpoint_without_its_group_is_refused() {
    let endpoint = |id: u32, policy: PolicyGroupId| Endpoint {
        id,
        namespace: "x".into(),
        pod: format!("p{id}"),
        workload: None,
        identity: 300,
        ips: vec![format!("10.0.0.{id}").parse().expect("ip")],
        interface: None,
        quarantined: false,
        policy,
    };
    let rs = RuleSet {
        node: "n1".into(),
        version: 1,
        endpoints: vec![endpoint(1, 7), endpoint(2, 8)],
        policies: [
            (7, EndpointPolicy::default()),
            (8, EndpointPolicy::default()),
        ]
        .into(),
        ..RuleSet::default()
    };
    let delta = |f: &dyn Fn(&mut NodeDelta)| {
        let mut d = NodeDelta {
            node: "n1".into(),
            from_version: 1,
            version: 2,
            ..NodeDelta::default()
        };
        f(&mut d);
        d
    };
    let refused = [
        delta(&|d| d.policies_removed = vec![8]),
        delta(&|d| {
            d.endpoints_changed = vec![EndpointDelta {
                id: 1,
                identity: 300,
                ips: vec![],
                workload: None,
                policy: 9,
                quarantined: false,
            }]
        }),
        delta(&|d| d.endpoints_added = vec![endpoint(3, 9)]),
    ];
    for d in refused {
        let mut r = rs.clone();
        assert!(
            matches!(
                r.apply_delta(&d),
                Err(DeltaError::DanglingPolicyGroup { .. })
            ),
            "{d:?}"
        );
        assert_eq!(r, rs, "a refused delta changes nothing");
    }
    // Removing the group with its last endpoint, or only touching the ipcache, is fine.
    let mut r = rs.clone();
    r.apply_delta(&delta(&|d| {
        d.policies_removed = vec![8];
        d.endpoints_removed = vec![2];
    }))
    .expect("applies");
    assert_eq!(r.endpoints, vec![endpoint(1, 7)]);
    let mut r = rs.clone();
    r.apply_delta(&delta(&|d| {
        d.ipcache_upserted = vec![IpCacheEntry::new("10.0.0.9/32".parse().expect("net"), 5)]
    }))
    .expect("applies");
    assert_eq!(r.ipcache.len(), 1);
}

/// The resolvers travel whole: a delta with them replaces the list, one without keeps it, and
/// a removed node has none.
#[test]
fn a_delta_replaces_the_dns_resolvers_only_when_it_carries_them() {
    let a = |s: &str| -> IpAddr { s.parse().expect("address") };
    let mut rs = RuleSet {
        node: "n1".into(),
        version: 1,
        dns_resolvers: vec![a("10.240.1.10")],
        ..RuleSet::default()
    };
    let step = |from: u64, dns_resolvers: Option<Vec<IpAddr>>, node_removed: bool| NodeDelta {
        node: "n1".into(),
        from_version: from,
        version: from + 1,
        node_removed,
        dns_resolvers,
        ..NodeDelta::default()
    };
    let keep = step(1, None, false);
    assert!(keep.is_empty());
    rs.apply_delta(&keep).expect("applies");
    assert_eq!(rs.dns_resolvers, vec![a("10.240.1.10")]);
    let change = step(
        2,
        Some(vec![a("fd00::53"), a("10.96.0.10"), a("10.96.0.10")]),
        false,
    );
    assert!(!change.is_empty() && change.size() == 1);
    rs.apply_delta(&change).expect("applies");
    assert_eq!(rs.dns_resolvers, vec![a("10.96.0.10"), a("fd00::53")]);
    rs.apply_delta(&step(3, None, true)).expect("applies");
    assert!(rs.dns_resolvers.is_empty());
}
