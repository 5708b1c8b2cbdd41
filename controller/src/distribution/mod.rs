//! Rule-set distribution to the node agents over gRPC (see `proto/bulkhead/v1/distribution.proto`):
//! the [`hub::Hub`] keeps each node's rule set and its followers, [`service`] speaks the protocol,
//! and [`source::ManifestSource`] feeds the engine from a directory of Kubernetes YAML.

pub mod auth;
pub mod hub;
pub mod quarantine;
pub mod service;
pub mod source;
#[cfg(test)]
mod tests;

pub use auth::ClientPolicy;
pub use hub::Hub;
pub use service::{AdminService, DistributionService, FlowStore};
pub use source::ManifestSource;
