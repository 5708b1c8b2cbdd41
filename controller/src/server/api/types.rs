//! What the HTTP API answers, typed: the server serializes these, the `bulkhead` commands and
//! the tests deserialize them. Field order is the JSON's key order.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    net::IpAddr,
};

use bulkhead_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::{
    distribution::hub::{NodeState, PolicyRealization},
    ruleset::{FlowEntry, FlowRule, PodKey},
};

pub use crate::flows::{Edge, Graph, GraphNode};
/// An error answer: `{"error": "..."}` with a 4xx/5xx status.
pub use bulkhead_http::ErrorBody;

/// `GET /api/nodes`: one entry per node with a rule set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub node: String,
    /// The version of the node's rule set.
    pub version: u64,
    /// The version its agent acked (in the kernel).
    pub realized: u64,
    pub connected: bool,
    pub endpoints: u32,
    /// The agent's last apply error, empty when none.
    pub last_error: String,
}

impl From<NodeState> for NodeView {
    fn from(n: NodeState) -> NodeView {
        NodeView {
            node: n.node,
            version: n.version,
            realized: n.realized,
            connected: n.connected,
            endpoints: n.endpoints,
            last_error: n.last_error,
        }
    }
}

/// `GET /api/policies`: where each policy is realized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyView {
    /// `NetworkPolicy`, `ClusterNetworkPolicy`, `ServicePolicy`…
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// Nodes whose rule set the policy concerns.
    pub nodes: u32,
    /// Of those, nodes whose agent acked the current version.
    pub realized: u32,
}

impl From<PolicyRealization> for PolicyView {
    fn from(p: PolicyRealization) -> PolicyView {
        PolicyView {
            kind: p.kind.as_str().to_string(),
            namespace: p.namespace,
            name: p.name,
            nodes: p.nodes,
            realized: p.realized,
        }
    }
}

/// One stored flow or quarantine action, every part as text (empty texts and zeros for what a
/// quarantine action lacks): what `bulkhead flows -o json` prints, one per line. The keys are
/// in alphabetical order, as they were when this was an untyped JSON object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowLine {
    /// `ingress` or `egress` at the endpoint.
    pub direction: String,
    pub dst: String,
    pub dst_port: u16,
    /// The pod (`namespace/pod`) at which the verdict was made, or `endpoint#ID`.
    pub endpoint: String,
    pub kind: String,
    /// The node whose agent reported it.
    pub node: String,
    /// The pod at the other end, `namespace/pod`, when known.
    pub peer: String,
    /// The DNS names (or `*.suffix` patterns) the endpoint had learned the peer's address for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peer_names: Vec<String>,
    pub protocol: u8,
    pub reason: String,
    /// The rule that decided, as text.
    pub rule: String,
    pub src: String,
    pub src_port: u16,
    pub time_unix_nanos: u64,
    /// `allowed`, `denied`, `audit-would-deny`, or a quarantine action's.
    pub verdict: String,
    /// What the staged policies would make of it, when that differs from what was enforced:
    /// `allowed` or `denied` …
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub staged_verdict: String,
    /// … by this rule.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub staged_rule: String,
}

impl FlowLine {
    pub fn of(node: &str, e: &FlowEntry) -> FlowLine {
        match e {
            FlowEntry::Flow(r) => FlowLine {
                direction: r.direction.as_str().into(),
                dst: r.dst.to_string(),
                dst_port: r.dst_port,
                endpoint: r.endpoint.to_string(),
                kind: r.kind.as_str().into(),
                node: node.into(),
                peer: r.peer.as_ref().map(PodKey::to_string).unwrap_or_default(),
                peer_names: r.peer_names.iter().map(ToString::to_string).collect(),
                protocol: r.protocol,
                reason: r.reason.as_str().into(),
                rule: r.rule.to_string(),
                src: r.src.to_string(),
                src_port: r.src_port,
                time_unix_nanos: r.time_unix_nanos,
                verdict: r.verdict.as_str().into(),
                staged_verdict: r
                    .staged
                    .as_ref()
                    .map(|s| s.verdict.as_str().into())
                    .unwrap_or_default(),
                staged_rule: r
                    .staged
                    .as_ref()
                    .map(|s| s.rule.to_string())
                    .unwrap_or_default(),
            },
            FlowEntry::Quarantine(q) => FlowLine {
                endpoint: q.pod.to_string(),
                kind: q.action.as_str().into(),
                node: node.into(),
                reason: q.reason_text(),
                rule: q.rule_text(),
                time_unix_nanos: q.time_unix_nanos,
                verdict: q.action.verdict().into(),
                ..FlowLine::default()
            },
        }
    }
}

