//! Extraction detection: threshold rules over per-client signals, an adaptive population
//! baseline, and the alert lifecycle (open -> update -> resolve, suppression, allow-lists,
//! log-only rules). Every alert is mapped to MITRE ATLAS AML.T0024.002 (Extract AI Model).
//!
//! `rule`: rules as configured and as evaluated; `alert`: alerts and their events as outputs
//! carry them; `state`: the lifecycle, saved with the snapshot; `baseline`: the population's
//! percentiles. This module evaluates rules over the aggregates and drives the lifecycle.

pub(crate) mod alert;
mod baseline;
mod ring;
mod rule;
mod score;
mod signals;
mod state;

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use sensor_http::Cidr;

pub use alert::{
    Alert, AlertEvent, AlertState, Crossed, EventKind, Evidence, Explanation, Mode, TECHNIQUE_ID,
    TECHNIQUE_NAME, Technique, event_id,
};
pub use baseline::BaselineView;
pub use ring::Candidate as RingCandidate;
pub use rule::{Rule, RuleConfig, SEVERITIES};
pub use signals::SignalConfig;
pub use state::{DetectCounters, DetectorState};

use crate::model::{
    aggregate::{Aggregator, ClientStats, Now, Window},
    keys::By,
};
use rule::{Inputs, WindowMemo};
use signals::IdentitiesBehind;
use state::rfc3339;

/// The ring rule's id and name (built in; `[detect.signals] rings` turns it off).
pub const RING_RULE_ID: &str = "extraction-ring";
const RING_RULE_NAME: &str = "Ring of keys extracting together";

/// Where an evaluation's ring rule runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rings {
    /// Over this aggregate (a host, a lone collector).
    Here,
    /// Elsewhere, over candidates gathered from several aggregates (a collector group's
    /// partitions), into this detector (partition 0's): `evaluate` leaves ring alerts alone,
    /// `evaluate_rings` drives them.
    Gathered,
    /// Elsewhere, into another detector (a collector group's other partitions): ring alerts
    /// this state still holds (from before the group's rule moved to partition 0) resolve.
    Elsewhere,
}

pub use ring::Found as FoundRings;

fn is_ring_slot(slot: &str) -> bool {
    slot.strip_prefix(RING_RULE_ID)
        .is_some_and(|rest| rest.starts_with('|'))
}

/// Detection settings (from `[detect]`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub rules: Vec<Rule>,
    pub allow_networks: Vec<Cidr>,
    pub allow_identities: HashSet<String>,
    pub resolve_after_ms: u64,
    pub suppress_ms: u64,
    pub baseline_min_minutes: u64,
    pub host: String,
    /// `[detect.signals]`: score and ring scales, rings on or off, learning mode.
    pub signals: SignalConfig,
}

impl Settings {
    fn allowed_ip(&self, ip: IpAddr) -> bool {
        self.allow_networks.iter().any(|n| n.contains(ip))
    }

    /// Whether a key is allow-listed: its address or group in an allowed network, or an
    /// identity named, or seen only from allowed networks.
    fn allowed(&self, by: By, key: &str, agg: &Aggregator) -> bool {
        if self.allow_networks.is_empty() && by != By::Identity {
            // Nothing to match an address against: skip parsing every key at every evaluation.
            return false;
        }
        match by {
            By::Address | By::Forwarded => key.parse().is_ok_and(|ip| self.allowed_ip(ip)),
            By::Group => key
                .split_once('/')
                .and_then(|(net, _)| net.parse().ok())
                .is_some_and(|ip| self.allowed_ip(ip)),
            By::Identity => {
                self.allow_identities.contains(key)
                    || agg.identities.clients.get(key).is_some_and(|c| {
                        c.seen_from().iter().any(|ip| self.allowed_ip(*ip))
                            && c.seen_from().iter().all(|ip| self.allowed_ip(*ip))
                    })
            }
        }
    }
}

/// Active addresses per group, per window (group rules' `active_addresses`).
#[derive(Default)]
pub struct ActiveAddresses([HashMap<String, u64, foldhash::fast::RandomState>; 3]);

impl ActiveAddresses {
    fn count(agg: &Aggregator, now: Now) -> Self {
        let mut active = Self::default();
        let mut pace = crate::pace::Pace::new();
        for (addr, c) in &agg.addresses.clients {
            pace.step();
            let Ok(ip) = addr.parse::<IpAddr>() else {
                continue;
            };
            // Formatted on the stack; allocated once per group, not per address.
            let group = agg.group_key(ip);
            for (per_group, w) in active.0.iter_mut().zip(Window::ALL) {
                if c.windows().get(now.secs(), w).requests > 0 {
                    match per_group.get_mut(group.as_str()) {
                        Some(n) => *n += 1,
                        None => {
                            per_group.insert(group.as_str().to_owned(), 1);
                        }
                    }
                }
            }
        }
        active
    }

    fn in_window(&self, w: Window, group: &str) -> u64 {
        let i = Window::ALL.iter().position(|x| *x == w).unwrap_or(1);
        self.0[i].get(group).copied().unwrap_or(0)
    }
}

/// One key of one rule's table under evaluation.
struct Candidate<'a> {
    rule: &'a Rule,
    by: By,
    key: &'a str,
    stats: &'a ClientStats,
}

