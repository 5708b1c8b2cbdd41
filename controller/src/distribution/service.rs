//! The gRPC services: `Distribution` (agents) and `Admin` (CLI, UI).

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use bulkhead_proto::v1::{
    self as pb, AgentMessage, ControllerMessage, FlowBatch, FlowReportSummary, agent_message,
    controller_message, distribution_server::Distribution,
};
use tokio::sync::oneshot;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use bulkhead_proto::parts;

use super::{
    FlowStore,
    auth::{self, ClientPolicy},
    hub::{Hub, HubError, SentVersions, Subscription},
};
use crate::flows::{FlowPipeline, ServiceGraph};

/// How long an agent has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct DistributionService {
    hub: Arc<Hub>,
    flows: Arc<FlowPipeline>,
    clients: ClientPolicy,
}

impl DistributionService {
    /// Flow reports go into `flows` and into a service graph of their own.
    pub fn new(hub: Arc<Hub>, flows: Arc<Mutex<FlowStore>>) -> Self {
        let graph = Arc::new(Mutex::new(ServiceGraph::default()));
        let pipeline = Arc::new(FlowPipeline::new(flows, graph, hub.clone()));
        DistributionService::with_flow_pipeline(hub, pipeline)
    }

    /// Flow reports go through `pipeline` (store and graph shared with the rest of the
    /// controller).
    pub fn with_flow_pipeline(hub: Arc<Hub>, pipeline: Arc<FlowPipeline>) -> Self {
        DistributionService {
            hub,
            flows: pipeline,
            clients: ClientPolicy::default(),
        }
    }

    /// Which client certificates may act for which nodes (see [`ClientPolicy`]).
    pub fn with_client_policy(mut self, clients: ClientPolicy) -> Self {
        self.clients = clients;
        self
    }

    /// The gRPC service with its message size limits set (see [`parts`]): what the controller
    /// serves agents.
    pub fn into_server(self) -> pb::distribution_server::DistributionServer<Self> {
        pb::distribution_server::DistributionServer::new(self)
            .max_decoding_message_size(parts::SERVER_MESSAGE_BYTES)
            .max_encoding_message_size(parts::SERVER_MESSAGE_BYTES)
    }
}

/// Who the audit log names: the certificate's holder, with what the client said of itself when
/// that differs (a person's name typed into the CLI is not proof of anything).
pub(super) fn actor(certificate: Option<String>, claimed: String) -> String {
    match certificate {
        Some(cn) if claimed.is_empty() || claimed == cn => cn,
        Some(cn) => format!("{claimed} (certificate {cn})"),
        None => claimed,
    }
}

fn version(epoch: u64, version: u64) -> Option<pb::Version> {
    Some(pb::Version { epoch, version })
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

/// The hub subscription a stream holds: ends when this is dropped, however the stream's task
/// ends (even before it first ran), so a stream that is gone never shows its node connected.
struct Following {
    hub: Arc<Hub>,
    node: String,
    id: u64,
}

impl Following {
    /// Follows the subscription `id` instead (after a resynchronisation).
    fn replace(&mut self, id: u64) {
        let old = std::mem::replace(&mut self.id, id);
        self.hub.unsubscribe(&self.node, old);
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.hub.unsubscribe(&self.node, self.id);
    }
}

/// What a `Sync` call answers: the node's snapshot, then the deltas the hub queues for it, each
/// as the parts that carry it; a fresh snapshot when the hub cut the subscription loose (the
/// agent fell behind). Ends, with the status to tell, when the agent's side broke the
/// protocol or went away. Polled by the HTTP/2 stream's own task only when the stream can take
/// more, so an agent that does not read fills its hub queue and is cut loose, as before.
struct FollowStream {
    sub: Subscription,
    following: Following,
    sent: Arc<SentVersions>,
    /// Why the agent's side ended; `None` once it only closed its half (it still reads).
    gone: Option<oneshot::Receiver<Option<Status>>>,
    /// Parts of the message being sent.
    pending: VecDeque<ControllerMessage>,
    done: bool,
}

impl FollowStream {
    fn new(
        first: Subscription,
        following: Following,
        sent: Arc<SentVersions>,
        gone: oneshot::Receiver<Option<Status>>,
    ) -> FollowStream {
        let mut s = FollowStream {
            sub: first,
            following,
            sent,
            gone: Some(gone),
            pending: VecDeque::new(),
            done: false,
        };
        s.queue_snapshot();
        s
    }

    fn queue_snapshot(&mut self) {
        let epoch = self.following.hub.epoch();
        // The snapshot is sent once: what the subscription holds afterwards is not needed.
        let snapshot = std::mem::take(&mut self.sub.snapshot);
        self.sent.sent(snapshot.version);
        let msg = ControllerMessage {
            msg: Some(controller_message::Msg::Snapshot(pb::Snapshot {
                version: version(epoch, snapshot.version),
                ruleset: Some((&snapshot).into()),
            })),
        };
        self.pending.extend(parts::split(msg, parts::PART_BYTES));
    }
}

impl Stream for FollowStream {
    type Item = Result<ControllerMessage, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::{future::Future, task::Poll};
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(gone) = this.gone.as_mut()
            && let Poll::Ready(why) = Pin::new(gone).poll(cx)
        {
            this.gone = None;
            // The agent went away, or broke the protocol (then it is told why). A dropped
            // sender is a half-close: follow until nobody reads.
            if let Ok(why) = why {
                this.done = true;
                return Poll::Ready(why.map(Err));
            }
        }
        loop {
            if let Some(m) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(m)));
            }
            match this.sub.updates.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(u)) => {
                    this.sent.sent(u.version);
                    // Already encoded by the hub (shared with the node's other streams and, in
                    // part, with other nodes'): sent as parts, never re-encoded here.
                    this.pending.extend(u.message.parts(parts::PART_BYTES));
                }
                Poll::Ready(None) => {
                    let node = &this.following.node;
                    tracing::info!(node = %node, "agent fell behind; sending a fresh snapshot");
                    match this.following.hub.subscribe(node) {
                        Ok(sub) => {
                            this.following.replace(sub.id);
                            this.sub = sub;
                            this.queue_snapshot();
                        }
                        Err(e) => {
                            // The node left the inventory (or the hub broke): the agent
                            // reconnects and is told which.
                            this.done = true;
                            return Poll::Ready(Some(Err(Status::internal(e.to_string()))));
                        }
                    }
                }
            }
        }
    }
}

