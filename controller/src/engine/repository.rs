//! The policy repository: NetworkPolicy, ClusterNetworkPolicy and ServicePolicy objects with
//! their rule-id slots, what they contribute to the selections they apply to (merged by shape,
//! so equal rules of many policies cost one entry), and each identity's compiled policy with
//! its contribution (the peers and rules a node must carry for it).
//!
//! The repository interns and releases selections in the selector cache it is handed, and
//! tells which identities' policies depend on a selection ([`Repository::dependents`]); it
//! never decides on its own what to recompute. [`Repository::install`] returns the policy an
//! identity had when a new one differs.

use super::*;

struct PolicyState {
    policy: Policy,
    slot: u32,
    subject: SelId,
    /// A staged policy of the same name replaces this one in the staged view (its entries
    /// went in as [`Stage::Superseded`]).
    superseded: bool,
}

/// What the policies with one subject selection say, merged.
#[derive(Debug, Default)]
struct SubjectData {
    refs: u32,
    shapes: [FxHashMap<Shape, BTreeSet<RuleId>>; 2],
    /// Isolating rules by the stage of their policy: in force and in the staged view…
    isolation: [BTreeSet<RuleId>; 2],
    /// … only in the staged view (staged policies) …
    staged_isolation: [BTreeSet<RuleId>; 2],
    /// … only in force (policies a staged one replaces).
    superseded_isolation: [BTreeSet<RuleId>; 2],
}

/// An identity's (or quarantine group's) compiled policy and what it needs on a node.
#[derive(Debug, Default)]
struct Compiled {
    policy: Policies,
    contribution: Arc<Contribution>,
}

pub(super) struct Repository {
    policies: BTreeMap<PolicyKey, PolicyState>,
    /// Rule-id slots of every policy, Quarantines included (they share the rule-id space).
    slots: OrderedSlots<Arc<PolicyKey>>,
    /// By selection id: the merged rules of the policies with that subject.
    subjects: Vec<Option<Box<SubjectData>>>,
    /// By selection id: the subject selections whose shapes use it as peer, with use counts.
    /// (Kept when they empty: selection ids are reused.)
    peer_users: Vec<FxHashMap<SelId, u32>>,
    compiled: FxHashMap<Identity, Compiled>,
}

impl Default for Repository {
    fn default() -> Repository {
        Repository {
            policies: BTreeMap::new(),
            slots: policy_slots(),
            subjects: Vec::new(),
            peer_users: Vec::new(),
            compiled: FxHashMap::default(),
        }
    }
}

/// Policies renumbered by a slot collision.
pub(super) type SlotMoves = Vec<Move<Arc<PolicyKey>>>;

/// A policy taken out of the repository.
pub(super) struct Removed {
    pub policy: Policy,
    pub slot: u32,
}

impl Repository {
    #[inline]
    pub(super) fn contains(&self, key: &PolicyKey) -> bool {
        self.policies.contains_key(key)
    }

    #[inline]
    pub(super) fn policy(&self, key: &PolicyKey) -> Option<&Policy> {
        self.policies.get(key).map(|s| &s.policy)
    }

