//! The Kubernetes source: one watcher per kind (kube-runtime, list then watch, re-list after
//! `410 Gone` or any watch error with backoff) of the kind's own type, every object converted
//! as it arrives ([`super::watched`], the manifest loader's conversion) into the [`Inventory`], and what changed applied to the [`Hub`] — quarantines first, with
//! priority delivery, exactly as `bulkhead quarantine` does. A status task writes each
//! ServicePolicy's and Quarantine's status and publishes Events for rejected policies, and for
//! each Quarantine whose `expiresAt` passed logs an `expire` audit line and publishes an
//! `Expired` Event, once (when its `Realized` condition turns `Expired`). The status task runs
//! supervised ([`crate::supervise`]): if it dies it is restarted with backoff and counted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::{FutureExt, StreamExt, stream::BoxStream};
use k8s_openapi::api::core::v1::{Namespace, Node, ObjectReference, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use serde_json::Value;
use tokio::sync::Notify;

use super::cluster_dns::{self, ClusterDnsState};
use super::crd::{
    CNP_GROUP, ClusterNetworkPolicy, CnpVersion, Quarantine, ServicePolicy,
    StagedClusterNetworkPolicy, StagedNetworkPolicy,
};
use super::inventory::{ApiKey, Changes, Entry, Inventory, Kind};
use super::leader::Leadership;
use super::status::{self, EVENT_NOTE_MAX, Enforcement, FIELD_MANAGER};
use super::watched::{Checked, ServedVersion, WatchedKind};
use crate::distribution::Hub;
use crate::ruleset::RuleKind;
use crate::supervise::{Backoff, TaskRestarts, spawn_supervised};
use crate::{Change, Object, PolicyKey};

/// Whether this controller may serve agents and write to the API: it has listed everything
/// once, and it holds the leader lease (or runs without leader election).
#[derive(Debug)]
pub struct Gate {
    synced: AtomicBool,
    leadership: Option<Arc<Leadership>>,
}

impl Gate {
    pub fn new(leadership: Option<Arc<Leadership>>) -> Gate {
        Gate {
            synced: AtomicBool::new(false),
            leadership,
        }
    }

    /// A gate that is always open (manifest source, no election).
    pub fn open() -> Gate {
        let g = Gate::new(None);
        g.synced.store(true, Ordering::SeqCst);
        g
    }

    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::SeqCst);
    }

    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    /// This replica leads (or nobody is elected).
    pub fn leads(&self) -> bool {
        self.leadership.as_ref().is_none_or(|l| l.is_leader())
    }

    /// `Ok` when agents may be served; else why not, for a gRPC UNAVAILABLE.
    pub fn serving(&self) -> Result<(), String> {
        if let Some(l) = &self.leadership
            && !l.is_leader()
        {
            let leader = l.leader();
            return Err(format!(
                "not the leader (leader: {})",
                if leader.is_empty() {
                    "none yet"
                } else {
                    &leader
                }
            ));
        }
        if !self.synced() {
            return Err(
                "not ready: the first list of the cluster's objects is not complete".into(),
            );
        }
        Ok(())
    }

    /// `/readyz`: 200 only where agents should connect.
    pub fn ready(&self) -> bool {
        self.serving().is_ok()
    }

    /// A tonic interceptor for the distribution service: agents' calls pass only where rule
    /// sets are served; elsewhere they get UNAVAILABLE ("not the leader (leader: X)") and
    /// retry, reaching the leader through the Service (which routes by readiness).
    pub fn interceptor(
        self: &Arc<Self>,
    ) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone + use<>
    {
        let gate = self.clone();
        move |req| match gate.serving() {
            Ok(()) => Ok(req),
            Err(why) => Err(tonic::Status::unavailable(why)),
        }
    }
}

