//! Syslog (RFC 5424) over UDP (RFC 5426), TCP or TLS (RFC 5425), with octet-counting framing
//! (`<length> <message>`, RFC 5425 / RFC 6587) on TCP and TLS.
//!
//! `<PRI>1 TIMESTAMP HOSTNAME APP-NAME - MSGID [alert@32473 id=".." rule=".." ...] MSG`
//!
//! PRI: the configured facility (local0) and a severity from the alert's (critical: crit,
//! high: err, medium: warning, low: notice; a resolve is informational). MSGID is the event
//! (open, update, resolve); the structured data carries the key evidence; MSG is CEF, LEEF 2.0
//! or the record as JSON.
//!
//! - [`config`]: `type = "syslog"` and its validation.
//! - [`encoder`]: the RFC 5424 rendering and the framing.
//! - [`sink`]: the connection (kept open, checked before each write, replayed after a loss).

pub mod config;
pub mod encoder;
pub mod sink;

pub use config::SyslogConfig;

use sink::SyslogSink;

use crate::sinks::{
    configure::{Configure, Invalid},
    error::SinkError,
    running::{Context, Running},
};

impl Configure for SyslogConfig {
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn validate(&self) -> Result<(), Invalid> {
        SyslogConfig::validate(self)
    }

    fn start(&self, ctx: &Context<'_>) -> Result<Running, SinkError> {
        self.delivery().start(ctx, |timeout| {
            SyslogSink::new(self, encoder::Rfc5424::new(self), timeout)
        })
    }
}
