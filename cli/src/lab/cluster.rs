//! A lab as one named cluster among several on the same machine (`lab up --cluster NAME
//! --pod-cidr …`), and the link between two such labs (`lab peer`).
//!
//! Every lab addresses its pods inside its own pod CIDRs: an IPv4 /16 (`A.B.0.0/16`, pods at
//! `A.B.<node>.<host>`, the cluster DNS at `A.B.1.10`) and an IPv6 /96 (pods at
//! `<prefix>::<node>:<host>`). Two labs with disjoint pod CIDRs can be peered: a veth between
//! their fabric namespaces on a transit /30 of 10.238.0.0/16, each fabric namespace routing for
//! its nodes at [`ROUTER_V4`] on its bridge, with a route per local pod through the pod's node
//! and one route to each peer's pod CIDRs over the link; every node routes the peers' pod CIDRs
//! through its fabric router. Node fabric addresses are the same in both labs (10.239.0.<i>) and
//! never leave their own bridge: only pod addresses cross, untranslated, so each cluster's agents
//! see the other cluster's pods by their own addresses.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use bulkhead_agent::netns::{Netns, ip};
use bulkhead_ruleset::ClusterName;
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde::{Deserialize, Serialize};

use super::state::{LabPod, LabState, netns_prefix, tag};

/// The fabric namespace's address on its bridge once the lab is peered: its nodes' next hop to
/// the peers' pods (nodes are 10.239.0.1-100, external hosts 10.239.0.254).
pub const ROUTER_V4: Ipv4Addr = Ipv4Addr::new(10, 239, 0, 253);
pub const ROUTER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x239, 0, 0, 0, 0, 0, 0xfd);
/// Transit links between fabric namespaces take a /30 each from 10.238.0.0/16.
const TRANSIT_V4: [u8; 2] = [10, 238];
/// The two ends of a transit link over IPv6: link-local, so every link can use the same two.
const TRANSIT_V6_DIALER: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
const TRANSIT_V6_ACCEPTER: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2);

/// What `lab up --cluster NAME --pod-cidr …` chose: the default is a lab that is no named
/// cluster, with the default pod CIDRs.
#[derive(Debug, Clone, Default)]
pub struct ClusterChoice {
    pub name: Option<ClusterName>,
    pub pod_cidrs: PodCidrs,
}

/// Where a lab's pods get their addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodCidrs {
    /// A /16: pods at `A.B.<node>.<host>`.
    pub v4: Ipv4Network,
    /// A /96: pods at `<prefix>::<node>:<host>` (in a lab with `--ipv6`).
    pub v6: Ipv6Network,
}

impl Default for PodCidrs {
    /// 10.240.0.0/16 and fd00:240::/96, the addresses of a lab without `--pod-cidr`: those of
    /// its cluster DNS, which every lab had before pod CIDRs could be chosen.
    fn default() -> PodCidrs {
        let [a, b, _, _] = super::dns::ADDRESS_V4.octets();
        let v6 = u128::from(super::dns::ADDRESS_V6) & !u128::from(u32::MAX);
        PodCidrs {
            v4: Ipv4Network::new(Ipv4Addr::new(a, b, 0, 0), 16).expect("a /16"),
            v6: Ipv6Network::new(Ipv6Addr::from(v6), 96).expect("a /96"),
        }
    }
}

