//! Issue 21, finding 12: one node's agent cannot speak for another. With
//! `--agent-token-review`, an agent holding the certificate every node shares must also send its
//! pod's service-account token; the API server reviews it (a `TokenReview` with the controller's
//! audience, answered here by a fake API server over kube's mock transport) and the agent may
//! follow and report only for the node that pod runs on. Over real gRPC with mTLS.
//!
//! Also the `SubjectAccessReview` the web API asks with `--http-auth kubernetes`.

mod k8s_mock;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use bulkhead_controller::{
    Change, EngineConfig, PolicyEngine,
    distribution::{ClientPolicy, DistributionService, FlowStore, Hub},
    kubernetes::review::{
        AgentTokenError, AgentTokenReview, ResourceAccess, ReviewError, Reviewer,
    },
    load_str,
};
use bulkhead_proto::follower::{Follower, bearer_value};
use bulkhead_proto::v1::{self as pb, distribution_client::DistributionClient};
use http::{Request, Response};
use k8s_mock::{MockBody, Respond, full, mock_client};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

const SA: &str = "system:serviceaccount:bulkhead-system:bulkhead-agent";

/// The API server: token reviews, access reviews and the agent pods, and what it was asked.
#[derive(Default)]
struct Api {
    requests: Vec<(String, String, Value)>,
}

fn json_response(status: u16, body: Value) -> Response<MockBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(full(body.to_string()))
        .expect("response")
}

fn user(name: &str, extra: Value) -> Value {
    json!({"username": name, "uid": format!("uid-of-{name}"), "groups": ["system:serviceaccounts"], "extra": extra})
}

impl Respond for Api {
    fn respond(&mut self, req: Request<Vec<u8>>) -> Response<MockBody> {
        let body: Value = serde_json::from_slice(req.body()).unwrap_or(Value::Null);
        let path = req.uri().path().to_string();
        self.requests
            .push((req.method().to_string(), path.clone(), body.clone()));
        match path.as_str() {
            "/apis/authentication.k8s.io/v1/tokenreviews" => {
                let token = body["spec"]["token"].as_str().unwrap_or_default();
                // Tokens for another audience are refused, as the API server does.
                let for_us = body["spec"]["audiences"] == json!(["bulkhead-controller"]);
                let status = match token {
                    // A pod's token on a cluster without node claims (before 1.30): pod only.
                    "tok-pod-on-n1" if for_us => {
                        json!({"authenticated": true, "user": user(SA, json!({
                        "authentication.kubernetes.io/pod-name": ["bulkhead-agent-aaaaa"],
                        "authentication.kubernetes.io/pod-uid": ["uid-aaaaa"]}))})
                    }
                    // Its pod was deleted and another of the same name runs now.
                    "tok-replaced-pod" if for_us => {
                        json!({"authenticated": true, "user": user(SA, json!({
                        "authentication.kubernetes.io/pod-name": ["bulkhead-agent-aaaaa"],
                        "authentication.kubernetes.io/pod-uid": ["uid-old"]}))})
                    }
                    // Kubernetes ≥ 1.30 names the node in the token.
                    "tok-node-n2" if for_us => {
                        json!({"authenticated": true, "user": user(SA, json!({
                        "authentication.kubernetes.io/pod-name": ["bulkhead-agent-bbbbb"],
                        "authentication.kubernetes.io/pod-uid": ["uid-bbbbb"],
                        "authentication.kubernetes.io/node-name": ["n2"]}))})
                    }
                    "tok-other-sa" if for_us => json!({"authenticated": true,
                        "user": user("system:serviceaccount:default:default", json!({}))}),
                    "tok-alice" => json!({"authenticated": true, "user": user("alice", json!({}))}),
                    _ => json!({"authenticated": false, "error": "Invalid Bearer Token"}),
                };
                json_response(
                    201,
                    json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                           "metadata": {}, "spec": body["spec"], "status": status}),
                )
            }
            "/apis/authorization.k8s.io/v1/subjectaccessreviews" => {
                let spec = &body["spec"];
                let attrs = &spec["resourceAttributes"];
                let allowed = spec["user"] == "alice"
                    && attrs["group"] == "bulkhead.dev"
                    && ((attrs["verb"] == "get" && attrs["resource"] == "flows")
                        || (attrs["verb"] == "create"
                            && attrs["resource"] == "quarantines"
                            && attrs["namespace"] == "shop"));
                json_response(
                    201,
                    json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                           "metadata": {}, "spec": spec, "status": {"allowed": allowed}}),
                )
            }
            "/api/v1/namespaces/bulkhead-system/pods/bulkhead-agent-aaaaa" => json_response(
                200,
                json!({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": "bulkhead-agent-aaaaa", "namespace": "bulkhead-system", "uid": "uid-aaaaa"},
                       "spec": {"nodeName": "n1", "containers": [{"name": "agent", "image": "x"}]}}),
            ),
            _ => json_response(
                404,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
            ),
        }
    }
}

