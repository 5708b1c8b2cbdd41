//! Policy engine at Antrea's published controller scale (their
//! `networkpolicy_controller_perf_test.go`), pods spread randomly over 1,000 nodes.
//!
//! `cargo run --release -p bulkhead-bench --bin policy_scale` runs both scenarios, each in its
//! own process so that the peak RSS of one does not hide in the other. Figures only: nothing
//! here asserts on time.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use bulkhead_agent::policy_map::tables_of;
use bulkhead_bench::{Rng, one_namespace, small_namespaces};
use bulkhead_controller::model::{PortSpec, Rule};
use bulkhead_controller::ruleset::{PortRange, Protocol, RuleSet};
use bulkhead_controller::{Change, EngineConfig, Object, PodKey, Policy, PolicyEngine};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Run one scenario in this process: `a` (small namespaces) or `b` (one namespace).
    #[arg(long)]
    scenario: Option<String>,
    /// Incremental samples per kind of change.
    #[arg(long, default_value_t = 500)]
    samples: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.scenario.as_deref() {
        Some("a") => scenario_a(args.samples),
        Some("b") => scenario_b(args.samples),
        Some(other) => anyhow::bail!("unknown scenario {other:?}: use a or b"),
        None => {
            let exe = std::env::current_exe().context("finding this benchmark's executable")?;
            println!(
                "policy_scale: {} CPUs, build {}",
                std::thread::available_parallelism().map_or(0, |n| n.get()),
                if cfg!(debug_assertions) {
                    "debug (use --release!)"
                } else {
                    "release"
                }
            );
            for s in ["a", "b"] {
                let status = Command::new(&exe)
                    .args(["--scenario", s, "--samples", &args.samples.to_string()])
                    .status()
                    .with_context(|| format!("running scenario {s}"))?;
                anyhow::ensure!(status.success(), "scenario {s} failed");
            }
            Ok(())
        }
    }
}

fn vm_hwm_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn stats(mut v: Vec<usize>) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.sort_unstable();
    format!("{}/{}/{}", v[0], v[v.len() / 2], v[v.len() - 1])
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Compiled {
    engine: PolicyEngine,
    compile: Duration,
    materialize: Duration,
    peak_mb: f64,
}

fn compile(
    objects: Vec<Object>,
    target_s: f64,
    target_mb: Option<f64>,
) -> anyhow::Result<Compiled> {
    let inputs_mb = vm_hwm_mb();
    let t = Instant::now();
    let engine = PolicyEngine::new(EngineConfig::default(), objects)?;
    let compile = t.elapsed();
    let engine_mb = vm_hwm_mb();
    let t = Instant::now();
    let rulesets: Vec<RuleSet> = engine.rulesets().into_values().collect();
    let materialize = t.elapsed();
    let peak_mb = vm_hwm_mb();
    let total = secs(compile + materialize);
    println!(
        "  full compile (engine state)        {:>8.3} s",
        secs(compile)
    );
    println!(
        "  materialize {:>5} RuleSets         {:>8.3} s",
        rulesets.len(),
        secs(materialize)
    );
    println!(
        "  total to all per-node RuleSets     {:>8.3} s   target ≤ {target_s} s   ratio {:.2}",
        total,
        total / target_s
    );
    match target_mb {
        Some(t) => println!(
            "  peak RSS (VmHWM, incl. inputs)     {peak_mb:>8.0} MB  target ≤ {t} MB  ratio {:.2}   (inputs alone: {inputs_mb:.0} MB)",
            peak_mb / t
        ),
        None => println!(
            "  peak RSS (VmHWM, incl. inputs)     {peak_mb:>8.0} MB  (no target; inputs alone: {inputs_mb:.0} MB)"
        ),
    }
    println!("  peak RSS before materializing      {engine_mb:>8.0} MB");
    let endpoints: Vec<usize> = rulesets.iter().map(|r| r.endpoints.len()).collect();
    let groups: Vec<usize> = rulesets.iter().map(|r| r.policies.len()).collect();
    let entries: Vec<usize> = rulesets
        .iter()
        .map(|r| {
            r.policies
                .values()
                .map(|p| p.ingress.entries.len() + p.egress.entries.len())
                .sum()
        })
        .collect();
    let ipcache: Vec<usize> = rulesets.iter().map(|r| r.ipcache.len()).collect();
    // The agent writes each group's keys once; before groups, every endpoint had its own copy.
    let group_keys = |r: &RuleSet| -> BTreeMap<u32, usize> {
        r.policies
            .iter()
            .map(|(g, p)| (*g, tables_of(1, p).len()))
            .collect()
    };
    let (map_keys, per_endpoint_keys): (Vec<usize>, Vec<usize>) = rulesets
        .iter()
        .map(|r| {
            let keys = group_keys(r);
            let shared: usize = keys.values().sum();
            let copies: usize = r
                .endpoints
                .iter()
                .map(|e| keys.get(&e.policy).copied().unwrap_or(0))
                .sum();
            (shared, copies)
        })
        .unzip();
    let rules: Vec<usize> = rulesets.iter().map(|r| r.rules.len()).collect();
    println!(
        "  identities {}; per node min/median/max: endpoints {}, policy groups {}, entries {}, ipcache {}, rules {}",
        engine.identity_count(),
        stats(endpoints),
        stats(groups),
        stats(entries),
        stats(ipcache),
        stats(rules)
    );
    println!(
        "  agent POLICY keys per node min/median/max: {} (one copy per endpoint would be {})",
        stats(map_keys),
        stats(per_endpoint_keys)
    );
    drop(rulesets);
    Ok(Compiled {
        engine,
        compile,
        materialize,
        peak_mb,
    })
}