impl PodCidrs {
    /// From `lab up --pod-cidr` (none, one or two values, at most one per family).
    pub fn from_args(given: &[IpNetwork], ipv6: bool) -> anyhow::Result<PodCidrs> {
        let mut out = PodCidrs::default();
        let (mut v4, mut v6) = (None, None);
        for net in given {
            match net {
                IpNetwork::V4(n) => {
                    if v4.replace(*n).is_some() {
                        bail!("--pod-cidr: give one IPv4 CIDR (a /16)");
                    }
                    if n.prefix() != 16 || n.network() != n.ip() {
                        bail!(
                            "--pod-cidr {n}: the IPv4 pod CIDR must be a /16 such as 10.241.0.0/16 (pods are A.B.<node>.<host>)"
                        );
                    }
                    out.v4 = *n;
                }
                IpNetwork::V6(n) => {
                    if v6.replace(*n).is_some() {
                        bail!("--pod-cidr: give one IPv6 CIDR (a /96)");
                    }
                    if n.prefix() != 96 || n.network() != n.ip() {
                        bail!(
                            "--pod-cidr {n}: the IPv6 pod CIDR must be a /96 such as fd00:241::/96 (pods are <prefix>::<node>:<host>)"
                        );
                    }
                    if !ipv6 {
                        bail!("--pod-cidr {n}: an IPv6 pod CIDR needs --ipv6");
                    }
                    out.v6 = *n;
                }
            }
        }
        if ipv6 && v4.is_some() && v6.is_none() {
            bail!(
                "--pod-cidr: with --ipv6 and an IPv4 pod CIDR of its own, give the IPv6 one too (a /96 such as fd00:241::/96)"
            );
        }
        Ok(out)
    }

    pub fn pod_v4(&self, node: u32, host: u32) -> Ipv4Addr {
        let [a, b, _, _] = self.v4.network().octets();
        Ipv4Addr::new(a, b, node as u8, host as u8)
    }

    pub fn pod_v6(&self, node: u32, host: u32) -> Ipv6Addr {
        let base = u128::from(self.v6.network());
        Ipv6Addr::from(base | (u128::from(node as u16) << 16) | u128::from(host as u16))
    }

    /// The cluster DNS pod: node-1's host 10, below every address the lab gives a pod.
    pub fn dns_v4(&self) -> Ipv4Addr {
        self.pod_v4(1, 10)
    }

    pub fn dns_v6(&self) -> Ipv6Addr {
        self.pod_v6(1, 10)
    }

    /// The CIDRs in use: the IPv4 one, and the IPv6 one in a lab with `--ipv6`.
    pub fn in_use(&self, ipv6: bool) -> Vec<IpNetwork> {
        let mut out = vec![IpNetwork::V4(self.v4)];
        if ipv6 {
            out.push(IpNetwork::V6(self.v6));
        }
        out
    }
}

fn overlap(a: &IpNetwork, b: &IpNetwork) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// A lab this one is peered with (`lab peer`), as both sides record it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabPeer {
    pub cluster: ClusterName,
    /// The peer lab's state directory (its pods, for `lab probe`).
    pub dir: PathBuf,
    /// Its controller's peering port (127.0.0.1).
    pub peering_port: u16,
    /// The CA of its certificates, which its controller's peering certificate chains to.
    pub ca: PathBuf,
    /// Its pod CIDRs in use (this lab routes them over the link).
    pub pod_cidrs: Vec<IpNetwork>,
    /// This end of the link: the veth in this lab's fabric namespace.
    pub link_if: String,
    /// This end's and the peer end's transit addresses (a /30).
    pub local_v4: Ipv4Addr,
    pub remote_v4: Ipv4Addr,
    /// Whether IPv6 is routed too (both labs have `--ipv6`).
    pub ipv6: bool,
}

impl LabPeer {
    fn remote_v6(&self, dialer: bool) -> Ipv6Addr {
        if dialer {
            TRANSIT_V6_ACCEPTER
        } else {
            TRANSIT_V6_DIALER
        }
    }
}

fn fabric(state: &LabState) -> Netns {
    Netns::existing(&super::fabric_ns(state))
}

fn link_name(peer_dir: &Path) -> String {
    format!("px-{}", tag(peer_dir))
}

fn family(addr: &IpAddr) -> &'static str {
    if addr.is_ipv6() { "-6" } else { "-4" }
}

fn host_prefix(addr: &IpAddr) -> String {
    format!("{addr}/{}", if addr.is_ipv6() { 128 } else { 32 })
}

/// Makes the fabric namespace a router on its bridge (once; it stays one until `lab down`),
/// with a route per pod through the pod's node.
fn ensure_router(state: &LabState) -> anyhow::Result<()> {
    if !router_exists(state) {
        make_router(state)?;
    }
    for pod in state.pods.values() {
        route_pod_via_node(state, pod)?;
    }
    Ok(())
}

