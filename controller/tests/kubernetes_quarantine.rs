//! The quarantine API in Kubernetes mode (`QuarantineControl::kubernetes`) against kube's
//! tower-test mock API server: a quarantine is a server-side apply of the Quarantine object,
//! which the Kubernetes source (running against the same mock, fed with the recorded fixtures
//! of `tests/fixtures/k8s/`) watches and brings to the hub; release deletes it; list maps the
//! API's QuarantineList.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulkhead_controller::distribution::quarantine::{QuarantineControl, QuarantineError};
use bulkhead_controller::distribution::{FlowStore, Hub};
use bulkhead_controller::kubernetes::{Gate, KubernetesSource, SourceOptions};
use bulkhead_controller::ruleset::{RuleKind, RuleSet};
use bulkhead_controller::{EngineConfig, PolicyEngine};
use bulkhead_proto::v1 as pb;
use http::{Request, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc;

mod k8s_mock;
use k8s_mock::{
    CNP_VERSIONS, MockBody, PATHS, Respond, cnp_discovery, fixture, full, live, mock_client,
    pending,
};

const QUARANTINES: &str = "/apis/bulkhead.dev/v1alpha1/quarantines";
const NAMESPACED_QUARANTINES: &str = "/apis/bulkhead.dev/v1alpha1/namespaces/";

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

/// A small API server: lists from the fixtures, watches held open, Quarantine objects stored
/// by server-side apply and deleted, each change sent on the Quarantine watch like the API
/// server does.
#[derive(Default)]
struct ApiServer {
    recorded: Vec<Recorded>,
    /// Quarantine objects by (namespace, name).
    quarantines: BTreeMap<(String, String), Value>,
    /// What a list of Quarantines answers instead of the stored objects.
    quarantine_list: Option<String>,
    /// A list of Quarantines is refused (RBAC without `list`).
    quarantine_list_forbidden: bool,
    /// The open Quarantine watch, if the source has one.
    quarantine_watch: Option<mpsc::UnboundedSender<String>>,
    quarantine_watch_body: Option<mpsc::UnboundedReceiver<String>>,
    /// While Some, watch events wait here instead of going out (a slow watch).
    held: Option<Vec<String>>,
    resource_version: u64,
}

fn reply(code: u16, v: &Value) -> Response<MockBody> {
    Response::builder()
        .status(code)
        .body(full(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "reason": "NotFound", "code": 404, "message": "not found"})
}

impl ApiServer {
    fn with_source_watch() -> ApiServer {
        let (tx, rx) = mpsc::unbounded_channel();
        ApiServer {
            quarantine_watch: Some(tx),
            quarantine_watch_body: Some(rx),
            resource_version: 7000,
            ..Default::default()
        }
    }

    fn watch_event(&mut self, kind: &str, object: &Value) {
        let event = json!({"type": kind, "object": object}).to_string();
        if let Some(held) = &mut self.held {
            held.push(event);
        } else if let Some(tx) = &self.quarantine_watch {
            let _ = tx.send(event);
        }
    }

    /// Sends the held watch events and stops holding.
    fn flush_watch(&mut self) {
        for event in self.held.take().unwrap_or_default() {
            if let Some(tx) = &self.quarantine_watch {
                let _ = tx.send(event);
            }
        }
    }

    fn respond(&mut self, req: Request<Vec<u8>>) -> Response<MockBody> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let method = req.method().to_string();
        let content_type = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body: Value = serde_json::from_slice(req.body()).unwrap_or(Value::Null);
        self.recorded.push(Recorded {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            content_type,
            body: body.clone(),
        });
        if method == "GET"
            && let Some(answer) = cnp_discovery(&path, &CNP_VERSIONS)
        {
            return answer;
        }
        if method == "GET"
            && let Some((_, plural)) = PATHS.iter().find(|(p, _)| *p == path)
        {
            if query.contains("watch=true") {
                if *plural == "quarantines"
                    && let Some(rx) = self.quarantine_watch_body.take()
                {
                    return Response::builder().status(200).body(live(rx)).unwrap();
                }
                return Response::builder().status(200).body(pending()).unwrap();
            }
            if *plural == "quarantines" {
                if self.quarantine_list_forbidden {
                    return reply(
                        403,
                        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                            "status": "Failure", "reason": "Forbidden", "code": 403,
                            "message": "quarantines.bulkhead.dev is forbidden: cannot list"}),
                    );
                }
                if let Some(list) = &self.quarantine_list {
                    return Response::builder()
                        .status(200)
                        .body(full(list.clone()))
                        .unwrap();
                }
                let items: Vec<Value> = self.quarantines.values().cloned().collect();
                return reply(
                    200,
                    &json!({"kind": "QuarantineList", "apiVersion": "bulkhead.dev/v1alpha1",
                        "metadata": {"resourceVersion": self.resource_version.to_string()},
                        "items": items}),
                );
            }
            let list = fixture(&format!("{plural}.list.json"));
            return Response::builder().status(200).body(full(list)).unwrap();
        }
        // One Quarantine: /apis/bulkhead.dev/v1alpha1/namespaces/NS/quarantines/NAME
        if let Some(rest) = path.strip_prefix(NAMESPACED_QUARANTINES)
            && let [namespace, "quarantines", name] = rest.split('/').collect::<Vec<_>>()[..]
        {
            let key = (namespace.to_string(), name.to_string());
            return match method.as_str() {
                "GET" => match self.quarantines.get(&key) {
                    Some(q) => reply(200, q),
                    None => reply(404, &not_found()),
                },
                "PATCH" => {
                    self.resource_version += 1;
                    let existed = self.quarantines.contains_key(&key);
                    let mut q = body;
                    q["metadata"]["uid"] = json!(format!("uid-{name}"));
                    q["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
                    q["metadata"]["generation"] = json!(1);
                    q["metadata"]["creationTimestamp"] = json!("2026-11-29T22:00:00Z");
                    self.quarantines.insert(key, q.clone());
                    self.watch_event(if existed { "MODIFIED" } else { "ADDED" }, &q);
                    reply(200, &q)
                }
                "DELETE" => match self.quarantines.remove(&key) {
                    Some(mut q) => {
                        self.resource_version += 1;
                        q["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
                        self.watch_event("DELETED", &q);
                        reply(
                            200,
                            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                                "status": "Success", "details": {"name": name,
                                "group": "bulkhead.dev", "kind": "quarantines"}}),
                        )
                    }
                    None => reply(404, &not_found()),
                },
                _ => reply(404, &not_found()),
            };
        }
        // Other writes (status by server-side apply, Events): answered with what was sent.
        reply(if method == "POST" { 201 } else { 200 }, &body)
    }
}

