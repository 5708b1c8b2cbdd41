//! Tier 2, issue 19: the kernel decides egress with the names a pod learned from DNS
//! (BPF_PROG_TEST_RUN on the real object). A new connection to a `world` or CIDR address that
//! the endpoint learned under live names is decided over the entries of the address's identity
//! and of every live name identity together, exactly as the reference `decide_with_names`;
//! a connection admitted that way keeps working when the names' TTL runs out (a policy change
//! re-checks it with the names it was admitted with), and is revoked by a policy that no
//! longer admits them; ingress, and egress to pods, never look at learned names; an endpoint
//! whose policy names no DNS name never looks them up.
//!
//! The learned entries are written straight into the learned maps, as the to-pod program
//! would after a DNS answer (that path is `dns_learning.rs`'s), with expiries chosen here.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{HashMap, MapData, RingBuf};
use bulkhead_agent::{
    fqdn::{MAP_LEARNED_V4, MAP_LEARNED_V6, monotonic_now_ns},
    loader::{Dataplane, PROG_FROM_POD, PROG_TO_POD},
    privileged::check_privileged_test,
    sync::{Enforcer, RouteResolver},
};
use bulkhead_common::{
    FlowEvent, VERDICT_ALLOW, VERDICT_DENY,
    fqdn::{FQDN_MAX_IDS, FqdnLearned, FqdnLearnedKeyV4, FqdnLearnedKeyV6},
    stat,
};
use bulkhead_ruleset::{
    Action, Direction, DirectionPolicy, Endpoint, EndpointPolicy, PacketTuple, PolicyEntry,
    PortRange, Protocol, RuleSet, Stage, Tier, Verdict, decide, decide_with_names, identity,
};
use common::*;
use rand::{Rng, SeedableRng, rngs::StdRng};

const N1: u32 = identity::FIRST_NAME_IDENTITY + 1;
const N2: u32 = identity::FIRST_NAME_IDENTITY + 2;
const N3: u32 = identity::FIRST_NAME_IDENTITY + 3;
/// A name no policy entry mentions (learned all the same: another policy's, or a stale one).
const N4: u32 = identity::FIRST_NAME_IDENTITY + 4;
const CIDR_A: u32 = identity::FIRST_CIDR_IDENTITY + 1;
const CIDR_B: u32 = identity::FIRST_CIDR_IDENTITY + 2;

const IN_CIDR_A: [u8; 4] = [198, 51, 100, 7];
const IN_CIDR_B: [u8; 4] = [198, 51, 100, 200];
const WORLD_V6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
const CIDR_A_V6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0xa, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];

const HOUR_NS: u64 = 3_600_000_000_000;

/// The endpoint (id 1, identity 300, `ep0`) with `policy`, and an ipcache with a pod peer
/// (301), two CIDR identities (198.51.100.0/24 and its upper /25, 2001:db8:a::/48) and
/// everything else `world`.
fn name_ruleset(version: u64, policy: EndpointPolicy) -> (RuleSet, Endpoint) {
    let ep = base_endpoint();
    let mut rs = ruleset(
        version,
        vec![ep.clone()],
        vec![
            ("10.0.0.2/32", 300),
            ("10.0.0.1/32", 301),
            ("fd00::2/128", 300),
            ("fd00::1/128", 301),
            ("198.51.100.0/24", CIDR_A),
            ("198.51.100.128/25", CIDR_B),
            ("2001:db8:a::/48", CIDR_A),
        ],
    );
    rs.policies.insert(ep.policy, policy);
    (rs, ep)
}