fn make_router(state: &LabState) -> anyhow::Result<()> {
    let ns = fabric(state);
    bulkhead_agent::netns::enable_forwarding(&ns)?;
    for scope in ["all", "default", "br0"] {
        ns.exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{scope}.rp_filter=0"),
        ])?;
    }
    ns.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{ROUTER_V4}/24"),
        "dev",
        "br0",
    ])?;
    if state.ipv6 {
        super::no_dad(&ns)?;
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
        ns.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{ROUTER_V6}/64"),
            "dev",
            "br0",
            "nodad",
        ])?;
    }
    Ok(())
}

/// The fabric router's way to a new pod of a peered lab: through its node.
pub fn route_pod(state: &LabState, pod: &LabPod) -> anyhow::Result<()> {
    if state.peers.is_empty() {
        return Ok(());
    }
    route_pod_via_node(state, pod)
}

fn route_pod_via_node(state: &LabState, pod: &LabPod) -> anyhow::Result<()> {
    let node = state.node(&pod.node).context("pod on an unknown node")?;
    let ns = fabric(state);
    for addr in &pod.ips {
        let via = match addr {
            IpAddr::V4(_) => super::node_fabric_v4(node.index).to_string(),
            IpAddr::V6(_) if state.ipv6 => super::node_fabric_v6(node.index).to_string(),
            IpAddr::V6(_) => continue,
        };
        ns.exec(&[
            "ip",
            family(addr),
            "route",
            "replace",
            &host_prefix(addr),
            "via",
            &via,
        ])?;
    }
    Ok(())
}

pub fn unroute_pod(state: &LabState, pod: &LabPod) {
    if state.peers.is_empty() {
        return;
    }
    for addr in &pod.ips {
        let _ = ip(&[
            "-n",
            &super::fabric_ns(state),
            family(addr),
            "route",
            "del",
            &host_prefix(addr),
        ]);
    }
}

fn router_exists(state: &LabState) -> bool {
    fabric(state)
        .exec(&["ip", "-4", "-o", "addr", "show", "dev", "br0"])
        .is_ok_and(|out| out.contains(&format!("{ROUTER_V4}/")))
}

/// The first transit /30 of 10.238.0.0/16 that neither fabric namespace uses.
fn free_transit(a: &LabState, b: &LabState) -> anyhow::Result<(Ipv4Addr, Ipv4Addr)> {
    let mut used = String::new();
    for s in [a, b] {
        used += &fabric(s).exec(&["ip", "-4", "-o", "addr", "show"])?;
    }
    for n in 0..(256u32 * 64) {
        let (third, fourth) = ((n / 64) as u8, ((n % 64) * 4) as u8);
        let first = Ipv4Addr::new(TRANSIT_V4[0], TRANSIT_V4[1], third, fourth + 1);
        let second = Ipv4Addr::new(TRANSIT_V4[0], TRANSIT_V4[1], third, fourth + 2);
        if !used.contains(&format!(" {first}/")) && !used.contains(&format!(" {second}/")) {
            return Ok((first, second));
        }
    }
    bail!("no transit subnet left in 10.238.0.0/16")
}

/// Routes `peer`'s pod CIDRs: in the fabric namespace over the link, in every node through the
/// fabric router.
fn add_routes(state: &LabState, peer: &LabPeer, dialer: bool) -> anyhow::Result<()> {
    let ns = fabric(state);
    for cidr in &peer.pod_cidrs {
        let cidr_text = cidr.to_string();
        let (fam, via, router) = match cidr {
            IpNetwork::V4(_) => ("-4", peer.remote_v4.to_string(), ROUTER_V4.to_string()),
            IpNetwork::V6(_) if peer.ipv6 => (
                "-6",
                peer.remote_v6(dialer).to_string(),
                ROUTER_V6.to_string(),
            ),
            IpNetwork::V6(_) => continue,
        };
        ns.exec(&[
            "ip",
            fam,
            "route",
            "replace",
            &cidr_text,
            "via",
            &via,
            "dev",
            &peer.link_if,
        ])?;
        for node in &state.nodes {
            ip(&[
                "-n",
                &node.netns,
                fam,
                "route",
                "replace",
                &cidr_text,
                "via",
                &router,
            ])?;
        }
    }
    Ok(())
}

