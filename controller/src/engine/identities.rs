//! Security identities: pods' (a function of namespace, service account, identity labels,
//! named ports and CIDR class), CIDRs' (one per CIDR a live policy names) and quarantine
//! groups' numbers, each allocated in its ordered slots, with the pods that hold each one.
//! Allocation and release return [`IdentityChanges`]: the numbers created, destroyed and
//! renumbered (a slot collision moves an identity, with its pods, to another number), which the
//! orchestrator passes on to the selector cache, the repository and the placement.

use super::*;

#[derive(Debug)]
struct IdentityState {
    kind: IdentityKind,
    /// The pods holding the identity (for a quarantine group: the pods in the group).
    pods: FxHashSet<PodRef>,
    /// The nodes holding a node identity (by name).
    nodes: BTreeSet<String>,
}

/// One identity renumbered by a slot collision, with the pods that moved along.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Renumbered {
    pub from: Identity,
    pub to: Identity,
    pub pods: Vec<PodRef>,
    /// For a node identity: the nodes that moved along.
    pub nodes: Vec<String>,
}

/// What an allocation or release did to the identities. `destroyed` lists numbers whose
/// identity went away (released or renumbered); `created`, numbers that got one (new or
/// renumbered). A number may be in both when it was reused.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct IdentityChanges {
    pub created: Vec<Identity>,
    pub destroyed: Vec<Identity>,
    pub renumbered: Vec<Renumbered>,
    /// A CIDR's identity before the change, for every CIDR whose identity appeared, moved or
    /// went away (earliest first).
    pub cidr_before: Vec<(IpNetwork, Option<Identity>)>,
    /// CIDRs that appeared or went away: the pods inside them change CIDR class.
    pub cidrs: Vec<IpNetwork>,
}

impl IdentityChanges {
    #[inline]
    pub(super) fn is_empty(&self) -> bool {
        self.created.is_empty()
            && self.destroyed.is_empty()
            && self.renumbered.is_empty()
            && self.cidr_before.is_empty()
            && self.cidrs.is_empty()
    }
}

pub(super) struct Identities {
    states: FxHashMap<Identity, IdentityState>,
    /// Pod identities by namespace.
    by_ns: FxHashMap<String, FxHashSet<Identity>>,
    pod_slots: OrderedSlots<Arc<IdentityKey>>,
    /// Peer clusters' pods (qualified namespaces), in their own range.
    remote_slots: OrderedSlots<Arc<IdentityKey>>,
    cidr_slots: OrderedSlots<IpNetwork>,
    quarantine_slots: OrderedSlots<QuarantineSet>,
    node_slots: OrderedSlots<Arc<NodeIdentityKey>>,
    /// Quarantine groups in use.
    quarantine_groups: BTreeSet<Identity>,
    /// How many live policies name each CIDR.
    cidr_refs: BTreeMap<IpNetwork, u32>,
}

impl Default for Identities {
    /// The reserved identities (world, host) and nothing else.
    fn default() -> Identities {
        let mut ids = Identities {
            states: FxHashMap::default(),
            by_ns: FxHashMap::default(),
            pod_slots: pod_identity_slots(),
            remote_slots: remote_identity_slots(),
            cidr_slots: cidr_identity_slots(),
            quarantine_slots: quarantine_group_slots(),
            node_slots: node_identity_slots(),
            quarantine_groups: BTreeSet::new(),
            cidr_refs: BTreeMap::new(),
        };
        let mut ch = IdentityChanges::default();
        ids.create(identity::WORLD, IdentityKind::World, &mut ch);
        ids.create(identity::HOST, IdentityKind::Host, &mut ch);
        ids
    }
}

impl Identities {
    #[inline]
    pub(super) fn contains(&self, id: Identity) -> bool {
        self.states.contains_key(&id)
    }

