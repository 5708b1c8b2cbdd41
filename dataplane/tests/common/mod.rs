//! Shared by the privileged tests: pin directories that clean up after themselves, packet
//! builders, and rule-set builders.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use bulkhead_agent::{
    loader::{Dataplane, remove_pins},
    netns::Netns,
    sync::Enforcer,
};
use bulkhead_ruleset::{
    Action, DirectionPolicy, Endpoint, EndpointPolicy, IpCacheEntry, PolicyEntry, PortRange,
    Protocol, RuleSet, Stage, Tier, identity,
};
use rand::{Rng, rngs::StdRng};

/// A unique bpffs directory for one test, removed (links, then maps) on drop — also when the
/// test panics.
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new(test: &str) -> PinDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!(
            "/sys/fs/bpf/bulkhead-test/{test}-{}-{n}",
            std::process::id()
        ));
        let _ = remove_pins(&path);
        PinDir(path)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = remove_pins(&self.0);
    }
}

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

/// An endpoint in the policy group numbered after its identity (as the controller does).
pub fn endpoint(id: u32, name: &str, identity: u32, ip: IpAddr, iface: &str) -> Endpoint {
    Endpoint {
        id,
        namespace: "test".into(),
        pod: name.into(),
        workload: None,
        identity,
        ips: vec![ip],
        interface: Some(iface.into()),
        quarantined: false,
        policy: identity,
    }
}

/// A rule set in which every endpoint's group has no policy (everything allowed); tests insert
/// the groups they need into `policies`.
pub fn ruleset(version: u64, endpoints: Vec<Endpoint>, ipcache: Vec<(&str, u32)>) -> RuleSet {
    let policies = endpoints
        .iter()
        .map(|e| (e.policy, EndpointPolicy::default()))
        .collect();
    RuleSet {
        node: "test-node".into(),
        version,
        endpoints,
        policies,
        ipcache: ipcache
            .into_iter()
            .map(|(cidr, identity)| IpCacheEntry {
                cidr: cidr.parse().expect("test cidr"),
                identity,
                quarantined: false,
                quarantine_allow: Vec::new(),
            })
            .collect(),
        rules: BTreeMap::new(),
        names: Vec::new(),
        dns_resolvers: Vec::new(),
    }
}

/// Ethernet + IPv4 + TCP SYN.
pub fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1, 64240)
        .syn();
    let mut out = Vec::new();
    b.write(&mut out, &[]).expect("build packet");
    out
}

/// Ethernet + IPv4 + TCP ACK: a segment of a connection already open (a reply, or data).
pub fn tcp4_ack(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1, 64240)
        .ack(1);
    let mut out = Vec::new();
    b.write(&mut out, &[]).expect("build packet");
    out
}

pub fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .udp(sport, dport);
    let mut out = Vec::new();
    b.write(&mut out, &[1, 2, 3, 4]).expect("build packet");
    out
}

pub fn udp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv6(src, dst, 64)
        .udp(sport, dport);
    let mut out = Vec::new();
    b.write(&mut out, &[1, 2, 3, 4]).expect("build packet");
    out
}

pub fn icmp4_echo(src: [u8; 4], dst: [u8; 4], id: u16) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .icmpv4_echo_request(id, 1);
    let mut out = Vec::new();
    b.write(&mut out, &[0; 8]).expect("build packet");
    out
}

pub fn icmp6_echo(src: [u8; 16], dst: [u8; 16], id: u16) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv6(src, dst, 64)
        .icmpv6_echo_request(id, 1);
    let mut out = Vec::new();
    b.write(&mut out, &[0; 8]).expect("build packet");
    out
}

pub fn tcp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv6(src, dst, 64)
        .tcp(sport, dport, 1, 64240)
        .syn();
    let mut out = Vec::new();
    b.write(&mut out, &[]).expect("build packet");
    out
}

/// IPv6 with the given extension-header chain (each: next-header type, 8 bytes), then TCP.
pub fn tcp6_with_ext(src: [u8; 16], dst: [u8; 16], exts: &[u8], dport: u16) -> Vec<u8> {
    let mut l4 = Vec::new();
    // Extension headers: each 8 bytes (hdr ext len 0); fragment header has its own layout.
    for (i, _) in exts.iter().enumerate() {
        let next = exts.get(i + 1).copied().unwrap_or(6);
        l4.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 0]);
    }
    // TCP SYN, checksum left zero (the program does not verify checksums).
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    l4.extend_from_slice(&tcp);
    let mut p = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x86, 0xdd];
    let first = exts.first().copied().unwrap_or(6);
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    p.extend_from_slice(&[first, 64]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&l4);
    p
}

/// IPv4 fragment of a TCP or UDP datagram: `offset8` in 8-byte units, `more` = MF flag.
pub fn ipv4_fragment(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    offset8: u16,
    more: bool,
    payload: &[u8],
) -> Vec<u8> {
    let mut p = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    let total = 20 + payload.len() as u16;
    let frag = offset8 | if more { 0x2000 } else { 0 };
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 1]);
    p.extend_from_slice(&frag.to_be_bytes());
    p.extend_from_slice(&[64, proto, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(payload);
    p
}

/// An ICMP "fragmentation needed" from `router` to `dst` that quotes the IPv4 header and first
/// eight TCP bytes of a packet `inner_src:sport → inner_dst:dport`.
pub fn icmp4_frag_needed(
    router: [u8; 4],
    dst: [u8; 4],
    inner: ([u8; 4], [u8; 4], u16, u16),
) -> Vec<u8> {
    let (isrc, idst, sport, dport) = inner;
    let mut quoted = Vec::new();
    etherparse::PacketBuilder::ipv4(isrc, idst, 64)
        .tcp(sport, dport, 1, 64240)
        .write(&mut quoted, &[])
        .expect("build quoted packet");
    quoted.truncate(20 + 8);
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(router, dst, 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ));
    let mut out = Vec::new();
    b.write(&mut out, &quoted).expect("build packet");
    out
}

