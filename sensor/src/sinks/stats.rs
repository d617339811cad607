//! Per-sink counters: each running sink owns its own, the fan-out ([`super::Outputs`]) holds
//! them, and [`SinkHealth`] hands copies to whoever serves them (`/v1/health`, `/metrics`).

use std::sync::{Arc, Mutex};

use serde::Serialize;

/// Per-sink counters, served in `/v1/health` under `outputs`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OutputStats {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Where it delivers (address, URL or path).
    pub target: String,
    /// Events the receiver accepted.
    pub sent: u64,
    /// Failed delivery attempts that were retried later.
    pub retried: u64,
    /// Events appended to the spool (on disk for network outputs).
    pub spooled: u64,
    /// Events waiting in the spool now.
    pub pending: u64,
    /// Events lost: oldest dropped at the spool bound, refused by the receiver (HTTP 400), or
    /// not queued because the output's queue was full.
    pub dropped: u64,
    /// Events the receiver refused for good (part of `dropped`).
    pub rejected: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub last_sent_at: Option<String>,
}

/// One sink's counters, shared by its task (which counts) and the fan-out (which reads).
pub type SharedStats = Arc<Mutex<OutputStats>>;

pub(super) fn update(stats: &SharedStats, f: impl FnOnce(&mut OutputStats)) {
    // A poisoned lock means a panic while counting: skip the count, keep delivering.
    if let Ok(mut s) = stats.lock() {
        f(&mut s);
    }
}

pub(super) fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// The running sinks' counters, handed to the tasks that serve them (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct SinkHealth(Arc<Vec<SharedStats>>);

impl SinkHealth {
    pub(super) fn new(stats: Vec<SharedStats>) -> Self {
        Self(Arc::new(stats))
    }

    /// A copy of every running sink's counters, in configuration order (the collector last).
    pub fn stats(&self) -> Vec<OutputStats> {
        self.0
            .iter()
            .filter_map(|s| s.lock().ok().map(|s| s.clone()))
            .collect()
    }
}
