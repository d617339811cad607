//! Generic webhook: one JSON POST per alert event, the body being the record (`id`, `seq`,
//! `event`, `alert`), with `X-Sensor-Event-Id` and, when a secret is configured,
//! `X-Sensor-Signature: sha256=<hex HMAC-SHA256 of the body keyed with the secret>`.
//!
//! - [`config`]: `type = "webhook"` and its validation.
//! - [`sink`]: the signed request, and how answers are taken.

pub mod config;
pub mod sink;

pub use config::WebhookConfig;

use sink::WebhookSink;

use crate::sinks::{
    configure::{Configure, Invalid},
    error::SinkError,
    running::{Context, Running},
};

impl Configure for WebhookConfig {
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn validate(&self) -> Result<(), Invalid> {
        WebhookConfig::validate(self)
    }

    fn disk_spool(&self) -> Option<Option<&std::path::Path>> {
        Some(self.spool_dir.as_deref())
    }

    fn start(&self, ctx: &Context<'_>) -> Result<Running, SinkError> {
        self.delivery()
            .start(ctx, |timeout| WebhookSink::new(self, timeout))
    }
}
