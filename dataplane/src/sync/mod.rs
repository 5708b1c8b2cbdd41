//! Writes a node's [`RuleSet`] into the kernel maps.
//!
//! Policy keys are written once per policy group, under a policy id of the group's; every
//! endpoint of the group names that id in its `ENDPOINTS` value. A changed group is switched the
//! way a single endpoint used to be: its new keys are written under a fresh policy id, then each
//! endpoint's `ENDPOINTS` value is replaced in one map update (it names the policy id and carries
//! the defaults and flags), and only when no endpoint names the old id any more are the old keys
//! removed. A packet sees either the old policy or the new one, never a mix. Unchanged groups and
//! endpoints are not rewritten.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use bulkhead_common::{
    Config, DENSE_V4_SLOTS, DIR_EGRESS, DIR_INGRESS, EndpointAddrKey, EndpointInfo,
    IPCACHE_QUARANTINED, IpCacheValue, PolicyKey, PolicySummary, PolicyValue, PrefilterKey,
    PrefilterValue, QuarantineAllowKey, VERDICT_DENY, endpoint_flags,
};
use bulkhead_ruleset::{Endpoint, EndpointPolicy, PolicyGroupId, RuleSet, identity};
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

mod maps;
mod peers;
#[cfg(test)]
mod tests;

/// The maps the enforcer writes, typed (also for the kernel tests and benchmarks).
pub use maps::{
    ENDPOINT_ADDRS, HashTable, IPCACHE_HOST_V4, IPCACHE_HOST_V6, IPCACHE_V4, IPCACHE_V6, Maps,
    POLICY_EXACT, POLICY_RANGES, POLICY_SUMMARY, PREFILTER_DENY, PartialWrite, QUARANTINE_ALLOW,
    RANK_EXACT, RANK_RANGES, RANK_SUMMARY, Table, Trie, TrieTable,
};

pub use crate::resolve::{InterfaceResolver, RouteResolver};
use crate::{
    loader::{Dataplane, LoadError},
    policy_map::{
        ALL_POLICY_PROTOCOLS, PolicyMapEntry, PolicyTables, RankTables, compile_policy,
        compile_ranks, default_value, policy_tables,
    },
};

/// `::ffff:a.b.c.d` for IPv4, the address itself for IPv6: the form addresses take in keys.
pub fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
}

/// What one apply did.
#[derive(Debug, Clone, Default)]
pub struct ApplyReport {
    pub version: u64,
    /// Endpoints whose `ENDPOINTS` value was (re)written.
    pub endpoints_written: usize,
    pub endpoints_removed: usize,
    /// Policy groups whose keys were (re)written.
    pub groups_written: usize,
    /// Endpoints whose interface does not exist (yet): retried on the next apply.
    pub missing_interfaces: Vec<String>,
    /// Endpoints locked down (deny all): their group's policy did not fit in the maps, or the
    /// rule set lacks their group.
    pub locked_down: Vec<String>,
    pub policy_entries_written: usize,
    /// (local address, peer identity) pairs the XDP prefilter drops.
    pub prefilter_pairs: usize,
    /// Tracked connections cut because their endpoint became quarantined.
    pub connections_cut: usize,
    pub duration: Duration,
}

#[derive(Debug, Clone, PartialEq)]
struct EndpointState {
    ifname: String,
    endpoint_id: u32,
    info: EndpointInfo,
    addrs: Vec<[u8; 16]>,
}

#[derive(Debug, Clone, PartialEq)]
struct GroupState {
    policy_id: u32,
    /// The keys written under `policy_id`.
    tables: PolicyTables,
    /// The compiled content under policy id 0, to skip rewriting an unchanged group: the
    /// verdicts, and the ranks (two name policies can resolve to the same verdicts per key and
    /// still combine differently, e.g. a name's Accept at another priority).
    fingerprint: Vec<PolicyMapEntry>,
    rank_fingerprint: RankTables,
    default_ingress: PolicyValue,
    default_egress: PolicyValue,
    /// The keys did not fit: every endpoint of the group is locked down, and the next apply
    /// tries again.
    locked: bool,
    /// (peer identity, deciding rule) of the peers this policy denies outright (see
    /// [`denied_peers`]), computed once when the keys are written: the XDP/TC prefilter's
    /// pairs for each endpoint of the group.
    denied: Vec<(u32, u32)>,
}

