//! Learning DNS answers on their way to the pod (issue 19): which addresses the names a pod
//! asked for resolved to, written into `FQDN_LEARNED_V4` / `FQDN_LEARNED_V6` before the answer
//! is passed on, so the pod's first connection after resolving finds them.
//!
//! Only answers from a trusted resolver (`FQDN_RESOLVERS`) are read, and only for a queried name
//! the agent listed (`FQDN_EXACT`, `FQDN_WILDCARD`, keyed by `bulkhead_common::fqdn::name_hash`).
//! An answer teaches nothing unless all of it that is read is well formed: one question (class
//! IN, type A or AAAA), no TC bit, RCODE 0, at most `FQDN_MAX_ANSWERS` answer records, each
//! inside the message, names within RFC 1035's limits and compression pointers that point
//! strictly before the run of labels they end (so no pointer loop can exist) and are followed
//! at most `FQDN_MAX_POINTER_JUMPS` times. An address record counts when its owner is the
//! queried name or a name reached from it by the CNAME records before it (resolvers list a
//! chain in order, RFC 1034 4.3.2), and it is learned for the queried name's ids with the
//! smallest TTL on its chain. Whatever it reads, the packet's verdict is the policy's: learning
//! nothing is the safe outcome, never dropping.
//!
//! The message is copied once into a per-CPU buffer; loops run under `bpf_loop`, so the
//! verifier checks each step once whatever the number of records, and the per-packet stack
//! stays small (all state lives in the scratch map).

use aya_ebpf::{
    bindings::__sk_buff,
    cty::c_void,
    helpers::generated::{bpf_loop, bpf_skb_load_bytes},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use bulkhead_common::fqdn::{
    FQDN_LEARNED_V4_ENTRIES, FQDN_LEARNED_V6_ENTRIES, FQDN_MAX_ANSWERS, FQDN_MAX_CHAIN,
    FQDN_MAX_IDS, FQDN_MAX_LABELS, FQDN_MAX_MESSAGE, FQDN_MAX_NAME, FQDN_MAX_PATTERNS,
    FQDN_MAX_POINTER_JUMPS, FQDN_MAX_RESOLVERS, FqdnConfig, FqdnLearned, FqdnLearnedKeyV4,
    FqdnLearnedKeyV6, NameHasher, fqdn_stat, label_word, label_words,
};

use crate::parse::{IPPROTO_TCP, IPPROTO_UDP};

const BPF_F_NO_PREALLOC: u32 = 1;

/// Learning's configuration (the SipHash key, TTL bounds); nothing is learned while unset.
#[map]
static FQDN_CONFIG: Array<FqdnConfig> = Array::pinned(1, 0);

/// Trusted resolvers: IPv6 or IPv4-mapped addresses (value reserved, 0).
#[map]
static FQDN_RESOLVERS: HashMap<[u8; 16], u32> = HashMap::pinned(FQDN_MAX_RESOLVERS, 0);

/// Exact names: name hash → name id.
#[map]
static FQDN_EXACT: HashMap<u64, u32> = HashMap::pinned(FQDN_MAX_PATTERNS, BPF_F_NO_PREALLOC);

/// Wildcard suffixes (`example.com` for `*.example.com`): suffix hash → name id.
#[map]
static FQDN_WILDCARD: HashMap<u64, u32> = HashMap::pinned(FQDN_MAX_PATTERNS, BPF_F_NO_PREALLOC);

/// What each endpoint learned, per address (see `FqdnLearnedKeyV4` for why per endpoint).
#[map]
pub(crate) static FQDN_LEARNED_V4: LruHashMap<FqdnLearnedKeyV4, FqdnLearned> =
    LruHashMap::pinned(FQDN_LEARNED_V4_ENTRIES, 0);

#[map]
pub(crate) static FQDN_LEARNED_V6: LruHashMap<FqdnLearnedKeyV6, FqdnLearned> =
    LruHashMap::pinned(FQDN_LEARNED_V6_ENTRIES, 0);

#[map]
static FQDN_STATS: PerCpuArray<u64> = PerCpuArray::pinned(fqdn_stat::COUNT, 0);

/// The message buffer: a power of two for masking, plus room for the last word read.
const MSG_MASK: usize = FQDN_MAX_MESSAGE - 1;
const MSG_BUF: usize = FQDN_MAX_MESSAGE + 64;
const LABEL_MASK: usize = 127;
const PENDING: usize = FQDN_MAX_ANSWERS as usize;
/// Steps of one name walk: a label or a pointer each, and the final zero.
const WALK_STEPS: u32 = FQDN_MAX_LABELS as u32 + FQDN_MAX_POINTER_JUMPS + 1;

const WALK_RUNNING: u32 = 0;
const WALK_OK: u32 = 1;
const WALK_FAILED: u32 = 2;

const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;

/// An address record waiting for the whole answer to check out.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Pending {
    /// IPv6 bytes, or the IPv4 address in the first four.
    addr: [u64; 2],
    ttl: u32,
    v6: u32,
}

