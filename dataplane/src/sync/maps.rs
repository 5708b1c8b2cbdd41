//! The operations the [`Enforcer`](super::Enforcer) performs on the kernel, behind one small
//! trait: insert, remove and list keys of named maps, the `ENDPOINTS` switch, the global
//! configuration, attaching programs, and cutting connections. [`Dataplane`] implements it on
//! the pinned BPF maps; the unit tests implement it in memory (`fake.rs`) and check what the
//! enforcer decides — which operations, in which order, what happens when a map is full or an
//! interface cannot be attached — without root. The kernel tests keep covering the real maps.
//!
//! The decisions are not computed as a plan ahead of time because some depend on the kernel's
//! answers (a policy map that is full locks its group down; an interface that went away is
//! retried): the enforcer decides step by step, and every step goes through this trait.

use std::marker::PhantomData;

use aya::{
    Pod,
    maps::{HashMap, LpmTrie, MapData, lpm_trie::Key},
};
use bulkhead_common::{
    CT_REVOKED, Config, CtValue, EndpointAddrKey, EndpointInfo, IpCacheValue, PolicyKey,
    PolicyRanks, PolicySummary, PolicyValue, PrefilterKey, PrefilterValue, QuarantineAllowKey,
    RankSummary,
};

use super::SyncError;
use crate::batch;
use crate::loader::Dataplane;

/// A hash map the enforcer writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// Single IPv4 addresses → identity (outside the dense window).
    IpcacheHostV4,
    /// Single IPv6 addresses → identity.
    IpcacheHostV6,
    /// A policy's (identity, direction, protocol) summaries.
    PolicySummary,
    /// A policy's exact ports.
    PolicyExact,
    /// Addresses each endpoint may send from.
    EndpointAddrs,
    /// Quarantines' exceptions (address, peer identity).
    QuarantineAllow,
    /// The XDP prefilter's (local address, peer identity) pairs.
    PrefilterDeny,
    /// A name policy's rank summaries (beside `PolicySummary`).
    RankSummary,
    /// A name policy's exact-port ranks.
    RankExact,
}

/// An LPM trie the enforcer writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Trie {
    /// IPv4 prefixes → identity.
    IpcacheV4,
    /// IPv6 prefixes → identity.
    IpcacheV6,
    /// A policy's port ranges.
    PolicyRanges,
    /// A name policy's port-range ranks.
    RankRanges,
}

impl Table {
    /// The BPF map's name.
    pub fn name(self) -> &'static str {
        match self {
            Table::IpcacheHostV4 => "IPCACHE_HOST_V4",
            Table::IpcacheHostV6 => "IPCACHE_HOST_V6",
            Table::PolicySummary => "POLICY_SUMMARY",
            Table::PolicyExact => "POLICY_EXACT",
            Table::EndpointAddrs => "ENDPOINT_ADDRS",
            Table::QuarantineAllow => "QUARANTINE_ALLOW",
            Table::PrefilterDeny => "PREFILTER_DENY",
            Table::RankSummary => "RANK_SUMMARY",
            Table::RankExact => "RANK_EXACT",
        }
    }
}

impl Trie {
    /// The BPF map's name.
    pub fn name(self) -> &'static str {
        match self {
            Trie::IpcacheV4 => "IPCACHE_V4",
            Trie::IpcacheV6 => "IPCACHE_V6",
            Trie::PolicyRanges => "POLICY",
            Trie::RankRanges => "RANK_RANGES",
        }
    }
}

/// A hash map with its key and value types.
pub struct HashTable<K, V>(pub Table, PhantomData<fn() -> (K, V)>);
/// An LPM trie with its key and value types.
pub struct TrieTable<K, V>(pub Trie, PhantomData<fn() -> (K, V)>);

impl<K, V> Clone for HashTable<K, V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K, V> Copy for HashTable<K, V> {}
impl<K, V> Clone for TrieTable<K, V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K, V> Copy for TrieTable<K, V> {}

pub const IPCACHE_HOST_V4: HashTable<[u8; 4], IpCacheValue> =
    HashTable(Table::IpcacheHostV4, PhantomData);
pub const IPCACHE_HOST_V6: HashTable<[u8; 16], IpCacheValue> =
    HashTable(Table::IpcacheHostV6, PhantomData);
pub const POLICY_SUMMARY: HashTable<PolicyKey, PolicySummary> =
    HashTable(Table::PolicySummary, PhantomData);
pub const POLICY_EXACT: HashTable<PolicyKey, PolicyValue> =
    HashTable(Table::PolicyExact, PhantomData);
