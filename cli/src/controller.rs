//! `bulkhead controller`: its flags. The runtime is [`bulkhead_controller::server`].

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use bulkhead_controller::{
    peering::{PeerConfig, PeeringConfig},
    ruleset::cluster::ClusterName,
    server::{FlowHistoryConfig, HttpConfig, KubernetesConfig, ServerConfig, auth::HttpAuthMode},
};
use clap::Args;
use ipnetwork::IpNetwork;

#[derive(Args)]
pub struct ControllerArgs {
    /// Directories or files of Kubernetes YAML (Namespaces, Pods, Nodes, policies); re-read when
    /// they change. Required unless --kubernetes.
    #[arg(
        long = "manifests",
        short = 'f',
        required_unless_present = "kubernetes"
    )]
    pub manifests: Vec<PathBuf>,
    /// gRPC address for agents and admin clients.
    #[arg(long, default_value = "127.0.0.1:9960")]
    pub listen: SocketAddr,
    /// HTTP address of the web UI and the JSON API (`/api/*`: the map, flows, policies,
    /// quarantine). Loopback by default; see --http-auth.
    #[arg(long, default_value = "127.0.0.1:9961")]
    pub http: SocketAddr,
    /// HTTP address of `/metrics`, `/healthz` and `/readyz` (Prometheus and probes; counters
    /// by node, policy and namespace pair, no addresses or individual flows).
    #[arg(long, default_value = "127.0.0.1:9963")]
    pub metrics: SocketAddr,
    /// Server certificate (PEM); with --tls-key and --client-ca, agents must present a
    /// certificate signed by that CA (mTLS).
    #[arg(long, requires_all = ["tls_key", "client_ca"])]
    pub tls_cert: Option<PathBuf>,
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    #[arg(long)]
    pub client_ca: Option<PathBuf>,
    /// Serve without TLS (anyone who can reach the port can pull rule sets).
    #[arg(long, conflicts_with = "tls_cert")]
    pub insecure: bool,
    /// Flow records kept in memory (oldest evicted first).
    #[arg(long, default_value_t = 100_000)]
    pub flow_store: usize,
    /// Edges of the service graph not seen for this long are forgotten (and workloads with
    /// them), so the graph follows the cluster instead of growing with every pod that ever ran.
    /// `0s` keeps every edge.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub graph_ttl: Duration,
    /// Directory of the flow history: every flow record and quarantine action, kept on disk
    /// (SQLite, files 0600 in a 0700 directory) so that `bulkhead flows --since 24h` answers
    /// after a restart. Default: `flow-history/` in the first manifest directory; with
    /// --kubernetes the history is off unless this is given. A directory or database the
    /// controller cannot use stops it at start.
    #[arg(long, conflicts_with = "no_flow_history")]
    pub flow_history: Option<PathBuf>,
    /// Keep no flow history on disk.
    #[arg(long)]
    pub no_flow_history: bool,
    /// Flow history older than this is dropped.
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    pub flow_history_max_age: Duration,
    /// The flow history is kept under this many MiB (the oldest records are dropped first).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub flow_history_max_mib: u64,
    /// Where quarantines made through the API are kept (as Quarantine manifests, so they
    /// survive restarts) with their audit log. Default: `quarantines/` in the first manifest
    /// directory.
    #[arg(long)]
    pub quarantine_dir: Option<PathBuf>,
    /// How often the manifests are checked for changes, in milliseconds.
    #[arg(long, default_value_t = 300)]
    pub reload_ms: u64,
    /// Common name of a client certificate that may act as the agent of any node (a certificate
    /// shared by all agents, as a Helm install issues). Other agents' certificates must name
    /// their own node.
    #[arg(long = "any-node-client", default_value = "bulkhead-agent")]
    pub any_node_clients: Vec<String>,
    /// Common name of a client certificate that may quarantine and release pods.
    #[arg(long = "admin-client", default_value = "admin")]
    pub admin_clients: Vec<String>,
    /// An agent with an --any-node-client certificate must also send its pod's
    /// service-account token (`agent run --token-file`); the API server reviews it, and the
    /// agent may act only for the node that pod runs on. Needs --kubernetes.
    #[arg(long, requires_all = ["kubernetes", "agent_service_account"])]
    pub agent_token_review: bool,
    /// The agents' service account, `NAMESPACE/NAME`, whose tokens --agent-token-review accepts.
    #[arg(long)]
    pub agent_service_account: Option<String>,
    /// The audience the agents' projected tokens are issued for.
    #[arg(long, default_value = "bulkhead-controller")]
    pub agent_token_audience: String,
    /// A DNS resolver whose answers teach the agents the addresses of the names policies allow
    /// (egress by domain name); repeatable. Replaces the whole default: the addresses of the
    /// pods in `kube-system` labelled `k8s-app: kube-dns` and, with --kubernetes, the cluster
    /// IPs of the `kube-system/kube-dns` Service (from manifest files, give that address here
    /// with the pods' where pods see answers from it).
    #[arg(long = "dns-resolver", value_name = "ADDR")]
    pub dns_resolvers: Vec<std::net::IpAddr>,
    #[command(flatten)]
    pub kube: KubernetesArgs,
    #[command(flatten)]
    pub web: WebArgs,
    #[command(flatten)]
    pub peering: PeeringArgs,
}

