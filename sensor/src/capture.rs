//! Capture: loads the kernel programs, attaches them to a cgroup, and reads what they count.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SockOps},
};
use log::{info, warn};
use sensor_common::{
    ClosedConn, ConnStats, Loss, MAP_CLOSED, MAP_CONNS, MAP_LOSS, MAP_PORTS, PROG_EGRESS,
    PROG_INGRESS, PROG_SOCKOPS,
};

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
}

/// Loaded and attached programs. Dropping it detaches them.
pub struct Capture {
    /// Owns the programs and their links; the links detach when it is dropped.
    ebpf: Ebpf,
    pub cgroup: PathBuf,
    pub conns: HashMap<MapData, u64, ConnStats>,
    pub loss: PerCpuArray<MapData, u64>,
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

impl Capture {
    pub fn attach(settings: &CaptureSettings) -> Result<Self, CaptureError> {
        preflight()?;
        let cgroup = resolve_cgroup(&settings.cgroup)?;
        raise_memlock_limit();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_CONNS, settings.max_connections)
            .map_max_entries(MAP_CLOSED, settings.ring_buffer_bytes)
            .load(KERNEL_OBJECT)?;
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
            program
                .attach(&cgroup_fd, attach_type, CgroupAttachMode::Single)
                .map_err(|source| program_err(name, "attach", source))?;
        }
        let sockops: &mut SockOps = ebpf
            .program_mut(PROG_SOCKOPS)
            .ok_or(CaptureError::Missing(PROG_SOCKOPS))?
            .try_into()
            .map_err(|source| program_err(PROG_SOCKOPS, "type", source))?;
        sockops
            .load()
            .map_err(|source| program_err(PROG_SOCKOPS, "load", source))?;
        sockops
            .attach(&cgroup_fd, CgroupAttachMode::Single)
            .map_err(|source| program_err(PROG_SOCKOPS, "attach", source))?;
        info!(
            "attached to cgroup {} watching ports {:?}",
            cgroup.display(),
            settings.ports
        );

        let conns = HashMap::try_from(
            ebpf.take_map(MAP_CONNS)
                .ok_or(CaptureError::Missing(MAP_CONNS))?,
        )
        .map_err(map_err(MAP_CONNS))?;
        let loss = PerCpuArray::try_from(
            ebpf.take_map(MAP_LOSS)
                .ok_or(CaptureError::Missing(MAP_LOSS))?,
        )
        .map_err(map_err(MAP_LOSS))?;
        Ok(Self {
            ebpf,
            cgroup,
            conns,
            loss,
        })
    }

    /// The ring buffer of closed-connection records; taken once by the reader task.
    pub fn take_closed(&mut self) -> Result<RingBuf<MapData>, CaptureError> {
        RingBuf::try_from(
            self.ebpf
                .take_map(MAP_CLOSED)
                .ok_or(CaptureError::Missing(MAP_CLOSED))?,
        )
        .map_err(map_err(MAP_CLOSED))
    }

    /// Reads every live record; entries the kernel marked closed (ring buffer was full) are
    /// returned separately and removed from the map.
    pub fn poll(&mut self) -> (Records, Records) {
        let mut live = Vec::new();
        let mut closed = Vec::new();
        for entry in self.conns.iter() {
            // A key deleted between the kernel's get_next_key and lookup shows as an error;
            // that connection's record arrives through the ring buffer.
            let Ok((cookie, stats)) = entry else { continue };
            if stats.closed != 0 {
                closed.push((cookie, stats));
            } else {
                live.push((cookie, stats));
            }
        }
        for (cookie, _) in &closed {
            let _ = self.conns.remove(cookie);
        }
        (live, closed)
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

fn program_err(name: &str, step: &str, source: aya::programs::ProgramError) -> CaptureError {
    CaptureError::Program {
        what: format!("{step} of program {name}"),
        source,
    }
}

/// Decodes a ring buffer record.
pub fn decode_closed(bytes: &[u8]) -> Option<ClosedConn> {
    (bytes.len() >= std::mem::size_of::<ClosedConn>())
        // SAFETY: length checked; ClosedConn is Pod (any bit pattern is valid).
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ClosedConn>()) })
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
