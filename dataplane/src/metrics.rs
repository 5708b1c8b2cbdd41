//! The agent's Prometheus metrics. Kernel counters are read from the pinned maps at scrape
//! time (per-CPU values summed), so a scrape always shows what the kernel counted, including
//! what an earlier agent process counted.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use aya::maps::{Map, MapData, PerCpuArray};
use bulkhead_common::{COUNTER_SLOTS, Counter, MAX_ENDPOINTS, fqdn::fqdn_stat, reason, stat};
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    core::{Collector, Desc},
    proto::MetricFamily,
};

/// Metrics the agent updates itself.
#[derive(Clone)]
pub struct AgentMetrics {
    pub registry: Registry,
    pub realized_version: IntGauge,
    pub apply_seconds: Histogram,
    pub apply_errors: IntCounter,
    pub endpoints: IntGauge,
    pub endpoints_locked_down: IntGauge,
    pub missing_interfaces: IntGauge,
    pub policy_entries: IntGauge,
    pub flow_records: IntCounterVec,
    pub malformed_events: IntCounter,
    pub controller_connected: IntGauge,
    /// Flow records not sent to the controller (queue full or stream down); the count travels
    /// with the next batch that gets through.
    pub flow_records_dropped: IntCounter,
    /// Flow records sent on a stream that broke before the controller confirmed them: they may
    /// or may not have arrived.
    pub flow_records_unconfirmed: IntCounter,
    /// Connections to the agent's HTTP endpoint closed on accept: too many were open.
    pub http_connections_refused: IntCounter,
    /// Name patterns in the kernel (egress by domain name).
    pub fqdn_names: IntGauge,
    /// Resolvers whose answers teach addresses.
    pub fqdn_trusted_resolvers: IntGauge,
    /// (endpoint, address) entries learned from DNS answers, by family, at the last sweep.
    pub fqdn_learned: IntGaugeVec,
    /// Learned (endpoint, address, name) entries whose TTL ran out and that the sweep cleared.
    pub fqdn_expired: IntCounter,
    /// Sweeps that failed (retried every second).
    pub fqdn_sweep_errors: IntCounter,
}

