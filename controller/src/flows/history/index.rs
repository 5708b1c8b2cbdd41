//! The history's index by pod and namespace: one small Bloom filter per chunk, in a table of its
//! own (`chunk_filters(chunk, filter)`), written in the transaction that writes the chunk and
//! deleted in the transaction that drops it.
//!
//! Why a filter per chunk and not a side table of `(pod, chunk)` rows:
//! * **Size.** A busy chunk (16,384 records) names about as many pods as the cluster has that
//!   talk; a row per pod and chunk, with a second ordering so that retention can delete a
//!   chunk's rows, costs ≈ 16 B per pod and chunk, plus a table of interned names that retention
//!   must collect. A filter costs 10 bits per pod and chunk (≈ 2.6 kB for 2,100 keys, under 1 %
//!   of the chunk), and nothing outlives its chunk.
//! * **Retention and size accounting stay one row per chunk.** The filter's row is found and
//!   deleted by the chunk's id; its length is known, so retention counts what it frees.
//! * **Exactness is not needed.** Every record a query decodes is checked against its filter
//!   anyway ([`FlowFilter::matches`]), so a false positive (≈ 0.8 % of the chunks that do not
//!   hold the pod) costs one chunk decoded for nothing, never a wrong answer; a Bloom filter has
//!   no false negatives, so no record is hidden.
//! * **Cost of a query.** It reads the filters of the chunks in its time range (a few kB each,
//!   a few hundred chunks for 10 M records) and decodes only the chunks that may hold the pod.
//!   A table of rows would find them without reading the others' filters; at these sizes that
//!   saves milliseconds, against decoding that takes seconds.
//!
//! A chunk without a filter row (written by a format-1 controller, before the index) and a
//! filter this controller cannot read "may contain" anything: it is decoded, as before.
//!
//! The keys are the names [`FlowFilter::matches`] compares a filter with, without a directory
//! (the history names peers when it writes them): for a flow record, the reporting endpoint
//! (`namespace/pod`, or `endpoint#ID` for one its agent could not name), the named peer, and
//! both namespaces; for a quarantine action, its pod and the pod's namespace.
//!
//! The filter's bytes: a version (1), the number of hash functions `k`, then the bits. The hash
//! is defined here (FNV-1a then a SplitMix64 finaliser, double hashing) so that it is the same
//! in every build: the filters are on disk.

use crate::{
    flows::FlowFilter,
    ruleset::{EndpointRef, FlowEntry, PodKey},
};

/// The version byte of the filters written here.
const VERSION: u8 = 1;
/// Bits per key: with 7 hashes, ≈ 0.8 % false positives.
const BITS_PER_KEY: usize = 10;
const HASHES: u8 = 7;
/// The smallest filter, bits.
const MIN_BITS: usize = 64;

/// What a key names: a pod (or unnamed endpoint) or a namespace.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u8)]
enum Kind {
    Pod = b'p',
    Namespace = b'n',
}

/// The keys of one chunk, gathered as records are added to it (their hashes: the names
/// themselves are not kept).
#[derive(Default, Debug)]
pub(super) struct ChunkKeys {
    hashes: rustc_hash::FxHashSet<u64>,
}

impl ChunkKeys {
    /// Adds the pods and namespaces that `entry` concerns, as a query without a directory sees
    /// them.
    pub(super) fn add(&mut self, entry: &FlowEntry) {
        match entry {
            FlowEntry::Flow(r) => {
                match &r.endpoint {
                    EndpointRef::Pod(p) => self.add_pod(p),
                    EndpointRef::Unnamed(id) => {
                        self.hashes.insert(key_hash(
                            Kind::Pod,
                            &[b"endpoint#", id.to_string().as_bytes()],
                        ));
                    }
                }
                if let Some(p) = &r.peer {
                    self.add_pod(p);
                }
            }
            FlowEntry::Quarantine(q) => self.add_pod(&q.pod),
        }
    }

    fn add_pod(&mut self, p: &PodKey) {
        self.hashes.insert(key_hash(
            Kind::Pod,
            &[p.namespace.as_bytes(), b"/", p.name.as_bytes()],
        ));
        self.hashes
            .insert(key_hash(Kind::Namespace, &[p.namespace.as_bytes()]));
    }

    /// The filter of these keys.
    pub(super) fn filter(&self) -> Vec<u8> {
        let bits = (self.hashes.len() * BITS_PER_KEY)
            .max(MIN_BITS)
            .next_multiple_of(64);
        let mut out = vec![0u8; 2 + bits / 8];
        out[0] = VERSION;
        out[1] = HASHES;
        for &h in &self.hashes {
            for bit in positions(h, HASHES, bits as u64) {
                out[2 + (bit / 8) as usize] |= 1 << (bit % 8);
            }
        }
        out
    }
}

