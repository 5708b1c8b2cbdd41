//! Leader election against a mocked API server: every request the elector makes is checked
//! (method, path, body) and answered like the API server would (Lease JSON, 404, 409).

use std::time::{Duration, Instant};

use bulkhead_controller::kubernetes::{Gate, LeaderElector, LeaseConfig};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use serde_json::{Value, json};
use tower_test::mock::{Handle, SendResponse};

type Mock = Handle<Request<kube::client::Body>, Response<Full<Bytes>>>;

const LEASE_PATH: &str =
    "/apis/coordination.k8s.io/v1/namespaces/bulkhead-system/leases/bulkhead-controller";
const COLLECTION_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/bulkhead-system/leases";

fn elector(identity: &str) -> (LeaderElector, Mock) {
    elector_retrying(identity, Duration::from_secs(2))
}

fn elector_retrying(identity: &str, retry_period: Duration) -> (LeaderElector, Mock) {
    let (service, handle) =
        tower_test::mock::pair::<Request<kube::client::Body>, Response<Full<Bytes>>>();
    let client = kube::Client::new(service, "default");
    let mut config = LeaseConfig::new("bulkhead-controller", "bulkhead-system", identity);
    config.lease_duration = Duration::from_secs(15);
    config.retry_period = retry_period;
    (LeaderElector::new(client, config), handle)
}

/// A Lease as the API server returns it.
fn lease(holder: Option<&str>, renew: &str, transitions: i32, rv: &str) -> Value {
    let mut spec = json!({
        "leaseDurationSeconds": 15,
        "acquireTime": "2026-11-29T20:00:00.000000Z",
        "renewTime": renew,
        "leaseTransitions": transitions,
    });
    if let Some(h) = holder {
        spec["holderIdentity"] = json!(h);
    }
    json!({
        "kind": "Lease",
        "apiVersion": "coordination.k8s.io/v1",
        "metadata": {
            "name": "bulkhead-controller",
            "namespace": "bulkhead-system",
            "uid": "1e5e-0001",
            "resourceVersion": rv,
            "creationTimestamp": "2026-11-29T20:00:00Z",
            "managedFields": [{
                "manager": "bulkhead",
                "operation": "Update",
                "apiVersion": "coordination.k8s.io/v1",
                "time": "2026-11-29T20:00:00Z",
                "fieldsType": "FieldsV1",
                "fieldsV1": {"f:spec": {"f:holderIdentity": {}, "f:renewTime": {}}}
            }]
        },
        "spec": spec,
    })
}

fn respond(send: SendResponse<Response<Full<Bytes>>>, status: u16, body: Value) {
    send.send_response(
        Response::builder()
            .status(status)
            .body(Full::new(Bytes::from(serde_json::to_vec(&body).unwrap())))
            .unwrap(),
    );
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": format!("leases.coordination.k8s.io \"bulkhead-controller\" {reason}"),
           "reason": reason, "code": code})
}

struct Seen {
    method: String,
    path: String,
    content_type: String,
    body: Value,
}

async fn next(handle: &mut Mock) -> (Seen, SendResponse<Response<Full<Bytes>>>) {
    let (req, send) = handle.next_request().await.expect("a request");
    let (parts, body) = req.into_parts();
    let bytes = body.collect_bytes().await.unwrap();
    let seen = Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        content_type: parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    };
    (seen, send)
}

#[tokio::test]
async fn acquires_a_missing_lease_and_renews_it() {
    let (mut e, mut api) = elector("controller-a");
    let leadership = e.leadership();
    let server = tokio::spawn(async move {
        let (r, send) = next(&mut api).await;
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", LEASE_PATH));
        respond(send, 404, status(404, "NotFound"));
        let (r, send) = next(&mut api).await;
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("POST", COLLECTION_PATH)
        );
        assert_eq!(r.body["spec"]["holderIdentity"], "controller-a");
        assert_eq!(r.body["spec"]["leaseDurationSeconds"], 15);
        assert_eq!(r.body["spec"]["leaseTransitions"], 0);
        assert!(r.body["spec"]["renewTime"].is_string());
        let mut created = r.body.clone();
        created["metadata"]["resourceVersion"] = json!("100");
        respond(send, 201, created.clone());
        // Renewal: read, then replace with the read resourceVersion (optimistic concurrency).
        let (r, send) = next(&mut api).await;
        assert_eq!(r.method, "GET");
        respond(send, 200, created.clone());
        let (r, send) = next(&mut api).await;
        assert_eq!((r.method.as_str(), r.path.as_str()), ("PUT", LEASE_PATH));
        assert_eq!(r.body["metadata"]["resourceVersion"], "100");
        assert_eq!(r.body["spec"]["holderIdentity"], "controller-a");
        assert_eq!(
            r.body["spec"]["leaseTransitions"], 0,
            "a renewal is no transition"
        );
        assert_eq!(
            r.body["spec"]["acquireTime"], created["spec"]["acquireTime"],
            "a renewal keeps acquireTime"
        );
        let mut renewed = r.body.clone();
        renewed["metadata"]["resourceVersion"] = json!("101");
        respond(send, 200, renewed);
        api
    });
    let t0 = Instant::now();
    assert!(e.try_acquire_or_renew(t0).await.unwrap());
    assert!(leadership.is_leader());
    assert!(
        e.try_acquire_or_renew(t0 + Duration::from_secs(2))
            .await
            .unwrap()
    );
    assert_eq!(leadership.leader(), "controller-a");
    server.await.unwrap();
}

