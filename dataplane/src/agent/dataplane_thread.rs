//! The thread that owns the enforcer, and the realizer that writes rule sets through it.

use std::sync::{Arc, Mutex, RwLock};

use anyhow::Context;
use bulkhead_ruleset::RuleSet;

use super::Shared;
use crate::{
    flows::FlowContext,
    loader::PrefilterHook,
    sync::{ApplyReport, Enforcer, RouteResolver},
};

pub(super) type ApplyResult = anyhow::Result<(ApplyReport, usize)>;

/// The thread that owns the enforcer: it lives in the node's network namespace (when there is
/// one), so attaching, interface lookups and route lookups see that namespace, while the rest
/// of the agent stays where it started.
pub(super) struct DataplaneThread {
    tx: std::sync::mpsc::Sender<Request>,
}

enum Request {
    Apply(Arc<RuleSet>, tokio::sync::oneshot::Sender<ApplyResult>),
    /// Whether an enforced endpoint's interface went away or was created again.
    InterfacesChanged(tokio::sync::oneshot::Sender<bool>),
}

impl DataplaneThread {
    pub(super) fn start(
        mut enforcer: Enforcer,
        netns: Option<String>,
        uplinks: Vec<String>,
        prefilter: Option<PrefilterHook>,
    ) -> anyhow::Result<DataplaneThread> {
        let (tx, rx) = std::sync::mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        std::thread::Builder::new()
            .name("dataplane".into())
            .spawn(move || {
                if let Some(name) = &netns {
                    let entered = crate::netns::enter(
                        &crate::netns::netns_path(name),
                        name,
                    )
                    .with_context(|| format!("enter network namespace {name}"));
                    let failed = entered.is_err();
                    let _ = ready_tx.send(entered);
                    if failed {
                        return;
                    }
                } else {
                    let _ = ready_tx.send(Ok(()));
                }
                // The prefilter is best effort: enforcement does not depend on it. Uplinks an
                // earlier agent prefiltered that are no longer asked for (or all, with
                // `--prefilter off`) lose it.
                let dp = enforcer.dataplane();
                for (ifname, hook) in dp.prefiltered_interfaces() {
                    if prefilter.is_none() || !uplinks.contains(&ifname) {
                        dp.detach_prefilter(&ifname);
                        tracing::info!(uplink = %ifname, %hook, "prefilter detached");
                    }
                }
                for uplink in uplinks.iter().filter(|_| prefilter.is_some()) {
                    let hook = prefilter.unwrap_or_default();
                    match dp.attach_prefilter(uplink, hook) {
                        Ok(()) => tracing::info!(uplink = %uplink, %hook, "prefilter attached"),
                        Err(e) => tracing::warn!(uplink = %uplink, %hook, error = %e, "prefilter not attached"),
                    }
                }
                for request in rx {
                    match request {
                        Request::Apply(rs, reply) => {
                            let result = enforcer
                                .apply(&rs, &RouteResolver)
                                .map(|report| (report, enforcer.policy_key_count()))
                                .map_err(anyhow::Error::from);
                            let _ = reply.send(result);
                        }
                        Request::InterfacesChanged(reply) => {
                            let _ = reply.send(enforcer.interfaces_changed());
                        }
                    }
                }
            })
            .context("start the data-plane thread")?;
        ready_rx.recv().context("data-plane thread")??;
        Ok(DataplaneThread { tx })
    }

    pub(super) async fn apply(&self, rs: Arc<RuleSet>) -> ApplyResult {
        let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Request::Apply(rs, reply_tx))
            .map_err(|_| anyhow::anyhow!("the data-plane thread is gone"))?;
        reply_rx.await.context("the data-plane thread is gone")?
    }

    /// False when the thread is gone (the next apply says so).
    pub(super) async fn interfaces_changed(&self) -> bool {
        let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Request::InterfacesChanged(reply_tx)).is_err() {
            return false;
        }
        reply_rx.await.unwrap_or(false)
    }

    pub(super) fn apply_blocking(&self, rs: Arc<RuleSet>) -> ApplyResult {
        let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Request::Apply(rs, reply_tx))
            .map_err(|_| anyhow::anyhow!("the data-plane thread is gone"))?;
        reply_rx
            .blocking_recv()
            .context("the data-plane thread is gone")?
    }
}

/// Writes rule sets into the kernel and keeps the metrics and flow naming in step.
pub(super) struct Realizer {
    pub(super) dataplane: DataplaneThread,
    /// The rule set last realized (for retries of missing interfaces).
    pub(super) last: Mutex<Option<Arc<RuleSet>>>,
    pub(super) shared: Arc<Shared>,
    pub(super) names: Arc<RwLock<Vec<(u32, String)>>>,
    pub(super) context: Arc<RwLock<FlowContext>>,
}

impl Realizer {
    pub(super) async fn realize(&self, rs: &Arc<RuleSet>) -> anyhow::Result<ApplyReport> {
        let result = self.dataplane.apply(rs.clone()).await;
        let m = &self.shared.metrics;
        match result {
            Ok((report, keys)) => {
                log_report(&report);
                m.apply_seconds.observe(report.duration.as_secs_f64());
                m.realized_version.set(report.version as i64);
                m.missing_interfaces
                    .set(report.missing_interfaces.len() as i64);
                m.endpoints_locked_down.set(report.locked_down.len() as i64);
                m.endpoints.set(rs.endpoints.len() as i64);
                m.policy_entries.set(keys as i64);
                if let Ok(mut n) = self.names.write() {
                    *n = rs.endpoints.iter().map(|e| (e.id, e.name())).collect();
                }
                if let Ok(mut c) = self.context.write() {
                    *c = FlowContext::new(rs);
                }
                Ok(report)
            }
            Err(e) => {
                m.apply_errors.inc();
                tracing::error!(error = %format!("{e:#}"), "apply failed; the previous rule set stays in force");
                Err(e)
            }
        }
    }
}

pub(super) fn log_report(r: &ApplyReport) {
    tracing::info!(
        version = r.version,
        endpoints_written = r.endpoints_written,
        endpoints_removed = r.endpoints_removed,
        policy_entries = r.policy_entries_written,
        groups_written = r.groups_written,
        connections_cut = r.connections_cut,
        apply_ms = r.duration.as_secs_f64() * 1e3,
        "rule set realized"
    );
    for m in &r.missing_interfaces {
        tracing::warn!(endpoint = %m, "interface not found yet; will retry");
    }
    for l in &r.locked_down {
        tracing::error!(endpoint = %l, "endpoint locked down: its policy group does not fit in the maps or is missing");
    }
}
