//! The web UI with authentication (issue 21, finding 4), no root and no lab: a real
//! `bulkhead controller` over a copy of the demo shop's manifests, its HTTP API behind
//! `--http-auth tokens` with one viewer and one admin token.
//!
//! From Rust, without a browser: the page and its assets need no token; `/api/map` without one,
//! or with an unknown one, is 401 with `WWW-Authenticate: Bearer realm="bulkhead"` and a JSON
//! error; the viewer reads the map (which names them as `user`) but a quarantine or release is
//! 403 with a JSON error; a controller without auth still serves the map to anyone, without
//! `user`.
//!
//! In headless Chromium (`ui/e2e/auth.mjs`, playwright-core driving Debian's chromium): the page
//! shows the sign-in form and no map; a wrong token shows the server's error; the viewer's token
//! shows the demo's workloads and "signed in as"; the viewer's quarantine shows the 403's error;
//! signing out brings the form back with sessionStorage empty; the admin's token quarantines
//! `tools/debug` from the page and releases it. Against the controller without auth the page
//! works as before: no form, no Authorization header.

mod common;

use common::*;

use std::{
    hash::{BuildHasher, Hasher},
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const VIEWER: &str = "vera-viewer";
const ADMIN: &str = "ada-admin";
const POD: &str = "tools/debug";

/// A random token (32 hex digits) from the standard library's randomly keyed hasher.
fn random_token() -> String {
    let part = || {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        h.finish()
    };
    format!("{:016x}{:016x}", part(), part())
}

/// `n` loopback ports nobody listens on (all bound at once, so they differ).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the manifests copy");
    for entry in std::fs::read_dir(from).expect("read examples/demo") {
        let entry = entry.expect("directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a manifest");
        }
    }
}

/// An HTTP answer: status, headers (names in lower case), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): HTTP {} {}", self.status, self.body))
    }
}

