//! `bulkhead policy evaluate | explain | compile`: the policy engine on manifest files.
//!
//! Quarantines in the input are honoured like in the controller: active ones (their
//! `expiresAt`, if any, after the current time) override every other policy of the pods they
//! select, and `explain` names them ("x/a is quarantined by Quarantine x/q1: REASON; …").
//!
//! Exit codes: 0 when every input document was valid, 1 when some were invalid (they are listed
//! on stderr as `FILE: document N: field.path: reason`, and the valid ones are still used),
//! 2 for usage errors (unknown pod or node, bad arguments).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use bulkhead_controller::reachability::{Reachability, assign_synthetic_ips, parse_pod_key};
use bulkhead_controller::ruleset::{Protocol, Verdict};
use bulkhead_controller::{EngineConfig, Loaded, PolicyEngine, load_paths};

#[derive(clap::Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(clap::Subcommand)]
enum PolicyCommand {
    /// Reachability matrix of every ordered pair of pods (source egress AND destination ingress).
    Evaluate(EvaluateArgs),
    /// Why one connection is allowed or denied, per direction, naming the deciding rule.
    Explain(ExplainArgs),
    /// Print the compiled per-node rule sets (the agent's input) as JSON.
    Compile(CompileArgs),
    /// Ask a running controller, per policy, on how many of the nodes it concerns the current
    /// version is realized in the kernel.
    Status(StatusArgs),
    /// Least-privilege NetworkPolicies learned from the traffic a controller saw, as YAML.
    Recommend(crate::recommend::RecommendArgs),
    /// Enforce a staged policy: a StagedNetworkPolicy (or StagedClusterNetworkPolicy) becomes
    /// the policy of its name, an audit-mode ServicePolicy an enforcing one, in one change.
    Promote(crate::promote::PromoteArgs),
    /// What a proposed change (policies added, changed or deleted) would do to the recorded
    /// traffic: every edge whose verdict or deciding rule changes.
    Impact(crate::impact::ImpactArgs),
}

#[derive(clap::Args)]
struct StatusArgs {
    #[command(flatten)]
    conn: crate::quarantine::Connection,
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: TextFormat,
}

#[derive(clap::Args)]
struct InputArgs {
    /// YAML files or directories (searched recursively for *.yaml / *.yml); repeatable.
    #[arg(short = 'f', long = "filename", required = true, num_args = 1.., value_name = "FILE_OR_DIR")]
    files: Vec<PathBuf>,
    /// Node that pods without spec.nodeName are placed on.
    #[arg(long, default_value = "node-1", value_name = "NAME")]
    default_node: String,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MatrixFormat {
    Table,
    Json,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TextFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum JsonFormat {
    Json,
}

#[derive(clap::Args)]
struct EvaluateArgs {
    #[command(flatten)]
    input: InputArgs,
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    /// TCP, UDP, SCTP, ICMP or ICMPv6.
    #[arg(long, default_value = "TCP", value_parser = parse_protocol)]
    protocol: Protocol,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: MatrixFormat,
}

#[derive(clap::Args)]
struct ExplainArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Source pod, namespace/name.
    #[arg(long, value_name = "NS/POD")]
    from: String,
    /// Destination pod, namespace/name.
    #[arg(
        long,
        value_name = "NS/POD",
        required_unless_present = "to_name",
        conflicts_with = "to_name"
    )]
    to: Option<String>,
    /// Destination outside the cluster by DNS name (e.g. api.example.com): the egress decision
    /// once the pod has resolved the name (ClusterNetworkPolicy domainNames, ServicePolicy fqdn).
    #[arg(long, value_name = "NAME")]
    to_name: Option<String>,
    /// With --to-name: the address the name resolved to (default 192.0.2.1, an address no
    /// cluster has, so only policies by name or for the whole world apply).
    #[arg(long, value_name = "IP", requires = "to_name")]
    address: Option<std::net::IpAddr>,
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    #[arg(long, default_value = "TCP", value_parser = parse_protocol)]
    protocol: Protocol,
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: TextFormat,
}

#[derive(clap::Args)]
struct CompileArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Print only this node's rule set (one RuleSet object instead of an object keyed by node).
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value = "json")]
    output: JsonFormat,
}

fn parse_protocol(s: &str) -> Result<Protocol, String> {
    match s.to_ascii_uppercase().as_str() {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        "ICMP" => Ok(Protocol::Icmp),
        "ICMPV6" => Ok(Protocol::Icmpv6),
        _ => Err(format!(
            "unknown protocol {s:?}: use TCP, UDP, SCTP, ICMP or ICMPv6"
        )),
    }
}

pub fn run(args: PolicyArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        PolicyCommand::Evaluate(a) => evaluate(a),
        PolicyCommand::Explain(a) => explain(a),
        PolicyCommand::Compile(a) => compile(a),
        PolicyCommand::Status(a) => status(a),
        PolicyCommand::Recommend(a) => crate::recommend::recommend(a),
        PolicyCommand::Promote(a) => crate::promote::promote(a),
        PolicyCommand::Impact(a) => crate::impact::impact(a),
    }
}

