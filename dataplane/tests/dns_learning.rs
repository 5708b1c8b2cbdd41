//! Tier 2, issue 19: the real eBPF object learns from DNS answers on their way to a pod
//! (BPF_PROG_TEST_RUN on `bulkhead_to_pod` with answers built here): what a trusted resolver
//! answered for a listed name is learned for the endpoint, following CNAME chains and
//! wildcards; anything malformed, truncated, or from another source teaches nothing, and the
//! packet's verdict never changes.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bulkhead_agent::{
    fqdn::{LearnedAddress, NamePattern, monotonic_now_ns},
    loader::{Dataplane, PROG_TO_POD},
    privileged::check_privileged_test,
    sync::{Enforcer, RouteResolver},
};
use bulkhead_common::fqdn::{FqdnConfig, fqdn_stat};
use bulkhead_ruleset::{DirectionPolicy, EndpointPolicy, PortRange};
use common::*;
use rand::{Rng, SeedableRng, rngs::StdRng};

const RESOLVER_V4: [u8; 4] = [10, 96, 0, 10];
const RESOLVER_V6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x53];
const STRANGER_V4: [u8; 4] = [10, 96, 0, 11];
const ENDPOINT_ID: u32 = 1;

const ID_API: u32 = 100;
const ID_ALIAS: u32 = 101;
const ID_WILD: u32 = 200;
const ID_MANY: u32 = 300;

const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_AAAA: u16 = 28;

/// A DNS message under construction.
struct Msg(Vec<u8>);

fn wire_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

impl Msg {
    /// A response header (QR, RD, RA, RCODE 0) and one question.
    fn answer_to(qname: &str, qtype: u16, ancount: u16) -> Msg {
        let mut m = vec![0x12, 0x34, 0x81, 0x80, 0, 1];
        m.extend_from_slice(&ancount.to_be_bytes());
        m.extend_from_slice(&[0, 0, 0, 0]);
        m.extend_from_slice(&wire_name(qname));
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        Msg(m)
    }

    /// A record whose owner is written out (`owner` in wire form, pointers allowed).
    fn rr(mut self, owner: &[u8], rtype: u16, ttl: u32, rdata: &[u8]) -> Msg {
        self.0.extend_from_slice(owner);
        self.0.extend_from_slice(&rtype.to_be_bytes());
        self.0.extend_from_slice(&1u16.to_be_bytes());
        self.0.extend_from_slice(&ttl.to_be_bytes());
        self.0
            .extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        self.0.extend_from_slice(rdata);
        self
    }

    fn a(self, owner: &[u8], addr: [u8; 4]) -> Msg {
        self.rr(owner, TYPE_A, 300, &addr)
    }

    fn len(&self) -> u16 {
        self.0.len() as u16
    }
}

/// A pointer to offset 12: the question's name.
const QNAME: [u8; 2] = [0xc0, 12];

fn ptr(off: u16) -> [u8; 2] {
    (0xc000 | off).to_be_bytes()
}

fn udp_answer(src: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, EP_V4, 64)
        .udp(53, 40000);
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("build packet");
    out
}

fn udp6_answer(src: [u8; 16], payload: &[u8]) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv6(src, EP_V6, 64)
        .udp(53, 40000);
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("build packet");
    out
}

fn tcp_answer(src: [u8; 4], msg: &[u8]) -> Vec<u8> {
    let mut payload = (msg.len() as u16).to_be_bytes().to_vec();
    payload.extend_from_slice(msg);
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, EP_V4, 64)
        .tcp(53, 40000, 1, 64240)
        .ack(1)
        .psh();
    let mut out = Vec::new();
    b.write(&mut out, &payload).expect("build packet");
    out
}

/// Ingress open to the resolver's identity (so answers reach the policy's verdict, tracked
/// or not), the rest of the base rule set as the other tests have it.
fn ruleset() -> bulkhead_ruleset::RuleSet {
    let policy = EndpointPolicy {
        ingress: DirectionPolicy {
            isolated_by: Some(1),
            staged_isolated_by: Some(1),
            entries: vec![allow(301, None, PortRange::ALL, 2)],
        },
        egress: DirectionPolicy::default(),
    };
    let mut rs = base_ruleset(1, base_endpoint(), policy);
    for (cidr, id) in [
        ("10.96.0.10/32", 301),
        ("10.96.0.11/32", 301),
        ("fd00::53/128", 301),
    ] {
        rs.ipcache.push(bulkhead_ruleset::IpCacheEntry {
            cidr: cidr.parse().expect("cidr"),
            identity: id,
            quarantined: false,
            quarantine_allow: Vec::new(),
        });
    }
    rs
}

