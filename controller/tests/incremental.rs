//! Incremental updates must equal a full recompile, and deltas must rebuild the rule sets.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use bulkhead_controller::model::{ContainerPort, Namespace, Node};
use bulkhead_controller::ruleset::{Action, Direction, Protocol, RuleSet, identity};
use bulkhead_controller::{Change, EngineConfig, Object, Pod, PodKey, PolicyEngine, load_str};
use proptest::prelude::*;

/// Policies and their variants (each variant is a full YAML document).
fn policy_pool() -> Vec<Vec<Object>> {
    let docs: Vec<Vec<&str>> = vec![
        vec![
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: x, name: web}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: db}}}], ports: [{port: http}]}]",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: x, name: web}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: a}}}]}]",
        ],
        vec![
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: y, name: deny}\nspec: {podSelector: {}, policyTypes: [Ingress, Egress]}",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: y, name: deny}\nspec:\n  podSelector: {matchExpressions: [{key: tier, operator: Exists}]}\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.1.0/24]}}]}]",
        ],
        vec![
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: x, name: cidr}\nspec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.2/32}}, {ipBlock: {cidr: 10.0.1.0/24, except: [10.0.1.4/30]}}]}]",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: x, name: cidr}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  policyTypes: [Egress]\n  egress: [{ports: [{port: http}]}]",
        ],
        vec![
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: admin}\nspec:\n  tier: Admin\n  priority: 5\n  subject: {namespaces: {matchLabels: {team: a}}}\n  ingress: [{action: Pass, from: [{namespaces: {}}]}, {action: Deny, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}}]}]",
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: admin}\nspec:\n  tier: Baseline\n  priority: 5\n  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}}\n  egress: [{action: Deny, to: [{networks: [10.0.0.0/24]}]}]",
        ],
        vec![
            "apiVersion: bulkhead.dev/v1alpha1\nkind: ServicePolicy\nmetadata: {namespace: y, name: svc}\nspec:\n  subject: {serviceAccount: api}\n  ingress: [{from: [{service: {serviceAccount: api, namespaceSelector: {}}}], ports: [{protocol: TCP, port: 80, endPort: 90}]}]\n  egress: [{action: Deny, to: [{entity: world}]}]",
            "apiVersion: bulkhead.dev/v1alpha1\nkind: ServicePolicy\nmetadata: {namespace: y, name: svc}\nspec:\n  mode: Audit\n  subject: {podSelector: {matchLabels: {app: db}}}\n  ingress: [{from: [{entity: cluster}]}]",
        ],
        // Quarantines: by selector and by name, with pod, namespace and CIDR exceptions (whose
        // peers come and go as pods are created, relabeled, moved and deleted, and namespaces
        // relabeled: their ipcache entries' allow lists follow), an exception admitting every
        // pod (allow list [ANY]), and expiring while the clock ticks (see CLOCK_START).
        vec![
            "apiVersion: bulkhead.dev/v1alpha1\nkind: Quarantine\nmetadata: {namespace: x, name: q}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  reason: scan\n  allow: [{podSelector: {matchLabels: {app: db}}, ports: [{port: 80}]}]",
            "apiVersion: bulkhead.dev/v1alpha1\nkind: Quarantine\nmetadata: {namespace: x, name: q}\nspec:\n  pods: [p0, p1]\n  reason: scan\n  allow: [{ipBlock: {cidr: 10.0.1.0/24}}, {namespaceSelector: {matchLabels: {team: a}}, podSelector: {matchLabels: {app: web}}}]\n  expiresAt: 2100-01-01T00:00:10Z",
            "apiVersion: bulkhead.dev/v1alpha1\nkind: Quarantine\nmetadata: {namespace: x, name: q}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  reason: scan\n  allow: [{namespaceSelector: {}, ports: [{port: 22}]}, {podSelector: {matchExpressions: [{key: tier, operator: Exists}]}}]",
        ],
        vec![
            "apiVersion: bulkhead.dev/v1alpha1\nkind: Quarantine\nmetadata: {namespace: y, name: q2}\nspec:\n  pods: [p1]\n  reason: worm\n  expiresAt: 2100-01-01T00:00:20Z",
            "apiVersion: bulkhead.dev/v1alpha1\nkind: Quarantine\nmetadata: {namespace: y, name: q2}\nspec:\n  podSelector: {matchExpressions: [{key: tier, operator: Exists}]}\n  reason: worm\n  allow: [{namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}]\n  expiresAt: 2100-01-01T00:00:05+00:00",
        ],
        vec![
            "apiVersion: bulkhead.dev/v1alpha1\nkind: Quarantine\nmetadata: {namespace: x, name: q3}\nspec:\n  pods: [p1, p2]\n  reason: second opinion\n  allow: [{podSelector: {matchLabels: {app: db}}, ports: [{port: 80}]}]",
            "apiVersion: bulkhead.dev/v1alpha1\nkind: Quarantine\nmetadata: {namespace: x, name: q3}\nspec:\n  pods: [p2]\n  reason: already over\n  expiresAt: 2000-01-01T00:00:00Z",
            "apiVersion: bulkhead.dev/v1alpha1\nkind: Quarantine\nmetadata: {namespace: x, name: q3}\nspec:\n  pods: [p0, p3]\n  reason: forensics\n  allow: [{namespaceSelector: {matchLabels: {team: b}}, podSelector: {matchExpressions: [{key: tier, operator: Exists}]}}, {ipBlock: {cidr: 10.0.0.0/30, except: [10.0.0.2/32]}, ports: [{port: 443}]}]",
        ],
        // Egress by DNS name: the node's name patterns follow the pods the policies select.
        vec![
            "apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\nmetadata: {name: names}\nspec:\n  tier: Admin\n  priority: 3\n  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}}\n  egress: [{action: Accept, to: [{domainNames: [api.example.com, '*.example.org']}]}]",
            "apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\nmetadata: {name: names}\nspec:\n  tier: Admin\n  priority: 3\n  subject: {namespaces: {matchLabels: {team: a}}}\n  egress: [{action: Accept, to: [{domainNames: [api.example.com]}], protocols: [{tcp: {destinationPort: {number: 443}}}]}]",
        ],
        vec![
            "apiVersion: bulkhead.dev/v1alpha1\nkind: ServicePolicy\nmetadata: {namespace: x, name: fqdn}\nspec:\n  subject: {podSelector: {matchLabels: {app: db}}}\n  egress: [{to: [{fqdn: {matchPattern: '*.example.org'}}, {fqdn: {matchName: db.example.net}}]}]",
            "apiVersion: bulkhead.dev/v1alpha1\nkind: ServicePolicy\nmetadata: {namespace: x, name: fqdn}\nspec:\n  mode: Audit\n  egress: [{to: [{fqdn: {matchName: api.example.com}}]}]",
        ],
        // Node peers: node identities come into use and go with these, and follow the nodes'
        // labels and addresses (some of which are pod addresses or inside policy CIDRs).
        vec![
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: nodes}\nspec:\n  tier: Admin\n  priority: 4\n  subject: {namespaces: {}}\n  egress: [{action: Accept, to: [{nodes: {matchLabels: {role: a}}}], protocols: [{tcp: {destinationPort: {number: 10250}}}]}, {action: Deny, to: [{nodes: {}}, {networks: [10.0.0.0/24]}]}]",
            "apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\nmetadata: {name: nodes}\nspec:\n  tier: Baseline\n  priority: 4\n  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}}\n  egress: [{action: Deny, to: [{nodes: {matchExpressions: [{key: role, operator: NotIn, values: [a]}]}}]}]",
        ],
        // Peer-cluster peers: only selectors naming the cluster label reach `west/x`'s pods
        // (remote pods come and go, relabel and collide with local addresses like local ones).
        vec![
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: x, name: remote}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress, Egress]\n  ingress: [{from: [{namespaceSelector: {matchLabels: {bulkhead.dev/cluster: west}}, podSelector: {matchLabels: {app: db}}}]}]\n  egress: [{to: [{podSelector: {matchExpressions: [{key: bulkhead.dev/cluster, operator: Exists}]}}]}]",
            "apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\nmetadata: {name: remote}\nspec:\n  tier: Admin\n  priority: 6\n  subject: {namespaces: {}}\n  ingress: [{action: Deny, from: [{pods: {namespaceSelector: {matchLabels: {bulkhead.dev/cluster: west, team: a}}, podSelector: {}}}]}, {action: Accept, from: [{namespaces: {}}]}]",
        ],
    ];
    docs.into_iter()
        .map(|variants| {
            variants
                .into_iter()
                .map(|d| {
                    let mut l = load_str(Path::new("pool.yaml"), d);
                    assert!(l.errors.is_empty(), "{:?}", l.errors);
                    l.objects.remove(0)
                })
                .collect()
        })
        .collect()
}

