//! Capture: loads the kernel programs, attaches them to a cgroup, and reads what they count.

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
    ABI_VERSION, CONFIG_HEAD_BYTES, CONFIG_MAX_CONNECTIONS, ClosedConn, ConnStats, HEAD_MAX, Loss,
    MAP_CLOSED, MAP_CONFIG, MAP_CONNS, MAP_LIVE, MAP_LOSS, MAP_PORTS, MAP_REQUESTS, MAP_SOCKS,
    PROG_EGRESS, PROG_INGRESS, PROG_ITER, PROG_SOCKOPS, RequestEvent,
};

/// Maps pinned under the instance directory, by name.
const PINNED_MAPS: [&str; 8] = [
    MAP_SOCKS,
    MAP_LIVE,
    MAP_CONNS,
    MAP_CLOSED,
    MAP_REQUESTS,
    MAP_PORTS,
    MAP_LOSS,
    MAP_CONFIG,
];
/// Program links pinned under the instance directory: while pinned, the programs stay
/// attached and keep counting even when no agent runs.
const PINNED_LINKS: [&str; 4] = [PROG_INGRESS, PROG_EGRESS, PROG_SOCKOPS, PROG_ITER];

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

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> CaptureError {
    move |source| CaptureError::Map { name, source }
}

/// Connection records keyed by socket cookie.
pub type Records = Vec<(u64, ConnStats)>;

/// What the agent needs to attach.
#[derive(Debug, Clone)]
pub struct CaptureSettings {
    /// Empty: the cgroup v2 root.
    pub cgroup: PathBuf,
    pub ports: Vec<u16>,
    pub max_connections: u32,
    pub ring_buffer_bytes: u32,
    /// bpffs directory for pinned maps and links.
    pub pin_dir: PathBuf,
    /// Discard pinned state instead of continuing from it.
    pub fresh: bool,
    /// Bytes of each HTTP/1.x request head copied to the agent (0..=HEAD_MAX; 0 disables).
    pub head_bytes: u32,
}

/// Writes the agent's settings for the kernel programs.
fn write_config<T: std::borrow::BorrowMut<MapData>>(
    config: &mut Array<T, u32>,
    settings: &CaptureSettings,
) -> Result<(), CaptureError> {
    let head = settings.head_bytes.min(HEAD_MAX as u32);
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
    /// Closed connections until the agent deletes them; live ones are read through `iter_path`.
    pub conns: HashMap<MapData, u64, ConnStats>,
    /// The pinned iterator link over the live records: each open starts a new walk.
    iter_path: PathBuf,
    pub loss: PerCpuArray<MapData, u64>,
    closed: Option<RingBuf<MapData>>,
    requests: Option<RingBuf<MapData>>,
}

