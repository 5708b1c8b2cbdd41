//! Rule-set distribution to the node agents over gRPC (see `proto/bulkhead/v1/distribution.proto`):
//! the [`hub::Hub`] keeps each node's followers, [`service`] speaks the agents' protocol, [`admin`]
//! the CLI's and the UI's, [`FlowStore`] keeps the flow records in memory,
//! and [`source::ManifestSource`] feeds the engine from a directory of Kubernetes YAML.

pub mod admin;
pub mod auth;
#[cfg(test)]
mod flow_api_tests;
mod flow_store;
pub mod hub;
pub mod quarantine;
pub mod service;
pub mod source;
#[cfg(test)]
mod tests;

pub use admin::AdminService;
pub use auth::ClientPolicy;
pub use flow_store::FlowStore;
pub use hub::Hub;
pub use service::DistributionService;
pub use source::ManifestSource;
