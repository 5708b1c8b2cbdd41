//! The HTTP/1 server under the controller's and the agent's HTTP endpoints ([`serve`], with the
//! limits `axum::serve` does not set) and the `Host` check against DNS rebinding
//! ([`host_check`]). Both daemons use it; neither depends on the other.

pub mod host_check;
mod serve;

pub use host_check::{AllowedHosts, ErrorBody, check_host, is_loopback_host};
pub use serve::{Limits, serve};
