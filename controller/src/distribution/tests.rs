//! Property: after any sequence of changes, every agent's realized rule set equals the
//! controller's — through the real gRPC service on a loopback socket, with agents that drop
//! their stream and reconnect at random.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use proptest::prelude::*;
use tokio::task::JoinHandle;

use bulkhead_proto::follower::{Follower, run_session};

use super::{DistributionService, FlowStore, Hub};
use crate::{Change, EngineConfig, PolicyEngine, load_str, ruleset::RuleSet};

const NODES: [&str; 3] = ["n1", "n2", "n3"];

fn objects(yaml: &str) -> Vec<Change> {
    let loaded = load_str(std::path::Path::new("test.yaml"), yaml);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    loaded.objects.into_iter().map(Change::from).collect()
}

fn pod_yaml(i: usize, app: &str, node: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: ns{ns}, labels: {{app: {app}}}}}\nspec: {{nodeName: {node}, containers: [{{name: c, image: x, ports: [{{name: web, containerPort: 80}}]}}]}}\nstatus: {{podIP: 10.9.{ns}.{i}}}\n",
        ns = i % 2
    )
}

fn policy_yaml(n: usize, app: &str, from: &str, port: u16) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: pol{n}, namespace: ns{ns}}}\nspec:\n  podSelector: {{matchLabels: {{app: {app}}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: {from}}}}}}}]\n    ports: [{{port: {port}}}]\n",
        ns = n % 2
    )
}

#[derive(Debug, Clone)]
enum Op {
    Pod {
        i: usize,
        app: usize,
        node: usize,
    },
    DeletePod(usize),
    Policy {
        n: usize,
        app: usize,
        from: usize,
        port: u16,
    },
    DeletePolicy(usize),
    /// An agent drops its stream and reconnects.
    Reconnect(usize),
}

const APPS: [&str; 3] = ["web", "api", "db"];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..8usize, 0..3usize, 0..3usize).prop_map(|(i, app, node)| Op::Pod { i, app, node }),
        (0..8usize).prop_map(Op::DeletePod),
        (
            0..4usize,
            0..3usize,
            0..3usize,
            prop_oneof![Just(80u16), Just(443u16)]
        )
            .prop_map(|(n, app, from, port)| Op::Policy { n, app, from, port }),
        (0..4usize).prop_map(Op::DeletePolicy),
        (0..3usize).prop_map(Op::Reconnect),
    ]
}

fn change(op: &Op) -> Option<Vec<Change>> {
    Some(match op {
        Op::Pod { i, app, node } => objects(&pod_yaml(*i, APPS[*app], NODES[*node])),
        Op::DeletePod(i) => vec![Change::DeletePod(crate::PodKey {
            namespace: format!("ns{}", i % 2),
            name: format!("p{i}"),
        })],
        Op::Policy { n, app, from, port } => {
            objects(&policy_yaml(*n, APPS[*app], APPS[*from], *port))
        }
        Op::DeletePolicy(n) => vec![Change::DeletePolicy(crate::PolicyKey {
            kind: crate::ruleset::RuleKind::NetworkPolicy,
            namespace: format!("ns{}", n % 2),
            name: format!("pol{n}"),
        })],
        Op::Reconnect(_) => return None,
    })
}

type Realized = Arc<Mutex<BTreeMap<String, RuleSet>>>;

fn spawn_agent(
    node: &'static str,
    addr: std::net::SocketAddr,
    realized: Realized,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut follower = Follower::new(node);
        loop {
            let channel = match tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .expect("endpoint")
                .connect()
                .await
            {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let r = realized.clone();
            let _ = run_session(
                channel,
                &mut follower,
                |rs| {
                    let r = r.clone();
                    async move {
                        r.lock()
                            .expect("lock")
                            .insert(node.to_string(), Arc::unwrap_or_clone(rs));
                        Ok(Default::default())
                    }
                },
                || {},
            )
            .await;
        }
    })
}

