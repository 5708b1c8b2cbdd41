//! The lab's input: Kubernetes YAML files, validated by the policy engine's own loader (and the
//! lab's `ExternalHost` kind by the lab), split into pods, objects for the controller and
//! external hosts.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use serde_yaml::Value;

use super::{dns, external, state::ContainerPort};

/// Documents of the given files, after validation with the policy engine's own loader: any
/// invalid document stops the command before anything is created.
pub(super) fn read_documents(files: &[PathBuf]) -> anyhow::Result<Vec<Value>> {
    let loaded = bulkhead_controller::load_paths(files);
    // ExternalHost is the lab's own kind, validated by the lab below, never the controller's.
    for w in loaded
        .skipped
        .iter()
        .filter(|s| !(s.kind == external::KIND && s.api_version == external::API_VERSION))
    {
        eprintln!("warning: {w}");
    }
    if !loaded.errors.is_empty() {
        for e in &loaded.errors {
            eprintln!("{e}");
        }
        bail!(
            "{} invalid document(s); nothing was changed",
            loaded.errors.len()
        );
    }
    let mut paths = Vec::new();
    for f in files {
        collect_yaml(f, &mut paths);
    }
    let mut docs = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
        for de in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(de).with_context(|| format!("parse {}", p.display()))?;
            if v.is_null() {
                continue;
            }
            flatten_list(v, &mut docs);
        }
    }
    Ok(docs)
}

use serde::Deserialize as _;

pub(super) fn collect_yaml(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let mut children: Vec<PathBuf> = std::fs::read_dir(path)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        children.sort();
        for c in children {
            collect_yaml(&c, out);
        }
    } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml")
        || path.is_file() && path.extension().is_none()
    {
        out.push(path.to_path_buf());
    }
}

pub(super) fn flatten_list(v: Value, out: &mut Vec<Value>) {
    let kind = v
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if kind.ends_with("List") {
        if let Some(Value::Sequence(items)) = v.get("items") {
            for i in items {
                flatten_list(i.clone(), out);
            }
        }
        return;
    }
    out.push(v);
}

pub(super) fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_str()
}

pub(super) fn object_key(v: &Value) -> String {
    format!(
        "{}/{}/{}",
        str_at(v, &["kind"]).unwrap_or_default(),
        str_at(v, &["metadata", "namespace"]).unwrap_or("default"),
        str_at(v, &["metadata", "name"]).unwrap_or_default()
    )
}