/// Takes away what [`add_routes`] and the link made in this lab (best effort: the peer may be
/// gone already, and its half of the link with it).
fn remove_link(state: &LabState, peer: &LabPeer) {
    for cidr in &peer.pod_cidrs {
        let fam = if cidr.is_ipv6() { "-6" } else { "-4" };
        for node in &state.nodes {
            let _ = ip(&["-n", &node.netns, fam, "route", "del", &cidr.to_string()]);
        }
    }
    // Deleting one end of a veth deletes both, and the routes over it.
    let _ = ip(&["-n", &super::fabric_ns(state), "link", "del", &peer.link_if]);
}

/// `lab peer --with DIR`: links this lab and the one in `other_dir` and routes each one's pod
/// CIDRs to the other; both labs record the other as a peer.
pub fn peer(dir: &Path, other_dir: &Path) -> anyhow::Result<()> {
    let mut a = LabState::load(dir)?;
    let mut b = LabState::load(other_dir)?;
    if a.dir == b.dir || netns_prefix(&a.dir) == netns_prefix(&b.dir) {
        bail!("a lab cannot be peered with itself");
    }
    let name = |s: &LabState| {
        s.cluster.clone().with_context(|| {
            format!(
                "the lab at {} is no named cluster: bring it up with `lab up --cluster NAME --pod-cidr …`",
                s.dir.display()
            )
        })
    };
    let (a_name, b_name) = (name(&a)?, name(&b)?);
    if a_name == b_name {
        bail!("both labs are cluster {a_name}: clusters need names of their own to be peered");
    }
    for x in a.pod_cidrs.in_use(a.ipv6) {
        for y in b.pod_cidrs.in_use(b.ipv6) {
            if overlap(&x, &y) {
                bail!(
                    "the pod CIDRs of {a_name} ({x}) and {b_name} ({y}) overlap: give one of them another `--pod-cidr` at `lab up`"
                );
            }
        }
    }
    if a.peers.contains_key(b_name.as_str()) || b.peers.contains_key(a_name.as_str()) {
        bail!("{a_name} and {b_name} are peered already (`lab unpeer` first)");
    }
    ensure_router(&a)?;
    ensure_router(&b)?;
    let ipv6 = a.ipv6 && b.ipv6;
    let (v4_a, v4_b) = free_transit(&a, &b)?;
    let (if_a, if_b) = (link_name(&b.dir), link_name(&a.dir));
    let (ns_a, ns_b) = (fabric(&a), fabric(&b));
    bulkhead_agent::netns::veth_pair(&if_a, Some(&ns_a), &if_b, Some(&ns_b))?;
    for (ns, ifname, v4, v6) in [
        (&ns_a, &if_a, v4_a, TRANSIT_V6_DIALER),
        (&ns_b, &if_b, v4_b, TRANSIT_V6_ACCEPTER),
    ] {
        ns.exec(&["ip", "addr", "add", &format!("{v4}/30"), "dev", ifname])?;
        ns.exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{ifname}.rp_filter=0"),
        ])?;
        if ipv6 {
            ns.exec(&[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                ifname,
                "nodad",
            ])?;
        }
        ns.exec(&["ip", "link", "set", ifname, "up"])?;
    }
    let a_as_peer = LabPeer {
        cluster: a_name.clone(),
        dir: a.dir.clone(),
        peering_port: a.peering_port(),
        ca: a.certs_dir().join("ca.pem"),
        pod_cidrs: a.pod_cidrs.in_use(ipv6),
        link_if: if_b.clone(),
        local_v4: v4_b,
        remote_v4: v4_a,
        ipv6,
    };
    let b_as_peer = LabPeer {
        cluster: b_name.clone(),
        dir: b.dir.clone(),
        peering_port: b.peering_port(),
        ca: b.certs_dir().join("ca.pem"),
        pod_cidrs: b.pod_cidrs.in_use(ipv6),
        link_if: if_a.clone(),
        local_v4: v4_a,
        remote_v4: v4_b,
        ipv6,
    };
    let routed = add_routes(&a, &b_as_peer, true).and_then(|()| add_routes(&b, &a_as_peer, false));
    if let Err(e) = routed {
        remove_link(&a, &b_as_peer);
        remove_link(&b, &a_as_peer);
        return Err(e);
    }
    a.peers.insert(b_name.to_string(), b_as_peer);
    b.peers.insert(a_name.to_string(), a_as_peer);
    a.save()?;
    b.save()?;
    Ok(())
}

