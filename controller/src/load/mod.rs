//! Reading Kubernetes YAML: multi-document files or directories of them, validated the way the
//! API server validates, into the engine's [`Object`]s.
//!
//! Bad input never aborts the load: every invalid document becomes one or more [`InputError`]s
//! (file, document number starting at 1, field path, reason) and the valid documents are kept.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::SystemTime;

use ipnetwork::IpNetwork;
use serde::Deserialize;

use crate::error::{FieldError, InputError};
use crate::model::{
    CidrPeer, ContainerPort, Isolation, Labels, Namespace, NamespaceScope, Node, Object, Peer, Pod,
    PodSelection, Policy, PolicyKey, PortSpec, QuarantineSpec, Rule,
};
use crate::ruleset::{Action, Direction, PortRange, Protocol, RuleKind, Tier};
use crate::selector::{
    LabelSelectorSpec, Selector, dns_subdomain_problem, validate_label_key, validate_label_value,
};

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

mod files;

pub use files::{MAX_DIR_DEPTH, MAX_FILE_BYTES, MAX_FILES, MAX_FLOW_DEPTH};
use files::{Walk, flow_depth, read_manifest};

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
            parse_typed::<NamespaceDoc>(value, prefix, errors).and_then(|d| {
                let meta = meta_name(&d.metadata, prefix, false, errors)?;
                let labels = labels(&d.metadata, prefix, errors)?;
                out.push((
                    id(kind, "", &meta, prefix),
                    Object::Namespace(Namespace { name: meta, labels }),
                ));
                Some(())
            });
        }
        "Node" if expect("v1", errors) => {
            parse_typed::<NamespaceDoc>(value, prefix, errors).and_then(|d| {
                let name = meta_name(&d.metadata, prefix, false, errors)?;
                let labels = labels(&d.metadata, prefix, errors)?;
                out.push((
                    id(kind, "", &name, prefix),
                    Object::Node(Node { name, labels }),
                ));
                Some(())
            });
        }
        "Pod" if expect("v1", errors) => {
            if let Some(d) = parse_typed::<PodDoc>(value, prefix, errors)
                && let Some(pod) = convert_pod(&d, prefix, errors)
            {
                out.push((id(kind, &pod.namespace, &pod.name, prefix), Object::Pod(pod)));
            }
        }
        "Deployment" if expect("apps/v1", errors) => {
            if let Some(d) = parse_typed::<DeploymentDoc>(value, prefix, errors) {
                for pod in convert_deployment(&d, prefix, errors) {
                    out.push((id("Pod", &pod.namespace, &pod.name, prefix), Object::Pod(pod)));
                }
            }
        }
        "NetworkPolicy" if expect("networking.k8s.io/v1", errors) => {
            if let Some(d) = parse_typed::<NetworkPolicyDoc>(value, prefix, errors)
                && let Some(p) = convert_network_policy(&d, prefix, errors)
            {
                out.push((id(kind, &p.key.namespace, &p.key.name, prefix), Object::Policy(p)));
            }
        }
        "ClusterNetworkPolicy" if expect("policy.networking.k8s.io/v1alpha2", errors) => {
            if let Some(d) = parse_typed::<CnpDoc>(value, prefix, errors)
                && let Some(p) = convert_cluster_network_policy(&d, prefix, errors)
            {
                out.push((id(kind, "", &p.key.name, prefix), Object::Policy(p)));
            }
        }
        "ServicePolicy" if expect("bulkhead.dev/v1alpha1", errors) => {
            if let Some(d) = parse_typed::<ServicePolicyDoc>(value, prefix, errors)
                && let Some(p) = convert_service_policy(&d, prefix, errors)
            {
                out.push((id(kind, &p.key.namespace, &p.key.name, prefix), Object::Policy(p)));
            }
        }
        "Quarantine" if expect("bulkhead.dev/v1alpha1", errors) => {
            if let Some(d) = parse_typed::<QuarantineDoc>(value, prefix, errors)
                && let Some(p) = convert_quarantine(&d, prefix, errors)
            {
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

// ---------------------------------------------------------------------------------------------
// Upstream shapes (only the fields Bulkhead reads; unknown fields are ignored like kubectl does
// without --validate=strict).

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Meta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    owner_references: Option<Vec<OwnerReference>>,
}

#[derive(Deserialize)]
struct OwnerReference {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    controller: Option<bool>,
}

#[derive(Deserialize)]
struct NamespaceDoc {
    #[serde(default)]
    metadata: Meta,
}

#[derive(Deserialize)]
struct PodDoc {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    spec: PodSpecDoc,
    #[serde(default)]
    status: PodStatusDoc,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodSpecDoc {
    #[serde(default)]
    service_account_name: Option<String>,
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    host_network: Option<bool>,
    #[serde(default)]
    containers: Vec<ContainerDoc>,
}

#[derive(Deserialize, Default)]
struct ContainerDoc {
    #[serde(default)]
    ports: Vec<ContainerPortDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerPortDoc {
    #[serde(default)]
    name: Option<String>,
    container_port: i64,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodStatusDoc {
    #[serde(default, rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pod_ips: Option<Vec<PodIpDoc>>,
}

#[derive(Deserialize)]
struct PodIpDoc {
    ip: String,
}

#[derive(Deserialize)]
struct DeploymentDoc {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    spec: DeploymentSpecDoc,
}

#[derive(Deserialize, Default)]
struct DeploymentSpecDoc {
    #[serde(default)]
    replicas: Option<i64>,
    #[serde(default)]
    template: PodTemplateDoc,
}

#[derive(Deserialize, Default)]
struct PodTemplateDoc {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    spec: PodSpecDoc,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum IntOrString {
    Int(i64),
    Str(String),
}

#[derive(Deserialize)]
struct NetworkPolicyDoc {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    spec: NetworkPolicySpecDoc,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct NetworkPolicySpecDoc {
    #[serde(default)]
    pod_selector: LabelSelectorSpec,
    #[serde(default)]
    policy_types: Option<Vec<String>>,
    #[serde(default)]
    ingress: Option<Vec<NpIngressRuleDoc>>,
    #[serde(default)]
    egress: Option<Vec<NpEgressRuleDoc>>,
}

#[derive(Deserialize, Default)]
struct NpIngressRuleDoc {
    #[serde(default)]
    from: Option<Vec<NpPeerDoc>>,
    #[serde(default)]
    ports: Option<Vec<NpPortDoc>>,
}

#[derive(Deserialize, Default)]
struct NpEgressRuleDoc {
    #[serde(default)]
    to: Option<Vec<NpPeerDoc>>,
    #[serde(default)]
    ports: Option<Vec<NpPortDoc>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct NpPeerDoc {
    #[serde(default)]
    pod_selector: Option<LabelSelectorSpec>,
    #[serde(default)]
    namespace_selector: Option<LabelSelectorSpec>,
    #[serde(default)]
    ip_block: Option<IpBlockDoc>,
}

#[derive(Deserialize)]
struct IpBlockDoc {
    #[serde(default)]
    cidr: String,
    #[serde(default)]
    except: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct NpPortDoc {
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    port: Option<IntOrString>,
    #[serde(default)]
    end_port: Option<i64>,
}

#[derive(Deserialize)]
struct CnpDoc {
    #[serde(default)]
    metadata: Meta,
    spec: CnpSpecDoc,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CnpSpecDoc {
    #[serde(default)]
    tier: String,
    priority: i64,
    subject: CnpSubjectDoc,
    #[serde(default)]
    ingress: Option<Vec<CnpRuleDoc>>,
    #[serde(default)]
    egress: Option<Vec<CnpRuleDoc>>,
}

#[derive(Deserialize, Default)]
struct CnpSubjectDoc {
    #[serde(default)]
    namespaces: Option<LabelSelectorSpec>,
    #[serde(default)]
    pods: Option<NamespacedPodDoc>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct NamespacedPodDoc {
    #[serde(default)]
    namespace_selector: LabelSelectorSpec,
    #[serde(default)]
    pod_selector: LabelSelectorSpec,
}

#[derive(Deserialize)]
struct CnpRuleDoc {
    #[serde(default)]
    action: String,
    #[serde(default)]
    from: Option<Vec<CnpPeerDoc>>,
    #[serde(default)]
    to: Option<Vec<CnpPeerDoc>>,
    #[serde(default)]
    protocols: Option<Vec<CnpProtocolDoc>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct CnpPeerDoc {
    #[serde(default)]
    namespaces: Option<LabelSelectorSpec>,
    #[serde(default)]
    pods: Option<NamespacedPodDoc>,
    #[serde(default)]
    networks: Option<Vec<String>>,
    #[serde(default)]
    nodes: Option<LabelSelectorSpec>,
    #[serde(default)]
    domain_names: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct CnpProtocolDoc {
    #[serde(default)]
    tcp: Option<CnpPortMatchDoc>,
    #[serde(default)]
    udp: Option<CnpPortMatchDoc>,
    #[serde(default)]
    sctp: Option<CnpPortMatchDoc>,
    #[serde(default)]
    destination_named_port: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct CnpPortMatchDoc {
    #[serde(default)]
    destination_port: Option<CnpPortDoc>,
}

#[derive(Deserialize, Default)]
struct CnpPortDoc {
    #[serde(default)]
    number: Option<i64>,
    #[serde(default)]
    range: Option<CnpRangeDoc>,
}

#[derive(Deserialize)]
struct CnpRangeDoc {
    start: i64,
    end: i64,
}

#[derive(Deserialize)]
struct ServicePolicyDoc {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    spec: ServicePolicySpecDoc,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServicePolicySpecDoc {
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    subject: ServiceSubjectDoc,
    #[serde(default)]
    ingress: Option<Vec<ServiceRuleDoc>>,
    #[serde(default)]
    egress: Option<Vec<ServiceRuleDoc>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServiceSubjectDoc {
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    pod_selector: Option<LabelSelectorSpec>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServiceRuleDoc {
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    from: Option<Vec<ServicePeerDoc>>,
    #[serde(default)]
    to: Option<Vec<ServicePeerDoc>>,
    #[serde(default)]
    ports: Option<Vec<NpPortDoc>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServicePeerDoc {
    #[serde(default)]
    service: Option<ServiceRefDoc>,
    #[serde(default)]
    cidr: Option<String>,
    #[serde(default)]
    except: Option<Vec<String>>,
    #[serde(default)]
    entity: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServiceRefDoc {
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    pod_selector: Option<LabelSelectorSpec>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    namespace_selector: Option<LabelSelectorSpec>,
}

#[derive(Deserialize)]
struct QuarantineDoc {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    spec: QuarantineSpecDoc,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct QuarantineSpecDoc {
    #[serde(default)]
    pods: Option<Vec<String>>,
    #[serde(default)]
    pod_selector: Option<LabelSelectorSpec>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    allow: Option<Vec<QuarantineAllowDoc>>,
    #[serde(default)]
    expires_at: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct QuarantineAllowDoc {
    #[serde(default)]
    pod_selector: Option<LabelSelectorSpec>,
    #[serde(default)]
    namespace_selector: Option<LabelSelectorSpec>,
    #[serde(default)]
    ip_block: Option<IpBlockDoc>,
    #[serde(default)]
    ports: Option<Vec<NpPortDoc>>,
}

// ---------------------------------------------------------------------------------------------
// Conversions with validation.

fn meta_name(
    meta: &Meta,
    prefix: &str,
    _namespaced: bool,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    match &meta.name {
        None => {
            errors.push(FieldError::new(
                format!("{prefix}metadata.name"),
                "missing metadata.name: every object needs a name",
            ));
            None
        }
        Some(n) => match dns_subdomain_problem(n) {
            Some(problem) => {
                errors.push(FieldError::new(format!("{prefix}metadata.name"), problem));
                None
            }
            None => Some(n.clone()),
        },
    }
}

fn meta_namespace(meta: &Meta, prefix: &str, errors: &mut Vec<FieldError>) -> Option<String> {
    let ns = meta.namespace.clone().unwrap_or_else(|| "default".into());
    if let Some(problem) = dns_label_problem(&ns) {
        errors.push(FieldError::new(
            format!("{prefix}metadata.namespace"),
            problem,
        ));
        return None;
    }
    Some(ns)
}

fn dns_label_problem(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    (!ok).then(|| {
        format!("{name:?} is not a DNS label: use at most 63 lower-case alphanumerics or '-', beginning and ending with an alphanumeric")
    })
}

fn labels(meta: &Meta, prefix: &str, errors: &mut Vec<FieldError>) -> Option<Labels> {
    check_labels(
        meta.labels.as_ref(),
        &format!("{prefix}metadata.labels"),
        errors,
    )
}

fn check_labels(
    labels: Option<&BTreeMap<String, String>>,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Labels> {
    let before = errors.len();
    let labels = labels.cloned().unwrap_or_default();
    for (k, v) in &labels {
        validate_label_key(k, path, errors);
        validate_label_value(v, &format!("{path}.{k}"), errors);
    }
    (errors.len() == before).then_some(labels)
}

fn parse_protocol(
    s: Option<&str>,
    path: &str,
    allow_icmp: bool,
    errors: &mut Vec<FieldError>,
) -> Option<Protocol> {
    match s.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        "ICMP" if allow_icmp => Some(Protocol::Icmp),
        "ICMPv6" if allow_icmp => Some(Protocol::Icmpv6),
        other => {
            errors.push(FieldError::new(
                path,
                format!(
                    "unsupported protocol {other:?}: use {}",
                    if allow_icmp {
                        "TCP, UDP, SCTP, ICMP or ICMPv6"
                    } else {
                        "TCP, UDP or SCTP"
                    }
                ),
            ));
            None
        }
    }
}

fn port_number(n: i64, path: &str, errors: &mut Vec<FieldError>) -> Option<u16> {
    if (1..=65535).contains(&n) {
        Some(n as u16)
    } else {
        errors.push(FieldError::new(
            path,
            format!("port {n} is out of range: use 1-65535"),
        ));
        None
    }
}

/// IANA service name: 1-15 lower-case alphanumerics or '-', at least one letter, no leading,
/// trailing or doubled '-'.
fn port_name_problem(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.chars().any(|c| c.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    (!ok).then(|| {
        format!("invalid port name {name:?}: use 1-15 lower-case alphanumerics or '-' with at least one letter")
    })
}

fn convert_pod(d: &PodDoc, prefix: &str, errors: &mut Vec<FieldError>) -> Option<Pod> {
    let before = errors.len();
    let name = meta_name(&d.metadata, prefix, true, errors);
    let namespace = meta_namespace(&d.metadata, prefix, errors);
    let labels = labels(&d.metadata, prefix, errors);
    let ports = container_ports(&d.spec, &format!("{prefix}spec"), errors);
    let mut ips = Vec::new();
    let mut raw: Vec<(String, String)> = Vec::new();
    if let Some(list) = &d.status.pod_ips {
        for (i, ip) in list.iter().enumerate() {
            raw.push((format!("{prefix}status.podIPs[{i}].ip"), ip.ip.clone()));
        }
    }
    if let Some(ip) = &d.status.pod_ip {
        raw.push((format!("{prefix}status.podIP"), ip.clone()));
    }
    for (path, s) in raw {
        match IpAddr::from_str(&s) {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) => errors.push(FieldError::new(path, format!("{s:?} is not an IP address"))),
        }
    }
    if errors.len() > before {
        return None;
    }
    let workload = d.metadata.owner_references.as_ref().and_then(|refs| {
        refs.iter()
            .find(|r| r.controller.unwrap_or(true))
            .map(|r| format!("{}/{}", r.kind, r.name))
    });
    Some(Pod {
        namespace: namespace?,
        name: name?,
        labels: labels?,
        service_account: service_account(&d.spec),
        node_name: d.spec.node_name.clone().filter(|n| !n.is_empty()),
        ips,
        synthetic_ips: false,
        ports,
        workload,
        host_network: d.spec.host_network.unwrap_or(false),
    })
}

fn service_account(spec: &PodSpecDoc) -> String {
    spec.service_account_name
        .clone()
        .or_else(|| spec.service_account.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into())
}

fn container_ports(
    spec: &PodSpecDoc,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Vec<ContainerPort> {
    let mut out = Vec::new();
    for (c, container) in spec.containers.iter().enumerate() {
        for (i, p) in container.ports.iter().enumerate() {
            let pp = format!("{path}.containers[{c}].ports[{i}]");
            let Some(port) = port_number(p.container_port, &format!("{pp}.containerPort"), errors)
            else {
                continue;
            };
            let Some(protocol) = parse_protocol(
                p.protocol.as_deref(),
                &format!("{pp}.protocol"),
                false,
                errors,
            ) else {
                continue;
            };
            if let Some(name) = &p.name
                && let Some(problem) = port_name_problem(name)
            {
                errors.push(FieldError::new(format!("{pp}.name"), problem));
                continue;
            }
            out.push(ContainerPort {
                name: p.name.clone(),
                port,
                protocol,
            });
        }
    }
    out.sort();
    out.dedup();
    out
}

fn convert_deployment(d: &DeploymentDoc, prefix: &str, errors: &mut Vec<FieldError>) -> Vec<Pod> {
    let before = errors.len();
    let name = meta_name(&d.metadata, prefix, true, errors);
    let namespace = meta_namespace(&d.metadata, prefix, errors);
    let labels = labels(
        &d.spec.template.metadata,
        &format!("{prefix}spec.template."),
        errors,
    );
    let ports = container_ports(
        &d.spec.template.spec,
        &format!("{prefix}spec.template.spec"),
        errors,
    );
    let replicas = d.spec.replicas.unwrap_or(1);
    if !(0..=10_000).contains(&replicas) {
        errors.push(FieldError::new(
            format!("{prefix}spec.replicas"),
            format!("replicas {replicas} is out of range: use 0-10000"),
        ));
    }
    if errors.len() > before {
        return Vec::new();
    }
    let (Some(name), Some(namespace), Some(labels)) = (name, namespace, labels) else {
        return Vec::new();
    };
    (0..replicas)
        .map(|i| Pod {
            namespace: namespace.clone(),
            name: format!("{name}-{i}"),
            labels: labels.clone(),
            service_account: service_account(&d.spec.template.spec),
            node_name: d.spec.template.spec.node_name.clone(),
            ips: Vec::new(),
            synthetic_ips: false,
            ports: ports.clone(),
            workload: Some(format!("Deployment/{name}")),
            host_network: d.spec.template.spec.host_network.unwrap_or(false),
        })
        .collect()
}

fn parse_cidr(s: &str, path: &str, errors: &mut Vec<FieldError>) -> Option<IpNetwork> {
    if !s.contains('/') {
        errors.push(FieldError::new(
            path,
            format!("{s:?} is not a CIDR: write it as address/prefix, e.g. 10.0.0.0/8"),
        ));
        return None;
    }
    match IpNetwork::from_str(s) {
        Ok(net) => IpNetwork::new(net.network(), net.prefix()).ok(),
        Err(e) => {
            errors.push(FieldError::new(
                path,
                format!(
                    "{s:?} is not a valid CIDR ({e}): write it as address/prefix, e.g. 10.0.0.0/8"
                ),
            ));
            None
        }
    }
}

fn parse_cidr_peer(
    cidr: &str,
    except: &[String],
    path: &str,
    except_path: &str,
    errors: &mut Vec<FieldError>,
) -> Option<CidrPeer> {
    let before = errors.len();
    let net = parse_cidr(cidr, path, errors)?;
    let mut excepts = Vec::new();
    for (i, e) in except.iter().enumerate() {
        let p = format!("{except_path}[{i}]");
        let Some(ex) = parse_cidr(e, &p, errors) else {
            continue;
        };
        let inside = ex.is_ipv4() == net.is_ipv4()
            && ex.prefix() > net.prefix()
            && net.contains(ex.network());
        if !inside {
            errors.push(FieldError::new(
                p,
                format!("except {e:?} must be a strict subset of cidr {cidr:?}"),
            ));
            continue;
        }
        excepts.push(ex);
    }
    if errors.len() > before {
        return None;
    }
    excepts.sort();
    excepts.dedup();
    Some(CidrPeer {
        cidr: net,
        except: excepts,
    })
}

/// NetworkPolicy / ServicePolicy `ports` entries.
fn convert_np_ports(
    ports: Option<&Vec<NpPortDoc>>,
    path: &str,
    allow_icmp: bool,
    errors: &mut Vec<FieldError>,
) -> Vec<PortSpec> {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        return vec![PortSpec::ANY];
    };
    let mut out = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let pp = format!("{path}[{i}]");
        let Some(protocol) = parse_protocol(
            p.protocol.as_deref(),
            &format!("{pp}.protocol"),
            allow_icmp,
            errors,
        ) else {
            continue;
        };
        match (&p.port, p.end_port) {
            (None, Some(_)) => errors.push(FieldError::new(
                format!("{pp}.endPort"),
                "endPort needs a numeric port: set port to the first port of the range",
            )),
            (Some(_), _) if !protocol.has_ports() => errors.push(FieldError::new(
                format!("{pp}.port"),
                format!("protocol {protocol:?} has no ports: remove port"),
            )),
            (None, None) => out.push(PortSpec::Range {
                protocol: Some(protocol),
                ports: PortRange::ALL,
            }),
            (Some(IntOrString::Str(name)), end) => {
                if end.is_some() {
                    errors.push(FieldError::new(
                        format!("{pp}.endPort"),
                        "endPort cannot be used with a named port: use a numeric port",
                    ));
                } else if let Some(problem) = port_name_problem(name) {
                    errors.push(FieldError::new(format!("{pp}.port"), problem));
                } else {
                    out.push(PortSpec::Named {
                        protocol: Some(protocol),
                        name: name.clone(),
                    });
                }
            }
            (Some(IntOrString::Int(n)), end) => {
                let Some(first) = port_number(*n, &format!("{pp}.port"), errors) else {
                    continue;
                };
                let last = match end {
                    None => first,
                    Some(e) => {
                        let Some(last) = port_number(e, &format!("{pp}.endPort"), errors) else {
                            continue;
                        };
                        if last < first {
                            errors.push(FieldError::new(
                                format!("{pp}.endPort"),
                                format!(
                                    "endPort {last} is below port {first}: it must be at least port"
                                ),
                            ));
                            continue;
                        }
                        last
                    }
                };
                out.push(PortSpec::Range {
                    protocol: Some(protocol),
                    ports: PortRange { first, last },
                });
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn too_many_rules(n: usize, max: usize, path: &str, errors: &mut Vec<FieldError>) -> bool {
    if n > max {
        errors.push(FieldError::new(
            path,
            format!("{n} rules is more than the {max} allowed: split the policy"),
        ));
        return true;
    }
    false
}

fn convert_network_policy(
    d: &NetworkPolicyDoc,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Policy> {
    let before = errors.len();
    let name = meta_name(&d.metadata, prefix, true, errors);
    let namespace = meta_namespace(&d.metadata, prefix, errors);
    let spec = &d.spec;
    let pod_selector = Selector::parse(
        &spec.pod_selector,
        &format!("{prefix}spec.podSelector"),
        errors,
    );
    let ingress = spec.ingress.as_deref().unwrap_or_default();
    let egress = spec.egress.as_deref().unwrap_or_default();
    let (mut has_ingress, mut has_egress) = (false, false);
    match &spec.policy_types {
        Some(types) => {
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => has_ingress = true,
                    "Egress" => has_egress = true,
                    other => errors.push(FieldError::new(
                        format!("{prefix}spec.policyTypes[{i}]"),
                        format!("unknown policy type {other:?}: use Ingress or Egress"),
                    )),
                }
            }
        }
        None => {
            has_ingress = true;
            has_egress = !egress.is_empty();
        }
    }
    too_many_rules(
        ingress.len(),
        MAX_RULES_PER_DIRECTION,
        &format!("{prefix}spec.ingress"),
        errors,
    );
    too_many_rules(
        egress.len(),
        MAX_RULES_PER_DIRECTION,
        &format!("{prefix}spec.egress"),
        errors,
    );
    let ns = namespace.clone().unwrap_or_default();
    let mut rules = Vec::new();
    let mut convert = |direction: Direction,
                       index: usize,
                       peers: Option<&Vec<NpPeerDoc>>,
                       ports: Option<&Vec<NpPortDoc>>,
                       path: String,
                       peer_field: &str,
                       errors: &mut Vec<FieldError>| {
        let peers = match peers.filter(|p| !p.is_empty()) {
            None => vec![Peer::Any],
            Some(list) => list
                .iter()
                .enumerate()
                .filter_map(|(i, p)| {
                    convert_np_peer(p, &ns, &format!("{path}.{peer_field}[{i}]"), errors)
                })
                .collect(),
        };
        let ports = convert_np_ports(ports, &format!("{path}.ports"), false, errors);
        rules.push(Rule {
            direction,
            index: index as u32,
            peers,
            ports,
            tier: Tier::Application,
            priority: 0,
            action: Action::Allow,
            audit: false,
        });
    };
    for (i, r) in ingress.iter().enumerate() {
        convert(
            Direction::Ingress,
            i,
            r.from.as_ref(),
            r.ports.as_ref(),
            format!("{prefix}spec.ingress[{i}]"),
            "from",
            errors,
        );
    }
    for (i, r) in egress.iter().enumerate() {
        convert(
            Direction::Egress,
            i,
            r.to.as_ref(),
            r.ports.as_ref(),
            format!("{prefix}spec.egress[{i}]"),
            "to",
            errors,
        );
    }
    if errors.len() > before {
        return None;
    }
    // Rules of a direction the policy does not declare in policyTypes have no effect.
    rules.retain(|r| match r.direction {
        Direction::Ingress => has_ingress,
        Direction::Egress => has_egress,
    });
    let namespace = namespace?;
    Some(Policy {
        key: PolicyKey {
            kind: RuleKind::NetworkPolicy,
            namespace: namespace.clone(),
            name: name?,
        },
        subject: PodSelection {
            namespaces: NamespaceScope::Named(namespace),
            pods: pod_selector?,
            service_account: None,
        },
        ingress_isolation: if has_ingress {
            Isolation::Enforce
        } else {
            Isolation::None
        },
        egress_isolation: if has_egress {
            Isolation::Enforce
        } else {
            Isolation::None
        },
        rules,
        quarantine: None,
    })
}

fn convert_np_peer(
    p: &NpPeerDoc,
    namespace: &str,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Peer> {
    match (&p.pod_selector, &p.namespace_selector, &p.ip_block) {
        (None, None, None) => {
            errors.push(FieldError::new(
                path,
                "must specify a peer: set podSelector, namespaceSelector or ipBlock",
            ));
            None
        }
        (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
            errors.push(FieldError::new(
                path,
                "ipBlock cannot be combined with podSelector or namespaceSelector: use separate peers",
            ));
            None
        }
        (None, None, Some(block)) => parse_cidr_peer(
            &block.cidr,
            block.except.as_deref().unwrap_or_default(),
            &format!("{path}.ipBlock.cidr"),
            &format!("{path}.ipBlock.except"),
            errors,
        )
        .map(Peer::Cidr),
        (pods, nss, None) => {
            let pods = match pods {
                Some(s) => Selector::parse(s, &format!("{path}.podSelector"), errors)?,
                None => Selector::everything(),
            };
            let namespaces = match nss {
                Some(s) => NamespaceScope::Selected(Selector::parse(
                    s,
                    &format!("{path}.namespaceSelector"),
                    errors,
                )?),
                None => NamespaceScope::Named(namespace.to_string()),
            };
            Some(Peer::Pods(PodSelection {
                namespaces,
                pods,
                service_account: None,
            }))
        }
    }
}

/// Upstream allows at most 25 rules per direction and 25 peers per rule.
const CNP_MAX_ITEMS: usize = 25;
/// Rule positions are folded into the entry priority: `priority × CNP_PRIORITY_STRIDE + index`.
pub const CNP_PRIORITY_STRIDE: u16 = 32;

fn convert_cluster_network_policy(
    d: &CnpDoc,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Policy> {
    let before = errors.len();
    let name = meta_name(&d.metadata, prefix, false, errors);
    let spec = &d.spec;
    let sp = format!("{prefix}spec");
    let tier = match spec.tier.as_str() {
        "Admin" => Some(Tier::Admin),
        "Baseline" => Some(Tier::Baseline),
        other => {
            errors.push(FieldError::new(
                format!("{sp}.tier"),
                format!("unknown tier {other:?}: use Admin or Baseline"),
            ));
            None
        }
    };
    if !(0..=1000).contains(&spec.priority) {
        errors.push(FieldError::new(
            format!("{sp}.priority"),
            format!("priority {} is out of range: use 0-1000", spec.priority),
        ));
    }
    let subject = match (&spec.subject.namespaces, &spec.subject.pods) {
        (Some(ns), None) => {
            Selector::parse(ns, &format!("{sp}.subject.namespaces"), errors).map(|s| PodSelection {
                namespaces: NamespaceScope::Selected(s),
                pods: Selector::everything(),
                service_account: None,
            })
        }
        (None, Some(p)) => namespaced_pod(p, &format!("{sp}.subject.pods"), errors),
        _ => {
            errors.push(FieldError::new(
                format!("{sp}.subject"),
                "set exactly one of namespaces or pods",
            ));
            None
        }
    };
    let mut rules = Vec::new();
    for (direction, list, field) in [
        (Direction::Ingress, &spec.ingress, "ingress"),
        (Direction::Egress, &spec.egress, "egress"),
    ] {
        let list = list.as_deref().unwrap_or_default();
        if too_many_rules(list.len(), CNP_MAX_ITEMS, &format!("{sp}.{field}"), errors) {
            continue;
        }
        for (i, r) in list.iter().enumerate() {
            let rp = format!("{sp}.{field}[{i}]");
            if let Some(rule) = convert_cnp_rule(r, direction, i, tier, spec.priority, &rp, errors)
            {
                rules.push(rule);
            }
        }
    }
    if errors.len() > before {
        return None;
    }
    Some(Policy {
        key: PolicyKey {
            kind: RuleKind::ClusterNetworkPolicy,
            namespace: String::new(),
            name: name?,
        },
        subject: subject?,
        ingress_isolation: Isolation::None,
        egress_isolation: Isolation::None,
        rules,
        quarantine: None,
    })
}

fn namespaced_pod(
    p: &NamespacedPodDoc,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Option<PodSelection> {
    let ns = Selector::parse(
        &p.namespace_selector,
        &format!("{path}.namespaceSelector"),
        errors,
    );
    let pods = Selector::parse(&p.pod_selector, &format!("{path}.podSelector"), errors);
    Some(PodSelection {
        namespaces: NamespaceScope::Selected(ns?),
        pods: pods?,
        service_account: None,
    })
}

fn convert_cnp_rule(
    r: &CnpRuleDoc,
    direction: Direction,
    index: usize,
    tier: Option<Tier>,
    priority: i64,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Rule> {
    let before = errors.len();
    let action = match r.action.as_str() {
        "Accept" => Some(Action::Allow),
        "Deny" => Some(Action::Deny),
        "Pass" => Some(Action::Pass),
        other => {
            errors.push(FieldError::new(
                format!("{path}.action"),
                format!("unknown action {other:?}: use Accept, Deny or Pass"),
            ));
            None
        }
    };
    let (peers_doc, field, other) = match direction {
        Direction::Ingress => (&r.from, "from", &r.to),
        Direction::Egress => (&r.to, "to", &r.from),
    };
    if other.is_some() {
        let wrong = if field == "from" { "to" } else { "from" };
        errors.push(FieldError::new(
            format!("{path}.{wrong}"),
            format!(
                "{} rules have no {wrong}: use {field}",
                if field == "from" { "ingress" } else { "egress" }
            ),
        ));
    }
    let peers_doc = peers_doc.as_deref().unwrap_or_default();
    if peers_doc.is_empty() {
        errors.push(FieldError::new(
            format!("{path}.{field}"),
            format!("{field} must list at least one peer"),
        ));
    }
    too_many_rules(
        peers_doc.len(),
        CNP_MAX_ITEMS,
        &format!("{path}.{field}"),
        errors,
    );
    let mut peers = Vec::new();
    let mut has_network = false;
    for (i, p) in peers_doc.iter().enumerate() {
        let pp = format!("{path}.{field}[{i}]");
        let set = [
            p.namespaces.is_some(),
            p.pods.is_some(),
            p.networks.is_some(),
            p.nodes.is_some(),
            p.domain_names.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if set != 1 {
            errors.push(FieldError::new(
                pp,
                "set exactly one of namespaces, pods or networks",
            ));
            continue;
        }
        if let Some(ns) = &p.namespaces {
            if let Some(s) = Selector::parse(ns, &format!("{pp}.namespaces"), errors) {
                peers.push(Peer::Pods(PodSelection {
                    namespaces: NamespaceScope::Selected(s),
                    pods: Selector::everything(),
                    service_account: None,
                }));
            }
        } else if let Some(pods) = &p.pods {
            if let Some(s) = namespaced_pod(pods, &format!("{pp}.pods"), errors) {
                peers.push(Peer::Pods(s));
            }
        } else if let Some(networks) = &p.networks {
            if direction == Direction::Ingress {
                errors.push(FieldError::new(
                    format!("{pp}.networks"),
                    "networks peers are only allowed in egress rules",
                ));
                continue;
            }
            has_network = true;
            if networks.is_empty() {
                errors.push(FieldError::new(
                    format!("{pp}.networks"),
                    "networks must list at least one CIDR",
                ));
            }
            for (j, n) in networks.iter().enumerate() {
                if let Some(c) = parse_cidr(n, &format!("{pp}.networks[{j}]"), errors) {
                    peers.push(Peer::Cidr(CidrPeer {
                        cidr: c,
                        except: Vec::new(),
                    }));
                }
            }
        } else if p.nodes.is_some() {
            errors.push(FieldError::new(
                format!("{pp}.nodes"),
                "nodes peers are not supported by bulkhead yet: use networks with the node CIDRs",
            ));
        } else {
            errors.push(FieldError::new(
                format!("{pp}.domainNames"),
                "domainNames peers are not supported by bulkhead: use networks",
            ));
        }
    }
    let mut ports = Vec::new();
    match &r.protocols {
        None => ports.push(PortSpec::ANY),
        Some(list) => {
            if list.is_empty() {
                errors.push(FieldError::new(
                    format!("{path}.protocols"),
                    "protocols must list at least one entry, or be left out to match all",
                ));
            }
            for (i, proto) in list.iter().enumerate() {
                let pp = format!("{path}.protocols[{i}]");
                let set = [
                    proto.tcp.is_some(),
                    proto.udp.is_some(),
                    proto.sctp.is_some(),
                    proto.destination_named_port.is_some(),
                ]
                .iter()
                .filter(|x| **x)
                .count();
                if set != 1 {
                    errors.push(FieldError::new(
                        pp,
                        "set exactly one of tcp, udp, sctp or destinationNamedPort",
                    ));
                    continue;
                }
                if let Some(name) = &proto.destination_named_port {
                    if has_network {
                        errors.push(FieldError::new(
                            format!("{pp}.destinationNamedPort"),
                            "networks peers cannot be used with named ports: they have no named ports",
                        ));
                    } else if let Some(problem) = port_name_problem(name) {
                        errors.push(FieldError::new(
                            format!("{pp}.destinationNamedPort"),
                            problem,
                        ));
                    } else {
                        ports.push(PortSpec::Named {
                            protocol: None,
                            name: name.clone(),
                        });
                    }
                    continue;
                }
                let (protocol, m, field) = if let Some(m) = &proto.tcp {
                    (Protocol::Tcp, m, "tcp")
                } else if let Some(m) = &proto.udp {
                    (Protocol::Udp, m, "udp")
                } else if let Some(m) = &proto.sctp {
                    (Protocol::Sctp, m, "sctp")
                } else {
                    continue;
                };
                let dp = format!("{pp}.{field}.destinationPort");
                let range = match &m.destination_port {
                    None => Some(PortRange::ALL),
                    Some(CnpPortDoc {
                        number: Some(n),
                        range: None,
                    }) => port_number(*n, &format!("{dp}.number"), errors).map(PortRange::single),
                    Some(CnpPortDoc {
                        number: None,
                        range: Some(r),
                    }) => {
                        let s = port_number(r.start, &format!("{dp}.range.start"), errors);
                        let e = port_number(r.end, &format!("{dp}.range.end"), errors);
                        match (s, e) {
                            (Some(s), Some(e)) if s < e => Some(PortRange { first: s, last: e }),
                            (Some(_), Some(_)) => {
                                errors.push(FieldError::new(
                                    format!("{dp}.range"),
                                    "start port must be less than end port",
                                ));
                                None
                            }
                            _ => None,
                        }
                    }
                    Some(_) => {
                        errors.push(FieldError::new(dp, "set exactly one of number or range"));
                        None
                    }
                };
                if let Some(ports_range) = range {
                    ports.push(PortSpec::Range {
                        protocol: Some(protocol),
                        ports: ports_range,
                    });
                }
            }
        }
    }
    if errors.len() > before {
        return None;
    }
    ports.sort();
    ports.dedup();
    Some(Rule {
        direction,
        index: index as u32,
        peers,
        ports,
        tier: tier?,
        priority: (priority as u16) * CNP_PRIORITY_STRIDE + index as u16,
        action: action?,
        audit: false,
    })
}

fn convert_service_policy(
    d: &ServicePolicyDoc,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Policy> {
    let before = errors.len();
    let name = meta_name(&d.metadata, prefix, true, errors);
    let namespace = meta_namespace(&d.metadata, prefix, errors);
    let ns = namespace.clone().unwrap_or_default();
    let sp = format!("{prefix}spec");
    let spec = &d.spec;
    let audit = match spec.mode.as_deref().unwrap_or("Enforce") {
        "Enforce" => false,
        "Audit" => true,
        other => {
            errors.push(FieldError::new(
                format!("{sp}.mode"),
                format!("unknown mode {other:?}: use Enforce or Audit"),
            ));
            false
        }
    };
    let subject_pods = match &spec.subject.pod_selector {
        Some(s) => Selector::parse(s, &format!("{sp}.subject.podSelector"), errors),
        None => Some(Selector::everything()),
    };
    if let Some(sa) = &spec.subject.service_account
        && let Some(problem) = dns_subdomain_problem(sa)
    {
        errors.push(FieldError::new(
            format!("{sp}.subject.serviceAccount"),
            problem,
        ));
    }
    let mut rules = Vec::new();
    let mut isolation = [Isolation::None; 2];
    for (direction, list, field, peer_field) in [
        (Direction::Ingress, &spec.ingress, "ingress", "from"),
        (Direction::Egress, &spec.egress, "egress", "to"),
    ] {
        let list = list.as_deref().unwrap_or_default();
        if too_many_rules(
            list.len(),
            MAX_RULES_PER_DIRECTION,
            &format!("{sp}.{field}"),
            errors,
        ) {
            continue;
        }
        for (i, r) in list.iter().enumerate() {
            let rp = format!("{sp}.{field}[{i}]");
            let action = match r.action.as_deref().unwrap_or("Allow") {
                "Allow" => Action::Allow,
                "Deny" => Action::Deny,
                other => {
                    errors.push(FieldError::new(
                        format!("{rp}.action"),
                        format!("unknown action {other:?}: use Allow or Deny"),
                    ));
                    continue;
                }
            };
            let (peers_doc, wrong) = match direction {
                Direction::Ingress => (&r.from, r.to.is_some().then_some("to")),
                Direction::Egress => (&r.to, r.from.is_some().then_some("from")),
            };
            if let Some(w) = wrong {
                errors.push(FieldError::new(
                    format!("{rp}.{w}"),
                    format!("{field} rules have no {w}: use {peer_field}"),
                ));
            }
            let peers = match peers_doc.as_ref().filter(|p| !p.is_empty()) {
                None => vec![Peer::Any],
                Some(list) => list
                    .iter()
                    .enumerate()
                    .filter_map(|(j, p)| {
                        convert_service_peer(p, &ns, &format!("{rp}.{peer_field}[{j}]"), errors)
                    })
                    .collect(),
            };
            let ports = convert_np_ports(r.ports.as_ref(), &format!("{rp}.ports"), true, errors);
            if action == Action::Allow {
                isolation[direction as usize] = if audit {
                    Isolation::Audit
                } else {
                    Isolation::Enforce
                };
            }
            rules.push(Rule {
                direction,
                index: i as u32,
                peers,
                ports,
                tier: Tier::Application,
                priority: 0,
                action,
                audit,
            });
        }
    }
    if errors.len() > before {
        return None;
    }
    Some(Policy {
        key: PolicyKey {
            kind: RuleKind::ServicePolicy,
            namespace: ns.clone(),
            name: name?,
        },
        subject: PodSelection {
            namespaces: NamespaceScope::Named(ns),
            pods: subject_pods?,
            service_account: spec.subject.service_account.clone(),
        },
        ingress_isolation: isolation[Direction::Ingress as usize],
        egress_isolation: isolation[Direction::Egress as usize],
        rules,
        quarantine: None,
    })
}

fn convert_service_peer(
    p: &ServicePeerDoc,
    namespace: &str,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Peer> {
    let set = [p.service.is_some(), p.cidr.is_some(), p.entity.is_some()]
        .iter()
        .filter(|x| **x)
        .count();
    if set != 1 {
        errors.push(FieldError::new(
            path,
            "set exactly one of service, cidr or entity",
        ));
        return None;
    }
    if p.except.is_some() && p.cidr.is_none() {
        errors.push(FieldError::new(
            format!("{path}.except"),
            "except needs cidr",
        ));
        return None;
    }
    if let Some(cidr) = &p.cidr {
        return parse_cidr_peer(
            cidr,
            p.except.as_deref().unwrap_or_default(),
            &format!("{path}.cidr"),
            &format!("{path}.except"),
            errors,
        )
        .map(Peer::Cidr);
    }
    if let Some(entity) = &p.entity {
        return match entity.as_str() {
            "world" => Some(Peer::World),
            "cluster" => Some(Peer::Cluster),
            "host" => Some(Peer::Host),
            other => {
                errors.push(FieldError::new(
                    format!("{path}.entity"),
                    format!("unknown entity {other:?}: use world, cluster or host"),
                ));
                None
            }
        };
    }
    let s = p.service.as_ref()?;
    let sp = format!("{path}.service");
    let before = errors.len();
    let pods = match &s.pod_selector {
        Some(sel) => Selector::parse(sel, &format!("{sp}.podSelector"), errors),
        None => Some(Selector::everything()),
    };
    let namespaces = match (&s.namespace, &s.namespace_selector) {
        (Some(_), Some(_)) => {
            errors.push(FieldError::new(
                sp.clone(),
                "set at most one of namespace or namespaceSelector",
            ));
            None
        }
        (Some(n), None) => match dns_label_problem(n) {
            Some(problem) => {
                errors.push(FieldError::new(format!("{sp}.namespace"), problem));
                None
            }
            None => Some(NamespaceScope::Named(n.clone())),
        },
        (None, Some(sel)) => Selector::parse(sel, &format!("{sp}.namespaceSelector"), errors)
            .map(NamespaceScope::Selected),
        (None, None) => Some(NamespaceScope::Named(namespace.to_string())),
    };
    if let Some(sa) = &s.service_account
        && let Some(problem) = dns_subdomain_problem(sa)
    {
        errors.push(FieldError::new(format!("{sp}.serviceAccount"), problem));
    }
    if errors.len() > before {
        return None;
    }
    Some(Peer::Pods(PodSelection {
        namespaces: namespaces?,
        pods: pods?,
        service_account: s.service_account.clone(),
    }))
}

/// `bulkhead.dev/v1alpha1` Quarantine: see [`crate::model::Policy`] for what it becomes.
fn convert_quarantine(
    d: &QuarantineDoc,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Policy> {
    let before = errors.len();
    let name = meta_name(&d.metadata, prefix, true, errors);
    let namespace = meta_namespace(&d.metadata, prefix, errors);
    let ns = namespace.clone().unwrap_or_default();
    let sp = format!("{prefix}spec");
    let spec = &d.spec;
    let (pods, selector) = match (&spec.pods, &spec.pod_selector) {
        (Some(_), Some(_)) | (None, None) => {
            errors.push(FieldError::new(
                sp.clone(),
                "set exactly one of pods (pod names) or podSelector to choose the pods to quarantine",
            ));
            (None, None)
        }
        (Some(names), None) => {
            if names.is_empty() {
                errors.push(FieldError::new(
                    format!("{sp}.pods"),
                    "pods is empty: name at least one pod of the namespace",
                ));
            }
            for (i, n) in names.iter().enumerate() {
                if let Some(problem) = dns_subdomain_problem(n) {
                    errors.push(FieldError::new(format!("{sp}.pods[{i}]"), problem));
                }
            }
            let mut names = names.clone();
            names.sort();
            names.dedup();
            (Some(names), Some(Selector::everything()))
        }
        (None, Some(sel)) => (
            None,
            Selector::parse(sel, &format!("{sp}.podSelector"), errors),
        ),
    };
    let reason = spec.reason.as_deref().map(str::trim).unwrap_or_default();
    if reason.is_empty() {
        errors.push(FieldError::new(
            format!("{sp}.reason"),
            "reason is required: say why the pods are quarantined",
        ));
    }
    let expires_at = spec.expires_at.as_deref().and_then(|t| {
        parse_rfc3339(t)
            .map_err(|problem| {
                errors.push(FieldError::new(
                    format!("{sp}.expiresAt"),
                    format!(
                        "{t:?} is not an RFC 3339 time ({problem}): write e.g. 2026-12-01T00:00:00Z"
                    ),
                ))
            })
            .ok()
    });
    let allow = spec.allow.as_deref().unwrap_or_default();
    too_many_rules(
        allow.len(),
        MAX_RULES_PER_DIRECTION,
        &format!("{sp}.allow"),
        errors,
    );
    let mut rules = Vec::new();
    for (i, a) in allow.iter().enumerate() {
        let ap = format!("{sp}.allow[{i}]");
        let peer_doc = NpPeerDoc {
            pod_selector: a.pod_selector.clone(),
            namespace_selector: a.namespace_selector.clone(),
            ip_block: a.ip_block.as_ref().map(|b| IpBlockDoc {
                cidr: b.cidr.clone(),
                except: b.except.clone(),
            }),
        };
        let peer = convert_np_peer(&peer_doc, &ns, &ap, errors);
        for (j, p) in a.ports.iter().flatten().enumerate() {
            if let Some(IntOrString::Str(_)) = p.port {
                errors.push(FieldError::new(
                    format!("{ap}.ports[{j}].port"),
                    "named ports cannot be used in quarantine exceptions: use the port number",
                ));
            }
        }
        let ports = convert_np_ports(a.ports.as_ref(), &format!("{ap}.ports"), true, errors);
        let Some(peer) = peer else {
            continue;
        };
        for direction in Direction::ALL {
            rules.push(Rule {
                direction,
                index: i as u32,
                peers: vec![peer.clone()],
                ports: ports.clone(),
                tier: Tier::Quarantine,
                priority: 0,
                action: Action::Allow,
                audit: false,
            });
        }
    }
    if errors.len() > before {
        return None;
    }
    Some(Policy {
        key: PolicyKey {
            kind: RuleKind::Quarantine,
            namespace: ns.clone(),
            name: name?,
        },
        subject: PodSelection {
            namespaces: NamespaceScope::Named(namespace?),
            pods: selector?,
            service_account: None,
        },
        ingress_isolation: Isolation::Enforce,
        egress_isolation: Isolation::Enforce,
        rules,
        quarantine: Some(QuarantineSpec {
            pods,
            reason: reason.to_string(),
            expires_at,
        }),
    })
}

/// An RFC 3339 date-time (`2026-12-01T00:00:00Z`, `2026-12-01t01:30:00.5+01:30`).
pub fn parse_rfc3339(s: &str) -> Result<SystemTime, String> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Result<i64, String> {
        let part = s
            .get(from..from + len)
            .filter(|p| p.bytes().all(|c| c.is_ascii_digit()))
            .ok_or_else(|| format!("expected {len} digits at position {}", from + 1))?;
        part.parse::<i64>().map_err(|e| e.to_string())
    };
    let sep = |at: usize, want: &[u8]| -> Result<(), String> {
        match b.get(at) {
            Some(c) if want.contains(c) => Ok(()),
            _ => Err(format!(
                "expected {:?} at position {}",
                want.iter().map(|c| *c as char).collect::<String>(),
                at + 1
            )),
        }
    };
    let year = num(0, 4)?;
    sep(4, b"-")?;
    let month = num(5, 2)?;
    sep(7, b"-")?;
    let day = num(8, 2)?;
    sep(10, b"Tt ")?;
    let hour = num(11, 2)?;
    sep(13, b":")?;
    let minute = num(14, 2)?;
    sep(16, b":")?;
    let second = num(17, 2)?;
    let mut at = 19;
    let mut nanos: u32 = 0;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(|c| c.is_ascii_digit()) {
            at += 1;
        }
        if at == start {
            return Err("expected digits after the decimal point".into());
        }
        let digits = &s[start..at.min(start + 9)];
        let scale = 10u32.pow(9 - digits.len() as u32);
        nanos = digits.parse::<u32>().map_err(|e| e.to_string())? * scale;
    }
    let offset = match b.get(at) {
        Some(b'Z' | b'z') if at + 1 == b.len() => 0,
        Some(c @ (b'+' | b'-')) if at + 6 == b.len() => {
            let sign = if *c == b'+' { 1 } else { -1 };
            let h = num(at + 1, 2)?;
            sep(at + 3, b":")?;
            let m = num(at + 4, 2)?;
            if h > 23 || m > 59 {
                return Err("the offset is out of range".into());
            }
            sign * (h * 3600 + m * 60)
        }
        _ => return Err("expected Z or an offset like +01:00 at the end".into()),
    };
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err(format!("month {month} does not exist")),
    };
    if !(1..=days_in_month).contains(&day) {
        return Err(format!("day {day} does not exist in month {month}"));
    }
    if hour > 23 || minute > 59 || second > 60 {
        return Err("the time of day is out of range".into());
    }
    // Days since 1970-01-01 (proleptic Gregorian calendar; H. Hinnant's algorithm).
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second.min(59) - offset;
    let since = |secs: i64| std::time::Duration::new(secs.unsigned_abs(), 0);
    let t = if secs >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(since(secs))
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(since(secs))
    };
    t.and_then(|t| t.checked_add(std::time::Duration::from_nanos(nanos as u64)))
        .ok_or_else(|| "the time is out of range".into())
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
