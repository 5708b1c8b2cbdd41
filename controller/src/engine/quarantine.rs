//! Quarantines: their expiry clock, the quarantine groups pods move to, and those groups' policies and exceptions.

use super::*;

impl PolicyEngine {
    // -----------------------------------------------------------------------------------------
    // Quarantines.
    //
    // A Quarantine applies to pods, not identities: the endpoints of the pods it selects leave
    // their identity's policy group for a quarantine group — one per set of active Quarantines
    // selecting a pod, numbered from FIRST_QUARANTINE_GROUP by the set (like identities, by
    // ordered slots: the numbers depend only on the sets in use). The group holds only the
    // quarantines' entries: nothing below the quarantine tier could decide anyway, since the
    // deny-all matches every packet. Identities never change, so no other endpoint's policy does.

    /// The engine's clock, against which Quarantines expire.
    pub fn now(&self) -> SystemTime {
        self.now
    }

    /// A Quarantine the engine has (active or expired).
    pub fn quarantine(&self, key: &PolicyKey) -> Option<&Policy> {
        self.quarantines.get(key).map(|q| &q.policy)
    }

    /// Whether the Quarantine `key` exists and has not expired at the engine's clock.
    pub fn quarantine_active(&self, key: &PolicyKey) -> bool {
        self.quarantines.get(key).is_some_and(|q| q.active)
    }

    /// The active Quarantines that select `pod`, sorted (empty when it is not quarantined).
    pub fn quarantines_of_pod(&self, pod: &PodKey) -> Vec<PolicyKey> {
        let group = self.pods.get(pod).and_then(|st| st.quarantine);
        match group.and_then(|g| self.identities.get(&g)).map(|s| &s.kind) {
            Some(IdentityKind::Quarantine(set)) => set.to_vec(),
            _ => Vec::new(),
        }
    }

    /// Every quarantined pod, sorted.
    pub fn quarantined_pods(&self) -> Vec<PodKey> {
        self.quarantined_pods
            .iter()
            .map(|pk| PodKey::clone(pk))
            .collect()
    }

