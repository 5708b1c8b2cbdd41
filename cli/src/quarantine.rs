//! `bulkhead quarantine`: isolate a pod now, list quarantines, release one — through the
//! controller's admin API (mTLS), or a lab's controller with `--lab`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, bail};
use bulkhead_proto::v1::{self as pb, admin_client::AdminClient};
use clap::{Args, Subcommand};

use bulkhead_controller::server::api::quarantine::{parse_allow, parse_for};

use crate::certs::ClientTlsArgs;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct QuarantineArgs {
    /// The pod to isolate, `namespace/pod`.
    target: Option<String>,
    /// Why (recorded in the audit log and in flows).
    #[arg(long)]
    reason: Option<String>,
    /// Exceptions, in both directions: `ns=NAMESPACE[,label=value…][@PORT[/PROTO]]` or a CIDR
    /// (`10.0.0.53/32[@53/UDP]`). Repeatable.
    #[arg(long)]
    allow: Vec<String>,
    /// Lift the quarantine after this long (`30m`, `1h`, …, at most 10 years); default: until
    /// released.
    #[arg(long = "for", value_parser = parse_for)]
    duration: Option<Duration>,
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    command: Option<QuarantineCommand>,
}

#[derive(Subcommand)]
enum QuarantineCommand {
    /// The quarantines in force.
    List {
        #[command(flatten)]
        conn: Connection,
    },
    /// Lift a quarantine: the pod's previous policy applies again, exactly.
    Release {
        /// `namespace/pod`
        target: String,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Args, Clone)]
pub struct Connection {
    /// Controller gRPC address.
    #[arg(long, default_value = "127.0.0.1:9960")]
    controller: String,
    /// Use the controller and the admin certificate of the lab in this state directory.
    #[arg(long)]
    lab: Option<PathBuf>,
    #[command(flatten)]
    tls: ClientTlsArgs,
}

fn actor() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    format!("{user}@{} (bulkhead CLI)", host.trim())
}

fn split_target(t: &str) -> anyhow::Result<(String, String)> {
    let pod: bulkhead_ruleset::PodKey = t.parse()?;
    Ok((pod.namespace, pod.name))
}

pub async fn client(conn: &Connection) -> anyhow::Result<AdminClient<tonic::transport::Channel>> {
    let (addr, tls) = match &conn.lab {
        Some(dir) => crate::lab::state::LabState::load(dir)?.admin_connection(),
        None => (conn.controller.clone(), conn.tls.clone()),
    };
    let channel = crate::certs::endpoint(&addr, &tls)?
        .connect()
        .await
        .with_context(|| format!("connect to the controller at {addr}"))?;
    Ok(AdminClient::new(channel))
}

/// Waits until every node the change went to has acked at least that version; returns when the
/// last one did (or fails after a timeout, naming the laggards).
async fn wait_enforced(
    client: &mut AdminClient<tonic::transport::Channel>,
    nodes: &std::collections::HashMap<String, u64>,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = client
            .node_status(pb::NodeStatusRequest {})
            .await?
            .into_inner();
        let lagging: Vec<&String> = nodes
            .iter()
            .filter(|(node, version)| {
                !status
                    .nodes
                    .iter()
                    .any(|n| &&n.node == node && n.realized >= **version)
            })
            .map(|(n, _)| n)
            .collect();
        if lagging.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "not yet enforced on {lagging:?} after 10 s (their agents may be down; it will apply when they reconnect)"
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn print_info(q: &pb::QuarantineInfo) {
    println!(
        "{}/{}  reason: {}  since {}{}  by {}",
        q.namespace,
        q.pod,
        q.reason,
        q.created_at,
        if q.expires_at.is_empty() {
            String::new()
        } else {
            format!("  until {}", q.expires_at)
        },
        q.actor
    );
    if !q.enforced_at.is_empty() {
        let mut nodes: Vec<String> = q
            .enforced_at
            .iter()
            .map(|(node, at)| format!("{node} at {at}"))
            .collect();
        nodes.sort();
        println!(
            "  enforced on {}; {} tracked connection(s) cut",
            nodes.join(", "),
            q.connections_cut
        );
    }
}

pub fn run(args: QuarantineArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    rt.block_on(async move {
        match args.command {
            Some(QuarantineCommand::List { conn }) => {
                let list = client(&conn).await?.list_quarantines(pb::ListQuarantinesRequest {}).await?.into_inner();
                if list.quarantines.is_empty() {
                    println!("no pod is quarantined");
                }
                for q in &list.quarantines {
                    print_info(q);
                }
            }
            Some(QuarantineCommand::Release { target, conn }) => {
                let (namespace, pod) = split_target(&target)?;
                let started = std::time::Instant::now();
                let mut c = client(&conn).await?;
                let resp = c
                    .release(pb::ReleaseRequest { namespace, pod, actor: actor() })
                    .await?
                    .into_inner();
                wait_enforced(&mut c, &resp.nodes).await?;
                println!(
                    "released {target}: enforced on {} node(s) in {:.1} ms",
                    resp.nodes.len(),
                    started.elapsed().as_secs_f64() * 1e3
                );
            }
            None => {
                let Some(target) = args.target else {
                    bail!("name the pod to quarantine: bulkhead quarantine NAMESPACE/POD --reason TEXT");
                };
                let (namespace, pod) = split_target(&target)?;
                let Some(reason) = args.reason else {
                    bail!("a quarantine needs --reason TEXT");
                };
                let allow = args
                    .allow
                    .iter()
                    .map(|a| parse_allow(a).map_err(|e| anyhow::anyhow!(e)))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let started = std::time::Instant::now();
                let mut c = client(&args.conn).await?;
                let resp = c
                    .quarantine(pb::QuarantineRequest {
                        namespace,
                        pod,
                        reason,
                        allow,
                        duration_seconds: args.duration.map(|d| d.as_secs().max(1)).unwrap_or(0),
                        actor: actor(),
                    })
                    .await?
                    .into_inner();
                wait_enforced(&mut c, &resp.nodes).await?;
                println!(
                    "quarantined {target}: enforced on {} node(s) in {:.1} ms",
                    resp.nodes.len(),
                    started.elapsed().as_secs_f64() * 1e3
                );
                if let Some(q) = &resp.quarantine {
                    print_info(q);
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
