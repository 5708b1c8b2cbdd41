//! Flow history: the flow records and quarantine actions the controller accepted, kept on disk
//! so that `bulkhead flows --since 24h` answers after a restart and later features (recommended
//! policies, what-if replay) can read what was seen.
//!
//! The store is one SQLite database (compiled in: nothing to install) in a directory of its own
//! (mode 0700, the files 0600). Records are written in chunks: each chunk is a run of
//! length-delimited [`pb::StoredFlow`] messages, LZ4-compressed, in one row with its earliest and
//! latest record time and its record count. Queries pick chunks by time and decode them;
//! retention drops whole chunks, oldest first, by age and by size, and counts the records it
//! dropped.
//!
//! Ingest never waits for the disk: [`FlowHistory::offer`] hands a batch to a writer thread over
//! a bounded channel and, when the writer is behind, drops the batch from the history (counted;
//! the live store and graph keep it).

use std::{
    collections::VecDeque,
    fs,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bulkhead_proto::{prost::Message, v1 as pb};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::{Directory, FlowFilter};
use crate::ruleset::FlowEntry;

/// The database file in the history directory.
pub const DATABASE_FILE: &str = "flows.sqlite";

/// Records per chunk at most (a chunk is written sooner when the writer has nothing more).
const CHUNK_RECORDS: usize = 16_384;

/// How long the writer gathers records into one chunk at most.
const CHUNK_LINGER: Duration = Duration::from_millis(500);

/// How often retention runs when nothing is written.
const RETENTION_PERIOD: Duration = Duration::from_secs(10);

/// Chunks read from the database per step of a query.
const QUERY_PAGE: i64 = 8;

/// Where and how much history to keep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryConfig {
    /// The directory of the store (created 0700 if missing).
    pub dir: PathBuf,
    /// Records older than this are dropped.
    pub max_age: Duration,
    /// The database is kept under this many bytes (oldest records dropped first).
    pub max_bytes: u64,
    /// Batches waiting for the writer at most; beyond, batches are dropped from the history.
    pub queue_batches: usize,
}

impl HistoryConfig {
    pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
    pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
    pub const DEFAULT_QUEUE_BATCHES: usize = 4096;

    /// The defaults (7 days, 1 GiB) for a store in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> HistoryConfig {
        HistoryConfig {
            dir: dir.into(),
            max_age: Self::DEFAULT_MAX_AGE,
            max_bytes: Self::DEFAULT_MAX_BYTES,
            queue_batches: Self::DEFAULT_QUEUE_BATCHES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("flow history: cannot create or use the directory {path}: {source}")]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "flow history: {path} is not a flow history database or is damaged ({source}); move it away to start an empty history, or pass another --flow-history directory"
    )]
    Damaged {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "flow history: cannot write {path} ({source}); check that the controller may write the directory and the file"
    )]
    Unwritable {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "flow history: {path} was written by a newer controller (format {found}, this one reads {FORMAT}); upgrade, or move it away"
    )]
    NewerFormat { path: PathBuf, found: i64 },
    #[error("flow history: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("flow history: a stored chunk cannot be read ({0}); the store may be damaged")]
    Chunk(String),
    #[error("flow history: the writer has stopped")]
    WriterGone,
    #[error(
        "the flow store or graph lock is poisoned (a previous update panicked); restart the controller"
    )]
    Poisoned,
}

/// The on-disk format (`PRAGMA user_version`).
const FORMAT: i64 = 1;

/// Counters of the history (all since the controller started).
#[derive(Debug, Default)]
struct Counters {
    written: AtomicU64,
    chunks_written: AtomicU64,
    /// Dropped because the writer was behind (the queue was full).
    dropped_backlog: AtomicU64,
    /// Dropped because a write failed.
    dropped_write_errors: AtomicU64,
    /// Dropped by retention: too old, or the store too large.
    expired_age: AtomicU64,
    expired_size: AtomicU64,
    bytes: AtomicU64,
}

