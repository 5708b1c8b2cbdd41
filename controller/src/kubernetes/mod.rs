//! Bulkhead in a Kubernetes cluster: the API as the controller's source of inventory and
//! policies ([`source::KubernetesSource`], feeding the same [`crate::distribution::Hub`] and
//! incremental engine as the manifest source), Bulkhead's CRDs ([`crd`], generated into
//! `charts/bulkhead/crds/`), their status and Events ([`status`]), and leader election with a
//! Lease ([`leader`]) so that two replicas can run and only the leader serves rule sets.
//!
//! How `bulkhead controller --kubernetes [--leader-elect]` behaves:
//! - One kube-runtime watcher per kind (Namespaces, Nodes, Pods, NetworkPolicies,
//!   ClusterNetworkPolicies, ServicePolicies, Quarantines), list then watch, re-listing after
//!   `410 Gone` or any error (with backoff). A kind whose API the cluster does not serve (404,
//!   e.g. no ClusterNetworkPolicy CRD) counts as empty.
//! - One more watch, of the `kube-system/kube-dns` Service alone ([`cluster_dns`]): its cluster
//!   IPs are trusted DNS resolvers on every node, with the cluster DNS pods. The first rule sets
//!   wait for its first answer (its list, or its failure); a missing Service or a forbidden
//!   watch is logged once and costs only those addresses.
//! - ClusterNetworkPolicies are watched at the version the API server serves them at: discovery
//!   of `policy.networking.k8s.io/v1beta1` (network-policy-api v0.3.0 on), else `v1alpha2` (the
//!   same schema, read into the same type, [`crd::CnpVersion`]); the chosen version is logged.
//!   Asked when the source starts (and restarts), retried while the API server fails to answer.
//! - Every object is watched as its kind's own type (k8s-openapi's, or [`crd`]'s) and converted
//!   as it arrives by the manifest loader's conversion ([`crate::load::ToModel`], see
//!   [`watched`]), so the semantics and the validation are those of the file source; the
//!   inventory keeps the converted object, not the API object. The engine gets a change only when the
//!   converted object changes: resourceVersion bumps, managedFields, annotations, readiness,
//!   status writes change nothing. Pods join with their first address and leave when they
//!   finish. An object that stops validating keeps its last good version in force.
//! - Nothing is served until every kind has been listed once: agents are refused (gRPC
//!   UNAVAILABLE) and `/readyz` answers 503, so no agent ever gets the empty rule set of a
//!   controller that has not seen the cluster yet.
//! - Quarantines are applied before anything else of a batch, with priority delivery (the path
//!   `bulkhead quarantine` takes); `expiresAt` is honoured on a one-second tick.
//! - `bulkhead quarantine` and the web UI write Quarantine objects through the same client
//!   ([`Running::client`], [`crate::distribution::quarantine::QuarantineControl::kubernetes`]):
//!   server-side apply to quarantine, delete to release; this watch brings them to the hub.
//! - The leader (or the only controller) writes each ServicePolicy's and Quarantine's status by
//!   server-side apply (field manager `bulkhead-controller`): `Accepted` (or `Invalid` with
//!   every problem), `Realized` on X of Y nodes, for quarantines `enforcedAt` per node and
//!   `connectionsCut`; and a Warning Event (`Invalid`) once per problem of any policy object.
//! - The source and its status writer run supervised ([`crate::supervise`]): a task that dies
//!   is logged, counted (`task_restarts_total`) and restarted with backoff; the source keeps
//!   its inventory across a restart and re-lists.
//! - With `--leader-elect`, followers watch too (a take-over needs no warm-up) but neither
//!   serve agents nor write to the API; a leader that loses its Lease exits, closing every
//!   agent stream, and Kubernetes restarts it as a follower. SIGTERM releases the Lease.

pub mod cluster_dns;
pub mod crd;
pub mod inventory;
pub mod leader;
pub mod promote;
pub mod review;
pub mod source;
pub mod status;
pub mod watched;

pub use crd::{Quarantine, ServicePolicy, crd_files};
pub use inventory::{Inventory, Kind};
pub use leader::{LeaderElector, Leadership, LeaseConfig};
pub use source::{Gate, KubernetesSource, SourceOptions, SourceStats};

use std::sync::{Arc, Mutex};

pub use kube::Client;
use tokio::sync::{Notify, oneshot};

use crate::distribution::Hub;

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error(
        "cannot reach the Kubernetes API (no in-cluster service account and no usable kubeconfig): {0}"
    )]
    Client(String),
    #[error(
        "leader election needs the lease's namespace and this replica's identity: pass --lease-namespace and --identity (or set POD_NAMESPACE and POD_NAME from the downward API)"
    )]
    LeaseIdentity,
}

