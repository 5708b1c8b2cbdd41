//! `cargo xtask container-test` (also run by `cargo xtask test`): the amd64 image run with
//! podman, each container configured as the Helm chart configures it.
//!
//! The chart is rendered (`helm template`, the built tag, `image.repository` naming the image
//! loaded here), and the agent DaemonSet's and controller Deployment's pod specs are read from
//! the YAML (serde, not text). Each container setting becomes a podman flag (see [`PodmanRun`]):
//! args (with `$(VAR)` expanded as the kubelet does) and env (`fieldRef`s filled with this test's
//! node, pod and namespace), the security context (user and group, `fsGroup` as a supplementary
//! group, read-only root without podman's tmpfs, all capabilities dropped and only the listed
//! ones added, no privilege escalation, seccomp and AppArmor profiles), resource limits, volume
//! mounts (host paths bound with their propagation; Secrets, projected tokens and emptyDirs
//! replaced by files and directories the test makes, with the modes and group the kubelet would
//! give them) and the network (`hostNetwork` → `--network host`; the controller gets a pod
//! network namespace of its own). Whatever the mapping does not know fails the test, so a chart
//! change cannot silently go untested.
//!
//! Only what needs a Kubernetes API is replaced: the controller reads a manifest directory
//! (`-f`) instead of `--kubernetes`, without leader election and TokenReview; the agent reaches
//! the controller's Service name through `--add-host`.
//!
//! Pods are network namespaces wired like a routed CNI does it (a veth whose host end is in the
//! root namespace, where the agent runs; forwarding and proxy ARP on those host ends only, no
//! global sysctl). Names, addresses, the node name (hence the pin directory) and the agent's host
//! ports come from this process's id, and podman keeps its images and containers in a storage
//! directory of its own, so parallel runs do not meet. Everything is removed by a guard's `Drop`,
//! also when a check fails, and the test then checks that nothing is left.

