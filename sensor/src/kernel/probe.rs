//! What this kernel lets the agent do. Each probe tries the real thing, unattached and
//! unpinned: the sensor's own programs are loaded (verified) from its own object, so a probe
//! that passes means the start will pass, whatever kernel build, lockdown mode, container
//! policy or LSM decides. `sensor doctor` prints them all.

use std::path::Path;

use aya::{Ebpf, EbpfLoader, maps::MapType, programs::ProgramType};
use sensor_common::{GLOBAL_LIVE_READ, MAP_CLOSED, MAP_CONNS, MAP_OPEN, MAP_REQUESTS, PROG_ITER};
use serde::Serialize;

use super::{
    BTF_PATH, CaptureError, KERNEL_OBJECT, LivePath, LiveRead, cgroup2_root, iter_link,
    load_program, missing_capabilities, resolve_cgroup, root_cause,
};

/// The object loaded with its maps at their smallest (nothing pinned): enough to verify
/// programs against, freed when dropped.
fn load_unpinned(path: LivePath) -> Result<Ebpf, CaptureError> {
    let global = path.global();
    let page = 4096;
    let mut loader = EbpfLoader::new();
    loader
        .override_global(GLOBAL_LIVE_READ, &global, true)
        .map_max_entries(MAP_CONNS, 1)
        .map_max_entries(MAP_OPEN, 1)
        .map_max_entries(MAP_CLOSED, page)
        .map_max_entries(MAP_REQUESTS, page);
    Ok(loader.load(KERNEL_OBJECT)?)
}

/// Whether the kernel loads the connection iterator and links it to a socket storage map.
pub fn iterator() -> Result<(), CaptureError> {
    let mut ebpf = load_unpinned(LivePath::Iterator)?;
    load_program(&mut ebpf, PROG_ITER)?;
    // The link is dropped at once: it only shows that the kernel accepts it.
    iter_link(&ebpf).map(drop)
}

/// Each program `path` uses, loaded (verified) and, for the iterator, linked: program name and
/// the refusal, if any.
pub fn programs(path: LivePath) -> Vec<(&'static str, Result<(), String>)> {
    let mut ebpf = match load_unpinned(path) {
        Ok(ebpf) => ebpf,
        Err(e) => {
            let e = e.to_string();
            return path
                .pinned_links()
                .iter()
                .map(|name| (*name, Err(e.clone())))
                .collect();
        }
    };
    path.pinned_links()
        .iter()
        .map(|name| {
            let mut result = load_program(&mut ebpf, name);
            if result.is_ok() && *name == PROG_ITER {
                result = iter_link(&ebpf).map(drop);
            }
            (*name, result.map_err(|e| short_error(&e)))
        })
        .collect()
}

/// The refusal without the advice `CaptureError::Refused` adds for a failed start.
pub(super) fn short_error(e: &CaptureError) -> String {
    let text = match e {
        CaptureError::Refused { source, .. } => {
            let cause = root_cause(source.as_ref());
            let outer = source.to_string();
            if outer.contains(&cause) {
                outer
            } else {
                format!("{outer}: {cause}")
            }
        }
        other => other.to_string(),
    };
    // The verifier's log follows on later lines; `sensor run` prints it in full.
    text.lines().next().unwrap_or_default().to_owned()
}

/// One line of the doctor's report.
#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    /// "ok", "missing" or "info".
    pub status: &'static str,
    pub detail: String,
    /// The agent cannot run without it (on any path).
    pub required: bool,
}

/// Everything `sensor doctor` found.
#[derive(Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub checks: Vec<Check>,
    /// The path a start would take with the configured `live_read`, if any works.
    pub live_read: Option<&'static str>,
    pub live_read_reason: String,
    /// The agent can start here.
    pub can_run: bool,
}

fn check(name: &str, ok: bool, detail: String, required: bool) -> Check {
    Check {
        name: name.to_owned(),
        status: if ok { "ok" } else { "missing" },
        detail,
        required,
    }
}

fn kernel_release() -> String {
    // SAFETY: uname fills the zeroed struct; its fields are NUL-terminated.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return "unknown".to_owned();
        }
        std::ffi::CStr::from_ptr(u.release.as_ptr())
            .to_string_lossy()
            .into_owned()
    }
}