fn status(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let resp = rt.block_on(async {
        let mut c = crate::quarantine::client(&a.conn).await?;
        let r = c
            .policy_status(bulkhead_proto::v1::PolicyStatusRequest {})
            .await?
            .into_inner();
        Ok::<_, anyhow::Error>(r)
    })?;
    let mut out = std::io::stdout().lock();
    match a.output {
        TextFormat::Json => {
            let policies: Vec<serde_json::Value> = resp
                .policies
                .iter()
                .map(|p| {
                    serde_json::json!({"kind": p.kind, "namespace": p.namespace, "name": p.name,
                        "nodes": p.nodes, "realized": p.realized})
                })
                .collect();
            let peers: Vec<serde_json::Value> = resp
                .peers
                .iter()
                .map(|p| {
                    serde_json::json!({"name": p.name, "address": p.address,
                        "state": peer_state_name(p.state),
                        "last_update_age_seconds": p.last_update_age_ms.map(|ms| ms as f64 / 1000.0),
                        "pods": p.pods, "namespaces": p.namespaces, "epoch": p.epoch,
                        "version": p.version, "updates": p.updates, "error": p.error})
                })
                .collect();
            serde_json::to_writer_pretty(
                &mut out,
                &serde_json::json!({"policies": policies, "peers": peers}),
            )?;
            writeln!(out)?;
        }
        TextFormat::Text => {
            writeln!(out, "{:<22} {:<40} {:>9}", "KIND", "POLICY", "REALIZED")?;
            for p in &resp.policies {
                let name = if p.namespace.is_empty() {
                    p.name.clone()
                } else {
                    format!("{}/{}", p.namespace, p.name)
                };
                writeln!(
                    out,
                    "{:<22} {:<40} {:>4}/{:<4}",
                    p.kind, name, p.realized, p.nodes
                )?;
            }
            if !resp.peers.is_empty() {
                writeln!(out)?;
                writeln!(
                    out,
                    "{:<20} {:<13} {:>12} {:>7}  ERROR",
                    "PEER", "STATE", "LAST UPDATE", "PODS"
                )?;
                for p in &resp.peers {
                    let age = p.last_update_age_ms.map_or("never".to_string(), |ms| {
                        humantime::format_duration(std::time::Duration::from_secs(ms / 1000))
                            .to_string()
                            + " ago"
                    });
                    writeln!(
                        out,
                        "{:<20} {:<13} {:>12} {:>7}  {}",
                        p.name,
                        peer_state_name(p.state),
                        age,
                        p.pods,
                        p.error
                    )?;
                }
            }
        }
    }
    let all = resp.policies.iter().all(|p| p.realized == p.nodes);
    Ok(if all {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

fn peer_state_name(state: i32) -> &'static str {
    use bulkhead_proto::v1::PeerImportState as S;
    match S::try_from(state) {
        Ok(S::Connecting) => "connecting",
        Ok(S::Synced) => "synced",
        Ok(S::Disconnected) => "disconnected",
        Ok(S::Refused) => "refused",
        Ok(S::Unspecified) | Err(_) => "unknown",
    }
}

/// Loads the inputs and reports their problems on stderr; returns the exit code the problems
/// call for (0 or 1) alongside the loaded objects.
fn load(input: &InputArgs) -> (Loaded, u8) {
    let loaded = load_paths(&input.files);
    for w in &loaded.skipped {
        eprintln!("warning: {w}");
    }
    for e in &loaded.errors {
        eprintln!("{e}");
    }
    let code = if loaded.errors.is_empty() { 0 } else { 1 };
    (loaded, code)
}

fn config(input: &InputArgs) -> EngineConfig {
    EngineConfig {
        unscheduled_node: input.default_node.clone(),
        ..EngineConfig::default()
    }
}

fn build(input: &InputArgs, synthetic_ips: bool) -> anyhow::Result<(PolicyEngine, u8)> {
    let (loaded, code) = load(input);
    let mut objects = loaded.objects;
    if synthetic_ips {
        assign_synthetic_ips(&mut objects);
    }
    let engine = PolicyEngine::new(config(input), objects).context("compiling the policies")?;
    Ok((engine, code))
}

fn evaluate(a: EvaluateArgs) -> anyhow::Result<ExitCode> {
    let (engine, code) = build(&a.input, true)?;
    let matrix = Reachability::new(&engine).matrix(a.protocol, a.port);
    let mut out = std::io::stdout().lock();
    match a.output {
        MatrixFormat::Json => {
            serde_json::to_writer(&mut out, &matrix)?;
            writeln!(out)?;
        }
        MatrixFormat::Table => write_table(&mut out, &matrix, a.protocol, a.port)?,
    }
    Ok(ExitCode::from(code))
}

pub(crate) fn write_table(
    out: &mut impl Write,
    matrix: &BTreeMap<String, BTreeMap<String, bool>>,
    protocol: Protocol,
    port: u16,
) -> std::io::Result<()> {
    // Columns are every source and destination: the rows' own names in a square matrix, more
    // when sources reach destinations that are no source (a peer cluster's pods in the lab).
    let names: Vec<&String> = matrix
        .keys()
        .chain(matrix.values().flat_map(|r| r.keys()))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let width = names
        .iter()
        .map(|n| n.chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    let proto = format!("{protocol:?}").to_uppercase();
    writeln!(
        out,
        "{port}/{proto}: ✓ allowed, ✗ denied; rows are sources, columns destinations (numbered)"
    )?;
    write!(out, "{:>w$}", "", w = width + 4)?;
    for i in 0..names.len() {
        write!(out, "{:>3}", i + 1)?;
    }
    writeln!(out)?;
    for (i, from) in names.iter().enumerate() {
        if !matrix.contains_key(*from) {
            continue;
        }
        write!(out, "{:>3} {:<width$}", i + 1, from)?;
        for to in &names {
            let ok = matrix
                .get(*from)
                .and_then(|r| r.get(*to))
                .copied()
                .unwrap_or(false);
            write!(out, "{:>3}", if ok { "✓" } else { "✗" })?;
        }
        writeln!(out)?;
    }
    // Destinations that are no source are named below the rows.
    for (i, to) in names.iter().enumerate() {
        if !matrix.contains_key(*to) {
            writeln!(out, "{:>3} {to}  (destination only)", i + 1)?;
        }
    }
    Ok(())
}

fn explain(a: ExplainArgs) -> anyhow::Result<ExitCode> {
    let from = match parse_pod_key(&a.from) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let to = match a.to.as_deref().map(parse_pod_key).transpose() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let (engine, code) = build(&a.input, true)?;
    let reach = Reachability::new(&engine);
    let answer = match (&to, &a.to_name) {
        (Some(to), _) => reach.explain(&from, to, a.protocol, a.port),
        (None, Some(name)) => {
            let address = a.address.unwrap_or(std::net::IpAddr::from([192, 0, 2, 1]));
            reach.explain_to_name(&from, name, address, a.protocol, a.port)
        }
        (None, None) => {
            eprintln!("error: name the destination with --to NS/POD or --to-name NAME");
            return Ok(ExitCode::from(2));
        }
    };
    let x = match answer {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let mut out = std::io::stdout().lock();
    match a.output {
        TextFormat::Json => {
            serde_json::to_writer_pretty(&mut out, &x)?;
            writeln!(out)?;
        }
        TextFormat::Text => {
            let verdict = |v: Verdict| match v {
                Verdict::Allow => "allowed",
                Verdict::Deny => "denied",
            };
            let traffic = if a.protocol.has_ports() {
                format!("{}/{}", a.port, format!("{:?}", a.protocol).to_uppercase())
            } else {
                format!("{:?}", a.protocol).to_uppercase()
            };
            writeln!(
                out,
                "{} -> {} {traffic}: {}",
                x.from,
                x.to,
                verdict(x.verdict)
            )?;
            for (dir, who, d) in [
                ("egress ", &x.from, &x.egress),
                ("ingress", &x.to, &x.ingress),
            ] {
                writeln!(
                    out,
                    "  {dir} at {who}: {} — {}",
                    verdict(d.verdict),
                    d.reason
                )?;
                if let Some(audit) = &d.audit {
                    writeln!(out, "           {audit}")?;
                }
            }
        }
    }
    Ok(ExitCode::from(code))
}

fn compile(a: CompileArgs) -> anyhow::Result<ExitCode> {
    let JsonFormat::Json = a.output;
    let (engine, code) = build(&a.input, false)?;
    let mut out = std::io::stdout().lock();
    match &a.node {
        Some(node) => match engine.ruleset(node) {
            Ok(rs) => serde_json::to_writer_pretty(&mut out, &rs)?,
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(2));
            }
        },
        None => serde_json::to_writer_pretty(&mut out, &engine.rulesets())?,
    }
    writeln!(out)?;
    Ok(ExitCode::from(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_names_destinations_that_are_no_source_below_the_rows() {
        let m: BTreeMap<String, BTreeMap<String, bool>> = BTreeMap::from([(
            "shop/a".to_string(),
            BTreeMap::from([
                ("shop/a".to_string(), true),
                ("west/shop/b".to_string(), false),
            ]),
        )]);
        let mut out = Vec::new();
        write_table(&mut out, &m, Protocol::Tcp, 80).expect("write");
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1].trim(), "1  2");
        assert_eq!(lines[2], "  1 shop/a       ✓  ✗");
        assert_eq!(lines[3], "  2 west/shop/b  (destination only)");
        assert_eq!(lines.len(), 4);
    }
}