pub const ENDPOINT_ADDRS: HashTable<EndpointAddrKey, u32> =
    HashTable(Table::EndpointAddrs, PhantomData);
pub const QUARANTINE_ALLOW: HashTable<QuarantineAllowKey, u32> =
    HashTable(Table::QuarantineAllow, PhantomData);
pub const PREFILTER_DENY: HashTable<PrefilterKey, PrefilterValue> =
    HashTable(Table::PrefilterDeny, PhantomData);
pub const RANK_SUMMARY: HashTable<PolicyKey, RankSummary> =
    HashTable(Table::RankSummary, PhantomData);
pub const RANK_EXACT: HashTable<PolicyKey, PolicyRanks> = HashTable(Table::RankExact, PhantomData);
pub const RANK_RANGES: TrieTable<PolicyKey, PolicyRanks> = TrieTable(Trie::RankRanges, PhantomData);
pub const IPCACHE_V4: TrieTable<[u8; 4], IpCacheValue> = TrieTable(Trie::IpcacheV4, PhantomData);
pub const IPCACHE_V6: TrieTable<[u8; 16], IpCacheValue> = TrieTable(Trie::IpcacheV6, PhantomData);
pub const POLICY_RANGES: TrieTable<PolicyKey, PolicyValue> =
    TrieTable(Trie::PolicyRanges, PhantomData);

/// What the enforcer needs of the kernel. Removing a key that is not there is not an error
/// (a write that failed half-way leaves some keys out).
pub trait Maps {
    fn insert<K: Pod, V: Pod>(
        &mut self,
        table: HashTable<K, V>,
        key: &K,
        value: &V,
    ) -> Result<(), SyncError>;
    fn remove<K: Pod, V: Pod>(&mut self, table: HashTable<K, V>, key: &K);
    /// Writes `entries` in order (the kernel's batch where it has one). On an error, the
    /// entries before the one that failed are in the map, and the error says how many.
    fn insert_all<K: Pod, V: Pod>(
        &mut self,
        table: HashTable<K, V>,
        entries: &[(K, V)],
    ) -> Result<(), PartialWrite> {
        for (written, (k, v)) in entries.iter().enumerate() {
            self.insert(table, k, v)
                .map_err(|error| PartialWrite { written, error })?;
        }
        Ok(())
    }
    /// Removes `keys`, those that are not there included.
    fn remove_all<K: Pod, V: Pod>(&mut self, table: HashTable<K, V>, keys: &[K]) {
        for k in keys {
            self.remove(table, k);
        }
    }
    fn entries<K: Pod, V: Pod>(&mut self, table: HashTable<K, V>)
    -> Result<Vec<(K, V)>, SyncError>;
    fn trie_insert<K: Pod, V: Pod>(
        &mut self,
        trie: TrieTable<K, V>,
        prefix_len: u32,
        key: &K,
        value: &V,
    ) -> Result<(), SyncError>;
    fn trie_remove<K: Pod, V: Pod>(&mut self, trie: TrieTable<K, V>, prefix_len: u32, key: &K);
    /// Writes (prefix length, key, value) entries in order, like [`Maps::insert_all`].
    fn trie_insert_all<K: Pod, V: Pod>(
        &mut self,
        trie: TrieTable<K, V>,
        entries: &[(u32, K, V)],
    ) -> Result<(), PartialWrite> {
        for (written, (len, k, v)) in entries.iter().enumerate() {
            self.trie_insert(trie, *len, k, v)
                .map_err(|error| PartialWrite { written, error })?;
        }
        Ok(())
    }
    /// Removes (prefix length, key) entries, those that are not there included.
    fn trie_remove_all<K: Pod, V: Pod>(&mut self, trie: TrieTable<K, V>, keys: &[(u32, K)]) {
        for (len, k) in keys {
            self.trie_remove(trie, *len, k);
        }
    }
    /// Every (prefix length, key) of the trie.
    fn trie_keys<K: Pod, V: Pod>(
        &mut self,
        trie: TrieTable<K, V>,
    ) -> Result<Vec<(u32, K)>, SyncError>;
    /// A slot of the dense IPv4 window (`IPCACHE_DENSE_V4`).
    fn dense_set(&mut self, slot: u32, value: Option<IpCacheValue>);
    fn dense_entries(&mut self) -> Vec<(u32, IpCacheValue)>;
    fn dense_clear(&mut self);
    fn config(&mut self) -> Result<Config, SyncError>;
    fn set_config(&mut self, config: Config) -> Result<(), SyncError>;
    /// Replaces an endpoint's `ENDPOINTS` value in one update: the switch.
    fn set_endpoint(&mut self, ifindex: u32, info: EndpointInfo) -> Result<(), SyncError>;
    fn clear_endpoint(&mut self, ifindex: u32) -> Result<(), SyncError>;
    fn endpoint_list(&mut self) -> Result<Vec<(u32, EndpointInfo)>, SyncError>;
    /// Attaches the endpoint programs to `ifname`.
    fn attach(&mut self, ifname: &str) -> Result<(), SyncError>;
    fn detach(&mut self, ifname: &str);
    /// Interfaces our programs are attached to (pinned links).
    fn attached(&self) -> Vec<String>;
    /// The interface's index, if it exists.
    fn ifindex(&self, ifname: &str) -> Option<u32>;
    /// Turns the live tracked connections of these endpoints into tombstones of `generation`;
    /// returns how many.
    fn revoke_connections(
        &mut self,
        endpoint_ids: &[u32],
        generation: u32,
    ) -> Result<usize, SyncError>;
    /// After a restart, before the new programs replace the old: IPv4 connections an older
    /// agent tracked under 40-byte keys are copied to where the new programs look.
    fn copy_ipv4_connections(&mut self) -> Result<(), SyncError>;
    /// Once the new programs are attached: the copied connections leave the old map; returns
    /// how many.
    fn move_ipv4_connections(&mut self) -> Result<usize, SyncError>;
}

