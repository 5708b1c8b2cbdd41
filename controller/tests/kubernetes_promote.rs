//! `bulkhead policy promote --kubernetes` (`kubernetes::promote`) against kube's tower-test mock
//! API server: the enforced object is server-side applied from the staged spec, then the staged
//! object deleted with its uid and resourceVersion as preconditions; a staged object changed in
//! between is kept and said so; an audit-mode ServicePolicy is switched to Enforce at the
//! version read.

use std::collections::BTreeMap;

use bulkhead_controller::kubernetes::promote::{PromoteError, StagedRef, promote};
use http::{Request, Response};
use serde_json::{Value, json};

mod k8s_mock;
use k8s_mock::{MockBody, Respond, cnp_discovery, full, mock_client};

/// Objects by request path; every request recorded as (method, path, query, body).
#[derive(Default)]
struct ApiServer {
    objects: BTreeMap<String, Value>,
    requests: Vec<(String, String, String, Value)>,
    /// Deletes answer 409 (the precondition failed).
    conflict_on_delete: bool,
    /// The versions of `policy.networking.k8s.io` serving ClusterNetworkPolicy (discovery).
    cnp_served: Vec<&'static str>,
}

fn reply(code: u16, v: &Value) -> Response<MockBody> {
    Response::builder()
        .status(code)
        .body(full(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

fn status(code: u16, reason: &str) -> Response<MockBody> {
    reply(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason}),
    )
}

impl Respond for ApiServer {
    fn respond(&mut self, req: Request<Vec<u8>>) -> Response<MockBody> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or_default().to_string();
        let method = req.method().to_string();
        let body: Value = serde_json::from_slice(req.body()).unwrap_or(Value::Null);
        self.requests
            .push((method.clone(), path.clone(), query, body.clone()));
        if method == "GET"
            && let Some(answer) = cnp_discovery(&path, &self.cnp_served)
        {
            return answer;
        }
        match method.as_str() {
            "GET" => match self.objects.get(&path) {
                Some(o) => reply(200, o),
                None => status(404, "NotFound"),
            },
            "PATCH" => {
                let mut o = self.objects.get(&path).cloned().unwrap_or(json!({}));
                merge(&mut o, &body);
                self.objects.insert(path, o.clone());
                reply(200, &o)
            }
            "DELETE" if self.conflict_on_delete => status(409, "Conflict"),
            "DELETE" => match self.objects.remove(&path) {
                Some(o) => reply(200, &o),
                None => status(404, "NotFound"),
            },
            _ => status(405, "MethodNotAllowed"),
        }
    }
}

fn merge(into: &mut Value, patch: &Value) {
    match (into, patch) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b.clone(),
    }
}

const STAGED_NP: &str = "/apis/bulkhead.dev/v1alpha1/namespaces/shop/stagednetworkpolicies/db";
const NP: &str = "/apis/networking.k8s.io/v1/namespaces/shop/networkpolicies/db";

fn staged_np() -> Value {
    json!({
        "apiVersion": "bulkhead.dev/v1alpha1",
        "kind": "StagedNetworkPolicy",
        "metadata": {"name": "db", "namespace": "shop", "uid": "u-1", "resourceVersion": "41",
                     "labels": {"team": "data"}, "managedFields": [{"manager": "kubectl"}]},
        "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "api"}}}]}]}
    })
}

#[tokio::test]
async fn a_staged_network_policy_is_applied_as_the_network_policy_then_deleted() {
    let mut server = ApiServer::default();
    server.objects.insert(STAGED_NP.into(), staged_np());
    let (client, server, _task) = mock_client(server);
    let target = StagedRef::NetworkPolicy {
        namespace: "shop".into(),
        name: "db".into(),
    };
    let done = promote(client, &target).await.expect("promoted");
    assert_eq!(done.enforced, "NetworkPolicy shop/db");
    assert!(done.staged_deleted);
    let s = server.lock().unwrap();
    let methods: Vec<(&str, &str)> = s
        .requests
        .iter()
        .map(|(m, p, _, _)| (m.as_str(), p.as_str()))
        .collect();
    assert_eq!(
        methods,
        [("GET", STAGED_NP), ("PATCH", NP), ("DELETE", STAGED_NP)],
        "the enforced object first, the staged one after"
    );
    let (_, _, query, applied) = &s.requests[1];
    assert!(
        query.contains("fieldManager=bulkhead-promote") && query.contains("force=true"),
        "{query}"
    );
    assert_eq!(applied["kind"], "NetworkPolicy");
    assert_eq!(applied["apiVersion"], "networking.k8s.io/v1");
    assert_eq!(applied["metadata"]["labels"]["team"], "data");
    assert!(
        applied["metadata"].get("uid").is_none()
            && applied["metadata"].get("resourceVersion").is_none()
            && applied["metadata"].get("managedFields").is_none(),
        "nothing the API server owns: {applied}"
    );
    assert_eq!(applied["spec"], staged_np()["spec"]);
    let (_, _, _, delete) = &s.requests[2];
    assert_eq!(
        delete["preconditions"],
        json!({"uid": "u-1", "resourceVersion": "41"})
    );
    assert!(s.objects.contains_key(NP) && !s.objects.contains_key(STAGED_NP));
}

