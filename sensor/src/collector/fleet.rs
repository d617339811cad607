//! The fleet view: every agent's summaries merged per client, each agent's stream positions
//! (so nothing counts twice), the agents' alerts, and the fleet rules' detector.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::{
    detect::{Alert, AlertEvent, Detector, DetectorState, Rings},
    model::aggregate::{Aggregator, Now},
    model::keys::By,
    ship::{
        Batch, PERIOD_SECS, Payload, ShipRecord, Summary, early,
        sketch::{FleetSketch, HotCells},
    },
    sinks::Record,
};

/// An agent's summary older than this no longer tells which connections are open.
const OPEN_FRESH_SECS: u64 = 3 * PERIOD_SECS;
/// Stream positions kept per agent.
const MAX_STREAMS: usize = 16;
/// Agents' alerts kept for `/v1/alerts` (newest win).
const AGENT_ALERTS_KEPT: usize = 5000;

/// What the collector knows of one agent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Highest position accepted per stream.
    pub streams: BTreeMap<String, u64>,
    /// Start of the newest summary (period or part of one) merged.
    pub last_summary_s: u64,
    /// End of the newest summary merged: the next must start there or later (0: none merged
    /// since the collector kept it; then `last_summary_s`'s period end).
    #[serde(default)]
    pub summary_end_s: u64,
    pub last_batch_ms: u64,
    pub records: u64,
    pub summaries: u64,
    pub alerts: u64,
    /// Records sent again (a retry after a lost answer), acknowledged and ignored.
    pub duplicates: u64,
    /// Positions skipped: records the agent's spool dropped at its bound.
    pub gaps: u64,
    /// Open connections per (key kind, key) at the end of the newest summary period.
    #[serde(default)]
    pub open: HashMap<String, u64>,
    /// The same for the clients of the newest period's early parts, newer than `open` where
    /// both have a key; started again by a new period's parts and cleared by each whole
    /// period or rest, so it holds one period's parts' rows at most (9 of 1000).
    #[serde(default)]
    pub open_early: HashMap<String, u64>,
    /// The period (start / 10) `open_early` is of.
    #[serde(default)]
    pub open_early_period: u64,
    /// The sketch key of its newest summary: which hot cells its answers carry.
    #[serde(default)]
    pub sketch_key: String,
}

/// Where an agent's next summary may start, from its newest merged one's start and end
/// (`AgentInfo`; a free function so it borrows the two fields only).
fn merged_until(last_start_s: u64, last_end_s: u64) -> u64 {
    if last_end_s > 0 {
        last_end_s
    } else if last_start_s > 0 {
        // Kept by an earlier collector: whole periods only.
        last_start_s + PERIOD_SECS
    } else {
        0
    }
}

/// The merged state, saved in the collector's snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FleetState {
    pub agg: Aggregator,
    pub agents: BTreeMap<String, AgentInfo>,
    /// Agents' alerts by record-id prefix `<agent>:<alert id>`: the latest state of each.
    pub agent_alerts: BTreeMap<String, Alert>,
    pub detector: DetectorState,
    /// JetStream: the stream sequence of the last message merged (or refused for good). The
    /// consumer resumes right after it, so a message is merged once whatever was acknowledged.
    #[serde(default)]
    pub nats_seq: u64,
    /// The agents' sketches of the last minute (soft state: rebuilt from new summaries).
    #[serde(skip)]
    pub sketch: FleetSketch,
}

/// What one batch did.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct Applied {
    pub accepted: usize,
    pub duplicates: usize,
    /// The sketch cells that are hot over the fleet: the agent names every client whose
    /// cells are all hot ([`crate::ship::sketch`]).
    #[serde(skip_serializing_if = "HotCells::is_empty")]
    pub hot: HotCells,
    /// This collector reads summaries' sketches (agents send none until told so).
    pub sketches: bool,
    /// This collector takes early parts of periods ([`crate::ship::early`]).
    pub parts: bool,
}

