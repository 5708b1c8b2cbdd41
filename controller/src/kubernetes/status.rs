//! What the controller writes back: the `status` of each ServicePolicy and Quarantine
//! (conditions `Accepted` and `Realized`, and for quarantines when each node enforced it and the
//! connections cut), by server-side apply to the status subresource with the field manager
//! `bulkhead-controller`, and a Warning Event for every policy object it rejects.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

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

/// `t` in RFC 3339 (UTC, whole seconds), for any time a `SystemTime` can hold. humantime's
/// formatter panics on times before 1970 (`expect`) and fails after 9999, and a user can write
/// either: a Quarantine with `expiresAt: 0001-01-01T00:00:00Z` is valid, and expired. Years RFC
/// 3339 cannot write (before 0000, after 9999) are clamped to its first or last second.
pub fn rfc3339(t: SystemTime) -> String {
    format_utc(t, false)
}

/// [`rfc3339`] with milliseconds.
pub fn rfc3339_millis(t: SystemTime) -> String {
    format_utc(t, true)
}

fn format_utc(t: SystemTime, millis: bool) -> String {
    /// 0000-01-01T00:00:00Z and 9999-12-31T23:59:59Z, in seconds since 1970.
    const FIRST: i128 = -62_167_219_200;
    const LAST: i128 = 253_402_300_799;
    let (secs, nanos): (i128, u32) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (i128::from(d.as_secs()), d.subsec_nanos()),
        Err(before) => {
            let d = before.duration();
            match d.subsec_nanos() {
                0 => (-i128::from(d.as_secs()), 0),
                n => (-i128::from(d.as_secs()) - 1, 1_000_000_000 - n),
            }
        }
    };
    let (secs, nanos) = if secs < FIRST {
        (FIRST, 0)
    } else if secs > LAST {
        (LAST, 999_999_999)
    } else {
        (secs, nanos)
    };
    // Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's civil_from_days).
    let (days, second_of_day) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i128::from(month <= 2);
    let (hour, minute, second) = (
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60,
    );
    let date = format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}");
    if millis {
        format!("{date}.{:03}Z", nanos / 1_000_000)
    } else {
        format!("{date}Z")
    }
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
    let expired = verdict.expires_at.filter(|t| *t <= now);
    let realized_condition = if let Some(at) = expired {
        condition(
            "Realized",
            false,
            "Expired",
            &format!(
                "expired at {}: no longer enforced (delete the object, or move expiresAt to quarantine again)",
                rfc3339(at)
            ),
            generation,
            previous,
            now,
        )
    } else if !in_force {
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
            .map(|(node, (at, _))| (node.clone(), Value::String(rfc3339_millis(*at))))
            .collect();
        if !enforced.is_empty() {
            status["enforcedAt"] = Value::Object(enforced);
        }
        status["connectionsCut"] = json!(enforcement.values().map(|(_, cut)| cut).sum::<u64>());
    }
    status
}