/// What the history did so far (since the controller started), and its size now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryStats {
    pub written: u64,
    pub chunks_written: u64,
    pub dropped_backlog: u64,
    pub dropped_write_errors: u64,
    pub expired_age: u64,
    pub expired_size: u64,
    /// Bytes of the database in use (as of the last write or retention pass).
    pub bytes: u64,
}

/// A batch for the writer: records of one node (or the controller's quarantine actions).
struct Batch {
    node: Arc<str>,
    first_sequence: u64,
    entries: Vec<Arc<FlowEntry>>,
    directory: Option<Arc<Directory>>,
}

enum Msg {
    Batch(Batch),
    /// Write what is pending, run retention, and answer.
    Flush(mpsc::SyncSender<Result<(), String>>),
    /// Holds the writer until the sender is dropped (tests of a writer that falls behind).
    #[cfg(test)]
    Pause(mpsc::SyncSender<()>, mpsc::Receiver<()>),
}

/// The history: a handle to the writer thread and the database's path for readers.
pub struct FlowHistory {
    config: HistoryConfig,
    path: PathBuf,
    tx: Mutex<Option<mpsc::SyncSender<Msg>>>,
    counters: Arc<Counters>,
    writer: Mutex<Option<thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for FlowHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowHistory")
            .field("path", &self.path)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn to_sql_time(t: u64) -> i64 {
    t.min(i64::MAX as u64) as i64
}

impl FlowHistory {
    /// Opens (or creates) the store and starts its writer. A directory or file the controller
    /// cannot write, or a file that is not a flow history, is an error (the controller refuses
    /// to start rather than lose history silently).
    pub fn open(config: HistoryConfig) -> Result<FlowHistory, HistoryError> {
        let dir_err = |source| HistoryError::Directory {
            path: config.dir.clone(),
            source,
        };
        if !config.dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&config.dir)
                .map_err(dir_err)?;
        }
        if !config.dir.is_dir() {
            return Err(dir_err(std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                "not a directory",
            )));
        }
        let path = config.dir.join(DATABASE_FILE);
        // Created by us with 0600 so that SQLite's journal files (which take the database's
        // mode) are the controller's alone; an existing file is narrowed to 0600.
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .and_then(|f| f.set_permissions(fs::Permissions::from_mode(0o600)))
            .map_err(|source| HistoryError::Directory {
                path: path.clone(),
                source,
            })?;
        let conn = open_writer(&path)?;
        let bytes = used_bytes(&conn)?;
        let counters = Arc::new(Counters::default());
        counters.bytes.store(bytes, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(config.queue_batches.max(1));
        let mut writer = Writer {
            conn,
            config: config.clone(),
            counters: counters.clone(),
            chunk: Chunk::default(),
            last_retention: Instant::now(),
        };
        // Retention first: a controller that was down for a week starts within its bounds.
        writer.retain()?;
        let handle = thread::Builder::new()
            .name("flow-history".into())
            .spawn(move || writer.run(rx))
            .map_err(dir_err)?;
        tracing::info!(path = %path.display(), max_age = ?config.max_age, max_bytes = config.max_bytes, bytes, "flow history open");
        Ok(FlowHistory {
            config,
            path,
            tx: Mutex::new(Some(tx)),
            counters,
            writer: Mutex::new(Some(handle)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn config(&self) -> &HistoryConfig {
        &self.config
    }

    /// Hands a batch to the writer; never waits. When the writer is behind, the batch is not
    /// kept in the history (counted in [`HistoryStats::dropped_backlog`]). `directory` names
    /// the peers the agent could not name, as of now. The entries are shared with the store in
    /// memory, not copied.
    pub fn offer(
        &self,
        node: Arc<str>,
        first_sequence: u64,
        entries: Vec<Arc<FlowEntry>>,
        directory: Option<Arc<Directory>>,
    ) {
        if entries.is_empty() {
            return;
        }
        let n = entries.len() as u64;
        let batch = Msg::Batch(Batch {
            node,
            first_sequence,
            entries,
            directory,
        });
        let sent = match self.tx.lock() {
            Ok(tx) => tx.as_ref().is_some_and(|tx| tx.try_send(batch).is_ok()),
            Err(_) => false,
        };
        if !sent {
            self.counters
                .dropped_backlog
                .fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Waits until everything offered so far is written (and retention has run).
    pub fn flush(&self) -> Result<(), HistoryError> {
        let tx = self
            .tx
            .lock()
            .ok()
            .and_then(|t| t.clone())
            .ok_or(HistoryError::WriterGone)?;
        let (ack, done) = mpsc::sync_channel(1);
        tx.send(Msg::Flush(ack))
            .map_err(|_| HistoryError::WriterGone)?;
        done.recv()
            .map_err(|_| HistoryError::WriterGone)?
            .map_err(HistoryError::Chunk)
    }

    /// Writes what is pending and stops the writer (also on drop).
    pub fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Some(h) = self.writer.lock().ok().and_then(|mut w| w.take()) {
            let _ = h.join();
        }
    }

    pub fn stats(&self) -> HistoryStats {
        let c = &self.counters;
        HistoryStats {
            written: c.written.load(Ordering::Relaxed),
            chunks_written: c.chunks_written.load(Ordering::Relaxed),
            dropped_backlog: c.dropped_backlog.load(Ordering::Relaxed),
            dropped_write_errors: c.dropped_write_errors.load(Ordering::Relaxed),
            expired_age: c.expired_age.load(Ordering::Relaxed),
            expired_size: c.expired_size.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
        }
    }

    /// The stored records that match `query`, read a few chunks at a time (a query holds no
    /// lock the writer needs, and may run while records are written).
    pub fn query(&self, query: HistoryQuery) -> Result<HistoryIter, HistoryError> {
        HistoryIter::open(&self.path, query)
    }
}

impl Drop for FlowHistory {
    fn drop(&mut self) {
        self.close();
    }
}

fn open_writer(path: &Path) -> Result<Connection, HistoryError> {
    let damaged = |source| HistoryError::Damaged {
        path: path.to_path_buf(),
        source,
    };
    let unwritable = |source| HistoryError::Unwritable {
        path: path.to_path_buf(),
        source,
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(unwritable)?;
    // Reading the header tells a database from any other file.
    let format: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(damaged)?;
    if format > FORMAT {
        return Err(HistoryError::NewerFormat {
            path: path.to_path_buf(),
            found: format,
        });
    }
    // auto_vacuum takes effect only before the first table: a new store gives freed pages back
    // to the file system as retention drops chunks.
    conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
        .map_err(unwritable)?;
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))
        .map_err(unwritable)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(unwritable)?;
    conn.pragma_update(None, "journal_size_limit", 64 << 20)
        .map_err(unwritable)?;
    conn.execute_batch(
        "BEGIN IMMEDIATE;
         CREATE TABLE IF NOT EXISTS chunks (
             id INTEGER PRIMARY KEY,
             min_time INTEGER NOT NULL,
             max_time INTEGER NOT NULL,
             records INTEGER NOT NULL,
             data BLOB NOT NULL
         );
         CREATE INDEX IF NOT EXISTS chunks_by_max_time ON chunks (max_time);
         PRAGMA user_version = 1;
         COMMIT;",
    )
    .map_err(|e| match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => {
            damaged(e)
        }
        _ => unwritable(e),
    })?;
    // Every chunk row must be readable (a cheap look at the table, not the whole file).
    conn.query_row("SELECT count(*) FROM chunks", [], |r| r.get::<_, i64>(0))
        .map_err(damaged)?;
    Ok(conn)
}

fn used_bytes(conn: &Connection) -> Result<u64, rusqlite::Error> {
    let pages: i64 = conn.pragma_query_value(None, "page_count", |r| r.get(0))?;
    let free: i64 = conn.pragma_query_value(None, "freelist_count", |r| r.get(0))?;
    let size: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
    Ok(((pages - free).max(0) * size) as u64)
}

/// Records gathered for one chunk.
#[derive(Default)]
struct Chunk {
    data: Vec<u8>,
    records: u64,
    min_time: u64,
    max_time: u64,
}

impl Chunk {
    fn add(&mut self, node: &str, sequence: u64, entry: &FlowEntry) {
        let t = entry.time_unix_nanos();
        if self.records == 0 {
            (self.min_time, self.max_time) = (t, t);
        } else {
            self.min_time = self.min_time.min(t);
            self.max_time = self.max_time.max(t);
        }
        self.records += 1;
        let stored = pb::StoredFlow {
            node: node.to_string(),
            entry: Some(entry.into()),
            sequence,
        };
        // Writing into a Vec cannot fail.
        let _ = stored.encode_length_delimited(&mut self.data);
    }
}

struct Writer {
    conn: Connection,
    config: HistoryConfig,
    counters: Arc<Counters>,
    chunk: Chunk,
    last_retention: Instant,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            let msg = match rx.recv_timeout(RETENTION_PERIOD) {
                Ok(m) => m,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.retain_logged();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut flush = self.take(msg);
            // Gather more into this chunk for a short while, unless someone waits.
            let deadline = Instant::now() + CHUNK_LINGER;
            let mut closed = false;
            while flush.is_none() && (self.chunk.records as usize) < CHUNK_RECORDS {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(m) => flush = self.take(m),
                    Err(mpsc::RecvTimeoutError::Timeout) => break,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            let written = self.write_chunk();
            if flush.is_some() || self.last_retention.elapsed() >= RETENTION_PERIOD {
                self.retain_logged();
            }
            if let Some(ack) = flush {
                let _ = ack.send(written.map_err(|e| e.to_string()));
            }
            if closed {
                break;
            }
        }
        if let Err(e) = self.write_chunk() {
            tracing::error!(error = %e, "flow history: the last records could not be written");
        }
    }

    /// Adds a batch to the chunk; a flush request is returned.
    fn take(&mut self, msg: Msg) -> Option<mpsc::SyncSender<Result<(), String>>> {
        match msg {
            Msg::Flush(ack) => Some(ack),
            #[cfg(test)]
            Msg::Pause(paused, until) => {
                let _ = paused.send(());
                let _ = until.recv();
                None
            }
            Msg::Batch(b) => {
                for (i, e) in b.entries.into_iter().enumerate() {
                    let sequence = b.first_sequence + i as u64;
                    // A copy only for a peer to name.
                    if let (Some(d), FlowEntry::Flow(r)) = (&b.directory, &*e)
                        && r.peer.is_none()
                        && let Some(peer) = d.pod_of(r.peer_address())
                    {
                        let mut named = r.clone();
                        named.peer = Some(peer.clone());
                        self.chunk.add(&b.node, sequence, &FlowEntry::Flow(named));
                    } else {
                        self.chunk.add(&b.node, sequence, &e);
                    }
                }
                None
            }
        }
    }

    fn write_chunk(&mut self) -> Result<(), HistoryError> {
        let chunk = std::mem::take(&mut self.chunk);
        if chunk.records == 0 {
            return Ok(());
        }
        let data = lz4_flex::compress_prepend_size(&chunk.data);
        let written = self.conn.execute(
            "INSERT INTO chunks (min_time, max_time, records, data) VALUES (?1, ?2, ?3, ?4)",
            params![
                to_sql_time(chunk.min_time),
                to_sql_time(chunk.max_time),
                chunk.records as i64,
                data
            ],
        );
        match written {
            Ok(_) => {
                self.counters
                    .written
                    .fetch_add(chunk.records, Ordering::Relaxed);
                self.counters.chunks_written.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                if self.counters.bytes.load(Ordering::Relaxed) > self.config.max_bytes {
                    self.retain_logged();
                }
                Ok(())
            }
            Err(e) => {
                self.counters
                    .dropped_write_errors
                    .fetch_add(chunk.records, Ordering::Relaxed);
                tracing::error!(error = %e, records = chunk.records, "flow history: a chunk could not be written (dropped from the history)");
                Err(e.into())
            }
        }
    }

    fn retain_logged(&mut self) {
        if let Err(e) = self.retain() {
            tracing::error!(error = %e, "flow history: retention failed");
        }
    }

    /// Drops chunks older than the maximum age, then the oldest chunks until the store is
    /// within its size (down to 90 % of it, so that not every chunk written drops one).
    fn retain(&mut self) -> Result<(), HistoryError> {
        self.last_retention = Instant::now();
        let cutoff = now_unix_nanos().saturating_sub(self.config.max_age.as_nanos() as u64);
        let tx = self.conn.transaction()?;
        let old: i64 = tx.query_row(
            "SELECT coalesce(sum(records), 0) FROM chunks WHERE max_time < ?1",
            [to_sql_time(cutoff)],
            |r| r.get(0),
        )?;
        if old > 0 {
            tx.execute(
                "DELETE FROM chunks WHERE max_time < ?1",
                [to_sql_time(cutoff)],
            )?;
            self.counters
                .expired_age
                .fetch_add(old as u64, Ordering::Relaxed);
        }
        let mut used = used_bytes(&tx)?;
        if used > self.config.max_bytes {
            let target = self.config.max_bytes / 10 * 9;
            // The oldest chunks that free enough, then gone in one statement each.
            let mut doomed: Vec<(i64, u64)> = Vec::new();
            {
                let mut oldest = tx.prepare(
                    "SELECT id, records, length(data) FROM chunks ORDER BY max_time, id",
                )?;
                let mut rows = oldest.query([])?;
                let mut freed = 0u64;
                while used.saturating_sub(freed) > target
                    && let Some(row) = rows.next()?
                {
                    let (id, records, len): (i64, i64, i64) =
                        (row.get(0)?, row.get(1)?, row.get(2)?);
                    freed += len as u64;
                    doomed.push((id, records as u64));
                }
            }
            let mut delete = tx.prepare("DELETE FROM chunks WHERE id = ?1")?;
            let mut dropped = 0u64;
            for (id, records) in &doomed {
                delete.execute([id])?;
                dropped += records;
            }
            drop(delete);
            let last_id = doomed.last();
            if last_id.is_some() {
                self.counters
                    .expired_size
                    .fetch_add(dropped, Ordering::Relaxed);
                tracing::info!(
                    records = dropped,
                    max_bytes = self.config.max_bytes,
                    "flow history: oldest records dropped to stay within the size limit"
                );
            }
        }
        tx.commit()?;
        // Give the freed pages back to the file system.
        self.conn
            .query_row("PRAGMA incremental_vacuum", [], |_| Ok(()))
            .optional()?;
        used = used_bytes(&self.conn)?;
        self.counters.bytes.store(used, Ordering::Relaxed);
        Ok(())
    }
}

/// What to read from the history: a time range, the filters of `bulkhead flows`, and an order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Namespace, pod, verdict, and the start of the range (`since_unix_nanos`, inclusive).
    pub filter: FlowFilter,
    /// The end of the range (inclusive); none: up to now.
    pub until_unix_nanos: Option<u64>,
    /// Newest first (in the order the controller received them) instead of oldest first.
    pub newest_first: bool,
}

/// A record from the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRecord {
    /// The node that reported it (`controller` for a quarantine action).
    pub node: String,
    /// Its position in the controller's in-memory store when it was received (restarts
    /// begin again at 0).
    pub sequence: u64,
    pub entry: FlowEntry,
}

