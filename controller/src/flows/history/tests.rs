//! The flow history: written, reopened, queried, retained, refused when unusable.

use std::{
    os::unix::fs::PermissionsExt,
    sync::{Arc, Mutex},
};

use super::*;
use crate::{
    distribution::FlowStore,
    flows::{FlowPipeline, ServiceGraph},
    ruleset::{
        Direction, Endpoint, FlowKind, FlowReason, FlowRecord, FlowRule, FlowVerdict,
        QuarantineAction, QuarantineEvent, RuleSet,
    },
};

const HOUR: u64 = 3600 * 1_000_000_000;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "bulkhead-history-{name}-{}-{}",
            std::process::id(),
            now_unix_nanos()
        ));
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn endpoint(id: u32, ns: &str, pod: &str, workload: Option<&str>, ip: &str) -> Endpoint {
    Endpoint {
        id,
        namespace: ns.into(),
        pod: pod.into(),
        workload: workload.map(str::to_string),
        identity: 300 + id,
        ips: vec![ip.parse().expect("ip")],
        interface: None,
        quarantined: false,
        policy: 300 + id,
    }
}

fn directory() -> Directory {
    Directory::from_rulesets([&RuleSet {
        node: "n1".into(),
        endpoints: vec![
            endpoint(1, "shop", "web-0", Some("Deployment/web"), "10.0.0.1"),
            endpoint(2, "shop", "api-0", Some("Deployment/api"), "10.0.0.2"),
            endpoint(3, "tools", "debug", None, "10.0.0.3"),
        ],
        ..Default::default()
    }])
}

/// A record reported by `endpoint` at `t`: ingress from `src`.
fn record(endpoint: &str, src: &str, dst: &str, verdict: FlowVerdict, t: u64) -> FlowRecord {
    FlowRecord {
        time_unix_nanos: t,
        endpoint: endpoint.parse().expect("endpoint"),
        direction: Direction::Ingress,
        src: src.parse().expect("ip"),
        dst: dst.parse().expect("ip"),
        src_port: 40000 + (t % 20000) as u16,
        dst_port: 80,
        protocol: 6,
        kind: FlowKind::New,
        verdict,
        rule: FlowRule::DefaultAllow,
        rule_id: 0,
        local_identity: 0,
        peer_identity: 0,
        peer: None,
        reason: FlowReason::AllowedNew,
        packets: 1,
        bytes: 60,
        peer_names: Vec::new(),
        staged: None,
    }
}

fn pipeline(history: &Arc<FlowHistory>, dir: Directory) -> FlowPipeline {
    FlowPipeline::with_directory(
        Arc::new(Mutex::new(
            FlowStore::new(1000).with_history(history.clone()),
        )),
        Arc::new(Mutex::new(ServiceGraph::default())),
        dir,
    )
}

fn all(h: &FlowHistory, query: HistoryQuery) -> Vec<HistoryRecord> {
    h.query(query)
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("records")
}

fn times(records: &[HistoryRecord]) -> Vec<u64> {
    records.iter().map(|r| r.entry.time_unix_nanos()).collect()
}

fn in_range(since: u64, until: Option<u64>) -> HistoryQuery {
    HistoryQuery {
        filter: FlowFilter {
            since_unix_nanos: since,
            ..FlowFilter::default()
        },
        until_unix_nanos: until,
        newest_first: false,
    }
}