#[derive(Debug, Clone)]
enum Step {
    Pod {
        ns: usize,
        name: usize,
        app: usize,
        tier: bool,
        hash: u8,
        sa: usize,
        node: usize,
        ip: Option<u8>,
        port: Option<u16>,
    },
    DeletePod {
        ns: usize,
        name: usize,
    },
    Namespace {
        ns: usize,
        team: Option<usize>,
    },
    DeleteNamespace {
        ns: usize,
    },
    Policy {
        index: usize,
        variant: usize,
    },
    DeletePolicy {
        index: usize,
    },
    Node {
        node: usize,
        declared: bool,
        role: Option<usize>,
        address: Option<u8>,
    },
    /// The clock moves to CLOCK_START + seconds (never back: the engine keeps the later time).
    Tick {
        seconds: u64,
    },
}

/// The engine's clock starts here; the pool's quarantines expire 5, 10 and 20 s later.
fn clock_start() -> SystemTime {
    bulkhead_controller::load::parse_rfc3339("2100-01-01T00:00:00Z").expect("valid time")
}

/// `west/x` is a peer cluster's namespace `x` (imported by peering).
const NS: [&str; 3] = ["x", "y", "west/x"];
const NODES: [Option<&str>; 4] = [None, Some("n1"), Some("n2"), Some("n3")];

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..3usize, 0..4usize, 0..2usize, any::<bool>(), 0..3u8, 0..2usize, 0..3usize,
              proptest::option::weighted(0.85, 0..8u8), proptest::option::of(prop_oneof![Just(80u16), Just(8080u16)]))
            .prop_map(|(ns, name, app, tier, hash, sa, node, ip, port)| Step::Pod { ns, name, app, tier, hash, sa, node, ip, port }),
        1 => (0..3usize, 0..4usize).prop_map(|(ns, name)| Step::DeletePod { ns, name }),
        1 => (0..3usize, proptest::option::of(0..2usize)).prop_map(|(ns, team)| Step::Namespace { ns, team }),
        1 => (0..3usize).prop_map(|ns| Step::DeleteNamespace { ns }),
        4 => (0..12usize, 0..3usize).prop_map(|(index, variant)| Step::Policy { index, variant }),
        2 => (0..12usize).prop_map(|index| Step::DeletePolicy { index }),
        2 => (1..4usize, any::<bool>(), proptest::option::of(0..2usize), proptest::option::weighted(0.8, 0..6u8))
            .prop_map(|(node, declared, role, address)| Step::Node { node, declared, role, address }),
        1 => (0..25u64).prop_map(|seconds| Step::Tick { seconds }),
    ]
}