fn map_error(map: &'static str) -> impl Fn(aya::maps::MapError) -> SyncError {
    move |source| SyncError::Map { map, source }
}

/// A write of many entries that stopped at an error: the first `written` are in the map.
#[derive(Debug, thiserror::Error)]
#[error("{error} (after {written} entries were written)")]
pub struct PartialWrite {
    pub written: usize,
    #[source]
    pub error: SyncError,
}

impl From<PartialWrite> for SyncError {
    fn from(p: PartialWrite) -> SyncError {
        p.error
    }
}

fn batch_error(map: &'static str, call: &'static str, e: batch::BatchError) -> PartialWrite {
    PartialWrite {
        written: e.done,
        error: SyncError::Map {
            map,
            source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call,
                io_error: e.error,
            }),
        },
    }
}

/// Writes `entries` one call each into `map`; the error says how many went in.
fn insert_each<K: Pod, V: Pod, E>(
    name: &'static str,
    entries: impl Iterator<Item = (K, V)>,
    mut insert: impl FnMut(&K, &V) -> Result<(), E>,
) -> Result<(), PartialWrite>
where
    aya::maps::MapError: From<E>,
{
    for (written, (k, v)) in entries.enumerate() {
        insert(&k, &v).map_err(|e| PartialWrite {
            written,
            error: map_error(name)(e.into()),
        })?;
    }
    Ok(())
}

impl Dataplane {
    /// `BPF_MAP_UPDATE_BATCH` of `keys` → `values` into `map` (whose types the caller checked);
    /// `Ok(false)` when the kernel has no batch for the map's type (nothing was written).
    fn update_batch<K: Pod, V: Pod>(
        &mut self,
        map: &'static str,
        keys: &[K],
        values: &[V],
    ) -> Result<bool, PartialWrite> {
        if self.unbatched(map, batch::Op::Update) {
            return Ok(false);
        }
        let fd = self.map_fd(map).map_err(|e| PartialWrite {
            written: 0,
            error: e.into(),
        })?;
        match batch::update(fd, keys, values, 0) {
            Ok(()) => Ok(true),
            Err(e) if e.unsupported() => {
                self.set_unbatched(map, batch::Op::Update);
                Ok(false)
            }
            Err(e) => Err(batch_error(map, "bpf_map_update_batch", e)),
        }
    }

    /// Every entry of `map` (whose types the caller checked) by `BPF_MAP_LOOKUP_BATCH`; `None`
    /// when the kernel has no batch for the map's type or the batch failed (the caller then
    /// iterates key by key).
    fn lookup_batch<K: Pod, V: Pod>(&mut self, map: &'static str) -> Option<Vec<(K, V)>> {
        if self.unbatched(map, batch::Op::Lookup) {
            return None;
        }
        match batch::lookup(self.map_fd(map).ok()?) {
            Ok(all) => Some(all),
            Err(e) => {
                if e.unsupported() {
                    self.set_unbatched(map, batch::Op::Lookup);
                } else {
                    tracing::debug!(map, error = %e.error, "batched read failed; reading key by key");
                }
                None
            }
        }
    }

