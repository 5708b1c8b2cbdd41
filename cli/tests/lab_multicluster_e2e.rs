//! Tier 3: two labs as two clusters on one machine (`lab up --cluster … --pod-cidr …`), their
//! pod networks joined by `lab peer`. Real TCP from a pod of one cluster to a pod of the other
//! crosses both clusters' agents: a policy of the destination's cluster decides. `lab down` of
//! one side takes the link and the other side's routes to it away.
//!
//! Helpers ([`Clusters::up`], [`Cluster::pod`], [`Cluster::apply`], [`connects`]) keep each
//! case a few lines, so cases by cluster label can be added once the controllers peer.

mod common;

use common::*;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use bulkhead_agent::privileged::check_privileged_test;

/// Ports of the two labs (each takes BASE..BASE+3, BASE+11.., BASE+111..): clear of the other
/// lab tests' (19400 and up) and of the distribution test's (21000 and up).
const EAST_BASE: u16 = 18300;
const WEST_BASE: u16 = 18340;
/// The second test's (the tests of this file run in parallel).
const POLICY_EAST_BASE: u16 = 18380;
const POLICY_WEST_BASE: u16 = 18420;
const EAST_CIDR: &str = "10.241.0.0/16";
const WEST_CIDR: &str = "10.242.0.0/16";
const EAST_CIDR_V6: &str = "fd00:241::/96";
const WEST_CIDR_V6: &str = "fd00:242::/96";
const PORT: u16 = 8080;

fn manifests(pods: &[(&str, &str, u32)]) -> String {
    let mut out = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n");
    for (name, app, node) in pods {
        out += &format!(
            "---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: shop, labels: {{app: {app}}}}}
spec:
  nodeName: node-{node}
  containers:
  - name: c
    image: lab
    ports: [{{containerPort: {PORT}, protocol: TCP}}]
"
        );
    }
    out
}

/// One lab that is one cluster; taken down when dropped, also when the test fails.
struct Cluster {
    name: &'static str,
    state: PathBuf,
    dir: PathBuf,
}

impl Cluster {
    fn up(
        root: &Path,
        name: &'static str,
        cidrs: [&str; 2],
        port_base: u16,
        yaml: &str,
    ) -> Cluster {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("dir");
        let cluster = Cluster {
            name,
            state: dir.join("state"),
            dir,
        };
        let file = cluster.dir.join("pods.yaml");
        std::fs::write(&file, yaml).expect("write");
        run_ok(&[
            "lab",
            "--state",
            &cluster.arg(),
            "up",
            "--cluster",
            name,
            "--ipv6",
            "--pod-cidr",
            cidrs[0],
            "--pod-cidr",
            cidrs[1],
            "--port-base",
            &port_base.to_string(),
            "-f",
            &file.to_string_lossy(),
        ]);
        cluster
    }

    fn arg(&self) -> String {
        self.state.to_string_lossy().to_string()
    }

    /// A pod of this cluster by `namespace/name`.
    fn pod(&self, key: &str) -> Pod {
        pods(&self.state)
            .remove(key)
            .unwrap_or_else(|| panic!("no pod {key} in {}", self.name))
    }

    /// The same pod at its IPv6 address.
    fn pod_v6(&self, key: &str) -> Pod {
        let ip = self.lab_json()["pods"][key]["ips"][1]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no IPv6 address of {key} in {}", self.name));
        Pod {
            ip,
            ..self.pod(key)
        }
    }

    /// `lab apply` (or `lab delete`) of these objects; returns once every agent realized them.
    fn apply(&self, file: &str, yaml: &str, delete: bool) {
        let path = self.dir.join(file);
        std::fs::write(&path, yaml).expect("write");
        run_ok(&[
            "lab",
            "--state",
            &self.arg(),
            if delete { "delete" } else { "apply" },
            "-f",
            &path.to_string_lossy(),
        ]);
    }

