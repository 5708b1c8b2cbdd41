//! The selector cache: each distinct selection interned once, with the identities it matches kept up to date.

use super::*;

impl PolicyEngine {
    // -----------------------------------------------------------------------------------------
    // Selections.

    pub(super) fn sel(&self, id: SelId) -> &Selection {
        match self.selections.get(id as usize) {
            Some(Some(s)) => s,
            _ => unreachable!("selection ids are only held while the selection exists"),
        }
    }

    pub(super) fn sel_mut(&mut self, id: SelId) -> &mut Selection {
        match self.selections.get_mut(id as usize) {
            Some(Some(s)) => s,
            _ => unreachable!("selection ids are only held while the selection exists"),
        }
    }

    pub(super) fn ns_labels(&self, ns: &str) -> std::borrow::Cow<'_, Labels> {
        match self.namespaces.get(ns) {
            Some(l) => std::borrow::Cow::Borrowed(l),
            None => std::borrow::Cow::Owned(
                [(NAMESPACE_NAME_LABEL.to_string(), ns.to_string())]
                    .into_iter()
                    .collect(),
            ),
        }
    }

    pub(super) fn spec_matches(&self, spec: &SelectionSpec, id: Identity) -> bool {
        let Some(st) = self.identities.get(&id) else {
            return false;
        };
        match (spec, &st.kind) {
            (SelectionSpec::Pods(sel), IdentityKind::Pod(key)) => {
                let ns_ok = match &sel.namespaces {
                    NamespaceScope::Named(n) => *n == key.namespace,
                    NamespaceScope::Selected(s) => s.matches(&self.ns_labels(&key.namespace)),
                };
                ns_ok
                    && sel
                        .service_account
                        .as_ref()
                        .is_none_or(|sa| *sa == key.service_account)
                    && sel.pods.matches(&key.labels)
            }
            (SelectionSpec::Cidr(c), IdentityKind::Pod(key)) => {
                key.cidr_class.contains(&c.cidr)
                    && !c.except.iter().any(|e| key.cidr_class.contains(e))
            }
            (SelectionSpec::Cidr(c), IdentityKind::Cidr(net)) => {
                is_within(net, &c.cidr) && !c.except.iter().any(|e| is_within(net, e))
            }
            (SelectionSpec::World, IdentityKind::World | IdentityKind::Cidr(_)) => true,
            (SelectionSpec::Cluster, IdentityKind::Pod(_) | IdentityKind::Host) => true,
            (SelectionSpec::Host, IdentityKind::Host) => true,
            (SelectionSpec::AllPods, IdentityKind::Pod(_)) => true,
            _ => false,
        }
    }

    pub(super) fn intern(&mut self, spec: SelectionSpec) -> SelId {
        if let Some(id) = self.sel_by_spec.get(&spec).copied() {
            self.sel_mut(id).refs += 1;
            return id;
        }
        let id = match self.free_selections.pop() {
            Some(id) => id,
            None => {
                self.selections.push(None);
                (self.selections.len() - 1) as SelId
            }
        };
        let candidates: Vec<Identity> = match &spec {
            SelectionSpec::Pods(PodSelection {
                namespaces: NamespaceScope::Named(ns),
                ..
            }) => {
                self.sel_by_ns.entry(ns.clone()).or_default().insert(id);
                self.identities_by_ns
                    .get(ns)
                    .map(|s| s.iter().copied().collect())
                    .unwrap_or_default()
            }
            SelectionSpec::Pods(PodSelection {
                namespaces: NamespaceScope::Selected(nsel),
                ..
            }) => {
                self.sel_global.insert(id);
                self.identities_by_ns
                    .iter()
                    .filter(|(ns, _)| nsel.matches(&self.ns_labels(ns)))
                    .flat_map(|(_, ids)| ids.iter().copied())
                    .collect()
            }
            _ => {
                self.sel_global.insert(id);
                self.identities.keys().copied().collect()
            }
        };
        let matched: FxHashSet<Identity> = candidates
            .into_iter()
            .filter(|c| self.spec_matches(&spec, *c))
            .collect();
        for m in &matched {
            if let Some(st) = self.identities.get_mut(m) {
                st.member_of.insert(id);
            }
        }
        let spec = Arc::new(spec);
        self.sel_by_spec.insert(spec.clone(), id);
        self.selections[id as usize] = Some(Selection {
            spec,
            refs: 1,
            matched,
            subject: None,
            peer_users: FxHashMap::default(),
        });
        id
    }

    pub(super) fn release(&mut self, id: SelId) {
        let s = self.sel_mut(id);
        s.refs -= 1;
        if s.refs > 0 {
            return;
        }
        let Some(s) = self.selections[id as usize].take() else {
            return;
        };
        for m in &s.matched {
            if let Some(st) = self.identities.get_mut(m) {
                st.member_of.remove(&id);
            }
        }
        self.sel_by_spec.remove(&s.spec);
        match &*s.spec {
            SelectionSpec::Pods(PodSelection {
                namespaces: NamespaceScope::Named(ns),
                ..
            }) => {
                if let Some(set) = self.sel_by_ns.get_mut(ns) {
                    set.remove(&id);
                    if set.is_empty() {
                        self.sel_by_ns.remove(ns);
                    }
                }
            }
            _ => {
                self.sel_global.remove(&id);
            }
        }
        self.free_selections.push(id);
    }

    pub(super) fn set_member(&mut self, sel: SelId, id: Identity, on: bool) {
        let s = self.sel_mut(sel);
        let changed = if on {
            s.matched.insert(id)
        } else {
            s.matched.remove(&id)
        };
        if !changed {
            return;
        }
        if let Some(st) = self.identities.get_mut(&id) {
            if on {
                st.member_of.insert(sel);
            } else {
                st.member_of.remove(&sel);
            }
        }
        if !self.journal.active {
            return;
        }
        let s = self.sel(sel);
        let mut dirty: Vec<Identity> = Vec::new();
        if s.subject.is_some() {
            dirty.push(id);
        }
        for user in s.peer_users.keys() {
            dirty.extend(self.sel(*user).matched.iter().copied());
        }
        if self.quarantine_peer_sels.contains_key(&sel) {
            dirty.extend(self.quarantine_groups.iter().copied());
        }
        self.journal.dirty.extend(dirty);
    }
}
