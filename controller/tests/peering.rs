//! Issue 20: peering between clusters, over real loopback sockets with real mTLS. Cluster east
//! imports the inventories of west (a real exporter over a real hub) and north (a hand-written
//! peer that sends what the test scripts, garbage included).
//!
//! East's engine gets west's pods under `west/<namespace>`; changes in west reach east as deltas;
//! a restarted west (new epoch) is converged to by difference; a west that is gone leaves its
//! pods in force; a peer that sends garbage is cut off with a clear error and its last good
//! inventory stays, while the other peer keeps updating. The peering listener accepts only the
//! peers' CAs, and the main listener never starts trusting them.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bulkhead_controller::{
    Change, EngineConfig, Pod, PodKey, PolicyEngine,
    distribution::Hub,
    model::Namespace,
    peering::{Importer, PeerConfig, PeerState, PeerStates, PeeringService, RetryPolicy, import},
    server::{serve_peering, tls::ReloadingServerTls},
};
use bulkhead_proto::v1::{self as pb, peering_client::PeeringClient};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use tokio::{net::TcpListener, sync::mpsc, task::JoinSet};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

const WAIT: Duration = Duration::from_secs(20);

/// A cluster's throwaway CA and the certificates issued by it, written to `dir/<cluster>/`.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(root: &Path, cluster: &str) -> Pki {
        let dir = root.join(cluster);
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, format!("{cluster} CA"));
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        let issue = |file: &str, cn: &str, eku: ExtendedKeyUsagePurpose| {
            let mut p = CertificateParams::new(vec![cn.to_string()]).unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.extended_key_usages = vec![eku];
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &ca).unwrap();
            std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{file}-key.pem")), key.serialize_pem()).unwrap();
        };
        issue(
            "controller",
            bulkhead_proto::client::CONTROLLER_SERVER_NAME,
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        issue(
            "peering",
            "bulkhead-peering",
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        issue("agent", "node-1", ExtendedKeyUsagePurpose::ClientAuth);
        Pki { dir }
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn cert(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}-key.pem")),
        )
    }

    /// The peering listener's TLS: our controller certificate, the peers' CAs.
    fn peering_tls(&self, peer_cas: &[PathBuf]) -> Arc<ReloadingServerTls> {
        let (cert, key) = self.cert("controller");
        Arc::new(ReloadingServerTls::with_client_cas(&cert, &key, peer_cas).unwrap())
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn ns(name: &str) -> Change {
    Change::UpsertNamespace(Namespace {
        name: name.into(),
        labels: labels(&[("team", name)]),
    })
}

fn pod(ns: &str, name: &str, ip: &str, app: &str) -> Pod {
    Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: labels(&[("app", app), ("pod-template-hash", "abc123")]),
        service_account: "default".into(),
        node_name: None,
        ips: vec![ip.parse().unwrap()],
        synthetic_ips: false,
        ports: vec![bulkhead_controller::model::ContainerPort {
            name: Some("http".into()),
            port: 8080,
            protocol: bulkhead_controller::ruleset::Protocol::Tcp,
        }],
        workload: Some(format!("Deployment/{app}")),
        host_network: false,
    }
}

fn hub(epoch: u64, changes: Vec<Change>) -> Arc<Hub> {
    let hub = Arc::new(Hub::with_epoch(
        PolicyEngine::empty(EngineConfig::default()),
        epoch,
    ));
    hub.apply(changes, false).unwrap();
    hub
}

/// The pods of `hub` in namespaces of `cluster`, by `ns/name` (unqualified), with their
/// addresses.
fn remote_pods(hub: &Hub, cluster: &str) -> BTreeMap<String, (Vec<IpAddr>, Pod)> {
    let prefix = format!("{cluster}/");
    hub.pods()
        .unwrap()
        .0
        .into_iter()
        .filter_map(|p| {
            let ns = p.namespace.strip_prefix(&prefix)?.to_string();
            Some((format!("{ns}/{}", p.name), (p.ips.clone(), p)))
        })
        .collect()
}

