//! Everything the bench starts or changes, each owned by a guard that undoes it on drop (also
//! when a step fails): the cgroup and its processes, the agent and its pinned state, sysctls.

use std::{
    fs,
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM only set a flag: every loop checks it, returns an error, and the guards clean
/// up as the error unwinds.
pub fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

pub fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Sleeps in small steps, returning early (with an error) when interrupted.
pub fn sleep(d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupted()?;
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    Ok(())
}

/// Runs `cmd` to completion, killing it at `timeout`; the output of a successful run.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    // Drain both pipes on threads so a chatty child never blocks on a full pipe.
    let mut stdout = child.stdout.take().context("child stdout")?;
    let mut stderr = child.stderr.take().context("child stderr")?;
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if interrupted() {
            let _ = child.kill();
            let _ = child.wait();
            bail!("interrupted (stopped {cmd:?})");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {timeout:?} (killed)");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let output = Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    };
    if !status.success() {
        bail!(
            "{cmd:?} failed with {status}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// The bench's own cgroup (the servers run in it, the agent watches only it): the test
/// harness's, removed on drop.
pub use sensor_tests::Cgroup;

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn spawn(cmd: &mut Command, log: &Path) -> anyhow::Result<Self> {
        let log_file = fs::File::create(log).with_context(|| format!("{}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        Ok(Self { child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A sysctl set for the bench and restored to its old value on drop.
pub struct Sysctl {
    path: PathBuf,
    old: String,
}

impl Sysctl {
    pub fn set(name: &str, value: &str) -> anyhow::Result<Self> {
        let path = Path::new("/proc/sys").join(name.replace('.', "/"));
        let old = fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_owned();
        fs::write(&path, value).with_context(|| format!("setting {name}={value}"))?;
        Ok(Self { path, old })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Err(e) = fs::write(&self.path, &self.old) {
            eprintln!(
                "bench: could not restore {} to {}: {e}",
                self.path.display(),
                self.old
            );
        }
    }
}

/// Listening TCP ports on IPv4, from /proc/net/tcp (no connection to the server needed).
pub fn listening(port: u16) -> bool {
    let Ok(table) = fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let want = format!(":{port:04X}");
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
    })
}

pub fn wait_listening(port: u16, what: &str, proc_: &mut Proc) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listening(port) {
        check_interrupted()?;
        if let Some(status) = proc_.child.try_wait()? {
            bail!("{what} exited before listening on port {port} ({status})");
        }
        if Instant::now() >= deadline {
            bail!("{what} did not listen on port {port} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The agent, temporary directories and ports come from the test harness: one `sensor run`
/// launcher, and ports outside the ephemeral range (a port of 0 released for a server to bind
/// can be taken as the source port of any outgoing connection meanwhile).
pub use sensor_tests::{Agent, TempDir, ports::free_port};

/// How long an agent may take to answer or to stop (a profiled agent is slow).
pub const AGENT_PATIENCE: Duration = Duration::from_secs(60);

/// The bench's agents: scoped to the bench cgroup, from a fresh state, quiet.
pub struct AgentSpec<'a> {
    /// Runs the agent under this command (e.g. valgrind), if not empty.
    pub wrapper: &'a [String],
    pub bin: &'a Path,
    pub cgroup: &'a Path,
    pub ports: &'a [u16],
    /// `--config` for the agent, if not the embedded defaults.
    pub config: Option<&'a Path>,
    /// `--live-read` for the agent: auto, iterator or map.
    pub live_read: &'a str,
}

pub fn start_agent(spec: &AgentSpec<'_>) -> anyhow::Result<Agent> {
    let mut extra: Vec<std::ffi::OsString> = vec![
        "--fresh".into(),
        "--live-read".into(),
        spec.live_read.into(),
    ];
    if let Some(config) = spec.config {
        extra.extend(["--config".into(), config.into()]);
    }
    let agent = Agent::launch(sensor_tests::Launch {
        extra,
        bin: spec.bin.to_path_buf(),
        wrapper: spec.wrapper.iter().map(Into::into).collect(),
        log_level: "warn",
        ready_within: AGENT_PATIENCE,
        ..sensor_tests::Launch::new(spec.cgroup, spec.ports)
    })?;
    Ok(agent)
}

/// The live-read path a running agent took and why (its `/v1/health`).
pub fn live_read_of(agent: &Agent) -> anyhow::Result<(String, String)> {
    let health: serde_json::Value =
        serde_json::from_str(&api_get(&agent.socket, "/v1/health")?).context("health JSON")?;
    let field = |k: &str| {
        health[k]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("no {k} in the agent's health"))
    };
    Ok((field("live_read")?, field("live_read_reason")?))
}

/// GET on the agent's local API; the body of a 200 reply.
pub fn api_get(socket: &Path, path: &str) -> anyhow::Result<String> {
    let mut stream =
        UnixStream::connect(socket).with_context(|| format!("connecting {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: sensor\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .context("malformed API reply")?;
    if head.split_whitespace().nth(1) != Some("200") {
        bail!("API answered {head}");
    }
    Ok(body.to_owned())
}

/// CPU time of a process, in seconds: (user, system) from utime and stime.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<(f64, f64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at ") ".
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .context("malformed /proc/<pid>/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = f.get(11).context("no utime")?.parse()?;
    let stime: u64 = f.get(12).context("no stime")?.parse()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    Ok((utime as f64 / ticks, stime as f64 / ticks))
}

/// A `/proc/<pid>/status` field in KiB (VmRSS, VmHWM).
pub fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Raises this process's open-file limit to its hard limit (children inherit it: the load
/// generator holds one socket per client, nginx one per connection) and returns it.
pub fn raise_nofile() -> anyhow::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!(
            "cannot read the open-file limit: {}",
            std::io::Error::last_os_error()
        );
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        bail!(
            "cannot raise the open-file limit to {}: {}",
            lim.rlim_max,
            std::io::Error::last_os_error()
        );
    }
    Ok(lim.rlim_max)
}
