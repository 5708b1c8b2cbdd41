//! Conversions between the rule-set contract (`bulkhead-ruleset`) and its protobuf messages
//! (`ruleset.proto`). Encoding cannot fail; decoding refuses what the contract cannot hold and
//! names the field, so a garbled or hostile message is an error, never a wrong rule set.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use bulkhead_ruleset as rs;
use ipnetwork::IpNetwork;

use crate::v1 as pb;

/// A protobuf message the rule-set contract cannot hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("{field}: an address must be 4 or 16 bytes, not {len}")]
    Address { field: &'static str, len: usize },
    #[error("{field}: /{prefix} is too long for the address")]
    Prefix { field: &'static str, prefix: u32 },
    #[error("{field}: {value} is out of range (at most {max})")]
    Range {
        field: &'static str,
        value: u32,
        max: u32,
    },
    #[error("{field}: unknown value {value} (a newer controller?)")]
    Enum { field: &'static str, value: i32 },
    #[error("{field} is missing")]
    Missing { field: &'static str },
    #[error("{field}: {reason}")]
    NamePattern {
        field: &'static str,
        reason: rs::BadNamePattern,
    },
    #[error(
        "{field}: {text:?} is not in normal form (lower case, no trailing dot): expected {normal:?}"
    )]
    NameNotNormal {
        field: &'static str,
        text: String,
        normal: String,
    },
    #[error("{field}: {value} is not a name identity")]
    NameIdentity { field: &'static str, value: u32 },
}

pub(crate) mod names;
pub(crate) use names::{
    PatternProblem, name_entries_from, name_entry_to, pattern_from, pattern_to,
};

type Result<T> = std::result::Result<T, ConvertError>;

pub(crate) fn addr_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// The address of 4 or 16 bytes.
pub(crate) fn addr_of(b: &[u8]) -> Option<IpAddr> {
    if let Ok(a) = <[u8; 4]>::try_from(b) {
        return Some(IpAddr::V4(Ipv4Addr::from(a)));
    }
    if let Ok(a) = <[u8; 16]>::try_from(b) {
        return Some(IpAddr::V6(Ipv6Addr::from(a)));
    }
    None
}

fn addr(field: &'static str, b: &[u8]) -> Result<IpAddr> {
    addr_of(b).ok_or(ConvertError::Address {
        field,
        len: b.len(),
    })
}

/// Addresses of 4 or 16 bytes each, sorted and unique (as the contract keeps them).
fn addrs(field: &'static str, b: &[Vec<u8>]) -> Result<Vec<IpAddr>> {
    let mut out = b
        .iter()
        .map(|a| addr(field, a))
        .collect::<Result<Vec<_>>>()?;
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn u16_of(field: &'static str, value: u32) -> Result<u16> {
    u16::try_from(value).map_err(|_| ConvertError::Range {
        field,
        value,
        max: u16::MAX as u32,
    })
}

pub(crate) fn cidr_to(net: &IpNetwork) -> pb::Cidr {
    pb::Cidr {
        addr: addr_bytes(&net.ip()),
        prefix: net.prefix() as u32,
    }
}

fn cidr_from(field: &'static str, c: &pb::Cidr) -> Result<IpNetwork> {
    let ip = addr(field, &c.addr)?;
    let prefix = u8::try_from(c.prefix).map_err(|_| ConvertError::Prefix {
        field,
        prefix: c.prefix,
    })?;
    IpNetwork::new(ip, prefix).map_err(|_| ConvertError::Prefix {
        field,
        prefix: c.prefix,
    })
}

pub fn direction_to(d: rs::Direction) -> pb::Direction {
    match d {
        rs::Direction::Ingress => pb::Direction::Ingress,
        rs::Direction::Egress => pb::Direction::Egress,
    }
}

/// The direction of a known, specified value.
pub fn direction_of(v: i32) -> Option<rs::Direction> {
    match pb::Direction::try_from(v) {
        Ok(pb::Direction::Ingress) => Some(rs::Direction::Ingress),
        Ok(pb::Direction::Egress) => Some(rs::Direction::Egress),
        _ => None,
    }
}

fn direction_from(field: &'static str, v: i32) -> Result<rs::Direction> {
    direction_of(v).ok_or(ConvertError::Enum { field, value: v })
}

fn protocol_to(p: Option<rs::Protocol>) -> pb::Protocol {
    match p {
        None => pb::Protocol::Any,
        Some(rs::Protocol::Tcp) => pb::Protocol::Tcp,
        Some(rs::Protocol::Udp) => pb::Protocol::Udp,
        Some(rs::Protocol::Sctp) => pb::Protocol::Sctp,
        Some(rs::Protocol::Icmp) => pb::Protocol::Icmp,
        Some(rs::Protocol::Icmpv6) => pb::Protocol::Icmpv6,
    }
}

fn protocol_from(v: i32) -> Result<Option<rs::Protocol>> {
    Ok(match pb::Protocol::try_from(v) {
        Ok(pb::Protocol::Any) => None,
        Ok(pb::Protocol::Tcp) => Some(rs::Protocol::Tcp),
        Ok(pb::Protocol::Udp) => Some(rs::Protocol::Udp),
        Ok(pb::Protocol::Sctp) => Some(rs::Protocol::Sctp),
        Ok(pb::Protocol::Icmp) => Some(rs::Protocol::Icmp),
        Ok(pb::Protocol::Icmpv6) => Some(rs::Protocol::Icmpv6),
        Err(_) => {
            return Err(ConvertError::Enum {
                field: "policy entry protocol",
                value: v,
            });
        }
    })
}

fn entry_to(e: &rs::PolicyEntry) -> pb::PolicyEntry {
    pb::PolicyEntry {
        peer: e.peer,
        protocol: protocol_to(e.protocol) as i32,
        first_port: e.ports.first as u32,
        last_port: e.ports.last as u32,
        tier: match e.tier {
            rs::Tier::Quarantine => pb::Tier::Quarantine,
            rs::Tier::Admin => pb::Tier::Admin,
            rs::Tier::Application => pb::Tier::Application,
            rs::Tier::Baseline => pb::Tier::Baseline,
        } as i32,
        priority: e.priority as u32,
        action: match e.action {
            rs::Action::Allow => pb::Action::Allow,
            rs::Action::Deny => pb::Action::Deny,
            rs::Action::Pass => pb::Action::Pass,
        } as i32,
        stage: match e.stage {
            rs::Stage::Enforced => pb::Stage::Enforced,
            rs::Stage::Staged => pb::Stage::Staged,
            rs::Stage::Superseded => pb::Stage::Superseded,
        } as i32,
        rule: e.rule,
    }
}

fn entry_from(e: &pb::PolicyEntry) -> Result<rs::PolicyEntry> {
    let first = u16_of("policy entry first_port", e.first_port)?;
    let last = u16_of("policy entry last_port", e.last_port)?;
    if first > last {
        return Err(ConvertError::Range {
            field: "policy entry first_port",
            value: e.first_port,
            max: e.last_port,
        });
    }
    Ok(rs::PolicyEntry {
        peer: e.peer,
        protocol: protocol_from(e.protocol)?,
        ports: rs::PortRange { first, last },
        tier: match pb::Tier::try_from(e.tier) {
            Ok(pb::Tier::Quarantine) => rs::Tier::Quarantine,
            Ok(pb::Tier::Admin) => rs::Tier::Admin,
            Ok(pb::Tier::Application) => rs::Tier::Application,
            Ok(pb::Tier::Baseline) => rs::Tier::Baseline,
            _ => {
                return Err(ConvertError::Enum {
                    field: "policy entry tier",
                    value: e.tier,
                });
            }
        },
        priority: u16_of("policy entry priority", e.priority)?,
        action: match pb::Action::try_from(e.action) {
            Ok(pb::Action::Allow) => rs::Action::Allow,
            Ok(pb::Action::Deny) => rs::Action::Deny,
            Ok(pb::Action::Pass) => rs::Action::Pass,
            _ => {
                return Err(ConvertError::Enum {
                    field: "policy entry action",
                    value: e.action,
                });
            }
        },
        stage: match pb::Stage::try_from(e.stage) {
            Ok(pb::Stage::Enforced) => rs::Stage::Enforced,
            Ok(pb::Stage::Staged) => rs::Stage::Staged,
            Ok(pb::Stage::Superseded) => rs::Stage::Superseded,
            _ => {
                return Err(ConvertError::Enum {
                    field: "policy entry stage",
                    value: e.stage,
                });
            }
        },
        rule: e.rule,
    })
}

fn entries_from(list: &[pb::PolicyEntry]) -> Result<Vec<rs::PolicyEntry>> {
    list.iter().map(entry_from).collect()
}

fn direction_policy_to(d: &rs::DirectionPolicy) -> pb::DirectionPolicy {
    pb::DirectionPolicy {
        isolated_by: d.isolated_by,
        staged_isolated_by: d.staged_isolated_by,
        entries: d.entries.iter().map(entry_to).collect(),
    }
}

fn direction_policy_from(d: Option<&pb::DirectionPolicy>) -> Result<rs::DirectionPolicy> {
    // An absent direction is one without policy, as in the contract's default.
    let Some(d) = d else {
        return Ok(rs::DirectionPolicy::default());
    };
    Ok(rs::DirectionPolicy {
        isolated_by: d.isolated_by,
        staged_isolated_by: d.staged_isolated_by,
        entries: entries_from(&d.entries)?,
    })
}

pub(crate) fn policy_to(p: &rs::EndpointPolicy) -> pb::EndpointPolicy {
    pb::EndpointPolicy {
        ingress: Some(direction_policy_to(&p.ingress)),
        egress: Some(direction_policy_to(&p.egress)),
    }
}

fn policy_from(p: &pb::EndpointPolicy) -> Result<rs::EndpointPolicy> {
    Ok(rs::EndpointPolicy {
        ingress: direction_policy_from(p.ingress.as_ref())?,
        egress: direction_policy_from(p.egress.as_ref())?,
    })
}

pub(crate) fn endpoint_to(e: &rs::Endpoint) -> pb::Endpoint {
    pb::Endpoint {
        id: e.id,
        namespace: e.namespace.clone(),
        pod: e.pod.clone(),
        workload: e.workload.clone(),
        identity: e.identity,
        ips: e.ips.iter().map(addr_bytes).collect(),
        interface: e.interface.clone(),
        quarantined: e.quarantined,
        policy: e.policy,
    }
}

fn endpoint_from(e: &pb::Endpoint) -> Result<rs::Endpoint> {
    Ok(rs::Endpoint {
        id: e.id,
        namespace: e.namespace.clone(),
        pod: e.pod.clone(),
        workload: e.workload.clone(),
        identity: e.identity,
        ips: e
            .ips
            .iter()
            .map(|b| addr("endpoint ips", b))
            .collect::<Result<_>>()?,
        interface: e.interface.clone(),
        quarantined: e.quarantined,
        policy: e.policy,
    })
}

pub(crate) fn ipcache_to(e: &rs::IpCacheEntry) -> pb::IpCacheEntry {
    pb::IpCacheEntry {
        cidr: Some(cidr_to(&e.cidr)),
        identity: e.identity,
        quarantined: e.quarantined,
        quarantine_allow: e.quarantine_allow.clone(),
    }
}

fn ipcache_from(e: &pb::IpCacheEntry) -> Result<rs::IpCacheEntry> {
    let cidr = e.cidr.as_ref().ok_or(ConvertError::Missing {
        field: "ipcache entry cidr",
    })?;
    Ok(rs::IpCacheEntry {
        cidr: cidr_from("ipcache entry cidr", cidr)?,
        identity: e.identity,
        quarantined: e.quarantined,
        quarantine_allow: e.quarantine_allow.clone(),
    })
}

pub fn rule_kind_to(k: &rs::RuleKind) -> pb::RuleKind {
    match k {
        rs::RuleKind::NetworkPolicy => pb::RuleKind::NetworkPolicy,
        rs::RuleKind::ClusterNetworkPolicy => pb::RuleKind::ClusterNetworkPolicy,
        rs::RuleKind::ServicePolicy => pb::RuleKind::ServicePolicy,
        rs::RuleKind::Quarantine => pb::RuleKind::Quarantine,
        rs::RuleKind::Default => pb::RuleKind::Default,
        rs::RuleKind::StagedNetworkPolicy => pb::RuleKind::StagedNetworkPolicy,
        rs::RuleKind::StagedClusterNetworkPolicy => pb::RuleKind::StagedClusterNetworkPolicy,
    }
}

pub(crate) fn rule_to(r: &rs::RuleRef) -> pb::RuleRef {
    pb::RuleRef {
        kind: rule_kind_to(&r.kind) as i32,
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        direction: direction_to(r.direction) as i32,
        index: r.index,
    }
}

/// The rule kind of a known, specified value.
pub fn rule_kind_of(v: i32) -> Option<rs::RuleKind> {
    match pb::RuleKind::try_from(v) {
        Ok(pb::RuleKind::NetworkPolicy) => Some(rs::RuleKind::NetworkPolicy),
        Ok(pb::RuleKind::ClusterNetworkPolicy) => Some(rs::RuleKind::ClusterNetworkPolicy),
        Ok(pb::RuleKind::ServicePolicy) => Some(rs::RuleKind::ServicePolicy),
        Ok(pb::RuleKind::Quarantine) => Some(rs::RuleKind::Quarantine),
        Ok(pb::RuleKind::Default) => Some(rs::RuleKind::Default),
        Ok(pb::RuleKind::StagedNetworkPolicy) => Some(rs::RuleKind::StagedNetworkPolicy),
        Ok(pb::RuleKind::StagedClusterNetworkPolicy) => {
            Some(rs::RuleKind::StagedClusterNetworkPolicy)
        }
        _ => None,
    }
}

fn rule_from(r: &pb::RuleRef) -> Result<rs::RuleRef> {
    Ok(rs::RuleRef {
        kind: rule_kind_of(r.kind).ok_or(ConvertError::Enum {
            field: "rule kind",
            value: r.kind,
        })?,
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        direction: direction_from("rule direction", r.direction)?,
        index: r.index,
    })
}

fn map_from<K: Ord + Copy, A, B>(
    m: &BTreeMap<K, A>,
    f: impl Fn(&A) -> Result<B>,
) -> Result<BTreeMap<K, B>> {
    m.iter().map(|(k, v)| Ok((*k, f(v)?))).collect()
}

impl From<&rs::RuleSet> for pb::RuleSet {
    fn from(r: &rs::RuleSet) -> pb::RuleSet {
        pb::RuleSet {
            node: r.node.clone(),
            version: r.version,
            endpoints: r.endpoints.iter().map(endpoint_to).collect(),
            policies: r.policies.iter().map(|(k, p)| (*k, policy_to(p))).collect(),
            ipcache: r.ipcache.iter().map(ipcache_to).collect(),
            rules: r.rules.iter().map(|(k, v)| (*k, rule_to(v))).collect(),
            names: r.names.iter().map(name_entry_to).collect(),
            dns_resolvers: r.dns_resolvers.iter().map(addr_bytes).collect(),
        }
    }
}

impl TryFrom<&pb::RuleSet> for rs::RuleSet {
    type Error = ConvertError;

    fn try_from(r: &pb::RuleSet) -> Result<rs::RuleSet> {
        Ok(rs::RuleSet {
            node: r.node.clone(),
            version: r.version,
            endpoints: r
                .endpoints
                .iter()
                .map(endpoint_from)
                .collect::<Result<_>>()?,
            policies: map_from(&r.policies, policy_from)?,
            ipcache: r.ipcache.iter().map(ipcache_from).collect::<Result<_>>()?,
            rules: map_from(&r.rules, rule_from)?,
            names: name_entries_from("ruleset names", &r.names)?,
            dns_resolvers: addrs("ruleset dns_resolvers", &r.dns_resolvers)?,
        })
    }
}

fn direction_delta_to(d: &rs::DirectionDelta) -> pb::DirectionDelta {
    pb::DirectionDelta {
        isolated_by: d.isolated_by,
        staged_isolated_by: d.staged_isolated_by,
        removed: d.removed.iter().map(entry_to).collect(),
        added: d.added.iter().map(entry_to).collect(),
    }
}

fn direction_delta_from(d: Option<&pb::DirectionDelta>) -> Result<rs::DirectionDelta> {
    let d = d.ok_or(ConvertError::Missing {
        field: "policy delta direction",
    })?;
    Ok(rs::DirectionDelta {
        isolated_by: d.isolated_by,
        staged_isolated_by: d.staged_isolated_by,
        removed: entries_from(&d.removed)?,
        added: entries_from(&d.added)?,
    })
}

pub(crate) fn policy_delta_to(p: &rs::PolicyDelta) -> pb::PolicyDelta {
    pb::PolicyDelta {
        ingress: Some(direction_delta_to(&p.ingress)),
        egress: Some(direction_delta_to(&p.egress)),
    }
}

fn policy_delta_from(p: &pb::PolicyDelta) -> Result<rs::PolicyDelta> {
    Ok(rs::PolicyDelta {
        ingress: direction_delta_from(p.ingress.as_ref())?,
        egress: direction_delta_from(p.egress.as_ref())?,
    })
}

pub(crate) fn endpoint_delta_to(e: &rs::EndpointDelta) -> pb::EndpointDelta {
    pb::EndpointDelta {
        id: e.id,
        identity: e.identity,
        ips: e.ips.iter().map(addr_bytes).collect(),
        workload: e.workload.clone(),
        policy: e.policy,
        quarantined: e.quarantined,
    }
}

fn endpoint_delta_from(e: &pb::EndpointDelta) -> Result<rs::EndpointDelta> {
    Ok(rs::EndpointDelta {
        id: e.id,
        identity: e.identity,
        ips: e
            .ips
            .iter()
            .map(|b| addr("endpoint delta ips", b))
            .collect::<Result<_>>()?,
        workload: e.workload.clone(),
        policy: e.policy,
        quarantined: e.quarantined,
    })
}

impl From<&rs::NodeDelta> for pb::NodeDelta {
    fn from(d: &rs::NodeDelta) -> pb::NodeDelta {
        pb::NodeDelta {
            node: d.node.clone(),
            from_version: d.from_version,
            version: d.version,
            node_removed: d.node_removed,
            endpoints_removed: d.endpoints_removed.clone(),
            endpoints_added: d.endpoints_added.iter().map(endpoint_to).collect(),
            endpoints_changed: d.endpoints_changed.iter().map(endpoint_delta_to).collect(),
            policies_removed: d.policies_removed.clone(),
            policies_added: d
                .policies_added
                .iter()
                .map(|(k, p)| (*k, policy_to(p)))
                .collect(),
            policies_changed: d
                .policies_changed
                .iter()
                .map(|(k, p)| (*k, policy_delta_to(p)))
                .collect(),
            ipcache_removed: d.ipcache_removed.iter().map(cidr_to).collect(),
            ipcache_upserted: d.ipcache_upserted.iter().map(ipcache_to).collect(),
            rules_removed: d.rules_removed.clone(),
            rules_upserted: d
                .rules_upserted
                .iter()
                .map(|(k, v)| (*k, rule_to(v)))
                .collect(),
            names_removed: d.names_removed.clone(),
            names_added: d.names_added.iter().map(name_entry_to).collect(),
            dns_resolvers: d.dns_resolvers.as_ref().map(|a| pb::AddressList {
                addrs: a.iter().map(addr_bytes).collect(),
            }),
        }
    }
}

impl TryFrom<&pb::NodeDelta> for rs::NodeDelta {
    type Error = ConvertError;

    fn try_from(d: &pb::NodeDelta) -> Result<rs::NodeDelta> {
        Ok(rs::NodeDelta {
            node: d.node.clone(),
            from_version: d.from_version,
            version: d.version,
            node_removed: d.node_removed,
            endpoints_removed: d.endpoints_removed.clone(),
            endpoints_added: d
                .endpoints_added
                .iter()
                .map(endpoint_from)
                .collect::<Result<_>>()?,
            endpoints_changed: d
                .endpoints_changed
                .iter()
                .map(endpoint_delta_from)
                .collect::<Result<_>>()?,
            policies_removed: d.policies_removed.clone(),
            policies_added: map_from(&d.policies_added, policy_from)?,
            policies_changed: map_from(&d.policies_changed, policy_delta_from)?,
            ipcache_removed: d
                .ipcache_removed
                .iter()
                .map(|c| cidr_from("ipcache_removed", c))
                .collect::<Result<_>>()?,
            ipcache_upserted: d
                .ipcache_upserted
                .iter()
                .map(ipcache_from)
                .collect::<Result<_>>()?,
            rules_removed: d.rules_removed.clone(),
            rules_upserted: map_from(&d.rules_upserted, rule_from)?,
            names_removed: d.names_removed.clone(),
            names_added: name_entries_from("names_added", &d.names_added)?,
            dns_resolvers: d
                .dns_resolvers
                .as_ref()
                .map(|a| addrs("delta dns_resolvers", &a.addrs))
                .transpose()?,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(|a| IpAddr::V4(a.into())),
            any::<[u8; 16]>().prop_map(|a| IpAddr::V6(a.into())),
        ]
    }

    fn net() -> impl Strategy<Value = IpNetwork> {
        (ip(), any::<u8>()).prop_map(|(ip, p)| {
            let max = if ip.is_ipv4() { 32 } else { 128 };
            IpNetwork::new(ip, p % (max + 1)).expect("prefix in range")
        })
    }

    fn entry() -> impl Strategy<Value = rs::PolicyEntry> {
        (
            any::<u32>(),
            prop::option::of(prop::sample::select(rs::Protocol::ALL.to_vec())),
            any::<u16>(),
            any::<u16>(),
            prop::sample::select(vec![
                rs::Tier::Quarantine,
                rs::Tier::Admin,
                rs::Tier::Application,
                rs::Tier::Baseline,
            ]),
            any::<u16>(),
            prop::sample::select(vec![rs::Action::Allow, rs::Action::Deny, rs::Action::Pass]),
            prop::sample::select(vec![
                rs::Stage::Enforced,
                rs::Stage::Staged,
                rs::Stage::Superseded,
            ]),
            any::<u32>(),
        )
            .prop_map(
                |(peer, protocol, a, b, tier, priority, action, stage, rule)| rs::PolicyEntry {
                    peer,
                    protocol,
                    ports: rs::PortRange {
                        first: a.min(b),
                        last: a.max(b),
                    },
                    tier,
                    priority,
                    action,
                    stage,
                    rule,
                },
            )
    }

    fn direction() -> impl Strategy<Value = rs::DirectionPolicy> {
        (
            prop::option::of(any::<u32>()),
            prop::option::of(any::<u32>()),
            prop::collection::vec(entry(), 0..4),
        )
            .prop_map(
                |(isolated_by, staged_isolated_by, entries)| rs::DirectionPolicy {
                    isolated_by,
                    staged_isolated_by,
                    entries,
                },
            )
    }

    fn policy() -> impl Strategy<Value = rs::EndpointPolicy> {
        (direction(), direction())
            .prop_map(|(ingress, egress)| rs::EndpointPolicy { ingress, egress })
    }

    fn endpoint() -> impl Strategy<Value = rs::Endpoint> {
        (
            any::<u32>(),
            "[a-z0-9-]{1,12}",
            "[a-z0-9-]{1,12}",
            prop::option::of("[A-Za-z]{1,8}/[a-z]{1,8}"),
            any::<u32>(),
            prop::collection::vec(ip(), 0..3),
            prop::option::of("[a-z0-9]{1,15}"),
            any::<bool>(),
            any::<u32>(),
        )
            .prop_map(
                |(id, namespace, pod, workload, identity, ips, interface, quarantined, policy)| {
                    rs::Endpoint {
                        id,
                        namespace,
                        pod,
                        workload,
                        identity,
                        ips,
                        interface,
                        quarantined,
                        policy,
                    }
                },
            )
    }

    fn ipcache() -> impl Strategy<Value = rs::IpCacheEntry> {
        (
            net(),
            any::<u32>(),
            any::<bool>(),
            prop::collection::vec(any::<u32>(), 0..3),
        )
            .prop_map(
                |(cidr, identity, quarantined, quarantine_allow)| rs::IpCacheEntry {
                    cidr,
                    identity,
                    quarantined,
                    quarantine_allow,
                },
            )
    }

    fn rule() -> impl Strategy<Value = rs::RuleRef> {
        (
            prop::sample::select(rs::RuleKind::ALL.to_vec()),
            "[a-z]{0,8}",
            "[a-z]{1,8}",
            prop::sample::select(rs::Direction::ALL.to_vec()),
            prop::option::of(any::<u32>()),
        )
            .prop_map(|(kind, namespace, name, direction, index)| rs::RuleRef {
                kind,
                namespace,
                name,
                direction,
                index,
            })
    }

    fn ruleset() -> impl Strategy<Value = rs::RuleSet> {
        (
            "[a-z0-9-]{1,12}",
            any::<u64>(),
            prop::collection::vec(endpoint(), 0..4),
            prop::collection::btree_map(any::<u32>(), policy(), 0..3),
            prop::collection::vec(ipcache(), 0..5),
            prop::collection::btree_map(any::<u32>(), rule(), 0..4),
            prop::collection::vec(super::names::tests::name_entry(), 0..3),
            prop::collection::btree_set(ip(), 0..3),
        )
            .prop_map(
                |(node, version, endpoints, policies, ipcache, rules, names, resolvers)| {
                    rs::RuleSet {
                        node,
                        version,
                        endpoints,
                        policies,
                        ipcache,
                        rules,
                        names,
                        dns_resolvers: resolvers.into_iter().collect(),
                    }
                },
            )
    }

    fn direction_delta() -> impl Strategy<Value = rs::DirectionDelta> {
        (
            prop::option::of(any::<u32>()),
            prop::option::of(any::<u32>()),
            prop::collection::vec(entry(), 0..3),
            prop::collection::vec(entry(), 0..3),
        )
            .prop_map(|(isolated_by, staged_isolated_by, removed, added)| {
                rs::DirectionDelta {
                    isolated_by,
                    staged_isolated_by,
                    removed,
                    added,
                }
            })
    }

    pub(crate) fn node_delta() -> impl Strategy<Value = rs::NodeDelta> {
        let changed = (
            any::<u32>(),
            any::<u32>(),
            prop::collection::vec(ip(), 0..3),
            prop::option::of("[a-z]{1,8}"),
            any::<u32>(),
            any::<bool>(),
        )
            .prop_map(|(id, identity, ips, workload, policy, quarantined)| {
                rs::EndpointDelta {
                    id,
                    identity,
                    ips,
                    workload,
                    policy,
                    quarantined,
                }
            });
        let policy_delta = (direction_delta(), direction_delta())
            .prop_map(|(ingress, egress)| rs::PolicyDelta { ingress, egress });
        (
            ("[a-z0-9-]{1,12}", any::<u64>(), any::<u64>(), any::<bool>()),
            (
                prop::collection::vec(any::<u32>(), 0..3),
                prop::collection::vec(endpoint(), 0..3),
                prop::collection::vec(changed, 0..3),
            ),
            (
                prop::collection::vec(any::<u32>(), 0..3),
                prop::collection::btree_map(any::<u32>(), policy(), 0..3),
                prop::collection::btree_map(any::<u32>(), policy_delta, 0..3),
            ),
            (
                prop::collection::vec(net(), 0..3),
                prop::collection::vec(ipcache(), 0..3),
                prop::collection::vec(any::<u32>(), 0..3),
                prop::collection::btree_map(any::<u32>(), rule(), 0..3),
            ),
            (
                prop::collection::vec(any::<u32>(), 0..3),
                prop::collection::vec(super::names::tests::name_entry(), 0..3),
                prop::option::of(prop::collection::btree_set(ip(), 0..3)),
            ),
        )
            .prop_map(
                |(
                    (node, from_version, version, node_removed),
                    (endpoints_removed, endpoints_added, endpoints_changed),
                    (policies_removed, policies_added, policies_changed),
                    (ipcache_removed, ipcache_upserted, rules_removed, rules_upserted),
                    (names_removed, names_added, resolvers),
                )| rs::NodeDelta {
                    node,
                    from_version,
                    version,
                    node_removed,
                    endpoints_removed,
                    endpoints_added,
                    endpoints_changed,
                    policies_removed,
                    policies_added,
                    policies_changed,
                    ipcache_removed,
                    ipcache_upserted,
                    rules_removed,
                    rules_upserted,
                    names_removed,
                    names_added,
                    dns_resolvers: resolvers.map(|r| r.into_iter().collect()),
                },
            )
    }

    proptest! {
        #[test]
        fn a_rule_set_survives_the_wire(r in ruleset()) {
            use prost::Message;
            let bytes = pb::RuleSet::from(&r).encode_to_vec();
            let back = rs::RuleSet::try_from(&pb::RuleSet::decode(bytes.as_slice()).expect("decodes"));
            prop_assert_eq!(back, Ok(r));
        }

        #[test]
        fn a_delta_survives_the_wire(d in node_delta()) {
            use prost::Message;
            let bytes = pb::NodeDelta::from(&d).encode_to_vec();
            let back = rs::NodeDelta::try_from(&pb::NodeDelta::decode(bytes.as_slice()).expect("decodes"));
            prop_assert_eq!(back, Ok(d));
        }

        /// Whatever bytes arrive, decoding gives a rule set or an error, never a panic.
        #[test]
        fn garbage_is_an_error_or_a_rule_set(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            use prost::Message;
            if let Ok(m) = pb::RuleSet::decode(bytes.as_slice()) {
                let _ = rs::RuleSet::try_from(&m);
            }
            if let Ok(m) = pb::NodeDelta::decode(bytes.as_slice()) {
                let _ = rs::NodeDelta::try_from(&m);
            }
        }
    }

    fn one_entry(e: pb::PolicyEntry) -> pb::RuleSet {
        pb::RuleSet {
            policies: [(
                1,
                pb::EndpointPolicy {
                    ingress: Some(pb::DirectionPolicy {
                        entries: vec![e],
                        ..Default::default()
                    }),
                    egress: None,
                },
            )]
            .into(),
            ..Default::default()
        }
    }

    fn good_entry() -> pb::PolicyEntry {
        entry_to(&rs::PolicyEntry {
            peer: 7,
            protocol: Some(rs::Protocol::Tcp),
            ports: rs::PortRange::single(80),
            tier: rs::Tier::Application,
            priority: 0,
            action: rs::Action::Allow,
            stage: rs::Stage::Enforced,
            rule: 3,
        })
    }

    #[test]
    fn what_the_contract_cannot_hold_is_refused_by_name() {
        let decode = |m: &pb::RuleSet| {
            rs::RuleSet::try_from(m)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert!(decode(&one_entry(good_entry())).is_ok());
        let cases: Vec<(pb::RuleSet, &str)> = vec![
            (
                one_entry(pb::PolicyEntry {
                    first_port: 70000,
                    ..good_entry()
                }),
                "first_port",
            ),
            (
                one_entry(pb::PolicyEntry {
                    first_port: 90,
                    last_port: 80,
                    ..good_entry()
                }),
                "first_port",
            ),
            (
                one_entry(pb::PolicyEntry {
                    priority: 1 << 16,
                    ..good_entry()
                }),
                "priority",
            ),
            (
                one_entry(pb::PolicyEntry {
                    tier: 9,
                    ..good_entry()
                }),
                "tier",
            ),
            (
                one_entry(pb::PolicyEntry {
                    tier: 0,
                    ..good_entry()
                }),
                "tier",
            ),
            (
                one_entry(pb::PolicyEntry {
                    action: 7,
                    ..good_entry()
                }),
                "action",
            ),
            (
                one_entry(pb::PolicyEntry {
                    protocol: 6,
                    ..good_entry()
                }),
                "protocol",
            ),
            (
                pb::RuleSet {
                    endpoints: vec![pb::Endpoint {
                        ips: vec![vec![10, 0, 0]],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                "4 or 16 bytes, not 3",
            ),
            (
                pb::RuleSet {
                    ipcache: vec![pb::IpCacheEntry {
                        cidr: Some(pb::Cidr {
                            addr: vec![10, 0, 0, 0],
                            prefix: 33,
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                "/33",
            ),
            (
                pb::RuleSet {
                    ipcache: vec![pb::IpCacheEntry::default()],
                    ..Default::default()
                },
                "cidr is missing",
            ),
            (
                pb::RuleSet {
                    rules: [(
                        1,
                        pb::RuleRef {
                            kind: 1,
                            direction: 3,
                            ..Default::default()
                        },
                    )]
                    .into(),
                    ..Default::default()
                },
                "rule direction",
            ),
        ];
        for (m, says) in cases {
            let err = decode(&m).expect_err(says);
            assert!(err.contains(says), "{err:?} should say {says:?}");
        }
    }
}
