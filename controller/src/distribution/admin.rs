//! The gRPC `Admin` service (CLI, UI): flows, the graph, recommendations, what-if, status,
//! quarantine.

use std::{pin::Pin, sync::Arc, time::Duration};

use bulkhead_proto::v1::{
    self as pb, NodeStatusRequest, NodeStatusResponse, PolicyStatusRequest, PolicyStatusResponse,
    admin_server::Admin,
};
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use super::{
    FlowStore,
    auth::{self, ClientPolicy},
    hub::Hub,
    service::actor,
};
use crate::{
    answers::{self, AnswerError, ImpactQuestion, RecommendQuestion},
    flows::{
        Directory, FlowFilter, FlowPipeline,
        history::{FlowHistory, HistoryQuery},
    },
    ruleset::FlowEntry,
};

#[derive(Clone)]
pub struct AdminService {
    hub: Arc<Hub>,
    quarantine: Option<Arc<super::quarantine::QuarantineControl>>,
    flows: Option<Arc<FlowPipeline>>,
    clients: ClientPolicy,
    peers: Option<Arc<crate::peering::PeerStates>>,
}

/// Records per `WatchFlows` message at most.
const WATCH_CHUNK: usize = 1024;
/// How long a watcher lets records gather after a wake-up before it reads them.
const WATCH_COALESCE: Duration = Duration::from_millis(50);
/// `GetFlows` answers this many records when the request sets no limit.
const DEFAULT_FLOW_LIMIT: usize = 1000;
/// `GetFlows` from the flow history answers this many records at most.
const MAX_HISTORY_FLOW_LIMIT: usize = 10_000;

impl AdminService {
    pub fn new(hub: Arc<Hub>) -> Self {
        AdminService {
            hub,
            quarantine: None,
            flows: None,
            clients: ClientPolicy::default(),
            peers: None,
        }
    }

    /// Which client certificates may quarantine and release (see [`ClientPolicy`]).
    /// Report the peer clusters' import states in `PolicyStatus`.
    pub fn with_peers(mut self, peers: Arc<crate::peering::PeerStates>) -> Self {
        self.peers = Some(peers);
        self
    }

    pub fn with_client_policy(mut self, clients: ClientPolicy) -> Self {
        self.clients = clients;
        self
    }

    /// Serve the flow and graph calls too, from the controller's flow pipeline.
    pub fn with_flows(mut self, pipeline: Arc<FlowPipeline>) -> Self {
        self.flows = Some(pipeline);
        self
    }

    fn flow_pipeline(&self) -> Result<Arc<FlowPipeline>, Status> {
        self.flows
            .clone()
            .ok_or_else(|| Status::unimplemented("this controller keeps no flows"))
    }

    /// Serve the quarantine calls too.
    pub fn with_quarantine(mut self, q: Arc<super::quarantine::QuarantineControl>) -> Self {
        self.quarantine = Some(q);
        self
    }

    fn quarantines(&self) -> Result<Arc<super::quarantine::QuarantineControl>, Status> {
        self.quarantine.clone().ok_or_else(|| {
            Status::unimplemented("this controller has no quarantine directory (--quarantine-dir)")
        })
    }

    /// For quarantine and release: the caller's certificate must be an admin's; returns the
    /// quarantine control and who the audit log names (see [`actor`]).
    fn administrator<T>(
        &self,
        request: &Request<T>,
    ) -> Result<(Arc<super::quarantine::QuarantineControl>, Option<String>), Status> {
        let caller = auth::caller(request)?;
        self.clients.may_administer(caller.as_deref())?;
        Ok((self.quarantines()?, caller))
    }
}

/// Runs a quarantine call off the runtime's workers (it writes files or calls the Kubernetes
/// API synchronously).
async fn off_runtime<R: Send + 'static>(
    call: impl FnOnce() -> Result<R, super::quarantine::QuarantineError> + Send + 'static,
) -> Result<R, Status> {
    Ok(tokio::task::spawn_blocking(call)
        .await
        .map_err(|e| Status::internal(e.to_string()))??)
}

fn poisoned() -> Status {
    Status::internal("the flow store or graph lock is poisoned; restart the controller")
}

/// A stored record as the API hands it out: its peer named when the agent could not.
fn stored_flow(dir: &Directory, node: &str, e: &FlowEntry, sequence: u64) -> pb::StoredFlow {
    let entry = match e {
        FlowEntry::Flow(r) if r.peer.is_none() => {
            let mut r = r.clone();
            dir.name_peer(&mut r);
            pb::stored_flow::Entry::Record(r.into())
        }
        e => e.into(),
    };
    pb::StoredFlow {
        node: node.to_string(),
        entry: Some(entry),
        sequence,
    }
}

/// The newest `limit` stored records that match, oldest first.
fn newest_matching(
    store: &FlowStore,
    dir: &Directory,
    filter: &FlowFilter,
    limit: usize,
) -> Vec<pb::StoredFlow> {
    let (_, records) = store.since(0);
    let mut out: Vec<pb::StoredFlow> = records
        .rev()
        .filter(|(_, r, _)| filter.matches(dir, r))
        .take(limit)
        .map(|(node, r, seq)| stored_flow(dir, node, r, seq))
        .collect();
    out.reverse();
    out
}