/// Writes what endpoint 1 learned about `addr`: (name id, expiry) slots; none removes it.
fn set_learned(dp: &mut Dataplane, addr: IpAddr, slots: &[(u32, u64)]) {
    let mut v = FqdnLearned::default();
    for (i, (id, exp)) in slots.iter().take(FQDN_MAX_IDS).enumerate() {
        v.name_ids[i] = *id;
        v.expires_ns[i] = *exp;
    }
    match addr {
        IpAddr::V4(a) => {
            let mut m: HashMap<&mut MapData, FqdnLearnedKeyV4, FqdnLearned> =
                dp.map_mut(MAP_LEARNED_V4).expect("learned v4");
            let k = FqdnLearnedKeyV4 {
                endpoint_id: 1,
                addr: u32::from_ne_bytes(a.octets()),
            };
            if slots.is_empty() {
                let _ = m.remove(&k);
            } else {
                m.insert(k, v, 0).expect("learn v4");
            }
        }
        IpAddr::V6(a) => {
            let mut m: HashMap<&mut MapData, FqdnLearnedKeyV6, FqdnLearned> =
                dp.map_mut(MAP_LEARNED_V6).expect("learned v6");
            let k = FqdnLearnedKeyV6 {
                endpoint_id: 1,
                addr: a.octets(),
            };
            if slots.is_empty() {
                let _ = m.remove(&k);
            } else {
                m.insert(k, v, 0).expect("learn v6");
            }
        }
    }
}

fn stat_sum(dp: &mut Dataplane, index: u32) -> u64 {
    dp.stats()
        .expect("STATS")
        .get(&index, 0)
        .expect("stat")
        .iter()
        .sum()
}

/// The events the programs wrote since the last call.
fn drain(ring: &mut RingBuf<MapData>) -> Vec<FlowEvent> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        assert_eq!(item.len(), size_of::<FlowEvent>());
        // SAFETY: the kernel wrote a FlowEvent (size checked); read unaligned.
        out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
    }
    out
}

fn events(e: &mut Enforcer) -> RingBuf<MapData> {
    let map = e.dataplane().take_map("EVENTS").expect("EVENTS map");
    RingBuf::try_from(map).expect("ring buffer")
}

fn code(v: Verdict) -> u8 {
    match v {
        Verdict::Allow => VERDICT_ALLOW,
        Verdict::Deny => VERDICT_DENY,
    }
}

fn entry(peer: u32, tier: Tier, priority: u16, action: Action, rule: u32) -> PolicyEntry {
    PolicyEntry {
        peer,
        protocol: None,
        ports: PortRange::ALL,
        tier,
        priority,
        action,
        stage: Stage::Enforced,
        rule,
    }
}

/// A random egress policy of the shapes the controller compiles names into: Admin Accepts by
/// name (CNP `domainNames`) and application-tier allows by name (ServicePolicy `fqdn`), beside
/// Admin denies and passes of CIDRs, `world` and everything at various priorities,
/// NetworkPolicy-tier allows and denies, baseline entries, staged entries and isolation.
fn random_egress(rng: &mut StdRng, base_rule: u32) -> DirectionPolicy {
    let mut entries = Vec::new();
    let n = rng.random_range(1..12);
    for i in 0..n {
        let rule = base_rule + 2 + i;
        let by_name = rng.random_bool(0.4);
        let peer = if by_name {
            [N1, N2, N3][rng.random_range(0..3)]
        } else {
            [identity::WORLD, CIDR_A, CIDR_B, identity::ANY, 301][rng.random_range(0..5)]
        };
        let tier = if by_name {
            [Tier::Admin, Tier::Application][rng.random_range(0..2)]
        } else {
            [Tier::Admin, Tier::Application, Tier::Baseline][rng.random_range(0..3)]
        };
        let action = if by_name {
            Action::Allow
        } else {
            [Action::Allow, Action::Deny, Action::Pass][rng.random_range(0..3)]
        };
        let action = if tier == Tier::Application && action == Action::Pass {
            Action::Deny
        } else {
            action
        };
        let first = rng.random_range(1..120u16);
        entries.push(PolicyEntry {
            peer,
            protocol: [
                None,
                Some(Protocol::Tcp),
                Some(Protocol::Udp),
                Some(Protocol::Icmp),
                Some(Protocol::Icmpv6),
            ][rng.random_range(0..5)],
            ports: match rng.random_range(0..3) {
                0 => PortRange::ALL,
                1 => PortRange::single(first),
                _ => PortRange {
                    first,
                    last: first + rng.random_range(0..50),
                },
            },
            tier,
            priority: if tier == Tier::Admin {
                rng.random_range(0..4) * 32 + rng.random_range(0..3)
            } else {
                0
            },
            action,
            stage: [
                Stage::Enforced,
                Stage::Enforced,
                Stage::Enforced,
                Stage::Staged,
                Stage::Superseded,
            ][rng.random_range(0..5)],
            rule,
        });
    }
    // At least one name entry, so the endpoint is one whose policy names DNS names.
    if !entries.iter().any(|e| identity::is_name(e.peer)) {
        entries.push(entry(N1, Tier::Admin, 40, Action::Allow, base_rule + 1));
    }
    DirectionPolicy {
        isolated_by: rng.random_bool(0.6).then_some(base_rule),
        staged_isolated_by: rng.random_bool(0.3).then_some(base_rule + 100),
        entries,
    }
}

