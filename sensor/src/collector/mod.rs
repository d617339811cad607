//! `sensor collector`: receives agents' batches over HTTPS (and from a JetStream stream,
//! [`nats`]), merges every client's counters
//! across hosts, runs fleet rules with the agent's rule engine, forwards fleet alerts and the
//! agents' alerts to SIEM outputs, and serves the fleet-wide per-client view.
//!
//! Durability: a batch is appended to a journal (fsync) before it is acknowledged; the merged
//! state is snapshotted periodically and the journal then emptied. A restart loads the
//! snapshot and replays the journal, and the per-agent stream positions make the replay (and
//! any retry) count each record once.

pub mod admission;
pub mod alerts;
pub mod bench;
pub mod budget;
pub mod certname;
pub mod ckpt;
pub mod config;
pub mod counters;
pub mod fleet;
pub mod ingest;
pub mod lease;
pub mod metrics;
pub mod nats;
pub mod partitioned;
pub mod rings;
pub mod server;
pub mod shared;
#[cfg(test)]
mod testnats;

use std::{
    fs::{File, OpenOptions},
    io::BufRead as _,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use log::{info, warn};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::CollectorArgs,
    detect::{Detector, DetectorState},
    model::aggregate::Now,
    ship::Batch,
    sinks::Outputs,
};
use config::CollectorConfig;
use fleet::FleetState;
use shared::{Fleet, SNAPSHOT_VERSION, Shared, Snapshot};

/// The collector's snapshot (JSON, its own format: `shared::SNAPSHOT_VERSION`).
const SNAPSHOT_FILE: &str = "state.json";
const JOURNAL: &str = "journal.jsonl";

/// Cuts a line torn by a crash (bytes after the last newline) off the end of the journal. Left
/// there, the next batch appended would continue it, and the merged line (an acknowledged
/// batch among it) would fail to parse at the next replay. Returns the bytes cut. Reads
/// backwards from the end, a block at a time (the journal may be large).
fn drop_torn_tail(path: &Path) -> std::io::Result<u64> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut f = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let mut end = len;
    let mut block = vec![0u8; 64 * 1024];
    let complete = loop {
        if end == 0 {
            break 0;
        }
        let start = end.saturating_sub(block.len() as u64);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut block[..n])?;
        if let Some(i) = block[..n].iter().rposition(|&b| b == b'\n') {
            break start + i as u64 + 1;
        }
        end = start;
    };
    let torn = len - complete;
    if torn > 0 {
        f.set_len(complete)?;
        f.sync_all()?;
    }
    Ok(torn)
}

fn open_append(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening the journal {}", path.display()))
}

