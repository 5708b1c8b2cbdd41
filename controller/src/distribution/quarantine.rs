//! Quarantine through the controller's API: each quarantine is a `bulkhead.dev/v1alpha1`
//! Quarantine manifest the controller writes into its quarantine directory (one of the
//! directories it reads), so it is compiled like any other policy, survives controller restarts,
//! and is the same object a Kubernetes user would create. The change is applied at once with
//! priority delivery rather than at the next reload, and every quarantine and release is
//! appended to `audit.log` (JSON lines) and recorded as a flow.
//!
//! In Kubernetes mode ([`QuarantineControl::kubernetes`]) there is no directory: the same
//! object is written to the API by server-side apply (field manager `bulkhead-controller`) in
//! the pod's namespace, and released by deleting it. The Kubernetes source's watch brings it to
//! the hub (with priority delivery, like any Quarantine object); the call returns once the hub
//! has it. The audit goes to the log (same JSON line, via tracing), the flow store and a
//! Kubernetes Event on the object.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use bulkhead_proto::v1 as pb;
use serde_yaml::Value;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Resource,
    api::{Api, DeleteParams, ListParams, Patch, PatchParams},
    runtime::events::{Event as KubeEvent, EventType},
};

use super::{FlowStore, Hub, ManifestSource};
use crate::kubernetes::Quarantine;
use crate::kubernetes::status::{EVENT_NOTE_MAX, FIELD_MANAGER, truncate};
use crate::ruleset::RuleKind;

#[derive(Debug, thiserror::Error)]
pub enum QuarantineError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("pod {0} is not quarantined")]
    NotQuarantined(String),
    #[error("no pod {0} in the cluster")]
    NoPod(String),
    #[error("cannot write the quarantine directory {dir}: {reason}")]
    Io { dir: PathBuf, reason: String },
    #[error("the quarantine manifest was rejected: {0}")]
    Rejected(String),
    #[error("cannot apply the quarantine: {0}")]
    Apply(String),
    #[error("Kubernetes API: {0}")]
    Kubernetes(String),
    #[error(
        "{0} was written to the Kubernetes API but not yet seen by the controller's watch; its enforcement is pending"
    )]
    NotSeen(String),
}

impl From<QuarantineError> for tonic::Status {
    fn from(e: QuarantineError) -> tonic::Status {
        match e {
            QuarantineError::Invalid(_) | QuarantineError::Rejected(_) => {
                tonic::Status::invalid_argument(e.to_string())
            }
            QuarantineError::NotQuarantined(_) | QuarantineError::NoPod(_) => {
                tonic::Status::not_found(e.to_string())
            }
            _ => tonic::Status::internal(e.to_string()),
        }
    }
}

/// Where quarantines are kept.
enum Store {
    /// Manifest files in a directory the manifest source reads.
    Dir {
        dir: PathBuf,
        source: Arc<Mutex<ManifestSource>>,
    },
    /// Quarantine objects in the Kubernetes API, which the Kubernetes source watches.
    Kubernetes(Box<KubeStore>),
}

struct KubeStore {
    client: kube::Client,
    /// The controller's runtime. The control's methods are synchronous and run on
    /// `spawn_blocking` threads, which are not runtime workers, so `Handle::block_on` there
    /// neither panics nor blocks a worker the API calls themselves need.
    handle: tokio::runtime::Handle,
    recorder: kube::runtime::events::Recorder,
    /// How long to wait for the hub to reflect a write.
    wait: Duration,
}

/// What [`QuarantineControl::wait_for`] waits for the hub to have.
#[derive(Clone, Copy)]
enum Want<'a> {
    /// A Quarantine of that name in the rule sets.
    Present,
    /// That Quarantine, with exactly this content, in the engine and the rule sets.
    Exactly(&'a crate::Policy),
    /// No Quarantine of that name.
    Absent,
}

/// How often the hub is looked at while waiting for a write to reach it.
const POLL: Duration = Duration::from_millis(20);