/// Peering between clusters: import the peers' pods and namespaces, export ours.
#[derive(Args, Clone, Debug, Default)]
pub struct PeeringArgs {
    /// This cluster's name (a DNS label, at most 32 characters), as its peers' `--peer name=`
    /// says it. Required with --peer or --peering-listen.
    #[arg(long)]
    pub cluster_name: Option<ClusterName>,
    /// This cluster's pod CIDRs (repeatable): exported to the peers, and no peer's may overlap
    /// them. Only pods with addresses in them are exported. Required with --peering-listen.
    #[arg(long = "pod-cidr", value_name = "CIDR")]
    pub pod_cidrs: Vec<IpNetwork>,
    /// Serve our inventory to the peer clusters on this address (off by default). Only the
    /// `Peering` service is served there, with the controller's --tls-cert, and only client
    /// certificates issued by a peer's CA (its --peer ca=) are accepted: not our agents'.
    #[arg(long, value_name = "ADDR")]
    pub peering_listen: Option<SocketAddr>,
    /// A peer cluster to import pods and namespaces from (repeatable):
    /// `name=NAME,address=https://HOST:PORT,ca=FILE`, where FILE is the CA that issued the peer
    /// controller's certificate and the client certificate it imports from us with.
    #[arg(long = "peer", value_name = "name=NAME,address=URL,ca=FILE")]
    pub peers: Vec<PeerConfig>,
    /// Our client certificate for importing from the peers (PEM), issued by this cluster's CA
    /// (`bulkhead certs generate` writes `peering.pem`).
    #[arg(long, requires = "peering_key")]
    pub peering_cert: Option<PathBuf>,
    /// The private key of --peering-cert (PEM).
    #[arg(long, requires = "peering_cert")]
    pub peering_key: Option<PathBuf>,
}

pub fn run(args: ControllerArgs) -> anyhow::Result<ExitCode> {
    bulkhead_controller::server::run(args.into())?;
    Ok(ExitCode::SUCCESS)
}

impl From<ControllerArgs> for ServerConfig {
    fn from(a: ControllerArgs) -> ServerConfig {
        ServerConfig {
            manifests: a.manifests,
            listen: a.listen,
            http: a.http,
            metrics: a.metrics,
            tls_cert: a.tls_cert,
            tls_key: a.tls_key,
            client_ca: a.client_ca,
            insecure: a.insecure,
            flow_store: a.flow_store,
            graph_ttl: a.graph_ttl,
            flow_history: FlowHistoryConfig {
                enabled: !a.no_flow_history,
                dir: a.flow_history,
                max_age: a.flow_history_max_age,
                max_bytes: a.flow_history_max_mib.saturating_mul(1 << 20),
            },
            quarantine_dir: a.quarantine_dir,
            reload_ms: a.reload_ms,
            dns_resolvers: (!a.dns_resolvers.is_empty()).then_some(a.dns_resolvers),
            any_node_clients: a.any_node_clients,
            admin_clients: a.admin_clients,
            agent_token_review: a.agent_token_review,
            agent_service_account: a.agent_service_account,
            agent_token_audience: a.agent_token_audience,
            kube: KubernetesConfig {
                kubernetes: a.kube.kubernetes,
                leader_elect: a.kube.leader_elect,
                lease_name: a.kube.lease_name,
                lease_namespace: a.kube.lease_namespace,
                identity: a.kube.identity,
            },
            peering: PeeringConfig {
                cluster: a.peering.cluster_name,
                pod_cidrs: a.peering.pod_cidrs,
                listen: a.peering.peering_listen,
                peers: a.peering.peers,
                cert: a.peering.peering_cert,
                key: a.peering.peering_key,
            },
            web: HttpConfig {
                web_actions: a.web.web_actions,
                http_auth: a.web.http_auth.into(),
                http_tokens: a.web.http_tokens,
                http_unauthenticated: a.web.http_unauthenticated,
                http_hosts: a.web.http_hosts,
            },
        }
    }
}

