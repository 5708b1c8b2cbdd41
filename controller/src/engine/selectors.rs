//! The selector cache: each distinct selection interned once, with the identities it matches
//! kept up to date. It owns the selections and the reverse index (which selections each
//! identity is in); what a selection is *used for* (a policy's subject, a rule's peer, a
//! Quarantine's exception) belongs to the repository and the quarantines. Every operation that
//! changes a membership returns it as [`MemberChanges`], for the orchestrator to turn into the
//! identities whose policy must be recomputed.

use super::*;

/// Which identities exist and what they are, as the selector cache sees them: implemented by
/// the engine over its identities and namespaces, and by tests over a few hand-made ones.
pub(super) trait Universe {
    /// Whether identity `id` matches `spec` now.
    fn matches(&self, spec: &SelectionSpec, id: Identity) -> bool;
    /// Every identity that may match `spec` (a superset; [`Universe::matches`] decides).
    fn candidates(&self, spec: &SelectionSpec) -> Vec<Identity>;
}

/// One identity joining (`added`) or leaving a selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct MemberChange {
    pub sel: SelId,
    pub identity: Identity,
    pub added: bool,
}

pub(super) type MemberChanges = Vec<MemberChange>;

#[derive(Debug)]
struct Selection {
    /// Shared with the key of `by_spec`.
    spec: Arc<SelectionSpec>,
    refs: u32,
    matched: FxHashSet<Identity>,
}

#[derive(Debug, Default)]
pub(super) struct SelectorCache {
    selections: Vec<Option<Selection>>,
    free: Vec<SelId>,
    by_spec: FxHashMap<Arc<SelectionSpec>, SelId>,
    /// Selections of pods in one named namespace, by that namespace.
    by_ns: FxHashMap<String, FxHashSet<SelId>>,
    /// Every other selection: any identity may match it.
    global: FxHashSet<SelId>,
    /// The selections each identity is in (the reverse of `matched`).
    member_of: FxHashMap<Identity, FxHashSet<SelId>>,
}

impl SelectorCache {
    #[inline]
    fn sel(&self, id: SelId) -> &Selection {
        match self.selections.get(id as usize) {
            Some(Some(s)) => s,
            _ => unreachable!("selection ids are only held while the selection exists"),
        }
    }

    #[inline]
    fn sel_mut(&mut self, id: SelId) -> &mut Selection {
        match self.selections.get_mut(id as usize) {
            Some(Some(s)) => s,
            _ => unreachable!("selection ids are only held while the selection exists"),
        }
    }

    #[inline]
    pub(super) fn spec(&self, id: SelId) -> &Arc<SelectionSpec> {
        &self.sel(id).spec
    }

    /// The identities selection `id` matches.
    #[inline]
    pub(super) fn matched(&self, id: SelId) -> &FxHashSet<Identity> {
        &self.sel(id).matched
    }

    /// The selection interned for `spec`, if any.
    #[inline]
    pub(super) fn find(&self, spec: &SelectionSpec) -> Option<SelId> {
        self.by_spec.get(spec).copied()
    }