/// Keeps the kernel's maps equal to the last rule set applied, through [`Maps`] (the pinned
/// [`Dataplane`] in the agent, an in-memory stand-in in the unit tests).
pub struct Enforcer<M: Maps = Dataplane> {
    dataplane: M,
    /// By ifindex.
    endpoints: HashMap<u32, EndpointState>,
    groups: HashMap<PolicyGroupId, GroupState>,
    /// Keys of replaced or dropped groups: removed once no endpoint names their policy id.
    retired: Vec<(u32, PolicyTables)>,
    ipcache: BTreeMap<IpNetwork, IpCacheValue>,
    quarantine_allow: BTreeSet<QuarantineAllowKey>,
    prefilter: BTreeMap<PrefilterKey, PrefilterValue>,
    /// The prefilter map was full once: said once, not on every apply.
    prefilter_full_logged: bool,
    next_policy_id: u32,
    generation: u32,
    realized_version: Option<u64>,
    /// First address of the IPv4 window whose single addresses are in `IPCACHE_DENSE_V4`
    /// (mirrors `Config::dense_v4_base` / `dense_v4_slots`).
    dense_window: Option<u32>,
}

/// Removes the keys of `table` that `doomed` picks; returns how many.
fn remove_keys_where<M: Maps, K: aya::Pod, V: aya::Pod>(
    maps: &mut M,
    table: HashTable<K, V>,
    doomed: impl Fn(&K) -> bool,
) -> Result<usize, SyncError> {
    let keys: Vec<K> = maps
        .entries(table)?
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| doomed(k))
        .collect();
    maps.remove_all(table, &keys);
    Ok(keys.len())
}

/// [`remove_keys_where`] for an LPM trie (`doomed` gets the prefix length and the key).
fn remove_trie_keys_where<M: Maps, K: aya::Pod, V: aya::Pod>(
    maps: &mut M,
    trie: TrieTable<K, V>,
    doomed: impl Fn(u32, &K) -> bool,
) -> Result<(), SyncError> {
    let keys: Vec<(u32, K)> = maps
        .trie_keys(trie)?
        .into_iter()
        .filter(|(len, k)| doomed(*len, k))
        .collect();
    maps.trie_remove_all(trie, &keys);
    Ok(())
}

/// Sorts (prefix, value) pairs by prefix; of a prefix listed more than once, the last counts
/// (as a map built from the list would keep it).
fn sort_last_wins(entries: &mut Vec<(IpNetwork, IpCacheValue)>) {
    if entries.is_sorted_by(|a, b| a.0 < b.0) {
        return;
    }
    // Stable: equal prefixes keep their order, and the last of each run is kept.
    entries.sort_by_key(|(net, _)| *net);
    let mut out: Vec<(IpNetwork, IpCacheValue)> = Vec::with_capacity(entries.len());
    for (net, value) in entries.drain(..) {
        match out.last_mut() {
            Some(last) if last.0 == net => last.1 = value,
            _ => out.push((net, value)),
        }
    }
    *entries = out;
}

/// What to write to make `have` hold exactly `wanted` (sorted by prefix, no prefix twice):
/// additions and changes, then removals (`None`), in one walk of both.
type IpcacheChanges = Vec<(IpNetwork, Option<IpCacheValue>)>;
fn diff_sorted(
    wanted: &[(IpNetwork, IpCacheValue)],
    have: &BTreeMap<IpNetwork, IpCacheValue>,
) -> (IpcacheChanges, IpcacheChanges) {
    let (mut changed, mut stale) = (Vec::new(), Vec::new());
    let mut have = have.iter().peekable();
    for (net, value) in wanted {
        while let Some((h, _)) = have.next_if(|(h, _)| *h < net) {
            stale.push((*h, None));
        }
        match have.next_if(|(h, _)| *h == net) {
            Some((_, v)) if v == value => {}
            _ => changed.push((*net, Some(*value))),
        }
    }
    stale.extend(have.map(|(h, _)| (*h, None)));
    (changed, stale)
}

/// The keys of (key, value) entries.
fn keys_of<K: Copy, V>(entries: &[(K, V)]) -> Vec<K> {
    entries.iter().map(|(k, _)| *k).collect()
}

fn prefix_key(net: &IpNetwork) -> (bool, u32) {
    (net.is_ipv4(), net.prefix() as u32)
}

/// An endpoint of the rule set whose interface was found.
struct Placed<'a> {
    endpoint: &'a Endpoint,
    ifname: String,
    index: u32,
}

