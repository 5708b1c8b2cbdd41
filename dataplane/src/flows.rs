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
    VERDICT_ALLOW, VERDICT_DENY,
};
use bulkhead_ruleset::{
    Direction, EndpointRef, FlowReason, NamePattern, PodKey, RuleSet, StagedOutcome, identity,
};
pub use bulkhead_ruleset::{FlowKind, FlowVerdict};
use serde::Serialize;
use tokio::io::unix::AsyncFd;

use crate::fqdn::{LearnedMaps, monotonic_now_ns};

/// One flow record as this agent keeps it for `/flows`: the contract's record (what every agent
/// reports to the controller, observed at its `time_unix_nanos`, as one packet) and what only
/// this agent knows.
#[derive(Debug, Clone)]
pub struct FlowRecord {
    /// Nanoseconds since boot (kernel clock), as in the event.
    pub kernel_time_ns: u64,
    /// The node that observed it.
    pub node: String,
    /// The record as agents send it to the controller.
    pub flow: bulkhead_ruleset::FlowRecord,
}

impl FlowRecord {
    /// When the agent read the event (the contract's `time_unix_nanos`).
    pub fn observed_at(&self) -> SystemTime {
        std::time::UNIX_EPOCH + Duration::from_nanos(self.flow.time_unix_nanos)
    }

    /// The record as agents send it to the controller.
    pub fn to_contract(&self) -> bulkhead_ruleset::FlowRecord {
        self.flow.clone()
    }
}

/// `/flows` serves what it served before the record embedded the contract's, field for field
/// and in the same order: `observed_at` as a `SystemTime`, no `time_unix_nanos` or `packets`.
impl Serialize for FlowRecord {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let f = &self.flow;
        let mut out = s.serialize_struct("FlowRecord", 20)?;
        out.serialize_field("kernel_time_ns", &self.kernel_time_ns)?;
        out.serialize_field("observed_at", &self.observed_at())?;
        out.serialize_field("node", &self.node)?;
        out.serialize_field("endpoint", &f.endpoint)?;
        out.serialize_field("direction", &f.direction)?;
        out.serialize_field("src", &f.src)?;
        out.serialize_field("dst", &f.dst)?;
        out.serialize_field("src_port", &f.src_port)?;
        out.serialize_field("dst_port", &f.dst_port)?;
        out.serialize_field("protocol", &f.protocol)?;
        out.serialize_field("kind", &f.kind)?;
        out.serialize_field("verdict", &f.verdict)?;
        out.serialize_field("rule", &f.rule)?;
        out.serialize_field("rule_id", &f.rule_id)?;
        out.serialize_field("local_identity", &f.local_identity)?;
        out.serialize_field("peer_identity", &f.peer_identity)?;
        out.serialize_field("peer", &f.peer)?;
        // Only where the peer has names, so records without them read exactly as before.
        if f.peer_names.is_empty() {
            out.skip_field("peer_names")?;
        } else {
            out.serialize_field("peer_names", &f.peer_names)?;
        }
        out.serialize_field("reason", &f.reason)?;
        out.serialize_field("bytes", &f.bytes)?;
        out.end()
    }
}

fn addr(family: u8, bytes: [u8; 16]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::new(bytes[12], bytes[13], bytes[14], bytes[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(bytes))
    }
}

fn pod(e: &bulkhead_ruleset::Endpoint) -> PodKey {
    PodKey {
        namespace: e.namespace.clone(),
        name: e.pod.clone(),
    }
}

/// Names for endpoint ids, addresses and rule ids: built from the rule set in force.
#[derive(Debug, Default, Clone)]
pub struct FlowContext {
    pub node: String,
    endpoints: HashMap<u32, PodKey>,
    addresses: HashMap<IpAddr, PodKey>,
    /// The rule set's name patterns by name identity: what learned addresses are named by.
    names: HashMap<u32, NamePattern>,
    ruleset: Arc<RuleSet>,
}

/// Whether a peer of this identity may have been learned from DNS: the world, a CIDR, a name,
/// or unknown; never the host or a pod (their records name them as such).
pub fn may_have_names(peer_identity: u32) -> bool {
    match peer_identity {
        identity::UNKNOWN | identity::WORLD => true,
        identity::HOST => false,
        // A peer cluster's pod is named by its identity, like a local one.
        id => id >= identity::FIRST_CIDR_IDENTITY && !identity::is_remote(id),
    }
}