/// The namespaces of `hub` of `cluster`, unqualified, with their labels.
fn remote_namespaces(hub: &Hub, cluster: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let prefix = format!("{cluster}/");
    hub.objects()
        .unwrap()
        .0
        .into_iter()
        .filter_map(|o| match o {
            bulkhead_controller::Object::Namespace(n) => n
                .name
                .strip_prefix(&prefix)
                .map(|name| (name.to_string(), n.labels)),
            _ => None,
        })
        .collect()
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A TCP relay in front of a peer's listener that the test can cut (every connection reset,
/// new ones closed) and point at another backend: a peer controller that dies and restarts.
struct Relay {
    addr: SocketAddr,
    backend: Arc<Mutex<Option<SocketAddr>>>,
    conns: Arc<Mutex<JoinSet<()>>>,
}

impl Relay {
    async fn start(backend: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = Arc::new(Mutex::new(Some(backend)));
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        let (b, c) = (backend.clone(), conns.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let Some(to) = *b.lock().unwrap() else {
                    drop(inbound);
                    continue;
                };
                c.lock().unwrap().spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        Relay {
            addr,
            backend,
            conns,
        }
    }

    fn cut(&self) {
        *self.backend.lock().unwrap() = None;
        self.conns.lock().unwrap().abort_all();
    }

    fn point_at(&self, backend: SocketAddr) {
        *self.backend.lock().unwrap() = Some(backend);
    }
}

/// Serves `service`'s hub on a peering listener; its address.
async fn exporter(pki: &Pki, peer_cas: &[PathBuf], service: PeeringService) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_peering(listener, pki.peering_tls(peer_cas), service));
    addr
}

/// North: a peer that sends, on each Export call, the next script the test hands it, then keeps
/// the stream open.
struct Scripted {
    scripts: tokio::sync::Mutex<mpsc::Receiver<Vec<pb::InventoryExport>>>,
}