#[test]
fn records_survive_a_restart_and_are_found_by_time_and_filters() {
    let tmp = TempDir::new("restart");
    let now = now_unix_nanos();
    let t = |hours_ago: u64| now - hours_ago * HOUR;
    let history = Arc::new(FlowHistory::open(HistoryConfig::new(&tmp.0)).expect("open"));
    let before = pipeline(&history, directory());
    // tools/debug (10.0.0.3, on another node: the agent does not name it) probes shop/api-0
    // over 30 hours; shop/web-0 talks to shop/api-0 meanwhile.
    let mut expected_debug = Vec::new();
    for h in (0..30).rev() {
        let probe = record(
            "shop/api-0",
            "10.0.0.3",
            "10.0.0.2",
            FlowVerdict::Denied,
            t(h) + 1,
        );
        let web = record(
            "shop/api-0",
            "10.0.0.1",
            "10.0.0.2",
            FlowVerdict::Allowed,
            t(h) + 2,
        );
        expected_debug.push(t(h) + 1);
        before
            .ingest("n1", vec![(&probe).into(), (&web).into()], 0)
            .expect("ingest");
    }
    let quarantined_at = t(0) + 3;
    before.store().lock().expect("store").push(
        "controller",
        FlowEntry::Quarantine(QuarantineEvent {
            time_unix_nanos: quarantined_at,
            pod: "tools/debug".parse().expect("pod"),
            action: QuarantineAction::Quarantine,
            quarantine: "debug".into(),
            reason: "port scan".into(),
            actor: "test".into(),
        }),
    );
    history.flush().expect("flush");
    assert_eq!(history.stats().written, 61);
    let graph_before = before.graph().lock().expect("graph").to_json();
    // The history names the peers the agents could not, as the API does when it shows them.
    let named = directory();
    let store_before: Vec<(String, FlowEntry)> = before
        .store()
        .lock()
        .expect("store")
        .recent(1000)
        .into_iter()
        .map(|(n, mut e)| {
            named.name_peer_of(&mut e);
            (n, e)
        })
        .collect();
    assert_eq!(before.graph().lock().expect("graph").len(), (3, 2));

    // The controller stops: the store, the graph and the history go; the files stay.
    drop(before);
    drop(Arc::into_inner(history).expect("the only handle"));

    let history = Arc::new(FlowHistory::open(HistoryConfig::new(&tmp.0)).expect("reopen"));
    let after = pipeline(&history, directory());
    let (folded, restored) = after.restore_from(&history, 0).expect("restore");
    assert_eq!((folded, restored), (60, 61));
    assert_eq!(
        String::from_utf8_lossy(&after.graph().lock().expect("graph").to_json()),
        String::from_utf8_lossy(&graph_before),
        "the graph is rebuilt as it was"
    );
    assert_eq!(
        after.store().lock().expect("store").recent(1000),
        store_before,
        "the recent flows are back, in order"
    );
    // Read back, they are not written again.
    history.flush().expect("flush");
    assert_eq!(history.stats().written, 0);

    // The last 24 hours, oldest first; newest first is the same reversed.
    let day = all(&history, in_range(t(24), None));
    assert_eq!(
        day.len(),
        2 * 25 + 1,
        "hours 24..0, two records each, and the quarantine"
    );
    let mut sorted = times(&day);
    sorted.sort_unstable();
    assert_eq!(times(&day), sorted);
    let mut newest = all(
        &history,
        HistoryQuery {
            newest_first: true,
            ..in_range(t(24), None)
        },
    );
    newest.reverse();
    assert_eq!(newest, day);

    // Forensics: what tools/debug did in the 24 hours before its quarantine, with no
    // directory to name it (its pod is gone): the history named it when it was written.
    let empty = Directory::default();
    let debug = all(
        &history,
        HistoryQuery {
            filter: FlowFilter {
                pod: Some("tools/debug".into()),
                since_unix_nanos: quarantined_at - 24 * HOUR,
                ..FlowFilter::default()
            },
            until_unix_nanos: Some(quarantined_at),
            newest_first: false,
        },
    );
    let want: Vec<u64> = expected_debug
        .iter()
        .copied()
        .filter(|&x| x >= quarantined_at - 24 * HOUR)
        .chain([quarantined_at])
        .collect();
    assert_eq!(times(&debug), want);
    for r in &debug {
        assert!(
            FlowFilter {
                pod: Some("tools/debug".into()),
                ..FlowFilter::default()
            }
            .matches(&empty, &r.entry)
        );
    }
    // Verdict and namespace filters, and a range that ends before the newest hour.
    let denied = all(
        &history,
        HistoryQuery {
            filter: FlowFilter {
                verdict: Some("denied".into()),
                namespace: Some("shop".into()),
                since_unix_nanos: t(10),
                ..FlowFilter::default()
            },
            until_unix_nanos: Some(t(5) + 1),
            newest_first: false,
        },
    );
    assert_eq!(
        times(&denied),
        (5..=10).rev().map(|h| t(h) + 1).collect::<Vec<_>>()
    );
    assert!(
        denied
            .iter()
            .all(|r| r.node == "n1" && r.entry.verdict_str() == "denied")
    );
}

