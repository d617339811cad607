//! `cargo xtask bench`: the sensor's overhead, measured on this machine in one run.
//!
//! The servers (nginx, an iperf3 server) run in a cgroup of the bench's own that the agent
//! watches; the clients run outside it. Each A/B round measures every workload once without
//! the sensor (nothing attached) and once with it on each live-read path measured (the agent
//! started, programs attached, then stopped cleanly, which detaches them). Then, with the
//! agent attached, on each path: the kernel's per-program
//! run-time statistics, the agent's CPU and memory under load from thousands of client
//! addresses, the latency from a request to its appearance in `sensor clients`, and the
//! aggregation's memory with many distinct clients (synthetic, in a child process).
//!
//! All traffic goes to loopback addresses. Every loop is bounded in count and time. The cgroup,
//! processes, pinned state, temporary files and the bpf_stats sysctl are restored by guards,
//! also when a step fails or the run is interrupted.

mod calib;
mod fleet;
mod jetstream;
mod load;
mod procs;
mod report;

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use procs::{Agent, AgentSpec, Cgroup, Proc, Sysctl, TempDir, check_interrupted, run_bounded};

/// The load the profilers run under (`--profile-load`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProfileLoad {
    /// One kept-alive connection per client.
    KeepAlive,
    /// A new connection per request.
    Close,
}

/// A profilers' load, its connections made before the profiler starts (keep-alive), so that
/// the profile holds the paced requests only.
enum Profiled {
    KeepAlive(load::KeepAlive),
    Close,
}

impl Profiled {
    fn connect(kind: ProfileLoad, spec: &load::Spec) -> anyhow::Result<Self> {
        Ok(match kind {
            ProfileLoad::KeepAlive => Self::KeepAlive(load::KeepAlive::connect(spec)?),
            ProfileLoad::Close => Self::Close,
        })
    }

    fn run(&mut self, spec: &load::Spec) -> load::Outcome {
        match self {
            Self::KeepAlive(pool) => pool.run(spec),
            Self::Close => load::new_connections(spec),
        }
    }
}

/// Command-line knobs of `cargo xtask bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// A/B rounds (each: every workload without, then with the sensor).
    #[arg(long, default_value_t = 9)]
    pub rounds: usize,
    /// Seconds per iperf3 / wrk measurement.
    #[arg(long, default_value_t = 4)]
    pub seconds: u64,
    /// Distinct client addresses of the agent-CPU load.
    #[arg(long, default_value_t = 10_000)]
    pub clients: usize,
    /// Total request rate of the agent-CPU load (requests per second).
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Seconds of each agent-CPU load.
    #[arg(long, default_value_t = 20)]
    pub load_seconds: u64,
    /// Seconds of the new-connection load: longer than the agent holds a closed connection's
    /// tombstone (30 s) plus a snapshot period, so its memory is read at steady state.
    #[arg(long, default_value_t = 45)]
    pub close_load_seconds: u64,
    /// Rounds of the agent-CPU loads (each: idle, keep-alive, new connection, on every
    /// live-read path, the paths swapping places every round): the verdict is on their median,
    /// with their range.
    #[arg(long, default_value_t = 3)]
    pub load_rounds: usize,
    /// Poll-latency trials per connection kind.
    #[arg(long, default_value_t = 10)]
    pub latency_trials: usize,
    /// Distinct client keys for the aggregation-memory measurement, all held exactly (comma
    /// separated).
    #[arg(long, value_delimiter = ',', default_value = "0,10000,100000,1000000")]
    pub keys: Vec<usize>,
    /// Distinct client keys sent through the agent's default bound (10 000 exact clients,
    /// the rest folded); 0 skips it.
    #[arg(long, default_value_t = 1_000_000)]
    pub bounded_keys: usize,
    /// Client rows of the backlog each JetStream run publishes (rounded up to whole batches
    /// of every synthetic agent).
    #[arg(long, default_value_t = 2_048_000)]
    pub jetstream_rows: u64,
    /// Phases to run (comma separated): ab, bpf, load, latency, memory, collector, alert,
    /// jetstream; and,
    /// not by default, `profile` (the agent under valgrind's callgrind during the
    /// `--profile-load` load: instructions per function) and `sample` (the agent sampled by
    /// `perf record -e cpu-clock` during that load: where its time goes, cache misses and
    /// kernel time included), output in target/bench/. The report is only written when all eight
    /// measurements ran.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ab,bpf,load,latency,memory,collector,alert,jetstream"
    )]
    pub phases: Vec<String>,
    /// The load the profilers (`profile`, `sample`) run under.
    #[arg(long, value_enum, default_value_t = ProfileLoad::KeepAlive)]
    pub profile_load: ProfileLoad,
    /// Markdown file whose generated section is replaced.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub output: PathBuf,
    /// The agent's live-read paths to measure (`sensor run --live-read`): `all` (the path
    /// `auto` picks, and the map path too when that is the iterator: every path this kernel
    /// loads), or one of auto, iterator, map. The data path, BPF, agent-load and poll-latency
    /// phases run once per path; the other phases use the first.
    #[arg(long, default_value = "all")]
    pub live_read: String,
}

/// `[clients] max_clients` of the embedded default configuration.
const DEFAULT_MAX_CLIENTS: usize = 10_000;
/// `[state] snapshot_interval_secs` of the embedded default configuration.
pub const DEFAULT_SNAPSHOT_SECS: u64 = 5;
/// The aggregation's steady state: an hour of history fills every window of a client.
pub const HISTORY_MINUTES: u64 = 60;
/// Snapshots timed in that state (the median is reported).
pub const SNAPSHOT_ROUNDS: usize = 5;

