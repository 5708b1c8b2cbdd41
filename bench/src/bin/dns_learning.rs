//! What learning from DNS answers costs (issue 19), with BPF_PROG_TEST_RUN: figures, not a
//! test; run as root.
//!
//! `cargo run --release -p bulkhead-bench --bin dns_learning [-- --repeat 1000000 --rounds 9]`
//!
//! * Packets that are not DNS answers, through `bulkhead_to_pod` and through the same program
//!   built without the DNS code (`bulkhead_to_pod_without_dns`), side by side: a packet of a
//!   tracked TCP connection (the common case), and a UDP packet from port 53 of an address that
//!   is not a trusted resolver (pays the resolver lookup).
//! * Answers from a trusted resolver for a listed name with 1, 10 and 100 A records (every
//!   repetition learns them again: a lookup and an update per address), and an answer for an
//!   unlisted name (read up to the question), against the same packet without the DNS code.
//! * Answers with 100 addresses new to the map (inserted, not refreshed): one run per answer,
//!   so the figure includes the test run's own per-run overhead on both sides.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::Context;
use bulkhead_agent::{
    fqdn::NamePattern,
    loader::{Dataplane, PROG_TO_POD, PROG_TO_POD_WITHOUT_DNS},
    netns::Netns,
    privileged::missing_privileges,
    sync::{Enforcer, RouteResolver},
};
use bulkhead_common::fqdn::fqdn_stat;
use bulkhead_controller::ruleset::{
    Action, DirectionPolicy, Endpoint, EndpointPolicy, IpCacheEntry, PolicyEntry, PortRange,
    RuleSet, Stage, Tier,
};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// BPF_PROG_TEST_RUN repetitions per measurement of a packet that is not an answer.
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Repetitions per measurement of an answer.
    #[arg(long, default_value_t = 20_000)]
    answer_repeat: u32,
    /// Measurements per cell; the median is reported.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
}

const EP: [u8; 4] = [10, 0, 0, 2];
const PEER: [u8; 4] = [10, 0, 0, 1];
const RESOLVER: [u8; 4] = [10, 96, 0, 10];
const OTHER: [u8; 4] = [10, 96, 0, 11];
/// Answers of 100 new addresses each for the first-learning row.
const FIRST_LEARN_ANSWERS: u8 = 200;

