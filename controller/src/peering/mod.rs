//! Peering between clusters (issue 20): this controller imports, from each peer cluster's
//! controller, that cluster's own pods and namespaces, and exports its own to them. Policies are
//! never federated; a peer's objects enter the engine as ordinary changes whose namespace is
//! qualified `cluster/namespace` (see [`bulkhead_ruleset::cluster`]).
//!
//! - [`export`]: the `Peering` gRPC service on `--peering-listen` (a snapshot, then deltas
//!   computed by diffing the hub's local inventory against what the stream last sent);
//! - [`import`]: one task per `--peer`, which checks what the peer sends and feeds it to the hub;
//!   a peer that goes away leaves its last inventory in force, one that sends garbage is cut off
//!   with its last good inventory in force;
//! - [`status`]: each peer's state, for `bulkhead policy status` and `/metrics`.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use bulkhead_ruleset::cluster::ClusterName;
use ipnetwork::IpNetwork;

pub mod export;
pub mod import;
pub mod status;

pub use export::PeeringService;
pub use import::Importer;
pub use status::{PeerState, PeerStates, PeerStatus};

/// One `--peer name=west,address=https://10.0.0.1:9964,ca=/etc/bulkhead/west-ca.pem`: a cluster
/// whose inventory we import, where its peering listener is, and the CA that issues its
/// certificates (its controller's server certificate, and the client certificate it imports
/// from us with).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub name: ClusterName,
    pub address: String,
    pub ca: PathBuf,
}

/// A `--peer` value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadPeer {
    #[error(
        "--peer {text:?}: {key:?} is not one of name, address, ca (write name=NAME,address=URL,ca=FILE)"
    )]
    UnknownKey { text: String, key: String },
    #[error("--peer {text:?}: {part:?} is not KEY=VALUE (write name=NAME,address=URL,ca=FILE)")]
    NotKeyValue { text: String, part: String },
    #[error("--peer {text:?}: {key} is given twice")]
    Twice { text: String, key: &'static str },
    #[error("--peer {text:?}: {key}= is missing (write name=NAME,address=URL,ca=FILE)")]
    Missing { text: String, key: &'static str },
    #[error("--peer {text:?}: {source}")]
    Name {
        text: String,
        #[source]
        source: bulkhead_ruleset::cluster::BadClusterName,
    },
    #[error("--peer {text:?}: address {address:?} is not an https:// URL with a host and port")]
    Address { text: String, address: String },
}

impl FromStr for PeerConfig {
    type Err = BadPeer;

    fn from_str(text: &str) -> Result<PeerConfig, BadPeer> {
        let (mut name, mut address, mut ca) = (None, None, None);
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let Some((key, value)) = part.split_once('=') else {
                return Err(BadPeer::NotKeyValue {
                    text: text.into(),
                    part: part.into(),
                });
            };
            let (slot, key): (&mut Option<String>, &'static str) = match key.trim() {
                "name" => (&mut name, "name"),
                "address" => (&mut address, "address"),
                "ca" => (&mut ca, "ca"),
                other => {
                    return Err(BadPeer::UnknownKey {
                        text: text.into(),
                        key: other.into(),
                    });
                }
            };
            if slot.replace(value.trim().to_string()).is_some() {
                return Err(BadPeer::Twice {
                    text: text.into(),
                    key,
                });
            }
        }
        let missing = |key| BadPeer::Missing {
            text: text.into(),
            key,
        };
        let name = name.ok_or_else(|| missing("name"))?;
        let address = address.ok_or_else(|| missing("address"))?;
        let ca = ca.filter(|c| !c.is_empty()).ok_or_else(|| missing("ca"))?;
        let name = name.parse().map_err(|source| BadPeer::Name {
            text: text.into(),
            source,
        })?;
        let url_ok = address.strip_prefix("https://").is_some_and(|rest| {
            rest.rsplit_once(':').is_some_and(|(h, p)| {
                !h.is_empty() && p.trim_end_matches('/').parse::<u16>().is_ok()
            })
        });
        if !url_ok {
            return Err(BadPeer::Address {
                text: text.into(),
                address,
            });
        }
        Ok(PeerConfig {
            name,
            address,
            ca: PathBuf::from(ca),
        })
    }
}

impl fmt::Display for PeerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "name={},address={},ca={}",
            self.name,
            self.address,
            self.ca.display()
        )
    }
}

/// What `bulkhead controller` was told about peering.
#[derive(Debug, Clone, Default)]
pub struct PeeringConfig {
    /// This cluster's name (`--cluster-name`); required with peers or a peering listener.
    pub cluster: Option<ClusterName>,
    /// This cluster's pod CIDRs (`--pod-cidr`): exported, and no peer's may overlap them.
    pub pod_cidrs: Vec<IpNetwork>,
    /// Where the `Peering` service listens (`--peering-listen`); off when `None`.
    pub listen: Option<SocketAddr>,
    /// The clusters we import from (`--peer`).
    pub peers: Vec<PeerConfig>,
    /// Our client certificate and key for importing (`--peering-cert`, `--peering-key`),
    /// issued by our own CA: each peer trusts our CA as our `ca=`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A peering configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeeringConfigError {
    #[error(
        "--peer and --peering-listen need --cluster-name (this cluster's name, as its peers configure it)"
    )]
    NoClusterName,
    #[error(
        "--peer needs --peering-cert and --peering-key (a client certificate issued by this cluster's CA; see `bulkhead certs generate`)"
    )]
    NoClientCertificate,
    #[error(
        "--peering-listen needs at least one --peer: the peers' ca= files are the only CAs whose client certificates it accepts"
    )]
    NoPeerCa,
    #[error(
        "--peering-listen needs --pod-cidr: only pods in this cluster's pod CIDRs are exported"
    )]
    NoPodCidr,
    #[error(
        "--peering-listen needs --tls-cert and --tls-key (the controller's own server certificate); it never serves without TLS"
    )]
    NoServerCertificate,
    #[error("--peer {0} is given twice")]
    DuplicatePeer(ClusterName),
    #[error("--peer {0} has this cluster's own name (--cluster-name)")]
    PeerIsSelf(ClusterName),
    #[error("--pod-cidr {a} and --pod-cidr {b} overlap")]
    OverlappingPodCidrs { a: IpNetwork, b: IpNetwork },
}

