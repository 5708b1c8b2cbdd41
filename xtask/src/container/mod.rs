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
    io::Read,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};

use crate::{describe, image::Built, output, step};

mod mapping;
mod pods;
mod registry;
mod rendered;

use self::{
    mapping::*,
    pods::*,
    registry::{Registry, expected_platforms},
    rendered::*,
};

/// Set in CI: a privileged test that cannot run fails instead of skipping.
const REQUIRE_PRIVILEGED_ENV: &str = "BULKHEAD_REQUIRE_PRIVILEGED";
/// Makes the test fail on purpose at a named checkpoint (`enforcing`, `restarted`), to show that
/// its cleanup runs on failure.
const FAIL_AT_ENV: &str = "BULKHEAD_CONTAINER_TEST_FAIL_AT";

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
    step("setup: podman, runc, curl, a registry and skopeo (the container test)");
    crate::install_packages(PACKAGES)?;
    crate::install_packages(registry::PACKAGES)
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
pub fn test(built: &Built) -> anyhow::Result<()> {
    step("test: the image pushed to a registry, pulled by podman, run as the chart configures it");
    if !built.images.iter().any(|(t, _)| t.name == "amd64") {
        bail!("no amd64 image was built");
    }
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
    let result = run_test(&names, built);
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

fn run_test(names: &Names, built: &Built) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut guard = Cleanup {
        names,
        stop_servers: stop.clone(),
        servers: None,
    };
    let result = run_checks(names, built, &mut guard);
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

fn run_checks(names: &Names, built: &Built, guard: &mut Cleanup) -> anyhow::Result<()> {
    let binary = crate::image::AMD64.binary();
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

    // The image as the README ships it: the archive pushed to a registry with skopeo (both
    // architectures under one index when both were built), the chart rendered with that
    // registry as `image.repository` and its default tag (the `appVersion`), the image pulled
    // from there by podman as a node's runtime pulls it. The agent's host ports are free ones,
    // so that parallel runs and other agents on this host do not collide.
    let (version, _, _) = crate::image::tags()?;
    let registry = Registry::start(&names.dir.join("registry"))?;
    let t = Instant::now();
    let amd64 = built
        .images
        .iter()
        .find(|(t, _)| t.name == "amd64")
        .map(|(_, p)| p.as_path())
        .context("no amd64 image was built")?;
    let reference = match &built.index {
        Some(index) => registry.push(index, true, &version)?,
        None => registry.push(amd64, false, &version)?,
    };
    let platforms = registry.platforms(&reference)?;
    let targets: Vec<_> = built.images.iter().map(|(t, _)| *t).collect();
    if platforms != expected_platforms(&targets) {
        bail!(
            "the registry serves {reference} for {platforms:?}, not for {:?}",
            expected_platforms(&targets)
        );
    }
    println!(
        "    pushed {reference} in {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        platforms.join(", ")
    );
    let (metrics_port, http_port) = (free_port()?, free_port()?);
    let rendered = output(Command::new(crate::chart::helm()).args([
        "template",
        "bulkhead",
        &crate::chart::chart_dir().display().to_string(),
        "--namespace",
        RELEASE_NAMESPACE,
        "--set",
        &format!("image.repository={}", registry.repository()),
        "--set",
        &format!("agent.metrics.port={metrics_port}"),
        "--set",
        &format!("agent.http.port={http_port}"),
    ]))?;
    let (agent_pod, mut controller_pod) = workloads(&rendered)?;
    for c in agent_pod
        .containers
        .iter()
        .chain(&controller_pod.containers)
    {
        if c.image != reference {
            bail!(
                "the chart renders container {} with image {}, not the pushed {reference}",
                c.name,
                c.image
            );
        }
    }

    // `podman load` of the per-architecture archive names the image as the README says, and
    // the pull from the registry gives the very same image (one image id).
    let t = Instant::now();
    let loaded = output(podman(names).args(["load", "--input", &amd64.display().to_string()]))?;
    let loaded_as = format!("localhost/{}", crate::image::archive_name(&version));
    let pulled = output(podman(names).args(["pull", "--quiet", "--tls-verify=false", &reference]))?;
    let images: serde_json::Value =
        serde_json::from_str(&output(podman(names).args(["images", "--format", "json"]))?)?;
    // `podman images` lists an image once per name: one distinct id is one image.
    let rows = images.as_array().map(|a| &a[..]).unwrap_or_default();
    let ids: std::collections::BTreeSet<&str> =
        rows.iter().filter_map(|i| i["Id"].as_str()).collect();
    let (Some(image), 1) = (rows.first(), ids.len()) else {
        bail!(
            "expected one image after `podman load` and `podman pull` of the same build: {images}"
        );
    };
    let id = image["Id"].as_str().context("podman images: no Id")?;
    let names_of = image["Names"].as_array().cloned().unwrap_or_default();
    for want in [&loaded_as, &reference] {
        if !names_of.iter().any(|n| n == want.as_str()) {
            bail!("the image is named {names_of:?}, not {want}");
        }
    }
    if pulled.trim() != id {
        bail!(
            "`podman pull {reference}` gave image {}, `podman load` {id}",
            pulled.trim()
        );
    }
    println!(
        "    podman load ({}) and pull from the registry: {:.1} s, one image {} named {}",
        loaded.trim().replace('\n', "; "),
        t.elapsed().as_secs_f64(),
        &id[..12.min(id.len())],
        names_of
            .iter()
            .filter_map(|n| n.as_str())
            .collect::<Vec<_>>()
            .join(", ")
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
