//! ClusterNetworkPolicy `nodes` peers: upstream's conformance scenarios
//! `CNPAdminTierEgressNodePeers` and `CNPBaselineTierEgressNodePeers` (network-policy-api,
//! `conformance/tests/*-experimental-egress-rules.go` with the
//! `base/*_tier/experimental-egress-selector-rules.yaml` policies), decided by the reference
//! decision over the compiled rule sets; node identities leave every other policy's meaning
//! alone; Node addresses from files.

use std::net::IpAddr;
use std::path::Path;

use bulkhead_controller::model::Node;
use bulkhead_controller::ruleset::{Direction, PacketTuple, Protocol, Verdict, decide, identity};
use bulkhead_controller::{Change, EngineConfig, Object, PolicyEngine, load_str};

/// Upstream's host-network ports are a configurable range of 8; these are its indexes 0..8.
const HOST_PORTS: [u16; 8] = [36363, 36364, 36365, 36366, 36367, 36368, 36369, 36370];

const NODE_A_IP: &str = "172.18.0.3";
const NODE_B_IP: &str = "172.18.0.4";

/// The part of upstream's conformance manifests these tests use: the gryffindor, slytherin and
/// forbidden-forrest namespaces, the two gryffindor clients on two nodes, a slytherin pod, the
/// host-networked server `centaur-1` (its address is its node's), and two Linux nodes with an
/// IPv4 InternalIP each (node-b an IPv6 ExternalIP too).
fn cluster() -> String {
    let mut out = String::new();
    for house in ["gryffindor", "slytherin", "forbidden-forrest"] {
        out += &format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: network-policy-conformance-{house}, labels: {{conformance-house: {house}}}}}\n"
        );
    }
    for (name, ip, v6) in [
        ("node-a", NODE_A_IP, None),
        ("node-b", NODE_B_IP, Some("fd00:18::4")),
    ] {
        out += &format!(
            "---
apiVersion: v1
kind: Node
metadata: {{name: {name}, labels: {{kubernetes.io/os: linux, kubernetes.io/hostname: {name}}}}}
status:
  addresses:
  - {{type: InternalIP, address: {ip}}}
  - {{type: Hostname, address: {name}}}
"
        );
        if let Some(v6) = v6 {
            out += &format!("  - {{type: ExternalIP, address: \"{v6}\"}}\n");
        }
    }
    for (ns, pod, node, ip, host) in [
        (
            "gryffindor",
            "harry-potter-0",
            "node-a",
            "10.244.1.10",
            false,
        ),
        (
            "gryffindor",
            "harry-potter-1",
            "node-b",
            "10.244.2.11",
            false,
        ),
        (
            "slytherin",
            "draco-malfoy-0",
            "node-a",
            "10.244.1.20",
            false,
        ),
        ("forbidden-forrest", "centaur-1", "node-b", NODE_B_IP, true),
    ] {
        let house = ns;
        out += &format!(
            "---
apiVersion: v1
kind: Pod
metadata: {{namespace: network-policy-conformance-{ns}, name: {pod}, labels: {{conformance-house: {house}}}}}
spec:
  nodeName: {node}
  hostNetwork: {host}
  containers: [{{name: c}}]
status: {{podIP: {ip}}}
"
        );
    }
    out
}

