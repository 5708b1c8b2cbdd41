//! The rendered chart, as far as the container test maps it (serde ignores every other field).

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use serde::Deserialize;

// The rendered chart, as far as the test maps it (serde ignores every other field).

#[derive(Deserialize)]
pub(super) struct Workload {
    pub(super) kind: String,
    pub(super) spec: WorkloadSpec,
}

#[derive(Deserialize)]
pub(super) struct WorkloadSpec {
    pub(super) template: PodTemplate,
}

#[derive(Deserialize)]
pub(super) struct PodTemplate {
    pub(super) spec: PodSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct PodSpec {
    #[serde(default)]
    pub(super) host_network: bool,
    pub(super) termination_grace_period_seconds: Option<u64>,
    #[serde(default)]
    pub(super) security_context: PodSecurityContext,
    pub(super) containers: Vec<Container>,
    #[serde(default)]
    pub(super) volumes: Vec<Volume>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(super) struct PodSecurityContext {
    pub(super) run_as_user: Option<u32>,
    pub(super) run_as_group: Option<u32>,
    pub(super) run_as_non_root: Option<bool>,
    pub(super) fs_group: Option<u32>,
    pub(super) seccomp_profile: Option<Profile>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Container {
    pub(super) name: String,
    pub(super) image: String,
    #[serde(default)]
    pub(super) command: Vec<String>,
    #[serde(default)]
    pub(super) args: Vec<String>,
    #[serde(default)]
    pub(super) env: Vec<EnvVar>,
    #[serde(default)]
    pub(super) ports: Vec<ContainerPort>,
    pub(super) liveness_probe: Option<Probe>,
    pub(super) readiness_probe: Option<Probe>,
    #[serde(default)]
    pub(super) security_context: SecurityContext,
    #[serde(default)]
    pub(super) volume_mounts: Vec<VolumeMount>,
    #[serde(default)]
    pub(super) resources: Resources,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct EnvVar {
    pub(super) name: String,
    pub(super) value: Option<String>,
    pub(super) value_from: Option<EnvSource>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct EnvSource {
    pub(super) field_ref: Option<FieldRef>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct FieldRef {
    pub(super) field_path: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ContainerPort {
    pub(super) name: Option<String>,
    pub(super) container_port: u16,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Probe {
    pub(super) http_get: Option<HttpGet>,
}

#[derive(Deserialize)]
pub(super) struct HttpGet {
    pub(super) path: String,
    /// A number or the name of a container port.
    pub(super) port: serde_yaml::Value,
    pub(super) host: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(super) struct SecurityContext {
    pub(super) run_as_user: Option<u32>,
    pub(super) run_as_group: Option<u32>,
    pub(super) run_as_non_root: Option<bool>,
    pub(super) read_only_root_filesystem: Option<bool>,
    pub(super) allow_privilege_escalation: Option<bool>,
    pub(super) privileged: Option<bool>,
    #[serde(default)]
    pub(super) capabilities: Capabilities,
    pub(super) seccomp_profile: Option<Profile>,
    pub(super) app_armor_profile: Option<Profile>,
}

#[derive(Deserialize, Default)]
pub(super) struct Capabilities {
    #[serde(default)]
    pub(super) add: Vec<String>,
    #[serde(default)]
    pub(super) drop: Vec<String>,
}

#[derive(Deserialize)]
pub(super) struct Profile {
    #[serde(rename = "type")]
    pub(super) kind: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct VolumeMount {
    pub(super) name: String,
    pub(super) mount_path: String,
    #[serde(default)]
    pub(super) read_only: bool,
    pub(super) mount_propagation: Option<String>,
}

#[derive(Deserialize, Default)]
pub(super) struct Resources {
    #[serde(default)]
    pub(super) limits: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Volume {
    pub(super) name: String,
    pub(super) secret: Option<SecretVolume>,
    pub(super) projected: Option<ProjectedVolume>,
    pub(super) host_path: Option<HostPathVolume>,
    pub(super) empty_dir: Option<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SecretVolume {
    pub(super) secret_name: String,
    #[serde(default, deserialize_with = "file_mode")]
    pub(super) default_mode: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ProjectedVolume {
    #[serde(default, deserialize_with = "file_mode")]
    pub(super) default_mode: Option<u32>,
    pub(super) sources: Vec<ProjectedSource>,
}

/// A volume's `defaultMode` as Kubernetes reads it: YAML 1.1, where `0440` is octal (serde_yaml
/// follows YAML 1.2 and hands such a literal over as the string "0440").
pub(super) fn file_mode<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    use serde::de::Error;
    match serde_yaml::Value::deserialize(d)? {
        serde_yaml::Value::Number(n) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| D::Error::custom(format!("file mode {n} out of range"))),
        serde_yaml::Value::String(s) => {
            let digits = s
                .strip_prefix("0o")
                .or_else(|| s.strip_prefix('0'))
                .unwrap_or(&s);
            u32::from_str_radix(digits, 8)
                .map(Some)
                .map_err(|_| D::Error::custom(format!("{s} is not an octal file mode")))
        }
        other => Err(D::Error::custom(format!("{other:?} is not a file mode"))),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ProjectedSource {
    pub(super) service_account_token: Option<ServiceAccountToken>,
}

#[derive(Deserialize)]
pub(super) struct ServiceAccountToken {
    pub(super) path: String,
}

#[derive(Deserialize)]
pub(super) struct HostPathVolume {
    pub(super) path: String,
    #[serde(rename = "type")]
    pub(super) kind: Option<String>,
}

impl PodSpec {
    pub(super) fn container(&self, name: &str) -> anyhow::Result<&Container> {
        self.containers
            .iter()
            .find(|c| c.name == name)
            .with_context(|| format!("the rendered pod has no container `{name}`"))
    }

    pub(super) fn volume(&self, name: &str) -> anyhow::Result<&Volume> {
        self.volumes
            .iter()
            .find(|v| v.name == name)
            .with_context(|| format!("a volume mount names the undeclared volume `{name}`"))
    }
}

/// An HTTP probe as the kubelet runs it.
pub(super) struct HttpProbe {
    pub(super) kind: &'static str,
    pub(super) path: String,
    pub(super) port: u16,
    /// The probe's `host`; the pod's address when unset.
    pub(super) host: Option<String>,
}

impl Container {
    /// The port a probe names: a number, or a container port's name.
    pub(super) fn port(&self, port: &serde_yaml::Value) -> anyhow::Result<u16> {
        if let Some(n) = port.as_u64() {
            return u16::try_from(n).context("probe port out of range");
        }
        let name = port
            .as_str()
            .context("a probe port is neither a number nor a name")?;
        self.ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
            .with_context(|| format!("container {} has no port named {name}", self.name))
    }

    /// The liveness and readiness probes.
    pub(super) fn probes(&self) -> anyhow::Result<Vec<HttpProbe>> {
        let mut out = Vec::new();
        for (kind, probe) in [
            ("liveness", &self.liveness_probe),
            ("readiness", &self.readiness_probe),
        ] {
            let get = probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .with_context(|| format!("container {} has no HTTP {kind} probe", self.name))?;
            out.push(HttpProbe {
                kind,
                path: get.path.clone(),
                port: self.port(&get.port)?,
                host: get.host.clone(),
            });
        }
        Ok(out)
    }
}

/// The agent DaemonSet's and the controller Deployment's pod specs from `helm template` output.
pub(super) fn workloads(rendered: &str) -> anyhow::Result<(PodSpec, PodSpec)> {
    let (mut agent, mut controller) = (None, None);
    for doc in serde_yaml::Deserializer::from_str(rendered) {
        let value = serde_yaml::Value::deserialize(doc).context("parse the rendered chart")?;
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_string();
        if kind != "DaemonSet" && kind != "Deployment" {
            continue;
        }
        let w: Workload =
            serde_yaml::from_value(value).with_context(|| format!("read the rendered {kind}"))?;
        let slot = if w.kind == "DaemonSet" {
            &mut agent
        } else {
            &mut controller
        };
        if slot.replace(w.spec.template.spec).is_some() {
            bail!("the chart renders more than one {kind}");
        }
    }
    Ok((
        agent.context("the chart renders no agent DaemonSet")?,
        controller.context("the chart renders no controller Deployment")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn default_mode_is_octal_as_in_kubernetes() {
        let v: SecretVolume = serde_yaml::from_str("{secretName: s, defaultMode: 0440}").unwrap();
        assert_eq!(v.default_mode, Some(0o440));
        let v: SecretVolume = serde_yaml::from_str("{secretName: s, defaultMode: 288}").unwrap();
        assert_eq!(v.default_mode, Some(0o440));
        let v: SecretVolume = serde_yaml::from_str("{secretName: s}").unwrap();
        assert_eq!(v.default_mode, None);
    }
}
