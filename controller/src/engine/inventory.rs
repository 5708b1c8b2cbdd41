//! Pods, nodes and namespaces: where each pod runs, its endpoint id on its node.

use super::*;

impl PolicyEngine {
    pub(super) fn set_namespace_labels(&mut self, ns: &str, labels: Labels) {
        if self.namespaces.get(ns) == Some(&labels) {
            return;
        }
        self.namespaces.insert(ns.to_string(), labels);
        let ids: Vec<Identity> = self
            .identities_by_ns
            .get(ns)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let sels: Vec<SelId> = self
            .sel_global
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
        for s in sels {
            for id in &ids {
                let on = self.spec_matches(&self.sel(s).spec, *id);
                self.set_member(s, *id, on);
            }
        }
    }

    pub(super) fn note_node(&mut self, idx: NodeIdx) {
        if self.journal.active {
            let existed = self.nodes[idx as usize].exists();
            self.journal.node_existed.entry(idx).or_insert(existed);
        }
    }

    /// Records a pod's state before the change, and marks its old addresses for re-checking on
    /// every node that may hold them.
    pub(super) fn touch_pod(&mut self, pk: &PodKey) {
        if !self.journal.active || self.journal.pods.contains_key(pk) {
            return;
        }
        let snap = self.pods.get(pk).map(|s| PodSnap {
            identity: s.identity,
            node: s.node,
            ips: s.pod.ips.clone(),
            endpoint: s.endpoint,
            workload: s.pod.workload.clone(),
            quarantine: s.quarantine,
        });
        if let Some(s) = &snap
            && !s.ips.is_empty()
        {
            let mut nodes: Vec<NodeIdx> = vec![s.node];
            if s.quarantine.is_some() {
                // Every node carries a quarantined pod's addresses.
                nodes.extend(0..self.nodes.len() as NodeIdx);
            }
            if let Some(r) = self.ref_nodes.get(&s.identity) {
                nodes.extend(r.iter().copied());
            }
            nodes.extend(self.world_nodes.iter().copied());
            for n in nodes {
                self.journal
                    .ip_checks
                    .extend(s.ips.iter().map(|ip| (n, *ip)));
            }
        }
        self.journal.pods.insert(pk.clone(), snap);
    }

    pub(super) fn remove_pod(
        &mut self,
        pk: &PodKey,
        replacement: Option<&Pod>,
    ) -> Result<(), EngineError> {
        let Some(old) = self.pods.get(pk) else {
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
        let Some(st) = self.pods.remove(pk) else {
            return;
        };
        self.note_node(st.node);
        self.nodes[st.node as usize].pods -= 1;
        if let Some(ep) = st.endpoint {
            if keep_endpoint {
                self.reserved_endpoint = Some((pk.clone(), ep));
            }
            self.nodes[st.node as usize].endpoints.remove(&ep);
            self.detach_endpoint(st.node, st.group(), ep);
        }
        if let Some(group) = st.quarantine {
            self.quarantined_pods.remove(pk);
            self.leave_quarantine_group(group, pk);
        }
        for ip in &st.pod.ips {
            if let Some(set) = self.pods_by_ip.get_mut(ip) {
                set.retain(|k| **k != *pk);
                if set.is_empty() {
                    self.pods_by_ip.remove(ip);
                }
            }
        }
        let empty = match self.identities.get_mut(&st.identity) {
            Some(s) => {
                s.pods.remove(pk);
                s.pods.is_empty()
            }
            None => false,
        };
        if empty {
            self.release_pod_identity(st.identity);
        }
    }

    pub(super) fn insert_pod(&mut self, mut pod: Pod) -> Result<(), EngineError> {
        let pk: PodRef = Arc::new(pod.key());
        self.touch_pod(&pk);
        let key = self.identity_key(&pod);
        let labels_in_key = strip_labels(&mut pod, &key);
        let id = self.acquire_pod_identity(key)?;
        let node_name = pod
            .node_name
            .clone()
            .unwrap_or_else(|| self.config.unscheduled_node.clone());
        let node = self.node_idx(&node_name);
        self.note_node(node);
        self.nodes[node as usize].pods += 1;
        if let Some(s) = self.identities.get_mut(&id) {
            s.pods.insert(pk.clone());
        }
        for ip in &pod.ips {
            sorted_insert(self.pods_by_ip.entry(*ip).or_default(), &pk);
        }
        let has_ips = !pod.ips.is_empty();
        self.pods.insert(
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
        if has_ips {
            self.assign_endpoint(&pk);
        }
        self.reserved_endpoint = None;
        Ok(())
    }

    pub(super) fn node_idx_of(&self, pod: &Pod) -> Option<NodeIdx> {
        let name = pod
            .node_name
            .as_deref()
            .unwrap_or(&self.config.unscheduled_node);
        self.node_by_name.get(name).copied()
    }

    pub(super) fn node_idx(&mut self, name: &str) -> NodeIdx {
        if let Some(i) = self.node_by_name.get(name) {
            return *i;
        }
        let idx = self.nodes.len() as NodeIdx;
        self.nodes.push(NodeState {
            name: name.to_string(),
            ..NodeState::default()
        });
        self.node_by_name.insert(name.to_string(), idx);
        if self.journal.active {
            self.journal.node_existed.insert(idx, false);
        }
        idx
    }

    /// Gives a pod with addresses an endpoint id on its node.
    pub(super) fn assign_endpoint(&mut self, pk: &PodRef) {
        let Some(st) = self.pods.get(pk) else {
            return;
        };
        let (node, identity) = (st.node, st.group());
        let n = &mut self.nodes[node as usize];
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
            return;
        };
        n.endpoints.insert(id, pk.clone());
        if let Some(st) = self.pods.get_mut(pk) {
            st.endpoint = Some(id);
        }
        if let Some(s) = self.identities.get_mut(&identity) {
            s.endpoints.entry(node).or_default().insert(id);
        }
        if self.journal.active {
            self.journal.flags.insert((node, identity));
        }
    }

    pub(super) fn detach_endpoint(&mut self, node: NodeIdx, identity: Identity, ep: u32) {
        if let Some(s) = self.identities.get_mut(&identity)
            && let Some(set) = s.endpoints.get_mut(&node)
        {
            set.remove(&ep);
            if set.is_empty() {
                s.endpoints.remove(&node);
            }
        }
        if self.journal.active {
            self.journal.flags.insert((node, identity));
        }
    }
}
