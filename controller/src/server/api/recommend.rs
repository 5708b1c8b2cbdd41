//! `GET /api/recommend?namespaces=a,b&since=NANOS&learning_seconds=S&kind=K`: least-privilege
//! policies learned from the flow records of the controller's flow history (or, without one,
//! the records it holds in memory), for the workloads of the named namespaces
//! ([`crate::recommend`]). `bulkhead policy recommend` prints them as YAML.

use std::{collections::BTreeSet, time::Duration};

use axum::{
    extract::{Query, State},
    http::StatusCode,
};
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiState};
use crate::{
    answers::{self, RecommendQuestion},
    recommend::{RecommendKind, Recommendation},
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
    let question = RecommendQuestion {
        namespaces,
        since_unix_nanos: q.since.unwrap_or(0),
        learning_window: q
            .learning_seconds
            .map_or(RecommendQuestion::DEFAULT_LEARNING, Duration::from_secs),
        kind: q.kind.unwrap_or_default(),
    };
    // Folding every record costs CPU (and reading the history, disk): off the runtime's
    // workers.
    tokio::task::spawn_blocking(move || {
        Ok(axum::Json(answers::recommend(&s.hub, &s.flows, &question)?))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}
