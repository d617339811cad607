//! The collector sink: batches of wire records POSTed to `/v1/ingest`. 2xx is delivered;
//! 400, 413 and 422 refuse a batch as malformed: the batch is sent again one record at a
//! time to find the bad one, which alone is dropped and counted; anything else (a bad token,
//! overload, an outage) keeps everything and retries.

use std::{path::Path, time::Duration};

use super::config::{ShipConfig, opt_path};
use crate::{
    net::{
        client::{HttpClient, Response, TlsOptions},
        secrets,
        tls::ClientIdentity,
    },
    ship::{Batch, EncodeError, ShipRecord, WIRE_VERSION, encode},
    sinks::{
        error::SinkError,
        sink::{Delivered, Failed, Sink},
        spool::Spooled,
    },
};

// The spool numbers the records it keeps: that number is the record's stream position.
impl Spooled for ShipRecord {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn set_seq(&mut self, seq: u64) {
        self.seq = seq;
    }
}

/// The error a failed encoding reports, as it did when encoding was the sink's own.
fn encode_error(e: EncodeError) -> SinkError {
    match e {
        EncodeError::Json(e) => SinkError::Protocol(format!("encoding a batch: {e}")),
        EncodeError::Compress(e) => SinkError::io("compressing a batch", e),
    }
}

// --- the transport --------------------------------------------------------------------------

/// The stream id kept beside the spool: created once, with the spool.
pub fn stream_id(spool_dir: &Path) -> Result<String, SinkError> {
    let path = spool_dir.join("stream");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(SinkError::io(format!("reading {}", path.display()), e)),
    }
    let mut raw = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut raw))
        .map_err(|e| SinkError::io("reading /dev/urandom", e))?;
    let id = hex::encode(raw);
    std::fs::create_dir_all(spool_dir)
        .and_then(|()| std::fs::write(&path, &id))
        .map_err(|e| SinkError::io(format!("writing {}", path.display()), e))?;
    Ok(id)
}

/// Delivers batches of records to the collector.
pub struct ShipSink {
    client: HttpClient,
    token: String,
    agent: String,
    stream: String,
    batch_max: usize,
    /// After the collector refused a batch, send one record at a time to find the bad one.
    one_by_one: bool,
    /// Where the hot sketch cells of the collector's answers go.
    hot: std::sync::Arc<crate::ship::sketch::Hot>,
}

/// What the agent reads of the collector's answer to a batch.
#[derive(serde::Deserialize)]
struct Answer {
    #[serde(default)]
    hot: crate::ship::sketch::HotCells,
    #[serde(default)]
    sketches: bool,
    #[serde(default)]
    parts: bool,
}

impl ShipSink {
    pub fn new(
        c: &ShipConfig,
        agent: &str,
        stream: String,
        hot: std::sync::Arc<crate::ship::sketch::Hot>,
    ) -> Result<Self, SinkError> {
        let identity = match (opt_path(&c.client_cert_file), opt_path(&c.client_key_file)) {
            (Some(cert_file), Some(key_file)) => Some(ClientIdentity {
                cert_file,
                key_file,
            }),
            _ => None,
        };
        let tls = TlsOptions {
            ca_file: opt_path(&c.ca_file),
            server_name: (!c.server_name.is_empty()).then_some(c.server_name.as_str()),
            identity,
        };
        Ok(Self {
            client: HttpClient::new(&c.url, tls, Duration::from_secs(c.timeout_secs))?,
            token: secrets::read_secret(&c.token_file, "collector token")?,
            agent: agent.to_owned(),
            stream,
            batch_max: c.batch_max_records,
            one_by_one: false,
            hot,
        })
    }

    /// What the collector's answer means for the batch (see the module docs).
    fn classify(&mut self, r: &Response, batch: &[ShipRecord]) -> Result<Delivered, Failed> {
        let error = SinkError::Http {
            status: r.status,
            reason: r.body.chars().take(200).collect(),
        };
        match r.status {
            200..=299 => {
                self.one_by_one = false;
                // An answer without hot cells clears them; one saying `sketches` lets the
                // summaries carry sketches (an earlier collector refuses the field).
                if let Ok(a) = serde_json::from_str::<Answer>(&r.body) {
                    if a.sketches {
                        self.hot.set_supported();
                    }
                    // Each answer says it again (a collector rolled back stops it at once).
                    self.hot.set_takes_parts(a.parts);
                    self.hot
                        .set(&a.hot, crate::model::aggregate::Now::system().secs());
                }
                Ok(Delivered::all(batch.len()))
            }
            // Refused as malformed: find the bad record, then drop (and count) only it.
            400 | 413 | 422 if batch.len() > 1 => {
                self.one_by_one = true;
                Err(Failed::after(0, error))
            }
            400 | 413 | 422 => Err(Failed {
                done: Delivered::rejected(0, 1),
                error,
                retry_after: None,
            }),
            // Bad token, overload, outage: keep everything and retry.
            _ => Err(Failed::after(0, error).retry_after(r.retry_after())),
        }
    }
}

