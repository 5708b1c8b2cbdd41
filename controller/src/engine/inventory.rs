//! The inventory and placement: namespaces' labels, pods (with their identity and quarantine
//! group, which the orchestrator sets), pods by address, nodes, and where every policy group
//! has endpoints (endpoint ids are the lowest free id on the node and stay fixed while the pod
//! stays there). Placement changes return the (node, group) pairs whose presence on a node may
//! have changed, for the node spans.

use super::*;

#[derive(Debug, Default)]
struct NodeState {
    name: String,
    declared: bool,
    pods: u32,
    /// The version of the node's rule set.
    version: u64,
    endpoints: BTreeMap<u32, PodRef>,
    /// A peer cluster's pseudo-node ([`peer_cluster_node`]): it holds that cluster's pods, never
    /// exists as a node and has no endpoints.
    peer_cluster: bool,
}

impl NodeState {
    fn exists(&self) -> bool {
        !self.peer_cluster && (self.declared || self.pods > 0)
    }
}

/// A policy group placed on or taken off a node: (node, group).
pub(super) type Placed = (NodeIdx, Identity);

#[derive(Default)]
pub(super) struct Inventory {
    /// The local cluster's name, for the labels of namespaces without a Namespace object.
    pub(super) local_cluster: Option<ClusterName>,
    namespaces: FxHashMap<String, Labels>,
    pods: FxHashMap<PodRef, PodState>,
    /// Pods by address, each list sorted by key (nearly always one pod: a list is far smaller
    /// than a set).
    pods_by_ip: BTreeMap<IpAddr, Vec<PodRef>>,
    nodes: Vec<NodeState>,
    node_by_name: FxHashMap<String, NodeIdx>,
    /// The endpoints of each policy group (an identity or a quarantine group), per node.
    group_endpoints: FxHashMap<Identity, FxHashMap<NodeIdx, BTreeSet<u32>>>,
    /// Endpoint id kept across a pod update: set when the old pod is removed, taken when the
    /// new one gets its endpoint.
    reserved_endpoint: Option<(PodKey, u32)>,
}

impl Inventory {
    // Namespaces.

    /// Sets a namespace's labels; returns whether they changed.
    #[inline]
    pub(super) fn set_namespace_labels(&mut self, ns: &str, labels: Labels) -> bool {
        if self.namespaces.get(ns) == Some(&labels) {
            return false;
        }
        self.namespaces.insert(ns.to_string(), labels);
        true
    }

