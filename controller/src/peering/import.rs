//! The importing side: one task per configured peer. It connects to the peer's peering listener
//! with our peering client certificate, checks everything the peer sends against the full
//! inventory it would make (its own, ours and the other peers'), and feeds the difference to the
//! hub as ordinary changes under qualified namespaces (`west/shop`).
//!
//! Failure semantics: a peer that goes away leaves its last inventory in force until it comes
//! back (its new snapshot then replaces the old one by difference, so nothing flaps); a peer that
//! sends something refused is cut off with the error logged and shown in its status, its last
//! good inventory stays in force, the other peers keep working, and it is retried with backoff.
//! Only a restart without the peer removes what it had.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use bulkhead_proto::{
    peering::{Delta, Export, ExportedNamespace, ExportedPod, Snapshot},
    v1::{self as pb, peering_client::PeeringClient},
};
use bulkhead_ruleset::cluster::ClusterName;
use ipnetwork::IpNetwork;

use super::{PeerConfig, PeerState, PeerStates, RetryPolicy, export::MAX_EXPORT_MESSAGE, overlaps};
use crate::{
    Change, Pod, PodKey,
    distribution::Hub,
    model::{ContainerPort, Namespace},
};

/// What one peer exported, as last applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerInventory {
    pub pod_cidrs: Vec<IpNetwork>,
    pub namespaces: BTreeMap<String, ExportedNamespace>,
    pub pods: BTreeMap<(String, String), ExportedPod>,
}

/// Why a peer's message was refused (the peer is cut off, its last good inventory stays).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Malformed(#[from] bulkhead_proto::peering::ExportError),
    #[error("the snapshot names cluster {got}, but this peer is configured as {expected}")]
    WrongCluster {
        expected: ClusterName,
        got: ClusterName,
    },
    #[error("a delta (version {version}) arrived before any snapshot")]
    DeltaBeforeSnapshot { version: u64 },
    #[error(
        "a delta of epoch {got} on a stream of epoch {epoch} (a peer restart starts with a snapshot)"
    )]
    EpochChanged { epoch: u64, got: u64 },
    #[error("version gap: expected delta version {expected}, got {got}")]
    VersionGap { expected: u64, got: u64 },
    #[error("namespace {0} is sent twice")]
    DuplicateNamespace(String),
    #[error("pod {0}/{1} is sent twice")]
    DuplicatePod(String, String),
    #[error("pod {namespace}/{pod} is in namespace {namespace}, which the peer never sent")]
    UnknownNamespace { namespace: String, pod: String },
    #[error("pod {namespace}/{pod} has address {addr}, outside the peer's pod CIDRs")]
    OutsidePodCidrs {
        namespace: String,
        pod: String,
        addr: IpAddr,
    },
    #[error(
        "pod CIDR {cidr} of cluster {cluster} overlaps pod CIDR {other_cidr} of cluster {other_cluster}"
    )]
    OverlappingPodCidrs {
        cidr: IpNetwork,
        cluster: String,
        other_cidr: IpNetwork,
        other_cluster: String,
    },
    #[error("pod {namespace}/{pod} has address {addr}, which {holder} already holds")]
    AddressTaken {
        namespace: String,
        pod: String,
        addr: IpAddr,
        holder: String,
    },
    #[error("the engine refused the peer's inventory: {0}")]
    Engine(String),
}

/// Why a session with a peer ended.
#[derive(Debug)]
enum SessionEnd {
    /// Transport trouble or the stream ended: reconnect, nothing refused.
    Disconnected(String),
    Refused(Refusal),
}

/// Everything imported, and what the importers need to check and apply it.
pub struct Importer {
    hub: Arc<Hub>,
    local: ClusterName,
    local_pod_cidrs: Vec<IpNetwork>,
    /// Per peer, what is in force. Held while a peer's new inventory is checked and applied, so
    /// two peers never claim the same address at once.
    imported: Mutex<BTreeMap<ClusterName, PeerInventory>>,
    pub states: Arc<PeerStates>,
}

impl Importer {
    pub fn new(
        hub: Arc<Hub>,
        local: ClusterName,
        local_pod_cidrs: Vec<IpNetwork>,
        states: Arc<PeerStates>,
    ) -> Importer {
        Importer {
            hub,
            local,
            local_pod_cidrs,
            imported: Mutex::new(BTreeMap::new()),
            states,
        }
    }

    /// What is in force for `peer`.
    pub fn inventory(&self, peer: &ClusterName) -> Option<PeerInventory> {
        self.imported.lock().ok()?.get(peer).cloned()
    }