impl<M: Maps> Enforcer<M> {
    /// Takes over a loaded data plane. Keys left by an earlier agent are found in the pinned
    /// maps and cleaned up after the first apply; until then they keep enforcing. Fresh policy
    /// ids start above every id found in `ENDPOINTS` or the policy maps, so new keys never mix
    /// with leftovers.
    pub fn new(mut dataplane: M) -> Result<Self, SyncError> {
        let mut max_policy_id = 0;
        for (_, info) in dataplane.endpoint_list()? {
            max_policy_id = max_policy_id.max(info.policy_id);
        }
        for (_, key) in dataplane.trie_keys(POLICY_RANGES)? {
            max_policy_id = max_policy_id.max(key.policy_id);
        }
        for (key, _) in dataplane.entries(POLICY_SUMMARY)? {
            max_policy_id = max_policy_id.max(key.policy_id);
        }
        for (key, _) in dataplane.entries(POLICY_EXACT)? {
            max_policy_id = max_policy_id.max(key.policy_id);
        }
        for (key, _) in dataplane.entries(RANK_SUMMARY)? {
            max_policy_id = max_policy_id.max(key.policy_id);
        }
        let config = dataplane.config()?;
        let generation = config.generation;
        // An earlier agent's window stays in use (its slots keep enforcing) until this one
        // decides otherwise.
        let dense_window =
            (config.dense_v4_slots == DENSE_V4_SLOTS).then_some(config.dense_v4_base);
        Ok(Enforcer {
            dataplane,
            endpoints: HashMap::new(),
            groups: HashMap::new(),
            retired: Vec::new(),
            ipcache: BTreeMap::new(),
            quarantine_allow: BTreeSet::new(),
            prefilter: BTreeMap::new(),
            prefilter_full_logged: false,
            next_policy_id: max_policy_id.wrapping_add(1).max(1),
            generation,
            realized_version: None,
            dense_window,
        })
    }

    pub fn dataplane(&mut self) -> &mut M {
        &mut self.dataplane
    }

    /// Policy keys this agent has in the policy maps (summary, exact and range keys).
    pub fn policy_key_count(&self) -> usize {
        self.groups.values().map(|g| g.tables.len()).sum::<usize>()
            + self.retired.iter().map(|(_, t)| t.len()).sum::<usize>()
    }

    /// Policy groups whose keys are in the policy maps.
    pub fn policy_group_count(&self) -> usize {
        self.groups.len()
    }

    pub fn realized_version(&self) -> Option<u64> {
        self.realized_version
    }

