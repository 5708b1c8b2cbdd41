//! Tier 3: a policy change or a quarantine cuts established connections for good, with real
//! traffic in the lab. `prod/db` (node-1) serves TCP 5432 and UDP 5353; `prod/api-near` (node-1,
//! same node) and `prod/api-far` (node-2, across nodes) hold a connection and a UDP flow to it,
//! busy both ways: requests answered, data the server pushes on its own, TCP keepalive.
//!
//! Each trial narrows a policy (db's ingress, or the clients' egress) or quarantines db, and
//! checks that from then on not one byte is delivered either way — the cut forces
//! retransmissions, and the server keeps pushing, which is what used to bring a revoked
//! connection back. The narrowed policy still admits TCP 80, which keeps working. After the
//! change is lifted, new connections work at once while the cut TCP connections stay cut. Every
//! revoked connection is reported once, naming the rule that revoked it.
//!
//! The test counts trials and fails unless every one is cut; run it against another build with
//! `BULKHEAD_TEST_BIN=/path/to/bulkhead` to compare.

mod common;

use common::*;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use bulkhead_agent::{netns::Netns, privileged::check_privileged_test};

const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: prod}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: prod, labels: {app: db}}
spec:
  nodeName: node-1
  containers: [{name: c, image: x, ports: [{containerPort: 80}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: api-near, namespace: prod, labels: {app: api}}
spec:
  nodeName: node-1
  containers: [{name: c, image: x, ports: [{containerPort: 80}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: api-far, namespace: prod, labels: {app: api}}
spec:
  nodeName: node-2
  containers: [{name: c, image: x, ports: [{containerPort: 80}]}]
"#;

/// db admits, and the api pods may send, what `db_ports` and `api_ports` list.
fn policies(db_ports: &str, api_ports: &str) -> String {
    format!(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: db-ingress, namespace: prod}}
spec:
  podSelector: {{matchLabels: {{app: db}}}}
  policyTypes: [Ingress]
  ingress:
  - from: [{{podSelector: {{matchLabels: {{app: api}}}}}}]
    ports: {db_ports}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: api-egress, namespace: prod}}
spec:
  podSelector: {{matchLabels: {{app: api}}}}
  policyTypes: [Egress]
  egress:
  - to: [{{podSelector: {{matchLabels: {{app: db}}}}}}]
    ports: {api_ports}
"#
    )
}

const ALL_PORTS: &str =
    "[{protocol: TCP, port: 5432}, {protocol: UDP, port: 5353}, {protocol: TCP, port: 80}]";
const WEB_ONLY: &str = "[{protocol: TCP, port: 80}]";

/// Starts `f` on a thread inside the pod's namespace; threads it starts stay there.
fn spawn_in_pod(pod: &Pod, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    let h = Netns::existing(&pod.netns).spawn(f);
    std::thread::spawn(move || h.join().expect("pod thread").expect("enter pod namespace"))
}

/// Keepalive probes after 1 s of silence, every second.
fn keepalive(s: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(s, sockopt::KeepAlive, &true);
    let _ = setsockopt(s, sockopt::TcpKeepIdle, &1);
    let _ = setsockopt(s, sockopt::TcpKeepInterval, &1);
}

/// Bytes one end of a flow has received.
type Received = Arc<AtomicU64>;

