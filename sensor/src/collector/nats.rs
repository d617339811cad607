//! Consuming agents' batches from JetStream (`[nats]`): a durable pull consumer on the
//! stream, feeding the HTTPS endpoint's ingest path (decode within the memory budget,
//! validate, journal with fsync, merge, forward alerts), then acknowledging.
//!
//! The agent's name is the subject's last part (`<subject_prefix>.<agent>`): the server's
//! permissions let each agent's NATS user publish on its own subject only, as a token binds
//! an HTTPS batch to its agent. A batch that names another agent is refused like one POSTed
//! with another agent's token.
//!
//! Exactly once. The merge needs each agent's records in order (its stream positions and
//! summary periods only move forward), so messages are merged strictly in stream order: the
//! last stream sequence merged is journaled with its batch and kept in the snapshot (the
//! checkpoint), and the consumer always resumes right after it: at start (the durable consumer
//! is recreated at the checkpoint, whatever it had pending or acknowledged) and whenever a
//! message arrives past the next expected one (a delivery lost with a connection: recreated
//! again). A message delivered again after it was merged (its acknowledgement lost, or after
//! a crash between journal and acknowledgement) is acknowledged and skipped; the agents'
//! stream positions would drop its records anyway. What the stream no longer holds (its age
//! or size limits) is skipped and counted (`missing`).

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, DeliverPolicy, pull},
    stream::{DiscardPolicy, RetentionPolicy, StorageType},
};
use futures_util::StreamExt as _;
use log::{info, warn};

use super::{
    config::Nats,
    ingest::{self, IngestError},
    server::DECOMPRESSION_RATIO,
    shared::Shared,
};
use crate::{
    model::aggregate::Now,
    net::{
        nats::{Endpoint, EndpointOptions},
        tls::ClientIdentity,
    },
    ship::partition::{POSITIONS_HEADER, misplaced, parse_subject},
};

/// Connecting, and each JetStream API request.
pub(super) const TIMEOUT: Duration = Duration::from_secs(10);
/// A message not acknowledged within this is delivered again.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// Messages per pull request, and how long a pull waits for them.
const FETCH: usize = 64;
const FETCH_WAIT: Duration = Duration::from_secs(2);
/// JetStream drops a message published again with the same `Nats-Msg-Id` within this.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

fn opt(p: &std::path::Path) -> Option<&std::path::Path> {
    (!p.as_os_str().is_empty()).then_some(p)
}

/// A configured JetStream source.
pub struct Source {
    pub(super) endpoint: Endpoint,
    pub(super) config: Nats,
}

/// Publishes the fleet's hot sketch cells for the agents ([`crate::ship::sketch`]) every
/// few seconds on core NATS: agents subscribe, the server's permissions let only the
/// collector publish. Core NATS, not JetStream: an agent that misses one gets the next.
pub(super) struct HotPublisher(tokio::task::JoinHandle<()>);

impl HotPublisher {
    pub(super) fn start(client: async_nats::Client, prefix: &str, shared: &Arc<Shared>) -> Self {
        let subject = crate::ship::sketch::hot_subject(prefix);
        let shared = shared.clone();
        Self(tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_secs(crate::ship::sketch::HOT_PUBLISH_SECS));
            loop {
                tick.tick().await;
                // Published even when empty: it tells agents this collector reads sketches
                // (and, by its header, takes early parts).
                let Ok(hot) = shared.with_fleet(|f| f.state.sketch.hot_all(Now::system().secs()))
                else {
                    return;
                };
                let Ok(body) = serde_json::to_vec(&hot) else {
                    continue;
                };
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(crate::ship::sketch::PARTS_HEADER, "1");
                if let Err(e) = client
                    .publish_with_headers(subject.clone(), headers, body.into())
                    .await
                {
                    warn!("publishing the hot sketch cells on {subject}: {e}");
                }
            }
        }))
    }
}

impl Drop for HotPublisher {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why a consumer's run ended.
pub(super) enum Ended {
    /// A message arrived past the next expected one: recreate the consumer at the checkpoint.
    OutOfOrder { expected: u64, got: u64 },
}

impl Source {
    /// Reads the credentials and TLS material (errors fail the collector's start).
    pub fn new(c: &Nats) -> anyhow::Result<Option<Self>> {
        if !c.enabled() {
            return Ok(None);
        }
        let identity = match (opt(&c.client_cert_file), opt(&c.client_key_file)) {
            (Some(cert_file), Some(key_file)) => Some(ClientIdentity {
                cert_file,
                key_file,
            }),
            _ => None,
        };
        let endpoint = Endpoint::new(EndpointOptions {
            servers: &c.url,
            credentials_file: &c.credentials_file,
            ca_file: opt(&c.ca_file),
            identity,
            name: &format!("sensor collector {}", c.consumer),
            // Not under `_INBOX.`: no agent's inbox permission can cover the messages this
            // collector fetches.
            inbox_prefix: format!("_INBOX_sensor_collector.{}", c.consumer),
        })
        .context("[nats]")?;
        Ok(Some(Self {
            endpoint,
            config: c.clone(),
        }))
    }