    #[inline]
    pub(super) fn kind(&self, id: Identity) -> Option<&IdentityKind> {
        self.states.get(&id).map(|s| &s.kind)
    }

    /// Every identity (reserved ones, pods', CIDRs' and quarantine groups').
    #[inline]
    pub(super) fn all(&self) -> impl Iterator<Item = Identity> + '_ {
        self.states.keys().copied()
    }

    /// The pod identities of a namespace.
    #[inline]
    pub(super) fn in_namespace(&self, ns: &str) -> impl Iterator<Item = Identity> + '_ {
        self.by_ns.get(ns).into_iter().flatten().copied()
    }

    /// Namespaces with pod identities, with them.
    #[inline]
    pub(super) fn namespaces(&self) -> impl Iterator<Item = (&String, &FxHashSet<Identity>)> {
        self.by_ns.iter()
    }

    /// The pods holding an identity.
    #[inline]
    pub(super) fn pods(&self, id: Identity) -> impl Iterator<Item = &PodRef> {
        self.states.get(&id).into_iter().flat_map(|s| s.pods.iter())
    }

    /// The quarantine groups in use.
    #[inline]
    pub(super) fn quarantine_groups(&self) -> &BTreeSet<Identity> {
        &self.quarantine_groups
    }

    /// The set of Quarantines a quarantine group stands for.
    #[inline]
    pub(super) fn quarantine_set(&self, group: Identity) -> Option<&QuarantineSet> {
        match self.kind(group)? {
            IdentityKind::Quarantine(set) => Some(set),
            _ => None,
        }
    }

    /// Number of pod and CIDR identities (not the reserved ones, nor quarantine groups).
    #[inline]
    pub(super) fn count(&self) -> usize {
        self.pod_slots.len() + self.remote_slots.len() + self.cidr_slots.len()
    }

    /// The key of a pod identity (an empty key for any other).
    #[inline]
    pub(super) fn pod_key(&self, id: Identity) -> Arc<IdentityKey> {
        match self.kind(id) {
            Some(IdentityKind::Pod(k)) => k.clone(),
            _ => Arc::new(empty_key()),
        }
    }

    /// The identity key of a pod: its namespace, service account, filtered labels, named
    /// ports, and the policy CIDRs its addresses are in.
    pub(super) fn key_of_pod(&self, pod: &Pod, filter: &LabelFilter) -> IdentityKey {
        let mut named_ports: Vec<(String, Protocol, u16)> = pod
            .ports
            .iter()
            .filter_map(|p| p.name.clone().map(|n| (n, p.protocol, p.port)))
            .collect();
        named_ports.sort();
        named_ports.dedup();
        let cidr_class = if pod.synthetic_ips {
            Vec::new()
        } else {
            self.cidr_refs
                .keys()
                .filter(|c| pod.ips.iter().any(|ip| c.contains(*ip)))
                .copied()
                .collect()
        };
        IdentityKey {
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
            labels: filter.apply(&pod.labels),
            named_ports,
            cidr_class,
        }
    }

    /// The node identity key of a node with `labels` and `addresses`: its labels and the
    /// policy CIDRs its addresses are in.
    pub(super) fn key_of_node(&self, labels: &Labels, addresses: &[IpAddr]) -> NodeIdentityKey {
        NodeIdentityKey {
            labels: labels.clone(),
            cidr_class: self
                .cidr_refs
                .keys()
                .filter(|c| addresses.iter().any(|ip| c.contains(*ip)))
                .copied()
                .collect(),
        }
    }

    /// The identity of a CIDR a live policy names.
    #[inline]
    pub(super) fn cidr_identity(&self, net: &IpNetwork) -> Option<Identity> {
        self.cidr_refs
            .contains_key(net)
            .then(|| self.cidr_slots.get(net))
            .flatten()
    }

    /// Every CIDR identity, by CIDR.
    #[inline]
    pub(super) fn cidr_identities(&self) -> impl Iterator<Item = (IpNetwork, Identity)> + '_ {
        self.cidr_refs
            .keys()
            .filter_map(|c| self.cidr_slots.get(c).map(|id| (*c, id)))
    }

    /// The identity of `key`, allocated when new, with `pod` as one more holder.
    pub(super) fn acquire_pod_identity(
        &mut self,
        key: IdentityKey,
        pod: &PodRef,
    ) -> Result<(Identity, IdentityChanges), EngineError> {
        let mut ch = IdentityChanges::default();
        let slots = if is_remote_namespace(&key.namespace) {
            &mut self.remote_slots
        } else {
            &mut self.pod_slots
        };
        let id = match slots.get(&key) {
            Some(id) => id,
            None => {
                let hash = key.home_hash();
                let key = Arc::new(key);
                let (id, moves) = slots.insert(key.clone(), hash)?;
                let moves = moves.into_iter().map(|m| (m.from, m.to)).collect();
                self.renumber(moves, &mut ch);
                self.create(id, IdentityKind::Pod(key), &mut ch);
                id
            }
        };
        if let Some(s) = self.states.get_mut(&id) {
            s.pods.insert(pod.clone());
        }
        Ok((id, ch))
    }

    /// The group of the Quarantine set `set`, allocated when new, with `pod` in it.
    pub(super) fn join_quarantine_group(
        &mut self,
        set: QuarantineSet,
        pod: &PodRef,
    ) -> Result<(Identity, IdentityChanges), EngineError> {
        let mut ch = IdentityChanges::default();
        let id = match self.quarantine_slots.get(&set) {
            Some(id) => id,
            None => {
                let hash = quarantine_set_hash(&set);
                let (id, moves) = self.quarantine_slots.insert(set.clone(), hash)?;
                let moves = moves.into_iter().map(|m| (m.from, m.to)).collect();
                self.renumber(moves, &mut ch);
                self.create(id, IdentityKind::Quarantine(set), &mut ch);
                id
            }
        };
        if let Some(s) = self.states.get_mut(&id) {
            s.pods.insert(pod.clone());
        }
        Ok((id, ch))
    }

    /// The node identity of `key`, allocated when new, with node `name` as one more holder.
    pub(super) fn acquire_node_identity(
        &mut self,
        key: NodeIdentityKey,
        name: &str,
    ) -> Result<(Identity, IdentityChanges), EngineError> {
        let mut ch = IdentityChanges::default();
        let id = match self.node_slots.get(&key) {
            Some(id) => id,
            None => {
                let hash = key.home_hash();
                let key = Arc::new(key);
                let (id, moves) = self.node_slots.insert(key.clone(), hash)?;
                let moves = moves.into_iter().map(|m| (m.from, m.to)).collect();
                self.renumber(moves, &mut ch);
                self.create(id, IdentityKind::Node(key), &mut ch);
                id
            }
        };
        if let Some(s) = self.states.get_mut(&id) {
            s.nodes.insert(name.to_string());
        }
        Ok((id, ch))
    }

    /// Takes node `name` off node identity `id`; the last node out releases it.
    pub(super) fn leave_node(&mut self, id: Identity, name: &str) -> IdentityChanges {
        let mut ch = IdentityChanges::default();
        let empty = match self.states.get_mut(&id) {
            Some(s) => {
                s.nodes.remove(name);
                s.nodes.is_empty()
            }
            None => false,
        };
        if !empty {
            return ch;
        }
        let Some(state) = self.destroy(id, &mut ch) else {
            return ch;
        };
        if let IdentityKind::Node(key) = &state.kind {
            let moves = self
                .node_slots
                .remove(key)
                .into_iter()
                .map(|m| (m.from, m.to))
                .collect();
            self.renumber(moves, &mut ch);
        }
        ch
    }

    /// Takes `pod` off identity (or quarantine group) `id`; the last holder out releases it.
    pub(super) fn leave(&mut self, id: Identity, pod: &PodKey) -> IdentityChanges {
        let mut ch = IdentityChanges::default();
        let empty = match self.states.get_mut(&id) {
            Some(s) => {
                s.pods.remove(pod);
                s.pods.is_empty()
            }
            None => false,
        };
        if !empty {
            return ch;
        }
        let Some(state) = self.destroy(id, &mut ch) else {
            return ch;
        };
        fn pairs<K>(moves: Vec<Move<K>>) -> Vec<(Identity, Identity)> {
            moves.into_iter().map(|m| (m.from, m.to)).collect()
        }
        let moves = match &state.kind {
            IdentityKind::Pod(key) if is_remote_namespace(&key.namespace) => {
                pairs(self.remote_slots.remove(key))
            }
            IdentityKind::Pod(key) => pairs(self.pod_slots.remove(key)),
            IdentityKind::Quarantine(set) => pairs(self.quarantine_slots.remove(set)),
            _ => return ch,
        };
        self.renumber(moves, &mut ch);
        ch
    }

    /// Counts the CIDRs of a policy out (`old`) and in (`new`): CIDRs that appear get an
    /// identity, CIDRs no policy names any more lose theirs.
    pub(super) fn adjust_cidrs(
        &mut self,
        old: &[IpNetwork],
        new: &[IpNetwork],
    ) -> Result<IdentityChanges, EngineError> {
        let mut ch = IdentityChanges::default();
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
            ch.cidr_before.push((*c, self.cidr_slots.get(c)));
            let (id, moves) = self.cidr_slots.insert(*c, cidr_hash(c))?;
            self.move_cidrs(moves, &mut ch);
            self.create(id, IdentityKind::Cidr(*c), &mut ch);
        }
        for c in &gone {
            if let Some(id) = self.cidr_slots.get(c) {
                ch.cidr_before.push((*c, Some(id)));
                self.destroy(id, &mut ch);
                let moves = self.cidr_slots.remove(c);
                self.move_cidrs(moves, &mut ch);
            }
        }
        ch.cidrs.extend(added);
        ch.cidrs.extend(gone);
        Ok(ch)
    }

    /// The CIDR identities of a full build, all at once: `cidrs` with their use counts.
    pub(super) fn add_cidrs(
        &mut self,
        cidrs: BTreeMap<IpNetwork, u32>,
    ) -> Result<IdentityChanges, EngineError> {
        let mut ch = IdentityChanges::default();
        for c in cidrs.keys() {
            self.cidr_slots.insert(*c, cidr_hash(c))?;
        }
        self.cidr_refs = cidrs;
        let ids: Vec<(IpNetwork, Identity)> = self.cidr_identities().collect();
        for (c, id) in ids {
            self.create(id, IdentityKind::Cidr(c), &mut ch);
        }
        Ok(ch)
    }

    fn move_cidrs(&mut self, moves: Vec<Move<IpNetwork>>, ch: &mut IdentityChanges) {
        ch.cidr_before
            .extend(moves.iter().map(|m| (m.key, Some(m.from))));
        let moves = moves.into_iter().map(|m| (m.from, m.to)).collect();
        self.renumber(moves, ch);
    }

    /// Moves identities to new numbers (all taken out first: a move may land on a number
    /// another one leaves).
    fn renumber(&mut self, moves: Vec<(Identity, Identity)>, ch: &mut IdentityChanges) {
        let mut taken = Vec::new();
        for (from, to) in moves {
            if let Some(state) = self.destroy(from, ch) {
                taken.push((from, to, state));
            }
        }
        for (from, to, old) in taken {
            self.create(to, old.kind, ch);
            let pods: Vec<PodRef> = old.pods.into_iter().collect();
            let nodes: Vec<String> = old.nodes.into_iter().collect();
            if let Some(s) = self.states.get_mut(&to) {
                s.pods.extend(pods.iter().cloned());
                s.nodes.extend(nodes.iter().cloned());
            }
            ch.renumbered.push(Renumbered {
                from,
                to,
                pods,
                nodes,
            });
        }
    }

    fn create(&mut self, id: Identity, kind: IdentityKind, ch: &mut IdentityChanges) {
        match &kind {
            IdentityKind::Pod(k) => {
                self.by_ns
                    .entry(k.namespace.clone())
                    .or_default()
                    .insert(id);
            }
            IdentityKind::Quarantine(_) => {
                self.quarantine_groups.insert(id);
            }
            _ => {}
        }
        self.states.insert(
            id,
            IdentityState {
                kind,
                pods: FxHashSet::default(),
                nodes: BTreeSet::new(),
            },
        );
        ch.created.push(id);
    }

    fn destroy(&mut self, id: Identity, ch: &mut IdentityChanges) -> Option<IdentityState> {
        let state = self.states.remove(&id)?;
        match &state.kind {
            IdentityKind::Pod(k) => {
                if let Some(set) = self.by_ns.get_mut(&k.namespace) {
                    set.remove(&id);
                    if set.is_empty() {
                        self.by_ns.remove(&k.namespace);
                    }
                }
            }
            IdentityKind::Quarantine(_) => {
                self.quarantine_groups.remove(&id);
            }
            _ => {}
        }
        ch.destroyed.push(id);
        Some(state)
    }
}

