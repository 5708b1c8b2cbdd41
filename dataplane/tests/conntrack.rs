//! Tier 2 for connection tracking: the real eBPF object under BPF_PROG_TEST_RUN, on packet
//! sequences that open, reply to, revoke and re-open connections, compared with the reference
//! model (`bulkhead_ruleset::conntrack`) verdict for verdict.
//!
//! Each test works in a network namespace of its own with an interface `ep0` standing for a
//! pod's host-side veth, and pins under a bpffs directory of its own; both go away when the test
//! ends, also when it fails.

mod common;

use std::net::{IpAddr, Ipv4Addr};

use bulkhead_agent::{
    loader::{PROG_FROM_POD, PROG_TO_POD},
    privileged::check_privileged_test,
    sync::{Enforcer, RouteResolver},
};
use bulkhead_common::{FlowEvent, reason};
use bulkhead_ruleset::{
    Direction, DirectionPolicy, EndpointPolicy, PolicyEntry, PortRange, Protocol, Verdict,
    conntrack::{ConnTracker, Judgement, TrackedPacket},
};
use common::*;
use rand::{Rng, SeedableRng, rngs::StdRng};

#[test]
fn replies_pass_only_for_tracked_connections_and_new_denies_cut_them() {
    if !check_privileged_test("replies_pass_only_for_tracked_connections_and_new_denies_cut_them") {
        return;
    }
    with_dataplane("conntrack", |e, ifx| {
        let ep = base_endpoint();
        let mut policy = base_policy();
        // Egress isolated with no rules: the pod may not open anything itself.
        policy.egress = DirectionPolicy {
            isolated_by: Some(9),
            staged_isolated_by: Some(9),
            entries: vec![],
        };
        e.apply(&base_ruleset(1, ep.clone(), policy.clone()), &RouteResolver)
            .expect("apply");

        assert_eq!(
            run(e, PROG_TO_POD, &tcp4(PEER_V4, EP_V4, 41000, 80), ifx),
            TC_ACT_OK
        );
        // The reply of that connection leaves the pod although egress is closed.
        assert_eq!(
            run(e, PROG_FROM_POD, &tcp4_ack(EP_V4, PEER_V4, 80, 41000), ifx),
            TC_ACT_OK
        );
        // A "reply" to a connection nobody opened is a new connection, and egress is closed.
        assert_eq!(
            run(e, PROG_FROM_POD, &tcp4_ack(EP_V4, PEER_V4, 80, 41001), ifx),
            TC_ACT_SHOT
        );
        // A SYN opens a connection and belongs to none: one that looks like the reply of the
        // tracked connection is judged by policy as new, and egress is closed.
        assert_eq!(
            run(e, PROG_FROM_POD, &tcp4(EP_V4, PEER_V4, 80, 41000), ifx),
            TC_ACT_SHOT
        );
        // Further forward packets of the tracked connection pass.
        assert_eq!(
            run(e, PROG_TO_POD, &tcp4_ack(PEER_V4, EP_V4, 41000, 80), ifx),
            TC_ACT_OK
        );

        // The policy no longer admits TCP 80: the established connection is cut.
        policy.ingress.entries.remove(0);
        e.apply(&base_ruleset(2, ep, policy), &RouteResolver)
            .expect("apply");
        assert_eq!(
            run(e, PROG_TO_POD, &tcp4_ack(PEER_V4, EP_V4, 41000, 80), ifx),
            TC_ACT_SHOT
        );
        assert_eq!(
            run(e, PROG_FROM_POD, &tcp4_ack(EP_V4, PEER_V4, 80, 41000), ifx),
            TC_ACT_SHOT
        );
    });
}

