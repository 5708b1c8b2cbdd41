//! Per-node spans: which identities and addresses each node's rule set must carry.

use super::*;

impl PolicyEngine {
    // -----------------------------------------------------------------------------------------
    // Per-node bookkeeping.

    /// Brings node `n`'s reference counts in line with identity `id`'s current contribution
    /// (or with its absence when `id` no longer has an endpoint on `n`).
    pub(super) fn update_contribution(&mut self, n: NodeIdx, id: Identity) {
        let new: Option<Arc<Contribution>> = self
            .identities
            .get(&id)
            .filter(|s| s.endpoints.get(&n).is_some_and(|e| !e.is_empty()))
            .map(|s| s.contribution.clone());
        let active = self.journal.active;
        let node = &mut self.nodes[n as usize];
        let old = node.contrib.remove(&id);
        if active {
            self.journal
                .group_old
                .entry((n, id))
                .or_insert(old.is_some());
        }
        if let Some(c) = &new {
            node.contrib.insert(id, c.clone());
        }
        if let (Some(a), Some(b)) = (&old, &new)
            && Arc::ptr_eq(a, b)
        {
            return;
        }
        let empty = Contribution::default();
        let old_c = old.as_deref().unwrap_or(&empty);
        let new_c = new.as_deref().unwrap_or(&empty);
        let mut flips = Vec::new();
        for_each_diff(&old_c.peers, &new_c.peers, |p, added| {
            let c = node.peer_refs.entry(p).or_default();
            if added {
                *c += 1;
                if *c == 1 {
                    flips.push((p, true));
                }
            } else {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    node.peer_refs.remove(&p);
                    flips.push((p, false));
                }
            }
        });
        let rule_old = &mut self.journal.rule_old;
        for_each_diff(&old_c.rules, &new_c.rules, |r, added| {
            let c = node.rule_refs.entry(r).or_default();
            if added {
                *c += 1;
                if *c == 1 && active {
                    rule_old.entry((n, r)).or_insert(false);
                }
            } else {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    node.rule_refs.remove(&r);
                    if active {
                        rule_old.entry((n, r)).or_insert(true);
                    }
                }
            }
        });
        for (p, on) in flips {
            self.peer_flip(n, p, on);
        }
    }

    pub(super) fn peer_flip(&mut self, n: NodeIdx, peer: Identity, on: bool) {
        if self.journal.active {
            self.journal.peer_old.entry((n, peer)).or_insert(!on);
        }
        let set = self.ref_nodes.entry(peer).or_default();
        if on {
            set.insert(n);
        } else {
            set.remove(&n);
            if set.is_empty() {
                self.ref_nodes.remove(&peer);
            }
        }
        if peer == identity::WORLD {
            if on {
                self.world_nodes.insert(n);
            } else {
                self.world_nodes.remove(&n);
            }
            if self.journal.active {
                self.journal.all_ips.insert(n);
            }
            return;
        }
        if !self.journal.active {
            return;
        }
        let Some(st) = self.identities.get(&peer) else {
            return;
        };
        let ips = st
            .pods
            .iter()
            .filter_map(|pk| self.pods.get(pk))
            .flat_map(|p| p.pod.ips.iter().map(move |ip| (n, *ip)));
        self.journal.ip_checks.extend(ips);
    }

    /// The identity (and quarantine group) node `n`'s ipcache gives a pod address, if it
    /// carries it: the first pod (by name) with that address that is local to the node,
    /// quarantined, or whose identity the node references.
    pub(super) fn pod_entry(&self, n: NodeIdx, ip: &IpAddr) -> Option<PodEntry> {
        let node = &self.nodes[n as usize];
        let world = node.peer_refs.contains_key(&identity::WORLD);
        self.pods_by_ip.get(ip)?.iter().find_map(|pk| {
            let st = self.pods.get(pk)?;
            let local = st.node == n && st.endpoint.is_some();
            let quarantined = st.quarantine.is_some();
            (local || world || quarantined || node.peer_refs.contains_key(&st.identity))
                .then_some((st.identity, st.quarantine))
        })
    }

    /// A quarantine group's exception identities now.
    pub(super) fn allow_of(&self, group: Identity) -> Arc<Vec<Identity>> {
        self.identities
            .get(&group)
            .map(|s| s.quarantine_allow.clone())
            .unwrap_or_default()
    }

    /// A quarantine group's exception identities before the change in the journal.
    pub(super) fn old_allow_of(&self, group: Identity, j: &Journal) -> Arc<Vec<Identity>> {
        match j.allow_old.get(&group) {
            Some(old) => old.clone(),
            None => self.allow_of(group),
        }
    }

    /// [`Self::pod_entry`] as it was before the change in the journal: from the pods' snapshots
    /// and the node's earlier peer references.
    pub(super) fn old_pod_entry(
        &self,
        n: NodeIdx,
        ip: &IpAddr,
        j: &Journal,
        old_at: &FxHashMap<IpAddr, Vec<(&PodKey, &PodSnap)>>,
    ) -> Option<PodEntry> {
        let node = &self.nodes[n as usize];
        let had = |peer: Identity| {
            j.peer_old
                .get(&(n, peer))
                .copied()
                .unwrap_or_else(|| node.peer_refs.contains_key(&peer))
        };
        let world = had(identity::WORLD);
        let carried = |node_of: NodeIdx, id: Identity, endpoint: bool, quarantined: bool| {
            node_of == n && endpoint || world || quarantined || had(id)
        };
        // Pods at the address before: untouched ones as they are (already in key order)…
        let untouched = self.pods_by_ip.get(ip).and_then(|set| {
            set.iter().find_map(|pk| {
                if j.pods.contains_key(&**pk) {
                    return None;
                }
                let st = self.pods.get(pk)?;
                carried(
                    st.node,
                    st.identity,
                    st.endpoint.is_some(),
                    st.quarantine.is_some(),
                )
                .then_some((&**pk, (st.identity, st.quarantine)))
            })
        });
        // …and touched ones as they were; the first by key of both wins.
        let touched = old_at.get(ip).and_then(|snaps| {
            snaps
                .iter()
                .filter(|(_, s)| {
                    carried(
                        s.node,
                        s.identity,
                        s.endpoint.is_some(),
                        s.quarantine.is_some(),
                    )
                })
                .map(|(pk, s)| (*pk, (s.identity, s.quarantine)))
                .min_by(|a, b| a.0.cmp(b.0))
        });
        match (untouched, touched) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a.1 } else { b.1 }),
            (a, b) => a.or(b).map(|x| x.1),
        }
    }

    /// The pod addresses node `n`'s ipcache carries, sorted.
    pub(super) fn pod_entries(&self, n: NodeIdx) -> Vec<(IpNetwork, PodEntry)> {
        let node = &self.nodes[n as usize];
        // Every (address, identity, quarantine group) the node carries; an address shared by
        // pods of different identities or groups (stale pod data) is settled by `pod_entry`.
        type Entries = Vec<(IpNetwork, PodEntry)>;
        let mut entries: Entries = Vec::new();
        let push_pod = |st: &PodState, entries: &mut Entries| {
            entries.extend(
                st.pod
                    .ips
                    .iter()
                    .map(|ip| (host_net(*ip), (st.identity, st.quarantine))),
            );
        };
        for pk in &self.quarantined_pods {
            if let Some(st) = self.pods.get(pk) {
                push_pod(st, &mut entries);
            }
        }
        if node.peer_refs.contains_key(&identity::WORLD) {
            for pks in self.pods_by_ip.values() {
                for pk in pks {
                    if let Some(st) = self.pods.get(pk) {
                        push_pod(st, &mut entries);
                    }
                }
            }
        } else {
            for pk in node.endpoints.values() {
                if let Some(st) = self.pods.get(pk) {
                    push_pod(st, &mut entries);
                }
            }
            for peer in node.peer_refs.keys() {
                if let Some(ps) = self.identities.get(peer) {
                    for pk in &ps.pods {
                        if let Some(st) = self.pods.get(pk) {
                            push_pod(st, &mut entries);
                        }
                    }
                }
            }
        }
        entries.sort_unstable();
        entries.dedup();
        let mut out: Entries = Vec::with_capacity(entries.len());
        let mut i = 0;
        while i < entries.len() {
            let net = entries[i].0;
            let mut j = i + 1;
            while j < entries.len() && entries[j].0 == net {
                j += 1;
            }
            if j - i == 1 {
                out.push(entries[i]);
            } else if let Some(id) = self.pod_entry(n, &net.ip()) {
                out.push((net, id));
            }
            i = j;
        }
        out
    }

    pub(super) fn cidr_identity(&self, net: &IpNetwork) -> Option<Identity> {
        self.cidr_refs
            .contains_key(net)
            .then(|| self.cidr_slots.get(net))
            .flatten()
    }
}
