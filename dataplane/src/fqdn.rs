//! Egress by domain name, the agent's side of what the kernel learns from DNS answers
//! (issue 19): the trusted resolvers, the per-node secret and TTL bounds, the names policies
//! allow (exact and wildcard, each with the controller's name id), and reading and expiring
//! what the programs learned per endpoint. The maps are pinned like every other, so a restarted
//! agent finds the secret, the names and the learned addresses where it left them.
//!
//! Names are hashed with [`bulkhead_common::fqdn::name_hash`], the same code the programs run.

use std::{
    io::Read,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use bulkhead_common::fqdn::{
    FQDN_MAX_IDS, FQDN_NAME_ID_NONE, FqdnConfig, FqdnLearned, FqdnLearnedKeyV4, FqdnLearnedKeyV6,
    NameError, fqdn_stat, name_hash,
};

/// The contract's pattern: what the controller sends in `RuleSet::names`.
pub use bulkhead_ruleset::names::NamePattern;

use crate::loader::{Dataplane, LoadError};

pub const MAP_CONFIG: &str = "FQDN_CONFIG";
pub const MAP_RESOLVERS: &str = "FQDN_RESOLVERS";
pub const MAP_EXACT: &str = "FQDN_EXACT";
pub const MAP_WILDCARD: &str = "FQDN_WILDCARD";
pub const MAP_LEARNED_V4: &str = "FQDN_LEARNED_V4";
pub const MAP_LEARNED_V6: &str = "FQDN_LEARNED_V6";
pub const MAP_STATS: &str = "FQDN_STATS";

#[derive(Debug, thiserror::Error)]
pub enum FqdnError {
    #[error("invalid domain name {name:?}: {reason}")]
    Name { name: String, reason: NameError },
    #[error("name id 0 marks an empty slot; give the controller's id of the name")]
    ReservedId,
    #[error(
        "no per-node secret is configured for name keys; call `ensure_fqdn_config` before writing names"
    )]
    NoSecret,
    #[error("cannot read random bytes for the per-node secret: {0}")]
    Random(std::io::Error),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: MapError },
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> FqdnError {
    move |source| FqdnError::Map { map, source }
}

/// The map a pattern's key lives in: exact names, or wildcard suffixes.
fn pattern_map(pattern: &NamePattern) -> &'static str {
    if pattern.is_wildcard() {
        MAP_WILDCARD
    } else {
        MAP_EXACT
    }
}

/// The two maps of name keys: exact names, and wildcards' suffixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NameTable {
    Exact,
    Wildcard,
}

impl NameTable {
    pub const ALL: [NameTable; 2] = [NameTable::Exact, NameTable::Wildcard];

    pub fn of(pattern: &NamePattern) -> NameTable {
        if pattern.is_wildcard() {
            NameTable::Wildcard
        } else {
            NameTable::Exact
        }
    }

    pub fn map(self) -> &'static str {
        match self {
            NameTable::Exact => MAP_EXACT,
            NameTable::Wildcard => MAP_WILDCARD,
        }
    }
}

/// A name's key as the programs look it up: its table and its keyed hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NameKey {
    pub table: NameTable,
    pub hash: u64,
}

/// One address an endpoint learned, with the name ids it was learned for and when each
/// expires (CLOCK_MONOTONIC ns, see [`monotonic_now_ns`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LearnedAddress {
    pub endpoint_id: u32,
    pub addr: IpAddr,
    pub names: Vec<(u32, u64)>,
}

/// A (endpoint, address, name id) whose TTL ran out, removed by [`Dataplane::expire_learned`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Expired {
    pub endpoint_id: u32,
    pub addr: IpAddr,
    pub name_id: u32,
}

