//! Flow history: the flow records and quarantine actions the controller accepted, kept on disk
//! so that `bulkhead flows --since 24h` answers after a restart and later features (recommended
//! policies, what-if replay) can read what was seen.
//!
//! The store is one SQLite database (compiled in: nothing to install) in a directory of its own
//! (mode 0700, the files 0600). Records are written in chunks: each chunk is a run of
//! length-delimited [`pb::StoredFlow`] messages, LZ4-compressed, in one row with its earliest and
//! latest record time and its record count, and beside it a filter of the pods and namespaces
//! its records name (see [`index`]). Queries pick chunks by time, and by that filter when they
//! ask for one pod or namespace, and decode them on other threads, ahead of the caller, in
//! order; retention drops whole chunks (with their filters), oldest first, by age and by size,
//! and counts the records it dropped.
//!
//! Ingest never waits for the disk: [`FlowHistory::offer`] hands a batch to a writer thread over
//! a bounded channel and, when the writer is behind, drops the batch from the history (counted;
//! the live store and graph keep it).

use std::{
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

/// Chunks (ids and filters) read from the database per step of a query.
const QUERY_PAGE: i64 = 64;

/// Decoded chunks a query keeps ready for its caller, per decoding thread.
const READ_AHEAD: usize = 2;

/// Threads that decode the chunks of one query at most (fewer on a machine with fewer cores).
const MAX_DECODERS: usize = 4;

/// A chunk is refused when its header claims more than this (a damaged size field must not
/// make a query allocate gigabytes); chunks hold at most [`CHUNK_RECORDS`] records.
const MAX_CHUNK_BYTES: usize = 256 << 20;

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
        "flow history: cannot start a thread to read the history ({0}); the controller may be out of memory or threads"
    )]
    Thread(std::io::Error),
    #[error(
        "the flow store or graph lock is poisoned (a previous update panicked); restart the controller"
    )]
    Poisoned,
}