    /// A namespace's labels (just its name label when the Namespace is unknown).
    #[inline]
    pub(super) fn namespace_labels(&self, ns: &str) -> std::borrow::Cow<'_, Labels> {
        match self.namespaces.get(ns) {
            Some(l) => std::borrow::Cow::Borrowed(l),
            None => std::borrow::Cow::Owned(namespace_labels(
                &Namespace {
                    name: ns.to_string(),
                    labels: Labels::new(),
                },
                self.local_cluster.as_ref(),
            )),
        }
    }

    /// Every namespace with labels (the name label included).
    pub(super) fn namespaces(&self) -> impl Iterator<Item = (&String, &Labels)> {
        self.namespaces.iter()
    }

    /// Whether node `n` was declared by a Node object.
    pub(super) fn declared(&self, n: NodeIdx) -> bool {
        self.nodes[n as usize].declared
    }

    // Pods.

    #[inline]
    pub(super) fn pod(&self, pk: &PodKey) -> Option<&PodState> {
        self.pods.get(pk)
    }

    #[inline]
    pub(super) fn pods(&self) -> impl Iterator<Item = (&PodRef, &PodState)> {
        self.pods.iter()
    }

    #[inline]
    pub(super) fn reserve(&mut self, pods: usize) {
        self.pods.reserve(pods);
    }

    /// The pods with address `ip`, sorted by key.
    #[inline]
    pub(super) fn pods_at(&self, ip: &IpAddr) -> &[PodRef] {
        self.pods_by_ip.get(ip).map_or(&[], |v| v.as_slice())
    }

    /// Every pod address, sorted.
    #[inline]
    pub(super) fn addresses(&self) -> impl Iterator<Item = (&IpAddr, &Vec<PodRef>)> {
        self.pods_by_ip.iter()
    }

    /// The pods with an address in `net`.
    #[inline]
    pub(super) fn pods_in(&self, net: &IpNetwork) -> impl Iterator<Item = &PodRef> {
        self.pods_by_ip
            .range(net.network()..=net.broadcast())
            .filter(|(ip, _)| net.contains(**ip))
            .flat_map(|(_, pods)| pods.iter())
    }

    /// Adds a pod (not yet an endpoint) to its node and its addresses.
    #[inline]
    pub(super) fn insert_pod(&mut self, pk: PodRef, st: PodState) {
        self.nodes[st.node as usize].pods += 1;
        for ip in &st.pod.ips {
            sorted_insert(self.pods_by_ip.entry(*ip).or_default(), &pk);
        }
        self.pods.insert(pk, st);
    }

    /// Removes a pod; `keep_endpoint` reserves its endpoint id for the pod's next version.
    /// Returns its state and, when it was an endpoint, its group's placement.
    pub(super) fn remove_pod(
        &mut self,
        pk: &PodKey,
        keep_endpoint: bool,
    ) -> Option<(PodState, Option<Placed>)> {
        let st = self.pods.remove(pk)?;
        self.nodes[st.node as usize].pods -= 1;
        let mut placed = None;
        if let Some(ep) = st.endpoint {
            if keep_endpoint {
                self.reserved_endpoint = Some((pk.clone(), ep));
            }
            self.nodes[st.node as usize].endpoints.remove(&ep);
            self.unplace(st.node, st.group(), ep);
            placed = Some((st.node, st.group()));
        }
        for ip in &st.pod.ips {
            if let Some(set) = self.pods_by_ip.get_mut(ip) {
                set.retain(|k| **k != *pk);
                if set.is_empty() {
                    self.pods_by_ip.remove(ip);
                }
            }
        }
        Some((st, placed))
    }

    /// Forgets an endpoint id reserved by [`Self::remove_pod`] that no pod took.
    #[inline]
    pub(super) fn clear_reserved_endpoint(&mut self) {
        self.reserved_endpoint = None;
    }

    /// Gives a pod with addresses an endpoint id on its node (the one it had when it was
    /// reserved and is free); returns its group's placement, `None` when the node is full.
    pub(super) fn assign_endpoint(&mut self, pk: &PodRef) -> Option<Placed> {
        let st = self.pods.get(pk)?;
        let (node, group) = (st.node, st.group());
        let n = &mut self.nodes[node as usize];
        if n.peer_cluster {
            return None;
        }
        let reserved = self
            .reserved_endpoint
            .take()
            .filter(|(k, ep)| *k == **pk && !n.endpoints.contains_key(ep))
            .map(|(_, ep)| ep);
        let id = reserved.or_else(|| {
            // Without gaps the next id is simply one past the last.
            let len = n.endpoints.len() as u32;
            if n.endpoints.keys().next_back().copied().unwrap_or(0) == len {
                return (len + 1 < MAX_ENDPOINT_ID).then_some(len + 1);
            }
            let mut next = 1;
            for k in n.endpoints.keys() {
                if *k != next {
                    break;
                }
                next += 1;
            }
            (next < MAX_ENDPOINT_ID).then_some(next)
        });
        let Some(id) = id else {
            tracing::error!(
                node = %n.name,
                pod = %pk,
                "node has {} endpoints, the most a node can have: the pod gets no policy enforcement",
                MAX_ENDPOINT_ID - 1
            );
            return None;
        };
        n.endpoints.insert(id, pk.clone());
        if let Some(st) = self.pods.get_mut(pk) {
            st.endpoint = Some(id);
        }
        self.place(node, group, id);
        Some((node, group))
    }

    /// Moves a pod between quarantine groups (`None`: back to its identity's group); returns
    /// the placements of its endpoint's old and new group when it has one.
    pub(super) fn set_quarantine(
        &mut self,
        pk: &PodKey,
        group: Option<Identity>,
    ) -> Option<[Placed; 2]> {
        let st = self.pods.get_mut(pk)?;
        let old = st.group();
        st.quarantine = group;
        let (node, new, ep) = (st.node, st.group(), st.endpoint?);
        self.unplace(node, old, ep);
        self.place(node, new, ep);
        Some([(node, old), (node, new)])
    }

    /// An identity or quarantine group of a pod renumbered from `from` to `to`; returns the
    /// placements of the groups involved when the pod has an endpoint.
    pub(super) fn renumber_pod(
        &mut self,
        pk: &PodKey,
        from: Identity,
        to: Identity,
    ) -> Option<[Placed; 2]> {
        let st = self.pods.get_mut(pk)?;
        let old = st.group();
        if st.identity == from {
            st.identity = to;
        }
        if st.quarantine == Some(from) {
            st.quarantine = Some(to);
        }
        let (node, new, ep) = (st.node, st.group(), st.endpoint?);
        if old != new {
            self.unplace(node, old, ep);
            self.place(node, new, ep);
        }
        Some([(node, from), (node, to)])
    }

    fn place(&mut self, node: NodeIdx, group: Identity, ep: u32) {
        self.group_endpoints
            .entry(group)
            .or_default()
            .entry(node)
            .or_default()
            .insert(ep);
    }

    fn unplace(&mut self, node: NodeIdx, group: Identity, ep: u32) {
        if let Some(nodes) = self.group_endpoints.get_mut(&group)
            && let Some(set) = nodes.get_mut(&node)
        {
            set.remove(&ep);
            if set.is_empty() {
                nodes.remove(&node);
                if nodes.is_empty() {
                    self.group_endpoints.remove(&group);
                }
            }
        }
    }

    // Where groups are.

    /// Whether group `group` has an endpoint on node `n`.
    #[inline]
    pub(super) fn has_endpoints(&self, group: Identity, n: NodeIdx) -> bool {
        self.group_endpoints
            .get(&group)
            .is_some_and(|nodes| nodes.contains_key(&n))
    }

    /// The nodes where group `group` has endpoints.
    #[inline]
    pub(super) fn group_nodes(&self, group: Identity) -> impl Iterator<Item = NodeIdx> + '_ {
        self.group_endpoints
            .get(&group)
            .into_iter()
            .flat_map(|nodes| nodes.keys().copied())
    }

    /// Every (node, group) with an endpoint.
    #[inline]
    pub(super) fn placements(&self) -> Vec<Placed> {
        self.group_endpoints
            .iter()
            .flat_map(|(g, nodes)| nodes.keys().map(move |n| (*n, *g)))
            .collect()
    }

    // Nodes.

    /// The index of node `name`, and whether it was made just now.
    pub(super) fn node_idx(&mut self, name: &str) -> (NodeIdx, bool) {
        if let Some(i) = self.node_by_name.get(name) {
            return (*i, false);
        }
        let idx = self.nodes.len() as NodeIdx;
        self.nodes.push(NodeState {
            name: name.to_string(),
            peer_cluster: name.ends_with('/'),
            ..NodeState::default()
        });
        self.node_by_name.insert(name.to_string(), idx);
        (idx, true)
    }

    #[inline]
    pub(super) fn find_node(&self, name: &str) -> Option<NodeIdx> {
        self.node_by_name.get(name).copied()
    }

    /// Number of node indexes (including nodes that do not exist any more).
    #[inline]
    pub(super) fn node_count(&self) -> usize {
        self.nodes.len()
    }

    #[inline]
    pub(super) fn node_name(&self, n: NodeIdx) -> &str {
        &self.nodes[n as usize].name
    }

    /// Whether node `n` has a rule set: it is declared or has pods.
    #[inline]
    pub(super) fn node_exists(&self, n: NodeIdx) -> bool {
        self.nodes[n as usize].exists()
    }

    #[inline]
    pub(super) fn set_declared(&mut self, n: NodeIdx, declared: bool) {
        self.nodes[n as usize].declared = declared;
    }

    #[inline]
    pub(super) fn version(&self, n: NodeIdx) -> u64 {
        self.nodes[n as usize].version
    }

    /// Moves node `n`'s rule set to its next version, and returns it.
    #[inline]
    pub(super) fn bump_version(&mut self, n: NodeIdx) -> u64 {
        let node = &mut self.nodes[n as usize];
        node.version += 1;
        node.version
    }

    #[inline]
    pub(super) fn set_versions(&mut self, version: u64) {
        for n in &mut self.nodes {
            n.version = version;
        }
    }

    /// Node `n`'s endpoints by id.
    #[inline]
    pub(super) fn endpoints(&self, n: NodeIdx) -> &BTreeMap<u32, PodRef> {
        &self.nodes[n as usize].endpoints
    }
}

