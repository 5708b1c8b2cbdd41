//! Network namespaces and veth pairs, for the lab and the tests.
//!
//! Namespaces are named ones (`ip netns add`), so that `ip netns exec` and other processes can
//! find them. Work inside a namespace runs on a dedicated thread that `setns`es into it: a
//! thread's network namespace is its own, so the rest of the process is unaffected.

use std::{fs::File, path::PathBuf, process::Command, thread};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `ip` (install iproute2): {0}")]
    Spawn(std::io::Error),
    #[error("cannot enter network namespace {name}: {reason}")]
    Enter { name: String, reason: String },
}

/// Runs `ip ARGS…` and returns its stdout.
pub fn ip(args: &[&str]) -> Result<String, NetnsError> {
    run("ip", args)
}

/// Runs a command and fails with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> Result<String, NetnsError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(NetnsError::Spawn)?;
    if !out.status.success() {
        return Err(NetnsError::Command {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/var/run/netns").join(name)
}

/// A named network namespace, deleted on drop (with every interface inside it).
#[derive(Debug)]
pub struct Netns {
    name: String,
    keep: bool,
}

impl Netns {
    /// Creates the namespace (replacing a stale one of the same name) and brings up its `lo`.
    pub fn create(name: &str) -> Result<Netns, NetnsError> {
        if netns_path(name).exists() {
            let _ = ip(&["netns", "del", name]);
        }
        ip(&["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
            keep: false,
        };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Refers to an existing namespace without owning it.
    pub fn existing(name: &str) -> Netns {
        Netns {
            name: name.to_string(),
            keep: true,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Leaves the namespace in place when this handle is dropped.
    pub fn keep(mut self) -> Self {
        self.keep = true;
        self
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, argv: &[&str]) -> Result<String, NetnsError> {
        let mut args = vec!["netns", "exec", self.name.as_str()];
        args.extend_from_slice(argv);
        ip(&args)
    }

    /// Runs `f` on a thread that lives in this namespace and returns its result.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetnsError> {
        let path = netns_path(&self.name);
        let name = self.name.clone();
        let handle = thread::spawn(move || -> Result<T, NetnsError> {
            enter(&path, &name)?;
            Ok(f())
        });
        handle.join().map_err(|_| NetnsError::Enter {
            name: self.name.clone(),
            reason: "the thread inside the namespace panicked".into(),
        })?
    }

    /// Starts `f` on a thread in this namespace and returns at once.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<Result<T, NetnsError>> {
        let path = netns_path(&self.name);
        let name = self.name.clone();
        thread::spawn(move || -> Result<T, NetnsError> {
            enter(&path, &name)?;
            Ok(f())
        })
    }
}

/// Moves the calling thread into the namespace at `path`.
pub fn enter(path: &std::path::Path, name: &str) -> Result<(), NetnsError> {
    let file = File::open(path).map_err(|e| NetnsError::Enter {
        name: name.to_string(),
        reason: e.to_string(),
    })?;
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| NetnsError::Enter {
        name: name.to_string(),
        reason: e.to_string(),
    })
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.keep {
            let _ = ip(&["netns", "del", &self.name]);
        }
    }
}

/// Creates a veth pair `a` (in namespace `ns_a`, or the caller's when `None`) ↔ `b` (in `ns_b`).
pub fn veth_pair(
    a: &str,
    ns_a: Option<&Netns>,
    b: &str,
    ns_b: Option<&Netns>,
) -> Result<(), NetnsError> {
    let mut args = vec!["link", "add", a];
    if let Some(ns) = ns_a {
        args.extend(["netns", ns.name()]);
    }
    args.extend(["type", "veth", "peer", "name", b]);
    if let Some(ns) = ns_b {
        args.extend(["netns", ns.name()]);
    }
    ip(&args)?;
    Ok(())
}

/// The gateway address every pod routes through; it sits on each node-side veth.
pub const POD_GATEWAY_V4: &str = "169.254.1.1";

/// Wires a pod namespace to a node namespace the way a CNI does: a veth whose node side is
/// `host_if`, the pod's address as a /32 on its `eth0`, a default route via
/// [`POD_GATEWAY_V4`] (an address every node-side veth carries), and a /32 route on the node.
/// The node namespace must forward (`net.ipv4.ip_forward=1`).
pub fn wire_pod(
    node: &Netns,
    pod: &Netns,
    host_if: &str,
    ip: std::net::Ipv4Addr,
) -> Result<(), NetnsError> {
    veth_pair(host_if, Some(node), "eth0", Some(pod))?;
    let cidr = format!("{ip}/32");
    pod.exec(&["ip", "addr", "add", &cidr, "dev", "eth0"])?;
    pod.exec(&["ip", "link", "set", "eth0", "up"])?;
    pod.exec(&[
        "ip",
        "route",
        "add",
        POD_GATEWAY_V4,
        "dev",
        "eth0",
        "scope",
        "link",
    ])?;
    pod.exec(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        POD_GATEWAY_V4,
        "dev",
        "eth0",
    ])?;
    node.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{POD_GATEWAY_V4}/32"),
        "dev",
        host_if,
    ])?;
    node.exec(&["ip", "link", "set", host_if, "up"])?;
    node.exec(&["ip", "route", "add", &cidr, "dev", host_if])?;
    Ok(())
}

/// Turns on IPv4 forwarding inside a namespace (not the host).
pub fn enable_forwarding(ns: &Netns) -> Result<(), NetnsError> {
    ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    Ok(())
}
