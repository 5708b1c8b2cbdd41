//! The web UI's build: `ui/` (npm sources, package-lock.json) bundled by esbuild into
//! `controller/assets/ui/`, which is committed so that building or running Bulkhead needs no npm.
//!
//! * `cargo xtask ui` — `npm ci` and the build, into `controller/assets/ui/` (commit the result).
//! * `setup()` — Debian's `chromium` (the UI's end-to-end test drives it) and `npm ci` in `ui/`
//!   (esbuild for the drift check, playwright-core for the end-to-end test).
//! * `test()` — rebuilds the bundle into `target/` and fails if it differs from the committed one.

use std::{fs, path::Path, process::Command};

use anyhow::{Context, bail};

use crate::{project_root, run};

const CHROMIUM: &str = "/usr/bin/chromium";

/// The bundle's files, as `ui/build.mjs` writes them.
const BUNDLE: &[&str] = &["index.html", "app.js", "app.css"];

fn npm_present() -> bool {
    Command::new("npm")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `npm ci` in `ui/`: exactly the locked packages (from npm's cache when it has them).
fn npm_ci(ui: &Path) -> anyhow::Result<()> {
    run(Command::new("npm").current_dir(ui).args([
        "ci",
        "--prefer-offline",
        "--no-audit",
        "--no-fund",
    ]))
}

/// Chromium from Debian (for the UI's end-to-end test) and the UI's npm packages.
pub fn setup() -> anyhow::Result<()> {
    crate::step("setup: web UI (Debian chromium for its end-to-end test, npm ci in ui/)");
    let installed = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "chromium"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"));
    if installed && Path::new(CHROMIUM).exists() {
        println!("    chromium present");
    } else if !crate::is_root() {
        bail!("missing Debian package chromium; install it as root: apt-get install -y chromium");
    } else {
        crate::apt_install(&["chromium"])?;
    }
    if !npm_present() {
        // Building and running Bulkhead need no npm (the bundle is committed); testing the UI
        // does, and `test()` says so.
        println!(
            "    npm not found: the web UI's drift check and end-to-end test need Node.js ≥ 20 with npm"
        );
        return Ok(());
    }
    npm_ci(&project_root().join("ui"))
}

/// Builds the bundle into `out` (`npm ci` first).
fn build(out: &Path) -> anyhow::Result<()> {
    let ui = project_root().join("ui");
    if !npm_present() {
        bail!(
            "npm not found: building the web UI needs Node.js ≥ 20 with npm (`apt-get install nodejs npm`)"
        );
    }
    npm_ci(&ui)?;
    run(Command::new("node")
        .current_dir(&ui)
        .arg("build.mjs")
        .arg("--out")
        .arg(out))
}

/// `cargo xtask ui`: rebuild the committed bundle.
pub fn ui() -> anyhow::Result<()> {
    crate::step("ui: npm ci + esbuild into controller/assets/ui/");
    build(&project_root().join("controller/assets/ui"))?;
    println!("    commit controller/assets/ui/ with the change to ui/");
    Ok(())
}

/// The committed bundle is what `ui/` builds to, byte for byte.
pub fn test() -> anyhow::Result<()> {
    crate::step("test: the committed web UI bundle matches a fresh build of ui/ (drift check)");
    let root = project_root();
    let fresh = root.join("target/ui-drift-check");
    let _ = fs::remove_dir_all(&fresh);
    build(&fresh)?;
    let mut drifted = Vec::new();
    for f in BUNDLE {
        let committed = fs::read(root.join("controller/assets/ui").join(f)).unwrap_or_default();
        let built = fs::read(fresh.join(f)).with_context(|| format!("the build wrote no {f}"))?;
        if committed != built {
            drifted.push(*f);
        }
    }
    if !drifted.is_empty() {
        bail!(
            "controller/assets/ui/{{{}}} differ from a fresh build of ui/: run `cargo xtask ui` and commit controller/assets/ui/",
            drifted.join(",")
        );
    }
    println!("    controller/assets/ui/ is up to date");
    Ok(())
}
