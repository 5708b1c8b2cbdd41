//! Bulkhead's policy engine. See the crate README section "Policy engine" in the top-level README.

pub mod ruleset;
