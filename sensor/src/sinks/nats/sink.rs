//! The JetStream sink: one message per batch of wire records (the HTTPS transport's gzip
//! JSON, [`crate::ship::encode`]), on `<subject_prefix>.<agent>`, with
//! `Nats-Msg-Id: <agent>-<stream id>-<first position>-<last position>` and
//! `Nats-Expected-Stream`. Delivered once JetStream acknowledges; anything else (no
//! connection, no acknowledgement in time, a refused publish) keeps the batch and retries.
//!
//! The id names the positions the message carries, not just the first: after a retry the
//! engine may hand over more records than the lost attempt had (the spool grew meanwhile),
//! and that longer batch must not be dropped as a duplicate of the shorter one. Overlapping
//! messages are harmless: the collector counts each stream position once.
//!
//! With `partitions` > 1 (several collectors, docs/fleet.md) a batch becomes one message per
//! partition that has records of it ([`crate::ship::partition::split`]), on
//! `<subject_prefix>.p<N>.<agent>` of the stream `<stream>-p<N>`, with the id suffixed
//! `-p<N>` and the batch's whole range of positions in `Sensor-Positions` (a partition sees
//! a subsequence of them: gaps are not spool drops). The batch is delivered once every one
//! of its messages is acknowledged; a retry sends all again, and those stored already are
//! dropped as duplicates.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{self, message::PublishMessage};
use futures_util::StreamExt as _;
use log::warn;

use super::config::NatsKeys;
use crate::{
    model::aggregate::Now,
    net::{
        nats::{Endpoint, EndpointOptions},
        tls::ClientIdentity,
    },
    ship::{
        Batch, EncodeError, ShipRecord, WIRE_VERSION, encode,
        partition::{self, POSITIONS_HEADER, partition_stream, partition_subject},
        sketch::{Hot, HotByKey, PARTS_HEADER, hot_subject},
    },
    sinks::{
        error::SinkError,
        sink::{Delivered, Failed, Sink},
    },
};

/// Room left under the server's `max_payload` for the message's headers.
const HEADERS_ROOM: usize = 512;
/// One message of a batch: its partition and its body.
type Message = (u32, Vec<u8>);

fn opt(p: &std::path::Path) -> Option<&std::path::Path> {
    (!p.as_os_str().is_empty()).then_some(p)
}

/// Publishes batches of records to JetStream.
pub struct JetStreamSink {
    endpoint: Endpoint,
    /// Connected on the first delivery (an agent starts whether or not NATS is reachable);
    /// afterwards the client reconnects by itself.
    connection: Option<(async_nats::Client, jetstream::Context)>,
    agent: String,
    /// The spool's stream id: positions restart only with a new spool.
    spool_stream: String,
    subject_prefix: String,
    stream: String,
    /// `[ship] partitions`: as many as the collectors' (1: unpartitioned).
    partitions: u32,
    timeout: Duration,
    batch_max: usize,
    /// Where the collector's hot sketch cells go, and the subject they come on.
    hot: Arc<Hot>,
    hot_subject: String,
    /// The task taking them (aborted with the sink).
    hot_task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for JetStreamSink {
    fn drop(&mut self) {
        if let Some(t) = self.hot_task.take() {
            t.abort();
        }
    }
}

impl JetStreamSink {
    /// Reads the credentials and TLS material (errors fail the agent's start).
    pub fn new(
        c: &NatsKeys<'_>,
        agent: &str,
        spool_stream: String,
        hot: Arc<Hot>,
    ) -> Result<Self, SinkError> {
        let identity = match (opt(c.client_cert_file), opt(c.client_key_file)) {
            (Some(cert_file), Some(key_file)) => Some(ClientIdentity {
                cert_file,
                key_file,
            }),
            _ => None,
        };
        let endpoint = Endpoint::new(EndpointOptions {
            servers: c.url,
            credentials_file: c.credentials_file,
            ca_file: opt(c.ca_file),
            identity,
            name: &format!("sensor agent {agent}"),
            // Acknowledgements come back under the agent's own inbox, which the server's
            // permissions can give to this agent alone.
            inbox_prefix: format!("_INBOX.{agent}"),
        })?;
        Ok(Self {
            endpoint,
            connection: None,
            agent: agent.to_owned(),
            spool_stream,
            subject_prefix: c.subject_prefix.to_owned(),
            stream: c.stream.to_owned(),
            partitions: c.partitions,
            timeout: Duration::from_secs(c.timeout_secs),
            batch_max: c.batch_max_records,
            hot,
            hot_subject: hot_subject(c.subject_prefix),
            hot_task: None,
        })
    }

