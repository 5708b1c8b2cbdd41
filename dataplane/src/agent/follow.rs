//! Following a rule-set file or the controller, and forwarding flow records to it.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use bulkhead_proto::client::ControllerTarget;
use bulkhead_ruleset::RuleSet;

use super::{Realizer, Shared, load_file};

/// File mode: the rule-set file is watched; missing interfaces are retried, and an interface
/// that went away or was created again is caught on the next tick.
pub(super) async fn follow_file(
    r: &Realizer,
    node: &str,
    path: PathBuf,
    rs: RuleSet,
) -> anyhow::Result<()> {
    let mut rs = Arc::new(rs);
    let mut pending = true;
    let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen: Option<SystemTime> = mtime(&path);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let now = mtime(&path);
        if path != Path::new("-") && now != seen {
            seen = now;
            match load_file(&path, node) {
                Ok(new) => {
                    rs = Arc::new(new);
                    pending = true;
                }
                // Keep enforcing what we have: a bad file never opens anything.
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "rule set not applied; the previous one stays in force")
                }
            }
        }
        if pending || r.dataplane.interfaces_changed().await {
            pending = match r.realize(&rs).await {
                Ok(report) => !report.missing_interfaces.is_empty(),
                Err(_) => false,
            };
        }
    }
}

/// Controller mode: reconnects with backoff forever; enforcement never depends on the stream.
/// Endpoints whose interface does not exist yet are retried every second, and an enforced
/// interface that went away or was created again (a pod's sandbox recreated under the same
/// veth name) is applied again within a second.
pub(super) async fn follow_controller(r: &Realizer, node: &str, target: ControllerTarget) {
    use bulkhead_proto::follower::{Follower, run_session_with_token};
    let mut follower = Follower::new(node);
    let mut backoff = Duration::from_millis(100);
    let missing = std::sync::atomic::AtomicBool::new(false);
    let retry = async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let due = missing.load(std::sync::atomic::Ordering::Relaxed)
                || r.dataplane.interfaces_changed().await;
            if due
                && let Some(rs) = r.last.lock().ok().and_then(|l| l.clone())
                && let Ok(report) = r.realize(&rs).await
            {
                missing.store(
                    !report.missing_interfaces.is_empty(),
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
        }
    };
    let follow = async {
        loop {
            let started = std::time::Instant::now();
            let connected = match (target.endpoint(), target.token()) {
                (Ok(endpoint), Ok(token)) => endpoint
                    .connect()
                    .await
                    .map(|c| (c, token))
                    .map_err(anyhow::Error::from),
                (Err(e), _) | (_, Err(e)) => Err(anyhow::Error::from(e)),
            };
            let result = match connected {
                Ok((channel, token)) => run_session_with_token(
                    channel,
                    token.as_deref(),
                    &mut follower,
                    |rs| async {
                        let result = r.realize(&rs).await;
                        match result {
                            Ok(report) => {
                                missing.store(
                                    !report.missing_interfaces.is_empty(),
                                    std::sync::atomic::Ordering::Relaxed,
                                );
                                if let Ok(mut l) = r.last.lock() {
                                    *l = Some(rs);
                                }
                                Ok(bulkhead_proto::follower::Realized {
                                    connections_cut: report.connections_cut as u64,
                                })
                            }
                            Err(e) => Err(format!("{e:#}")),
                        }
                    },
                    || {
                        r.shared.metrics.controller_connected.set(1);
                        tracing::info!("following the controller");
                    },
                )
                .await
                .map_err(anyhow::Error::from),
                Err(e) => Err(e.context("connect to the controller")),
            };
            if let Err(e) = result {
                tracing::warn!(error = %format!("{e:#}"), "controller stream lost; the last rule set stays enforced");
            }
            r.shared.metrics.controller_connected.set(0);
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    };
    tokio::select! {
        _ = retry => {}
        _ = follow => {}
    }
}

/// Flow records to the controller in batches; when the controller is away or slow, records are
/// dropped and counted, never queued without bound.
pub(super) async fn flow_forwarder(
    target: ControllerTarget,
    node: String,
    mut rx: tokio::sync::mpsc::Receiver<bulkhead_ruleset::FlowRecord>,
    shared: Arc<Shared>,
) {
    use bulkhead_proto::v1 as pb;
    loop {
        let (Ok(endpoint), Ok(token)) = (target.endpoint(), target.token()) else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let Ok(channel) = endpoint.connect().await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let mut client = pb::distribution_client::DistributionClient::new(channel);
        let (btx, brx) = tokio::sync::mpsc::channel::<pb::FlowBatch>(4);
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(brx));
        if let Some(token) = &token
            && let Ok(value) = bulkhead_proto::follower::bearer_value(token)
        {
            request.metadata_mut().insert("authorization", value);
        }
        let call = tokio::spawn(async move { client.report_flows(request).await });
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut batch: Vec<pb::FlowRecord> = Vec::new();
        // Records handed to this stream; the controller's summary says how many it took.
        let mut sent = 0u64;
        loop {
            tokio::select! {
                r = rx.recv() => match r {
                    Some(rec) => {
                        batch.push(pb::FlowRecord::from(rec));
                        if batch.len() < 512 { continue; }
                    }
                    None => return,
                },
                _ = tick.tick() => {}
            }
            if batch.is_empty() {
                continue;
            }
            let dropped = shared
                .flows_dropped
                .swap(0, std::sync::atomic::Ordering::Relaxed);
            let b = pb::FlowBatch {
                node: node.clone(),
                records: std::mem::take(&mut batch),
                dropped,
            };
            let n = b.records.len() as u64;
            if let Err(unsent) = btx.send(b).await {
                // The stream is gone: these never left, and their drop count goes with the
                // next batch that does.
                shared.drop_flows(unsent.0.records.len() as u64);
                shared
                    .flows_dropped
                    .fetch_add(unsent.0.dropped, std::sync::atomic::Ordering::Relaxed);
                break;
            }
            sent += n;
        }
        drop(btx);
        match call.await {
            Ok(Ok(summary)) => {
                let lost = sent.saturating_sub(summary.into_inner().accepted);
                if lost > 0 {
                    shared.drop_flows(lost);
                }
            }
            // Sent, but whether they arrived is unknown: counted apart, not as dropped, so the
            // controller's and the agent's figures never count a record twice.
            _ => shared.metrics.flow_records_unconfirmed.inc_by(sent),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