struct Harness {
    server: Arc<Mutex<ApiServer>>,
    hub: Arc<Hub>,
    control: Arc<QuarantineControl>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Harness {
    fn recorded(&self) -> Vec<Recorded> {
        self.server.lock().unwrap().recorded.clone()
    }

    fn writes(&self, method: &str, path_part: &str) -> Vec<Recorded> {
        self.recorded()
            .into_iter()
            .filter(|r| r.method == method && r.path.contains(path_part))
            .collect()
    }

    async fn quarantine(&self, r: pb::QuarantineRequest) -> Result<pb::QuarantineResponse, String> {
        let control = self.control.clone();
        tokio::task::spawn_blocking(move || control.quarantine(r).map_err(|e| e.to_string()))
            .await
            .unwrap()
    }

    async fn release(&self, r: pb::ReleaseRequest) -> Result<pb::QuarantineResponse, String> {
        let control = self.control.clone();
        tokio::task::spawn_blocking(move || control.release(r).map_err(|e| e.to_string()))
            .await
            .unwrap()
    }

    async fn list(&self) -> Vec<pb::QuarantineInfo> {
        let control = self.control.clone();
        tokio::task::spawn_blocking(move || control.list())
            .await
            .unwrap()
            .expect("list")
    }
}

fn control(client: kube::Client, hub: Arc<Hub>) -> Arc<QuarantineControl> {
    Arc::new(
        QuarantineControl::kubernetes(
            client,
            tokio::runtime::Handle::current(),
            "bulkhead-controller-0",
            hub,
            Arc::new(Mutex::new(FlowStore::new(100))),
        )
        .with_wait(Duration::from_secs(5)),
    )
}

/// The Kubernetes source runs against the mock and feeds the hub, as in the controller.
async fn with_source() -> Harness {
    let (client, server, server_task) = mock_client(ApiServer::with_source_watch());
    let hub = Arc::new(Hub::new(PolicyEngine::empty(EngineConfig::default())));
    let gate = Arc::new(Gate::new(None));
    let source = KubernetesSource::new(
        client.clone(),
        hub.clone(),
        gate.clone(),
        SourceOptions {
            identity: "bulkhead-controller-0".into(),
            status_interval: Duration::from_millis(100),
            ..Default::default()
        },
    );
    let source_task = tokio::spawn(source.run());
    for _ in 0..400 {
        if gate.synced() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(gate.synced(), "the source listed the cluster");
    Harness {
        server,
        control: control(client, hub.clone()),
        hub,
        tasks: vec![server_task, source_task],
    }
}

/// No source: a hub with no pods, and the mock alone.
fn without_source(server: ApiServer) -> Harness {
    let (client, server, server_task) = mock_client(server);
    let hub = Arc::new(Hub::new(PolicyEngine::empty(EngineConfig::default())));
    Harness {
        server,
        control: control(client, hub.clone()),
        hub,
        tasks: vec![server_task],
    }
}

fn has_quarantine(rs: &RuleSet, name: &str) -> bool {
    rs.rules
        .values()
        .any(|r| r.kind == RuleKind::Quarantine && r.name == name)
}

const POD: &str = "frontend-7d9f8c6b5-x2x9k";
const NAME: &str = "quarantine-frontend-7d9f8c6b5-x2x9k";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_applies_the_object_and_returns_once_the_hub_has_it_release_deletes_it() {
    let h = with_source().await;
    assert!(!has_quarantine(&h.hub.ruleset("node-a").unwrap(), NAME));

    let resp = h
        .quarantine(pb::QuarantineRequest {
            namespace: "shop".into(),
            pod: POD.into(),
            reason: "crypto miner".into(),
            actor: "alice".into(),
            duration_seconds: 3600,
            allow: vec![pb::QuarantineAllow {
                namespace: "security".into(),
                labels: [("app".to_string(), "forensics".to_string())].into(),
                port: 22,
                protocol: "tcp".into(),
                ..Default::default()
            }],
        })
        .await
        .expect("quarantined");

    // One server-side apply of the object, in the pod's namespace.
    let path = format!("{NAMESPACED_QUARANTINES}shop/quarantines/{NAME}");
    let patches: Vec<_> = h
        .writes("PATCH", "/quarantines/")
        .into_iter()
        .filter(|r| !r.path.ends_with("/status"))
        .collect();
    assert_eq!(patches.len(), 1, "{patches:#?}");
    let patch = &patches[0];
    assert_eq!(patch.path, path);
    assert_eq!(patch.content_type, "application/apply-patch+yaml");
    assert!(
        patch.query.contains("fieldManager=bulkhead-controller"),
        "{}",
        patch.query
    );
    assert!(patch.query.contains("force=true"), "{}", patch.query);
    let body = &patch.body;
    assert_eq!(body["apiVersion"], "bulkhead.dev/v1alpha1");
    assert_eq!(body["kind"], "Quarantine");
    assert_eq!(body["metadata"]["name"], NAME);
    assert_eq!(body["metadata"]["namespace"], "shop");
    assert_eq!(
        body["metadata"]["annotations"]["bulkhead.dev/quarantined-by"],
        "alice"
    );
    assert!(
        body["metadata"]["annotations"]["bulkhead.dev/quarantined-at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    let spec = &body["spec"];
    assert_eq!(spec["pods"], json!([POD]));
    assert_eq!(spec["reason"], "crypto miner");
    assert_eq!(
        spec["allow"],
        json!([{
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "security"}},
            "podSelector": {"matchLabels": {"app": "forensics"}},
            "ports": [{"port": 22, "protocol": "TCP"}],
        }])
    );
    let expires = spec["expiresAt"].as_str().expect("expiresAt");
    assert_eq!(resp.quarantine.as_ref().unwrap().expires_at, expires);

    // It returned once the hub had it, with every node's current version.
    let node_a = h.hub.ruleset("node-a").unwrap();
    assert!(has_quarantine(&node_a, NAME));
    let nodes: BTreeMap<String, u64> = resp.nodes.clone().into_iter().collect();
    assert_eq!(nodes.get("node-a"), Some(&node_a.version));
    assert!(nodes.contains_key("node-b"), "{nodes:?}");
    let info = resp.quarantine.unwrap();
    assert_eq!(
        (
            info.namespace.as_str(),
            info.pod.as_str(),
            info.name.as_str()
        ),
        ("shop", POD, NAME)
    );
    assert_eq!(info.actor, "alice");

    // An Event on the object says who quarantined it and why.
    let events = h.writes("POST", "/events");
    let event = events
        .iter()
        .find(|e| e.body["reason"] == "Quarantined")
        .unwrap_or_else(|| panic!("a Quarantined Event: {events:#?}"));
    assert_eq!(event.body["regarding"]["name"], NAME);
    assert_eq!(event.body["regarding"]["kind"], "Quarantine");
    assert!(
        event.body["note"]
            .as_str()
            .is_some_and(|n| n.contains("alice") && n.contains("crypto miner"))
    );

    // list reads the objects back from the API.
    let list = h.list().await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, NAME);
    assert_eq!(list[0].reason, "crypto miner");
    assert_eq!(list[0].actor, "alice");

    // Release deletes the object and returns once the hub no longer has it.
    let resp = h
        .release(pb::ReleaseRequest {
            namespace: "shop".into(),
            pod: POD.into(),
            actor: "bob".into(),
        })
        .await
        .expect("released");
    let deletes = h.writes("DELETE", "/quarantines/");
    assert_eq!(deletes.len(), 1);
    assert_eq!(deletes[0].path, path);
    assert!(!has_quarantine(&h.hub.ruleset("node-a").unwrap(), NAME));
    let info = resp.quarantine.unwrap();
    assert_eq!((info.name.as_str(), info.actor.as_str()), (NAME, "bob"));
    assert!(resp.nodes.iter().any(|(n, _)| n == "node-a"));
    assert!(
        h.writes("POST", "/events")
            .iter()
            .any(|e| e.body["reason"] == "Released")
    );

    // Nothing left to release.
    let again = h
        .release(pb::ReleaseRequest {
            namespace: "shop".into(),
            pod: POD.into(),
            actor: "bob".into(),
        })
        .await
        .unwrap_err();
    assert!(again.contains("is not quarantined"), "{again}");
    assert_eq!(h.writes("DELETE", "/quarantines/").len(), 1);
}

/// Quarantining a pod again with a new reason and new exceptions returns only once the hub has
/// the new version, not as soon as it sees a Quarantine of that name (which it already has).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requarantine_returns_once_the_hub_has_the_new_spec() {
    let h = with_source().await;
    let request = |reason: &str, port: u32| pb::QuarantineRequest {
        namespace: "shop".into(),
        pod: POD.into(),
        reason: reason.into(),
        actor: "alice".into(),
        allow: vec![pb::QuarantineAllow {
            namespace: "security".into(),
            port,
            ..Default::default()
        }],
        ..Default::default()
    };
    h.quarantine(request("first look", 22))
        .await
        .expect("quarantined");
    let key = bulkhead_controller::PolicyKey {
        kind: RuleKind::Quarantine,
        namespace: "shop".into(),
        name: NAME.into(),
    };
    let reason = |h: &Harness| {
        h.hub
            .quarantine(&key)
            .and_then(|p| p.quarantine)
            .map(|q| q.reason)
    };
    assert_eq!(reason(&h).as_deref(), Some("first look"));

