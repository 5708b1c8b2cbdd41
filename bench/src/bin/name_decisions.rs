//! What deciding egress with learned DNS names costs a new connection (issue 19), with
//! BPF_PROG_TEST_RUN: figures, not a test; run as root.
//!
//! `cargo run --release -p bulkhead-bench --bin name_decisions [-- --repeat 1000000 --rounds 9
//! --names 10000]`
//!
//! The same admitted TCP SYN from a pod to a `world` address on port 443 through
//! `bulkhead_from_pod`, interleaved round by round:
//! * from an endpoint whose policy names no DNS name (Admin Accept of `world` on 443): the
//!   baseline, which pays one flag test for names;
//! * from an endpoint whose policy names four (Admin Accept of each on 443, and of `world`, so
//!   every row is admitted): to an address it learned nothing about (one learned-map lookup),
//!   and to one it learned under 1 and under 4 live names (the lookup, then the rank lookups of
//!   the address's identity and of each name, combined).
//!
//! With `--names N` (at least 4) the named policy admits N names on 443, the agent's name maps
//! list N patterns and the endpoint has learned N further addresses, each under its own name:
//! what a node with 10,000 names in use looks like to the lookups, which are hash lookups and
//! should cost what they cost with four.
//!
//! Every repetition of an admitted SYN takes the whole new-connection path: the policy decides
//! it, its conntrack entry is written again and a new-flow event is offered to the ring buffer
//! (which fills; the lost events are counted, on both sides alike).

use std::net::{IpAddr, Ipv4Addr};

use anyhow::Context;
use aya::maps::{HashMap, MapData};
use bulkhead_agent::{
    fqdn::{MAP_LEARNED_V4, NamePattern, monotonic_now_ns},
    loader::{Dataplane, PROG_FROM_POD},
    netns::Netns,
    privileged::missing_privileges,
    sync::{Enforcer, RouteResolver},
};
use bulkhead_common::{
    fqdn::{FqdnLearned, FqdnLearnedKeyV4},
    identity, stat,
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
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Names the named policy admits, listed in the name maps, each with a learned address.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(4..=60000))]
    names: u32,
}

const NAMED_EP: [u8; 4] = [10, 0, 0, 2];
const PLAIN_EP: [u8; 4] = [10, 0, 0, 3];
const UNLEARNED: [u8; 4] = [192, 0, 2, 10];
const ONE_NAME: [u8; 4] = [192, 0, 2, 11];
const FOUR_NAMES: [u8; 4] = [192, 0, 2, 12];
const NAMES: [u32; 4] = [
    identity::FIRST_NAME_IDENTITY + 1,
    identity::FIRST_NAME_IDENTITY + 2,
    identity::FIRST_NAME_IDENTITY + 3,
    identity::FIRST_NAME_IDENTITY + 4,
];

fn accept_443(peer: u32, priority: u16, rule: u32) -> PolicyEntry {
    PolicyEntry {
        peer,
        protocol: Some(Protocol::Tcp),
        ports: PortRange::single(443),
        tier: Tier::Admin,
        priority,
        action: Action::Allow,
        stage: Stage::Enforced,
        rule,
    }
}

fn endpoint(id: u32, identity: u32, ip: [u8; 4], iface: &str) -> Endpoint {
    Endpoint {
        id,
        namespace: "bench".into(),
        pod: format!("client-{id}"),
        workload: None,
        identity,
        ips: vec![IpAddr::V4(Ipv4Addr::from(ip))],
        interface: Some(iface.into()),
        quarantined: false,
        policy: identity,
    }
}

/// Egress isolated in both groups; the named group admits the four names and `world` on 443,
/// the plain one `world` only.
fn ruleset(names: u32) -> RuleSet {
    let egress = |entries| EndpointPolicy {
        ingress: DirectionPolicy::default(),
        egress: DirectionPolicy {
            isolated_by: Some(1),
            staged_isolated_by: Some(1),
            entries,
        },
    };
    let mut named: Vec<PolicyEntry> = NAMES
        .iter()
        .enumerate()
        .map(|(i, n)| accept_443(*n, 10, 10 + i as u32))
        .collect();
    named.extend((4..names).map(|i| accept_443(filler_name(i), 10, 100 + i)));
    named.push(accept_443(identity::WORLD, 20, 20));
    let ipcache = [("10.0.0.2/32", 300), ("10.0.0.3/32", 302)]
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
        endpoints: vec![
            endpoint(1, 300, NAMED_EP, "ep0"),
            endpoint(2, 302, PLAIN_EP, "ep1"),
        ],
        policies: [
            (300, egress(named)),
            (302, egress(vec![accept_443(identity::WORLD, 20, 20)])),
        ]
        .into_iter()
        .collect(),
        ipcache,
        rules: Default::default(),
        names: Vec::new(),
        dns_resolvers: Vec::new(),
    }
}

/// The name identity of the `i`th name beyond the four the rows use.
fn filler_name(i: u32) -> u32 {
    identity::FIRST_NAME_IDENTITY + 1000 + i
}

/// The address the endpoint learned under the `i`th filler name (198.18.0.0/15).
fn filler_addr(i: u32) -> [u8; 4] {
    (u32::from_be_bytes([198, 18, 0, 0]) + i).to_be_bytes()
}

