//! The gRPC services: `Distribution` (agents) and `Admin` (CLI, UI).

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use bulkhead_proto::v1::{
    self as pb, AgentMessage, ControllerMessage, FlowBatch, FlowReportSummary, NodeStatusRequest,
    NodeStatusResponse, PolicyStatusRequest, PolicyStatusResponse, admin_server::Admin,
    agent_message, controller_message, distribution_server::Distribution,
};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use super::hub::Hub;

/// How long an agent has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Flow records the controller keeps (oldest evicted first, evictions counted).
#[derive(Debug)]
pub struct FlowStore {
    capacity: usize,
    records: VecDeque<(String, pb::FlowRecord)>,
    pub accepted: u64,
    pub evicted: u64,
    /// Records agents reported as dropped on their side.
    pub dropped_by_agents: u64,
}

impl FlowStore {
    pub fn new(capacity: usize) -> FlowStore {
        FlowStore {
            capacity: capacity.max(1),
            records: VecDeque::new(),
            accepted: 0,
            evicted: 0,
            dropped_by_agents: 0,
        }
    }

    pub fn push(&mut self, node: &str, r: pb::FlowRecord) {
        if self.records.len() == self.capacity {
            self.records.pop_front();
            self.evicted += 1;
        }
        self.accepted += 1;
        self.records.push_back((node.to_string(), r));
    }

    pub fn recent(&self, limit: usize) -> Vec<(String, pb::FlowRecord)> {
        self.records.iter().rev().take(limit).cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

#[derive(Clone)]
pub struct DistributionService {
    hub: Arc<Hub>,
    flows: Arc<Mutex<FlowStore>>,
}

impl DistributionService {
    pub fn new(hub: Arc<Hub>, flows: Arc<Mutex<FlowStore>>) -> Self {
        DistributionService { hub, flows }
    }
}

fn version(epoch: u64, version: u64) -> Option<pb::Version> {
    Some(pb::Version { epoch, version })
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Distribution for DistributionService {
    type SyncStream = SyncStream;

    async fn sync(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Err(_) => return Err(Status::deadline_exceeded("no hello within 10 s")),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(None)) => return Err(Status::invalid_argument("stream closed before hello")),
            Ok(Ok(Some(AgentMessage {
                msg: Some(agent_message::Msg::Hello(h)),
            }))) => h,
            Ok(Ok(Some(_))) => {
                return Err(Status::invalid_argument(
                    "the first message must be a hello",
                ));
            }
        };
        let node = hello.node.trim().to_string();
        if node.is_empty() {
            return Err(Status::invalid_argument("hello names no node; pass --node"));
        }
        tracing::info!(node = %node, realized = ?hello.realized, "agent connected");
        let (out_tx, out_rx) = mpsc::channel::<Result<ControllerMessage, Status>>(16);
        let hub = self.hub.clone();
        let epoch = hub.epoch();

        // Acks from the agent.
        {
            let hub = hub.clone();
            let node = node.clone();
            tokio::spawn(async move {
                while let Ok(Some(msg)) = inbound.message().await {
                    if let Some(agent_message::Msg::Ack(ack)) = msg.msg {
                        let v = ack.version.unwrap_or_default();
                        let err = (!ack.ok).then_some(ack.error);
                        if let Some(e) = &err {
                            tracing::warn!(node = %node, version = v.version, error = %e, "agent could not realize a rule set");
                        }
                        hub.ack(&node, v.epoch, v.version, err, ack.connections_cut);
                    }
                }
                tracing::info!(node = %node, "agent disconnected");
            });
        }

        // Snapshot, then deltas; a closed queue (the agent fell behind) means a fresh snapshot.
        tokio::spawn(async move {
            loop {
                let mut sub = match hub.subscribe(&node) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = out_tx.send(Err(Status::internal(e.to_string()))).await;
                        return;
                    }
                };
                let snapshot = ControllerMessage {
                    msg: Some(controller_message::Msg::Snapshot(pb::Snapshot {
                        version: version(epoch, sub.snapshot.version),
                        ruleset_json: std::mem::take(&mut sub.snapshot_json),
                    })),
                };
                if out_tx.send(Ok(snapshot)).await.is_err() {
                    hub.unsubscribe(&node, sub.id);
                    return;
                }
                while let Some(u) = sub.updates.recv().await {
                    let msg = ControllerMessage {
                        msg: Some(controller_message::Msg::Delta(pb::Delta {
                            from: version(epoch, u.from),
                            version: version(epoch, u.version),
                            delta_json: u.delta_json.as_ref().clone(),
                            priority: u.priority,
                        })),
                    };
                    if out_tx.send(Ok(msg)).await.is_err() {
                        hub.unsubscribe(&node, sub.id);
                        return;
                    }
                }
                tracing::info!(node = %node, "agent fell behind; sending a fresh snapshot");
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    async fn report_flows(
        &self,
        request: Request<Streaming<FlowBatch>>,
    ) -> Result<Response<FlowReportSummary>, Status> {
        let mut inbound = request.into_inner();
        let mut accepted = 0u64;
        while let Some(batch) = inbound.next().await {
            let batch = batch?;
            let Ok(mut store) = self.flows.lock() else {
                return Err(Status::internal("flow store lock poisoned"));
            };
            store.dropped_by_agents += batch.dropped;
            for r in batch.records {
                store.push(&batch.node, r);
                accepted += 1;
            }
        }
        Ok(Response::new(FlowReportSummary { accepted }))
    }
}

#[derive(Clone)]
pub struct AdminService {
    hub: Arc<Hub>,
    quarantine: Option<Arc<super::quarantine::QuarantineControl>>,
}

impl AdminService {
    pub fn new(hub: Arc<Hub>) -> Self {
        AdminService {
            hub,
            quarantine: None,
        }
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
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn policy_status(
        &self,
        _request: Request<PolicyStatusRequest>,
    ) -> Result<Response<PolicyStatusResponse>, Status> {
        let policies = self
            .hub
            .policy_status()
            .into_iter()
            .map(|p| pb::PolicyRealization {
                kind: format!("{:?}", p.kind),
                namespace: p.namespace,
                name: p.name,
                nodes: p.nodes,
                realized: p.realized,
            })
            .collect();
        Ok(Response::new(PolicyStatusResponse {
            policies,
            epoch: self.hub.epoch(),
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
        let q = self.quarantines()?;
        let r = request.into_inner();
        let resp = tokio::task::spawn_blocking(move || q.quarantine(r))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(resp))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::QuarantineResponse>, Status> {
        let q = self.quarantines()?;
        let r = request.into_inner();
        let resp = tokio::task::spawn_blocking(move || q.release(r))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(resp))
    }

    async fn list_quarantines(
        &self,
        _request: Request<pb::ListQuarantinesRequest>,
    ) -> Result<Response<pb::ListQuarantinesResponse>, Status> {
        let q = self.quarantines()?;
        Ok(Response::new(pb::ListQuarantinesResponse {
            quarantines: q.list(),
        }))
    }
}