use std::{
    collections::BTreeMap,
    env, fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::fs::{PermissionsExt, chown},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use serde::Deserialize;

use crate::{describe, image::Target, output, project_root, step};

/// Set in CI: a privileged test that cannot run fails instead of skipping.
const REQUIRE_PRIVILEGED_ENV: &str = "BULKHEAD_REQUIRE_PRIVILEGED";
/// Makes the test fail on purpose at a named checkpoint (`enforcing`, `restarted`), to show that
/// its cleanup runs on failure.
const FAIL_AT_ENV: &str = "BULKHEAD_CONTAINER_TEST_FAIL_AT";

/// The image name the chart is rendered with (`image.repository`).
const REPOSITORY: &str = "localhost/bulkhead";
/// The namespace the chart is rendered into, as the README installs it.
const RELEASE_NAMESPACE: &str = "bulkhead-system";
/// Ports the test pods' servers listen on: the policy admits the client on the first only.
const ALLOWED_PORT: u16 = 8080;
const DENIED_PORT: u16 = 8081;

/// Debian packages the container test needs: podman, and runc (crun, podman's default, refuses
/// the hybrid cgroup layout of these machines).
/// curl speaks TLS and HTTP/2 to the controller without a client certificate.
pub const PACKAGES: &[&str] = &["podman", "runc", "curl"];

pub fn setup() -> anyhow::Result<()> {
    step("setup: podman, runc and curl (the container test)");
    crate::install_packages(PACKAGES)
}

// ---------------------------------------------------------------------------------------------
// The rendered chart, as far as the test maps it (serde ignores every other field).

#[derive(Deserialize)]
struct Workload {
    kind: String,
    spec: WorkloadSpec,
}

#[derive(Deserialize)]
struct WorkloadSpec {
    template: PodTemplate,
}

#[derive(Deserialize)]
struct PodTemplate {
    spec: PodSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    #[serde(default)]
    host_network: bool,
    termination_grace_period_seconds: Option<u64>,
    #[serde(default)]
    security_context: PodSecurityContext,
    containers: Vec<Container>,
    #[serde(default)]
    volumes: Vec<Volume>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodSecurityContext {
    run_as_user: Option<u32>,
    run_as_group: Option<u32>,
    run_as_non_root: Option<bool>,
    fs_group: Option<u32>,
    seccomp_profile: Option<Profile>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Container {
    name: String,
    image: String,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<EnvVar>,
    #[serde(default)]
    ports: Vec<ContainerPort>,
    liveness_probe: Option<Probe>,
    readiness_probe: Option<Probe>,
    #[serde(default)]
    security_context: SecurityContext,
    #[serde(default)]
    volume_mounts: Vec<VolumeMount>,
    #[serde(default)]
    resources: Resources,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EnvVar {
    name: String,
    value: Option<String>,
    value_from: Option<EnvSource>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EnvSource {
    field_ref: Option<FieldRef>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FieldRef {
    field_path: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerPort {
    name: Option<String>,
    container_port: u16,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    http_get: Option<HttpGet>,
}

#[derive(Deserialize)]
struct HttpGet {
    path: String,
    /// A number or the name of a container port.
    port: serde_yaml::Value,
    host: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct SecurityContext {
    run_as_user: Option<u32>,
    run_as_group: Option<u32>,
    run_as_non_root: Option<bool>,
    read_only_root_filesystem: Option<bool>,
    allow_privilege_escalation: Option<bool>,
    privileged: Option<bool>,
    #[serde(default)]
    capabilities: Capabilities,
    seccomp_profile: Option<Profile>,
    app_armor_profile: Option<Profile>,
}

#[derive(Deserialize, Default)]
struct Capabilities {
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    drop: Vec<String>,
}

#[derive(Deserialize)]
struct Profile {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VolumeMount {
    name: String,
    mount_path: String,
    #[serde(default)]
    read_only: bool,
    mount_propagation: Option<String>,
}

#[derive(Deserialize, Default)]
struct Resources {
    #[serde(default)]
    limits: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Volume {
    name: String,
    secret: Option<SecretVolume>,
    projected: Option<ProjectedVolume>,
    host_path: Option<HostPathVolume>,
    empty_dir: Option<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SecretVolume {
    secret_name: String,
    #[serde(default, deserialize_with = "file_mode")]
    default_mode: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProjectedVolume {
    #[serde(default, deserialize_with = "file_mode")]
    default_mode: Option<u32>,
    sources: Vec<ProjectedSource>,
}

/// A volume's `defaultMode` as Kubernetes reads it: YAML 1.1, where `0440` is octal (serde_yaml
/// follows YAML 1.2 and hands such a literal over as the string "0440").
fn file_mode<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
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
struct ProjectedSource {
    service_account_token: Option<ServiceAccountToken>,
}

#[derive(Deserialize)]
struct ServiceAccountToken {
    path: String,
}

#[derive(Deserialize)]
struct HostPathVolume {
    path: String,
    #[serde(rename = "type")]
    kind: Option<String>,
}

impl PodSpec {
    fn container(&self, name: &str) -> anyhow::Result<&Container> {
        self.containers
            .iter()
            .find(|c| c.name == name)
            .with_context(|| format!("the rendered pod has no container `{name}`"))
    }

    fn volume(&self, name: &str) -> anyhow::Result<&Volume> {
        self.volumes
            .iter()
            .find(|v| v.name == name)
            .with_context(|| format!("a volume mount names the undeclared volume `{name}`"))
    }
}

/// An HTTP probe as the kubelet runs it.
struct HttpProbe {
    kind: &'static str,
    path: String,
    port: u16,
    /// The probe's `host`; the pod's address when unset.
    host: Option<String>,
}

impl Container {
    /// The port a probe names: a number, or a container port's name.
    fn port(&self, port: &serde_yaml::Value) -> anyhow::Result<u16> {
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
    fn probes(&self) -> anyhow::Result<Vec<HttpProbe>> {
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
fn workloads(rendered: &str) -> anyhow::Result<(PodSpec, PodSpec)> {
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

// ---------------------------------------------------------------------------------------------
// The mapping to podman.

/// What stands in for the cluster: values of `fieldRef`s, files for Secrets and projected
/// tokens, the network namespace of a pod without `hostNetwork`.
struct PodContext<'a> {
    /// `metadata.name`, `metadata.namespace`, `spec.nodeName`, …
    fields: BTreeMap<&'static str, String>,
    /// Secret name → directory with its keys as files (written by the test).
    secrets: &'a BTreeMap<String, PathBuf>,
    /// Directory holding the projected service-account token, written by the test.
    token_dir: &'a Path,
    /// Scratch directory for emptyDirs.
    scratch: &'a Path,
    /// `--network` of a pod without `hostNetwork`.
    pod_network: Option<String>,
    /// DNS names the cluster would resolve (Service names), as `--add-host name:ip`.
    hosts: Vec<(String, Ipv4Addr)>,
    /// The profile `RuntimeDefault` stands for when the runtime's own predates CAP_BPF (see
    /// [`runtime_default_seccomp`]); `None`: the runtime's default.
    runtime_default_seccomp: Option<&'a Path>,
}

/// A `podman run` command line made from a rendered container; `notes` say how each
/// Kubernetes setting was mapped, for the log.
struct PodmanRun {
    args: Vec<String>,
    notes: Vec<String>,
}

/// Kubernetes `$(VAR)` references in args, expanded from the container's env (`$$` escapes).
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(stripped) = tail.strip_prefix("$$") {
            out.push('$');
            rest = stripped;
        } else if let Some(close) = tail.strip_prefix("$(").and_then(|t| t.find(')')) {
            let name = &tail[2..2 + close];
            match env.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&tail[..close + 3]),
            }
            rest = &tail[close + 3..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// `500m` → `0.5`, `1` → `1`.
fn cpus(quantity: &str) -> anyhow::Result<String> {
    Ok(match quantity.strip_suffix('m') {
        Some(milli) => format!("{}", milli.parse::<f64>()? / 1000.0),
        None => quantity.parse::<f64>()?.to_string(),
    })
}

/// `256Mi` → `256m` (podman's binary units), `1Gi` → `1g`.
fn memory(quantity: &str) -> anyhow::Result<String> {
    for (suffix, unit) in [("Ki", "k"), ("Mi", "m"), ("Gi", "g")] {
        if let Some(n) = quantity.strip_suffix(suffix) {
            return Ok(format!("{}{unit}", n.parse::<u64>()?));
        }
    }
    Ok(format!("{}b", quantity.parse::<u64>()?))
}

fn mode_of(mode: Option<u32>) -> u32 {
    // Kubernetes' default for Secret and projected volumes.
    mode.unwrap_or(0o644)
}

impl PodmanRun {
    fn new(pod: &PodSpec, c: &Container, ctx: &PodContext, name: &str) -> anyhow::Result<Self> {
        let mut args: Vec<String> = vec!["run".into(), "--detach".into(), "--name".into()];
        args.push(name.into());
        let mut notes = Vec::new();
        let flag = |args: &mut Vec<String>, f: &str, v: &str| {
            args.push(f.to_string());
            args.push(v.to_string());
        };

        // Network.
        if pod.host_network {
            flag(&mut args, "--network", "host");
            notes.push("hostNetwork: true → --network host".into());
        } else {
            let net = ctx
                .pod_network
                .as_deref()
                .context("a pod without hostNetwork needs a pod network namespace")?;
            flag(&mut args, "--network", net);
            notes.push(format!("pod network → --network {net}"));
        }
        for (host, ip) in &ctx.hosts {
            flag(&mut args, "--add-host", &format!("{host}:{ip}"));
            notes.push(format!("Service DNS {host} → --add-host {host}:{ip}"));
        }

        // Security context: the container's settings win over the pod's.
        let sc = &c.security_context;
        let psc = &pod.security_context;
        let user = sc.run_as_user.or(psc.run_as_user);
        let group = sc.run_as_group.or(psc.run_as_group);
        let non_root = sc.run_as_non_root.or(psc.run_as_non_root).unwrap_or(false);
        let Some(uid) = user else {
            bail!(
                "container {} sets no runAsUser; the test maps only explicit users",
                c.name
            );
        };
        if non_root && uid == 0 {
            bail!(
                "container {}: runAsNonRoot with runAsUser 0 would not start",
                c.name
            );
        }
        let user_flag = match group {
            Some(g) => format!("{uid}:{g}"),
            None => uid.to_string(),
        };
        flag(&mut args, "--user", &user_flag);
        notes.push(format!(
            "runAsUser/runAsGroup → --user {user_flag} (runAsNonRoot: {non_root})"
        ));
        if let Some(g) = psc.fs_group {
            flag(&mut args, "--group-add", &g.to_string());
            notes.push(format!(
                "fsGroup {g} → --group-add {g}, volume files group {g}"
            ));
        }
        if sc.privileged == Some(true) {
            bail!(
                "container {} is privileged; the chart must not need that",
                c.name
            );
        }
        if sc.read_only_root_filesystem == Some(true) {
            // Without podman's tmpfs on /tmp, /var/tmp and /run: a path the chart does not make
            // writable must stay read-only, as in Kubernetes.
            args.push("--read-only".into());
            args.push("--read-only-tmpfs=false".into());
            notes.push("readOnlyRootFilesystem → --read-only --read-only-tmpfs=false".into());
        }
        if sc.allow_privilege_escalation == Some(false) {
            flag(&mut args, "--security-opt", "no-new-privileges");
            notes.push("allowPrivilegeEscalation: false → no-new-privileges".into());
        }
        for d in &sc.capabilities.drop {
            let cap = if d == "ALL" {
                "ALL".into()
            } else {
                format!("CAP_{d}")
            };
            flag(&mut args, "--cap-drop", &cap);
        }
        for a in &sc.capabilities.add {
            flag(&mut args, "--cap-add", &format!("CAP_{a}"));
        }
        notes.push(format!(
            "capabilities drop {:?} add {:?} → --cap-drop/--cap-add",
            sc.capabilities.drop, sc.capabilities.add
        ));
        match sc
            .seccomp_profile
            .as_ref()
            .or(psc.seccomp_profile.as_ref())
            .map(|p| p.kind.as_str())
        {
            None | Some("RuntimeDefault") => match ctx.runtime_default_seccomp {
                None => notes.push("seccomp RuntimeDefault → podman's default profile".into()),
                Some(profile) => {
                    let opt = format!("seccomp={}", profile.display());
                    flag(&mut args, "--security-opt", &opt);
                    notes.push(format!(
                        "seccomp RuntimeDefault → {opt} (podman's default profile with bpf(2) and perf_event_open(2) for CAP_BPF/CAP_PERFMON, as current runtimes have it)"
                    ));
                }
            },
            Some("Unconfined") => {
                flag(&mut args, "--security-opt", "seccomp=unconfined");
                notes.push("seccomp Unconfined → seccomp=unconfined".into());
            }
            Some(other) => bail!(
                "container {}: seccomp profile {other} is not mapped",
                c.name
            ),
        }
        match sc.app_armor_profile.as_ref().map(|p| p.kind.as_str()) {
            None | Some("RuntimeDefault") => {}
            Some("Unconfined") => {
                flag(&mut args, "--security-opt", "apparmor=unconfined");
                notes.push("appArmorProfile Unconfined → apparmor=unconfined".into());
            }
            Some(other) => bail!(
                "container {}: AppArmor profile {other} is not mapped",
                c.name
            ),
        }

        // Resource limits.
        for (resource, quantity) in &c.resources.limits {
            match resource.as_str() {
                "cpu" => flag(&mut args, "--cpus", &cpus(quantity)?),
                "memory" => flag(&mut args, "--memory", &memory(quantity)?),
                other => bail!("container {}: resource limit {other} is not mapped", c.name),
            }
            notes.push(format!(
                "limits.{resource} {quantity} → --{}",
                if resource == "cpu" { "cpus" } else { "memory" }
            ));
        }

        // Environment, with fieldRefs filled in; then `$(VAR)` in args from it.
        let mut env = BTreeMap::new();
        for e in &c.env {
            let value = match (&e.value, &e.value_from) {
                (Some(v), None) => v.clone(),
                (None, Some(EnvSource { field_ref: Some(f) })) => ctx
                    .fields
                    .get(f.field_path.as_str())
                    .with_context(|| {
                        format!("env {}: fieldRef {} is not mapped", e.name, f.field_path)
                    })?
                    .clone(),
                _ => bail!(
                    "env {} of container {}: only value and fieldRef are mapped",
                    e.name,
                    c.name
                ),
            };
            flag(&mut args, "--env", &format!("{}={value}", e.name));
            env.insert(e.name.clone(), value);
        }
        if !c.env.is_empty() {
            notes.push(format!(
                "env (fieldRefs filled in) → --env {}",
                env.keys().cloned().collect::<Vec<_>>().join(" ")
            ));
        }

        // Volumes.
        for m in &c.volume_mounts {
            let v = pod.volume(&m.name)?;
            let propagation = match m.mount_propagation.as_deref() {
                None | Some("None") => None,
                Some("HostToContainer") => Some("rslave"),
                Some("Bidirectional") => Some("rshared"),
                Some(other) => bail!("mount {}: propagation {other} is unknown", m.name),
            };
            let source = if let Some(h) = &v.host_path {
                let path = Path::new(&h.path);
                match h.kind.as_deref() {
                    Some("Directory") if !path.is_dir() => {
                        bail!(
                            "hostPath {} of volume {} is not a directory on this host",
                            h.path,
                            v.name
                        )
                    }
                    None | Some("") | Some("Directory") => {}
                    Some(other) => {
                        bail!("hostPath type {other} of volume {} is not mapped", v.name)
                    }
                }
                h.path.clone()
            } else if let Some(s) = &v.secret {
                let dir = ctx
                    .secrets
                    .get(&s.secret_name)
                    .with_context(|| format!("no test files for Secret {}", s.secret_name))?;
                volume_files(dir, mode_of(s.default_mode), pod.security_context.fs_group)?;
                dir.display().to_string()
            } else if let Some(p) = &v.projected {
                for source in &p.sources {
                    let t = source
                        .service_account_token
                        .as_ref()
                        .context("only serviceAccountToken projections are mapped")?;
                    if !ctx.token_dir.join(&t.path).is_file() {
                        bail!("no test token for projected path {}", t.path);
                    }
                }
                volume_files(
                    ctx.token_dir,
                    mode_of(p.default_mode),
                    pod.security_context.fs_group,
                )?;
                ctx.token_dir.display().to_string()
            } else if v.empty_dir.is_some() {
                let dir = ctx.scratch.join(format!("{}-{}", c.name, v.name));
                fs::create_dir_all(&dir)?;
                // An emptyDir is world-writable (0777), group fsGroup.
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o777))?;
                if let Some(g) = pod.security_context.fs_group {
                    chown(&dir, None, Some(g))?;
                }
                dir.display().to_string()
            } else {
                bail!("volume {} has a type the test does not map", v.name);
            };
            let mut options = vec![if m.read_only { "ro" } else { "rw" }];
            options.extend(propagation);
            let spec = format!("{source}:{}:{}", m.mount_path, options.join(","));
            flag(&mut args, "--volume", &spec);
            notes.push(format!("volume {} → --volume {spec}", m.name));
        }

        // The runtime's limits (it cannot raise them from the defaults here).
        for limit in ["nofile=1024:1024", "nproc=1024:1024"] {
            flag(&mut args, "--ulimit", limit);
        }

        // Image, entrypoint, args.
        if !c.command.is_empty() {
            flag(
                &mut args,
                "--entrypoint",
                &serde_json::to_string(&c.command)?,
            );
        }
        args.push(c.image.clone());
        args.extend(c.args.iter().map(|a| expand(a, &env)));
        Ok(PodmanRun { args, notes })
    }
}

/// Gives a volume's files the mode and group the kubelet gives them.
fn volume_files(dir: &Path, mode: u32, group: Option<u32>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        chown(&path, Some(0), Some(group.unwrap_or(0)))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

/// The controller's args with what needs a Kubernetes API replaced: the manifest directory
/// instead of `--kubernetes`; no leader election (a Lease) and no TokenReview. Each replaced
/// flag must be there, so a chart that changes them fails here rather than going untested.
fn file_source_args(args: &[String], manifests: &str) -> anyhow::Result<Vec<String>> {
    const NEEDS_API: &[&str] = &[
        "--leader-elect",
        "--lease-name=",
        "--lease-namespace=",
        "--identity=",
        "--agent-token-review",
        "--agent-service-account=",
        "--agent-token-audience=",
    ];
    let mut out = Vec::new();
    let mut seen = Vec::new();
    let mut replaced = false;
    for a in args {
        if a == "--kubernetes" {
            out.push(format!("--manifests={manifests}"));
            // Quarantines are API objects in Kubernetes, files with a manifest directory (by
            // default inside it, which is read-only): on the pod's writable /tmp emptyDir.
            out.push("--quarantine-dir=/tmp/quarantines".to_string());
            replaced = true;
        } else if let Some(flag) = NEEDS_API
            .iter()
            .find(|f| a == *f || (f.ends_with('=') && a.starts_with(*f)))
        {
            seen.push(*flag);
        } else {
            out.push(a.clone());
        }
    }
    if !replaced {
        bail!("the rendered controller args have no --kubernetes to replace");
    }
    let missing: Vec<&str> = NEEDS_API
        .iter()
        .copied()
        .filter(|f| !seen.contains(f))
        .collect();
    if !missing.is_empty() {
        bail!(
            "the rendered controller args lack {} (the chart changed: update the test's mapping)",
            missing.join(" ")
        );
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The test's environment, removed on drop.

/// Names and addresses of one run, derived from the process id.
struct Names {
    id: u32,
    node: String,
    /// (netns, host interface, address) of the client pod, the server pod and the controller.
    client: (String, String, Ipv4Addr),
    server: (String, String, Ipv4Addr),
    controller: (String, String, Ipv4Addr),
    agent_container: String,
    controller_container: String,
    dir: PathBuf,
}

impl Names {
    fn new() -> Self {
        let id = std::process::id();
        // 100.64.0.0/10 (shared address space): nothing on these machines routes it, and the
        // process id spreads parallel runs over it.
        let a = 64 + ((id >> 8) % 64) as u8;
        let b = (id % 256) as u8;
        let pod = |role: &str, suffix: &str, last: u8| {
            (
                format!("bulkhead-ct{id}-{role}"),
                format!("bhct{id}{suffix}"),
                Ipv4Addr::new(100, a, b, last),
            )
        };
        Names {
            id,
            node: format!("ct-node-{id}"),
            client: pod("client", "c", 2),
            server: pod("server", "s", 3),
            controller: pod("controller", "k", 4),
            agent_container: format!("bulkhead-ct{id}-agent"),
            controller_container: format!("bulkhead-ct{id}-controller"),
            dir: env::temp_dir().join(format!("bulkhead-container-test-{id}")),
        }
    }

    fn pods(&self) -> [&(String, String, Ipv4Addr); 3] {
        [&self.client, &self.server, &self.controller]
    }

    /// Where the agent pins its maps and links for this run's node.
    fn pins(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf/bulkhead").join(&self.node)
    }

    fn storage(&self) -> PathBuf {
        self.dir.join("podman")
    }

    /// Everything that is left of this run, if anything.
    fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        for (ns, host_if, _) in self.pods() {
            if Path::new("/run/netns").join(ns).exists() {
                left.push(format!("network namespace {ns}"));
            }
            if Path::new("/sys/class/net").join(host_if).exists() {
                left.push(format!("interface {host_if}"));
            }
        }
        if self.pins().exists() {
            left.push(format!("pins {}", self.pins().display()));
        }
        if self.dir.exists() {
            left.push(format!("directory {}", self.dir.display()));
        }
        left
    }
}

/// podman with this run's own storage (images, containers, state), runc and cgroupfs.
fn podman(names: &Names) -> Command {
    let storage = names.storage();
    let mut cmd = Command::new("podman");
    cmd.arg("--root")
        .arg(storage.join("root"))
        .arg("--runroot")
        .arg(storage.join("run"))
        .arg("--tmpdir")
        .arg(storage.join("tmp"))
        .args([
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--runtime",
            "runc",
            "--events-backend",
            "file",
        ]);
    cmd
}

/// Removes containers, the image storage, pins, pod namespaces and veths, temp files.
struct Cleanup<'a> {
    names: &'a Names,
    stop_servers: Arc<AtomicBool>,
    servers: Option<thread::JoinHandle<()>>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let n = self.names;
        self.stop_servers.store(true, Ordering::SeqCst);
        if let Some(t) = self.servers.take() {
            let _ = t.join();
        }
        if n.storage().exists() {
            for c in [&n.agent_container, &n.controller_container] {
                let _ = podman(n).args(["rm", "--force", "--time", "5", c]).output();
            }
            let _ = podman(n).args(["rmi", "--all", "--force"]).output();
        }
        // The agent's pins (links keep enforcing without it: remove them, not only the agent).
        let _ = fs::remove_dir_all(n.pins());
        for (ns, host_if, _) in n.pods() {
            let _ = Command::new("ip").args(["link", "del", host_if]).output();
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        if let Err(e) = fs::remove_dir_all(&n.dir)
            && n.dir.exists()
        {
            eprintln!("    cleanup: cannot remove {}: {e}", n.dir.display());
        }
    }
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    output(Command::new("ip").args(args))
}

/// A pod: a network namespace with `eth0`, the host end of its veth in the root namespace,
/// wired as a routed CNI does (Calico): `/32` address, default route via a link-local gateway
/// the host end answers by proxy ARP, a host route to the pod over its veth. Forwarding is on for
/// the host end only.
fn make_pod(ns: &str, host_if: &str, addr: Ipv4Addr) -> anyhow::Result<()> {
    ip(&["netns", "add", ns])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    ip(&[
        "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ])?;
    let cidr = format!("{addr}/32");
    ip(&["-n", ns, "addr", "add", &cidr, "dev", "eth0"])?;
    ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n",
        ns,
        "route",
        "add",
        "169.254.1.1",
        "dev",
        "eth0",
        "scope",
        "link",
    ])?;
    ip(&[
        "-n",
        ns,
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ])?;
    for (key, value) in [("forwarding", "1"), ("proxy_arp", "1"), ("rp_filter", "0")] {
        let path = format!("/proc/sys/net/ipv4/conf/{host_if}/{key}");
        fs::write(&path, value).with_context(|| format!("write {path}"))?;
    }
    ip(&["link", "set", host_if, "up"])?;
    ip(&["route", "add", &cidr, "dev", host_if])?;
    Ok(())
}

/// Runs `f` on a thread inside the named network namespace.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<thread::JoinHandle<anyhow::Result<T>>> {
    let path = Path::new("/run/netns").join(ns);
    let file = fs::File::open(&path).with_context(|| format!("open {}", path.display()))?;
    Ok(thread::spawn(move || {
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("enter the pod's network namespace")?;
        Ok(f())
    }))
}

fn join<T>(h: thread::JoinHandle<anyhow::Result<T>>) -> anyhow::Result<T> {
    h.join()
        .map_err(|_| anyhow!("a thread in a pod namespace panicked"))?
}

/// The server pod: answers `ok` on both ports until `stop`.
fn start_servers(ns: &str, stop: Arc<AtomicBool>) -> anyhow::Result<thread::JoinHandle<()>> {
    let (tx, rx) = mpsc::channel();
    let handle = in_netns(ns, move || {
        let listeners: Vec<TcpListener> = match [ALLOWED_PORT, DENIED_PORT]
            .iter()
            .map(|p| {
                let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, *p))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .collect::<std::io::Result<_>>()
        {
            Ok(l) => l,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let _ = tx.send(Ok(()));
        while !stop.load(Ordering::SeqCst) {
            let mut idle = true;
            for l in &listeners {
                if let Ok((mut s, _)) = l.accept() {
                    idle = false;
                    let _ = s.set_nonblocking(false);
                    let _ = s.write_all(b"ok\n");
                }
            }
            if idle {
                thread::sleep(Duration::from_millis(5));
            }
        }
    })?;
    rx.recv_timeout(Duration::from_secs(10))
        .context("the server pod did not start")?
        .context("bind the server pod's ports")?;
    Ok(thread::spawn(move || {
        let _ = join(handle);
    }))
}

/// Whether the client pod gets `ok` from the server pod on `port` (a denied SYN times out).
fn connects(names: &Names, port: u16) -> anyhow::Result<bool> {
    let to = SocketAddr::from((names.server.2, port));
    join(in_netns(&names.client.0, move || {
        let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_millis(700)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(700)));
        let mut buf = [0u8; 3];
        s.read_exact(&mut buf).is_ok() && &buf == b"ok\n"
    })?)
}

/// `GET path` over HTTP/1.1: (status, body), or `None` when nothing answers.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

fn http_get_in(ns: &str, addr: SocketAddr, path: &str) -> anyhow::Result<Option<(u16, String)>> {
    let path = path.to_string();
    join(in_netns(ns, move || http_get(addr, &path))?)
}

fn wait_for(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(200));
    }
}

fn checkpoint(name: &str) -> anyhow::Result<()> {
    if env::var(FAIL_AT_ENV).is_ok_and(|v| v == name) {
        bail!("failure injected at `{name}` ({FAIL_AT_ENV})");
    }
    Ok(())
}

/// A free TCP port on the host (for the agent's host-network ports).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Why podman cannot run containers here, if it cannot.
fn podman_unusable(names: &Names) -> Option<String> {
    if !crate::is_root() {
        return Some("not running as root".into());
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Some("the kernel has no BTF (/sys/kernel/btf/vmlinux)".into());
    }
    if let Err(e) = output(Command::new("podman").arg("--version")) {
        return Some(format!("podman is not installed ({e:#})"));
    }
    if let Err(e) = output(podman(names).args(["info", "--format", "json"])) {
        return Some(format!("podman cannot run here ({e:#})"));
    }
    None
}

/// The container test: skipped only where podman cannot run (failed instead with
/// `BULKHEAD_REQUIRE_PRIVILEGED=1`).
pub fn test(images: &[(Target, PathBuf)]) -> anyhow::Result<()> {
    step("test: the amd64 image in podman, configured as the chart configures it");
    let archive = images
        .iter()
        .find(|(t, _)| t.name == "amd64")
        .map(|(_, p)| p.clone())
        .context("no amd64 image was built")?;
    let names = Names::new();
    fs::create_dir_all(names.storage())?;
    if let Some(why) = podman_unusable(&names) {
        let _ = fs::remove_dir_all(&names.dir);
        if env::var(REQUIRE_PRIVILEGED_ENV).is_ok_and(|v| v == "1") {
            bail!("the container test cannot run ({why}) and {REQUIRE_PRIVILEGED_ENV}=1");
        }
        println!("    skipped: {why}");
        return Ok(());
    }
    let started = Instant::now();
    let result = run_test(&names, &archive);
    // The guard inside has dropped: whatever happened, nothing may be left.
    let left = names.leftovers();
    println!(
        "    {} in {:.1} s; cleanup left {}",
        if result.is_ok() { "passed" } else { "failed" },
        started.elapsed().as_secs_f64(),
        if left.is_empty() {
            "nothing".to_string()
        } else {
            left.join(", ")
        }
    );
    match (result, left.is_empty()) {
        (Err(e), _) => Err(e),
        (Ok(()), false) => bail!("the container test left {}", left.join(", ")),
        (Ok(()), true) => Ok(()),
    }
}

/// The cluster's objects for the controller's file source: the node, two pods on it and a
/// policy admitting the client to the server on `ALLOWED_PORT` only.
fn manifests(names: &Names) -> String {
    let node = &names.node;
    let pod = |name: &str, app: &str, ip: Ipv4Addr| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: ct, labels: {{app: {app}}}}}\n\
             spec:\n  nodeName: {node}\n  containers: [{{name: c, image: x, ports: [{{containerPort: {ALLOWED_PORT}}}, {{containerPort: {DENIED_PORT}}}]}}]\n\
             status: {{podIP: \"{ip}\"}}\n"
        )
    };
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {node}}}\n\
         ---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ct}}\n{}{}\
         ---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: server, namespace: ct}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  \
         - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n    ports: [{{port: {ALLOWED_PORT}}}]\n",
        pod("client", "client", names.client.2),
        pod("server", "server", names.server.2),
    )
}

/// The value of `--flag=value` in args.
fn arg_value<'a>(args: &'a [String], flag: &str) -> anyhow::Result<&'a str> {
    let prefix = format!("{flag}=");
    args.iter()
        .find_map(|a| a.strip_prefix(&prefix))
        .with_context(|| format!("the rendered args have no {flag}="))
}

