//! The mapping of a rendered container to `podman run`, and podman itself.

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    os::unix::fs::{PermissionsExt, chown},
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, bail};

use super::{pods::Names, rendered::*};
use crate::{describe, output};

/// What stands in for the cluster: values of `fieldRef`s, files for Secrets and projected
/// tokens, the network namespace of a pod without `hostNetwork`.
pub(super) struct PodContext<'a> {
    /// `metadata.name`, `metadata.namespace`, `spec.nodeName`, …
    pub(super) fields: BTreeMap<&'static str, String>,
    /// Secret name → directory with its keys as files (written by the test).
    pub(super) secrets: &'a BTreeMap<String, PathBuf>,
    /// Directory holding the projected service-account token, written by the test.
    pub(super) token_dir: &'a Path,
    /// Scratch directory for emptyDirs.
    pub(super) scratch: &'a Path,
    /// `--network` of a pod without `hostNetwork`.
    pub(super) pod_network: Option<String>,
    /// DNS names the cluster would resolve (Service names), as `--add-host name:ip`.
    pub(super) hosts: Vec<(String, Ipv4Addr)>,
    /// The profile `RuntimeDefault` stands for when the runtime's own predates CAP_BPF (see
    /// [`runtime_default_seccomp`]); `None`: the runtime's default.
    pub(super) runtime_default_seccomp: Option<&'a Path>,
}

/// A `podman run` command line made from a rendered container; `notes` say how each
/// Kubernetes setting was mapped, for the log.
pub(super) struct PodmanRun {
    pub(super) args: Vec<String>,
    pub(super) notes: Vec<String>,
}

/// Kubernetes `$(VAR)` references in args, expanded from the container's env (`$$` escapes).
pub(super) fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
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
pub(super) fn cpus(quantity: &str) -> anyhow::Result<String> {
    Ok(match quantity.strip_suffix('m') {
        Some(milli) => format!("{}", milli.parse::<f64>()? / 1000.0),
        None => quantity.parse::<f64>()?.to_string(),
    })
}

/// `256Mi` → `256m` (podman's binary units), `1Gi` → `1g`.
pub(super) fn memory(quantity: &str) -> anyhow::Result<String> {
    for (suffix, unit) in [("Ki", "k"), ("Mi", "m"), ("Gi", "g")] {
        if let Some(n) = quantity.strip_suffix(suffix) {
            return Ok(format!("{}{unit}", n.parse::<u64>()?));
        }
    }
    Ok(format!("{}b", quantity.parse::<u64>()?))
}

pub(super) fn mode_of(mode: Option<u32>) -> u32 {
    // Kubernetes' default for Secret and projected volumes.
    mode.unwrap_or(0o644)
}

impl PodmanRun {
    pub(super) fn new(
        pod: &PodSpec,
        c: &Container,
        ctx: &PodContext,
        name: &str,
    ) -> anyhow::Result<Self> {
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
pub(super) fn volume_files(dir: &Path, mode: u32, group: Option<u32>) -> anyhow::Result<()> {
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
pub(super) fn file_source_args(args: &[String], manifests: &str) -> anyhow::Result<Vec<String>> {
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

/// podman with this run's own storage (images, containers, state), runc and cgroupfs.
pub(super) fn podman(names: &Names) -> Command {
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

/// The seccomp profile `RuntimeDefault` stands for. Current runtimes' default profiles (moby,
/// containerd, containers-common) allow bpf(2) to a container holding CAP_BPF and
/// perf_event_open(2) to one holding CAP_PERFMON; older ones, like Debian 12's podman 4.3, only
/// with CAP_SYS_ADMIN, so an agent without it gets EPERM (the chart's `agent.seccompProfile`
/// says to use `Unconfined` there). Rather than run the agent unconfined, the test then uses
/// podman's own default profile with those two rules added, still a filter, as a current
/// runtime applies it. `None` when the runtime's default already allows it.
pub(super) fn runtime_default_seccomp(names: &Names) -> anyhow::Result<Option<PathBuf>> {
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
pub(super) fn start(what: &str, names: &Names, run: &PodmanRun) -> anyhow::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn kubelet_style_expansion() {
        let env = BTreeMap::from([("POD_NAME".to_string(), "p-1".to_string())]);
        assert_eq!(expand("--identity=$(POD_NAME)", &env), "--identity=p-1");
        assert_eq!(
            expand("$(MISSING)/$$(POD_NAME)", &env),
            "$(MISSING)/$(POD_NAME)"
        );
        assert_eq!(expand("a$b", &env), "a$b");
    }

    #[test]
    pub(super) fn quantities() {
        assert_eq!(cpus("500m").unwrap(), "0.5");
        assert_eq!(cpus("1").unwrap(), "1");
        assert_eq!(memory("256Mi").unwrap(), "256m");
    }

    #[test]
    pub(super) fn controller_args_lose_only_what_needs_the_api() {
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
