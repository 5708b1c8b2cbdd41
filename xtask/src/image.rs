//! `cargo xtask image`: the `bulkhead` image for linux/amd64 and linux/arm64, built without a
//! container engine.
//!
//! Each architecture's binary is built static (musl; the eBPF object is the same for both and
//! embedded as always), and the image is one layer: the binary at `/usr/bin/bulkhead` (the
//! entrypoint: the chart passes only arguments), Debian's CA certificates, and `/etc/passwd` +
//! `/etc/group` naming root and the unprivileged user `bulkhead` (65532) the image runs as by
//! default (the chart runs the agent as root, for its capabilities). No shell, no package
//! manager: the agent asks the kernel over rtnetlink and bpf(2) and runs no program.
//!
//! The layer's files carry fixed times and owners, so the same binary gives the same digest.
//! Written to `target/image/`:
//!
//! * `bulkhead-<version>-<arch>.oci.tar`: an OCI image layout archive of one image named
//!   `bulkhead:<version>`, as `podman save` writes one (`podman load -i` names it
//!   `localhost/bulkhead:<version>`; `skopeo copy oci-archive:FILE docker://REGISTRY/bulkhead:<version>`
//!   pushes it). One name only: an archive whose index lists the image twice (once per tag) is
//!   refused by Debian 12's podman 4.3 ("more than one image in oci, choose an image"), and
//!   skopeo then needs the tag after the file name;
//! * `bulkhead-<version>.oci.tar`: both images under one multi-architecture index, tagged
//!   `<version>` and `<version>-<commit>` (`skopeo copy --all oci-archive:FILE:<version>
//!   docker://…` pushes the index and both images).

use std::{
    collections::HashMap,
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    str::FromStr,
};

use anyhow::{Context, bail};
use flate2::{Compression, write::GzEncoder};
use oci_spec::image::{
    ANNOTATION_REF_NAME, ANNOTATION_REVISION, ANNOTATION_VERSION, Arch, ConfigBuilder, Descriptor,
    Digest, ImageConfigurationBuilder, ImageIndexBuilder, ImageManifestBuilder, MediaType, Os,
    PlatformBuilder, RootFsBuilder,
};
use sha2::{Digest as _, Sha256};

use crate::{output, project_root, run, step};

/// The unprivileged user and group the image runs as unless told otherwise.
const USER: u32 = 65532;

/// One architecture of the image.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// The OCI name (`amd64`, `arm64`).
    pub name: &'static str,
    /// Rust's target triple.
    pub triple: &'static str,
    /// The C compiler and linker driver for the target (ring has C code).
    pub cc: &'static str,
    /// rustc flags for the `bulkhead` crate only (`cargo rustc`), not its dependencies.
    pub rustc_args: &'static [&'static str],
    /// More build environment for this target (C dependencies' build scripts).
    pub build_env: &'static [(&'static str, &'static str)],
}

/// Not a static PIE: rustc links those with `-static-pie`, which Debian's `musl-gcc` specs do
/// not know, so the link silently became a dynamic PIE with `/lib/ld-musl-x86_64.so.1` as its
/// interpreter and `Scrt1.o` start files, which crashed in `_start_c` before `main` (on
/// every machine, and in the image, which has no such interpreter). A static
/// non-PIE executable (`relocation-model=static` on the final crate) is what `musl-gcc -static`
/// links correctly; [`check_static`] refuses an interpreter from now on.
pub const AMD64: Target = Target {
    name: "amd64",
    triple: "x86_64-unknown-linux-musl",
    cc: "musl-gcc",
    rustc_args: &["-C", "relocation-model=static"],
    build_env: &[],
};

