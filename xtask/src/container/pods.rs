//! The test's environment (names, pod network namespaces, servers), removed on drop.

use std::{
    env, fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
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

use super::{ALLOWED_PORT, DENIED_PORT, FAIL_AT_ENV, mapping::podman};
use crate::output;

/// Names and addresses of one run, derived from the process id.
pub(super) struct Names {
    pub(super) id: u32,
    pub(super) node: String,
    /// (netns, host interface, address) of the client pod, the server pod and the controller.
    pub(super) client: (String, String, Ipv4Addr),
    pub(super) server: (String, String, Ipv4Addr),
    pub(super) controller: (String, String, Ipv4Addr),
    pub(super) agent_container: String,
    pub(super) controller_container: String,
    pub(super) dir: PathBuf,
}

impl Names {
    pub(super) fn new() -> Self {
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

    pub(super) fn pods(&self) -> [&(String, String, Ipv4Addr); 3] {
        [&self.client, &self.server, &self.controller]
    }

    /// Where the agent pins its maps and links for this run's node.
    pub(super) fn pins(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf/bulkhead").join(&self.node)
    }

    pub(super) fn storage(&self) -> PathBuf {
        self.dir.join("podman")
    }

    /// Everything that is left of this run, if anything.
    pub(super) fn leftovers(&self) -> Vec<String> {
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

/// Removes containers, the image storage, pins, pod namespaces and veths, temp files.
pub(super) struct Cleanup<'a> {
    pub(super) names: &'a Names,
    pub(super) stop_servers: Arc<AtomicBool>,
    pub(super) servers: Option<thread::JoinHandle<()>>,
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

pub(super) fn ip(args: &[&str]) -> anyhow::Result<String> {
    output(Command::new("ip").args(args))
}

/// A pod: a network namespace with `eth0`, the host end of its veth in the root namespace,
/// wired as a routed CNI does (Calico): `/32` address, default route via a link-local gateway
/// the host end answers by proxy ARP, a host route to the pod over its veth. Forwarding is on for
/// the host end only.
pub(super) fn make_pod(ns: &str, host_if: &str, addr: Ipv4Addr) -> anyhow::Result<()> {
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
pub(super) fn in_netns<T: Send + 'static>(
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

pub(super) fn join<T>(h: thread::JoinHandle<anyhow::Result<T>>) -> anyhow::Result<T> {
    h.join()
        .map_err(|_| anyhow!("a thread in a pod namespace panicked"))?
}

/// The server pod: answers `ok` on both ports until `stop`.
pub(super) fn start_servers(
    ns: &str,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<thread::JoinHandle<()>> {
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
pub(super) fn connects(names: &Names, port: u16) -> anyhow::Result<bool> {
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
pub(super) fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
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

pub(super) fn http_get_in(
    ns: &str,
    addr: SocketAddr,
    path: &str,
) -> anyhow::Result<Option<(u16, String)>> {
    let path = path.to_string();
    join(in_netns(ns, move || http_get(addr, &path))?)
}

pub(super) fn wait_for(
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

pub(super) fn checkpoint(name: &str) -> anyhow::Result<()> {
    if env::var(FAIL_AT_ENV).is_ok_and(|v| v == name) {
        bail!("failure injected at `{name}` ({FAIL_AT_ENV})");
    }
    Ok(())
}

/// A free TCP port on the host (for the agent's host-network ports).
pub(super) fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}