fn socket_addr(s: &str) -> anyhow::Result<SocketAddr> {
    s.parse()
        .with_context(|| format!("{s} is not an address:port"))
}

/// Node state from the controller's `/api/nodes`: (connected, version, realized).
fn node_state(names: &Names, http: SocketAddr) -> anyhow::Result<Option<(bool, u64, u64)>> {
    let Some((200, body)) = http_get_in(&names.controller.0, http, "/api/nodes")? else {
        return Ok(None);
    };
    let nodes: serde_json::Value = serde_json::from_str(&body).context("parse /api/nodes")?;
    Ok(nodes.as_array().and_then(|a| {
        a.iter()
            .find(|n| n["node"] == names.node.as_str())
            .map(|n| {
                (
                    n["connected"].as_bool().unwrap_or(false),
                    n["version"].as_u64().unwrap_or(0),
                    n["realized"].as_u64().unwrap_or(0),
                )
            })
    }))
}

fn wait_realized(names: &Names, http: SocketAddr) -> anyhow::Result<()> {
    wait_for(
        "the agent to connect and realize its rule set",
        Duration::from_secs(60),
        || Ok(matches!(node_state(names, http)?, Some((true, v, r)) if v > 0 && r >= v)),
    )
}

/// Allowed connects, denied does not.
fn enforced(names: &Names) -> anyhow::Result<(bool, bool)> {
    Ok((
        connects(names, ALLOWED_PORT)?,
        connects(names, DENIED_PORT)?,
    ))
}