/// `--kubernetes`: inventory and policies from the Kubernetes API, with leader election.
#[derive(Args)]
pub struct KubernetesArgs {
    /// Watch the Kubernetes API (in-cluster service account, else kubeconfig) for Namespaces,
    /// Pods, Nodes, NetworkPolicies, ClusterNetworkPolicies, ServicePolicies and Quarantines,
    /// instead of reading manifests.
    #[arg(long)]
    pub kubernetes: bool,
    /// Run as one of several replicas: only the holder of the Lease serves agents (followers
    /// answer UNAVAILABLE and `/readyz` 503).
    #[arg(long, requires = "kubernetes")]
    pub leader_elect: bool,
    /// Name of the coordination.k8s.io/v1 Lease.
    #[arg(long, default_value = "bulkhead-controller")]
    pub lease_name: String,
    /// Namespace of the Lease.
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// This replica's identity in the Lease and in Events (its pod name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
}

#[derive(Args, Clone, Debug, Default)]
pub struct WebArgs {
    /// Allow quarantine and release from the web UI even though `--http` is not a loopback
    /// address (anyone who can reach the port and send the UI's headers could then isolate
    /// pods: put an authenticating proxy in front).
    #[arg(long)]
    pub web_actions: bool,
    /// How `/api/*` requests are authenticated: `none` (loopback only, unless
    /// --http-unauthenticated), `tokens` (bearer tokens of --http-tokens), or `kubernetes`
    /// (bearer tokens reviewed by the API server, requests authorized by its RBAC; needs
    /// --kubernetes).
    #[arg(long, value_enum, default_value_t = HttpAuthArg::None)]
    pub http_auth: HttpAuthArg,
    /// With `--http-auth tokens`: a file of `ROLE NAME TOKEN` lines (`viewer` reads, `admin`
    /// also quarantines and releases), re-read when it changes.
    #[arg(long)]
    pub http_tokens: Option<std::path::PathBuf>,
    /// Serve `/api/*` without authentication on a non-loopback --http address: anyone who
    /// reaches it reads every flow and workload.
    #[arg(long)]
    pub http_unauthenticated: bool,
    /// A name (without port) the HTTP API answers to besides loopback names and the listener's
    /// own address, e.g. the controller's Service name; repeatable. Other `Host`s get 421
    /// (DNS rebinding); `/metrics` and `/healthz` answer to any.
    #[arg(long = "http-host")]
    pub http_hosts: Vec<String>,
}

/// `--http-auth` (the library's [`HttpAuthMode`], as a command-line choice).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HttpAuthArg {
    /// No authentication: loopback only, unless --http-unauthenticated.
    #[default]
    None,
    /// Bearer tokens listed in --http-tokens.
    Tokens,
    /// Bearer tokens reviewed by the Kubernetes API server, requests authorized by its RBAC.
    Kubernetes,
}

impl From<HttpAuthArg> for HttpAuthMode {
    fn from(a: HttpAuthArg) -> HttpAuthMode {
        match a {
            HttpAuthArg::None => HttpAuthMode::None,
            HttpAuthArg::Tokens => HttpAuthMode::Tokens,
            HttpAuthArg::Kubernetes => HttpAuthMode::Kubernetes,
        }
    }
}
