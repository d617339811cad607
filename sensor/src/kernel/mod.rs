//! Capture: loads the kernel programs, attaches them to a cgroup, and reads what they count.
//!
//! Two live-read paths (`LivePath`): the iterator over socket storage where the kernel loads
//! it, else the cookie-keyed map, which needs no tracing program. `probe` finds which one this
//! kernel allows; `sys` holds every raw bpf(2) call.

pub mod probe;
pub mod sys;

use std::{
    fs::File,
    io::Read as _,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, IterableMap as _, Map, MapData, PerCpuArray, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, Iter, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use log::{info, warn};
use sensor_common::{
    ABI_VERSION, CONFIG_HEAD_BYTES, CONFIG_MAX_CONNECTIONS, ClosedConn, ClosedStats, ConnStats,
    DEFAULT_LIVE_SLOTS_MAX, GLOBAL_LIVE_READ, HEAD_BYTES_MAX, LIVE_READ_ITERATOR, LIVE_READ_MAP,
    LIVE_RECORD_BYTES, LiveWalkEnd, Loss, MAP_CLOSED, MAP_CONFIG, MAP_CONNS, MAP_LIVE,
    MAP_LIVE_RECORDS, MAP_LOSS, MAP_OPEN, MAP_PORTS, MAP_REQUESTS, MAP_SOCKS, PROG_EGRESS,
    PROG_INGRESS, PROG_ITER, PROG_SOCKOPS, RequestEvent,
};

use self::sys::BATCH;
pub use crate::config::LiveRead;

/// Maps pinned under the instance directory, by name.
const PINNED_MAPS: [&str; 10] = [
    MAP_SOCKS,
    MAP_LIVE,
    MAP_LIVE_RECORDS,
    MAP_OPEN,
    MAP_CONNS,
    MAP_CLOSED,
    MAP_REQUESTS,
    MAP_PORTS,
    MAP_LOSS,
    MAP_CONFIG,
];
/// The path by which live connections are read, fixed for the life of a pinned instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LivePath {
    /// Records in socket storage, read through the `sensor_conns` iterator (a tracing program).
    Iterator,
    /// Records in the cookie-keyed `OPEN` map, read with batch lookups: no tracing program.
    Map,
}

impl LivePath {
    pub const fn name(self) -> &'static str {
        match self {
            LivePath::Iterator => "iterator",
            LivePath::Map => "map",
        }
    }

    /// Value of the kernel object's `LIVE_READ` global.
    const fn global(self) -> u32 {
        match self {
            LivePath::Iterator => LIVE_READ_ITERATOR,
            LivePath::Map => LIVE_READ_MAP,
        }
    }

    /// Program links pinned under an instance directory: while pinned, the programs stay
    /// attached and keep counting even when no agent runs.
    fn pinned_links(self) -> &'static [&'static str] {
        match self {
            LivePath::Iterator => &[PROG_INGRESS, PROG_EGRESS, PROG_SOCKOPS, PROG_ITER],
            LivePath::Map => &[PROG_INGRESS, PROG_EGRESS, PROG_SOCKOPS],
        }
    }
}

impl std::fmt::Display for LivePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The kernel object built by build.rs (aya-build) from `sensor-ebpf`.
static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sensor"));

const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";
// Capability numbers from linux/capability.h.
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "missing capabilities {0}: run as root, or grant CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN \
         (CAP_SYS_ADMIN on kernels before 5.8)"
    )]
    MissingCapabilities(String),
    #[error("no cgroup v2 hierarchy is mounted (looked for a cgroup2 entry in /proc/mounts)")]
    NoCgroup2,
    #[error("cgroup {0} does not exist or is not a directory in the cgroup v2 hierarchy")]
    BadCgroup(PathBuf),
    #[error(
        "kernel BTF not found at {BTF_PATH}: the kernel needs CONFIG_DEBUG_INFO_BTF=y (standard \
         on current distribution kernels)"
    )]
    NoBtf,
    #[error("loading the kernel programs failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("{what} failed: {source}")]
    Program {
        what: String,
        source: aya::programs::ProgramError,
    },
    #[error(
        "the kernel refused {feature} (program {program}). {hint} `sensor doctor` lists what \
         this kernel allows."
    )]
    Refused {
        program: &'static str,
        feature: &'static str,
        hint: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("kernel map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("kernel object has no {0}")]
    Missing(&'static str),
    #[error("pinning under {path}: {source}")]
    Pin {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("setting up the connection iterator: {0}")]
    Iter(std::io::Error),
    #[error("opening cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl CaptureError {
    /// The kernel refused the iterator itself (its load, link or pin), not something the map
    /// path needs too.
    fn is_iterator_refusal(&self) -> bool {
        matches!(
            self,
            CaptureError::Refused {
                program: PROG_ITER,
                ..
            } | CaptureError::Iter(_)
        )
    }
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> CaptureError {
    move |source| CaptureError::Map { name, source }
}

/// What each program needs from the kernel, and what to do when it is refused.
fn refused(
    program: &'static str,
    source: impl std::error::Error + Send + Sync + 'static,
) -> CaptureError {
    let (feature, hint) = match program {
        PROG_ITER => (
            "the socket-storage map iterator, a tracing program",
            "Set `[capture] live_read = \"auto\"` or `\"map\"` (or `--live-read map`) to read live \
             connections from a map instead; it needs no tracing program.",
        ),
        PROG_SOCKOPS => (
            "a sock_ops program",
            "The agent needs cgroup sock_ops programs (kernel 5.12 or newer) and CAP_BPF, \
             CAP_PERFMON and CAP_NET_ADMIN.",
        ),
        _ => (
            "a cgroup_skb program with BPF atomic compare-and-swap",
            "The agent needs cgroup_skb programs with BPF atomics (kernel 5.12 or newer) and \
             CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN.",
        ),
    };
    CaptureError::Refused {
        program,
        feature,
        hint,
        source: Box::new(source),
    }
}

/// What the agent needs to attach.
#[derive(Debug, Clone)]
pub struct CaptureSettings {
    /// Empty: the cgroup v2 root.
    pub cgroup: PathBuf,
    pub ports: Vec<u16>,
    pub max_connections: u32,
    pub ring_buffer_bytes: u32,
    pub request_ring_bytes: u32,
    /// `[capture] live_slots` (0: sized for `max_connections`).
    pub live_slots: u32,
    /// bpffs directory for pinned maps and links.
    pub pin_dir: PathBuf,
    /// Discard pinned state instead of continuing from it.
    pub fresh: bool,
    /// Bytes of each HTTP/1.x request head copied to the agent (0..=HEAD_BYTES_MAX; 0 disables).
    pub head_bytes: u32,
    /// Which live-read path to use, or to probe for (`auto`).
    pub live_read: LiveRead,
}

/// Writes the agent's settings for the kernel programs.
fn write_config<T: std::borrow::BorrowMut<MapData>>(
    config: &mut Array<T, u32>,
    settings: &CaptureSettings,
) -> Result<(), CaptureError> {
    let head = settings.head_bytes.min(HEAD_BYTES_MAX);
    config
        .set(CONFIG_HEAD_BYTES, head, 0)
        .map_err(map_err(MAP_CONFIG))?;
    config
        .set(CONFIG_MAX_CONNECTIONS, settings.max_connections, 0)
        .map_err(map_err(MAP_CONFIG))
}

/// Attached programs and their maps, pinned under `instance_dir`. Dropping it leaves the
/// programs attached and counting (crash-safe); `detach` removes them.
pub struct Capture {
    /// The loaded object when this agent loaded the programs (None when it re-attached to
    /// pinned ones); kept for its kernel log buffer.
    _ebpf: Option<Ebpf>,
    pub cgroup: PathBuf,
    /// Pinned state directory: `<pin_dir>/<instance>`.
    pub instance_dir: PathBuf,
    pub instance: String,
    /// True when the programs and maps were already running from a previous agent.
    pub reused: bool,
    /// This start created the pin directory (a failed start removes it again).
    pub created_pin_dir: bool,
    /// How live connections are read, and why that path.
    pub path: LivePath,
    pub path_reason: String,
    /// Closed connections until the agent deletes them.
    pub conns: HashMap<MapData, u64, ClosedStats>,
    /// Live connections on the map path (on the iterator path they are read through
    /// `iter_path`).
    open: HashMap<MapData, u64, ConnStats>,
    /// The pinned iterator link over the live records: each open starts a new walk.
    iter_path: PathBuf,
    /// The array the walk hands live records through (iterator path), mapped (it holds its
    /// own fd of the map).
    live_slots: Option<sys::LiveSlots>,
    pub loss: PerCpuArray<MapData, u64>,
    closed: Option<RingBuf<MapData>>,
    requests: Option<RingBuf<MapData>>,
    /// The poll's batch buffers, kept between polls.
    buf: sys::BatchBuf,
    /// The iterator's output, kept between polls (iterator path).
    walk: Vec<u8>,
    /// When the poll reads `conns` again (see `ClosedReads`).
    closed_reads: ClosedReads,
}

/// When a poll reads the closed records (`CONNS`). Every close is pushed through the `CLOSED`
/// ring, or counted as `ringbuf_full` after its record went into `CONNS`; so the map holds
/// nothing the agent has not had through the ring unless that count moved. Under a load of
/// short connections the map holds every close of the last snapshot interval (tens of
/// thousands), which reading every second would copy out again and again.
#[derive(Debug, Default)]
struct ClosedReads {
    /// `ringbuf_full` as it stood before the last read of `CONNS` (None: never read).
    ring_full_seen: Option<u64>,
    /// Polls since that read.
    polls_since: u32,
}

/// Polls between reads of `CONNS` when no close was lost from the ring: a bound on how late
/// a record shows whose loss count the agent could not see (never on x86, whose stores are
/// seen in order: the count is written after the record).
const CLOSED_READ_EVERY: u32 = 60;

impl ClosedReads {
    /// Whether this poll reads `CONNS`, given `ringbuf_full` now (read before the map).
    fn due(&mut self, ring_full: u64) -> bool {
        let due =
            self.ring_full_seen != Some(ring_full) || self.polls_since + 1 >= CLOSED_READ_EVERY;
        if !due {
            self.polls_since += 1;
        }
        due
    }

    /// A read of `CONNS` that began with `ringbuf_full` at `ring_full` went through.
    fn done(&mut self, ring_full: u64) {
        self.ring_full_seen = Some(ring_full);
        self.polls_since = 0;
    }
}

/// Checks what loading needs, so the operator gets one clear message instead of an EPERM.
/// CAP_PERFMON is needed on both paths: without it the verifier refuses the packet programs'
/// pointer arithmetic ("prohibited for !root"), not only the iterator.
pub fn preflight() -> Result<(), CaptureError> {
    let missing = missing_capabilities();
    if !missing.is_empty() {
        return Err(CaptureError::MissingCapabilities(missing.join(", ")));
    }
    if !Path::new(BTF_PATH).exists() {
        return Err(CaptureError::NoBtf);
    }
    Ok(())
}

/// Capabilities the agent lacks to load and attach its programs (empty: none).
pub fn missing_capabilities() -> Vec<&'static str> {
    let effective = effective_capabilities();
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON) && has(CAP_NET_ADMIN)) {
        return Vec::new();
    }
    [
        (CAP_BPF, "CAP_BPF"),
        (CAP_PERFMON, "CAP_PERFMON"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    ]
    .iter()
    .filter(|(cap, _)| !has(*cap))
    .map(|(_, name)| *name)
    .collect()
}

/// CapEff of this process, from /proc/self/status (0 when unreadable).
fn effective_capabilities() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Mount point of the cgroup v2 hierarchy: /sys/fs/cgroup on unified systems,
/// /sys/fs/cgroup/unified on hybrid ones.
pub fn cgroup2_root() -> Result<PathBuf, CaptureError> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|_| CaptureError::NoCgroup2)?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, path, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(path))
        })
        .next()
        .ok_or(CaptureError::NoCgroup2)
}

