//! `bulkhead`: the one command of the project.

mod agent;
mod certs;
mod controller;
mod crds;
mod demo;
mod flows;
mod impact;
mod lab;
mod policy;
mod promote;
mod quarantine;
mod recommend;

use std::{io::IsTerminal, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bulkhead",
    version,
    about = "Identity-based microsegmentation for containers, enforced in eBPF",
    long_about = "Bulkhead turns service-identity policies (Kubernetes NetworkPolicy, \
ClusterNetworkPolicy and Bulkhead's ServicePolicy) into per-node rule sets and enforces them \
with TC/XDP eBPF programs on each pod's veth. Every verdict names the rule that made it."
)]
struct Cli {
    /// Log filter (tracing syntax), e.g. `info` or `bulkhead_agent=debug`.
    #[arg(long, global = true, env = "BULKHEAD_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Node agent: loads the eBPF programs, attaches them to endpoint veths and enforces a rule
    /// set (from a file for now; from the controller once distribution lands).
    Agent(agent::AgentArgs),
    /// Controller: compiles policies from manifests and serves per-node rule sets to agents
    /// over gRPC (mTLS), with metrics and a JSON API over HTTP.
    // Boxed: its flags outweigh every other command's.
    Controller(Box<controller::ControllerArgs>),
    /// Bulkhead's CustomResourceDefinitions (ServicePolicy, Quarantine), generated from the
    /// code: printed, or written one file per CRD with `--out charts/bulkhead/crds`.
    Crds(crds::CrdsArgs),
    /// Certificates for mTLS between controller and agents (a throwaway CA, for labs).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// The story end to end in a lab: traffic, least privilege, denied flows naming rules.
    Demo(demo::DemoArgs),
    /// A real multi-node cluster of network namespaces on this machine: nodes with agents,
    /// pods with servers, one controller; probe it, change it live, take it down.
    Lab(lab::LabArgs),
    /// Recent flows from all agents, with the rule that decided each (`--follow` to stream).
    Flows(flows::FlowsArgs),
    /// The service graph: who talks to whom, on which port, allowed or denied, by which rule.
    Graph(flows::GraphArgs),
    /// Isolate a compromised pod now (`bulkhead quarantine NS/POD --reason …`), list
    /// quarantines, release one. Through the controller's admin API.
    Quarantine(quarantine::QuarantineArgs),
    /// Policy engine on Kubernetes YAML: reachability matrix (`evaluate`), why a connection is
    /// allowed or denied (`explain`), per-node rule sets for the agent (`compile`).
    Policy(policy::PolicyArgs),
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write a CA, a controller certificate and agent certificates into a directory.
    Generate(certs::CertsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Command::Agent(args) => agent::run(args),
        Command::Controller(args) => controller::run(*args),
        Command::Crds(args) => crds::run(args),
        Command::Lab(args) => lab::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Quarantine(args) => quarantine::run(args),
        Command::Flows(args) => flows::flows(args),
        Command::Graph(args) => flows::graph(args),
        Command::Certs {
            command: CertsCommand::Generate(args),
        } => certs::run(args),
        Command::Policy(args) => policy::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