/// Counters of the source (tests and metrics read them).
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Watch events handled.
    pub events: AtomicU64,
    /// Watch events whose batch has been fully applied (rule sets, hub, these counters): once
    /// it reaches a value of `events`, everything those events caused has taken effect.
    pub settled: AtomicU64,
    /// Engine changes applied (each a real change of the model).
    pub changes: AtomicU64,
    /// Hub updates made (batches with at least one change).
    pub applies: AtomicU64,
    /// Watch errors (each followed by a retry, and after `410 Gone` by a re-list).
    pub watch_errors: AtomicU64,
    /// Status patches sent and refused.
    pub status_writes: AtomicU64,
    pub status_errors: AtomicU64,
    /// Events published for invalid objects.
    pub events_published: AtomicU64,
    /// Changes of the cluster DNS Service's cluster IPs handed to the engine
    /// ([`super::cluster_dns`]), whether or not the resolvers changed.
    pub cluster_dns_updates: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Who writes Events (the pod name in a cluster).
    pub identity: String,
    /// How often statuses are brought up to date when nothing else prompts it.
    pub status_interval: Duration,
    /// Watch each kind with these settings (page size, timeouts).
    pub watcher: watcher::Config,
    /// Where restarts of the source's supervised tasks are counted.
    pub restarts: Arc<TaskRestarts>,
    /// The waits between restarts of a supervised task that died.
    pub backoff: Backoff,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            identity: "bulkhead-controller".into(),
            status_interval: Duration::from_secs(2),
            watcher: watcher::Config::default(),
            restarts: Arc::default(),
            backoff: Backoff::default(),
        }
    }
}

/// The supervised tasks' names, as `task_restarts_total` labels them.
pub const STATUS_TASK: &str = "kubernetes_status";
pub const SOURCE_TASK: &str = "kubernetes_source";

/// Quarantine key → node → the first rule-set version of that node carrying it.
type Carried = BTreeMap<PolicyKey, BTreeMap<String, u64>>;

