//! Peering at fleet scale (issue 20): one controller ("east") imports N simulated peer clusters
//! of P pods each, over the real `Peering` service (gRPC, mTLS, loopback), each peer a real hub
//! and exporter in this process. Prints:
//!
//! - the import of one peer's snapshot: time from the importer's start to the pods being in
//!   east's engine, and the process's resident memory it added;
//! - the import of the other peers;
//! - a relabel in a peer reaching east's agents: from the peer's `apply` to east's node
//!   subscription receiving the delta (every east node has a policy admitting every peer's
//!   `app: api` pods, so each relabel changes every east node's ipcache); p50 / p99 / max.
//!
//! Figures, not a test. `cargo run --release -p bulkhead-bench --bin peering [-- --clusters 10
//! --pods 10000 --relabels 300]`

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bulkhead_controller::distribution::Hub;
use bulkhead_controller::model::{Namespace, Pod};
use bulkhead_controller::peering::{
    Importer, PeerConfig, PeerState, PeerStates, PeeringService, RetryPolicy, import,
};
use bulkhead_controller::server::{serve_peering, tls::ReloadingServerTls};
use bulkhead_controller::{Change, EngineConfig, Object, PolicyEngine, load_str};
use clap::Parser;
use rand::{Rng, SeedableRng, rngs::StdRng};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};

#[derive(Parser)]
struct Args {
    /// Peer clusters.
    #[arg(long, default_value_t = 10)]
    clusters: usize,
    /// Pods per peer cluster.
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    /// East's nodes (each with local pods that the policy selects).
    #[arg(long, default_value_t = 10)]
    nodes: usize,
    /// Relabels measured (spread over the peers).
    #[arg(long, default_value_t = 300)]
    relabels: usize,
}

/// A cluster's throwaway CA, its controller (server) and peering (client) certificates.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(root: &Path, cluster: &str) -> anyhow::Result<Pki> {
        let dir = root.join(cluster);
        std::fs::create_dir_all(&dir)?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, format!("{cluster} CA"));
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
        std::fs::write(dir.join("ca.pem"), ca.pem())?;
        for (file, cn, eku) in [
            (
                "controller",
                bulkhead_proto::client::CONTROLLER_SERVER_NAME,
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            (
                "peering",
                "bulkhead-peering",
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
        ] {
            let mut p = CertificateParams::new(vec![cn.to_string()])?;
            p.distinguished_name.push(DnType::CommonName, cn);
            p.extended_key_usages = vec![eku];
            let key = KeyPair::generate()?;
            let cert = p.signed_by(&key, &ca)?;
            std::fs::write(dir.join(format!("{file}.pem")), cert.pem())?;
            std::fs::write(dir.join(format!("{file}-key.pem")), key.serialize_pem())?;
        }
        Ok(Pki { dir })
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

fn cluster_name(i: usize) -> String {
    format!("peer-{i}")
}

/// Peer `c`'s pod address `p`: `10.(100 + c).x.y`, inside its pod CIDR `10.(100 + c).0.0/16`.
fn peer_ip(c: usize, p: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        10,
        (100 + c) as u8,
        (p / 250) as u8,
        (p % 250 + 1) as u8,
    ))
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A peer pod: 100 namespaces, deployments of 20 pods; half are `app: api`.
fn peer_pod(c: usize, p: usize, app: &str) -> Pod {
    let ns = format!("ns-{}", p % 100);
    let deployment = p / 20;
    Pod {
        namespace: ns,
        name: format!("pod-{p}"),
        labels: labels(&[
            ("app", app),
            ("deployment", &format!("d{deployment}")),
            ("pod-template-hash", &format!("h{}", p % 7)),
        ]),
        service_account: format!("sa-{}", deployment % 10),
        node_name: Some(format!("{}-node-{}", cluster_name(c), p % 50)),
        ips: vec![peer_ip(c, p)],
        synthetic_ips: false,
        ports: Vec::new(),
        workload: Some(format!("Deployment/d{deployment}")),
        host_network: false,
    }
}

fn app_of(p: usize) -> &'static str {
    if p.is_multiple_of(2) { "api" } else { "batch" }
}

