//! `GET /metrics` on the collector (reader token): Prometheus text exposition of what an
//! operator watches on the collector itself: ingest and refusals, each agent's last batch and
//! summary (a silent agent shows as a growing age), the merged tables and the outputs.

use std::sync::atomic::Ordering;

use crate::{
    net::prometheus::{Exposition, NO_LABELS, Value},
    sinks::OutputStats,
};

use super::{counters::Counters, shared::Fleet};

/// Gathers the exposition (encoded by `Exposition::encode`, format 0.0.4).
pub fn families(
    counters: &Counters,
    fleet: &Fleet,
    outputs: &[OutputStats],
    group: Option<&super::partitioned::Status>,
) -> Exposition {
    let mut out = Exposition::default();
    let c = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    out.counter(
        "sensor_collector_batches_total",
        "Batches accepted from agents since the collector started.",
        [(NO_LABELS, c(&counters.batches))],
    );
    out.counter(
        "sensor_collector_records_total",
        "Records (alerts and summaries) merged since the collector started.",
        [(NO_LABELS, c(&counters.records))],
    );
    out.counter(
        "sensor_collector_duplicates_total",
        "Records received again (retries) and ignored since the collector started.",
        [(NO_LABELS, c(&counters.duplicates))],
    );
    out.counter(
        "sensor_collector_refused_total",
        "Requests refused, by reason: unauthorized (401), forbidden (403), malformed (400), \
         too_large (413), busy (503, memory budget spent), tls (handshake failed).",
        [
            ("unauthorized", c(&counters.unauthorized)),
            ("forbidden", c(&counters.forbidden)),
            ("malformed", c(&counters.malformed)),
            ("too_large", c(&counters.too_large)),
            ("busy", c(&counters.busy)),
            ("tls", c(&counters.tls_failures)),
        ]
        .map(|(reason, n)| ([("reason", reason)], n)),
    );
    out.counter(
        "sensor_collector_alert_log_lost_total",
        "Alert events the alert log (alerts.jsonl) could not take; the outputs still got them.",
        [(NO_LABELS, c(&counters.alert_log_lost))],
    );
    let agents = &fleet.state.agents;
    let per_agent = |f: &dyn Fn(&super::fleet::AgentInfo) -> Value| {
        agents
            .iter()
            .map(|(name, a)| ([("agent", name.as_str())], f(a)))
            .collect::<Vec<_>>()
    };
    out.gauge(
        "sensor_collector_agent_last_batch_timestamp_seconds",
        "When the agent's last batch was accepted (unix seconds).",
        per_agent(&|a| (a.last_batch_ms as f64 / 1000.0).into()),
    );
    out.gauge(
        "sensor_collector_agent_last_period_timestamp_seconds",
        "Start of the agent's newest summary period merged (unix seconds).",
        per_agent(&|a| a.last_summary_s.into()),
    );
    out.counter(
        "sensor_collector_agent_records_total",
        "Records merged from the agent.",
        per_agent(&|a| a.records.into()),
    );
    out.counter(
        "sensor_collector_agent_duplicates_total",
        "Records from the agent received again and ignored.",
        per_agent(&|a| a.duplicates.into()),
    );
    out.counter(
        "sensor_collector_agent_gaps_total",
        "Records the agent's spool dropped at its bound (positions skipped).",
        per_agent(&|a| a.gaps.into()),
    );
    let agg = &fleet.state.agg;
    out.gauge(
        "sensor_collector_clients_tracked",
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
    out.counter(
        "sensor_collector_bytes_total",
        "Payload bytes merged over the fleet, by direction (in: from clients).",
        [("in", totals.bytes_in), ("out", totals.bytes_out)].map(|(d, n)| ([("direction", d)], n)),
    );
    out.counter(
        "sensor_collector_requests_total",
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
    out.gauge(
        "sensor_collector_fleet_alerts_open",
        "Fleet alerts open now.",
        [(NO_LABELS, open)],
    );
    sink_families(&mut out, outputs);
    if let Some(g) = group {
        partitions(&mut out, g);
    }
    out
}

/// The SIEM outputs' counters: the one place that reads sink statistics for `/metrics`.
fn sink_families(out: &mut Exposition, outputs: &[OutputStats]) {
    let outputs_of = |f: &dyn Fn(&OutputStats) -> u64| {
        outputs
            .iter()
            .map(|o| ([("output", o.name.as_str())], f(o)))
            .collect::<Vec<_>>()
    };
    out.counter(
        "sensor_collector_output_sent_total",
        "Events each SIEM output delivered.",
        outputs_of(&|o| o.sent),
    );
    out.gauge(
        "sensor_collector_output_pending",
        "Events waiting in each SIEM output's spool.",
        outputs_of(&|o| o.pending),
    );
    out.counter(
        "sensor_collector_output_dropped_total",
        "Events each SIEM output lost (spool bound, refused by the receiver, queue full).",
        outputs_of(&|o| o.dropped),
    );
}

/// Several collectors: what this one holds and how often partitions moved.
fn partitions(out: &mut Exposition, g: &super::partitioned::Status) {
    let c = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    out.gauge(
        "sensor_collector_partitions_held",
        "Partitions this collector merges now (its leases).",
        [(NO_LABELS, g.held().len() as u64)],
    );
    out.counter(
        "sensor_collector_partition_changes_total",
        "Partition leases since the collector started, by event: taken (including taking \
         over a dead collector's), lost (not renewed in time, or fenced), released (handed \
         over to rebalance or at a clean stop).",
        [
            ("taken", c(&g.taken)),
            ("lost", c(&g.lost)),
            ("released", c(&g.released)),
        ]
        .map(|(event, n)| ([("event", event)], n)),
    );
    out.counter(
        "sensor_collector_checkpoints_total",
        "Partition checkpoints written to NATS (ok) or not (failed) since the collector started.",
        [
            ("ok", c(&g.checkpoints)),
            ("failed", c(&g.checkpoint_failures)),
        ]
        .map(|(result, n)| ([("result", result)], n)),
    );
    out.counter(
        "sensor_collector_ring_rounds_total",
        "Rounds of the ring rule over every partition's candidates run by this collector \
         (while it holds partition 0): complete, or incomplete (a partition did not answer in \
         full; nothing was judged).",
        [
            ("complete", c(&g.rings.rounds)),
            ("incomplete", c(&g.rings.incomplete)),
        ]
        .map(|(result, n)| ([("result", result)], n)),
    );
    out.counter(
        "sensor_collector_ring_candidates_cut_total",
        "Ring candidates partition holders left out of rounds (the lightest, over 20 000 a \
         partition); rounds with any resolve nothing.",
        [(NO_LABELS, c(&g.rings.cut))],
    );
    out.gauge(
        "sensor_collector_ring_candidates",
        "Ring candidates gathered from every partition in the last complete round.",
        [(NO_LABELS, c(&g.rings.candidates))],
    );
    let mut tracked = Vec::new();
    for (p, shared) in g.states() {
        if let Ok(n) = shared.with_fleet(|f| f.state.agg.addresses.clients.len() as u64) {
            tracked.push((p.to_string(), n));
        }
    }
    out.gauge(
        "sensor_collector_partition_tracked_addresses",
        "Client addresses merged exactly, per partition this collector holds.",
        tracked
            .iter()
            .map(|(p, n)| ([("partition", p.as_str())], *n)),
    );
}
