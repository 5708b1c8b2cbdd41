//! The cluster DNS Service (`kube-system/kube-dns`) as a source of trusted DNS resolvers: the
//! controller's Kubernetes source against kube's tower-test mock API server, with a recorded
//! Service (`tests/fixtures/k8s/kube-dns.service.list.json`) and the recorded inventory plus
//! one CoreDNS pod. Its cluster IPs reach every node's `RuleSet.dns_resolvers` next to the
//! pod's address, follow the Service's changes, and leave with it; a headless Service adds
//! nothing, `--dns-resolver` replaces everything, and a Service the controller may not watch
//! (or that does not exist) leaves the pod-based default working.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulkhead_controller::distribution::Hub;
use bulkhead_controller::kubernetes::{Gate, KubernetesSource, SourceOptions, SourceStats};
use bulkhead_controller::{EngineConfig, PolicyEngine};
use http::{Request, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc;

mod k8s_mock;
use k8s_mock::{
    CNP_VERSIONS, MockBody, PATHS, Respond, cnp_discovery, fixture, full, live, mock_client,
    pending,
};

const SERVICES: &str = "/api/v1/namespaces/kube-system/services";
const NODES: [&str; 2] = ["node-a", "node-b"];
/// The CoreDNS pod added to the recorded pods.
const DNS_POD_IP: &str = "10.244.1.53";

/// How the API server answers for the Service.
enum ServicePlan {
    /// This list; the first watch then yields what the test sends.
    List(String, Option<mpsc::UnboundedReceiver<String>>),
    /// Every request fails with this status (403: RBAC without the Role).
    Fail(u16),
}

struct ApiServer {
    pods: String,
    service: ServicePlan,
    /// The query strings of the Service requests.
    service_queries: Vec<String>,
}

/// The recorded pods plus a CoreDNS pod on node-a, as the API server lists it.
fn pods_with_coredns() -> String {
    let mut list: Value = serde_json::from_str(&fixture("pods.list.json")).expect("pods fixture");
    let items = list["items"].as_array_mut().expect("items");
    let mut dns = items[0].clone();
    dns["metadata"]["namespace"] = json!("kube-system");
    dns["metadata"]["name"] = json!("coredns-76f75df574-8kq2x");
    dns["metadata"]["uid"] = json!("0b6c2e7e-8d0a-4a55-9e1a-3c1f4b2d9e53");
    dns["metadata"]["labels"] = json!({"k8s-app": "kube-dns", "pod-template-hash": "76f75df574"});
    dns["metadata"]
        .as_object_mut()
        .expect("metadata")
        .remove("ownerReferences");
    dns["spec"]["nodeName"] = json!("node-a");
    dns["status"]["podIP"] = json!(DNS_POD_IP);
    dns["status"]["podIPs"] = json!([{"ip": DNS_POD_IP}]);
    items.push(dns);
    list.to_string()
}

/// The recorded Service with `spec` changed by `edit`.
fn service_with(edit: impl FnOnce(&mut Value)) -> Value {
    let list: Value =
        serde_json::from_str(&fixture("kube-dns.service.list.json")).expect("service fixture");
    let mut svc = list["items"][0].clone();
    edit(&mut svc["spec"]);
    svc
}

fn service_list(items: Vec<Value>) -> String {
    json!({"kind": "ServiceList", "apiVersion": "v1", "metadata": {"resourceVersion": "48213"},
        "items": items})
    .to_string()
}

fn dual_stack(spec: &mut Value) {
    spec["clusterIPs"] = json!(["10.96.0.10", "fd00:10:96::a"]);
    spec["ipFamilies"] = json!(["IPv4", "IPv6"]);
    spec["ipFamilyPolicy"] = json!("PreferDualStack");
}

fn headless(spec: &mut Value) {
    spec["clusterIP"] = json!("None");
    spec["clusterIPs"] = json!(["None"]);
}

fn watch_line(kind: &str, mut svc: Value, rv: u64) -> String {
    svc["metadata"]["resourceVersion"] = json!(rv.to_string());
    json!({"type": kind, "object": svc}).to_string()
}

fn status(code: u16, reason: &str) -> Response<MockBody> {
    Response::builder()
        .status(code)
        .body(full(
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("services \"kube-dns\" is {reason}"), "reason": reason, "code": code})
            .to_string(),
        ))
        .unwrap()
}

