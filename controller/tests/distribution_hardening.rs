//! Issue 21, findings 1, 2, 3 and 6, over real gRPC sockets with real clients: what a node's
//! credentials (or a broken agent) can do to the controller through the `Distribution` service.
//!
//! - flow reports cannot grow the controller's memory without bound (garbage is refused, rule
//!   labels are capped);
//! - acks count only for versions the stream was sent;
//! - a rule set larger than gRPC's default 4 MiB message limit arrives (in parts) and is realized;
//! - streams of agents that went away stop at once, and unknown node names are refused.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bulkhead_controller::{
    Change, EngineConfig, Object, PolicyEngine,
    distribution::{DistributionService, FlowStore, Hub},
    flows::{FlowPipeline, ServiceGraph},
    load_str,
    model::{
        Isolation, Namespace, NamespaceScope, Node, Peer, Pod, PodSelection, Policy, PolicyKey,
        PortSpec, Rule,
    },
    ruleset::{Action, Direction, FlowEntry, RuleKind, RuleSet, Tier},
    selector::Selector,
};
use bulkhead_proto::follower::{Follower, run_session};
use bulkhead_proto::parts;
use bulkhead_proto::prost::Message as _;
use bulkhead_proto::v1::{
    self as pb, AgentMessage, ControllerMessage, agent_message, controller_message,
    distribution_client::DistributionClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const PODS: &str = "
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, image: x}]}
status: {podIP: 10.9.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: data, labels: {app: db}}
spec: {nodeName: n2, containers: [{name: c, image: x}]}
status: {podIP: 10.9.0.2}
";

fn changes(yaml: &str) -> Vec<Change> {
    let loaded = load_str(std::path::Path::new("test.yaml"), yaml);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    loaded.objects.into_iter().map(Change::from).collect()
}

fn small_hub() -> Arc<Hub> {
    let mut engine = PolicyEngine::empty(EngineConfig::default());
    engine.apply_batch(changes(PODS)).expect("pods");
    Arc::new(Hub::new(engine))
}