/// db's servers: TCP 5432 answers each 64-byte request and pushes 64 bytes every 15 ms on its
/// own; UDP 5353 answers each datagram and pushes one to every client every 15 ms. Received
/// bytes are counted per client address.
struct Server {
    stop: Arc<AtomicBool>,
    received: Arc<Mutex<BTreeMap<SocketAddr, Received>>>,
    /// UDP clients it pushes to.
    udp_clients: Arc<Mutex<std::collections::BTreeSet<SocketAddr>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    fn start(db: &Pod) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let received: Arc<Mutex<BTreeMap<SocketAddr, Received>>> = Arc::default();
        let mut threads = Vec::new();
        // Both sockets are bound before `start` returns.
        let (bound, ready) = std::sync::mpsc::channel();
        let (st, rc, tcp_bound) = (stop.clone(), received.clone(), bound.clone());
        threads.push(spawn_in_pod(db, move || {
            let listener = TcpListener::bind("0.0.0.0:5432").expect("bind 5432");
            let _ = tcp_bound.send(());
            listener.set_nonblocking(true).expect("nonblocking");
            let mut conns = Vec::new();
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, peer)) => {
                        s.set_nonblocking(false).expect("blocking");
                        keepalive(&s);
                        let count = Received::default();
                        rc.lock().expect("lock").insert(peer, count.clone());
                        conns.push(serve_tcp(s, count, st.clone()));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        }));
        let udp_clients: Arc<Mutex<std::collections::BTreeSet<SocketAddr>>> = Arc::default();
        let (st, rc, clients) = (stop.clone(), received.clone(), udp_clients.clone());
        threads.push(spawn_in_pod(db, move || {
            let sock = UdpSocket::bind("0.0.0.0:5353").expect("bind 5353");
            let _ = bound.send(());
            sock.set_read_timeout(Some(Duration::from_millis(10)))
                .expect("timeout");
            let mut last_push = Instant::now();
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    clients.lock().expect("lock").insert(peer);
                    let count = rc.lock().expect("lock").entry(peer).or_default().clone();
                    count.fetch_add(n as u64, Ordering::Relaxed);
                    let _ = sock.send_to(&[b'a'; 64], peer);
                }
                if last_push.elapsed() >= Duration::from_millis(15) {
                    last_push = Instant::now();
                    for p in clients.lock().expect("lock").iter() {
                        let _ = sock.send_to(&[b'p'; 64], p);
                    }
                }
            }
        }));
        for _ in 0..2 {
            ready
                .recv_timeout(Duration::from_secs(5))
                .expect("db's servers listen");
        }
        Server {
            stop,
            received,
            udp_clients,
            threads,
        }
    }

    fn received_from(&self, client: SocketAddr) -> u64 {
        self.received
            .lock()
            .expect("lock")
            .get(&client)
            .map(|c| c.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Stops pushing to a UDP client that went away (its datagrams would be a live flow).
    fn forget(&self, client: SocketAddr) {
        self.udp_clients.lock().expect("lock").remove(&client);
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// One accepted connection: a reader that answers every request, and a pusher.
fn serve_tcp(s: TcpStream, count: Received, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
        let _ = s.set_write_timeout(Some(Duration::from_millis(50)));
        let mut pusher = s.try_clone().expect("clone");
        let st = stop.clone();
        let push = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let _ = pusher.write_all(&[b'p'; 64]);
                std::thread::sleep(Duration::from_millis(15));
            }
        });
        let mut reader = s.try_clone().expect("clone");
        let mut answer = s;
        let mut buf = [0u8; 4096];
        while !stop.load(Ordering::Relaxed) {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    count.fetch_add(n as u64, Ordering::Relaxed);
                    let _ = answer.write_all(&[b'a'; 64]);
                }
                Err(_) => {}
            }
        }
        let _ = answer.shutdown(Shutdown::Both);
        let _ = push.join();
    })
}

/// A client's busy TCP connection and UDP flow to db.
struct Client {
    name: &'static str,
    tcp: SocketAddr,
    udp: SocketAddr,
    tcp_received: Received,
    udp_received: Received,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Client {
    /// Connects and starts sending a request every 10 ms on each; `None` if it cannot connect.
    fn start(name: &'static str, pod: &Pod, db: IpAddr) -> Option<Client> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tcp_received, udp_received) = (Received::default(), Received::default());
        let (st, tr, ur) = (stop.clone(), tcp_received.clone(), udp_received.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = spawn_in_pod(pod, move || {
            let Ok(s) =
                TcpStream::connect_timeout(&SocketAddr::new(db, 5432), Duration::from_secs(1))
            else {
                let _ = tx.send(None);
                return;
            };
            keepalive(&s);
            let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
            let _ = s.set_write_timeout(Some(Duration::from_millis(50)));
            let udp = UdpSocket::bind("0.0.0.0:0").expect("bind");
            udp.connect(SocketAddr::new(db, 5353)).expect("connect udp");
            let _ = udp.set_read_timeout(Some(Duration::from_millis(20)));
            let (tcp_local, udp_local) = (
                s.local_addr().expect("local"),
                udp.local_addr().expect("local"),
            );
            let _ = tx.send(Some((tcp_local, udp_local)));
            let mut threads = Vec::new();
            let (mut w, mut r) = (s.try_clone().expect("clone"), s);
            let st2 = st.clone();
            threads.push(std::thread::spawn(move || {
                while !st2.load(Ordering::Relaxed) {
                    let _ = w.write_all(&[b'q'; 64]);
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = w.shutdown(Shutdown::Both);
            }));
            let st2 = st.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !st2.load(Ordering::Relaxed) {
                    match r.read(&mut buf) {
                        Ok(0) => std::thread::sleep(Duration::from_millis(10)),
                        Ok(n) => {
                            tr.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(_) => {}
                    }
                }
            }));
            let mut last_send = Instant::now() - Duration::from_secs(1);
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::Relaxed) {
                if last_send.elapsed() >= Duration::from_millis(10) {
                    last_send = Instant::now();
                    let _ = udp.send(&[b'q'; 64]);
                }
                if let Ok(n) = udp.recv(&mut buf) {
                    ur.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            for t in threads {
                let _ = t.join();
            }
        });
        match rx.recv().ok().flatten() {
            Some((tcp, udp)) => Some(Client {
                name,
                tcp,
                udp,
                tcp_received,
                udp_received,
                stop,
                threads: vec![handle],
            }),
            None => {
                let _ = handle.join();
                None
            }
        }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// What every flow of every client has delivered so far: (flow, bytes), both directions.
fn delivered(server: &Server, clients: &[Client]) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for c in clients {
        out.push((format!("{} tcp → db", c.name), server.received_from(c.tcp)));
        out.push((
            format!("db → {} tcp", c.name),
            c.tcp_received.load(Ordering::Relaxed),
        ));
        out.push((format!("{} udp → db", c.name), server.received_from(c.udp)));
        out.push((
            format!("db → {} udp", c.name),
            c.udp_received.load(Ordering::Relaxed),
        ));
    }
    out
}

/// Waits until every flow has delivered more than in `before`: all busy both ways.
fn all_flowing(server: &Server, clients: &[Client]) -> bool {
    let before = delivered(server, clients);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let now = delivered(server, clients);
        if now.iter().zip(&before).all(|(n, b)| n.1 > b.1) {
            return true;
        }
    }
    false
}

/// A new connection to db:`port` from `pod` answers at once (the lab's server greets on 80;
/// db's own server answers a request on 5432).
fn connects(pod: &Pod, db: IpAddr, port: u16) -> bool {
    in_pod(pod, move || {
        let Ok(mut s) =
            TcpStream::connect_timeout(&SocketAddr::new(db, port), Duration::from_millis(700))
        else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(700)));
        if port != 80 && s.write_all(&[b'q'; 64]).is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        matches!(s.read(&mut buf), Ok(n) if n > 0)
    })
}

