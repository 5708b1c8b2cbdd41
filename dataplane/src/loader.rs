//! Loading, pinning and attaching the eBPF programs.
//!
//! Layout under the pin directory (`/sys/fs/bpf/bulkhead/<node>` for the agent):
//! `maps/<MAP>` — every map, reused as is when the agent restarts, so enforcement state survives;
//! `links/<ifname>__<hook>` — one TCX link per endpoint hook. A pinned link keeps its program
//! attached while no process holds it; a restarted agent swaps in its freshly loaded program
//! with `bpf_link_update`, an atomic replacement, so no packet ever goes unchecked.

use std::{
    fs, io,
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use bulkhead_common::{
    Config, Counter, CtKey, CtKeyV4, CtValue, ENDPOINT_SLOTS, EndpointAddrKey, EndpointInfo,
    IpCacheValue, PolicyKey, PolicySummary, PolicyValue, PrefilterKey, PrefilterValue,
    QuarantineAllowKey,
};

pub const PROG_FROM_POD: &str = "bulkhead_from_pod";
pub const PROG_TO_POD: &str = "bulkhead_to_pod";
/// `bulkhead_to_pod` without learning from DNS answers, for the benchmark; never attached.
pub const PROG_TO_POD_WITHOUT_DNS: &str = "bulkhead_to_pod_without_dns";
pub const PROG_PARSE_ONLY: &str = "bulkhead_parse_only";
pub const PROG_PREFILTER: &str = "bulkhead_prefilter";
/// The same prefilter as a TC classifier, for the uplink's tcx ingress.
pub const PROG_PREFILTER_TC: &str = "bulkhead_prefilter_tc";
/// Samples (jiffies, monotonic ns) for [`Dataplane::calibrate_clock`]; never attached.
pub const PROG_CLOCK_PROBE: &str = "bulkhead_clock_probe";

/// `XDP_DROP` and `TC_ACT_SHOT`: the prefilter's drop on each hook.
const XDP_DROP: u32 = 1;
const TC_ACT_SHOT: u32 = 2;

/// Pinned link names: `<ifname><suffix>` (bpffs refuses dots in names).
const LINK_FROM_POD: &str = "__from-pod";
const LINK_TO_POD: &str = "__to-pod";
const LINK_XDP: &str = "__xdp";
const LINK_PREFILTER_TC: &str = "__prefilter-tc";

/// Where the uplink prefilter runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrefilterHook {
    /// TC ingress (tcx), after GRO: an aggregated packet is checked once, so TCP throughput
    /// is kept; dropped packets have cost an skb.
    #[default]
    Tc,
    /// XDP, before the stack allocates anything: the cheapest drop, but on veth and
    /// virtio_net native XDP turns GRO/TSO aggregation off for everything that arrives.
    Xdp,
}

impl PrefilterHook {
    fn suffix(self) -> &'static str {
        match self {
            PrefilterHook::Tc => LINK_PREFILTER_TC,
            PrefilterHook::Xdp => LINK_XDP,
        }
    }

    fn other(self) -> PrefilterHook {
        match self {
            PrefilterHook::Tc => PrefilterHook::Xdp,
            PrefilterHook::Xdp => PrefilterHook::Tc,
        }
    }
}

impl std::fmt::Display for PrefilterHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PrefilterHook::Tc => "tc",
            PrefilterHook::Xdp => "xdp",
        })
    }
}

/// bpffs root (`statfs` reports `BPF_FS_MAGIC` for it).
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "this binary carries no eBPF object (built without bpf-linker); run `cargo xtask setup` and rebuild"
    )]
    NoObject,
    #[error(
        "cannot mount bpffs at {BPFFS_ROOT}: {0}; mount it with `mount -t bpf bpf {BPFFS_ROOT}`"
    )]
    Bpffs(String),
    #[error("cannot prepare pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error("cannot load the eBPF object: {0} (is this root on a kernel >= 5.15 with BTF?)")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {name} is missing or has the wrong type: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("interface {ifname}: {reason}")]
    Interface { ifname: String, reason: String },
    #[error("cannot map {name} into memory: {reason} (kernel >= 5.5 supports mmapable arrays)")]
    Mmap { name: &'static str, reason: String },
}

fn program_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> LoadError {
    move |source| LoadError::Program { name, source }
}

/// A program of the object by name, as its concrete type.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(LoadError::Program {
            name,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(program_err(name))
}

