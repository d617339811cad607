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
        sketch::{Hot, HotByKey, hot_subject},
    },
    sinks::{
        error::SinkError,
        sink::{Delivered, Failed, Sink},
    },
};

/// Room left under the server's `max_payload` for the message's headers.
const HEADERS_ROOM: usize = 512;

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
    subject: String,
    stream: String,
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
            subject: format!("{}.{agent}", c.subject_prefix),
            stream: c.stream.to_owned(),
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
                        if let Ok(all) = serde_json::from_slice::<HotByKey>(&msg.payload) {
                            hot.set_from(&all, Now::system().secs());
                        }
                    }
                }));
            }
            Err(e) => warn!("subscribing to {}: {e}", self.hot_subject),
        }
    }

    /// The batch's message: as many of its first records as fit the server's `max_payload`
    /// (halving), and how many that is. A single record too large for any message is `None`.
    fn message(
        &self,
        batch: &[ShipRecord],
        max_payload: usize,
    ) -> Result<(Vec<u8>, usize), Failed> {
        let mut n = batch.len();
        loop {
            let body = encode(&Batch {
                version: WIRE_VERSION,
                agent: self.agent.clone(),
                stream: self.spool_stream.clone(),
                records: crate::ship::for_sending(&batch[..n], Now::system().secs()),
            })
            .map_err(|e| match e {
                EncodeError::Json(e) => SinkError::Protocol(format!("encoding a batch: {e}")),
                EncodeError::Compress(e) => SinkError::io("compressing a batch", e),
            })?;
            if body.len() + HEADERS_ROOM <= max_payload {
                return Ok((body, n));
            }
            if n == 1 {
                // No server of this cluster takes it: refused for good (dropped, counted).
                return Err(Failed {
                    done: Delivered::rejected(0, 1),
                    error: SinkError::Protocol(format!(
                        "record {} is {} bytes compressed, over the server's max_payload {max_payload}",
                        batch[0].seq,
                        body.len()
                    )),
                    retry_after: None,
                });
            }
            n /= 2;
        }
    }
}

impl Sink for JetStreamSink {
    type Item = ShipRecord;

    fn target(&self) -> String {
        format!("{} {}", self.endpoint.target(), self.subject)
    }

    fn batch_max(&self) -> usize {
        self.batch_max
    }

    async fn deliver(&mut self, batch: &[ShipRecord]) -> Result<Delivered, Failed> {
        let Some(first) = batch.first() else {
            return Ok(Delivered::all(0));
        };
        let (client, js) = self.connected().await?;
        let max_payload = client.server_info().max_payload;
        let (body, n) = self.message(batch, max_payload)?;
        let id = format!(
            "{}-{}-{}-{}",
            self.agent,
            self.spool_stream,
            first.seq,
            batch[n - 1].seq
        );
        let publish = PublishMessage::build()
            .payload(body.into())
            .message_id(&id)
            .expected_stream(&self.stream);
        let acked = match js.send_publish(self.subject.clone(), publish).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match acked {
            // A duplicate was stored before (its acknowledgement was lost): delivered too.
            Ok(_) => Ok(Delivered::all(n)),
            Err(e) => {
                // A refused publish (permissions) is an asynchronous server error, not an
                // answer: name it beside the missing acknowledgement.
                let server = self
                    .endpoint
                    .take_server_error()
                    .map(|s| format!(" (server: {s})"))
                    .unwrap_or_default();
                Err(Failed::after(
                    0,
                    SinkError::Protocol(format!(
                        "JetStream did not acknowledge {id} on {}: {e}{server}",
                        self.subject
                    )),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ship::{ClientDelta, Summary};

    fn sink(dir: &std::path::Path) -> JetStreamSink {
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
                },
            )
        }
    }

    /// Batches larger than the server's max_payload are cut to what fits; a record that fits
    /// no message is refused for good (dropped and counted), never retried forever.
    #[test]
    fn messages_fit_the_servers_max_payload() {
        let dir = std::env::temp_dir().join(format!("sensor-nats-sink-{}", std::process::id()));
        let s = sink(&dir);
        assert_eq!(s.subject, "sensor.ship.host-a");
        let batch: Vec<ShipRecord> = (1..=8).map(|i| record(i, 300)).collect();
        let (whole, n) = s.message(&batch, 1 << 20).expect("fits");
        assert_eq!(n, 8);
        let one = s.message(&batch[..1], 1 << 20).expect("one").0.len();
        let (part, n) = s.message(&batch, one * 3 + HEADERS_ROOM).expect("part");
        assert!((1..8).contains(&n), "{n}");
        assert!(part.len() + HEADERS_ROOM <= one * 3 + HEADERS_ROOM);
        assert!(whole.len() > part.len());
        let Err(f) = s.message(&batch, one / 2) else {
            panic!("a record over max_payload")
        };
        assert_eq!(f.done, Delivered::rejected(0, 1));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
