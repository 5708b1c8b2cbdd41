//! The exporting side: the `Peering` gRPC service. Each `Export` stream gets a snapshot of the
//! local inventory, then a delta whenever the local inventory changed, computed by diffing it
//! against what that stream last sent. The hub only bumps a watch ([`Hub::watch_local_inventory`])
//! and never waits for an exporter; a stream whose importer falls behind (its queue full) is
//! dropped, and the importer's reconnect starts again from a snapshot.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use bulkhead_proto::{
    peering::{Delta, Export, ExportedNamespace, ExportedPod, ExportedPort, Snapshot},
    v1::{self as pb, peering_server::PeeringServer},
};
use bulkhead_ruleset::cluster::{CLUSTER_LABEL, ClusterName};
use ipnetwork::IpNetwork;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::{distribution::Hub, model::NAMESPACE_NAME_LABEL};

/// Messages queued per export stream before it is dropped as fallen behind.
pub const EXPORT_QUEUE: usize = 16;

/// After a wake-up, how long to let a burst of changes settle before diffing.
const COALESCE: Duration = Duration::from_millis(20);

/// Largest export message (a snapshot of a large cluster).
pub const MAX_EXPORT_MESSAGE: usize = 256 << 20;

/// What a cluster exports, keyed for diffing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportedInventory {
    pub namespaces: BTreeMap<String, ExportedNamespace>,
    pub pods: BTreeMap<(String, String), ExportedPod>,
}

impl ExportedInventory {
    /// What changed from `self` to `now`, as a delta at `version`.
    pub fn diff(&self, now: &ExportedInventory, epoch: u64, version: u64) -> Delta {
        let mut d = Delta {
            epoch,
            version,
            ..Delta::default()
        };
        for (name, ns) in &now.namespaces {
            if self.namespaces.get(name) != Some(ns) {
                d.namespaces_upserted.push(ns.clone());
            }
        }
        d.namespaces_deleted = self
            .namespaces
            .keys()
            .filter(|n| !now.namespaces.contains_key(*n))
            .cloned()
            .collect();
        for (key, pod) in &now.pods {
            if self.pods.get(key) != Some(pod) {
                d.pods_upserted.push(pod.clone());
            }
        }
        d.pods_deleted = self
            .pods
            .keys()
            .filter(|k| !now.pods.contains_key(*k))
            .cloned()
            .collect();
        d
    }
}

/// The hub's local inventory as this cluster exports it: local namespaces (never the qualified
/// ones imported from peers) without the labels every importer adds itself, and the local pods
/// that have real addresses in `pod_cidrs` (not host-network pods, not pods whose addresses were
/// made up, not a pod whose name no API server would have given), with identity labels only.
pub fn local_export(hub: &Hub, pod_cidrs: &[IpNetwork]) -> Option<ExportedInventory> {
    use bulkhead_proto::peering::{is_dns_label, is_dns_subdomain};
    let (namespaces, pods, filter) = hub.local_inventory()?;
    let namespaces = namespaces
        .into_iter()
        .filter(|n| is_dns_label(&n.name))
        .map(|n| {
            let mut labels = n.labels;
            labels.remove(NAMESPACE_NAME_LABEL);
            labels.remove(CLUSTER_LABEL);
            (
                n.name.clone(),
                ExportedNamespace {
                    name: n.name,
                    labels,
                },
            )
        })
        .collect::<BTreeMap<_, _>>();
    let pods = pods
        .into_iter()
        .filter(|p| {
            !p.host_network
                && !p.synthetic_ips
                && !p.ips.is_empty()
                && p.ips
                    .iter()
                    .all(|ip| pod_cidrs.iter().any(|c| c.contains(*ip)))
                && namespaces.contains_key(&p.namespace)
                && is_dns_subdomain(&p.name)
        })
        .map(|p| {
            let mut labels = filter.apply(&p.labels);
            labels.remove(CLUSTER_LABEL);
            let mut ports: Vec<ExportedPort> = p
                .ports
                .iter()
                .filter_map(|port| {
                    let name = port.name.clone().filter(|n| !n.is_empty())?;
                    // A container port has one of these; anything else is not a port to name.
                    matches!(
                        port.protocol,
                        crate::ruleset::Protocol::Tcp
                            | crate::ruleset::Protocol::Udp
                            | crate::ruleset::Protocol::Sctp
                    )
                    .then_some(ExportedPort {
                        name,
                        protocol: port.protocol,
                        port: port.port,
                    })
                })
                .filter(|p| p.port != 0)
                .collect();
            ports.sort();
            ports.dedup();
            let mut addresses = p.ips.clone();
            addresses.sort_unstable();
            addresses.dedup();
            let pod = ExportedPod {
                namespace: p.namespace,
                name: p.name,
                addresses,
                service_account: p.service_account,
                labels,
                ports,
                workload: p.workload,
            };
            (pod.key(), pod)
        })
        .collect();
    Some(ExportedInventory { namespaces, pods })
}

