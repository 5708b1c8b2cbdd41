//! The Kubernetes objects the controller watches, converted to the engine's model, and the
//! changes that bring the engine up to date.
//!
//! Every API object arrives typed and converted ([`super::watched`]: the kind's own type, the
//! conversion manifest files go through), so validation and semantics are exactly those of the
//! file source; the inventory keeps the converted [`Entry`], not the API object. Changes are
//! computed by comparing converted objects, not API objects: a bump of `resourceVersion`, new
//! `managedFields`, a status write or a label the model ignores converts to an equal object
//! and changes nothing. An object that stops validating keeps its last good version in force
//! (as a manifest file does), and is reported as invalid.

use std::collections::{BTreeMap, BTreeSet};

use kube::api::ApiResource;
use serde_json::Value;

pub use super::watched::Entry;
use crate::distribution::source::{ObjectKey, diff, object_key};
use crate::model::{PodKey, PolicyKey};
use crate::ruleset::RuleKind;
use crate::{Change, Object};

/// The resources the Kubernetes source watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Node,
    Pod,
    NetworkPolicy,
    ClusterNetworkPolicy,
    ServicePolicy,
    Quarantine,
    StagedNetworkPolicy,
    StagedClusterNetworkPolicy,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Namespace,
        Kind::Node,
        Kind::Pod,
        Kind::NetworkPolicy,
        Kind::ClusterNetworkPolicy,
        Kind::ServicePolicy,
        Kind::Quarantine,
        Kind::StagedNetworkPolicy,
        Kind::StagedClusterNetworkPolicy,
    ];

    pub fn group(self) -> &'static str {
        match self {
            Kind::Namespace | Kind::Node | Kind::Pod => "",
            Kind::NetworkPolicy => "networking.k8s.io",
            Kind::ClusterNetworkPolicy => "policy.networking.k8s.io",
            Kind::ServicePolicy
            | Kind::Quarantine
            | Kind::StagedNetworkPolicy
            | Kind::StagedClusterNetworkPolicy => super::crd::GROUP,
        }
    }

    pub fn version(self) -> &'static str {
        match self {
            Kind::Namespace | Kind::Node | Kind::Pod | Kind::NetworkPolicy => "v1",
            // The type's; the source watches the version the cluster serves (see
            // `super::crd::CnpVersion`).
            Kind::ClusterNetworkPolicy => super::crd::CnpVersion::V1beta1.version(),
            Kind::ServicePolicy
            | Kind::Quarantine
            | Kind::StagedNetworkPolicy
            | Kind::StagedClusterNetworkPolicy => super::crd::VERSION,
        }
    }

    pub fn api_version(self) -> String {
        match self.group() {
            "" => self.version().to_string(),
            g => format!("{g}/{}", self.version()),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
            Kind::ServicePolicy => "ServicePolicy",
            Kind::Quarantine => "Quarantine",
            Kind::StagedNetworkPolicy => "StagedNetworkPolicy",
            Kind::StagedClusterNetworkPolicy => "StagedClusterNetworkPolicy",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Node => "nodes",
            Kind::Pod => "pods",
            Kind::NetworkPolicy => "networkpolicies",
            Kind::ClusterNetworkPolicy => "clusternetworkpolicies",
            Kind::ServicePolicy => "servicepolicies",
            Kind::Quarantine => "quarantines",
            Kind::StagedNetworkPolicy => "stagednetworkpolicies",
            Kind::StagedClusterNetworkPolicy => "stagedclusternetworkpolicies",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(
            self,
            Kind::Namespace
                | Kind::Node
                | Kind::ClusterNetworkPolicy
                | Kind::StagedClusterNetworkPolicy
        )
    }

    /// Policies get Events when they are invalid.
    pub fn is_policy(self) -> bool {
        matches!(
            self,
            Kind::NetworkPolicy
                | Kind::ClusterNetworkPolicy
                | Kind::ServicePolicy
                | Kind::Quarantine
                | Kind::StagedNetworkPolicy
                | Kind::StagedClusterNetworkPolicy
        )
    }

    /// Bulkhead's own kinds, which carry a status.
    pub fn has_status(self) -> bool {
        matches!(self, Kind::ServicePolicy | Kind::Quarantine)
    }

    pub fn api_resource(self) -> ApiResource {
        ApiResource {
            group: self.group().into(),
            version: self.version().into(),
            api_version: self.api_version(),
            kind: self.name().into(),
            plural: self.plural().into(),
        }
    }

    /// The engine's key for an object of this kind.
    pub fn object_key(self, namespace: &str, name: &str) -> ObjectKey {
        let policy = |kind, namespace: &str| {
            ObjectKey::Policy(PolicyKey {
                kind,
                namespace: namespace.to_string(),
                name: name.to_string(),
            })
        };
        match self {
            Kind::Namespace => ObjectKey::Namespace(name.to_string()),
            Kind::Node => ObjectKey::Node(name.to_string()),
            Kind::Pod => ObjectKey::Pod(PodKey {
                namespace: namespace.to_string(),
                name: name.to_string(),
            }),
            Kind::NetworkPolicy => policy(RuleKind::NetworkPolicy, namespace),
            Kind::ClusterNetworkPolicy => policy(RuleKind::ClusterNetworkPolicy, ""),
            Kind::ServicePolicy => policy(RuleKind::ServicePolicy, namespace),
            Kind::Quarantine => policy(RuleKind::Quarantine, namespace),
            Kind::StagedNetworkPolicy => policy(RuleKind::StagedNetworkPolicy, namespace),
            Kind::StagedClusterNetworkPolicy => policy(RuleKind::StagedClusterNetworkPolicy, ""),
        }
    }
}

