//! Message size limits of the `Distribution` service, and large controller messages cut into
//! parts (see `Part` in `proto/bulkhead/v1/distribution.proto`).
//!
//! A 100k-pod cluster gives a node a rule set of several megabytes; a message that size would
//! meet gRPC's 4 MiB default limit. Rather than make every limit as large as the largest rule set
//! could be, the controller cuts any message larger than [`PART_BYTES`] into parts, at the byte
//! level of its protobuf encoding, and the agent puts them back together up to
//! [`MAX_REASSEMBLED_BYTES`]. The limits are set explicitly on both ends.

use crate::{
    prost::Message,
    v1::{self as pb, ControllerMessage, controller_message},
};

/// Controller messages larger than this travel as parts of this size.
pub const PART_BYTES: usize = 1 << 20;

/// What the controller's `Distribution` service accepts from agents in one message (hellos, acks,
/// flow batches) and sends in one message (a part and its framing fit with room to spare).
pub const SERVER_MESSAGE_BYTES: usize = 4 << 20;

/// What an agent accepts in one message. Larger than a part: a controller from before parts
/// sends a rule set whole, and an agent should still follow one of that size.
pub const AGENT_MESSAGE_BYTES: usize = 64 << 20;

/// The largest message an agent puts together from parts: far above a 100k-pod cluster's rule set
/// (about 7 MB), low enough that a broken or hostile stream cannot make the agent allocate
/// without bound.
pub const MAX_REASSEMBLED_BYTES: u64 = 128 << 20;

/// `msg` as it goes on the wire: itself, or its encoding cut into parts when it is larger than
/// `part_bytes`. The message is dropped once encoded and each part is copied out only when it
/// is taken, so a large snapshot costs its encoding and the parts in flight, not two more copies.
pub fn split(msg: ControllerMessage, part_bytes: usize) -> impl Iterator<Item = ControllerMessage> {
    let part_bytes = part_bytes.max(1);
    let (whole, bytes) = if msg.encoded_len() <= part_bytes {
        (Some(msg), Vec::new())
    } else {
        (None, msg.encode_to_vec())
    };
    let total = bytes.len() as u64;
    let mut offset = 0;
    let parts = std::iter::from_fn(move || {
        if offset >= bytes.len() {
            return None;
        }
        let end = (offset + part_bytes).min(bytes.len());
        let part = pb::Part {
            total,
            offset: offset as u64,
            data: prost::bytes::Bytes::copy_from_slice(&bytes[offset..end]),
        };
        offset = end;
        Some(ControllerMessage {
            msg: Some(controller_message::Msg::Part(part)),
        })
    });
    whole.into_iter().chain(parts)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PartError {
    #[error(
        "the controller announced a {total}-byte message, over this agent's limit of {limit} bytes"
    )]
    TooLarge { total: u64, limit: u64 },
    #[error("part at offset {offset} arrived where offset {expected} was due")]
    OutOfOrder { offset: u64, expected: u64 },
    #[error("part runs past the announced size of {total} bytes")]
    Overrun { total: u64 },
    #[error("a message arrived between the parts of another")]
    Interrupted,
    #[error("the assembled message does not decode: {0}")]
    Decode(String),
    #[error("an assembled message is itself a part")]
    Nested,
}

/// Puts parts back together; whole messages pass through.
#[derive(Debug)]
pub struct Reassembly {
    limit: u64,
    /// The announced size and what arrived of it.
    pending: Option<(u64, Vec<u8>)>,
}

impl Default for Reassembly {
    fn default() -> Self {
        Reassembly::new(MAX_REASSEMBLED_BYTES)
    }
}

impl Reassembly {
    pub fn new(limit: u64) -> Reassembly {
        Reassembly {
            limit,
            pending: None,
        }
    }

    /// Bytes held for a message not complete yet.
    pub fn pending_bytes(&self) -> usize {
        self.pending.as_ref().map_or(0, |(_, b)| b.len())
    }

