//! Least-privilege policies learned from observed traffic (`bulkhead policy recommend`).
//!
//! The input is flow records (what the data plane admitted, at either end of a connection) and
//! the pods as the controller knows them now. Connections are folded by workload (a pod's
//! owner, else the pod): (source, destination, port, protocol) with how often and when they were
//! seen. Each *covered* workload (a pod of it lies in one of the chosen namespaces) gets one
//! Kubernetes NetworkPolicy that isolates it in both directions and admits exactly what was
//! seen: its ingress from each observed source, its egress to each observed destination, on the
//! observed ports. Applied as enforced, every connection observed as admitted keeps working, and
//! every other connection of a covered workload is denied.
//!
//! * Selectors use a workload's *stable* labels: the labels all its pods share, after the
//!   identity label filter (never `pod-template-hash` and the like). A workload whose pods share
//!   none cannot be selected and is reported instead of guessed at.
//! * Peers in another namespace are selected by `kubernetes.io/metadata.name` plus their pod
//!   labels; addresses of no pod (`world`, the node) become `/32` (`/128`) ipBlocks.
//! * ICMP cannot be named in a NetworkPolicy port; such connections are counted, not admitted.
//! * Deterministic: the output depends only on the records and the pods (sorted maps
//!   throughout), so the same window gives byte-identical YAML, and new traffic changes only the
//!   rules it touches. Each policy says what it was learned from in annotations (per rule:
//!   connections, first and last seen).
//! * A recommendation is `learning` while edges keep appearing (one was first seen within the
//!   learning window before `now`), else `stable`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, UNIX_EPOCH},
};

use k8s_openapi::{
    api::networking::v1::{
        IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule,
        NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
    },
    apimachinery::pkg::{
        apis::meta::v1::LabelSelector, apis::meta::v1::ObjectMeta, util::intstr::IntOrString,
    },
};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::{
    identity::LabelFilter,
    kubernetes::crd::{
        IntOrString as PortValue, PolicyPort, ServicePeer, ServicePolicy, ServicePolicySpec,
        ServiceRef, ServiceRule, ServiceSubject, StagedNetworkPolicy, StagedNetworkPolicySpec,
    },
    model::{Labels, NAMESPACE_NAME_LABEL, Pod},
    ruleset::{Direction, FlowRecord, FlowVerdict, PodKey, Protocol},
};

/// The annotation saying whether a recommendation is still learning.
pub const STATUS_ANNOTATION: &str = "bulkhead.dev/recommendation";
/// The annotation prefix of what a rule was learned from (`…/ingress.0`, `…/egress.2`).
pub const LEARNED_ANNOTATION: &str = "bulkhead.dev/learned-from";
/// The label every recommended policy carries.
pub const RECOMMENDED_LABEL: &str = "bulkhead.dev/recommended";

/// What a recommendation is written as.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecommendKind {
    /// Kubernetes NetworkPolicies, one per workload, selected by its stable labels.
    #[default]
    NetworkPolicy,
    /// Bulkhead ServicePolicies, one per service identity (namespace and service account),
    /// peers by service account; ICMP can be named.
    ServicePolicy,
}

#[derive(Debug, Clone)]
pub struct RecommendOptions {
    pub kind: RecommendKind,
    /// Namespaces whose workloads get a policy; empty: every namespace of an observed pod.
    pub namespaces: BTreeSet<String>,
    /// Edges first seen within this long before `now` make the recommendation `learning`.
    pub learning_window: Duration,
    pub now_unix_nanos: u64,
    pub label_filter: LabelFilter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecommendationStatus {
    /// New edges appeared within the learning window: traffic not yet seen may still come.
    Learning,
    /// No new edge within the learning window.
    Stable,
}

impl RecommendationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RecommendationStatus::Learning => "learning",
            RecommendationStatus::Stable => "stable",
        }
    }
}

/// A workload: its namespace and its owner (`Deployment/web`), else `Pod/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkloadRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for WorkloadRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The group a pod is recommended for: its workload, or for ServicePolicies its service
/// identity (`ServiceAccount/<name>`).
fn workload_of(pod: &Pod, kind: RecommendKind) -> WorkloadRef {
    WorkloadRef {
        namespace: pod.namespace.clone(),
        name: match kind {
            RecommendKind::NetworkPolicy => pod
                .workload
                .clone()
                .unwrap_or_else(|| format!("Pod/{}", pod.name)),
            RecommendKind::ServicePolicy => format!("ServiceAccount/{}", pod.service_account),
        },
    }
}