/// An API object's identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ApiKey {
    pub kind: Kind,
    /// Empty for cluster-scoped objects.
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind.name(), self.name)
        } else {
            write!(f, "{} {}/{}", self.kind.name(), self.namespace, self.name)
        }
    }
}

/// What the controller thinks of one policy object (for its status and Events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub uid: String,
    pub generation: Option<i64>,
    pub resource_version: String,
    /// `None`: accepted; else why it was rejected (every problem, `; `-separated).
    pub invalid: Option<String>,
    /// A previous version is still in force (the object is invalid now, its last good version
    /// is kept).
    pub kept_last_good: bool,
    /// A quarantine's `expiresAt` (of the version in force).
    pub expires_at: Option<std::time::SystemTime>,
    /// The object's `status` as the API server has it (conditions keep their transition times
    /// across controller restarts).
    pub status: Option<Value>,
}

/// What the controller holds of the cluster.
#[derive(Debug, Default)]
pub struct Inventory {
    /// Converted objects as they are now (the last good version for invalid ones).
    current: BTreeMap<ApiKey, Object>,
    /// What the engine was last given, by the same keys.
    applied: BTreeMap<ApiKey, Object>,
    dirty: BTreeSet<ApiKey>,
    /// Per policy object: accepted or why not.
    verdicts: BTreeMap<ApiKey, Verdict>,
    /// Objects of a kind listed since its watch (re)started, until the list is complete.
    relisting: BTreeMap<Kind, BTreeMap<ApiKey, Entry>>,
    /// Kinds listed completely at least once.
    synced: BTreeSet<Kind>,
    /// A policy object's verdict changed since the last [`Inventory::take_changes`].
    verdicts_changed: bool,
}

/// Changes for the engine, quarantines apart (they go first, with priority delivery).
#[derive(Debug, Default)]
pub struct Changes {
    pub quarantines: Vec<Change>,
    pub others: Vec<Change>,
    /// Some policy object's verdict (validity, generation, status) changed: statuses and
    /// Events are due.
    pub verdicts_changed: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.quarantines.is_empty() && self.others.is_empty()
    }

    pub fn len(&self) -> usize {
        self.quarantines.len() + self.others.len()
    }
}

impl Inventory {
    /// An object was added or modified.
    pub fn apply(&mut self, entry: Entry) {
        let Entry {
            key,
            uid,
            generation,
            resource_version,
            status,
            converted,
        } = entry;
        if key.name.is_empty() {
            tracing::warn!(kind = key.kind.name(), "ignoring an object without a name");
            return;
        }
        if key.kind.is_policy() {
            let verdict = Verdict {
                uid,
                generation,
                resource_version,
                invalid: converted.as_ref().err().cloned(),
                kept_last_good: converted.is_err() && self.current.contains_key(&key),
                expires_at: match converted
                    .as_ref()
                    .ok()
                    .and_then(Option::as_ref)
                    .or(self.current.get(&key))
                {
                    Some(Object::Policy(p)) => p.quarantine.as_ref().and_then(|q| q.expires_at),
                    _ => None,
                },
                status,
            };
            if self.verdicts.get(&key) != Some(&verdict) {
                self.verdicts.insert(key.clone(), verdict);
                self.verdicts_changed = true;
            }
        }
        match converted {
            Ok(Some(o)) => {
                if self.current.get(&key) != Some(&o) {
                    self.current.insert(key.clone(), o);
                    self.dirty.insert(key);
                }
            }
            Ok(None) => {
                if self.current.remove(&key).is_some() {
                    self.dirty.insert(key);
                }
            }
            Err(reason) => {
                tracing::warn!(object = %key, %reason, "invalid object; its last good version (if any) stays in force");
            }
        }
    }

