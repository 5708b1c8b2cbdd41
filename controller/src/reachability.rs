//! "May A talk to B on port P, and why": answered from the compiled rule sets with
//! [`decide`], the same function the data plane is tested against — never from the policies.
//!
//! A connection is allowed when the source's node allows it leaving the source (egress) **and**
//! the destination's node allows it entering the destination (ingress). The packet carries the
//! pods' addresses (same family when both have one); pods without an address get a synthetic one
//! from [`assign_synthetic_ips`] before compiling, and such pods never match ipBlock/CIDR peers.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use serde::Serialize;

use crate::engine::PolicyEngine;
use crate::model::{Object, PodKey, PolicyKey};
use crate::ruleset::{
    Decision, Direction, Endpoint, PacketTuple, Protocol, RULE_DEFAULT_ALLOW, RuleId, RuleKind,
    RuleSet, Verdict, decide,
};

/// Why a reachability question could not be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReachabilityError {
    #[error("pod {0} is not in the input: check the namespace/name and the -f files")]
    UnknownPod(String),
    #[error("pod {0} has no endpoint (it has no address or its node is full)")]
    NoEndpoint(String),
    #[error("{0:?} is not namespace/pod: write it like default/web-0")]
    BadPodName(String),
    #[error("destination name: {0}")]
    BadName(crate::ruleset::BadNamePattern),
    #[error("destination name {0:?} is a pattern: name one host, e.g. api.example.com")]
    NamePattern(String),
    #[error("pod {pod} has no address of the family of {address}")]
    NoFamily { pod: String, address: IpAddr },
}

impl ReachabilityError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            ReachabilityError::UnknownPod(_) => "unknown_pod",
            ReachabilityError::NoEndpoint(_) => "no_endpoint",
            ReachabilityError::BadPodName(_) => "bad_pod_name",
            ReachabilityError::BadName(_) | ReachabilityError::NamePattern(_) => "bad_name",
            ReachabilityError::NoFamily { .. } => "no_family",
        }
    }
}

/// Parses `namespace/pod`.
pub fn parse_pod_key(s: &str) -> Result<PodKey, ReachabilityError> {
    s.parse()
        .map_err(|_| ReachabilityError::BadPodName(s.to_string()))
}

/// First address of the synthetic range (RFC 2544 benchmarking space, never routed).
const SYNTHETIC_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// Gives every pod without an address (and not on the host network) a made-up IPv4 address that
/// no other pod has, marked synthetic so it never matches CIDR peers.
pub fn assign_synthetic_ips(objects: &mut [Object]) {
    let used: BTreeSet<IpAddr> = objects
        .iter()
        .filter_map(|o| match o {
            Object::Pod(p) => Some(p.ips.iter().copied()),
            _ => None,
        })
        .flatten()
        .collect();
    let mut next = u32::from(SYNTHETIC_BASE);
    for o in objects.iter_mut() {
        if let Object::Pod(p) = o
            && p.ips.is_empty()
            && !p.host_network
        {
            let ip = loop {
                let candidate = IpAddr::V4(Ipv4Addr::from(next));
                next = next.wrapping_add(1);
                if !used.contains(&candidate) {
                    break candidate;
                }
            };
            p.ips.push(ip);
            p.synthetic_ips = true;
        }
    }
}

/// The verdict of one direction, with the rule that decided it and a sentence saying why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DirectionExplanation {
    pub verdict: Verdict,
    /// The deciding rule (`null` for the built-in default).
    pub rule: Option<String>,
    pub rule_id: RuleId,
    pub reason: String,
    /// Set when the staged view (staged policies and audit-mode ServicePolicies in force)
    /// decides differently: what it would do, by which rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<String>,
    /// The staged view's verdict (the same as `verdict` when no staged policy changes it).
    pub staged_verdict: Verdict,
    pub staged_rule_id: RuleId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: Protocol,
    pub verdict: Verdict,
    pub egress: DirectionExplanation,
    pub ingress: DirectionExplanation,
}

