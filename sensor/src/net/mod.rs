//! Network plumbing below the sinks, the collector and the views: TLS material, secret files,
//! and an HTTP client (hyper over tokio-rustls). Imports no other module of the crate.
//!
//! - [`tls`]: PEM certificates and keys, root stores, client TLS connectors (mutual TLS too).
//! - [`secrets`]: token and secret files (one reader) and `Authorization: Bearer` parsing.
//! - [`client`]: connecting with a deadline, and HTTP/1.1 requests (one per connection).

pub mod client;
pub mod error;
pub mod secrets;
pub mod tls;

pub use error::NetError;
