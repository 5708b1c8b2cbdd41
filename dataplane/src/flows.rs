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
use bulkhead_controller::ruleset::{Direction, RuleSet};
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
