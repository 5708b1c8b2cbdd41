//! Shared by the end-to-end tests of the `bulkhead` binary.
#![allow(dead_code)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    time::Duration,
};

/// The `bulkhead` binary under test: this build's, or the one `BULKHEAD_TEST_BIN` names (to run
/// a scenario against another release, e.g. to show a fix by the same test failing before it).
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("BULKHEAD_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_bulkhead").into())
    })
}

/// The body of a plain HTTP/1.0 GET to 127.0.0.1:`port`, `None` when nobody answers.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    response.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// Takes the lab in this state directory down when dropped, also when the test fails.
pub struct LabDown(pub PathBuf);

impl Drop for LabDown {
    fn drop(&mut self) {
        let _ = Command::new(bin())
            .args(["lab", "--state"])
            .arg(&self.0)
            .arg("down")
            .output();
    }
}

/// Runs `bulkhead ARGS`, which must succeed; its standard output.
pub fn run_ok(args: &[&str]) -> String {
    let out = Command::new(bin())
        .args(args)
        .output()
        .expect("run bulkhead");
    assert!(
        out.status.success(),
        "bulkhead {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A lab pod: its network namespace and first address.
#[derive(Clone)]
pub struct Pod {
    pub netns: String,
    pub ip: std::net::IpAddr,
}

/// The pods of the lab in this state directory, by `namespace/name`.
pub fn pods(state: &std::path::Path) -> std::collections::BTreeMap<String, Pod> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("lab.json")).expect("lab.json"))
            .expect("json");
    v["pods"]
        .as_object()
        .expect("pods")
        .iter()
        .map(|(k, p)| {
            (
                k.clone(),
                Pod {
                    netns: p["netns"].as_str().expect("netns").to_string(),
                    ip: p["ips"][0].as_str().expect("ip").parse().expect("ip"),
                },
            )
        })
        .collect()
}

/// Whether a TCP connection from `from` to `to:port` opens and the lab server's banner arrives
/// (a real connection, from inside the pod's network namespace).
pub fn connects(from: &Pod, to: &Pod, port: u16) -> bool {
    use std::io::Read;
    let addr = std::net::SocketAddr::new(to.ip, port);
    in_pod(from, move || {
        let timeout = std::time::Duration::from_millis(700);
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, timeout) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(timeout));
        let mut banner = [0u8; 64];
        s.read(&mut banner).is_ok_and(|n| n > 0)
    })
}

/// Runs `f` on a thread inside the pod's network namespace.
pub fn in_pod<T: Send + 'static>(pod: &Pod, f: impl FnOnce() -> T + Send + 'static) -> T {
    bulkhead_agent::netns::Netns::existing(&pod.netns)
        .run(f)
        .expect("enter pod namespace")
}

/// A lab brought up for one test in a temporary directory of its own: taken down and the
/// directory removed when dropped, also when the test fails.
pub struct TestLab {
    pub dir: PathBuf,
    pub state: PathBuf,
}

impl TestLab {
    /// `bulkhead lab up` with the objects in `manifests`, its ports from `port_base`.
    pub fn up(test: &str, manifests: &str, port_base: u16) -> TestLab {
        let dir = std::env::temp_dir().join(format!("bh-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp");
        let state = dir.join("state");
        // Whatever happens from here on, the lab goes down with `TestLab`.
        let lab = TestLab { dir, state };
        let file = lab.dir.join("pods.yaml");
        std::fs::write(&file, manifests).expect("write");
        run_ok(&[
            "lab",
            "--state",
            &lab.arg(),
            "up",
            "--port-base",
            &port_base.to_string(),
            "-f",
            &file.to_string_lossy(),
        ]);
        lab
    }

    /// The state directory as the CLI's `--state`/`--lab` argument.
    pub fn arg(&self) -> String {
        self.state.to_string_lossy().to_string()
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let _ = Command::new(bin())
            .args(["lab", "--state"])
            .arg(&self.state)
            .arg("down")
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The repository (the `cli` crate's parent).
pub fn repo() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the cli crate lives in the repository")
        .to_path_buf()
}

/// Debian's Chromium, which the browser tests drive.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// What the browser tests need besides the binary: Chromium, Node.js and `npm ci` in `ui/`
/// (all installed by `cargo xtask setup`); `Some(why)` when one is missing.
pub fn missing_browser_tools() -> Option<String> {
    if !std::path::Path::new(CHROMIUM).exists() {
        return Some(format!(
            "{CHROMIUM} is missing (Debian package chromium; `cargo xtask setup`)"
        ));
    }
    if Command::new("node").arg("--version").output().is_err() {
        return Some("node is missing (Node.js ≥ 20)".into());
    }
    if !repo().join("ui/node_modules/playwright-core").exists() {
        return Some(
            "ui/node_modules/playwright-core is missing (`npm ci` in ui/, or `cargo xtask setup`)"
                .into(),
        );
    }
    None
}

/// A free loopback TCP port (free when asked: bind it soon).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A directory removed when dropped, also when the test fails.
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `f` every 100 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for: {what}");
}