/// The `Peering` service.
#[derive(Clone)]
pub struct PeeringService {
    hub: Arc<Hub>,
    cluster: ClusterName,
    pod_cidrs: Vec<IpNetwork>,
    queue: usize,
}

impl PeeringService {
    pub fn new(hub: Arc<Hub>, cluster: ClusterName, pod_cidrs: Vec<IpNetwork>) -> Self {
        PeeringService {
            hub,
            cluster,
            pod_cidrs,
            queue: EXPORT_QUEUE,
        }
    }

    /// Messages queued per stream before it is dropped (tests make it small).
    pub fn with_queue(mut self, queue: usize) -> Self {
        self.queue = queue.max(1);
        self
    }

    pub fn into_server(self) -> PeeringServer<Self> {
        PeeringServer::new(self)
            .max_encoding_message_size(MAX_EXPORT_MESSAGE)
            .max_decoding_message_size(1 << 20)
    }
}

#[tonic::async_trait]
impl pb::peering_server::Peering for PeeringService {
    type ExportStream = ReceiverStream<Result<pb::InventoryExport, Status>>;

    async fn export(
        &self,
        request: Request<pb::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let importer = request.into_inner().cluster;
        let hub = self.hub.clone();
        let pod_cidrs = self.pod_cidrs.clone();
        let epoch = hub.epoch();
        let mut changed = hub.watch_local_inventory();
        changed.borrow_and_update();
        let sent = {
            let (hub, cidrs) = (hub.clone(), pod_cidrs.clone());
            tokio::task::spawn_blocking(move || local_export(&hub, &cidrs))
                .await
                .ok()
                .flatten()
                .ok_or_else(|| Status::unavailable("the controller's state is unavailable"))?
        };
        let (tx, rx) = mpsc::channel(self.queue);
        let snapshot = Export::Snapshot(Snapshot {
            cluster: self.cluster.clone(),
            epoch,
            version: 1,
            pod_cidrs: pod_cidrs.clone(),
            namespaces: sent.namespaces.values().cloned().collect(),
            pods: sent.pods.values().cloned().collect(),
        });
        tracing::info!(importer = %importer, namespaces = sent.namespaces.len(), pods = sent.pods.len(), "peer imports our inventory: snapshot sent");
        tx.try_send(Ok((&snapshot).into()))
            .map_err(|_| Status::internal("a new export queue refused its snapshot"))?;
        tokio::spawn(async move {
            let mut sent = sent;
            let mut version = 1;
            loop {
                tokio::select! {
                    r = changed.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                }
                tokio::time::sleep(COALESCE).await;
                changed.borrow_and_update();
                let (h, cidrs) = (hub.clone(), pod_cidrs.clone());
                let Some(now) = tokio::task::spawn_blocking(move || local_export(&h, &cidrs))
                    .await
                    .ok()
                    .flatten()
                else {
                    let _ = tx.try_send(Err(Status::unavailable(
                        "the controller's state is unavailable",
                    )));
                    return;
                };
                let delta = sent.diff(&now, epoch, version + 1);
                if delta.is_empty() {
                    continue;
                }
                match tx.try_send(Ok((&Export::Delta(delta)).into())) {
                    Ok(()) => {
                        version += 1;
                        sent = now;
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::warn!(importer = %importer, "peer fell behind our inventory; its stream is dropped (it reconnects for a snapshot)");
                        return;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
