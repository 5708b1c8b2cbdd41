//! Tier 3: real TCP connections between network namespaces, with the programs attached on the
//! node side of each pod's veth (as the agent does for a pod).
//!
//! Routed: `node` namespace: `pod0` (10.201.0.1/24), a TCP echo server; `pod` namespace:
//! `eth0` (10.201.0.2/24), the client.
//! Bridged (as the `bridge` CNI plugin and flannel wire pods): three pods whose veths are ports
//! of the node's `br0` (10.202.0.1/24, fd02::1/64), one of them IPv6 only; the rule set names no
//! interface.
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
    sync::{ApplyReport, Enforcer, RouteResolver},
};
use bulkhead_common::VERDICT_DENY;
use bulkhead_ruleset::{DirectionPolicy, EndpointPolicy, RuleSet, identity};
use common::*;

const SERVER: &str = "10.201.0.1:8080";

/// The routed pair: `pod0` (10.201.0.1/24) in `node`, `eth0` (10.201.0.2/24) in `pod`.
fn wire_routed(node: &Netns, pod: &Netns) {
    veth_pair("pod0", Some(node), "eth0", Some(pod)).expect("veth pair");
    node.exec(&["ip", "addr", "add", "10.201.0.1/24", "dev", "pod0"])
        .expect("addr");
    node.exec(&["ip", "link", "set", "pod0", "up"]).expect("up");
    pod.exec(&["ip", "addr", "add", "10.201.0.2/24", "dev", "eth0"])
        .expect("addr");
    pod.exec(&["ip", "link", "set", "eth0", "up"]).expect("up");
}

/// A TCP server in `ns` at `addr` that echoes the first 4 bytes of every connection, for as
/// long as the test runs.
fn echo_server(ns: &Netns, addr: &'static str) {
    let listener = ns
        .run(move || TcpListener::bind(addr))
        .expect("enter namespace")
        .expect("bind server");
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 4];
            if conn.read_exact(&mut buf).is_ok() {
                let _ = conn.write_all(&buf);
            }
        }
    });
}

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
    wire_routed(&node, &pod);

    // The echo server lives in the node namespace and answers every connection.
    echo_server(&node, SERVER);

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

    // The pod's sandbox is recreated: its veth is deleted and created again under the same
    // name, with a new index. The next rule set is enforced on the new veth, and dropping the
    // old index does not take the new veth's links or addresses with it.
    node.exec(&["ip", "link", "del", "pod0"])
        .expect("delete the veth");
    wire_routed(&node, &pod);
    let new_index = index_in(&node, "pod0");
    assert_ne!(new_index, ifindex);
    let recreated = |version: u64, egress_closed: bool| {
        let ep = endpoint(
            7,
            "client",
            400,
            IpAddr::V4(Ipv4Addr::new(10, 201, 0, 2)),
            "pod0",
        );
        let mut rs = ruleset(
            version,
            vec![ep],
            vec![("10.201.0.2/32", 400), ("10.201.0.1/32", identity::HOST)],
        );
        if egress_closed {
            rs.policies.insert(
                400,
                EndpointPolicy {
                    ingress: DirectionPolicy::default(),
                    egress: DirectionPolicy {
                        isolated_by: Some(9),
                        ..DirectionPolicy::default()
                    },
                },
            );
        }
        rs
    };
    let (e, report) = apply_in(&node, enforcer, recreated(2, true));
    assert_eq!(
        (report.endpoints_written, report.endpoints_removed),
        (1, 1),
        "{report:?}"
    );
    let denied = pod.run(|| echo_once(SERVER)).expect("enter pod");
    assert!(denied.is_err(), "egress closed on the new veth: {denied:?}");
    let (mut enforcer, _) = apply_in(&node, e, recreated(3, false));
    assert_eq!(enforcer.dataplane().attached_interfaces(), ["pod0"]);
    let allowed = pod.run(|| echo_eventually(SERVER, 5)).expect("enter pod");
    assert_eq!(allowed.expect("egress open again on the new veth"), "ping");

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

/// Applies `rs` from inside `node`, where the resolver's route, neighbour and bridge lookups
/// must run.
fn apply_in(node: &Netns, mut e: Enforcer, rs: RuleSet) -> (Enforcer, ApplyReport) {
    node.run(move || {
        let report = e.apply(&rs, &RouteResolver).expect("apply");
        (e, report)
    })
    .expect("enter node")
}

