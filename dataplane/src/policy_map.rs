//! Turns a policy group (the compiled policy endpoints share) into policy map keys. Every
//! endpoint of a group points at the same policy id, so the keys exist once per group.
//!
//! [`compile_direction`] produces logical entries, (identity, protocol, aligned port block) →
//! value, where every key's value is [`resolve`]d from *all* entries that cover the key and the
//! wildcard entries' keys are copied under every specific identity that has entries of its own.
//! The longest matching block under the peer's identity (else under the wildcard) is then
//! always a key whose covering entries are exactly the entries that match the packet (port
//! blocks are aligned prefixes, so two blocks that contain one port are nested), and its value
//! equals the reference [`decide_direction`](bulkhead_ruleset::decide_direction).
//!
//! [`policy_tables`] splits them over three kernel maps so that a new connection costs hash
//! lookups, not trie walks whose depth grows with the number of keys:
//! * `POLICY_SUMMARY` (hash), one key per (identity, protocol): the protocol-wide value (else
//!   the direction's default) and flags saying whether finer keys exist;
//! * `POLICY_EXACT` (hash): single-port blocks;
//! * `POLICY` (LPM trie): the remaining blocks, port ranges, the only keys that need a
//!   longest-prefix match. Exact keys are looked up first, so the trie never needs them.
//!
//! For a policy whose egress names DNS names (entries of name identities), [`compile_ranks`]
//! adds the rank maps (`RANK_SUMMARY`, `RANK_EXACT`, `RANK_RANGES`): the same keys, for the
//! identities a learned address combines (name identities, `world`, CIDR identities and the
//! wildcard), each holding the [`Resolution`] of its covering entries instead of their
//! decision, plus the policy's default ranks. The kernel combines the ranks of the address's
//! key and of each learned name's key and walks the tiers: the decision equals
//! [`decide_with_names`](bulkhead_ruleset::decide_with_names), which resolving one key alone
//! cannot give (see `bulkhead_ruleset::precedence`).

use std::collections::{BTreeMap, BTreeSet};

use bulkhead_common::{
    DIR_EGRESS, DIR_INGRESS, POLICY_KEY_FIXED_BITS, PROTO_OTHER, PolicyKey, PolicyRanks,
    PolicySummary, PolicyValue, RANKS_ISOLATED, RANKS_STAGED_ISOLATED, RankSummary,
    SUMMARY_HAS_EXACT, SUMMARY_HAS_RANGES, VERDICT_ALLOW, VERDICT_DENY, port_bloom, rank,
};
use bulkhead_ruleset::{
    Decision, Direction, DirectionPolicy, EndpointPolicy, PolicyEntry, PortRange, Protocol,
    Resolution, Verdict, identity, precedence::TierBests, resolve,
};

/// Protocol numbers a protocol-wildcard entry expands to.
pub const ALL_POLICY_PROTOCOLS: [u8; 6] = [6, 17, 132, 1, 58, PROTO_OTHER];

pub fn direction_code(direction: Direction) -> u8 {
    match direction {
        Direction::Ingress => DIR_INGRESS,
        Direction::Egress => DIR_EGRESS,
    }
}

/// An aligned block of ports: the `bits` high bits of `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortBlock {
    pub start: u16,
    pub bits: u8,
}

impl PortBlock {
    pub const ALL: PortBlock = PortBlock { start: 0, bits: 0 };

    fn contains_block(&self, other: &PortBlock) -> bool {
        if self.bits > other.bits {
            return false;
        }
        mask(self.bits) & other.start == self.start
    }
}

fn mask(bits: u8) -> u16 {
    if bits == 0 {
        0
    } else {
        u16::MAX << (16 - bits as u32)
    }
}

