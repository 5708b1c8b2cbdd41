//! Egress peers by DNS name: which name patterns a node's rule set carries.

use super::*;

impl PolicyEngine {
    /// The name patterns the entries of node `n`'s groups name, with their name identities,
    /// sorted by identity.
    pub(super) fn node_names(&self, _n: NodeIdx) -> Vec<crate::ruleset::NameEntry> {
        Vec::new()
    }
}