/// (a) The kernel's verdict, deciding rule, staged verdict and staged rule for new egress
/// connections equal `decide_with_names` over the live learned names, on random rule sets and
/// random learned slots (live and expired); to a pod address the learned names are ignored
/// and the decision is `decide`'s.
#[test]
fn kernel_decides_with_live_names_as_the_reference() {
    if !check_privileged_test("kernel_decides_with_live_names_as_the_reference") {
        return;
    }
    with_dataplane("name-differential", |e, ifx| {
        let seed = std::env::var("BULKHEAD_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x19_u64);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut ring = events(e);
        let dests: [IpAddr; 6] = [
            IpAddr::V4(Ipv4Addr::from(WORLD_V4)),
            IpAddr::V4(Ipv4Addr::from(IN_CIDR_A)),
            IpAddr::V4(Ipv4Addr::from(IN_CIDR_B)),
            IpAddr::V4(Ipv4Addr::from(PEER_V4)),
            IpAddr::V6(Ipv6Addr::from(WORLD_V6)),
            IpAddr::V6(Ipv6Addr::from(CIDR_A_V6)),
        ];
        let (rs0, _) = name_ruleset(0, EndpointPolicy::default());
        assert_eq!(
            dests.map(|d| rs0.identity_of(d)),
            [
                identity::WORLD,
                CIDR_A,
                CIDR_B,
                301,
                identity::WORLD,
                CIDR_A
            ],
            "the destinations' identities"
        );
        let mut sport = 20000u16;
        let (mut cases, mut with_names, mut name_allowed) = (0, 0, 0);
        for round in 0..30u64 {
            let policy = EndpointPolicy {
                ingress: DirectionPolicy::default(),
                egress: random_egress(&mut rng, 1000 * (round as u32 + 1)),
            };
            let (rs, ep) = name_ruleset(round + 1, policy.clone());
            e.apply(&rs, &RouteResolver).expect("apply");
            // What the endpoint learned about each destination, each slot live or expired.
            let now = monotonic_now_ns();
            let mut live: Vec<Vec<u32>> = Vec::new();
            for d in dests {
                let mut slots = Vec::new();
                let mut live_ids = Vec::new();
                for id in [N1, N2, N3, N4] {
                    if rng.random_bool(0.45) {
                        if rng.random_bool(0.7) {
                            slots.push((id, now + HOUR_NS));
                            live_ids.push(id);
                        } else {
                            // Expired ten seconds ago.
                            slots.push((id, now - 10_000_000_000));
                        }
                    }
                }
                set_learned(e.dataplane(), d, &slots);
                live.push(live_ids);
            }
            drain(&mut ring);
            for _ in 0..120 {
                let di = rng.random_range(0..dests.len());
                let dst = dests[di];
                sport = sport.wrapping_add(1).max(20000);
                let port = rng.random_range(1..130u16);
                let (pkt, protocol, dst_port) = match (rng.random_range(0..3), dst) {
                    (0, IpAddr::V4(d)) => (
                        tcp4(EP_V4, d.octets(), sport, port),
                        Protocol::Tcp,
                        Some(port),
                    ),
                    (0, IpAddr::V6(d)) => (
                        tcp6(EP_V6, d.octets(), sport, port),
                        Protocol::Tcp,
                        Some(port),
                    ),
                    (1, IpAddr::V4(d)) => (
                        udp4(EP_V4, d.octets(), sport, port),
                        Protocol::Udp,
                        Some(port),
                    ),
                    (1, IpAddr::V6(d)) => (
                        udp6(EP_V6, d.octets(), sport, port),
                        Protocol::Udp,
                        Some(port),
                    ),
                    (_, IpAddr::V4(d)) => {
                        (icmp4_echo(EP_V4, d.octets(), sport), Protocol::Icmp, None)
                    }
                    (_, IpAddr::V6(d)) => {
                        (icmp6_echo(EP_V6, d.octets(), sport), Protocol::Icmpv6, None)
                    }
                };
                let src = match dst {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(EP_V4)),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(EP_V6)),
                };
                let tuple = PacketTuple {
                    src,
                    dst,
                    protocol: Some(protocol),
                    dst_port,
                };
                let peer = rs.identity_of(dst);
                // Names apply to addresses outside the cluster only (the reference says so
                // too): a pod's address is decided by its identity alone.
                let want = decide_with_names(&rs, &ep, Direction::Egress, &tuple, &live[di]);
                if !identity::names_apply_to(peer) {
                    assert_eq!(want, decide(&rs, &ep, Direction::Egress, &tuple));
                }
                let got = run(e, PROG_FROM_POD, &pkt, ifx);
                let want_code = if want.verdict == Verdict::Allow {
                    TC_ACT_OK
                } else {
                    TC_ACT_SHOT
                };
                let context = || {
                    format!(
                        "seed {seed} round {round}: {tuple:?} peer {peer:#x} live names {:?}\nreference {want:?}\negress {:#?}",
                        live[di], policy.egress
                    )
                };
                assert_eq!(got, want_code, "{}", context());
                let evs = drain(&mut ring);
                let ev = evs
                    .last()
                    .unwrap_or_else(|| panic!("no event: {}", context()));
                assert_eq!(
                    (ev.verdict, ev.rule_id, ev.audit_verdict, ev.audit_rule_id),
                    (
                        code(want.verdict),
                        want.rule,
                        code(want.audit_verdict),
                        want.audit_rule
                    ),
                    "{}",
                    context()
                );
                cases += 1;
                if identity::names_apply_to(peer) && !live[di].is_empty() {
                    with_names += 1;
                    let without = decide(&rs, &ep, Direction::Egress, &tuple);
                    if want.verdict == Verdict::Allow && without.verdict == Verdict::Deny {
                        name_allowed += 1;
                    }
                }
            }
        }
        // The cases the names decide must be there in numbers, else the test tests nothing.
        assert!(
            cases >= 3000 && with_names >= 1000 && name_allowed >= 100,
            "{cases} packets, {with_names} with live names, {name_allowed} admitted by them"
        );
        eprintln!(
            "kernel and reference agreed on {cases} packets, {with_names} with live names ({name_allowed} admitted only by a name; seed {seed})"
        );
    });
}

