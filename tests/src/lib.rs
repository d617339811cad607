//! Harness for the privileged end-to-end tests: a cgroup and (where needed) network namespaces
//! per test, the real agent binary, real peers (nginx, curl), and ground truth taken from the
//! peers themselves.
//!
//! Every wait is a condition with a deadline; nothing sleeps and hopes.

use std::{
    collections::BTreeMap,
    fs,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use serde::Deserialize;

pub mod fleet;
pub mod guest;
pub mod natsjwt;
pub mod ports;
pub mod siem;
pub mod systemd;
pub mod tmux;

/// Returns true when the test may run. Without root it prints why it skips, unless
/// SENSOR_REQUIRE_PRIVILEGED=1 (the README's test command), where skipping is a failure.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("SENSOR_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{test}: needs root (BPF, cgroups, network namespaces) and must not be skipped");
    }
    eprintln!("SKIPPED {test}: needs root (BPF, cgroups, network namespaces)");
    false
}

/// Polls `probe` until it yields a value; panics with `what` and the last observation after
/// `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, probe: impl FnMut() -> Result<T, String>) -> T {
    try_wait_for(what, timeout, probe).unwrap_or_else(|e| panic!("{e}"))
}

/// `wait_for` with the timeout as an error (for callers that clean up instead of panicking).
pub fn try_wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match probe() {
            Ok(v) => return Ok(v),
            Err(last) if Instant::now() >= deadline => {
                return Err(format!(
                    "timed out after {timeout:?} waiting for {what}; last: {last}"
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn unique(name: &str) -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    format!(
        "sensor-test-{name}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// SIGTERM, as an operator stopping a service does; waits for `what` to exit.
pub fn terminate(mut child: Child, what: &str) {
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait_for(&format!("{what} to exit"), Duration::from_secs(20), || {
        child
            .try_wait()
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "running".to_owned())
    });
}

/// `promtool check metrics` on an exposition: its exit status and what it remarked.
pub fn promtool_check(text: &str) -> (std::process::ExitStatus, String) {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus, or cargo xtask setup)");
    std::io::Write::write_all(
        promtool.stdin.as_mut().expect("promtool stdin"),
        text.as_bytes(),
    )
    .expect("feed promtool");
    let checked = promtool.wait_with_output().expect("promtool");
    let remarks = format!(
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    (checked.status, remarks)
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A cgroup v2 of the test's own; processes started in it are what the sensor watches.
pub struct Cgroup {
    pub path: PathBuf,
}

/// Mount point of the cgroup v2 hierarchy, from /proc/mounts.
pub fn find_cgroup2_root() -> std::io::Result<PathBuf> {
    fs::read_to_string("/proc/mounts")?
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .ok_or_else(|| std::io::Error::other("no cgroup v2 hierarchy is mounted"))
}

pub fn cgroup2_root() -> PathBuf {
    find_cgroup2_root().expect("a cgroup v2 hierarchy is mounted")
}

impl Cgroup {
    /// Creates the cgroup `name` directly below the cgroup v2 root (removed on drop).
    pub fn create(name: &str) -> std::io::Result<Self> {
        let path = find_cgroup2_root()?.join(name);
        fs::create_dir(&path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("mkdir {}: {e}", path.display())))?;
        Ok(Self { path })
    }

    /// A cgroup with a unique name for one test.
    pub fn new(name: &str) -> Self {
        Self::create(&unique(name)).unwrap_or_else(|e| panic!("test cgroup: {e}"))
    }

    /// A shell command prefix that moves itself into this cgroup, then execs `program`.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "echo $$ > '{}/cgroup.procs' && exec \"$@\"",
                self.path.display()
            ))
            .arg("sh")
            .arg(program);
        cmd
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = fs::write(self.path.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A network namespace of the test's own.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Self {
        let name = unique(name);
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        run_ok(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        Self { name }
    }

    /// `ip netns exec NAME program`.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    pub fn ip(&self, args: &[&str]) {
        run_ok(Command::new("ip").arg("-n").arg(&self.name).args(args));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Two namespaces joined by a veth pair: `a` has `addr_a`, `b` has `addr_b` (both /24).
pub fn veth_pair(a: &Netns, addr_a: &str, b: &Netns, addr_b: &str) {
    let (if_a, if_b) = ("veth-a", "veth-b");
    run_ok(Command::new("ip").args([
        "-n", &a.name, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", &b.name,
    ]));
    a.ip(&["addr", "add", &format!("{addr_a}/24"), "dev", if_a]);
    b.ip(&["addr", "add", &format!("{addr_b}/24"), "dev", if_b]);
    a.ip(&["link", "set", if_a, "up"]);
    b.ip(&["link", "set", if_b, "up"]);
}

/// A free TCP port on loopback (both families) for a server of the caller's; see `ports`.
pub fn free_port() -> u16 {
    ports::free_port().unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// The Python with the `openai` SDK: SENSOR_PYTHON, else the venv `cargo xtask setup` makes.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("SENSOR_PYTHON") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let venv = home.join(".cache/sensor-venv/bin/python");
    assert!(
        venv.exists(),
        "{} missing: run `cargo xtask setup`",
        venv.display()
    );
    venv
}

pub fn sensor_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("SENSOR_BIN") {
        return PathBuf::from(bin);
    }
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/sensor");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build -p sensor` or `cargo xtask test`",
        bin.display()
    );
    bin
}

/// One row of `sensor conns --json`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Conn {
    pub cookie: u64,
    pub local: String,
    pub remote: String,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    pub requests: u64,
    pub protocol: String,
    pub state: String,
    pub first_seen: String,
    pub last_seen: String,
}

/// The share of the verifier's budget (1 000 000 instructions processed) a program may take
/// on a test kernel. Builds of one kernel version differ in what their verifiers walk: the
/// packet program once took 60 % of the limit on one 6.18 build and passed it on another.
/// A quarter leaves room for the next kernel's verifier to walk four times as much.
pub const VERIFIER_SHARE_MAX: f64 = 0.25;

/// Every program the `sensor doctor --json` report says loaded, with the instructions its
/// verifier processed; fails a test where one took more than `VERIFIER_SHARE_MAX` of the
/// limit. Kernels before 5.16 do not report the count: there the check is said to be
/// impossible and the program left out. Returns (check name, count).
pub fn verifier_headroom(report: &serde_json::Value) -> Vec<(String, u64)> {
    let mut seen = Vec::new();
    let mut loaded = 0;
    for check in report["checks"].as_array().expect("checks") {
        let name = check["name"].as_str().unwrap_or_default();
        if !name.contains(" path: ") || check["status"] != "ok" {
            continue;
        }
        loaded += 1;
        let Some(n) = check["verified_insns"].as_u64() else {
            eprintln!(
                "{name}: kernel {} does not report the verifier's count (5.16 and newer do): \
                 its headroom is not checked",
                report["kernel"]
            );
            continue;
        };
        assert!(
            n as f64 <= VERIFIER_SHARE_MAX * 1_000_000.0,
            "{name}: the verifier processed {n} instructions, more than {} % of its limit on \
             kernel {}",
            VERIFIER_SHARE_MAX * 100.0,
            report["kernel"]
        );
        seen.push((name.to_owned(), n));
    }
    assert!(loaded > 0, "no program loaded: {report:#}");
    seen
}

/// The live-read path every agent of this run is forced onto (`SENSOR_LIVE_READ`), if any.
pub fn forced_live_read() -> Option<String> {
    std::env::var("SENSOR_LIVE_READ")
        .ok()
        .filter(|v| !v.is_empty())
}

/// How to start an agent. `Agent::start_with` covers the tests; the bench and the demo set
/// the binary, a wrapper, the log level and the patience they need.
pub struct Launch<'a> {
    pub cgroup: &'a Path,
    pub ports: &'a [u16],
    /// `--poll-interval-ms`, if not the configuration's.
    pub poll_ms: Option<u64>,
    /// More arguments for `sensor run`.
    pub extra: Vec<std::ffi::OsString>,
    /// The agent binary; empty: `sensor_bin()` (SENSOR_BIN, else the debug build).
    pub bin: PathBuf,
    /// Runs the agent under this command (valgrind, perf), if not empty.
    pub wrapper: Vec<std::ffi::OsString>,
    /// `RUST_LOG` of the agent.
    pub log_level: &'a str,
    /// How long the API may take to answer.
    pub ready_within: Duration,
}