impl FlowContext {
    pub fn new(ruleset: &RuleSet) -> FlowContext {
        FlowContext {
            node: ruleset.node.clone(),
            endpoints: ruleset.endpoints.iter().map(|e| (e.id, pod(e))).collect(),
            addresses: ruleset
                .endpoints
                .iter()
                .flat_map(|e| e.ips.iter().map(move |ip| (*ip, pod(e))))
                .collect(),
            names: ruleset
                .names
                .iter()
                .map(|n| (n.identity, n.pattern.clone()))
                .collect(),
            ruleset: Arc::new(ruleset.clone()),
        }
    }

    /// The names of a peer address from the (name id, expiry) slots its endpoint learned for it
    /// (see `fqdn::LearnedMaps::get`): the slots still live at `now_ns` when there are any, else
    /// the expired ones no sweep has cleared yet. A connection refused just after the TTL ran
    /// out is exactly the one whose name a user asks about, and the address was that name's
    /// when the pod last looked it up; a live name is the better answer when there is one.
    /// Ids the rule set in force no longer names (the policy went away) are left out. Sorted,
    /// without repeats, at most [`bulkhead_ruleset::flow::MAX_PEER_NAMES`].
    pub fn peer_names(&self, slots: &[(u32, u64)], now_ns: u64) -> Vec<NamePattern> {
        let live = slots.iter().any(|&(_, expires)| expires > now_ns);
        let mut out: Vec<NamePattern> = slots
            .iter()
            .filter(|&&(_, expires)| !live || expires > now_ns)
            .filter_map(|(id, _)| self.names.get(id).cloned())
            .collect();
        out.sort();
        out.dedup();
        out.truncate(bulkhead_ruleset::flow::MAX_PEER_NAMES);
        out
    }

    /// The endpoint of an id: its pod, or the id when the rule set does not have it.
    fn endpoint(&self, id: u32) -> EndpointRef {
        match self.endpoints.get(&id) {
            Some(p) => EndpointRef::Pod(p.clone()),
            None => EndpointRef::Unnamed(id),
        }
    }

    /// The staged view's outcome, when it differs from the enforced one (in verdict or rule).
    /// Revocations and events of programs that do not report it carry none.
    fn staged(&self, e: &FlowEvent, verdict: FlowVerdict) -> Option<StagedOutcome> {
        let staged = match e.audit_verdict {
            VERDICT_ALLOW => FlowVerdict::Allowed,
            VERDICT_DENY => FlowVerdict::Denied,
            _ => return None,
        };
        if e.kind == EVENT_REVOKED {
            return None;
        }
        let enforced = match verdict {
            FlowVerdict::AuditWouldDeny => FlowVerdict::Allowed,
            v => v,
        };
        if staged == enforced && e.audit_rule_id == e.rule_id {
            return None;
        }
        Some(StagedOutcome {
            verdict: staged,
            rule: self.ruleset.flow_rule(e.audit_rule_id),
            rule_id: e.audit_rule_id,
        })
    }

    /// The record of an event, without names for its peer.
    pub fn record(&self, e: &FlowEvent) -> FlowRecord {
        self.record_learned(e, &[], 0)
    }