fn empty_key() -> IdentityKey {
    IdentityKey {
        namespace: String::new(),
        service_account: String::new(),
        labels: BTreeMap::new(),
        named_ports: Vec::new(),
        cidr_class: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, app: &str) -> IdentityKey {
        IdentityKey {
            namespace: ns.into(),
            service_account: "default".into(),
            labels: [("app".to_string(), app.to_string())].into_iter().collect(),
            ..empty_key()
        }
    }

    fn pod(name: &str) -> PodRef {
        Arc::new(PodKey {
            namespace: "a".into(),
            name: name.into(),
        })
    }

    #[test]
    fn a_pod_identity_lives_while_a_pod_holds_it() {
        let mut ids = Identities::default();
        let (web, ch) = ids
            .acquire_pod_identity(key("a", "web"), &pod("p1"))
            .unwrap();
        assert_eq!(ch.created, [web]);
        assert!(ch.destroyed.is_empty());
        // The same key is the same identity: no change.
        let (again, ch) = ids
            .acquire_pod_identity(key("a", "web"), &pod("p2"))
            .unwrap();
        assert_eq!(again, web);
        assert!(ch.is_empty());
        assert_eq!(ids.count(), 1);
        assert_eq!(ids.in_namespace("a").collect::<Vec<_>>(), [web]);
        assert!(ids.leave(web, &pod("p1")).is_empty(), "p2 still holds it");
        let ch = ids.leave(web, &pod("p2"));
        assert_eq!(ch.destroyed, [web]);
        assert!(!ids.contains(web));
        assert_eq!(ids.count(), 0);
        assert_eq!(ids.in_namespace("a").count(), 0);
        // The reserved identities are never released.
        assert!(ids.contains(identity::WORLD) && ids.contains(identity::HOST));
    }

    #[test]
    fn a_cidr_has_an_identity_while_some_policy_names_it() {
        let mut ids = Identities::default();
        let net: IpNetwork = "10.0.0.0/8".parse().unwrap();
        let ch = ids.adjust_cidrs(&[], &[net, net]).unwrap();
        let id = ids.cidr_identity(&net).expect("an identity");
        assert_eq!(ch.created, [id]);
        assert_eq!(ch.cidr_before, [(net, None)]);
        assert_eq!(ch.cidrs, [net]);
        // One of the two uses goes: the identity stays.
        assert!(ids.adjust_cidrs(&[net], &[]).unwrap().is_empty());
        assert_eq!(ids.cidr_identity(&net), Some(id));
        let ch = ids.adjust_cidrs(&[net], &[]).unwrap();
        assert_eq!(ch.destroyed, [id]);
        assert_eq!(ch.cidr_before, [(net, Some(id))]);
        assert_eq!(ids.cidr_identity(&net), None);
        // A pod in the CIDR gets it in its key only while it is named.
        let p = Pod {
            namespace: "a".into(),
            name: "p".into(),
            labels: Labels::new(),
            service_account: "default".into(),
            node_name: None,
            ips: vec!["10.1.2.3".parse().unwrap()],
            synthetic_ips: false,
            ports: Vec::new(),
            workload: None,
            host_network: false,
        };
        assert!(
            ids.key_of_pod(&p, &LabelFilter::default())
                .cidr_class
                .is_empty()
        );
        ids.adjust_cidrs(&[], &[net]).unwrap();
        assert_eq!(
            ids.key_of_pod(&p, &LabelFilter::default()).cidr_class,
            [net]
        );
    }

    #[test]
    fn node_identities_are_shared_by_equal_keys_and_released_by_the_last_node() {
        let mut ids = Identities::default();
        let net: IpNetwork = "10.0.0.0/8".parse().unwrap();
        ids.adjust_cidrs(&[], &[net]).unwrap();
        let labels: Labels = [("zone".to_string(), "a".to_string())]
            .into_iter()
            .collect();
        let inside = ids.key_of_node(&labels, &["10.1.0.1".parse().unwrap()]);
        assert_eq!(inside.cidr_class, [net]);
        let outside = ids.key_of_node(&labels, &["192.0.2.1".parse().unwrap()]);
        assert!(outside.cidr_class.is_empty());
        let (a, ch) = ids.acquire_node_identity(inside.clone(), "n1").unwrap();
        assert!(crate::identity::is_node_identity(a), "{a}");
        assert_eq!(ch.created, [a]);
        let (b, ch) = ids.acquire_node_identity(inside, "n2").unwrap();
        assert_eq!((b, ch.is_empty()), (a, true), "equal keys share one");
        // Same labels, so the same home slot: one of the two moves, with its nodes.
        let (c, ch) = ids.acquire_node_identity(outside, "n3").unwrap();
        let a = match ch.renumbered.as_slice() {
            [] => a,
            [r] => {
                assert_eq!(
                    (r.from, &r.nodes[..]),
                    (a, &["n1".to_string(), "n2".into()][..])
                );
                r.to
            }
            more => panic!("one move at most: {more:?}"),
        };
        assert_ne!(c, a, "another CIDR class is another identity");
        assert!(crate::identity::is_node_identity(c));
        assert!(ids.leave_node(a, "n1").is_empty(), "n2 still holds it");
        assert_eq!(ids.leave_node(a, "n2").destroyed, [a]);
        assert!(!ids.contains(a) && ids.contains(c));
    }

    #[test]
    fn quarantine_groups_are_identities_of_their_own_range() {
        let mut ids = Identities::default();
        let set: QuarantineSet = Arc::new(vec![PolicyKey {
            kind: crate::ruleset::RuleKind::Quarantine,
            namespace: "a".into(),
            name: "q".into(),
        }]);
        let (g, ch) = ids.join_quarantine_group(set.clone(), &pod("p1")).unwrap();
        assert!(g >= FIRST_QUARANTINE_GROUP);
        assert_eq!(ch.created, [g]);
        assert_eq!(
            ids.quarantine_groups().iter().copied().collect::<Vec<_>>(),
            [g]
        );
        assert_eq!(ids.quarantine_set(g), Some(&set));
        assert_eq!(ids.count(), 0, "a group is not an identity in the count");
        let ch = ids.leave(g, &pod("p1"));
        assert_eq!(ch.destroyed, [g]);
        assert!(ids.quarantine_groups().is_empty());
    }
}