    async fn connected(&mut self) -> Result<(async_nats::Client, jetstream::Context), SinkError> {
        if let Some(c) = &self.connection {
            let c = c.clone();
            if self.hot_task.is_none() {
                self.subscribe_hot(&c.0).await;
            }
            return Ok(c);
        }
        let client = self.endpoint.connect(self.timeout).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(self.timeout)
            .build(client.clone());
        self.connection = Some((client.clone(), js.clone()));
        self.subscribe_hot(&client).await;
        Ok((client, js))
    }

    /// The collector's hot cells (the client subscribes again by itself after reconnecting).
    /// A subscription that fails is tried again at the next delivery; one the server's
    /// permissions refuse only costs the naming back of thin clients.
    async fn subscribe_hot(&mut self, client: &async_nats::Client) {
        match client.subscribe(self.hot_subject.clone()).await {
            Ok(mut sub) => {
                let hot = self.hot.clone();
                self.hot_task = Some(tokio::spawn(async move {
                    while let Some(msg) = sub.next().await {
                        if msg
                            .headers
                            .as_ref()
                            .is_some_and(|h| h.get(PARTS_HEADER).is_some())
                        {
                            hot.set_takes_parts(true);
                        }
                        if let Ok(all) = serde_json::from_slice::<HotByKey>(&msg.payload) {
                            hot.set_from(&all, Now::system().secs());
                        }
                    }
                }));
            }
            Err(e) => warn!("subscribing to {}: {e}", self.hot_subject),
        }
    }

    fn subject(&self, p: u32) -> String {
        partition_subject(&self.subject_prefix, &self.agent, self.partitions, p)
    }

    /// `Nats-Msg-Id` of partition `p`'s message of positions `first..=last`: unpartitioned
    /// as it always was (a message retried across an upgrade is still recognized).
    fn message_id(&self, p: u32, first: u64, last: u64) -> String {
        let id = format!("{}-{}-{first}-{last}", self.agent, self.spool_stream);
        if self.partitions <= 1 {
            id
        } else {
            format!("{id}-p{p}")
        }
    }

    /// The batch's messages, by partition (only partitions with records of it): as many of
    /// its first records as fit the server's `max_payload` in every message (halving), and
    /// how many that is. A single record too large for any message is refused for good.
    fn messages(
        &self,
        batch: &[ShipRecord],
        max_payload: usize,
    ) -> Result<(Vec<Message>, usize), Failed> {
        let mut n = batch.len();
        loop {
            let records = crate::ship::for_sending(&batch[..n], Now::system().secs());
            let mut messages = Vec::new();
            let mut largest = 0;
            for (p, records) in (0..).zip(partition::split(&records, self.partitions)) {
                if records.is_empty() {
                    continue;
                }
                let body = encode(&Batch {
                    version: WIRE_VERSION,
                    agent: self.agent.clone(),
                    stream: self.spool_stream.clone(),
                    records,
                })
                .map_err(|e| match e {
                    EncodeError::Json(e) => SinkError::Protocol(format!("encoding a batch: {e}")),
                    EncodeError::Compress(e) => SinkError::io("compressing a batch", e),
                })?;
                largest = largest.max(body.len());
                if body.len() + HEADERS_ROOM > max_payload {
                    break;
                }
                messages.push((p, body));
            }
            if largest + HEADERS_ROOM <= max_payload {
                return Ok((messages, n));
            }
            if n == 1 {
                // No server of this cluster takes it: refused for good (dropped, counted).
                return Err(Failed {
                    done: Delivered::rejected(0, 1),
                    error: SinkError::Protocol(format!(
                        "record {} is {largest} bytes compressed, over the server's max_payload {max_payload}",
                        batch[0].seq,
                    )),
                    retry_after: None,
                });
            }
            n /= 2;
        }
    }

    /// A publish without an acknowledgement: nothing of the batch counts as delivered.
    fn unacknowledged(&self, id: &str, subject: &str, e: &dyn std::fmt::Display) -> Failed {
        // A refused publish (permissions) is an asynchronous server error, not an answer:
        // name it beside the missing acknowledgement.
        let server = self
            .endpoint
            .take_server_error()
            .map(|s| format!(" (server: {s})"))
            .unwrap_or_default();
        Failed::after(
            0,
            SinkError::Protocol(format!(
                "JetStream did not acknowledge {id} on {subject}: {e}{server}"
            )),
        )
    }
}

impl Sink for JetStreamSink {
    type Item = ShipRecord;