/// Resolves the configured cgroup: empty = the root; relative = below the root; absolute paths
/// must lie inside the cgroup v2 hierarchy.
pub fn resolve_cgroup(configured: &Path) -> Result<PathBuf, CaptureError> {
    let root = cgroup2_root()?;
    let path = if configured.as_os_str().is_empty() {
        root.clone()
    } else if configured.is_absolute() {
        configured.to_path_buf()
    } else {
        root.join(configured)
    };
    if !path.starts_with(&root) || !path.join("cgroup.procs").exists() {
        return Err(CaptureError::BadCgroup(path));
    }
    Ok(path)
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPF_FS_ROOT: &str = "/sys/fs/bpf";

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: valid NUL-terminated path and a zeroed statfs buffer.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Pinning needs a bpffs. systemd mounts one at /sys/fs/bpf on most distributions; where
/// nothing did, mount it there (as `mount -t bpf bpf /sys/fs/bpf` would).
fn ensure_bpffs(pin_dir: &Path) -> Result<(), CaptureError> {
    let mut probe = pin_dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if is_bpffs(&probe) {
        return Ok(());
    }
    let root = Path::new(BPF_FS_ROOT);
    if pin_dir.starts_with(root) && !is_bpffs(root) {
        let c = |s: &str| std::ffi::CString::new(s).unwrap_or_default();
        let (src, target, fstype) = (c("bpf"), c(BPF_FS_ROOT), c("bpf"));
        // SAFETY: valid NUL-terminated strings; no mount data.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc == 0 {
            info!("mounted a bpffs at {BPF_FS_ROOT}");
            return Ok(());
        }
        return Err(pin_err(root, std::io::Error::last_os_error()));
    }
    Err(pin_err(
        pin_dir,
        std::io::Error::other("not on a bpffs (mount -t bpf bpf /sys/fs/bpf)"),
    ))
}

/// Older kernels charge BPF memory to RLIMIT_MEMLOCK; newer ones use memcg and ignore it.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer to an rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::debug!("could not raise RLIMIT_MEMLOCK (only kernels before 5.11 need it)");
    }
}

