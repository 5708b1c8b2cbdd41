//! The image shipped as the README's Kubernetes section ships it: pushed with skopeo to a
//! registry (Debian's `docker-registry`, the CNCF distribution registry, on loopback with a
//! storage directory of this run), then pulled by podman from there as a node's runtime pulls
//! it. The chart is rendered with `image.repository` naming that registry and no tag, so what
//! runs is the chart's default tag (its `appVersion`) resolved through the registry.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};

use super::pods::{free_port, http_get, wait_for};
use crate::{describe, image::Target, output};

/// Debian packages of this part of the test: the registry, and skopeo to push.
pub(super) const PACKAGES: &[&str] = &["docker-registry", "skopeo"];

/// A registry process serving plain HTTP on a free loopback port; killed on drop.
pub(super) struct Registry {
    child: Child,
    pub(super) addr: SocketAddr,
    log: PathBuf,
}

impl Registry {
    /// Starts a registry keeping its blobs under `dir`, and waits until `/v2/` answers.
    pub(super) fn start(dir: &Path) -> anyhow::Result<Registry> {
        fs::create_dir_all(dir)?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let config = dir.join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {addr}\n",
                dir.join("data").display()
            ),
        )?;
        let log = dir.join("registry.log");
        let out = fs::File::create(&log)?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("start docker-registry (apt install docker-registry)")?;
        let mut registry = Registry { child, addr, log };
        wait_for(
            &format!("the registry on {addr} to answer GET /v2/"),
            Duration::from_secs(20),
            || {
                if let Some(status) = registry.child.try_wait()? {
                    bail!(
                        "the registry exited ({status}): {}",
                        fs::read_to_string(&registry.log).unwrap_or_default().trim()
                    );
                }
                Ok(http_get(addr, "/v2/").is_some_and(|(s, _)| s == 200))
            },
        )?;
        Ok(registry)
    }

    /// The repository a user would pass as `image.repository`.
    pub(super) fn repository(&self) -> String {
        format!("{}/bulkhead", self.addr)
    }

    /// `skopeo copy` of an archive to `<repository>:<tag>`, as the README says; with an index
    /// archive (`--all`), both architectures. A plain-HTTP registry needs
    /// `--dest-tls-verify=false`, nothing else differs.
    pub(super) fn push(&self, archive: &Path, index: bool, tag: &str) -> anyhow::Result<String> {
        let reference = format!("{}:{tag}", self.repository());
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        let source = if index {
            cmd.arg("--all");
            format!("oci-archive:{}:{tag}", archive.display())
        } else {
            format!("oci-archive:{}", archive.display())
        };
        cmd.arg(source).arg(format!("docker://{reference}"));
        println!("    + {}", describe(&cmd));
        output(&mut cmd)
            .with_context(|| format!("push to the registry (log {})", self.log.display()))?;
        Ok(reference)
    }

    /// The platforms the registry serves under `reference` (an index's entries, or the one
    /// image's), as `os/architecture`, sorted.
    pub(super) fn platforms(&self, reference: &str) -> anyhow::Result<Vec<String>> {
        let raw: serde_json::Value = serde_json::from_str(&output(Command::new("skopeo").args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{reference}"),
        ]))?)
        .context("parse the registry's manifest")?;
        let mut platforms: Vec<String> = match raw["manifests"].as_array() {
            Some(entries) => entries
                .iter()
                .map(|m| {
                    format!(
                        "{}/{}",
                        m["platform"]["os"].as_str().unwrap_or("?"),
                        m["platform"]["architecture"].as_str().unwrap_or("?")
                    )
                })
                .collect(),
            None => {
                let config: serde_json::Value =
                    serde_json::from_str(&output(Command::new("skopeo").args([
                        "inspect",
                        "--config",
                        "--tls-verify=false",
                        &format!("docker://{reference}"),
                    ]))?)
                    .context("parse the image's config")?;
                vec![format!(
                    "{}/{}",
                    config["os"].as_str().unwrap_or("?"),
                    config["architecture"].as_str().unwrap_or("?")
                )]
            }
        };
        platforms.sort();
        Ok(platforms)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The platforms a push of these targets must give.
pub(super) fn expected_platforms(targets: &[Target]) -> Vec<String> {
    let mut p: Vec<String> = targets
        .iter()
        .map(|t| format!("linux/{}", t.name))
        .collect();
    p.sort();
    p
}
