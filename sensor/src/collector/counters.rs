//! The collector's request counters: bumped by the server, read by `/v1/health` and
//! `/metrics` (its own module so the server and the metrics both import it downward).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Requests refused, by reason; served in `/v1/health`.
#[derive(Debug, Default)]
pub struct Counters {
    pub batches: AtomicU64,
    pub records: AtomicU64,
    pub duplicates: AtomicU64,
    pub unauthorized: AtomicU64,
    pub forbidden: AtomicU64,
    pub malformed: AtomicU64,
    pub too_large: AtomicU64,
    pub tls_failures: AtomicU64,
    /// Of `malformed`: summaries or alerts no real host could have sent.
    pub implausible: AtomicU64,
    /// Batches refused because the memory budget of requests in flight was spent (503).
    pub busy: AtomicU64,
    /// Alert events the alert log could not take (the outputs still got them).
    pub alert_log_lost: AtomicU64,
    /// JetStream messages merged (or refused for good).
    pub nats_messages: AtomicU64,
    /// JetStream messages delivered again after they were merged (acknowledged, skipped).
    pub nats_already_merged: AtomicU64,
    /// Consumers recreated at the checkpoint after a message arrived out of order.
    pub nats_resets: AtomicU64,
    /// Stream sequences gone from the stream (limits, age) before they were merged.
    pub nats_missing: AtomicU64,
}

#[derive(Serialize)]
pub struct CountersView {
    pub batches: u64,
    pub records: u64,
    pub duplicates: u64,
    /// Missing or unknown token (HTTP 401).
    pub unauthorized: u64,
    /// A valid token used for something its role may not do, or another agent's name (403).
    pub forbidden: u64,
    /// Batches refused as malformed (400).
    pub malformed: u64,
    /// Bodies over the bound (413).
    pub too_large: u64,
    pub tls_failures: u64,
    /// Of `malformed`: counters beyond what a host can carry in a period, alerts from the
    /// far future, non-finite numbers.
    pub implausible: u64,
    /// Refused with 503: the memory budget of requests in flight was spent.
    pub busy: u64,
    /// Alert events the alert log (alerts.jsonl) could not take.
    pub alert_log_lost: u64,
}

impl Counters {
    pub fn view(&self) -> CountersView {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CountersView {
            batches: g(&self.batches),
            records: g(&self.records),
            duplicates: g(&self.duplicates),
            unauthorized: g(&self.unauthorized),
            forbidden: g(&self.forbidden),
            malformed: g(&self.malformed),
            too_large: g(&self.too_large),
            tls_failures: g(&self.tls_failures),
            implausible: g(&self.implausible),
            busy: g(&self.busy),
            alert_log_lost: g(&self.alert_log_lost),
        }
    }
}
