//! Bulkhead's kernel side.
//!
//! * `bulkhead_from_pod` — TC ingress of a pod's host-side veth: packets the pod sends, judged by
//!   the pod's **egress** policy (plus anti-spoofing).
//! * `bulkhead_to_pod` — TC egress of the same veth: packets delivered to the pod, judged by its
//!   **ingress** policy.
//! * `bulkhead_prefilter` — XDP on the node's uplink: a stateless early drop of quarantined
//!   sources and denied CIDRs before the stack spends anything on them.
//! * `bulkhead_parse_only` — parses like the TC programs and decides nothing: the benchmark floor.
//! * `bulkhead_clock_probe` — samples jiffies and the monotonic clock for the agent's
//!   calibration of the per-packet clock; never attached.
//!
//! Per packet the work is a fixed number of map lookups (endpoint, conntrack, and for a new
//! connection the peer's identity and at most three policy hash lookups plus one port-range LPM
//! lookup where ranges exist), whatever the number of rules: the agent resolves precedence when it
//! writes the maps. The endpoint, the identities of the pod CIDR's addresses, the configuration,
//! counters and scratch space are arrays, which the verifier inlines; on these machines every
//! call and return costs several nanoseconds, so the hot path calls only the hash lookups it
//! cannot avoid (see bench/RESULTS.md).
//!
//! Egress by DNS name (issue 19, `names`): an endpoint whose policy names DNS names
//! (`endpoint_flags::HAS_NAMES`; every other endpoint pays that one bit test) decides a new
//! egress connection to a `world` or CIDR address with what it learned from DNS answers: one
//! lookup of (endpoint, address) in the learned map, and when live names are there, the rank
//! lookups of the address's identity and of each name, combined. A connection records the
//! names it was admitted with, and a policy change re-checks it with them, expired or not.
#![no_std]
#![no_main]
// Map keys are passed by reference on purpose: by value they would be copied onto the 512-byte
// BPF stack, which the scratch map exists to avoid.
#![allow(clippy::needless_borrows_for_generic_args)]

mod addr;
mod dns;
mod events;
mod names;
mod parse;

use aya_ebpf::{
    bindings::{__sk_buff, TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::{TcContext, XdpContext},
};
use bulkhead_common::{
    COUNTER_SLOTS, CT_AUDIT, CT_CANONICAL, CT_INITIATED_EGRESS, CT_REVOKED, Config, Counter, CtKey,
    CtKeyV4, CtValue, DENSE_V4_SLOTS, DIR_EGRESS, DIR_INGRESS, EVENT_AUDIT, EVENT_DENIED,
    EVENT_NEW_FLOW, EVENT_REVOKED, EndpointAddrKey, EndpointInfo, IPCACHE_DENSE_PRESENT,
    IPCACHE_QUARANTINED, IpCacheValue, MAX_ENDPOINTS, POLICY_KEY_FIXED_BITS, PROTO_OTHER,
    PolicyKey, PolicyRanks, PolicySummary, PolicyValue, PrefilterKey, PrefilterValue,
    QuarantineAllowKey, RULE_UNRELATED_ICMP_ERROR, SUMMARY_HAS_EXACT, SUMMARY_HAS_RANGES,
    VERDICT_ALLOW, VERDICT_DENY, endpoint_flags,
    fqdn::{FQDN_MAX_IDS, FQDN_NAME_ID_NONE},
    port_bloom, reason, stat,
};
use events::{EventMeta, deny_event_interval, emit, emit_denied, emit_prefiltered};
use names::{NamesFrom, decide_by_ranks, live_names};
use parse::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, Packet, Parsed};

/// Identity of addresses no ipcache entry covers.
const IDENTITY_WORLD: u32 = bulkhead_common::identity::WORLD;
/// Wildcard peer identity in policy keys.
const IDENTITY_ANY: u32 = bulkhead_common::identity::ANY;

/// Endpoints by host-side interface index, for indexes below [`ENDPOINT_SLOTS`]; a slot whose
/// flags are 0 holds no endpoint (real endpoints always enforce at least one direction).
#[map]
static ENDPOINT_SLOTS: Array<EndpointInfo> = Array::pinned(ENDPOINT_SLOTS_LEN, 0);

/// Endpoints whose interface index is [`ENDPOINT_SLOTS`] or above.
#[map]
static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(MAX_ENDPOINTS, 0);

const ENDPOINT_SLOTS_LEN: u32 = bulkhead_common::ENDPOINT_SLOTS;

/// The endpoint behind an interface, if it is one.
#[inline(always)]
fn endpoint_of(ifindex: u32) -> Option<&'static EndpointInfo> {
    if ifindex < ENDPOINT_SLOTS_LEN {
        match ENDPOINT_SLOTS.get(ifindex) {
            Some(ep) if ep.flags != 0 => Some(ep),
            _ => None,
        }
    } else {
        // SAFETY: the value stays valid for this program run (RCU).
        unsafe { ENDPOINTS.get(&ifindex) }
    }
}

#[map]
static ENDPOINT_ADDRS: HashMap<EndpointAddrKey, u32> = HashMap::pinned(MAX_ENDPOINTS * 4, 0);

/// Hash maps are allocated per entry, not up front: their maximum sizes are ceilings.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Single addresses (pods, hosts): one hash lookup, whatever the number of entries.
#[map]
/// Keyed by the address's four bytes read as one native u32 (the same bytes as the agent's
/// `[u8; 4]` key).
static IPCACHE_HOST_V4: HashMap<u32, IpCacheValue> = HashMap::pinned(1 << 20, BPF_F_NO_PREALLOC);

#[map]
static IPCACHE_HOST_V6: HashMap<[u8; 16], IpCacheValue> =
    HashMap::pinned(1 << 20, BPF_F_NO_PREALLOC);

