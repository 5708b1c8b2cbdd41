//! `POST /api/impact?since=NANOS&until=NANOS&delete=KIND/NS/NAME,…` with a YAML body (the
//! proposal: NetworkPolicy, ClusterNetworkPolicy and ServicePolicy documents): the recorded
//! flows of the window replayed against the current policies and against them changed by the
//! proposal ([`crate::impact`]), answered as an [`Impact`]. `bulkhead policy impact` prints it.
//!
//! It reads like every `/api` route (behind the same authentication layer: a viewer may ask),
//! and changes nothing: the proposal is compiled into engines of its own. It is a POST because
//! the proposal is a document; the body must be sent as `Content-Type: application/yaml` (or
//! `application/x-yaml`, `text/yaml`), which a page of another site cannot send without a CORS
//! preflight this server never grants, and is at most [`MAX_PROPOSAL_BYTES`]. A proposal that
//! does not load is a 400 naming the document, field and reason.

use axum::{
    body::Bytes,
    extract::{Query, State},
    http::{HeaderMap, StatusCode, header},
};
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiState};
use crate::{
    answers::{self, ImpactQuestion},
    impact::{Impact, MAX_PROPOSAL_BYTES, ProposalError, parse_delete},
};

/// The query of `/api/impact`.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ImpactQuery {
    /// Only records from this time on (unix nanoseconds).
    pub since: Option<u64>,
    /// Only records at or before this time (unix nanoseconds).
    pub until: Option<u64>,
    /// Comma-separated policies to delete, each `KIND/NAMESPACE/NAME`
    /// (`ClusterNetworkPolicy/NAME`).
    pub delete: Option<String>,
}

impl ImpactQuery {
    /// The path with this query.
    pub fn path(&self) -> String {
        let mut q = Vec::new();
        if let Some(s) = self.since {
            q.push(format!("since={s}"));
        }
        if let Some(u) = self.until {
            q.push(format!("until={u}"));
        }
        if let Some(d) = &self.delete {
            q.push(format!("delete={d}"));
        }
        format!("/api/impact?{}", q.join("&"))
    }
}

/// The content types a proposal may be sent as.
const YAML_TYPES: [&str; 3] = ["application/yaml", "application/x-yaml", "text/yaml"];

impl From<ProposalError> for ApiError {
    fn from(e: ProposalError) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, e.to_string())
    }
}

pub(super) async fn impact(
    State(s): State<ApiState>,
    query: Result<Query<ImpactQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<axum::Json<Impact>, ApiError> {
    let Query(q) = query.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("bad query: {}", e.body_text().to_lowercase()),
        )
    })?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    if !YAML_TYPES.contains(&content_type.as_str()) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the proposal as YAML with content-type: application/yaml",
        ));
    }
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "the proposal is not UTF-8 text"))?
        .to_string();
    let delete = q
        .delete
        .iter()
        .flat_map(|d| d.split(','))
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(parse_delete)
        .collect::<Result<Vec<_>, _>>()?;
    let question = ImpactQuestion {
        proposal_yaml: text,
        delete,
        since_unix_nanos: q.since.unwrap_or(0),
        until_unix_nanos: q.until.unwrap_or(u64::MAX),
    };
    // Compiling two engines and folding every record costs CPU (and reading the history,
    // disk): off the runtime's workers.
    tokio::task::spawn_blocking(move || {
        Ok(axum::Json(answers::impact(&s.hub, &s.flows, &question)?))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

/// The most a proposal body may be (the YAML, with room for a little framing).
pub(super) const MAX_BODY_BYTES: usize = MAX_PROPOSAL_BYTES;
