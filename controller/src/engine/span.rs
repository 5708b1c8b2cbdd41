//! Node spans: what each node's rule set must carry. Per node, the contribution (peer
//! identities and rules) of every policy group with endpoints there, and reference counts of
//! the peers and rules those contributions use; across nodes, which nodes reference each peer
//! identity (and the `world`), which decides where a pod's address must be in the ipcache.
//! [`NodeSpan::update`] returns what flipped ([`SpanChange`]) for the journal.

use super::*;

#[derive(Debug, Default)]
struct NodeRefs {
    contrib: FxHashMap<Identity, Arc<Contribution>>,
    peer_refs: FxHashMap<Identity, u32>,
    rule_refs: FxHashMap<RuleId, u32>,
}

/// What one [`NodeSpan::update`] changed on its node.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct SpanChange {
    /// Whether the node had the identity's policy group before.
    pub had_group: bool,
    /// Peers whose reference count went from or to zero: (peer, referenced now).
    pub peers: Vec<(Identity, bool)>,
    /// Rules whose reference count went from or to zero: (rule, referenced now).
    pub rules: Vec<(RuleId, bool)>,
}

#[derive(Debug, Default)]
pub(super) struct NodeSpan {
    nodes: Vec<NodeRefs>,
    /// The nodes that reference each peer identity.
    ref_nodes: FxHashMap<Identity, FxHashSet<NodeIdx>>,
    /// The nodes that reference the `world` (and so carry every pod address).
    world_nodes: FxHashSet<NodeIdx>,
}

impl NodeSpan {
    fn node(&self, n: NodeIdx) -> Option<&NodeRefs> {
        self.nodes.get(n as usize)
    }

    /// Sets identity `id`'s contribution on node `n` (`None`: it has no endpoint there any
    /// more) and brings the node's reference counts in line.
    pub(super) fn update(
        &mut self,
        n: NodeIdx,
        id: Identity,
        new: Option<Arc<Contribution>>,
    ) -> SpanChange {
        if self.nodes.len() <= n as usize {
            self.nodes.resize_with(n as usize + 1, NodeRefs::default);
        }
        let node = &mut self.nodes[n as usize];
        let old = node.contrib.remove(&id);
        let mut change = SpanChange {
            had_group: old.is_some(),
            ..SpanChange::default()
        };
        if let Some(c) = &new {
            node.contrib.insert(id, c.clone());
        }
        if let (Some(a), Some(b)) = (&old, &new)
            && Arc::ptr_eq(a, b)
        {
            return change;
        }
        let empty = Contribution::default();
        let old_c = old.as_deref().unwrap_or(&empty);
        let new_c = new.as_deref().unwrap_or(&empty);
        for_each_diff(&old_c.peers, &new_c.peers, |p, added| {
            if let Some(on) = count(&mut node.peer_refs, p, added) {
                change.peers.push((p, on));
            }
        });
        for_each_diff(&old_c.rules, &new_c.rules, |r, added| {
            if let Some(on) = count(&mut node.rule_refs, r, added) {
                change.rules.push((r, on));
            }
        });
        for &(p, on) in &change.peers {
            let set = self.ref_nodes.entry(p).or_default();
            if on {
                set.insert(n);
            } else {
                set.remove(&n);
                if set.is_empty() {
                    self.ref_nodes.remove(&p);
                }
            }
            if p == identity::WORLD {
                if on {
                    self.world_nodes.insert(n);
                } else {
                    self.world_nodes.remove(&n);
                }
            }
        }
        change
    }

    /// Whether node `n` has identity `id`'s policy group (some endpoint of it).
    #[inline]
    pub(super) fn has_group(&self, n: NodeIdx, id: Identity) -> bool {
        self.node(n).is_some_and(|r| r.contrib.contains_key(&id))
    }