/// Single IPv4 addresses of the window `Config::dense_v4_base` .. + `dense_v4_slots` (the pod
/// CIDR, in practice), by offset: an inlined array read instead of a hash lookup. Each slot is
/// an `IpCacheValue` read as one u64 (identity in the low half, flags in the high half, with
/// `IPCACHE_DENSE_PRESENT` in a used slot), so the agent's single 8-byte writes through its
/// memory mapping are never seen half done.
#[map]
static IPCACHE_DENSE_V4: Array<u64> = Array::pinned(DENSE_V4_SLOTS, BPF_F_MMAPABLE);

/// Array maps user space may map into its memory.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Wider prefixes (CIDR identities), consulted only for addresses without an entry of their own.
#[map]
static IPCACHE_V4: LpmTrie<[u8; 4], IpCacheValue> = LpmTrie::pinned(1 << 20, 0);

#[map]
static IPCACHE_V6: LpmTrie<[u8; 16], IpCacheValue> = LpmTrie::pinned(1 << 20, 0);

/// (policy id, identity, direction, protocol): the protocol-wide decision and which finer maps
/// have keys.
#[map]
static POLICY_SUMMARY: HashMap<PolicyKey, PolicySummary> =
    HashMap::pinned(1 << 20, BPF_F_NO_PREALLOC);

/// (policy id, identity, direction, protocol, port): single-port keys.
#[map]
static POLICY_EXACT: HashMap<PolicyKey, PolicyValue> = HashMap::pinned(1 << 21, BPF_F_NO_PREALLOC);

/// Port ranges, as aligned port-prefix blocks (the only keys that need longest-prefix match).
#[map]
static POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(1 << 21, 0);

/// IPv6 connections (and IPv4 ones an agent before `CONNTRACK_V4` left; it moves them).
#[map]
static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(1 << 18, 0);

/// IPv4 connections, under 16-byte keys.
#[map]
static CONNTRACK_V4: LruHashMap<CtKeyV4, CtValue> = LruHashMap::pinned(1 << 18, 0);

#[map]
static CONFIG: Array<Config> = Array::pinned(1, 0);

/// (jiffies, monotonic ns), written by `bulkhead_clock_probe` for the agent's clock calibration.
#[map]
static CLOCK_SAMPLE: Array<[u64; 2]> = Array::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stat::COUNT, 0);

/// Per-CPU scratch space: the parsed packet and the keys built from it live here rather than
/// on the 512-byte BPF stack.
#[repr(C)]
pub struct Scratch {
    packet: Packet,
    fwd: CtKey,
    fwd4: CtKeyV4,
    ct: CtValue,
    /// The ranks combined over the peer's identity and its learned names.
    ranks: PolicyRanks,
    /// The learned names of the decision being made ([`FQDN_NAME_ID_NONE`] in unused slots):
    /// recorded in the connection it admits.
    names: [u32; FQDN_MAX_IDS],
}

/// The tracked connection under the scratch key of the packet's family (see [`set_ct_key`]).
#[inline(always)]
fn ct_get(s: &Scratch) -> Option<*mut CtValue> {
    if s.packet.family == bulkhead_common::FAMILY_V4 {
        CONNTRACK_V4.get_ptr_mut(&s.fwd4)
    } else {
        CONNTRACK.get_ptr_mut(&s.fwd)
    }
}

#[inline(always)]
fn ct_remove(s: &Scratch) {
    let _ = if s.packet.family == bulkhead_common::FAMILY_V4 {
        CONNTRACK_V4.remove(&s.fwd4)
    } else {
        CONNTRACK.remove(&s.fwd)
    };
}

/// Tracks `s.ct` under the scratch key; false when the map refused it.
#[inline(always)]
fn ct_insert(s: &Scratch) -> bool {
    if s.packet.family == bulkhead_common::FAMILY_V4 {
        CONNTRACK_V4.insert(&s.fwd4, &s.ct, 0).is_ok()
    } else {
        CONNTRACK.insert(&s.fwd, &s.ct, 0).is_ok()
    }
}

#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Exceptions of quarantines, for the prefilter: (quarantined address, peer identity).
#[map]
static QUARANTINE_ALLOW: HashMap<QuarantineAllowKey, u32> = HashMap::pinned(1 << 16, 0);

/// (local endpoint address, peer identity) pairs whose every packet the endpoint's ingress
/// policy denies: the XDP prefilter drops them on arrival. Keyed by identity, not by CIDR, so an
/// address with an identity of its own inside a denied CIDR is judged as itself.
#[map]
static PREFILTER_DENY: HashMap<PrefilterKey, PrefilterValue> =
    HashMap::pinned(1 << 16, BPF_F_NO_PREALLOC);

#[classifier]
pub fn bulkhead_from_pod(ctx: TcContext) -> i32 {
    enforce(&ctx, DIR_EGRESS, false)
}

#[classifier]
pub fn bulkhead_to_pod(ctx: TcContext) -> i32 {
    enforce(&ctx, DIR_INGRESS, true)
}

/// `bulkhead_to_pod` without learning from DNS answers: the benchmark's baseline for what the
/// learning costs packets that are not DNS answers. Never attached.
#[classifier]
pub fn bulkhead_to_pod_without_dns(ctx: TcContext) -> i32 {
    enforce(&ctx, DIR_INGRESS, false)
}

#[classifier]
pub fn bulkhead_parse_only(ctx: TcContext) -> i32 {
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: per-CPU scratch, exclusively ours for this run.
    let p = unsafe { &mut (*s).packet };
    match parse::parse(&ctx, p) {
        // Depend on the parsed tuple so the parse cannot be optimised away.
        Parsed::Ip if p.protocol == 0xfe => TC_ACT_SHOT,
        _ => TC_ACT_OK,
    }
}