fn syn(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .tcp(40000, 443, 1, 64240)
        .syn();
    let mut out = Vec::new();
    b.write(&mut out, &[]).expect("build packet");
    out
}

/// Endpoint 1 learned `addr` under `names`, each live for an hour.
fn learn(dp: &mut Dataplane, addr: [u8; 4], names: &[u32]) -> anyhow::Result<()> {
    let mut v = FqdnLearned::default();
    let until = monotonic_now_ns() + 3_600_000_000_000;
    for (i, n) in names.iter().enumerate() {
        v.name_ids[i] = *n;
        v.expires_ns[i] = until;
    }
    let mut m: HashMap<&mut MapData, FqdnLearnedKeyV4, FqdnLearned> = dp.map_mut(MAP_LEARNED_V4)?;
    let key = FqdnLearnedKeyV4 {
        endpoint_id: 1,
        addr: u32::from_ne_bytes(addr),
    };
    m.insert(key, v, 0)?;
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn stat_sum(dp: &mut Dataplane, index: u32) -> anyhow::Result<u64> {
    Ok(dp.stats()?.get(&index, 0)?.iter().sum())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(why) = missing_privileges() {
        anyhow::bail!("this benchmark loads eBPF programs: {why}");
    }
    let pins = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/bulkhead-bench-names-{}",
        std::process::id()
    ));
    let ns = Netns::create(&format!("bh-bench-nm-{}", std::process::id())).context("namespace")?;
    for (dev, peer) in [("ep0", "ep0p"), ("ep1", "ep1p")] {
        ns.exec(&[
            "ip", "link", "add", dev, "type", "veth", "peer", "name", peer,
        ])?;
        ns.exec(&["ip", "link", "set", dev, "up"])?;
    }
    let pin_dir = pins.clone();
    let (repeat, rounds, names) = (args.repeat, args.rounds, args.names);
    type Outcome = (Vec<(&'static str, f64)>, u64, u64);
    let result = ns.run(move || -> anyhow::Result<Outcome> {
        let dp = Dataplane::load(&pin_dir)?;
        let mut e = Enforcer::new(dp)?;
        let named = nix::net::if_::if_nametoindex("ep0")?;
        let plain = nix::net::if_::if_nametoindex("ep1")?;
        e.apply(&ruleset(names), &RouteResolver)?;
        let dp = e.dataplane();
        learn(dp, ONE_NAME, &NAMES[..1])?;
        learn(dp, FOUR_NAMES, &NAMES)?;
        dp.ensure_fqdn_config(0, 0)?;
        for i in 0..names {
            let id = if i < 4 {
                NAMES[i as usize]
            } else {
                filler_name(i)
            };
            let pattern = NamePattern::parse(&format!("n{i}.example.com"))?;
            dp.set_fqdn_name(&pattern, id)?;
            if i >= 4 {
                learn(dp, filler_addr(i), &[id])?;
            }
        }
        let learned = dp.learned()?.len();
        anyhow::ensure!(
            learned == names as usize - 4 + 2,
            "{learned} learned addresses"
        );
        let cases: [(&'static str, u32, Vec<u8>); 4] = [
            (
                "no name entries (baseline)",
                plain,
                syn(PLAIN_EP, UNLEARNED),
            ),
            (
                "name entries, address not learned",
                named,
                syn(NAMED_EP, UNLEARNED),
            ),
            ("name entries, 1 live name", named, syn(NAMED_EP, ONE_NAME)),
            (
                "name entries, 4 live names",
                named,
                syn(NAMED_EP, FOUR_NAMES),
            ),
        ];
        for (what, ifx, pkt) in &cases {
            let (v, _) = dp.test_run(PROG_FROM_POD, pkt, *ifx, 1)?;
            anyhow::ensure!(v == 0, "{what}: refused");
        }
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
        for _ in 0..rounds {
            for (i, (_, ifx, pkt)) in cases.iter().enumerate() {
                let (_, d) = dp.test_run(PROG_FROM_POD, pkt, *ifx, repeat)?;
                samples[i].push(d.as_nanos() as f64);
            }
        }
        let rows = cases
            .iter()
            .zip(samples)
            .map(|((what, _, _), s)| (*what, median(s)))
            .collect();
        Ok((
            rows,
            stat_sum(dp, stat::NAME_LOOKUPS)?,
            stat_sum(dp, stat::NAME_DECISIONS)?,
        ))
    });
    let _ = bulkhead_agent::loader::remove_pins(&pins);
    let (rows, lookups, decisions) = result.context("enter namespace")??;
    println!(
        "\nan admitted TCP SYN to a world address through bulkhead_from_pod, BPF_PROG_TEST_RUN \
         (median of {rounds}; {repeat} repetitions each), ns/packet; the named policy admits \
         {names} names, all listed in the name maps, {} further addresses learned",
        names - 4
    );
    println!(
        "{:<40} | {:>8} | {:>8} | {:>6}",
        "new connection", "ns", "diff", "ratio"
    );
    let base = rows[0].1;
    for (what, ns) in &rows {
        println!(
            "{:<40} | {:>8.1} | {:>+8.1} | {:>6.3}",
            what,
            ns,
            ns - base,
            ns / base
        );
    }
    println!("learned-name lookups {lookups}, decisions with names {decisions}");
    Ok(())
}