    /// An object was deleted.
    pub fn delete(&mut self, key: &ApiKey) {
        self.verdicts_changed |= self.verdicts.remove(key).is_some();
        if self.current.remove(key).is_some() {
            self.dirty.insert(key.clone());
        }
    }

    /// The watch of `kind` (re)started: a complete list follows.
    pub fn relist_start(&mut self, kind: Kind) {
        self.relisting.insert(kind, BTreeMap::new());
    }

    pub fn relist_item(&mut self, entry: Entry) {
        self.relisting
            .entry(entry.key.kind)
            .or_default()
            .insert(entry.key.clone(), entry);
    }

    /// The list is complete: what it did not name is gone (deleted while no watch ran).
    pub fn relist_done(&mut self, kind: Kind) {
        let listed = self.relisting.remove(&kind).unwrap_or_default();
        let gone: Vec<ApiKey> = self
            .current
            .keys()
            .chain(self.verdicts.keys())
            .filter(|k| k.kind == kind && !listed.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            self.verdicts_changed |= self.verdicts.remove(&key).is_some();
            if self.current.remove(&key).is_some() {
                self.dirty.insert(key);
            }
        }
        for entry in listed.into_values() {
            self.apply(entry);
        }
        self.synced.insert(kind);
    }

    /// Counts `kind` as listed without objects (its API does not exist in this cluster).
    pub fn mark_synced(&mut self, kind: Kind) {
        self.synced.insert(kind);
    }

    pub fn synced(&self, kind: Kind) -> bool {
        self.synced.contains(&kind)
    }

    pub fn all_synced(&self) -> bool {
        Kind::ALL.iter().all(|k| self.synced.contains(k))
    }

    /// What changed for the engine since the last call (nothing for objects that converted
    /// to what the engine already has).
    pub fn take_changes(&mut self) -> Changes {
        let dirty = std::mem::take(&mut self.dirty);
        let mut changes = Changes {
            verdicts_changed: std::mem::take(&mut self.verdicts_changed),
            ..Default::default()
        };
        let (mut old_q, mut new_q, mut old, mut new) = Default::default();
        for key in dirty {
            let (old_map, new_map): (
                &mut BTreeMap<ObjectKey, Object>,
                &mut BTreeMap<ObjectKey, Object>,
            ) = if key.kind == Kind::Quarantine {
                (&mut old_q, &mut new_q)
            } else {
                (&mut old, &mut new)
            };
            if let Some(o) = self.applied.get(&key) {
                old_map.insert(object_key(o), o.clone());
            }
            match self.current.get(&key) {
                Some(o) => {
                    new_map.insert(object_key(o), o.clone());
                    self.applied.insert(key, o.clone());
                }
                None => {
                    self.applied.remove(&key);
                }
            }
        }
        changes.quarantines = diff(&old_q, &new_q);
        changes.others = diff(&old, &new);
        changes
    }

    /// Policy objects and what the controller thinks of them.
    /// The object as converted now (the last good version of an invalid one).
    pub fn object(&self, key: &ApiKey) -> Option<&Object> {
        self.current.get(key)
    }

    pub fn verdicts(&self) -> &BTreeMap<ApiKey, Verdict> {
        &self.verdicts
    }

    pub fn len(&self) -> usize {
        self.current.len()
    }

    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use serde_json::json;

    use super::*;
    use crate::kubernetes::crd::Quarantine;
    use crate::kubernetes::watched::{Checked, WatchedKind};
    use crate::load_str;

    /// An API object as the watch delivers it.
    fn entry<K: WatchedKind>(object: Value) -> Entry {
        serde_json::from_value::<Checked<K>>(object)
            .expect("a watched object always decodes")
            .into_entry()
    }

