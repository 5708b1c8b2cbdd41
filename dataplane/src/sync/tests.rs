//! What the enforcer decides, without root: an in-memory [`Maps`] that records every operation,
//! and checks of their order (a packet never sees a half-written policy or an unknown peer),
//! of what happens when a map is full or an interface cannot be attached, and that nothing is
//! rewritten when nothing changed. The kernel tests (`dataplane/tests`) run the same enforcer
//! on the real maps.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use aya::Pod;
use bulkhead_common::{Config, EndpointInfo, IpCacheValue, endpoint_flags};
use bulkhead_ruleset::{
    Action, DirectionPolicy, Endpoint, EndpointPolicy, IpCacheEntry, PolicyEntry, PortRange,
    Protocol, RuleSet, Stage, Tier,
};

use super::{Enforcer, HashTable, InterfaceResolver, Maps, SyncError, Table, Trie, TrieTable};

fn bytes<T: Pod>(v: &T) -> Vec<u8> {
    // SAFETY: `aya::Pod` types are plain data that may be viewed as bytes (that is the trait's
    // contract: they are what the kernel's maps hold).
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

fn from_bytes<T: Pod>(b: &[u8]) -> T {
    assert_eq!(b.len(), size_of::<T>());
    // SAFETY: as above; `read_unaligned` because a Vec<u8> has no alignment for T.
    unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) }
}

/// One operation on the fake kernel, as the log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Insert(Table, Vec<u8>),
    Remove(Table, Vec<u8>),
    TrieInsert(Trie, u32, Vec<u8>),
    TrieRemove(Trie, u32, Vec<u8>),
    Dense(u32, bool),
    DenseClear,
    /// The generation and the dense window's slots after a configuration write.
    Config {
        generation: u32,
        dense_slots: u32,
    },
    SetEndpoint {
        ifindex: u32,
        policy_id: u32,
        flags: u32,
    },
    ClearEndpoint(u32),
    Attach(String),
    Detach(String),
    Revoke(Vec<u32>),
    CopyV4,
    MoveV4,
}

/// A trie's (prefix length, key) → value, as bytes.
type TrieEntries = BTreeMap<(u32, Vec<u8>), Vec<u8>>;

#[derive(Default)]
struct FakeMaps {
    tables: BTreeMap<Table, BTreeMap<Vec<u8>, Vec<u8>>>,
    tries: BTreeMap<Trie, TrieEntries>,
    /// Entries a table holds at most (the kernel's `max_entries`); unlimited when absent.
    capacity: BTreeMap<Table, usize>,
    dense: BTreeMap<u32, IpCacheValue>,
    config: Config,
    endpoints: BTreeMap<u32, EndpointInfo>,
    attached: BTreeSet<String>,
    interfaces: BTreeMap<String, u32>,
    /// Interfaces whose attach fails (they went away meanwhile).
    refuse_attach: BTreeSet<String>,
    log: Vec<Op>,
}

fn full(map: &'static str) -> SyncError {
    SyncError::Map {
        map,
        source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_update_elem",
            io_error: std::io::Error::from_raw_os_error(nix::libc::E2BIG),
        }),
    }
}

impl Maps for FakeMaps {
    fn insert<K: Pod, V: Pod>(
        &mut self,
        table: HashTable<K, V>,
        key: &K,
        value: &V,
    ) -> Result<(), SyncError> {
        let t = self.tables.entry(table.0).or_default();
        let k = bytes(key);
        if !t.contains_key(&k)
            && self
                .capacity
                .get(&table.0)
                .is_some_and(|cap| t.len() >= *cap)
        {
            return Err(full(table.0.name()));
        }
        t.insert(k.clone(), bytes(value));
        self.log.push(Op::Insert(table.0, k));
        Ok(())
    }

    fn remove<K: Pod, V: Pod>(&mut self, table: HashTable<K, V>, key: &K) {
        let k = bytes(key);
        if let Some(t) = self.tables.get_mut(&table.0) {
            t.remove(&k);
        }
        self.log.push(Op::Remove(table.0, k));
    }

    fn entries<K: Pod, V: Pod>(
        &mut self,
        table: HashTable<K, V>,
    ) -> Result<Vec<(K, V)>, SyncError> {
        Ok(self
            .tables
            .get(&table.0)
            .map(|t| {
                t.iter()
                    .map(|(k, v)| (from_bytes(k), from_bytes(v)))
                    .collect()
            })
            .unwrap_or_default())
    }