/// Longest node name: a Kubernetes Node name is a DNS subdomain.
const MAX_NODE_NAME: usize = 253;

/// Refuses a node name no Kubernetes node can have before it is looked up or logged.
fn check_node_name(node: &str) -> Result<(), Status> {
    if node.len() > MAX_NODE_NAME {
        return Err(Status::invalid_argument(format!(
            "a {}-byte node name; node names are at most {MAX_NODE_NAME} bytes (pass the Kubernetes Node name)",
            node.len()
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl Distribution for DistributionService {
    type SyncStream = SyncStream;

    async fn sync(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let caller = auth::caller(&request)?;
        let metadata = request.metadata().clone();
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
        check_node_name(&node)?;
        self.clients
            .authorize_node(caller.as_deref(), &metadata, &node)
            .await?;
        // Subscribed before the call answers: a node the inventory does not have is refused
        // here, and leaves nothing behind.
        let first = self.hub.subscribe(&node).map_err(|e| match e {
            HubError::UnknownNode(_) => {
                tracing::warn!(node = %node, "refused an agent for a node the inventory does not have");
                Status::not_found(e.to_string())
            }
            e => Status::internal(e.to_string()),
        })?;
        tracing::info!(node = %node, realized = ?hello.realized, "agent connected");
        let hub = self.hub.clone();
        let sent = Arc::new(SentVersions::default());
        // Why the agent's side ended: it went away (None), or it broke the protocol. Dropped
        // unsent when the agent only closed its half (it still reads what we send).
        let (gone_tx, gone_rx) = oneshot::channel::<Option<Status>>();

        // Acks from the agent, each checked against what this stream sent. The end of the
        // inbound stream is the agent going away: the outbound side stops at once.
        {
            let hub = hub.clone();
            let node = node.clone();
            let sent = sent.clone();
            tokio::spawn(async move {
                let why = loop {
                    let msg = match inbound.message().await {
                        Ok(Some(m)) => m,
                        Ok(None) => {
                            tracing::debug!(node = %node, "agent closed its side of the stream");
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(node = %node, error = %e, "agent stream broke");
                            break None;
                        }
                    };
                    let Some(agent_message::Msg::Ack(ack)) = msg.msg else {
                        continue;
                    };
                    let v = ack.version.unwrap_or_default();
                    if v.epoch != hub.epoch() || !sent.take_ack(v.version) {
                        hub.refuse_ack();
                        tracing::warn!(node = %node, epoch = v.epoch, version = v.version, "refused an ack for a version this stream was not sent; closing it");
                        break Some(Status::invalid_argument(format!(
                            "ack for version {} of epoch {}, which this stream was not sent; acks name versions the controller sent",
                            v.version, v.epoch
                        )));
                    }
                    let err = (!ack.ok).then_some(ack.error);
                    if let Some(e) = &err {
                        tracing::warn!(node = %node, version = v.version, error = %e, "agent could not realize a rule set");
                    }
                    hub.ack(&node, v.epoch, v.version, err, ack.connections_cut);
                };
                tracing::info!(node = %node, "agent disconnected");
                let _ = gone_tx.send(why);
            });
        }

        // Snapshot, then deltas; a closed queue (the agent fell behind) means a fresh snapshot.
        // The response stream reads the hub's queue itself: no task of its own between the
        // queue and the HTTP/2 stream, so a change wakes one task per node, not two.
        let following = Following {
            hub: hub.clone(),
            node: node.clone(),
            id: first.id,
        };
        Ok(Response::new(Box::pin(FollowStream::new(
            first, following, sent, gone_rx,
        ))))
    }

    async fn report_flows(
        &self,
        request: Request<Streaming<FlowBatch>>,
    ) -> Result<Response<FlowReportSummary>, Status> {
        let caller = auth::caller(&request)?;
        let metadata = request.metadata().clone();
        let mut inbound = request.into_inner();
        let mut accepted = 0u64;
        // The node this stream was allowed to report for (checked once, not per batch).
        let mut authorized: Option<String> = None;
        while let Some(batch) = inbound.next().await {
            let batch = batch?;
            check_node_name(&batch.node)?;
            if authorized.as_deref() != Some(batch.node.as_str()) {
                self.clients
                    .authorize_node(caller.as_deref(), &metadata, &batch.node)
                    .await?;
                authorized = Some(batch.node.clone());
            }
            // The node's name is stored with every record: only the inventory's names.
            if !self.hub.knows_node(&batch.node) {
                self.hub
                    .counters
                    .unknown_nodes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(node = %batch.node, "refused flow reports for a node the inventory does not have");
                return Err(Status::not_found(
                    HubError::UnknownNode(batch.node).to_string(),
                ));
            }
            accepted += self
                .flows
                .ingest(&batch.node, batch.records, batch.dropped)
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        Ok(Response::new(FlowReportSummary { accepted }))
    }
}
