//! The cluster's DNS resolvers ([`RuleSet::dns_resolvers`]): the only sources whose answers
//! teach the data plane the addresses of the names policies allow.
//!
//! By default they are the cluster DNS as Kubernetes distributions deploy it:
//! - the pods of `kube-system` labelled `k8s-app: kube-dns` (CoreDNS and kube-dns both carry
//!   that label), for pods that query them directly (or whose CNI translates the Service's
//!   answers back to the pod's address);
//! - the cluster IPs of the `kube-system/kube-dns` Service
//!   ([`PolicyEngine::set_cluster_dns_service`], fed by the Kubernetes source's watch of that
//!   one Service, [`crate::kubernetes::cluster_dns`]): pods query the Service, and after
//!   kube-proxy's (or the CNI's) translation back the answers reach them from that address.
//!   A headless Service has none; without the Service (files, or a watch the controller may
//!   not make) only the pods count.
//!
//! `bulkhead controller --dns-resolver` replaces the whole default (pods and Service); the
//! agent's `--dns-resolver` adds to it on its node. One list for the cluster: every node's rule
//! set has it, and every node gets a delta when it changes.

use super::*;

/// The namespace and label of the cluster DNS pods.
pub const CLUSTER_DNS_NAMESPACE: &str = "kube-system";
pub const CLUSTER_DNS_LABEL: (&str, &str) = ("k8s-app", "kube-dns");

impl PolicyEngine {
    /// The cluster's DNS resolvers, sorted and unique.
    pub fn dns_resolvers(&self) -> &[IpAddr] {
        &self.dns_resolvers
    }

    /// The cluster IPs of the cluster DNS Service, sorted and unique, as last set.
    pub fn cluster_dns_service(&self) -> &[IpAddr] {
        &self.cluster_dns_service
    }

    /// The cluster DNS Service's cluster IPs are now `ips` (none: no Service, or a headless
    /// one). Returns the deltas of every node when the resolvers change (never with the
    /// resolvers given: they replace the Service too), else none.
    pub fn set_cluster_dns_service(
        &mut self,
        mut ips: Vec<IpAddr>,
    ) -> Result<Vec<NodeDelta>, EngineError> {
        ips.sort_unstable();
        ips.dedup();
        if ips == self.cluster_dns_service {
            return Ok(Vec::new());
        }
        self.journaled(|e| {
            e.cluster_dns_service = ips;
            // Asks the step's end to recompute the resolvers (see `dns_resolvers_after_step`).
            e.journal.resolvers_changed = true;
            Ok(())
        })
    }

    /// At the end of a journaled step: whether the resolvers changed, bringing them up to date
    /// when the step may have changed them (a `kube-system` pod, or the Service).
    pub(super) fn dns_resolvers_after_step(&mut self) -> bool {
        let maybe = self.journal.resolvers_changed
            || self.may_change_dns_resolvers(self.journal.pods.keys());
        maybe && self.refresh_dns_resolvers()
    }

