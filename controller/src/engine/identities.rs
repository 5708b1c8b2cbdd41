//! Security identities: pods' (a function of namespace, service account and identity labels) and CIDRs', allocated and moved in their ordered slots.

use super::*;

impl PolicyEngine {
    pub(super) fn adjust_cidrs(
        &mut self,
        old: &[IpNetwork],
        new: &[IpNetwork],
    ) -> Result<(), EngineError> {
        let mut gone = Vec::new();
        let mut added = Vec::new();
        for c in new {
            let r = self.cidr_refs.entry(*c).or_default();
            *r += 1;
            if *r == 1 {
                added.push(*c);
            }
        }
        for c in old {
            if let Some(r) = self.cidr_refs.get_mut(c) {
                *r -= 1;
                if *r == 0 {
                    self.cidr_refs.remove(c);
                    gone.push(*c);
                }
            }
        }
        for c in &added {
            if self.journal.active {
                let before = self.cidr_slots.get(c);
                self.journal.cidr_old.entry(*c).or_insert(before);
            }
            let (id, moves) = self.cidr_slots.insert(*c, cidr_hash(c))?;
            self.move_cidr_identities(moves);
            self.create_identity(id, IdentityKind::Cidr(*c));
        }
        for c in &gone {
            if let Some(id) = self.cidr_slots.get(c) {
                if self.journal.active {
                    self.journal.cidr_old.entry(*c).or_insert(Some(id));
                }
                self.destroy_identity(id);
                let moves = self.cidr_slots.remove(c);
                self.move_cidr_identities(moves);
            }
        }
        // Pods inside a CIDR that appeared or disappeared change CIDR class.
        let mut rekey: BTreeSet<PodRef> = BTreeSet::new();
        for c in added.iter().chain(gone.iter()) {
            for (ip, pods) in self.pods_by_ip.range(c.network()..=c.broadcast()) {
                if c.contains(*ip) {
                    rekey.extend(pods.iter().cloned());
                }
            }
        }
        for pk in rekey {
            if let Some(st) = self.pods.get(&pk) {
                let pod = self.full_pod(st);
                if self.identity_key(&pod) != *self.pod_identity_key(st.identity) {
                    let keep = st.endpoint.is_some();
                    self.detach_pod(&pk, keep);
                    self.insert_pod(pod)?;
                }
            }
        }
        Ok(())
    }

    pub(super) fn pod_identity_key(&self, id: Identity) -> Arc<IdentityKey> {
        match self.identities.get(&id).map(|s| &s.kind) {
            Some(IdentityKind::Pod(k)) => k.clone(),
            _ => Arc::new(IdentityKey {
                namespace: String::new(),
                service_account: String::new(),
                labels: BTreeMap::new(),
                named_ports: Vec::new(),
                cidr_class: Vec::new(),
            }),
        }
    }

    pub(super) fn move_cidr_identities(&mut self, moves: Vec<Move<IpNetwork>>) {
        let mut taken = Vec::new();
        for m in &moves {
            if self.journal.active {
                self.journal.cidr_old.entry(m.key).or_insert(Some(m.from));
            }
            taken.push(self.destroy_identity(m.from));
        }
        for m in moves {
            self.create_identity(m.to, IdentityKind::Cidr(m.key));
        }
        drop(taken);
    }

    // -----------------------------------------------------------------------------------------
    // Identities.

    pub(super) fn acquire_pod_identity(
        &mut self,
        key: IdentityKey,
    ) -> Result<Identity, EngineError> {
        if let Some(id) = self.pod_slots.get(&key) {
            return Ok(id);
        }
        let hash = key.home_hash();
        let key = Arc::new(key);
        let (id, moves) = self.pod_slots.insert(key.clone(), hash)?;
        self.move_pod_identities(moves);
        self.create_identity(id, IdentityKind::Pod(key));
        Ok(id)
    }

    pub(super) fn release_pod_identity(&mut self, id: Identity) {
        let Some(state) = self.destroy_identity(id) else {
            return;
        };
        if let IdentityKind::Pod(key) = &state.kind {
            let moves = self.pod_slots.remove(key);
            self.move_pod_identities(moves);
        }
    }

    /// Identities renumbered by a collision: their pods and endpoints move to the new number.
    pub(super) fn move_pod_identities(&mut self, moves: Vec<Move<Arc<IdentityKey>>>) {
        let mut taken = Vec::new();
        for m in moves {
            if let Some(state) = self.destroy_identity(m.from) {
                taken.push((m, state));
            }
        }
        for (m, old) in taken {
            self.create_identity(m.to, old.kind.clone());
            for pk in &old.pods {
                self.touch_pod(pk);
                let Some(st) = self.pods.get_mut(pk) else {
                    continue;
                };
                st.identity = m.to;
                let (node, ep) = (st.node, st.endpoint);
                // A quarantined pod's endpoint stays in its quarantine group.
                let ep = ep.filter(|_| st.quarantine.is_none());
                if let Some(s) = self.identities.get_mut(&m.to) {
                    s.pods.insert(pk.clone());
                    if let Some(ep) = ep {
                        s.endpoints.entry(node).or_default().insert(ep);
                    }
                }
                if ep.is_some() && self.journal.active {
                    self.journal.flags.insert((node, m.from));
                    self.journal.flags.insert((node, m.to));
                }
            }
        }
    }

    pub(super) fn create_identity(&mut self, id: Identity, kind: IdentityKind) {
        let ns = match &kind {
            IdentityKind::Pod(k) => Some(k.namespace.clone()),
            _ => None,
        };
        self.identities.insert(
            id,
            IdentityState {
                kind,
                pods: FxHashSet::default(),
                member_of: FxHashSet::default(),
                policy: Arc::default(),
                contribution: Arc::new(Contribution::default()),
                endpoints: FxHashMap::default(),
                quarantine_allow: Arc::default(),
            },
        );
        let mut candidates: Vec<SelId> = self.sel_global.iter().copied().collect();
        if let Some(ns) = &ns {
            self.identities_by_ns
                .entry(ns.clone())
                .or_default()
                .insert(id);
            if let Some(s) = self.sel_by_ns.get(ns) {
                candidates.extend(s.iter().copied());
            }
        }
        for s in candidates {
            if self.spec_matches(&self.sel(s).spec, id) {
                self.set_member(s, id, true);
            }
        }
        if self.journal.active {
            self.journal.dirty.insert(id);
        }
    }

    pub(super) fn destroy_identity(&mut self, id: Identity) -> Option<IdentityState> {
        let member_of: Vec<SelId> = self
            .identities
            .get(&id)?
            .member_of
            .iter()
            .copied()
            .collect();
        for s in member_of {
            self.set_member(s, id, false);
        }
        let state = self.identities.remove(&id)?;
        if self.journal.active {
            self.journal
                .old_policy
                .entry(id)
                .or_insert_with(|| state.policy.clone());
            if matches!(state.kind, IdentityKind::Quarantine(_)) {
                self.journal
                    .allow_old
                    .entry(id)
                    .or_insert_with(|| state.quarantine_allow.clone());
            }
        }
        if let IdentityKind::Pod(k) = &state.kind
            && let Some(set) = self.identities_by_ns.get_mut(&k.namespace)
        {
            set.remove(&id);
            if set.is_empty() {
                self.identities_by_ns.remove(&k.namespace);
            }
        }
        Some(state)
    }
}