async fn converged(hub: &Hub, realized: &Realized) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..200 {
        let mut ok = true;
        for node in NODES {
            let want = hub.ruleset(node).unwrap_or_default();
            let got = realized
                .lock()
                .expect("lock")
                .get(node)
                .cloned()
                .unwrap_or_default();
            if want != got {
                ok = false;
                last = format!(
                    "{node}: controller v{} agent v{}",
                    want.version, got.version
                );
            }
        }
        if ok {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(last)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
    #[test]
    fn agents_realize_exactly_the_controllers_rule_sets(ops in prop::collection::vec(op(), 1..25)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let result: Result<(), String> = rt.block_on(async move {
            let mut engine = PolicyEngine::empty(EngineConfig::default());
            let mut seed = String::new();
            for i in 0..4 {
                seed += &pod_yaml(i, APPS[i % 3], NODES[i % 3]);
            }
            engine.apply_batch(objects(&seed)).map_err(|e| e.to_string())?;
            let hub = Arc::new(Hub::new(engine));
            let service = DistributionService::new(hub.clone(), Arc::new(Mutex::new(FlowStore::new(16))));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
            let addr = listener.local_addr().map_err(|e| e.to_string())?;
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service.into_server())
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            let realized: Realized = Arc::default();
            let mut agents: Vec<JoinHandle<()>> =
                NODES.iter().map(|n| spawn_agent(n, addr, realized.clone())).collect();
            converged(&hub, &realized).await.map_err(|e| format!("initial: {e}"))?;
            for (step, op) in ops.iter().enumerate() {
                match change(op) {
                    Some(changes) => {
                        hub.apply(changes, false).map_err(|e| e.to_string())?;
                    }
                    None => {
                        let Op::Reconnect(i) = op else { unreachable!() };
                        agents[*i].abort();
                        agents[*i] = spawn_agent(NODES[*i], addr, realized.clone());
                    }
                }
                if step % 3 == 2 {
                    converged(&hub, &realized).await.map_err(|e| format!("after {op:?}: {e}"))?;
                }
            }
            converged(&hub, &realized).await.map_err(|e| format!("final: {e}"))?;
            // And the controller's incrementally maintained view equals the engine's own.
            for node in NODES {
                let state = hub.ruleset(node).unwrap_or_default();
                match hub.engine_ruleset(node) {
                    Ok(engine_view) if engine_view != state => {
                        return Err(format!("{node}: hub and engine disagree"));
                    }
                    Ok(_) => {}
                    // A node the engine no longer knows has nothing to enforce.
                    Err(_) if state.endpoints.is_empty() => {}
                    Err(e) => return Err(format!("{node}: {e}, but the hub still has endpoints")),
                }
            }
            for a in agents {
                a.abort();
            }
            Ok(())
        });
        prop_assert!(result.is_ok(), "{:?}", result);
    }
}