/// Times `samples` applications of `make(i)`; prints p50/p99 and the delta sizes.
fn time_changes(
    engine: &mut PolicyEngine,
    what: &str,
    samples: usize,
    mut make: impl FnMut(usize, &PolicyEngine) -> Change,
) -> anyhow::Result<()> {
    let mut times = Vec::with_capacity(samples);
    let mut nodes = Vec::with_capacity(samples);
    let mut sizes = Vec::with_capacity(samples);
    for i in 0..samples {
        let change = make(i, engine);
        let t = Instant::now();
        let deltas = engine.apply(change)?;
        times.push(t.elapsed());
        nodes.push(deltas.len());
        sizes.push(deltas.iter().map(|d| d.size()).sum::<usize>());
    }
    times.sort_unstable();
    let p50 = percentile(&times, 0.5);
    println!(
        "  incremental {what:<22} n={samples}: p50 {:>8.1} µs  p99 {:>8.1} µs  target p50 ≤ 1 ms ratio {:.3}; nodes changed {}, delta items {}",
        p50.as_secs_f64() * 1e6,
        percentile(&times, 0.99).as_secs_f64() * 1e6,
        p50.as_secs_f64() / 1e-3,
        stats(nodes),
        stats(sizes),
    );
    Ok(())
}

fn relabel(
    engine: &PolicyEngine,
    key: &PodKey,
    f: impl FnOnce(&mut bulkhead_controller::Pod),
) -> Change {
    match engine.pod(key) {
        Some(mut p) => {
            f(&mut p);
            Change::UpsertPod(p)
        }
        None => Change::DeletePod(key.clone()),
    }
}

/// The policy with its single ingress rule narrowed to TCP 8080 (or back to all ports).
fn edit_ports(policy: &Policy, narrow: bool) -> Policy {
    let mut p = policy.clone();
    for r in &mut p.rules {
        let r: &mut Rule = r;
        r.ports = if narrow {
            vec![PortSpec::Range {
                protocol: Some(Protocol::Tcp),
                ports: PortRange::single(8080),
            }]
        } else {
            vec![PortSpec::ANY]
        };
    }
    p
}

fn policies_of(objects: &[Object]) -> Vec<Policy> {
    objects
        .iter()
        .filter_map(|o| match o {
            Object::Policy(p) if !p.rules.is_empty() => Some(p.clone()),
            _ => None,
        })
        .collect()
}

