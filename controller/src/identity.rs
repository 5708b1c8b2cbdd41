//! Security identities: which pods share one, and how numbers are chosen.
//!
//! An identity stands for every pod with the same namespace, service account and
//! identity-relevant labels (see [`LabelFilter`]). Two further, usually invisible, parts make
//! the compiled rule sets exact: the pod's named container ports (a named-port rule resolves to
//! the same port numbers for every pod of an identity) and its *CIDR class*, the set of policy
//! CIDRs its real address falls in (so an ipBlock that covers some pods of a deployment and not
//! others still matches exactly the covered ones). Pods of one workload share all of these.
//!
//! Numbers come from an [`OrderedSlots`] table: the home slot is a hash of namespace, service
//! account and labels, collisions are resolved by ordered linear probing, so the number of every
//! identity is a function of the *set* of identities in use — the same inventory gives the same
//! numbers after a restart, whatever order objects arrive in — and a change only ever renumbers
//! identities that collided with it.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::Hash;

use ipnetwork::IpNetwork;
use rustc_hash::FxHashMap;

use crate::error::EngineError;
use crate::model::Labels;
use crate::ruleset::{CLUSTER_LABEL, Identity, Protocol, identity};

/// Labels that change on every rollout or per pod and would give each pod its own identity.
pub const DEFAULT_EXCLUDED_LABELS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-name",
    "batch.kubernetes.io/job-completion-index",
    "controller-uid",
    "job-name",
];

/// Which pod labels take part in identities. Selectors on an excluded label see it as absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelFilter {
    pub excluded_keys: BTreeSet<String>,
    /// Keys starting with one of these are excluded too (e.g. `io.cilium.k8s.`).
    pub excluded_prefixes: Vec<String>,
}

impl Default for LabelFilter {
    fn default() -> Self {
        LabelFilter {
            excluded_keys: DEFAULT_EXCLUDED_LABELS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            excluded_prefixes: Vec::new(),
        }
    }
}

impl LabelFilter {
    /// Keeps every label.
    pub fn none() -> LabelFilter {
        LabelFilter {
            excluded_keys: BTreeSet::new(),
            excluded_prefixes: Vec::new(),
        }
    }

    /// Whether `key` takes part in identities. [`CLUSTER_LABEL`] always does: selecting a peer
    /// cluster's pods depends on it.
    pub fn keeps(&self, key: &str) -> bool {
        key == CLUSTER_LABEL
            || !self.excluded_keys.contains(key)
                && !self.excluded_prefixes.iter().any(|p| key.starts_with(p))
    }

    pub fn apply(&self, labels: &Labels) -> Labels {
        labels
            .iter()
            .filter(|(k, _)| self.keeps(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// What pods of one identity have in common.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityKey {
    pub namespace: String,
    pub service_account: String,
    /// Identity-relevant labels only.
    pub labels: BTreeMap<String, String>,
    /// `(name, protocol, port)` of the pod's named container ports, sorted.
    pub named_ports: Vec<(String, Protocol, u16)>,
    /// The policy CIDRs (ipBlock, networks, except) that contain one of the pod's real
    /// addresses, sorted.
    pub cidr_class: Vec<IpNetwork>,
}

impl IdentityKey {
    /// Home-slot hash: only namespace, service account and labels, so that a change of ports or
    /// CIDR class keeps the number unless it collides.
    pub fn home_hash(&self) -> u64 {
        let mut h = Fnv::default();
        h.write(self.namespace.as_bytes());
        h.write(&[0xff]);
        h.write(self.service_account.as_bytes());
        for (k, v) in &self.labels {
            h.write(&[0xfe]);
            h.write(k.as_bytes());
            h.write(&[0xfd]);
            h.write(v.as_bytes());
        }
        h.finish()
    }

    /// Ports named `name` (with `protocol` when given).
    pub fn named_port(
        &self,
        name: &str,
        protocol: Option<Protocol>,
    ) -> impl Iterator<Item = (Protocol, u16)> + '_ {
        let name = name.to_string();
        self.named_ports
            .iter()
            .filter(move |(n, p, _)| *n == name && protocol.is_none_or(|q| q == *p))
            .map(|(_, p, port)| (*p, *port))
    }
}

/// What the nodes of one node identity have in common: their labels (all of them: a Node's
/// labels are set by administrators and kubelets, not by controllers stamping hashes, and a
/// `nodes` selector may name any) and the policy CIDRs that contain one of their addresses (so
/// that a node address matches exactly the `networks`/`ipBlock` peers it matched before it had
/// an identity). Two nodes with equal keys share the identity, as pods do; in practice the
/// `kubernetes.io/hostname` label makes every node's key its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeIdentityKey {
    pub labels: BTreeMap<String, String>,
    /// Sorted.
    pub cidr_class: Vec<IpNetwork>,
}

impl NodeIdentityKey {
    /// Home-slot hash: the labels only, so that a change of CIDR class keeps the number unless
    /// it collides.
    pub fn home_hash(&self) -> u64 {
        let mut h = Fnv::default();
        h.write(b"node");
        for (k, v) in &self.labels {
            h.write(&[0xfe]);
            h.write(k.as_bytes());
            h.write(&[0xfd]);
            h.write(v.as_bytes());
        }
        h.finish()
    }
}

/// 64-bit FNV-1a: a hash whose value is fixed by its definition, so identity numbers do not
/// depend on the Rust version or a random seed.
#[derive(Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn finish(&self) -> u64 {
        // FNV's low bits are weak for short inputs; fold the high half in.
        self.0 ^ (self.0 >> 29)
    }

    pub fn hash_str(s: &str) -> u64 {
        let mut h = Fnv::default();
        h.write(s.as_bytes());
        h.finish()
    }
}