/// What the quarantine API needs: where quarantines live, and the path into the engine.
pub struct QuarantineControl {
    store: Store,
    hub: Arc<Hub>,
    flows: Arc<Mutex<FlowStore>>,
    /// Per quarantined `namespace/pod`: the node versions that carried it (for its status).
    carried_by: Mutex<BTreeMap<String, BTreeMap<String, u64>>>,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl QuarantineControl {
    pub fn new(
        dir: PathBuf,
        source: Arc<Mutex<ManifestSource>>,
        hub: Arc<Hub>,
        flows: Arc<Mutex<FlowStore>>,
    ) -> QuarantineControl {
        QuarantineControl {
            store: Store::Dir { dir, source },
            hub,
            flows,
            carried_by: Mutex::new(BTreeMap::new()),
        }
    }

    /// Quarantines as `Quarantine` objects in the Kubernetes API (`--kubernetes`), through
    /// `client` (the one the Kubernetes source watches with). `handle` is the controller's
    /// runtime; `identity` is this replica in the Events it publishes. Build it inside the
    /// runtime and call its methods from `spawn_blocking`, never from async code.
    pub fn kubernetes(
        client: kube::Client,
        handle: tokio::runtime::Handle,
        identity: &str,
        hub: Arc<Hub>,
        flows: Arc<Mutex<FlowStore>>,
    ) -> QuarantineControl {
        let recorder = kube::runtime::events::Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(identity.to_string()),
            },
        );
        QuarantineControl {
            store: Store::Kubernetes(Box::new(KubeStore {
                client,
                handle,
                recorder,
                wait: Duration::from_secs(10),
            })),
            hub,
            flows,
            carried_by: Mutex::new(BTreeMap::new()),
        }
    }

    /// How long a Kubernetes write waits for the hub to reflect it (default 10 s).
    pub fn with_wait(mut self, wait: Duration) -> QuarantineControl {
        if let Store::Kubernetes(k) = &mut self.store {
            k.wait = wait;
        }
        self
    }

    fn dir(&self) -> &Path {
        match &self.store {
            Store::Dir { dir, .. } => dir,
            Store::Kubernetes(_) => Path::new(""),
        }
    }

    fn file(&self, namespace: &str, pod: &str) -> PathBuf {
        self.dir().join(format!("{namespace}--{pod}.yaml"))
    }

    fn io(&self, e: impl std::fmt::Display) -> QuarantineError {
        QuarantineError::Io {
            dir: self.dir().to_path_buf(),
            reason: e.to_string(),
        }
    }

    /// Re-reads the manifests and applies what changed, with priority delivery.
    fn apply_now(&self) -> Result<BTreeMap<String, u64>, QuarantineError> {
        let Store::Dir { source, .. } = &self.store else {
            return Err(QuarantineError::Apply("no manifest source".into()));
        };
        let reload = {
            let mut source = source
                .lock()
                .map_err(|_| QuarantineError::Apply("manifest source lock poisoned".into()))?;
            source.reload()
        };
        if let Some(e) = reload.errors.first() {
            return Err(QuarantineError::Rejected(e.to_string()));
        }
        let deltas = self
            .hub
            .apply(reload.changes, true)
            .map_err(|e| QuarantineError::Apply(e.to_string()))?;
        Ok(deltas.into_iter().map(|d| (d.node, d.version)).collect())
    }

    fn audit(&self, action: &str, info: &pb::QuarantineInfo) -> Result<(), QuarantineError> {
        let line = serde_json::json!({
            "time": rfc3339(SystemTime::now()),
            "action": action,
            "namespace": info.namespace,
            "pod": info.pod,
            "quarantine": info.name,
            "reason": info.reason,
            "actor": info.actor,
            "expires_at": info.expires_at,
        });
        match &self.store {
            Store::Dir { dir, .. } => {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("audit.log"))
                    .map_err(|e| self.io(e))?;
                writeln!(f, "{line}").map_err(|e| self.io(e))?;
            }
            // No audit file in a pod: the same line goes to the log, and an Event is published
            // on the object (by the caller, which has its reference).
            Store::Kubernetes(_) => tracing::info!(target: "bulkhead::audit", "{line}"),
        }
        if let Ok(mut flows) = self.flows.lock() {
            flows.push(
                "controller",
                pb::FlowRecord {
                    time_unix_nanos: SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_nanos() as u64)
                        .unwrap_or(0),
                    endpoint: format!("{}/{}", info.namespace, info.pod),
                    kind: action.to_string(),
                    verdict: if action == "quarantine" {
                        "quarantined".into()
                    } else {
                        "released".into()
                    },
                    rule: format!(
                        "Quarantine {}/{}: {}",
                        info.namespace, info.name, info.reason
                    ),
                    reason: format!("by {}", info.actor),
                    ..Default::default()
                },
            );
        }
        tracing::warn!(action, namespace = %info.namespace, pod = %info.pod, reason = %info.reason, actor = %info.actor, "quarantine audit");
        Ok(())
    }

    /// Writes the manifest and applies it; on failure puts back what was there.
    fn write_file(
        &self,
        namespace: &str,
        pod: &str,
        text: String,
    ) -> Result<BTreeMap<String, u64>, QuarantineError> {
        std::fs::create_dir_all(self.dir()).map_err(|e| self.io(e))?;
        let path = self.file(namespace, pod);
        let previous = std::fs::read_to_string(&path).ok();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(|e| self.io(e))?;
        std::fs::rename(&tmp, &path).map_err(|e| self.io(e))?;
        let nodes = match self.apply_now() {
            Ok(n) => n,
            Err(e) => {
                // Put back what was there: a rejected request changes nothing.
                match previous {
                    Some(p) => {
                        let _ = std::fs::write(&path, p);
                    }
                    None => {
                        let _ = std::fs::remove_file(&path);
                    }
                }
                let _ = self.apply_now();
                return Err(e);
            }
        };
        Ok(nodes)
    }

    pub fn quarantine(
        &self,
        r: pb::QuarantineRequest,
    ) -> Result<pb::QuarantineResponse, QuarantineError> {
        if !valid_name(&r.namespace) || !valid_name(&r.pod) {
            return Err(QuarantineError::Invalid(
                "name the pod as NAMESPACE/POD (lower-case DNS names)".into(),
            ));
        }
        if r.reason.trim().is_empty() {
            return Err(QuarantineError::Invalid(
                "a quarantine needs a --reason".into(),
            ));
        }
        let key = crate::PodKey {
            namespace: r.namespace.clone(),
            name: r.pod.clone(),
        };
        if !self.hub.has_pod(&key) {
            return Err(QuarantineError::NoPod(format!("{}/{}", r.namespace, r.pod)));
        }
        let now = SystemTime::now();
        let expires =
            (r.duration_seconds > 0).then(|| now + Duration::from_secs(r.duration_seconds));
        let name = format!("quarantine-{}", r.pod);
        let mut allow = Vec::new();
        for a in &r.allow {
            let mut peer = serde_yaml::Mapping::new();
            if !a.cidr.is_empty() {
                let mut block = serde_yaml::Mapping::new();
                block.insert("cidr".into(), a.cidr.clone().into());
                peer.insert("ipBlock".into(), Value::Mapping(block));
            } else {
                let mut ns = serde_yaml::Mapping::new();
                if !a.namespace.is_empty() {
                    let mut labels = serde_yaml::Mapping::new();
                    labels.insert(
                        "kubernetes.io/metadata.name".into(),
                        a.namespace.clone().into(),
                    );
                    ns.insert("matchLabels".into(), Value::Mapping(labels));
                }
                peer.insert("namespaceSelector".into(), Value::Mapping(ns));
                let mut pods = serde_yaml::Mapping::new();
                if !a.labels.is_empty() {
                    let labels: serde_yaml::Mapping = a
                        .labels
                        .iter()
                        .map(|(k, v)| (Value::from(k.clone()), Value::from(v.clone())))
                        .collect();
                    pods.insert("matchLabels".into(), Value::Mapping(labels));
                }
                peer.insert("podSelector".into(), Value::Mapping(pods));
            }
            if a.port != 0 {
                let mut port = serde_yaml::Mapping::new();
                port.insert("port".into(), Value::from(a.port as u64));
                let proto = if a.protocol.is_empty() {
                    "TCP".to_string()
                } else {
                    a.protocol.to_uppercase()
                };
                port.insert("protocol".into(), proto.into());
                peer.insert("ports".into(), Value::Sequence(vec![Value::Mapping(port)]));
            }
            allow.push(Value::Mapping(peer));
        }
        let mut spec = serde_yaml::Mapping::new();
        spec.insert("pods".into(), Value::Sequence(vec![r.pod.clone().into()]));
        spec.insert("reason".into(), r.reason.clone().into());
        if !allow.is_empty() {
            spec.insert("allow".into(), Value::Sequence(allow));
        }
        if let Some(t) = expires {
            spec.insert("expiresAt".into(), rfc3339(t).into());
        }
        let mut meta = serde_yaml::Mapping::new();
        meta.insert("name".into(), name.clone().into());
        meta.insert("namespace".into(), r.namespace.clone().into());
        let mut annotations = serde_yaml::Mapping::new();
        annotations.insert("bulkhead.dev/quarantined-by".into(), r.actor.clone().into());
        annotations.insert("bulkhead.dev/quarantined-at".into(), rfc3339(now).into());
        meta.insert("annotations".into(), Value::Mapping(annotations));
        let mut doc = serde_yaml::Mapping::new();
        doc.insert("apiVersion".into(), "bulkhead.dev/v1alpha1".into());
        doc.insert("kind".into(), "Quarantine".into());
        doc.insert("metadata".into(), Value::Mapping(meta));
        doc.insert("spec".into(), Value::Mapping(spec));
        let doc = Value::Mapping(doc);
        let text = serde_yaml::to_string(&doc).map_err(|e| self.io(e))?;
        let (nodes, reference) = match &self.store {
            Store::Kubernetes(k) => {
                let (nodes, reference) = self.kube_apply(k, &r.namespace, &name, &text, &doc)?;
                (nodes, Some(reference))
            }
            Store::Dir { .. } => (self.write_file(&r.namespace, &r.pod, text)?, None),
        };
        if let Ok(mut c) = self.carried_by.lock() {
            c.insert(format!("{}/{}", r.namespace, r.pod), nodes.clone());
        }
        let info = pb::QuarantineInfo {
            namespace: r.namespace,
            pod: r.pod,
            name,
            reason: r.reason,
            created_at: rfc3339(now),
            expires_at: expires.map(rfc3339).unwrap_or_default(),
            actor: r.actor,
            ..Default::default()
        };
        self.audit("quarantine", &info)?;
        if let (Store::Kubernetes(k), Some(reference)) = (&self.store, reference) {
            self.kube_event(k, &reference, "quarantine", &info);
        }
        Ok(pb::QuarantineResponse {
            quarantine: Some(info),
            nodes: nodes.into_iter().collect(),
        })
    }

    pub fn release(
        &self,
        r: pb::ReleaseRequest,
    ) -> Result<pb::QuarantineResponse, QuarantineError> {
        if let Store::Kubernetes(k) = &self.store {
            return self.kube_release(k, r);
        }
        let path = self.file(&r.namespace, &r.pod);
        let Some(mut info) = self.read(&path) else {
            return Err(QuarantineError::NotQuarantined(format!(
                "{}/{}",
                r.namespace, r.pod
            )));
        };
        std::fs::remove_file(&path).map_err(|e| self.io(e))?;
        let nodes = self.apply_now()?;
        if let Ok(mut c) = self.carried_by.lock() {
            c.remove(&format!("{}/{}", r.namespace, r.pod));
        }
        info.actor = r.actor;
        self.audit("release", &info)?;
        Ok(pb::QuarantineResponse {
            quarantine: Some(info),
            nodes: nodes.into_iter().collect(),
        })
    }

    fn read(&self, path: &Path) -> Option<pb::QuarantineInfo> {
        let text = std::fs::read_to_string(path).ok()?;
        let v: Value = serde_yaml::from_str(&text).ok()?;
        let s = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
        let meta = v.get("metadata")?;
        let spec = v.get("spec")?;
        let annotations = meta.get("annotations");
        Some(pb::QuarantineInfo {
            namespace: s(meta.get("namespace")),
            pod: s(spec.get("pods").and_then(|p| p.get(0))),
            name: s(meta.get("name")),
            reason: s(spec.get("reason")),
            created_at: s(annotations.and_then(|a| a.get("bulkhead.dev/quarantined-at"))),
            expires_at: s(spec.get("expiresAt")),
            actor: s(annotations.and_then(|a| a.get("bulkhead.dev/quarantined-by"))),
            ..Default::default()
        })
    }

    /// When each node had the quarantine in its kernel, and the connections it cut there.
    fn fill_status(&self, q: &mut pb::QuarantineInfo) {
        let key = format!("{}/{}", q.namespace, q.pod);
        let Some(nodes) = self
            .carried_by
            .lock()
            .ok()
            .and_then(|c| c.get(&key).cloned())
        else {
            return;
        };
        // This controller placed it: the hub's acknowledgements are fresher than a status
        // written on the last status interval, and replace it.
        let mut enforced_at = std::collections::HashMap::new();
        let mut cut = 0;
        for (node, version) in nodes {
            if let Some((at, c)) = self.hub.enforced(&node, version) {
                enforced_at.insert(node, humantime::format_rfc3339_millis(at).to_string());
                cut += c;
            }
        }
        if !enforced_at.is_empty() {
            q.enforced_at = enforced_at;
            q.connections_cut = cut;
        }
    }

    /// Every quarantine, sorted by pod. In Kubernetes mode an API error is an error, not an
    /// empty list (which would read as "nothing is quarantined"). Synchronous: call it off the
    /// async runtime's workers.
    pub fn list(&self) -> Result<Vec<pb::QuarantineInfo>, QuarantineError> {
        let found: Vec<pb::QuarantineInfo> = match &self.store {
            Store::Dir { dir, .. } => std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "yaml"))
                .filter_map(|e| self.read(&e.path()))
                .collect(),
            Store::Kubernetes(k) => {
                let api: Api<Quarantine> = Api::all(k.client.clone());
                let list = k
                    .handle
                    .block_on(api.list(&ListParams::default()))
                    .map_err(kube_err)?;
                list.items.iter().map(info_of).collect()
            }
        };
        let mut out: Vec<pb::QuarantineInfo> = found
            .into_iter()
            .map(|mut q| {
                self.fill_status(&mut q);
                q
            })
            .collect();
        out.sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)));
        Ok(out)
    }
}

