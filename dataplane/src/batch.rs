//! Batched map writes: `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_DELETE_BATCH` (Linux 5.6), one
//! system call for many keys where the kernel offers it for the map's type, one call per key
//! where it does not.
//!
//! aya 0.14 has no batch API (aya-rs/aya#1124), so the two commands are issued here with the
//! `bpf(2)` system call on the map's file descriptor. The typed wrappers check the key and
//! value sizes against the map's before any call, through aya's own typed map constructors.
//!
//! The kernel processes a batch in order and stops at the first element it cannot write; it
//! reports how many it did in `count`. [`BatchError`] carries that number so the caller knows
//! exactly which keys are in the map.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::Pod;

/// `BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_DELETE_BATCH` from
/// `include/uapi/linux/bpf.h`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// A batch operation, for remembering which ones the kernel lacks for a map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    Lookup,
    Update,
    Delete,
}

/// Most elements one system call carries: bounds the buffers built for a call (a 2M-key
/// policy map is written in 128 calls, not one 100 MB copy).
pub const MAX_BATCH: usize = 16 * 1024;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// A batch that stopped early: the first `done` elements were processed.
#[derive(Debug)]
pub struct BatchError {
    pub done: usize,
    pub error: io::Error,
}

impl BatchError {
    /// The kernel has no batch operation for this map type (or is older than 5.6): the caller
    /// writes key by key instead.
    pub fn unsupported(&self) -> bool {
        self.done == 0
            && matches!(
                self.error.raw_os_error(),
                // ENOTSUPP (kernel-internal 524), EOPNOTSUPP, EINVAL (unknown command).
                Some(524) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
            )
    }
}

fn bytes_of<T: Pod>(items: &[T]) -> &[u8] {
    // SAFETY: `aya::Pod` types are plain data without padding that the kernel reads as bytes
    // (that is the trait's contract); the slice covers exactly `items`.
    unsafe { std::slice::from_raw_parts(items.as_ptr().cast::<u8>(), size_of_val(items)) }
}

fn sys_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr` batch member of the size we pass; the key and
    // value pointers in it stay borrowed for the duration of the call by our callers.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Every (key, value) of the map behind `fd` with `BPF_MAP_LOOKUP_BATCH`, [`MAX_BATCH`] per
/// call (instead of two calls per key: next key, then its value). A map that changes meanwhile
/// may be read partly before and partly after the change, as with key-by-key iteration.
pub fn lookup<K: Pod, V: Pod>(fd: BorrowedFd<'_>) -> Result<Vec<(K, V)>, BatchError> {
    // The position token: a bucket number for hash maps, a key for the generic walk.
    let token_len = size_of::<K>().max(8);
    let (mut token_in, mut token_out) = (vec![0u8; token_len], vec![0u8; token_len]);
    let mut out = Vec::new();
    let mut keys: Vec<K> = Vec::with_capacity(MAX_BATCH);
    let mut values: Vec<V> = Vec::with_capacity(MAX_BATCH);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: MAX_BATCH as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let result = sys_batch(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let got = (attr.count as usize).min(MAX_BATCH);
        let done = match result {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(error) => {
                return Err(BatchError {
                    done: out.len(),
                    error,
                });
            }
        };
        // SAFETY: the kernel wrote `got` keys and values of the map's sizes (the callers check
        // that K and V are the map's types) into the buffers' spare capacity; Pod types have
        // no invalid bit patterns.
        unsafe {
            keys.set_len(got);
            values.set_len(got);
        }
        out.extend(keys.drain(..).zip(values.drain(..)));
        if done {
            return Ok(out);
        }
        std::mem::swap(&mut token_in, &mut token_out);
        first = false;
    }
}

/// Writes `keys[i] → values[i]` into the map behind `fd` with `BPF_MAP_UPDATE_BATCH`, in
/// chunks of at most [`MAX_BATCH`]. `K` and `V` must be the map's key and value types (the
/// typed entry points of [`crate::loader::Dataplane`] check them).
pub fn update<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
    elem_flags: u64,
) -> Result<(), BatchError> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let mut done = 0;
    for (k, v) in keys.chunks(MAX_BATCH).zip(values.chunks(MAX_BATCH)) {
        let (kb, vb) = (bytes_of(k), bytes_of(v));
        let mut attr = BatchAttr {
            keys: kb.as_ptr() as u64,
            values: vb.as_ptr() as u64,
            count: k.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            elem_flags,
            ..Default::default()
        };
        if let Err(error) = sys_batch(BPF_MAP_UPDATE_BATCH, &mut attr) {
            return Err(BatchError {
                done: done + (attr.count as usize).min(k.len()),
                error,
            });
        }
        done += k.len();
    }
    Ok(())
}

/// Removes `keys` from the map behind `fd` with `BPF_MAP_DELETE_BATCH`. A key that is not in
/// the map stops the kernel's batch (`ENOENT`): the rest are then removed one call each, so a
/// batch of which some keys are gone still removes every other one. Returns how many keys
/// were not there.
pub fn delete<K: Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> Result<usize, BatchError> {
    let mut missing = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MAX_BATCH)];
        let kb = bytes_of(chunk);
        let mut attr = BatchAttr {
            keys: kb.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        match sys_batch(BPF_MAP_DELETE_BATCH, &mut attr) {
            Ok(()) => rest = &rest[chunk.len()..],
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {
                // `count` keys went; the next one is not in the map: skip it.
                let gone = (attr.count as usize).min(chunk.len());
                missing += 1;
                rest = &rest[(gone + 1).min(rest.len())..];
            }
            Err(error) => {
                return Err(BatchError {
                    done: keys.len() - rest.len() + (attr.count as usize).min(chunk.len()),
                    error,
                });
            }
        }
    }
    Ok(missing)
}
