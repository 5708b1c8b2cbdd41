//! Issue 21, findings 5, 7 and 8, on the directory store: a file per pod that no two pods
//! share, names checked on every path, bounded durations, expiry that lifts a quarantine
//! everywhere with an audit line, and files of the old layout still found.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bulkhead_proto::v1 as pb;

use super::{EXPIRY_ACTOR, MAX_DURATION, QuarantineControl, QuarantineError};
use crate::distribution::{FlowStore, Hub, ManifestSource};
use crate::ruleset::RuleKind;
use crate::{EngineConfig, PolicyEngine, PolicyKey};

const INVENTORY: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: a}
---
apiVersion: v1
kind: Namespace
metadata: {name: a--b}
---
apiVersion: v1
kind: Namespace
metadata: {name: tools}
---
apiVersion: v1
kind: Pod
metadata: {namespace: a, name: b--c, labels: {app: x}}
spec: {nodeName: n1}
status: {podIP: 10.1.0.1}
---
apiVersion: v1
kind: Pod
metadata: {namespace: a--b, name: c, labels: {app: y}}
spec: {nodeName: n1}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {namespace: tools, name: debug, labels: {app: debug}}
spec: {nodeName: n2}
status: {podIP: 10.1.0.3}
";

struct Fixture {
    root: PathBuf,
    quarantines: PathBuf,
    control: QuarantineControl,
    hub: Arc<Hub>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A controller's quarantine control over `ROOT/manifests` (its quarantines in
/// `ROOT/manifests/quarantines`, read by the same manifest source, as the controller does).
fn fixture() -> Fixture {
    static N: AtomicU32 = AtomicU32::new(0);
    let root = std::env::temp_dir().join(format!(
        "bh-quarantine-unit-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&root);
    let manifests = root.join("manifests");
    let quarantines = manifests.join("quarantines");
    std::fs::create_dir_all(&quarantines).expect("temp dir");
    std::fs::write(manifests.join("inventory.yaml"), INVENTORY).expect("write");
    let mut source = ManifestSource::new(vec![manifests]);
    let first = source.reload();
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    let mut engine = PolicyEngine::empty(EngineConfig::default());
    engine.apply_batch(first.changes).expect("compile");
    let hub = Arc::new(Hub::new(engine));
    let control = QuarantineControl::new(
        quarantines.clone(),
        Arc::new(Mutex::new(source)),
        hub.clone(),
        Arc::new(Mutex::new(FlowStore::new(100))),
    );
    Fixture {
        root,
        quarantines,
        control,
        hub,
    }
}

fn request(namespace: &str, pod: &str, duration_seconds: u64) -> pb::QuarantineRequest {
    pb::QuarantineRequest {
        namespace: namespace.into(),
        pod: pod.into(),
        reason: "test".into(),
        duration_seconds,
        actor: "tester".into(),
        ..Default::default()
    }
}

fn release(namespace: &str, pod: &str) -> pb::ReleaseRequest {
    pb::ReleaseRequest {
        namespace: namespace.into(),
        pod: pod.into(),
        actor: "tester".into(),
    }
}

fn key(namespace: &str, pod: &str) -> PolicyKey {
    PolicyKey {
        kind: RuleKind::Quarantine,
        namespace: namespace.into(),
        name: format!("quarantine-{pod}"),
    }
}

fn listed(f: &Fixture) -> Vec<String> {
    f.control
        .list()
        .expect("list")
        .into_iter()
        .map(|q| format!("{}/{}", q.namespace, q.pod))
        .collect()
}

/// The audit log's lines as (action, namespace/pod, actor).
fn audit(f: &Fixture) -> Vec<(String, String, String)> {
    std::fs::read_to_string(f.quarantines.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            (
                s("action"),
                format!("{}/{}", s("namespace"), s("pod")),
                s("actor"),
            )
        })
        .collect()
}

fn yaml_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(yaml_files(&p));
        } else if p.extension().is_some_and(|x| x == "yaml") {
            out.push(p.display().to_string());
        }
    }
    out.sort();
    out
}

/// Before: both were `a--b--c.yaml`; the second quarantine overwrote the first (lifting it
/// without an audit line), and releasing either released both.
#[test]
fn look_alike_names_get_their_own_files_and_releases() {
    let f = fixture();
    f.control
        .quarantine(request("a", "b--c", 0))
        .expect("quarantine a/b--c");
    f.control
        .quarantine(request("a--b", "c", 0))
        .expect("quarantine a--b/c");
    assert_eq!(listed(&f), ["a/b--c", "a--b/c"]);
    assert!(f.hub.quarantine(&key("a", "b--c")).is_some());
    assert!(f.hub.quarantine(&key("a--b", "c")).is_some());
    assert_eq!(yaml_files(&f.quarantines).len(), 2);

    f.control
        .release(release("a", "b--c"))
        .expect("release a/b--c");
    assert_eq!(listed(&f), ["a--b/c"]);
    assert!(f.hub.quarantine(&key("a", "b--c")).is_none());
    assert!(
        f.hub.quarantine(&key("a--b", "c")).is_some(),
        "the other pod stays quarantined"
    );
    let actions: Vec<(String, String)> = audit(&f).into_iter().map(|(a, p, _)| (a, p)).collect();
    assert_eq!(
        actions,
        [
            ("quarantine".to_string(), "a/b--c".to_string()),
            ("quarantine".into(), "a--b/c".into()),
            ("release".into(), "a/b--c".into()),
        ]
    );
}