/// Samples jiffies and the monotonic clock together, for the agent to measure the tick
/// (`Config::jiffy_ns`). Run with BPF_PROG_TEST_RUN only, never attached.
#[classifier]
pub fn bulkhead_clock_probe(_ctx: TcContext) -> i32 {
    if let Some(s) = CLOCK_SAMPLE.get_ptr_mut(0) {
        // SAFETY: an array slot; helpers without arguments.
        unsafe { *s = [bpf_jiffies64(), bpf_ktime_get_ns()] };
    }
    TC_ACT_OK
}

/// The prefilter at XDP: before the stack, one packet at a time (native XDP on veth and
/// virtio_net turns GRO off, see the README).
#[xdp]
pub fn bulkhead_prefilter(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    // SAFETY: reading a field of the XDP context.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    match prefilter(ctx.data(), ctx.data_end(), ifindex) {
        Prefiltered::Pass => xdp_action::XDP_PASS,
        Prefiltered::Quarantined => {
            count(MAX_ENDPOINTS, reason::DROP_PREFILTER, bytes);
            xdp_action::XDP_DROP
        }
        Prefiltered::Denied(endpoint_id) => {
            count(endpoint_id, reason::DROP_PREFILTER, bytes);
            xdp_action::XDP_DROP
        }
    }
}

/// Ethernet + the longest IPv4 header + the ports: what the prefilter reads.
const PREFILTER_HEADERS: u32 = 14 + 60 + 4;

/// The same prefilter at TC ingress of the uplink (tcx): after GRO, so one check per
/// aggregated packet and no cost to throughput; the packet has been allocated an skb.
#[classifier]
pub fn bulkhead_prefilter_tc(ctx: TcContext) -> i32 {
    let bytes = ctx.len() as u64;
    // The headers into the linear part (a no-op when they are there already); a packet too
    // short for them keeps what it has and is read as far as it goes.
    let _ = ctx.pull_data(PREFILTER_HEADERS.min(ctx.len()));
    // SAFETY: reading a field of the socket buffer.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    match prefilter(ctx.data(), ctx.data_end(), ifindex) {
        Prefiltered::Pass => TC_ACT_OK,
        Prefiltered::Quarantined => {
            count(MAX_ENDPOINTS, reason::DROP_PREFILTER, bytes);
            TC_ACT_SHOT
        }
        Prefiltered::Denied(endpoint_id) => {
            count(endpoint_id, reason::DROP_PREFILTER, bytes);
            TC_ACT_SHOT
        }
    }
}

enum Prefiltered {
    Pass,
    /// From a quarantined address to a peer outside its exceptions.
    Quarantined,
    /// To a local endpoint (its id) whose ingress policy denies every packet of the source's
    /// identity.
    Denied(u32),
}

/// An IPv4 address's ipcache entry: its own (hash) or its longest covering prefix (LPM).
#[inline(always)]
fn ipcache_v4(addr: u32, cfg: &Config) -> Option<IpCacheValue> {
    let slot = u32::from_be(addr).wrapping_sub(cfg.dense_v4_base);
    if slot < cfg.dense_v4_slots {
        if let Some(v) = IPCACHE_DENSE_V4.get(slot) {
            // SAFETY: an array slot; one 8-byte load, so never half of an update.
            let raw = unsafe { core::ptr::read_volatile(v) };
            let flags = (raw >> 32) as u32;
            if flags & IPCACHE_DENSE_PRESENT != 0 {
                return Some(IpCacheValue {
                    identity: raw as u32,
                    flags,
                });
            }
        }
    } else if let Some(v) = unsafe { IPCACHE_HOST_V4.get(&addr) } {
        return Some(*v);
    }
    IPCACHE_V4.get(Key::new(32, addr.to_ne_bytes())).copied()
}

#[inline(always)]
fn ipcache_v6(addr: [u8; 16]) -> Option<IpCacheValue> {
    if let Some(v) = unsafe { IPCACHE_HOST_V6.get(&addr) } {
        return Some(*v);
    }
    IPCACHE_V6.get(Key::new(128, addr)).copied()
}

#[inline(always)]
fn v4_mapped_bytes(a: u32) -> [u8; 16] {
    // SAFETY: same size, and every bit pattern is a valid byte array.
    unsafe { core::mem::transmute::<addr::Words, [u8; 16]>(addr::v4_mapped(a)) }
}

#[inline(always)]
fn identity_or_world(v: Option<IpCacheValue>) -> u32 {
    match v {
        Some(v) => v.identity,
        None => IDENTITY_WORLD,
    }
}

