//! The outputs' error type, below every output and the machinery they share.

use std::time::Duration;

/// Errors of the outputs module; the agent reports them with context (anyhow at the edges).
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Config(String),
    #[error("receiver answered HTTP {status}: {reason}")]
    Http { status: u16, reason: String },
    #[error("{0}")]
    Protocol(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl OutputError {
    pub fn io(what: impl Into<String>, e: std::io::Error) -> Self {
        Self::Io(what.into(), e)
    }
}
