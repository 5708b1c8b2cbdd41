//! `bulkhead policy promote`: a staged policy becomes the enforced one, in one step.
//!
//! A `StagedNetworkPolicy` becomes the `NetworkPolicy` of its namespace and name (replacing the
//! one there, whose staged edit it was), a `StagedClusterNetworkPolicy` the
//! `ClusterNetworkPolicy` of its name, and an audit-mode ServicePolicy an enforcing one. The
//! enforced object is written first and the staged one removed after, so enforcement changes
//! once, from the old policy to the promoted one; in the lab both happen in one write of its
//! manifest, which the controller applies as one change.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use serde_yaml::{Mapping, Value};

/// A staged object by kind, namespace and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedTarget {
    /// `StagedNetworkPolicy`, `StagedClusterNetworkPolicy` or `ServicePolicy`.
    pub kind: &'static str,
    /// Empty for the cluster-scoped StagedClusterNetworkPolicy.
    pub namespace: String,
    pub name: String,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("place").required(true).args(["lab", "kubernetes"])))]
pub struct PromoteArgs {
    /// What to promote: `NAMESPACE/NAME` (a StagedNetworkPolicy, or an audit-mode
    /// ServicePolicy) or `NAME` (a StagedClusterNetworkPolicy).
    target: String,
    /// Say which kind when a StagedNetworkPolicy and an audit-mode ServicePolicy share the
    /// namespace and name.
    #[arg(long, value_enum)]
    kind: Option<KindArg>,
    /// The lab whose policies to change.
    #[arg(long, value_name = "STATE_DIR")]
    lab: Option<std::path::PathBuf>,
    /// Change the objects in Kubernetes, with your own credentials (in-cluster service
    /// account, else kubeconfig): you need `get`/`delete` on the staged kind and `patch` on
    /// the enforced one.
    #[arg(long)]
    kubernetes: bool,
}

/// (Named as the kinds are, `Policy` and all.)
#[derive(Clone, Copy, clap::ValueEnum)]
#[allow(clippy::enum_variant_names)]
enum KindArg {
    StagedNetworkPolicy,
    StagedClusterNetworkPolicy,
    ServicePolicy,
}

pub fn promote(a: PromoteArgs) -> anyhow::Result<ExitCode> {
    let targets = targets(&a.target, a.kind)?;
    match a.lab {
        Some(lab) => crate::lab::promote(&lab, &targets),
        None => promote_kubernetes(&targets),
    }
}