/// Debian has no aarch64 musl compiler; its glibc cross compiler builds ring's C (which needs
/// no libc) and drives the link, for which rustc brings musl's own start files and libc.
/// SQLite's C (the flow history) does use libc, compiled against glibc's headers: with large
/// file support on (`_FILE_OFFSET_BITS=64`, SQLite's default) they rename `open`, `pread`,
/// `stat`… to `open64`, `pread64`, `stat64`…, which musl (1.2.4 on) does not have, and the link
/// fails. `SQLITE_DISABLE_LFS` leaves the plain names; on a 64-bit target `off_t` is 64 bits
/// anyway, so nothing is lost (and on aarch64 glibc's and musl's `struct stat`, `struct flock`
/// and `O_*` flags are the kernel's generic ones).
pub const ARM64: Target = Target {
    name: "arm64",
    triple: "aarch64-unknown-linux-musl",
    cc: "aarch64-linux-gnu-gcc",
    rustc_args: &[],
    build_env: &[("LIBSQLITE3_FLAGS", "-DSQLITE_DISABLE_LFS")],
};

pub const TARGETS: [Target; 2] = [AMD64, ARM64];

/// The cargo profile the image's binary is built with: `release`, the code the benchmarks
/// measure.
pub const PROFILE: &str = "release";

/// rustc flags for the image's binary on every architecture. `strip=symbols` drops the symbol
/// table (`.symtab` + `.strtab`, 8.5 MiB of the 40.5 MiB amd64 binary; release builds carry no
/// debug info to strip): the image was over its 40 MB target (issue 17). The machine code is
/// the same as without it, so the benchmarks' release figures stand; only a backtrace printed
/// in the image shows addresses instead of function names. [`check_stripped`] keeps it so.
/// Passed to the final crate only (`cargo rustc`), where the link
/// happens: the dependencies' release builds are shared with the rest of the workspace, so
/// this costs no build time, where a profile of its own would rebuild them all.
const IMAGE_RUSTC_ARGS: &[&str] = &["-C", "strip=symbols"];

impl Target {
    fn arch(self) -> Arch {
        match self.name {
            "arm64" => Arch::ARM64,
            _ => Arch::Amd64,
        }
    }

    /// The `CARGO_TARGET_<TRIPLE>_LINKER` and `CC_<triple>` settings of this target.
    fn env(self) -> [(String, &'static str); 2] {
        let upper = self.triple.to_uppercase().replace('-', "_");
        let lower = self.triple.replace('-', "_");
        [
            (format!("CARGO_TARGET_{upper}_LINKER"), self.cc),
            (format!("CC_{lower}"), self.cc),
        ]
    }

    /// Where [`Target::build`] leaves the binary.
    pub fn binary(self) -> PathBuf {
        crate::target_dir()
            .join(self.triple)
            .join(PROFILE)
            .join("bulkhead")
    }

    /// The static binary of this target, built (profile [`PROFILE`]) if needed.
    pub fn build(self) -> anyhow::Result<PathBuf> {
        let root = project_root();
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&root)
            .args([
                "rustc",
                "--profile",
                PROFILE,
                "-p",
                "bulkhead",
                "--bin",
                "bulkhead",
                "--target",
                self.triple,
                "--",
            ])
            .args(IMAGE_RUSTC_ARGS)
            .args(self.rustc_args);
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
        cmd.envs(self.build_env.iter().copied());
        run(&mut cmd)?;
        let binary = self.binary();
        check_static(&binary, self)?;
        check_stripped(&binary)?;
        Ok(binary)
    }
}

/// The image has no dynamic loader: a binary with an ELF interpreter (`PT_INTERP`) cannot run
/// in it. The binary must also be for the target's machine (a linker that silently picked the
/// host's would give an image that cannot start).
fn check_static(binary: &Path, target: Target) -> anyhow::Result<()> {
    use object::{
        Endianness,
        elf::{EM_AARCH64, EM_X86_64, PT_INTERP},
        read::elf::{ElfFile64, FileHeader, ProgramHeader},
    };
    let data = fs::read(binary).with_context(|| format!("read {}", binary.display()))?;
    let elf = ElfFile64::<Endianness>::parse(&*data)
        .with_context(|| format!("{} is not a 64-bit ELF file", binary.display()))?;
    let endian = elf.endian();
    let machine = elf.elf_header().e_machine(endian);
    let want = match target.arch() {
        Arch::ARM64 => EM_AARCH64,
        _ => EM_X86_64,
    };
    if machine != want {
        bail!(
            "{} is for ELF machine {machine}, not {} ({want})",
            binary.display(),
            target.name
        );
    }
    if elf
        .elf_program_headers()
        .iter()
        .any(|ph| ph.p_type(endian) == PT_INTERP)
    {
        bail!(
            "{} is dynamically linked (it has an ELF interpreter); the image needs a static binary",
            binary.display()
        );
    }
    Ok(())
}

