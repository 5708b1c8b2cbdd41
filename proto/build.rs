//! Generates the protobuf and gRPC code; `protoc` comes from the protoc-bin-vendored crate, so
//! no system protobuf compiler is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded here.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .compile_protos(&["proto/bulkhead/v1/distribution.proto"], &["proto"])?;
    Ok(())
}
