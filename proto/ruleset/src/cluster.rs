//! Clusters: names, the label that marks which cluster a pod or namespace belongs to, and how a
//! peer cluster's namespaces are named inside this cluster's controller.
//!
//! A controller imports the inventory of its peer clusters (see the controller's `peering`
//! module). Their namespaces enter the engine under a *qualified* name, `<cluster>/<namespace>`:
//! a `/` can never appear in a Kubernetes namespace name, so a remote namespace can never be
//! mistaken for a local one, and every remote pod's [`crate::PodKey`] reads
//! `cluster/namespace/pod`, which is also how flows and the graph name remote workloads.
//!
//! Every pod and namespace carries [`CLUSTER_LABEL`]: remote ones their cluster's name, local
//! ones the local cluster's name (or nothing when none is configured; a value a local object sets
//! itself is overwritten, so a local pod can never pass for a remote one).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The label naming the cluster a pod or namespace belongs to. A selector matches pods of a
/// peer cluster only when it names this label (see the README's "Across clusters").
pub const CLUSTER_LABEL: &str = "bulkhead.dev/cluster";

/// Longest cluster name: it becomes part of namespace names and label values.
pub const MAX_CLUSTER_NAME: usize = 32;

/// A cluster's name: a DNS label (lower-case letters, digits and `-`, starting with a letter,
/// not ending with `-`), at most [`MAX_CLUSTER_NAME`] characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClusterName(String);

/// Text that is not a valid cluster name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a valid cluster name: use 1 to 32 lower-case letters, digits or '-', starting with a letter and not ending with '-'"
)]
pub struct BadClusterName(pub String);

impl ClusterName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name a namespace of this (peer) cluster has inside the local controller.
    pub fn qualify(&self, namespace: &str) -> String {
        format!("{}/{namespace}", self.0)
    }
}

impl FromStr for ClusterName {
    type Err = BadClusterName;

    fn from_str(s: &str) -> Result<ClusterName, BadClusterName> {
        let ok = !s.is_empty()
            && s.len() <= MAX_CLUSTER_NAME
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && !s.ends_with('-')
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if ok {
            Ok(ClusterName(s.to_string()))
        } else {
            Err(BadClusterName(s.to_string()))
        }
    }
}

impl TryFrom<String> for ClusterName {
    type Error = BadClusterName;
    fn try_from(s: String) -> Result<ClusterName, BadClusterName> {
        s.parse()
    }
}

impl From<ClusterName> for String {
    fn from(c: ClusterName) -> String {
        c.0
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A namespace name as the engine holds it, split: `(Some(cluster), namespace)` for a peer
/// cluster's namespace (`cluster/namespace`), `(None, name)` for a local one.
pub fn split_namespace(name: &str) -> (Option<&str>, &str) {
    match name.split_once('/') {
        Some((cluster, ns)) => (Some(cluster), ns),
        None => (None, name),
    }
}

/// Whether a namespace name (as the engine holds it) is a peer cluster's.
pub fn is_remote_namespace(name: &str) -> bool {
    name.contains('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        for good in ["east", "w", "us-east-1", "a1"] {
            assert_eq!(good.parse::<ClusterName>().unwrap().as_str(), good);
        }
        for bad in [
            "",
            "East",
            "1east",
            "east-",
            "ea_st",
            "a/b",
            "-a",
            &"a".repeat(33),
        ] {
            let err = bad.parse::<ClusterName>().unwrap_err();
            assert!(
                err.to_string().contains("not a valid cluster name"),
                "{bad}"
            );
        }
    }

    #[test]
    fn qualified_namespaces_split_back() {
        let west: ClusterName = "west".parse().unwrap();
        let q = west.qualify("shop");
        assert_eq!(q, "west/shop");
        assert_eq!(split_namespace(&q), (Some("west"), "shop"));
        assert_eq!(split_namespace("shop"), (None, "shop"));
        assert!(is_remote_namespace(&q) && !is_remote_namespace("shop"));
    }

    #[test]
    fn serde_refuses_bad_names() {
        assert!(serde_json::from_str::<ClusterName>("\"West\"").is_err());
        let c: ClusterName = serde_json::from_str("\"west\"").unwrap();
        assert_eq!(serde_json::to_string(&c).unwrap(), "\"west\"");
    }
}
