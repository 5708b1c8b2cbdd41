//! Flow events from the kernel's ring buffer, turned into flow records that name pods and rules.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use bulkhead_common::{
    DIR_INGRESS, EVENT_AUDIT, EVENT_DENIED, EVENT_NEW_FLOW, EVENT_REVOKED, FAMILY_V4, FlowEvent,
    RULE_UNRELATED_ICMP_ERROR, VERDICT_ALLOW, reason,
};
use bulkhead_ruleset::{Direction, RuleSet};
use serde::Serialize;
use tokio::io::unix::AsyncFd;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlowVerdict {
    Allowed,
    Denied,
    /// Allowed, but an audit-mode policy would have denied it.
    AuditWouldDeny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlowKind {
    /// First packet of a new connection.
    New,
    /// A packet the policy refused (rate-limited per flow).
    Denied,
    /// A tracked connection cut because the policy no longer admits it.
    Revoked,
    /// Admitted, reported because audit-mode policy would deny it.
    Audit,
}

/// One flow record, as the agent reports it.
#[derive(Debug, Clone, Serialize)]
pub struct FlowRecord {
    /// Nanoseconds since boot (kernel clock), as in the event.
    pub kernel_time_ns: u64,
    pub observed_at: SystemTime,
    pub node: String,
    /// The endpoint at which the verdict was made, `namespace/pod`.
    pub endpoint: String,
    pub direction: Direction,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub kind: FlowKind,
    pub verdict: FlowVerdict,
    /// What decided: a policy rule, a default, or a built-in reason.
    pub rule: String,
    pub rule_id: u32,
    pub local_identity: u32,
    pub peer_identity: u32,
    /// The peer, `namespace/pod`, when it is an endpoint this node knows.
    pub peer: Option<String>,
    pub reason: &'static str,
    pub bytes: u32,
}

fn addr(family: u8, bytes: [u8; 16]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::new(bytes[12], bytes[13], bytes[14], bytes[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(bytes))
    }
}

/// Names for endpoint ids, addresses and rule ids: built from the rule set in force.
#[derive(Debug, Default, Clone)]
pub struct FlowContext {
    pub node: String,
    endpoints: HashMap<u32, String>,
    addresses: HashMap<IpAddr, String>,
    ruleset: Arc<RuleSet>,
}

impl FlowContext {
    pub fn new(ruleset: &RuleSet) -> FlowContext {
        FlowContext {
            node: ruleset.node.clone(),
            endpoints: ruleset.endpoints.iter().map(|e| (e.id, e.name())).collect(),
            addresses: ruleset
                .endpoints
                .iter()
                .flat_map(|e| e.ips.iter().map(move |ip| (*ip, e.name())))
                .collect(),
            ruleset: Arc::new(ruleset.clone()),
        }
    }

    pub fn record(&self, e: &FlowEvent) -> FlowRecord {
        let src = addr(e.family, e.saddr);
        let dst = addr(e.family, e.daddr);
        let direction = if e.direction == DIR_INGRESS {
            Direction::Ingress
        } else {
            Direction::Egress
        };
        let peer_ip = match direction {
            Direction::Ingress => src,
            Direction::Egress => dst,
        };
        let kind = match e.kind {
            EVENT_NEW_FLOW => FlowKind::New,
            EVENT_REVOKED => FlowKind::Revoked,
            EVENT_AUDIT => FlowKind::Audit,
            EVENT_DENIED => FlowKind::Denied,
            _ => FlowKind::Denied,
        };
        let verdict = if e.verdict != VERDICT_ALLOW {
            FlowVerdict::Denied
        } else if e.kind == EVENT_AUDIT {
            FlowVerdict::AuditWouldDeny
        } else {
            FlowVerdict::Allowed
        };
        let rule_id = if verdict == FlowVerdict::AuditWouldDeny {
            e.audit_rule_id
        } else {
            e.rule_id
        };
        let rule = if rule_id == RULE_UNRELATED_ICMP_ERROR {
            "ICMP error unrelated to any tracked connection".to_string()
        } else {
            self.ruleset.describe(rule_id)
        };
        FlowRecord {
            kernel_time_ns: e.timestamp_ns,
            observed_at: SystemTime::now(),
            node: self.node.clone(),
            endpoint: self
                .endpoints
                .get(&e.endpoint_id)
                .cloned()
                .unwrap_or_else(|| format!("endpoint#{}", e.endpoint_id)),
            direction,
            src,
            dst,
            src_port: u16::from_be(e.sport_be),
            dst_port: u16::from_be(e.dport_be),
            protocol: e.protocol,
            kind,
            verdict,
            rule,
            rule_id,
            local_identity: e.local_identity,
            peer_identity: e.peer_identity,
            peer: self.addresses.get(&peer_ip).cloned(),
            reason: reason::NAMES
                .get(e.reason as usize)
                .copied()
                .unwrap_or("unknown"),
            bytes: e.bytes,
        }
    }
}

/// Decodes one ring-buffer record; `None` when it is too short to be a [`FlowEvent`].
pub fn decode(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() < std::mem::size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: FlowEvent is plain old data and the length was checked; read_unaligned copes with
    // any alignment of the ring buffer record.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<FlowEvent>()) })
}

/// Reads flow events until the ring buffer closes, handing each record to `sink`.
/// `context` is re-read for every batch so records follow rule-set changes.
pub async fn read_events(
    ring: RingBuf<MapData>,
    context: Arc<RwLock<FlowContext>>,
    mut sink: impl FnMut(FlowRecord),
    malformed: impl Fn(),
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged for as long as
    // the AsyncFd owns the ring buffer.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        let ctx = context.read().map(|c| c.clone()).unwrap_or_default();
        while let Some(item) = ring.next() {
            match decode(&item) {
                Some(ev) => sink(ctx.record(&ev)),
                None => malformed(),
            }
        }
        guard.clear_ready();
    }
}