/// The stateless early drop: a quarantined source, or a (local endpoint, source identity) pair
/// the endpoint's ingress policy denies outright. `start..end` is the packet's linear data
/// (XDP's, or TC's after a pull), from the Ethernet header.
#[inline(always)]
fn prefilter(start: usize, end: usize, ifindex: u32) -> Prefiltered {
    if start + 14 > end {
        return Prefiltered::Pass;
    }
    // SAFETY: bounds checked above and below against data_end, as the verifier requires.
    let ethertype = u16::from_be(unsafe { *((start + 12) as *const u16) });
    let cfg = config();
    let (src16, dst16, src_entry, family) = if ethertype == parse::ETH_P_IP {
        if start + 14 + 20 > end {
            return Prefiltered::Pass;
        }
        let src = u32::from_ne_bytes(unsafe { *((start + 14 + 12) as *const [u8; 4]) });
        let dst = u32::from_ne_bytes(unsafe { *((start + 14 + 16) as *const [u8; 4]) });
        let src_entry = ipcache_v4(src, &cfg);
        if let Some(v) = src_entry
            && v.flags & IPCACHE_QUARANTINED != 0
        {
            let peer = identity_or_world(ipcache_v4(dst, &cfg));
            if quarantine_allows(v4_mapped_bytes(src), peer) {
                return Prefiltered::Pass;
            }
            return Prefiltered::Quarantined;
        }
        (
            v4_mapped_bytes(src),
            v4_mapped_bytes(dst),
            src_entry,
            bulkhead_common::FAMILY_V4,
        )
    } else if ethertype == parse::ETH_P_IPV6 {
        if start + 14 + 40 > end {
            return Prefiltered::Pass;
        }
        let src: [u8; 16] = unsafe { *((start + 14 + 8) as *const [u8; 16]) };
        let dst: [u8; 16] = unsafe { *((start + 14 + 24) as *const [u8; 16]) };
        let src_entry = ipcache_v6(src);
        if let Some(v) = src_entry
            && v.flags & IPCACHE_QUARANTINED != 0
        {
            let peer = identity_or_world(ipcache_v6(dst));
            if quarantine_allows(src, peer) {
                return Prefiltered::Pass;
            }
            return Prefiltered::Quarantined;
        }
        (src, dst, src_entry, bulkhead_common::FAMILY_V6)
    } else {
        return Prefiltered::Pass;
    };
    let key = PrefilterKey {
        addr: dst16,
        identity: identity_or_world(src_entry),
    };
    let Some(pair) = PREFILTER_DENY.get_ptr_mut(&key) else {
        return Prefiltered::Pass;
    };
    // SAFETY: hash value pointer valid during this program run; a racing update of the
    // rate-limit timestamp from another CPU can at worst let one extra event through.
    let (endpoint_id, report) = unsafe {
        let t = now_coarse(&cfg);
        let interval = deny_event_interval(&cfg);
        let due = t.wrapping_sub((*pair).last_event_ns) >= interval;
        if due {
            (*pair).last_event_ns = t;
        } else {
            bump_stat(stat::EVENTS_RATE_LIMITED);
        }
        ((*pair).endpoint_id, due)
    };
    if report {
        emit_prefiltered(
            start,
            end,
            ifindex,
            pair,
            &src16,
            &dst16,
            key.identity,
            family,
        );
    }
    Prefiltered::Denied(endpoint_id)
}

/// Whether a quarantined source may still reach `peer` (one of its quarantine's exceptions).
#[inline(always)]
fn quarantine_allows(src: [u8; 16], peer: u32) -> bool {
    let specific = QuarantineAllowKey {
        addr: src,
        identity: peer,
    };
    let any = QuarantineAllowKey {
        addr: src,
        identity: IDENTITY_ANY,
    };
    unsafe { QUARANTINE_ALLOW.get(&specific) }.is_some()
        || unsafe { QUARANTINE_ALLOW.get(&any) }.is_some()
}

/// The same clock at tick resolution (a few ms): enough for conntrack's last-seen times and the
/// one-second rate limit of deny events. From jiffies once the agent has measured the tick
/// (see `Config::jiffy_ns`): the verifier inlines `bpf_jiffies64` into one load, where a helper
/// call costs a call and a return on every packet.
#[inline(always)]
fn now_coarse(cfg: &Config) -> u64 {
    if cfg.jiffy_ns != 0 {
        // SAFETY: a helper without arguments.
        unsafe { bpf_jiffies64() }
            .wrapping_mul(cfg.jiffy_ns as u64)
            .wrapping_add(cfg.clock_offset_ns)
    } else {
        // SAFETY: a helper without arguments (kernel ≥ 5.11).
        unsafe { bpf_ktime_get_coarse_ns() }
    }
}

/// The global configuration, read once per packet (zeros until the agent writes it).
#[inline(always)]
fn config() -> Config {
    match CONFIG.get(0) {
        Some(c) => *c,
        None => Config::default(),
    }
}

#[inline(always)]
fn count(endpoint_id: u32, why: u32, bytes: u64) {
    let slot = endpoint_id.min(MAX_ENDPOINTS) * reason::COUNT + why;
    if let Some(c) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

#[inline(always)]
fn bump_stat(index: u32) {
    if let Some(c) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
}

/// The identity of one of the packet's addresses (`Packet` is 8-aligned, so `a` is too).
#[inline(always)]
fn identity_of(p: &Packet, a: &[u8; 16], cfg: &Config) -> u32 {
    identity_or_world(if p.family == bulkhead_common::FAMILY_V4 {
        // SAFETY: `a` is an address field of the 8-aligned `Packet`.
        ipcache_v4(addr::v4_of(unsafe { addr::get(a) }), cfg)
    } else {
        ipcache_v6(*a)
    })
}

#[inline(always)]
fn policy_protocol(proto: u8) -> u8 {
    match proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_ICMP | IPPROTO_ICMPV6 => proto,
        _ => PROTO_OTHER,
    }
}

