//! Egress by domain name (issue 19), the agent's half: the kernel's name state kept equal to
//! the rule set. After every rule set the name maps hold exactly [`RuleSet::names`] under the
//! per-node secret, the trusted resolvers are exactly the rule set's plus the agent's own
//! (`--dns-resolver`), and nothing learned survives for a name id or an endpoint the rule set no
//! longer has. A sweep every second clears what expired.
//!
//! The plans ([`plan_names`], [`plan_resolvers`]) are pure and compare what the kernel holds
//! with what is wanted, so a restarted agent (whose pinned maps hold what the last one wrote)
//! and a changed secret (every key differs) need no special case: what differs is rewritten.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use bulkhead_ruleset::RuleSet;

use crate::{
    fqdn::{Expired, FqdnError, NameKey},
    loader::Dataplane,
};

/// The agent's own settings for learning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FqdnSettings {
    /// Resolvers trusted besides the rule set's (node-local caches such as 169.254.20.10).
    pub extra_resolvers: Vec<IpAddr>,
    /// A learned address lives at least this long, whatever the record's TTL.
    pub min_ttl: Duration,
    /// ... and at most this long.
    pub max_ttl: Duration,
}

impl Default for FqdnSettings {
    fn default() -> Self {
        FqdnSettings {
            extra_resolvers: Vec::new(),
            min_ttl: Duration::from_secs(bulkhead_common::fqdn::FQDN_DEFAULT_MIN_TTL_S.into()),
            max_ttl: Duration::from_secs(bulkhead_common::fqdn::FQDN_DEFAULT_MAX_TTL_S.into()),
        }
    }
}

/// What to change in the name maps.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NamePlan {
    /// Keys to write (missing, or under another name id).
    pub write: Vec<(NameKey, u32)>,
    /// Keys no wanted name has.
    pub remove: Vec<NameKey>,
    /// Name ids the kernel had and the rule set no longer has: what was learned for them is
    /// forgotten.
    pub forget: BTreeSet<u32>,
}

impl NamePlan {
    pub fn is_empty(&self) -> bool {
        self.write.is_empty() && self.remove.is_empty() && self.forget.is_empty()
    }
}

/// The changes that turn the kernel's name keys into the wanted ones.
pub fn plan_names(kernel: &BTreeMap<NameKey, u32>, wanted: &BTreeMap<NameKey, u32>) -> NamePlan {
    let write = wanted
        .iter()
        .filter(|(k, id)| kernel.get(k) != Some(id))
        .map(|(k, id)| (*k, *id))
        .collect();
    let remove = kernel
        .keys()
        .filter(|k| !wanted.contains_key(k))
        .copied()
        .collect();
    let wanted_ids: BTreeSet<u32> = wanted.values().copied().collect();
    let forget = kernel
        .values()
        .filter(|id| !wanted_ids.contains(id))
        .copied()
        .collect();
    NamePlan {
        write,
        remove,
        forget,
    }
}

/// What to change in the trusted resolvers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ResolverPlan {
    pub add: Vec<IpAddr>,
    pub remove: Vec<IpAddr>,
}

/// The resolvers to trust: the rule set's and the agent's own, IPv4-mapped IPv6 addresses
/// written as IPv4 (as the kernel's keys read back).
pub fn wanted_resolvers(rs: &RuleSet, extra: &[IpAddr]) -> BTreeSet<IpAddr> {
    rs.dns_resolvers
        .iter()
        .chain(extra)
        .map(|a| a.to_canonical())
        .collect()
}

pub fn plan_resolvers(kernel: &[IpAddr], wanted: &BTreeSet<IpAddr>) -> ResolverPlan {
    let have: BTreeSet<IpAddr> = kernel.iter().map(|a| a.to_canonical()).collect();
    ResolverPlan {
        add: wanted.difference(&have).copied().collect(),
        remove: have.difference(wanted).copied().collect(),
    }
}

