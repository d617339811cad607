//! Detection as the agent and the collector both run it: the detector's settings from
//! `[detect]`, the host name alerts carry, and the alert log. Kept below both so neither
//! imports the other.

use std::path::{Path, PathBuf};

use log::{info, warn};

use crate::{
    config,
    detect::{self, AlertEvent, EventKind, Mode},
    sinks::file::sink::RotatingFile,
};

/// Detection settings from the config (validated at load).
pub fn detect_settings(d: &config::Detect, host: String) -> anyhow::Result<detect::Settings> {
    let rules = d
        .rules
        .iter()
        .map(detect::Rule::from_config)
        .collect::<Result<Vec<_>, _>>()?;
    let allow_networks = d
        .allow_addresses
        .iter()
        .map(|a| a.parse())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(detect::Settings {
        rules,
        allow_networks,
        allow_identities: d.allow_identities.iter().cloned().collect(),
        resolve_after_ms: d.resolve_after_secs * 1000,
        suppress_ms: d.suppress_secs * 1000,
        baseline_min_minutes: d.baseline_min_minutes,
        host,
        signals: d.signals.clone(),
    })
}

/// The host name alerts and shipped summaries are attributed to.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// The alert log: `[detect] alerts_file`, else `alerts.jsonl` in the state directory.
pub fn alerts_path(d: &config::Detect, state_dir: &Path) -> PathBuf {
    if d.alerts_file.as_os_str().is_empty() {
        state_dir.join("alerts.jsonl")
    } else {
        d.alerts_file.clone()
    }
}

/// The alert log is rotated past this size (`PATH.1` ... `PATH.4`, the oldest dropped), so a
/// flapping rule or a hostile peer's flood of alerts cannot fill the state directory's disk.
pub const ALERT_LOG_MAX_BYTES: u64 = 64 * 1024 * 1024;
pub const ALERT_LOG_KEEP: usize = 4;

/// Logs alert changes and appends them to the JSON lines file (rotated as the file sink's
/// files are). Returns how many events could not be written (counted by the caller).
pub fn record_alerts(path: &Path, events: &[AlertEvent]) -> u64 {
    record_alerts_bounded(path, events, ALERT_LOG_MAX_BYTES)
}

/// Events of one batch that get a line of their own in the agent's log; the rest are
/// summed up in one line (they are all in the alert log). An evaluation can open thousands
/// at once (a ring of clients, each its own alert): a line each flooded the journal.
const LOGGED_PER_BATCH: usize = 20;

fn record_alerts_bounded(path: &Path, events: &[AlertEvent], max_bytes: u64) -> u64 {
    let mut file = RotatingFile::new(path, max_bytes, ALERT_LOG_KEEP);
    let mut lost = 0;
    let mut logged = 0;
    for e in events {
        let a = &e.alert;
        if e.event != EventKind::Update && logged < LOGGED_PER_BATCH {
            logged += 1;
            let what = if a.mode == Mode::Log {
                "log-only match"
            } else {
                "alert"
            };
            info!(
                "{what} {} {}: {} {} {} ({}) [{}]",
                e.event, a.rule_id, a.key_kind, a.key, a.rule_name, a.severity, a.id
            );
        }
        let written = serde_json::to_string(e)
            .map_err(|e| e.to_string())
            .and_then(|line| file.write_line(&line).map_err(|e| e.to_string()));
        if let Err(err) = written {
            if lost == 0 {
                warn!("cannot append alerts to {}: {err}", path.display());
            }
            lost += 1;
        }
    }
    let unlogged = events
        .iter()
        .filter(|e| e.event != EventKind::Update)
        .count()
        - logged;
    if unlogged > 0 {
        info!(
            "{unlogged} more alert events in this evaluation: see {}",
            path.display()
        );
    }
    lost
}

/// Most alert events waiting for the alert log's writer; a batch that would pass it is
/// counted lost (`alert_log_lost`) instead of queued: a disk that stalls must not grow the
/// agent without bound (an event is a few KB).
const QUEUED_EVENTS_MAX: usize = 100_000;