/// The on-disk format (`PRAGMA user_version`). 1: chunks; 2: and a filter of the pods and
/// namespaces of each chunk written since (`chunk_filters`). A format-1 store is migrated when
/// opened: its chunks stay without filters and every query reads them (they may hold
/// anything); a format-1 controller refuses a format-2 store (it would not delete the filters
/// with their chunks).
const FORMAT: i64 = 2;

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
         CREATE TABLE IF NOT EXISTS chunk_filters (
             chunk INTEGER PRIMARY KEY,
             filter BLOB NOT NULL
         );
         -- A filter without its chunk could one day describe another chunk of the same id and
         -- hide its records: there is none unless the file was edited, but cheap to be sure.
         DELETE FROM chunk_filters WHERE chunk NOT IN (SELECT id FROM chunks);
         PRAGMA user_version = 2;
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
    /// The pods and namespaces the records name, for the chunk's filter.
    keys: index::ChunkKeys,
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
        self.keys.add(entry);
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
        let filter = chunk.keys.filter();
        // The chunk and its filter together, or neither.
        let written = (|| {
            let tx = self.conn.transaction()?;
            tx.execute(
                "INSERT INTO chunks (min_time, max_time, records, data) VALUES (?1, ?2, ?3, ?4)",
                params![
                    to_sql_time(chunk.min_time),
                    to_sql_time(chunk.max_time),
                    chunk.records as i64,
                    data
                ],
            )?;
            let id = tx.last_insert_rowid();
            tx.execute(
                "INSERT INTO chunk_filters (chunk, filter) VALUES (?1, ?2)",
                params![id, filter],
            )?;
            tx.commit()
        })();
        match written {
            Ok(()) => {
                self.counters
                    .written
                    .fetch_add(chunk.records, Ordering::Relaxed);
                self.counters.chunks_written.fetch_add(1, Ordering::Relaxed);
                // The pages in use (chunk, filter, and the b-trees' own); counting the bytes
                // written would miss the filters' and the tables' overhead.
                match used_bytes(&self.conn) {
                    Ok(used) => self.counters.bytes.store(used, Ordering::Relaxed),
                    Err(_) => {
                        self.counters
                            .bytes
                            .fetch_add((data.len() + filter.len()) as u64, Ordering::Relaxed);
                    }
                }
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
                "DELETE FROM chunk_filters WHERE chunk IN (SELECT id FROM chunks WHERE max_time < ?1)",
                [to_sql_time(cutoff)],
            )?;
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
                // A chunk frees its data and its filter.
                let mut oldest = tx.prepare(
                    "SELECT c.id, c.records, length(c.data) + coalesce(length(f.filter), 0)
                     FROM chunks c LEFT JOIN chunk_filters f ON f.chunk = c.id
                     ORDER BY c.max_time, c.id",
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
            let mut delete_filter = tx.prepare("DELETE FROM chunk_filters WHERE chunk = ?1")?;
            let mut dropped = 0u64;
            for (id, records) in &doomed {
                delete_filter.execute([id])?;
                delete.execute([id])?;
                dropped += records;
            }
            drop((delete, delete_filter));
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

/// What a query read, so far (final once the iteration has ended).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueryStats {
    /// Chunks in the query's time range.
    pub chunks_in_range: u64,
    /// Of those, chunks the index showed to hold no record of the query's pod or namespace:
    /// not read.
    pub chunks_skipped: u64,
    /// Chunks read and decoded.
    pub chunks_decoded: u64,
}

#[derive(Debug, Default)]
struct QueryCounters {
    in_range: AtomicU64,
    skipped: AtomicU64,
    decoded: AtomicU64,
}

/// What the reading thread hands a decoding thread: a chunk's bytes, or why reading stopped.
enum Work {
    Chunk(Vec<u8>),
    Failed(HistoryError),
}

/// A decoded chunk's matching records, in the query's order.
type Decoded = Result<Vec<HistoryRecord>, HistoryError>;

/// Records of a [`HistoryQuery`], in the order the controller received them (which is time
/// order up to agents' clocks and batching). A damaged chunk yields an error and the iteration
/// goes on with the next chunk.
///
/// Behind it, a reading thread picks the chunks (by time, and by their filters for a query of
/// one pod or namespace) and hands them in turn to decoding threads (as many as the machine has
/// cores, at most [`MAX_DECODERS`]), which decompress, decode and filter them; the iterator
/// takes the results from the decoders in the same turn, so the order is the chunks' order. A
/// few chunks are decoded ahead of the caller ([`READ_AHEAD`] per decoder): a caller that
/// folds the records works on one core while the chunks are decoded on the others. Dropping
/// the iterator stops the threads (at their next hand-over).
pub struct HistoryIter {
    /// One per decoding thread, taken in turn.
    decoded: Vec<mpsc::Receiver<Decoded>>,
    turn: usize,
    ready: std::vec::IntoIter<HistoryRecord>,
    done: bool,
    counters: Arc<QueryCounters>,
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
        let decoders = thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, MAX_DECODERS);
        let counters = Arc::new(QueryCounters::default());
        let query = Arc::new(query);
        let mut to_decoders = Vec::with_capacity(decoders);
        let mut decoded = Vec::with_capacity(decoders);
        for _ in 0..decoders {
            let (work_tx, work_rx) = mpsc::sync_channel(READ_AHEAD);
            let (out_tx, out_rx) = mpsc::sync_channel(READ_AHEAD);
            let (query, counters) = (query.clone(), counters.clone());
            thread::Builder::new()
                .name("flow-history-decode".into())
                .spawn(move || decode_chunks(&query, &counters, work_rx, out_tx))
                .map_err(HistoryError::Thread)?;
            to_decoders.push(work_tx);
            decoded.push(out_rx);
        }
        let reader = ChunkReader {
            conn,
            keys: index::QueryKeys::of(&query.filter),
            query,
            cursor: None,
            counters: counters.clone(),
        };
        thread::Builder::new()
            .name("flow-history-read".into())
            .spawn(move || reader.run(to_decoders))
            .map_err(HistoryError::Thread)?;
        Ok(HistoryIter {
            decoded,
            turn: 0,
            ready: Vec::new().into_iter(),
            done: false,
            counters,
        })
    }

    /// What the query read so far: chunks in its range, skipped by the index, decoded.
    pub fn stats(&self) -> QueryStats {
        let c = &self.counters;
        QueryStats {
            chunks_in_range: c.in_range.load(Ordering::Relaxed),
            chunks_skipped: c.skipped.load(Ordering::Relaxed),
            chunks_decoded: c.decoded.load(Ordering::Relaxed),
        }
    }
}

/// Picks a query's chunks, a page of ids (and filters) at a time, and hands them to the
/// decoders in turn.
struct ChunkReader {
    conn: Connection,
    query: Arc<HistoryQuery>,
    keys: index::QueryKeys,
    /// The id of the last chunk considered.
    cursor: Option<i64>,
    counters: Arc<QueryCounters>,
}

impl ChunkReader {
    fn run(mut self, decoders: Vec<mpsc::SyncSender<Work>>) {
        let mut turn = 0;
        loop {
            let (ids, last) = match self.page() {
                Ok(p) => p,
                Err(e) => {
                    let _ = decoders[turn].send(Work::Failed(e));
                    return;
                }
            };
            for id in ids {
                let work = match self.data(id) {
                    Ok(Some(data)) => Work::Chunk(data),
                    // Dropped by retention since the page was read.
                    Ok(None) => continue,
                    Err(e) => Work::Failed(e),
                };
                let failed = matches!(work, Work::Failed(_));
                // The caller has dropped the iterator.
                if decoders[turn].send(work).is_err() || failed {
                    return;
                }
                turn = (turn + 1) % decoders.len();
            }
            if last {
                return;
            }
        }
    }

