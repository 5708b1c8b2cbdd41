//! Tier 3: the real `bulkhead agent` process enforcing a rule set file on pod veths in network
//! namespaces: TCP, UDP and ICMP allowed and denied as the rule set says, replies of allowed
//! connections pass, an established connection is cut by a new deny, killing and restarting the
//! agent keeps enforcing, a pod's veth created again under the same name is enforced without a
//! new rule set, and metrics and flow records are served over HTTP.
//!
//! Topology (all in namespaces this test creates): `node` forwards between two pods wired like a
//! CNI would, `client` 10.204.0.10 and `server` 10.204.0.20.

mod common;

use common::*;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
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
use bulkhead_controller::ruleset::{
    Action, Direction, DirectionPolicy, Endpoint, EndpointPolicy, IpCacheEntry, PolicyEntry,
    PortRange, Protocol, RuleKind, RuleRef, RuleSet, Stage, Tier,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 204, 0, 10);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 204, 0, 20);
const METRICS: &str = "127.0.0.1:19962";
const METRICS_PORT: u16 = 19962;
/// The agent's `/flows` and `/connections`.
const FLOWS: &str = "127.0.0.1:19964";
const FLOWS_PORT: u16 = 19964;

struct Lab {
    node: Netns,
    client: Netns,
    server: Netns,
    pins: PathBuf,
    dir: PathBuf,
    agent: Option<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        let _ = remove_pins(&self.pins);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn allow(peer: u32, protocol: Protocol, ports: PortRange, rule: u32) -> PolicyEntry {
    PolicyEntry {
        peer,
        protocol: Some(protocol),
        ports,
        tier: Tier::Application,
        priority: 0,
        action: Action::Allow,
        stage: Stage::Enforced,
        rule,
    }
}

fn rule(name: &str, direction: Direction, index: Option<u32>) -> RuleRef {
    RuleRef {
        kind: RuleKind::NetworkPolicy,
        namespace: "test".into(),
        name: name.into(),
        direction,
        index,
    }
}

/// Version 1 admits TCP 8080, UDP 5353 and ICMP from the client; version 2 drops TCP 8080.
fn ruleset(version: u64, tcp: bool) -> RuleSet {
    let mut entries = vec![
        allow(500, Protocol::Udp, PortRange::single(5353), 11),
        allow(500, Protocol::Icmp, PortRange::ALL, 12),
    ];
    if tcp {
        entries.push(allow(500, Protocol::Tcp, PortRange::single(8080), 10));
    }
    let endpoint = |id: u32, pod: &str, identity: u32, ip: Ipv4Addr, iface: &str| Endpoint {
        id,
        namespace: "test".into(),
        pod: pod.into(),
        workload: None,
        identity,
        ips: vec![IpAddr::V4(ip)],
        interface: Some(iface.into()),
        quarantined: false,
        policy: identity,
    };
    let server = endpoint(2, "server", 501, SERVER, "bh-server");
    let mut policies = BTreeMap::new();
    policies.insert(500, EndpointPolicy::default());
    policies.insert(
        501,
        EndpointPolicy {
            ingress: DirectionPolicy {
                isolated_by: Some(9),
                staged_isolated_by: Some(9),
                entries,
            },
            egress: DirectionPolicy::default(),
        },
    );
    let mut rules = BTreeMap::new();
    rules.insert(9, rule("server-ingress", Direction::Ingress, None));
    rules.insert(10, rule("server-ingress", Direction::Ingress, Some(0)));
    rules.insert(11, rule("server-ingress", Direction::Ingress, Some(1)));
    rules.insert(12, rule("server-ingress", Direction::Ingress, Some(2)));
    RuleSet {
        node: "n1".into(),
        version,
        endpoints: vec![endpoint(1, "client", 500, CLIENT, "bh-client"), server],
        policies,
        ipcache: vec![
            IpCacheEntry {
                cidr: format!("{CLIENT}/32").parse().expect("cidr"),
                identity: 500,
                quarantined: false,
                quarantine_allow: Vec::new(),
            },
            IpCacheEntry {
                cidr: format!("{SERVER}/32").parse().expect("cidr"),
                identity: 501,
                quarantined: false,
                quarantine_allow: Vec::new(),
            },
        ],
        rules,
        names: Vec::new(),
        dns_resolvers: Vec::new(),
    }
}

fn write_ruleset(path: &Path, rs: &RuleSet) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(rs).expect("json")).expect("write rule set");
    std::fs::rename(&tmp, path).expect("replace rule set");
}

