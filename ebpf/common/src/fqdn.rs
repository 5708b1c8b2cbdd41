//! Egress by domain name, learned from DNS answers in the kernel (issue 19): the maps' keys and
//! values, their limits, and the one implementation of name normalization and hashing that the
//! kernel program and the agent share.
//!
//! # Names and their keys
//! A name is compared in DNS wire form: its labels, ASCII letters lowercased (`A`–`Z` only, as
//! DNS compares names, RFC 4343), without the root label. The agent writes policy names into two
//! hash maps, `FQDN_EXACT` (`api.example.com`) and `FQDN_WILDCARD` (`*.example.com`, stored as
//! the suffix `example.com`), keyed by [`name_hash`], a SipHash-2-4 keyed with a per-node secret
//! ([`FqdnConfig::key`]) over the name's labels **from the last to the first**, each as its
//! length byte and its bytes, zero-padded to a multiple of eight bytes. Two choices follow:
//!
//! * A keyed hash, not a plain one (FNV, xxHash): the names a pod asks for are the pod's to
//!   choose, and with a public hash it could search for a name that collides with an allowed one
//!   and get its addresses admitted. With a secret the agent draws at random (and that never
//!   leaves the node's kernel and agent) SipHash is a PRF: a collision cannot be aimed at. Keys of
//!   8 bytes instead of whole names (up to 255 bytes) keep the maps small and the lookups cheap.
//! * Labels last to first, each padded to whole words: the hash state after the last `k` labels
//!   is the state of the suffix made of them, so one pass over a queried name gives the key of
//!   every suffix (the wildcard lookups) and of the whole name (the exact lookup); a label's
//!   length byte opens its words, so the encoding is unambiguous.
//!
//! A wildcard suffix matches names with one or more labels before it, never the suffix itself.

/// DNS's port, the source port of the answers the programs read.
pub const DNS_PORT: u16 = 53;

/// Name ids a learned address carries at most (one queried name can match its exact entry and
/// several wildcards; the most specific are kept).
pub const FQDN_MAX_IDS: usize = 4;
/// The empty name-id slot: the controller never allocates it.
pub const FQDN_NAME_ID_NONE: u32 = 0;

/// Answer records read per DNS message; a message with more teaches nothing.
pub const FQDN_MAX_ANSWERS: u32 = 128;
/// Names on a CNAME chain, the queried one included; records past a longer chain teach nothing.
pub const FQDN_MAX_CHAIN: usize = 8;
/// Largest DNS message read (bytes, a power of two); a larger one teaches nothing.
pub const FQDN_MAX_MESSAGE: usize = 4096;
/// Compression pointers followed within one name.
pub const FQDN_MAX_POINTER_JUMPS: u32 = 16;
/// Longest label and longest name in wire form (RFC 1035 2.3.4).
pub const FQDN_MAX_LABEL: usize = 63;
pub const FQDN_MAX_NAME: usize = 255;
/// Most labels a name of [`FQDN_MAX_NAME`] bytes can have (each at least two bytes, plus the
/// root byte).
pub const FQDN_MAX_LABELS: usize = 127;

/// Exact names and wildcard suffixes the agent may write (each map).
pub const FQDN_MAX_PATTERNS: u32 = 1 << 16;
/// Trusted resolver addresses.
pub const FQDN_MAX_RESOLVERS: u32 = 256;
/// Learned names a node is sized for, and the addresses each is expected to have on average:
/// the learned maps hold `names * addresses` entries (LRU: the least recently learned go
/// first when they are full).
pub const FQDN_LEARNED_NAMES: u32 = 10_000;
pub const FQDN_LEARNED_V4_PER_NAME: u32 = 12;
pub const FQDN_LEARNED_V6_PER_NAME: u32 = 6;
/// Entries of `FQDN_LEARNED_V4` / `FQDN_LEARNED_V6`.
pub const FQDN_LEARNED_V4_ENTRIES: u32 = FQDN_LEARNED_NAMES * FQDN_LEARNED_V4_PER_NAME;
pub const FQDN_LEARNED_V6_ENTRIES: u32 = FQDN_LEARNED_NAMES * FQDN_LEARNED_V6_PER_NAME;

/// TTL bounds in seconds when [`FqdnConfig`] leaves them 0: a record with TTL 0 still lets
/// the pod connect right after it resolved, and no record keeps an address longer than a day.
pub const FQDN_DEFAULT_MIN_TTL_S: u32 = 5;
pub const FQDN_DEFAULT_MAX_TTL_S: u32 = 86_400;