/// The minimal set of aligned prefix blocks that exactly cover `range`.
pub fn port_blocks(range: PortRange) -> Vec<PortBlock> {
    let mut out = Vec::new();
    let mut start = range.first as u32;
    let end = range.last as u32;
    while start <= end {
        // Largest aligned block starting at `start` that does not pass `end`.
        let mut size_log = if start == 0 {
            16
        } else {
            start.trailing_zeros().min(16)
        };
        while size_log > 0 && start + (1u32 << size_log) - 1 > end {
            size_log -= 1;
        }
        out.push(PortBlock {
            start: start as u16,
            bits: (16 - size_log) as u8,
        });
        start += 1u32 << size_log;
    }
    out
}

/// The keys (protocol, port block) an entry covers; empty when it can match nothing.
fn entry_blocks(entry: &PolicyEntry) -> Vec<(u8, PortBlock)> {
    let protocols: Vec<u8> = match entry.protocol {
        Some(p) => vec![p.number()],
        None => ALL_POLICY_PROTOCOLS.to_vec(),
    };
    let mut out = Vec::new();
    for proto in protocols {
        let has_ports = Protocol::from_number(proto).is_some_and(|p| p.has_ports());
        if entry.ports.is_all() {
            out.push((proto, PortBlock::ALL));
        } else if has_ports {
            out.extend(port_blocks(entry.ports).into_iter().map(|b| (proto, b)));
        }
        // A port-restricted entry never matches a port-less protocol.
    }
    out
}

pub fn policy_value(d: &Decision) -> PolicyValue {
    let code = |v: Verdict| match v {
        Verdict::Allow => VERDICT_ALLOW,
        Verdict::Deny => VERDICT_DENY,
    };
    PolicyValue {
        rule_id: d.rule,
        audit_rule_id: d.audit_rule,
        verdict: code(d.verdict),
        audit_verdict: code(d.audit_verdict),
        _pad: [0; 2],
    }
}

/// One `POLICY` map entry: prefix length, key data, value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyMapEntry {
    pub prefix_len: u32,
    pub key: PolicyKey,
    pub value: PolicyValue,
}

/// The default decision of a direction (no key matches).
pub fn default_value(policy: &DirectionPolicy) -> PolicyValue {
    policy_value(&resolve(policy, &[]))
}

/// All `POLICY` entries of a policy group, both directions, under `policy_id`.
pub fn compile_policy(policy_id: u32, policy: &EndpointPolicy) -> Vec<PolicyMapEntry> {
    let mut out = compile_direction(policy_id, Direction::Ingress, &policy.ingress);
    out.extend(compile_direction(
        policy_id,
        Direction::Egress,
        &policy.egress,
    ));
    out
}

