//! The policy repository: NetworkPolicy, ClusterNetworkPolicy and ServicePolicy objects, their contributions to the identities they select, and each identity's compiled policy.

use super::*;

impl PolicyEngine {
    pub(super) fn upsert_policy(&mut self, policy: Policy) -> Result<(), EngineError> {
        if policy.quarantine.is_some() || self.quarantines.contains_key(&policy.key) {
            return self.upsert_quarantine(policy);
        }
        if self
            .policies
            .get(&policy.key)
            .is_some_and(|s| s.policy == policy)
        {
            return Ok(());
        }
        let key = policy.key.clone();
        let new_cidrs: Vec<IpNetwork> = policy.cidrs().collect();
        let old_cidrs: Vec<IpNetwork> = match self.policies.get(&key) {
            Some(s) => s.policy.cidrs().collect(),
            None => Vec::new(),
        };
        let slot = match self.policies.get(&key) {
            Some(s) => s.slot,
            None => {
                let (slot, moves) = self
                    .policy_slots
                    .insert(Arc::new(key.clone()), slot_hash(&key))?;
                self.move_policies(moves);
                slot
            }
        };
        self.remove_policy_contributions(&key);
        self.adjust_cidrs(&old_cidrs, &new_cidrs)?;
        self.add_policy(policy, slot);
        Ok(())
    }

    pub(super) fn delete_policy(&mut self, key: &PolicyKey) -> Result<(), EngineError> {
        if self.quarantines.contains_key(key) {
            return self.delete_quarantine(key);
        }
        let Some(st) = self.policies.get(key) else {
            return Ok(());
        };
        let old_cidrs: Vec<IpNetwork> = st.policy.cidrs().collect();
        let slot = st.slot;
        self.remove_policy_contributions(key);
        self.policies.remove(key);
        self.note_renamed_slot(slot);
        let moves = self.policy_slots.remove(key);
        self.move_policies(moves);
        self.adjust_cidrs(&old_cidrs, &[])?;
        Ok(())
    }