/// What one sync changed, and what the kernel holds after it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NameSyncReport {
    pub names_written: usize,
    pub names_removed: usize,
    /// Learned (address, name) slots cleared for removed names or endpoints.
    pub learned_forgotten: usize,
    pub resolvers_added: usize,
    pub resolvers_removed: usize,
    /// Names in the kernel after the sync.
    pub names: usize,
    /// Trusted resolvers after the sync.
    pub resolvers: usize,
}

/// What a sweep cleared, and what is left.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    pub expired: Vec<Expired>,
    pub learned_v4: usize,
    pub learned_v6: usize,
}

/// Keeps the kernel's name state in step with the rule sets (owned by the data-plane thread).
#[derive(Debug)]
pub struct NameSync {
    settings: FqdnSettings,
    /// Endpoint ids of the last rule set synced; `None` until the first (what an earlier agent
    /// left is checked then).
    endpoints: Option<BTreeSet<u32>>,
}

impl NameSync {
    /// Turns learning on: keeps the secret an earlier agent drew (it is in the pinned
    /// configuration, and the pinned name keys were hashed with it), writes the TTL bounds.
    pub fn start(dp: &mut Dataplane, settings: FqdnSettings) -> Result<NameSync, FqdnError> {
        let secs = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX).max(1);
        dp.ensure_fqdn_config(secs(settings.min_ttl), secs(settings.max_ttl))?;
        Ok(NameSync {
            settings,
            endpoints: None,
        })
    }

    /// Makes the kernel's names and resolvers those of `rs` (plus the agent's resolvers), and
    /// forgets what was learned for names or endpoints `rs` no longer has. Idempotent.
    pub fn sync(&mut self, dp: &mut Dataplane, rs: &RuleSet) -> Result<NameSyncReport, FqdnError> {
        let mut report = NameSyncReport::default();
        let mut wanted = BTreeMap::new();
        for n in &rs.names {
            wanted.insert(dp.fqdn_name_key(&n.pattern)?, n.identity);
        }
        let kernel: BTreeMap<NameKey, u32> = dp.fqdn_name_keys()?.into_iter().collect();
        let plan = plan_names(&kernel, &wanted);
        // New names first, so that no moment has fewer names than both rule sets agree on.
        for (key, id) in &plan.write {
            dp.set_fqdn_name_key(*key, *id)?;
        }
        for key in &plan.remove {
            dp.remove_fqdn_name_key(*key)?;
        }
        report.names_written = plan.write.len();
        report.names_removed = plan.remove.len();
        report.names = wanted.len();

        let endpoints: BTreeSet<u32> = rs.endpoints.iter().map(|e| e.id).collect();
        let endpoints_gone = match &self.endpoints {
            Some(before) => before.difference(&endpoints).next().is_some(),
            None => true,
        };
        if !plan.forget.is_empty() || endpoints_gone {
            let ids: BTreeSet<u32> = wanted.values().copied().collect();
            report.learned_forgotten = dp.forget_learned(|endpoint, id| {
                endpoints.contains(&endpoint) && ids.contains(&id)
            })?;
        }
        self.endpoints = Some(endpoints);

        let want = wanted_resolvers(rs, &self.settings.extra_resolvers);
        let plan = plan_resolvers(&dp.trusted_resolvers()?, &want);
        for a in &plan.add {
            dp.add_trusted_resolver(*a)?;
        }
        for a in &plan.remove {
            dp.remove_trusted_resolver(*a)?;
        }
        report.resolvers_added = plan.add.len();
        report.resolvers_removed = plan.remove.len();
        report.resolvers = want.len();
        Ok(report)
    }

    /// Clears what expired by `now_ns` (CLOCK_MONOTONIC, [`crate::fqdn::monotonic_now_ns`]).
    pub fn sweep(&mut self, dp: &mut Dataplane, now_ns: u64) -> Result<SweepReport, FqdnError> {
        let expired = dp.expire_learned(now_ns)?;
        let (learned_v4, learned_v6) = dp.learned_counts()?;
        Ok(SweepReport {
            expired,
            learned_v4,
            learned_v6,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fqdn::NameTable;

    fn key(table: NameTable, hash: u64) -> NameKey {
        NameKey { table, hash }
    }

    #[test]
    fn names_are_written_removed_and_forgotten_by_difference() {
        let a = key(NameTable::Exact, 1);
        let b = key(NameTable::Wildcard, 2);
        let c = key(NameTable::Exact, 3);
        let kernel: BTreeMap<NameKey, u32> = [(a, 10), (b, 20)].into();
        let wanted: BTreeMap<NameKey, u32> = [(a, 10), (c, 30)].into();
        let plan = plan_names(&kernel, &wanted);
        assert_eq!(plan.write, vec![(c, 30)]);
        assert_eq!(plan.remove, vec![b]);
        assert_eq!(plan.forget, [20].into());
        // Applied, nothing is left to do.
        assert!(plan_names(&wanted, &wanted).is_empty());
    }

    #[test]
    fn a_name_under_another_id_is_rewritten_and_the_old_id_forgotten() {
        let a = key(NameTable::Exact, 1);
        let plan = plan_names(&[(a, 10)].into(), &[(a, 11)].into());
        assert_eq!(plan.write, vec![(a, 11)]);
        assert!(plan.remove.is_empty());
        assert_eq!(plan.forget, [10].into());
    }

    /// A new secret changes every key: everything is rewritten, nothing learned is forgotten
    /// for names that stay (their ids do not change).
    #[test]
    fn a_new_secret_rewrites_every_name() {
        let old: BTreeMap<NameKey, u32> = [
            (key(NameTable::Exact, 1), 10),
            (key(NameTable::Wildcard, 2), 20),
        ]
        .into();
        let new: BTreeMap<NameKey, u32> = [
            (key(NameTable::Exact, 7), 10),
            (key(NameTable::Wildcard, 8), 20),
        ]
        .into();
        let plan = plan_names(&old, &new);
        assert_eq!(plan.write.len(), 2);
        assert_eq!(plan.remove.len(), 2);
        assert!(plan.forget.is_empty());
    }

    #[test]
    fn the_same_wildcard_and_exact_hash_are_different_keys() {
        let kernel: BTreeMap<NameKey, u32> = [(key(NameTable::Exact, 5), 10)].into();
        let wanted: BTreeMap<NameKey, u32> = [(key(NameTable::Wildcard, 5), 10)].into();
        let plan = plan_names(&kernel, &wanted);
        assert_eq!(plan.write, vec![(key(NameTable::Wildcard, 5), 10)]);
        assert_eq!(plan.remove, vec![key(NameTable::Exact, 5)]);
    }

    #[test]
    fn resolvers_are_the_rule_sets_and_the_agents() {
        let a = |s: &str| -> IpAddr { s.parse().expect("address") };
        let rs = RuleSet {
            dns_resolvers: vec![a("10.240.1.10"), a("fd00:240::1:a")],
            ..RuleSet::default()
        };
        // An IPv4-mapped flag value is the IPv4 address the kernel's key reads back as.
        let want = wanted_resolvers(&rs, &[a("::ffff:169.254.20.10"), a("10.240.1.10")]);
        assert_eq!(
            want,
            [a("10.240.1.10"), a("169.254.20.10"), a("fd00:240::1:a")].into()
        );
        let plan = plan_resolvers(&[a("10.240.1.10"), a("10.96.0.10")], &want);
        assert_eq!(plan.add, vec![a("169.254.20.10"), a("fd00:240::1:a")]);
        assert_eq!(plan.remove, vec![a("10.96.0.10")]);
        let after: Vec<IpAddr> = want.iter().copied().collect();
        assert_eq!(plan_resolvers(&after, &want), ResolverPlan::default());
    }
}