#[test]
fn retention_drops_records_older_than_the_maximum_age_and_counts_them() {
    let tmp = TempDir::new("age");
    let now = now_unix_nanos();
    let history = Arc::new(FlowHistory::open(HistoryConfig::new(&tmp.0)).expect("open"));
    let node: Arc<str> = Arc::from("n1");
    let entry = |t| {
        Arc::new(FlowEntry::Flow(record(
            "shop/api-0",
            "10.0.0.1",
            "10.0.0.2",
            FlowVerdict::Allowed,
            t,
        )))
    };
    // Eight days ago (one chunk), then now (another).
    history.offer(
        node.clone(),
        0,
        (0..5).map(|i| entry(now - 8 * 24 * HOUR + i)).collect(),
        None,
    );
    history.flush().expect("flush");
    history.offer(node, 5, (0..3).map(|i| entry(now + i)).collect(), None);
    history.flush().expect("flush");
    let stats = history.stats();
    assert_eq!((stats.written, stats.expired_age), (8, 5), "{stats:?}");
    assert_eq!(
        times(&all(&history, in_range(0, None))),
        [now, now + 1, now + 2]
    );
}

#[test]
fn retention_keeps_the_store_within_its_size_dropping_the_oldest_first() {
    let tmp = TempDir::new("size");
    let max_bytes = 256 << 10;
    let history = FlowHistory::open(HistoryConfig {
        max_bytes,
        ..HistoryConfig::new(&tmp.0)
    })
    .expect("open");
    let now = now_unix_nanos();
    let node: Arc<str> = Arc::from("n1");
    let mut written = 0u64;
    // Varied records (addresses, ports, pods) so that compression leaves them sizeable.
    for chunk in 0..40u64 {
        let entries: Vec<Arc<FlowEntry>> = (0..1000u64)
            .map(|i| {
                let n = chunk * 1000 + i;
                let mut r = record(
                    &format!("ns-{}/pod-{}", n % 97, n.wrapping_mul(2654435761) % 100_003),
                    &format!("10.{}.{}.{}", n % 251, (n / 251) % 251, n % 13),
                    "10.0.0.2",
                    FlowVerdict::Allowed,
                    now - HOUR + n,
                );
                r.src_port = (n.wrapping_mul(40503) % 65536) as u16;
                r.bytes = n.wrapping_mul(2654435761);
                Arc::new(FlowEntry::Flow(r))
            })
            .collect();
        written += entries.len() as u64;
        history.offer(node.clone(), written, entries, None);
        history.flush().expect("flush");
    }
    let stats = history.stats();
    assert_eq!(stats.written, written);
    assert!(stats.expired_size > 0, "{stats:?}");
    assert!(stats.bytes <= max_bytes, "{stats:?}");
    let file = fs::metadata(tmp.0.join(DATABASE_FILE)).expect("file").len();
    assert!(
        file <= max_bytes + (64 << 10),
        "the file shrinks with retention: {file} bytes"
    );
    let left = all(&history, in_range(0, None));
    assert_eq!(left.len() as u64 + stats.expired_size, written);
    // What is left is the newest, without a gap.
    let first = now - HOUR + stats.expired_size;
    assert_eq!(
        times(&left),
        (first..now - HOUR + written).collect::<Vec<_>>()
    );
}

#[test]
fn a_writer_that_falls_behind_drops_from_the_history_not_from_memory() {
    let tmp = TempDir::new("backlog");
    let history = Arc::new(
        FlowHistory::open(HistoryConfig {
            queue_batches: 2,
            ..HistoryConfig::new(&tmp.0)
        })
        .expect("open"),
    );
    let p = pipeline(&history, directory());
    let now = now_unix_nanos();
    let release = history.pause();
    for i in 0..5 {
        let r = record(
            "shop/api-0",
            "10.0.0.1",
            "10.0.0.2",
            FlowVerdict::Allowed,
            now + i,
        );
        p.ingest("n1", vec![(&r).into(), (&r).into()], 0)
            .expect("ingest never waits for the disk");
    }
    drop(release);
    history.flush().expect("flush");
    let stats = history.stats();
    assert_eq!(
        (stats.written, stats.dropped_backlog),
        (4, 6),
        "two batches queued, three dropped: {stats:?}"
    );
    assert_eq!(p.store().lock().expect("store").len(), 10);
    assert_eq!(p.graph().lock().expect("graph").records(), 10);
}

#[test]
fn the_store_is_the_controllers_alone() {
    let tmp = TempDir::new("modes");
    let dir = tmp.0.join("history");
    let history = FlowHistory::open(HistoryConfig::new(&dir)).expect("open");
    let mode = |p: &Path| fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(history.path()), 0o600);
    drop(history);
    // A file left with wider permissions is narrowed at the next start.
    fs::set_permissions(dir.join(DATABASE_FILE), fs::Permissions::from_mode(0o644)).expect("chmod");
    let history = FlowHistory::open(HistoryConfig::new(&dir)).expect("reopen");
    assert_eq!(mode(history.path()), 0o600);
}

