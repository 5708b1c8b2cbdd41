//! The lab's cluster DNS: a pod `kube-system/kube-dns`, labelled as CoreDNS is
//! (`k8s-app: kube-dns`), at a fixed address on node-1, running Debian's dnsmasq. It is
//! authoritative for the lab's own records only (the `ExternalHost` objects' names and aliases),
//! forwards nothing and answers NXDOMAIN for every other name. It is an ordinary lab pod behind
//! a veth, so the agents enforce policies on it like on any pod: a pod resolves only when its
//! egress to `kube-system`/`k8s-app: kube-dns` on port 53 is allowed.
//!
//! Pods use it through the ordinary libc resolver: `ip netns exec` (and so `lab exec`)
//! bind-mounts `/etc/netns/<netns>/resolv.conf` over `/etc/resolv.conf`, and the lab writes that
//! file for every pod as a kubelet writes a pod's `resolv.conf` (`ClusterFirst`).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use hickory_proto::{
    op::{Message, Query, ResponseCode},
    rr::{Name, RData, RecordType},
};
use serde_yaml::Value;

use super::{
    cluster::PodCidrs,
    state::{LabPod, LabState, alive},
};

pub const NAMESPACE: &str = "kube-system";
pub const POD_NAME: &str = "kube-dns";
/// `namespace/name` of the cluster DNS pod in the lab's state.
pub const POD_KEY: &str = "kube-system/kube-dns";
/// The cluster DNS's address in a lab with the default pod CIDR (node-1's host 10, below every
/// address the lab gives a pod; [`super::cluster::PodCidrs::dns_v4`] in general).
pub const ADDRESS_V4: Ipv4Addr = Ipv4Addr::new(10, 240, 1, 10);
/// Its IPv6 address in a lab with `--ipv6`.
pub const ADDRESS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x240, 0, 0, 0, 0, 1, 10);
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// As a kubelet writes it: names with fewer dots are tried with the search domains first.
pub const NDOTS: usize = 5;

/// The cluster DNS pod as the controller sees it (node, addresses and ports filled in).
pub fn pod_doc(cidrs: &PodCidrs, ipv6: bool) -> anyhow::Result<Value> {
    let v4 = cidrs.dns_v4();
    let mut ips = format!("[{{ip: \"{v4}\"}}");
    if ipv6 {
        ips += &format!(", {{ip: \"{}\"}}", cidrs.dns_v6());
    }
    ips += "]";
    let yaml = format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {POD_NAME}
  namespace: {NAMESPACE}
  labels: {{k8s-app: kube-dns}}
spec:
  nodeName: node-1
  serviceAccountName: coredns
  containers:
  - name: dnsmasq
    ports:
    - {{name: dns, containerPort: 53, protocol: UDP}}
    - {{name: dns-tcp, containerPort: 53, protocol: TCP}}
status:
  podIP: \"{v4}\"
  podIPs: {ips}
"
    );
    serde_yaml::from_str(&yaml).context("the cluster DNS pod's document")
}

/// The search domains a kubelet gives a pod in `namespace`.
pub fn search_domains(namespace: &str) -> Vec<String> {
    vec![
        format!("{namespace}.svc.{CLUSTER_DOMAIN}"),
        format!("svc.{CLUSTER_DOMAIN}"),
        CLUSTER_DOMAIN.to_string(),
    ]
}

/// A pod's `resolv.conf`, as a kubelet writes it for `dnsPolicy: ClusterFirst`.
pub fn resolv_conf(namespace: &str, server: Ipv4Addr) -> String {
    format!(
        "# written by bulkhead lab: the cluster DNS (kube-system/kube-dns)\nsearch {}\nnameserver {server}\noptions ndots:{NDOTS}\n",
        search_domains(namespace).join(" ")
    )
}

/// Where `ip netns exec` finds files to bind-mount over `/etc` for a namespace.
fn etc_netns(netns: &str) -> PathBuf {
    Path::new("/etc/netns").join(netns)
}

pub fn write_resolv_conf(state: &LabState, pod: &LabPod) -> anyhow::Result<()> {
    let dir = etc_netns(&pod.netns);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join("resolv.conf");
    std::fs::write(&path, resolv_conf(&pod.namespace, state.pod_cidrs.dns_v4()))
        .with_context(|| format!("write {}", path.display()))
}

pub fn remove_resolv_conf(netns: &str) {
    let _ = std::fs::remove_dir_all(etc_netns(netns));
}

