//! The HEC request and how Splunk's answers are taken, as Splunk documents them: 200
//! delivered; 400 (invalid data, with `invalid-event-number`) refuses that event for good:
//! the events before it were indexed, it is dropped and counted with the reason logged, the
//! rest is sent again; 401/403 (token missing, invalid or disabled) are logged and retried,
//! as are 429, 503 (server busy, HEC unhealthy) and any other error, with exponential backoff
//! (at least Retry-After); 413 halves the batch.

use std::time::Duration;

use log::warn;
use serde_json::{Value, json};

use super::config::{DEFAULT_BATCH, DEFAULT_SOURCE, DEFAULT_SOURCETYPE, HecConfig};
use crate::{
    formats::Record,
    net::{
        client::{HttpClient, Response, TlsOptions},
        secrets,
    },
    sinks::{
        error::SinkError,
        sink::{Delivered, Failed, Sink},
    },
};

pub struct HecSink {
    client: HttpClient,
    token: String,
    source: String,
    sourcetype: String,
    index: Option<String>,
    batch: usize,
}

/// One event's envelope.
pub fn envelope(rec: &Record, source: &str, sourcetype: &str, index: Option<&str>) -> Value {
    let mut v = json!({
        "time": rec.time_ms() as f64 / 1000.0,
        "host": rec.alert.host,
        "source": source,
        "sourcetype": sourcetype,
        "event": rec,
    });
    if let Some(index) = index {
        v["index"] = json!(index);
    }
    v
}

/// Splunk's error body: `{"text": "...", "code": N, "invalid-event-number": N}`.
fn reason(body: &str) -> (String, Option<usize>) {
    match serde_json::from_str::<Value>(body) {
        Ok(v) => {
            let text = v["text"].as_str().unwrap_or("").to_owned();
            let code = v["code"]
                .as_i64()
                .map(|c| format!(" (code {c})"))
                .unwrap_or_default();
            let invalid = v["invalid-event-number"].as_u64().map(|n| n as usize);
            (format!("{text}{code}"), invalid)
        }
        Err(_) => (body.chars().take(200).collect(), None),
    }
}

impl HecSink {
    pub fn new(c: &HecConfig, timeout: Duration) -> Result<Self, SinkError> {
        let tls = TlsOptions {
            ca_file: c.ca_file.as_deref(),
            server_name: c.server_name.as_deref(),
            identity: None,
        };
        Ok(Self {
            client: HttpClient::new(&c.url, tls, timeout)?,
            token: secrets::read_secret(&c.token_file, "HEC token file")?,
            source: c.source.clone().unwrap_or_else(|| DEFAULT_SOURCE.into()),
            sourcetype: c
                .sourcetype
                .clone()
                .unwrap_or_else(|| DEFAULT_SOURCETYPE.into()),
            index: c.index.clone(),
            batch: c.batch_max_events.unwrap_or(DEFAULT_BATCH),
        })
    }

    pub fn body(&self, batch: &[Record]) -> String {
        batch
            .iter()
            .map(|r| envelope(r, &self.source, &self.sourcetype, self.index.as_deref()).to_string())
            .collect()
    }
}

impl Sink for HecSink {
    type Item = Record;

    fn target(&self) -> String {
        self.client.target()
    }

    fn batch_max(&self) -> usize {
        self.batch
    }

    async fn deliver(&mut self, batch: &[Record]) -> Result<Delivered, Failed> {
        if batch.is_empty() {
            return Ok(Delivered::default());
        }
        let body = self.body(batch);
        let headers = [
            ("Authorization", format!("Splunk {}", self.token)),
            ("Content-Type", "application/json".to_owned()),
        ];
        let resp = self.client.post(&headers, body.as_bytes()).await?;
        self.classify(&resp, batch)
    }
}