pub const EP_V4: [u8; 4] = [10, 0, 0, 2];
pub const PEER_V4: [u8; 4] = [10, 0, 0, 1];
pub const WORLD_V4: [u8; 4] = [192, 0, 2, 9];
pub const EP_V6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
pub const PEER_V6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

pub fn allow(peer: u32, protocol: Option<Protocol>, ports: PortRange, rule: u32) -> PolicyEntry {
    PolicyEntry {
        peer,
        protocol,
        ports,
        tier: Tier::Application,
        priority: 0,
        action: Action::Allow,
        stage: Stage::Enforced,
        rule,
    }
}

/// Runs `body` with a loaded data plane inside a fresh namespace that has an `ep0` and an `ep1`;
/// `body` gets the pin directory too, to load the data plane again as a restarted agent would.
pub fn with_dataplane_pins(
    test: &str,
    body: impl FnOnce(&mut Enforcer, u32, &std::path::Path) + Send + 'static,
) {
    let pins = PinDir::new(test);
    let ns = Netns::create(&format!("bh-t2-{}-{test}", std::process::id() % 100000))
        .expect("create test namespace");
    // This kernel has no dummy driver; one end of a veth pair stands in for the pod's veth.
    for (dev, peer) in [("ep0", "ep0p"), ("ep1", "ep1p")] {
        ns.exec(&[
            "ip", "link", "add", dev, "type", "veth", "peer", "name", peer,
        ])
        .expect("create veth pair");
        ns.exec(&["ip", "link", "set", dev, "up"]).expect("link up");
    }
    let pin_path = pins.path().to_path_buf();
    ns.run(move || {
        let dp = Dataplane::load(&pin_path).expect("load eBPF object");
        let mut enforcer = Enforcer::new(dp).expect("enforcer");
        let ifindex = nix::net::if_::if_nametoindex("ep0").expect("ep0 index");
        body(&mut enforcer, ifindex, &pin_path);
    })
    .expect("test body inside the namespace");
}

/// [`with_dataplane_pins`] for tests that need no restart.
pub fn with_dataplane(test: &str, body: impl FnOnce(&mut Enforcer, u32) + Send + 'static) {
    with_dataplane_pins(test, move |e, ifx, _| body(e, ifx));
}

pub fn base_endpoint() -> Endpoint {
    let mut ep = endpoint(1, "server", 300, IpAddr::V4(Ipv4Addr::from(EP_V4)), "ep0");
    ep.ips.push(IpAddr::V6(Ipv6Addr::from(EP_V6)));
    ep
}

/// Ingress: TCP 80 and all UDP from identity 301, nothing else. Egress: no policy.
pub fn base_policy() -> EndpointPolicy {
    EndpointPolicy {
        ingress: DirectionPolicy {
            isolated_by: Some(1),
            staged_isolated_by: Some(1),
            entries: vec![
                allow(301, Some(Protocol::Tcp), PortRange::single(80), 2),
                allow(301, Some(Protocol::Udp), PortRange::ALL, 3),
            ],
        },
        egress: DirectionPolicy::default(),
    }
}

pub fn base_ruleset(version: u64, ep: Endpoint, policy: EndpointPolicy) -> RuleSet {
    let mut rs = ruleset(
        version,
        vec![ep.clone()],
        vec![
            ("10.0.0.2/32", 300),
            ("10.0.0.1/32", 301),
            ("fd00::2/128", 300),
            ("fd00::1/128", 301),
        ],
    );
    rs.policies.insert(ep.policy, policy);
    rs
}

pub fn run(e: &mut Enforcer, prog: &'static str, pkt: &[u8], ifindex: u32) -> u32 {
    e.dataplane()
        .test_run(prog, pkt, ifindex, 1)
        .expect("BPF_PROG_TEST_RUN")
        .0
}

pub fn random_entry(rng: &mut StdRng, rule: u32) -> PolicyEntry {
    let peers = [301, 302, identity::ANY, identity::WORLD];
    let first = rng.random_range(1..120u16);
    PolicyEntry {
        peer: peers[rng.random_range(0..peers.len())],
        protocol: [
            None,
            Some(Protocol::Tcp),
            Some(Protocol::Udp),
            Some(Protocol::Icmp),
            Some(Protocol::Sctp),
            Some(Protocol::Icmpv6),
        ][rng.random_range(0..6)],
        ports: match rng.random_range(0..3) {
            0 => PortRange::ALL,
            1 => PortRange::single(first),
            _ => PortRange {
                first,
                last: first + rng.random_range(0..50),
            },
        },
        tier: [Tier::Admin, Tier::Application, Tier::Baseline][rng.random_range(0..3)],
        priority: rng.random_range(0..3),
        action: [Action::Allow, Action::Deny, Action::Pass][rng.random_range(0..3)],
        stage: [
            Stage::Enforced,
            Stage::Enforced,
            Stage::Staged,
            Stage::Superseded,
        ][rng.random_range(0..4)],
        rule,
    }
}

pub fn random_direction(rng: &mut StdRng, base_rule: u32) -> DirectionPolicy {
    let n = rng.random_range(0..10);
    DirectionPolicy {
        isolated_by: rng.random_bool(0.6).then_some(base_rule),
        staged_isolated_by: rng.random_bool(0.2).then_some(base_rule + 1),
        entries: (0..n)
            .map(|i| random_entry(rng, base_rule + 2 + i))
            .collect(),
    }
}
