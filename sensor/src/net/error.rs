//! The error of the network plumbing; its callers add context (anyhow at the edges).

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    /// A URL, name or secret file that cannot be used.
    #[error("{0}")]
    Config(String),
    /// The peer spoke something other than HTTP/1.1, or the exchange broke off.
    #[error("{0}")]
    Protocol(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl NetError {
    pub fn io(what: impl Into<String>, e: std::io::Error) -> Self {
        Self::Io(what.into(), e)
    }
}
