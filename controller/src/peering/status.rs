//! Each peer's state as the importer last saw it: for `bulkhead policy status` (the Admin
//! `PolicyStatus` RPC) and the `bulkhead_controller_peer_*` metrics.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, SystemTime},
};

use bulkhead_ruleset::cluster::ClusterName;

/// Where an importer stands with its peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerState {
    /// Not synced yet since the controller started.
    Connecting,
    /// A snapshot arrived and every message since was applied.
    Synced,
    /// The connection failed or the stream ended; the last inventory stays in force and the
    /// importer reconnects.
    Disconnected,
    /// The peer sent something refused; its last good inventory stays in force and it is
    /// retried later.
    Refused,
}

impl PeerState {
    pub const ALL: [PeerState; 4] = [
        PeerState::Connecting,
        PeerState::Synced,
        PeerState::Disconnected,
        PeerState::Refused,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            PeerState::Connecting => "connecting",
            PeerState::Synced => "synced",
            PeerState::Disconnected => "disconnected",
            PeerState::Refused => "refused",
        }
    }
}

/// One peer's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub name: ClusterName,
    pub address: String,
    pub state: PeerState,
    /// Why the peer is disconnected or refused (empty when synced).
    pub error: String,
    /// When the last snapshot or delta was applied.
    pub last_update: Option<SystemTime>,
    pub pods: u64,
    pub namespaces: u64,
    /// The epoch and version of the last message applied.
    pub epoch: u64,
    pub version: u64,
    /// Snapshots and deltas applied since the controller started.
    pub updates: u64,
}

impl PeerStatus {
    /// How long ago the last update was applied (`None` before the first).
    pub fn age(&self, now: SystemTime) -> Option<Duration> {
        self.last_update
            .map(|t| now.duration_since(t).unwrap_or_default())
    }
}

/// Every configured peer's status, by name.
#[derive(Debug, Default)]
pub struct PeerStates {
    peers: Mutex<BTreeMap<ClusterName, PeerStatus>>,
}

impl PeerStates {
    /// Registers a peer (state connecting).
    pub fn add(&self, name: ClusterName, address: String) {
        if let Ok(mut p) = self.peers.lock() {
            p.insert(
                name.clone(),
                PeerStatus {
                    name,
                    address,
                    state: PeerState::Connecting,
                    error: String::new(),
                    last_update: None,
                    pods: 0,
                    namespaces: 0,
                    epoch: 0,
                    version: 0,
                    updates: 0,
                },
            );
        }
    }

    /// Changes one peer's status (nothing for a peer never added).
    pub fn update(&self, name: &ClusterName, f: impl FnOnce(&mut PeerStatus)) {
        if let Ok(mut p) = self.peers.lock()
            && let Some(s) = p.get_mut(name)
        {
            f(s);
        }
    }

    /// Every peer's status, by name.
    pub fn all(&self) -> Vec<PeerStatus> {
        self.peers
            .lock()
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn get(&self, name: &str) -> Option<PeerStatus> {
        self.peers
            .lock()
            .ok()?
            .values()
            .find(|s| s.name.as_str() == name)
            .cloned()
    }
}
