//! `sensor collector`: receives agents' batches over HTTPS, merges every client's counters
//! across hosts, runs fleet rules with the agent's rule engine, forwards fleet alerts and the
//! agents' alerts to SIEM outputs, and serves the fleet-wide per-client view.
//!
//! Durability: a batch is appended to a journal (fsync) before it is acknowledged; the merged
//! state is snapshotted periodically and the journal then emptied. A restart loads the
//! snapshot and replays the journal, and the per-agent stream positions make the replay (and
//! any retry) count each record once.

pub mod bench;
pub mod config;
pub mod counters;
pub mod fleet;
pub mod ingest;
pub mod metrics;
pub mod server;

use std::{
    fs::{File, OpenOptions},
    io::{BufRead as _, Write as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use log::{info, warn};
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    aggregate::Now,
    detect::{Detector, DetectorState},
    outputs::Outputs,
    wire::Batch,
};
use config::CollectorConfig;
use fleet::{Applied, FleetState};

/// Command line of `sensor collector`.
#[derive(Debug, clap::Args)]
pub struct CollectorArgs {
    /// Configuration file (TOML); without it the embedded defaults apply.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Check the configuration, certificates and tokens, then exit.
    #[arg(long)]
    pub check: bool,
}

const SNAPSHOT_VERSION: u32 = 1;
const JOURNAL: &str = "journal.jsonl";

#[derive(Serialize)]
struct SnapshotRef<'a> {
    version: u32,
    saved_unix_ms: u64,
    fleet: &'a FleetState,
    detector: &'a DetectorState,
}

#[derive(Deserialize)]
struct Snapshot {
    version: u32,
    fleet: FleetState,
    detector: DetectorState,
}

/// The merged state and what guards it.
pub struct Fleet {
    pub state: FleetState,
    pub detector: Detector,
    journal: File,
    journal_path: PathBuf,
    /// The SIEM outputs: fed under this lock, so forwarded alerts keep the agents' order.
    outputs: Outputs,
    /// `[state] received_log`: one line per accepted record.
    received_log: Option<File>,
}

pub struct Shared {
    fleet: Mutex<Fleet>,
    tokens: ingest::Tokens,
    counters: counters::Counters,
    max_body: usize,
    started: std::time::SystemTime,
}

