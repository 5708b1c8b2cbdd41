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

use std::collections::{BTreeMap, BTreeSet};

use bulkhead_common::{
    DIR_EGRESS, DIR_INGRESS, POLICY_KEY_FIXED_BITS, PROTO_OTHER, PolicyKey, PolicySummary,
    PolicyValue, SUMMARY_HAS_EXACT, SUMMARY_HAS_RANGES, VERDICT_ALLOW, VERDICT_DENY, port_bloom,
};
use bulkhead_ruleset::{
    Decision, Direction, DirectionPolicy, EndpointPolicy, PolicyEntry, PortRange, Protocol,
    Verdict, identity, resolve,
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

/// All `POLICY` entries of one direction of a policy group under `policy_id`.
pub fn compile_direction(
    policy_id: u32,
    direction: Direction,
    policy: &DirectionPolicy,
) -> Vec<PolicyMapEntry> {
    // entry index → its blocks, grouped by (identity, protocol).
    let mut groups: BTreeMap<(u32, u8), Vec<(usize, PortBlock)>> = BTreeMap::new();
    for (i, e) in policy.entries.iter().enumerate() {
        for (proto, block) in entry_blocks(e) {
            groups.entry((e.peer, proto)).or_default().push((i, block));
        }
    }
    let dir = direction_code(direction);
    let mut out = Vec::new();
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
                let decision = resolve(policy, &covering);
                out.push(PolicyMapEntry {
                    prefix_len: POLICY_KEY_FIXED_BITS + key.bits as u32,
                    key: PolicyKey {
                        policy_id,
                        identity: id,
                        direction: dir,
                        protocol: proto,
                        port_be: key.start.to_be(),
                    },
                    value: policy_value(&decision),
                });
            }
        }
    }
    out
}

/// A group's keys as the kernel maps hold them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyTables {
    pub summaries: Vec<(PolicyKey, PolicySummary)>,
    pub exact: Vec<(PolicyKey, PolicyValue)>,
    /// (prefix length, key, value) of the `POLICY` trie.
    pub ranges: Vec<(u32, PolicyKey, PolicyValue)>,
}

impl PolicyTables {
    pub fn len(&self) -> usize {
        self.summaries.len() + self.exact.len() + self.ranges.len()
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

/// A group's kernel keys under `policy_id`: [`compile_policy`] split by [`policy_tables`].
pub fn tables_of(policy_id: u32, policy: &EndpointPolicy) -> PolicyTables {
    policy_tables(
        &compile_policy(policy_id, policy),
        (
            default_value(&policy.ingress),
            default_value(&policy.egress),
        ),
    )
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
    use bulkhead_ruleset::{Action, Stage, Tier, decide_direction};
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
}