    fn trie_insert<K: Pod, V: Pod>(
        &mut self,
        trie: TrieTable<K, V>,
        prefix_len: u32,
        key: &K,
        value: &V,
    ) -> Result<(), SyncError> {
        let k = bytes(key);
        self.tries
            .entry(trie.0)
            .or_default()
            .insert((prefix_len, k.clone()), bytes(value));
        self.log.push(Op::TrieInsert(trie.0, prefix_len, k));
        Ok(())
    }

    fn trie_remove<K: Pod, V: Pod>(&mut self, trie: TrieTable<K, V>, prefix_len: u32, key: &K) {
        let k = bytes(key);
        if let Some(t) = self.tries.get_mut(&trie.0) {
            t.remove(&(prefix_len, k.clone()));
        }
        self.log.push(Op::TrieRemove(trie.0, prefix_len, k));
    }

    fn trie_keys<K: Pod, V: Pod>(
        &mut self,
        trie: TrieTable<K, V>,
    ) -> Result<Vec<(u32, K)>, SyncError> {
        Ok(self
            .tries
            .get(&trie.0)
            .map(|t| t.keys().map(|(len, k)| (*len, from_bytes(k))).collect())
            .unwrap_or_default())
    }

    fn dense_set(&mut self, slot: u32, value: Option<IpCacheValue>) {
        match value {
            Some(v) => self.dense.insert(slot, v),
            None => self.dense.remove(&slot),
        };
        self.log.push(Op::Dense(slot, value.is_some()));
    }

    fn dense_entries(&mut self) -> Vec<(u32, IpCacheValue)> {
        self.dense.iter().map(|(s, v)| (*s, *v)).collect()
    }

    fn dense_clear(&mut self) {
        self.dense.clear();
        self.log.push(Op::DenseClear);
    }

    fn config(&mut self) -> Result<Config, SyncError> {
        Ok(self.config)
    }

    fn set_config(&mut self, config: Config) -> Result<(), SyncError> {
        self.config = config;
        self.log.push(Op::Config {
            generation: config.generation,
            dense_slots: config.dense_v4_slots,
        });
        Ok(())
    }

    fn set_endpoint(&mut self, ifindex: u32, info: EndpointInfo) -> Result<(), SyncError> {
        self.endpoints.insert(ifindex, info);
        self.log.push(Op::SetEndpoint {
            ifindex,
            policy_id: info.policy_id,
            flags: info.flags,
        });
        Ok(())
    }

    fn clear_endpoint(&mut self, ifindex: u32) -> Result<(), SyncError> {
        self.endpoints.remove(&ifindex);
        self.log.push(Op::ClearEndpoint(ifindex));
        Ok(())
    }

    fn endpoint_list(&mut self) -> Result<Vec<(u32, EndpointInfo)>, SyncError> {
        Ok(self.endpoints.iter().map(|(i, e)| (*i, *e)).collect())
    }

    fn attach(&mut self, ifname: &str) -> Result<(), SyncError> {
        if self.refuse_attach.contains(ifname) {
            return Err(SyncError::Load(crate::loader::LoadError::Interface {
                ifname: ifname.to_string(),
                reason: "no such device".into(),
            }));
        }
        self.attached.insert(ifname.to_string());
        self.log.push(Op::Attach(ifname.to_string()));
        Ok(())
    }

    fn detach(&mut self, ifname: &str) {
        self.attached.remove(ifname);
        self.log.push(Op::Detach(ifname.to_string()));
    }

    fn attached(&self) -> Vec<String> {
        self.attached.iter().cloned().collect()
    }

    fn ifindex(&self, ifname: &str) -> Option<u32> {
        self.interfaces.get(ifname).copied()
    }

    fn revoke_connections(
        &mut self,
        endpoint_ids: &[u32],
        _generation: u32,
    ) -> Result<usize, SyncError> {
        self.log.push(Op::Revoke(endpoint_ids.to_vec()));
        Ok(endpoint_ids.len())
    }

    fn copy_ipv4_connections(&mut self) -> Result<(), SyncError> {
        self.log.push(Op::CopyV4);
        Ok(())
    }

    fn move_ipv4_connections(&mut self) -> Result<usize, SyncError> {
        self.log.push(Op::MoveV4);
        Ok(0)
    }
}

/// Every endpoint's interface is named in the rule set.
struct Named;

impl InterfaceResolver for Named {
    fn interface(&self, endpoint: &Endpoint) -> Option<String> {
        endpoint.interface.clone()
    }
}

const WEB: u32 = 100;
const DB: u32 = 200;

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 1, 0, last))
}

fn endpoint(id: u32, identity: u32, last: u8, group: u32) -> Endpoint {
    Endpoint {
        id,
        namespace: "shop".into(),
        pod: format!("pod-{id}"),
        workload: None,
        identity,
        ips: vec![ip(last)],
        interface: Some(format!("veth{id}")),
        quarantined: false,
        policy: group,
    }
}

