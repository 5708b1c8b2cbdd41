//! Header parsing for TC programs. Every read goes through `bpf_skb_load_bytes`, which checks the
//! bounds at run time, so no verifier-specific pointer tricks are needed and a short packet is an
//! error, never an out-of-bounds read.

use aya_ebpf::programs::TcContext;
use bulkhead_common::{FAMILY_V4, FAMILY_V6};

use crate::addr;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

const ETH_HLEN: usize = 14;
/// IPv6 extension headers walked before giving up (RFC 8200 order needs at most six).
const MAX_IPV6_EXT: usize = 8;

/// The addresses come first in an 8-aligned struct, so they can be compared as two u64 words
/// (see `same_addr`).
#[repr(C, align(8))]
#[derive(Clone, Copy, Default)]
pub struct Packet {
    /// Addresses as IPv6 or IPv4-mapped IPv6 (`::ffff:a.b.c.d`).
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub family: u8,
    pub protocol: u8,
    pub sport_be: u16,
    pub dport_be: u16,
    /// False for non-first fragments and protocols without ports: only all-port rules match.
    pub ports_known: bool,
    /// A TCP segment with SYN and without ACK: the opening of a connection, never part of an
    /// established one (a retransmitted SYN is judged again, as a new connection).
    pub tcp_syn: bool,
    /// ICMP/ICMPv6 error that embeds the header of another packet (at `l4_off + 8`).
    pub icmp_error: bool,
    /// IPv6 neighbour discovery (hop limit 255, RFC 4861) or multicast listener discovery: the
    /// IPv6 counterpart of ARP, passed so that neighbours can resolve each other.
    pub neighbor_discovery: bool,
    /// TTL or hop limit.
    pub hop_limit: u8,
    pub l4_off: u32,
}

impl Packet {
    /// Resets what the transport header fills in.
    #[inline(always)]
    fn clear_transport(&mut self) {
        self.sport_be = 0;
        self.dport_be = 0;
        self.ports_known = false;
        self.tcp_syn = false;
        self.icmp_error = false;
        self.neighbor_discovery = false;
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// An IP packet; the tuple is in the caller's `Packet`.
    Ip,
    /// ARP: passed so that neighbours can resolve each other.
    Arp,
    /// Too short or inconsistent.
    Malformed,
    /// Well-formed but not something Bulkhead can judge (unknown EtherType, too many IPv6
    /// extension headers): dropped.
    Unparseable,
}

#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Option<T> {
    ctx.load::<T>(off).ok()
}

