//! Reading Kubernetes YAML: multi-document files or directories of them, validated the way the
//! API server validates, into the engine's [`Object`]s.
//!
//! Bad input never aborts the load: every invalid document becomes one or more [`InputError`]s
//! (file, document number starting at 1, field path, reason) and the valid documents are kept.
//!
//! This module reads the documents and dispatches them by kind. Each document is deserialized
//! into its kind's one Rust type — k8s-openapi's for Kubernetes' kinds, [`crate::kubernetes::crd`]'s
//! for custom resources; unknown fields are ignored like kubectl does without
//! `--validate=strict`, except in Bulkhead's own kinds — and converted by [`ToModel`], the same
//! conversion the Kubernetes source applies to the objects it watches. The conversions live in
//! a module per kind: `inventory` (Namespace, Node, Pod, Deployment), `network_policy`,
//! `cluster_network_policy`, `service_policy` and `quarantine`, with what they share in `meta`
//! (names, namespaces, labels) and `peers` (peers, ports, protocols, CIDRs).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::error::{FieldError, InputError};
use crate::kubernetes::crd::{
    ClusterNetworkPolicy, CnpVersion, Quarantine, ServicePolicy, StagedClusterNetworkPolicy,
    StagedNetworkPolicy,
};
use crate::model::{Object, Peer, Policy};

mod cluster_network_policy;
mod files;
mod inventory;
mod meta;
mod names;
mod network_policy;
mod peers;
mod quarantine;
mod rfc3339;
mod service_policy;
mod staged;

pub use cluster_network_policy::CNP_PRIORITY_STRIDE;
pub use files::{MAX_DIR_DEPTH, MAX_FILE_BYTES, MAX_FILES, MAX_FLOW_DEPTH};
use files::{Walk, flow_depth, read_manifest};
pub use rfc3339::parse_rfc3339;
pub use staged::stage;

/// Most rules one policy may have per direction (rule ids reserve 9 bits for the position).
pub const MAX_RULES_PER_DIRECTION: usize = 510;

/// What a load produced: the valid objects (first definition wins on duplicates), the problems,
/// and notes about documents that were skipped on purpose.
#[derive(Debug, Default, Clone)]
pub struct Loaded {
    pub objects: Vec<Object>,
    pub errors: Vec<InputError>,
    /// Documents of kinds bulkhead has no meaning for (another tool's, in the same files):
    /// left out, each worth a warning (its `Display`) unless the caller knows the kind.
    pub skipped: Vec<SkippedObject>,
}

/// A document of a kind bulkhead does not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedObject {
    pub api_version: String,
    pub kind: String,
    pub name: String,
}

impl std::fmt::Display for SkippedObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "skipping {} {:?}: bulkhead policy reads Namespace, Pod, Node, Deployment, NetworkPolicy, ClusterNetworkPolicy, ServicePolicy, Quarantine, StagedNetworkPolicy, StagedClusterNetworkPolicy and List",
            self.kind, self.name
        )
    }
}