impl<'a> Launch<'a> {
    pub fn new(cgroup: &'a Path, ports: &'a [u16]) -> Self {
        Self {
            cgroup,
            ports,
            poll_ms: None,
            extra: Vec::new(),
            // Resolved at launch: a caller that names its own binary (the bench's release
            // build) must not need the debug one.
            bin: PathBuf::new(),
            wrapper: Vec::new(),
            log_level: "info",
            ready_within: Duration::from_secs(30),
        }
    }
}

/// The agent under test, scoped to one cgroup, with its own API socket.
pub struct Agent {
    child: Child,
    pub socket: PathBuf,
    /// Its own bpffs pin directory and state directory, so agents of parallel tests never meet.
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    /// The wrapper and the binary, then the arguments.
    command: Vec<std::ffi::OsString>,
    args: Vec<std::ffi::OsString>,
    /// The binary the agent runs; its CLI calls use the same one (the bench has no debug
    /// build).
    bin: PathBuf,
    log_level: String,
    ready_within: Duration,
    _dir: TempDir,
}

impl Agent {
    pub fn start(cgroup: &Cgroup, ports: &[u16], poll_ms: u64) -> Self {
        Self::start_with(cgroup, ports, poll_ms, &[])
    }

    pub fn start_with(cgroup: &Cgroup, ports: &[u16], poll_ms: u64, extra: &[&str]) -> Self {
        Self::launch(Launch {
            poll_ms: Some(poll_ms),
            extra: extra.iter().map(Into::into).collect(),
            ..Launch::new(&cgroup.path, ports)
        })
        .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Starts an agent and waits for its API; an error (the agent stopped) if it does not come
    /// up.
    pub fn launch(l: Launch<'_>) -> anyhow::Result<Self> {
        let dir = TempDir::new("agent");
        let socket = dir.path.join("sensor.sock");
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(unique("pins"));
        let state_dir = dir.path.join("state");
        let ports: Vec<String> = l.ports.iter().map(u16::to_string).collect();
        let mut args: Vec<std::ffi::OsString> = vec![
            "run".into(),
            "--cgroup".into(),
            l.cgroup.into(),
            "--ports".into(),
            ports.join(",").into(),
            "--socket".into(),
            socket.clone().into(),
        ];
        if let Some(ms) = l.poll_ms {
            args.extend(["--poll-interval-ms".into(), ms.to_string().into()]);
        }
        args.extend([
            "--state-dir".into(),
            state_dir.clone().into(),
            "--pin-dir".into(),
            pin_dir.clone().into(),
        ]);
        // The forced-fallback runs of the test command (SENSOR_LIVE_READ=map) put every agent
        // of a test binary on that path, unless the caller chooses one itself.
        let forced = forced_live_read().filter(|_| !l.extra.iter().any(|a| a == "--live-read"));
        args.extend(l.extra);
        if let Some(path) = &forced {
            args.extend(["--live-read".into(), path.into()]);
        }
        let mut command = l.wrapper;
        let bin = if l.bin.as_os_str().is_empty() {
            sensor_bin()
        } else {
            l.bin
        };
        command.push(bin.clone().into());
        let child = Self::spawn(&dir.path, &command, &args, l.log_level)?;
        let mut agent = Self {
            child,
            socket,
            pin_dir,
            state_dir,
            command,
            args,
            bin,
            log_level: l.log_level.to_owned(),
            ready_within: l.ready_within,
            _dir: dir,
        };
        agent.wait_ready()?;
        if let Some(path) = forced {
            let health = agent.health();
            anyhow::ensure!(
                health["live_read"] == path.as_str(),
                "the agent must run on the forced live-read path {path}: {health}"
            );
        }
        Ok(agent)
    }

    fn spawn(
        dir: &Path,
        command: &[std::ffi::OsString],
        args: &[std::ffi::OsString],
        log_level: &str,
    ) -> anyhow::Result<Child> {
        use anyhow::Context as _;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))
            .context("agent log")?;
        let (program, wrapped) = command.split_first().context("no agent binary")?;
        Command::new(program)
            .args(wrapped)
            .args(args)
            .env("RUST_LOG", log_level)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {program:?} run"))
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        try_wait_for("the agent's API", self.ready_within, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Ok(Err(format!(
                    "agent exited early ({status}): {}",
                    self.log()
                )));
            }
            self.try_conns().map(|_| Ok(()))
        })
        .and_then(|exited| exited)
        .map_err(anyhow::Error::msg)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, as an operator stopping the service does; an error unless the agent exits
    /// cleanly within `within`.
    pub fn stop(mut self, within: Duration) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            anyhow::bail!("the agent had already exited ({status})");
        }
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = try_wait_for("the agent to stop", within, || {
            self.child
                .try_wait()
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "running".to_owned())
        })
        .map_err(anyhow::Error::msg)?;
        anyhow::ensure!(status.success(), "the agent exited with {status}");
        Ok(())
    }

    /// SIGKILL: the agent gets no chance to save or detach.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the agent again with the same arguments (after `kill9`).
    pub fn restart(&mut self) {
        self.restart_with(&[]);
    }

    /// Starts the agent again with the same arguments plus `extra` (this start only).
    pub fn restart_with(&mut self, extra: &[&str]) {
        let _ = fs::remove_file(&self.socket);
        let mut args = self.args.clone();
        args.extend(extra.iter().map(Into::into));
        self.child = Self::spawn(&self._dir.path, &self.command, &args, &self.log_level)
            .unwrap_or_else(|e| panic!("{e:#}"));
        self.wait_ready().unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// `GET path` on the agent's API through curl, parsed as JSON.
    pub fn api(&self, path: &str) -> serde_json::Value {
        let out = run_ok(
            Command::new("curl")
                .args(["-sf", "--unix-socket"])
                .arg(&self.socket)
                .arg(format!("http://sensor{path}")),
        );
        serde_json::from_str(&out).expect("API JSON")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self._dir.path.join("agent.log")).unwrap_or_default()
    }

    /// `sensor conns --json` through the real CLI.
    pub fn try_conns(&self) -> Result<Vec<Conn>, String> {
        let out = Command::new(&self.bin)
            .args(["conns", "--json", "--socket"])
            .arg(&self.socket)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    }

    pub fn conns(&self) -> Vec<Conn> {
        self.try_conns().expect("sensor conns --json")
    }

    /// `sensor clients --json --by BY` through the real CLI (all clients).
    pub fn clients(&self, by: &str) -> Vec<serde_json::Value> {
        let out = run_ok(
            Command::new(&self.bin)
                .args([
                    "clients", "--json", "--limit", "1000000", "--by", by, "--socket",
                ])
                .arg(&self.socket),
        );
        serde_json::from_str(&out).expect("clients JSON")
    }

    pub fn health(&self) -> serde_json::Value {
        self.api("/v1/health")
    }

    /// The agent's alert log (alerts.jsonl), once every alert event the API can show has
    /// been written: the agent writes it on a thread of its own.
    pub fn alert_log(&self) -> Vec<serde_json::Value> {
        wait_for(
            "the agent's alert log to be written",
            Duration::from_secs(30),
            || match self.health()["alert_log_queued"].as_u64() {
                Some(0) => Ok(()),
                other => Err(format!("alert_log_queued {other:?}")),
            },
        );
        crate::siem::read_jsonl(&self.state_dir.join("alerts.jsonl"))
    }

    /// Waits until every connection in `expected_remotes` is reported closed.
    pub fn wait_closed(&self, expected: usize, filter: impl Fn(&Conn) -> bool) -> Vec<Conn> {
        wait_for(
            "closed connections in the agent",
            Duration::from_secs(30),
            || {
                let conns: Vec<Conn> = self.conns().into_iter().filter(|c| filter(c)).collect();
                let closed = conns.iter().filter(|c| c.state == "closed").count();
                if closed == expected && conns.len() == expected {
                    Ok(conns)
                } else {
                    Err(format!(
                        "{closed} closed of {} (want {expected})",
                        conns.len()
                    ))
                }
            },
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Only a child not yet reaped: a reaped one's pid may belong to another process now.
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: plain kill(2) on our own, unreaped child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !matches!(self.child.try_wait(), Ok(Some(_))) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Pins left by a killed agent: removing a link pin detaches its program.
        let _ = fs::remove_dir_all(&self.pin_dir);
    }
}

pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(unique(name));
        fs::create_dir_all(&path).expect("temp dir");
        Self { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Files nginx serves, with their sizes.
pub const SMALL: (&str, usize) = ("small.txt", 1_234);
pub const BIG: (&str, usize) = ("big.bin", 2_000_000);
pub const HUGE: (&str, usize) = ("huge.bin", 20_000_000);

/// A real nginx in a test cgroup (optionally inside a network namespace).
pub struct Nginx {
    child: Child,
    pub dir: TempDir,
}

/// One line of nginx's ground-truth access log.
#[derive(Debug, Clone)]
pub struct NginxRecord {
    pub remote: String,
    pub request_length: u64,
    pub bytes_sent: u64,
}

impl Nginx {
    /// `listen` are nginx listen addresses ("127.0.0.1:8080", "[::1]:8080", "10.0.0.1:80").
    pub fn start(cgroup: &Cgroup, netns: Option<&Netns>, listen: &[String]) -> Self {
        Self::start_with(cgroup, netns, listen, "")
    }

    /// A reverse proxy to `upstream` ("127.0.0.1:8000") as deployments put in front of an
    /// inference server: keep-alive upstream connections shared by all clients, streaming
    /// replies unbuffered, and the client's address appended to X-Forwarded-For.
    pub fn proxy(cgroup: &Cgroup, listen: &[String], upstream: &str) -> Self {
        let location = "location /v1/ { proxy_pass http://inference; proxy_http_version 1.1; \
             proxy_set_header Connection \"\"; proxy_buffering off; \
             proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }\n";
        let upstream_block = format!("upstream inference {{ server {upstream}; keepalive 2; }}\n");
        Self::start_with(
            cgroup,
            None,
            listen,
            &format!("{upstream_block}\u{0}{location}"),
        )
    }

    /// `extra`: "http-level directives\0server-level directives".
    fn start_with(cgroup: &Cgroup, netns: Option<&Netns>, listen: &[String], extra: &str) -> Self {
        let (http_extra, server_extra) = extra.split_once('\u{0}').unwrap_or(("", extra));
        let dir = TempDir::new("nginx");
        let www = dir.path.join("www");
        fs::create_dir_all(&www).expect("www");
        for (name, size) in [SMALL, BIG, HUGE] {
            // Deterministic, incompressible-enough content.
            let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 251) as u8).collect();
            fs::write(www.join(name), data).expect("write content");
        }
        let listens: String = listen
            .iter()
            .map(|l| format!("    listen {l};\n"))
            .collect();
        let d = dir.path.display();
        let conf = format!(
            "user root;\nworker_processes 1;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  log_format gt '$remote_addr $remote_port $request_length $bytes_sent';\n\
             access_log {d}/gt.log gt;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             keepalive_requests 100000;\n{http_extra}  server {{\n{listens}    root {d}/www;\n{server_extra}\
             client_max_body_size 100m;\n\
             location /upload/ {{ alias {d}/uploads/; dav_methods PUT; create_full_put_path on; }}\n\
             location /stream/ {{ alias {d}/www/; limit_rate 400k; }}\n  }}\n}}\n"
        );
        fs::write(dir.path.join("nginx.conf"), conf).expect("nginx.conf");
        let conf = dir.path.join("nginx.conf");
        let conf = conf.to_str().expect("utf-8 path");
        // Join the cgroup first: `ip netns exec` remounts /sys, hiding the cgroup tree.
        let enter_netns = netns.map_or(String::new(), |ns| format!("ip netns exec {} ", ns.name));
        let script = format!(
            "echo $$ > '{}/cgroup.procs' && exec {enter_netns}nginx -c '{conf}' -g 'daemon off;'",
            cgroup.path.display()
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .spawn()
            .expect("spawn nginx");
        let nginx = Self { child, dir };
        wait_for("nginx to listen", Duration::from_secs(10), || {
            let pid =
                fs::read_to_string(nginx.dir.path.join("nginx.pid")).map_err(|e| e.to_string())?;
            if pid.trim().is_empty() {
                return Err("no pid yet".into());
            }
            match netns {
                None => listen.iter().try_for_each(|l| {
                    TcpStream::connect(l.as_str())
                        .map(drop)
                        .map_err(|e| format!("{l}: {e}"))
                }),
                Some(_) => Ok(()),
            }
        });
        nginx
    }

    /// nginx's own account of each request (written when the request completes).
    pub fn records(&self) -> Vec<NginxRecord> {
        fs::read_to_string(self.dir.path.join("gt.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.len() != 4 {
                    return None;
                }
                Some(NginxRecord {
                    remote: join_host_port(f[0], f[1]),
                    request_length: f[2].parse().ok()?,
                    bytes_sent: f[3].parse().ok()?,
                })
            })
            .collect()
    }
}