/// FNV-1a: a stable fingerprint of the kernel object and the attach point.
fn fingerprint(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn pin_err(path: &Path, e: impl std::error::Error + Send + Sync + 'static) -> CaptureError {
    CaptureError::Pin {
        path: path.to_path_buf(),
        source: Box::new(e),
    }
}

/// Removes one pinned instance: unpinning a link detaches its program; removing a map pin
/// frees the map once nothing else holds it.
pub fn remove_instance(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_link = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with("link-"));
        if is_link {
            match PinnedLink::from_pin(&path).map(PinnedLink::unpin) {
                Ok(Ok(link)) => drop(link),
                _ => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
    let _ = std::fs::remove_dir(dir);
}

fn open_pinned_map(dir: &Path, name: &'static str) -> Result<MapData, CaptureError> {
    let path = dir.join(name);
    MapData::from_pin(&path).map_err(|source| CaptureError::Map { name, source })
}

/// Removes an instance directory being built unless the start succeeds: a refused or failed
/// start leaves nothing attached or pinned (the programs held only by the loader's fds detach
/// when it drops).
struct UnpinOnFailure {
    dir: PathBuf,
    armed: bool,
}

impl Drop for UnpinOnFailure {
    fn drop(&mut self) {
        if self.armed {
            warn!(
                "start failed: detaching and unpinning what this start attached ({})",
                self.dir.display()
            );
            remove_instance(&self.dir);
        }
    }
}

impl Capture {
    /// Loads and attaches the programs, or continues from pinned ones. A start that fails
    /// leaves nothing behind: what it attached is detached, what it pinned is unpinned, a pin
    /// directory it created is removed; state pinned by an earlier run is kept. A bpffs it
    /// mounted stays mounted: that is the normal state of a host, and another agent may already
    /// have pinned into it.
    pub fn attach(settings: &CaptureSettings) -> Result<Self, CaptureError> {
        preflight()?;
        let cgroup = resolve_cgroup(&settings.cgroup)?;
        raise_memlock_limit();
        let pin_dir = &settings.pin_dir;
        ensure_bpffs(pin_dir)?;
        let existed = pin_dir.exists();
        let result = std::fs::create_dir_all(pin_dir)
            .map_err(|e| pin_err(pin_dir, e))
            .and_then(|()| Self::attach_in(settings, cgroup));
        match result {
            Ok(mut capture) => {
                capture.created_pin_dir = !existed;
                Ok(capture)
            }
            Err(e) => {
                if !existed {
                    // Only if empty: an earlier run's pinned state stays.
                    let _ = std::fs::remove_dir(pin_dir);
                }
                Err(e)
            }
        }
    }

    fn attach_in(settings: &CaptureSettings, cgroup: PathBuf) -> Result<Self, CaptureError> {
        let fingerprint = fingerprint(&[KERNEL_OBJECT, cgroup.as_os_str().as_encoded_bytes()]);
        let instance_of =
            |path: LivePath| format!("abi{ABI_VERSION}-{}-{fingerprint:016x}", path.name());
        let pin_dir = &settings.pin_dir;
        if settings.fresh {
            for path in instances(pin_dir) {
                info!("removing pinned sensor state {} (--fresh)", path.display());
                remove_instance(&path);
            }
        }
        // A complete pinned instance of this object and cgroup is continued, on the path it
        // was started with (auto keeps whichever it finds): the counts it holds survive.
        let allowed: &[LivePath] = match settings.live_read {
            LiveRead::Auto => &[LivePath::Iterator, LivePath::Map],
            LiveRead::Iterator => &[LivePath::Iterator],
            LiveRead::Map => &[LivePath::Map],
        };
        for path in allowed {
            let dir = pin_dir.join(instance_of(*path));
            if is_complete(&dir, *path) {
                info!(
                    "continuing from pinned state {} (programs stayed attached)",
                    dir.display()
                );
                let capture = Self::reuse(settings, cgroup, *path, instance_of(*path), dir)?;
                remove_other_instances(pin_dir, &capture.instance_dir);
                return Ok(capture);
            }
        }
        let (path, reason) = choose_path(settings.live_read);
        let instance = instance_of(path);
        let instance_dir = pin_dir.join(&instance);
        if instance_dir.exists() {
            warn!(
                "incomplete pinned state {}: replacing it",
                instance_dir.display()
            );
            remove_instance(&instance_dir);
        }
        let capture = match Self::load_and_attach(
            settings,
            cgroup.clone(),
            path,
            reason,
            instance,
            instance_dir,
        ) {
            // The probe passed but the real start refused the iterator at a later step (its
            // link or pin): `auto` still has the map path. What that start attached is gone.
            Err(e) if settings.live_read == LiveRead::Auto && e.is_iterator_refusal() => {
                warn!(
                    "the iterator start failed ({}): reading live connections from the map \
                     instead (live_read = auto)",
                    probe::short_error(&e)
                );
                let instance = instance_of(LivePath::Map);
                let dir = pin_dir.join(&instance);
                remove_instance(&dir);
                Self::load_and_attach(
                    settings,
                    cgroup,
                    LivePath::Map,
                    format!("auto: the iterator start failed ({})", root_cause(&e)),
                    instance,
                    dir,
                )?
            }
            result => result?,
        };
        // Only now: state pinned by an earlier run stays until this one is attached.
        remove_other_instances(pin_dir, &capture.instance_dir);
        Ok(capture)
    }

    fn reuse(
        settings: &CaptureSettings,
        cgroup: PathBuf,
        path: LivePath,
        instance: String,
        instance_dir: PathBuf,
    ) -> Result<Self, CaptureError> {
        write_ports(&instance_dir, &settings.ports)?;
        let mut config: Array<MapData, u32> =
            Array::try_from(Map::Array(open_pinned_map(&instance_dir, MAP_CONFIG)?))
                .map_err(map_err(MAP_CONFIG))?;
        write_config(&mut config, settings)?;
        let live_map = open_pinned_map(&instance_dir, MAP_LIVE_RECORDS)?;
        if path == LivePath::Iterator
            && let Ok(info) = live_map.info()
            && info.max_entries() != live_slots(path, settings)
        {
            warn!(
                "live_slots = {} applies when the pinned state is replaced (sensor run --fresh, \
                 losing what it holds); the running array keeps {} slots",
                live_slots(path, settings),
                info.max_entries()
            );
        }
        let conns: HashMap<MapData, u64, ClosedStats> =
            HashMap::try_from(Map::HashMap(open_pinned_map(&instance_dir, MAP_CONNS)?))
                .map_err(map_err(MAP_CONNS))?;
        // Map sizes are fixed when the maps are created: a changed bound applies once the
        // pinned state is replaced.
        if let Ok(info) = conns.map().info()
            && info.max_entries() != settings.max_connections
        {
            warn!(
                "max_connections = {} applies when the pinned state is replaced (sensor run \
                 --fresh, losing what it holds); the running maps keep {}",
                settings.max_connections,
                info.max_entries()
            );
        }
        let closed = open_pinned_map(&instance_dir, MAP_CLOSED)?;
        let requests = open_pinned_map(&instance_dir, MAP_REQUESTS)?;
        for (key, map, want) in [
            ("ring_buffer_bytes", &closed, settings.ring_buffer_bytes),
            ("request_ring_bytes", &requests, settings.request_ring_bytes),
        ] {
            if let Ok(info) = map.info()
                && info.max_entries() != want
            {
                warn!(
                    "{key} = {want} applies when the pinned state is replaced (sensor run \
                     --fresh, losing what it holds); the running ring keeps {} bytes",
                    info.max_entries()
                );
            }
        }
        Ok(Self {
            _ebpf: None,
            cgroup,
            instance_dir: instance_dir.clone(),
            instance,
            reused: true,
            created_pin_dir: false,
            path,
            path_reason: "continued from the pinned state of the previous run".to_owned(),
            iter_path: iter_path(&instance_dir),
            live_slots: map_live_slots(path, &live_map)?,
            buf: sys::BatchBuf::default(),
            walk: Vec::new(),
            closed_reads: ClosedReads::default(),
            conns,
            open: HashMap::try_from(Map::HashMap(open_pinned_map(&instance_dir, MAP_OPEN)?))
                .map_err(map_err(MAP_OPEN))?,
            loss: PerCpuArray::try_from(Map::PerCpuArray(open_pinned_map(
                &instance_dir,
                MAP_LOSS,
            )?))
            .map_err(map_err(MAP_LOSS))?,
            closed: Some(RingBuf::try_from(Map::RingBuf(closed)).map_err(map_err(MAP_CLOSED))?),
            requests: Some(
                RingBuf::try_from(Map::RingBuf(requests)).map_err(map_err(MAP_REQUESTS))?,
            ),
        })
    }

    fn load_and_attach(
        settings: &CaptureSettings,
        cgroup: PathBuf,
        path: LivePath,
        path_reason: String,
        instance: String,
        instance_dir: PathBuf,
    ) -> Result<Self, CaptureError> {
        std::fs::create_dir_all(&instance_dir).map_err(|e| pin_err(&instance_dir, e))?;
        let mut cleanup = UnpinOnFailure {
            dir: instance_dir.clone(),
            armed: true,
        };
        let map_paths: Vec<(&'static str, PathBuf)> = PINNED_MAPS
            .iter()
            .map(|m| (*m, instance_dir.join(m)))
            .collect();
        let global = path.global();
        let mut loader = EbpfLoader::new();
        loader
            .override_global(GLOBAL_LIVE_READ, &global, true)
            .map_max_entries(MAP_CONNS, settings.max_connections)
            .map_max_entries(MAP_OPEN, settings.max_connections)
            .map_max_entries(MAP_CLOSED, settings.ring_buffer_bytes)
            .map_max_entries(MAP_REQUESTS, settings.request_ring_bytes)
            .map_max_entries(MAP_LIVE_RECORDS, live_slots(path, settings));
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(KERNEL_OBJECT)?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_kernel_log_forwarder(logger),
            Err(e) => warn!("kernel log forwarding unavailable: {e}"),
        }

        let mut ports: Array<_, u8> = Array::try_from(
            ebpf.map_mut(MAP_PORTS)
                .ok_or(CaptureError::Missing(MAP_PORTS))?,
        )
        .map_err(map_err(MAP_PORTS))?;
        for port in &settings.ports {
            ports
                .set(u32::from(*port), 1, 0)
                .map_err(map_err(MAP_PORTS))?;
        }
        let mut config: Array<&mut MapData, u32> = Array::try_from(
            ebpf.map_mut(MAP_CONFIG)
                .ok_or(CaptureError::Missing(MAP_CONFIG))?,
        )
        .map_err(map_err(MAP_CONFIG))?;
        write_config(&mut config, settings)?;

        // Every program is verified before anything is attached, so a kernel that refuses one
        // refuses the start with nothing attached yet.
        load_programs(&mut ebpf, path)?;
        // Mapped before anything is attached, like the verification: a kernel that refuses the
        // mapping refuses the start with nothing attached yet.
        let live_slots = match ebpf.map(MAP_LIVE_RECORDS) {
            Some(Map::Array(data)) => map_live_slots(path, data)?,
            _ => return Err(CaptureError::Missing(MAP_LIVE_RECORDS)),
        };
        let cgroup_fd = File::open(&cgroup).map_err(|source| CaptureError::Io {
            path: cgroup.clone(),
            source,
        })?;
        if path == LivePath::Iterator {
            let link = iter_link(&ebpf)?;
            sys::obj_pin(&link, &iter_path(&instance_dir)).map_err(CaptureError::Iter)?;
        }
        // Packet counters first, then the lifecycle hook that creates records, so no packet of
        // a recorded connection goes uncounted. These are BPF links (kernel >= 5.7), which always
        // coexist with other programs on the cgroup; link_create rejects the ALLOW_MULTI flag.
        for (name, attach_type) in [
            (PROG_INGRESS, CgroupSkbAttachType::Ingress),
            (PROG_EGRESS, CgroupSkbAttachType::Egress),
        ] {
            let program: &mut CgroupSkb = ebpf
                .program_mut(name)
                .ok_or(CaptureError::Missing(name))?
                .try_into()
                .map_err(|source| program_err(name, "type", source))?;
            let link_id = program
                .attach(&cgroup_fd, attach_type, CgroupAttachMode::Single)
                .map_err(|source| program_err(name, "attach", source))?;
            let link = program
                .take_link(link_id)
                .map_err(|source| program_err(name, "take link", source))?;
            pin_link(FdLink::try_from(link), &instance_dir, name)?;
        }
        let sockops: &mut SockOps = ebpf
            .program_mut(PROG_SOCKOPS)
            .ok_or(CaptureError::Missing(PROG_SOCKOPS))?
            .try_into()
            .map_err(|source| program_err(PROG_SOCKOPS, "type", source))?;
        let link_id = sockops
            .attach(&cgroup_fd, CgroupAttachMode::Single)
            .map_err(|source| program_err(PROG_SOCKOPS, "attach", source))?;
        let link = sockops
            .take_link(link_id)
            .map_err(|source| program_err(PROG_SOCKOPS, "take link", source))?;
        pin_link(FdLink::try_from(link), &instance_dir, PROG_SOCKOPS)?;
        info!(
            "attached to cgroup {} watching ports {:?}; live connections read through the {path} \
             ({path_reason}); pinned under {}",
            cgroup.display(),
            settings.ports,
            instance_dir.display()
        );

        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(CaptureError::Missing(name))
        };
        let conns = HashMap::try_from(take(&mut ebpf, MAP_CONNS)?).map_err(map_err(MAP_CONNS))?;
        let open = HashMap::try_from(take(&mut ebpf, MAP_OPEN)?).map_err(map_err(MAP_OPEN))?;
        let loss = PerCpuArray::try_from(take(&mut ebpf, MAP_LOSS)?).map_err(map_err(MAP_LOSS))?;
        let closed =
            RingBuf::try_from(take(&mut ebpf, MAP_CLOSED)?).map_err(map_err(MAP_CLOSED))?;
        let requests =
            RingBuf::try_from(take(&mut ebpf, MAP_REQUESTS)?).map_err(map_err(MAP_REQUESTS))?;
        cleanup.armed = false;
        Ok(Self {
            _ebpf: Some(ebpf),
            cgroup,
            iter_path: iter_path(&instance_dir),
            live_slots,
            buf: sys::BatchBuf::default(),
            walk: Vec::new(),
            closed_reads: ClosedReads::default(),
            instance_dir,
            instance,
            reused: false,
            created_pin_dir: false,
            path,
            path_reason,
            conns,
            open,
            loss,
            closed: Some(closed),
            requests: Some(requests),
        })
    }

    /// One walk of the iterator, handed to `each` batch by batch: the records it put in the
    /// array's slots (read in place), then those it had no slot for (its seq_file output before
    /// the end marker). If another reader of the link rewrote slots before they were read, the
    /// walk is made again (records handed over twice are observed twice: idempotent).
    fn walk_live<E>(
        &mut self,
        each: &mut impl FnMut(&[u64], &[ConnStats]) -> Result<(), E>,
    ) -> Result<std::io::Result<()>, E> {
        let Some(slots) = self.live_slots.as_mut() else {
            return Ok(Err(std::io::Error::other(
                "the live-record array is not mapped",
            )));
        };
        let buf = &mut self.buf;
        for _ in 0..WALK_ATTEMPTS {
            if let Err(e) = read_live(&self.iter_path, &mut self.walk) {
                return Ok(Err(e));
            }
            let (beyond, end) = match split_walk(&self.walk) {
                Ok(parts) => parts,
                Err(e) => return Ok(Err(e)),
            };
            // The walk wrote its first `in_slots` records to slots 0.. (the rest went to the
            // seq_file): map that far, and read them while they hold its session. A slot that
            // another walk rewrote ends the run early, which the count then contradicts.
            let wrote = usize::try_from(end.in_slots).unwrap_or(usize::MAX);
            if wrote > slots.len() {
                return Ok(Err(std::io::Error::other(format!(
                    "the iterator reports {wrote} records in {} slots",
                    slots.len()
                ))));
            }
            if let Err(e) = slots.reserve(wrote) {
                return Ok(Err(e));
            }
            buf.clear();
            let mut in_slots = 0;
            while in_slots < wrote
                && let Some(record) = slots.slot(in_slots, end.session)
            {
                in_slots += 1;
                if let Some((cookie, stats)) = decode_live(&record) {
                    buf.push(cookie, stats, each)?;
                }
            }
            if !walk_is_whole(&end, in_slots, beyond.len() / LIVE_RECORD_BYTES) {
                continue;
            }
            for (cookie, stats) in beyond
                .chunks_exact(LIVE_RECORD_BYTES)
                .filter_map(decode_live)
            {
                buf.push(cookie, stats, each)?;
            }
            buf.flush(each)?;
            return Ok(Ok(()));
        }
        Ok(Err(std::io::Error::other(
            "another reader of the iterator link rewrote the live-record slots during every walk",
        )))
    }

    /// Replaces the watched ports in the running programs (SIGHUP reload). Connections already
    /// recorded keep being counted until they close; new ones follow the new list.
    pub fn set_ports(&self, ports: &[u16]) -> Result<(), CaptureError> {
        write_ports(&self.instance_dir, ports)
    }

    /// Detaches the programs and removes the pinned state (a clean stop).
    pub fn detach(self) {
        let dir = self.instance_dir.clone();
        drop(self);
        remove_instance(&dir);
    }

    /// Deletes closed records the agent has durably accounted: in batches of one syscall
    /// each, or one by one where the kernel has no batch operations. Returns the cookies whose
    /// records are still in the map (the agent keeps their tombstones and tries again).
    pub fn delete(&mut self, cookies: &[u64]) -> Vec<u64> {
        let fd = self.conns.map().fd().as_fd().as_raw_fd();
        let mut rest = cookies;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(BATCH)];
            match sys::delete_batch(fd, chunk) {
                Ok(()) => rest = &rest[chunk.len()..],
                // The key at `done` is not in the map (nothing to delete): skip it.
                Err((done, e)) if e.raw_os_error() == Some(libc::ENOENT) => {
                    rest = &rest[(done + 1).min(rest.len())..];
                }
                Err((done, _)) => {
                    let mut left = Vec::new();
                    for cookie in &rest[done..] {
                        if self.conns.remove(cookie).is_err() && self.conns.get(cookie, 0).is_ok() {
                            left.push(*cookie);
                        }
                    }
                    return left;
                }
            }
        }
        Vec::new()
    }

    /// The ring buffer of request events; taken once by the agent loop.
    pub fn take_requests(&mut self) -> Result<RingBuf<MapData>, CaptureError> {
        self.requests
            .take()
            .ok_or(CaptureError::Missing(MAP_REQUESTS))
    }

    /// The ring buffer of close notifications; taken once by the agent loop.
    pub fn take_closed(&mut self) -> Result<RingBuf<MapData>, CaptureError> {
        self.closed.take().ok_or(CaptureError::Missing(MAP_CLOSED))
    }

    /// Reads the records the kernel holds, batch by batch into `each`: the live ones
    /// (iterator path: socket storage, through the iterator; map path: the OPEN map), then the
    /// closed-but-not-yet-deleted ones (the CONNS map) at the first poll, whenever a close did
    /// not fit in the ring since the last read of them, and every `CLOSED_READ_EVERY` polls;
    /// other closes come through the ring. In that order, a connection that closes between the
    /// two reads shows in both or in the ring, never in neither, and the later, closed record
    /// comes last. A record may be handed over twice (a batch walk the kernel refuses halfway
    /// is read again key by key): observations are idempotent. The hash maps are walked a
    /// batch at a time; the iterator's output is read whole, then handed over in batches.
    ///
    /// Returns whether every live record was read: false when the iterator's read failed (then
    /// the records handed over are a part, and a connection missing from them may be live).
    pub fn poll_each<E>(
        &mut self,
        mut each: impl FnMut(&[u64], &[ConnStats]) -> Result<(), E>,
    ) -> Result<bool, E> {
        let mut complete = true;
        match self.path {
            LivePath::Iterator => {
                if let Err(e) = self.walk_live(&mut each)? {
                    warn!("reading the live connections failed: {e}");
                    complete = false;
                }
            }
            // A record the close removes between the kernel's get_next_key and lookup is not
            // lost: the close pushed it through the ring, or put it in CONNS and counted
            // `ringbuf_full`, which makes the read below (or the next poll's) read CONNS.
            LivePath::Map => read_map(&self.open, &mut self.buf, &mut each)?,
        }
        let ring_full = self.loss_count(Loss::RingBufFull);
        if !self.closed_reads.due(ring_full) {
            return Ok(complete);
        }
        read_closed(&self.conns, &mut self.buf, &mut each)?;
        self.closed_reads.done(ring_full);
        Ok(complete)
    }

    /// Makes the next poll read the closed records whatever the ring lost (the agent's last
    /// read before it stops: the ring is not drained again).
    pub fn read_closed_next(&mut self) {
        self.closed_reads = ClosedReads::default();
    }

    /// One loss counter summed over CPUs.
    fn loss_count(&self, kind: Loss) -> u64 {
        self.loss
            .get(&(kind as u32), 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }

    /// Loss counters summed over CPUs, by name.
    pub fn loss_counts(&self) -> Vec<(&'static str, u64)> {
        Loss::ALL
            .iter()
            .map(|kind| (kind.name(), self.loss_count(*kind)))
            .collect()
    }
}