/// `lab unpeer --with DIR`, and `lab down` for every peer: the link, the routes, and both labs'
/// records of each other.
pub fn unpeer(state: &mut LabState, cluster: &str) -> anyhow::Result<()> {
    let Some(peer) = state.peers.remove(cluster) else {
        bail!("this lab is not peered with {cluster}");
    };
    remove_link(state, &peer);
    state.save()?;
    if let Ok(mut other) = LabState::load(&peer.dir)
        && let Some(me) = state.cluster.as_ref()
        && let Some(mine) = other.peers.remove(me.as_str())
    {
        remove_link(&other, &mine);
        other.save()?;
    }
    Ok(())
}

/// `lab down`: every link to a peer, and the peers' routes to this lab.
pub fn unpeer_all(state: &mut LabState) {
    for cluster in state.peers.keys().cloned().collect::<Vec<_>>() {
        let _ = unpeer(state, &cluster);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_pod_cidrs_give_the_addresses_of_a_lab_without_a_cluster() {
        let c = PodCidrs::default();
        assert_eq!(c.v4.to_string(), "10.240.0.0/16");
        assert_eq!(c.v6.to_string(), "fd00:240::/96");
        assert_eq!(c.dns_v4(), super::super::dns::ADDRESS_V4);
        assert_eq!(c.dns_v6(), super::super::dns::ADDRESS_V6);
        assert_eq!(c.pod_v4(2, 11), Ipv4Addr::new(10, 240, 2, 11));
        assert_eq!(c.pod_v6(2, 11).to_string(), "fd00:240::2:b");
        assert_eq!(PodCidrs::from_args(&[], true).expect("default"), c);
    }

    #[test]
    fn a_pod_cidr_of_its_own_moves_every_pod_address() {
        let given: Vec<IpNetwork> = ["10.241.0.0/16", "fd00:241::/96"]
            .iter()
            .map(|s| s.parse().expect("cidr"))
            .collect();
        let c = PodCidrs::from_args(&given, true).expect("valid");
        assert_eq!(c.dns_v4(), Ipv4Addr::new(10, 241, 1, 10));
        assert_eq!(c.dns_v6().to_string(), "fd00:241::1:a");
        assert_eq!(c.pod_v4(3, 12), Ipv4Addr::new(10, 241, 3, 12));
        let v4_only = PodCidrs::from_args(&given[..1], false).expect("valid");
        assert_eq!(v4_only.in_use(false), vec![given[0]]);
        for (bad, ipv6) in [
            (vec!["10.241.0.0/24"], false),
            (vec!["10.241.1.0/16"], false),
            (vec!["fd00:241::/64"], true),
            (vec!["fd00:241::/96"], false),
            (vec!["10.241.0.0/16"], true),
            (vec!["10.241.0.0/16", "10.242.0.0/16"], false),
        ] {
            let nets: Vec<IpNetwork> = bad.iter().map(|s| s.parse().expect("cidr")).collect();
            assert!(PodCidrs::from_args(&nets, ipv6).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn overlapping_cidrs_are_found_either_way() {
        let a: IpNetwork = "10.240.0.0/16".parse().expect("cidr");
        let b: IpNetwork = "10.240.3.0/24".parse().expect("cidr");
        let c: IpNetwork = "10.241.0.0/16".parse().expect("cidr");
        assert!(overlap(&a, &b) && overlap(&b, &a));
        assert!(!overlap(&a, &c));
    }
}
