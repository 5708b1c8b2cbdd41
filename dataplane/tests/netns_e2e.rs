//! Tier 3: real TCP connections between two network namespaces joined by a veth pair, with the
//! programs attached on the node side of the pod's veth (as the agent does for a pod).
//!
//! `node` namespace: `pod0` (10.201.0.1/24), a TCP echo server.
//! `pod` namespace: `eth0` (10.201.0.2/24), the client.
//! Namespaces, links and pins are removed when the test ends, also when it fails.

mod common;

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use bulkhead_agent::{
    loader::Dataplane,
    netns::{Netns, veth_pair},
    privileged::check_privileged_test,
    sync::{Enforcer, RouteResolver},
};
use bulkhead_common::VERDICT_DENY;
use bulkhead_controller::ruleset::identity;
use common::*;

const SERVER: &str = "10.201.0.1:8080";

/// [`echo_once`] until it works or `tries` attempts failed: for the steps where the connection
/// must work, so that a machine slow to resolve the first ARP does not fail the test; the steps
/// where it must fail make one attempt.
fn echo_eventually(addr: &str, tries: usize) -> std::io::Result<String> {
    let mut last = echo_once(addr);
    for _ in 1..tries {
        if last.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        last = echo_once(addr);
    }
    last
}

fn echo_once(addr: &str) -> std::io::Result<String> {
    let addr: SocketAddr = addr.parse().expect("address");
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(800))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).to_string())
}

#[test]
fn tcp_connection_allowed_then_dropped_after_one_map_write() {
    if !check_privileged_test("tcp_connection_allowed_then_dropped_after_one_map_write") {
        return;
    }
    let tag = std::process::id() % 100000;
    let pins = PinDir::new("e2e");
    let node = Netns::create(&format!("bh-t3-{tag}-node")).expect("node namespace");
    let pod = Netns::create(&format!("bh-t3-{tag}-pod")).expect("pod namespace");
    veth_pair("pod0", Some(&node), "eth0", Some(&pod)).expect("veth pair");
    node.exec(&["ip", "addr", "add", "10.201.0.1/24", "dev", "pod0"])
        .expect("addr");
    node.exec(&["ip", "link", "set", "pod0", "up"]).expect("up");
    pod.exec(&["ip", "addr", "add", "10.201.0.2/24", "dev", "eth0"])
        .expect("addr");
    pod.exec(&["ip", "link", "set", "eth0", "up"]).expect("up");

    // The echo server lives in the node namespace and answers every connection.
    let listener = node
        .run(|| TcpListener::bind(SERVER))
        .expect("enter node")
        .expect("bind server");
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 4];
            if conn.read_exact(&mut buf).is_ok() {
                let _ = conn.write_all(&buf);
            }
        }
    });

    // Before enforcement: the connection works.
    let before = pod.run(|| echo_eventually(SERVER, 5)).expect("enter pod");
    assert_eq!(before.expect("connect without enforcement"), "ping");

    // Attach with a rule set that allows the pod's egress (no policy selects it).
    let pin_path = pins.path().to_path_buf();
    let (enforcer_tx, enforcer_rx) = std::sync::mpsc::channel();
    node.run(move || {
        let dp = Dataplane::load(&pin_path).expect("load eBPF object");
        let mut enforcer = Enforcer::new(dp).expect("enforcer");
        let ep = endpoint(
            7,
            "client",
            400,
            IpAddr::V4(Ipv4Addr::new(10, 201, 0, 2)),
            "pod0",
        );
        let rs = ruleset(
            1,
            vec![ep],
            vec![("10.201.0.2/32", 400), ("10.201.0.1/32", identity::HOST)],
        );
        let report = enforcer.apply(&rs, &RouteResolver).expect("apply");
        assert_eq!(report.endpoints_written, 1, "{report:?}");
        enforcer_tx.send(enforcer).expect("hand over");
    })
    .expect("enter node");
    let mut enforcer = enforcer_rx.recv().expect("enforcer");

    let allowed = pod.run(|| echo_eventually(SERVER, 5)).expect("enter pod");
    assert_eq!(allowed.expect("connect with an allowing policy"), "ping");

    // One map write: the endpoint's default egress verdict becomes deny.
    let ifindex = node
        .run(|| nix::net::if_::if_nametoindex("pod0"))
        .expect("enter node")
        .expect("pod0 index");
    {
        let dp = enforcer.dataplane();
        let mut info = dp
            .endpoint(ifindex)
            .expect("read the endpoint")
            .expect("endpoint entry");
        info.default_egress.verdict = VERDICT_DENY;
        dp.set_endpoint(ifindex, info).expect("write the endpoint");
    }
    let denied = pod.run(|| echo_once(SERVER)).expect("enter pod");
    assert!(
        denied.is_err(),
        "connection must fail after the deny, got {denied:?}"
    );

    // Counters saw both: allowed new connections and policy drops for this endpoint.
    let counters = enforcer.dataplane().counters().expect("COUNTERS");
    let sum = |why: u32| -> u64 {
        counters
            .get(&(7 * bulkhead_common::reason::COUNT + why), 0)
            .map(|per_cpu| per_cpu.iter().map(|c| c.packets).sum())
            .unwrap_or(0)
    };
    assert!(sum(bulkhead_common::reason::ALLOWED_NEW) >= 1);
    assert!(sum(bulkhead_common::reason::DENIED_POLICY) >= 1);

    // Taking the rule set back down detaches the programs: traffic flows again.
    drop(enforcer);
    drop(pins);
    // The kernel releases an unpinned link asynchronously: allow it a moment.
    let mut after = Err(std::io::Error::other("not tried"));
    for _ in 0..5 {
        after = pod.run(|| echo_once(SERVER)).expect("enter pod");
        if after.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(after.expect("connect after the pins are gone"), "ping");
}
