//! Builds the eBPF programs in `ebpf/` for the bpf target and leaves the object in `OUT_DIR`,
//! where `src/object.rs` embeds it.
//!
//! Without `bpf-linker` (a laptop that only runs `cargo check`), or with
//! `BULKHEAD_EBPF_PLACEHOLDER=1`, an empty placeholder object is written instead, as aya's own
//! test suite does; the agent then refuses to start with a message saying how to build for real.

use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=BULKHEAD_EBPF_PLACEHOLDER");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out_dir.join("bulkhead");
    let placeholder = env::var("BULKHEAD_EBPF_PLACEHOLDER").is_ok_and(|v| v == "1");
    let linker = which_bpf_linker();
    if placeholder || linker.is_none() {
        println!(
            "cargo:warning=building the agent with an empty placeholder eBPF object ({}); run `cargo xtask setup` to build the real one",
            if placeholder {
                "BULKHEAD_EBPF_PLACEHOLDER=1"
            } else {
                "bpf-linker not found"
            }
        );
        fs::write(&object, [])?;
        return Ok(());
    }
    if let Some(linker) = linker {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let ebpf_dir = manifest_dir.join("../ebpf");
    let common_dir = manifest_dir.join("../ebpf/common");
    println!("cargo:rerun-if-changed={}", common_dir.display());
    // The eBPF crate needs `-Z build-std=core` for the bpf target; rustc's own bootstrap switch
    // allows that on stable, for the child cargo only.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    let root = ebpf_dir.to_str().expect("utf-8 path");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "bulkhead-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("stable"),
    )
}

fn which_bpf_linker() -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    let mut dirs: Vec<PathBuf> = env::split_paths(&path).collect();
    if let Some(home) = env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file())
}
