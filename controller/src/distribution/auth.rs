//! What a client certificate lets its holder do. With mTLS every caller chains to the cluster's
//! CA; the certificate's common name says who it is:
//!
//! * a node's own name: that node's agent, which may follow and report flows for that node only
//!   (a stolen node certificate does not reveal other nodes' rule sets);
//! * one of [`ClientPolicy::any_node`] (default `bulkhead-agent`, the one certificate a Helm
//!   install shares between all agents): an agent of any node;
//! * one of [`ClientPolicy::admins`] (default `admin`): may quarantine and release pods.
//!
//! Reading status, flows and the graph needs a certificate of the CA and nothing more. Without
//! TLS (`--insecure`) there is no certificate and everything is allowed, as documented there.

use tonic::{Request, Status};

#[derive(Debug, Clone)]
pub struct ClientPolicy {
    /// Common names that may act as the agent of any node.
    pub any_node: Vec<String>,
    /// Common names that may quarantine and release.
    pub admins: Vec<String>,
}

impl Default for ClientPolicy {
    fn default() -> Self {
        ClientPolicy {
            any_node: vec!["bulkhead-agent".into()],
            admins: vec!["admin".into()],
        }
    }
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
