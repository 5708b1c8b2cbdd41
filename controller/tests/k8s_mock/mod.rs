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
/// `<plural>.list.json` fixture. ClusterNetworkPolicies at both versions a cluster may serve
/// them at (the source watches the one [`cnp_discovery`] says is served).
#[allow(dead_code)]
pub const PATHS: [(&str, &str); 10] = [
    ("/api/v1/namespaces", "namespaces"),
    ("/api/v1/nodes", "nodes"),
    ("/api/v1/pods", "pods"),
    (
        "/apis/networking.k8s.io/v1/networkpolicies",
        "networkpolicies",
    ),
    (
        "/apis/policy.networking.k8s.io/v1beta1/clusternetworkpolicies",
        "clusternetworkpolicies",
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

/// Both versions of `policy.networking.k8s.io` that serve ClusterNetworkPolicy, as a cluster
/// with network-policy-api v0.3.0 serves them.
pub const CNP_VERSIONS: [&str; 2] = ["v1beta1", "v1alpha2"];

/// The API server's answer to the discovery of `/apis/policy.networking.k8s.io/<version>`
/// (the resources of one group version) when it serves ClusterNetworkPolicy at the versions
/// in `served`, and network-policy-api's v1alpha1 AdminNetworkPolicy (as older releases
/// install it); `None` for any other path.
pub fn cnp_discovery(path: &str, served: &[&str]) -> Option<Response<MockBody>> {
    let version = path.strip_prefix("/apis/policy.networking.k8s.io/")?;
    if version.contains('/') {
        return None;
    }
    let resource = |name: &str, kind: &str| {
        serde_json::json!({"name": name, "singularName": "", "namespaced": false, "kind": kind,
            "verbs": ["delete", "deletecollection", "get", "list", "patch", "create", "update", "watch"]})
    };
    let resources = if served.contains(&version) {
        vec![resource("clusternetworkpolicies", "ClusterNetworkPolicy")]
    } else if version == "v1alpha1" {
        // Served, but not for ClusterNetworkPolicy.
        vec![resource("adminnetworkpolicies", "AdminNetworkPolicy")]
    } else {
        // A group version nobody serves: the API server's plain-text 404, not a Status.
        return Some(
            Response::builder()
                .status(404)
                .header("content-type", "text/plain; charset=utf-8")
                .body(full("404 page not found\n"))
                .unwrap(),
        );
    };
    let list = serde_json::json!({"kind": "APIResourceList", "apiVersion": "v1",
        "groupVersion": format!("policy.networking.k8s.io/{version}"), "resources": resources});
    Some(
        Response::builder()
            .status(200)
            .body(full(list.to_string()))
            .unwrap(),
    )
}

/// Whether `path` is the ClusterNetworkPolicy collection at a version not in `served`.
pub fn unserved_cnp_path(path: &str, served: &[&str]) -> bool {
    path.strip_prefix("/apis/policy.networking.k8s.io/")
        .and_then(|rest| rest.strip_suffix("/clusternetworkpolicies"))
        .is_some_and(|version| !served.contains(&version))
}
