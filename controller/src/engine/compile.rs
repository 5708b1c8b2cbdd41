//! The orchestrator, policy side: a policy or Quarantine change goes to the repository or the
//! quarantines (which intern their selections in the selector cache), its CIDRs to the
//! identities; then, at the end of a step, the identities marked dirty get their policy
//! recomputed and installed, and every flagged (node, group) is re-spanned.

use super::*;

impl PolicyEngine {
    // -----------------------------------------------------------------------------------------
    // Policies.

    pub(super) fn upsert_policy(&mut self, policy: Policy) -> Result<(), EngineError> {
        if policy.quarantine.is_some() || self.quarantines.contains(&policy.key) {
            return self.upsert_quarantine(policy);
        }
        if self.repository.policy(&policy.key) == Some(&policy) {
            return Ok(());
        }
        let key = policy.key.clone();
        let new_cidrs: Vec<IpNetwork> = policy.cidrs().collect();
        let (slot, old_cidrs) = match self.remove_policy(&key) {
            Some(old) => (old.slot, old.policy.cidrs().collect()),
            None => {
                let (slot, moves) = self.repository.allocate_slot(&key)?;
                self.move_policies(moves);
                (slot, Vec::new())
            }
        };
        self.adjust_cidrs(&old_cidrs, &new_cidrs)?;
        self.set_node_user(&key, policy.uses_nodes())?;
        self.add_policy(policy, slot);
        self.refresh_replaced(&key);
        Ok(())
    }

    /// After a staged policy came or went: the enforced policy of the same name goes back in
    /// with its entries in the right view (superseded while the staged one exists).
    fn refresh_replaced(&mut self, key: &PolicyKey) {
        let Some(kind) = key.kind.promoted() else {
            return;
        };
        let enforced = PolicyKey {
            kind,
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        };
        if let Some(old) = self.remove_policy(&enforced) {
            self.add_policy(old.policy, old.slot);
        }
    }

    pub(super) fn delete_policy(&mut self, key: &PolicyKey) -> Result<(), EngineError> {
        if self.quarantines.contains(key) {
            return self.delete_quarantine(key);
        }
        let Some(old) = self.remove_policy(key) else {
            return Ok(());
        };
        let old_cidrs: Vec<IpNetwork> = old.policy.cidrs().collect();
        self.note_renamed_slot(old.slot);
        let moves = self.repository.free_slot(key);
        self.move_policies(moves);
        self.adjust_cidrs(&old_cidrs, &[])?;
        self.set_node_user(key, false)?;
        self.refresh_replaced(key);
        Ok(())
    }

    /// Adds a policy to the repository; its subject's members are to be recomputed.
    pub(super) fn add_policy(&mut self, policy: Policy, slot: u32) {
        let policy = self.without_colliding_names(policy);
        let u = View {
            inventory: &self.inventory,
            identities: &self.identities,
        };
        let subject = self.repository.add(policy, slot, &mut self.selectors, &u);
        self.mark_members_dirty(subject);
    }

    /// Takes a policy out of the repository; its subject's members are to be recomputed.
    fn remove_policy(&mut self, key: &PolicyKey) -> Option<repository::Removed> {
        let subject = self.repository.subject_of(key)?;
        self.mark_members_dirty(subject);
        self.repository.remove(key, &mut self.selectors)
    }

    /// Every rule id of a slot changes meaning: nodes carrying one must hear its new name.
    fn note_renamed_slot(&mut self, slot: u32) {
        if !self.journal.active {
            return;
        }
        for d in Direction::ALL {
            for i in 0..=crate::load::MAX_RULES_PER_DIRECTION as u32 {
                let idx = if i == 0 { None } else { Some(i - 1) };
                self.journal.renamed_rules.insert(rule_id(slot, d, idx));
            }
        }
    }