    // The watch is slow to deliver the update: the call must still be waiting.
    h.server.lock().unwrap().held = Some(Vec::new());
    let control = h.control.clone();
    let again = tokio::task::spawn_blocking(move || control.quarantine(request("forensics", 2222)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !again.is_finished(),
        "returned before the hub had the new version"
    );
    assert_eq!(reason(&h).as_deref(), Some("first look"));
    h.server.lock().unwrap().flush_watch();
    let resp = again.await.unwrap().expect("quarantined again");
    assert_eq!(reason(&h).as_deref(), Some("forensics"));
    let rules = h.hub.ruleset("node-a").unwrap();
    assert!(has_quarantine(&rules, NAME));
    assert_eq!(resp.quarantine.unwrap().reason, "forensics");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_maps_the_api_quarantine_list() {
    // The recorded object's expiry is long past now, and an expired quarantine is not listed
    // (issue 21, finding 8; see below): moved a century on, so that it is listed here.
    let recorded = fixture("quarantines.recorded.list.json")
        .replace("\"2026-11-29T23:00:00Z\"", "\"2126-11-29T23:00:00Z\"");
    let h = without_source(ApiServer {
        quarantine_list: Some(recorded),
        ..Default::default()
    });
    let list = h.list().await;
    let requests = h.recorded();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].method, "GET");
    assert_eq!(requests[0].path, QUARANTINES, "every namespace");
    assert_eq!(
        list,
        vec![
            pb::QuarantineInfo {
                namespace: "payments".into(),
                pod: String::new(),
                name: "db-exfil".into(),
                reason: "data exfiltration".into(),
                ..Default::default()
            },
            pb::QuarantineInfo {
                namespace: "shop".into(),
                pod: POD.into(),
                name: NAME.into(),
                reason: "crypto miner".into(),
                created_at: "2026-11-29T21:00:00Z".into(),
                expires_at: "2126-11-29T23:00:00Z".into(),
                actor: "alice".into(),
                // From the status the controller wrote on the object.
                connections_cut: 3,
                ..Default::default()
            },
        ]
    );
}

