//! Kubernetes label selectors: validation with the API server's rules, and matching.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::FieldError;

/// A `metav1.LabelSelector` as written in YAML.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelectorSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_expressions: Option<Vec<LabelSelectorRequirementSpec>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelSelectorRequirementSpec {
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub operator: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    /// Sorted and free of duplicates.
    pub values: Vec<String>,
}

impl Requirement {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.binary_search(v).is_ok()),
            Operator::NotIn => value.is_none_or(|v| self.values.binary_search(v).is_err()),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// A validated, normalized selector: the AND of its requirements. Empty selects everything.
/// Two selectors that select the same way compare equal, so they can be shared.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// The selector that selects everything.
    pub fn everything() -> Selector {
        Selector::default()
    }

    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    /// `key=value` for each pair (what `matchLabels` means).
    pub fn from_labels<'a>(labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> Selector {
        let mut requirements: Vec<Requirement> = labels
            .into_iter()
            .map(|(k, v)| Requirement {
                key: k.to_string(),
                operator: Operator::In,
                values: vec![v.to_string()],
            })
            .collect();
        requirements.sort();
        requirements.dedup();
        Selector { requirements }
    }

    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Validates `spec` as the API server does, reporting problems under `path`.
    pub fn parse(
        spec: &LabelSelectorSpec,
        path: &str,
        errors: &mut Vec<FieldError>,
    ) -> Option<Selector> {
        let before = errors.len();
        let mut requirements = Vec::new();
        if let Some(labels) = &spec.match_labels {
            for (k, v) in labels {
                let p = format!("{path}.matchLabels");
                validate_label_key(k, &p, errors);
                validate_label_value(v, &format!("{p}.{k}"), errors);
                requirements.push(Requirement {
                    key: k.clone(),
                    operator: Operator::In,
                    values: vec![v.clone()],
                });
            }
        }
        for (i, expr) in spec.match_expressions.iter().flatten().enumerate() {
            let p = format!("{path}.matchExpressions[{i}]");
            validate_label_key(&expr.key, &format!("{p}.key"), errors);
            let operator = match expr.operator.as_str() {
                "In" => Operator::In,
                "NotIn" => Operator::NotIn,
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    errors.push(FieldError::new(
                        format!("{p}.operator"),
                        format!(
                            "unknown operator {other:?}: use In, NotIn, Exists or DoesNotExist"
                        ),
                    ));
                    continue;
                }
            };
            let values = expr.values.clone().unwrap_or_default();
            match operator {
                Operator::In | Operator::NotIn if values.is_empty() => {
                    errors.push(FieldError::new(
                        format!("{p}.values"),
                        format!("operator {:?} needs at least one value", operator),
                    ));
                }
                Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                    errors.push(FieldError::new(
                        format!("{p}.values"),
                        format!("operator {:?} must not have values", operator),
                    ));
                }
                _ => {}
            }
            for (j, v) in values.iter().enumerate() {
                validate_label_value(v, &format!("{p}.values[{j}]"), errors);
            }
            let values: BTreeSet<String> = values.into_iter().collect();
            requirements.push(Requirement {
                key: expr.key.clone(),
                operator,
                values: values.into_iter().collect(),
            });
        }
        if errors.len() > before {
            return None;
        }
        requirements.sort();
        requirements.dedup();
        Some(Selector { requirements })
    }

    /// Label keys the selector looks at.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.requirements.iter().map(|r| r.key.as_str())
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'
}

/// A qualified name (label name part): at most 63 characters, alphanumerics, `-`, `_`, `.`,
/// beginning and ending with an alphanumeric.
fn qualified_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("name part must not be empty".into());
    }
    if name.len() > 63 {
        return Some(format!("name part {name:?} is longer than 63 characters"));
    }
    let first = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let last = name
        .chars()
        .last()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if !first || !last || !name.chars().all(is_name_char) {
        return Some(format!(
            "{name:?} must consist of alphanumerics, '-', '_' or '.', and begin and end with an alphanumeric"
        ));
    }
    None
}

