//! Splunk HTTP Event Collector: batches of events POSTed to `/services/collector/event` with
//! `Authorization: Splunk <token>`, each event `{"time", "host", "source", "sourcetype",
//! ["index",] "event"}` and the batch their concatenation.
//!
//! - [`config`]: `type = "hec"` and its validation.
//! - [`sink`]: the envelope, the request, and how Splunk's answers are taken.

pub mod config;
pub mod sink;

pub use config::HecConfig;