    /// Every policy (Quarantines are kept apart).
    pub(super) fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.policies.values().map(|s| &s.policy)
    }

    /// The subject selection of a policy.
    #[inline]
    pub(super) fn subject_of(&self, key: &PolicyKey) -> Option<SelId> {
        self.policies.get(key).map(|s| s.subject)
    }

    // Rule-id slots.

    #[inline]
    pub(super) fn slot(&self, key: &PolicyKey) -> Option<u32> {
        self.slots.get(key)
    }

    /// A slot for a new policy (or Quarantine); other policies may move to make room.
    #[inline]
    pub(super) fn allocate_slot(
        &mut self,
        key: &PolicyKey,
    ) -> Result<(u32, SlotMoves), EngineError> {
        self.slots.insert(Arc::new(key.clone()), slot_hash(key))
    }

    /// Frees a policy's slot; other policies may move into it.
    #[inline]
    pub(super) fn free_slot(&mut self, key: &PolicyKey) -> SlotMoves {
        self.slots.remove(key)
    }

    /// What a rule id stands for.
    #[inline]
    pub(super) fn rule_ref(&self, rule: RuleId) -> Option<RuleRef> {
        let key = self.slots.key_of(rule >> 10)?;
        let direction = if (rule >> 9) & 1 == 1 {
            Direction::Egress
        } else {
            Direction::Ingress
        };
        let index = match rule & 0x1ff {
            0 => None,
            i => Some(i - 1),
        };
        Some(RuleRef {
            kind: key.kind.clone(),
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            direction,
            index,
        })
    }

    // Policies.

    /// The staged policy that replaces `key` in the staged view, when there is one.
    pub(super) fn staged_replacement(&self, key: &PolicyKey) -> Option<PolicyKey> {
        let staged = PolicyKey {
            kind: key.kind.staged()?,
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        };
        self.policies.contains_key(&staged).then_some(staged)
    }

    /// Adds a policy under rule-id slot `slot`; returns its subject selection (whose members'
    /// policies change). An enforced policy with a staged replacement present goes in as
    /// superseded: adding or removing a staged policy must re-add the one it replaces.
    pub(super) fn add(
        &mut self,
        policy: Policy,
        slot: u32,
        sels: &mut SelectorCache,
        u: &impl Universe,
    ) -> SelId {
        let subject = sels.intern(SelectionSpec::Pods(policy.subject.clone()), u);
        let superseded = self.staged_replacement(&policy.key).is_some();
        let mut shapes: Vec<(Direction, Shape, RuleId)> = Vec::new();
        for rule in &policy.rules {
            let id = rule_id(slot, rule.direction, Some(rule.index));
            for peer in &rule.peers {
                for port in &rule.ports {
                    let peer_ref = match peer_spec(peer, port, rule.direction) {
                        Some(spec) => PeerRef::Sel(sels.intern(spec, u)),
                        None => PeerRef::Any,
                    };
                    shapes.push((
                        rule.direction,
                        Shape {
                            peer: peer_ref,
                            port: port.clone(),
                            tier: rule.tier,
                            priority: rule.priority,
                            action: rule.action,
                            stage: rule_stage(rule, superseded),
                        },
                        id,
                    ));
                }
            }
        }
        for (direction, shape, id) in shapes {
            if let PeerRef::Sel(p) = shape.peer {
                let i = p as usize;
                if self.peer_users.len() <= i {
                    self.peer_users.resize_with(i + 1, FxHashMap::default);
                }
                *self.peer_users[i].entry(subject).or_default() += 1;
            }
            self.subject_mut(subject).shapes[direction as usize]
                .entry(shape)
                .or_default()
                .insert(id);
        }
        let data = self.subject_mut(subject);
        data.refs += 1;
        for d in Direction::ALL {
            let id = rule_id(slot, d, None);
            match policy.isolation(d) {
                Isolation::None => {}
                Isolation::Enforce if superseded => {
                    data.superseded_isolation[d as usize].insert(id);
                }
                Isolation::Enforce => {
                    data.isolation[d as usize].insert(id);
                }
                Isolation::Audit => {
                    data.staged_isolation[d as usize].insert(id);
                }
            }
        }
        self.policies.insert(
            policy.key.clone(),
            PolicyState {
                policy,
                slot,
                subject,
                superseded,
            },
        );
        subject
    }

    /// Takes a policy out (its slot stays allocated: free it with [`Self::free_slot`]).
    /// The identities its subject selected before the call are the ones whose policy changes.
    pub(super) fn remove(&mut self, key: &PolicyKey, sels: &mut SelectorCache) -> Option<Removed> {
        let PolicyState {
            policy,
            slot,
            subject,
            superseded,
        } = self.policies.remove(key)?;
        let mut releases = Vec::new();
        for rule in &policy.rules {
            let id = rule_id(slot, rule.direction, Some(rule.index));
            for peer in &rule.peers {
                for port in &rule.ports {
                    let peer_ref =
                        match peer_spec(peer, port, rule.direction).and_then(|s| sels.find(&s)) {
                            Some(p) => PeerRef::Sel(p),
                            None => PeerRef::Any,
                        };
                    let shape = Shape {
                        peer: peer_ref,
                        port: port.clone(),
                        tier: rule.tier,
                        priority: rule.priority,
                        action: rule.action,
                        stage: rule_stage(rule, superseded),
                    };
                    if let Some(Some(data)) = self.subjects.get_mut(subject as usize) {
                        let map = &mut data.shapes[rule.direction as usize];
                        if let Some(set) = map.get_mut(&shape) {
                            set.remove(&id);
                            if set.is_empty() {
                                map.remove(&shape);
                            }
                        }
                    }
                    if let PeerRef::Sel(p) = peer_ref {
                        if let Some(users) = self.peer_users.get_mut(p as usize)
                            && let Some(c) = users.get_mut(&subject)
                        {
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
            sels.release(p);
        }
        if let Some(slot_data) = self.subjects.get_mut(subject as usize)
            && let Some(data) = slot_data.as_mut()
        {
            for d in Direction::ALL {
                let id = rule_id(slot, d, None);
                data.isolation[d as usize].remove(&id);
                data.staged_isolation[d as usize].remove(&id);
                data.superseded_isolation[d as usize].remove(&id);
            }
            data.refs -= 1;
            if data.refs == 0 {
                *slot_data = None;
            }
        }
        sels.release(subject);
        Some(Removed { policy, slot })
    }

    fn subject_mut(&mut self, sel: SelId) -> &mut SubjectData {
        let i = sel as usize;
        if self.subjects.len() <= i {
            self.subjects.resize_with(i + 1, || None);
        }
        self.subjects[i].get_or_insert_with(Default::default)
    }

    fn subject(&self, sel: SelId) -> Option<&SubjectData> {
        self.subjects.get(sel as usize)?.as_deref()
    }

    /// How the policies depend on selection `sel`: whether it is a subject (its members'
    /// policies depend on who is in it), and the subject selections with a rule whose peer it
    /// is (their members' policies depend on it).
    #[inline]
    pub(super) fn dependents(&self, sel: SelId) -> (bool, impl Iterator<Item = SelId> + '_) {
        (
            self.subject(sel).is_some(),
            self.peer_users
                .get(sel as usize)
                .into_iter()
                .flatten()
                .map(|u| *u.0),
        )
    }

    // Compiled policies.

    /// The policy of a pod identity, from the subjects it is in.
    pub(super) fn compute(
        &self,
        id: Identity,
        own_key: &IdentityKey,
        sels: &SelectorCache,
        ids: &Identities,
    ) -> EndpointPolicy {
        let mut out = EndpointPolicy::default();
        for d in Direction::ALL {
            let di = d as usize;
            let mut isolated: Option<RuleId> = None;
            // The staged view is isolated by its staged policies or by the enforced ones it
            // keeps; what it denies by default is blamed on a staged policy when one isolates
            // (that is what a reviewer of staged policies needs named), else on the lowest
            // enforced one, as for enforcement.
            let mut staged_isolated: Option<RuleId> = None;
            let mut enforced_isolated: Option<RuleId> = None;
            let mut entries: Vec<PolicyEntry> = Vec::new();
            let lowest = |acc: &mut Option<RuleId>, set: &BTreeSet<RuleId>| {
                if let Some(r) = set.first() {
                    *acc = Some(acc.map_or(*r, |x| x.min(*r)));
                }
            };
            for sel in sels.selections_of(id) {
                let Some(data) = self.subject(sel) else {
                    continue;
                };
                lowest(&mut isolated, &data.isolation[di]);
                lowest(&mut isolated, &data.superseded_isolation[di]);
                lowest(&mut staged_isolated, &data.staged_isolation[di]);
                lowest(&mut enforced_isolated, &data.isolation[di]);
                for (shape, rules) in &data.shapes[di] {
                    let Some(rule) = rules.first().copied() else {
                        continue;
                    };
                    expand(shape, rule, d, own_key, sels, ids, &mut entries);
                }
            }
            dedup_entries(&mut entries);
            *out.direction_mut(d) = DirectionPolicy {
                isolated_by: isolated,
                staged_isolated_by: staged_isolated.or(enforced_isolated),
                entries,
            };
        }
        out
    }

    /// The compiled policy of an identity or quarantine group (empty until one is installed).
    #[inline]
    pub(super) fn compiled(&self, id: Identity) -> Option<&Policies> {
        self.compiled.get(&id).map(|c| &c.policy)
    }

    /// What an identity's policy needs on a node where it has endpoints.
    #[inline]
    pub(super) fn contribution(&self, id: Identity) -> Option<&Arc<Contribution>> {
        self.compiled.get(&id).map(|c| &c.contribution)
    }

    /// Starts an identity with the empty policy.
    #[inline]
    pub(super) fn init(&mut self, id: Identity) {
        self.compiled.entry(id).or_default();
    }

    /// Forgets an identity that went away; returns the policy it had.
    #[inline]
    pub(super) fn forget(&mut self, id: Identity) -> Option<Policies> {
        self.compiled.remove(&id).map(|c| c.policy)
    }

    /// Installs an identity's newly computed policy; returns the one it replaces when they
    /// differ (`None`: nothing changed, or the identity is unknown).
    #[inline]
    pub(super) fn install(&mut self, id: Identity, new: EndpointPolicy) -> Option<Policies> {
        let c = self.compiled.get_mut(&id)?;
        if *c.policy == new {
            return None;
        }
        c.contribution = Arc::new(Contribution::of(&new));
        Some(std::mem::replace(&mut c.policy, Arc::new(new)))
    }
}

impl Contribution {
    /// The peers (but `any`) and rules a policy's entries and isolation use, sorted.
    fn of(policy: &EndpointPolicy) -> Contribution {
        let mut peers: Vec<Identity> = [&policy.ingress, &policy.egress]
            .into_iter()
            .flat_map(|d| d.entries.iter().map(|e| e.peer))
            .filter(|p| *p != identity::ANY)
            .collect();
        peers.sort_unstable();
        peers.dedup();
        let mut rules: Vec<RuleId> = [&policy.ingress, &policy.egress]
            .into_iter()
            .flat_map(|d| {
                d.entries
                    .iter()
                    .map(|e| e.rule)
                    .chain(d.isolated_by)
                    .chain(d.staged_isolated_by)
            })
            .collect();
        rules.sort_unstable();
        rules.dedup();
        Contribution { peers, rules }
    }
}

/// The stage of a rule's entries: a staged policy's rules (and an audit-mode ServicePolicy's)
/// are staged; an enforced policy's rules are superseded while a staged one replaces it.
fn rule_stage(rule: &crate::model::Rule, superseded: bool) -> Stage {
    match (rule.audit, superseded) {
        (true, _) => Stage::Staged,
        (false, true) => Stage::Superseded,
        (false, false) => Stage::Enforced,
    }
}

/// The selection a rule's peer stands for (`None`: any peer). Egress to named ports of "any"
/// peer can only reach pods (whose ports have names): every pod identity.
pub(super) fn peer_spec(
    peer: &Peer,
    port: &PortSpec,
    direction: Direction,
) -> Option<SelectionSpec> {
    match peer {
        Peer::Any if matches!(port, PortSpec::Named { .. }) && direction == Direction::Egress => {
            Some(SelectionSpec::AllPods)
        }
        Peer::Any => None,
        Peer::Pods(s) => Some(SelectionSpec::Pods(s.clone())),
        Peer::Cidr(c) => Some(SelectionSpec::Cidr(c.clone())),
        Peer::World => Some(SelectionSpec::World),
        Peer::Cluster => Some(SelectionSpec::Cluster),
        Peer::Host => Some(SelectionSpec::Host),
        Peer::Name(p) => Some(SelectionSpec::Name(p.clone())),
        Peer::Nodes(s) => Some(SelectionSpec::Nodes(s.clone())),
    }
}

/// A shape's entries: one per identity its peer selection matches (per named port's number).
pub(super) fn expand(
    shape: &Shape,
    rule: RuleId,
    direction: Direction,
    own_key: &IdentityKey,
    sels: &SelectorCache,
    ids: &Identities,
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
            stage: shape.stage,
            rule,
        })
    };
    let emit =
        |peer: Identity, push: &mut dyn FnMut(Identity, Option<Protocol>, PortRange)| match &shape
            .port
        {
            PortSpec::Range { protocol, ports } => push(peer, *protocol, *ports),
            PortSpec::Named { protocol, name } => {
                let target: Option<&IdentityKey> = match direction {
                    Direction::Ingress => Some(own_key),
                    Direction::Egress => match ids.kind(peer) {
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
        };
    match shape.peer {
        PeerRef::Any => emit(identity::ANY, &mut push),
        PeerRef::Sel(s) => {
            for m in sels.matched(s) {
                emit(*m, &mut push);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_reports_the_replaced_policy_only_when_it_differs() {
        let mut repo = Repository::default();
        assert!(
            repo.install(300, EndpointPolicy::default()).is_none(),
            "unknown"
        );
        repo.init(300);
        assert!(
            repo.install(300, EndpointPolicy::default()).is_none(),
            "same"
        );
        let mut p = EndpointPolicy::default();
        p.ingress.isolated_by = Some(rule_id(5, Direction::Ingress, None));
        p.ingress.entries.push(PolicyEntry {
            peer: 301,
            protocol: Some(Protocol::Tcp),
            ports: PortRange::single(80),
            tier: Tier::Application,
            priority: 0,
            action: Action::Allow,
            stage: Stage::Enforced,
            rule: rule_id(5, Direction::Ingress, Some(0)),
        });
        let old = repo.install(300, p.clone()).expect("a change");
        assert_eq!(*old, EndpointPolicy::default());
        assert_eq!(
            **repo.contribution(300).unwrap(),
            Contribution {
                peers: vec![301],
                rules: vec![
                    rule_id(5, Direction::Ingress, None),
                    rule_id(5, Direction::Ingress, Some(0))
                ],
            }
        );
        assert!(repo.install(300, p).is_none());
        assert!(repo.forget(300).is_some());
        assert!(repo.compiled(300).is_none());
    }
}