/// Upstream's `node-and-cidr-as-peers-example` (Admin tier), ports filled in.
fn admin_policy(api: &str) -> String {
    format!(
        "---
apiVersion: policy.networking.k8s.io/{api}
kind: ClusterNetworkPolicy
metadata:
  name: node-and-cidr-as-peers-example
spec:
  tier: Admin
  priority: 75
  subject:
    pods:
      namespaceSelector:
        matchLabels:
          conformance-house: gryffindor
      podSelector:
        matchLabels:
          conformance-house: gryffindor
  egress:
  - name: allow-egress-to-{p0}-on-nodes
    action: Accept
    to:
    - nodes:
        matchLabels:
          kubernetes.io/os: linux
    protocols:
    - tcp:
        destinationPort:
          number: {p0}
  - name: pass-egress-to-{p2}-on-nodes
    action: Pass
    to:
    - nodes:
        matchLabels:
          kubernetes.io/os: linux
    protocols:
    - udp:
        destinationPort:
          number: {p2}
  - name: deny-egress-to-slytherin-and-nodes-and-internet
    action: Deny
    to:
    - pods:
        namespaceSelector:
          matchLabels:
            conformance-house: slytherin
        podSelector:
          matchLabels:
            conformance-house: slytherin
    - nodes:
        matchLabels:
          kubernetes.io/os: linux
    - networks:
      - 0.0.0.0/0
      - ::/0
",
        p0 = HOST_PORTS[0],
        p2 = HOST_PORTS[2],
    )
}

/// Upstream's Baseline `default` policy, ports filled in.
fn baseline_policy(api: &str) -> String {
    format!(
        "---
apiVersion: policy.networking.k8s.io/{api}
kind: ClusterNetworkPolicy
metadata:
  name: default
spec:
  tier: Baseline
  priority: 10
  subject:
    namespaces:
      matchLabels:
        kubernetes.io/metadata.name: network-policy-conformance-gryffindor
  egress:
  - name: allow-egress-to-{p0}-on-nodes
    action: Accept
    to:
    - nodes:
        matchLabels:
          kubernetes.io/os: linux
    protocols:
    - tcp:
        destinationPort:
          range:
            start: {p0}
            end: {p1}
  - name: deny-egress-to-nodes-and-internet
    action: Deny
    to:
    - nodes:
        matchLabels:
          kubernetes.io/os: linux
    - networks:
      - 0.0.0.0/0
      - ::/0
",
        p0 = HOST_PORTS[0],
        p1 = HOST_PORTS[1],
    )
}

fn objects(yaml: &str) -> Vec<Object> {
    let loaded = load_str(Path::new("test.yaml"), yaml);
    assert!(loaded.errors.is_empty(), "errors: {:?}", loaded.errors);
    loaded.objects
}

fn compile(yaml: &str) -> PolicyEngine {
    PolicyEngine::new(EngineConfig::default(), objects(yaml)).expect("compiles")
}

/// The egress verdict for gryffindor pod `client` connecting to `dst` (the reference decision
/// over the rule set of the client's node, the ipcache giving the destination's identity).
fn egress(e: &PolicyEngine, client: &str, protocol: Protocol, dst: &str, port: u16) -> Verdict {
    let ns = "network-policy-conformance-gryffindor";
    let key = bulkhead_controller::PodKey {
        namespace: ns.into(),
        name: client.into(),
    };
    let node = e.node_of_pod(&key).expect("placed");
    let rs = e.ruleset(node).expect("rule set");
    let ep = rs.endpoint_by_name(ns, client).expect("endpoint");
    let dst: IpAddr = dst.parse().expect("address");
    let src = *ep
        .ips
        .iter()
        .find(|ip| ip.is_ipv4())
        .expect("an IPv4 address");
    let packet = PacketTuple {
        src,
        dst,
        protocol: Some(protocol),
        dst_port: Some(port),
    };
    decide(&rs, ep, Direction::Egress, &packet).verdict
}

