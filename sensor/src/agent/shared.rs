//! What the agent's loop owns and its servers read: the connection table, the per-client
//! aggregates, the detector and what `/v1/health` reports. The loop writes it under the lock;
//! the local API and `/metrics` only read it.

use std::{
    sync::{Arc, Mutex},
    time::SystemTime,
};

use crate::{
    agent::identity::HeadStats, detect::Detector, model::aggregate::Aggregator,
    model::conntable::ConnTable,
};

/// What the agent shares with the API and the metrics listener.
pub struct AgentState {
    pub table: ConnTable,
    pub agg: Aggregator,
    pub max_clients: usize,
    pub loss: Vec<(&'static str, u64)>,
    pub started: SystemTime,
    pub cgroup: String,
    pub ports: Vec<u16>,
    /// The programs were already attached (pinned) when this agent started.
    pub continued_from_pinned_state: bool,
    /// How live connections are read from the kernel (`iterator` or `map`), and why.
    pub live_read: &'static str,
    pub live_read_reason: String,
    /// Request heads parsed for identity.
    pub heads: HeadStats,
    pub detector: Detector,
    /// Start (unix s) of the last summary period shipped to the collector.
    pub shipped_through: u64,
    /// Early parts of periods shipped when alerts are raised.
    pub early: crate::ship::early::EarlyParts,
    /// Alert events the alert log could not take (disk full, unwritable path).
    pub alert_log_lost: u64,
    /// Alert events handed to the alert log's writer and not yet written (`AlertLog`).
    pub alert_log_queued: Arc<std::sync::atomic::AtomicUsize>,
}

pub type SharedState = Arc<Mutex<AgentState>>;