    /// Applies `ruleset`: ipcache, policy groups, endpoints, then bumps the policy generation so
    /// tracked connections are re-checked against the new policy.
    pub fn apply(
        &mut self,
        ruleset: &RuleSet,
        resolver: &dyn InterfaceResolver,
    ) -> Result<ApplyReport, SyncError> {
        let started = Instant::now();
        let first_apply = self.realized_version.is_none();
        let mut report = ApplyReport {
            version: ruleset.version,
            ..Default::default()
        };

        // 1. ipcache additions and changes first: new endpoints' peers must resolve.
        let quarantined: BTreeSet<IpAddr> = ruleset
            .endpoints
            .iter()
            .filter(|e| e.quarantined)
            .flat_map(|e| e.ips.iter().copied())
            .collect();
        let mut wanted: Vec<(IpNetwork, IpCacheValue)> = ruleset
            .ipcache
            .iter()
            .map(|entry| {
                // Quarantined pods anywhere in the cluster (the controller flags them in every
                // node's ipcache) and local quarantined endpoints: the XDP prefilter drops
                // their traffic on arrival.
                let q = entry.quarantined
                    || (entry.cidr.prefix() == if entry.cidr.is_ipv4() { 32 } else { 128 }
                        && quarantined.contains(&entry.cidr.ip()));
                let value = IpCacheValue {
                    identity: entry.identity,
                    flags: if q { IPCACHE_QUARANTINED } else { 0 },
                };
                (entry.cidr, value)
            })
            .collect();
        // The controller sends the ipcache sorted by prefix: sorting it again is one pass.
        sort_last_wins(&mut wanted);
        // One walk beside the entries in the maps: only what differs is written, whatever
        // the ipcache's size (a one-pod change on a node with 100k remote peers).
        let (changed, stale) = diff_sorted(&wanted, &self.ipcache);
        self.write_ipcache(changed)?;
        if first_apply {
            self.clear_ipcache_leftovers(&wanted)?;
        }
        self.place_dense_window()?;
        // The quarantines' exceptions, so the prefilter spares the forensic path.
        let allow: BTreeSet<QuarantineAllowKey> = ruleset
            .ipcache
            .iter()
            .filter(|e| e.quarantined && e.cidr.prefix() == if e.cidr.is_ipv4() { 32 } else { 128 })
            .flat_map(|e| {
                let addr = addr16(e.cidr.ip());
                e.quarantine_allow
                    .iter()
                    .map(move |identity| QuarantineAllowKey {
                        addr,
                        identity: *identity,
                    })
            })
            .collect();
        self.write_quarantine_allow(&allow, first_apply)?;

        // 2. endpoints whose interface exists.
        let mut placed: Vec<Placed<'_>> = Vec::with_capacity(ruleset.endpoints.len());
        for ep in &ruleset.endpoints {
            // An endpoint already enforced on an interface that still exists under the same
            // index stays there (unless the rule set names another): no lookup per apply. An
            // interface that goes away or comes back under a new index is seen by
            // `interfaces_changed`, and the apply that follows looks the endpoint up again.
            let known = match &ep.interface {
                Some(named) => Some(named.clone()),
                None => self.still_enforced_on(ep),
            };
            let Some(ifname) = known.or_else(|| resolver.interface(ep)) else {
                report.missing_interfaces.push(ep.name());
                continue;
            };
            let Some(index) = self.dataplane.ifindex(&ifname) else {
                report
                    .missing_interfaces
                    .push(format!("{} ({ifname})", ep.name()));
                continue;
            };
            placed.push(Placed {
                endpoint: ep,
                ifname,
                index,
            });
        }

        // 3. the groups those endpoints use, each written once, under a fresh policy id when
        //    its content changed.
        //    A group the rule set lacks is not kept from an earlier apply: its endpoints are
        //    locked down.
        let used: BTreeSet<PolicyGroupId> = placed
            .iter()
            .map(|p| p.endpoint.policy)
            .filter(|g| ruleset.policies.contains_key(g))
            .collect();
        for group in &used {
            if let Some(policy) = ruleset.policies.get(group) {
                self.write_group(*group, policy, &mut report)?;
            }
        }
        for p in &placed {
            if !used.contains(&p.endpoint.policy)
                && let Some(old) = self.groups.remove(&p.endpoint.policy)
            {
                self.retired.push((old.policy_id, old.tables));
            }
        }

        // After a restart: IPv4 connections an older agent tracked under 40-byte keys are
        // copied to where the new programs look, before the new programs replace the old.
        if first_apply {
            self.dataplane.copy_ipv4_connections()?;
        }

        // 4. endpoints, each switched to its group's keys in one ENDPOINTS update.
        let mut to_attach: Vec<(u32, String, String)> = Vec::new();
        let mut seen: BTreeSet<u32> = BTreeSet::new();
        let mut newly_quarantined: Vec<u32> = Vec::new();
        for p in &placed {
            seen.insert(p.index);
            let ep = p.endpoint;
            let was_quarantined = self
                .endpoints
                .get(&p.index)
                .is_some_and(|s| s.info.flags & endpoint_flags::QUARANTINED != 0);
            if ep.quarantined && !was_quarantined {
                newly_quarantined.push(ep.id);
            }
            let group = self.groups.get(&ep.policy);
            if group.is_none() {
                tracing::error!(
                    endpoint = %ep.name(), group = ep.policy,
                    "the rule set has no policy group {} for the endpoint: locking it down (deny all)",
                    ep.policy
                );
            }
            if group.is_none_or(|g| g.locked) {
                report.locked_down.push(ep.name());
            }
            if let Some(attach) =
                self.write_endpoint(p.index, &p.ifname, ep, ruleset.policy_of(ep))?
            {
                report.endpoints_written += 1;
                if attach {
                    to_attach.push((p.index, p.ifname.clone(), ep.name()));
                }
            }
        }
        // Programs on the interfaces that have none of ours yet (their endpoints are written:
        // the programs know them from the first packet). An interface that cannot be attached
        // (it went away meanwhile) counts as missing and is retried; the others go on.
        for (index, ifname, name) in &to_attach {
            if let Err(error) = self.dataplane.attach(ifname) {
                tracing::warn!(endpoint = %name, interface = %ifname, error = %error, "could not attach; will retry");
                self.remove_endpoint(*index)?;
                report.endpoints_written -= 1;
                report.missing_interfaces.push(format!("{name} ({ifname})"));
            }
        }

        // A quarantined endpoint's tracked connections are cut at once, in both directions:
        // they become tombstones of this rule set's generation, which drop both sides' packets
        // and which neither side's later packets re-open (a new TCP SYN is judged as new; the
        // quarantine denies it). Released later, the pod's old connections stay cut.
        if !newly_quarantined.is_empty() {
            let generation = self.generation.wrapping_add(1);
            report.connections_cut += self.cut_connections(&newly_quarantined, generation)?;
        }

        // The XDP prefilter's pairs follow the endpoints just written.
        report.prefilter_pairs = self.write_prefilter(&placed, first_apply)?;

        // 5. endpoints that left the node (or whose interface went away).
        let gone: Vec<u32> = self
            .endpoints
            .keys()
            .filter(|i| !seen.contains(i))
            .copied()
            .collect();
        for index in gone {
            self.remove_endpoint(index)?;
            report.endpoints_removed += 1;
        }

        // 6. groups no endpoint uses any more, then every key set no endpoint names.
        let unused: Vec<PolicyGroupId> = self
            .groups
            .keys()
            .filter(|g| !used.contains(g))
            .copied()
            .collect();
        for g in unused {
            if let Some(old) = self.groups.remove(&g) {
                self.retired.push((old.policy_id, old.tables));
            }
        }
        self.remove_retired_keys()?;

        // 7. stale ipcache entries.
        self.write_ipcache(stale)?;

        if first_apply {
            self.remove_foreign_state(&seen)?;
            // The new programs are attached: the IPv4 connections of the 40-byte map leave it
            // (those the old programs opened since the copy are copied first).
            let moved = self.dataplane.move_ipv4_connections()?;
            if moved > 0 {
                tracing::info!(moved, "moved IPv4 connections to CONNTRACK_V4");
            }
        }

        // 8. tracked connections are re-checked on their next packet (either side).
        self.generation = self.generation.wrapping_add(1);
        let generation = self.generation;
        self.update_config(|c| c.generation = generation)?;

        self.realized_version = Some(ruleset.version);
        report.duration = started.elapsed();
        Ok(report)
    }

