//! What this kernel lets the agent do. Each probe tries the real thing, unattached and
//! unpinned: the sensor's own programs are loaded (verified) from its own object, so a probe
//! that passes means the start will pass, whatever kernel build, lockdown mode, container
//! policy or LSM decides. `sensor doctor` prints them all.

use std::path::Path;

use aya::{
    Ebpf, EbpfLoader,
    maps::MapType,
    programs::{ProgramError, ProgramType},
};
use sensor_common::{
    GLOBAL_LIVE_READ, MAP_CLOSED, MAP_CONNS, MAP_LIVE_RECORDS, MAP_OPEN, MAP_REQUESTS, PROG_ITER,
};
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
        .map_max_entries(MAP_REQUESTS, page)
        .map_max_entries(MAP_LIVE_RECORDS, 1);
    Ok(loader.load(KERNEL_OBJECT)?)
}

/// Whether the kernel loads the connection iterator and links it to a socket storage map.
pub fn iterator() -> Result<(), CaptureError> {
    let mut ebpf = load_unpinned(LivePath::Iterator)?;
    load_program(&mut ebpf, PROG_ITER)?;
    // The link is dropped at once: it only shows that the kernel accepts it.
    iter_link(&ebpf).map(drop)
}

/// A program the kernel loaded: how much of the verifier's budget it took.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    /// Instructions the verifier processed (walked, over every path it followed) to accept
    /// the program; the kernel refuses a program past `VERIFIER_INSN_LIMIT`. None before
    /// kernel 5.16, which does not report it.
    pub verified_insns: Option<u32>,
}

/// The verifier's budget per program (BPF_COMPLEXITY_LIMIT_INSNS, the same since 5.2).
pub const VERIFIER_INSN_LIMIT: u32 = 1_000_000;

/// Each program `path` uses, loaded (verified) and, for the iterator, linked: program name and
/// what the verifier took, or the refusal.
pub fn programs(path: LivePath) -> Vec<(&'static str, Result<Loaded, Refusal>)> {
    let mut ebpf = match load_unpinned(path) {
        Ok(ebpf) => ebpf,
        Err(e) => {
            let e = Refusal::of(&e);
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
            let loaded = result.map(|()| Loaded {
                verified_insns: ebpf
                    .program(name)
                    .and_then(|p| p.info().ok())
                    .and_then(|info| info.verified_instruction_count()),
            });
            (*name, loaded.map_err(|e| Refusal::of(&e)))
        })
        .collect()
}

/// Lines from the end of a refused program's verifier log that the doctor shows: the end says
/// what was refused and where (the instructions before it, the reason, the statistics).
const LOG_TAIL_LINES: usize = 60;

/// Why the kernel refused a program, for the doctor.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// One line (`short_error`).
    pub summary: String,
    /// The end of the verifier's log, if the refusal carries one.
    pub log_tail: Vec<String>,
}

impl Refusal {
    fn of(e: &CaptureError) -> Self {
        let log_tail = verifier_log(e)
            .map(|(_, log)| {
                let lines: Vec<&str> = log.lines().map(str::trim_end).collect();
                let lines = match lines.iter().rposition(|l| !l.is_empty()) {
                    Some(last) => &lines[..=last],
                    None => &[][..],
                };
                lines[lines.len().saturating_sub(LOG_TAIL_LINES)..]
                    .iter()
                    .map(|l| (*l).to_owned())
                    .collect()
            })
            .unwrap_or_default();
        Self {
            summary: short_error(e),
            log_tail,
        }
    }
}

/// The refusal without the advice `CaptureError::Refused` adds for a failed start. A program
/// the verifier refused is summed up by the verifier's reason (its log starts with the first
/// instruction, which says nothing; `sensor run` prints the whole log).
pub(super) fn short_error(e: &CaptureError) -> String {
    if let Some((io_error, log)) = verifier_log(e) {
        return match verifier_reason(&log) {
            Some(reason) => {
                format!("the BPF_PROG_LOAD syscall returned {io_error}; the verifier: {reason}")
            }
            None => format!("the BPF_PROG_LOAD syscall returned {io_error}"),
        };
    }
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
    text.lines().next().unwrap_or_default().to_owned()
}

/// The syscall's error and the verifier's log of a refused program load.
fn verifier_log(e: &CaptureError) -> Option<(&std::io::Error, String)> {
    let CaptureError::Refused { source, .. } = e else {
        return None;
    };
    match source.downcast_ref::<ProgramError>()? {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => Some((io_error, verifier_log.to_string())),
        _ => None,
    }
}