/// Compiled rule sets of every node, for answering many questions.
pub struct Reachability<'a> {
    engine: &'a PolicyEngine,
    rulesets: BTreeMap<String, RuleSet>,
}

struct Side<'r> {
    ruleset: &'r RuleSet,
    endpoint: &'r Endpoint,
}

impl<'a> Reachability<'a> {
    pub fn new(engine: &'a PolicyEngine) -> Reachability<'a> {
        Reachability {
            engine,
            rulesets: engine.rulesets(),
        }
    }

    fn side(&self, pod: &PodKey) -> Result<Side<'_>, ReachabilityError> {
        let node = self
            .engine
            .node_of_pod(pod)
            .ok_or_else(|| ReachabilityError::UnknownPod(pod.to_string()))?;
        let ruleset = self
            .rulesets
            .get(node)
            .ok_or_else(|| ReachabilityError::NoEndpoint(pod.to_string()))?;
        let endpoint = ruleset
            .endpoint_by_name(&pod.namespace, &pod.name)
            .ok_or_else(|| ReachabilityError::NoEndpoint(pod.to_string()))?;
        Ok(Side { ruleset, endpoint })
    }

    fn packet(
        src: &Endpoint,
        dst: &Endpoint,
        protocol: Protocol,
        port: u16,
    ) -> Option<PacketTuple> {
        let pick = |v4: bool| {
            let s = src.ips.iter().find(|ip| ip.is_ipv4() == v4)?;
            let d = dst.ips.iter().find(|ip| ip.is_ipv4() == v4)?;
            Some((*s, *d))
        };
        let (s, d) = pick(true).or_else(|| pick(false))?;
        Some(PacketTuple {
            src: s,
            dst: d,
            protocol: Some(protocol),
            dst_port: protocol.has_ports().then_some(port),
        })
    }

    fn decisions(
        &self,
        from: &PodKey,
        to: &PodKey,
        protocol: Protocol,
        port: u16,
    ) -> Result<Option<(Decision, Decision)>, ReachabilityError> {
        let src = self.side(from)?;
        let dst = self.side(to)?;
        let Some(packet) = Self::packet(src.endpoint, dst.endpoint, protocol, port) else {
            // No address family in common: the pods cannot reach each other at all.
            return Ok(None);
        };
        let egress = decide(src.ruleset, src.endpoint, Direction::Egress, &packet);
        let ingress = decide(dst.ruleset, dst.endpoint, Direction::Ingress, &packet);
        Ok(Some((egress, ingress)))
    }

    pub fn allowed(
        &self,
        from: &PodKey,
        to: &PodKey,
        protocol: Protocol,
        port: u16,
    ) -> Result<bool, ReachabilityError> {
        Ok(self
            .decisions(from, to, protocol, port)?
            .is_some_and(|(e, i)| e.verdict == Verdict::Allow && i.verdict == Verdict::Allow))
    }

    /// `{"ns/src": {"ns/dst": allowed}}` for every ordered pair of pods with an endpoint.
    pub fn matrix(
        &self,
        protocol: Protocol,
        port: u16,
    ) -> BTreeMap<String, BTreeMap<String, bool>> {
        let pods: Vec<PodKey> = self
            .engine
            .pod_keys()
            .into_iter()
            .filter(|p| self.side(p).is_ok())
            .collect();
        let mut out = BTreeMap::new();
        for from in &pods {
            let row: BTreeMap<String, bool> = pods
                .iter()
                .map(|to| {
                    (
                        to.to_string(),
                        self.allowed(from, to, protocol, port).unwrap_or(false),
                    )
                })
                .collect();
            out.insert(from.to_string(), row);
        }
        out
    }