impl Nginx {
    /// Ground truth for `transfers`, once nginx has logged every one of them (it logs when a
    /// request completes, which may be just after the client has its reply).
    pub fn truth(&self, transfers: &[Transfer]) -> BTreeMap<String, (u64, u64, u64)> {
        let clients: std::collections::BTreeSet<&str> =
            transfers.iter().map(|t| t.client.as_str()).collect();
        wait_for(
            "nginx to log every request",
            Duration::from_secs(10),
            || {
                let logged = self
                    .records()
                    .iter()
                    .filter(|r| clients.contains(r.remote.as_str()))
                    .count();
                if logged >= transfers.len() {
                    Ok(())
                } else {
                    Err(format!("{logged} of {} logged", transfers.len()))
                }
            },
        );
        ground_truth(transfers, &self.records())
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn join_host_port(host: &str, port: &str) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// One transfer as curl itself measured it.
#[derive(Debug, Clone)]
pub struct Transfer {
    /// The client side of the connection, "ip:port": the sensor's `remote`.
    pub client: String,
    /// Bytes curl received: response heads plus body.
    pub received: u64,
    pub status: u16,
    /// New connections curl opened for this transfer (0 when it reused one).
    pub connects: u64,
}

pub const CURL_WRITE_OUT: &str = "%{local_ip} %{local_port} %{size_request} %{size_upload} \
     %{size_header} %{size_download} %{http_code} %{num_connects}\\n";

/// Runs one curl process performing `operations` in order (joined with `--next`, so they
/// share curl's connection pool: keep-alive across operations) and returns each transfer's own
/// measurements. Each operation is curl options followed by its URL.
pub fn curl(mut cmd: Command, operations: &[Vec<String>]) -> Vec<Transfer> {
    cmd.args(curl_args(operations));
    parse_transfers(&run_ok(&mut cmd))
}

/// curl's arguments for `operations`, each reporting its transfer with `CURL_WRITE_OUT`.
pub fn curl_args(operations: &[Vec<String>]) -> Vec<String> {
    let mut args = Vec::new();
    for (i, op) in operations.iter().enumerate() {
        if i > 0 {
            args.push("--next".to_owned());
        }
        // Per operation: --next resets options. "Expect:" stops curl's 100-continue dance so
        // every request is one exchange.
        for a in [
            "-s",
            "--show-error",
            "-o",
            "/dev/null",
            "-H",
            "Expect:",
            "-w",
            CURL_WRITE_OUT,
        ] {
            args.push(a.to_owned());
        }
        args.extend(op.iter().cloned());
    }
    args
}

/// Programs attached to `cgroup`, by name (sorted), as the kernel lists them.
pub fn attached_programs(cgroup: &Cgroup) -> Vec<String> {
    let out = run_ok(
        Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(&cgroup.path),
    );
    // bpftool prints nothing at all when nothing is attached; anything else must parse.
    let progs: Vec<serde_json::Value> = if out.trim().is_empty() {
        Vec::new()
    } else {
        serde_json::from_str(out.trim()).expect("bpftool cgroup show JSON")
    };
    let mut names: Vec<String> = progs
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

pub fn parse_transfers(write_out: &str) -> Vec<Transfer> {
    write_out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 8, "curl write-out line: {l}");
            let n = |i: usize| f[i].parse::<u64>().expect("curl number");
            Transfer {
                client: join_host_port(f[0], f[1]),
                received: n(4) + n(5),
                status: n(6) as u16,
                connects: n(7),
            }
        })
        .collect()
}