/// One conntrack entry serves both ends of a connection whichever way its ports are ordered,
/// and an ICMP error passes only when it quotes a packet of a tracked connection.
#[test]
fn conntrack_finds_replies_in_either_port_order_and_relates_icmp_errors() {
    if !check_privileged_test(
        "conntrack_finds_replies_in_either_port_order_and_relates_icmp_errors",
    ) {
        return;
    }
    with_dataplane("ct-order", |e, ifx| {
        let ep = base_endpoint();
        let mut policy = base_policy();
        // Egress: TCP 8080 to 301 only.
        policy.egress = DirectionPolicy {
            isolated_by: Some(9),
            staged_isolated_by: Some(9),
            entries: vec![allow(301, Some(Protocol::Tcp), PortRange::single(8080), 10)],
        };
        e.apply(&base_ruleset(1, ep, policy), &RouteResolver)
            .expect("apply");
        // The pod opens a connection from a port below the server's (the tuple is stored as
        // sent) and one from a port above it (stored reversed).
        for client in [1000u16, 50000] {
            assert_eq!(
                run(e, PROG_FROM_POD, &tcp4(EP_V4, PEER_V4, client, 8080), ifx),
                TC_ACT_OK
            );
            assert_eq!(
                run(e, PROG_TO_POD, &tcp4_ack(PEER_V4, EP_V4, 8080, client), ifx),
                TC_ACT_OK,
                "the reply to client port {client} passes although ingress admits only TCP 80"
            );
            assert_eq!(
                run(
                    e,
                    PROG_TO_POD,
                    &tcp4_ack(PEER_V4, EP_V4, 8080, client + 1),
                    ifx
                ),
                TC_ACT_SHOT,
                "no connection from client port {}",
                client + 1
            );
        }
        // A router's ICMP error about the tracked connection reaches the pod; one about a
        // connection nobody opened does not (ingress admits no ICMP from the world).
        assert_eq!(
            run(
                e,
                PROG_TO_POD,
                &icmp4_frag_needed(WORLD_V4, EP_V4, (EP_V4, PEER_V4, 1000, 8080)),
                ifx
            ),
            TC_ACT_OK
        );
        assert_eq!(
            run(
                e,
                PROG_TO_POD,
                &icmp4_frag_needed(WORLD_V4, EP_V4, (EP_V4, PEER_V4, 50000, 8080)),
                ifx
            ),
            TC_ACT_OK
        );
        assert_eq!(
            run(
                e,
                PROG_TO_POD,
                &icmp4_frag_needed(WORLD_V4, EP_V4, (EP_V4, PEER_V4, 1002, 8080)),
                ifx
            ),
            TC_ACT_SHOT
        );
    });
}

