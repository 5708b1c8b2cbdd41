//! The controller's background tasks (manifest reload, quarantine expiry), the Kubernetes
//! source's start, `/readyz`, and what stops the controller.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{
    distribution::{Hub, ManifestSource, quarantine::QuarantineControl},
    kubernetes::{Gate, KubernetesOptions, Running},
    supervise::TaskRestarts,
};

use super::{KubernetesConfig, metrics::ControllerMetrics};

/// Re-reads the manifests every `period` and applies what changed; lifts quarantines whose
/// `expiresAt` passed. Runs until the controller stops (supervised).
pub(super) async fn reload_manifests(
    hub: Arc<Hub>,
    source: Arc<Mutex<ManifestSource>>,
    metrics: Arc<ControllerMetrics>,
    period: Duration,
) {
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let reload = match source.lock() {
            Ok(mut s) => s.reload(),
            Err(_) => {
                tracing::error!("manifest source lock poisoned; restart the controller");
                continue;
            }
        };
        for e in &reload.errors {
            tracing::error!(error = %e, "invalid manifest; the objects it had stay in force");
        }
        metrics.input_errors.inc_by(reload.errors.len() as u64);
        match hub.expire(std::time::SystemTime::now()) {
            Ok(deltas) if !deltas.is_empty() => {
                tracing::warn!(nodes = deltas.len(), "quarantines expired and were lifted")
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "could not lift expired quarantines"),
        }
        if reload.changes.is_empty() {
            continue;
        }
        let n = reload.changes.len();
        let hub = hub.clone();
        let result = tokio::task::spawn_blocking(move || hub.apply(reload.changes, false)).await;
        match result {
            Ok(Ok(deltas)) => tracing::info!(
                changes = n,
                nodes = deltas.len(),
                "manifests changed; deltas sent"
            ),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "could not apply manifest changes; the previous rule sets stay in force")
            }
            Err(e) => tracing::error!(error = %e, "apply task failed"),
        }
    }
}

/// Every second: removes the quarantines of the directory whose `expiresAt` passed, with their
/// audit lines. Runs until the controller stops (supervised).
pub(super) async fn expire_quarantines(control: Arc<QuarantineControl>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let control = control.clone();
        match tokio::task::spawn_blocking(move || control.expire_due(std::time::SystemTime::now()))
            .await
        {
            Ok(Ok(expired)) => {
                for q in expired {
                    tracing::warn!(namespace = %q.namespace, pod = %q.pod, expires_at = %q.expires_at, "quarantine expired and was lifted");
                }
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "could not remove expired quarantines; retrying")
            }
            // A panic in the blocking task: let the supervisor count and restart this task.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => tracing::error!(error = %e, "the quarantine expiry task was cancelled"),
        }
    }
}

pub(super) async fn start_kubernetes(
    args: &KubernetesConfig,
    hub: Arc<Hub>,
    restarts: Arc<TaskRestarts>,
) -> anyhow::Result<Option<Running>> {
    if !args.kubernetes {
        return Ok(None);
    }
    let running = crate::kubernetes::start(
        hub,
        KubernetesOptions {
            leader_elect: args.leader_elect,
            lease_name: args.lease_name.clone(),
            lease_namespace: args.lease_namespace.clone(),
            identity: args.identity.clone(),
            restarts,
        },
    )
    .await?;
    tracing::info!(leader_elect = args.leader_elect, identity = ?args.identity, "watching the Kubernetes API");
    Ok(Some(running))
}

/// `/readyz`: 200 where agents should connect (the leader, or the only controller, once it
/// has listed the cluster); 503 with the reason elsewhere. The chart's Service routes by it.
pub(super) fn readyz(gate: Arc<Gate>) -> axum::routing::MethodRouter {
    axum::routing::get(move || async move {
        match gate.serving() {
            Ok(()) => (axum::http::StatusCode::OK, "ok".to_string()),
            Err(why) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, why),
        }
    })
}

/// Ctrl-C, SIGTERM (how Kubernetes stops a pod), or the loss of leadership.
pub(super) async fn shutdown_signal(kubernetes: Option<&Running>) {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    let lost = async {
        match kubernetes {
            Some(k) => {
                let reason = k.lost().await;
                tracing::error!(%reason, "stopping");
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
        _ = lost => {}
    }
}
