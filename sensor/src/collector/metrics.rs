//! `GET /metrics` on the collector (reader token): Prometheus text exposition of what an
//! operator watches on the collector itself: ingest and refusals, each agent's last batch and
//! summary (a silent agent shows as a growing age), the merged tables and the outputs.

use std::sync::atomic::Ordering;

use crate::{
    agent::metrics::{Kind, NO_LABELS, family},
    sinks::OutputStats,
};

use super::{counters::Counters, shared::Fleet};

/// Renders the exposition (format 0.0.4).
pub fn render(counters: &Counters, fleet: &Fleet, outputs: &[OutputStats]) -> String {
    let mut out = String::new();
    let c = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    family(
        &mut out,
        "sensor_collector_batches_total",
        Kind::Counter,
        "Batches accepted from agents since the collector started.",
        [(NO_LABELS, c(&counters.batches))],
    );
    family(
        &mut out,
        "sensor_collector_records_total",
        Kind::Counter,
        "Records (alerts and summaries) merged since the collector started.",
        [(NO_LABELS, c(&counters.records))],
    );
    family(
        &mut out,
        "sensor_collector_duplicates_total",
        Kind::Counter,
        "Records received again (retries) and ignored since the collector started.",
        [(NO_LABELS, c(&counters.duplicates))],
    );
    family(
        &mut out,
        "sensor_collector_refused_total",
        Kind::Counter,
        "Requests refused, by reason: unauthorized (401), forbidden (403), malformed (400), \
         too_large (413), tls (handshake failed).",
        [
            ("unauthorized", c(&counters.unauthorized)),
            ("forbidden", c(&counters.forbidden)),
            ("malformed", c(&counters.malformed)),
            ("too_large", c(&counters.too_large)),
            ("tls", c(&counters.tls_failures)),
        ]
        .map(|(reason, n)| ([("reason", reason)], n)),
    );
    let agents = &fleet.state.agents;
    let per_agent = |f: &dyn Fn(&super::fleet::AgentInfo) -> String| {
        agents
            .iter()
            .map(|(name, a)| ([("agent", name.as_str())], f(a)))
            .collect::<Vec<_>>()
    };
    family(
        &mut out,
        "sensor_collector_agent_last_batch_timestamp_seconds",
        Kind::Gauge,
        "When the agent's last batch was accepted (unix seconds).",
        per_agent(&|a| format!("{:.3}", a.last_batch_ms as f64 / 1000.0)),
    );
    family(
        &mut out,
        "sensor_collector_agent_last_period_timestamp_seconds",
        Kind::Gauge,
        "Start of the agent's newest summary period merged (unix seconds).",
        per_agent(&|a| a.last_summary_s.to_string()),
    );
    family(
        &mut out,
        "sensor_collector_agent_records_total",
        Kind::Counter,
        "Records merged from the agent.",
        per_agent(&|a| a.records.to_string()),
    );
    family(
        &mut out,
        "sensor_collector_agent_duplicates_total",
        Kind::Counter,
        "Records from the agent received again and ignored.",
        per_agent(&|a| a.duplicates.to_string()),
    );
    family(
        &mut out,
        "sensor_collector_agent_gaps_total",
        Kind::Counter,
        "Records the agent's spool dropped at its bound (positions skipped).",
        per_agent(&|a| a.gaps.to_string()),
    );
    let agg = &fleet.state.agg;
    family(
        &mut out,
        "sensor_collector_clients_tracked",
        Kind::Gauge,
        "Clients held exactly in the merged tables, by key kind.",
        [
            ("address", agg.addresses.clients.len()),
            ("group", agg.groups.clients.len()),
            ("identity", agg.identities.clients.len()),
            ("forwarded", agg.forwarded.clients.len()),
        ]
        .map(|(by, n)| ([("by", by)], n)),
    );
    let totals = agg.addresses.grand_total();
    family(
        &mut out,
        "sensor_collector_bytes_total",
        Kind::Counter,
        "Payload bytes merged over the fleet, by direction (in: from clients).",
        [("in", totals.bytes_in), ("out", totals.bytes_out)].map(|(d, n)| ([("direction", d)], n)),
    );
    family(
        &mut out,
        "sensor_collector_requests_total",
        Kind::Counter,
        "Requests merged over the fleet.",
        [(NO_LABELS, totals.requests)],
    );
    let open = fleet
        .detector
        .state
        .alerts
        .values()
        .filter(|a| a.is_open())
        .count();
    family(
        &mut out,
        "sensor_collector_fleet_alerts_open",
        Kind::Gauge,
        "Fleet alerts open now.",
        [(NO_LABELS, open)],
    );
    let outputs_of = |f: &dyn Fn(&OutputStats) -> u64| {
        outputs
            .iter()
            .map(|o| ([("output", o.name.as_str())], f(o)))
            .collect::<Vec<_>>()
    };
    family(
        &mut out,
        "sensor_collector_output_sent_total",
        Kind::Counter,
        "Events each SIEM output delivered.",
        outputs_of(&|o| o.sent),
    );
    family(
        &mut out,
        "sensor_collector_output_pending",
        Kind::Gauge,
        "Events waiting in each SIEM output's spool.",
        outputs_of(&|o| o.pending),
    );
    family(
        &mut out,
        "sensor_collector_output_dropped_total",
        Kind::Counter,
        "Events each SIEM output lost (spool bound, refused by the receiver, queue full).",
        outputs_of(&|o| o.dropped),
    );
    out
}