/// Every record of a cookie-keyed map into `each`: a few batch syscalls, or key by key where
/// the kernel has no batch operations.
fn read_map<E>(
    map: &HashMap<MapData, u64, ConnStats>,
    buf: &mut sys::BatchBuf,
    each: &mut impl FnMut(&[u64], &[ConnStats]) -> Result<(), E>,
) -> Result<(), E> {
    match sys::lookup_each(map, &mut buf.keys, &mut buf.values, &mut *each) {
        Ok(()) => Ok(()),
        Err(sys::WalkError::Each(e)) => Err(e),
        Err(sys::WalkError::Kernel(e)) => {
            log::debug!("batch lookup unavailable ({e}); reading the map key by key");
            // A key deleted between the kernel's get_next_key and lookup shows as an error;
            // only the agent deletes closed records, so that cannot lose one.
            buf.clear();
            for (cookie, stats) in map.iter().filter_map(Result::ok) {
                buf.push(cookie, stats, each)?;
            }
            buf.flush(each)
        }
    }
}

/// Every record of the closed-record map (`ClosedStats` values), batch by batch into `each`
/// as `ConnStats` with a zero parser state (`read_map`'s batches, converted in `buf`).
fn read_closed<E>(
    map: &HashMap<MapData, u64, ClosedStats>,
    buf: &mut sys::BatchBuf,
    each: &mut impl FnMut(&[u64], &[ConnStats]) -> Result<(), E>,
) -> Result<(), E> {
    // Batch buffers of their own for the map's smaller values, for this read only (once a
    // minute, or after a loss from the ring): not kept in the agent's memory between reads.
    // The converted records go through `buf` as every other walk's do.
    let (mut keys, mut values) = (Vec::new(), Vec::<ClosedStats>::new());
    buf.clear();
    let walk = sys::lookup_each(map, &mut keys, &mut values, |cookies, closed| {
        for (cookie, c) in cookies.iter().zip(closed) {
            buf.push(*cookie, ConnStats::from_closed(c), each)?;
        }
        Ok(())
    });
    match walk {
        Ok(()) => {}
        Err(sys::WalkError::Each(e)) => return Err(e),
        Err(sys::WalkError::Kernel(e)) => {
            log::debug!("batch lookup unavailable ({e}); reading the map key by key");
            // As in `read_map`: only the agent deletes closed records, and the records not
            // yet handed over are read again here.
            buf.clear();
            for (cookie, c) in map.iter().filter_map(Result::ok) {
                buf.push(cookie, ConnStats::from_closed(&c), each)?;
            }
        }
    }
    buf.flush(each)
}

