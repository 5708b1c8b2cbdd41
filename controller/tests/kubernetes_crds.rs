//! The CRDs in `charts/bulkhead/crds/` are generated from `controller/src/kubernetes/crd.rs`:
//! this test fails when the committed files drift from the code, and says how to regenerate.

use std::path::PathBuf;

use bulkhead_controller::kubernetes::crd_files;

const REGENERATE: &str = "cargo run -p bulkhead -- crds --out charts/bulkhead/crds";

fn crd_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/bulkhead/crds")
}

#[test]
fn committed_crds_match_the_code() {
    let files = crd_files().expect("render the CRDs");
    assert_eq!(
        files.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        [
            "servicepolicies.bulkhead.dev.yaml",
            "quarantines.bulkhead.dev.yaml",
            "stagednetworkpolicies.bulkhead.dev.yaml",
            "stagedclusternetworkpolicies.bulkhead.dev.yaml",
        ]
    );
    for (name, yaml) in &files {
        let path = crd_dir().join(name);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == *yaml,
            "{} is missing or differs from the CRD generated from controller/src/kubernetes/crd.rs; regenerate it with `{REGENERATE}` and commit the result",
            path.display()
        );
    }
    let mut extra: Vec<String> = std::fs::read_dir(crd_dir())
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".bulkhead.dev.yaml"))
                .filter(|n| !files.iter().any(|(f, _)| f == n))
                .collect()
        })
        .unwrap_or_default();
    extra.sort();
    assert!(
        extra.is_empty(),
        "charts/bulkhead/crds holds CRDs the code no longer defines: {extra:?}; delete them and run `{REGENERATE}`"
    );
}

/// The schema carries the validation the API server can do on its own.
#[test]
fn crd_schemas_validate_what_the_loader_needs() {
    let files = crd_files().expect("render the CRDs");
    let sp: serde_yaml::Value = serde_yaml::from_str(&files[0].1).unwrap();
    let q: serde_yaml::Value = serde_yaml::from_str(&files[1].1).unwrap();
    let version = |crd: &serde_yaml::Value| crd["spec"]["versions"][0].clone();
    for crd in [&sp, &q] {
        let v = version(crd);
        assert_eq!(v["name"], "v1alpha1");
        assert_eq!(v["served"], true);
        assert_eq!(v["storage"], true);
        assert!(
            v["subresources"]["status"].is_mapping(),
            "status subresource enabled"
        );
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert_eq!(crd["spec"]["group"], "bulkhead.dev");
    }
    let sp_spec = &version(&sp)["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let modes = &sp_spec["properties"]["mode"]["enum"];
    assert!(
        modes
            .as_sequence()
            .is_some_and(|m| m.contains(&"Enforce".into()) && m.contains(&"Audit".into())),
        "mode is an enum: {modes:?}"
    );
    let rule = &sp_spec["properties"]["ingress"]["items"]["properties"];
    assert!(rule["action"]["enum"].is_sequence());
    let peer = &rule["from"]["items"]["properties"];
    assert!(peer["entity"]["enum"].is_sequence());
    let port = &rule["ports"]["items"]["properties"];
    assert_eq!(port["endPort"]["maximum"].as_f64(), Some(65535.0));
    assert_eq!(port["port"]["x-kubernetes-int-or-string"], true);
    assert!(
        port["protocol"]["enum"]
            .as_sequence()
            .is_some_and(|p| p.contains(&"SCTP".into()) && p.contains(&"ICMPv6".into()))
    );
    assert_eq!(
        sp_spec["properties"]["ingress"]["maxItems"].as_u64(),
        Some(510)
    );

    let q_spec = &version(&q)["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert!(
        q_spec["required"]
            .as_sequence()
            .is_some_and(|r| r.contains(&"reason".into())),
        "reason is required"
    );
    assert_eq!(
        q_spec["properties"]["reason"]["minLength"].as_u64(),
        Some(1)
    );
    assert_eq!(q_spec["properties"]["pods"]["minItems"].as_u64(), Some(1));
    assert!(q_spec["properties"]["pods"]["items"]["pattern"].is_string());
    assert_eq!(q_spec["properties"]["expiresAt"]["format"], "date-time");
}

/// Every example ServicePolicy the loader accepts also deserializes into the CRD type.
#[test]
fn example_service_policies_fit_the_crd_type() {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/demo/policies.yaml"),
    )
    .unwrap();
    let mut seen = 0;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap();
        if v["kind"] == "ServicePolicy" {
            let sp: bulkhead_controller::kubernetes::ServicePolicy =
                serde_yaml::from_value(v.clone()).expect("example ServicePolicy fits the CRD type");
            // And back: the CRD type writes nothing the loader would refuse.
            let back = serde_yaml::to_string(&sp).unwrap();
            let loaded = bulkhead_controller::load_str(std::path::Path::new("roundtrip"), &back);
            assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
            seen += 1;
        }
    }
    assert!(seen > 0, "the demo has ServicePolicies");
}