impl Shared {
    fn lock(&self) -> anyhow::Result<std::sync::MutexGuard<'_, Fleet>> {
        self.fleet
            .lock()
            .map_err(|_| anyhow::anyhow!("collector state poisoned"))
    }

    pub fn with_fleet<T>(&self, f: impl FnOnce(&mut Fleet) -> T) -> anyhow::Result<T> {
        Ok(f(&mut *self.lock()?))
    }

    /// Journals the batch, merges it, forwards its alerts; the answer to the agent follows.
    pub fn accept(&self, batch: &Batch) -> anyhow::Result<Applied> {
        let mut fleet = self.lock()?;
        let mut line = serde_json::to_vec(batch).context("encoding the journal line")?;
        line.push(b'\n');
        let path = fleet.journal_path.clone();
        fleet
            .journal
            .write_all(&line)
            .and_then(|()| fleet.journal.sync_data())
            .with_context(|| format!("appending to {}", path.display()))?;
        let (applied, forward, accepted) = fleet.state.apply(batch, Now::system());
        fleet.outputs.publish_records(&forward);
        if let Some(log) = fleet.received_log.as_mut() {
            let mut lines = String::new();
            for rec in accepted {
                let line = serde_json::json!({
                    "agent": batch.agent,
                    "stream": batch.stream,
                    "seq": rec.seq,
                    "id": rec.id,
                    "kind": match rec.payload {
                        crate::wire::Payload::Alert { .. } => "alert",
                        crate::wire::Payload::Summary(_) => "summary",
                    },
                });
                lines.push_str(&line.to_string());
                lines.push('\n');
            }
            if let Err(e) = log.write_all(lines.as_bytes()) {
                warn!("cannot append to the received log: {e}");
            }
        }
        Ok(applied)
    }

    fn health(&self) -> anyhow::Result<serde_json::Result<String>> {
        #[derive(Serialize)]
        struct AgentView<'a> {
            name: &'a str,
            last_batch: String,
            last_summary_start: String,
            streams: usize,
            records: u64,
            summaries: u64,
            alerts: u64,
            duplicates: u64,
            gaps: u64,
        }
        let counters = self.counters.view();
        self.with_fleet(|f| {
            let agents: Vec<AgentView<'_>> = f
                .state
                .agents
                .iter()
                .map(|(name, a)| AgentView {
                    name,
                    last_batch: crate::outputs::rfc3339_ms(a.last_batch_ms),
                    last_summary_start: crate::outputs::rfc3339_ms(a.last_summary_s * 1000),
                    streams: a.streams.len(),
                    records: a.records,
                    summaries: a.summaries,
                    alerts: a.alerts,
                    duplicates: a.duplicates,
                    gaps: a.gaps,
                })
                .collect();
            let agg = &f.state.agg;
            serde_json::to_string(&serde_json::json!({
                "status": "ok",
                "role": "collector",
                "started": humantime::format_rfc3339_millis(self.started).to_string(),
                "clock_ms": Now::system().unix_ms,
                "time_scale": Now::scale(),
                "ingest": counters,
                "agents": agents,
                "clients": {
                    "tracked_addresses": agg.addresses.clients.len(),
                    "tracked_groups": agg.groups.clients.len(),
                    "tracked_identities": agg.identities.clients.len(),
                    "folded_addresses": agg.addresses.folded.clients,
                    "total_requests": agg.addresses.grand_total().requests,
                    "total_bytes_in": agg.addresses.grand_total().bytes_in,
                    "total_bytes_out": agg.addresses.grand_total().bytes_out,
                },
                "detect": f.detector.state.counters,
                "outputs": crate::outputs::health(),
            }))
        })
    }

    /// Writes the snapshot, then empties the journal it covers.
    fn snapshot(&self, dir: &Path) -> anyhow::Result<()> {
        let fleet = self.lock()?;
        let encoded = serde_json::to_vec(&SnapshotRef {
            version: SNAPSHOT_VERSION,
            saved_unix_ms: Now::system().unix_ms,
            fleet: &fleet.state,
            detector: &fleet.detector.state,
        })
        .context("encoding the collector snapshot")?;
        crate::state::save(dir, &encoded)?;
        let path = fleet.journal_path.clone();
        fleet
            .journal
            .set_len(0)
            .with_context(|| format!("emptying {}", path.display()))?;
        Ok(())
    }
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
) -> anyhow::Result<(FleetState, DetectorState, Vec<crate::outputs::Record>)> {
    let mut forward = Vec::new();
    let mut state = FleetState::default();
    let mut detector = DetectorState::default();
    let snapshot_path = dir.join("state.json");
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
    let journal = dir.join(JOURNAL);
    if let Ok(file) = File::open(&journal) {
        let mut replayed = 0;
        for line in std::io::BufReader::new(file).lines() {
            let Ok(line) = line else { break };
            // A line torn by a crash was never acknowledged: the agent sends it again.
            let Ok(batch) = serde_json::from_str::<Batch>(&line) else {
                continue;
            };
            forward.extend(state.apply(&batch, Now::system()).1);
            replayed += 1;
        }
        if replayed > 0 {
            info!("replayed {replayed} journaled batch(es)");
        }
    }
    Ok((state, detector, forward))
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
    let outputs = Outputs::start(&config.outputs, &dir).context("cannot start the outputs")?;
    outputs.register();
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
        }),
        tokens,
        counters: counters::Counters::default(),
        max_body: l.max_body_bytes,
        started: std::time::SystemTime::now(),
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

    let alerts_path = crate::alerting::alerts_path(&config.detect, &dir);
    let mut detect = tokio::time::interval(Duration::from_secs(config.detect.interval_secs));
    detect.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut save = tokio::time::interval(Duration::from_secs(config.state.snapshot_interval_secs));
    save.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let notifier = crate::service::notify::Notifier::from_env();
    notifier.ready("collecting");
    loop {
        tokio::select! {
            _ = detect.tick() => {
                let events = shared.with_fleet(|f| {
                    let Fleet { state, detector, outputs, .. } = f;
                    let events = state.evaluate(detector, Now::system());
                    outputs.publish(&events);
                    events
                })?;
                crate::alerting::record_alerts(&alerts_path, &events);
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
    let outputs = shared.with_fleet(|f| std::mem::take(&mut f.outputs))?;
    outputs.shutdown(Duration::from_secs(2)).await;
    Ok(())
}