/// The monotonic clock, as the kernel's `ktime_get_ns` reads it.
fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct we own.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) },
        0
    );
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Connections whose ports are equal are ordered by address (the other branch of the canonical
/// order): the programs, which compare addresses as words, must store them under the key the
/// agent computes with `ct_swapped`, in both families. The timestamps they write come from the
/// jiffies clock the loader measured, and must read as the monotonic clock the agent converts
/// to wall time.
#[test]
fn conntrack_keys_follow_the_agents_order_and_clock() {
    if !check_privileged_test("conntrack_keys_follow_the_agents_order_and_clock") {
        return;
    }
    with_dataplane("ct-keys", |e, ifx| {
        let ep = base_endpoint();
        let mut policy = base_policy();
        // Egress: TCP 8080 to 301 only; anything else the pod sends passes only as a reply.
        policy.egress = isolated(
            9,
            vec![allow(301, Some(Protocol::Tcp), PortRange::single(8080), 10)],
        );
        // Peers whose first differing byte from the pod's address is not the last one, with
        // the last bytes ordered the other way: a word compare in the wrong byte order would
        // store these connections reversed.
        const PEER2_V4: [u8; 4] = [10, 0, 1, 1];
        const PEER2_V6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1];
        let mut rs = base_ruleset(1, ep, policy);
        for net in ["10.0.1.1/32", "fd00::1:1/128"] {
            rs.ipcache.push(bulkhead_ruleset::IpCacheEntry {
                cidr: net.parse().expect("cidr"),
                identity: 301,
                quarantined: false,
                quarantine_allow: Vec::new(),
            });
        }
        // An IPv4 connection the pod opened to 10.0.0.1:8080, tracked by an agent before
        // CONNTRACK_V4 under a 40-byte key: the first apply moves it, and its reply (which
        // ingress alone refuses) passes; the new rule set's generation re-checks it against the
        // egress policy that admits it.
        let v4 = |a: [u8; 4]| Ipv4Addr::from(a).to_ipv6_mapped().octets();
        let (sport, dport) = (50000u16.to_be(), 8080u16.to_be());
        let swapped = bulkhead_common::ct_swapped(&v4(EP_V4), &v4(PEER_V4), sport, dport);
        let old_key = bulkhead_common::CtKey {
            saddr: if swapped { v4(PEER_V4) } else { v4(EP_V4) },
            daddr: if swapped { v4(EP_V4) } else { v4(PEER_V4) },
            sport_be: if swapped { dport } else { sport },
            dport_be: if swapped { sport } else { dport },
            endpoint_id: 1,
            protocol: 6,
            direction: if swapped { 0 } else { 1 },
        };
        let old_value = bulkhead_common::CtValue {
            packets_fwd: 3,
            flags: bulkhead_common::CT_CANONICAL | bulkhead_common::CT_INITIATED_EGRESS,
            ..Default::default()
        };
        e.dataplane()
            .conntrack()
            .expect("conntrack")
            .insert(old_key, old_value, 0)
            .expect("an old agent's entry");
        // The copy the first apply makes before it switches programs: the old entry stays for
        // the old programs, the new map has it for the new ones.
        assert_eq!(
            e.dataplane().copy_ipv4_connections().expect("copy"),
            [old_key]
        );
        assert!(
            e.dataplane()
                .conntrack()
                .expect("ct")
                .get(&old_key, 0)
                .is_ok()
        );
        let k4 = bulkhead_common::CtKeyV4::narrow(&old_key).expect("an IPv4 key");
        assert_eq!(
            e.dataplane()
                .conntrack_v4()
                .expect("ct")
                .get(&k4, 0)
                .map(|v| v.packets_fwd)
                .ok(),
            Some(3)
        );
        e.apply(&rs, &RouteResolver).expect("apply");
        assert!(
            e.dataplane()
                .conntrack()
                .expect("ct")
                .get(&old_key, 0)
                .is_err()
        );
        assert_eq!(
            e.dataplane()
                .conntrack_v4()
                .expect("ct")
                .get(&k4, 0)
                .map(|v| v.packets_fwd)
                .ok(),
            Some(3)
        );
        assert_eq!(
            run(e, PROG_TO_POD, &tcp4_ack(PEER_V4, EP_V4, 8080, 50000), ifx),
            TC_ACT_OK,
            "the moved connection's reply"
        );
        // Revoked once egress no longer admits it, from the reply side too.
        let mut closed = rs.clone();
        closed.version = 2;
        if let Some(p) = closed.policies.get_mut(&base_endpoint().policy) {
            p.egress.entries.clear();
        }
        e.apply(&closed, &RouteResolver).expect("apply");
        assert_eq!(
            run(e, PROG_TO_POD, &tcp4_ack(PEER_V4, EP_V4, 8080, 50000), ifx),
            TC_ACT_SHOT,
            "the moved connection, revoked"
        );
        let cfg = e
            .dataplane()
            .config()
            .expect("config")
            .get(&0, 0)
            .expect("config slot");
        assert!(
            bulkhead_common::TICK_NSEC_CANDIDATES.contains(&cfg.jiffy_ns),
            "the loader measured the tick: {cfg:?}"
        );
        let before = monotonic_ns();
        // (opening packet, its reply, a packet of no connection, peer address, local address)
        type Case = (Vec<u8>, Vec<u8>, Vec<u8>, [u8; 16], [u8; 16]);
        let cases: [Case; 4] = [
            (
                udp4(PEER2_V4, EP_V4, 5353, 5353),
                udp4(EP_V4, PEER2_V4, 5353, 5353),
                udp4(EP_V4, PEER2_V4, 5353, 5354),
                v4(PEER2_V4),
                v4(EP_V4),
            ),
            (
                udp6(PEER2_V6, EP_V6, 5353, 5353),
                udp6(EP_V6, PEER2_V6, 5353, 5353),
                udp6(EP_V6, PEER2_V6, 5353, 5354),
                PEER2_V6,
                EP_V6,
            ),
            (
                udp4(PEER_V4, EP_V4, 5353, 5353),
                udp4(EP_V4, PEER_V4, 5353, 5353),
                udp4(EP_V4, PEER_V4, 5353, 5354),
                v4(PEER_V4),
                v4(EP_V4),
            ),
            (
                udp6(PEER_V6, EP_V6, 5353, 5353),
                udp6(EP_V6, PEER_V6, 5353, 5353),
                udp6(EP_V6, PEER_V6, 5353, 5354),
                PEER_V6,
                EP_V6,
            ),
        ];
        for (open, reply, unrelated, peer, local) in cases {
            assert_eq!(run(e, PROG_TO_POD, &open, ifx), TC_ACT_OK, "UDP from 301");
            assert_eq!(run(e, PROG_FROM_POD, &reply, ifx), TC_ACT_OK, "its reply");
            assert_eq!(
                run(e, PROG_FROM_POD, &unrelated, ifx),
                TC_ACT_SHOT,
                "no connection to port 5354"
            );
            // Opened by ingress traffic peer → local; stored in the agent's canonical order.
            let swapped =
                bulkhead_common::ct_swapped(&peer, &local, 5353u16.to_be(), 5353u16.to_be());
            let (saddr, daddr) = if swapped {
                (local, peer)
            } else {
                (peer, local)
            };
            let key = bulkhead_common::CtKey {
                saddr,
                daddr,
                sport_be: 5353u16.to_be(),
                dport_be: 5353u16.to_be(),
                endpoint_id: 1,
                protocol: 17,
                direction: if swapped { 1 } else { 0 },
            };
            let after = monotonic_ns();
            // IPv4 connections are in CONNTRACK_V4 under the narrow form of the same key.
            let v = match bulkhead_common::CtKeyV4::narrow(&key) {
                Some(k4) => e.dataplane().conntrack_v4().expect("conntrack").get(&k4, 0),
                None => e.dataplane().conntrack().expect("conntrack").get(&key, 0),
            }
            .expect("the connection is under the agent's key");
            assert_eq!((v.packets_fwd, v.packets_rev), (1, 1));
            let tick = cfg.jiffy_ns as u64;
            for t in [v.created_ns, v.last_seen_ns] {
                assert!(
                    t + 2 * tick >= before && t <= after + tick,
                    "conntrack time {t} is the monotonic clock ({before}..{after}, tick {tick})"
                );
            }
        }
    });
}