/// `GET /api/flows`: a [`FlowLine`] with both ends named as the service graph names them and
/// the deciding rule structured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowView {
    #[serde(flatten)]
    pub line: FlowLine,
    pub rule_id: u32,
    pub decided_by: DecidedBy,
    pub packets: u64,
    pub bytes: u64,
    /// Workload ids (`namespace/Kind/name`, or `world`).
    pub src_workload: String,
    pub dst_workload: String,
    /// Pods (`namespace/pod`), empty for an address of no pod.
    pub src_pod: String,
    pub dst_pod: String,
}

/// The deciding rule of a flow, structured: a rule of a policy with its parts; a default or
/// another reserved case (and a quarantine action) with its text alone, `kind` `Default` for
/// the default allow.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecidedBy {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub direction: String,
    pub index: Option<u32>,
    pub text: String,
}

impl DecidedBy {
    pub fn of(rule: Option<&FlowRule>, text: &str) -> DecidedBy {
        match rule {
            Some(FlowRule::Rule(r)) => DecidedBy {
                kind: r.kind.as_str().into(),
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                direction: r.direction.as_str().into(),
                index: r.index,
                text: text.into(),
            },
            other => DecidedBy {
                kind: if other == Some(&FlowRule::DefaultAllow) {
                    "Default".into()
                } else {
                    String::new()
                },
                text: text.into(),
                ..DecidedBy::default()
            },
        }
    }
}

/// The filters of `GET /api/flows`; every one given must match. Newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowQuery {
    /// Flows from or to this workload (`ns/Kind/name`, or `world`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// Flows of one edge: source and destination workload (with `port`/`protocol`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u32>,
    /// Flows from or to this pod, `namespace/pod`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Flows from or to this namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `allowed`, `denied`, `audit-would-deny` (or `audit`), or a quarantine action's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    /// `allowed` or `denied`: the verdict with the staged policies in force (`denied` lists
    /// what promoting them would break, with what is denied already).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staged_verdict: Option<String>,
    /// To or from a peer outside the cluster named by DNS: this name or `*.suffix` pattern
    /// (see `flows::peer_name_matches`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_name: Option<String>,
    /// From or to a pod or workload of this peer cluster (namespace `cluster/namespace`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Observed at or after this time, in nanoseconds since the Unix epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// Observed at or before this time, in nanoseconds since the Unix epoch (with `history`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
    /// Answer from the flow history on disk (every record kept, within its retention) rather
    /// than the records held in memory; `since` then bounds how far back it looks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<bool>,
    /// At most this many records (default and most: [`FlowQuery::MAX_LIMIT`], from the history
    /// [`FlowQuery::MAX_HISTORY_LIMIT`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

impl FlowQuery {
    /// The most records one answer holds.
    pub const MAX_LIMIT: usize = 1000;
    /// The most records one answer from the history holds.
    pub const MAX_HISTORY_LIMIT: usize = 10_000;

    /// The query as a path: `/api/flows?namespace=shop&limit=10`.
    pub fn path(&self) -> String {
        let mut out = String::from("/api/flows");
        let mut sep = '?';
        let mut put = |k: &str, v: &str| {
            let _ = write!(out, "{sep}{k}={}", percent_encode(v));
            sep = '&';
        };
        let text = [
            ("workload", &self.workload),
            ("src", &self.src),
            ("dst", &self.dst),
            ("pod", &self.pod),
            ("namespace", &self.namespace),
            ("verdict", &self.verdict),
            ("staged_verdict", &self.staged_verdict),
            ("peer_name", &self.peer_name),
            ("cluster", &self.cluster),
        ];
        for (k, v) in text {
            if let Some(v) = v {
                put(k, v);
            }
        }
        let numbers = [
            ("port", self.port.map(u64::from)),
            ("protocol", self.protocol.map(u64::from)),
            ("since", self.since),
            ("until", self.until),
            ("limit", self.limit.map(|l| l as u64)),
        ];
        for (k, v) in numbers {
            if let Some(v) = v {
                put(k, &v.to_string());
            }
        }
        if let Some(h) = self.history {
            put("history", if h { "true" } else { "false" });
        }
        out
    }
}

