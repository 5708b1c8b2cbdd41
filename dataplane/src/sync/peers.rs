//! What identifies peers: the ipcache (hash, tries and the dense IPv4 window), the
//! quarantines' exceptions and the XDP prefilter's pairs, kept equal to the rule set's.

use super::*;
use maps::PartialWrite;
use maps::{
    IPCACHE_HOST_V4, IPCACHE_HOST_V6, IPCACHE_V4, IPCACHE_V6, PREFILTER_DENY, QUARANTINE_ALLOW,
};

/// The ipcache entries of `puts` that reached the map; the first error is kept in `error`.
fn settle<K>(
    puts: &[(IpNetwork, u32, K, IpCacheValue)],
    result: Result<(), PartialWrite>,
    error: &mut Option<SyncError>,
) -> Vec<(IpNetwork, IpCacheValue)> {
    let written = match result {
        Ok(()) => puts.len(),
        Err(partial) => {
            error.get_or_insert(partial.error);
            partial.written.min(puts.len())
        }
    };
    puts[..written].iter().map(|p| (p.0, p.3)).collect()
}

/// (key, value) of ipcache writes.
fn pairs<K: Copy>(puts: &[(IpNetwork, u32, K, IpCacheValue)]) -> Vec<(K, IpCacheValue)> {
    puts.iter().map(|p| (p.2, p.3)).collect()
}

/// (prefix length, key, value) of ipcache writes.
fn triples<K: Copy>(puts: &[(IpNetwork, u32, K, IpCacheValue)]) -> Vec<(u32, K, IpCacheValue)> {
    puts.iter().map(|p| (p.1, p.2, p.3)).collect()
}

impl<M: Maps> Enforcer<M> {
    /// The `IPCACHE_DENSE_V4` slot of `ip`, when the window in use covers it.
    pub(super) fn dense_slot(&self, ip: Ipv4Addr) -> Option<u32> {
        let base = self.dense_window?;
        let slot = u32::from(ip).wrapping_sub(base);
        (slot < DENSE_V4_SLOTS).then_some(slot)
    }

    /// Entries an earlier agent wrote for addresses and prefixes the rule set no longer has (a
    /// pod deleted, a CIDR policy removed while no agent ran): removed from the dense array, the
    /// hashes and the tries, so such an address resolves as it now should (its CIDR, or the
    /// world) rather than to an identity that has left. Run on the first apply, after the
    /// rule set's own entries are written.
    pub(super) fn clear_ipcache_leftovers(
        &mut self,
        wanted: &[(IpNetwork, IpCacheValue)],
    ) -> Result<(), SyncError> {
        let stale = |net: IpNetwork| wanted.binary_search_by_key(&net, |(n, _)| *n).is_err();
        if let Some(base) = self.dense_window {
            for (slot, _) in self.dataplane.dense_entries() {
                let ip = Ipv4Addr::from(base.wrapping_add(slot));
                if stale(IpNetwork::V4(Ipv4Network::from(ip))) {
                    self.dataplane.dense_set(slot, None);
                }
            }
        }
        remove_keys_where(&mut self.dataplane, IPCACHE_HOST_V4, |k| {
            stale(IpNetwork::V4(Ipv4Network::from(Ipv4Addr::from(*k))))
        })?;
        remove_keys_where(&mut self.dataplane, IPCACHE_HOST_V6, |k| {
            stale(IpNetwork::V6(Ipv6Network::from(Ipv6Addr::from(*k))))
        })?;
        remove_trie_keys_where(&mut self.dataplane, IPCACHE_V4, |len, k| {
            Ipv4Network::new(Ipv4Addr::from(*k), len as u8).is_ok_and(|n| stale(IpNetwork::V4(n)))
        })?;
        remove_trie_keys_where(&mut self.dataplane, IPCACHE_V6, |len, k| {
            Ipv6Network::new(Ipv6Addr::from(*k), len as u8).is_ok_and(|n| stale(IpNetwork::V6(n)))
        })?;
        Ok(())
    }

