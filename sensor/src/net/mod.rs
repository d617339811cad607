//! The network stack the agent, the collector, the sinks and the views share (hyper 1,
//! HTTP/1.1, rustls). Nothing here knows the agent, the collector or the sinks: they import
//! it, it imports none of them.
//!
//! - `server`: accept loops with a bound on connections, per-connection limits (header size and
//!   time, a deadline for the whole exchange), replies, bearer-token checks.
//! - `prometheus`: the text exposition both `/metrics` endpoints serve (prometheus-client's
//!   format 0.0.4 encoder over families gathered per scrape).
//! - `client`: connecting with a deadline, and HTTP/1.1 requests (one per connection) for the
//!   HTTP sinks, the collector sink and `--collector` views.
//! - `tls`: PEM certificates and keys, root stores, client TLS connectors (mutual TLS too).
//! - `secrets`: token and secret files (one reader) and `Authorization: Bearer` parsing.
//! - `nats`: NATS connections (JetStream transport): server lists, credentials files (user and
//!   password, or an nkey seed), TLS with `tls`'s client configuration.

pub mod client;
pub mod error;
pub mod nats;
pub mod prometheus;
pub mod secrets;
pub mod server;
pub mod tls;

pub use error::NetError;