/// The agent's alert log, written on a thread of its own. An evaluation that opens
/// thousands of alerts at once (a ring of clients) took a JSON line and a write for each on
/// the agent's loop: ~0.4 s with 20 000, long enough for the request ring to overflow
/// under 10 000 requests/s (`request_events_dropped`, measured by the bench). The loop now
/// hands each evaluation's events over and goes on; the writer keeps their order.
pub struct AlertLog {
    tx: Option<std::sync::mpsc::SyncSender<(PathBuf, Vec<AlertEvent>)>>,
    writer: Option<std::thread::JoinHandle<()>>,
    queued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    lost: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl AlertLog {
    /// Starts the writer; `queued` counts the events on their way (the agent's health).
    pub fn start(queued: std::sync::Arc<std::sync::atomic::AtomicUsize>) -> std::io::Result<Self> {
        use std::sync::{Arc, atomic::Ordering};
        // Batches, not events: the events bound is `QUEUED_EVENTS_MAX`.
        let (tx, rx) = std::sync::mpsc::sync_channel::<(PathBuf, Vec<AlertEvent>)>(1024);
        let lost = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (q, l) = (queued.clone(), lost.clone());
        let writer = std::thread::Builder::new()
            .name("alert-log".into())
            .spawn(move || {
                for (path, events) in rx {
                    let n = record_alerts(&path, &events);
                    l.fetch_add(n, Ordering::Relaxed);
                    q.fetch_sub(events.len(), Ordering::Relaxed);
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            writer: Some(writer),
            queued,
            lost,
        })
    }

    /// Counts `n` events as on their way, before `record` hands them over: called where the
    /// events are made, so that no reader sees their effect while the count misses them.
    pub fn reserve(&self, n: usize) {
        self.queued
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Hands one evaluation's events (reserved) to the writer, for `path`; counts them lost
    /// when the queue is full.
    pub fn record(&self, path: PathBuf, events: Vec<AlertEvent>) {
        use std::sync::atomic::Ordering;
        let n = events.len();
        if n == 0 {
            return;
        }
        let room = has_room(self.queued.load(Ordering::Relaxed), n);
        let refused = match self.tx.as_ref() {
            Some(tx) if room => match tx.try_send((path, events)) {
                Ok(()) => None,
                Err(
                    std::sync::mpsc::TrySendError::Full((path, _))
                    | std::sync::mpsc::TrySendError::Disconnected((path, _)),
                ) => Some(path),
            },
            _ => Some(path),
        };
        if let Some(path) = refused {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            warn!(
                "the alert log's writer is behind: {n} alert events not written to {}",
                path.display()
            );
            self.lost.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Events not written so far (a full queue, or a failed write).
    pub fn lost(&self) -> u64 {
        self.lost.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Whether a batch of `n` events fits the writer's queue, which holds `queued` events counting
/// them: under the bound, or alone (an evaluation's events are never refused by an idle
/// writer, however many).
fn has_room(queued: usize, n: usize) -> bool {
    queued <= QUEUED_EVENTS_MAX || queued == n
}

impl Drop for AlertLog {
    /// Writes what is queued before the agent stops.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(w) = self.writer.take()
            && w.join().is_err()
        {
            warn!("the alert log's writer panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alert_log_rotates_and_keeps_every_event() {
        let dir = std::env::temp_dir().join(format!("sensor-alertlog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("alerts.jsonl");
        let event = AlertEvent {
            event: EventKind::Open,
            alert: crate::sinks::tests::alert("address", "10.1.2.3").into(),
        };
        let line = serde_json::to_string(&event).expect("json").len() as u64 + 1;
        // Three events per file: ten events fill the file and three rotated ones.
        for _ in 0..10 {
            assert_eq!(
                record_alerts_bounded(&path, std::slice::from_ref(&event), 3 * line),
                0
            );
        }
        let lines = |p: &Path| std::fs::read_to_string(p).map_or(0, |t| t.lines().count());
        let rotated = |n: usize| PathBuf::from(format!("{}.{n}", path.display()));
        assert_eq!(lines(&path), 1);
        assert_eq!(
            (lines(&rotated(1)), lines(&rotated(2)), lines(&rotated(3))),
            (3, 3, 3)
        );
        assert!(!rotated(5).exists());
        // An unwritable log loses events, and says how many.
        let blocked = dir.join("not-a-dir");
        std::fs::write(&blocked, "").expect("file");
        assert_eq!(
            record_alerts(&blocked.join("a.jsonl"), &[event.clone(), event]),
            2
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The writer thread keeps every event, in order; the queued count goes back to 0 once they
    /// are written, and events for an unwritable path are lost and counted; a batch past the
    /// queue's bound is refused only behind other events.
    #[test]
    fn the_alert_log_writer_keeps_order_and_counts_what_it_loses() {
        use std::sync::{Arc, atomic::Ordering};
        let dir = std::env::temp_dir().join(format!("sensor-alertwriter-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("alerts.jsonl");
        let event = |key: &str| AlertEvent {
            event: EventKind::Open,
            alert: crate::sinks::tests::alert("address", key).into(),
        };
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let log = AlertLog::start(queued.clone()).expect("writer");
        for batch in 0..50 {
            let events: Vec<AlertEvent> = (0..20)
                .map(|i| event(&format!("10.0.{batch}.{i}")))
                .collect();
            log.reserve(events.len());
            log.record(path.clone(), events);
        }
        let blocked = dir.join("not-a-dir");
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(&blocked, "").expect("file");
        log.reserve(3);
        log.record(
            blocked.join("a.jsonl"),
            vec![event("a"), event("b"), event("c")],
        );
        let lost = {
            let log = log;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while queued.load(Ordering::Relaxed) != 0 {
                assert!(std::time::Instant::now() < deadline, "writer stuck");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            log.lost()
        };
        assert_eq!(lost, 3);
        // A batch past the bound waits only behind other events.
        assert!(has_room(QUEUED_EVENTS_MAX, 10));
        assert!(has_room(QUEUED_EVENTS_MAX + 10, QUEUED_EVENTS_MAX + 10));
        assert!(!has_room(QUEUED_EVENTS_MAX + 1, 10));
        let keys: Vec<String> = std::fs::read_to_string(&path)
            .expect("log")
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("line");
                v["alert"]["key"].as_str().expect("key").to_owned()
            })
            .collect();
        let want: Vec<String> = (0..50)
            .flat_map(|b| (0..20).map(move |i| format!("10.0.{b}.{i}")))
            .collect();
        assert_eq!(keys, want);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