async fn serve(hub: Arc<Hub>) -> (SocketAddr, Arc<FlowPipeline>) {
    let pipeline = Arc::new(FlowPipeline::new(
        Arc::new(Mutex::new(FlowStore::new(100_000))),
        Arc::new(Mutex::new(ServiceGraph::default())),
        hub.clone(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                DistributionService::with_flow_pipeline(hub, pipeline.clone()).into_server(),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, pipeline)
}

async fn client(addr: SocketAddr) -> DistributionClient<tonic::transport::Channel> {
    DistributionClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
}

/// Waits (bounded) for `f`; false when it never held.
async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}

fn node_state(hub: &Hub, node: &str) -> Option<(u64, u64, bool)> {
    hub.node_states()
        .into_iter()
        .find(|n| n.node == node)
        .map(|n| (n.version, n.realized, n.connected))
}

// ---------------------------------------------------------------------------------------------
// Finding 1: flow reports.

/// A denied flow at `data/db-0`, decided by the policy `data/<rule>`'s first ingress rule.
fn flow(rule: &str) -> pb::FlowRecord {
    pb::FlowRecord {
        time_unix_nanos: 1,
        endpoint: Some(pb::flow_record::Endpoint::Pod(pb::PodRef {
            namespace: "data".into(),
            name: "db-0".into(),
        })),
        direction: pb::Direction::Ingress as i32,
        src: vec![10, 9, 0, 1].into(),
        dst: vec![10, 9, 0, 2].into(),
        src_port: 40000,
        dst_port: 5432,
        protocol: 6,
        kind: pb::FlowKind::Denied as i32,
        verdict: pb::FlowVerdict::Denied as i32,
        rule: Some(pb::FlowRule {
            rule: Some(pb::flow_rule::Rule::Policy(pb::RuleRef {
                kind: pb::RuleKind::NetworkPolicy as i32,
                namespace: "data".into(),
                name: rule.into(),
                direction: pb::Direction::Ingress as i32,
                index: Some(0),
            })),
        }),
        reason: pb::FlowReason::DeniedPolicy as i32,
        packets: 1,
        bytes: 60,
        ..Default::default()
    }
}

/// A node floods the controller with records of huge names, made-up enum values and bad
/// addresses, and with thousands of distinct rules: the garbage is refused (counted by reason,
/// and not as accepted), and what is kept per distinct rule stays bounded.
#[tokio::test]
async fn flow_report_floods_leave_the_controller_bounded() {
    let hub = small_hub();
    let (addr, pipeline) = serve(hub).await;
    let mut c = client(addr).await;
    const BATCHES: usize = 40;
    const VALID: usize = 50;
    let mut batches = Vec::new();
    for b in 0..BATCHES {
        let mut records = Vec::new();
        // A 1 MB rule name (the issue's repro used 3 MB with a raised client limit).
        records.push(flow(&format!("{b}{}", "x".repeat(1 << 20))));
        let mut bad_verdict = flow("r");
        bad_verdict.verdict = 1000 + b as i32;
        records.push(bad_verdict);
        let mut bad_kind = flow("r");
        bad_kind.kind = 10 + b as i32;
        records.push(bad_kind);
        let mut bad_direction = flow("r");
        bad_direction.direction = 5 + b as i32;
        records.push(bad_direction);
        let mut bad_address = flow("r");
        bad_address.src = vec![10; 5 + b % 8].into();
        records.push(bad_address);
        let mut long_endpoint = flow("r");
        long_endpoint.endpoint = Some(pb::flow_record::Endpoint::Pod(pb::PodRef {
            namespace: "shop".into(),
            name: "p".repeat(10_000),
        }));
        records.push(long_endpoint);
        let mut long_peer = flow("r");
        long_peer.peer = Some(pb::PodRef {
            namespace: "q".repeat(300),
            name: "q".into(),
        });
        records.push(long_peer);
        // More DNS names for the peer than the contract holds.
        let mut many_names = flow("r");
        many_names.peer_names = (0..9 + b)
            .map(|i| pb::NamePattern {
                kind: Some(pb::name_pattern::Kind::Exact(format!("h{i}.example.com"))),
            })
            .collect();
        records.push(many_names);
        // Valid records, each with a rule never seen before: 2,000 in all.
        for i in 0..VALID {
            records.push(flow(&format!("db-{b}-{i}")));
        }
        batches.push(pb::FlowBatch {
            node: "n2".into(),
            records,
            dropped: 0,
        });
    }
    let accepted = c
        .report_flows(tokio_stream::iter(batches))
        .await
        .expect("report")
        .into_inner()
        .accepted;
    assert_eq!(
        accepted,
        (BATCHES * VALID) as u64,
        "only well-formed records are accepted"
    );
    let rejected: Vec<(&str, u64)> = pipeline
        .rejected()
        .map(|(why, n)| (why.label(), n))
        .collect();
    let b = BATCHES as u64;
    assert_eq!(
        rejected,
        [
            ("direction", b),
            ("kind", b),
            ("verdict", b),
            ("address", b),
            ("range", 0),
            ("name", 2 * b),
            ("text", b),
            ("peer_names", b)
        ]
    );
    {
        let store = pipeline.store().lock().expect("store");
        let (_, records) = store.since(0);
        for (_, e, _) in records {
            let FlowEntry::Flow(r) = e else {
                panic!("{e:?} is no flow");
            };
            let rule = r.rule.to_string();
            assert!(rule.len() <= 512, "a {}-byte rule was stored", rule.len());
        }
        assert_eq!(store.stats().stored, (BATCHES * VALID) as u64);
    }
    let graph = pipeline.graph().lock().expect("graph");
    let verdicts: Vec<&str> = graph.by_verdict().map(|(v, _)| v).collect();
    assert_eq!(verdicts, ["denied"]);
    let rules: Vec<(&str, u64)> = graph.drops_by_rule().collect();
    assert!(
        rules.len() <= 1025,
        "{} distinct rule labels: every made-up rule became a metric label",
        rules.len()
    );
    assert_eq!(
        rules.iter().map(|(_, n)| n).sum::<u64>(),
        (BATCHES * VALID) as u64,
        "every denial is still counted (beyond the cap under the overflow label)"
    );
    let label_bytes: usize = rules.iter().map(|(r, _)| r.len()).sum();
    assert!(
        label_bytes < 1025 * 512,
        "{label_bytes} bytes of rule labels"
    );
}

/// Flow reports naming a node the controller does not know are refused: the node's name is
/// kept with every record. A name no Kubernetes node can have is refused before it is looked up.
#[tokio::test]
async fn flow_reports_for_unknown_nodes_are_refused() {
    let (addr, pipeline) = serve(small_hub()).await;
    for (node, code) in [
        ("ghost".to_string(), tonic::Code::NotFound),
        ("ghost".repeat(1000), tonic::Code::InvalidArgument),
    ] {
        let batch = pb::FlowBatch {
            node,
            records: vec![flow("r")],
            dropped: 0,
        };
        let refused = client(addr)
            .await
            .report_flows(tokio_stream::iter([batch]))
            .await
            .expect_err("an unknown node's report is refused");
        assert_eq!(refused.code(), code, "{refused:?}");
    }
    assert!(pipeline.store().lock().expect("store").is_empty());
}

// ---------------------------------------------------------------------------------------------
// Finding 2: forged acks.

/// A raw agent stream: its outbound half, and what the controller sends.
struct RawAgent {
    tx: mpsc::Sender<AgentMessage>,
    inbound: tonic::Streaming<ControllerMessage>,
}

async fn raw_agent(addr: SocketAddr, node: &str) -> Result<RawAgent, tonic::Status> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(Follower::new(node).hello()).await.expect("hello");
    let inbound = client(addr)
        .await
        .sync(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok(RawAgent { tx, inbound })
}

impl RawAgent {
    async fn next(&mut self) -> Result<Option<ControllerMessage>, tonic::Status> {
        tokio::time::timeout(Duration::from_secs(5), self.inbound.message())
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("nothing within 5 s")))
    }

    /// The snapshot's (epoch, version).
    async fn snapshot(&mut self) -> (u64, u64) {
        match self.next().await {
            Ok(Some(ControllerMessage {
                msg: Some(controller_message::Msg::Snapshot(s)),
            })) => {
                let v = s.version.expect("version");
                (v.epoch, v.version)
            }
            other => panic!("expected a snapshot, got {other:?}"),
        }
    }

    async fn ack(&self, epoch: u64, version: u64) {
        let ack = AgentMessage {
            msg: Some(agent_message::Msg::Ack(pb::Ack {
                version: Some(pb::Version { epoch, version }),
                ok: true,
                ..Default::default()
            })),
        };
        self.tx.send(ack).await.expect("send ack");
    }
}

