//! Leader election with a `coordination.k8s.io/v1` Lease, as client-go does it: the holder
//! renews the lease every retry period; another replica takes it over only once it has seen
//! the same record (holder and renew time) unchanged for a whole lease duration — measured on
//! its own clock, so clock skew between nodes cannot make two leaders. Updates carry the
//! lease's `resourceVersion`, so of two replicas racing for an expired lease exactly one wins
//! (the other gets `409 Conflict`). On shutdown the leader releases the lease (clears the
//! holder), so a standby takes over at once instead of after the lease duration.
//!
//! kube 5 has no lease helper of its own; this is the small state machine, tested against a
//! mocked API server in `controller/tests/kubernetes_leader.rs`.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

/// Who leads, as this replica knows it. Shared with the gRPC gate and `/readyz`.
#[derive(Debug, Default)]
pub struct Leadership {
    leading: AtomicBool,
    leader: Mutex<String>,
}

impl Leadership {
    pub fn is_leader(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }

    /// The current holder's identity (empty when unknown).
    pub fn leader(&self) -> String {
        self.leader.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// What the elector (or a test) observed: whether this replica leads, and who does.
    pub fn set(&self, leading: bool, leader: &str) {
        if let Ok(mut l) = self.leader.lock() {
            *l = leader.to_string();
        }
        self.leading.store(leading, Ordering::SeqCst);
    }
}

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a lease holds without renewal.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long steps down.
    pub renew_deadline: Duration,
    /// How often to try to acquire or renew.
    pub retry_period: Duration,
}

impl LeaseConfig {
    pub fn new(name: &str, namespace: &str, identity: &str) -> LeaseConfig {
        LeaseConfig {
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error(
        "lost the leader lease {lease} to {holder:?}; restarting so agents move to the new leader"
    )]
    Lost { lease: String, holder: String },
    #[error("could not renew the leader lease {lease} for {secs}s: {reason}; stepping down")]
    RenewFailed {
        lease: String,
        secs: u64,
        reason: String,
    },
}

impl LeaderError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            LeaderError::Lost { .. } => "lost",
            LeaderError::RenewFailed { .. } => "renew_failed",
        }
    }
}

/// The part of a lease record whose change proves its holder is alive.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observed {
    holder: String,
    renew_time: Option<String>,
    transitions: i32,
}

pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    leadership: Arc<Leadership>,
    /// The record last seen and when (on this replica's clock) it was first seen.
    observed: Option<(Observed, Instant)>,
    /// The lease's resourceVersion when this replica last wrote or read it.
    resource_version: Option<String>,
}

