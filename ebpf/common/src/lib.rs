//! The ABI between Bulkhead's eBPF programs and its agent: map keys, values and constants.
//!
//! Every type is `#[repr(C)]`, `Copy` and has no implicit padding, so the kernel and user space
//! agree byte for byte. Multi-byte fields are host byte order unless their name ends in `_be`.
#![cfg_attr(not(test), no_std)]

pub mod fqdn;

/// Policy direction, from the endpoint's point of view.
pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// Verdicts stored in maps and reported in events.
pub const VERDICT_ALLOW: u8 = 1;
pub const VERDICT_DENY: u8 = 2;

/// Protocol number used in policy keys for protocols Bulkhead has no entry kind for.
/// Only protocol-wildcard entries are expanded to it.
pub const PROTO_OTHER: u8 = 255;

/// Bits of a [`PolicyKey`] that must always match: policy id, identity, direction, protocol.
pub const POLICY_KEY_FIXED_BITS: u32 = 80;

/// Reserved security identities, the same in the programs and the rule-set contract.
/// Allocated identities start at [`identity::FIRST_ALLOCATED_IDENTITY`]; CIDR identities at
/// [`identity::FIRST_CIDR_IDENTITY`].
pub mod identity {
    /// No identity is known for the address. Matches only wildcard entries.
    pub const UNKNOWN: u32 = 0;
    /// The node itself (host network namespace).
    pub const HOST: u32 = 1;
    /// Anything outside the cluster that no CIDR identity covers.
    pub const WORLD: u32 = 2;
    pub const FIRST_ALLOCATED_IDENTITY: u32 = 256;
    pub const FIRST_CIDR_IDENTITY: u32 = 1 << 24;
    /// Node identities (the addresses of a Node, carrying its labels: ClusterNetworkPolicy
    /// `nodes` peers) lie in `FIRST_NODE_IDENTITY .. FIRST_NODE_IDENTITY + NODE_IDENTITY_COUNT`,
    /// just above the 2^23 CIDR identities. To the programs they are ordinary identities: the
    /// ipcache gives them to node addresses like it gives pod identities to pod addresses.
    pub const FIRST_NODE_IDENTITY: u32 = FIRST_CIDR_IDENTITY + (1 << 23);
    /// How many node identities there are (2^16).
    pub const NODE_IDENTITY_COUNT: u32 = 1 << 16;
    /// Name identities (egress peers by DNS name, ClusterNetworkPolicy `domainNames` and
    /// ServicePolicy `fqdn`) lie in `FIRST_NAME_IDENTITY .. FIRST_NAME_IDENTITY +
    /// NAME_IDENTITY_COUNT`. No address has one in the ipcache: the data plane attributes them
    /// to the addresses a pod learned from DNS answers for a matching name, and to the programs
    /// they are opaque numbers, matched in policy keys like any peer identity. The rule set
    /// lists each one's name pattern (`RuleSet::names`).
    pub const FIRST_NAME_IDENTITY: u32 = 0x2000_0000;
    /// How many name identities there are (2^28).
    pub const NAME_IDENTITY_COUNT: u32 = 1 << 28;
    /// Whether `id` is a name identity.
    pub const fn is_name(id: u32) -> bool {
        id >= FIRST_NAME_IDENTITY && id - FIRST_NAME_IDENTITY < NAME_IDENTITY_COUNT
    }
    /// Whether an address of identity `id` is one whose learned names take part in an egress
    /// decision: `world` or a CIDR identity (an address outside the cluster). Pods, nodes, the
    /// host and unknown addresses are decided by their own identity alone, whatever a pod
    /// learned about them from DNS (names are for destinations outside the cluster, as
    /// NPEP-133 says; a DNS answer must not widen what a pod may reach inside it).
    pub const fn names_apply_to(id: u32) -> bool {
        id == WORLD || (id >= FIRST_CIDR_IDENTITY && id < FIRST_NODE_IDENTITY)
    }
    /// Identities of a peer cluster's pods (imported by peering) lie in
    /// `FIRST_REMOTE_IDENTITY .. FIRST_REMOTE_IDENTITY + REMOTE_IDENTITY_COUNT`, apart from the
    /// local pods' range, so that no import can ever take or move a local pod's number. To the
    /// programs they are ordinary identities.
    pub const FIRST_REMOTE_IDENTITY: u32 = 0x4000_0000;
    /// How many remote identities there are (2^28).
    pub const REMOTE_IDENTITY_COUNT: u32 = 1 << 28;
    /// Whether `id` is a peer cluster's pod identity.
    pub const fn is_remote(id: u32) -> bool {
        id >= FIRST_REMOTE_IDENTITY && id - FIRST_REMOTE_IDENTITY < REMOTE_IDENTITY_COUNT
    }
    /// Wildcard peer of a policy entry (and of a policy map key): every peer identity.
    pub const ANY: u32 = u32::MAX;
}

