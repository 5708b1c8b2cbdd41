//! The orchestrator, inventory side: a change of namespaces, pods or nodes goes through
//! placement ([`Inventory`]), identities ([`Identities`]) and the selector cache
//! ([`SelectorCache`]); this module threads each one's change set into the next and into the
//! journal (policies to recompute, (node, group) pairs to re-span, pod snapshots and addresses
//! to re-check).

use super::*;

/// The identities and namespaces as the selector cache sees them.
pub(super) struct View<'a> {
    pub inventory: &'a Inventory,
    pub identities: &'a Identities,
}

impl Universe for View<'_> {
    fn matches(&self, spec: &SelectionSpec, id: Identity) -> bool {
        if let SelectionSpec::Name(p) = spec {
            return id == crate::ruleset::name_identity(p);
        }
        self.identities.kind(id).is_some_and(|kind| {
            selectors::spec_matches(spec, kind, |ns| self.inventory.namespace_labels(ns))
        })
    }

    fn candidates(&self, spec: &SelectionSpec) -> Vec<Identity> {
        match spec {
            SelectionSpec::Pods(
                sel @ PodSelection {
                    namespaces: NamespaceScope::Named(ns),
                    ..
                },
            ) => {
                let mut ids: Vec<Identity> = self.identities.in_namespace(ns).collect();
                if sel.names_cluster() {
                    ids.extend(
                        self.identities
                            .namespaces()
                            .filter(|(n, _)| {
                                is_remote_namespace(n) && split_namespace(n).1 == ns.as_str()
                            })
                            .flat_map(|(_, ids)| ids.iter().copied()),
                    );
                }
                ids
            }
            SelectionSpec::Pods(PodSelection {
                namespaces: NamespaceScope::Selected(nsel),
                ..
            }) => self
                .identities
                .namespaces()
                .filter(|(ns, _)| nsel.matches(&self.inventory.namespace_labels(ns)))
                .flat_map(|(_, ids)| ids.iter().copied())
                .collect(),
            // A name selection holds its name identity from the start; no identity the engine
            // allocates (pods, CIDRs) ever joins it.
            SelectionSpec::Name(p) => vec![crate::ruleset::name_identity(p)],
            _ => self.identities.all().collect(),
        }
    }
}

impl PodSnap {
    fn of(s: &PodState) -> PodSnap {
        PodSnap {
            identity: s.identity,
            node: s.node,
            ips: s.pod.ips.clone(),
            endpoint: s.endpoint,
            workload: s.pod.workload.clone(),
            quarantine: s.quarantine,
        }
    }
}

impl PolicyEngine {
    // -----------------------------------------------------------------------------------------
    // The journal.

    /// Records whether node `idx` existed before the change.
    pub(super) fn note_node(&mut self, idx: NodeIdx) {
        if self.journal.active {
            let existed = self.inventory.node_exists(idx);
            self.journal.node_existed.entry(idx).or_insert(existed);
        }
    }

    /// The index of node `name`, made (and journaled as new) when unknown.
    pub(super) fn node_idx(&mut self, name: &str) -> NodeIdx {
        let (idx, made) = self.inventory.node_idx(name);
        if made && self.journal.active {
            self.journal.node_existed.insert(idx, false);
        }
        idx
    }

    /// Marks a group's presence on a node for re-spanning.
    pub(super) fn flag(&mut self, placed: Placed) {
        if self.journal.active {
            self.journal.flags.insert(placed);
        }
    }

    /// Records a pod's state before the change, and marks its old addresses for re-checking on
    /// every node that may hold them.
    pub(super) fn touch_pod(&mut self, pk: &PodKey) {
        if !self.journal.active || self.journal.pods.contains_key(pk) {
            return;
        }
        let snap = self.inventory.pod(pk).map(PodSnap::of);
        if let Some(s) = &snap
            && !s.ips.is_empty()
        {
            let mut nodes: Vec<NodeIdx> = vec![s.node];
            if s.quarantine.is_some() {
                // Every node carries a quarantined pod's addresses.
                nodes.extend(0..self.inventory.node_count() as NodeIdx);
            }
            nodes.extend(self.span.nodes_referencing(s.identity));
            nodes.extend(self.span.world_nodes());
            for n in nodes {
                self.journal
                    .ip_checks
                    .extend(s.ips.iter().map(|ip| (n, *ip)));
            }
        }
        self.journal.pods.insert(pk.clone(), snap);
    }

    // -----------------------------------------------------------------------------------------
    // Change sets, threaded.