/// Calls `f` with every logical key of a direction policy: (identity, protocol, aligned port
/// block) and the entries that cover it (its identity's own and the wildcard's, deduplicated
/// and sorted). The wildcard's keys come once under [`identity::ANY`] and again under every
/// specific identity with entries of its own for the protocol.
fn for_each_key<'a>(
    policy: &'a DirectionPolicy,
    mut f: impl FnMut(u32, u8, PortBlock, &[&'a PolicyEntry]),
) {
    // entry index → its blocks, grouped by (identity, protocol).
    let mut groups: BTreeMap<(u32, u8), Vec<(usize, PortBlock)>> = BTreeMap::new();
    for (i, e) in policy.entries.iter().enumerate() {
        for (proto, block) in entry_blocks(e) {
            groups.entry((e.peer, proto)).or_default().push((i, block));
        }
    }
    let protocols: BTreeSet<u8> = groups.keys().map(|(_, p)| *p).collect();
    for proto in protocols {
        let wildcard: &[(usize, PortBlock)] = groups
            .get(&(identity::ANY, proto))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let identities = groups
            .keys()
            .filter(|(_, p)| *p == proto)
            .map(|(id, _)| *id);
        for id in identities {
            let own: &[(usize, PortBlock)] = if id == identity::ANY {
                &[]
            } else {
                &groups[&(id, proto)]
            };
            let keys: BTreeSet<PortBlock> = own.iter().chain(wildcard).map(|(_, b)| *b).collect();
            for key in keys {
                let mut covering: Vec<&PolicyEntry> = own
                    .iter()
                    .chain(wildcard)
                    .filter(|(_, b)| b.contains_block(&key))
                    .map(|(i, _)| &policy.entries[*i])
                    .collect();
                covering.sort();
                covering.dedup();
                f(id, proto, key, &covering);
            }
        }
    }
}

fn policy_key(policy_id: u32, dir: u8, id: u32, proto: u8, block: PortBlock) -> PolicyKey {
    PolicyKey {
        policy_id,
        identity: id,
        direction: dir,
        protocol: proto,
        port_be: block.start.to_be(),
    }
}

/// All `POLICY` entries of one direction of a policy group under `policy_id`.
pub fn compile_direction(
    policy_id: u32,
    direction: Direction,
    policy: &DirectionPolicy,
) -> Vec<PolicyMapEntry> {
    let dir = direction_code(direction);
    let mut out = Vec::new();
    for_each_key(policy, |id, proto, block, covering| {
        out.push(PolicyMapEntry {
            prefix_len: POLICY_KEY_FIXED_BITS + block.bits as u32,
            key: policy_key(policy_id, dir, id, proto, block),
            value: policy_value(&resolve(policy, covering)),
        });
    });
    out
}

/// Whether a direction policy has entries of name identities (peers by DNS name).
pub fn has_name_entries(policy: &DirectionPolicy) -> bool {
    policy.entries.iter().any(|e| identity::is_name(e.peer))
}

/// Whether rank keys are written under `id`: the identities a learned address's decision
/// combines (names, the address's own `world` or CIDR identity) and the wildcard they fall
/// back to.
pub fn ranked_identity(id: u32) -> bool {
    id == identity::ANY || identity::is_name(id) || identity::names_apply_to(id)
}

fn tier_ranks(t: &TierBests) -> [u64; rank::TIERS] {
    [t.quarantine, t.admin, t.application, t.baseline].map(|r| r.map_or(rank::NONE, |r| r.raw()))
}

/// A [`Resolution`] as the rank maps hold it.
pub fn policy_ranks(r: &Resolution) -> PolicyRanks {
    let mut flags = 0;
    if r.isolated_by.is_some() {
        flags |= RANKS_ISOLATED;
    }
    if r.staged_isolated_by.is_some() {
        flags |= RANKS_STAGED_ISOLATED;
    }
    PolicyRanks {
        enforced: tier_ranks(&r.enforced),
        staged: tier_ranks(&r.staged),
        isolated_by: r.isolated_by.unwrap_or(0),
        staged_isolated_by: r.staged_isolated_by.unwrap_or(0),
        flags,
        _pad: 0,
    }
}

/// A group's rank keys (see the module doc), as the kernel maps hold them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RankTables {
    pub summaries: Vec<(PolicyKey, RankSummary)>,
    pub exact: Vec<(PolicyKey, PolicyRanks)>,
    /// (prefix length, key, value) of the `RANK_RANGES` trie.
    pub ranges: Vec<(u32, PolicyKey, PolicyRanks)>,
}

