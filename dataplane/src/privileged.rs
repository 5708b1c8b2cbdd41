//! What privileged tests and commands need to know about the machine they run on.

use std::path::Path;

/// Set in CI: a privileged test that cannot run must fail instead of skipping.
pub const REQUIRE_PRIVILEGED_ENV: &str = "BULKHEAD_REQUIRE_PRIVILEGED";

/// Why this process cannot load eBPF programs and create network namespaces, if it cannot.
pub fn missing_privileges() -> Option<String> {
    if !crate::has_ebpf_object() {
        return Some(
            "the agent was built with the placeholder eBPF object (no bpf-linker); run `cargo xtask setup`"
                .into(),
        );
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some(
            "not running as root (CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON are needed)".into(),
        );
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Some("the kernel has no BTF (/sys/kernel/btf/vmlinux)".into());
    }
    None
}

/// For tests: `true` when the test may run; prints why and returns `false` when it must skip;
/// panics when `BULKHEAD_REQUIRE_PRIVILEGED=1` and it cannot run.
pub fn check_privileged_test(name: &str) -> bool {
    match missing_privileges() {
        None => true,
        Some(why) => {
            if std::env::var(REQUIRE_PRIVILEGED_ENV).is_ok_and(|v| v == "1") {
                panic!("{name}: cannot run privileged test ({why}) and {REQUIRE_PRIVILEGED_ENV}=1");
            }
            eprintln!("skipping {name}: {why}");
            false
        }
    }
}