#[tokio::test]
async fn follows_a_live_leader_and_takes_over_once_its_lease_expired() {
    let (mut e, mut api) = elector("controller-b");
    let leadership = e.leadership();
    let gate = Gate::new(Some(leadership.clone()));
    gate.set_synced();
    let server = tokio::spawn(async move {
        // t0: controller-a holds the lease.
        let (r, send) = next(&mut api).await;
        assert_eq!(r.method, "GET");
        respond(
            send,
            200,
            lease(
                Some("controller-a"),
                "2026-11-29T20:10:00.000000Z",
                1,
                "200",
            ),
        );
        // t0+10s: it renewed (renewTime moved): still alive, however old the time looks.
        let (_, send) = next(&mut api).await;
        respond(
            send,
            200,
            lease(
                Some("controller-a"),
                "2026-11-29T20:10:10.000000Z",
                1,
                "201",
            ),
        );
        // t0+20s: unchanged since t0+10s — not yet a whole lease duration.
        let (_, send) = next(&mut api).await;
        respond(
            send,
            200,
            lease(
                Some("controller-a"),
                "2026-11-29T20:10:10.000000Z",
                1,
                "201",
            ),
        );
        // t0+26s: unchanged for 16s > 15s: expired; take over with the read resourceVersion.
        let (_, send) = next(&mut api).await;
        respond(
            send,
            200,
            lease(
                Some("controller-a"),
                "2026-11-29T20:10:10.000000Z",
                1,
                "201",
            ),
        );
        let (r, send) = next(&mut api).await;
        assert_eq!((r.method.as_str(), r.path.as_str()), ("PUT", LEASE_PATH));
        assert_eq!(r.body["metadata"]["resourceVersion"], "201");
        assert_eq!(r.body["spec"]["holderIdentity"], "controller-b");
        assert_eq!(r.body["spec"]["leaseTransitions"], 2);
        assert_ne!(r.body["spec"]["acquireTime"], "2026-11-29T20:00:00.000000Z");
        let mut taken = r.body.clone();
        taken["metadata"]["resourceVersion"] = json!("202");
        respond(send, 200, taken.clone());
        // Shutdown: release (clear the holder) with the lease's resourceVersion as precondition.
        let (r, send) = next(&mut api).await;
        assert_eq!((r.method.as_str(), r.path.as_str()), ("PATCH", LEASE_PATH));
        assert_eq!(r.content_type, "application/merge-patch+json");
        assert_eq!(r.body["metadata"]["resourceVersion"], "202");
        assert!(r.body["spec"]["holderIdentity"].is_null());
        assert_eq!(r.body["spec"]["leaseDurationSeconds"], 1);
        let mut released = taken;
        released["spec"]["holderIdentity"] = Value::Null;
        respond(send, 200, released);
    });
    let t0 = Instant::now();
    assert!(!e.try_acquire_or_renew(t0).await.unwrap());
    assert!(!leadership.is_leader());
    assert_eq!(leadership.leader(), "controller-a");
    // A follower refuses agents and is not ready.
    assert_eq!(
        gate.serving().unwrap_err(),
        "not the leader (leader: controller-a)"
    );
    assert!(!gate.ready());
    assert!(
        !e.try_acquire_or_renew(t0 + Duration::from_secs(10))
            .await
            .unwrap()
    );
    assert!(
        !e.try_acquire_or_renew(t0 + Duration::from_secs(20))
            .await
            .unwrap()
    );
    assert!(
        e.try_acquire_or_renew(t0 + Duration::from_secs(26))
            .await
            .unwrap()
    );
    assert!(leadership.is_leader());
    assert!(gate.ready());
    assert!(gate.serving().is_ok());
    e.release().await.unwrap();
    assert!(!leadership.is_leader());
    server.await.unwrap();
}

