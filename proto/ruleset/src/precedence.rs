//! Precedence in a form that combines across peer identities: the one definition behind
//! [`crate::resolve`].
//!
//! A packet usually has one peer identity, and [`crate::resolve`] over the entries matching it
//! decides. A connection to an address the pod learned as DNS names has several: the address's
//! own identity (a CIDR identity, `world`) and the name identities of every matching pattern;
//! it must be decided over the entries of *all* of them together — an Admin deny of
//! `0.0.0.0/0` of higher priority than the name's Accept still denies, an Admin Accept by name
//! beats a NetworkPolicy's default deny, an Admin `Pass` of the address hands the name's Admin
//! Accept over to the next tier too.
//!
//! The data plane cannot resolve a union of entry sets per packet, but it need not: [`resolve`]
//! only ever looks at the best entry of each tier (lowest priority, then deny before allow
//! before pass, then lowest rule id) and at whether the direction is isolated. So the agent
//! writes, per map key (peer identity, protocol, port), a [`Resolution`]: the [`Rank`] of the
//! best entry of each tier, per view. The best of a tier over a union of entry sets is the
//! least of the sets' bests, so k + 1 lookups combined with [`Resolution::combine`] (a
//! per-tier minimum of plain integers) and then [`Resolution::decision`] give exactly what
//! [`resolve`] gives over the union; `combine_equals_resolve_over_the_union` checks that for
//! random entry sets, passes and isolation included.
//!
//! [`resolve`]: crate::resolve

use serde::{Deserialize, Serialize};

use crate::{
    Action, Decision, DirectionPolicy, PolicyEntry, RULE_DEFAULT_ALLOW, RuleId, Stage, Tier,
    Verdict,
};

/// An entry's place within its tier, packed so that plain integer order is precedence order:
/// priority (bits 34-49), action (bits 32-33: deny 0, allow 1, pass 2), rule id (bits 0-31). The
/// lower, the stronger. The tier is where the rank is kept ([`TierBests`]), not in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Rank(u64);

impl Rank {
    pub fn new(priority: u16, action: Action, rule: RuleId) -> Rank {
        let action = match action {
            Action::Deny => 0u64,
            Action::Allow => 1,
            Action::Pass => 2,
        };
        Rank((u64::from(priority) << 34) | (action << 32) | u64::from(rule))
    }

    /// The rank of an entry within its tier.
    pub fn of(entry: &PolicyEntry) -> Rank {
        Rank::new(entry.priority, entry.action, entry.rule)
    }

    pub fn priority(self) -> u16 {
        (self.0 >> 34) as u16
    }

    pub fn action(self) -> Action {
        match (self.0 >> 32) & 3 {
            0 => Action::Deny,
            1 => Action::Allow,
            _ => Action::Pass,
        }
    }

    pub fn rule(self) -> RuleId {
        self.0 as u32
    }

    /// The packed value, for map values.
    pub fn raw(self) -> u64 {
        self.0
    }

    /// A packed value back; `None` for values no [`Rank::new`] makes.
    pub fn from_raw(raw: u64) -> Option<Rank> {
        ((raw >> 50) == 0 && (raw >> 32) & 3 != 3).then_some(Rank(raw))
    }
}

/// The best entry of each tier (`None`: no entry of that tier matches), for one view.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TierBests {
    pub quarantine: Option<Rank>,
    pub admin: Option<Rank>,
    pub application: Option<Rank>,
    pub baseline: Option<Rank>,
}

impl TierBests {
    fn slot(&mut self, tier: Tier) -> &mut Option<Rank> {
        match tier {
            Tier::Quarantine => &mut self.quarantine,
            Tier::Admin => &mut self.admin,
            Tier::Application => &mut self.application,
            Tier::Baseline => &mut self.baseline,
        }
    }

    fn get(&self, tier: Tier) -> Option<Rank> {
        match tier {
            Tier::Quarantine => self.quarantine,
            Tier::Admin => self.admin,
            Tier::Application => self.application,
            Tier::Baseline => self.baseline,
        }
    }

    fn offer(&mut self, tier: Tier, rank: Rank) {
        let slot = self.slot(tier);
        *slot = Some(slot.map_or(rank, |r| r.min(rank)));
    }