    fn convert<K: WatchedKind>(object: &Value) -> Result<Option<Object>, String> {
        entry::<K>(object.clone()).converted
    }

    fn pod(rv: &str, labels: Value, phase: &str, ip: &str) -> Value {
        json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "p1", "resourceVersion": rv,
                         "labels": labels,
                         "managedFields": [{"manager": "kubelet", "operation": "Update",
                                            "time": format!("2026-11-29T20:0{}:00Z", rv.len())}]},
            "spec": {"nodeName": "node-a", "serviceAccountName": "web",
                     "containers": [{"name": "web", "ports": [{"containerPort": 8080}]}]},
            "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}],
                       "conditions": [{"type": "Ready", "status": if rv == "2" { "False" } else { "True" }}]},
        })
    }

    fn synced() -> Inventory {
        let mut inv = Inventory::default();
        for k in Kind::ALL {
            inv.relist_start(k);
            inv.relist_done(k);
        }
        inv
    }

    #[test]
    fn only_changes_of_the_model_reach_the_engine() {
        let mut inv = synced();
        inv.apply(entry::<Pod>(pod(
            "1",
            json!({"app": "web"}),
            "Running",
            "10.0.0.5",
        )));
        let c = inv.take_changes();
        assert!(matches!(c.others.as_slice(), [Change::UpsertPod(p)] if p.name == "web-1"));
        // resourceVersion, managedFields, readiness: nothing for the engine.
        inv.apply(entry::<Pod>(pod(
            "2",
            json!({"app": "web"}),
            "Running",
            "10.0.0.5",
        )));
        assert!(inv.take_changes().is_empty());
        // A label is identity.
        inv.apply(entry::<Pod>(pod(
            "3",
            json!({"app": "web", "tier": "front"}),
            "Running",
            "10.0.0.5",
        )));
        assert_eq!(inv.take_changes().len(), 1);
        // A finished pod gives its address back.
        inv.apply(entry::<Pod>(pod(
            "4",
            json!({"app": "web", "tier": "front"}),
            "Succeeded",
            "10.0.0.5",
        )));
        let c = inv.take_changes();
        assert!(matches!(c.others.as_slice(), [Change::DeletePod(_)]));
        // Scheduled but without an address yet: not in the model until it has one.
        let mut pending = pod("7", json!({"app": "db"}), "Pending", "10.0.0.9");
        pending["metadata"]["name"] = json!("db-0");
        pending["status"] = json!({"phase": "Pending"});
        inv.apply(entry::<Pod>(pending));
        assert!(inv.take_changes().is_empty());
        // Added and deleted between two flushes: nothing at all.
        inv.apply(entry::<Pod>(pod(
            "5",
            json!({"app": "web"}),
            "Running",
            "10.0.0.6",
        )));
        inv.delete(&entry::<Pod>(pod("6", json!({"app": "web"}), "Running", "10.0.0.6")).key);
        assert!(inv.take_changes().is_empty());
    }

    /// A Node as recorded from a kind cluster (`tests/fixtures/k8s/nodes.list.json`): its
    /// InternalIP reaches the engine; kubelet heartbeats do not; a new address or label does.
    #[test]
    fn node_addresses_and_labels_are_followed_and_heartbeats_are_not() {
        use k8s_openapi::api::core::v1::Node;
        let list: Value =
            serde_json::from_str(include_str!("../../tests/fixtures/k8s/nodes.list.json"))
                .expect("recorded list");
        let recorded = list["items"][0].clone();
        let mut inv = synced();
        inv.apply(entry::<Node>(recorded.clone()));
        let c = inv.take_changes();
        let [Change::UpsertNode(n)] = c.others.as_slice() else {
            panic!("one node upsert: {:?}", c.others);
        };
        assert_eq!(n.name, "node-a");
        assert_eq!(
            n.addresses,
            ["172.18.0.3".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(n.labels["kubernetes.io/os"], "linux");
        // A heartbeat: new resourceVersion and condition times, same model.
        let mut beat = recorded.clone();
        beat["metadata"]["resourceVersion"] = json!("5300");
        beat["status"]["conditions"][0]["lastHeartbeatTime"] = json!("2026-11-29T20:11:02Z");
        inv.apply(entry::<Node>(beat.clone()));
        assert!(inv.take_changes().is_empty());
        // An ExternalIP (IPv6) appears: both families reach the engine.
        let mut external = beat.clone();
        external["status"]["addresses"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "ExternalIP", "address": "2001:db8::3"}));
        inv.apply(entry::<Node>(external.clone()));
        let c = inv.take_changes();
        let [Change::UpsertNode(n)] = c.others.as_slice() else {
            panic!("one node upsert: {:?}", c.others);
        };
        assert_eq!(
            n.addresses,
            [
                "172.18.0.3".parse::<std::net::IpAddr>().unwrap(),
                "2001:db8::3".parse().unwrap()
            ]
        );
        // A label is what `nodes` selectors read.
        let mut relabeled = external;
        relabeled["metadata"]["labels"]["role"] = json!("ingress");
        inv.apply(entry::<Node>(relabeled));
        let c = inv.take_changes();
        assert!(
            matches!(c.others.as_slice(), [Change::UpsertNode(n)] if n.labels["role"] == "ingress"),
            "{:?}",
            c.others
        );
    }

    #[test]
    fn an_invalid_update_keeps_the_last_good_version_and_is_reported() {
        let mut inv = synced();
        let np = |port: Value, rv: &str| {
            json!({"metadata": {"name": "db", "namespace": "shop", "uid": "n1", "generation": 1,
                                "resourceVersion": rv},
                   "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": port}]}]}})
        };
        inv.apply(entry::<NetworkPolicy>(np(json!(5432), "1")));
        assert_eq!(inv.take_changes().len(), 1);
        inv.apply(entry::<NetworkPolicy>(np(json!(70000), "2")));
        assert!(inv.take_changes().is_empty(), "the last good version stays");
        let key = ApiKey {
            kind: Kind::NetworkPolicy,
            namespace: "shop".into(),
            name: "db".into(),
        };
        let v = &inv.verdicts()[&key];
        assert!(v.kept_last_good);
        assert!(
            v.invalid.as_deref().unwrap().contains("out of range"),
            "{v:?}"
        );
        inv.apply(entry::<NetworkPolicy>(np(json!(5432), "4")));
        assert!(inv.verdicts()[&key].invalid.is_none());
        assert!(inv.take_changes().is_empty(), "back to what the engine has");
    }

    #[test]
    fn nothing_is_applied_before_every_kind_was_listed_and_relists_delete_what_is_gone() {
        let mut inv = Inventory::default();
        inv.relist_start(Kind::Pod);
        inv.relist_item(entry::<Pod>(pod(
            "1",
            json!({"app": "web"}),
            "Running",
            "10.0.0.5",
        )));
        inv.relist_done(Kind::Pod);
        assert!(!inv.all_synced());
        for k in Kind::ALL {
            if k != Kind::Pod {
                inv.relist_start(k);
                inv.relist_done(k);
            }
        }
        assert!(inv.all_synced());
        assert_eq!(inv.take_changes().len(), 1);
        // The watch broke; the new list no longer has the pod.
        inv.relist_start(Kind::Pod);
        assert!(
            inv.take_changes().is_empty(),
            "nothing changes until the list is complete"
        );
        inv.relist_done(Kind::Pod);
        let c = inv.take_changes();
        assert!(matches!(c.others.as_slice(), [Change::DeletePod(_)]));
    }

    #[test]
    fn quarantines_are_kept_apart_for_priority_delivery() {
        let mut inv = synced();
        inv.apply(entry::<Quarantine>(
            json!({"metadata": {"name": "q", "namespace": "shop", "uid": "q1"},
                    "spec": {"pods": ["web-1"], "reason": "miner"}}),
        ));
        inv.apply(entry::<Pod>(pod(
            "1",
            json!({"app": "web"}),
            "Running",
            "10.0.0.5",
        )));
        let c = inv.take_changes();
        assert_eq!(c.quarantines.len(), 1);
        assert_eq!(c.others.len(), 1);
    }

    /// The loader gets the API server's JSON as a value, not as YAML text: a character YAML
    /// refuses, in a field the loader reads, is just a character.
    #[test]
    fn fields_the_loader_reads_need_not_be_valid_yaml_text() {
        let q = json!({"metadata": {"name": "q", "namespace": "shop", "uid": "q1"},
                       "spec": {"pods": ["web-1"], "reason": "miner \u{FFFE}\u{85}x"}});
        match convert::<Quarantine>(&q) {
            Ok(Some(Object::Policy(p))) => assert_eq!(
                p.quarantine.map(|q| q.reason).as_deref(),
                Some("miner \u{FFFE}\u{85}x")
            ),
            other => panic!("{other:?}"),
        }
        let raw = load_str(
            Path::new("raw"),
            &json!({"apiVersion": "bulkhead.dev/v1alpha1", "kind": "Quarantine",
                    "metadata": q["metadata"], "spec": q["spec"]})
            .to_string(),
        );
        assert!(
            !raw.errors.is_empty(),
            "the same object as text is not YAML"
        );
    }

    #[test]
    fn only_what_the_loader_reads_is_parsed_and_it_means_the_same() {
        let mut p = pod("1", json!({"app": "web"}), "Running", "10.0.0.5");
        p["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7f", "controller": true}]);
        // Characters YAML refuses, where Kubernetes allows them (annotations, env values).
        p["metadata"]["annotations"] = json!({"note": "bell \u{7} c1 \u{85} \u{FFFE}"});
        p["spec"]["containers"][0]["env"] = json!([{"name": "X", "value": "\u{1}"}]);
        let converted = convert::<Pod>(&p).unwrap().unwrap();
        // The same object as the manifest loader makes of the plain pod.
        let mut plain = p.clone();
        plain["apiVersion"] = json!("v1");
        plain["kind"] = json!("Pod");
        plain["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("annotations");
        plain["spec"]["containers"][0]
            .as_object_mut()
            .unwrap()
            .remove("env");
        let raw = load_str(
            Path::new("raw"),
            &{
                let mut r = p.clone();
                r["apiVersion"] = json!("v1");
                r["kind"] = json!("Pod");
                r
            }
            .to_string(),
        );
        // (The whole object would not even parse as YAML.)
        assert!(!raw.errors.is_empty());
        let loaded = load_str(Path::new("plain"), &plain.to_string());
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        assert_eq!(loaded.objects, vec![converted.clone()]);
        match converted {
            Object::Pod(p) => assert_eq!(p.workload.as_deref(), Some("ReplicaSet/web-7f")),
            other => panic!("{other:?}"),
        }
    }

    /// A field that does not fit the kind's type makes that one object invalid, at the field's
    /// path; it neither fails the list it came in nor panics, and a good version stays.
    #[test]
    fn a_typed_object_with_a_malformed_field_is_reported_not_fatal() {
        let mut inv = synced();
        inv.apply(entry::<Pod>(pod(
            "1",
            json!({"app": "web"}),
            "Running",
            "10.0.0.5",
        )));
        assert_eq!(inv.take_changes().len(), 1);
        let mut bad = pod("2", json!({"app": "web"}), "Running", "10.0.0.5");
        bad["spec"]["containers"][0]["ports"][0]["containerPort"] = json!("http");
        let e = entry::<Pod>(bad);
        assert_eq!(e.key.name, "web-1");
        assert_eq!(e.resource_version, "2");
        let reason = e.converted.clone().unwrap_err();
        assert!(
            reason.starts_with("spec.containers[0].ports[0].containerPort: invalid type"),
            "{reason}"
        );
        inv.apply(e);
        assert!(inv.take_changes().is_empty(), "the last good version stays");
        // A Quarantine stored under a newer CRD (a field this controller does not know):
        // invalid, reported at the field, with its metadata for the Event.
        let q = entry::<Quarantine>(json!({
            "metadata": {"name": "q", "namespace": "shop", "uid": "q1", "generation": 3},
            "spec": {"pods": ["web-1"], "reason": "miner", "ttl": "1h"},
            "status": {"conditions": []}}));
        assert_eq!(q.uid, "q1");
        assert_eq!(q.generation, Some(3));
        assert_eq!(q.status, Some(json!({"conditions": []})));
        let reason = q.converted.clone().unwrap_err();
        assert!(reason.contains("unknown field `ttl`"), "{reason}");
        inv.apply(q);
        let key = ApiKey {
            kind: Kind::Quarantine,
            namespace: "shop".into(),
            name: "q".into(),
        };
        assert!(inv.verdicts()[&key].invalid.is_some());
        assert!(!inv.verdicts()[&key].kept_last_good);
        // Not even an object: an invalid entry without a name, ignored.
        let e = entry::<Pod>(json!("garbage"));
        assert!(e.converted.is_err() && e.key.name.is_empty());
        inv.apply(e);
        assert!(inv.take_changes().is_empty());
    }
}