impl RankTables {
    pub fn len(&self) -> usize {
        self.summaries.len() + self.exact.len() + self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same keys under another policy id.
    pub fn with_policy_id(&self, policy_id: u32) -> RankTables {
        let re = |k: &PolicyKey| PolicyKey { policy_id, ..*k };
        RankTables {
            summaries: self.summaries.iter().map(|(k, v)| (re(k), *v)).collect(),
            exact: self.exact.iter().map(|(k, v)| (re(k), *v)).collect(),
            ranges: self
                .ranges
                .iter()
                .map(|(l, k, v)| (*l, re(k), *v))
                .collect(),
        }
    }
}

/// The key of a policy's default ranks in `RANK_SUMMARY` (what a peer gets when neither it nor
/// the wildcard has a key for the packet's protocol).
pub fn default_rank_key(policy_id: u32) -> PolicyKey {
    PolicyKey {
        policy_id,
        identity: identity::ANY,
        direction: DIR_EGRESS,
        protocol: rank::DEFAULT_PROTOCOL,
        port_be: 0,
    }
}

/// The rank keys of a policy group under `policy_id`: none unless its egress has name entries
/// (ingress never combines names); else, for the egress keys of [`ranked_identity`]
/// identities, the resolution of the same covering entries [`compile_direction`] resolves,
/// split over summary, exact and range maps exactly as [`policy_tables`] splits the verdicts,
/// plus the default ranks.
pub fn compile_ranks(policy_id: u32, policy: &EndpointPolicy) -> RankTables {
    let egress = &policy.egress;
    if !has_name_entries(egress) {
        return RankTables::default();
    }
    let default = policy_ranks(&Resolution::of(egress, &[]));
    let mut summaries: BTreeMap<PolicyKey, RankSummary> = BTreeMap::new();
    let mut tables = RankTables::default();
    for_each_key(egress, |id, proto, block, covering| {
        if !ranked_identity(id) {
            return;
        }
        let key = policy_key(policy_id, DIR_EGRESS, id, proto, block);
        let value = policy_ranks(&Resolution::of(egress, covering));
        let summary = summaries
            .entry(PolicyKey { port_be: 0, ..key })
            .or_insert(RankSummary {
                fallback: default,
                flags: 0,
                _pad: 0,
                exact_ports: 0,
            });
        match block.bits {
            0 => summary.fallback = value,
            16 => {
                summary.flags |= SUMMARY_HAS_EXACT;
                summary.exact_ports |= port_bloom(key.port_be);
                tables.exact.push((key, value));
            }
            bits => {
                summary.flags |= SUMMARY_HAS_RANGES;
                tables
                    .ranges
                    .push((POLICY_KEY_FIXED_BITS + bits as u32, key, value));
            }
        }
    });
    summaries.insert(
        default_rank_key(policy_id),
        RankSummary {
            fallback: default,
            ..RankSummary::default()
        },
    );
    tables.summaries = summaries.into_iter().collect();
    tables
}

/// A group's keys as the kernel maps hold them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyTables {
    pub summaries: Vec<(PolicyKey, PolicySummary)>,
    pub exact: Vec<(PolicyKey, PolicyValue)>,
    /// (prefix length, key, value) of the `POLICY` trie.
    pub ranges: Vec<(u32, PolicyKey, PolicyValue)>,
    /// The rank keys ([`compile_ranks`]); empty for a policy without name entries.
    pub ranks: RankTables,
}

