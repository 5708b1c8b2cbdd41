//! Reading Kubernetes YAML: multi-document files or directories of them, validated the way the
//! API server validates, into the engine's [`Object`]s.
//!
//! Bad input never aborts the load: every invalid document becomes one or more [`InputError`]s
//! (file, document number starting at 1, field path, reason) and the valid documents are kept.
//!
//! This module reads the documents and dispatches them by kind; each kind's shape (only the
//! fields Bulkhead reads; unknown fields are ignored like kubectl does without
//! `--validate=strict`, except in Bulkhead's own kinds) and its conversion live in a module of
//! their own: `inventory` (Namespace, Node, Pod, Deployment), `network_policy`,
//! `cluster_network_policy`, `service_policy` and `quarantine`, with what they share in `meta`
//! (names, namespaces, labels) and `peers` (peers, ports, protocols, CIDRs).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{FieldError, InputError};
use crate::model::{Object, Peer, Policy};

mod cluster_network_policy;
mod files;
mod inventory;
mod meta;
mod network_policy;
mod peers;
mod quarantine;
mod rfc3339;
mod service_policy;

pub use cluster_network_policy::CNP_PRIORITY_STRIDE;
pub use files::{MAX_DIR_DEPTH, MAX_FILE_BYTES, MAX_FILES, MAX_FLOW_DEPTH};
use files::{Walk, flow_depth, read_manifest};
pub use rfc3339::parse_rfc3339;

/// Most rules one policy may have per direction (rule ids reserve 9 bits for the position).
pub const MAX_RULES_PER_DIRECTION: usize = 510;

/// What a load produced: the valid objects (first definition wins on duplicates), the problems,
/// and notes about documents that were skipped on purpose.
#[derive(Debug, Default, Clone)]
pub struct Loaded {
    pub objects: Vec<Object>,
    pub errors: Vec<InputError>,
    pub warnings: Vec<String>,
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

/// Converts one document that is already a value, such as a Kubernetes API object: the same
/// validation and the same objects as for that document in a manifest, without writing it out
/// and parsing it back as YAML. Errors are the document's field errors.
pub fn load_document(value: &serde_yaml::Value) -> Result<Vec<Object>, Vec<FieldError>> {
    let (mut objects, mut errors, mut warnings) = (Vec::new(), Vec::new(), Vec::new());
    parse_value(value, "", &mut objects, &mut errors, &mut warnings);
    if errors.is_empty() {
        Ok(objects.into_iter().map(|(_, object)| object).collect())
    } else {
        Err(errors)
    }
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
        parse_value(&value, "", &mut objects, &mut errors, &mut loaded.warnings);
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
    warnings: &mut Vec<String>,
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
        "List" | "NamespaceList" | "PodList" | "NodeList" | "NetworkPolicyList"
        | "ClusterNetworkPolicyList" | "ServicePolicyList" | "QuarantineList" | "DeploymentList" => {
            match value.get("items").and_then(|i| i.as_sequence()) {
                Some(items) => {
                    for (i, item) in items.iter().enumerate() {
                        parse_value(item, &format!("{prefix}items[{i}]."), out, errors, warnings);
                    }
                }
                None => errors.push(FieldError::new(
                    format!("{prefix}items"),
                    "a List needs an items sequence",
                )),
            }
        }
        "Namespace" if expect("v1", errors) => {
            if let Some(ns) = parse_kind(value, prefix, errors, inventory::convert_namespace) {
                out.push((id(kind, "", &ns.name, prefix), Object::Namespace(ns)));
            }
        }
        "Node" if expect("v1", errors) => {
            if let Some(node) = parse_kind(value, prefix, errors, inventory::convert_node) {
                out.push((id(kind, "", &node.name, prefix), Object::Node(node)));
            }
        }
        "Pod" if expect("v1", errors) => {
            if let Some(pod) = parse_kind(value, prefix, errors, inventory::convert_pod) {
                out.push((id(kind, &pod.namespace, &pod.name, prefix), Object::Pod(pod)));
            }
        }
        "Deployment" if expect("apps/v1", errors) => {
            for pod in parse_kind(value, prefix, errors, inventory::convert_deployment) {
                out.push((id("Pod", &pod.namespace, &pod.name, prefix), Object::Pod(pod)));
            }
        }
        "NetworkPolicy" if expect("networking.k8s.io/v1", errors) => {
            if let Some(p) = parse_kind(value, prefix, errors, network_policy::convert) {
                out.push((id(kind, &p.key.namespace, &p.key.name, prefix), Object::Policy(p)));
            }
        }
        "ClusterNetworkPolicy" if expect("policy.networking.k8s.io/v1alpha2", errors) => {
            if let Some(p) = parse_kind(value, prefix, errors, cluster_network_policy::convert) {
                out.push((id(kind, "", &p.key.name, prefix), Object::Policy(p)));
            }
        }
        "ServicePolicy" if expect("bulkhead.dev/v1alpha1", errors) => {
            if let Some(p) = parse_kind(value, prefix, errors, service_policy::convert) {
                out.push((id(kind, &p.key.namespace, &p.key.name, prefix), Object::Policy(p)));
            }
        }
        "Quarantine" if expect("bulkhead.dev/v1alpha1", errors) => {
            if let Some(p) = parse_kind(value, prefix, errors, quarantine::convert) {
                out.push((id(kind, &p.key.namespace, &p.key.name, prefix), Object::Policy(p)));
            }
        }
        "Namespace" | "Node" | "Pod" | "Deployment" | "NetworkPolicy" | "ClusterNetworkPolicy"
        | "ServicePolicy" | "Quarantine" => {}
        other => warnings.push(format!(
            "skipping {other} {:?}: bulkhead policy reads Namespace, Pod, Node, Deployment, NetworkPolicy, ClusterNetworkPolicy, ServicePolicy, Quarantine and List",
            value
                .get("metadata")
                .and_then(|m| m.get("name"))
                .and_then(|n| n.as_str())
                .unwrap_or("")
        )),
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

/// Deserializes a document (or List item) into its kind's shape `T` and converts that; a value
/// that does not fit the shape is one error at the field's path (and converts to nothing).
fn parse_kind<T: for<'de> Deserialize<'de>, R: Default>(
    value: &serde_yaml::Value,
    prefix: &str,
    errors: &mut Vec<FieldError>,
    convert: impl FnOnce(&T, &str, &mut Vec<FieldError>) -> R,
) -> R {
    match parse_typed::<T>(value, prefix, errors) {
        Some(doc) => convert(&doc, prefix, errors),
        None => R::default(),
    }
}

/// Deserializes a document (or List item) into its kind's shape; a mismatch is one error at the
/// field's path.
fn parse_typed<T: for<'de> Deserialize<'de>>(
    value: &serde_yaml::Value,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value.clone()) {
        Ok(t) => Some(t),
        Err(e) => {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            errors.push(FieldError::new(
                format!("{prefix}{path}"),
                e.into_inner().to_string(),
            ));
            None
        }
    }
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