fn review(client: kube::Client) -> Arc<AgentTokenReview> {
    Arc::new(AgentTokenReview::new(
        client,
        "bulkhead-controller".into(),
        "bulkhead-system".into(),
        "bulkhead-agent".into(),
    ))
}

#[tokio::test]
async fn a_token_stands_for_the_node_of_its_pod() {
    let (client, api, _task) = mock_client(Api::default());
    let r = review(client);
    assert_eq!(r.node_of("tok-pod-on-n1").await, Ok("n1".into()));
    assert_eq!(r.node_of("tok-node-n2").await, Ok("n2".into()));
    assert!(matches!(
        r.node_of("tok-replaced-pod").await,
        Err(AgentTokenError::PodGone(_))
    ));
    assert!(matches!(
        r.node_of("tok-other-sa").await,
        Err(AgentTokenError::NotAgent(..))
    ));
    assert!(matches!(
        r.node_of("garbage").await,
        Err(AgentTokenError::Review(ReviewError::Rejected(e))) if e.contains("invalid bearer token")
    ));
    // A reviewed token (and a refused one) is remembered: no second round trip.
    let asked = api.lock().unwrap().requests.len();
    assert_eq!(r.node_of("tok-pod-on-n1").await, Ok("n1".into()));
    assert!(r.node_of("garbage").await.is_err());
    assert_eq!(api.lock().unwrap().requests.len(), asked);
    // Every review named the controller's audience.
    for (method, path, body) in &api.lock().unwrap().requests {
        if path.ends_with("/tokenreviews") {
            assert_eq!(method, "POST");
            assert_eq!(body["spec"]["audiences"], json!(["bulkhead-controller"]));
        }
    }
}

#[tokio::test]
async fn access_reviews_ask_the_api_server_and_are_remembered() {
    let (client, api, _task) = mock_client(Api::default());
    let r = Reviewer::new(client, vec![]);
    let alice = r.review_token("tok-alice").await.expect("alice");
    assert_eq!(alice.username, "alice");
    let read = ResourceAccess {
        verb: "get",
        group: "bulkhead.dev",
        resource: "flows",
        namespace: None,
    };
    let quarantine = |ns: &str| ResourceAccess {
        verb: "create",
        group: "bulkhead.dev",
        resource: "quarantines",
        namespace: Some(ns.into()),
    };
    assert_eq!(r.allowed(&alice, &read).await, Ok(true));
    assert_eq!(r.allowed(&alice, &quarantine("shop")).await, Ok(true));
    assert_eq!(
        r.allowed(&alice, &quarantine("kube-system")).await,
        Ok(false)
    );
    let asked = api.lock().unwrap().requests.len();
    assert_eq!(r.allowed(&alice, &read).await, Ok(true));
    assert_eq!(api.lock().unwrap().requests.len(), asked);
    let sar = api
        .lock()
        .unwrap()
        .requests
        .iter()
        .find(|(_, p, _)| p.ends_with("/subjectaccessreviews"))
        .map(|(_, _, b)| b.clone())
        .expect("a SubjectAccessReview");
    assert_eq!(sar["spec"]["user"], "alice");
    assert_eq!(sar["spec"]["uid"], "uid-of-alice");
    assert_eq!(sar["spec"]["groups"], json!(["system:serviceaccounts"]));
    // Without audiences the API server's own are meant: none are sent.
    let tr = api
        .lock()
        .unwrap()
        .requests
        .iter()
        .find(|(_, p, _)| p.ends_with("/tokenreviews"))
        .map(|(_, _, b)| b.clone())
        .expect("a TokenReview");
    assert!(tr["spec"].get("audiences").is_none(), "{tr}");
    assert!(matches!(
        r.review_token("").await,
        Err(ReviewError::Rejected(_))
    ));
}

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

struct Pki {
    ca: String,
    server: Identity,
    clients: BTreeMap<&'static str, Identity>,
}

fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test CA");
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
    let leaf = |cn: &str, names: Vec<String>, usage| {
        let mut p = CertificateParams::new(names).expect("params");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &ca).expect("sign");
        Identity::from_pem(cert.pem(), key.serialize_pem())
    };
    let server = leaf(
        "bulkhead-controller",
        vec!["bulkhead-controller".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let clients = ["bulkhead-agent", "n1"]
        .into_iter()
        .map(|cn| {
            (
                cn,
                leaf(cn, vec![cn.into()], ExtendedKeyUsagePurpose::ClientAuth),
            )
        })
        .collect();
    Pki {
        ca: ca.pem(),
        server,
        clients,
    }
}

async fn serve_tls(pki: &Pki, clients: ClientPolicy) -> std::net::SocketAddr {
    let mut engine = PolicyEngine::empty(EngineConfig::default());
    let loaded = load_str(std::path::Path::new("pods.yaml"), PODS);
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let tls = ServerTlsConfig::new()
        .identity(pki.server.clone())
        .client_ca_root(Certificate::from_pem(&pki.ca));
    let router = tonic::transport::Server::builder()
        .tls_config(tls)
        .expect("tls")
        .add_service(
            DistributionService::new(hub, Arc::new(Mutex::new(FlowStore::new(1000))))
                .with_client_policy(clients)
                .into_server(),
        );
    tokio::spawn(
        router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

async fn connect(
    addr: std::net::SocketAddr,
    pki: &Pki,
    cert: &str,
) -> DistributionClient<tonic::transport::Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .identity(pki.clients[cert].clone())
        .domain_name("bulkhead-controller");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("connect");
    DistributionClient::new(channel)
}

/// Follows `node` with `cert` (and `token`): Ok once the snapshot arrived, else the refusal.
async fn follow(
    addr: std::net::SocketAddr,
    pki: &Pki,
    cert: &str,
    token: Option<&str>,
    node: &str,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(Follower::new(node).hello()).await.expect("hello");
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(t) = token {
        request
            .metadata_mut()
            .insert("authorization", bearer_value(t).expect("token"));
    }
    let mut inbound = connect(addr, pki, cert)
        .await
        .sync(request)
        .await?
        .into_inner();
    match tokio::time::timeout(Duration::from_secs(5), inbound.message()).await {
        Ok(Ok(Some(_))) => Ok(()),
        Ok(Err(e)) => Err(e),
        other => panic!("{node}: no snapshot and no refusal: {other:?}"),
    }
}

async fn report(
    addr: std::net::SocketAddr,
    pki: &Pki,
    token: Option<&str>,
    node: &str,
) -> Result<u64, tonic::Status> {
    let batch = pb::FlowBatch {
        node: node.into(),
        records: vec![],
        dropped: 1,
    };
    let mut request = tonic::Request::new(tokio_stream::iter(vec![batch]));
    if let Some(t) = token {
        request
            .metadata_mut()
            .insert("authorization", bearer_value(t).expect("token"));
    }
    connect(addr, pki, "bulkhead-agent")
        .await
        .report_flows(request)
        .await
        .map(|r| r.into_inner().accepted)
}

#[tokio::test]
async fn a_shared_agent_certificate_speaks_only_for_the_node_of_its_token() {
    let pki = pki();
    let (client, _api, _task) = mock_client(Api::default());
    let addr = serve_tls(
        &pki,
        ClientPolicy {
            agent_tokens: Some(review(client)),
            ..ClientPolicy::default()
        },
    )
    .await;
    let code = |r: Result<(), tonic::Status>| r.err().map(|e| e.code());
    // The shared certificate alone no longer suffices.
    let e = follow(addr, &pki, "bulkhead-agent", None, "n1")
        .await
        .expect_err("no token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("--token-file"), "{}", e.message());
    // A token of the agent on n1 follows n1, and nothing else.
    assert_eq!(
        code(follow(addr, &pki, "bulkhead-agent", Some("tok-pod-on-n1"), "n1").await),
        None
    );
    let e = follow(addr, &pki, "bulkhead-agent", Some("tok-pod-on-n1"), "n2")
        .await
        .expect_err("other node");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("\"n1\""), "{}", e.message());
    assert_eq!(
        code(follow(addr, &pki, "bulkhead-agent", Some("tok-node-n2"), "n2").await),
        None
    );
    // Tokens of other service accounts, of replaced pods, or made up: refused.
    for bad in ["tok-other-sa", "tok-replaced-pod", "made-up"] {
        assert_eq!(
            code(follow(addr, &pki, "bulkhead-agent", Some(bad), "n1").await),
            Some(tonic::Code::Unauthenticated),
            "{bad}"
        );
    }
    // A node's own certificate needs no token, for its own node only.
    assert_eq!(code(follow(addr, &pki, "n1", None, "n1").await), None);
    assert_eq!(
        code(follow(addr, &pki, "n1", Some("tok-node-n2"), "n2").await),
        Some(tonic::Code::PermissionDenied)
    );
    // Flow reports likewise.
    assert!(
        report(addr, &pki, Some("tok-pod-on-n1"), "n1")
            .await
            .is_ok()
    );
    assert_eq!(
        report(addr, &pki, Some("tok-pod-on-n1"), "n2")
            .await
            .expect_err("other node")
            .code(),
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        report(addr, &pki, None, "n1")
            .await
            .expect_err("no token")
            .code(),
        tonic::Code::Unauthenticated
    );
}
