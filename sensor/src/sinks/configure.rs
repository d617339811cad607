//! What every sink's config provides ([`Configure`]), and the keys and checks sinks share.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    error::SinkError,
    running::{Context, Running, alerts},
    sink::Sink,
    spool::Spool,
};
use crate::formats::Record;

/// A validation error of one sink's config: the key at fault and why.
pub type Invalid = (&'static str, String);

/// What every sink's config provides (implemented in each sink's `config.rs`).
pub trait Configure {
    /// `name`, when written.
    fn name(&self) -> Option<&str>;
    /// Checks what serde cannot (ranges, formats, keys that go together).
    fn validate(&self) -> Result<(), Invalid>;
    /// Builds the sink, opens its spool and starts its task.
    fn start(&self, ctx: &Context<'_>) -> Result<Running, SinkError>;
    /// Whether it keeps a disk spool (`None`: no), and the `spool_dir` written (`Some(None)`:
    /// the default, `<state dir>/spool/<name>`).
    fn disk_spool(&self) -> Option<Option<&Path>> {
        None
    }
}

// --- what network sinks share -----------------------------------------------------------------

pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 64 * 1024 * 1024;
pub const DEFAULT_RETRY_MAX_SECS: u64 = 60;
pub const DEFAULT_TIMEOUT_SECS: u64 = 10;

/// The spool and retry keys of a network sink (syslog, hec, webhook), as its config has them.
/// Each config lists the four keys itself: serde's `flatten` does not combine with
/// `deny_unknown_fields`, and a misspelt key must stay an error.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeliveryKeys<'a> {
    pub spool_dir: Option<&'a Path>,
    pub spool_max_bytes: Option<u64>,
    pub retry_max_secs: Option<u64>,
    pub timeout_secs: Option<u64>,
}

impl DeliveryKeys<'_> {
    pub fn validate(&self) -> Result<(), Invalid> {
        positive("spool_max_bytes", self.spool_max_bytes)?;
        positive("retry_max_secs", self.retry_max_secs)?;
        positive("timeout_secs", self.timeout_secs)?;
        at_most_a_year("retry_max_secs", self.retry_max_secs.unwrap_or(0))?;
        at_most_a_year("timeout_secs", self.timeout_secs.unwrap_or(0))
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS))
    }

    pub fn retry_max(&self) -> Duration {
        Duration::from_secs(self.retry_max_secs.unwrap_or(DEFAULT_RETRY_MAX_SECS))
    }

    /// Starts a network sink that carries alerts: its disk spool, the sink `build` makes with
    /// the request timeout, and its task.
    pub fn start<S: Sink<Item = Record>>(
        &self,
        ctx: &Context<'_>,
        build: impl FnOnce(Duration) -> Result<S, SinkError>,
    ) -> Result<Running, SinkError> {
        let spool = self.spool(ctx)?;
        let sink = build(self.timeout())?;
        Ok(Running::spawn(
            ctx,
            sink,
            spool,
            self.retry_max(),
            false,
            alerts,
        ))
    }

    /// Opens the sink's disk spool (`spool_dir`, else `<state dir>/spool/<name>`).
    pub fn spool(&self, ctx: &Context<'_>) -> Result<Spool<Record>, SinkError> {
        let dir = self.spool_dir.map_or_else(
            || ctx.state_dir.join("spool").join(ctx.name),
            Path::to_path_buf,
        );
        Spool::open(
            &dir,
            self.spool_max_bytes.unwrap_or(DEFAULT_SPOOL_MAX_BYTES),
        )
    }
}

/// The longest time a duration key may hold: a year (every config shares this check; it
/// lives here, below `config`, so that sinks can use it too). Longer values are mistakes, and the
/// largest overflow once in milliseconds (`resolve_after_secs = 9223372036854775807`).
pub const MAX_DURATION_SECS: u64 = 366 * 24 * 3600;

/// `secs` (of `key`) is at most [`MAX_DURATION_SECS`].
pub fn at_most_a_year(key: &'static str, secs: u64) -> Result<(), Invalid> {
    if secs > MAX_DURATION_SECS {
        return Err((
            key,
            format!("{secs} is more than a year ({MAX_DURATION_SECS} s)"),
        ));
    }
    Ok(())
}

/// `Some(0)` is refused: "must be at least 1".
pub fn positive(key: &'static str, v: Option<u64>) -> Result<(), Invalid> {
    match v {
        Some(0) => Err((key, "must be at least 1".into())),
        _ => Ok(()),
    }
}

/// A PEM CA file, when given, must name something.
pub fn ca_file_set(ca_file: Option<&PathBuf>) -> Result<(), Invalid> {
    match ca_file {
        Some(f) if f.as_os_str().is_empty() => Err(("ca_file", "must not be empty".into())),
        _ => Ok(()),
    }
}

/// An HTTP sink's `url`, and its TLS keys that only apply to https URLs.
pub fn http_url(
    url: &str,
    ca_file: Option<&PathBuf>,
    server_name: Option<&String>,
) -> Result<(), Invalid> {
    let parsed = crate::net::client::parse_url(url).map_err(|e| ("url", e.to_string()))?;
    if parsed.scheme() != "https" {
        if ca_file.is_some() {
            return Err(("ca_file", "only applies to https URLs".into()));
        }
        if server_name.is_some() {
            return Err(("server_name", "only applies to https URLs".into()));
        }
    }
    ca_file_set(ca_file)
}
