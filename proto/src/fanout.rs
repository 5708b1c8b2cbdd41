//! One change, many nodes: deltas encoded for the wire with what they share encoded once.
//!
//! A change that reaches many nodes (a quarantined address in every node's ipcache, a policy
//! group's new rules on every node that has the group, a rule renamed everywhere) puts the same
//! entries in every node's delta. [`FanoutEncoder`] encodes each such entry once per change and
//! shares the encoding (reference-counted bytes) between the nodes' messages; only a node's own
//! part (its name, versions, endpoints) is encoded per node.
//!
//! The result is a `ControllerMessage` carrying a `Delta`, as the chunks of its protobuf
//! encoding, sent as `Part`s (see `proto/bulkhead/v1/distribution.proto`): the agent puts the
//! parts together and decodes one `ControllerMessage`, the same as if it had been encoded whole.
//! Protobuf allows it: a message's fields may come in any order and a repeated or map field's
//! entries may be spread over the encoding, so the node's own fields followed by the shared
//! entries decode to the same message. Small shared entries are copied into the node's buffer
//! (a part of their own costs more than the copy); large ones travel as parts of their own,
//! the same bytes for every stream.

use std::{collections::HashMap, sync::Arc};

use bulkhead_ruleset as rs;
use prost::{
    Message,
    bytes::{BufMut, Bytes, BytesMut},
    encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len},
};

use crate::{
    convert::{
        addr_bytes, cidr_to, endpoint_delta_to, endpoint_to, ipcache_to, name_entry_to,
        policy_delta_to, policy_to, rule_to,
    },
    v1::{self as pb, ControllerMessage, controller_message},
};

/// Shared entries at least this large travel as parts of their own; smaller ones are copied
/// into each node's buffer.
pub const SHARED_PART_BYTES: usize = 4096;

/// `ControllerMessage.delta` and `Delta.delta` (distribution.proto).
const CONTROLLER_MESSAGE_DELTA: u32 = 2;
const DELTA_NODE_DELTA: u32 = 5;

/// One controller message as the chunks of its encoding, back to back. Cheap to clone: the
/// chunks are reference-counted and shared with other nodes' messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodedMessage {
    chunks: Arc<[Bytes]>,
    len: usize,
}

impl EncodedMessage {
    /// Bytes in the whole encoding.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The chunks of the encoding, in order.
    pub fn chunks(&self) -> &[Bytes] {
        &self.chunks
    }

    /// The whole encoding in one buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len);
        for c in self.chunks.iter() {
            v.extend_from_slice(c);
        }
        v
    }

    /// The message as parts of at most `part_bytes` each, cut where the chunks end (and inside
    /// a chunk larger than that): slices of the shared chunks, not copies.
    pub fn parts(&self, part_bytes: usize) -> impl Iterator<Item = ControllerMessage> + '_ {
        let part_bytes = part_bytes.max(1);
        let total = self.len as u64;
        let mut offset = 0u64;
        self.chunks.iter().flat_map(move |chunk| {
            let mut at = 0;
            let start = offset;
            offset += chunk.len() as u64;
            std::iter::from_fn(move || {
                if at >= chunk.len() {
                    return None;
                }
                let end = (at + part_bytes).min(chunk.len());
                let part = pb::Part {
                    total,
                    offset: start + at as u64,
                    data: chunk.slice(at..end),
                };
                at = end;
                Some(ControllerMessage {
                    msg: Some(controller_message::Msg::Part(part)),
                })
            })
        })
    }
}

