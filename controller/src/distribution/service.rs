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
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use bulkhead_proto::parts;

use super::{
    auth::{self, ClientPolicy},
    hub::{Hub, HubError, SentVersions, Subscription},
};
use crate::{
    answers::{self, AnswerError, ImpactQuestion, RecommendQuestion},
    flows::{
        Directory, FlowFilter, FlowPipeline, ServiceGraph,
        history::{FlowHistory, HistoryQuery},
    },
    ruleset::{FlowEntry, FlowRecord},
};

/// How long an agent has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Flow records the controller keeps, and the quarantine actions it records among them (oldest
/// evicted first, evictions counted).
///
/// Every record has a sequence number (the count of records accepted before it), so a reader
/// can resume where it left off and knows how many it missed when the store moved past it.
#[derive(Debug)]
pub struct FlowStore {
    capacity: usize,
    /// Shared with the history's writer (which would otherwise need a copy of each).
    records: VecDeque<(Arc<str>, Arc<FlowEntry>)>,
    pub accepted: u64,
    pub evicted: u64,
    /// Records agents reported as dropped on their side.
    pub dropped_by_agents: u64,
    /// Says `accepted` to watchers whenever records arrive.
    arrivals: watch::Sender<u64>,
    /// Where every accepted record is also kept on disk, when on.
    history: Option<Arc<FlowHistory>>,
    /// Names peers the agents could not, for the history and for the questions that read the
    /// records in memory (the pipeline's latest).
    directory: Option<Arc<Directory>>,
}

impl FlowStore {
    pub fn new(capacity: usize) -> FlowStore {
        FlowStore {
            capacity: capacity.max(1),
            records: VecDeque::new(),
            accepted: 0,
            evicted: 0,
            dropped_by_agents: 0,
            arrivals: watch::Sender::new(0),
            history: None,
            directory: None,
        }
    }

    /// Also keeps every record pushed from now on in `history` (handed to its writer; never
    /// waits for the disk).
    pub fn with_history(mut self, history: Arc<FlowHistory>) -> FlowStore {
        self.history = Some(history);
        self
    }

    pub fn history(&self) -> Option<&Arc<FlowHistory>> {
        self.history.as_ref()
    }

    /// The directory that names the peers agents could not name (the pipeline's latest).
    pub fn directory(&self) -> Option<&Arc<Directory>> {
        self.directory.as_ref()
    }

    /// The directory the history names peers with (the pipeline sets it per batch).
    pub fn set_directory(&mut self, directory: Arc<Directory>) {
        self.directory = Some(directory);
    }

    /// A record read back from the history at start: held like any other, not written again.
    pub fn restore(&mut self, node: &str, e: FlowEntry) {
        self.push_to_memory(Arc::from(node), [e], false);
    }

    pub fn push(&mut self, node: &str, e: FlowEntry) {
        self.push_entries(node, [e]);
    }

    /// Records of one node, in order.
    pub fn push_batch(&mut self, node: &str, records: impl IntoIterator<Item = FlowRecord>) {
        self.push_entries(node, records.into_iter().map(FlowEntry::Flow));
    }

    fn push_entries(&mut self, node: &str, entries: impl IntoIterator<Item = FlowEntry>) {
        self.push_to_memory(Arc::from(node), entries, true);
    }

    fn push_to_memory(
        &mut self,
        node: Arc<str>,
        entries: impl IntoIterator<Item = FlowEntry>,
        to_history: bool,
    ) {
        let first = self.accepted;
        let mut kept = (to_history && self.history.is_some()).then(Vec::new);
        for e in entries {
            let e = Arc::new(e);
            if self.records.len() == self.capacity {
                self.records.pop_front();
                self.evicted += 1;
            }
            self.accepted += 1;
            if let Some(k) = &mut kept {
                k.push(e.clone());
            }
            self.records.push_back((node.clone(), e));
        }
        if let (Some(h), Some(k)) = (&self.history, kept) {
            h.offer(node, first, k, self.directory.clone());
        }
        self.arrivals.send_replace(self.accepted);
    }

    pub fn recent(&self, limit: usize) -> Vec<(String, FlowEntry)> {
        self.records
            .iter()
            .rev()
            .take(limit)
            .map(|(n, r)| (n.to_string(), FlowEntry::clone(r)))
            .collect()
    }

    /// Sequence number of the oldest record held.
    pub fn first_sequence(&self) -> u64 {
        self.accepted - self.records.len() as u64
    }

