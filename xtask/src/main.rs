//! Project automation. `cargo xtask setup | test | demo`.
//!
//! `setup` is idempotent and installs only what is missing: the Debian packages the tests and the
//! lab use, the `rust-src` component, and `bpf-linker` built against rustc's own LLVM. Both README
//! commands run it first, so a fresh machine needs nothing else.

mod chart;
mod container;
mod demo;
mod image;
mod web;

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Bulkhead project automation")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent).
    Setup,
    /// The whole test suite: setup, fmt check, clippy -D warnings, unit + eBPF + end-to-end tests.
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Only the Helm chart: install its tools, then lint, render, validate and scan it.
    Chart,
    /// Rebuild the web UI bundle (npm ci + esbuild) into controller/assets/ui/, which is committed.
    Ui,
    /// The `bulkhead` image for linux/amd64 and linux/arm64, as OCI archives in target/image.
    Image {
        /// Only this architecture (amd64 or arm64).
        #[arg(long)]
        arch: Option<String>,
        /// Write the image's files into this directory instead of archives (the Containerfile
        /// builds its image from them).
        #[arg(long)]
        rootfs: Option<PathBuf>,
    },
    /// Only the container test: the amd64 image run with podman as the chart configures it.
    #[command(hide = true)]
    ContainerTest,
    /// The main job: build Bulkhead and run the local demo.
    Demo {
        /// Leave the demo's namespaces and agent in place for exploration.
        #[arg(long)]
        keep: bool,
    },
}

/// Debian packages the demo needs: `ip` for the lab's namespaces and veths, `sysctl` (procps)
/// for their forwarding settings, dnsmasq (`dnsmasq-base`, without the system service) as every
/// lab's cluster DNS.
const DEMO_PACKAGES: &[&str] = &["iproute2", "procps", "dnsmasq-base"];

/// Debian packages the tests and benchmarks need besides: `bpftool` to make maps of older
/// layouts, `iperf3`/`iptables`/`nftables`/`ethtool` for the benchmarks' comparisons, `ping` for
/// the ICMP end-to-end checks, `python3` for pods that resolve names with the libc resolver.
const TEST_PACKAGES: &[&str] = &[
    "bpftool",
    "python3",
    "iperf3",
    "iptables",
    "nftables",
    "ethtool",
    "iputils-ping",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup(),
        Task::Test { cargo_args } => setup().and_then(|()| test(&cargo_args)),
        // Only what the demo uses: no browser, npm packages, helm or chart linters.
        Task::Demo { keep } => setup_demo().and_then(|()| demo::demo(keep)),
        Task::Ui => web::ui(),
        Task::Image { arch, rootfs } => image::image_task(arch.as_deref(), rootfs.as_deref()),
        Task::Chart => chart::setup().and_then(|()| chart::test()),
        Task::ContainerTest => container_test(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the root")
        .to_path_buf()
}

/// Where cargo puts what it builds: `CARGO_TARGET_DIR` when set (relative to the root), else
/// `target/` under the root.
pub fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(|d| project_root().join(d))
        .unwrap_or_else(|| project_root().join("target"))
}

fn step(what: &str) {
    println!("==> {what}");
}

/// Runs a command, echoing it, and fails with its name when it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    println!("+ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            describe(cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().to_string();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|s| s.trim() == "0")
}

/// `apt-get install` of Debian packages, non-interactive, without recommends (as root).
pub fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Everything the tests need: the demo's tools, the test packages, the web UI's browser and
/// packages, the chart's tools.
fn setup() -> anyhow::Result<()> {
    setup_demo()?;
    step("setup: Debian packages for the tests and benchmarks");
    install_packages(TEST_PACKAGES)?;
    web::setup()?;
    chart::setup()?;
    image::setup()?;
    container::setup()?;
    Ok(())
}