/// `db` admits `web` on TCP `port` (isolated for ingress), blamed on `rule`.
fn db_policy(port: u16, rule: u32) -> EndpointPolicy {
    EndpointPolicy {
        ingress: DirectionPolicy {
            isolated_by: Some(rule + 1000),
            staged_isolated_by: Some(rule + 1000),
            entries: vec![PolicyEntry {
                peer: WEB,
                protocol: Some(Protocol::Tcp),
                ports: PortRange::single(port),
                tier: Tier::Application,
                priority: 0,
                action: Action::Allow,
                stage: Stage::Enforced,
                rule,
            }],
        },
        egress: DirectionPolicy::default(),
    }
}

/// Node with `web` (endpoint 1, group 1) and `db` (endpoint 2, group 2) admitting web on
/// `port`.
fn ruleset(version: u64, port: u16) -> RuleSet {
    RuleSet {
        node: "n1".into(),
        version,
        endpoints: vec![endpoint(1, WEB, 1, 1), endpoint(2, DB, 2, 2)],
        policies: BTreeMap::from([(1, EndpointPolicy::default()), (2, db_policy(port, 7))]),
        ipcache: vec![
            IpCacheEntry {
                cidr: ip(1).into(),
                identity: WEB,
                quarantined: false,
                quarantine_allow: vec![],
            },
            IpCacheEntry {
                cidr: ip(2).into(),
                identity: DB,
                quarantined: false,
                quarantine_allow: vec![],
            },
        ],
        rules: BTreeMap::new(),
        names: Vec::new(),
        dns_resolvers: Vec::new(),
    }
}

fn fake() -> FakeMaps {
    FakeMaps {
        interfaces: BTreeMap::from([("veth1".into(), 11), ("veth2".into(), 12)]),
        ..Default::default()
    }
}

fn enforcer() -> Enforcer<FakeMaps> {
    Enforcer::new(fake()).expect("enforcer")
}

fn log(e: &mut Enforcer<FakeMaps>) -> Vec<Op> {
    std::mem::take(&mut e.dataplane().log)
}

/// Where the first operation that `f` picks is in `log`.
fn first(log: &[Op], f: impl Fn(&Op) -> bool) -> usize {
    log.iter()
        .position(f)
        .unwrap_or_else(|| panic!("no such operation in {log:#?}"))
}

fn last(log: &[Op], f: impl Fn(&Op) -> bool) -> usize {
    log.iter()
        .rposition(f)
        .unwrap_or_else(|| panic!("no such operation in {log:#?}"))
}

fn is_policy_write(op: &Op) -> bool {
    matches!(
        op,
        Op::Insert(Table::PolicySummary | Table::PolicyExact, _)
            | Op::TrieInsert(Trie::PolicyRanges, ..)
    )
}

fn is_policy_removal(op: &Op) -> bool {
    matches!(
        op,
        Op::Remove(Table::PolicySummary | Table::PolicyExact, _)
            | Op::TrieRemove(Trie::PolicyRanges, ..)
    )
}

fn set_endpoint(ifindex: u32) -> impl Fn(&Op) -> bool {
    move |op| matches!(op, Op::SetEndpoint { ifindex: i, .. } if *i == ifindex)
}

/// The first apply: peers resolve before any endpoint is switched on, a group's finer keys go
/// before its summaries (which say they exist), an endpoint's addresses before its switch, the
/// programs are attached only to written endpoints, and the generation is bumped last.
#[test]
fn the_first_apply_writes_in_an_order_no_packet_can_see_half_done() {
    let mut e = enforcer();
    let report = e.apply(&ruleset(1, 5432), &Named).expect("apply");
    assert_eq!(
        (report.endpoints_written, report.groups_written),
        (2, 2),
        "{report:?}"
    );
    let log = log(&mut e);
    let last_ipcache = last(&log, |op| {
        matches!(op, Op::Insert(Table::IpcacheHostV4, _) | Op::Dense(..))
    });
    let first_switch = first(&log, |op| matches!(op, Op::SetEndpoint { .. }));
    assert!(last_ipcache < first_switch, "{log:#?}");
    // db's keys: exact port before summary, all before db's switch.
    let exact = first(&log, |op| matches!(op, Op::Insert(Table::PolicyExact, _)));
    let summary = first(&log, |op| matches!(op, Op::Insert(Table::PolicySummary, _)));
    assert!(
        exact < summary && summary < first(&log, set_endpoint(12)),
        "{log:#?}"
    );
    // Addresses before the switch, attach after it.
    let addrs = first(&log, |op| matches!(op, Op::Insert(Table::EndpointAddrs, _)));
    assert!(addrs < first_switch, "{log:#?}");
    let attach = first(&log, |op| matches!(op, Op::Attach(i) if i == "veth2"));
    assert!(first(&log, set_endpoint(12)) < attach, "{log:#?}");
    // The generation is the last write; IPv4 connections are copied before any attach and
    // moved after.
    assert!(
        matches!(log.last(), Some(Op::Config { generation: 1, .. })),
        "{log:#?}"
    );
    assert!(first(&log, |op| *op == Op::CopyV4) < first(&log, |op| matches!(op, Op::Attach(_))));
    assert!(last(&log, |op| matches!(op, Op::Attach(_))) < first(&log, |op| *op == Op::MoveV4));
}