    fn target(&self) -> String {
        let subject = if self.partitions <= 1 {
            self.subject(0)
        } else {
            // Every partition's subject, in one pattern.
            format!("{}.p*.{}", self.subject_prefix, self.agent)
        };
        format!("{} {subject}", self.endpoint.target())
    }

    fn batch_max(&self) -> usize {
        self.batch_max
    }

    /// Connects (and subscribes to the hot cells) at start: the collector's hot cells, and
    /// whether it takes early parts, are then known before the first alert, not seconds
    /// after it. A failure here is retried by the first delivery.
    async fn prepare(&mut self) {
        if let Err(e) = self.connected().await {
            log::info!("not connected to NATS yet ({e}); the first delivery tries again");
        }
    }

    async fn deliver(&mut self, batch: &[ShipRecord]) -> Result<Delivered, Failed> {
        let Some(first) = batch.first() else {
            return Ok(Delivered::all(0));
        };
        let (client, js) = self.connected().await?;
        let max_payload = client.server_info().max_payload;
        let (messages, n) = self.messages(batch, max_payload)?;
        let (first, last) = (first.seq, batch[n - 1].seq);
        // Every partition's message is published before any acknowledgement is awaited:
        // one round trip for the batch, not one per partition. Within a subject the order
        // holds: the next batch is published only once this one is acknowledged.
        let mut pending = Vec::with_capacity(messages.len());
        for (p, body) in messages {
            let id = self.message_id(p, first, last);
            let subject = self.subject(p);
            let mut publish = PublishMessage::build()
                .payload(body.into())
                .message_id(&id)
                .expected_stream(partition_stream(&self.stream, self.partitions, p));
            if self.partitions > 1 {
                publish = publish.header(POSITIONS_HEADER, format!("{first}-{last}"));
            }
            match js.send_publish(subject.clone(), publish).await {
                Ok(ack) => pending.push((id, subject, ack)),
                Err(e) => return Err(self.unacknowledged(&id, &subject, &e)),
            }
        }
        for (id, subject, ack) in pending {
            // A duplicate was stored before (its acknowledgement was lost): delivered too.
            if let Err(e) = ack.await {
                return Err(self.unacknowledged(&id, &subject, &e));
            }
        }
        Ok(Delivered::all(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ship::{ClientDelta, Summary};

    fn sink(dir: &std::path::Path, partitions: u32) -> JetStreamSink {
        std::fs::create_dir_all(dir).expect("dir");
        std::fs::write(dir.join("creds"), "host-a:secret-password").expect("creds");
        std::fs::write(
            dir.join("ca.pem"),
            include_str!("../../collector/testdata/client-host-a.pem"),
        )
        .expect("ca");
        let (creds, ca) = (dir.join("creds"), dir.join("ca.pem"));
        let keys = NatsKeys {
            url: "tls://127.0.0.1:4222",
            credentials_file: &creds,
            ca_file: &ca,
            client_cert_file: std::path::Path::new(""),
            client_key_file: std::path::Path::new(""),
            token_file: std::path::Path::new(""),
            server_name: "",
            stream: "SENSOR",
            subject_prefix: "sensor.ship",
            batch_max_records: 100,
            timeout_secs: 1,
            partitions,
        };
        JetStreamSink::new(&keys, "host-a", "ab12".into(), Arc::default()).expect("sink")
    }

    /// A record of `clients` distinct clients (about 100 bytes each, compressed less well
    /// than repeated text).
    fn record(seq: u64, clients: u64) -> ShipRecord {
        ShipRecord {
            seq,
            ..ShipRecord::summary(
                "host-a",
                Summary {
                    start_s: 1_800_000_000 + 10 * seq,
                    period_s: 10,
                    clients: (0..clients)
                        .map(|i| ClientDelta {
                            by: "identity".into(),
                            key: format!("k-{:012x}", (seq << 32) ^ i.wrapping_mul(0x9e37_79b9)),
                            counts: Default::default(),
                            open_connections: i,
                            identity: None,
                            forwarded: None,
                        })
                        .collect(),
                    rest: Default::default(),
                    sketch: Default::default(),
                    sketch_key: String::new(),
                    elsewhere: Default::default(),
                },
            )
        }
    }

    /// Batches larger than the server's max_payload are cut to what fits; a record that fits
    /// no message is refused for good (dropped and counted), never retried forever.
    #[test]
    fn messages_fit_the_servers_max_payload() {
        let dir = std::env::temp_dir().join(format!("sensor-nats-sink-{}", std::process::id()));
        let s = sink(&dir, 1);
        assert_eq!(s.subject(0), "sensor.ship.host-a");
        let batch: Vec<ShipRecord> = (1..=8).map(|i| record(i, 300)).collect();
        let only = |(m, n): (Vec<Message>, usize)| {
            assert_eq!(m.len(), 1, "one message unpartitioned");
            (m.into_iter().next().map(|(_, b)| b).unwrap_or_default(), n)
        };
        let (whole, n) = only(s.messages(&batch, 1 << 20).expect("fits"));
        assert_eq!(n, 8);
        let one = only(s.messages(&batch[..1], 1 << 20).expect("one")).0.len();
        let (part, n) = only(s.messages(&batch, one * 3 + HEADERS_ROOM).expect("part"));
        assert!((1..8).contains(&n), "{n}");
        assert!(part.len() + HEADERS_ROOM <= one * 3 + HEADERS_ROOM);
        assert!(whole.len() > part.len());
        let Err(f) = s.messages(&batch, one / 2) else {
            panic!("a record over max_payload")
        };
        assert_eq!(f.done, Delivered::rejected(0, 1));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn decode(body: &[u8]) -> Batch {
        let mut json = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(body), &mut json)
            .expect("gunzip");
        serde_json::from_slice(&json).expect("batch")
    }

    /// Partitioned: one message per partition with records, each on its own subject and
    /// stream with a distinct id; together they carry every row once, with the sums of the
    /// batch; every one fits max_payload, or the batch is cut for all of them.
    #[test]
    fn a_batch_becomes_one_message_per_partition() {
        let dir = std::env::temp_dir().join(format!("sensor-nats-parts-{}", std::process::id()));
        let s = sink(&dir, 4);
        assert_eq!(s.subject(3), "sensor.ship.p3.host-a");
        assert_eq!(partition_stream("SENSOR", 4, 3), "SENSOR-p3");
        assert_eq!(partition_stream("SENSOR", 1, 0), "SENSOR");
        assert_eq!(
            partition_subject("sensor.ship", "a.b", 1, 0),
            "sensor.ship.a.b"
        );
        let batch: Vec<ShipRecord> = (1..=4).map(|i| record(i, 200)).collect();
        let (messages, n) = s.messages(&batch, 1 << 20).expect("fits");
        assert_eq!(n, 4);
        assert_eq!(
            messages.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            vec![0, 1, 2, 3],
            "200 keys a summary reach every partition"
        );
        let ids: std::collections::BTreeSet<String> = messages
            .iter()
            .map(|(p, _)| s.message_id(*p, 1, 4))
            .collect();
        assert_eq!(ids.len(), 4, "{ids:?}");
        assert!(ids.contains("host-a-ab12-1-4-p2"));
        assert_eq!(sink(&dir, 1).message_id(0, 1, 4), "host-a-ab12-1-4");
        let mut rows = 0;
        let mut opened = 0;
        for (p, body) in &messages {
            let b = decode(body);
            assert_eq!(b.records.len(), 4, "every summary in every partition");
            for r in &b.records {
                let crate::ship::Payload::Summary(sum) = &r.payload else {
                    panic!("summaries")
                };
                for c in &sum.clients {
                    assert_eq!(partition::partition_of(&c.by, &c.key, 4), *p);
                    rows += 1;
                    opened += c.open_connections;
                }
            }
        }
        assert_eq!(rows, 4 * 200, "every row once");
        assert_eq!(opened, 4 * (0..200).sum::<u64>(), "sums preserved");
        // A bound that one partition's message of the whole batch exceeds: cut for all.
        let largest = messages.iter().map(|(_, b)| b.len()).max().unwrap_or(0);
        let (cut, n) = s.messages(&batch, largest + HEADERS_ROOM - 1).expect("cut");
        assert!(n < 4, "{n}");
        assert!(
            cut.iter()
                .all(|(_, b)| b.len() + HEADERS_ROOM < largest + HEADERS_ROOM)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
