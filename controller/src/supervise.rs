//! The controller's long-lived background tasks (the Kubernetes source and its status writer,
//! the manifest reload, quarantine expiry, the service graph's TTL) run supervised: a task that
//! panics or returns is logged, counted per task in [`TaskRestarts`] (the controller exports it
//! as `bulkhead_controller_task_restarts_total{task}`) and started again after a backoff that
//! doubles from [`FIRST_BACKOFF`] to [`MAX_BACKOFF`], and starts over once a run has lasted
//! [`STABLE`]. Before this, one bad object could stop every status write until a restart.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

/// The wait before the first restart.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between restarts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A run this long counts as healthy: the next failure waits [`FIRST_BACKOFF`] again.
pub const STABLE: Duration = Duration::from_secs(300);

/// How often each supervised task was restarted.
#[derive(Debug, Default)]
pub struct TaskRestarts {
    counts: Mutex<BTreeMap<&'static str, u64>>,
}

impl TaskRestarts {
    fn record(&self, task: &'static str) {
        if let Ok(mut c) = self.counts.lock() {
            *c.entry(task).or_default() += 1;
        }
    }

    /// Restarts of `task` so far.
    pub fn get(&self, task: &str) -> u64 {
        self.counts
            .lock()
            .ok()
            .and_then(|c| c.get(task).copied())
            .unwrap_or(0)
    }

    /// Every task restarted at least once, with its count.
    pub fn all(&self) -> Vec<(&'static str, u64)> {
        self.counts
            .lock()
            .map(|c| c.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    }
}

/// Aborts the task it holds when dropped: a supervisor that is aborted takes its current run
/// with it.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Spawns `start()` and keeps it running: when the future it returned panics or completes,
/// the task is counted in `restarts`, logged, and started again after the backoff. The
/// supervised futures are meant to run forever; aborting the returned handle stops the
/// supervisor and the run in progress.
pub fn spawn_supervised<F, Fut>(
    task: &'static str,
    restarts: Arc<TaskRestarts>,
    backoff: Backoff,
    mut start: F,
) -> JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut wait = backoff.first;
        loop {
            let started = Instant::now();
            let mut run = AbortOnDrop(tokio::spawn(start()));
            let outcome = (&mut run.0).await;
            match outcome {
                Ok(()) => tracing::error!(task, "background task stopped; restarting it"),
                Err(e) if e.is_panic() => {
                    let panic = e.into_panic();
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "(no message)".into());
                    tracing::error!(task, panic = %message, "background task panicked; restarting it (please report this)");
                }
                // Only an abort of the run itself; nothing to supervise any more.
                Err(_) => return,
            }
            restarts.record(task);
            if started.elapsed() >= STABLE {
                wait = backoff.first;
            }
            tracing::warn!(task, backoff = ?wait, "restarting the background task");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(backoff.max);
        }
    })
}

/// The waits between restarts.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            first: FIRST_BACKOFF,
            max: MAX_BACKOFF,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn quick() -> Backoff {
        Backoff {
            first: Duration::from_millis(5),
            max: Duration::from_millis(20),
        }
    }

    #[tokio::test]
    async fn a_task_that_panics_or_returns_is_restarted_and_counted() {
        let restarts = Arc::new(TaskRestarts::default());
        let runs = Arc::new(AtomicU32::new(0));
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        let supervisor = spawn_supervised("flaky", restarts.clone(), quick(), {
            let runs = runs.clone();
            move || {
                let n = runs.fetch_add(1, Ordering::SeqCst);
                let done = done_tx.clone();
                async move {
                    match n {
                        0 => panic!("first run fails"),
                        1 => {} // returns: also a failure of a task meant to run forever
                        _ => {
                            let _ = done.send(());
                            std::future::pending::<()>().await
                        }
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), done_rx.recv())
            .await
            .expect("the third run starts")
            .expect("a run");
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(restarts.get("flaky"), 2);
        assert_eq!(restarts.all(), vec![("flaky", 2)]);
        supervisor.abort();
        let _ = supervisor.await;
    }

    #[tokio::test]
    async fn aborting_the_supervisor_stops_the_run_in_progress() {
        let restarts = Arc::new(TaskRestarts::default());
        let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
        let (dropped_tx, mut dropped_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        struct SendOnDrop(tokio::sync::mpsc::UnboundedSender<()>);
        impl Drop for SendOnDrop {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        let supervisor = spawn_supervised("forever", restarts.clone(), quick(), move || {
            let started = started_tx.clone();
            let guard = SendOnDrop(dropped_tx.clone());
            async move {
                let _guard = guard;
                let _ = started.send(());
                std::future::pending::<()>().await
            }
        });
        started_rx.recv().await.expect("the run started");
        supervisor.abort();
        tokio::time::timeout(Duration::from_secs(10), dropped_rx.recv())
            .await
            .expect("the run is dropped with its supervisor")
            .expect("dropped");
        assert_eq!(restarts.get("forever"), 0);
    }
}