    /// The earliest `expiresAt` of an active Quarantine: when [`Self::expire`] next has work.
    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.quarantines
            .values()
            .filter(|q| q.active)
            .filter_map(|q| q.policy.quarantine.as_ref()?.expires_at)
            .min()
    }

    /// Advances the engine's clock to `now` (it never goes back) and deactivates the
    /// Quarantines whose `expiresAt` is not after it, as if they had been deleted; returns the
    /// deltas of the nodes that changed (none, and no version bump, when nothing expired). The
    /// controller calls it periodically — or at [`Self::next_expiry`] — with
    /// `SystemTime::now()`; tests pass any instant.
    pub fn expire(&mut self, now: SystemTime) -> Result<Vec<NodeDelta>, EngineError> {
        let now = self.now.max(now);
        let due = self.quarantines.values().any(|q| {
            q.active
                != q.policy
                    .quarantine
                    .as_ref()
                    .is_some_and(|s| s.active_at(now))
        });
        if !due {
            self.now = now;
            return Ok(Vec::new());
        }
        self.journaled(|e| e.set_clock(now))
    }

    pub(super) fn set_clock(&mut self, now: SystemTime) -> Result<(), EngineError> {
        self.now = now;
        let mut namespaces = BTreeSet::new();
        let mut cidrs: (Vec<IpNetwork>, Vec<IpNetwork>) = (Vec::new(), Vec::new());
        for (key, q) in self.quarantines.iter_mut() {
            let active = q
                .policy
                .quarantine
                .as_ref()
                .is_some_and(|s| s.active_at(now));
            if active != q.active {
                q.active = active;
                namespaces.insert(key.namespace.clone());
                let list = if active { &mut cidrs.1 } else { &mut cidrs.0 };
                list.extend(q.policy.cidrs());
            }
        }
        self.adjust_cidrs(&cidrs.0, &cidrs.1)?;
        for ns in namespaces {
            self.requarantine_namespace(&ns)?;
        }
        Ok(())
    }

    /// The CIDRs of a policy that have identities: an inactive (expired) Quarantine's have
    /// none, so that it leaves no trace.
    pub(super) fn live_cidrs(&self, policy: &Policy) -> Vec<IpNetwork> {
        match &policy.quarantine {
            Some(spec) if !spec.active_at(self.now) => Vec::new(),
            _ => policy.cidrs().collect(),
        }
    }

    pub(super) fn upsert_quarantine(&mut self, policy: Policy) -> Result<(), EngineError> {
        if policy.quarantine.is_none() {
            // The key no longer names a Quarantine.
            self.delete_quarantine(&policy.key)?;
            return self.upsert_policy(policy);
        }
        if self.policies.contains_key(&policy.key) {
            self.delete_policy(&policy.key)?;
        }
        if self
            .quarantines
            .get(&policy.key)
            .is_some_and(|q| q.policy == policy)
        {
            return Ok(());
        }
        let key = policy.key.clone();
        let new_cidrs = self.live_cidrs(&policy);
        let old = self.quarantines.remove(&key);
        let old_cidrs: Vec<IpNetwork> = old
            .as_ref()
            .map(|q| self.live_cidrs(&q.policy))
            .unwrap_or_default();
        let slot = match &old {
            Some(q) => {
                self.release_quarantine_shapes(q);
                q.slot
            }
            None => {
                let (slot, moves) = self
                    .policy_slots
                    .insert(Arc::new(key.clone()), slot_hash(&key))?;
                self.move_policies(moves);
                slot
            }
        };
        self.adjust_cidrs(&old_cidrs, &new_cidrs)?;
        self.add_quarantine(policy, slot);
        self.dirty_quarantine_groups();
        self.requarantine_namespace(&key.namespace)
    }

    pub(super) fn delete_quarantine(&mut self, key: &PolicyKey) -> Result<(), EngineError> {
        let Some(q) = self.quarantines.remove(key) else {
            return Ok(());
        };
        self.release_quarantine_shapes(&q);
        let old_cidrs = self.live_cidrs(&q.policy);
        self.note_renamed_slot(q.slot);
        let moves = self.policy_slots.remove(key);
        self.move_policies(moves);
        self.adjust_cidrs(&old_cidrs, &[])?;
        self.dirty_quarantine_groups();
        self.requarantine_namespace(&key.namespace)
    }

    /// Interns the Quarantine's exception peers and records its entries: each exception in
    /// its direction (priority 0), and the deny-all (priority 1) under the policy's default
    /// rule id in both directions.
    pub(super) fn add_quarantine(&mut self, policy: Policy, slot: u32) {
        let mut shapes: [Vec<(Shape, RuleId)>; 2] = Default::default();
        for rule in &policy.rules {
            let id = rule_id(slot, rule.direction, Some(rule.index));
            for peer in &rule.peers {
                for port in &rule.ports {
                    let peer_ref = match peer {
                        Peer::Any => PeerRef::Any,
                        Peer::Pods(s) => PeerRef::Sel(self.intern(SelectionSpec::Pods(s.clone()))),
                        Peer::Cidr(c) => PeerRef::Sel(self.intern(SelectionSpec::Cidr(c.clone()))),
                        Peer::World => PeerRef::Sel(self.intern(SelectionSpec::World)),
                        Peer::Cluster => PeerRef::Sel(self.intern(SelectionSpec::Cluster)),
                        Peer::Host => PeerRef::Sel(self.intern(SelectionSpec::Host)),
                    };
                    if let PeerRef::Sel(p) = peer_ref {
                        *self.quarantine_peer_sels.entry(p).or_default() += 1;
                    }
                    shapes[rule.direction as usize].push((
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
        for d in Direction::ALL {
            shapes[d as usize].push((
                Shape {
                    peer: PeerRef::Any,
                    port: PortSpec::ANY,
                    tier: Tier::Quarantine,
                    priority: QUARANTINE_DENY_PRIORITY,
                    action: Action::Deny,
                    audit: false,
                },
                rule_id(slot, d, None),
            ));
        }
        let active = policy
            .quarantine
            .as_ref()
            .is_some_and(|s| s.active_at(self.now));
        self.quarantines.insert(
            policy.key.clone(),
            QuarantineState {
                policy,
                slot,
                shapes,
                active,
            },
        );
    }

    pub(super) fn release_quarantine_shapes(&mut self, q: &QuarantineState) {
        for (shape, _) in q.shapes.iter().flatten() {
            if let PeerRef::Sel(p) = shape.peer {
                if let Some(c) = self.quarantine_peer_sels.get_mut(&p) {
                    *c -= 1;
                    if *c == 0 {
                        self.quarantine_peer_sels.remove(&p);
                    }
                }
                self.release(p);
            }
        }
    }

    pub(super) fn dirty_quarantine_groups(&mut self) {
        if self.journal.active {
            self.journal
                .dirty
                .extend(self.quarantine_groups.iter().copied());
        }
    }

    /// The active Quarantines selecting a pod, sorted by key.
    pub(super) fn quarantine_set_of(&self, st: &PodState) -> Vec<PolicyKey> {
        let labels = self.pod_labels(st);
        self.quarantines
            .iter()
            .filter(|(key, q)| {
                q.active
                    && key.namespace == st.pod.namespace
                    && match q.policy.quarantine.as_ref().and_then(|s| s.pods.as_ref()) {
                        Some(names) => names.contains(&st.pod.name),
                        None => q.policy.subject.pods.matches(labels),
                    }
            })
            .map(|(key, _)| key.clone())
            .collect()
    }

    pub(super) fn requarantine_namespace(&mut self, ns: &str) -> Result<(), EngineError> {
        let mut pods: Vec<PodRef> = self
            .identities_by_ns
            .get(ns)
            .into_iter()
            .flatten()
            .filter_map(|id| self.identities.get(id))
            .flat_map(|s| s.pods.iter().cloned())
            .collect();
        pods.sort();
        for pk in pods {
            self.requarantine_pod(&pk)?;
        }
        Ok(())
    }

    /// Puts a pod's endpoint in the group its Quarantines call for (its identity's when none).
    pub(super) fn requarantine_pod(&mut self, pk: &PodRef) -> Result<(), EngineError> {
        let Some(st) = self.pods.get(pk) else {
            return Ok(());
        };
        let set = self.quarantine_set_of(st);
        let current = st
            .quarantine
            .and_then(|g| match &self.identities.get(&g)?.kind {
                IdentityKind::Quarantine(s) => Some(s.clone()),
                _ => None,
            });
        let unchanged = match &current {
            None => set.is_empty(),
            Some(c) => **c == set,
        };
        if unchanged {
            return Ok(());
        }
        self.touch_pod(pk);
        let Some(st) = self.pods.get_mut(pk) else {
            return Ok(());
        };
        let (node, endpoint, old_group) = (st.node, st.endpoint, st.group());
        let old_quarantine = st.quarantine.take();
        if let Some(ep) = endpoint {
            self.detach_endpoint(node, old_group, ep);
        }
        if let Some(g) = old_quarantine {
            self.quarantined_pods.remove(pk);
            self.leave_quarantine_group(g, pk);
        }
        if !set.is_empty() {
            let g = self.acquire_quarantine_group(Arc::new(set))?;
            if let Some(s) = self.identities.get_mut(&g) {
                s.pods.insert(pk.clone());
            }
            if let Some(st) = self.pods.get_mut(pk) {
                st.quarantine = Some(g);
            }
            self.quarantined_pods.insert(pk.clone());
        }
        if let Some(ep) = endpoint {
            let group = self.pods.get(pk).map_or(old_group, |st| st.group());
            self.attach_endpoint(node, group, ep);
        }
        Ok(())
    }

    pub(super) fn attach_endpoint(&mut self, node: NodeIdx, group: Identity, ep: u32) {
        if let Some(s) = self.identities.get_mut(&group) {
            s.endpoints.entry(node).or_default().insert(ep);
        }
        if self.journal.active {
            self.journal.flags.insert((node, group));
        }
    }

    pub(super) fn acquire_quarantine_group(
        &mut self,
        set: QuarantineSet,
    ) -> Result<Identity, EngineError> {
        if let Some(id) = self.quarantine_slots.get(&set) {
            return Ok(id);
        }
        let hash = quarantine_set_hash(&set);
        let (id, moves) = self.quarantine_slots.insert(set.clone(), hash)?;
        self.move_quarantine_groups(moves);
        self.create_identity(id, IdentityKind::Quarantine(set));
        self.quarantine_groups.insert(id);
        Ok(id)
    }

    /// Takes `pk` out of quarantine group `g` (its endpoint already detached); the last member
    /// out releases the group.
    pub(super) fn leave_quarantine_group(&mut self, g: Identity, pk: &PodKey) {
        let empty = match self.identities.get_mut(&g) {
            Some(s) => {
                s.pods.remove(pk);
                s.pods.is_empty()
            }
            None => false,
        };
        if !empty {
            return;
        }
        self.quarantine_groups.remove(&g);
        if let Some(state) = self.destroy_identity(g)
            && let IdentityKind::Quarantine(set) = &state.kind
        {
            let moves = self.quarantine_slots.remove(set);
            self.move_quarantine_groups(moves);
        }
    }

    /// Quarantine groups renumbered by a collision: their pods' endpoints move with them.
    pub(super) fn move_quarantine_groups(&mut self, moves: Vec<Move<QuarantineSet>>) {
        let mut taken = Vec::new();
        for m in moves {
            self.quarantine_groups.remove(&m.from);
            if let Some(state) = self.destroy_identity(m.from) {
                taken.push((m, state));
            }
        }
        for (m, old) in taken {
            self.create_identity(m.to, old.kind.clone());
            self.quarantine_groups.insert(m.to);
            for pk in &old.pods {
                self.touch_pod(pk);
                let Some(st) = self.pods.get_mut(pk) else {
                    continue;
                };
                st.quarantine = Some(m.to);
                let (node, ep) = (st.node, st.endpoint);
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

    /// A quarantine group's policy: the entries of its Quarantines, and nothing else.
    pub(super) fn compute_quarantine_policy(&self, set: &[PolicyKey]) -> EndpointPolicy {
        // Exceptions have no named ports (the loader refuses them), so no key is consulted.
        let none = IdentityKey {
            namespace: String::new(),
            service_account: String::new(),
            labels: BTreeMap::new(),
            named_ports: Vec::new(),
            cidr_class: Vec::new(),
        };
        let mut out = EndpointPolicy::default();
        for d in Direction::ALL {
            let mut entries = Vec::new();
            for key in set {
                let Some(q) = self.quarantines.get(key) else {
                    continue;
                };
                for (shape, rule) in &q.shapes[d as usize] {
                    self.expand(shape, *rule, d, &none, &mut entries);
                }
            }
            dedup_entries(&mut entries);
            out.direction_mut(d).entries = entries;
        }
        out
    }

    /// The peer identities a quarantine group's exceptions admit, in either direction and on
    /// any port, sorted: the identities each exception's selection matches, or exactly
    /// `[identity::ANY]` when an exception admits every pod. Depends on what the group's policy
    /// depends on, so it is recomputed whenever that is.
    pub(super) fn compute_quarantine_allow(&self, set: &[PolicyKey]) -> Vec<Identity> {
        let mut out = Vec::new();
        for key in set {
            let Some(q) = self.quarantines.get(key) else {
                continue;
            };
            for (shape, _) in q.shapes.iter().flatten() {
                if shape.action != Action::Allow {
                    continue;
                }
                let PeerRef::Sel(s) = shape.peer else {
                    return vec![identity::ANY];
                };
                let sel = self.sel(s);
                if admits_every_pod(&sel.spec) {
                    return vec![identity::ANY];
                }
                out.extend(sel.matched.iter().copied());
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Brings a quarantine group's exception identities up to date; when they change, its
    /// pods' addresses are re-checked on every node (every node carries them).
    pub(super) fn refresh_quarantine_allow(&mut self, id: Identity) {
        let Some(IdentityKind::Quarantine(set)) = self.identities.get(&id).map(|s| &s.kind) else {
            return;
        };
        let new = self.compute_quarantine_allow(set);
        let Some(st) = self.identities.get_mut(&id) else {
            return;
        };
        if *st.quarantine_allow == new {
            return;
        }
        let old = std::mem::replace(&mut st.quarantine_allow, Arc::new(new));
        if !self.journal.active {
            return;
        }
        self.journal.allow_old.entry(id).or_insert(old);
        let nodes = self.nodes.len() as NodeIdx;
        let ips: Vec<IpAddr> = st
            .pods
            .iter()
            .filter_map(|pk| self.pods.get(pk))
            .flat_map(|p| p.pod.ips.iter().copied())
            .collect();
        for n in 0..nodes {
            self.journal.ip_checks.extend(ips.iter().map(|ip| (n, *ip)));
        }
    }
}