/// Everything but unreserved characters (RFC 3986) as `%XX`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `GET /api/map`: everything the web UI draws, in one poll.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MapView {
    /// Who asked, when the API authenticates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub time_unix_ms: u64,
    pub actions: Actions,
    pub namespaces: Vec<String>,
    pub nodes: Vec<MapNode>,
    pub edges: Vec<Edge>,
    pub quarantines: Vec<QuarantineView>,
    pub agents: Vec<AgentView>,
    /// Flows allowed now that staged policies would deny, per staged policy, with their edges.
    #[serde(default)]
    pub staged: Vec<crate::flows::StagedDenies>,
}

/// Whether quarantine and release are served, and if not, why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actions {
    pub enabled: bool,
    pub why: Option<String>,
}

/// A workload (or `world`, `host`) on the map.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapNode {
    pub id: String,
    pub namespace: String,
    pub workload: String,
    /// `workload`, or what an address of no pod is (`world`, `host`).
    pub kind: String,
    /// For a world node named by DNS (`world: NAME`), NAME.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// For a peer cluster's workload (namespace `cluster/namespace`), that cluster; absent for
    /// local workloads, the world and the host. The UI groups remote workloads by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::ruleset::ClusterName>,
    pub pods: Vec<PodView>,
    pub quarantined: bool,
}

/// A pod as the UI shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodView {
    /// `namespace/pod`
    pub pod: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    pub quarantined: bool,
}

/// An agent on the map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentView {
    pub node: String,
    pub connected: bool,
    pub version: u64,
    pub realized: u64,
}

/// `GET /api/quarantines` (and in the map, and in a write's answer): a quarantine in force.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineView {
    /// `namespace/pod`
    pub pod: String,
    pub namespace: String,
    /// The Quarantine object.
    pub name: String,
    pub reason: String,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339, empty: until released.
    pub expires_at: String,
    pub actor: String,
    /// Per node, when its agent had the quarantine in the kernel (RFC 3339, ms).
    pub enforced_at: BTreeMap<String, String>,
    /// Tracked connections cut.
    pub connections_cut: u64,
}

impl From<&pb::QuarantineInfo> for QuarantineView {
    fn from(q: &pb::QuarantineInfo) -> QuarantineView {
        QuarantineView {
            pod: format!("{}/{}", q.namespace, q.pod),
            namespace: q.namespace.clone(),
            name: q.name.clone(),
            reason: q.reason.clone(),
            created_at: q.created_at.clone(),
            expires_at: q.expires_at.clone(),
            actor: q.actor.clone(),
            enforced_at: sorted(&q.enforced_at),
            connections_cut: q.connections_cut,
        }
    }
}

fn sorted(m: &HashMap<String, String>) -> BTreeMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The answer to `POST /api/quarantine` and `POST /api/quarantine/release`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QuarantineAnswer {
    pub quarantine: Option<QuarantineView>,
    /// Nodes whose rule sets changed, and the versions that carry the change.
    pub nodes: BTreeMap<String, u64>,
    /// Whether every one of them acked that version within the wait.
    pub enforced: bool,
    pub elapsed_ms: f64,
}

/// `POST /api/quarantine` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuarantineBody {
    /// `namespace/pod`
    pub pod: String,
    pub reason: String,
    /// Exceptions, as `bulkhead quarantine --allow` takes them.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Lift it after this long (`30m`, `1h`).
    #[serde(default, rename = "for")]
    pub duration: Option<String>,
}

/// `POST /api/quarantine/release` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseBody {
    pub pod: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_query_is_written_as_the_server_reads_it() {
        let q = FlowQuery {
            pod: Some("shop/web 0".into()),
            verdict: Some("audit-would-deny".into()),
            since: Some(5),
            limit: Some(10),
            ..FlowQuery::default()
        };
        assert_eq!(
            q.path(),
            "/api/flows?pod=shop%2Fweb%200&verdict=audit-would-deny&since=5&limit=10"
        );
        assert_eq!(FlowQuery::default().path(), "/api/flows");
    }
}
