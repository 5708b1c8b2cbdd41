//! `bulkhead policy promote --kubernetes`: a staged policy becomes the enforced one, with the
//! caller's own credentials (their RBAC decides; the controller gains no write access to
//! NetworkPolicies).
//!
//! The enforced object is written first (server-side apply of the staged spec under the
//! enforced kind, so the one update of that object is the one change in enforcement), then the
//! staged object is deleted with its uid and resourceVersion as preconditions: a staged object
//! edited in between is kept (and said so), never deleted unseen. An audit-mode ServicePolicy
//! is one object: its `spec.mode` is patched to `Enforce` at the resourceVersion read.

use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, Preconditions};

use super::crd::{
    CNP_GROUP, ClusterNetworkPolicy, CnpVersion, ServicePolicy, StagedClusterNetworkPolicy,
    StagedNetworkPolicy,
};
use super::inventory::Kind;

/// The field manager of promotions.
pub const PROMOTE_FIELD_MANAGER: &str = "bulkhead-promote";

/// What to promote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StagedRef {
    NetworkPolicy {
        namespace: String,
        name: String,
    },
    ClusterNetworkPolicy {
        name: String,
    },
    /// An audit-mode ServicePolicy.
    ServicePolicy {
        namespace: String,
        name: String,
    },
}

impl std::fmt::Display for StagedRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StagedRef::NetworkPolicy { namespace, name } => {
                write!(f, "StagedNetworkPolicy {namespace}/{name}")
            }
            StagedRef::ClusterNetworkPolicy { name } => {
                write!(f, "StagedClusterNetworkPolicy {name}")
            }
            StagedRef::ServicePolicy { namespace, name } => {
                write!(f, "ServicePolicy {namespace}/{name}")
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    #[error("there is no {0}")]
    NotFound(StagedRef),
    #[error("{0} is enforced already (its spec.mode is not Audit)")]
    NotAudit(StagedRef),
    #[error(
        "{what} was applied, but the staged object changed after it was read and was kept: look at it and promote or delete it"
    )]
    StagedChanged { what: String },
    #[error(
        "the cluster serves no ClusterNetworkPolicy API ({} or {}): install network-policy-api's ClusterNetworkPolicy CRD first",
        CnpVersion::V1beta1.api_version(),
        CnpVersion::V1alpha2.api_version()
    )]
    NoClusterNetworkPolicyApi,
    #[error("{action}: {source}")]
    Api {
        action: String,
        #[source]
        source: kube::Error,
    },
}

/// What a promotion did, for the caller to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promoted {
    /// The enforced object written, `Kind namespace/name`.
    pub enforced: String,
    /// Whether the staged object was deleted (false for a ServicePolicy, which is the same object).
    pub staged_deleted: bool,
}

fn api_error(action: impl Into<String>) -> impl FnOnce(kube::Error) -> PromoteError {
    let action = action.into();
    move |source| PromoteError::Api { action, source }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Metadata a promoted object keeps: name, namespace, labels, annotations.
fn kept_metadata(m: &ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: m.name.clone(),
        namespace: m.namespace.clone(),
        labels: m.labels.clone(),
        annotations: m.annotations.clone(),
        ..ObjectMeta::default()
    }
}

fn preconditions(m: &ObjectMeta) -> DeleteParams {
    DeleteParams {
        preconditions: Some(Preconditions {
            uid: m.uid.clone(),
            resource_version: m.resource_version.clone(),
        }),
        ..DeleteParams::default()
    }
}