/// Removes the `/etc/netns` entries of every namespace whose name starts with `prefix` (a lab's
/// leftovers after a crash included).
pub fn remove_resolv_confs(prefix: &str) -> anyhow::Result<()> {
    for entry in std::fs::read_dir("/etc/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            std::fs::remove_dir_all(entry.path())
                .with_context(|| format!("remove {}", entry.path().display()))?;
        }
    }
    Ok(())
}

fn dns_dir(state: &LabState) -> PathBuf {
    state.dir.join("dns")
}

fn config_path(state: &LabState) -> PathBuf {
    dns_dir(state).join("dnsmasq.conf")
}

fn pid_path(state: &LabState) -> PathBuf {
    dns_dir(state).join("dnsmasq.pid")
}

/// dnsmasq's configuration: the lab's records and nothing else. Aliases (CNAMEs) come after the
/// names they point to, each chain in order.
pub fn config(state: &LabState) -> String {
    let mut out = String::from(
        "# written by bulkhead lab: the cluster DNS's records (ExternalHost objects)\n\
         # every other name is NXDOMAIN: nothing is forwarded\nlocal=/#/\n",
    );
    out += &format!(
        "host-record=kube-dns.{NAMESPACE}.svc.{CLUSTER_DOMAIN},{}",
        state.pod_cidrs.dns_v4()
    );
    if state.ipv6 {
        out += &format!(",{}", state.pod_cidrs.dns_v6());
    }
    out += ",30\n";
    for host in state.external_hosts.values() {
        let h = &host.spec;
        for name in &h.names {
            for addr in &h.addresses {
                out += &format!("host-record={name},{addr},{}\n", h.ttl);
            }
        }
        for (alias, target) in h.aliases_in_chain_order() {
            out += &format!("cname={alias},{target},{}\n", h.ttl);
        }
    }
    out
}

/// Writes dnsmasq's configuration; whether it changed.
pub fn write_config(state: &LabState) -> anyhow::Result<bool> {
    std::fs::create_dir_all(dns_dir(state))?;
    let path = config_path(state);
    let text = config(state);
    if std::fs::read_to_string(&path).is_ok_and(|old| old == text) {
        return Ok(false);
    }
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    Ok(true)
}

/// Starts dnsmasq in the cluster DNS pod's namespace, detached like the lab's other pod
/// processes, and waits until it serves (its pid file is written once its sockets are bound).
pub fn start(state: &LabState, pod: &LabPod) -> anyhow::Result<u32> {
    // As `ip netns exec` would look for it, and in /usr/sbin (not in every user's PATH).
    let dnsmasq = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("dnsmasq"))
        .find(|p| p.is_file())
        .context(
            "dnsmasq is not installed, and every lab runs it as its cluster DNS: `apt-get install dnsmasq-base` (or `cargo xtask setup`)",
        )?;
    write_config(state)?;
    let pid_file = pid_path(state);
    let _ = std::fs::remove_file(&pid_file);
    let log = state.logs_dir().join("dns.log");
    let pid = super::spawn_detached(
        Command::new("ip")
            .args(["netns", "exec", &pod.netns])
            .arg(&dnsmasq)
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--log-facility=-",
                "--log-queries",
                "--port=53",
            ])
            .arg(format!("--conf-file={}", config_path(state).display()))
            .arg(format!("--pid-file={}", pid_file.display())),
        &log,
    )
    .context("start dnsmasq in the cluster DNS pod")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pid_file.exists() {
        if !alive(pid) || Instant::now() > deadline {
            bail!(
                "the cluster DNS (dnsmasq) did not start; see {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(pid)
}

/// After the records changed: a fresh dnsmasq reads them (its `--host-record`/`--cname` are
/// read at start only).
pub fn reload(state: &mut LabState) -> anyhow::Result<()> {
    if !write_config(state)? {
        return Ok(());
    }
    let Some(pod) = state.pods.get(POD_KEY).cloned() else {
        return Ok(());
    };
    if let Some(pid) = pod.server_pid {
        super::stop(pid);
    }
    let pid = start(state, &pod)?;
    if let Some(p) = state.pods.get_mut(POD_KEY) {
        p.server_pid = Some(pid);
    }
    Ok(())
}

/// The names a resolver with the pod's `resolv.conf` asks for, in order.
fn candidates(name: &str, namespace: &str) -> Vec<String> {
    if let Some(absolute) = name.strip_suffix('.') {
        return vec![absolute.to_string()];
    }
    let searched = search_domains(namespace)
        .into_iter()
        .map(|d| format!("{name}.{d}"));
    if name.matches('.').count() >= NDOTS {
        std::iter::once(name.to_string()).chain(searched).collect()
    } else {
        searched.chain(std::iter::once(name.to_string())).collect()
    }
}

/// One query over UDP to `server`; the answer.
pub fn query(
    server: SocketAddr,
    name: &str,
    record: RecordType,
    timeout: Duration,
) -> anyhow::Result<Message> {
    let qname = Name::from_ascii(format!("{}.", name.trim_end_matches('.')))
        .with_context(|| format!("{name:?} is not a DNS name"))?;
    let mut msg = Message::query();
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(qname, record));
    let id = msg.metadata.id;
    let bind = if server.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let sock = UdpSocket::bind(bind).context("open a UDP socket")?;
    sock.connect(server)
        .with_context(|| format!("reach the cluster DNS at {server}"))?;
    sock.set_read_timeout(Some(timeout))?;
    sock.send(&msg.to_vec().context("encode a DNS query")?)
        .with_context(|| format!("send a query to the cluster DNS at {server}"))?;
    let mut buf = [0u8; 4096];
    loop {
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!(
                    "no answer from the cluster DNS at {server} within {} ms (is egress to kube-system/kube-dns on port 53 allowed?)",
                    timeout.as_millis()
                )
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("no answer from the cluster DNS at {server}"));
            }
        };
        let answer = Message::from_vec(&buf[..n]).context("a malformed DNS answer")?;
        if answer.metadata.id == id {
            return Ok(answer);
        }
    }
}