/// The programs' clock (`now_coarse`: CLOCK_MONOTONIC at tick resolution), for expiries.
pub fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn resolver_key(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

fn resolver_addr(key: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(key);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

fn slots(v: &FqdnLearned) -> Vec<(u32, u64)> {
    (0..FQDN_MAX_IDS)
        .filter(|&i| v.name_ids[i] != FQDN_NAME_ID_NONE)
        .map(|i| (v.name_ids[i], v.expires_ns[i]))
        .collect()
}

impl Dataplane {
    fn fqdn_config_map(&mut self) -> Result<Array<&mut MapData, FqdnConfig>, FqdnError> {
        Ok(self.map_mut(MAP_CONFIG)?)
    }

    /// The learning configuration as the programs see it.
    pub fn fqdn_config(&mut self) -> Result<FqdnConfig, FqdnError> {
        self.fqdn_config_map()?
            .get(&0, 0)
            .map_err(map_err(MAP_CONFIG))
    }

    /// Turns learning on: keeps the per-node secret a previous agent drew (the name keys in the
    /// pinned maps were hashed with it), else draws one; sets the TTL bounds in seconds (0: the
    /// defaults of `bulkhead_common::fqdn`). Returns the configuration written.
    pub fn ensure_fqdn_config(
        &mut self,
        min_ttl_s: u32,
        max_ttl_s: u32,
    ) -> Result<FqdnConfig, FqdnError> {
        let mut cfg = self.fqdn_config()?;
        if !cfg.enabled() {
            let mut bytes = [0u8; 16];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut bytes))
                .map_err(FqdnError::Random)?;
            let (a, b) = bytes.split_at(8);
            let word = |s: &[u8]| s.iter().fold(0u64, |acc, &x| (acc << 8) | x as u64);
            cfg.key = [word(a), word(b) | 1];
        }
        cfg.min_ttl_s = min_ttl_s;
        cfg.max_ttl_s = max_ttl_s;
        self.set_fqdn_config(cfg)?;
        Ok(cfg)
    }

    /// Writes the configuration as given (tests; a key of zeros turns learning off). Name keys
    /// written under another secret no longer match: rewrite the names after a key change.
    pub fn set_fqdn_config(&mut self, cfg: FqdnConfig) -> Result<(), FqdnError> {
        self.fqdn_config_map()?
            .set(0, cfg, 0)
            .map_err(map_err(MAP_CONFIG))
    }

    fn resolvers(&mut self) -> Result<HashMap<&mut MapData, [u8; 16], u32>, FqdnError> {
        Ok(self.map_mut(MAP_RESOLVERS)?)
    }

    /// Trusts DNS answers from `addr` (source port 53).
    pub fn add_trusted_resolver(&mut self, addr: IpAddr) -> Result<(), FqdnError> {
        self.resolvers()?
            .insert(resolver_key(addr), 0, 0)
            .map_err(map_err(MAP_RESOLVERS))
    }

    pub fn remove_trusted_resolver(&mut self, addr: IpAddr) -> Result<(), FqdnError> {
        match self.resolvers()?.remove(&resolver_key(addr)) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(MAP_RESOLVERS)(e)),
        }
    }

    pub fn trusted_resolvers(&mut self) -> Result<Vec<IpAddr>, FqdnError> {
        let mut out = self
            .resolvers()?
            .keys()
            .map(|k| k.map(resolver_addr))
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(MAP_RESOLVERS))?;
        out.sort();
        Ok(out)
    }

    fn pattern_key(&mut self, pattern: &NamePattern) -> Result<u64, FqdnError> {
        let cfg = self.fqdn_config()?;
        if !cfg.enabled() {
            return Err(FqdnError::NoSecret);
        }
        name_hash(cfg.key, pattern.name().as_bytes()).map_err(|reason| FqdnError::Name {
            name: pattern.to_string(),
            reason,
        })
    }

    /// Makes answers for `pattern` teach addresses, under the controller's `name_id`.
    pub fn set_fqdn_name(&mut self, pattern: &NamePattern, name_id: u32) -> Result<(), FqdnError> {
        if name_id == FQDN_NAME_ID_NONE {
            return Err(FqdnError::ReservedId);
        }
        let key = self.pattern_key(pattern)?;
        let map = pattern_map(pattern);
        let mut m: HashMap<&mut MapData, u64, u32> = self.map_mut(map)?;
        m.insert(key, name_id, 0).map_err(map_err(map))
    }

    /// Stops learning for `pattern` (what was learned expires with its TTL).
    pub fn remove_fqdn_name(&mut self, pattern: &NamePattern) -> Result<(), FqdnError> {
        let key = self.pattern_key(pattern)?;
        let map = pattern_map(pattern);
        let mut m: HashMap<&mut MapData, u64, u32> = self.map_mut(map)?;
        match m.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(map)(e)),
        }
    }

    /// The key `pattern` has under the per-node secret (which must be configured).
    pub fn fqdn_name_key(&mut self, pattern: &NamePattern) -> Result<NameKey, FqdnError> {
        Ok(NameKey {
            table: NameTable::of(pattern),
            hash: self.pattern_key(pattern)?,
        })
    }

    /// Every name key in the maps with its name id (the agent cannot tell which name a key
    /// stands for: it compares keys).
    pub fn fqdn_name_keys(&mut self) -> Result<Vec<(NameKey, u32)>, FqdnError> {
        let mut out = Vec::new();
        for table in NameTable::ALL {
            let map = table.map();
            let m: HashMap<&mut MapData, u64, u32> = self.map_mut(map)?;
            for kv in m.iter() {
                let (hash, id) = kv.map_err(map_err(map))?;
                out.push((NameKey { table, hash }, id));
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Writes a name key (see [`Dataplane::fqdn_name_key`]) with its name id.
    pub fn set_fqdn_name_key(&mut self, key: NameKey, name_id: u32) -> Result<(), FqdnError> {
        if name_id == FQDN_NAME_ID_NONE {
            return Err(FqdnError::ReservedId);
        }
        let map = key.table.map();
        let mut m: HashMap<&mut MapData, u64, u32> = self.map_mut(map)?;
        m.insert(key.hash, name_id, 0).map_err(map_err(map))
    }

    pub fn remove_fqdn_name_key(&mut self, key: NameKey) -> Result<(), FqdnError> {
        let map = key.table.map();
        let mut m: HashMap<&mut MapData, u64, u32> = self.map_mut(map)?;
        match m.remove(&key.hash) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(map)(e)),
        }
    }

    /// Clears every learned slot for which `keep(endpoint id, name id)` is false (an address
    /// left with none is removed); returns how many slots were cleared. For names the node no
    /// longer has and endpoints that are gone: an endpoint id given to a new pod must not
    /// inherit what the old one learned.
    pub fn forget_learned(&mut self, keep: impl Fn(u32, u32) -> bool) -> Result<usize, FqdnError> {
        let mut cleared = 0;
        let entries: Vec<_> = self
            .learned_v4()?
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(MAP_LEARNED_V4))?;
        let mut m = self.learned_v4()?;
        for (k, v) in entries {
            cleared += forget_one(&mut m, k, v, |id| keep(k.endpoint_id, id))
                .map_err(map_err(MAP_LEARNED_V4))?;
        }
        let entries: Vec<_> = self
            .learned_v6()?
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(MAP_LEARNED_V6))?;
        let mut m = self.learned_v6()?;
        for (k, v) in entries {
            cleared += forget_one(&mut m, k, v, |id| keep(k.endpoint_id, id))
                .map_err(map_err(MAP_LEARNED_V6))?;
        }
        Ok(cleared)
    }

    /// How many (endpoint, address) entries the learned maps hold: IPv4, IPv6.
    pub fn learned_counts(&mut self) -> Result<(usize, usize), FqdnError> {
        let v4 = self.learned_v4()?.keys().count();
        let v6 = self.learned_v6()?.keys().count();
        Ok((v4, v6))
    }

    /// The name id `pattern` is written under, if any.
    pub fn fqdn_name(&mut self, pattern: &NamePattern) -> Result<Option<u32>, FqdnError> {
        let key = self.pattern_key(pattern)?;
        let map = pattern_map(pattern);
        let m: HashMap<&mut MapData, u64, u32> = self.map_mut(map)?;
        match m.get(&key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(map)(e)),
        }
    }

    fn learned_v4(
        &mut self,
    ) -> Result<HashMap<&mut MapData, FqdnLearnedKeyV4, FqdnLearned>, FqdnError> {
        Ok(self.map_mut(MAP_LEARNED_V4)?)
    }

    fn learned_v6(
        &mut self,
    ) -> Result<HashMap<&mut MapData, FqdnLearnedKeyV6, FqdnLearned>, FqdnError> {
        Ok(self.map_mut(MAP_LEARNED_V6)?)
    }

    /// Everything the endpoints learned (expired slots included until a sweep clears them),
    /// IPv4 first, each family in key order.
    pub fn learned(&mut self) -> Result<Vec<LearnedAddress>, FqdnError> {
        let mut v4: Vec<_> = self
            .learned_v4()?
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(MAP_LEARNED_V4))?;
        v4.sort_by_key(|(k, _)| (k.endpoint_id, u32::from_be(k.addr)));
        let mut v6: Vec<_> = self
            .learned_v6()?
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(MAP_LEARNED_V6))?;
        v6.sort_by_key(|(k, _)| (k.endpoint_id, k.addr));
        let mut out: Vec<LearnedAddress> = v4
            .into_iter()
            .map(|(k, v)| LearnedAddress {
                endpoint_id: k.endpoint_id,
                addr: IpAddr::V4(Ipv4Addr::from(k.addr.to_ne_bytes())),
                names: slots(&v),
            })
            .collect();
        out.extend(v6.into_iter().map(|(k, v)| LearnedAddress {
            endpoint_id: k.endpoint_id,
            addr: IpAddr::V6(Ipv6Addr::from(k.addr)),
            names: slots(&v),
        }));
        Ok(out)
    }

    /// What `endpoint_id` learned for `addr` (expired slots included until a sweep clears
    /// them), or `None` when it learned nothing for it.
    pub fn learned_at(
        &mut self,
        endpoint_id: u32,
        addr: IpAddr,
    ) -> Result<Option<LearnedAddress>, FqdnError> {
        let value = match addr {
            IpAddr::V4(a) => lookup(&self.learned_v4()?, &key_v4(endpoint_id, a), MAP_LEARNED_V4),
            IpAddr::V6(a) => lookup(&self.learned_v6()?, &key_v6(endpoint_id, a), MAP_LEARNED_V6),
        }?;
        Ok(value.map(|v| LearnedAddress {
            endpoint_id,
            addr,
            names: slots(&v),
        }))
    }

    /// Clears every learned name whose TTL ran out by `now_ns` (CLOCK_MONOTONIC, see
    /// [`monotonic_now_ns`]); an address left with none is removed. Returns what expired, for
    /// the agent to report.
    ///
    /// Runs beside the programs: an answer learned between the read and the write-back of an
    /// entry can be lost (or its entry removed), which makes that address wait for the pod's
    /// next resolution: never admitted longer than its TTL, possibly shorter.
    pub fn expire_learned(&mut self, now_ns: u64) -> Result<Vec<Expired>, FqdnError> {
        let mut expired = Vec::new();
        let entries: Vec<_> = self
            .learned_v4()?
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(MAP_LEARNED_V4))?;
        let mut m = self.learned_v4()?;
        for (k, v) in entries {
            let addr = IpAddr::V4(Ipv4Addr::from(k.addr.to_ne_bytes()));
            sweep_one(&mut m, k, v, now_ns, k.endpoint_id, addr, &mut expired)
                .map_err(map_err(MAP_LEARNED_V4))?;
        }
        let entries: Vec<_> = self
            .learned_v6()?
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(MAP_LEARNED_V6))?;
        let mut m = self.learned_v6()?;
        for (k, v) in entries {
            let addr = IpAddr::V6(Ipv6Addr::from(k.addr));
            sweep_one(&mut m, k, v, now_ns, k.endpoint_id, addr, &mut expired)
                .map_err(map_err(MAP_LEARNED_V6))?;
        }
        expired.sort();
        Ok(expired)
    }

    /// Learning's counters, summed over CPUs, by `fqdn_stat` index.
    pub fn fqdn_stats(&mut self) -> Result<[u64; fqdn_stat::COUNT as usize], FqdnError> {
        let m: PerCpuArray<&mut MapData, u64> = self.map_mut(MAP_STATS)?;
        let mut out = [0u64; fqdn_stat::COUNT as usize];
        for (i, o) in out.iter_mut().enumerate() {
            *o = m
                .get(&(i as u32), 0)
                .map_err(map_err(MAP_STATS))?
                .iter()
                .sum();
        }
        Ok(out)
    }
}