    /// Whether the interface of an enforced endpoint went away, or was created again under a
    /// new index (a pod's sandbox recreated), since the last apply: applying the rule set
    /// again attaches the new interface and drops the old one.
    pub fn interfaces_changed(&self) -> bool {
        self.endpoints
            .iter()
            .any(|(index, s)| self.dataplane.ifindex(&s.ifname) != Some(*index))
    }

    /// The interface `endpoint` is enforced on, if that interface still exists under the same
    /// index. Also when a lookup would have no answer (a bridge whose forwarding entry for the
    /// pod aged out): enforcement is not dropped for want of an answer. An interface that went
    /// away is not kept.
    fn still_enforced_on(&self, endpoint: &Endpoint) -> Option<String> {
        let first = addr16(*endpoint.ips.first()?);
        let (index, state) = self
            .endpoints
            .iter()
            .find(|(_, s)| s.endpoint_id == endpoint.id && s.addrs.contains(&first))?;
        (self.dataplane.ifindex(&state.ifname) == Some(*index)).then(|| state.ifname.clone())
    }

    /// Read-modify-write of the global configuration.
    fn update_config(&mut self, f: impl FnOnce(&mut Config)) -> Result<(), SyncError> {
        let mut c = self.dataplane.config()?;
        f(&mut c);
        self.dataplane.set_config(c)
    }

    /// Writes `policy`'s keys under a fresh policy id unless the group already has exactly these
    /// keys. The old keys are retired, not removed: endpoints still name them until switched.
    fn write_group(
        &mut self,
        group: PolicyGroupId,
        policy: &EndpointPolicy,
        report: &mut ApplyReport,
    ) -> Result<(), SyncError> {
        let fingerprint = compile_policy(0, policy);
        let rank_fingerprint = compile_ranks(0, policy);
        let (default_ingress, default_egress) = (
            default_value(&policy.ingress),
            default_value(&policy.egress),
        );
        // Same keys is not enough: isolation alone (no keys at all) changes the defaults.
        if let Some(old) = self.groups.get(&group)
            && !old.locked
            && old.fingerprint == fingerprint
            && old.rank_fingerprint == rank_fingerprint
            && old.default_ingress == default_ingress
            && old.default_egress == default_egress
        {
            return Ok(());
        }
        let policy_id = self.next_policy_id;
        self.next_policy_id = self.next_policy_id.wrapping_add(1).max(1);
        let with_id: Vec<PolicyMapEntry> = fingerprint
            .iter()
            .map(|e| PolicyMapEntry {
                key: PolicyKey { policy_id, ..e.key },
                ..*e
            })
            .collect();
        let mut tables = policy_tables(&with_id, (default_ingress, default_egress));
        tables.ranks = rank_fingerprint.with_policy_id(policy_id);
        let mut locked = false;
        if let Err(err) = self.write_tables(&tables) {
            tracing::error!(
                group, error = %err,
                "policy map is full: locking the group's endpoints down (deny all) until its policy fits"
            );
            // Deny-all needs no keys: free the space for groups that fit.
            self.remove_keys(&tables)?;
            tables = PolicyTables::default();
            locked = true;
        }
        report.groups_written += 1;
        report.policy_entries_written += tables.len();
        let denied = denied_peers(&tables, (default_ingress, default_egress));
        let state = GroupState {
            denied,
            policy_id,
            tables,
            fingerprint,
            rank_fingerprint,
            default_ingress,
            default_egress,
            locked,
        };
        if let Some(old) = self.groups.insert(group, state) {
            self.retired.push((old.policy_id, old.tables));
        }
        Ok(())
    }