#[repr(C, align(8))]
pub struct DnsScratch {
    msg: [u8; MSG_BUF],
    len: u32,
    /// Where the next answer record starts.
    pos: u32,
    /// The last name walk: its labels' length-byte offsets, where it ends in place, its state.
    labels: [u16; LABEL_MASK + 1],
    nlabels: u32,
    name_end: u32,
    walk_pos: u32,
    walk_seg: u32,
    walk_jumps: u32,
    walk_wire: u32,
    walk_state: u32,
    /// Look the name's suffixes and the name up in the policy maps while hashing it.
    lookup: u32,
    hasher: NameHasher,
    key: [u64; 2],
    ids: [u32; FQDN_MAX_IDS],
    nids: u32,
    chain_hash: [u64; FQDN_MAX_CHAIN],
    chain_off: [u32; FQDN_MAX_CHAIN],
    nchain: u32,
    chain_ttl: u32,
    records: u32,
    failed: u32,
    endpoint_id: u32,
    npending: u32,
    pending: [Pending; PENDING],
    cfg: FqdnConfig,
    now: u64,
    key4: FqdnLearnedKeyV4,
    key6: FqdnLearnedKeyV6,
    value: FqdnLearned,
}

#[map]
static DNS_SCRATCH: PerCpuArray<DnsScratch> = PerCpuArray::with_max_entries(1, 0);

/// Whether `addr` (IPv6 or IPv4-mapped, 8-aligned) is a trusted resolver: the one map lookup a
/// packet from port 53 pays before `learn`.
#[inline(always)]
pub fn from_resolver(addr: &[u8; 16]) -> bool {
    // SAFETY: the value is not used.
    unsafe { FQDN_RESOLVERS.get(addr) }.is_some()
}

#[inline(always)]
fn scratch() -> Option<&'static mut DnsScratch> {
    // SAFETY: per-CPU scratch, exclusively ours for this program run (callbacks included).
    DNS_SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(c) = FQDN_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn byte(s: &DnsScratch, off: u32) -> u32 {
    s.msg[off as usize & MSG_MASK] as u32
}

#[inline(always)]
fn be16(s: &DnsScratch, off: u32) -> u32 {
    (byte(s, off) << 8) | byte(s, off + 1)
}

/// Eight bytes from `off` (masked into the buffer), little-endian.
#[inline(always)]
fn word(s: &DnsScratch, off: u32) -> u64 {
    let at = off as usize & MSG_MASK;
    // SAFETY: `at + 8 <= MSG_BUF`.
    unsafe { core::ptr::read_unaligned(s.msg.as_ptr().add(at) as *const u64) }
}