/// The path to start on when no pinned state is continued, and why.
fn choose_path(live_read: LiveRead) -> (LivePath, String) {
    match live_read {
        LiveRead::Iterator => (LivePath::Iterator, "live_read = iterator".to_owned()),
        LiveRead::Map => (LivePath::Map, "live_read = map".to_owned()),
        LiveRead::Auto => match probe::iterator() {
            Ok(()) => (
                LivePath::Iterator,
                "auto: the kernel loads the iterator".to_owned(),
            ),
            Err(e) => {
                let why = probe::short_error(&e);
                warn!(
                    "the kernel refused the connection iterator ({why}): reading live \
                     connections from the map instead (live_read = auto)"
                );
                (
                    LivePath::Map,
                    format!("auto: the kernel refused the iterator ({})", root_cause(&e)),
                )
            }
        },
    }
}

/// The innermost message of an error chain (e.g. "Operation not permitted").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Whether `dir` holds every map and link pinned for `path`.
fn is_complete(dir: &Path, path: LivePath) -> bool {
    PINNED_MAPS.iter().all(|m| dir.join(m).exists())
        && path
            .pinned_links()
            .iter()
            .all(|l| dir.join(format!("link-{l}")).exists())
}

/// Removes every pinned instance under `pin_dir` except `keep`: other versions, kernel objects,
/// cgroups or live-read paths.
fn remove_other_instances(pin_dir: &Path, keep: &Path) {
    for path in instances(pin_dir) {
        if path != keep {
            info!(
                "removing pinned sensor state {} (from another sensor version, kernel object, \
                 cgroup or live-read path)",
                path.display()
            );
            remove_instance(&path);
        }
    }
}