/// Records of a [`HistoryQuery`], read a few chunks at a time, in the order the controller
/// received them (which is time order up to agents' clocks and batching). A damaged chunk
/// yields an error and the iteration goes on with the next chunk.
pub struct HistoryIter {
    conn: Connection,
    query: HistoryQuery,
    /// The id of the last chunk read.
    cursor: Option<i64>,
    ready: VecDeque<HistoryRecord>,
    pending_chunks: VecDeque<Vec<u8>>,
    done: bool,
    directory: Directory,
}

impl HistoryIter {
    fn open(path: &Path, query: HistoryQuery) -> Result<HistoryIter, HistoryError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| HistoryError::Damaged {
            path: path.to_path_buf(),
            source,
        })?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(HistoryIter {
            conn,
            query,
            cursor: None,
            ready: VecDeque::new(),
            pending_chunks: VecDeque::new(),
            done: false,
            directory: Directory::default(),
        })
    }

    fn fetch(&mut self) -> Result<(), HistoryError> {
        let since = to_sql_time(self.query.filter.since_unix_nanos);
        let until = to_sql_time(self.query.until_unix_nanos.unwrap_or(u64::MAX));
        let sql = if self.query.newest_first {
            "SELECT id, data FROM chunks WHERE id < ?1 AND max_time >= ?2 AND min_time <= ?3 ORDER BY id DESC LIMIT ?4"
        } else {
            "SELECT id, data FROM chunks WHERE id > ?1 AND max_time >= ?2 AND min_time <= ?3 ORDER BY id ASC LIMIT ?4"
        };
        let cursor = self.cursor.unwrap_or(if self.query.newest_first {
            i64::MAX
        } else {
            i64::MIN
        });
        let mut stmt = self.conn.prepare_cached(sql)?;
        let mut rows = stmt.query(params![cursor, since, until, QUERY_PAGE])?;
        let mut n = 0;
        while let Some(row) = rows.next()? {
            self.cursor = Some(row.get(0)?);
            self.pending_chunks.push_back(row.get(1)?);
            n += 1;
        }
        if n < QUERY_PAGE {
            self.done = true;
        }
        Ok(())
    }

    fn decode(&mut self, data: &[u8]) -> Result<(), HistoryError> {
        let raw = lz4_flex::decompress_size_prepended(data)
            .map_err(|e| HistoryError::Chunk(e.to_string()))?;
        let mut buf = raw.as_slice();
        let mut out = Vec::new();
        let until = self.query.until_unix_nanos.unwrap_or(u64::MAX);
        while !buf.is_empty() {
            let stored = pb::StoredFlow::decode_length_delimited(&mut buf)
                .map_err(|e| HistoryError::Chunk(e.to_string()))?;
            let (node, sequence) = (stored.node.clone(), stored.sequence);
            let entry = stored
                .into_entry()
                .map_err(|e| HistoryError::Chunk(e.to_string()))?;
            if entry.time_unix_nanos() > until
                || !self.query.filter.matches(&self.directory, &entry)
            {
                continue;
            }
            out.push(HistoryRecord {
                node,
                sequence,
                entry,
            });
        }
        if self.query.newest_first {
            out.reverse();
        }
        self.ready.extend(out);
        Ok(())
    }
}

impl Iterator for HistoryIter {
    type Item = Result<HistoryRecord, HistoryError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(r) = self.ready.pop_front() {
                return Some(Ok(r));
            }
            if let Some(chunk) = self.pending_chunks.pop_front() {
                if let Err(e) = self.decode(&chunk) {
                    return Some(Err(e));
                }
                continue;
            }
            if self.done {
                return None;
            }
            if let Err(e) = self.fetch() {
                self.done = true;
                return Some(Err(e));
            }
        }
    }
}

#[cfg(test)]
impl FlowHistory {
    /// Holds the writer until the returned sender is dropped.
    fn pause(&self) -> mpsc::SyncSender<()> {
        let (release, until) = mpsc::sync_channel(0);
        let (paused, wait) = mpsc::sync_channel(1);
        if let Ok(tx) = self.tx.lock()
            && let Some(tx) = tx.as_ref()
        {
            let _ = tx.send(Msg::Pause(paused, until));
        }
        let _ = wait.recv();
        release
    }
}

#[cfg(test)]
mod tests;