fn index_in(node: &Netns, ifname: &'static str) -> u32 {
    node.run(move || nix::net::if_::if_nametoindex(ifname))
        .expect("enter node")
        .expect("interface index")
}

#[test]
fn pods_on_a_bridge_are_found_behind_their_ports_and_stay_enforced() {
    if !check_privileged_test("pods_on_a_bridge_are_found_behind_their_ports_and_stay_enforced") {
        return;
    }
    const SERVER_B: &str = "10.202.0.3:8080";
    let tag = std::process::id() % 100000;
    let pins = PinDir::new("bridge");
    let node = Netns::create(&format!("bh-t3b-{tag}-node")).expect("node namespace");
    let client = Netns::create(&format!("bh-t3b-{tag}-a")).expect("client namespace");
    let server = Netns::create(&format!("bh-t3b-{tag}-b")).expect("server namespace");
    // A pod with an IPv6 address only: found through neighbour discovery instead of ARP.
    let six = Netns::create(&format!("bh-t3b-{tag}-c")).expect("IPv6 pod namespace");
    // Duplicate address detection would keep the link-local addresses tentative for a second
    // or two, and neighbour discovery unanswered meanwhile (the agent would find the pod on a
    // retry); addresses here are unique by construction.
    for ns in [&node, &six] {
        for scope in ["all", "default"] {
            let key = format!("net.ipv6.conf.{scope}.accept_dad=0");
            ns.exec(&["sysctl", "-qw", &key]).expect("no DAD");
        }
    }
    node.exec(&["ip", "link", "add", "br0", "type", "bridge"])
        .expect("bridge");
    node.exec(&["ip", "addr", "add", "10.202.0.1/24", "dev", "br0"])
        .expect("addr");
    node.exec(&["ip", "link", "set", "br0", "up"]).expect("up");
    for (port, pod, addr) in [
        ("bpa", &client, "10.202.0.2/24"),
        ("bpb", &server, "10.202.0.3/24"),
    ] {
        veth_pair(port, Some(&node), "eth0", Some(pod)).expect("veth pair");
        node.exec(&["ip", "link", "set", port, "master", "br0", "up"])
            .expect("port");
        pod.exec(&["ip", "addr", "add", addr, "dev", "eth0"])
            .expect("addr");
        pod.exec(&["ip", "link", "set", "eth0", "up"]).expect("up");
    }
    node.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd02::1/64",
        "dev",
        "br0",
        "nodad",
    ])
    .expect("node IPv6 address");
    veth_pair("bpc", Some(&node), "eth0", Some(&six)).expect("veth pair");
    node.exec(&["ip", "link", "set", "bpc", "master", "br0", "up"])
        .expect("port");
    six.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd02::3/64",
        "dev",
        "eth0",
        "nodad",
    ])
    .expect("addr");
    six.exec(&["ip", "link", "set", "eth0", "up"]).expect("up");
    echo_server(&server, SERVER_B);
    // The node has not talked to either pod: it does not know their MAC addresses.
    let known = node
        .exec(&["ip", "neigh", "show", "dev", "br0"])
        .expect("neighbours");
    assert!(!known.contains("10.202.0."), "{known}");

    let mut a = endpoint(1, "client", 400, "10.202.0.2".parse().unwrap(), "unused");
    let mut b = endpoint(2, "server", 401, "10.202.0.3".parse().unwrap(), "unused");
    let mut c = endpoint(3, "six", 402, "fd02::3".parse().unwrap(), "unused");
    a.interface = None;
    b.interface = None;
    c.interface = None;
    let ipcache = || {
        vec![
            ("10.202.0.2/32", 400),
            ("10.202.0.3/32", 401),
            ("fd02::3/128", 402),
            ("10.202.0.1/32", identity::HOST),
            ("fd02::1/128", identity::HOST),
        ]
    };
    let pods = || vec![a.clone(), b.clone(), c.clone()];
    let open = ruleset(1, pods(), ipcache());
    // The server admits nobody.
    let mut closed = ruleset(2, pods(), ipcache());
    closed.policies.insert(
        b.policy,
        EndpointPolicy {
            ingress: DirectionPolicy {
                isolated_by: Some(9),
                ..DirectionPolicy::default()
            },
            egress: DirectionPolicy::default(),
        },
    );

    let pin_path = pins.path().to_path_buf();
    let e = node
        .run(move || Enforcer::new(Dataplane::load(&pin_path).expect("load")).expect("enforcer"))
        .expect("enter node");
    // 1. The pods are found behind their bridge ports, not on the bridge.
    let (mut e, report) = apply_in(&node, e, open.clone());
    assert!(report.missing_interfaces.is_empty(), "{report:?}");
    assert_eq!(report.endpoints_written, 3, "{report:?}");
    let (ia, ib, ic) = (
        index_in(&node, "bpa"),
        index_in(&node, "bpb"),
        index_in(&node, "bpc"),
    );
    let mut attached = e.dataplane().attached_interfaces();
    attached.sort();
    assert_eq!(attached, ["bpa", "bpb", "bpc"]);
    assert_eq!(e.dataplane().endpoint(ia).unwrap().unwrap().endpoint_id, 1);
    assert_eq!(e.dataplane().endpoint(ib).unwrap().unwrap().endpoint_id, 2);
    assert_eq!(e.dataplane().endpoint(ic).unwrap().unwrap().endpoint_id, 3);
    node.exec(&["ping", "-6", "-c", "1", "-W", "2", "fd02::3"])
        .expect("ICMPv6 to the IPv6 pod through its enforced port");
    let ok = client
        .run(|| echo_eventually(SERVER_B, 5))
        .expect("enter client");
    assert_eq!(
        ok.expect("connect through the bridge, both allowed"),
        "ping"
    );

    // 2. The node forgets the client (neighbour entry and the bridge's forwarding entry) and
    //    the client no longer answers ARP: nobody can say where it is, and it stays enforced
    //    on its port.
    client
        .exec(&["ip", "link", "set", "eth0", "arp", "off"])
        .expect("arp off");
    let mac = client
        .exec(&["cat", "/sys/class/net/eth0/address"])
        .expect("client mac");
    node.exec(&["ip", "neigh", "flush", "dev", "br0"])
        .expect("flush neighbours");
    node.exec(&["bridge", "fdb", "del", mac.trim(), "dev", "bpa", "master"])
        .expect("forget the client's MAC address");
    let (mut e, report) = apply_in(&node, e, closed.clone());
    assert_eq!(report.endpoints_removed, 0, "{report:?}");
    assert!(report.missing_interfaces.is_empty(), "{report:?}");
    assert_eq!(e.dataplane().endpoint(ia).unwrap().unwrap().endpoint_id, 1);

    // The new policy holds on the server's port: the client (answering ARP again) is refused.
    client
        .exec(&["ip", "link", "set", "eth0", "arp", "on"])
        .expect("arp on");
    let refused = client.run(|| echo_once(SERVER_B)).expect("enter client");
    assert!(refused.is_err(), "the server admits nobody: {refused:?}");
    let mut reopened = open.clone();
    reopened.version = 3;
    let (e, _) = apply_in(&node, e, reopened);
    let ok = client
        .run(|| echo_eventually(SERVER_B, 5))
        .expect("enter client");
    assert_eq!(ok.expect("connect once the server admits again"), "ping");

    // 3. The server's sandbox is recreated: a new veth under the same name, a new MAC address,
    //    while the node still holds the old one. The server is found behind its new port.
    let old_mac = server
        .exec(&["cat", "/sys/class/net/eth0/address"])
        .expect("server mac");
    node.exec(&["ip", "link", "del", "bpb"])
        .expect("delete the server's port");
    veth_pair("bpb", Some(&node), "eth0", Some(&server)).expect("veth pair again");
    node.exec(&["ip", "link", "set", "bpb", "master", "br0", "up"])
        .expect("port");
    server
        .exec(&["ip", "addr", "add", "10.202.0.3/24", "dev", "eth0"])
        .expect("addr");
    server
        .exec(&["ip", "link", "set", "eth0", "up"])
        .expect("up");
    node.exec(&[
        "ip",
        "neigh",
        "replace",
        "10.202.0.3",
        "lladdr",
        old_mac.trim(),
        "dev",
        "br0",
        "nud",
        "reachable",
    ])
    .expect("the node still holds the old MAC address");
    let mut recreated = closed;
    recreated.version = 4;
    let (mut e, report) = apply_in(&node, e, recreated);
    assert!(report.missing_interfaces.is_empty(), "{report:?}");
    assert_eq!(report.endpoints_removed, 1, "the old index: {report:?}");
    let ib2 = index_in(&node, "bpb");
    assert_ne!(ib2, ib);
    assert_eq!(e.dataplane().endpoint(ib2).unwrap().unwrap().endpoint_id, 2);
    let refused = client.run(|| echo_once(SERVER_B)).expect("enter client");
    assert!(refused.is_err(), "enforced on the new port: {refused:?}");

    // 4. The client's veth goes away with its pod: it is no longer enforced (nor kept).
    node.exec(&["ip", "link", "del", "bpa"])
        .expect("delete port");
    let mut gone = open;
    gone.version = 5;
    let (mut e, report) = apply_in(&node, e, gone);
    assert_eq!(report.endpoints_removed, 1, "{report:?}");
    assert!(
        report
            .missing_interfaces
            .iter()
            .any(|m| m.contains("client")),
        "{report:?}"
    );
    assert!(e.dataplane().endpoint(ia).unwrap().is_none());
    drop(e);
    drop(pins);
}

