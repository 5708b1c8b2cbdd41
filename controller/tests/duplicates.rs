//! A full compile where one pod appears twice (two files, or an API list followed by an update)
//! takes the later object.

mod common;

use std::path::Path;

use bulkhead_controller::{EngineConfig, PodKey, PolicyEngine, load_str};
use common::*;

#[test]
fn a_later_duplicate_pod_replaces_the_earlier_one() {
    let first = load_str(Path::new("cluster.yaml"), &fixture());
    // x/a again, in another file, now labelled like x/b (same named ports, which are part of
    // an identity): it must get x/b's identity.
    let second = load_str(
        Path::new("update.yaml"),
        "apiVersion: v1
kind: Pod
metadata: {namespace: x, name: a, labels: {pod: b}}
spec:
  nodeName: node-a
  containers:
  - name: c
    ports:
    - {name: serve-80-tcp, containerPort: 80, protocol: TCP}
    - {name: serve-81-tcp, containerPort: 81, protocol: TCP}
    - {name: serve-80-udp, containerPort: 80, protocol: UDP}
    - {name: serve-81-udp, containerPort: 81, protocol: UDP}
status: {podIP: 10.0.1.1}
",
    );
    assert!(first.errors.is_empty() && second.errors.is_empty());
    let objects = first.objects.into_iter().chain(second.objects);
    let engine = PolicyEngine::new(EngineConfig::default(), objects).expect("compiles");
    let key = |name: &str| PodKey {
        namespace: "x".into(),
        name: name.into(),
    };
    let a = engine
        .identity_of_pod(&key("a"))
        .expect("x/a has an identity");
    let b = engine
        .identity_of_pod(&key("b"))
        .expect("x/b has an identity");
    let c = engine
        .identity_of_pod(&key("c"))
        .expect("x/c has an identity");
    assert_eq!(
        a,
        b,
        "the later x/a (pod=b) wins: {:?}",
        engine.pod(&key("a")).map(|p| p.labels)
    );
    assert_ne!(a, c);
}