pub fn op(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

/// Ground truth per client connection, (bytes in, bytes out, requests), from both peers:
/// bytes in as the server read them (nginx's $request_length; curl's own upload figures are
/// ambiguous when it sends head and body in one write), bytes out and requests as the client
/// received them, cross-checked against what the server says it sent.
pub fn ground_truth(
    transfers: &[Transfer],
    server: &[NginxRecord],
) -> BTreeMap<String, (u64, u64, u64)> {
    let mut client: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for t in transfers {
        assert!((200..300).contains(&t.status), "HTTP status {}", t.status);
        let e = client.entry(t.client.clone()).or_default();
        e.0 += t.received;
        e.1 += 1;
    }
    let mut truth: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    for r in server.iter().filter(|r| client.contains_key(&r.remote)) {
        let e = truth.entry(r.remote.clone()).or_default();
        e.0 += r.request_length;
        e.1 += r.bytes_sent;
        e.2 += 1;
    }
    for (conn, (received, requests)) in &client {
        let (_, sent, logged) = truth.get(conn).copied().unwrap_or_default();
        assert_eq!(
            (sent, logged),
            (*received, *requests),
            "{conn}: server sent/logged vs client received/requested"
        );
    }
    truth
}

/// What the sensor reported, keyed like `per_connection`.
pub fn sensor_per_connection(conns: &[Conn]) -> BTreeMap<String, (u64, u64, u64)> {
    let mut map: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    for c in conns {
        let e = map.entry(c.remote.clone()).or_default();
        e.0 += c.bytes_in;
        e.1 += c.bytes_out;
        e.2 += c.requests;
    }
    map
}

/// Per-client ground truth: (bytes in, bytes out, requests, connections).
pub type ClientTruth = BTreeMap<String, (u64, u64, u64, u64)>;

/// Folds per-connection truth ("ip:port" keys) into per-address truth, or per-group truth
/// when `group` maps an address to its group. Connections are counted by curl's own
/// `num_connects` (a client port reused by a later connection is still two connections).
pub fn per_client(
    truth: &BTreeMap<String, (u64, u64, u64)>,
    transfers: &[Transfer],
    group: impl Fn(&str) -> String,
) -> ClientTruth {
    let ip_of = |conn: &str| {
        conn.rsplit_once(':')
            .map_or(conn, |(ip, _)| ip)
            .trim_matches(['[', ']'])
            .to_owned()
    };
    let mut out = ClientTruth::new();
    for (conn, (i, o, r)) in truth {
        let e = out.entry(group(&ip_of(conn))).or_default();
        e.0 += i;
        e.1 += o;
        e.2 += r;
    }
    for t in transfers {
        if let Some(e) = out.get_mut(&group(&ip_of(&t.client))) {
            e.3 += t.connects;
        }
    }
    out
}

/// The sensor's per-client rows in the same shape, optionally from a window ("1m", ...).
pub fn sensor_per_client(rows: &[serde_json::Value], window: Option<&str>) -> ClientTruth {
    rows.iter()
        .map(|r| {
            let src = window.map_or(r, |w| &r["windows"][w]);
            let n = |k: &str| src[k].as_u64().unwrap_or(u64::MAX);
            (
                r["client"].as_str().unwrap_or("?").to_owned(),
                (
                    n("bytes_in"),
                    n("bytes_out"),
                    n("requests"),
                    n("connections"),
                ),
            )
        })
        .collect()
}

/// The repository's peer scripts (tests/peers).
pub fn peers() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers")
}