impl Candidate<'_> {
    /// The lifecycle slot: one alert at a time per rule, key kind and key.
    /// Into `slot` (cleared first): built for every key a rule holds on at every evaluation,
    /// so into a buffer kept across keys, without formatting machinery.
    fn slot_into(&self, slot: &mut String) {
        slot.clear();
        for part in [self.rule.id.as_str(), "|", self.by.name(), "|", self.key] {
            slot.push_str(part);
        }
    }

    fn holds(&self, inputs: &Inputs, memo: &mut WindowMemo) -> bool {
        self.rule
            .when
            .iter()
            .all(|cond| cond.op.holds(self.value(cond, inputs, memo), cond.value))
    }

    fn value(&self, cond: &rule::Condition, inputs: &Inputs, memo: &mut WindowMemo) -> f64 {
        inputs.value(cond, self.stats, self.key, self.by, memo)
    }

    /// Every condition with its threshold and the value found.
    fn crossed(&self, inputs: &Inputs, memo: &mut WindowMemo) -> Vec<Crossed> {
        self.rule
            .when
            .iter()
            .map(|cond| Crossed {
                metric: cond.metric.name().into(),
                window: cond.window.map(|w| w.name().into()),
                op: cond.op.symbol().into(),
                threshold: cond.value,
                value: self.value(cond, inputs, memo),
            })
            .collect()
    }

    fn explain(&self, inputs: &Inputs) -> Explanation {
        score::score(
            self.stats,
            self.by,
            self.key,
            inputs.behind,
            inputs.signals,
            inputs.now,
        )
    }
}

/// What a new alert is made of, besides the time and the detector's settings.
struct Draft<'a> {
    rule_id: &'a str,
    rule_name: &'a str,
    key_kind: &'static str,
    key: &'a str,
    severity: &'a str,
    mode: Mode,
    /// The shortest window of the conditions ("total" for none) and its start.
    window: &'static str,
    window_start: u64,
    evidence: Evidence,
    crossed: Vec<Crossed>,
    explain: Explanation,
}

impl Draft<'_> {
    fn alert(self, host: &str, baseline: &BaselineView, now: Now) -> Alert {
        Alert {
            id: format!(
                "{}:{}:{}:{}",
                self.rule_id, self.key_kind, self.key, self.window_start
            ),
            rule_id: self.rule_id.to_owned(),
            rule_name: self.rule_name.to_owned(),
            key_kind: self.key_kind.into(),
            key: self.key.to_owned(),
            severity: self.severity.to_owned(),
            mode: self.mode,
            state: AlertState::Open,
            window: self.window.into(),
            evidence: self.evidence,
            conditions: self.crossed,
            baseline: (baseline.history_minutes > 0).then(|| baseline.clone()),
            first_seen: rfc3339(now.unix_ms),
            last_seen: rfc3339(now.unix_ms),
            first_seen_ms: now.unix_ms,
            last_seen_ms: now.unix_ms,
            resolved_at: None,
            host: host.to_owned(),
            technique: Technique {
                framework: "MITRE ATLAS".into(),
                id: TECHNIQUE_ID.into(),
                name: TECHNIQUE_NAME.into(),
            },
            updates: 0,
            explain: Some(self.explain),
        }
    }
}

pub struct Detector {
    pub settings: Settings,
    pub state: DetectorState,
}

impl Detector {
    pub fn new(settings: Settings, state: DetectorState) -> Self {
        Self { settings, state }
    }

    /// A detector without rules (tests and tools that need an agent state).
    #[cfg(test)]
    pub fn without_rules() -> Self {
        Self::new(
            Settings {
                rules: Vec::new(),
                allow_networks: Vec::new(),
                allow_identities: HashSet::new(),
                resolve_after_ms: 0,
                suppress_ms: 0,
                baseline_min_minutes: 30,
                host: "test".into(),
                signals: SignalConfig::default(),
            },
            DetectorState::default(),
        )
    }

    pub fn baseline(&self) -> &BaselineView {
        &self.state.baseline.view
    }

    /// Evaluates every rule over every key; returns what changed.
    pub fn evaluate(&mut self, agg: &Aggregator, now: Now) -> Vec<AlertEvent> {
        self.evaluate_with(agg, now, Rings::Here)
    }

    /// Evaluates the rules, the ring rule only where `rings` says.
    pub fn evaluate_with(&mut self, agg: &Aggregator, now: Now, rings: Rings) -> Vec<AlertEvent> {
        self.state.baseline.update(agg, now);
        self.state.counters.evaluations += 1;
        // Every address parsed and its windows summed: only for rules that read it.
        let active = if self.settings.rules.iter().any(Rule::reads_active_addresses) {
            ActiveAddresses::count(agg, now)
        } else {
            ActiveAddresses::default()
        };
        let behind = IdentitiesBehind::count(agg, now);
        let Self { settings, state } = self;
        state.begin_pass();
        let inputs = Inputs {
            now,
            active: &active,
            baseline_p99: state.baseline.requests_p99(settings.baseline_min_minutes),
            behind: &behind,
            signals: &settings.signals,
        };
        // Key by key, every rule over the key's table in turn, so that a key's window sums
        // are read once for all of them (`WindowMemo`). Each event is tagged with its rule's
        // place and the table's place in the rule's keys, and a stable sort puts them back in
        // rule order: what a rule-major walk gave. Nothing a key's rules do touches another
        // key's slots, so the walk's order changes nothing else.
        let mut tagged: Vec<(usize, usize, AlertEvent)> = Vec::new();
        // The slot's name, built in one buffer for every key that holds.
        let mut slot = String::new();
        for by in By::ALL {
            let rules: Vec<(usize, usize, &Rule)> = settings
                .rules
                .iter()
                .enumerate()
                .flat_map(|(i, rule)| {
                    rule.keys
                        .iter()
                        .enumerate()
                        .filter(move |(_, b)| **b == by)
                        .map(move |(place, _)| (i, place, rule))
                })
                .collect();
            if rules.is_empty() {
                continue;
            }
            let mut pace = crate::pace::Pace::new();
            for (key, stats) in &agg.table(by).clients {
                // Every key of every table each evaluation: milliseconds with many clients.
                pace.step();
                let mut memo = WindowMemo::default();
                for &(i, place, rule) in &rules {
                    let cand = Candidate {
                        rule,
                        by,
                        key,
                        stats,
                    };
                    // Most keys cross nothing: test first, describe only what holds.
                    if !cand.holds(&inputs, &mut memo) {
                        continue;
                    }
                    cand.slot_into(&mut slot);
                    if let Some(e) = matched(state, settings, &slot, &cand, &inputs, agg, &mut memo)
                    {
                        tagged.push((i, place, e));
                    }
                }
            }
        }
        tagged.sort_by_key(|(i, place, _)| (*i, *place));
        let mut events: Vec<AlertEvent> = tagged.into_iter().map(|(_, _, e)| e).collect();
        let mut rings_judged = rings != Rings::Gathered;
        if settings.signals.rings && rings == Rings::Here {
            let allowed = |by: By, key: &str| settings.allowed(by, key, agg);
            let started = state.started_ms(now);
            let found = ring::find(agg, &behind, &allowed, &settings.signals, started, now);
            rings_judged = found.complete;
            if !found.complete {
                state.counters.rings_incomplete += 1;
            }
            events.extend(rings_matched(state, settings, found.rings, now));
        }
        // Ring alerts driven elsewhere, or by an evaluation that stopped short, are not this
        // evaluation's to resolve.
        let scope = |slot: &str| rings_judged || !is_ring_slot(slot);
        events.extend(state.settle(&scope, settings.resolve_after_ms, settings.suppress_ms, now));
        events
    }

