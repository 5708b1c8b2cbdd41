//! `bulkhead policy recommend`: least-privilege NetworkPolicies (or ServicePolicies) learned
//! from the traffic a controller saw (its `/api/recommend`, or the gRPC admin API's
//! `Recommend` with `--controller`), printed as multi-document YAML.

use std::{
    io::Write,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::{Context, bail};
use bulkhead_controller::{
    answers::RecommendQuestion,
    recommend::{RecommendKind, Recommendation},
    server::api::recommend::RecommendQuery,
};
use bulkhead_proto::v1 as pb;

use crate::flows::Source;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum RecommendFormat {
    Yaml,
    Json,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum KindArg {
    /// Kubernetes NetworkPolicies, one per workload, by its stable labels.
    Networkpolicy,
    /// Bulkhead ServicePolicies, one per service account.
    Servicepolicy,
}

#[derive(clap::Args)]
pub struct RecommendArgs {
    /// What to write the policies as.
    #[arg(long, value_enum, default_value = "networkpolicy")]
    kind: KindArg,
    /// Namespaces whose workloads get a policy (repeatable); default: every namespace of an
    /// observed pod.
    #[arg(short = 'n', long = "namespace", value_name = "NS")]
    namespaces: Vec<String>,
    /// Learn from the flows of this long ago on (`30m`, `24h`); default: every flow the
    /// controller holds.
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// A new edge within this long keeps a recommendation `learning` (else `stable`).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    learning: Duration,
    /// Write the policies staged (StagedNetworkPolicy, ServicePolicy `mode: Audit`): applied,
    /// they enforce nothing and the flows say what they would do (`flows --staged-verdict`).
    #[arg(long)]
    staged: bool,
    #[arg(short = 'o', long, value_enum, default_value = "yaml")]
    output: RecommendFormat,
    #[command(flatten)]
    source: Source,
}

pub fn recommend(a: RecommendArgs) -> anyhow::Result<ExitCode> {
    for n in &a.namespaces {
        if n.is_empty() || n.contains(',') {
            bail!("--namespace {n:?}: expected one namespace name");
        }
    }
    let since = a.since.map(|d| {
        SystemTime::now()
            .checked_sub(d)
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let kind = match a.kind {
        KindArg::Networkpolicy => RecommendKind::NetworkPolicy,
        KindArg::Servicepolicy => RecommendKind::ServicePolicy,
    };
    let r = if a.source.uses_grpc() {
        let question = RecommendQuestion {
            namespaces: a.namespaces.iter().cloned().collect(),
            since_unix_nanos: since.unwrap_or(0),
            learning_window: a.learning,
            kind,
        };
        let answer = a.source.block_on(async |mut admin| {
            Ok(admin
                .recommend(pb::RecommendRequest::from(&question))
                .await?
                .into_inner())
        })?;
        Recommendation::try_from(answer)
            .context("the controller's answer is not a recommendation")?
    } else {
        let query = RecommendQuery {
            namespaces: (!a.namespaces.is_empty()).then(|| a.namespaces.join(",")),
            since,
            learning_seconds: Some(a.learning.as_secs()),
            kind: Some(kind),
        };
        let body = a.source.get(&query.path())?;
        crate::flows::parse_answer(&body, "recommendation")?
    };
    let mut out = std::io::stdout().lock();
    match a.output {
        RecommendFormat::Yaml if a.staged => out.write_all(r.to_staged_yaml()?.as_bytes())?,
        RecommendFormat::Yaml => out.write_all(r.to_yaml()?.as_bytes())?,
        RecommendFormat::Json => {
            serde_json::to_writer_pretty(&mut out, &r)?;
            writeln!(out)?;
        }
    }
    summary(&r);
    Ok(ExitCode::SUCCESS)
}

/// What the recommendation covers and what it could not express, on stderr (the YAML on stdout
/// stays clean for `kubectl apply -f -`).
fn summary(r: &Recommendation) {
    eprintln!(
        "# {} polic{} learned from {} admitted flow records {} ({} edges); status: {}",
        r.policies.len(),
        if r.policies.len() == 1 { "y" } else { "ies" },
        r.records,
        if r.from_history {
            "of the flow history"
        } else {
            "held in memory (the controller keeps no flow history)"
        },
        r.edges,
        match r.status {
            bulkhead_controller::recommend::RecommendationStatus::Learning =>
                "learning (new edges appeared within the learning window)",
            bulkhead_controller::recommend::RecommendationStatus::Stable => "stable",
        }
    );
    for (w, why) in &r.not_covered {
        eprintln!("# no policy for {w}: {why}");
    }
    for (w, others) in &r.broad_selectors {
        let others: Vec<String> = others.iter().map(ToString::to_string).collect();
        eprintln!(
            "# the selector of {w} also selects {}: they share all its stable labels",
            others.join(", ")
        );
    }
    if r.unknown_pods > 0 {
        eprintln!(
            "# {} records of pods that no longer exist taught nothing",
            r.unknown_pods
        );
    }
    if r.icmp_edges > 0 {
        eprintln!(
            "# {} ICMP edges are not admitted: a NetworkPolicy cannot name ICMP",
            r.icmp_edges
        );
    }
}