/// Resolves `name` as a pod in `namespace` does (search domains, `ndots`), asking the cluster
/// DNS (at `dns`) over UDP from the calling thread's network namespace: the addresses of the
/// wanted family.
pub fn resolve(
    dns: Ipv4Addr,
    namespace: &str,
    name: &str,
    ipv6: bool,
    timeout: Duration,
) -> anyhow::Result<Vec<IpAddr>> {
    let server = SocketAddr::new(IpAddr::V4(dns), 53);
    let record = if ipv6 {
        RecordType::AAAA
    } else {
        RecordType::A
    };
    for candidate in candidates(name, namespace) {
        let answer = query(server, &candidate, record, timeout)?;
        match answer.metadata.response_code {
            ResponseCode::NXDomain => continue,
            ResponseCode::NoError => {}
            other => bail!("the cluster DNS answered {other} for {candidate}"),
        }
        let addresses: Vec<IpAddr> = answer
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect();
        if !addresses.is_empty() {
            return Ok(addresses);
        }
    }
    bail!(
        "{name}: no such host in the cluster DNS (declare it in an ExternalHost's spec.names or spec.aliases)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_try_the_search_domains_first_as_a_kubelet_configures() {
        assert_eq!(
            candidates("api.example.com", "shop"),
            [
                "api.example.com.shop.svc.cluster.local",
                "api.example.com.svc.cluster.local",
                "api.example.com.cluster.local",
                "api.example.com"
            ]
        );
        assert_eq!(candidates("api.example.com.", "shop"), ["api.example.com"]);
        assert_eq!(candidates("a.b.c.d.e.f", "x")[0], "a.b.c.d.e.f");
        let conf = resolv_conf("shop", ADDRESS_V4);
        assert!(conf.contains("search shop.svc.cluster.local svc.cluster.local cluster.local\n"));
        assert!(conf.contains("nameserver 10.240.1.10\n"));
        assert!(conf.contains("options ndots:5\n"));
    }

    #[test]
    fn the_pod_is_labelled_as_coredns_is() {
        let doc = pod_doc(&PodCidrs::default(), true).expect("pod");
        assert_eq!(
            doc["metadata"]["labels"]["k8s-app"].as_str(),
            Some("kube-dns")
        );
        assert_eq!(doc["metadata"]["namespace"].as_str(), Some("kube-system"));
        assert_eq!(
            doc["status"]["podIPs"][1]["ip"].as_str(),
            Some("fd00:240::1:a")
        );
    }

    /// The controller's default trusted resolvers are this pod's addresses: the lab needs no
    /// `--dns-resolver` for its pods to learn from its answers.
    #[test]
    fn the_controller_trusts_the_pod_by_default() {
        let text = serde_yaml::to_string(&pod_doc(&PodCidrs::default(), true).expect("pod"))
            .expect("yaml");
        let loaded = bulkhead_controller::load_str(std::path::Path::new("dns.yaml"), &text);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let engine = bulkhead_controller::PolicyEngine::new(
            bulkhead_controller::EngineConfig::default(),
            loaded.objects,
        )
        .expect("compiles");
        let want: Vec<std::net::IpAddr> = vec![ADDRESS_V4.into(), ADDRESS_V6.into()];
        assert_eq!(engine.dns_resolvers(), want);
        assert_eq!(
            engine.ruleset("node-1").expect("rule set").dns_resolvers,
            want
        );
    }
}