fn sorted_insert(list: &mut Vec<PodRef>, pk: &PodRef) {
    if let Err(i) = list.binary_search_by(|k| (**k).cmp(pk)) {
        list.insert(i, pk.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(node: NodeIdx, identity: Identity, ip: &str) -> PodState {
        PodState {
            pod: Pod {
                namespace: "a".into(),
                name: "p".into(),
                labels: Labels::new(),
                service_account: "default".into(),
                node_name: None,
                ips: vec![ip.parse().unwrap()],
                synthetic_ips: false,
                ports: Vec::new(),
                workload: None,
                host_network: false,
            },
            labels_in_key: false,
            identity,
            node,
            endpoint: None,
            quarantine: None,
        }
    }

    fn key(name: &str) -> PodRef {
        Arc::new(PodKey {
            namespace: "a".into(),
            name: name.into(),
        })
    }

    #[test]
    fn endpoint_ids_are_the_lowest_free_and_kept_across_an_update() {
        let mut inv = Inventory::default();
        let (n, made) = inv.node_idx("node-1");
        assert!(made);
        assert_eq!(inv.node_idx("node-1"), (n, false));
        for (i, name) in ["p1", "p2", "p3"].into_iter().enumerate() {
            inv.insert_pod(key(name), state(n, 300, &format!("10.0.0.{i}")));
            assert_eq!(inv.assign_endpoint(&key(name)), Some((n, 300)));
        }
        assert_eq!(inv.pod(&key("p2")).and_then(|s| s.endpoint), Some(2));
        // p2 goes: its id is the lowest free one for the next pod.
        let (_, placed) = inv.remove_pod(&key("p2"), false).unwrap();
        assert_eq!(placed, Some((n, 300)));
        inv.insert_pod(key("p4"), state(n, 300, "10.0.0.4"));
        inv.assign_endpoint(&key("p4"));
        assert_eq!(inv.pod(&key("p4")).and_then(|s| s.endpoint), Some(2));
        // p1 is updated: it keeps id 1 although 4 would be next.
        inv.remove_pod(&key("p1"), true);
        inv.insert_pod(key("p1"), state(n, 301, "10.0.0.9"));
        assert_eq!(inv.assign_endpoint(&key("p1")), Some((n, 301)));
        assert_eq!(inv.pod(&key("p1")).and_then(|s| s.endpoint), Some(1));
        assert!(inv.has_endpoints(301, n));
        assert_eq!(inv.pods_at(&"10.0.0.0".parse().unwrap()), &[] as &[PodRef]);
        assert_eq!(inv.pods_at(&"10.0.0.9".parse().unwrap()), &[key("p1")]);
    }

    #[test]
    fn a_group_is_placed_while_it_has_an_endpoint_on_the_node() {
        let mut inv = Inventory::default();
        let (n, _) = inv.node_idx("node-1");
        inv.insert_pod(key("p1"), state(n, 300, "10.0.0.1"));
        inv.assign_endpoint(&key("p1"));
        let q = FIRST_QUARANTINE_GROUP;
        assert_eq!(
            inv.set_quarantine(&key("p1"), Some(q)),
            Some([(n, 300), (n, q)])
        );
        assert!(!inv.has_endpoints(300, n));
        assert!(inv.has_endpoints(q, n));
        // The pod's identity renumbered: its endpoint stays in the quarantine group.
        inv.renumber_pod(&key("p1"), 300, 310);
        assert_eq!(inv.pod(&key("p1")).map(|s| s.identity), Some(310));
        assert!(inv.has_endpoints(q, n) && !inv.has_endpoints(310, n));
        // Out of quarantine, into the (new) identity's group.
        inv.set_quarantine(&key("p1"), None);
        assert!(inv.has_endpoints(310, n) && !inv.has_endpoints(q, n));
        assert_eq!(inv.placements(), [(n, 310)]);
        inv.remove_pod(&key("p1"), false);
        assert!(inv.placements().is_empty());
        assert!(
            !inv.node_exists(n),
            "an undeclared node without pods is gone"
        );
    }
}