    /// `BPF_MAP_DELETE_BATCH` of `keys`; `false` when the kernel has no batch for the map's type
    /// or the batch failed otherwise (nothing or part removed: the caller removes key by key).
    fn delete_batch<K: Pod>(&mut self, map: &'static str, keys: &[K]) -> bool {
        if self.unbatched(map, batch::Op::Delete) {
            return false;
        }
        let Ok(fd) = self.map_fd(map) else {
            return false;
        };
        match batch::delete(fd, keys) {
            Ok(_) => true,
            Err(e) => {
                if e.unsupported() {
                    self.set_unbatched(map, batch::Op::Delete);
                }
                false
            }
        }
    }
}

impl Dataplane {
    fn table<K: Pod, V: Pod>(
        &mut self,
        table: HashTable<K, V>,
    ) -> Result<HashMap<&mut MapData, K, V>, SyncError> {
        Ok(self.map_mut(table.0.name())?)
    }

    fn trie<K: Pod, V: Pod>(
        &mut self,
        trie: TrieTable<K, V>,
    ) -> Result<LpmTrie<&mut MapData, K, V>, SyncError> {
        Ok(self.map_mut(trie.0.name())?)
    }
}

/// `bpf_map_update_elem` flag: update only an existing entry.
const BPF_EXIST: u64 = 2;

/// Turns the live connections of `map` that `doomed` picks into tombstones of `generation`
/// (`CT_REVOKED`, see `ebpf/src/main.rs`); returns how many.
fn revoke_where<K: Pod>(
    map: &mut HashMap<&mut MapData, K, CtValue>,
    generation: u32,
    doomed: impl Fn(&K) -> bool,
) -> usize {
    let live: Vec<(K, CtValue)> = map
        .iter()
        .flatten()
        .filter(|(k, v)| doomed(k) && v.flags & CT_REVOKED == 0)
        .collect();
    for (k, mut v) in live.iter().copied() {
        v.flags |= CT_REVOKED;
        v.generation = generation;
        // Only an existing entry: one the kernel evicted meanwhile stays gone.
        let _ = map.insert(k, v, BPF_EXIST);
    }
    live.len()
}

impl Maps for Dataplane {
    fn insert<K: Pod, V: Pod>(
        &mut self,
        table: HashTable<K, V>,
        key: &K,
        value: &V,
    ) -> Result<(), SyncError> {
        self.table(table)?
            .insert(key, value, 0)
            .map_err(map_error(table.0.name()))
    }

    fn remove<K: Pod, V: Pod>(&mut self, table: HashTable<K, V>, key: &K) {
        if let Ok(mut m) = self.table(table) {
            let _ = m.remove(key);
        }
    }

    fn insert_all<K: Pod, V: Pod>(
        &mut self,
        table: HashTable<K, V>,
        entries: &[(K, V)],
    ) -> Result<(), PartialWrite> {
        let nothing = |error| PartialWrite { written: 0, error };
        if entries.is_empty() {
            return Ok(());
        }
        // Checks that K and V are the map's key and value.
        self.table(table).map_err(nothing)?;
        let keys: Vec<K> = entries.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = entries.iter().map(|(_, v)| *v).collect();
        if self.update_batch(table.0.name(), &keys, &values)? {
            return Ok(());
        }
        let mut map = self.table(table).map_err(nothing)?;
        insert_each(table.0.name(), entries.iter().copied(), |k, v| {
            map.insert(k, v, 0)
        })
    }

    fn remove_all<K: Pod, V: Pod>(&mut self, table: HashTable<K, V>, keys: &[K]) {
        if keys.is_empty() || self.table(table).is_err() {
            return;
        }
        if !self.delete_batch(table.0.name(), keys)
            && let Ok(mut map) = self.table(table)
        {
            for k in keys {
                let _ = map.remove(k);
            }
        }
    }

    fn entries<K: Pod, V: Pod>(
        &mut self,
        table: HashTable<K, V>,
    ) -> Result<Vec<(K, V)>, SyncError> {
        self.table(table)?;
        if let Some(all) = self.lookup_batch(table.0.name()) {
            return Ok(all);
        }
        Ok(self.table(table)?.iter().flatten().collect())
    }

    fn trie_insert_all<K: Pod, V: Pod>(
        &mut self,
        trie: TrieTable<K, V>,
        entries: &[(u32, K, V)],
    ) -> Result<(), PartialWrite> {
        let nothing = |error| PartialWrite { written: 0, error };
        if entries.is_empty() {
            return Ok(());
        }
        self.trie(trie).map_err(nothing)?;
        let keys: Vec<Key<K>> = entries.iter().map(|(l, k, _)| Key::new(*l, *k)).collect();
        let values: Vec<V> = entries.iter().map(|(_, _, v)| *v).collect();
        if self.update_batch(trie.0.name(), &keys, &values)? {
            return Ok(());
        }
        let mut map = self.trie(trie).map_err(nothing)?;
        insert_each(trie.0.name(), keys.into_iter().zip(values), |k, v| {
            map.insert(k, v, 0)
        })
    }