/// Phases that only profile the agent (not measurements; never in the report).
const PROFILERS: [&str; 2] = ["profile", "sample"];

const PHASES: [&str; 8] = [
    "ab",
    "bpf",
    "load",
    "latency",
    "memory",
    "collector",
    "alert",
    "jetstream",
];

/// wrk connections and threads: one wrk thread and one nginx worker leave the second core to
/// the kernel's softirq work and the agent.
const WRK_THREADS: usize = 1;
const WRK_CONNECTIONS: usize = 32;
const LOAD_THREADS: usize = 8;
const REPLY_PATH: &str = "/reply.json";
/// A small JSON reply, the size of a short API answer.
const REPLY_BYTES: usize = 1024;

const WRK_REPORT_LUA: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"errors":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"#;

/// One wrk run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wrk {
    pub rps: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub errors: u64,
    /// Requests completed in the run (wrk's own count).
    pub requests: u64,
}

/// The live-read paths `--live-read` accepts.
const LIVE_READS: [&str; 4] = ["all", "auto", "iterator", "map"];

/// One side (with or without the sensor) of one A/B round.
#[derive(Debug, Clone, Copy, Default)]
pub struct Round {
    pub iperf_gbps: f64,
    pub keep_alive: Wrk,
    pub close: Wrk,
    /// The agent's CPU (% of one core) during iperf3, wrk keep-alive and wrk new connection
    /// (with the sensor only).
    pub agent_cpu_pct: [f64; 3],
}

/// Per-run BPF cost of one program in one workload window.
#[derive(Debug, Clone, Copy, Default)]
pub struct BpfSample {
    pub runs: u64,
    pub ns_per_run: f64,
}

#[derive(Debug, Clone, Default)]
pub struct LoadRow {
    pub name: String,
    pub clients: usize,
    pub target_rate: u64,
    pub outcome: load::Outcome,
    pub cpu_pct: f64,
    pub user_pct: f64,
    pub system_pct: f64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub tracked_addresses: u64,
    /// Alerts open when the load ended (the agent's `/v1/health`).
    pub open_alerts: u64,
    pub loss: String,
}

#[derive(Debug, Clone, Default)]
pub struct MemoryRow {
    pub keys: usize,
    /// The table bound when not every key is held (None: all exact).
    pub bound: Option<usize>,
    pub tracked_addresses: u64,
    pub tracked_groups: u64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub fill_ms: u64,
    /// Minutes of history per client (0: one request each).
    pub history_minutes: u64,
    /// Median CPU time of one snapshot of the table (0: none written), and its size.
    pub snapshot_cpu_us: u64,
    pub snapshot_bytes: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub mem_gib: f64,
    pub kernel: String,
    pub load_start: String,
    pub load_end: String,
    pub started_utc: String,
    pub revision: String,
    pub foreign_programs: usize,
    /// `reference_ms` at the start and at the end of the run.
    pub reference_ms: (f64, f64),
}

/// What depends on the agent's live-read path: one per path measured.
#[derive(Debug, Default)]
pub struct PathResults {
    /// `--live-read` as the bench passed it.
    pub requested: String,
    /// The path the agent took (its `/v1/health`), and why.
    pub path: String,
    pub reason: String,
    /// The A/B rounds' "with" sides (the "without" sides are shared: `Results::without`).
    pub with: Vec<Round>,
    /// (program, workload) -> one sample per round.
    pub bpf: BTreeMap<(String, String), Vec<BpfSample>>,
    /// workload -> per round: the sensor's BPF time in the window above the empty programs'
    /// floor, divided by the requests wrk completed in it (ns per request).
    pub bpf_per_request: BTreeMap<String, Vec<f64>>,
    /// One per load round.
    pub idle_cpu_pct: Vec<f64>,
    /// One per load and round, in the order they ran.
    pub load: Vec<LoadRow>,
    pub latency_open_ms: Vec<f64>,
    pub latency_closed_ms: Vec<f64>,
}

#[derive(Debug, Default)]
pub struct Results {
    pub machine: Machine,
    pub options: Option<Options>,
    /// The A/B rounds' "without" sides, one per round, shared by every path's "with".
    pub without: Vec<Round>,
    /// One per live-read path measured, the first the one the other phases ran on.
    pub paths: Vec<PathResults>,
    /// Why a path `all` asks for was not measured (the kernel refused it), if one was not.
    pub paths_skipped: Option<String>,
    pub memory: Vec<MemoryRow>,
    /// The collector's ingest run.
    pub ingest: Option<fleet::Ingest>,
    /// Extraction bots: time to the agent's and the fleet's alert.
    pub alert_times: Vec<fleet::AlertTime>,
    /// Backlogs merged from JetStream: one collector, then a group of two.
    pub jetstream: Vec<jetstream::JsIngest>,
    /// Extraction bots, the agent shipping over NATS.
    pub jetstream_alert_times: Vec<fleet::AlertTime>,
    pub elapsed: Duration,
}

/// Everything a phase needs.
struct Bench<'a> {
    opts: &'a Options,
    bin: PathBuf,
    cgroup: &'a Cgroup,
    dir: PathBuf,
    http_port: u16,
    iperf_port: u16,
    lua: PathBuf,
    nofile: u64,
    /// `--live-read` of the agents of the phases that run on one path only.
    live_read: String,
}