/// The sensor's pinned instances under `pin_dir` (`abi<N>-...`): anything else there belongs
/// to someone else and is never touched, even where the pin directory is the bpffs root.
fn instances(pin_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("abi"))
                .and_then(|n| n.split_once('-'))
                .is_some_and(|(v, _)| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|e| e.path())
        .collect()
}

/// Loads (verifies) the programs `path` uses, without attaching any.
fn load_programs(ebpf: &mut Ebpf, path: LivePath) -> Result<(), CaptureError> {
    for name in path.pinned_links() {
        load_program(ebpf, name)?;
    }
    Ok(())
}

/// Loads (verifies) one program of the object; a refusal names what the kernel refused.
fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), CaptureError> {
    let program = ebpf.program_mut(name).ok_or(CaptureError::Missing(name))?;
    let loaded = match name {
        PROG_ITER => {
            let btf =
                Btf::from_sys_fs().map_err(|e| CaptureError::Iter(std::io::Error::other(e)))?;
            let iter: &mut Iter = program
                .try_into()
                .map_err(|source| program_err(name, "type", source))?;
            iter.load("bpf_sk_storage_map", &btf)
        }
        PROG_SOCKOPS => {
            let sockops: &mut SockOps = program
                .try_into()
                .map_err(|source| program_err(name, "type", source))?;
            sockops.load()
        }
        _ => {
            let skb: &mut CgroupSkb = program
                .try_into()
                .map_err(|source| program_err(name, "type", source))?;
            skb.load()
        }
    };
    loaded.map_err(|source| refused(name, source))
}

/// Links the loaded iterator to the socket storage map; the link is what readers open.
fn iter_link(ebpf: &Ebpf) -> Result<std::os::fd::OwnedFd, CaptureError> {
    let map_fd = match ebpf.map(MAP_SOCKS) {
        Some(Map::SkStorage(data)) => data.fd().as_fd().as_raw_fd(),
        _ => return Err(CaptureError::Missing(MAP_SOCKS)),
    };
    let program: &Iter = ebpf
        .program(PROG_ITER)
        .ok_or(CaptureError::Missing(PROG_ITER))?
        .try_into()
        .map_err(|source| program_err(PROG_ITER, "type", source))?;
    let prog_fd = program
        .fd()
        .map_err(|source| program_err(PROG_ITER, "fd", source))?
        .as_fd()
        .as_raw_fd();
    sys::iter_link_create(prog_fd, map_fd).map_err(|e| refused(PROG_ITER, e))
}

/// Slots of the array the iterator hands live records through: `[capture] live_slots`, or one
/// per `max_connections`, at most `DEFAULT_LIVE_SLOTS_MAX` (the rest of a larger walk goes
/// through the seq_file); one on the map path, which does not use it.
fn live_slots(path: LivePath, settings: &CaptureSettings) -> u32 {
    if path == LivePath::Map {
        return 1;
    }
    if settings.live_slots != 0 {
        return settings.live_slots;
    }
    settings.max_connections.min(DEFAULT_LIVE_SLOTS_MAX)
}

/// The live-record array for mapping into the agent (a prefix at a time; iterator path only).
/// A failure is the iterator's: on a fresh start `auto` then reads from the map instead.
fn map_live_slots(path: LivePath, map: &MapData) -> Result<Option<sys::LiveSlots>, CaptureError> {
    if path != LivePath::Iterator {
        return Ok(None);
    }
    let context = |e: std::io::Error| {
        CaptureError::Iter(std::io::Error::new(
            e.kind(),
            format!("mapping {MAP_LIVE_RECORDS}: {e}"),
        ))
    };
    let slots = map
        .info()
        .map_err(|e| context(std::io::Error::other(e)))?
        .max_entries();
    sys::LiveSlots::new(map.fd().as_fd(), slots)
        .map(Some)
        .map_err(context)
}

/// Walks of the iterator a poll tries when another reader of the link rewrites the slots
/// before they are read.
const WALK_ATTEMPTS: usize = 3;

/// Whether a walk's records were all read: every record it wrote to slots was read from them
/// (none rewritten by another walk meanwhile), and those and the records of its seq_file are
/// as many as the objects it walked (`last` numbers the last one, 0 also when there was none).
fn walk_is_whole(end: &LiveWalkEnd, read_from_slots: usize, beyond: usize) -> bool {
    let records = read_from_slots as u64 + beyond as u64;
    read_from_slots as u64 == end.in_slots && end.last == records.saturating_sub(1)
}

/// A walk's seq_file output: the records the array had no slot for, and the end marker.
fn split_walk(bytes: &[u8]) -> std::io::Result<(&[u8], LiveWalkEnd)> {
    const END: usize = std::mem::size_of::<LiveWalkEnd>();
    let bad = || {
        std::io::Error::other(format!(
            "the iterator's output ({} bytes) is not whole records and an end marker",
            bytes.len()
        ))
    };
    let split = bytes.len().checked_sub(END).ok_or_else(bad)?;
    let (records, end) = bytes.split_at(split);
    if !records.len().is_multiple_of(LIVE_RECORD_BYTES) {
        return Err(bad());
    }
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&end[8 * i..8 * i + 8]);
        u64::from_ne_bytes(w)
    };
    Ok((
        records,
        LiveWalkEnd {
            session: word(0),
            last: word(1),
            in_slots: word(2),
        },
    ))
}

fn iter_path(instance_dir: &Path) -> PathBuf {
    instance_dir.join(format!("link-{PROG_ITER}"))
}