#[tokio::test]
async fn acks_count_only_for_versions_the_stream_was_sent() {
    let hub = small_hub();
    let (addr, _) = serve(hub.clone()).await;
    let (version, _, _) = node_state(&hub, "n1").expect("n1");

    // A forged ack for a version never sent: refused, the stream closed with an error, and
    // nothing the controller reports changes.
    for (epoch, forged) in [
        (hub.epoch(), u64::MAX),
        (hub.epoch(), version + 1),
        (hub.epoch() + 1, version),
    ] {
        let mut a = raw_agent(addr, "n1").await.expect("sync");
        a.snapshot().await;
        a.ack(epoch, forged).await;
        let end = a.next().await;
        assert!(
            matches!(&end, Err(s) if s.code() == tonic::Code::InvalidArgument),
            "a forged ack for {epoch}/{forged} must close the stream with an error: {end:?}"
        );
        assert_eq!(
            node_state(&hub, "n1").map(|s| s.1),
            Some(0),
            "n1 realized nothing"
        );
    }

    // An honest ack counts.
    let mut a = raw_agent(addr, "n1").await.expect("sync");
    let (epoch, sent) = a.snapshot().await;
    a.ack(epoch, sent).await;
    assert!(
        eventually(Duration::from_secs(5), || node_state(&hub, "n1")
            .is_some_and(|s| s.1 == sent))
        .await
    );
    drop(a);
    assert!(
        eventually(Duration::from_secs(5), || node_state(&hub, "n1")
            .is_some_and(|s| !s.2))
        .await,
        "the agent left"
    );

    // A change for n1 while no agent follows it: nothing acks it, so it is not enforced, and
    // a new stream cannot ack it ahead of being sent it.
    hub.apply(
        changes(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: shop, labels: {app: web}}\nspec: {nodeName: n1, containers: [{name: c, image: x}]}\nstatus: {podIP: 10.9.0.3}\n",
        ),
        true,
    )
    .expect("apply");
    let (now, realized, _) = node_state(&hub, "n1").expect("n1");
    assert!(now > sent && realized == sent);
    assert!(hub.enforced("n1", now).is_none());
    let mut a = raw_agent(addr, "n1").await.expect("sync");
    let (epoch, resent) = a.snapshot().await;
    assert_eq!(resent, now);
    a.ack(epoch, now + 1).await;
    assert!(a.next().await.is_err());
    assert_eq!(node_state(&hub, "n1").map(|s| s.1), Some(sent));
    assert!(hub.enforced("n1", now).is_none());
}