    fn trie_remove_all<K: Pod, V: Pod>(&mut self, trie: TrieTable<K, V>, keys: &[(u32, K)]) {
        if keys.is_empty() || self.trie(trie).is_err() {
            return;
        }
        let keys: Vec<Key<K>> = keys.iter().map(|(l, k)| Key::new(*l, *k)).collect();
        if !self.delete_batch(trie.0.name(), &keys)
            && let Ok(mut map) = self.trie(trie)
        {
            for k in &keys {
                let _ = map.remove(k);
            }
        }
    }

    fn trie_insert<K: Pod, V: Pod>(
        &mut self,
        trie: TrieTable<K, V>,
        prefix_len: u32,
        key: &K,
        value: &V,
    ) -> Result<(), SyncError> {
        self.trie(trie)?
            .insert(&Key::new(prefix_len, *key), value, 0)
            .map_err(map_error(trie.0.name()))
    }

    fn trie_remove<K: Pod, V: Pod>(&mut self, trie: TrieTable<K, V>, prefix_len: u32, key: &K) {
        if let Ok(mut m) = self.trie(trie) {
            let _ = m.remove(&Key::new(prefix_len, *key));
        }
    }

    fn trie_keys<K: Pod, V: Pod>(
        &mut self,
        trie: TrieTable<K, V>,
    ) -> Result<Vec<(u32, K)>, SyncError> {
        self.trie(trie)?;
        if let Some(all) = self.lookup_batch::<Key<K>, V>(trie.0.name()) {
            return Ok(all
                .into_iter()
                .map(|(k, _)| (k.prefix_len(), k.data()))
                .collect());
        }
        Ok(self
            .trie(trie)?
            .keys()
            .flatten()
            .map(|k| (k.prefix_len(), k.data()))
            .collect())
    }

    fn dense_set(&mut self, slot: u32, value: Option<IpCacheValue>) {
        self.dense_v4().set(slot, value);
    }

    fn dense_entries(&mut self) -> Vec<(u32, IpCacheValue)> {
        self.dense_v4().entries()
    }

    fn dense_clear(&mut self) {
        self.dense_v4().clear();
    }

    fn config(&mut self) -> Result<Config, SyncError> {
        Ok(Dataplane::config(self)?.get(&0, 0).unwrap_or_default())
    }

    fn set_config(&mut self, config: Config) -> Result<(), SyncError> {
        Dataplane::config(self)?
            .set(0, config, 0)
            .map_err(map_error("CONFIG"))
    }

    fn set_endpoint(&mut self, ifindex: u32, info: EndpointInfo) -> Result<(), SyncError> {
        Ok(Dataplane::set_endpoint(self, ifindex, info)?)
    }

    fn clear_endpoint(&mut self, ifindex: u32) -> Result<(), SyncError> {
        Ok(Dataplane::clear_endpoint(self, ifindex)?)
    }

    fn endpoint_list(&mut self) -> Result<Vec<(u32, EndpointInfo)>, SyncError> {
        Ok(Dataplane::endpoint_list(self)?)
    }

    fn attach(&mut self, ifname: &str) -> Result<(), SyncError> {
        Ok(self.attach_endpoint(ifname)?)
    }

    fn detach(&mut self, ifname: &str) {
        self.detach_endpoint(ifname);
    }

    fn attached(&self) -> Vec<String> {
        self.attached_interfaces()
    }

    fn ifindex(&self, ifname: &str) -> Option<u32> {
        nix::net::if_::if_nametoindex(ifname).ok()
    }

    fn revoke_connections(
        &mut self,
        endpoint_ids: &[u32],
        generation: u32,
    ) -> Result<usize, SyncError> {
        let of = |endpoint_id: u16| endpoint_ids.contains(&(endpoint_id as u32));
        let cut = revoke_where(&mut self.conntrack()?, generation, |k| of(k.endpoint_id));
        Ok(cut + revoke_where(&mut self.conntrack_v4()?, generation, |k| of(k.endpoint_id)))
    }

    fn copy_ipv4_connections(&mut self) -> Result<(), SyncError> {
        Dataplane::copy_ipv4_connections(self)?;
        Ok(())
    }

    fn move_ipv4_connections(&mut self) -> Result<usize, SyncError> {
        Ok(Dataplane::move_ipv4_connections(self)?)
    }
}