/// The saved state, and the batches journaled after it; also the agents' alert events of
/// those batches, to forward again (they may not have reached the outputs' spools before a
/// crash: at least once, with the same ids).
fn restore(
    dir: &Path,
    c: &CollectorConfig,
) -> anyhow::Result<(FleetState, DetectorState, Vec<crate::sinks::Record>)> {
    let mut forward = Vec::new();
    let mut state = FleetState::default();
    let mut detector = DetectorState::default();
    let snapshot_path = dir.join(SNAPSHOT_FILE);
    match std::fs::read(&snapshot_path) {
        Ok(bytes) => {
            let s: Snapshot = serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", snapshot_path.display()))?;
            anyhow::ensure!(
                s.version == SNAPSHOT_VERSION,
                "{} has format {} (this collector reads {SNAPSHOT_VERSION})",
                snapshot_path.display(),
                s.version
            );
            state = s.fleet;
            detector = s.detector;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context(format!("reading {}", snapshot_path.display())),
    }
    state.agg.configure(
        c.clients.max_clients,
        c.clients.group_prefix_v4,
        c.clients.group_prefix_v6,
    );
    state.sketch = crate::ship::sketch::FleetSketch::new(c.sketch.clone());
    let journal = dir.join(JOURNAL);
    match drop_torn_tail(&journal) {
        Ok(0) => {}
        Ok(n) => warn!("dropped a torn journal line ({n} bytes, never acknowledged)"),
        Err(e) => return Err(e).context(format!("repairing {}", journal.display())),
    }
    if let Ok(file) = File::open(&journal) {
        let mut replayed = 0;
        let mut unreadable = 0u64;
        // Bytes, not text: one unreadable line must not stop the replay of later batches.
        for line in std::io::BufReader::new(file).split(b'\n') {
            let Ok(line) = line else { break };
            // A line torn by a crash was never acknowledged: the agent sends it again.
            if let Ok(batch) = serde_json::from_slice::<Batch>(&line) {
                forward.extend(state.apply(&batch, Now::system()).1);
            } else if let Ok(s) = serde_json::from_slice::<shared::StreamLine>(&line) {
                forward.extend(state.apply_part(&s.batch, s.positions, Now::system()).1);
                state.nats_seq = state.nats_seq.max(s.nats_seq);
            } else {
                unreadable += 1;
                continue;
            }
            replayed += 1;
        }
        if replayed > 0 {
            info!("replayed {replayed} journaled batch(es)");
        }
        if unreadable > 0 {
            // A torn last line is cut above: these were acknowledged and are lost (a journal
            // of a newer collector version, or damage).
            warn!("{unreadable} journal line(s) could not be read and were skipped");
        }
    }
    Ok((state, detector, forward))
}

/// Bytes all requests in flight may hold together: one request at the largest body and its
/// decompression bound (136 MiB with the default `max_body_bytes`), and never less than
/// 64 MiB. Agents' batches are far smaller; a refused one (503) is sent again.
pub fn inflight_budget(max_body: usize) -> usize {
    max_body
        .saturating_mul(server::DECOMPRESSION_RATIO + 1)
        .max(64 << 20)
}

pub async fn run(args: CollectorArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(p) => CollectorConfig::load(p)?,
        None => CollectorConfig::embedded()?,
    };
    let l = &config.listen;
    let tokens = ingest::Tokens::load(&l.tokens_file)?;
    let client_ca =
        (!l.client_ca_file.as_os_str().is_empty()).then_some(l.client_ca_file.as_path());
    let acceptor = server::tls_acceptor(&l.tls_cert_file, &l.tls_key_file, client_ca)?;
    let source = nats::Source::new(&config.nats)?;
    if args.check {
        return crate::stdout::outln!("collector configuration, certificates and tokens are valid");
    }
    let dir = config.state.dir.clone();
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating the state directory {}", dir.display()))?;
    if config.detect.time_scale > 1 {
        warn!(
            "clock sped up {}x for evaluation (detect.time_scale)",
            config.detect.time_scale
        );
        Now::set_scale(config.detect.time_scale);
    }
    let outputs =
        Arc::new(Outputs::start(&config.outputs, &dir).context("cannot start the outputs")?);
    let received_log = if config.state.received_log.as_os_str().is_empty() {
        None
    } else {
        Some(open_append(&config.state.received_log)?)
    };
    let (state, detector_state, replayed) = restore(&dir, &config)?;
    outputs.publish_records(&replayed);
    let host = crate::alerting::hostname();
    let detector = Detector::new(
        crate::alerting::detect_settings(&config.detect, format!("fleet@{host}"))?,
        detector_state,
    );
    let journal_path = dir.join(JOURNAL);
    let shared = Arc::new(Shared {
        fleet: Mutex::new(Fleet {
            state,
            detector,
            journal: open_append(&journal_path)?,
            journal_path,
            outputs,
            received_log,
            alerts: None,
        }),
        tokens,
        counters: Arc::default(),
        max_body: l.max_body_bytes,
        started: std::time::SystemTime::now(),
        admission: admission::Admission::new(admission::Limits::default()),
        budget: budget::Budget::new(inflight_budget(l.max_body_bytes)),
        group: std::sync::OnceLock::new(),
        merged: Arc::default(),
    });
    // The replayed batches are in the snapshot from now on.
    shared.snapshot(&dir)?;
    let listener = tokio::net::TcpListener::bind(&l.address)
        .await
        .with_context(|| format!("binding {}", l.address))?;
    info!(
        "collector listening on https://{}{}",
        listener.local_addr()?,
        if client_ca.is_some() {
            " (client certificates required)"
        } else {
            ""
        }
    );
    tokio::spawn(server::serve(listener, acceptor, shared.clone()));
    let partitioned = config.nats.partitions > 1;
    if let Some(source) = source {
        info!(
            "reading agents' batches from JetStream at {}",
            source.target()
        );
        if partitioned {
            let group = partitioned::Group::new(source, &config, shared.clone())?;
            shared.set_group(group.status());
            tokio::spawn(group.run());
        } else {
            tokio::spawn(source.run(shared.clone()));
        }
    }

    let alerts_path = crate::alerting::alerts_path(&config.detect, &dir);
    let mut detect = tokio::time::interval(Duration::from_secs(config.detect.interval_secs));
    detect.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut save = tokio::time::interval(Duration::from_secs(config.state.snapshot_interval_secs));
    save.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let notifier = crate::service::notify::Notifier::from_env();
    notifier.ready("collecting");
    let merged = shared.merged.clone();
    // A rule run due because summaries were merged, and when the last run was.
    let mut soon: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let mut last_run = tokio::time::Instant::now();
    loop {
        tokio::select! {
            // Partitions run their fleet rules where they are merged.
            _ = detect.tick(), if !partitioned => {
                run_fleet_rules(&shared, &alerts_path)?;
                last_run = tokio::time::Instant::now();
            }
            // New summaries: the rules run once the burst of batches is in, and at most once
            // a second however many agents ship (the tick still runs them on time).
            _ = merged.notified(), if !partitioned && soon.is_none() => {
                let at = (tokio::time::Instant::now() + MERGED_SETTLE).max(last_run + MERGED_MIN_GAP);
                soon = Some(Box::pin(tokio::time::sleep_until(at)));
            }
            _ = async { if let Some(s) = soon.as_mut() { s.await } }, if soon.is_some() => {
                soon = None;
                run_fleet_rules(&shared, &alerts_path)?;
                last_run = tokio::time::Instant::now();
            }
            _ = save.tick() => {
                if let Err(e) = shared.snapshot(&dir) {
                    warn!("cannot save the collector state: {e:#}");
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    notifier.stopping();
    info!("collector shutting down: saving state");
    shared.snapshot(&dir)?;
    // What the outputs hold goes to their spools for the next start.
    if let Some(group) = shared.group() {
        group.stop().await;
    }
    let mut outputs = shared.with_fleet(|f| std::mem::take(&mut f.outputs))?;
    // The partitions' states hold the outputs too, until their aborted tasks are gone.
    for _ in 0..40 {
        match Arc::try_unwrap(outputs) {
            Ok(o) => {
                o.shutdown(Duration::from_secs(2)).await;
                return Ok(());
            }
            Err(o) => outputs = o,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    warn!("the outputs were still in use at shutdown: not drained");
    Ok(())
}

/// After summaries are merged, the fleet rules wait this long for the rest of a burst of
/// batches (agents ship at the same period boundary)...
const MERGED_SETTLE: Duration = Duration::from_millis(200);
/// ...and run at most this often on merges: a large fleet ships batches all the time.
const MERGED_MIN_GAP: Duration = Duration::from_secs(1);

/// One run of the fleet rules: alert events to the outputs and the alert log.
fn run_fleet_rules(shared: &Shared, alerts_path: &std::path::Path) -> anyhow::Result<()> {
    let events = shared.with_fleet(|f| {
        let Fleet {
            state,
            detector,
            outputs,
            ..
        } = f;
        let events = state.evaluate(detector, Now::system(), crate::detect::Rings::Here);
        outputs.publish(&events);
        events
    })?;
    let lost = crate::alerting::record_alerts(alerts_path, &events);
    shared.count_alert_log_lost(lost);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch that came from JetStream is journaled with its stream sequence: a replay after
    /// a crash restores where the consumer resumes, and HTTPS batches beside it still replay.
    #[test]
    fn a_replay_restores_the_jetstream_checkpoint() {
        use crate::ship::{ShipRecord, Summary, WIRE_VERSION};
        let dir = std::env::temp_dir().join(format!("sensor-replay-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let batch = |agent: &str, seq: u64, start_s: u64| Batch {
            version: WIRE_VERSION,
            agent: agent.into(),
            stream: "ab".into(),
            records: vec![ShipRecord {
                seq,
                ..ShipRecord::summary(
                    agent,
                    Summary {
                        start_s,
                        period_s: 10,
                        clients: Vec::new(),
                        rest: Default::default(),
                        sketch: Default::default(),
                        sketch_key: String::new(),
                        elsewhere: Default::default(),
                    },
                )
            }],
        };
        let lines = [
            serde_json::json!({ "nats_seq": 7, "batch": batch("host-a", 1, 1_800_000_000) }),
            serde_json::to_value(batch("host-b", 1, 1_800_000_000)).expect("json"),
            serde_json::json!({ "nats_seq": 9, "batch": batch("host-a", 2, 1_800_000_010) }),
        ];
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(dir.join(JOURNAL), text).expect("journal");
        let c =
            CollectorConfig::parse(&format!("[state]\ndir = \"{}\"\n", dir.display()), "c.toml")
                .expect("config");
        let (state, _, _) = restore(&dir, &c).expect("restore");
        assert_eq!(state.nats_seq, 9);
        assert_eq!(state.agents["host-a"].records, 2);
        assert_eq!(state.agents["host-b"].records, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A crash mid-append leaves a torn line; the next batch must start a line of its own.
    #[test]
    fn a_torn_journal_line_is_cut_before_appending() {
        let dir = std::env::temp_dir().join(format!("sensor-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join(JOURNAL);
        std::fs::write(&path, "{\"a\":1}\n{\"b\":2}\n{\"torn\":").expect("write");
        assert_eq!(drop_torn_tail(&path).expect("repair"), 8);
        let mut f = open_append(&path).expect("open");
        std::io::Write::write_all(&mut f, b"{\"c\":3}\n").expect("append");
        drop(f);
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            ["{\"a\":1}", "{\"b\":2}", "{\"c\":3}"]
        );
        assert_eq!(drop_torn_tail(&path).expect("whole"), 0);
        // A torn batch longer than the blocks read from the end.
        let mut big = std::fs::read(&path).expect("read");
        big.extend(std::iter::repeat_n(b'x', 200_000));
        std::fs::write(&path, &big).expect("write");
        assert_eq!(drop_torn_tail(&path).expect("repair"), 200_000);
        assert_eq!(
            std::fs::read_to_string(&path)
                .expect("read")
                .lines()
                .count(),
            3
        );
        assert_eq!(drop_torn_tail(&dir.join("none")).expect("missing"), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