/// One HTTP/1.1 request to 127.0.0.1:`port` (`Connection: close`).
fn request(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    )
    .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("send the request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the answer");
    let raw = String::from_utf8_lossy(&raw).to_string();
    let (head, rest) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {path}: no HTTP answer: {raw:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no status line: {head:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Answer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n =
            usize::from_str_radix(size.split(';').next().unwrap_or("0").trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The controllers this test started and their temporary directory: the processes are killed
/// and the directory removed when dropped, also when the test fails.
struct Scene {
    dir: PathBuf,
    controllers: Vec<(Child, PathBuf)>,
}

impl Scene {
    fn new() -> Scene {
        let dir = std::env::temp_dir().join(format!("bh-ui-auth-e2e-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temporary directory");
        Scene {
            dir,
            controllers: Vec::new(),
        }
    }

    /// Starts `bulkhead controller` over a fresh copy of examples/demo, with `extra` arguments;
    /// returns its index once `/healthz` answers on its HTTP port.
    fn controller(&mut self, name: &str, http: u16, ports: [u16; 2], extra: &[&str]) -> usize {
        let manifests = self.dir.join(name);
        copy_dir(&repo().join("examples/demo"), &manifests);
        let log = self.dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("controller log");
        let child = Command::new(bin())
            .arg("controller")
            .arg("-f")
            .arg(&manifests)
            .args(["--insecure", "--listen"])
            .arg(format!("127.0.0.1:{}", ports[0]))
            .arg("--http")
            .arg(format!("127.0.0.1:{http}"))
            .arg("--metrics")
            .arg(format!("127.0.0.1:{}", ports[1]))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("start bulkhead controller");
        self.controllers.push((child, log));
        let i = self.controllers.len() - 1;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if http_get(http, "/healthz").is_some_and(|b| b.trim() == "ok") {
                return i;
            }
            if let Ok(Some(status)) = self.controllers[i].0.try_wait() {
                panic!(
                    "bulkhead controller ({name}) exited ({status}):\n{}",
                    self.log(i)
                );
            }
            assert!(
                Instant::now() < deadline,
                "no /healthz on the HTTP port {http} within 15 s (the metrics port {} says {:?}):\n{}",
                ports[1],
                http_get(ports[1], "/healthz"),
                self.log(i)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.controllers[i].1).unwrap_or_default()
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        for (child, _) in &mut self.controllers {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[test]
fn the_web_ui_signs_in_with_a_token_and_a_viewer_may_not_quarantine() {
    const NAME: &str = "the_web_ui_signs_in_with_a_token_and_a_viewer_may_not_quarantine";
    let started = Instant::now();
    let mut scene = Scene::new();
    let (viewer, admin) = (random_token(), random_token());
    assert_ne!(viewer, admin);
    let tokens = scene.dir.join("http-tokens");
    std::fs::write(
        &tokens,
        format!(
            "# ROLE NAME TOKEN, for the UI's end-to-end test\n\nviewer {VIEWER} {viewer}\n   \n# the admin\nadmin  {ADMIN}\t{admin}\n"
        ),
    )
    .expect("write the tokens file");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600))
            .expect("chmod the tokens file");
    }
    let ports = free_ports(6);
    let (http, open_http) = (ports[0], ports[3]);
    let authed = scene.controller(
        "auth",
        http,
        [ports[1], ports[2]],
        &[
            "--http-auth",
            "tokens",
            "--http-tokens",
            &tokens.to_string_lossy(),
        ],
    );
    let open = scene.controller("open", open_http, [ports[4], ports[5]], &[]);
    let log = |i: usize| scene.log(i);

    // The page holds no data: no token needed for it.
    let page = request(http, "GET", "/", &[], "");
    assert_eq!(page.status, 200, "GET / without a token: {}", page.body);
    assert!(
        page.header("content-type")
            .is_some_and(|t| t.starts_with("text/html")),
        "{:?}",
        page.headers
    );
    assert!(
        page.body.contains("id=\"signin\""),
        "the binary's page has no sign-in form (rebuild controller/assets/ui with `cargo xtask ui`)"
    );
    for asset in ["/ui/app.js", "/ui/app.css"] {
        let a = request(http, "GET", asset, &[], "");
        assert_eq!(a.status, 200, "GET {asset} without a token");
    }
    // The metrics listener answers health checks on its own port.
    assert_eq!(
        http_get(ports[2], "/healthz").map(|b| b.trim().to_string()),
        Some("ok".into()),
        "/healthz on the --metrics port"
    );

    // Without a token, or with an unknown one: 401, WWW-Authenticate, a JSON error.
    for (what, headers) in [
        ("no token", vec![]),
        (
            "an unknown token",
            vec![("Authorization", bearer(&random_token()))],
        ),
        ("a malformed header", vec![("Authorization", admin.clone())]),
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        for path in ["/api/map", "/api/quarantines", "/api/flows/query?limit=1"] {
            let a = request(http, "GET", path, &headers, "");
            assert_eq!(a.status, 401, "GET {path} with {what}: {}", a.body);
            assert_eq!(
                a.header("www-authenticate"),
                Some("Bearer realm=\"bulkhead\""),
                "GET {path} with {what}: {:?}",
                a.headers
            );
            assert!(
                a.json()["error"].as_str().is_some_and(|e| !e.is_empty()),
                "GET {path} with {what}: {}",
                a.body
            );
        }
    }

    // The viewer reads, and is named in the map.
    let vh = bearer(&viewer);
    let a = request(http, "GET", "/api/map", &[("Authorization", &vh)], "");
    assert_eq!(a.status, 200, "the viewer's GET /api/map: {}", a.body);
    let map = a.json();
    assert_eq!(map["user"], VIEWER, "/api/map names the viewer: {map}");
    assert!(
        map["nodes"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n["pods"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["pod"] == POD)))),
        "the demo's {POD} is on the viewer's map: {map}"
    );
    // … but may not write: 403 with a JSON error, whatever the request is otherwise.
    for (path, body) in [
        (
            "/api/quarantine",
            format!(r#"{{"pod": "{POD}", "reason": "a viewer tries"}}"#),
        ),
        ("/api/quarantine/release", format!(r#"{{"pod": "{POD}"}}"#)),
    ] {
        let a = request(
            http,
            "POST",
            path,
            &[
                ("Authorization", &vh),
                ("Content-Type", "application/json"),
                ("X-Bulkhead-Action", "1"),
            ],
            &body,
        );
        assert_eq!(a.status, 403, "the viewer's POST {path}: {}", a.body);
        assert!(
            a.json()["error"].as_str().is_some_and(|e| !e.is_empty()),
            "POST {path}: {}",
            a.body
        );
    }
    let a = request(
        http,
        "GET",
        "/api/map",
        &[("Authorization", &bearer(&admin))],
        "",
    );
    assert_eq!(a.status, 200, "the admin's GET /api/map: {}", a.body);
    assert_eq!(a.json()["user"], ADMIN, "/api/map names the admin");

    // The CLI reads through the same authentication: --token-file (or BULKHEAD_TOKEN_FILE).
    let token_file = scene.dir.join("viewer-token");
    std::fs::write(&token_file, format!("{viewer}\n")).expect("write the token file");
    let proposal = scene.dir.join("proposal.yaml");
    std::fs::write(
        &proposal,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: closed, namespace: shop}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n",
    )
    .expect("write the proposal");
    let addr = format!("127.0.0.1:{http}");
    let proposal = proposal.to_string_lossy().to_string();
    let commands: [&[&str]; 4] = [
        &["flows", "--http", &addr, "-o", "json"],
        &["graph", "--http", &addr, "-o", "json"],
        &["policy", "recommend", "--http", &addr],
        &["policy", "impact", "-f", &proposal, "--http", &addr],
    ];
    for args in commands {
        let cli = |token: Option<&Path>, env: bool| {
            let mut c = Command::new(bin());
            c.args(args).env_remove("BULKHEAD_TOKEN_FILE");
            match (token, env) {
                (Some(t), false) => {
                    c.arg("--token-file").arg(t);
                }
                (Some(t), true) => {
                    c.env("BULKHEAD_TOKEN_FILE", t);
                }
                (None, _) => {}
            }
            c.output().expect("run bulkhead")
        };
        let out = cli(None, false);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} without a token: {err}");
        assert!(
            err.contains("the controller says") || err.contains("(401)"),
            "{args:?} without a token says why: {err}"
        );
        for env in [false, true] {
            let out = cli(Some(&token_file), env);
            assert!(
                out.status.success(),
                "{args:?} with the viewer's token (env: {env}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    // Without --http-auth: the map for anyone, naming no user.
    let a = request(open_http, "GET", "/api/map", &[], "");
    assert_eq!(a.status, 200, "GET /api/map without auth: {}", a.body);
    assert!(
        a.json().get("user").is_none(),
        "/api/map without auth names a user: {}",
        a.body
    );
    println!(
        "HTTP checks passed ({:.1} s)",
        started.elapsed().as_secs_f64()
    );

    if let Some(why) = missing_browser_tools() {
        if std::env::var("BULKHEAD_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
            panic!("{NAME}: cannot run ({why}) and BULKHEAD_REQUIRE_PRIVILEGED=1");
        }
        eprintln!("skipping the browser half of {NAME}: {why}");
        return;
    }
    let url = format!("http://127.0.0.1:{http}/");
    let open_url = format!("http://127.0.0.1:{open_http}/");
    let viewer_arg = format!("{VIEWER}:{viewer}");
    let admin_arg = format!("{ADMIN}:{admin}");
    let mut args = vec![
        "ui/e2e/auth.mjs",
        "--url",
        &url,
        "--viewer",
        &viewer_arg,
        "--admin",
        &admin_arg,
        "--pod",
        POD,
        "--expect",
        "shop/Pod/frontend,shop/Pod/backend,shop/Pod/db,tools/Pod/debug",
        "--open-url",
        &open_url,
    ];
    let screenshot = std::env::var("BULKHEAD_UI_AUTH_SCREENSHOT").ok();
    if let Some(s) = &screenshot {
        args.extend(["--screenshot", s.as_str()]);
    }
    let out = Command::new("node")
        .current_dir(repo())
        .args(&args)
        .output()
        .expect("run node ui/e2e/auth.mjs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("auth: all checks passed"),
        "the browser checks failed:\n{stdout}\n{stderr}\n--- controller with auth:\n{}\n--- controller without auth:\n{}",
        log(authed),
        log(open)
    );

    // The page's quarantine was real and is released: the quarantine directory under the copied
    // manifests holds no Quarantine any more, and its audit log has both.
    let qdir = scene.dir.join("auth/quarantines");
    let audit = std::fs::read_to_string(qdir.join("audit.log")).unwrap_or_default();
    println!("audit.log:\n{audit}");
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    for action in ["quarantine", "release"] {
        assert!(
            lines
                .iter()
                .any(|l| l["action"] == action && l["namespace"] == "tools" && l["pod"] == "debug"),
            "no {action} of {POD} in {}/audit.log: {audit}",
            qdir.display()
        );
    }
    assert!(
        !lines.iter().any(|l| l["reason"]
            .as_str()
            .is_some_and(|r| r.contains("viewer tries"))),
        "a viewer's request reached the audit log: {audit}"
    );
    let a = request(
        http,
        "GET",
        "/api/quarantines",
        &[("Authorization", &bearer(&admin))],
        "",
    );
    assert_eq!(a.json(), serde_json::json!([]), "released: {}", a.body);
    println!("done in {:.1} s", started.elapsed().as_secs_f64());
}
