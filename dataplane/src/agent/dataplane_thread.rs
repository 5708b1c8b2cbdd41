//! The thread that owns the enforcer, and the realizer that writes rule sets through it.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, RwLock},
};

use anyhow::Context;
use bulkhead_ruleset::{NamePattern, RuleSet};

use super::{
    Shared,
    names::{FqdnSettings, NameSync, NameSyncReport, SweepReport},
};
use crate::{
    flows::FlowContext,
    fqdn::monotonic_now_ns,
    loader::PrefilterHook,
    sync::{ApplyReport, Enforcer, RouteResolver},
};

/// A rule set in the kernel: its policy and endpoints, and its names and resolvers.
pub(super) struct Applied {
    pub(super) report: ApplyReport,
    /// Keys this agent has in the policy maps.
    pub(super) policy_keys: usize,
    pub(super) names: NameSyncReport,
}

pub(super) type ApplyResult = anyhow::Result<Applied>;

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
    /// Clear the learned addresses whose TTL ran out.
    Sweep(tokio::sync::oneshot::Sender<anyhow::Result<SweepReport>>),
}

impl DataplaneThread {
    pub(super) fn start(
        mut enforcer: Enforcer,
        netns: Option<String>,
        uplinks: Vec<String>,
        prefilter: Option<PrefilterHook>,
        fqdn: FqdnSettings,
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
                    if let Err(e) = entered {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                }
                // Learning is on before the first rule set, with the secret an earlier agent
                // drew (the names in the pinned maps were hashed with it).
                let mut names = match NameSync::start(enforcer.dataplane(), fqdn)
                    .context("configure learning from DNS answers")
                {
                    Ok(n) => {
                        let _ = ready_tx.send(Ok(()));
                        n
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
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
                            // The version is acked only once its names are in the kernel too.
                            let result = enforcer
                                .apply(&rs, &RouteResolver)
                                .map_err(anyhow::Error::from)
                                .and_then(|report| {
                                    let policy_keys = enforcer.policy_key_count();
                                    let names = names
                                        .sync(enforcer.dataplane(), &rs)
                                        .context("write the rule set's names and resolvers")?;
                                    Ok(Applied {
                                        report,
                                        policy_keys,
                                        names,
                                    })
                                });
                            let _ = reply.send(result);
                        }
                        Request::Sweep(reply) => {
                            let result = names
                                .sweep(enforcer.dataplane(), monotonic_now_ns())
                                .context("expire learned addresses");
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

    pub(super) async fn sweep(&self) -> anyhow::Result<SweepReport> {
        let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Request::Sweep(reply_tx))
            .map_err(|_| anyhow::anyhow!("the data-plane thread is gone"))?;
        reply_rx.await.context("the data-plane thread is gone")?
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
    /// The patterns of the realized rule set's name ids (for the sweep's log).
    pub(super) name_patterns: RwLock<BTreeMap<u32, NamePattern>>,
}

impl Realizer {
    pub(super) async fn realize(&self, rs: &Arc<RuleSet>) -> anyhow::Result<ApplyReport> {
        let result = self.dataplane.apply(rs.clone()).await;
        let m = &self.shared.metrics;
        match result {
            Ok(Applied {
                report,
                policy_keys: keys,
                names,
            }) => {
                log_report(&report);
                log_names(&names);
                m.fqdn_names.set(names.names as i64);
                m.fqdn_trusted_resolvers.set(names.resolvers as i64);
                if let Ok(mut p) = self.name_patterns.write() {
                    *p = rs
                        .names
                        .iter()
                        .map(|n| (n.identity, n.pattern.clone()))
                        .collect();
                }
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

impl Realizer {
    /// Clears what the endpoints learned and whose TTL ran out; logs and counts it.
    pub(super) async fn sweep(&self) {
        let m = &self.shared.metrics;
        let report = match self.dataplane.sweep().await {
            Ok(r) => r,
            Err(e) => {
                m.fqdn_sweep_errors.inc();
                tracing::warn!(error = %format!("{e:#}"), "learned addresses not swept; retried in a second");
                return;
            }
        };
        m.fqdn_learned
            .with_label_values(&["ipv4"])
            .set(report.learned_v4 as i64);
        m.fqdn_learned
            .with_label_values(&["ipv6"])
            .set(report.learned_v6 as i64);
        m.fqdn_expired.inc_by(report.expired.len() as u64);
        if report.expired.is_empty() || !tracing::enabled!(tracing::Level::DEBUG) {
            return;
        }
        let endpoints = self.names.read().map(|n| n.clone()).unwrap_or_default();
        let patterns = self.name_patterns.read();
        for x in &report.expired {
            let endpoint = endpoints
                .iter()
                .find(|(id, _)| *id == x.endpoint_id)
                .map_or_else(|| format!("#{}", x.endpoint_id), |(_, n)| n.clone());
            let pattern = patterns
                .as_ref()
                .ok()
                .and_then(|p| p.get(&x.name_id).map(ToString::to_string))
                .unwrap_or_else(|| "-".into());
            tracing::debug!(
                %endpoint, addr = %x.addr, name_id = x.name_id, name = %pattern,
                "learned address expired"
            );
        }
    }
}

pub(super) fn log_names(r: &NameSyncReport) {
    if r.names_written
        + r.names_removed
        + r.learned_forgotten
        + r.resolvers_added
        + r.resolvers_removed
        == 0
    {
        return;
    }
    tracing::info!(
        names = r.names,
        names_written = r.names_written,
        names_removed = r.names_removed,
        learned_forgotten = r.learned_forgotten,
        resolvers = r.resolvers,
        resolvers_added = r.resolvers_added,
        resolvers_removed = r.resolvers_removed,
        "names and trusted resolvers synced"
    );
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