/// The OpenAI-compatible test server (tests/peers/openai_stub.py) in `cgroup`, writing its
/// ground-truth ledger to `ledger`; killed on drop.
pub struct OpenAiStub {
    child: Child,
}

impl OpenAiStub {
    pub fn start(cgroup: &Cgroup, port: u16, ledger: &Path) -> Self {
        let mut child = cgroup
            .command("python3")
            .arg(peers().join("openai_stub.py"))
            .arg(port.to_string())
            .arg(ledger)
            .stdout(Stdio::piped())
            .spawn()
            .expect("stub server");
        let mut ready = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut ready,
        )
        .expect("stub output");
        assert_eq!(ready.trim(), "ready", "stub server did not start");
        Self { child }
    }
}

impl Drop for OpenAiStub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The identity `sensor identity ARGS` prints for `key` (fed on stdin, as users do).
pub fn identity_of(args: &[&std::ffi::OsStr], key: &str) -> String {
    let mut child = Command::new(sensor_bin())
        .arg("identity")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sensor identity");
    std::io::Write::write_all(
        &mut child.stdin.take().expect("stdin"),
        format!("{key}\n").as_bytes(),
    )
    .expect("key");
    let out = child.wait_with_output().expect("identity output");
    assert!(out.status.success(), "sensor identity failed");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A trivial sock_ops program attached to a cgroup the legacy, exclusive way (no
/// BPF_F_ALLOW_MULTI), as an older tool might have left it: the kernel then refuses every
/// other sock_ops attachment to that cgroup (EPERM), the agent's included. Detached on drop.
pub struct ExclusiveSockOps {
    prog: std::os::fd::OwnedFd,
    cgroup: fs::File,
}

impl ExclusiveSockOps {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_ATTACH: libc::c_long = 8;
    const BPF_PROG_DETACH: libc::c_long = 9;
    const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;
    const BPF_CGROUP_SOCK_OPS: u32 = 3;

    fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<i64> {
        // SAFETY: attr is a zero-padded bpf_attr of the size passed; the buffers it points to
        // outlive the call.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    fn attr(fields: &[(usize, u64, usize)]) -> [u8; 128] {
        let mut attr = [0u8; 128];
        for (offset, value, size) in fields {
            attr[*offset..offset + size].copy_from_slice(&value.to_ne_bytes()[..*size]);
        }
        attr
    }

    pub fn attach(cgroup: &Cgroup) -> Self {
        use std::os::fd::{AsRawFd as _, FromRawFd as _};
        // r0 = 1; exit
        let insns: [u64; 2] = [
            u64::from_le_bytes([0xb7, 0x00, 0, 0, 1, 0, 0, 0]),
            u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
        ];
        let license = c"GPL";
        let mut load = Self::attr(&[
            (0, u64::from(Self::BPF_PROG_TYPE_SOCK_OPS), 4),
            (4, insns.len() as u64, 4),
            (8, insns.as_ptr() as u64, 8),
            (16, license.as_ptr() as u64, 8),
        ]);
        let fd = Self::bpf(Self::BPF_PROG_LOAD, &mut load).expect("loading a sock_ops program");
        // SAFETY: a new fd the kernel just returned.
        let prog = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
        let cgroup = fs::File::open(&cgroup.path).expect("cgroup fd");
        // bpf_attr's attach member: target_fd, attach_bpf_fd, attach_type, attach_flags = 0.
        let mut attach = Self::attr(&[
            (0, cgroup.as_raw_fd() as u64, 4),
            (4, prog.as_raw_fd() as u64, 4),
            (8, u64::from(Self::BPF_CGROUP_SOCK_OPS), 4),
        ]);
        Self::bpf(Self::BPF_PROG_ATTACH, &mut attach).expect("exclusive sock_ops attach");
        Self { prog, cgroup }
    }
}

impl Drop for ExclusiveSockOps {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd as _;
        let mut detach = Self::attr(&[
            (0, self.cgroup.as_raw_fd() as u64, 4),
            (4, self.prog.as_raw_fd() as u64, 4),
            (8, u64::from(Self::BPF_CGROUP_SOCK_OPS), 4),
        ]);
        let _ = Self::bpf(Self::BPF_PROG_DETACH, &mut detach);
    }
}

/// `n` TCP connections to `127.0.0.1:port` held open by a real client process (Python's
/// socket module) until dropped; `ports` are their local ports, the sensor's `remote` side.
pub struct HeldConnections {
    child: Child,
    pub ports: Vec<u16>,
}

impl HeldConnections {
    pub fn open(port: u16, n: usize) -> Self {
        let script = format!(
            "import socket, sys\n\
             conns = [socket.create_connection(('127.0.0.1', {port})) for _ in range({n})]\n\
             print(' '.join(str(c.getsockname()[1]) for c in conns), flush=True)\n\
             sys.stdin.read()\n"
        );
        let mut child = Command::new("python3")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("client output");
        let ports = line
            .split_whitespace()
            .map(|p| p.parse().expect("local port"))
            .collect();
        Self { child, ports }
    }
}

impl Drop for HeldConnections {
    fn drop(&mut self) {
        // End of input closes the connections and ends the client.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// What tests/peers/evasion_client.py reports: what a real client socket sent and received.
#[derive(Debug, Clone, Deserialize)]
pub struct ClientReport {
    /// The client's port: the sensor's `remote` side.
    pub local_port: u16,
    /// Payload bytes the client wrote and read.
    pub sent: u64,
    pub received: u64,
    /// Requests the server answered.
    pub requests: u64,
    /// Writes, each its own TCP segment (TCP_NODELAY, one write after the previous one left).
    pub segments: u64,
}

/// An adversarial HTTP/1.1 client (tests/peers/evasion_client.py) on one connection: requests
/// split into segments at chosen bytes, blank lines before requests, segments forged through
/// a raw socket. With `"hold": true` in the spec the connection stays open until `finish`.
pub struct EvasionClient {
    child: Child,
    pub report: ClientReport,
}

impl EvasionClient {
    /// Runs the client until every request of `spec` is answered.
    pub fn run(spec: &serde_json::Value) -> Self {
        let text = spec.to_string();
        // A spec longer than one argument may be (128 KiB) goes through a file.
        let file = (text.len() > 64 * 1024).then(|| {
            let dir = TempDir::new("evasion-spec");
            let path = dir.path.join("spec.json");
            fs::write(&path, &text).expect("spec file");
            (dir, path)
        });
        let arg = match &file {
            Some((_, path)) => format!("@{}", path.display()),
            None => text,
        };
        let mut child = Command::new("python3")
            .arg(peers().join("evasion_client.py"))
            .arg(arg)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 evasion client");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("client output");
        let report = serde_json::from_str(&line).unwrap_or_else(|e| {
            let _ = child.kill();
            panic!("evasion client failed ({e}): {line:?}")
        });
        Self { child, report }
    }

    /// Closes the connection (and waits for the client to exit).
    pub fn finish(mut self) {
        drop(self.child.stdin.take());
        let status = self.child.wait().expect("client exit");
        assert!(status.success(), "evasion client: {status}");
    }
}

/// A GET request for `path` with extra header lines (each ending in CRLF).
pub fn http_get(path: &str, headers: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: sensor-test\r\n{headers}\r\n")
}

/// Kernel counters of the established server socket whose peer port is `client_port`:
/// (bytes_received, bytes_acked, segs_in, segs_out), from `ss -ti`.
pub fn ss_server_counters(
    server_port: u16,
    client_port: u16,
) -> Result<(u64, u64, u64, u64), String> {
    let out = run_ok(Command::new("ss").args([
        "-tinH",
        "state",
        "established",
        &format!("( sport = :{server_port} and dport = :{client_port} )"),
    ]));
    let field = |name: &str| -> Result<u64, String> {
        out.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no {name} in ss output: {out}"))
    };
    Ok((
        field("bytes_received:")?,
        field("bytes_acked:")?,
        field("segs_in:")?,
        field("segs_out:")?,
    ))
}
