//! The reference model of the kernel's connection tracking: which packets open a connection,
//! which belong to one, and what a policy change does to connections already admitted. The
//! kernel programs (`ebpf/src/main.rs`, `judge`) implement the same state machine over their
//! conntrack maps; the differential tests feed both the same packet sequences and compare every
//! verdict.
//!
//! - Only what opens a connection creates state: a TCP SYN (without ACK) the policy admits, or
//!   the first packet of a UDP, SCTP, ICMP or other flow the policy admits. A TCP segment without
//!   SYN that belongs to no tracked connection is judged by the policy of its own direction and
//!   leaves no state, so no side can turn the other side's packets into "replies" after the fact.
//! - Packets of a tracked connection pass in both directions while the policy is the one that
//!   admitted it. After a policy change, the connection's next packet, from either side,
//!   re-checks it against the current policy of the direction that opened it.
//! - A connection that policy no longer admits is revoked: it stays as a tombstone that drops
//!   both sides' packets. A new TCP SYN the policy admits opens a fresh connection in its place;
//!   a connectionless flow is re-opened only by the side that opened it, once a later policy
//!   admits it again. The revocation is reported once.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::{Decision, Direction, Endpoint, PacketTuple, Protocol, RuleSet, Verdict, decide};

/// One packet as conntrack sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackedPacket {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// `None` for protocols Bulkhead has no rule kind for.
    pub protocol: Option<Protocol>,
    /// Transport ports; for ICMP echo the identifier, as both. Zero where there are none.
    pub src_port: u16,
    pub dst_port: u16,
    /// A TCP segment with SYN and without ACK: the opening of a connection.
    pub tcp_syn: bool,
}

impl TrackedPacket {
    /// The packet as the policy of `direction` sees it when it opens a connection; `reversed`
    /// when a reply re-checks its connection (the tuple of the opening packet).
    fn as_opening(&self, reversed: bool) -> PacketTuple {
        let (src, dst, dst_port) = if reversed {
            (self.dst, self.src, self.src_port)
        } else {
            (self.src, self.dst, self.dst_port)
        };
        PacketTuple {
            src,
            dst,
            protocol: self.protocol,
            dst_port: self
                .protocol
                .is_some_and(Protocol::has_ports)
                .then_some(dst_port),
        }
    }
}

/// What conntrack and policy made of one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judgement {
    /// Opened a connection (now tracked).
    Opened(Decision),
    /// Part of a tracked connection the current policy admits (forward or reply).
    Tracked,
    /// A TCP segment without SYN of no tracked connection that its direction's policy admits;
    /// not tracked.
    Untracked(Decision),
    /// Refused by policy; no state.
    Denied(Decision),
    /// Revoked its connection now: the policy no longer admits it (reported, once).
    Revoked(Decision),
    /// Part of a connection revoked earlier.
    StillRevoked,
    /// The endpoint names a policy group its rule set lacks: everything is dropped.
    LockedDown,
}

impl Judgement {
    pub fn verdict(&self) -> Verdict {
        match self {
            Judgement::Opened(_) | Judgement::Tracked | Judgement::Untracked(_) => Verdict::Allow,
            Judgement::Denied(_)
            | Judgement::Revoked(_)
            | Judgement::StillRevoked
            | Judgement::LockedDown => Verdict::Deny,
        }
    }
}

/// A connection's key: the endpoint and the tuple in a canonical order (the same from either
/// side).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConnKey {
    endpoint: u32,
    protocol: Option<Protocol>,
    low: (IpAddr, u16),
    high: (IpAddr, u16),
}

