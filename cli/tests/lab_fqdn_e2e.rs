//! Tier 3: egress by domain name with real DNS in the lab (issue 19). A ClusterNetworkPolicy
//! `domainNames` Accept lets pods of a namespace whose NetworkPolicy denies all egress but DNS
//! reach the external hosts they resolved by an allowed name, on the first SYN, with nothing
//! between the pod and its resolver but the kernel reading the answer on its way in.
//!
//! Checked here, with the lab's cluster DNS (dnsmasq) answering the ordinary libc resolver or a
//! DNS client in the pod: an allowed name connects; an unlisted name that resolves to another
//! address does not; `*.example.org` admits one or more labels, never `example.org`; a CNAME
//! chain admits what the pod asked for, not the names it passed through; 1,000 resolutions,
//! each with nothing learned before it, connect with no SYN retransmitted; a TTL that runs out
//! stops new connections but not an established one (also across a policy change), while
//! removing the name from the policy revokes it; a forged answer from a pod that is not the
//! cluster DNS teaches nothing; the agent killed and restarted in the middle of a
//! resolve-and-connect loop costs no connection.

mod common;

use common::*;

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use bulkhead_agent::privileged::check_privileged_test;
use hickory_proto::{
    op::{Message, MessageType, Query},
    rr::{Name, RData, Record, RecordType, rdata::A},
};

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: tenant}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {nodeName: node-2, containers: [{name: c, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: fresh, namespace: shop, labels: {app: fresh}}
spec: {nodeName: node-1, containers: [{name: c, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: forger, namespace: tenant, labels: {app: forger}}
spec: {nodeName: node-1, containers: [{name: c, ports: [{containerPort: 80}]}]}
---
apiVersion: lab.bulkhead.dev/v1alpha1
kind: ExternalHost
metadata: {name: example-api}
spec:
  addresses: [198.51.100.10]
  names: [api.example.com]
  aliases:
  - {name: www.example.com, target: api.example.com}
  - {name: cdn.example.net, target: www.example.com}
  ports: [{port: 443, protocol: TCP}]
  ttl: 300
---
apiVersion: lab.bulkhead.dev/v1alpha1
kind: ExternalHost
metadata: {name: org}
spec:
  addresses: [198.51.100.11]
  names: [a.example.org, x.y.example.org]
  ports: [{port: 443, protocol: TCP}]
  ttl: 300
---
apiVersion: lab.bulkhead.dev/v1alpha1
kind: ExternalHost
metadata: {name: other}
spec:
  addresses: [198.51.100.12]
  names: [other.example.com]
  ports: [{port: 443, protocol: TCP}]
  ttl: 300
---
apiVersion: lab.bulkhead.dev/v1alpha1
kind: ExternalHost
metadata: {name: short}
spec:
  addresses: [198.51.100.13]
  names: [short.example.com]
  ports: [{port: 443, protocol: TCP}]
  ttl: 5
---
apiVersion: lab.bulkhead.dev/v1alpha1
kind: ExternalHost
metadata: {name: apex}
spec:
  addresses: [198.51.100.14]
  names: [example.org]
  ports: [{port: 443, protocol: TCP}]
  ttl: 300
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: dns-only, namespace: shop}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}
      podSelector: {matchLabels: {k8s-app: kube-dns}}
    ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]
"#;

/// The Admin tier's Accept by name for `shop`, with `extra` names added to the list.
fn names_policy(names: &[&str]) -> String {
    let names = names
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {{name: shop-external-apis}}
spec:
  tier: Admin
  priority: 10
  subject:
    namespaces: {{matchLabels: {{kubernetes.io/metadata.name: shop}}}}
  egress:
  - name: external-apis
    action: Accept
    to:
    - domainNames: [{names}]
    protocols: [{{tcp: {{destinationPort: {{number: 443}}}}}}]
"#
    )
}

const ALLOWED: [&str; 4] = [
    "api.example.com",
    "cdn.example.net",
    "*.example.org",
    "short.example.com",
];

const CLUSTER_DNS: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 240, 1, 10));
const API: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const ORG: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 12);
const SHORT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 13);
const APEX: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 14);

fn apply(lab: &TestLab, file: &str, yaml: &str) {
    let path = lab.dir.join(file);
    std::fs::write(&path, yaml).expect("write");
    run_ok(&[
        "lab",
        "--state",
        &lab.arg(),
        "apply",
        "-f",
        &path.to_string_lossy(),
    ]);
}