/// Fails when the container is no longer running (no use waiting for it).
fn ensure_running(names: &Names, container: &str) -> anyhow::Result<()> {
    let inspect: serde_json::Value = serde_json::from_str(&output(podman(names).args([
        "container",
        "inspect",
        "--format",
        "json",
        container,
    ]))?)?;
    if inspect[0]["State"]["Running"] != true {
        bail!(
            "container {container} is not running ({})",
            inspect[0]["State"]["Status"]
        );
    }
    Ok(())
}

fn probe_all(
    names: &Names,
    container: &str,
    what: &str,
    c: &Container,
    host: Ipv4Addr,
    ns: Option<&str>,
) -> anyhow::Result<()> {
    for HttpProbe {
        kind,
        path,
        port,
        host: probe_host,
    } in c.probes()?
    {
        let ip: Ipv4Addr = match probe_host {
            Some(h) => h.parse().with_context(|| format!("probe host {h}"))?,
            None => host,
        };
        let addr = SocketAddr::from((ip, port));
        wait_for(
            &format!("{what}'s {kind} probe GET {path} on {addr}"),
            Duration::from_secs(60),
            || {
                let answer = match ns {
                    Some(ns) => http_get_in(ns, addr, &path)?,
                    None => http_get(addr, &path),
                };
                let ok = answer.is_some_and(|(status, _)| (200..400).contains(&status));
                if !ok {
                    ensure_running(names, container)?;
                }
                Ok(ok)
            },
        )?;
        println!("    {what} {kind} probe: GET http://{addr}{path} answers");
    }
    Ok(())
}

