//! Quarantine latency in the lab: from the quarantine call to the victim's traffic stopping,
//! measured by receivers of a steady UDP stream (one datagram every ~100 µs) on the victim's own
//! node and on another node, and to the remote node's agent having the change in its kernel
//! (its ack). Figures, not a test: run as root after `cargo build --release -p bulkhead`.
//!
//! `cargo run --release -p bulkhead-bench --bin quarantine [-- --rounds 30]`

use std::{
    net::{SocketAddr, UdpSocket},
    path::PathBuf,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bulkhead_agent::netns::Netns;
use bulkhead_proto::v1 as pb;
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 30)]
    rounds: usize,
    /// The bulkhead binary that runs the lab.
    #[arg(long, default_value = "target/release/bulkhead")]
    bulkhead: PathBuf,
}

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: victim, namespace: bench}
spec: {nodeName: node-1, containers: [{name: c, image: x, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: same, namespace: bench}
spec: {nodeName: node-1, containers: [{name: c, image: x, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: remote, namespace: bench}
spec: {nodeName: node-2, containers: [{name: c, image: x, ports: [{containerPort: 80}]}]}
"#;

const PORT: u16 = 9100;

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Receiver {
    last: Arc<Mutex<Option<Instant>>>,
}

fn receive(pod_netns: &str) -> anyhow::Result<Receiver> {
    let last = Arc::new(Mutex::new(None));
    let sock = Netns::existing(pod_netns).run(|| UdpSocket::bind(("0.0.0.0", PORT)))??;
    let l = last.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while sock.recv(&mut buf).is_ok() {
            if let Ok(mut g) = l.lock() {
                *g = Some(Instant::now());
            }
        }
    });
    Ok(Receiver { last })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.bulkhead.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p bulkhead)",
            args.bulkhead.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("bh-bench-quarantine-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let state = dir.join("state");
    let manifests = dir.join("pods.yaml");
    std::fs::write(&manifests, MANIFESTS)?;
    let bulkhead = args.bulkhead.clone();
    let lab = |a: &[&str]| -> anyhow::Result<String> {
        let out = Command::new(&bulkhead)
            .arg("lab")
            .arg("--state")
            .arg(&state)
            .args(a)
            .output()?;
        if !out.status.success() {
            bail!("lab {a:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    };
    lab(&[
        "up",
        "--port-base",
        "19560",
        "-f",
        &manifests.to_string_lossy(),
    ])?;
    let result = measure(&args, &state);
    let _ = lab(&["down"]);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure(args: &Args, state: &std::path::Path) -> anyhow::Result<()> {
    let lab_state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("lab.json"))?)?;
    let pod = |k: &str| -> anyhow::Result<(String, String)> {
        let p = &lab_state["pods"][k];
        Ok((
            p["netns"].as_str().context("netns")?.to_string(),
            p["ips"][0].as_str().context("ip")?.to_string(),
        ))
    };
    let (victim_ns, _) = pod("bench/victim")?;
    let (same_ns, same_ip) = pod("bench/same")?;
    let (remote_ns, remote_ip) = pod("bench/remote")?;
    let same = receive(&same_ns)?;
    let remote = receive(&remote_ns)?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let targets: Vec<SocketAddr> = vec![
            format!("{same_ip}:{PORT}").parse()?,
            format!("{remote_ip}:{PORT}").parse()?,
        ];
        let ns = Netns::existing(&victim_ns);
        let _sender = ns.spawn(move || {
            let sock = UdpSocket::bind("0.0.0.0:0").expect("sender socket");
            let mut seq: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                for t in &targets {
                    let _ = sock.send_to(&seq.to_be_bytes(), t);
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        });
    }
    let grpc = lab_state["grpc_port"].as_u64().context("grpc port")?;
    let certs = state.join("certs");
    let read = |f: &str| std::fs::read_to_string(certs.join(f));
    let tls = tonic::transport::ClientTlsConfig::new()
        .domain_name("bulkhead-controller")
        .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.pem")?))
        .identity(tonic::transport::Identity::from_pem(
            read("admin.pem")?,
            read("admin-key.pem")?,
        ));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut local, mut cross, mut acked) = (Vec::new(), Vec::new(), Vec::new());
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{grpc}"))?
            .tls_config(tls)?
            .connect()
            .await?;
        let mut admin = pb::admin_client::AdminClient::new(channel);
        for _ in 0..args.rounds {
            // Traffic flows before each round.
            tokio::time::sleep(Duration::from_millis(150)).await;
            let t0 = Instant::now();
            let resp = admin
                .quarantine(pb::QuarantineRequest {
                    namespace: "bench".into(),
                    pod: "victim".into(),
                    reason: "benchmark".into(),
                    actor: "bench".into(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let want = resp.nodes.get("node-2").copied().unwrap_or(0);
            loop {
                let status = admin
                    .node_status(pb::NodeStatusRequest {})
                    .await?
                    .into_inner();
                if status
                    .nodes
                    .iter()
                    .any(|n| n.node == "node-2" && n.realized >= want)
                {
                    acked.push(t0.elapsed());
                    break;
                }
                if t0.elapsed() > Duration::from_secs(5) {
                    bail!("node-2 did not ack within 5 s");
                }
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            // Let the stream settle, then read when each receiver last heard the victim.
            tokio::time::sleep(Duration::from_millis(300)).await;
            for (r, out) in [(&same, &mut local), (&remote, &mut cross)] {
                let last = r
                    .last
                    .lock()
                    .ok()
                    .and_then(|g| *g)
                    .context("no datagram received")?;
                out.push(last.saturating_duration_since(t0));
            }
            admin
                .release(pb::ReleaseRequest {
                    namespace: "bench".into(),
                    pod: "victim".into(),
                    actor: "bench".into(),
                })
                .await?;
            // Wait until traffic flows again.
            let released = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let fresh = |r: &Receiver| {
                    r.last
                        .lock()
                        .ok()
                        .and_then(|g| *g)
                        .is_some_and(|t| t > released)
                };
                if fresh(&same) && fresh(&remote) {
                    break;
                }
                if released.elapsed() > Duration::from_secs(5) {
                    bail!("traffic did not resume within 5 s of the release");
                }
            }
        }
        Ok::<_, anyhow::Error>(())
    })?;
    stop.store(true, Ordering::Relaxed);
    println!(
        "quarantine latency over {} rounds (UDP every ~100 µs from the victim; ms from the call)",
        args.rounds
    );
    println!("{:<52} | {:>7} | {:>7} | {:>7}", "", "p50", "p99", "max");
    for (name, v) in [
        ("victim's traffic stops at a peer on its node", &mut local),
        (
            "victim's traffic stops at a peer on another node",
            &mut cross,
        ),
        ("other node's agent has it in the kernel (ack)", &mut acked),
    ] {
        let (p50, p99, max) = (percentile(v, 0.5), percentile(v, 0.99), percentile(v, 1.0));
        println!(
            "{name:<52} | {:>7.2} | {:>7.2} | {:>7.2}   (p99 / 100 ms target = {:.3})",
            ms(p50),
            ms(p99),
            ms(max),
            ms(p99) / 100.0
        );
    }
    Ok(())
}