/// Issue 21, finding 8: an expired Quarantine object stays in the API (its status says
/// Expired) but is no longer listed, so neither `/api/quarantines` nor the map shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_leaves_out_quarantines_whose_expiry_passed() {
    let item = |name: &str, expires: Option<&str>| {
        let mut spec = json!({"pods": [name], "reason": "test"});
        if let Some(t) = expires {
            spec["expiresAt"] = json!(t);
        }
        json!({"apiVersion": "bulkhead.dev/v1alpha1", "kind": "Quarantine",
            "metadata": {"name": format!("quarantine-{name}"), "namespace": "shop",
                "uid": name, "resourceVersion": "8", "generation": 1},
            "spec": spec})
    };
    let list = json!({"kind": "QuarantineList", "apiVersion": "bulkhead.dev/v1alpha1",
    "metadata": {"resourceVersion": "9"},
    "items": [
        item("expired", Some("2020-01-01T00:00:00Z")),
        item("before-1970", Some("0001-01-01T00:00:00Z")),
        item("later", Some("2999-01-01T00:00:00Z")),
        item("until-released", None),
    ]});
    let h = without_source(ApiServer {
        quarantine_list: Some(list.to_string()),
        ..Default::default()
    });
    let pods: Vec<String> = h.list().await.into_iter().map(|q| q.pod).collect();
    assert_eq!(pods, ["later", "until-released"]);
}

