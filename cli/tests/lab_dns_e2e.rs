//! Tier 3: the lab's cluster DNS and external hosts, with real DNS. Pods resolve an
//! `ExternalHost`'s name and its alias chain with the libc resolver (`lab exec … python3`) and
//! connect to it outside the pod network, with their own address (no SNAT); the cluster DNS
//! answers with the declared TTL and the CNAME chain over UDP and TCP; a default-deny egress
//! policy stops resolution and one that allows `kube-system`/`k8s-app: kube-dns` on port 53
//! brings it back; `lab probe --to NAME` resolves from each pod; `lab heal` restarts a dead
//! cluster DNS; `lab delete` takes a host and a pod's `resolv.conf` away; `lab down` leaves no
//! namespace, `/etc/netns` entry or process behind.

mod common;

use common::*;

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    process::{Command, Output},
    time::Duration,
};

use bulkhead_agent::privileged::check_privileged_test;
use hickory_proto::{
    op::{Message, Query},
    rr::{Name, RData, RecordType},
};

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {nodeName: node-2, containers: [{name: c, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: near, namespace: shop, labels: {app: near}}
spec: {nodeName: node-1, containers: [{name: c, ports: [{containerPort: 80}]}]}
---
apiVersion: lab.bulkhead.dev/v1alpha1
kind: ExternalHost
metadata: {name: example-api}
spec:
  addresses: [198.51.100.10]
  names: [api.example.com]
  aliases:
  - {name: www.example.com, target: api.example.com}
  - {name: cdn.example.net, target: www.example.com}
  ports: [{port: 443, protocol: TCP}]
  ttl: 42
"#;

const DENY_EGRESS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-egress, namespace: shop}
spec: {podSelector: {}, policyTypes: [Egress]}
"#;

const ALLOW_DNS_AND_API: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-dns-and-api, namespace: shop}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}
      podSelector: {matchLabels: {k8s-app: kube-dns}}
    ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]
  - to: [{ipBlock: {cidr: 198.51.100.0/24}}]
    ports: [{port: 443, protocol: TCP}]
"#;

const CLUSTER_DNS: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 240, 1, 10));

/// `bulkhead lab exec POD -- python3 -c CODE` with a short resolver timeout (so a denied
/// resolution fails in seconds, not glibc's default 5 s per try).
fn python_in_pod(lab: &TestLab, pod: &str, code: &str) -> Output {
    Command::new(bin())
        .args([
            "lab",
            "--state",
            &lab.arg(),
            "exec",
            pod,
            "--",
            "python3",
            "-c",
            code,
        ])
        .env("RES_OPTIONS", "timeout:1 attempts:1")
        .output()
        .expect("run lab exec")
}

fn getaddrinfo(lab: &TestLab, pod: &str, name: &str) -> Result<String, String> {
    let out = python_in_pod(
        lab,
        pod,
        &format!(
            "import socket; print(' '.join(sorted({{a[4][0] for a in socket.getaddrinfo('{name}', 443, socket.AF_INET, socket.SOCK_STREAM)}})))"
        ),
    );
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn question(name: &str) -> Message {
    let mut msg = Message::query();
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(
        Name::from_ascii(name).expect("name"),
        RecordType::A,
    ));
    msg
}

/// One A query to the cluster DNS from inside `pod`, over UDP or TCP.
fn ask(pod: &Pod, name: &str, tcp: bool) -> Result<Message, String> {
    let msg = question(name);
    in_pod(pod, move || {
        let server = SocketAddr::new(CLUSTER_DNS, 53);
        let timeout = Duration::from_secs(1);
        let wire = msg.to_vec().map_err(|e| e.to_string())?;
        let answer = if tcp {
            let mut s = TcpStream::connect_timeout(&server, timeout).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(timeout))
                .map_err(|e| e.to_string())?;
            let mut framed = (wire.len() as u16).to_be_bytes().to_vec();
            framed.extend(&wire);
            s.write_all(&framed).map_err(|e| e.to_string())?;
            let mut len = [0u8; 2];
            s.read_exact(&mut len).map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
            s.read_exact(&mut buf).map_err(|e| e.to_string())?;
            buf
        } else {
            let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(timeout))
                .map_err(|e| e.to_string())?;
            s.send_to(&wire, server).map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 4096];
            let n = s.recv(&mut buf).map_err(|e| e.to_string())?;
            buf.truncate(n);
            buf
        };
        Message::from_vec(&answer).map_err(|e| e.to_string())
    })
}

