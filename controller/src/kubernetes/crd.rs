//! Bulkhead's custom resources, `bulkhead.dev/v1alpha1` ServicePolicy and Quarantine, as Rust
//! types. The CRDs in `charts/bulkhead/crds/` are generated from them (`bulkhead crds --out
//! charts/bulkhead/crds`), and a test fails when the committed files drift. The one other
//! custom resource Bulkhead reads, network-policy-api's ClusterNetworkPolicy, is typed here
//! too ([`ClusterNetworkPolicy`]), without a schema: its CRD comes with network-policy-api.
//!
//! These types are the only definition of each kind: manifest files are deserialized into them
//! and Kubernetes objects are watched as them, and one conversion ([`crate::load::ToModel`])
//! turns them into the engine's model.
//!
//! The schema holds what the API server can check on its own (enums, required fields, name
//! patterns, port ranges, list sizes); the controller's loader ([`crate::load`]) reads these same
//! spec types, validates every object in full (selectors, CIDRs, exactly-one-of peers) and
//! reports what it rejects in the object's `Invalid` condition, or as a field error for a file.
//!
//! So that the loader can report every problem of an object at its field, with what to write
//! instead, the Rust types are more lenient than the schema: enumerations (`mode`, `action`,
//! `entity`, `protocol`) are strings, selectors are the loader's [`LabelSelectorSpec`], ports
//! any integer, and required strings may be absent; `#[schemars(with = ...)]` and `!default`
//! give the schema its strict form. The spec types deny unknown fields, like the loader always
//! did; the schema does not say so, as the API server prunes them (so only an object stored
//! under a newer CRD than this controller's can carry one).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use k8s_openapi::apimachinery::pkg::util::intstr;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::load::MAX_RULES_PER_DIRECTION;
use crate::selector::LabelSelectorSpec;

/// The API group of Bulkhead's resources.
pub const GROUP: &str = "bulkhead.dev";
/// Their version.
pub const VERSION: &str = "v1alpha1";

/// A DNS subdomain (object, service-account and pod names).
const DNS_SUBDOMAIN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A DNS label (namespace names).
const DNS_LABEL: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// A DNS name of at least two labels, any case, optionally with the trailing dot (as
/// network-policy-api's `DomainName`, without its `*.`).
const DNS_NAME: &str = r"^([a-zA-Z0-9]([-a-zA-Z0-9_]{0,61}[a-zA-Z0-9])?\.)+[a-zA-Z0-9]([-a-zA-Z0-9_]{0,61}[a-zA-Z0-9])?\.?$";
/// `*.` and a [`DNS_NAME`].
const DNS_NAME_PATTERN: &str = r"^\*\.([a-zA-Z0-9]([-a-zA-Z0-9_]{0,61}[a-zA-Z0-9])?\.)+[a-zA-Z0-9]([-a-zA-Z0-9_]{0,61}[a-zA-Z0-9])?\.?$";

/// Bulkhead's policy for service identities: the subject by service account and/or pod labels,
/// peers by service identity, CIDR, or the entities `world`, `cluster` and `host`. Shares the
/// application tier with NetworkPolicy; `Deny` rules beat `Allow` rules.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[kube(
    group = "bulkhead.dev",
    version = "v1alpha1",
    kind = "ServicePolicy",
    namespaced,
    status = "ServicePolicyStatus",
    shortname = "sp",
    category = "bulkhead",
    doc = "Bulkhead's identity-based policy: who may talk to the pods of a service identity, and to whom they may talk.",
    printcolumn = r#"{"name": "Mode", "type": "string", "jsonPath": ".spec.mode"}"#,
    printcolumn = r#"{"name": "Accepted", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name": "Realized", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Realized\")].message"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(!deny_unknown_fields)]
pub struct ServicePolicySpec {
    /// `Enforce` (default) or `Audit`: report what would be denied, let it pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<PolicyMode>")]
    pub mode: Option<String>,
    /// The pods the policy is about; both fields absent = every pod of the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<ServiceSubject>,
    /// Rules for traffic to the subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_RULES_PER_DIRECTION))]
    pub ingress: Option<Vec<ServiceRule>>,
    /// Rules for traffic from the subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_RULES_PER_DIRECTION))]
    pub egress: Option<Vec<ServiceRule>>,
}

// The enumerations below describe string fields to the schema only (see the module doc); a
// `///` comment on them would become a description in the generated CRDs.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
pub enum PolicyMode {
    Enforce,
    Audit,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(!deny_unknown_fields)]