/// Egress: Admin Accept of `N1` on TCP 443 and UDP 53 at priority 10; world denied by an Admin
/// Deny of everything at priority 40 (after the name's Accept); isolated.
fn accept_by_name(name: u32) -> EndpointPolicy {
    let mut tcp = entry(name, Tier::Admin, 10, Action::Allow, 30);
    tcp.protocol = Some(Protocol::Tcp);
    tcp.ports = PortRange::single(443);
    let mut udp = entry(name, Tier::Admin, 10, Action::Allow, 31);
    udp.protocol = Some(Protocol::Udp);
    udp.ports = PortRange::single(5353);
    EndpointPolicy {
        ingress: base_policy().ingress,
        egress: DirectionPolicy {
            isolated_by: Some(1),
            staged_isolated_by: Some(1),
            entries: vec![
                tcp,
                udp,
                entry(identity::ANY, Tier::Admin, 40, Action::Deny, 32),
            ],
        },
    }
}

fn conntrack_names(dp: &mut Dataplane) -> Vec<[u32; FQDN_MAX_IDS]> {
    dp.conntrack_v4()
        .expect("conntrack")
        .iter()
        .flatten()
        .map(|(_, v)| v.names)
        .collect()
}

/// (b) A connection admitted by a name keeps working after the name's TTL runs out, also
/// across a policy change that does not concern it; a new connection to the same address is
/// refused once the name expired; a policy that no longer admits the name revokes it.
#[test]
fn expiry_stops_new_connections_and_never_cuts_established_ones() {
    if !check_privileged_test("expiry_stops_new_connections_and_never_cuts_established_ones") {
        return;
    }
    with_dataplane("name-expiry", |e, ifx| {
        let world = IpAddr::V4(Ipv4Addr::from(WORLD_V4));
        let (rs, _) = name_ruleset(1, accept_by_name(N1));
        e.apply(&rs, &RouteResolver).expect("apply");
        let now = monotonic_now_ns();
        set_learned(e.dataplane(), world, &[(N1, now + HOUR_NS)]);

        // Admitted by the name: TCP and a UDP flow, both tracked with the name recorded.
        assert_eq!(
            run(e, PROG_FROM_POD, &tcp4(EP_V4, WORLD_V4, 40000, 443), ifx),
            TC_ACT_OK
        );
        assert_eq!(
            run(e, PROG_TO_POD, &tcp4_ack(WORLD_V4, EP_V4, 443, 40000), ifx),
            TC_ACT_OK,
            "the reply of a tracked connection"
        );
        assert_eq!(
            run(e, PROG_FROM_POD, &udp4(EP_V4, WORLD_V4, 40001, 5353), ifx),
            TC_ACT_OK
        );
        let recorded = conntrack_names(e.dataplane());
        assert_eq!(recorded.len(), 2, "{recorded:?}");
        assert!(recorded.iter().all(|n| n.contains(&N1)), "{recorded:?}");
        // Not by the name: port 80 is not in its entry.
        assert_eq!(
            run(e, PROG_FROM_POD, &tcp4(EP_V4, WORLD_V4, 40002, 80), ifx),
            TC_ACT_SHOT
        );

        // The TTL runs out (ten seconds ago: the programs' clock advances by ticks).
        set_learned(e.dataplane(), world, &[(N1, now - 10_000_000_000)]);
        assert_eq!(
            run(e, PROG_FROM_POD, &tcp4(EP_V4, WORLD_V4, 40003, 443), ifx),
            TC_ACT_SHOT,
            "a new connection needs a live name"
        );
        assert_eq!(
            run(
                e,
                PROG_FROM_POD,
                &tcp4_ack(EP_V4, WORLD_V4, 40000, 443),
                ifx
            ),
            TC_ACT_OK
        );
        assert_eq!(
            run(e, PROG_FROM_POD, &udp4(EP_V4, WORLD_V4, 40001, 5353), ifx),
            TC_ACT_OK
        );

        // A policy change that does not concern them (ingress gains an entry): both are
        // re-checked, with the name they were admitted with, and stay.
        let mut changed = accept_by_name(N1);
        changed
            .ingress
            .entries
            .push(allow(302, None, PortRange::ALL, 9));
        let (rs2, _) = name_ruleset(2, changed);
        e.apply(&rs2, &RouteResolver).expect("apply");
        assert_eq!(
            run(
                e,
                PROG_FROM_POD,
                &tcp4_ack(EP_V4, WORLD_V4, 40000, 443),
                ifx
            ),
            TC_ACT_OK
        );
        assert_eq!(
            run(e, PROG_TO_POD, &tcp4_ack(WORLD_V4, EP_V4, 443, 40000), ifx),
            TC_ACT_OK
        );
        assert_eq!(
            run(e, PROG_TO_POD, &udp4(WORLD_V4, EP_V4, 5353, 40001), ifx),
            TC_ACT_OK
        );
        assert_eq!(
            run(e, PROG_FROM_POD, &tcp4(EP_V4, WORLD_V4, 40004, 443), ifx),
            TC_ACT_SHOT,
            "still no new connection"
        );

        // The name's allow goes (another name is admitted instead): revoked, from both sides.
        let (rs3, _) = name_ruleset(3, accept_by_name(N2));
        e.apply(&rs3, &RouteResolver).expect("apply");
        assert_eq!(
            run(e, PROG_TO_POD, &tcp4_ack(WORLD_V4, EP_V4, 443, 40000), ifx),
            TC_ACT_SHOT
        );
        assert_eq!(
            run(
                e,
                PROG_FROM_POD,
                &tcp4_ack(EP_V4, WORLD_V4, 40000, 443),
                ifx
            ),
            TC_ACT_SHOT
        );
        assert_eq!(
            run(e, PROG_FROM_POD, &udp4(EP_V4, WORLD_V4, 40001, 5353), ifx),
            TC_ACT_SHOT
        );

        // A revoked UDP flow is re-opened by its opener once a later policy admits its name
        // again: with the name it was admitted with, although that expired.
        let (rs4, _) = name_ruleset(4, accept_by_name(N1));
        e.apply(&rs4, &RouteResolver).expect("apply");
        assert_eq!(
            run(e, PROG_FROM_POD, &udp4(EP_V4, WORLD_V4, 40001, 5353), ifx),
            TC_ACT_OK
        );
        assert_eq!(
            run(e, PROG_FROM_POD, &udp4(EP_V4, WORLD_V4, 40005, 5353), ifx),
            TC_ACT_SHOT,
            "a new flow needs a live name"
        );
    });
}