/// The image's binary carries no symbol table (see [`IMAGE_RUSTC_ARGS`]): 8.5 MB of an image
/// whose target is 40 MB.
fn check_stripped(binary: &Path) -> anyhow::Result<()> {
    use object::{Endianness, Object, ObjectSection, read::elf::ElfFile64};
    let data = fs::read(binary).with_context(|| format!("read {}", binary.display()))?;
    let file = ElfFile64::<Endianness>::parse(&*data)
        .with_context(|| format!("{} is not a 64-bit ELF file", binary.display()))?;
    if let Some(symtab) = file.section_by_name(".symtab") {
        bail!(
            "{} has a symbol table ({} bytes): the image's binary is linked with -C strip=symbols",
            binary.display(),
            symtab.size()
        );
    }
    Ok(())
}

/// Debian packages and Rust targets the cross builds need.
pub fn setup() -> anyhow::Result<()> {
    step("setup: cross builds (musl targets, an aarch64 C compiler, qemu-user for arm64 tests)");
    // The aarch64 C library headers are only a recommendation of the cross compiler, and
    // packages are installed without recommendations: without them `ring`'s C code finds the
    // host's <stdint.h> and fails (bits/libc-header-start.h).
    crate::install_packages(&[
        "musl-tools",
        "gcc-aarch64-linux-gnu",
        "libc6-dev-arm64-cross",
        "qemu-user-static",
    ])?;
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    let missing: Vec<&str> = TARGETS
        .iter()
        .map(|t| t.triple)
        .filter(|t| !installed.lines().any(|l| l.trim() == *t))
        .collect();
    if missing.is_empty() {
        println!("    rust targets present");
    } else {
        run(Command::new("rustup")
            .args(["target", "add"])
            .args(&missing))?;
    }
    Ok(())
}

/// A blob of the layout: its bytes and descriptor.
struct Blob {
    bytes: Vec<u8>,
    descriptor: Descriptor,
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn blob(media_type: MediaType, bytes: Vec<u8>) -> anyhow::Result<Blob> {
    let digest = Digest::from_str(&format!("sha256:{}", sha256(&bytes)))?;
    let descriptor = Descriptor::new(media_type, bytes.len() as u64, digest);
    Ok(Blob { bytes, descriptor })
}

/// Adds a file or directory entry with fixed metadata.
fn append(
    tar: &mut tar::Builder<Vec<u8>>,
    path: &str,
    mode: u32,
    data: Option<&[u8]>,
) -> anyhow::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    match data {
        Some(d) => {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(d.len() as u64);
            tar.append_data(&mut header, path, d)?;
        }
        None => {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            tar.append_data(&mut header, path, std::io::empty())?;
        }
    }
    Ok(())
}

/// The image's one layer as an uncompressed tar.
fn layer(binary: &Path) -> anyhow::Result<Vec<u8>> {
    let bin = fs::read(binary).with_context(|| format!("read {}", binary.display()))?;
    let certs = fs::read("/etc/ssl/certs/ca-certificates.crt")
        .context("read Debian's CA bundle (package ca-certificates)")?;
    let passwd = format!(
        "root:x:0:0:root:/root:/sbin/nologin\nbulkhead:x:{USER}:{USER}:bulkhead:/nonexistent:/sbin/nologin\n"
    );
    let group = format!("root:x:0:\nbulkhead:x:{USER}:\n");
    let mut tar = tar::Builder::new(Vec::new());
    for dir in ["etc", "etc/ssl", "etc/ssl/certs", "usr", "usr/bin"] {
        append(&mut tar, dir, 0o755, None)?;
    }
    // Writable scratch space for whoever runs without a read-only root (the chart mounts an
    // emptyDir here).
    append(&mut tar, "tmp", 0o1777, None)?;
    append(&mut tar, "etc/passwd", 0o644, Some(passwd.as_bytes()))?;
    append(&mut tar, "etc/group", 0o644, Some(group.as_bytes()))?;
    append(
        &mut tar,
        "etc/ssl/certs/ca-certificates.crt",
        0o644,
        Some(&certs),
    )?;
    append(&mut tar, "usr/bin/bulkhead", 0o755, Some(&bin))?;
    Ok(tar.into_inner()?)
}