pub fn run(opts: &Options, root: &Path) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the bench needs root (BPF, cgroups, sysctls)");
    }
    anyhow::ensure!(opts.rounds >= 1, "--rounds must be at least 1");
    anyhow::ensure!(
        LIVE_READS.contains(&opts.live_read.as_str()),
        "--live-read must be one of {}",
        LIVE_READS.join(", ")
    );
    if let Some(p) = opts
        .phases
        .iter()
        .find(|p| !PHASES.contains(&p.as_str()) && !PROFILERS.contains(&p.as_str()))
    {
        bail!(
            "unknown phase {p} (one of: {}, {})",
            PHASES.join(", "),
            PROFILERS.join(", ")
        );
    }
    anyhow::ensure!(
        (1..=60).contains(&opts.seconds)
            && (1..=120).contains(&opts.load_seconds)
            && (1..=300).contains(&opts.close_load_seconds)
            && (1..=9).contains(&opts.load_rounds),
        "--seconds must be 1..=60, --load-seconds 1..=120, --close-load-seconds 1..=300 and \
         --load-rounds 1..=9"
    );
    anyhow::ensure!(
        (1..=60_000).contains(&opts.clients),
        "--clients must be 1..=60000 (loopback source addresses)"
    );
    anyhow::ensure!(
        (1..=100_000).contains(&opts.rate),
        "--rate must be 1..=100000"
    );
    anyhow::ensure!(
        (1..=5_000_000).contains(&opts.jetstream_rows),
        "--jetstream-rows must be 1..=5000000"
    );
    procs::install_signal_handlers();
    let nofile = procs::raise_nofile()?;
    anyhow::ensure!(
        opts.clients as u64 + 1_000 <= nofile,
        "--clients {} needs more open files than the limit here ({nofile})",
        opts.clients
    );
    let started = Instant::now();
    let mut results = Results {
        machine: machine(root),
        options: Some(opts.clone()),
        ..Default::default()
    };

    let tag = format!("sensor-bench-{}", std::process::id());
    let tmp = TempDir::new("bench");
    let cgroup = Cgroup::create(&tag).context("creating the bench cgroup")?;
    let http_port = procs::free_port()?;
    let iperf_port = procs::free_port()?;
    let lua = tmp.path.join("report.lua");
    fs::write(&lua, WRK_REPORT_LUA).context("writing the wrk script")?;
    let bench = Bench {
        opts,
        bin: root.join("target/release/sensor"),
        cgroup: &cgroup,
        dir: tmp.path.clone(),
        http_port,
        iperf_port,
        lua,
        nofile,
        live_read: String::new(),
    };
    let _nginx = bench.start_nginx()?;
    let _iperf = bench.start_iperf()?;
    results.machine.foreign_programs = effective_programs(&cgroup.path)?;
    if results.machine.foreign_programs > 0 {
        eprintln!(
            "bench: warning: {} BPF programs of others are attached above the bench cgroup; \
             they run in both the with and the without rounds",
            results.machine.foreign_programs
        );
    }

    let (paths, skipped) = bench.live_read_paths()?;
    results.paths = paths;
    results.paths_skipped = skipped;
    let bench = Bench {
        live_read: results.paths[0].requested.clone(),
        ..bench
    };

    let phase = |name: &str| opts.phases.iter().any(|p| p == name);
    if phase("ab") {
        bench.ab_rounds(&mut results)?;
    }
    if phase("bpf") {
        for path in &mut results.paths {
            bench.bpf_costs(path)?;
        }
    }
    if phase("load") {
        // Round by round, every path in each (swapping places), so each path's rounds share
        // the machine's background load of the same minutes.
        for round in 0..opts.load_rounds {
            let n = results.paths.len();
            for i in 0..n {
                let at = if round % 2 == 0 { i } else { n - 1 - i };
                bench.agent_load(&mut results.paths[at])?;
            }
        }
    }
    for path in &mut results.paths {
        if phase("latency") {
            bench.poll_latency(path)?;
        }
    }
    if phase("memory") {
        bench.aggregate_memory(&mut results)?;
    }
    if phase("collector") {
        bench.collector_ingest(&mut results)?;
    }
    if phase("alert") {
        bench.time_to_alert(&mut results)?;
    }
    if phase("jetstream") {
        bench.jetstream_ingest(&mut results)?;
    }
    if phase("profile") {
        bench.profile_agent(&root.join("target/bench"))?;
    }
    if phase("sample") {
        bench.sample_agent(&root.join("target/bench"))?;
    }
    let complete = PHASES.iter().all(|p| phase(p));

    results.elapsed = started.elapsed();
    results.machine.load_end = loadavg();
    results.machine.reference_ms.1 = reference_ms();
    let generated = report::render(&results);
    let output = if opts.output.is_absolute() {
        opts.output.clone()
    } else {
        root.join(&opts.output)
    };
    println!("{generated}");
    if complete {
        report::write(&output, &generated)?;
        eprintln!(
            "bench: wrote {} ({:.0} s)",
            output.display(),
            results.elapsed.as_secs_f64()
        );
    } else {
        eprintln!(
            "bench: only some phases ran; {} left as it was",
            output.display()
        );
    }
    Ok(())
}

/// Rounds of the reference workload; the fastest counts (the one least disturbed).
const REFERENCE_ROUNDS: usize = 5;

