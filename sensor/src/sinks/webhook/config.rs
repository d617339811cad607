//! `type = "webhook"`: the URL and an optional HMAC secret.

use std::path::PathBuf;

use serde::Deserialize;

use crate::sinks::configure::{DeliveryKeys, Invalid, http_url};

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub name: Option<String>,
    /// http:// or https://.
    pub url: String,
    /// HMAC key: adds `X-Sensor-Signature`.
    pub secret_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub server_name: Option<String>,
    pub spool_dir: Option<PathBuf>,
    pub spool_max_bytes: Option<u64>,
    pub retry_max_secs: Option<u64>,
    pub timeout_secs: Option<u64>,
}

impl WebhookConfig {
    pub fn delivery(&self) -> DeliveryKeys<'_> {
        DeliveryKeys {
            spool_dir: self.spool_dir.as_deref(),
            spool_max_bytes: self.spool_max_bytes,
            retry_max_secs: self.retry_max_secs,
            timeout_secs: self.timeout_secs,
        }
    }
}

impl WebhookConfig {
    /// Checks what serde cannot (ranges, formats, keys that go together).
    pub fn validate(&self) -> Result<(), Invalid> {
        self.delivery().validate()?;
        http_url(&self.url, self.ca_file.as_ref(), self.server_name.as_ref())
    }
}
