//! The controller's TLS acceptor: certificates re-read when their files change.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context;

/// Server side: our certificate and key, and the CA that client certificates must chain to,
/// re-read when any of the three files changes (cert-manager renews a Secret in place; the
/// kubelet swaps the mounted files atomically). Each new connection gets the configuration of
/// the files as they are; connections already open keep theirs.
pub struct ReloadingServerTls {
    /// The certificate, its key, then each CA file.
    files: Vec<PathBuf>,
    current: std::sync::Mutex<(FileStamps, Arc<rustls::ServerConfig>)>,
}

/// Modification time and length of each file, to notice a change without reading it.
type FileStamps = Vec<Option<(std::time::SystemTime, u64)>>;

impl ReloadingServerTls {
    /// Reads the files once; an error here (missing file, bad PEM, a key that does not match)
    /// stops the controller at start.
    pub fn new(cert: &Path, key: &Path, client_ca: &Path) -> anyhow::Result<Self> {
        Self::with_client_cas(cert, key, &[client_ca.to_path_buf()])
    }

    /// Client certificates may chain to any of `client_cas` (the peering listener: the union
    /// of the peers' CAs, and not ours).
    pub fn with_client_cas(
        cert: &Path,
        key: &Path,
        client_cas: &[PathBuf],
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!client_cas.is_empty(), "no CA for client certificates");
        let mut files = vec![cert.to_path_buf(), key.to_path_buf()];
        files.extend(client_cas.iter().cloned());
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
fn server_config(files: &[PathBuf]) -> anyhow::Result<rustls::ServerConfig> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let [cert, key, cas @ ..] = files else {
        anyhow::bail!("a certificate, its key and a CA are needed");
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("read certificates from {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("read a private key from {}", key.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        for c in CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("read CA certificates from {}", ca.display()))?
        {
            let c = c.with_context(|| format!("read CA certificates from {}", ca.display()))?;
            roots
                .add(c)
                .with_context(|| format!("use the CA certificate in {}", ca.display()))?;
        }
    }
    let Some(ca) = cas.first() else {
        anyhow::bail!("no CA for client certificates");
    };
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
