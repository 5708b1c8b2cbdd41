//! `GET /api/recommend?namespaces=a,b&since=NANOS&learning_seconds=S&kind=K`: least-privilege
//! policies learned from the flow records of the controller's flow history (or, without one,
//! the records it holds in memory), for the workloads of the named namespaces
//! ([`crate::recommend`]). `bulkhead policy recommend` prints them as YAML.

use std::{
    collections::BTreeSet,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::{Query, State},
    http::StatusCode,
};
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiState};
use crate::{
    flows::{
        FlowFilter,
        history::{HistoryQuery, HistoryRecord},
    },
    recommend::{RecommendKind, RecommendOptions, Recommendation, recommend as learn},
    ruleset::{FlowEntry, FlowRecord},
};

/// The query of `/api/recommend`.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct RecommendQuery {
    /// Comma-separated namespaces whose workloads get a policy; absent: every namespace of an
    /// observed pod.
    pub namespaces: Option<String>,
    /// Only records from this time on (unix nanoseconds).
    pub since: Option<u64>,
    /// Edges first seen within this many seconds before now keep a recommendation `learning`.
    pub learning_seconds: Option<u64>,
    /// `networkpolicy` (default) or `servicepolicy`.
    pub kind: Option<RecommendKind>,
}

impl RecommendQuery {
    /// The learning window when the query names none.
    pub const DEFAULT_LEARNING: Duration = Duration::from_secs(600);

    /// The query string for these settings.
    pub fn path(&self) -> String {
        let mut q = Vec::new();
        if let Some(n) = &self.namespaces {
            q.push(format!("namespaces={n}"));
        }
        if let Some(s) = self.since {
            q.push(format!("since={s}"));
        }
        if let Some(l) = self.learning_seconds {
            q.push(format!("learning_seconds={l}"));
        }
        match self.kind {
            Some(RecommendKind::ServicePolicy) => q.push("kind=servicepolicy".into()),
            Some(RecommendKind::NetworkPolicy) => q.push("kind=networkpolicy".into()),
            None => {}
        }
        format!("/api/recommend?{}", q.join("&"))
    }
}

pub(super) async fn recommend(
    State(s): State<ApiState>,
    query: Result<Query<RecommendQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<Recommendation>, ApiError> {
    let Query(q) = query.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("bad query: {}", e.body_text().to_lowercase()),
        )
    })?;
    let namespaces: BTreeSet<String> = q
        .namespaces
        .iter()
        .flat_map(|n| n.split(','))
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(String::from)
        .collect();
    // Folding every record costs CPU (and reading the history, disk): off the runtime's
    // workers.
    tokio::task::spawn_blocking(move || {
        let since = q.since.unwrap_or(0);
        let history = s.flows.lock().ok().and_then(|f| f.history().cloned());
        let in_memory = || -> Vec<FlowRecord> {
            s.flows
                .lock()
                .map(|f| {
                    f.since(0)
                        .1
                        .filter_map(|(_, e, _)| match e {
                            FlowEntry::Flow(r) if r.time_unix_nanos >= since => Some(r.clone()),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let (pods, label_filter) = s.hub.pods().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the controller's state is unavailable; retry",
            )
        })?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let opts = RecommendOptions {
            kind: q.kind.unwrap_or_default(),
            namespaces,
            learning_window: q
                .learning_seconds
                .map_or(RecommendQuery::DEFAULT_LEARNING, Duration::from_secs),
            now_unix_nanos: now,
            label_filter,
        };
        // The history on disk when the controller keeps one (it reaches back days), else the
        // records held in memory. A damaged chunk of the history is skipped (logged).
        let recommendation = match history {
            Some(h) => {
                let query = HistoryQuery {
                    filter: FlowFilter {
                        since_unix_nanos: since,
                        ..FlowFilter::default()
                    },
                    until_unix_nanos: None,
                    newest_first: false,
                };
                let records = h.query(query).map_err(|e| {
                    tracing::error!(error = %e, "reading the flow history");
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
                })?;
                let mut r = learn(
                    records.filter_map(|r| match r {
                        Ok(HistoryRecord {
                            entry: FlowEntry::Flow(f),
                            ..
                        }) => Some(f),
                        Ok(_) => None,
                        Err(e) => {
                            tracing::warn!(error = %e, "skipping a damaged flow history chunk");
                            None
                        }
                    }),
                    &pods,
                    &opts,
                );
                r.from_history = true;
                r
            }
            None => learn(in_memory(), &pods, &opts),
        };
        Ok(axum::Json(recommendation))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}
