//! `bulkhead agent`: enforce a node's rule set. The arguments; the runtime is
//! [`bulkhead_agent::agent`].

use std::{path::PathBuf, process::ExitCode};

use anyhow::bail;
use bulkhead_agent::agent::{AgentConfig, RuleSource, default_pin_dir, names::FqdnSettings};
use bulkhead_proto::client::ControllerTarget;
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct AgentArgs {
    #[command(subcommand)]
    command: AgentCommand,
}

#[derive(Args)]
struct RunArgs {
    /// This node's name (selects the rule set and names the pin directory).
    #[arg(long, env = "BULKHEAD_NODE")]
    node: String,
    /// Rule-set file; `-` reads standard input once. Either this or --controller.
    #[arg(
        long,
        required_unless_present = "controller",
        conflicts_with = "controller"
    )]
    ruleset: Option<PathBuf>,
    /// Controller to follow over gRPC (`host:port`): snapshot, then deltas, acked once
    /// realized. While it is unreachable the last rule set stays enforced.
    #[arg(long)]
    controller: Option<String>,
    #[command(flatten)]
    tls: crate::certs::ClientTlsArgs,
    /// bpffs directory for this node's maps and links.
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// Apply once and exit. The pinned programs keep enforcing after the agent is gone.
    #[arg(long)]
    once: bool,
    /// Address of the HTTP endpoint serving `/metrics` (Prometheus) and `/healthz`: counters
    /// (per endpoint pod, reason, rule), no addresses or individual flows.
    #[arg(long, default_value = "127.0.0.1:9962")]
    metrics_addr: std::net::SocketAddr,
    /// Address of the HTTP endpoint serving `/flows` (recent flow records) and `/connections`
    /// (the connection-tracking tables): every pod's traffic on this node, unauthenticated, so
    /// loopback only unless --http-unauthenticated.
    #[arg(long = "http", default_value = "127.0.0.1:9964")]
    http_addr: std::net::SocketAddr,
    /// Serve `/flows` and `/connections` on a non-loopback --http address, to anyone who
    /// reaches it.
    #[arg(long)]
    http_unauthenticated: bool,
    /// A file holding this agent pod's service-account token (a projected token with the
    /// controller's audience), sent to the controller on every connection and re-read at each,
    /// so that a controller with --agent-token-review can tell which node a shared agent
    /// certificate speaks for.
    #[arg(long, requires = "controller")]
    token_file: Option<PathBuf>,
    /// Flow records kept in memory for `/flows` (oldest evicted first).
    #[arg(long, default_value_t = 10_000)]
    flow_buffer: usize,
    /// Enforce on the interfaces of this named network namespace (`ip netns add`), e.g. a
    /// lab node. Only the data-plane thread enters it: the controller connection and the
    /// metrics endpoint stay in the agent's own namespace, and pins land on the host's
    /// bpffs (under `ip netns exec`, which remounts /sys, they would vanish with the agent).
    #[arg(long)]
    netns: Option<String>,
    /// Attach the prefilter (drops traffic from quarantined addresses, and from identities a
    /// local pod's policy denies outright, as it arrives on the node) to this uplink
    /// interface; repeatable.
    #[arg(long)]
    uplink: Vec<String>,
    /// Where the prefilter runs on the uplinks: `tc` (TC ingress after GRO: no throughput
    /// cost), `xdp` (before the stack: the cheapest drop under a flood, but native XDP on veth
    /// and virtio_net turns GRO off and costs most of a TCP stream's throughput), or `off`.
    #[arg(long, value_enum, default_value_t = PrefilterChoice::Tc)]
    prefilter: PrefilterChoice,
    /// Also trust DNS answers from this resolver (a node-local cache such as 169.254.20.10)
    /// besides the cluster DNS the controller names; repeatable. Only trusted resolvers'
    /// answers teach the addresses of names policies allow.
    #[arg(long = "dns-resolver", value_name = "ADDR")]
    dns_resolvers: Vec<std::net::IpAddr>,
    /// An address learned from a DNS answer is admitted at least this long, whatever the
    /// record's TTL (a TTL of 0 must still let the pod connect to what it just resolved).
    #[arg(long, default_value = "5s", value_parser = parse_ttl)]
    fqdn_min_ttl: std::time::Duration,
    /// ... and at most this long.
    #[arg(long, default_value = "1d", value_parser = parse_ttl)]
    fqdn_max_ttl: std::time::Duration,
}

