//! What the controller writes back: the `status` of each ServicePolicy and Quarantine
//! (conditions `Accepted` and `Realized`, and for quarantines when each node enforced it and the
//! connections cut), by server-side apply to the status subresource with the field manager
//! `bulkhead-controller`, and a Warning Event for every policy object it rejects.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde_json::{Value, json};

use super::inventory::{ApiKey, Kind, Verdict};
use crate::distribution::hub::PolicyRealization;

/// The field manager of everything the controller writes.
pub const FIELD_MANAGER: &str = "bulkhead-controller";

/// Condition messages are limited to 32 KiB by the API; Events' notes to 1 KiB.
const CONDITION_MESSAGE_MAX: usize = 32 * 1024;
pub const EVENT_NOTE_MAX: usize = 1024;

pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Where a quarantine is enforced: per node, when its agent had it in its kernel, and the
/// connections that cut.
pub type Enforcement = BTreeMap<String, (SystemTime, u64)>;

/// One condition; `lastTransitionTime` is carried over from `previous` while the status stays.
fn condition(
    kind: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    previous: Option<&Value>,
    now: SystemTime,
) -> Value {
    let status = if status { "True" } else { "False" };
    let since = previous
        .and_then(|p| p.get("conditions"))
        .and_then(Value::as_array)
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
        })
        .filter(|c| c.get("status").and_then(Value::as_str) == Some(status))
        .and_then(|c| c.get("lastTransitionTime").cloned())
        .unwrap_or_else(|| Value::String(rfc3339(now)));
    let mut c = json!({
        "type": kind,
        "status": status,
        "reason": reason,
        "message": truncate(message, CONDITION_MESSAGE_MAX),
        "lastTransitionTime": since,
    });
    if let Some(g) = generation {
        c["observedGeneration"] = json!(g);
    }
    c
}

/// The status the controller wants a ServicePolicy or Quarantine to have.
pub fn desired_status(
    key: &ApiKey,
    verdict: &Verdict,
    realization: Option<&PolicyRealization>,
    enforcement: &Enforcement,
    previous: Option<&Value>,
    now: SystemTime,
) -> Value {
    let generation = verdict.generation;
    let accepted = match &verdict.invalid {
        None => condition(
            "Accepted",
            true,
            "Accepted",
            "the policy is valid and compiled into the rule sets",
            generation,
            previous,
            now,
        ),
        Some(problem) => {
            let message = if verdict.kept_last_good {
                format!("{problem} (the previous version stays in force until this is fixed)")
            } else {
                problem.clone()
            };
            condition(
                "Accepted", false, "Invalid", &message, generation, previous, now,
            )
        }
    };
    let in_force = verdict.invalid.is_none() || verdict.kept_last_good;
    let (nodes, realized) = realization.map_or((0, 0), |r| (r.nodes, r.realized));
    let realized_condition = if !in_force {
        condition(
            "Realized",
            false,
            "Invalid",
            "not in force: the object is invalid",
            generation,
            previous,
            now,
        )
    } else if nodes == 0 {
        condition(
            "Realized",
            true,
            "NoEndpoints",
            "realized on 0 of 0 nodes: it selects no pod on any node",
            generation,
            previous,
            now,
        )
    } else {
        condition(
            "Realized",
            realized == nodes,
            if realized == nodes {
                "Realized"
            } else {
                "Pending"
            },
            &format!("realized on {realized} of {nodes} nodes"),
            generation,
            previous,
            now,
        )
    };
    let mut status = json!({
        "conditions": [accepted, realized_condition],
        "nodes": nodes,
        "realizedNodes": realized,
    });
    if let Some(g) = generation {
        status["observedGeneration"] = json!(g);
    }
    if key.kind == Kind::Quarantine {
        let enforced: serde_json::Map<String, Value> = enforcement
            .iter()
            .map(|(node, (at, _))| {
                (
                    node.clone(),
                    Value::String(humantime::format_rfc3339_millis(*at).to_string()),
                )
            })
            .collect();
        if !enforced.is_empty() {
            status["enforcedAt"] = Value::Object(enforced);
        }
        status["connectionsCut"] = json!(enforcement.values().map(|(_, cut)| cut).sum::<u64>());
    }
    status
}

/// The server-side apply body for a status: only what the controller owns.
pub fn apply_body(key: &ApiKey, status: &Value) -> Value {
    json!({
        "apiVersion": key.kind.api_version(),
        "kind": key.kind.name(),
        "metadata": {"name": key.name, "namespace": key.namespace},
        "status": status,
    })
}

/// Equal apart from transition times (which only change with a status).
pub fn same_status(a: &Value, b: &Value) -> bool {
    a == b
}