/// Learns from the DNS answer in the packet (UDP, or TCP with the whole message in this
/// segment) for `endpoint_id`. `l4_off` is the transport header's offset. Never changes the
/// packet's fate.
#[inline(never)]
pub fn learn(skb: *mut __sk_buff, endpoint_id: u32, l4_off: u32, protocol: u8) {
    let Some(cfg) = FQDN_CONFIG.get(0) else {
        return;
    };
    if !cfg.enabled() {
        return;
    }
    let Some(s) = scratch() else {
        return;
    };
    s.cfg = *cfg;
    s.now = crate::now_coarse(&crate::config());
    s.endpoint_id = endpoint_id;
    if read_message(skb, s, l4_off, protocol) && check_header(s) {
        match answer() {
            Learned::Nothing => bump(fqdn_stat::ANSWERS_REJECTED),
            Learned::Unlisted => bump(fqdn_stat::ANSWERS_UNLISTED),
            Learned::Addresses => bump(fqdn_stat::ANSWERS_LEARNED),
        }
    } else {
        bump(fqdn_stat::ANSWERS_REJECTED);
    }
}

enum Learned {
    Nothing,
    Unlisted,
    Addresses,
}

/// Copies the DNS message into the scratch buffer.
#[inline(always)]
fn read_message(skb: *mut __sk_buff, s: &mut DnsScratch, l4_off: u32, protocol: u8) -> bool {
    let ctx = TcContext::new(skb);
    let pkt_len = ctx.len();
    let (off, len) = if protocol == IPPROTO_UDP {
        let Ok(h) = ctx.load::<[u8; 8]>(l4_off as usize) else {
            return false;
        };
        let ulen = u16::from_be_bytes([h[4], h[5]]) as u32;
        if ulen < 8 || l4_off + ulen > pkt_len {
            return false;
        }
        (l4_off + 8, ulen - 8)
    } else if protocol == IPPROTO_TCP {
        let Ok(doff) = ctx.load::<u8>(l4_off as usize + 12) else {
            return false;
        };
        let doff = ((doff >> 4) as u32) * 4;
        let start = l4_off + doff;
        if doff < 20 || start + 2 > pkt_len {
            return false;
        }
        // One segment, one whole message: the length prefix accounts for the rest.
        let Ok(prefix) = ctx.load::<[u8; 2]>(start as usize) else {
            return false;
        };
        let mlen = u16::from_be_bytes(prefix) as u32;
        if mlen != pkt_len - start - 2 {
            return false;
        }
        (start + 2, mlen)
    } else {
        return false;
    };
    if len < 12 || len > FQDN_MAX_MESSAGE as u32 {
        return false;
    }
    s.len = len;
    // SAFETY: the buffer holds FQDN_MAX_MESSAGE bytes and 12 <= len <= FQDN_MAX_MESSAGE.
    let r = unsafe {
        bpf_skb_load_bytes(
            skb as *const c_void,
            off,
            s.msg.as_mut_ptr() as *mut c_void,
            // len itself, in a form whose bounds the verifier sees: 1..=FQDN_MAX_MESSAGE.
            ((len - 1) & MSG_MASK as u32) + 1,
        )
    };
    r == 0
}

/// A response to a standard query, not truncated, no error, one question, some answers.
#[inline(always)]
fn check_header(s: &DnsScratch) -> bool {
    let flags = be16(s, 2);
    let qdcount = be16(s, 4);
    let ancount = be16(s, 6);
    flags & 0x8000 != 0
        && (flags >> 11) & 0xf == 0
        && flags & 0x0200 == 0
        && flags & 0xf == 0
        && qdcount == 1
        && (1..=FQDN_MAX_ANSWERS).contains(&ancount)
}