/// A changed group: its new keys under a fresh policy id, then the endpoint's one-update
/// switch, and only then the old keys' removal. Nothing else is rewritten.
#[test]
fn a_changed_policy_is_switched_in_one_update_and_the_old_keys_go_after() {
    let mut e = enforcer();
    e.apply(&ruleset(1, 5432), &Named).expect("apply");
    let old_id = e.dataplane().endpoints[&12].policy_id;
    log(&mut e);
    let report = e.apply(&ruleset(2, 6432), &Named).expect("apply");
    assert_eq!(
        (report.groups_written, report.endpoints_written),
        (1, 1),
        "only db's group and endpoint change: {report:?}"
    );
    let log = log(&mut e);
    let new_id = e.dataplane().endpoints[&12].policy_id;
    assert_ne!(new_id, old_id, "a changed group gets a fresh policy id");
    let switch = first(&log, set_endpoint(12));
    assert!(last(&log, is_policy_write) < switch, "{log:#?}");
    assert!(switch < first(&log, is_policy_removal), "{log:#?}");
    assert!(
        !log.iter()
            .any(|op| matches!(op, Op::SetEndpoint { ifindex: 11, .. })),
        "web's endpoint did not change and must not be rewritten: {log:#?}"
    );
    assert!(
        !log.iter().any(|op| matches!(op, Op::Attach(_))),
        "nothing new to attach: {log:#?}"
    );
    // The old id's keys are all gone; the new ones are there.
    let ids: BTreeSet<u32> = e
        .dataplane()
        .entries(super::maps::POLICY_SUMMARY)
        .expect("entries")
        .into_iter()
        .map(|(k, _)| k.policy_id)
        .collect();
    assert!(ids.contains(&new_id) && !ids.contains(&old_id), "{ids:?}");
}

/// The same rule set again writes nothing but the generation.
#[test]
fn an_unchanged_rule_set_rewrites_nothing() {
    let mut e = enforcer();
    e.apply(&ruleset(1, 5432), &Named).expect("apply");
    log(&mut e);
    let report = e.apply(&ruleset(2, 5432), &Named).expect("apply");
    assert_eq!(
        (
            report.groups_written,
            report.endpoints_written,
            report.endpoints_removed
        ),
        (0, 0, 0)
    );
    let log = log(&mut e);
    assert!(
        matches!(log[..], [Op::Config { generation: 2, .. }]),
        "{log:#?}"
    );
}

/// A group whose keys do not fit: its endpoints are locked down (deny all), what it managed to
/// write is removed again, the other groups are unaffected, and the next apply with room
/// unlocks it.
#[test]
fn a_policy_that_does_not_fit_locks_its_endpoints_down_until_it_does() {
    let mut maps = fake();
    maps.capacity.insert(Table::PolicySummary, 0);
    let mut e = Enforcer::new(maps).expect("enforcer");
    let report = e.apply(&ruleset(1, 5432), &Named).expect("apply");
    assert_eq!(
        report.locked_down,
        vec!["shop/pod-2".to_string()],
        "{report:?}"
    );
    let db = e.dataplane().endpoints[&12];
    assert_ne!(db.flags & endpoint_flags::LOCKDOWN, 0, "db is locked down");
    assert_eq!(
        e.dataplane().endpoints[&11].flags & endpoint_flags::LOCKDOWN,
        0
    );
    assert!(
        e.dataplane()
            .tables
            .get(&Table::PolicyExact)
            .is_none_or(|t| t.is_empty()),
        "the half-written keys were removed"
    );
    e.dataplane().capacity.clear();
    let report = e.apply(&ruleset(2, 5432), &Named).expect("apply");
    assert!(report.locked_down.is_empty(), "{report:?}");
    assert_eq!(
        e.dataplane().endpoints[&12].flags & endpoint_flags::LOCKDOWN,
        0
    );
}