impl Loaded {
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Loads files and directories (recursively, `*.yaml` / `*.yml`, in name order). A directory
/// reached twice (through a symbolic link to itself or an ancestor) is read once; the walk is
/// bounded in depth and files, every file in size, and every document in flow nesting, so a
/// hostile manifest directory costs an error, not the controller's memory or time.
pub fn load_paths<P: AsRef<Path>>(paths: &[P]) -> Loaded {
    let mut files = Vec::new();
    let mut loaded = Loaded::default();
    let mut walk = Walk::default();
    for p in paths {
        walk.collect(p.as_ref(), &mut files, &mut loaded.errors, 0);
    }
    let mut seen = Seen::default();
    for file in files {
        match read_manifest(&file) {
            Ok(text) => load_str_into(&file, &text, &mut loaded, &mut seen),
            Err(reason) => loaded.errors.push(InputError::Read {
                file: file.clone(),
                reason,
            }),
        }
    }
    loaded
}

/// Loads one multi-document YAML text; `file` is only used in messages.
pub fn load_str(file: &Path, text: &str) -> Loaded {
    let mut loaded = Loaded::default();
    load_str_into(file, text, &mut loaded, &mut Seen::default());
    loaded
}

/// A typed Kubernetes object the engine's model has a meaning for. This is the one conversion
/// of each kind: manifest documents are deserialized into these types and converted with it,
/// and so are the objects the Kubernetes source watches.
pub trait ToModel {
    /// The model object, or `None` with the problems in `errors` (each at its field's path,
    /// after `prefix`: where the object sits in its document, e.g. `items[2].`).
    fn to_model(&self, prefix: &str, errors: &mut Vec<FieldError>) -> Option<Object>;
}

impl ToModel for Namespace {
    fn to_model(&self, prefix: &str, errors: &mut Vec<FieldError>) -> Option<Object> {
        inventory::convert_namespace(self, prefix, errors).map(Object::Namespace)
    }
}

impl ToModel for Node {
    fn to_model(&self, prefix: &str, errors: &mut Vec<FieldError>) -> Option<Object> {
        inventory::convert_node(self, prefix, errors).map(Object::Node)
    }
}

impl ToModel for Pod {
    fn to_model(&self, prefix: &str, errors: &mut Vec<FieldError>) -> Option<Object> {
        inventory::convert_pod(self, prefix, errors).map(Object::Pod)
    }
}

impl ToModel for NetworkPolicy {
    fn to_model(&self, prefix: &str, errors: &mut Vec<FieldError>) -> Option<Object> {
        network_policy::convert(self, prefix, errors).map(Object::Policy)
    }
}

impl ToModel for ClusterNetworkPolicy {
    fn to_model(&self, prefix: &str, errors: &mut Vec<FieldError>) -> Option<Object> {
        cluster_network_policy::convert(self, prefix, errors).map(Object::Policy)
    }
}

impl ToModel for ServicePolicy {
    fn to_model(&self, prefix: &str, errors: &mut Vec<FieldError>) -> Option<Object> {
        service_policy::convert(self, prefix, errors).map(Object::Policy)
    }
}

impl ToModel for StagedNetworkPolicy {
    fn to_model(&self, prefix: &str, errors: &mut Vec<FieldError>) -> Option<Object> {
        staged::convert_network_policy(self, prefix, errors).map(Object::Policy)
    }
}

impl ToModel for StagedClusterNetworkPolicy {
    fn to_model(&self, prefix: &str, errors: &mut Vec<FieldError>) -> Option<Object> {
        staged::convert_cluster_network_policy(self, prefix, errors).map(Object::Policy)
    }
}

impl ToModel for Quarantine {
    fn to_model(&self, prefix: &str, errors: &mut Vec<FieldError>) -> Option<Object> {
        quarantine::convert(self, prefix, errors).map(Object::Policy)
    }
}

/// Converts one typed object (a watched API object, a quarantine being made): the same
/// validation and the same model object as for that object in a manifest. Errors are its
/// field errors.
pub fn convert<K: ToModel>(object: &K) -> Result<Object, Vec<FieldError>> {
    let mut errors = Vec::new();
    match object.to_model("", &mut errors) {
        Some(o) if errors.is_empty() => Ok(o),
        _ => Err(errors),
    }
}

/// Deserializes `value` into `K`, reporting a value that does not fit at the field's path
/// (after `prefix`). `fill` names top-level fields that the type requires but a document may
/// leave out (a custom resource's `metadata` and `spec`): they are read as empty objects, so
/// that what is missing inside them is reported at its own field.
pub fn deserialize_at<K: DeserializeOwned, D: DeserializeValue>(
    mut value: D,
    fill: &[&str],
    prefix: &str,
) -> Result<K, FieldError> {
    for field in fill {
        value.fill_missing(field);
    }
    value.deserialize_into::<K>().map_err(|(path, reason)| {
        let path = if path == "." { String::new() } else { path };
        FieldError::new(format!("{prefix}{path}"), reason)
    })
}

/// A value a typed object is deserialized from: a YAML document, or the JSON an API server
/// sent.
pub trait DeserializeValue: Sized {
    /// Sets `field` to an empty mapping if this is a mapping without it (or with it null).
    fn fill_missing(&mut self, field: &str);
    /// Deserializes into `K`: on failure the path of the field that did not fit and why.
    fn deserialize_into<K: DeserializeOwned>(self) -> Result<K, (String, String)>;
}

impl DeserializeValue for serde_yaml::Value {
    fn fill_missing(&mut self, field: &str) {
        if let Some(m) = self.as_mapping_mut()
            && m.get(field).is_none_or(serde_yaml::Value::is_null)
        {
            m.insert(field.into(), serde_yaml::Mapping::new().into());
        }
    }

