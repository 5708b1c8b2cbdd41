//! Egress peers by DNS name: which name patterns a node's rule set carries, and the guard
//! that keeps one name identity to one pattern.
//!
//! A name peer is a selection ([`SelectionSpec::Name`]) whose only member is the pattern's
//! name identity ([`crate::ruleset::name_identity`], a function of the pattern): its entries
//! are keyed by that identity like any peer's, the node that has such an entry references the
//! identity as a peer, and the node's rule set lists the pattern ([`RuleSet::names`]). No
//! address resolves to a name identity in the ipcache: only addresses the data plane learns
//! from DNS answers get one.

use super::*;
use crate::ruleset::{NameEntry, NamePattern, name_identity};

impl PolicyEngine {
    /// The name patterns the entries of node `n`'s groups name, with their name identities,
    /// sorted by identity.
    pub(super) fn node_names(&self, n: NodeIdx) -> Vec<NameEntry> {
        let mut names: Vec<NameEntry> = self
            .span
            .peers(n)
            .filter(|p| identity::is_name(*p))
            .filter_map(|id| {
                self.name_pattern(id).map(|pattern| NameEntry {
                    identity: id,
                    pattern,
                })
            })
            .collect();
        names.sort();
        names
    }

    /// The pattern whose name identity `id` is, while a policy uses it.
    pub(super) fn name_pattern(&self, id: Identity) -> Option<NamePattern> {
        self.selectors
            .selections_of(id)
            .find_map(|s| match &**self.selectors.spec(s) {
                SelectionSpec::Name(p) => Some(p.clone()),
                _ => None,
            })
    }

    /// `policy` without the name peers whose name identity another pattern in use (or an
    /// earlier one of the same policy) already has: two patterns under one number would let
    /// the addresses learned for one admit what the other's rules admit, so the later one
    /// admits nothing (fail closed) and the controller says so. (Probability and why not
    /// probing: see [`crate::ruleset::name_identity`].)
    pub(super) fn without_colliding_names(&self, mut policy: Policy) -> Policy {
        let mut own: FxHashMap<Identity, NamePattern> = FxHashMap::default();
        let mut colliding: Vec<NamePattern> = Vec::new();
        for p in policy.names() {
            let id = name_identity(p);
            let other = own
                .get(&id)
                .cloned()
                .or_else(|| self.name_pattern(id))
                .filter(|q| q != p);
            match other {
                Some(q) => {
                    tracing::warn!(
                        policy = %policy.key,
                        pattern = %p,
                        other = %q,
                        identity = id,
                        "two DNS name patterns have the same name identity: the policy's peer admits nothing; rename one (e.g. add or drop a label) to use it"
                    );
                    colliding.push(p.clone());
                }
                None => {
                    own.insert(id, p.clone());
                }
            }
        }
        if !colliding.is_empty() {
            for rule in &mut policy.rules {
                rule.peers
                    .retain(|peer| !matches!(peer, Peer::Name(p) if colliding.contains(p)));
            }
        }
        policy
    }

    /// Name patterns that came to or left node `n` in this step, from the peers whose
    /// reference on the node flipped (`peers`: this node's (identity, referenced before)).
    pub(super) fn name_delta(
        &self,
        n: NodeIdx,
        peers: &[(NodeIdx, (Identity, bool))],
        delta: &mut NodeDelta,
    ) {
        for &(_, (id, was)) in peers {
            let is = self.span.references_peer(n, id);
            match (was, is) {
                (false, true) => {
                    if let Some(pattern) = self.name_pattern(id) {
                        delta.names_added.push(NameEntry {
                            identity: id,
                            pattern,
                        });
                    }
                }
                (true, false) => delta.names_removed.push(id),
                _ => {}
            }
        }
        delta.names_added.sort();
        delta.names_removed.sort_unstable();
    }
}