    /// Passes identities that appeared, went away or were renumbered on to the selector
    /// cache, the repository, the quarantines' allow lists and the placement.
    pub(super) fn identities_changed(&mut self, ch: IdentityChanges) {
        if ch.is_empty() {
            return;
        }
        let active = self.journal.active;
        if active {
            for (c, before) in &ch.cidr_before {
                self.journal.cidr_old.entry(*c).or_insert(*before);
            }
        }
        for id in &ch.destroyed {
            let left = self.selectors.identity_removed(*id);
            self.members_changed(left);
            let old = self.repository.forget(*id);
            if is_quarantine_group(*id) {
                let allow = self.quarantines.forget_group(*id);
                if active {
                    self.journal.allow_old.entry(*id).or_insert(allow);
                }
            }
            if active && let Some(old) = old {
                self.journal.old_policy.entry(*id).or_insert(old);
            }
        }
        let mut created = ch.created;
        created.sort_unstable();
        created.dedup();
        for id in created {
            let ns = match self.identities.kind(id) {
                None => continue,
                Some(IdentityKind::Pod(k)) => Some(k.namespace.clone()),
                Some(_) => None,
            };
            self.repository.init(id);
            let u = View {
                inventory: &self.inventory,
                identities: &self.identities,
            };
            let joined = self.selectors.identity_added(id, ns.as_deref(), &u);
            self.members_changed(joined);
            if active {
                self.journal.dirty.insert(id);
            }
        }
        for r in ch.renumbered {
            self.nodes_renumbered(&r.nodes, r.to);
            for pk in &r.pods {
                self.touch_pod(pk);
                if let Some([a, b]) = self.inventory.renumber_pod(pk, r.from, r.to) {
                    self.flag(a);
                    self.flag(b);
                }
            }
        }
    }

    /// Marks the identities whose policy depends on a selection whose members changed: the
    /// member itself when the selection is a subject, every member of a subject with a rule
    /// towards it, and every quarantine group when an exception names it.
    pub(super) fn members_changed(&mut self, changes: MemberChanges) {
        if !self.journal.active {
            return;
        }
        for c in changes {
            let (subject, users) = self.repository.dependents(c.sel);
            if subject {
                self.journal.dirty.insert(c.identity);
            }
            for user in users {
                self.journal
                    .dirty
                    .extend(self.selectors.matched(user).iter().copied());
            }
            if self.quarantines.uses_peer(c.sel) {
                self.journal
                    .dirty
                    .extend(self.identities.quarantine_groups().iter().copied());
            }
        }
    }

    /// Marks every member of a selection (a changed policy's subject) for recompute.
    pub(super) fn mark_members_dirty(&mut self, sel: SelId) {
        if self.journal.active {
            self.journal
                .dirty
                .extend(self.selectors.matched(sel).iter().copied());
        }
    }

    // -----------------------------------------------------------------------------------------
    // Namespaces, pods, CIDRs.

    pub(super) fn set_namespace_labels(&mut self, ns: &str, labels: Labels) {
        if !self.inventory.set_namespace_labels(ns, labels) {
            return;
        }
        let ids: Vec<Identity> = self.identities.in_namespace(ns).collect();
        let u = View {
            inventory: &self.inventory,
            identities: &self.identities,
        };
        let changes = self.selectors.namespace_relabeled(&ids, &u);
        self.members_changed(changes);
    }

    pub(super) fn remove_pod(
        &mut self,
        pk: &PodKey,
        replacement: Option<&Pod>,
    ) -> Result<(), EngineError> {
        let Some(old) = self.inventory.pod(pk) else {
            return Ok(());
        };
        if let Some(new) = replacement
            && self.same_pod(old, new)
        {
            return Ok(());
        }
        // Keep the endpoint id when the pod stays an endpoint on the same node.
        let keep = replacement.is_some_and(|p| {
            !p.host_network && !p.ips.is_empty() && self.node_idx_of(p) == Some(old.node)
        });
        self.detach_pod(pk, keep);
        Ok(())
    }

    pub(super) fn detach_pod(&mut self, pk: &PodKey, keep_endpoint: bool) {
        self.touch_pod(pk);
        let Some(node) = self.inventory.pod(pk).map(|s| s.node) else {
            return;
        };
        self.note_node(node);
        let Some((st, placed)) = self.inventory.remove_pod(pk, keep_endpoint) else {
            return;
        };
        if let Some(p) = placed {
            self.flag(p);
        }
        if let Some(group) = st.quarantine {
            self.quarantines.remove_pod(pk);
            let ch = self.identities.leave(group, pk);
            self.identities_changed(ch);
        }
        let ch = self.identities.leave(st.identity, pk);
        self.identities_changed(ch);
    }