    pub(super) fn note_renamed_slot(&mut self, slot: u32) {
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

    /// Policies renumbered by a slot collision: re-add them under their new rule ids.
    pub(super) fn move_policies(&mut self, moves: Vec<Move<Arc<PolicyKey>>>) {
        for m in moves {
            self.note_renamed_slot(m.from);
            self.note_renamed_slot(m.to);
            if let Some(policy) = self.policies.get(&*m.key).map(|s| s.policy.clone()) {
                self.remove_policy_contributions(&m.key);
                self.add_policy(policy, m.to);
            }
            if let Some(q) = self.quarantines.remove(&*m.key) {
                self.release_quarantine_shapes(&q);
                self.add_quarantine(q.policy, m.to);
                self.dirty_quarantine_groups();
            }
        }
    }

    pub(super) fn add_policy(&mut self, policy: Policy, slot: u32) {
        let subject = self.intern(SelectionSpec::Pods(policy.subject.clone()));
        let mut shapes: Vec<(Direction, Shape, RuleId)> = Vec::new();
        for rule in &policy.rules {
            let id = rule_id(slot, rule.direction, Some(rule.index));
            for peer in &rule.peers {
                for port in &rule.ports {
                    let named = matches!(port, PortSpec::Named { .. });
                    let peer_ref = match peer {
                        Peer::Any if named && rule.direction == Direction::Egress => {
                            PeerRef::Sel(self.intern(SelectionSpec::AllPods))
                        }
                        Peer::Any => PeerRef::Any,
                        Peer::Pods(s) => PeerRef::Sel(self.intern(SelectionSpec::Pods(s.clone()))),
                        Peer::Cidr(c) => PeerRef::Sel(self.intern(SelectionSpec::Cidr(c.clone()))),
                        Peer::World => PeerRef::Sel(self.intern(SelectionSpec::World)),
                        Peer::Cluster => PeerRef::Sel(self.intern(SelectionSpec::Cluster)),
                        Peer::Host => PeerRef::Sel(self.intern(SelectionSpec::Host)),
                    };
                    shapes.push((
                        rule.direction,
                        Shape {
                            peer: peer_ref,
                            port: port.clone(),
                            tier: rule.tier,
                            priority: rule.priority,
                            action: rule.action,
                            audit: rule.audit,
                        },
                        id,
                    ));
                }
            }
        }
        for (direction, shape, id) in shapes {
            if let PeerRef::Sel(p) = shape.peer {
                *self.sel_mut(p).peer_users.entry(subject).or_default() += 1;
            }
            let data = self
                .sel_mut(subject)
                .subject
                .get_or_insert_with(Default::default);
            data.shapes[direction as usize]
                .entry(shape)
                .or_default()
                .insert(id);
        }
        let data = self
            .sel_mut(subject)
            .subject
            .get_or_insert_with(Default::default);
        data.refs += 1;
        for d in Direction::ALL {
            let id = rule_id(slot, d, None);
            match policy.isolation(d) {
                Isolation::None => {}
                Isolation::Enforce => {
                    data.isolation[d as usize].insert(id);
                }
                Isolation::Audit => {
                    data.audit_isolation[d as usize].insert(id);
                }
            }
        }
        self.mark_subject_dirty(subject);
        self.policies.insert(
            policy.key.clone(),
            PolicyState {
                policy,
                slot,
                subject,
            },
        );
    }

    pub(super) fn remove_policy_contributions(&mut self, key: &PolicyKey) {
        let Some(st) = self.policies.get(key) else {
            return;
        };
        let (subject, slot) = (st.subject, st.slot);
        let policy = st.policy.clone();
        self.mark_subject_dirty(subject);
        let mut releases = Vec::new();
        for rule in &policy.rules {
            let id = rule_id(slot, rule.direction, Some(rule.index));
            for peer in &rule.peers {
                for port in &rule.ports {
                    let named = matches!(port, PortSpec::Named { .. });
                    let spec = match peer {
                        Peer::Any if named && rule.direction == Direction::Egress => {
                            Some(SelectionSpec::AllPods)
                        }
                        Peer::Any => None,
                        Peer::Pods(s) => Some(SelectionSpec::Pods(s.clone())),
                        Peer::Cidr(c) => Some(SelectionSpec::Cidr(c.clone())),
                        Peer::World => Some(SelectionSpec::World),
                        Peer::Cluster => Some(SelectionSpec::Cluster),
                        Peer::Host => Some(SelectionSpec::Host),
                    };
                    let peer_ref = match spec.and_then(|s| self.sel_by_spec.get(&s).copied()) {
                        Some(p) => PeerRef::Sel(p),
                        None => PeerRef::Any,
                    };
                    let shape = Shape {
                        peer: peer_ref,
                        port: port.clone(),
                        tier: rule.tier,
                        priority: rule.priority,
                        action: rule.action,
                        audit: rule.audit,
                    };
                    if let Some(data) = self.sel_mut(subject).subject.as_mut() {
                        let map = &mut data.shapes[rule.direction as usize];
                        if let Some(set) = map.get_mut(&shape) {
                            set.remove(&id);
                            if set.is_empty() {
                                map.remove(&shape);
                            }
                        }
                    }
                    if let PeerRef::Sel(p) = peer_ref {
                        let users = &mut self.sel_mut(p).peer_users;
                        if let Some(c) = users.get_mut(&subject) {
                            *c -= 1;
                            if *c == 0 {
                                users.remove(&subject);
                            }
                        }
                        releases.push(p);
                    }
                }
            }
        }
        for p in releases {
            self.release(p);
        }
        let s = self.sel_mut(subject);
        if let Some(data) = s.subject.as_mut() {
            for d in Direction::ALL {
                let id = rule_id(slot, d, None);
                data.isolation[d as usize].remove(&id);
                data.audit_isolation[d as usize].remove(&id);
            }
            data.refs -= 1;
            if data.refs == 0 {
                s.subject = None;
            }
        }
        self.release(subject);
        // The state itself is dropped or replaced by the caller.
    }

    pub(super) fn mark_subject_dirty(&mut self, subject: SelId) {
        if self.journal.active {
            let ids: Vec<Identity> = self.sel(subject).matched.iter().copied().collect();
            self.journal.dirty.extend(ids);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Per-identity policy.

    pub(super) fn compute_policy(&self, id: Identity) -> EndpointPolicy {
        let mut out = EndpointPolicy::default();
        let Some(st) = self.identities.get(&id) else {
            return out;
        };
        if let IdentityKind::Quarantine(set) = &st.kind {
            return self.compute_quarantine_policy(set);
        }
        let IdentityKind::Pod(own_key) = &st.kind else {
            return out;
        };
        for d in Direction::ALL {
            let di = d as usize;
            let mut isolated: Option<RuleId> = None;
            let mut audit_isolated: Option<RuleId> = None;
            let mut entries: Vec<PolicyEntry> = Vec::new();
            for sel in &st.member_of {
                let Some(data) = self.sel(*sel).subject.as_ref() else {
                    continue;
                };
                if let Some(r) = data.isolation[di].first() {
                    isolated = Some(isolated.map_or(*r, |x| x.min(*r)));
                }
                if let Some(r) = data.audit_isolation[di].first() {
                    audit_isolated = Some(audit_isolated.map_or(*r, |x| x.min(*r)));
                }
                for (shape, rules) in &data.shapes[di] {
                    let Some(rule) = rules.first().copied() else {
                        continue;
                    };
                    self.expand(shape, rule, d, own_key, &mut entries);
                }
            }
            dedup_entries(&mut entries);
            *out.direction_mut(d) = DirectionPolicy {
                isolated_by: isolated,
                audit_isolated_by: if isolated.is_some() {
                    None
                } else {
                    audit_isolated
                },
                entries,
            };
        }
        out
    }

    pub(super) fn expand(
        &self,
        shape: &Shape,
        rule: RuleId,
        direction: Direction,
        own_key: &IdentityKey,
        out: &mut Vec<PolicyEntry>,
    ) {
        let mut push = |peer: Identity, protocol: Option<Protocol>, ports: PortRange| {
            out.push(PolicyEntry {
                peer,
                protocol,
                ports,
                tier: shape.tier,
                priority: shape.priority,
                action: shape.action,
                audit: shape.audit,
                rule,
            })
        };
        let emit = |peer: Identity, push: &mut dyn FnMut(Identity, Option<Protocol>, PortRange)| {
            match &shape.port {
                PortSpec::Range { protocol, ports } => push(peer, *protocol, *ports),
                PortSpec::Named { protocol, name } => {
                    let target: Option<&IdentityKey> = match direction {
                        Direction::Ingress => Some(own_key),
                        Direction::Egress => match self.identities.get(&peer).map(|s| &s.kind) {
                            Some(IdentityKind::Pod(k)) => Some(k),
                            _ => None,
                        },
                    };
                    if let Some(target) = target {
                        for (proto, port) in target.named_port(name, *protocol) {
                            push(peer, Some(proto), PortRange::single(port));
                        }
                    }
                }
            }
        };
        match shape.peer {
            PeerRef::Any => emit(identity::ANY, &mut push),
            PeerRef::Sel(s) => {
                for m in &self.sel(s).matched {
                    emit(*m, &mut push);
                }
            }
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
        if !self.identities.contains_key(&id) {
            return;
        }
        let new = self.compute_policy(id);
        self.install_policy(id, new);
    }

    pub(super) fn install_policy(&mut self, id: Identity, new: EndpointPolicy) {
        self.refresh_quarantine_allow(id);
        let Some(st) = self.identities.get_mut(&id) else {
            return;
        };
        if *st.policy == new {
            return;
        }
        let mut peers: Vec<Identity> = [&new.ingress, &new.egress]
            .into_iter()
            .flat_map(|d| d.entries.iter().map(|e| e.peer))
            .filter(|p| *p != identity::ANY)
            .collect();
        peers.sort_unstable();
        peers.dedup();
        let mut rules: Vec<RuleId> = [&new.ingress, &new.egress]
            .into_iter()
            .flat_map(|d| {
                d.entries
                    .iter()
                    .map(|e| e.rule)
                    .chain(d.isolated_by)
                    .chain(d.audit_isolated_by)
            })
            .collect();
        rules.sort_unstable();
        rules.dedup();
        let old = std::mem::replace(&mut st.policy, Arc::new(new));
        st.contribution = Arc::new(Contribution { peers, rules });
        if self.journal.active {
            self.journal.old_policy.entry(id).or_insert(old);
            self.journal.dp_changed.insert(id);
            for n in st.endpoints.keys() {
                self.journal.flags.insert((*n, id));
            }
        }
    }
}