    /// Records from sequence number `from` on (node, record, sequence), and how many records
    /// from `from` on were already evicted.
    pub fn since(
        &self,
        from: u64,
    ) -> (
        u64,
        impl DoubleEndedIterator<Item = (&str, &FlowEntry, u64)>,
    ) {
        let first = self.first_sequence();
        let missed = first.saturating_sub(from);
        let skip = from.saturating_sub(first).min(self.records.len() as u64) as usize;
        let iter = self
            .records
            .range(skip..)
            .enumerate()
            .map(move |(i, (n, r))| (&**n, &**r, first + (skip + i) as u64));
        (missed, iter)
    }

    /// Wakes up whenever records arrive (carries the `accepted` count).
    pub fn arrivals(&self) -> watch::Receiver<u64> {
        self.arrivals.subscribe()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn stats(&self) -> pb::FlowStoreStats {
        pb::FlowStoreStats {
            accepted: self.accepted,
            stored: self.records.len() as u64,
            evicted: self.evicted,
            dropped_by_agents: self.dropped_by_agents,
            capacity: self.capacity as u64,
        }
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
fn actor(certificate: Option<String>, claimed: String) -> String {
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

#[derive(Clone)]
pub struct AdminService {
    hub: Arc<Hub>,
    quarantine: Option<Arc<super::quarantine::QuarantineControl>>,
    flows: Option<Arc<FlowPipeline>>,
    clients: ClientPolicy,
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
        }
    }

    /// Which client certificates may quarantine and release (see [`ClientPolicy`]).
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

#[cfg(test)]
mod flow_api_tests {
    //! The flow ingest and the flow/graph admin calls over a real socket.

    use std::{net::SocketAddr, sync::Arc, time::Duration};

    use bulkhead_proto::v1::{
        self as pb, admin_client::AdminClient, admin_server::AdminServer,
        distribution_client::DistributionClient, distribution_server::DistributionServer,
    };

    use super::{AdminService, DistributionService, FlowStore, Hub};
    use crate::{
        Change, EngineConfig, PolicyEngine,
        flows::{FlowPipeline, ServiceGraph},
        load_str,
        ruleset::{
            Direction, FlowEntry, FlowKind, FlowReason, FlowRecord, FlowRule, RuleKind, RuleRef,
        },
    };

    const PODS: &str = "
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, image: x}]}
status: {podIP: 10.9.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: data, labels: {app: db}}
spec: {nodeName: n2, containers: [{name: c, image: x}]}
status: {podIP: 10.9.0.2}
";

    fn record(endpoint: &str, direction: &str, dst: &str, verdict: &str, t: u64) -> pb::FlowRecord {
        pb::FlowRecord::from(FlowRecord {
            time_unix_nanos: t,
            endpoint: endpoint.parse().expect("endpoint"),
            direction: direction.parse().expect("direction"),
            src: "10.9.0.1".parse().expect("ip"),
            dst: dst.parse().expect("ip"),
            src_port: 0,
            dst_port: 5432,
            protocol: 6,
            kind: FlowKind::New,
            verdict: verdict.parse().expect("verdict"),
            rule: FlowRule::Rule(RuleRef {
                kind: RuleKind::NetworkPolicy,
                namespace: "data".into(),
                name: format!("rule-for-{verdict}"),
                direction: Direction::Ingress,
                index: None,
            }),
            rule_id: 0,
            local_identity: 0,
            peer_identity: 0,
            peer: None,
            reason: FlowReason::DeniedPolicy,
            packets: 0,
            bytes: 60,
            staged: None,
        })
    }

    /// The record of a stored flow.
    fn flow_record(f: &pb::StoredFlow) -> FlowRecord {
        match f.clone().into_entry().expect("a stored flow") {
            FlowEntry::Flow(r) => r,
            other => panic!("{other:?} is no flow record"),
        }
    }