    fn lab_json(&self) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(self.state.join("lab.json")).expect("lab"))
            .expect("json")
    }

    /// The network namespace of a node of this lab (or its fabric, `fabric`).
    fn netns(&self, node: &str) -> String {
        let node_1 = self.lab_json()["nodes"][0]["netns"]
            .as_str()
            .expect("node netns")
            .to_string();
        let prefix = node_1.strip_suffix("node-1").expect("named by node");
        format!("{prefix}{node}")
    }

    /// `ip ARGS` in a namespace of this lab (see [`Cluster::netns`]): its output.
    fn ip(&self, node: &str, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.netns(node)])
            .args(args)
            .output()
            .expect("ip");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// The routes of a node of this lab to `cidr`.
    fn node_routes(&self, node: &str, cidr: &str) -> String {
        self.ip(node, &["route", "show", cidr])
    }

    fn down(&self) {
        run_ok(&["lab", "--state", &self.arg(), "down"]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(bin())
            .args(["lab", "--state"])
            .arg(&self.state)
            .arg("down")
            .output();
    }
}

/// Two clusters under one temporary directory; both labs go down (then the directory) when
/// dropped.
struct Clusters {
    east: Cluster,
    west: Cluster,
    _root: TempDir,
}

impl Clusters {
    fn up(test: &str, bases: (u16, u16), east: &str, west: &str) -> Clusters {
        let root = TempDir(std::env::temp_dir().join(format!("bh-{test}-{}", std::process::id())));
        std::fs::create_dir_all(&root.0).expect("tmp");
        let east = Cluster::up(&root.0, "east", [EAST_CIDR, EAST_CIDR_V6], bases.0, east);
        let west = Cluster::up(&root.0, "west", [WEST_CIDR, WEST_CIDR_V6], bases.1, west);
        Clusters {
            east,
            west,
            _root: root,
        }
    }

    /// `lab peer` of east with west.
    fn peer(&self) {
        run_ok(&[
            "lab",
            "--state",
            &self.east.arg(),
            "peer",
            "--with",
            &self.west.arg(),
        ]);
    }
}

const DENY_FROM_OUTSIDE_THE_NAMESPACE: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: same-namespace-only, namespace: shop}
spec:
  podSelector: {}
  ingress:
  - from: [{podSelector: {}}]
";

