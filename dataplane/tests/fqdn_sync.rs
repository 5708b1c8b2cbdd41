//! Issue 19, the agent's half against the real pinned maps: the names of a rule set end up in
//! the name maps under their ids and a later rule set removes what it no longer has (and what
//! was learned for it), the trusted resolvers are the rule set's plus the agent's own, an
//! expired learned address is swept and counted, and the agent's `/metrics` shows it all.

mod common;

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData};
use bulkhead_agent::{
    agent::{
        AgentConfig, RuleSource,
        names::{FqdnSettings, NameSync},
    },
    fqdn::{Expired, MAP_LEARNED_V4, NamePattern, monotonic_now_ns},
    loader::Dataplane,
    privileged::check_privileged_test,
};
use bulkhead_common::fqdn::{FQDN_MAX_IDS, FqdnLearned, FqdnLearnedKeyV4};
use bulkhead_ruleset::{NameEntry, RuleSet};
use common::*;

fn addr(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn pattern(s: &str) -> NamePattern {
    s.parse().expect("pattern")
}

fn rule_set(version: u64, names: &[&str], resolvers: &[&str]) -> RuleSet {
    let mut rs = ruleset(
        version,
        vec![endpoint(1, "client", 300, addr("10.0.0.1"), "bh-fqdn-none")],
        vec![],
    );
    rs.names = names.iter().map(|n| NameEntry::of(pattern(n))).collect();
    rs.names.sort();
    rs.dns_resolvers = resolvers.iter().map(|a| addr(a)).collect();
    rs
}

/// One learned address: `ids` with their expiries.
fn learn(dp: &mut Dataplane, endpoint_id: u32, a: Ipv4Addr, ids: &[(u32, u64)]) {
    let mut v = FqdnLearned::default();
    assert!(ids.len() <= FQDN_MAX_IDS);
    for (i, (id, exp)) in ids.iter().enumerate() {
        v.name_ids[i] = *id;
        v.expires_ns[i] = *exp;
    }
    let key = FqdnLearnedKeyV4 {
        endpoint_id,
        addr: u32::from_ne_bytes(a.octets()),
    };
    let mut m: HashMap<&mut MapData, FqdnLearnedKeyV4, FqdnLearned> =
        dp.map_mut(MAP_LEARNED_V4).expect("learned map");
    m.insert(key, v, 0).expect("insert learned");
}

#[test]
fn names_and_resolvers_follow_the_rule_set_and_expired_entries_are_swept() {
    if !check_privileged_test(
        "names_and_resolvers_follow_the_rule_set_and_expired_entries_are_swept",
    ) {
        return;
    }
    let pins = PinDir::new("fqdn-sync");
    let mut dp = Dataplane::load(pins.path()).expect("load");
    let settings = FqdnSettings {
        extra_resolvers: vec![addr("169.254.20.10")],
        min_ttl: Duration::from_secs(7),
        ..FqdnSettings::default()
    };
    let mut sync = NameSync::start(&mut dp, settings.clone()).expect("start");
    let cfg = dp.fqdn_config().expect("config");
    assert!(cfg.enabled());
    assert_eq!(cfg.min_ttl_s, 7);
    assert_eq!(cfg.max_ttl_s, 86_400);

    let rs1 = rule_set(
        1,
        &["api.example.com", "*.example.org"],
        &["10.240.1.10", "fd00:240::1:a"],
    );
    let report = sync.sync(&mut dp, &rs1).expect("sync");
    assert_eq!((report.names_written, report.names), (2, 2));
    for n in &rs1.names {
        assert_eq!(dp.fqdn_name(&n.pattern).expect("read"), Some(n.identity));
    }
    let want = vec![
        addr("10.240.1.10"),
        addr("169.254.20.10"),
        addr("fd00:240::1:a"),
    ];
    assert_eq!(dp.trusted_resolvers().expect("resolvers"), want);
    // Again: nothing to do.
    let again = sync.sync(&mut dp, &rs1).expect("sync");
    assert_eq!(
        (
            again.names_written,
            again.names_removed,
            again.resolvers_added
        ),
        (0, 0, 0)
    );

    // What endpoint 1 learned for each name; endpoint 9 is not in the rule set.
    let api = NameEntry::of(pattern("api.example.com")).identity;
    let wild = NameEntry::of(pattern("*.example.org")).identity;
    let later = monotonic_now_ns() + 600_000_000_000;
    learn(
        &mut dp,
        1,
        Ipv4Addr::new(192, 0, 2, 1),
        &[(api, later), (wild, later)],
    );
    learn(&mut dp, 1, Ipv4Addr::new(192, 0, 2, 2), &[(wild, later)]);

    // The wildcard goes, a resolver goes: both leave the kernel, and what was learned for the
    // wildcard is forgotten (the address learned for both keeps the other name).
    let rs2 = rule_set(2, &["api.example.com"], &["10.240.1.10"]);
    let report = sync.sync(&mut dp, &rs2).expect("sync");
    assert_eq!((report.names_removed, report.learned_forgotten), (1, 2));
    assert_eq!(dp.fqdn_name(&pattern("*.example.org")).expect("read"), None);
    assert_eq!(
        dp.fqdn_name(&pattern("api.example.com")).expect("read"),
        Some(api)
    );
    assert_eq!(
        dp.trusted_resolvers().expect("resolvers"),
        vec![addr("10.240.1.10"), addr("169.254.20.10")]
    );
    let learned = dp.learned().expect("learned");
    assert_eq!(learned.len(), 1, "{learned:?}");
    assert_eq!(learned[0].names, vec![(api, later)]);

    // An expired entry is swept and reported; the live one stays.
    let past = monotonic_now_ns() - 1;
    learn(&mut dp, 1, Ipv4Addr::new(192, 0, 2, 3), &[(api, past)]);
    let swept = sync.sweep(&mut dp, monotonic_now_ns()).expect("sweep");
    assert_eq!(
        swept.expired,
        vec![Expired {
            endpoint_id: 1,
            addr: addr("192.0.2.3"),
            name_id: api,
        }]
    );
    assert_eq!((swept.learned_v4, swept.learned_v6), (1, 0));

    // A restarted agent keeps the secret, so the names need no rewrite.
    let mut sync = NameSync::start(&mut dp, settings).expect("restart");
    assert_eq!(dp.fqdn_config().expect("config").key, cfg.key);
    let report = sync.sync(&mut dp, &rs2).expect("sync");
    assert_eq!((report.names_written, report.names_removed), (0, 0));
}

fn scrape(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// The value of a metric line that starts with `prefix` (name and labels).
fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The agent runtime end to end (a rule-set file, no interfaces): its names and resolvers
/// reach the kernel, an expired learned address is swept within seconds, and `/metrics` over
/// HTTP shows the names, resolvers, learning counters and the expiry.
#[test]
fn the_agent_syncs_names_sweeps_and_reports_on_metrics() {
    if !check_privileged_test("the_agent_syncs_names_sweeps_and_reports_on_metrics") {
        return;
    }
    let pins = PinDir::new("fqdn-agent");
    let file = std::env::temp_dir().join(format!("bulkhead-fqdn-sync-{}.json", std::process::id()));
    let mut rs = rule_set(1, &["api.example.com", "*.example.org"], &["10.240.1.10"]);
    rs.node = "fqdn-node".into();
    rs.endpoints.clear();
    rs.policies.clear();
    std::fs::write(&file, serde_json::to_string(&rs).expect("json")).expect("write");
    let free = |()| {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
    };
    let metrics_addr = free(());
    let config = AgentConfig {
        node: "fqdn-node".into(),
        source: RuleSource::File(file.clone()),
        pin_dir: pins.path().to_path_buf(),
        once: false,
        metrics_addr,
        http_addr: free(()),
        http_unauthenticated: false,
        flow_buffer: 100,
        netns: None,
        uplinks: Vec::new(),
        prefilter: None,
        fqdn: FqdnSettings {
            extra_resolvers: vec![addr("169.254.20.10")],
            ..FqdnSettings::default()
        },
    };
    // The agent runs until the test process ends (it stops only on a signal).
    std::thread::spawn(move || bulkhead_agent::agent::run(config));

    let deadline = Instant::now() + Duration::from_secs(60);
    let wait_for = |what: &str, ok: &dyn Fn(&str) -> bool| -> String {
        loop {
            if let Some(text) = scrape(metrics_addr)
                && ok(&text)
            {
                return text;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let text = wait_for("the names on /metrics", &|t| {
        metric(t, "bulkhead_agent_fqdn_names ") == Some(2.0)
    });
    assert_eq!(
        metric(&text, "bulkhead_agent_fqdn_trusted_resolvers "),
        Some(2.0)
    );
    assert!(
        text.contains("bulkhead_agent_fqdn_answers_total{kind=\"answers_learned\"} 0"),
        "{text}"
    );

    // The agent's maps, opened beside it.
    let mut dp = Dataplane::load(pins.path()).expect("open the agent's pins");
    for n in &rs.names {
        assert_eq!(dp.fqdn_name(&n.pattern).expect("read"), Some(n.identity));
    }
    assert_eq!(
        dp.trusted_resolvers().expect("resolvers"),
        vec![addr("10.240.1.10"), addr("169.254.20.10")]
    );
    let api = rs.names[0].identity;
    let later = monotonic_now_ns() + 600_000_000_000;
    learn(&mut dp, 4, Ipv4Addr::new(192, 0, 2, 4), &[(api, later)]);
    learn(
        &mut dp,
        4,
        Ipv4Addr::new(192, 0, 2, 5),
        &[(api, monotonic_now_ns() - 1)],
    );
    let text = wait_for("the expiry on /metrics", &|t| {
        metric(t, "bulkhead_agent_fqdn_expired_total ") == Some(1.0)
    });
    assert_eq!(
        metric(
            &text,
            "bulkhead_agent_fqdn_learned_addresses{family=\"ipv4\"} "
        ),
        Some(1.0),
        "{text}"
    );
    let learned = dp.learned().expect("learned");
    assert_eq!(learned.len(), 1, "{learned:?}");
    assert_eq!(learned[0].addr, addr("192.0.2.4"));
    let _ = std::fs::remove_file(&file);
}