/// Mounts bpffs at `/sys/fs/bpf` unless it is mounted there already.
pub fn ensure_bpffs() -> Result<(), LoadError> {
    let root = Path::new(BPFFS_ROOT);
    if is_bpffs(root) {
        return Ok(());
    }
    fs::create_dir_all(root).map_err(|e| LoadError::Bpffs(e.to_string()))?;
    nix::mount::mount(
        Some("bpf"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| LoadError::Bpffs(e.to_string()))?;
    if is_bpffs(root) {
        Ok(())
    } else {
        Err(LoadError::Bpffs(
            "mounted, but statfs does not see bpffs".into(),
        ))
    }
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// The loaded programs and maps of one node.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    dense_v4: crate::dense::DenseIpCache,
    /// Maps whose type the kernel offers no batch operations for: written key by key.
    unbatched: std::collections::BTreeSet<(&'static str, crate::batch::Op)>,
}

/// Which side of an endpoint's host veth a program is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// TC ingress of the host-side veth: packets from the pod.
    FromPod,
    /// TC egress of the host-side veth: packets to the pod.
    ToPod,
}

impl Hook {
    fn program(self) -> &'static str {
        match self {
            Hook::FromPod => PROG_FROM_POD,
            Hook::ToPod => PROG_TO_POD,
        }
    }
    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::FromPod => TcAttachType::Ingress,
            Hook::ToPod => TcAttachType::Egress,
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            Hook::FromPod => LINK_FROM_POD,
            Hook::ToPod => LINK_TO_POD,
        }
    }
}