fn start_agent(lab: &Lab) -> Child {
    Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args([
            "agent",
            "run",
            "--node",
            "n1",
            "--netns",
            lab.node.name(),
            "--ruleset",
        ])
        .arg(lab.dir.join("ruleset.json"))
        .arg("--pin-dir")
        .arg(&lab.pins)
        .args(["--metrics-addr", METRICS])
        .args(["--http", FLOWS])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start bulkhead agent")
}

fn wait_realized(version: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let want = format!("bulkhead_agent_realized_version {version}");
    while Instant::now() < deadline {
        if http_get(METRICS_PORT, "/metrics").is_some_and(|m| m.contains(&want)) {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
    panic!("agent did not realize version {version} within 20 s");
}

fn tcp_echo(client: &Netns, port: u16) -> bool {
    client
        .run(move || {
            let addr = SocketAddr::from((SERVER, port));
            let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(600)) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            let mut buf = [0u8; 2];
            s.write_all(b"hi").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"hi"
        })
        .unwrap_or(false)
}

fn udp_echo(client: &Netns, port: u16) -> bool {
    client
        .run(move || {
            let Ok(s) = UdpSocket::bind("0.0.0.0:0") else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_millis(700)));
            let mut buf = [0u8; 8];
            s.send_to(b"udp", (SERVER, port)).is_ok()
                && s.recv(&mut buf).is_ok_and(|n| &buf[..n] == b"udp")
        })
        .unwrap_or(false)
}

fn ping(client: &Netns) -> bool {
    client
        .exec(&["ping", "-c", "1", "-W", "1", &SERVER.to_string()])
        .is_ok()
}

fn start_servers(server: &Netns) {
    for port in [8080u16, 8081] {
        let listener = server
            .run(move || TcpListener::bind(("0.0.0.0", port)))
            .expect("enter server")
            .expect("bind tcp");
        thread::spawn(move || {
            for mut c in listener.incoming().flatten() {
                thread::spawn(move || {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }
    for port in [5353u16, 5354] {
        let sock = server
            .run(move || UdpSocket::bind(("0.0.0.0", port)))
            .expect("enter server")
            .expect("bind udp");
        thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], from);
            }
        });
    }
}