/// Configuration of learning (array map `FQDN_CONFIG`, index 0). While `key` is all zeros
/// (no agent wrote it) nothing is learned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FqdnConfig {
    /// The SipHash key of [`name_hash`]: a per-node secret.
    pub key: [u64; 2],
    /// A learned address lives at least this long (0: [`FQDN_DEFAULT_MIN_TTL_S`]).
    pub min_ttl_s: u32,
    /// ... and at most this long (0: [`FQDN_DEFAULT_MAX_TTL_S`]).
    pub max_ttl_s: u32,
}

impl FqdnConfig {
    pub fn enabled(&self) -> bool {
        self.key != [0, 0]
    }

    /// A record's TTL within the configured bounds, in seconds.
    #[inline(always)]
    pub fn clamp_ttl(&self, ttl_s: u32) -> u32 {
        let lo = if self.min_ttl_s != 0 {
            self.min_ttl_s
        } else {
            FQDN_DEFAULT_MIN_TTL_S
        };
        let hi = if self.max_ttl_s != 0 {
            self.max_ttl_s
        } else {
            FQDN_DEFAULT_MAX_TTL_S
        };
        let t = if ttl_s < lo { lo } else { ttl_s };
        if t > hi { hi.max(lo) } else { t }
    }
}

/// Key of `FQDN_LEARNED_V4`: an endpoint and an IPv4 address (its four bytes read as one native
/// u32, as `IPCACHE_HOST_V4` keys are).
///
/// Learned per endpoint, not per node: what a pod resolved is evidence of what that pod asked,
/// and only for it. Per node, one pod's resolution would admit another pod that never asked (an
/// address shared by many names, a CDN's, would open for every pod whose policy names any of
/// them), and a pod could make addresses valid for its neighbours by resolving names at chosen
/// moments. Per endpoint rather than per identity, since replicas resolve on their own and
/// each keeps its own TTL view; the later policy lookup knows the endpoint at no cost.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FqdnLearnedKeyV4 {
    pub endpoint_id: u32,
    pub addr: u32,
}

/// Key of `FQDN_LEARNED_V6`: an endpoint and an IPv6 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FqdnLearnedKeyV6 {
    pub endpoint_id: u32,
    pub addr: [u8; 16],
}

/// Value of the learned maps: the name ids (controller's, opaque; [`FQDN_NAME_ID_NONE`] in an
/// empty slot) an address was learned for, each with its own expiry on the programs' clock
/// (`Config::clock_offset_ns` + jiffies, i.e. CLOCK_MONOTONIC in ns: what `now_coarse` reads
/// and what the agent reads with `clock_gettime(CLOCK_MONOTONIC)`). A slot whose expiry has
/// passed admits nothing new; the agent's sweep clears it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FqdnLearned {
    pub expires_ns: [u64; FQDN_MAX_IDS],
    pub name_ids: [u32; FQDN_MAX_IDS],
}

impl FqdnLearned {
    /// Adds `id` valid until `expires_ns`: refreshes its slot, else takes an empty or expired
    /// one, else the one that expires first.
    #[inline(always)]
    pub fn learn(&mut self, id: u32, expires_ns: u64, now_ns: u64) {
        let mut slot = 0;
        let mut best = u64::MAX;
        let mut i = 0;
        while i < FQDN_MAX_IDS {
            if self.name_ids[i] == id {
                if self.expires_ns[i] < expires_ns {
                    self.expires_ns[i] = expires_ns;
                }
                return;
            }
            // An empty or expired slot ranks as expiring at 0: taken first.
            let rank = if self.name_ids[i] == FQDN_NAME_ID_NONE || self.expires_ns[i] <= now_ns {
                0
            } else {
                self.expires_ns[i]
            };
            if rank < best {
                best = rank;
                slot = i;
            }
            i += 1;
        }
        self.name_ids[slot] = id;
        self.expires_ns[slot] = expires_ns;
    }

    /// Clears the slots expired at `now_ns`; true when none is left.
    pub fn expire(&mut self, now_ns: u64) -> bool {
        let mut live = false;
        for i in 0..FQDN_MAX_IDS {
            if self.name_ids[i] != FQDN_NAME_ID_NONE && self.expires_ns[i] <= now_ns {
                self.name_ids[i] = FQDN_NAME_ID_NONE;
                self.expires_ns[i] = 0;
            }
            live |= self.name_ids[i] != FQDN_NAME_ID_NONE;
        }
        !live
    }
}

