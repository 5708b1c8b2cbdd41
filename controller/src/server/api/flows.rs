//! `GET /api/flows` (also `/api/flows/query`): recent flows filtered server-side
//! ([`FlowQuery`]), newest first, each with its two ends named as the service graph names them
//! and its deciding rule structured. The web UI's flow lists and `bulkhead flows` read it.
//! With `history=true` the records come from the flow history on disk (a time range, within
//! its retention) instead of those held in memory.

use axum::{
    extract::{Query, State},
    http::StatusCode,
};

use super::{ApiError, ApiState, DecidedBy, FlowLine, FlowQuery, FlowView, map::Cluster};
use crate::{
    flows::{
        FlowFilter,
        history::{FlowHistory, HistoryQuery},
        peer_name_matches,
    },
    ruleset::{FlowEntry, NamePattern, cluster::split_namespace},
};

/// Records looked through for one answer, newest first.
const SCANNED: usize = 20_000;

pub(super) async fn flows(
    State(s): State<ApiState>,
    query: Result<Query<FlowQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<Vec<FlowView>>, ApiError> {
    let Query(q) = query.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("bad query: {}", e.body_text().to_lowercase()),
        )
    })?;
    if let Some(name) = &q.peer_name {
        NamePattern::parse(name).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("bad query: peer_name: {e}"),
            )
        })?;
    }
    let history = if q.history == Some(true) {
        let h = s.flows.lock().ok().and_then(|f| f.history().cloned());
        Some(h.ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "this controller keeps no flow history (it runs with --no-flow-history, or with --kubernetes and no --flow-history)",
            )
        })?)
    } else {
        None
    };
    // Filtering and naming cost CPU in a large cluster: off the runtime's workers.
    tokio::task::spawn_blocking(move || match history {
        Some(h) => from_history(&s, &q, &h),
        None => {
            let records = s
                .flows
                .lock()
                .map(|f| f.recent(SCANNED))
                .unwrap_or_default();
            Ok(select(&s, &q, records.into_iter()))
        }
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map(axum::Json)
}

/// The namespaces of a record's ends: `[source workload, destination workload, source pod,
/// destination pod]`, as [`Cluster::ends`] names them. Found from the end: a peer cluster's
/// namespaces are `cluster/namespace`, while pod names and `Kind/name` hold no further `/`.
fn namespaces([src, dst, src_pod, dst_pod]: [&str; 4]) -> impl Iterator<Item = &str> {
    [src, dst]
        .into_iter()
        .filter_map(|w| w.rsplitn(3, '/').nth(2))
        .chain(
            [src_pod, dst_pod]
                .into_iter()
                .filter_map(|p| p.rsplit_once('/').map(|(ns, _)| ns)),
        )
}

/// The newest matching records of the history in the query's time range.
fn from_history(s: &ApiState, q: &FlowQuery, h: &FlowHistory) -> Result<Vec<FlowView>, ApiError> {
    // The pod, namespace and verdict filters are the history's own (records there have their
    // peers named); the rest is checked as for the records in memory.
    let verdict = q.verdict.as_ref().map(|v| match v.as_str() {
        "audit" => "audit-would-deny".to_string(),
        v => v.to_string(),
    });
    let query = HistoryQuery {
        filter: FlowFilter {
            namespace: q.namespace.clone(),
            pod: q.pod.clone(),
            verdict,
            staged_verdict: q.staged_verdict.clone(),
            since_unix_nanos: q.since.unwrap_or(0),
            peer_name: peer_name(q),
            cluster: q.cluster.clone(),
        },
        until_unix_nanos: q.until,
        newest_first: true,
    };
    let failed = |e: crate::flows::history::HistoryError| {
        tracing::error!(error = %e, "reading the flow history");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    };
    let records = h.query(query).map_err(failed)?;
    let mut error = None;
    let out = select(
        s,
        q,
        records.map_while(|r| match r {
            Ok(r) => Some((r.node, r.entry)),
            Err(e) => {
                error = Some(e);
                None
            }
        }),
    );
    match error {
        Some(e) => Err(failed(e)),
        None => Ok(out),
    }
}

/// The query's peer name (checked when the query arrived).
fn peer_name(q: &FlowQuery) -> Option<NamePattern> {
    q.peer_name
        .as_deref()
        .and_then(|n| NamePattern::parse(n).ok())
}

fn select(
    s: &ApiState,
    q: &FlowQuery,
    records: impl Iterator<Item = (String, FlowEntry)>,
) -> Vec<FlowView> {
    let most = if q.history == Some(true) {
        FlowQuery::MAX_HISTORY_LIMIT
    } else {
        FlowQuery::MAX_LIMIT
    };
    let limit = q.limit.unwrap_or(most).clamp(1, most);
    let cluster = Cluster::of(&s.hub);
    let peer_name = peer_name(q);
    let mut out = Vec::new();
    for (node, mut e) in records {
        if q.since.is_some_and(|t| e.time_unix_nanos() < t)
            || q.until.is_some_and(|t| e.time_unix_nanos() > t)
        {
            continue;
        }
        if let Some(v) = &q.verdict {
            let want = if v == "audit" { "audit-would-deny" } else { v };
            if e.verdict_str() != want {
                continue;
            }
        }
        if let Some(v) = &q.staged_verdict
            && !matches!(&e, FlowEntry::Flow(r) if r.staged_verdict().as_str() == v)
        {
            continue;
        }
        if let Some(wanted) = &peer_name
            && !matches!(&e, FlowEntry::Flow(r) if peer_name_matches(&r.peer_names, wanted))
        {
            continue;
        }
        // Agents name only their own node's pods: name the rest here.
        if let FlowEntry::Flow(r) = &mut e
            && r.peer.is_none()
        {
            r.peer = cluster.pod_of_ip.get(&r.peer_address()).cloned();
        }
        let (src, dst, src_pod, dst_pod) = match &e {
            FlowEntry::Quarantine(q) => {
                let w = cluster
                    .workload_of_pod
                    .get(&q.pod)
                    .cloned()
                    .unwrap_or_default();
                (w.clone(), w, q.pod.to_string(), q.pod.to_string())
            }
            FlowEntry::Flow(r) => cluster.ends(r),
        };
        let record = match &e {
            FlowEntry::Flow(r) => Some(r),
            FlowEntry::Quarantine(_) => None,
        };
        let (dst_port, protocol) =
            record.map_or((0, 0), |r| (r.dst_port as u32, r.protocol as u32));
        if let Some(w) = &q.workload
            && &src != w
            && &dst != w
        {
            continue;
        }
        // An edge's flows: a quarantine action is on no edge.
        if (q.src.is_some() || q.dst.is_some()) && record.is_none() {
            continue;
        }
        if q.src.as_ref().is_some_and(|w| &src != w)
            || q.dst.as_ref().is_some_and(|w| &dst != w)
            || q.port.is_some_and(|p| dst_port != p)
            || q.protocol.is_some_and(|p| protocol != p)
        {
            continue;
        }
        if let Some(p) = &q.pod
            && &src_pod != p
            && &dst_pod != p
        {
            continue;
        }
        // The namespace of either end's pod or workload.
        let ends = [
            src.as_str(),
            dst.as_str(),
            src_pod.as_str(),
            dst_pod.as_str(),
        ];
        if let Some(ns) = &q.namespace
            && !namespaces(ends).any(|n| n == ns)
        {
            continue;
        }
        // The peer cluster of either end.
        if let Some(c) = &q.cluster
            && !namespaces(ends).any(|n| split_namespace(n).0 == Some(c.as_str()))
        {
            continue;
        }
        let line = FlowLine::of(&node, &e);
        out.push(FlowView {
            rule_id: record.map_or(0, |r| r.rule_id),
            decided_by: DecidedBy::of(record.map(|r| &r.rule), &line.rule),
            packets: record.map_or(0, |r| r.packets),
            bytes: record.map_or(0, |r| r.bytes),
            src_workload: src,
            dst_workload: dst,
            src_pod,
            dst_pod,
            line,
        });
        if out.len() >= limit {
            break;
        }
    }
    out
}
