//! The collector's merged state behind its lock, and its snapshot format: shared by the
//! server, the metrics and the main loop, so it sits below all three.

use std::{
    fs::File,
    io::Write as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::Context as _;
use log::warn;
use serde::{Deserialize, Serialize};

use super::{
    admission::Admission,
    budget::Budget,
    counters::Counters,
    fleet::{Applied, FleetState},
    ingest::Tokens,
};
use crate::{
    detect::{Detector, DetectorState},
    model::aggregate::Now,
    ship::Batch,
    sinks::Outputs,
};

pub(super) const SNAPSHOT_VERSION: u32 = 1;

#[derive(Serialize)]
pub(super) struct SnapshotRef<'a> {
    version: u32,
    saved_unix_ms: u64,
    fleet: &'a FleetState,
    detector: &'a DetectorState,
}

#[derive(Deserialize)]
pub(super) struct Snapshot {
    pub(super) version: u32,
    pub(super) fleet: FleetState,
    pub(super) detector: DetectorState,
}

/// A journal line of a batch that came from JetStream: the batch and its stream sequence.
#[derive(Serialize)]
struct StreamLineRef<'a> {
    nats_seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    positions: Option<(u64, u64)>,
    batch: &'a Batch,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StreamLine {
    pub(super) nats_seq: u64,
    /// A partition's part: the agent's positions its batch covers.
    #[serde(default)]
    pub(super) positions: Option<(u64, u64)>,
    pub(super) batch: Batch,
}

/// The merged state and what guards it.
pub struct Fleet {
    pub state: FleetState,
    pub detector: Detector,
    pub(super) journal: File,
    pub(super) journal_path: PathBuf,
    /// The SIEM outputs: fed under this lock, so forwarded alerts keep the agents' order.
    /// Shared by the partitions a collector merges (one set of connections and spools).
    pub(super) outputs: std::sync::Arc<Outputs>,
    /// `[state] received_log`: one line per accepted record.
    pub(super) received_log: Option<File>,
    /// A partition's state: its alert events go to the collectors' alerts stream (and its
    /// subject there), not to the outputs.
    pub(super) alerts: Option<(std::sync::Arc<super::alerts::AlertStream>, String)>,
}

/// Alert events a collector may hold unacknowledged by the alerts stream before its
/// partitions stop merging (a few KiB each).
pub(super) const MAX_ALERT_BACKLOG: u64 = 10_000;

impl Fleet {
    /// Forwards alert events: to the outputs, or for a partition to the alerts stream.
    pub(super) fn forward(&self, records: &[crate::sinks::Record], source: super::alerts::Source) {
        match &self.alerts {
            Some((stream, subject)) => stream.publish(subject, source, records),
            None => self.outputs.publish_records(records),
        }
    }
}

pub struct Shared {
    pub(super) fleet: Mutex<Fleet>,
    pub(super) tokens: Tokens,
    /// Shared with the partitions' states, so health and metrics count them all.
    pub(super) counters: std::sync::Arc<Counters>,
    pub(super) max_body: usize,
    pub(super) started: std::time::SystemTime,
    /// Which connections are served (per-address and unauthenticated bounds).
    pub(super) admission: std::sync::Arc<Admission>,
    /// Bytes all requests in flight may hold (bodies and decompressed batches).
    pub(super) budget: std::sync::Arc<Budget>,
    /// Several collectors sharing partitions: what this one holds (set once at start).
    pub(super) group: std::sync::OnceLock<std::sync::Arc<super::partitioned::Status>>,
    /// Signalled when a batch merged summaries: the fleet rules run soon after, instead of
    /// at their next tick (a fleet alert waits for the agents' 10-second period already).
    pub(super) merged: std::sync::Arc<tokio::sync::Notify>,
}

impl Shared {
    pub(super) fn set_group(&self, status: std::sync::Arc<super::partitioned::Status>) {
        let _ = self.group.set(status);
    }

    pub(super) fn group(&self) -> Option<&std::sync::Arc<super::partitioned::Status>> {
        self.group.get()
    }

