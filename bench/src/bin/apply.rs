//! How long the agent takes to realize a rule set on a node with N pods: the first apply
//! (attaching both TC programs to every pod's interface), then rule sets that change one pod
//! (quarantined, then released), which is what a quarantine or a pod event costs the agent,
//! and the first apply of a restarted agent (its programs swapped into the pinned links).
//! Figures, not a test: run as root.
//!
//! `cargo run --release -p bulkhead-bench --bin apply [-- --pods 10,100,250 --rounds 21]`
//!
//! Each pod is a veth (both ends in one namespace) with a /32 route, as a routed CNI wires it,
//! and the rule
//! set names no interface: the agent finds each pod by its route.

use std::{
    io::Write,
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use anyhow::Context;
use bulkhead_agent::{
    loader::{Dataplane, remove_pins},
    netns::Netns,
    privileged::missing_privileges,
    sync::{Enforcer, RouteResolver},
};
use bulkhead_controller::ruleset::{
    DirectionPolicy, Endpoint, EndpointPolicy, IpCacheEntry, RuleSet,
};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Pods per node to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [10u32, 100, 250])]
    pods: Vec<u32>,
    /// One-pod changes per size (alternately quarantine and release); median and max reported.
    #[arg(long, default_value_t = 21)]
    rounds: usize,
    /// Addresses of pods on other nodes in every rule set's ipcache (/32 each, spread over
    /// 100 identities): what a node of a large cluster carries besides its own pods.
    #[arg(long, default_value_t = 0)]
    remote_peers: u32,
}

fn pod_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a32_0000 + i + 2)
}

fn ruleset(version: u64, pods: u32, quarantined: Option<u32>, remote: u32) -> RuleSet {
    let endpoints = (0..pods)
        .map(|i| Endpoint {
            id: i + 1,
            namespace: "bench".into(),
            pod: format!("pod-{i}"),
            workload: None,
            identity: 1000 + i % 10,
            ips: vec![IpAddr::V4(pod_ip(i))],
            interface: None,
            quarantined: quarantined == Some(i),
            policy: 1000 + i % 10,
        })
        .collect();
    let ipcache = (0..pods)
        .map(|i| IpCacheEntry {
            cidr: format!("{}/32", pod_ip(i)).parse().expect("cidr"),
            identity: 1000 + i % 10,
            quarantined: quarantined == Some(i),
            quarantine_allow: Vec::new(),
        })
        .chain((0..remote).map(|i| IpCacheEntry {
            // 10.64.0.0/12: other nodes' pod CIDRs.
            cidr: ipnetwork::IpNetwork::V4(
                ipnetwork::Ipv4Network::new(Ipv4Addr::from(0x0a40_0000 + i), 32).expect("cidr"),
            ),
            identity: 2000 + i % 100,
            quarantined: false,
            quarantine_allow: Vec::new(),
        }))
        .collect();
    let policies = (0..10)
        .map(|g| {
            (
                1000 + g,
                EndpointPolicy {
                    ingress: DirectionPolicy::default(),
                    egress: DirectionPolicy::default(),
                },
            )
        })
        .collect();
    RuleSet {
        node: "bench".into(),
        version,
        endpoints,
        policies,
        ipcache,
        rules: Default::default(),
        names: Vec::new(),
        dns_resolvers: Vec::new(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// First apply, each one-pod change, and the first apply of a restarted agent.
struct Measured {
    first: Duration,
    changes: Vec<Duration>,
    restart: Duration,
}

fn measure(pods: u32, rounds: usize, remote: u32) -> anyhow::Result<Measured> {
    let tag = std::process::id();
    let ns = Netns::create(&format!("bh-bench-apply-{tag}")).context("namespace")?;
    let mut batch = tempfile_in_tmp(&format!("bh-bench-apply-{tag}.batch"))?;
    for i in 0..pods {
        writeln!(batch.1, "link add bp{i} type veth peer name bq{i}")?;
        writeln!(batch.1, "link set bp{i} up")?;
        writeln!(batch.1, "link set bq{i} up")?;
        writeln!(batch.1, "route add {}/32 dev bp{i}", pod_ip(i))?;
    }
    batch.1.flush()?;
    ns.exec(&["ip", "-batch", &batch.0])?;
    let _ = std::fs::remove_file(&batch.0);
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/bulkhead-bench-apply-{tag}"));
    let pin_dir = pins.clone();
    let result = ns.run(move || -> anyhow::Result<Measured> {
        let mut e = Enforcer::new(Dataplane::load(&pin_dir)?)?;
        let first = e.apply(&ruleset(1, pods, None, remote), &RouteResolver)?;
        anyhow::ensure!(
            first.missing_interfaces.is_empty() && first.endpoints_written == pods as usize,
            "not every pod was found: {first:?}"
        );
        let mut changes = Vec::with_capacity(rounds);
        for r in 0..rounds {
            let quarantined = (r % 2 == 0).then_some(pods / 2);
            let report = e.apply(
                &ruleset(2 + r as u64, pods, quarantined, remote),
                &RouteResolver,
            )?;
            anyhow::ensure!(report.endpoints_written == 1, "one pod changes: {report:?}");
            changes.push(report.duration);
        }
        // A restarted agent: the pinned links keep enforcing; its first apply swaps its
        // programs into them (`bpf_link_update`) and rewrites every endpoint.
        drop(e);
        let mut e = Enforcer::new(Dataplane::load(&pin_dir)?)?;
        let restart = e.apply(
            &ruleset(2 + rounds as u64, pods, None, remote),
            &RouteResolver,
        )?;
        anyhow::ensure!(
            restart.missing_interfaces.is_empty(),
            "not every pod was found after the restart: {restart:?}"
        );
        Ok(Measured {
            first: first.duration,
            changes,
            restart: restart.duration,
        })
    })?;
    let _ = remove_pins(&pins);
    drop(ns);
    result
}

fn tempfile_in_tmp(name: &str) -> anyhow::Result<(String, std::fs::File)> {
    let path = std::env::temp_dir().join(name);
    let file = std::fs::File::create(&path)?;
    Ok((path.to_string_lossy().into_owned(), file))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(why) = missing_privileges() {
        anyhow::bail!("this benchmark loads eBPF programs: {why}");
    }
    println!(
        "agent apply on a node with N pods (ms; rule set names no interface: routes are looked up)"
    );
    println!(
        "{:>6} | {:>12} | {:>18} | {:>18} | {:>10} | {:>14}",
        "pods",
        "first apply",
        "one-pod change p50",
        "one-pod change max",
        "p50 / pod",
        "after restart"
    );
    for pods in args.pods {
        let Measured {
            first,
            mut changes,
            restart,
        } = measure(pods, args.rounds, args.remote_peers)?;
        changes.sort();
        let p50 = changes[changes.len() / 2];
        let max = *changes.last().expect("rounds > 0");
        println!(
            "{pods:>6} | {:>12.1} | {:>18.2} | {:>18.2} | {:>10.4} | {:>14.1}",
            ms(first),
            ms(p50),
            ms(max),
            ms(p50) / pods as f64,
            ms(restart)
        );
    }
    Ok(())
}
