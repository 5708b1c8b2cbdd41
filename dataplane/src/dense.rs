//! The `IPCACHE_DENSE_V4` array, mapped into the agent's memory.
//!
//! The array holds the identities of single IPv4 addresses of one window (see
//! `bulkhead_common::Config::dense_v4_base`): the programs read a slot with one inlined array
//! access instead of a hash lookup. The agent reads and writes the slots through a shared
//! memory mapping (`BPF_F_MMAPABLE`), so filling a window of a hundred thousand pods, or
//! scanning it for entries an earlier agent left, is a pass over memory, not one system call per
//! address. Each slot is written with one 8-byte atomic store, which the programs read with one
//! 8-byte load: an update is seen whole or not at all.

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::MapData;
use bulkhead_common::{DENSE_V4_SLOTS, IPCACHE_DENSE_PRESENT, IpCacheValue};

/// A live mapping of the pinned array; unmapped on drop.
pub struct DenseIpCache {
    slots: NonNull<AtomicU64>,
    len: usize,
    bytes: usize,
}

// SAFETY: the mapping is plain shared memory accessed only through atomics.
unsafe impl Send for DenseIpCache {}
unsafe impl Sync for DenseIpCache {}

impl DenseIpCache {
    /// Maps the array behind `map` (which must be `IPCACHE_DENSE_V4`: u64 values,
    /// [`DENSE_V4_SLOTS`] entries, `BPF_F_MMAPABLE`).
    pub fn map(map: &MapData) -> std::io::Result<Self> {
        let len = DENSE_V4_SLOTS as usize;
        let bytes = len * std::mem::size_of::<u64>();
        // SAFETY: a shared, read-write mapping of the map's fd; the kernel checks the size and
        // the map's flags and fails the call otherwise.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let slots = NonNull::new(ptr.cast::<AtomicU64>()).ok_or_else(|| {
            std::io::Error::other("mmap of IPCACHE_DENSE_V4 returned a null pointer")
        })?;
        Ok(DenseIpCache { slots, len, bytes })
    }

    fn slots(&self) -> &[AtomicU64] {
        // SAFETY: `len` u64 slots, page-aligned, live until drop; only accessed atomically.
        unsafe { std::slice::from_raw_parts(self.slots.as_ptr(), self.len) }
    }

    /// The entry in `slot`, if it holds one.
    pub fn get(&self, slot: u32) -> Option<IpCacheValue> {
        decode(self.slots().get(slot as usize)?.load(Ordering::Acquire))
    }

    /// Writes (or, with None, clears) `slot`.
    pub fn set(&self, slot: u32, value: Option<IpCacheValue>) {
        if let Some(s) = self.slots().get(slot as usize) {
            s.store(value.map_or(0, encode), Ordering::Release);
        }
    }

    /// Every slot that holds an entry.
    pub fn entries(&self) -> Vec<(u32, IpCacheValue)> {
        self.slots()
            .iter()
            .enumerate()
            .filter_map(|(i, s)| decode(s.load(Ordering::Acquire)).map(|v| (i as u32, v)))
            .collect()
    }

    /// Clears every slot.
    pub fn clear(&self) {
        for s in self.slots() {
            if s.load(Ordering::Relaxed) != 0 {
                s.store(0, Ordering::Release);
            }
        }
    }
}

impl Drop for DenseIpCache {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped.
        unsafe { libc::munmap(self.slots.as_ptr().cast(), self.bytes) };
    }
}

/// A slot's u64: identity in the low half, flags (with [`IPCACHE_DENSE_PRESENT`]) in the high
/// half, as the programs read it.
fn encode(v: IpCacheValue) -> u64 {
    v.identity as u64 | (((v.flags | IPCACHE_DENSE_PRESENT) as u64) << 32)
}

fn decode(raw: u64) -> Option<IpCacheValue> {
    let flags = (raw >> 32) as u32;
    (flags & IPCACHE_DENSE_PRESENT != 0).then_some(IpCacheValue {
        identity: raw as u32,
        flags: flags & !IPCACHE_DENSE_PRESENT,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_round_trip_and_empty_reads_as_none() {
        let v = IpCacheValue {
            identity: 4242,
            flags: bulkhead_common::IPCACHE_QUARANTINED,
        };
        assert_eq!(decode(encode(v)), Some(v));
        let zero = IpCacheValue {
            identity: 0,
            flags: 0,
        };
        assert_eq!(
            decode(encode(zero)),
            Some(zero),
            "identity 0 is still an entry"
        );
        assert_eq!(decode(0), None);
    }
}
