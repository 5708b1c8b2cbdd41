//! Tier 3: a real controller and two real agents over gRPC with mTLS on loopback. Each agent
//! enforces on its own lab node (a network namespace with a client and a server pod). A
//! manifest change reaches the kernel of exactly the nodes it affects; a killed agent resyncs on
//! restart; a killed controller leaves enforcement intact and the agents reconnect to its
//! successor; a client without a certificate from the cluster CA is refused.

mod common;

use common::*;

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use bulkhead_agent::{
    loader::remove_pins,
    netns::{Netns, enable_forwarding, wire_pod},
    privileged::check_privileged_test,
};

struct Node {
    name: &'static str,
    ns: Netns,
    pods: Vec<Netns>,
    metrics: u16,
    agent: Option<Child>,
}

struct Cluster {
    dir: PathBuf,
    grpc: u16,
    http: u16,
    controller: Option<Child>,
    nodes: Vec<Node>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut a) = n.agent.take() {
                let _ = a.kill();
                let _ = a.wait();
            }
            let _ = remove_pins(&pin_dir(&self.dir, n.name));
        }
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pin_dir(dir: &Path, node: &str) -> PathBuf {
    let tag = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    PathBuf::from(format!("/sys/fs/bpf/bulkhead-test/{tag}-{node}"))
}

const NAMESPACE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: dist, labels: {team: dist}}
"#;

fn pod(name: &str, node: &str, ip: Ipv4Addr, labels: &str) -> String {
    format!(
        r#"---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: dist, labels: {labels}}}
spec:
  nodeName: {node}
  containers: [{{name: c, image: x, ports: [{{containerPort: 8080}}, {{containerPort: 8081}}]}}]
status: {{podIP: {ip}}}
"#
    )
}

/// The servers selected by `selector` admit clients on 8080 only.
fn policy(selector: &str) -> String {
    format!(
        r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: servers, namespace: dist}}
spec:
  podSelector: {{matchLabels: {selector}}}
  ingress:
  - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]
    ports: [{{port: 8080}}]
"#
    )
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write manifest");
    std::fs::rename(&tmp, path).expect("replace manifest");
}

/// Per node: (version, realized, connected) from the controller's API.
fn node_states(c: &Cluster) -> Vec<(String, u64, u64, bool)> {
    let Some(body) = http_get(c.http, "/api/nodes") else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|n| {
                    (
                        n["node"].as_str().unwrap_or_default().to_string(),
                        n["version"].as_u64().unwrap_or(0),
                        n["realized"].as_u64().unwrap_or(0),
                        n["connected"].as_bool().unwrap_or(false),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn all_realized(c: &Cluster) -> bool {
    let states = node_states(c);
    ["n1", "n2"].iter().all(|n| {
        states
            .iter()
            .any(|(name, v, r, conn)| name == n && *conn && *v > 0 && r == v)
    })
}

fn version_of(c: &Cluster, node: &str) -> u64 {
    node_states(c)
        .into_iter()
        .find(|(n, ..)| n == node)
        .map(|(_, v, ..)| v)
        .unwrap_or(0)
}

fn start_controller(c: &Cluster) -> Child {
    let certs = c.dir.join("certs");
    Command::new(bin())
        .args(["controller", "-f"])
        .arg(c.dir.join("manifests"))
        .args(["--listen", &format!("127.0.0.1:{}", c.grpc)])
        .args(["--http", &format!("127.0.0.1:{}", c.http)])
        // This run's ports: gRPC, HTTP, agents' metrics (2 and 3), then these.
        .args(["--metrics", &format!("127.0.0.1:{}", c.grpc + 4)])
        .arg("--tls-cert")
        .arg(certs.join("controller.pem"))
        .arg("--tls-key")
        .arg(certs.join("controller-key.pem"))
        .arg("--client-ca")
        .arg(certs.join("ca.pem"))
        .args(["--reload-ms", "100"])
        .stdout(Stdio::null())
        .spawn()
        .expect("start controller")
}

/// Kills the controller, runs `while_down`, starts a new one and waits until every agent is
/// back and has realized its rule set.
fn restart_controller(c: &mut Cluster, what: &str, while_down: impl FnOnce(&Cluster)) {
    let mut ctl = c.controller.take().expect("controller");
    ctl.kill().expect("kill controller");
    ctl.wait().expect("reap controller");
    while_down(c);
    c.controller = Some(start_controller(c));
    wait_until(what, Duration::from_secs(30), || all_realized(c));
}

fn start_agent(c: &Cluster, n: &Node) -> Child {
    let certs = c.dir.join("certs");
    Command::new(bin())
        .args(["agent", "run", "--node", n.name, "--netns", n.ns.name()])
        .args(["--controller", &format!("127.0.0.1:{}", c.grpc)])
        .arg("--tls-cert")
        .arg(certs.join(format!("{}.pem", n.name)))
        .arg("--tls-key")
        .arg(certs.join(format!("{}-key.pem", n.name)))
        .arg("--ca")
        .arg(certs.join("ca.pem"))
        .arg("--pin-dir")
        .arg(pin_dir(&c.dir, n.name))
        .args(["--metrics-addr", &format!("127.0.0.1:{}", n.metrics)])
        .args(["--http", &format!("127.0.0.1:{}", n.metrics + 3)])
        .stdout(Stdio::null())
        .spawn()
        .expect("start agent")
}

fn serve(pod: &Netns) {
    for port in [8080u16, 8081] {
        let l = pod
            .run(move || TcpListener::bind(("0.0.0.0", port)))
            .expect("enter pod")
            .expect("bind");
        thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let _ = c.write_all(b"ok");
            }
        });
    }
}