    pub(super) fn insert_pod(&mut self, mut pod: Pod) -> Result<(), EngineError> {
        let pk: PodRef = Arc::new(pod.key());
        self.touch_pod(&pk);
        let key = self.identities.key_of_pod(&pod, &self.config.label_filter);
        let labels_in_key = strip_labels(&mut pod, &key);
        let (id, ch) = self.identities.acquire_pod_identity(key, &pk)?;
        self.identities_changed(ch);
        let node_name = self.placement(&pod).into_owned();
        let node = self.node_idx(&node_name);
        self.note_node(node);
        let has_ips = !pod.ips.is_empty();
        self.inventory.insert_pod(
            pk.clone(),
            PodState {
                pod,
                labels_in_key,
                identity: id,
                node,
                endpoint: None,
                quarantine: None,
            },
        );
        if !self.quarantines.is_empty() {
            self.requarantine_pod(&pk)?;
        }
        if has_ips && let Some(p) = self.inventory.assign_endpoint(&pk) {
            self.flag(p);
        }
        self.inventory.clear_reserved_endpoint();
        Ok(())
    }

    pub(super) fn node_idx_of(&self, pod: &Pod) -> Option<NodeIdx> {
        self.inventory.find_node(&self.placement(pod))
    }

    /// The node a pod is placed on: its `spec.nodeName`, the unscheduled node, or for a peer
    /// cluster's pod that cluster's pseudo-node (never an endpoint anywhere).
    pub(super) fn placement<'a>(&'a self, pod: &'a Pod) -> std::borrow::Cow<'a, str> {
        if let (Some(cluster), _) = split_namespace(&pod.namespace) {
            return std::borrow::Cow::Owned(peer_cluster_node(cluster));
        }
        std::borrow::Cow::Borrowed(
            pod.node_name
                .as_deref()
                .unwrap_or(&self.config.unscheduled_node),
        )
    }

    /// Counts a policy's CIDRs out (`old`) and in (`new`); pods inside a CIDR that appeared or
    /// went away change CIDR class, hence identity.
    pub(super) fn adjust_cidrs(
        &mut self,
        old: &[IpNetwork],
        new: &[IpNetwork],
    ) -> Result<(), EngineError> {
        let mut ch = self.identities.adjust_cidrs(old, new)?;
        let cidrs = std::mem::take(&mut ch.cidrs);
        self.identities_changed(ch);
        if !cidrs.is_empty() && self.node_table.in_use() {
            // Nodes inside a CIDR that came or went change CIDR class, hence node identity.
            self.rekey_nodes()?;
        }
        let mut rekey: BTreeSet<PodRef> = BTreeSet::new();
        for c in &cidrs {
            rekey.extend(self.inventory.pods_in(c).cloned());
        }
        for pk in rekey {
            if let Some(st) = self.inventory.pod(&pk) {
                let pod = self.full_pod(st);
                let key = self.identities.key_of_pod(&pod, &self.config.label_filter);
                if key != *self.identities.pod_key(st.identity) {
                    let keep = st.endpoint.is_some();
                    self.detach_pod(&pk, keep);
                    self.insert_pod(pod)?;
                }
            }
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Quarantined pods.

    pub(super) fn requarantine_namespace(&mut self, ns: &str) -> Result<(), EngineError> {
        let mut pods: Vec<PodRef> = self
            .identities
            .in_namespace(ns)
            .flat_map(|id| self.identities.pods(id).cloned())
            .collect();
        pods.sort();
        for pk in pods {
            self.requarantine_pod(&pk)?;
        }
        Ok(())
    }

    /// Puts a pod's endpoint in the group its Quarantines call for (its identity's when none).
    pub(super) fn requarantine_pod(&mut self, pk: &PodRef) -> Result<(), EngineError> {
        let Some(st) = self.inventory.pod(pk) else {
            return Ok(());
        };
        let set = self
            .quarantines
            .set_of(&st.pod.namespace, &st.pod.name, self.pod_labels(st));
        let old = st.quarantine;
        let unchanged = match old.and_then(|g| self.identities.quarantine_set(g)) {
            None => set.is_empty(),
            Some(c) => **c == set,
        };
        if unchanged {
            return Ok(());
        }
        self.touch_pod(pk);
        if let Some(g) = old {
            if let Some([a, b]) = self.inventory.set_quarantine(pk, None) {
                self.flag(a);
                self.flag(b);
            }
            self.quarantines.remove_pod(pk);
            let ch = self.identities.leave(g, pk);
            self.identities_changed(ch);
        }
        if !set.is_empty() {
            let (g, ch) = self.identities.join_quarantine_group(Arc::new(set), pk)?;
            self.identities_changed(ch);
            if let Some([a, b]) = self.inventory.set_quarantine(pk, Some(g)) {
                self.flag(a);
                self.flag(b);
            }
            self.quarantines.add_pod(pk);
        }
        Ok(())
    }
}

/// Whether a number is a quarantine group's (they are numbered above every identity).
pub(super) fn is_quarantine_group(id: Identity) -> bool {
    (FIRST_QUARANTINE_GROUP..FIRST_QUARANTINE_GROUP + (1 << 20)).contains(&id)
}
