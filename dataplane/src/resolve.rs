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
//! The lookups ask the kernel over rtnetlink ([`crate::rtnl`]) in the calling thread's network
//! namespace; no `ip` or `bridge` process runs.

use std::{net::IpAddr, time::Duration};

use bulkhead_ruleset::Endpoint;

use crate::rtnl::Rtnl;

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
        let mut rtnl = Rtnl::new()
            .inspect_err(|e| tracing::warn!(error = %e, "cannot open an rtnetlink socket"))
            .ok()?;
        let dev = rtnl.route_link(ip).ok()??;
        let port = if rtnl.is_bridge(dev).unwrap_or(false) {
            bridge_port(&mut rtnl, dev, ip)?
        } else {
            dev
        };
        nix::net::if_::if_indextoname(port).ok()?.into_string().ok()
    }
}

/// The port of `bridge` behind which `ip` lives: the port the bridge learned the address's
/// MAC address on. When the node does not know the address yet (the pod has not talked to it),
/// or knows a MAC address the bridge has no port for (the bridge's entries age out; a pod
/// created again answers from a new MAC address), the kernel is asked to resolve the address
/// afresh: the pod's answer comes in through its port, and the bridge learns it. None when the
/// pod does not answer within 200 ms (the agent retries).
fn bridge_port(rtnl: &mut Rtnl, bridge: u32, ip: IpAddr) -> Option<u32> {
    let port = |rtnl: &mut Rtnl| {
        let mac = rtnl.neighbour(bridge, ip).ok()??.mac?;
        rtnl.fdb_port(bridge, mac).ok()?
    };
    if let Some(found) = port(rtnl) {
        return Some(found);
    }
    // A learned entry may name a MAC address nobody answers from any more: forget it, so the
    // request below is a broadcast rather than a probe of the old address.
    if rtnl
        .neighbour(bridge, ip)
        .ok()
        .flatten()
        .is_some_and(|n| n.mac.is_some() && !n.fixed)
    {
        let _ = rtnl.neighbour_del(bridge, ip);
    }
    // NTF_USE makes the kernel resolve the entry as a packet to the address would.
    let _ = rtnl.neighbour_use(bridge, ip);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(10));
        if let Some(found) = port(rtnl) {
            return Some(found);
        }
    }
    None
}