fn kube_err(e: kube::Error) -> QuarantineError {
    QuarantineError::Kubernetes(e.to_string())
}

fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// What `list` shows of a Quarantine object (the same fields as the file case reads).
fn info_of(q: &Quarantine) -> pb::QuarantineInfo {
    let annotation = |k: &str| {
        q.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(k))
            .cloned()
            .unwrap_or_default()
    };
    pb::QuarantineInfo {
        namespace: q.metadata.namespace.clone().unwrap_or_default(),
        pod: q
            .spec
            .pods
            .as_ref()
            .and_then(|p| p.first())
            .cloned()
            .unwrap_or_default(),
        name: q.metadata.name.clone().unwrap_or_default(),
        reason: q.spec.reason.clone(),
        created_at: annotation("bulkhead.dev/quarantined-at"),
        expires_at: q.spec.expires_at.clone().unwrap_or_default(),
        actor: annotation("bulkhead.dev/quarantined-by"),
        // Where and when it took effect, as the controller reported it in the object's status
        // (also for Quarantines written with kubectl).
        enforced_at: q
            .status
            .as_ref()
            .map(|s| s.enforced_at.clone().into_iter().collect())
            .unwrap_or_default(),
        connections_cut: q
            .status
            .as_ref()
            .and_then(|s| s.connections_cut)
            .unwrap_or(0),
    }
}

