//! The delivery engine, generic over [`Sink`]: one task per sink takes in what the fan-out
//! queues, appends it to the sink's spool, and delivers from the spool in order, retrying
//! failures with backoff ([`Retry`]) and counting everything in the sink's [`OutputStats`].

use log::warn;
use tokio::sync::mpsc;

use super::{
    retry::Retry,
    sink::Sink,
    spool::{Spool, Spooled},
    stats::{OutputStats, SharedStats, now_rfc3339, update},
};

/// One sink's task: spool what arrives, deliver in order, retry with backoff. Returns when
/// the queue is closed and the spool is empty, or the receiver is away (the spool keeps the
/// rest for the next start).
pub async fn worker<S: Sink>(
    mut sink: S,
    mut spool: Spool<S::Item>,
    mut rx: mpsc::Receiver<S::Item>,
    stats: SharedStats,
    mut retry: Retry,
) {
    let name = stats.lock().map(|s| s.name.clone()).unwrap_or_default();
    let mut next_attempt = tokio::time::Instant::now();
    let mut closed = false;
    update(&stats, |s| s.pending = spool.len() as u64);
    loop {
        // Take in everything queued, without waiting.
        loop {
            match rx.try_recv() {
                Ok(item) => append(&mut spool, item, &stats, &name),
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
                Some(item) => append(&mut spool, item, &stats, &name),
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
                item = rx.recv() => match item {
                    Some(item) => append(&mut spool, item, &stats, &name),
                    None => closed = true,
                },
                _ = tokio::time::sleep_until(next_attempt) => {}
            }
            continue;
        }
        let batch = spool.peek(sink.batch_max().max(1));
        let (delivered, failure) = match sink.deliver(&batch).await {
            Ok(d) => (d, None),
            Err(f) => (f.done, Some((f.error, f.retry_after))),
        };
        let done = (delivered.sent + delivered.rejected).min(batch.len());
        if done > 0
            && let Err(e) = spool.ack(batch[done - 1].seq())
        {
            warn!("output `{name}`: cannot record delivery in the spool: {e}");
        }
        update(&stats, |s| {
            s.sent += delivered.sent as u64;
            s.rejected += delivered.rejected as u64;
            s.dropped += delivered.rejected as u64;
            s.pending = spool.len() as u64;
            if delivered.sent > 0 {
                s.last_sent_at = Some(now_rfc3339());
            }
        });
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

fn append<T: Spooled>(spool: &mut Spool<T>, item: T, stats: &SharedStats, name: &str) {
    match spool.append(item) {
        Ok(dropped) => update(stats, |s| {
            s.spooled += 1;
            s.dropped += dropped;
            s.pending = spool.len() as u64;
        }),
        Err(e) => {
            warn!("output `{name}`: cannot spool an event: {e}");
            update(stats, |s: &mut OutputStats| {
                s.dropped += 1;
                s.last_error = Some(format!("spool: {e}"));
                s.last_error_at = Some(now_rfc3339());
            });
        }
    }
}
