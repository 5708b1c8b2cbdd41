//! Per-packet cost of the TC program with BPF_PROG_TEST_RUN, against a floor program that only
//! parses headers, for 10 … 100k policy entries. Figures, not a test: run as root.
//!
//! `cargo run --release -p bulkhead-bench --bin datapath [-- --repeat 1000000 --rounds 9]`
//!
//! Paths measured, all through `bulkhead_to_pod` on an endpoint whose ingress policy holds N
//! entries (one per peer identity, TCP port 80):
//! * `new (deny)`: a connection attempt the policy refuses — parse, endpoint, the peer's
//!   identity, the policy summary, the deny-event rate limiter, counters (a SYN skips conntrack).
//!   Every repetition takes the full new-connection path (an allowed SYN would be tracked after
//!   the first repetition).
//! * `established`: a packet of an allowed, tracked connection (one conntrack lookup).
//! * `reply`: the pod's answer on that connection, through `bulkhead_from_pod` (anti-spoofing,
//!   then the same conntrack entry).
//!
//! `--only PATH --entries N` repeats one path, for a profiler (`perf record -a`). `--staged`
//! adds a staged edit that would deny every admitted connection (the audit path).

use std::net::{IpAddr, Ipv4Addr};

use anyhow::Context;
use bulkhead_agent::{
    loader::{Dataplane, PROG_FROM_POD, PROG_PARSE_ONLY, PROG_TO_POD},
    netns::Netns,
    privileged::missing_privileges,
    sync::{Enforcer, RouteResolver},
};
use bulkhead_controller::ruleset::{
    Action, DirectionPolicy, Endpoint, EndpointPolicy, IpCacheEntry, PolicyEntry, PortRange,
    Protocol, RuleSet, Stage, Tier,
};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// BPF_PROG_TEST_RUN repetitions per measurement.
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Measurements per cell; the median is reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Policy sizes to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [10u32, 1_000, 10_000, 100_000])]
    entries: Vec<u32>,
    /// Measure only this path, repeatedly, for `--rounds` rounds (for a profiler such as
    /// `perf record -a`): floor, new, established or reply.
    #[arg(long)]
    only: Option<String>,
    /// After the table, at the last policy size: this many distinct connections, each one test
    /// run (admitted SYN, refused SYN, and the floor on the same packets), so the admitted path
    /// (conntrack insert, new-flow event) is measured too. 0 skips it.
    #[arg(long, default_value_t = 15_000)]
    admitted: u32,
    /// Stage an edit of the policy beside it: every allow entry gets a staged deny of the same
    /// peer and port (and the staged view isolates), so every admitted connection is one the
    /// staged policies would deny — the audit path, with its second verdict and its event.
    #[arg(long)]
    staged: bool,
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// Ethernet + IPv4 + TCP with the given flags.
fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut p = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    p.extend_from_slice(&[0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    p
}

/// Entries, then ns/packet: floor, new (deny), established, reply.
type Row = (u32, f64, f64, f64, f64);

fn peer_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a40_0000 + i)
}

