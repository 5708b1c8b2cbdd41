//! Quarantine through the controller's API: each quarantine is a `bulkhead.dev/v1alpha1`
//! Quarantine manifest the controller writes into its quarantine directory (one of the
//! directories it reads), so it is compiled like any other policy, survives controller restarts,
//! and is the same object a Kubernetes user would create. The change is applied at once with
//! priority delivery rather than at the next reload, and every quarantine and release is
//! appended to `audit.log` (JSON lines) and recorded as a flow.
//!
//! Files are `DIR/NAMESPACE/POD.yaml`: both parts are validated Kubernetes names (a namespace is
//! a DNS label, a pod a DNS subdomain), on every path in (quarantine, release), so no two pods
//! share a file and no request names a path outside the directory. A quarantine whose
//! `expiresAt` has passed is lifted by [`QuarantineControl::expire_due`]: its file is removed and
//! `audit.log` gets an `expire` line, so it no longer shows anywhere.
//!
//! In Kubernetes mode ([`QuarantineControl::kubernetes`]) there is no directory: the same
//! object is written to the API by server-side apply (field manager `bulkhead-controller`) in
//! the pod's namespace, and released by deleting it. The Kubernetes source's watch brings it to
//! the hub (with priority delivery, like any Quarantine object); the call returns once the hub
//! has it. The audit goes to the log (same JSON line, via tracing), the flow store and a
//! Kubernetes Event on the object. An expired Quarantine object is left in place (its status says
//! `Expired`; the status writer logs the `expire` audit line and publishes an Event once) and is
//! no longer listed.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use bulkhead_proto::v1 as pb;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Resource,
    api::{Api, DeleteParams, ListParams, Patch, PatchParams},
    runtime::events::{Event as KubeEvent, EventType},
};

use super::{FlowStore, Hub, ManifestSource};
use crate::InputError;
use crate::kubernetes::Quarantine;
use crate::kubernetes::crd::{IntOrString, IpBlock, PolicyPort, QuarantineAllow, QuarantineSpec};
use crate::kubernetes::status::{EVENT_NOTE_MAX, FIELD_MANAGER, rfc3339, rfc3339_millis, truncate};
use crate::load::{Fill, deserialize_at};
use crate::ruleset::{FlowEntry, PodKey, QuarantineAction, QuarantineEvent, RuleKind};
use crate::selector::LabelSelectorSpec;

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

/// The longest quarantine with an end (`--for`, `"for"`): 10 years of 365.25 days. Longer
/// ones are refused rather than overflowing the clock or the RFC 3339 years a manifest can hold;
/// a quarantine without `--for` lasts until it is released.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 31_557_600);

/// A quarantine's object is `quarantine-POD`, and an object's name has at most 253 characters.
const MAX_POD_NAME: usize = 253 - "quarantine-".len();

/// Who the audit log names when a quarantine ends because its `expiresAt` passed.
pub const EXPIRY_ACTOR: &str = "controller (expiresAt passed)";

/// How often the hub is looked at while waiting for a write to reach it.
const POLL: Duration = Duration::from_millis(20);

/// What the quarantine API needs: where quarantines live, and the path into the engine.
pub struct QuarantineControl {
    store: Store,
    hub: Arc<Hub>,
    flows: Arc<Mutex<FlowStore>>,
    /// Per quarantined `namespace/pod`: the node versions that carried it (for its status).
    carried_by: Mutex<BTreeMap<String, BTreeMap<String, u64>>>,
    /// Held by quarantine, release and expiry while they change the directory, so that an
    /// expiry never removes a file a concurrent re-quarantine just wrote.
    writes: Mutex<()>,
}