    /// This aggregate's ring candidates with their evidence, allow-listed keys left out
    /// (none when the ring rule is off).
    pub fn ring_candidates(&self, agg: &Aggregator, now: Now) -> Vec<RingCandidate> {
        let settings = &self.settings;
        if !settings.signals.rings {
            return Vec::new();
        }
        let behind = IdentitiesBehind::count(agg, now);
        let allowed = |by: By, key: &str| settings.allowed(by, key, agg);
        let mut cands = ring::harvest(agg, &behind, &allowed, &settings.signals, now);
        for c in &mut cands {
            let stats = By::parse(&c.kind).and_then(|by| agg.table(by).clients.get(&c.key));
            c.evidence = stats.map(|s| Evidence::of(s, now));
        }
        cands
    }

    /// The ring rule over candidates gathered from every partition (`Rings::Gathered`):
    /// opens, updates and resolves ring alerts only. In three steps, so that the linking
    /// (the costly one) runs without the detector: `ring_context`, `link_rings`, `apply_rings`.
    pub fn evaluate_rings(&mut self, candidates: &[RingCandidate], now: Now) -> Vec<AlertEvent> {
        let found = self
            .ring_context(now)
            .map(|(cfg, started)| link_rings(candidates, &cfg, started));
        self.apply_rings(found, true, now)
    }

    /// What linking needs from the detector: the ring settings and its start (None when the
    /// ring rule is off).
    pub fn ring_context(&mut self, now: Now) -> Option<(SignalConfig, u64)> {
        self.settings
            .signals
            .rings
            .then(|| (self.settings.signals.clone(), self.state.started_ms(now)))
    }

    /// Opens and updates the alerts of the rings `found`, and resolves those no longer found
    /// when the linking and the gathering (`gathered_all`) saw every candidate. With the
    /// ring rule off (`found` None) every ring alert resolves in its time.
    pub fn apply_rings(
        &mut self,
        found: Option<FoundRings>,
        gathered_all: bool,
        now: Now,
    ) -> Vec<AlertEvent> {
        let Self { settings, state } = self;
        state.begin_pass();
        let mut events = Vec::new();
        let mut judged = true;
        if let Some(found) = found {
            judged = found.complete && gathered_all;
            if !judged {
                state.counters.rings_incomplete += 1;
            }
            events.extend(rings_matched(state, settings, found.rings, now));
        }
        let scope = |slot: &str| judged && is_ring_slot(slot);
        events.extend(state.settle(&scope, settings.resolve_after_ms, settings.suppress_ms, now));
        events
    }

    /// Open alerts first (most severe, then newest), then resolved ones (newest first).
    /// Borrowed: with thousands open, a copy of each for one API answer doubled the memory
    /// they take.
    pub fn list(&self) -> Vec<&Alert> {
        let rank = |s: &str| SEVERITIES.iter().position(|x| *x == s).unwrap_or(0);
        let mut v: Vec<&Alert> = self.state.alerts.values().map(|a| &**a).collect();
        v.sort_by(|a, b| {
            b.is_open()
                .cmp(&a.is_open())
                .then(rank(&b.severity).cmp(&rank(&a.severity)))
                .then(b.last_seen_ms.cmp(&a.last_seen_ms))
        });
        v
    }
}

/// Links gathered candidates into rings (no detector needed: run it off any lock).
pub fn link_rings(candidates: &[RingCandidate], cfg: &SignalConfig, started_ms: u64) -> FoundRings {
    let none = |_: &RingCandidate| Evidence::default();
    ring::find_among(candidates, &none, cfg, started_ms)
}

