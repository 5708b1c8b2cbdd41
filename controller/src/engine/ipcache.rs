//! What a node's ipcache holds (see the engine's module docs): the entry of each pod address
//! now, and as it was before the change in the journal. These read every concern (placement,
//! identities, spans, quarantines) and own nothing.

use super::*;

impl PolicyEngine {
    /// The identity (and quarantine group) node `n`'s ipcache gives a pod address, if it
    /// carries it: the first pod (by name) with that address that is local to the node,
    /// quarantined, or whose identity the node references.
    pub(super) fn pod_entry(&self, n: NodeIdx, ip: &IpAddr) -> Option<PodEntry> {
        let world = self.span.references_peer(n, identity::WORLD);
        self.inventory.pods_at(ip).iter().find_map(|pk| {
            let st = self.inventory.pod(pk)?;
            let local = st.node == n && st.endpoint.is_some();
            let quarantined = st.quarantine.is_some();
            (local || world || quarantined || self.span.references_peer(n, st.identity))
                .then_some((st.identity, st.quarantine))
        })
    }

    /// A quarantine group's exception identities now.
    pub(super) fn allow_of(&self, group: Identity) -> Arc<Vec<Identity>> {
        self.quarantines.allow_of(group)
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
        let had = |peer: Identity| {
            j.peer_old
                .get(&(n, peer))
                .copied()
                .unwrap_or_else(|| self.span.references_peer(n, peer))
        };
        let world = had(identity::WORLD);
        let carried = |node_of: NodeIdx, id: Identity, endpoint: bool, quarantined: bool| {
            node_of == n && endpoint || world || quarantined || had(id)
        };
        // Pods at the address before: untouched ones as they are (already in key order)…
        let untouched = Some(self.inventory.pods_at(ip)).and_then(|set| {
            set.iter().find_map(|pk| {
                if j.pods.contains_key(&**pk) {
                    return None;
                }
                let st = self.inventory.pod(pk)?;
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
        for pk in self.quarantines.pods() {
            if let Some(st) = self.inventory.pod(pk) {
                push_pod(st, &mut entries);
            }
        }
        if self.span.references_peer(n, identity::WORLD) {
            for (_, pks) in self.inventory.addresses() {
                for pk in pks {
                    if let Some(st) = self.inventory.pod(pk) {
                        push_pod(st, &mut entries);
                    }
                }
            }
        } else {
            for pk in self.inventory.endpoints(n).values() {
                if let Some(st) = self.inventory.pod(pk) {
                    push_pod(st, &mut entries);
                }
            }
            for peer in self.span.peers(n) {
                for pk in self.identities.pods(peer) {
                    if let Some(st) = self.inventory.pod(pk) {
                        push_pod(st, &mut entries);
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
}
