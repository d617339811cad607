//! The agent's sink for shipping to a collector (`[ship]`): its configuration and the
//! transport, batches of [`crate::wire`] records, compressed, over HTTPS with a bearer token
//! (and a client certificate when the collector asks for one).
//!
//! Delivery reuses the SIEM outputs' machinery ([`super::delivery::worker`]): every record is appended
//! to a durable, bounded spool on disk before it counts as shipped, delivered in order,
//! retried with backoff, and what the bound forces out is dropped and counted.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use super::{
    delivery::{Delivery, Output},
    error::OutputError,
    http::{self, ClientIdentity},
    spool::Spooled,
};
use crate::ship::{
    Batch, EncodeError, MAX_CLIENTS_PER_SUMMARY, ShipRecord, WIRE_VERSION, encode, valid_name,
};

// --- configuration ------------------------------------------------------------------------

/// `[ship]`: where and how the agent ships to a collector (off while `url` is empty).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ShipConfig {
    pub url: String,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
    pub server_name: String,
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
    pub agent_name: String,
    pub top_clients: usize,
    pub batch_max_records: usize,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    pub retry_max_secs: u64,
    pub timeout_secs: u64,
}

impl Default for ShipConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            token_file: PathBuf::new(),
            ca_file: PathBuf::new(),
            server_name: String::new(),
            client_cert_file: PathBuf::new(),
            client_key_file: PathBuf::new(),
            agent_name: String::new(),
            top_clients: 200,
            batch_max_records: 100,
            spool_dir: PathBuf::new(),
            spool_max_bytes: 256 * 1024 * 1024,
            retry_max_secs: 30,
            timeout_secs: 10,
        }
    }
}

fn opt_path(p: &Path) -> Option<&Path> {
    (!p.as_os_str().is_empty()).then_some(p)
}

impl ShipConfig {
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }

    /// Validation errors as (key, message).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !self.enabled() {
            return Ok(());
        }
        let url = http::Url::parse(&self.url).map_err(|e| ("url", e))?;
        if !url.tls {
            return Err((
                "url",
                "the collector URL must be https:// (tokens never travel in clear)".into(),
            ));
        }
        if self.token_file.as_os_str().is_empty() {
            return Err(("token_file", "shipping needs a token_file".into()));
        }
        if opt_path(&self.client_cert_file).is_some() != opt_path(&self.client_key_file).is_some() {
            return Err((
                "client_cert_file",
                "client_cert_file and client_key_file go together".into(),
            ));
        }
        if !self.agent_name.is_empty() && !valid_name(&self.agent_name) {
            return Err((
                "agent_name",
                "names are 1-128 letters, digits, -, _ and .".into(),
            ));
        }
        if !(1..=MAX_CLIENTS_PER_SUMMARY / 4).contains(&self.top_clients) {
            return Err((
                "top_clients",
                format!("must be 1..={}", MAX_CLIENTS_PER_SUMMARY / 4),
            ));
        }
        if !(1..=1000).contains(&self.batch_max_records) {
            return Err(("batch_max_records", "must be 1..=1000".into()));
        }
        if self.spool_max_bytes < 4096 {
            return Err(("spool_max_bytes", "must be at least 4096".into()));
        }
        if self.retry_max_secs == 0 {
            return Err(("retry_max_secs", "must be at least 1".into()));
        }
        if self.timeout_secs == 0 {
            return Err(("timeout_secs", "must be at least 1".into()));
        }
        Ok(())
    }

    pub fn spool_dir(&self, state_dir: &Path) -> PathBuf {
        opt_path(&self.spool_dir).map_or_else(
            || state_dir.join("spool").join("collector"),
            Path::to_path_buf,
        )
    }
}

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
fn encode_error(e: EncodeError) -> OutputError {
    match e {
        EncodeError::Json(e) => OutputError::Protocol(format!("encoding a batch: {e}")),
        EncodeError::Compress(e) => OutputError::io("compressing a batch", e),
    }
}

// --- the transport --------------------------------------------------------------------------

/// The stream id kept beside the spool: created once, with the spool.
pub fn stream_id(spool_dir: &Path) -> Result<String, OutputError> {
    let path = spool_dir.join("stream");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(OutputError::io(format!("reading {}", path.display()), e)),
    }
    let mut raw = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut raw))
        .map_err(|e| OutputError::io("reading /dev/urandom", e))?;
    let id = http::hex(&raw);
    std::fs::create_dir_all(spool_dir)
        .and_then(|()| std::fs::write(&path, &id))
        .map_err(|e| OutputError::io(format!("writing {}", path.display()), e))?;
    Ok(id)
}