fn forget_one<K: aya::Pod>(
    m: &mut HashMap<&mut MapData, K, FqdnLearned>,
    key: K,
    value: FqdnLearned,
    keep: impl Fn(u32) -> bool,
) -> Result<usize, MapError> {
    let mut v = value;
    let mut cleared = 0;
    for i in 0..FQDN_MAX_IDS {
        if v.name_ids[i] != FQDN_NAME_ID_NONE && !keep(v.name_ids[i]) {
            v.name_ids[i] = FQDN_NAME_ID_NONE;
            v.expires_ns[i] = 0;
            cleared += 1;
        }
    }
    if cleared == 0 {
        return Ok(0);
    }
    let r = if v.name_ids.iter().all(|&id| id == FQDN_NAME_ID_NONE) {
        m.remove(&key)
    } else {
        m.insert(key, v, 0)
    };
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(cleared),
        Err(e) => Err(e),
    }
}

fn key_v4(endpoint_id: u32, addr: Ipv4Addr) -> FqdnLearnedKeyV4 {
    // The programs write the address as it sits in the packet (network order in memory).
    FqdnLearnedKeyV4 {
        endpoint_id,
        addr: u32::from_ne_bytes(addr.octets()),
    }
}

fn key_v6(endpoint_id: u32, addr: Ipv6Addr) -> FqdnLearnedKeyV6 {
    FqdnLearnedKeyV6 {
        endpoint_id,
        addr: addr.octets(),
    }
}

