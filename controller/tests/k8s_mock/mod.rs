//! What the Kubernetes tests share: recorded API objects, response bodies, and a `kube::Client`
//! over kube's tower-test mock whose requests a test's fake API server answers.
#![allow(dead_code)]

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use tokio::sync::mpsc;

pub type MockBody = BoxBody<Bytes, Infallible>;

/// A recorded API response under `tests/fixtures/k8s`.
pub fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/k8s")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn full(body: impl Into<Bytes>) -> MockBody {
    http_body_util::Full::new(body.into()).boxed()
}

/// A response body that never ends (a watch nothing happens on).
pub fn pending() -> MockBody {
    BodyExt::boxed(StreamBody::new(futures::stream::pending::<
        Result<Frame<Bytes>, Infallible>,
    >()))
}

/// A watch response body that stays open and yields the event lines it is sent.
pub fn live(rx: mpsc::UnboundedReceiver<String>) -> MockBody {
    let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
        .map(|line| Ok::<_, Infallible>(Frame::data(Bytes::from(format!("{line}\n")))));
    BodyExt::boxed(StreamBody::new(stream))
}

/// A test's fake API server: answers one request (its body read in full).
pub trait Respond: Send + 'static {
    fn respond(&mut self, req: Request<Vec<u8>>) -> Response<MockBody>;
}

/// A client whose requests `server` answers, the server (to inspect what it was sent), and the
/// task that serves it.
pub fn mock_client<S: Respond>(
    server: S,
) -> (kube::Client, Arc<Mutex<S>>, tokio::task::JoinHandle<()>) {
    let (service, mut handle) =
        tower_test::mock::pair::<Request<kube::client::Body>, Response<MockBody>>();
    let server = Arc::new(Mutex::new(server));
    let task = tokio::spawn({
        let server = server.clone();
        async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default().to_vec();
                let req = Request::from_parts(parts, bytes);
                let resp = server.lock().unwrap().respond(req);
                send.send_response(resp);
            }
        }
    });
    (kube::Client::new(service, "default"), server, task)
}

/// Collection paths the Kubernetes source lists and watches, with the plural naming their
/// `<plural>.list.json` fixture.
#[allow(dead_code)]
pub const PATHS: [(&str, &str); 9] = [
    ("/api/v1/namespaces", "namespaces"),
    ("/api/v1/nodes", "nodes"),
    ("/api/v1/pods", "pods"),
    (
        "/apis/networking.k8s.io/v1/networkpolicies",
        "networkpolicies",
    ),
    (
        "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies",
        "clusternetworkpolicies",
    ),
    (
        "/apis/bulkhead.dev/v1alpha1/servicepolicies",
        "servicepolicies",
    ),
    ("/apis/bulkhead.dev/v1alpha1/quarantines", "quarantines"),
    (
        "/apis/bulkhead.dev/v1alpha1/stagednetworkpolicies",
        "stagednetworkpolicies",
    ),
    (
        "/apis/bulkhead.dev/v1alpha1/stagedclusternetworkpolicies",
        "stagedclusternetworkpolicies",
    ),
];
