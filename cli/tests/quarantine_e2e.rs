//! Tier 3: quarantine in the lab. A pod with an open TCP connection in each direction and
//! ongoing UDP traffic is quarantined through the controller's API: both connections stop
//! (checked from both ends), UDP stops, new connections in and out fail, the allowed forensic
//! peer still connects both ways; the quarantine survives killing the node's agent and the
//! controller; release restores the previous reachability exactly.

mod common;

use common::*;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use bulkhead_agent::privileged::check_privileged_test;

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: app}
---
apiVersion: v1
kind: Namespace
metadata: {name: security, labels: {team: security}}
---
apiVersion: v1
kind: Pod
metadata: {name: victim, namespace: app, labels: {app: web}}
spec:
  nodeName: node-1
  containers: [{name: c, image: x, ports: [{containerPort: 80}, {containerPort: 9000, protocol: UDP}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: peer, namespace: app, labels: {app: api}}
spec:
  nodeName: node-1
  containers: [{name: c, image: x, ports: [{containerPort: 80}, {containerPort: 9000, protocol: UDP}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: remote, namespace: app, labels: {app: db}}
spec:
  nodeName: node-2
  containers: [{name: c, image: x, ports: [{containerPort: 80}, {containerPort: 9000, protocol: UDP}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: forensics, namespace: security, labels: {app: forensics}}
spec:
  nodeName: node-2
  containers: [{name: c, image: x, ports: [{containerPort: 80}]}]
"#;

fn connect(from: &Pod, to: &Pod) -> Option<TcpStream> {
    let addr = SocketAddr::new(to.ip, 80);
    in_pod(from, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(700)).ok()?;
        s.set_read_timeout(Some(Duration::from_millis(700))).ok()?;
        let mut banner = [0u8; 64];
        let n = s.read(&mut banner).ok()?;
        (n > 0).then_some(s)
    })
}

/// Sends on a held connection and waits for the echo.
fn echoes(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4];
    s.write_all(b"ping").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"ping"
}

fn udp_reply(from: &Pod, to: &Pod) -> bool {
    let addr = SocketAddr::new(to.ip, 9000);
    in_pod(from, move || {
        let Ok(s) = UdpSocket::bind("0.0.0.0:0") else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 64];
        (0..3).any(|_| s.send_to(b"u", addr).is_ok() && s.recv(&mut buf).is_ok())
    })
}

fn probe(state: &str) -> String {
    run_ok(&[
        "lab", "--state", state, "probe", "--port", "80", "-o", "json",
    ])
}

fn lab_pid(state: &Path, what: &str) -> u32 {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("lab.json")).expect("lab.json"))
            .expect("json");
    match what {
        "controller" => v["controller_pid"].as_u64().expect("controller pid") as u32,
        node => v["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|n| n["name"] == node)
            .and_then(|n| n["agent_pid"].as_u64())
            .expect("agent pid") as u32,
    }
}

fn kill(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn quarantine_cuts_isolates_survives_restarts_and_releases_exactly() {
    if !check_privileged_test("quarantine_cuts_isolates_survives_restarts_and_releases_exactly") {
        return;
    }
    let lab = TestLab::up("quarantine-e2e", MANIFESTS, 19660);
    let (s, state) = (lab.arg(), lab.state.clone());
    let p = pods(&state);
    let (victim, peer, remote, forensics) = (
        &p["app/victim"],
        &p["app/peer"],
        &p["app/remote"],
        &p["security/forensics"],
    );
    let before = probe(&s);

    // Traffic in flight: a connection out of the victim, one into it, and UDP to it.
    let mut outbound = connect(victim, remote).expect("victim → remote before quarantine");
    let mut inbound = connect(peer, victim).expect("peer → victim before quarantine");
    assert!(echoes(&mut outbound) && echoes(&mut inbound));
    assert!(udp_reply(peer, victim));

    let started = Instant::now();
    let out = run_ok(&[
        "quarantine",
        "app/victim",
        "--reason",
        "port scan from victim",
        "--allow",
        "ns=security",
        "--lab",
        &s,
    ]);
    println!(
        "{}quarantine call returned in {:.1} ms",
        out,
        started.elapsed().as_secs_f64() * 1e3
    );

    assert!(
        !echoes(&mut outbound),
        "the victim's outbound connection must be cut"
    );
    assert!(
        !echoes(&mut inbound),
        "the connection into the victim must be cut (checked from the peer's end)"
    );
    assert!(!udp_reply(peer, victim), "UDP to the victim must stop");
    assert!(!udp_reply(victim, remote), "UDP from the victim must stop");
    assert!(
        connect(victim, peer).is_none(),
        "no new connection out (same node)"
    );
    assert!(
        connect(victim, remote).is_none(),
        "no new connection out (other node)"
    );
    assert!(connect(remote, victim).is_none(), "no new connection in");
    assert!(
        connect(forensics, victim).is_some(),
        "the forensic peer still connects in"
    );
    assert!(
        connect(victim, forensics).is_some(),
        "and the victim can reach it"
    );
    assert!(connect(peer, remote).is_some(), "others are unaffected");
    let list = run_ok(&["quarantine", "list", "--lab", &s]);
    assert!(
        list.contains("app/victim") && list.contains("port scan from victim"),
        "{list}"
    );
    // Its status: when each node had it in the kernel, and the connections it cut (at least
    // the two held TCP connections and the UDP flow).
    assert!(
        list.contains("enforced on ") && list.contains("node-1 at") && list.contains("node-2 at"),
        "{list}"
    );
    let cut: u64 = list
        .split("; ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(cut >= 2, "connections cut: {list}");
    let audit =
        std::fs::read_to_string(state.join("manifests/quarantines/audit.log")).expect("audit log");
    assert!(
        audit.contains(r#""action":"quarantine""#) && audit.contains("port scan"),
        "{audit}"
    );

    // Kill the victim's agent and the controller: the quarantine holds. Heal: it still holds.
    kill(lab_pid(&state, "node-1"));
    kill(lab_pid(&state, "controller"));
    assert!(
        connect(peer, victim).is_none(),
        "still isolated with no agent and no controller"
    );
    assert!(connect(forensics, victim).is_some());
    run_ok(&["lab", "--state", &s, "heal"]);
    assert!(
        connect(peer, victim).is_none(),
        "still isolated after restarts (from the persisted object)"
    );
    assert!(connect(forensics, victim).is_some());
    let list = run_ok(&["quarantine", "list", "--lab", &s]);
    assert!(
        list.contains("app/victim"),
        "the restarted controller knows the quarantine: {list}"
    );

    // Release: exactly the previous reachability.
    run_ok(&["quarantine", "release", "app/victim", "--lab", &s]);
    assert!(connect(peer, victim).is_some(), "released");
    assert_eq!(
        probe(&s),
        before,
        "release restores the previous policy exactly"
    );
    let audit =
        std::fs::read_to_string(state.join("manifests/quarantines/audit.log")).expect("audit log");
    assert!(audit.contains(r#""action":"release""#), "{audit}");
    // A quarantine with a time limit lifts itself.
    run_ok(&[
        "quarantine",
        "app/victim",
        "--reason",
        "timed",
        "--for",
        "2s",
        "--lab",
        &s,
    ]);
    assert!(connect(peer, victim).is_none(), "quarantined for 2 s");
    let deadline = Instant::now() + Duration::from_secs(8);
    while connect(peer, victim).is_none() {
        assert!(Instant::now() < deadline, "the quarantine did not expire");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(lab);
}