impl PolicyTables {
    pub fn len(&self) -> usize {
        self.summaries.len() + self.exact.len() + self.ranges.len() + self.ranks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Splits compiled entries over the summary, exact and range maps. `defaults` are the
/// directions' defaults (ingress, egress): a summary without a protocol-wide entry falls back to
/// its direction's default.
pub fn policy_tables(
    entries: &[PolicyMapEntry],
    defaults: (PolicyValue, PolicyValue),
) -> PolicyTables {
    let mut summaries: BTreeMap<PolicyKey, PolicySummary> = BTreeMap::new();
    let mut tables = PolicyTables::default();
    for e in entries {
        let skey = PolicyKey {
            port_be: 0,
            ..e.key
        };
        let summary = summaries.entry(skey).or_insert_with(|| PolicySummary {
            fallback: if e.key.direction == DIR_INGRESS {
                defaults.0
            } else {
                defaults.1
            },
            flags: 0,
            exact_ports: 0,
        });
        match e.prefix_len - POLICY_KEY_FIXED_BITS {
            0 => summary.fallback = e.value,
            16 => {
                summary.flags |= SUMMARY_HAS_EXACT;
                summary.exact_ports |= port_bloom(e.key.port_be);
                tables.exact.push((e.key, e.value));
            }
            _ => {
                summary.flags |= SUMMARY_HAS_RANGES;
                tables.ranges.push((e.prefix_len, e.key, e.value));
            }
        }
    }
    tables.summaries = summaries.into_iter().collect();
    tables
}

/// A group's kernel keys under `policy_id`: [`compile_policy`] split by [`policy_tables`], and
/// the rank keys.
pub fn tables_of(policy_id: u32, policy: &EndpointPolicy) -> PolicyTables {
    let mut tables = policy_tables(
        &compile_policy(policy_id, policy),
        (
            default_value(&policy.ingress),
            default_value(&policy.egress),
        ),
    );
    tables.ranks = compile_ranks(policy_id, policy);
    tables
}

/// A software model of the kernel's rank lookup (`ranks_of` in `ebpf/src/main.rs`) over a
/// group's rank keys: the ranks of the key the verdict lookup would find for `peer` in egress,
/// else the default ranks; None when the group has no rank keys.
pub fn lookup_ranks(
    tables: &RankTables,
    policy_id: u32,
    peer: u32,
    protocol: u8,
    port: Option<u16>,
) -> Option<PolicyRanks> {
    let proto = match Protocol::from_number(protocol) {
        Some(_) => protocol,
        None => PROTO_OTHER,
    };
    let find = |key: &PolicyKey| {
        tables
            .summaries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, s)| *s)
    };
    let mut key = PolicyKey {
        policy_id,
        identity: peer,
        direction: DIR_EGRESS,
        protocol: proto,
        port_be: 0,
    };
    let summary = match find(&key) {
        Some(s) => s,
        None => {
            key.identity = identity::ANY;
            match find(&key) {
                Some(s) => s,
                None => return find(&default_rank_key(policy_id)).map(|s| s.fallback),
            }
        }
    };
    if let Some(port) = port {
        key.port_be = port.to_be();
        let bloom = port_bloom(key.port_be);
        if summary.flags & SUMMARY_HAS_EXACT != 0
            && summary.exact_ports & bloom == bloom
            && let Some((_, v)) = tables.exact.iter().find(|(k, _)| *k == key)
        {
            return Some(*v);
        }
        if summary.flags & SUMMARY_HAS_RANGES != 0
            && let Some((_, _, v)) = tables
                .ranges
                .iter()
                .filter(|(len, k, _)| {
                    let bits = (len - POLICY_KEY_FIXED_BITS) as u8;
                    PolicyKey { port_be: 0, ..*k } == PolicyKey { port_be: 0, ..key }
                        && mask(bits) & port == u16::from_be(k.port_be)
                })
                .max_by_key(|(len, _, _)| *len)
        {
            return Some(*v);
        }
    }
    Some(summary.fallback)
}