fn to_change(step: &Step, pool: &[Vec<Object>]) -> Change {
    match step {
        Step::Tick { .. } => unreachable!("ticks are not changes"),
        Step::Pod {
            ns,
            name,
            app,
            tier,
            hash,
            sa,
            node,
            ip,
            port,
        } => {
            let mut labels = BTreeMap::new();
            labels.insert("app".to_string(), ["web", "db"][*app].to_string());
            if *tier {
                labels.insert("tier".into(), "front".into());
            }
            // Without the filtered label, the engine keeps the pod's labels only in its identity.
            if *hash < 2 {
                labels.insert("pod-template-hash".into(), format!("h{hash}"));
            }
            // A local pod claiming to be a peer cluster's must not pass for one.
            if *name == 3 {
                labels.insert("bulkhead.dev/cluster".into(), "west".into());
            }
            Change::UpsertPod(Pod {
                namespace: NS[*ns].into(),
                name: format!("p{name}"),
                labels,
                service_account: ["default", "api"][*sa].into(),
                node_name: NODES[*node].map(str::to_string),
                // Addresses collide across pods on purpose (stale pod data happens).
                ips: ip
                    .map(|i| format!("10.0.{}.{}", i / 4, i % 4 + 1).parse().expect("ip"))
                    .into_iter()
                    .collect(),
                synthetic_ips: false,
                ports: port
                    .map(|p| ContainerPort {
                        name: Some("http".into()),
                        port: p,
                        protocol: Protocol::Tcp,
                    })
                    .into_iter()
                    .collect(),
                workload: None,
                host_network: false,
            })
        }
        Step::DeletePod { ns, name } => Change::DeletePod(PodKey {
            namespace: NS[*ns].into(),
            name: format!("p{name}"),
        }),
        Step::Namespace { ns, team } => Change::UpsertNamespace(Namespace {
            name: NS[*ns].into(),
            labels: team
                .map(|t| ("team".to_string(), ["a", "b"][t].to_string()))
                .into_iter()
                .collect(),
        }),
        Step::DeleteNamespace { ns } => Change::DeleteNamespace(NS[*ns].into()),
        Step::Policy { index, variant } => match &pool[*index][*variant % pool[*index].len()] {
            Object::Policy(p) => Change::UpsertPolicy(p.clone()),
            _ => unreachable!("the pool holds policies"),
        },
        Step::DeletePolicy { index } => match &pool[*index][0] {
            Object::Policy(p) => Change::DeletePolicy(p.key.clone()),
            _ => unreachable!("the pool holds policies"),
        },
        Step::Node {
            node,
            declared: true,
            role,
            address,
        } => Change::UpsertNode(Node {
            name: NODES[*node].unwrap_or("n1").into(),
            labels: role
                .map(|r| ("role".to_string(), ["a", "b"][r].to_string()))
                .into_iter()
                .collect(),
            // Shared between nodes, equal to pod addresses (10.0.0.1-4), inside the pool's
            // CIDRs, or outside them; some with an IPv6 address too.
            addresses: address
                .map(|a| {
                    let v4: IpAddr = match a {
                        0..=1 => format!("10.0.0.{}", a + 1),
                        2..=3 => format!("10.0.1.{}", a + 10),
                        _ => format!("192.168.0.{a}"),
                    }
                    .parse()
                    .expect("ip");
                    let mut v = vec![v4];
                    if a % 2 == 0 {
                        v.push(format!("fd00::{a}").parse().expect("ip"));
                    }
                    v
                })
                .unwrap_or_default(),
        }),
        Step::Node {
            node,
            declared: false,
            ..
        } => Change::DeleteNode(NODES[*node].unwrap_or("n1").into()),
    }
}