/// Feeds the hub from the Kubernetes API.
pub struct KubernetesSource {
    client: Client,
    hub: Arc<Hub>,
    gate: Arc<Gate>,
    options: SourceOptions,
    inventory: Arc<Mutex<Inventory>>,
    carried: Arc<Mutex<Carried>>,
    pub stats: Arc<SourceStats>,
    wake_status: Arc<Notify>,
    /// The version ClusterNetworkPolicies are watched at (the Events about them name it).
    cnp_version: Arc<Mutex<CnpVersion>>,
    /// The cluster DNS Service's addresses (trusted resolvers), kept across restarts.
    cluster_dns: Arc<Mutex<ClusterDnsState>>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn is_not_found(e: &watcher::Error) -> bool {
    let client_err = match e {
        watcher::Error::InitialListFailed(c) | watcher::Error::WatchStartFailed(c) => c,
        _ => return false,
    };
    matches!(client_err, kube::Error::Api(s) if s.code == 404)
}

type EntryEvents = BoxStream<'static, (Kind, Result<Event<Entry>, watcher::Error>)>;

/// Watches `K` (typed: each object is converted as it is decoded, see [`Checked`]).
fn watch<K: WatchedKind>(client: Client, config: watcher::Config) -> EntryEvents {
    watch_at::<K>(client, config, ServedVersion::default())
}

/// Watches `K` at `version` of its group.
fn watch_at<K: WatchedKind>(
    client: Client,
    config: watcher::Config,
    version: ServedVersion,
) -> EntryEvents {
    let api: Api<Checked<K>> = Api::all_with(client, &version);
    watcher::watcher(api, config)
        .default_backoff()
        .map(|e| {
            let event = e.map(|event| match event {
                Event::Apply(o) => Event::Apply(o.into_entry()),
                Event::Delete(o) => Event::Delete(o.into_entry()),
                Event::Init => Event::Init,
                Event::InitApply(o) => Event::InitApply(o.into_entry()),
                Event::InitDone => Event::InitDone,
            });
            (K::KIND, event)
        })
        .boxed()
}

/// Which version of [`CNP_GROUP`] serves ClusterNetworkPolicy in this cluster, the first of
/// [`CnpVersion::PREFERENCE`] whose resource list names `clusternetworkpolicies` (kube's
/// discovery of one group version); `None` if neither does (no network-policy-api CRD).
pub async fn served_cnp_version(client: &Client) -> Result<Option<CnpVersion>, kube::Error> {
    for version in CnpVersion::PREFERENCE {
        match client.list_api_group_resources(version.api_version()).await {
            Ok(list) => {
                if list
                    .resources
                    .iter()
                    .any(|r| r.name == Kind::ClusterNetworkPolicy.plural())
                {
                    return Ok(Some(version));
                }
            }
            // The group version is not served at all.
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// [`served_cnp_version`], asked again with backoff until the API server answers (the
/// ClusterNetworkPolicy watch, and so the first complete list, waits for it: the other kinds'
/// watches do not). Neither version served: the preferred one, whose watch then finds no API
/// and counts the kind as empty, as for any kind the cluster does not serve.
async fn discover_cnp_version(client: &Client) -> CnpVersion {
    let mut wait = Duration::from_millis(200);
    loop {
        match served_cnp_version(client).await {
            Ok(Some(version)) => {
                tracing::info!(
                    api_version = version.api_version(),
                    "watching ClusterNetworkPolicies at the version the cluster serves"
                );
                return version;
            }
            Ok(None) => {
                tracing::warn!(
                    "the cluster serves ClusterNetworkPolicy at neither {} nor {} (no network-policy-api CRD): treating them as empty",
                    CnpVersion::V1beta1.api_version(),
                    CnpVersion::V1alpha2.api_version()
                );
                return CnpVersion::PREFERENCE[0];
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?wait, "could not ask the API server which versions of {CNP_GROUP} it serves; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// The ClusterNetworkPolicy watch, at the version [`discover_cnp_version`] finds (recorded in
/// `watched` for the Events about these objects).
fn watch_cluster_network_policies(
    client: Client,
    config: watcher::Config,
    watched: Arc<Mutex<CnpVersion>>,
) -> EntryEvents {
    futures::stream::once(async move {
        let version = discover_cnp_version(&client).await;
        if let Ok(mut w) = watched.lock() {
            *w = version;
        }
        watch_at::<ClusterNetworkPolicy>(client, config, ServedVersion(Some(version.version())))
    })
    .flatten()
    .boxed()
}

/// One watch per kind the source reads.
fn watch_all(
    client: &Client,
    config: &watcher::Config,
    cnp_version: &Arc<Mutex<CnpVersion>>,
) -> Vec<EntryEvents> {
    Kind::ALL
        .iter()
        .map(|kind| {
            let (client, config) = (client.clone(), config.clone());
            match kind {
                Kind::Namespace => watch::<Namespace>(client, config),
                Kind::Node => watch::<Node>(client, config),
                Kind::Pod => watch::<Pod>(client, config),
                Kind::NetworkPolicy => watch::<NetworkPolicy>(client, config),
                Kind::ClusterNetworkPolicy => {
                    watch_cluster_network_policies(client, config, cnp_version.clone())
                }
                Kind::ServicePolicy => watch::<ServicePolicy>(client, config),
                Kind::Quarantine => watch::<Quarantine>(client, config),
                Kind::StagedNetworkPolicy => watch::<StagedNetworkPolicy>(client, config),
                Kind::StagedClusterNetworkPolicy => {
                    watch::<StagedClusterNetworkPolicy>(client, config)
                }
            }
        })
        .collect()
}

impl KubernetesSource {
    pub fn new(client: Client, hub: Arc<Hub>, gate: Arc<Gate>, options: SourceOptions) -> Self {
        KubernetesSource {
            client,
            hub,
            gate,
            options,
            inventory: Arc::default(),
            carried: Arc::default(),
            stats: Arc::default(),
            wake_status: Arc::default(),
            cnp_version: Arc::new(Mutex::new(CnpVersion::PREFERENCE[0])),
            cluster_dns: Arc::default(),
        }
    }

    pub fn stats(&self) -> Arc<SourceStats> {
        self.stats.clone()
    }

    /// Watches until the task is dropped. Never fails: API errors are retried with backoff
    /// and an invalid object only affects itself.
    pub async fn run(self) {
        self.watch().await
    }

    /// [`Self::run`] on a shared source, so that a supervisor can start it again with the
    /// inventory it had (the watches re-list, and the inventory diffs what changed meanwhile).
    pub async fn watch(&self) {
        // Ends with this task, also when it is aborted; restarted with backoff if it dies.
        let writer = StatusWriter::new(self);
        let _status_task = AbortOnDrop(spawn_supervised(
            STATUS_TASK,
            self.options.restarts.clone(),
            self.options.backoff,
            move || writer.clone().run(),
        ));
        let mut events = futures::stream::select_all(watch_all(
            &self.client,
            &self.options.watcher,
            &self.cnp_version,
        ));
        // Not one of the model's kinds: its own stream, applied as it comes.
        let mut dns = cluster_dns::watch(self.client.clone(), &self.options.watcher);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                Some(event) = dns.next() => self.cluster_dns_event(event).await,
                next = events.next() => {
                    let Some((kind, event)) = next else { break };
                    self.handle(kind, event);
                    // Take whatever else is ready, so a burst becomes one engine update.
                    for _ in 0..4096 {
                        match events.next().now_or_never() {
                            Some(Some((kind, event))) => self.handle(kind, event),
                            _ => break,
                        }
                    }
                    self.flush().await;
                    let handled = self.stats.events.load(Ordering::SeqCst);
                    self.stats.settled.store(handled, Ordering::SeqCst);
                }
                _ = tick.tick() => {
                    if self.gate.synced() {
                        match self.hub.expire(SystemTime::now()) {
                            Ok(d) if !d.is_empty() => tracing::warn!(nodes = d.len(), "quarantines expired and were lifted"),
                            Ok(_) => {}
                            Err(e) => tracing::error!(error = %e, "could not lift expired quarantines"),
                        }
                    }
                }
            }
        }
    }

    fn handle(&self, kind: Kind, event: Result<Event<Entry>, watcher::Error>) {
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        let Ok(mut inv) = self.inventory.lock() else {
            return;
        };
        match event {
            Ok(Event::Init) => inv.relist_start(kind),
            Ok(Event::InitApply(entry)) => inv.relist_item(entry),
            Ok(Event::InitDone) => {
                tracing::debug!(kind = kind.name(), "listed");
                inv.relist_done(kind)
            }
            Ok(Event::Apply(entry)) => inv.apply(entry),
            Ok(Event::Delete(entry)) => inv.delete(&entry.key),
            Err(e) => {
                self.stats.watch_errors.fetch_add(1, Ordering::Relaxed);
                if is_not_found(&e) && kind != Kind::Pod && !inv.synced(kind) {
                    // The API is not installed (e.g. no ClusterNetworkPolicy CRD): nothing of
                    // that kind exists; keep watching in case it appears.
                    tracing::warn!(
                        kind = kind.name(),
                        "the API of this kind is not served by the cluster; treating it as empty"
                    );
                    inv.mark_synced(kind);
                } else {
                    tracing::warn!(kind = kind.name(), error = %e, "watch failed; retrying (a fresh list follows)");
                }
            }
        }
    }

    /// One event of the cluster DNS Service's watch: its addresses to the engine when they
    /// changed; the first answer (a list, or a failure) may open the gate.
    async fn cluster_dns_event(
        &self,
        event: Result<Event<k8s_openapi::api::core::v1::Service>, watcher::Error>,
    ) {
        let (update, settled_now) = {
            let Ok(mut st) = self.cluster_dns.lock() else {
                return;
            };
            let before = st.settled();
            let update = st.handle(event);
            (update, !before && st.settled())
        };
        if let Some(ips) = update {
            let hub = self.hub.clone();
            let shown = format!("{ips:?}");
            match tokio::task::spawn_blocking(move || hub.set_cluster_dns_service(ips)).await {
                Ok(Ok(deltas)) => {
                    self.stats
                        .cluster_dns_updates
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(cluster_ips = %shown, nodes = deltas.len(), "the cluster DNS Service's addresses changed");
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "could not apply the cluster DNS Service's addresses; the previous resolvers stay in force")
                }
                Err(e) => tracing::error!(error = %e, "apply task failed"),
            }
        }
        if settled_now {
            self.flush().await;
        }
    }

    /// Applies what changed since the last flush, once every kind has been listed (and the
    /// cluster DNS Service has been, or could not be: the first rule sets carry its addresses).
    async fn flush(&self) {
        if !self.cluster_dns.lock().is_ok_and(|st| st.settled()) {
            return;
        }
        let changes = {
            let Ok(mut inv) = self.inventory.lock() else {
                return;
            };
            if !inv.all_synced() {
                return;
            }
            inv.take_changes()
        };
        // Statuses are due when the rule sets or a policy object changed (else the periodic
        // round brings in the agents' acks).
        let wake = !changes.is_empty() || changes.verdicts_changed || !self.gate.synced();
        if !changes.is_empty() {
            self.apply(changes).await;
        }
        if !self.gate.synced() {
            tracing::info!(
                objects = self.inventory.lock().map(|i| i.len()).unwrap_or(0),
                "listed the cluster; serving rule sets"
            );
            self.gate.set_synced();
        }
        if wake {
            self.wake_status.notify_one();
        }
    }

    async fn apply(&self, changes: Changes) {
        let n = changes.len() as u64;
        let hub = self.hub.clone();
        let carried = self.carried.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut touched = 0;
            if !changes.quarantines.is_empty() {
                forget_released(&carried, &changes.quarantines);
                // The same path as `bulkhead quarantine`: applied at once, priority delivery.
                let nodes: BTreeSet<String> = hub
                    .apply(changes.quarantines, true)?
                    .into_iter()
                    .map(|d| d.node)
                    .collect();
                record_carried(&hub, &carried, &nodes);
                touched += nodes.len();
            }
            if !changes.others.is_empty() {
                let nodes: BTreeSet<String> = hub
                    .apply(changes.others, false)?
                    .into_iter()
                    .map(|d| d.node)
                    .collect();
                // Pods that moved into or out of a quarantine's selection.
                record_carried(&hub, &carried, &nodes);
                touched += nodes.len();
            }
            Ok::<usize, crate::distribution::hub::HubError>(touched)
        })
        .await;
        match result {
            Ok(Ok(nodes)) => {
                self.stats.changes.fetch_add(n, Ordering::Relaxed);
                self.stats.applies.fetch_add(1, Ordering::Relaxed);
                tracing::info!(changes = n, nodes, "cluster changed; deltas sent");
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "could not apply cluster changes; the previous rule sets stay in force")
            }
            Err(e) => tracing::error!(error = %e, "apply task failed"),
        }
    }
}

fn forget_released(carried: &Mutex<Carried>, changes: &[Change]) {
    let Ok(mut c) = carried.lock() else { return };
    for change in changes {
        match change {
            Change::DeletePolicy(k) => {
                c.remove(k);
            }
            // A changed quarantine is enforced anew.
            Change::UpsertPolicy(p) => {
                c.remove(&p.key);
            }
            _ => {}
        }
    }
}

/// For every node whose rule set just changed: the quarantines it carries now, and since
/// which version (for "enforced on node at time").
fn record_carried(hub: &Hub, carried: &Mutex<Carried>, nodes: &BTreeSet<String>) {
    let Ok(mut c) = carried.lock() else { return };
    for node in nodes {
        let Some((version, rules)) = hub.node_rules(node) else {
            continue;
        };
        let here: BTreeSet<PolicyKey> = rules
            .iter()
            .filter(|r| r.kind == RuleKind::Quarantine)
            .map(|r| PolicyKey {
                kind: RuleKind::Quarantine,
                namespace: r.namespace.clone(),
                name: r.name.clone(),
            })
            .collect();
        for (q, per_node) in c.iter_mut() {
            if !here.contains(q) {
                per_node.remove(node);
            }
        }
        for q in here {
            c.entry(q)
                .or_default()
                .entry(node.clone())
                .or_insert(version);
        }
    }
}

/// Writes statuses and Events; only while this replica leads.
#[derive(Clone)]
struct StatusWriter {
    client: Client,
    hub: Arc<Hub>,
    gate: Arc<Gate>,
    inventory: Arc<Mutex<Inventory>>,
    carried: Arc<Mutex<Carried>>,
    stats: Arc<SourceStats>,
    wake: Arc<Notify>,
    cnp_version: Arc<Mutex<CnpVersion>>,
    interval: Duration,
    recorder: Recorder,
    /// What was last written per object (uid, status), so unchanged statuses are not sent.
    written: BTreeMap<ApiKey, (String, Value)>,
    /// Invalid objects already reported by an Event: (key, uid, problem).
    reported: BTreeSet<(ApiKey, String, String)>,
    last_full: std::time::Instant,
}

/// How often every status is applied again even if unchanged.
const FULL_STATUS_PERIOD: Duration = Duration::from_secs(300);

impl StatusWriter {
    fn new(source: &KubernetesSource) -> StatusWriter {
        StatusWriter {
            client: source.client.clone(),
            hub: source.hub.clone(),
            gate: source.gate.clone(),
            inventory: source.inventory.clone(),
            carried: source.carried.clone(),
            stats: source.stats.clone(),
            wake: source.wake_status.clone(),
            cnp_version: source.cnp_version.clone(),
            interval: source.options.status_interval,
            recorder: Recorder::new(
                source.client.clone(),
                Reporter {
                    controller: FIELD_MANAGER.into(),
                    instance: Some(source.options.identity.clone()),
                },
            ),
            written: BTreeMap::new(),
            reported: BTreeSet::new(),
            last_full: std::time::Instant::now(),
        }
    }

    async fn run(mut self) {
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.interval) => {}
            }
            if !self.gate.synced() || !self.gate.leads() {
                // A follower writes nothing; when it leads it writes everything afresh.
                self.written.clear();
                self.reported.clear();
                continue;
            }
            self.write_all().await;
        }
    }

    async fn write_all(&mut self) {
        let verdicts: Vec<_> = match self.inventory.lock() {
            Ok(inv) => inv
                .verdicts()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            Err(_) => return,
        };
        let realization: BTreeMap<(RuleKind, String, String), _> = self
            .hub
            .policy_status()
            .into_iter()
            .map(|p| ((p.kind.clone(), p.namespace.clone(), p.name.clone()), p))
            .collect();
        let carried = self.carried.lock().map(|c| c.clone()).unwrap_or_default();
        let now = SystemTime::now();
        let present: BTreeSet<&ApiKey> = verdicts.iter().map(|(k, _)| k).collect();
        self.written.retain(|k, _| present.contains(k));
        self.reported.retain(|(k, _, _)| present.contains(k));
        // Now and then everything is applied again (a no-op for the API server when nothing
        // changed), in case someone else removed or overwrote a status.
        let force = self.last_full.elapsed() >= FULL_STATUS_PERIOD;
        if force {
            self.last_full = std::time::Instant::now();
        }
        for (key, verdict) in &verdicts {
            if let Some(problem) = &verdict.invalid {
                let id = (key.clone(), verdict.uid.clone(), problem.clone());
                if !self.reported.contains(&id) && self.publish_invalid(key, verdict, problem).await
                {
                    self.reported.insert(id);
                }
            }
            if !key.kind.has_status() {
                continue;
            }
            let rule_kind = match key.kind {
                Kind::Quarantine => RuleKind::Quarantine,
                _ => RuleKind::ServicePolicy,
            };
            let policy_key = PolicyKey {
                kind: rule_kind.clone(),
                namespace: key.namespace.clone(),
                name: key.name.clone(),
            };
            let mut enforcement = Enforcement::new();
            if key.kind == Kind::Quarantine
                && let Some(nodes) = carried.get(&policy_key)
            {
                for (node, version) in nodes {
                    if let Some(at) = self.hub.enforced(node, *version) {
                        enforcement.insert(node.clone(), at);
                    }
                }
            }
            let previous = self
                .written
                .get(key)
                .filter(|(uid, _)| *uid == verdict.uid)
                .map(|(_, s)| s)
                .or(verdict.status.as_ref());
            let newly_expired = key.kind == Kind::Quarantine
                && !status::has_expired(previous)
                && verdict.expires_at.is_some_and(|t| t <= now);
            let desired = status::desired_status(
                key,
                verdict,
                realization.get(&(rule_kind, key.namespace.clone(), key.name.clone())),
                &enforcement,
                previous,
                now,
            );
            if !force && previous == Some(&desired) {
                continue;
            }
            let api: Api<DynamicObject> = Api::namespaced_with(
                self.client.clone(),
                &key.namespace,
                &key.kind.api_resource(),
            );
            let params = PatchParams::apply(FIELD_MANAGER).force();
            self.stats.status_writes.fetch_add(1, Ordering::Relaxed);
            match api
                .patch_status(
                    &key.name,
                    &params,
                    &Patch::Apply(status::apply_body(key, &desired)),
                )
                .await
            {
                Ok(_) => {
                    self.written
                        .insert(key.clone(), (verdict.uid.clone(), desired));
                    // Told once: from now on the object's status says Expired, also to the
                    // next leader.
                    if newly_expired {
                        self.announce_expiry(key, verdict).await;
                    }
                }
                Err(e) => {
                    self.stats.status_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(object = %key, error = %e, "could not write the status; retrying");
                }
            }
        }
    }

    /// A Quarantine's `expiresAt` passed (the engine lifted it on its tick): the audit line
    /// (`action: expire`, on the `bulkhead::audit` log target like the API's quarantines and
    /// releases) and a Normal `Expired` Event on the object.
    async fn announce_expiry(&self, key: &ApiKey, verdict: &super::inventory::Verdict) {
        let (pods, reason) = match self
            .inventory
            .lock()
            .ok()
            .and_then(|i| i.object(key).cloned())
        {
            Some(Object::Policy(p)) => match p.quarantine {
                Some(q) => (q.pods.unwrap_or_default().join(","), q.reason),
                None => (String::new(), String::new()),
            },
            _ => (String::new(), String::new()),
        };
        let expires_at = verdict.expires_at.map(status::rfc3339).unwrap_or_default();
        let line = serde_json::json!({
            "time": status::rfc3339(SystemTime::now()),
            "action": "expire",
            "namespace": key.namespace,
            "pod": pods,
            "quarantine": key.name,
            "reason": reason,
            "actor": crate::distribution::quarantine::EXPIRY_ACTOR,
            "expires_at": expires_at,
        });
        tracing::info!(target: "bulkhead::audit", "{line}");
        tracing::warn!(action = "expire", namespace = %key.namespace, quarantine = %key.name, %expires_at, "quarantine audit");
        let event = KubeEvent {
            type_: EventType::Normal,
            reason: "Expired".into(),
            note: Some(status::truncate(
                &format!(
                    "expiresAt {expires_at} passed: the quarantine of {pods} is lifted ({reason})"
                ),
                EVENT_NOTE_MAX,
            )),
            action: "Expire".into(),
            secondary: None,
        };
        match self
            .recorder
            .publish(&event, &self.reference(key, verdict))
            .await
        {
            Ok(()) => {
                self.stats.events_published.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(object = %key, error = %e, "could not publish the Expired Event")
            }
        }
    }

    async fn publish_invalid(
        &self,
        key: &ApiKey,
        verdict: &super::inventory::Verdict,
        problem: &str,
    ) -> bool {
        let reference = self.reference(key, verdict);
        let note = if verdict.kept_last_good {
            format!("{problem} (the previous version stays in force)")
        } else {
            format!("{problem} (not enforced)")
        };
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: "Invalid".into(),
            note: Some(status::truncate(&note, EVENT_NOTE_MAX)),
            action: "Validate".into(),
            secondary: None,
        };
        match self.recorder.publish(&event, &reference).await {
            Ok(()) => {
                self.stats.events_published.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::warn!(object = %key, error = %e, "could not publish an Event");
                false
            }
        }
    }
}

impl StatusWriter {
    /// The object an Event is about, at the version it is watched at.
    fn reference(&self, key: &ApiKey, verdict: &super::inventory::Verdict) -> ObjectReference {
        let api_version = match key.kind {
            Kind::ClusterNetworkPolicy => self
                .cnp_version
                .lock()
                .map(|v| v.api_version().to_string())
                .unwrap_or_else(|_| key.kind.api_version()),
            _ => key.kind.api_version(),
        };
        reference(key, verdict, api_version)
    }
}

/// The object an Event is about.
fn reference(
    key: &ApiKey,
    verdict: &super::inventory::Verdict,
    api_version: String,
) -> ObjectReference {
    ObjectReference {
        api_version: Some(api_version),
        kind: Some(key.kind.name().into()),
        name: Some(key.name.clone()),
        namespace: (!key.namespace.is_empty()).then(|| key.namespace.clone()),
        uid: (!verdict.uid.is_empty()).then(|| verdict.uid.clone()),
        resource_version: (!verdict.resource_version.is_empty())
            .then(|| verdict.resource_version.clone()),
        field_path: None,
    }
}
