//! The agent's sink for shipping to a collector (`[ship]`): batches of [`crate::ship`]
//! records (alert events and per-client summaries), compressed, over HTTPS with a bearer
//! token (and a client certificate when the collector asks for one).
//!
//! A regular sink: the engine appends every record to a durable, bounded spool on disk
//! before it counts as shipped, delivers in order, retries with backoff, and what the bound
//! forces out is dropped and counted. It is configured by `[ship]`, not `[[outputs]]`, and it
//! is the only sink that takes summaries.
//!
//! - [`config`]: `[ship]` and its validation; starting the sink.
//! - [`sink`]: the stream id, the request, and how the collector's answers are taken.

pub mod config;
pub mod sink;

pub use config::ShipConfig;
