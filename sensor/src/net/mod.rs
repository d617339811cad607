//! The HTTP stack the agent and the collector share (hyper 1, HTTP/1.1).
//!
//! - `server`: accept loops with a bound on connections, per-connection limits (header size and
//!   time, a deadline for the whole exchange), replies, bearer-token checks.
//! - `prometheus`: the text exposition both `/metrics` endpoints serve (prometheus-client's
//!   format 0.0.4 encoder over families gathered per scrape).
//!
//! Nothing here knows the agent or the collector: both import it, it imports neither.

pub mod prometheus;
pub mod server;