/// The answer section as `(owner, TTL, data)`.
fn records(m: &Message) -> Vec<(String, u32, String)> {
    m.answers
        .iter()
        .map(|r| {
            let data = match &r.data {
                RData::A(a) => a.0.to_string(),
                RData::CNAME(c) => c.0.to_string(),
                other => format!("{other}"),
            };
            (r.name.to_string(), r.ttl, data)
        })
        .collect()
}

fn lab_processes(state: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(state) {
                found.push(cmdline);
            }
        }
    }
    found
}

fn entries_with_prefix(dir: &str, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

#[test]
fn pods_resolve_external_hosts_through_the_cluster_dns_as_policies_allow() {
    if !check_privileged_test(
        "pods_resolve_external_hosts_through_the_cluster_dns_as_policies_allow",
    ) {
        return;
    }
    let lab = TestLab::up("lab-dns-e2e", MANIFESTS, 19480);
    let state = lab.arg();
    let pods = pods(&lab.state);
    let client = pods["shop/client"].clone();
    let dns_pod = pods["kube-system/kube-dns"].clone();
    assert_eq!(
        dns_pod.ip, CLUSTER_DNS,
        "the cluster DNS at its documented address"
    );
    let prefix = client
        .netns
        .split_once('-')
        .map(|(p, _)| format!("{p}-"))
        .expect("lab netns names carry the lab's prefix");
    let status = run_ok(&["lab", "--state", &state, "status"]);
    assert!(status.contains("kube-system/kube-dns"), "{status}");
    assert!(status.contains("external/example-api"), "{status}");

    // The libc resolver in the pod: the name, the alias and the alias of the alias.
    for pod in ["shop/client", "shop/near"] {
        for name in ["api.example.com", "www.example.com", "cdn.example.net"] {
            assert_eq!(
                getaddrinfo(&lab, pod, name).as_deref(),
                Ok("198.51.100.10"),
                "{pod} resolves {name}"
            );
        }
    }
    assert!(
        getaddrinfo(&lab, "shop/client", "nothere.example.com").is_err(),
        "an undeclared name does not resolve"
    );
    // The issue's one-liner, and the server answers with the host's name.
    let out = python_in_pod(
        &lab,
        "shop/client",
        "import socket; s = socket.create_connection(('api.example.com', 443), timeout=3); print(s.recv(64).decode().strip())",
    );
    assert!(
        out.status.success(),
        "connect to api.example.com:443: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "external/example-api"
    );

    // The external host sees the pod's own address: no SNAT on the way.
    let external_ns = format!("{prefix}external");
    let held = in_pod(&client, || {
        let mut s = TcpStream::connect_timeout(
            &"198.51.100.10:443".parse().expect("addr"),
            Duration::from_secs(2),
        )
        .expect("connect to the external host");
        let mut banner = [0u8; 64];
        let _ = s.read(&mut banner);
        s
    });
    let ss = Command::new("ip")
        .args([
            "netns",
            "exec",
            &external_ns,
            "ss",
            "-tnH",
            "state",
            "established",
        ])
        .output()
        .expect("ss");
    let ss = String::from_utf8_lossy(&ss.stdout).to_string();
    assert!(
        ss.contains(&format!("{}:", client.ip)),
        "the external host sees the pod's address {}: {ss}",
        client.ip
    );
    drop(held);

    // The cluster DNS itself: the declared TTL and the CNAME chain, over UDP and TCP.
    for tcp in [false, true] {
        let answer = ask(&client, "cdn.example.net.", tcp).expect("the cluster DNS answers");
        assert_eq!(
            records(&answer),
            [
                (
                    "cdn.example.net.".to_string(),
                    42,
                    "www.example.com.".to_string()
                ),
                (
                    "www.example.com.".to_string(),
                    42,
                    "api.example.com.".to_string()
                ),
                (
                    "api.example.com.".to_string(),
                    42,
                    "198.51.100.10".to_string()
                ),
            ],
            "tcp: {tcp}"
        );
    }

    // `lab probe --to NAME` resolves from each pod and connects.
    let probed: serde_json::Value = serde_json::from_str(&run_ok(&[
        "lab",
        "--state",
        &state,
        "probe",
        "--to",
        "cdn.example.net",
        "--port",
        "443",
        "-o",
        "json",
    ]))
    .expect("probe json");
    assert_eq!(
        probed,
        serde_json::json!({
            "shop/client": {"cdn.example.net": true},
            "shop/near": {"cdn.example.net": true},
        })
    );

    // Default deny egress: no resolution, nothing reaches the host.
    let dir = lab.dir.clone();
    let write = |name: &str, yaml: &str| {
        let f = dir.join(name);
        std::fs::write(&f, yaml).expect("write");
        f.to_string_lossy().to_string()
    };
    let deny = write("deny.yaml", DENY_EGRESS);
    run_ok(&["lab", "--state", &state, "apply", "-f", &deny]);
    assert!(
        ask(&client, "api.example.com.", false).is_err(),
        "the cluster DNS is unreachable under default deny"
    );
    let denied = getaddrinfo(&lab, "shop/client", "api.example.com");
    assert!(
        denied.is_err(),
        "resolution fails under default deny: {denied:?}"
    );
    let table = run_ok(&[
        "lab",
        "--state",
        &state,
        "probe",
        "--to",
        "api.example.com",
        "--port",
        "443",
    ]);
    let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("  shop/")).collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(
        rows.iter()
            .all(|r| r.contains("✗") && r.contains("no answer from the cluster DNS")),
        "{table}"
    );

    // Egress to kube-dns:53 allowed again (and to the host's port): resolution and connection.
    let allow = write("allow.yaml", ALLOW_DNS_AND_API);
    run_ok(&["lab", "--state", &state, "apply", "-f", &allow]);
    assert_eq!(
        getaddrinfo(&lab, "shop/client", "www.example.com").as_deref(),
        Ok("198.51.100.10")
    );
    let out = python_in_pod(
        &lab,
        "shop/client",
        "import socket; socket.create_connection(('api.example.com', 443), timeout=3)",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // `lab heal` restarts a dead cluster DNS.
    let lab_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(lab.state.join("lab.json")).expect("lab.json"),
    )
    .expect("json");
    let dnsmasq = lab_json["pods"]["kube-system/kube-dns"]["server_pid"]
        .as_u64()
        .expect("the cluster DNS runs") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dnsmasq),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill dnsmasq");
    // Heal sees a process as dead once it is gone or a zombie: wait for that, not a while.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(format!("/proc/{dnsmasq}/stat")).is_ok_and(|s| {
        !s.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'))
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "dnsmasq survived SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let healed = run_ok(&["lab", "--state", &state, "heal"]);
    assert!(healed.contains("server kube-system/kube-dns"), "{healed}");
    assert_eq!(
        getaddrinfo(&lab, "shop/client", "api.example.com").as_deref(),
        Ok("198.51.100.10")
    );

    // `lab delete`: the host's name, address and server go; a deleted pod's resolv.conf too.
    let near = pods["shop/near"].netns.clone();
    let external_doc = MANIFESTS
        .split("---")
        .find(|d| d.contains("kind: ExternalHost"))
        .expect("the ExternalHost document");
    let near_doc = MANIFESTS
        .split("---")
        .find(|d| d.contains("name: near"))
        .expect("the near pod");
    let gone = write("gone.yaml", &format!("{near_doc}---{external_doc}"));
    run_ok(&["lab", "--state", &state, "delete", "-f", &gone]);
    assert!(!std::path::Path::new("/etc/netns").join(&near).exists());
    assert!(getaddrinfo(&lab, "shop/client", "api.example.com").is_err());
    assert!(
        !lab_processes(&state)
            .iter()
            .any(|c| c.contains("external/example-api")),
        "the host's server stopped"
    );
    let out = python_in_pod(
        &lab,
        "shop/client",
        "import socket; socket.create_connection(('198.51.100.10', 443), timeout=1)",
    );
    assert!(!out.status.success(), "the deleted host is unreachable");

    // An invalid ExternalHost is refused with the field that is wrong, and changes nothing.
    let bad = write(
        "bad.yaml",
        "apiVersion: lab.bulkhead.dev/v1alpha1\nkind: ExternalHost\nmetadata: {name: bad}\nspec: {addresses: [198.51.100.20], names: [bad.example.com], ports: [{port: 0}]}\n",
    );
    let out = Command::new(bin())
        .args(["lab", "--state", &state, "apply", "-f", &bad])
        .output()
        .expect("apply");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spec.ports[0].port"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Down: no namespace, /etc/netns entry, dnsmasq or server is left.
    run_ok(&["lab", "--state", &state, "down"]);
    assert_eq!(
        entries_with_prefix("/var/run/netns", &prefix),
        Vec::<String>::new()
    );
    assert_eq!(
        entries_with_prefix("/etc/netns", &prefix),
        Vec::<String>::new()
    );
    assert_eq!(lab_processes(&state), Vec::<String>::new());
}