#[test]
fn a_damaged_or_unusable_store_is_refused_at_start_with_what_to_do() {
    let tmp = TempDir::new("damaged");
    fs::create_dir_all(&tmp.0).expect("dir");
    fs::write(
        tmp.0.join(DATABASE_FILE),
        "this is not a database, but a file someone put here ".repeat(100),
    )
    .expect("write");
    let e = FlowHistory::open(HistoryConfig::new(&tmp.0)).expect_err("damaged");
    assert!(matches!(e, HistoryError::Damaged { .. }), "{e:?}");
    assert!(e.to_string().contains("move it away"), "{e}");

    // A directory that cannot be made (a file is in the way).
    let e = FlowHistory::open(HistoryConfig::new(tmp.0.join(DATABASE_FILE).join("sub")))
        .expect_err("not a directory");
    assert!(matches!(e, HistoryError::Directory { .. }), "{e:?}");
    assert!(
        e.to_string().contains("cannot create or use the directory"),
        "{e}"
    );

    // A history written by a newer controller.
    let newer = TempDir::new("newer");
    drop(FlowHistory::open(HistoryConfig::new(&newer.0)).expect("open"));
    Connection::open(newer.0.join(DATABASE_FILE))
        .and_then(|c| c.pragma_update(None, "user_version", FORMAT + 1))
        .expect("bump the format");
    let e = FlowHistory::open(HistoryConfig::new(&newer.0)).expect_err("newer");
    assert!(matches!(e, HistoryError::NewerFormat { .. }), "{e:?}");
}

#[test]
fn a_damaged_chunk_is_an_error_and_the_rest_is_read() {
    let tmp = TempDir::new("chunk");
    let now = now_unix_nanos();
    let history = FlowHistory::open(HistoryConfig::new(&tmp.0)).expect("open");
    let node: Arc<str> = Arc::from("n1");
    for i in 0..3 {
        let r = record(
            "shop/api-0",
            "10.0.0.1",
            "10.0.0.2",
            FlowVerdict::Allowed,
            now + i,
        );
        history.offer(node.clone(), i, vec![Arc::new(FlowEntry::Flow(r))], None);
        history.flush().expect("flush");
    }
    Connection::open(history.path())
        .and_then(|c| c.execute("UPDATE chunks SET data = x'00ff00ff' WHERE id = 2", []))
        .expect("damage a chunk");
    let read: Vec<Result<HistoryRecord, HistoryError>> =
        history.query(in_range(0, None)).expect("query").collect();
    assert_eq!(read.len(), 3);
    assert!(
        matches!(read[1], Err(HistoryError::Chunk(_))),
        "{:?}",
        read[1]
    );
    let ok: Vec<u64> = read
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|r| r.entry.time_unix_nanos())
        .collect();
    assert_eq!(ok, [now, now + 2]);
    // At start the damaged chunk is skipped: the rest is read back.
    let history = Arc::new(history);
    let p = pipeline(&history, directory());
    assert_eq!(p.restore_from(&history, 0).expect("restore"), (2, 2));
}

/// Writes one chunk per call (a flush closes it), with peers named by the writer's directory.
fn write_chunk(h: &FlowHistory, first: u64, entries: Vec<FlowEntry>) {
    h.offer(
        Arc::from("n1"),
        first,
        entries.into_iter().map(Arc::new).collect(),
        Some(Arc::new(directory())),
    );
    h.flush().expect("flush");
}

