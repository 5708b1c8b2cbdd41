//! Egress decided with the names an endpoint learned from DNS answers (issue 19): the rank
//! maps, the lookup of what the endpoint learned about a destination, and the decision over the
//! destination's identity and its names together (`bulkhead_ruleset::decide_with_names`). Only
//! endpoints whose policy names DNS names get here (`endpoint_flags::HAS_NAMES`, tested in
//! `decide` in `main.rs`), and only for new egress connections to `world` or CIDR addresses and
//! the re-checks of connections admitted with names.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LpmTrie, lpm_trie::Key},
};
use bulkhead_common::{
    DIR_EGRESS, EndpointInfo, POLICY_KEY_FIXED_BITS, PolicyKey, PolicyRanks, PolicyValue,
    RANK_EXACT_ENTRIES, RANK_RANGES_ENTRIES, RANK_SUMMARY_ENTRIES, RANKS_ISOLATED,
    RANKS_STAGED_ISOLATED, RULE_DEFAULT_ALLOW, RankSummary, SUMMARY_HAS_EXACT, SUMMARY_HAS_RANGES,
    VERDICT_ALLOW, VERDICT_DENY,
    fqdn::{FQDN_MAX_IDS, FQDN_NAME_ID_NONE, FqdnLearnedKeyV4, FqdnLearnedKeyV6},
    port_bloom, rank, stat,
};

use crate::{
    BPF_F_NO_PREALLOC, IDENTITY_ANY, Scratch, addr, bump_stat, dns, parse::Packet, policy_protocol,
};

/// Decisions over several peer identities (an address the endpoint learned under DNS names):
/// beside the three policy maps, under the same keys, the per-tier ranks of each key's matching
/// entries (`PolicyRanks`), written only for policy generations whose egress names DNS names
/// and only under name identities, `world`, CIDR identities and the wildcard. The verdict maps
/// hold resolved verdicts, which cannot be combined across identities (an Admin Accept of a
/// name at priority 10 and an Admin Deny of 0.0.0.0/0 at priority 5 are both "the verdict" of
/// their own key); ranks can, by a per-tier minimum (see `bulkhead_ruleset::precedence`).
/// Separate maps rather than wider values of the policy maps, so every other endpoint's lookup
/// stays as small as it is.
#[map]
static RANK_SUMMARY: HashMap<PolicyKey, RankSummary> =
    HashMap::pinned(RANK_SUMMARY_ENTRIES, BPF_F_NO_PREALLOC);

#[map]
static RANK_EXACT: HashMap<PolicyKey, PolicyRanks> =
    HashMap::pinned(RANK_EXACT_ENTRIES, BPF_F_NO_PREALLOC);

#[map]
static RANK_RANGES: LpmTrie<PolicyKey, PolicyRanks> = LpmTrie::pinned(RANK_RANGES_ENTRIES, 0);

/// Which learned names a decision combines with the peer's identity.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum NamesFrom {
    /// A new connection: the names whose TTL has not run out.
    Live,
    /// A tracked connection re-checked after a policy change: the names it was admitted with,
    /// expired or not (expiry stops new connections, never established ones).
    Recorded,
    /// A revoked connectionless flow its opener re-opens: the names it was admitted with, else
    /// the live ones.
    RecordedElseLive,
}

/// Fills `s.names` with the names under which the endpoint learned the packet's destination
/// and whose TTL has not run out at `now` (the clock the learning wrote expiries with);
/// whether there is one.
#[inline(always)]
pub(crate) fn live_names(s: &mut Scratch, endpoint_id: u32, now: u64) -> bool {
    bump_stat(stat::NAME_LOOKUPS);
    let learned = if s.packet.family == bulkhead_common::FAMILY_V4 {
        let key = FqdnLearnedKeyV4 {
            endpoint_id,
            // SAFETY: an address field of the 8-aligned `Packet`.
            addr: addr::v4_of(unsafe { addr::get(&s.packet.daddr) }),
        };
        // SAFETY: the value stays valid for this program run (RCU).
        unsafe { dns::FQDN_LEARNED_V4.get(&key) }
    } else {
        let key = FqdnLearnedKeyV6 {
            endpoint_id,
            addr: s.packet.daddr,
        };
        unsafe { dns::FQDN_LEARNED_V6.get(&key) }
    };
    let Some(l) = learned else {
        return false;
    };
    let mut any = false;
    let mut i = 0;
    while i < FQDN_MAX_IDS {
        let id = l.name_ids[i];
        if id != FQDN_NAME_ID_NONE && l.expires_ns[i] > now {
            s.names[i] = id;
            any = true;
        }
        i += 1;
    }
    any
}

