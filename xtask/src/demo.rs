//! The README's main job, until `bulkhead lab` lands: a small shop on one node, built from
//! network namespaces, first open, then under least-privilege NetworkPolicies compiled by
//! `bulkhead policy compile` and enforced by a real `bulkhead agent` in the kernel.
//!
//! Everything lives in namespaces this demo creates (`bhdemo-*`); the host's own network is not
//! touched. Pods are /32 addresses behind veths of a `bhdemo-node` namespace that routes
//! between them: each pod's default route points at 169.254.1.1, an address that every
//! node-side veth carries (Calico wires pods much the same way).

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{project_root, run as run_cmd};

struct Pod {
    namespace: &'static str,
    name: &'static str,
    ip: &'static str,
    port: u16,
}

const PODS: [Pod; 4] = [
    Pod {
        namespace: "shop",
        name: "frontend",
        ip: "10.203.0.10",
        port: 80,
    },
    Pod {
        namespace: "shop",
        name: "backend",
        ip: "10.203.0.20",
        port: 8080,
    },
    Pod {
        namespace: "shop",
        name: "db",
        ip: "10.203.0.30",
        port: 5432,
    },
    Pod {
        namespace: "tools",
        name: "debug",
        ip: "10.203.0.40",
        port: 80,
    },
];

const NODE_NS: &str = "bhdemo-node";
const NODE: &str = "demo-node";

fn pod_ns(p: &Pod) -> String {
    format!("bhdemo-{}", p.name)
}

fn host_veth(p: &Pod) -> String {
    format!("bhd-{}", p.name)
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("run ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn in_ns(ns: &str, argv: &[&str]) -> anyhow::Result<()> {
    let mut args = vec!["netns", "exec", ns];
    args.extend_from_slice(argv);
    ip(&args)
}

fn say(text: &str) {
    println!("\n\x1b[1m{text}\x1b[0m");
}

fn teardown() {
    for p in &PODS {
        let _ = Command::new("ip")
            .args(["netns", "del", &pod_ns(p)])
            .output();
    }
    let _ = Command::new("ip").args(["netns", "del", NODE_NS]).output();
}

fn build_topology() -> anyhow::Result<()> {
    ip(&["netns", "add", NODE_NS])?;
    in_ns(NODE_NS, &["ip", "link", "set", "lo", "up"])?;
    in_ns(NODE_NS, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    for p in &PODS {
        let ns = pod_ns(p);
        let veth = host_veth(p);
        ip(&["netns", "add", &ns])?;
        ip(&[
            "link", "add", &veth, "netns", NODE_NS, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ])?;
        in_ns(&ns, &["ip", "link", "set", "lo", "up"])?;
        in_ns(
            &ns,
            &["ip", "addr", "add", &format!("{}/32", p.ip), "dev", "eth0"],
        )?;
        in_ns(&ns, &["ip", "link", "set", "eth0", "up"])?;
        in_ns(
            &ns,
            &[
                "ip",
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ],
        )?;
        in_ns(
            &ns,
            &[
                "ip",
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ],
        )?;
        in_ns(NODE_NS, &["ip", "link", "set", &veth, "up"])?;
        // The pods' gateway address lives on every node-side veth, so each pod resolves it.
        in_ns(
            NODE_NS,
            &["ip", "addr", "add", "169.254.1.1/32", "dev", &veth],
        )?;
        in_ns(
            NODE_NS,
            &["ip", "route", "add", &format!("{}/32", p.ip), "dev", &veth],
        )?;
    }
    Ok(())
}

fn enter(ns: &str) -> anyhow::Result<()> {
    let f = fs::File::open(format!("/var/run/netns/{ns}"))
        .with_context(|| format!("open netns {ns}"))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("enter netns {ns}"))
}

/// A TCP server in each pod that answers with its pod's name.
fn start_servers() -> anyhow::Result<()> {
    for p in &PODS {
        let ns = pod_ns(p);
        let port = p.port;
        let name = p.name;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let listener = enter(&ns).and_then(|()| {
                TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("bind {port} in {ns}"))
            });
            let listener = match listener {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            for mut conn in listener.incoming().flatten() {
                let _ = conn.write_all(name.as_bytes());
            }
        });
        rx.recv().context("server thread")??;
    }
    Ok(())
}

fn probe(from: &Pod, to: &Pod) -> bool {
    let ns = pod_ns(from);
    let addr: SocketAddr = format!("{}:{}", to.ip, to.port)
        .parse()
        .expect("valid address");
    thread::spawn(move || -> bool {
        if enter(&ns).is_err() {
            return false;
        }
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(400)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(400)));
        let mut buf = String::new();
        s.read_to_string(&mut buf).is_ok() && !buf.is_empty()
    })
    .join()
    .unwrap_or(false)
}

