//! The controller's Prometheus metrics (`/metrics` on `--metrics`), brought up to the hub's,
//! the flow store's, the graph's and the Kubernetes source's own counters at each scrape.

use std::sync::{Mutex, atomic::Ordering};

use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::{
    distribution::{FlowStore, Hub},
    flows::{FlowPipeline, ServiceGraph},
    peering::{PeerState, PeerStates},
    supervise::TaskRestarts,
};

pub(super) struct ControllerMetrics {
    registry: Registry,
    agents_connected: IntGauge,
    nodes: IntGauge,
    deltas_sent: IntGauge,
    resyncs: IntGauge,
    snapshots: IntGauge,
    pub(super) input_errors: IntCounter,
    policy_nodes: IntGaugeVec,
    policy_realized: IntGaugeVec,
    flows_stored: IntGauge,
    flows_evicted: IntGauge,
    flows_accepted: IntGauge,
    flows_dropped_by_agents: IntGauge,
    history_written: IntGauge,
    history_dropped: IntGaugeVec,
    history_bytes: IntGauge,
    flows_by_verdict: IntCounterVec,
    flows_by_namespace_pair: IntCounterVec,
    drops_by_rule: IntCounterVec,
    staged_would_deny: IntCounterVec,
    graph_nodes: IntGauge,
    graph_edges: IntGauge,
    kubernetes_source: IntCounterVec,
    flows_rejected: IntCounterVec,
    graph_edges_refused: IntGauge,
    acks_refused: IntGauge,
    unknown_nodes: IntGauge,
    task_restarts: IntCounterVec,
    peer_state: IntGaugeVec,
    peer_last_update_age: GaugeVec,
    peer_pods: IntGaugeVec,
    peer_updates: IntCounterVec,
    /// Connections to the HTTP endpoint closed on accept: too many were open.
    pub(super) http_connections_refused: IntCounter,
}

