//! `bulkhead policy impact`: what a proposed policy change would do to the traffic the
//! controller recorded (its `POST /api/impact`, or the gRPC admin API's `Impact` with
//! `--controller`), before it is applied.

use std::{
    io::{Read, Write},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::{Context, bail};
use bulkhead_controller::{
    answers::ImpactQuestion,
    impact::{Impact, MAX_PROPOSAL_BYTES, parse_delete},
    server::api::impact::ImpactQuery,
};
use bulkhead_proto::v1 as pb;

use crate::flows::Source;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ImpactFormat {
    Table,
    Json,
}

/// Exit codes: 0 when no edge observed as admitted would be denied (or without
/// --fail-on-deny), 1 with --fail-on-deny when one would be, 2 for an error (a proposal that
/// does not load, a policy to delete that does not exist, no controller).
#[derive(clap::Args)]
#[command(
    after_help = "Exit codes: 0 = no observed admitted edge would be denied (always 0 \
without --fail-on-deny); 1 = --fail-on-deny and at least one would be; 2 = error (invalid \
proposal, unknown policy to delete, controller unreachable)."
)]
pub struct ImpactArgs {
    /// The proposal: multi-document YAML of NetworkPolicy, ClusterNetworkPolicy and
    /// ServicePolicy objects (`-` reads standard input). An object with the kind, namespace and
    /// name of a current policy replaces it; others are added.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    file: Option<PathBuf>,
    /// A current policy the proposal deletes, `KIND/NAMESPACE/NAME` (`ClusterNetworkPolicy/NAME`);
    /// repeatable.
    #[arg(long, value_name = "KIND/NAMESPACE/NAME")]
    delete: Vec<String>,
    /// Replay the flows of this long ago on (`30m`, `24h`); default: every flow the controller
    /// holds (its flow history when it keeps one).
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// Exit with 1 when an edge observed as admitted would be denied (for CI).
    #[arg(long)]
    fail_on_deny: bool,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: ImpactFormat,
    #[command(flatten)]
    source: Source,
}

pub fn impact(a: ImpactArgs) -> anyhow::Result<ExitCode> {
    match run(&a) {
        Ok(i) => Ok(if a.fail_on_deny && i.breaks > 0 {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        }),
        // Errors exit with 2, apart from the 1 of --fail-on-deny.
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(ExitCode::from(2))
        }
    }
}

fn run(a: &ImpactArgs) -> anyhow::Result<Impact> {
    for d in &a.delete {
        parse_delete(d)?;
    }
    let text = match &a.file {
        Some(p) if p.as_os_str() == "-" => {
            let mut s = String::new();
            std::io::stdin()
                .take(MAX_PROPOSAL_BYTES as u64 + 1)
                .read_to_string(&mut s)
                .context("read the proposal from standard input")?;
            s
        }
        Some(p) => {
            let len = std::fs::metadata(p)
                .with_context(|| format!("read {}", p.display()))?
                .len();
            if len > MAX_PROPOSAL_BYTES as u64 {
                bail!(
                    "{} is {len} bytes; a proposal is at most {MAX_PROPOSAL_BYTES}",
                    p.display()
                );
            }
            std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?
        }
        None if a.delete.is_empty() => {
            bail!(
                "name the proposal: -f FILE (or -f - for standard input), and/or --delete KIND/NAMESPACE/NAME"
            )
        }
        None => String::new(),
    };
    let since = a.since.map(|d| {
        SystemTime::now()
            .checked_sub(d)
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let i = if a.source.uses_grpc() {
        let question = ImpactQuestion {
            proposal_yaml: text,
            delete: a
                .delete
                .iter()
                .map(|d| parse_delete(d))
                .collect::<Result<_, _>>()?,
            since_unix_nanos: since.unwrap_or(0),
            until_unix_nanos: u64::MAX,
        };
        let answer = a.source.block_on(async |mut admin| {
            match admin.impact(pb::ImpactRequest::from(&question)).await {
                Ok(r) => Ok(r.into_inner()),
                Err(s) if s.code() == tonic::Code::InvalidArgument => {
                    bail!("the controller refused the proposal: {}", s.message())
                }
                Err(s) => Err(s.into()),
            }
        })?;
        Impact::try_from(answer).context("the controller's answer is not an impact")?
    } else {
        let query = ImpactQuery {
            since,
            until: None,
            delete: (!a.delete.is_empty()).then(|| a.delete.join(",")),
        };
        let path = query.path();
        let port = a.source.port()?;
        let token = a.source.token()?;
        let (status, body) = post_yaml(port, &path, &text, token.as_deref())
            .with_context(|| format!("no answer from the controller on 127.0.0.1:{port}{path}"))?;
        if status != 200 {
            let why = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| body.chars().take(500).collect());
            bail!("the controller refused the proposal ({status}): {why}");
        }
        serde_json::from_str(&body).with_context(|| {
            format!(
                "the controller's answer is not an impact: {}",
                body.chars().take(200).collect::<String>()
            )
        })?
    };
    let mut out = std::io::stdout().lock();
    match a.output {
        ImpactFormat::Json => {
            serde_json::to_writer_pretty(&mut out, &i)?;
            writeln!(out)?;
        }
        ImpactFormat::Table => table(&mut out, &i)?,
    }
    summary(&i);
    Ok(i)
}

/// One HTTP/1.0 POST of YAML to 127.0.0.1:`port`: (status, body).
fn post_yaml(
    port: u16,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    )?;
    // Replaying a long history takes a while.
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/yaml\r\nContent-Length: {}\r\n{auth}\r\n",
        body.len()
    )?;
    s.write_all(body.as_bytes())?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("not an HTTP response")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("not an HTTP response")?;
    Ok((status, body.to_string()))
}