/// Packets the kernel counted for endpoint 1 under `why`.
fn counted(e: &mut Enforcer, why: u32) -> u64 {
    let slot = reason::COUNT + why; // endpoint 1's row
    e.dataplane()
        .counters()
        .expect("COUNTERS")
        .get(&slot, 0)
        .expect("counter slot")
        .iter()
        .map(|c| c.packets)
        .sum()
}

/// Every flow event the programs wrote so far (the ring buffer is taken: call once per test).
fn events(e: &mut Enforcer) -> Vec<FlowEvent> {
    let map = e.dataplane().take_map("EVENTS").expect("EVENTS map");
    let mut ring = aya::maps::RingBuf::try_from(map).expect("ring buffer");
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        assert_eq!(item.len(), size_of::<FlowEvent>());
        // SAFETY: the kernel wrote a FlowEvent (size checked); read unaligned.
        out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
    }
    out
}

/// IPv4 connections in the conntrack map, tombstones included.
fn tracked_v4(e: &mut Enforcer) -> usize {
    e.dataplane()
        .conntrack_v4()
        .expect("CONNTRACK_V4")
        .keys()
        .count()
}

fn isolated(rule: u32, entries: Vec<PolicyEntry>) -> DirectionPolicy {
    DirectionPolicy {
        isolated_by: Some(rule),
        staged_isolated_by: Some(rule),
        entries,
    }
}