/// One end of an observed connection. Workloads are numbered in the order of their names, so
/// ordering by number is ordering by name (the output's order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum End {
    Workload(u32),
    /// An address of no pod (outside the cluster, or a node).
    Address(IpAddr),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Edge {
    protocol: Protocol,
    port: u16,
}

/// How often and when an edge was seen. A connection between two pods is reported at both ends;
/// it counts once (the larger of the two ends' counts).
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    ingress_reports: u64,
    egress_reports: u64,
    first: u64,
    last: u64,
}

impl Seen {
    fn add(&mut self, direction: Direction, time: u64) {
        match direction {
            Direction::Ingress => self.ingress_reports += 1,
            Direction::Egress => self.egress_reports += 1,
        }
        self.first = if self.first == 0 {
            time
        } else {
            self.first.min(time)
        };
        self.last = self.last.max(time);
    }

    fn merge(&mut self, o: &Seen) {
        self.ingress_reports += o.ingress_reports;
        self.egress_reports += o.egress_reports;
        self.first = match (self.first, o.first) {
            (0, f) | (f, 0) => f,
            (a, b) => a.min(b),
        };
        self.last = self.last.max(o.last);
    }

    fn connections(&self) -> u64 {
        self.ingress_reports.max(self.egress_reports)
    }
}

/// Edges of one peer, with how they were seen.
type EdgesSeen = BTreeMap<Edge, Seen>;
/// The peers of a workload in one direction.
type Peers = BTreeMap<End, EdgesSeen>;

/// A recommended policy object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RecommendedObject {
    NetworkPolicy(NetworkPolicy),
    ServicePolicy(ServicePolicy),
}

/// A recommended policy, with the workload (or service identity) it is for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecommendedPolicy {
    pub workload: WorkloadRef,
    pub status: RecommendationStatus,
    pub policy: RecommendedObject,
}

impl RecommendedPolicy {
    pub fn network_policy(&self) -> Option<&NetworkPolicy> {
        match &self.policy {
            RecommendedObject::NetworkPolicy(p) => Some(p),
            RecommendedObject::ServicePolicy(_) => None,
        }
    }

    pub fn service_policy(&self) -> Option<&ServicePolicy> {
        match &self.policy {
            RecommendedObject::ServicePolicy(p) => Some(p),
            RecommendedObject::NetworkPolicy(_) => None,
        }
    }
}

/// What `recommend` learned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recommendation {
    pub status: RecommendationStatus,
    pub policies: Vec<RecommendedPolicy>,
    /// Admitted flow records the recommendation was learned from.
    pub records: u64,
    /// Whether they came from the flow history on disk (else the records held in memory).
    #[serde(default)]
    pub from_history: bool,
    /// Distinct edges (source, destination, port, protocol) observed.
    pub edges: usize,
    /// Records of pods the controller no longer knows (deleted since): not learned from.
    pub unknown_pods: u64,
    /// ICMP edges, which a NetworkPolicy cannot name: not admitted by the recommendation.
    pub icmp_edges: usize,
    /// Workloads that got no policy, and why (no stable label their pods share).
    pub not_covered: Vec<(WorkloadRef, String)>,
    /// Workloads whose selector also selects pods of other workloads (they share all its
    /// labels): the policy applies to those too.
    pub broad_selectors: Vec<(WorkloadRef, Vec<WorkloadRef>)>,
}

impl Recommendation {
    /// The policies as Kubernetes YAML, one document each.
    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        self.yaml(false)
    }

    /// The policies staged, as YAML: each NetworkPolicy as a `StagedNetworkPolicy` of the same
    /// name and spec, each ServicePolicy in `mode: Audit`. Applied, they change no verdict and
    /// every flow says what they would do; `bulkhead policy promote` enforces them.
    pub fn to_staged_yaml(&self) -> Result<String, serde_yaml::Error> {
        self.yaml(true)
    }

    fn yaml(&self, staged: bool) -> Result<String, serde_yaml::Error> {
        let mut out = String::new();
        for p in &self.policies {
            out.push_str("---\n");
            out.push_str(&match (&p.policy, staged) {
                (RecommendedObject::NetworkPolicy(o), false) => serde_yaml::to_string(o)?,
                (RecommendedObject::NetworkPolicy(o), true) => {
                    let mut s = StagedNetworkPolicy::new(
                        o.metadata.name.as_deref().unwrap_or_default(),
                        StagedNetworkPolicySpec {
                            policy: o.spec.clone().unwrap_or_default(),
                        },
                    );
                    s.metadata = o.metadata.clone();
                    serde_yaml::to_string(&s)?
                }
                (RecommendedObject::ServicePolicy(o), false) => serde_yaml::to_string(o)?,
                (RecommendedObject::ServicePolicy(o), true) => {
                    let mut o = o.clone();
                    o.spec.mode = Some("Audit".to_string());
                    serde_yaml::to_string(&o)?
                }
            });
        }
        Ok(out)
    }
}