/// Encodes the deltas of one change for their nodes, sharing what they have in common. Lives
/// for one change: its memory of encoded entries borrows that change's deltas.
#[derive(Debug)]
pub struct FanoutEncoder<'a> {
    epoch: u64,
    policies_added: HashMap<u32, (&'a rs::EndpointPolicy, Bytes)>,
    policies_changed: HashMap<u32, (&'a rs::PolicyDelta, Bytes)>,
    ipcache: HashMap<ipnetwork::IpNetwork, (&'a rs::IpCacheEntry, Bytes)>,
    rules: HashMap<u32, (&'a rs::RuleRef, Bytes)>,
    /// Entries encoded, and entries taken from an earlier node's encoding.
    pub encoded: u64,
    pub reused: u64,
}

/// The encoding of `value`, from `cache` when an equal value was encoded before under `key`.
fn shared<'a, K: std::hash::Hash + Eq, V: PartialEq>(
    cache: &mut HashMap<K, (&'a V, Bytes)>,
    counts: (&mut u64, &mut u64),
    key: K,
    value: &'a V,
    encode: impl FnOnce(&V) -> Vec<u8>,
) -> Bytes {
    if let Some((seen, bytes)) = cache.get(&key)
        && (std::ptr::eq(*seen, value) || *seen == value)
    {
        *counts.1 += 1;
        return bytes.clone();
    }
    *counts.0 += 1;
    let bytes = Bytes::from(encode(value));
    // A different value under a key already cached (not expected within one change) is
    // encoded on its own and not remembered.
    cache.entry(key).or_insert((value, bytes.clone()));
    bytes
}

impl<'a> FanoutEncoder<'a> {
    pub fn new(epoch: u64) -> FanoutEncoder<'a> {
        FanoutEncoder {
            epoch,
            policies_added: HashMap::new(),
            policies_changed: HashMap::new(),
            ipcache: HashMap::new(),
            rules: HashMap::new(),
            encoded: 0,
            reused: 0,
        }
    }

    /// `d` as the `ControllerMessage` that carries it (`Delta` from `d.from_version` to
    /// `d.version` of this encoder's epoch).
    pub fn delta(&mut self, d: &'a rs::NodeDelta, priority: bool) -> EncodedMessage {
        // The node's own fields, encoded for it alone.
        let own = pb::NodeDelta {
            node: d.node.clone(),
            from_version: d.from_version,
            version: d.version,
            node_removed: d.node_removed,
            endpoints_removed: d.endpoints_removed.clone(),
            endpoints_added: d.endpoints_added.iter().map(endpoint_to).collect(),
            endpoints_changed: d.endpoints_changed.iter().map(endpoint_delta_to).collect(),
            policies_removed: d.policies_removed.clone(),
            ipcache_removed: d.ipcache_removed.iter().map(cidr_to).collect(),
            rules_removed: d.rules_removed.clone(),
            // Name patterns are few and per node: encoded with the node's own fields.
            names_removed: d.names_removed.clone(),
            names_added: d.names_added.iter().map(name_entry_to).collect(),
            // A few addresses, the same on every node: cheaper to copy than to share.
            dns_resolvers: d.dns_resolvers.as_ref().map(|a| pb::AddressList {
                addrs: a.iter().map(addr_bytes).collect(),
            }),
            ..Default::default()
        }
        .encode_to_vec();
        // Entries other nodes may have too: each encoded as a NodeDelta holding only it, which
        // is exactly that entry's bytes in a NodeDelta's encoding.
        let mut pieces: Vec<Bytes> = Vec::new();
        let counts = (&mut self.encoded, &mut self.reused);
        for (k, p) in &d.policies_added {
            pieces.push(shared(
                &mut self.policies_added,
                (&mut *counts.0, &mut *counts.1),
                *k,
                p,
                |p| {
                    pb::NodeDelta {
                        policies_added: [(*k, policy_to(p))].into(),
                        ..Default::default()
                    }
                    .encode_to_vec()
                },
            ));
        }
        for (k, p) in &d.policies_changed {
            pieces.push(shared(
                &mut self.policies_changed,
                (&mut *counts.0, &mut *counts.1),
                *k,
                p,
                |p| {
                    pb::NodeDelta {
                        policies_changed: [(*k, policy_delta_to(p))].into(),
                        ..Default::default()
                    }
                    .encode_to_vec()
                },
            ));
        }
        for e in &d.ipcache_upserted {
            pieces.push(shared(
                &mut self.ipcache,
                (&mut *counts.0, &mut *counts.1),
                e.cidr,
                e,
                |e| {
                    pb::NodeDelta {
                        ipcache_upserted: vec![ipcache_to(e)],
                        ..Default::default()
                    }
                    .encode_to_vec()
                },
            ));
        }
        for (k, r) in &d.rules_upserted {
            pieces.push(shared(
                &mut self.rules,
                (&mut *counts.0, &mut *counts.1),
                *k,
                r,
                |r| {
                    pb::NodeDelta {
                        rules_upserted: [(*k, rule_to(r))].into(),
                        ..Default::default()
                    }
                    .encode_to_vec()
                },
            ));
        }
        let node_delta_len = own.len() + pieces.iter().map(Bytes::len).sum::<usize>();
        // Delta { from, version, priority, delta }, the node delta last.
        let head = pb::Delta {
            from: Some(pb::Version {
                epoch: self.epoch,
                version: d.from_version,
            }),
            version: Some(pb::Version {
                epoch: self.epoch,
                version: d.version,
            }),
            delta: None,
            priority,
        };
        let delta_len = head.encoded_len()
            + key_len(DELTA_NODE_DELTA)
            + encoded_len_varint(node_delta_len as u64)
            + node_delta_len;
        let len =
            key_len(CONTROLLER_MESSAGE_DELTA) + encoded_len_varint(delta_len as u64) + delta_len;
        let small: usize = pieces
            .iter()
            .map(Bytes::len)
            .filter(|l| *l < SHARED_PART_BYTES)
            .sum();
        let mut buf = BytesMut::with_capacity(len - node_delta_len + own.len() + small);
        encode_key(
            CONTROLLER_MESSAGE_DELTA,
            WireType::LengthDelimited,
            &mut buf,
        );
        encode_varint(delta_len as u64, &mut buf);
        head.encode_raw(&mut buf);
        encode_key(DELTA_NODE_DELTA, WireType::LengthDelimited, &mut buf);
        encode_varint(node_delta_len as u64, &mut buf);
        buf.put_slice(&own);
        let mut chunks = Vec::new();
        for p in pieces {
            if p.len() < SHARED_PART_BYTES {
                buf.put_slice(&p);
            } else {
                if !buf.is_empty() {
                    chunks.push(buf.split().freeze());
                }
                chunks.push(p);
            }
        }
        if !buf.is_empty() {
            chunks.push(buf.freeze());
        }
        debug_assert_eq!(chunks.iter().map(Bytes::len).sum::<usize>(), len);
        EncodedMessage {
            chunks: chunks.into(),
            len,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::parts::Reassembly;

    /// What the controller sent before: the delta converted and encoded whole.
    fn whole(epoch: u64, d: &rs::NodeDelta, priority: bool) -> ControllerMessage {
        ControllerMessage {
            msg: Some(controller_message::Msg::Delta(pb::Delta {
                from: Some(pb::Version {
                    epoch,
                    version: d.from_version,
                }),
                version: Some(pb::Version {
                    epoch,
                    version: d.version,
                }),
                delta: Some(d.into()),
                priority,
            })),
        }
    }

    fn received(m: &EncodedMessage, part_bytes: usize) -> ControllerMessage {
        let mut r = Reassembly::default();
        let mut out = None;
        for p in m.parts(part_bytes) {
            assert!(out.is_none(), "a part after the message was complete");
            out = r.push(p).expect("parts in order");
        }
        out.expect("the last part completes the message")
    }

    proptest! {
        /// Every node's message, shared pieces and all, decodes to exactly what encoding that
        /// node's delta whole gives, and back to the same delta.
        #[test]
        fn shared_encoding_decodes_as_the_whole_encoding(
            deltas in prop::collection::vec(crate::convert::tests::node_delta(), 1..6),
            epoch: u64,
            priority: bool,
            part in 1usize..300,
        ) {
            // Nodes sharing entries: each delta also carries the first one's entries.
            let first = deltas[0].clone();
            let deltas: Vec<rs::NodeDelta> = deltas
                .into_iter()
                .map(|mut d| {
                    d.policies_added.extend(first.policies_added.clone());
                    d.policies_changed.extend(first.policies_changed.clone());
                    d.rules_upserted.extend(first.rules_upserted.clone());
                    d.ipcache_upserted.extend(first.ipcache_upserted.clone());
                    d
                })
                .collect();
            let mut enc = FanoutEncoder::new(epoch);
            for d in &deltas {
                let m = enc.delta(d, priority);
                let expected = whole(epoch, d, priority);
                prop_assert_eq!(m.len(), expected.encoded_len());
                let decoded = ControllerMessage::decode(m.to_vec().as_slice()).expect("decodes");
                prop_assert_eq!(&decoded, &expected);
                prop_assert_eq!(&received(&m, part), &expected);
                let Some(controller_message::Msg::Delta(pb::Delta { delta: Some(nd), .. })) = &decoded.msg else {
                    panic!("not a delta");
                };
                prop_assert_eq!(&rs::NodeDelta::try_from(nd).expect("converts"), d);
            }
        }
    }

    fn quarantined(cidr: &str) -> rs::IpCacheEntry {
        rs::IpCacheEntry {
            cidr: cidr.parse().expect("cidr"),
            identity: 70_000,
            quarantined: true,
            quarantine_allow: vec![5, 6],
        }
    }

    #[test]
    fn an_entry_every_node_has_is_encoded_once() {
        let deltas: Vec<rs::NodeDelta> = (0..100)
            .map(|n| rs::NodeDelta {
                node: format!("node-{n}"),
                from_version: 4,
                version: 5,
                ipcache_upserted: vec![quarantined("10.0.0.7/32")],
                ..Default::default()
            })
            .collect();
        let mut enc = FanoutEncoder::new(9);
        let messages: Vec<_> = deltas.iter().map(|d| enc.delta(d, true)).collect();
        assert_eq!((enc.encoded, enc.reused), (1, 99));
        for (d, m) in deltas.iter().zip(&messages) {
            assert_eq!(received(m, 1 << 20), whole(9, d, true));
        }
    }

    #[test]
    fn equal_keys_with_different_values_are_not_confused() {
        let mut other = quarantined("10.0.0.7/32");
        other.quarantine_allow = vec![8];
        let a = rs::NodeDelta {
            node: "a".into(),
            version: 1,
            ipcache_upserted: vec![quarantined("10.0.0.7/32")],
            ..Default::default()
        };
        let b = rs::NodeDelta {
            node: "b".into(),
            version: 1,
            ipcache_upserted: vec![other],
            ..Default::default()
        };
        let mut enc = FanoutEncoder::new(1);
        let (ma, mb) = (enc.delta(&a, false), enc.delta(&b, false));
        assert_eq!(enc.reused, 0);
        assert_eq!(received(&ma, 64), whole(1, &a, false));
        assert_eq!(received(&mb, 64), whole(1, &b, false));
    }

    #[test]
    fn a_large_shared_entry_is_one_buffer_for_every_node() {
        let policy = rs::EndpointPolicy {
            ingress: rs::DirectionPolicy {
                entries: (0..2000)
                    .map(|i| rs::PolicyEntry {
                        peer: i,
                        protocol: Some(rs::Protocol::Tcp),
                        ports: rs::PortRange::single(8080),
                        tier: rs::Tier::Application,
                        priority: 0,
                        action: rs::Action::Allow,
                        stage: rs::Stage::Enforced,
                        rule: 7 << 10,
                    })
                    .collect(),
                ..Default::default()
            },
            ..Default::default()
        };
        let deltas: Vec<rs::NodeDelta> = (0..3)
            .map(|n| rs::NodeDelta {
                node: format!("node-{n}"),
                version: 2,
                from_version: 1,
                policies_added: [(42, policy.clone())].into(),
                ..Default::default()
            })
            .collect();
        let mut enc = FanoutEncoder::new(3);
        let messages: Vec<_> = deltas.iter().map(|d| enc.delta(d, false)).collect();
        let big: Vec<&Bytes> = messages
            .iter()
            .map(|m| {
                m.chunks()
                    .iter()
                    .find(|c| c.len() >= SHARED_PART_BYTES)
                    .expect("the policy in a chunk of its own")
            })
            .collect();
        assert!(big.windows(2).all(|w| w[0].as_ptr() == w[1].as_ptr()));
        for (d, m) in deltas.iter().zip(&messages) {
            assert_eq!(received(m, 1 << 20), whole(3, d, false));
            assert_eq!(received(m, 1000), whole(3, d, false));
        }
    }
}
