//! The flow ingest and the flow/graph admin calls over a real socket.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bulkhead_proto::v1::{
    self as pb, admin_client::AdminClient, admin_server::AdminServer,
    distribution_client::DistributionClient, distribution_server::DistributionServer,
};

use super::{AdminService, DistributionService, FlowStore, Hub};
use crate::{
    Change, EngineConfig, PolicyEngine,
    flows::{FlowPipeline, ServiceGraph},
    load_str,
    ruleset::{
        Direction, FlowEntry, FlowKind, FlowReason, FlowRecord, FlowRule, RuleKind, RuleRef,
    },
};

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

fn record(endpoint: &str, direction: &str, dst: &str, verdict: &str, t: u64) -> pb::FlowRecord {
    pb::FlowRecord::from(FlowRecord {
        time_unix_nanos: t,
        endpoint: endpoint.parse().expect("endpoint"),
        direction: direction.parse().expect("direction"),
        src: "10.9.0.1".parse().expect("ip"),
        dst: dst.parse().expect("ip"),
        src_port: 0,
        dst_port: 5432,
        protocol: 6,
        kind: FlowKind::New,
        verdict: verdict.parse().expect("verdict"),
        rule: FlowRule::Rule(RuleRef {
            kind: RuleKind::NetworkPolicy,
            namespace: "data".into(),
            name: format!("rule-for-{verdict}"),
            direction: Direction::Ingress,
            index: None,
        }),
        rule_id: 0,
        local_identity: 0,
        peer_identity: 0,
        peer: None,
        reason: FlowReason::DeniedPolicy,
        packets: 0,
        bytes: 60,
        peer_names: Vec::new(),
        staged: None,
    })
}

/// The record of a stored flow.
fn flow_record(f: &pb::StoredFlow) -> FlowRecord {
    match f.clone().into_entry().expect("a stored flow") {
        FlowEntry::Flow(r) => r,
        other => panic!("{other:?} is no flow record"),
    }
}

