//! Writes a node's [`RuleSet`] into the kernel maps.
//!
//! Per endpoint the switch is atomic: the new policy keys are written under a fresh policy id,
//! then the endpoint's `ENDPOINTS` value is replaced in one map update (it names the policy id
//! and carries the defaults and flags), and only then are the old keys removed. A packet sees
//! either the old policy or the new one, never a mix.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    time::{Duration, Instant},
};

use aya::maps::lpm_trie::Key;
use bulkhead_common::{
    Config, EndpointAddrKey, EndpointInfo, IPCACHE_QUARANTINED, IpCacheValue, PolicyKey,
    endpoint_flags,
};
use bulkhead_controller::ruleset::{Direction, Endpoint, RuleSet};
use ipnetwork::IpNetwork;

use crate::{
    loader::{Dataplane, LoadError},
    policy_map::{PolicyMapEntry, compile_direction, default_value},
};

/// `::ffff:a.b.c.d` for IPv4, the address itself for IPv6: the form addresses take in keys.
pub fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> SyncError {
    move |source| SyncError::Map { map, source }
}

/// What one apply did.
#[derive(Debug, Clone, Default)]
pub struct ApplyReport {
    pub version: u64,
    /// Endpoints whose maps were (re)written.
    pub endpoints_written: usize,
    pub endpoints_removed: usize,
    /// Endpoints whose interface does not exist (yet): retried on the next apply.
    pub missing_interfaces: Vec<String>,
    /// Endpoints locked down because their policy did not fit in the maps.
    pub locked_down: Vec<String>,
    pub policy_entries_written: usize,
    pub duration: Duration,
}

#[derive(Debug, Clone, PartialEq)]
struct EndpointState {
    ifname: String,
    endpoint_id: u32,
    policy_id: u32,
    info: EndpointInfo,
    keys: Vec<(u32, PolicyKey)>,
    /// The compiled content, to skip rewriting an unchanged endpoint.
    fingerprint: Vec<PolicyMapEntry>,
    addrs: Vec<[u8; 16]>,
}

/// Finds the host-side interface of an endpoint.
pub trait InterfaceResolver {
    fn interface(&self, endpoint: &Endpoint) -> Option<String>;
}

/// Uses the interface named in the rule set, else the route to the endpoint's first address.
pub struct RouteResolver;

impl InterfaceResolver for RouteResolver {
    fn interface(&self, endpoint: &Endpoint) -> Option<String> {
        if let Some(i) = &endpoint.interface {
            return Some(i.clone());
        }
        let ip = endpoint.ips.first()?;
        let out = std::process::Command::new("ip")
            .args(["-j", "route", "get", &ip.to_string()])
            .output()
            .ok()?;
        let routes: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let dev = routes.get(0)?.get("dev")?.as_str()?;
        // A route over the loopback means the address is local, not behind a veth.
        (dev != "lo").then(|| dev.to_string())
    }
}

pub struct Enforcer {
    dataplane: Dataplane,
    endpoints: HashMap<u32, EndpointState>,
    ipcache: BTreeMap<IpNetwork, IpCacheValue>,
    next_policy_id: u32,
    generation: u32,
    realized_version: Option<u64>,
}

fn ifindex(ifname: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(ifname).ok()
}

fn prefix_key(net: &IpNetwork) -> (bool, u32) {
    (net.is_ipv4(), net.prefix() as u32)
}

impl Enforcer {
    /// Takes over a loaded data plane. Keys left by an earlier agent are found in the pinned
    /// maps and cleaned up after the first apply; until then they keep enforcing.
    pub fn new(mut dataplane: Dataplane) -> Result<Self, SyncError> {
        let mut max_policy_id = 0;
        {
            let endpoints = dataplane.endpoints()?;
            for item in endpoints.iter() {
                let (_, info) = item.map_err(map_err("ENDPOINTS"))?;
                max_policy_id = max_policy_id.max(info.policy_id);
            }
        }
        let generation = dataplane
            .config()?
            .get(&0, 0)
            .map(|c| c.generation)
            .unwrap_or(0);
        Ok(Enforcer {
            dataplane,
            endpoints: HashMap::new(),
            ipcache: BTreeMap::new(),
            next_policy_id: max_policy_id + 1,
            generation,
            realized_version: None,
        })
    }

