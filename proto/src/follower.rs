//! The agent's side of the protocol, without the kernel: follow one node's stream, check that
//! every delta continues the realized version, rebuild the rule set, and ack. The real agent
//! passes a `realize` that writes the BPF maps; tests and the scale benchmark pass one that
//! only records the rule set.

use std::{future::Future, sync::Arc, time::Instant};

use crate::v1::{
    self as pb, AgentMessage, ControllerMessage, agent_message, controller_message,
    distribution_client::DistributionClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use bulkhead_ruleset::{NodeDelta, RuleSet};

#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("controller stream: {0}")]
    Stream(#[from] tonic::Status),
    #[error("the controller closed the stream")]
    Closed,
    #[error("cannot decode {what} from the controller: {reason}")]
    Decode { what: &'static str, reason: String },
    #[error("delta {from}→{to} does not follow the realized version {have}; resynchronising")]
    Gap { from: u64, to: u64, have: u64 },
    #[error("a delta arrived before any snapshot; resynchronising")]
    NoSnapshot,
    #[error("delta does not apply: {0}; resynchronising")]
    Apply(String),
    #[error("version {version} could not be realized: {reason}; resynchronising")]
    Realize { version: u64, reason: String },
    #[error("cannot put a large message from the controller together: {0}; resynchronising")]
    Parts(#[from] crate::parts::PartError),
}

/// Where a follower stands: survives reconnects, so a hello can say what it realized.
///
/// The rule set is kept behind an [`Arc`] and deltas are applied to it in place: a delta costs
/// its own size, not a copy of the rule set (a realizer that keeps the `Arc` it was handed makes
/// the next delta copy once, on write).
#[derive(Debug, Clone, Default)]
pub struct Follower {
    pub node: String,
    /// The rule set being followed, with its epoch: the last one realized, or the one being
    /// realized between [`Follower::next`] and [`Follower::commit`]. Dropped whenever what it
    /// holds may not be what is enforced, so the next delta asks for a snapshot.
    current: Option<(u64, Arc<RuleSet>)>,
    /// The last version acked as realized (epoch, version): what a hello reports.
    realized: Option<(u64, u64)>,
}

impl Follower {
    pub fn new(node: &str) -> Follower {
        Follower {
            node: node.to_string(),
            current: None,
            realized: None,
        }
    }

    /// The rule set last realized, with its epoch.
    pub fn current(&self) -> Option<(u64, &RuleSet)> {
        match (&self.current, self.realized) {
            (Some((epoch, rs)), Some((e, v))) if *epoch == e && rs.version == v => {
                Some((*epoch, rs.as_ref()))
            }
            _ => None,
        }
    }

    pub fn hello(&self) -> AgentMessage {
        AgentMessage {
            msg: Some(agent_message::Msg::Hello(pb::Hello {
                node: self.node.clone(),
                realized: self
                    .realized
                    .map(|(epoch, version)| pb::Version { epoch, version }),
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
            })),
        }
    }

    /// The rule set a message asks to realize (not yet committed), with its epoch. A delta is
    /// applied in place to the rule set being followed; until [`Follower::commit`] the hello
    /// still reports the version realized before it.
    pub fn next(
        &mut self,
        msg: ControllerMessage,
    ) -> Result<Option<(u64, Arc<RuleSet>)>, FollowError> {
        match msg.msg {
            Some(controller_message::Msg::Snapshot(snap)) => {
                let v = snap.version.unwrap_or_default();
                let rs = snap
                    .ruleset
                    .as_ref()
                    .ok_or_else(|| "it holds no rule set".to_string())
                    .and_then(|r| RuleSet::try_from(r).map_err(|e| e.to_string()))
                    .map_err(|reason| FollowError::Decode {
                        what: "a snapshot",
                        reason,
                    })?;
                if rs.version != v.version {
                    return Err(FollowError::Decode {
                        what: "a snapshot",
                        reason: format!("version {} but rule set {}", v.version, rs.version),
                    });
                }
                let rs = Arc::new(rs);
                self.current = Some((v.epoch, rs.clone()));
                Ok(Some((v.epoch, rs)))
            }
            Some(controller_message::Msg::Delta(d)) => {
                let from = d.from.unwrap_or_default();
                let to = d.version.unwrap_or_default();
                let Some((epoch, base)) = &self.current else {
                    return Err(FollowError::NoSnapshot);
                };
                let epoch = *epoch;
                if from.epoch != epoch || to.epoch != epoch || from.version != base.version {
                    return Err(FollowError::Gap {
                        from: from.version,
                        to: to.version,
                        have: base.version,
                    });
                }
                let delta = d
                    .delta
                    .as_ref()
                    .ok_or_else(|| "it holds no change".to_string())
                    .and_then(|n| NodeDelta::try_from(n).map_err(|e| e.to_string()))
                    .map_err(|reason| FollowError::Decode {
                        what: "a delta",
                        reason,
                    })?;
                // Taken out while it changes: if the delta does not apply, nothing half-applied
                // stays behind and the next session starts from a snapshot.
                let (_, mut rs) = self.current.take().ok_or(FollowError::NoSnapshot)?;
                Arc::make_mut(&mut rs)
                    .apply_delta(&delta)
                    .map_err(|e| FollowError::Apply(e.to_string()))?;
                self.current = Some((epoch, rs.clone()));
                Ok(Some((epoch, rs)))
            }
            // Parts are put together before they get here (see `parts::Reassembly`).
            Some(controller_message::Msg::Part(_)) => Err(FollowError::Decode {
                what: "a message",
                reason: "a part of a larger message arrived unassembled".into(),
            }),
            None => Ok(None),
        }
    }

    /// Records that `version` of `epoch` was realized.
    pub fn commit(&mut self, epoch: u64, version: u64) {
        self.realized = Some((epoch, version));
    }

    /// The rule set handed out by [`Follower::next`] could not be realized: what is enforced
    /// is still the version last committed. Forget the rule set so only a snapshot continues.
    pub fn abandon(&mut self) {
        self.current = None;
    }
}

/// What realizing a version did, reported in its ack.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Realized {
    /// Tracked connections cut (endpoints that became quarantined).
    pub connections_cut: u64,
}

fn ack(
    epoch: u64,
    version: u64,
    started: Instant,
    result: &Result<Realized, String>,
) -> AgentMessage {
    AgentMessage {
        msg: Some(agent_message::Msg::Ack(pb::Ack {
            version: Some(pb::Version { epoch, version }),
            ok: result.is_ok(),
            error: result.as_ref().err().cloned().unwrap_or_default(),
            apply_micros: started.elapsed().as_micros() as u64,
            connections_cut: result.as_ref().map_or(0, |r| r.connections_cut),
        })),
    }
}

/// `Bearer <token>` as a metadata value; a token that cannot be one (not visible ASCII) is
/// refused before anything is sent.
pub fn bearer_value(token: &str) -> Result<tonic::metadata::AsciiMetadataValue, tonic::Status> {
    format!("Bearer {}", token.trim()).parse().map_err(|_| {
        tonic::Status::invalid_argument(
            "the agent's token is not printable ascii: check --token-file",
        )
    })
}

/// One stream: hello, then realize and ack every version until the stream ends. `connected` is
/// called once the stream is open. `realize` gets the complete new rule set; keeping the `Arc`
/// beyond the call is allowed (the follower then copies the rule set before the next delta).
pub async fn run_session<F, Fut>(
    channel: Channel,
    follower: &mut Follower,
    realize: F,
    connected: impl FnOnce(),
) -> Result<(), FollowError>
where
    F: FnMut(Arc<RuleSet>) -> Fut,
    Fut: Future<Output = Result<Realized, String>>,
{
    run_session_with_token(channel, None, follower, realize, connected).await
}

/// [`run_session`], sending `token` as `authorization: Bearer …` (an agent pod's
/// service-account token, for a controller that checks which node a shared certificate's
/// holder runs on).
pub async fn run_session_with_token<F, Fut>(
    channel: Channel,
    token: Option<&str>,
    follower: &mut Follower,
    mut realize: F,
    connected: impl FnOnce(),
) -> Result<(), FollowError>
where
    F: FnMut(Arc<RuleSet>) -> Fut,
    Fut: Future<Output = Result<Realized, String>>,
{
    let mut client = DistributionClient::new(channel)
        .max_decoding_message_size(crate::parts::AGENT_MESSAGE_BYTES)
        .max_encoding_message_size(crate::parts::SERVER_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel::<AgentMessage>(16);
    // The queue is empty and ours: this cannot fail.
    let _ = tx.try_send(follower.hello());
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", bearer_value(token)?);
    }
    let mut inbound = client.sync(request).await?.into_inner();
    connected();
    // Large rule sets and deltas come in parts; a stream that breaks off halfway leaves
    // nothing behind (the next session starts a fresh reassembly).
    let mut parts = crate::parts::Reassembly::default();
    while let Some(msg) = inbound.message().await? {
        let Some(msg) = parts.push(msg)? else {
            continue;
        };
        let Some((epoch, rs)) = follower.next(msg)? else {
            continue;
        };
        let started = Instant::now();
        let version = rs.version;
        let result = realize(rs).await;
        if tx
            .send(ack(epoch, version, started, &result))
            .await
            .is_err()
        {
            return Err(FollowError::Closed);
        }
        match result {
            Ok(_) => follower.commit(epoch, version),
            // What is enforced is still the previous version: start over from a snapshot.
            Err(reason) => {
                follower.abandon();
                return Err(FollowError::Realize { version, reason });
            }
        }
    }
    Err(FollowError::Closed)
}