/// The inputs as a full compile would see them.
#[derive(Default)]
struct Inputs {
    objects: BTreeMap<(u8, String, String), Object>,
}

impl Inputs {
    fn apply(&mut self, c: &Change) {
        match c {
            Change::UpsertNamespace(n) => {
                self.objects.insert(
                    (0, n.name.clone(), String::new()),
                    Object::Namespace(n.clone()),
                );
            }
            Change::DeleteNamespace(n) => {
                self.objects.remove(&(0, n.clone(), String::new()));
            }
            Change::UpsertPod(p) => {
                self.objects.insert(
                    (1, p.namespace.clone(), p.name.clone()),
                    Object::Pod(p.clone()),
                );
            }
            Change::DeletePod(k) => {
                self.objects
                    .remove(&(1, k.namespace.clone(), k.name.clone()));
            }
            Change::UpsertNode(n) => {
                self.objects
                    .insert((2, n.name.clone(), String::new()), Object::Node(n.clone()));
            }
            Change::DeleteNode(n) => {
                self.objects.remove(&(2, n.clone(), String::new()));
            }
            Change::UpsertPolicy(p) => {
                self.objects.insert(
                    (
                        3,
                        format!("{:?}/{}", p.key.kind, p.key.namespace),
                        p.key.name.clone(),
                    ),
                    Object::Policy(p.clone()),
                );
            }
            Change::DeletePolicy(k) => {
                self.objects
                    .remove(&(3, format!("{:?}/{}", k.kind, k.namespace), k.name.clone()));
            }
        }
    }
}

/// Endpoint ids depend on arrival order and versions on history: compare without them.
fn normalized(mut rs: RuleSet) -> RuleSet {
    rs.version = 0;
    for e in &mut rs.endpoints {
        e.id = 0;
    }
    rs.endpoints
        .sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)));
    rs
}