fn scenario_a(samples: usize) -> anyhow::Result<()> {
    let namespaces = 25_000;
    println!(
        "\nscenario A: {namespaces} namespaces × (4 pods, 3 policies) = {} pods, {} policies, 1000 nodes",
        namespaces * 4,
        namespaces * 3
    );
    println!("  Antrea reports 5.84–6.42 s and 1.5–1.7 GB for this scenario (its own hardware)");
    let t = Instant::now();
    let objects = small_namespaces(namespaces, 1000, 42);
    let policies = policies_of(&objects);
    println!("  inputs generated in {:.2} s", secs(t.elapsed()));
    let mut c = compile(objects, 1.0, Some(600.0))?;
    let _ = (c.compile, c.materialize, c.peak_mb);
    let mut rng = Rng::new(7);
    // Relabel pod1 of a random namespace from app-1 to app-2, then back.
    let mut current: Option<PodKey> = None;
    time_changes(
        &mut c.engine,
        "pod relabel",
        samples,
        |i, e| match current.take() {
            Some(key) if i % 2 == 1 => relabel(e, &key, |p| {
                p.labels.remove("app-2");
                p.labels.insert("app-1".into(), "scale-1".into());
            }),
            _ => {
                let key = PodKey {
                    namespace: format!("ns-{:05}", rng.below(namespaces)),
                    name: "pod1".into(),
                };
                current = Some(key.clone());
                relabel(e, &key, |p| {
                    p.labels.remove("app-1");
                    p.labels.insert("app-2".into(), "scale-2".into());
                })
            }
        },
    )?;
    let mut edited: Option<usize> = None;
    time_changes(&mut c.engine, "policy edit", samples, |i, _| {
        match edited.take() {
            Some(idx) if i % 2 == 1 => Change::UpsertPolicy(edit_ports(&policies[idx], false)),
            _ => {
                let idx = rng.below(policies.len());
                edited = Some(idx);
                Change::UpsertPolicy(edit_ports(&policies[idx], true))
            }
        }
    })?;
    Ok(())
}

fn scenario_b(samples: usize) -> anyhow::Result<()> {
    let (pods, policies_n) = (10_000, 10_000);
    println!(
        "\nscenario B: 1 namespace, {pods} pods, {policies_n} policies each selecting every pod with ingress from every pod, 1000 nodes"
    );
    println!("  Antrea reports 10.66 s and 1,157 MB for this scenario (its own hardware)");
    let t = Instant::now();
    let objects = one_namespace(pods, policies_n, 1000, 42);
    let policies = policies_of(&objects);
    println!("  inputs generated in {:.2} s", secs(t.elapsed()));
    let mut c = compile(objects, 2.0, None)?;
    let mut rng = Rng::new(7);
    // Adding a label gives the pod a new identity that every policy selects and admits: every
    // node's rule set changes, which is the inherent cost of this scenario.
    let mut current: Option<PodKey> = None;
    time_changes(
        &mut c.engine,
        "pod relabel",
        samples,
        |i, e| match current.take() {
            Some(key) if i % 2 == 1 => relabel(e, &key, |p| {
                p.labels.remove("canary");
            }),
            _ => {
                let key = PodKey {
                    namespace: "scale".into(),
                    name: format!("pod-{:05}", rng.below(pods)),
                };
                current = Some(key.clone());
                relabel(e, &key, |p| {
                    p.labels.insert("canary".into(), "true".into());
                })
            }
        },
    )?;
    let mut edited: Option<usize> = None;
    time_changes(&mut c.engine, "policy edit", samples, |i, _| {
        match edited.take() {
            Some(idx) if i % 2 == 1 => Change::UpsertPolicy(edit_ports(&policies[idx], false)),
            _ => {
                let idx = rng.below(policies.len());
                edited = Some(idx);
                Change::UpsertPolicy(edit_ports(&policies[idx], true))
            }
        }
    })?;
    Ok(())
}