/// Twelve chunks of shop traffic (web-0 → api-0, named at both ends); tools/debug (10.0.0.3,
/// which no agent names: the writer's directory does) reports an egress in chunk 3, is the
/// peer of a denied probe in chunk 8 and is quarantined in chunk 10; an endpoint its agent could
/// not name reports in chunk 5.
fn forensic_store(h: &FlowHistory, t0: u64) -> u64 {
    let mut sequence = 0;
    for c in 0..12u64 {
        let t = t0 + c * 1000;
        let mut entries = Vec::new();
        for i in 0..50 {
            let mut web = record(
                "shop/api-0",
                "10.0.0.1",
                "10.0.0.2",
                FlowVerdict::Allowed,
                t + i,
            );
            web.peer = Some("shop/web-0".parse().expect("pod"));
            entries.push(FlowEntry::Flow(web));
        }
        match c {
            3 => {
                let mut out = record(
                    "tools/debug",
                    "10.0.0.3",
                    "10.0.0.2",
                    FlowVerdict::Allowed,
                    t + 60,
                );
                out.direction = Direction::Egress;
                entries.push(FlowEntry::Flow(out));
            }
            8 => entries.push(FlowEntry::Flow(record(
                "shop/api-0",
                "10.0.0.3",
                "10.0.0.2",
                FlowVerdict::Denied,
                t + 60,
            ))),
            5 => entries.push(FlowEntry::Flow(record(
                "endpoint#7",
                "10.9.9.9",
                "10.0.0.2",
                FlowVerdict::Allowed,
                t + 60,
            ))),
            10 => entries.push(FlowEntry::Quarantine(QuarantineEvent {
                time_unix_nanos: t + 60,
                pod: "tools/debug".parse().expect("pod"),
                action: QuarantineAction::Quarantine,
                quarantine: "debug".into(),
                reason: "port scan".into(),
                actor: "test".into(),
            })),
            _ => {}
        }
        let n = entries.len() as u64;
        write_chunk(h, sequence, entries);
        sequence += n;
    }
    sequence
}

/// A query's records and what it read.
fn read(h: &FlowHistory, query: HistoryQuery) -> (Vec<HistoryRecord>, QueryStats) {
    let mut it = h.query(query).expect("query");
    let records = it.by_ref().collect::<Result<_, _>>().expect("records");
    (records, it.stats())
}

/// Every record in the range, filtered one by one (what a query did before the index).
fn full_scan(h: &FlowHistory, query: &HistoryQuery) -> Vec<HistoryRecord> {
    let mut all = all(
        h,
        HistoryQuery {
            filter: FlowFilter {
                since_unix_nanos: query.filter.since_unix_nanos,
                ..FlowFilter::default()
            },
            until_unix_nanos: query.until_unix_nanos,
            newest_first: false,
        },
    );
    all.retain(|r| query.filter.matches(&Directory::default(), &r.entry));
    if query.newest_first {
        all.reverse();
    }
    all
}

fn of_pod(pod: Option<&str>, namespace: Option<&str>, newest_first: bool) -> HistoryQuery {
    HistoryQuery {
        filter: FlowFilter {
            pod: pod.map(str::to_string),
            namespace: namespace.map(str::to_string),
            ..FlowFilter::default()
        },
        until_unix_nanos: None,
        newest_first,
    }
}

#[test]
fn a_pod_query_reads_only_the_chunks_that_name_the_pod_and_answers_as_a_full_scan() {
    let tmp = TempDir::new("index");
    let history = FlowHistory::open(HistoryConfig::new(&tmp.0)).expect("open");
    let t0 = now_unix_nanos() - HOUR;
    let written = forensic_store(&history, t0);
    assert_eq!(history.stats().chunks_written, 12);

    // (pod, namespace, the chunks that hold its records, records)
    let cases: [(Option<&str>, Option<&str>, u64, usize); 8] = [
        // As the reporting endpoint (egress), as the named peer (ingress), and quarantined.
        (Some("tools/debug"), None, 3, 3),
        (None, Some("tools"), 3, 3),
        (Some("tools/debug"), Some("tools"), 3, 3),
        // Both must be named in a chunk, not in one record: the quarantine's chunk holds shop
        // traffic too, so it is read, and its quarantine action (of tools) does not match.
        (Some("tools/debug"), Some("shop"), 3, 2),
        (Some("endpoint#7"), None, 1, 1),
        // In every chunk: the index cannot help, and does not hide anything.
        (Some("shop/web-0"), None, 12, 600),
        // Named nowhere: nothing read.
        (Some("shop/gone"), None, 0, 0),
        (None, Some("tools-other"), 0, 0),
    ];
    for (pod, namespace, chunks, n) in cases {
        for newest_first in [false, true] {
            let query = of_pod(pod, namespace, newest_first);
            let (got, stats) = read(&history, query.clone());
            let want = full_scan(&history, &query);
            assert_eq!(got, want, "{query:?}");
            assert_eq!(got.len(), n, "{query:?}");
            assert_eq!(
                stats,
                QueryStats {
                    chunks_in_range: 12,
                    chunks_skipped: 12 - chunks,
                    chunks_decoded: chunks,
                },
                "{query:?}"
            );
        }
    }
    // The forensics query over a time range: what tools/debug did before its quarantine.
    let query = HistoryQuery {
        until_unix_nanos: Some(t0 + 10 * 1000 + 60),
        ..of_pod(Some("tools/debug"), None, false)
    };
    let (got, _) = read(&history, query.clone());
    assert_eq!(got, full_scan(&history, &query));
    assert_eq!(
        times(&got),
        [t0 + 3 * 1000 + 60, t0 + 8 * 1000 + 60, t0 + 10 * 1000 + 60]
    );
    // Without a pod or namespace every chunk is decoded, as before.
    let (everything, stats) = read(&history, in_range(0, None));
    assert_eq!(everything.len() as u64, written);
    assert_eq!((stats.chunks_decoded, stats.chunks_skipped), (12, 0));
}