    /// Writes a group's keys: ranges and exact ports first, summaries (which say that those
    /// exist) last; the rank keys in the same order, before the verdict keys. Nothing names the
    /// policy id yet, so no packet sees them half-written (an endpoint's `HAS_NAMES` flag comes
    /// with the switch to the policy id, in the same `ENDPOINTS` update).
    fn write_tables(&mut self, tables: &PolicyTables) -> Result<(), SyncError> {
        let ranks = &tables.ranks;
        self.dataplane.trie_insert_all(RANK_RANGES, &ranks.ranges)?;
        self.dataplane.insert_all(RANK_EXACT, &ranks.exact)?;
        self.dataplane.insert_all(RANK_SUMMARY, &ranks.summaries)?;
        self.dataplane
            .trie_insert_all(POLICY_RANGES, &tables.ranges)?;
        self.dataplane.insert_all(POLICY_EXACT, &tables.exact)?;
        self.dataplane
            .insert_all(POLICY_SUMMARY, &tables.summaries)?;
        Ok(())
    }

    /// The ENDPOINTS value an endpoint gets: its group's policy id and defaults, locked down
    /// when the group is missing (then `policy` is the rule set's deny-all stand-in) or did not
    /// fit.
    fn endpoint_info(&self, ep: &Endpoint, policy: &EndpointPolicy) -> EndpointInfo {
        let mut flags = endpoint_flags::ENFORCE_INGRESS
            | endpoint_flags::ENFORCE_EGRESS
            | endpoint_flags::ANTI_SPOOF;
        if ep.quarantined {
            flags |= endpoint_flags::QUARANTINED;
        }
        let (policy_id, default_ingress, default_egress) = match self.groups.get(&ep.policy) {
            Some(g) => {
                if g.locked {
                    flags |= endpoint_flags::LOCKDOWN;
                }
                if !g.tables.ranks.is_empty() {
                    flags |= endpoint_flags::HAS_NAMES;
                }
                (g.policy_id, g.default_ingress, g.default_egress)
            }
            None => {
                flags |= endpoint_flags::LOCKDOWN;
                (
                    0,
                    default_value(&policy.ingress),
                    default_value(&policy.egress),
                )
            }
        };
        // The first two addresses travel inline for anti-spoofing; more are looked up.
        let addrs: Vec<[u8; 16]> = ep.ips.iter().map(|ip| addr16(*ip)).collect();
        let mut inline = [[0u8; 16]; 2];
        if let Some(first) = addrs.first() {
            flags |= endpoint_flags::INLINE_ADDRS;
            inline = [*first, *addrs.get(1).unwrap_or(first)];
        }
        if addrs.len() > 2 {
            flags |= endpoint_flags::MORE_ADDRS;
        }
        EndpointInfo {
            endpoint_id: ep.id,
            identity: ep.identity,
            policy_id,
            flags,
            default_ingress,
            default_egress,
            addrs: inline,
        }
    }

    /// Points the endpoint at its group's current keys. Returns None when nothing needed
    /// writing, else whether the interface still needs the programs attached (the caller
    /// attaches them, with the other new interfaces).
    fn write_endpoint(
        &mut self,
        index: u32,
        ifname: &str,
        ep: &Endpoint,
        policy: &EndpointPolicy,
    ) -> Result<Option<bool>, SyncError> {
        let info = self.endpoint_info(ep, policy);
        let addrs: Vec<[u8; 16]> = ep.ips.iter().map(|ip| addr16(*ip)).collect();
        if let Some(old) = self.endpoints.get(&index)
            && old.info == info
            && old.addrs == addrs
            && old.ifname == ifname
        {
            return Ok(None);
        }

        // Addresses the endpoint may send from.
        for a in &addrs {
            let key = EndpointAddrKey {
                endpoint_id: ep.id,
                addr: *a,
            };
            self.dataplane.insert(ENDPOINT_ADDRS, &key, &1)?;
        }

        // The switch.
        self.dataplane.set_endpoint(index, info)?;
        let old = self.endpoints.remove(&index);
        let needs_attach = old.as_ref().is_none_or(|o| o.ifname != ifname);

        // Addresses it no longer has go last (its old keys go with their group).
        if let Some(old) = old {
            for a in old
                .addrs
                .iter()
                .filter(|a| old.endpoint_id != ep.id || !addrs.contains(a))
            {
                let key = EndpointAddrKey {
                    endpoint_id: old.endpoint_id,
                    addr: *a,
                };
                self.dataplane.remove(ENDPOINT_ADDRS, &key);
            }
        }
        self.endpoints.insert(
            index,
            EndpointState {
                ifname: ifname.to_string(),
                endpoint_id: ep.id,
                info,
                addrs,
            },
        );
        Ok(Some(needs_attach))
    }