#[test]
fn an_interface_that_cannot_be_attached_is_retried_and_the_others_are_enforced() {
    if !check_privileged_test(
        "an_interface_that_cannot_be_attached_is_retried_and_the_others_are_enforced",
    ) {
        return;
    }
    let tag = std::process::id() % 100000;
    let pins = PinDir::new("attach");
    let node = Netns::create(&format!("bh-t3c-{tag}-node")).expect("node namespace");
    for i in ["ca1", "ca2"] {
        node.exec(&[
            "ip",
            "link",
            "add",
            i,
            "type",
            "veth",
            "peer",
            "name",
            &format!("{i}p"),
        ])
        .expect("veth");
        node.exec(&["ip", "link", "set", i, "up"]).expect("up");
    }
    let a = endpoint(1, "a", 400, "10.203.0.2".parse().unwrap(), "ca1");
    let b = endpoint(2, "b", 401, "10.203.0.3".parse().unwrap(), "ca2");
    let rs = |version| ruleset(version, vec![a.clone(), b.clone()], vec![]);
    // Something in the way of b's link pin: its attachment cannot be completed.
    let blocker = pins.path().join("links").join("ca2__to-pod");
    std::fs::create_dir_all(blocker.join("x")).expect("blocker");

    let pin_path = pins.path().to_path_buf();
    let e = node
        .run(move || Enforcer::new(Dataplane::load(&pin_path).expect("load")).expect("enforcer"))
        .expect("enter node");
    let (mut e, report) = apply_in(&node, e, rs(1));
    assert_eq!(report.endpoints_written, 1, "{report:?}");
    assert_eq!(report.missing_interfaces, ["test/b (ca2)"], "{report:?}");
    // b's other hook, attached before the failure, was released again.
    assert!(!pins.path().join("links").join("ca2__from-pod").exists());
    assert!(pins.path().join("links").join("ca1__from-pod").exists());
    let (ia, ib) = (index_in(&node, "ca1"), index_in(&node, "ca2"));
    assert!(e.dataplane().endpoint(ia).unwrap().is_some());
    assert!(e.dataplane().endpoint(ib).unwrap().is_none());

    // Out of the way: the retry attaches it.
    std::fs::remove_dir_all(&blocker).expect("remove blocker");
    let (mut e, report) = apply_in(&node, e, rs(2));
    assert!(report.missing_interfaces.is_empty(), "{report:?}");
    assert_eq!(report.endpoints_written, 1, "{report:?}");
    assert_eq!(e.dataplane().attached_interfaces(), ["ca1", "ca2"]);
    assert_eq!(e.dataplane().endpoint(ib).unwrap().unwrap().endpoint_id, 2);

    // Removing the pins takes whatever else is in the directory along.
    std::fs::create_dir_all(pins.path().join("links").join("stray").join("x")).expect("stray");
    let dir = pins.path().to_path_buf();
    drop(e);
    drop(pins);
    assert!(!dir.exists(), "{} is left", dir.display());
}