pub struct ServiceSubject {
    /// Pods running as this service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub service_account: Option<String>,
    /// Pods with these labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<LabelSelector>")]
    pub pod_selector: Option<LabelSelectorSpec>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(!deny_unknown_fields)]
pub struct ServiceRule {
    /// `Allow` (default) or `Deny`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<RuleAction>")]
    pub action: Option<String>,
    /// Sources (ingress rules only); absent or empty = every source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<ServicePeer>>,
    /// Destinations (egress rules only); absent or empty = every destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<ServicePeer>>,
    /// Absent or empty = every port and protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PolicyPort>>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
pub enum RuleAction {
    Allow,
    Deny,
}

/// Exactly one of `service`, `cidr` (with optional `except`), `entity` or `fqdn`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(!deny_unknown_fields)]
pub struct ServicePeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
    /// An IPv4 or IPv6 CIDR, e.g. `203.0.113.0/24`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub cidr: Option<String>,
    /// CIDRs inside `cidr` that are not meant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub except: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<Entity>")]
    pub entity: Option<String>,
    /// Destinations by DNS name (egress `Allow` rules only): the addresses the pod itself
    /// resolved a matching name to, through a trusted resolver. There is no deny by name:
    /// addresses are shared between names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fqdn: Option<FqdnPeer>,
}

/// Exactly one of `matchName` (`api.example.com`: that name) or `matchPattern`
/// (`*.example.com`: every name with one or more labels before `example.com`, not
/// `example.com` itself). Compared case-insensitively; a trailing dot is ignored.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(!deny_unknown_fields)]
pub struct FqdnPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 254), regex(pattern = DNS_NAME))]
    pub match_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), regex(pattern = DNS_NAME_PATTERN))]
    pub match_pattern: Option<String>,
}

/// `world`: everything outside the cluster; `cluster`: every pod and the host; `host`: the node.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Entity {
    World,
    Cluster,
    Host,
}

/// A service identity: pods of a namespace (default: the policy's own) running as
/// `serviceAccount` and/or matching `podSelector`, in this cluster or, with `cluster`, in that
/// peer cluster.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(!deny_unknown_fields)]
pub struct ServiceRef {
    /// A peer cluster's name (see `--cluster-name` and peering): the service's pods in that
    /// cluster. Without it, this cluster's pods only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32), regex(pattern = DNS_LABEL))]
    pub cluster: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub service_account: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<LabelSelector>")]
    pub pod_selector: Option<LabelSelectorSpec>,
    /// A named namespace (at most one of `namespace` and `namespaceSelector`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL))]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<LabelSelector>")]
    pub namespace_selector: Option<LabelSelectorSpec>,
}

/// A port, a port range (`port`..`endPort`), a named container port, or (without `port`) every
/// port of the protocol.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyPort {
    /// Default TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<PortProtocol>")]
    pub protocol: Option<String>,
    /// A number (1-65535) or a container port name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<intstr::IntOrString>")]
    pub port: Option<IntOrString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<i32>", range(min = 1, max = 65535))]
    pub end_port: Option<i64>,
}

/// A port number or a container port name: Kubernetes' `IntOrString` (the schema's type), but
/// with any integer, so that the loader reports an out-of-range number as one.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    Str(String),
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
pub enum PortProtocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
    #[serde(rename = "ICMP")]
    Icmp,
    #[serde(rename = "ICMPv6")]
    Icmpv6,
}

/// What the controller reports about a ServicePolicy.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServicePolicyStatus {
    /// The `metadata.generation` these conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted` (or `False` with reason `Invalid`) and `Realized` (on X of Y nodes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Nodes whose rule set the policy concerns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<u32>,
    /// Of those, nodes whose agent has the current version in its kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realized_nodes: Option<u32>,
}

/// Isolates pods of its namespace (by name or `podSelector`) at once: everything to and from
/// them is denied except the `allow` exceptions, above every other policy tier; established
/// connections are cut. Deleting it, or `expiresAt` passing, restores the previous policy.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[kube(
    group = "bulkhead.dev",
    version = "v1alpha1",
    kind = "Quarantine",
    namespaced,
    status = "QuarantineStatus",
    shortname = "qr",
    category = "bulkhead",
    doc = "Isolates compromised pods: deny all but the listed exceptions, in both directions, above every other policy.",
    printcolumn = r#"{"name": "Reason", "type": "string", "jsonPath": ".spec.reason"}"#,
    printcolumn = r#"{"name": "Expires", "type": "date", "jsonPath": ".spec.expiresAt"}"#,
    printcolumn = r#"{"name": "Accepted", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name": "Cut", "type": "integer", "jsonPath": ".status.connectionsCut"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(!deny_unknown_fields)]