fn ruleset(n: u32, staged: bool) -> RuleSet {
    let entry = |i: u32, action, stage, rule| PolicyEntry {
        peer: 1000 + i,
        protocol: Some(Protocol::Tcp),
        ports: PortRange::single(80),
        tier: Tier::Application,
        priority: 0,
        action,
        stage,
        rule,
    };
    let mut entries: Vec<PolicyEntry> = (0..n)
        .map(|i| entry(i, Action::Allow, Stage::Enforced, i + 10))
        .collect();
    if staged {
        entries.extend((0..n).map(|i| entry(i, Action::Deny, Stage::Staged, n + i + 10)));
    }
    let mut ipcache: Vec<IpCacheEntry> = (0..n)
        .map(|i| IpCacheEntry {
            cidr: format!("{}/32", peer_ip(i)).parse().expect("cidr"),
            identity: 1000 + i,
            quarantined: false,
            quarantine_allow: Vec::new(),
        })
        .collect();
    ipcache.push(IpCacheEntry {
        cidr: "10.0.0.2/32".parse().expect("cidr"),
        identity: 300,
        quarantined: false,
        quarantine_allow: Vec::new(),
    });
    RuleSet {
        node: "bench".into(),
        version: n as u64,
        endpoints: vec![Endpoint {
            id: 1,
            namespace: "bench".into(),
            pod: "server".into(),
            workload: None,
            identity: 300,
            ips: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))],
            interface: Some("ep0".into()),
            quarantined: false,
            policy: 300,
        }],
        policies: [(
            300,
            EndpointPolicy {
                ingress: DirectionPolicy {
                    isolated_by: Some(1),
                    staged_isolated_by: Some(if staged { 2 } else { 1 }),
                    entries,
                },
                egress: DirectionPolicy::default(),
            },
        )]
        .into_iter()
        .collect(),
        ipcache,
        rules: Default::default(),
        names: Vec::new(),
        dns_resolvers: Vec::new(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(why) = missing_privileges() {
        anyhow::bail!("this benchmark loads eBPF programs: {why}");
    }
    let pins =
        std::path::PathBuf::from(format!("/sys/fs/bpf/bulkhead-bench-{}", std::process::id()));
    let ns = Netns::create(&format!("bh-bench-{}", std::process::id())).context("namespace")?;
    ns.exec(&[
        "ip", "link", "add", "ep0", "type", "veth", "peer", "name", "ep0p",
    ])?;
    ns.exec(&["ip", "link", "set", "ep0", "up"])?;
    let pin_dir = pins.clone();
    let repeat = args.repeat;
    let rounds = args.rounds;
    let entries = args.entries.clone();
    let only = args.only.clone();
    let staged = args.staged;
    let admitted = if args.only.is_some() {
        0
    } else {
        args.admitted
    };
    let result = ns.run(move || -> anyhow::Result<(Vec<Row>, Option<Single>)> {
        let dp = Dataplane::load(&pin_dir)?;
        let mut e = Enforcer::new(dp)?;
        let ifx = nix::net::if_::if_nametoindex("ep0")?;
        let mut rows = Vec::new();
        for n in entries {
            let report = e.apply(&ruleset(n, staged), &RouteResolver)?;
            eprintln!(
                "{n:>7} entries: {} policy keys written in {:.0} ms",
                report.policy_entries_written,
                report.duration.as_secs_f64() * 1e3
            );
            // The peer in the middle of the identity range: a real match deep in the trie.
            let peer = peer_ip(n / 2).octets();
            // A refused connection attempt (every repetition is a new connection), and a
            // connection opened once, then measured on its data (ACK) and on its replies.
            let denied = tcp(peer, [10, 0, 0, 2], 40000, 81, SYN);
            let open = tcp(peer, [10, 0, 0, 2], 40001, 80, SYN);
            let allowed = tcp(peer, [10, 0, 0, 2], 40001, 80, ACK);
            let reply = tcp([10, 0, 0, 2], peer, 80, 40001, ACK);
            let dpr = e.dataplane();
            let (v, _) = dpr.test_run(PROG_TO_POD, &open, ifx, 1)?;
            anyhow::ensure!(v == 0, "allowed connection was refused");
            let (v, _) = dpr.test_run(PROG_TO_POD, &allowed, ifx, 1)?;
            anyhow::ensure!(v == 0, "allowed packet was dropped");
            let (v, _) = dpr.test_run(PROG_FROM_POD, &reply, ifx, 1)?;
            anyhow::ensure!(v == 0, "reply was dropped");
            let (v, _) = dpr.test_run(PROG_TO_POD, &denied, ifx, 1)?;
            anyhow::ensure!(v == 2, "denied packet passed");
            if let Some(path) = &only {
                let (prog, pkt) = match path.as_str() {
                    "floor" => (PROG_PARSE_ONLY, &allowed),
                    "new" => (PROG_TO_POD, &denied),
                    "established" => (PROG_TO_POD, &allowed),
                    "reply" => (PROG_FROM_POD, &reply),
                    other => {
                        anyhow::bail!("unknown path {other:?}: floor, new, established or reply")
                    }
                };
                for _ in 0..rounds {
                    let (_, d) = dpr.test_run(prog, pkt, ifx, repeat)?;
                    eprintln!("{path}: {:.1} ns/packet", d.as_nanos() as f64);
                }
                continue;
            }
            let mut floor = Vec::new();
            let mut new = Vec::new();
            let mut est = Vec::new();
            let mut rep = Vec::new();
            for _ in 0..rounds {
                floor.push(
                    dpr.test_run(PROG_PARSE_ONLY, &allowed, ifx, repeat)?
                        .1
                        .as_nanos() as f64,
                );
                new.push(
                    dpr.test_run(PROG_TO_POD, &denied, ifx, repeat)?
                        .1
                        .as_nanos() as f64,
                );
                est.push(
                    dpr.test_run(PROG_TO_POD, &allowed, ifx, repeat)?
                        .1
                        .as_nanos() as f64,
                );
                rep.push(
                    dpr.test_run(PROG_FROM_POD, &reply, ifx, repeat)?
                        .1
                        .as_nanos() as f64,
                );
            }
            rows.push((n, median(floor), median(new), median(est), median(rep)));
        }
        let single = match (admitted, rows.last()) {
            (0, _) | (_, None) => None,
            (count, Some(&(n, ..))) => Some(single_runs(&mut e, ifx, n, count)?),
        };
        Ok((rows, single))
    });
    let _ = bulkhead_agent::loader::remove_pins(&pins);
    let (rows, single) = result.context("enter namespace")??;
    if rows.is_empty() {
        return Ok(());
    }
    println!("\nPer-packet cost, BPF_PROG_TEST_RUN × {repeat} (median of {rounds}), ns/packet");
    println!(
        "{:>9} | {:>9} | {:>11} {:>6} | {:>11} {:>6} | {:>9} {:>6}",
        "entries", "floor", "new (deny)", "×floor", "established", "×floor", "reply", "×floor"
    );
    for (n, f, nw, es, rp) in &rows {
        println!(
            "{n:>9} | {f:>9.1} | {nw:>11.1} {:>6.2} | {es:>11.1} {:>6.2} | {rp:>9.1} {:>6.2}",
            nw / f,
            es / f,
            rp / f
        );
    }
    let first = rows.first().expect("rows");
    let last = rows.last().expect("rows");
    println!(
        "flatness {} vs {} entries: new {:+.1}%, established {:+.1}%, reply {:+.1}%",
        last.0,
        first.0,
        (last.2 / first.2 - 1.0) * 100.0,
        (last.3 / first.3 - 1.0) * 100.0,
        (last.4 / first.4 - 1.0) * 100.0
    );
    if let Some(s) = single {
        println!(
            "\nDistinct connections, one BPF_PROG_TEST_RUN each ({} of each, {} entries; median ns \
             per run, which includes the test run's own clock reads, so compare differences):",
            s.count, s.entries
        );
        println!(
            "  floor {:.0} | refused SYN {:.0} (+{:.0}) | admitted SYN {:.0} (+{:.0}: conntrack \
             insert and new-flow event) | events lost {}",
            s.floor,
            s.refused,
            s.refused - s.floor,
            s.admitted,
            s.admitted - s.floor,
            s.events_lost
        );
    }
    Ok(())
}

