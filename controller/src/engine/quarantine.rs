//! Quarantines: the engine's clock they expire against, each Quarantine's entries (exceptions
//! and deny-all, ready to expand), the pods in quarantine, and each quarantine group's
//! exception identities (what the XDP prefilter admits for the group's addresses).
//!
//! A Quarantine applies to pods, not identities: the endpoints of the pods it selects leave
//! their identity's policy group for a quarantine group — one per set of active Quarantines
//! selecting a pod, numbered from [`FIRST_QUARANTINE_GROUP`] by the set (the numbers are
//! allocated with the other identities). The group holds only the quarantines' entries: nothing
//! below the quarantine tier could decide anyway, since the deny-all matches every packet.
//! Identities never change, so no other endpoint's policy does.

use super::*;

/// A Quarantine as the engine keeps it: its entries, ready to expand for the endpoints it
/// selects.
struct QuarantineState {
    policy: Policy,
    slot: u32,
    /// Per direction: the exceptions and the deny-all, with their rule ids.
    shapes: [Vec<(Shape, RuleId)>; 2],
    /// Not expired at the engine's clock.
    active: bool,
}

/// What moving the clock changed: Quarantines that expired (or came back, when their expiry
/// moved) and so leave or join their namespaces' pods.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct ClockChange {
    pub namespaces: BTreeSet<String>,
    /// CIDRs of the Quarantines that expired / that became active.
    pub cidrs_out: Vec<IpNetwork>,
    pub cidrs_in: Vec<IpNetwork>,
}

pub(super) struct Quarantines {
    now: SystemTime,
    states: BTreeMap<PolicyKey, QuarantineState>,
    /// Selections the exceptions use as peers, with use counts.
    peer_sels: FxHashMap<SelId, u32>,
    /// Pods in a quarantine group.
    pods: BTreeSet<PodRef>,
    /// Each quarantine group's exception identities (absent: none).
    allow: FxHashMap<Identity, Arc<Vec<Identity>>>,
}

impl Quarantines {
    #[inline]
    pub(super) fn new(now: SystemTime) -> Quarantines {
        Quarantines {
            now,
            states: BTreeMap::new(),
            peer_sels: FxHashMap::default(),
            pods: BTreeSet::new(),
            allow: FxHashMap::default(),
        }
    }

    #[inline]
    pub(super) fn now(&self) -> SystemTime {
        self.now
    }

    #[inline]
    pub(super) fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    #[inline]
    pub(super) fn contains(&self, key: &PolicyKey) -> bool {
        self.states.contains_key(key)
    }

    #[inline]
    pub(super) fn policy(&self, key: &PolicyKey) -> Option<&Policy> {
        self.states.get(key).map(|q| &q.policy)
    }