/// Every live record: one walk of the iterator (opening the pinned link starts it), into
/// `bytes` (kept between walks: its capacity is the last walk's size, so a walk of many
/// connections does not grow a new buffer step by step through megabytes every poll).
fn read_live(path: &Path, bytes: &mut Vec<u8>) -> std::io::Result<()> {
    let last = bytes.len();
    bytes.clear();
    // Room for the last walk's size and some; a buffer far larger than that (the connections
    // went away) gives back what it no longer needs.
    let want = last + last / 8 + 4096;
    if bytes.capacity() > (1 << 20) && last < bytes.capacity() / 4 {
        bytes.shrink_to(want);
    } else {
        bytes.reserve(want);
    }
    File::open(path)?.read_to_end(bytes)?;
    Ok(())
}

/// Decodes one record of the iterator or the close ring (`LIVE_RECORD_BYTES`: a `ClosedConn`
/// without the kernel's parser state, which the agent never reads; it decodes as zeros).
pub fn decode_live(bytes: &[u8]) -> Option<(u64, ConnStats)> {
    if bytes.len() < LIVE_RECORD_BYTES {
        return None;
    }
    let mut whole = [0u8; std::mem::size_of::<ClosedConn>()];
    whole[..LIVE_RECORD_BYTES].copy_from_slice(&bytes[..LIVE_RECORD_BYTES]);
    decode::<ClosedConn>(&whole).map(|rec| (rec.cookie, rec.stats))
}

/// Makes the pinned port map of an instance hold exactly `ports` (as `reuse` does on start).
fn write_ports(instance_dir: &Path, ports: &[u16]) -> Result<(), CaptureError> {
    let mut map: Array<MapData, u8> =
        Array::try_from(Map::Array(open_pinned_map(instance_dir, MAP_PORTS)?))
            .map_err(map_err(MAP_PORTS))?;
    let watched: std::collections::HashSet<u16> = ports.iter().copied().collect();
    for port in 0..=u16::MAX {
        let want = u8::from(watched.contains(&port));
        if map.get(&u32::from(port), 0).unwrap_or(0) != want {
            map.set(u32::from(port), want, 0)
                .map_err(map_err(MAP_PORTS))?;
        }
    }
    Ok(())
}

fn pin_link(
    link: Result<FdLink, aya::programs::links::LinkError>,
    dir: &Path,
    name: &str,
) -> Result<(), CaptureError> {
    let path = dir.join(format!("link-{name}"));
    let link = link.map_err(|e| pin_err(&path, e))?;
    // The pinned link keeps the program attached; the returned handle can be dropped.
    link.pin(&path).map_err(|e| pin_err(&path, e))?;
    Ok(())
}

fn program_err(name: &str, step: &str, source: aya::programs::ProgramError) -> CaptureError {
    CaptureError::Program {
        what: format!("{step} of program {name}"),
        source,
    }
}

/// Decodes a ring buffer record of a `Pod` type.
pub fn decode<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    (bytes.len() >= std::mem::size_of::<T>())
        // SAFETY: length checked; T is Pod (any bit pattern is valid).
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// The fixed part of a `RequestEvent` (everything before `head`), read without copying the
/// record's 16 KiB head buffer: a request event is decoded at every request.
#[repr(C)]
#[derive(Clone, Copy)]
struct RequestFixed {
    cookie: u64,
    ts_ns: u64,
    remote_addr: [u8; 16],
    bytes_in_start: u64,
    bytes_out_start: u64,
    events_out_start: u64,
    head_offset: u64,
    head_len: u16,
    kind: u8,
    flags: u8,
    head_skip: u8,
    _pad: [u8; 3],
}

// The prefix of `RequestEvent`, field for field.
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<RequestFixed>() == offset_of!(RequestEvent, head));
    assert!(offset_of!(RequestFixed, cookie) == offset_of!(RequestEvent, cookie));
    assert!(offset_of!(RequestFixed, ts_ns) == offset_of!(RequestEvent, ts_ns));
    assert!(offset_of!(RequestFixed, remote_addr) == offset_of!(RequestEvent, remote_addr));
    assert!(offset_of!(RequestFixed, bytes_in_start) == offset_of!(RequestEvent, bytes_in_start));
    assert!(offset_of!(RequestFixed, bytes_out_start) == offset_of!(RequestEvent, bytes_out_start));
    assert!(
        offset_of!(RequestFixed, events_out_start) == offset_of!(RequestEvent, events_out_start)
    );
    assert!(offset_of!(RequestFixed, head_offset) == offset_of!(RequestEvent, head_offset));
    assert!(offset_of!(RequestFixed, head_len) == offset_of!(RequestEvent, head_len));
    assert!(offset_of!(RequestFixed, kind) == offset_of!(RequestEvent, kind));
    assert!(offset_of!(RequestFixed, flags) == offset_of!(RequestEvent, flags));
    assert!(offset_of!(RequestFixed, head_skip) == offset_of!(RequestEvent, head_skip));
};

/// A request event as the ring buffer holds it: its fields, and its head bytes borrowed from
/// the record.
#[derive(Debug, Clone, Copy)]
pub struct RequestRecord<'a> {
    pub cookie: u64,
    pub ts_ns: u64,
    pub remote_addr: [u8; 16],
    pub bytes_in_start: u64,
    pub bytes_out_start: u64,
    pub events_out_start: u64,
    pub head_offset: u64,
    pub kind: u8,
    pub flags: u8,
    /// The request bytes the record carries (`head_len` bytes from `head_skip`, within what
    /// the record holds).
    pub head: &'a [u8],
}

impl RequestRecord<'_> {
    pub fn head_bytes(&self) -> &[u8] {
        self.head
    }
}

/// Decodes a request event record (the kernel sends it only as long as the head it carries).
pub fn decode_request(bytes: &[u8]) -> Option<RequestRecord<'_>> {
    const FIXED: usize = std::mem::size_of::<RequestFixed>();
    if bytes.len() < FIXED {
        return None;
    }
    // SAFETY: RequestFixed is plain data (any bytes are a valid value) and `bytes` holds at
    // least its size; the read is unaligned-safe.
    let f: RequestFixed = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let from = (FIXED + usize::from(f.head_skip)).min(bytes.len());
    let to = (from + usize::from(f.head_len))
        .min(bytes.len())
        .min(FIXED + sensor_common::HEAD_EVENT_MAX);
    Some(RequestRecord {
        cookie: f.cookie,
        ts_ns: f.ts_ns,
        remote_addr: f.remote_addr,
        bytes_in_start: f.bytes_in_start,
        bytes_out_start: f.bytes_out_start,
        events_out_start: f.events_out_start,
        head_offset: f.head_offset,
        kind: f.kind,
        flags: f.flags,
        head: &bytes[from..to.max(from)],
    })
}

