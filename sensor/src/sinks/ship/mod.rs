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
//!
//! With `transport = "nats"` the same records and spool go to a JetStream stream instead
//! (`sinks::nats`).

pub mod config;
pub mod sink;

pub use config::{ShipConfig, Transport};

use std::{path::Path, time::Duration};

use sink::{ShipSink, stream_id};

use crate::sinks::nats::sink::JetStreamSink;

use crate::{
    ship::{Payload, ShipRecord},
    sinks::{
        error::SinkError,
        running::{Context, Input, Running},
        spool::Spool,
    },
};

impl ShipConfig {
    /// Opens the spool, reads the token and starts the sink, shipping as agent `agent`.
    /// The collector's hot sketch cells are handed to `hot`: over HTTPS from its answers,
    /// over JetStream from the subject it publishes them on.
    pub fn start(
        &self,
        agent: &str,
        state_dir: &Path,
        hot: std::sync::Arc<crate::ship::sketch::Hot>,
    ) -> Result<Running, SinkError> {
        let dir = self.spool_dir(state_dir);
        let spool = Spool::<ShipRecord>::open(&dir, self.spool_max_bytes)?;
        let stream = stream_id(&dir)?;
        let retry = Duration::from_secs(self.retry_max_secs);
        let name = agent.to_owned();
        let accept = move |input: &Input<'_>| Some(record(&name, input));
        Ok(match self.transport {
            Transport::Https => Running::spawn(
                &Context {
                    name: "collector",
                    kind: "collector",
                    state_dir,
                },
                ShipSink::new(self, agent, stream, hot)?,
                spool,
                retry,
                true,
                accept,
            ),
            Transport::Nats => Running::spawn(
                &Context {
                    name: "collector",
                    kind: "jetstream",
                    state_dir,
                },
                JetStreamSink::new(&self.nats_keys(), agent, stream, hot)?,
                spool,
                retry,
                true,
                accept,
            ),
        })
    }
}

/// The wire record of an input: alerts keep their event id, prefixed with the agent.
fn record(agent: &str, input: &Input<'_>) -> ShipRecord {
    match input {
        Input::Alert(r) => ShipRecord {
            id: format!("{agent}:{}", r.id),
            seq: 0,
            payload: Payload::Alert {
                event: r.event.clone(),
                alert: Box::new(r.alert.clone()),
            },
        },
        Input::Summary(s) => ShipRecord::summary(agent, (*s).clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::AlertEvent;

    #[test]
    fn alert_records_are_those_of_the_wire_format() {
        let alert = crate::sinks::tests::alert("address", "10.0.0.1");
        let e = AlertEvent {
            event: crate::detect::EventKind::Open,
            alert: alert.into(),
        };
        let rec = crate::formats::Record::new(&e);
        assert_eq!(
            record("host-a", &Input::Alert(&rec)),
            ShipRecord::alert("host-a", &e)
        );
    }
}