/// Every quarantined ipcache entry's allow list is sorted, and either `[ANY]` or exactly the
/// peers of the exceptions (allow entries) in the policy group of a quarantined endpoint with
/// that address and identity; unquarantined entries have none.
fn check_quarantine_allow(rulesets: &BTreeMap<String, RuleSet>) -> Result<(), String> {
    let mut candidates: BTreeMap<(IpAddr, u32), Vec<Vec<u32>>> = BTreeMap::new();
    for rs in rulesets.values() {
        for ep in rs.endpoints.iter().filter(|e| e.quarantined) {
            let policy = rs.policy_of(ep);
            let mut peers: Vec<u32> = Direction::ALL
                .into_iter()
                .flat_map(|d| policy.direction(d).entries.iter())
                .filter(|e| e.action == Action::Allow)
                .map(|e| e.peer)
                .collect();
            peers.sort_unstable();
            peers.dedup();
            for ip in &ep.ips {
                candidates
                    .entry((*ip, ep.identity))
                    .or_default()
                    .push(peers.clone());
            }
        }
    }
    for (node, rs) in rulesets {
        for e in &rs.ipcache {
            let list = &e.quarantine_allow;
            if !e.quarantined {
                if !list.is_empty() {
                    return Err(format!("{node}: unquarantined {e:?} has an allow list"));
                }
                continue;
            }
            if !list.windows(2).all(|w| w[0] < w[1]) {
                return Err(format!("{node}: {e:?}: allow list not sorted and unique"));
            }
            if *list == [identity::ANY] {
                continue;
            }
            let Some(c) = candidates.get(&(e.cidr.ip(), e.identity)) else {
                // The pod has no endpoint anywhere (every node full): nothing to compare with.
                continue;
            };
            if !c.contains(list) {
                return Err(format!(
                    "{node}: {e:?}: allow list is none of the exception peers {c:?}"
                ));
            }
        }
    }
    Ok(())
}

fn check_sequence(steps: &[Step]) -> Result<(), TestCaseError> {
    let pool = policy_pool();
    let config = EngineConfig {
        cluster_name: Some("east".parse().expect("a cluster name")),
        ..EngineConfig::default()
    };
    let mut engine = PolicyEngine::empty(config.clone());
    let mut inputs = Inputs::default();
    let mut before: BTreeMap<String, RuleSet> = BTreeMap::new();
    engine
        .expire(clock_start())
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    for (i, s) in steps.iter().enumerate() {
        let deltas = match s {
            Step::Tick { seconds } => engine.expire(clock_start() + Duration::from_secs(*seconds)),
            _ => {
                let change = to_change(s, &pool);
                inputs.apply(&change);
                engine.apply(change.clone())
            }
        }
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let after = engine.rulesets();
        // Deltas rebuild exactly the new rule sets; untouched nodes keep their version.
        let mut rebuilt = before.clone();
        for d in &deltas {
            let rs = rebuilt.entry(d.node.clone()).or_default();
            if d.from_version == 0 {
                *rs = RuleSet::default();
            }
            rs.apply_delta(d)
                .map_err(|e| TestCaseError::fail(format!("step {i}: {e}")))?;
            if d.node_removed {
                rebuilt.remove(&d.node);
            }
        }
        prop_assert_eq!(&rebuilt, &after, "step {}: {:?} deltas {:#?}", i, s, deltas);
        check_quarantine_allow(&after)
            .map_err(|e| TestCaseError::fail(format!("step {i}: {e}")))?;
        for d in &deltas {
            if let Some(old) = before.get(&d.node) {
                prop_assert!(d.version > old.version, "version must grow");
            }
        }
        // Incremental state equals a full recompile.
        let full = PolicyEngine::new_at(
            config.clone(),
            inputs.objects.values().cloned(),
            engine.now(),
        )
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let a: BTreeMap<String, RuleSet> = after
            .iter()
            .map(|(k, v)| (k.clone(), normalized(v.clone())))
            .collect();
        let b: BTreeMap<String, RuleSet> = full
            .rulesets()
            .into_iter()
            .map(|(k, v)| (k, normalized(v)))
            .collect();
        prop_assert_eq!(a, b, "step {}: {:?}", i, s);
        before = after;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, max_shrink_iters: 2000, ..ProptestConfig::default() })]
    #[test]
    fn incremental_equals_full_recompile(steps in proptest::collection::vec(step(), 1..30)) {
        check_sequence(&steps)?;
    }
}