#[test]
fn cnp_admin_tier_egress_node_peers() {
    for api in ["v1alpha2", "v1beta1"] {
        let e = compile(&format!("{}{}", cluster(), admin_policy(api)));
        // centaur-1 serves on node-b's address; the node selector matches node-a too (and the
        // client's own node: upstream makes no exception for it).
        for client in ["harry-potter-0", "harry-potter-1"] {
            for node_ip in [NODE_A_IP, NODE_B_IP] {
                let at = |proto, port| egress(&e, client, proto, node_ip, port);
                // "allow-egress" (rule 0): TCP HostNetworkPorts[0] accepted.
                assert_eq!(
                    at(Protocol::Tcp, HOST_PORTS[0]),
                    Verdict::Allow,
                    "{api} {client} {node_ip}"
                );
                // "pass-egress" (rule 1): UDP HostNetworkPorts[2] passed on; no NetworkPolicy
                // or Baseline policy decides, so it is allowed.
                assert_eq!(
                    at(Protocol::Udp, HOST_PORTS[2]),
                    Verdict::Allow,
                    "{api} {client} {node_ip}"
                );
                // "deny-egress" (rule 2): the rest of the nodes' ports.
                assert_eq!(
                    at(Protocol::Tcp, HOST_PORTS[1]),
                    Verdict::Deny,
                    "{api} {client} {node_ip}"
                );
                assert_eq!(
                    at(Protocol::Udp, HOST_PORTS[4]),
                    Verdict::Deny,
                    "{api} {client} {node_ip}"
                );
                assert_eq!(
                    at(Protocol::Sctp, HOST_PORTS[6]),
                    Verdict::Deny,
                    "{api} {client} {node_ip}"
                );
            }
            // node-b's IPv6 address is a node address too (not only the internet's ::/0).
            let v6 = |proto, port| {
                let ns = "network-policy-conformance-gryffindor";
                let key = bulkhead_controller::PodKey {
                    namespace: ns.into(),
                    name: client.into(),
                };
                let rs = e.ruleset(e.node_of_pod(&key).expect("placed")).expect("rs");
                let id = rs.identity_of("fd00:18::4".parse().expect("ip"));
                assert!(id >= identity::FIRST_NODE_IDENTITY, "{id}");
                let ep = rs.endpoint_by_name(ns, client).expect("endpoint");
                bulkhead_controller::ruleset::decide_direction(
                    rs.policy_of(ep).direction(Direction::Egress),
                    id,
                    Some(proto),
                    Some(port),
                )
                .verdict
            };
            assert_eq!(v6(Protocol::Tcp, HOST_PORTS[0]), Verdict::Allow);
            assert_eq!(v6(Protocol::Tcp, HOST_PORTS[1]), Verdict::Deny);
        }
    }
}

#[test]
fn cnp_baseline_tier_egress_node_peers() {
    for api in ["v1alpha2", "v1beta1"] {
        let e = compile(&format!("{}{}", cluster(), baseline_policy(api)));
        for node_ip in [NODE_A_IP, NODE_B_IP] {
            // "allow-egress" (rule 0): TCP HostNetworkPorts[0]..[1].
            assert_eq!(
                egress(&e, "harry-potter-0", Protocol::Tcp, node_ip, HOST_PORTS[0]),
                Verdict::Allow
            );
            assert_eq!(
                egress(&e, "harry-potter-1", Protocol::Tcp, node_ip, HOST_PORTS[1]),
                Verdict::Allow
            );
            // "deny-egress" (rule 1): the rest.
            assert_eq!(
                egress(&e, "harry-potter-1", Protocol::Udp, node_ip, HOST_PORTS[4]),
                Verdict::Deny
            );
            assert_eq!(
                egress(&e, "harry-potter-1", Protocol::Sctp, node_ip, HOST_PORTS[6]),
                Verdict::Deny
            );
            assert_eq!(
                egress(&e, "harry-potter-0", Protocol::Tcp, node_ip, HOST_PORTS[2]),
                Verdict::Deny
            );
        }
    }
}

/// Without a policy naming `nodes` peers, Node addresses change nothing: the rule sets are
/// those of the same cluster with address-less Nodes. With one, a NetworkPolicy `ipBlock`
/// covering a node address still decides that address as before.
#[test]
fn node_identities_change_no_other_policy() {
    let np = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: network-policy-conformance-gryffindor, name: to-nodes}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 172.18.0.0/24, except: [172.18.0.4/32]}}]
    ports: [{port: 10250}]
