//! The questions both admin APIs answer from the recorded flows — least-privilege
//! recommendations ([`recommend`]) and what-if replays ([`impact`]) — in one place, so that the
//! HTTP API (`/api/recommend`, `/api/impact`) and the gRPC admin API (`Recommend`, `Impact`)
//! give the same answer to the same question.
//!
//! Both read the flow history on disk when the controller keeps one (it reaches back past
//! restarts and past what memory holds), else the records held in memory ([`recorded_flows`]).
//! They cost CPU (and disk): callers run them off the async runtime.
//!
//! [`wire`] converts the answers to and from their protobuf messages.

use std::{
    collections::BTreeSet,
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::{
    PolicyKey,
    distribution::{FlowStore, Hub},
    flows::{
        FlowFilter,
        history::{HistoryError, HistoryQuery, HistoryRecord},
    },
    impact::{Edges, Impact, ProposalError, WhatIf, proposal},
    recommend::{RecommendKind, RecommendOptions, Recommendation, recommend as learn},
    ruleset::{FlowEntry, FlowRecord},
};

pub mod wire;

/// Why a question got no answer.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("the controller's state is unavailable; retry")]
    Unavailable,
    #[error("the flow store lock is poisoned; restart the controller")]
    Poisoned,
    #[error(transparent)]
    Proposal(#[from] ProposalError),
    #[error(transparent)]
    History(#[from] HistoryError),
}

/// Whether the records came from the flow history on disk (else from memory).
pub type FromHistory = bool;

/// Hands the flow records observed in `[since, until]` (unix nanoseconds, inclusive) to `use_`:
/// those of the flow history when the store keeps one (a damaged chunk is skipped and logged),
/// else copies of those held in memory (taken under the store's lock, used after it, so that
/// ingest is not held up while they are folded).
pub fn recorded_flows<R>(
    store: &Mutex<FlowStore>,
    since: u64,
    until: u64,
    use_: impl FnOnce(&mut dyn Iterator<Item = FlowRecord>) -> R,
) -> Result<(R, FromHistory), AnswerError> {
    let history = store
        .lock()
        .map_err(|_| AnswerError::Poisoned)?
        .history()
        .cloned();
    match history {
        Some(h) => {
            let records = h.query(HistoryQuery {
                filter: FlowFilter {
                    since_unix_nanos: since,
                    ..FlowFilter::default()
                },
                until_unix_nanos: (until != u64::MAX).then_some(until),
                newest_first: false,
            })?;
            let mut flows = records.filter_map(|r| match r {
                Ok(HistoryRecord {
                    entry: FlowEntry::Flow(f),
                    ..
                }) => Some(f),
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "skipping a damaged flow history chunk");
                    None
                }
            });
            Ok((use_(&mut flows), true))
        }
        None => {
            let copies: Vec<FlowRecord> = {
                let store = store.lock().map_err(|_| AnswerError::Poisoned)?;
                let directory = store.directory().cloned();
                store
                    .since(0)
                    .1
                    .filter_map(|(_, e, _)| match e {
                        FlowEntry::Flow(r)
                            if r.time_unix_nanos >= since && r.time_unix_nanos <= until =>
                        {
                            let mut r = r.clone();
                            // Agents name only their own node's pods; the history names the
                            // rest as it writes them, and so does this.
                            if let Some(d) = &directory {
                                d.name_peer(&mut r);
                            }
                            Some(r)
                        }
                        _ => None,
                    })
                    .collect()
            };
            Ok((use_(&mut copies.into_iter()), false))
        }
    }
}

/// What to recommend policies for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecommendQuestion {
    /// Namespaces whose workloads get a policy; empty: every namespace of an observed pod.
    pub namespaces: BTreeSet<String>,
    /// Learn from records observed at or after this time (unix nanoseconds).
    pub since_unix_nanos: u64,
    /// A new edge within this long keeps a recommendation `learning`.
    pub learning_window: Duration,
    pub kind: RecommendKind,
}

impl RecommendQuestion {
    /// The learning window when the question names none.
    pub const DEFAULT_LEARNING: Duration = Duration::from_secs(600);
}

fn now_unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

/// Least-privilege policies learned from the recorded flows, for the pods the controller knows
/// now (see [`crate::recommend`]).
pub fn recommend(
    hub: &Hub,
    store: &Mutex<FlowStore>,
    q: &RecommendQuestion,
) -> Result<Recommendation, AnswerError> {
    let (pods, label_filter) = hub.pods().ok_or(AnswerError::Unavailable)?;
    let opts = RecommendOptions {
        kind: q.kind,
        namespaces: q.namespaces.clone(),
        learning_window: q.learning_window,
        now_unix_nanos: now_unix_nanos(),
        label_filter,
    };
    let (mut r, from_history) = recorded_flows(store, q.since_unix_nanos, u64::MAX, |records| {
        learn(records, &pods, &opts)
    })?;
    r.from_history = from_history;
    Ok(r)
}

/// A proposed policy change to replay the recorded flows against.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImpactQuestion {
    /// Multi-document YAML of the objects proposed (may be empty when only deleting).
    pub proposal_yaml: String,
    /// Current policies the proposal deletes.
    pub delete: Vec<PolicyKey>,
    /// The records observed in this range (unix nanoseconds, inclusive).
    pub since_unix_nanos: u64,
    pub until_unix_nanos: u64,
}

/// Every edge of the recorded flows whose decision the proposal changes: the current objects
/// and the current objects plus the proposal are compiled apart from the live engine (see
/// [`crate::impact`]).
pub fn impact(
    hub: &Hub,
    store: &Mutex<FlowStore>,
    q: &ImpactQuestion,
) -> Result<Impact, AnswerError> {
    let started = std::time::Instant::now();
    let proposal = proposal(&q.proposal_yaml, q.delete.clone())?;
    let (objects, config, now) = hub.objects().ok_or(AnswerError::Unavailable)?;
    // The two engines compile on a thread of their own while the records are read and folded
    // (each takes a core when one is free).
    let (what_if, compiled, read) = std::thread::scope(|scope| {
        let compiling = scope.spawn(|| {
            let w = WhatIf::new(config, objects, now, &proposal);
            (w, started.elapsed())
        });
        let read = recorded_flows(store, q.since_unix_nanos, q.until_unix_nanos, |records| {
            Edges::fold(records)
        });
        let (what_if, compiled) = compiling
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (what_if, compiled, read)
    });
    let what_if = what_if?;
    let (edges, from_history) = read?;
    let mut impact = what_if.replay(&edges);
    impact.from_history = from_history;
    tracing::info!(
        records = impact.records,
        edges = impact.edges,
        changed = impact.changed.len(),
        breaks = impact.breaks,
        compile_ms = compiled.as_millis() as u64,
        total_ms = started.elapsed().as_millis() as u64,
        "policy impact"
    );
    Ok(impact)
}