impl QuarantineControl {
    /// Server-side apply of the Quarantine object, then waits until the hub has it.
    fn kube_apply(
        &self,
        k: &KubeStore,
        namespace: &str,
        name: &str,
        text: &str,
        doc: &Value,
    ) -> Result<(BTreeMap<String, u64>, ObjectReference), QuarantineError> {
        // What the source's loader would refuse is refused here, before anything is written.
        let loaded = crate::load::load_str(Path::new("quarantine request"), text);
        if let Some(e) = loaded.errors.first() {
            return Err(QuarantineError::Rejected(e.to_string()));
        }
        let body =
            serde_json::to_value(doc).map_err(|e| QuarantineError::Invalid(e.to_string()))?;
        let api: Api<Quarantine> = Api::namespaced(k.client.clone(), namespace);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let object = k
            .handle
            .block_on(api.patch(name, &params, &Patch::Apply(&body)))
            .map_err(kube_err)?;
        // What the source will hand the engine once its watch delivers this version (the
        // object as the API server stored it, through the source's own conversion): waiting for
        // exactly that, not merely for a Quarantine of this name, makes a re-quarantine with a
        // new reason or new exceptions return only once those are in the rule sets.
        let stored = serde_json::to_value(&object).map_err(|e| self.io(e))?;
        let expected = match crate::kubernetes::inventory::convert(
            crate::kubernetes::Kind::Quarantine,
            &stored,
        ) {
            Ok(Some(crate::Object::Policy(p))) => Some(p),
            Ok(_) => None,
            Err(e) => return Err(QuarantineError::Rejected(e)),
        };
        let nodes = self.wait_for(
            k,
            namespace,
            name,
            expected.as_ref().map_or(Want::Present, Want::Exactly),
        )?;
        Ok((nodes, object.object_ref(&())))
    }