/// A TCP connection the policy stops admitting is cut from both sides, whichever side's packet
/// notices first; the responder's packets never open it again (not even once its own egress
/// admits them, nor once the policy admits the connection again); a new SYN does, and the
/// revocation is reported once, in the orientation of the connection's opening.
#[test]
fn a_revoked_connection_stays_cut_from_both_sides_until_a_new_syn() {
    if !check_privileged_test("a_revoked_connection_stays_cut_from_both_sides_until_a_new_syn") {
        return;
    }
    with_dataplane("ct-revoke", |e, ifx| {
        let ep = base_endpoint();
        let open = base_policy();
        e.apply(&base_ruleset(1, ep.clone(), open.clone()), &RouteResolver)
            .expect("apply");
        let syn = tcp4(PEER_V4, EP_V4, 41000, 80);
        let ack = tcp4_ack(PEER_V4, EP_V4, 41000, 80);
        let reply = tcp4_ack(EP_V4, PEER_V4, 80, 41000);
        assert_eq!(run(e, PROG_TO_POD, &syn, ifx), TC_ACT_OK);
        assert_eq!(run(e, PROG_FROM_POD, &reply, ifx), TC_ACT_OK);

        // Ingress no longer admits TCP 80; egress now admits any TCP to the client.
        let mut closed = open.clone();
        closed.ingress.entries.remove(0);
        closed.egress = isolated(9, vec![allow(301, Some(Protocol::Tcp), PortRange::ALL, 10)]);
        e.apply(&base_ruleset(2, ep.clone(), closed), &RouteResolver)
            .expect("apply");
        // The server's packet (a retransmission, a push) notices first.
        assert_eq!(run(e, PROG_FROM_POD, &reply, ifx), TC_ACT_SHOT);
        assert_eq!(run(e, PROG_TO_POD, &ack, ifx), TC_ACT_SHOT);
        assert_eq!(run(e, PROG_FROM_POD, &reply, ifx), TC_ACT_SHOT);
        assert_eq!(counted(e, reason::DROP_REVOKED), 3);
        assert_eq!(counted(e, reason::ALLOWED_UNTRACKED), 0);

        // Admitted again: the old connection stays cut from both sides.
        e.apply(&base_ruleset(3, ep.clone(), open.clone()), &RouteResolver)
            .expect("apply");
        assert_eq!(run(e, PROG_FROM_POD, &reply, ifx), TC_ACT_SHOT);
        assert_eq!(run(e, PROG_TO_POD, &ack, ifx), TC_ACT_SHOT);
        assert_eq!(counted(e, reason::DROP_REVOKED), 5);
        // A new SYN opens it afresh.
        assert_eq!(run(e, PROG_TO_POD, &syn, ifx), TC_ACT_OK);
        assert_eq!(run(e, PROG_FROM_POD, &reply, ifx), TC_ACT_OK);
        assert_eq!(run(e, PROG_TO_POD, &ack, ifx), TC_ACT_OK);
        assert_eq!(
            tracked_v4(e),
            1,
            "one entry for the connection, tombstone replaced"
        );

        let revoked: Vec<FlowEvent> = events(e)
            .into_iter()
            .filter(|ev| ev.kind == bulkhead_common::EVENT_REVOKED)
            .collect();
        assert_eq!(revoked.len(), 1, "reported once: {revoked:?}");
        let ev = revoked[0];
        assert_eq!(
            (
                ev.direction,
                ev.rule_id,
                u16::from_be(ev.sport_be),
                u16::from_be(ev.dport_be)
            ),
            (bulkhead_common::DIR_INGRESS, 1, 41000, 80),
            "the connection as it was opened: 10.0.0.1:41000 -> 10.0.0.2:80, denied by rule 1"
        );
        assert_eq!(&ev.saddr[12..], &PEER_V4, "IPv4-mapped");
        assert_eq!(ev.reason, reason::DROP_REVOKED as u8);
    });
}

/// Only a SYN opens a TCP connection: a segment without SYN that belongs to none passes as its
/// own direction's policy admits it and leaves no entry, so the other side's segments are not
/// made into replies.
#[test]
fn a_tcp_segment_without_syn_opens_nothing() {
    if !check_privileged_test("a_tcp_segment_without_syn_opens_nothing") {
        return;
    }
    with_dataplane("ct-nosyn", |e, ifx| {
        let ep = base_endpoint();
        let mut policy = base_policy();
        policy.egress = isolated(
            9,
            vec![allow(
                301,
                Some(Protocol::Tcp),
                PortRange::single(40000),
                10,
            )],
        );
        e.apply(&base_ruleset(1, ep, policy), &RouteResolver)
            .expect("apply");
        // Egress admits TCP to port 40000: the segment passes, untracked.
        assert_eq!(
            run(e, PROG_FROM_POD, &tcp4_ack(EP_V4, PEER_V4, 81, 40000), ifx),
            TC_ACT_OK
        );
        assert_eq!(counted(e, reason::ALLOWED_UNTRACKED), 1);
        assert_eq!(tracked_v4(e), 0);
        // Ingress to port 81 is not admitted, and nothing makes it a reply.
        assert_eq!(
            run(e, PROG_TO_POD, &tcp4_ack(PEER_V4, EP_V4, 40000, 81), ifx),
            TC_ACT_SHOT
        );
        assert_eq!(counted(e, reason::DENIED_POLICY), 1);
        assert_eq!(tracked_v4(e), 0);
    });
}