    fn deserialize_into<K: DeserializeOwned>(self) -> Result<K, (String, String)> {
        serde_path_to_error::deserialize(self)
            .map_err(|e| (e.path().to_string(), e.into_inner().to_string()))
    }
}

impl DeserializeValue for serde_json::Value {
    fn fill_missing(&mut self, field: &str) {
        if let Some(m) = self.as_object_mut()
            && m.get(field).is_none_or(serde_json::Value::is_null)
        {
            m.insert(field.into(), serde_json::Value::Object(Default::default()));
        }
    }

    fn deserialize_into<K: DeserializeOwned>(self) -> Result<K, (String, String)> {
        serde_path_to_error::deserialize(self)
            .map_err(|e| (e.path().to_string(), e.into_inner().to_string()))
    }
}

/// The top-level fields a document of `K` may leave out (see [`deserialize_at`]).
pub trait Fill {
    const FILL: &'static [&'static str];
}

impl Fill for Namespace {
    const FILL: &'static [&'static str] = &[];
}
impl Fill for Node {
    const FILL: &'static [&'static str] = &[];
}
impl Fill for Pod {
    const FILL: &'static [&'static str] = &[];
}
impl Fill for NetworkPolicy {
    const FILL: &'static [&'static str] = &[];
}
impl Fill for Deployment {
    const FILL: &'static [&'static str] = &[];
}
/// (Its spec is required: `priority` and `subject` have no default.)
impl Fill for ClusterNetworkPolicy {
    const FILL: &'static [&'static str] = &["metadata"];
}
impl Fill for ServicePolicy {
    const FILL: &'static [&'static str] = &["metadata", "spec"];
}
impl Fill for Quarantine {
    const FILL: &'static [&'static str] = &["metadata", "spec"];
}
impl Fill for StagedNetworkPolicy {
    const FILL: &'static [&'static str] = &["metadata", "spec"];
}
/// (As ClusterNetworkPolicy: its spec is required.)
impl Fill for StagedClusterNetworkPolicy {
    const FILL: &'static [&'static str] = &["metadata"];
}

/// Where each object was first defined, to report duplicates.
#[derive(Default)]
struct Seen {
    objects: BTreeMap<(String, String, String), (PathBuf, usize)>,
}