fn fixture_objects() -> Vec<Object> {
    let yaml = "
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: a}}
---
apiVersion: v1
kind: Pod
metadata: {namespace: x, name: a, labels: {app: web, pod-template-hash: abc}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {namespace: x, name: b, labels: {app: web, pod-template-hash: def}}
spec: {nodeName: n2}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {namespace: x, name: c, labels: {app: db}}
spec: {nodeName: n2}
status: {podIP: 10.0.0.3}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: x, name: web}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: db}}}]}]
";
    let l = load_str(Path::new("f.yaml"), yaml);
    assert!(l.errors.is_empty());
    l.objects
}

#[test]
fn identities_are_stable_across_restarts_and_input_order() {
    let objects = fixture_objects();
    let a = PolicyEngine::new(EngineConfig::default(), objects.clone()).expect("compiles");
    let mut reversed = objects;
    reversed.reverse();
    let b = PolicyEngine::new(EngineConfig::default(), reversed).expect("compiles");
    assert_eq!(a.rulesets(), b.rulesets());
    // And an engine that received the same objects one by one agrees on every number.
    let mut c = PolicyEngine::empty(EngineConfig::default());
    for o in fixture_objects().into_iter().rev() {
        c.apply(Change::from(o)).expect("applies");
    }
    let norm = |e: &PolicyEngine| -> BTreeMap<String, RuleSet> {
        e.rulesets()
            .into_iter()
            .map(|(k, v)| (k, normalized(v)))
            .collect()
    };
    assert_eq!(norm(&a), norm(&c));
}

#[test]
fn churning_labels_do_not_split_identities_and_unused_identities_are_released() {
    let mut e = PolicyEngine::new(EngineConfig::default(), fixture_objects()).expect("compiles");
    let key = |n: &str| PodKey {
        namespace: "x".into(),
        name: n.into(),
    };
    assert_eq!(e.identity_of_pod(&key("a")), e.identity_of_pod(&key("b")));
    assert_ne!(e.identity_of_pod(&key("a")), e.identity_of_pod(&key("c")));
    assert_eq!(e.identity_count(), 2);
    let db = e.identity_of_pod(&key("c")).expect("identity");
    e.apply(Change::DeletePod(key("c"))).expect("applies");
    assert_eq!(e.identity_count(), 1);
    assert!(
        e.identity_policy(db, bulkhead_controller::ruleset::Direction::Ingress)
            .is_none()
    );
    // Without the filter, the template hash splits the identity.
    let no_filter = EngineConfig {
        label_filter: bulkhead_controller::LabelFilter::none(),
        ..EngineConfig::default()
    };
    let e = PolicyEngine::new(no_filter, fixture_objects()).expect("compiles");
    assert_ne!(e.identity_of_pod(&key("a")), e.identity_of_pod(&key("b")));
}

#[test]
fn unchanged_nodes_keep_their_version_and_deltas_are_small() {
    let mut e = PolicyEngine::new(EngineConfig::default(), fixture_objects()).expect("compiles");
    assert_eq!(e.version("n1"), Some(1));
    let mut pod = match fixture_objects()
        .into_iter()
        .find(|o| matches!(o, Object::Pod(p) if p.name == "c"))
    {
        Some(Object::Pod(p)) => p,
        _ => unreachable!("fixture has x/c"),
    };
    // Re-applying the same pod changes nothing.
    assert!(
        e.apply(Change::UpsertPod(pod.clone()))
            .expect("applies")
            .is_empty()
    );
    // Relabeling x/c (on n2) away from app=db removes the entry for it from the web pods on n1, n2.
    pod.labels.insert("app".into(), "cache".into());
    let key = |n: &str| PodKey {
        namespace: "x".into(),
        name: n.into(),
    };
    let db = e.identity_of_pod(&key("c")).expect("identity");
    let deltas = e.apply(Change::UpsertPod(pod)).expect("applies");
    let nodes: Vec<&str> = deltas.iter().map(|d| d.node.as_str()).collect();
    assert_eq!(nodes, vec!["n1", "n2"]);
    assert_eq!(e.version("n1"), Some(2));
    let n1 = &deltas[0];
    // x/a's endpoint itself is untouched: only the web group it shares loses an entry.
    assert!(n1.endpoints_changed.is_empty(), "{n1:?}");
    let web = e.identity_of_pod(&key("a")).expect("identity");
    assert_eq!(n1.policies_changed.len(), 1, "{n1:?}");
    let change = &n1.policies_changed[&web];
    assert_eq!(change.ingress.removed.len(), 1);
    assert!(change.ingress.added.is_empty());
    assert!(
        n1.ipcache_removed.len() == 1,
        "x/c's address is no longer needed on n1: {n1:?}"
    );
    // On n2, x/c moves to a group of its own identity; its old group goes.
    let n2 = &deltas[1];
    let c = e.identity_of_pod(&key("c")).expect("identity");
    assert_eq!(n2.endpoints_changed.len(), 1, "{n2:?}");
    assert_eq!(n2.endpoints_changed[0].policy, c);
    assert!(n2.policies_added.contains_key(&c), "{n2:?}");
    assert_eq!(n2.policies_removed, vec![db]);
}

