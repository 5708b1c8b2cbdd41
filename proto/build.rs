//! Generates the protobuf and gRPC code; `protoc` comes from the protoc-bin-vendored crate, so
//! no system protobuf compiler is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded here.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        // Maps keep the contract's order (BTreeMap), so conversions need no sorting.
        .btree_map(".bulkhead.v1.RuleSet")
        .btree_map(".bulkhead.v1.NodeDelta")
        // Exported labels compare and convert in order.
        .btree_map(".bulkhead.v1.ExportedNamespace")
        .btree_map(".bulkhead.v1.ExportedPod")
        // The controller decodes every flow record agents report: addresses as slices of the
        // received message, not an allocation each.
        .bytes(".bulkhead.v1.FlowRecord")
        // Parts slice encodings shared between streams (see `fanout`), never copy them.
        .bytes(".bulkhead.v1.Part")
        .compile_protos(
            &[
                "proto/bulkhead/v1/distribution.proto",
                "proto/bulkhead/v1/ruleset.proto",
                "proto/bulkhead/v1/peering.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