    fn kube_release(
        &self,
        k: &KubeStore,
        r: pb::ReleaseRequest,
    ) -> Result<pb::QuarantineResponse, QuarantineError> {
        let who = format!("{}/{}", r.namespace, r.pod);
        let name = format!("quarantine-{}", r.pod);
        let api: Api<Quarantine> = Api::namespaced(k.client.clone(), &r.namespace);
        let Some(object) = k.handle.block_on(api.get_opt(&name)).map_err(kube_err)? else {
            return Err(QuarantineError::NotQuarantined(who));
        };
        match k
            .handle
            .block_on(api.delete(&name, &DeleteParams::default()))
        {
            Ok(_) => {}
            Err(e) if not_found(&e) => return Err(QuarantineError::NotQuarantined(who)),
            Err(e) => return Err(kube_err(e)),
        }
        let nodes = self.wait_for(k, &r.namespace, &name, Want::Absent)?;
        if let Ok(mut c) = self.carried_by.lock() {
            c.remove(&who);
        }
        let mut info = info_of(&object);
        info.actor = r.actor;
        self.audit("release", &info)?;
        self.kube_event(k, &object.object_ref(&()), "release", &info);
        Ok(pb::QuarantineResponse {
            quarantine: Some(info),
            nodes: nodes.into_iter().collect(),
        })
    }

