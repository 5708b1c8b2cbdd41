//! Objects as the Kubernetes source watches them: each kind's own type (k8s-openapi's
//! [`Pod`], [`NetworkPolicy`], …, and [`super::crd`]'s custom resources), converted into the
//! model by [`crate::load::ToModel`] — the conversion manifest files go through — as soon as
//! the object arrives. Neither the JSON nor the typed object is kept: the inventory holds the
//! converted [`Entry`] (for 100,000 pods a few hundred bytes each, not a whole `Pod`).
//!
//! [`Checked<K>`] is the type the watch decodes into: an object that does not fit `K` (a
//! malformed field, a field a newer version of a custom resource added) must not fail the
//! list or watch it came in — which would stall every object of its kind — so each object is
//! read as a JSON value first and then into `K`, and one that does not fit is kept as its
//! error (with the field's path), reported like any invalid object.

use std::borrow::Cow;
use std::fmt::Debug;
use std::marker::PhantomData;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use super::crd::{
    ClusterNetworkPolicy, Quarantine, ServicePolicy, StagedClusterNetworkPolicy,
    StagedNetworkPolicy,
};
use super::inventory::{ApiKey, Kind};
use crate::error::FieldError;
use crate::load::{Fill, ToModel, deserialize_at};
use crate::model::Object;

/// A kind the source watches: its type, and what of it the model takes.
pub trait WatchedKind:
    Resource<DynamicType = ()> + DeserializeOwned + ToModel + Fill + Send + Sync + 'static
{
    const KIND: Kind;

    /// Whether the object is part of the model now (see [`Pod`]'s).
    fn in_model(&self) -> bool {
        true
    }
}

impl WatchedKind for Namespace {
    const KIND: Kind = Kind::Namespace;
}

impl WatchedKind for Node {
    const KIND: Kind = Kind::Node;
}

/// Pods that have finished give their addresses back: they are no endpoints any more. Pods
/// without an address yet (pending, sandbox not ready) are neither endpoints nor peers: they
/// join the model with their first address, in one change instead of two.
impl WatchedKind for Pod {
    const KIND: Kind = Kind::Pod;

    fn in_model(&self) -> bool {
        let Some(status) = &self.status else {
            return false;
        };
        let has_ip = status.pod_ip.as_deref().is_some_and(|ip| !ip.is_empty())
            || status.pod_ips.as_ref().is_some_and(|ips| !ips.is_empty());
        has_ip && !matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"))
    }
}

impl WatchedKind for NetworkPolicy {
    const KIND: Kind = Kind::NetworkPolicy;
}

impl WatchedKind for ClusterNetworkPolicy {
    const KIND: Kind = Kind::ClusterNetworkPolicy;
}

impl WatchedKind for ServicePolicy {
    const KIND: Kind = Kind::ServicePolicy;
}

impl WatchedKind for StagedNetworkPolicy {
    const KIND: Kind = Kind::StagedNetworkPolicy;
}

impl WatchedKind for StagedClusterNetworkPolicy {
    const KIND: Kind = Kind::StagedClusterNetworkPolicy;
}

impl WatchedKind for Quarantine {
    const KIND: Kind = Kind::Quarantine;
}

/// What the controller keeps of one watched object.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: ApiKey,
    pub uid: String,
    pub generation: Option<i64>,
    pub resource_version: String,
    /// The object's `status` as the API server has it (Bulkhead's kinds only).
    pub status: Option<Value>,
    /// The model object; `None` if the object is not part of the model (see
    /// [`WatchedKind::in_model`]); `Err`: why it is invalid (every problem, `; `-separated,
    /// each as a manifest's error says it, less the file and document).
    pub converted: Result<Option<Object>, String>,
}

/// An object of kind `K` from a list or a watch, converted (see the module doc).
pub struct Checked<K> {
    /// Name, namespace, uid, generation and resourceVersion only (the watcher reads the
    /// resourceVersion; the rest identifies the object in reports).
    metadata: ObjectMeta,
    status: Option<Value>,
    converted: Result<Option<Object>, String>,
    kind: PhantomData<fn() -> K>,
}