fn table(out: &mut impl Write, i: &Impact) -> anyhow::Result<()> {
    if i.changed.is_empty() {
        return Ok(());
    }
    let judgement = |j: &bulkhead_controller::impact::Judgement| {
        let verdict = match j.verdict {
            bulkhead_controller::ruleset::Verdict::Allow => "allow",
            bulkhead_controller::ruleset::Verdict::Deny => "deny",
        };
        match &j.audit_would_deny {
            Some(r) => format!("{verdict} by {} (audit: deny by {r})", j.rule),
            None => format!("{verdict} by {}", j.rule),
        }
    };
    let rows: Vec<[String; 7]> = i
        .changed
        .iter()
        .map(|e| {
            [
                if e.breaks {
                    format!("{}!", e.change.as_str())
                } else {
                    e.change.as_str().to_string()
                },
                format!("{} -> {}", e.src, e.dst),
                if e.protocol == "ICMP" || e.protocol == "ICMPv6" {
                    e.protocol.clone()
                } else {
                    format!("{}/{}", e.protocol, e.port)
                },
                format!("{} {}", e.at, e.direction),
                format!("{} ok, {} denied", e.allowed, e.denied),
                judgement(&e.before),
                judgement(&e.after),
            ]
        })
        .collect();
    let header = [
        "CHANGE",
        "EDGE",
        "PORT",
        "DECIDED AT",
        "SEEN",
        "BEFORE",
        "AFTER",
    ];
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |out: &mut dyn Write, cells: &[&str]| -> std::io::Result<()> {
        let mut s = String::new();
        for (k, (c, w)) in cells.iter().zip(widths).enumerate() {
            if k + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        writeln!(out, "{}", s.trim_end())
    };
    line(out, &header)?;
    for r in &rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        line(out, &cells)?;
    }
    Ok(())
}

/// What was proposed and replayed, and the outcome, on stderr (stdout stays the table or the
/// JSON).
fn summary(i: &Impact) {
    let p = &i.proposal;
    let mut parts = Vec::new();
    for (what, list) in [
        ("adds", &p.added),
        ("changes", &p.changed),
        ("deletes", &p.deleted),
        ("leaves as they are", &p.unchanged),
    ] {
        if !list.is_empty() {
            parts.push(format!("{what} {}", list.join(", ")));
        }
    }
    eprintln!("# the proposal {}", parts.join("; "));
    for w in &p.warnings {
        eprintln!("# {w}");
    }
    eprintln!(
        "# {} flow records {} replayed as {} edges; {} changed",
        i.records,
        if i.from_history {
            "of the flow history"
        } else {
            "held in memory (the controller keeps no flow history)"
        },
        i.edges,
        i.changed.len()
    );
    if i.not_replayed > 0 {
        eprintln!(
            "# {} records no policy decided (malformed, spoofed, locked down…) are not replayed",
            i.not_replayed
        );
    }
    if i.unknown_pods > 0 {
        eprintln!(
            "# {} records of pods that no longer exist cannot be replayed",
            i.unknown_pods
        );
    }
    if i.breaks > 0 {
        eprintln!(
            "# {} edge{} observed as admitted would be denied (marked !)",
            i.breaks,
            if i.breaks == 1 { "" } else { "s" }
        );
    } else {
        eprintln!("# no edge observed as admitted would be denied");
    }
}