pub async fn promote(client: Client, target: &StagedRef) -> Result<Promoted, PromoteError> {
    let apply = PatchParams::apply(PROMOTE_FIELD_MANAGER).force();
    match target {
        StagedRef::NetworkPolicy { namespace, name } => {
            let staged: Api<StagedNetworkPolicy> = Api::namespaced(client.clone(), namespace);
            let s = match staged.get(name).await {
                Err(e) if is_not_found(&e) => return Err(PromoteError::NotFound(target.clone())),
                r => r.map_err(api_error(format!("read {target}")))?,
            };
            let np = NetworkPolicy {
                metadata: kept_metadata(&s.metadata),
                spec: Some(s.spec.policy.clone()),
            };
            let enforced = format!("NetworkPolicy {namespace}/{name}");
            let nps: Api<NetworkPolicy> = Api::namespaced(client, namespace);
            let mut body = serde_json::to_value(&np).map_err(|e| PromoteError::Api {
                action: format!("write {enforced}"),
                source: kube::Error::SerdeError(e),
            })?;
            body["apiVersion"] = "networking.k8s.io/v1".into();
            body["kind"] = "NetworkPolicy".into();
            nps.patch(name, &apply, &Patch::Apply(&body))
                .await
                .map_err(api_error(format!("apply {enforced}")))?;
            delete_staged(&staged, name, &s.metadata, enforced).await
        }
        StagedRef::ClusterNetworkPolicy { name } => {
            let staged: Api<StagedClusterNetworkPolicy> = Api::all(client.clone());
            let s = match staged.get(name).await {
                Err(e) if is_not_found(&e) => return Err(PromoteError::NotFound(target.clone())),
                r => r.map_err(api_error(format!("read {target}")))?,
            };
            let cnp = ClusterNetworkPolicy {
                metadata: kept_metadata(&s.metadata),
                spec: s.spec.policy.clone(),
            };
            let enforced = format!("ClusterNetworkPolicy {name}");
            // Written at the version the cluster serves (v1beta1 where it can).
            let version = super::source::served_cnp_version(&client)
                .await
                .map_err(api_error(format!("discover the versions of {CNP_GROUP}")))?
                .ok_or(PromoteError::NoClusterNetworkPolicyApi)?;
            let resource = ApiResource {
                version: version.version().into(),
                api_version: version.api_version().into(),
                ..Kind::ClusterNetworkPolicy.api_resource()
            };
            let cnps: Api<DynamicObject> = Api::all_with(client, &resource);
            let mut body = serde_json::to_value(&cnp).map_err(|e| PromoteError::Api {
                action: format!("write {enforced}"),
                source: kube::Error::SerdeError(e),
            })?;
            body["apiVersion"] = version.api_version().into();
            body["kind"] = "ClusterNetworkPolicy".into();
            cnps.patch(name, &apply, &Patch::Apply(&body))
                .await
                .map_err(api_error(format!("apply {enforced}")))?;
            delete_staged(&staged, name, &s.metadata, enforced).await
        }
        StagedRef::ServicePolicy { namespace, name } => {
            let sps: Api<ServicePolicy> = Api::namespaced(client, namespace);
            let sp = match sps.get(name).await {
                Err(e) if is_not_found(&e) => return Err(PromoteError::NotFound(target.clone())),
                r => r.map_err(api_error(format!("read {target}")))?,
            };
            if sp.spec.mode.as_deref() != Some("Audit") {
                return Err(PromoteError::NotAudit(target.clone()));
            }
            // A merge patch at the version read: a concurrent edit fails it (409), not lost.
            let patch = serde_json::json!({
                "metadata": {"resourceVersion": sp.metadata.resource_version},
                "spec": {"mode": "Enforce"},
            });
            sps.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(api_error(format!("enforce {target}")))?;
            Ok(Promoted {
                enforced: format!("ServicePolicy {namespace}/{name}"),
                staged_deleted: false,
            })
        }
    }
}

async fn delete_staged<K>(
    api: &Api<K>,
    name: &str,
    read: &ObjectMeta,
    enforced: String,
) -> Result<Promoted, PromoteError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &preconditions(read)).await {
        Ok(_) => Ok(Promoted {
            enforced,
            staged_deleted: true,
        }),
        // Gone already: someone else finished the job.
        Err(e) if is_not_found(&e) => Ok(Promoted {
            enforced,
            staged_deleted: true,
        }),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            Err(PromoteError::StagedChanged { what: enforced })
        }
        Err(e) => Err(api_error(format!(
            "delete the staged object after applying {enforced}"
        ))(e)),
    }
}
