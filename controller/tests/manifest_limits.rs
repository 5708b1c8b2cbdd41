//! Issue 21, finding 10: a hostile manifest directory or file costs an error, not the
//! controller's memory or time. Symbolic-link loops are read once, the walk and every file are
//! bounded, and deeply nested YAML flow collections are refused before the parser sees them.

use std::path::{Path, PathBuf};

use bulkhead_controller::{
    Object,
    load::{MAX_DIR_DEPTH, MAX_FILE_BYTES, MAX_FLOW_DEPTH},
    load_paths, load_str,
};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("bh-limits-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";

fn namespaces(objects: &[Object]) -> usize {
    objects
        .iter()
        .filter(|o| matches!(o, Object::Namespace(_)))
        .count()
}

#[test]
fn symlink_loops_are_read_once() {
    let dir = TempDir::new("loop");
    std::fs::write(dir.0.join("ns.yaml"), NAMESPACE).expect("write");
    // The repro: two links to the directory itself (2^depth paths if followed).
    std::os::unix::fs::symlink(".", dir.0.join("a")).expect("link");
    std::os::unix::fs::symlink(".", dir.0.join("b")).expect("link");
    std::fs::create_dir(dir.0.join("sub")).expect("sub");
    std::os::unix::fs::symlink("..", dir.0.join("sub/up")).expect("link");
    let loaded = load_paths(&[&dir.0]);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    assert_eq!(namespaces(&loaded.objects), 1, "read once, no duplicate");
    // The same directory given twice is read once too.
    let loaded = load_paths(&[&dir.0, &dir.0]);
    assert_eq!(namespaces(&loaded.objects), 1);
}

#[test]
fn directories_nested_too_deep_are_reported() {
    let dir = TempDir::new("deep");
    let mut p = dir.0.clone();
    for i in 0..MAX_DIR_DEPTH + 3 {
        p = p.join(format!("d{i}"));
    }
    std::fs::create_dir_all(&p).expect("deep dirs");
    std::fs::write(p.join("ns.yaml"), NAMESPACE).expect("write");
    let loaded = load_paths(&[&dir.0]);
    assert_eq!(namespaces(&loaded.objects), 0);
    assert!(
        loaded
            .errors
            .iter()
            .any(|e| e.to_string().contains("nested deeper than")),
        "{:?}",
        loaded.errors
    );
}

#[test]
fn files_over_the_size_limit_are_refused_unread() {
    let dir = TempDir::new("big");
    let big = dir.0.join("big.yaml");
    let f = std::fs::File::create(&big).expect("create");
    // Sparse: the limit is checked while reading, so this costs no disk.
    f.set_len(MAX_FILE_BYTES + 1).expect("size");
    std::fs::write(dir.0.join("ns.yaml"), NAMESPACE).expect("write");
    let loaded = load_paths(&[&dir.0]);
    assert_eq!(namespaces(&loaded.objects), 1, "the other file still loads");
    let err = loaded
        .errors
        .iter()
        .map(|e| e.to_string())
        .find(|e| e.contains("big.yaml"))
        .expect("an error for the big file");
    assert!(err.contains("larger than 64 MiB"), "{err}");
}

#[test]
fn deeply_nested_flow_collections_are_refused_before_parsing() {
    // The repro: 40k `[` took the parser 4.4 s.
    let text = format!("{NAMESPACE}---\nx: {}\n", "[".repeat(40_000));
    let loaded = load_str(Path::new("nested.yaml"), &text);
    assert!(loaded.objects.is_empty());
    assert!(
        loaded.errors[0]
            .to_string()
            .contains("nested deeper than 64"),
        "{:?}",
        loaded.errors
    );
    // At the limit, and with brackets in quotes and comments, manifests load as before.
    let at_limit = format!(
        "{NAMESPACE}metadata2: {}{}\n",
        "[".repeat(MAX_FLOW_DEPTH),
        "]".repeat(MAX_FLOW_DEPTH)
    );
    let loaded = load_str(Path::new("ok.yaml"), &at_limit);
    assert!(
        !loaded
            .errors
            .iter()
            .any(|e| e.to_string().contains("nested")),
        "{:?}",
        loaded.errors
    );
    let quoted = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop # {}\n  annotations: {{note: \"{}\", other: '{}'}}\n",
        "[".repeat(200),
        "[".repeat(200),
        "{".repeat(200)
    );
    let loaded = load_str(Path::new("quoted.yaml"), &quoted);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    assert_eq!(namespaces(&loaded.objects), 1);
}