/// The summary of (peer identity, protocol), else of (wildcard, protocol); then, only where the
/// summary says such keys exist, the exact port and the port-range trie; else the summary's
/// fallback, or the direction's default when neither summary exists. The exact lookup is
/// skipped for ports the summary's Bloom filter rules out. At most three hash
/// lookups and one LPM lookup (in a trie of range keys only), whatever the number of rules.
/// The agent copies wildcard entries under every specific identity that has entries of its
/// own, and resolves every key's value from all entries that cover it, so the first hit is the
/// answer. `port_be` is the destination port of the connection's opening packet: the packet's
/// own, or a reply's source port when a reply re-checks its connection.
#[inline(always)]
fn lookup_policy(ep: &EndpointInfo, dir: u8, peer: u32, p: &Packet, port_be: u16) -> PolicyValue {
    let mut key = PolicyKey {
        policy_id: ep.policy_id,
        identity: peer,
        direction: dir,
        protocol: policy_protocol(p.protocol),
        port_be: 0,
    };
    let summary = match unsafe { POLICY_SUMMARY.get(&key) } {
        Some(s) => s,
        None => {
            key.identity = IDENTITY_ANY;
            match unsafe { POLICY_SUMMARY.get(&key) } {
                Some(s) => s,
                None if dir == DIR_INGRESS => return ep.default_ingress,
                None => return ep.default_egress,
            }
        }
    };
    if p.ports_known {
        key.port_be = port_be;
        let bloom = port_bloom(key.port_be);
        if summary.flags & SUMMARY_HAS_EXACT != 0
            && summary.exact_ports & bloom == bloom
            && let Some(v) = unsafe { POLICY_EXACT.get(&key) }
        {
            return *v;
        }
        if summary.flags & SUMMARY_HAS_RANGES != 0
            && let Some(v) = POLICY.get(Key::new(POLICY_KEY_FIXED_BITS + 16, key))
        {
            return *v;
        }
    }
    summary.fallback
}

/// The policy's verdict on a connection opened in `dir` with destination port `port_be`
/// (`lookup_policy`), except in egress for an endpoint whose policy names DNS names
/// (`HAS_NAMES`) and a `world` or CIDR peer that the endpoint learned under one or more names
/// (`names` picks which): then the entries of the peer's identity and of every name identity
/// decide together, with the one precedence (`bulkhead_ruleset::decide_with_names`). Leaves
/// the names used in `s.names` (none otherwise), for the connection to record.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn decide(
    s: &mut Scratch,
    ep: &EndpointInfo,
    dir: u8,
    peer: u32,
    port_be: u16,
    now: u64,
    names: NamesFrom,
    recorded: &[u32; FQDN_MAX_IDS],
) -> PolicyValue {
    s.names = [FQDN_NAME_ID_NONE; FQDN_MAX_IDS];
    // Every endpoint without name entries stops at the bit test.
    if ep.flags & endpoint_flags::HAS_NAMES == 0
        || dir != DIR_EGRESS
        || !bulkhead_common::identity::names_apply_to(peer)
    {
        return lookup_policy(ep, dir, peer, &s.packet, port_be);
    }
    let mut any = false;
    if names != NamesFrom::Live {
        s.names = *recorded;
        any = recorded.iter().any(|&id| id != FQDN_NAME_ID_NONE);
    }
    if !any && names != NamesFrom::Recorded {
        any = live_names(s, ep.endpoint_id, now);
    }
    if !any {
        return lookup_policy(ep, dir, peer, &s.packet, port_be);
    }
    match decide_by_ranks(s, ep, peer, port_be) {
        Some(v) => {
            bump_stat(stat::NAME_DECISIONS);
            v
        }
        // No rank key at all, not even the policy's default: an agent that wrote the flag
        // without the ranks. The names are ignored rather than guessed.
        None => {
            s.names = [FQDN_NAME_ID_NONE; FQDN_MAX_IDS];
            lookup_policy(ep, dir, peer, &s.packet, port_be)
        }
    }
}

/// Writes the packet's conntrack key into the scratch key of its family (`k4` for IPv4, `k6`
/// otherwise): the same for forward packets and replies (the canonical order of
/// `bulkhead_common::ct_swapped`), built with word moves in place.
#[inline(always)]
fn set_ct_key(k6: &mut CtKey, k4: &mut CtKeyV4, p: &Packet, endpoint_id: u32, dir: u8) {
    // SAFETY: `Packet` and `CtKey` are 8-aligned with their addresses at offsets 0 and 16.
    let (sa, da) = unsafe { (addr::get(&p.saddr), addr::get(&p.daddr)) };
    if p.family == bulkhead_common::FAMILY_V4 {
        let (a, b) = (addr::v4_of(sa), addr::v4_of(da));
        // IPv4-mapped addresses share their first twelve bytes: the byte order of the last
        // four decides, as `ct_swapped` would.
        let swapped = if p.sport_be != p.dport_be {
            p.sport_be > p.dport_be
        } else {
            u32::from_be(a) > u32::from_be(b)
        };
        if swapped {
            k4.saddr = b;
            k4.daddr = a;
            k4.sport_be = p.dport_be;
            k4.dport_be = p.sport_be;
            k4.direction = dir ^ 1;
        } else {
            k4.saddr = a;
            k4.daddr = b;
            k4.sport_be = p.sport_be;
            k4.dport_be = p.dport_be;
            k4.direction = dir;
        }
        k4.endpoint_id = endpoint_id as u16;
        k4.protocol = p.protocol;
        return;
    }
    let swapped = if p.sport_be != p.dport_be {
        p.sport_be > p.dport_be
    } else {
        addr::greater(sa, da)
    };
    unsafe {
        if swapped {
            addr::set(&mut k6.saddr, da);
            addr::set(&mut k6.daddr, sa);
        } else {
            addr::set(&mut k6.saddr, sa);
            addr::set(&mut k6.daddr, da);
        }
    }
    if swapped {
        k6.sport_be = p.dport_be;
        k6.dport_be = p.sport_be;
        k6.direction = dir ^ 1;
    } else {
        k6.sport_be = p.sport_be;
        k6.dport_be = p.dport_be;
        k6.direction = dir;
    }
    k6.endpoint_id = endpoint_id as u16;
    k6.protocol = p.protocol;
}