fn print_matrix() {
    print!("{:>16} │", "from \\ to");
    for to in &PODS {
        print!(
            " {:>16}",
            format!("{}/{}:{}", to.namespace, to.name, to.port)
        );
    }
    println!();
    for from in &PODS {
        print!("{:>16} │", format!("{}/{}", from.namespace, from.name));
        let cells: Vec<bool> = PODS
            .iter()
            .map(|to| from.name != to.name && probe(from, to))
            .collect();
        for (to, ok) in PODS.iter().zip(cells) {
            let cell = if from.name == to.name {
                "·"
            } else if ok {
                "\x1b[32mconnected\x1b[0m"
            } else {
                "\x1b[31mblocked\x1b[0m"
            };
            let pad = if from.name == to.name { 16 } else { 16 + 9 };
            print!(" {cell:>pad$}");
        }
        println!();
    }
}

fn bulkhead_bin() -> PathBuf {
    project_root().join("target/release/bulkhead")
}

pub fn run(keep: bool) -> anyhow::Result<()> {
    let root = project_root();
    say("Building bulkhead (release)");
    run_cmd(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "bulkhead",
    ]))?;
    let bin = bulkhead_bin();

    teardown();
    let _ = Command::new(&bin)
        .args(["agent", "reset", "--node", NODE])
        .output();
    say(
        "1. A node and four pods, each in its own network namespace (shop/frontend, shop/backend, shop/db, tools/debug)",
    );
    build_topology()?;
    start_servers()?;
    println!("Every pod serves its declared port. Without policy, everything reaches everything:");
    print_matrix();

    let result = enforce_and_show(&root, &bin);
    if keep && result.is_ok() {
        say(
            "--keep: the namespaces, pins and the agent stay up (the demo's pod servers end with it).",
        );
        println!(
            "  explore:  ip netns exec bhdemo-debug bash    |    ip netns exec {NODE_NS} bpftool net"
        );
        println!(
            "  clean up: pkill -f 'bulkhead agent run --node {NODE}'; {} agent reset --node {NODE}; for n in $(ip netns list | grep -o '^bhdemo-[a-z]*'); do ip netns del $n; done",
            bin.display()
        );
        return Ok(());
    }
    let outcome = result.map(|mut agent| {
        let _ = agent.kill();
        let _ = agent.wait();
    });
    say("Cleaning up: agent stopped, pins removed, namespaces deleted.");
    let _ = Command::new(&bin)
        .args(["agent", "reset", "--node", NODE])
        .output();
    teardown();
    outcome
}

fn enforce_and_show(root: &std::path::Path, bin: &std::path::Path) -> anyhow::Result<Child> {
    let examples = root.join("examples/demo");
    let state = root.join("target/demo");
    fs::create_dir_all(&state)?;
    say(
        "2. Least privilege: examples/demo/policies.yaml (default deny in shop, then only frontend→backend:8080, backend→db:5432, the frontend's port 80 for all)",
    );
    let compiled = Command::new(bin)
        .args(["policy", "compile", "-f"])
        .arg(&examples)
        .args(["-o", "json"])
        .output()
        .context("run bulkhead policy compile")?;
    if !compiled.status.success() {
        bail!(
            "policy compile failed: {}",
            String::from_utf8_lossy(&compiled.stderr)
        );
    }
    let ruleset_path = state.join("ruleset.json");
    fs::write(&ruleset_path, &compiled.stdout)?;
    println!("compiled rule sets → {}", ruleset_path.display());

    say(
        "3. The node agent loads the eBPF programs, attaches them to each pod's veth and writes the maps",
    );
    let mut agent = Command::new(bin)
        .args([
            "agent",
            "run",
            "--node",
            NODE,
            "--netns",
            NODE_NS,
            "--ruleset",
        ])
        .arg(&ruleset_path)
        .stderr(Stdio::piped())
        .spawn()
        .context("start the agent")?;
    let stderr = agent.stderr.take().context("agent stderr")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            println!("  agent │ {line}");
            if line.contains("rule set realized") {
                let _ = tx.send(());
            }
        }
    });
    let started = Instant::now();
    if rx.recv_timeout(Duration::from_secs(20)).is_err() {
        let _ = agent.kill();
        bail!("the agent did not realize the rule set within 20 s");
    }
    println!(
        "realized in {:.0} ms after start",
        started.elapsed().as_secs_f64() * 1e3
    );

    say("4. The same probes, now enforced in the kernel:");
    print_matrix();

    say("5. Why? `bulkhead policy explain` names the rules:");
    for (from, to, port) in [
        ("tools/debug", "shop/backend", "8080"),
        ("shop/backend", "shop/db", "5432"),
        ("shop/frontend", "shop/db", "5432"),
    ] {
        let out = Command::new(bin)
            .args(["policy", "explain", "-f"])
            .arg(&examples)
            .args([
                "--from",
                from,
                "--to",
                to,
                "--port",
                port,
                "--protocol",
                "TCP",
            ])
            .output()
            .context("run bulkhead policy explain")?;
        println!("$ bulkhead policy explain --from {from} --to {to} --port {port}");
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(agent)
}