/// Forwards `aya-log-ebpf` records from the kernel to the agent's logger. Needs a tokio runtime.
fn spawn_kernel_log_forwarder(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd owns the logger.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!("kernel log forwarding unavailable: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            match fd.readable_mut().await {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(e) => {
                    warn!("kernel log forwarding stopped: {e}");
                    return;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The closed records are read at the first poll, after every loss from the ring (also one
    /// right after another) and at least every `CLOSED_READ_EVERY` polls; not otherwise.
    #[test]
    fn closed_records_are_read_when_the_ring_lost_one() {
        let mut r = ClosedReads::default();
        // Each poll as `poll_each` does it: a read that is due, then done when it went through.
        let poll = |r: &mut ClosedReads, ring_full: u64| {
            let due = r.due(ring_full);
            if due {
                r.done(ring_full);
            }
            due
        };
        assert!(poll(&mut r, 0), "the first poll reads them");
        assert!(!poll(&mut r, 0));
        assert!(poll(&mut r, 1), "a close the ring could not take");
        assert!(poll(&mut r, 3));
        assert!(!poll(&mut r, 3));
        let mut reads = 0;
        for _ in 0..10 * CLOSED_READ_EVERY {
            reads += u32::from(poll(&mut r, 3));
        }
        assert_eq!(reads, 10, "one read every CLOSED_READ_EVERY polls");
        // A counter that went back (pinned state replaced under a running agent) is a change.
        assert!(poll(&mut r, 0));
        // A read that did not go through is due again at the next poll.
        assert!(r.due(5));
        assert!(r.due(5));
        r.done(5);
        assert!(!r.due(5));
        // Before the agent stops: read them whatever the ring lost.
        r = ClosedReads::default();
        assert!(r.due(5));
    }

    /// A walk's seq_file output splits into whole records and the end marker; anything else
    /// (a cut record, no marker) is refused, not guessed at.
    #[test]
    fn walk_output_splits_into_records_and_end() {
        let end = LiveWalkEnd {
            session: 7,
            last: 41,
            in_slots: 40,
        };
        let mut bytes = vec![0xabu8; 2 * LIVE_RECORD_BYTES];
        for word in [end.session, end.last, end.in_slots] {
            bytes.extend_from_slice(&word.to_ne_bytes());
        }
        let (records, got) = split_walk(&bytes).expect("whole");
        assert_eq!((records.len(), got), (2 * LIVE_RECORD_BYTES, end));
        let (records, got) = split_walk(&bytes[2 * LIVE_RECORD_BYTES..]).expect("marker only");
        assert_eq!((records.len(), got), (0, end));
        assert!(split_walk(&bytes[1..]).is_err(), "a cut record");
        assert!(split_walk(&bytes[..10]).is_err(), "no marker");
        assert!(split_walk(&[]).is_err(), "nothing");
    }

    /// Slots on the iterator path: one per connection up to the default cap, or as configured;
    /// one on the map path.
    #[test]
    fn live_slots_follow_the_settings() {
        let mut settings = CaptureSettings {
            cgroup: PathBuf::new(),
            ports: vec![8000],
            max_connections: 1000,
            ring_buffer_bytes: 4096,
            request_ring_bytes: 4096,
            live_slots: 0,
            pin_dir: PathBuf::new(),
            fresh: false,
            head_bytes: 0,
            live_read: LiveRead::Auto,
        };
        assert_eq!(live_slots(LivePath::Iterator, &settings), 1000);
        assert_eq!(live_slots(LivePath::Map, &settings), 1);
        settings.max_connections = 1 << 20;
        assert_eq!(
            live_slots(LivePath::Iterator, &settings),
            DEFAULT_LIVE_SLOTS_MAX
        );
        settings.live_slots = 30;
        assert_eq!(live_slots(LivePath::Iterator, &settings), 30);
    }

    /// A walk is whole when every record it put in slots was read from them and the records
    /// read are as many as it walked; a slot another walk rewrote, or a count that disagrees,
    /// is not.
    #[test]
    fn walks_are_whole_only_when_every_record_was_read() {
        let end = |last, in_slots| LiveWalkEnd {
            session: 3,
            last,
            in_slots,
        };
        // No records; one in a slot; one beyond (another walk held the array).
        assert!(walk_is_whole(&end(0, 0), 0, 0));
        assert!(walk_is_whole(&end(0, 1), 1, 0));
        assert!(walk_is_whole(&end(0, 0), 0, 1));
        // 100 records, 30 in slots and 70 beyond.
        assert!(walk_is_whole(&end(99, 30), 30, 70));
        // A slot rewritten before it was read: the run of the walk's slots ends early.
        assert!(!walk_is_whole(&end(0, 1), 0, 0));
        assert!(!walk_is_whole(&end(99, 30), 29, 70));
        // Counts that disagree with the objects walked.
        assert!(!walk_is_whole(&end(99, 30), 30, 69));
        assert!(!walk_is_whole(&end(5, 0), 0, 0));
    }

    /// A live record is the prefix of the `ClosedConn` the kernel holds: every reported field
    /// decodes as written, the parser state (not written) as zeros, and a short record (the
    /// tail of a read cut short) decodes as nothing.
    #[test]
    fn live_records_decode_every_reported_field() {
        let mut rec = ClosedConn {
            cookie: 0x1122_3344_5566_7788,
            ..ClosedConn::default()
        };
        let s = &mut rec.stats;
        s.local_addr = [3; 16];
        s.remote_addr = [4; 16];
        (s.local_port, s.remote_port, s.family, s.proto, s.closed) = (8000, 40000, 10, 1, 1);
        (s.bytes_in, s.bytes_out, s.packets_in, s.packets_out) = (5, 6, 7, 8);
        (s.requests, s.first_seen_ns, s.last_seen_ns) = (9, 10, 11);
        (s.in_seq_base, s.out_seq_base, s.events_out) = (12, 13, 14);
        (s.exchange_flags, s._pad) = (15, 16);
        s.parse.fin_end = 17;
        s.parse.live.cursor = 18;
        // SAFETY: ClosedConn is plain old data without padding (sensor-common asserts it).
        let bytes: [u8; std::mem::size_of::<ClosedConn>()] = unsafe { std::mem::transmute(rec) };
        let (cookie, stats) = decode_live(&bytes[..LIVE_RECORD_BYTES]).expect("a whole record");
        assert_eq!(cookie, rec.cookie);
        let want = ConnStats {
            parse: Default::default(),
            ..rec.stats
        };
        assert_eq!(stats, want);
        assert_ne!(stats, rec.stats, "the parser state is not in a live record");
        assert!(decode_live(&bytes[..LIVE_RECORD_BYTES - 1]).is_none());
    }

    /// The borrowed decoding reads what the kernel wrote: the fields, and the head from
    /// `head_skip` for `head_len` bytes within what the record holds.
    #[test]
    fn request_records_decode_without_copying_the_head_buffer() {
        let mut ev = RequestEvent {
            cookie: 7,
            ts_ns: 11,
            remote_addr: [1; 16],
            bytes_in_start: 100,
            bytes_out_start: 200,
            events_out_start: 3,
            head_offset: 42,
            head_len: 5,
            kind: sensor_common::EVENT_HEAD,
            flags: 1,
            head_skip: 2,
            ..RequestEvent::default()
        };
        ev.head[..7].copy_from_slice(b"xxGET /");
        const FIXED: usize = std::mem::offset_of!(RequestEvent, head);
        // SAFETY: RequestEvent is plain data; the slice covers part of it.
        let all = unsafe {
            std::slice::from_raw_parts(
                std::ptr::from_ref(&ev).cast::<u8>(),
                std::mem::size_of::<RequestEvent>(),
            )
        };
        // The kernel sends the record only as long as the head it carries.
        let r = decode_request(&all[..FIXED + 7]).expect("decodes");
        assert_eq!(
            (
                r.cookie,
                r.ts_ns,
                r.bytes_in_start,
                r.bytes_out_start,
                r.events_out_start
            ),
            (7, 11, 100, 200, 3)
        );
        assert_eq!(
            (r.head_offset, r.kind, r.flags),
            (42, sensor_common::EVENT_HEAD, 1)
        );
        assert_eq!(r.remote_addr, [1; 16]);
        assert_eq!(r.head_bytes(), b"GET /");
        // A record cut short keeps what it holds; one without its fixed part is refused.
        assert_eq!(
            decode_request(&all[..FIXED + 4])
                .expect("short")
                .head_bytes(),
            b"GE"
        );
        assert_eq!(
            decode_request(&all[..FIXED + 1])
                .expect("shorter")
                .head_bytes(),
            b""
        );
        assert!(decode_request(&all[..FIXED - 1]).is_none());
    }
}
