//! How long ingest takes at scale: 100,000 pods read from one manifest, and listed from the
//! Kubernetes API (kube's tower-test mock serving recorded pod JSON) until the controller is
//! ready. Figures, not assertions (tests never assert on time); run them with
//! `cargo test --release -p bulkhead-controller --test ingest_timing -- --ignored --nocapture`
//! (`BULKHEAD_INGEST_PODS=N` for another count).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_controller::distribution::Hub;
use bulkhead_controller::kubernetes::{Gate, KubernetesSource, SourceOptions};
use bulkhead_controller::{EngineConfig, PolicyEngine, load_str};
use http::{Request, Response};
use serde_json::{Value, json};

mod k8s_mock;
use k8s_mock::{
    CNP_VERSIONS, MockBody, PATHS, Respond, cnp_discovery, fixture, full, mock_client, pending,
};

fn pods() -> usize {
    std::env::var("BULKHEAD_INGEST_PODS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000)
}

/// The recorded pod (managedFields, conditions, a container with ports) as pod `i`.
fn pod(template: &Value, i: usize) -> Value {
    let mut p = template.clone();
    let ns = format!("ns-{}", i % 1000);
    p["metadata"]["name"] = json!(format!("web-{i}"));
    p["metadata"]["namespace"] = json!(ns);
    p["metadata"]["uid"] = json!(format!("00000000-0000-0000-0000-{i:012}"));
    p["metadata"]["labels"] = json!({"app": format!("app-{}", i % 400), "tier": "web"});
    let ip = format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255);
    p["status"]["podIP"] = json!(ip);
    p["status"]["podIPs"] = json!([{"ip": ip}]);
    p["spec"]["nodeName"] = json!(format!("node-{}", i % 1000));
    p
}

fn template() -> Value {
    let list: Value = serde_json::from_str(&fixture("pods.list.json")).unwrap();
    list["items"][0].clone()
}

#[test]
#[ignore = "a measurement: run with --release -- --ignored --nocapture"]
fn manifest_load_of_100k_pods() {
    let n = pods();
    let t = template();
    let mut text = String::new();
    for i in 0..n {
        let mut p = pod(&t, i);
        // What a manifest has: no managedFields, apiVersion and kind on every document.
        p["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("managedFields");
        p["apiVersion"] = json!("v1");
        p["kind"] = json!("Pod");
        text.push_str("---\n");
        text.push_str(&serde_json::to_string(&p).unwrap());
        text.push('\n');
    }
    let started = Instant::now();
    let loaded = load_str(Path::new("pods.yaml"), &text);
    let took = started.elapsed();
    assert!(loaded.errors.is_empty(), "{:?}", &loaded.errors[..1]);
    assert_eq!(loaded.objects.len(), n);
    println!(
        "manifest load: {n} pods ({} MB of YAML) in {:.3} s",
        text.len() >> 20,
        took.as_secs_f64()
    );
}

/// Lists the pods it was given, everything else empty; watches stay open.
struct PodServer {
    pods: Option<String>,
}

impl Respond for PodServer {
    fn respond(&mut self, req: Request<Vec<u8>>) -> Response<MockBody> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        if query.contains("watch=true") {
            return Response::builder().status(200).body(pending()).unwrap();
        }
        if let Some(answer) = cnp_discovery(&path, &CNP_VERSIONS) {
            return answer;
        }
        let body = match PATHS.iter().find(|(p, _)| *p == path) {
            Some((_, "pods")) => self.pods.take().unwrap_or_default(),
            _ => {
                r#"{"kind":"List","apiVersion":"v1","metadata":{"resourceVersion":"1"},"items":[]}"#
                    .to_string()
            }
        };
        Response::builder().status(200).body(full(body)).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run with --release -- --ignored --nocapture"]
async fn kubernetes_list_of_100k_pods() {
    let n = pods();
    let t = template();
    let items: Vec<Value> = (0..n).map(|i| pod(&t, i)).collect();
    let list = json!({"kind": "PodList", "apiVersion": "v1",
                      "metadata": {"resourceVersion": "9"}, "items": items})
    .to_string();
    let bytes = list.len();
    let (client, _server, _task) = mock_client(PodServer { pods: Some(list) });
    let hub = Arc::new(Hub::new(PolicyEngine::empty(EngineConfig::default())));
    let gate = Arc::new(Gate::new(None));
    let source = KubernetesSource::new(
        client,
        hub.clone(),
        gate.clone(),
        SourceOptions {
            // One page: the mock ignores `limit`.
            watcher: Default::default(),
            ..Default::default()
        },
    );
    let stats = source.stats();
    let started = Instant::now();
    let task = tokio::spawn(source.run());
    while !gate.synced() {
        assert!(
            started.elapsed() < Duration::from_secs(3600),
            "never synced"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    task.abort();
    assert_eq!(
        stats.changes.load(std::sync::atomic::Ordering::SeqCst),
        n as u64
    );
    let last = format!("web-{}", n - 1);
    assert!(hub.has_pod(&bulkhead_controller::PodKey {
        namespace: format!("ns-{}", (n - 1) % 1000),
        name: last,
    }));
    println!(
        "kubernetes list: {n} pods ({} MB of JSON) to ready in {:.3} s",
        bytes >> 20,
        took.as_secs_f64()
    );
}
