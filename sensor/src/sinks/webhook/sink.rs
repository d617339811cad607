//! The webhook request: 2xx is delivered; 400, 413 and 422 refuse the event for good
//! (dropped, counted, logged); anything else (or no answer) is retried with backoff.

use std::time::Duration;

use hmac::{Hmac, Mac as _};
use log::warn;
use sha2::Sha256;

use super::config::WebhookConfig;
use crate::{
    formats::{Format as _, JsonFormat, Record},
    net::{
        client::{HttpClient, Response, TlsOptions},
        secrets,
    },
    sinks::{
        error::SinkError,
        sink::{Delivered, Failed, Sink},
    },
};

pub const SIGNATURE_HEADER: &str = "X-Sensor-Signature";

pub struct WebhookSink {
    client: HttpClient,
    secret: Option<Vec<u8>>,
}

/// `sha256=<hex>` of `body` keyed with `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length; new_from_slice cannot fail for it.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl WebhookSink {
    pub fn new(c: &WebhookConfig, timeout: Duration) -> Result<Self, SinkError> {
        let secret = match &c.secret_file {
            Some(p) => Some(secrets::read_secret(p, "webhook secret file")?.into_bytes()),
            None => None,
        };
        let tls = TlsOptions {
            ca_file: c.ca_file.as_deref(),
            server_name: c.server_name.as_deref(),
            identity: None,
        };
        Ok(Self {
            client: HttpClient::new(&c.url, tls, timeout)?,
            secret,
        })
    }

    /// What the receiver's answer means for `rec` (see the module docs).
    fn classify(&self, r: &Response, rec: &Record) -> Result<Delivered, Failed> {
        match r.status {
            200..=299 => Ok(Delivered::all(1)),
            400 | 413 | 422 => {
                warn!(
                    "webhook {} refused event {} (HTTP {}: {}); dropped",
                    self.target(),
                    rec.id,
                    r.status,
                    r.body.chars().take(200).collect::<String>()
                );
                Ok(Delivered::rejected(0, 1))
            }
            _ => Err(Failed::after(
                0,
                SinkError::Http {
                    status: r.status,
                    reason: r.body.chars().take(200).collect(),
                },
            )
            .retry_after(r.retry_after())),
        }
    }
}

impl Sink for WebhookSink {
    type Item = Record;

    fn target(&self) -> String {
        self.client.target()
    }

    async fn deliver(&mut self, batch: &[Record]) -> Result<Delivered, Failed> {
        let Some(rec) = batch.first() else {
            return Ok(Delivered::default());
        };
        let body = JsonFormat.format(rec);
        let mut headers = vec![
            ("Content-Type", "application/json".to_owned()),
            ("X-Sensor-Event-Id", rec.id.clone()),
        ];
        if let Some(secret) = &self.secret {
            headers.push((SIGNATURE_HEADER, signature(secret, body.as_bytes())));
        }
        let r = self.client.post(&headers, body.as_bytes()).await?;
        self.classify(&r, rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_sha256_signature() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