fn run_test(names: &Names, archive: &Path) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut guard = Cleanup {
        names,
        stop_servers: stop.clone(),
        servers: None,
    };
    let result = run_checks(names, archive, &mut guard);
    if result.is_err() {
        for c in [&names.controller_container, &names.agent_container] {
            // The container's stderr comes on podman's stderr.
            if let Ok(out) = podman(names).args(["logs", "--tail", "40", c]).output() {
                eprintln!(
                    "---- {c} (last lines) ----\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
    drop(guard);
    result
}

fn run_checks(names: &Names, archive: &Path, guard: &mut Cleanup) -> anyhow::Result<()> {
    let root = project_root();
    let binary = root
        .join("target")
        .join(crate::image::AMD64.triple)
        .join("release/bulkhead");
    let bin = |args: &[&str]| output(Command::new(&binary).args(args));

    // Pods, after making sure no route on this host uses their addresses.
    let routes: serde_json::Value =
        serde_json::from_str(&ip(&["-j", "-4", "route", "show", "table", "all"])?)?;
    for (_, _, addr) in names.pods() {
        let taken = routes.as_array().is_some_and(|rs| {
            rs.iter()
                .any(|r| r["dst"] == addr.to_string() || r["dst"] == format!("{addr}/32"))
        });
        if taken {
            bail!("{addr} is already routed on this host; another run with the same id?");
        }
    }
    for (ns, host_if, addr) in names.pods() {
        make_pod(ns, host_if, *addr).with_context(|| format!("make pod {ns}"))?;
    }
    guard.servers = Some(start_servers(&names.server.0, guard.stop_servers.clone())?);
    println!(
        "    pods: client {} ({}), server {} ({}), controller {} ({}); node {}",
        names.client.2,
        names.client.1,
        names.server.2,
        names.server.1,
        names.controller.2,
        names.controller.1,
        names.node
    );

    // Certificates: the controller's, and the one agent certificate the chart shares.
    let certs = names.dir.join("certs");
    bin(&[
        "certs",
        "generate",
        "--dir",
        &certs.display().to_string(),
        "--nodes",
        "bulkhead-agent",
    ])?;
    let secret = |dir: &str, cert: &str, key: &str| -> anyhow::Result<PathBuf> {
        let d = names.dir.join(dir);
        fs::create_dir_all(&d)?;
        fs::copy(certs.join(cert), d.join("tls.crt"))?;
        fs::copy(certs.join(key), d.join("tls.key"))?;
        fs::copy(certs.join("ca.pem"), d.join("ca.crt"))?;
        Ok(d)
    };
    let controller_tls = secret("controller-tls", "controller.pem", "controller-key.pem")?;
    let agent_tls = secret("agent-tls", "bulkhead-agent.pem", "bulkhead-agent-key.pem")?;
    let token_dir = names.dir.join("token");
    fs::create_dir_all(&token_dir)?;
    fs::write(token_dir.join("token"), "a-token-no-api-server-reviews\n")?;
    let scratch = names.dir.join("scratch");
    let manifest_dir = names.dir.join("manifests");
    fs::create_dir_all(&manifest_dir)?;
    fs::write(manifest_dir.join("cluster.yaml"), manifests(names))?;
    for d in [&names.dir, &manifest_dir] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
    }

    // The chart, rendered with the built tag and the local image name; the agent's host ports
    // are free ones, so that parallel runs and other agents on this host do not collide.
    let (_, _, tags) = crate::image::tags()?;
    let tag = tags.last().context("no image tag")?; // <version>-<commit>
    let (metrics_port, http_port) = (free_port()?, free_port()?);
    let rendered = output(Command::new(crate::chart::helm()).args([
        "template",
        "bulkhead",
        &crate::chart::chart_dir().display().to_string(),
        "--namespace",
        RELEASE_NAMESPACE,
        "--set",
        &format!("image.repository={REPOSITORY}"),
        "--set",
        &format!("image.tag={tag}"),
        "--set",
        &format!("agent.metrics.port={metrics_port}"),
        "--set",
        &format!("agent.http.port={http_port}"),
    ]))?;
    let (agent_pod, mut controller_pod) = workloads(&rendered)?;

    // The image.
    let t = Instant::now();
    let loaded = output(podman(names).args(["load", "--input", &archive.display().to_string()]))?;
    let images: serde_json::Value =
        serde_json::from_str(&output(podman(names).args(["images", "--format", "json"]))?)?;
    let [image] = images.as_array().map(|a| &a[..]).unwrap_or_default() else {
        bail!("expected one image in the test's storage after `podman load`: {images}");
    };
    let id = image["Id"].as_str().context("podman images: no Id")?;
    // The archive names its image itself; the suite's build is then tagged with its commit, the
    // tag the chart is rendered with.
    let (version, _, _) = crate::image::tags()?;
    let loaded_as = format!("localhost/{}", crate::image::archive_name(&version));
    let names_of = image["Names"].as_array().cloned().unwrap_or_default();
    if !names_of.iter().any(|n| n == loaded_as.as_str()) {
        bail!("`podman load` named the image {names_of:?}, not {loaded_as}");
    }
    let want = format!("{REPOSITORY}:{tag}");
    output(podman(names).args(["tag", id, &want]))?;
    println!(
        "    podman load: {:.1} s ({}), image {} as {want}",
        t.elapsed().as_secs_f64(),
        loaded.trim().replace('\n', "; "),
        &id[..12.min(id.len())]
    );

    let seccomp = runtime_default_seccomp(names)?;

    // The controller, in its own pod network namespace, reading the manifest directory.
    let controller = controller_pod.container("controller")?;
    let secrets = |dir: &Path, pod: &PodSpec| -> BTreeMap<String, PathBuf> {
        pod.volumes
            .iter()
            .filter_map(|v| v.secret.as_ref())
            .map(|s| (s.secret_name.clone(), dir.to_path_buf()))
            .collect()
    };
    let controller_secrets = secrets(&controller_tls, &controller_pod);
    let grpc = socket_addr(arg_value(&controller.args, "--listen")?)?;
    let metrics = socket_addr(arg_value(&controller.args, "--metrics")?)?;
    let http = socket_addr(arg_value(&controller.args, "--http")?)?;
    const MANIFESTS_MOUNT: &str = "/etc/bulkhead/manifests";
    let args = file_source_args(&controller.args, MANIFESTS_MOUNT)?;
    controller_pod.containers.iter_mut().for_each(|c| {
        if c.name == "controller" {
            c.args = args.clone();
        }
    });
    let controller = controller_pod.container("controller")?;
    let ctx = PodContext {
        fields: BTreeMap::from([
            (
                "metadata.name",
                format!("bulkhead-controller-ct{}", names.id),
            ),
            ("metadata.namespace", RELEASE_NAMESPACE.to_string()),
            ("spec.nodeName", names.node.clone()),
        ]),
        secrets: &controller_secrets,
        token_dir: &token_dir,
        scratch: &scratch,
        pod_network: Some(format!("ns:/run/netns/{}", names.controller.0)),
        hosts: Vec::new(),
        runtime_default_seccomp: seccomp.as_deref(),
    };
    let mut run = PodmanRun::new(
        &controller_pod,
        controller,
        &ctx,
        &names.controller_container,
    )?;
    // The stand-in for --kubernetes: the manifest directory, read-only.
    let image_at = run
        .args
        .iter()
        .position(|a| *a == controller.image)
        .context("image arg")?;
    run.args.splice(
        image_at..image_at,
        [
            "--volume".to_string(),
            format!("{}:{MANIFESTS_MOUNT}:ro", manifest_dir.display()),
        ],
    );
    start("controller", names, &run)?;
    probe_all(
        names,
        &names.controller_container,
        "controller",
        controller,
        names.controller.2,
        None,
    )?;

    // The agent, in the host network namespace.
    let agent = agent_pod.container("agent")?;
    let agent_secrets = secrets(&agent_tls, &agent_pod);
    let url = arg_value(&agent.args, "--controller")?;
    let authority = url.split_once("://").map_or(url, |(_, rest)| rest);
    let (service, port) = authority
        .rsplit_once(':')
        .with_context(|| format!("--controller={url} has no port"))?;
    if port.parse::<u16>().ok() != Some(grpc.port()) {
        bail!("the agent dials port {port}, the controller listens on {grpc}");
    }
    let ctx = PodContext {
        fields: BTreeMap::from([
            ("metadata.name", format!("bulkhead-agent-ct{}", names.id)),
            ("metadata.namespace", RELEASE_NAMESPACE.to_string()),
            ("spec.nodeName", names.node.clone()),
        ]),
        secrets: &agent_secrets,
        token_dir: &token_dir,
        scratch: &scratch,
        pod_network: None,
        hosts: vec![(service.to_string(), names.controller.2)],
        runtime_default_seccomp: seccomp.as_deref(),
    };
    let run = PodmanRun::new(&agent_pod, agent, &ctx, &names.agent_container)?;
    start("agent", names, &run)?;
    check_agent_container(names)?;
    let metrics_addr = socket_addr(arg_value(&agent.args, "--metrics-addr")?)?;
    let node_ip = if metrics_addr.ip().is_unspecified() {
        Ipv4Addr::LOCALHOST
    } else {
        match metrics_addr.ip() {
            std::net::IpAddr::V4(v4) => v4,
            std::net::IpAddr::V6(_) => bail!("an IPv6 metrics address is not mapped"),
        }
    };
    probe_all(names, &names.agent_container, "agent", agent, node_ip, None)?;
    let http_in_ctrl = SocketAddr::from((Ipv4Addr::LOCALHOST, http.port()));
    wait_realized(names, http_in_ctrl)?;

    // Enforcement.
    wait_for(
        "client → server:8080 admitted and :8081 denied",
        Duration::from_secs(30),
        || Ok(enforced(names)? == (true, false)),
    )?;
    println!("    enforcing: client → server:{ALLOWED_PORT} admitted, :{DENIED_PORT} denied");
    let (status, body) = http_get(SocketAddr::from((node_ip, metrics_addr.port())), "/metrics")
        .context("the agent's /metrics does not answer")?;
    let series = body.lines().filter(|l| l.starts_with("bulkhead_")).count();
    if status != 200 || series == 0 {
        bail!("the agent's /metrics answers {status} without bulkhead_ series");
    }
    println!("    agent /metrics: {series} bulkhead_ samples");
    let (status, body) = http_get(
        SocketAddr::from((names.controller.2, metrics.port())),
        "/metrics",
    )
    .context("the controller's /metrics does not answer")?;
    if status != 200 || !body.contains("bulkhead_") {
        bail!("the controller's /metrics answers {status} without bulkhead_ series");
    }
    checkpoint("enforcing")?;

    // The agent restarted: the pinned programs keep enforcing while it is down and while it
    // starts, and the new agent enforces the same.
    let probing = Arc::new(AtomicBool::new(true));
    let counts = {
        let probing = probing.clone();
        let client = names.client.0.clone();
        let server = names.server.2;
        thread::spawn(move || -> anyhow::Result<[u32; 4]> {
            // [allowed ok, allowed failed, denied ok, denied refused]
            let mut c = [0u32; 4];
            let try_port = |port: u16| -> anyhow::Result<bool> {
                let to = SocketAddr::from((server, port));
                join(in_netns(&client, move || {
                    TcpStream::connect_timeout(&to, Duration::from_millis(700))
                        .ok()
                        .and_then(|mut s| {
                            s.set_read_timeout(Some(Duration::from_millis(700))).ok()?;
                            let mut buf = [0u8; 3];
                            s.read_exact(&mut buf).ok()?;
                            Some(&buf == b"ok\n")
                        })
                        .unwrap_or(false)
                })?)
            };
            while probing.load(Ordering::SeqCst) {
                c[if try_port(ALLOWED_PORT)? { 0 } else { 1 }] += 1;
                c[if try_port(DENIED_PORT)? { 2 } else { 3 }] += 1;
            }
            Ok(c)
        })
    };
    // As the kubelet stops it: SIGTERM, SIGKILL after the pod's grace period.
    let grace = agent_pod.termination_grace_period_seconds.unwrap_or(30);
    let t = Instant::now();
    output(podman(names).args(["stop", "--time", &grace.to_string(), &names.agent_container]))?;
    let stopped = t.elapsed();
    let inspect: serde_json::Value = serde_json::from_str(&output(podman(names).args([
        "container",
        "inspect",
        "--format",
        "json",
        &names.agent_container,
    ]))?)?;
    let exit = &inspect[0]["State"]["ExitCode"];
    if *exit != 0 {
        bail!(
            "the agent did not stop on SIGTERM: exit code {exit} after {:.1} s (grace period {grace} s)",
            stopped.as_secs_f64()
        );
    }
    thread::sleep(Duration::from_secs(2));
    if enforced(names)? != (true, false) {
        bail!("with the agent stopped, enforcement changed (pinned links must keep it)");
    }
    output(podman(names).args(["start", &names.agent_container]))?;
    probe_all(
        names,
        &names.agent_container,
        "restarted agent",
        agent,
        node_ip,
        None,
    )?;
    wait_realized(names, http_in_ctrl)?;
    let restarted = t.elapsed();
    thread::sleep(Duration::from_secs(1));
    probing.store(false, Ordering::SeqCst);
    let [allowed_ok, allowed_failed, denied_ok, denied_refused] = counts
        .join()
        .map_err(|_| anyhow!("the probing thread panicked"))??;
    println!(
        "    agent restart (stopped in {:.1} s, ready again after {:.1} s): allowed {allowed_ok} ok / {allowed_failed} failed, denied {denied_ok} through / {denied_refused} refused",
        stopped.as_secs_f64(),
        restarted.as_secs_f64()
    );
    if denied_ok > 0 || allowed_failed > 0 || allowed_ok == 0 || denied_refused == 0 {
        bail!("enforcement changed while the agent restarted");
    }
    if enforced(names)? != (true, false) {
        bail!("the restarted agent does not enforce as before");
    }
    checkpoint("restarted")?;

    // The controller refuses a TLS client without a certificate of its CA, and answers the same
    // request made with one (the agent's). curl speaks TLS and HTTP/2 as a gRPC client would
    // and tells the two apart by its exit code; the bulkhead CLI would refuse to try without one.
    let ca = certs.join("ca.pem").display().to_string();
    let server_name = "bulkhead-controller";
    let curl = |with_cert: bool| -> anyhow::Result<(Option<i32>, String)> {
        let mut cmd = Command::new("curl");
        cmd.args([
            "--silent",
            "--show-error",
            "--output",
            "/dev/null",
            "--max-time",
            "10",
        ])
        .args(["--cacert", &ca, "--resolve"])
        .arg(format!(
            "{server_name}:{}:{}",
            grpc.port(),
            names.controller.2
        ))
        .arg(format!("https://{server_name}:{}/", grpc.port()));
        if with_cert {
            cmd.arg("--cert")
                .arg(agent_tls.join("tls.crt"))
                .arg("--key")
                .arg(agent_tls.join("tls.key"));
        }
        let out = cmd
            .output()
            .with_context(|| format!("run `{}`", describe(&cmd)))?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    };
    let (code, stderr) = curl(false)?;
    if code == Some(0) {
        bail!("the controller completed a TLS session with a client without a certificate");
    }
    println!("    controller, client without a certificate: refused ({stderr})");
    let (code, stderr) = curl(true)?;
    if code != Some(0) {
        bail!("the controller refused the agent's certificate too: {stderr}");
    }
    println!("    controller, client with the agent certificate: answered");
    Ok(())
}

/// The seccomp profile `RuntimeDefault` stands for. Current runtimes' default profiles (moby,
/// containerd, containers-common) allow bpf(2) to a container holding CAP_BPF and
/// perf_event_open(2) to one holding CAP_PERFMON; older ones, like Debian 12's podman 4.3, only
/// with CAP_SYS_ADMIN, so an agent without it gets EPERM (the chart's `agent.seccompProfile`
/// says to use `Unconfined` there). Rather than run the agent unconfined, the test then uses
/// podman's own default profile with those two rules added, still a filter, as a current
/// runtime applies it. `None` when the runtime's default already allows it.
fn runtime_default_seccomp(names: &Names) -> anyhow::Result<Option<PathBuf>> {
    let info: serde_json::Value =
        serde_json::from_str(&output(podman(names).args(["info", "--format", "json"]))?)?;
    let Some(path) = info["host"]["security"]["seccompProfilePath"].as_str() else {
        return Ok(None);
    };
    let mut profile: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(path)
            .with_context(|| format!("read podman's seccomp profile {path}"))?,
    )
    .with_context(|| format!("parse {path}"))?;
    let syscalls = profile["syscalls"]
        .as_array_mut()
        .with_context(|| format!("{path} has no syscalls"))?;
    let allows = |name: &str, cap: &str, rules: &[serde_json::Value]| {
        rules.iter().any(|r| {
            r["action"] == "SCMP_ACT_ALLOW"
                && r["names"]
                    .as_array()
                    .is_some_and(|n| n.iter().any(|n| n == name))
                && r["includes"]["caps"]
                    .as_array()
                    .is_none_or(|c| c.iter().any(|c| c == cap))
        })
    };
    if allows("bpf", "CAP_BPF", syscalls) {
        return Ok(None);
    }
    for rule in syscalls.iter_mut() {
        if rule["action"] != "SCMP_ACT_ALLOW"
            && let Some(names) = rule["names"].as_array_mut()
        {
            names.retain(|n| n != "bpf" && n != "perf_event_open");
        }
    }
    for (name, cap) in [("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")] {
        syscalls.push(serde_json::json!({
            "names": [name],
            "action": "SCMP_ACT_ALLOW",
            "args": [],
            "includes": {"caps": [cap]},
            "excludes": {},
        }));
    }
    let derived = names.dir.join("seccomp-runtime-default.json");
    fs::write(&derived, serde_json::to_string_pretty(&profile)?)?;
    println!(
        "    podman's default seccomp profile ({path}) allows bpf(2) only with CAP_SYS_ADMIN; RuntimeDefault is mapped to it plus bpf for CAP_BPF and perf_event_open for CAP_PERFMON"
    );
    Ok(Some(derived))
}

/// `podman run` of a mapped container; prints the mapping.
fn start(what: &str, names: &Names, run: &PodmanRun) -> anyhow::Result<()> {
    println!("    {what}:");
    for n in &run.notes {
        println!("      {n}");
    }
    let t = Instant::now();
    let mut cmd = podman(names);
    cmd.args(&run.args);
    println!("      + {}", describe(&cmd));
    output(&mut cmd).with_context(|| format!("start the {what} container"))?;
    println!("      started in {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}

/// What the runtime made of the agent's settings: exactly the three capabilities, a read-only
/// root, the host network.
fn check_agent_container(names: &Names) -> anyhow::Result<()> {
    let inspect: serde_json::Value = serde_json::from_str(&output(podman(names).args([
        "container",
        "inspect",
        "--format",
        "json",
        &names.agent_container,
    ]))?)?;
    let c = &inspect[0];
    let mut caps: Vec<&str> = c["EffectiveCaps"]
        .as_array()
        .context("podman inspect: no EffectiveCaps")?
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    caps.sort_unstable();
    if caps != ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"] {
        bail!("the agent runs with capabilities {caps:?}");
    }
    if c["HostConfig"]["ReadonlyRootfs"] != true || c["HostConfig"]["NetworkMode"] != "host" {
        bail!(
            "the agent container is not read-only on the host network: ReadonlyRootfs {}, NetworkMode {}",
            c["HostConfig"]["ReadonlyRootfs"],
            c["HostConfig"]["NetworkMode"]
        );
    }
    println!("      runtime: capabilities {caps:?}, read-only root, host network");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_mode_is_octal_as_in_kubernetes() {
        let v: SecretVolume = serde_yaml::from_str("{secretName: s, defaultMode: 0440}").unwrap();
        assert_eq!(v.default_mode, Some(0o440));
        let v: SecretVolume = serde_yaml::from_str("{secretName: s, defaultMode: 288}").unwrap();
        assert_eq!(v.default_mode, Some(0o440));
        let v: SecretVolume = serde_yaml::from_str("{secretName: s}").unwrap();
        assert_eq!(v.default_mode, None);
    }

    #[test]
    fn kubelet_style_expansion() {
        let env = BTreeMap::from([("POD_NAME".to_string(), "p-1".to_string())]);
        assert_eq!(expand("--identity=$(POD_NAME)", &env), "--identity=p-1");
        assert_eq!(
            expand("$(MISSING)/$$(POD_NAME)", &env),
            "$(MISSING)/$(POD_NAME)"
        );
        assert_eq!(expand("a$b", &env), "a$b");
    }

    #[test]
    fn quantities() {
        assert_eq!(cpus("500m").unwrap(), "0.5");
        assert_eq!(cpus("1").unwrap(), "1");
        assert_eq!(memory("256Mi").unwrap(), "256m");
    }

    #[test]
    fn controller_args_lose_only_what_needs_the_api() {
        let args: Vec<String> = [
            "--log=info",
            "controller",
            "--kubernetes",
            "--leader-elect",
            "--lease-name=l",
            "--lease-namespace=$(POD_NAMESPACE)",
            "--identity=$(POD_NAME)",
            "--listen=0.0.0.0:9960",
            "--agent-token-review",
            "--agent-service-account=ns/sa",
            "--agent-token-audience=a",
            "--tls-cert=/c",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            file_source_args(&args, "/m").unwrap(),
            [
                "--log=info",
                "controller",
                "--manifests=/m",
                "--quarantine-dir=/tmp/quarantines",
                "--listen=0.0.0.0:9960",
                "--tls-cert=/c"
            ]
        );
        assert!(file_source_args(&args[..3], "/m").is_err());
    }
}