/// Rule id of the built-in "no policy applies: allowed" default.
pub const RULE_DEFAULT_ALLOW: u32 = 0;
/// Rule id reported for ICMP errors that relate to no tracked connection (dropped).
pub const RULE_UNRELATED_ICMP_ERROR: u32 = 0xffff_fff0;
/// Rule id blamed when an endpoint names a policy group its rule set does not have: such an
/// endpoint is denied everything (fail closed). Rule ids the controller allocates stay below
/// [`RULE_UNRELATED_ICMP_ERROR`].
pub const RULE_MISSING_POLICY: u32 = 0xffff_fff1;

/// Reasons a packet was handled the way it was; index into the per-endpoint counters.
pub mod reason {
    /// Allowed by policy on a new connection.
    pub const ALLOWED_NEW: u32 = 0;
    /// Allowed as part of a tracked connection (forward or reply).
    pub const ALLOWED_TRACKED: u32 = 1;
    /// Allowed, but an audit-mode policy would have dropped it.
    pub const AUDIT_WOULD_DENY: u32 = 2;
    /// Denied by policy (explicit deny or default deny).
    pub const DENIED_POLICY: u32 = 3;
    /// Packet too short or inconsistent to parse.
    pub const DROP_MALFORMED: u32 = 4;
    /// Source address is not one of the endpoint's addresses.
    pub const DROP_SPOOFED: u32 = 5;
    /// Endpoint is quarantined.
    pub const DROP_QUARANTINE: u32 = 6;
    /// Endpoint is locked down (its policy did not fit in the maps).
    pub const DROP_LOCKDOWN: u32 = 7;
    /// A tracked connection that policy no longer allows.
    pub const DROP_REVOKED: u32 = 8;
    /// Too many IPv6 extension headers to walk.
    pub const DROP_UNPARSEABLE: u32 = 9;
    /// Non-IP traffic (ARP, …) passed without policy.
    pub const PASSED_NON_IP: u32 = 10;
    /// Dropped by the XDP prefilter.
    pub const DROP_PREFILTER: u32 = 11;
    /// A TCP segment without SYN of no tracked connection, admitted by policy but not tracked:
    /// only a SYN opens a TCP connection (connections older than the endpoint's enforcement,
    /// or whose entry was evicted, keep working as far as the policy of each direction admits).
    pub const ALLOWED_UNTRACKED: u32 = 12;
    pub const COUNT: u32 = 13;

    pub const NAMES: [&str; COUNT as usize] = [
        "allowed_new",
        "allowed_tracked",
        "audit_would_deny",
        "denied_policy",
        "drop_malformed",
        "drop_spoofed",
        "drop_quarantine",
        "drop_lockdown",
        "drop_revoked",
        "drop_unparseable",
        "passed_non_ip",
        "drop_prefilter",
        "allowed_untracked",
    ];
}

/// Interface indexes below this find their endpoint in the `ENDPOINT_SLOTS` array (a bounds
/// check and an offset, no hashing); higher ones, on nodes whose interface counter has run
/// past it, in the `ENDPOINTS` hash.
pub const ENDPOINT_SLOTS: u32 = 1 << 16;

/// Highest number of endpoints one node enforces (endpoint ids are below it).
pub const MAX_ENDPOINTS: u32 = 4096;
/// Counter slots: one row of [`reason::COUNT`] per endpoint, plus row `MAX_ENDPOINTS` for
/// traffic that belongs to no endpoint (XDP prefilter).
pub const COUNTER_SLOTS: u32 = (MAX_ENDPOINTS + 1) * reason::COUNT;