/// An interface that cannot be attached (it went away) counts as missing and leaves nothing
/// behind; the others are enforced; a later apply picks it up.
#[test]
fn an_interface_that_cannot_be_attached_is_retried_and_leaves_nothing() {
    let mut maps = fake();
    maps.refuse_attach.insert("veth2".into());
    let mut e = Enforcer::new(maps).expect("enforcer");
    let report = e.apply(&ruleset(1, 5432), &Named).expect("apply");
    assert_eq!(
        report.missing_interfaces,
        vec!["shop/pod-2 (veth2)".to_string()]
    );
    assert_eq!(report.endpoints_written, 1);
    assert!(!e.dataplane().endpoints.contains_key(&12));
    assert!(e.dataplane().endpoints.contains_key(&11));
    e.dataplane().refuse_attach.clear();
    let report = e.apply(&ruleset(2, 5432), &Named).expect("apply");
    assert!(report.missing_interfaces.is_empty(), "{report:?}");
    assert!(e.dataplane().endpoints.contains_key(&12));
}

/// A quarantine cuts the endpoint's connections once (not on every apply), after its switch.
#[test]
fn a_quarantine_cuts_connections_once_after_the_switch() {
    let mut e = enforcer();
    e.apply(&ruleset(1, 5432), &Named).expect("apply");
    log(&mut e);
    let mut q = ruleset(2, 5432);
    q.endpoints[1].quarantined = true;
    let report = e.apply(&q, &Named).expect("apply");
    assert_eq!(report.connections_cut, 1);
    let ops = log(&mut e);
    let switch = first(&ops, set_endpoint(12));
    let revoke = first(&ops, |op| *op == Op::Revoke(vec![2]));
    assert!(switch < revoke, "{ops:#?}");
    q.version = 3;
    let report = e.apply(&q, &Named).expect("apply");
    assert_eq!(report.connections_cut, 0);
    assert!(!log(&mut e).iter().any(|op| matches!(op, Op::Revoke(_))));
}

/// An endpoint that left: switched off (detached first), its addresses removed, then its
/// group's keys; peers it no longer needs leave the ipcache last.
#[test]
fn an_endpoint_that_left_is_detached_before_its_state_goes() {
    let mut e = enforcer();
    e.apply(&ruleset(1, 5432), &Named).expect("apply");
    log(&mut e);
    let mut gone = ruleset(2, 5432);
    gone.endpoints.truncate(1);
    gone.policies.remove(&2);
    gone.ipcache.truncate(1);
    let report = e.apply(&gone, &Named).expect("apply");
    assert_eq!(report.endpoints_removed, 1);
    let ops = log(&mut e);
    let detach = first(&ops, |op| matches!(op, Op::Detach(i) if i == "veth2"));
    let clear = first(&ops, |op| *op == Op::ClearEndpoint(12));
    let addrs = first(&ops, |op| matches!(op, Op::Remove(Table::EndpointAddrs, _)));
    let keys = first(&ops, is_policy_removal);
    let peer = first(&ops, |op| {
        matches!(
            op,
            Op::Remove(Table::IpcacheHostV4, _) | Op::Dense(_, false)
        )
    });
    assert!(
        detach < clear && clear < addrs && addrs < keys && keys < peer,
        "{ops:#?}"
    );
}

/// After a restart the enforcer takes over what an earlier agent left: its policy ids are not
/// reused, and what the rule set does not have is cleared after the first apply.
#[test]
fn a_restarted_enforcer_picks_fresh_policy_ids_and_clears_leftovers() {
    let mut e = enforcer();
    e.apply(&ruleset(1, 5432), &Named).expect("apply");
    let old_id = e.dataplane().endpoints[&12].policy_id;
    let mut maps = std::mem::take(e.dataplane());
    // A leftover endpoint the new rule set does not have.
    maps.endpoints.insert(99, EndpointInfo::default());
    maps.attached.insert("veth99".into());
    maps.log.clear();
    let mut restarted = Enforcer::new(maps).expect("enforcer");
    restarted.apply(&ruleset(1, 5432), &Named).expect("apply");
    let new_id = restarted.dataplane().endpoints[&12].policy_id;
    assert!(
        new_id > old_id,
        "fresh ids above every id found: {new_id} vs {old_id}"
    );
    let m = restarted.dataplane();
    assert!(!m.endpoints.contains_key(&99) && !m.attached.contains("veth99"));
    let ids: BTreeSet<u32> = m
        .entries(super::maps::POLICY_SUMMARY)
        .expect("entries")
        .into_iter()
        .map(|(k, _)| k.policy_id)
        .collect();
    assert!(
        !ids.contains(&old_id),
        "the earlier agent's keys are gone: {ids:?}"
    );
}

