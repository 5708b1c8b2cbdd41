//! `GET /api/map`: everything the web UI draws, in one poll, computed once at a time and
//! reused for [`MAP_CACHE_TTL`](super::MAP_CACHE_TTL).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    time::SystemTime,
};

use axum::{
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use bulkhead_proto::v1 as pb;

use super::{
    Actions, AgentView, ApiState, MAP_CACHE_TTL, MapNode, MapView, PodView, QuarantineView, auth,
};
use crate::{
    distribution::Hub,
    ruleset::{Direction, FlowRecord, PodKey},
};

/// Who is where, from every node's rule set: the UI's view of the cluster.
#[derive(Default)]
pub(super) struct Cluster {
    /// Workload id (`ns/Kind/name`) → its pods.
    pub(super) workloads: BTreeMap<String, (String, String, Vec<PodView>)>,
    /// Pod → workload id.
    pub(super) workload_of_pod: HashMap<PodKey, String>,
    /// Address → workload id.
    pub(super) workload_of_ip: HashMap<IpAddr, String>,
    /// Address → pod.
    pub(super) pod_of_ip: HashMap<IpAddr, PodKey>,
}

fn workload_id(namespace: &str, workload: &str) -> String {
    if namespace.is_empty() {
        workload.to_string()
    } else {
        format!("{namespace}/{workload}")
    }
}

impl Cluster {
    pub(super) fn of(hub: &Hub) -> Cluster {
        let mut c = Cluster::default();
        for n in hub.node_states() {
            let Some(endpoints) = hub.node_endpoints(&n.node) else {
                continue;
            };
            for e in &endpoints {
                let workload = e
                    .workload
                    .clone()
                    .unwrap_or_else(|| format!("Pod/{}", e.pod));
                let id = workload_id(&e.namespace, &workload);
                let pod = PodKey {
                    namespace: e.namespace.clone(),
                    name: e.pod.clone(),
                };
                for ip in &e.ips {
                    c.workload_of_ip.insert(*ip, id.clone());
                    c.pod_of_ip.insert(*ip, pod.clone());
                }
                c.workload_of_pod.insert(pod, id.clone());
                c.workloads
                    .entry(id)
                    .or_insert_with(|| (e.namespace.clone(), workload, Vec::new()))
                    .2
                    .push(PodView {
                        pod: e.name(),
                        node: n.node.clone(),
                        ips: e.ips.clone(),
                        quarantined: e.quarantined,
                    });
            }
        }
        // Peer clusters' pods are endpoints of no local node; their addresses still name them
        // (`west/shop/Deployment/web`), as the service graph does. A local endpoint keeps its
        // address.
        for p in hub.remote_pods().unwrap_or_default() {
            if p.host_network || p.synthetic_ips {
                continue;
            }
            let workload = p
                .workload
                .clone()
                .unwrap_or_else(|| format!("Pod/{}", p.name));
            let id = workload_id(&p.namespace, &workload);
            let pod = p.key();
            for ip in &p.ips {
                if !c.workload_of_ip.contains_key(ip) {
                    c.workload_of_ip.insert(*ip, id.clone());
                    c.pod_of_ip.insert(*ip, pod.clone());
                }
            }
            c.workload_of_pod.entry(pod).or_insert(id);
        }
        c
    }

    /// (source workload, destination workload, source pod, destination pod) of a record, the
    /// way the service graph names them (`world` for addresses of no pod).
    pub(super) fn ends(&self, r: &FlowRecord) -> (String, String, String, String) {
        let here = r
            .endpoint
            .pod()
            .and_then(|p| self.workload_of_pod.get(p))
            .cloned()
            .unwrap_or_else(|| "world".into());
        let peer_ip = r.peer_address();
        let peer = self
            .workload_of_ip
            .get(&peer_ip)
            .cloned()
            .unwrap_or_else(|| crate::flows::world_id(&r.peer_names));
        let peer_pod = r
            .peer
            .as_ref()
            .or_else(|| self.pod_of_ip.get(&peer_ip))
            .map(PodKey::to_string)
            .unwrap_or_default();
        let endpoint = r.endpoint.to_string();
        match r.direction {
            Direction::Ingress => (peer, here, peer_pod, endpoint),
            Direction::Egress => (here, peer, endpoint, peer_pod),
        }
    }
}

/// `/api/map`: everything the page draws, in one poll.
pub(super) async fn map(
    State(s): State<ApiState>,
    caller: Option<axum::Extension<auth::Caller>>,
) -> Response {
    let response = cached_map(&s).await;
    match caller {
        Some(axum::Extension(c)) if response.status().is_success() => {
            with_user(response, &c.name).await
        }
        _ => response,
    }
}

/// The map answer with `"user": NAME` first (the cached body is shared by every caller).
async fn with_user(response: Response, user: &str) -> Response {
    let body = match axum::body::to_bytes(response.into_body(), usize::MAX).await {
        Ok(b) => b,
        Err(_) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "cannot draw the map").into_response();
        }
    };
    let Some(rest) = body.strip_prefix(b"{") else {
        return json_bytes(body);
    };
    let mut out = format!(
        "{{\"user\":{},",
        serde_json::Value::String(user.to_string())
    )
    .into_bytes();
    if rest.starts_with(b"}") {
        out.pop();
    }
    out.extend_from_slice(rest);
    json_bytes(out.into())
}