    pub fn dataplane(&mut self) -> &mut Dataplane {
        &mut self.dataplane
    }

    /// Policy keys this agent has in the `POLICY` map.
    pub fn policy_key_count(&self) -> usize {
        self.endpoints.values().map(|s| s.keys.len()).sum()
    }

    pub fn realized_version(&self) -> Option<u64> {
        self.realized_version
    }

    /// Applies `ruleset`: endpoints, addresses, ipcache and policy keys, then bumps the policy
    /// generation so tracked connections are re-checked against the new policy.
    pub fn apply(
        &mut self,
        ruleset: &RuleSet,
        resolver: &dyn InterfaceResolver,
    ) -> Result<ApplyReport, SyncError> {
        let started = Instant::now();
        let first_apply = self.realized_version.is_none();
        let mut report = ApplyReport {
            version: ruleset.version,
            ..Default::default()
        };

        // 1. ipcache additions and changes first: new endpoints' peers must resolve.
        let quarantined: BTreeSet<IpAddr> = ruleset
            .endpoints
            .iter()
            .filter(|e| e.quarantined)
            .flat_map(|e| e.ips.iter().copied())
            .collect();
        let mut wanted: BTreeMap<IpNetwork, IpCacheValue> = BTreeMap::new();
        for entry in &ruleset.ipcache {
            let q = entry.cidr.prefix() == if entry.cidr.is_ipv4() { 32 } else { 128 }
                && quarantined.contains(&entry.cidr.ip());
            wanted.insert(
                entry.cidr,
                IpCacheValue {
                    identity: entry.identity,
                    flags: if q { IPCACHE_QUARANTINED } else { 0 },
                },
            );
        }
        for (net, value) in &wanted {
            if self.ipcache.get(net) != Some(value) {
                self.write_ipcache(net, Some(*value))?;
            }
        }

        // 2. endpoints, each switched atomically.
        let mut seen: BTreeSet<u32> = BTreeSet::new();
        for ep in &ruleset.endpoints {
            let Some(ifname) = resolver.interface(ep) else {
                report.missing_interfaces.push(ep.name());
                continue;
            };
            let Some(index) = ifindex(&ifname) else {
                report
                    .missing_interfaces
                    .push(format!("{} ({ifname})", ep.name()));
                continue;
            };
            seen.insert(index);
            match self.write_endpoint(index, &ifname, ep)? {
                WriteOutcome::Unchanged => {}
                WriteOutcome::Written(n) => {
                    report.endpoints_written += 1;
                    report.policy_entries_written += n;
                }
                WriteOutcome::LockedDown => {
                    report.endpoints_written += 1;
                    report.locked_down.push(ep.name());
                }
            }
        }

        // 3. endpoints that left the node.
        let gone: Vec<u32> = self
            .endpoints
            .keys()
            .filter(|i| !seen.contains(i))
            .copied()
            .collect();
        for index in gone {
            self.remove_endpoint(index)?;
            report.endpoints_removed += 1;
        }

        // 4. stale ipcache entries.
        let stale: Vec<IpNetwork> = self
            .ipcache
            .keys()
            .filter(|n| !wanted.contains_key(n))
            .copied()
            .collect();
        for net in stale {
            self.write_ipcache(&net, None)?;
        }

        if first_apply {
            self.remove_foreign_state(&seen)?;
        }

        // 5. tracked connections are re-checked on their next forward packet.
        self.generation = self.generation.wrapping_add(1);
        let mut config = self.dataplane.config()?;
        let mut cfg = config.get(&0, 0).unwrap_or_default();
        cfg.generation = self.generation;
        config.set(0, cfg, 0).map_err(map_err("CONFIG"))?;

        self.realized_version = Some(ruleset.version);
        report.duration = started.elapsed();
        Ok(report)
    }