/// The machine's speed, for comparing runs made on different days (machines of one kind
/// differed several-fold between sessions): milliseconds of one thread filling a hash map
/// with 1 000 000 pseudo-random u64 keys and looking each up four times, the fastest of
/// `REFERENCE_ROUNDS`. Like the agent's work, it is bound by memory latency more than by
/// arithmetic; lower is faster.
fn reference_ms() -> f64 {
    const KEYS: u64 = 1_000_000;
    let mut best = f64::INFINITY;
    for _ in 0..REFERENCE_ROUNDS {
        let started = Instant::now();
        let mut map: std::collections::HashMap<u64, u64> =
            std::collections::HashMap::with_capacity(KEYS as usize);
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            // xorshift64: the same keys every run.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let keys: Vec<u64> = (0..KEYS).map(|_| next()).collect();
        for (i, k) in keys.iter().enumerate() {
            map.insert(*k, i as u64);
        }
        let mut sum = 0u64;
        for _ in 0..4 {
            // In the reverse order of the inserts: no help from the cache's last lines.
            for k in keys.iter().rev() {
                sum = sum.wrapping_add(map.get(k).copied().unwrap_or(0));
            }
        }
        std::hint::black_box(sum);
        best = best.min(started.elapsed().as_secs_f64() * 1000.0);
    }
    best
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn machine(root: &Path) -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    let mem_kib: f64 = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let text = |cmd: &mut Command| {
        cmd.output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let revision = text(
        Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .current_dir(root),
    );
    // Changes to the report itself do not change what is measured.
    let dirty = text(
        Command::new("git")
            .args(["status", "--porcelain", "--untracked-files=no"])
            .current_dir(root),
    )
    .lines()
    .filter_map(|l| l.trim_start().split_once(' ').map(|(_, path)| path.trim()))
    .any(|path| path != "BENCHMARKS.md");
    Machine {
        cores: std::thread::available_parallelism().map_or(0, usize::from),
        cpu,
        mem_gib: mem_kib / 1024.0 / 1024.0,
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        load_start: loadavg(),
        load_end: String::new(),
        reference_ms: (reference_ms(), 0.0),
        started_utc: text(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])),
        revision: if dirty {
            format!("{revision} (with uncommitted changes)")
        } else {
            revision
        },
        foreign_programs: 0,
    }
}

/// BPF programs effective on the cgroup that the bench did not attach (attached above it).
fn effective_programs(cgroup: &Path) -> anyhow::Result<usize> {
    let out = run_bounded(
        Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(cgroup)
            .arg("effective"),
        Duration::from_secs(10),
    )?;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    Ok(v.as_array().map_or(0, Vec::len))
}

/// Programs attached directly to the cgroup: name -> id.
fn attached_programs(cgroup: &Path) -> anyhow::Result<BTreeMap<String, u64>> {
    let out = run_bounded(
        Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(cgroup),
        Duration::from_secs(10),
    )?;
    // bpftool prints nothing at all for a cgroup without programs.
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(BTreeMap::new());
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("bpftool cgroup show JSON")?;
    Ok(v.as_array()
        .map(|progs| {
            progs
                .iter()
                .filter_map(|p| Some((p["name"].as_str()?.to_owned(), p["id"].as_u64()?)))
                .collect()
        })
        .unwrap_or_default())
}

/// (run_time_ns, run_cnt) of one program.
fn prog_stats(id: u64) -> anyhow::Result<(u64, u64)> {
    let out = run_bounded(
        Command::new("bpftool").args(["-j", "prog", "show", "id", &id.to_string()]),
        Duration::from_secs(10),
    )?;
    let v: Value = serde_json::from_slice(&out.stdout).context("bpftool prog show JSON")?;
    Ok((
        v["run_time_ns"].as_u64().unwrap_or(0),
        v["run_cnt"].as_u64().unwrap_or(0),
    ))
}

/// The sensor's BPF time in one statistics window per request: every sensor program's run
/// time, less what the empty program of the same direction cost per run times the runs
/// (sock_ops has no empty twin: its whole time counts), over the requests wrk completed.
fn per_request_ns(window: &BTreeMap<&str, (u64, u64)>, requests: u64) -> f64 {
    let floor = |empty: &str| {
        window
            .get(empty)
            .filter(|(_, runs)| *runs > 0)
            .map_or(0.0, |(ns, runs)| *ns as f64 / *runs as f64)
    };
    let mut total = 0.0;
    for (name, (ns, runs)) in window {
        let per_run_floor = match *name {
            "sensor_ingress" => floor(calib::EMPTY_INGRESS),
            "sensor_egress" => floor(calib::EMPTY_EGRESS),
            n if n.starts_with("sensor_") => 0.0,
            _ => continue,
        };
        total += *ns as f64 - per_run_floor * *runs as f64;
    }
    total / requests as f64
}

/// Rounds of the BPF-statistics phase (its figures vary little between rounds).
pub fn bpf_rounds(opts: &Options) -> usize {
    opts.rounds.min(5)
}

fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[rank.min(v.len() - 1)]
}