/// A UDP flow the policy stops admitting is cut from both sides; the responder never re-opens
/// it, and the side that opened it does once a later policy admits it.
#[test]
fn a_revoked_udp_flow_is_reopened_by_its_opener_only() {
    if !check_privileged_test("a_revoked_udp_flow_is_reopened_by_its_opener_only") {
        return;
    }
    with_dataplane("ct-udp", |e, ifx| {
        let ep = base_endpoint();
        let mut open = base_policy();
        open.egress = isolated(9, vec![]);
        let request = udp4(PEER_V4, EP_V4, 5000, 53);
        let answer = udp4(EP_V4, PEER_V4, 53, 5000);
        e.apply(&base_ruleset(1, ep.clone(), open.clone()), &RouteResolver)
            .expect("apply");
        assert_eq!(run(e, PROG_TO_POD, &request, ifx), TC_ACT_OK);
        assert_eq!(run(e, PROG_FROM_POD, &answer, ifx), TC_ACT_OK);

        // No UDP in, any UDP out to the client: the flow is cut both ways.
        let mut closed = open.clone();
        closed.ingress.entries.remove(1);
        closed.egress = isolated(9, vec![allow(301, Some(Protocol::Udp), PortRange::ALL, 11)]);
        e.apply(&base_ruleset(2, ep.clone(), closed.clone()), &RouteResolver)
            .expect("apply");
        assert_eq!(run(e, PROG_TO_POD, &request, ifx), TC_ACT_SHOT);
        assert_eq!(run(e, PROG_FROM_POD, &answer, ifx), TC_ACT_SHOT);
        e.apply(&base_ruleset(3, ep.clone(), closed.clone()), &RouteResolver)
            .expect("apply");
        assert_eq!(run(e, PROG_FROM_POD, &answer, ifx), TC_ACT_SHOT);
        assert_eq!(run(e, PROG_TO_POD, &request, ifx), TC_ACT_SHOT);

        // Both directions admitted: the answer side still cannot, the asking side can.
        let mut both = open.clone();
        both.egress = closed.egress.clone();
        e.apply(&base_ruleset(4, ep, both), &RouteResolver)
            .expect("apply");
        assert_eq!(run(e, PROG_FROM_POD, &answer, ifx), TC_ACT_SHOT);
        assert_eq!(run(e, PROG_TO_POD, &request, ifx), TC_ACT_OK);
        assert_eq!(run(e, PROG_FROM_POD, &answer, ifx), TC_ACT_OK);
        assert_eq!(counted(e, reason::DROP_REVOKED), 5);
    });
}

/// Quarantine turns the endpoint's connections into tombstones at once; released, its old TCP
/// connections stay cut (a new SYN opens a new one) and its UDP flows come back only from the
/// side that opened them.
#[test]
fn quarantine_cuts_connections_for_good() {
    if !check_privileged_test("quarantine_cuts_connections_for_good") {
        return;
    }
    with_dataplane("ct-quarantine", |e, ifx| {
        let ep = base_endpoint();
        let policy = base_policy(); // egress open
        e.apply(&base_ruleset(1, ep.clone(), policy.clone()), &RouteResolver)
            .expect("apply");
        let syn = tcp4(PEER_V4, EP_V4, 41000, 80);
        let ack = tcp4_ack(PEER_V4, EP_V4, 41000, 80);
        let reply = tcp4_ack(EP_V4, PEER_V4, 80, 41000);
        let out = udp4(EP_V4, PEER_V4, 6000, 53);
        let back = udp4(PEER_V4, EP_V4, 53, 6000);
        for (prog, pkt) in [
            (PROG_TO_POD, &syn),
            (PROG_FROM_POD, &reply),
            (PROG_FROM_POD, &out),
            (PROG_TO_POD, &back),
        ] {
            assert_eq!(run(e, prog, pkt, ifx), TC_ACT_OK);
        }

        let mut quarantined = ep.clone();
        quarantined.quarantined = true;
        let cut_off = EndpointPolicy {
            ingress: isolated(50, vec![]),
            egress: isolated(50, vec![]),
        };
        let report = e
            .apply(&base_ruleset(2, quarantined, cut_off), &RouteResolver)
            .expect("apply");
        assert_eq!(report.connections_cut, 2, "{report:?}");
        for (prog, pkt) in [
            (PROG_FROM_POD, &reply),
            (PROG_TO_POD, &ack),
            (PROG_TO_POD, &back),
            (PROG_FROM_POD, &out),
        ] {
            assert_eq!(run(e, prog, pkt, ifx), TC_ACT_SHOT);
        }
        assert_eq!(counted(e, reason::DROP_REVOKED), 4);
        assert_eq!(run(e, PROG_TO_POD, &syn, ifx), TC_ACT_SHOT);
        assert_eq!(counted(e, reason::DROP_QUARANTINE), 1);

        // Released.
        e.apply(&base_ruleset(3, ep, policy), &RouteResolver)
            .expect("apply");
        for (prog, pkt) in [
            (PROG_FROM_POD, &reply),
            (PROG_TO_POD, &ack),
            (PROG_TO_POD, &back),
        ] {
            assert_eq!(run(e, prog, pkt, ifx), TC_ACT_SHOT);
        }
        for (prog, pkt) in [
            (PROG_FROM_POD, &out),
            (PROG_TO_POD, &back),
            (PROG_TO_POD, &syn),
            (PROG_FROM_POD, &reply),
        ] {
            assert_eq!(run(e, prog, pkt, ifx), TC_ACT_OK);
        }
    });
}