#[tonic::async_trait]
impl pb::peering_server::Peering for Scripted {
    type ExportStream = ReceiverStream<Result<pb::InventoryExport, Status>>;
    async fn export(
        &self,
        _r: Request<pb::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let script = self
            .scripts
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| Status::unavailable("no more scripts"))?;
        let (tx, rx) = mpsc::channel(script.len() + 1);
        for m in script {
            tx.try_send(Ok(m)).unwrap();
        }
        // Kept open: the importer, not the stream's end, must be what cuts the peer off.
        tokio::spawn(async move { tx.closed().await });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn ip(s: &str) -> Vec<u8> {
    match s.parse::<IpAddr>().unwrap() {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn cidr(s: &str) -> pb::Cidr {
    let (a, p) = s.split_once('/').unwrap();
    pb::Cidr {
        addr: ip(a),
        prefix: p.parse().unwrap(),
    }
}

fn north_pod(ns: &str, name: &str, addr: Vec<u8>) -> pb::ExportedPod {
    pb::ExportedPod {
        namespace: ns.into(),
        name: name.into(),
        addresses: vec![addr],
        service_account: "default".into(),
        labels: labels(&[("app", name)]),
        ports: vec![],
        workload: None,
    }
}

fn snapshot(
    cluster: &str,
    cidrs: &[&str],
    namespaces: &[&str],
    pods: Vec<pb::ExportedPod>,
) -> pb::InventoryExport {
    pb::InventoryExport {
        export: Some(pb::inventory_export::Export::Snapshot(
            pb::InventorySnapshot {
                cluster: cluster.into(),
                epoch: 1,
                version: 1,
                pod_cidrs: cidrs.iter().map(|c| cidr(c)).collect(),
                namespaces: namespaces
                    .iter()
                    .map(|n| pb::ExportedNamespace {
                        name: n.to_string(),
                        labels: Default::default(),
                    })
                    .collect(),
                pods,
            },
        )),
    }
}

fn delta(epoch: u64, version: u64, pods: Vec<pb::ExportedPod>) -> pb::InventoryExport {
    pb::InventoryExport {
        export: Some(pb::inventory_export::Export::Delta(pb::InventoryDelta {
            epoch,
            version,
            pods_upserted: pods,
            ..Default::default()
        })),
    }
}

struct Lab {
    _tmp: TempDir,
    east: Arc<Hub>,
    states: Arc<PeerStates>,
    west_pki: Pki,
    east_pki: Pki,
    north_pki: Pki,
    west: Arc<Hub>,
    relay: Relay,
    north: mpsc::Sender<Vec<pb::InventoryExport>>,
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn west_inventory() -> Vec<Change> {
    vec![
        ns("shop"),
        ns("ops"),
        Change::UpsertPod(pod("shop", "web-1", "10.2.0.5", "web")),
        Change::UpsertPod(pod("shop", "db-1", "10.2.0.6", "db")),
        Change::UpsertPod(pod("ops", "tool", "10.2.1.1", "tool")),
        // Not exported: no address in west's pod CIDRs (a host-network-like address).
        Change::UpsertPod(pod("ops", "outside", "192.168.7.7", "outside")),
    ]
}

async fn lab(name: &str) -> Lab {
    let root = std::env::temp_dir().join(format!("bulkhead-peering-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let tmp = TempDir(root.clone());
    let (east_pki, west_pki, north_pki) = (
        Pki::new(&root, "east"),
        Pki::new(&root, "west"),
        Pki::new(&root, "north"),
    );
    let east = hub(
        1,
        vec![
            ns("shop"),
            Change::UpsertPod(pod("shop", "web", "10.1.0.5", "web")),
            Change::UpsertPod(pod("shop", "stray", "10.5.0.5", "stray")),
        ],
    );
    let west = hub(100, west_inventory());
    let west_addr = exporter(
        &west_pki,
        &[east_pki.ca()],
        PeeringService::new(
            west.clone(),
            "west".parse().unwrap(),
            vec!["10.2.0.0/16".parse().unwrap()],
        ),
    )
    .await;
    let relay = Relay::start(west_addr).await;
    let (north_tx, north_rx) = mpsc::channel(16);
    let north_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let north_addr = north_listener.local_addr().unwrap();
    {
        let tls = north_pki.peering_tls(&[east_pki.ca()]);
        let svc = pb::peering_server::PeeringServer::new(Scripted {
            scripts: tokio::sync::Mutex::new(north_rx),
        });
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(bulkhead_controller::server::tls::tls_incoming(
                    north_listener,
                    tls,
                ))
                .await
        });
    }
    let states = Arc::new(PeerStates::default());
    let importer = Arc::new(Importer::new(
        east.clone(),
        "east".parse().unwrap(),
        vec!["10.1.0.0/16".parse().unwrap()],
        states.clone(),
    ));
    let (cert, key) = east_pki.cert("peering");
    let peers: Vec<PeerConfig> = vec![
        format!(
            "name=west,address=https://{},ca={}",
            relay.addr,
            west_pki.ca().display()
        )
        .parse()
        .unwrap(),
        format!(
            "name=north,address=https://{north_addr},ca={}",
            north_pki.ca().display()
        )
        .parse()
        .unwrap(),
    ];
    import::start(
        importer,
        &peers,
        cert,
        key,
        RetryPolicy {
            first: Duration::from_millis(20),
            max: Duration::from_millis(200),
        },
    );
    Lab {
        _tmp: tmp,
        east,
        states,
        west_pki,
        east_pki,
        north_pki,
        west,
        relay,
        north: north_tx,
    }
}

fn state(l: &Lab, peer: &str) -> (PeerState, String) {
    let s = l.states.get(peer).unwrap();
    (s.state, s.error)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn west_pods_reach_east_and_follow_west_through_deltas_restarts_and_outages() {
    let l = lab("follow").await;
    until("west's pods in east", || {
        remote_pods(&l.east, "west").len() == 3
    })
    .await;
    let pods = remote_pods(&l.east, "west");
    let (ips, web) = &pods["shop/web-1"];
    assert_eq!(ips, &vec!["10.2.0.5".parse::<IpAddr>().unwrap()]);
    assert_eq!(web.namespace, "west/shop");
    assert_eq!(web.node_name, None);
    assert_eq!(
        web.labels.get("pod-template-hash"),
        None,
        "per-pod hash labels are not exported: {:?}",
        web.labels
    );
    assert_eq!(web.labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(web.ports[0].name.as_deref(), Some("http"));
    assert_eq!(web.workload.as_deref(), Some("Deployment/web"));
    assert!(
        !pods.contains_key("ops/outside"),
        "outside west's pod CIDRs"
    );
    let nss = remote_namespaces(&l.east, "west");
    assert_eq!(nss.keys().collect::<Vec<_>>(), ["ops", "shop"]);
    assert_eq!(nss["ops"].get("team").map(String::as_str), Some("ops"));
    // East's own pod is untouched and nothing of east is qualified.
    assert!(l.east.has_pod(&PodKey {
        namespace: "shop".into(),
        name: "web".into()
    }));
    let s = l.states.get("west").unwrap();
    assert_eq!(
        (s.state, s.epoch, s.version, s.pods),
        (PeerState::Synced, 100, 1, 3)
    );
    // What east would export holds its own objects only, never what it imported.
    let exported = bulkhead_controller::peering::export::local_export(
        &l.east,
        &["0.0.0.0/0".parse().unwrap()],
    )
    .unwrap();
    assert_eq!(
        exported.pods.keys().cloned().collect::<Vec<_>>(),
        [
            ("shop".to_string(), "stray".to_string()),
            ("shop".to_string(), "web".to_string())
        ]
    );
    assert_eq!(exported.namespaces.keys().collect::<Vec<_>>(), ["shop"]);

    // A relabel, a new pod and a deleted pod in west arrive as deltas.
    l.west
        .apply(
            vec![
                Change::UpsertPod(pod("shop", "web-1", "10.2.0.5", "web-v2")),
                Change::UpsertPod(pod("shop", "web-2", "10.2.0.7", "web")),
                Change::DeletePod(PodKey {
                    namespace: "shop".into(),
                    name: "db-1".into(),
                }),
            ],
            false,
        )
        .unwrap();
    until("west's changes in east", || {
        let p = remote_pods(&l.east, "west");
        p.len() == 3
            && p.contains_key("shop/web-2")
            && !p.contains_key("shop/db-1")
            && p["shop/web-1"].1.labels.get("app").map(String::as_str) == Some("web-v2")
    })
    .await;
    let s = l.states.get("west").unwrap();
    assert_eq!((s.epoch, s.state.clone()), (100, PeerState::Synced));
    assert!(s.version >= 2, "deltas counted: {s:?}");

    // West goes away: its pods stay in force, the state says so, the age grows.
    l.relay.cut();
    until("west disconnected", || {
        state(&l, "west").0 == PeerState::Disconnected
    })
    .await;
    let before = l.states.get("west").unwrap().last_update.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(remote_pods(&l.east, "west").len(), 3, "last inventory kept");
    let s = l.states.get("west").unwrap();
    assert_eq!(s.last_update, Some(before), "no update while gone");
    assert!(s.age(std::time::SystemTime::now()).unwrap() >= Duration::from_millis(300));

    // West restarts (a new epoch) with a different inventory: east converges by difference.
    let west2 = hub(
        200,
        vec![
            ns("shop"),
            Change::UpsertPod(pod("shop", "web-1", "10.2.0.5", "web-v2")),
            Change::UpsertPod(pod("shop", "cart", "10.2.0.9", "cart")),
        ],
    );
    let west2_addr = exporter(
        &l.west_pki,
        &[l.east_pki.ca()],
        PeeringService::new(
            west2.clone(),
            "west".parse().unwrap(),
            vec!["10.2.0.0/16".parse().unwrap()],
        ),
    )
    .await;
    l.relay.point_at(west2_addr);
    until("east converged to the restarted west", || {
        let p = remote_pods(&l.east, "west");
        // The engine keeps a deleted namespace's name (its labels gone), as for local ones.
        p.keys().map(String::as_str).collect::<Vec<_>>() == ["shop/cart", "shop/web-1"]
            && !remote_namespaces(&l.east, "west")["ops"].contains_key("team")
    })
    .await;
    assert_eq!(
        remote_namespaces(&l.east, "west")["shop"]
            .get("team")
            .map(String::as_str),
        Some("shop")
    );
    let s = l.states.get("west").unwrap();
    assert_eq!((s.state, s.epoch, s.pods), (PeerState::Synced, 200, 2));
    west2
        .apply(
            vec![Change::UpsertPod(pod("shop", "new", "10.2.0.10", "new"))],
            false,
        )
        .unwrap();
    until("a delta of the new epoch", || {
        remote_pods(&l.east, "west").contains_key("shop/new")
    })
    .await;

    // `bulkhead policy status` reads the peers through the Admin API, typed.
    use pb::admin_server::Admin;
    let admin = bulkhead_controller::distribution::AdminService::new(l.east.clone())
        .with_peers(l.states.clone());
    let status = admin
        .policy_status(Request::new(pb::PolicyStatusRequest {}))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = status.peers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["north", "west"]);
    let west = &status.peers[1];
    assert_eq!(west.state, pb::PeerImportState::Synced as i32);
    assert_eq!((west.pods, west.epoch, west.error.as_str()), (3, 200, ""));
    assert!(west.last_update_age_ms.is_some());
    assert_eq!(
        status.peers[0].state,
        pb::PeerImportState::Connecting as i32
    );
    assert_eq!(status.peers[0].last_update_age_ms, None);
    drop(l.north);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sending_garbage_is_cut_off_and_its_last_good_inventory_stays() {
    let l = lab("garbage").await;
    until("west synced", || remote_pods(&l.east, "west").len() == 3).await;
    let good = snapshot(
        "north",
        &["10.3.0.0/16"],
        &["mail"],
        vec![north_pod("mail", "smtp", ip("10.3.0.1"))],
    );
    let n1 = || {
        remote_pods(&l.east, "north")
            .keys()
            .cloned()
            .collect::<Vec<_>>()
    };
    let cases: Vec<(&str, Vec<pb::InventoryExport>, &str)> = vec![
        (
            "a version gap after a good snapshot",
            vec![good.clone(), delta(1, 3, vec![])],
            "version gap: expected delta version 2, got 3",
        ),
        (
            "a delta before a snapshot",
            vec![delta(1, 2, vec![])],
            "a delta (version 2) arrived before any snapshot",
        ),
        (
            "a delta of another epoch",
            vec![good.clone(), delta(9, 2, vec![])],
            "a delta of epoch 9 on a stream of epoch 1",
        ),
        (
            "an address that is no address",
            vec![snapshot(
                "north",
                &["10.3.0.0/16"],
                &["mail"],
                vec![north_pod("mail", "smtp", vec![10, 3, 0])],
            )],
            "pod addresses: an address must be 4 or 16 bytes, not 3",
        ),
        (
            "a pod CIDR overlapping ours",
            vec![snapshot(
                "north",
                &["10.3.0.0/16", "10.1.0.5/32"],
                &["mail"],
                vec![north_pod("mail", "smtp", ip("10.1.0.5"))],
            )],
            "pod CIDR 10.1.0.5/32 of cluster north overlaps pod CIDR 10.1.0.0/16 of cluster east",
        ),
        (
            "an address held by an east pod (one outside east's --pod-cidr)",
            vec![snapshot(
                "north",
                &["10.5.0.0/16"],
                &["mail"],
                vec![north_pod("mail", "smtp", ip("10.5.0.5"))],
            )],
            "pod mail/smtp has address 10.5.0.5, which local pod shop/stray already holds",
        ),
        (
            "a pod CIDR overlapping another peer's",
            vec![snapshot("north", &["10.2.128.0/17"], &["mail"], vec![])],
            "pod CIDR 10.2.128.0/17 of cluster north overlaps pod CIDR 10.2.0.0/16 of cluster west",
        ),
        (
            "two pods with one address",
            vec![snapshot(
                "north",
                &["10.3.0.0/16"],
                &["mail"],
                vec![
                    north_pod("mail", "smtp", ip("10.3.0.1")),
                    north_pod("mail", "dup", ip("10.3.0.1")),
                ],
            )],
            "has address 10.3.0.1, which pod mail/",
        ),
        (
            "a pod in a namespace it never sent",
            vec![snapshot(
                "north",
                &["10.3.0.0/16"],
                &["mail"],
                vec![north_pod("spam", "x", ip("10.3.0.2"))],
            )],
            "pod spam/x is in namespace spam, which the peer never sent",
        ),
        (
            "a snapshot naming another cluster",
            vec![snapshot("south", &["10.3.0.0/16"], &["mail"], vec![])],
            "the snapshot names cluster south, but this peer is configured as north",
        ),
        (
            "a name that is not a Kubernetes name",
            vec![snapshot("north", &["10.3.0.0/16"], &["Mail"], vec![])],
            "namespace name: \"Mail\" is not a DNS label",
        ),
        (
            "an address outside its own pod CIDRs",
            vec![snapshot(
                "north",
                &["10.3.0.0/16"],
                &["mail"],
                vec![north_pod("mail", "smtp", ip("10.9.0.1"))],
            )],
            "pod mail/smtp has address 10.9.0.1, outside the peer's pod CIDRs",
        ),
    ];
    for (i, (what, script, error)) in cases.into_iter().enumerate() {
        let west_pods = 3 + i + 1;
        l.north.send(script).await.unwrap();
        until(what, || {
            let (s, e) = state(&l, "north");
            s == PeerState::Refused && e.contains(error)
        })
        .await;
        assert_eq!(
            n1(),
            ["mail/smtp"],
            "{what}: north's last good inventory stays"
        );
        // The other peer keeps working.
        let name = format!("p{i}");
        l.west
            .apply(
                vec![Change::UpsertPod(pod(
                    "shop",
                    &name,
                    &format!("10.2.2.{}", i + 1),
                    "x",
                ))],
                false,
            )
            .unwrap();
        until(&format!("west still updates after {what}"), || {
            remote_pods(&l.east, "west").len() == west_pods
        })
        .await;
        assert_eq!(state(&l, "west").0, PeerState::Synced);
        // Every time north is cut off the importer reconnects (the next script).
    }
    // And a north that behaves again is taken back: its new snapshot replaces the old by diff.
    l.north
        .send(vec![
            snapshot(
                "north",
                &["10.3.0.0/16"],
                &["mail"],
                vec![north_pod("mail", "imap", ip("10.3.0.3"))],
            ),
            delta(1, 2, vec![north_pod("mail", "pop", ip("10.3.0.4"))]),
        ])
        .await
        .unwrap();
    until("north synced again", || {
        state(&l, "north").0 == PeerState::Synced && n1() == ["mail/imap", "mail/pop"]
    })
    .await;
    // Nothing of the refused messages got in (east's own pod is still the only holder of its
    // address, and the dup and spam pods never appeared).
    assert!(remote_pods(&l.east, "north").len() == 2);
    let _ = &l.north_pki;
}

/// Calls Export on `addr` with `cert`, trusting `ca` for the server; the first message or the
/// error.
async fn try_export(
    addr: SocketAddr,
    cert: (PathBuf, PathBuf),
    ca: PathBuf,
) -> Result<pb::InventoryExport, String> {
    let tls = bulkhead_proto::client::ClientTls {
        cert: Some(cert.0),
        key: Some(cert.1),
        ca: Some(ca),
        insecure: false,
    };
    let ep = bulkhead_proto::client::endpoint(&format!("https://{addr}"), &tls)
        .map_err(|e| e.to_string())?;
    let channel = ep.connect().await.map_err(|e| format!("connect: {e:?}"))?;
    let mut client = PeeringClient::new(channel);
    let mut stream = client
        .export(pb::ExportRequest {
            cluster: "test".into(),
        })
        .await
        .map_err(|e| format!("export: {e}"))?
        .into_inner();
    stream
        .message()
        .await
        .map_err(|e| format!("stream: {e}"))?
        .ok_or_else(|| "no message".to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peering_listener_accepts_only_the_peers_cas_and_the_main_listener_none_of_them() {
    let l = lab("tls").await;
    let west_addr = exporter(
        &l.west_pki,
        &[l.east_pki.ca()],
        PeeringService::new(
            l.west.clone(),
            "west".parse().unwrap(),
            vec!["10.2.0.0/16".parse().unwrap()],
        ),
    )
    .await;
    // East's peering certificate (east is west's peer): a snapshot.
    let ok = try_export(west_addr, l.east_pki.cert("peering"), l.west_pki.ca()).await;
    assert!(
        matches!(
            &ok,
            Ok(pb::InventoryExport {
                export: Some(pb::inventory_export::Export::Snapshot(_))
            })
        ),
        "{ok:?}"
    );
    // West's own agent certificate: not a peer's.
    let own = try_export(west_addr, l.west_pki.cert("agent"), l.west_pki.ca()).await;
    assert!(own.is_err(), "west's own agent certificate was accepted");
    // A CA west does not peer with.
    let stranger = try_export(west_addr, l.north_pki.cert("peering"), l.west_pki.ca()).await;
    assert!(stranger.is_err(), "north's certificate was accepted");

    // West's main (agent) listener trusts west's CA only: not east's peering certificate.
    let (cert, key) = l.west_pki.cert("controller");
    let main_tls = Arc::new(ReloadingServerTls::new(&cert, &key, &l.west_pki.ca()).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let main_addr = listener.local_addr().unwrap();
    tokio::spawn(serve_peering(
        listener,
        main_tls,
        PeeringService::new(
            l.west.clone(),
            "west".parse().unwrap(),
            vec!["10.2.0.0/16".parse().unwrap()],
        ),
    ));
    let peer = try_export(main_addr, l.east_pki.cert("peering"), l.west_pki.ca()).await;
    assert!(
        peer.is_err(),
        "the main listener accepted a peer's certificate"
    );
    // (and it does accept its own agents: the refusal above is about the CA)
    let agent = try_export(main_addr, l.west_pki.cert("agent"), l.west_pki.ca()).await;
    assert!(agent.is_ok(), "{agent:?}");
}

#[tokio::test]
async fn a_slow_importer_is_dropped_and_never_holds_up_the_hub() {
    use pb::peering_server::Peering;
    let west = hub(100, west_inventory());
    let svc = PeeringService::new(
        west.clone(),
        "west".parse().unwrap(),
        vec!["10.2.0.0/16".parse().unwrap()],
    )
    .with_queue(2);
    let mut stream = svc
        .export(Request::new(pb::ExportRequest {
            cluster: "east".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    // Nobody reads: the queue (2) takes the snapshot and one delta, then the stream is dropped.
    for i in 0..5 {
        let started = Instant::now();
        west.apply(
            vec![Change::UpsertPod(pod(
                "shop",
                &format!("p{i}"),
                &format!("10.2.3.{}", i + 1),
                "x",
            ))],
            false,
        )
        .unwrap();
        assert!(started.elapsed() < Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    use tokio_stream::StreamExt;
    let mut got = Vec::new();
    let deadline = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(m) = stream.next().await {
            got.push(m.unwrap());
        }
    })
    .await;
    assert!(deadline.is_ok(), "the stream was not dropped");
    assert_eq!(got.len(), 2, "snapshot and the one delta that fit: {got:?}");
    assert!(matches!(
        got[0].export,
        Some(pb::inventory_export::Export::Snapshot(_))
    ));
    match &got[1].export {
        Some(pb::inventory_export::Export::Delta(d)) => assert_eq!(d.version, 2),
        other => panic!("{other:?}"),
    }
}