/// Endpoint flags.
pub mod endpoint_flags {
    /// Enforce policy on traffic entering the endpoint.
    pub const ENFORCE_INGRESS: u32 = 1 << 0;
    /// Enforce policy on traffic leaving the endpoint.
    pub const ENFORCE_EGRESS: u32 = 1 << 1;
    /// Quarantined: everything but the quarantine exceptions is dropped.
    pub const QUARANTINED: u32 = 1 << 2;
    /// Locked down: the policy did not fit; drop everything.
    pub const LOCKDOWN: u32 = 1 << 3;
    /// Check that packets leaving the endpoint carry one of its addresses.
    pub const ANTI_SPOOF: u32 = 1 << 4;
    /// `EndpointInfo::addrs` holds the endpoint's addresses (its only two, or its first two
    /// with [`MORE_ADDRS`]).
    pub const INLINE_ADDRS: u32 = 1 << 5;
    /// The endpoint has more addresses than `EndpointInfo::addrs` holds: anti-spoofing looks
    /// the others up in `ENDPOINT_ADDRS`.
    pub const MORE_ADDRS: u32 = 1 << 6;
    /// The endpoint's egress policy has entries of name identities: the rank maps hold its
    /// keys, and a new egress connection to a `world` or CIDR address looks the address up in
    /// what the endpoint learned from DNS. Without it (every other endpoint) that costs one
    /// bit test.
    pub const HAS_NAMES: u32 = 1 << 7;
}

/// Per-direction default decision, applied when no policy key matches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    pub rule_id: u32,
    pub audit_rule_id: u32,
    pub verdict: u8,
    pub audit_verdict: u8,
    pub _pad: [u8; 2],
}

/// Value of the `ENDPOINT_SLOTS` array and the `ENDPOINTS` map, keyed by the host-side
/// interface index.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    pub endpoint_id: u32,
    pub identity: u32,
    /// Id of the current policy generation of this endpoint in the policy maps: the agent
    /// writes new keys under a fresh id, then switches this field, then deletes the old keys.
    pub policy_id: u32,
    pub flags: u32,
    pub default_ingress: PolicyValue,
    pub default_egress: PolicyValue,
    /// The endpoint's first two addresses (IPv6 or IPv4-mapped; a single address is repeated),
    /// so that anti-spoofing needs no map lookup: 8-aligned, compared as u64 words.
    pub addrs: [[u8; 16]; 2],
}

/// Key of the policy maps. In `POLICY_SUMMARY` the port is 0; in `POLICY_EXACT` it is the
/// packet's destination port; in the `POLICY` LPM trie (port ranges only) the prefix covers the
/// fixed fields ([`POLICY_KEY_FIXED_BITS`]) plus a prefix of the big-endian port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub policy_id: u32,
    pub identity: u32,
    pub direction: u8,
    pub protocol: u8,
    pub port_be: u16,
}

/// Value of `POLICY_SUMMARY`, keyed by (policy id, peer identity, direction, protocol, port 0):
/// what the packet gets when no finer key matches, and which finer maps hold keys at all, so a
/// new connection costs one hash lookup plus, only where such keys exist, one more.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicySummary {
    /// The decision for ports no exact or range key covers (the protocol-wide entries, else
    /// the direction's default).
    pub fallback: PolicyValue,
    pub flags: u32,
    /// A Bloom filter of the ports that have `POLICY_EXACT` keys ([`port_bloom`] of each): a
    /// port whose bits are not all set has no exact key, and its lookup is skipped (a refused
    /// port, a port scan, costs one hash lookup less).
    pub exact_ports: u64,
}

/// The two bits of [`PolicySummary::exact_ports`] that stand for a (big-endian) port.
#[inline(always)]
pub fn port_bloom(port_be: u16) -> u64 {
    let h = (port_be as u32).wrapping_mul(0x9e37_79b1);
    (1u64 << (h >> 26)) | (1u64 << ((h >> 20) & 63))
}

/// `PolicySummary::flags`: `POLICY_EXACT` has single-port keys for this (identity, protocol).
pub const SUMMARY_HAS_EXACT: u32 = 1 << 0;
/// `PolicySummary::flags`: the `POLICY` trie has port-range keys for this (identity, protocol).
pub const SUMMARY_HAS_RANGES: u32 = 1 << 1;

