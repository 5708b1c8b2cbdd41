//! Inventory and policies from a directory of Kubernetes YAML, re-read when it changes.
//!
//! Each file is loaded on its own. A file with an invalid document keeps the objects it had
//! before (and the error is reported), so a typo never deletes a policy that is in force — a
//! deleted deny could open traffic.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::SystemTime,
};

use crate::{Change, InputError, Object, PodKey, PolicyKey, load_str};

/// Identity of an input object, for diffing two loads.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKey {
    Namespace(String),
    Node(String),
    Pod(PodKey),
    Policy(PolicyKey),
}

pub fn object_key(o: &Object) -> ObjectKey {
    match o {
        Object::Namespace(n) => ObjectKey::Namespace(n.name.clone()),
        Object::Node(n) => ObjectKey::Node(n.name.clone()),
        Object::Pod(p) => ObjectKey::Pod(p.key()),
        Object::Policy(p) => ObjectKey::Policy(p.key.clone()),
    }
}

fn delete_change(key: ObjectKey) -> Change {
    match key {
        ObjectKey::Namespace(n) => Change::DeleteNamespace(n),
        ObjectKey::Node(n) => Change::DeleteNode(n),
        ObjectKey::Pod(p) => Change::DeletePod(p),
        ObjectKey::Policy(p) => Change::DeletePolicy(p),
    }
}

/// Changes that turn the object set `old` into `new`: namespaces and nodes first, then pods,
/// then policies; deletions in the reverse order.
pub fn diff(old: &BTreeMap<ObjectKey, Object>, new: &BTreeMap<ObjectKey, Object>) -> Vec<Change> {
    let mut changes = Vec::new();
    // BTreeMap order follows ObjectKey's variant order: namespaces, nodes, pods, policies.
    for (k, o) in new {
        if old.get(k) != Some(o) {
            changes.push(Change::from(o.clone()));
        }
    }
    let mut gone: Vec<&ObjectKey> = old.keys().filter(|k| !new.contains_key(k)).collect();
    gone.reverse();
    changes.extend(gone.into_iter().cloned().map(delete_change));
    changes
}

/// A directory (or file) of manifests and what was last loaded from it.
#[derive(Debug)]
pub struct ManifestSource {
    roots: Vec<PathBuf>,
    /// Per file: modification time and the objects it yielded when it last loaded cleanly.
    files: BTreeMap<PathBuf, (Option<SystemTime>, Vec<Object>)>,
}

/// What a reload found.
#[derive(Debug, Default)]
pub struct Reload {
    pub changes: Vec<Change>,
    pub errors: Vec<InputError>,
    /// Files whose previous objects were kept because they no longer load cleanly.
    pub kept: Vec<PathBuf>,
}

fn yaml_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let Ok(entries) = std::fs::read_dir(path) else {
            return;
        };
        let mut children: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        children.sort();
        for c in children {
            yaml_files(&c, out);
        }
    } else if path
        .extension()
        .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
    {
        out.push(path.to_path_buf());
    }
}

impl ManifestSource {
    pub fn new(roots: Vec<PathBuf>) -> ManifestSource {
        ManifestSource {
            roots,
            files: BTreeMap::new(),
        }
    }

    fn objects(&self) -> BTreeMap<ObjectKey, Object> {
        self.files
            .values()
            .flat_map(|(_, objs)| objs.iter())
            .map(|o| (object_key(o), o.clone()))
            .collect()
    }

    /// Re-reads changed files and returns the changes against the previous load.
    pub fn reload(&mut self) -> Reload {
        let before = self.objects();
        let mut reload = Reload::default();
        let mut present = Vec::new();
        for root in &self.roots {
            yaml_files(root, &mut present);
        }
        self.files.retain(|f, _| present.contains(f));
        for file in present {
            let mtime = std::fs::metadata(&file).and_then(|m| m.modified()).ok();
            if self
                .files
                .get(&file)
                .is_some_and(|(t, _)| *t == mtime && mtime.is_some())
            {
                continue;
            }
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => {
                    reload.errors.push(InputError::Read {
                        file: file.clone(),
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
            let loaded = load_str(&file, &text);
            if loaded.errors.is_empty() {
                self.files.insert(file, (mtime, loaded.objects));
            } else {
                reload.errors.extend(loaded.errors);
                match self.files.get_mut(&file) {
                    // Keep the last good objects; remember the mtime so the error is reported
                    // once per edit.
                    Some(entry) => {
                        entry.0 = mtime;
                        reload.kept.push(file);
                    }
                    // A new file that is partly invalid: its valid documents are used.
                    None => {
                        self.files.insert(file, (mtime, loaded.objects));
                    }
                }
            }
        }
        reload.changes = diff(&before, &self.objects());
        reload
    }
}
