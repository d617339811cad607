//! The delivery engine, generic over [`Sink`]: the fan-out appends to each sink's spool
//! ([`Queue`]), and one task per sink delivers from the spool in order, retrying failures with
//! backoff ([`Retry`]) and counting everything in the sink's [`OutputStats`].

use std::sync::{
    Arc, Mutex, MutexGuard,
    atomic::{AtomicBool, Ordering},
};

use log::warn;
use tokio::sync::Notify;

use super::{
    retry::Retry,
    sink::Sink,
    spool::{Spool, Spooled},
    stats::{OutputStats, SharedStats, now_rfc3339, update},
};

/// A sink's spool, shared by the fan-out and the sink's task. The fan-out appends on the
/// caller's thread, so an event is in the spool (on disk, synced, for network sinks) before
/// `push` returns: a snapshot the agent saves afterwards never records an alert or a shipped
/// period that a crash could still lose. No in-memory queue stands before the spool.
pub struct Queue<T> {
    spool: Mutex<Spool<T>>,
    wake: Notify,
    closed: AtomicBool,
    stats: SharedStats,
}

impl<T: Spooled> Queue<T> {
    pub fn new(spool: Spool<T>, stats: SharedStats) -> Arc<Self> {
        update(&stats, |s| s.pending = spool.len() as u64);
        Arc::new(Self {
            spool: Mutex::new(spool),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            stats,
        })
    }

    fn spool(&self) -> MutexGuard<'_, Spool<T>> {
        // A panic while holding the spool leaves it consistent (every change is one call).
        self.spool
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends `item` to the spool; see [`Queue::push_all`].
    #[cfg(test)]
    pub fn push(&self, item: T) -> Result<(), String> {
        self.push_all(vec![item]).map_err(|(_, e)| e)
    }

    /// Appends `items` to the spool with one sync (counted as spooled, and the oldest dropped
    /// to stay within the bound counted as dropped) and wakes the task. `Err`: how many could
    /// not be spooled, and why (the caller counts them as dropped).
    pub fn push_all(&self, items: Vec<T>) -> Result<(), (usize, String)> {
        if items.is_empty() {
            return Ok(());
        }
        let n = items.len();
        let mut spool = self.spool();
        let appended = spool.append_all(items);
        let pending = spool.len() as u64;
        // The stats are updated while the spool is still held (lock order: spool, then stats):
        // released first, the sink's task could ack and publish `pending = 0` in between, and
        // this stale length would then stay in the stats of an empty spool.
        let result = match appended {
            Ok(dropped) => {
                update(&self.stats, |s| {
                    s.spooled += n as u64;
                    s.dropped += dropped;
                    s.pending = pending;
                });
                Ok(())
            }
            Err((done, e)) => {
                let msg = format!("spool: {e}");
                update(&self.stats, |s: &mut OutputStats| {
                    s.spooled += done as u64;
                    s.pending = pending;
                    s.last_error = Some(msg.clone());
                    s.last_error_at = Some(now_rfc3339());
                });
                Err((n - done.min(n), msg))
            }
        };
        drop(spool);
        self.wake.notify_one();
        result
    }

    /// Takes no more; the task delivers what it can and returns.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

/// One sink's task: deliver from the spool in order, retry with backoff. Returns when the
/// queue is closed and the spool is empty, or closed while the receiver is away (the spool
/// keeps the rest for the next start).
pub async fn worker<S: Sink>(mut sink: S, queue: Arc<Queue<S::Item>>, mut retry: Retry) {
    let stats = queue.stats.clone();
    let name = stats.lock().map(|s| s.name.clone()).unwrap_or_default();
    let mut next_attempt = tokio::time::Instant::now();
    sink.prepare().await;
    loop {
        if queue.spool().is_empty() {
            if queue.is_closed() {
                return;
            }
            queue.wake.notified().await;
            continue;
        }
        if tokio::time::Instant::now() < next_attempt {
            if queue.is_closed() {
                // Shutting down while the receiver is away: the spool keeps the rest.
                return;
            }
            tokio::select! {
                () = queue.wake.notified() => {}
                () = tokio::time::sleep_until(next_attempt) => {}
            }
            continue;
        }
        let batch = queue.spool().peek(sink.batch_max().max(1));
        let (delivered, failure) = match sink.deliver(&batch).await {
            Ok(d) => (d, None),
            Err(f) => (f.done, Some((f.error, f.retry_after))),
        };
        let done = (delivered.sent + delivered.rejected).min(batch.len());
        let pending = {
            let mut spool = queue.spool();
            if done > 0
                && let Err(e) = spool.ack(batch[done - 1].seq())
            {
                warn!("output `{name}`: cannot record delivery in the spool: {e}");
            }
            let pending = spool.len() as u64;
            // Under the spool lock, like `push_all`, so the last writer of `pending` saw the
            // spool last.
            update(&stats, |s| {
                s.sent += delivered.sent as u64;
                s.rejected += delivered.rejected as u64;
                s.dropped += delivered.rejected as u64;
                s.pending = pending;
                if delivered.sent > 0 {
                    s.last_sent_at = Some(now_rfc3339());
                }
            });
            pending
        };
        match failure {
            None if done == 0 => {
                // Nothing done and no error: a misbehaving sink; do not spin.
                next_attempt = tokio::time::Instant::now() + retry.failed(None);
            }
            None => retry.succeeded(),
            Some((e, retry_after)) => {
                let wait = retry.failed(retry_after);
                next_attempt = tokio::time::Instant::now() + wait;
                let msg = e.to_string();
                if retry.worth_logging() {
                    warn!(
                        "output `{name}`: delivery failed ({msg}); {} event(s) spooled, retrying in {:?}",
                        pending, wait
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