    /// The merged state of one partition this collector holds, beside the others: it
    /// shares this (front) state's counters, budget, outputs and received log; its journal
    /// starts empty (the checkpoint it was loaded from is the authority).
    pub(super) fn partition(
        &self,
        state: FleetState,
        detector: Detector,
        journal_path: PathBuf,
        alerts: (std::sync::Arc<super::alerts::AlertStream>, String),
    ) -> anyhow::Result<Self> {
        let (outputs, received_log) = self.with_fleet(|f| {
            (
                f.outputs.clone(),
                f.received_log.as_ref().and_then(|l| l.try_clone().ok()),
            )
        })?;
        if let Some(dir) = journal_path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&journal_path, b"")
            .with_context(|| format!("emptying {}", journal_path.display()))?;
        let journal = std::fs::OpenOptions::new()
            .append(true)
            .open(&journal_path)
            .with_context(|| format!("opening the journal {}", journal_path.display()))?;
        Ok(Self {
            fleet: Mutex::new(Fleet {
                state,
                detector,
                journal,
                journal_path,
                outputs,
                received_log,
                alerts: Some(alerts),
            }),
            tokens: Tokens::default(),
            counters: self.counters.clone(),
            max_body: self.max_body,
            started: self.started,
            admission: self.admission.clone(),
            budget: self.budget.clone(),
            group: std::sync::OnceLock::new(),
            merged: std::sync::Arc::default(),
        })
    }

    /// For a partition's state: waits while its alerts stream is far behind (see
    /// [`super::alerts::AlertStream::room`]).
    pub(super) async fn alert_room(&self) {
        let stream = self
            .lock()
            .ok()
            .and_then(|f| f.alerts.as_ref().map(|(s, _)| s.clone()));
        if let Some(stream) = stream {
            stream.room(MAX_ALERT_BACKLOG).await;
        }
    }

    fn lock(&self) -> anyhow::Result<std::sync::MutexGuard<'_, Fleet>> {
        self.fleet
            .lock()
            .map_err(|_| anyhow::anyhow!("collector state poisoned"))
    }

    /// Counts alert events the alert log could not take.
    pub fn count_alert_log_lost(&self, lost: u64) {
        self.counters
            .alert_log_lost
            .fetch_add(lost, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn with_fleet<T>(&self, f: impl FnOnce(&mut Fleet) -> T) -> anyhow::Result<T> {
        Ok(f(&mut *self.lock()?))
    }

    /// Journals the batch, merges it, forwards its alerts; the answer to the agent follows.
    pub fn accept(&self, batch: &Batch) -> anyhow::Result<Applied> {
        self.journal_and_apply(batch, None)
    }

    /// As [`Shared::accept`], for the JetStream message at stream sequence `seq`: the
    /// journal line carries the sequence, so a replay restores where the consumer resumes.
    pub fn accept_from_stream(
        &self,
        batch: &Batch,
        seq: u64,
        positions: Option<(u64, u64)>,
    ) -> anyhow::Result<Applied> {
        self.journal_and_apply(batch, Some((seq, positions)))
    }

    /// The stream sequence of the last JetStream message merged (0: none).
    pub fn nats_seq(&self) -> anyhow::Result<u64> {
        Ok(self.lock()?.state.nats_seq)
    }

    /// Moves past a JetStream message refused for good (not journaled: after a crash it is
    /// read and refused again).
    pub fn skip_stream_message(&self, seq: u64) -> anyhow::Result<()> {
        let mut fleet = self.lock()?;
        fleet.state.nats_seq = fleet.state.nats_seq.max(seq);
        Ok(())
    }

    fn journal_and_apply(
        &self,
        batch: &Batch,
        stream: Option<(u64, Option<(u64, u64)>)>,
    ) -> anyhow::Result<Applied> {
        let mut fleet = self.lock()?;
        let nats_seq = stream.map(|(seq, _)| seq);
        let positions = stream.and_then(|(_, p)| p);
        let mut line = match stream {
            None => serde_json::to_vec(batch),
            Some((seq, positions)) => serde_json::to_vec(&StreamLineRef {
                nats_seq: seq,
                positions,
                batch,
            }),
        }
        .context("encoding the journal line")?;
        line.push(b'\n');
        let path = fleet.journal_path.clone();
        let before = fleet
            .journal
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        if let Err(e) = fleet
            .journal
            .write_all(&line)
            .and_then(|()| fleet.journal.sync_data())
        {
            // The batch is refused (the agent sends it again); a partial line left behind
            // would merge with the next batch and both would be lost at replay.
            let _ = fleet.journal.set_len(before);
            return Err(e).with_context(|| format!("appending to {}", path.display()));
        }
        let (applied, forward, accepted) = fleet.state.apply_part(batch, positions, Now::system());
        if accepted
            .iter()
            .any(|rec| matches!(rec.payload, crate::ship::Payload::Summary(_)))
        {
            // One stored permit however many batches: the rule run takes them all.
            self.merged.notify_one();
        }
        if let Some(seq) = nats_seq {
            fleet.state.nats_seq = fleet.state.nats_seq.max(seq);
        }
        fleet.forward(&forward, super::alerts::Source::Agent);
        if let Some(log) = fleet.received_log.as_mut() {
            let mut lines = String::new();
            for rec in accepted {
                let line = serde_json::json!({
                    "agent": batch.agent,
                    "stream": batch.stream,
                    "seq": rec.seq,
                    "id": rec.id,
                    "kind": match rec.payload {
                        crate::ship::Payload::Alert { .. } => "alert",
                        crate::ship::Payload::Summary(_) => "summary",
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

    pub(super) fn health(&self) -> anyhow::Result<serde_json::Result<String>> {
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
                    last_batch: crate::sinks::rfc3339_ms(a.last_batch_ms),
                    last_summary_start: crate::sinks::rfc3339_ms(a.last_summary_s * 1000),
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
                "connections": {
                    "refused": self.admission.refused.load(std::sync::atomic::Ordering::Relaxed),
                    "evicted": self.admission.evicted.load(std::sync::atomic::Ordering::Relaxed),
                },
                "memory_budget": {
                    "capacity_bytes": self.budget.capacity(),
                    "used_bytes": self.budget.used(),
                },
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
                "partitions": self.group().map(|g| g.health()),
                "nats": {
                    "stream_seq": f.state.nats_seq,
                    "messages": self.counters.nats_messages.load(std::sync::atomic::Ordering::Relaxed),
                    "already_merged": self.counters.nats_already_merged.load(std::sync::atomic::Ordering::Relaxed),
                    "consumer_resets": self.counters.nats_resets.load(std::sync::atomic::Ordering::Relaxed),
                    "missing": self.counters.nats_missing.load(std::sync::atomic::Ordering::Relaxed),
                },
                "outputs": f.outputs.stats(),
            }))
        })
    }

    /// The snapshot of the merged state, the stream sequence it covers and how many alert
    /// events had been queued for the alerts stream by then; the journal is emptied (the
    /// caller keeps the snapshot before anything else is merged).
    pub(super) fn checkpoint(&self) -> anyhow::Result<(Vec<u8>, u64, u64)> {
        let fleet = self.lock()?;
        let encoded = Self::encode(&fleet)?;
        let path = fleet.journal_path.clone();
        fleet
            .journal
            .set_len(0)
            .with_context(|| format!("emptying {}", path.display()))?;
        let queued = fleet.alerts.as_ref().map_or(0, |(a, _)| a.queued());
        Ok((encoded, fleet.state.nats_seq, queued))
    }

    fn encode(fleet: &Fleet) -> anyhow::Result<Vec<u8>> {
        serde_json::to_vec(&SnapshotRef {
            version: SNAPSHOT_VERSION,
            saved_unix_ms: Now::system().unix_ms,
            fleet: &fleet.state,
            detector: &fleet.detector.state,
        })
        .context("encoding the collector snapshot")
    }

    /// Writes the snapshot, then empties the journal it covers.
    pub(super) fn snapshot(&self, dir: &Path) -> anyhow::Result<()> {
        let fleet = self.lock()?;
        let encoded = Self::encode(&fleet)?;
        crate::model::state::save(dir, super::SNAPSHOT_FILE, &encoded)?;
        let path = fleet.journal_path.clone();
        fleet
            .journal
            .set_len(0)
            .with_context(|| format!("emptying {}", path.display()))?;
        Ok(())
    }
}
