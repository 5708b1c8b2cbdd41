//! How a client reaches the controller over gRPC: its address, our certificate, key and the CA
//! the controller's certificate chains to (mTLS), or no TLS at all for a controller started with
//! `--insecure`. The agent follows the controller through a [`ControllerTarget`]; the `bulkhead`
//! commands that talk to the admin API build an [`endpoint`].

use std::path::{Path, PathBuf};

/// The name the controller's certificate is issued for and clients check.
pub const CONTROLLER_SERVER_NAME: &str = "bulkhead-controller";

/// Why no channel to the controller could be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent's token {0} is empty")]
    EmptyToken(PathBuf),
    #[error("invalid controller address {0:?}")]
    Address(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] tonic::transport::Error),
    #[error(
        "mTLS is required to talk to the controller: pass --tls-cert, --tls-key and --ca (see `bulkhead certs generate`), or --insecure for a controller started with --insecure"
    )]
    NoCertificate,
}

fn read(path: &Path) -> Result<String, ClientError> {
    std::fs::read_to_string(path).map_err(|source| ClientError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Our certificate and key and the CA the controller's certificate must chain to, or none with
/// `insecure` (a controller started with `--insecure`).
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub insecure: bool,
}

/// Client side: our certificate and key, and the CA the controller's certificate chains to.
pub fn client_tls(
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> Result<tonic::transport::ClientTlsConfig, ClientError> {
    let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
    Ok(tonic::transport::ClientTlsConfig::new()
        .domain_name(CONTROLLER_SERVER_NAME)
        .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?))
        .identity(identity))
}

/// Where the controller is and how to prove who we are: [`ControllerTarget::endpoint`] reads the
/// TLS files each time it is called, so a long-running client picks up certificates rotated in
/// place at its next connection.
#[derive(Clone, Debug)]
pub struct ControllerTarget {
    pub addr: String,
    pub tls: ClientTls,
    /// The agent pod's service-account token, read at each connection (projected tokens are
    /// rotated by the kubelet).
    pub token_file: Option<PathBuf>,
}

impl ControllerTarget {
    /// The token to send, read now; `None` without a token file.
    pub fn token(&self) -> Result<Option<String>, ClientError> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let token = std::fs::read_to_string(path).map_err(|source| ClientError::Read {
            path: path.clone(),
            source,
        })?;
        let token = token.trim();
        if token.is_empty() {
            return Err(ClientError::EmptyToken(path.clone()));
        }
        Ok(Some(token.to_string()))
    }

    pub fn endpoint(&self) -> Result<tonic::transport::Endpoint, ClientError> {
        endpoint(&self.addr, &self.tls)
    }
}

/// A gRPC channel to the controller at `addr` (`host:port` or a URL).
pub fn endpoint(addr: &str, tls: &ClientTls) -> Result<tonic::transport::Endpoint, ClientError> {
    let scheme = if tls.insecure { "http" } else { "https" };
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("{scheme}://{addr}")
    };
    let mut ep = tonic::transport::Endpoint::from_shared(url.clone())
        .map_err(|_| ClientError::Address(url.clone()))?
        .connect_timeout(std::time::Duration::from_secs(3))
        .tcp_nodelay(true);
    match (&tls.cert, &tls.key, &tls.ca, tls.insecure) {
        (Some(c), Some(k), Some(ca), false) => {
            ep = ep.tls_config(client_tls(c, k, ca)?)?;
        }
        (_, _, _, true) => {}
        _ => return Err(ClientError::NoCertificate),
    }
    Ok(ep)
}