/// Pods of a Deployment: `replicas` copies of its template named `<deployment>-<i>`.
pub(super) fn expand_deployment(d: &Value) -> Vec<Value> {
    let name = str_at(d, &["metadata", "name"]).unwrap_or_default();
    let namespace = str_at(d, &["metadata", "namespace"]).unwrap_or("default");
    let replicas = d
        .get("spec")
        .and_then(|s| s.get("replicas"))
        .and_then(Value::as_u64)
        .unwrap_or(1);
    let template = d
        .get("spec")
        .and_then(|s| s.get("template"))
        .cloned()
        .unwrap_or(Value::Null);
    (0..replicas)
        .map(|i| {
            // Built field by field: the names are the user's, never spliced into YAML text.
            let map = |pairs: Vec<(&str, Value)>| {
                Value::Mapping(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
            };
            let owner = map(vec![
                ("apiVersion", "apps/v1".into()),
                ("kind", "Deployment".into()),
                ("name", name.into()),
                ("uid", "lab".into()),
            ]);
            let mut pod = map(vec![
                ("apiVersion", "v1".into()),
                ("kind", "Pod".into()),
                (
                    "metadata",
                    map(vec![
                        ("name", format!("{name}-{i}").into()),
                        ("namespace", namespace.into()),
                        ("ownerReferences", Value::Sequence(vec![owner])),
                    ]),
                ),
            ]);
            if let Some(labels) = template.get("metadata").and_then(|m| m.get("labels")) {
                pod["metadata"]["labels"] = labels.clone();
            }
            pod["spec"] = template
                .get("spec")
                .cloned()
                .unwrap_or(Value::Mapping(Default::default()));
            pod
        })
        .collect()
}

pub(super) fn pod_ports(pod: &Value) -> Vec<ContainerPort> {
    let mut out = Vec::new();
    if let Some(Value::Sequence(containers)) = pod.get("spec").and_then(|s| s.get("containers")) {
        for c in containers {
            if let Some(Value::Sequence(ports)) = c.get("ports") {
                for p in ports {
                    if let Some(port) = p.get("containerPort").and_then(Value::as_u64) {
                        out.push(ContainerPort {
                            port: port as u16,
                            protocol: p
                                .get("protocol")
                                .and_then(Value::as_str)
                                .unwrap_or("TCP")
                                .to_uppercase(),
                        });
                    }
                }
            }
        }
    }
    out
}

/// What the lab's manifests declare: pod documents (Deployments expanded), objects for the
/// controller, the lab's own external hosts, and labels for lab nodes (from Node objects).
pub(super) struct Declared {
    pub pods: BTreeMap<String, Value>,
    pub objects: BTreeMap<String, Value>,
    pub external_hosts: BTreeMap<String, external::ExternalHost>,
    pub node_labels: BTreeMap<String, BTreeMap<String, String>>,
}

/// A Node object's labels. Lab nodes are the lab's own (their names, `node-1`…, and their
/// addresses on the lab fabric): a Node document only gives one its labels, so anything else
/// in it is ignored.
fn node_labels(d: &Value) -> anyhow::Result<(String, BTreeMap<String, String>)> {
    let name = str_at(d, &["metadata", "name"])
        .filter(|n| !n.is_empty())
        .context("a Node needs metadata.name (node-1, node-2, … in a lab)")?;
    let mut labels = BTreeMap::new();
    if let Some(map) = d.get("metadata").and_then(|m| m.get("labels")) {
        let map = map
            .as_mapping()
            .with_context(|| format!("Node {name}: metadata.labels must be a map"))?;
        for (k, v) in map {
            let (Some(k), Some(v)) = (k.as_str(), v.as_str()) else {
                bail!("Node {name}: metadata.labels: keys and values must be strings");
            };
            labels.insert(k.to_string(), v.to_string());
        }
    }
    Ok((name.to_string(), labels))
}

/// Splits documents into pods, objects and external hosts (validated: an invalid one stops the
/// command before anything is changed).
/// `dns` is the lab's cluster DNS address, which no declared pod may take.
pub(super) fn classify(docs: Vec<Value>, dns: std::net::Ipv4Addr) -> anyhow::Result<Declared> {
    let mut pods = BTreeMap::new();
    let mut objects = BTreeMap::new();
    let mut external_hosts = BTreeMap::new();
    let mut node_labels_by_name = BTreeMap::new();
    for d in docs {
        if external::is_external_host(&d) {
            let host = external::parse(&d)?;
            external_hosts.insert(host.name.clone(), host);
            continue;
        }
        match str_at(&d, &["kind"]) {
            Some("Pod") => {
                let key = format!(
                    "{}/{}",
                    str_at(&d, &["metadata", "namespace"]).unwrap_or("default"),
                    str_at(&d, &["metadata", "name"]).unwrap_or_default()
                );
                pods.insert(key, d);
            }
            Some("Deployment") => {
                for p in expand_deployment(&d) {
                    let key = format!(
                        "{}/{}",
                        str_at(&p, &["metadata", "namespace"]).unwrap_or("default"),
                        str_at(&p, &["metadata", "name"]).unwrap_or_default()
                    );
                    pods.insert(key, p);
                }
            }
            Some("Node") => {
                let (name, labels) = node_labels(&d)?;
                node_labels_by_name.insert(name, labels);
            }
            _ => {
                objects.insert(object_key(&d), d);
            }
        }
    }
    let dns_address = dns.to_string();
    if let Some((key, _)) = pods.iter().find(|(_, p)| {
        str_at(p, &["status", "podIP"]) == Some(dns_address.as_str())
            || p.get("status")
                .and_then(|s| s.get("podIPs"))
                .and_then(Value::as_sequence)
                .is_some_and(|ips| {
                    ips.iter()
                        .any(|i| str_at(i, &["ip"]) == Some(dns_address.as_str()))
                })
    }) {
        bail!("pod {key}: {dns_address} is the lab's cluster DNS address: give the pod another");
    }
    if pods.contains_key(dns::POD_KEY) {
        bail!(
            "pod {} is the lab's cluster DNS: give yours another name",
            dns::POD_KEY
        );
    }
    Ok(Declared {
        pods,
        objects,
        external_hosts,
        node_labels: node_labels_by_name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_document_gives_a_lab_node_its_labels_only() {
        let docs: Vec<Value> = [
            "apiVersion: v1\nkind: Node\nmetadata: {name: node-2, labels: {role: ingress, kubernetes.io/os: linux}}\nstatus: {addresses: [{type: InternalIP, address: 192.0.2.9}]}",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}",
        ]
        .iter()
        .map(|d| serde_yaml::from_str(d).expect("yaml"))
        .collect();
        let d = classify(docs, dns::ADDRESS_V4).expect("valid");
        assert_eq!(d.node_labels.len(), 1);
        assert_eq!(d.node_labels["node-2"]["role"], "ingress");
        assert_eq!(d.objects.len(), 1, "the Node is not passed on as it is");
        let bad: Value =
            serde_yaml::from_str("apiVersion: v1\nkind: Node\nmetadata: {labels: {a: b}}")
                .expect("yaml");
        assert!(classify(vec![bad], dns::ADDRESS_V4).is_err());
    }

    #[test]
    fn a_deployment_becomes_its_replicas_with_the_templates_labels_and_an_owner() {
        let d: Value = serde_yaml::from_str(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\nspec:\n  replicas: 2\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: c, image: x, ports: [{containerPort: 80}]}]}\n",
        )
        .expect("yaml");
        let pods = expand_deployment(&d);
        let keys: Vec<String> = pods.iter().map(object_key).collect();
        assert_eq!(keys, ["Pod/shop/web-0", "Pod/shop/web-1"]);
        for p in &pods {
            assert_eq!(str_at(p, &["apiVersion"]), Some("v1"));
            assert_eq!(str_at(p, &["metadata", "labels", "app"]), Some("web"));
            let owner = &p["metadata"]["ownerReferences"][0];
            assert_eq!(str_at(owner, &["kind"]), Some("Deployment"));
            assert_eq!(str_at(owner, &["name"]), Some("web"));
            assert_eq!(pod_ports(p).len(), 1);
        }
    }
}