    /// Revokes every live conntrack entry of these endpoints (IPv4 and IPv6) as of
    /// `generation`; returns how many there were.
    fn cut_connections(
        &mut self,
        endpoint_ids: &[u32],
        generation: u32,
    ) -> Result<usize, SyncError> {
        self.dataplane.revoke_connections(endpoint_ids, generation)
    }

    /// Removes the retired key sets whose policy id no endpoint names any more.
    fn remove_retired_keys(&mut self) -> Result<(), SyncError> {
        let named: BTreeSet<u32> = self.endpoints.values().map(|e| e.info.policy_id).collect();
        let (done, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retired)
            .into_iter()
            .partition(|(id, _)| !named.contains(id));
        self.retired = keep;
        for (_, tables) in done {
            self.remove_keys(&tables)?;
        }
        Ok(())
    }

    /// Removes a group's keys, summaries first (so the finer keys are never consulted without
    /// them), then exact ports and ranges. Missing keys (a write that failed half-way) are fine.
    fn remove_keys(&mut self, tables: &PolicyTables) -> Result<(), SyncError> {
        self.dataplane
            .remove_all(POLICY_SUMMARY, &keys_of(&tables.summaries));
        self.dataplane
            .remove_all(POLICY_EXACT, &keys_of(&tables.exact));
        let ranges: Vec<(u32, PolicyKey)> =
            tables.ranges.iter().map(|(l, k, _)| (*l, *k)).collect();
        self.dataplane.trie_remove_all(POLICY_RANGES, &ranges);
        let ranks = &tables.ranks;
        self.dataplane
            .remove_all(RANK_SUMMARY, &keys_of(&ranks.summaries));
        self.dataplane
            .remove_all(RANK_EXACT, &keys_of(&ranks.exact));
        let ranges: Vec<(u32, PolicyKey)> = ranks.ranges.iter().map(|(l, k, _)| (*l, *k)).collect();
        self.dataplane.trie_remove_all(RANK_RANGES, &ranges);
        Ok(())
    }

    fn remove_endpoint(&mut self, index: u32) -> Result<(), SyncError> {
        let Some(old) = self.endpoints.remove(&index) else {
            return Ok(());
        };
        // An interface deleted and created again under the same name (a pod's sandbox
        // recreated: CNIs derive the name from the pod) has a new index and is enforced under
        // it already; its links are pinned under the name, and its addresses are keyed by the
        // endpoint: those stay.
        let name_in_use = self.endpoints.values().any(|s| s.ifname == old.ifname);
        // Detach first so no packet meets a half-removed endpoint.
        if !name_in_use {
            self.dataplane.detach(&old.ifname);
        }
        self.dataplane.clear_endpoint(index)?;
        for a in &old.addrs {
            let in_use = self
                .endpoints
                .values()
                .any(|s| s.endpoint_id == old.endpoint_id && s.addrs.contains(a));
            if !in_use {
                let key = EndpointAddrKey {
                    endpoint_id: old.endpoint_id,
                    addr: *a,
                };
                self.dataplane.remove(ENDPOINT_ADDRS, &key);
            }
        }
        Ok(())
    }

    /// After a restart: drops what an earlier agent left that the current rule set does not
    /// have (endpoints, their links, policy keys of policy ids no group of ours has, ipcache
    /// entries).
    fn remove_foreign_state(&mut self, current: &BTreeSet<u32>) -> Result<(), SyncError> {
        let live_ids: BTreeSet<u32> = self
            .groups
            .values()
            .map(|g| g.policy_id)
            .chain(self.retired.iter().map(|(id, _)| *id))
            .collect();
        let stale_endpoints: Vec<u32> = self
            .dataplane
            .endpoint_list()?
            .into_iter()
            .map(|(i, _)| i)
            .filter(|i| !current.contains(i))
            .collect();
        for index in stale_endpoints {
            self.dataplane.clear_endpoint(index)?;
        }
        let attached: Vec<String> = self.dataplane.attached();
        let ours: BTreeSet<&str> = self.endpoints.values().map(|s| s.ifname.as_str()).collect();
        for ifname in attached {
            if !ours.contains(ifname.as_str()) {
                self.dataplane.detach(&ifname);
            }
        }
        let dead = |policy_id: u32| !live_ids.contains(&policy_id);
        remove_keys_where(&mut self.dataplane, POLICY_SUMMARY, |k| dead(k.policy_id))?;
        remove_keys_where(&mut self.dataplane, POLICY_EXACT, |k| dead(k.policy_id))?;
        remove_trie_keys_where(&mut self.dataplane, POLICY_RANGES, |_, k| dead(k.policy_id))?;
        remove_keys_where(&mut self.dataplane, RANK_SUMMARY, |k| dead(k.policy_id))?;
        remove_keys_where(&mut self.dataplane, RANK_EXACT, |k| dead(k.policy_id))?;
        remove_trie_keys_where(&mut self.dataplane, RANK_RANGES, |_, k| dead(k.policy_id))?;
        Ok(())
    }