/// The prefilter's pairs come from the group's policy once, when its keys are written: a peer
/// denied on every protocol and port both ways gets a pair for each of the endpoint's
/// addresses; a peer with one allowed port, or the wildcard, gets none.
#[test]
fn peers_denied_outright_become_prefilter_pairs() {
    let deny = |peer: u32, rule: u32| PolicyEntry {
        peer,
        protocol: None,
        ports: PortRange::ALL,
        tier: Tier::Admin,
        priority: 0,
        action: Action::Deny,
        stage: Stage::Enforced,
        rule,
    };
    let mut rs = ruleset(1, 5432);
    let db = rs.policies.get_mut(&2).expect("db's group");
    db.ingress.entries.push(deny(900, 9));
    db.egress = DirectionPolicy {
        isolated_by: Some(1),
        staged_isolated_by: Some(1),
        entries: vec![deny(900, 9)],
    };
    let mut e = enforcer();
    let report = e.apply(&rs, &Named).expect("apply");
    assert_eq!(report.prefilter_pairs, 1, "{report:?}");
    let pairs = e
        .dataplane()
        .entries(super::maps::PREFILTER_DENY)
        .expect("entries");
    assert_eq!(pairs.len(), 1);
    let (key, value) = pairs[0];
    assert_eq!(
        (key.identity, value.rule_id, value.endpoint_id),
        (900, 9, 2)
    );
    assert_eq!(key.addr, super::addr16(ip(2)));
    // WEB may reach db on 5432: no pair for it, and none for the wildcard.
    assert!(!pairs.iter().any(|(k, _)| k.identity == WEB));
}

/// An ipcache map that fills up part-way through a batch: the apply fails, the enforcer's copy
/// holds exactly the entries that went in, and the next apply with room writes only the rest
/// (none twice, none forgotten).
#[test]
fn an_ipcache_write_that_stops_part_way_is_resumed_where_it_stopped() {
    let peer = |i: u16| IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i));
    let mut rs = ruleset(1, 5432);
    rs.ipcache.extend((1..=5).map(|i| IpCacheEntry {
        cidr: peer(i).into(),
        identity: WEB,
        quarantined: false,
        quarantine_allow: vec![],
    }));
    let mut maps = fake();
    maps.capacity.insert(Table::IpcacheHostV6, 3);
    let mut e = Enforcer::new(maps).expect("enforcer");
    let err = e.apply(&rs, &Named).expect_err("the map is full");
    assert!(err.to_string().contains("IPCACHE_HOST_V6"), "{err}");
    let written = |log: &[Op]| {
        log.iter()
            .filter(|op| matches!(op, Op::Insert(Table::IpcacheHostV6, _)))
            .count()
    };
    assert_eq!(written(&log(&mut e)), 3);
    assert_eq!(e.dataplane().tables[&Table::IpcacheHostV6].len(), 3);

    e.dataplane().capacity.clear();
    rs.version = 2;
    e.apply(&rs, &Named).expect("apply with room");
    assert_eq!(written(&log(&mut e)), 2, "only what did not fit is written");
    assert_eq!(e.dataplane().tables[&Table::IpcacheHostV6].len(), 5);
}

/// The ipcache diff (one walk of the sorted rule set beside the maps' copy) says exactly what
/// a map rebuilt from the rule set would: random lists, unsorted and with repeated prefixes
/// (the last counts), against a random copy.
#[test]
fn the_ipcache_diff_matches_a_rebuilt_map() {
    use rand::{Rng, SeedableRng, rngs::StdRng};

    let mut rng = StdRng::seed_from_u64(15);
    for _ in 0..300 {
        let net = |rng: &mut StdRng| -> ipnetwork::IpNetwork {
            let ip = Ipv4Addr::new(10, 0, rng.random_range(0..3), rng.random_range(0..40));
            ipnetwork::Ipv4Network::new(ip, if rng.random_bool(0.8) { 32 } else { 24 })
                .map(|n| ipnetwork::Ipv4Network::new(n.network(), n.prefix()).unwrap())
                .unwrap()
                .into()
        };
        let value = |rng: &mut StdRng| IpCacheValue {
            identity: rng.random_range(1..4),
            flags: 0,
        };
        let mut list: Vec<_> = (0..rng.random_range(0..60))
            .map(|_| (net(&mut rng), value(&mut rng)))
            .collect();
        let have: BTreeMap<_, _> = (0..rng.random_range(0..60))
            .map(|_| (net(&mut rng), value(&mut rng)))
            .collect();
        let rebuilt: BTreeMap<_, _> = list.iter().copied().collect();
        super::sort_last_wins(&mut list);
        assert!(list.is_sorted_by(|a, b| a.0 < b.0));
        assert_eq!(list.iter().copied().collect::<BTreeMap<_, _>>(), rebuilt);
        let (changed, stale) = super::diff_sorted(&list, &have);
        let mut after = have.clone();
        for (n, v) in changed.iter().chain(&stale) {
            match v {
                Some(v) => after.insert(*n, *v),
                None => after.remove(n),
            };
        }
        assert_eq!(after, rebuilt);
        // Nothing is written that was already there.
        assert!(changed.iter().all(|(n, v)| have.get(n) != v.as_ref()));
        assert!(
            stale
                .iter()
                .all(|(n, _)| have.contains_key(n) && !rebuilt.contains_key(n))
        );
    }
}

