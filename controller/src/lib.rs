//! Bulkhead's policy engine: inventory and policies in, one compiled [`ruleset::RuleSet`] per
//! node out. See the README section "Policy engine".
//!
//! - [`load`] reads Kubernetes YAML (with validation) into [`model::Object`]s;
//! - [`engine::PolicyEngine`] compiles them and keeps per-node rule sets up to date
//!   ([`engine::Change`] in, [`ruleset::NodeDelta`]s out);
//! - [`reachability`] answers "may A talk to B, and why" from the compiled rule sets;
//! - [`answers`] are the questions both admin APIs answer from the recorded flows (recommend,
//!   what-if);
//! - [`server`] is the controller runtime: gRPC for agents, the HTTP API and web UI, metrics;
//! - [`service_policy`] documents Bulkhead's own ServicePolicy kind and where it sits.
//!
//! The rule-set contract (what a node's rule set is, precedence, the reference conntrack model)
//! lives in `bulkhead-ruleset`, which the agent shares; it is re-exported here as [`ruleset`].

pub mod answers;
pub mod distribution;
pub mod engine;
pub mod error;
pub mod flows;
pub mod identity;
pub mod impact;
pub mod kubernetes;
pub mod load;
pub mod model;
pub mod peering;
pub mod reachability;
pub mod recommend;
pub mod selector;
pub mod server;
pub mod service_policy;
pub mod supervise;

pub use bulkhead_ruleset as ruleset;
pub use engine::{Change, EngineConfig, PolicyEngine};
pub use error::{EngineError, FieldError, InputError};
pub use identity::LabelFilter;
pub use load::{Loaded, SkippedObject, load_paths, load_str};
pub use model::{Object, Pod, PodKey, Policy, PolicyKey};
