//! Splunk HTTP Event Collector: batches of events POSTed to `/services/collector/event` with
//! `Authorization: Splunk <token>`, each event `{"time", "host", "source", "sourcetype",
//! ["index",] "event"}` and the batch their concatenation.
//!
//! - [`config`]: `type = "hec"` and its validation.
//! - [`sink`]: the envelope, the request, and how Splunk's answers are taken.

pub mod config;
pub mod sink;

pub use config::HecConfig;

use sink::HecSink;

use crate::sinks::{
    configure::{Configure, Invalid},
    error::SinkError,
    running::{Context, Running},
};

impl Configure for HecConfig {
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn validate(&self) -> Result<(), Invalid> {
        HecConfig::validate(self)
    }

    fn disk_spool(&self) -> Option<Option<&std::path::Path>> {
        Some(self.spool_dir.as_deref())
    }

    fn start(&self, ctx: &Context<'_>) -> Result<Running, SinkError> {
        self.delivery()
            .start(ctx, |timeout| HecSink::new(self, timeout))
    }
}
