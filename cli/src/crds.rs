//! `bulkhead crds`: Bulkhead's CustomResourceDefinitions, generated from the Rust types in
//! `controller/src/kubernetes/crd.rs`. Prints them as one YAML stream, or with `--out DIR`
//! writes one file per CRD (what `charts/bulkhead/crds/` holds; a test fails when those drift).

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::Args;

#[derive(Args)]
pub struct CrdsArgs {
    /// Write one file per CRD into this directory (e.g. `charts/bulkhead/crds`) instead of
    /// printing them.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: CrdsArgs) -> anyhow::Result<ExitCode> {
    let files = bulkhead_controller::kubernetes::crd_files().context("render the CRDs")?;
    match args.out {
        None => {
            for (_, yaml) in files {
                print!("---\n{yaml}");
            }
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            for (name, yaml) in files {
                let path = dir.join(name);
                std::fs::write(&path, yaml).with_context(|| format!("write {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