impl AgentMetrics {
    /// `pin_dir` is the node's pin directory; `names` maps endpoint ids to `namespace/pod`.
    pub fn new(pin_dir: &Path, names: Arc<RwLock<Vec<(u32, String)>>>) -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("bulkhead_agent".into()), None)?;
        let realized_version = IntGauge::new(
            "realized_version",
            "Version of the rule set realized in the kernel",
        )?;
        let apply_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "apply_duration_seconds",
                "Time to write a rule set into the maps",
            )
            .buckets(prometheus::exponential_buckets(0.0001, 2.0, 18)?),
        )?;
        let apply_errors = IntCounter::new(
            "apply_errors_total",
            "Rule sets that could not be applied (the previous one stayed in force)",
        )?;
        let endpoints = IntGauge::new("endpoints", "Endpoints enforced on this node")?;
        let endpoints_locked_down = IntGauge::new(
            "endpoints_locked_down",
            "Endpoints locked down (deny all) because their policy did not fit in the maps",
        )?;
        let missing_interfaces = IntGauge::new(
            "missing_interfaces",
            "Endpoints whose interface was not found (retried)",
        )?;
        let policy_entries = IntGauge::new(
            "policy_map_entries",
            "Keys this agent wrote into the POLICY map",
        )?;
        let flow_records = IntCounterVec::new(
            Opts::new(
                "flow_records_total",
                "Flow records read from the kernel, by verdict",
            ),
            &["verdict"],
        )?;
        let malformed_events = IntCounter::new(
            "malformed_events_total",
            "Ring-buffer records too short to decode",
        )?;
        let flow_records_dropped = IntCounter::new(
            "flow_records_dropped_total",
            "Flow records not sent to the controller (queue full or controller away); reported to it with the next batch",
        )?;
        let flow_records_unconfirmed = IntCounter::new(
            "flow_records_unconfirmed_total",
            "Flow records sent on a stream that broke before the controller confirmed them",
        )?;
        let http_connections_refused = IntCounter::new(
            "http_connections_refused_total",
            "Connections to the agent's HTTP endpoint closed on accept because too many were open",
        )?;
        let fqdn_names = IntGauge::new(
            "fqdn_names",
            "DNS name patterns policies allow egress to, in the kernel",
        )?;
        let fqdn_trusted_resolvers = IntGauge::new(
            "fqdn_trusted_resolvers",
            "DNS resolvers whose answers teach the addresses of those names",
        )?;
        let fqdn_learned = IntGaugeVec::new(
            Opts::new(
                "fqdn_learned_addresses",
                "Addresses endpoints learned from DNS answers (one per endpoint and address), by family",
            ),
            &["family"],
        )?;
        let fqdn_expired = IntCounter::new(
            "fqdn_expired_total",
            "Learned (endpoint, address, name) entries cleared because their TTL ran out",
        )?;
        let fqdn_sweep_errors = IntCounter::new(
            "fqdn_sweep_errors_total",
            "Sweeps of learned addresses that failed (retried every second)",
        )?;
        let controller_connected = IntGauge::new(
            "controller_connected",
            "1 while the controller stream is up; 0 means the last rule set stays enforced",
        )?;
        for c in [
            Box::new(realized_version.clone()) as Box<dyn Collector>,
            Box::new(apply_seconds.clone()),
            Box::new(apply_errors.clone()),
            Box::new(endpoints.clone()),
            Box::new(endpoints_locked_down.clone()),
            Box::new(missing_interfaces.clone()),
            Box::new(policy_entries.clone()),
            Box::new(flow_records.clone()),
            Box::new(malformed_events.clone()),
            Box::new(controller_connected.clone()),
            Box::new(flow_records_dropped.clone()),
            Box::new(flow_records_unconfirmed.clone()),
            Box::new(http_connections_refused.clone()),
            Box::new(fqdn_names.clone()),
            Box::new(fqdn_trusted_resolvers.clone()),
            Box::new(fqdn_learned.clone()),
            Box::new(fqdn_expired.clone()),
            Box::new(fqdn_sweep_errors.clone()),
            Box::new(KernelCounters::new(pin_dir, names)?),
        ] {
            registry.register(c)?;
        }
        Ok(AgentMetrics {
            registry,
            realized_version,
            apply_seconds,
            apply_errors,
            endpoints,
            endpoints_locked_down,
            missing_interfaces,
            policy_entries,
            flow_records,
            malformed_events,
            controller_connected,
            flow_records_dropped,
            flow_records_unconfirmed,
            http_connections_refused,
            fqdn_names,
            fqdn_trusted_resolvers,
            fqdn_learned,
            fqdn_expired,
            fqdn_sweep_errors,
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = String::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode_utf8(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        buf
    }
}

/// Reads `COUNTERS`, `STATS` and map pressure from the pinned maps at each scrape.
struct KernelCounters {
    maps: PathBuf,
    names: Arc<RwLock<Vec<(u32, String)>>>,
    descs: Vec<Desc>,
}

impl KernelCounters {
    fn new(pin_dir: &Path, names: Arc<RwLock<Vec<(u32, String)>>>) -> prometheus::Result<Self> {
        let desc = |name: &str, help: &str, labels: &[&str]| {
            Desc::new(
                name.to_string(),
                help.to_string(),
                labels.iter().map(|l| l.to_string()).collect(),
                Default::default(),
            )
        };
        let descs = vec![
            desc(
                "packets_total",
                "Packets by endpoint and reason (verdict or drop reason)",
                &["endpoint", "reason"],
            )?,
            desc(
                "bytes_total",
                "Bytes by endpoint and reason",
                &["endpoint", "reason"],
            )?,
            desc(
                "kernel_events_total",
                "Kernel-side event accounting",
                &["kind"],
            )?,
            desc(
                "fqdn_answers_total",
                "Learning from DNS answers (kernel counters of FQDN_STATS), by kind",
                &["kind"],
            )?,
            desc(
                "map_capacity",
                "Capacity (max entries) of a BPF map",
                &["map"],
            )?,
        ];
        Ok(KernelCounters {
            maps: pin_dir.join("maps"),
            names,
            descs,
        })
    }

    fn per_cpu<V: aya::Pod>(&self, name: &str) -> Option<PerCpuArray<MapData, V>> {
        let data = MapData::from_pin(self.maps.join(name)).ok()?;
        let map = Map::from_map_data(data).ok()?;
        PerCpuArray::try_from(map).ok()
    }

    fn capacity(&self, name: &str) -> Option<u64> {
        let data = MapData::from_pin(self.maps.join(name)).ok()?;
        Some(data.info().ok()?.max_entries() as u64)
    }
}

impl Collector for KernelCounters {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut out = Vec::new();
        let packets = IntCounterVec::new(
            Opts::new(
                "packets_total",
                "Packets by endpoint and reason (verdict or drop reason)",
            ),
            &["endpoint", "reason"],
        );
        let bytes = IntCounterVec::new(
            Opts::new("bytes_total", "Bytes by endpoint and reason"),
            &["endpoint", "reason"],
        );
        let stats = IntCounterVec::new(
            Opts::new(
                "kernel_events_total",
                "Kernel-side event accounting: lost ring-buffer events, rate-limited deny events, failed conntrack inserts",
            ),
            &["kind"],
        );
        let fqdn = IntCounterVec::new(
            Opts::new(
                "fqdn_answers_total",
                "Learning from DNS answers (kernel counters of FQDN_STATS), by kind",
            ),
            &["kind"],
        );
        let pressure = IntGaugeVec::new(
            Opts::new("map_capacity", "Capacity (max entries) of a BPF map"),
            &["map"],
        );
        let (Ok(packets), Ok(bytes), Ok(stats), Ok(fqdn), Ok(pressure)) =
            (packets, bytes, stats, fqdn, pressure)
        else {
            return out;
        };
        let names = self.names.read().map(|n| n.clone()).unwrap_or_default();
        if let Some(counters) = self.per_cpu::<Counter>("COUNTERS") {
            let mut rows: Vec<(u32, String)> = names;
            rows.push((MAX_ENDPOINTS, "(node)".into()));
            for (id, name) in rows {
                for why in 0..reason::COUNT {
                    let slot = id.min(MAX_ENDPOINTS) * reason::COUNT + why;
                    if slot >= COUNTER_SLOTS {
                        continue;
                    }
                    let Ok(values) = counters.get(&slot, 0) else {
                        continue;
                    };
                    let (p, b) = values
                        .iter()
                        .fold((0u64, 0u64), |(p, b), c| (p + c.packets, b + c.bytes));
                    if p == 0 {
                        continue;
                    }
                    let labels = [name.as_str(), reason::NAMES[why as usize]];
                    packets.with_label_values(&labels).inc_by(p);
                    bytes.with_label_values(&labels).inc_by(b);
                }
            }
        }
        if let Some(s) = self.per_cpu::<u64>("STATS") {
            for (idx, kind) in [
                (stat::EVENTS_LOST, "events_lost"),
                (stat::EVENTS_RATE_LIMITED, "deny_events_rate_limited"),
                (stat::CT_INSERT_FAILED, "conntrack_insert_failed"),
                (stat::NAME_LOOKUPS, "learned_name_lookups"),
                (stat::NAME_DECISIONS, "learned_name_decisions"),
            ] {
                let v: u64 = s.get(&idx, 0).map(|v| v.iter().sum()).unwrap_or(0);
                stats.with_label_values(&[kind]).inc_by(v);
            }
        }
        if let Some(s) = self.per_cpu::<u64>(crate::fqdn::MAP_STATS) {
            for (idx, kind) in fqdn_stat::NAMES.iter().enumerate() {
                let v: u64 = s.get(&(idx as u32), 0).map(|v| v.iter().sum()).unwrap_or(0);
                fqdn.with_label_values(&[kind]).inc_by(v);
            }
        }
        for map in [
            "POLICY",
            "IPCACHE_V4",
            "IPCACHE_V6",
            "IPCACHE_DENSE_V4",
            "CONNTRACK",
            "CONNTRACK_V4",
            "ENDPOINTS",
            "FQDN_LEARNED_V4",
            "FQDN_LEARNED_V6",
        ] {
            if let Some(max) = self.capacity(map) {
                pressure.with_label_values(&[map]).set(max as i64);
            }
        }
        out.extend(packets.collect());
        out.extend(bytes.collect());
        out.extend(stats.collect());
        out.extend(fqdn.collect());
        out.extend(pressure.collect());
        out
    }
}
