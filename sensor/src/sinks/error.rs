//! The sinks' error type, below every sink and the machinery they share.

use std::time::Duration;

use crate::net::NetError;

/// Errors of the sinks; the agent reports them with context (anyhow at the edges).
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Connecting, TLS, an HTTP exchange, a secret file.
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0}")]
    Config(String),
    #[error("receiver answered HTTP {status}: {reason}")]
    Http { status: u16, reason: String },
    #[error("{0}")]
    Protocol(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl SinkError {
    pub fn io(what: impl Into<String>, e: std::io::Error) -> Self {
        Self::Io(what.into(), e)
    }
}