impl ConnKey {
    fn of(endpoint: u32, p: &TrackedPacket) -> ConnKey {
        let (a, b) = ((p.src, p.src_port), (p.dst, p.dst_port));
        let (low, high) = if a <= b { (a, b) } else { (b, a) };
        ConnKey {
            endpoint,
            protocol: p.protocol,
            low,
            high,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Connection {
    /// The direction of the opening packet at this endpoint: packets in this direction come
    /// from the side that opened the connection, the others are its replies.
    opened: Direction,
    /// The policy generation that last admitted (or revoked) it.
    generation: u64,
    revoked: bool,
}

/// The connections tracked on one node, per endpoint.
#[derive(Debug, Default, Clone)]
pub struct ConnTracker {
    connections: HashMap<ConnKey, Connection>,
}

impl ConnTracker {
    pub fn new() -> ConnTracker {
        ConnTracker::default()
    }

    /// Judges one packet seen at `endpoint` in `direction` under `ruleset`, whose policy
    /// generation is `generation` (it changes with every rule set the node applies).
    pub fn packet(
        &mut self,
        ruleset: &RuleSet,
        generation: u64,
        endpoint: &Endpoint,
        direction: Direction,
        p: &TrackedPacket,
    ) -> Judgement {
        if !ruleset.policies.contains_key(&endpoint.policy) {
            return Judgement::LockedDown;
        }
        let key = ConnKey::of(endpoint.id, p);
        let tracked = if p.tcp_syn {
            None
        } else {
            self.connections.get_mut(&key)
        };
        if let Some(c) = tracked {
            let from_opener = direction == c.opened;
            if c.revoked {
                if c.generation == generation || !from_opener || p.protocol == Some(Protocol::Tcp) {
                    return Judgement::StillRevoked;
                }
                let d = decide(ruleset, endpoint, direction, &p.as_opening(false));
                c.generation = generation;
                if d.verdict == Verdict::Deny {
                    return Judgement::StillRevoked;
                }
                c.revoked = false;
                return Judgement::Opened(d);
            }
            if c.generation == generation {
                return Judgement::Tracked;
            }
            let d = decide(ruleset, endpoint, c.opened, &p.as_opening(!from_opener));
            c.generation = generation;
            if d.verdict == Verdict::Allow {
                return Judgement::Tracked;
            }
            c.revoked = true;
            return Judgement::Revoked(d);
        }
        let d = decide(ruleset, endpoint, direction, &p.as_opening(false));
        if d.verdict == Verdict::Deny {
            return Judgement::Denied(d);
        }
        if p.protocol == Some(Protocol::Tcp) && !p.tcp_syn {
            return Judgement::Untracked(d);
        }
        self.connections.insert(
            key,
            Connection {
                opened: direction,
                generation,
                revoked: false,
            },
        );
        Judgement::Opened(d)
    }

    /// Revokes the live connections of one endpoint as of `generation`, as the agent does when
    /// it quarantines the endpoint; returns how many.
    pub fn cut(&mut self, endpoint: u32, generation: u64) -> usize {
        let mut cut = 0;
        for (_, c) in self
            .connections
            .iter_mut()
            .filter(|(k, c)| k.endpoint == endpoint && !c.revoked)
        {
            c.revoked = true;
            c.generation = generation;
            cut += 1;
        }
        cut
    }

    /// Connections tracked (tombstones included).
    pub fn len(&self) -> usize {
        self.connections.len()
    }

    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{
        Action, DirectionPolicy, EndpointPolicy, IpCacheEntry, PolicyEntry, PortRange, Stage, Tier,
    };

    const EP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
    const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));

    fn allow(protocol: Protocol, ports: PortRange, rule: u32) -> PolicyEntry {
        PolicyEntry {
            peer: 301,
            protocol: Some(protocol),
            ports,
            tier: Tier::Application,
            priority: 0,
            action: Action::Allow,
            stage: Stage::Enforced,
            rule,
        }
    }

    /// The endpoint 10.0.0.2 (identity 300) admits, on ingress, what `ingress` lists from
    /// 10.0.0.1 (identity 301), and nothing else; on egress, what `egress` lists.
    fn ruleset(ingress: Vec<PolicyEntry>, egress: Vec<PolicyEntry>) -> (RuleSet, Endpoint) {
        let ep = Endpoint {
            id: 1,
            namespace: "ns".into(),
            pod: "server".into(),
            workload: None,
            identity: 300,
            ips: vec![EP],
            interface: None,
            quarantined: false,
            policy: 1,
        };
        let mut rs = RuleSet {
            node: "n".into(),
            version: 1,
            endpoints: vec![ep.clone()],
            ..RuleSet::default()
        };
        rs.ipcache = vec![
            IpCacheEntry::new("10.0.0.2/32".parse().unwrap(), 300),
            IpCacheEntry::new("10.0.0.1/32".parse().unwrap(), 301),
        ];
        let policy = EndpointPolicy {
            ingress: DirectionPolicy {
                isolated_by: Some(90),
                staged_isolated_by: Some(90),
                entries: ingress,
            },
            egress: DirectionPolicy {
                isolated_by: Some(91),
                staged_isolated_by: Some(91),
                entries: egress,
            },
        };
        rs.policies.insert(1, policy);
        (rs, ep)
    }

    fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, syn: bool) -> TrackedPacket {
        TrackedPacket {
            src,
            dst,
            protocol: Some(Protocol::Tcp),
            src_port: sport,
            dst_port: dport,
            tcp_syn: syn,
        }
    }

    fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> TrackedPacket {
        TrackedPacket {
            protocol: Some(Protocol::Udp),
            tcp_syn: false,
            ..tcp(src, sport, dst, dport, false)
        }
    }

    use Direction::{Egress, Ingress};

    #[test]
    fn replies_pass_and_a_reply_rechecks_as_the_opening_would() {
        let (rs, ep) = ruleset(vec![allow(Protocol::Tcp, PortRange::single(80), 2)], vec![]);
        let mut ct = ConnTracker::new();
        let syn = tcp(PEER, 40000, EP, 80, true);
        let reply = tcp(EP, 80, PEER, 40000, false);
        assert!(matches!(
            ct.packet(&rs, 1, &ep, Ingress, &syn),
            Judgement::Opened(d) if d.rule == 2
        ));
        assert_eq!(ct.packet(&rs, 1, &ep, Egress, &reply), Judgement::Tracked);
        // A new generation of the same policy: the reply re-checks the connection as ingress
        // to port 80 (its own egress to port 40000 is refused by the isolated egress).
        assert_eq!(ct.packet(&rs, 2, &ep, Egress, &reply), Judgement::Tracked);
        assert_eq!(ct.len(), 1);
    }

    #[test]
    fn a_revoked_connection_drops_both_sides_and_replies_never_reopen_it() {
        let (open, ep) = ruleset(vec![allow(Protocol::Tcp, PortRange::single(80), 2)], vec![]);
        let (closed, _) = ruleset(vec![], vec![]);
        let mut ct = ConnTracker::new();
        let syn = tcp(PEER, 40000, EP, 80, true);
        let ack = tcp(PEER, 40000, EP, 80, false);
        let reply = tcp(EP, 80, PEER, 40000, false);
        ct.packet(&open, 1, &ep, Ingress, &syn);
        // The policy change is noticed by the responder's packet first.
        assert!(matches!(
            ct.packet(&closed, 2, &ep, Egress, &reply),
            Judgement::Revoked(d) if d.rule == 90
        ));
        assert_eq!(
            ct.packet(&closed, 2, &ep, Ingress, &ack),
            Judgement::StillRevoked
        );
        assert_eq!(
            ct.packet(&closed, 2, &ep, Egress, &reply),
            Judgement::StillRevoked
        );
        // Even once egress admits everything, the responder's packets stay cut.
        let (egress_open, _) = ruleset(vec![], vec![allow(Protocol::Tcp, PortRange::ALL, 5)]);
        assert_eq!(
            ct.packet(&egress_open, 3, &ep, Egress, &reply),
            Judgement::StillRevoked
        );
        // A policy that admits the connection again does not revive it: TCP needs a new SYN.
        assert_eq!(
            ct.packet(&open, 4, &ep, Ingress, &ack),
            Judgement::StillRevoked
        );
        assert!(matches!(
            ct.packet(&open, 4, &ep, Ingress, &syn),
            Judgement::Opened(_)
        ));
        assert_eq!(ct.packet(&open, 4, &ep, Egress, &reply), Judgement::Tracked);
        assert_eq!(ct.len(), 1);
    }