/// The keys a query needs a chunk to hold (all of them): its pod and its namespace.
#[derive(Debug, Clone, Default)]
pub(super) struct QueryKeys {
    hashes: Vec<u64>,
}

impl QueryKeys {
    pub(super) fn of(filter: &FlowFilter) -> QueryKeys {
        let mut hashes = Vec::new();
        if let Some(p) = &filter.pod {
            hashes.push(key_hash(Kind::Pod, &[p.as_bytes()]));
        }
        if let Some(ns) = &filter.namespace {
            hashes.push(key_hash(Kind::Namespace, &[ns.as_bytes()]));
        }
        QueryKeys { hashes }
    }

    /// Whether the query can skip chunks at all.
    pub(super) fn selective(&self) -> bool {
        !self.hashes.is_empty()
    }

    /// Whether a chunk with this filter may hold records the query matches. No filter, or one
    /// this controller cannot read: it may.
    pub(super) fn may_match(&self, filter: Option<&[u8]>) -> bool {
        let Some(f) = filter else { return true };
        let readable = f.len() > 2 && f[0] == VERSION && f[1] > 0;
        if !readable {
            return true;
        }
        let (k, bits) = (f[1], &f[2..]);
        let m = bits.len() as u64 * 8;
        self.hashes.iter().all(|&h| {
            positions(h, k, m).all(|bit| bits[(bit / 8) as usize] & (1 << (bit % 8)) != 0)
        })
    }
}

/// The bit positions of a key in a filter of `m` bits (Kirsch–Mitzenmacher double hashing).
fn positions(h: u64, k: u8, m: u64) -> impl Iterator<Item = u64> {
    let h1 = h;
    let h2 = mix(h ^ 0x9e37_79b9_7f4a_7c15) | 1;
    (0..k as u64).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % m)
}

/// A stable 64-bit hash of the key's kind and its name (given in parts).
fn key_hash(kind: Kind, parts: &[&[u8]]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for &b in std::iter::once(&[kind as u8][..])
        .chain(parts.iter().copied())
        .flatten()
    {
        h ^= b as u64;
        h = h.wrapping_mul(PRIME);
    }
    mix(h)
}

/// SplitMix64's finaliser: spreads FNV's weak low bits over the word.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter_of(names: &[&str]) -> Vec<u8> {
        let mut keys = ChunkKeys::default();
        for n in names {
            let (ns, name) = n.split_once('/').expect("ns/pod");
            keys.add_pod(&PodKey {
                namespace: ns.into(),
                name: name.into(),
            });
        }
        keys.filter()
    }

    fn pod(p: &str) -> QueryKeys {
        QueryKeys::of(&FlowFilter {
            pod: Some(p.into()),
            ..FlowFilter::default()
        })
    }

    #[test]
    fn a_filter_holds_every_key_it_was_given_and_few_others() {
        let names: Vec<String> = (0..2000)
            .map(|i| format!("ns-{}/pod-{i}", i / 20))
            .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let f = filter_of(&refs);
        assert!(names.iter().all(|n| pod(n).may_match(Some(&f))));
        let ns = QueryKeys::of(&FlowFilter {
            namespace: Some("ns-7".into()),
            ..FlowFilter::default()
        });
        assert!(ns.may_match(Some(&f)));
        let false_positives = (0..10_000)
            .filter(|i| pod(&format!("other-{i}/pod")).may_match(Some(&f)))
            .count();
        assert!(false_positives < 300, "{false_positives} of 10,000");
        // A namespace is not a pod, and a pod's name alone is not it.
        let f = filter_of(&["shop/web-0"]);
        assert!(!pod("shop").may_match(Some(&f)));
        assert!(!pod("web-0").may_match(Some(&f)));
        assert!(pod("shop/web-0").may_match(Some(&f)));
    }

    #[test]
    fn no_filter_or_an_unknown_one_may_hold_anything() {
        let q = pod("tools/debug");
        assert!(q.may_match(None));
        assert!(q.may_match(Some(&[])));
        let mut newer = filter_of(&["shop/web-0"]);
        assert!(!q.may_match(Some(&newer)));
        newer[0] = VERSION + 1;
        assert!(q.may_match(Some(&newer)));
        assert!(!QueryKeys::of(&FlowFilter::default()).selective());
    }
}