/// Whether an ICMP error embeds a packet of a connection this endpoint tracks. Uses the
/// scratch key (free by now: the conntrack lookup missed, and an ICMP error is never tracked).
#[inline(never)]
fn icmp_error_related(skb: *mut __sk_buff, s: *mut Scratch, endpoint_id: u32, dir: u8) -> bool {
    let ctx = TcContext::new(skb);
    // SAFETY: per-CPU scratch, exclusively ours for this run.
    let s = unsafe { &mut *s };
    if !parse::parse_icmp_inner(&ctx, &s.packet, &mut s.fwd) {
        return false;
    }
    // The embedded packet went the other way (the opposite policy direction); its connection's
    // key is the same whichever side opened it.
    let k = &mut s.fwd;
    k.endpoint_id = endpoint_id as u16;
    k.direction = dir ^ 1;
    // SAFETY: `CtKey` is 8-aligned with its addresses at offsets 0 and 16.
    let (sa, da) = unsafe { (addr::get(&k.saddr), addr::get(&k.daddr)) };
    let swapped = if k.sport_be != k.dport_be {
        k.sport_be > k.dport_be
    } else {
        addr::greater(sa, da)
    };
    if swapped {
        unsafe {
            addr::set(&mut k.saddr, da);
            addr::set(&mut k.daddr, sa);
        }
        core::mem::swap(&mut k.sport_be, &mut k.dport_be);
        k.direction = dir;
    }
    if s.packet.family == bulkhead_common::FAMILY_V4 {
        // SAFETY: as above.
        let (sa, da) = unsafe { (addr::get(&k.saddr), addr::get(&k.daddr)) };
        s.fwd4 = CtKeyV4 {
            saddr: addr::v4_of(sa),
            daddr: addr::v4_of(da),
            sport_be: k.sport_be,
            dport_be: k.dport_be,
            endpoint_id: k.endpoint_id,
            protocol: k.protocol,
            direction: k.direction,
        };
    }
    // A tombstone is no connection: errors about a revoked one are unrelated.
    ct_get(s).is_some_and(|v| unsafe { (*v).flags } & (CT_CANONICAL | CT_REVOKED) == CT_CANONICAL)
}

/// Whether two addresses are equal, compared as two u64 words.
#[inline(always)]
fn same_addr(a: &[u8; 16], b: &[u8; 16]) -> bool {
    // SAFETY: both live in `#[repr(C, align(8))]` structs (`Packet`, `EndpointInfo`) at
    // offsets that are multiples of 8, so reading them as `[u64; 2]` is aligned.
    let (a, b) = unsafe { (addr::get(a), addr::get(b)) };
    a[0] == b[0] && a[1] == b[1]
}

/// Anti-spoofing: the source is one of the endpoint's addresses (inline, else in
/// `ENDPOINT_ADDRS` for an endpoint with more than two).
#[inline(always)]
fn sends_from_own_address(ep: &EndpointInfo, saddr: &[u8; 16]) -> bool {
    if ep.flags & endpoint_flags::INLINE_ADDRS != 0
        && (same_addr(saddr, &ep.addrs[0]) || same_addr(saddr, &ep.addrs[1]))
    {
        return true;
    }
    if ep.flags & endpoint_flags::MORE_ADDRS == 0 && ep.flags & endpoint_flags::INLINE_ADDRS != 0 {
        return false;
    }
    let key = EndpointAddrKey {
        endpoint_id: ep.endpoint_id,
        addr: *saddr,
    };
    unsafe { ENDPOINT_ADDRS.get(&key) }.is_some()
}

#[inline(always)]
fn drop_packet(ep_id: u32, why: u32, bytes: u64) -> i32 {
    count(ep_id, why, bytes);
    TC_ACT_SHOT
}

/// DNS's port in network byte order, as `Packet::sport_be` holds it.
const DNS_PORT_BE: u16 = bulkhead_common::fqdn::DNS_PORT.to_be();

/// Learning from a DNS answer on its way to the pod, after a verdict that passes it: what every
/// other packet pays is the source-port compare; a packet from port 53 also pays one lookup of
/// its source among the trusted resolvers; only an answer from one calls the parser (not
/// inlined, so the hot path's code and verifier state do not grow). It runs before the program
/// returns, so the learned addresses are in the map before the pod can read the answer.
#[inline(always)]
fn learn_from_dns_answer(skb: *mut __sk_buff, p: &Packet, endpoint_id: u32) {
    if p.sport_be != DNS_PORT_BE
        || !p.ports_known
        || (p.protocol != IPPROTO_UDP && p.protocol != IPPROTO_TCP)
        || !dns::from_resolver(&p.saddr)
    {
        return;
    }
    dns::learn(skb, endpoint_id, p.l4_off, p.protocol);
}

/// Parses and judges a packet; with `learn_dns` (the to-pod hook), a passed DNS answer from a
/// trusted resolver is learned from first.
#[inline(always)]
fn enforce(ctx: &TcContext, dir: u8, learn_dns: bool) -> i32 {
    // SAFETY: reading a field of the socket buffer context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(ep) = endpoint_of(ifindex) else {
        // Not an endpoint interface (yet): the agent writes the endpoint before attaching and
        // detaches before removing it, so this is a foreign attachment; leave it alone.
        return TC_ACT_OK;
    };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: the per-CPU scratch slot is exclusively ours for the duration of this run.
    let s = unsafe { &mut *scratch };
    let bytes = ctx.len() as u64;
    match parse::parse(ctx, &mut s.packet) {
        Parsed::Ip => {}
        Parsed::Arp => {
            count(ep.endpoint_id, reason::PASSED_NON_IP, bytes);
            return TC_ACT_OK;
        }
        Parsed::Malformed => return drop_packet(ep.endpoint_id, reason::DROP_MALFORMED, bytes),
        Parsed::Unparseable => {
            return drop_packet(ep.endpoint_id, reason::DROP_UNPARSEABLE, bytes);
        }
    }
    if ep.flags & endpoint_flags::LOCKDOWN != 0 {
        return drop_packet(ep.endpoint_id, reason::DROP_LOCKDOWN, bytes);
    }
    if s.packet.neighbor_discovery {
        count(ep.endpoint_id, reason::PASSED_NON_IP, bytes);
        return TC_ACT_OK;
    }
    if dir == DIR_EGRESS
        && ep.flags & endpoint_flags::ANTI_SPOOF != 0
        && !sends_from_own_address(ep, &s.packet.saddr)
    {
        return drop_packet(ep.endpoint_id, reason::DROP_SPOOFED, bytes);
    }
    let enforced = if dir == DIR_INGRESS {
        ep.flags & endpoint_flags::ENFORCE_INGRESS != 0
    } else {
        ep.flags & endpoint_flags::ENFORCE_EGRESS != 0
    };
    if !enforced {
        count(ep.endpoint_id, reason::ALLOWED_NEW, bytes);
        if learn_dns {
            learn_from_dns_answer(ctx.skb.skb, &s.packet, ep.endpoint_id);
        }
        return TC_ACT_OK;
    }
    let verdict = judge(ctx.skb.skb, scratch, ep, dir);
    if learn_dns && verdict == TC_ACT_OK {
        // SAFETY: per-CPU scratch, exclusively ours for this run; `judge` is done with it.
        let p = unsafe { &(*scratch).packet };
        learn_from_dns_answer(ctx.skb.skb, p, ep.endpoint_id);
    }
    verdict
}

