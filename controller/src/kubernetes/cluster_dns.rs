//! The cluster DNS Service, `kube-system/kube-dns`: its cluster IPs are trusted resolvers
//! ([`crate::PolicyEngine::set_cluster_dns_service`], see [`crate::engine`]'s `resolvers`).
//! Pods query the Service's address, and after kube-proxy's (or the CNI's) translation back
//! the answers reach them from it: without it the data plane would learn nothing from them.
//!
//! The source watches that one Service (a namespaced watch with a field selector on its name),
//! outside the inventory of the model's kinds: it is no object of the model, only an input of
//! the resolvers. A cluster without it, or a controller not allowed to watch it (a chart
//! without the Role), costs only its addresses: the failure is logged once and the pods of the
//! cluster DNS still count; the watch keeps retrying in the background, with backoff.

use std::net::IpAddr;

use futures::{StreamExt, stream::BoxStream};
use k8s_openapi::api::core::v1::Service;
use kube::Client;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};

use crate::engine::CLUSTER_DNS_NAMESPACE;

/// The name of the cluster DNS Service (kube-dns and CoreDNS installations alike).
pub const CLUSTER_DNS_SERVICE: &str = "kube-dns";

/// The addresses a Service answers on: `spec.clusterIPs` (dual-stack), else `spec.clusterIP`.
/// A headless Service (`None`) or one without an address yet has none; an address that does
/// not parse is left out.
pub fn cluster_ips(service: &Service) -> Vec<IpAddr> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    let listed: Vec<&String> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().collect(),
        (_, Some(ip)) => vec![ip],
        _ => Vec::new(),
    };
    let mut out: Vec<IpAddr> = listed
        .into_iter()
        .filter_map(|s| {
            let s = s.trim();
            if s.is_empty() || s.eq_ignore_ascii_case("none") {
                return None;
            }
            match s.parse() {
                Ok(ip) => Some(ip),
                Err(_) => {
                    tracing::warn!(address = s, "the cluster DNS Service has a cluster IP that is no address; leaving it out");
                    None
                }
            }
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// What the watch of the Service says, one event at a time.
#[derive(Debug, Default)]
pub struct ClusterDnsState {
    /// The addresses in force (those of the last list or event).
    ips: Vec<IpAddr>,
    /// A list in progress: the addresses it brought so far.
    listing: Option<Vec<IpAddr>>,
    /// The watch has answered once (a list, or an error): the gate need not wait any more.
    settled: bool,
    /// A failure was logged, and not followed by a success since (one warning per outage).
    failing: bool,
}

impl ClusterDnsState {
    pub fn ips(&self) -> &[IpAddr] {
        &self.ips
    }

    /// Whether the watch has answered once: listed the Service (or its absence), or failed.
    pub fn settled(&self) -> bool {
        self.settled
    }

    /// Takes one watch event; returns the addresses when they may have changed.
    pub fn handle(&mut self, event: Result<Event<Service>, watcher::Error>) -> Option<Vec<IpAddr>> {
        let ips = match event {
            Ok(Event::Init) => {
                self.listing = Some(Vec::new());
                return None;
            }
            Ok(Event::InitApply(s)) => {
                self.listing
                    .get_or_insert_with(Vec::new)
                    .extend(Self::of(&s));
                return None;
            }
            Ok(Event::InitDone) => {
                self.settled = true;
                self.recovered();
                let mut ips = self.listing.take().unwrap_or_default();
                ips.sort_unstable();
                ips.dedup();
                ips
            }
            Ok(Event::Apply(s)) => {
                self.recovered();
                Self::of(&s)
            }
            // Gone: its addresses answer nobody any more.
            Ok(Event::Delete(s)) => {
                if s.metadata.name.as_deref() != Some(CLUSTER_DNS_SERVICE) {
                    return None;
                }
                Vec::new()
            }
            Err(e) => {
                self.settled = true;
                if !self.failing {
                    self.failing = true;
                    let forbidden = matches!(&e, watcher::Error::InitialListFailed(kube::Error::Api(s))
                        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) if s.code == 403);
                    if forbidden {
                        tracing::warn!(service = %format!("{CLUSTER_DNS_NAMESPACE}/{CLUSTER_DNS_SERVICE}"), error = %e, "not allowed to watch the cluster DNS Service: its cluster IPs are no trusted resolvers (only the kube-dns pods are); grant get/list/watch on services in {CLUSTER_DNS_NAMESPACE}, or pass --dns-resolver");
                    } else {
                        tracing::warn!(service = %format!("{CLUSTER_DNS_NAMESPACE}/{CLUSTER_DNS_SERVICE}"), error = %e, "watching the cluster DNS Service failed; retrying (its last known cluster IPs stay trusted)");
                    }
                } else {
                    tracing::debug!(error = %e, "watching the cluster DNS Service still fails");
                }
                return None;
            }
        };
        if ips == self.ips {
            return None;
        }
        self.ips = ips.clone();
        Some(ips)
    }

    fn recovered(&mut self) {
        if self.failing {
            self.failing = false;
            tracing::info!("watching the cluster DNS Service again");
        }
    }

    /// The addresses of `service` if it is the cluster DNS Service (the field selector says it
    /// is; checked again, as a server that ignored the selector would send others).
    fn of(service: &Service) -> Vec<IpAddr> {
        let ours = service.metadata.name.as_deref() == Some(CLUSTER_DNS_SERVICE)
            && service
                .metadata
                .namespace
                .as_deref()
                .is_none_or(|ns| ns == CLUSTER_DNS_NAMESPACE);
        if ours {
            cluster_ips(service)
        } else {
            Vec::new()
        }
    }
}

pub type ServiceEvents = BoxStream<'static, Result<Event<Service>, watcher::Error>>;

/// Watches `kube-system/kube-dns` (list then watch, re-listing after errors, with backoff).
pub fn watch(client: Client, config: &watcher::Config) -> ServiceEvents {
    let api: Api<Service> = Api::namespaced(client, CLUSTER_DNS_NAMESPACE);
    let config = config
        .clone()
        .fields(&format!("metadata.name={CLUSTER_DNS_SERVICE}"));
    watcher::watcher(api, config).default_backoff().boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServiceSpec;
    use kube::api::ObjectMeta;

    fn service(name: &str, cluster_ip: Option<&str>, cluster_ips: Option<&[&str]>) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(CLUSTER_DNS_NAMESPACE.into()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: cluster_ip.map(Into::into),
                cluster_ips: cluster_ips.map(|a| a.iter().map(|s| s.to_string()).collect()),
                ..ServiceSpec::default()
            }),
            status: None,
        }
    }

    fn addrs(a: &[&str]) -> Vec<IpAddr> {
        a.iter().map(|a| a.parse().expect("address")).collect()
    }

    #[test]
    fn cluster_ips_of_single_dual_stack_and_headless_services() {
        let v4 = service("kube-dns", Some("10.96.0.10"), Some(&["10.96.0.10"]));
        assert_eq!(cluster_ips(&v4), addrs(&["10.96.0.10"]));
        let dual = service(
            "kube-dns",
            Some("10.96.0.10"),
            Some(&["fd00:10:96::a", "10.96.0.10"]),
        );
        assert_eq!(cluster_ips(&dual), addrs(&["10.96.0.10", "fd00:10:96::a"]));
        // Older API servers fill only clusterIP.
        let old = service("kube-dns", Some("10.96.0.10"), None);
        assert_eq!(cluster_ips(&old), addrs(&["10.96.0.10"]));
        let headless = service("kube-dns", Some("None"), Some(&["None"]));
        assert!(cluster_ips(&headless).is_empty());
        let pending = service("kube-dns", Some(""), None);
        assert!(cluster_ips(&pending).is_empty());
        let garbage = service("kube-dns", None, Some(&["10.96.0.300", "10.96.0.11"]));
        assert_eq!(cluster_ips(&garbage), addrs(&["10.96.0.11"]));
    }

    #[test]
    fn the_state_follows_lists_events_and_failures() {
        let mut st = ClusterDnsState::default();
        assert!(!st.settled());
        assert_eq!(st.handle(Ok(Event::Init)), None);
        assert_eq!(
            st.handle(Ok(Event::InitApply(service(
                "kube-dns",
                None,
                Some(&["10.96.0.10"])
            )))),
            None
        );
        // Another Service (a server ignoring the selector) adds nothing.
        st.handle(Ok(Event::InitApply(service(
            "other",
            None,
            Some(&["10.96.0.99"]),
        ))));
        assert_eq!(st.handle(Ok(Event::InitDone)), Some(addrs(&["10.96.0.10"])));
        assert!(st.settled());
        // The same again: nothing to do.
        assert_eq!(
            st.handle(Ok(Event::Apply(service(
                "kube-dns",
                None,
                Some(&["10.96.0.10"])
            )))),
            None
        );
        assert_eq!(
            st.handle(Ok(Event::Apply(service("kube-dns", Some("None"), None)))),
            Some(vec![])
        );
        assert_eq!(
            st.handle(Ok(Event::Apply(service(
                "kube-dns",
                None,
                Some(&["10.96.0.53"])
            )))),
            Some(addrs(&["10.96.0.53"]))
        );
        // A failure keeps what is known; a re-list that finds nothing removes it.
        let err = watcher::Error::NoResourceVersion;
        assert_eq!(st.handle(Err(err)), None);
        assert_eq!(st.ips(), addrs(&["10.96.0.53"]));
        st.handle(Ok(Event::Init));
        assert_eq!(st.handle(Ok(Event::InitDone)), Some(vec![]));
        st.handle(Ok(Event::Apply(service(
            "kube-dns",
            None,
            Some(&["10.96.0.53"]),
        ))));
        assert_eq!(
            st.handle(Ok(Event::Delete(service("kube-dns", None, None)))),
            Some(vec![])
        );
    }

    #[test]
    fn a_failure_before_any_list_settles_the_watch() {
        let mut st = ClusterDnsState::default();
        assert_eq!(st.handle(Err(watcher::Error::NoResourceVersion)), None);
        assert!(st.settled());
        assert!(st.ips().is_empty());
    }
}