impl KubernetesError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            KubernetesError::Client(_) => "client",
            KubernetesError::LeaseIdentity => "lease_identity",
        }
    }
}

/// How `bulkhead controller --kubernetes` runs.
#[derive(Debug, Clone, Default)]
pub struct KubernetesOptions {
    /// Campaign for the lease; without it this replica always serves.
    pub leader_elect: bool,
    pub lease_name: String,
    pub lease_namespace: Option<String>,
    /// This replica (its pod name); also the Events' reporting instance.
    pub identity: Option<String>,
    /// Where restarts of the supervised tasks (source, status writer) are counted.
    pub restarts: Arc<crate::supervise::TaskRestarts>,
}

/// The Kubernetes source (and the leader elector) running in the background.
pub struct Running {
    pub gate: Arc<Gate>,
    pub stats: Arc<SourceStats>,
    /// The client the source watches with (the quarantine API writes through it too).
    pub client: Client,
    source: tokio::task::JoinHandle<()>,
    stop: Option<oneshot::Sender<()>>,
    elector: Option<tokio::task::JoinHandle<Result<(), leader::LeaderError>>>,
    lost: Arc<(Notify, Mutex<Option<String>>)>,
}

impl Running {
    /// Completes when this replica lost the leadership it had (never without election).
    pub async fn lost(&self) -> String {
        loop {
            if let Some(reason) = self.lost.1.lock().ok().and_then(|r| r.clone()) {
                return reason;
            }
            self.lost.0.notified().await;
        }
    }

    /// Stops watching and releases the lease if this replica holds it. Returns why leadership
    /// was lost, if it was.
    pub async fn shutdown(mut self) -> Option<String> {
        self.source.abort();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(elector) = self.elector.take() {
            let _ = elector.await;
        }
        self.lost.1.lock().ok().and_then(|r| r.clone())
    }
}

/// Connects to the API (in-cluster config, else kubeconfig), starts the source feeding `hub`
/// and, with `leader_elect`, the elector. Agents may be served once [`Gate::serving`] says so.
pub async fn start(hub: Arc<Hub>, options: KubernetesOptions) -> Result<Running, KubernetesError> {
    let client = Client::try_default()
        .await
        .map_err(|e| KubernetesError::Client(e.to_string()))?;
    start_with_client(client, hub, options)
}

pub fn start_with_client(
    client: Client,
    hub: Arc<Hub>,
    options: KubernetesOptions,
) -> Result<Running, KubernetesError> {
    let identity = options
        .identity
        .clone()
        .filter(|i| !i.is_empty())
        .unwrap_or_else(|| "bulkhead-controller".into());
    let lost: Arc<(Notify, Mutex<Option<String>>)> = Arc::default();
    let (leadership, stop, elector) = if options.leader_elect {
        let (Some(namespace), Some(id)) = (
            options.lease_namespace.clone().filter(|n| !n.is_empty()),
            options.identity.clone().filter(|i| !i.is_empty()),
        ) else {
            return Err(KubernetesError::LeaseIdentity);
        };
        let elector = LeaderElector::new(
            client.clone(),
            LeaseConfig::new(&options.lease_name, &namespace, &id),
        );
        let leadership = elector.leadership();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let lost = lost.clone();
        let task = tokio::spawn(async move {
            let result = elector
                .run(async {
                    let _ = stop_rx.await;
                })
                .await;
            if let Err(e) = &result {
                tracing::error!(error = %e, "leader election ended");
                if let Ok(mut r) = lost.1.lock() {
                    *r = Some(e.to_string());
                }
                lost.0.notify_waiters();
                lost.0.notify_one();
            }
            result
        });
        (Some(leadership), Some(stop_tx), Some(task))
    } else {
        (None, None, None)
    };
    let gate = Arc::new(Gate::new(leadership));
    let source = KubernetesSource::new(
        client.clone(),
        hub,
        gate.clone(),
        SourceOptions {
            identity,
            restarts: options.restarts.clone(),
            ..Default::default()
        },
    );
    let stats = source.stats();
    let source = Arc::new(source);
    let source = crate::supervise::spawn_supervised(
        source::SOURCE_TASK,
        options.restarts.clone(),
        crate::supervise::Backoff::default(),
        move || {
            let source = source.clone();
            async move { source.watch().await }
        },
    );
    Ok(Running {
        gate,
        stats,
        client,
        source,
        stop,
        elector,
        lost,
    })
}