    /// Moves the dense window to the aligned block of [`DENSE_V4_SLOTS`] addresses that holds
    /// the most single IPv4 entries, when that block holds at least twice as many as the one
    /// in use (so the window does not flap). The move never leaves an address unresolved:
    /// the old window's entries are copied to the hash, the window is switched off, the array
    /// is refilled for the new block, switched on, and only then are the new block's entries
    /// removed from the hash.
    pub(super) fn place_dense_window(&mut self) -> Result<(), SyncError> {
        // The copy is sorted by address: the single IPv4 addresses of one block are
        // consecutive, so the fullest block is found in one pass, without a map of counts.
        let mut best: Option<(u32, usize)> = None;
        let mut current_block: Option<(u32, usize)> = None;
        let mut in_window = 0;
        let blocks = self.ipcache.keys().filter_map(|net| match net {
            IpNetwork::V4(n) if n.prefix() == 32 => Some(u32::from(n.ip()) & !(DENSE_V4_SLOTS - 1)),
            _ => None,
        });
        for block in blocks.map(Some).chain([None]) {
            match (current_block, block) {
                (Some((b, c)), Some(next)) if b == next => current_block = Some((b, c + 1)),
                (ended, next) => {
                    if let Some((b, c)) = ended {
                        if Some(b) == self.dense_window {
                            in_window = c;
                        }
                        // The fullest; of equally full blocks, the lowest.
                        if best.is_none_or(|(_, bc)| c > bc) {
                            best = Some((b, c));
                        }
                    }
                    current_block = next.map(|b| (b, 1));
                }
            }
        }
        let Some((best, best_count)) = best else {
            return Ok(());
        };
        let current = in_window;
        if self.dense_window == Some(best) || best_count < 2 * current.max(1) {
            return Ok(());
        }
        let singles: Vec<(Ipv4Addr, IpCacheValue)> = self
            .ipcache
            .iter()
            .filter_map(|(net, v)| match net {
                IpNetwork::V4(n) if n.prefix() == 32 => Some((n.ip(), *v)),
                _ => None,
            })
            .collect();
        // 1. the old window's entries into the hash.
        let old_window: Vec<([u8; 4], IpCacheValue)> = singles
            .iter()
            .filter(|(ip, _)| {
                self.dense_window
                    .is_some_and(|b| u32::from(*ip).wrapping_sub(b) < DENSE_V4_SLOTS)
            })
            .map(|(ip, v)| (ip.octets(), *v))
            .collect();
        self.dataplane.insert_all(IPCACHE_HOST_V4, &old_window)?;
        // 2. window off: every single address now resolves through the hash.
        self.update_config(|c| c.dense_v4_slots = 0)?;
        // 3. the array refilled for the new block, 4. switched on.
        self.dense_window = Some(best);
        self.dataplane.dense_clear();
        for (ip, v) in &singles {
            let slot = u32::from(*ip).wrapping_sub(best);
            if slot < DENSE_V4_SLOTS {
                self.dataplane.dense_set(slot, Some(*v));
            }
        }
        self.update_config(|c| {
            c.dense_v4_base = best;
            c.dense_v4_slots = DENSE_V4_SLOTS;
        })?;
        // 5. the new block's entries leave the hash.
        let new_window: Vec<[u8; 4]> = singles
            .iter()
            .filter(|(ip, _)| u32::from(*ip).wrapping_sub(best) < DENSE_V4_SLOTS)
            .map(|(ip, _)| ip.octets())
            .collect();
        self.dataplane.remove_all(IPCACHE_HOST_V4, &new_window);
        tracing::info!(
            window = %Ipv4Network::new(Ipv4Addr::from(best), 32 - DENSE_V4_SLOTS.trailing_zeros() as u8)
                .map(|n| n.to_string())
                .unwrap_or_default(),
            entries = best_count,
            "IPv4 identities of this block are now read from the dense array"
        );
        Ok(())
    }

    /// Writes ipcache changes (`None` removes): single IPv4 addresses in the dense window go
    /// to its array, other single addresses to the hash maps, wider prefixes to the tries,
    /// each map's writes in one batch. The in-memory copy follows what reached the kernel,
    /// also when a map is full (then the error is returned after the rest was written).
    pub(super) fn write_ipcache(
        &mut self,
        changes: Vec<(IpNetwork, Option<IpCacheValue>)>,
    ) -> Result<(), SyncError> {
        #[derive(Default)]
        struct Writes<K> {
            put: Vec<(IpNetwork, u32, K, IpCacheValue)>,
            del: Vec<(IpNetwork, u32, K)>,
        }
        impl<K: Copy> Writes<K> {
            fn add(&mut self, net: IpNetwork, len: u32, key: K, value: Option<IpCacheValue>) {
                match value {
                    Some(v) => self.put.push((net, len, key, v)),
                    None => self.del.push((net, len, key)),
                }
            }
        }
        let (mut host4, mut host6) = (Writes::default(), Writes::default());
        let (mut trie4, mut trie6) = (Writes::default(), Writes::default());
        for (net, value) in changes {
            let (_, prefix) = prefix_key(&net);
            match net.ip() {
                // Single addresses go to the dense window or the hash maps (one lookup,
                // whatever their number); the tries keep the wider prefixes, consulted only
                // for addresses without an entry.
                IpAddr::V4(ip) if prefix == 32 => match self.dense_slot(ip) {
                    Some(slot) => {
                        self.dataplane.dense_set(slot, value);
                        self.mirror_ipcache(net, value);
                    }
                    None => host4.add(net, prefix, ip.octets(), value),
                },
                IpAddr::V6(ip) if prefix == 128 => host6.add(net, prefix, ip.octets(), value),
                IpAddr::V4(ip) => trie4.add(net, prefix, ip.octets(), value),
                IpAddr::V6(ip) => trie6.add(net, prefix, ip.octets(), value),
            }
        }
        // Removals never fail (a missing key is fine): every one leaves the copy.
        let m = &mut self.dataplane;
        m.remove_all(
            IPCACHE_HOST_V4,
            &host4.del.iter().map(|d| d.2).collect::<Vec<_>>(),
        );
        m.remove_all(
            IPCACHE_HOST_V6,
            &host6.del.iter().map(|d| d.2).collect::<Vec<_>>(),
        );
        m.trie_remove_all(
            IPCACHE_V4,
            &trie4.del.iter().map(|d| (d.1, d.2)).collect::<Vec<_>>(),
        );
        m.trie_remove_all(
            IPCACHE_V6,
            &trie6.del.iter().map(|d| (d.1, d.2)).collect::<Vec<_>>(),
        );
        for (net, ..) in host4.del.iter().chain(&trie4.del) {
            self.ipcache.remove(net);
        }
        for (net, ..) in host6.del.iter().chain(&trie6.del) {
            self.ipcache.remove(net);
        }
        let mut error = None;
        let m = &mut self.dataplane;
        let mut written = settle(
            &host4.put,
            m.insert_all(IPCACHE_HOST_V4, &pairs(&host4.put)),
            &mut error,
        );
        written.extend(settle(
            &trie4.put,
            m.trie_insert_all(IPCACHE_V4, &triples(&trie4.put)),
            &mut error,
        ));
        written.extend(settle(
            &host6.put,
            m.insert_all(IPCACHE_HOST_V6, &pairs(&host6.put)),
            &mut error,
        ));
        written.extend(settle(
            &trie6.put,
            m.trie_insert_all(IPCACHE_V6, &triples(&trie6.put)),
            &mut error,
        ));
        self.ipcache.extend(written);
        error.map_or(Ok(()), Err)
    }