#[inline(always)]
pub fn parse(ctx: &TcContext, out: &mut Packet) -> Parsed {
    let Some(mut ethertype) = load::<u16>(ctx, 12).map(u16::from_be) else {
        return Parsed::Malformed;
    };
    let mut off = ETH_HLEN;
    // Up to two VLAN tags: a tagged IP packet is still an IP packet and must be judged.
    for _ in 0..2 {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let Some(inner) = load::<u16>(ctx, off + 2).map(u16::from_be) else {
            return Parsed::Malformed;
        };
        ethertype = inner;
        off += 4;
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(ctx, off, out),
        ETH_P_IPV6 => parse_ipv6(ctx, off, out),
        ETH_P_ARP => Parsed::Arp,
        _ => Parsed::Unparseable,
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext, off: usize, p: &mut Packet) -> Parsed {
    // Loaded as words so that fields are shifts of registers, not byte-by-byte copies.
    let Some(hdr) = load::<[u32; 5]>(ctx, off) else {
        return Parsed::Malformed;
    };
    let w0 = hdr[0].to_ne_bytes();
    let w1 = hdr[1].to_ne_bytes();
    let w2 = hdr[2].to_ne_bytes();
    if w0[0] >> 4 != 4 {
        return Parsed::Malformed;
    }
    let ihl = ((w0[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([w0[2], w0[3]]) as usize;
    if ihl < 20 || total < ihl {
        return Parsed::Malformed;
    }
    let frag_offset = u16::from_be_bytes([w1[2], w1[3]]) & 0x1fff;
    // SAFETY: `Packet` is 8-aligned and its addresses sit at offsets 0 and 16.
    unsafe {
        addr::set(&mut p.saddr, addr::v4_mapped(hdr[3]));
        addr::set(&mut p.daddr, addr::v4_mapped(hdr[4]));
    }
    p.family = FAMILY_V4;
    p.protocol = w2[1];
    p.hop_limit = w2[0];
    p.l4_off = (off + ihl) as u32;
    p.clear_transport();
    if frag_offset != 0 {
        // Non-first fragment: no transport header to read.
        return Parsed::Ip;
    }
    if parse_l4(ctx, p) {
        Parsed::Ip
    } else {
        Parsed::Malformed
    }
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext, off: usize, p: &mut Packet) -> Parsed {
    let Some(hdr) = load::<[u8; 8]>(ctx, off) else {
        return Parsed::Malformed;
    };
    if hdr[0] >> 4 != 6 {
        return Parsed::Malformed;
    }
    let (Some(saddr), Some(daddr)) = (
        load::<addr::Words>(ctx, off + 8),
        load::<addr::Words>(ctx, off + 24),
    ) else {
        return Parsed::Malformed;
    };
    let mut next = hdr[6];
    let mut l4 = off + 40;
    let mut fragmented_tail = false;
    let mut done = false;
    for _ in 0..MAX_IPV6_EXT {
        match next {
            // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
            0 | 43 | 60 => {
                let Some(ext) = load::<[u8; 2]>(ctx, l4) else {
                    return Parsed::Malformed;
                };
                next = ext[0];
                l4 += (ext[1] as usize + 1) * 8;
            }
            // Fragment header: 8 bytes; a non-zero offset means no transport header follows.
            44 => {
                let Some(ext) = load::<[u8; 4]>(ctx, l4) else {
                    return Parsed::Malformed;
                };
                next = ext[0];
                l4 += 8;
                if u16::from_be_bytes([ext[2], ext[3]]) >> 3 != 0 {
                    fragmented_tail = true;
                    done = true;
                    break;
                }
            }
            // Authentication header: (len + 2) * 4 bytes.
            51 => {
                let Some(ext) = load::<[u8; 2]>(ctx, l4) else {
                    return Parsed::Malformed;
                };
                next = ext[0];
                l4 += (ext[1] as usize + 2) * 4;
            }
            _ => {
                done = true;
                break;
            }
        }
    }
    if !done {
        return Parsed::Unparseable;
    }
    // SAFETY: `Packet` is 8-aligned and its addresses sit at offsets 0 and 16.
    unsafe {
        addr::set(&mut p.saddr, saddr);
        addr::set(&mut p.daddr, daddr);
    }
    p.family = FAMILY_V6;
    p.protocol = next;
    p.hop_limit = hdr[7];
    p.l4_off = l4 as u32;
    p.clear_transport();
    if fragmented_tail {
        return Parsed::Ip;
    }
    if parse_l4(ctx, p) {
        Parsed::Ip
    } else {
        Parsed::Malformed
    }
}

/// Reads ports (or the ICMP echo id, used as both ports so replies match their requests).
/// Returns false when the transport header is truncated.
#[inline(always)]
fn parse_l4(ctx: &TcContext, p: &mut Packet) -> bool {
    let off = p.l4_off as usize;
    match p.protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            // TCP needs its fixed header, UDP its 8 bytes, SCTP its 12-byte common header; the
            // ports lead all three.
            let ports: Option<u32> = match p.protocol {
                IPPROTO_TCP => load::<[u32; 5]>(ctx, off).map(|h| {
                    // Flags (byte 13): SYN 0x02, ACK 0x10.
                    p.tcp_syn = h[3].to_ne_bytes()[1] & 0x12 == 0x02;
                    h[0]
                }),
                IPPROTO_UDP => load::<[u32; 2]>(ctx, off).map(|h| h[0]),
                _ => load::<[u32; 3]>(ctx, off).map(|h| h[0]),
            };
            let Some(ports) = ports else {
                return false;
            };
            let b = ports.to_ne_bytes();
            p.sport_be = u16::from_ne_bytes([b[0], b[1]]);
            p.dport_be = u16::from_ne_bytes([b[2], b[3]]);
            p.ports_known = true;
            true
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let Some(h) = load::<[u8; 8]>(ctx, off) else {
                return false;
            };
            let ty = h[0];
            let echo = if p.protocol == IPPROTO_ICMP {
                ty == 0 || ty == 8
            } else {
                ty == 128 || ty == 129
            };
            let error = if p.protocol == IPPROTO_ICMP {
                ty == 3 || ty == 11 || ty == 12
            } else {
                (1..=4).contains(&ty)
            };
            if echo {
                let id = u16::from_ne_bytes([h[4], h[5]]);
                p.sport_be = id;
                p.dport_be = id;
            }
            p.icmp_error = error;
            p.neighbor_discovery = p.protocol == IPPROTO_ICMPV6
                && (((133..=137).contains(&ty) && p.hop_limit == 255)
                    || matches!(ty, 130..=132 | 143));
            true
        }
        _ => true,
    }
}

/// Writes the tuple of the packet embedded in an ICMP error into `out` (addresses, ports,
/// protocol); false when it cannot be read.
#[inline(always)]
pub fn parse_icmp_inner(ctx: &TcContext, p: &Packet, out: &mut bulkhead_common::CtKey) -> bool {
    let off = p.l4_off as usize + 8;
    let l4;
    let proto;
    if p.family == FAMILY_V4 {
        let Some(hdr) = load::<[u32; 5]>(ctx, off) else {
            return false;
        };
        let b0 = hdr[0].to_ne_bytes()[0];
        let ihl = ((b0 & 0x0f) as usize) * 4;
        if b0 >> 4 != 4 || ihl < 20 {
            return false;
        }
        // SAFETY: `CtKey` is 8-aligned and its addresses sit at offsets 0 and 16.
        unsafe {
            addr::set(&mut out.saddr, addr::v4_mapped(hdr[3]));
            addr::set(&mut out.daddr, addr::v4_mapped(hdr[4]));
        }
        proto = hdr[2].to_ne_bytes()[1];
        l4 = off + ihl;
    } else {
        let Some(hdr) = load::<[u8; 8]>(ctx, off) else {
            return false;
        };
        if hdr[0] >> 4 != 6 {
            return false;
        }
        let (Some(s), Some(d)) = (
            load::<addr::Words>(ctx, off + 8),
            load::<addr::Words>(ctx, off + 24),
        ) else {
            return false;
        };
        // SAFETY: `CtKey` is 8-aligned and its addresses sit at offsets 0 and 16.
        unsafe {
            addr::set(&mut out.saddr, s);
            addr::set(&mut out.daddr, d);
        }
        proto = hdr[6];
        l4 = off + 40;
    }
    out.protocol = proto;
    match proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let Some(ports) = load::<[u16; 2]>(ctx, l4) else {
                return false;
            };
            out.sport_be = ports[0];
            out.dport_be = ports[1];
            true
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let Some(h) = load::<[u8; 8]>(ctx, l4) else {
                return false;
            };
            let id = u16::from_ne_bytes([h[4], h[5]]);
            out.sport_be = id;
            out.dport_be = id;
            true
        }
        _ => false,
    }
}