#[tokio::test]
async fn a_staged_object_edited_meanwhile_is_kept_and_a_missing_one_is_named() {
    let mut server = ApiServer {
        conflict_on_delete: true,
        ..ApiServer::default()
    };
    server.objects.insert(STAGED_NP.into(), staged_np());
    let (client, _server, _task) = mock_client(server);
    let target = StagedRef::NetworkPolicy {
        namespace: "shop".into(),
        name: "db".into(),
    };
    let err = promote(client.clone(), &target)
        .await
        .expect_err("conflict");
    assert!(matches!(err, PromoteError::StagedChanged { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("changed after it was read and was kept"),
        "{err}"
    );

    let other = StagedRef::ClusterNetworkPolicy {
        name: "nothing".into(),
    };
    let err = promote(client, &other).await.expect_err("missing");
    assert_eq!(
        err.to_string(),
        "there is no StagedClusterNetworkPolicy nothing"
    );
}

#[tokio::test]
async fn an_audit_service_policy_is_switched_to_enforce_at_the_version_read() {
    const SP: &str = "/apis/bulkhead.dev/v1alpha1/namespaces/shop/servicepolicies/api";
    let mut server = ApiServer::default();
    server.objects.insert(
        SP.into(),
        json!({
            "apiVersion": "bulkhead.dev/v1alpha1", "kind": "ServicePolicy",
            "metadata": {"name": "api", "namespace": "shop", "resourceVersion": "7"},
            "spec": {"mode": "Audit", "subject": {"serviceAccount": "api"}}
        }),
    );
    let (client, server, _task) = mock_client(server);
    let target = StagedRef::ServicePolicy {
        namespace: "shop".into(),
        name: "api".into(),
    };
    let done = promote(client.clone(), &target).await.expect("promoted");
    assert_eq!(
        (done.enforced.as_str(), done.staged_deleted),
        ("ServicePolicy shop/api", false)
    );
    {
        let s = server.lock().unwrap();
        let (m, _, _, patch) = &s.requests[1];
        assert_eq!(m, "PATCH");
        assert_eq!(
            *patch,
            json!({"metadata": {"resourceVersion": "7"}, "spec": {"mode": "Enforce"}})
        );
    }
    let err = promote(client, &target)
        .await
        .expect_err("enforced already");
    assert!(matches!(err, PromoteError::NotAudit(_)), "{err}");
}

/// The promoted ClusterNetworkPolicy is written at the version the cluster serves: v1beta1
/// where network-policy-api v0.3.0 serves both, v1alpha2 where only that is served; with
/// neither, nothing is written and the staged object stays.
#[tokio::test]
async fn a_staged_cluster_network_policy_is_applied_at_the_version_the_cluster_serves() {
    const STAGED: &str = "/apis/bulkhead.dev/v1alpha1/stagedclusternetworkpolicies/guard";
    let staged = json!({
        "apiVersion": "bulkhead.dev/v1alpha1", "kind": "StagedClusterNetworkPolicy",
        "metadata": {"name": "guard", "uid": "u-9", "resourceVersion": "12"},
        "spec": {"tier": "Admin", "priority": 3, "subject": {"namespaces": {}},
                 "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}
    });
    let target = StagedRef::ClusterNetworkPolicy {
        name: "guard".into(),
    };
    for (served, written) in [
        (&["v1beta1", "v1alpha2"][..], "v1beta1"),
        (&["v1alpha2"][..], "v1alpha2"),
    ] {
        let mut server = ApiServer {
            cnp_served: served.to_vec(),
            ..Default::default()
        };
        server.objects.insert(STAGED.into(), staged.clone());
        let (client, server, _task) = mock_client(server);
        let done = promote(client, &target).await.expect("promoted");
        assert_eq!(done.enforced, "ClusterNetworkPolicy guard");
        assert!(done.staged_deleted);
        let s = server.lock().unwrap();
        let cnp = format!("/apis/policy.networking.k8s.io/{written}/clusternetworkpolicies/guard");
        let (_, _, _, applied) = s
            .requests
            .iter()
            .find(|(m, p, _, _)| m == "PATCH" && *p == cnp)
            .unwrap_or_else(|| panic!("served {served:?}: no apply of {cnp} in {:?}", s.requests));
        assert_eq!(
            applied["apiVersion"],
            json!(format!("policy.networking.k8s.io/{written}"))
        );
        assert_eq!(
            (
                &applied["kind"],
                &applied["spec"]["tier"],
                &applied["spec"]["priority"]
            ),
            (&json!("ClusterNetworkPolicy"), &json!("Admin"), &json!(3))
        );
        assert!(
            !s.objects.contains_key(STAGED),
            "the staged object is deleted"
        );
    }
    let mut server = ApiServer::default();
    server.objects.insert(STAGED.into(), staged.clone());
    let (client, server, _task) = mock_client(server);
    let err = promote(client, &target).await.expect_err("no CNP API");
    assert!(
        matches!(err, PromoteError::NoClusterNetworkPolicyApi),
        "{err}"
    );
    assert!(
        err.to_string().contains("install network-policy-api"),
        "{err}"
    );
    let s = server.lock().unwrap();
    assert!(s.objects.contains_key(STAGED), "the staged object stays");
    assert!(!s.requests.iter().any(|(m, _, _, _)| m != "GET"));
}