fn now_micro() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaseConfig) -> LeaderElector {
        LeaderElector {
            api: Api::namespaced(client, &config.namespace),
            config,
            leadership: Arc::default(),
            observed: None,
            resource_version: None,
        }
    }

    pub fn leadership(&self) -> Arc<Leadership> {
        self.leadership.clone()
    }

    fn spec(&self, acquire: MicroTime, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(self.config.lease_duration.as_secs().max(1) as i32),
            acquire_time: Some(acquire),
            renew_time: Some(now_micro()),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One round: create the lease, renew it, or take it over once expired. `now` is this
    /// replica's monotonic clock. Returns whether this replica leads afterwards.
    pub async fn try_acquire_or_renew(&mut self, now: Instant) -> Result<bool, kube::Error> {
        let me = self.config.identity.clone();
        let current = match self.api.get(&self.config.name).await {
            Ok(l) => l,
            Err(e) if is_status(&e, 404) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.name.clone()),
                        namespace: Some(self.config.namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(self.spec(now_micro(), 0)),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(created) => {
                        self.took(&created, now);
                        Ok(true)
                    }
                    // Another replica created it first.
                    Err(e) if is_status(&e, 409) => Ok(false),
                    Err(e) => Err(e),
                };
            }
            Err(e) => return Err(e),
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let record = Observed {
            holder: holder.clone(),
            renew_time: spec.renew_time.as_ref().map(|t| t.0.to_string()),
            transitions: spec.lease_transitions.unwrap_or(0),
        };
        if self.observed.as_ref().is_none_or(|(o, _)| *o != record) {
            self.observed = Some((record, now));
        }
        self.resource_version = current.metadata.resource_version.clone();
        let duration = spec
            .lease_duration_seconds
            .map_or(self.config.lease_duration, |s| {
                Duration::from_secs(s.max(0) as u64)
            });
        let since = self.observed.as_ref().map_or(now, |(_, t)| *t);
        let expired = holder.is_empty() || now.saturating_duration_since(since) >= duration;
        if holder != me && !expired {
            self.leadership.set(false, &holder);
            return Ok(false);
        }
        let mut lease = current.clone();
        lease.spec = Some(if holder == me {
            // Renew: keep acquireTime and the transition count.
            LeaseSpec {
                renew_time: Some(now_micro()),
                lease_duration_seconds: Some(self.config.lease_duration.as_secs().max(1) as i32),
                ..spec
            }
        } else {
            let transitions = spec.lease_transitions.unwrap_or(0) + 1;
            tracing::info!(lease = %self.config.name, previous = %holder, "taking over the expired leader lease");
            self.spec(now_micro(), transitions)
        });
        // replace() sends metadata.resourceVersion: the API server refuses the write (409) if
        // anyone changed the lease since it was read.
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => {
                self.took(&written, now);
                Ok(true)
            }
            Err(e) if is_status(&e, 409) => {
                self.leadership.set(false, &holder);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn took(&mut self, lease: &Lease, now: Instant) {
        let spec = lease.spec.clone().unwrap_or_default();
        self.observed = Some((
            Observed {
                holder: self.config.identity.clone(),
                renew_time: spec.renew_time.as_ref().map(|t| t.0.to_string()),
                transitions: spec.lease_transitions.unwrap_or(0),
            },
            now,
        ));
        self.resource_version = lease.metadata.resource_version.clone();
        if !self.leadership.is_leader() {
            tracing::info!(lease = %self.config.name, identity = %self.config.identity, "became the leader");
        }
        self.leadership.set(true, &self.config.identity);
    }

    /// Gives the lease up (if this replica holds it) so a standby takes over at once.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        if !self.leadership.is_leader() {
            return Ok(());
        }
        let patch = json!({
            "metadata": {"resourceVersion": self.resource_version},
            "spec": {
                "holderIdentity": null,
                "leaseDurationSeconds": 1,
                "renewTime": now_micro(),
            },
        });
        self.leadership.set(false, "");
        self.api
            .patch(
                &self.config.name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        tracing::info!(lease = %self.config.name, "released the leader lease");
        Ok(())
    }

    /// Campaigns and renews until `shutdown` completes (then releases the lease and returns
    /// `Ok`), or until leadership is lost (then returns the error: the process should exit,
    /// which closes every agent stream it served).
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), LeaderError> {
        tokio::pin!(shutdown);
        let mut last_renewed = Instant::now();
        loop {
            let was_leader = self.leadership.is_leader();
            let now = Instant::now();
            match self.try_acquire_or_renew(now).await {
                Ok(true) => last_renewed = now,
                Ok(false) if was_leader => {
                    return Err(LeaderError::Lost {
                        lease: self.config.name.clone(),
                        holder: self.leadership.leader(),
                    });
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(lease = %self.config.name, error = %e, "leader election round failed");
                    if was_leader && now.duration_since(last_renewed) >= self.config.renew_deadline
                    {
                        self.leadership.set(false, "");
                        return Err(LeaderError::RenewFailed {
                            lease: self.config.name.clone(),
                            secs: self.config.renew_deadline.as_secs(),
                            reason: e.to_string(),
                        });
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.retry_period) => {}
                _ = &mut shutdown => {
                    if let Err(e) = self.release().await {
                        tracing::warn!(error = %e, "could not release the leader lease; it expires by itself");
                    }
                    return Ok(());
                }
            }
        }
    }
}