#[test]
fn lab_pods_reach_a_peered_clusters_pods_through_both_clusters_agents() {
    if !check_privileged_test("lab_pods_reach_a_peered_clusters_pods_through_both_clusters_agents")
    {
        return;
    }
    let started = Instant::now();
    let c = Clusters::up(
        "lab-multicluster-e2e",
        (EAST_BASE, WEST_BASE),
        &manifests(&[("client", "client", 1), ("web", "web", 2)]),
        &manifests(&[("api", "api", 2), ("neighbour", "neighbour", 1)]),
    );
    let client = c.east.pod("shop/client");
    let web = c.east.pod("shop/web");
    let api = c.west.pod("shop/api");
    let neighbour = c.west.pod("shop/neighbour");
    assert!(
        client.ip.to_string().starts_with("10.241.") && api.ip.to_string().starts_with("10.242."),
        "pods are addressed in their cluster's pod CIDR: {} {}",
        client.ip,
        api.ip
    );
    assert_eq!(c.east.lab_json()["cluster"], "east");

    // Apart, the clusters' pod networks do not reach each other.
    assert!(!connects(&client, &api, PORT), "not peered yet");
    c.peer();
    assert_eq!(
        c.east.lab_json()["peers"]["west"]["pod_cidrs"],
        serde_json::json!([WEST_CIDR, WEST_CIDR_V6])
    );

    // No policy: across clusters both ways, across nodes on both sides, over both families.
    assert!(connects(&client, &api, PORT), "east client → west api");
    assert!(
        connects(
            &c.east.pod_v6("shop/client"),
            &c.west.pod_v6("shop/api"),
            PORT
        ),
        "east client → west api over IPv6"
    );
    assert!(connects(&api, &client, PORT), "west api → east client");
    assert!(
        connects(&neighbour, &web, PORT),
        "west neighbour → east web"
    );

    // `lab probe` from east names west's pods `west/shop/…`.
    let probe = run_ok(&[
        "lab",
        "--state",
        &c.east.arg(),
        "probe",
        "--port",
        &PORT.to_string(),
        "-o",
        "json",
    ]);
    let m: serde_json::Value = serde_json::from_str(&probe).expect("probe json");
    assert_eq!(m["shop/client"]["west/shop/api"], true, "{probe}");
    assert_eq!(m["shop/web"]["west/shop/neighbour"], true, "{probe}");
    assert_eq!(m["shop/client"]["shop/web"], true, "{probe}");

    // West admits its own namespace only: east's pod is dropped by west's agent, west's own
    // pod still gets in; east's pod still reaches east's pods.
    c.west
        .apply("deny.yaml", DENY_FROM_OUTSIDE_THE_NAMESPACE, false);
    assert!(!connects(&client, &api, PORT), "west's policy drops east");
    assert!(connects(&neighbour, &api, PORT), "west's own namespace");
    assert!(connects(&client, &web, PORT), "east inside east");
    c.west
        .apply("deny.yaml", DENY_FROM_OUTSIDE_THE_NAMESPACE, true);
    assert!(connects(&client, &api, PORT), "the policy is gone");

    // `lab down` of one side: the other side's routes to it and its record of the peer go.
    assert!(!c.west.node_routes("node-1", EAST_CIDR).is_empty());
    c.east.down();
    assert_eq!(c.west.node_routes("node-1", EAST_CIDR), "");
    assert_eq!(c.west.node_routes("node-2", EAST_CIDR), "");
    let links = c.west.ip("fabric", &["-o", "link", "show"]);
    assert!(!links.contains("px-"), "the link to east is gone: {links}");
    assert!(
        c.west.lab_json()["peers"]
            .as_object()
            .is_some_and(|p| p.is_empty()),
        "west forgot east"
    );
    assert!(connects(&neighbour, &api, PORT), "west goes on alone");
    eprintln!(
        "two clusters up, peered and checked in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// West's api admits east's `app: client` pods by cluster label, and nothing else from outside
/// its namespace.
const ADMIT_EAST_CLIENTS: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-from-east, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
  - from:
    - podSelector: {}
    - namespaceSelector: {matchLabels: {bulkhead.dev/cluster: east}}
      podSelector: {matchLabels: {app: client}}
";

/// The same without naming the cluster: every namespace (of west only).
const ADMIT_EVERY_NAMESPACE: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-from-east, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
  - from: [{namespaceSelector: {}}]
";

fn client_pod(app: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: shop, labels: {{app: {app}}}}}
spec:
  nodeName: node-1
  containers:
  - name: c
    image: lab
    ports: [{{containerPort: {PORT}, protocol: TCP}}]
"
    )
}

