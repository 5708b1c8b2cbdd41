//! Scenario generators shared by the benchmarks in `src/bin/`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use bulkhead_controller::model::{
    Isolation, Namespace, NamespaceScope, Node, Object, Peer, Pod, PodSelection, Policy, PolicyKey,
    PortSpec, Rule,
};
use bulkhead_controller::ruleset::{Action, Direction, RuleKind, Tier};
use bulkhead_controller::selector::Selector;

/// A small deterministic PRNG (xorshift64*), so scenarios are the same on every run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Pod number `i` gets 10.a.b.c, unique up to 2^24 pods.
pub fn pod_ip(i: usize) -> IpAddr {
    let i = i as u32 + 1;
    IpAddr::V4(Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8))
}

pub fn node_name(i: usize) -> String {
    format!("node-{i:04}")
}

pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn pod(
    ns: &str,
    name: &str,
    labels: BTreeMap<String, String>,
    node: String,
    ip: IpAddr,
) -> Pod {
    Pod {
        namespace: ns.to_string(),
        name: name.to_string(),
        labels,
        service_account: "default".into(),
        node_name: Some(node),
        ips: vec![ip],
        synthetic_ips: false,
        ports: Vec::new(),
        workload: None,
        host_network: false,
    }
}

fn in_namespace(ns: &str, pods: Selector) -> PodSelection {
    PodSelection {
        namespaces: NamespaceScope::Named(ns.to_string()),
        pods,
        service_account: None,
    }
}

/// A NetworkPolicy as the API server would hand it over: `podSelector` → ingress from `from`
/// (all ports), or no rules.
pub fn network_policy(
    ns: &str,
    name: &str,
    subject: Selector,
    ingress_from: Option<Selector>,
    egress_isolated: bool,
) -> Policy {
    let rules = ingress_from
        .map(|from| Rule {
            direction: Direction::Ingress,
            index: 0,
            peers: vec![Peer::Pods(in_namespace(ns, from))],
            ports: vec![PortSpec::ANY],
            tier: Tier::Application,
            priority: 0,
            action: Action::Allow,
            audit: false,
        })
        .into_iter()
        .collect();
    Policy {
        key: PolicyKey {
            kind: RuleKind::NetworkPolicy,
            namespace: ns.to_string(),
            name: name.to_string(),
        },
        subject: in_namespace(ns, subject),
        ingress_isolation: Isolation::Enforce,
        egress_isolation: if egress_isolated {
            Isolation::Enforce
        } else {
            Isolation::None
        },
        rules,
        quarantine: None,
    }
}

/// Antrea's `TestInitXLargeScaleWithSmallNamespaces`: `namespaces` namespaces, each with 4 pods
/// (two `app-1=scale-1`, two `app-2=scale-2`) and 3 policies (default-deny-all for Ingress and
/// Egress; `app-1` pods admit ingress from `app-1` pods; the same for `app-2`). Pods are spread
/// uniformly at random over `nodes` nodes.
pub fn small_namespaces(namespaces: usize, nodes: usize, seed: u64) -> Vec<Object> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(namespaces * 8 + nodes);
    for n in 0..nodes {
        out.push(Object::Node(Node {
            name: node_name(n),
            labels: BTreeMap::new(),
            addresses: Vec::new(),
        }));
    }
    let mut ip = 0;
    for i in 0..namespaces {
        let ns = format!("ns-{i:05}");
        out.push(Object::Namespace(Namespace {
            name: ns.clone(),
            labels: labels(&[("app", &ns)]),
        }));
        let app1 = Selector::from_labels([("app-1", "scale-1")]);
        let app2 = Selector::from_labels([("app-2", "scale-2")]);
        out.push(Object::Policy(network_policy(
            &ns,
            "default-deny-all",
            Selector::everything(),
            None,
            true,
        )));
        out.push(Object::Policy(network_policy(
            &ns,
            "np-1",
            app1.clone(),
            Some(app1),
            false,
        )));
        out.push(Object::Policy(network_policy(
            &ns,
            "np-2",
            app2.clone(),
            Some(app2),
            false,
        )));
        for (p, l) in [
            ("pod1", ("app-1", "scale-1")),
            ("pod2", ("app-1", "scale-1")),
            ("pod3", ("app-2", "scale-2")),
            ("pod4", ("app-2", "scale-2")),
        ] {
            out.push(Object::Pod(pod(
                &ns,
                p,
                labels(&[l]),
                node_name(rng.below(nodes)),
                pod_ip(ip),
            )));
            ip += 1;
        }
    }
    out
}

/// Antrea's `TestInitXLargeScaleWithOneNamespace`: one namespace, `pods` pods and `policies`
/// policies, each selecting every pod and admitting ingress from every pod. Pods are spread
/// uniformly at random over `nodes` nodes.
pub fn one_namespace(pods: usize, policies: usize, nodes: usize, seed: u64) -> Vec<Object> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(pods + policies + nodes + 1);
    for n in 0..nodes {
        out.push(Object::Node(Node {
            name: node_name(n),
            labels: BTreeMap::new(),
            addresses: Vec::new(),
        }));
    }
    let ns = "scale";
    out.push(Object::Namespace(Namespace {
        name: ns.into(),
        labels: labels(&[("app", ns)]),
    }));
    for i in 0..policies {
        out.push(Object::Policy(network_policy(
            ns,
            &format!("np-{i:05}"),
            Selector::everything(),
            Some(Selector::everything()),
            false,
        )));
    }
    for i in 0..pods {
        out.push(Object::Pod(pod(
            ns,
            &format!("pod-{i:05}"),
            labels(&[("app", "scale")]),
            node_name(rng.below(nodes)),
            pod_ip(i),
        )));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_have_the_published_sizes() {
        let a = small_namespaces(10, 5, 1);
        let count = |objs: &[Object], f: fn(&Object) -> bool| objs.iter().filter(|o| f(o)).count();
        assert_eq!(count(&a, |o| matches!(o, Object::Pod(_))), 40);
        assert_eq!(count(&a, |o| matches!(o, Object::Policy(_))), 30);
        let b = one_namespace(20, 7, 3, 1);
        assert_eq!(count(&b, |o| matches!(o, Object::Pod(_))), 20);
        assert_eq!(count(&b, |o| matches!(o, Object::Policy(_))), 7);
        assert_ne!(pod_ip(0), pod_ip(256));
    }
}
