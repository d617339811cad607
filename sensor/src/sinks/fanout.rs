//! The fan-out: the running sinks, each delivering from its spool in a task of its own. The
//! agent (and the collector) offer every input to every sink, which spools what it takes
//! (converted to its items) before the offer returns; no one waits for a receiver.

use std::{path::Path, time::Duration};

use log::{info, warn};

use super::{
    config::SinkConfig,
    error::SinkError,
    running::{Context, Input, Running},
    stats::{OutputStats, SinkHealth, update},
};
use crate::{detect::AlertEvent, formats::Record};

/// The configured sinks, started: the agent publishes events, the API reads counters.
#[derive(Default)]
pub struct Outputs {
    running: Vec<Running>,
}

impl Outputs {
    /// Builds and starts every `[[outputs]]` sink (spools are opened here: an unusable spool
    /// directory or a missing token file fails the agent's start, not later).
    pub fn start(configs: &[SinkConfig], state_dir: &Path) -> anyhow::Result<Self> {
        let mut outputs = Self::default();
        for (i, c) in configs.iter().enumerate() {
            let name = c.display_name(i);
            let ctx = Context {
                name: &name,
                kind: c.kind(),
                state_dir,
            };
            let running = c
                .start(&ctx)
                .map_err(|e| anyhow::anyhow!("output `{name}`: {e:#}"))?;
            info!("output `{name}` ({}) started", c.kind());
            outputs.running.push(running);
        }
        Ok(outputs)
    }

    /// Starts shipping to the collector `c` describes, as agent `agent`: one more sink,
    /// after the `[[outputs]]` ones (the spool is opened and the token read here: problems
    /// fail the agent's start).
    pub fn start_shipping(
        &mut self,
        c: &super::ship::ShipConfig,
        agent: &str,
        state_dir: &Path,
        hot: std::sync::Arc<crate::ship::sketch::Hot>,
    ) -> Result<(), SinkError> {
        self.running.push(c.start(agent, state_dir, hot)?);
        info!(
            "shipping to the collector at {} ({:?}) as `{agent}`",
            c.url, c.transport
        );
        Ok(())
    }

    /// Spools alert events for every sink (synced to disk for network sinks) before returning;
    /// never waits for a receiver. An event that cannot be spooled is dropped and counted.
    pub fn publish(&self, events: &[AlertEvent]) {
        let records: Vec<Record> = events.iter().map(Record::new).collect();
        self.publish_records(&records);
    }

    /// Spools already-built records (the collector forwarding agents' alerts).
    pub fn publish_records(&self, records: &[Record]) {
        let inputs: Vec<Input<'_>> = records.iter().map(Input::Alert).collect();
        let _ = self.offer(&inputs, || format!("{} alert event(s)", records.len()));
    }

    /// Spools a per-client summary for the collector (when shipping is on); false when a sink
    /// could not spool it (counted as dropped).
    pub fn ship_summary(&self, summary: crate::ship::Summary) -> bool {
        let start = summary.start_s;
        self.offer(&[Input::Summary(&summary)], || format!("summary {start}"))
    }

    /// False when a sink could not spool all of `inputs`.
    fn offer(&self, inputs: &[Input<'_>], what: impl Fn() -> String) -> bool {
        if inputs.is_empty() {
            return true;
        }
        let mut all = true;
        for r in &self.running {
            if let Err((lost, err)) = r.feed.offer(inputs) {
                all = false;
                update(&r.stats, |s| s.dropped += lost as u64);
                warn!(
                    "output `{}`: {lost} of {} not spooled: {err}",
                    r.name(),
                    what()
                );
            }
        }
        all
    }

    /// Whether a sink takes summaries (the agent builds them only then).
    pub fn shipping(&self) -> bool {
        self.running.iter().any(|r| r.feed.takes_summaries())
    }

    /// The sinks' counters, for the tasks that serve them (`/v1/health`, `/metrics`).
    pub fn health(&self) -> SinkHealth {
        SinkHealth::new(self.running.iter().map(|r| r.stats.clone()).collect())
    }

    /// A copy of every running sink's counters (what `/v1/health` shows under `outputs`).
    pub fn stats(&self) -> Vec<OutputStats> {
        self.health().stats()
    }

    /// Stops taking events and lets each sink deliver what it holds, for at most `grace`
    /// (a network sink's spool keeps the rest for the next start).
    pub async fn shutdown(self, grace: Duration) {
        let tasks: Vec<_> = self
            .running
            .into_iter()
            .map(|r| {
                // Closing the queue tells the task to finish.
                r.feed.close();
                r.task
            })
            .collect();
        let all = async {
            for t in tasks {
                let _ = t.await;
            }
        };
        let _ = tokio::time::timeout(grace, all).await;
    }
}