/// (c) Ingress from a learned address, and egress to a pod address the endpoint learned under
/// a name, are decided by the address's identity alone, and look nothing up.
#[test]
fn ingress_and_pod_peers_ignore_learned_names() {
    if !check_privileged_test("ingress_and_pod_peers_ignore_learned_names") {
        return;
    }
    with_dataplane("name-ingress", |e, ifx| {
        let (rs, _) = name_ruleset(1, accept_by_name(N1));
        e.apply(&rs, &RouteResolver).expect("apply");
        let now = monotonic_now_ns();
        for a in [
            IpAddr::V4(Ipv4Addr::from(WORLD_V4)),
            IpAddr::V4(Ipv4Addr::from(PEER_V4)),
        ] {
            set_learned(e.dataplane(), a, &[(N1, now + HOUR_NS)]);
        }
        let before = stat_sum(e.dataplane(), stat::NAME_LOOKUPS);
        // Ingress from the learned world address to 443: the ingress policy admits only 301.
        assert_eq!(
            run(e, PROG_TO_POD, &tcp4(WORLD_V4, EP_V4, 40000, 443), ifx),
            TC_ACT_SHOT
        );
        // Egress to the pod 301 on 443: egress is isolated and nothing admits 301, whatever
        // the pod learned about its address.
        assert_eq!(
            run(e, PROG_FROM_POD, &tcp4(EP_V4, PEER_V4, 40001, 443), ifx),
            TC_ACT_SHOT
        );
        assert_eq!(
            stat_sum(e.dataplane(), stat::NAME_LOOKUPS),
            before,
            "no lookup"
        );
        // The same egress to the learned world address is admitted by the name.
        assert_eq!(
            run(e, PROG_FROM_POD, &tcp4(EP_V4, WORLD_V4, 40002, 443), ifx),
            TC_ACT_OK
        );
        assert_eq!(stat_sum(e.dataplane(), stat::NAME_LOOKUPS), before + 1);
    });
}