/// Per-CPU counters of learning (`FQDN_STATS` indices).
pub mod fqdn_stat {
    /// Answers from a trusted resolver whose addresses were learned.
    pub const ANSWERS_LEARNED: u32 = 0;
    /// Answers from a trusted resolver to a name no policy names (read no further).
    pub const ANSWERS_UNLISTED: u32 = 1;
    /// Answers from a trusted resolver that taught nothing: malformed, truncated, an error
    /// code, past a limit, a question of another type than A or AAAA, or no address on the
    /// chain.
    pub const ANSWERS_REJECTED: u32 = 2;
    /// Addresses written to the learned maps.
    pub const ADDRESSES_LEARNED: u32 = 3;
    /// Learned-map updates the kernel refused.
    pub const LEARN_FAILED: u32 = 4;
    pub const COUNT: u32 = 5;
    pub const NAMES: [&str; COUNT as usize] = [
        "answers_learned",
        "answers_unlisted",
        "answers_rejected",
        "addresses_learned",
        "learn_failed",
    ];
}

/// SipHash-2-4 over whole 64-bit words (little-endian reads of the message), the state copied
/// at will: [`NameHasher::finish`] does not consume it, so one pass yields the hash of every
/// prefix that ends on a word boundary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NameHasher {
    pub v: [u64; 4],
    /// Bytes written so far.
    pub len: u64,
}

#[inline(always)]
fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
}

impl NameHasher {
    #[inline(always)]
    pub fn new(key: [u64; 2]) -> Self {
        NameHasher {
            v: [
                key[0] ^ 0x736f_6d65_7073_6575,
                key[1] ^ 0x646f_7261_6e64_6f6d,
                key[0] ^ 0x6c79_6765_6e65_7261,
                key[1] ^ 0x7465_6462_7974_6573,
            ],
            len: 0,
        }
    }

    /// Absorbs eight message bytes (`m` is their little-endian read).
    #[inline(always)]
    pub fn write(&mut self, m: u64) {
        self.v[3] ^= m;
        sip_round(&mut self.v);
        sip_round(&mut self.v);
        self.v[0] ^= m;
        self.len += 8;
    }

    /// The hash of what was written so far.
    #[inline(always)]
    pub fn finish(&self) -> u64 {
        let mut v = self.v;
        let b = (self.len & 0xff) << 56;
        v[3] ^= b;
        sip_round(&mut v);
        sip_round(&mut v);
        v[0] ^= b;
        v[2] ^= 0xff;
        sip_round(&mut v);
        sip_round(&mut v);
        sip_round(&mut v);
        sip_round(&mut v);
        v[0] ^ v[1] ^ v[2] ^ v[3]
    }
}

/// ASCII `A`–`Z` to lowercase in each byte of a word, other bytes unchanged (SWAR, no branch).
#[inline(always)]
pub fn lower_word(w: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let low7 = w & !HIGH;
    // High bit of each byte: its low seven bits are >= 'A', resp. > 'Z' (no carry between
    // bytes: each sum stays below 0x100).
    let ge_a = low7 + ONES * (0x80 - b'A' as u64);
    let gt_z = low7 + ONES * (0x80 - b'Z' as u64 - 1);
    let upper = ge_a & !gt_z & !w & HIGH;
    w | (upper >> 2)
}

/// Word `k` of a label's encoding (its length byte, its bytes, zero padding) from `raw`, the
/// little-endian read of the eight bytes at `8 * k` from the length byte (bytes past the label
/// may be anything): masked to the label and lowercased.
#[inline(always)]
pub fn label_word(raw: u64, label_len: u8, k: u32) -> u64 {
    let left = (label_len as u32 + 1).saturating_sub(8 * k);
    let mask = if left >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * left)) - 1
    };
    // The length byte (<= 63) is below 'A': lowercasing leaves it alone.
    lower_word(raw & mask)
}

/// Words of a label's encoding: `ceil((1 + len) / 8)`.
#[inline(always)]
pub fn label_words(label_len: u8) -> u32 {
    (label_len as u32 + 8) / 8
}

/// Why a name was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameError {
    /// No label (the root, or an empty string).
    Empty,
    /// An empty label (two dots, or a leading dot).
    EmptyLabel,
    /// A label longer than 63 bytes.
    LabelTooLong,
    /// More than 255 bytes in wire form.
    NameTooLong,
}

impl core::fmt::Display for NameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            NameError::Empty => "the name has no label",
            NameError::EmptyLabel => "the name has an empty label",
            NameError::LabelTooLong => "a label is longer than 63 bytes",
            NameError::NameTooLong => "the name is longer than 255 bytes in wire form",
        })
    }
}