/// A DNS-1123 label, what a namespace's name must be: at most 63 of `a-z`, `0-9` and `-`,
/// beginning and ending with an alphanumeric.
fn dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// `namespace/pod` must be a namespace's and a pod's name as Kubernetes allows them (and short
/// enough for the Quarantine object's name). Every path in checks this before a name reaches a
/// file path or an API URL: neither name can hold `/`, and no dot-separated part is empty, so
/// `..` is impossible.
fn check_names(namespace: &str, pod: &str) -> Result<(), QuarantineError> {
    if !dns_label(namespace) {
        return Err(QuarantineError::Invalid(format!(
            "namespace {namespace:?} is not a Kubernetes namespace name: use at most 63 lower-case alphanumerics or '-', beginning and ending with an alphanumeric"
        )));
    }
    if let Some(problem) = crate::selector::dns_subdomain_problem(pod) {
        return Err(QuarantineError::Invalid(format!(
            "pod {pod:?} is not a Kubernetes pod name: {problem}"
        )));
    }
    if pod.len() > MAX_POD_NAME {
        return Err(QuarantineError::Invalid(format!(
            "pod names over {MAX_POD_NAME} characters cannot be quarantined: the Quarantine object quarantine-POD would exceed 253 characters"
        )));
    }
    Ok(())
}

