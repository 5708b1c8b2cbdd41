//! Flow events: records on the `EVENTS` ring buffer for new, denied, revoked and audited
//! flows and for prefiltered packets, with the per-flow rate limit of deny events. Kept apart
//! from the verdict code so that what is reported, and how often, is read in one place.

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{PerCpuArray, RingBuf},
    programs::TcContext,
};
use bulkhead_common::{
    Config, DENY_RECENT_SLOTS, DIR_INGRESS, DenyRecent, EVENT_DENIED, EndpointInfo, FlowEvent,
    PolicyValue, PrefilterValue, VERDICT_DENY, reason, stat,
};

use crate::{
    SCRATCH, Scratch, addr, bump_stat, now_coarse,
    parse::{IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, Packet},
};

/// The deny-event rate limiter (see [`DenyRecent`]); per CPU, so it is not pinned: a restarted
/// agent starts with a clean table, which costs at most one extra event per flow.
#[map]
static DENY_RECENT: PerCpuArray<DenyRecent> = PerCpuArray::with_max_entries(DENY_RECENT_SLOTS, 0);

#[map]
static EVENTS: RingBuf = RingBuf::pinned(1 << 22, 0);

/// A deny event for a prefiltered packet (ports when the header is at hand).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn emit_prefiltered(
    start: usize,
    end: usize,
    ifindex: u32,
    pair: *const PrefilterValue,
    src: &[u8; 16],
    dst: &[u8; 16],
    peer: u32,
    family: u8,
) {
    let (mut protocol, mut l4) = (0u8, 0usize);
    if family == bulkhead_common::FAMILY_V4 {
        if start + 14 + 20 <= end {
            // SAFETY: bounds checked against data_end.
            let (b0, frag, proto) = unsafe {
                (
                    *((start + 14) as *const u8),
                    u16::from_be(*((start + 14 + 6) as *const u16)),
                    *((start + 14 + 9) as *const u8),
                )
            };
            protocol = proto;
            // Ports only in the first fragment.
            if frag & 0x1fff == 0 {
                l4 = 14 + ((b0 & 0x0f) as usize) * 4;
            }
        }
    } else if start + 14 + 40 <= end {
        // SAFETY: bounds checked against data_end.
        protocol = unsafe { *((start + 14 + 6) as *const u8) };
        l4 = 14 + 40;
    }
    let (mut sport_be, mut dport_be) = (0u16, 0u16);
    if (34..=14 + 60).contains(&l4)
        && (protocol == IPPROTO_TCP || protocol == IPPROTO_UDP || protocol == IPPROTO_SCTP)
        && start + l4 + 4 <= end
    {
        // SAFETY: bounds checked against data_end.
        unsafe {
            sport_be = *((start + l4) as *const u16);
            dport_be = *((start + l4 + 2) as *const u16);
        }
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the per-CPU scratch slot is exclusively ours for this run (XDP runs alone on
    // its CPU like TC); `pair` is a live hash value pointer.
    let (p, m) = unsafe {
        let p = &mut (*scratch).packet;
        p.family = family;
        p.protocol = protocol;
        addr::set(
            &mut p.saddr,
            core::mem::transmute::<[u8; 16], addr::Words>(*src),
        );
        addr::set(
            &mut p.daddr,
            core::mem::transmute::<[u8; 16], addr::Words>(*dst),
        );
        p.sport_be = sport_be;
        p.dport_be = dport_be;
        (
            &*p,
            EventMeta {
                endpoint_id: (*pair).endpoint_id,
                local_identity: (*pair).local_identity,
                peer_identity: peer,
                rule_id: (*pair).rule_id,
                audit_rule_id: (*pair).rule_id,
                audit_verdict: VERDICT_DENY,
                direction: DIR_INGRESS,
                kind: EVENT_DENIED,
                verdict: VERDICT_DENY,
                reason: reason::DROP_PREFILTER as u8,
            },
        )
    };
    write_event(p, &m, ifindex, (end - start) as u32);
}

/// The monotonic clock, exact: for event timestamps.
#[inline(always)]
pub(crate) fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// What an event says besides the packet's tuple.
pub(crate) struct EventMeta {
    pub(crate) endpoint_id: u32,
    pub(crate) local_identity: u32,
    pub(crate) peer_identity: u32,
    pub(crate) rule_id: u32,
    pub(crate) audit_rule_id: u32,
    pub(crate) audit_verdict: u8,
    pub(crate) direction: u8,
    pub(crate) kind: u8,
    pub(crate) verdict: u8,
    pub(crate) reason: u8,
}

impl EventMeta {
    #[inline(always)]
    pub(crate) fn new(
        ep: &EndpointInfo,
        dir: u8,
        peer: u32,
        v: &PolicyValue,
        kind: u8,
        verdict: u8,
        why: u32,
    ) -> Self {
        EventMeta {
            endpoint_id: ep.endpoint_id,
            local_identity: ep.identity,
            peer_identity: peer,
            rule_id: v.rule_id,
            audit_rule_id: v.audit_rule_id,
            audit_verdict: v.audit_verdict,
            direction: dir,
            kind,
            verdict,
            reason: why as u8,
        }
    }
}

/// Writes a flow event straight into the ring buffer (no copy on the stack).
#[inline(never)]
pub(crate) fn emit(skb: *mut __sk_buff, p: &Packet, m: &EventMeta) {
    let ctx = TcContext::new(skb);
    // SAFETY: reading a field of the socket buffer context.
    let ifindex = unsafe { (*skb).ifindex };
    write_event(p, m, ifindex, ctx.len());
}

/// Fills and submits one ring buffer record; a full buffer is counted, never silent.
#[inline(always)]
pub(crate) fn write_event(p: &Packet, m: &EventMeta, ifindex: u32, bytes: u32) {
    let Some(mut entry) = EVENTS.reserve::<FlowEvent>(0) else {
        bump_stat(stat::EVENTS_LOST);
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points at a reserved, exclusively owned ring buffer record of the right size;
    // every field is written before submit.
    unsafe {
        (*e).timestamp_ns = now();
        // The record and `Packet` are 8-aligned, their addresses at 8-aligned offsets.
        addr::set(&mut (*e).saddr, addr::get(&p.saddr));
        addr::set(&mut (*e).daddr, addr::get(&p.daddr));
        (*e).sport_be = p.sport_be;
        (*e).dport_be = p.dport_be;
        (*e).protocol = p.protocol;
        (*e).family = p.family;
        (*e).direction = m.direction;
        (*e).kind = m.kind;
        (*e).verdict = m.verdict;
        (*e).reason = m.reason;
        (*e).audit_verdict = m.audit_verdict;
        (*e)._pad = 0;
        (*e).endpoint_id = m.endpoint_id;
        (*e).ifindex = ifindex;
        (*e).local_identity = m.local_identity;
        (*e).peer_identity = m.peer_identity;
        (*e).rule_id = m.rule_id;
        (*e).audit_rule_id = m.audit_rule_id;
        (*e).bytes = bytes;
    }
    entry.submit(0);
}

/// The minimum gap between two deny events of one flow (one second unless configured).
#[inline(always)]
pub(crate) fn deny_event_interval(cfg: &Config) -> u64 {
    if cfg.deny_event_interval_ns != 0 {
        cfg.deny_event_interval_ns as u64
    } else {
        1_000_000_000
    }
}

/// The last four bytes of an address (all of an IPv4-mapped one), for the deny fingerprint.
#[inline(always)]
pub(crate) fn addr_lo(a: &[u8; 16]) -> u32 {
    // SAFETY: only called on the 8-aligned `Packet`'s addresses.
    addr::v4_of(unsafe { addr::get(a) })
}

/// Deny events are rate-limited per flow so that a flood cannot starve the ring buffer.
#[inline(always)]
pub(crate) fn emit_denied(skb: *mut __sk_buff, s: *mut Scratch, m: &EventMeta, cfg: &Config) {
    // SAFETY: per-CPU scratch, exclusively ours for this run.
    let s = unsafe { &*s };
    let p = &s.packet;
    let saddr_lo = addr_lo(&p.saddr);
    let daddr_lo = addr_lo(&p.daddr);
    let ports = ((p.sport_be as u32) << 16) | p.dport_be as u32;
    let tag = ((m.endpoint_id & 0xffff) << 16) | ((p.protocol as u32) << 8) | m.direction as u32;
    let hash = (ports ^ saddr_lo.rotate_left(7) ^ daddr_lo.rotate_left(19) ^ tag)
        .wrapping_mul(0x9e37_79b1);
    let Some(slot) = DENY_RECENT.get_ptr_mut(hash >> (32 - DENY_RECENT_SLOTS.trailing_zeros()))
    else {
        return;
    };
    let t = now_coarse(cfg);
    let interval = deny_event_interval(cfg);
    // SAFETY: a per-CPU slot, exclusively ours for this run.
    unsafe {
        let r = &mut *slot;
        let same = r.saddr_lo == saddr_lo
            && r.daddr_lo == daddr_lo
            && r.ports == ports
            && r.endpoint_id == m.endpoint_id as u16
            && r.protocol == p.protocol
            && r.direction == m.direction;
        if same && r.last_event_ns != 0 && t.wrapping_sub(r.last_event_ns) < interval {
            r.suppressed += 1;
            bump_stat(stat::EVENTS_RATE_LIMITED);
            return;
        }
        *r = DenyRecent {
            saddr_lo,
            daddr_lo,
            ports,
            endpoint_id: m.endpoint_id as u16,
            protocol: p.protocol,
            direction: m.direction,
            last_event_ns: t,
            suppressed: 0,
        };
    }
    emit(skb, p, m);
}
