//! `bulkhead certs generate`: a throwaway CA and the certificates for mTLS between the
//! controller and its agents (the lab uses it; production uses a Secret or cert-manager).
//! And the TLS settings both sides build from PEM files.

use std::sync::Arc;
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

/// Server side: our certificate and key, and the CA that client certificates must chain to,
/// re-read when any of the three files changes (cert-manager renews a Secret in place; the
/// kubelet swaps the mounted files atomically). Each new connection gets the configuration of
/// the files as they are; connections already open keep theirs.
pub struct ReloadingServerTls {
    files: [PathBuf; 3],
    current: std::sync::Mutex<(FileStamps, Arc<rustls::ServerConfig>)>,
}

/// Modification time and length of each file, to notice a change without reading it.
type FileStamps = Vec<Option<(std::time::SystemTime, u64)>>;

impl ReloadingServerTls {
    /// Reads the files once; an error here (missing file, bad PEM, a key that does not match)
    /// stops the controller at start.
    pub fn new(cert: &Path, key: &Path, client_ca: &Path) -> anyhow::Result<Self> {
        let files = [
            cert.to_path_buf(),
            key.to_path_buf(),
            client_ca.to_path_buf(),
        ];
        let stamps = stamps(&files);
        let config = Arc::new(server_config(&files)?);
        Ok(ReloadingServerTls {
            files,
            current: std::sync::Mutex::new((stamps, config)),
        })
    }

    /// The configuration for a new connection. When a file changed since the last build it is
    /// rebuilt first; a rebuild that fails (a rotation caught half-way) keeps the previous
    /// configuration, says so, and is tried again at the next connection.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        let mut current = match self.current.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        let now = stamps(&self.files);
        if now != current.0 {
            match server_config(&self.files) {
                Ok(config) => {
                    tracing::info!(cert = %self.files[0].display(), "TLS files changed: new connections use them");
                    *current = (now, Arc::new(config));
                }
                Err(e) => tracing::warn!(
                    error = %format!("{e:#}"),
                    "TLS files changed but do not load; new connections keep the previous certificate"
                ),
            }
        }
        current.1.clone()
    }
}

fn stamps(files: &[PathBuf]) -> FileStamps {
    files
        .iter()
        .map(|f| {
            let m = fs::metadata(f).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

/// rustls server configuration: our chain and key, client certificates required and verified
/// against the CA, HTTP/2 by ALPN (what tonic's own acceptor sets up).
fn server_config(files: &[PathBuf; 3]) -> anyhow::Result<rustls::ServerConfig> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let [cert, key, ca] = files;
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("read certificates from {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("read a private key from {}", key.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("read CA certificates from {}", ca.display()))?
    {
        let c = c.with_context(|| format!("read CA certificates from {}", ca.display()))?;
        roots
            .add(c)
            .with_context(|| format!("use the CA certificate in {}", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .with_context(|| format!("client certificate verifier from {}", ca.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .with_context(|| {
            format!(
                "{} and {} do not make a certificate and its key",
                files[0].display(),
                files[1].display()
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// TLS connections accepted on `listener`, each handshake with the configuration of the
/// moment (see [`ReloadingServerTls`]), off the accept loop and bounded by a timeout so a slow
/// client delays no one else. For tonic's `serve_with_incoming`: the streams carry the client's
/// certificate chain to the services (`Request::peer_certs`).
pub fn tls_incoming(
    listener: tokio::net::TcpListener,
    tls: Arc<ReloadingServerTls>,
) -> tokio_stream::wrappers::ReceiverStream<
    std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let out = tx.clone();
            tokio::spawn(async move {
                let handshake = acceptor.accept(tcp);
                match tokio::time::timeout(std::time::Duration::from_secs(10), handshake).await {
                    Ok(Ok(stream)) => {
                        let _ = out.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
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

/// Where the controller is and how to prove who we are: [`ControllerTarget::endpoint`] reads the
/// TLS files each time it is called, so a long-running client picks up certificates rotated in
/// place at its next connection.
#[derive(Clone, Debug)]
pub struct ControllerTarget {
    pub addr: String,
    pub tls: ClientTlsArgs,
    /// The agent pod's service-account token, read at each connection (projected tokens are
    /// rotated by the kubelet).
    pub token_file: Option<PathBuf>,
}

impl ControllerTarget {
    /// The token to send, read now; `None` without `--token-file`.
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("read the agent's token {}", path.display()))?;
        let token = token.trim();
        if token.is_empty() {
            bail!("the agent's token {} is empty", path.display());
        }
        Ok(Some(token.to_string()))
    }

    pub fn endpoint(&self) -> anyhow::Result<tonic::transport::Endpoint> {
        endpoint(&self.addr, &self.tls)
    }
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
