//! Developer and CI tasks: `cargo xtask setup | build | run | test | deb | bench | eval | demo | fuzz`.
//!
//! `setup` installs everything a fresh machine lacks, idempotently and quickly on a second run:
//! Debian packages the tests drive, the pinned nightly with rust-src (kernel crate), bpf-linker
//! built against that nightly's own LLVM, cargo-deb, the cached Debian tree the systemd
//! tests boot, and the Debian 6.1 kernel the guest-kernel test boots under qemu. `deb` builds the Debian package.

use std::{
    env,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod bench;

/// The kernel crate's pinned nightly, named once (sensor/build.rs reads the same file).
const EBPF_TOOLCHAIN_FILE: &str = include_str!("../../sensor-ebpf/rust-toolchain.toml");
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages: real peers for the end-to-end tests (HTTP server and clients, netns and
/// packet loss tooling, and `prometheus` for its `promtool`, which checks real scrapes).
const APT_PACKAGES: &[&str] = &[
    "nginx-light",
    "curl",
    "wrk",
    "iproute2",
    "nftables",
    "procps",
    "python3",
    "bpftool",
    "util-linux",
    "prometheus",
    "tmux",
    // systemd tests: a booted Debian tree (systemd-nspawn) built with debootstrap.
    "systemd-container",
    "debootstrap",
    // SIEM output tests: real receivers (rsyslog with TLS, liblognorm's CEF parser), and
    // openssl for their test certificates.
    "rsyslog",
    "rsyslog-gnutls",
    "liblognorm-utils",
    "openssl",
    // Guest-kernel test: Debian's own 6.1 kernel under qemu (TCG), from an initramfs of static
    // busybox and the host's programs, packed with cpio.
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    // JetStream transport tests (tests/tests/nats.rs): real nats-server processes, clustered.
    "nats-server",
];
/// cargo-deb builds the .deb (`cargo xtask deb`).
const CARGO_DEB_VERSION: &str = "3.8.0";
/// Debian packages only `cargo xtask bench` needs (wrk, nginx and bpftool are above).
const BENCH_PACKAGES: &[&str] = &["iperf3", "linux-perf", "valgrind"];

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install toolchains, bpf-linker and test packages (idempotent).
    Setup,
    /// Build the agent (and its kernel programs) in release mode.
    Build,
    /// Set up, build, and run the agent on its embedded default config (needs root).
    Run {
        /// Arguments passed to `sensor run`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run every check and test; privileged tests must run, never skip.
    Test,
    /// Evaluate detection on labelled scenarios (real traffic, compressed time): the tuning
    /// set, then the held-out set; writes both tables into docs/detection.md.
    Eval {
        /// Scaled minutes of traffic per set (at 30x: 120 minutes take 4 real minutes).
        #[arg(long, default_value_t = 120)]
        minutes: u64,
        /// The held-out set's seed (default: a new one, printed).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// A live demo: an OpenAI-compatible server, a few normal users and one extraction bot,
    /// watched by the agent until the alert fires.
    Demo,
    /// Fuzz the request-head parser with cargo-fuzz (libFuzzer) for a bounded time.
    Fuzz {
        /// How long to fuzz.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
    },
    /// Build the Debian package (cargo-deb); prints its path.
    Deb,
    /// Set up, build, and measure the sensor's overhead on this machine (needs root; a few
    /// minutes); writes the results into BENCHMARKS.md.
    Bench(bench::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => setup(),
        Task::Build => {
            setup_toolchain()?;
            build_release()
        }
        Task::Run { args } => {
            setup_toolchain()?;
            build_release()?;
            let bin = workspace_root().join("target/release/sensor");
            let status = Command::new(&bin)
                .arg("run")
                .args(&args)
                .status()
                .with_context(|| format!("starting {}", bin.display()))?;
            if !status.success() {
                bail!("sensor run exited with {status}");
            }
            Ok(())
        }
        Task::Test => test(),
        Task::Fuzz { seconds } => fuzz(seconds),
        Task::Eval { minutes, seed } => eval(minutes, seed),
        Task::Demo => demo(),
        Task::Deb => {
            setup_toolchain()?;
            let deb = build_deb()?;
            println!("{}", deb.display());
            Ok(())
        }
        Task::Bench(opts) => {
            setup_packages(BENCH_PACKAGES)?;
            setup()?;
            build_release()?;
            bench::run(&opts, &workspace_root())
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn setup() -> anyhow::Result<()> {
    setup_packages(APT_PACKAGES)?;
    setup_python()?;
    setup_toolchain()?;
    setup_cargo_deb()?;
    // The systemd tests' Debian tree: debootstrap takes a minute or two once, then is cached.
    let started = std::time::Instant::now();
    let rootfs = sensor_tests::systemd::ensure_rootfs()?;
    eprintln!(
        "xtask: test tree {} ready ({:.0?})",
        rootfs.display(),
        started.elapsed()
    );
    // The guest-kernel test's kernel: downloaded and unpacked once, never installed here.
    let started = std::time::Instant::now();
    let kernel = sensor_tests::guest::ensure_kernel()?;
    eprintln!(
        "xtask: guest kernel {} {} ready ({:.0?})",
        kernel.package,
        kernel.version,
        started.elapsed()
    );
    Ok(())
}

fn setup_cargo_deb() -> anyhow::Result<()> {
    let installed = output(cargo().args(["deb", "--version"])).unwrap_or_default();
    if installed.trim() == format!("cargo-deb {CARGO_DEB_VERSION}") {
        return Ok(());
    }
    run(cargo().args([
        "install",
        "cargo-deb",
        "--version",
        CARGO_DEB_VERSION,
        "--locked",
    ]))
}

/// Builds the release binary and the .deb; returns its path.
fn build_deb() -> anyhow::Result<PathBuf> {
    setup_cargo_deb()?;
    let out = cargo()
        .args(["deb", "--package", "sensor", "--locked"])
        .stderr(Stdio::inherit())
        .output()
        .context("spawning cargo deb")?;
    if !out.status.success() {
        bail!("cargo deb failed with {}", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .context("cargo deb printed no .deb path")?;
    Ok(deb)
}

/// Python packages from PyPI the tests drive as real peers (the OpenAI SDK) or use as
/// checkers (the OCSF schema and a JSON Schema validator), in a venv: (pip name, module).
const PYTHON_PACKAGES: &[(&str, &str)] = &[
    ("openai", "openai"),
    ("ocsf-json-schema", "ocsf_json_schema"),
    ("jsonschema", "jsonschema"),
];

fn venv() -> PathBuf {
    env::var_os("HOME")
        .map_or_else(|| PathBuf::from("/root"), PathBuf::from)
        .join(".cache/sensor-venv")
}

fn setup_python() -> anyhow::Result<()> {
    let venv = venv();
    let python = venv.join("bin/python");
    if !python.exists() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    let missing = PYTHON_PACKAGES.iter().any(|(_, module)| {
        !Command::new(&python)
            .args(["-c", &format!("import {module}")])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if missing {
        run(Command::new(venv.join("bin/pip"))
            .args(["install", "-q"])
            .args(PYTHON_PACKAGES.iter().map(|(name, _)| name)))?;
    }
    Ok(())
}

fn setup_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    // The packages' own nginx, Prometheus, rsyslog, iperf3 and NATS services are not used:
    // tests and the bench run their own instances, and only promtool of the prometheus package.
    for service in ["nginx", "prometheus", "rsyslog", "iperf3", "nats-server"] {
        let _ = Command::new("systemctl")
            .args(["disable", "--now", service])
            .output();
    }
    Ok(())
}

fn setup_toolchain() -> anyhow::Result<()> {
    let nightly = ebpf_toolchain()?;
    let installed = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !installed.lines().any(|l| l.starts_with(nightly)) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            nightly,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        nightly,
    ]))
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", nightly]))?;
    }
    setup_bpf_linker()
}

/// bpf-linker must use the same LLVM as the nightly that emits the bitcode it links.
fn setup_bpf_linker() -> anyhow::Result<()> {
    let nightly = ebpf_toolchain()?;
    let working = output(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION));
    let marker = cargo_home().join(format!(".sensor-bpf-linker-{nightly}"));
    if working && marker.exists() {
        return Ok(());
    }
    let sysroot = output(
        Command::new("rustc")
            .arg(format!("+{nightly}"))
            .args(["--print", "sysroot"]),
    )
    .context("rustc of the eBPF toolchain")?;
    let lib_dir = PathBuf::from(sysroot.trim()).join("lib");
    let version =
        output(Command::new("rustc").arg(format!("+{nightly}")).arg("-vV")).context("rustc -vV")?;
    let llvm_major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("no LLVM version in rustc -vV")?
        .to_owned();
    let libllvm = std::fs::read_dir(&lib_dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    // LLVM_PREFIX wants <prefix>/lib/libLLVM.so; point it at the toolchain's own library.
    let prefix = cargo_home().join(format!("sensor-llvm-{nightly}"));
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)?;
    run(Command::new("cargo")
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        // Find the toolchain's libLLVM at run time without rustup's environment.
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", lib_dir.display()),
        ))?;
    std::fs::write(&marker, libllvm.display().to_string())?;
    Ok(())
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

fn cargo() -> Command {
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

const REPORT_BEGIN: &str = "<!-- eval:begin -->";
const REPORT_END: &str = "<!-- eval:end -->";

fn eval(minutes: u64, seed: Option<u64>) -> anyhow::Result<()> {
    setup()?;
    run(cargo().args(["build", "--package", "sensor"]))?;
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(7, |d| d.as_secs() % 100_000)
    });
    let mut tables = String::new();
    let mut failed = Vec::new();
    // The tuning set first (what the defaults were tuned on), then the held-out set (never
    // tuned on): both are reported, a failure of either is reported after both ran.
    for (set, seed) in [("tuning", 1), ("heldout", seed)] {
        let report = env::temp_dir().join(format!("sensor-eval-{set}-{}.md", std::process::id()));
        let result = run(cargo()
            .args([
                "test",
                "-p",
                "sensor-tests",
                "--test",
                "detection",
                "--",
                "--nocapture",
            ])
            .env("SENSOR_BIN", workspace_root().join("target/debug/sensor"))
            .env("SENSOR_PYTHON", venv().join("bin/python"))
            .env("SENSOR_REQUIRE_PRIVILEGED", "1")
            .env("SENSOR_EVAL_MINUTES", minutes.to_string())
            .env("SENSOR_EVAL_SET", set)
            .env("SENSOR_EVAL_SEED", seed.to_string())
            .env("SENSOR_EVAL_REPORT", &report));
        if let Err(e) = result {
            failed.push(format!("{set}: {e}"));
        }
        let table = std::fs::read_to_string(&report)
            .with_context(|| format!("evaluation report of the {set} set"))?;
        let _ = std::fs::remove_file(&report);
        tables.push_str(&format!("\n### {set}\n\n{table}"));
    }
    let doc_path = workspace_root().join("docs/detection.md");
    let doc = std::fs::read_to_string(&doc_path).context("docs/detection.md")?;
    let (Some(begin), Some(end)) = (doc.find(REPORT_BEGIN), doc.find(REPORT_END)) else {
        bail!("docs/detection.md lacks the {REPORT_BEGIN} / {REPORT_END} markers");
    };
    let machine = output(Command::new("uname").arg("-r")).unwrap_or_default();
    let updated = format!(
        "{}{REPORT_BEGIN}\nMeasured by `cargo xtask eval --minutes {minutes} --seed {seed}` (time \
         compressed 30x) on a 2-core machine, kernel {}, with the embedded default rules. Times \
         to detect are in scaled (real deployment) minutes from the start of the scenario's \
         traffic; the detector runs every real second, 30 scaled ones, so times are rounded up \
         to that.\n{tables}{}",
        &doc[..begin],
        machine.trim(),
        &doc[end..]
    );
    std::fs::write(&doc_path, updated)?;
    eprintln!("xtask: wrote the results into {}", doc_path.display());
    if !failed.is_empty() {
        bail!("evaluation failed: {}", failed.join("; "));
    }
    Ok(())
}

/// Runs the demo: everything on loopback, in a cgroup of its own, cleaned up at the end.
fn demo() -> anyhow::Result<()> {
    setup()?;
    build_release()?;
    let root = workspace_root();
    let bin = root.join("target/release/sensor");
    let dir = sensor_tests::TempDir::new("demo");
    // A demo interrupted earlier may have left its cgroup: dropping it kills and removes it.
    let stale = sensor_tests::find_cgroup2_root()?.join("sensor-demo");
    if stale.exists() {
        drop(sensor_tests::Cgroup { path: stale });
    }
    let cgroup = sensor_tests::Cgroup::create("sensor-demo").context("creating the demo cgroup")?;
    let port = sensor_tests::ports::free_port()?;
    let mut children = vec![
        cgroup
            .command("python3")
            .arg(root.join("tests/peers/openai_stub.py"))
            .arg(port.to_string())
            .arg(dir.path.join("ledger.jsonl"))
            .stdout(Stdio::null())
            .spawn()?,
    ];
    let agent = sensor_tests::Agent::launch(sensor_tests::Launch {
        extra: vec!["--fresh".into()],
        bin: bin.clone(),
        ..sensor_tests::Launch::new(&cgroup.path, &[port])
    });
    let result = agent.and_then(|agent| {
        demo_loop(&root, &bin, &agent.socket, port, &dir.path, &mut children)
            .with_context(|| format!("the agent's log:\n{}", agent.log()))
    });
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
    drop(cgroup);
    result
}

fn demo_loop(
    root: &Path,
    bin: &Path,
    socket: &Path,
    port: u16,
    dir: &Path,
    children: &mut Vec<std::process::Child>,
) -> anyhow::Result<()> {
    let port = port.to_string();
    // Five people, then a bot (8 parallel connections, long streamed replies).
    let scenario = |name: &str| {
        Command::new("python3")
            .arg(root.join("tests/peers/scenarios.py"))
            .args([
                "--port",
                &port,
                "--scale",
                "1",
                "--minutes",
                "5",
                "--only",
                name,
            ])
            .arg("--labels")
            .arg(dir.join(format!("{name}.json")))
            .spawn()
    };
    children.push(scenario("normal")?);
    std::thread::sleep(std::time::Duration::from_secs(10));
    children.push(scenario("bot")?);
    let started = std::time::Instant::now();
    loop {
        let clients = output(
            Command::new(bin)
                .args(["clients", "--limit", "10", "--socket"])
                .arg(socket),
        )
        .unwrap_or_default();
        let alerts =
            output(Command::new(bin).args(["alerts", "--socket"]).arg(socket)).unwrap_or_default();
        print!("\x1b[2J\x1b[H");
        println!(
            "sensor demo: 5 people (127.0.20.x) and, since 10 s ago, a bot (127.0.22.1) — {:>3} s\n",
            started.elapsed().as_secs() + 10
        );
        println!("{clients}");
        println!("{alerts}");
        if alerts.contains("open") {
            println!("\nThe bot was detected; the people were not. Stopping the demo.");
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "no alert within two minutes"
        );
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

fn fuzz(seconds: u64) -> anyhow::Result<()> {
    let nightly = ebpf_toolchain()?;
    setup_toolchain()?;
    if output(Command::new("cargo").args(["fuzz", "--version"])).is_none() {
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    run(Command::new("cargo")
        .arg(format!("+{nightly}"))
        .args(["fuzz", "run", "parse_head", "--"])
        .arg(format!("-max_total_time={seconds}"))
        .current_dir(workspace_root().join("fuzz")))
}

fn build_release() -> anyhow::Result<()> {
    run(cargo().args(["build", "--release", "--package", "sensor"]))
}

fn test() -> anyhow::Result<()> {
    setup()?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "sensor-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args(["build", "--package", "sensor"]))?;
    let bin = workspace_root().join("target/debug/sensor");
    let deb = build_deb()?;
    let mut totals = Totals::default();
    // Privileged tests fail instead of skipping: a skipped exactness test is not a pass. The
    // whole suite runs on the live-read path this kernel gives (`auto`)...
    let all = run_tests(&bin, &deb, &[], None, &mut totals)?;
    // ...and the exactness and restart tests again on the forced fallback path (the map,
    // which needs no tracing program), so both paths are covered whichever one `auto` took.
    let fallback = run_tests(
        &bin,
        &deb,
        &[
            "-p",
            "sensor-tests",
            "--test",
            "exactness",
            "--test",
            "clients",
        ],
        Some("map"),
        &mut totals,
    )?;
    // One closing line for the whole run, whatever order the test binaries finished in.
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !all.success() || !fallback.success() || totals.failed > 0 {
        bail!("cargo test failed ({all}; forced fallback: {fallback})");
    }
    if totals.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// One `cargo test` run (the whole workspace without `which`), adding its results to `totals`.
fn run_tests(
    bin: &Path,
    deb: &Path,
    which: &[&str],
    live_read: Option<&str>,
    totals: &mut Totals,
) -> anyhow::Result<std::process::ExitStatus> {
    let mut cmd = cargo();
    cmd.arg("test");
    if which.is_empty() {
        cmd.args(["--workspace", "--exclude", "sensor-ebpf"]);
    } else {
        cmd.args(which);
    }
    cmd.arg("--no-fail-fast")
        .env("SENSOR_BIN", bin)
        .env("SENSOR_DEB", deb)
        .env("SENSOR_REQUIRE_PRIVILEGED", "1")
        // The unit tests against a real nats-server (the lease bucket) must not skip in CI.
        .env("SENSOR_REQUIRE_NATS", "1")
        .env("SENSOR_LIVE_READ", live_read.unwrap_or_default())
        .stdout(Stdio::piped());
    eprintln!("xtask: {cmd:?}");
    let mut child = cmd.spawn().context("spawning cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        totals.add(&line);
    }
    Ok(child.wait()?)
}

/// Sums libtest's "test result: ok. N passed; N failed; N ignored; ..." lines.
#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(kind), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match kind {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// The kernel crate's pinned nightly: the `channel` of sensor-ebpf/rust-toolchain.toml.
fn ebpf_toolchain() -> anyhow::Result<&'static str> {
    EBPF_TOOLCHAIN_FILE
        .lines()
        .find_map(|l| {
            let value = l
                .trim()
                .strip_prefix("channel")?
                .trim_start()
                .strip_prefix('=')?;
            Some(value.trim().trim_matches('"'))
        })
        .context("no channel in sensor-ebpf/rust-toolchain.toml")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_pinned_nightly_is_read_from_the_toolchain_file() {
        let nightly = super::ebpf_toolchain().expect("channel");
        assert!(nightly.starts_with("nightly-20"), "{nightly:?}");
        assert!(!nightly.contains(['"', ' ']), "{nightly:?}");
    }
}