// ---------------------------------------------------------------------------------------------
// Finding 6: leaked streams, made-up nodes.

/// Agents that go away while nothing changes: their node stops showing connected at once, not
/// at the next delta (the issue saw 300 of them still "connected" 20 s after they left).
#[tokio::test]
async fn streams_of_agents_that_left_end_at_once() {
    let hub = small_hub();
    let (addr, _) = serve(hub.clone()).await;

    let mut agents = Vec::new();
    for _ in 0..20 {
        let mut a = raw_agent(addr, "n1").await.expect("sync");
        a.snapshot().await;
        agents.push(a);
    }
    assert_eq!(node_state(&hub, "n1").map(|s| s.2), Some(true));
    // They go away with no delta to send them: the controller notices anyway.
    drop(agents);
    assert!(
        eventually(Duration::from_secs(5), || node_state(&hub, "n1")
            .is_some_and(|s| !s.2))
        .await,
        "n1 still shows connected after its agents left"
    );
}

/// `Sync` calls with made-up node names are refused and add nothing to the controller's state
/// (the issue's 3,000 of them added 23 MB and 3,000 "nodes").
#[tokio::test]
async fn made_up_node_names_are_refused() {
    let hub = small_hub();
    let (addr, _) = serve(hub.clone()).await;
    let nodes_before = hub.node_states().len();
    for i in 0..300 {
        let refused = raw_agent(addr, &format!("made-up-{i}"))
            .await
            .err()
            .expect("a made-up node is refused");
        assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    }
    let refused = raw_agent(addr, &"x".repeat(300))
        .await
        .err()
        .expect("a name no node can have is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert_eq!(hub.node_states().len(), nodes_before);

    // A node that joins the inventory later is followed, and reports flows, from then on.
    assert!(raw_agent(addr, "n9").await.is_err());
    hub.apply(
        changes("apiVersion: v1\nkind: Node\nmetadata: {name: n9}\n"),
        false,
    )
    .expect("apply");
    let mut a = raw_agent(addr, "n9")
        .await
        .expect("n9 joined the inventory");
    a.snapshot().await;
    let report = pb::FlowBatch {
        node: "n9".into(),
        records: vec![flow("r")],
        dropped: 0,
    };
    let summary = client(addr)
        .await
        .report_flows(tokio_stream::iter([report]))
        .await
        .expect("n9 reports flows");
    assert_eq!(summary.into_inner().accepted, 1);
}

// ---------------------------------------------------------------------------------------------
// Finding 3: rule sets over 4 MiB.

fn pod_ip(i: usize) -> std::net::IpAddr {
    let i = i as u32 + 1;
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(
        10,
        (i >> 16) as u8,
        (i >> 8) as u8,
        i as u8,
    ))
}

fn pod_ip6(i: usize) -> std::net::IpAddr {
    std::net::IpAddr::V6(std::net::Ipv6Addr::from(
        0xfd00_0000_0000_0000_0000_0000_0000_0000u128 + i as u128 + 1,
    ))
}

