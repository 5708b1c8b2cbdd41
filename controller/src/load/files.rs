//! Reading manifests from disk, bounded: the directory walk (each directory once, however it
//! is reached), the size of a file, and the nesting of YAML flow collections, so a hostile
//! manifest directory costs an error, not the controller's memory or time.

use std::path::{Path, PathBuf};

use crate::error::InputError;

/// Largest manifest file read, in bytes: a 100,000-document file is ~20 MB.
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// Most files one load reads (all paths and directories together).
pub const MAX_FILES: usize = 100_000;
/// Deepest directory nesting followed below a path given.
pub const MAX_DIR_DEPTH: usize = 32;
/// Deepest nesting of YAML flow collections (`[`, `{`) in a document; real manifests use a few.
pub const MAX_FLOW_DEPTH: usize = 64;

/// Reads a file no larger than [`MAX_FILE_BYTES`].
pub(super) fn read_manifest(file: &Path) -> Result<String, String> {
    use std::io::Read;
    let f = std::fs::File::open(file).map_err(|e| e.to_string())?;
    let mut text = String::new();
    f.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "larger than {} MiB; split it into several files",
            MAX_FILE_BYTES >> 20
        ));
    }
    Ok(text)
}

/// The directory walk's memory: directories read (by device and inode), files found.
#[derive(Default)]
pub(super) struct Walk {
    dirs: std::collections::BTreeSet<(u64, u64)>,
    files: usize,
    /// The file limit was reported.
    full: bool,
}

impl Walk {
    pub(super) fn collect(
        &mut self,
        path: &Path,
        out: &mut Vec<PathBuf>,
        errors: &mut Vec<InputError>,
        depth: usize,
    ) {
        use std::os::unix::fs::MetadataExt;
        let read_error = |reason: String| InputError::Read {
            file: path.to_path_buf(),
            reason,
        };
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) => {
                errors.push(read_error(e.to_string()));
                return;
            }
        };
        if meta.is_dir() {
            if !self.dirs.insert((meta.dev(), meta.ino())) {
                // A symbolic link back to a directory already read (or the same directory
                // given twice): its files are loaded once.
                return;
            }
            if depth > MAX_DIR_DEPTH {
                errors.push(read_error(format!(
                    "directories nested deeper than {MAX_DIR_DEPTH} levels are not read"
                )));
                return;
            }
            let mut entries: Vec<PathBuf> = match std::fs::read_dir(path) {
                Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
                Err(e) => {
                    errors.push(read_error(e.to_string()));
                    return;
                }
            };
            entries.sort();
            for e in entries {
                self.collect(&e, out, errors, depth + 1);
            }
        } else if depth == 0 || path.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            if self.files >= MAX_FILES {
                if !self.full {
                    self.full = true;
                    errors.push(read_error(format!(
                        "more than {MAX_FILES} manifest files; the rest are not read"
                    )));
                }
                return;
            }
            self.files += 1;
            out.push(path.to_path_buf());
        }
    }
}

/// How deep YAML flow collections nest in `text`, stopping at `limit`: quoted scalars and
/// comments are skipped. (The YAML parser's time grows with the square of this depth.)
pub(super) fn flow_depth(text: &str, limit: usize) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let mut bytes = text.bytes().peekable();
    // A `#` starts a comment at the start of a line or after white space.
    let mut after_space = true;
    while let Some(b) = bytes.next() {
        match b {
            b'\'' => {
                // 'it''s': a doubled quote stays inside.
                while let Some(c) = bytes.next() {
                    if c == b'\'' {
                        if bytes.peek() == Some(&b'\'') {
                            bytes.next();
                        } else {
                            break;
                        }
                    }
                }
            }
            b'"' => {
                while let Some(c) = bytes.next() {
                    match c {
                        b'\\' => {
                            bytes.next();
                        }
                        b'"' => break,
                        _ => {}
                    }
                }
            }
            b'#' if after_space => {
                for c in bytes.by_ref() {
                    if c == b'\n' {
                        break;
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
                if max >= limit {
                    return max;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        after_space = b.is_ascii_whitespace() || b == b'#';
    }
    max
}