/// The verifier's reason for a refusal: the last line before the statistics it appends
/// ("verification time", "processed N insns"), with the instruction it refused if one comes
/// just before (`1688: (0f) r6 += r4`).
fn verifier_reason(log: &str) -> Option<String> {
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let end = lines
        .iter()
        .rposition(|l| l.starts_with("verification time"))
        .or_else(|| lines.iter().rposition(|l| l.starts_with("processed ")))
        .unwrap_or(lines.len());
    let (reason, before) = lines[..end].split_last()?;
    let is_insn = |l: &str| {
        l.split_once(':')
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    if is_insn(reason) {
        return Some((*reason).to_owned());
    }
    Some(match before.last().filter(|l| is_insn(l)) {
        // The register states after `;` are in the log.
        Some(insn) => format!(
            "{reason} (at {})",
            insn.split_once(" ;").map_or(*insn, |(i, _)| i).trim_end()
        ),
        None => (*reason).to_owned(),
    })
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
    /// The end of the verifier's log, for a program the kernel refused.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub verifier_log: Vec<String>,
    /// For a program the kernel loaded: instructions its verifier processed (see `Loaded`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified_insns: Option<u32>,
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
        verifier_log: Vec::new(),
        verified_insns: None,
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

/// "loads", with the share of the verifier's budget the program took where the kernel says:
/// a program near the limit on one kernel may be refused by another build of it.
fn loads_detail(loaded: Loaded) -> String {
    match loaded.verified_insns {
        Some(n) => format!(
            "loads (the verifier processed {n} instructions, {:.1} % of its limit)",
            f64::from(n) * 100.0 / f64::from(VERIFIER_INSN_LIMIT)
        ),
        None => "loads".to_owned(),
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
                    Ok(loaded) => Check {
                        verified_insns: loaded.verified_insns,
                        ..check(&name, true, loads_detail(loaded), false)
                    },
                    Err(e) => Check {
                        verifier_log: e.log_tail,
                        ..check(&name, false, e.summary, false)
                    },
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
            if !c.verifier_log.is_empty() {
                let _ = writeln!(out, "    the end of the verifier's log:");
                for line in &c.verifier_log {
                    let _ = writeln!(out, "    | {line}");
                }
            }
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

#[cfg(test)]
mod tests {
    use super::verifier_reason;

    #[test]
    fn the_reason_is_the_last_line_before_the_statistics_with_its_instruction() {
        // The end of 6.1's log for a refused packet program (log level 1 with statistics).
        let log = "0: R1=ctx(off=0,imm=0) R10=fp0\n\
                   ; unsafe { intrinsics::offset(self, count) }\n\
                   1687: (79) r6 = *(u64 *)(r10 -16)     ; frame5: R6_w=map_value(off=88,ks=4,vs=152,imm=0) R10=fp0\n\
                   1688: (0f) r6 += r4\n\
                   math between map_value pointer and register with unbounded min value is not allowed\n\
                   verification time 35284149 usec\n\
                   stack depth 112+24+0+96\n\
                   processed 263854 insns (limit 1000000) max_states_per_insn 43 total_states 15332 peak_states 1110 mark_read 46\n\n";
        assert_eq!(
            verifier_reason(log).as_deref(),
            Some(
                "math between map_value pointer and register with unbounded min value is not \
                 allowed (at 1688: (0f) r6 += r4)"
            )
        );
        // A refusal after the walk names no instruction.
        let log = "combined stack size of 6 calls is 544. Too large\n\
                   verification time 85107535 usec\n\
                   stack depth 112+32+0+96\n\
                   processed 683024 insns (limit 1000000) max_states_per_insn 55\n";
        assert_eq!(
            verifier_reason(log).as_deref(),
            Some("combined stack size of 6 calls is 544. Too large")
        );
        // Without statistics, the last line; an instruction with its register states cut.
        let log = "5: (85) call bpf_skb_load_bytes#26     ; R0_w=scalar()\n\
                   R4 min value is outside of the allowed memory range\n";
        assert_eq!(
            verifier_reason(log).as_deref(),
            Some(
                "R4 min value is outside of the allowed memory range (at 5: (85) call \
                 bpf_skb_load_bytes#26)"
            )
        );
        assert_eq!(verifier_reason(""), None);
    }
}