/// Whether a status (as written, or as the API server has it) already says the quarantine
/// expired: its `Realized` condition has reason `Expired`.
pub fn has_expired(status: Option<&Value>) -> bool {
    status
        .and_then(|s| s.get("conditions"))
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("type").and_then(Value::as_str) == Some("Realized")
                    && c.get("reason").and_then(Value::as_str) == Some("Expired")
            })
        })
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn key(kind: Kind) -> ApiKey {
        ApiKey {
            kind,
            namespace: "shop".into(),
            name: "p".into(),
        }
    }

    fn verdict(invalid: Option<&str>) -> Verdict {
        Verdict {
            uid: "u".into(),
            generation: Some(2),
            resource_version: "7".into(),
            invalid: invalid.map(str::to_string),
            kept_last_good: false,
            expires_at: None,
            status: None,
        }
    }

    fn realization(nodes: u32, realized: u32) -> PolicyRealization {
        PolicyRealization {
            kind: crate::ruleset::RuleKind::ServicePolicy,
            namespace: "shop".into(),
            name: "p".into(),
            nodes,
            realized,
        }
    }

    fn cond<'a>(status: &'a Value, t: &str) -> &'a Value {
        status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == t)
            .unwrap()
    }

    #[test]
    fn transition_times_stay_while_a_condition_keeps_its_status() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let k = key(Kind::ServicePolicy);
        let first = desired_status(
            &k,
            &verdict(None),
            Some(&realization(3, 1)),
            &Enforcement::new(),
            None,
            t0,
        );
        assert_eq!(cond(&first, "Realized")["reason"], "Pending");
        assert_eq!(
            cond(&first, "Realized")["message"],
            "realized on 1 of 3 nodes"
        );
        // Later, one more node: message changes, status does not, so neither does the time.
        let t1 = t0 + Duration::from_secs(60);
        let second = desired_status(
            &k,
            &verdict(None),
            Some(&realization(3, 2)),
            &Enforcement::new(),
            Some(&first),
            t1,
        );
        assert_eq!(
            cond(&second, "Realized")["lastTransitionTime"],
            cond(&first, "Realized")["lastTransitionTime"]
        );
        // Every node: True, with a new transition time; Accepted kept its time throughout.
        let third = desired_status(
            &k,
            &verdict(None),
            Some(&realization(3, 3)),
            &Enforcement::new(),
            Some(&second),
            t1,
        );
        assert_eq!(cond(&third, "Realized")["status"], "True");
        assert_eq!(
            cond(&third, "Realized")["lastTransitionTime"],
            rfc3339(t1).as_str()
        );
        assert_eq!(
            cond(&third, "Accepted")["lastTransitionTime"],
            rfc3339(t0).as_str()
        );
        assert_eq!(third["observedGeneration"], 2);
        assert_eq!(third["realizedNodes"], 3);
    }

    #[test]
    fn invalid_objects_say_why_and_whether_an_older_version_is_in_force() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let k = key(Kind::ServicePolicy);
        let mut v = verdict(Some("spec.mode: unknown mode \"Sometimes\""));
        let s = desired_status(&k, &v, None, &Enforcement::new(), None, now);
        assert_eq!(cond(&s, "Accepted")["status"], "False");
        assert_eq!(cond(&s, "Accepted")["reason"], "Invalid");
        assert_eq!(cond(&s, "Realized")["reason"], "Invalid");
        v.kept_last_good = true;
        let s = desired_status(
            &k,
            &v,
            Some(&realization(1, 1)),
            &Enforcement::new(),
            None,
            now,
        );
        assert!(
            cond(&s, "Accepted")["message"]
                .as_str()
                .unwrap()
                .contains("previous version stays in force")
        );
        assert_eq!(cond(&s, "Realized")["status"], "True");
    }

    #[test]
    fn quarantine_status_names_nodes_times_and_cut_connections_and_expiry() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let k = key(Kind::Quarantine);
        let mut enforcement = Enforcement::new();
        enforcement.insert("node-a".into(), (now, 2));
        enforcement.insert("node-b".into(), (now, 1));
        let mut v = verdict(None);
        let s = desired_status(&k, &v, Some(&realization(2, 2)), &enforcement, None, now);
        assert_eq!(s["connectionsCut"], 3);
        assert_eq!(s["enforcedAt"]["node-a"], "2027-01-15T08:00:00.000Z");
        v.expires_at = Some(now - Duration::from_secs(1));
        let s = desired_status(&k, &v, None, &enforcement, None, now);
        assert_eq!(cond(&s, "Realized")["reason"], "Expired");
    }

    /// Issue 21, finding 7: `expiresAt: 0001-01-01T00:00:00Z` passes the CRD schema and the
    /// loader; formatting it for the `Expired` condition panicked (humantime `expect`s a time
    /// after 1970) and took the status writer down for good.
    #[test]
    fn a_quarantine_that_expired_before_1970_gets_a_status() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut v = verdict(None);
        v.expires_at = Some(
            crate::load::parse_rfc3339("0001-01-01T00:00:00Z").expect("a valid RFC 3339 time"),
        );
        let s = desired_status(
            &key(Kind::Quarantine),
            &v,
            None,
            &Enforcement::new(),
            None,
            now,
        );
        assert_eq!(cond(&s, "Realized")["reason"], "Expired");
        assert!(
            cond(&s, "Realized")["message"]
                .as_str()
                .unwrap()
                .starts_with("expired at 0001-01-01T00:00:00Z:"),
            "{s}"
        );
    }

    #[test]
    fn times_format_like_humantime_where_it_can_and_everywhere_else_too() {
        // Where humantime formats at all (1970..=9999), the same text.
        let mut secs: u64 = 0;
        while secs < 253_402_300_800 {
            let t = UNIX_EPOCH + Duration::new(secs, (secs % 1_000) as u32 * 1_000_123);
            assert_eq!(
                rfc3339(t),
                humantime::format_rfc3339_seconds(t).to_string(),
                "{secs}"
            );
            assert_eq!(
                rfc3339_millis(t),
                humantime::format_rfc3339_millis(t).to_string(),
                "{secs}"
            );
            secs = secs * 3 / 2 + 86_399;
        }
        // Before 1970 and past 9999: round trips through the loader's parser, or clamped.
        for text in [
            "0001-01-01T00:00:00Z",
            "0000-01-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
            "1600-02-29T12:30:00Z",
            "9999-12-31T23:59:59Z",
        ] {
            let t = crate::load::parse_rfc3339(text).expect("valid");
            assert_eq!(rfc3339(t), text);
        }
        let half_before = UNIX_EPOCH - Duration::from_millis(500);
        assert_eq!(rfc3339_millis(half_before), "1969-12-31T23:59:59.500Z");
        let far = UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        assert_eq!(rfc3339(far), "9999-12-31T23:59:59Z");
        let long_ago = UNIX_EPOCH - Duration::from_secs(100_000_000_000);
        assert_eq!(rfc3339(long_ago), "0000-01-01T00:00:00Z");
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let s = "é".repeat(40);
        let t = truncate(&s, 11);
        assert!(t.len() <= 11 && t.ends_with("..."), "{t}");
    }
}
