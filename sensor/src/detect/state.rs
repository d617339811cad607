//! The alert lifecycle (open -> update -> resolve, then suppression), saved with the agent's
//! snapshot. Field names are the snapshot's format.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::{
    alert::{Alert, AlertEvent, AlertState, Crossed, EventKind, Evidence, Explanation, Mode},
    baseline::Baseline,
};
use crate::model::aggregate::Now;

/// String-keyed maps of the detector: it probes them for every key a rule holds on
/// (thousands per evaluation under a timing rule), so a fast hash rather than SipHash.
pub(super) type SlotMap<V> = HashMap<String, V, foldhash::fast::RandomState>;

/// A slot whose rule conditions hold: since when, and the last evaluation pass that found
/// them holding. Saved as its `since` alone (the snapshot's format); the pass is this
/// process's own count and starts over at 0, below every pass of the new process.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(from = "u64", into = "u64")]
struct Pending {
    since: u64,
    pass: u64,
}

impl From<u64> for Pending {
    fn from(since: u64) -> Self {
        Self { since, pass: 0 }
    }
}

impl From<Pending> for u64 {
    fn from(p: Pending) -> Self {
        p.since
    }
}

/// Resolved alerts kept for display (every open one is kept).
const RESOLVED_KEPT: usize = 1000;

/// An open alert sends at most one update event per this long (agent clock): a count of
/// evaluations would tie the cadence to `interval_secs` (12 evaluations were a minute at
/// 5 s, but 12 s at the default 1 s).
const UPDATE_EVERY_MS: u64 = 60_000;

/// Alert lifecycle state, saved with the agent's snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DetectorState {
    /// Open alerts and resolved ones kept for display (bounded).
    pub alerts: BTreeMap<String, std::sync::Arc<Alert>>,
    /// (rule, kind, key) -> since when the rule's conditions hold. An evaluation marks the
    /// slots it finds holding with its pass number instead of collecting them in a set: under
    /// a timing rule that is every key, each evaluation, and a set cost an allocation and a
    /// hash of the slot's name for each.
    pending: SlotMap<Pending>,
    /// The current evaluation pass (`begin_pass`); not saved.
    #[serde(skip)]
    pass: u64,
    /// (rule, kind, key) -> id of its open alert.
    open: SlotMap<String>,
    /// (rule, kind, key) -> no new alert before this time (unix ms).
    suppressed_until: SlotMap<u64>,
    /// When this detector first evaluated (unix ms, agent clock): rings do not judge keys
    /// by a start that is only the detector's own.
    #[serde(default)]
    started_ms: u64,
    /// Alert id -> when its last open or update event went out (unix ms).
    #[serde(default)]
    event_sent_ms: SlotMap<u64>,
    pub(super) baseline: Baseline,
    pub counters: DetectCounters,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct DetectCounters {
    pub evaluations: u64,
    pub opened: u64,
    pub resolved: u64,
    /// Alerts not raised because the same rule and key alerted recently.
    pub suppressed: u64,
    /// Rule matches on allow-listed keys.
    pub allowlisted: u64,
    /// Ring evaluations that stopped short (too many candidates to link, or a gathering
    /// that missed some): nothing resolved on them.
    #[serde(default)]
    pub rings_incomplete: u64,
    /// Matches of log-only rules.
    pub logged: u64,
}

pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

impl DetectorState {
    /// Starts an evaluation pass: the slots `holding_since` marks from here on are the ones
    /// that hold in it, for `settle`.
    pub(super) fn begin_pass(&mut self) {
        self.pass += 1;
    }

    /// Since when the conditions of `slot` have held (now, if they just started to); marks
    /// the slot as holding in this pass.
    pub(super) fn holding_since(&mut self, slot: &str, now: Now) -> u64 {
        let pass = self.pass;
        match self.pending.get_mut(slot) {
            Some(p) => {
                p.pass = pass;
                p.since
            }
            None => {
                self.pending.insert(
                    slot.to_owned(),
                    Pending {
                        since: now.unix_ms,
                        pass,
                    },
                );
                now.unix_ms
            }
        }
    }

    /// When the detector started (set by the first call).
    pub(super) fn started_ms(&mut self, now: Now) -> u64 {
        if self.started_ms == 0 {
            self.started_ms = now.unix_ms;
        }
        self.started_ms
    }

    /// The id of the open alert of `slot`, if any.
    pub(super) fn open_id(&self, slot: &str) -> Option<&String> {
        self.open.get(slot)
    }