#[test]
fn endpoints_of_an_identity_share_one_policy_group() {
    let mut yaml = String::new();
    for i in 0..5 {
        yaml.push_str(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{namespace: x, name: w{i}, labels: {{app: web}}}}\nspec: {{nodeName: n1}}\nstatus: {{podIP: 10.0.0.{}}}\n---\n",
            i + 1
        ));
    }
    yaml.push_str("apiVersion: v1\nkind: Pod\nmetadata: {namespace: x, name: db, labels: {app: db}}\nspec: {nodeName: n1}\nstatus: {podIP: 10.0.0.9}\n---\n");
    let policy = |port: u16| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{namespace: x, name: web}}\nspec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: db}}}}}}], ports: [{{port: {port}}}]}}]\n"
        )
    };
    let l = load_str(Path::new("f.yaml"), &format!("{yaml}{}", policy(80)));
    assert!(l.errors.is_empty(), "{:?}", l.errors);
    let mut e = PolicyEngine::new(EngineConfig::default(), l.objects).expect("compiles");
    let rs = e.ruleset("n1").expect("n1");
    assert_eq!(rs.endpoints.len(), 6);
    assert_eq!(rs.policies.len(), 2, "one group per identity");
    assert!(rs.dangling_policies().is_empty());
    let web = rs.endpoint_by_name("x", "w0").expect("w0").policy;
    assert!(
        rs.endpoints
            .iter()
            .filter(|ep| ep.pod.starts_with('w'))
            .all(|ep| ep.policy == web)
    );
    assert_eq!(rs.policies[&web].ingress.entries.len(), 1);

    // Editing the policy changes the shared group once, and no endpoint.
    let l = load_str(Path::new("p.yaml"), &policy(8080));
    let change = match l.objects.into_iter().next() {
        Some(Object::Policy(p)) => Change::UpsertPolicy(p),
        other => panic!("expected a policy, got {other:?}"),
    };
    let deltas = e.apply(change).expect("applies");
    assert_eq!(deltas.len(), 1);
    let d = &deltas[0];
    assert!(
        d.endpoints_changed.is_empty() && d.endpoints_added.is_empty(),
        "{d:?}"
    );
    assert_eq!(
        d.policies_changed.keys().copied().collect::<Vec<_>>(),
        vec![web]
    );
    assert_eq!(d.size(), 3, "the group, one entry out, one in: {d:?}");
    let mut rebuilt = rs.clone();
    rebuilt.apply_delta(d).expect("applies");
    assert_eq!(rebuilt, e.ruleset("n1").expect("n1"));
}

#[test]
fn deltas_that_would_leave_an_endpoint_without_its_group_are_refused() {
    let e = PolicyEngine::new(EngineConfig::default(), fixture_objects()).expect("compiles");
    let rs = e.ruleset("n2").expect("n2");
    let group = rs.endpoints[0].policy;
    let mut bad = bulkhead_controller::ruleset::NodeDelta {
        node: "n2".into(),
        from_version: rs.version,
        version: rs.version + 1,
        policies_removed: vec![group],
        ..Default::default()
    };
    let mut target = rs.clone();
    assert!(matches!(
        target.apply_delta(&bad),
        Err(bulkhead_controller::ruleset::DeltaError::DanglingPolicyGroup { .. })
    ));
    assert_eq!(target, rs, "a refused delta changes nothing");
    bad.policies_removed.clear();
    bad.policies_changed.insert(7, Default::default());
    assert_eq!(
        target.apply_delta(&bad),
        Err(bulkhead_controller::ruleset::DeltaError::UnknownPolicyGroup(7))
    );
}