fn rfc3339(nanos: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_nanos(nanos)).to_string()
}

/// A DNS-1123 name for the policy of a workload (`Deployment/web` → `web-deployment`), at most
/// 63 characters.
fn policy_name(w: &WorkloadRef) -> String {
    let (kind, name) = w.name.split_once('/').unwrap_or(("pod", &w.name));
    let mut s: String = format!("{name}-{}", kind.to_ascii_lowercase())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    s.truncate(63);
    s.trim_matches('-').to_string()
}

/// What the recommendation knows of the cluster's workloads now. Workload `i` is `names[i]`;
/// names are sorted.
struct Workloads {
    names: Vec<WorkloadRef>,
    /// The labels every pod of each workload shares (after the filter).
    labels: Vec<Labels>,
    /// The real addresses of each workload's pods.
    addresses: Vec<BTreeSet<IpAddr>>,
    /// The workload of each pod.
    by_pod: FxHashMap<PodKey, u32>,
    /// The workload of each real pod address (an agent names only its own node's pods).
    at: FxHashMap<IpAddr, u32>,
}

impl Workloads {
    fn describe(&self, end: &End) -> String {
        match end {
            End::Workload(w) => self.names[*w as usize].to_string(),
            End::Address(a) => a.to_string(),
        }
    }
}

fn workloads(pods: &[Pod], filter: &LabelFilter, kind: RecommendKind) -> Workloads {
    let mut common: BTreeMap<WorkloadRef, (Labels, BTreeSet<IpAddr>)> = BTreeMap::new();
    for p in pods.iter().filter(|p| !p.host_network) {
        let labels = filter.apply(&p.labels);
        let entry = match common.entry(workload_of(p, kind)) {
            std::collections::btree_map::Entry::Occupied(e) => {
                let e = e.into_mut();
                e.0.retain(|k, v| labels.get(k) == Some(v));
                e
            }
            std::collections::btree_map::Entry::Vacant(e) => e.insert((labels, BTreeSet::new())),
        };
        if !p.synthetic_ips {
            entry.1.extend(p.ips.iter().copied());
        }
    }
    let mut w = Workloads {
        names: Vec::with_capacity(common.len()),
        labels: Vec::with_capacity(common.len()),
        addresses: Vec::with_capacity(common.len()),
        by_pod: FxHashMap::default(),
        at: FxHashMap::default(),
    };
    let mut index: FxHashMap<WorkloadRef, u32> = FxHashMap::default();
    for (name, (labels, addresses)) in common {
        index.insert(name.clone(), w.names.len() as u32);
        w.names.push(name);
        w.labels.push(labels);
        w.addresses.push(addresses);
    }
    for p in pods.iter().filter(|p| !p.host_network) {
        let i = index[&workload_of(p, kind)];
        w.by_pod.insert(p.key(), i);
        if !p.synthetic_ips {
            w.at.extend(p.ips.iter().map(|ip| (*ip, i)));
        }
    }
    w
}

fn selector(labels: &Labels) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels.clone().into_iter().collect()),
        match_expressions: None,
    }
}

fn host_block(a: IpAddr) -> IPBlock {
    IPBlock {
        cidr: match a {
            IpAddr::V4(_) => format!("{a}/32"),
            IpAddr::V6(_) => format!("{a}/128"),
        },
        except: None,
    }
}