/// (d) An endpoint whose policy names no DNS name pays no lookup of learned names, whatever it
/// learned; the same endpoint with a name policy does, once per new egress connection to an
/// address outside the cluster.
#[test]
fn endpoints_without_name_entries_look_nothing_up() {
    if !check_privileged_test("endpoints_without_name_entries_look_nothing_up") {
        return;
    }
    with_dataplane("name-nolookup", |e, ifx| {
        let mut plain = accept_by_name(N1);
        plain
            .egress
            .entries
            .retain(|en| !identity::is_name(en.peer));
        let (rs, _) = name_ruleset(1, plain);
        e.apply(&rs, &RouteResolver).expect("apply");
        let now = monotonic_now_ns();
        set_learned(
            e.dataplane(),
            IpAddr::V4(Ipv4Addr::from(WORLD_V4)),
            &[(N1, now + HOUR_NS)],
        );
        for sport in 40000..40010 {
            assert_eq!(
                run(e, PROG_FROM_POD, &tcp4(EP_V4, WORLD_V4, sport, 443), ifx),
                TC_ACT_SHOT
            );
        }
        assert_eq!(stat_sum(e.dataplane(), stat::NAME_LOOKUPS), 0);
        assert_eq!(stat_sum(e.dataplane(), stat::NAME_DECISIONS), 0);

        let (rs, _) = name_ruleset(2, accept_by_name(N1));
        e.apply(&rs, &RouteResolver).expect("apply");
        for sport in 40010..40020 {
            assert_eq!(
                run(e, PROG_FROM_POD, &tcp4(EP_V4, WORLD_V4, sport, 443), ifx),
                TC_ACT_OK
            );
        }
        assert_eq!(stat_sum(e.dataplane(), stat::NAME_LOOKUPS), 10);
        assert_eq!(stat_sum(e.dataplane(), stat::NAME_DECISIONS), 10);
    });
}