/// A software model of the kernel's lookup (`lookup_policy` in `ebpf/src/main.rs`) over a
/// group's tables, for tests and explanations.
pub fn lookup(
    tables: &PolicyTables,
    default: PolicyValue,
    policy_id: u32,
    direction: Direction,
    peer: u32,
    protocol: u8,
    port: Option<u16>,
) -> PolicyValue {
    let dir = direction_code(direction);
    let proto = match Protocol::from_number(protocol) {
        Some(_) => protocol,
        None => PROTO_OTHER,
    };
    let mut key = PolicyKey {
        policy_id,
        identity: peer,
        direction: dir,
        protocol: proto,
        port_be: 0,
    };
    let find = |key: &PolicyKey| {
        tables
            .summaries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, s)| *s)
    };
    let summary = match find(&key) {
        Some(s) => s,
        None => {
            key.identity = identity::ANY;
            match find(&key) {
                Some(s) => s,
                None => return default,
            }
        }
    };
    if let Some(port) = port {
        key.port_be = port.to_be();
        let bloom = port_bloom(key.port_be);
        if summary.flags & SUMMARY_HAS_EXACT != 0
            && summary.exact_ports & bloom == bloom
            && let Some((_, v)) = tables.exact.iter().find(|(k, _)| *k == key)
        {
            return *v;
        }
        if summary.flags & SUMMARY_HAS_RANGES != 0
            && let Some((_, _, v)) = tables
                .ranges
                .iter()
                .filter(|(len, k, _)| {
                    let bits = (len - POLICY_KEY_FIXED_BITS) as u8;
                    PolicyKey { port_be: 0, ..*k } == PolicyKey { port_be: 0, ..key }
                        && mask(bits) & port == u16::from_be(k.port_be)
                })
                .max_by_key(|(len, _, _)| *len)
        {
            return *v;
        }
    }
    summary.fallback
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_ruleset::{Action, Rank, Stage, Tier, decide_direction, decide_direction_peers};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    #[test]
    fn port_blocks_cover_ranges_exactly() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..2000 {
            let a: u16 = rng.random();
            let b: u16 = rng.random();
            let range = PortRange {
                first: a.min(b),
                last: a.max(b),
            };
            let blocks = port_blocks(range);
            let covered: u64 = blocks.iter().map(|b| 1u64 << (16 - b.bits)).sum();
            assert_eq!(covered, (range.last - range.first) as u64 + 1);
            assert!(blocks.len() <= 30);
            for p in [range.first, range.last] {
                assert!(
                    blocks
                        .iter()
                        .any(|b| b.contains_block(&PortBlock { start: p, bits: 16 }))
                );
            }
        }
        assert_eq!(port_blocks(PortRange::ALL), vec![PortBlock::ALL]);
    }

    fn random_policy(rng: &mut StdRng) -> DirectionPolicy {
        let n = rng.random_range(0..12);
        let peers = [300, 301, 302, identity::ANY];
        let entries = (0..n)
            .map(|i| {
                let first = rng.random_range(0..100u16);
                let ports = match rng.random_range(0..3) {
                    0 => PortRange::ALL,
                    1 => PortRange::single(first),
                    _ => PortRange {
                        first,
                        last: first + rng.random_range(0..40),
                    },
                };
                PolicyEntry {
                    peer: peers[rng.random_range(0..peers.len())],
                    protocol: match rng.random_range(0..4) {
                        0 => None,
                        1 => Some(Protocol::Udp),
                        2 => Some(Protocol::Icmp),
                        _ => Some(Protocol::Tcp),
                    },
                    ports,
                    tier: [
                        Tier::Quarantine,
                        Tier::Admin,
                        Tier::Application,
                        Tier::Baseline,
                    ][rng.random_range(0..4)],
                    priority: rng.random_range(0..3),
                    action: [Action::Allow, Action::Deny, Action::Pass][rng.random_range(0..3)],
                    stage: [Stage::Enforced, Stage::Staged, Stage::Superseded]
                        [rng.random_range(0..3)],
                    rule: i as u32 + 1,
                }
            })
            .collect();
        DirectionPolicy {
            isolated_by: rng.random_bool(0.5).then_some(100),
            staged_isolated_by: rng.random_bool(0.3).then_some(101),
            entries,
        }
    }

    /// The compiled tables plus the kernel's lookup order equal the reference on random policies.
    #[test]
    fn compiled_lookup_matches_reference() {
        let mut rng = StdRng::seed_from_u64(42);
        for _ in 0..400 {
            let policy = random_policy(&mut rng);
            let entries = compile_direction(9, Direction::Ingress, &policy);
            let default = default_value(&policy);
            let tables = policy_tables(&entries, (default, PolicyValue::default()));
            for _ in 0..60 {
                let peer = [300, 301, 302, 303][rng.random_range(0..4)];
                let (proto, port) = match rng.random_range(0..4) {
                    0 => (17u8, Some(rng.random_range(0..150u16))),
                    1 => (1u8, None),
                    2 => (47u8, None),
                    _ => (6u8, Some(rng.random_range(0..150u16))),
                };
                // Non-first fragments: port unknown.
                let port = if rng.random_bool(0.1) { None } else { port };
                let want = policy_value(&decide_direction(
                    &policy,
                    peer,
                    Protocol::from_number(proto),
                    port.filter(|_| Protocol::from_number(proto).is_some_and(|p| p.has_ports())),
                ));
                let got = lookup(
                    &tables,
                    default,
                    9,
                    Direction::Ingress,
                    peer,
                    proto,
                    port.filter(|_| Protocol::from_number(proto).is_some_and(|p| p.has_ports())),
                );
                assert_eq!(
                    got, want,
                    "policy {policy:?} peer {peer} proto {proto} port {port:?}"
                );
            }
        }
    }

    const NAME_A: u32 = identity::FIRST_NAME_IDENTITY + 1;
    const NAME_B: u32 = identity::FIRST_NAME_IDENTITY + 2;
    const NAME_C: u32 = identity::FIRST_NAME_IDENTITY + 3;
    const CIDR_A: u32 = identity::FIRST_CIDR_IDENTITY + 1;
    const CIDR_B: u32 = identity::FIRST_CIDR_IDENTITY + 2;

    fn random_name_policy(rng: &mut StdRng) -> DirectionPolicy {
        let mut p = random_policy(rng);
        let peers = [NAME_A, NAME_B, identity::WORLD, CIDR_A, 300, identity::ANY];
        for e in &mut p.entries {
            e.peer = peers[rng.random_range(0..peers.len())];
        }
        // Always at least one name entry, an Admin Accept as CNP `domainNames` compiles to.
        p.entries.push(PolicyEntry {
            peer: [NAME_A, NAME_B][rng.random_range(0..2)],
            protocol: Some(Protocol::Tcp),
            ports: PortRange::single(rng.random_range(0..100)),
            tier: Tier::Admin,
            priority: rng.random_range(0..3),
            action: Action::Allow,
            stage: [Stage::Enforced, Stage::Staged][rng.random_range(0..2)],
            rule: 50,
        });
        p
    }

    /// The ranks back as a `Resolution` (what the agent wrote must be what it resolved).
    fn resolution(r: &PolicyRanks) -> Resolution {
        let tiers = |t: &[u64; 4]| {
            let back = |raw: u64| (raw != rank::NONE).then(|| Rank::from_raw(raw).expect("rank"));
            TierBests {
                quarantine: back(t[0]),
                admin: back(t[1]),
                application: back(t[2]),
                baseline: back(t[3]),
            }
        };
        Resolution {
            enforced: tiers(&r.enforced),
            staged: tiers(&r.staged),
            isolated_by: (r.flags & RANKS_ISOLATED != 0).then_some(r.isolated_by),
            staged_isolated_by: (r.flags & RANKS_STAGED_ISOLATED != 0)
                .then_some(r.staged_isolated_by),
        }
    }

    /// The kernel's order (peer's ranks, each name's, combined, then the tiers) over the
    /// compiled rank keys equals the reference decision over the union of the peers' entries.
    #[test]
    fn rank_keys_combine_to_the_reference_decision_with_names() {
        let mut rng = StdRng::seed_from_u64(19);
        for _ in 0..400 {
            let egress = random_name_policy(&mut rng);
            let policy = EndpointPolicy {
                ingress: DirectionPolicy::default(),
                egress: egress.clone(),
            };
            let ranks = compile_ranks(7, &policy);
            for _ in 0..40 {
                let peer = [identity::WORLD, CIDR_A, CIDR_B][rng.random_range(0..3)];
                let names: Vec<u32> = [NAME_A, NAME_B, NAME_C]
                    .into_iter()
                    .filter(|_| rng.random_bool(0.5))
                    .collect();
                let (proto, port) = match rng.random_range(0..4) {
                    0 => (17u8, Some(rng.random_range(0..150u16))),
                    1 => (1u8, None),
                    2 => (47u8, None),
                    _ => (6u8, Some(rng.random_range(0..150u16))),
                };
                let mut r = resolution(&lookup_ranks(&ranks, 7, peer, proto, port).expect("ranks"));
                for n in &names {
                    r = r.combine(&resolution(
                        &lookup_ranks(&ranks, 7, *n, proto, port).expect("ranks"),
                    ));
                }
                let peers: Vec<u32> = std::iter::once(peer).chain(names.clone()).collect();
                let want =
                    decide_direction_peers(&egress, &peers, Protocol::from_number(proto), port);
                assert_eq!(
                    r.decision(),
                    want,
                    "policy {egress:?} peers {peers:?} proto {proto} port {port:?}"
                );
            }
        }
    }

    #[test]
    fn rank_keys_only_for_name_policies_and_the_identities_names_combine_with() {
        let entry = |peer, rule| PolicyEntry {
            peer,
            protocol: Some(Protocol::Tcp),
            ports: PortRange::single(443),
            tier: Tier::Admin,
            priority: 0,
            action: Action::Allow,
            stage: Stage::Enforced,
            rule,
        };
        let no_names = EndpointPolicy {
            ingress: DirectionPolicy {
                isolated_by: None,
                staged_isolated_by: None,
                entries: vec![entry(NAME_A, 1)],
            },
            egress: DirectionPolicy {
                isolated_by: Some(9),
                staged_isolated_by: None,
                entries: vec![entry(identity::WORLD, 2), entry(300, 3)],
            },
        };
        // A name in ingress means nothing (names describe destinations); none in egress.
        assert!(compile_ranks(1, &no_names).is_empty());
        assert!(tables_of(1, &no_names).ranks.is_empty());

        let mut with_names = no_names.clone();
        with_names.egress.entries.push(entry(NAME_A, 4));
        with_names.egress.entries.push(entry(CIDR_A, 5));
        with_names.egress.entries.push(entry(identity::ANY, 6));
        let ranks = compile_ranks(1, &with_names);
        let ids: BTreeSet<u32> = ranks
            .summaries
            .iter()
            .map(|(k, _)| k.identity)
            .chain(ranks.exact.iter().map(|(k, _)| k.identity))
            .collect();
        // Not the pod identity 300: an address of a pod is decided by its identity alone.
        assert_eq!(
            ids,
            BTreeSet::from([identity::WORLD, CIDR_A, NAME_A, identity::ANY])
        );
        assert!(
            ranks
                .summaries
                .iter()
                .all(|(k, _)| k.direction == DIR_EGRESS)
        );
        // The exact keys are those of the verdict tables, for the ranked identities.
        let verdicts = tables_of(1, &with_names);
        let want: Vec<PolicyKey> = verdicts
            .exact
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| k.direction == DIR_EGRESS && ranked_identity(k.identity))
            .collect();
        assert_eq!(
            ranks.exact.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            want
        );
        // The default key carries the isolation and no rank.
        let (_, default) = ranks
            .summaries
            .iter()
            .find(|(k, _)| *k == default_rank_key(1))
            .expect("default ranks");
        assert_eq!(default.fallback.flags, RANKS_ISOLATED);
        assert_eq!(default.fallback.isolated_by, 9);
        assert_eq!(default.fallback.enforced, [rank::NONE; 4]);
        // Rank summaries say the same about finer keys as the verdict summaries do.
        for (k, s) in &ranks.summaries {
            if let Some((_, v)) = verdicts.summaries.iter().find(|(vk, _)| vk == k) {
                assert_eq!((s.flags, s.exact_ports), (v.flags, v.exact_ports), "{k:?}");
            } else {
                assert_eq!(*k, default_rank_key(1));
            }
        }
        assert_eq!(
            ranks.with_policy_id(5).summaries.len(),
            ranks.summaries.len()
        );
        assert!(
            ranks
                .with_policy_id(5)
                .exact
                .iter()
                .all(|(k, _)| k.policy_id == 5)
        );
    }
}
