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
    batch: &'a Batch,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StreamLine {
    pub(super) nats_seq: u64,
    pub(super) batch: Batch,
}

/// The merged state and what guards it.
pub struct Fleet {
    pub state: FleetState,
    pub detector: Detector,
    pub(super) journal: File,
    pub(super) journal_path: PathBuf,
    /// The SIEM outputs: fed under this lock, so forwarded alerts keep the agents' order.
    pub(super) outputs: Outputs,
    /// `[state] received_log`: one line per accepted record.
    pub(super) received_log: Option<File>,
}

pub struct Shared {
    pub(super) fleet: Mutex<Fleet>,
    pub(super) tokens: Tokens,
    pub(super) counters: Counters,
    pub(super) max_body: usize,
    pub(super) started: std::time::SystemTime,
    /// Which connections are served (per-address and unauthenticated bounds).
    pub(super) admission: std::sync::Arc<Admission>,
    /// Bytes all requests in flight may hold (bodies and decompressed batches).
    pub(super) budget: std::sync::Arc<Budget>,
}

impl Shared {
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
    pub fn accept_from_stream(&self, batch: &Batch, seq: u64) -> anyhow::Result<Applied> {
        self.journal_and_apply(batch, Some(seq))
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

    fn journal_and_apply(&self, batch: &Batch, nats_seq: Option<u64>) -> anyhow::Result<Applied> {
        let mut fleet = self.lock()?;
        let mut line = match nats_seq {
            None => serde_json::to_vec(batch),
            Some(seq) => serde_json::to_vec(&StreamLineRef {
                nats_seq: seq,
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
        let (applied, forward, accepted) = fleet.state.apply(batch, Now::system());
        if let Some(seq) = nats_seq {
            fleet.state.nats_seq = fleet.state.nats_seq.max(seq);
        }
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

    /// Writes the snapshot, then empties the journal it covers.
    pub(super) fn snapshot(&self, dir: &Path) -> anyhow::Result<()> {
        let fleet = self.lock()?;
        let encoded = serde_json::to_vec(&SnapshotRef {
            version: SNAPSHOT_VERSION,
            saved_unix_ms: Now::system().unix_ms,
            fleet: &fleet.state,
            detector: &fleet.detector.state,
        })
        .context("encoding the collector snapshot")?;
        crate::model::state::save(dir, &encoded)?;
        let path = fleet.journal_path.clone();
        fleet
            .journal
            .set_len(0)
            .with_context(|| format!("emptying {}", path.display()))?;
        Ok(())
    }
}
