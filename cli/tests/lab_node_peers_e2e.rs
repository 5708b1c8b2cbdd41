//! Tier 3: ClusterNetworkPolicy `nodes` peers in the lab, with real connections. Node objects
//! in the manifests label the lab's nodes; a pod reaches a TCP listener on each node's fabric
//! address (its own node's and the other's) as an Admin policy's `nodes` peers allow: accepted
//! to the node whose label matches, denied to the other; relabeling the other node (a Node
//! object applied to the running lab) lets it in; deleting the policy restores both.

mod common;

use common::*;

use std::{
    io::Write,
    net::{IpAddr, Ipv4Addr, TcpListener},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bulkhead_agent::{netns::Netns, privileged::check_privileged_test};

/// A port nothing in a lab node's namespace listens on.
const NODE_PORT: u16 = 36363;

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Node
metadata: {name: node-1, labels: {bulkhead.dev/zone: trusted}}
---
apiVersion: v1
kind: Node
metadata: {name: node-2, labels: {bulkhead.dev/zone: other}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {nodeName: node-1, containers: [{name: c, ports: [{containerPort: 80}]}]}
"#;

const POLICY: &str = r#"
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {name: nodes}
spec:
  tier: Admin
  priority: 10
  subject:
    pods:
      namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: shop}}
      podSelector: {matchLabels: {app: client}}
  egress:
  - action: Accept
    to: [{nodes: {matchLabels: {bulkhead.dev/zone: trusted}}}]
    protocols: [{tcp: {destinationPort: {number: 36363}}}]
  - action: Deny
    to: [{nodes: {}}]
"#;

const RELABEL_NODE_2: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-2, labels: {bulkhead.dev/zone: trusted}}
"#;

/// A TCP listener in a lab node's network namespace that greets every connection; stops
/// accepting when dropped.
struct NodeListener {
    stop: Arc<AtomicBool>,
}

impl NodeListener {
    fn start(netns: &str) -> NodeListener {
        let listener = Netns::existing(netns)
            .run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, NODE_PORT)))
            .expect("enter node namespace")
            .expect("listen in the node's namespace");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.write_all(b"node\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        NodeListener { stop }
    }
}

impl Drop for NodeListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The lab's nodes as (netns, fabric address), by name.
fn nodes(state: &std::path::Path) -> std::collections::BTreeMap<String, (String, IpAddr)> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("lab.json")).expect("lab.json"))
            .expect("json");
    v["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            let index = n["index"].as_u64().expect("index") as u8;
            (
                n["name"].as_str().expect("name").to_string(),
                (
                    n["netns"].as_str().expect("netns").to_string(),
                    IpAddr::V4(Ipv4Addr::new(10, 239, 0, index)),
                ),
            )
        })
        .collect()
}

fn apply(lab: &TestLab, name: &str, yaml: &str, delete: bool) {
    let file = lab.dir.join(name);
    std::fs::write(&file, yaml).expect("write");
    let mut args = vec!["lab", "--state"];
    let state = lab.arg();
    args.push(&state);
    args.push(if delete { "delete" } else { "apply" });
    let path = file.to_string_lossy().to_string();
    args.extend(["-f", &path]);
    run_ok(&args);
}

#[test]
fn pods_reach_node_addresses_as_node_peers_allow() {
    if !check_privileged_test("pods_reach_node_addresses_as_node_peers_allow") {
        return;
    }
    let lab = TestLab::up("lab-node-peers-e2e", MANIFESTS, 19940);
    let client = pods(&lab.state)["shop/client"].clone();
    let nodes = nodes(&lab.state);
    let _listeners: Vec<NodeListener> = nodes
        .values()
        .map(|(netns, _)| NodeListener::start(netns))
        .collect();
    let node = |name: &str| Pod {
        netns: nodes[name].0.clone(),
        ip: nodes[name].1,
    };
    let reach = |name: &str| connects(&client, &node(name), NODE_PORT);

    // No policy: both nodes, the pod's own and the other.
    assert!(reach("node-1"), "own node, no policy");
    assert!(reach("node-2"), "other node, no policy");

    // The trusted node (the pod's own) is accepted, the other denied by the `nodes: {}` Deny.
    apply(&lab, "policy.yaml", POLICY, false);
    assert!(reach("node-1"), "node-1 is trusted");
    assert!(!reach("node-2"), "node-2 is not");

    // node-2 becomes trusted: its node identity changes and the Accept selects it.
    apply(&lab, "relabel.yaml", RELABEL_NODE_2, false);
    assert!(reach("node-1"), "node-1 still trusted");
    assert!(reach("node-2"), "node-2 relabeled trusted");

    // Back to other: denied again; the policy goes: both open.
    apply(
        &lab,
        "relabel-back.yaml",
        &RELABEL_NODE_2.replace("trusted", "other"),
        false,
    );
    assert!(!reach("node-2"), "node-2 relabeled back");
    apply(&lab, "policy.yaml", POLICY, true);
    assert!(reach("node-1") && reach("node-2"), "no policy any more");
}