fn udp_answers(pod: &Pod, db: IpAddr) -> bool {
    in_pod(pod, move || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 128];
        s.send_to(&[b'q'; 64], SocketAddr::new(db, 5353)).is_ok() && s.recv(&mut buf).is_ok()
    })
}

/// How a trial cuts the flows, and how it lifts the cut.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// db's ingress narrowed to TCP 80.
    IngressDeny,
    /// The clients' egress narrowed to TCP 80.
    EgressDeny,
    /// db quarantined.
    Quarantine,
}

struct Lab {
    state: String,
    dir: std::path::PathBuf,
}

impl Lab {
    fn apply(&self, db_ports: &str, api_ports: &str) {
        let file = self.dir.join("policies.yaml");
        std::fs::write(&file, policies(db_ports, api_ports)).expect("write policies");
        let out = run_ok(&[
            "lab",
            "--state",
            &self.state,
            "apply",
            "-f",
            &file.to_string_lossy(),
        ]);
        assert!(out.contains("realized on all nodes"), "{out}");
    }

    fn cut(&self, how: Cut) {
        match how {
            Cut::IngressDeny => self.apply(WEB_ONLY, ALL_PORTS),
            Cut::EgressDeny => self.apply(ALL_PORTS, WEB_ONLY),
            Cut::Quarantine => {
                // Returns once every node enforces it.
                run_ok(&[
                    "quarantine",
                    "prod/db",
                    "--reason",
                    "revocation test",
                    "--lab",
                    &self.state,
                ]);
            }
        }
    }

    fn lift(&self, how: Cut) {
        match how {
            Cut::Quarantine => {
                run_ok(&["quarantine", "release", "prod/db", "--lab", &self.state]);
            }
            _ => self.apply(ALL_PORTS, ALL_PORTS),
        }
    }
}

/// The outcome of one trial: flows that delivered bytes after the cut, and after the lift.
struct Trial {
    after_cut: Vec<String>,
    after_lift: Vec<String>,
    /// Client (TCP, UDP) addresses of the cut flows, to find their revocation records.
    flows: Vec<(SocketAddr, SocketAddr)>,
}

