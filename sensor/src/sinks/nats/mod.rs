//! Shipping over NATS JetStream (`[ship] transport = "nats"`): the same records, batches and
//! disk spool as the HTTPS transport (`sinks::ship`), published to the subject
//! `<subject_prefix>.<agent name>` of a JetStream stream. The spool advances only once
//! JetStream has acknowledged a batch (it is then stored, replicated as the stream says);
//! a batch published again after a lost acknowledgement carries the same `Nats-Msg-Id` and
//! the server drops it, and the collector's stream positions drop whatever still comes twice.
//!
//! - [`config`]: the `[ship]` keys this transport uses, and their validation.
//! - [`sink`]: the connection, the publish and how JetStream's answers are taken.

pub mod config;
pub mod sink;