/// Learns least-privilege NetworkPolicies from `records` (any order) for the workloads of
/// `pods` (the cluster's pods now).
pub fn recommend<R: std::borrow::Borrow<FlowRecord>>(
    records: impl IntoIterator<Item = R>,
    pods: &[Pod],
    opts: &RecommendOptions,
) -> Recommendation {
    let wl = workloads(pods, &opts.label_filter, opts.kind);
    let mut edges: FxHashMap<(End, End, Edge), Seen> = FxHashMap::default();
    let mut records_used = 0u64;
    let mut unknown_pods = 0u64;
    for r in records {
        let r = r.borrow();
        if !matches!(
            r.verdict,
            FlowVerdict::Allowed | FlowVerdict::AuditWouldDeny
        ) {
            continue;
        }
        let Some(protocol) = Protocol::from_number(r.protocol) else {
            continue;
        };
        let Some(local) = r.endpoint.pod() else {
            continue;
        };
        let Some(&local) = wl.by_pod.get(local) else {
            unknown_pods += 1;
            continue;
        };
        let peer = match &r.peer {
            Some(p) => match wl.by_pod.get(p) {
                Some(&w) => End::Workload(w),
                None => {
                    unknown_pods += 1;
                    continue;
                }
            },
            None => match wl.at.get(&r.peer_address()) {
                Some(&w) => End::Workload(w),
                // An address of no pod: outside the cluster, or a node.
                None => End::Address(r.peer_address()),
            },
        };
        let local = End::Workload(local);
        let (src, dst) = match r.direction {
            Direction::Ingress => (peer, local),
            Direction::Egress => (local, peer),
        };
        let port = match protocol {
            Protocol::Icmp | Protocol::Icmpv6 => 0,
            _ => r.dst_port,
        };
        records_used += 1;
        edges
            .entry((src, dst, Edge { protocol, port }))
            .or_default()
            .add(r.direction, r.time_unix_nanos);
    }

    let covered =
        |w: &WorkloadRef| opts.namespaces.is_empty() || opts.namespaces.contains(&w.namespace);
    // Sorted, so that the rules come out in the order of their peers.
    let mut edges: Vec<((End, End, Edge), Seen)> = edges.into_iter().collect();
    edges.sort_unstable_by_key(|(k, _)| *k);
    let learning_since = opts
        .now_unix_nanos
        .saturating_sub(opts.learning_window.as_nanos() as u64);
    let mut icmp_edges = 0;
    // Per covered workload: (ingress peers, egress peers), each peer → edge → seen.
    let mut per_workload: BTreeMap<u32, (Peers, Peers)> = BTreeMap::new();
    for (i, w) in wl.names.iter().enumerate() {
        if covered(w) {
            per_workload.entry(i as u32).or_default();
        }
    }
    for ((src, dst, edge), seen) in &edges {
        if opts.kind == RecommendKind::NetworkPolicy
            && matches!(edge.protocol, Protocol::Icmp | Protocol::Icmpv6)
        {
            icmp_edges += 1;
            continue;
        }
        if let End::Workload(w) = dst
            && let Some((ingress, _)) = per_workload.get_mut(w)
        {
            ingress
                .entry(*src)
                .or_default()
                .entry(*edge)
                .or_default()
                .merge(seen);
        }
        if let End::Workload(w) = src
            && let Some((_, egress)) = per_workload.get_mut(w)
        {
            egress
                .entry(*dst)
                .or_default()
                .entry(*edge)
                .or_default()
                .merge(seen);
        }
    }

    let mut not_covered = Vec::new();
    let mut broad_selectors = Vec::new();
    let mut policies = Vec::new();
    // The peers standing for an end: its pods by label, or addresses as ipBlocks (an address
    // of no pod; a workload whose pods share no stable label, by its pods' addresses now).
    let peers_of = |end: &End, own_ns: &str| -> Vec<NetworkPolicyPeer> {
        let block = |a: &IpAddr| NetworkPolicyPeer {
            ip_block: Some(host_block(*a)),
            ..Default::default()
        };
        match *end {
            End::Address(a) => vec![block(&a)],
            End::Workload(i) => {
                let (w, l) = (&wl.names[i as usize], &wl.labels[i as usize]);
                if l.is_empty() {
                    wl.addresses[i as usize].iter().map(block).collect()
                } else {
                    vec![NetworkPolicyPeer {
                        pod_selector: Some(selector(l)),
                        namespace_selector: (w.namespace != own_ns).then(|| {
                            selector(&Labels::from([(
                                NAMESPACE_NAME_LABEL.to_string(),
                                w.namespace.clone(),
                            )]))
                        }),
                        ip_block: None,
                    }]
                }
            }
        }
    };
    let ports_of = |edges: &BTreeMap<Edge, Seen>| -> Vec<NetworkPolicyPort> {
        edges
            .keys()
            .map(|e| NetworkPolicyPort {
                protocol: Some(format!("{:?}", e.protocol).to_uppercase()),
                port: Some(IntOrString::Int(i32::from(e.port))),
                end_port: None,
            })
            .collect()
    };
    let learned = |peer: &End, edges: &BTreeMap<Edge, Seen>, dir: &str| -> String {
        let mut total = Seen::default();
        edges.values().for_each(|s| total.merge(s));
        let ports: Vec<String> = edges
            .keys()
            .map(|e| format!("{:?}/{}", e.protocol, e.port).to_uppercase())
            .collect();
        let n = total.connections();
        format!(
            "{dir} {} {}: {n} connection{}, first seen {}, last seen {}",
            wl.describe(peer),
            ports.join(","),
            if n == 1 { "" } else { "s" },
            rfc3339(total.first),
            rfc3339(total.last)
        )
    };
    let status_of = |newest_first: u64| {
        if newest_first >= learning_since && newest_first > 0 {
            RecommendationStatus::Learning
        } else {
            RecommendationStatus::Stable
        }
    };
    // The workloads of each namespace, for the check that a selector selects only its own.
    let mut by_namespace: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for (i, w) in wl.names.iter().enumerate() {
        by_namespace.entry(&w.namespace).or_default().push(i as u32);
    }
    for (i, (ingress, egress)) in per_workload {
        let w = wl.names[i as usize].clone();
        if opts.kind == RecommendKind::ServicePolicy {
            let (policy, newest_first) =
                service_policy(&w, &wl, &ingress, &egress, &learned, status_of);
            policies.push(RecommendedPolicy {
                workload: w,
                status: status_of(newest_first),
                policy: RecommendedObject::ServicePolicy(policy),
            });
            continue;
        }
        let own = &wl.labels[i as usize];
        if own.is_empty() {
            not_covered.push((
                w.clone(),
                "its pods share no stable label to select them by".to_string(),
            ));
            continue;
        }
        let others: Vec<WorkloadRef> = by_namespace[w.namespace.as_str()]
            .iter()
            .filter(|&&o| {
                let l = &wl.labels[o as usize];
                o != i && own.iter().all(|(k, v)| l.get(k) == Some(v))
            })
            .map(|&o| wl.names[o as usize].clone())
            .collect();
        if !others.is_empty() {
            broad_selectors.push((w.clone(), others));
        }
        let mut annotations = BTreeMap::new();
        let mut newest_first = 0u64;
        let mut ingress_rules = Vec::new();
        for (peer, edges) in &ingress {
            let from = peers_of(peer, &w.namespace);
            if from.is_empty() {
                continue;
            }
            annotations.insert(
                format!("{LEARNED_ANNOTATION}.ingress.{}", ingress_rules.len()),
                learned(peer, edges, "from"),
            );
            ingress_rules.push(NetworkPolicyIngressRule {
                from: Some(from),
                ports: Some(ports_of(edges)),
            });
            newest_first = newest_first.max(edges.values().map(|s| s.first).max().unwrap_or(0));
        }
        let mut egress_rules = Vec::new();
        for (peer, edges) in &egress {
            let to = peers_of(peer, &w.namespace);
            if to.is_empty() {
                continue;
            }
            annotations.insert(
                format!("{LEARNED_ANNOTATION}.egress.{}", egress_rules.len()),
                learned(peer, edges, "to"),
            );
            egress_rules.push(NetworkPolicyEgressRule {
                to: Some(to),
                ports: Some(ports_of(edges)),
            });
            newest_first = newest_first.max(edges.values().map(|s| s.first).max().unwrap_or(0));
        }
        let status = status_of(newest_first);
        annotations.insert(STATUS_ANNOTATION.to_string(), status.as_str().to_string());
        let policy = NetworkPolicy {
            metadata: ObjectMeta {
                name: Some(policy_name(&w)),
                namespace: Some(w.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    RECOMMENDED_LABEL.to_string(),
                    "true".to_string(),
                )])),
                annotations: Some(annotations),
                ..Default::default()
            },
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(selector(own)),
                policy_types: Some(vec!["Ingress".to_string(), "Egress".to_string()]),
                ingress: Some(ingress_rules),
                egress: Some(egress_rules),
            }),
        };
        policies.push(RecommendedPolicy {
            workload: w,
            status,
            policy: RecommendedObject::NetworkPolicy(policy),
        });
    }
    let status = if policies
        .iter()
        .any(|p| p.status == RecommendationStatus::Learning)
    {
        RecommendationStatus::Learning
    } else {
        RecommendationStatus::Stable
    };
    Recommendation {
        status,
        policies,
        records: records_used,
        from_history: false,
        edges: edges.len(),
        unknown_pods,
        icmp_edges,
        not_covered,
        broad_selectors,
    }
}