/// Delivers batches of records to the collector.
pub struct ShipOutput {
    client: http::Client,
    token: String,
    agent: String,
    stream: String,
    batch_max: usize,
    /// After the collector refused a batch, send one record at a time to find the bad one.
    one_by_one: bool,
}

impl ShipOutput {
    pub fn new(c: &ShipConfig, agent: &str, stream: String) -> Result<Self, OutputError> {
        let identity = match (opt_path(&c.client_cert_file), opt_path(&c.client_key_file)) {
            (Some(cert_file), Some(key_file)) => Some(ClientIdentity {
                cert_file,
                key_file,
            }),
            _ => None,
        };
        let client = http::Client::with_identity(
            &c.url,
            opt_path(&c.ca_file),
            (!c.server_name.is_empty()).then_some(c.server_name.as_str()),
            identity,
            Duration::from_secs(c.timeout_secs),
        )?;
        Ok(Self {
            client,
            token: http::read_secret(&c.token_file, "collector token")?,
            agent: agent.to_owned(),
            stream,
            batch_max: c.batch_max_records,
            one_by_one: false,
        })
    }

    pub fn target(&self) -> String {
        format!(
            "{}://{}{}",
            if self.client.url.tls { "https" } else { "http" },
            self.client.url.authority(),
            self.client.url.path
        )
    }
}

impl Output for ShipOutput {
    type Item = ShipRecord;

    fn batch_max(&self) -> usize {
        if self.one_by_one { 1 } else { self.batch_max }
    }

    async fn deliver(&mut self, batch: &[ShipRecord]) -> Delivery {
        let body = match encode(&Batch {
            version: WIRE_VERSION,
            agent: self.agent.clone(),
            stream: self.stream.clone(),
            records: batch.to_vec(),
        }) {
            Ok(b) => b,
            Err(e) => return Delivery::failed(0, encode_error(e)),
        };
        let headers = [
            ("Authorization", format!("Bearer {}", self.token)),
            ("Content-Type", "application/json".to_owned()),
            ("Content-Encoding", "gzip".to_owned()),
        ];
        let r = match self.client.post(&headers, &body).await {
            Ok(r) => r,
            Err(e) => return Delivery::failed(0, e),
        };
        let error = OutputError::Http {
            status: r.status,
            reason: r.body.chars().take(200).collect(),
        };
        match r.status {
            200..=299 => {
                self.one_by_one = false;
                Delivery::all(batch.len())
            }
            // Refused as malformed: find the bad record, then drop (and count) only it.
            400 | 413 | 422 if batch.len() > 1 => {
                self.one_by_one = true;
                Delivery::failed(0, error)
            }
            400 | 413 | 422 => Delivery {
                rejected: 1,
                error: Some(error),
                ..Delivery::default()
            },
            // Bad token, overload, outage: keep everything and retry.
            _ => Delivery {
                retry_after: r.retry_after(),
                ..Delivery::failed(0, error)
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::aggregate::{Aggregator, Counts, Delta, Now},
        ship::summarize,
    };

    fn bytes(n: u64) -> Delta {
        Delta {
            counts: Counts {
                requests: 1,
                bytes_in: n,
                bytes_out: 10 * n,
                ..Counts::default()
            },
            ..Delta::default()
        }
    }

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
        let out =
            ShipOutput::new(&c, "host-a", stream_id(&spool_dir).expect("stream")).expect("output");
        let stats =
            std::sync::Arc::new(std::sync::Mutex::new(crate::sinks::OutputStats::default()));
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let task = tokio::spawn(crate::sinks::worker(
            out,
            spool,
            rx,
            stats.clone(),
            Duration::from_secs(60),
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
            let s = summarize(&agg, t, 10).expect("summary");
            tx.send(ShipRecord::summary("host-a", s))
                .await
                .expect("send");
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
        drop(tx);
        let _ = task.await;
        let reopened =
            crate::sinks::spool::Spool::<ShipRecord>::open(&spool_dir, 4096).expect("reopen");
        assert_eq!(reopened.len() as u64, s.pending);
        let kept = reopened.peek(usize::MAX);
        assert_eq!(kept.last().map(|r| r.seq), Some(n));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn config_validation() {
        let ok = ShipConfig {
            url: "https://collector.example.net:9443/v1/ingest".into(),
            token_file: "/etc/sensor/ship.token".into(),
            ..ShipConfig::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        let plain = ShipConfig {
            url: "http://collector:9443/v1/ingest".into(),
            ..ok.clone()
        };
        assert_eq!(plain.validate().map_err(|e| e.0), Err("url"));
        let half = ShipConfig {
            client_cert_file: "/c.pem".into(),
            ..ok.clone()
        };
        assert_eq!(half.validate().map_err(|e| e.0), Err("client_cert_file"));
        assert!(ShipConfig::default().validate().is_ok());
    }
}