/// Precedence ranks, for decisions over several peer identities at once (an address learned
/// under DNS names: its own identity and each name identity; see
/// `bulkhead_ruleset::precedence`). A rank packs an entry's place within its tier so that
/// integer order is precedence order: priority (bits 34-49), action (bits 32-33, the
/// `RANK_ACTION_*` codes), rule id (bits 0-31); the lower, the stronger. The best entries of a
/// union of entry sets are the per-tier minimum of the sets' bests, so the programs combine
/// the ranks of several keys with plain `min` and then walk the tiers as `resolve` does.
pub mod rank {
    /// No entry of the tier matches: above every real rank, so it loses every `min`.
    pub const NONE: u64 = u64::MAX;
    pub const ACTION_SHIFT: u32 = 32;
    pub const ACTION_DENY: u64 = 0;
    pub const ACTION_ALLOW: u64 = 1;
    pub const ACTION_PASS: u64 = 2;
    /// Tiers, in the order of [`super::PolicyRanks::enforced`] / `staged`: quarantine, admin,
    /// application (NetworkPolicy, ServicePolicy), baseline.
    pub const TIERS: usize = 4;
    /// The application tier's index: an isolated direction denies what it leaves undecided.
    pub const APPLICATION: usize = 2;
    /// The protocol of the `RANK_SUMMARY` key holding a policy's default ranks (no key of the
    /// peer nor of the wildcard for the packet's protocol): no policy key has protocol 0
    /// (unknown protocols are `PROTO_OTHER`).
    pub const DEFAULT_PROTOCOL: u8 = 0;
}

/// `PolicyRanks::flags`: the enforced view of the direction is isolated (`isolated_by` holds
/// the rule).
pub const RANKS_ISOLATED: u32 = 1 << 0;
/// `PolicyRanks::flags`: the staged view is isolated (`staged_isolated_by`).
pub const RANKS_STAGED_ISOLATED: u32 = 1 << 1;

/// What one policy key's matching entries resolve to, in a form that combines across peer
/// identities (`bulkhead_ruleset::Resolution`): the best rank per tier of each view
/// ([`rank::NONE`] where none), and the direction's isolation. Value of `RANK_EXACT` and
/// `RANK_RANGES`, which the agent writes beside `POLICY_EXACT` / `POLICY` only for policy
/// generations whose egress names DNS names, and only under the identities a learned address
/// can combine: name identities, `world`, CIDR identities and the wildcard.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyRanks {
    pub enforced: [u64; rank::TIERS],
    pub staged: [u64; rank::TIERS],
    pub isolated_by: u32,
    pub staged_isolated_by: u32,
    pub flags: u32,
    pub _pad: u32,
}

impl Default for PolicyRanks {
    fn default() -> Self {
        PolicyRanks {
            enforced: [rank::NONE; rank::TIERS],
            staged: [rank::NONE; rank::TIERS],
            isolated_by: 0,
            staged_isolated_by: 0,
            flags: 0,
            _pad: 0,
        }
    }
}

/// Value of `RANK_SUMMARY`, beside `POLICY_SUMMARY` under the same keys (plus one default key
/// per policy, protocol [`rank::DEFAULT_PROTOCOL`]): the protocol-wide ranks and which finer
/// rank keys exist, with the same flags and port filter as the policy summary, so that the
/// rank lookup finds exactly the key the verdict lookup finds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RankSummary {
    pub fallback: PolicyRanks,
    pub flags: u32,
    pub _pad: u32,
    pub exact_ports: u64,
}

/// Entries of the rank maps (hash maps allocated per entry: ceilings). Only endpoints whose
/// egress names DNS names have keys there, under a few identities each.
pub const RANK_SUMMARY_ENTRIES: u32 = 1 << 18;
pub const RANK_EXACT_ENTRIES: u32 = 1 << 19;
pub const RANK_RANGES_ENTRIES: u32 = 1 << 19;

/// Key of `PREFILTER_DENY`: a local endpoint address and a peer identity whose traffic to it
/// the endpoint's ingress policy denies on every protocol and port, so the XDP prefilter may
/// drop it on arrival. Addresses are IPv6 or IPv4-mapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PrefilterKey {
    pub addr: [u8; 16],
    pub identity: u32,
}

/// Value of `PREFILTER_DENY`: whom to count the drop against and which rule decided it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefilterValue {
    pub endpoint_id: u32,
    pub rule_id: u32,
    pub local_identity: u32,
    pub _pad: u32,
    /// Last time the prefilter reported a drop of this pair (rate limit for events).
    pub last_event_ns: u64,
}

/// The identity of an address: value of `IPCACHE_HOST_V4` / `IPCACHE_HOST_V6` (hash maps keyed
/// by single addresses, looked up first) and `IPCACHE_V4` / `IPCACHE_V6` (LPM tries keyed by
/// wider prefixes, consulted when the address has no entry of its own).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpCacheValue {
    pub identity: u32,
    pub flags: u32,
}