async fn cached_map(s: &ApiState) -> Response {
    let mut last = s.map_cache.last.lock().await;
    let generation = s
        .map_cache
        .generation
        .load(std::sync::atomic::Ordering::Relaxed);
    if let Some((at, g, body)) = &*last
        && *g == generation
        && at.elapsed() < MAP_CACHE_TTL
    {
        return json_bytes(body.clone());
    }
    let body = match build_map(s).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot draw the map");
            return (StatusCode::INTERNAL_SERVER_ERROR, "cannot draw the map").into_response();
        }
    };
    *last = Some((std::time::Instant::now(), generation, body.clone()));
    json_bytes(body)
}

fn json_bytes(body: axum::body::Bytes) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The map's JSON: workloads with their pods, the graph's edges, quarantines, agents.
async fn build_map(s: &ApiState) -> Result<axum::body::Bytes, String> {
    // `list` may call the Kubernetes API synchronously: off the runtime's workers. The map is
    // still drawn when it fails (without quarantine marks); `/api/quarantines` reports the error.
    let quarantines = match s.quarantine.clone() {
        Some(q) => match tokio::task::spawn_blocking(move || q.list()).await {
            Ok(Ok(list)) => list,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the map shows no quarantines: cannot list them");
                Vec::new()
            }
            Err(e) => {
                tracing::warn!(error = %e, "the map shows no quarantines: the listing task failed");
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    // The rest is CPU work (seconds in a large cluster): off the runtime's workers.
    let s = s.clone();
    tokio::task::spawn_blocking(move || draw_map(&s, quarantines))
        .await
        .map_err(|e| e.to_string())?
}

fn draw_map(
    s: &ApiState,
    quarantines: Vec<pb::QuarantineInfo>,
) -> Result<axum::body::Bytes, String> {
    let cluster = Cluster::of(&s.hub);
    let (graph, staged) = s
        .graph
        .lock()
        .map(|g| (g.graph(), g.staged()))
        .unwrap_or_default();
    let quarantined: BTreeSet<String> = quarantines
        .iter()
        .map(|q| format!("{}/{}", q.namespace, q.pod))
        .collect();
    let mut nodes: BTreeMap<String, MapNode> = BTreeMap::new();
    for (id, (namespace, workload, pods)) in &cluster.workloads {
        let q = pods
            .iter()
            .any(|p| p.quarantined || quarantined.contains(&p.pod));
        nodes.insert(
            id.clone(),
            MapNode {
                id: id.clone(),
                namespace: namespace.clone(),
                workload: workload.clone(),
                kind: "workload".into(),
                domain: None,
                cluster: cluster_of(namespace),
                pods: pods.clone(),
                quarantined: q,
            },
        );
    }
    for n in &graph.nodes {
        nodes.entry(n.id.clone()).or_insert_with(|| {
            // A named world node is drawn among the world, labelled by its domain.
            let kind = if n.domain.is_some() {
                "world"
            } else if n.namespace.is_empty() {
                n.workload.as_str()
            } else {
                "workload"
            };
            MapNode {
                id: n.id.clone(),
                namespace: n.namespace.clone(),
                workload: n.workload.clone(),
                kind: kind.into(),
                domain: n.domain.clone(),
                cluster: n.cluster.clone(),
                pods: Vec::new(),
                quarantined: false,
            }
        });
    }
    let namespaces: BTreeSet<&str> = nodes
        .values()
        .map(|n| n.namespace.as_str())
        .filter(|n| !n.is_empty())
        .collect();
    let map = MapView {
        user: None,
        time_unix_ms: unix_ms(SystemTime::now()),
        actions: Actions {
            enabled: s.actions.is_ok(),
            why: s.actions.as_ref().err().cloned(),
        },
        namespaces: namespaces.into_iter().map(str::to_string).collect(),
        edges: graph.edges,
        quarantines: quarantines.iter().map(QuarantineView::from).collect(),
        agents: s
            .hub
            .node_states()
            .into_iter()
            .map(|n| AgentView {
                node: n.node,
                connected: n.connected,
                version: n.version,
                realized: n.realized,
            })
            .collect(),
        nodes: nodes.into_values().collect(),
        staged,
    };
    serde_json::to_vec(&map)
        .map(axum::body::Bytes::from)
        .map_err(|e| e.to_string())
}

/// The peer cluster of a namespace as the engine names it (`west/shop`); `None` for a local one.
fn cluster_of(namespace: &str) -> Option<crate::ruleset::ClusterName> {
    crate::ruleset::cluster::split_namespace(namespace)
        .0
        .and_then(|c| c.parse().ok())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