    pub fn target(&self) -> String {
        self.endpoint.target()
    }

    /// Consumes until the process ends; connection and server errors are retried with a
    /// growing delay (the HTTPS endpoint serves on meanwhile).
    pub async fn run(self, shared: Arc<Shared>) {
        let mut delay = Duration::from_millis(500);
        let mut failures = 0u64;
        loop {
            match self.session(&shared, &mut delay).await {
                Ok(()) => {}
                Err(e) => {
                    failures += 1;
                    if failures.is_power_of_two() {
                        warn!(
                            "JetStream consumer `{}`: {e:#} ({failures} so far); retrying",
                            self.config.consumer
                        );
                    }
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    /// One connection: makes sure of the stream, then runs consumers from the checkpoint.
    async fn session(&self, shared: &Arc<Shared>, delay: &mut Duration) -> anyhow::Result<()> {
        let client = self.endpoint.connect(TIMEOUT).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(TIMEOUT)
            .build(client.clone());
        let stream = self.stream(&js).await?;
        // Dropped (and with it the publishing task) when this session ends.
        let _hot = HotPublisher::start(client.clone(), &self.config.subject_prefix, shared);
        info!(
            "consuming JetStream stream `{}` ({}.>) at {} as `{}`",
            self.config.stream,
            self.config.subject_prefix,
            self.target(),
            self.config.consumer
        );
        loop {
            let checkpoint = shared.nats_seq()?;
            let consumer = self.consumer(&stream, checkpoint).await?;
            *delay = Duration::from_millis(500);
            match self
                .consume(&consumer, shared, checkpoint, &|| true)
                .await?
            {
                Ended::OutOfOrder { expected, got } => {
                    shared.counters.nats_resets.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        "JetStream delivered sequence {got} before {expected}: resuming at {expected}"
                    );
                }
            }
        }
    }

    /// The stream, created (file storage, replicated) when it does not exist. An existing one
    /// must hold exactly the agents' subjects: the consumer's order check relies on every
    /// stream sequence being an agent's batch.
    async fn stream(&self, js: &jetstream::Context) -> anyhow::Result<jetstream::stream::Stream> {
        let c = &self.config;
        self.stream_named(js, &c.stream, format!("{}.>", c.subject_prefix))
            .await
    }

    /// The stream `name` holding exactly `subjects` (see [`Source::stream`]).
    pub(super) async fn stream_named(
        &self,
        js: &jetstream::Context,
        name: &str,
        subjects: String,
    ) -> anyhow::Result<jetstream::stream::Stream> {
        let c = &self.config;
        let subjects = vec![subjects];
        let stream = js
            .get_or_create_stream(jetstream::stream::Config {
                name: name.to_owned(),
                subjects: subjects.clone(),
                storage: StorageType::File,
                num_replicas: c.replicas,
                max_age: Duration::from_secs(c.max_age_secs),
                duplicate_window: DUPLICATE_WINDOW,
                retention: RetentionPolicy::Limits,
                discard: DiscardPolicy::Old,
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating or opening the stream `{name}`"))?;
        let have = &stream.cached_info().config.subjects;
        anyhow::ensure!(
            *have == subjects,
            "the stream `{name}` holds subjects {have:?}; the collector needs exactly {subjects:?}",
        );
        Ok(stream)
    }

    /// The durable consumer, recreated to deliver from the message after `checkpoint`.
    async fn consumer(
        &self,
        stream: &jetstream::stream::Stream,
        checkpoint: u64,
    ) -> anyhow::Result<jetstream::consumer::Consumer<pull::Config>> {
        let c = &self.config;
        self.consumer_named(
            stream,
            &c.consumer,
            format!("{}.>", c.subject_prefix),
            checkpoint,
        )
        .await
    }

    /// The durable consumer `name` of `filter`, recreated to deliver from the message after
    /// `checkpoint`.
    pub(super) async fn consumer_named(
        &self,
        stream: &jetstream::stream::Stream,
        name: &str,
        filter: String,
        checkpoint: u64,
    ) -> anyhow::Result<jetstream::consumer::Consumer<pull::Config>> {
        // Whatever the old consumer had pending or acknowledged, the checkpoint decides.
        match stream.delete_consumer(name).await {
            Ok(_) => {}
            Err(e) if e.to_string().contains("not found") => {}
            Err(e) => return Err(e).context(format!("deleting the consumer `{name}`")),
        }
        let deliver_policy = if checkpoint == 0 {
            DeliverPolicy::All
        } else {
            DeliverPolicy::ByStartSequence {
                start_sequence: checkpoint + 1,
            }
        };
        stream
            .create_consumer(pull::Config {
                durable_name: Some(name.to_owned()),
                deliver_policy,
                ack_policy: AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                filter_subject: filter,
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating the consumer `{name}`"))
    }

    /// Merges messages in stream order until one arrives out of order (or an error).
    pub(super) async fn consume(
        &self,
        consumer: &jetstream::consumer::Consumer<pull::Config>,
        shared: &Shared,
        checkpoint: u64,
        may_merge: &(dyn Fn() -> bool + Sync),
    ) -> anyhow::Result<Ended> {
        let mut next = checkpoint + 1;
        // The first message of a new consumer is the oldest the stream still has from
        // `next` on: a higher sequence there means the ones between are gone.
        let mut first = true;
        loop {
            let mut messages = consumer
                .fetch()
                .max_messages(FETCH)
                .expires(FETCH_WAIT)
                .messages()
                .await
                .context("pulling messages")?;
            loop {
                // A pull whose answer went down with a server must not hang the consumer.
                let Some(message) = tokio::time::timeout(FETCH_WAIT + TIMEOUT, messages.next())
                    .await
                    .context("no answer to a pull request")?
                else {
                    break;
                };
                let message = message.map_err(|e| anyhow::anyhow!("pulling messages: {e}"))?;
                let seq = message
                    .info()
                    .map_err(|e| anyhow::anyhow!("a message without JetStream metadata: {e}"))?
                    .stream_sequence;
                if seq < next {
                    shared
                        .counters
                        .nats_already_merged
                        .fetch_add(1, Ordering::Relaxed);
                    let _ = message.ack().await;
                    continue;
                }
                if seq > next {
                    if !first {
                        return Ok(Ended::OutOfOrder {
                            expected: next,
                            got: seq,
                        });
                    }
                    if checkpoint > 0 {
                        shared
                            .counters
                            .nats_missing
                            .fetch_add(seq - next, Ordering::Relaxed);
                        warn!(
                            "stream sequences {next}..{} are no longer in the stream (its limits): skipped",
                            seq - 1
                        );
                    }
                }
                first = false;
                // Before each message: one batch may carry many alert events.
                shared.alert_room().await;
                anyhow::ensure!(may_merge(), "no longer allowed to merge (lease)");
                self.merge(shared, &message, seq, may_merge).await?;
                shared
                    .counters
                    .nats_messages
                    .fetch_add(1, Ordering::Relaxed);
                next = seq + 1;
                // Lost, it is delivered again and skipped above.
                if let Err(e) = message.ack().await {
                    log::debug!("acknowledging sequence {seq}: {e}");
                }
            }
        }
    }

    /// Decodes, checks and merges one message, as the HTTPS endpoint does a POST. Transient
    /// failures (memory budget, journal) are retried here, so that nothing after it is merged
    /// first; a refused batch is terminated and counted.
    async fn merge(
        &self,
        shared: &Shared,
        message: &jetstream::Message,
        seq: u64,
        may_merge: &(dyn Fn() -> bool + Sync),
    ) -> anyhow::Result<()> {
        let agent = parse_subject(
            &self.config.subject_prefix,
            self.config.partitions,
            message.subject.as_str(),
        )
        .map(|(p, agent)| (p, agent.to_owned()));
        let Some((partition, agent)) = agent else {
            let e = IngestError::Malformed(format!(
                "subject `{}` does not name an agent",
                message.subject
            ));
            return refuse(shared, message, seq, "?", &e).await;
        };
        let positions = if self.config.partitions > 1 {
            match positions(message) {
                Ok(p) => Some(p),
                Err(e) => return refuse(shared, message, seq, &agent, &e).await,
            }
        } else {
            None
        };
        let max = shared.max_body.saturating_mul(DECOMPRESSION_RATIO);
        let mut wait = Duration::from_millis(100);
        let batch = loop {
            let mut reservation = shared.budget.reservation();
            let payload = message.payload.clone();
            let name = agent.clone();
            let decoded = tokio::task::spawn_blocking(move || {
                let r = ingest::decode_reserving(
                    &payload,
                    Some("gzip"),
                    max,
                    &mut |n| reservation.grow(n),
                    &name,
                    Now::system().secs(),
                );
                (r, reservation)
            })
            .await
            .context("decoding a batch")?;
            match decoded {
                (Ok(b), reservation) => break (b, reservation),
                (Err(IngestError::Busy(_)), _) => {
                    shared.counters.busy.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                (Err(e), _) => return refuse(shared, message, seq, &agent, &e).await,
            }
        };
        let (batch, _reservation) = batch;
        let mut wait = Duration::from_millis(200);
        loop {
            if let Some((first, last)) = positions
                && batch.records.iter().any(|r| r.seq < first || r.seq > last)
            {
                let e = IngestError::Malformed(format!(
                    "records outside the positions {first}-{last} the message names"
                ));
                return refuse(shared, message, seq, &agent, &e).await;
            }
            if let Some(why) = batch
                .records
                .iter()
                .find_map(|r| misplaced(r, self.config.partitions, partition))
            {
                let e = IngestError::Malformed(format!("partition {partition}: {why}"));
                return refuse(shared, message, seq, &agent, &e).await;
            }
            // The lease may have lapsed while this waited (memory budget, journal).
            anyhow::ensure!(may_merge(), "no longer allowed to merge (lease)");
            match shared.accept_from_stream(&batch, seq, positions) {
                Ok(applied) => {
                    let c = &shared.counters;
                    c.batches.fetch_add(1, Ordering::Relaxed);
                    c.records
                        .fetch_add(applied.accepted as u64, Ordering::Relaxed);
                    c.duplicates
                        .fetch_add(applied.duplicates as u64, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) => {
                    warn!("cannot accept a batch from `{agent}` (sequence {seq}): {e:#}; retrying");
                    // Not merged: keep the message from being delivered again meanwhile.
                    let _ = message.ack_with(AckKind::Progress).await;
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// The agent's positions a partition's message covers (`Sensor-Positions: <first>-<last>`).
fn positions(message: &jetstream::Message) -> Result<(u64, u64), IngestError> {
    let value = message
        .headers
        .as_ref()
        .and_then(|h| h.get(POSITIONS_HEADER))
        .map(|v| v.as_str().to_owned())
        .ok_or_else(|| IngestError::Malformed(format!("no {POSITIONS_HEADER} header")))?;
    parse_positions(&value)
        .ok_or_else(|| IngestError::Malformed(format!("{POSITIONS_HEADER}: `{value}`")))
}

/// `<first>-<last>`: decimal positions, 1 <= first <= last.
fn parse_positions(value: &str) -> Option<(u64, u64)> {
    let (a, b) = value.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    if !digits(a) || !digits(b) {
        return None;
    }
    let (a, b) = (a.parse::<u64>().ok()?, b.parse::<u64>().ok()?);
    (0 < a && a <= b).then_some((a, b))
}

/// A batch refused for good: counted by reason as the HTTPS endpoint counts it, terminated
/// (never delivered again), and passed.
async fn refuse(
    shared: &Shared,
    message: &jetstream::Message,
    seq: u64,
    agent: &str,
    e: &IngestError,
) -> anyhow::Result<()> {
    let c = &shared.counters;
    let counter = match e {
        IngestError::TooLarge(_) => &c.too_large,
        IngestError::Implausible(_) => {
            c.implausible.fetch_add(1, Ordering::Relaxed);
            &c.malformed
        }
        IngestError::WrongAgent(_) => &c.forbidden,
        IngestError::Malformed(_) | IngestError::Busy(_) => &c.malformed,
    };
    let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        warn!(
            "refused the JetStream message {seq} on `{}` (agent `{agent}`): {e} ({n} so far)",
            message.subject
        );
    }
    shared.skip_stream_message(seq)?;
    let _ = message.ack_with(AckKind::Term).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A partition's message names the agent positions it covers; anything but two decimal
    /// positions in order is refused (the message is then counted as malformed).
    #[test]
    fn positions_headers_are_two_positions_in_order() {
        assert_eq!(parse_positions("1-1"), Some((1, 1)));
        assert_eq!(parse_positions("7-42"), Some((7, 42)));
        assert_eq!(
            parse_positions("1-18446744073709551615"),
            Some((1, u64::MAX))
        );
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "0-5",
            "5-1",
            "1-2-3",
            " 1-2",
            "1-2 ",
            "+1-2",
            "1-+2",
            "a-b",
            "1_000-2000",
            "18446744073709551616-1",
            "1-18446744073709551616",
            "１-２",
        ] {
            assert_eq!(parse_positions(bad), None, "`{bad}`");
        }
    }
}