    async fn serve(capacity: usize) -> (SocketAddr, Arc<FlowPipeline>) {
        let loaded = load_str(std::path::Path::new("pods.yaml"), PODS);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let mut engine = PolicyEngine::empty(EngineConfig::default());
        engine
            .apply_batch(
                loaded
                    .objects
                    .into_iter()
                    .map(Change::from)
                    .collect::<Vec<_>>(),
            )
            .expect("pods");
        let hub = Arc::new(Hub::new(engine));
        let pipeline = Arc::new(FlowPipeline::new(
            Arc::new(std::sync::Mutex::new(FlowStore::new(capacity))),
            Arc::new(std::sync::Mutex::new(ServiceGraph::default())),
            hub.clone(),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(DistributionServer::new(
                    DistributionService::with_flow_pipeline(hub.clone(), pipeline.clone()),
                ))
                .add_service(AdminServer::new(
                    AdminService::new(hub).with_flows(pipeline.clone()),
                ))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (addr, pipeline)
    }

    async fn report(
        addr: SocketAddr,
        node: &str,
        records: Vec<pb::FlowRecord>,
        dropped: u64,
    ) -> u64 {
        let mut client = DistributionClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        let batch = pb::FlowBatch {
            node: node.into(),
            records,
            dropped,
        };
        client
            .report_flows(tokio_stream::iter([batch]))
            .await
            .expect("report")
            .into_inner()
            .accepted
    }

    #[tokio::test]
    async fn flows_and_graph_over_grpc() {
        let (addr, _) = serve(100).await;
        let records = vec![
            // web-0 → db-0, allowed at web's egress (n1) and denied at db's ingress (n2).
            record("shop/web-0", "egress", "10.9.0.2", "allowed", 10),
            record("data/db-0", "ingress", "10.9.0.2", "denied", 11),
            // web-0 → the internet.
            record("shop/web-0", "egress", "198.51.100.7", "allowed", 12),
        ];
        assert_eq!(report(addr, "n1", records, 5).await, 3);
        let mut admin = AdminClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");

        let all = admin
            .get_flows(pb::GetFlowsRequest::default())
            .await
            .expect("get flows")
            .into_inner();
        assert_eq!(all.flows.len(), 3);
        assert_eq!(all.flows[0].sequence, 0, "oldest first");
        let stats = all.stats.expect("stats");
        assert_eq!(
            (
                stats.accepted,
                stats.stored,
                stats.evicted,
                stats.dropped_by_agents
            ),
            (3, 3, 0, 5)
        );
        // The controller names the peer the agent could not (db-0 lives on another node).
        let first = flow_record(&all.flows[0]);
        assert_eq!(first.peer, Some("data/db-0".parse().expect("pod")));

        let denied = admin
            .get_flows(pb::GetFlowsRequest {
                filter: Some(pb::FlowFilter {
                    verdict: "denied".into(),
                    namespace: "shop".into(),
                    ..Default::default()
                }),
                limit: 0,
                ..Default::default()
            })
            .await
            .expect("get flows")
            .into_inner();
        assert_eq!(denied.flows.len(), 1, "{:?}", denied.flows);
        assert_eq!(denied.flows[0].node, "n1");
        let pod = admin
            .get_flows(pb::GetFlowsRequest {
                filter: Some(pb::FlowFilter {
                    pod: "data/db-0".into(),
                    since_unix_nanos: 11,
                    ..Default::default()
                }),
                limit: 0,
                ..Default::default()
            })
            .await
            .expect("get flows")
            .into_inner();
        assert_eq!(pod.flows.len(), 1);

        let graph = admin
            .get_graph(pb::GetGraphRequest::default())
            .await
            .expect("graph")
            .into_inner();
        let ids: Vec<&str> = graph.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["data/Pod/db-0", "shop/Pod/web-0", "world"]);
        assert_eq!(graph.edges.len(), 2);
        let db = graph
            .edges
            .iter()
            .find(|e| e.dst == "data/Pod/db-0")
            .expect("web → db");
        assert_eq!((db.allowed, db.denied, db.port), (0, 1, 5432));
        assert_eq!(
            db.rules[0].rule,
            "NetworkPolicy data/rule-for-denied ingress default-deny"
        );
        let data_only = admin
            .get_graph(pb::GetGraphRequest {
                namespace: "data".into(),
            })
            .await
            .expect("graph")
            .into_inner();
        assert_eq!((data_only.nodes.len(), data_only.edges.len()), (2, 1));
    }

    /// `Recommend` and `Impact` answer over a real socket what the HTTP API answers (the same
    /// [`crate::answers`]), with bad questions refused as INVALID_ARGUMENT; the history is asked
    /// for where none is kept: FAILED_PRECONDITION.
    #[tokio::test]
    async fn recommend_and_impact_over_grpc() {
        use crate::{impact::Impact, recommend::Recommendation};
        let (addr, _) = serve(100).await;
        let records = vec![
            record("shop/web-0", "egress", "10.9.0.2", "allowed", 10),
            record("data/db-0", "ingress", "10.9.0.2", "allowed", 11),
        ];
        assert_eq!(report(addr, "n1", records, 0).await, 2);
        let mut admin = AdminClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");

        let r = admin
            .recommend(pb::RecommendRequest {
                namespaces: vec!["data".into()],
                ..Default::default()
            })
            .await
            .expect("recommend")
            .into_inner();
        let r = Recommendation::try_from(r).expect("a recommendation");
        assert_eq!((r.records, r.from_history), (2, false));
        assert_eq!(r.policies.len(), 1, "{}", r.to_yaml().unwrap());
        assert_eq!(r.policies[0].workload.to_string(), "data/Pod/db-0");
        assert!(
            r.to_yaml().unwrap().contains("app: web"),
            "{}",
            r.to_yaml().unwrap()
        );

        let deny_all = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-closed, namespace: data}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
";
        let i = admin
            .impact(pb::ImpactRequest {
                proposal_yaml: deny_all.into(),
                ..Default::default()
            })
            .await
            .expect("impact")
            .into_inner();
        let i = Impact::try_from(i).expect("an impact");
        assert_eq!(i.proposal.added, ["NetworkPolicy/data/db-closed"]);
        assert_eq!(i.breaks, 1, "{i:#?}");
        assert_eq!(
            (i.changed[0].src.as_str(), i.changed[0].dst.as_str()),
            ("shop/web-0", "data/db-0")
        );

        let bad = admin
            .impact(pb::ImpactRequest {
                proposal_yaml: "kind: NetworkPolicy\nmetadata: {name: x}\n".into(),
                ..Default::default()
            })
            .await
            .expect_err("an invalid proposal");
        assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad}");
        let unknown = admin
            .impact(pb::ImpactRequest {
                delete: vec![pb::PolicyName {
                    kind: pb::RuleKind::NetworkPolicy.into(),
                    namespace: "data".into(),
                    name: "nope".into(),
                }],
                ..Default::default()
            })
            .await
            .expect_err("no such policy");
        assert_eq!(unknown.code(), tonic::Code::InvalidArgument);
        assert!(unknown.message().contains("no such policy"), "{unknown}");
        let garbage = admin
            .recommend(pb::RecommendRequest {
                kind: 77,
                ..Default::default()
            })
            .await
            .expect_err("an unknown kind");
        assert_eq!(garbage.code(), tonic::Code::InvalidArgument);