/// Runs every probe; `cgroup` and `live_read` as the agent would be configured.
pub fn doctor(cgroup: &Path, live_read: LiveRead) -> Report {
    let mut checks = Vec::new();
    let missing = missing_capabilities();
    checks.push(check(
        "capabilities",
        missing.is_empty(),
        if missing.is_empty() {
            "CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (or CAP_SYS_ADMIN)".to_owned()
        } else {
            format!("missing {}", missing.join(", "))
        },
        true,
    ));
    let btf = Path::new(BTF_PATH).exists();
    checks.push(check("btf", btf, BTF_PATH.to_owned(), true));
    match cgroup2_root() {
        Ok(root) => checks.push(check("cgroup v2", true, root.display().to_string(), true)),
        Err(e) => checks.push(check("cgroup v2", false, e.to_string(), true)),
    }
    match resolve_cgroup(cgroup) {
        Ok(path) => checks.push(check("cgroup", true, path.display().to_string(), true)),
        Err(e) => checks.push(check("cgroup", false, e.to_string(), true)),
    }
    for (name, map, required) in [
        ("map: hash", MapType::Hash, true),
        ("map: array", MapType::Array, true),
        ("map: per-CPU array", MapType::PerCpuArray, true),
        ("map: ring buffer", MapType::RingBuf, true),
        ("map: socket storage", MapType::SkStorage, true),
    ] {
        checks.push(probe_result(
            name,
            aya::sys::is_map_supported(map),
            required,
        ));
    }
    for (name, program, required) in [
        ("program type: cgroup_skb", ProgramType::CgroupSkb, true),
        ("program type: sock_ops", ProgramType::SockOps, true),
        (
            "program type: tracing (fentry)",
            ProgramType::Tracing,
            false,
        ),
    ] {
        checks.push(probe_result(
            name,
            aya::sys::is_program_supported(program),
            required,
        ));
    }
    match super::sys::probe_batch_ops() {
        Ok(ok) => checks.push(check(
            "batch map operations",
            ok,
            if ok {
                "one syscall per 4096 records".to_owned()
            } else {
                "records are read one by one (slower, still exact)".to_owned()
            },
            false,
        )),
        Err(e) => checks.push(check("batch map operations", false, e.to_string(), false)),
    }
    let mut works = Vec::new();
    if missing.is_empty() && btf {
        for path in [LivePath::Iterator, LivePath::Map] {
            let results = programs(path);
            let ok = results.iter().all(|(_, r)| r.is_ok());
            for (program, result) in results {
                let name = format!("{path} path: {program}");
                checks.push(match result {
                    Ok(()) => check(&name, true, "loads".to_owned(), false),
                    Err(e) => check(&name, false, e, false),
                });
            }
            if ok {
                works.push(path);
            }
        }
    }
    let (chosen, reason) = match live_read {
        LiveRead::Auto => (
            works.first().copied(),
            match works.first() {
                Some(LivePath::Iterator) => "auto: the kernel loads the iterator".to_owned(),
                Some(LivePath::Map) => "auto: the kernel refuses the iterator".to_owned(),
                None => "no path loads on this kernel".to_owned(),
            },
        ),
        LiveRead::Iterator => (
            works
                .contains(&LivePath::Iterator)
                .then_some(LivePath::Iterator),
            "live_read = iterator".to_owned(),
        ),
        LiveRead::Map => (
            works.contains(&LivePath::Map).then_some(LivePath::Map),
            "live_read = map".to_owned(),
        ),
    };
    let required_ok = checks.iter().all(|c| !c.required || c.status == "ok");
    Report {
        kernel: kernel_release(),
        can_run: required_ok && chosen.is_some(),
        live_read: chosen.map(LivePath::name),
        live_read_reason: reason,
        checks,
    }
}

fn probe_result<E: std::fmt::Display>(
    name: &str,
    result: Result<bool, E>,
    required: bool,
) -> Check {
    match result {
        Ok(ok) => check(
            name,
            ok,
            if ok { "supported" } else { "not supported" }.to_owned(),
            required,
        ),
        Err(e) => check(name, false, format!("probe failed: {e}"), required),
    }
}

impl Report {
    /// The human-readable report.
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = format!("kernel: {}\n", self.kernel);
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &self.checks {
            let mark = match (c.status, c.required) {
                ("ok", _) => "ok",
                (_, true) => "MISSING",
                _ => "no",
            };
            let _ = writeln!(out, "  {:<width$}  {mark:<7}  {}", c.name, c.detail);
        }
        match self.live_read {
            Some(path) => {
                let _ = writeln!(out, "live read: {path} ({})", self.live_read_reason);
            }
            None => {
                let _ = writeln!(out, "live read: none ({})", self.live_read_reason);
            }
        }
        out.push_str(if self.can_run {
            "verdict: the agent can run here\n"
        } else {
            "verdict: the agent cannot run here (see MISSING above)\n"
        });
        out
    }
}