/// The endpoint, the resolvers, the secret, and the names the tests ask for.
fn setup(e: &mut Enforcer) {
    e.apply(&ruleset(), &RouteResolver).expect("apply");
    let dp = e.dataplane();
    dp.ensure_fqdn_config(0, 0).expect("fqdn config");
    dp.add_trusted_resolver(IpAddr::V4(Ipv4Addr::from(RESOLVER_V4)))
        .expect("resolver");
    dp.add_trusted_resolver(IpAddr::V6(Ipv6Addr::from(RESOLVER_V6)))
        .expect("resolver");
    for (name, id) in [
        ("api.example.com", ID_API),
        ("alias.example.net", ID_ALIAS),
        ("*.wild.example.org", ID_WILD),
        ("many.example.com", ID_MANY),
    ] {
        let p: NamePattern = name.parse().expect("pattern");
        dp.set_fqdn_name(&p, id).expect("name");
    }
}

fn learned(dp: &mut Dataplane) -> Vec<LearnedAddress> {
    dp.learned().expect("read learned")
}

/// The name ids learned for `addr` by the endpoint (empty when none).
fn ids_of(dp: &mut Dataplane, addr: IpAddr) -> Vec<u32> {
    let now = monotonic_now_ns();
    learned(dp)
        .into_iter()
        .filter(|l| l.endpoint_id == ENDPOINT_ID && l.addr == addr)
        .flat_map(|l| l.names)
        .map(|(id, expires)| {
            assert!(expires > now, "learned already expired");
            id
        })
        .collect()
}

fn v4(a: [u8; 4]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(a))
}

fn pass(e: &mut Enforcer, pkt: &[u8], ifx: u32) {
    assert_eq!(
        run(e, PROG_TO_POD, pkt, ifx),
        TC_ACT_OK,
        "the answer passes"
    );
}

#[test]
fn answers_from_trusted_resolvers_are_learned() {
    if !check_privileged_test("answers_from_trusted_resolvers_are_learned") {
        return;
    }
    with_dataplane("dns-learn", |e, ifx| {
        setup(e);
        // A.
        let m = Msg::answer_to("api.example.com", TYPE_A, 1).a(&QNAME, [198, 51, 100, 10]);
        pass(e, &udp_answer(RESOLVER_V4, &m.0), ifx);
        assert_eq!(ids_of(e.dataplane(), v4([198, 51, 100, 10])), vec![ID_API]);

        // AAAA, over IPv6 from the IPv6 resolver.
        let addr6 = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
        let m = Msg::answer_to("api.example.com", TYPE_AAAA, 1).rr(&QNAME, TYPE_AAAA, 60, &addr6);
        pass(e, &udp6_answer(RESOLVER_V6, &m.0), ifx);
        assert_eq!(
            ids_of(e.dataplane(), IpAddr::V6(Ipv6Addr::from(addr6))),
            vec![ID_API]
        );

        // Case does not matter, in the question or the owner.
        let m = Msg::answer_to("API.Example.COM", TYPE_A, 1)
            .a(&wire_name("api.EXAMPLE.com"), [198, 51, 100, 11]);
        pass(e, &udp_answer(RESOLVER_V4, &m.0), ifx);
        assert_eq!(ids_of(e.dataplane(), v4([198, 51, 100, 11])), vec![ID_API]);

        // DNS over TCP, one segment carrying the whole message.
        let m = Msg::answer_to("api.example.com", TYPE_A, 1).a(&QNAME, [198, 51, 100, 12]);
        pass(e, &tcp_answer(RESOLVER_V4, &m.0), ifx);
        assert_eq!(ids_of(e.dataplane(), v4([198, 51, 100, 12])), vec![ID_API]);

        // From any other source: nothing.
        let m = Msg::answer_to("api.example.com", TYPE_A, 1).a(&QNAME, [198, 51, 100, 13]);
        pass(e, &udp_answer(STRANGER_V4, &m.0), ifx);
        assert!(ids_of(e.dataplane(), v4([198, 51, 100, 13])).is_empty());

        // A name no policy lists: nothing.
        let m = Msg::answer_to("other.example.com", TYPE_A, 1).a(&QNAME, [198, 51, 100, 14]);
        pass(e, &udp_answer(RESOLVER_V4, &m.0), ifx);
        assert!(ids_of(e.dataplane(), v4([198, 51, 100, 14])).is_empty());

        // With learning off (no secret), nothing either.
        let cfg = e.dataplane().fqdn_config().expect("config");
        e.dataplane()
            .set_fqdn_config(FqdnConfig::default())
            .expect("off");
        let m = Msg::answer_to("api.example.com", TYPE_A, 1).a(&QNAME, [198, 51, 100, 15]);
        pass(e, &udp_answer(RESOLVER_V4, &m.0), ifx);
        assert!(ids_of(e.dataplane(), v4([198, 51, 100, 15])).is_empty());
        e.dataplane().set_fqdn_config(cfg).expect("on");

        let stats = e.dataplane().fqdn_stats().expect("stats");
        assert_eq!(stats[fqdn_stat::ANSWERS_LEARNED as usize], 4, "{stats:?}");
        assert_eq!(stats[fqdn_stat::ANSWERS_UNLISTED as usize], 1, "{stats:?}");
    });
}