    /// Polls the hub until the Quarantine `namespace/name` is (or no longer is) in a rule set,
    /// then returns every node's current version, for callers to wait for enforcement.
    fn wait_for(
        &self,
        k: &KubeStore,
        namespace: &str,
        name: &str,
        want: Want<'_>,
    ) -> Result<BTreeMap<String, u64>, QuarantineError> {
        let deadline = std::time::Instant::now() + k.wait;
        let key = crate::PolicyKey {
            kind: RuleKind::Quarantine,
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        let present = !matches!(want, Want::Absent);
        loop {
            let seen = self.hub.policy_status().iter().any(|p| {
                p.kind == RuleKind::Quarantine && p.namespace == namespace && p.name == name
            });
            let current = match want {
                Want::Exactly(p) => self.hub.quarantine(&key).as_ref() == Some(p),
                _ => true,
            };
            if seen == present && current {
                return Ok(self
                    .hub
                    .node_states()
                    .into_iter()
                    .map(|n| (n.node, n.version))
                    .collect());
            }
            if std::time::Instant::now() >= deadline {
                return Err(QuarantineError::NotSeen(if present {
                    format!("Quarantine {namespace}/{name}")
                } else {
                    format!("the deletion of Quarantine {namespace}/{name}")
                }));
            }
            std::thread::sleep(POLL);
        }
    }

    /// A Normal Event on the Quarantine object; failing to publish it is only logged.
    fn kube_event(
        &self,
        k: &KubeStore,
        reference: &ObjectReference,
        action: &str,
        info: &pb::QuarantineInfo,
    ) {
        let (reason, verb) = if action == "quarantine" {
            ("Quarantined", "Quarantine")
        } else {
            ("Released", "Release")
        };
        let note = format!(
            "{} {}/{} by {}: {}",
            if action == "quarantine" {
                "quarantined"
            } else {
                "released"
            },
            info.namespace,
            info.pod,
            info.actor,
            info.reason
        );
        let event = KubeEvent {
            type_: EventType::Normal,
            reason: reason.into(),
            note: Some(truncate(&note, EVENT_NOTE_MAX)),
            action: verb.into(),
            secondary: None,
        };
        if let Err(e) = k.handle.block_on(k.recorder.publish(&event, reference)) {
            tracing::warn!(namespace = %info.namespace, quarantine = %info.name, error = %e, "could not publish the quarantine Event");
        }
    }
}
