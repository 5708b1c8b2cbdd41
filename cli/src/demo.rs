//! `bulkhead demo`: the mission end to end on a small shop spread over namespaces and two lab
//! nodes — traffic flows, least-privilege policies go in, denied attempts show up as flows that
//! name the rule that dropped them. Non-interactive; `--keep` leaves the lab running.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context;
use bulkhead_controller::server::api::{FlowLine, FlowQuery, FlowView};
use clap::Args;

use crate::lab::{self, state::LabState};

#[derive(Args)]
pub struct DemoArgs {
    /// The shop's manifests (pods and namespaces) and its least-privilege policies.
    #[arg(long, default_value = "examples/demo")]
    examples: PathBuf,
    /// Leave the lab running for exploration (`bulkhead lab --state … status|probe|exec|down`).
    #[arg(long)]
    keep: bool,
    /// Where the demo's lab lives.
    #[arg(long, default_value = "/var/run/bulkhead/demo")]
    state: PathBuf,
}

fn step(n: u32, text: &str) {
    println!("\n== {n}. {text}");
}

/// Each service on its own port: who reaches it.
fn show_reachability(state: &LabState) -> anyhow::Result<()> {
    let mut services: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for p in state.user_pods() {
        for c in &p.ports {
            services.entry(c.port).or_default().push(p.key());
        }
    }
    for (port, owners) in services {
        let m = lab::probe_matrix(state, port, "TCP", Duration::from_millis(400))?;
        for owner in owners {
            let mut allowed = Vec::new();
            let mut blocked = Vec::new();
            for (src, row) in &m {
                if *src == owner {
                    continue;
                }
                match row.get(&owner) {
                    Some(true) => allowed.push(src.as_str()),
                    _ => blocked.push(src.as_str()),
                }
            }
            println!(
                "  {owner:<16} :{port:<5}  reached by [{}]   blocked [{}]",
                allowed.join(", "),
                blocked.join(", ")
            );
        }
    }
    Ok(())
}

/// Flows from the lab controller's `/api/flows`, filtered there.
fn api_flows(state: &LabState, query: FlowQuery) -> Vec<FlowLine> {
    lab::http_get(state.http_port, &query.path())
        .and_then(|b| serde_json::from_str::<Vec<FlowView>>(&b).ok())
        .unwrap_or_default()
        .into_iter()
        .map(|f| f.line)
        .collect()
}

