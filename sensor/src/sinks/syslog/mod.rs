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

    fn disk_spool(&self) -> Option<Option<&std::path::Path>> {
        Some(self.spool_dir.as_deref())
    }

    fn start(&self, ctx: &Context<'_>) -> Result<Running, SinkError> {
        // Alerts name clients and keys' fingerprints: in clear they are readable on the path.
        if self.protocol != config::Protocol::Tls && !loopback(&self.address) {
            log::warn!(
                "output {}: alerts go to {} in clear over {:?}; protocol = \"tls\" encrypts them",
                ctx.name,
                self.address,
                self.protocol
            );
        }
        self.delivery().start(ctx, |timeout| {
            SyslogSink::new(self, encoder::Rfc5424::new(self), timeout)
        })
    }
}

/// Whether `address` (`host:port`) names this host's loopback.
fn loopback(address: &str) -> bool {
    let host = address
        .rsplit_once(':')
        .map_or(address, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