const NAME: u32 = bulkhead_ruleset::identity::FIRST_NAME_IDENTITY + 1;

/// `ruleset(version, 5432)` where web's egress admits `NAME` on TCP 443 in the Admin tier at
/// `priority`, and denies `world` at priority 5.
fn ruleset_with_names(version: u64, priority: u16) -> RuleSet {
    let admin = |peer, action, priority, rule| PolicyEntry {
        peer,
        protocol: Some(Protocol::Tcp),
        ports: PortRange::single(443),
        tier: Tier::Admin,
        priority,
        action,
        stage: Stage::Enforced,
        rule,
    };
    let mut rs = ruleset(version, 5432);
    rs.policies.insert(
        1,
        EndpointPolicy {
            ingress: DirectionPolicy::default(),
            egress: DirectionPolicy {
                isolated_by: None,
                staged_isolated_by: None,
                entries: vec![
                    admin(NAME, Action::Allow, priority, 30),
                    admin(bulkhead_ruleset::identity::WORLD, Action::Deny, 5, 31),
                ],
            },
        },
    );
    rs
}

fn is_rank_write(op: &Op) -> bool {
    matches!(
        op,
        Op::Insert(Table::RankSummary | Table::RankExact, _) | Op::TrieInsert(Trie::RankRanges, ..)
    )
}

/// A group whose egress names DNS names gets rank keys, written with its other keys before the
/// endpoint's switch, which carries `HAS_NAMES`; a group without names gets neither. A change
/// of the name's priority alone (the same verdict under every key) still rewrites the group,
/// and the old rank keys go after the switch.
#[test]
fn name_policies_get_rank_keys_and_the_flag_with_the_switch() {
    let mut e = enforcer();
    e.apply(&ruleset_with_names(1, 10), &Named).expect("apply");
    let log1 = log(&mut e);
    let web = e.dataplane().endpoints[&11];
    let db = e.dataplane().endpoints[&12];
    assert_ne!(web.flags & endpoint_flags::HAS_NAMES, 0);
    assert_eq!(
        db.flags & endpoint_flags::HAS_NAMES,
        0,
        "db's policy has no names"
    );
    assert!(
        last(&log1, is_rank_write) < first(&log1, set_endpoint(11)),
        "{log1:#?}"
    );
    // Rank summaries after the finer rank keys.
    assert!(
        first(&log1, |op| matches!(op, Op::Insert(Table::RankExact, _)))
            < first(&log1, |op| matches!(op, Op::Insert(Table::RankSummary, _))),
        "{log1:#?}"
    );
    let rank_ids: BTreeSet<u32> = e
        .dataplane()
        .entries(super::maps::RANK_SUMMARY)
        .expect("entries")
        .into_iter()
        .map(|(k, _)| k.policy_id)
        .collect();
    assert_eq!(
        rank_ids,
        BTreeSet::from([web.policy_id]),
        "only web's group is ranked"
    );

    // Priority 10 → 3: every key's verdict is the same (the name's key allows, world's
    // denies), but the name's Accept now beats world's Deny when they combine.
    let report = e.apply(&ruleset_with_names(2, 3), &Named).expect("apply");
    assert_eq!(report.groups_written, 1, "{report:?}");
    let log2 = log(&mut e);
    let new_id = e.dataplane().endpoints[&11].policy_id;
    assert_ne!(new_id, web.policy_id);
    let switch = first(&log2, set_endpoint(11));
    assert!(last(&log2, is_rank_write) < switch, "{log2:#?}");
    assert!(
        switch < first(&log2, |op| matches!(op, Op::Remove(Table::RankSummary, _))),
        "{log2:#?}"
    );
    let rank_ids: BTreeSet<u32> = e
        .dataplane()
        .entries(super::maps::RANK_SUMMARY)
        .expect("entries")
        .into_iter()
        .map(|(k, _)| k.policy_id)
        .collect();
    assert_eq!(rank_ids, BTreeSet::from([new_id]));

    // Names gone from the policy: no rank keys, no flag.
    e.apply(&ruleset(3, 5432), &Named).expect("apply");
    assert_eq!(
        e.dataplane().endpoints[&11].flags & endpoint_flags::HAS_NAMES,
        0
    );
    assert!(
        e.dataplane()
            .entries(super::maps::RANK_SUMMARY)
            .expect("entries")
            .is_empty()
    );
}