    /// Replaces the global data-plane configuration (deny-event rate limit, generation).
    /// Only those two fields: the clock is the loader's measurement and the dense window this
    /// enforcer's.
    pub fn set_config(&mut self, config: Config) -> Result<(), SyncError> {
        self.update_config(|c| {
            c.generation = config.generation;
            c.deny_event_interval_ns = config.deny_event_interval_ns;
        })
    }
}

/// A group's keys arranged for [`fully_denied`]: each summary under its (identity, direction,
/// protocol), and the values of the finer keys (exact ports, port ranges) under the summary key
/// they refine. Built once per group, so asking about every peer costs a hash lookup each, not
/// a scan of the group's keys (which made a 100k-entry policy's apply quadratic).
pub struct DenyIndex<'a> {
    summaries: HashMap<(u32, u8, u8), (PolicyKey, &'a PolicySummary)>,
    finer: HashMap<PolicyKey, Vec<PolicyValue>>,
}

impl<'a> DenyIndex<'a> {
    pub fn new(tables: &'a PolicyTables) -> DenyIndex<'a> {
        let mut summaries = HashMap::with_capacity(tables.summaries.len());
        for (k, v) in &tables.summaries {
            summaries
                .entry((k.identity, k.direction, k.protocol))
                .or_insert((*k, v));
        }
        let mut finer: HashMap<PolicyKey, Vec<PolicyValue>> = HashMap::new();
        let exact = tables.exact.iter().map(|(k, v)| (k, v));
        let ranges = tables.ranges.iter().map(|(_, k, v)| (k, v));
        for (k, v) in exact.chain(ranges) {
            finer
                .entry(PolicyKey { port_be: 0, ..*k })
                .or_default()
                .push(*v);
        }
        DenyIndex { summaries, finer }
    }
}

/// The peers (with the deciding rule) a group's policy denies outright ([`fully_denied`]),
/// among the identities its ingress summaries name. Where the group's egress names DNS names,
/// not the addresses names apply to (`world`, CIDR identities): a name the pod learns can
/// admit an egress connection to such an address whatever its own identity's keys say, and
/// the prefilter would drop that connection's replies.
pub fn denied_peers(
    tables: &PolicyTables,
    defaults: (PolicyValue, PolicyValue),
) -> Vec<(u32, u32)> {
    let index = DenyIndex::new(tables);
    let names_may_admit = !tables.ranks.is_empty();
    let candidates: BTreeSet<u32> = tables
        .summaries
        .iter()
        .filter(|(k, _)| k.direction == DIR_INGRESS && k.identity != identity::ANY)
        .map(|(k, _)| k.identity)
        .filter(|id| !(names_may_admit && identity::names_apply_to(*id)))
        .collect();
    candidates
        .into_iter()
        .filter_map(|peer| fully_denied(&index, peer, defaults).map(|rule| (peer, rule)))
        .collect()
}

/// Whether a group's policy denies `peer` everything in both directions, on every protocol and
/// port, without audit: then no connection with it can be opened either way (and the replies of
/// one opened before are cut at its next forward packet), so dropping its packets before TC
/// changes nothing but where they are dropped. Returns the deciding rule. The check is
/// conservative: a protocol's fallback counts even when its ports are all covered by finer keys.
pub fn fully_denied(
    index: &DenyIndex<'_>,
    peer: u32,
    defaults: (PolicyValue, PolicyValue),
) -> Option<u32> {
    let mut rule = None;
    for direction in [DIR_INGRESS, DIR_EGRESS] {
        let default = if direction == DIR_INGRESS {
            defaults.0
        } else {
            defaults.1
        };
        for protocol in ALL_POLICY_PROTOCOLS {
            let summary_of = |identity: u32| index.summaries.get(&(identity, direction, protocol));
            let values: Vec<PolicyValue> =
                match summary_of(peer).or_else(|| summary_of(identity::ANY)) {
                    None => vec![default],
                    Some((key, summary)) => std::iter::once(summary.fallback)
                        .chain(index.finer.get(key).into_iter().flatten().copied())
                        .collect(),
                };
            for v in values {
                if v.verdict != VERDICT_DENY || v.audit_verdict != VERDICT_DENY {
                    return None;
                }
                if direction == DIR_INGRESS {
                    rule.get_or_insert(v.rule_id);
                }
            }
        }
    }
    rule
}