#[tokio::test]
async fn an_empty_holder_is_taken_at_once_and_a_lost_race_is_no_leadership() {
    let (mut e, mut api) = elector("controller-b");
    let leadership = e.leadership();
    let server = tokio::spawn(async move {
        // Released by the previous leader: no holder.
        let (_, send) = next(&mut api).await;
        respond(
            send,
            200,
            lease(None, "2026-11-29T20:10:00.000000Z", 3, "300"),
        );
        // Another replica wrote first: 409 Conflict.
        let (r, send) = next(&mut api).await;
        assert_eq!(r.method, "PUT");
        assert_eq!(r.body["metadata"]["resourceVersion"], "300");
        respond(send, 409, status(409, "Conflict"));
        // Next round: controller-c holds it, freshly renewed.
        let (_, send) = next(&mut api).await;
        respond(
            send,
            200,
            lease(
                Some("controller-c"),
                "2026-11-29T20:10:01.000000Z",
                4,
                "301",
            ),
        );
    });
    let t0 = Instant::now();
    assert!(!e.try_acquire_or_renew(t0).await.unwrap());
    assert!(!leadership.is_leader());
    assert!(
        !e.try_acquire_or_renew(t0 + Duration::from_secs(2))
            .await
            .unwrap()
    );
    assert_eq!(leadership.leader(), "controller-c");
    server.await.unwrap();
}

#[tokio::test]
async fn a_leader_that_sees_another_holder_reports_the_loss() {
    let (e, mut api) = elector_retrying("controller-a", Duration::from_millis(10));
    let server = tokio::spawn(async move {
        let (_, send) = next(&mut api).await;
        respond(send, 404, status(404, "NotFound"));
        let (r, send) = next(&mut api).await;
        let mut created = r.body.clone();
        created["metadata"]["resourceVersion"] = json!("10");
        respond(send, 201, created);
        // While it waited, someone else took the lease (e.g. after a long pause).
        let (_, send) = next(&mut api).await;
        respond(
            send,
            200,
            lease(Some("controller-b"), "2026-11-29T20:10:01.000000Z", 1, "11"),
        );
    });
    let result = tokio::time::timeout(Duration::from_secs(10), e.run(std::future::pending()))
        .await
        .expect("run returns when leadership is lost");
    let err = result.unwrap_err();
    assert!(err.to_string().contains("lost the leader lease"), "{err}");
    assert_eq!(err.metric_label(), "lost");
    server.await.unwrap();
}

/// A follower's distribution service answers agents with UNAVAILABLE naming the leader (they
/// retry and reach the leader); once it leads, the same agent gets its snapshot.
#[tokio::test]
async fn only_the_leader_serves_agents() {
    use std::sync::{Arc, Mutex};

    use bulkhead_controller::distribution::{DistributionService, FlowStore, Hub};
    use bulkhead_controller::kubernetes::Leadership;
    use bulkhead_controller::{EngineConfig, PolicyEngine};
    use bulkhead_proto::v1 as pb;
    use pb::distribution_client::DistributionClient;
    use pb::distribution_server::DistributionServer;

    // Agents are served only for nodes of the inventory.
    let node = bulkhead_controller::Object::Node(bulkhead_controller::model::Node {
        name: "node-a".into(),
        labels: Default::default(),
        addresses: Vec::new(),
    });
    let engine = PolicyEngine::new(EngineConfig::default(), vec![node]).expect("engine");
    let hub = Arc::new(Hub::new(engine));
    let flows = Arc::new(Mutex::new(FlowStore::new(16)));
    let leadership = Arc::new(Leadership::default());
    leadership.set(false, "bulkhead-controller-7d9f-a");
    let gate = Arc::new(Gate::new(Some(leadership.clone())));
    gate.set_synced();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DistributionServer::with_interceptor(
                DistributionService::new(hub.clone(), flows),
                gate.interceptor(),
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let hello = || {
        let follower = bulkhead_proto::follower::Follower::new("node-a");
        tokio_stream::iter(vec![follower.hello()])
    };
    let mut client = DistributionClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let refused = client.sync(hello()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert_eq!(
        refused.message(),
        "not the leader (leader: bulkhead-controller-7d9f-a)"
    );

    leadership.set(true, "bulkhead-controller-7d9f-b");
    let mut stream = client.sync(hello()).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a snapshot")
        .unwrap();
    assert!(first.is_some(), "the leader sends the node its rule set");
    server.abort();
}