    /// The conditions of an open alert still hold: counts the update, refreshes its evidence,
    /// and returns an update event at most once per `UPDATE_EVERY_MS`.
    pub(super) fn update(
        &mut self,
        id: &str,
        evidence: Evidence,
        conditions: Vec<Crossed>,
        explain: Option<Explanation>,
        now: Now,
    ) -> Option<AlertEvent> {
        let shared = self.alerts.get_mut(id)?;
        let a = std::sync::Arc::make_mut(shared);
        a.updates += 1;
        a.last_seen_ms = now.unix_ms;
        a.last_seen = rfc3339(now.unix_ms);
        a.evidence = evidence;
        a.conditions = conditions;
        a.explain = explain;
        // An alert restored without a record (an older snapshot) counts from its opening.
        let sent = self
            .event_sent_ms
            .entry(id.to_owned())
            .or_insert(a.first_seen_ms);
        if now.unix_ms.saturating_sub(*sent) < UPDATE_EVERY_MS {
            return None;
        }
        *sent = now.unix_ms;
        Some(AlertEvent {
            event: EventKind::Update,
            alert: shared.clone(),
        })
    }

    /// Whether a new alert of `slot` is held back (it resolved recently); counts it if so.
    pub(super) fn suppressed(&mut self, slot: &str, now: Now) -> bool {
        let held = self
            .suppressed_until
            .get(slot)
            .is_some_and(|t| *t > now.unix_ms);
        if held {
            self.counters.suppressed += 1;
        }
        held
    }

    pub(super) fn open(&mut self, slot: String, alert: Alert) -> AlertEvent {
        match alert.mode {
            Mode::Log => self.counters.logged += 1,
            Mode::Alert => self.counters.opened += 1,
        }
        self.open.insert(slot, alert.id.clone());
        self.event_sent_ms
            .insert(alert.id.clone(), alert.first_seen_ms);
        let alert = std::sync::Arc::new(alert);
        self.alerts.insert(alert.id.clone(), alert.clone());
        AlertEvent {
            event: EventKind::Open,
            alert,
        }
    }

    /// After an evaluation pass over the slots in `scope`: resolves open alerts whose
    /// conditions have not held for `resolve_after_ms` (then suppresses their slot for
    /// `suppress_ms`), forgets pending matches that no longer hold, and bounds what is kept.
    pub(super) fn settle(
        &mut self,
        scope: &dyn Fn(&str) -> bool,
        resolve_after_ms: u64,
        suppress_ms: u64,
        now: Now,
    ) -> Vec<AlertEvent> {
        // Before the pending slots are pruned: they are what says which slots held.
        let events = self.resolve_cleared(scope, resolve_after_ms, suppress_ms, now);
        let pass = self.pass;
        self.pending
            .retain(|slot, p| p.pass == pass || !scope(slot));
        self.suppressed_until.retain(|_, t| *t > now.unix_ms);
        self.prune_resolved();
        events
    }

    fn resolve_cleared(
        &mut self,
        scope: &dyn Fn(&str) -> bool,
        resolve_after_ms: u64,
        suppress_ms: u64,
        now: Now,
    ) -> Vec<AlertEvent> {
        let mut events = Vec::new();
        let mut resolved = Vec::new();
        let (pending, pass) = (&self.pending, self.pass);
        let held = |slot: &str| pending.get(slot).is_some_and(|p| p.pass == pass);
        for (slot, id) in &self.open {
            if held(slot) || !scope(slot) {
                continue;
            }
            // An open slot without its alert has nothing to resolve: just close the slot.
            let Some(shared) = self.alerts.get_mut(id) else {
                resolved.push(slot.clone());
                continue;
            };
            if now.unix_ms.saturating_sub(shared.last_seen_ms) >= resolve_after_ms {
                let a = std::sync::Arc::make_mut(shared);
                a.state = AlertState::Resolved;
                a.resolved_at = Some(rfc3339(now.unix_ms));
                events.push(AlertEvent {
                    event: EventKind::Resolve,
                    alert: shared.clone(),
                });
                resolved.push(slot.clone());
            }
        }
        for slot in resolved {
            if let Some(id) = self.open.remove(&slot) {
                self.event_sent_ms.remove(&id);
            }
            self.suppressed_until
                .insert(slot, now.unix_ms + suppress_ms);
            self.counters.resolved += 1;
        }
        events
    }

    /// Keeps every open alert and the most recent resolved ones.
    fn prune_resolved(&mut self) {
        let mut resolved: Vec<(u64, String)> = self
            .alerts
            .values()
            .filter(|a| a.state == AlertState::Resolved)
            .map(|a| (a.last_seen_ms, a.id.clone()))
            .collect();
        if resolved.len() > RESOLVED_KEPT {
            resolved.sort();
            for (_, id) in resolved.iter().take(resolved.len() - RESOLVED_KEPT) {
                self.alerts.remove(id);
            }
        }
    }
}