/// A key whose rule conditions hold: after `for_minutes`, and unless allow-listed, it
/// updates its open alert or opens one (unless the slot is suppressed).
fn matched(
    state: &mut DetectorState,
    settings: &Settings,
    slot: &str,
    cand: &Candidate,
    inputs: &Inputs,
    agg: &Aggregator,
    memo: &mut WindowMemo,
) -> Option<AlertEvent> {
    let now = inputs.now;
    let since = state.holding_since(slot, now);
    // Keys still inside `for_minutes` (often thousands under a timing rule) and allow-listed
    // ones need nothing more.
    if now.unix_ms.saturating_sub(since) < cand.rule.for_ms {
        return None;
    }
    if settings.allowed(cand.by, cand.key, agg) {
        state.counters.allowlisted += 1;
        return None;
    }
    let crossed = cand.crossed(inputs, memo);
    let explain = cand.explain(inputs);
    if let Some(id) = state.open_id(slot).cloned() {
        return state.update(
            &id,
            Evidence::of(cand.stats, now),
            crossed,
            Some(explain),
            now,
        );
    }
    if state.suppressed(slot, now) {
        return None;
    }
    let rule = cand.rule;
    let draft = Draft {
        rule_id: &rule.id,
        rule_name: &rule.name,
        key_kind: cand.by.name(),
        key: cand.key,
        severity: &rule.severity,
        mode: learning_mode(state, settings, rule.mode),
        window: rule.shortest_window().map_or("total", Window::name),
        window_start: rule.window_start(now),
        evidence: Evidence::of(cand.stats, now),
        crossed,
        explain,
    };
    let alert = draft.alert(&settings.host, &state.baseline.view, now);
    Some(state.open(slot.to_owned(), alert))
}

/// In learning mode, matches before the baseline exists are only recorded.
fn learning_mode(state: &DetectorState, settings: &Settings, mode: Mode) -> Mode {
    let learned = state.baseline.view.history_minutes >= settings.baseline_min_minutes;
    if settings.signals.learning && !learned {
        Mode::Log
    } else {
        mode
    }
}

/// The rings found in one evaluation: each slot held (marked by `ring_matched`), each alert
/// updated or opened.
fn rings_matched(
    state: &mut DetectorState,
    settings: &Settings,
    rings: Vec<ring::Ring>,
    now: Now,
) -> Vec<AlertEvent> {
    let mut events = Vec::new();
    for r in rings {
        let slot = format!("{RING_RULE_ID}|ring|{}", r.key);
        events.extend(ring_matched(state, settings, slot, r, now));
    }
    events
}