pub struct QuarantineSpec {
    /// Pods of the namespace by name (exactly one of `pods` and `podSelector`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1), inner(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN)))]
    pub pods: Option<Vec<String>>,
    /// Pods of the namespace by labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<LabelSelector>")]
    pub pod_selector: Option<LabelSelectorSpec>,
    /// Why (shown in flows, explanations and the audit log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(!default, with = "String", length(min = 1), regex(pattern = r"\S"))]
    pub reason: Option<String>,
    /// Exceptions, allowed in both directions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_RULES_PER_DIRECTION))]
    pub allow: Option<Vec<QuarantineAllow>>,
    /// RFC 3339 time from which the quarantine no longer applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub expires_at: Option<String>,
}

/// One exception: a peer (pods by namespace/pod selector, or an ipBlock) and optional ports.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(!deny_unknown_fields)]
pub struct QuarantineAllow {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<LabelSelector>")]
    pub pod_selector: Option<LabelSelectorSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<LabelSelector>")]
    pub namespace_selector: Option<LabelSelectorSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
    /// Port numbers only (no named ports); absent = every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PolicyPort>>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IpBlock {
    #[serde(default)]
    #[schemars(!default, length(min = 1))]
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub except: Option<Vec<String>>,
}

/// What the controller reports about a Quarantine.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuarantineStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted` (or `False` with reason `Invalid`) and `Realized` (on X of Y nodes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realized_nodes: Option<u32>,
    /// Per node, when its agent had the quarantine in its kernel (RFC 3339).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub enforced_at: BTreeMap<String, String>,
    /// Established connections the agents cut when they enforced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_cut: Option<u64>,
}

/// A NetworkPolicy that is *staged*: the data plane computes, for every flow, what the verdict
/// would be with it in force (replacing the NetworkPolicy of the same name, if there is one)
/// and reports it, but never enforces it. Its own kind, so that no CNI that reads
/// NetworkPolicies can enforce it; `bulkhead policy promote` turns it into the NetworkPolicy.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[kube(
    group = "bulkhead.dev",
    version = "v1alpha1",
    kind = "StagedNetworkPolicy",
    namespaced,
    shortname = "snp",
    category = "bulkhead",
    doc = "A NetworkPolicy staged by Bulkhead: reported as what it would allow and deny, never enforced."
)]
pub struct StagedNetworkPolicySpec {
    /// Exactly a `networking.k8s.io/v1` NetworkPolicy's spec.
    #[serde(flatten)]
    pub policy: k8s_openapi::api::networking::v1::NetworkPolicySpec,
}

/// A ClusterNetworkPolicy that is *staged* (as [`StagedNetworkPolicy`] for NetworkPolicy): its
/// spec is exactly a `policy.networking.k8s.io` ClusterNetworkPolicy's. The CRD stores the spec
/// as it is (network-policy-api owns that schema); the controller validates it in full and
/// reports what it rejects.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "bulkhead.dev",
    version = "v1alpha1",
    kind = "StagedClusterNetworkPolicy",
    shortname = "scnp",
    category = "bulkhead",
    schema = "disabled",
    doc = "A ClusterNetworkPolicy staged by Bulkhead: reported as what it would allow and deny, never enforced."
)]
pub struct StagedClusterNetworkPolicySpec {
    #[serde(flatten)]
    pub policy: ClusterNetworkPolicySpec,
}

/// The group of network-policy-api's ClusterNetworkPolicy.
pub const CNP_GROUP: &str = "policy.networking.k8s.io";

/// A version of [`CNP_GROUP`] that serves ClusterNetworkPolicy. The schema is the same at
/// both: network-policy-api v0.3.0 graduated the kind to `v1beta1` (its storage version) and
/// still serves `v1alpha2`. Files may use either; the Kubernetes source watches the first of
/// [`CnpVersion::PREFERENCE`] the cluster serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CnpVersion {
    V1beta1,
    V1alpha2,
}

impl CnpVersion {
    /// Most preferred first.
    pub const PREFERENCE: [CnpVersion; 2] = [CnpVersion::V1beta1, CnpVersion::V1alpha2];