/// `IpCacheValue::flags`: the address belongs to a quarantined endpoint (XDP prefilter drops it).
pub const IPCACHE_QUARANTINED: u32 = 1 << 0;

/// Key of `QUARANTINE_ALLOW`: a quarantined address and a peer identity its quarantine's
/// exceptions admit (the XDP prefilter lets that pair through). Identity `u32::MAX` admits all.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QuarantineAllowKey {
    pub addr: [u8; 16],
    pub identity: u32,
}

/// Address family markers in keys and events.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Connection-tracking key, one per connection and endpoint (so both ends of a same-node
/// connection are tracked apart), the same for its forward packets and its replies: the tuple is
/// stored in a canonical order (see [`ct_swapped`]) and `direction` is the policy direction of a
/// packet in that order. Which side opened the connection is in the value
/// ([`CT_INITIATED_EGRESS`]), so one lookup tells a tracked forward packet from a reply.
///
/// 8-aligned so that the programs build and compare its addresses as u64 words.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
    pub endpoint_id: u16,
    pub protocol: u8,
    pub direction: u8,
}

/// [`CtKey`] of an IPv4 connection, in the `CONNTRACK_V4` map: 16 bytes instead of 40, so the
/// lookup every IPv4 packet of a tracked connection makes hashes and compares less than half.
/// Same canonical order and meaning; an address is its four bytes in network order, read as a
/// native u32 (`u32::from_ne_bytes(ip.octets())`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKeyV4 {
    pub saddr: u32,
    pub daddr: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub endpoint_id: u16,
    pub protocol: u8,
    pub direction: u8,
}

/// The IPv4-mapped prefix (`::ffff:0:0/96`).
const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

impl CtKeyV4 {
    /// The same key with IPv4-mapped addresses, as [`CtKey`] holds them.
    pub fn widen(&self) -> CtKey {
        let mapped = |a: u32| {
            let mut out = [0u8; 16];
            out[..12].copy_from_slice(&V4_MAPPED_PREFIX);
            out[12..].copy_from_slice(&a.to_ne_bytes());
            out
        };
        CtKey {
            saddr: mapped(self.saddr),
            daddr: mapped(self.daddr),
            sport_be: self.sport_be,
            dport_be: self.dport_be,
            endpoint_id: self.endpoint_id,
            protocol: self.protocol,
            direction: self.direction,
        }
    }