    /// The message `msg` completes, if any: a whole message, or the last part of one.
    pub fn push(&mut self, msg: ControllerMessage) -> Result<Option<ControllerMessage>, PartError> {
        let part = match msg.msg {
            Some(controller_message::Msg::Part(p)) => p,
            _ if self.pending.is_some() => return Err(PartError::Interrupted),
            _ => return Ok(Some(msg)),
        };
        let (total, mut buf) = match self.pending.take() {
            Some(pending) => pending,
            None => {
                if part.total > self.limit {
                    return Err(PartError::TooLarge {
                        total: part.total,
                        limit: self.limit,
                    });
                }
                // Grows as parts arrive: the announced size is a claim, not a reservation.
                (part.total, Vec::new())
            }
        };
        if part.total != total || part.offset != buf.len() as u64 {
            return Err(PartError::OutOfOrder {
                offset: part.offset,
                expected: buf.len() as u64,
            });
        }
        if buf.len() as u64 + part.data.len() as u64 > total {
            return Err(PartError::Overrun { total });
        }
        buf.extend_from_slice(&part.data);
        if (buf.len() as u64) < total {
            self.pending = Some((total, buf));
            return Ok(None);
        }
        let whole = ControllerMessage::decode(buf.as_slice())
            .map_err(|e| PartError::Decode(e.to_string()))?;
        if matches!(whole.msg, Some(controller_message::Msg::Part(_))) {
            return Err(PartError::Nested);
        }
        Ok(Some(whole))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn snapshot(len: usize, seed: u8) -> ControllerMessage {
        ControllerMessage {
            msg: Some(controller_message::Msg::Snapshot(pb::Snapshot {
                version: Some(pb::Version {
                    epoch: 7,
                    version: 3,
                }),
                ruleset: Some(pb::RuleSet {
                    node: (0..len)
                        .map(|i| char::from(b'a' + (i as u8).wrapping_add(seed) % 26))
                        .collect(),
                    ..Default::default()
                }),
            })),
        }
    }

    proptest! {
        #[test]
        fn parts_put_back_together_are_the_message(len in 0usize..5000, part in 1usize..700, seed: u8) {
            let msg = snapshot(len, seed);
            let parts: Vec<_> = split(msg.clone(), part).collect();
            prop_assert_eq!(parts.len() > 1, msg.encoded_len() > part);
            let mut r = Reassembly::default();
            let mut out = Vec::new();
            for p in parts {
                prop_assert!(p.encoded_len() <= part + 32);
                if let Some(m) = r.push(p).expect("in order") {
                    out.push(m);
                }
            }
            prop_assert_eq!(out, vec![msg]);
            prop_assert_eq!(r.pending_bytes(), 0);
        }

        /// Parts dropped, repeated or swapped never yield a message other than the one sent.
        #[test]
        fn damaged_part_sequences_fail_or_yield_nothing_else(len in 100usize..3000, drop in 0usize..8, dup in 0usize..8) {
            let msg = snapshot(len, 1);
            let mut parts: Vec<_> = split(msg.clone(), 64).collect();
            let d = drop % parts.len();
            let copy = parts[dup % parts.len()].clone();
            parts.remove(d);
            parts.insert(dup % (parts.len() + 1), copy);
            let mut r = Reassembly::default();
            for p in parts {
                match r.push(p) {
                    Ok(Some(m)) => prop_assert_eq!(&m, &msg),
                    Ok(None) => {}
                    Err(_) => break,
                }
            }
        }
    }

    #[test]
    fn an_announced_size_over_the_cap_is_refused_before_anything_is_held() {
        let mut r = Reassembly::new(1000);
        let part = ControllerMessage {
            msg: Some(controller_message::Msg::Part(pb::Part {
                total: u64::MAX,
                offset: 0,
                data: vec![0; 10].into(),
            })),
        };
        assert!(matches!(r.push(part), Err(PartError::TooLarge { .. })));
        assert_eq!(r.pending_bytes(), 0);
    }

    #[test]
    fn a_whole_message_between_parts_is_refused() {
        let mut parts: Vec<_> = split(snapshot(500, 0), 100).collect();
        let mut r = Reassembly::default();
        assert_eq!(r.push(parts.remove(0)), Ok(None));
        assert_eq!(r.push(snapshot(1, 0)), Err(PartError::Interrupted));
    }
}
