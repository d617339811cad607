//! The [`Sink`] trait every sink implements, and what one delivery attempt reports.

use std::{future::Future, time::Duration};

use super::{error::SinkError, spool::Spooled};

/// What an attempt achieved: the first `sent` items of the batch arrived, and the `rejected`
/// after them were refused for good by the receiver (dropped and counted, never retried).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub sent: usize,
    pub rejected: usize,
}

impl Delivered {
    pub fn all(n: usize) -> Self {
        Self {
            sent: n,
            rejected: 0,
        }
    }

    pub fn rejected(sent: usize, rejected: usize) -> Self {
        Self { sent, rejected }
    }
}

/// An attempt that failed after `done` (often nothing): the rest of the batch is retried
/// after a backoff (see [`super::retry::Retry`]), at least `retry_after` when the receiver
/// asked for it.
#[derive(Debug)]
pub struct Failed {
    pub done: Delivered,
    pub error: SinkError,
    pub retry_after: Option<Duration>,
}

impl Failed {
    /// Failed after delivering the first `sent` items.
    pub fn after(sent: usize, error: impl Into<SinkError>) -> Self {
        Self {
            done: Delivered::all(sent),
            error: error.into(),
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, wait: Option<Duration>) -> Self {
        self.retry_after = wait;
        self
    }
}

impl<E: Into<SinkError>> From<E> for Failed {
    fn from(e: E) -> Self {
        Self::after(0, e)
    }
}

/// A destination: delivers batches of items, in order. The engine
/// ([`super::engine::run`]) spools what arrives and calls [`Sink::deliver`] with the oldest
/// undelivered items, retrying failures.
pub trait Sink: Send + 'static {
    /// What it delivers: alert events ([`crate::formats::Record`]) for SIEM sinks, wire
    /// records for the collector.
    type Item: Spooled;

    /// Where it delivers (address, URL or path), for `/v1/health` and logs.
    fn target(&self) -> String;

    /// Items per delivery attempt.
    fn batch_max(&self) -> usize {
        1
    }

    fn deliver<'a>(
        &'a mut self,
        batch: &'a [Self::Item],
    ) -> impl Future<Output = Result<Delivered, Failed>> + Send + 'a;

    /// Once, when the sink's task starts, before anything is delivered: a sink that also
    /// listens to its receiver (the NATS sink's hot cells) connects here instead of at its
    /// first delivery. Failures are the first delivery's to report.
    fn prepare(&mut self) -> impl Future<Output = ()> + Send + '_ {
        std::future::ready(())
    }
}