impl Sink for ShipSink {
    type Item = ShipRecord;

    fn target(&self) -> String {
        self.client.target()
    }

    fn batch_max(&self) -> usize {
        if self.one_by_one { 1 } else { self.batch_max }
    }

    async fn deliver(&mut self, batch: &[ShipRecord]) -> Result<Delivered, Failed> {
        let body = encode(&Batch {
            version: WIRE_VERSION,
            agent: self.agent.clone(),
            stream: self.stream.clone(),
            records: crate::ship::for_sending(batch, crate::model::aggregate::Now::system().secs()),
        })
        .map_err(encode_error)?;
        let headers = [
            ("Authorization", secrets::bearer_header(&self.token)),
            ("Content-Type", "application/json".to_owned()),
            ("Content-Encoding", "gzip".to_owned()),
        ];
        let r = self.client.post(&headers, &body).await?;
        self.classify(&r, batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::aggregate::{Aggregator, Now},
        ship::{summarize, tests::bytes},
    };

    /// With the collector unreachable, records wait in the disk spool within its bound; the
    /// oldest beyond it are dropped and counted, never silently.
    #[tokio::test]
    async fn an_unreachable_collector_spools_within_the_bound_and_counts_drops() {
        let dir = std::env::temp_dir().join(format!("sensor-ship-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("token"), "ship-token-0123456789").expect("token");
        // Nothing listens on port 1.
        let c = ShipConfig {
            url: "https://127.0.0.1:1/v1/ingest".into(),
            token_file: dir.join("token"),
            spool_max_bytes: 4096,
            ..ShipConfig::default()
        };
        let spool_dir = dir.join("spool");
        let spool =
            crate::sinks::spool::Spool::<ShipRecord>::open(&spool_dir, 4096).expect("spool");
        let out = ShipSink::new(
            &c,
            "host-a",
            stream_id(&spool_dir).expect("stream"),
            Default::default(),
        )
        .expect("output");
        let stats =
            std::sync::Arc::new(std::sync::Mutex::new(crate::sinks::OutputStats::default()));
        let queue = crate::sinks::engine::Queue::new(spool, stats.clone());
        let task = tokio::spawn(crate::sinks::engine::worker(
            out,
            queue.clone(),
            crate::sinks::retry::Retry::new(Duration::from_secs(60)),
        ));
        let n = 40u64;
        for i in 0..n {
            let mut agg = Aggregator::new(10, 24, 56);
            let t = 1_800_000_000 + 10 * i;
            agg.apply(
                std::net::IpAddr::from([10, 0, 0, 1]),
                &bytes(100 + i),
                Now { unix_ms: t * 1000 },
            );
            let s = summarize(&agg, t, 10, &crate::ship::Sample::off(), None).expect("summary");
            queue
                .push(ShipRecord::summary("host-a", s))
                .expect("spooled");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let s = loop {
            let s = stats.lock().expect("lock").clone();
            if s.spooled == n && s.retried >= 1 {
                break s;
            }
            assert!(tokio::time::Instant::now() < deadline, "stuck: {s:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(s.sent, 0);
        assert!(s.dropped > 0, "{s:?}");
        assert_eq!(
            s.dropped + s.pending,
            n,
            "every record pending or counted as dropped"
        );
        assert!(s.last_error.is_some(), "{s:?}");
        // What is pending survives a restart, within the bound, newest kept.
        queue.close();
        let _ = task.await;
        let reopened =
            crate::sinks::spool::Spool::<ShipRecord>::open(&spool_dir, 4096).expect("reopen");
        assert_eq!(reopened.len() as u64, s.pending);
        let kept = reopened.peek(usize::MAX);
        assert_eq!(kept.last().map(|r| r.seq), Some(n));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