    pub fn explain(
        &self,
        from: &PodKey,
        to: &PodKey,
        protocol: Protocol,
        port: u16,
    ) -> Result<Explanation, ReachabilityError> {
        let src = self.side(from)?;
        let dst = self.side(to)?;
        let traffic = if protocol.has_ports() {
            format!("{port}/{protocol:?}").to_uppercase()
        } else {
            format!("{protocol:?}").to_uppercase()
        };
        let (egress, ingress) = match self.decisions(from, to, protocol, port)? {
            Some((e, i)) => (
                explain_direction(
                    self.engine,
                    &src,
                    Direction::Egress,
                    &e,
                    &to.to_string(),
                    &traffic,
                ),
                explain_direction(
                    self.engine,
                    &dst,
                    Direction::Ingress,
                    &i,
                    &from.to_string(),
                    &traffic,
                ),
            ),
            None => {
                let no_family = |v: &str| DirectionExplanation {
                    verdict: Verdict::Deny,
                    rule: None,
                    rule_id: RULE_DEFAULT_ALLOW,
                    reason: format!("{from} and {to} have no address family in common{v}"),
                    audit: None,
                    staged_verdict: Verdict::Deny,
                    staged_rule_id: RULE_DEFAULT_ALLOW,
                };
                (no_family(""), no_family(""))
            }
        };
        let verdict = if egress.verdict == Verdict::Allow && ingress.verdict == Verdict::Allow {
            Verdict::Allow
        } else {
            Verdict::Deny
        };
        Ok(Explanation {
            from: from.to_string(),
            to: to.to_string(),
            port,
            protocol,
            verdict,
            egress,
            ingress,
        })
    }
}

fn policy_name(ruleset: &RuleSet, rule: RuleId) -> String {
    match ruleset.rules.get(&rule) {
        Some(r) if r.kind == RuleKind::Default => "the default".into(),
        Some(r) if r.namespace.is_empty() => format!("{:?} {}", r.kind, r.name),
        Some(r) => format!("{:?} {}/{}", r.kind, r.namespace, r.name),
        None => ruleset.describe(rule),
    }
}

fn explain_direction(
    engine: &PolicyEngine,
    side: &Side<'_>,
    direction: Direction,
    d: &Decision,
    peer: &str,
    traffic: &str,
) -> DirectionExplanation {
    let ep = side.endpoint;
    let name = ep.name();
    let dir = match direction {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    };
    let policy = side.ruleset.policy_of(ep).direction(direction);
    let rule = (d.rule != RULE_DEFAULT_ALLOW).then(|| side.ruleset.describe(d.rule));
    let quarantine = side
        .ruleset
        .rules
        .get(&d.rule)
        .filter(|r| r.kind == RuleKind::Quarantine);
    let reason = if let Some(q) = quarantine {
        // "quarantined by Quarantine NS/NAME: REASON; …"
        let key = PolicyKey {
            kind: RuleKind::Quarantine,
            namespace: q.namespace.clone(),
            name: q.name.clone(),
        };
        let why = engine
            .quarantine(&key)
            .and_then(|p| p.quarantine.as_ref())
            .map_or("(reason unknown)", |s| s.reason.as_str());
        let head = format!(
            "{name} is quarantined by Quarantine {}/{}: {why}",
            q.namespace, q.name
        );
        match d.verdict {
            Verdict::Allow => format!(
                "{head}; allowed by its exception {}",
                side.ruleset.describe(d.rule)
            ),
            Verdict::Deny => {
                let admits = match direction {
                    Direction::Ingress => format!("from {peer}"),
                    Direction::Egress => format!("to {peer}"),
                };
                format!("{head}; {traffic} {admits} is not one of its exceptions")
            }
        }
    } else if d.verdict == Verdict::Allow && d.rule == RULE_DEFAULT_ALLOW {
        if policy.isolated_by.is_none()
            && policy.staged_isolated_by.is_none()
            && policy.entries.is_empty()
        {
            format!("no policy selects {name} for {dir}: allowed by default")
        } else {
            format!(
                "{name} is not isolated for {dir} and no admin or baseline rule decides {traffic} with {peer}: allowed by default"
            )
        }
    } else if d.verdict == Verdict::Deny && Some(d.rule) == policy.isolated_by {
        let admits = match direction {
            Direction::Ingress => format!("from {peer}"),
            Direction::Egress => format!("to {peer}"),
        };
        format!(
            "{name} is isolated for {dir} by {}; no rule admits {traffic} {admits}",
            policy_name(side.ruleset, d.rule)
        )
    } else {
        let verb = match d.verdict {
            Verdict::Allow => "allowed",
            Verdict::Deny => "denied",
        };
        format!("{verb} by {}", side.ruleset.describe(d.rule))
    };
    let audit = (d.audit_verdict != d.verdict || d.audit_rule != d.rule).then(|| {
        let verb = match d.audit_verdict {
            Verdict::Allow => "allowed",
            Verdict::Deny => "denied",
        };
        let by = if Some(d.audit_rule) == policy.staged_isolated_by {
            format!("isolation by {}", policy_name(side.ruleset, d.audit_rule))
        } else {
            side.ruleset.describe(d.audit_rule)
        };
        format!("staged: would be {verb} by {by}")
    });
    DirectionExplanation {
        verdict: d.verdict,
        rule,
        rule_id: d.rule,
        reason,
        audit,
        staged_verdict: d.audit_verdict,
        staged_rule_id: d.audit_rule,
    }
}