impl Respond for ApiServer {
    fn respond(&mut self, req: Request<Vec<u8>>) -> Response<MockBody> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let get = req.method() == http::Method::GET;
        if get && let Some(answer) = cnp_discovery(&path, &CNP_VERSIONS) {
            return answer;
        }
        let watch = query.contains("watch=true");
        if get && path == SERVICES {
            self.service_queries.push(query);
            return match &mut self.service {
                ServicePlan::Fail(code) => status(*code, "forbidden"),
                ServicePlan::List(_, rx) if watch => match rx.take() {
                    Some(rx) => Response::builder().status(200).body(live(rx)).unwrap(),
                    None => Response::builder().status(200).body(pending()).unwrap(),
                },
                ServicePlan::List(list, _) => Response::builder()
                    .status(200)
                    .body(full(list.clone()))
                    .unwrap(),
            };
        }
        if get && let Some((_, plural)) = PATHS.iter().find(|(p, _)| *p == path) {
            if watch {
                return Response::builder().status(200).body(pending()).unwrap();
            }
            let list = if *plural == "pods" {
                self.pods.clone()
            } else {
                fixture(&format!("{plural}.list.json"))
            };
            return Response::builder().status(200).body(full(list)).unwrap();
        }
        // Writes (statuses, Events): answered with what was sent.
        let code = if req.method() == http::Method::POST {
            201
        } else {
            200
        };
        Response::builder()
            .status(code)
            .body(full(req.body().clone()))
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

async fn start(service: ServicePlan, config: EngineConfig) -> Harness {
    let server = ApiServer {
        pods: pods_with_coredns(),
        service,
        service_queries: Vec::new(),
    };
    let (client, server, server_task) = mock_client(server);
    let hub = Arc::new(Hub::new(PolicyEngine::empty(config)));
    let gate = Arc::new(Gate::new(None));
    let source = KubernetesSource::new(
        client,
        hub.clone(),
        gate.clone(),
        SourceOptions {
            status_interval: Duration::from_millis(100),
            ..Default::default()
        },
    );
    let stats = source.stats();
    let task = tokio::spawn(source.run());
    let h = Harness {
        server,
        hub,
        gate,
        stats,
        task,
        server_task,
    };
    let gate = h.gate.clone();
    eventually("the source listed the cluster", || gate.synced()).await;
    h
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

fn addrs(a: &[&str]) -> Vec<IpAddr> {
    a.iter().map(|a| a.parse().expect("address")).collect()
}

impl Harness {
    fn resolvers(&self, node: &str) -> Vec<IpAddr> {
        self.hub
            .ruleset(node)
            .map(|rs| rs.dns_resolvers)
            .unwrap_or_default()
    }

    fn version(&self, node: &str) -> u64 {
        self.hub.node_rules(node).map(|(v, _)| v).unwrap_or(0)
    }

    /// Every node has `want`, a version after `after` (the change reached it as a delta).
    async fn every_node_gets(&self, want: &[&str], after: &[u64]) {
        let want = addrs(want);
        for (node, before) in NODES.iter().zip(after) {
            eventually(&format!("{node} has {want:?}"), || {
                self.resolvers(node) == want
            })
            .await;
            assert!(self.version(node) > *before, "{node}: no new version");
        }
    }

    fn versions(&self) -> Vec<u64> {
        NODES.iter().map(|n| self.version(n)).collect()
    }
}

/// The Service updates the source counted, once they reach `n` (or after 10 s).
async fn counted(stats: &SourceStats, n: u64) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = stats.cluster_dns_updates.load(Ordering::SeqCst);
        if now >= n || std::time::Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The first rule sets carry the Service's cluster IP with the CoreDNS pod; a dual-stack
/// change, a new address, a headless Service and the Service's deletion each reach every node
/// as a new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kube_dns_service_cluster_ips_reach_every_node_and_follow_the_service() {
    let (tx, rx) = mpsc::unbounded_channel();
    let h = start(
        ServicePlan::List(fixture("kube-dns.service.list.json"), Some(rx)),
        EngineConfig::default(),
    )
    .await;
    for node in NODES {
        assert_eq!(
            h.resolvers(node),
            addrs(&["10.96.0.10", DNS_POD_IP]),
            "{node}: served with the Service's address from the start"
        );
    }
    // One Service, by name, in kube-system: what the chart's Role allows.
    let queries = h.server.lock().unwrap().service_queries.clone();
    assert!(
        queries
            .iter()
            .all(|q| q.contains("fieldSelector=metadata.name%3Dkube-dns")),
        "{queries:?}"
    );

    let mut rv = 300;
    let mut send = |kind: &str, svc: Value| {
        rv += 1;
        tx.send(watch_line(kind, svc, rv)).expect("watch open");
    };
    let before = h.versions();
    send("MODIFIED", service_with(dual_stack));
    h.every_node_gets(&["10.96.0.10", DNS_POD_IP, "fd00:10:96::a"], &before)
        .await;

    let before = h.versions();
    send(
        "MODIFIED",
        service_with(|spec| {
            spec["clusterIP"] = json!("10.96.0.53");
            spec["clusterIPs"] = json!(["10.96.0.53"]);
        }),
    );
    h.every_node_gets(&["10.96.0.53", DNS_POD_IP], &before)
        .await;

    // Noise (a label) changes nothing: no new version anywhere.
    // The counter is bumped once the hub applied, a moment after the nodes' versions show it:
    // wait for it (the first list, the dual-stack change, the new address) before comparing.
    let updates = 3;
    assert_eq!(counted(&h.stats, updates).await, updates);
    let before = h.versions();
    send(
        "MODIFIED",
        service_with(|spec| {
            spec["clusterIP"] = json!("10.96.0.53");
            spec["clusterIPs"] = json!(["10.96.0.53"]);
            spec["sessionAffinity"] = json!("ClientIP");
        }),
    );
    let before_headless = h.versions();
    send("MODIFIED", service_with(headless));
    h.every_node_gets(&[DNS_POD_IP], &before_headless).await;
    // Events are handled in order: once the headless change is counted, the noise before it
    // was handled too.
    assert_eq!(
        counted(&h.stats, updates + 1).await,
        updates + 1,
        "only the headless change was applied"
    );
    for (n, v) in before.iter().enumerate() {
        assert_eq!(h.version(NODES[n]), v + 1, "{}: one new version", NODES[n]);
    }

    let before = h.versions();
    send("MODIFIED", service_with(|_| {}));
    h.every_node_gets(&["10.96.0.10", DNS_POD_IP], &before)
        .await;
    let before = h.versions();
    send("DELETED", service_with(|_| {}));
    h.every_node_gets(&[DNS_POD_IP], &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_service_gives_both_families() {
    let h = start(
        ServicePlan::List(service_list(vec![service_with(dual_stack)]), None),
        EngineConfig::default(),
    )
    .await;
    for node in NODES {
        assert_eq!(
            h.resolvers(node),
            addrs(&["10.96.0.10", DNS_POD_IP, "fd00:10:96::a"]),
            "{node}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headless_or_missing_service_adds_nothing() {
    for list in [
        service_list(vec![service_with(headless)]),
        service_list(Vec::new()),
    ] {
        let h = start(ServicePlan::List(list, None), EngineConfig::default()).await;
        for node in NODES {
            assert_eq!(h.resolvers(node), addrs(&[DNS_POD_IP]), "{node}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_resolvers_replace_the_service_and_the_pods() {
    let (tx, rx) = mpsc::unbounded_channel();
    let h = start(
        ServicePlan::List(fixture("kube-dns.service.list.json"), Some(rx)),
        EngineConfig {
            dns_resolvers: Some(addrs(&["169.254.20.10"])),
            ..EngineConfig::default()
        },
    )
    .await;
    let updates = h.stats.cluster_dns_updates.load(Ordering::SeqCst);
    tx.send(watch_line("MODIFIED", service_with(dual_stack), 301))
        .expect("watch open");
    let stats = h.stats.clone();
    eventually("the change was handed to the engine", || {
        stats.cluster_dns_updates.load(Ordering::SeqCst) > updates
    })
    .await;
    for node in NODES {
        assert_eq!(h.resolvers(node), addrs(&["169.254.20.10"]), "{node}");
    }
}

/// A chart without the Role (403), or an API server failing the request: the gate still
/// opens, and the CoreDNS pods are the resolvers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_service_watch_leaves_the_pods_working() {
    for code in [403, 500] {
        let h = start(ServicePlan::Fail(code), EngineConfig::default()).await;
        for node in NODES {
            assert_eq!(h.resolvers(node), addrs(&[DNS_POD_IP]), "{code} {node}");
        }
        assert!(!h.server.lock().unwrap().service_queries.is_empty());
        assert_eq!(h.stats.cluster_dns_updates.load(Ordering::SeqCst), 0);
    }
}
