//! Shared by the privileged tests: pin directories that clean up after themselves, packet
//! builders, and rule-set builders.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use bulkhead_agent::loader::remove_pins;
use bulkhead_controller::ruleset::{Endpoint, EndpointPolicy, IpCacheEntry, RuleSet};

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