/// The question, then the answer records, then the learned maps.
///
/// Functions that run a `bpf_loop` take no reference to the scratch: its callbacks write it
/// behind the compiler's back, so a reference held across the call (a `noalias` argument) could
/// be read from stale registers. They fetch the scratch again after each loop instead.
#[inline(always)]
fn answer() -> Learned {
    if !walk_name(12) {
        return Learned::Nothing;
    }
    let Some(s) = scratch() else {
        return Learned::Nothing;
    };
    if s.nlabels == 0 {
        return Learned::Nothing;
    }
    let q = s.name_end;
    if q + 4 > s.len {
        return Learned::Nothing;
    }
    let (qtype, qclass) = (be16(s, q) as u16, be16(s, q + 2) as u16);
    if qclass != CLASS_IN || (qtype != TYPE_A && qtype != TYPE_AAAA) {
        return Learned::Nothing;
    }
    s.nids = 0;
    s.ids = [0; FQDN_MAX_IDS];
    let h = hash_name(true);
    let Some(s) = scratch() else {
        return Learned::Nothing;
    };
    if s.nids == 0 {
        return Learned::Unlisted;
    }
    s.chain_hash[0] = h;
    s.chain_off[0] = 12;
    s.nchain = 1;
    s.chain_ttl = u32::MAX;
    s.pos = q + 4;
    s.records = 0;
    s.failed = 0;
    s.npending = 0;
    let ancount = be16(s, 6);
    // SAFETY: a static callback, no context (the state is in the per-CPU scratch).
    unsafe {
        bpf_loop(
            ancount,
            record_step as *mut c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    let Some(s) = scratch() else {
        return Learned::Nothing;
    };
    if s.failed != 0 || s.records != ancount {
        return Learned::Nothing;
    }
    let n = s.npending;
    if n == 0 {
        return Learned::Nothing;
    }
    // SAFETY: as above.
    unsafe { bpf_loop(n, learn_step as *mut c_void, core::ptr::null_mut(), 0) };
    Learned::Addresses
}

/// Walks the name at `start`: its labels' offsets into `labels`, where it ends in place into
/// `name_end`. False when it breaks a rule (see the module's comment).
#[inline(always)]
fn walk_name(start: u32) -> bool {
    let Some(s) = scratch() else {
        return false;
    };
    s.nlabels = 0;
    s.walk_pos = start;
    s.walk_seg = start;
    s.walk_jumps = 0;
    s.walk_wire = 1;
    s.walk_state = WALK_RUNNING;
    // SAFETY: a static callback, no context.
    unsafe {
        bpf_loop(
            WALK_STEPS,
            walk_step as *mut c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    match scratch() {
        Some(s) => s.walk_state == WALK_OK,
        None => false,
    }
}

/// One label or pointer of a name walk.
extern "C" fn walk_step(_i: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = scratch() else {
        return 1;
    };
    let pos = s.walk_pos;
    if pos >= s.len {
        s.walk_state = WALK_FAILED;
        return 1;
    }
    let b = byte(s, pos);
    if b == 0 {
        if s.walk_jumps == 0 {
            s.name_end = pos + 1;
        }
        s.walk_state = WALK_OK;
        return 1;
    }
    if b & 0xc0 == 0xc0 {
        if pos + 1 >= s.len {
            s.walk_state = WALK_FAILED;
            return 1;
        }
        let target = ((b & 0x3f) << 8) | byte(s, pos + 1);
        // Strictly before the labels this pointer ends: every jump goes further back, so a
        // loop cannot be written.
        if target >= s.walk_seg || s.walk_jumps >= FQDN_MAX_POINTER_JUMPS {
            s.walk_state = WALK_FAILED;
            return 1;
        }
        if s.walk_jumps == 0 {
            s.name_end = pos + 2;
        }
        s.walk_jumps += 1;
        s.walk_pos = target;
        s.walk_seg = target;
        return 0;
    }
    // 0x40 and 0x80: extended label types, obsolete (RFC 6891); a label is at most 63 bytes.
    if b & 0xc0 != 0 {
        s.walk_state = WALK_FAILED;
        return 1;
    }
    // The label, and at least the byte after it, inside the message.
    s.walk_wire += 1 + b;
    if pos + 1 + b >= s.len
        || s.walk_wire > FQDN_MAX_NAME as u32
        || s.nlabels >= FQDN_MAX_LABELS as u32
    {
        s.walk_state = WALK_FAILED;
        return 1;
    }
    s.labels[s.nlabels as usize & LABEL_MASK] = pos as u16;
    s.nlabels += 1;
    s.walk_pos = pos + 1 + b;
    0
}

/// The keyed hash of the walked name; with `lookup`, the name ids of the name (exact) and of
/// its proper suffixes (wildcards) go into `ids`.
#[inline(always)]
fn hash_name(lookup: bool) -> u64 {
    let Some(s) = scratch() else {
        return 0;
    };
    s.hasher = NameHasher::new(s.cfg.key);
    s.lookup = lookup as u32;
    let n = s.nlabels;
    // SAFETY: a static callback, no context.
    unsafe { bpf_loop(n, hash_step as *mut c_void, core::ptr::null_mut(), 0) };
    match scratch() {
        Some(s) => s.hasher.finish(),
        None => 0,
    }
}

/// One label of a name, last to first.
extern "C" fn hash_step(i: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = scratch() else {
        return 1;
    };
    let k = s.nlabels.wrapping_sub(1).wrapping_sub(i as u32);
    let off = s.labels[k as usize & LABEL_MASK] as u32;
    let len = byte(s, off) as u8;
    let words = label_words(len);
    let mut w = 0;
    while w < 8 {
        if w >= words {
            break;
        }
        let raw = word(s, off + 8 * w);
        s.hasher.write(label_word(raw, len, w));
        w += 1;
    }
    if s.lookup != 0 {
        let h = s.hasher.finish();
        // The whole name is an exact match; a proper suffix, a wildcard's.
        // SAFETY: values are copied out at once.
        let id = if k == 0 {
            unsafe { FQDN_EXACT.get(&h) }.copied()
        } else {
            unsafe { FQDN_WILDCARD.get(&h) }.copied()
        };
        if let Some(id) = id
            && id != 0
        {
            // The last ones found are the most specific: they overwrite the oldest.
            s.ids[s.nids as usize % FQDN_MAX_IDS] = id;
            s.nids += 1;
        }
    }
    0
}

/// Whether the name of hash `h` is on the chain.
#[inline(always)]
fn on_chain(s: &DnsScratch, h: u64) -> bool {
    let mut c = 0;
    let mut found = false;
    while c < FQDN_MAX_CHAIN {
        if (c as u32) < s.nchain && s.chain_hash[c] == h {
            found = true;
        }
        c += 1;
    }
    found
}

/// One answer record.
extern "C" fn record_step(_i: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = scratch() else {
        return 1;
    };
    let pos = s.pos;
    if pos + 2 > s.len {
        s.failed = 1;
        return 1;
    }
    // Most owners are a pointer to the question or to a CNAME's target: known, no walk.
    let b = byte(s, pos);
    let mut known = false;
    if b & 0xc0 == 0xc0 {
        let target = ((b & 0x3f) << 8) | byte(s, pos + 1);
        let mut c = 0;
        while c < FQDN_MAX_CHAIN {
            if (c as u32) < s.nchain && s.chain_off[c] == target {
                known = true;
            }
            c += 1;
        }
    }
    let (fixed, owner_on_chain) = if known {
        (pos + 2, true)
    } else {
        if !walk_name(pos) {
            return fail();
        }
        let Some(s) = scratch() else {
            return 1;
        };
        let end = s.name_end;
        let h = hash_name(false);
        let Some(s) = scratch() else {
            return 1;
        };
        (end, on_chain(s, h))
    };
    let Some(s) = scratch() else {
        return 1;
    };
    if fixed + 10 > s.len {
        return fail();
    }
    let rtype = be16(s, fixed) as u16;
    let class = be16(s, fixed + 2) as u16;
    let ttl = (be16(s, fixed + 4) << 16) | be16(s, fixed + 6);
    let rdlen = be16(s, fixed + 8);
    let rdata = fixed + 10;
    let end = rdata + rdlen;
    if end > s.len {
        return fail();
    }
    let ttl = ttl.min(s.chain_ttl);
    if owner_on_chain && class == CLASS_IN {
        match rtype {
            TYPE_CNAME => {
                if s.nchain as usize >= FQDN_MAX_CHAIN {
                    return fail();
                }
                if !walk_name(rdata) {
                    return fail();
                }
                let Some(s) = scratch() else {
                    return 1;
                };
                if s.name_end != end || s.nlabels == 0 {
                    return fail();
                }
                let h = hash_name(false);
                let Some(s) = scratch() else {
                    return 1;
                };
                let c = s.nchain as usize % FQDN_MAX_CHAIN;
                s.chain_hash[c] = h;
                s.chain_off[c] = rdata;
                s.nchain += 1;
                s.chain_ttl = ttl;
            }
            TYPE_A | TYPE_AAAA => {
                let v6 = rtype == TYPE_AAAA;
                if rdlen != if v6 { 16 } else { 4 } {
                    return fail();
                }
                if (s.npending as usize) < PENDING {
                    let addr = if v6 {
                        [word(s, rdata), word(s, rdata + 8)]
                    } else {
                        [word(s, rdata) & 0xffff_ffff, 0]
                    };
                    let p = &mut s.pending[s.npending as usize % PENDING];
                    p.addr = addr;
                    p.ttl = ttl;
                    p.v6 = v6 as u32;
                    s.npending += 1;
                }
            }
            _ => {}
        }
    }
    s.pos = end;
    s.records += 1;
    0
}

#[inline(always)]
fn fail() -> i64 {
    if let Some(s) = scratch() {
        s.failed = 1;
    }
    1
}

/// Writes one pending address under the endpoint, with the queried name's ids.
extern "C" fn learn_step(i: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = scratch() else {
        return 1;
    };
    let p = s.pending[i as usize % PENDING];
    let expires = s
        .now
        .wrapping_add(s.cfg.clamp_ttl(p.ttl) as u64 * 1_000_000_000);
    let existing = if p.v6 != 0 {
        s.key6 = FqdnLearnedKeyV6 {
            endpoint_id: s.endpoint_id,
            // SAFETY: same size; any bytes are an address.
            addr: unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(p.addr) },
        };
        FQDN_LEARNED_V6.get_ptr_mut(&s.key6)
    } else {
        s.key4 = FqdnLearnedKeyV4 {
            endpoint_id: s.endpoint_id,
            addr: p.addr[0] as u32,
        };
        FQDN_LEARNED_V4.get_ptr_mut(&s.key4)
    };
    let n = (s.nids as usize).min(FQDN_MAX_IDS);
    if let Some(v) = existing {
        // Known address (a name resolved again): its slots are refreshed in place, one lookup
        // instead of a lookup and an update. Two CPUs learning the same address at once may
        // interleave their slot writes; every slot still holds an id with a valid expiry.
        let mut j = 0;
        while j < FQDN_MAX_IDS {
            if j < n {
                // SAFETY: an LRU value, valid for this program run.
                unsafe { (*v).learn(s.ids[j], expires, s.now) };
            }
            j += 1;
        }
        bump(fqdn_stat::ADDRESSES_LEARNED);
        return 0;
    }
    s.value = FqdnLearned::default();
    let mut j = 0;
    while j < FQDN_MAX_IDS {
        if j < n {
            let id = s.ids[j];
            s.value.learn(id, expires, s.now);
        }
        j += 1;
    }
    let r = if p.v6 != 0 {
        FQDN_LEARNED_V6.insert(&s.key6, &s.value, 0)
    } else {
        FQDN_LEARNED_V4.insert(&s.key4, &s.value, 0)
    };
    bump(if r.is_ok() {
        fqdn_stat::ADDRESSES_LEARNED
    } else {
        fqdn_stat::LEARN_FAILED
    });
    0
}