/// A subscriber that stops reading is cut loose once its queue is full (its queue closes after
/// what it holds), and nobody else waits for it.
#[test]
fn a_stalled_subscriber_is_cut_loose_not_waited_for() {
    let mut engine = PolicyEngine::empty(EngineConfig::default());
    engine
        .apply_batch(objects(&pod_yaml(0, "web", "n1")))
        .expect("seed");
    let hub = Hub::new(engine);
    let mut stalled = hub.subscribe("n1").expect("subscribe");
    let mut live = hub.subscribe("n1").expect("subscribe");
    let mut live_seen = 0;
    for k in 0..(super::hub::SUBSCRIBER_QUEUE + 10) {
        let app = APPS[(k + 1) % 2];
        hub.apply(objects(&pod_yaml(0, app, "n1")), false)
            .expect("apply");
        while let Ok(u) = live.updates.try_recv() {
            live_seen += 1;
            assert!(u.version > u.from);
        }
    }
    assert_eq!(
        live_seen,
        super::hub::SUBSCRIBER_QUEUE + 10,
        "the live subscriber got every delta"
    );
    let mut drained = 0;
    while stalled.updates.try_recv().is_ok() {
        drained += 1;
    }
    assert_eq!(drained, super::hub::SUBSCRIBER_QUEUE);
    assert!(
        matches!(
            stalled.updates.try_recv(),
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected)
        ),
        "the stalled queue is closed, so its stream resynchronises"
    );
    assert!(
        hub.counters
            .resyncs
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

/// The hub keeps no rule sets of its own: what it serves (snapshots, node and policy status,
/// the endpoints the flow directory reads, a node's rules) is the engine's current view,
/// and stays so as changes come in.
#[test]
fn the_hub_serves_the_engines_rule_sets_and_their_versions() {
    let mut engine = PolicyEngine::empty(EngineConfig::default());
    let mut seed = String::new();
    for i in 0..6 {
        seed += &pod_yaml(i, APPS[i % 3], NODES[i % 3]);
    }
    seed += &policy_yaml(0, "web", "api", 80);
    engine.apply_batch(objects(&seed)).expect("seed");
    let hub = Hub::new(engine);
    let check = |hub: &Hub| {
        let states = hub.node_states();
        assert_eq!(
            states.iter().map(|s| s.node.as_str()).collect::<Vec<_>>(),
            NODES
        );
        let mut all_endpoints = Vec::new();
        for s in &states {
            let rs = hub.engine_ruleset(&s.node).expect("engine view");
            assert_eq!(hub.ruleset(&s.node).as_ref(), Some(&rs));
            assert_eq!(s.version, rs.version, "{}", s.node);
            assert_eq!(s.endpoints as usize, rs.endpoints.len(), "{}", s.node);
            assert_eq!(hub.node_endpoints(&s.node).as_ref(), Some(&rs.endpoints));
            let (version, rules) = hub.node_rules(&s.node).expect("rules");
            assert_eq!(version, rs.version);
            assert_eq!(rules, rs.rules.values().cloned().collect::<Vec<_>>());
            let sub = hub.subscribe(&s.node).expect("subscribe");
            assert_eq!(sub.snapshot, rs);
            hub.unsubscribe(&s.node, sub.id);
            all_endpoints.extend(rs.endpoints);
        }
        assert_eq!(hub.endpoints(), Some(all_endpoints));
    };
    check(&hub);
    assert!(
        hub.policy_status()
            .iter()
            .any(|p| p.name == "pol0" && p.nodes >= 1),
        "{:?}",
        hub.policy_status()
    );
    let generation = hub.generation();
    hub.apply(objects(&pod_yaml(0, "api", "n2")), false)
        .expect("move a pod");
    hub.apply(objects(&policy_yaml(1, "db", "web", 443)), false)
        .expect("a policy");
    assert_ne!(hub.generation(), generation);
    check(&hub);
}

/// A node whose last pod goes away has no rule set in the engine any more: the hub serves an
/// empty one at the node's last version, and when the node comes back (the engine starts it
/// again from version 0) its followers start over from a snapshot rather than take a delta
/// that does not follow what they have.
#[test]
fn a_node_that_vanishes_and_comes_back_resynchronises_its_followers() {
    let mut engine = PolicyEngine::empty(EngineConfig::default());
    engine
        .apply_batch(objects(
            &(pod_yaml(0, "web", "n1") + &pod_yaml(1, "web", "n2")),
        ))
        .expect("seed");
    let hub = Hub::new(engine);
    let mut follower = hub.subscribe("n2").expect("subscribe");
    let p1 = crate::PodKey {
        namespace: "ns1".to_string(),
        name: "p1".to_string(),
    };
    hub.apply(vec![Change::DeletePod(p1)], false)
        .expect("delete");
    let last = follower.updates.try_recv().expect("the delta emptying n2");
    let gone = hub.ruleset("n2").expect("the hub still knows n2");
    assert!(gone.endpoints.is_empty() && gone.policies.is_empty());
    assert_eq!(gone.version, last.version);
    assert!(hub.engine_ruleset("n2").is_err(), "the engine has no n2");
    hub.apply(objects(&pod_yaml(1, "web", "n2")), false)
        .expect("back");
    assert!(
        matches!(
            follower.updates.try_recv(),
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected)
        ),
        "the follower resynchronises"
    );
    let again = hub.subscribe("n2").expect("subscribe again");
    assert_eq!(Some(again.snapshot.clone()), hub.engine_ruleset("n2").ok());
    assert_eq!(
        hub.node_states()
            .iter()
            .find(|s| s.node == "n2")
            .map(|s| s.version),
        Some(again.snapshot.version)
    );
}