    fn combine(&self, other: &TierBests) -> TierBests {
        let min = |a: Option<Rank>, b: Option<Rank>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        TierBests {
            quarantine: min(self.quarantine, other.quarantine),
            admin: min(self.admin, other.admin),
            application: min(self.application, other.application),
            baseline: min(self.baseline, other.baseline),
        }
    }

    /// Walks the tiers from the top: the best entry of a tier decides when it allows or denies,
    /// a pass (or no entry) goes on to the next tier; an isolated direction denies what the
    /// application tier does not decide; otherwise the baseline tier decides, else allow.
    fn decide(&self, isolated_by: Option<RuleId>) -> (Verdict, RuleId) {
        for tier in [
            Tier::Quarantine,
            Tier::Admin,
            Tier::Application,
            Tier::Baseline,
        ] {
            match self.get(tier) {
                Some(r) if r.action() == Action::Allow => return (Verdict::Allow, r.rule()),
                Some(r) if r.action() == Action::Deny => return (Verdict::Deny, r.rule()),
                _ => {}
            }
            if tier == Tier::Application
                && let Some(rule) = isolated_by
            {
                return (Verdict::Deny, rule);
            }
        }
        (Verdict::Allow, RULE_DEFAULT_ALLOW)
    }
}

/// What a set of matching entries of one direction policy resolves to, in a form that combines
/// with the resolution of other entry sets of the same direction policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resolution {
    /// The enforced view's best entry per tier.
    pub enforced: TierBests,
    /// The staged view's.
    pub staged: TierBests,
    /// [`DirectionPolicy::isolated_by`].
    pub isolated_by: Option<RuleId>,
    /// [`DirectionPolicy::staged_isolated_by`].
    pub staged_isolated_by: Option<RuleId>,
}

impl Resolution {
    /// The resolution of `matching` (entries of `policy` that all match the packet).
    pub fn of(policy: &DirectionPolicy, matching: &[&PolicyEntry]) -> Resolution {
        let mut r = Resolution {
            isolated_by: policy.isolated_by,
            staged_isolated_by: policy.staged_isolated_by,
            ..Resolution::default()
        };
        for e in matching {
            let rank = Rank::of(e);
            if Stage::enforced(e.stage) {
                r.enforced.offer(e.tier, rank);
            }
            if Stage::staged(e.stage) {
                r.staged.offer(e.tier, rank);
            }
        }
        r
    }

    /// What the agent writes for one map key: the resolution of the entries of `policy` that
    /// match a packet from/to `peer` with this protocol and port (its own and the `ANY` ones).
    pub fn for_peer(
        policy: &DirectionPolicy,
        peer: crate::Identity,
        protocol: Option<crate::Protocol>,
        port: Option<u16>,
    ) -> Resolution {
        let matching: Vec<&PolicyEntry> = policy
            .entries
            .iter()
            .filter(|e| e.matches(peer, protocol, port))
            .collect();
        Resolution::of(policy, &matching)
    }

    /// The resolution of the union of both entry sets (of one direction policy): per tier and
    /// view, the stronger rank.
    pub fn combine(&self, other: &Resolution) -> Resolution {
        Resolution {
            enforced: self.enforced.combine(&other.enforced),
            staged: self.staged.combine(&other.staged),
            isolated_by: self.isolated_by.or(other.isolated_by),
            staged_isolated_by: self.staged_isolated_by.or(other.staged_isolated_by),
        }
    }

    /// The decision, in both views.
    pub fn decision(&self) -> Decision {
        let (verdict, rule) = self.enforced.decide(self.isolated_by);
        let (audit_verdict, audit_rule) = self.staged.decide(self.staged_isolated_by);
        Decision {
            verdict,
            rule,
            audit_verdict,
            audit_rule,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_order_by_priority_then_deny_allow_pass_then_rule_and_read_back() {
        let a = Rank::new(3, Action::Pass, 1);
        let b = Rank::new(4, Action::Deny, 0);
        let c = Rank::new(4, Action::Allow, 0);
        let d = Rank::new(4, Action::Allow, 7);
        assert!(a < b && b < c && c < d);
        for r in [a, b, c, d, Rank::new(u16::MAX, Action::Pass, u32::MAX)] {
            assert_eq!(Rank::from_raw(r.raw()), Some(r));
        }
        assert_eq!((d.priority(), d.action(), d.rule()), (4, Action::Allow, 7));
        assert_eq!(Rank::from_raw(3 << 32), None);
        assert_eq!(Rank::from_raw(1 << 50), None);
    }
}
