//! Invalid input is reported per document with a field path and an actionable reason; valid
//! documents are still used; nothing panics.

use std::path::Path;

use bulkhead_controller::{InputError, Object, load_str};

fn errors(yaml: &str) -> Vec<(usize, String, String)> {
    load_str(Path::new("in.yaml"), yaml)
        .errors
        .into_iter()
        .map(|e| match e {
            InputError::Invalid {
                document,
                path,
                reason,
                ..
            } => (document, path, reason),
            other => (0, String::new(), other.to_string()),
        })
        .collect()
}

fn np(spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{namespace: x, name: p}}\nspec:\n{spec}\n"
    )
}

#[track_caller]
fn assert_error(yaml: &str, path: &str, reason: &str) {
    let errs = errors(yaml);
    assert!(
        errs.iter().any(|(_, p, r)| p == path && r.contains(reason)),
        "expected {path}: …{reason}… in {errs:#?}"
    );
}

#[test]
fn each_reason_is_reported_with_its_path() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "  podSelector: {matchExpressions: [{key: a, operator: In}]}",
            "spec.podSelector.matchExpressions[0].values",
            "needs at least one value",
        ),
        (
            "  podSelector: {matchExpressions: [{key: a, operator: NotIn, values: []}]}",
            "spec.podSelector.matchExpressions[0].values",
            "needs at least one value",
        ),
        (
            "  podSelector: {matchExpressions: [{key: a, operator: DoesNotExist, values: [b]}]}",
            "spec.podSelector.matchExpressions[0].values",
            "must not have values",
        ),
        (
            "  podSelector: {matchExpressions: [{key: a, operator: Gt, values: ['1']}]}",
            "spec.podSelector.matchExpressions[0].operator",
            "unknown operator",
        ),
        (
            "  podSelector: {matchLabels: {'a b': c}}",
            "spec.podSelector.matchLabels",
            "invalid label key",
        ),
        (
            "  podSelector: {matchLabels: {a: '-c'}}",
            "spec.podSelector.matchLabels.a",
            "invalid label value",
        ),
        (
            "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/40}}]}]",
            "spec.ingress[0].from[0].ipBlock.cidr",
            "not a valid CIDR",
        ),
        (
            "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.1}}]}]",
            "spec.ingress[0].from[0].ipBlock.cidr",
            "not a CIDR",
        ),
        (
            "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}]}]",
            "spec.ingress[0].from[0].ipBlock.except[0]",
            "strict subset",
        ),
        (
            "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]",
            "spec.ingress[0].from[0].ipBlock.except[0]",
            "strict subset",
        ),
        (
            "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]",
            "spec.ingress[0].from[0]",
            "cannot be combined",
        ),
        (
            "  podSelector: {}\n  ingress: [{from: [{}]}]",
            "spec.ingress[0].from[0]",
            "must specify a peer",
        ),
        (
            "  podSelector: {}\n  ingress: [{ports: [{port: 0}]}]",
            "spec.ingress[0].ports[0].port",
            "out of range",
        ),
        (
            "  podSelector: {}\n  ingress: [{ports: [{port: 65536}]}]",
            "spec.ingress[0].ports[0].port",
            "out of range",
        ),
        (
            "  podSelector: {}\n  ingress: [{ports: [{endPort: 90}]}]",
            "spec.ingress[0].ports[0].endPort",
            "needs a numeric port",
        ),
        (
            "  podSelector: {}\n  ingress: [{ports: [{port: http, endPort: 90}]}]",
            "spec.ingress[0].ports[0].endPort",
            "named port",
        ),
        (
            "  podSelector: {}\n  ingress: [{ports: [{port: 90, endPort: 80}]}]",
            "spec.ingress[0].ports[0].endPort",
            "below port",
        ),
        (
            "  podSelector: {}\n  ingress: [{ports: [{port: 80, protocol: tcp}]}]",
            "spec.ingress[0].ports[0].protocol",
            "unsupported protocol",
        ),
        (
            "  podSelector: {}\n  ingress: [{ports: [{port: '80'}]}]",
            "spec.ingress[0].ports[0].port",
            "invalid port name",
        ),
        (
            "  podSelector: {}\n  policyTypes: [Inbound]",
            "spec.policyTypes[0]",
            "unknown policy type",
        ),
        (
            "  podSelector: {}\n  ingress: [{ports: [{port: [1]}]}]",
            "spec.ingress[0].ports[0].port",
            "invalid type: sequence, expected IntOrString",
        ),
        // Kubernetes' own types: a number beyond what the field holds is a type error at the
        // field, not an overflow.
        (
            "  podSelector: {}\n  ingress: [{ports: [{port: 99999999999}]}]",
            "spec.ingress[0].ports[0].port",
            "expected a 32-bit integer",
        ),
    ];
    for (spec, path, reason) in cases {
        assert_error(&np(spec), path, reason);
    }
}