    /// The next page of chunks in the time range; those the index rules out are counted and
    /// left out. Whether it was the last page.
    fn page(&mut self) -> Result<(Vec<i64>, bool), HistoryError> {
        let since = to_sql_time(self.query.filter.since_unix_nanos);
        let until = to_sql_time(self.query.until_unix_nanos.unwrap_or(u64::MAX));
        // Filters are read only when they can rule chunks out.
        let sql = match (self.query.newest_first, self.keys.selective()) {
            (false, false) => {
                "SELECT id, NULL FROM chunks WHERE id > ?1 AND max_time >= ?2 AND min_time <= ?3 ORDER BY id ASC LIMIT ?4"
            }
            (true, false) => {
                "SELECT id, NULL FROM chunks WHERE id < ?1 AND max_time >= ?2 AND min_time <= ?3 ORDER BY id DESC LIMIT ?4"
            }
            (false, true) => {
                "SELECT c.id, f.filter FROM chunks c LEFT JOIN chunk_filters f ON f.chunk = c.id WHERE c.id > ?1 AND c.max_time >= ?2 AND c.min_time <= ?3 ORDER BY c.id ASC LIMIT ?4"
            }
            (true, true) => {
                "SELECT c.id, f.filter FROM chunks c LEFT JOIN chunk_filters f ON f.chunk = c.id WHERE c.id < ?1 AND c.max_time >= ?2 AND c.min_time <= ?3 ORDER BY c.id DESC LIMIT ?4"
            }
        };
        let cursor = self.cursor.unwrap_or(if self.query.newest_first {
            i64::MAX
        } else {
            i64::MIN
        });
        let mut stmt = self.conn.prepare_cached(sql)?;
        let mut rows = stmt.query(params![cursor, since, until, QUERY_PAGE])?;
        let (mut ids, mut n) = (Vec::new(), 0);
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            self.cursor = Some(id);
            n += 1;
            self.counters.in_range.fetch_add(1, Ordering::Relaxed);
            let filter = row
                .get_ref(1)?
                .as_blob_or_null()
                .map_err(rusqlite::Error::from)?;
            if self.keys.may_match(filter) {
                ids.push(id);
            } else {
                self.counters.skipped.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok((ids, n < QUERY_PAGE))
    }

    fn data(&self, id: i64) -> Result<Option<Vec<u8>>, HistoryError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT data FROM chunks WHERE id = ?1")?;
        Ok(stmt.query_row([id], |r| r.get(0)).optional()?)
    }
}

/// A decoding thread: chunks in, their matching records out, until either side is gone.
fn decode_chunks(
    query: &HistoryQuery,
    counters: &QueryCounters,
    work: mpsc::Receiver<Work>,
    out: mpsc::SyncSender<Decoded>,
) {
    // The history names peers when it writes them: queries match without a directory.
    let directory = Directory::default();
    let mut raw = Vec::new();
    for w in work {
        let decoded = match w {
            Work::Chunk(data) => {
                counters.decoded.fetch_add(1, Ordering::Relaxed);
                decode_chunk(query, &directory, &data, &mut raw)
            }
            Work::Failed(e) => Err(e),
        };
        if out.send(decoded).is_err() {
            return;
        }
    }
}

/// The records of a chunk that match the query, in its order; `raw` is the decompression
/// buffer (kept from chunk to chunk).
fn decode_chunk(
    query: &HistoryQuery,
    directory: &Directory,
    data: &[u8],
    raw: &mut Vec<u8>,
) -> Decoded {
    let damaged = |e: &dyn std::fmt::Display| HistoryError::Chunk(e.to_string());
    let (size, compressed) = lz4_flex::block::uncompressed_size(data).map_err(|e| damaged(&e))?;
    if size > MAX_CHUNK_BYTES {
        return Err(HistoryError::Chunk(format!(
            "it claims {size} bytes, more than a chunk holds"
        )));
    }
    raw.resize(size, 0);
    let n = lz4_flex::block::decompress_into(compressed, raw).map_err(|e| damaged(&e))?;
    let mut buf = &raw[..n];
    let mut out = Vec::new();
    let until = query.until_unix_nanos.unwrap_or(u64::MAX);
    while !buf.is_empty() {
        let mut stored =
            pb::StoredFlow::decode_length_delimited(&mut buf).map_err(|e| damaged(&e))?;
        let (node, sequence) = (std::mem::take(&mut stored.node), stored.sequence);
        let entry = stored.into_entry().map_err(|e| damaged(&e))?;
        if entry.time_unix_nanos() > until || !query.filter.matches(directory, &entry) {
            continue;
        }
        out.push(HistoryRecord {
            node,
            sequence,
            entry,
        });
    }
    if query.newest_first {
        out.reverse();
    }
    Ok(out)
}

impl Iterator for HistoryIter {
    type Item = Result<HistoryRecord, HistoryError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(r) = self.ready.next() {
                return Some(Ok(r));
            }
            if self.done {
                return None;
            }
            // The decoders' results in the turn the reader handed them the chunks; the first
            // decoder with nothing more means there are no more chunks.
            let next = self.decoded[self.turn].recv();
            self.turn = (self.turn + 1) % self.decoded.len();
            match next {
                Ok(Ok(records)) => self.ready = records.into_iter(),
                Ok(Err(e)) => return Some(Err(e)),
                Err(mpsc::RecvError) => {
                    self.done = true;
                    return None;
                }
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

mod index;

#[cfg(test)]
mod tests;