    /// The policy groups node `n` has.
    #[inline]
    pub(super) fn groups(&self, n: NodeIdx) -> impl Iterator<Item = Identity> + '_ {
        self.node(n)
            .into_iter()
            .flat_map(|r| r.contrib.keys().copied())
    }

    #[inline]
    pub(super) fn references_peer(&self, n: NodeIdx, peer: Identity) -> bool {
        self.node(n)
            .is_some_and(|r| r.peer_refs.contains_key(&peer))
    }

    /// The peer identities node `n` references.
    #[inline]
    pub(super) fn peers(&self, n: NodeIdx) -> impl Iterator<Item = Identity> + '_ {
        self.node(n)
            .into_iter()
            .flat_map(|r| r.peer_refs.keys().copied())
    }

    #[inline]
    pub(super) fn has_rule(&self, n: NodeIdx, rule: RuleId) -> bool {
        self.node(n)
            .is_some_and(|r| r.rule_refs.contains_key(&rule))
    }

    /// The rules node `n` references.
    #[inline]
    pub(super) fn rules(&self, n: NodeIdx) -> impl Iterator<Item = RuleId> + '_ {
        self.node(n)
            .into_iter()
            .flat_map(|r| r.rule_refs.keys().copied())
    }

    /// The nodes that reference `peer`.
    #[inline]
    pub(super) fn nodes_referencing(&self, peer: Identity) -> impl Iterator<Item = NodeIdx> + '_ {
        self.ref_nodes.get(&peer).into_iter().flatten().copied()
    }

    /// The nodes that reference the `world`.
    #[inline]
    pub(super) fn world_nodes(&self) -> impl Iterator<Item = NodeIdx> + '_ {
        self.world_nodes.iter().copied()
    }
}

/// Counts `key` in or out of `refs`; returns whether it is referenced now when that flipped.
fn count<K: Eq + std::hash::Hash>(refs: &mut FxHashMap<K, u32>, key: K, add: bool) -> Option<bool> {
    if add {
        let c = refs.entry(key).or_default();
        *c += 1;
        (*c == 1).then_some(true)
    } else {
        let c = refs.get_mut(&key)?;
        *c = c.saturating_sub(1);
        if *c == 0 {
            refs.remove(&key);
            return Some(false);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contribution(peers: &[Identity], rules: &[RuleId]) -> Option<Arc<Contribution>> {
        Some(Arc::new(Contribution {
            peers: peers.to_vec(),
            rules: rules.to_vec(),
        }))
    }

    #[test]
    fn shared_peers_and_rules_flip_only_at_the_first_and_last_reference() {
        let mut span = NodeSpan::default();
        let first = span.update(3, 300, contribution(&[400, 401], &[10]));
        assert_eq!(
            first,
            SpanChange {
                had_group: false,
                peers: vec![(400, true), (401, true)],
                rules: vec![(10, true)],
            }
        );
        // A second group on the node using 401 and rule 10 flips only what is new.
        let second = span.update(3, 301, contribution(&[401, 402], &[10, 11]));
        assert_eq!(second.peers, vec![(402, true)]);
        assert_eq!(second.rules, vec![(11, true)]);
        assert_eq!(span.nodes_referencing(401).collect::<Vec<_>>(), [3]);
        // The first group goes: 400 is no longer referenced, 401 and rule 10 still are.
        let gone = span.update(3, 300, None);
        assert_eq!(
            gone,
            SpanChange {
                had_group: true,
                peers: vec![(400, false)],
                rules: vec![],
            }
        );
        assert!(!span.has_group(3, 300));
        assert!(span.references_peer(3, 401));
        assert!(span.has_rule(3, 10));
        assert_eq!(span.nodes_referencing(400).count(), 0);
        // Other nodes are untouched.
        assert!(!span.references_peer(0, 401));
        assert_eq!(span.groups(3).collect::<Vec<_>>(), [301]);
    }

    #[test]
    fn the_same_contribution_again_changes_nothing() {
        let mut span = NodeSpan::default();
        let c = contribution(&[identity::WORLD], &[1]);
        span.update(0, 300, c.clone());
        assert_eq!(span.world_nodes().collect::<Vec<_>>(), [0]);
        let again = span.update(0, 300, c);
        assert_eq!(
            again,
            SpanChange {
                had_group: true,
                ..SpanChange::default()
            }
        );
        // An equal contribution in a new allocation moves no count either.
        let equal = span.update(0, 300, contribution(&[identity::WORLD], &[1]));
        assert!(equal.peers.is_empty() && equal.rules.is_empty());
        span.update(0, 300, None);
        assert_eq!(span.world_nodes().count(), 0);
        assert_eq!(span.rules(0).count(), 0);
        assert_eq!(span.peers(0).count(), 0);
    }
}
