//! `bulkhead certs generate`: a throwaway CA and the certificates for mTLS between the
//! controller and its agents (the lab uses it; production uses a Secret or cert-manager).
//! And the client TLS flags of the commands that talk to the controller.

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
pub use bulkhead_proto::client::CONTROLLER_SERVER_NAME;

/// The common name of the controller's peering client certificate.
pub const PEERING_CLIENT_NAME: &str = "bulkhead-peering";

#[derive(Args)]
pub struct CertsArgs {
    /// Directory to write `ca.pem`, `controller.pem`/`controller-key.pem`,
    /// `peering.pem`/`peering-key.pem` (the client certificate the controller imports from peer
    /// clusters with) and one `<node>.pem`/`<node>-key.pem` per node.
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

    // The controller's client certificate for importing from peer clusters (`--peering-cert`):
    // a peer accepts it because it trusts this CA as our `--peer ca=`.
    let mut peering = CertificateParams::new(vec![PEERING_CLIENT_NAME.to_string()])?;
    peering
        .distinguished_name
        .push(DnType::CommonName, PEERING_CLIENT_NAME);
    peering.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    let cert = peering.signed_by(&key, &ca)?;
    fs::write(dir.join("peering.pem"), cert.pem())?;
    write_private(&dir.join("peering-key.pem"), &key.serialize_pem())?;

    for node in nodes {
        if node.is_empty() || node.contains('/') || node == "peering" {
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
        "wrote ca.pem, controller.pem, peering.pem and certificates for {} node(s) to {}",
        args.nodes.len(),
        args.dir.display()
    );
    Ok(ExitCode::SUCCESS)
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

impl ClientTlsArgs {
    /// The files as the client library takes them.
    pub fn to_client(&self) -> bulkhead_proto::client::ClientTls {
        bulkhead_proto::client::ClientTls {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ca: self.ca.clone(),
            insecure: self.insecure,
        }
    }
}

/// A gRPC channel to the controller at `addr` (`host:port` or a URL).
pub fn endpoint(addr: &str, tls: &ClientTlsArgs) -> anyhow::Result<tonic::transport::Endpoint> {
    Ok(bulkhead_proto::client::endpoint(addr, &tls.to_client())?)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generate_writes_the_peering_client_certificate() {
        struct Cleanup(std::path::PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let dir = std::env::temp_dir().join(format!("bulkhead-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let _cleanup = Cleanup(dir.clone());
        super::generate(&dir, &["n1".to_string()], &[]).unwrap();
        let cert = std::fs::read_to_string(dir.join("peering.pem")).unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        let key = std::fs::metadata(dir.join("peering-key.pem")).unwrap();
        assert_eq!(key.permissions().mode() & 0o777, 0o600);
        assert!(super::generate(&dir, &["peering".to_string()], &[]).is_err());
    }
}