/// Absorbs one label (its bytes, without the length byte) into `h`.
#[inline(always)]
pub fn hash_label(h: &mut NameHasher, label: &[u8]) {
    let len = label.len() as u8;
    let words = label_words(len);
    for k in 0..words {
        let mut b = [0u8; 8];
        for (j, out) in b.iter_mut().enumerate() {
            // Byte `8k + j` of the encoding `[len, label…]`.
            let at = 8 * k as usize + j;
            *out = if at == 0 {
                len
            } else {
                label.get(at - 1).copied().unwrap_or(0)
            };
        }
        h.write(label_word(u64::from_le_bytes(b), len, k));
    }
}

/// The key of a dotted name (`api.example.com`, a trailing dot allowed; letters in any case) in
/// `FQDN_EXACT`, and of a wildcard's suffix (`example.com` for `*.example.com`) in
/// `FQDN_WILDCARD`. Labels are taken as bytes: no escapes.
pub fn name_hash(key: [u64; 2], name: &[u8]) -> Result<u64, NameError> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    let mut wire = 1usize;
    let mut h = NameHasher::new(key);
    for label in name.rsplit(|&b| b == b'.') {
        if label.is_empty() {
            return Err(NameError::EmptyLabel);
        }
        if label.len() > FQDN_MAX_LABEL {
            return Err(NameError::LabelTooLong);
        }
        wire += 1 + label.len();
        if wire > FQDN_MAX_NAME {
            return Err(NameError::NameTooLong);
        }
        hash_label(&mut h, label);
    }
    Ok(h.finish())
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: #[repr(C)], Copy, no padding, every bit pattern valid.
    unsafe impl aya::Pod for FqdnConfig {}
    unsafe impl aya::Pod for FqdnLearnedKeyV4 {}
    unsafe impl aya::Pod for FqdnLearnedKeyV6 {}
    unsafe impl aya::Pod for FqdnLearned {}
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u64; 2] = [0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908];

    /// SipHash-2-4 of the bytes 0, 1, …, n−1 under the key 00…0f.
    fn reference_vector(n: usize) -> u64 {
        let mut h = NameHasher::new(KEY);
        let bytes: Vec<u8> = (0..n).map(|i| i as u8).collect();
        for c in bytes.chunks(8) {
            h.write(u64::from_le_bytes(c.try_into().expect("whole words")));
        }
        h.finish()
    }

    #[test]
    fn siphash_matches_the_reference_vectors() {
        // From the SipHash paper's reference implementation (vectors.h, SipHash-2-4, 64-bit
        // output, key 00…0f, message 00…n−1).
        assert_eq!(reference_vector(0), 0x726f_db47_dd0e_0e31);
        assert_eq!(reference_vector(8), 0x93f5_f579_9a93_2462);
        // And with the standard library's SipHash-2-4 over whole words, for longer messages.
        #[allow(deprecated)]
        for n in [16usize, 24, 64, 256] {
            use std::hash::Hasher;
            let mut std_h = std::hash::SipHasher::new_with_keys(KEY[0], KEY[1]);
            std_h.write(&(0..n).map(|i| i as u8).collect::<Vec<_>>());
            assert_eq!(reference_vector(n), std_h.finish(), "{n} bytes");
        }
    }

    #[test]
    fn lowercasing_touches_only_ascii_capitals() {
        for b in 0..=255u8 {
            let w = u64::from_le_bytes([b, b'A', b'z', b'Z', b'@', b'[', 0xc1, b]);
            let expect: Vec<u8> = w
                .to_le_bytes()
                .iter()
                .map(|c| c.to_ascii_lowercase())
                .collect();
            assert_eq!(lower_word(w).to_le_bytes().to_vec(), expect, "byte {b:#x}");
        }
    }

    #[test]
    fn name_hash_test_vectors() {
        // The encoding hashed: labels last to first, [len, bytes, zero padding to 8].
        let mut h = NameHasher::new(KEY);
        h.write(u64::from_le_bytes(*b"\x03com\0\0\0\0"));
        h.write(u64::from_le_bytes(*b"\x07example"));
        h.write(u64::from_le_bytes(*b"\x03api\0\0\0\0"));
        let expect = h.finish();
        assert_eq!(name_hash(KEY, b"api.example.com"), Ok(expect));
        assert_eq!(name_hash(KEY, b"API.Example.COM."), Ok(expect));
        // Fixed output, so that a change of the encoding is a visible change of the ABI.
        assert_eq!(expect, 0xbb0c_fef4_9802_6e9c);
        // A suffix is the prefix state of the encoding.
        let mut s = NameHasher::new(KEY);
        s.write(u64::from_le_bytes(*b"\x03com\0\0\0\0"));
        s.write(u64::from_le_bytes(*b"\x07example"));
        assert_eq!(name_hash(KEY, b"example.com"), Ok(s.finish()));
        // Other key, other hash.
        assert_ne!(name_hash([1, 2], b"api.example.com"), Ok(expect));
        // Label boundaries matter.
        assert_ne!(name_hash(KEY, b"ab.c"), name_hash(KEY, b"a.bc"));
        assert_ne!(
            name_hash(KEY, b"example.com"),
            name_hash(KEY, b"examplecom")
        );
    }

    #[test]
    fn labels_longer_than_a_word_and_the_limits() {
        let long = "a".repeat(63);
        let name = format!("{long}.{long}.{long}.x");
        assert!(name_hash(KEY, name.as_bytes()).is_ok());
        let too_long = format!("{long}.{long}.{long}.{long}");
        assert_eq!(
            name_hash(KEY, too_long.as_bytes()),
            Err(NameError::NameTooLong)
        );
        let label = "a".repeat(64);
        assert_eq!(
            name_hash(KEY, format!("{label}.com").as_bytes()),
            Err(NameError::LabelTooLong)
        );
        assert_eq!(name_hash(KEY, b""), Err(NameError::Empty));
        assert_eq!(name_hash(KEY, b"."), Err(NameError::Empty));
        assert_eq!(name_hash(KEY, b"a..com"), Err(NameError::EmptyLabel));
        // Case-insensitive for labels of any length, word boundaries included.
        assert_eq!(
            name_hash(KEY, b"ABCDEFGHIJKLMNOPQRSTUVWXYZ.Example"),
            name_hash(KEY, b"abcdefghijklmnopqrstuvwxyz.example")
        );
    }

    #[test]
    fn label_words_match_a_wire_read() {
        // The kernel reads words straight from the message at the length byte, with whatever
        // follows the label: the mask must give what hash_label builds.
        let msg = b"\x0aMiXeD-Case\x03COM\x00trailing";
        let mut from_wire = NameHasher::new(KEY);
        for start in [11usize, 0] {
            let len = msg[start];
            for k in 0..label_words(len) {
                let at = start + 8 * k as usize;
                let mut b = [0u8; 8];
                for (j, o) in b.iter_mut().enumerate() {
                    *o = msg.get(at + j).copied().unwrap_or(0xee);
                }
                from_wire.write(label_word(u64::from_le_bytes(b), len, k));
            }
        }
        assert_eq!(Ok(from_wire.finish()), name_hash(KEY, b"mixed-case.com"));
    }

    #[test]
    fn learned_slots_refresh_fill_and_replace() {
        let mut v = FqdnLearned::default();
        v.learn(7, 100, 10);
        v.learn(7, 50, 10);
        assert_eq!((v.name_ids[0], v.expires_ns[0]), (7, 100));
        for id in 8..=10 {
            v.learn(id, 200 + id as u64, 10);
        }
        assert_eq!(v.name_ids, [7, 8, 9, 10]);
        // Full: the first to expire goes.
        v.learn(11, 300, 10);
        assert_eq!(v.name_ids, [11, 8, 9, 10]);
        // Expired slots go first.
        v.learn(12, 400, 209);
        assert_eq!(v.name_ids, [11, 12, 9, 10]);
        assert!(!v.expire(209));
        assert_eq!(v.name_ids, [11, 12, 0, 10]);
        assert!(!v.expire(300));
        assert_eq!(v.name_ids, [0, 12, 0, 0]);
        assert!(v.expire(400));
    }

    #[test]
    fn ttl_bounds() {
        let c = FqdnConfig::default();
        assert_eq!(c.clamp_ttl(0), FQDN_DEFAULT_MIN_TTL_S);
        assert_eq!(c.clamp_ttl(u32::MAX), FQDN_DEFAULT_MAX_TTL_S);
        let c = FqdnConfig {
            min_ttl_s: 30,
            max_ttl_s: 60,
            ..Default::default()
        };
        assert_eq!(
            (c.clamp_ttl(1), c.clamp_ttl(45), c.clamp_ttl(99)),
            (30, 45, 60)
        );
    }

    #[test]
    fn layouts_have_no_padding() {
        use core::mem::size_of;
        assert_eq!(size_of::<FqdnConfig>(), 24);
        assert_eq!(size_of::<FqdnLearnedKeyV4>(), 8);
        assert_eq!(size_of::<FqdnLearnedKeyV6>(), 20);
        assert_eq!(size_of::<FqdnLearned>(), 48);
    }
}