/// Whether a quarantine with this `expiresAt` (as written in its object) has ended at `now`.
/// A time before 1970 is a time in the past: such a quarantine has expired, as the engine
/// treats it. One that does not parse has not (the loader refuses its object).
fn expired(expires_at: &str, now: SystemTime) -> bool {
    !expires_at.is_empty() && crate::load::parse_rfc3339(expires_at).is_ok_and(|t| t <= now)
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
            writes: Mutex::new(()),
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
            writes: Mutex::new(()),
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

    /// Where the quarantine of `namespace/pod` is kept: `DIR/NAMESPACE/POD.yaml`. Only for
    /// names [`check_names`] accepted: a namespace has no `/` or `.`, a pod no `/` and no empty
    /// part, so each pod has its own file, inside the directory.
    fn file(&self, namespace: &str, pod: &str) -> PathBuf {
        self.dir().join(namespace).join(format!("{pod}.yaml"))
    }

    /// Where controllers before this layout kept it: `DIR/NAMESPACE--POD.yaml`, a name two pods
    /// can share (`a/b--c` and `a--b/c`). A controller upgraded in place still has such files:
    /// the manifest source compiles them as before, [`Self::list`] shows them (it reads every
    /// file's object, whatever its name), and [`Self::files_of`] counts one as this pod's only
    /// if the object in it names this namespace and pod. It is deleted when that pod is
    /// released or its quarantine expires, and replaced by the new file when it is quarantined
    /// again.
    fn legacy_file(&self, namespace: &str, pod: &str) -> PathBuf {
        self.dir().join(format!("{namespace}--{pod}.yaml"))
    }

    /// The files that hold the quarantine of `namespace/pod` (the current one and a legacy
    /// one, if either exists and its object is that pod's), with what they hold.
    fn files_of(&self, namespace: &str, pod: &str) -> Vec<(PathBuf, pb::QuarantineInfo)> {
        [self.file(namespace, pod), self.legacy_file(namespace, pod)]
            .into_iter()
            .filter_map(|path| {
                let info = self.read(&path)?;
                (info.namespace == namespace && info.pod == pod).then_some((path, info))
            })
            .collect()
    }

    /// Every quarantine file in the directory: `NAMESPACE/POD.yaml`, and legacy
    /// `NAMESPACE--POD.yaml` at the top.
    fn all_files(&self) -> Vec<(PathBuf, pb::QuarantineInfo)> {
        let yaml = |p: &Path| p.extension().is_some_and(|x| x == "yaml");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(self.dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = entry.path();
            if path.is_dir() {
                for inner in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                    let inner = inner.path();
                    if yaml(&inner)
                        && let Some(info) = self.read(&inner)
                    {
                        out.push((inner, info));
                    }
                }
            } else if yaml(&path)
                && let Some(info) = self.read(&path)
            {
                out.push((path, info));
            }
        }
        out
    }

    /// Removes a quarantine file, and its namespace's directory once that is empty.
    fn remove(&self, path: &Path) -> Result<(), QuarantineError> {
        std::fs::remove_file(path).map_err(|e| self.io(e))?;
        if let Some(parent) = path.parent()
            && parent != self.dir()
        {
            // Fails, as it should, while other pods of the namespace are quarantined.
            let _ = std::fs::remove_dir(parent);
        }
        Ok(())
    }

    fn lock_writes(&self) -> Result<std::sync::MutexGuard<'_, ()>, QuarantineError> {
        self.writes
            .lock()
            .map_err(|_| QuarantineError::Apply("quarantine write lock poisoned".into()))
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

    fn audit(
        &self,
        action: QuarantineAction,
        info: &pb::QuarantineInfo,
    ) -> Result<(), QuarantineError> {
        let line = serde_json::json!({
            "time": rfc3339(SystemTime::now()),
            "action": action.as_str(),
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
                FlowEntry::Quarantine(QuarantineEvent {
                    time_unix_nanos: SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_nanos() as u64)
                        .unwrap_or(0),
                    pod: PodKey {
                        namespace: info.namespace.clone(),
                        name: info.pod.clone(),
                    },
                    action,
                    quarantine: info.name.clone(),
                    reason: info.reason.clone(),
                    actor: info.actor.clone(),
                }),
            );
        }
        tracing::warn!(action = action.as_str(), namespace = %info.namespace, pod = %info.pod, reason = %info.reason, actor = %info.actor, "quarantine audit");
        Ok(())
    }

    /// Writes the manifest (replacing a legacy file of the same pod) and applies it; on
    /// failure puts back what was there.
    fn write_file(
        &self,
        namespace: &str,
        pod: &str,
        text: String,
    ) -> Result<BTreeMap<String, u64>, QuarantineError> {
        let path = self.file(namespace, pod);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| self.io(e))?;
        }
        // What was there, to put back if the manifest is refused: this pod's file and its
        // legacy file (removed now, else the object would be defined twice).
        let previous: Vec<(PathBuf, Option<String>)> = [path.clone()]
            .into_iter()
            .chain(
                self.files_of(namespace, pod)
                    .into_iter()
                    .map(|(p, _)| p)
                    .filter(|p| *p != path),
            )
            .map(|p| {
                let text = std::fs::read_to_string(&p).ok();
                (p, text)
            })
            .collect();
        let tmp = path.with_extension("yaml.tmp");
        std::fs::write(&tmp, text).map_err(|e| self.io(e))?;
        std::fs::rename(&tmp, &path).map_err(|e| self.io(e))?;
        for (p, _) in previous.iter().filter(|(p, _)| *p != path) {
            std::fs::remove_file(p).map_err(|e| self.io(e))?;
        }
        match self.apply_now() {
            Ok(nodes) => Ok(nodes),
            Err(e) => {
                // Put back what was there: a rejected request changes nothing.
                for (p, text) in &previous {
                    let _ = match text {
                        Some(t) => std::fs::write(p, t),
                        None => std::fs::remove_file(p),
                    };
                }
                let _ = self.apply_now();
                Err(e)
            }
        }
    }

    pub fn quarantine(
        &self,
        r: pb::QuarantineRequest,
    ) -> Result<pb::QuarantineResponse, QuarantineError> {
        check_names(&r.namespace, &r.pod)?;
        let duration = Duration::from_secs(r.duration_seconds);
        if duration > MAX_DURATION {
            return Err(QuarantineError::Invalid(format!(
                "a quarantine can last at most 10 years, not {}: leave the duration out to quarantine until released",
                humantime::format_duration(duration)
            )));
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
        let expires = match r.duration_seconds {
            0 => None,
            _ => Some(now.checked_add(duration).ok_or_else(|| {
                QuarantineError::Invalid("the quarantine would end past the clock's range".into())
            })?),
        };
        let name = format!("quarantine-{}", r.pod);
        let object = quarantine_object(&r, &name, now, expires);
        let (nodes, reference) = match &self.store {
            Store::Kubernetes(k) => {
                let (nodes, reference) = self.kube_apply(k, &r.namespace, &name, &object)?;
                (nodes, Some(reference))
            }
            Store::Dir { .. } => {
                let text = serde_yaml::to_string(&object).map_err(|e| self.io(e))?;
                let _writes = self.lock_writes()?;
                (self.write_file(&r.namespace, &r.pod, text)?, None)
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
        self.audit(QuarantineAction::Quarantine, &info)?;
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
        check_names(&r.namespace, &r.pod)?;
        if let Store::Kubernetes(k) = &self.store {
            return self.kube_release(k, r);
        }
        let _writes = self.lock_writes()?;
        let files = self.files_of(&r.namespace, &r.pod);
        let Some((_, mut info)) = files.first().cloned() else {
            return Err(QuarantineError::NotQuarantined(format!(
                "{}/{}",
                r.namespace, r.pod
            )));
        };
        for (path, _) in &files {
            self.remove(path)?;
        }
        let nodes = self.apply_now()?;
        if let Ok(mut c) = self.carried_by.lock() {
            c.remove(&format!("{}/{}", r.namespace, r.pod));
        }
        info.actor = r.actor;
        self.audit(QuarantineAction::Release, &info)?;
        Ok(pb::QuarantineResponse {
            quarantine: Some(info),
            nodes: nodes.into_iter().collect(),
        })
    }

    /// Lifts the quarantines of the directory whose `expiresAt` is not after `now`: removes
    /// their files, applies that, and writes an `expire` line to the audit log for each (the
    /// engine has stopped enforcing them already, at the same time; this is what makes them
    /// leave the listing, the map and the manifests). Returns what expired. Called every
    /// second by the controller; synchronous, like the rest.
    ///
    /// In Kubernetes mode it does nothing: an expired Quarantine object stays (its status says
    /// `Expired`), the leader's status writer logs the `expire` audit line and publishes an
    /// Event once, and [`Self::list`] leaves it out.
    pub fn expire_due(&self, now: SystemTime) -> Result<Vec<pb::QuarantineInfo>, QuarantineError> {
        if matches!(self.store, Store::Kubernetes(_)) {
            return Ok(Vec::new());
        }
        let _writes = self.lock_writes()?;
        let due: Vec<(PathBuf, pb::QuarantineInfo)> = self
            .all_files()
            .into_iter()
            .filter(|(_, info)| expired(&info.expires_at, now))
            .collect();
        if due.is_empty() {
            return Ok(Vec::new());
        }
        for (path, _) in &due {
            self.remove(path)?;
        }
        // The engine no longer enforces them, so a failure here (another manifest that does
        // not load) leaves nothing in force; the files are gone and the next reload applies it.
        if let Err(e) = self.apply_now() {
            tracing::warn!(error = %e, "expired quarantines removed; applying that waits for the next reload");
        }
        let mut out = Vec::new();
        for (_, mut info) in due {
            if let Ok(mut c) = self.carried_by.lock() {
                c.remove(&format!("{}/{}", info.namespace, info.pod));
            }
            info.actor = EXPIRY_ACTOR.into();
            self.audit(QuarantineAction::Expire, &info)?;
            out.push(info);
        }
        Ok(out)
    }

    /// A quarantine file, read as the [`Quarantine`] it holds.
    fn read(&self, path: &Path) -> Option<pb::QuarantineInfo> {
        let text = std::fs::read_to_string(path).ok()?;
        let v: serde_yaml::Value = serde_yaml::from_str(&text).ok()?;
        if v.get("kind").and_then(serde_yaml::Value::as_str) != Some("Quarantine") {
            return None;
        }
        let q: Quarantine = deserialize_at(v, Quarantine::FILL, "").ok()?;
        Some(info_of(&q))
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
                enforced_at.insert(node, rfc3339_millis(at));
                cut += c;
            }
        }
        if !enforced_at.is_empty() {
            q.enforced_at = enforced_at;
            q.connections_cut = cut;
        }
    }

    /// Every quarantine in force, sorted by pod: one whose `expiresAt` has passed is not
    /// listed (the engine no longer enforces it), also in the second before
    /// [`Self::expire_due`] removes its file. In Kubernetes mode an API error is an error, not
    /// an empty list (which would read as "nothing is quarantined"). Synchronous: call it off
    /// the async runtime's workers.
    pub fn list(&self) -> Result<Vec<pb::QuarantineInfo>, QuarantineError> {
        let found: Vec<pb::QuarantineInfo> = match &self.store {
            Store::Dir { .. } => self.all_files().into_iter().map(|(_, q)| q).collect(),
            Store::Kubernetes(k) => {
                let api: Api<Quarantine> = Api::all(k.client.clone());
                let list = k
                    .handle
                    .block_on(api.list(&ListParams::default()))
                    .map_err(kube_err)?;
                list.items.iter().map(info_of).collect()
            }
        };
        let now = SystemTime::now();
        let mut out: Vec<pb::QuarantineInfo> = found
            .into_iter()
            .filter(|q| !expired(&q.expires_at, now))
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

/// The Quarantine object a request asks for: the pod by name, the reason, the exceptions (pods
/// of a namespace — any without one — by labels, or a CIDR; each with an optional port) and
/// the end; annotated with who asked and when. The same object whether it is written to a file
/// or applied to the Kubernetes API, and the same a user could write.
pub fn quarantine_object(
    r: &pb::QuarantineRequest,
    name: &str,
    now: SystemTime,
    expires: Option<SystemTime>,
) -> Quarantine {
    let labels = |labels: BTreeMap<String, String>| LabelSelectorSpec {
        match_labels: (!labels.is_empty()).then_some(labels),
        match_expressions: None,
    };
    let allow: Vec<QuarantineAllow> = r
        .allow
        .iter()
        .map(|a| {
            let ports = (a.port != 0).then(|| {
                vec![PolicyPort {
                    protocol: Some(if a.protocol.is_empty() {
                        "TCP".to_string()
                    } else {
                        a.protocol.to_uppercase()
                    }),
                    port: Some(IntOrString::Int(i64::from(a.port))),
                    end_port: None,
                }]
            });
            if a.cidr.is_empty() {
                let namespace = (!a.namespace.is_empty()).then(|| {
                    (
                        "kubernetes.io/metadata.name".to_string(),
                        a.namespace.clone(),
                    )
                });
                QuarantineAllow {
                    pod_selector: Some(labels(a.labels.clone().into_iter().collect())),
                    namespace_selector: Some(labels(namespace.into_iter().collect())),
                    ip_block: None,
                    ports,
                }
            } else {
                QuarantineAllow {
                    ip_block: Some(IpBlock {
                        cidr: a.cidr.clone(),
                        except: None,
                    }),
                    ports,
                    ..Default::default()
                }
            }
        })
        .collect();
    let mut q = Quarantine::new(
        name,
        QuarantineSpec {
            pods: Some(vec![r.pod.clone()]),
            pod_selector: None,
            reason: Some(r.reason.clone()),
            allow: (!allow.is_empty()).then_some(allow),
            expires_at: expires.map(rfc3339),
        },
    );
    q.metadata.namespace = Some(r.namespace.clone());
    q.metadata.annotations = Some(BTreeMap::from([
        ("bulkhead.dev/quarantined-by".to_string(), r.actor.clone()),
        ("bulkhead.dev/quarantined-at".to_string(), rfc3339(now)),
    ]));
    q
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
        reason: q.spec.reason.clone().unwrap_or_default(),
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
        object: &Quarantine,
    ) -> Result<(BTreeMap<String, u64>, ObjectReference), QuarantineError> {
        // What the source's conversion would refuse is refused here, before anything is
        // written.
        if let Err(errors) = crate::load::convert(object) {
            let first = errors
                .into_iter()
                .next()
                .map(|e| InputError::invalid(Path::new("quarantine request"), 1, e).to_string());
            return Err(QuarantineError::Rejected(first.unwrap_or_default()));
        }
        let api: Api<Quarantine> = Api::namespaced(k.client.clone(), namespace);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let stored = k
            .handle
            .block_on(api.patch(name, &params, &Patch::Apply(object)))
            .map_err(kube_err)?;
        // What the source will hand the engine once its watch delivers this version (the
        // object as the API server stored it, through the source's own conversion): waiting for
        // exactly that, not merely for a Quarantine of this name, makes a re-quarantine with a
        // new reason or new exceptions return only once those are in the rule sets.
        let expected = match crate::load::convert(&stored) {
            Ok(crate::Object::Policy(p)) => Some(p),
            Ok(_) => None,
            Err(errors) => {
                return Err(QuarantineError::Rejected(
                    crate::kubernetes::watched::reasons(&errors),
                ));
            }
        };
        let nodes = self.wait_for(
            k,
            namespace,
            name,
            expected.as_ref().map_or(Want::Present, Want::Exactly),
        )?;
        Ok((nodes, stored.object_ref(&())))
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
        self.audit(QuarantineAction::Release, &info)?;
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

#[cfg(test)]
mod tests;
