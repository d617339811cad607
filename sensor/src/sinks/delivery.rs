//! What every output shares: the [`Output`] trait, its counters, and the task that spools
//! and delivers with retries.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use log::warn;
use serde::Serialize;
use tokio::sync::mpsc;

use super::{error::OutputError, spool};

/// What one delivery attempt achieved: the first `sent` records of the batch arrived, the
/// `rejected` after them were refused for good (dropped and counted); with `error`, the rest
/// is retried after a backoff.
#[derive(Debug, Default)]
pub struct Delivery {
    pub sent: usize,
    pub rejected: usize,
    pub error: Option<OutputError>,
    /// The receiver asked to wait at least this long (HTTP Retry-After).
    pub retry_after: Option<Duration>,
}

impl Delivery {
    pub fn all(n: usize) -> Self {
        Self {
            sent: n,
            ..Self::default()
        }
    }

    pub fn failed(sent: usize, error: OutputError) -> Self {
        Self {
            sent,
            error: Some(error),
            ..Self::default()
        }
    }
}

/// A transport: delivers batches of records, in order.
pub trait Output: Send + 'static {
    /// What it delivers: alert events ([`Record`]) for SIEM outputs.
    type Item: spool::Spooled;
    /// Records per delivery attempt.
    fn batch_max(&self) -> usize {
        1
    }
    fn deliver<'a>(
        &'a mut self,
        batch: &'a [Self::Item],
    ) -> impl Future<Output = Delivery> + Send + 'a;
}

// --- counters -----------------------------------------------------------------------------

/// Per-output counters, served in `/v1/health` under `outputs`.
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

pub type SharedStats = Arc<Mutex<OutputStats>>;

pub(super) fn update(stats: &SharedStats, f: impl FnOnce(&mut OutputStats)) {
    if let Ok(mut s) = stats.lock() {
        f(&mut s);
    }
}

pub(super) fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Backoff after `failures` consecutive failures: 1 s, 2 s, 4 s ... up to `max`.
pub fn backoff(failures: u32, max: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    Duration::from_millis(1000u64.saturating_mul(1 << exp)).min(max)
}

/// One output's task: spool what arrives, deliver in order, retry with backoff.
pub async fn worker<O: Output>(
    mut out: O,
    mut spool: spool::Spool<O::Item>,
    mut rx: mpsc::Receiver<O::Item>,
    stats: SharedStats,
    retry_max: Duration,
) {
    let name = stats.lock().map(|s| s.name.clone()).unwrap_or_default();
    let mut failures: u32 = 0;
    let mut next_attempt = tokio::time::Instant::now();
    let mut closed = false;
    update(&stats, |s| s.pending = spool.len() as u64);
    loop {
        // Take in everything queued, without waiting.
        loop {
            match rx.try_recv() {
                Ok(rec) => append(&mut spool, rec, &stats, &name),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if spool.is_empty() {
            if closed {
                return;
            }
            match rx.recv().await {
                Some(rec) => append(&mut spool, rec, &stats, &name),
                None => closed = true,
            }
            continue;
        }
        if tokio::time::Instant::now() < next_attempt {
            if closed {
                // Shutting down while the receiver is away: the spool keeps the rest.
                return;
            }
            tokio::select! {
                rec = rx.recv() => match rec {
                    Some(rec) => append(&mut spool, rec, &stats, &name),
                    None => closed = true,
                },
                _ = tokio::time::sleep_until(next_attempt) => {}
            }
            continue;
        }
        let batch = spool.peek(out.batch_max().max(1));
        let d = out.deliver(&batch).await;
        let done = (d.sent + d.rejected).min(batch.len());
        if done > 0
            && let Err(e) = spool.ack(spool::Spooled::seq(&batch[done - 1]))
        {
            warn!("output `{name}`: cannot record delivery in the spool: {e}");
        }
        update(&stats, |s| {
            s.sent += d.sent as u64;
            s.rejected += d.rejected as u64;
            s.dropped += d.rejected as u64;
            s.pending = spool.len() as u64;
            if d.sent > 0 {
                s.last_sent_at = Some(now_rfc3339());
            }
        });
        match d.error {
            None if done == 0 => {
                // Nothing done and no error: a misbehaving output; do not spin.
                failures += 1;
                next_attempt = tokio::time::Instant::now() + backoff(failures, retry_max);
            }
            None => failures = 0,
            Some(e) => {
                failures += 1;
                let wait = backoff(failures, retry_max).max(d.retry_after.unwrap_or_default());
                next_attempt = tokio::time::Instant::now() + wait;
                let msg = e.to_string();
                if failures == 1 || failures.is_power_of_two() {
                    warn!(
                        "output `{name}`: delivery failed ({msg}); {} event(s) spooled, retrying in {:?}",
                        spool.len(),
                        wait
                    );
                }
                update(&stats, |s| {
                    s.retried += 1;
                    s.last_error = Some(msg);
                    s.last_error_at = Some(now_rfc3339());
                });
            }
        }
    }
}

pub(super) fn append<T: spool::Spooled>(
    spool: &mut spool::Spool<T>,
    rec: T,
    stats: &SharedStats,
    name: &str,
) {
    match spool.append(rec) {
        Ok(dropped) => update(stats, |s| {
            s.spooled += 1;
            s.dropped += dropped;
            s.pending = spool.len() as u64;
        }),
        Err(e) => {
            warn!("output `{name}`: cannot spool an event: {e}");
            update(stats, |s| {
                s.dropped += 1;
                s.last_error = Some(format!("spool: {e}"));
                s.last_error_at = Some(now_rfc3339());
            });
        }
    }
}