    /// Policies renumbered by a slot collision: re-added under their new rule ids.
    fn move_policies(&mut self, moves: repository::SlotMoves) {
        for m in moves {
            self.note_renamed_slot(m.from);
            self.note_renamed_slot(m.to);
            if let Some(old) = self.remove_policy(&m.key) {
                self.add_policy(old.policy, m.to);
            }
            if let Some((policy, _)) = self.quarantines.remove(&m.key, &mut self.selectors) {
                self.add_quarantine(policy, m.to);
                self.dirty_quarantine_groups();
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Quarantines.

    pub(super) fn upsert_quarantine(&mut self, policy: Policy) -> Result<(), EngineError> {
        if policy.quarantine.is_none() {
            // The key no longer names a Quarantine.
            self.delete_quarantine(&policy.key)?;
            return self.upsert_policy(policy);
        }
        if self.repository.contains(&policy.key) {
            self.delete_policy(&policy.key)?;
        }
        if self.quarantines.policy(&policy.key) == Some(&policy) {
            return Ok(());
        }
        let key = policy.key.clone();
        let new_cidrs = self.quarantines.live_cidrs(&policy);
        let (slot, old_cidrs) = match self.quarantines.remove(&key, &mut self.selectors) {
            Some((old, slot)) => (slot, self.quarantines.live_cidrs(&old)),
            None => {
                let (slot, moves) = self.repository.allocate_slot(&key)?;
                self.move_policies(moves);
                (slot, Vec::new())
            }
        };
        self.adjust_cidrs(&old_cidrs, &new_cidrs)?;
        self.add_quarantine(policy, slot);
        self.dirty_quarantine_groups();
        self.requarantine_namespace(&key.namespace)
    }

    pub(super) fn delete_quarantine(&mut self, key: &PolicyKey) -> Result<(), EngineError> {
        let Some((policy, slot)) = self.quarantines.remove(key, &mut self.selectors) else {
            return Ok(());
        };
        let old_cidrs = self.quarantines.live_cidrs(&policy);
        self.note_renamed_slot(slot);
        let moves = self.repository.free_slot(key);
        self.move_policies(moves);
        self.adjust_cidrs(&old_cidrs, &[])?;
        self.dirty_quarantine_groups();
        self.requarantine_namespace(&key.namespace)
    }

    pub(super) fn add_quarantine(&mut self, policy: Policy, slot: u32) {
        let u = View {
            inventory: &self.inventory,
            identities: &self.identities,
        };
        self.quarantines.add(policy, slot, &mut self.selectors, &u);
    }

    fn dirty_quarantine_groups(&mut self) {
        if self.journal.active {
            self.journal
                .dirty
                .extend(self.identities.quarantine_groups().iter().copied());
        }
    }

    /// Moves the engine's clock; Quarantines it expires (or revives) leave (or join) their
    /// pods, with their CIDRs' identities.
    pub(super) fn set_clock(&mut self, now: SystemTime) -> Result<(), EngineError> {
        let change = self.quarantines.set_clock(now);
        self.adjust_cidrs(&change.cidrs_out, &change.cidrs_in)?;
        for ns in change.namespaces {
            self.requarantine_namespace(&ns)?;
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Compiled policies and spans.

    /// The policy of an identity (or quarantine group), computed from the repository (or the
    /// quarantines) and the selector cache.
    pub(super) fn compute_policy(&self, id: Identity) -> EndpointPolicy {
        match self.identities.kind(id) {
            Some(IdentityKind::Pod(key)) => {
                self.repository
                    .compute(id, key, &self.selectors, &self.identities)
            }
            Some(IdentityKind::Quarantine(set)) => {
                self.quarantines
                    .compute_policy(set, &self.selectors, &self.identities)
            }
            _ => EndpointPolicy::default(),
        }
    }

    pub(super) fn compute_policies(&self, ids: &[Identity]) -> Vec<(Identity, EndpointPolicy)> {
        let compute = |ids: &[Identity]| -> Vec<(Identity, EndpointPolicy)> {
            ids.iter()
                .map(|id| (*id, self.compute_policy(*id)))
                .collect()
        };
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(ids.len() / 1024 + 1);
        if threads <= 1 {
            return compute(ids);
        }
        std::thread::scope(|scope| {
            let workers: Vec<_> = ids
                .chunks(ids.len().div_ceil(threads))
                .map(|chunk| scope.spawn(move || compute(chunk)))
                .collect();
            workers
                .into_iter()
                // A worker only panics if `compute_policy` does, which it does not: re-raise.
                .flat_map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        })
    }

    pub(super) fn refresh_policy(&mut self, id: Identity) {
        if !self.identities.contains(id) {
            return;
        }
        let new = self.compute_policy(id);
        self.install_policy(id, new);
    }

    pub(super) fn install_policy(&mut self, id: Identity, new: EndpointPolicy) {
        self.refresh_quarantine_allow(id);
        let Some(old) = self.repository.install(id, new) else {
            return;
        };
        if self.journal.active {
            self.journal.old_policy.entry(id).or_insert(old);
            self.journal.dp_changed.insert(id);
            for n in self.inventory.group_nodes(id) {
                self.journal.flags.insert((n, id));
            }
        }
    }

    /// Brings a quarantine group's exception identities up to date; when they change, its
    /// pods' addresses are re-checked on every node (every node carries them).
    fn refresh_quarantine_allow(&mut self, id: Identity) {
        if !is_quarantine_group(id) {
            return;
        }
        let Some(set) = self.identities.quarantine_set(id) else {
            return;
        };
        let Some(old) = self.quarantines.refresh_allow(id, set, &self.selectors) else {
            return;
        };
        if !self.journal.active {
            return;
        }
        self.journal.allow_old.entry(id).or_insert(old);
        let nodes = self.inventory.node_count() as NodeIdx;
        let ips: Vec<IpAddr> = self
            .identities
            .pods(id)
            .filter_map(|pk| self.inventory.pod(pk))
            .flat_map(|p| p.pod.ips.iter().copied())
            .collect();
        for n in 0..nodes {
            self.journal.ip_checks.extend(ips.iter().map(|ip| (n, *ip)));
        }
    }

    /// Brings node `n`'s span in line with identity `id`'s current contribution (or with its
    /// absence when `id` no longer has an endpoint on `n`), and journals what flipped.
    pub(super) fn update_contribution(&mut self, n: NodeIdx, id: Identity) {
        let new = if self.inventory.has_endpoints(id, n) {
            self.repository.contribution(id).cloned()
        } else {
            None
        };
        let change = self.span.update(n, id, new);
        if !self.journal.active {
            return;
        }
        let j = &mut self.journal;
        j.group_old.entry((n, id)).or_insert(change.had_group);
        for (r, on) in change.rules {
            j.rule_old.entry((n, r)).or_insert(!on);
        }
        for (p, on) in change.peers {
            j.peer_old.entry((n, p)).or_insert(!on);
            if p == identity::WORLD {
                j.all_ips.insert(n);
                continue;
            }
            let ips = self
                .identities
                .pods(p)
                .filter_map(|pk| self.inventory.pod(pk))
                .flat_map(|st| st.pod.ips.iter().map(move |ip| (n, *ip)));
            j.ip_checks.extend(ips);
        }
    }
}