    /// The selections identity `id` is in.
    #[inline]
    pub(super) fn selections_of(&self, id: Identity) -> impl Iterator<Item = SelId> + '_ {
        self.member_of.get(&id).into_iter().flatten().copied()
    }

    /// Number of live selections.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.by_spec.len()
    }

    /// Takes a reference on the selection for `spec`, evaluating it against `u` when it is new.
    /// A new selection has no users yet, so its members are no change anyone must hear of.
    pub(super) fn intern(&mut self, spec: SelectionSpec, u: &impl Universe) -> SelId {
        if let Some(id) = self.by_spec.get(&spec).copied() {
            self.sel_mut(id).refs += 1;
            return id;
        }
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.selections.push(None);
                (self.selections.len() - 1) as SelId
            }
        };
        match &spec {
            SelectionSpec::Pods(PodSelection {
                namespaces: NamespaceScope::Named(ns),
                ..
            }) => {
                self.by_ns.entry(ns.clone()).or_default().insert(id);
            }
            _ => {
                self.global.insert(id);
            }
        }
        let matched: FxHashSet<Identity> = u
            .candidates(&spec)
            .into_iter()
            .filter(|c| u.matches(&spec, *c))
            .collect();
        for m in &matched {
            self.member_of.entry(*m).or_default().insert(id);
        }
        let spec = Arc::new(spec);
        self.by_spec.insert(spec.clone(), id);
        self.selections[id as usize] = Some(Selection {
            spec,
            refs: 1,
            matched,
        });
        id
    }

    /// Drops a reference; returns whether that was the last one (the selection is gone, and its
    /// id may be reused).
    pub(super) fn release(&mut self, id: SelId) -> bool {
        let s = self.sel_mut(id);
        s.refs -= 1;
        if s.refs > 0 {
            return false;
        }
        let Some(s) = self.selections[id as usize].take() else {
            return false;
        };
        // An identity's set stays when it empties (it goes with the identity): a selection
        // released and interned again, as an edited policy's are, then allocates nothing.
        for m in &s.matched {
            if let Some(set) = self.member_of.get_mut(m) {
                set.remove(&id);
            }
        }
        self.by_spec.remove(&s.spec);
        match &*s.spec {
            SelectionSpec::Pods(PodSelection {
                namespaces: NamespaceScope::Named(ns),
                ..
            }) => {
                if let Some(set) = self.by_ns.get_mut(ns) {
                    set.remove(&id);
                    if set.is_empty() {
                        self.by_ns.remove(ns);
                    }
                }
            }
            _ => {
                self.global.remove(&id);
            }
        }
        self.free.push(id);
        true
    }

    /// A new identity (already in `u`): the selections it joins. `namespace` is a pod
    /// identity's namespace (only selections of that namespace, or global ones, can match).
    pub(super) fn identity_added(
        &mut self,
        id: Identity,
        namespace: Option<&str>,
        u: &impl Universe,
    ) -> MemberChanges {
        let mut candidates: Vec<SelId> = self.global.iter().copied().collect();
        // A peer cluster's `west/shop` is matched by selections of namespace `shop` that name
        // the cluster label.
        if let Some(s) = namespace.and_then(|ns| self.by_ns.get(split_namespace(ns).1)) {
            candidates.extend(s.iter().copied());
        }
        let mut changes = MemberChanges::new();
        for s in candidates {
            if u.matches(&self.sel(s).spec, id) {
                self.set_member(s, id, true, &mut changes);
            }
        }
        changes
    }

    /// An identity going away: the selections it leaves.
    pub(super) fn identity_removed(&mut self, id: Identity) -> MemberChanges {
        let mut changes = MemberChanges::new();
        let Some(sels) = self.member_of.remove(&id) else {
            return changes;
        };
        for s in sels {
            if self.sel_mut(s).matched.remove(&id) {
                changes.push(MemberChange {
                    sel: s,
                    identity: id,
                    added: false,
                });
            }
        }
        changes
    }

    /// A namespace's labels changed: re-evaluates the selections that select namespaces by
    /// label for the identities `ids` of that namespace.
    pub(super) fn namespace_relabeled(
        &mut self,
        ids: &[Identity],
        u: &impl Universe,
    ) -> MemberChanges {
        let sels: Vec<SelId> = self
            .global
            .iter()
            .copied()
            .filter(|s| {
                matches!(
                    *self.sel(*s).spec,
                    SelectionSpec::Pods(PodSelection {
                        namespaces: NamespaceScope::Selected(_),
                        ..
                    })
                )
            })
            .collect();
        let mut changes = MemberChanges::new();
        for s in sels {
            for id in ids {
                let on = u.matches(&self.sel(s).spec, *id);
                self.set_member(s, *id, on, &mut changes);
            }
        }
        changes
    }

    fn set_member(&mut self, sel: SelId, id: Identity, on: bool, changes: &mut MemberChanges) {
        let s = self.sel_mut(sel);
        let changed = if on {
            s.matched.insert(id)
        } else {
            s.matched.remove(&id)
        };
        if !changed {
            return;
        }
        if on {
            self.member_of.entry(id).or_default().insert(sel);
        } else if let Some(set) = self.member_of.get_mut(&id) {
            set.remove(&sel);
        }
        changes.push(MemberChange {
            sel,
            identity: id,
            added: on,
        });
    }
}