impl FleetState {
    /// Merges a validated batch; returns what it did and the agents' alert events to forward
    /// to the SIEM outputs, in order.
    pub fn apply<'b>(
        &mut self,
        batch: &'b Batch,
        now: Now,
    ) -> (Applied, Vec<Record>, Vec<&'b ShipRecord>) {
        self.apply_part(batch, None, now)
    }

    /// As [`FleetState::apply`], for one partition's part of an agent's batch, which covers
    /// the agent's positions `first..=last` (`Sensor-Positions`) while holding only the
    /// records of this partition: positions in between that it lacks went to other
    /// partitions, not lost. A gap is counted only where the range starts past the last
    /// position merged plus one.
    pub fn apply_part<'b>(
        &mut self,
        batch: &'b Batch,
        positions: Option<(u64, u64)>,
        now: Now,
    ) -> (Applied, Vec<Record>, Vec<&'b ShipRecord>) {
        let mut applied = Applied::default();
        let mut forward = Vec::new();
        let mut accepted = Vec::new();
        let info = self.agents.entry(batch.agent.clone()).or_default();
        info.last_batch_ms = now.unix_ms;
        if !info.streams.contains_key(&batch.stream) && info.streams.len() >= MAX_STREAMS {
            // A new spool (reinstall, lost disk) starts a new stream; old ones never return.
            // Bounded so that a token cannot grow the collector's memory; summaries stay
            // deduplicated by period whatever stream carries them.
            if let Some(oldest) = info.streams.keys().next().cloned() {
                info.streams.remove(&oldest);
            }
        }
        let pos = info.streams.entry(batch.stream.clone()).or_default();
        let ranged = positions.is_some();
        if let Some((first, _)) = positions
            && *pos > 0
            && first > *pos + 1
        {
            info.gaps = info.gaps.saturating_add(first - *pos - 1);
        }
        for rec in &batch.records {
            if rec.seq <= *pos {
                applied.duplicates += 1;
                info.duplicates += 1;
                continue;
            }
            if !ranged && *pos > 0 && rec.seq > *pos + 1 {
                info.gaps = info.gaps.saturating_add(rec.seq - *pos - 1);
            }
            *pos = rec.seq;
            accepted.push(rec);
            applied.accepted += 1;
            info.records += 1;
            match &rec.payload {
                Payload::Summary(s) => {
                    // A period (or part of one) is merged once per agent, whatever stream
                    // carried it (an agent restored from an older state snapshot may build a
                    // period again): each must start where the last one merged ended or
                    // later, so an early part's rest comes once and nothing overlaps.
                    if s.start_s < merged_until(info.last_summary_s, info.summary_end_s) {
                        info.duplicates += 1;
                        continue;
                    }
                    info.last_summary_s = s.start_s;
                    info.summary_end_s = s.start_s + s.period_s;
                    info.summaries += 1;
                    let open = s
                        .clients
                        .iter()
                        .map(|c| (format!("{}|{}", c.by, c.key), c.open_connections));
                    if early::is_early(s) {
                        // Only the alerting clients: the others' stand until the rest.
                        let period = s.start_s / PERIOD_SECS;
                        if info.open_early_period != period {
                            info.open_early.clear();
                            info.open_early_period = period;
                        }
                        info.open_early.extend(open);
                    } else {
                        info.open = open.filter(|(_, n)| *n > 0).collect();
                        info.open_early.clear();
                    }
                    merge_summary(&mut self.agg, s, now);
                    if !s.sketch_key.is_empty() {
                        info.sketch_key.clone_from(&s.sketch_key);
                    }
                    // Under its period's start: a rest's sketch adds to its period's.
                    let period_s = s.start_s / PERIOD_SECS * PERIOD_SECS;
                    self.sketch
                        .add(&s.sketch_key, period_s, &s.sketch, now.secs());
                }
                Payload::Alert { event, alert } => {
                    info.alerts += 1;
                    let key = format!("{}:{}", batch.agent, alert.id);
                    self.agent_alerts.insert(key, (**alert).clone());
                    forward.push(Record {
                        id: rec.id.clone(),
                        seq: 0,
                        event: event.clone(),
                        alert: (**alert).clone(),
                    });
                }
            }
        }
        if let Some((_, last)) = positions {
            *pos = (*pos).max(last);
        }
        if self.agent_alerts.len() > AGENT_ALERTS_KEPT {
            let mut by_age: Vec<(u64, String)> = self
                .agent_alerts
                .iter()
                .map(|(k, a)| (a.last_seen_ms, k.clone()))
                .collect();
            by_age.sort();
            let excess = by_age.len() - AGENT_ALERTS_KEPT;
            for (_, k) in by_age.into_iter().take(excess) {
                self.agent_alerts.remove(&k);
            }
        }
        let key = self
            .agents
            .get(&batch.agent)
            .map(|i| i.sketch_key.clone())
            .unwrap_or_default();
        applied.hot = self.sketch.hot(&key, now.secs());
        applied.sketches = true;
        applied.parts = true;
        (applied, forward, accepted)
    }

    /// Open connections per client: the sum over agents whose newest summary is recent.
    pub fn refresh_open(&mut self, now: Now) {
        let mut sum: HashMap<&str, u64> = HashMap::new();
        for info in self.agents.values() {
            if info.last_summary_s + PERIOD_SECS + OPEN_FRESH_SECS < now.secs() {
                continue;
            }
            let newer = info.open_early.iter();
            let older = info
                .open
                .iter()
                .filter(|(k, _)| !info.open_early.contains_key(*k));
            for (k, n) in newer.chain(older) {
                let s = sum.entry(k.as_str()).or_default();
                *s = s.saturating_add(*n);
            }
        }
        for by in By::ALL {
            let table = self.agg.table_mut(by);
            let keys: Vec<String> = table
                .clients
                .iter()
                .filter(|(_, c)| c.open_connections() > 0)
                .map(|(k, _)| k.to_owned())
                .collect();
            for k in keys {
                table.set_open(&k, 0);
            }
        }
        for (k, n) in sum {
            if let Some((by, key)) = k.split_once('|')
                && let Some(by) = By::parse(by)
            {
                self.agg.table_mut(by).set_open(key, n);
            }
        }
    }

    /// Runs the fleet rules (the ring rule where `rings` says).
    pub fn evaluate(&mut self, detector: &mut Detector, now: Now, rings: Rings) -> Vec<AlertEvent> {
        self.refresh_open(now);
        detector.evaluate_with(&self.agg, now, rings)
    }

    /// Fleet alerts and the agents' alerts, open first, then newest.
    pub fn alerts<'a>(&'a self, detector: &'a Detector) -> Vec<&'a Alert> {
        let mut v = detector.list();
        v.extend(self.agent_alerts.values());
        v.sort_by(|a, b| {
            b.is_open()
                .cmp(&a.is_open())
                .then(b.last_seen_ms.cmp(&a.last_seen_ms))
        });
        v
    }
}

