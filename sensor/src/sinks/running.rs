//! A started sink: its task (the engine), its queue, its counters, and what it takes of the
//! inputs the fan-out offers.

use std::{path::Path, sync::Arc, time::Duration};

use super::{
    engine::{self, Queue},
    retry::Retry,
    sink::Sink,
    spool::Spool,
    stats::{OutputStats, SharedStats},
};
use crate::formats::Record;

/// Where a sink starts: its name and type, and the agent's state directory (for spools).
pub struct Context<'a> {
    pub name: &'a str,
    pub kind: &'static str,
    pub state_dir: &'a Path,
}

/// What the fan-out offers the sinks.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// An alert event (SIEM sinks and the collector take these).
    Alert(&'a Record),
    /// A per-client summary of the agent's last period (only the collector takes these).
    Summary(&'a crate::ship::Summary),
}

/// A sink's spool and its conversion of inputs to its items.
pub(super) trait Feed: Send + Sync {
    /// Spools what this sink takes of `inputs`, with one sync; `Err`: how many could not be
    /// spooled, and why.
    fn offer(&self, inputs: &[Input<'_>]) -> Result<(), (usize, String)>;
    fn takes_summaries(&self) -> bool;
    /// Takes no more: the task delivers what it can, then ends.
    fn close(&self);
}

struct Feeder<T, F> {
    queue: Arc<Queue<T>>,
    accept: F,
    summaries: bool,
}

impl<T: super::spool::Spooled, F: Fn(&Input<'_>) -> Option<T> + Send + Sync> Feed for Feeder<T, F> {
    fn offer(&self, inputs: &[Input<'_>]) -> Result<(), (usize, String)> {
        self.queue
            .push_all(inputs.iter().filter_map(|i| (self.accept)(i)).collect())
    }

    fn takes_summaries(&self) -> bool {
        self.summaries
    }

    fn close(&self) {
        self.queue.close();
    }
}

/// One started sink: its counters, its queue and its task.
pub struct Running {
    pub(super) stats: SharedStats,
    pub(super) feed: Box<dyn Feed>,
    pub(super) task: tokio::task::JoinHandle<()>,
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
        let queue = Queue::new(spool, stats.clone());
        let task = tokio::spawn(engine::worker(sink, queue.clone(), Retry::new(retry_max)));
        Self {
            stats,
            feed: Box::new(Feeder {
                queue,
                accept,
                summaries,
            }),
            task,
        }
    }

    pub(super) fn name(&self) -> String {
        self.stats
            .lock()
            .map(|s| s.name.clone())
            .unwrap_or_default()
    }
}

/// What SIEM sinks take: alert events, as they are.
pub fn alerts(input: &Input<'_>) -> Option<Record> {
    match input {
        Input::Alert(r) => Some((*r).clone()),
        Input::Summary(_) => None,
    }
}