fn lookup<T: std::borrow::Borrow<MapData>, K: aya::Pod>(
    m: &HashMap<T, K, FqdnLearned>,
    key: &K,
    map: &'static str,
) -> Result<Option<FqdnLearned>, FqdnError> {
    match m.get(key, 0) {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(map_err(map)(e)),
    }
}

/// The learned maps opened from their pins under `pin_dir/maps`, for readers that do not own
/// the [`Dataplane`] (the flow event reader): point lookups only.
pub struct LearnedMaps {
    v4: HashMap<MapData, FqdnLearnedKeyV4, FqdnLearned>,
    v6: HashMap<MapData, FqdnLearnedKeyV6, FqdnLearned>,
}

impl LearnedMaps {
    /// Opens the pinned maps (they exist once the object is loaded: learning need not be on).
    pub fn open(pin_dir: &Path) -> Result<LearnedMaps, FqdnError> {
        fn pinned<K: aya::Pod>(
            pin_dir: &Path,
            map: &'static str,
        ) -> Result<HashMap<MapData, K, FqdnLearned>, FqdnError> {
            let data = MapData::from_pin(pin_dir.join("maps").join(map)).map_err(map_err(map))?;
            let m = Map::from_map_data(data).map_err(map_err(map))?;
            HashMap::try_from(m).map_err(map_err(map))
        }
        Ok(LearnedMaps {
            v4: pinned(pin_dir, MAP_LEARNED_V4)?,
            v6: pinned(pin_dir, MAP_LEARNED_V6)?,
        })
    }

