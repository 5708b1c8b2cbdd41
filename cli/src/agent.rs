//! `bulkhead agent`: enforce a node's rule set.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::{Context, bail};
use bulkhead_agent::{
    loader::{Dataplane, remove_pins},
    sync::{Enforcer, RouteResolver},
};
use bulkhead_controller::ruleset::RuleSet;
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct AgentArgs {
    #[command(subcommand)]
    command: AgentCommand,
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Enforce the rule set in FILE (JSON, as `bulkhead policy compile` prints it: one RuleSet,
    /// or an object of them keyed by node name). The file is watched and re-applied when it
    /// changes; endpoints whose interface is missing are retried.
    Run {
        /// This node's name (selects the rule set and names the pin directory).
        #[arg(long, env = "BULKHEAD_NODE")]
        node: String,
        /// Rule-set file; `-` reads standard input once.
        #[arg(long)]
        ruleset: PathBuf,
        /// bpffs directory for this node's maps and links.
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        /// Apply once and exit. The pinned programs keep enforcing after the agent is gone.
        #[arg(long)]
        once: bool,
    },
    /// Remove this node's pinned programs, links and maps: enforcement stops.
    Reset {
        #[arg(long, env = "BULKHEAD_NODE")]
        node: String,
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
}

fn default_pin_dir(node: &str) -> PathBuf {
    PathBuf::from("/sys/fs/bpf/bulkhead").join(node)
}

/// Reads a rule set for `node` from JSON: a RuleSet, or `{ "<node>": RuleSet, … }`.
pub fn read_ruleset(text: &str, node: &str) -> anyhow::Result<RuleSet> {
    if let Ok(rs) = serde_json::from_str::<RuleSet>(text) {
        if rs.node != node {
            bail!(
                "the rule set is for node {:?}, not {node:?}; pass --node {:?}",
                rs.node,
                rs.node
            );
        }
        return Ok(rs);
    }
    let all: BTreeMap<String, RuleSet> = serde_json::from_str(text)
        .context("rule set is neither a RuleSet nor an object of RuleSets keyed by node")?;
    match all.get(node) {
        Some(rs) => Ok(rs.clone()),
        // A node without endpoints gets an empty rule set: nothing to enforce, nothing lost.
        None => Ok(RuleSet {
            node: node.to_string(),
            ..Default::default()
        }),
    }
}

fn load_file(path: &Path, node: &str) -> anyhow::Result<RuleSet> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("read rule set from stdin")?
    } else {
        fs::read_to_string(path).with_context(|| format!("read rule set {}", path.display()))?
    };
    read_ruleset(&text, node)
}

pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        AgentCommand::Reset { node, pin_dir } => {
            let dir = pin_dir.unwrap_or_else(|| default_pin_dir(&node));
            remove_pins(&dir).with_context(|| format!("remove pins under {}", dir.display()))?;
            println!("removed {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        AgentCommand::Run {
            node,
            ruleset,
            pin_dir,
            once,
        } => {
            let dir = pin_dir.unwrap_or_else(|| default_pin_dir(&node));
            let mut rs = load_file(&ruleset, &node)?;
            let dp = Dataplane::load(&dir).context("load the data plane")?;
            let mut enforcer = Enforcer::new(dp).context("open the pinned maps")?;
            let mut report = enforcer.apply(&rs, &RouteResolver)?;
            log_report(&report);
            if once {
                return Ok(if report.missing_interfaces.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(3)
                });
            }
            let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
            let mut seen: Option<SystemTime> = mtime(&ruleset);
            loop {
                std::thread::sleep(Duration::from_millis(500));
                let now = mtime(&ruleset);
                let changed = ruleset != Path::new("-") && now != seen;
                if changed {
                    seen = now;
                    match load_file(&ruleset, &node) {
                        Ok(new) => rs = new,
                        Err(e) => {
                            // Keep enforcing what we have: a bad file never opens anything.
                            tracing::error!(error = %format!("{e:#}"), "rule set not applied; the previous one stays in force");
                            continue;
                        }
                    }
                }
                if changed || !report.missing_interfaces.is_empty() {
                    match enforcer.apply(&rs, &RouteResolver) {
                        Ok(r) => {
                            report = r;
                            log_report(&report);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "apply failed; the previous rule set stays in force")
                        }
                    }
                }
            }
        }
    }
}

fn log_report(r: &bulkhead_agent::sync::ApplyReport) {
    tracing::info!(
        version = r.version,
        endpoints_written = r.endpoints_written,
        endpoints_removed = r.endpoints_removed,
        policy_entries = r.policy_entries_written,
        apply_ms = r.duration.as_secs_f64() * 1e3,
        "rule set realized"
    );
    for m in &r.missing_interfaces {
        tracing::warn!(endpoint = %m, "interface not found yet; will retry");
    }
    for l in &r.locked_down {
        tracing::error!(endpoint = %l, "endpoint locked down: its policy does not fit in the maps");
    }
}