impl Bench<'_> {
    /// An agent on the live-read path of the single-path phases.
    fn agent(&self) -> anyhow::Result<Agent> {
        self.agent_with(&[], &self.live_read)
    }

    fn agent_with(&self, wrapper: &[String], live_read: &str) -> anyhow::Result<Agent> {
        procs::start_agent(&AgentSpec {
            wrapper,
            bin: &self.bin,
            cgroup: &self.cgroup.path,
            ports: &[self.http_port, self.iperf_port],
            config: None,
            live_read,
        })
    }

    /// The live-read paths to measure, each with the path its agent took and why; and, for
    /// `all`, why a path was left out. An agent is started (and stopped) for each, so a path
    /// the kernel refuses fails here, before any measurement, unless `all` asked for it.
    fn live_read_paths(&self) -> anyhow::Result<(Vec<PathResults>, Option<String>)> {
        let probe = |requested: &str| -> anyhow::Result<PathResults> {
            let agent = self.agent_with(&[], requested)?;
            let (path, reason) = procs::live_read_of(&agent)?;
            agent.stop(procs::AGENT_PATIENCE)?;
            Ok(PathResults {
                // Later agents ask for the path by name: one that cannot take it fails the
                // run instead of measuring another path under this one's heading.
                requested: path.clone(),
                path,
                reason,
                ..Default::default()
            })
        };
        if self.opts.live_read != "all" {
            return Ok((vec![probe(&self.opts.live_read)?], None));
        }
        let first = probe("auto")?;
        if first.path == "iterator" {
            let map = probe("map")?;
            return Ok((vec![first, map], None));
        }
        // Only the iterator can be refused (the map path is the fallback that always loads).
        // The reason is already in the header with the path measured.
        let skipped = "the iterator path was not measured: this kernel refuses it".to_owned();
        Ok((vec![first], Some(skipped)))
    }

    fn target(&self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.http_port)
    }

    fn start_nginx(&self) -> anyhow::Result<Proc> {
        let d = self.dir.join("nginx");
        let www = d.join("www");
        fs::create_dir_all(&www).with_context(|| format!("creating {}", www.display()))?;
        let mut body = String::from("{\"object\":\"list\",\"data\":\"");
        while body.len() < REPLY_BYTES - 3 {
            body.push('x');
        }
        body.push_str("\"}\n");
        fs::write(www.join("reply.json"), body).context("writing the reply")?;
        let d = d.display();
        // Two workers (one per core) for the many-client load; wrk's single thread keeps one of
        // them busy at a time. No access log: the bench measures the sensor, not logging.
        let conf = format!(
            "user root;\nworker_processes 2;\nworker_rlimit_nofile {nofile};\n\
             error_log {d}/error.log;\npid {d}/nginx.pid;\n\
             events {{ worker_connections {conns}; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n\
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             keepalive_requests 10000000;\n  keepalive_timeout 300s;\n\
             server {{\n    listen 127.0.0.1:{port} backlog=4096;\n    root {d}/www;\n  }}\n}}\n",
            port = self.http_port,
            nofile = self.nofile,
            conns = self.nofile.saturating_sub(100).max(1024),
        );
        let conf_path = self.dir.join("nginx/nginx.conf");
        fs::write(&conf_path, conf).context("writing nginx.conf")?;
        let mut proc_ = Proc::spawn(
            self.cgroup
                .command("nginx")
                .arg("-c")
                .arg(&conf_path)
                .args(["-g", "daemon off;"]),
            &self.dir.join("nginx/stderr.log"),
        )?;
        procs::wait_listening(self.http_port, "nginx", &mut proc_)?;
        Ok(proc_)
    }

    fn start_iperf(&self) -> anyhow::Result<Proc> {
        let mut proc_ = Proc::spawn(
            self.cgroup.command("iperf3").args([
                "-s",
                "-B",
                "127.0.0.1",
                "-p",
                &self.iperf_port.to_string(),
            ]),
            &self.dir.join("iperf3-server.log"),
        )?;
        procs::wait_listening(self.iperf_port, "iperf3 -s", &mut proc_)?;
        Ok(proc_)
    }

    fn iperf(&self, secs: u64) -> anyhow::Result<f64> {
        let out = run_bounded(
            Command::new("iperf3").args([
                "-c",
                "127.0.0.1",
                "-p",
                &self.iperf_port.to_string(),
                "-t",
                &secs.to_string(),
                "-O",
                "1",
                "-J",
            ]),
            Duration::from_secs(secs + 30),
        )?;
        let v: Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|b| b / 1e9)
            .context("no end.sum_received.bits_per_second in iperf3's report")
    }

    fn wrk(&self, close: bool, secs: u64) -> anyhow::Result<Wrk> {
        let mut cmd = Command::new("wrk");
        cmd.arg(format!("-t{WRK_THREADS}"))
            .arg(format!("-c{WRK_CONNECTIONS}"))
            .arg(format!("-d{secs}s"))
            .args(["--timeout", "5s", "-s"])
            .arg(&self.lua);
        if close {
            cmd.args(["-H", "Connection: close"]);
        }
        cmd.arg(format!("http://127.0.0.1:{}{REPLY_PATH}", self.http_port));
        let out = run_bounded(&mut cmd, Duration::from_secs(secs + 30))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.starts_with("{\"requests\""))
            .context("no report line in wrk's output")?;
        let v: Value = serde_json::from_str(line).context("wrk report JSON")?;
        let n = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        Ok(Wrk {
            rps: n("requests") / (n("duration_us") / 1e6),
            p50_us: n("p50_us"),
            p90_us: n("p90_us"),
            p99_us: n("p99_us"),
            errors: v["errors"].as_u64().unwrap_or(0),
            requests: v["requests"].as_u64().unwrap_or(0),
        })
    }

    /// A B A B: in each round, each workload runs without, then right after with the sensor
    /// (the agent started for it and stopped after it), so the two sides of a pair are seconds
    /// apart and share the machine's background load as far as possible. With two live-read
    /// paths the order is A B1 B2 in odd rounds and A B2 B1 in even ones.
    fn ab_rounds(&self, results: &mut Results) -> anyhow::Result<()> {
        let paths: Vec<String> = results.paths.iter().map(|p| p.requested.clone()).collect();
        for round in 1..=self.opts.rounds {
            // Side 0 without the sensor, then one side per live-read path: in the paths' order
            // in odd rounds, reversed in even ones, so that no path is always the one further
            // from the "without" run.
            let mut sides = vec![Round::default(); 1 + paths.len()];
            let mut order: Vec<usize> = (0..sides.len()).collect();
            if round % 2 == 0 {
                order[1..].reverse();
            }
            for workload in 0..3 {
                for &side in &order {
                    check_interrupted()?;
                    let agent = if side > 0 {
                        Some(self.agent_with(&[], &paths[side - 1])?)
                    } else {
                        let attached = attached_programs(&self.cgroup.path)?;
                        anyhow::ensure!(
                            attached.is_empty(),
                            "programs still attached without the agent: {attached:?}"
                        );
                        None
                    };
                    procs::sleep(Duration::from_millis(300))?;
                    let secs = self.opts.seconds;
                    let cpu0 = match &agent {
                        Some(a) => Some((procs::cpu_seconds(a.pid())?, Instant::now())),
                        None => None,
                    };
                    let r = &mut sides[side];
                    match workload {
                        0 => r.iperf_gbps = self.iperf(secs)?,
                        1 => r.keep_alive = self.wrk(false, secs)?,
                        _ => r.close = self.wrk(true, secs)?,
                    }
                    if let (Some(a), Some(((u0, s0), t0))) = (&agent, cpu0) {
                        let (u1, s1) = procs::cpu_seconds(a.pid())?;
                        r.agent_cpu_pct[workload] =
                            100.0 * ((u1 - u0) + (s1 - s0)) / t0.elapsed().as_secs_f64();
                    }
                    if let Some(agent) = agent {
                        agent.stop(procs::AGENT_PATIENCE)?;
                    }
                }
            }
            let without = sides[0];
            for (path, with) in results.paths.iter_mut().zip(&sides[1..]) {
                eprintln!(
                    "bench: round {round}/{} without / with ({}): iperf3 {:.2} / {:.2} Gbit/s, \
                     keep-alive {:.0} / {:.0} req/s, new connections {:.0} / {:.0} req/s",
                    self.opts.rounds,
                    path.path,
                    without.iperf_gbps,
                    with.iperf_gbps,
                    without.keep_alive.rps,
                    with.keep_alive.rps,
                    without.close.rps,
                    with.close.rps
                );
                path.with.push(*with);
            }
            results.without.push(without);
        }
        Ok(())
    }

    /// Kernel-side cost per program run, from the kernel's own run-time statistics.
    fn bpf_costs(&self, results: &mut PathResults) -> anyhow::Result<()> {
        // Declared before the agent: restored after it stops, whatever happens.
        let _stats = Sysctl::set("kernel.bpf_stats_enabled", "1")?;
        let agent = self.agent_with(&[], &results.requested)?;
        let _floor = calib::EmptyPrograms::attach(&self.cgroup.path)?;
        let progs = attached_programs(&self.cgroup.path)?;
        for name in [
            "sensor_ingress",
            "sensor_egress",
            "sensor_sockops",
            calib::EMPTY_INGRESS,
            calib::EMPTY_EGRESS,
        ] {
            anyhow::ensure!(
                progs.contains_key(name),
                "{name} is not attached to the bench cgroup: {progs:?}"
            );
        }
        let secs = self.opts.seconds.min(3);
        let rounds = bpf_rounds(self.opts);
        for round in 1..=rounds {
            for workload in ["iperf3", "wrk keep-alive", "wrk new connection"] {
                check_interrupted()?;
                let before: Vec<(u64, u64)> = progs
                    .values()
                    .map(|id| prog_stats(*id))
                    .collect::<Result<_, _>>()?;
                let requests = match workload {
                    "iperf3" => {
                        self.iperf(secs)?;
                        None
                    }
                    "wrk keep-alive" => Some(self.wrk(false, secs)?.requests),
                    _ => Some(self.wrk(true, secs)?.requests),
                };
                let after: Vec<(u64, u64)> = progs
                    .values()
                    .map(|id| prog_stats(*id))
                    .collect::<Result<_, _>>()?;
                // (total ns, runs) of each program in this window.
                let window: BTreeMap<&str, (u64, u64)> = progs
                    .keys()
                    .zip(before.iter().zip(&after))
                    .map(|(name, ((t0, c0), (t1, c1)))| {
                        (
                            name.as_str(),
                            (t1.saturating_sub(*t0), c1.saturating_sub(*c0)),
                        )
                    })
                    .collect();
                if let Some(requests) = requests.filter(|&n| n > 0) {
                    results
                        .bpf_per_request
                        .entry(workload.to_owned())
                        .or_default()
                        .push(per_request_ns(&window, requests));
                }
                for ((name, (t0, c0)), (t1, c1)) in progs.keys().zip(before).zip(after) {
                    let runs = c1.saturating_sub(c0);
                    let ns = t1.saturating_sub(t0);
                    results
                        .bpf
                        .entry((name.clone(), workload.to_owned()))
                        .or_default()
                        .push(BpfSample {
                            runs,
                            ns_per_run: if runs == 0 {
                                f64::NAN
                            } else {
                                ns as f64 / runs as f64
                            },
                        });
                }
            }
            eprintln!(
                "bench: BPF statistics round {round}/{rounds} ({})",
                results.path
            );
        }
        agent.stop(procs::AGENT_PATIENCE)?;
        Ok(())
    }

    /// The agent's CPU and memory while many clients keep it busy.
    fn agent_load(&self, results: &mut PathResults) -> anyhow::Result<()> {
        let agent = self.agent_with(&[], &results.requested)?;
        let pid = agent.pid();
        // Idle cost first: polls with nothing to read.
        procs::sleep(Duration::from_secs(1))?;
        let (c0, t0) = (procs::cpu_seconds(pid)?, Instant::now());
        procs::sleep(Duration::from_secs(5))?;
        let c1 = procs::cpu_seconds(pid)?;
        results
            .idle_cpu_pct
            .push(100.0 * ((c1.0 - c0.0) + (c1.1 - c0.1)) / t0.elapsed().as_secs_f64());

        let spec = load::Spec {
            target: self.target(),
            path: REPLY_PATH.to_owned(),
            clients: self.opts.clients,
            rate: self.opts.rate,
            duration: Duration::from_secs(self.opts.load_seconds),
            threads: LOAD_THREADS,
        };
        for keep_alive in [true, false] {
            check_interrupted()?;
            let mut pool = if keep_alive {
                let pool = load::KeepAlive::connect(&spec)?;
                // Let the agent take in the new connections before the timed part.
                procs::sleep(Duration::from_secs(2))?;
                Some(pool)
            } else {
                None
            };
            let (c0, t0) = (procs::cpu_seconds(pid)?, Instant::now());
            let outcome = match pool.as_mut() {
                Some(pool) => pool.run(&spec),
                None => load::new_connections(&load::Spec {
                    duration: Duration::from_secs(self.opts.close_load_seconds),
                    ..spec.clone()
                }),
            };
            let c1 = procs::cpu_seconds(pid)?;
            let wall = t0.elapsed().as_secs_f64();
            let (user, system) = (c1.0 - c0.0, c1.1 - c0.1);
            let health: Value = serde_json::from_str(&procs::api_get(&agent.socket, "/v1/health")?)
                .context("health JSON")?;
            let loss = health["loss"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter(|(_, v)| v.as_u64().unwrap_or(0) > 0)
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            let row = LoadRow {
                name: if keep_alive {
                    "keep-alive, one connection per client".into()
                } else {
                    "new connection per request".into()
                },
                clients: spec.clients,
                target_rate: spec.rate,
                outcome,
                cpu_pct: 100.0 * (user + system) / wall,
                user_pct: 100.0 * user / wall,
                system_pct: 100.0 * system / wall,
                rss_kib: procs::status_kib(pid, "VmRSS")?,
                hwm_kib: procs::status_kib(pid, "VmHWM")?,
                tracked_addresses: health["clients"]["tracked_addresses"].as_u64().unwrap_or(0),
                open_alerts: health["open_alerts"].as_u64().unwrap_or(0),
                loss: if loss.is_empty() { "none".into() } else { loss },
            };
            eprintln!(
                "bench: agent under load ({}, {}): {:.0} req/s, {} errors, CPU {:.2}% of one \
                 core, RSS {} KiB, {} alerts open",
                results.path,
                row.name,
                row.outcome.rate(),
                row.outcome.errors,
                row.cpu_pct,
                row.rss_kib,
                row.open_alerts
            );
            results.load.push(row);
            drop(pool);
        }
        agent.stop(procs::AGENT_PATIENCE)?;
        Ok(())
    }

    /// Not a measurement: the agent under callgrind while the `--profile-load` load runs, for the
    /// cost per call of its functions (this machine has no hardware counters for perf).
    fn profile_agent(&self, out_dir: &Path) -> anyhow::Result<()> {
        fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
        let out = out_dir.join("agent.callgrind");
        let wrapper = [
            "valgrind".to_owned(),
            "--tool=callgrind".to_owned(),
            format!("--callgrind-out-file={}", out.display()),
        ];
        let agent = self.agent_with(&wrapper, &self.live_read)?;
        let spec = load::Spec {
            target: self.target(),
            path: REPLY_PATH.to_owned(),
            clients: self.opts.clients,
            rate: self.opts.rate,
            duration: Duration::from_secs(self.opts.load_seconds),
            threads: LOAD_THREADS,
        };
        let outcome = Profiled::connect(self.opts.profile_load, &spec)?.run(&spec);
        let health = procs::api_get(&agent.socket, "/v1/health")?;
        agent.stop(procs::AGENT_PATIENCE)?;
        let annotated = run_bounded(
            Command::new("callgrind_annotate")
                .arg("--inclusive=yes")
                .arg(&out),
            Duration::from_secs(120),
        )?;
        let text = out_dir.join("agent.callgrind.txt");
        fs::write(&text, &annotated.stdout)?;
        eprintln!(
            "bench: profiled the agent under {:.0} req/s from {} clients; health {health}; \
             callgrind output {} (annotated: {})",
            outcome.rate(),
            spec.clients,
            out.display(),
            text.display()
        );
        Ok(())
    }

    /// Not a measurement: the agent sampled at ~1 kHz of CPU time by `perf record -e
    /// cpu-clock` (a software clock: this machine kind has no hardware counters) while the
    /// `--profile-load` load runs. Unlike callgrind, it sees what instructions do not (cache misses,
    /// time in the kernel) and runs the agent at full speed, batching as it does in production.
    fn sample_agent(&self, out_dir: &Path) -> anyhow::Result<()> {
        fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
        let data = out_dir.join("agent.perf.data");
        let agent = self.agent()?;
        let spec = load::Spec {
            target: self.target(),
            path: REPLY_PATH.to_owned(),
            clients: self.opts.clients,
            rate: self.opts.rate,
            duration: Duration::from_secs(self.opts.load_seconds),
            threads: LOAD_THREADS,
        };
        let mut pool = Profiled::connect(self.opts.profile_load, &spec)?;
        let mut perf = Command::new("perf")
            .args(["record", "-q", "-F", "999", "-e", "cpu-clock", "-g", "-p"])
            .arg(agent.pid().to_string())
            .arg("-o")
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting perf (Debian package linux-perf; `cargo xtask setup --bench`)")?;
        let outcome = pool.run(&spec);
        // perf writes its data on SIGINT.
        let stopped = Command::new("kill")
            .args(["-INT", &perf.id().to_string()])
            .status()
            .context("stopping perf")?;
        anyhow::ensure!(stopped.success(), "could not stop perf");
        let status = perf.wait().context("waiting for perf")?;
        drop(pool);
        agent.stop(procs::AGENT_PATIENCE)?;
        // perf writes its data, then re-raises the SIGINT it was stopped with.
        anyhow::ensure!(
            status.success() || std::os::unix::process::ExitStatusExt::signal(&status) == Some(2),
            "perf record failed: {status}"
        );
        let report = run_bounded(
            Command::new("perf")
                .args([
                    "report",
                    "--no-children",
                    "--sort",
                    "dso,symbol",
                    "-g",
                    "none",
                    "-i",
                ])
                .arg(&data),
            Duration::from_secs(120),
        )?;
        let text = out_dir.join("agent.perf.txt");
        fs::write(&text, &report.stdout)?;
        eprintln!(
            "bench: sampled the agent under {:.0} req/s from {} clients; perf data {} \
             (report: {})",
            outcome.rate(),
            spec.clients,
            data.display(),
            text.display()
        );
        Ok(())
    }

    /// From the first request of a burst to the client's row in `sensor clients` counting it.
    fn poll_latency(&self, results: &mut PathResults) -> anyhow::Result<()> {
        let agent = self.agent_with(&[], &results.requested)?;
        for trial in 0..self.opts.latency_trials.min(250) {
            for close in [false, true] {
                check_interrupted()?;
                let src = Ipv4Addr::new(127, 30, u8::from(close), (trial + 1) as u8);
                let t0 = Instant::now();
                let stream = load::one_request(src, self.target(), REPLY_PATH, close)?;
                let deadline = t0 + Duration::from_secs(5);
                let latency = loop {
                    if self.clients_shows(&agent, src)? {
                        break t0.elapsed();
                    }
                    if Instant::now() >= deadline {
                        bail!("{src}'s request did not appear in `sensor clients` within 5 s");
                    }
                    procs::sleep(Duration::from_millis(5))?;
                };
                drop(stream);
                let ms = latency.as_secs_f64() * 1e3;
                if close {
                    results.latency_closed_ms.push(ms);
                } else {
                    results.latency_open_ms.push(ms);
                }
                // Spread the trials over the poll interval instead of locking onto its phase.
                procs::sleep(Duration::from_millis(50 + (trial as u64 * 137) % 400))?;
            }
        }
        agent.stop(procs::AGENT_PATIENCE)?;
        Ok(())
    }

    /// Whether `sensor clients` (the real CLI) shows `src` with at least one request.
    fn clients_shows(&self, agent: &Agent, src: Ipv4Addr) -> anyhow::Result<bool> {
        let out = run_bounded(
            Command::new(&self.bin)
                .args(["clients", "--json", "--filter"])
                .arg(src.to_string())
                .arg("--socket")
                .arg(&agent.socket),
            Duration::from_secs(10),
        )?;
        let rows: Value = serde_json::from_slice(&out.stdout).context("sensor clients JSON")?;
        let src = src.to_string();
        Ok(rows.as_array().is_some_and(|rows| {
            rows.iter().any(|r| {
                r["client"].as_str() == Some(src.as_str()) && r["requests"].as_u64() >= Some(1)
            })
        }))
    }

    /// The aggregation's memory with N distinct clients, in a child process measured from here.
    fn aggregate_memory(&self, results: &mut Results) -> anyhow::Result<()> {
        let mut runs: Vec<(usize, Option<usize>, u64)> =
            self.opts.keys.iter().map(|k| (*k, None, 0)).collect();
        if self.opts.bounded_keys > 0 {
            runs.push((self.opts.bounded_keys, Some(DEFAULT_MAX_CLIENTS), 0));
        }
        // The load's table after an hour: every client's windows full.
        runs.push((DEFAULT_MAX_CLIENTS, None, HISTORY_MINUTES));
        for (keys, bound, history) in runs {
            check_interrupted()?;
            let mut cmd = Command::new(&self.bin);
            cmd.args(["bench-aggregate", "--keys", &keys.to_string()]);
            if let Some(bound) = bound {
                cmd.args(["--max-clients", &bound.to_string()]);
            }
            if history > 0 {
                cmd.args([
                    "--history-minutes",
                    &history.to_string(),
                    "--snapshots",
                    &SNAPSHOT_ROUNDS.to_string(),
                ]);
            }
            let child = cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("spawning sensor bench-aggregate")?;
            let mut proc_ = Proc { child };
            let stdout = proc_
                .child
                .stdout
                .take()
                .context("bench-aggregate stdout")?;
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(stdout).read_line(&mut line);
                let _ = tx.send(line);
            });
            let line = rx
                .recv_timeout(Duration::from_secs(300))
                .context("sensor bench-aggregate did not report within 300 s")?;
            let v: Value = serde_json::from_str(line.trim())
                .with_context(|| format!("bench-aggregate report {line:?}"))?;
            let pid = proc_.pid();
            let row = MemoryRow {
                keys,
                bound,
                tracked_addresses: v["tracked_addresses"].as_u64().unwrap_or(0),
                tracked_groups: v["tracked_groups"].as_u64().unwrap_or(0),
                rss_kib: procs::status_kib(pid, "VmRSS")?,
                hwm_kib: procs::status_kib(pid, "VmHWM")?,
                fill_ms: v["fill_ms"].as_u64().unwrap_or(0),
                history_minutes: history,
                snapshot_cpu_us: v["snapshot_cpu_us"].as_u64().unwrap_or(0),
                snapshot_bytes: v["snapshot_bytes"].as_u64().unwrap_or(0),
            };
            // Closing stdin lets it exit; Proc's drop reaps it (or kills it if it hangs).
            drop(proc_.child.stdin.take());
            let deadline = Instant::now() + Duration::from_secs(30);
            while proc_.child.try_wait()?.is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!(
                "bench: aggregation with {keys} clients: RSS {} KiB",
                row.rss_kib
            );
            results.memory.push(row);
        }
        Ok(())
    }
}
