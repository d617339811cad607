//! Developer and CI tasks: `cargo xtask setup | build | run | test | bench`.
//!
//! `setup` installs everything a fresh machine lacks, idempotently and quickly on a second run:
//! Debian packages the tests drive, the pinned nightly with rust-src (kernel crate), and
//! bpf-linker built against that nightly's own LLVM.

use std::{
    env,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod bench;

/// Must match `EBPF_TOOLCHAIN` in sensor/build.rs.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";
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
];
/// Debian packages only `cargo xtask bench` needs (wrk, nginx and bpftool are above).
const BENCH_PACKAGES: &[&str] = &["iperf3"];

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
    setup_toolchain()
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
    // The packages' own nginx, Prometheus and iperf3 services are not used: tests and the bench
    // run their own instances, and only promtool of the prometheus package.
    for service in ["nginx", "prometheus", "iperf3"] {
        let _ = Command::new("systemctl")
            .args(["disable", "--now", service])
            .output();
    }
    Ok(())
}

fn setup_toolchain() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !installed.lines().any(|l| l.starts_with(EBPF_TOOLCHAIN)) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
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
        EBPF_TOOLCHAIN,
    ]))
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            EBPF_TOOLCHAIN,
        ]))?;
    }
    setup_bpf_linker()
}

/// bpf-linker must use the same LLVM as the nightly that emits the bitcode it links.
fn setup_bpf_linker() -> anyhow::Result<()> {
    let working = output(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION));
    let marker = cargo_home().join(format!(".sensor-bpf-linker-{EBPF_TOOLCHAIN}"));
    if working && marker.exists() {
        return Ok(());
    }
    let sysroot = output(
        Command::new("rustc")
            .arg(format!("+{EBPF_TOOLCHAIN}"))
            .args(["--print", "sysroot"]),
    )
    .context("rustc of the eBPF toolchain")?;
    let lib_dir = PathBuf::from(sysroot.trim()).join("lib");
    let version = output(
        Command::new("rustc")
            .arg(format!("+{EBPF_TOOLCHAIN}"))
            .arg("-vV"),
    )
    .context("rustc -vV")?;
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
    let prefix = cargo_home().join(format!("sensor-llvm-{EBPF_TOOLCHAIN}"));
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
    // Privileged tests fail instead of skipping: a skipped exactness test is not a pass.
    let mut cmd = cargo();
    cmd.args([
        "test",
        "--workspace",
        "--exclude",
        "sensor-ebpf",
        "--no-fail-fast",
    ])
    .env("SENSOR_BIN", &bin)
    .env("SENSOR_REQUIRE_PRIVILEGED", "1")
    .stdout(Stdio::piped());
    eprintln!("xtask: {cmd:?}");
    let mut child = cmd.spawn().context("spawning cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let mut totals = Totals::default();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        totals.add(&line);
    }
    let status = child.wait()?;
    // One closing line for the whole run, whatever order the test binaries finished in.
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !status.success() || totals.failed > 0 {
        bail!("cargo test failed ({status})");
    }
    if totals.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
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