    /// Checks `new` as `peer`'s whole inventory and applies the difference from what was in
    /// force. Nothing changes when it is refused.
    pub fn install(&self, peer: &ClusterName, new: PeerInventory) -> Result<(), Refusal> {
        let mut imported = self
            .imported
            .lock()
            .map_err(|_| Refusal::Engine("the importer's lock is poisoned".into()))?;
        self.check(peer, &new, &imported)?;
        let empty = PeerInventory::default();
        let old = imported.get(peer).unwrap_or(&empty);
        let changes = changes(peer, old, &new);
        if !changes.is_empty() {
            self.hub
                .apply(changes, false)
                .map_err(|e| Refusal::Engine(e.to_string()))?;
        }
        imported.insert(peer.clone(), new);
        Ok(())
    }

    fn check(
        &self,
        peer: &ClusterName,
        new: &PeerInventory,
        imported: &BTreeMap<ClusterName, PeerInventory>,
    ) -> Result<(), Refusal> {
        let others = || imported.iter().filter(|(name, _)| *name != peer);
        for cidr in &new.pod_cidrs {
            let theirs =
                self.local_pod_cidrs
                    .iter()
                    .map(|c| (c, self.local.to_string()))
                    .chain(others().flat_map(|(n, inv)| {
                        inv.pod_cidrs.iter().map(move |c| (c, n.to_string()))
                    }));
            for (other_cidr, other_cluster) in theirs {
                if overlaps(cidr, other_cidr) {
                    return Err(Refusal::OverlappingPodCidrs {
                        cidr: *cidr,
                        cluster: peer.to_string(),
                        other_cidr: *other_cidr,
                        other_cluster,
                    });
                }
            }
        }
        // Addresses are checked against local pods and the other peers' where they are new to
        // this peer's inventory (a pod that kept its addresses was checked when they came): a
        // delta costs what it changes, not the size of the fleet.
        let empty = PeerInventory::default();
        let old = imported.get(peer).unwrap_or(&empty);
        let fresh: Vec<IpAddr> = new
            .pods
            .iter()
            .filter(|(k, p)| old.pods.get(*k).is_none_or(|o| o.addresses != p.addresses))
            .flat_map(|(_, p)| p.addresses.iter().copied())
            .collect();
        // The other peers' pods by address: indexed when many addresses are new (a snapshot),
        // scanned for the few of a delta.
        let mut by_others: HashMap<IpAddr, String> = HashMap::new();
        if fresh.len() > 64 {
            for (name, inv) in others() {
                for pod in inv.pods.values() {
                    for ip in &pod.addresses {
                        by_others.insert(
                            *ip,
                            format!("pod {}/{} of cluster {name}", pod.namespace, pod.name),
                        );
                    }
                }
            }
        }
        let held = |ip: &IpAddr| -> Option<String> {
            if let Some(k) = self.hub.local_pods_at(ip).first() {
                return Some(format!("local pod {}/{}", k.namespace, k.name));
            }
            if fresh.len() > 64 {
                return by_others.get(ip).cloned();
            }
            others().find_map(|(name, inv)| {
                inv.pods
                    .values()
                    .find(|p| p.addresses.contains(ip))
                    .map(|p| format!("pod {}/{} of cluster {name}", p.namespace, p.name))
            })
        };
        let fresh_set: std::collections::HashSet<IpAddr> = fresh.iter().copied().collect();
        let mut own: HashMap<IpAddr, &ExportedPod> = HashMap::new();
        for pod in new.pods.values() {
            if !new.namespaces.contains_key(&pod.namespace) {
                return Err(Refusal::UnknownNamespace {
                    namespace: pod.namespace.clone(),
                    pod: pod.name.clone(),
                });
            }
            for ip in &pod.addresses {
                let taken = |holder: String| Refusal::AddressTaken {
                    namespace: pod.namespace.clone(),
                    pod: pod.name.clone(),
                    addr: *ip,
                    holder,
                };
                if !new.pod_cidrs.iter().any(|c| c.contains(*ip)) {
                    return Err(Refusal::OutsidePodCidrs {
                        namespace: pod.namespace.clone(),
                        pod: pod.name.clone(),
                        addr: *ip,
                    });
                }
                if fresh_set.contains(ip)
                    && let Some(holder) = held(ip)
                {
                    return Err(taken(holder));
                }
                if let Some(other) = own.insert(*ip, pod) {
                    return Err(taken(format!(
                        "pod {}/{} of cluster {peer}",
                        other.namespace, other.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// Follows one peer until the controller stops: connect, apply, reconnect with backoff.
    pub async fn follow(
        self: Arc<Self>,
        peer: PeerConfig,
        cert: PathBuf,
        key: PathBuf,
        retry: RetryPolicy,
    ) {
        let mut wait = retry.first;
        loop {
            let mut synced = false;
            let end = self.session(&peer, &cert, &key, &mut synced).await;
            let now = SystemTime::now();
            match &end {
                SessionEnd::Disconnected(e) => {
                    tracing::warn!(peer = %peer.name, address = %peer.address, error = %e, "peer disconnected; its last inventory stays in force");
                    self.states.update(&peer.name, |s| {
                        s.state = PeerState::Disconnected;
                        s.error = e.clone();
                    });
                }
                SessionEnd::Refused(r) => {
                    tracing::error!(peer = %peer.name, address = %peer.address, error = %r, "peer cut off: it sent something refused; its last good inventory stays in force");
                    self.states.update(&peer.name, |s| {
                        s.state = PeerState::Refused;
                        s.error = r.to_string();
                    });
                }
            }
            // A session that got as far as a snapshot starts the backoff over; a refusal
            // never does (the peer would be retried at full speed while it sends garbage).
            if synced && matches!(end, SessionEnd::Disconnected(_)) {
                wait = retry.first;
            }
            tokio::time::sleep(jittered(wait, now)).await;
            wait = (wait * 2).min(retry.max);
        }
    }

    async fn session(
        self: &Arc<Self>,
        peer: &PeerConfig,
        cert: &std::path::Path,
        key: &std::path::Path,
        synced: &mut bool,
    ) -> SessionEnd {
        let tls = bulkhead_proto::client::ClientTls {
            cert: Some(cert.to_path_buf()),
            key: Some(key.to_path_buf()),
            ca: Some(peer.ca.clone()),
            insecure: false,
        };
        let endpoint = match bulkhead_proto::client::endpoint(&peer.address, &tls) {
            Ok(e) => e
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5)),
            Err(e) => return SessionEnd::Disconnected(e.to_string()),
        };
        let channel = match endpoint.connect().await {
            Ok(c) => c,
            Err(e) => {
                return SessionEnd::Disconnected(format!(
                    "connect to {}: {}",
                    peer.address,
                    source_chain(&e)
                ));
            }
        };
        let mut client = PeeringClient::new(channel).max_decoding_message_size(MAX_EXPORT_MESSAGE);
        let mut stream = match client
            .export(pb::ExportRequest {
                cluster: self.local.to_string(),
            })
            .await
        {
            Ok(s) => s.into_inner(),
            Err(e) => return SessionEnd::Disconnected(format!("export: {}", e.message())),
        };
        // (epoch, version) of the last message applied on this stream.
        let mut cursor: Option<(u64, u64)> = None;
        loop {
            let message = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return SessionEnd::Disconnected("the peer ended the stream".into()),
                Err(e) => return SessionEnd::Disconnected(format!("stream: {}", e.message())),
            };
            // Checking and compiling a large snapshot takes a while: off the async threads.
            let (me, p) = (self.clone(), peer.clone());
            let applied =
                match tokio::task::spawn_blocking(move || me.receive(&p, message, cursor)).await {
                    Ok(r) => r,
                    Err(e) => Err(Refusal::Engine(format!(
                        "applying the peer's inventory failed: {e}"
                    ))),
                };
            match applied {
                Ok((epoch, version)) => {
                    cursor = Some((epoch, version));
                    *synced = true;
                }
                Err(r) => return SessionEnd::Refused(r),
            }
        }
    }

    /// Checks and applies one message; the new (epoch, version).
    fn receive(
        &self,
        peer: &PeerConfig,
        message: pb::InventoryExport,
        cursor: Option<(u64, u64)>,
    ) -> Result<(u64, u64), Refusal> {
        let export = Export::try_from(message)?;
        let (epoch, version, new) = match export {
            Export::Snapshot(s) => {
                if s.cluster != peer.name {
                    return Err(Refusal::WrongCluster {
                        expected: peer.name.clone(),
                        got: s.cluster,
                    });
                }
                let (epoch, version) = (s.epoch, s.version);
                (epoch, version, from_snapshot(s)?)
            }
            Export::Delta(d) => {
                let Some((epoch, version)) = cursor else {
                    return Err(Refusal::DeltaBeforeSnapshot { version: d.version });
                };
                if d.epoch != epoch {
                    return Err(Refusal::EpochChanged {
                        epoch,
                        got: d.epoch,
                    });
                }
                if d.version != version + 1 {
                    return Err(Refusal::VersionGap {
                        expected: version + 1,
                        got: d.version,
                    });
                }
                let base = self.inventory(&peer.name).unwrap_or_default();
                (epoch, d.version, apply_delta(base, d)?)
            }
        };
        let (pods, namespaces) = (new.pods.len() as u64, new.namespaces.len() as u64);
        self.install(&peer.name, new)?;
        self.states.update(&peer.name, |s| {
            s.state = PeerState::Synced;
            s.error.clear();
            s.last_update = Some(SystemTime::now());
            s.pods = pods;
            s.namespaces = namespaces;
            s.epoch = epoch;
            s.version = version;
            s.updates += 1;
        });
        tracing::debug!(peer = %peer.name, epoch, version, pods, "peer inventory applied");
        Ok((epoch, version))
    }
}

/// An error with its sources, for a status line.
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        // Wrappers often repeat their source's text: say each part once.
        let part = c.to_string();
        if !s.contains(&part) {
            s.push_str(": ");
            s.push_str(&part);
        }
        cur = c.source();
    }
    s
}

/// `wait` plus up to a quarter more, from the clock's nanoseconds (enough to spread importers
/// that failed together).
fn jittered(wait: Duration, now: SystemTime) -> Duration {
    let nanos = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let quarter = wait.as_millis() as u64 / 4;
    wait + Duration::from_millis(if quarter == 0 { 0 } else { nanos % quarter })
}

fn from_snapshot(s: Snapshot) -> Result<PeerInventory, Refusal> {
    let mut inv = PeerInventory {
        pod_cidrs: s.pod_cidrs,
        ..Default::default()
    };
    for ns in s.namespaces {
        if let Some(old) = inv.namespaces.insert(ns.name.clone(), ns) {
            return Err(Refusal::DuplicateNamespace(old.name));
        }
    }
    for pod in s.pods {
        if let Some(old) = inv.pods.insert(pod.key(), pod) {
            return Err(Refusal::DuplicatePod(old.namespace, old.name));
        }
    }
    Ok(inv)
}

fn apply_delta(mut inv: PeerInventory, d: Delta) -> Result<PeerInventory, Refusal> {
    for ns in d.namespaces_upserted {
        inv.namespaces.insert(ns.name.clone(), ns);
    }
    for pod in d.pods_upserted {
        inv.pods.insert(pod.key(), pod);
    }
    for key in d.pods_deleted {
        inv.pods.remove(&key);
    }
    for ns in d.namespaces_deleted {
        inv.namespaces.remove(&ns);
    }
    Ok(inv)
}

/// A peer's namespace as the engine holds it.
fn namespace(peer: &ClusterName, ns: &ExportedNamespace) -> Namespace {
    Namespace {
        name: peer.qualify(&ns.name),
        labels: ns.labels.clone(),
    }
}

/// A peer's pod as the engine holds it: in its qualified namespace, on no node.
fn pod(peer: &ClusterName, p: &ExportedPod) -> Pod {
    Pod {
        namespace: peer.qualify(&p.namespace),
        name: p.name.clone(),
        labels: p.labels.clone(),
        service_account: p.service_account.clone(),
        node_name: None,
        ips: p.addresses.clone(),
        synthetic_ips: false,
        ports: p
            .ports
            .iter()
            .map(|port| ContainerPort {
                name: Some(port.name.clone()),
                port: port.port,
                protocol: port.protocol,
            })
            .collect(),
        workload: p.workload.clone(),
        host_network: false,
    }
}

/// The changes that turn `old` into `new` for `peer`: namespaces first (a pod's namespace exists
/// before the pod), deleted namespaces last (after their pods).
pub fn changes(peer: &ClusterName, old: &PeerInventory, new: &PeerInventory) -> Vec<Change> {
    let mut out = Vec::new();
    for (name, ns) in &new.namespaces {
        if old.namespaces.get(name) != Some(ns) {
            out.push(Change::UpsertNamespace(namespace(peer, ns)));
        }
    }
    for (key, p) in &new.pods {
        if old.pods.get(key) != Some(p) {
            out.push(Change::UpsertPod(pod(peer, p)));
        }
    }
    for (ns, name) in old.pods.keys().filter(|k| !new.pods.contains_key(*k)) {
        out.push(Change::DeletePod(PodKey {
            namespace: peer.qualify(ns),
            name: name.clone(),
        }));
    }
    for name in old
        .namespaces
        .keys()
        .filter(|n| !new.namespaces.contains_key(*n))
    {
        out.push(Change::DeleteNamespace(peer.qualify(name)));
    }
    out
}

/// Starts one importer task per peer (the caller checked the configuration).
pub fn start(
    importer: Arc<Importer>,
    peers: &[PeerConfig],
    cert: PathBuf,
    key: PathBuf,
    retry: RetryPolicy,
) -> Vec<tokio::task::JoinHandle<()>> {
    peers
        .iter()
        .map(|peer| {
            importer.states.add(peer.name.clone(), peer.address.clone());
            tokio::spawn(
                importer
                    .clone()
                    .follow(peer.clone(), cert.clone(), key.clone(), retry),
            )
        })
        .collect()
}
