//! `type = "hec"`: the endpoint, its token, and the event's metadata.

use std::path::PathBuf;

use serde::Deserialize;

use crate::sinks::configure::{DeliveryKeys, Invalid, http_url, positive};

pub const DEFAULT_SOURCETYPE: &str = "sensor:alert";
pub const DEFAULT_SOURCE: &str = "sensor";
pub const DEFAULT_BATCH: usize = 100;

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HecConfig {
    pub name: Option<String>,
    /// `.../services/collector/event`, https://, or http:// to a loopback address (the token is sent with each request).
    pub url: String,
    /// File holding the HEC token.
    pub token_file: PathBuf,
    pub sourcetype: Option<String>,
    pub source: Option<String>,
    pub index: Option<String>,
    /// Events per request (halved on HTTP 413).
    pub batch_max_events: Option<usize>,
    pub ca_file: Option<PathBuf>,
    pub server_name: Option<String>,
    pub spool_dir: Option<PathBuf>,
    pub spool_max_bytes: Option<u64>,
    pub retry_max_secs: Option<u64>,
    pub timeout_secs: Option<u64>,
}

impl HecConfig {
    pub fn delivery(&self) -> DeliveryKeys<'_> {
        DeliveryKeys {
            spool_dir: self.spool_dir.as_deref(),
            spool_max_bytes: self.spool_max_bytes,
            retry_max_secs: self.retry_max_secs,
            timeout_secs: self.timeout_secs,
        }
    }
}

impl HecConfig {
    /// Checks what serde cannot (ranges, formats, keys that go together).
    pub fn validate(&self) -> Result<(), Invalid> {
        self.delivery().validate()?;
        positive("batch_max_events", self.batch_max_events.map(|n| n as u64))?;
        http_url(&self.url, self.ca_file.as_ref(), self.server_name.as_ref())?;
        if let Ok(url) = crate::net::client::parse_url(&self.url)
            && !crate::net::client::may_carry_token(&url)
        {
            return Err((
                "url",
                "the HEC token would travel in clear: use https:// (plain http only to a \
                 loopback address)"
                    .into(),
            ));
        }
        if self.token_file.as_os_str().is_empty() {
            return Err((
                "token_file",
                "hec needs a token_file (the HEC token)".into(),
            ));
        }
        Ok(())
    }
}