impl<K> Clone for Checked<K> {
    fn clone(&self) -> Self {
        Checked {
            metadata: self.metadata.clone(),
            status: self.status.clone(),
            converted: self.converted.clone(),
            kind: PhantomData,
        }
    }
}

impl<K> Debug for Checked<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checked")
            .field("metadata", &self.metadata)
            .field("converted", &self.converted)
            .finish_non_exhaustive()
    }
}

/// The version a kind is watched at: its type's own (the default), or another version of its
/// group with the same schema that the cluster serves instead (ClusterNetworkPolicy at
/// `v1alpha2`, see [`super::crd::CnpVersion`]). One type, the version a parameter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ServedVersion(pub Option<&'static str>);

impl<K: WatchedKind> Resource for Checked<K> {
    type DynamicType = ServedVersion;
    type Scope = K::Scope;

    fn kind(_: &ServedVersion) -> Cow<'_, str> {
        K::kind(&())
    }

    fn group(_: &ServedVersion) -> Cow<'_, str> {
        K::group(&())
    }

    fn version(dt: &ServedVersion) -> Cow<'_, str> {
        match dt.0 {
            Some(v) => Cow::Borrowed(v),
            None => K::version(&()),
        }
    }

    fn plural(_: &ServedVersion) -> Cow<'_, str> {
        K::plural(&())
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl<'de, K: WatchedKind> Deserialize<'de> for Checked<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Checked::decode(Value::deserialize(d)?))
    }
}

impl<K: WatchedKind> Checked<K> {
    /// Reads an API object into `K` and converts it; never fails (an object that does not fit
    /// is its error).
    pub fn decode(mut value: Value) -> Self {
        let str_at = |m: &Value, f: &str| m.get(f).and_then(Value::as_str).map(str::to_string);
        let metadata = match value.get("metadata") {
            Some(m) => ObjectMeta {
                name: str_at(m, "name"),
                namespace: str_at(m, "namespace"),
                uid: str_at(m, "uid"),
                resource_version: str_at(m, "resourceVersion"),
                generation: m.get("generation").and_then(Value::as_i64),
                ..Default::default()
            },
            None => ObjectMeta::default(),
        };
        let status = if K::KIND.has_status() {
            value
                .get_mut("status")
                .map(Value::take)
                .filter(|s| !s.is_null())
        } else {
            None
        };
        // A conversion bug must not take the controller down or poison the inventory's lock
        // (which would stall every other object): it makes this one object invalid.
        let converted = std::panic::catch_unwind(|| convert::<K>(value)).unwrap_or_else(|_| {
            Err(
                "internal error while converting the object (please report it); it is ignored"
                    .into(),
            )
        });
        Checked {
            metadata,
            status,
            converted,
            kind: PhantomData,
        }
    }

    /// What the inventory keeps.
    pub fn into_entry(self) -> Entry {
        let m = self.metadata;
        Entry {
            key: ApiKey {
                kind: K::KIND,
                namespace: if K::KIND.namespaced() {
                    m.namespace.unwrap_or_default()
                } else {
                    String::new()
                },
                name: m.name.unwrap_or_default(),
            },
            uid: m.uid.unwrap_or_default(),
            generation: m.generation,
            resource_version: m.resource_version.unwrap_or_default(),
            status: self.status,
            converted: self.converted,
        }
    }
}

/// The JSON an API server sent, read into `K` and converted by the loader's conversion.
fn convert<K: WatchedKind>(value: Value) -> Result<Option<Object>, String> {
    let object: K = deserialize_at(value, K::FILL, "").map_err(|e| reasons(&[e]))?;
    if !object.in_model() {
        return Ok(None);
    }
    crate::load::convert(&object)
        .map(Some)
        .map_err(|errors| reasons(&errors))
}

/// Each problem as a manifest's error says it, less the file and document.
pub fn reasons(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| match e.path.as_str() {
            "" => format!("(document): {}", e.reason),
            path => format!("{path}: {}", e.reason),
        })
        .collect::<Vec<_>>()
        .join("; ")
}
