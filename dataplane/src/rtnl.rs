//! The few rtnetlink questions the agent asks the kernel (the route to an address, whether a
//! link is a bridge, the neighbour and bridge forwarding tables), over a blocking
//! `NETLINK_ROUTE` socket with `netlink-packet-route`: no `ip` or `bridge` process, so the
//! agent's image needs no iproute2, and a restarted agent's first apply asks in microseconds
//! what a process per pod took milliseconds for.
//!
//! A netlink socket answers for the network namespace it was opened in: open one ([`Rtnl::new`])
//! in the thread whose namespace is meant.

use std::{io, net::IpAddr};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    },
    route::{RouteAddress, RouteAttribute, RouteMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// A blocking rtnetlink socket of the calling thread's network namespace.
pub struct Rtnl {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// What the neighbour table holds for an address on a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    /// The link-layer address; none while unresolved (incomplete, failed).
    pub mac: Option<[u8; 6]>,
    /// Configured by hand (`permanent`, `noarp`).
    pub fixed: bool,
}

fn family(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn neighbour_address(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    }
}

impl Rtnl {
    pub fn new() -> io::Result<Rtnl> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Rtnl {
            socket,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Sends `message` and collects the answers: every message of a dump up to its end, or
    /// the reply of a request up to its acknowledgement. A refusal is the kernel's error.
    fn ask(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        if !dump {
            header.flags |= NLM_F_ACK;
        }
        let mut request = NetlinkMessage::new(header, NetlinkPayload::from(message));
        request.finalize();
        let mut out = vec![0; request.header.length as usize];
        request.serialize(&mut out);
        self.socket.send(&out, 0)?;
        let mut answers = Vec::new();
        loop {
            let size = self.socket.recv(&mut &mut self.buf[..], 0)?;
            let mut offset = 0;
            while offset < size {
                let msg: NetlinkMessage<RouteNetlinkMessage> =
                    NetlinkMessage::deserialize(&self.buf[offset..size])
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += len;
                if msg.header.sequence_number != self.seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::InnerMessage(m) => answers.push(m),
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(e) if e.code.is_none() => return Ok(answers),
                    NetlinkPayload::Error(e) => return Err(e.to_io()),
                    _ => {}
                }
            }
        }
    }

    /// The index of the link the route to `ip` leaves by (`ip route get`); none when the
    /// address is local (routed over `lo`) or unreachable.
    pub fn route_link(&mut self, ip: IpAddr) -> io::Result<Option<u32>> {
        let mut route = RouteMessage::default();
        route.header.address_family = family(ip);
        route.header.destination_prefix_length = if ip.is_ipv4() { 32 } else { 128 };
        route
            .attributes
            .push(RouteAttribute::Destination(RouteAddress::from(ip)));
        let answers = match self.ask(RouteNetlinkMessage::GetRoute(route), 0) {
            Ok(a) => a,
            // No route: an unreachable address is not an error of ours.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENETUNREACH | libc::EHOSTUNREACH)
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let oif = answers.iter().find_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r) => r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            }),
            _ => None,
        });
        let loopback = nix::net::if_::if_nametoindex("lo").ok();
        Ok(oif.filter(|i| Some(*i) != loopback))
    }

    /// Whether the link is a bridge.
    pub fn is_bridge(&mut self, ifindex: u32) -> io::Result<bool> {
        let mut link = LinkMessage::default();
        link.header.index = ifindex;
        let answers = self.ask(RouteNetlinkMessage::GetLink(link), 0)?;
        Ok(answers.iter().any(|m| match m {
            RouteNetlinkMessage::NewLink(l) => l.attributes.iter().any(|a| match a {
                LinkAttribute::LinkInfo(infos) => infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge))),
                _ => false,
            }),
            _ => false,
        }))
    }

    /// The neighbour entry of `ip` on the link (`ip neigh show to IP dev LINK`).
    pub fn neighbour(&mut self, ifindex: u32, ip: IpAddr) -> io::Result<Option<Neighbour>> {
        let mut query = NeighbourMessage::default();
        query.header.family = family(ip);
        query.header.ifindex = ifindex;
        let wanted = neighbour_address(ip);
        let answers = self.ask(RouteNetlinkMessage::GetNeighbour(query), NLM_F_DUMP)?;
        Ok(answers.into_iter().find_map(|m| {
            let RouteNetlinkMessage::NewNeighbour(n) = m else {
                return None;
            };
            let ours = n.header.ifindex == ifindex
                && n.attributes
                    .iter()
                    .any(|a| matches!(a, NeighbourAttribute::Destination(d) if *d == wanted));
            if !ours {
                return None;
            }
            let state = n.header.state;
            let unresolved = matches!(state, NeighbourState::Failed | NeighbourState::Incomplete);
            let mac = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(l) => <[u8; 6]>::try_from(l.as_slice()).ok(),
                _ => None,
            });
            Some(Neighbour {
                mac: mac.filter(|_| !unresolved),
                fixed: matches!(state, NeighbourState::Permanent | NeighbourState::Noarp),
            })
        }))
    }

    /// Removes the neighbour entry of `ip` on the link (`ip neigh del`).
    pub fn neighbour_del(&mut self, ifindex: u32, ip: IpAddr) -> io::Result<()> {
        let mut n = NeighbourMessage::default();
        n.header.family = family(ip);
        n.header.ifindex = ifindex;
        n.attributes
            .push(NeighbourAttribute::Destination(neighbour_address(ip)));
        self.ask(RouteNetlinkMessage::DelNeighbour(n), 0).map(drop)
    }

    /// Makes the kernel resolve `ip` on the link as a packet to it would (`ip neigh replace IP
    /// dev LINK use`: `NTF_USE`), creating the entry if needed. Returns at once; the answer
    /// arrives later.
    pub fn neighbour_use(&mut self, ifindex: u32, ip: IpAddr) -> io::Result<()> {
        let mut n = NeighbourMessage::default();
        n.header.family = family(ip);
        n.header.ifindex = ifindex;
        // As iproute2 sends it; with NTF_USE the kernel only triggers resolution.
        n.header.state = NeighbourState::Permanent;
        n.header.flags = NeighbourFlags::Use;
        n.attributes
            .push(NeighbourAttribute::Destination(neighbour_address(ip)));
        self.ask(
            RouteNetlinkMessage::NewNeighbour(n),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    /// The port of `bridge` its forwarding table sends `mac` to (`bridge fdb show br BRIDGE`):
    /// an entry learned on a port names the bridge as its controller.
    pub fn fdb_port(&mut self, bridge: u32, mac: [u8; 6]) -> io::Result<Option<u32>> {
        let mut query = NeighbourMessage::default();
        query.header.family = AddressFamily::Bridge;
        let answers = self.ask(RouteNetlinkMessage::GetNeighbour(query), NLM_F_DUMP)?;
        Ok(answers.into_iter().find_map(|m| {
            let RouteNetlinkMessage::NewNeighbour(n) = m else {
                return None;
            };
            let on_port = n
                .attributes
                .iter()
                .any(|a| matches!(a, NeighbourAttribute::Controller(c) if *c == bridge));
            let same_mac = n
                .attributes
                .iter()
                .any(|a| matches!(a, NeighbourAttribute::LinkLayerAddress(l) if l[..] == mac[..]));
            (on_port && same_mac && n.header.ifindex != bridge).then_some(n.header.ifindex)
        }))
    }
}
