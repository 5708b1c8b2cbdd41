//! Node identities: the addresses of a Node (`status.addresses`, InternalIP and ExternalIP)
//! resolve, in every node's ipcache, to a *node identity* that carries the Node's labels, so
//! that a ClusterNetworkPolicy `nodes` peer (a label selector over Nodes) is a selection like
//! any other.
//!
//! * **Key.** A node identity is a function of the Node's labels and of its CIDR class (the
//!   policy CIDRs that contain one of its addresses), allocated in its own ordered slots
//!   (`identity::FIRST_NODE_IDENTITY`, 2^16 numbers) as pod identities are in theirs: the number
//!   depends only on the keys in use, so a restart (a full build) gives the same numbers. Two
//!   Nodes with equal keys share one (their `kubernetes.io/hostname` label normally makes every
//!   key distinct).
//! * **Only while used.** Node identities exist only while some live policy names a `nodes`
//!   peer. Without one, node addresses have no ipcache entry of their own and are `world` (or the
//!   CIDR identities covering them), exactly as before node identities existed: a cluster that
//!   does not use `nodes` peers gets byte-for-byte the rule sets it got before.
//! * **Same meaning for every other policy.** A node identity matches the `world` selection and
//!   every CIDR selection its addresses are in (by CIDR class, as pods do), which is what the
//!   address matched before it had an entry; so an `ipBlock` covering node addresses, a
//!   ServicePolicy `world` peer, or a deny of `0.0.0.0/0` decide node traffic as they did. Only
//!   `nodes` selections are new. The agent's own node is a node like any other: a pod's egress
//!   to its own node's address is decided by the `nodes` peers that select that node (upstream
//!   makes no exception for it), and ingress from it (kubelet probes) by the same selections as
//!   before, since node identities match no pod selection.
//! * **Where.** Every node's ipcache carries every node address with a node identity (a few
//!   entries per Node, like Cilium's remote-node entries); a pod address equal to a node address
//!   (there should be none: host-network pods are not endpoints) keeps the pod's entry.

use super::*;

#[derive(Debug, Clone, Default)]
struct NodeInfo {
    labels: Labels,
    /// Sorted, without duplicates.
    addresses: Vec<IpAddr>,
    identity: Option<Identity>,
}

/// Nodes' labels, addresses and node identities, and which policies name `nodes` peers.
#[derive(Debug, Default)]
pub(super) struct NodeTable {
    nodes: BTreeMap<String, NodeInfo>,
    by_addr: BTreeMap<IpAddr, BTreeSet<String>>,
    /// Live policies with a `nodes` peer: node identities exist while there is one.
    users: BTreeSet<PolicyKey>,
}

impl NodeTable {
    /// Whether node identities are in use (some live policy names a `nodes` peer).
    #[inline]
    pub(super) fn in_use(&self) -> bool {
        !self.users.is_empty()
    }

    /// Records whether policy `key` names `nodes` peers; returns whether [`Self::in_use`]
    /// flipped.
    pub(super) fn set_user(&mut self, key: &PolicyKey, uses: bool) -> bool {
        let before = self.in_use();
        if uses {
            self.users.insert(key.clone());
        } else {
            self.users.remove(key);
        }
        before != self.in_use()
    }

    pub(super) fn names(&self) -> Vec<String> {
        self.nodes.keys().cloned().collect()
    }

    pub(super) fn labels(&self, name: &str) -> Option<&Labels> {
        self.nodes.get(name).map(|n| &n.labels)
    }

    pub(super) fn addresses(&self, name: &str) -> &[IpAddr] {
        self.nodes.get(name).map_or(&[], |n| &n.addresses)
    }

    pub(super) fn identity(&self, name: &str) -> Option<Identity> {
        self.nodes.get(name).and_then(|n| n.identity)
    }

    pub(super) fn set_identity(&mut self, name: &str, id: Option<Identity>) {
        if let Some(n) = self.nodes.get_mut(name) {
            n.identity = id;
        }
    }

    /// Sets a node's labels and addresses; returns whether anything changed.
    pub(super) fn set(&mut self, name: &str, labels: &Labels, addresses: &[IpAddr]) -> bool {
        let mut addresses = addresses.to_vec();
        addresses.sort_unstable();
        addresses.dedup();
        let info = self.nodes.entry(name.to_string()).or_default();
        if info.labels == *labels && info.addresses == addresses {
            return false;
        }
        let old = std::mem::replace(&mut info.addresses, addresses.clone());
        info.labels = labels.clone();
        for ip in old {
            if let Some(set) = self.by_addr.get_mut(&ip) {
                set.remove(name);
                if set.is_empty() {
                    self.by_addr.remove(&ip);
                }
            }
        }
        for ip in addresses {
            self.by_addr.entry(ip).or_default().insert(name.to_string());
        }
        true
    }