/// `cargo xtask container-test`: what the container test needs, the amd64 image, the test.
fn container_test() -> anyhow::Result<()> {
    setup_demo()?;
    image::setup()?;
    chart::setup_helm()?;
    container::setup()?;
    let built = image::build_images(&[image::AMD64])?;
    container::test(&built)
}

/// What building Bulkhead and running the demo need.
fn setup_demo() -> anyhow::Result<()> {
    step("setup: Debian packages for the lab");
    install_packages(DEMO_PACKAGES)?;
    setup_toolchain()
}

pub fn install_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_ok_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        println!("    all present");
    } else if !is_root() {
        bail!(
            "missing Debian packages {}; install them as root: apt-get install -y {}",
            missing.join(" "),
            missing.join(" ")
        );
    } else {
        apt_install(&missing)?;
    }
    Ok(())
}

/// rust-src and bpf-linker: building the eBPF programs.
pub fn setup_toolchain() -> anyhow::Result<()> {
    step("setup: rust-src (the eBPF crate builds core for the bpf target)");
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "stable",
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("    present");
    } else {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "stable",
        ]))?;
    }

    step("setup: bpf-linker against rustc's own LLVM");
    let have = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if have.contains(BPF_LINKER_VERSION) {
        println!("    {}", have.trim());
    } else {
        install_bpf_linker()?;
    }
    Ok(())
}

/// bpf-linker must use the same LLVM as rustc: find rustc's LLVM major version and its shared
/// library in the sysroot, expose it as `<prefix>/lib/libLLVM.so`, and build against that.
fn install_bpf_linker() -> anyhow::Result<()> {
    let verbose = output(Command::new("rustc").arg("-vV"))?;
    let llvm = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc -vV` does not say which LLVM it uses")?;
    let major = llvm
        .split('.')
        .next()
        .context("unexpected LLVM version format")?
        .trim()
        .to_string();
    let sysroot = PathBuf::from(output(Command::new("rustc").args(["--print", "sysroot"]))?.trim());
    let lib_dir = sysroot.join("lib");
    let lib = fs::read_dir(&lib_dir)
        .with_context(|| format!("read {}", lib_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            name.starts_with(&format!("libLLVM.so.{major}"))
                || name.starts_with(&format!("libLLVM-{major}"))
        })
        .with_context(|| format!("no libLLVM for LLVM {major} in {}", lib_dir.display()))?;
    let prefix = project_root().join("target/llvm-prefix");
    fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&lib, &link)
        .with_context(|| format!("symlink {} -> {}", link.display(), lib.display()))?;
    println!("    LLVM {major}: {}", lib.display());
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix))
    .context("building bpf-linker failed; the recipe is in ../shared/DESIGN.md")
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    let root = project_root();
    web::test()?;
    step("test: rustfmt");
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["fmt", "--all", "--", "--check"]))?;
    step("test: clippy -D warnings");
    run(Command::new("cargo").current_dir(&root).args([
        "clippy",
        "--workspace",
        "--exclude",
        "bulkhead-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("test: clippy -D warnings on the eBPF programs (bpf target)");
    run(Command::new("cargo")
        .current_dir(&root)
        .env("RUSTC_BOOTSTRAP", "1")
        .args([
            "clippy",
            "-p",
            "bulkhead-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]))?;
    step("test: unit, eBPF (BPF_PROG_TEST_RUN) and end-to-end (network namespaces) tests");
    if env::var("BULKHEAD_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
        println!("    BULKHEAD_REQUIRE_PRIVILEGED=1: privileged tests fail rather than skip");
    }
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["test", "--workspace", "--exclude", "bulkhead-ebpf"])
        .args(extra))?;
    chart::test()?;
    // The image for both architectures, and the arm64 binary run under qemu-user.
    let built = image::build_images(&image::TARGETS)?;
    image::test_arm64(&built.images)?;
    // The images pushed to a registry and pulled from it; the amd64 image in podman, configured
    // as the chart configures it.
    container::test(&built)?;
    Ok(())
}