fn peer_hub(c: usize, pods: usize) -> anyhow::Result<Arc<Hub>> {
    let mut changes: Vec<Change> = (0..100)
        .map(|n| {
            Change::UpsertNamespace(Namespace {
                name: format!("ns-{n}"),
                labels: labels(&[("team", &format!("t{}", n % 5))]),
            })
        })
        .collect();
    changes.extend((0..pods).map(|p| Change::UpsertPod(peer_pod(c, p, app_of(p)))));
    let engine = PolicyEngine::empty(EngineConfig {
        cluster_name: Some(cluster_name(c).parse()?),
        ..EngineConfig::default()
    });
    let hub = Arc::new(Hub::with_epoch(engine, 1000 + c as u64));
    hub.apply(changes, false)?;
    Ok(hub)
}

/// East: `nodes` nodes with 20 `app: web` pods each, whose NetworkPolicy admits every peer
/// cluster's `app: api` pods.
fn east_hub(nodes: usize) -> anyhow::Result<Arc<Hub>> {
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: shop, name: web}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: bulkhead.dev/cluster, operator: NotIn, values: [east]}]}, podSelector: {matchLabels: {app: api}}}]}]\n",
    );
    for n in 0..nodes {
        for p in 0..20 {
            yaml += &format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{namespace: shop, name: web-{n}-{p}, labels: {{app: web}}}}\nspec: {{nodeName: east-{n}}}\nstatus: {{podIP: 10.1.{n}.{}}}\n",
                p + 1
            );
        }
    }
    let loaded = load_str(Path::new("east.yaml"), &yaml);
    if !loaded.errors.is_empty() {
        bail!("east's manifests: {:?}", loaded.errors);
    }
    let objects: Vec<Object> = loaded.objects;
    let engine = PolicyEngine::new(
        EngineConfig {
            cluster_name: Some("east".parse()?),
            ..EngineConfig::default()
        },
        objects,
    )?;
    Ok(Arc::new(Hub::with_epoch(engine, 1)))
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