/// Before: `release` built its path from the request unchecked, so `../victim` + `x` deleted
/// `manifests/victim--x.yaml`, outside the quarantine directory.
#[test]
fn names_are_checked_on_every_path_before_they_reach_a_file() {
    let f = fixture();
    let decoy = f.root.join("manifests/victim--x.yaml");
    let decoy_text = "apiVersion: bulkhead.dev/v1alpha1\nkind: Quarantine\nmetadata: {name: quarantine-x, namespace: tools}\nspec: {pods: [x], reason: decoy}\n";
    std::fs::write(&decoy, decoy_text).expect("write decoy");
    for (namespace, pod) in [
        ("../victim", "x"),
        ("..", "x"),
        ("tools", ".."),
        ("tools", "../../x"),
        ("tools", "a/b"),
        ("tools", ".hidden"),
        ("Tools", "debug"),
        ("", "debug"),
        ("tools", ""),
        ("-tools", "debug"),
    ] {
        for result in [
            f.control.release(release(namespace, pod)).map(|_| ()),
            f.control.quarantine(request(namespace, pod, 0)).map(|_| ()),
        ] {
            match result {
                Err(QuarantineError::Invalid(why)) => {
                    assert!(
                        why.contains("is not a Kubernetes"),
                        "{namespace}/{pod}: {why}"
                    )
                }
                other => panic!("{namespace:?}/{pod:?}: expected a refusal, got {other:?}"),
            }
        }
    }
    assert_eq!(
        std::fs::read_to_string(&decoy).expect("the decoy is still there"),
        decoy_text
    );
    let long = "p".repeat(243);
    match f.control.quarantine(request("tools", &long, 0)) {
        Err(QuarantineError::Invalid(why)) => assert!(why.contains("242"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Before: 10,000 years panicked formatting the year (HTTP 500 "Display implementation
/// returned an error"), 300 billion years overflowed the clock, and `u64::MAX` seconds too.
#[test]
fn durations_are_bounded_to_ten_years() {
    let f = fixture();
    let year = 31_557_600;
    for seconds in [
        10_000 * year,
        300_000_000_000 * year,
        u64::MAX,
        10 * year + 1,
    ] {
        match f.control.quarantine(request("tools", "debug", seconds)) {
            Err(QuarantineError::Invalid(why)) => {
                assert!(why.contains("at most 10 years"), "{why}")
            }
            other => panic!("{seconds} s: expected a refusal, got {other:?}"),
        }
    }
    assert!(yaml_files(&f.quarantines).is_empty(), "nothing was written");
    let before = SystemTime::now();
    let q = f
        .control
        .quarantine(request("tools", "debug", MAX_DURATION.as_secs()))
        .expect("ten years is allowed")
        .quarantine
        .expect("info");
    let ends = crate::load::parse_rfc3339(&q.expires_at).expect("an RFC 3339 expiry");
    let lasts = ends.duration_since(before).expect("in the future");
    assert!(
        lasts.abs_diff(MAX_DURATION) < Duration::from_secs(5),
        "{lasts:?}"
    );
}

/// Before: an expired quarantine's file stayed, so `list` (the API, the map) showed it, and
/// nothing was audited.
#[test]
fn expiry_removes_the_quarantine_everywhere_and_audits_it() {
    let f = fixture();
    f.control
        .quarantine(request("tools", "debug", 2))
        .expect("quarantine for 2 s");
    f.control
        .quarantine(request("a", "b--c", 0))
        .expect("quarantine until released");
    let now = SystemTime::now();
    assert!(f.control.expire_due(now).expect("nothing due").is_empty());
    assert_eq!(listed(&f), ["a/b--c", "tools/debug"]);

    let expired = f
        .control
        .expire_due(now + Duration::from_secs(3))
        .expect("expire");
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].pod, "debug");
    assert_eq!(listed(&f), ["a/b--c"]);
    assert!(
        !f.quarantines.join("tools").exists(),
        "the namespace's directory went with its last quarantine"
    );
    assert!(
        f.hub.quarantine(&key("tools", "debug")).is_none(),
        "the engine no longer has it"
    );
    assert_eq!(
        audit(&f).last(),
        Some(&("expire".into(), "tools/debug".into(), EXPIRY_ACTOR.into()))
    );
    // Once only.
    assert!(
        f.control
            .expire_due(now + Duration::from_secs(4))
            .expect("again")
            .is_empty()
    );
    assert_eq!(audit(&f).iter().filter(|(a, ..)| a == "expire").count(), 1);
}

#[test]
fn a_quarantine_that_ended_before_1970_is_not_listed_and_expires() {
    let f = fixture();
    let dir = f.quarantines.join("tools");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(
        dir.join("debug.yaml"),
        "apiVersion: bulkhead.dev/v1alpha1\nkind: Quarantine\nmetadata: {name: quarantine-debug, namespace: tools}\nspec: {pods: [debug], reason: old, expiresAt: \"0001-01-01T00:00:00Z\"}\n",
    )
    .expect("write");
    assert!(listed(&f).is_empty());
    let expired = f.control.expire_due(SystemTime::now()).expect("expire");
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].expires_at, "0001-01-01T00:00:00Z");
    assert!(yaml_files(&f.quarantines).is_empty());
}

/// A controller upgraded in place finds the files the old layout wrote (`NS--POD.yaml`),
/// trusting the object in a file, not its name.
#[test]
fn files_of_the_old_layout_are_still_listed_released_and_replaced() {
    let f = fixture();
    // The old layout: write as today, then move to the old name.
    let legacy = |namespace: &str, pod: &str| {
        f.control
            .quarantine(request(namespace, pod, 0))
            .expect("quarantine");
        let old = f.quarantines.join(format!("{namespace}--{pod}.yaml"));
        std::fs::rename(
            f.quarantines.join(namespace).join(format!("{pod}.yaml")),
            &old,
        )
        .expect("rename to the old layout");
        old
    };
    let debug = legacy("tools", "debug");
    let shared = legacy("a--b", "c"); // a--b--c.yaml, which a/b--c would also have used
    assert_eq!(listed(&f), ["a--b/c", "tools/debug"]);

    // a--b--c.yaml holds a--b/c: a/b--c is not quarantined, and its release touches nothing.
    match f.control.release(release("a", "b--c")) {
        Err(QuarantineError::NotQuarantined(_)) => {}
        other => panic!("expected not quarantined, got {other:?}"),
    }
    assert!(shared.exists());

    f.control
        .release(release("a--b", "c"))
        .expect("release a--b/c");
    assert!(!shared.exists());
    assert!(f.hub.quarantine(&key("a--b", "c")).is_none());

    // Quarantining again replaces the old file (one object, one file).
    f.control
        .quarantine(request("tools", "debug", 0))
        .expect("again");
    assert!(!debug.exists());
    assert!(f.quarantines.join("tools/debug.yaml").exists());
    assert_eq!(listed(&f), ["tools/debug"]);
    assert!(f.hub.quarantine(&key("tools", "debug")).is_some());
}

/// A quarantine request becomes a typed Quarantine object, converted by the same conversion as
/// a manifest: the model object is the one the equivalent hand-written manifest gives, and the
/// file written from the object reads back to it too.
#[test]
fn a_request_round_trips_into_the_same_model_object_as_the_manifest() {
    let mut r = request("shop", "web-1", 3600);
    r.reason = "crypto miner".into();
    r.allow = vec![
        pb::QuarantineAllow {
            namespace: "monitoring".into(),
            labels: [("app".to_string(), "prometheus".to_string())].into(),
            port: 9090,
            ..Default::default()
        },
        pb::QuarantineAllow {
            cidr: "10.0.0.0/8".into(),
            port: 53,
            protocol: "udp".into(),
            ..Default::default()
        },
        pb::QuarantineAllow::default(),
    ];
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let object = super::quarantine_object(&r, "quarantine-web-1", now, Some(now + MAX_DURATION));
    let from_request = crate::load::convert(&object).expect("a valid quarantine");
    let manifest = format!(
        "apiVersion: bulkhead.dev/v1alpha1
kind: Quarantine
metadata: {{name: quarantine-web-1, namespace: shop}}
spec:
  pods: [web-1]
  reason: crypto miner
  expiresAt: {}
  allow:
  - namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: monitoring}}}}
    podSelector: {{matchLabels: {{app: prometheus}}}}
    ports: [{{port: 9090, protocol: TCP}}]
  - ipBlock: {{cidr: 10.0.0.0/8}}
    ports: [{{port: 53, protocol: UDP}}]
  - namespaceSelector: {{}}
    podSelector: {{}}
",
        crate::kubernetes::status::rfc3339(now + MAX_DURATION)
    );
    let loaded = crate::load_str(Path::new("q.yaml"), &manifest);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    assert_eq!(loaded.objects, vec![from_request.clone()]);
    // What the directory store writes is that object, and it loads to the same.
    let text = serde_yaml::to_string(&object).expect("yaml");
    let written = crate::load_str(Path::new("written.yaml"), &text);
    assert!(written.errors.is_empty(), "{:?}", written.errors);
    assert_eq!(written.objects, vec![from_request]);
    assert!(
        text.contains("bulkhead.dev/quarantined-by: tester"),
        "{text}"
    );
}