/// Issue 21, finding 7: a Quarantine with `expiresAt: 0001-01-01T00:00:00Z` passes the CRD
/// schema and the loader. Formatting it for its status panicked and the status writer never
/// ran again: no status, no Event, for any policy. Now it gets its `Expired` status, one
/// `Expired` Event (the audit of the expiry), and the objects after it get theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_that_expired_before_1970_gets_its_status_and_one_expiry_event() {
    let h = with_source().await;
    let object = |name: &str, expires: &str| {
        json!({"apiVersion": "bulkhead.dev/v1alpha1", "kind": "Quarantine",
            "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                "resourceVersion": "9001", "generation": 1},
            "spec": {"pods": [POD], "reason": "zero time", "expiresAt": expires}})
    };
    let status_of = |h: &Harness, name: &str| -> Option<Value> {
        h.writes("PATCH", &format!("/quarantines/{name}/status"))
            .last()
            .map(|r| r.body["status"].clone())
    };
    {
        let mut server = h.server.lock().unwrap();
        server.watch_event("ADDED", &object("zero", "0001-01-01T00:00:00Z"));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while status_of(&h, "zero").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "no status written for the Quarantine that expired before 1970"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let status = status_of(&h, "zero").unwrap();
    let realized = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Realized")
        .cloned()
        .unwrap();
    assert_eq!(realized["reason"], "Expired", "{status}");
    assert!(
        realized["message"]
            .as_str()
            .unwrap()
            .starts_with("expired at 0001-01-01T00:00:00Z"),
        "{realized}"
    );
    // The writer lives on: a later object gets its status too.
    {
        let mut server = h.server.lock().unwrap();
        server.watch_event("ADDED", &object("later", "2999-01-01T00:00:00Z"));
    }
    while status_of(&h, "later").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the status writer stopped after the Quarantine that expired before 1970"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Several more status rounds (every 100 ms here): the expiry was announced once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let expired_events: Vec<_> = h
        .writes("POST", "/events")
        .into_iter()
        .filter(|r| r.body["reason"] == "Expired")
        .collect();
    assert_eq!(expired_events.len(), 1, "{expired_events:#?}");
    assert_eq!(expired_events[0].body["regarding"]["name"], "zero");
    assert!(
        !has_quarantine(&h.hub.ruleset("node-a").unwrap(), "zero"),
        "not enforced"
    );
}

