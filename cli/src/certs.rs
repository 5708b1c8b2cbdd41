//! `bulkhead certs generate`: a throwaway CA and the certificates for mTLS between the
//! controller and its agents (the lab uses it; production uses a Secret or cert-manager).
//! And the TLS settings both sides build from PEM files.

use std::{
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, bail};
use clap::Args;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// The name agents expect in the controller's certificate (SAN), whatever address they dial.
pub const CONTROLLER_SERVER_NAME: &str = "bulkhead-controller";

#[derive(Args)]
pub struct CertsArgs {
    /// Directory to write `ca.pem`, `controller.pem`/`controller-key.pem` and one
    /// `<node>.pem`/`<node>-key.pem` per node.
    #[arg(long)]
    pub dir: PathBuf,
    /// Node names to issue agent certificates for (comma-separated or repeated).
    #[arg(long, value_delimiter = ',', required = true)]
    pub nodes: Vec<String>,
    /// Extra DNS names or IP addresses for the controller's certificate.
    #[arg(long, value_delimiter = ',')]
    pub controller_names: Vec<String>,
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    std::io::Write::write_all(&mut f, text.as_bytes())?;
    Ok(())
}

/// Writes a CA, a controller certificate and one client certificate per node into `dir`.
pub fn generate(dir: &Path, nodes: &[String], controller_names: &[String]) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "bulkhead throwaway CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    fs::write(dir.join("ca.pem"), ca.pem())?;

    let mut names = vec![
        CONTROLLER_SERVER_NAME.to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
    ];
    names.extend(controller_names.iter().cloned());
    let mut server = CertificateParams::new(names)?;
    server
        .distinguished_name
        .push(DnType::CommonName, CONTROLLER_SERVER_NAME);
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = server.signed_by(&key, &ca)?;
    fs::write(dir.join("controller.pem"), cert.pem())?;
    write_private(&dir.join("controller-key.pem"), &key.serialize_pem())?;

    for node in nodes {
        if node.is_empty() || node.contains('/') {
            bail!("invalid node name {node:?}");
        }
        let mut client = CertificateParams::new(vec![node.clone()])?;
        client
            .distinguished_name
            .push(DnType::CommonName, node.as_str());
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = client.signed_by(&key, &ca)?;
        fs::write(dir.join(format!("{node}.pem")), cert.pem())?;
        write_private(&dir.join(format!("{node}-key.pem")), &key.serialize_pem())?;
    }
    Ok(())
}

pub fn run(args: CertsArgs) -> anyhow::Result<ExitCode> {
    generate(&args.dir, &args.nodes, &args.controller_names)?;
    println!(
        "wrote ca.pem, controller.pem and certificates for {} node(s) to {}",
        args.nodes.len(),
        args.dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn read(path: &Path) -> anyhow::Result<String> {
    fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
}

/// Server side: our certificate and key, and the CA that client certificates must chain to.
pub fn server_tls(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
    let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
    Ok(tonic::transport::ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(tonic::transport::Certificate::from_pem(read(client_ca)?)))
}

/// Client side: our certificate and key, and the CA the controller's certificate chains to.
pub fn client_tls(
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> anyhow::Result<tonic::transport::ClientTlsConfig> {
    let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
    Ok(tonic::transport::ClientTlsConfig::new()
        .domain_name(CONTROLLER_SERVER_NAME)
        .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?))
        .identity(identity))
}

/// TLS flags shared by the commands that talk to the controller.
#[derive(Args, Clone, Debug, Default)]
pub struct ClientTlsArgs {
    /// Our client certificate (PEM).
    #[arg(long, requires_all = ["tls_key", "ca"])]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// CA that the controller's certificate must chain to (PEM).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Talk to the controller without TLS. Only for a controller that runs with `--insecure`.
    #[arg(long, conflicts_with = "tls_cert")]
    pub insecure: bool,
}

/// A gRPC channel to the controller at `addr` (`host:port` or a URL).
pub fn endpoint(addr: &str, tls: &ClientTlsArgs) -> anyhow::Result<tonic::transport::Endpoint> {
    let scheme = if tls.insecure { "http" } else { "https" };
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("{scheme}://{addr}")
    };
    let mut ep = tonic::transport::Endpoint::from_shared(url.clone())
        .with_context(|| format!("invalid controller address {url:?}"))?
        .connect_timeout(std::time::Duration::from_secs(3))
        .tcp_nodelay(true);
    match (&tls.tls_cert, &tls.tls_key, &tls.ca, tls.insecure) {
        (Some(c), Some(k), Some(ca), false) => {
            ep = ep.tls_config(client_tls(c, k, ca)?)?;
        }
        (_, _, _, true) => {}
        _ => bail!(
            "mTLS is required to talk to the controller: pass --tls-cert, --tls-key and --ca (see `bulkhead certs generate`), or --insecure for a controller started with --insecure"
        ),
    }
    Ok(ep)
}