impl ControllerMetrics {
    pub(super) fn new() -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("bulkhead_controller".into()), None)?;
        let g = |name: &str, help: &str| IntGauge::new(name, help);
        let m = ControllerMetrics {
            agents_connected: g(
                "agents_connected",
                "Nodes with at least one agent stream open",
            )?,
            nodes: g("nodes", "Nodes with a rule set")?,
            deltas_sent: g("deltas_sent_total", "Deltas queued to agent streams")?,
            resyncs: g(
                "resyncs_total",
                "Agent streams cut loose because they fell behind (they resync with a snapshot)",
            )?,
            snapshots: g("snapshots_total", "Full snapshots sent")?,
            input_errors: IntCounter::new("input_errors_total", "Invalid manifest documents seen")?,
            policy_nodes: IntGaugeVec::new(
                Opts::new("policy_nodes", "Nodes whose rule set a policy concerns"),
                &["kind", "namespace", "name"],
            )?,
            policy_realized: IntGaugeVec::new(
                Opts::new(
                    "policy_realized_nodes",
                    "Of those, nodes whose agent acked the current version",
                ),
                &["kind", "namespace", "name"],
            )?,
            flows_stored: g("flows_stored", "Flow records in the store")?,
            flows_evicted: g("flows_evicted_total", "Flow records evicted from the store")?,
            flows_accepted: g("flows_accepted_total", "Flow records received from agents")?,
            flows_dropped_by_agents: g(
                "flows_dropped_by_agents_total",
                "Flow records agents dropped before sending (backpressure)",
            )?,
            history_written: g(
                "flow_history_records_written_total",
                "Flow records written to the flow history on disk",
            )?,
            history_dropped: IntGaugeVec::new(
                Opts::new(
                    "flow_history_records_dropped_total",
                    "Flow records not in the flow history: backlog (the writer was behind), write_error, age and size (dropped by retention, oldest first)",
                ),
                &["reason"],
            )?,
            history_bytes: g(
                "flow_history_bytes",
                "Bytes of the flow history database in use",
            )?,
            flows_by_verdict: IntCounterVec::new(
                Opts::new(
                    "flows_total",
                    "Flow records folded into the service graph, by verdict",
                ),
                &["verdict"],
            )?,
            flows_by_namespace_pair: IntCounterVec::new(
                Opts::new(
                    "namespace_pair_flows_total",
                    "Connections counted in the graph, by source and destination namespace and verdict",
                ),
                &["src_namespace", "dst_namespace", "verdict"],
            )?,
            drops_by_rule: IntCounterVec::new(
                Opts::new(
                    "drops_by_rule_total",
                    "Denied flows by the rule that denied them",
                ),
                &["rule"],
            )?,
            staged_would_deny: IntCounterVec::new(
                Opts::new(
                    "staged_would_deny_total",
                    "Flows allowed now that the staged policies would deny, by the staged policy whose rule would deny them",
                ),
                &["policy"],
            )?,
            graph_nodes: g("graph_nodes", "Workloads in the service graph")?,
            graph_edges: g("graph_edges", "Edges in the service graph")?,
            kubernetes_source: IntCounterVec::new(
                Opts::new(
                    "kubernetes_source_total",
                    "What the Kubernetes source did: watch events handled, model changes applied, hub updates, watch errors (each retried; 410 Gone re-lists), status patches written and refused, Events published, changes of the cluster DNS Service's cluster IPs",
                ),
                &["what"],
            )?,
            flows_rejected: IntCounterVec::new(
                Opts::new(
                    "flow_records_rejected_total",
                    "Flow records refused at ingest (an unknown verdict, kind or direction, an address that is no IP, a name or text over its limit), by reason; neither stored nor drawn",
                ),
                &["reason"],
            )?,
            graph_edges_refused: g(
                "graph_edges_refused_total",
                "Records not drawn because the service graph holds its maximum of edges",
            )?,
            acks_refused: g(
                "acks_refused_total",
                "Agent acks refused for naming a version their stream was not sent (the stream is closed)",
            )?,
            unknown_nodes: g(
                "unknown_nodes_total",
                "Agent streams (Sync and flow reports) refused for naming a node the inventory does not have",
            )?,
            task_restarts: IntCounterVec::new(
                Opts::new(
                    "task_restarts_total",
                    "Background tasks (Kubernetes source and status writer, manifest reload, quarantine expiry, graph TTL) restarted after they panicked or stopped, by task",
                ),
                &["task"],
            )?,
            peer_state: IntGaugeVec::new(
                Opts::new(
                    "peer_state",
                    "Each peer cluster's import state: 1 for the current one (connecting, synced, disconnected, refused), 0 for the others",
                ),
                &["peer", "state"],
            )?,
            peer_last_update_age: GaugeVec::new(
                Opts::new(
                    "peer_last_update_age_seconds",
                    "Seconds since the last snapshot or delta from a peer cluster was applied (absent before the first)",
                ),
                &["peer"],
            )?,
            peer_pods: IntGaugeVec::new(
                Opts::new(
                    "peer_pods",
                    "Pods imported from a peer cluster and in force (its last good inventory)",
                ),
                &["peer"],
            )?,
            peer_updates: IntCounterVec::new(
                Opts::new(
                    "peer_updates_total",
                    "Snapshots and deltas from a peer cluster applied",
                ),
                &["peer"],
            )?,
            http_connections_refused: IntCounter::new(
                "http_connections_refused_total",
                "Connections to the HTTP endpoint (API, web UI, metrics) closed on accept because too many were open",
            )?,
            registry,
        };
        for c in [
            Box::new(m.agents_connected.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.nodes.clone()),
            Box::new(m.deltas_sent.clone()),
            Box::new(m.resyncs.clone()),
            Box::new(m.snapshots.clone()),
            Box::new(m.input_errors.clone()),
            Box::new(m.policy_nodes.clone()),
            Box::new(m.policy_realized.clone()),
            Box::new(m.flows_stored.clone()),
            Box::new(m.flows_evicted.clone()),
            Box::new(m.flows_accepted.clone()),
            Box::new(m.flows_dropped_by_agents.clone()),
            Box::new(m.history_written.clone()),
            Box::new(m.history_dropped.clone()),
            Box::new(m.history_bytes.clone()),
            Box::new(m.flows_by_verdict.clone()),
            Box::new(m.flows_by_namespace_pair.clone()),
            Box::new(m.drops_by_rule.clone()),
            Box::new(m.staged_would_deny.clone()),
            Box::new(m.flows_rejected.clone()),
            Box::new(m.graph_edges_refused.clone()),
            Box::new(m.acks_refused.clone()),
            Box::new(m.unknown_nodes.clone()),
            Box::new(m.graph_nodes.clone()),
            Box::new(m.graph_edges.clone()),
            Box::new(m.kubernetes_source.clone()),
            Box::new(m.task_restarts.clone()),
            Box::new(m.http_connections_refused.clone()),
            Box::new(m.peer_state.clone()),
            Box::new(m.peer_last_update_age.clone()),
            Box::new(m.peer_pods.clone()),
            Box::new(m.peer_updates.clone()),
        ] {
            m.registry.register(c)?;
        }
        Ok(m)
    }

    /// Brings the Kubernetes source's counters up to its own.
    pub(super) fn sync_kubernetes_counters(&self, stats: &crate::kubernetes::SourceStats) {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        for (what, n) in [
            ("watch_events", load(&stats.events)),
            ("changes", load(&stats.changes)),
            ("applies", load(&stats.applies)),
            ("watch_errors", load(&stats.watch_errors)),
            ("status_writes", load(&stats.status_writes)),
            ("status_errors", load(&stats.status_errors)),
            ("events_published", load(&stats.events_published)),
            ("cluster_dns_updates", load(&stats.cluster_dns_updates)),
        ] {
            let c = self.kubernetes_source.with_label_values(&[what]);
            c.inc_by(n.saturating_sub(c.get()));
        }
    }

    /// Brings the peer metrics up to the importers' states.
    pub(super) fn sync_peers(&self, peers: &PeerStates, now: std::time::SystemTime) {
        for p in peers.all() {
            let name = p.name.as_str();
            for state in PeerState::ALL {
                self.peer_state
                    .with_label_values(&[name, state.as_str()])
                    .set((state == p.state) as i64);
            }
            match p.age(now) {
                Some(age) => self
                    .peer_last_update_age
                    .with_label_values(&[name])
                    .set(age.as_secs_f64()),
                None => {
                    let _ = self.peer_last_update_age.remove_label_values(&[name]);
                }
            }
            self.peer_pods.with_label_values(&[name]).set(p.pods as i64);
            let c = self.peer_updates.with_label_values(&[name]);
            c.inc_by(p.updates.saturating_sub(c.get()));
        }
    }

    /// Brings the restart counters up to the supervisor's.
    pub(super) fn sync_task_restarts(&self, restarts: &TaskRestarts) {
        for (task, n) in restarts.all() {
            let c = self.task_restarts.with_label_values(&[task]);
            c.inc_by(n.saturating_sub(c.get()));
        }
    }

    /// Brings the flow counters up to the graph's (which counts every record as it is folded
    /// in, so the ingest path never touches a label set).
    pub(super) fn sync_flow_counters(&self, graph: &Mutex<ServiceGraph>, pipeline: &FlowPipeline) {
        let catch_up = |c: IntCounter, total: u64| c.inc_by(total.saturating_sub(c.get()));
        for (why, n) in pipeline.rejected() {
            catch_up(self.flows_rejected.with_label_values(&[why.label()]), n);
        }
        let Ok(g) = graph.lock() else { return };
        self.graph_edges_refused.set(g.edges_refused as i64);
        for (verdict, n) in g.by_verdict() {
            catch_up(self.flows_by_verdict.with_label_values(&[verdict]), n);
        }
        for ((src, dst, verdict), n) in g.by_namespace_pair() {
            catch_up(
                self.flows_by_namespace_pair
                    .with_label_values(&[src, dst, verdict]),
                n,
            );
        }
        for (rule, n) in g.drops_by_rule() {
            catch_up(self.drops_by_rule.with_label_values(&[rule]), n);
        }
        for (policy, n) in g.staged_denies() {
            catch_up(self.staged_would_deny.with_label_values(&[policy]), n);
        }
        let (nodes, edges) = g.len();
        self.graph_nodes.set(nodes as i64);
        self.graph_edges.set(edges as i64);
    }

    pub(super) fn render(&self, hub: &Hub, flows: &Mutex<FlowStore>) -> String {
        let nodes = hub.node_states();
        self.nodes.set(nodes.len() as i64);
        self.agents_connected
            .set(nodes.iter().filter(|n| n.connected).count() as i64);
        self.deltas_sent
            .set(hub.counters.deltas_sent.load(Ordering::Relaxed) as i64);
        self.resyncs
            .set(hub.counters.resyncs.load(Ordering::Relaxed) as i64);
        self.snapshots
            .set(hub.counters.snapshots.load(Ordering::Relaxed) as i64);
        self.acks_refused
            .set(hub.counters.acks_refused.load(Ordering::Relaxed) as i64);
        self.unknown_nodes
            .set(hub.counters.unknown_nodes.load(Ordering::Relaxed) as i64);
        self.policy_nodes.reset();
        self.policy_realized.reset();
        for p in hub.policy_status() {
            let kind = p.kind.as_str();
            let labels = [kind, p.namespace.as_str(), p.name.as_str()];
            self.policy_nodes
                .with_label_values(&labels)
                .set(p.nodes as i64);
            self.policy_realized
                .with_label_values(&labels)
                .set(p.realized as i64);
        }
        if let Ok(f) = flows.lock() {
            self.flows_stored.set(f.len() as i64);
            self.flows_evicted.set(f.evicted as i64);
            self.flows_accepted.set(f.accepted as i64);
            self.flows_dropped_by_agents.set(f.dropped_by_agents as i64);
            if let Some(h) = f.history() {
                let st = h.stats();
                self.history_written.set(st.written as i64);
                for (reason, n) in [
                    ("backlog", st.dropped_backlog),
                    ("write_error", st.dropped_write_errors),
                    ("age", st.expired_age),
                    ("size", st.expired_size),
                ] {
                    self.history_dropped
                        .with_label_values(&[reason])
                        .set(n as i64);
                }
                self.history_bytes.set(st.bytes as i64);
            }
        }
        let mut buf = String::new();
        if let Err(e) =
            prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut buf)
        {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        buf
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    #[test]
    fn peer_states_map_to_metrics() {
        let m = ControllerMetrics::new().unwrap();
        let peers = PeerStates::default();
        peers.add("west".parse().unwrap(), "https://w:9964".into());
        peers.add("north".parse().unwrap(), "https://n:9964".into());
        let now = SystemTime::now();
        peers.update(&"west".parse().unwrap(), |s| {
            s.state = PeerState::Refused;
            s.last_update = Some(now - Duration::from_secs(42));
            s.pods = 7;
            s.updates = 3;
        });
        m.sync_peers(&peers, now);
        let text = {
            let mut buf = String::new();
            prometheus::TextEncoder::new()
                .encode_utf8(&m.registry.gather(), &mut buf)
                .unwrap();
            buf
        };
        for line in [
            "bulkhead_controller_peer_state{peer=\"west\",state=\"refused\"} 1",
            "bulkhead_controller_peer_state{peer=\"west\",state=\"synced\"} 0",
            "bulkhead_controller_peer_state{peer=\"north\",state=\"connecting\"} 1",
            "bulkhead_controller_peer_last_update_age_seconds{peer=\"west\"} 42",
            "bulkhead_controller_peer_pods{peer=\"west\"} 7",
            "bulkhead_controller_peer_updates_total{peer=\"west\"} 3",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(!text.contains("peer_last_update_age_seconds{peer=\"north\"}"));
    }
}