/// One architecture's image: layer, configuration and manifest blobs.
struct Image {
    target: Target,
    /// Bytes of the uncompressed layer (what the image occupies once unpacked).
    unpacked: usize,
    blobs: Vec<Blob>,
    /// The manifest's descriptor (last blob), with the platform set.
    manifest: Descriptor,
}

fn image(target: Target, binary: &Path, version: &str, commit: &str) -> anyhow::Result<Image> {
    let tar = layer(binary)?;
    let unpacked = tar.len();
    let diff_id = format!("sha256:{}", sha256(&tar));
    let mut gz = GzEncoder::new(Vec::new(), Compression::best());
    gz.write_all(&tar)?;
    let layer = blob(MediaType::ImageLayerGzip, gz.finish()?)?;
    let labels = HashMap::from([
        (ANNOTATION_VERSION.to_string(), version.to_string()),
        (ANNOTATION_REVISION.to_string(), commit.to_string()),
    ]);
    let config = ImageConfigurationBuilder::default()
        .architecture(target.arch())
        .os(Os::Linux)
        .config(
            ConfigBuilder::default()
                .user(format!("{USER}:{USER}"))
                .entrypoint(vec!["/usr/bin/bulkhead".to_string()])
                .env(vec![
                    "PATH=/usr/bin".to_string(),
                    "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt".to_string(),
                ])
                .labels(labels.clone())
                .build()?,
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![diff_id])
                .build()?,
        )
        .build()?;
    let config = blob(MediaType::ImageConfig, config.to_string()?.into_bytes())?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config.descriptor.clone())
        .layers(vec![layer.descriptor.clone()])
        .annotations(labels)
        .build()?;
    let manifest = blob(MediaType::ImageManifest, manifest.to_string()?.into_bytes())?;
    let mut descriptor = manifest.descriptor.clone();
    descriptor.set_platform(Some(
        PlatformBuilder::default()
            .architecture(target.arch())
            .os(Os::Linux)
            .build()?,
    ));
    Ok(Image {
        target,
        unpacked,
        blobs: vec![layer, config, manifest],
        manifest: descriptor,
    })
}

/// `descriptor` once per tag, as `index.json` lists what a layout holds.
fn tagged(descriptor: &Descriptor, tags: &[String]) -> Vec<Descriptor> {
    tags.iter()
        .map(|tag| {
            let mut d = descriptor.clone();
            d.set_annotations(Some(HashMap::from([(
                ANNOTATION_REF_NAME.to_string(),
                tag.clone(),
            )])));
            d
        })
        .collect()
}