#[test]
fn cname_chains_and_wildcards() {
    if !check_privileged_test("cname_chains_and_wildcards") {
        return;
    }
    with_dataplane("dns-cname", |e, ifx| {
        setup(e);
        // alias.example.net → mid.example.org → target.example.com → addresses; a record of a
        // name off the chain is not learned.
        let q = Msg::answer_to("alias.example.net", TYPE_A, 5);
        let mid_at = q.len() + 12; // the first CNAME's rdata: after its owner pointer and fixed part
        let q = q.rr(&QNAME, TYPE_CNAME, 300, &wire_name("mid.example.org"));
        let target_at = q.len() + 2 + 10;
        let q = q
            .rr(
                &ptr(mid_at),
                TYPE_CNAME,
                120,
                &wire_name("target.example.com"),
            )
            .a(&ptr(target_at), [203, 0, 113, 5])
            // Written out instead of compressed: the same name, found by its hash.
            .a(&wire_name("Target.Example.com"), [203, 0, 113, 6])
            .a(&wire_name("unrelated.example.com"), [203, 0, 113, 99]);
        pass(e, &udp_answer(RESOLVER_V4, &q.0), ifx);
        assert_eq!(ids_of(e.dataplane(), v4([203, 0, 113, 5])), vec![ID_ALIAS]);
        assert_eq!(ids_of(e.dataplane(), v4([203, 0, 113, 6])), vec![ID_ALIAS]);
        assert!(ids_of(e.dataplane(), v4([203, 0, 113, 99])).is_empty());
        // The chain's smallest TTL (120) bounds the addresses'.
        let l = learned(e.dataplane());
        let exp = l
            .iter()
            .find(|l| l.addr == v4([203, 0, 113, 5]))
            .map(|l| l.names[0].1)
            .expect("learned");
        let left = exp.saturating_sub(monotonic_now_ns());
        assert!(left <= 121_000_000_000 && left > 100_000_000_000, "{left}");

        // Wildcards: one label and several before the suffix match; the suffix itself does not.
        for (name, addr, learns) in [
            ("a.wild.example.org", [203, 0, 113, 20], true),
            ("x.y.Z.wild.example.org", [203, 0, 113, 21], true),
            ("wild.example.org", [203, 0, 113, 22], false),
            ("awild.example.org", [203, 0, 113, 23], false),
        ] {
            let m = Msg::answer_to(name, TYPE_A, 1).a(&QNAME, addr);
            pass(e, &udp_answer(RESOLVER_V4, &m.0), ifx);
            let ids = ids_of(e.dataplane(), v4(addr));
            assert_eq!(ids, if learns { vec![ID_WILD] } else { vec![] }, "{name}");
        }

        // An address learned for one name and then for another keeps both ids (the entry is
        // updated in place), and learning it again for the first only refreshes its slot.
        let shared = [203, 0, 113, 20];
        for name in ["api.example.com", "api.example.com"] {
            let m = Msg::answer_to(name, TYPE_A, 1).a(&QNAME, shared);
            pass(e, &udp_answer(RESOLVER_V4, &m.0), ifx);
        }
        let mut ids = ids_of(e.dataplane(), v4(shared));
        ids.sort();
        assert_eq!(ids, vec![ID_API, ID_WILD]);
    });
}