    /// Forgets a node (its identity must have been released).
    pub(super) fn remove(&mut self, name: &str) {
        self.set(name, &Labels::new(), &[]);
        self.nodes.remove(name);
    }

    /// The node identity the ipcache gives `ip`: that of the first node (by name) with the
    /// address and an identity.
    pub(super) fn entry(&self, ip: &IpAddr) -> Option<Identity> {
        self.by_addr
            .get(ip)?
            .iter()
            .find_map(|name| self.identity(name))
    }

    /// Every node address with a node identity, sorted by address.
    pub(super) fn entries(&self) -> Vec<(IpNetwork, Identity)> {
        self.by_addr
            .keys()
            .filter_map(|ip| self.entry(ip).map(|id| (host_net(*ip), id)))
            .collect()
    }

    /// The node as the model has it (labels and addresses), if known.
    pub(super) fn node(&self, name: &str) -> Option<Node> {
        self.nodes.get(name).map(|n| Node {
            name: name.to_string(),
            labels: n.labels.clone(),
            addresses: n.addresses.clone(),
        })
    }
}

impl PolicyEngine {
    /// Journals the entries of node `name`'s addresses (and of `more`) as they are before a
    /// change.
    pub(super) fn note_node_addresses(&mut self, name: &str, more: &[IpAddr]) {
        if !self.journal.active {
            return;
        }
        let ips: Vec<IpAddr> = self
            .node_table
            .addresses(name)
            .iter()
            .chain(more)
            .copied()
            .collect();
        for ip in ips {
            let now = self.node_table.entry(&ip);
            self.journal.node_ip_old.entry(ip).or_insert(now);
        }
    }

    /// A Node came or changed: its labels and addresses, then its node identity.
    pub(super) fn set_node_info(&mut self, node: &Node) -> Result<(), EngineError> {
        self.note_node_addresses(&node.name, &node.addresses);
        if !self
            .node_table
            .set(&node.name, &node.labels, &node.addresses)
        {
            return Ok(());
        }
        self.rekey_node(&node.name)
    }

    /// A Node went away: its node identity is released and its addresses leave the ipcache.
    pub(super) fn remove_node_info(&mut self, name: &str) {
        self.note_node_addresses(name, &[]);
        if let Some(id) = self.node_table.identity(name) {
            self.node_table.set_identity(name, None);
            let ch = self.identities.leave_node(id, name);
            self.identities_changed(ch);
        }
        self.node_table.remove(name);
    }

    /// Gives node `name` the node identity its labels, addresses and CIDR class call for: none
    /// while no policy names `nodes` peers, or when it has no address.
    pub(super) fn rekey_node(&mut self, name: &str) -> Result<(), EngineError> {
        let addresses = self.node_table.addresses(name);
        let want = match self.node_table.labels(name) {
            Some(labels) if self.node_table.in_use() && !addresses.is_empty() => {
                Some(self.identities.key_of_node(labels, addresses))
            }
            _ => None,
        };
        let have = self.node_table.identity(name);
        let same = match (have, &want) {
            (None, None) => true,
            (Some(id), Some(key)) => {
                matches!(self.identities.kind(id), Some(IdentityKind::Node(k)) if **k == *key)
            }
            _ => false,
        };
        if same {
            return Ok(());
        }
        self.note_node_addresses(name, &[]);
        if let Some(id) = have {
            self.node_table.set_identity(name, None);
            let ch = self.identities.leave_node(id, name);
            self.identities_changed(ch);
        }
        if let Some(key) = want {
            let (id, ch) = self.identities.acquire_node_identity(key, name)?;
            self.node_table.set_identity(name, Some(id));
            self.identities_changed(ch);
        }
        Ok(())
    }

    /// Every node re-keyed (node identities came into use or went out of use, or the policy
    /// CIDRs changed).
    pub(super) fn rekey_nodes(&mut self) -> Result<(), EngineError> {
        for name in self.node_table.names() {
            self.rekey_node(&name)?;
        }
        Ok(())
    }

    /// Records whether policy `key` names `nodes` peers; the first such policy brings node
    /// identities into use, the last one out takes them away.
    pub(super) fn set_node_user(&mut self, key: &PolicyKey, uses: bool) -> Result<(), EngineError> {
        if self.node_table.set_user(key, uses) {
            self.rekey_nodes()?;
        }
        Ok(())
    }

    /// Node identities moved by a slot collision: the nodes holding them follow (their
    /// addresses' entries journaled first, with the old number).
    pub(super) fn nodes_renumbered(&mut self, nodes: &[String], to: Identity) {
        for name in nodes {
            self.note_node_addresses(name, &[]);
            self.node_table.set_identity(name, Some(to));
        }
    }
}
