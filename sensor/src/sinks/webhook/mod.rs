//! Generic webhook: one JSON POST per alert event, the body being the record (`id`, `seq`,
//! `event`, `alert`), with `X-Sensor-Event-Id` and, when a secret is configured,
//! `X-Sensor-Signature: sha256=<hex HMAC-SHA256 of the body keyed with the secret>`.
//!
//! - [`config`]: `type = "webhook"` and its validation.
//! - [`sink`]: the signed request, and how answers are taken.

pub mod config;
pub mod sink;

pub use config::WebhookConfig;