    /// `v1beta1`, `v1alpha2`.
    pub fn version(self) -> &'static str {
        match self {
            CnpVersion::V1beta1 => "v1beta1",
            CnpVersion::V1alpha2 => "v1alpha2",
        }
    }

    /// `policy.networking.k8s.io/v1beta1`, `policy.networking.k8s.io/v1alpha2`.
    pub fn api_version(self) -> &'static str {
        match self {
            CnpVersion::V1beta1 => "policy.networking.k8s.io/v1beta1",
            CnpVersion::V1alpha2 => "policy.networking.k8s.io/v1alpha2",
        }
    }

    /// The version an `apiVersion` names, if it is one of these.
    pub fn from_api_version(api_version: &str) -> Option<CnpVersion> {
        CnpVersion::PREFERENCE
            .into_iter()
            .find(|v| v.api_version() == api_version)
    }
}

impl std::fmt::Display for CnpVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.api_version())
    }
}

/// network-policy-api's ClusterNetworkPolicy: rules of the Admin and Baseline tiers, the
/// fields Bulkhead reads. The type says `v1beta1` (the storage version); `v1alpha2` has the
/// same schema and is read into the same type ([`CnpVersion`]: the loader accepts both, the
/// Kubernetes source watches the version the cluster serves). Not Bulkhead's own kind: unknown
/// fields are ignored (as kubectl does without `--validate=strict`), and Bulkhead generates no
/// CRD for it.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "policy.networking.k8s.io",
    version = "v1beta1",
    kind = "ClusterNetworkPolicy",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetworkPolicySpec {
    /// `Admin` or `Baseline`.
    #[serde(default)]
    pub tier: String,
    /// 0-1000; lower first.
    pub priority: i64,
    pub subject: CnpSubject,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<CnpRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<CnpRule>>,
}

/// Exactly one of `namespaces` and `pods`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct CnpSubject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelectorSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<CnpNamespacedPod>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CnpNamespacedPod {
    #[serde(default)]
    pub namespace_selector: LabelSelectorSpec,
    #[serde(default)]
    pub pod_selector: LabelSelectorSpec,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct CnpRule {
    /// `Accept`, `Deny` or `Pass`.
    #[serde(default)]
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<CnpPeer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<CnpPeer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocols: Option<Vec<CnpProtocol>>,
}

/// Exactly one field; Bulkhead supports `namespaces`, `pods` and `networks`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CnpPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelectorSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<CnpNamespacedPod>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<LabelSelectorSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_names: Option<Vec<String>>,
}

/// Exactly one field.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CnpProtocol {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<CnpPortMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<CnpPortMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sctp: Option<CnpPortMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_named_port: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CnpPortMatch {
    /// Absent: every port of the protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<CnpPort>,
}

/// Exactly one of `number` and `range`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct CnpPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<CnpPortRange>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CnpPortRange {
    pub start: i64,
    pub end: i64,
}

/// The generated CRDs: (file name, YAML), one per resource, in a fixed order.
pub fn crd_files() -> Result<Vec<(String, String)>, serde_yaml::Error> {
    let mut out = Vec::new();
    let mut staged_cnp = StagedClusterNetworkPolicy::crd();
    // Generated without a schema (the spec is network-policy-api's, validated by the
    // controller); an apiextensions.k8s.io/v1 CRD must have one: keep the spec as it is.
    for v in &mut staged_cnp.spec.versions {
        v.schema = Some(preserved_spec_schema());
    }
    for crd in [
        ServicePolicy::crd(),
        Quarantine::crd(),
        StagedNetworkPolicy::crd(),
        staged_cnp,
    ] {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let yaml = serde_yaml::to_string(&crd)?;
        out.push((
            format!("{name}.yaml"),
            format!(
                "# Generated by `bulkhead crds --out charts/bulkhead/crds` from controller/src/kubernetes/crd.rs; do not edit.\n{yaml}"
            ),
        ));
    }
    Ok(out)
}

/// An object whose `spec` is stored as it is.
fn preserved_spec_schema()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceValidation {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        CustomResourceValidation, JSONSchemaProps,
    };
    let spec = JSONSchemaProps {
        type_: Some("object".into()),
        x_kubernetes_preserve_unknown_fields: Some(true),
        ..Default::default()
    };
    CustomResourceValidation {
        open_api_v3_schema: Some(JSONSchemaProps {
            type_: Some("object".into()),
            required: Some(vec!["spec".into()]),
            properties: Some([("spec".to_string(), spec)].into_iter().collect()),
            ..Default::default()
        }),
    }
}