/// The newest `limit` records of the history that match `query` (its filter and time range),
/// oldest first, peers named as the history names them.
fn newest_in_history(
    history: &FlowHistory,
    dir: &Directory,
    query: HistoryQuery,
    limit: usize,
) -> Result<Vec<pb::StoredFlow>, Status> {
    let failed = |e: crate::flows::history::HistoryError| {
        tracing::error!(error = %e, "reading the flow history");
        Status::internal(e.to_string())
    };
    let mut out = Vec::new();
    for r in history.query(query).map_err(failed)? {
        let r = r.map_err(failed)?;
        out.push(stored_flow(dir, &r.node, &r.entry, r.sequence));
        if out.len() == limit {
            break;
        }
    }
    out.reverse();
    Ok(out)
}

/// An answer's error as a gRPC status.
fn answer_status(e: AnswerError) -> Status {
    match &e {
        AnswerError::Unavailable => Status::unavailable(e.to_string()),
        AnswerError::Proposal(_) => Status::invalid_argument(e.to_string()),
        AnswerError::History(h) => {
            tracing::error!(error = %h, "reading the flow history");
            Status::internal(e.to_string())
        }
        AnswerError::Poisoned => Status::internal(e.to_string()),
    }
}

type WatchFlowsStream = Pin<Box<dyn Stream<Item = Result<pb::WatchFlowsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Admin for AdminService {
    type WatchFlowsStream = WatchFlowsStream;

    async fn get_graph(
        &self,
        request: Request<pb::GetGraphRequest>,
    ) -> Result<Response<pb::GetGraphResponse>, Status> {
        let pipeline = self.flow_pipeline()?;
        let namespace = request.into_inner().namespace;
        let resp = tokio::task::spawn_blocking(move || {
            let g = pipeline.graph().lock().map_err(|_| poisoned())?;
            Ok::<_, Status>(g.to_proto(&namespace))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(resp))
    }

    async fn get_flows(
        &self,
        request: Request<pb::GetFlowsRequest>,
    ) -> Result<Response<pb::GetFlowsResponse>, Status> {
        let pipeline = self.flow_pipeline()?;
        let req = request.into_inner();
        let filter = FlowFilter::from_proto(req.filter.as_ref());
        if req.history {
            let limit = match req.limit {
                0 => DEFAULT_FLOW_LIMIT,
                n => (n as usize).min(MAX_HISTORY_FLOW_LIMIT),
            };
            let history = pipeline
                .store()
                .lock()
                .map_err(|_| poisoned())?
                .history()
                .cloned()
                .ok_or_else(|| {
                    Status::failed_precondition(
                        "this controller keeps no flow history (it runs with --no-flow-history, or with --kubernetes and no --flow-history)",
                    )
                })?;
            let query = HistoryQuery {
                filter,
                until_unix_nanos: (req.until_unix_nanos != 0).then_some(req.until_unix_nanos),
                newest_first: true,
            };
            // Reading the history is disk and CPU: off the runtime's workers.
            let flows = tokio::task::spawn_blocking(move || {
                newest_in_history(&history, &pipeline.directory(), query, limit)
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
            // The store's accounting is not the history's: none.
            return Ok(Response::new(pb::GetFlowsResponse { flows, stats: None }));
        }
        let limit = match req.limit {
            0 => DEFAULT_FLOW_LIMIT,
            n => n as usize,
        };
        let dir = pipeline.directory();
        let store = pipeline.store().lock().map_err(|_| poisoned())?;
        Ok(Response::new(pb::GetFlowsResponse {
            flows: newest_matching(&store, &dir, &filter, limit),
            stats: Some(store.stats()),
        }))
    }

    async fn recommend(
        &self,
        request: Request<pb::RecommendRequest>,
    ) -> Result<Response<pb::RecommendResponse>, Status> {
        let pipeline = self.flow_pipeline()?;
        let question = RecommendQuestion::try_from(request.into_inner())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let hub = self.hub.clone();
        // Folding every record costs CPU (and reading the history, disk).
        let r = tokio::task::spawn_blocking(move || {
            answers::recommend(&hub, pipeline.store(), &question)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(answer_status)?;
        Ok(Response::new((&r).into()))
    }

    async fn impact(
        &self,
        request: Request<pb::ImpactRequest>,
    ) -> Result<Response<pb::ImpactResponse>, Status> {
        let pipeline = self.flow_pipeline()?;
        let question = ImpactQuestion::try_from(request.into_inner())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let hub = self.hub.clone();
        let i =
            tokio::task::spawn_blocking(move || answers::impact(&hub, pipeline.store(), &question))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(answer_status)?;
        Ok(Response::new((&i).into()))
    }

    async fn watch_flows(
        &self,
        request: Request<pb::WatchFlowsRequest>,
    ) -> Result<Response<Self::WatchFlowsStream>, Status> {
        let pipeline = self.flow_pipeline()?;
        let req = request.into_inner();
        let filter = FlowFilter::from_proto(req.filter.as_ref());
        let (mut arrivals, backlog, mut next) = {
            let dir = pipeline.directory();
            let store = pipeline.store().lock().map_err(|_| poisoned())?;
            let mut arrivals = store.arrivals();
            arrivals.borrow_and_update();
            let backlog = newest_matching(&store, &dir, &filter, req.backlog as usize);
            (arrivals, backlog, store.accepted)
        };
        let (tx, rx) = mpsc::channel::<Result<pb::WatchFlowsResponse, Status>>(4);
        tokio::spawn(async move {
            let mut pending = backlog;
            let mut missed = 0;
            loop {
                while !pending.is_empty() || missed > 0 {
                    let rest = pending.split_off(pending.len().min(WATCH_CHUNK));
                    let msg = pb::WatchFlowsResponse {
                        flows: std::mem::replace(&mut pending, rest),
                        missed: std::mem::take(&mut missed),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    changed = arrivals.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
                // Agents report thousands of batches a second on a busy cluster: a watcher takes
                // what arrived in a short while at once rather than the store's lock per batch.
                tokio::time::sleep(WATCH_COALESCE).await;
                let dir = pipeline.directory();
                let Ok(store) = pipeline.store().lock() else {
                    let _ = tx.send(Err(poisoned())).await;
                    return;
                };
                let (gone, records) = store.since(next);
                missed = gone;
                pending = records
                    .filter(|(_, r, _)| filter.matches(&dir, r))
                    .map(|(node, r, seq)| stored_flow(&dir, node, r, seq))
                    .collect();
                next = store.accepted;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn policy_status(
        &self,
        _request: Request<PolicyStatusRequest>,
    ) -> Result<Response<PolicyStatusResponse>, Status> {
        let policies = self
            .hub
            .policy_status()
            .into_iter()
            .map(|p| pb::PolicyRealization {
                kind: p.kind.to_string(),
                namespace: p.namespace,
                name: p.name,
                nodes: p.nodes,
                realized: p.realized,
            })
            .collect();
        let now = std::time::SystemTime::now();
        let peers = self
            .peers
            .as_ref()
            .map(|p| p.all())
            .unwrap_or_default()
            .into_iter()
            .map(|p| pb::PeerImportStatus {
                state: peer_state_to(&p.state) as i32,
                last_update_age_ms: p.age(now).map(|a| a.as_millis() as u64),
                name: p.name.to_string(),
                address: p.address,
                error: p.error,
                pods: p.pods,
                namespaces: p.namespaces,
                epoch: p.epoch,
                version: p.version,
                updates: p.updates,
            })
            .collect();
        Ok(Response::new(PolicyStatusResponse {
            policies,
            epoch: self.hub.epoch(),
            peers,
        }))
    }

    async fn node_status(
        &self,
        _request: Request<NodeStatusRequest>,
    ) -> Result<Response<NodeStatusResponse>, Status> {
        let nodes = self
            .hub
            .node_states()
            .into_iter()
            .map(|n| pb::NodeState {
                node: n.node,
                version: n.version,
                realized: n.realized,
                connected: n.connected,
                last_error: n.last_error,
                endpoints: n.endpoints,
            })
            .collect();
        Ok(Response::new(NodeStatusResponse {
            nodes,
            epoch: self.hub.epoch(),
        }))
    }

    async fn quarantine(
        &self,
        request: Request<pb::QuarantineRequest>,
    ) -> Result<Response<pb::QuarantineResponse>, Status> {
        let (q, caller) = self.administrator(&request)?;
        let mut r = request.into_inner();
        r.actor = actor(caller, r.actor);
        Ok(Response::new(off_runtime(move || q.quarantine(r)).await?))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::QuarantineResponse>, Status> {
        let (q, caller) = self.administrator(&request)?;
        let mut r = request.into_inner();
        r.actor = actor(caller, r.actor);
        Ok(Response::new(off_runtime(move || q.release(r)).await?))
    }

    async fn list_quarantines(
        &self,
        _request: Request<pb::ListQuarantinesRequest>,
    ) -> Result<Response<pb::ListQuarantinesResponse>, Status> {
        let q = self.quarantines()?;
        // `list` may call the Kubernetes API synchronously: not on a runtime worker.
        let quarantines = off_runtime(move || q.list()).await?;
        Ok(Response::new(pb::ListQuarantinesResponse { quarantines }))
    }
}

fn peer_state_to(s: &crate::peering::PeerState) -> pb::PeerImportState {
    use crate::peering::PeerState;
    match s {
        PeerState::Connecting => pb::PeerImportState::Connecting,
        PeerState::Synced => pb::PeerImportState::Synced,
        PeerState::Disconnected => pb::PeerImportState::Disconnected,
        PeerState::Refused => pb::PeerImportState::Refused,
    }
}