#[test]
fn an_external_host_with_an_ipv6_address_is_resolved_and_reached_over_ipv6() {
    if !check_privileged_test(
        "an_external_host_with_an_ipv6_address_is_resolved_and_reached_over_ipv6",
    ) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("bh-lab-dns-v6-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let state = dir.join("state");
    // Down and the directory gone whatever happens below (LabDown takes the lab down first).
    struct RemoveDir(std::path::PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _dir = RemoveDir(dir.clone());
    let _down = LabDown(state.clone());
    let file = dir.join("lab.yaml");
    std::fs::write(
        &file,
        r#"
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: default, labels: {app: c}}
spec: {nodeName: node-2}
---
apiVersion: lab.bulkhead.dev/v1alpha1
kind: ExternalHost
metadata: {name: dual}
spec:
  addresses: [198.51.100.20, "2001:db8::20"]
  names: [dual.example.com]
  ports: [{port: 8443}]
"#,
    )
    .expect("write");
    let state_arg = state.to_string_lossy().to_string();
    run_ok(&[
        "lab",
        "--state",
        &state_arg,
        "up",
        "--ipv6",
        "--port-base",
        "19440",
        "-f",
        &file.to_string_lossy(),
    ]);
    let out = Command::new(bin())
        .args(["lab", "--state", &state_arg, "exec", "default/c", "--", "python3", "-c"])
        .arg(
            "import socket\n\
             for fam in (socket.AF_INET6, socket.AF_INET):\n\
             \x20   a = socket.getaddrinfo('dual.example.com', 8443, fam, socket.SOCK_STREAM)[0][4]\n\
             \x20   s = socket.create_connection(a[:2], timeout=3)\n\
             \x20   print(a[0], s.recv(64).decode().strip())\n",
        )
        .output()
        .expect("exec");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "2001:db8::20 external/dual\n198.51.100.20 external/dual\n"
    );
    let probed: serde_json::Value = serde_json::from_str(&run_ok(&[
        "lab",
        "--state",
        &state_arg,
        "probe",
        "--to",
        "dual.example.com",
        "--port",
        "8443",
        "--ipv6",
        "-o",
        "json",
    ]))
    .expect("json");
    assert_eq!(
        probed,
        serde_json::json!({"default/c": {"dual.example.com": true}})
    );
}