    /// The IPv4 key of a [`CtKey`] whose addresses are both IPv4-mapped.
    pub fn narrow(k: &CtKey) -> Option<CtKeyV4> {
        let v4 = |a: &[u8; 16]| {
            (a[..12] == V4_MAPPED_PREFIX).then(|| u32::from_ne_bytes([a[12], a[13], a[14], a[15]]))
        };
        Some(CtKeyV4 {
            saddr: v4(&k.saddr)?,
            daddr: v4(&k.daddr)?,
            sport_be: k.sport_be,
            dport_be: k.dport_be,
            endpoint_id: k.endpoint_id,
            protocol: k.protocol,
            direction: k.direction,
        })
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub packets_fwd: u64,
    pub bytes_fwd: u64,
    pub packets_rev: u64,
    pub bytes_rev: u64,
    /// Policy generation that last admitted this connection.
    pub generation: u32,
    pub rule_id: u32,
    pub peer_identity: u32,
    pub flags: u32,
    /// The name identities (learned from DNS, live at admission) the connection was admitted
    /// with, [`fqdn::FQDN_NAME_ID_NONE`] in unused slots. A re-check after a policy change
    /// decides with them again whether or not their TTL has run out since: expiry stops new
    /// connections, never established ones; a policy that no longer admits the names still
    /// revokes.
    pub names: [u32; fqdn::FQDN_MAX_IDS],
}

/// `CtValue::flags`: admitted by an entry that audit-mode policy would deny.
pub const CT_AUDIT: u32 = 1 << 0;
/// `CtValue::flags`: the endpoint opened the connection (its first packet was egress).
pub const CT_INITIATED_EGRESS: u32 = 1 << 1;
/// `CtValue::flags`: keyed canonically. Entries without it (written by an agent before
/// canonical keys) are dropped on sight and their packets judged anew.
pub const CT_CANONICAL: u32 = 1 << 2;
/// `CtValue::flags`: revoked by a policy change (a tombstone). Every packet of the connection,
/// from either side, is dropped while the entry lives: neither side's next packet may open it
/// again in the other direction. A new TCP SYN the policy admits replaces it; for connectionless
/// protocols the side that opened the flow re-opens it once a later policy admits it again.
pub const CT_REVOKED: u32 = 1 << 3;

/// Whether a tuple is stored reversed in its conntrack key: a total order that is cheap in the
/// common case (ports differ) and the same from either end of a connection.
#[inline(always)]
pub fn ct_swapped(saddr: &[u8; 16], daddr: &[u8; 16], sport_be: u16, dport_be: u16) -> bool {
    if sport_be != dport_be {
        return sport_be > dport_be;
    }
    let mut i = 0;
    while i < 16 {
        if saddr[i] != daddr[i] {
            return saddr[i] > daddr[i];
        }
        i += 1;
    }
    false
}

/// Global configuration (array map, index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Bumped by the agent on every policy change; tracked connections admitted under an older
    /// generation are re-checked on their next packet, from either side, against the policy of
    /// the direction that opened them.
    pub generation: u32,
    /// Minimum gap between two deny events of one flow, in nanoseconds.
    pub deny_event_interval_ns: u32,
    /// The programs' per-packet clock (conntrack last-seen, deny-event rate limit) is
    /// `jiffies * jiffy_ns + clock_offset_ns`: the monotonic clock at the last tick, read
    /// without a helper call (the verifier inlines `bpf_jiffies64`). The agent measures both
    /// at load ([`clock_from_samples`]); while `jiffy_ns` is 0 the programs call
    /// `bpf_ktime_get_coarse_ns` instead, which reads the same clock at the same resolution.
    pub jiffy_ns: u32,
    /// First address (host byte order) of the IPv4 window whose single addresses live in the
    /// `IPCACHE_DENSE_V4` array, slot = address − base.
    pub dense_v4_base: u32,
    pub clock_offset_ns: u64,
    /// Slots of the window in use: [`DENSE_V4_SLOTS`], or 0 while no window is in use (then
    /// every single address is in `IPCACHE_HOST_V4`).
    pub dense_v4_slots: u32,
    pub _pad: u32,
}

/// Slots of `IPCACHE_DENSE_V4`: a /14 of IPv4 addresses (2 MiB of 8-byte values). Pod
/// addresses come from the cluster's pod CIDR, so most of a node's peers fall in one window;
/// their identity is then an array read the verifier inlines instead of a hash lookup.
pub const DENSE_V4_SLOTS: u32 = 1 << 18;

/// `IPCACHE_DENSE_V4` slot flag: the slot holds an entry (the others read as "no entry of its
/// own": the LPM trie is consulted, as for an address missing from the hash).
pub const IPCACHE_DENSE_PRESENT: u32 = 1 << 31;

/// Tick lengths of the kernel's possible `CONFIG_HZ` values (100, 250, 300, 1000), as the
/// kernel rounds them (`TICK_NSEC`).
pub const TICK_NSEC_CANDIDATES: [u32; 4] = [10_000_000, 4_000_000, 3_333_333, 1_000_000];

/// The jiffies clock ([`Config::jiffy_ns`], [`Config::clock_offset_ns`]) from two samples of
/// (jiffies, monotonic ns) each taken just after jiffies changed: the tick length is the
/// nearest kernel tick length to their ratio, and the offset makes the later sample's tick map
/// to its time. None when the samples make no sense (no tick between them, or a ratio no
/// kernel tick length is within 5% of).
pub fn clock_from_samples(a: (u64, u64), b: (u64, u64)) -> Option<(u32, u64)> {
    let (ja, ta) = a;
    let (jb, tb) = b;
    if jb <= ja || tb <= ta {
        return None;
    }
    let measured = (tb - ta) / (jb - ja);
    let mut tick = TICK_NSEC_CANDIDATES[0];
    for t in TICK_NSEC_CANDIDATES {
        if (t as u64).abs_diff(measured) < (tick as u64).abs_diff(measured) {
            tick = t;
        }
    }
    if (tick as u64).abs_diff(measured) > tick as u64 / 20 {
        return None;
    }
    Some((tick, tb.wrapping_sub(jb.wrapping_mul(tick as u64))))
}

/// Event kinds on the `EVENTS` ring buffer.
pub const EVENT_NEW_FLOW: u8 = 1;
pub const EVENT_DENIED: u8 = 2;
pub const EVENT_REVOKED: u8 = 3;
pub const EVENT_AUDIT: u8 = 4;