    #[test]
    fn a_tcp_segment_without_syn_opens_nothing() {
        let (rs, ep) = ruleset(
            vec![allow(Protocol::Tcp, PortRange::single(80), 2)],
            vec![allow(Protocol::Tcp, PortRange::single(40000), 3)],
        );
        let mut ct = ConnTracker::new();
        // An ACK from the endpoint to the peer's port 40000: egress admits it, nothing tracked.
        let ack = tcp(EP, 80, PEER, 40000, false);
        assert!(matches!(
            ct.packet(&rs, 1, &ep, Egress, &ack),
            Judgement::Untracked(d) if d.rule == 3
        ));
        assert!(ct.is_empty());
        // The other way, ingress to port 40000 is not admitted: no entry makes it a reply.
        let back = tcp(PEER, 40000, EP, 81, false);
        assert!(matches!(
            ct.packet(&rs, 1, &ep, Ingress, &back),
            Judgement::Denied(_)
        ));
        assert!(ct.is_empty());
    }

    #[test]
    fn a_connectionless_flow_is_reopened_by_its_opener_only() {
        let (open, ep) = ruleset(vec![allow(Protocol::Udp, PortRange::ALL, 2)], vec![]);
        let (closed, _) = ruleset(vec![], vec![allow(Protocol::Udp, PortRange::ALL, 4)]);
        let mut ct = ConnTracker::new();
        let request = udp(PEER, 5000, EP, 53);
        let answer = udp(EP, 53, PEER, 5000);
        assert!(matches!(
            ct.packet(&open, 1, &ep, Ingress, &request),
            Judgement::Opened(_)
        ));
        assert!(matches!(
            ct.packet(&closed, 2, &ep, Ingress, &request),
            Judgement::Revoked(_)
        ));
        // The responder's egress is admitted now, but its flow was revoked: still cut.
        assert_eq!(
            ct.packet(&closed, 3, &ep, Egress, &answer),
            Judgement::StillRevoked
        );
        // Within one generation, the opener cannot try again either.
        assert_eq!(
            ct.packet(&closed, 3, &ep, Ingress, &request),
            Judgement::StillRevoked
        );
        // A later policy that admits it lets the opener open it again.
        assert!(matches!(
            ct.packet(&open, 4, &ep, Ingress, &request),
            Judgement::Opened(_)
        ));
        assert_eq!(
            ct.packet(&open, 4, &ep, Egress, &answer),
            Judgement::Tracked
        );
    }

    #[test]
    fn cut_connections_stay_cut_after_release() {
        let (rs, ep) = ruleset(
            vec![allow(Protocol::Tcp, PortRange::single(80), 2)],
            vec![allow(Protocol::Udp, PortRange::ALL, 3)],
        );
        let mut ct = ConnTracker::new();
        let syn = tcp(PEER, 40000, EP, 80, true);
        let reply = tcp(EP, 80, PEER, 40000, false);
        let out = udp(EP, 6000, PEER, 53);
        let back = udp(PEER, 53, EP, 6000);
        ct.packet(&rs, 1, &ep, Ingress, &syn);
        ct.packet(&rs, 1, &ep, Egress, &out);
        assert_eq!(ct.cut(ep.id, 2), 2);
        assert_eq!(ct.cut(ep.id, 2), 0, "tombstones are not cut twice");
        assert_eq!(
            ct.packet(&rs, 2, &ep, Egress, &reply),
            Judgement::StillRevoked
        );
        assert_eq!(
            ct.packet(&rs, 2, &ep, Ingress, &back),
            Judgement::StillRevoked
        );
        // Released (a new generation admitting both again): TCP stays cut, the UDP flow's
        // opener may open it again, its peer may not.
        assert_eq!(
            ct.packet(&rs, 3, &ep, Egress, &reply),
            Judgement::StillRevoked
        );
        assert_eq!(
            ct.packet(&rs, 3, &ep, Ingress, &back),
            Judgement::StillRevoked
        );
        assert!(matches!(
            ct.packet(&rs, 3, &ep, Egress, &out),
            Judgement::Opened(_)
        ));
        assert_eq!(ct.packet(&rs, 3, &ep, Ingress, &back), Judgement::Tracked);
    }

    #[test]
    fn a_missing_policy_group_locks_the_endpoint_down() {
        let (mut rs, ep) = ruleset(vec![allow(Protocol::Tcp, PortRange::ALL, 2)], vec![]);
        rs.policies.clear();
        let mut ct = ConnTracker::new();
        let j = ct.packet(&rs, 1, &ep, Ingress, &tcp(PEER, 1, EP, 80, true));
        assert_eq!((j, j.verdict()), (Judgement::LockedDown, Verdict::Deny));
    }
}