/// Conntrack and policy for a parsed packet of an enforced endpoint.
///
/// Connections: only what opens one creates an entry (a TCP SYN the policy admits; the first
/// packet of a UDP, ICMP, SCTP or other flow). A TCP segment without SYN that finds no entry is
/// judged by the policy of its own direction and not tracked, so no side can make the other's
/// packets "replies" after the fact. When the policy changed since a connection was admitted,
/// its next packet from either side re-checks it against the policy of the direction that
/// opened it; a connection the policy no longer admits becomes a tombstone that drops both
/// sides' packets until a new SYN (TCP) or, for connectionless protocols, a later policy that
/// admits the opener again.
#[inline(always)]
fn judge(skb: *mut __sk_buff, sp: *mut Scratch, ep: &EndpointInfo, dir: u8) -> i32 {
    let ctx = TcContext::new(skb);
    // SAFETY: per-CPU scratch, exclusively ours for this run.
    let s = unsafe { &mut *sp };
    let bytes = ctx.len() as u64;
    let cfg = config();
    let generation = cfg.generation;
    let t = now_coarse(&cfg);

    // One lookup finds the connection whichever side's packet this is. A TCP SYN (without ACK)
    // opens a connection and belongs to none: it goes straight to the policy, and a SYN the
    // policy admits (re)starts the entry (a tombstone too).
    let tracked = if s.packet.tcp_syn {
        None
    } else {
        set_ct_key(&mut s.fwd, &mut s.fwd4, &s.packet, ep.endpoint_id, dir);
        ct_get(s)
    };
    // The policy's verdict on this packet as the opening of a flow, when a tombstone's opener
    // re-opens it below.
    let mut reopened: Option<PolicyValue> = None;
    if let Some(ct) = tracked {
        // SAFETY: LRU value pointer valid during this program run; racing updates of counters
        // from two CPUs may lose an increment, never corrupt memory.
        let (flags, admitted_in) = unsafe { ((*ct).flags, (*ct).generation) };
        let forward = (flags & CT_INITIATED_EGRESS != 0) == (dir == DIR_EGRESS);
        if flags & CT_CANONICAL == 0 {
            // Left by an agent before canonical keys: judged anew below.
            ct_remove(s);
        } else if flags & CT_REVOKED != 0 {
            // Revoked. Only the opener of a connectionless flow may re-open it, and only once
            // the policy changed again and admits it; TCP needs a new SYN.
            if admitted_in == generation || !forward || s.packet.protocol == IPPROTO_TCP {
                unsafe { (*ct).last_seen_ns = t };
                return drop_packet(ep.endpoint_id, reason::DROP_REVOKED, bytes);
            }
            let peer = peer_identity(&s.packet, dir, &cfg);
            // The opener re-opens with the names the flow was admitted with (their TTL may have
            // run out: a revoked flow is the same flow), else with what it learned since.
            let recorded = unsafe { (*ct).names };
            let port = s.packet.dport_be;
            let v = decide(
                s,
                ep,
                dir,
                peer,
                port,
                t,
                NamesFrom::RecordedElseLive,
                &recorded,
            );
            if v.verdict != VERDICT_ALLOW {
                unsafe {
                    (*ct).generation = generation;
                    (*ct).rule_id = v.rule_id;
                    (*ct).last_seen_ns = t;
                }
                return drop_packet(ep.endpoint_id, reason::DROP_REVOKED, bytes);
            }
            reopened = Some(v);
        } else if admitted_in == generation {
            unsafe {
                (*ct).last_seen_ns = t;
                if forward {
                    (*ct).packets_fwd += 1;
                    (*ct).bytes_fwd += bytes;
                } else {
                    (*ct).packets_rev += 1;
                    (*ct).bytes_rev += bytes;
                }
            }
            count(ep.endpoint_id, reason::ALLOWED_TRACKED, bytes);
            return TC_ACT_OK;
        } else {
            // The policy changed since: re-checked as the opening packet would be now, whichever
            // side this packet comes from (a reply's tuple reversed).
            let (opened_dir, port) = if forward {
                (dir, s.packet.dport_be)
            } else {
                (dir ^ 1, s.packet.sport_be)
            };
            let peer = peer_identity(&s.packet, dir, &cfg);
            // With the names it was admitted with, expired or not: only a policy that no longer
            // admits them revokes it.
            let recorded = unsafe { (*ct).names };
            let v = decide(
                s,
                ep,
                opened_dir,
                peer,
                port,
                t,
                NamesFrom::Recorded,
                &recorded,
            );
            if v.verdict == VERDICT_ALLOW {
                unsafe {
                    (*ct).generation = generation;
                    (*ct).rule_id = v.rule_id;
                    (*ct).last_seen_ns = t;
                    if forward {
                        (*ct).packets_fwd += 1;
                        (*ct).bytes_fwd += bytes;
                    } else {
                        (*ct).packets_rev += 1;
                        (*ct).bytes_rev += bytes;
                    }
                }
                count(ep.endpoint_id, reason::ALLOWED_TRACKED, bytes);
                return TC_ACT_OK;
            }
            // Revoked: the entry stays as a tombstone, reported once, in the orientation of the
            // connection's opening.
            unsafe {
                (*ct).flags = flags | CT_REVOKED;
                (*ct).generation = generation;
                (*ct).rule_id = v.rule_id;
                (*ct).last_seen_ns = t;
            }
            if !forward {
                reverse_tuple(&mut s.packet);
            }
            let m = EventMeta::new(
                ep,
                opened_dir,
                peer,
                &v,
                EVENT_REVOKED,
                VERDICT_DENY,
                reason::DROP_REVOKED,
            );
            emit(skb, &s.packet, &m);
            return drop_packet(ep.endpoint_id, reason::DROP_REVOKED, bytes);
        }
    }

    let peer = peer_identity(&s.packet, dir, &cfg);
    // ICMP errors pass only when they relate to a tracked connection of this endpoint.
    if s.packet.icmp_error {
        if icmp_error_related(skb, sp, ep.endpoint_id, dir) {
            count(ep.endpoint_id, reason::ALLOWED_TRACKED, bytes);
            return TC_ACT_OK;
        }
        let v = PolicyValue {
            rule_id: RULE_UNRELATED_ICMP_ERROR,
            audit_rule_id: RULE_UNRELATED_ICMP_ERROR,
            verdict: VERDICT_DENY,
            audit_verdict: VERDICT_DENY,
            _pad: [0; 2],
        };
        let m = EventMeta::new(
            ep,
            dir,
            peer,
            &v,
            EVENT_DENIED,
            VERDICT_DENY,
            reason::DENIED_POLICY,
        );
        emit_denied(skb, sp, &m, &cfg);
        return drop_packet(ep.endpoint_id, reason::DENIED_POLICY, bytes);
    }

    // A new connection: the policy decides, and an allowed one is tracked.
    let v = match reopened {
        Some(v) => v,
        None => {
            let port = s.packet.dport_be;
            let none = [FQDN_NAME_ID_NONE; FQDN_MAX_IDS];
            decide(s, ep, dir, peer, port, t, NamesFrom::Live, &none)
        }
    };
    if v.verdict != VERDICT_ALLOW {
        let why = if ep.flags & endpoint_flags::QUARANTINED != 0 {
            reason::DROP_QUARANTINE
        } else {
            reason::DENIED_POLICY
        };
        let m = EventMeta::new(ep, dir, peer, &v, EVENT_DENIED, VERDICT_DENY, why);
        emit_denied(skb, sp, &m, &cfg);
        return drop_packet(ep.endpoint_id, why, bytes);
    }
    if s.packet.protocol == IPPROTO_TCP && !s.packet.tcp_syn {
        // Only a SYN opens a TCP connection: this segment passes as the policy of its own
        // direction admits it, and leaves no state behind.
        count(ep.endpoint_id, reason::ALLOWED_UNTRACKED, bytes);
        return TC_ACT_OK;
    }
    let audit = v.audit_verdict == VERDICT_DENY;
    s.ct = CtValue {
        created_ns: t,
        last_seen_ns: t,
        packets_fwd: 1,
        bytes_fwd: bytes,
        packets_rev: 0,
        bytes_rev: 0,
        generation,
        rule_id: v.rule_id,
        peer_identity: peer,
        names: s.names,
        flags: CT_CANONICAL
            | if audit { CT_AUDIT } else { 0 }
            | if dir == DIR_EGRESS {
                CT_INITIATED_EGRESS
            } else {
                0
            },
    };
    if s.packet.tcp_syn {
        set_ct_key(&mut s.fwd, &mut s.fwd4, &s.packet, ep.endpoint_id, dir);
    }
    if !ct_insert(s) {
        bump_stat(stat::CT_INSERT_FAILED);
    }
    let (kind, verdict, why) = if audit {
        (EVENT_AUDIT, VERDICT_ALLOW, reason::AUDIT_WOULD_DENY)
    } else {
        (EVENT_NEW_FLOW, VERDICT_ALLOW, reason::ALLOWED_NEW)
    };
    let m = EventMeta::new(ep, dir, peer, &v, kind, verdict, why);
    emit(skb, &s.packet, &m);
    count(ep.endpoint_id, why, bytes);
    TC_ACT_OK
}

/// The identity of the packet's peer: its source on ingress, its destination on egress.
#[inline(always)]
fn peer_identity(p: &Packet, dir: u8, cfg: &Config) -> u32 {
    let a = if dir == DIR_INGRESS {
        &p.saddr
    } else {
        &p.daddr
    };
    identity_of(p, a, cfg)
}

/// Turns a parsed reply around, into the orientation of its connection's opening packet.
#[inline(always)]
fn reverse_tuple(p: &mut Packet) {
    // SAFETY: `Packet` is 8-aligned with its addresses at offsets 0 and 16.
    unsafe {
        let (sa, da) = (addr::get(&p.saddr), addr::get(&p.daddr));
        addr::set(&mut p.saddr, da);
        addr::set(&mut p.daddr, sa);
    }
    core::mem::swap(&mut p.sport_be, &mut p.dport_be);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