/// A ring found: updates its open alert, or opens one (unless suppressed or allow-listed:
/// allow-listed members never join a ring).
fn ring_matched(
    state: &mut DetectorState,
    settings: &Settings,
    slot: String,
    r: ring::Ring,
    now: Now,
) -> Option<AlertEvent> {
    state.holding_since(&slot, now);
    let explain = Explanation {
        score: 0.0,
        parts: Vec::new(),
        ring: Some(r.info),
    };
    if let Some(id) = state.open_id(&slot).cloned() {
        return state.update(&id, r.evidence, r.crossed, Some(explain), now);
    }
    if state.suppressed(&slot, now) {
        return None;
    }
    let draft = Draft {
        rule_id: RING_RULE_ID,
        rule_name: RING_RULE_NAME,
        key_kind: "ring",
        key: &r.key,
        severity: "high",
        mode: learning_mode(state, settings, Mode::Alert),
        window: "10m",
        window_start: now.unix_ms / 600_000 * 600,
        evidence: r.evidence,
        crossed: r.crossed,
        explain,
    };
    let alert = draft.alert(&settings.host, &state.baseline.view, now);
    Some(state.open(slot, alert))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::aggregate::{Counts, Delta, ExchangeKeys};

    fn rule(text: &str) -> Rule {
        Rule::from_config(&toml::from_str::<RuleConfig>(text).expect("rule toml")).expect("rule")
    }

    fn detector(rules: Vec<Rule>) -> Detector {
        let mut d = Detector::without_rules();
        d.settings.rules = rules;
        d.settings.resolve_after_ms = 60_000;
        d.settings.suppress_ms = 600_000;
        d
    }

    fn at(s: u64) -> Now {
        Now {
            unix_ms: 1_800_000_000_000 + s * 1000,
        }
    }

    fn requests(agg: &mut Aggregator, ip: &str, n: u64, now: Now) {
        let d = Delta {
            counts: Counts {
                requests: n,
                bytes_out: n * 1000,
                bytes_in: n * 100,
                ..Default::default()
            },
            ..Default::default()
        };
        agg.apply(ip.parse().expect("ip"), &d, now);
    }

    /// Five requests from 10.0.0.1 every 10 s over `secs`, an evaluation after each: when the
    /// first event came.
    fn first_event_at(
        d: &mut Detector,
        agg: &mut Aggregator,
        secs: impl Iterator<Item = u64>,
    ) -> Option<u64> {
        let mut fired_at = None;
        for s in secs {
            requests(agg, "10.0.0.1", 5, at(s));
            if !d.evaluate(agg, at(s)).is_empty() && fired_at.is_none() {
                fired_at = Some(s);
            }
        }
        fired_at
    }

    const FLOOD: &str = r#"id = "flood"
name = "Flood"
keys = ["address"]
severity = "high"
when = [{ metric = "requests", window = "1m", op = ">", value = 100 }]"#;

    #[test]
    fn lifecycle_open_update_resolve_suppress() {
        let mut d = detector(vec![rule(FLOOD)]);
        let mut agg = Aggregator::new(100, 24, 56);
        requests(&mut agg, "10.0.0.1", 50, at(0));
        assert!(d.evaluate(&agg, at(1)).is_empty(), "below threshold");
        requests(&mut agg, "10.0.0.1", 60, at(2));
        requests(&mut agg, "10.0.0.2", 5, at(2));
        let ev = d.evaluate(&agg, at(3));
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].event, EventKind::Open);
        let a = &ev[0].alert;
        assert_eq!(
            (a.rule_id.as_str(), a.key.as_str(), a.severity.as_str()),
            ("flood", "10.0.0.1", "high")
        );
        assert_eq!(a.technique.id, "AML.T0024.002");
        assert_eq!(a.conditions[0].value, 110.0);
        assert_eq!(a.evidence.window(Window::OneMinute).requests, 110.0);
        let id = a.id.clone();
        // Still true: same alert, updated.
        assert!(d.evaluate(&agg, at(10)).is_empty());
        assert_eq!(d.state.alerts[&id].updates, 1);
        // The window slides past the burst; resolves after the grace period.
        assert!(d.evaluate(&agg, at(65)).is_empty(), "grace period");
        let ev = d.evaluate(&agg, at(200));
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].event, EventKind::Resolve);
        // A new burst within the suppression time raises nothing.
        requests(&mut agg, "10.0.0.1", 200, at(300));
        assert!(d.evaluate(&agg, at(301)).is_empty());
        assert_eq!(d.state.counters.suppressed, 1);
        // After it, a new alert with a new id.
        requests(&mut agg, "10.0.0.1", 200, at(900));
        let ev = d.evaluate(&agg, at(901));
        assert_eq!(ev.len(), 1);
        assert_ne!(ev[0].alert.id, id);
    }

    #[test]
    fn allow_lists_and_log_only() {
        let mut d = detector(vec![
            rule(FLOOD),
            rule(
                &FLOOD
                    .replace("\"flood\"", "\"flood-log\"")
                    .replace("severity = \"high\"", "mode = \"log\""),
            ),
        ]);
        d.settings.allow_networks = vec!["10.9.0.0/16".parse().expect("cidr")];
        let mut agg = Aggregator::new(100, 24, 56);
        requests(&mut agg, "10.9.1.1", 500, at(0));
        requests(&mut agg, "10.0.0.1", 500, at(0));
        let ev = d.evaluate(&agg, at(1));
        let keys: Vec<(&str, &str, &str)> = ev
            .iter()
            .map(|e| {
                (
                    e.alert.rule_id.as_str(),
                    e.alert.key.as_str(),
                    e.alert.mode.as_str(),
                )
            })
            .collect();
        assert!(keys.contains(&("flood", "10.0.0.1", "alert")));
        assert!(keys.contains(&("flood-log", "10.0.0.1", "log")));
        assert!(!keys.iter().any(|k| k.1 == "10.9.1.1"), "allow-listed");
        assert_eq!(d.state.counters.allowlisted, 2);
        assert_eq!(d.state.counters.logged, 1);
    }

    #[test]
    fn for_minutes_requires_a_sustained_match() {
        let mut d = detector(vec![rule(
            &format!("{FLOOD}\nfor_minutes = 2").replace("value = 100", "value = 10"),
        )]);
        let mut agg = Aggregator::new(100, 24, 56);
        let fired_at = first_event_at(&mut d, &mut agg, (0..=200).step_by(10));
        // The 1m window first exceeds 10 requests at 20 s; two minutes later it fires.
        assert_eq!(fired_at, Some(140));
    }

    #[test]
    fn a_pending_match_is_saved_as_its_start_and_forgotten_when_it_stops_holding() {
        let flood =
            || rule(&format!("{FLOOD}\nfor_minutes = 2").replace("value = 100", "value = 10"));
        let mut d = detector(vec![flood()]);
        let mut agg = Aggregator::new(100, 24, 56);
        for s in (0..=60).step_by(10) {
            requests(&mut agg, "10.0.0.1", 5, at(s));
            assert!(d.evaluate(&agg, at(s)).is_empty());
        }
        // Saved as the snapshot has always held it: slot -> since (unix ms).
        let saved = serde_json::to_value(&d.state).expect("encode");
        let since = &saved["pending"]["flood|address|10.0.0.1"];
        assert_eq!(since.as_u64(), Some(at(20).unix_ms), "{saved}");
        // A restarted agent goes on from the saved start: the alert comes when it would have.
        let mut restored = detector(vec![flood()]);
        restored.state = serde_json::from_value(saved).expect("decode");
        let fired_at = first_event_at(&mut restored, &mut agg, (70..=200).step_by(10));
        assert_eq!(fired_at, Some(140));
        // One evaluation where it does not hold forgets the start: the next match waits for
        // `for_minutes` again.
        let mut d = detector(vec![flood()]);
        let mut agg = Aggregator::new(100, 24, 56);
        for s in (0..=100).step_by(10) {
            requests(&mut agg, "10.0.0.1", 5, at(s));
            assert!(d.evaluate(&agg, at(s)).is_empty());
        }
        // Quiet long enough for the one-minute window to fall to 10 or fewer.
        assert!(d.evaluate(&agg, at(170)).is_empty());
        let saved = serde_json::to_value(&d.state).expect("encode");
        assert!(
            saved["pending"].as_object().is_some_and(|m| m.is_empty()),
            "{saved}"
        );
        let fired_at = first_event_at(&mut d, &mut agg, (180..=400).step_by(10));
        // Over 10 in the one-minute window again at 200 s (its third burst); fires 2 min later.
        assert_eq!(fired_at, Some(320));
    }

    #[test]
    fn events_come_rule_by_rule_in_table_order() {
        let second = FLOOD
            .replace("\"flood\"", "\"second\"")
            .replace("Flood", "Second");
        // Two tables, the identity table first: the walk goes address table first.
        let both = r#"id = "both"
name = "Both"
keys = ["identity", "address"]
when = [{ metric = "distinct_addresses", op = ">=", value = 0 }]"#;
        let mut d = detector(vec![rule(FLOOD), rule(both), rule(&second)]);
        let mut agg = Aggregator::new(100, 24, 56);
        for i in 1..=5 {
            let ip = format!("10.0.0.{i}");
            requests(&mut agg, &ip, 200, at(0));
            let keys = ExchangeKeys {
                identity: Some(format!("k-{i}")),
                forwarded: None,
            };
            agg.request_keys(ip.parse().expect("ip"), &keys, 1, at(0));
        }
        let addresses: Vec<&str> = agg.addresses.clients.keys().collect();
        let identities: Vec<&str> = agg.identities.clients.keys().collect();
        assert_eq!(identities.len(), 5);
        let ev = d.evaluate(&agg, at(1));
        let got: Vec<(&str, &str)> = ev
            .iter()
            .map(|e| (e.alert.rule_id.as_str(), e.alert.key.as_str()))
            .collect();
        let rows = |rule: &'static str, keys: &[&str]| -> Vec<(&'static str, String)> {
            keys.iter().map(|k| (rule, k.to_string())).collect()
        };
        let mut want = rows("flood", &addresses);
        want.extend(rows("both", &identities));
        want.extend(rows("both", &addresses));
        want.extend(rows("second", &addresses));
        let want: Vec<(&str, &str)> = want.iter().map(|(r, k)| (*r, k.as_str())).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn identity_and_group_rules() {
        let spread = rule(
            r#"id = "spread"
name = "Spread"
keys = ["identity"]
when = [{ metric = "distinct_addresses", op = ">=", value = 3 }]"#,
        );
        let net = rule(
            r#"id = "net"
name = "Net"
keys = ["group"]
when = [{ metric = "active_addresses", window = "10m", op = ">=", value = 3 }]"#,
        );
        let mut d = detector(vec![spread, net]);
        let mut agg = Aggregator::new(100, 24, 56);
        for i in 1..=3 {
            let ip: IpAddr = format!("10.5.5.{i}").parse().expect("ip");
            requests(&mut agg, &ip.to_string(), 1, at(0));
            let keys = ExchangeKeys {
                identity: Some("k-0123".into()),
                forwarded: None,
            };
            agg.request_keys(ip, &keys, 1, at(0));
        }
        let ev = d.evaluate(&agg, at(1));
        let fired: Vec<(&str, &str)> = ev
            .iter()
            .map(|e| (e.alert.rule_id.as_str(), e.alert.key.as_str()))
            .collect();
        assert!(fired.contains(&("spread", "k-0123")), "{fired:?}");
        assert!(fired.contains(&("net", "10.5.5.0/24")), "{fired:?}");
    }

    #[test]
    fn rule_errors_name_the_key() {
        let bad = toml::from_str::<RuleConfig>(&FLOOD.replace("\">\"", "\"=>\"")).expect("toml");
        assert_eq!(Rule::from_config(&bad).unwrap_err().key, "op");
        let bad =
            toml::from_str::<RuleConfig>(&FLOOD.replace("\"address\"", "\"asn\"")).expect("toml");
        assert_eq!(Rule::from_config(&bad).unwrap_err().key, "keys");
    }

    #[test]
    fn update_events_go_out_once_a_minute_whatever_the_interval() {
        for interval in [1, 2, 5] {
            let mut d = detector(vec![rule(FLOOD)]);
            let mut agg = Aggregator::new(100, 24, 56);
            let mut updates = 0;
            for s in (0..=200).step_by(interval) {
                requests(&mut agg, "10.0.0.1", 10 * interval as u64, at(s as u64));
                updates += d
                    .evaluate(&agg, at(s as u64))
                    .iter()
                    .filter(|e| e.event == EventKind::Update)
                    .count();
            }
            // Open at ~20 s (the 1m window passes 100), then one update a minute.
            assert_eq!(updates, 3, "interval {interval}");
        }
    }

    /// `n` identities from `ip(i)`, each first seen at `start(i)` and making `per_min`
    /// requests of `reply` bytes every `step` seconds until `until` (seconds).
    #[expect(
        clippy::too_many_arguments,
        reason = "one test population's parameters"
    )]
    fn keys(
        agg: &mut Aggregator,
        n: u64,
        ip: impl Fn(u64) -> String,
        start: impl Fn(u64) -> u64,
        per_min: u64,
        reply: u64,
        step: u64,
        until: u64,
    ) {
        for i in 0..n {
            let addr: IpAddr = ip(i).parse().expect("ip");
            let keys = ExchangeKeys {
                identity: Some(format!("k-{}", ip(i))),
                forwarded: None,
            };
            let mut t = start(i);
            while t < until {
                let d = Delta {
                    counts: Counts {
                        requests: per_min,
                        bytes_in: per_min * 800,
                        bytes_out: per_min * reply,
                        ..Default::default()
                    },
                    ..Default::default()
                };
                agg.apply(addr, &d, at(t));
                agg.apply_exchange(&keys, &d, at(t));
                agg.request_keys(addr, &keys, t * 1_000_000_000, at(t));
                t += step;
            }
        }
    }

    #[test]
    fn a_ring_of_small_keys_started_together_alerts_and_explains_itself() {
        let mut d = detector(Vec::new());
        let mut agg = Aggregator::new(1000, 24, 56);
        d.evaluate(&agg, at(0));
        // 12 accounts over three /24s, started within a minute at 10 min, 2 requests a minute
        // of ~600 tokens each: far below any per-key rule, ~14000 tokens/min together.
        keys(
            &mut agg,
            12,
            |i| format!("10.{}.0.{}", i % 3, i + 1),
            |i| 600 + i * 5,
            2,
            3000,
            60,
            2000,
        );
        // People behind one network with the same shape, but starting minutes apart and
        // pausing every other minute: no ring.
        keys(
            &mut agg,
            12,
            |i| format!("10.9.0.{}", i + 1),
            |i| 800 + i * 200,
            2,
            3000,
            120,
            2000,
        );
        let ev = d.evaluate(&agg, at(2000));
        let rings: Vec<&Alert> = ev
            .iter()
            .map(|e| &*e.alert)
            .filter(|a| a.rule_id == RING_RULE_ID)
            .collect();
        assert_eq!(rings.len(), 1, "{rings:#?}");
        let ring = rings[0].explain.as_ref().and_then(|e| e.ring.as_ref());
        let ring = ring.expect("ring explained");
        assert_eq!(ring.member_count, 12);
        assert!(
            ring.members.iter().all(|m| !m.contains("10.9.")),
            "{ring:?}"
        );
        assert!(ring.max_member_share < 0.2, "{ring:?}");
        assert!(ring.tokens_per_minute >= 4000.0, "{ring:?}");
        assert_eq!(rings[0].key_kind, "ring");
        assert!(rings[0].key.starts_with("sync:"), "{}", rings[0].key);
    }

    /// A collector group: a ring whose 12 members fall three to a partition (below
    /// `ring_min_members` in each) is found whole from the candidates the partitions report,
    /// as one aggregate holding them all finds it; ring alerts are then driven by the
    /// gathered evaluation alone.
    #[test]
    fn a_ring_spread_over_partitions_is_found_from_their_candidates() {
        // Member `g(i)` of the farm: its address and start.
        let farm = |agg: &mut Aggregator, n: u64, g: &dyn Fn(u64) -> u64| {
            let ip = |i| {
                let g = g(i);
                format!("10.{}.0.{}", g % 3, g + 1)
            };
            keys(agg, n, ip, |i| 600 + g(i) * 5, 2, 3000, 60, 2000);
        };
        let mut whole = Aggregator::new(1000, 24, 56);
        farm(&mut whole, 12, &|i| i);
        let mut d = detector(Vec::new());
        d.evaluate(&Aggregator::new(1000, 24, 56), at(0));
        let expected: Vec<Alert> = d
            .evaluate(&whole, at(2000))
            .into_iter()
            .map(|e| (*e.alert).clone())
            .filter(|a| a.rule_id == RING_RULE_ID)
            .collect();
        assert_eq!(expected.len(), 1, "{expected:#?}");

        // Member i in partition i % 4.
        let mut parts: Vec<(Detector, Aggregator)> = (0..4)
            .map(|p: u64| {
                let mut agg = Aggregator::new(1000, 24, 56);
                farm(&mut agg, 3, &|i| i * 4 + p);
                let mut d = detector(Vec::new());
                d.evaluate(&Aggregator::new(1000, 24, 56), at(0));
                (d, agg)
            })
            .collect();
        let mut gathered = Vec::new();
        for (d, agg) in &mut parts {
            let alone = Detector::new(d.settings.clone(), d.state.clone()).evaluate(agg, at(2000));
            assert!(alone.is_empty(), "3 members alone are no ring: {alone:#?}");
            assert!(d.evaluate_with(agg, at(2000), Rings::Gathered).is_empty());
            let cands = d.ring_candidates(agg, at(2000));
            assert_eq!(cands.len(), 3);
            // As they travel between collectors.
            let wire = serde_json::to_vec(&cands).expect("json");
            let back: Vec<RingCandidate> = serde_json::from_slice(&wire).expect("json");
            assert_eq!(back, cands);
            gathered.extend(back);
        }
        let (p0, agg0) = &mut parts[0];
        let found = p0.evaluate_rings(&gathered, at(2000));
        assert_eq!(found.len(), 1, "{found:#?}");
        let (got, want) = (&found[0].alert, &expected[0]);
        assert_eq!(found[0].event, EventKind::Open);
        assert_eq!(got.key, want.key);
        assert_eq!(got.evidence, want.evidence);
        assert_eq!(got.explain, want.explain);
        assert_eq!(
            got.explain
                .as_ref()
                .and_then(|e| e.ring.as_ref())
                .map(|r| r.member_count),
            Some(12)
        );

        // The partition's own evaluations leave the ring alert alone, however long.
        assert!(p0.evaluate_with(agg0, at(4000), Rings::Gathered).is_empty());
        assert_eq!(p0.list().iter().filter(|a| a.is_open()).count(), 1);
        // The gathered evaluation resolves it once the ring is gone.
        let gone = p0.evaluate_rings(&[], at(4000));
        assert_eq!(gone.len(), 1, "{gone:#?}");
        assert_eq!(gone[0].event, EventKind::Resolve);
    }

    fn light(key: String, first_seen_ms: u64) -> RingCandidate {
        RingCandidate {
            key,
            kind: "identity".into(),
            first_seen_ms,
            cell: (40, 50),
            group: None,
            source: None,
            tokens_10m: 0.1,
            persistent: false,
            evidence: None,
        }
    }

    /// Candidates are whatever agents report: linking them must stay cheap. A crowd started
    /// together is judged in one pass (every later window is a part of the first), so
    /// 50 000 of them are judged in full; candidates spread so that every window is new and
    /// large stop the linking at its bound, and the evaluation says it is incomplete: open
    /// ring alerts then stay open instead of resolving on a partial look.
    #[test]
    fn linking_is_bounded_whatever_the_candidates() {
        let cfg = SignalConfig::default();
        let start = 1_800_000_000_000;
        let crowd: Vec<RingCandidate> = (0..50_000u64)
            .map(|i| light(format!("k-{i}"), start + 600_000 + i % 170_000))
            .collect();
        let found = link_rings(&crowd, &cfg, start);
        assert!(found.complete);
        assert!(found.rings.is_empty(), "light keys are no ring");

        // Windows of 3 minutes over 6 000 keys 60 ms apart: each holds 3 000, each new.
        let spread: Vec<RingCandidate> = (0..6_000u64)
            .map(|i| light(format!("k-{i}"), start + 600_000 + i * 60))
            .collect();
        let found = link_rings(&spread, &cfg, start);
        assert!(!found.complete, "stopped at MAX_LINK_WORK");

        // An open ring alert is kept through incomplete evaluations and resolves after a
        // complete one.
        let mut d = detector(Vec::new());
        d.evaluate(&Aggregator::new(10, 24, 56), at(0));
        let farm: Vec<RingCandidate> = (0..6u64)
            .map(|i| RingCandidate {
                tokens_10m: 12_000.0,
                ..light(format!("k-ring-{i}"), at(600).unix_ms + i * 1000)
            })
            .collect();
        let opened = d.evaluate_rings(&farm, at(1500));
        assert_eq!(opened.len(), 1, "{opened:#?}");
        let later = at(1500 + 3600);
        let (ctx_cfg, started) = d.ring_context(later).expect("rings on");
        let partial = link_rings(&spread, &ctx_cfg, started);
        assert!(d.apply_rings(Some(partial), true, later).is_empty());
        let cut = link_rings(&[], &ctx_cfg, started);
        assert!(
            d.apply_rings(Some(cut), false, later).is_empty(),
            "a gathering that cut"
        );
        assert_eq!(d.state.counters.rings_incomplete, 2);
        let gone = d.evaluate_rings(&[], later);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].event, EventKind::Resolve);
    }

    /// Persistent look-alike identities in one network, started minutes apart (no shared
    /// start): all behind one address they are an office behind its NAT, judged per identity;
    /// the same identities spread over three addresses of the network are a ring.
    #[test]
    fn a_network_ring_spans_addresses_and_one_shared_egress_is_not_one() {
        let run = |addresses: u64| {
            let mut d = detector(Vec::new());
            let mut agg = Aggregator::new(1000, 24, 56);
            d.evaluate(&agg, at(0));
            for i in 0..12u64 {
                let addr: IpAddr = format!("10.7.0.{}", 1 + i % addresses).parse().expect("ip");
                let keys = ExchangeKeys {
                    identity: Some(format!("k-office-{i}")),
                    forwarded: None,
                };
                let mut t = 400 + i * 240;
                while t < 4400 {
                    let d = Delta {
                        counts: Counts {
                            requests: 2,
                            bytes_in: 2 * 800,
                            bytes_out: 2 * 3000,
                            ..Default::default()
                        },
                        ..Default::default()
                    };
                    agg.apply(addr, &d, at(t));
                    agg.apply_exchange(&keys, &d, at(t));
                    agg.request_keys(addr, &keys, t * 1_000_000_000, at(t));
                    t += 60;
                }
            }
            d.evaluate(&agg, at(4400))
                .into_iter()
                .filter(|e| e.alert.rule_id == RING_RULE_ID)
                .map(|e| e.alert.key.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            run(1),
            Vec::<String>::new(),
            "one shared egress formed a ring"
        );
        let spread = run(3);
        assert_eq!(spread.len(), 1, "{spread:?}");
        assert!(spread[0].starts_with("net:10.7.0.0/24:"), "{spread:?}");
    }

    #[test]
    fn two_farms_started_together_with_different_shapes_are_two_rings() {
        let mut d = detector(Vec::new());
        let mut agg = Aggregator::new(1000, 24, 56);
        d.evaluate(&agg, at(0));
        let farm = |agg: &mut Aggregator, net: u64, reply: u64| {
            keys(
                agg,
                8,
                move |i| format!("10.{net}.{}.{}", i % 2, i + 1),
                |i| 600 + i * 3,
                2,
                reply,
                60,
                2000,
            )
        };
        farm(&mut agg, 20, 3000);
        farm(&mut agg, 30, 9000);
        let ev = d.evaluate(&agg, at(2000));
        let mut counts: Vec<u64> = ev
            .iter()
            .filter_map(|e| e.alert.explain.as_ref()?.ring.as_ref())
            .map(|r| r.member_count)
            .collect();
        counts.sort_unstable();
        assert_eq!(counts, vec![8, 8]);
    }

    /// Health checks: six monitors in one /24 (no identity), each polling every 2 s all hour
    /// with a ~160-byte `200 OK`: persistent, alike and ~5800 estimated "tokens" a minute
    /// together, but every reply is about a head's size. No ring; the same monitors pulling
    /// 500-byte replies (~100 tokens each) are one.
    #[test]
    fn health_checks_in_one_network_are_not_a_ring() {
        let run = |reply: u64| {
            let mut d = detector(Vec::new());
            let mut agg = Aggregator::new(1000, 24, 56);
            d.evaluate(&agg, at(0));
            for t in (0..4000u64).step_by(60) {
                for i in 1..=6 {
                    let d = Delta {
                        counts: Counts {
                            requests: 30,
                            bytes_in: 30 * 80,
                            bytes_out: 30 * reply,
                            ..Default::default()
                        },
                        ..Default::default()
                    };
                    agg.apply(format!("10.5.0.{i}").parse().expect("ip"), &d, at(t));
                }
            }
            d.evaluate(&agg, at(4000))
                .into_iter()
                .filter(|e| e.alert.rule_id == RING_RULE_ID)
                .count()
        };
        assert_eq!(run(160), 0, "health checks formed a ring");
        assert_eq!(run(500), 1, "long replies from the same network are a ring");
    }

    #[test]
    fn learning_mode_only_logs_until_the_baseline_exists() {
        let mut d = detector(vec![rule(FLOOD)]);
        d.settings.signals.learning = true;
        let mut agg = Aggregator::new(100, 24, 56);
        requests(&mut agg, "10.0.0.1", 500, at(0));
        let ev = d.evaluate(&agg, at(1));
        assert_eq!(ev[0].alert.mode, Mode::Log);
        assert!(ev[0].alert.explain.is_some());
    }

    #[test]
    fn baseline_learns_population_percentiles() {
        let mut d = detector(Vec::new());
        let mut agg = Aggregator::new(1000, 24, 56);
        d.evaluate(&agg, at(0));
        for minute in 0..5u64 {
            for i in 1..=100u64 {
                requests(&mut agg, &format!("10.1.0.{i}"), i, at(minute * 60 + 5));
            }
            d.evaluate(&agg, at((minute + 1) * 60 + 1));
        }
        let b = d.baseline();
        assert_eq!(b.history_minutes, 5);
        assert_eq!(b.requests_per_minute.p50, 51.0);
        assert_eq!(b.requests_per_minute.p99, 99.0);
    }
}
