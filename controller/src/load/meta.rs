//! Object metadata shared by every kind (Kubernetes' own `ObjectMeta`): names, namespaces and
//! labels, checked.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::error::FieldError;
use crate::model::Labels;
use crate::selector::{dns_subdomain_problem, validate_label_key, validate_label_value};

pub(super) fn meta_name(
    meta: &ObjectMeta,
    prefix: &str,
    _namespaced: bool,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    match &meta.name {
        None => {
            errors.push(FieldError::new(
                format!("{prefix}metadata.name"),
                "missing metadata.name: every object needs a name",
            ));
            None
        }
        Some(n) => match dns_subdomain_problem(n) {
            Some(problem) => {
                errors.push(FieldError::new(format!("{prefix}metadata.name"), problem));
                None
            }
            None => Some(n.clone()),
        },
    }
}

pub(super) fn meta_namespace(
    meta: &ObjectMeta,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    let ns = meta.namespace.clone().unwrap_or_else(|| "default".into());
    if let Some(problem) = dns_label_problem(&ns) {
        errors.push(FieldError::new(
            format!("{prefix}metadata.namespace"),
            problem,
        ));
        return None;
    }
    Some(ns)
}

pub(super) fn dns_label_problem(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    (!ok).then(|| {
        format!("{name:?} is not a DNS label: use at most 63 lower-case alphanumerics or '-', beginning and ending with an alphanumeric")
    })
}

pub(super) fn labels(
    meta: &ObjectMeta,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Labels> {
    check_labels(
        meta.labels.as_ref(),
        &format!("{prefix}metadata.labels"),
        errors,
    )
}

fn check_labels(
    labels: Option<&BTreeMap<String, String>>,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Labels> {
    let before = errors.len();
    let labels = labels.cloned().unwrap_or_default();
    for (k, v) in &labels {
        validate_label_key(k, path, errors);
        validate_label_value(v, &format!("{path}.{k}"), errors);
    }
    (errors.len() == before).then_some(labels)
}