#[test]
fn a_hundred_addresses_in_one_answer() {
    if !check_privileged_test("a_hundred_addresses_in_one_answer") {
        return;
    }
    with_dataplane("dns-many", |e, ifx| {
        setup(e);
        let mut m = Msg::answer_to("many.example.com", TYPE_A, 100);
        for i in 0..100u8 {
            m = m.a(&QNAME, [198, 18, 1, i]);
        }
        // 12 + 22 + 100 * 16 bytes: an EDNS-sized answer.
        pass(e, &udp_answer(RESOLVER_V4, &m.0), ifx);
        for i in 0..100u8 {
            assert_eq!(
                ids_of(e.dataplane(), v4([198, 18, 1, i])),
                vec![ID_MANY],
                "address {i}"
            );
        }
        let stats = e.dataplane().fqdn_stats().expect("stats");
        assert_eq!(stats[fqdn_stat::ADDRESSES_LEARNED as usize], 100);
    });
}

/// Answers that must teach nothing: each a small change to a valid one.
fn malformed_answers() -> Vec<(&'static str, Vec<u8>)> {
    let valid = || Msg::answer_to("api.example.com", TYPE_A, 1).a(&QNAME, [192, 0, 2, 77]);
    let mut out = Vec::new();
    let mut m = valid();
    m.0[2] |= 0x02; // TC
    out.push(("truncated bit", m.0));
    let mut m = valid();
    m.0[3] |= 0x03; // NXDOMAIN-ish rcode
    out.push(("rcode", m.0));
    let mut m = valid();
    m.0[2] &= 0x7f; // a query, not a response
    out.push(("query", m.0));
    let mut m = valid();
    m.0[5] = 0;
    out.push(("qdcount 0", m.0));
    let mut m = valid();
    m.0[5] = 2;
    out.push(("qdcount 2", m.0));
    let mut m = valid();
    m.0[7] = 2; // says two answers, has one
    out.push(("ancount past the end", m.0));
    let m = valid();
    let cut = m.0.len() - 2;
    out.push(("record cut short", m.0[..cut].to_vec()));
    let mut m = valid();
    let n = m.0.len();
    m.0[n - 5] = 5; // rdlength 5 for an A record, past the end
    out.push(("bad rdlength", m.0));
    let mut m = valid();
    let n = m.0.len();
    m.0[n - 5] = 3;
    m.0.truncate(n - 1);
    out.push(("A with rdlength 3", m.0));
    // The owner a pointer to itself, and a loop of two pointers.
    let q = Msg::answer_to("api.example.com", TYPE_A, 1);
    let at = q.len();
    out.push(("pointer to itself", q.a(&ptr(at), [192, 0, 2, 78]).0));
    let q = Msg::answer_to("api.example.com", TYPE_A, 2);
    let first = q.len();
    let q = q.rr(&QNAME, TYPE_CNAME, 60, &ptr(first + 2 + 10 + 2));
    let q = q.rr(&ptr(first + 12), TYPE_CNAME, 60, &ptr(first + 12));
    out.push(("compression loop", q.0));
    let q = Msg::answer_to("api.example.com", TYPE_A, 1);
    let at = q.len();
    out.push(("pointer forward", q.a(&ptr(at + 40), [192, 0, 2, 79]).0));
    out.push((
        "pointer out of bounds",
        Msg::answer_to("api.example.com", TYPE_A, 1)
            .a(&ptr(0x3fff), [192, 0, 2, 80])
            .0,
    ));
    // A label of 64 bytes (0x40: not a length), and a name of more than 255 bytes.
    let mut owner = vec![64u8];
    owner.extend_from_slice(&[b'a'; 64]);
    owner.push(0);
    out.push((
        "label > 63",
        Msg::answer_to("api.example.com", TYPE_A, 1)
            .a(&owner, [192, 0, 2, 81])
            .0,
    ));
    let mut long = Vec::new();
    for _ in 0..5 {
        long.push(60u8);
        long.extend_from_slice(&[b'b'; 60]);
    }
    long.push(0);
    out.push((
        "name > 255",
        Msg::answer_to("api.example.com", TYPE_A, 1)
            .a(&long, [192, 0, 2, 82])
            .0,
    ));
    // The question itself too long, and cut inside the question.
    let mut q = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
    q.extend_from_slice(&long);
    q.extend_from_slice(&[0, 1, 0, 1]);
    let q = Msg(q).a(&QNAME, [192, 0, 2, 83]);
    out.push(("question > 255", q.0));
    out.push(("cut in the question", valid().0[..20].to_vec()));
    out.push(("header only", valid().0[..12].to_vec()));
    // The chain too long (more CNAMEs than FQDN_MAX_CHAIN).
    let mut q = Msg::answer_to("api.example.com", TYPE_A, 11);
    let mut owner = QNAME.to_vec();
    for i in 0..10 {
        let at = q.len() + owner.len() as u16 + 10;
        q = q.rr(
            &owner,
            TYPE_CNAME,
            60,
            &wire_name(&format!("c{i}.example.com")),
        );
        owner = ptr(at).to_vec();
    }
    out.push(("chain too long", q.a(&owner, [192, 0, 2, 84]).0));
    // 129 answers: more than are read.
    let mut q = Msg::answer_to("api.example.com", TYPE_A, 129);
    for i in 0..129u8 {
        q = q.a(&QNAME, [192, 0, 3, i]);
    }
    out.push(("129 answers", q.0));
    out
}