#[test]
fn agent_process_enforces_restarts_and_reports() {
    if !check_privileged_test("agent_process_enforces_restarts_and_reports") {
        return;
    }
    let tag = std::process::id() % 100000;
    let dir = std::env::temp_dir().join(format!("bh-agent-e2e-{tag}"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut lab = Lab {
        node: Netns::create(&format!("bh-ae-{tag}-node")).expect("node ns"),
        client: Netns::create(&format!("bh-ae-{tag}-client")).expect("client ns"),
        server: Netns::create(&format!("bh-ae-{tag}-server")).expect("server ns"),
        pins: PathBuf::from(format!("/sys/fs/bpf/bulkhead-test/agent-e2e-{tag}")),
        dir,
        agent: None,
    };
    enable_forwarding(&lab.node).expect("forwarding");
    wire_pod(&lab.node, &lab.client, "bh-client", CLIENT).expect("wire client");
    wire_pod(&lab.node, &lab.server, "bh-server", SERVER).expect("wire server");
    start_servers(&lab.server);
    assert!(
        tcp_echo(&lab.client, 8081),
        "no connectivity before enforcement"
    );

    write_ruleset(&lab.dir.join("ruleset.json"), &ruleset(1, true));
    lab.agent = Some(start_agent(&lab));
    wait_realized(1);

    // Allowed and denied, per protocol; replies of allowed connections come back.
    assert!(tcp_echo(&lab.client, 8080), "TCP 8080 is admitted");
    assert!(!tcp_echo(&lab.client, 8081), "TCP 8081 is not");
    assert!(udp_echo(&lab.client, 5353), "UDP 5353 is admitted");
    assert!(!udp_echo(&lab.client, 5354), "UDP 5354 is not");
    assert!(ping(&lab.client), "ICMP is admitted");

    // An established connection, cut when the policy stops admitting it.
    let mut held = lab
        .client
        .run(|| {
            TcpStream::connect_timeout(&SocketAddr::from((SERVER, 8080)), Duration::from_secs(1))
        })
        .expect("enter client")
        .expect("connect");
    held.set_read_timeout(Some(Duration::from_millis(800)))
        .expect("timeout");
    let mut buf = [0u8; 2];
    held.write_all(b"ab").expect("write");
    held.read_exact(&mut buf).expect("echo before the deny");
    // The agent reports the tracked connection with its counters, from conntrack.
    let conns: serde_json::Value =
        serde_json::from_str(&http_get(FLOWS_PORT, "/connections").expect("GET /connections"))
            .expect("connections json");
    assert!(
        conns
            .as_array()
            .expect("array")
            .iter()
            .any(|c| c["dst_port"] == 8080
                && c["endpoint"] == "test/server"
                && c["peer"] == "test/client"
                && c["packets_forward"].as_u64().unwrap_or(0) >= 2
                && c["packets_reply"].as_u64().unwrap_or(0) >= 2),
        "{conns}"
    );
    write_ruleset(&lab.dir.join("ruleset.json"), &ruleset(2, false));
    wait_realized(2);
    let after = held
        .write_all(b"cd")
        .and_then(|()| held.read_exact(&mut buf));
    assert!(
        after.is_err(),
        "the established connection must be cut by the new deny"
    );
    assert!(
        !tcp_echo(&lab.client, 8080),
        "new TCP 8080 connections are denied now"
    );

    // Metrics and flow records name what happened.
    let metrics = http_get(METRICS_PORT, "/metrics").expect("scrape /metrics");
    assert!(
        metrics.contains(
            r#"bulkhead_agent_packets_total{endpoint="test/server",reason="denied_policy"}"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(r#"reason="drop_revoked""#), "{metrics}");
    assert!(
        metrics.contains("bulkhead_agent_flow_records_total"),
        "{metrics}"
    );
    let flows = http_get(FLOWS_PORT, "/flows").expect("GET /flows");
    assert!(
        flows.contains("NetworkPolicy test/server-ingress ingress default-deny"),
        "{flows}"
    );
    assert!(flows.contains(r#""peer":"test/client""#), "{flows}");

    // Kill the agent: enforcement stays, in both directions of the verdict.
    let mut agent = lab.agent.take().expect("agent");
    agent.kill().expect("kill agent");
    agent.wait().expect("reap agent");
    assert!(
        !tcp_echo(&lab.client, 8080),
        "still denied with no agent running"
    );
    assert!(
        udp_echo(&lab.client, 5353),
        "still admitted with no agent running"
    );

    // A restarted agent picks up the pinned state and the current file.
    write_ruleset(&lab.dir.join("ruleset.json"), &ruleset(3, true));
    lab.agent = Some(start_agent(&lab));
    wait_realized(3);
    assert!(
        tcp_echo(&lab.client, 8080),
        "admitted again after the restart"
    );
    assert!(!tcp_echo(&lab.client, 8081), "and 8081 still denied");

    // The server's sandbox is recreated: its veth is deleted and created again under the same
    // name. No rule set changes; the agent notices the new interface and enforces on it.
    lab.node
        .exec(&["ip", "link", "del", "bh-server"])
        .expect("delete the server's veth");
    wire_pod(&lab.node, &lab.server, "bh-server", SERVER).expect("wire the server again");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if tcp_echo(&lab.client, 8080) && !tcp_echo(&lab.client, 8081) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the recreated veth is not enforced (8081 must be denied, 8080 admitted)"
        );
        thread::sleep(Duration::from_millis(200));
    }
    assert!(
        udp_echo(&lab.client, 5353),
        "UDP 5353 admitted on the new veth"
    );
    assert!(
        !udp_echo(&lab.client, 5354),
        "UDP 5354 denied on the new veth"
    );
}