    fn write_ipcache(
        &mut self,
        net: &IpNetwork,
        value: Option<IpCacheValue>,
    ) -> Result<(), SyncError> {
        let (v4, prefix) = prefix_key(net);
        match (net.ip(), v4) {
            (IpAddr::V4(ip), true) => {
                let mut m = self.dataplane.ipcache_v4()?;
                let key = Key::new(prefix, ip.octets());
                match value {
                    Some(v) => m.insert(&key, v, 0).map_err(map_err("IPCACHE_V4"))?,
                    None => {
                        let _ = m.remove(&key);
                    }
                }
            }
            (IpAddr::V6(ip), false) => {
                let mut m = self.dataplane.ipcache_v6()?;
                let key = Key::new(prefix, ip.octets());
                match value {
                    Some(v) => m.insert(&key, v, 0).map_err(map_err("IPCACHE_V6"))?,
                    None => {
                        let _ = m.remove(&key);
                    }
                }
            }
            _ => unreachable!("ipnetwork keeps address and family together"),
        }
        match value {
            Some(v) => self.ipcache.insert(*net, v),
            None => self.ipcache.remove(net),
        };
        Ok(())
    }

    fn write_endpoint(
        &mut self,
        index: u32,
        ifname: &str,
        ep: &Endpoint,
    ) -> Result<WriteOutcome, SyncError> {
        let policy_id = self.next_policy_id;
        let mut compiled = compile_direction(policy_id, Direction::Ingress, &ep.ingress);
        compiled.extend(compile_direction(policy_id, Direction::Egress, &ep.egress));
        let mut flags = endpoint_flags::ENFORCE_INGRESS
            | endpoint_flags::ENFORCE_EGRESS
            | endpoint_flags::ANTI_SPOOF;
        if ep.quarantined {
            flags |= endpoint_flags::QUARANTINED;
        }
        let mut info = EndpointInfo {
            endpoint_id: ep.id,
            identity: ep.identity,
            policy_id,
            flags,
            default_ingress: default_value(&ep.ingress),
            default_egress: default_value(&ep.egress),
        };
        let addrs: Vec<[u8; 16]> = ep.ips.iter().map(|ip| addr16(*ip)).collect();
        // Unchanged content (modulo the policy id) needs no rewrite.
        let fingerprint: Vec<PolicyMapEntry> = compiled
            .iter()
            .map(|e| PolicyMapEntry {
                key: PolicyKey {
                    policy_id: 0,
                    ..e.key
                },
                ..*e
            })
            .collect();
        let same_info = EndpointInfo {
            policy_id: 0,
            ..info
        };
        if let Some(old) = self.endpoints.get(&index)
            && old.fingerprint == fingerprint
            && old.addrs == addrs
            && old.ifname == ifname
            && (EndpointInfo {
                policy_id: 0,
                ..old.info
            }) == same_info
        {
            return Ok(WriteOutcome::Unchanged);
        }
        self.next_policy_id = self.next_policy_id.wrapping_add(1).max(1);

        // New keys under the new policy id.
        let mut written: Vec<(u32, PolicyKey)> = Vec::with_capacity(compiled.len());
        let mut full = false;
        {
            let mut policy = self.dataplane.policy()?;
            for e in &compiled {
                let key = Key::new(e.prefix_len, e.key);
                if let Err(err) = policy.insert(&key, e.value, 0) {
                    tracing::error!(
                        endpoint = %ep.name(), error = %err,
                        "policy map is full: locking the endpoint down (deny all) until its policy fits"
                    );
                    full = true;
                    break;
                }
                written.push((e.prefix_len, e.key));
            }
        }
        if full {
            info.flags |= endpoint_flags::LOCKDOWN;
        }

        // Addresses the endpoint may send from.
        {
            let mut m = self.dataplane.endpoint_addrs()?;
            for a in &addrs {
                m.insert(
                    EndpointAddrKey {
                        endpoint_id: ep.id,
                        addr: *a,
                    },
                    1,
                    0,
                )
                .map_err(map_err("ENDPOINT_ADDRS"))?;
            }
        }

        // The switch.
        self.dataplane
            .endpoints()?
            .insert(index, info, 0)
            .map_err(map_err("ENDPOINTS"))?;
        let old = self.endpoints.remove(&index);
        if old.as_ref().is_none_or(|o| o.ifname != ifname) {
            self.dataplane.attach_endpoint(ifname)?;
        }

        // Old keys and addresses go last.
        if let Some(old) = old {
            self.remove_keys(&old.keys)?;
            let mut m = self.dataplane.endpoint_addrs()?;
            for a in old.addrs.iter().filter(|a| !addrs.contains(a)) {
                let _ = m.remove(&EndpointAddrKey {
                    endpoint_id: old.endpoint_id,
                    addr: *a,
                });
            }
        }
        let n = written.len();
        self.endpoints.insert(
            index,
            EndpointState {
                ifname: ifname.to_string(),
                endpoint_id: ep.id,
                policy_id,
                info,
                keys: written,
                fingerprint,
                addrs,
            },
        );
        Ok(if full {
            WriteOutcome::LockedDown
        } else {
            WriteOutcome::Written(n)
        })
    }