impl Reachability<'_> {
    /// Whether pod `from` may open a connection to `name` (a host outside the cluster) at
    /// `address`, once the pod has resolved the name to that address: the egress decision
    /// over the address's identity and the name identities of every pattern of the pod's node
    /// that matches the name (`decide_with_names`). Nothing inside the cluster enforces the
    /// ingress side, which is reported as such.
    pub fn explain_to_name(
        &self,
        from: &PodKey,
        name: &str,
        address: IpAddr,
        protocol: Protocol,
        port: u16,
    ) -> Result<Explanation, ReachabilityError> {
        let pattern =
            crate::ruleset::NamePattern::parse(name).map_err(ReachabilityError::BadName)?;
        if pattern.is_wildcard() {
            return Err(ReachabilityError::NamePattern(name.to_string()));
        }
        let name = pattern.to_string();
        let src = self.side(from)?;
        let src_ip = src
            .endpoint
            .ips
            .iter()
            .find(|ip| ip.is_ipv4() == address.is_ipv4())
            .ok_or_else(|| ReachabilityError::NoFamily {
                pod: from.to_string(),
                address,
            })?;
        let packet = PacketTuple {
            src: *src_ip,
            dst: address,
            protocol: Some(protocol),
            dst_port: protocol.has_ports().then_some(port),
        };
        let names = crate::ruleset::names::matching_names(&src.ruleset.names, &name);
        let d = crate::ruleset::decide_with_names(
            src.ruleset,
            src.endpoint,
            Direction::Egress,
            &packet,
            &names,
        );
        let traffic = if protocol.has_ports() {
            format!("{port}/{protocol:?}").to_uppercase()
        } else {
            format!("{protocol:?}").to_uppercase()
        };
        let peer = format!("{name} ({address})");
        let mut egress =
            explain_direction(self.engine, &src, Direction::Egress, &d, &peer, &traffic);
        if names.is_empty() {
            egress.reason = format!(
                "{}; no name pattern of its node matches {name}",
                egress.reason
            );
        }
        let ingress = DirectionExplanation {
            verdict: Verdict::Allow,
            rule: None,
            rule_id: RULE_DEFAULT_ALLOW,
            reason: format!("{name} is outside the cluster: no ingress policy applies"),
            audit: None,
            staged_verdict: Verdict::Allow,
            staged_rule_id: RULE_DEFAULT_ALLOW,
        };
        Ok(Explanation {
            from: from.to_string(),
            to: name,
            port,
            protocol,
            verdict: egress.verdict,
            egress,
            ingress,
        })
    }
}
