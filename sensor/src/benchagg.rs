//! `sensor bench-aggregate --keys N` (hidden): the per-client aggregation holding N distinct
//! clients, for `cargo xtask bench` to measure the memory of this process from outside.
//!
//! Every synthetic client goes through the agent's own aggregation path, as one short HTTP
//! connection does: opened with its counters, one request event, closed. The table bound is
//! N unless `--max-clients` sets it (then the lightest clients are folded as in the agent). No
//! packet is sent.

use std::{
    io::Read as _,
    net::{IpAddr, Ipv4Addr},
    time::Instant,
};

use anyhow::Context as _;

use crate::{
    cli::BenchAggregateArgs,
    detect::DetectorState,
    model::aggregate::{Aggregator, Counts, Delta, Now},
    model::conntable::ConnTable,
    model::state::{self, SnapshotRef},
};

/// Synthetic clients are numbered into 127.0.0.0/8 (16M addresses): never sent to, only keys.
const MAX_KEYS: usize = (1 << 24) - 2;

/// With history, each client makes one request every 10 s (one per bucket of the shortest
/// window).
const STEP_MS: u64 = 10_000;
const STEPS_PER_MINUTE: u64 = 6;

/// Client `i`'s short connection at `at`: opened with its counters, one request event, closed.
fn one_request(agg: &mut Aggregator, i: usize, at: Now) {
    let base = u32::from(Ipv4Addr::new(127, 0, 0, 1));
    let ip = IpAddr::V4(Ipv4Addr::from(base + i as u32));
    let open = Delta {
        counts: Counts {
            requests: 1,
            bytes_in: 120,
            bytes_out: 1_500,
            connections: 0,
            events_out: 0,
        },
        opened: true,
        closed: false,
    };
    agg.apply(ip, &open, at);
    // Kernel time of the request: any clock that moves with `at` (gaps are what is kept).
    agg.request(ip, at.unix_ms * 1_000_000 + i as u64, at);
    agg.apply(
        ip,
        &Delta {
            closed: true,
            ..Default::default()
        },
        at,
    );
}

/// Writes `rounds` snapshots of `agg` with the agent's own encoder (`state::write_tmp`, no
/// fsync: the CPU is what is measured) into a temporary directory; the median CPU time of
/// one (microseconds, this thread's) and the snapshot's size.
fn snapshots(agg: &Aggregator, rounds: usize) -> anyhow::Result<(u64, u64)> {
    let dir = std::env::temp_dir().join(format!("sensor-bench-snapshot-{}", std::process::id()));
    let conns = ConnTable::new(std::time::Duration::from_secs(60), 1);
    let detector = DetectorState::default();
    let boot_id = state::boot_id();
    let mut cpu = Vec::with_capacity(rounds);
    let mut bytes = 0;
    for _ in 0..rounds {
        let before = thread_cpu_us();
        let written = state::write_tmp(
            &dir,
            &SnapshotRef {
                version: state::SNAPSHOT_VERSION,
                boot_id: &boot_id,
                instance: "bench",
                saved_unix_ms: Now::system().unix_ms,
                agg,
                conns: conns.saved(),
                detector: &detector,
                shipped_through: 0,
            },
        )?;
        cpu.push(thread_cpu_us().saturating_sub(before));
        bytes = written.len()?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    cpu.sort_unstable();
    Ok((cpu[cpu.len() / 2], bytes))
}

/// CPU time of the calling thread, in microseconds.
fn thread_cpu_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill; CLOCK_THREAD_CPUTIME_ID is always supported on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

pub fn run(args: &BenchAggregateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.keys <= MAX_KEYS,
        "--keys: at most {MAX_KEYS} synthetic clients"
    );
    let started = Instant::now();
    let max_clients = args.max_clients.unwrap_or(args.keys).max(1);
    let mut agg = Aggregator::new(max_clients, 24, 56);
    let now = Now::system();
    // Time-major, oldest first: every client's step t comes before any client's step t+1,
    // as the agent sees them.
    let steps = (args.history_minutes * STEPS_PER_MINUTE).max(1);
    for step in 0..steps {
        let at = Now {
            unix_ms: now.unix_ms - (steps - 1 - step) * STEP_MS,
        };
        for i in 0..args.keys {
            one_request(&mut agg, i, at);
        }
    }
    let fill_ms = started.elapsed().as_millis();
    let (snapshot_cpu_us, snapshot_bytes) = if args.snapshots > 0 {
        snapshots(&agg, args.snapshots)?
    } else {
        (0, 0)
    };
    let report = serde_json::json!({
        "keys": args.keys,
        "max_clients": max_clients,
        "tracked_addresses": agg.addresses.clients.len(),
        "tracked_groups": agg.groups.clients.len(),
        "folded_addresses": agg.addresses.folded.clients,
        "fill_ms": fill_ms,
        "history_minutes": args.history_minutes,
        "snapshot_cpu_us": snapshot_cpu_us,
        "snapshot_bytes": snapshot_bytes,
    });
    crate::stdout::outln!("{report}")?;
    // Hold the state until the caller has measured us and closes our stdin.
    let mut sink = Vec::new();
    std::io::stdin()
        .read_to_end(&mut sink)
        .context("waiting for stdin to close")?;
    // Keep `agg` alive (and observable) until here.
    std::hint::black_box(&agg);
    Ok(())
}