/// One flow of the stateful differential test, seen from the endpoint.
#[derive(Debug, Clone, Copy)]
struct Flow {
    peer: Ipv4Addr,
    protocol: Protocol,
    local_port: u16,
    remote_port: u16,
}

/// The kernel's conntrack and policy agree with the reference model, verdict for verdict, over
/// long random sequences: flows of TCP (SYN or not, from either side), UDP and ICMP echo with
/// pods and the world, under random policies that change every few dozen packets, and
/// quarantines that come and go.
#[test]
fn kernel_conntrack_agrees_with_the_reference_model() {
    if !check_privileged_test("kernel_conntrack_agrees_with_the_reference_model") {
        return;
    }
    with_dataplane("ct-differential", |e, ifx| {
        let seed = std::env::var("BULKHEAD_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0xc0ffee_u64);
        let mut rng = StdRng::seed_from_u64(seed);
        let local = Ipv4Addr::from(EP_V4);
        let peers = [
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 3),
            Ipv4Addr::from(WORLD_V4),
        ];
        // Ports inside the random policies' range (1..170) on both sides, so either side's
        // direction may or may not admit a flow.
        let ports = [53u16, 80, 81, 100, 119, 150];
        let flows: Vec<Flow> = (0..40)
            .map(|_| Flow {
                peer: peers[rng.random_range(0..peers.len())],
                protocol: [Protocol::Tcp, Protocol::Tcp, Protocol::Udp, Protocol::Icmp]
                    [rng.random_range(0..4)],
                local_port: ports[rng.random_range(0..ports.len())],
                remote_port: ports[rng.random_range(0..ports.len())],
            })
            .collect();
        let mut model = ConnTracker::new();
        let mut generation = 0u64;
        let mut ep = base_endpoint();
        let mut seen: std::collections::BTreeMap<&'static str, usize> = Default::default();
        let mut history: Vec<String> = Vec::new();
        for round in 0..100 {
            // A new rule set: a random policy, now and then a quarantine (or its end).
            let rs = {
                generation += 1;
                let quarantine = !ep.quarantined && rng.random_bool(0.15);
                let newly = quarantine;
                ep.quarantined = quarantine;
                let policy = EndpointPolicy {
                    ingress: random_direction(&mut rng, 1000),
                    egress: random_direction(&mut rng, 2000),
                };
                let mut rs = base_ruleset(generation, ep.clone(), policy);
                rs.ipcache.push(bulkhead_ruleset::IpCacheEntry::new(
                    "10.0.0.3/32".parse().expect("cidr"),
                    302,
                ));
                e.apply(&rs, &RouteResolver).expect("apply");
                if newly {
                    model.cut(ep.id, generation);
                }
                history.push(format!(
                    "round {round}: generation {generation}, quarantined {}, policy {:?}",
                    ep.quarantined,
                    rs.policies.get(&ep.policy)
                ));
                rs
            };
            for step in 0..60 {
                let f = flows[rng.random_range(0..flows.len())];
                let from_pod = rng.random_bool(0.5);
                let syn = f.protocol == Protocol::Tcp && rng.random_bool(0.15);
                let (src, sport, dst, dport) = if from_pod {
                    (local, f.local_port, f.peer, f.remote_port)
                } else {
                    (f.peer, f.remote_port, local, f.local_port)
                };
                let (pkt, sp, dp) = match f.protocol {
                    Protocol::Tcp if syn => {
                        (tcp4(src.octets(), dst.octets(), sport, dport), sport, dport)
                    }
                    Protocol::Tcp => (
                        tcp4_ack(src.octets(), dst.octets(), sport, dport),
                        sport,
                        dport,
                    ),
                    Protocol::Udp => (udp4(src.octets(), dst.octets(), sport, dport), sport, dport),
                    // An echo carries its identifier as both ports.
                    _ => (
                        icmp4_echo(src.octets(), dst.octets(), f.local_port),
                        f.local_port,
                        f.local_port,
                    ),
                };
                let packet = TrackedPacket {
                    src: IpAddr::V4(src),
                    dst: IpAddr::V4(dst),
                    protocol: Some(f.protocol),
                    src_port: sp,
                    dst_port: dp,
                    tcp_syn: syn,
                };
                let (direction, prog) = if from_pod {
                    (Direction::Egress, PROG_FROM_POD)
                } else {
                    (Direction::Ingress, PROG_TO_POD)
                };
                let want = model.packet(&rs, generation, &ep, direction, &packet);
                let got = run(e, prog, &pkt, ifx);
                let line = format!(
                    "step {step}: {packet:?} {direction:?} -> model {want:?}, kernel {got}"
                );
                let want_code = if want.verdict() == Verdict::Allow {
                    TC_ACT_OK
                } else {
                    TC_ACT_SHOT
                };
                if got != want_code {
                    let tail = history.len().saturating_sub(40);
                    panic!(
                        "seed {seed}: kernel and model disagree\n{line}\nrecent history:\n{}",
                        history[tail..].join("\n")
                    );
                }
                history.push(line);
                let kind = match want {
                    Judgement::Opened(_) => "opened",
                    Judgement::Tracked => "tracked",
                    Judgement::Untracked(_) => "untracked",
                    Judgement::Denied(_) => "denied",
                    Judgement::Revoked(_) => "revoked",
                    Judgement::StillRevoked => "still revoked",
                    Judgement::LockedDown => "locked down",
                };
                *seen.entry(kind).or_default() += 1;
            }
        }
        // Every part of the state machine was exercised.
        for kind in [
            "opened",
            "tracked",
            "untracked",
            "denied",
            "revoked",
            "still revoked",
        ] {
            assert!(
                seen.get(kind).copied().unwrap_or(0) >= 30,
                "seed {seed}: too few '{kind}' packets to compare: {seen:?}"
            );
        }
        eprintln!("kernel and model agreed on 6000 packets (seed {seed}): {seen:?}");
    });
}

