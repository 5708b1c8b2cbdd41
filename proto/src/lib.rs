//! Bulkhead's wire protocol (gRPC): rule-set distribution from the controller to its agents,
//! flow reports from the agents, and the controller's admin API. See
//! `proto/bulkhead/v1/distribution.proto` for the protocol's rules.

pub mod v1 {
    tonic::include_proto!("bulkhead.v1");
}

/// The protobuf runtime the generated code uses (for clients that encode by hand).
pub use prost;