#[test]
fn metadata_kind_and_duplicates() {
    assert_error(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: x}\nspec: {podSelector: {}}",
        "metadata.name",
        "missing metadata.name",
    );
    assert_error(
        "apiVersion: v1\nmetadata: {name: a}",
        "kind",
        "missing kind",
    );
    assert_error(
        "apiVersion: v2\nkind: Pod\nmetadata: {name: a}",
        "apiVersion",
        "must have apiVersion v1",
    );
    // A ClusterNetworkPolicy at a version network-policy-api never served (v1alpha1 named
    // AdminNetworkPolicy) or without one: refused, naming both versions that work.
    for api_version in [
        "policy.networking.k8s.io/v1alpha1",
        "policy.networking.k8s.io/v1",
    ] {
        assert_error(
            &format!(
                "apiVersion: {api_version}\nkind: ClusterNetworkPolicy\nmetadata: {{name: c}}\nspec: {{tier: Admin, priority: 1, subject: {{namespaces: {{}}}}}}"
            ),
            "apiVersion",
            &format!(
                "ClusterNetworkPolicy must have apiVersion policy.networking.k8s.io/v1beta1 or policy.networking.k8s.io/v1alpha2, not \"{api_version}\""
            ),
        );
    }
    assert_error(
        "kind: ClusterNetworkPolicy\nmetadata: {name: c}\nspec: {tier: Admin, priority: 1, subject: {namespaces: {}}}",
        "apiVersion",
        "must have apiVersion policy.networking.k8s.io/v1beta1 or policy.networking.k8s.io/v1alpha2, not \"\"",
    );
    let dup = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: y}\n";
    let errs = errors(dup);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].0, 2);
    assert!(errs[0].2.contains("duplicate Pod x/a"));
    let loaded = load_str(Path::new("in.yaml"), dup);
    assert_eq!(loaded.objects.len(), 2);
    assert_error(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nstatus: {podIP: 10.0.0.300}",
        "status.podIP",
        "not an IP address",
    );
}

#[test]
fn cluster_network_policy_and_service_policy_rules() {
    let cnp = |spec: &str| {
        format!(
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: c}}\nspec:\n{spec}\n"
        )
    };
    assert_error(
        &cnp("  tier: Top\n  priority: 1\n  subject: {namespaces: {}}"),
        "spec.tier",
        "unknown tier",
    );
    assert_error(
        &cnp("  tier: Admin\n  priority: 1001\n  subject: {namespaces: {}}"),
        "spec.priority",
        "out of range",
    );
    assert_error(
        &cnp("  tier: Admin\n  priority: 1\n  subject: {}"),
        "spec.subject",
        "exactly one",
    );
    assert_error(
        &cnp(
            "  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n  ingress: [{action: Allow, from: [{namespaces: {}}]}]",
        ),
        "spec.ingress[0].action",
        "unknown action",
    );
    assert_error(
        &cnp(
            "  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n  ingress: [{action: Deny, from: []}]",
        ),
        "spec.ingress[0].from",
        "at least one peer",
    );
    assert_error(
        &cnp(
            "  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n  egress: [{action: Deny, to: [{networks: [10.0.0.0/8]}], protocols: [{tcp: {destinationPort: {range: {start: 90, end: 80}}}}]}]",
        ),
        "spec.egress[0].protocols[0].tcp.destinationPort.range",
        "start port must be less",
    );
    assert_error(
        &cnp(
            "  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n  egress: [{action: Deny, to: [{networks: [10.0.0.0/8]}], protocols: [{destinationNamedPort: http}]}]",
        ),
        "spec.egress[0].protocols[0].destinationNamedPort",
        "cannot be used with named ports",
    );
    let sp = |spec: &str| {
        format!(
            "apiVersion: bulkhead.dev/v1alpha1\nkind: ServicePolicy\nmetadata: {{name: s, namespace: x}}\nspec:\n{spec}\n"
        )
    };
    assert_error(&sp("  mode: Dry"), "spec.mode", "unknown mode");
    assert_error(
        &sp("  ingress: [{from: [{entity: galaxy}]}]"),
        "spec.ingress[0].from[0].entity",
        "unknown entity",
    );
    assert_error(
        &sp("  ingress: [{from: [{cidr: 10.0.0.0/8, entity: world}]}]"),
        "spec.ingress[0].from[0]",
        "exactly one",
    );
    assert_error(
        &sp("  ingress: [{ports: [{protocol: ICMP, port: 1}]}]"),
        "spec.ingress[0].ports[0].port",
        "has no ports",
    );
    assert_error(
        &sp("  ingress: [{action: Pass}]"),
        "spec.ingress[0].action",
        "unknown action",
    );
    assert_error(
        &sp("  subject: {serviceAcount: x}"),
        "spec.subject.serviceAcount",
        "unknown field",
    );
}