    /// The resolvers as the configuration, the pods and the Service now say.
    fn find_dns_resolvers(&self) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = match &self.config.dns_resolvers {
            Some(fixed) => fixed.clone(),
            None => self
                .inventory
                .pods()
                .filter(|(pk, _)| pk.namespace == CLUSTER_DNS_NAMESPACE)
                .filter(|(_, st)| {
                    self.pod_labels(st)
                        .get(CLUSTER_DNS_LABEL.0)
                        .map(String::as_str)
                        == Some(CLUSTER_DNS_LABEL.1)
                })
                // Made-up addresses (a preview's pods without any) answer nobody.
                .filter(|(_, st)| !st.pod.synthetic_ips)
                .flat_map(|(_, st)| st.pod.ips.iter().copied())
                .chain(self.cluster_dns_service.iter().copied())
                .collect(),
        };
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Whether a step that touched `pods` may have changed the resolvers: only a change to a
    /// `kube-system` pod can (or none, with the resolvers given).
    pub(super) fn may_change_dns_resolvers<'a>(
        &self,
        mut pods: impl Iterator<Item = &'a PodKey>,
    ) -> bool {
        self.config.dns_resolvers.is_none() && pods.any(|pk| pk.namespace == CLUSTER_DNS_NAMESPACE)
    }

    /// Brings the resolvers up to date; returns whether they changed.
    pub(super) fn refresh_dns_resolvers(&mut self) -> bool {
        let now = self.find_dns_resolvers();
        if now == self.dns_resolvers {
            return false;
        }
        self.dns_resolvers = now;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Node;

    fn pod(namespace: &str, name: &str, node: &str, label: Option<&str>, ips: &[&str]) -> Pod {
        Pod {
            namespace: namespace.into(),
            name: name.into(),
            labels: label
                .map(|v| [(CLUSTER_DNS_LABEL.0.to_string(), v.to_string())].into())
                .unwrap_or_default(),
            service_account: "default".into(),
            node_name: Some(node.into()),
            ips: ips.iter().map(|a| a.parse().expect("address")).collect(),
            synthetic_ips: false,
            ports: Vec::new(),
            workload: None,
            host_network: false,
        }
    }

    fn addrs(a: &[&str]) -> Vec<IpAddr> {
        a.iter().map(|a| a.parse().expect("address")).collect()
    }

    fn objects() -> Vec<Object> {
        vec![
            Object::Node(Node {
                name: "n1".into(),
                labels: Labels::new(),
                addresses: Vec::new(),
            }),
            Object::Node(Node {
                name: "n2".into(),
                labels: Labels::new(),
                addresses: Vec::new(),
            }),
            Object::Pod(pod(
                "kube-system",
                "coredns-a",
                "n1",
                Some("kube-dns"),
                &["10.240.1.10", "fd00:240::1:a"],
            )),
            // Same label elsewhere, another label in kube-system: neither is the cluster DNS.
            Object::Pod(pod(
                "team-a",
                "fake-dns",
                "n2",
                Some("kube-dns"),
                &["10.240.2.9"],
            )),
            Object::Pod(pod(
                "kube-system",
                "metrics",
                "n2",
                Some("metrics"),
                &["10.240.2.8"],
            )),
            Object::Pod(pod("team-a", "web", "n2", None, &["10.240.2.7"])),
        ]
    }

    /// Every node's rule set carries the cluster DNS pods' addresses, also on the wire, and a
    /// new DNS pod reaches every node as a delta, also one whose own rule set did not change.
    #[test]
    fn every_node_learns_from_the_kube_dns_pods_snapshot_and_delta() {
        let mut e = PolicyEngine::new(EngineConfig::default(), objects()).expect("compiles");
        let want = addrs(&["10.240.1.10", "fd00:240::1:a"]);
        assert_eq!(e.dns_resolvers(), want);
        let mut before = BTreeMap::new();
        for node in ["n1", "n2"] {
            let rs = e.ruleset(node).expect("rule set");
            assert_eq!(rs.dns_resolvers, want, "{node}");
            let wire = bulkhead_proto::v1::RuleSet::from(&rs);
            assert_eq!(RuleSet::try_from(&wire).expect("decodes"), rs);
            before.insert(node, rs);
        }
        let deltas = e
            .apply(Change::UpsertPod(pod(
                "kube-system",
                "coredns-b",
                "n2",
                Some("kube-dns"),
                &["10.240.2.10"],
            )))
            .expect("applies");
        let want = addrs(&["10.240.1.10", "10.240.2.10", "fd00:240::1:a"]);
        assert_eq!(deltas.len(), 2, "both nodes: {deltas:?}");
        for d in &deltas {
            assert_eq!(d.dns_resolvers.as_ref(), Some(&want), "{}", d.node);
            let wire = bulkhead_proto::v1::NodeDelta::from(d);
            let back = NodeDelta::try_from(&wire).expect("decodes");
            assert_eq!(&back, d);
            let rs = before.get_mut(d.node.as_str()).expect("known node");
            rs.apply_delta(&back).expect("applies");
            assert_eq!(*rs, e.ruleset(&d.node).expect("rule set"));
        }
        // A change elsewhere leaves the list out of the delta.
        let deltas = e
            .apply(Change::UpsertPod(pod(
                "team-a",
                "api",
                "n2",
                None,
                &["10.240.2.11"],
            )))
            .expect("applies");
        assert!(
            deltas.iter().all(|d| d.dns_resolvers.is_none()),
            "{deltas:?}"
        );
        // The last DNS pod gone: the list empties on every node.
        e.apply(Change::DeletePod(PodKey {
            namespace: "kube-system".into(),
            name: "coredns-b".into(),
        }))
        .expect("applies");
        let deltas = e
            .apply(Change::DeletePod(PodKey {
                namespace: "kube-system".into(),
                name: "coredns-a".into(),
            }))
            .expect("applies");
        assert!(deltas.len() == 2 && deltas.iter().all(|d| d.dns_resolvers == Some(vec![])));
    }

    #[test]
    fn given_resolvers_replace_the_kube_dns_pods() {
        let config = EngineConfig {
            dns_resolvers: Some(addrs(&["10.96.0.10", "10.96.0.10", "169.254.20.10"])),
            ..EngineConfig::default()
        };
        let mut e = PolicyEngine::new(config, objects()).expect("compiles");
        let want = addrs(&["10.96.0.10", "169.254.20.10"]);
        assert_eq!(e.ruleset("n2").expect("rule set").dns_resolvers, want);
        let deltas = e
            .apply(Change::UpsertPod(pod(
                "kube-system",
                "coredns-b",
                "n2",
                Some("kube-dns"),
                &["10.240.2.10"],
            )))
            .expect("applies");
        assert!(
            deltas.iter().all(|d| d.dns_resolvers.is_none()),
            "{deltas:?}"
        );
        // A node that appears gets the list with its first delta.
        let deltas = e
            .apply(Change::UpsertNode(Node {
                name: "n3".into(),
                labels: Labels::new(),
                addresses: Vec::new(),
            }))
            .expect("applies");
        let n3 = deltas.iter().find(|d| d.node == "n3").expect("n3's delta");
        assert_eq!(n3.dns_resolvers.as_ref(), Some(&want));
    }

    /// The Service's cluster IPs join the pods' addresses on every node; a change of them is a
    /// delta to every node, the same list again none, and an empty list (Service gone or
    /// headless) leaves the pods.
    #[test]
    fn the_kube_dns_service_adds_its_cluster_ips_to_every_node() {
        let mut e = PolicyEngine::new(EngineConfig::default(), objects()).expect("compiles");
        let mut before: BTreeMap<&str, RuleSet> = ["n1", "n2"]
            .into_iter()
            .map(|n| (n, e.ruleset(n).expect("rule set")))
            .collect();
        let mut step = |e: &mut PolicyEngine, ips: &[&str], want: &[&str]| {
            let deltas = e.set_cluster_dns_service(addrs(ips)).expect("applies");
            assert_eq!(deltas.len(), 2, "both nodes: {deltas:?}");
            for d in &deltas {
                assert_eq!(d.dns_resolvers.as_ref(), Some(&addrs(want)), "{}", d.node);
                let back =
                    NodeDelta::try_from(&bulkhead_proto::v1::NodeDelta::from(d)).expect("decodes");
                let rs = before.get_mut(d.node.as_str()).expect("known node");
                rs.apply_delta(&back).expect("applies");
                assert_eq!(*rs, e.ruleset(&d.node).expect("rule set"));
            }
        };
        step(
            &mut e,
            &["fd00:96::a", "10.96.0.10", "10.96.0.10"],
            &["10.96.0.10", "10.240.1.10", "fd00:96::a", "fd00:240::1:a"],
        );
        assert_eq!(
            e.cluster_dns_service(),
            addrs(&["10.96.0.10", "fd00:96::a"])
        );
        // The same addresses in another order: nothing to send.
        assert!(
            e.set_cluster_dns_service(addrs(&["fd00:96::a", "10.96.0.10"]))
                .expect("applies")
                .is_empty()
        );
        step(
            &mut e,
            &["10.96.0.53"],
            &["10.96.0.53", "10.240.1.10", "fd00:240::1:a"],
        );
        step(&mut e, &[], &["10.240.1.10", "fd00:240::1:a"]);
        // A Service address that is also a DNS pod's: listed once.
        let deltas = e
            .set_cluster_dns_service(addrs(&["10.240.1.10"]))
            .expect("applies");
        assert!(deltas.is_empty(), "{deltas:?}");
    }

    #[test]
    fn given_resolvers_replace_the_kube_dns_service_too() {
        let config = EngineConfig {
            dns_resolvers: Some(addrs(&["169.254.20.10"])),
            ..EngineConfig::default()
        };
        let mut e = PolicyEngine::new(config, objects()).expect("compiles");
        let deltas = e
            .set_cluster_dns_service(addrs(&["10.96.0.10"]))
            .expect("applies");
        assert!(deltas.is_empty(), "{deltas:?}");
        assert_eq!(e.dns_resolvers(), addrs(&["169.254.20.10"]));
        assert_eq!(
            e.ruleset("n1").expect("rule set").dns_resolvers,
            addrs(&["169.254.20.10"])
        );
    }
}