fn denied_flows(state: &LabState) -> Vec<FlowLine> {
    let query = FlowQuery {
        verdict: Some("denied".into()),
        ..FlowQuery::default()
    };
    api_flows(state, query)
        .into_iter()
        .filter(|f| f.protocol == 6)
        .collect()
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let shop = args.examples.join("shop.yaml");
    let policies = args.examples.join("policies.yaml");
    for f in [&shop, &policies] {
        if !f.exists() {
            anyhow::bail!(
                "{} not found: run the demo from the repository root or pass --examples",
                f.display()
            );
        }
    }
    let result = story(&args, &shop, &policies);
    if args.keep && result.is_ok() {
        let ui = lab::state::LabState::load(&args.state)
            .map(|st| format!("http://127.0.0.1:{}/", st.http_port))
            .unwrap_or_else(|_| "the controller's --http address".into());
        println!(
            "\n--keep: the lab stays up. Open the live service map at {ui}, or try:\n  bulkhead lab --state {s} status\n  bulkhead lab --state {s} probe --port 8080\n  bulkhead lab --state {s} exec tools/debug -- ip addr\n  bulkhead lab --state {s} down",
            s = args.state.display()
        );
    } else {
        println!("\nCleaning up the lab.");
        lab::down(&args.state)?;
    }
    result?;
    println!("demo finished in {:.1} s", started.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

fn story(args: &DemoArgs, shop: &Path, policies: &Path) -> anyhow::Result<()> {
    step(
        1,
        "A shop on two lab nodes: every pod a network namespace, every node an agent, one controller",
    );
    lab::up(
        &args.state,
        &[shop.to_path_buf()],
        2,
        false,
        19860,
        crate::agent::PrefilterChoice::Tc,
        lab::cluster::ClusterChoice::default(),
    )?;
    let state = LabState::load(&args.state)?;

    step(
        2,
        "No policy yet: every pod reaches every service (real TCP connections, across nodes)",
    );
    show_reachability(&state)?;

    step(
        3,
        "Least privilege goes in: NetworkPolicies (default deny in `shop`, only the paths it uses) and ServicePolicies (the db admits the backend's service account; nothing in `shop` reaches the world)",
    );
    println!("  {}", policies.display());
    lab::apply(&args.state, &[policies.to_path_buf()], false)?;

    step(
        4,
        "The same probes, now enforced by eBPF on every pod's veth",
    );
    show_reachability(&state)?;

    step(
        5,
        "Denied attempts are flows that name the rule that dropped them",
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut flows = denied_flows(&state);
    while flows.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        flows = denied_flows(&state);
    }
    let mut seen = std::collections::BTreeSet::new();
    for f in flows {
        let name = |named: &str, addr: &str| -> String {
            if named.is_empty() { addr } else { named }.to_string()
        };
        let (from, to) = if f.direction == "ingress" {
            (name(&f.peer, &f.src), name(&f.endpoint, &f.dst))
        } else {
            (name(&f.endpoint, &f.src), name(&f.peer, &f.dst))
        };
        let line = format!(
            "  {from} → {to}:{}  denied on {} at {}'s {}  by {}",
            f.dst_port, f.node, f.endpoint, f.direction, f.rule,
        );
        if seen.insert(line.clone()) {
            println!("{line}");
        }
        if seen.len() >= 8 {
            break;
        }
    }
    if seen.is_empty() {
        println!("  (no denied flow reached the controller yet)");
    }

    step(
        6,
        "tools/debug is compromised and scans the shop: quarantine it, now",
    );
    let exe = std::env::current_exe().context("find bulkhead")?;
    let before = lab::probe_matrix(&state, 80, "TCP", Duration::from_millis(400))?;
    let reach = |m: &BTreeMap<String, BTreeMap<String, bool>>, a: &str, b: &str| {
        m.get(a).and_then(|r| r.get(b)).copied().unwrap_or(false)
    };
    println!(
        "  before: tools/debug reaches shop/frontend:80: {}",
        reach(&before, "tools/debug", "shop/frontend")
    );
    let out = std::process::Command::new(&exe)
        .args([
            "quarantine",
            "tools/debug",
            "--reason",
            "port scan against the shop",
            "--lab",
        ])
        .arg(&args.state)
        .output()
        .context("run bulkhead quarantine")?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("  {line}");
    }
    if !out.status.success() {
        anyhow::bail!(
            "quarantine failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let after = lab::probe_matrix(&state, 80, "TCP", Duration::from_millis(400))?;
    println!(
        "  after:  tools/debug reaches shop/frontend:80: {}; anything reaches tools/debug:80: {}",
        reach(&after, "tools/debug", "shop/frontend"),
        after
            .iter()
            .any(|(src, row)| src != "tools/debug" && row.get("tools/debug") == Some(&true))
    );
    std::thread::sleep(Duration::from_millis(700));
    let quarantine_flows: Vec<FlowLine> = api_flows(&state, FlowQuery::default())
        .into_iter()
        .filter(|f| f.rule.contains("Quarantine") && f.protocol == 6)
        .take(3)
        .collect();
    for f in &quarantine_flows {
        println!(
            "  flow on {}: {} → {}:{} denied by {}",
            f.node, f.src, f.dst, f.dst_port, f.rule
        );
    }

    step(
        7,
        "The service graph, from every agent's flows (`bulkhead graph`; also /api/graph and DOT)",
    );
    let out = std::process::Command::new(&exe)
        .args(["graph", "--lab"])
        .arg(&args.state)
        .output()
        .context("run bulkhead graph")?;
    for line in String::from_utf8_lossy(&out.stdout).lines().take(14) {
        println!("  {line}");
    }

    step(
        8,
        "And the policy engine explains any pair without sending a packet",
    );
    let out = std::process::Command::new(&exe)
        .args(["policy", "explain", "-f"])
        .arg(shop)
        .arg("-f")
        .arg(policies)
        .args([
            "--from",
            "tools/debug",
            "--to",
            "shop/backend",
            "--port",
            "8080",
            "--protocol",
            "TCP",
        ])
        .output()
        .context("run bulkhead policy explain")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}