/// Record written to the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub timestamp_ns: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
    pub protocol: u8,
    pub family: u8,
    pub direction: u8,
    pub kind: u8,
    pub verdict: u8,
    pub reason: u8,
    /// The staged view's verdict ([`VERDICT_ALLOW`] / [`VERDICT_DENY`]; 0 from programs that
    /// predate it), decided by `audit_rule_id`.
    pub audit_verdict: u8,
    pub _pad: u8,
    pub endpoint_id: u32,
    pub ifindex: u32,
    pub local_identity: u32,
    pub peer_identity: u32,
    pub rule_id: u32,
    pub audit_rule_id: u32,
    pub bytes: u32,
}

/// Slots per CPU of the deny-event rate limiter (a power of two).
pub const DENY_RECENT_SLOTS: u32 = 1 << 12;

/// A slot of the deny-event rate limiter: a per-CPU, direct-mapped table indexed by a hash of
/// the flow, holding the flow's fingerprint (its ports and the low 32 bits of each address, the
/// endpoint, protocol and direction) and when it last produced an event. A flow whose slot holds
/// its fingerprint within the interval is suppressed; any other takes the slot. Unlike a shared
/// LRU hash, a flood of distinct denied flows costs no locks and no allocation, and it cannot
/// evict anything but other deny-event slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenyRecent {
    pub saddr_lo: u32,
    pub daddr_lo: u32,
    pub ports: u32,
    pub endpoint_id: u16,
    pub protocol: u8,
    pub direction: u8,
    pub last_event_ns: u64,
    pub suppressed: u64,
}

/// Key of `ENDPOINT_ADDRS`: the addresses an endpoint may send from (anti-spoofing).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointAddrKey {
    pub endpoint_id: u32,
    pub addr: [u8; 16],
}