async fn wait_synced(states: &PeerStates, peer: &str, pods: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(s) = states.get(peer) {
            if s.state == PeerState::Synced && s.pods == pods {
                return Ok(());
            }
            if s.state == PeerState::Refused {
                bail!("{peer} refused: {}", s.error);
            }
        }
        if Instant::now() > deadline {
            bail!("{peer} did not sync: {:?}", states.get(peer));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.pods > 25_000 || args.clusters == 0 || args.clusters > 100 {
        bail!("--pods at most 25000, --clusters 1..=100 (each peer has one /16)");
    }
    let root = std::env::temp_dir().join(format!("bulkhead-bench-peering-{}", std::process::id()));
    let result = run(&args, &root).await;
    let _ = std::fs::remove_dir_all(&root);
    result
}

async fn run(args: &Args, root: &Path) -> anyhow::Result<()> {
    let east_pki = Pki::new(root, "east")?;
    println!(
        "building {} peer clusters of {} pods and east ({} nodes)…",
        args.clusters, args.pods, args.nodes
    );
    let mut peers = Vec::new();
    let mut configs = Vec::new();
    for c in 0..args.clusters {
        let name = cluster_name(c);
        let pki = Pki::new(root, &name)?;
        let hub = peer_hub(c, args.pods)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr: SocketAddr = listener.local_addr()?;
        let tls = Arc::new(ReloadingServerTls::with_client_cas(
            &pki.path("controller.pem"),
            &pki.path("controller-key.pem"),
            &[east_pki.path("ca.pem")],
        )?);
        let service = PeeringService::new(
            hub.clone(),
            name.parse()?,
            vec![format!("10.{}.0.0/16", 100 + c).parse()?],
        );
        tokio::spawn(serve_peering(listener, tls, service));
        let config: PeerConfig = format!(
            "name={name},address=https://{addr},ca={}",
            pki.path("ca.pem").display()
        )
        .parse()
        .context("peer config")?;
        configs.push(config);
        peers.push(hub);
    }
    let east = east_hub(args.nodes)?;
    let states = Arc::new(PeerStates::default());
    let importer = Arc::new(Importer::new(
        east.clone(),
        "east".parse()?,
        vec!["10.1.0.0/16".parse()?],
        states.clone(),
    ));
    let retry = RetryPolicy {
        first: Duration::from_millis(50),
        max: Duration::from_millis(500),
    };
    let (cert, key) = (
        east_pki.path("peering.pem"),
        east_pki.path("peering-key.pem"),
    );

    // One peer's snapshot.
    let before = rss_mib();
    let started = Instant::now();
    import::start(
        importer.clone(),
        &configs[..1],
        cert.clone(),
        key.clone(),
        retry,
    );
    wait_synced(&states, &cluster_name(0), args.pods as u64).await?;
    let one = started.elapsed();
    let after = rss_mib();
    println!(
        "import of one {}-pod snapshot: {:.0} ms, +{:.1} MiB resident (process, {:.1} → {:.1} MiB)",
        args.pods,
        one.as_secs_f64() * 1e3,
        after - before,
        before,
        after
    );

    // The others.
    let started = Instant::now();
    import::start(importer.clone(), &configs[1..], cert, key, retry);
    for c in 1..args.clusters {
        wait_synced(&states, &cluster_name(c), args.pods as u64).await?;
    }
    let rest = started.elapsed();
    let pods_in_east = east.pods().map(|(p, _)| p.len()).unwrap_or_default();
    println!(
        "import of the other {} peers: {:.0} ms; east's engine holds {} pods, resident {:.0} MiB",
        args.clusters - 1,
        rest.as_secs_f64() * 1e3,
        pods_in_east,
        rss_mib()
    );

    // Relabels: east-0's subscription receives each one's delta.
    let mut sub = east.subscribe("east-0")?;
    let entries = sub.snapshot.ipcache.len();
    println!(
        "east-0's rule set: {} ipcache entries (every peer's api pods)",
        entries
    );
    let mut rng = StdRng::seed_from_u64(20);
    let mut apps: Vec<Vec<&'static str>> = (0..args.clusters)
        .map(|_| (0..args.pods).map(app_of).collect())
        .collect();
    let mut latencies = Vec::with_capacity(args.relabels);
    for _ in 0..args.relabels {
        let c = rng.random_range(0..args.clusters);
        let p = rng.random_range(0..args.pods);
        let app = if apps[c][p] == "api" { "batch" } else { "api" };
        apps[c][p] = app;
        // Drain anything left over, so the next update is this relabel's.
        while sub.updates.try_recv().is_ok() {}
        let t0 = Instant::now();
        peers[c].apply(vec![Change::UpsertPod(peer_pod(c, p, app))], false)?;
        match tokio::time::timeout(Duration::from_secs(30), sub.updates.recv()).await {
            Ok(Some(_)) => latencies.push(t0.elapsed()),
            Ok(None) => bail!("east-0's subscription ended"),
            Err(_) => bail!(
                "a relabel in {} did not reach east-0 in 30 s",
                cluster_name(c)
            ),
        }
        // Some spacing, as relabels come in a fleet (and so that the exporter's coalescing of
        // bursts does not merge two measurements).
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    latencies.sort();
    println!(
        "relabel in a peer → delta at east's node ({} relabels over {} peers of {} pods): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        args.clusters,
        args.pods,
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    println!(
        "targets: relabel ≤ 1000 ms p99; one 10,000-pod snapshot ≤ 1000 ms and ≤ 100 MB: {}",
        if percentile(&latencies, 0.99) <= Duration::from_secs(1) && one <= Duration::from_secs(1) {
            "met (time)"
        } else {
            "NOT met (time)"
        }
    );
    Ok(())
}
