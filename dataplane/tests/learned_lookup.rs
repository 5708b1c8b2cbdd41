//! Tier 2, issue 19: the point lookup of what an endpoint learned for one address, as the flow
//! reader uses it. The real eBPF object learns from DNS answers (BPF_PROG_TEST_RUN on
//! `bulkhead_to_pod`); `Dataplane::learned_at` and `LearnedMaps` (the pinned maps, opened as
//! the flow reader opens them) then answer for (endpoint, address) what the full walk
//! (`learned`) holds, IPv4 and IPv6, and nothing for what was not learned; a flow event to the
//! learned address becomes a record that names its peer by the rule set's pattern.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bulkhead_agent::{
    flows::{FlowContext, record_named},
    fqdn::{LearnedMaps, NamePattern},
    loader::PROG_TO_POD,
    privileged::check_privileged_test,
    sync::{Enforcer, RouteResolver},
};
use bulkhead_common::{
    DIR_EGRESS, EVENT_DENIED, FAMILY_V4, FAMILY_V6, FlowEvent, VERDICT_DENY, identity,
};
use bulkhead_ruleset::{DirectionPolicy, EndpointPolicy, NameEntry, PortRange};
use common::*;

const RESOLVER_V4: [u8; 4] = [10, 96, 0, 10];
const RESOLVER_V6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x53];
const ENDPOINT_ID: u32 = 1;
const LEARNED_V4: [u8; 4] = [198, 51, 100, 50];
const LEARNED_V6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x50];