#[test]
fn valid_documents_survive_invalid_neighbours_and_yaml_errors_are_reported() {
    let yaml = format!(
        "{}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: x}}\n---\n{}",
        np("  podSelector: {matchExpressions: [{key: a, operator: In}]}"),
        np("  podSelector: {}").replace("name: p", "name: q")
    );
    let loaded = load_str(Path::new("in.yaml"), &yaml);
    assert_eq!(loaded.errors.len(), 1);
    assert_eq!(loaded.objects.len(), 2);
    assert!(matches!(loaded.objects[1], Object::Policy(_)));
    let broken = load_str(
        Path::new("in.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\nkey: [unclosed\n",
    );
    assert_eq!(broken.objects.len(), 1);
    assert!(
        broken.errors[0]
            .to_string()
            .starts_with("in.yaml: document 2: not valid YAML"),
        "{}",
        broken.errors[0]
    );
    // Unknown kinds are skipped with a warning, not an error.
    let other = load_str(
        Path::new("in.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n",
    );
    assert!(other.errors.is_empty() && other.skipped.len() == 1);
    // Error display is FILE: document N: path: reason.
    let e = &load_str(Path::new("in.yaml"), &np("  policyTypes: [X]")).errors[0];
    assert_eq!(
        e.to_string(),
        "in.yaml: document 1: spec.policyTypes[0]: unknown policy type \"X\": use Ingress or Egress"
    );
}

#[test]
fn lists_and_deployments_expand() {
    let yaml = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: apps/v1\n  kind: Deployment\n  metadata: {name: web, namespace: shop}\n  spec:\n    replicas: 3\n    template:\n      metadata: {labels: {app: web}}\n      spec: {serviceAccountName: web, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: shop}\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: bad}\n  status: {podIP: nope}\n";
    let loaded = load_str(Path::new("in.yaml"), yaml);
    let pods: Vec<_> = loaded
        .objects
        .iter()
        .filter_map(|o| match o {
            Object::Pod(p) => Some(p),
            _ => None,
        })
        .collect();
    assert_eq!(
        pods.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        vec!["web-0", "web-1", "web-2"]
    );
    assert_eq!(pods[0].workload.as_deref(), Some("Deployment/web"));
    assert_eq!(pods[0].service_account, "web");
    assert_eq!(loaded.errors.len(), 1);
    assert!(
        loaded.errors[0]
            .to_string()
            .contains("items[2].status.podIP"),
        "{}",
        loaded.errors[0]
    );
}

#[test]
fn garbage_never_panics() {
    for text in [
        "",
        "---\n---\n",
        "[1, 2]",
        "kind: 7",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nspec: 5",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec: {ingress: [{from: [{ipBlock: {cidr: '::/0', except: ['::1/128', '10.0.0.0/8']}}]}]}",
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: c}\nspec: {tier: Admin, priority: -5, subject: {pods: {}}, ingress: [{}]}",
        "\u{0}\u{1}",
    ] {
        let _ = load_str(Path::new("in.yaml"), text);
    }
}