/// A DNS-1123 subdomain: lower-case alphanumerics, `-` and `.`, at most 253 characters.
pub fn dns_subdomain_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("must not be empty".into());
    }
    if name.len() > 253 {
        return Some(format!("{name:?} is longer than 253 characters"));
    }
    for part in name.split('.') {
        let ok = !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !part.starts_with('-')
            && !part.ends_with('-');
        if !ok {
            return Some(format!(
                "{name:?} is not a DNS subdomain: use lower-case alphanumerics, '-' and '.', each part beginning and ending with an alphanumeric"
            ));
        }
    }
    None
}

pub fn validate_label_key(key: &str, path: &str, errors: &mut Vec<FieldError>) {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix
        && let Some(problem) = dns_subdomain_problem(prefix)
    {
        errors.push(FieldError::new(
            path,
            format!("invalid label key {key:?}: prefix {problem}"),
        ));
        return;
    }
    if let Some(problem) = qualified_name_problem(name) {
        errors.push(FieldError::new(
            path,
            format!("invalid label key {key:?}: {problem}"),
        ));
    }
}

pub fn validate_label_value(value: &str, path: &str, errors: &mut Vec<FieldError>) {
    if value.is_empty() {
        return;
    }
    if let Some(problem) = qualified_name_problem(value) {
        errors.push(FieldError::new(
            path,
            format!(
                "invalid label value {value:?}: {}",
                problem.replace("name part ", "")
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn parse(yaml: &str) -> (Option<Selector>, Vec<FieldError>) {
        let spec: LabelSelectorSpec = serde_yaml::from_str(yaml).expect("test yaml");
        let mut errors = Vec::new();
        let s = Selector::parse(&spec, "sel", &mut errors);
        (s, errors)
    }

    #[test]
    fn operators_match_like_kubernetes() {
        let (s, e) = parse(
            "matchLabels: {a: x}\nmatchExpressions:\n- {key: b, operator: In, values: [1, 2]}\n- {key: c, operator: NotIn, values: [z]}\n- {key: d, operator: Exists}\n- {key: e, operator: DoesNotExist}\n",
        );
        assert!(e.is_empty(), "{e:?}");
        let s = s.expect("valid");
        assert!(s.matches(&labels(&[("a", "x"), ("b", "2"), ("d", "")])));
        assert!(s.matches(&labels(&[("a", "x"), ("b", "1"), ("c", "y"), ("d", "q")])));
        assert!(!s.matches(&labels(&[("a", "x"), ("b", "1"), ("c", "z"), ("d", "")])));
        assert!(!s.matches(&labels(&[("a", "x"), ("b", "3"), ("d", "")])));
        assert!(!s.matches(&labels(&[("a", "x"), ("b", "1")])));
        assert!(!s.matches(&labels(&[("a", "x"), ("b", "1"), ("d", ""), ("e", "")])));
        assert!(Selector::everything().matches(&labels(&[])));
    }

    #[test]
    fn equal_selectors_normalize_equal() {
        let (a, _) = parse("matchLabels: {a: x}");
        let (b, _) = parse("matchExpressions: [{key: a, operator: In, values: [x, x]}]");
        assert_eq!(a, b);
    }

    #[test]
    fn invalid_selectors_are_reported_with_paths() {
        let (s, e) = parse("matchExpressions: [{key: a, operator: In}]");
        assert!(s.is_none());
        assert_eq!(e[0].path, "sel.matchExpressions[0].values");
        assert!(e[0].reason.contains("needs at least one value"));
        let (_, e) = parse("matchExpressions: [{key: a, operator: Exists, values: [x]}]");
        assert!(e[0].reason.contains("must not have values"));
        let (_, e) = parse("matchExpressions: [{key: a, operator: Equals, values: [x]}]");
        assert!(e[0].reason.contains("unknown operator"));
        let (_, e) = parse("matchLabels: {'-bad': x}");
        assert!(e[0].reason.contains("invalid label key"));
        let (_, e) = parse("matchLabels: {'Example.COM/a': x}");
        assert!(e[0].reason.contains("prefix"));
        let (_, e) = parse("matchLabels: {a: 'has space'}");
        assert!(e[0].reason.contains("invalid label value"));
        assert_eq!(e[0].path, "sel.matchLabels.a");
        let (s, e) = parse("matchLabels: {'example.com/a-b_c.d': ''}");
        assert!(e.is_empty() && s.is_some());
    }
}