fn load_str_into(file: &Path, text: &str, loaded: &mut Loaded, seen: &mut Seen) {
    if flow_depth(text, MAX_FLOW_DEPTH + 1) > MAX_FLOW_DEPTH {
        loaded.errors.push(InputError::Read {
            file: file.to_path_buf(),
            reason: format!(
                "flow collections ([ ], {{ }}) nested deeper than {MAX_FLOW_DEPTH} levels; not parsed"
            ),
        });
        return;
    }
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                loaded.errors.push(InputError::Yaml {
                    file: file.to_path_buf(),
                    document,
                    reason: e.to_string(),
                });
                // The YAML stream cannot be resynchronized after a syntax error.
                return;
            }
        };
        if value.is_null() {
            continue;
        }
        let mut errors = Vec::new();
        let mut objects = Vec::new();
        parse_value(&value, "", &mut objects, &mut errors, &mut loaded.skipped);
        for (id, object) in objects {
            let key = (id.0.clone(), id.1.clone(), id.2.clone());
            if let Some((f, d)) = seen.objects.get(&key) {
                errors.push(FieldError::new(
                    format!("{}metadata.name", id.3),
                    format!(
                        "duplicate {} {}: already defined in {} document {d}; rename one of them",
                        id.0,
                        if id.1.is_empty() {
                            id.2.clone()
                        } else {
                            format!("{}/{}", id.1, id.2)
                        },
                        f.display()
                    ),
                ));
                continue;
            }
            seen.objects.insert(key, (file.to_path_buf(), document));
            loaded.objects.push(object);
        }
        loaded.errors.extend(
            errors
                .into_iter()
                .map(|e| InputError::invalid(file, document, e)),
        );
    }
}

/// (kind, namespace, name, path prefix) of a parsed object.
type ObjectId = (String, String, String, String);

/// Parses one YAML value (a document or a List item) into objects; `prefix` is the path of the
/// value inside its document (`items[2].` for list items).
fn parse_value(
    value: &serde_yaml::Value,
    prefix: &str,
    out: &mut Vec<(ObjectId, Object)>,
    errors: &mut Vec<FieldError>,
    skipped: &mut Vec<SkippedObject>,
) {
    let Some(kind) = value.get("kind").and_then(|k| k.as_str()) else {
        errors.push(FieldError::new(
            format!("{prefix}kind"),
            "missing kind: every document needs apiVersion and kind",
        ));
        return;
    };
    let api_version = value
        .get("apiVersion")
        .and_then(|k| k.as_str())
        .unwrap_or("");
    let expect = |want: &str, errors: &mut Vec<FieldError>| -> bool {
        if api_version == want {
            true
        } else {
            errors.push(FieldError::new(
                format!("{prefix}apiVersion"),
                format!("{kind} must have apiVersion {want}, not {api_version:?}"),
            ));
            false
        }
    };
    match kind {
        "List"
        | "NamespaceList"
        | "PodList"
        | "NodeList"
        | "NetworkPolicyList"
        | "ClusterNetworkPolicyList"
        | "ServicePolicyList"
        | "QuarantineList"
        | "DeploymentList"
        | "StagedNetworkPolicyList"
        | "StagedClusterNetworkPolicyList" => {
            match value.get("items").and_then(|i| i.as_sequence()) {
                Some(items) => {
                    for (i, item) in items.iter().enumerate() {
                        parse_value(item, &format!("{prefix}items[{i}]."), out, errors, skipped);
                    }
                }
                None => errors.push(FieldError::new(
                    format!("{prefix}items"),
                    "a List needs an items sequence",
                )),
            }
        }
        "Namespace" if expect("v1", errors) => typed::<Namespace>(value, kind, prefix, out, errors),
        "Node" if expect("v1", errors) => typed::<Node>(value, kind, prefix, out, errors),
        "Pod" if expect("v1", errors) => typed::<Pod>(value, kind, prefix, out, errors),
        "Deployment" if expect("apps/v1", errors) => {
            if let Some(d) = parse_typed::<Deployment>(value, prefix, errors) {
                for pod in inventory::convert_deployment(&d, prefix, errors) {
                    out.push((
                        id("Pod", &pod.namespace, &pod.name, prefix),
                        Object::Pod(pod),
                    ));
                }
            }
        }
        "NetworkPolicy" if expect("networking.k8s.io/v1", errors) => {
            typed::<NetworkPolicy>(value, kind, prefix, out, errors)
        }
        // The same schema at both versions (network-policy-api v0.3.0 graduated it to v1beta1).
        "ClusterNetworkPolicy" => match CnpVersion::from_api_version(api_version) {
            Some(_) => typed::<ClusterNetworkPolicy>(value, kind, prefix, out, errors),
            None => errors.push(FieldError::new(
                format!("{prefix}apiVersion"),
                format!(
                    "ClusterNetworkPolicy must have apiVersion {} or {}, not {api_version:?}",
                    CnpVersion::V1beta1.api_version(),
                    CnpVersion::V1alpha2.api_version()
                ),
            )),
        },
        "ServicePolicy" if expect("bulkhead.dev/v1alpha1", errors) => {
            typed::<ServicePolicy>(value, kind, prefix, out, errors)
        }
        "Quarantine" if expect("bulkhead.dev/v1alpha1", errors) => {
            typed::<Quarantine>(value, kind, prefix, out, errors)
        }
        "StagedNetworkPolicy" if expect("bulkhead.dev/v1alpha1", errors) => {
            typed::<StagedNetworkPolicy>(value, kind, prefix, out, errors)
        }
        "StagedClusterNetworkPolicy" if expect("bulkhead.dev/v1alpha1", errors) => {
            typed::<StagedClusterNetworkPolicy>(value, kind, prefix, out, errors)
        }
        "Namespace"
        | "Node"
        | "Pod"
        | "Deployment"
        | "NetworkPolicy"
        | "ServicePolicy"
        | "Quarantine"
        | "StagedNetworkPolicy"
        | "StagedClusterNetworkPolicy" => {}
        other => skipped.push(SkippedObject {
            api_version: api_version.to_string(),
            kind: other.to_string(),
            name: value
                .get("metadata")
                .and_then(|m| m.get("name"))
                .and_then(|n| n.as_str())
                .unwrap_or("")
                .to_string(),
        }),
    }
}