/// A Quarantine written with kubectl (this controller never carried it) shows where and when it
/// took effect from the status the controller wrote on the object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_reports_enforcement_from_the_objects_status() {
    let list = json!({"kind": "QuarantineList", "apiVersion": "bulkhead.dev/v1alpha1",
    "metadata": {"resourceVersion": "9"},
    "items": [{
        "apiVersion": "bulkhead.dev/v1alpha1", "kind": "Quarantine",
        "metadata": {"name": "by-hand", "namespace": "shop", "uid": "u1",
            "resourceVersion": "8", "generation": 1},
        "spec": {"pods": [POD], "reason": "kubectl"},
        "status": {"enforcedAt": {"node-a": "2026-11-30T00:00:01.250Z"},
            "connectionsCut": 3, "nodes": 2, "realizedNodes": 1}
    }]});
    let h = without_source(ApiServer {
        quarantine_list: Some(list.to_string()),
        ..Default::default()
    });
    let list = h.list().await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, "by-hand");
    assert_eq!(
        list[0].enforced_at.get("node-a").map(String::as_str),
        Some("2026-11-30T00:00:01.250Z")
    );
    assert_eq!(list[0].connections_cut, 3);
}

/// An API error is an error, not an empty list that would read as "nothing is quarantined".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_the_api_refuses_is_an_error() {
    let h = without_source(ApiServer {
        quarantine_list_forbidden: true,
        ..Default::default()
    });
    let control = h.control.clone();
    let err = tokio::task::spawn_blocking(move || control.list())
        .await
        .unwrap()
        .expect_err("a refused list");
    assert!(matches!(err, QuarantineError::Kubernetes(_)), "{err:?}");
    assert!(err.to_string().contains("forbidden"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_pod_is_refused_without_any_api_call() {
    let h = without_source(ApiServer::default());
    let control = h.control.clone();
    let err = tokio::task::spawn_blocking(move || {
        control.quarantine(pb::QuarantineRequest {
            namespace: "shop".into(),
            pod: "ghost".into(),
            reason: "crypto miner".into(),
            actor: "alice".into(),
            ..Default::default()
        })
    })
    .await
    .unwrap()
    .unwrap_err();
    assert!(
        matches!(err, QuarantineError::NoPod(ref p) if p == "shop/ghost"),
        "{err}"
    );
    assert!(h.recorded().is_empty(), "{:#?}", h.recorded());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_watch_never_brings_is_a_timeout_that_says_so() {
    // The source lists the pods but its Quarantine watch never delivers the object.
    let h = with_source().await;
    h.server.lock().unwrap().quarantine_watch = None;
    let control = Arc::new(
        QuarantineControl::kubernetes(
            kube_client_of(&h),
            tokio::runtime::Handle::current(),
            "bulkhead-controller-0",
            h.hub.clone(),
            Arc::new(Mutex::new(FlowStore::new(100))),
        )
        .with_wait(Duration::from_millis(300)),
    );
    let err = tokio::task::spawn_blocking(move || {
        control.quarantine(pb::QuarantineRequest {
            namespace: "shop".into(),
            pod: POD.into(),
            reason: "crypto miner".into(),
            actor: "alice".into(),
            ..Default::default()
        })
    })
    .await
    .unwrap()
    .unwrap_err();
    assert!(matches!(err, QuarantineError::NotSeen(_)), "{err}");
    assert!(
        err.to_string()
            .contains("written to the Kubernetes API but not yet seen"),
        "{err}"
    );
}

/// A second client on the harness's mock server (the first is inside the control).
fn kube_client_of(h: &Harness) -> kube::Client {
    let server = h.server.clone();
    let (service, mut handle) =
        tower_test::mock::pair::<Request<kube::client::Body>, Response<MockBody>>();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default().to_vec();
            let req = Request::from_parts(parts, bytes);
            let resp = server.lock().unwrap().respond(req);
            send.send_response(resp);
        }
    });
    kube::Client::new(service, "default")
}

impl Respond for ApiServer {
    fn respond(&mut self, req: Request<Vec<u8>>) -> Response<MockBody> {
        ApiServer::respond(self, req)
    }
}
