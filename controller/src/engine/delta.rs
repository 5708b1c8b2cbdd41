//! Deltas: the journal of one step (what each concern's change sets touched, and the state
//! before it), turned at the end of the step into one [`NodeDelta`] per changed node, by
//! comparing each touched thing's state before with its state now.

use super::*;

/// What one `apply` touched; empty (and inactive) between changes and during a full build.
#[derive(Default)]
pub(super) struct Journal {
    pub active: bool,
    /// Identities whose policy must be recomputed.
    pub dirty: FxHashSet<Identity>,
    pub old_policy: FxHashMap<Identity, Policies>,
    pub pods: FxHashMap<PodKey, Option<PodSnap>>,
    /// (node, group) pairs to re-span.
    pub flags: FxHashSet<Placed>,
    pub dp_changed: FxHashSet<Identity>,
    /// (node, pod address) whose ipcache entry may have changed.
    pub ip_checks: Vec<(NodeIdx, IpAddr)>,
    /// Nodes where every pod address must be re-checked (their `world` reference flipped).
    pub all_ips: FxHashSet<NodeIdx>,
    /// Whether a node referenced a peer identity before the change.
    pub peer_old: FxHashMap<(NodeIdx, Identity), bool>,
    pub rule_old: FxHashMap<(NodeIdx, RuleId), bool>,
    /// Whether a node had an identity's policy group before the change.
    pub group_old: FxHashMap<(NodeIdx, Identity), bool>,
    pub renamed_rules: FxHashSet<RuleId>,
    pub cidr_old: BTreeMap<IpNetwork, Option<Identity>>,
    /// The node-identity entry of a node address before the change (addresses whose node, or
    /// whose node's identity, changed): every node carries node addresses.
    pub node_ip_old: BTreeMap<IpAddr, Option<Identity>>,
    /// A quarantine group's exception identities before the change (groups whose list changed
    /// or that went away).
    pub allow_old: FxHashMap<Identity, Arc<Vec<Identity>>>,
    pub node_existed: FxHashMap<NodeIdx, bool>,
    /// The cluster's DNS resolvers changed: every node gets the new list.
    pub resolvers_changed: bool,
}

/// What [`PolicyEngine::node_delta`] needs of one node beyond the journal.
pub(super) struct NodeParts<'a> {
    /// Pod addresses whose entry may have changed here.
    ip_checks: &'a [(NodeIdx, IpAddr)],
    /// (identity, had its group before), this node's only.
    groups: &'a [(NodeIdx, (Identity, bool))],
    /// (rule, was referenced before), this node's only.
    rules: &'a [(NodeIdx, (RuleId, bool))],
    /// Change of each identity's policy (`None`: unchanged).
    policy_deltas: &'a FxHashMap<Identity, Option<PolicyDelta>>,
    /// Touched pods by the addresses they had before the change.
    old_at: &'a FxHashMap<IpAddr, Vec<(&'a PodKey, &'a PodSnap)>>,
    /// (name identity, was referenced before), this node's only.
    names: &'a [(NodeIdx, (Identity, bool))],
}

