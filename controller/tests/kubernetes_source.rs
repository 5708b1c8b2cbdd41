//! The controller's Kubernetes source against kube's tower-test mock API server, fed with
//! recorded API objects (`tests/fixtures/k8s/`: list responses and watch event lines in the
//! JSON an API server sends, with managedFields and resourceVersions).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulkhead_controller::distribution::Hub;
use bulkhead_controller::kubernetes::{Gate, KubernetesSource, SourceOptions, SourceStats};
use bulkhead_controller::ruleset::{RuleKind, RuleSet};
use bulkhead_controller::{EngineConfig, PolicyEngine};
use http::{Request, Response, StatusCode};
use serde_json::Value;
use tokio::sync::mpsc;

mod k8s_mock;
use k8s_mock::{
    CNP_VERSIONS, MockBody, PATHS, Respond, cnp_discovery, fixture, full, live, mock_client,
    pending, unserved_cnp_path,
};

fn fixture_lines(name: &str) -> Vec<String> {
    fixture(name).lines().map(str::to_string).collect()
}

enum WatchPlan {
    /// These event lines, then the response ends (the watcher watches again).
    Lines(Vec<String>),
    /// Lines as the test sends them; open until the sender is dropped.
    Live(mpsc::UnboundedReceiver<String>),
    /// The API server fails the request (e.g. 500 while it restarts).
    Fail(u16),
}

#[derive(Default)]
struct Resource {
    /// List responses in order; the last one is repeated.
    lists: VecDeque<String>,
    watches: VecDeque<WatchPlan>,
    not_found: bool,
}

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

#[derive(Default)]
struct ApiServer {
    resources: BTreeMap<&'static str, Resource>,
    recorded: Vec<Recorded>,
    /// The leader Lease, as created and updated by the controller.
    lease: Option<Value>,
    /// The versions ClusterNetworkPolicy is served at (discovery, and its collection paths).
    cnp_served: Vec<&'static str>,
    /// Discovery requests answered 503 before the API server answers them.
    discovery_failures: usize,
}

impl ApiServer {
    /// Every resource listed from its `<plural>.list.json` fixture, watches held open.
    fn from_fixtures() -> ApiServer {
        let mut s = ApiServer {
            cnp_served: CNP_VERSIONS.to_vec(),
            ..Default::default()
        };
        for (_, plural) in PATHS {
            s.resources.insert(
                plural,
                Resource {
                    lists: VecDeque::from([fixture(&format!("{plural}.list.json"))]),
                    ..Default::default()
                },
            );
        }
        s
    }

    fn resource(&mut self, plural: &str) -> &mut Resource {
        self.resources.get_mut(plural).expect("known resource")
    }