#[test]
fn malformed_answers_teach_nothing_and_pass() {
    if !check_privileged_test("malformed_answers_teach_nothing_and_pass") {
        return;
    }
    with_dataplane("dns-malformed", |e, ifx| {
        setup(e);
        for (what, msg) in malformed_answers() {
            pass(e, &udp_answer(RESOLVER_V4, &msg), ifx);
            pass(e, &tcp_answer(RESOLVER_V4, &msg), ifx);
            assert!(
                learned(e.dataplane()).is_empty(),
                "{what}: learned {:?}",
                learned(e.dataplane())
            );
        }
        // A TCP segment whose length prefix does not match what it carries.
        let m = Msg::answer_to("api.example.com", TYPE_A, 1).a(&QNAME, [192, 0, 2, 90]);
        let mut pkt = tcp_answer(RESOLVER_V4, &m.0);
        let at = 14 + 20 + 20;
        pkt[at + 1] = pkt[at + 1].wrapping_add(1);
        pass(e, &pkt, ifx);
        assert!(learned(e.dataplane()).is_empty());
        let stats = e.dataplane().fqdn_stats().expect("stats");
        assert_eq!(stats[fqdn_stat::ANSWERS_LEARNED as usize], 0, "{stats:?}");
    });
}

#[test]
fn random_payloads_never_teach() {
    if !check_privileged_test("random_payloads_never_teach") {
        return;
    }
    with_dataplane("dns-fuzz", |e, ifx| {
        setup(e);
        let mut rng = StdRng::seed_from_u64(0x19_d45);
        let valid = Msg::answer_to("api.example.com", TYPE_A, 3)
            .rr(&QNAME, TYPE_CNAME, 60, &wire_name("x.example.com"))
            .a(&ptr(45), [192, 0, 2, 1])
            .a(&QNAME, [192, 0, 2, 2])
            .0;
        for i in 0..3000 {
            let msg: Vec<u8> = match i % 3 {
                // Pure garbage.
                0 => (0..rng.random_range(0..600))
                    .map(|_| rng.random())
                    .collect(),
                // A valid header and question, garbage records.
                1 => {
                    let mut m = valid[..33].to_vec();
                    m[7] = rng.random_range(0..130);
                    m.extend((0..rng.random_range(0..400)).map(|_| rng.random::<u8>()));
                    m
                }
                // The valid answer with bytes of its records flipped: may still be valid, so
                // only the verdict is checked.
                _ => {
                    let mut m = valid.clone();
                    for _ in 0..rng.random_range(1..4) {
                        let at = rng.random_range(33..m.len());
                        m[at] ^= 1 << rng.random_range(0..8);
                    }
                    m
                }
            };
            let before = learned(e.dataplane());
            let pkt = if rng.random_bool(0.8) {
                udp_answer(RESOLVER_V4, &msg)
            } else {
                tcp_answer(RESOLVER_V4, &msg)
            };
            pass(e, &pkt, ifx);
            if i % 3 != 2 {
                assert_eq!(learned(e.dataplane()), before, "payload {i}: {msg:02x?}");
            }
        }
        // Everything learned from the flipped answers names api.example.com's id.
        for l in learned(e.dataplane()) {
            assert!(l.names.iter().all(|(id, _)| *id == ID_API), "{l:?}");
        }
    });
}