/// The agent's `/connections` reads the pinned tables a page at a time: pages of a table cover
/// it exactly, with its total, and a revoked connection says so and names the rule that
/// revoked it.
#[test]
fn connections_are_listed_a_page_at_a_time() {
    if !check_privileged_test("connections_are_listed_a_page_at_a_time") {
        return;
    }
    with_dataplane_pins("ct-pages", |e, ifx, pins| {
        let ep = base_endpoint();
        let rs = base_ruleset(1, ep.clone(), base_policy());
        e.apply(&rs, &RouteResolver).expect("apply");
        for sport in 41000..41005u16 {
            assert_eq!(
                run(e, PROG_TO_POD, &tcp4(PEER_V4, EP_V4, sport, 80), ifx),
                TC_ACT_OK
            );
        }
        let ctx = bulkhead_agent::flows::FlowContext::new(&rs);
        let (all, total) = bulkhead_agent::flows::connections(pins, &ctx, 0, 100);
        assert_eq!((all.len(), total), (5, 5));
        let mut paged = Vec::new();
        for offset in (0..6).step_by(2) {
            let (page, total) = bulkhead_agent::flows::connections(pins, &ctx, offset, 2);
            assert_eq!(total, 5);
            assert_eq!(page.len(), 2.min(5 - offset.min(5)), "offset {offset}");
            paged.extend(page.into_iter().map(|c| c.src_port));
        }
        let mut ports: Vec<u16> = paged.clone();
        ports.sort();
        assert_eq!(ports, (41000..41005).collect::<Vec<_>>(), "{paged:?}");
        assert!(
            all.iter()
                .all(|c| !c.revoked && c.endpoint.to_string() == "test/server")
        );

        // TCP 80 no longer admitted: the next packet of one connection revokes it.
        let mut closed = base_policy();
        closed.ingress.entries.remove(0);
        e.apply(&base_ruleset(2, ep, closed), &RouteResolver)
            .expect("apply");
        assert_eq!(
            run(e, PROG_TO_POD, &tcp4_ack(PEER_V4, EP_V4, 41002, 80), ifx),
            TC_ACT_SHOT
        );
        let (all, _) = bulkhead_agent::flows::connections(pins, &ctx, 0, 100);
        let revoked: Vec<_> = all.iter().filter(|c| c.revoked).collect();
        assert_eq!(revoked.len(), 1, "{all:?}");
        assert_eq!((revoked[0].src_port, revoked[0].dst_port), (41002, 80));
    });
}