    /// The record of an event whose endpoint learned the (name id, expiry) `slots` for the
    /// peer's address (the programs' clock reads `now_ns`): see [`FlowContext::peer_names`].
    pub fn record_learned(&self, e: &FlowEvent, slots: &[(u32, u64)], now_ns: u64) -> FlowRecord {
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
        let rule = self.ruleset.flow_rule(rule_id);
        let staged = self.staged(e, verdict);
        let observed_at = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        FlowRecord {
            kernel_time_ns: e.timestamp_ns,
            node: self.node.clone(),
            flow: bulkhead_ruleset::FlowRecord {
                time_unix_nanos: observed_at,
                endpoint: self.endpoint(e.endpoint_id),
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
                peer_names: self.peer_names(slots, now_ns),
                reason: FlowReason::from_code(e.reason as u32),
                packets: 1,
                bytes: e.bytes as u64,
                staged,
            },
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

/// The record of an event, its peer named by what its endpoint learned from DNS (when the peer
/// may have been learned, and `learned` can tell).
pub fn record_named(ctx: &FlowContext, learned: Option<&LearnedMaps>, e: &FlowEvent) -> FlowRecord {
    let Some(learned) = learned.filter(|_| may_have_names(e.peer_identity)) else {
        return ctx.record(e);
    };
    let peer = if e.direction == DIR_INGRESS {
        addr(e.family, e.saddr)
    } else {
        addr(e.family, e.daddr)
    };
    match learned.get(e.endpoint_id, peer) {
        Ok(slots) if !slots.is_empty() => ctx.record_learned(e, &slots, monotonic_now_ns()),
        Ok(_) => ctx.record(e),
        Err(error) => {
            tracing::debug!(%error, "cannot read the learned names of a flow's peer");
            ctx.record(e)
        }
    }
}

/// Reads flow events until the ring buffer closes, handing each record to `sink`.
/// `context` is re-read for every batch so records follow rule-set changes; `learned` (the
/// pinned learned-address maps) names world peers by the DNS names their endpoint learned.
pub async fn read_events(
    ring: RingBuf<MapData>,
    context: Arc<RwLock<FlowContext>>,
    learned: Option<LearnedMaps>,
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
                Some(ev) => sink(record_named(&ctx, learned.as_ref(), &ev)),
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
            .filter(|r| now.duration_since(r.observed_at()).unwrap_or_default() <= max_age)
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
    /// The endpoint that tracks it.
    pub endpoint: EndpointRef,
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
    pub peer: Option<PodKey>,
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
        endpoint: ctx.endpoint(k.endpoint_id as u32),
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

#[cfg(test)]
mod tests {
    use bulkhead_common::{EVENT_AUDIT, EVENT_DENIED, FAMILY_V4, VERDICT_DENY, reason};
    use bulkhead_ruleset::{Endpoint, RuleKind, RuleRef};

    use super::*;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[10] = 0xff;
        b[11] = 0xff;
        b[12..].copy_from_slice(&a);
        b
    }

    fn ruleset() -> RuleSet {
        let ep = |id, pod: &str, ip: [u8; 4]| Endpoint {
            id,
            namespace: if id == 1 { "shop" } else { "tools" }.into(),
            pod: pod.into(),
            workload: None,
            identity: 300 + id,
            ips: vec![IpAddr::from(ip)],
            interface: None,
            quarantined: false,
            policy: 300 + id,
        };
        RuleSet {
            node: "n1".into(),
            endpoints: vec![ep(1, "api-0", [10, 0, 0, 2]), ep(2, "debug", [10, 0, 0, 1])],
            rules: [(
                5,
                RuleRef {
                    kind: RuleKind::NetworkPolicy,
                    namespace: "shop".into(),
                    name: "api".into(),
                    direction: Direction::Ingress,
                    index: None,
                },
            )]
            .into(),
            ..Default::default()
        }
    }

    fn event() -> FlowEvent {
        FlowEvent {
            timestamp_ns: 7,
            saddr: v4([10, 0, 0, 1]),
            daddr: v4([10, 0, 0, 2]),
            sport_be: 40000u16.to_be(),
            dport_be: 80u16.to_be(),
            protocol: 6,
            family: FAMILY_V4,
            direction: DIR_INGRESS,
            kind: EVENT_DENIED,
            verdict: VERDICT_DENY,
            reason: reason::DENIED_POLICY as u8,
            endpoint_id: 1,
            local_identity: 301,
            peer_identity: 302,
            rule_id: 5,
            audit_rule_id: 0,
            bytes: 60,
            ..Default::default()
        }
    }

    /// `/flows` serves the JSON it served when records held strings, byte for byte.
    #[test]
    fn a_record_serialises_as_before() {
        let ctx = FlowContext::new(&ruleset());
        let r = ctx.record(&event());
        let observed = serde_json::to_string(&r.observed_at()).expect("json");
        assert_eq!(
            serde_json::to_string(&r).expect("json"),
            format!(
                "{{\"kernel_time_ns\":7,\"observed_at\":{observed},\"node\":\"n1\",\
                 \"endpoint\":\"shop/api-0\",\"direction\":\"ingress\",\"src\":\"10.0.0.1\",\
                 \"dst\":\"10.0.0.2\",\"src_port\":40000,\"dst_port\":80,\"protocol\":6,\
                 \"kind\":\"denied\",\"verdict\":\"denied\",\
                 \"rule\":\"NetworkPolicy shop/api ingress default-deny\",\"rule_id\":5,\
                 \"local_identity\":301,\"peer_identity\":302,\"peer\":\"tools/debug\",\
                 \"reason\":\"denied_policy\",\"bytes\":60}}"
            )
        );
        // What goes to the controller: the same, typed, as one packet.
        let c = r.to_contract();
        assert_eq!(
            c.endpoint,
            EndpointRef::Pod("shop/api-0".parse().expect("pod"))
        );
        assert_eq!(c.peer, Some("tools/debug".parse().expect("pod")));
        assert_eq!(
            (c.kind, c.verdict, c.reason, c.packets, c.bytes),
            (
                FlowKind::Denied,
                FlowVerdict::Denied,
                FlowReason::DeniedPolicy,
                1,
                60
            )
        );
        assert_eq!(
            c.rule.to_string(),
            "NetworkPolicy shop/api ingress default-deny"
        );
    }

    /// What the agent cannot name keeps the texts it had: `endpoint#ID`, a `null` peer, the
    /// reserved rules' descriptions, `unknown` reasons.
    #[test]
    fn what_the_rule_set_does_not_name_reads_as_before() {
        let ctx = FlowContext::new(&ruleset());
        let mut e = event();
        e.endpoint_id = 9;
        e.saddr = v4([192, 0, 2, 7]);
        e.reason = 200;
        e.rule_id = bulkhead_common::RULE_UNRELATED_ICMP_ERROR;
        let v = serde_json::to_value(ctx.record(&e)).expect("json");
        assert_eq!(v["endpoint"], "endpoint#9");
        assert_eq!(v["peer"], serde_json::Value::Null);
        assert_eq!(v["reason"], "unknown");
        assert_eq!(v["rule"], "ICMP error unrelated to any tracked connection");
        for (id, text) in [
            (
                bulkhead_common::RULE_DEFAULT_ALLOW,
                "default allow (no policy applies)",
            ),
            (
                bulkhead_common::RULE_MISSING_POLICY,
                "policy group missing from the rule set: endpoint locked down",
            ),
            (77, "rule #77"),
        ] {
            e.rule_id = id;
            assert_eq!(ctx.record(&e).flow.rule.to_string(), text);
        }
        // An audit record names the rule that would have denied it.
        let mut e = event();
        e.kind = EVENT_AUDIT;
        e.verdict = VERDICT_ALLOW;
        e.rule_id = 0;
        e.audit_rule_id = 5;
        let r = ctx.record(&e);
        assert_eq!(
            (r.flow.kind, r.flow.verdict, r.flow.rule_id),
            (FlowKind::Audit, FlowVerdict::AuditWouldDeny, 5)
        );
        let v = serde_json::to_value(&r).expect("json");
        assert_eq!(
            (v["kind"].as_str(), v["verdict"].as_str()),
            (Some("audit"), Some("audit-would-deny"))
        );
    }

    fn pattern(text: &str) -> NamePattern {
        text.parse().expect("a valid pattern")
    }

    /// An egress event to a world address the endpoint learned from DNS: the record names the
    /// peer by the rule set's patterns of the learned name ids, denied attempts included.
    #[test]
    fn a_world_peer_is_named_by_what_its_endpoint_learned() {
        use bulkhead_common::DIR_EGRESS;
        use bulkhead_ruleset::NameEntry;
        let api = NameEntry::of(pattern("api.example.com"));
        let wild = NameEntry::of(pattern("*.example.com"));
        let gone = NameEntry::of(pattern("old.example.org"));
        let mut rs = ruleset();
        rs.names = vec![api.clone(), wild.clone()];
        let ctx = FlowContext::new(&rs);
        let mut e = event();
        e.direction = DIR_EGRESS;
        e.saddr = v4([10, 0, 0, 2]);
        e.daddr = v4([203, 0, 113, 7]);
        e.peer_identity = identity::WORLD;
        assert!(may_have_names(e.peer_identity));
        let now = 1_000;
        // Live slots of both patterns (out of order), and one the rule set no longer names.
        let slots = [
            (wild.identity, now + 5),
            (gone.identity, now + 9),
            (api.identity, now + 1),
        ];
        let r = ctx.record_learned(&e, &slots, now);
        assert_eq!(r.flow.verdict, FlowVerdict::Denied, "a denied attempt");
        assert_eq!(r.flow.peer, None);
        assert_eq!(
            r.flow.peer_names,
            vec![pattern("api.example.com"), pattern("*.example.com")]
        );
        // The contract's record carries them, and so does `/flows`, as their texts.
        assert_eq!(r.to_contract().peer_names, r.flow.peer_names);
        let v = serde_json::to_value(&r).expect("json");
        assert_eq!(
            v["peer_names"],
            serde_json::json!(["api.example.com", "*.example.com"])
        );
        // Nothing learned: no names, and `/flows` has no such field.
        let plain = ctx.record_learned(&e, &[], now);
        assert!(plain.flow.peer_names.is_empty());
        assert!(
            serde_json::to_value(&plain)
                .expect("json")
                .get("peer_names")
                .is_none()
        );
    }

    /// Live names win; when every slot has expired (the sweep has not cleared them yet) the
    /// record still names what the address was learned for.
    #[test]
    fn expired_slots_name_the_peer_only_when_none_is_live() {
        use bulkhead_ruleset::NameEntry;
        let api = NameEntry::of(pattern("api.example.com"));
        let cdn = NameEntry::of(pattern("*.cdn.example.net"));
        let mut rs = ruleset();
        rs.names = vec![api.clone(), cdn.clone()];
        let ctx = FlowContext::new(&rs);
        let now = 50;
        assert_eq!(
            ctx.peer_names(&[(api.identity, now - 1), (cdn.identity, now + 1)], now),
            vec![pattern("*.cdn.example.net")],
            "the expired one is left out beside a live one"
        );
        assert_eq!(
            ctx.peer_names(&[(api.identity, now), (cdn.identity, now - 10)], now),
            vec![pattern("api.example.com"), pattern("*.cdn.example.net")],
            "an expiry at `now` has expired, as the programs count it"
        );
        assert!(ctx.peer_names(&[], now).is_empty());
    }

    /// Pods and the host are never looked up; the world, CIDRs, names and unknown peers are.
    #[test]
    fn only_peers_outside_the_cluster_may_have_names() {
        for id in [
            identity::HOST,
            256,
            300,
            identity::FIRST_CIDR_IDENTITY - 1,
            identity::FIRST_REMOTE_IDENTITY + 7,
        ] {
            assert!(!may_have_names(id), "{id}");
        }
        for id in [
            identity::UNKNOWN,
            identity::WORLD,
            identity::FIRST_CIDR_IDENTITY,
            identity::FIRST_NAME_IDENTITY + 3,
        ] {
            assert!(may_have_names(id), "{id}");
        }
    }

    /// Each record carries the staged view's verdict and rule where they differ from what was
    /// enforced, and nothing where they agree (or the program did not say).
    #[test]
    fn a_record_carries_the_staged_outcome_where_it_differs() {
        let mut rs = ruleset();
        rs.rules.insert(
            6,
            RuleRef {
                kind: RuleKind::StagedNetworkPolicy,
                namespace: "shop".into(),
                name: "api".into(),
                direction: Direction::Ingress,
                index: Some(0),
            },
        );
        let ctx = FlowContext::new(&rs);
        // Denied now; the staged edit of shop/api would admit it.
        let mut e = event();
        e.audit_verdict = VERDICT_ALLOW;
        e.audit_rule_id = 6;
        let r = ctx.record(&e).flow;
        let staged = r.staged.clone().expect("differs");
        assert_eq!((staged.verdict, staged.rule_id), (FlowVerdict::Allowed, 6));
        assert_eq!(
            staged.rule.to_string(),
            "StagedNetworkPolicy shop/api ingress[0]"
        );
        assert_eq!(r.staged_verdict(), FlowVerdict::Allowed);
        // The same verdict by the same rule: nothing to say.
        e.audit_verdict = VERDICT_DENY;
        e.audit_rule_id = 5;
        assert_eq!(ctx.record(&e).flow.staged, None);
        // A program that does not report the staged verdict: nothing either.
        e.audit_verdict = 0;
        e.audit_rule_id = 6;
        assert_eq!(ctx.record(&e).flow.staged, None);
        // Allowed, would be denied: the audit record, with the staged outcome too.
        let mut e = event();
        e.kind = EVENT_AUDIT;
        e.verdict = VERDICT_ALLOW;
        e.rule_id = 0;
        e.audit_verdict = VERDICT_DENY;
        e.audit_rule_id = 6;
        let r = ctx.record(&e).flow;
        assert_eq!(r.verdict, FlowVerdict::AuditWouldDeny);
        assert_eq!(
            r.staged.map(|s| (s.verdict, s.rule_id)),
            Some((FlowVerdict::Denied, 6))
        );
    }
}