/// A key whose number changed because another key was inserted or removed next to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move<K> {
    pub key: K,
    pub from: u32,
    pub to: u32,
}

/// Numbers for keys, as a hash table with ordered linear probing (Amble & Knuth): keys of one
/// probe run are laid out in (home, key) order, so the layout — and every key's number — depends
/// only on the set of keys, never on insertion order. Slots do not wrap: the last `overflow`
/// slots only take keys probing past the end of the home range.
#[derive(Debug, Clone)]
pub struct OrderedSlots<K> {
    base: u32,
    homes: u32,
    capacity: u32,
    slots: FxHashMap<u32, (u32, K)>,
    by_key: FxHashMap<K, u32>,
    name: &'static str,
}

impl<K: Clone + Ord + Hash> OrderedSlots<K> {
    /// Numbers `base .. base + homes + overflow`.
    pub fn new(name: &'static str, base: u32, homes: u32, overflow: u32) -> OrderedSlots<K> {
        OrderedSlots {
            base,
            homes,
            capacity: homes + overflow,
            slots: FxHashMap::default(),
            by_key: FxHashMap::default(),
            name,
        }
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub fn get<Q>(&self, key: &Q) -> Option<u32>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.by_key.get(key).map(|s| self.base + s)
    }

    pub fn key_of(&self, number: u32) -> Option<&K> {
        number
            .checked_sub(self.base)
            .and_then(|s| self.slots.get(&s))
            .map(|(_, k)| k)
    }

    fn home(&self, hash: u64) -> u32 {
        (hash % self.homes as u64) as u32
    }

    /// Run of occupied slots around `slot`: (first, last) inclusive, or None if `slot` is free.
    fn run_around(&self, slot: u32) -> Option<(u32, u32)> {
        if !self.slots.contains_key(&slot) {
            return None;
        }
        let mut first = slot;
        while first > 0 && self.slots.contains_key(&(first - 1)) {
            first -= 1;
        }
        let mut last = slot;
        while self.slots.contains_key(&(last + 1)) {
            last += 1;
        }
        Some((first, last))
    }

    /// Lays `keys` out from `start` in canonical order; returns the moves of keys that had a slot.
    fn place(
        &mut self,
        start: u32,
        mut keys: Vec<(u32, K)>,
        moves: &mut Vec<Move<K>>,
    ) -> Result<(), EngineError> {
        keys.sort();
        let mut pos = start;
        for (home, key) in keys {
            pos = pos.max(home);
            if pos >= self.capacity {
                return Err(EngineError::SpaceExhausted {
                    space: self.name,
                    used: self.by_key.len(),
                });
            }
            if let Some(old) = self.by_key.insert(key.clone(), pos)
                && old != pos
            {
                moves.push(Move {
                    key: key.clone(),
                    from: self.base + old,
                    to: self.base + pos,
                });
            }
            self.slots.insert(pos, (home, key));
            pos += 1;
        }
        Ok(())
    }

    /// Inserts `key` (no-op if present); returns its number and the keys that moved.
    pub fn insert(&mut self, key: K, hash: u64) -> Result<(u32, Vec<Move<K>>), EngineError> {
        if let Some(n) = self.get(&key) {
            return Ok((n, Vec::new()));
        }
        let home = self.home(hash);
        let mut moves = Vec::new();
        match self.run_around(home) {
            None => {
                self.slots.insert(home, (home, key.clone()));
                self.by_key.insert(key.clone(), home);
            }
            Some((first, last)) => {
                let mut keys: Vec<(u32, K)> = (first..=last)
                    .filter_map(|s| self.slots.remove(&s))
                    .collect();
                keys.push((home, key.clone()));
                self.place(first, keys, &mut moves)?;
            }
        }
        let n = self.get(&key).unwrap_or(self.base);
        Ok((n, moves))
    }

    /// Removes `key`; returns the keys that moved to close the gap.
    pub fn remove<Q>(&mut self, key: &Q) -> Vec<Move<K>>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let Some(slot) = self.by_key.remove(key) else {
            return Vec::new();
        };
        let mut moves = Vec::new();
        if let Some((first, last)) = self.run_around(slot) {
            let keys: Vec<(u32, K)> = (first..=last)
                .filter_map(|s| self.slots.remove(&s))
                .filter(|(_, k)| k.borrow() != key)
                .collect();
            // Re-placing fewer keys than were there always fits.
            let _ = self.place(first, keys, &mut moves);
        }
        moves
    }
}

