//! Finds the host-side interface of an endpoint.
//!
//! A routed CNI (Calico, Cilium's veth mode, the lab) gives each pod a host route over its
//! veth: the route to the pod's address names the interface. A bridge CNI (the `bridge`
//! plugin, flannel, kubenet) routes the whole pod subnet over the bridge: the route names the
//! bridge, and the pod's port is the one the bridge forwards the pod's MAC address to. The
//! resolver then asks the kernel to resolve the pod's address on the bridge (ARP or neighbour
//! discovery, as sending it a packet would), and looks the MAC address up in the bridge's
//! forwarding table. Nothing is sent when the neighbour entry is already known.
//!
//! The lookups run `ip` and `bridge` (iproute2) in the calling thread's network namespace.

use std::{net::IpAddr, process::Command, time::Duration};

use bulkhead_ruleset::Endpoint;
use serde_json::Value;

/// Finds the host-side interface of an endpoint.
pub trait InterfaceResolver {
    fn interface(&self, endpoint: &Endpoint) -> Option<String>;
}

/// Uses the interface named in the rule set, else the route to the endpoint's first address;
/// when that route is over a bridge, the bridge port behind which the address lives.
pub struct RouteResolver;

impl InterfaceResolver for RouteResolver {
    fn interface(&self, endpoint: &Endpoint) -> Option<String> {
        if let Some(i) = &endpoint.interface {
            return Some(i.clone());
        }
        let ip = *endpoint.ips.first()?;
        let dev = route_device(ip)?;
        if is_bridge(&dev) {
            bridge_port(&dev, ip)
        } else {
            Some(dev)
        }
    }
}

fn json(program: &str, args: &[&str]) -> Option<Value> {
    let out = Command::new(program).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The device of the route to `ip`; none when the address is local (routed over `lo`).
fn route_device(ip: IpAddr) -> Option<String> {
    let routes = json("ip", &["-j", "route", "get", &ip.to_string()])?;
    let dev = routes.get(0)?.get("dev")?.as_str()?;
    (dev != "lo").then(|| dev.to_string())
}

fn is_bridge(dev: &str) -> bool {
    json("ip", &["-j", "-d", "link", "show", "dev", dev])
        .and_then(|links| {
            links
                .get(0)?
                .get("linkinfo")?
                .get("info_kind")?
                .as_str()
                .map(|kind| kind == "bridge")
        })
        .unwrap_or(false)
}

/// What the bridge's neighbour table holds for `ip`.
struct Neighbour {
    /// None while unresolved (or after resolution failed).
    mac: Option<String>,
    /// Configured by hand (`permanent`, `noarp`): never removed here.
    fixed: bool,
}

fn neighbour(bridge: &str, ip: IpAddr) -> Option<Neighbour> {
    let neighbours = json(
        "ip",
        &["-j", "neigh", "show", "to", &ip.to_string(), "dev", bridge],
    )?;
    let n = neighbours.as_array()?.first()?;
    let states: Vec<&str> = n
        .get("state")
        .and_then(Value::as_array)
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let unresolved = states.iter().any(|s| *s == "FAILED" || *s == "INCOMPLETE");
    Some(Neighbour {
        mac: n
            .get("lladdr")
            .and_then(Value::as_str)
            .filter(|_| !unresolved)
            .map(str::to_lowercase),
        fixed: states.iter().any(|s| *s == "PERMANENT" || *s == "NOARP"),
    })
}

/// The port of `bridge` behind which `ip` lives: the port the bridge learned the address's
/// MAC address on. When the node does not know the address yet (the pod has not talked to it),
/// or knows a MAC address the bridge has no port for (the bridge's entries age out; a pod
/// created again answers from a new MAC address), the kernel is asked to resolve the address
/// afresh: the pod's answer comes in through its port, and the bridge learns it. None when the
/// pod does not answer within 200 ms (the agent retries).
fn bridge_port(bridge: &str, ip: IpAddr) -> Option<String> {
    let port = || {
        let mac = neighbour(bridge, ip)?.mac?;
        fdb_port(bridge, &mac)
    };
    if let Some(found) = port() {
        return Some(found);
    }
    let addr = ip.to_string();
    // A learned entry may name a MAC address nobody answers from any more: forget it, so the
    // request below is a broadcast rather than a probe of the old address.
    if neighbour(bridge, ip).is_some_and(|n| n.mac.is_some() && !n.fixed) {
        let _ = Command::new("ip")
            .args(["neigh", "del", &addr, "dev", bridge])
            .output();
    }
    // `use` (NTF_USE) makes the kernel resolve the entry as a packet to the address would.
    let _ = Command::new("ip")
        .args(["neigh", "replace", &addr, "dev", bridge, "use"])
        .output();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(10));
        if let Some(found) = port() {
            return Some(found);
        }
    }
    None
}

/// The port `bridge` forwards `mac` to.
fn fdb_port(bridge: &str, mac: &str) -> Option<String> {
    let fdb = json("bridge", &["-j", "fdb", "show", "br", bridge])?;
    fdb.as_array()?.iter().find_map(|entry| {
        let learned_on_port = entry.get("master").and_then(Value::as_str) == Some(bridge)
            && entry.get("mac").and_then(Value::as_str) == Some(mac);
        if !learned_on_port {
            return None;
        }
        entry.get("ifname")?.as_str().map(str::to_string)
    })
}