/// Rank keys that do not fit lock the group's endpoints down as any policy key does, and
/// leave nothing behind.
#[test]
fn rank_keys_that_do_not_fit_lock_the_endpoint_down() {
    let mut maps = fake();
    maps.capacity.insert(Table::RankSummary, 1);
    let mut e = Enforcer::new(maps).expect("enforcer");
    let report = e.apply(&ruleset_with_names(1, 10), &Named).expect("apply");
    assert_eq!(
        report.locked_down,
        vec!["shop/pod-1".to_string()],
        "{report:?}"
    );
    let web = e.dataplane().endpoints[&11];
    assert_ne!(web.flags & endpoint_flags::LOCKDOWN, 0);
    assert_eq!(web.flags & endpoint_flags::HAS_NAMES, 0);
    for t in [Table::RankSummary, Table::RankExact] {
        assert!(
            e.dataplane().tables.get(&t).is_none_or(|t| t.is_empty()),
            "{t:?} keys were removed"
        );
    }
}

/// A restarted enforcer numbers its policy ids above the rank keys an earlier agent left too,
/// and removes those keys with the rest of its leftovers.
#[test]
fn a_restarted_enforcer_clears_leftover_rank_keys() {
    let mut e = enforcer();
    e.apply(&ruleset_with_names(1, 10), &Named).expect("apply");
    let mut maps = std::mem::take(e.dataplane());
    // Rank keys of a policy id no endpoint names, above every other id.
    let leftover = bulkhead_common::PolicyKey {
        policy_id: 500,
        ..Default::default()
    };
    maps.tables.entry(Table::RankSummary).or_default().insert(
        bytes(&leftover),
        bytes(&bulkhead_common::RankSummary::default()),
    );
    let mut restarted = Enforcer::new(maps).expect("enforcer");
    restarted
        .apply(&ruleset_with_names(1, 10), &Named)
        .expect("apply");
    let web = restarted.dataplane().endpoints[&11];
    assert!(web.policy_id > 500, "{}", web.policy_id);
    assert_ne!(web.flags & endpoint_flags::HAS_NAMES, 0);
    let ids: BTreeSet<u32> = restarted
        .dataplane()
        .entries(super::maps::RANK_SUMMARY)
        .expect("entries")
        .into_iter()
        .map(|(k, _)| k.policy_id)
        .collect();
    assert_eq!(ids, BTreeSet::from([web.policy_id]));
}

/// A peer whose every packet both directions' keys deny is a prefilter pair, unless a DNS name
/// can admit egress to its addresses: then the prefilter would drop the replies of connections
/// the name admits.
#[test]
fn addresses_names_may_admit_are_never_prefilter_pairs() {
    let entry = |peer: u32, action, priority, rule: u32| PolicyEntry {
        peer,
        protocol: None,
        ports: PortRange::ALL,
        tier: Tier::Admin,
        priority,
        action,
        stage: Stage::Enforced,
        rule,
    };
    let world = bulkhead_ruleset::identity::WORLD;
    let mut rs = ruleset(1, 5432);
    let web = rs.policies.get_mut(&1).expect("web's group");
    web.ingress.entries.push(entry(world, Action::Deny, 5, 9));
    web.egress.entries.push(entry(world, Action::Deny, 5, 9));
    let mut e = enforcer();
    let report = e.apply(&rs, &Named).expect("apply");
    assert_eq!(
        report.prefilter_pairs, 1,
        "world is denied outright: {report:?}"
    );

    // The same, with an Admin Accept by name ahead of the deny.
    let web = rs.policies.get_mut(&1).expect("web's group");
    web.egress.entries.push(entry(NAME, Action::Allow, 3, 10));
    rs.version = 2;
    let report = e.apply(&rs, &Named).expect("apply");
    assert_eq!(report.prefilter_pairs, 0, "{report:?}");
    assert!(
        e.dataplane()
            .entries(super::maps::PREFILTER_DENY)
            .expect("entries")
            .is_empty()
    );
}