/// An agent upgraded from before `CtValue::names` (64-byte conntrack values) keeps the
/// connections the old one tracked: they are read from the old pinned map before it is
/// replaced, and written into the new one without names.
#[test]
fn connections_tracked_before_names_survive_the_upgrade() {
    if !check_privileged_test("connections_tracked_before_names_survive_the_upgrade") {
        return;
    }
    let pins = PinDir::new("ct-before-names");
    let maps = pins.path().join("maps");
    std::fs::create_dir_all(&maps).expect("pin directory");
    bulkhead_agent::loader::ensure_bpffs().expect("bpffs");
    let pin = maps.join("CONNTRACK_V4");
    let bpftool = |args: &[&str]| {
        let status = std::process::Command::new("bpftool")
            .args(args)
            .status()
            .expect("run bpftool");
        assert!(status.success(), "bpftool {args:?}");
    };
    let pin_s = pin.to_str().expect("utf-8 path");
    bpftool(&[
        "map",
        "create",
        pin_s,
        "type",
        "lru_hash",
        "key",
        "16",
        "value",
        "64",
        "entries",
        "262144",
        "name",
        "CONNTRACK_V4",
    ]);
    let key = bulkhead_common::CtKeyV4 {
        saddr: u32::from_ne_bytes(EP_V4),
        daddr: u32::from_ne_bytes(WORLD_V4),
        sport_be: 40000u16.to_be(),
        dport_be: 443u16.to_be(),
        endpoint_id: 1,
        protocol: 6,
        direction: bulkhead_common::DIR_EGRESS,
    };
    let mut key_bytes = Vec::new();
    key_bytes.extend_from_slice(&key.saddr.to_ne_bytes());
    key_bytes.extend_from_slice(&key.daddr.to_ne_bytes());
    key_bytes.extend_from_slice(&key.sport_be.to_ne_bytes());
    key_bytes.extend_from_slice(&key.dport_be.to_ne_bytes());
    key_bytes.extend_from_slice(&key.endpoint_id.to_ne_bytes());
    key_bytes.extend_from_slice(&[key.protocol, key.direction]);
    let flags = bulkhead_common::CT_CANONICAL | bulkhead_common::CT_INITIATED_EGRESS;
    let mut value = vec![0u8; 64];
    value[16..24].copy_from_slice(&3u64.to_ne_bytes());
    value[48..52].copy_from_slice(&5u32.to_ne_bytes());
    value[52..56].copy_from_slice(&7u32.to_ne_bytes());
    value[56..60].copy_from_slice(&identity::WORLD.to_ne_bytes());
    value[60..64].copy_from_slice(&flags.to_ne_bytes());
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>();
    let (kh, vh) = (hex(&key_bytes), hex(&value));
    let mut args = vec!["map", "update", "pinned", pin_s, "key", "hex"];
    args.extend(kh.iter().map(String::as_str));
    args.extend(["value", "hex"]);
    args.extend(vh.iter().map(String::as_str));
    bpftool(&args);

    let mut dp = Dataplane::load(pins.path()).expect("load over the old conntrack");
    let v = dp
        .conntrack_v4()
        .expect("conntrack")
        .get(&key, 0)
        .expect("the old connection is tracked");
    assert_eq!(
        (
            v.packets_fwd,
            v.generation,
            v.rule_id,
            v.peer_identity,
            v.flags,
            v.names
        ),
        (3, 5, 7, identity::WORLD, flags, [0; FQDN_MAX_IDS])
    );
    let pinned = aya::maps::MapInfo::from_pin(&pin).expect("pinned map");
    assert_eq!(
        pinned.value_size() as usize,
        size_of::<bulkhead_common::CtValue>()
    );
}