#[test]
fn expired_entries_are_swept_and_reported() {
    if !check_privileged_test("expired_entries_are_swept_and_reported") {
        return;
    }
    with_dataplane("dns-expire", |e, ifx| {
        setup(e);
        let m = Msg::answer_to("api.example.com", TYPE_A, 1).a(&QNAME, [198, 51, 100, 30]);
        pass(e, &udp_answer(RESOLVER_V4, &m.0), ifx);
        let dp = e.dataplane();
        assert!(
            dp.expire_learned(monotonic_now_ns())
                .expect("sweep")
                .is_empty()
        );
        assert_eq!(learned(dp).len(), 1);
        // 300 s later (the record's TTL) it has expired.
        let later = monotonic_now_ns() + 301_000_000_000;
        let expired = dp.expire_learned(later).expect("sweep");
        assert_eq!(expired.len(), 1, "{expired:?}");
        assert_eq!(
            (expired[0].endpoint_id, expired[0].addr, expired[0].name_id),
            (ENDPOINT_ID, v4([198, 51, 100, 30]), ID_API)
        );
        assert!(learned(dp).is_empty());
    });
}

#[test]
fn learned_state_and_names_survive_a_reload() {
    if !check_privileged_test("learned_state_and_names_survive_a_reload") {
        return;
    }
    with_dataplane_pins("dns-reload", |e, ifx, pins| {
        setup(e);
        let m = Msg::answer_to("api.example.com", TYPE_A, 1).a(&QNAME, [198, 51, 100, 40]);
        pass(e, &udp_answer(RESOLVER_V4, &m.0), ifx);
        let key = e.dataplane().fqdn_config().expect("config").key;
        // A restarted agent: the same pins, the same secret, the names and what was learned.
        let mut dp = Dataplane::load(pins).expect("reload");
        let cfg = dp.ensure_fqdn_config(0, 0).expect("config");
        assert_eq!(cfg.key, key);
        let p: NamePattern = "api.example.com".parse().expect("pattern");
        assert_eq!(dp.fqdn_name(&p).expect("name"), Some(ID_API));
        assert_eq!(ids_of(&mut dp, v4([198, 51, 100, 40])), vec![ID_API]);
        assert_eq!(
            dp.trusted_resolvers().expect("resolvers"),
            vec![v4(RESOLVER_V4), IpAddr::V6(Ipv6Addr::from(RESOLVER_V6))]
        );
    });
}

#[test]
fn an_answer_the_policy_drops_teaches_nothing() {
    if !check_privileged_test("an_answer_the_policy_drops_teaches_nothing") {
        return;
    }
    with_dataplane("dns-dropped", |e, ifx| {
        setup(e);
        // The same endpoint, its ingress now open to TCP 80 only: the resolver's UDP answer is
        // dropped, and what the pod never receives is not learned.
        let mut rs = ruleset();
        rs.version = 2;
        let policy = EndpointPolicy {
            ingress: DirectionPolicy {
                isolated_by: Some(1),
                staged_isolated_by: Some(1),
                entries: vec![allow(
                    301,
                    Some(bulkhead_ruleset::Protocol::Tcp),
                    PortRange::single(80),
                    2,
                )],
            },
            egress: DirectionPolicy::default(),
        };
        rs.policies.insert(base_endpoint().policy, policy);
        e.apply(&rs, &RouteResolver).expect("apply");
        let m = Msg::answer_to("api.example.com", TYPE_A, 1).a(&QNAME, [198, 51, 100, 50]);
        assert_eq!(
            run(e, PROG_TO_POD, &udp_answer(RESOLVER_V4, &m.0), ifx),
            TC_ACT_SHOT
        );
        assert!(learned(e.dataplane()).is_empty());
    });
}