/// Median single-run costs over distinct connections.
struct Single {
    entries: u32,
    count: u32,
    floor: f64,
    refused: f64,
    admitted: f64,
    events_lost: u64,
}

/// Each packet a connection of its own (source port `i`, peer in the middle of the identity
/// range): admitted SYNs to port 80 insert a conntrack entry and write a new-flow event, refused
/// ones to port 81 a rate-limited deny event; the ring buffer (4 MiB) holds every event of
/// `count` ≤ 20,000 of each, so none is lost (which would be cheaper than delivering it).
fn single_runs(e: &mut Enforcer, ifx: u32, n: u32, count: u32) -> anyhow::Result<Single> {
    let peer = peer_ip(n / 2).octets();
    let dp = e.dataplane();
    let (mut floor, mut refused, mut admitted) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..count {
        let sport = 1024 + (i % 60_000) as u16;
        let open = tcp(peer, [10, 0, 0, 2], sport, 80, SYN);
        let deny = tcp(peer, [10, 0, 0, 2], sport, 81, SYN);
        floor.push(dp.test_run(PROG_PARSE_ONLY, &open, ifx, 1)?.1.as_nanos() as f64);
        let (v, d) = dp.test_run(PROG_TO_POD, &deny, ifx, 1)?;
        anyhow::ensure!(v == 2, "refused SYN passed");
        refused.push(d.as_nanos() as f64);
        let (v, d) = dp.test_run(PROG_TO_POD, &open, ifx, 1)?;
        anyhow::ensure!(v == 0, "admitted SYN dropped");
        admitted.push(d.as_nanos() as f64);
    }
    let events_lost = dp
        .stats()?
        .get(&bulkhead_common::stat::EVENTS_LOST, 0)
        .map(|v| v.iter().sum())
        .unwrap_or(0);
    Ok(Single {
        entries: n,
        count,
        floor: median(floor),
        refused: median(refused),
        admitted: median(admitted),
        events_lost,
    })
}