fn connects(from: &Netns, to: Ipv4Addr, port: u16) -> bool {
    from.run(move || {
        let Ok(mut s) =
            TcpStream::connect_timeout(&SocketAddr::from((to, port)), Duration::from_millis(600))
        else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(800)));
        let mut b = [0u8; 2];
        s.read_exact(&mut b).is_ok()
    })
    .unwrap_or(false)
}

/// Runs `call` on a channel to the controller's gRPC port with the given TLS material (none:
/// plain https without a client certificate configured).
fn with_channel<F, Fut>(
    grpc: u16,
    tls: Option<tonic::transport::ClientTlsConfig>,
    call: F,
) -> Result<(), String>
where
    F: FnOnce(tonic::transport::Channel) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let mut ep = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{grpc}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(2));
        if let Some(t) = tls {
            ep = ep.tls_config(t).map_err(|e| e.to_string())?;
        }
        let ch = ep.connect().await.map_err(|e| format!("connect: {e:?}"))?;
        call(ch).await
    })
}

/// A gRPC admin call with the given TLS material; Ok when the controller accepted us.
fn admin_call(grpc: u16, tls: Option<tonic::transport::ClientTlsConfig>) -> Result<(), String> {
    with_channel(grpc, tls, |ch| async move {
        let mut client = bulkhead_proto::v1::admin_client::AdminClient::new(ch);
        client
            .node_status(bulkhead_proto::v1::NodeStatusRequest {})
            .await
            .map(|_| ())
            .map_err(|e| format!("call: {e:?}"))
    })
}

/// Opens a Sync stream as `node` and waits for the first message (the snapshot).
fn sync_as(grpc: u16, tls: tonic::transport::ClientTlsConfig, node: &str) -> Result<(), String> {
    use bulkhead_proto::v1::{AgentMessage, Hello, agent_message};
    let node = node.to_string();
    with_channel(grpc, Some(tls), |ch| async move {
        let mut client = bulkhead_proto::v1::distribution_client::DistributionClient::new(ch);
        let hello = AgentMessage {
            msg: Some(agent_message::Msg::Hello(Hello {
                node,
                ..Default::default()
            })),
        };
        let mut stream = client
            .sync(tokio_stream::StreamExt::chain(
                tokio_stream::iter(vec![hello]),
                tokio_stream::pending(),
            ))
            .await
            .map_err(|e| format!("{:?}: {}", e.code(), e.message()))?
            .into_inner();
        match tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
            Ok(Ok(Some(_))) => Ok(()),
            Ok(Ok(None)) => Err("stream closed".into()),
            Ok(Err(e)) => Err(format!("{:?}: {}", e.code(), e.message())),
            Err(_) => Err("no snapshot within 5 s".into()),
        }
    })
}