        let no_history = admin
            .get_flows(pb::GetFlowsRequest {
                history: true,
                ..Default::default()
            })
            .await
            .expect_err("no history kept");
        assert_eq!(no_history.code(), tonic::Code::FailedPrecondition);
    }

    async fn next(w: &mut tonic::Streaming<pb::WatchFlowsResponse>) -> pb::WatchFlowsResponse {
        tokio::time::timeout(Duration::from_secs(5), w.message())
            .await
            .expect("a message within 5 s")
            .expect("stream")
            .expect("open")
    }

    #[tokio::test]
    async fn watchers_get_new_matching_flows_and_hear_what_they_missed() {
        let (addr, pipeline) = serve(4).await;
        report(
            addr,
            "n1",
            vec![record("shop/web-0", "egress", "10.9.0.2", "denied", 1)],
            0,
        )
        .await;
        let mut admin = AdminClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        let mut watch = admin
            .watch_flows(pb::WatchFlowsRequest {
                filter: Some(pb::FlowFilter {
                    verdict: "denied".into(),
                    ..Default::default()
                }),
                backlog: 10,
            })
            .await
            .expect("watch")
            .into_inner();
        let backlog = next(&mut watch).await;
        assert_eq!((backlog.flows.len(), backlog.missed), (1, 0));
        // One allowed (filtered out) and one denied record arrive.
        report(
            addr,
            "n1",
            vec![
                record("shop/web-0", "egress", "10.9.0.2", "allowed", 2),
                record("shop/web-0", "egress", "10.9.0.2", "denied", 3),
            ],
            0,
        )
        .await;
        let live = next(&mut watch).await;
        assert_eq!(live.flows.len(), 1);
        assert_eq!(flow_record(&live.flows[0]).time_unix_nanos, 3);
        // Ten records into a store of four, in one batch: the watcher sees the four the store
        // still holds and is told about the six it missed.
        let batch = (0..10)
            .map(|i| record("shop/web-0", "egress", "10.9.0.2", "denied", 100 + i))
            .collect();
        report(addr, "n1", batch, 0).await;
        let burst = next(&mut watch).await;
        assert_eq!((burst.flows.len(), burst.missed), (4, 6));
        let stats = pipeline.store().lock().expect("store").stats();
        assert_eq!(stats.accepted, stats.stored + stats.evicted);
        assert_eq!(
            pipeline.graph().lock().expect("graph").records(),
            stats.accepted
        );
    }
}