async fn serve(capacity: usize) -> (SocketAddr, Arc<FlowPipeline>) {
    let loaded = load_str(std::path::Path::new("pods.yaml"), PODS);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let mut engine = PolicyEngine::empty(EngineConfig::default());
    engine
        .apply_batch(
            loaded
                .objects
                .into_iter()
                .map(Change::from)
                .collect::<Vec<_>>(),
        )
        .expect("pods");
    let hub = Arc::new(Hub::new(engine));
    let pipeline = Arc::new(FlowPipeline::new(
        Arc::new(std::sync::Mutex::new(FlowStore::new(capacity))),
        Arc::new(std::sync::Mutex::new(ServiceGraph::default())),
        hub.clone(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DistributionServer::new(
                DistributionService::with_flow_pipeline(hub.clone(), pipeline.clone()),
            ))
            .add_service(AdminServer::new(
                AdminService::new(hub).with_flows(pipeline.clone()),
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, pipeline)
}

async fn report(addr: SocketAddr, node: &str, records: Vec<pb::FlowRecord>, dropped: u64) -> u64 {
    let mut client = DistributionClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let batch = pb::FlowBatch {
        node: node.into(),
        records,
        dropped,
    };
    client
        .report_flows(tokio_stream::iter([batch]))
        .await
        .expect("report")
        .into_inner()
        .accepted
}

#[tokio::test]
async fn flows_and_graph_over_grpc() {
    let (addr, _) = serve(100).await;
    let records = vec![
        // web-0 → db-0, allowed at web's egress (n1) and denied at db's ingress (n2).
        record("shop/web-0", "egress", "10.9.0.2", "allowed", 10),
        record("data/db-0", "ingress", "10.9.0.2", "denied", 11),
        // web-0 → the internet.
        record("shop/web-0", "egress", "198.51.100.7", "allowed", 12),
    ];
    assert_eq!(report(addr, "n1", records, 5).await, 3);
    let mut admin = AdminClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");

    let all = admin
        .get_flows(pb::GetFlowsRequest::default())
        .await
        .expect("get flows")
        .into_inner();
    assert_eq!(all.flows.len(), 3);
    assert_eq!(all.flows[0].sequence, 0, "oldest first");
    let stats = all.stats.expect("stats");
    assert_eq!(
        (
            stats.accepted,
            stats.stored,
            stats.evicted,
            stats.dropped_by_agents
        ),
        (3, 3, 0, 5)
    );
    // The controller names the peer the agent could not (db-0 lives on another node).
    let first = flow_record(&all.flows[0]);
    assert_eq!(first.peer, Some("data/db-0".parse().expect("pod")));

    let denied = admin
        .get_flows(pb::GetFlowsRequest {
            filter: Some(pb::FlowFilter {
                verdict: "denied".into(),
                namespace: "shop".into(),
                ..Default::default()
            }),
            limit: 0,
            ..Default::default()
        })
        .await
        .expect("get flows")
        .into_inner();
    assert_eq!(denied.flows.len(), 1, "{:?}", denied.flows);
    assert_eq!(denied.flows[0].node, "n1");
    let pod = admin
        .get_flows(pb::GetFlowsRequest {
            filter: Some(pb::FlowFilter {
                pod: "data/db-0".into(),
                since_unix_nanos: 11,
                ..Default::default()
            }),
            limit: 0,
            ..Default::default()
        })
        .await
        .expect("get flows")
        .into_inner();
    assert_eq!(pod.flows.len(), 1);

    let graph = admin
        .get_graph(pb::GetGraphRequest::default())
        .await
        .expect("graph")
        .into_inner();
    let ids: Vec<&str> = graph.nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(ids, ["data/Pod/db-0", "shop/Pod/web-0", "world"]);
    assert_eq!(graph.edges.len(), 2);
    let db = graph
        .edges
        .iter()
        .find(|e| e.dst == "data/Pod/db-0")
        .expect("web → db");
    assert_eq!((db.allowed, db.denied, db.port), (0, 1, 5432));
    assert_eq!(
        db.rules[0].rule,
        "NetworkPolicy data/rule-for-denied ingress default-deny"
    );
    let data_only = admin
        .get_graph(pb::GetGraphRequest {
            namespace: "data".into(),
        })
        .await
        .expect("graph")
        .into_inner();
    assert_eq!((data_only.nodes.len(), data_only.edges.len()), (2, 1));
}

/// `Recommend` and `Impact` answer over a real socket what the HTTP API answers (the same
/// [`crate::answers`]), with bad questions refused as INVALID_ARGUMENT; the history is asked
/// for where none is kept: FAILED_PRECONDITION.
#[tokio::test]
async fn recommend_and_impact_over_grpc() {
    use crate::{impact::Impact, recommend::Recommendation};
    let (addr, _) = serve(100).await;
    let records = vec![
        record("shop/web-0", "egress", "10.9.0.2", "allowed", 10),
        record("data/db-0", "ingress", "10.9.0.2", "allowed", 11),
    ];
    assert_eq!(report(addr, "n1", records, 0).await, 2);
    let mut admin = AdminClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");

    let r = admin
        .recommend(pb::RecommendRequest {
            namespaces: vec!["data".into()],
            ..Default::default()
        })
        .await
        .expect("recommend")
        .into_inner();
    let r = Recommendation::try_from(r).expect("a recommendation");
    assert_eq!((r.records, r.from_history), (2, false));
    assert_eq!(r.policies.len(), 1, "{}", r.to_yaml().unwrap());
    assert_eq!(r.policies[0].workload.to_string(), "data/Pod/db-0");
    assert!(
        r.to_yaml().unwrap().contains("app: web"),
        "{}",
        r.to_yaml().unwrap()
    );

    let deny_all = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-closed, namespace: data}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
";
    let i = admin
        .impact(pb::ImpactRequest {
            proposal_yaml: deny_all.into(),
            ..Default::default()
        })
        .await
        .expect("impact")
        .into_inner();
    let i = Impact::try_from(i).expect("an impact");
    assert_eq!(i.proposal.added, ["NetworkPolicy/data/db-closed"]);
    assert_eq!(i.breaks, 1, "{i:#?}");
    assert_eq!(
        (i.changed[0].src.as_str(), i.changed[0].dst.as_str()),
        ("shop/web-0", "data/db-0")
    );

    let bad = admin
        .impact(pb::ImpactRequest {
            proposal_yaml: "kind: NetworkPolicy\nmetadata: {name: x}\n".into(),
            ..Default::default()
        })
        .await
        .expect_err("an invalid proposal");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad}");
    let unknown = admin
        .impact(pb::ImpactRequest {
            delete: vec![pb::PolicyName {
                kind: pb::RuleKind::NetworkPolicy.into(),
                namespace: "data".into(),
                name: "nope".into(),
            }],
            ..Default::default()
        })
        .await
        .expect_err("no such policy");
    assert_eq!(unknown.code(), tonic::Code::InvalidArgument);
    assert!(unknown.message().contains("no such policy"), "{unknown}");
    let garbage = admin
        .recommend(pb::RecommendRequest {
            kind: 77,
            ..Default::default()
        })
        .await
        .expect_err("an unknown kind");
    assert_eq!(garbage.code(), tonic::Code::InvalidArgument);

    let no_history = admin
        .get_flows(pb::GetFlowsRequest {
            history: true,
            ..Default::default()
        })
        .await
        .expect_err("no history kept");
    assert_eq!(no_history.code(), tonic::Code::FailedPrecondition);
}

async fn next(w: &mut tonic::Streaming<pb::WatchFlowsResponse>) -> pb::WatchFlowsResponse {
    tokio::time::timeout(Duration::from_secs(5), w.message())
        .await
        .expect("a message within 5 s")
        .expect("stream")
        .expect("open")
}

#[tokio::test]
async fn watchers_get_new_matching_flows_and_hear_what_they_missed() {
    let (addr, pipeline) = serve(4).await;
    report(
        addr,
        "n1",
        vec![record("shop/web-0", "egress", "10.9.0.2", "denied", 1)],
        0,
    )
    .await;
    let mut admin = AdminClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let mut watch = admin
        .watch_flows(pb::WatchFlowsRequest {
            filter: Some(pb::FlowFilter {
                verdict: "denied".into(),
                ..Default::default()
            }),
            backlog: 10,
        })
        .await
        .expect("watch")
        .into_inner();
    let backlog = next(&mut watch).await;
    assert_eq!((backlog.flows.len(), backlog.missed), (1, 0));
    // One allowed (filtered out) and one denied record arrive.
    report(
        addr,
        "n1",
        vec![
            record("shop/web-0", "egress", "10.9.0.2", "allowed", 2),
            record("shop/web-0", "egress", "10.9.0.2", "denied", 3),
        ],
        0,
    )
    .await;
    let live = next(&mut watch).await;
    assert_eq!(live.flows.len(), 1);
    assert_eq!(flow_record(&live.flows[0]).time_unix_nanos, 3);
    // Ten records into a store of four, in one batch: the watcher sees the four the store
    // still holds and is told about the six it missed.
    let batch = (0..10)
        .map(|i| record("shop/web-0", "egress", "10.9.0.2", "denied", 100 + i))
        .collect();
    report(addr, "n1", batch, 0).await;
    let burst = next(&mut watch).await;
    assert_eq!((burst.flows.len(), burst.missed), (4, 6));
    let stats = pipeline.store().lock().expect("store").stats();
    assert_eq!(stats.accepted, stats.stored + stats.evicted);
    assert_eq!(
        pipeline.graph().lock().expect("graph").records(),
        stats.accepted
    );
}
