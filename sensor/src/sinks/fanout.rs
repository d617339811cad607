//! The fan-out: the running sinks, each a task of its own behind a bounded queue. The agent
//! (and the collector) offer every input to every sink without waiting; each sink takes the
//! inputs it delivers and converts them to its items.

use std::{path::Path, time::Duration};

use log::{info, warn};
use tokio::sync::mpsc;

use super::{
    config::{Context, SinkConfig},
    engine,
    error::SinkError,
    retry::Retry,
    sink::Sink,
    spool::Spool,
    stats::{OutputStats, SharedStats, SinkHealth, update},
};
use crate::{detect::AlertEvent, formats::Record};

/// Items queued per sink between the agent's loop and the sink's task.
const QUEUE: usize = 4096;

/// What the fan-out offers the sinks.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// An alert event (SIEM sinks and the collector take these).
    Alert(&'a Record),
    /// A per-client summary of the agent's last period (only the collector takes these).
    Summary(&'a crate::ship::Summary),
}

/// A sink's queue and its conversion of inputs to its items.
trait Feed: Send + Sync {
    /// Queues what this sink takes of `input`; `Err` names why it could not be queued.
    fn offer(&self, input: &Input<'_>) -> Result<(), String>;
    fn takes_summaries(&self) -> bool;
}

struct Feeder<T, F> {
    tx: mpsc::Sender<T>,
    accept: F,
    summaries: bool,
}

impl<T: Send, F: Fn(&Input<'_>) -> Option<T> + Send + Sync> Feed for Feeder<T, F> {
    fn offer(&self, input: &Input<'_>) -> Result<(), String> {
        match (self.accept)(input) {
            Some(item) => self.tx.try_send(item).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    fn takes_summaries(&self) -> bool {
        self.summaries
    }
}

/// One started sink: its counters, its queue and its task.
pub struct Running {
    stats: SharedStats,
    feed: Box<dyn Feed>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Starts `sink`'s task on `spool`; `accept` converts the inputs the sink takes (and
    /// `summaries` says whether it takes summaries at all).
    pub fn spawn<S: Sink>(
        ctx: &Context<'_>,
        sink: S,
        spool: Spool<S::Item>,
        retry_max: Duration,
        summaries: bool,
        accept: impl Fn(&Input<'_>) -> Option<S::Item> + Send + Sync + 'static,
    ) -> Self {
        let stats: SharedStats = SharedStats::new(std::sync::Mutex::new(OutputStats {
            name: ctx.name.to_owned(),
            kind: ctx.kind.to_owned(),
            target: sink.target(),
            ..OutputStats::default()
        }));
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(engine::worker(
            sink,
            spool,
            rx,
            stats.clone(),
            Retry::new(retry_max),
        ));
        Self {
            stats,
            feed: Box::new(Feeder {
                tx,
                accept,
                summaries,
            }),
            task,
        }
    }

    fn name(&self) -> String {
        self.stats
            .lock()
            .map(|s| s.name.clone())
            .unwrap_or_default()
    }
}

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
    ) -> Result<(), SinkError> {
        self.running.push(c.start(agent, state_dir)?);
        info!("shipping to the collector at {} as `{agent}`", c.url);
        Ok(())
    }

    /// Queues alert events for every sink; never waits (a full queue drops and counts).
    pub fn publish(&self, events: &[AlertEvent]) {
        for e in events {
            self.offer(&Input::Alert(&Record::new(e)), || {
                crate::detect::event_id(&e.alert, e.event)
            });
        }
    }

    /// Queues already-built records (the collector forwarding agents' alerts).
    pub fn publish_records(&self, records: &[Record]) {
        for rec in records {
            self.offer(&Input::Alert(rec), || rec.id.clone());
        }
    }

    /// Queues a per-client summary for the collector (when shipping is on).
    pub fn ship_summary(&self, summary: crate::ship::Summary) {
        let start = summary.start_s;
        self.offer(&Input::Summary(&summary), || format!("summary {start}"));
    }

    fn offer(&self, input: &Input<'_>, what: impl Fn() -> String) {
        for r in &self.running {
            if let Err(err) = r.feed.offer(input) {
                update(&r.stats, |s| s.dropped += 1);
                warn!("output `{}`: {} not queued: {err}", r.name(), what());
            }
        }
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
                drop(r.feed);
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

/// What SIEM sinks take: alert events, as they are.
pub fn alerts(input: &Input<'_>) -> Option<Record> {
    match input {
        Input::Alert(r) => Some((*r).clone()),
        Input::Summary(_) => None,
    }
}
