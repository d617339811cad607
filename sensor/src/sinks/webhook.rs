//! Generic webhook: one JSON POST per alert event, the body being the record (`id`, `seq`,
//! `event`, `alert`), with `X-Sensor-Event-Id` and, when a secret is configured,
//! `X-Sensor-Signature: sha256=<hex HMAC-SHA256 of the body keyed with the secret>`.
//!
//! 2xx is delivered; 400, 413 and 422 refuse the event for good (dropped, counted, logged);
//! anything else (or no answer) is retried with backoff.

use std::time::Duration;

use hmac::{Hmac, Mac as _};
use log::warn;
use sha2::Sha256;

use super::{
    config::OutputConfig,
    delivery::{Delivery, Output},
    error::OutputError,
    http,
};
use crate::formats::{Format as _, JsonFormat, Record};

pub const SIGNATURE_HEADER: &str = "X-Sensor-Signature";

pub struct WebhookOutput {
    client: http::Client,
    secret: Option<Vec<u8>>,
}

/// `sha256=<hex>` of `body` keyed with `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length; new_from_slice cannot fail for it.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(body);
    format!("sha256={}", http::hex(&mac.finalize().into_bytes()))
}

impl WebhookOutput {
    pub fn new(c: &OutputConfig, timeout: Duration) -> Result<Self, OutputError> {
        let url = c.url.as_deref().unwrap_or_default();
        let secret = match &c.secret_file {
            Some(p) => Some(http::read_secret(p, "webhook secret file")?.into_bytes()),
            None => None,
        };
        Ok(Self {
            client: http::Client::new(
                url,
                c.ca_file.as_deref(),
                c.server_name.as_deref(),
                timeout,
            )?,
            secret,
        })
    }

    pub fn target(&self) -> String {
        let u = &self.client.url;
        format!(
            "{}://{}{}",
            if u.tls { "https" } else { "http" },
            u.authority(),
            u.path
        )
    }
}

impl Output for WebhookOutput {
    type Item = Record;
    async fn deliver(&mut self, batch: &[Record]) -> Delivery {
        let Some(rec) = batch.first() else {
            return Delivery::default();
        };
        let body = JsonFormat.format(rec);
        let mut headers = vec![
            ("Content-Type", "application/json".to_owned()),
            ("X-Sensor-Event-Id", rec.id.clone()),
        ];
        if let Some(secret) = &self.secret {
            headers.push((SIGNATURE_HEADER, signature(secret, body.as_bytes())));
        }
        match self.client.post(&headers, body.as_bytes()).await {
            Ok(r) if (200..300).contains(&r.status) => Delivery::all(1),
            Ok(r) if matches!(r.status, 400 | 413 | 422) => {
                warn!(
                    "webhook {} refused event {} (HTTP {}: {}); dropped",
                    self.target(),
                    rec.id,
                    r.status,
                    r.body.chars().take(200).collect::<String>()
                );
                Delivery {
                    rejected: 1,
                    ..Delivery::default()
                }
            }
            Ok(r) => Delivery {
                retry_after: r.retry_after(),
                ..Delivery::failed(
                    0,
                    OutputError::Http {
                        status: r.status,
                        reason: r.body.chars().take(200).collect(),
                    },
                )
            },
            Err(e) => Delivery::failed(0, e),
        }
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