impl HecSink {
    /// What Splunk's answer means for the batch (see the module docs).
    fn classify(&mut self, resp: &Response, batch: &[Record]) -> Result<Delivered, Failed> {
        let (text, invalid) = reason(&resp.body);
        let error = SinkError::Http {
            status: resp.status,
            reason: text.clone(),
        };
        match resp.status {
            200..=299 => Ok(Delivered::all(batch.len())),
            400 => {
                let at = invalid.unwrap_or(0).min(batch.len().saturating_sub(1));
                let refused = if invalid.is_some() {
                    1
                } else {
                    batch.len() - at
                };
                for r in batch.iter().skip(at).take(refused) {
                    warn!(
                        "HEC {} refused event {}: {text}; dropped",
                        self.target(),
                        r.id
                    );
                }
                Ok(Delivered::rejected(at, refused))
            }
            401 | 403 => {
                warn!(
                    "HEC {}: token refused (HTTP {}: {text}); check token_file; retrying",
                    self.target(),
                    resp.status
                );
                Err(Failed::after(0, error))
            }
            413 if batch.len() > 1 => {
                self.batch = (batch.len() / 2).max(1);
                Err(Failed::after(0, error))
            }
            413 => {
                warn!(
                    "HEC {} refused event {} as too large; dropped",
                    self.target(),
                    batch.first().map_or("?", |r| r.id.as_str())
                );
                Ok(Delivered::rejected(0, 1))
            }
            _ => Err(Failed::after(0, error).retry_after(resp.retry_after())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::tests::record;

    fn sink(batch: usize) -> HecSink {
        HecSink {
            client: HttpClient::new(
                "http://127.0.0.1:8088/services/collector/event",
                TlsOptions::default(),
                Duration::from_secs(1),
            )
            .expect("client"),
            token: "t".into(),
            source: DEFAULT_SOURCE.into(),
            sourcetype: DEFAULT_SOURCETYPE.into(),
            index: Some("main".into()),
            batch,
        }
    }

    fn answer(status: u16, retry_after: Option<&'static str>, body: &str) -> Response {
        let mut headers = hyper::HeaderMap::new();
        if let Some(v) = retry_after {
            headers.insert(
                hyper::header::RETRY_AFTER,
                hyper::header::HeaderValue::from_static(v),
            );
        }
        Response {
            status,
            headers,
            body: body.into(),
        }
    }

    #[test]
    fn answers_are_classified() {
        let mut out = sink(4);
        let batch: Vec<Record> = (0..4)
            .map(|i| Record {
                id: format!("e{i}"),
                ..record("address", "10.0.0.1")
            })
            .collect();
        let ok = out.classify(&answer(200, None, ""), &batch);
        assert_eq!(ok.expect("accepted"), Delivered::all(4));
        // The third event is invalid: the two before it were indexed, it alone is refused.
        let bad = r#"{"text":"Invalid data format","code":6,"invalid-event-number":2}"#;
        let refused = out.classify(&answer(400, None, bad), &batch);
        assert_eq!(refused.expect("refused"), Delivered::rejected(2, 1));
        let token = out
            .classify(
                &answer(403, None, r#"{"text":"Invalid token","code":4}"#),
                &batch,
            )
            .expect_err("retried");
        assert_eq!(token.done, Delivered::default());
        let busy = out
            .classify(&answer(503, Some("7"), "busy"), &batch)
            .expect_err("retried");
        assert_eq!(busy.retry_after, Some(Duration::from_secs(7)));
        assert!(busy.error.to_string().contains("503"), "{}", busy.error);
        out.classify(&answer(413, None, ""), &batch)
            .expect_err("halved and retried");
        assert_eq!(out.batch_max(), 2);
        let alone = out.classify(&answer(413, None, ""), &batch[..1]);
        assert_eq!(alone.expect("dropped"), Delivered::rejected(0, 1));
    }

    #[test]
    fn envelopes_concatenate() {
        let out = sink(2);
        let (a, b) = (record("address", "10.0.0.1"), record("identity", "k-1"));
        let body = out.body(&[a.clone(), b]);
        let events: Vec<Value> = serde_json::Deserializer::from_str(&body)
            .into_iter::<Value>()
            .collect::<Result<_, _>>()
            .expect("concatenated JSON objects");
        assert_eq!(events.len(), 2);
        assert_eq!(events[0]["time"], 1_800_000_002.0);
        assert_eq!(events[0]["sourcetype"], "sensor:alert");
        assert_eq!(events[0]["index"], "main");
        assert_eq!(events[0]["host"], "gpu-host-1");
        assert_eq!(events[0]["event"]["id"], a.id);
        assert_eq!(events[1]["event"]["alert"]["key"], "k-1");
    }

    #[test]
    fn splunk_error_bodies() {
        let (text, n) =
            reason(r#"{"text":"Invalid data format","code":6,"invalid-event-number":2}"#);
        assert_eq!(
            (text.as_str(), n),
            ("Invalid data format (code 6)", Some(2))
        );
        let (text, n) = reason(r#"{"text":"Invalid token","code":4}"#);
        assert_eq!((text.as_str(), n), ("Invalid token (code 4)", None));
        assert_eq!(reason("busy").0, "busy");
    }
}
