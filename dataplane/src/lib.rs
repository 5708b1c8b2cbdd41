//! Bulkhead's node agent: loads the eBPF programs, pins them, attaches them to endpoint veths,
//! writes compiled rule sets into the maps, and reads flow events; [`agent`] is the runtime
//! that puts them together (`bulkhead agent run`).

pub mod agent;
pub mod batch;
pub mod dense;
pub mod flows;
pub mod fqdn;
pub mod loader;
pub mod metrics;
pub mod netns;
pub mod policy_map;
pub mod privileged;
pub mod resolve;
pub mod rtnl;
pub mod sync;

/// The eBPF object built from `ebpf/` by this crate's build script.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bulkhead"));

/// Whether this binary carries the real eBPF object rather than the build's empty placeholder.
pub fn has_ebpf_object() -> bool {
    !EBPF_OBJECT.is_empty()
}