/// The ServicePolicy of one service identity (`w.name` is `ServiceAccount/<name>`): its subject
/// is the service account; peers are service accounts (of another namespace by name) or
/// addresses. A direction with nothing observed gets a Deny of everything (`cluster` and
/// `world`): a ServicePolicy isolates only with an Allow rule. Returns the policy and the
/// newest first-seen time of its edges.
fn service_policy(
    w: &WorkloadRef,
    wl: &Workloads,
    ingress: &Peers,
    egress: &Peers,
    learned: &dyn Fn(&End, &EdgesSeen, &str) -> String,
    status_of: impl Fn(u64) -> RecommendationStatus,
) -> (ServicePolicy, u64) {
    let account = |w: &WorkloadRef| {
        w.name
            .strip_prefix("ServiceAccount/")
            .unwrap_or(&w.name)
            .to_string()
    };
    let peer = |end: &End| match *end {
        End::Address(a) => ServicePeer {
            cidr: Some(host_block(a).cidr),
            ..Default::default()
        },
        End::Workload(p) => {
            // A peer cluster's workload (namespace `west/shop`) is named by `cluster`.
            let (cluster, namespace) =
                crate::ruleset::cluster::split_namespace(&wl.names[p as usize].namespace);
            ServicePeer {
                service: Some(ServiceRef {
                    cluster: cluster.map(str::to_string),
                    service_account: Some(account(&wl.names[p as usize])),
                    namespace: (cluster.is_some() || namespace != w.namespace)
                        .then(|| namespace.to_string()),
                    ..Default::default()
                }),
                ..Default::default()
            }
        }
    };
    let ports = |edges: &BTreeMap<Edge, Seen>| -> Vec<PolicyPort> {
        edges
            .keys()
            .map(|e| match e.protocol {
                Protocol::Icmp => PolicyPort {
                    protocol: Some("ICMP".into()),
                    ..Default::default()
                },
                Protocol::Icmpv6 => PolicyPort {
                    protocol: Some("ICMPv6".into()),
                    ..Default::default()
                },
                p => PolicyPort {
                    protocol: Some(format!("{p:?}").to_uppercase()),
                    port: Some(PortValue::Int(i64::from(e.port))),
                    end_port: None,
                },
            })
            .collect()
    };
    let everything = || {
        ["cluster", "world"]
            .map(|e| ServicePeer {
                entity: Some(e.to_string()),
                ..Default::default()
            })
            .to_vec()
    };
    let mut annotations = BTreeMap::new();
    let mut newest_first = 0u64;
    let mut rules = |peers: &Peers, ingress: bool| {
        let (dir, word) = if ingress {
            ("ingress", "from")
        } else {
            ("egress", "to")
        };
        let mut out = Vec::new();
        for (i, (end, edges)) in peers.iter().enumerate() {
            annotations.insert(
                format!("{LEARNED_ANNOTATION}.{dir}.{i}"),
                learned(end, edges, word),
            );
            newest_first = newest_first.max(edges.values().map(|s| s.first).max().unwrap_or(0));
            let mut rule = ServiceRule {
                ports: Some(ports(edges)),
                ..Default::default()
            };
            if ingress {
                rule.from = Some(vec![peer(end)]);
            } else {
                rule.to = Some(vec![peer(end)]);
            }
            out.push(rule);
        }
        if out.is_empty() {
            let mut deny = ServiceRule {
                action: Some("Deny".into()),
                ..Default::default()
            };
            if ingress {
                deny.from = Some(everything());
            } else {
                deny.to = Some(everything());
            }
            out.push(deny);
        }
        out
    };
    let ingress_rules = rules(ingress, true);
    let egress_rules = rules(egress, false);
    annotations.insert(
        STATUS_ANNOTATION.to_string(),
        status_of(newest_first).as_str().to_string(),
    );
    let mut policy = ServicePolicy::new(
        &policy_name(w),
        ServicePolicySpec {
            mode: None,
            subject: Some(ServiceSubject {
                service_account: Some(account(w)),
                pod_selector: None,
            }),
            ingress: Some(ingress_rules),
            egress: Some(egress_rules),
        },
    );
    policy.metadata.namespace = Some(w.namespace.clone());
    policy.metadata.labels = Some(BTreeMap::from([(
        RECOMMENDED_LABEL.to_string(),
        "true".to_string(),
    )]));
    policy.metadata.annotations = Some(annotations);
    (policy, newest_first)
}

#[cfg(test)]
mod tests;