/// Checks what loading needs, so the operator gets one clear message instead of an EPERM.
pub fn preflight() -> Result<(), CaptureError> {
    let effective = effective_capabilities();
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    if !(has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON) && has(CAP_NET_ADMIN))) {
        let missing: Vec<&str> = [
            (CAP_BPF, "CAP_BPF"),
            (CAP_PERFMON, "CAP_PERFMON"),
            (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        ]
        .iter()
        .filter(|(cap, _)| !has(*cap))
        .map(|(_, name)| *name)
        .collect();
        return Err(CaptureError::MissingCapabilities(missing.join(", ")));
    }
    if !Path::new(BTF_PATH).exists() {
        return Err(CaptureError::NoBtf);
    }
    Ok(())
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

impl Capture {
    pub fn attach(settings: &CaptureSettings) -> Result<Self, CaptureError> {
        preflight()?;
        let cgroup = resolve_cgroup(&settings.cgroup)?;
        raise_memlock_limit();
        let instance = format!(
            "abi{ABI_VERSION}-{:016x}",
            fingerprint(&[KERNEL_OBJECT, cgroup.as_os_str().as_encoded_bytes()])
        );
        let pin_dir = &settings.pin_dir;
        ensure_bpffs(pin_dir)?;
        let instance_dir = pin_dir.join(&instance);
        std::fs::create_dir_all(pin_dir).map_err(|e| pin_err(pin_dir, e))?;
        // Anything else pinned here is another version, kernel object or cgroup.
        for entry in std::fs::read_dir(pin_dir)
            .map_err(|e| pin_err(pin_dir, e))?
            .flatten()
        {
            let path = entry.path();
            if settings.fresh || path != instance_dir {
                info!(
                    "removing pinned sensor state {} ({})",
                    path.display(),
                    if settings.fresh {
                        "--fresh"
                    } else {
                        "from another sensor version, kernel object or cgroup"
                    }
                );
                remove_instance(&path);
            }
        }
        let complete = PINNED_MAPS.iter().all(|m| instance_dir.join(m).exists())
            && PINNED_LINKS
                .iter()
                .all(|l| instance_dir.join(format!("link-{l}")).exists());
        if complete {
            info!(
                "continuing from pinned state {} (programs stayed attached)",
                instance_dir.display()
            );
            return Self::reuse(settings, cgroup, instance, instance_dir);
        }
        if instance_dir.exists() {
            warn!(
                "incomplete pinned state {}: replacing it",
                instance_dir.display()
            );
            remove_instance(&instance_dir);
        }
        Self::load_and_attach(settings, cgroup, instance, instance_dir)
    }

    fn reuse(
        settings: &CaptureSettings,
        cgroup: PathBuf,
        instance: String,
        instance_dir: PathBuf,
    ) -> Result<Self, CaptureError> {
        let mut ports: Array<MapData, u8> =
            Array::try_from(Map::Array(open_pinned_map(&instance_dir, MAP_PORTS)?))
                .map_err(map_err(MAP_PORTS))?;
        let watched: std::collections::HashSet<u16> = settings.ports.iter().copied().collect();
        for port in 0..=u16::MAX {
            let want = u8::from(watched.contains(&port));
            if ports.get(&u32::from(port), 0).unwrap_or(0) != want {
                ports
                    .set(u32::from(port), want, 0)
                    .map_err(map_err(MAP_PORTS))?;
            }
        }
        let mut config: Array<MapData, u32> =
            Array::try_from(Map::Array(open_pinned_map(&instance_dir, MAP_CONFIG)?))
                .map_err(map_err(MAP_CONFIG))?;
        write_config(&mut config, settings)?;
        Ok(Self {
            _ebpf: None,
            cgroup,
            instance_dir: instance_dir.clone(),
            instance,
            reused: true,
            iter_path: iter_path(&instance_dir),
            conns: HashMap::try_from(Map::HashMap(open_pinned_map(&instance_dir, MAP_CONNS)?))
                .map_err(map_err(MAP_CONNS))?,
            loss: PerCpuArray::try_from(Map::PerCpuArray(open_pinned_map(
                &instance_dir,
                MAP_LOSS,
            )?))
            .map_err(map_err(MAP_LOSS))?,
            closed: Some(
                RingBuf::try_from(Map::RingBuf(open_pinned_map(&instance_dir, MAP_CLOSED)?))
                    .map_err(map_err(MAP_CLOSED))?,
            ),
            requests: Some(
                RingBuf::try_from(Map::RingBuf(open_pinned_map(&instance_dir, MAP_REQUESTS)?))
                    .map_err(map_err(MAP_REQUESTS))?,
            ),
        })
    }

    fn load_and_attach(
        settings: &CaptureSettings,
        cgroup: PathBuf,
        instance: String,
        instance_dir: PathBuf,
    ) -> Result<Self, CaptureError> {
        std::fs::create_dir_all(&instance_dir).map_err(|e| pin_err(&instance_dir, e))?;
        let map_paths: Vec<(&'static str, PathBuf)> = PINNED_MAPS
            .iter()
            .map(|m| (*m, instance_dir.join(m)))
            .collect();
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(MAP_CONNS, settings.max_connections)
            .map_max_entries(MAP_CLOSED, settings.ring_buffer_bytes);
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

        let cgroup_fd = File::open(&cgroup).map_err(|source| CaptureError::Io {
            path: cgroup.clone(),
            source,
        })?;
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
            program
                .load()
                .map_err(|source| program_err(name, "load", source))?;
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
        sockops
            .load()
            .map_err(|source| program_err(PROG_SOCKOPS, "load", source))?;
        let link_id = sockops
            .attach(&cgroup_fd, CgroupAttachMode::Single)
            .map_err(|source| program_err(PROG_SOCKOPS, "attach", source))?;
        let link = sockops
            .take_link(link_id)
            .map_err(|source| program_err(PROG_SOCKOPS, "take link", source))?;
        pin_link(FdLink::try_from(link), &instance_dir, PROG_SOCKOPS)?;
        attach_iter(&mut ebpf, &instance_dir)?;
        info!(
            "attached to cgroup {} watching ports {:?}; pinned under {}",
            cgroup.display(),
            settings.ports,
            instance_dir.display()
        );

        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(CaptureError::Missing(name))
        };
        let conns = HashMap::try_from(take(&mut ebpf, MAP_CONNS)?).map_err(map_err(MAP_CONNS))?;
        let loss = PerCpuArray::try_from(take(&mut ebpf, MAP_LOSS)?).map_err(map_err(MAP_LOSS))?;
        let closed =
            RingBuf::try_from(take(&mut ebpf, MAP_CLOSED)?).map_err(map_err(MAP_CLOSED))?;
        let requests =
            RingBuf::try_from(take(&mut ebpf, MAP_REQUESTS)?).map_err(map_err(MAP_REQUESTS))?;
        Ok(Self {
            _ebpf: Some(ebpf),
            cgroup,
            iter_path: iter_path(&instance_dir),
            instance_dir,
            instance,
            reused: false,
            conns,
            loss,
            closed: Some(closed),
            requests: Some(requests),
        })
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
    /// each, or one by one where the kernel has no batch operations.
    pub fn delete(&mut self, cookies: &[u64]) {
        let fd = self.conns.map().fd().as_fd().as_raw_fd();
        let mut rest = cookies;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(BATCH)];
            match batch::delete(fd, chunk) {
                Ok(()) => rest = &rest[chunk.len()..],
                // The key at `done` is not in the map (nothing to delete): skip it.
                Err((done, e)) if e.raw_os_error() == Some(libc::ENOENT) => {
                    rest = &rest[(done + 1).min(rest.len())..];
                }
                Err((done, _)) => {
                    for cookie in &rest[done..] {
                        let _ = self.conns.remove(cookie);
                    }
                    return;
                }
            }
        }
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

    /// Reads every record the kernel holds: the live ones (socket storage, through the
    /// iterator), then the closed-but-not-yet-deleted ones (the CONNS map, a few batch
    /// syscalls). In that order, a connection that closes between the two reads shows in
    /// both, never in neither; the later, closed record comes last.
    pub fn poll(&self) -> Records {
        let mut records = match read_live(&self.iter_path) {
            Ok(records) => records,
            Err(e) => {
                warn!("reading the live connections failed: {e}");
                Records::new()
            }
        };
        let fd = self.conns.map().fd().as_fd().as_raw_fd();
        match batch::lookup_all(fd) {
            Ok(closed) => records.extend(closed),
            Err(e) => {
                log::debug!("batch lookup unavailable ({e}); reading the map key by key");
                // A key deleted between the kernel's get_next_key and lookup shows as an
                // error; only the agent deletes, so that cannot lose a record.
                records.extend(self.conns.iter().filter_map(Result::ok));
            }
        }
        records
    }

    /// Loss counters summed over CPUs, by name.
    pub fn loss_counts(&self) -> Vec<(&'static str, u64)> {
        Loss::ALL
            .iter()
            .map(|kind| {
                let total = self
                    .loss
                    .get(&(*kind as u32), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (kind.name(), total)
            })
            .collect()
    }
}

fn iter_path(instance_dir: &Path) -> PathBuf {
    instance_dir.join(format!("link-{PROG_ITER}"))
}

/// Bytes the last walk of the iterator returned: the next read starts with room for as many
/// (and some), instead of growing its buffer step by step through megabytes.
static LAST_WALK_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Every live record: one walk of the iterator (opening the pinned link starts it).
fn read_live(path: &Path) -> std::io::Result<Records> {
    use std::sync::atomic::Ordering::Relaxed;
    let last = LAST_WALK_BYTES.load(Relaxed);
    let mut bytes = Vec::with_capacity(last + last / 8 + 4096);
    File::open(path)?.read_to_end(&mut bytes)?;
    LAST_WALK_BYTES.store(bytes.len(), Relaxed);
    Ok(bytes
        .chunks_exact(std::mem::size_of::<ClosedConn>())
        .filter_map(decode_closed)
        .map(|rec| (rec.cookie, rec.stats))
        .collect())
}

/// Loads the iterator over the live records, links it to the socket storage map and pins the
/// link where `read_live` opens it.
fn attach_iter(ebpf: &mut Ebpf, instance_dir: &Path) -> Result<(), CaptureError> {
    let map_fd = match ebpf.map(MAP_SOCKS) {
        Some(Map::SkStorage(data)) => data.fd().as_fd().as_raw_fd(),
        _ => return Err(CaptureError::Missing(MAP_SOCKS)),
    };
    let btf = Btf::from_sys_fs().map_err(|e| CaptureError::Iter(std::io::Error::other(e)))?;
    let program: &mut Iter = ebpf
        .program_mut(PROG_ITER)
        .ok_or(CaptureError::Missing(PROG_ITER))?
        .try_into()
        .map_err(|source| program_err(PROG_ITER, "type", source))?;
    program
        .load("bpf_sk_storage_map", &btf)
        .map_err(|source| program_err(PROG_ITER, "load", source))?;
    let prog_fd = program
        .fd()
        .map_err(|source| program_err(PROG_ITER, "fd", source))?
        .as_fd()
        .as_raw_fd();
    // aya's Iter::attach passes no map; a map iterator needs one (bpf_iter_link_info.map).
    let link = iter_link::create(prog_fd, map_fd).map_err(CaptureError::Iter)?;
    iter_link::pin(&link, &iter_path(instance_dir)).map_err(CaptureError::Iter)
}

/// BPF_LINK_CREATE of a map iterator and BPF_OBJ_PIN of the link, with raw bpf(2) calls.
mod iter_link {
    use std::{
        os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        path::Path,
    };

    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_TRACE_ITER: u32 = 28;

    /// `union bpf_attr`'s `link_create` member, iterator variant.
    #[repr(C)]
    #[derive(Default)]
    struct LinkCreateAttr {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
        iter_info: u64,
        iter_info_len: u32,
        _pad: u32,
    }

    /// `union bpf_attr`'s `obj_pin` member.
    #[repr(C)]
    #[derive(Default)]
    struct ObjPinAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
        // SAFETY: attr is a valid bpf_attr prefix of the size passed; what it points to
        // outlives the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                std::ptr::from_mut(attr),
                std::mem::size_of::<T>(),
            )
        };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    pub fn create(prog_fd: RawFd, map_fd: RawFd) -> std::io::Result<OwnedFd> {
        // union bpf_iter_link_info { struct { __u32 map_fd; } map; ... }
        let mut info = [0u32; 4];
        info[0] = map_fd as u32;
        let mut attr = LinkCreateAttr {
            prog_fd: prog_fd as u32,
            attach_type: BPF_TRACE_ITER,
            iter_info: info.as_mut_ptr() as u64,
            iter_info_len: std::mem::size_of_val(&info) as u32,
            ..Default::default()
        };
        let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
        // SAFETY: the kernel returned a new link fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    pub fn pin(link: &OwnedFd, path: &Path) -> std::io::Result<()> {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(std::io::Error::other)?;
        let mut attr = ObjPinAttr {
            pathname: c.as_ptr() as u64,
            bpf_fd: link.as_raw_fd() as u32,
            ..Default::default()
        };
        bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
    }
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

/// Records per batch syscall.
const BATCH: usize = 4096;

/// BPF_MAP_LOOKUP_BATCH / BPF_MAP_DELETE_BATCH on the connection map, with raw bpf(2) calls
/// (aya has no batch operations).
mod batch {
    use std::os::fd::RawFd;

    use sensor_common::ConnStats;

    use super::{BATCH, Records};

    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

    /// `union bpf_attr`'s `batch` member.
    #[repr(C)]
    #[derive(Default)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }

    fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
        // SAFETY: attr is a valid bpf_attr prefix of the size passed; the buffers it points
        // to are sized for `count` elements and outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                std::ptr::from_mut(attr),
                std::mem::size_of::<BatchAttr>(),
            )
        };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Every (key, value) of the map. ENOENT ends the walk (with the last elements read).
    pub fn lookup_all(fd: RawFd) -> std::io::Result<Records> {
        let mut records = Records::new();
        let mut keys = vec![0u64; BATCH];
        let mut values = vec![ConnStats::default(); BATCH];
        // Opaque cursors (a bucket index for hash maps); 8 bytes covers every map type.
        let mut cursor = 0u64;
        let mut next = 0u64;
        let mut first = true;
        // Bounded: each round either ends the walk or moves the cursor past at least one
        // bucket; the map has at most max_entries buckets worth of rounds.
        for _ in 0..1_000_000 {
            let mut attr = BatchAttr {
                in_batch: if first {
                    0
                } else {
                    std::ptr::from_mut(&mut cursor) as u64
                },
                out_batch: std::ptr::from_mut(&mut next) as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: BATCH as u32,
                map_fd: fd as u32,
                ..Default::default()
            };
            let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
            let n = (attr.count as usize).min(BATCH);
            records.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
            match result {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(records),
                Err(e) => return Err(e),
            }
            cursor = next;
            first = false;
        }
        Ok(records)
    }

    /// Deletes `keys`; on failure, how many were deleted before the error.
    pub fn delete(fd: RawFd, keys: &[u64]) -> Result<(), (usize, std::io::Error)> {
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            count: keys.len() as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        bpf(BPF_MAP_DELETE_BATCH, &mut attr).map_err(|e| (attr.count as usize, e))
    }
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

pub fn decode_closed(bytes: &[u8]) -> Option<ClosedConn> {
    decode(bytes)
}

/// Decodes a request record: the fixed fields and `head_len` bytes of `head` (the kernel
/// sends only those); the rest of `head` is zero.
pub fn decode_request(bytes: &[u8]) -> Option<RequestEvent> {
    const FIXED: usize = std::mem::offset_of!(RequestEvent, head);
    if bytes.len() < FIXED {
        return None;
    }
    let mut ev = RequestEvent::default();
    let n = bytes.len().min(std::mem::size_of::<RequestEvent>());
    // SAFETY: RequestEvent is Pod (any bytes are a valid value) and n is at most its size.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), std::ptr::from_mut(&mut ev).cast::<u8>(), n);
    }
    ev.head_len = ev.head_len.min((n - FIXED) as u16);
    Some(ev)
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