    fn remove_keys(&mut self, keys: &[(u32, PolicyKey)]) -> Result<(), SyncError> {
        let mut policy = self.dataplane.policy()?;
        for (prefix, key) in keys {
            let _ = policy.remove(&Key::new(*prefix, *key));
        }
        Ok(())
    }

    fn remove_endpoint(&mut self, index: u32) -> Result<(), SyncError> {
        let Some(old) = self.endpoints.remove(&index) else {
            return Ok(());
        };
        // Detach first so no packet meets a half-removed endpoint.
        self.dataplane.detach_endpoint(&old.ifname);
        let _ = self.dataplane.endpoints()?.remove(&index);
        self.remove_keys(&old.keys)?;
        let mut m = self.dataplane.endpoint_addrs()?;
        for a in &old.addrs {
            let _ = m.remove(&EndpointAddrKey {
                endpoint_id: old.endpoint_id,
                addr: *a,
            });
        }
        Ok(())
    }

    /// After a restart: drops what an earlier agent left that the current rule set does not
    /// have (endpoints, their links, policy keys of other policy ids, ipcache entries).
    fn remove_foreign_state(&mut self, current: &BTreeSet<u32>) -> Result<(), SyncError> {
        let live_ids: BTreeSet<u32> = self.endpoints.values().map(|s| s.policy_id).collect();
        let stale_endpoints: Vec<u32> = {
            let m = self.dataplane.endpoints()?;
            m.keys()
                .flatten()
                .filter(|i| !current.contains(i))
                .collect()
        };
        for index in stale_endpoints {
            let _ = self.dataplane.endpoints()?.remove(&index);
        }
        let attached: Vec<String> = self.dataplane.attached_interfaces();
        let ours: BTreeSet<&str> = self.endpoints.values().map(|s| s.ifname.as_str()).collect();
        for ifname in attached {
            if !ours.contains(ifname.as_str()) {
                self.dataplane.detach_endpoint(&ifname);
            }
        }
        let stale_keys: Vec<Key<PolicyKey>> = {
            let m = self.dataplane.policy()?;
            m.keys()
                .flatten()
                .filter(|k| !live_ids.contains(&k.data().policy_id))
                .collect()
        };
        let mut policy = self.dataplane.policy()?;
        for k in stale_keys {
            let _ = policy.remove(&k);
        }
        Ok(())
    }

    /// Replaces the global data-plane configuration (deny-event rate limit, generation).
    pub fn set_config(&mut self, config: Config) -> Result<(), SyncError> {
        let mut m = self.dataplane.config()?;
        m.set(0, config, 0).map_err(map_err("CONFIG"))
    }
}

enum WriteOutcome {
    Unchanged,
    Written(usize),
    LockedDown,
}