/// Whether an identity of `kind` matches `spec`; `ns_labels` gives a namespace's labels.
pub(super) fn spec_matches<'a>(
    spec: &SelectionSpec,
    kind: &IdentityKind,
    ns_labels: impl FnOnce(&str) -> std::borrow::Cow<'a, Labels>,
) -> bool {
    match (spec, kind) {
        (SelectionSpec::Pods(sel), IdentityKind::Pod(key)) => {
            // A peer cluster's pods only for selections that name the cluster label; a named
            // namespace is then the namespace of that name in the cluster(s) selected.
            let (remote, local_name) = split_namespace(&key.namespace);
            if remote.is_some() && !sel.names_cluster() {
                return false;
            }
            let ns_ok = match &sel.namespaces {
                NamespaceScope::Named(n) => *n == local_name,
                NamespaceScope::Selected(s) => s.matches(&ns_labels(&key.namespace)),
            };
            ns_ok
                && sel
                    .service_account
                    .as_ref()
                    .is_none_or(|sa| *sa == key.service_account)
                && sel.pods.matches(&key.labels)
        }
        (SelectionSpec::Cidr(c), IdentityKind::Pod(key)) => {
            key.cidr_class.contains(&c.cidr) && !c.except.iter().any(|e| key.cidr_class.contains(e))
        }
        (SelectionSpec::Cidr(c), IdentityKind::Cidr(net)) => {
            is_within(net, &c.cidr) && !c.except.iter().any(|e| is_within(net, e))
        }
        // A node address had no entry of its own before node identities: it was `world`, or
        // the CIDR identities covering it. Its node identity matches exactly those selections
        // (by CIDR class, as pods do), so no existing policy changes meaning; only `nodes`
        // selections are new.
        (SelectionSpec::Cidr(c), IdentityKind::Node(key)) => {
            key.cidr_class.contains(&c.cidr) && !c.except.iter().any(|e| key.cidr_class.contains(e))
        }
        (SelectionSpec::Nodes(sel), IdentityKind::Node(key)) => sel.matches(&key.labels),
        (
            SelectionSpec::World,
            IdentityKind::World | IdentityKind::Cidr(_) | IdentityKind::Node(_),
        ) => true,
        // A peer cluster's pod was `world` before it was imported, and stays so for every
        // selection that does not name its cluster: importing changes no verdict.
        (SelectionSpec::World, IdentityKind::Pod(key)) => is_remote_namespace(&key.namespace),
        // The `cluster` entity is this cluster's pods and hosts, not a peer cluster's.
        (SelectionSpec::Cluster, IdentityKind::Pod(key)) => !is_remote_namespace(&key.namespace),
        (SelectionSpec::Cluster, IdentityKind::Host) => true,
        (SelectionSpec::Host, IdentityKind::Host) => true,
        (SelectionSpec::AllPods, IdentityKind::Pod(_)) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selector::Selector;

    /// A few identities: pod identities as (namespace, app label), plus the world.
    struct Fake(Vec<(Identity, IdentityKind)>);

    impl Fake {
        fn kind(&self, id: Identity) -> Option<&IdentityKind> {
            self.0.iter().find(|(i, _)| *i == id).map(|(_, k)| k)
        }
    }

    impl Universe for Fake {
        fn matches(&self, spec: &SelectionSpec, id: Identity) -> bool {
            self.kind(id).is_some_and(|k| {
                spec_matches(spec, k, |ns| {
                    std::borrow::Cow::Owned(
                        [(NAMESPACE_NAME_LABEL.to_string(), ns.to_string())]
                            .into_iter()
                            .collect(),
                    )
                })
            })
        }
        fn candidates(&self, _: &SelectionSpec) -> Vec<Identity> {
            self.0.iter().map(|(i, _)| *i).collect()
        }
    }

    fn pod(ns: &str, app: &str) -> IdentityKind {
        IdentityKind::Pod(Arc::new(IdentityKey {
            namespace: ns.into(),
            service_account: "default".into(),
            labels: [("app".to_string(), app.to_string())].into_iter().collect(),
            named_ports: Vec::new(),
            cidr_class: Vec::new(),
        }))
    }

    fn app(ns: &str, app: &str) -> SelectionSpec {
        SelectionSpec::Pods(PodSelection {
            namespaces: NamespaceScope::Named(ns.into()),
            pods: Selector::from_labels([("app", app)]),
            service_account: None,
        })
    }

    #[test]
    fn interning_shares_equal_selectors_and_release_frees_the_last() {
        let u = Fake(vec![(300, pod("a", "web")), (301, pod("a", "db"))]);
        let mut c = SelectorCache::default();
        let s1 = c.intern(app("a", "web"), &u);
        let s2 = c.intern(app("a", "web"), &u);
        assert_eq!(s1, s2);
        assert_eq!(c.len(), 1);
        assert_eq!(c.matched(s1).iter().copied().collect::<Vec<_>>(), [300]);
        assert_eq!(c.selections_of(300).collect::<Vec<_>>(), [s1]);
        assert!(!c.release(s1), "one reference is left");
        assert!(c.release(s1), "the last reference frees it");
        assert_eq!(c.len(), 0);
        assert_eq!(c.selections_of(300).count(), 0);
        // The freed id is reused.
        let s3 = c.intern(SelectionSpec::World, &u);
        assert_eq!(s3, s1);
    }

    #[test]
    fn identity_changes_report_exactly_the_selections_joined_and_left() {
        let mut u = Fake(vec![(300, pod("a", "web"))]);
        let mut c = SelectorCache::default();
        let web = c.intern(app("a", "web"), &u);
        let other_ns = c.intern(app("b", "web"), &u);
        let world = c.intern(SelectionSpec::World, &u);
        let cluster = c.intern(SelectionSpec::Cluster, &u);
        assert!(c.matched(cluster).contains(&300));

        u.0.push((301, pod("a", "web")));
        let mut added = c.identity_added(301, Some("a"), &u);
        added.sort();
        let mut expected = vec![
            MemberChange {
                sel: web,
                identity: 301,
                added: true,
            },
            MemberChange {
                sel: cluster,
                identity: 301,
                added: true,
            },
        ];
        expected.sort();
        assert_eq!(added, expected);
        assert!(!c.matched(other_ns).contains(&301));
        assert!(!c.matched(world).contains(&301));

        let mut removed = c.identity_removed(301);
        removed.sort();
        for e in &mut expected {
            e.added = false;
        }
        assert_eq!(removed, expected);
        assert!(!c.matched(web).contains(&301));
        assert_eq!(c.identity_removed(301), Vec::new(), "nothing left to leave");
    }

    #[test]
    fn a_namespace_relabel_reports_only_label_scoped_selections() {
        let u = Fake(vec![(300, pod("a", "web"))]);
        let mut c = SelectorCache::default();
        let _named = c.intern(app("a", "web"), &u);
        let by_label = c.intern(
            SelectionSpec::Pods(PodSelection {
                namespaces: NamespaceScope::Selected(Selector::from_labels([(
                    NAMESPACE_NAME_LABEL,
                    "a",
                )])),
                pods: Selector::everything(),
                service_account: None,
            }),
            &u,
        );
        assert!(c.matched(by_label).contains(&300));
        // Nothing changed for the fake's labels: no change reported.
        assert_eq!(c.namespace_relabeled(&[300], &u), Vec::new());
        // The identity no longer matches (as if the namespace lost the label).
        let gone = Fake(Vec::new());
        assert_eq!(
            c.namespace_relabeled(&[300], &gone),
            vec![MemberChange {
                sel: by_label,
                identity: 300,
                added: false
            }]
        );
        assert_eq!(c.selections_of(300).count(), 1, "still in the named one");
    }
}