impl Dataplane {
    /// Loads the embedded object; maps are created under (or reopened from) `pin_dir/maps`.
    pub fn load(pin_dir: &Path) -> Result<Self, LoadError> {
        if !crate::has_ebpf_object() {
            return Err(LoadError::NoObject);
        }
        ensure_bpffs()?;
        for sub in ["maps", "links"] {
            let path = pin_dir.join(sub);
            fs::create_dir_all(&path).map_err(|source| LoadError::PinDir { path, source })?;
        }
        // Connections tracked under the conntrack layout before `CtValue::names` are read before
        // their maps are replaced, and carried over below.
        let before_names = ConnectionsBeforeNames::read(&pin_dir.join("maps"));
        retire_incompatible_pins(&pin_dir.join("maps"));
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir.join("maps"))
            .load(crate::EBPF_OBJECT)?;
        for name in [
            PROG_FROM_POD,
            PROG_TO_POD,
            PROG_TO_POD_WITHOUT_DNS,
            PROG_PARSE_ONLY,
            PROG_CLOCK_PROBE,
            PROG_PREFILTER_TC,
        ] {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load().map_err(program_err(name))?;
        }
        let xdp: &mut Xdp = program(&mut ebpf, PROG_PREFILTER)?;
        xdp.load().map_err(program_err(PROG_PREFILTER))?;
        let dense_v4 = match ebpf.map("IPCACHE_DENSE_V4") {
            Some(aya::maps::Map::Array(data)) => {
                crate::dense::DenseIpCache::map(data).map_err(|e| LoadError::Mmap {
                    name: "IPCACHE_DENSE_V4",
                    reason: e.to_string(),
                })?
            }
            _ => {
                return Err(LoadError::Map {
                    name: "IPCACHE_DENSE_V4",
                    source: aya::maps::MapError::InvalidName {
                        name: "IPCACHE_DENSE_V4".into(),
                    },
                });
            }
        };
        let mut dp = Dataplane {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            dense_v4,
            unbatched: Default::default(),
        };
        let carried = before_names.restore(&mut dp)?;
        if carried > 0 {
            tracing::info!(
                connections = carried,
                "carried tracked connections over to the conntrack layout with learned names"
            );
        }
        match dp.calibrate_clock()? {
            Some((tick, _)) => tracing::debug!(tick_ns = tick, "data-plane clock runs on jiffies"),
            None => tracing::warn!(
                "could not measure the kernel tick; the programs read the coarse clock through a helper call (a few ns more per packet)"
            ),
        }
        Ok(dp)
    }

    /// Measures the kernel tick against the monotonic clock and writes it to `CONFIG` (keeping
    /// the rest), so the programs' per-packet clock is an inlined jiffies read instead of a
    /// helper call (see `Config::jiffy_ns`). Samples (jiffies, ns) with the probe program and
    /// keeps two tick edges it saw closely (the sample before the edge less than 20 µs before
    /// the one after, so a preempted sampler cannot skew them): a few ticks on an idle machine.
    /// On a machine so busy that the sampler is preempted around every edge, the bound loosens
    /// after 500 ms (100 µs) and after 1 s (500 µs): the offset is then off by at most that,
    /// which conntrack timeouts and rate limits in seconds do not notice. Returns the tick and
    /// offset written, or None (nothing written) when no two such edges came within 2 s.
    pub fn calibrate_clock(&mut self) -> Result<Option<(u32, u64)>, LoadError> {
        let started = std::time::Instant::now();
        let bound_ns = |elapsed: Duration| match elapsed.as_millis() {
            0..500 => 20_000,
            500..1000 => 100_000,
            _ => 500_000,
        };
        let mut prev = self.clock_sample()?;
        let mut edges = Vec::with_capacity(2);
        while edges.len() < 2 && started.elapsed() < Duration::from_secs(2) {
            let s = self.clock_sample()?;
            if s.0 != prev.0 && s.1.saturating_sub(prev.1) < bound_ns(started.elapsed()) {
                edges.push(s);
            }
            prev = s;
        }
        let clock = match edges[..] {
            [a, b] => bulkhead_common::clock_from_samples(a, b),
            _ => None,
        };
        if let Some((tick, offset)) = clock {
            let mut config = self.config()?;
            let mut cfg = config.get(&0, 0).unwrap_or_default();
            cfg.jiffy_ns = tick;
            cfg.clock_offset_ns = offset;
            config.set(0, cfg, 0).map_err(|source| LoadError::Map {
                name: "CONFIG",
                source,
            })?;
        }
        Ok(clock)
    }

    /// One (jiffies, monotonic ns) sample from the probe program.
    fn clock_sample(&mut self) -> Result<(u64, u64), LoadError> {
        self.test_run(PROG_CLOCK_PROBE, &[0u8; 64], 0, 1)?;
        let m: Array<&mut MapData, [u64; 2]> = self.map_mut("CLOCK_SAMPLE")?;
        let v = m.get(&0, 0).map_err(|source| LoadError::Map {
            name: "CLOCK_SAMPLE",
            source,
        })?;
        Ok((v[0], v[1]))
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn link_pin(&self, ifname: &str, hook: Hook) -> PathBuf {
        self.pin_dir
            .join("links")
            .join(format!("{ifname}{}", hook.suffix()))
    }

    /// Attaches both TC programs to an endpoint's host-side interface. An existing pinned link
    /// (left by a previous agent) is updated in place, atomically.
    pub fn attach_endpoint(&mut self, ifname: &str) -> Result<(), LoadError> {
        for hook in [Hook::FromPod, Hook::ToPod] {
            self.attach_hook(ifname, hook)?;
        }
        Ok(())
    }

    fn attach_hook(&mut self, ifname: &str, hook: Hook) -> Result<(), LoadError> {
        let pin = self.link_pin(ifname, hook);
        self.attach_tcx(ifname, hook.program(), hook.attach_type(), &pin)
    }

    /// Attaches the TC program `name` to `ifname` at `attach_type` (tcx) and pins the link at
    /// `pin`. A link an earlier agent pinned there is updated in place, atomically; a dead or
    /// unusable one is dropped and the program attached anew.
    fn attach_tcx(
        &mut self,
        ifname: &str,
        name: &'static str,
        attach_type: TcAttachType,
        pin: &Path,
    ) -> Result<(), LoadError> {
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        let reused = match PinnedLink::from_pin(pin) {
            Ok(old) => {
                let fd = FdLink::from(old);
                match SchedClassifierLink::try_from(fd) {
                    Ok(link) => prog.attach_to_link(link).ok(),
                    Err(_) => None,
                }
            }
            Err(_) => None,
        };
        let id = match reused {
            Some(id) => id,
            None => {
                let _ = fs::remove_file(pin);
                prog.attach_with_options(
                    ifname,
                    attach_type,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|e| LoadError::Interface {
                    ifname: ifname.to_string(),
                    reason: format!("attach {name}: {e}"),
                })?
            }
        };
        let link = prog.take_link(id).map_err(program_err(name))?;
        let fd: FdLink = link.try_into().map_err(|e| LoadError::Interface {
            ifname: ifname.to_string(),
            reason: format!("link of {name} is not an fd link: {e}"),
        })?;
        let _ = fs::remove_file(pin);
        fd.pin(pin).map_err(|e| LoadError::Interface {
            ifname: ifname.to_string(),
            reason: format!("pin link at {}: {e}", pin.display()),
        })?;
        Ok(())
    }

    /// Detaches an endpoint's programs (removing the pins releases the links).
    pub fn detach_endpoint(&mut self, ifname: &str) {
        for hook in [Hook::FromPod, Hook::ToPod] {
            let _ = fs::remove_file(self.link_pin(ifname, hook));
        }
    }

    /// Interfaces that have pinned links (attached by this or an earlier agent).
    pub fn attached_interfaces(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.pin_dir.join("links"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                name.strip_suffix(LINK_FROM_POD)
                    .or_else(|| name.strip_suffix(LINK_TO_POD))
                    .map(str::to_string)
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Attaches the prefilter to an uplink interface at `hook`, and takes it off the other
    /// hook (an agent restarted with another choice). On TC, an earlier agent's link is
    /// updated in place like the endpoints'; on XDP, native mode, else generic.
    pub fn attach_prefilter(&mut self, ifname: &str, hook: PrefilterHook) -> Result<(), LoadError> {
        match hook {
            PrefilterHook::Tc => self.attach_prefilter_tc(ifname)?,
            PrefilterHook::Xdp => self.attach_prefilter_xdp(ifname)?,
        }
        let _ = fs::remove_file(self.prefilter_pin(ifname, hook.other()));
        Ok(())
    }

    /// Takes the prefilter off an uplink, from both hooks (`--prefilter off`).
    pub fn detach_prefilter(&mut self, ifname: &str) {
        for hook in [PrefilterHook::Tc, PrefilterHook::Xdp] {
            let _ = fs::remove_file(self.prefilter_pin(ifname, hook));
        }
    }

    /// Uplinks that have a pinned prefilter link, with its hook.
    pub fn prefiltered_interfaces(&self) -> Vec<(String, PrefilterHook)> {
        let mut found: Vec<(String, PrefilterHook)> = fs::read_dir(self.pin_dir.join("links"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                [PrefilterHook::Tc, PrefilterHook::Xdp]
                    .into_iter()
                    .find_map(|h| name.strip_suffix(h.suffix()).map(|n| (n.to_string(), h)))
            })
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
    }

    fn prefilter_pin(&self, ifname: &str, hook: PrefilterHook) -> PathBuf {
        self.pin_dir
            .join("links")
            .join(format!("{ifname}{}", hook.suffix()))
    }

    fn attach_prefilter_tc(&mut self, ifname: &str) -> Result<(), LoadError> {
        let pin = self.prefilter_pin(ifname, PrefilterHook::Tc);
        self.attach_tcx(ifname, PROG_PREFILTER_TC, TcAttachType::Ingress, &pin)
    }

    fn attach_prefilter_xdp(&mut self, ifname: &str) -> Result<(), LoadError> {
        let pin = self.prefilter_pin(ifname, PrefilterHook::Xdp);
        let prog: &mut Xdp = program(&mut self.ebpf, PROG_PREFILTER)?;
        // A restarted agent finds the link an earlier one pinned (the interface admits one XDP
        // link): swap the program inside it, atomically, as for the TC links.
        let reused = match PinnedLink::from_pin(&pin) {
            Ok(old) => match XdpLink::try_from(FdLink::from(old)) {
                Ok(link) => prog.attach_to_link(link).ok(),
                Err(_) => None,
            },
            Err(_) => None,
        };
        let id = match reused {
            Some(id) => id,
            None => {
                // Dead or unusable: dropping the pin releases the old link.
                let _ = fs::remove_file(&pin);
                match prog.attach(ifname, XdpMode::Driver) {
                    Ok(id) => id,
                    Err(_) => {
                        prog.attach(ifname, XdpMode::Skb)
                            .map_err(|e| LoadError::Interface {
                                ifname: ifname.to_string(),
                                reason: format!("attach XDP prefilter: {e}"),
                            })?
                    }
                }
            }
        };
        let link = prog.take_link(id).map_err(program_err(PROG_PREFILTER))?;
        if let Ok(fd) = FdLink::try_from(link) {
            let _ = fs::remove_file(&pin);
            fd.pin(&pin).map_err(|e| LoadError::Interface {
                ifname: ifname.to_string(),
                reason: format!("pin XDP link: {e}"),
            })?;
        }
        Ok(())
    }

    /// Runs a TC program once (or `repeat` times) on `packet` with BPF_PROG_TEST_RUN, as if it
    /// arrived on interface `ifindex`. Returns the program's return value and the mean duration.
    pub fn test_run(
        &mut self,
        program: &'static str,
        packet: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<(u32, Duration), LoadError> {
        let prog: &mut SchedClassifier = self::program(&mut self.ebpf, program)?;
        // struct __sk_buff up to and including `ifindex` (offset 40); the rest stays zero.
        let mut ctx = [0u8; 44];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; packet.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = Some(&mut out);
        opts.ctx_in = Some(&ctx);
        opts.repeat = repeat.max(1);
        let result = prog.test_run(opts).map_err(program_err(program))?;
        Ok((result.return_value, result.duration))
    }

    /// Runs the prefilter of `hook` once (or `repeat` times) on `packet` with
    /// BPF_PROG_TEST_RUN. Returns whether it dropped the packet and the mean duration.
    pub fn test_run_prefilter_at(
        &mut self,
        hook: PrefilterHook,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(bool, Duration), LoadError> {
        match hook {
            PrefilterHook::Xdp => {
                let (action, d) = self.test_run_prefilter(packet, repeat)?;
                Ok((action == XDP_DROP, d))
            }
            PrefilterHook::Tc => {
                let (action, d) = self.test_run(PROG_PREFILTER_TC, packet, 0, repeat)?;
                Ok((action == TC_ACT_SHOT, d))
            }
        }
    }

    /// Runs the XDP prefilter once (or `repeat` times) on `packet` with BPF_PROG_TEST_RUN.
    /// Returns the XDP action and the mean duration.
    pub fn test_run_prefilter(
        &mut self,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(u32, Duration), LoadError> {
        let prog: &mut Xdp = self::program(&mut self.ebpf, PROG_PREFILTER)?;
        let mut out = vec![0u8; packet.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = Some(&mut out);
        opts.repeat = repeat.max(1);
        let result = prog.test_run(opts).map_err(program_err(PROG_PREFILTER))?;
        Ok((result.return_value, result.duration))
    }

    /// Endpoints of interfaces with index `ENDPOINT_SLOTS` or above; see [`Self::set_endpoint`].
    pub fn endpoints(&mut self) -> Result<HashMap<&mut MapData, u32, EndpointInfo>, LoadError> {
        self.map_mut("ENDPOINTS")
    }

    /// Endpoints of interfaces with index below `ENDPOINT_SLOTS`, by index.
    pub fn endpoint_slots(&mut self) -> Result<Array<&mut MapData, EndpointInfo>, LoadError> {
        self.map_mut("ENDPOINT_SLOTS")
    }

    /// Writes the endpoint of interface `ifindex` in one map update (the slot array below
    /// `ENDPOINT_SLOTS`, the hash above).
    pub fn set_endpoint(&mut self, ifindex: u32, info: EndpointInfo) -> Result<(), LoadError> {
        if ifindex < ENDPOINT_SLOTS {
            self.endpoint_slots()?
                .set(ifindex, info, 0)
                .map_err(|source| LoadError::Map {
                    name: "ENDPOINT_SLOTS",
                    source,
                })
        } else {
            self.endpoints()?
                .insert(ifindex, info, 0)
                .map_err(|source| LoadError::Map {
                    name: "ENDPOINTS",
                    source,
                })
        }
    }

    /// The endpoint of interface `ifindex`, if one is written.
    pub fn endpoint(&mut self, ifindex: u32) -> Result<Option<EndpointInfo>, LoadError> {
        if ifindex < ENDPOINT_SLOTS {
            Ok(self
                .endpoint_slots()?
                .get(&ifindex, 0)
                .ok()
                .filter(|e| e.flags != 0))
        } else {
            Ok(self.endpoints()?.get(&ifindex, 0).ok())
        }
    }

    /// Clears the endpoint of interface `ifindex` (absent is fine).
    pub fn clear_endpoint(&mut self, ifindex: u32) -> Result<(), LoadError> {
        if ifindex < ENDPOINT_SLOTS {
            self.endpoint_slots()?
                .set(ifindex, EndpointInfo::default(), 0)
                .map_err(|source| LoadError::Map {
                    name: "ENDPOINT_SLOTS",
                    source,
                })
        } else {
            let _ = self.endpoints()?.remove(&ifindex);
            Ok(())
        }
    }

    /// Every written endpoint, by interface index.
    pub fn endpoint_list(&mut self) -> Result<Vec<(u32, EndpointInfo)>, LoadError> {
        let mut out: Vec<(u32, EndpointInfo)> = self
            .endpoint_slots()?
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.ok().filter(|e| e.flags != 0).map(|e| (i as u32, e)))
            .collect();
        out.extend(self.endpoints()?.iter().flatten());
        Ok(out)
    }

    pub fn endpoint_addrs(
        &mut self,
    ) -> Result<HashMap<&mut MapData, EndpointAddrKey, u32>, LoadError> {
        self.map_mut("ENDPOINT_ADDRS")
    }

    /// Port-range keys (aligned port-prefix blocks).
    pub fn policy_ranges(
        &mut self,
    ) -> Result<LpmTrie<&mut MapData, PolicyKey, PolicyValue>, LoadError> {
        self.map_mut("POLICY")
    }

    pub fn policy_summary(
        &mut self,
    ) -> Result<HashMap<&mut MapData, PolicyKey, PolicySummary>, LoadError> {
        self.map_mut("POLICY_SUMMARY")
    }

    pub fn policy_exact(
        &mut self,
    ) -> Result<HashMap<&mut MapData, PolicyKey, PolicyValue>, LoadError> {
        self.map_mut("POLICY_EXACT")
    }

    pub fn ipcache_host_v4(
        &mut self,
    ) -> Result<HashMap<&mut MapData, [u8; 4], IpCacheValue>, LoadError> {
        self.map_mut("IPCACHE_HOST_V4")
    }

    /// The dense IPv4 identity array (see [`crate::dense`]).
    pub fn dense_v4(&self) -> &crate::dense::DenseIpCache {
        &self.dense_v4
    }

    pub fn ipcache_host_v6(
        &mut self,
    ) -> Result<HashMap<&mut MapData, [u8; 16], IpCacheValue>, LoadError> {
        self.map_mut("IPCACHE_HOST_V6")
    }

    pub fn prefilter_deny(
        &mut self,
    ) -> Result<HashMap<&mut MapData, PrefilterKey, PrefilterValue>, LoadError> {
        self.map_mut("PREFILTER_DENY")
    }

    pub fn ipcache_v4(
        &mut self,
    ) -> Result<LpmTrie<&mut MapData, [u8; 4], IpCacheValue>, LoadError> {
        self.map_mut("IPCACHE_V4")
    }

    pub fn ipcache_v6(
        &mut self,
    ) -> Result<LpmTrie<&mut MapData, [u8; 16], IpCacheValue>, LoadError> {
        self.map_mut("IPCACHE_V6")
    }

    pub fn quarantine_allow(
        &mut self,
    ) -> Result<HashMap<&mut MapData, QuarantineAllowKey, u32>, LoadError> {
        self.map_mut("QUARANTINE_ALLOW")
    }

    /// IPv6 connections (see [`Dataplane::conntrack_v4`] for IPv4).
    pub fn conntrack(&mut self) -> Result<HashMap<&mut MapData, CtKey, CtValue>, LoadError> {
        self.map_mut("CONNTRACK")
    }

    pub fn conntrack_v4(&mut self) -> Result<HashMap<&mut MapData, CtKeyV4, CtValue>, LoadError> {
        self.map_mut("CONNTRACK_V4")
    }

    /// Copies IPv4 connections an agent before `CONNTRACK_V4` tracked in `CONNTRACK` to
    /// `CONNTRACK_V4`, where the new programs look them up; a connection the new programs
    /// track already keeps their entry. Run before the new programs are attached, so that they
    /// know every connection from their first packet (the old programs, still attached, go on
    /// with theirs). Returns the old keys.
    pub fn copy_ipv4_connections(&mut self) -> Result<Vec<CtKey>, LoadError> {
        let copying: Vec<(CtKey, CtKeyV4, CtValue)> = self
            .conntrack()?
            .iter()
            .flatten()
            .filter_map(|(k, v)| CtKeyV4::narrow(&k).map(|k4| (k, k4, v)))
            .collect();
        let mut v4 = self.conntrack_v4()?;
        for (_, k4, v) in &copying {
            if v4.get(k4, 0).is_err() {
                let _ = v4.insert(k4, v, 0);
            }
        }
        Ok(copying.into_iter().map(|(k, _, _)| k).collect())
    }

    /// Moves the IPv4 connections of `CONNTRACK` to `CONNTRACK_V4`: copies them (again: the old
    /// programs may have opened some since [`Self::copy_ipv4_connections`]), then removes them
    /// from `CONNTRACK`. Run once the new programs are attached (so no old program adds more);
    /// returns how many moved.
    pub fn move_ipv4_connections(&mut self) -> Result<usize, LoadError> {
        let moved = self.copy_ipv4_connections()?;
        let mut old = self.conntrack()?;
        for k in &moved {
            let _ = old.remove(k);
        }
        Ok(moved.len())
    }

    pub fn config(&mut self) -> Result<Array<&mut MapData, Config>, LoadError> {
        self.map_mut("CONFIG")
    }

    pub fn counters(&mut self) -> Result<PerCpuArray<&mut MapData, Counter>, LoadError> {
        self.map_mut("COUNTERS")
    }

    pub fn stats(&mut self) -> Result<PerCpuArray<&mut MapData, u64>, LoadError> {
        self.map_mut("STATS")
    }

    /// Takes a map out of the object (for the ring buffer reader, which lives on its own task).
    pub fn take_map(&mut self, name: &'static str) -> Option<aya::maps::Map> {
        self.ebpf.take_map(name)
    }

    /// The file descriptor of a hash map or LPM trie, for the batch operations
    /// ([`crate::batch`]); check the key and value types with [`Dataplane::map_mut`] first.
    pub(crate) fn map_fd(&self, name: &'static str) -> Result<BorrowedFd<'_>, LoadError> {
        use aya::maps::Map;
        let invalid = |map: &'static str| LoadError::Map {
            name: map,
            source: aya::maps::MapError::InvalidName {
                name: map.to_string(),
            },
        };
        match self.ebpf.map(name).ok_or_else(|| invalid(name))? {
            Map::HashMap(m) | Map::LruHashMap(m) | Map::LpmTrie(m) => Ok(m.fd().as_fd()),
            _ => Err(invalid(name)),
        }
    }

    /// Whether the kernel was found to lack this batch operation for this map.
    pub fn unbatched(&self, name: &'static str, op: crate::batch::Op) -> bool {
        self.unbatched.contains(&(name, op))
    }

    /// Remembers that the kernel has no batch operations for this map's type.
    pub(crate) fn set_unbatched(&mut self, name: &'static str, op: crate::batch::Op) {
        if self.unbatched.insert((name, op)) {
            tracing::debug!(
                map = name,
                ?op,
                "the kernel lacks this batch operation for this map: one call per key instead"
            );
        }
    }

    pub fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T, LoadError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self.ebpf.map_mut(name).ok_or(LoadError::Map {
            name,
            source: aya::maps::MapError::InvalidName {
                name: name.to_string(),
            },
        })?;
        T::try_from(map).map_err(|source| LoadError::Map { name, source })
    }
}

/// A map pinned by an agent whose object defined it differently (another key or value layout,
/// another size) would be reused as it is and misread by the new programs: its pin is removed so
/// the new map is created in its place. The old programs keep the old map until their links are
/// switched to the new ones, which happens only after the first apply has filled the new maps.
/// What is lost is the old map's content: tracked connections are judged anew.
/// `CtValue`'s size before it recorded learned names (`CtValue::names`, issue 19).
const CT_VALUE_BEFORE_NAMES: usize = 64;

/// The tracked connections of an agent whose `CtValue` predates `names`, read from its pinned
/// conntrack maps before [`retire_incompatible_pins`] replaces them: without them every
/// established connection would lose its entry on the upgrade, and a reply the policy of its
/// own direction does not admit (an egress connection's answer, where ingress is isolated)
/// would be dropped. Their layout is the new one without the trailing `names`, which they had
/// none of.
#[derive(Default)]
struct ConnectionsBeforeNames {
    v6: Vec<(CtKey, [u8; CT_VALUE_BEFORE_NAMES])>,
    v4: Vec<(CtKeyV4, [u8; CT_VALUE_BEFORE_NAMES])>,
}

impl ConnectionsBeforeNames {
    fn read(maps_dir: &Path) -> ConnectionsBeforeNames {
        ConnectionsBeforeNames {
            v6: read_old_conntrack(&maps_dir.join("CONNTRACK")),
            v4: read_old_conntrack(&maps_dir.join("CONNTRACK_V4")),
        }
    }

    /// Writes the connections into the new maps (those the new maps track already keep their
    /// entry); returns how many were written.
    fn restore(self, dp: &mut Dataplane) -> Result<usize, LoadError> {
        let mut written = 0;
        if !self.v6.is_empty() {
            let mut m = dp.conntrack()?;
            for (k, v) in &self.v6 {
                if m.get(k, 0).is_err() && m.insert(k, ct_value_before_names(v), 0).is_ok() {
                    written += 1;
                }
            }
        }
        if !self.v4.is_empty() {
            let mut m = dp.conntrack_v4()?;
            for (k, v) in &self.v4 {
                if m.get(k, 0).is_err() && m.insert(k, ct_value_before_names(v), 0).is_ok() {
                    written += 1;
                }
            }
        }
        Ok(written)
    }
}

/// The entries of a pinned conntrack map of the layout before `CtValue::names`; none when the
/// pin is missing or of another layout.
fn read_old_conntrack<K: aya::Pod>(pin: &Path) -> Vec<(K, [u8; CT_VALUE_BEFORE_NAMES])> {
    let old_layout = aya::maps::MapInfo::from_pin(pin).is_ok_and(|info| {
        info.key_size() as usize == size_of::<K>()
            && info.value_size() as usize == CT_VALUE_BEFORE_NAMES
    });
    if !old_layout {
        return Vec::new();
    }
    let Ok(data) = MapData::from_pin(pin) else {
        return Vec::new();
    };
    match HashMap::<MapData, K, [u8; CT_VALUE_BEFORE_NAMES]>::try_from(aya::maps::Map::LruHashMap(
        data,
    )) {
        Ok(m) => m.iter().flatten().collect(),
        Err(_) => Vec::new(),
    }
}

/// A conntrack value of the layout before `names` (the same fields in the same places).
fn ct_value_before_names(b: &[u8; CT_VALUE_BEFORE_NAMES]) -> CtValue {
    let u64_at = |i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().unwrap_or_default());
    let u32_at = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().unwrap_or_default());
    CtValue {
        created_ns: u64_at(0),
        last_seen_ns: u64_at(8),
        packets_fwd: u64_at(16),
        bytes_fwd: u64_at(24),
        packets_rev: u64_at(32),
        bytes_rev: u64_at(40),
        generation: u32_at(48),
        rule_id: u32_at(52),
        peer_identity: u32_at(56),
        flags: u32_at(60),
        names: [bulkhead_common::fqdn::FQDN_NAME_ID_NONE; bulkhead_common::fqdn::FQDN_MAX_IDS],
    }
}

fn retire_incompatible_pins(maps_dir: &Path) {
    let Ok(object) = aya_obj::Object::parse(crate::EBPF_OBJECT) else {
        return;
    };
    for (name, def) in &object.maps {
        let path = maps_dir.join(name);
        if !path.exists() {
            continue;
        }
        let compatible = aya::maps::MapInfo::from_pin(&path).is_ok_and(|info| {
            info.key_size() == def.key_size()
                && info.value_size() == def.value_size()
                && info.max_entries() == def.max_entries()
        });
        if !compatible {
            tracing::warn!(
                map = %name, pin = %path.display(),
                "a pinned map from another agent version has a different layout: replacing it (its entries are lost)"
            );
            let _ = fs::remove_file(&path);
        }
    }
}

/// Removes everything pinned under `pin_dir` (links first, so programs detach, then maps).
/// Whatever else sits there (a directory in the way of a pin, pins of another version) goes
/// too; one entry that cannot be removed does not keep the rest, and the first error is
/// returned.
pub fn remove_pins(pin_dir: &Path) -> io::Result<()> {
    if !pin_dir.exists() {
        return Ok(());
    }
    let mut first_error = None;
    for sub in ["links", "maps"] {
        let dir = pin_dir.join(sub);
        if dir.exists()
            && let Err(e) = fs::remove_dir_all(&dir)
        {
            first_error.get_or_insert(e);
        }
    }
    if let Err(e) = fs::remove_dir_all(pin_dir) {
        first_error.get_or_insert(e);
    }
    first_error.map_or(Ok(()), Err)
}