/// A Quarantine call with the given certificate (the pod need not exist: authorization comes
/// first).
fn quarantine_as(grpc: u16, tls: tonic::transport::ClientTlsConfig) -> Result<(), String> {
    with_channel(grpc, Some(tls), |ch| async move {
        let mut client = bulkhead_proto::v1::admin_client::AdminClient::new(ch);
        client
            .quarantine(bulkhead_proto::v1::QuarantineRequest {
                namespace: "test".into(),
                pod: "client".into(),
                reason: "e2e".into(),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|e| format!("{:?}: {}", e.code(), e.message()))
    })
}

fn tls(dir: &Path, name: &str, ca: &Path) -> tonic::transport::ClientTlsConfig {
    let read = |p: PathBuf| std::fs::read_to_string(p).expect("read pem");
    tonic::transport::ClientTlsConfig::new()
        .domain_name("bulkhead-controller")
        .ca_certificate(tonic::transport::Certificate::from_pem(read(
            ca.to_path_buf(),
        )))
        .identity(tonic::transport::Identity::from_pem(
            read(dir.join(format!("{name}.pem"))),
            read(dir.join(format!("{name}-key.pem"))),
        ))
}

#[test]
fn controller_and_agents_over_mtls() {
    if !check_privileged_test("controller_and_agents_over_mtls") {
        return;
    }
    let pid = std::process::id();
    let tag = pid % 100000;
    let base = 21000 + (pid % 1000) as u16 * 8;
    let dir = std::env::temp_dir().join(format!("bh-dist-{tag}"));
    std::fs::create_dir_all(dir.join("manifests")).expect("dirs");
    let mut c = Cluster {
        dir: dir.clone(),
        grpc: base,
        http: base + 1,
        controller: None,
        nodes: Vec::new(),
    };
    let status = Command::new(bin())
        .args(["certs", "generate", "--nodes", "n1,n2", "--dir"])
        .arg(dir.join("certs"))
        .status()
        .expect("certs");
    assert!(status.success());
    let status = Command::new(bin())
        .args(["certs", "generate", "--nodes", "n1", "--dir"])
        .arg(dir.join("rogue"))
        .status()
        .expect("rogue certs");
    assert!(status.success());

    // Two lab nodes, each with a client and a server pod.
    let ips = |site: u8| {
        (
            Ipv4Addr::new(10, 206, site, 10),
            Ipv4Addr::new(10, 206, site, 20),
        )
    };
    let mut pods_yaml = String::from(NAMESPACE);
    for (i, name) in ["n1", "n2"].into_iter().enumerate() {
        let site = i as u8 + 1;
        let (cip, sip) = ips(site);
        let ns = Netns::create(&format!("bh-d{tag}-{name}")).expect("node ns");
        enable_forwarding(&ns).expect("forwarding");
        let client = Netns::create(&format!("bh-d{tag}-{name}-c")).expect("client ns");
        let server = Netns::create(&format!("bh-d{tag}-{name}-s")).expect("server ns");
        wire_pod(&ns, &client, "bh-client", cip).expect("wire client");
        wire_pod(&ns, &server, "bh-server", sip).expect("wire server");
        serve(&server);
        pods_yaml += &pod(&format!("client{site}"), name, cip, "{app: client}");
        pods_yaml += &pod(
            &format!("server{site}"),
            name,
            sip,
            &format!("{{app: server, site: s{site}}}"),
        );
        c.nodes.push(Node {
            name,
            ns,
            pods: vec![client, server],
            metrics: base + 2 + i as u16,
            agent: None,
        });
    }
    write_atomic(&dir.join("manifests/pods.yaml"), &pods_yaml);
    write_atomic(&dir.join("manifests/policy.yaml"), &policy("{app: server}"));

    c.controller = Some(start_controller(&c));
    for i in 0..2 {
        let a = start_agent(&c, &c.nodes[i]);
        c.nodes[i].agent = Some(a);
    }
    wait_until(
        "both agents realize their rule sets",
        Duration::from_secs(30),
        || all_realized(&c),
    );
    let (_, s1) = ips(1);
    let (_, s2) = ips(2);
    let client = |c: &Cluster, i: usize| -> Netns { Netns::existing(c.nodes[i].pods[0].name()) };
    assert!(connects(&client(&c, 0), s1, 8080));
    assert!(
        !connects(&client(&c, 0), s1, 8081),
        "n1 enforces its rule set"
    );
    assert!(connects(&client(&c, 1), s2, 8080));
    assert!(
        !connects(&client(&c, 1), s2, 8081),
        "n2 enforces its rule set"
    );

    // The policy now selects only the server on n2: n1's rule set changes, n2's does not.
    let (v1, v2) = (version_of(&c, "n1"), version_of(&c, "n2"));
    write_atomic(
        &dir.join("manifests/policy.yaml"),
        &policy("{app: server, site: s2}"),
    );
    wait_until(
        "n1 realizes its new version",
        Duration::from_secs(20),
        || version_of(&c, "n1") > v1 && all_realized(&c),
    );
    assert_eq!(
        version_of(&c, "n2"),
        v2,
        "n2 was not affected and got no new version"
    );
    assert!(
        connects(&client(&c, 0), s1, 8081),
        "n1 no longer isolates server1"
    );
    assert!(
        !connects(&client(&c, 1), s2, 8081),
        "n2 still isolates server2"
    );

    // Kill n1's agent, change the policy back while it is gone, restart: it resyncs.
    let mut a = c.nodes[0].agent.take().expect("agent n1");
    a.kill().expect("kill");
    a.wait().expect("reap");
    write_atomic(&dir.join("manifests/policy.yaml"), &policy("{app: server}"));
    wait_until(
        "the controller sees the change",
        Duration::from_secs(10),
        || {
            node_states(&c)
                .iter()
                .any(|(n, v, r, _)| n == "n1" && v > r)
        },
    );
    assert!(
        connects(&client(&c, 0), s1, 8081),
        "without its agent n1 keeps the last rule set"
    );
    let a = start_agent(&c, &c.nodes[0]);
    c.nodes[0].agent = Some(a);
    wait_until(
        "restarted n1 agent resyncs",
        Duration::from_secs(20),
        || all_realized(&c),
    );
    assert!(
        !connects(&client(&c, 0), s1, 8081),
        "n1 isolates server1 again after the resync"
    );

    // Kill the controller: enforcement stays. A new controller (new epoch) gets the agents back.
    restart_controller(
        &mut c,
        "agents reconnect to the new controller and realize",
        |c| {
            assert!(!connects(&client(c, 0), s1, 8081));
            assert!(connects(&client(c, 0), s1, 8080));
            assert!(!connects(&client(c, 1), s2, 8081));
        },
    );

    // mTLS: a certificate from another CA, or none, is refused; ours is accepted.
    let ca = dir.join("certs/ca.pem");
    assert!(admin_call(c.grpc, Some(tls(&dir.join("certs"), "n1", &ca))).is_ok());
    let rogue = admin_call(c.grpc, Some(tls(&dir.join("rogue"), "n1", &ca)));
    assert!(
        rogue.is_err(),
        "a certificate from another CA must be refused"
    );
    let anonymous = admin_call(
        c.grpc,
        Some(
            tonic::transport::ClientTlsConfig::new()
                .domain_name("bulkhead-controller")
                .ca_certificate(tonic::transport::Certificate::from_pem(
                    std::fs::read_to_string(&ca).expect("ca"),
                )),
        ),
    );
    assert!(
        anonymous.is_err(),
        "a client without a certificate must be refused"
    );

    // A node's certificate follows that node only, and cannot quarantine.
    let certs_dir = dir.join("certs");
    assert_eq!(
        sync_as(c.grpc, tls(&certs_dir, "n1", &ca), "n1"),
        Ok(()),
        "n1's certificate follows n1"
    );
    let other = sync_as(c.grpc, tls(&certs_dir, "n1", &ca), "n2");
    assert!(
        other
            .as_ref()
            .is_err_and(|e| e.contains("PermissionDenied") && e.contains("may not act for node")),
        "n1's certificate must not fetch n2's rule set: {other:?}"
    );
    let quarantine = quarantine_as(c.grpc, tls(&certs_dir, "n1", &ca));
    assert!(
        quarantine
            .as_ref()
            .is_err_and(|e| e.contains("PermissionDenied")),
        "a node's certificate must not quarantine: {quarantine:?}"
    );

    // Policy realization is reported per policy.
    let policies = http_get(c.http, "/api/policies").expect("policies");
    assert!(policies.contains(r#""name":"servers""#), "{policies}");
    assert!(
        policies.contains(r#""nodes":2"#) && policies.contains(r#""realized":2"#),
        "{policies}"
    );
    // And the CLI says the same.
    let certs = dir.join("certs");
    let out = Command::new(bin())
        .args([
            "policy",
            "status",
            "--controller",
            &format!("127.0.0.1:{}", c.grpc),
        ])
        .arg("--tls-cert")
        .arg(certs.join("n1.pem"))
        .arg("--tls-key")
        .arg(certs.join("n1-key.pem"))
        .arg("--ca")
        .arg(certs.join("ca.pem"))
        .output()
        .expect("policy status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "policy status: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("dist/servers") && text.contains("2/2"),
        "{text}"
    );

    // Flows and the service graph through the admin API (mTLS): the connection n1's client is
    // refused reaches the controller, named and attributed, and is a denied edge of the graph.
    let admin_cli = |args: &[&str]| -> (bool, String) {
        let out = Command::new(bin())
            .args(args)
            .args(["--controller", &format!("127.0.0.1:{}", c.grpc)])
            .arg("--tls-cert")
            .arg(certs.join("n1.pem"))
            .arg("--tls-key")
            .arg(certs.join("n1-key.pem"))
            .arg("--ca")
            .arg(certs.join("ca.pem"))
            .output()
            .expect("bulkhead");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let mut flows = String::new();
    wait_until(
        "a denied flow reaches the controller and `bulkhead flows --controller` shows it",
        Duration::from_secs(30),
        || {
            let _ = connects(&client(&c, 0), s1, 8081);
            let (ok, text) = admin_cli(&[
                "flows",
                "--verdict",
                "denied",
                "--pod",
                "dist/server1",
                "-o",
                "json",
            ]);
            flows = text;
            ok && flows
                .lines()
                .any(|l| l.contains(r#""peer":"dist/client1""#))
        },
    );
    for line in flows.lines() {
        let f: serde_json::Value = serde_json::from_str(line).expect("a JSON record per line");
        assert_eq!(f["verdict"], "denied", "{line}");
        assert_eq!(f["node"], "n1", "{line}");
        assert!(
            f["rule"]
                .as_str()
                .is_some_and(|r| r.contains("dist/servers")),
            "{line}"
        );
    }
    let (ok, graph) = admin_cli(&["graph", "-o", "json"]);
    assert!(ok, "{graph}");
    let graph: serde_json::Value = serde_json::from_str(&graph).expect("graph JSON");
    assert!(
        graph["edges"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["src"] == "dist/Pod/client1"
                && e["dst"] == "dist/Pod/server1"
                && e["port"] == 8081
                && e["denied"].as_u64().unwrap_or(0) >= 1),
        "{graph}"
    );
    let (ok, table) = admin_cli(&["graph"]);
    assert!(ok && table.contains("dist/Pod/client1"), "{table}");

    // `--follow` streams (Admin.WatchFlows): a new refusal is printed as it arrives (`--since
    // 0s`: nothing from before the command started).
    let mut follow = Command::new(bin())
        .args([
            "flows",
            "--follow",
            "--verdict",
            "denied",
            "-o",
            "json",
            "--since",
            "1s",
        ])
        .args(["--controller", &format!("127.0.0.1:{}", c.grpc)])
        .arg("--tls-cert")
        .arg(certs.join("n1.pem"))
        .arg("--tls-key")
        .arg(certs.join("n1-key.pem"))
        .arg("--ca")
        .arg(certs.join("ca.pem"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("bulkhead flows --follow");
    let stdout = follow.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut streamed = None;
    while streamed.is_none() && Instant::now() < deadline {
        let _ = connects(&client(&c, 0), s1, 8081);
        while let Ok(line) = rx.recv_timeout(Duration::from_millis(700)) {
            if line.contains(r#""peer":"dist/client1""#) {
                streamed = Some(line);
                break;
            }
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let line = streamed.expect("`bulkhead flows --follow --controller` printed the refusal");
    assert!(line.contains(r#""verdict":"denied""#), "{line}");

    // Certificate rotation in place (what cert-manager does to a mounted Secret): every file
    // the controller and the agents were started with is replaced by a set from a new CA.
    // Without a restart, the controller serves the new certificate and trusts the new CA on
    // new connections (and no longer the old one); the agents read their files anew when they
    // reconnect, so after a controller restart they come back with the rotated set.
    let original = dir.join("original");
    std::fs::create_dir_all(&original).expect("dir");
    for f in ["ca.pem", "n1.pem", "n1-key.pem"] {
        std::fs::copy(certs.join(f), original.join(f)).expect("keep the original set");
    }
    let status = Command::new(bin())
        .args(["certs", "generate", "--nodes", "n1,n2", "--dir"])
        .arg(dir.join("rotated"))
        .status()
        .expect("certs");
    assert!(status.success());
    for entry in std::fs::read_dir(dir.join("rotated")).expect("rotated") {
        let entry = entry.expect("entry");
        let text = std::fs::read_to_string(entry.path()).expect("pem");
        write_atomic(&certs.join(entry.file_name()), &text);
    }
    let new_ca = certs.join("ca.pem");
    wait_until(
        "the running controller serves the rotated certificate to a rotated client",
        Duration::from_secs(10),
        || admin_call(c.grpc, Some(tls(&certs, "n1", &new_ca))).is_ok(),
    );
    let old = admin_call(c.grpc, Some(tls(&original, "n1", &original.join("ca.pem"))));
    assert!(
        old.is_err(),
        "after rotation a client of the old CA is refused (and refuses the new certificate)"
    );
    restart_controller(
        &mut c,
        "agents reconnect with their rotated certificates and realize",
        |_| {},
    );
}