/// Whether `from` reaches `to` within 10 s (`want`), and stays so for a moment (an import in
/// flight must not be mistaken for the outcome).
fn settles(what: &str, from: &Pod, to: &Pod, want: bool) {
    wait_until(what, Duration::from_secs(15), || {
        connects(from, to, PORT) == want
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(connects(from, to, PORT), want, "{what} (after settling)");
}

fn metrics(port: u16) -> String {
    http_get(port, "/metrics").unwrap_or_default()
}

#[test]
fn lab_policies_name_the_peer_cluster_and_survive_its_controller() {
    if !check_privileged_test("lab_policies_name_the_peer_cluster_and_survive_its_controller") {
        return;
    }
    let started = Instant::now();
    let c = Clusters::up(
        "lab-multicluster-policy",
        (POLICY_EAST_BASE, POLICY_WEST_BASE),
        &manifests(&[("client", "client", 1), ("other", "other", 2)]),
        &manifests(&[("api", "api", 2), ("neighbour", "neighbour", 1)]),
    );
    c.peer();
    let client = c.east.pod("shop/client");
    let other = c.east.pod("shop/other");
    let api = c.west.pod("shop/api");
    let neighbour = c.west.pod("shop/neighbour");
    // Each controller imported the other's pods.
    wait_until(
        "west's controller synced with east",
        Duration::from_secs(15),
        || {
            metrics(POLICY_WEST_BASE + 2)
                .contains("bulkhead_controller_peer_state{peer=\"east\",state=\"synced\"} 1")
        },
    );

    // Named by cluster label: east's client gets in, east's other pod does not.
    c.west.apply("policy.yaml", ADMIT_EAST_CLIENTS, false);
    settles("east client admitted by name", &client, &api, true);
    assert!(
        !connects(&other, &api, PORT),
        "east's other pod is no client"
    );
    // West's graph names east's workloads `east/shop/…`, in cluster east, never `world`.
    // (Fresh connections each round: an agent loses the flow batch it was sending when its
    // controller restarted, as `lab peer` restarts them; it counts them dropped.)
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        connects(&client, &api, PORT);
        let g = run_ok(&["graph", "--lab", &c.west.arg(), "-o", "json"]);
        let graph: serde_json::Value = serde_json::from_str(&g).expect("graph json");
        let named = graph["nodes"].as_array().is_some_and(|nodes| {
            nodes.iter().any(|n| {
                n["cluster"] == "east"
                    && n["id"]
                        .as_str()
                        .is_some_and(|id| id.starts_with("east/shop/"))
            })
        });
        if named {
            break;
        }
        if Instant::now() > deadline {
            let flows = run_ok(&["flows", "--lab", &c.west.arg(), "-o", "json"]);
            panic!("west's graph does not name east's client: {g}\nflows: {flows}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(connects(&neighbour, &api, PORT), "west's own namespace");

    // Not named: `namespaceSelector: {}` means this cluster's namespaces only.
    c.west.apply("policy.yaml", ADMIT_EVERY_NAMESPACE, false);
    settles("east client not admitted by {}", &client, &api, false);
    assert!(
        connects(&neighbour, &api, PORT),
        "west's own namespaces are"
    );

    // A relabel in east reaches west: the client is no client any more, then is again.
    c.west.apply("policy.yaml", ADMIT_EAST_CLIENTS, false);
    settles("east client admitted again", &client, &api, true);
    c.east
        .apply("client.yaml", &client_pod("former-client"), false);
    settles("relabelled in east: denied in west", &client, &api, false);
    c.east.apply("client.yaml", &client_pod("client"), false);
    settles("labelled back in east", &client, &api, true);

    // East's controller dies: west keeps east's last inventory in force (and says so).
    let east_pid = c.east.lab_json()["controller_pid"]
        .as_u64()
        .expect("east's controller pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(east_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill east's controller");
    wait_until(
        "west sees east disconnected",
        Duration::from_secs(15),
        || {
            metrics(POLICY_WEST_BASE + 2)
                .contains("bulkhead_controller_peer_state{peer=\"east\",state=\"disconnected\"} 1")
        },
    );
    assert!(
        metrics(POLICY_WEST_BASE + 2).contains("bulkhead_controller_peer_pods{peer=\"east\"}"),
        "the peer's pods are still counted"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        connects(&client, &api, PORT),
        "still admitted with east's controller dead"
    );
    assert!(
        !connects(&other, &api, PORT),
        "still denied with east's controller dead"
    );
    // East back: its next relabel reaches west again.
    run_ok(&["lab", "--state", &c.east.arg(), "heal"]);
    wait_until(
        "west synced with east again",
        Duration::from_secs(20),
        || {
            metrics(POLICY_WEST_BASE + 2)
                .contains("bulkhead_controller_peer_state{peer=\"east\",state=\"synced\"} 1")
        },
    );
    c.east
        .apply("client.yaml", &client_pod("former-client"), false);
    settles("relabel after east's return", &client, &api, false);
    c.east.apply("client.yaml", &client_pod("client"), false);
    settles("and back", &client, &api, true);

    // Quarantine of the remote-facing pod cuts it off from west too.
    run_ok(&[
        "quarantine",
        "shop/client",
        "--reason",
        "talks to another cluster",
        "--lab",
        &c.east.arg(),
    ]);
    settles("quarantined east client", &client, &api, false);
    assert!(connects(&neighbour, &api, PORT), "west unaffected");
    eprintln!(
        "policies by cluster checked in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