impl PeeringConfig {
    /// Whether anything of peering is on.
    pub fn enabled(&self) -> bool {
        self.listen.is_some() || !self.peers.is_empty()
    }

    /// Refuses a configuration that cannot work, at start. `has_server_cert`: the controller
    /// has `--tls-cert`/`--tls-key`.
    pub fn check(&self, has_server_cert: bool) -> Result<(), PeeringConfigError> {
        for (i, a) in self.pod_cidrs.iter().enumerate() {
            for b in &self.pod_cidrs[i + 1..] {
                if overlaps(a, b) {
                    return Err(PeeringConfigError::OverlappingPodCidrs { a: *a, b: *b });
                }
            }
        }
        if !self.enabled() {
            return Ok(());
        }
        let Some(cluster) = &self.cluster else {
            return Err(PeeringConfigError::NoClusterName);
        };
        let mut seen = std::collections::BTreeSet::new();
        for p in &self.peers {
            if &p.name == cluster {
                return Err(PeeringConfigError::PeerIsSelf(p.name.clone()));
            }
            if !seen.insert(&p.name) {
                return Err(PeeringConfigError::DuplicatePeer(p.name.clone()));
            }
        }
        if !self.peers.is_empty() && (self.cert.is_none() || self.key.is_none()) {
            return Err(PeeringConfigError::NoClientCertificate);
        }
        if self.listen.is_some() {
            if self.peers.is_empty() {
                return Err(PeeringConfigError::NoPeerCa);
            }
            if self.pod_cidrs.is_empty() {
                return Err(PeeringConfigError::NoPodCidr);
            }
            if !has_server_cert {
                return Err(PeeringConfigError::NoServerCertificate);
            }
        }
        Ok(())
    }
}

/// Whether two networks share an address (one contains the other's first address).
pub fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// How an importer retries: from `first`, doubling to `max`, each wait jittered by up to a
/// quarter so that importers cut off together do not reconnect together.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub first: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            first: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_with_clear_errors() {
        let p: PeerConfig = "name=west,address=https://10.0.0.1:9964,ca=/etc/west-ca.pem"
            .parse()
            .unwrap();
        assert_eq!(p.name.as_str(), "west");
        assert_eq!(p.address, "https://10.0.0.1:9964");
        assert_eq!(p.ca, PathBuf::from("/etc/west-ca.pem"));
        assert_eq!(p.to_string().parse::<PeerConfig>().unwrap(), p);
        let err = |s: &str| s.parse::<PeerConfig>().unwrap_err().to_string();
        assert!(err("name=west,address=https://a:1").contains("ca= is missing"));
        assert!(err("name=West,address=https://a:1,ca=x").contains("not a valid cluster name"));
        assert!(err("name=west,address=http://a:1,ca=x").contains("not an https:// URL"));
        assert!(err("name=west,address=https://a,ca=x").contains("not an https:// URL"));
        assert!(err("name=west,addr=https://a:1,ca=x").contains("\"addr\" is not one of"));
        assert!(
            err("name=west,name=east,address=https://a:1,ca=x").contains("name is given twice")
        );
        assert!(err("west").contains("is not KEY=VALUE"));
    }

    #[test]
    fn configurations_that_cannot_work_are_refused() {
        let west: PeerConfig = "name=west,address=https://a:1,ca=x".parse().unwrap();
        let mut c = PeeringConfig {
            peers: vec![west.clone()],
            ..Default::default()
        };
        assert_eq!(c.check(true), Err(PeeringConfigError::NoClusterName));
        c.cluster = Some("east".parse().unwrap());
        assert_eq!(c.check(true), Err(PeeringConfigError::NoClientCertificate));
        c.cert = Some("c".into());
        c.key = Some("k".into());
        assert_eq!(c.check(true), Ok(()));
        c.listen = Some("127.0.0.1:9964".parse().unwrap());
        assert_eq!(c.check(true), Err(PeeringConfigError::NoPodCidr));
        c.pod_cidrs = vec![
            "10.0.0.0/16".parse().unwrap(),
            "10.0.128.0/17".parse().unwrap(),
        ];
        assert!(matches!(
            c.check(true),
            Err(PeeringConfigError::OverlappingPodCidrs { .. })
        ));
        c.pod_cidrs.pop();
        assert_eq!(c.check(false), Err(PeeringConfigError::NoServerCertificate));
        assert_eq!(c.check(true), Ok(()));
        c.peers.push(west);
        assert!(matches!(
            c.check(true),
            Err(PeeringConfigError::DuplicatePeer(_))
        ));
        c.peers = vec!["name=east,address=https://a:1,ca=x".parse().unwrap()];
        assert!(matches!(
            c.check(true),
            Err(PeeringConfigError::PeerIsSelf(_))
        ));
    }
}