/// One A query for `name` (absolute) to the cluster DNS from inside the caller's network
/// namespace; the answer's addresses.
fn resolve_here(name: &str) -> Result<Vec<Ipv4Addr>, String> {
    let mut msg = Message::query();
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(
        Name::from_ascii(name).map_err(|e| e.to_string())?,
        RecordType::A,
    ));
    let wire = msg.to_vec().map_err(|e| e.to_string())?;
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    s.send_to(&wire, SocketAddr::new(CLUSTER_DNS, 53))
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = vec![0u8; 4096];
    let n = s.recv(&mut buf).map_err(|e| format!("no answer: {e}"))?;
    let answer = Message::from_vec(&buf[..n]).map_err(|e| e.to_string())?;
    Ok(answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect())
}

/// A TCP connection to `addr`:443 from the caller's namespace, within `timeout`, and the
/// server's banner read.
fn connect_here(addr: Ipv4Addr, timeout: Duration) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::new(IpAddr::V4(addr), 443), timeout)
        .map_err(|e| format!("connect {addr}:443: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let mut banner = [0u8; 64];
    match s.read(&mut banner) {
        Ok(n) if n > 0 => Ok(s),
        other => Err(format!("no banner from {addr}: {other:?}")),
    }
}

/// Resolves `name` in the pod and connects to the first address it got.
fn resolve_and_connect(pod: &Pod, name: &str) -> Result<Ipv4Addr, String> {
    let name = format!("{name}.");
    in_pod(pod, move || {
        let addrs = resolve_here(&name)?;
        let addr = *addrs.first().ok_or(format!("{name}: no address"))?;
        connect_here(addr, Duration::from_millis(900)).map(|_| addr)
    })
}

fn connects_to(pod: &Pod, addr: Ipv4Addr) -> bool {
    in_pod(pod, move || {
        connect_here(addr, Duration::from_millis(900)).is_ok()
    })
}

/// `TcpExt: TCPSynRetrans` and `Tcp: RetransSegs` of the caller's network namespace.
fn retransmissions_here() -> (u64, u64) {
    fn field(path: &str, prefix: &str, name: &str) -> u64 {
        let text = std::fs::read_to_string(path).expect("read netstat");
        let mut lines = text.lines().filter(|l| l.starts_with(prefix));
        let (head, values) = (lines.next().expect("header"), lines.next().expect("values"));
        let i = head
            .split_whitespace()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("{name} in {path}"));
        values
            .split_whitespace()
            .nth(i)
            .expect("value")
            .parse()
            .expect("number")
    }
    (
        field("/proc/thread-self/net/netstat", "TcpExt:", "TCPSynRetrans"),
        field("/proc/thread-self/net/snmp", "Tcp:", "RetransSegs"),
    )
}

fn lab_json(lab: &TestLab) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(lab.state.join("lab.json")).expect("lab.json"))
        .expect("json")
}

fn agent_pid(lab: &TestLab, node: &str) -> u32 {
    lab_json(lab)["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["name"] == node)
        .and_then(|n| n["agent_pid"].as_u64())
        .expect("the node's agent runs") as u32
}

/// The agent's `--pin-dir`, from its command line.
fn pin_dir(pid: u32) -> std::path::PathBuf {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).to_string())
        .collect();
    let i = args
        .iter()
        .position(|a| a == "--pin-dir")
        .expect("the lab passes --pin-dir");
    args[i + 1].clone().into()
}