    /// Every Quarantine the engine has (active or expired).
    pub(super) fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.states.values().map(|q| &q.policy)
    }

    #[inline]
    pub(super) fn is_active(&self, key: &PolicyKey) -> bool {
        self.states.get(key).is_some_and(|q| q.active)
    }

    /// The earliest `expiresAt` of an active Quarantine.
    #[inline]
    pub(super) fn next_expiry(&self) -> Option<SystemTime> {
        self.states
            .values()
            .filter(|q| q.active)
            .filter_map(|q| q.policy.quarantine.as_ref()?.expires_at)
            .min()
    }

    /// Whether moving the clock to `now` would (de)activate a Quarantine.
    #[inline]
    pub(super) fn due(&self, now: SystemTime) -> bool {
        self.states.values().any(|q| {
            q.active
                != q.policy
                    .quarantine
                    .as_ref()
                    .is_some_and(|s| s.active_at(now))
        })
    }

    /// Moves the clock (never back) without looking at the Quarantines: only when none is due.
    #[inline]
    pub(super) fn advance(&mut self, now: SystemTime) {
        self.now = self.now.max(now);
    }

    /// Moves the clock to `now` and (de)activates the Quarantines it makes due.
    pub(super) fn set_clock(&mut self, now: SystemTime) -> ClockChange {
        self.now = now;
        let mut change = ClockChange::default();
        for (key, q) in self.states.iter_mut() {
            let active = q
                .policy
                .quarantine
                .as_ref()
                .is_some_and(|s| s.active_at(now));
            if active != q.active {
                q.active = active;
                change.namespaces.insert(key.namespace.clone());
                let list = if active {
                    &mut change.cidrs_in
                } else {
                    &mut change.cidrs_out
                };
                list.extend(q.policy.cidrs());
            }
        }
        change
    }

    /// The CIDRs of a policy that have identities: an inactive (expired) Quarantine's have
    /// none, so that it leaves no trace.
    #[inline]
    pub(super) fn live_cidrs(&self, policy: &Policy) -> Vec<IpNetwork> {
        match &policy.quarantine {
            Some(spec) if !spec.active_at(self.now) => Vec::new(),
            _ => policy.cidrs().collect(),
        }
    }

    /// Interns the Quarantine's exception peers and records its entries: each exception in
    /// its direction (priority 0), and the deny-all (priority 1) under the policy's default
    /// rule id in both directions.
    pub(super) fn add(
        &mut self,
        policy: Policy,
        slot: u32,
        sels: &mut SelectorCache,
        u: &impl Universe,
    ) {
        let mut shapes: [Vec<(Shape, RuleId)>; 2] = Default::default();
        for rule in &policy.rules {
            let id = rule_id(slot, rule.direction, Some(rule.index));
            for peer in &rule.peers {
                for port in &rule.ports {
                    // Exceptions have no named ports (the loader refuses them).
                    let peer_ref = match peer {
                        Peer::Any => PeerRef::Any,
                        _ => match repository::peer_spec(peer, port, rule.direction) {
                            Some(spec) => PeerRef::Sel(sels.intern(spec, u)),
                            None => PeerRef::Any,
                        },
                    };
                    if let PeerRef::Sel(p) = peer_ref {
                        *self.peer_sels.entry(p).or_default() += 1;
                    }
                    shapes[rule.direction as usize].push((
                        Shape {
                            peer: peer_ref,
                            port: port.clone(),
                            tier: rule.tier,
                            priority: rule.priority,
                            action: rule.action,
                            stage: if rule.audit {
                                Stage::Staged
                            } else {
                                Stage::Enforced
                            },
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
                    stage: Stage::Enforced,
                },
                rule_id(slot, d, None),
            ));
        }
        let active = policy
            .quarantine
            .as_ref()
            .is_some_and(|s| s.active_at(self.now));
        self.states.insert(
            policy.key.clone(),
            QuarantineState {
                policy,
                slot,
                shapes,
                active,
            },
        );
    }

    /// Takes a Quarantine out, releasing its exceptions' selections; returns it and its slot.
    pub(super) fn remove(
        &mut self,
        key: &PolicyKey,
        sels: &mut SelectorCache,
    ) -> Option<(Policy, u32)> {
        let q = self.states.remove(key)?;
        for (shape, _) in q.shapes.iter().flatten() {
            if let PeerRef::Sel(p) = shape.peer {
                if let Some(c) = self.peer_sels.get_mut(&p) {
                    *c -= 1;
                    if *c == 0 {
                        self.peer_sels.remove(&p);
                    }
                }
                sels.release(p);
            }
        }
        Some((q.policy, q.slot))
    }

    /// Whether a Quarantine's exception uses selection `sel` as its peer.
    #[inline]
    pub(super) fn uses_peer(&self, sel: SelId) -> bool {
        self.peer_sels.contains_key(&sel)
    }

    /// The active Quarantines selecting a pod (its namespace, name and labels), sorted by key.
    pub(super) fn set_of(&self, namespace: &str, name: &str, labels: &Labels) -> Vec<PolicyKey> {
        self.states
            .iter()
            .filter(|(key, q)| {
                q.active
                    && key.namespace == namespace
                    && match q.policy.quarantine.as_ref().and_then(|s| s.pods.as_ref()) {
                        Some(names) => names.iter().any(|n| n == name),
                        None => q.policy.subject.pods.matches(labels),
                    }
            })
            .map(|(key, _)| key.clone())
            .collect()
    }

    // Quarantined pods.

    #[inline]
    pub(super) fn pods(&self) -> &BTreeSet<PodRef> {
        &self.pods
    }

    #[inline]
    pub(super) fn add_pod(&mut self, pk: &PodRef) {
        self.pods.insert(pk.clone());
    }

    #[inline]
    pub(super) fn remove_pod(&mut self, pk: &PodKey) {
        self.pods.remove(pk);
    }

    // Groups' policies and exception identities.

    /// A quarantine group's policy: the entries of its Quarantines, and nothing else.
    pub(super) fn compute_policy(
        &self,
        set: &[PolicyKey],
        sels: &SelectorCache,
        ids: &Identities,
    ) -> EndpointPolicy {
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
                let Some(q) = self.states.get(key) else {
                    continue;
                };
                for (shape, rule) in &q.shapes[d as usize] {
                    repository::expand(shape, *rule, d, &none, sels, ids, &mut entries);
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
    fn compute_allow(&self, set: &[PolicyKey], sels: &SelectorCache) -> Vec<Identity> {
        let mut out = Vec::new();
        for key in set {
            let Some(q) = self.states.get(key) else {
                continue;
            };
            for (shape, _) in q.shapes.iter().flatten() {
                if shape.action != Action::Allow {
                    continue;
                }
                let PeerRef::Sel(s) = shape.peer else {
                    return vec![identity::ANY];
                };
                if admits_every_pod(sels.spec(s)) {
                    return vec![identity::ANY];
                }
                out.extend(sels.matched(s).iter().copied());
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Brings group `group`'s exception identities up to date; returns the list it had when it
    /// changed.
    pub(super) fn refresh_allow(
        &mut self,
        group: Identity,
        set: &[PolicyKey],
        sels: &SelectorCache,
    ) -> Option<Arc<Vec<Identity>>> {
        let new = self.compute_allow(set, sels);
        let current = self.allow.get(&group).map_or(&[] as &[Identity], |a| a);
        if *current == *new {
            return None;
        }
        let old = self.allow.insert(group, Arc::new(new));
        Some(old.unwrap_or_default())
    }

    /// A quarantine group's exception identities now.
    #[inline]
    pub(super) fn allow_of(&self, group: Identity) -> Arc<Vec<Identity>> {
        self.allow.get(&group).cloned().unwrap_or_default()
    }

    /// Forgets a group that went away; returns its exception identities.
    #[inline]
    pub(super) fn forget_group(&mut self, group: Identity) -> Arc<Vec<Identity>> {
        self.allow.remove(&group).unwrap_or_default()
    }
}

/// Whether a selection matches every pod identity, whatever the inventory. A quarantine
/// exception with it would list every pod identity; its allow list is `[identity::ANY]` instead.
/// That is coarser (the prefilter then lets the world through too), which is fine for an early
/// drop: the quarantined endpoint's own node still enforces the exact exceptions.
fn admits_every_pod(spec: &SelectionSpec) -> bool {
    match spec {
        SelectionSpec::Pods(PodSelection {
            namespaces: NamespaceScope::Selected(ns),
            pods,
            service_account: None,
        }) => ns.is_everything() && pods.is_everything(),
        SelectionSpec::Cluster | SelectionSpec::AllPods => true,
        _ => false,
    }
}
