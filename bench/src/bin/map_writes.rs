//! Map writes at scale (issue 15): keys per second into the agent's ipcache and policy maps,
//! one `bpf_map_update_elem` per key (what the enforcer did before) beside the batched writes
//! it does now (`BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH`, key by key for map types the
//! kernel has no batch for). Loads the real eBPF object and pins its maps under a directory of
//! its own in bpffs, removed at the end; attaches nothing. Needs root.
//!
//! ```sh
//! cargo build --release -p bulkhead-bench --bin map_writes
//! target/release/map_writes --keys 200000 --rounds 3
//! ```

use std::time::Instant;

use anyhow::Context;
use aya::Pod;
use bulkhead_agent::{
    loader::Dataplane,
    privileged::missing_privileges,
    sync::{
        HashTable, IPCACHE_HOST_V4, IPCACHE_V4, Maps, POLICY_EXACT, POLICY_RANGES, POLICY_SUMMARY,
        TrieTable,
    },
};
use bulkhead_common::{IpCacheValue, PolicyKey, PolicySummary, PolicyValue};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Keys written into each map per round.
    #[arg(long, default_value_t = 200_000)]
    keys: u32,
    /// Rounds per figure (the median is printed).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// Removes the bench's pins however it ends.
struct Pins(std::path::PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// keys/s of `f` over `n` keys.
fn rate(n: usize, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// (single insert, batched insert, single remove, batched remove, read key by key, batched
/// read) keys/s of a hash map.
fn hash_rates<K: Pod, V: Pod>(
    dp: &mut Dataplane,
    table: HashTable<K, V>,
    entries: &[(K, V)],
    rounds: usize,
) -> anyhow::Result<[f64; 6]> {
    let keys: Vec<K> = entries.iter().map(|(k, _)| *k).collect();
    let mut r: [Vec<f64>; 6] = Default::default();
    for _ in 0..rounds {
        r[0].push(rate(entries.len(), || {
            for (k, v) in entries {
                dp.insert(table, k, v)?;
            }
            Ok(())
        })?);
        r[2].push(rate(keys.len(), || {
            for k in &keys {
                dp.remove(table, k);
            }
            Ok(())
        })?);
        anyhow::ensure!(dp.entries(table)?.is_empty(), "keys left after removal");
        r[1].push(rate(entries.len(), || Ok(dp.insert_all(table, entries)?))?);
        r[4].push(rate(entries.len(), || {
            let map: aya::maps::HashMap<&mut aya::maps::MapData, K, V> =
                dp.map_mut(table.0.name())?;
            anyhow::ensure!(map.iter().flatten().count() == entries.len());
            Ok(())
        })?);
        r[5].push(rate(entries.len(), || {
            anyhow::ensure!(dp.entries(table)?.len() == entries.len(), "keys missing");
            Ok(())
        })?);
        r[3].push(rate(keys.len(), || {
            dp.remove_all(table, &keys);
            Ok(())
        })?);
        anyhow::ensure!(dp.entries(table)?.is_empty(), "keys left after removal");
    }
    Ok(r.map(median))
}

/// As [`hash_rates`], for an LPM trie.
fn trie_rates<K: Pod, V: Pod>(
    dp: &mut Dataplane,
    trie: TrieTable<K, V>,
    entries: &[(u32, K, V)],
    rounds: usize,
) -> anyhow::Result<[f64; 6]> {
    let keys: Vec<(u32, K)> = entries.iter().map(|(l, k, _)| (*l, *k)).collect();
    let mut r: [Vec<f64>; 6] = Default::default();
    for _ in 0..rounds {
        r[0].push(rate(entries.len(), || {
            for (l, k, v) in entries {
                dp.trie_insert(trie, *l, k, v)?;
            }
            Ok(())
        })?);
        r[2].push(rate(keys.len(), || {
            for (l, k) in &keys {
                dp.trie_remove(trie, *l, k);
            }
            Ok(())
        })?);
        anyhow::ensure!(dp.trie_keys(trie)?.is_empty(), "keys left after removal");
        r[1].push(rate(entries.len(), || {
            Ok(dp.trie_insert_all(trie, entries)?)
        })?);
        r[4].push(rate(entries.len(), || {
            let map: aya::maps::LpmTrie<&mut aya::maps::MapData, K, V> =
                dp.map_mut(trie.0.name())?;
            anyhow::ensure!(map.keys().flatten().count() == entries.len());
            Ok(())
        })?);
        r[5].push(rate(entries.len(), || {
            anyhow::ensure!(dp.trie_keys(trie)?.len() == entries.len(), "keys missing");
            Ok(())
        })?);
        r[3].push(rate(keys.len(), || {
            dp.trie_remove_all(trie, &keys);
            Ok(())
        })?);
        anyhow::ensure!(dp.trie_keys(trie)?.is_empty(), "keys left after removal");
    }
    Ok(r.map(median))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(why) = missing_privileges() {
        anyhow::bail!("this benchmark loads eBPF programs: {why}");
    }
    let pins = Pins(std::path::PathBuf::from(format!(
        "/sys/fs/bpf/bulkhead-bench-maps-{}",
        std::process::id()
    )));
    let mut dp = Dataplane::load(&pins.0).context("load the eBPF object")?;
    let n = args.keys;
    let addr = |i: u32| (0x0a40_0000u32 + i).to_be_bytes();
    let ipv = |i: u32| IpCacheValue {
        identity: 1000 + i,
        flags: 0,
    };
    let pkey = |i: u32| PolicyKey {
        policy_id: 1,
        identity: 1000 + i / 4,
        direction: (i % 2) as u8,
        protocol: 6,
        port_be: (80 + (i / 2 % 2) as u16).to_be(),
    };
    let pval = PolicyValue {
        rule_id: 10,
        verdict: 1,
        ..Default::default()
    };
    let summary = PolicySummary {
        fallback: pval,
        ..Default::default()
    };
    let rows = [
        (
            "IPCACHE_HOST_V4 (hash)",
            hash_rates(
                &mut dp,
                IPCACHE_HOST_V4,
                &(0..n).map(|i| (addr(i), ipv(i))).collect::<Vec<_>>(),
                args.rounds,
            )?,
            IPCACHE_HOST_V4.0.name(),
        ),
        (
            "POLICY_EXACT (hash)",
            hash_rates(
                &mut dp,
                POLICY_EXACT,
                &(0..n).map(|i| (pkey(i), pval)).collect::<Vec<_>>(),
                args.rounds,
            )?,
            POLICY_EXACT.0.name(),
        ),
        (
            "POLICY_SUMMARY (hash)",
            hash_rates(
                &mut dp,
                POLICY_SUMMARY,
                &(0..n).map(|i| (pkey(i), summary)).collect::<Vec<_>>(),
                args.rounds,
            )?,
            POLICY_SUMMARY.0.name(),
        ),
        (
            "IPCACHE_V4 (LPM trie)",
            trie_rates(
                &mut dp,
                IPCACHE_V4,
                &(0..n).map(|i| (32, addr(i), ipv(i))).collect::<Vec<_>>(),
                args.rounds,
            )?,
            IPCACHE_V4.0.name(),
        ),
        (
            "POLICY (LPM trie)",
            trie_rates(
                &mut dp,
                POLICY_RANGES,
                &(0..n).map(|i| (96, pkey(i), pval)).collect::<Vec<_>>(),
                args.rounds,
            )?,
            POLICY_RANGES.0.name(),
        ),
    ];
    println!(
        "{} keys per map, median of {} rounds, keys/s (thousands); batch: update, delete, lookup batched (y) or key by key (-)",
        n, args.rounds
    );
    println!(
        "{:<22} | {:>8} | {:>8} | {:>5} | {:>8} | {:>8} | {:>5} | {:>6} | {:>6} | {:>5} | batch",
        "map",
        "insert 1",
        "insert N",
        "ratio",
        "remove 1",
        "remove N",
        "ratio",
        "read 1",
        "read N",
        "ratio"
    );
    for (name, [ins1, insn, rem1, remn, read1, readn], map) in rows {
        println!(
            "{name:<22} | {:>8.0} | {:>8.0} | {:>4.1}× | {:>8.0} | {:>8.0} | {:>4.1}× | {:>6.0} | {:>6.0} | {:>4.1}× | {}",
            ins1 / 1e3,
            insn / 1e3,
            insn / ins1,
            rem1 / 1e3,
            remn / 1e3,
            remn / rem1,
            read1 / 1e3,
            readn / 1e3,
            readn / read1,
            [
                bulkhead_agent::batch::Op::Update,
                bulkhead_agent::batch::Op::Delete,
                bulkhead_agent::batch::Op::Lookup
            ]
            .map(|op| if dp.unbatched(map, op) { "-" } else { "y" })
            .join("")
        );
    }
    Ok(())
}