    fn mirror_ipcache(&mut self, net: IpNetwork, value: Option<IpCacheValue>) {
        match value {
            Some(v) => self.ipcache.insert(net, v),
            None => self.ipcache.remove(&net),
        };
    }

    /// Makes `QUARANTINE_ALLOW` hold exactly `wanted` (after a restart, whatever an earlier
    /// agent left is found in the pinned map).
    pub(super) fn write_quarantine_allow(
        &mut self,
        wanted: &BTreeSet<QuarantineAllowKey>,
        first_apply: bool,
    ) -> Result<(), SyncError> {
        let present: BTreeSet<QuarantineAllowKey> = if first_apply {
            self.dataplane
                .entries(QUARANTINE_ALLOW)?
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        } else {
            self.quarantine_allow.clone()
        };
        for k in wanted.difference(&present) {
            self.dataplane.insert(QUARANTINE_ALLOW, k, &1)?;
        }
        for k in present.difference(wanted) {
            self.dataplane.remove(QUARANTINE_ALLOW, k);
        }
        self.quarantine_allow = wanted.clone();
        Ok(())
    }

    /// Makes `PREFILTER_DENY` hold a pair for every address of every placed endpoint and every
    /// peer identity the endpoint can neither be reached from nor reach on any protocol or port
    /// (see [`fully_denied`]). Returns the number of pairs. The prefilter is an early drop of
    /// what TC would drop anyway: a pair that does not fit is left to TC, never an error.
    pub(super) fn write_prefilter(
        &mut self,
        placed: &[Placed<'_>],
        first_apply: bool,
    ) -> Result<usize, SyncError> {
        let mut wanted: BTreeMap<PrefilterKey, PrefilterValue> = BTreeMap::new();
        for p in placed {
            let Some(state) = self.endpoints.get(&p.index) else {
                continue;
            };
            if state.info.flags & endpoint_flags::LOCKDOWN != 0 {
                continue;
            }
            let Some(group) = self.groups.get(&p.endpoint.policy) else {
                continue;
            };
            for &(peer, rule_id) in &group.denied {
                for addr in &state.addrs {
                    wanted.insert(
                        PrefilterKey {
                            addr: *addr,
                            identity: peer,
                        },
                        PrefilterValue {
                            endpoint_id: state.endpoint_id,
                            rule_id,
                            local_identity: state.info.identity,
                            _pad: 0,
                            last_event_ns: 0,
                        },
                    );
                }
            }
        }
        let m = &mut self.dataplane;
        let present: BTreeMap<PrefilterKey, PrefilterValue> = if first_apply {
            m.entries(PREFILTER_DENY)?.into_iter().collect()
        } else {
            self.prefilter.clone()
        };
        for k in present.keys().filter(|k| !wanted.contains_key(k)) {
            m.remove(PREFILTER_DENY, k);
        }
        let mut kept = BTreeMap::new();
        for (k, v) in wanted {
            let same = present.get(&k).is_some_and(|old| {
                PrefilterValue {
                    last_event_ns: 0,
                    ..*old
                } == v
            });
            if same {
                kept.insert(k, v);
                continue;
            }
            match m.insert(PREFILTER_DENY, &k, &v) {
                Ok(()) => {
                    kept.insert(k, v);
                }
                Err(err) => {
                    if !self.prefilter_full_logged {
                        tracing::warn!(
                            error = %err,
                            "the XDP prefilter's map is full: further denied pairs are dropped by TC instead"
                        );
                        self.prefilter_full_logged = true;
                    }
                }
            }
        }
        let n = kept.len();
        self.prefilter = kept;
        Ok(n)
    }
}