";
    let with = compile(&format!("{}{np}", cluster()));
    let stripped: Vec<Object> = objects(&format!("{}{np}", cluster()))
        .into_iter()
        .map(|o| match o {
            Object::Node(n) => Object::Node(Node {
                addresses: Vec::new(),
                ..n
            }),
            o => o,
        })
        .collect();
    let without = PolicyEngine::new(EngineConfig::default(), stripped).expect("compiles");
    assert_eq!(with.rulesets(), without.rulesets());

    // A `nodes` policy for another namespace's pods brings node identities in: the ipBlock
    // still admits node-a (inside, not excepted) and not node-b (excepted).
    let other = admin_policy("v1beta1").replace("gryffindor", "slytherin");
    let e = compile(&format!("{}{np}{other}", cluster()));
    let rs = e.ruleset("node-a").expect("rule set");
    assert!(rs.identity_of(NODE_A_IP.parse().expect("ip")) >= identity::FIRST_NODE_IDENTITY);
    for (client, node) in [("harry-potter-0", NODE_A_IP), ("harry-potter-1", NODE_A_IP)] {
        assert_eq!(
            egress(&e, client, Protocol::Tcp, node, 10250),
            Verdict::Allow
        );
        assert_eq!(
            egress(&e, client, Protocol::Tcp, node, 10251),
            Verdict::Deny
        );
        assert_eq!(
            egress(&e, client, Protocol::Tcp, NODE_B_IP, 10250),
            Verdict::Deny
        );
    }
}

/// A relabel changes a node's identity, and the policies that select it follow (through
/// deltas that rebuild exactly the new rule sets).
#[test]
fn a_node_relabel_moves_it_in_and_out_of_node_selections() {
    let mut e = compile(&format!("{}{}", cluster(), admin_policy("v1beta1")));
    let before = e.rulesets();
    let old_id = before["node-a"].identity_of(NODE_B_IP.parse().expect("ip"));
    assert_eq!(
        egress(
            &e,
            "harry-potter-0",
            Protocol::Tcp,
            NODE_B_IP,
            HOST_PORTS[1]
        ),
        Verdict::Deny
    );
    // node-b is no longer Linux: neither the Accept, the Pass nor the node Deny selects it; the
    // `networks` deny of 0.0.0.0/0 still does.
    let relabeled = Node {
        name: "node-b".into(),
        labels: [("kubernetes.io/os".to_string(), "windows".to_string())]
            .into_iter()
            .collect(),
        addresses: vec![
            NODE_B_IP.parse().expect("ip"),
            "fd00:18::4".parse().expect("ip"),
        ],
    };
    let deltas = e.apply(Change::UpsertNode(relabeled)).expect("applies");
    let after = e.rulesets();
    let new_id = after["node-a"].identity_of(NODE_B_IP.parse().expect("ip"));
    assert_ne!(old_id, new_id, "a new label set is a new node identity");
    assert!(new_id >= identity::FIRST_NODE_IDENTITY);
    let mut rebuilt = before.clone();
    for d in &deltas {
        rebuilt
            .get_mut(&d.node)
            .expect("known node")
            .apply_delta(d)
            .expect("applies");
    }
    assert_eq!(rebuilt, after);
    assert_eq!(
        egress(
            &e,
            "harry-potter-0",
            Protocol::Tcp,
            NODE_B_IP,
            HOST_PORTS[0]
        ),
        Verdict::Deny,
        "the Accept no longer selects node-b"
    );
    assert_eq!(
        egress(
            &e,
            "harry-potter-0",
            Protocol::Udp,
            NODE_B_IP,
            HOST_PORTS[2]
        ),
        Verdict::Deny,
        "nor the Pass"
    );
    assert_eq!(
        egress(
            &e,
            "harry-potter-0",
            Protocol::Tcp,
            NODE_A_IP,
            HOST_PORTS[0]
        ),
        Verdict::Allow
    );
    // The last policy with `nodes` peers goes: node addresses leave every ipcache.
    let key = e
        .objects()
        .into_iter()
        .find_map(|o| match o {
            Object::Policy(p) if p.key.name == "node-and-cidr-as-peers-example" => Some(p.key),
            _ => None,
        })
        .expect("the policy");
    e.apply(Change::DeletePolicy(key)).expect("applies");
    let rs = e.ruleset("node-a").expect("rule set");
    assert!(
        rs.ipcache
            .iter()
            .all(|c| c.identity < identity::FIRST_NODE_IDENTITY
                || c.identity >= identity::FIRST_NODE_IDENTITY + identity::NODE_IDENTITY_COUNT),
        "{:?}",
        rs.ipcache
    );
}