/// A TTL bound: whole seconds, 1 s to 136 years (the kernel keeps seconds in 32 bits).
fn parse_ttl(text: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d.as_secs() == 0 || u32::try_from(d.as_secs()).is_err() {
        return Err(format!(
            "{text} is out of range: give between 1s and {}s",
            u32::MAX
        ));
    }
    Ok(d)
}

/// `--prefilter`.
#[derive(
    clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PrefilterChoice {
    Tc,
    Xdp,
    Off,
}

impl std::fmt::Display for PrefilterChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PrefilterChoice::Tc => "tc",
            PrefilterChoice::Xdp => "xdp",
            PrefilterChoice::Off => "off",
        })
    }
}

impl PrefilterChoice {
    pub fn hook(self) -> Option<bulkhead_agent::loader::PrefilterHook> {
        match self {
            PrefilterChoice::Tc => Some(bulkhead_agent::loader::PrefilterHook::Tc),
            PrefilterChoice::Xdp => Some(bulkhead_agent::loader::PrefilterHook::Xdp),
            PrefilterChoice::Off => None,
        }
    }
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Enforce the rule set in FILE (JSON, as `bulkhead policy compile` prints it: one RuleSet,
    /// or an object of them keyed by node name). The file is watched and re-applied when it
    /// changes; endpoints whose interface is missing are retried.
    Run(Box<RunArgs>),
    /// Remove this node's pinned programs, links and maps: enforcement stops.
    Reset {
        #[arg(long, env = "BULKHEAD_NODE")]
        node: String,
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
}

pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        AgentCommand::Reset { node, pin_dir } => {
            let dir = pin_dir.unwrap_or_else(|| default_pin_dir(&node));
            bulkhead_agent::agent::reset(&dir)?;
            println!("removed {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        AgentCommand::Run(run) => {
            let RunArgs {
                node,
                ruleset,
                controller,
                tls,
                pin_dir,
                once,
                metrics_addr,
                http_addr,
                http_unauthenticated,
                token_file,
                flow_buffer,
                netns,
                uplink,
                prefilter,
                dns_resolvers,
                fqdn_min_ttl,
                fqdn_max_ttl,
            } = *run;
            if fqdn_min_ttl > fqdn_max_ttl {
                bail!(
                    "--fqdn-min-ttl {} is above --fqdn-max-ttl {}: give a minimum no larger than the maximum",
                    humantime::format_duration(fqdn_min_ttl),
                    humantime::format_duration(fqdn_max_ttl)
                );
            }
            let source = match (ruleset, controller) {
                (Some(path), _) => RuleSource::File(path),
                (None, Some(addr)) => RuleSource::Controller(Box::new(ControllerTarget {
                    addr,
                    tls: tls.to_client(),
                    token_file,
                })),
                (None, None) => bail!("pass --ruleset FILE or --controller ADDR"),
            };
            bulkhead_agent::agent::run(AgentConfig {
                pin_dir: pin_dir.unwrap_or_else(|| default_pin_dir(&node)),
                node,
                source,
                once,
                metrics_addr,
                http_addr,
                http_unauthenticated,
                flow_buffer,
                netns,
                uplinks: uplink,
                prefilter: prefilter.hook(),
                fqdn: FqdnSettings {
                    extra_resolvers: dns_resolvers,
                    min_ttl: fqdn_min_ttl,
                    max_ttl: fqdn_max_ttl,
                },
            })
        }
    }
}