    fn respond(&mut self, req: Request<Vec<u8>>) -> Response<MockBody> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let method = req.method().to_string();
        if path.contains("/leases") {
            return self.lease(req);
        }
        if method == "GET"
            && let Some(answer) = cnp_discovery(&path, &self.cnp_served)
        {
            self.recorded.push(Recorded {
                method,
                path,
                query,
                content_type: String::new(),
                body: Value::Null,
            });
            if self.discovery_failures > 0 {
                self.discovery_failures -= 1;
                return Response::builder()
                    .status(503)
                    .body(full(r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"the server is currently unable to handle the request","reason":"ServiceUnavailable","code":503}"#))
                    .unwrap();
            }
            return answer;
        }
        if let Some((_, plural)) = PATHS.iter().find(|(p, _)| *p == path)
            && method == "GET"
        {
            if self.resource(plural).not_found || unserved_cnp_path(&path, &self.cnp_served) {
                self.recorded.push(Recorded {
                    method,
                    path,
                    query,
                    content_type: String::new(),
                    body: Value::Null,
                });
                return Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .body(full(r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"the server could not find the requested resource","reason":"NotFound","details":{},"code":404}"#))
                    .unwrap();
            }
            let r = self.resource(plural);
            if query.contains("watch=true") {
                if let Some(WatchPlan::Fail(code)) = r.watches.front() {
                    let code = *code;
                    r.watches.pop_front();
                    return Response::builder()
                        .status(code)
                        .body(full(format!(r#"{{"kind":"Status","apiVersion":"v1","metadata":{{}},"status":"Failure","message":"etcdserver: leader changed","reason":"InternalError","code":{code}}}"#)))
                        .unwrap();
                }
                let body = match r.watches.pop_front() {
                    Some(WatchPlan::Lines(lines)) => {
                        full(lines.into_iter().map(|l| l + "\n").collect::<String>())
                    }
                    Some(WatchPlan::Live(rx)) => live(rx),
                    Some(WatchPlan::Fail(_)) => unreachable!("answered above"),
                    // Nothing more to say: keep the watch open.
                    None => pending(),
                };
                return Response::builder().status(200).body(body).unwrap();
            }
            let list = if r.lists.len() > 1 {
                r.lists.pop_front().unwrap()
            } else {
                r.lists.front().cloned().unwrap_or_default()
            };
            self.recorded.push(Recorded {
                method,
                path,
                query,
                content_type: String::new(),
                body: Value::Null,
            });
            return Response::builder().status(200).body(full(list)).unwrap();
        }
        // Writes: status patches, Events. Recorded, and answered with the object sent.
        let content_type = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body: Value = serde_json::from_slice(req.body()).unwrap_or(Value::Null);
        self.recorded.push(Recorded {
            method: method.clone(),
            path,
            query,
            content_type,
            body: body.clone(),
        });
        let status = if method == "POST" { 201 } else { 200 };
        Response::builder()
            .status(status)
            .body(full(serde_json::to_vec(&body).unwrap()))
            .unwrap()
    }
}

struct Harness {
    server: Arc<Mutex<ApiServer>>,
    hub: Arc<Hub>,
    gate: Arc<Gate>,
    stats: Arc<SourceStats>,
    task: tokio::task::JoinHandle<()>,
    server_task: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
        self.server_task.abort();
    }
}

impl ApiServer {
    /// A Lease store with resourceVersion preconditions, like the API server's.
    fn lease(&mut self, req: Request<Vec<u8>>) -> Response<MockBody> {
        let method = req.method().to_string();
        let body: Value = serde_json::from_slice(req.body()).unwrap_or(Value::Null);
        self.recorded.push(Recorded {
            method: method.clone(),
            path: req.uri().path().to_string(),
            query: String::new(),
            content_type: req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
            body: body.clone(),
        });
        let reply = |code: u16, v: &Value| {
            Response::builder()
                .status(code)
                .body(full(serde_json::to_vec(v).unwrap()))
                .unwrap()
        };
        let not_found = serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": "NotFound", "code": 404});
        let stored = |mut v: Value, lease: &mut Option<Value>| {
            let rv = lease
                .as_ref()
                .and_then(|l| l["metadata"]["resourceVersion"].as_str())
                .and_then(|r| r.parse::<u64>().ok())
                .unwrap_or(0)
                + 1;
            v["metadata"]["resourceVersion"] = Value::String(rv.to_string());
            *lease = Some(v.clone());
            v
        };
        match (method.as_str(), &self.lease) {
            ("GET", None) => reply(404, &not_found),
            ("GET", Some(l)) => reply(200, l),
            ("POST", _) => {
                let v = stored(body, &mut self.lease);
                reply(201, &v)
            }
            ("PUT", _) => {
                let v = stored(body, &mut self.lease);
                reply(200, &v)
            }
            ("PATCH", Some(l)) => {
                let mut merged = l.clone();
                for (k, v) in body["spec"].as_object().cloned().unwrap_or_default() {
                    merged["spec"][k] = v;
                }
                let v = stored(merged, &mut self.lease);
                reply(200, &v)
            }
            _ => reply(404, &not_found),
        }
    }
}

fn start(server: ApiServer) -> Harness {
    let (client, server, server_task) = mock_client(server);
    let hub = Arc::new(Hub::new(PolicyEngine::empty(EngineConfig::default())));
    let gate = Arc::new(Gate::new(None));
    let source = KubernetesSource::new(
        client,
        hub.clone(),
        gate.clone(),
        SourceOptions {
            identity: "bulkhead-controller-0".into(),
            status_interval: Duration::from_millis(100),
            ..Default::default()
        },
    );
    let stats = source.stats();
    let task = tokio::spawn(source.run());
    Harness {
        server,
        hub,
        gate,
        stats,
        task,
        server_task,
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..600 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting until {what}");
}

fn has_policy(rs: &RuleSet, kind: RuleKind, name: &str) -> bool {
    rs.rules.values().any(|r| r.kind == kind && r.name == name)
}

impl Harness {
    fn ruleset(&self, node: &str) -> RuleSet {
        self.hub.ruleset(node).unwrap_or_default()
    }

    fn recorded(&self, method: &str, path_part: &str) -> Vec<Recorded> {
        self.server
            .lock()
            .unwrap()
            .recorded
            .iter()
            .filter(|r| r.method == method && r.path.contains(path_part))
            .cloned()
            .collect()
    }

    async fn wait_events(&self, at_least: u64) {
        let stats = self.stats.clone();
        // Handled, and the batch they were in applied with its counters.
        eventually("the watch events were handled", || {
            stats.settled.load(Ordering::SeqCst) >= at_least
        })
        .await;
    }
}

fn live_watch(server: &mut ApiServer, plural: &str) -> mpsc::UnboundedSender<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    server
        .resource(plural)
        .watches
        .push_back(WatchPlan::Live(rx));
    tx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_policy_added_through_watch_reaches_the_rule_set_and_noise_does_not_recompute() {
    let mut server = ApiServer::from_fixtures();
    let np_watch = live_watch(&mut server, "networkpolicies");
    let pod_watch = live_watch(&mut server, "pods");
    let h = start(server);
    let gate = h.gate.clone();
    eventually("the first list completed", || gate.synced()).await;
    assert!(gate.ready());

    let before = h.ruleset("node-b");
    assert_eq!(before.endpoints.len(), 2, "backend and db run on node-b");
    assert!(!has_policy(&before, RuleKind::NetworkPolicy, "db-ingress"));
    // The valid ServicePolicy of the list is in force.
    assert!(has_policy(
        &before,
        RuleKind::ServicePolicy,
        "db-admits-backend"
    ));

    let lines = fixture_lines("networkpolicy.watch.jsonl");
    // ADDED through the watch.
    let events = h.stats.events.load(Ordering::SeqCst);
    np_watch.send(lines[0].clone()).unwrap();
    let hub = h.hub.clone();
    eventually("the NetworkPolicy reached node-b's rule set", || {
        hub.ruleset("node-b")
            .is_some_and(|rs| has_policy(&rs, RuleKind::NetworkPolicy, "db-ingress"))
    })
    .await;
    h.wait_events(events + 1).await;
    let with_np = h.ruleset("node-b");
    assert!(with_np.version > before.version);
    // node-a has no pod the policy selects or admits by selector: no NetworkPolicy rule there.
    assert!(!has_policy(
        &h.ruleset("node-a"),
        RuleKind::NetworkPolicy,
        "db-ingress"
    ));

    // MODIFIED with only metadata noise (resourceVersion, managedFields, an annotation).
    let changes = h.stats.changes.load(Ordering::SeqCst);
    let applied = h.hub.counters.changes_applied.load(Ordering::SeqCst);
    let events = h.stats.events.load(Ordering::SeqCst);
    np_watch.send(lines[1].clone()).unwrap();
    // A pod whose status changes but not its identity (readiness flap, restart count).
    pod_watch
        .send(fixture_lines("pod.watch.jsonl")[0].clone())
        .unwrap();
    h.wait_events(events + 2).await;
    assert_eq!(
        h.stats.changes.load(Ordering::SeqCst),
        changes,
        "no recompute"
    );
    assert_eq!(
        h.hub.counters.changes_applied.load(Ordering::SeqCst),
        applied
    );
    assert_eq!(h.ruleset("node-b").version, with_np.version);

    // A real change (the port) is applied.
    let events = h.stats.events.load(Ordering::SeqCst);
    np_watch.send(lines[2].clone()).unwrap();
    h.wait_events(events + 1).await;
    assert!(
        h.ruleset("node-b").version > with_np.version,
        "the changed NetworkPolicy was applied"
    );
    assert_eq!(h.stats.changes.load(Ordering::SeqCst), changes + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_service_policy_gets_an_event_and_an_invalid_condition_others_still_apply() {
    let h = start(ApiServer::from_fixtures());
    let gate = h.gate.clone();
    eventually("the first list completed", || gate.synced()).await;
    // The valid policy applies although the other one is invalid.
    assert!(has_policy(
        &h.ruleset("node-b"),
        RuleKind::ServicePolicy,
        "db-admits-backend"
    ));
    assert!(!has_policy(
        &h.ruleset("node-b"),
        RuleKind::ServicePolicy,
        "broken"
    ));

    let server = h.server.clone();
    eventually("both statuses were written and the Event published", || {
        let s = server.lock().unwrap();
        let patches = s
            .recorded
            .iter()
            .filter(|r| r.method == "PATCH" && r.path.ends_with("/status"))
            .count();
        let events = s.recorded.iter().filter(|r| r.method == "POST").count();
        patches >= 2 && events >= 1
    })
    .await;

    // Status patches: server-side apply to the status subresource, as the API expects.
    let patches = h.recorded("PATCH", "/status");
    for p in &patches {
        assert_eq!(p.content_type, "application/apply-patch+yaml");
        assert!(
            p.query.contains("fieldManager=bulkhead-controller"),
            "{}",
            p.query
        );
        assert!(p.query.contains("force=true"), "{}", p.query);
        assert_eq!(p.body["apiVersion"], "bulkhead.dev/v1alpha1");
        assert_eq!(p.body["kind"], "ServicePolicy");
        assert_eq!(p.body["metadata"]["namespace"], "shop");
        assert!(p.body.get("spec").is_none(), "only the status is applied");
    }
    let broken = patches
        .iter()
        .find(|p| {
            p.path == "/apis/bulkhead.dev/v1alpha1/namespaces/shop/servicepolicies/broken/status"
        })
        .expect("a status patch for the invalid policy");
    let cond = |body: &Value, t: &str| -> Value {
        body["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == t)
            .cloned()
            .unwrap()
    };
    let accepted = cond(&broken.body, "Accepted");
    assert_eq!(accepted["status"], "False");
    assert_eq!(accepted["reason"], "Invalid");
    let message = accepted["message"].as_str().unwrap();
    assert!(
        message.contains("spec.egress[0].to[0]") && message.contains("exactly one"),
        "{message}"
    );
    assert_eq!(accepted["observedGeneration"], 3);
    assert_eq!(broken.body["status"]["observedGeneration"], 3);
    assert_eq!(cond(&broken.body, "Realized")["status"], "False");

    let good = patches
        .iter()
        .find(|p| {
            p.path
                .ends_with("/servicepolicies/db-admits-backend/status")
        })
        .expect("a status patch for the valid policy");
    assert_eq!(cond(&good.body, "Accepted")["status"], "True");
    let realized = cond(&good.body, "Realized");
    assert!(
        realized["message"].as_str().unwrap().contains("of 1 nodes"),
        "{realized}"
    );
    // No agent acked yet: pending.
    assert_eq!(realized["status"], "False");
    assert_eq!(realized["reason"], "Pending");

    // The Event: a Warning about the invalid object, from the controller.
    let events = h.recorded("POST", "/events");
    assert_eq!(
        events.len(),
        1,
        "one Event per problem, not one per status round"
    );
    let e = &events[0];
    assert_eq!(e.path, "/apis/events.k8s.io/v1/namespaces/shop/events");
    assert_eq!(e.body["type"], "Warning");
    assert_eq!(e.body["reason"], "Invalid");
    assert_eq!(e.body["regarding"]["kind"], "ServicePolicy");
    assert_eq!(e.body["regarding"]["name"], "broken");
    assert_eq!(e.body["regarding"]["uid"], "5e5e-0002");
    assert_eq!(e.body["reportingController"], "bulkhead-controller");
    assert_eq!(e.body["reportingInstance"], "bulkhead-controller-0");
    assert!(e.body["note"].as_str().unwrap().contains("exactly one"));

    // The agent acks: the valid policy's Realized condition turns True, the status is
    // rewritten once (unchanged statuses are not re-sent).
    let node = h.ruleset("node-b");
    h.hub.ack("node-b", h.hub.epoch(), node.version, None, 0);
    let server = h.server.clone();
    eventually("Realized turned True", || {
        server.lock().unwrap().recorded.iter().any(|r| {
            r.path.ends_with("/db-admits-backend/status")
                && cond(&r.body, "Realized")["status"] == "True"
        })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let n = h.recorded("PATCH", "/db-admits-backend/status").len();
    assert_eq!(n, 2, "written when it changed, not on every round");
    assert_eq!(h.recorded("POST", "/events").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_gone_410_relists_cleanly() {
    let mut server = ApiServer::from_fixtures();
    // The first NetworkPolicy watch says 410 Gone; the re-list has a policy created meanwhile.
    let np = server.resource("networkpolicies");
    np.watches
        .push_back(WatchPlan::Lines(fixture_lines("gone.watch.jsonl")));
    np.lists.push_back(fixture("networkpolicies.relist.json"));
    // The pod watch breaks too; the re-list no longer has the backend pod: it was deleted
    // while nobody watched.
    let pods = server.resource("pods");
    pods.watches
        .push_back(WatchPlan::Lines(fixture_lines("gone.watch.jsonl")));
    pods.lists.push_back(fixture("pods.relist.json"));
    // No ClusterNetworkPolicy API in this cluster: the source goes on without it.
    server.resource("clusternetworkpolicies").not_found = true;
    let h = start(server);
    let hub = h.hub.clone();
    eventually(
        "the re-list brought the NetworkPolicy and removed the backend pod",
        || {
            hub.ruleset("node-b").is_some_and(|rs| {
                has_policy(&rs, RuleKind::NetworkPolicy, "db-ingress") && rs.endpoints.len() == 1
            })
        },
    )
    .await;
    assert!(h.gate.synced());
    let eps = h.ruleset("node-b").endpoints;
    assert_eq!(eps[0].pod, "db-6b8d7f9c5-m4n5p");
    assert_eq!(
        eps[0].interface, None,
        "pods are found by route, no interface name needed"
    );
    assert!(h.stats.watch_errors.load(Ordering::SeqCst) >= 2);
    let np_lists = h
        .recorded("GET", "/apis/networking.k8s.io/v1/networkpolicies")
        .len();
    assert_eq!(np_lists, 2, "listed once, and once more after 410 Gone");
    // Nothing else was lost: frontend on node-a is still an endpoint.
    assert_eq!(h.ruleset("node-a").endpoints.len(), 1);
}

/// A list of one ClusterNetworkPolicy (Admin: deny all ingress to every pod) at `version`.
fn cnp_list(version: &str) -> String {
    let api_version = format!("policy.networking.k8s.io/{version}");
    serde_json::json!({"kind": "ClusterNetworkPolicyList", "apiVersion": api_version,
        "metadata": {"resourceVersion": "5300"},
        "items": [{"apiVersion": api_version, "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "deny-all-ingress", "uid": "c1", "resourceVersion": "5300",
                         "generation": 1, "creationTimestamp": "2026-12-01T10:00:00Z"},
            "spec": {"tier": "Admin", "priority": 5, "subject": {"namespaces": {}},
                     "ingress": [{"name": "deny", "action": "Deny",
                                  "from": [{"namespaces": {}}]}]}}]})
    .to_string()
}

/// network-policy-api v0.3.0 serves ClusterNetworkPolicy at v1beta1 (its storage version) and
/// still at v1alpha2; older releases serve only v1alpha2. The source asks the API server which
/// it serves (discovery, retried while it fails) and watches that version, v1beta1 when both
/// are: the policies are enforced either way, and nothing is asked of a version not served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_network_policies_are_watched_at_the_version_the_cluster_serves() {
    let cases: [(&[&'static str], &str, usize); 3] = [
        (&["v1beta1"], "v1beta1", 0),
        (&["v1alpha2"], "v1alpha2", 0),
        (&["v1beta1", "v1alpha2"], "v1beta1", 2),
    ];
    for (served, watched, discovery_failures) in cases {
        let mut server = ApiServer::from_fixtures();
        server.cnp_served = served.to_vec();
        server.discovery_failures = discovery_failures;
        server.resource("clusternetworkpolicies").lists = VecDeque::from([cnp_list(watched)]);
        let h = start(server);
        let (hub, gate) = (h.hub.clone(), h.gate.clone());
        eventually(
            &format!("the {watched} ClusterNetworkPolicy is in both nodes' rule sets"),
            || {
                gate.synced()
                    && ["node-a", "node-b"].iter().all(|node| {
                        hub.ruleset(node).is_some_and(|rs| {
                            has_policy(&rs, RuleKind::ClusterNetworkPolicy, "deny-all-ingress")
                        })
                    })
            },
        )
        .await;
        let collection = format!("/apis/policy.networking.k8s.io/{watched}/clusternetworkpolicies");
        let asked = h.recorded("GET", "/clusternetworkpolicies");
        assert!(
            !asked.is_empty() && asked.iter().all(|r| r.path == collection),
            "served {served:?}: only {collection} is listed and watched, not {asked:?}"
        );
        let discovery = h
            .recorded("GET", "/apis/policy.networking.k8s.io/v1")
            .into_iter()
            .filter(|r| !r.path.ends_with("/clusternetworkpolicies"))
            .count();
        assert!(
            discovery > discovery_failures,
            "served {served:?}: discovery asked {discovery} times"
        );
        drop(h);
    }
}

/// A cluster without network-policy-api: ClusterNetworkPolicies count as empty and the rest
/// is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_serving_no_cluster_network_policy_version_treats_them_as_empty() {
    let mut server = ApiServer::from_fixtures();
    server.cnp_served = Vec::new();
    let h = start(server);
    let hub = h.hub.clone();
    let gate = h.gate.clone();
    eventually("the cluster is listed and rule sets are served", || {
        gate.synced()
            && hub
                .ruleset("node-b")
                .is_some_and(|rs| !rs.endpoints.is_empty())
    })
    .await;
    assert!(
        !h.ruleset("node-b")
            .rules
            .values()
            .any(|r| r.kind == RuleKind::ClusterNetworkPolicy)
    );
    // Discovery said neither version; the preferred one was tried and answered 404.
    assert_eq!(
        h.recorded("GET", "/clusternetworkpolicies")
            .iter()
            .map(|r| r.path.as_str())
            .collect::<std::collections::BTreeSet<_>>(),
        std::collections::BTreeSet::from([
            "/apis/policy.networking.k8s.io/v1beta1/clusternetworkpolicies"
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_crd_is_enforced_with_priority_and_reports_where_and_when() {
    let mut server = ApiServer::from_fixtures();
    let q_watch = live_watch(&mut server, "quarantines");
    let h = start(server);
    let gate = h.gate.clone();
    eventually("the first list completed", || gate.synced()).await;
    let mut sub = h.hub.subscribe("node-a").unwrap();
    let lines = fixture_lines("quarantine.watch.jsonl");
    q_watch.send(lines[0].clone()).unwrap();
    let update = tokio::time::timeout(Duration::from_secs(5), sub.updates.recv())
        .await
        .expect("node-a got the quarantine")
        .unwrap();
    assert!(update.priority, "quarantines are delivered with priority");
    let rs = h.ruleset("node-a");
    assert!(has_policy(&rs, RuleKind::Quarantine, "frontend-miner"));
    assert!(rs.endpoints.iter().any(|e| e.quarantined));

    // The agent has it in its kernel and cut 3 connections.
    h.hub.ack("node-a", h.hub.epoch(), update.version, None, 3);
    let server = h.server.clone();
    eventually(
        "the Quarantine's status says where and when it was enforced",
        || {
            server.lock().unwrap().recorded.iter().any(|r| {
            r.path
                == "/apis/bulkhead.dev/v1alpha1/namespaces/shop/quarantines/frontend-miner/status"
                && r.body["status"]["connectionsCut"] == 3
                && r.body["status"]["enforcedAt"]["node-a"].is_string()
        })
        },
    )
    .await;
    let last = h.recorded("PATCH", "/quarantines/frontend-miner/status");
    let last = last.last().unwrap();
    assert_eq!(last.body["kind"], "Quarantine");
    assert_eq!(last.content_type, "application/apply-patch+yaml");

    // Deleted: released with priority, the rule set is as before.
    q_watch.send(lines[1].clone()).unwrap();
    let update = tokio::time::timeout(Duration::from_secs(5), sub.updates.recv())
        .await
        .expect("node-a got the release")
        .unwrap();
    assert!(update.priority);
    assert!(!has_policy(
        &h.ruleset("node-a"),
        RuleKind::Quarantine,
        "frontend-miner"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_stays_closed_until_everything_is_listed() {
    let mut server = ApiServer::from_fixtures();
    // Pods never list (the API keeps failing): nothing is served, no empty rule set goes out.
    server.resource("pods").lists = VecDeque::from([String::from("not json")]);
    let h = start(server);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!h.gate.synced());
    assert!(h.gate.serving().unwrap_err().contains("not ready"));
    assert!(h.hub.node_states().is_empty());
}

/// A restarted controller (or a new leader) finds the statuses already written: it keeps their
/// transition times and does not write them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_already_on_the_objects_are_not_rewritten_after_a_restart() {
    let first = start(ApiServer::from_fixtures());
    let server = first.server.clone();
    eventually("the first controller wrote the status", || {
        server
            .lock()
            .unwrap()
            .recorded
            .iter()
            .any(|r| r.path.ends_with("/db-admits-backend/status"))
    })
    .await;
    let written = first.recorded("PATCH", "/db-admits-backend/status")[0].body["status"].clone();
    drop(first);

    // The API server now has that status on the object.
    let mut list: Value = serde_json::from_str(&fixture("servicepolicies.list.json")).unwrap();
    list["items"][0]["status"] = written.clone();
    let mut api = ApiServer::from_fixtures();
    api.resource("servicepolicies").lists = VecDeque::from([list.to_string()]);
    let second = start(api);
    let server = second.server.clone();
    eventually(
        "the second controller wrote the invalid policy's status",
        || {
            server
                .lock()
                .unwrap()
                .recorded
                .iter()
                .any(|r| r.path.ends_with("/broken/status"))
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        second
            .recorded("PATCH", "/db-admits-backend/status")
            .is_empty(),
        "an unchanged status is not written again"
    );
}

/// What `bulkhead controller --kubernetes --leader-elect` runs: the elector takes the free
/// Lease, the source lists the cluster, and only then is the replica ready; on shutdown it
/// releases the Lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_elected_controller_becomes_ready_and_releases_its_lease() {
    let (client, server, server_task) = mock_client(ApiServer::from_fixtures());
    let hub = Arc::new(Hub::new(PolicyEngine::empty(EngineConfig::default())));
    let running = bulkhead_controller::kubernetes::start_with_client(
        client,
        hub.clone(),
        bulkhead_controller::kubernetes::KubernetesOptions {
            leader_elect: true,
            lease_name: "bulkhead-controller".into(),
            lease_namespace: Some("bulkhead-system".into()),
            identity: Some("bulkhead-controller-7d9f-a".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let gate = running.gate.clone();
    eventually("the replica leads and has listed the cluster", || {
        gate.ready()
    })
    .await;
    assert!(has_policy(
        &hub.ruleset("node-b").unwrap(),
        RuleKind::ServicePolicy,
        "db-admits-backend"
    ));
    let lease = server.lock().unwrap().lease.clone().unwrap();
    assert_eq!(
        lease["spec"]["holderIdentity"],
        "bulkhead-controller-7d9f-a"
    );
    assert_eq!(
        lease["metadata"]["namespace"], "bulkhead-system",
        "the lease lives in --lease-namespace"
    );

    assert_eq!(running.shutdown().await, None, "leadership was not lost");
    let lease = server.lock().unwrap().lease.clone().unwrap();
    assert!(
        lease["spec"]["holderIdentity"].is_null(),
        "released: {lease}"
    );
    let patch = server
        .lock()
        .unwrap()
        .recorded
        .iter()
        .rfind(|r| r.path.contains("/leases/"))
        .cloned()
        .unwrap();
    assert_eq!(patch.method, "PATCH");
    assert_eq!(patch.content_type, "application/merge-patch+json");
    server_task.abort();
}

#[tokio::test]
async fn leader_election_needs_a_namespace_and_an_identity() {
    let (client, _server, server_task) = mock_client(ApiServer::from_fixtures());
    let hub = Arc::new(Hub::new(PolicyEngine::empty(EngineConfig::default())));
    let err = bulkhead_controller::kubernetes::start_with_client(
        client,
        hub,
        bulkhead_controller::kubernetes::KubernetesOptions {
            leader_elect: true,
            lease_name: "bulkhead-controller".into(),
            lease_namespace: None,
            identity: Some("x".into()),
            ..Default::default()
        },
    )
    .err()
    .expect("refused");
    assert!(err.to_string().contains("POD_NAMESPACE"), "{err}");
    server_task.abort();
}

/// A watch the API server refuses (500) is started again after a backoff; what follows on
/// the new watch is applied as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_watch_is_retried() {
    let mut server = ApiServer::from_fixtures();
    server
        .resource("networkpolicies")
        .watches
        .push_back(WatchPlan::Fail(500));
    let np_watch = live_watch(&mut server, "networkpolicies");
    let h = start(server);
    np_watch
        .send(fixture_lines("networkpolicy.watch.jsonl")[0].clone())
        .unwrap();
    let hub = h.hub.clone();
    eventually(
        "the NetworkPolicy from the second watch was applied",
        || {
            hub.ruleset("node-b")
                .is_some_and(|rs| has_policy(&rs, RuleKind::NetworkPolicy, "db-ingress"))
        },
    )
    .await;
    assert!(h.stats.watch_errors.load(Ordering::SeqCst) >= 1);
}

impl Respond for ApiServer {
    fn respond(&mut self, req: Request<Vec<u8>>) -> Response<MockBody> {
        ApiServer::respond(self, req)
    }
}