fn wire_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// A response (QR, RD, RA, RCODE 0) to `qname` with one answer of `rtype` for the question's
/// name (a pointer to offset 12).
fn answer(qname: &str, rtype: u16, rdata: &[u8]) -> Vec<u8> {
    let mut m = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
    m.extend_from_slice(&wire_name(qname));
    m.extend_from_slice(&rtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m.extend_from_slice(&[0xc0, 12]);
    m.extend_from_slice(&rtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m.extend_from_slice(&300u32.to_be_bytes());
    m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    m.extend_from_slice(rdata);
    m
}

fn udp_answer_v4(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(RESOLVER_V4, EP_V4, 64)
        .udp(53, 40000)
        .write(&mut out, payload)
        .expect("build packet");
    out
}

fn udp_answer_v6(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv6(RESOLVER_V6, EP_V6, 64)
        .udp(53, 40000)
        .write(&mut out, payload)
        .expect("build packet");
    out
}

fn pattern(text: &str) -> NamePattern {
    text.parse().expect("a valid pattern")
}

/// The rule set: ingress open to the resolvers' identity, the name api.example.com listed.
fn ruleset(api: &NameEntry) -> bulkhead_ruleset::RuleSet {
    let policy = EndpointPolicy {
        ingress: DirectionPolicy {
            isolated_by: Some(1),
            staged_isolated_by: Some(1),
            entries: vec![allow(301, None, PortRange::ALL, 2)],
        },
        egress: DirectionPolicy::default(),
    };
    let mut rs = base_ruleset(1, base_endpoint(), policy);
    for cidr in ["10.96.0.10/32", "fd00::53/128"] {
        rs.ipcache.push(bulkhead_ruleset::IpCacheEntry {
            cidr: cidr.parse().expect("cidr"),
            identity: 301,
            quarantined: false,
            quarantine_allow: Vec::new(),
        });
    }
    rs.names = vec![api.clone()];
    rs
}

/// A denied egress attempt of the endpoint to `dst`.
fn denied_egress(family: u8, dst: [u8; 16]) -> FlowEvent {
    let saddr = if family == FAMILY_V4 {
        let mut b = [0u8; 16];
        b[10] = 0xff;
        b[11] = 0xff;
        b[12..].copy_from_slice(&EP_V4);
        b
    } else {
        EP_V6
    };
    FlowEvent {
        saddr,
        daddr: dst,
        sport_be: 40000u16.to_be(),
        dport_be: 443u16.to_be(),
        protocol: 6,
        family,
        direction: DIR_EGRESS,
        kind: EVENT_DENIED,
        verdict: VERDICT_DENY,
        endpoint_id: ENDPOINT_ID,
        local_identity: 300,
        peer_identity: identity::WORLD,
        ..Default::default()
    }
}

#[test]
fn a_learned_address_is_found_by_endpoint_and_address_and_names_the_flow() {
    if !check_privileged_test(
        "a_learned_address_is_found_by_endpoint_and_address_and_names_the_flow",
    ) {
        return;
    }
    with_dataplane_pins("learned-lookup", |e: &mut Enforcer, ifx, pins| {
        let api = NameEntry::of(pattern("api.example.com"));
        let rs = ruleset(&api);
        e.apply(&rs, &RouteResolver).expect("apply");
        let dp = e.dataplane();
        dp.ensure_fqdn_config(0, 0).expect("fqdn config");
        dp.add_trusted_resolver(IpAddr::V4(Ipv4Addr::from(RESOLVER_V4)))
            .expect("resolver");
        dp.add_trusted_resolver(IpAddr::V6(Ipv6Addr::from(RESOLVER_V6)))
            .expect("resolver");
        dp.set_fqdn_name(&api.pattern, api.identity).expect("name");
        for pkt in [
            udp_answer_v4(&answer("api.example.com", 1, &LEARNED_V4)),
            udp_answer_v6(&answer("api.example.com", 28, &LEARNED_V6)),
        ] {
            assert_eq!(
                run(e, PROG_TO_POD, &pkt, ifx),
                TC_ACT_OK,
                "the answer passes"
            );
        }

        let v4 = IpAddr::V4(Ipv4Addr::from(LEARNED_V4));
        let v6 = IpAddr::V6(Ipv6Addr::from(LEARNED_V6));
        let all = e.dataplane().learned().expect("learned");
        assert_eq!(all.len(), 2, "{all:?}");
        let maps = LearnedMaps::open(pins).expect("open the pinned learned maps");
        for addr in [v4, v6] {
            let walked = all
                .iter()
                .find(|l| l.addr == addr)
                .cloned()
                .expect("learned");
            assert_eq!(walked.names.len(), 1);
            assert_eq!(walked.names[0].0, api.identity);
            // The point lookups answer what the walk holds.
            assert_eq!(
                e.dataplane().learned_at(ENDPOINT_ID, addr).expect("lookup"),
                Some(walked.clone())
            );
            assert_eq!(maps.get(ENDPOINT_ID, addr).expect("get"), walked.names);
            // Another endpoint learned nothing for it.
            assert_eq!(
                e.dataplane()
                    .learned_at(ENDPOINT_ID + 1, addr)
                    .expect("lookup"),
                None
            );
            assert!(maps.get(ENDPOINT_ID + 1, addr).expect("get").is_empty());
        }
        // An address nobody learned.
        let other = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 51));
        assert_eq!(
            e.dataplane()
                .learned_at(ENDPOINT_ID, other)
                .expect("lookup"),
            None
        );
        assert!(maps.get(ENDPOINT_ID, other).expect("get").is_empty());

        // The flow reader's path: a denied attempt to the learned address names its peer.
        let ctx = FlowContext::new(&rs);
        let mut dst4 = [0u8; 16];
        dst4[10] = 0xff;
        dst4[11] = 0xff;
        dst4[12..].copy_from_slice(&LEARNED_V4);
        for (event, dst) in [
            (denied_egress(FAMILY_V4, dst4), v4),
            (denied_egress(FAMILY_V6, LEARNED_V6), v6),
        ] {
            let r = record_named(&ctx, Some(&maps), &event).flow;
            assert_eq!(r.dst, dst);
            assert_eq!(r.peer_names, vec![pattern("api.example.com")], "{r:?}");
            // Without the maps (they could not be opened), no names.
            assert!(record_named(&ctx, None, &event).flow.peer_names.is_empty());
        }
        // A pod peer is never looked up.
        let mut pod = denied_egress(FAMILY_V4, dst4);
        pod.peer_identity = 301;
        assert!(
            record_named(&ctx, Some(&maps), &pod)
                .flow
                .peer_names
                .is_empty()
        );
    });
}