fn id(kind: &str, ns: &str, name: &str, prefix: &str) -> ObjectId {
    (
        kind.to_string(),
        ns.to_string(),
        name.to_string(),
        prefix.to_string(),
    )
}

/// Deserializes a document (or List item) into its kind's type and converts that.
fn typed<K: ToModel + DeserializeOwned + Fill>(
    value: &serde_yaml::Value,
    kind: &str,
    prefix: &str,
    out: &mut Vec<(ObjectId, Object)>,
    errors: &mut Vec<FieldError>,
) {
    let Some(object) = parse_typed::<K>(value, prefix, errors) else {
        return;
    };
    let Some(object) = object.to_model(prefix, errors) else {
        return;
    };
    let (namespace, name) = match &object {
        Object::Namespace(n) => ("", n.name.as_str()),
        Object::Node(n) => ("", n.name.as_str()),
        Object::Pod(p) => (p.namespace.as_str(), p.name.as_str()),
        Object::Policy(p) => (p.key.namespace.as_str(), p.key.name.as_str()),
    };
    out.push((id(kind, namespace, name, prefix), object));
}

/// Deserializes a document (or List item) into its kind's type; a mismatch is one error at the
/// field's path.
fn parse_typed<K: DeserializeOwned + Fill>(
    value: &serde_yaml::Value,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Option<K> {
    let complete = K::FILL
        .iter()
        .all(|f| value.get(f).is_some_and(|v| !v.is_null()));
    let typed = if complete {
        // Read in place: a document is not copied to be deserialized.
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            FieldError::new(format!("{prefix}{path}"), e.into_inner().to_string())
        })
    } else {
        deserialize_at::<K, _>(value.clone(), K::FILL, prefix)
    };
    typed.map_err(|e| errors.push(e)).ok()
}

/// Label keys a set of policies' selectors look at (to warn about filtered labels).
pub fn selector_keys(policy: &Policy) -> BTreeSet<String> {
    let mut keys: BTreeSet<String> = policy.subject.pods.keys().map(str::to_string).collect();
    for r in &policy.rules {
        for p in &r.peers {
            if let Peer::Pods(s) = p {
                keys.extend(s.pods.keys().map(str::to_string));
            }
        }
    }
    keys
}