#[test]
fn an_old_store_without_the_index_is_read_in_full_and_indexed_from_then_on() {
    let tmp = TempDir::new("format1");
    let t0 = now_unix_nanos() - HOUR;
    let history = FlowHistory::open(HistoryConfig::new(&tmp.0)).expect("open");
    forensic_store(&history, t0);
    drop(history);
    // What a format-1 controller left: the chunks alone.
    Connection::open(tmp.0.join(DATABASE_FILE))
        .and_then(|c| c.execute_batch("DROP TABLE chunk_filters; PRAGMA user_version = 1;"))
        .expect("make it format 1");

    let history = FlowHistory::open(HistoryConfig::new(&tmp.0)).expect("reopen");
    let format: i64 = Connection::open(history.path())
        .and_then(|c| c.pragma_query_value(None, "user_version", |r| r.get(0)))
        .expect("format");
    assert_eq!(format, FORMAT);
    let query = of_pod(Some("tools/debug"), None, false);
    let (got, stats) = read(&history, query.clone());
    assert_eq!(got.len(), 3);
    assert_eq!(got, full_scan(&history, &query));
    assert_eq!(
        (stats.chunks_decoded, stats.chunks_skipped),
        (12, 0),
        "chunks without a filter may hold anything"
    );
    // Chunks written now have filters: one without tools/debug is skipped.
    let mut web = record(
        "shop/api-0",
        "10.0.0.1",
        "10.0.0.2",
        FlowVerdict::Allowed,
        t0 + 20_000,
    );
    web.peer = Some("shop/web-0".parse().expect("pod"));
    write_chunk(&history, 1000, vec![FlowEntry::Flow(web)]);
    let probe = record(
        "shop/api-0",
        "10.0.0.3",
        "10.0.0.2",
        FlowVerdict::Denied,
        t0 + 21_000,
    );
    write_chunk(&history, 1001, vec![FlowEntry::Flow(probe)]);
    for newest_first in [false, true] {
        let query = of_pod(Some("tools/debug"), None, newest_first);
        let (got, stats) = read(&history, query.clone());
        assert_eq!(got.len(), 4);
        assert_eq!(got, full_scan(&history, &query));
        assert_eq!(
            stats,
            QueryStats {
                chunks_in_range: 14,
                chunks_skipped: 1,
                chunks_decoded: 13
            }
        );
    }
}

/// Chunks and filters in the store, and filters without their chunk.
fn filter_rows(path: &Path) -> (i64, i64, i64) {
    let c = Connection::open(path).expect("open");
    let count = |sql: &str| c.query_row(sql, [], |r| r.get::<_, i64>(0)).expect(sql);
    (
        count("SELECT count(*) FROM chunks"),
        count("SELECT count(*) FROM chunk_filters"),
        count("SELECT count(*) FROM chunk_filters WHERE chunk NOT IN (SELECT id FROM chunks)"),
    )
}

