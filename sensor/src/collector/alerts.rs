//! SIEM forwarding when several collectors share partitions (docs/fleet.md, "SIEM forwarding
//! exactly once per alert id").
//!
//! A partition's holder does not write to the outputs itself: a new holder merges again what
//! its predecessor merged after the last checkpoint, and would forward those alerts again.
//! Instead every alert event (agents' and fleet rules') goes into the JetStream stream
//! `<stream>-alerts` with `Nats-Msg-Id` = the event's id, whose duplicate window (30 min)
//! drops the copies a replay publishes. A partition's checkpoint is written only once the
//! server has acknowledged every event merged before it, so no event falls between a
//! checkpoint and a crash.
//!
//! One forwarder, the holder of partition 0, reads that stream in order and feeds the
//! configured outputs. Its position (the last stream sequence whose events every output has
//! delivered: nothing pending in any spool) is kept in the checkpoint bucket under `alerts`,
//! written with the revision it read (fenced like the checkpoints). A new forwarder resumes
//! after that position: events delivered by its predecessor after it are sent again with the
//! same ids, which receivers deduplicate; none is lost with the predecessor's spool.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, pull},
    kv,
    message::PublishMessage,
};
use futures_util::StreamExt as _;
use log::{info, warn};

use crate::{formats::Record, sinks::Outputs};

/// The alerts stream's duplicate window: longer than a failover plus a replay from the last
/// checkpoint.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(30 * 60);
/// The forwarder's position in the checkpoint bucket.
pub const POSITION_KEY: &str = "alerts";

/// The stream holding the collectors' alert events.
pub fn stream_name(stream: &str) -> String {
    format!("{stream}-alerts")
}

/// Its subjects: `<subject_prefix>-alerts.p<N>`, by the partition that merged the event.
pub fn subject(prefix: &str, p: u32) -> String {
    format!("{prefix}-alerts.p{p}")
}

/// An event queued for the stream: its number, `<subject>\n<message id>`, its JSON.
type Queued = (u64, String, Vec<u8>);

/// Where an alert event comes from.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// An agent's alert, merged from its batch.
    Agent,
    /// A fleet rule of the partition.
    Fleet,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Fleet => "fleet",
        }
    }
}

/// Publishes a collector's alert events to the alerts stream, in order, retrying until the
/// server acknowledges each.
pub struct AlertStream {
    /// Numbered and queued together (under this lock): events enter the queue in the order
    /// of their numbers, whichever partition's merge publishes them.
    tx: std::sync::Mutex<(u64, tokio::sync::mpsc::UnboundedSender<Queued>)>,
    acked: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
    /// Events that could not be encoded (none expected), counted.
    pub unencodable: AtomicU64,
}