/// Writes an OCI image layout archive: `oci-layout`, `index.json` listing `index`, the blobs.
fn write_layout(path: &Path, blobs: &[&Blob], index: Vec<Descriptor>) -> anyhow::Result<()> {
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(index)
        .build()?;
    let mut tar = tar::Builder::new(Vec::new());
    append(
        &mut tar,
        "oci-layout",
        0o644,
        Some(br#"{"imageLayoutVersion":"1.0.0"}"#),
    )?;
    append(
        &mut tar,
        "index.json",
        0o644,
        Some(index.to_string()?.as_bytes()),
    )?;
    append(&mut tar, "blobs", 0o755, None)?;
    append(&mut tar, "blobs/sha256", 0o755, None)?;
    let mut seen = std::collections::BTreeSet::new();
    for b in blobs {
        let hex = b.descriptor.digest().digest().to_string();
        if seen.insert(hex.clone()) {
            append(
                &mut tar,
                &format!("blobs/sha256/{hex}"),
                0o644,
                Some(&b.bytes),
            )?;
        }
    }
    fs::write(path, tar.into_inner()?).with_context(|| format!("write {}", path.display()))
}

/// The name a per-architecture archive gives its one image (see the module's doc).
pub fn archive_name(version: &str) -> String {
    format!("bulkhead:{version}")
}

/// The tags: the crate version, and the version with the commit.
pub fn tags() -> anyhow::Result<(String, String, Vec<String>)> {
    let version = env!("CARGO_PKG_VERSION").to_string();
    let commit = output(Command::new("git").current_dir(project_root()).args([
        "rev-parse",
        "--short=12",
        "HEAD",
    ]))?
    .trim()
    .to_string();
    let tags = vec![version.clone(), format!("{version}-{commit}")];
    Ok((version, commit, tags))
}

/// The archives one build wrote.
pub struct Built {
    /// Per architecture: `bulkhead-<version>-<arch>.oci.tar`.
    pub images: Vec<(Target, PathBuf)>,
    /// With more than one architecture: `bulkhead-<version>.oci.tar`, all under one index.
    pub index: Option<PathBuf>,
}

/// Builds the architectures and writes the archives.
pub fn build_images(targets: &[Target]) -> anyhow::Result<Built> {
    let (version, commit, tags) = tags()?;
    let out_dir = project_root().join("target/image");
    fs::create_dir_all(&out_dir)?;
    let mut images = Vec::new();
    for target in targets {
        step(&format!("image: linux/{} ({})", target.name, target.triple));
        let binary = target.build()?;
        images.push(image(*target, &binary, &version, &commit)?);
    }
    let mut written = Vec::new();
    let mut index_path = None;
    for img in &images {
        let path = out_dir.join(format!("bulkhead-{version}-{}.oci.tar", img.target.name));
        let blobs: Vec<&Blob> = img.blobs.iter().collect();
        write_layout(
            &path,
            &blobs,
            tagged(&img.manifest, &[archive_name(&version)]),
        )?;
        let mb = |b: usize| b as f64 / (1 << 20) as f64;
        let compressed: u64 = img.blobs.iter().map(|b| b.bytes.len() as u64).sum();
        println!(
            "    {}: {:.1} MB unpacked, {:.1} MB compressed (target ≤ 40 MB unpacked){}",
            path.display(),
            mb(img.unpacked),
            mb(compressed as usize),
            if img.unpacked > 40 << 20 {
                " — over the target"
            } else {
                ""
            }
        );
        written.push((img.target, path));
    }
    if images.len() > 1 {
        let index = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .manifests(
                images
                    .iter()
                    .map(|i| i.manifest.clone())
                    .collect::<Vec<_>>(),
            )
            .build()?;
        let index = blob(MediaType::ImageIndex, index.to_string()?.into_bytes())?;
        let blobs: Vec<&Blob> = images
            .iter()
            .flat_map(|i| i.blobs.iter())
            .chain([&index])
            .collect();
        let path = out_dir.join(format!("bulkhead-{version}.oci.tar"));
        write_layout(&path, &blobs, tagged(&index.descriptor, &tags))?;
        println!(
            "    {}: linux/{} under one index, tags {}",
            path.display(),
            images
                .iter()
                .map(|i| i.target.name)
                .collect::<Vec<_>>()
                .join(", linux/"),
            tags.join(", ")
        );
        index_path = Some(path);
    }
    Ok(Built {
        images: written,
        index: index_path,
    })
}

pub fn image_task(arch: Option<&str>, rootfs: Option<&Path>) -> anyhow::Result<()> {
    crate::setup_toolchain()?;
    setup()?;
    let targets: Vec<Target> = match arch {
        None => TARGETS.to_vec(),
        Some(a) => vec![
            *TARGETS
                .iter()
                .find(|t| t.name == a)
                .with_context(|| format!("--arch {a}: expected amd64 or arm64"))?,
        ],
    };
    if let Some(dir) = rootfs {
        let [target] = targets[..] else {
            bail!("--rootfs needs --arch: one architecture's files");
        };
        let binary = target.build()?;
        fs::create_dir_all(dir)?;
        tar::Archive::new(&layer(&binary)?[..])
            .unpack(dir)
            .with_context(|| format!("unpack into {}", dir.display()))?;
        println!(
            "    linux/{}: the image's files are in {}",
            target.name,
            dir.display()
        );
        return Ok(());
    }
    build_images(&targets)?;
    Ok(())
}

/// The arm64 binary, run under qemu-user, answers as the amd64 one does: `--help`, `crds` and
/// `policy evaluate` on the demo's manifests (a broken arm64 build fails the suite).
pub fn test_arm64(images: &[(Target, PathBuf)]) -> anyhow::Result<()> {
    step("test: the arm64 binary under qemu-user answers as the amd64 one");
    let root = project_root();
    let binary = |t: Target| t.binary();
    if !images.iter().any(|(t, _)| t.name == "arm64") {
        bail!("no arm64 image was built");
    }
    let demo = root.join("examples/demo");
    let shop = demo.join("shop.yaml");
    let policies = demo.join("policies.yaml");
    let evaluate: Vec<&str> = vec![
        "policy",
        "evaluate",
        "-f",
        shop.to_str().context("path")?,
        "-f",
        policies.to_str().context("path")?,
        "-o",
        "json",
    ];
    for args in [vec!["--help"], vec!["crds"], evaluate] {
        let amd64 = output(Command::new(binary(AMD64)).args(&args))?;
        let arm64 = output(
            Command::new("qemu-aarch64-static")
                .arg(binary(ARM64))
                .args(&args),
        )?;
        if amd64 != arm64 || amd64.trim().is_empty() {
            bail!(
                "`bulkhead {}` differs on arm64 ({} bytes) from amd64 ({} bytes)",
                args.join(" "),
                arm64.len(),
                amd64.len()
            );
        }
        println!(
            "    bulkhead {}: same {} bytes",
            args.join(" "),
            arm64.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test binary itself is a dynamically linked executable for the host's machine: the
    /// check refuses it for its interpreter on the host's architecture and for its machine on
    /// the other one; a file that is no ELF at all is refused too.
    #[test]
    fn check_static_refuses_interpreters_and_other_machines() {
        let exe = std::env::current_exe().unwrap();
        let (host, other) = if cfg!(target_arch = "aarch64") {
            (ARM64, AMD64)
        } else {
            (AMD64, ARM64)
        };
        let e = check_static(&exe, host).unwrap_err().to_string();
        assert!(e.contains("dynamically linked"), "{e}");
        let e = check_static(&exe, other).unwrap_err().to_string();
        assert!(e.contains("ELF machine"), "{e}");
        let not_elf = std::env::temp_dir().join(format!("bulkhead-not-elf-{}", std::process::id()));
        fs::write(&not_elf, b"#!/bin/sh\n").unwrap();
        let e = check_static(&not_elf, host).unwrap_err().to_string();
        fs::remove_file(&not_elf).unwrap();
        assert!(e.contains("not a 64-bit ELF"), "{e}");
    }

    /// The test binary has its symbols: refused; the same binary after `strip`: accepted.
    #[test]
    fn check_stripped_refuses_a_symbol_table() {
        let exe = std::env::current_exe().unwrap();
        let e = check_stripped(&exe).unwrap_err().to_string();
        assert!(e.contains("has a symbol table"), "{e}");
        let copy = std::env::temp_dir().join(format!("bulkhead-stripped-{}", std::process::id()));
        let status = Command::new("strip")
            .arg("-o")
            .arg(&copy)
            .arg(&exe)
            .status()
            .expect("binutils' strip");
        assert!(status.success());
        let result = check_stripped(&copy);
        fs::remove_file(&copy).unwrap();
        result.unwrap();
    }
}