#[test]
fn retention_drops_the_filters_with_their_chunks() {
    // By age.
    let tmp = TempDir::new("age-index");
    let now = now_unix_nanos();
    let history = FlowHistory::open(HistoryConfig::new(&tmp.0)).expect("open");
    let probe = |t| {
        FlowEntry::Flow(record(
            "shop/api-0",
            "10.0.0.3",
            "10.0.0.2",
            FlowVerdict::Denied,
            t,
        ))
    };
    write_chunk(&history, 0, vec![probe(now - 8 * 24 * HOUR)]);
    write_chunk(&history, 1, vec![probe(now - 9 * 24 * HOUR)]);
    write_chunk(&history, 2, vec![probe(now)]);
    assert_eq!(history.stats().expired_age, 2);
    assert_eq!(filter_rows(history.path()), (1, 1, 0));
    let (got, stats) = read(&history, of_pod(Some("tools/debug"), None, false));
    assert_eq!((got.len(), stats.chunks_in_range), (1, 1));
    drop(history);

    // By size: many chunks of many pods (large filters), dropped oldest first; what is in use
    // (chunks, filters, tables) stays within the limit.
    let tmp = TempDir::new("size-index");
    let max_bytes = 256 << 10;
    let history = FlowHistory::open(HistoryConfig {
        max_bytes,
        ..HistoryConfig::new(&tmp.0)
    })
    .expect("open");
    for chunk in 0..40u64 {
        let entries = (0..1000u64)
            .map(|i| {
                let n = chunk * 1000 + i;
                let mut r = record(
                    &format!("ns-{}/pod-{}", n % 97, n.wrapping_mul(2654435761) % 100_003),
                    &format!("10.{}.{}.{}", n % 251, (n / 251) % 251, n % 13),
                    "10.0.0.2",
                    FlowVerdict::Allowed,
                    now - HOUR + n,
                );
                r.src_port = (n.wrapping_mul(40503) % 65536) as u16;
                r.bytes = n.wrapping_mul(2654435761);
                FlowEntry::Flow(r)
            })
            .collect();
        write_chunk(&history, chunk * 1000, entries);
    }
    let stats = history.stats();
    assert!(stats.expired_size > 0, "{stats:?}");
    assert!(stats.bytes <= max_bytes, "{stats:?}");
    let (chunks, filters, orphans) = filter_rows(history.path());
    assert!(chunks > 0 && chunks < 40, "{chunks} chunks");
    assert_eq!((filters, orphans), (chunks, 0));
    // The size counted is the pages in use, filters included.
    let c = Connection::open(history.path()).expect("open");
    assert_eq!(stats.bytes, used_bytes(&c).expect("used"));
    let filter_bytes: i64 = c
        .query_row("SELECT sum(length(filter)) FROM chunk_filters", [], |r| {
            r.get(0)
        })
        .expect("filter bytes");
    assert!(filter_bytes > 0);
}

/// The DNS names of world peers are kept with their records and found by `peer_name`; a chunk
/// written before records had names (no field 30 in its messages) reads back with none.
#[test]
fn peer_names_survive_the_history_and_old_chunks_read_without_them() {
    use bulkhead_proto::v1 as pb;
    let tmp = TempDir::new("peer-names");
    let now = now_unix_nanos();
    let history = FlowHistory::open(HistoryConfig::new(&tmp.0)).expect("open");
    let name = |s: &str| crate::ruleset::NamePattern::parse(s).expect("name");
    let mut named = record(
        "shop/api-0",
        "10.0.0.2",
        "203.0.113.7",
        FlowVerdict::Denied,
        now + 1,
    );
    named.direction = Direction::Egress;
    named.peer_names = vec![name("api.example.com"), name("*.example.com")];
    write_chunk(&history, 0, vec![FlowEntry::Flow(named.clone())]);

    // A chunk as a controller before names wrote it: the same run of length-delimited
    // messages, LZ4-compressed, without a filter row (as the oldest format had none).
    let old = record(
        "shop/api-0",
        "10.0.0.1",
        "10.0.0.2",
        FlowVerdict::Allowed,
        now + 2,
    );
    let stored = pb::StoredFlow {
        node: "n1".into(),
        entry: Some((&FlowEntry::Flow(old.clone())).into()),
        sequence: 9,
    };
    let mut raw = Vec::new();
    stored
        .encode_length_delimited(&mut raw)
        .expect("encode into a Vec");
    // Field 30 (length-delimited) would begin with the key 0xf2 0x01: absent, as before names.
    assert!(!raw.windows(2).any(|w| w == [0xf2, 0x01]), "{raw:x?}");
    Connection::open(history.path())
        .and_then(|c| {
            c.execute(
                "INSERT INTO chunks (min_time, max_time, records, data) VALUES (?1, ?2, 1, ?3)",
                params![
                    to_sql_time(now + 2),
                    to_sql_time(now + 2),
                    lz4_flex::compress_prepend_size(&raw)
                ],
            )
        })
        .expect("write an old chunk");

    let got = all(&history, in_range(0, None));
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].entry, FlowEntry::Flow(named.clone()));
    assert_eq!(got[1].entry, FlowEntry::Flow(old));
    match &got[1].entry {
        FlowEntry::Flow(r) => assert!(r.peer_names.is_empty()),
        other => panic!("{other:?}"),
    }
    // The history answers `peer_name` queries.
    let by_name = |n: &str| {
        all(
            &history,
            HistoryQuery {
                filter: FlowFilter {
                    peer_name: Some(name(n)),
                    ..FlowFilter::default()
                },
                until_unix_nanos: None,
                newest_first: false,
            },
        )
    };
    assert_eq!(by_name("api.example.com").len(), 1);
    assert_eq!(by_name("*.example.com").len(), 1);
    assert!(by_name("other.example.org").is_empty());
}