/// Per-CPU packet and byte counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Per-node statistics that are not per endpoint (per-CPU array indices).
pub mod stat {
    /// Ring buffer was full: an event was lost.
    pub const EVENTS_LOST: u32 = 0;
    /// Deny events suppressed by the per-flow rate limit.
    pub const EVENTS_RATE_LIMITED: u32 = 1;
    /// Conntrack insert failed.
    pub const CT_INSERT_FAILED: u32 = 2;
    /// Lookups of a new egress connection's destination among what its endpoint learned from
    /// DNS (made only for endpoints whose policy names DNS names, see
    /// `endpoint_flags::HAS_NAMES`).
    pub const NAME_LOOKUPS: u32 = 3;
    /// New connections (and re-checks) decided with learned names.
    pub const NAME_DECISIONS: u32 = 4;
    pub const COUNT: u32 = 5;
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], Copy, and have no padding or invalid bit patterns.
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for IpCacheValue {}
    unsafe impl aya::Pod for PolicySummary {}
    unsafe impl aya::Pod for PrefilterKey {}
    unsafe impl aya::Pod for PrefilterValue {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtKeyV4 {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for DenyRecent {}
    unsafe impl aya::Pod for EndpointAddrKey {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for QuarantineAllowKey {}
    unsafe impl aya::Pod for PolicyRanks {}
    unsafe impl aya::Pod for RankSummary {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn names_apply_to_world_and_cidr_identities_only() {
        use identity::*;
        for id in [WORLD, FIRST_CIDR_IDENTITY, FIRST_NODE_IDENTITY - 1] {
            assert!(names_apply_to(id), "{id:#x}");
        }
        for id in [
            UNKNOWN,
            HOST,
            FIRST_ALLOCATED_IDENTITY,
            FIRST_CIDR_IDENTITY - 1,
            FIRST_NODE_IDENTITY,
            FIRST_NODE_IDENTITY + NODE_IDENTITY_COUNT - 1,
            FIRST_NAME_IDENTITY,
            FIRST_REMOTE_IDENTITY,
            ANY,
        ] {
            assert!(!names_apply_to(id), "{id:#x}");
        }
    }

    #[test]
    fn remote_identities_overlap_no_other_range() {
        use identity::*;
        let last = FIRST_REMOTE_IDENTITY + (REMOTE_IDENTITY_COUNT - 1);
        for id in [FIRST_REMOTE_IDENTITY, last] {
            assert!(
                is_remote(id) && !is_name(id) && !names_apply_to(id),
                "{id:#x}"
            );
        }
        const { assert!(FIRST_NAME_IDENTITY + NAME_IDENTITY_COUNT <= FIRST_REMOTE_IDENTITY) };
        assert!(last < ANY);
        for id in [
            FIRST_REMOTE_IDENTITY - 1,
            last + 1,
            ANY,
            WORLD,
            FIRST_NODE_IDENTITY,
        ] {
            assert!(!is_remote(id), "{id:#x}");
        }
    }

    #[test]
    fn port_bloom_sets_two_bits_and_tells_ports_apart() {
        let mut false_positives = 0;
        let filter = port_bloom(80u16.to_be()) | port_bloom(443u16.to_be());
        for port in 0..=u16::MAX {
            let bits = port_bloom(port.to_be());
            assert!(bits.count_ones() >= 1 && bits.count_ones() <= 2);
            if filter & bits == bits && port != 80 && port != 443 {
                false_positives += 1;
            }
        }
        // Two ports in 64 bits with two hashes: about 0.2% of the others pass the filter.
        assert!(false_positives < 65536 / 100, "{false_positives}");
    }

    #[test]
    fn ipv4_conntrack_keys_widen_and_narrow() {
        let k = CtKeyV4 {
            saddr: u32::from_ne_bytes([10, 0, 0, 1]),
            daddr: u32::from_ne_bytes([10, 0, 1, 2]),
            sport_be: 80u16.to_be(),
            dport_be: 40000u16.to_be(),
            endpoint_id: 7,
            protocol: 6,
            direction: 1,
        };
        let wide = k.widen();
        assert_eq!(wide.saddr[10..], [0xff, 0xff, 10, 0, 0, 1]);
        assert_eq!(CtKeyV4::narrow(&wide), Some(k));
        // The canonical order is the same on both forms.
        assert_eq!(
            ct_swapped(&wide.saddr, &wide.daddr, 5, 5),
            u32::from_be(k.saddr) > u32::from_be(k.daddr)
        );
        let mut v6 = wide;
        v6.saddr[0] = 0xfd;
        assert_eq!(CtKeyV4::narrow(&v6), None);
    }

    #[test]
    fn clock_from_tick_samples() {
        // HZ=250: two edges 3 ticks apart, sampled a few microseconds late.
        let a = (4_294_967_296, 1_000_003_000);
        let b = (4_294_967_299, 1_012_002_500);
        let (tick, offset) = clock_from_samples(a, b).expect("clock");
        assert_eq!(tick, 4_000_000);
        assert_eq!(
            (4_294_967_299u64 * 4_000_000).wrapping_add(offset),
            1_012_002_500
        );
        // HZ=1000, one tick.
        assert_eq!(
            clock_from_samples((10, 5_000_001_000), (11, 5_001_000_500)).map(|c| c.0),
            Some(1_000_000)
        );
        // HZ=300.
        assert_eq!(
            clock_from_samples((10, 0), (13, 10_000_100)).map(|c| c.0),
            Some(3_333_333)
        );
        // No tick, time going back, or a ratio no kernel has.
        assert_eq!(clock_from_samples((10, 0), (10, 5)), None);
        assert_eq!(clock_from_samples((10, 9), (11, 5)), None);
        assert_eq!(clock_from_samples((10, 0), (11, 2_000_000)), None);
    }

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(size_of::<PolicyValue>(), 12);
        assert_eq!(size_of::<EndpointInfo>(), 16 + 24 + 32);
        assert_eq!(core::mem::offset_of!(EndpointInfo, addrs) % 8, 0);
        assert_eq!(size_of::<PolicyKey>(), 12);
        assert_eq!(size_of::<PolicySummary>(), 24);
        assert_eq!(size_of::<PrefilterKey>(), 20);
        assert_eq!(size_of::<PrefilterValue>(), 24);
        assert_eq!(size_of::<CtKey>(), 40);
        assert_eq!(size_of::<CtKeyV4>(), 16);
        assert_eq!(size_of::<Config>(), 32);
        assert_eq!(size_of::<CtValue>(), 64 + 16);
        assert_eq!(size_of::<PolicyRanks>(), 8 * 8 + 16);
        assert_eq!(size_of::<RankSummary>(), 80 + 16);
        assert_eq!(size_of::<FlowEvent>(), 8 + 32 + 12 + 28);
        assert_eq!(
            POLICY_KEY_FIXED_BITS as usize,
            (size_of::<PolicyKey>() - 2) * 8
        );
    }
}