fn ruleset() -> RuleSet {
    let ipcache = [
        ("10.0.0.2/32", 300),
        ("10.0.0.1/32", 301),
        ("10.96.0.10/32", 301),
        ("10.96.0.11/32", 301),
    ]
    .into_iter()
    .map(|(cidr, identity)| IpCacheEntry {
        cidr: cidr.parse().expect("cidr"),
        identity,
        quarantined: false,
        quarantine_allow: Vec::new(),
    })
    .collect();
    RuleSet {
        node: "bench".into(),
        version: 1,
        endpoints: vec![Endpoint {
            id: 1,
            namespace: "bench".into(),
            pod: "client".into(),
            workload: None,
            identity: 300,
            ips: vec![IpAddr::V4(Ipv4Addr::from(EP))],
            interface: Some("ep0".into()),
            quarantined: false,
            policy: 300,
        }],
        policies: [(
            300,
            EndpointPolicy {
                ingress: DirectionPolicy {
                    isolated_by: Some(1),
                    staged_isolated_by: Some(1),
                    entries: vec![PolicyEntry {
                        peer: 301,
                        protocol: None,
                        ports: PortRange::ALL,
                        tier: Tier::Application,
                        priority: 0,
                        action: Action::Allow,
                        stage: Stage::Enforced,
                        rule: 2,
                    }],
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

fn udp(src: [u8; 4], sport: u16, payload: &[u8]) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, EP, 64)
        .udp(sport, 40000);
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("build packet");
    out
}

fn tcp_ack(src: [u8; 4], sport: u16, dport: u16, syn: bool) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, EP, 64)
        .tcp(sport, dport, 1, 64240);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut out = Vec::new();
    b.write(&mut out, &[]).expect("build packet");
    out
}

/// An answer for `name` with `n` A records whose owners point at the question.
fn answer(name: &str, n: u16) -> Vec<u8> {
    answer_in(name, n, 18)
}

/// The same, its addresses in 198.`b`.0.0/16.
fn answer_in(name: &str, n: u16, b: u8) -> Vec<u8> {
    let mut m = vec![0x12, 0x34, 0x81, 0x80, 0, 1];
    m.extend_from_slice(&n.to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    for label in name.split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    for i in 0..n {
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0x0e, 0x10, 0, 4]);
        m.extend_from_slice(&[198, b, (i >> 8) as u8, i as u8]);
    }
    m
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One row: a packet through both programs, interleaved round by round.
struct Row {
    what: String,
    with_dns: f64,
    without: f64,
}

fn measure(
    dp: &mut Dataplane,
    ifx: u32,
    what: String,
    pkt: &[u8],
    repeat: u32,
    rounds: usize,
) -> anyhow::Result<Row> {
    let (mut with_dns, mut without) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (v, d) = dp.test_run(PROG_TO_POD, pkt, ifx, repeat)?;
        anyhow::ensure!(v == 0, "{what}: dropped");
        with_dns.push(d.as_nanos() as f64);
        let (v, d) = dp.test_run(PROG_TO_POD_WITHOUT_DNS, pkt, ifx, repeat)?;
        anyhow::ensure!(v == 0, "{what}: dropped without DNS");
        without.push(d.as_nanos() as f64);
    }
    Ok(Row {
        what,
        with_dns: median(with_dns),
        without: median(without),
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(why) = missing_privileges() {
        anyhow::bail!("this benchmark loads eBPF programs: {why}");
    }
    let pins = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/bulkhead-bench-dns-{}",
        std::process::id()
    ));
    let ns = Netns::create(&format!("bh-bench-dns-{}", std::process::id())).context("namespace")?;
    ns.exec(&[
        "ip", "link", "add", "ep0", "type", "veth", "peer", "name", "ep0p",
    ])?;
    ns.exec(&["ip", "link", "set", "ep0", "up"])?;
    let pin_dir = pins.clone();
    let (repeat, answer_repeat, rounds) = (args.repeat, args.answer_repeat, args.rounds);
    let result = ns.run(move || -> anyhow::Result<(Vec<Row>, [u64; 5])> {
        let dp = Dataplane::load(&pin_dir)?;
        let mut e = Enforcer::new(dp)?;
        let ifx = nix::net::if_::if_nametoindex("ep0")?;
        e.apply(&ruleset(), &RouteResolver)?;
        let dp = e.dataplane();
        dp.ensure_fqdn_config(0, 0)?;
        dp.add_trusted_resolver(IpAddr::V4(Ipv4Addr::from(RESOLVER)))?;
        let name: NamePattern = "api.example.com".parse()?;
        dp.set_fqdn_name(&name, 100)?;
        // A tracked TCP connection from the peer: opened once, then measured on its ACKs.
        let (v, _) = dp.test_run(PROG_TO_POD, &tcp_ack(PEER, 40001, 80, true), ifx, 1)?;
        anyhow::ensure!(v == 0, "connection refused");
        let mut rows = vec![
            measure(
                dp,
                ifx,
                "tracked TCP segment (not DNS)".into(),
                &tcp_ack(PEER, 40001, 80, false),
                repeat,
                rounds,
            )?,
            measure(
                dp,
                ifx,
                "UDP from port 53, not a trusted resolver".into(),
                &udp(OTHER, 53, &answer("api.example.com", 1)),
                repeat,
                rounds,
            )?,
            measure(
                dp,
                ifx,
                "answer for an unlisted name (1 A)".into(),
                &udp(RESOLVER, 53, &answer("other.example.com", 1)),
                answer_repeat,
                rounds,
            )?,
        ];
        for n in [1u16, 10, 100] {
            rows.push(measure(
                dp,
                ifx,
                format!("answer with {n} A, learned"),
                &udp(RESOLVER, 53, &answer("api.example.com", n)),
                answer_repeat,
                rounds,
            )?);
        }
        let learned = dp.learned()?.len();
        anyhow::ensure!(
            learned == 100,
            "expected 100 learned addresses, found {learned}"
        );
        // The rows above learn addresses the map has already (a name resolved again, refreshed
        // in place). Addresses new to the map are inserted: one run per answer, each answer's
        // 100 addresses in a /16 of their own, against the same answers without the DNS code.
        let (mut first, mut base) = (Vec::new(), Vec::new());
        for b in 19..(19 + FIRST_LEARN_ANSWERS) {
            let pkt = udp(RESOLVER, 53, &answer_in("api.example.com", 100, b));
            let (v, d) = dp.test_run(PROG_TO_POD_WITHOUT_DNS, &pkt, ifx, 1)?;
            anyhow::ensure!(v == 0, "answer dropped without DNS");
            base.push(d.as_nanos() as f64);
            let (v, d) = dp.test_run(PROG_TO_POD, &pkt, ifx, 1)?;
            anyhow::ensure!(v == 0, "answer dropped");
            first.push(d.as_nanos() as f64);
        }
        rows.push(Row {
            what: format!("answer with 100 new A, one run each (x{FIRST_LEARN_ANSWERS})"),
            with_dns: median(first),
            without: median(base),
        });
        Ok((rows, dp.fqdn_stats()?))
    });
    let _ = bulkhead_agent::loader::remove_pins(&pins);
    let (rows, stats) = result.context("enter namespace")??;
    println!(
        "\nbulkhead_to_pod with and without learning DNS answers, BPF_PROG_TEST_RUN (median of \
         {rounds}; {repeat} repetitions per non-answer, {answer_repeat} per answer), ns/packet"
    );
    println!(
        "{:<44} | {:>10} | {:>10} | {:>9} | {:>6}",
        "packet", "with DNS", "without", "diff", "ratio"
    );
    for r in &rows {
        println!(
            "{:<44} | {:>10.1} | {:>10.1} | {:>+9.1} | {:>6.3}",
            r.what,
            r.with_dns,
            r.without,
            r.with_dns - r.without,
            r.with_dns / r.without
        );
    }
    println!(
        "answers learned {}, unlisted {}, rejected {}, addresses written {}, failed {}",
        stats[fqdn_stat::ANSWERS_LEARNED as usize],
        stats[fqdn_stat::ANSWERS_UNLISTED as usize],
        stats[fqdn_stat::ANSWERS_REJECTED as usize],
        stats[fqdn_stat::ADDRESSES_LEARNED as usize],
        stats[fqdn_stat::LEARN_FAILED as usize],
    );
    Ok(())
}