/// The benchmark's one-namespace scenario (Antrea's `TestInitXLargeScaleWithOneNamespace`):
/// `pods` pods over `nodes` nodes and one policy selecting every pod and admitting ingress from
/// every pod, so every node's rule set lists every pod's address. (The issue's cluster had 1,000
/// nodes; fewer keep the unoptimised test build quick, and make each snapshot larger.) Pods are
/// dual-stack: in protobuf, a single-stack 100k-pod snapshot is about 1.7 MB, under the limit.
fn one_namespace(pods: usize, nodes: usize) -> Vec<Object> {
    let mut out: Vec<Object> = (0..nodes)
        .map(|n| {
            Object::Node(Node {
                name: format!("node-{n:04}"),
                labels: Default::default(),
                addresses: Vec::new(),
            })
        })
        .collect();
    let ns = "scale";
    let labels: std::collections::BTreeMap<String, String> =
        [("app".to_string(), ns.to_string())].into();
    out.push(Object::Namespace(Namespace {
        name: ns.into(),
        labels: labels.clone(),
    }));
    let everyone = PodSelection {
        namespaces: NamespaceScope::Named(ns.into()),
        pods: Selector::everything(),
        service_account: None,
    };
    out.push(Object::Policy(Policy {
        key: PolicyKey {
            kind: RuleKind::NetworkPolicy,
            namespace: ns.into(),
            name: "np-00000".into(),
        },
        subject: everyone.clone(),
        ingress_isolation: Isolation::Enforce,
        egress_isolation: Isolation::None,
        rules: vec![Rule {
            direction: Direction::Ingress,
            index: 0,
            peers: vec![Peer::Pods(everyone)],
            ports: vec![PortSpec::ANY],
            tier: Tier::Application,
            priority: 0,
            action: Action::Allow,
            audit: false,
        }],
        quarantine: None,
    }));
    for i in 0..pods {
        out.push(Object::Pod(Pod {
            namespace: ns.into(),
            name: format!("pod-{i:05}"),
            labels: labels.clone(),
            service_account: "default".into(),
            node_name: Some(format!("node-{:04}", i % nodes)),
            ips: vec![pod_ip(i), pod_ip6(i)],
            synthetic_ips: false,
            ports: Vec::new(),
            workload: None,
            host_network: false,
        }));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100k_pod_rule_set_over_4_mib_arrives_and_is_realized() {
    let started = Instant::now();
    let engine = tokio::task::spawn_blocking(|| {
        PolicyEngine::new(EngineConfig::default(), one_namespace(100_000, 20))
    })
    .await
    .expect("join")
    .expect("compile");
    let hub = Arc::new(Hub::new(engine));
    eprintln!("100k pods compiled in {:?}", started.elapsed());
    let node = "node-0000";
    let want = hub.ruleset(node).expect("node-0000");
    let size = bulkhead_proto::v1::RuleSet::from(&want).encoded_len();
    assert!(size > 4 << 20, "the scenario's snapshot is {size} bytes");
    let (addr, _) = serve(hub.clone()).await;

    let realized: Arc<Mutex<Option<RuleSet>>> = Arc::default();
    let agent = {
        let realized = realized.clone();
        tokio::spawn(async move {
            let mut follower = Follower::new(node);
            let mut sessions = 0u32;
            loop {
                sessions += 1;
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .expect("endpoint")
                    .connect()
                    .await
                    .expect("connect");
                let r = realized.clone();
                let end = run_session(
                    channel,
                    &mut follower,
                    |rs| {
                        *r.lock().expect("lock") = Some(Arc::unwrap_or_clone(rs));
                        async { Ok(Default::default()) }
                    },
                    || {},
                )
                .await;
                eprintln!("session {sessions} ended: {end:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let sent = Instant::now();
    let arrived = eventually(Duration::from_secs(60), || {
        node_state(&hub, node).is_some_and(|s| s.1 == want.version)
    })
    .await;
    agent.abort();
    assert!(
        arrived,
        "the {size}-byte snapshot was not realized within 60 s"
    );
    eprintln!(
        "{size}-byte snapshot realized and acked {:?} after the agent connected",
        sent.elapsed()
    );
    assert_eq!(realized.lock().expect("lock").as_ref(), Some(&want));

    // On the wire it travelled in parts, each within gRPC's default 4 MiB limit: a client that
    // keeps the default limit reads every one of them.
    let other = "node-0001";
    let want = hub.ruleset(other).expect("node-0001");
    let mut raw = raw_agent(addr, other).await.expect("sync");
    let mut reassembly = parts::Reassembly::default();
    let mut pieces = 0;
    let whole = loop {
        let msg = raw
            .next()
            .await
            .expect("a part")
            .expect("the stream is open");
        let Some(controller_message::Msg::Part(part)) = &msg.msg else {
            panic!("a {size}-byte snapshot must travel in parts, got {msg:?}");
        };
        assert!(part.data.len() <= parts::PART_BYTES);
        pieces += 1;
        if let Some(whole) = reassembly.push(msg).expect("parts in order") {
            break whole;
        }
    };
    assert!(pieces >= 5, "{pieces} parts");
    let Some(controller_message::Msg::Snapshot(snapshot)) = whole.msg else {
        panic!("the parts make a snapshot");
    };
    let got = RuleSet::try_from(snapshot.ruleset.as_ref().expect("a rule set")).expect("rule set");
    assert_eq!(got, want);
}