impl PolicyEngine {
    pub(super) fn build_deltas(&mut self) -> Vec<NodeDelta> {
        let mut j = std::mem::take(&mut self.journal);
        let mut nodes: Vec<NodeIdx> = Vec::new();
        for snap in j.pods.values().flatten() {
            nodes.push(snap.node);
        }
        for pk in j.pods.keys() {
            if let Some(st) = self.inventory.pod(pk) {
                nodes.push(st.node);
            }
        }
        for id in &j.dp_changed {
            nodes.extend(self.inventory.group_nodes(*id));
        }
        nodes.extend(j.all_ips.iter().copied());
        nodes.extend(j.node_existed.keys().copied());
        // Per node, sorted: which groups and rules it had before the change.
        let mut groups: Vec<(NodeIdx, Identity, bool)> = j
            .group_old
            .iter()
            .map(|((n, id), had)| (*n, *id, *had))
            .collect();
        groups.sort_unstable();
        let mut rules: Vec<(NodeIdx, RuleId, bool)> = j
            .rule_old
            .iter()
            .map(|((n, r), was)| (*n, *r, *was))
            .collect();
        rules.sort_unstable();
        // Per node, sorted: the name identities whose reference flipped (patterns to send).
        let mut names: Vec<(NodeIdx, (Identity, bool))> = j
            .peer_old
            .iter()
            .filter(|((_, p), _)| identity::is_name(*p))
            .map(|((n, p), was)| (*n, (*p, *was)))
            .collect();
        names.sort_unstable();
        nodes.extend(groups.iter().map(|g| g.0));
        nodes.extend(rules.iter().map(|r| r.0));
        nodes.extend(names.iter().map(|x| x.0));
        // A group's change is the same on every node that has it: computed once.
        let mut policy_deltas: FxHashMap<Identity, Option<PolicyDelta>> = FxHashMap::default();
        for (_, id, had) in &groups {
            if !*had || policy_deltas.contains_key(id) {
                continue;
            }
            let change = match (j.old_policy.get(id), self.repository.compiled(*id)) {
                (Some(old), Some(now)) if !Arc::ptr_eq(old, now) => {
                    let d = PolicyDelta::between(old, now);
                    (!d.is_empty_against(old)).then_some(d)
                }
                _ => None,
            };
            policy_deltas.insert(*id, change);
        }
        // Pods' new addresses must be (re)checked wherever they may now be carried.
        let mut ip_checks = std::mem::take(&mut j.ip_checks);
        let all: Vec<NodeIdx> = (0..self.inventory.node_count() as NodeIdx).collect();
        for pk in j.pods.keys() {
            if let Some(st) = self.inventory.pod(pk) {
                // Every node carries a quarantined pod's addresses.
                let everywhere: &[NodeIdx] = if st.quarantine.is_some() { &all } else { &[] };
                let on = std::iter::once(st.node)
                    .chain(self.span.nodes_referencing(st.identity))
                    .chain(self.span.world_nodes())
                    .chain(everywhere.iter().copied());
                for n in on {
                    ip_checks.extend(st.pod.ips.iter().map(|ip| (n, *ip)));
                }
            }
        }
        // A node that appears gets every quarantined pod's addresses.
        for (n, existed) in &j.node_existed {
            if !*existed && self.inventory.node_exists(*n) {
                for pk in self.quarantines.pods() {
                    if let Some(st) = self.inventory.pod(pk) {
                        ip_checks.extend(st.pod.ips.iter().map(|ip| (*n, *ip)));
                    }
                }
            }
        }
        ip_checks.sort_unstable();
        ip_checks.dedup();
        nodes.extend(ip_checks.iter().map(|c| c.0));
        let all_nodes = !j.cidr_old.is_empty()
            || !j.renamed_rules.is_empty()
            || j.resolvers_changed
            || !j.node_ip_old.is_empty();
        if all_nodes {
            nodes.extend(0..self.inventory.node_count() as NodeIdx);
        }
        nodes.sort_unstable();
        nodes.dedup();
        // Touched pods by the addresses they had.
        let mut old_at: FxHashMap<IpAddr, Vec<(&PodKey, &PodSnap)>> = FxHashMap::default();
        for (pk, snap) in &j.pods {
            if let Some(s) = snap {
                for ip in &s.ips {
                    old_at.entry(*ip).or_default().push((pk, s));
                }
            }
        }
        fn of_node<T>(v: &[(NodeIdx, T)], n: NodeIdx) -> &[(NodeIdx, T)] {
            &v[v.partition_point(|x| x.0 < n)..v.partition_point(|x| x.0 <= n)]
        }
        let groups: Vec<(NodeIdx, (Identity, bool))> = groups
            .into_iter()
            .map(|(n, id, had)| (n, (id, had)))
            .collect();
        let rules: Vec<(NodeIdx, (RuleId, bool))> =
            rules.into_iter().map(|(n, r, was)| (n, (r, was))).collect();
        let mut deltas = Vec::with_capacity(nodes.len());
        for n in nodes {
            let parts = NodeParts {
                ip_checks: of_node(&ip_checks, n),
                groups: of_node(&groups, n),
                rules: of_node(&rules, n),
                policy_deltas: &policy_deltas,
                old_at: &old_at,
                names: of_node(&names, n),
            };
            if let Some(d) = self.node_delta(n, &j, parts) {
                deltas.push(d);
            }
        }
        deltas
    }