    /// The (name id, expiry) slots `endpoint_id` holds for `addr`, expired ones included until
    /// a sweep clears them; empty when it learned nothing for it.
    pub fn get(&self, endpoint_id: u32, addr: IpAddr) -> Result<Vec<(u32, u64)>, FqdnError> {
        let v = match addr {
            IpAddr::V4(a) => lookup(&self.v4, &key_v4(endpoint_id, a), MAP_LEARNED_V4),
            IpAddr::V6(a) => lookup(&self.v6, &key_v6(endpoint_id, a), MAP_LEARNED_V6),
        }?;
        Ok(v.as_ref().map(slots).unwrap_or_default())
    }
}

fn sweep_one<K: aya::Pod>(
    m: &mut HashMap<&mut MapData, K, FqdnLearned>,
    key: K,
    value: FqdnLearned,
    now_ns: u64,
    endpoint_id: u32,
    addr: IpAddr,
    expired: &mut Vec<Expired>,
) -> Result<(), MapError> {
    let mut v = value;
    let empty = v.expire(now_ns);
    if v == value {
        return Ok(());
    }
    for i in 0..FQDN_MAX_IDS {
        if value.name_ids[i] != FQDN_NAME_ID_NONE && v.name_ids[i] == FQDN_NAME_ID_NONE {
            expired.push(Expired {
                endpoint_id,
                addr,
                name_id: value.name_ids[i],
            });
        }
    }
    let r = if empty {
        m.remove(&key)
    } else {
        m.insert(key, v, 0)
    };
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_names_and_wildcard_suffixes_have_maps_of_their_own() {
        let p: NamePattern = "API.Example.com.".parse().expect("exact");
        assert_eq!((pattern_map(&p), p.name()), (MAP_EXACT, "api.example.com"));
        let w: NamePattern = "*.Example.COM".parse().expect("wildcard");
        // The wildcard's key is its suffix's, in the other map: `example.com` itself is never
        // matched by `*.example.com`.
        assert_eq!((pattern_map(&w), w.name()), (MAP_WILDCARD, "example.com"));
    }

    #[test]
    fn resolver_keys_are_ipv4_mapped() {
        let a: IpAddr = "10.96.0.10".parse().expect("addr");
        assert_eq!(resolver_addr(resolver_key(a)), a);
        let b: IpAddr = "fd00::a".parse().expect("addr");
        assert_eq!(resolver_addr(resolver_key(b)), b);
    }
}