fn promote_kubernetes(targets: &[StagedTarget]) -> anyhow::Result<ExitCode> {
    use bulkhead_controller::kubernetes::promote::{PromoteError, StagedRef};
    let refs: Vec<StagedRef> = targets
        .iter()
        .map(|t| match t.kind {
            "StagedNetworkPolicy" => StagedRef::NetworkPolicy {
                namespace: t.namespace.clone(),
                name: t.name.clone(),
            },
            "ServicePolicy" => StagedRef::ServicePolicy {
                namespace: t.namespace.clone(),
                name: t.name.clone(),
            },
            _ => StagedRef::ClusterNetworkPolicy {
                name: t.name.clone(),
            },
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    rt.block_on(async move {
        let client = bulkhead_controller::kubernetes::Client::try_default()
            .await
            .context("cannot reach the Kubernetes API (no in-cluster service account and no usable kubeconfig)")?;
        // Without --kind a namespaced name may be either kind: the first that exists.
        let mut last = None;
        for r in &refs {
            match bulkhead_controller::kubernetes::promote::promote(client.clone(), r).await {
                Ok(done) => {
                    println!(
                        "promoted {r}: {} applied{}",
                        done.enforced,
                        if done.staged_deleted {
                            ", the staged object deleted"
                        } else {
                            ""
                        }
                    );
                    return Ok(ExitCode::SUCCESS);
                }
                Err(e @ PromoteError::NotFound(_)) => last = Some(e),
                Err(e) => return Err(e.into()),
            }
        }
        Err(last.map_or_else(|| anyhow::anyhow!("nothing to promote"), Into::into))
    })
}

/// The objects `text` may name (more than one: the caller picks the one that exists).
fn targets(text: &str, kind: Option<KindArg>) -> anyhow::Result<Vec<StagedTarget>> {
    let (namespace, name) = match text.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            (ns.to_string(), name.to_string())
        }
        None if !text.is_empty() => (String::new(), text.to_string()),
        _ => bail!(
            "name the staged policy as NAMESPACE/NAME, or NAME for a cluster-scoped one, not {text:?}"
        ),
    };
    let namespaced = !namespace.is_empty();
    let kinds: &[&'static str] = match (kind, namespaced) {
        (None, true) => &["StagedNetworkPolicy", "ServicePolicy"],
        (None, false) => &["StagedClusterNetworkPolicy"],
        (Some(KindArg::StagedNetworkPolicy), true) => &["StagedNetworkPolicy"],
        (Some(KindArg::ServicePolicy), true) => &["ServicePolicy"],
        (Some(KindArg::StagedClusterNetworkPolicy), false) => &["StagedClusterNetworkPolicy"],
        (Some(KindArg::StagedClusterNetworkPolicy), true) => {
            bail!("a StagedClusterNetworkPolicy is cluster-scoped: name it as NAME, not {text:?}")
        }
        (Some(_), false) => bail!("name a namespaced policy as NAMESPACE/NAME, not {text:?}"),
    };
    Ok(kinds
        .iter()
        .map(|k| StagedTarget {
            kind: k,
            namespace: namespace.clone(),
            name: name.clone(),
        })
        .collect())
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

/// Whether `doc` is the staged object `t` (an audit-mode one, for a ServicePolicy).
pub fn is_target(doc: &Value, t: &StagedTarget) -> bool {
    str_at(doc, &["kind"]) == Some(t.kind)
        && str_at(doc, &["metadata", "name"]) == Some(t.name.as_str())
        && (t.namespace.is_empty()
            || str_at(doc, &["metadata", "namespace"]).unwrap_or("default") == t.namespace)
}

/// The enforced object a staged one becomes: the same metadata (name, namespace, labels,
/// annotations; nothing the API server owns) and spec, under the enforced kind.
pub fn promoted(doc: &Value) -> anyhow::Result<Value> {
    let kind = str_at(doc, &["kind"]).unwrap_or_default();
    let (api_version, new_kind) = match kind {
        "StagedNetworkPolicy" => ("networking.k8s.io/v1", "NetworkPolicy"),
        // v1alpha2: served by every network-policy-api release with ClusterNetworkPolicy
        // (v0.3.0 serves it beside v1beta1), so the promoted file applies to any such cluster.
        "StagedClusterNetworkPolicy" => {
            ("policy.networking.k8s.io/v1alpha2", "ClusterNetworkPolicy")
        }
        "ServicePolicy" => ("bulkhead.dev/v1alpha1", "ServicePolicy"),
        other => bail!(
            "{other:?} is not a staged kind: promote a StagedNetworkPolicy, a StagedClusterNetworkPolicy or an audit-mode ServicePolicy"
        ),
    };
    let mut spec = doc
        .get("spec")
        .cloned()
        .context("the staged policy has no spec")?;
    if kind == "ServicePolicy" {
        if str_at(doc, &["spec", "mode"]) != Some("Audit") {
            bail!("this ServicePolicy is enforced already (its spec.mode is not Audit)");
        }
        if let Some(m) = spec.as_mapping_mut() {
            m.insert("mode".into(), "Enforce".into());
        }
    }
    let mut metadata = Mapping::new();
    for key in ["name", "namespace", "labels", "annotations"] {
        if let Some(v) = doc.get("metadata").and_then(|m| m.get(key)) {
            metadata.insert(key.into(), v.clone());
        }
    }
    let mut out = Mapping::new();
    out.insert("apiVersion".into(), api_version.into());
    out.insert("kind".into(), new_kind.into());
    out.insert("metadata".into(), Value::Mapping(metadata));
    out.insert("spec".into(), spec);
    Ok(Value::Mapping(out))
}

/// Checks that the promoted object is a valid policy (what the controller would load).
pub fn validate(doc: &Value) -> anyhow::Result<()> {
    let text = serde_yaml::to_string(doc)?;
    let loaded = bulkhead_controller::load_str(Path::new("promoted.yaml"), &text);
    if let Some(e) = loaded.errors.first() {
        bail!("the promoted policy would not load: {e}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Value {
        serde_yaml::from_str(text).expect("yaml")
    }

    #[test]
    fn a_staged_network_policy_becomes_the_network_policy_of_its_name() {
        let staged = doc(
            "apiVersion: bulkhead.dev/v1alpha1\nkind: StagedNetworkPolicy\nmetadata: {namespace: shop, name: db, resourceVersion: '7', uid: u, labels: {team: a}}\nspec: {podSelector: {}, policyTypes: [Ingress]}",
        );
        let p = promoted(&staged).expect("promoted");
        assert_eq!(
            p,
            doc(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db, namespace: shop, labels: {team: a}}\nspec: {podSelector: {}, policyTypes: [Ingress]}"
            )
        );
        validate(&p).expect("loads");
        let t = &targets("shop/db", None).unwrap()[0];
        assert!(is_target(&staged, t));
        assert!(!is_target(&p, t));
    }

    #[test]
    fn a_staged_cluster_network_policy_and_an_audit_service_policy_promote() {
        let scnp = doc(
            "apiVersion: bulkhead.dev/v1alpha1\nkind: StagedClusterNetworkPolicy\nmetadata: {name: guard}\nspec: {tier: Admin, priority: 3, subject: {namespaces: {}}, ingress: [{action: Deny, from: [{namespaces: {}}]}]}",
        );
        let p = promoted(&scnp).expect("promoted");
        assert_eq!(str_at(&p, &["kind"]), Some("ClusterNetworkPolicy"));
        assert_eq!(
            str_at(&p, &["apiVersion"]),
            Some("policy.networking.k8s.io/v1alpha2")
        );
        validate(&p).expect("loads");
        assert_eq!(
            targets("guard", None).unwrap()[0].kind,
            "StagedClusterNetworkPolicy"
        );

        let audit = doc(
            "apiVersion: bulkhead.dev/v1alpha1\nkind: ServicePolicy\nmetadata: {namespace: shop, name: api}\nspec: {mode: Audit, subject: {serviceAccount: api}, ingress: [{from: [{service: {serviceAccount: web}}]}]}",
        );
        let p = promoted(&audit).expect("promoted");
        assert_eq!(str_at(&p, &["spec", "mode"]), Some("Enforce"));
        validate(&p).expect("loads");
        let err = promoted(&p).expect_err("enforced already");
        assert!(err.to_string().contains("enforced already"), "{err}");
    }

    #[test]
    fn bad_targets_and_kinds_say_what_to_write() {
        for bad in ["", "/x", "a/", "a/b/c"] {
            let err = targets(bad, None).expect_err(bad);
            assert!(err.to_string().contains("NAMESPACE/NAME"), "{err}");
        }
        let err = targets("shop/x", Some(KindArg::StagedClusterNetworkPolicy)).expect_err("scoped");
        assert!(err.to_string().contains("cluster-scoped"), "{err}");
        let np = doc(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec: {}",
        );
        let err = promoted(&np).expect_err("not staged");
        assert!(err.to_string().contains("not a staged kind"), "{err}");
    }
}
