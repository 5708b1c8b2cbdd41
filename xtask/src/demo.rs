//! The README's main job: build Bulkhead and run `bulkhead demo` (a lab of network namespaces
//! on this machine: traffic, least-privilege policies, denied flows naming their rules).

use std::process::Command;

use crate::{project_root, run};

pub fn demo(keep: bool) -> anyhow::Result<()> {
    let root = project_root();
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["build", "--release", "-p", "bulkhead"]))?;
    let mut cmd = Command::new(root.join("target/release/bulkhead"));
    cmd.current_dir(&root).arg("demo");
    if keep {
        cmd.arg("--keep");
    }
    run(&mut cmd)
}