fn kill_and_wait(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'))
    }) {
        assert!(Instant::now() < deadline, "{pid} survived SIGKILL");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn python_in_pod(lab: &TestLab, pod: &str, code: &str) -> Output {
    Command::new(bin())
        .args([
            "lab",
            "--state",
            &lab.arg(),
            "exec",
            pod,
            "--",
            "python3",
            "-c",
            code,
        ])
        .env("RES_OPTIONS", "timeout:1 attempts:1")
        .output()
        .expect("run lab exec")
}

#[test]
fn pods_reach_external_hosts_by_the_names_a_policy_allows() {
    if !check_privileged_test("pods_reach_external_hosts_by_the_names_a_policy_allows") {
        return;
    }
    let lab = TestLab::up("lab-fqdn-e2e", MANIFESTS, 19880);
    let pods = pods(&lab.state);
    let client = pods["shop/client"].clone();
    let fresh = pods["shop/fresh"].clone();
    let forger = pods["tenant/forger"].clone();

    // Before any name is allowed: DNS works, the hosts do not.
    assert_eq!(
        in_pod(&client, || resolve_here("api.example.com.")),
        Ok(vec![API])
    );
    assert!(!connects_to(&client, API), "denied before any name policy");
    apply(&lab, "names.yaml", &names_policy(&ALLOWED));

    // The issue's one-liner with the libc resolver (search list, ndots) in the pod.
    let out = python_in_pod(
        &lab,
        "shop/client",
        "import socket; s = socket.create_connection(('api.example.com', 443), timeout=3); print(s.recv(64).decode().strip())",
    );
    assert!(
        out.status.success(),
        "connect to api.example.com:443 by name: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "external/example-api"
    );

    // An unlisted name resolves (the DNS is allowed) but its address is not admitted.
    assert_eq!(
        resolve_and_connect(&client, "other.example.com").map_err(|e| e.contains("connect")),
        Err(true),
        "other.example.com is not in the policy"
    );
    // Wildcard depth: one label and two under example.org; never example.org itself.
    assert_eq!(resolve_and_connect(&client, "a.example.org"), Ok(ORG));
    assert_eq!(resolve_and_connect(&fresh, "x.y.example.org"), Ok(ORG));
    assert!(
        resolve_and_connect(&client, "example.org").is_err(),
        "*.example.org does not match example.org"
    );
    assert!(!connects_to(&client, APEX));

    // CNAME chains: what the pod asked for decides. `fresh` has learned nothing for API yet:
    // www.example.com (on the chain, but not allowed) does not admit it, cdn.example.net does.
    assert!(
        resolve_and_connect(&fresh, "www.example.com").is_err(),
        "www.example.com is not in the policy, though api.example.com is its target"
    );
    assert_eq!(resolve_and_connect(&fresh, "cdn.example.net"), Ok(API));

    // A forged answer from a pod that is not a trusted resolver: "api.example.com is
    // 198.51.100.12", sent from port 53 to a socket of the client. It arrives (nothing stops
    // it), and teaches nothing: other's address stays denied.
    let client_ip = client.ip;
    let listener = in_pod(&client, || UdpSocket::bind("0.0.0.0:5353").expect("bind"));
    listener
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    in_pod(&forger, move || {
        let mut answer = Message::query();
        answer.metadata.message_type = MessageType::Response;
        answer.metadata.recursion_desired = true;
        answer.metadata.recursion_available = true;
        let name = Name::from_ascii("api.example.com.").expect("name");
        answer.add_query(Query::query(name.clone(), RecordType::A));
        answer.add_answer(Record::from_rdata(name, 300, RData::A(A(OTHER))));
        let s = UdpSocket::bind("0.0.0.0:53").expect("bind port 53 in the forger");
        s.send_to(
            &answer.to_vec().expect("encode"),
            SocketAddr::new(client_ip, 5353),
        )
        .expect("send the forged answer");
    });
    let mut buf = [0u8; 512];
    let (n, from) = listener
        .recv_from(&mut buf)
        .expect("the forged answer arrives");
    assert!(n > 12 && from.port() == 53, "{from}");
    assert!(
        !connects_to(&client, OTHER),
        "an answer from an untrusted source taught the kernel nothing"
    );

    // 1,000 resolutions, each with nothing learned before it, connect on their first SYN.
    let pin = pin_dir(agent_pid(&lab, "node-2"));
    let mut dp = bulkhead_agent::loader::Dataplane::load(&pin).expect("open node-2's maps");
    let before = in_pod(&client, retransmissions_here);
    let started = Instant::now();
    for i in 0..1000 {
        dp.expire_learned(u64::MAX)
            .expect("forget what was learned");
        let got = resolve_and_connect(&client, "api.example.com");
        assert_eq!(got, Ok(API), "resolution and connection {i}");
    }
    let after = in_pod(&client, retransmissions_here);
    assert_eq!(
        after, before,
        "no SYN (or any segment) retransmitted in 1,000 resolve-and-connect rounds"
    );
    eprintln!(
        "1,000 resolve-and-connect rounds, each learning anew: {:.2} s",
        started.elapsed().as_secs_f64()
    );
    drop(dp);

    // TTL: short.example.com is learned for 5 s. A connection made in time stays up after
    // the TTL ran out, also when a policy change makes the kernel re-check it; a new one is
    // refused until the name is resolved again.
    assert_eq!(resolve_and_connect(&client, "short.example.com"), Ok(SHORT));
    let mut held = in_pod(&client, || {
        connect_here(SHORT, Duration::from_millis(900)).expect("connect while learned")
    });
    std::thread::sleep(Duration::from_millis(6500));
    assert!(
        !connects_to(&client, SHORT),
        "a new connection after the TTL ran out"
    );
    let mut extra = ALLOWED.to_vec();
    extra.push("unrelated.example.com");
    apply(&lab, "names.yaml", &names_policy(&extra));
    let echo = |s: &mut TcpStream, what: &[u8]| -> Result<(), String> {
        s.write_all(what).map_err(|e| e.to_string())?;
        let mut back = vec![0u8; what.len()];
        s.read_exact(&mut back).map_err(|e| e.to_string())?;
        (back == what).then_some(()).ok_or("wrong echo".into())
    };
    assert_eq!(
        echo(&mut held, b"still here"),
        Ok(()),
        "the established connection outlives the TTL and a policy change"
    );
    assert_eq!(resolve_and_connect(&client, "short.example.com"), Ok(SHORT));
    // Removing the name from the policy revokes the connection it admitted.
    let without: Vec<&str> = ALLOWED
        .iter()
        .copied()
        .filter(|n| *n != "short.example.com")
        .collect();
    apply(&lab, "names.yaml", &names_policy(&without));
    assert!(
        echo(&mut held, b"gone?").is_err(),
        "the connection was revoked with its name"
    );
    drop(held);

    // Flows and the graph name the world peer by what the pod resolved.
    let state = lab.arg();
    let deadline = Instant::now() + Duration::from_secs(30);
    let graph = loop {
        let graph: serde_json::Value =
            serde_json::from_str(&run_ok(&["graph", "--lab", &state, "-o", "json"]))
                .expect("graph json");
        let named_edge = graph["edges"].as_array().is_some_and(|edges| {
            edges
                .iter()
                .any(|e| e["src"] == "shop/Pod/client" && e["dst"] == "world: api.example.com")
        });
        if named_edge {
            break graph;
        }
        assert!(
            Instant::now() < deadline,
            "no edge client -> world: api.example.com in {graph}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let nodes = graph["nodes"].as_array().expect("nodes");
    assert!(
        nodes
            .iter()
            .any(|n| n["id"] == "world: api.example.com" && n["domain"] == "api.example.com"),
        "{nodes:?}"
    );
    let flows = run_ok(&[
        "flows",
        "--lab",
        &state,
        "--peer-name",
        "api.example.com",
        "-o",
        "json",
    ]);
    assert!(
        flows.lines().any(|l| l.contains("198.51.100.10")
            && l.contains("api.example.com")
            && l.contains("shop/client")),
        "flows to api.example.com name it: {flows}"
    );

    // The agent killed and restarted while the pod resolves and connects in a loop: no
    // round fails (the kernel keeps learning and enforcing from the pinned maps).
    let mut looping = Command::new(bin())
        .args([
            "lab",
            "--state",
            &lab.arg(),
            "exec",
            "shop/client",
            "--",
            "python3",
            "-c",
            "import socket, time\n\
             ok = bad = 0\n\
             end = time.time() + 8\n\
             while time.time() < end:\n\
             \x20   try:\n\
             \x20       s = socket.create_connection(('api.example.com', 443), timeout=0.9)\n\
             \x20       s.recv(64); s.close(); ok += 1\n\
             \x20   except OSError as e:\n\
             \x20       bad += 1; print('failed:', e, flush=True)\n\
             print('ok', ok, 'failed', bad)\n",
        ])
        .env("RES_OPTIONS", "timeout:1 attempts:1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the loop");
    std::thread::sleep(Duration::from_secs(2));
    kill_and_wait(agent_pid(&lab, "node-2"));
    std::thread::sleep(Duration::from_millis(500));
    let healed = run_ok(&["lab", "--state", &lab.arg(), "heal"]);
    assert!(healed.contains("agent node-2"), "{healed}");
    let mut out = String::new();
    looping
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read");
    let status = looping.wait().expect("wait");
    assert!(status.success(), "{out}");
    let last = out.lines().last().unwrap_or_default().to_string();
    let rounds: Vec<u64> = last
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(
        rounds.len() == 2 && rounds[0] > 10 && rounds[1] == 0,
        "every round of the loop connected across the agent's restart: {out}"
    );
}