/// The ranks of the key `lookup_policy` would find for (peer, protocol, port) in egress, from
/// the rank maps (which have the same keys and summary flags), else the policy's default
/// ranks; None when not even those exist.
#[inline(always)]
fn ranks_of(
    ep: &EndpointInfo,
    peer: u32,
    p: &Packet,
    port_be: u16,
) -> Option<&'static PolicyRanks> {
    let mut key = PolicyKey {
        policy_id: ep.policy_id,
        identity: peer,
        direction: DIR_EGRESS,
        protocol: policy_protocol(p.protocol),
        port_be: 0,
    };
    let summary = match unsafe { RANK_SUMMARY.get(&key) } {
        Some(s) => s,
        None => {
            key.identity = IDENTITY_ANY;
            match unsafe { RANK_SUMMARY.get(&key) } {
                Some(s) => s,
                None => {
                    key.protocol = rank::DEFAULT_PROTOCOL;
                    return unsafe { RANK_SUMMARY.get(&key) }.map(|s| &s.fallback);
                }
            }
        }
    };
    if p.ports_known {
        key.port_be = port_be;
        let bloom = port_bloom(key.port_be);
        if summary.flags & SUMMARY_HAS_EXACT != 0
            && summary.exact_ports & bloom == bloom
            && let Some(v) = unsafe { RANK_EXACT.get(&key) }
        {
            return Some(v);
        }
        if summary.flags & SUMMARY_HAS_RANGES != 0
            && let Some(v) = RANK_RANGES.get(Key::new(POLICY_KEY_FIXED_BITS + 16, key))
        {
            return Some(v);
        }
    }
    Some(&summary.fallback)
}

/// `acc` combined with `r`: per tier and view the stronger rank (`Resolution::combine`).
#[inline(always)]
fn combine_ranks(acc: &mut PolicyRanks, r: &PolicyRanks) {
    let mut i = 0;
    while i < rank::TIERS {
        if r.enforced[i] < acc.enforced[i] {
            acc.enforced[i] = r.enforced[i];
        }
        if r.staged[i] < acc.staged[i] {
            acc.staged[i] = r.staged[i];
        }
        i += 1;
    }
    if acc.flags & RANKS_ISOLATED == 0 && r.flags & RANKS_ISOLATED != 0 {
        acc.isolated_by = r.isolated_by;
    }
    if acc.flags & RANKS_STAGED_ISOLATED == 0 && r.flags & RANKS_STAGED_ISOLATED != 0 {
        acc.staged_isolated_by = r.staged_isolated_by;
    }
    acc.flags |= r.flags;
}

/// Walks the tiers from the top as `TierBests::decide` does: a tier's best entry decides when
/// it allows or denies, a pass (or none) goes on; an isolated direction denies what the
/// application tier leaves undecided; else allowed by default. (verdict, rule).
#[inline(always)]
fn walk_tiers(ranks: &[u64; rank::TIERS], isolated: bool, isolated_by: u32) -> (u8, u32) {
    let mut i = 0;
    while i < rank::TIERS {
        let r = ranks[i];
        if r != rank::NONE {
            let action = (r >> rank::ACTION_SHIFT) & 3;
            if action == rank::ACTION_ALLOW {
                return (VERDICT_ALLOW, r as u32);
            }
            if action == rank::ACTION_DENY {
                return (VERDICT_DENY, r as u32);
            }
        }
        if i == rank::APPLICATION && isolated {
            return (VERDICT_DENY, isolated_by);
        }
        i += 1;
    }
    (VERDICT_ALLOW, RULE_DEFAULT_ALLOW)
}

/// The decision over the peer's identity and the names in `s.names`, both views; None when the
/// peer's identity has no ranks at all (see [`decide`]).
#[inline(always)]
pub(crate) fn decide_by_ranks(
    s: &mut Scratch,
    ep: &EndpointInfo,
    peer: u32,
    port_be: u16,
) -> Option<PolicyValue> {
    let own = ranks_of(ep, peer, &s.packet, port_be)?;
    s.ranks = *own;
    let mut i = 0;
    while i < FQDN_MAX_IDS {
        let id = s.names[i];
        if id != FQDN_NAME_ID_NONE
            && let Some(r) = ranks_of(ep, id, &s.packet, port_be)
        {
            combine_ranks(&mut s.ranks, r);
        }
        i += 1;
    }
    let r = &s.ranks;
    let (verdict, rule_id) = walk_tiers(&r.enforced, r.flags & RANKS_ISOLATED != 0, r.isolated_by);
    let (audit_verdict, audit_rule_id) = walk_tiers(
        &r.staged,
        r.flags & RANKS_STAGED_ISOLATED != 0,
        r.staged_isolated_by,
    );
    Some(PolicyValue {
        rule_id,
        audit_rule_id,
        verdict,
        audit_verdict,
        _pad: [0; 2],
    })
}
