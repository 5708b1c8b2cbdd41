//! Bulkhead's wire protocol (gRPC): rule-set distribution from the controller to its agents,
//! flow reports from the agents, and the controller's admin API. See
//! `proto/bulkhead/v1/distribution.proto` for the protocol's rules.
//!
//! - [`client`] says where the controller is and how a client proves who it is (mTLS);
//! - [`convert`] turns the rule-set contract into its protobuf messages and back;
//! - [`flows`] does the same for flow records (refusing, by field, what the contract cannot
//!   hold);
//! - [`fanout`] encodes the deltas of one change for many nodes, what they share encoded once;
//! - [`peering`] is a peer cluster's inventory export (`peering.proto`), typed and checked;
//! - [`parts`] cuts controller messages too large to send whole into parts and puts them back;
//! - [`follower`] is the agent's side of the distribution protocol, without the kernel: the agent
//!   binary, the controller's tests and the benchmarks follow a node's stream through it.

pub mod client;
pub mod convert;
pub mod fanout;
pub mod flows;
pub mod follower;
pub mod parts;
pub mod peering;

pub mod v1 {
    tonic::include_proto!("bulkhead.v1");
}

/// The protobuf runtime the generated code uses (for clients that encode by hand).
pub use prost;