/// A bounded buffer of the most recent flow records (oldest evicted first, evictions counted).
#[derive(Debug)]
pub struct RecentFlows {
    capacity: usize,
    records: std::collections::VecDeque<FlowRecord>,
    pub evicted: u64,
}

impl RecentFlows {
    pub fn new(capacity: usize) -> RecentFlows {
        RecentFlows {
            capacity: capacity.max(1),
            records: std::collections::VecDeque::with_capacity(capacity.min(1 << 16)),
            evicted: 0,
        }
    }

    pub fn push(&mut self, r: FlowRecord) {
        if self.records.len() == self.capacity {
            self.records.pop_front();
            self.evicted += 1;
        }
        self.records.push_back(r);
    }

    pub fn since(&self, max_age: Duration) -> Vec<FlowRecord> {
        let now = SystemTime::now();
        self.records
            .iter()
            .filter(|r| now.duration_since(r.observed_at).unwrap_or_default() <= max_age)
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// One tracked connection with its counters, read from the kernel's conntrack table.
#[derive(Debug, Clone, Serialize)]
pub struct Connection {
    /// The endpoint that tracks it, `namespace/pod`.
    pub endpoint: String,
    /// The policy direction it was admitted in, from the endpoint's point of view.
    pub direction: Direction,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub packets_forward: u64,
    pub bytes_forward: u64,
    pub packets_reply: u64,
    pub bytes_reply: u64,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    /// The rule that admitted it, or for a revoked one the rule that revoked it.
    pub rule: String,
    pub peer_identity: u32,
    pub peer: Option<String>,
    /// Revoked by a policy change or a quarantine: a tombstone that drops both sides' packets
    /// until it idles out (or a new TCP SYN replaces it).
    pub revoked: bool,
}

/// The kernel clock (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) as wall-clock time.
fn wall_clock(ktime_ns: u64) -> SystemTime {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let now_mono = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    SystemTime::now() - Duration::from_nanos(now_mono.saturating_sub(ktime_ns))
}

/// Most connections one page of [`connections`] holds.
pub const MAX_CONNECTIONS_PAGE: usize = 10_000;

/// One page of the tracked connections of this node (`offset` entries skipped, at most `limit`
/// kept), with packets, bytes, first and last seen, and the total number; read from the pinned
/// conntrack maps (so it needs no handle on the loaded object). Only the page is converted and
/// held: a full table (half a million entries) costs a walk, not its size in memory. The table
/// is live, so pages taken one after the other may overlap or miss connections that came or went.
pub fn connections(
    pin_dir: &std::path::Path,
    ctx: &FlowContext,
    offset: usize,
    limit: usize,
) -> (Vec<Connection>, usize) {
    use aya::maps::{HashMap as BpfHashMap, Map};
    use bulkhead_common::{CtKey, CtKeyV4, CtValue};
    fn pinned<K: aya::Pod>(
        pin_dir: &std::path::Path,
        name: &str,
    ) -> Option<BpfHashMap<MapData, K, CtValue>> {
        let data = MapData::from_pin(pin_dir.join("maps").join(name)).ok()?;
        BpfHashMap::try_from(Map::from_map_data(data).ok()?).ok()
    }
    let limit = limit.min(MAX_CONNECTIONS_PAGE);
    let v4 = pinned::<CtKeyV4>(pin_dir, "CONNTRACK_V4");
    let v6 = pinned::<CtKey>(pin_dir, "CONNTRACK");
    // IPv4 connections under their 16-byte keys, widened to the common form.
    let all = v4
        .iter()
        .flat_map(|m| m.iter().flatten().map(|(k, v)| (k.widen(), v)))
        .chain(v6.iter().flat_map(|m| m.iter().flatten()))
        // Entries of an agent before canonical keys are dropped by the kernel on sight.
        .filter(|(_, v)| v.flags & bulkhead_common::CT_CANONICAL != 0);
    let mut total = 0;
    let mut page = Vec::new();
    for (k, v) in all {
        if total >= offset && page.len() < limit {
            page.push(connection(k, v, ctx));
        }
        total += 1;
    }
    (page, total)
}

/// A conntrack entry as the agent reports it.
fn connection(
    mut k: bulkhead_common::CtKey,
    v: bulkhead_common::CtValue,
    ctx: &FlowContext,
) -> Connection {
    // Keys hold the tuple in canonical order: turn it back into the opener's.
    let opened_egress = v.flags & bulkhead_common::CT_INITIATED_EGRESS != 0;
    if (k.direction != DIR_INGRESS) != opened_egress {
        std::mem::swap(&mut k.saddr, &mut k.daddr);
        std::mem::swap(&mut k.sport_be, &mut k.dport_be);
        k.direction ^= 1;
    }
    let family = if k.saddr[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] {
        FAMILY_V4
    } else {
        bulkhead_common::FAMILY_V6
    };
    let (src, dst) = (addr(family, k.saddr), addr(family, k.daddr));
    let direction = if k.direction == DIR_INGRESS {
        Direction::Ingress
    } else {
        Direction::Egress
    };
    let peer_ip = match direction {
        Direction::Ingress => src,
        Direction::Egress => dst,
    };
    Connection {
        endpoint: ctx
            .endpoints
            .get(&(k.endpoint_id as u32))
            .cloned()
            .unwrap_or_else(|| format!("endpoint#{}", k.endpoint_id)),
        direction,
        src,
        dst,
        src_port: u16::from_be(k.sport_be),
        dst_port: u16::from_be(k.dport_be),
        protocol: k.protocol,
        packets_forward: v.packets_fwd,
        bytes_forward: v.bytes_fwd,
        packets_reply: v.packets_rev,
        bytes_reply: v.bytes_rev,
        first_seen: wall_clock(v.created_ns),
        last_seen: wall_clock(v.last_seen_ns),
        rule: ctx.ruleset.describe(v.rule_id),
        peer_identity: v.peer_identity,
        peer: ctx.addresses.get(&peer_ip).cloned(),
        revoked: v.flags & bulkhead_common::CT_REVOKED != 0,
    }
}