/// A pod address equal to a node address (stale data: host-network pods are not endpoints)
/// keeps the pod's entry; the node's other address gets the node identity.
#[test]
fn a_pod_address_wins_over_a_node_address() {
    let yaml = format!("{}{}", cluster(), admin_policy("v1beta1"))
        .replace("address: 172.18.0.3", "address: 10.244.1.10");
    let e = compile(&yaml);
    let rs = e.ruleset("node-a").expect("rule set");
    let pod = e
        .identity_of_pod(&bulkhead_controller::PodKey {
            namespace: "network-policy-conformance-gryffindor".into(),
            name: "harry-potter-0".into(),
        })
        .expect("identity");
    assert_eq!(rs.identity_of("10.244.1.10".parse().expect("ip")), pod);
    assert!(rs.identity_of(NODE_B_IP.parse().expect("ip")) >= identity::FIRST_NODE_IDENTITY);
}

#[test]
fn node_addresses_come_from_status_addresses() {
    let loaded = objects(
        "apiVersion: v1
kind: Node
metadata: {name: n1, labels: {zone: a}}
status:
  addresses:
  - {type: Hostname, address: n1}
  - {type: InternalIP, address: 10.1.0.7}
  - {type: ExternalIP, address: \"2001:db8::7\"}
  - {type: InternalDNS, address: n1.internal}
  - {type: InternalIP, address: 10.1.0.7}
",
    );
    let Some(Object::Node(n)) = loaded.first() else {
        panic!("a node: {loaded:?}");
    };
    assert_eq!(n.name, "n1");
    assert_eq!(
        n.addresses,
        vec![
            "10.1.0.7".parse::<IpAddr>().expect("ip"),
            "2001:db8::7".parse().expect("ip")
        ]
    );
    let bad = load_str(
        Path::new("n.yaml"),
        "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nstatus: {addresses: [{type: InternalIP, address: n1.example}]}\n",
    );
    assert_eq!(bad.errors.len(), 1, "{:?}", bad.errors);
    assert!(
        bad.errors[0]
            .to_string()
            .contains("status.addresses[0].address"),
        "{}",
        bad.errors[0]
    );
}

#[test]
fn nodes_peers_are_refused_where_upstream_refuses_them() {
    let cnp = |rules: &str| {
        format!(
            "apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\nmetadata: {{name: p}}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {{namespaces: {{}}}}\n{rules}"
        )
    };
    for (rules, field, words) in [
        (
            "  ingress: [{action: Accept, from: [{nodes: {}}]}]",
            "spec.ingress[0].from[0].nodes",
            "only allowed in egress",
        ),
        (
            "  egress: [{action: Accept, to: [{nodes: {}}], protocols: [{destinationNamedPort: http}]}]",
            "spec.egress[0].protocols[0].destinationNamedPort",
            "nodes peers cannot be used with named ports",
        ),
        (
            "  egress: [{action: Deny, to: [{nodes: {matchExpressions: [{key: a, operator: Bogus}]}}]}]",
            "spec.egress[0].to[0].nodes",
            "",
        ),
    ] {
        let l = load_str(Path::new("p.yaml"), &cnp(rules));
        assert_eq!(l.errors.len(), 1, "{rules}: {:?}", l.errors);
        let e = l.errors[0].to_string();
        assert!(e.contains(field) && e.contains(words), "{rules}: {e}");
    }
    // An empty selector selects every node, as upstream says.
    let l = load_str(
        Path::new("p.yaml"),
        &cnp("  egress: [{action: Deny, to: [{nodes: {}}]}]"),
    );
    assert!(l.errors.is_empty(), "{:?}", l.errors);
}