fn trial(lab: &Lab, how: Cut, server: &Server, p: &BTreeMap<String, Pod>) -> Trial {
    let db = p["prod/db"].ip;
    let clients: Vec<Client> = [("api-near", "prod/api-near"), ("api-far", "prod/api-far")]
        .iter()
        .map(|(name, key)| Client::start(name, &p[*key], db).expect("connect before the cut"))
        .collect();
    assert!(
        all_flowing(server, &clients),
        "{how:?}: flows busy before the cut: {:?}",
        delivered(server, &clients)
    );

    lab.cut(how);
    // What was in flight when the kernel got the change is read by now.
    std::thread::sleep(Duration::from_millis(200));
    let at_cut = delivered(server, &clients);
    std::thread::sleep(Duration::from_millis(1500));
    let later = delivered(server, &clients);
    let after_cut: Vec<String> = later
        .iter()
        .zip(&at_cut)
        .filter(|(l, c)| l.1 > c.1)
        .map(|(l, c)| format!("{} (+{} bytes)", l.0, l.1 - c.1))
        .collect();
    if !matches!(how, Cut::Quarantine) {
        // The narrowed policy still admits TCP 80.
        for key in ["prod/api-near", "prod/api-far"] {
            assert!(
                connects(&p[key], db, 80),
                "{how:?}: {key} → db:80 still admitted"
            );
        }
    }

    // Lifted: new connections and flows work at once; the cut TCP connections stay cut (the
    // clients keep sending, and UDP flows come back as their clients send again).
    lab.lift(how);
    for key in ["prod/api-near", "prod/api-far"] {
        assert!(
            connects(&p[key], db, 5432),
            "{how:?}: a new connection from {key} works at once after the lift"
        );
        assert!(
            udp_answers(&p[key], db),
            "{how:?}: new UDP from {key} after the lift"
        );
    }
    let at_lift = delivered(server, &clients);
    std::thread::sleep(Duration::from_millis(600));
    let after_lift: Vec<String> = delivered(server, &clients)
        .iter()
        .zip(&at_lift)
        .filter(|(l, c)| l.1 > c.1 && l.0.contains("tcp"))
        .map(|(l, c)| format!("{} (+{} bytes)", l.0, l.1 - c.1))
        .collect();
    let flows = clients.iter().map(|c| (c.tcp, c.udp)).collect();
    for c in clients {
        let udp = c.udp;
        c.stop();
        server.forget(udp);
    }
    Trial {
        after_cut,
        after_lift,
        flows,
    }
}

/// Revocation records the controller has for prod, as (protocol, client address, rule).
fn revocations(state: &str) -> Vec<(u64, SocketAddr, String)> {
    run_ok(&["flows", "--lab", state, "--namespace", "prod", "-o", "json"])
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|f| f["kind"] == "revoked")
        .filter_map(|f| {
            let src: IpAddr = f["src"].as_str()?.parse().ok()?;
            let port = u16::try_from(f["src_port"].as_u64()?).ok()?;
            Some((
                f["protocol"].as_u64().unwrap_or(0),
                SocketAddr::new(src, port),
                f["rule"].as_str().unwrap_or_default().to_string(),
            ))
        })
        .collect()
}

#[test]
fn revoked_connections_stay_cut_from_both_sides() {
    if !check_privileged_test("revoked_connections_stay_cut_from_both_sides") {
        return;
    }
    let test_lab = TestLab::up("revocation-e2e", PODS, 19800);
    let (s, state, tmp) = (test_lab.arg(), test_lab.state.clone(), test_lab.dir.clone());
    let lab = Lab {
        state: s.clone(),
        dir: tmp.clone(),
    };
    lab.apply(ALL_PORTS, ALL_PORTS);
    let p = pods(&state);
    let server = Server::start(&p["prod/db"]);

    let mut report = Vec::new();
    let mut failures = Vec::new();
    let mut cut_flows: Vec<(Cut, SocketAddr, SocketAddr)> = Vec::new();
    for (how, trials) in [
        (Cut::IngressDeny, 10),
        (Cut::EgressDeny, 10),
        (Cut::Quarantine, 3),
    ] {
        let mut cut = 0;
        for n in 0..trials {
            let t = trial(&lab, how, &server, &p);
            if t.after_cut.is_empty() && t.after_lift.is_empty() {
                cut += 1;
            } else {
                failures.push(format!(
                    "{how:?} trial {n}: delivered after the cut: {:?}; old connections after the lift: {:?}",
                    t.after_cut, t.after_lift
                ));
            }
            cut_flows.extend(t.flows.iter().map(|(tcp, udp)| (how, *tcp, *udp)));
        }
        report.push(format!(
            "{how:?}: {cut}/{trials} trials cut every flow (TCP and UDP, same node and across nodes) for good"
        ));
    }
    println!("{}", report.join("\n"));

    // Each revoked connection is reported once, naming the rule that revoked it. (Quarantined
    // connections are cut by the agent, which reports the cut in its status instead.)
    let mut missing = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records = revocations(&s);
        missing.clear();
        for (how, tcp, udp) in &cut_flows {
            let rule = match how {
                Cut::IngressDeny => "prod/db-ingress",
                Cut::EgressDeny => "prod/api-egress",
                Cut::Quarantine => continue,
            };
            for (protocol, client) in [(6, tcp), (17, udp)] {
                let n = records
                    .iter()
                    .filter(|(pr, c, r)| *pr == protocol && c == client && r.contains(rule))
                    .count();
                if n != 1 {
                    missing.push(format!(
                        "{how:?} protocol {protocol} from {client}: {n} records"
                    ));
                }
            }
        }
        if missing.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    server.stop();
    assert!(
        failures.is_empty(),
        "{}\n{}",
        report.join("\n"),
        failures.join("\n")
    );
    assert!(
        missing.is_empty(),
        "revocations not reported once: {missing:?}"
    );
    drop(test_lab);
}