/// Pod identities: numbers from [`identity::FIRST_ALLOCATED_IDENTITY`] below
/// [`identity::FIRST_CIDR_IDENTITY`].
pub fn pod_identity_slots() -> OrderedSlots<std::sync::Arc<IdentityKey>> {
    let total = identity::FIRST_CIDR_IDENTITY - identity::FIRST_ALLOCATED_IDENTITY;
    OrderedSlots::new(
        "pod identity",
        identity::FIRST_ALLOCATED_IDENTITY,
        total - 4096,
        4096,
    )
}

/// A peer cluster's pod identities: numbers from [`identity::FIRST_REMOTE_IDENTITY`], apart from
/// the local ones (an import never takes or moves a local pod's number).
pub fn remote_identity_slots() -> OrderedSlots<std::sync::Arc<IdentityKey>> {
    OrderedSlots::new(
        "remote pod identity",
        identity::FIRST_REMOTE_IDENTITY,
        identity::REMOTE_IDENTITY_COUNT - 4096,
        4096,
    )
}

/// CIDR identities: numbers from [`identity::FIRST_CIDR_IDENTITY`], 2^23 of them.
pub fn cidr_identity_slots() -> OrderedSlots<IpNetwork> {
    OrderedSlots::new(
        "CIDR identity",
        identity::FIRST_CIDR_IDENTITY,
        (1 << 23) - 4096,
        4096,
    )
}

/// Node identities: numbers from [`identity::FIRST_NODE_IDENTITY`], 2^16 of them.
pub fn node_identity_slots() -> OrderedSlots<std::sync::Arc<NodeIdentityKey>> {
    OrderedSlots::new(
        "node identity",
        identity::FIRST_NODE_IDENTITY,
        identity::NODE_IDENTITY_COUNT - 1024,
        1024,
    )
}

pub fn cidr_hash(cidr: &IpNetwork) -> u64 {
    Fnv::hash_str(&cidr.to_string())
}

/// Which identities a pod-backed number stands for; released numbers are reused.
pub fn is_pod_identity(id: Identity) -> bool {
    (identity::FIRST_ALLOCATED_IDENTITY..identity::FIRST_CIDR_IDENTITY).contains(&id)
}

pub fn is_cidr_identity(id: Identity) -> bool {
    (identity::FIRST_CIDR_IDENTITY..identity::FIRST_NODE_IDENTITY).contains(&id)
}

/// Which identities stand for nodes (see [`NodeIdentityKey`]).
pub fn is_node_identity(id: Identity) -> bool {
    id >= identity::FIRST_NODE_IDENTITY
        && id - identity::FIRST_NODE_IDENTITY < identity::NODE_IDENTITY_COUNT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_slots_layout_does_not_depend_on_insertion_order() {
        // A tiny table forces collisions.
        let keys: Vec<(String, u64)> = (0..40)
            .map(|i| (format!("k{i}"), (i * 7 % 5) as u64))
            .collect();
        let mut a = OrderedSlots::new("test", 10, 8, 64);
        for (k, h) in &keys {
            a.insert(k.clone(), *h).expect("fits");
        }
        let mut b = OrderedSlots::new("test", 10, 8, 64);
        for (k, h) in keys.iter().rev() {
            b.insert(k.clone(), *h).expect("fits");
        }
        for (k, _) in &keys {
            assert_eq!(a.get(k), b.get(k), "{k}");
        }
        // Removing and re-inserting gives the same layout; removal reports moves.
        let mut moved = 0;
        for (k, _) in keys.iter().step_by(3) {
            moved += a.remove(k).len();
        }
        assert!(moved > 0);
        let mut c = OrderedSlots::new("test", 10, 8, 64);
        for (i, (k, h)) in keys.iter().enumerate() {
            if i % 3 != 0 {
                c.insert(k.clone(), *h).expect("fits");
            }
        }
        for (k, _) in &keys {
            assert_eq!(a.get(k), c.get(k), "{k}");
        }
    }

    #[test]
    fn ordered_slots_report_exhaustion() {
        let mut a = OrderedSlots::new("test", 0, 2, 1);
        for i in 0..3 {
            a.insert(i, 0).expect("fits");
        }
        assert!(matches!(
            a.insert(3, 0),
            Err(EngineError::SpaceExhausted { .. })
        ));
    }

    #[test]
    fn label_filter_drops_churning_labels() {
        let f = LabelFilter::default();
        let labels: Labels = [
            ("app", "web"),
            ("pod-template-hash", "abc"),
            ("job-name", "x"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(f.apply(&labels).keys().collect::<Vec<_>>(), vec!["app"]);
        assert_eq!(LabelFilter::none().apply(&labels).len(), 3);
    }
}
