//! What a client certificate lets its holder do. With mTLS every caller chains to the cluster's
//! CA; the certificate's common name says who it is:
//!
//! * a node's own name: that node's agent, which may follow and report flows for that node only
//!   (a stolen node certificate does not reveal other nodes' rule sets);
//! * one of [`ClientPolicy::any_node`] (default `bulkhead-agent`, the one certificate a Helm
//!   install shares between all agents): an agent of any node;
//! * one of [`ClientPolicy::admins`] (default `admin`): may quarantine and release pods.
//!
//! With `--agent-token-review` a shared agent certificate is not enough: the agent also sends
//! its pod's service-account token (`authorization: Bearer …`), and the node it speaks for must
//! be the node that pod runs on ([`AgentTokenReview`]). So the one certificate every node holds
//! no longer lets one node follow or report for another (issue 21, finding 12).
//!
//! Reading status, flows and the graph needs a certificate of the CA and nothing more. Without
//! TLS (`--insecure`) there is no certificate and everything is allowed, as documented there.

use std::sync::Arc;

use tonic::{Request, Status, metadata::MetadataMap};

use crate::kubernetes::review::{AgentTokenError, AgentTokenReview, ReviewError};

#[derive(Clone)]
pub struct ClientPolicy {
    /// Common names that may act as the agent of any node.
    pub any_node: Vec<String>,
    /// Common names that may quarantine and release.
    pub admins: Vec<String>,
    /// When set, an [`any_node`](Self::any_node) certificate must come with a service-account
    /// token of an agent pod on the node it speaks for.
    pub agent_tokens: Option<Arc<AgentTokenReview>>,
}

impl std::fmt::Debug for ClientPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientPolicy")
            .field("any_node", &self.any_node)
            .field("admins", &self.admins)
            .field("agent_tokens", &self.agent_tokens.is_some())
            .finish()
    }
}

impl Default for ClientPolicy {
    fn default() -> Self {
        ClientPolicy {
            any_node: vec!["bulkhead-agent".into()],
            admins: vec!["admin".into()],
            agent_tokens: None,
        }
    }
}

/// The bearer token of a request's `authorization` metadata, if any.
pub fn bearer(metadata: &MetadataMap) -> Option<&str> {
    let value = metadata.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The caller as its certificate names it: `Ok(None)` without TLS, an error when a certificate
/// is there but names no one.
pub fn caller<T>(request: &Request<T>) -> Result<Option<String>, Status> {
    let Some(certs) = request.peer_certs() else {
        return Ok(None);
    };
    let Some(leaf) = certs.first() else {
        return Ok(None);
    };
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| Status::unauthenticated(format!("unreadable client certificate: {e}")))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    match cn {
        Some(cn) if !cn.is_empty() => Ok(Some(cn)),
        _ => Err(Status::unauthenticated(
            "the client certificate has no common name; issue it for the node or role it serves",
        )),
    }
}

impl ClientPolicy {
    /// Whether `caller` may follow or report for `node`.
    pub fn may_act_for_node(&self, caller: Option<&str>, node: &str) -> Result<(), Status> {
        match caller {
            None => Ok(()),
            Some(c) if c == node || self.any_node.iter().any(|a| a == c) => Ok(()),
            Some(c) => Err(Status::permission_denied(format!(
                "certificate {c:?} may not act for node {node:?}: agents use their node's certificate (common name = node name)"
            ))),
        }
    }

    /// Whether `caller`, with the request's `metadata`, may follow or report for `node`: its
    /// certificate names that node, or it is a shared agent certificate and (with
    /// [`agent_tokens`](Self::agent_tokens)) the request's token is of an agent pod on `node`.
    pub async fn authorize_node(
        &self,
        caller: Option<&str>,
        metadata: &MetadataMap,
        node: &str,
    ) -> Result<(), Status> {
        self.may_act_for_node(caller, node)?;
        let (Some(c), Some(review)) = (caller, &self.agent_tokens) else {
            return Ok(());
        };
        if c == node && !self.any_node.iter().any(|a| a == c) {
            // The node's own certificate: it speaks for itself.
            return Ok(());
        }
        let Some(token) = bearer(metadata) else {
            return Err(Status::unauthenticated(format!(
                "certificate {c:?} is shared by every agent: send the agent pod's service-account token (agent run --token-file) so the controller can tell which node it runs on"
            )));
        };
        match review.node_of(token).await {
            Ok(n) if n == node => Ok(()),
            Ok(n) => Err(Status::permission_denied(format!(
                "the token belongs to the agent on node {n:?}, which may not act for node {node:?}"
            ))),
            Err(AgentTokenError::Review(ReviewError::Unavailable(e))) => Err(Status::unavailable(
                format!("cannot check the agent's token now: {e}"),
            )),
            Err(e) => Err(Status::unauthenticated(e.to_string())),
        }
    }

    /// Whether `caller` may quarantine and release.
    pub fn may_administer(&self, caller: Option<&str>) -> Result<(), Status> {
        match caller {
            None => Ok(()),
            Some(c) if self.admins.iter().any(|a| a == c) => Ok(()),
            Some(c) => Err(Status::permission_denied(format!(
                "certificate {c:?} may not quarantine or release; use an admin certificate (common name {})",
                self.admins.join(" or ")
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_act_for_themselves_and_admins_administer() {
        let p = ClientPolicy::default();
        assert!(p.may_act_for_node(Some("n1"), "n1").is_ok());
        assert!(p.may_act_for_node(Some("bulkhead-agent"), "n7").is_ok());
        let e = p
            .may_act_for_node(Some("n1"), "n2")
            .expect_err("other node");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            p.may_act_for_node(None, "n2").is_ok(),
            "no TLS: no identity"
        );
        assert!(p.may_administer(Some("admin")).is_ok());
        assert_eq!(
            p.may_administer(Some("n1")).expect_err("node").code(),
            tonic::Code::PermissionDenied
        );
        assert!(p.may_administer(Some("bulkhead-agent")).is_err());
    }
}
