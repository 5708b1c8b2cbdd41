//! The flow records the controller keeps in memory (and hands to the history).

use std::{collections::VecDeque, sync::Arc};

use bulkhead_proto::v1 as pb;
use tokio::sync::watch;

use crate::{
    flows::{Directory, history::FlowHistory},
    ruleset::{FlowEntry, FlowRecord},
};

/// Flow records the controller keeps, and the quarantine actions it records among them (oldest
/// evicted first, evictions counted).
///
/// Every record has a sequence number (the count of records accepted before it), so a reader
/// can resume where it left off and knows how many it missed when the store moved past it.
#[derive(Debug)]
pub struct FlowStore {
    capacity: usize,
    /// Shared with the history's writer (which would otherwise need a copy of each).
    records: VecDeque<(Arc<str>, Arc<FlowEntry>)>,
    pub accepted: u64,
    pub evicted: u64,
    /// Records agents reported as dropped on their side.
    pub dropped_by_agents: u64,
    /// Says `accepted` to watchers whenever records arrive.
    arrivals: watch::Sender<u64>,
    /// Where every accepted record is also kept on disk, when on.
    history: Option<Arc<FlowHistory>>,
    /// Names peers the agents could not, for the history and for the questions that read the
    /// records in memory (the pipeline's latest).
    directory: Option<Arc<Directory>>,
}

impl FlowStore {
    pub fn new(capacity: usize) -> FlowStore {
        FlowStore {
            capacity: capacity.max(1),
            records: VecDeque::new(),
            accepted: 0,
            evicted: 0,
            dropped_by_agents: 0,
            arrivals: watch::Sender::new(0),
            history: None,
            directory: None,
        }
    }

    /// Also keeps every record pushed from now on in `history` (handed to its writer; never
    /// waits for the disk).
    pub fn with_history(mut self, history: Arc<FlowHistory>) -> FlowStore {
        self.history = Some(history);
        self
    }

    pub fn history(&self) -> Option<&Arc<FlowHistory>> {
        self.history.as_ref()
    }

    /// The directory that names the peers agents could not name (the pipeline's latest).
    pub fn directory(&self) -> Option<&Arc<Directory>> {
        self.directory.as_ref()
    }

    /// The directory the history names peers with (the pipeline sets it per batch).
    pub fn set_directory(&mut self, directory: Arc<Directory>) {
        self.directory = Some(directory);
    }

    /// A record read back from the history at start: held like any other, not written again.
    pub fn restore(&mut self, node: &str, e: FlowEntry) {
        self.push_to_memory(Arc::from(node), [e], false);
    }

    pub fn push(&mut self, node: &str, e: FlowEntry) {
        self.push_entries(node, [e]);
    }

    /// Records of one node, in order.
    pub fn push_batch(&mut self, node: &str, records: impl IntoIterator<Item = FlowRecord>) {
        self.push_entries(node, records.into_iter().map(FlowEntry::Flow));
    }

    fn push_entries(&mut self, node: &str, entries: impl IntoIterator<Item = FlowEntry>) {
        self.push_to_memory(Arc::from(node), entries, true);
    }

    fn push_to_memory(
        &mut self,
        node: Arc<str>,
        entries: impl IntoIterator<Item = FlowEntry>,
        to_history: bool,
    ) {
        let first = self.accepted;
        let mut kept = (to_history && self.history.is_some()).then(Vec::new);
        for e in entries {
            let e = Arc::new(e);
            if self.records.len() == self.capacity {
                self.records.pop_front();
                self.evicted += 1;
            }
            self.accepted += 1;
            if let Some(k) = &mut kept {
                k.push(e.clone());
            }
            self.records.push_back((node.clone(), e));
        }
        if let (Some(h), Some(k)) = (&self.history, kept) {
            h.offer(node, first, k, self.directory.clone());
        }
        self.arrivals.send_replace(self.accepted);
    }

    pub fn recent(&self, limit: usize) -> Vec<(String, FlowEntry)> {
        self.records
            .iter()
            .rev()
            .take(limit)
            .map(|(n, r)| (n.to_string(), FlowEntry::clone(r)))
            .collect()
    }

    /// Sequence number of the oldest record held.
    pub fn first_sequence(&self) -> u64 {
        self.accepted - self.records.len() as u64
    }

    /// Records from sequence number `from` on (node, record, sequence), and how many records
    /// from `from` on were already evicted.
    pub fn since(
        &self,
        from: u64,
    ) -> (
        u64,
        impl DoubleEndedIterator<Item = (&str, &FlowEntry, u64)>,
    ) {
        let first = self.first_sequence();
        let missed = first.saturating_sub(from);
        let skip = from.saturating_sub(first).min(self.records.len() as u64) as usize;
        let iter = self
            .records
            .range(skip..)
            .enumerate()
            .map(move |(i, (n, r))| (&**n, &**r, first + (skip + i) as u64));
        (missed, iter)
    }

    /// Wakes up whenever records arrive (carries the `accepted` count).
    pub fn arrivals(&self) -> watch::Receiver<u64> {
        self.arrivals.subscribe()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn stats(&self) -> pb::FlowStoreStats {
        pb::FlowStoreStats {
            accepted: self.accepted,
            stored: self.records.len() as u64,
            evicted: self.evicted,
            dropped_by_agents: self.dropped_by_agents,
            capacity: self.capacity as u64,
        }
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}