    pub(super) fn node_delta(
        &mut self,
        n: NodeIdx,
        j: &Journal,
        parts: NodeParts<'_>,
    ) -> Option<NodeDelta> {
        let NodeParts {
            ip_checks,
            groups,
            rules,
            policy_deltas,
            old_at,
            names,
        } = parts;
        let existed = j
            .node_existed
            .get(&n)
            .copied()
            .unwrap_or_else(|| self.inventory.node_exists(n));
        let exists = self.inventory.node_exists(n);
        if !existed && !exists {
            return None;
        }
        let mut delta = NodeDelta {
            node: self.inventory.node_name(n).to_string(),
            from_version: if existed {
                self.inventory.version(n)
            } else {
                0
            },
            ..NodeDelta::default()
        };
        // Endpoints of touched pods.
        let mut touched: Vec<&PodKey> = j.pods.keys().collect();
        touched.sort();
        for pk in touched {
            let old = j
                .pods
                .get(pk)
                .and_then(|s| s.as_ref())
                .filter(|s| s.node == n && s.endpoint.is_some());
            let new = self
                .inventory
                .pod(pk)
                .filter(|s| s.node == n && s.endpoint.is_some());
            match (old, new) {
                (None, None) => {}
                (Some(o), None) => delta.endpoints_removed.extend(o.endpoint),
                (None, Some(s)) => {
                    if let Some(ep) = s.endpoint.and_then(|id| self.endpoint(id, pk)) {
                        delta.endpoints_added.push(ep);
                    }
                }
                (Some(o), Some(s)) => {
                    let (Some(oid), Some(nid)) = (o.endpoint, s.endpoint) else {
                        continue;
                    };
                    if oid != nid {
                        delta.endpoints_removed.push(oid);
                        if let Some(ep) = self.endpoint(nid, pk) {
                            delta.endpoints_added.push(ep);
                        }
                        continue;
                    }
                    let unchanged = o.identity == s.identity
                        && o.ips == s.pod.ips
                        && o.workload == s.pod.workload
                        && o.quarantine == s.quarantine;
                    if !unchanged {
                        delta.endpoints_changed.push(EndpointDelta {
                            id: nid,
                            identity: s.identity,
                            ips: s.pod.ips.clone(),
                            workload: s.pod.workload.clone(),
                            policy: group_of(s.group()),
                            quarantined: s.quarantine.is_some(),
                        });
                    }
                }
            }
        }
        delta.endpoints_removed.sort_unstable();
        delta.endpoints_added.sort_by_key(|e| e.id);
        delta.endpoints_changed.sort_by_key(|e| e.id);
        // Policy groups: one per identity with endpoints on the node.
        for &(_, (id, had)) in groups {
            let has = self.span.has_group(n, id);
            match (had, has) {
                (false, false) => {}
                (true, false) => delta.policies_removed.push(group_of(id)),
                (false, true) => {
                    if let Some(policy) = self.repository.compiled(id) {
                        delta
                            .policies_added
                            .insert(group_of(id), EndpointPolicy::clone(policy));
                    }
                }
                (true, true) => {
                    if let Some(change) = policy_deltas.get(&id).and_then(Option::as_ref) {
                        delta.policies_changed.insert(group_of(id), change.clone());
                    }
                }
            }
        }
        // ipcache: pod entries that may have changed, and CIDR identities that did.
        // (prefix, pod entry before, pod entry now); a prefix may come twice, with equal values.
        // An entry is the identity and, for a quarantined address, its exception identities.
        type Entry = Option<(Identity, Option<Arc<Vec<Identity>>>)>;
        let mut keys: Vec<(IpNetwork, Entry, Entry)> = Vec::new();
        let pod_key = |this: &Self, ip: IpAddr, keys: &mut Vec<_>, always: bool| {
            let net = host_net(ip);
            let new = if exists {
                this.pod_entry(n, &ip)
                    .map(|(id, g)| (id, g.map(|g| this.allow_of(g))))
            } else {
                None
            };
            let old = if existed {
                this.old_pod_entry(n, &ip, j, old_at)
                    .map(|(id, g)| (id, g.map(|g| this.old_allow_of(g, j))))
            } else {
                None
            };
            if always || new != old {
                keys.push((net, old, new));
            }
        };
        if j.all_ips.contains(&n) {
            let mut all: Vec<IpAddr> = self.inventory.addresses().map(|(ip, _)| *ip).collect();
            all.extend(old_at.keys().copied());
            all.sort_unstable();
            all.dedup();
            for ip in all {
                pod_key(self, ip, &mut keys, false);
            }
        } else {
            for &(_, ip) in ip_checks {
                pod_key(self, ip, &mut keys, false);
            }
        }
        let mut cidr_keys: Vec<IpNetwork> = j.cidr_old.keys().copied().collect();
        if !existed && exists {
            cidr_keys.extend(self.identities.cidr_identities().map(|(c, _)| c));
        }
        for c in cidr_keys {
            if c.prefix() == host_net(c.ip()).prefix() {
                pod_key(self, c.ip(), &mut keys, true);
            } else {
                keys.push((c, None, None));
            }
        }
        // Node addresses whose entry may have changed (all of them on a node that appears).
        let mut node_ips: Vec<IpAddr> = j.node_ip_old.keys().copied().collect();
        if !existed && exists {
            node_ips.extend(self.node_table.entries().into_iter().map(|(c, _)| c.ip()));
        }
        for ip in node_ips {
            pod_key(self, ip, &mut keys, true);
        }
        keys.sort_unstable_by_key(|k| k.0);
        keys.dedup_by_key(|k| k.0);
        for (k, old_p, new_p) in keys {
            let old_c = match j.cidr_old.get(&k) {
                Some(v) => *v,
                None => self.identities.cidr_identity(&k),
            };
            // An address's entry: its pod's, else its node's, else its CIDR identity.
            let host = k.prefix() == host_net(k.ip()).prefix();
            let new_n = host.then(|| self.node_table.entry(&k.ip())).flatten();
            let old_n = match j.node_ip_old.get(&k.ip()) {
                Some(v) if host => *v,
                _ => new_n,
            };
            let old_eff = if existed {
                old_p
                    .or(old_n.map(|id| (id, None)))
                    .or(old_c.map(|id| (id, None)))
            } else {
                None
            };
            let new_eff = if exists {
                new_p
                    .or(new_n.map(|id| (id, None)))
                    .or_else(|| self.identities.cidr_identity(&k).map(|id| (id, None)))
            } else {
                None
            };
            match (old_eff, new_eff) {
                (a, b) if a == b => {}
                (_, Some((id, allow))) => delta.ipcache_upserted.push(IpCacheEntry {
                    cidr: k,
                    identity: id,
                    quarantined: allow.is_some(),
                    quarantine_allow: allow.map(|a| a.to_vec()).unwrap_or_default(),
                }),
                (Some(_), None) => delta.ipcache_removed.push(k),
                (None, None) => {}
            }
        }
        // Rules.
        for &(_, (r, was)) in rules {
            let is = self.span.has_rule(n, r);
            if is && (!was || j.renamed_rules.contains(&r)) {
                if let Some(rr) = self.rule_ref(r) {
                    delta.rules_upserted.insert(r, rr);
                }
            } else if !is && was {
                delta.rules_removed.push(r);
            }
        }
        if !j.renamed_rules.is_empty() {
            let renamed: Vec<RuleId> = self
                .span
                .rules(n)
                .filter(|r| {
                    j.renamed_rules.contains(r) && rules.binary_search_by(|x| x.1.0.cmp(r)).is_err()
                })
                .collect();
            for r in renamed {
                if let Some(rr) = self.rule_ref(r) {
                    delta.rules_upserted.insert(r, rr);
                }
            }
        }
        delta.rules_removed.sort_unstable();
        self.name_delta(n, names, &mut delta);
        // A new node's delta applies to an empty rule set: it needs the list too.
        if j.resolvers_changed || (!existed && !self.dns_resolvers.is_empty()) {
            delta.dns_resolvers = Some(self.dns_resolvers.clone());
        }
        if existed && !exists {
            let version = self.inventory.bump_version(n);
            return Some(NodeDelta {
                node: delta.node,
                from_version: delta.from_version,
                version,
                node_removed: true,
                ..NodeDelta::default()
            });
        }
        if existed && delta.is_empty() {
            return None;
        }
        delta.version = self.inventory.bump_version(n);
        Some(delta)
    }
}