/// Adds one agent's period to the merged tables, at the period's own time.
fn merge_summary(agg: &mut Aggregator, s: &Summary, now: Now) {
    // The period's last moment, never in the collector's future (agents' clocks differ).
    let at = Now {
        unix_ms: ((s.start_s + s.period_s) * 1000 - 1).min(now.unix_ms),
    };
    for c in &s.clients {
        let Some(by) = By::parse(&c.by) else {
            continue;
        };
        let table = agg.table_mut(by);
        table.merge(&c.key, c.counts, at, now);
        let forwarded = c.forwarded.as_deref().and_then(|f| f.parse().ok());
        if c.identity.is_some() || forwarded.is_some() {
            table.annotate(&c.key, c.identity.as_deref(), forwarded, None, at);
        }
    }
    for (kind, counts) in &s.rest {
        if let Some(by) = By::parse(kind) {
            agg.table_mut(by).folded.totals += *counts;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::aggregate::{Counts, Window},
        ship::{ClientDelta, WIRE_VERSION},
    };

    fn summary(agent: &str, seq: u64, start_s: u64, key: &str, requests: u64) -> ShipRecord {
        ShipRecord {
            seq,
            ..ShipRecord::summary(
                agent,
                Summary {
                    start_s,
                    period_s: 10,
                    clients: vec![ClientDelta {
                        by: "address".into(),
                        key: key.into(),
                        counts: Counts {
                            requests,
                            bytes_out: requests * 1000,
                            ..Counts::default()
                        },
                        open_connections: 2,
                        identity: None,
                        forwarded: None,
                    }],
                    rest: BTreeMap::new(),
                    sketch: BTreeMap::new(),
                    sketch_key: String::new(),
                    elsewhere: Default::default(),
                },
            )
        }
    }

    fn batch(agent: &str, records: Vec<ShipRecord>) -> Batch {
        Batch {
            version: WIRE_VERSION,
            agent: agent.into(),
            stream: "ab".into(),
            records,
        }
    }

    #[test]
    fn a_client_spread_over_hosts_is_summed_once() {
        let t = 1_800_000_000;
        let now = Now {
            unix_ms: (t + 15) * 1000,
        };
        let mut f = FleetState::default();
        for agent in ["a", "b", "c"] {
            let b = batch(agent, vec![summary(agent, 1, t, "10.0.0.9", 100)]);
            assert_eq!(f.apply(&b, now).0.accepted, 1);
            // The same batch again (a retry): acknowledged, not counted.
            assert_eq!(
                f.apply(&b, now).0,
                Applied {
                    accepted: 0,
                    duplicates: 1,
                    hot: Default::default(),
                    sketches: true,
                    parts: true,
                }
            );
        }
        let c = &f.agg.addresses.clients["10.0.0.9"];
        assert_eq!(c.totals().requests, 300);
        assert_eq!(c.windows().get(now.secs(), Window::OneMinute).requests, 300);
        f.refresh_open(now);
        assert_eq!(f.agg.addresses.clients["10.0.0.9"].open_connections(), 6);
        // Much later, stale open counts are forgotten.
        f.refresh_open(Now {
            unix_ms: (t + 120) * 1000,
        });
        assert_eq!(f.agg.addresses.clients["10.0.0.9"].open_connections(), 0);
    }

    /// An early part and its rest are both merged, once each, in their period's bucket; a
    /// part overlapping what was merged (a replay, a whole period after its early part, a
    /// second rest) is a duplicate. The early part updates the open connections of its
    /// clients only.
    #[test]
    fn an_early_part_and_its_rest_merge_once_each() {
        let t = 1_800_000_000;
        let now = Now {
            unix_ms: (t + 4) * 1000,
        };
        let part = |seq, start, len, key: &str, requests| {
            let mut r = summary("a", seq, start, key, requests);
            if let Payload::Summary(s) = &mut r.payload {
                s.period_s = len;
            }
            r
        };
        let mut f = FleetState {
            agg: Aggregator::new(100, 24, 56),
            ..FleetState::default()
        };
        f.apply(
            &batch("a", vec![summary("a", 1, t - 10, "10.0.0.1", 5)]),
            now,
        );
        f.refresh_open(now);
        let early = part(2, t, 3, "10.0.0.9", 40);
        assert_eq!(f.apply(&batch("a", vec![early]), now).0.accepted, 1);
        f.refresh_open(now);
        let open = |f: &FleetState, k: &str| f.agg.addresses.clients[k].open_connections();
        assert_eq!((open(&f, "10.0.0.1"), open(&f, "10.0.0.9")), (2, 2));
        assert_eq!(f.agg.addresses.clients["10.0.0.9"].totals().requests, 40);
        let later = Now {
            unix_ms: (t + 11) * 1000,
        };
        // The whole period after its early part would count the early rows twice.
        f.apply(&batch("a", vec![summary("a", 3, t, "10.0.0.9", 60)]), later);
        assert_eq!(f.agents["a"].duplicates, 1);
        f.apply(&batch("a", vec![part(4, t + 3, 7, "10.0.0.9", 20)]), later);
        f.apply(&batch("a", vec![part(5, t + 5, 5, "10.0.0.9", 20)]), later);
        assert_eq!(f.agents["a"].duplicates, 2, "a second rest");
        let c = &f.agg.addresses.clients["10.0.0.9"];
        assert_eq!(c.totals().requests, 60);
        assert_eq!(c.windows().ten_seconds(t / 10).requests, 60);
        // The rest replaces the open connections: 10.0.0.1 is not in it.
        f.refresh_open(later);
        assert_eq!(open(&f, "10.0.0.1"), 0);
        assert!(f.agents["a"].open_early.is_empty());
        // The next period follows.
        f.apply(
            &batch("a", vec![summary("a", 6, t + 10, "10.0.0.9", 1)]),
            later,
        );
        assert_eq!(f.agg.addresses.clients["10.0.0.9"].totals().requests, 61);
        // Early parts alone (a hostile agent never sending the rest) hold one part's rows.
        for p in 0..5u64 {
            let key = format!("10.0.1.{p}");
            let start = t + 100 + 10 * p;
            f.apply(&batch("a", vec![part(10 + p, start, 2, &key, 1)]), later);
        }
        assert_eq!(f.agents["a"].open_early.len(), 1);
        // Parts of one period add up theirs.
        f.apply(
            &batch("a", vec![part(20, t + 143, 2, "10.0.2.1", 1)]),
            later,
        );
        assert_eq!(f.agents["a"].open_early.len(), 2);
        // Kept by an earlier collector (no end recorded): its period's end.
        let mut old = FleetState::default();
        old.apply(&batch("a", vec![summary("a", 1, t, "10.0.0.9", 5)]), later);
        old.agents.get_mut("a").expect("agent").summary_end_s = 0;
        old.apply(&batch("a", vec![part(2, t + 3, 7, "10.0.0.9", 5)]), later);
        assert_eq!(old.agents["a"].duplicates, 1);
    }

    #[test]
    fn late_periods_land_in_their_own_buckets() {
        let t = 1_800_000_000;
        let mut f = FleetState::default();
        let now = Now {
            unix_ms: (t + 300) * 1000,
        };
        // A period from 5 minutes ago (delivered after an outage), then a current one.
        f.apply(&batch("a", vec![summary("a", 1, t, "10.0.0.9", 50)]), now);
        f.apply(
            &batch("a", vec![summary("a", 2, t + 290, "10.0.0.9", 7)]),
            now,
        );
        let c = &f.agg.addresses.clients["10.0.0.9"];
        assert_eq!(c.totals().requests, 57);
        assert_eq!(c.windows().get(now.secs(), Window::OneMinute).requests, 7);
        assert_eq!(c.windows().get(now.secs(), Window::TenMinutes).requests, 57);
        // The same period in a new stream (agent restored from an older snapshot): once.
        let mut again = batch("a", vec![summary("a", 1, t + 290, "10.0.0.9", 7)]);
        again.stream = "cd".into();
        f.apply(&again, now);
        assert_eq!(f.agg.addresses.clients["10.0.0.9"].totals().requests, 57);
        assert_eq!(f.agents["a"].duplicates, 1);
    }

    #[test]
    fn sums_saturate_instead_of_wrapping() {
        // What the ingest bounds refuse long before: even so, merging never wraps.
        let t = 1_800_000_000;
        let now = Now {
            unix_ms: (t + 15) * 1000,
        };
        let mut f = FleetState::default();
        f.apply(&batch("a", vec![summary("a", 1, t, "10.0.0.9", 100)]), now);
        f.apply(
            &batch("b", vec![summary("b", 1, t, "10.0.0.9", u64::MAX / 1000)]),
            now,
        );
        let c = &f.agg.addresses.clients["10.0.0.9"];
        assert_eq!(c.totals().requests, 100 + u64::MAX / 1000);
        assert_eq!(
            c.totals().bytes_out,
            u64::MAX,
            "saturated, not wrapped to a small value"
        );
    }

    #[test]
    fn skipped_positions_are_counted_as_gaps() {
        let t = 1_800_000_000;
        let now = Now {
            unix_ms: (t + 30) * 1000,
        };
        let mut f = FleetState::default();
        f.apply(&batch("a", vec![summary("a", 1, t, "10.0.0.9", 1)]), now);
        f.apply(
            &batch("a", vec![summary("a", 5, t + 10, "10.0.0.9", 1)]),
            now,
        );
        assert_eq!(f.agents["a"].gaps, 3);
    }

    #[test]
    fn a_partitions_part_counts_gaps_by_the_batchs_range() {
        let t = 1_800_000_000;
        let now = Now {
            unix_ms: (t + 30) * 1000,
        };
        let mut f = FleetState::default();
        // Positions 1..=4, of which this partition holds 1 and 3: no gap.
        f.apply_part(
            &batch("a", vec![summary("a", 1, t, "10.0.0.9", 1)]),
            Some((1, 2)),
            now,
        );
        let (applied, _, _) = f.apply_part(
            &batch("a", vec![summary("a", 3, t + 10, "10.0.0.9", 1)]),
            Some((3, 4)),
            now,
        );
        assert_eq!(applied.accepted, 1);
        assert_eq!(f.agents["a"].gaps, 0);
        assert_eq!(f.agents["a"].streams["ab"], 4);
        // The next batch starts at 7: 5 and 6 never came (the agent's spool dropped them).
        f.apply_part(
            &batch("a", vec![summary("a", 8, t + 20, "10.0.0.9", 1)]),
            Some((7, 8)),
            now,
        );
        assert_eq!(f.agents["a"].gaps, 2);
        // A longer retry of a batch already merged adds nothing.
        let (applied, _, _) = f.apply_part(
            &batch("a", vec![summary("a", 8, t + 20, "10.0.0.9", 1)]),
            Some((7, 9)),
            now,
        );
        assert_eq!((applied.accepted, applied.duplicates), (0, 1));
        assert_eq!(f.agents["a"].gaps, 2);
    }
}
