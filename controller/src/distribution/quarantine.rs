//! Quarantine through the controller's API: each quarantine is a `bulkhead.dev/v1alpha1`
//! Quarantine manifest the controller writes into its quarantine directory (one of the
//! directories it reads), so it is compiled like any other policy, survives controller restarts,
//! and is the same object a Kubernetes user would create. The change is applied at once with
//! priority delivery rather than at the next reload, and every quarantine and release is
//! appended to `audit.log` (JSON lines) and recorded as a flow.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use bulkhead_proto::v1 as pb;
use serde_yaml::Value;

use super::{FlowStore, Hub, ManifestSource};

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

/// What the quarantine API needs: where quarantines live, and the path into the engine.
pub struct QuarantineControl {
    dir: PathBuf,
    source: Arc<Mutex<ManifestSource>>,
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
            dir,
            source,
            hub,
            flows,
            carried_by: Mutex::new(BTreeMap::new()),
        }
    }

    fn file(&self, namespace: &str, pod: &str) -> PathBuf {
        self.dir.join(format!("{namespace}--{pod}.yaml"))
    }

    fn io(&self, e: impl std::fmt::Display) -> QuarantineError {
        QuarantineError::Io {
            dir: self.dir.clone(),
            reason: e.to_string(),
        }
    }

    /// Re-reads the manifests and applies what changed, with priority delivery.
    fn apply_now(&self) -> Result<BTreeMap<String, u64>, QuarantineError> {
        let reload = {
            let mut source = self
                .source
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
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("audit.log"))
            .map_err(|e| self.io(e))?;
        writeln!(f, "{line}").map_err(|e| self.io(e))?;
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
        let text = serde_yaml::to_string(&Value::Mapping(doc)).map_err(|e| self.io(e))?;
        std::fs::create_dir_all(&self.dir).map_err(|e| self.io(e))?;
        let path = self.file(&r.namespace, &r.pod);
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
        Ok(pb::QuarantineResponse {
            quarantine: Some(info),
            nodes: nodes.into_iter().collect(),
        })
    }

    pub fn release(
        &self,
        r: pb::ReleaseRequest,
    ) -> Result<pb::QuarantineResponse, QuarantineError> {
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
        for (node, version) in nodes {
            if let Some((at, cut)) = self.hub.enforced(&node, version) {
                q.enforced_at
                    .insert(node, humantime::format_rfc3339_millis(at).to_string());
                q.connections_cut += cut;
            }
        }
    }

    pub fn list(&self) -> Vec<pb::QuarantineInfo> {
        let mut out: Vec<pb::QuarantineInfo> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "yaml"))
            .filter_map(|e| self.read(&e.path()))
            .map(|mut q| {
                self.fill_status(&mut q);
                q
            })
            .collect();
        out.sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)));
        out
    }
}