impl Drop for AlertStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AlertStream {
    pub fn start(js: jetstream::Context, stream: String) -> Arc<Self> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, String, Vec<u8>)>();
        let (acked, _) = tokio::sync::watch::channel(0u64);
        let acked_tx = acked.clone();
        let task = tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < 64 {
                    match rx.try_recv() {
                        Ok(item) => batch.push(item),
                        Err(_) => break,
                    }
                }
                // Retried as a whole until acknowledged: a copy already stored is dropped
                // by its id.
                loop {
                    match publish(&js, &stream, &batch).await {
                        Ok(()) => break,
                        Err(e) => {
                            warn!("publishing alert events to `{stream}`: {e:#}; retrying");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(5));
                        }
                    }
                }
                delay = Duration::from_millis(200);
                if let Some((n, _, _)) = batch.last() {
                    acked_tx.send_replace(*n);
                }
            }
        });
        Arc::new(Self {
            tx: std::sync::Mutex::new((0, tx)),
            acked,
            task,
            unencodable: AtomicU64::new(0),
        })
    }

    /// Queues events merged by partition `p` (never blocks: called under the merge lock).
    /// `source` keeps agents' and fleet rules' ids apart in the stream's de-duplication
    /// (an agent named like a rule must not pre-empt the rule's event ids).
    pub fn publish(&self, p_subject: &str, source: Source, records: &[Record]) {
        let Ok(mut tx) = self.tx.lock() else {
            return;
        };
        for r in records {
            let Ok(body) = serde_json::to_vec(r) else {
                self.unencodable.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            tx.0 += 1;
            let n = tx.0;
            let id = format!("{}:{}", source.name(), r.id);
            let _ = tx.1.send((n, format!("{p_subject}\n{id}"), body));
        }
    }

    /// Events queued so far (read under the merge lock: what a checkpoint covers).
    pub fn queued(&self) -> u64 {
        self.tx.lock().map_or(0, |t| t.0)
    }

    /// Events queued and not yet acknowledged.
    pub fn backlog(&self) -> u64 {
        self.queued().saturating_sub(*self.acked.borrow())
    }

    /// Waits while more than `max` events wait for their acknowledgement. Merging is what
    /// makes events: a partition's consumer waits here before each message, so an alerts
    /// stream that cannot take them holds the merge back (the records wait in their
    /// streams) instead of growing this queue without bound.
    pub async fn room(&self, max: u64) {
        let mut acked = self.acked.subscribe();
        let mut said = false;
        while self.backlog() > max {
            if !said {
                warn!(
                    "{} alert events wait for the alerts stream: merging paused until it takes them",
                    self.backlog()
                );
                said = true;
            }
            // Re-checked at least every second: `queued` moves without a notification.
            let _ = tokio::time::timeout(Duration::from_secs(1), acked.changed()).await;
        }
    }

    /// Waits until the first `n` events are acknowledged, at most `within`.
    pub async fn acked_through(&self, n: u64, within: Duration) -> bool {
        let mut rx = self.acked.subscribe();
        tokio::time::timeout(within, rx.wait_for(|a| *a >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

async fn publish(
    js: &jetstream::Context,
    stream: &str,
    batch: &[(u64, String, Vec<u8>)],
) -> anyhow::Result<()> {
    let mut acks = Vec::with_capacity(batch.len());
    for (_, subject_and_id, body) in batch {
        let (subject, id) = subject_and_id
            .split_once('\n')
            .context("an alert event without subject")?;
        let message = PublishMessage::build()
            .payload(body.clone().into())
            .message_id(id)
            .expected_stream(stream);
        acks.push(
            js.send_publish(subject.to_owned(), message)
                .await
                .context("publishing")?,
        );
    }
    for ack in acks {
        ack.await.context("no acknowledgement")?;
    }
    Ok(())
}

/// Counters of the forwarder.
#[derive(Debug, Default)]
pub struct ForwardCounters {
    pub forwarded: AtomicU64,
    pub unreadable: AtomicU64,
    pub missing: AtomicU64,
}

/// Feeds the outputs from the alerts stream until aborted (the holder of partition 0 runs
/// it) or fenced (another forwarder moved the position).
pub async fn forward(
    stream: jetstream::stream::Stream,
    consumer_name: String,
    ckpt: kv::Store,
    outputs: Arc<Outputs>,
    counters: Arc<ForwardCounters>,
) {
    let mut delay = Duration::from_millis(500);
    // What this forwarder handed to the outputs: a session restarted (a delivery gap, an
    // error) resumes after it, not after the stored position (those would go out twice).
    let mut handed = 0u64;
    loop {
        match forward_session(
            &stream,
            &consumer_name,
            &ckpt,
            &outputs,
            &counters,
            &mut handed,
        )
        .await
        {
            Ok(()) => {
                warn!("the alert forwarder's position was moved by another collector: stopped");
                return;
            }
            Err(e) => {
                warn!("forwarding alert events: {e:#}; resuming after {handed}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Ok: fenced (another forwarder moved the position).
async fn forward_session(
    stream: &jetstream::stream::Stream,
    consumer_name: &str,
    ckpt: &kv::Store,
    outputs: &Outputs,
    counters: &ForwardCounters,
    handed: &mut u64,
) -> anyhow::Result<()> {
    let (mut stored, mut revision) = match ckpt.entry(POSITION_KEY).await? {
        Some(e) if e.operation == kv::Operation::Put => {
            let pos = std::str::from_utf8(&e.value)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .context("the forwarder's position is unreadable")?;
            // Rewritten as it is: a former forwarder can no longer move it.
            let rev = ckpt
                .update(POSITION_KEY, e.value.clone(), e.revision)
                .await?;
            (pos, rev)
        }
        _ => (0, ckpt.create(POSITION_KEY, "0".into()).await?),
    };
    *handed = (*handed).max(stored);
    match stream.delete_consumer(consumer_name).await {
        Ok(_) => {}
        Err(e) if e.to_string().contains("not found") => {}
        Err(e) => return Err(e).context(format!("deleting the consumer `{consumer_name}`")),
    }
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(consumer_name.to_owned()),
            deliver_policy: if *handed == 0 {
                DeliverPolicy::All
            } else {
                DeliverPolicy::ByStartSequence {
                    start_sequence: *handed + 1,
                }
            },
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating the consumer `{consumer_name}`"))?;
    info!(
        "forwarding alert events to the outputs from stream sequence {}",
        *handed + 1
    );
    // The first message of a new consumer is the oldest the stream still has from there
    // on: a higher sequence means the ones between are gone (its limits). Later, a gap is
    // a delivery lost in flight: resume after what was handed, it comes again.
    let mut first = true;
    loop {
        let mut messages = consumer
            .fetch()
            .max_messages(64)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .context("pulling alert events")?;
        while let Some(message) = tokio::time::timeout(Duration::from_secs(12), messages.next())
            .await
            .context("no answer to a pull request")?
        {
            let message = message.map_err(|e| anyhow::anyhow!("pulling alert events: {e}"))?;
            let seq = message
                .info()
                .map_err(|e| anyhow::anyhow!("an alert event without metadata: {e}"))?
                .stream_sequence;
            if seq <= *handed {
                let _ = message.ack().await;
                continue;
            }
            if seq > *handed + 1 {
                anyhow::ensure!(
                    first,
                    "alert event {seq} delivered before {}: resuming",
                    *handed + 1
                );
                if *handed > 0 {
                    counters
                        .missing
                        .fetch_add(seq - *handed - 1, Ordering::Relaxed);
                }
            }
            first = false;
            match serde_json::from_slice::<Record>(&message.payload) {
                Ok(r) => {
                    outputs.publish_records(std::slice::from_ref(&r));
                    counters.forwarded.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    counters.unreadable.fetch_add(1, Ordering::Relaxed);
                }
            }
            *handed = seq;
            let _ = message.ack().await;
        }
        // The position moves only past events every output has delivered.
        if *handed > stored && outputs.stats().iter().all(|s| s.pending == 0) {
            let value = handed.to_string();
            match ckpt
                .update(POSITION_KEY, value.clone().into(), revision)
                .await
            {
                Ok(r) => {
                    revision = r;
                    stored = *handed;
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    // An update of ours that timed out earlier may have been applied: ours
                    // if the value is what this forwarder would have written since.
                    match ckpt.entry(POSITION_KEY).await? {
                        Some(en)
                            if std::str::from_utf8(&en.value)
                                .ok()
                                .and_then(|v| v.parse::<u64>().ok())
                                .is_some_and(|v| v > stored && v <= *handed) =>
                        {
                            revision = en.revision;
                        }
                        _ => return Ok(()),
                    }
                }
                Err(e) => warn!("storing the forwarder's position: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{collector::testnats::NatsServer, sinks::tests::record};

    /// Against a real nats-server: while the alerts stream cannot take events (it does not
    /// exist yet) they wait in the queue, retried, and `room` holds a merge back once more
    /// than its bound wait; once the stream is there every event is acknowledged, once by
    /// id, and `room` lets the merge go on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_that_cannot_take_events_holds_the_merge_back() {
        let Some(server) = NatsServer::start_or_skip("sensor-alerts") else {
            return;
        };
        let client = async_nats::connect(server.url.as_str())
            .await
            .expect("connect");
        let js = jetstream::new(client);
        let name = stream_name("SENSOR");
        let publisher = AlertStream::start(js.clone(), name.clone());
        let records: Vec<Record> = (0..5)
            .map(|i| record("address", &format!("10.0.0.{i}")))
            .collect();
        publisher.publish(&subject("sensor", 0), Source::Fleet, &records);
        assert_eq!(publisher.queued(), 5);
        let held = tokio::time::timeout(Duration::from_secs(2), publisher.room(2)).await;
        assert!(
            held.is_err(),
            "room while 5 events wait for a missing stream"
        );
        assert_eq!(publisher.backlog(), 5);

        js.create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec!["sensor-alerts.>".into()],
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        })
        .await
        .expect("stream");
        tokio::time::timeout(Duration::from_secs(20), publisher.room(2))
            .await
            .expect("room once the stream takes them");
        assert!(publisher.acked_through(5, Duration::from_secs(20)).await);
        assert_eq!(publisher.backlog(), 0);
        // The same events again (a successor replaying them): acknowledged, not stored twice.
        publisher.publish(&subject("sensor", 0), Source::Fleet, &records);
        assert!(publisher.acked_through(10, Duration::from_secs(20)).await);
        let mut stream = js.get_stream(&name).await.expect("stream");
        assert_eq!(stream.info().await.expect("info").state.messages, 5);
    }
}