/// A peer cluster's pod west/shop/web-0 (10.9.0.1, Deployment/web) beside the local pods of
/// [`directory`].
fn directory_with_a_peer_cluster() -> Directory {
    let remote = crate::Pod {
        namespace: "west/shop".into(),
        name: "web-0".into(),
        labels: Default::default(),
        service_account: "default".into(),
        node_name: None,
        ips: vec!["10.9.0.1".parse().expect("ip")],
        synthetic_ips: false,
        ports: Vec::new(),
        workload: Some("Deployment/web".into()),
        host_network: false,
    };
    let local = [
        endpoint(1, "shop", "web-0", Some("Deployment/web"), "10.0.0.1"),
        endpoint(2, "shop", "api-0", Some("Deployment/api"), "10.0.0.2"),
    ];
    Directory::from_inventory(&local, &[remote])
}

/// Flows from a peer cluster's pod are written with that pod named (`west/shop/web-0`) and read
/// back so after a restart, found by its qualified namespace, its pod and its cluster; the
/// restored graph draws it while the pod is still known.
#[test]
fn remote_peers_are_named_in_the_history_and_found_by_cluster() {
    let tmp = TempDir::new("remote");
    let now = now_unix_nanos();
    let history = Arc::new(FlowHistory::open(HistoryConfig::new(&tmp.0)).expect("open"));
    let before = pipeline(&history, directory_with_a_peer_cluster());
    let remote = record(
        "shop/api-0",
        "10.9.0.1",
        "10.0.0.2",
        FlowVerdict::Allowed,
        now - 2,
    );
    let local = record(
        "shop/api-0",
        "10.0.0.1",
        "10.0.0.2",
        FlowVerdict::Allowed,
        now - 1,
    );
    before
        .ingest("n1", vec![(&remote).into(), (&local).into()], 0)
        .expect("ingest");
    history.flush().expect("flush");
    drop(before);
    drop(Arc::into_inner(history).expect("the only handle"));

    let history = Arc::new(FlowHistory::open(HistoryConfig::new(&tmp.0)).expect("reopen"));
    let peers = |filter: FlowFilter| -> Vec<String> {
        all(
            &history,
            HistoryQuery {
                filter,
                until_unix_nanos: None,
                newest_first: false,
            },
        )
        .into_iter()
        .map(|r| match r.entry {
            FlowEntry::Flow(f) => f.peer.map(|p| p.to_string()).unwrap_or_default(),
            FlowEntry::Quarantine(q) => q.pod.to_string(),
        })
        .collect()
    };
    assert_eq!(
        peers(FlowFilter::default()),
        ["west/shop/web-0", "shop/web-0"]
    );
    let west = || FlowFilter {
        cluster: Some("west".into()),
        ..FlowFilter::default()
    };
    assert_eq!(peers(west()), ["west/shop/web-0"]);
    assert!(
        peers(FlowFilter {
            cluster: Some("east".into()),
            ..FlowFilter::default()
        })
        .is_empty()
    );
    assert_eq!(
        peers(FlowFilter {
            namespace: Some("west/shop".into()),
            ..FlowFilter::default()
        }),
        ["west/shop/web-0"]
    );
    assert_eq!(
        peers(FlowFilter {
            pod: Some("west/shop/web-0".into()),
            ..FlowFilter::default()
        }),
        ["west/shop/web-0"]
    );
    // The local namespace `shop` is not the peer cluster's `west/shop`.
    assert_eq!(
        peers(FlowFilter {
            namespace: Some("shop".into()),
            ..FlowFilter {
                pod: Some("shop/web-0".into()),
                ..FlowFilter::default()
            }
        }),
        ["shop/web-0"]
    );

    let after = pipeline(&history, directory_with_a_peer_cluster());
    after.restore_from(&history, 0).expect("restore");
    let graph = after.graph().lock().expect("graph").graph();
    let node = graph
        .nodes
        .iter()
        .find(|n| n.id == "west/shop/Deployment/web")
        .unwrap_or_else(|| panic!("no remote node in {:?}", graph.nodes));
    assert_eq!(node.cluster.as_ref().map(|c| c.as_str()), Some("west"));
    // The filter round-trips through the admin API's message.
    assert_eq!(FlowFilter::from_proto(Some(&west().to_proto())), west());
}
