//! Extraction detection: threshold rules over per-client signals, an adaptive population
//! baseline, and the alert lifecycle (open -> update -> resolve, suppression, allow-lists,
//! log-only rules). Every alert is mapped to MITRE ATLAS AML.T0024.002 (Extract AI Model).

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    net::IpAddr,
};

use sensor_http::Cidr;
use serde::{Deserialize, Serialize};

use crate::{
    model::aggregate::{Aggregator, ClientStats, Counts, Now, Window},
    model::keys::By,
};

pub const TECHNIQUE_ID: &str = "AML.T0024.002";
pub const TECHNIQUE_NAME: &str = "Extract AI Model";

// --- configuration ------------------------------------------------------------------------

/// One rule as written in the config (`[[detect.rules]]`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub id: String,
    pub name: String,
    /// Which tables the rule runs over: address, group, identity, forwarded.
    pub keys: Vec<String>,
    #[serde(default = "default_severity")]
    pub severity: String,
    /// "alert" (default) or "log": a log-only rule records what it would raise, for rollout.
    #[serde(default = "default_mode")]
    pub mode: String,
    /// The conditions must hold this many minutes in a row before the rule fires.
    #[serde(default)]
    pub for_minutes: f64,
    /// All must hold.
    pub when: Vec<ConditionConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConditionConfig {
    pub metric: String,
    /// 1m, 10m or 1h for windowed metrics; omitted: totals since first seen.
    #[serde(default)]
    pub window: Option<String>,
    pub op: String,
    pub value: f64,
}

fn default_severity() -> String {
    "medium".into()
}

fn default_mode() -> String {
    "alert".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Requests,
    BytesIn,
    BytesOut,
    EventsOut,
    Connections,
    OpenConnections,
    PeakOpenConnections,
    OutInRatio,
    IntervalCv,
    DistinctAddresses,
    ActiveAddresses,
    BaselineRatio,
}

impl Metric {
    const ALL: [(&'static str, Metric); 12] = [
        ("requests", Metric::Requests),
        ("bytes_in", Metric::BytesIn),
        ("bytes_out", Metric::BytesOut),
        ("events_out", Metric::EventsOut),
        ("connections", Metric::Connections),
        ("open_connections", Metric::OpenConnections),
        ("peak_open_connections", Metric::PeakOpenConnections),
        ("out_in_ratio", Metric::OutInRatio),
        ("interval_cv", Metric::IntervalCv),
        ("distinct_addresses", Metric::DistinctAddresses),
        ("active_addresses", Metric::ActiveAddresses),
        ("baseline_ratio", Metric::BaselineRatio),
    ];

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().find(|(n, _)| *n == s).map(|(_, m)| *m)
    }

    fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, m)| *m == self)
            .map_or("?", |(n, _)| n)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Gt,
    Ge,
    Lt,
    Le,
}

impl Op {
    fn parse(s: &str) -> Option<Self> {
        match s {
            ">" => Some(Op::Gt),
            ">=" => Some(Op::Ge),
            "<" => Some(Op::Lt),
            "<=" => Some(Op::Le),
            _ => None,
        }
    }

    fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Op::Gt => a > b,
            Op::Ge => a >= b,
            Op::Lt => a < b,
            Op::Le => a <= b,
        }
    }

    fn symbol(self) -> &'static str {
        match self {
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Lt => "<",
            Op::Le => "<=",
        }
    }
}

#[derive(Debug, Clone)]
struct Condition {
    metric: Metric,
    window: Option<Window>,
    op: Op,
    value: f64,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub id: String,
    pub name: String,
    keys: Vec<By>,
    pub severity: String,
    log_only: bool,
    for_ms: u64,
    when: Vec<Condition>,
}

/// A rule error, naming the rule and the key at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("rule `{rule}`: {message}")]
pub struct RuleError {
    pub rule: String,
    /// The config key at fault (metric, window, op, keys, severity, mode, when).
    pub key: &'static str,
    pub message: String,
}

const SEVERITIES: [&str; 4] = ["low", "medium", "high", "critical"];

impl Rule {
    pub fn from_config(c: &RuleConfig) -> Result<Self, RuleError> {
        let err = |key: &'static str, message: String| RuleError {
            rule: c.id.clone(),
            key,
            message,
        };
        if c.id.is_empty()
            || !c
                .id
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
        {
            return Err(err("id", "ids are letters, digits, - and _".into()));
        }
        let keys = c
            .keys
            .iter()
            .map(|k| {
                By::parse(k).ok_or_else(|| {
                    err(
                        "keys",
                        format!("unknown key `{k}` (address, group, identity, forwarded)"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(err("keys", "at least one key kind".into()));
        }
        if !SEVERITIES.contains(&c.severity.as_str()) {
            return Err(err(
                "severity",
                format!("`{}` is not one of {}", c.severity, SEVERITIES.join(", ")),
            ));
        }
        let log_only = match c.mode.as_str() {
            "alert" => false,
            "log" => true,
            other => return Err(err("mode", format!("`{other}` is not alert or log"))),
        };
        if c.when.is_empty() {
            return Err(err("when", "at least one condition".into()));
        }
        let when = c
            .when
            .iter()
            .map(|w| {
                let metric = Metric::parse(&w.metric)
                    .ok_or_else(|| err("metric", format!("unknown metric `{}`", w.metric)))?;
                let window = match &w.window {
                    Some(s) => Some(
                        Window::parse(s)
                            .ok_or_else(|| err("window", format!("`{s}` is not 1m, 10m or 1h")))?,
                    ),
                    None => None,
                };
                let op = Op::parse(&w.op)
                    .ok_or_else(|| err("op", format!("`{}` is not >, >=, < or <=", w.op)))?;
                if !w.value.is_finite() {
                    return Err(err("value", "must be a finite number".into()));
                }
                Ok(Condition {
                    metric,
                    window,
                    op,
                    value: w.value,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !(c.for_minutes >= 0.0 && c.for_minutes <= 1440.0) {
            return Err(err("for_minutes", "must be 0..=1440".into()));
        }
        Ok(Self {
            id: c.id.clone(),
            name: c.name.clone(),
            keys,
            severity: c.severity.clone(),
            log_only,
            for_ms: (c.for_minutes * 60_000.0) as u64,
            when,
        })
    }
}

// --- alerts -------------------------------------------------------------------------------

/// A condition as evaluated when the alert last fired: the threshold crossed and the value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Crossed {
    pub metric: String,
    pub window: Option<String>,
    pub op: String,
    pub threshold: f64,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Technique {
    pub framework: String,
    pub id: String,
    pub name: String,
}

/// One alert, as `sensor alerts --json`, the JSON lines file and the outputs carry it. Field
/// names are a public interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// Stable: rule, key kind, key and the start of the window in which it opened.
    pub id: String,
    pub rule_id: String,
    pub rule_name: String,
    /// address, group, identity or forwarded.
    pub key_kind: String,
    pub key: String,
    pub severity: String,
    /// "alert", or "log" for a log-only rule.
    pub mode: String,
    /// "open" or "resolved".
    pub state: String,
    /// The shortest window among the rule's conditions ("1m" ...), or "total".
    pub window: String,
    /// The key's counters when the alert last fired.
    pub evidence: BTreeMap<String, f64>,
    pub conditions: Vec<Crossed>,
    /// Population baseline at that time (requests and bytes out per minute), if learned.
    pub baseline: Option<BaselineView>,
    pub first_seen: String,
    pub last_seen: String,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub resolved_at: Option<String>,
    pub host: String,
    pub technique: Technique,
    /// How many evaluations found the condition still true.
    pub updates: u64,
}

/// One event of an alert (open, update, resolve): the id outputs and the collector
/// deduplicate on.
pub fn event_id(alert: &Alert, event: &str) -> String {
    format!("{}:{event}:{}", alert.id, alert.updates)
}

/// What happened to an alert, for the JSON lines file and the shipping outputs.
#[derive(Debug, Clone, Serialize)]
pub struct AlertEvent {
    /// "open", "update" or "resolve".
    pub event: &'static str,
    pub alert: Alert,
}

// --- baseline -----------------------------------------------------------------------------

/// Percentiles of per-key per-minute activity over the population, the basis of a rate
/// limit recommendation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct BaselineView {
    /// Complete minutes of history the percentiles are built from (up to 60).
    pub history_minutes: u64,
    pub requests_per_minute: Percentiles,
    pub bytes_out_per_minute: Percentiles,
}

/// Samples per minute kept for the population baseline (a reservoir of active keys).
const BASELINE_SAMPLES_PER_MINUTE: usize = 5000;
const BASELINE_MINUTES: usize = 60;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Baseline {
    last_minute: u64,
    /// Per complete minute: (requests, bytes_out) of each active address and identity.
    minutes: VecDeque<Vec<(u64, u64)>>,
    view: BaselineView,
}

fn percentiles(mut v: Vec<u64>) -> Percentiles {
    if v.is_empty() {
        return Percentiles::default();
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] as f64;
    Percentiles {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
    }
}

impl Baseline {
    /// Once per minute: sample the last complete minute of every active key.
    fn update(&mut self, agg: &Aggregator, now: Now) {
        let minute = now.secs() / 60;
        if minute == self.last_minute {
            return;
        }
        let first = self.last_minute == 0;
        self.last_minute = minute;
        if first {
            return;
        }
        let mut batch = Vec::new();
        for table in [&agg.addresses, &agg.identities] {
            for c in table.clients.values() {
                let m = c.windows.minute(now.secs(), 0);
                if m.requests > 0 && batch.len() < BASELINE_SAMPLES_PER_MINUTE {
                    batch.push((m.requests, m.bytes_out));
                }
            }
        }
        self.minutes.push_back(batch);
        while self.minutes.len() > BASELINE_MINUTES {
            self.minutes.pop_front();
        }
        let all = || self.minutes.iter().flatten();
        self.view = BaselineView {
            history_minutes: self.minutes.len() as u64,
            requests_per_minute: percentiles(all().map(|s| s.0).collect()),
            bytes_out_per_minute: percentiles(all().map(|s| s.1).collect()),
        };
    }
}

// --- the detector -------------------------------------------------------------------------

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
}

/// Alert lifecycle state, saved with the agent's snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DetectorState {
    /// Open alerts and resolved ones kept for display (bounded).
    pub alerts: BTreeMap<String, Alert>,
    /// (rule, kind, key) -> since when the rule's conditions hold.
    pending: HashMap<String, u64>,
    /// (rule, kind, key) -> id of its open alert.
    open: HashMap<String, String>,
    /// (rule, kind, key) -> no new alert before this time (unix ms).
    suppressed_until: HashMap<String, u64>,
    baseline: Baseline,
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
    /// Matches of log-only rules.
    pub logged: u64,
}

const RESOLVED_KEPT: usize = 1000;

pub struct Detector {
    pub settings: Settings,
    pub state: DetectorState,
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        if a == 0 { 0.0 } else { f64::INFINITY }
    } else {
        a as f64 / b as f64
    }
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
            },
            DetectorState::default(),
        )
    }

    pub fn baseline(&self) -> &BaselineView {
        &self.state.baseline.view
    }

    fn allowed(&self, by: By, key: &str, agg: &Aggregator) -> bool {
        match by {
            By::Address | By::Forwarded => key
                .parse::<IpAddr>()
                .is_ok_and(|ip| self.settings.allow_networks.iter().any(|n| n.contains(ip))),
            By::Group => key
                .split_once('/')
                .and_then(|(net, _)| net.parse::<IpAddr>().ok())
                .is_some_and(|ip| self.settings.allow_networks.iter().any(|n| n.contains(ip))),
            By::Identity => {
                self.settings.allow_identities.contains(key)
                    || agg.identities.clients.get(key).is_some_and(|c| {
                        c.seen_from
                            .iter()
                            .any(|ip| self.settings.allow_networks.iter().any(|n| n.contains(*ip)))
                            && c.seen_from.iter().all(|ip| {
                                self.settings.allow_networks.iter().any(|n| n.contains(*ip))
                            })
                    })
            }
        }
    }

    fn value(
        &self,
        cond: &Condition,
        c: &ClientStats,
        key: &str,
        by: By,
        active: &HashMap<String, u64>,
        now: Now,
    ) -> f64 {
        let (m, w) = (cond.metric, cond.window);
        let counts =
            |w: Option<Window>| -> Counts { w.map_or(c.totals, |w| c.windows.get(now.secs(), w)) };
        match m {
            Metric::Requests => counts(w).requests as f64,
            Metric::BytesIn => counts(w).bytes_in as f64,
            Metric::BytesOut => counts(w).bytes_out as f64,
            Metric::EventsOut => counts(w).events_out as f64,
            Metric::Connections => counts(w).connections as f64,
            Metric::OpenConnections => c.open_connections as f64,
            Metric::PeakOpenConnections => c.peak_open_connections as f64,
            Metric::OutInRatio => {
                let t = counts(w);
                ratio(t.bytes_out, t.bytes_in)
            }
            Metric::IntervalCv => c.gaps.cv().unwrap_or(f64::INFINITY),
            Metric::DistinctAddresses => c.seen_from.len() as f64,
            Metric::ActiveAddresses => match by {
                By::Group => active.get(key).copied().unwrap_or(0) as f64,
                _ => 1.0,
            },
            Metric::BaselineRatio => {
                let view = &self.state.baseline.view;
                if view.history_minutes < self.settings.baseline_min_minutes {
                    // Not enough history: baseline conditions never hold.
                    return f64::NAN;
                }
                let per_minute = counts(Some(Window::OneMinute)).requests as f64;
                per_minute / view.requests_per_minute.p99.max(1.0)
            }
        }
    }

    fn evidence(c: &ClientStats, now: Now) -> BTreeMap<String, f64> {
        let mut e = BTreeMap::new();
        for w in Window::ALL {
            let t = c.windows.get(now.secs(), w);
            e.insert(format!("requests_{}", w.name()), t.requests as f64);
            e.insert(format!("bytes_in_{}", w.name()), t.bytes_in as f64);
            e.insert(format!("bytes_out_{}", w.name()), t.bytes_out as f64);
            e.insert(format!("events_out_{}", w.name()), t.events_out as f64);
        }
        e.insert("requests_total".into(), c.totals.requests as f64);
        e.insert("bytes_out_total".into(), c.totals.bytes_out as f64);
        e.insert("connections_total".into(), c.totals.connections as f64);
        e.insert("open_connections".into(), c.open_connections as f64);
        e.insert(
            "peak_open_connections".into(),
            c.peak_open_connections as f64,
        );
        if let Some(cv) = c.gaps.cv() {
            e.insert("interval_cv".into(), cv);
        }
        if let Some(mean) = c.gaps.mean_ms() {
            e.insert("interval_mean_ms".into(), mean);
        }
        e.insert("distinct_addresses".into(), c.seen_from.len() as f64);
        e
    }

    /// Evaluates every rule over every key; returns what changed.
    pub fn evaluate(&mut self, agg: &Aggregator, now: Now) -> Vec<AlertEvent> {
        self.state.baseline.update(agg, now);
        self.state.counters.evaluations += 1;
        // Active addresses per group and window, for group rules.
        let mut active: [HashMap<String, u64>; 3] = Default::default();
        for (addr, c) in &agg.addresses.clients {
            let Ok(ip) = addr.parse::<IpAddr>() else {
                continue;
            };
            // Formatted on the stack; allocated once per group, not per address.
            let group = agg.group_key(ip);
            for (i, w) in Window::ALL.into_iter().enumerate() {
                if c.windows.get(now.secs(), w).requests > 0 {
                    match active[i].get_mut(group.as_str()) {
                        Some(n) => *n += 1,
                        None => {
                            active[i].insert(group.as_str().to_owned(), 1);
                        }
                    }
                }
            }
        }
        let mut events = Vec::new();
        let mut seen_now: HashSet<String> = HashSet::new();
        for rule in &self.settings.rules {
            for &by in &rule.keys {
                for (key, c) in &agg.table(by).clients {
                    let value = |cond: &Condition| {
                        let w = cond.window.unwrap_or(Window::TenMinutes);
                        let per_window =
                            &active[Window::ALL.iter().position(|x| *x == w).unwrap_or(1)];
                        self.value(cond, c, key, by, per_window, now)
                    };
                    // Most keys cross nothing: test first, describe only what holds.
                    if !rule
                        .when
                        .iter()
                        .all(|cond| cond.op.holds(value(cond), cond.value))
                    {
                        continue;
                    }
                    let slot = format!("{}|{}|{key}", rule.id, by.name());
                    let since = match self.state.pending.get(&slot) {
                        Some(t) => *t,
                        None => {
                            self.state.pending.insert(slot.clone(), now.unix_ms);
                            now.unix_ms
                        }
                    };
                    seen_now.insert(slot.clone());
                    // Keys still inside `for_minutes` (often thousands under a timing rule)
                    // and allow-listed ones need nothing more.
                    if now.unix_ms.saturating_sub(since) < rule.for_ms {
                        continue;
                    }
                    if self.allowed(by, key, agg) {
                        self.state.counters.allowlisted += 1;
                        continue;
                    }
                    let crossed: Vec<Crossed> = rule
                        .when
                        .iter()
                        .map(|cond| {
                            let w = cond.window.unwrap_or(Window::TenMinutes);
                            let per_window =
                                &active[Window::ALL.iter().position(|x| *x == w).unwrap_or(1)];
                            Crossed {
                                metric: cond.metric.name().into(),
                                window: cond.window.map(|w| w.name().to_owned()),
                                op: cond.op.symbol().into(),
                                threshold: cond.value,
                                value: self.value(cond, c, key, by, per_window, now),
                            }
                        })
                        .collect();
                    if let Some(id) = self.state.open.get(&slot).cloned() {
                        if let Some(a) = self.state.alerts.get_mut(&id) {
                            a.updates += 1;
                            a.last_seen_ms = now.unix_ms;
                            a.last_seen = rfc3339(now.unix_ms);
                            a.evidence = Self::evidence(c, now);
                            a.conditions = crossed;
                            // At most one update event per minute per alert.
                            if a.updates % 12 == 0 {
                                events.push(AlertEvent {
                                    event: "update",
                                    alert: a.clone(),
                                });
                            }
                        }
                        continue;
                    }
                    if self
                        .state
                        .suppressed_until
                        .get(&slot)
                        .is_some_and(|t| *t > now.unix_ms)
                    {
                        self.state.counters.suppressed += 1;
                        continue;
                    }
                    let window =
                        rule.when
                            .iter()
                            .filter_map(|c| c.window)
                            .min_by_key(|w| match w {
                                Window::OneMinute => 1,
                                Window::TenMinutes => 10,
                                Window::OneHour => 60,
                            });
                    let span_ms = match window {
                        Some(Window::OneMinute) | None => 60_000,
                        Some(Window::TenMinutes) => 600_000,
                        Some(Window::OneHour) => 3_600_000,
                    };
                    let window_start = now.unix_ms / span_ms * span_ms / 1000;
                    let id = format!("{}:{}:{key}:{window_start}", rule.id, by.name());
                    let history = self.state.baseline.view.history_minutes;
                    let alert = Alert {
                        id: id.clone(),
                        rule_id: rule.id.clone(),
                        rule_name: rule.name.clone(),
                        key_kind: by.name().into(),
                        key: key.clone(),
                        severity: rule.severity.clone(),
                        mode: if rule.log_only { "log" } else { "alert" }.into(),
                        state: "open".into(),
                        window: window.map_or("total", Window::name).into(),
                        evidence: Self::evidence(c, now),
                        conditions: crossed,
                        baseline: (history > 0).then(|| self.state.baseline.view.clone()),
                        first_seen: rfc3339(now.unix_ms),
                        last_seen: rfc3339(now.unix_ms),
                        first_seen_ms: now.unix_ms,
                        last_seen_ms: now.unix_ms,
                        resolved_at: None,
                        host: self.settings.host.clone(),
                        technique: Technique {
                            framework: "MITRE ATLAS".into(),
                            id: TECHNIQUE_ID.into(),
                            name: TECHNIQUE_NAME.into(),
                        },
                        updates: 0,
                    };
                    if rule.log_only {
                        self.state.counters.logged += 1;
                    } else {
                        self.state.counters.opened += 1;
                    }
                    self.state.open.insert(slot, id.clone());
                    self.state.alerts.insert(id, alert.clone());
                    events.push(AlertEvent {
                        event: "open",
                        alert,
                    });
                }
            }
        }
        // Conditions no longer true: forget pending ones; resolve open ones after the grace.
        self.state.pending.retain(|slot, _| seen_now.contains(slot));
        let resolve_after = self.settings.resolve_after_ms;
        let suppress = self.settings.suppress_ms;
        let mut resolved = Vec::new();
        for (slot, id) in &self.state.open {
            if seen_now.contains(slot) {
                continue;
            }
            let Some(a) = self.state.alerts.get_mut(id) else {
                resolved.push(slot.clone());
                continue;
            };
            if now.unix_ms.saturating_sub(a.last_seen_ms) >= resolve_after {
                a.state = "resolved".into();
                a.resolved_at = Some(rfc3339(now.unix_ms));
                events.push(AlertEvent {
                    event: "resolve",
                    alert: a.clone(),
                });
                resolved.push(slot.clone());
            }
        }
        for slot in resolved {
            self.state.open.remove(&slot);
            self.state
                .suppressed_until
                .insert(slot, now.unix_ms + suppress);
            self.state.counters.resolved += 1;
        }
        self.state.suppressed_until.retain(|_, t| *t > now.unix_ms);
        // Keep every open alert and the most recent resolved ones.
        let resolved_ids: Vec<(u64, String)> = self
            .state
            .alerts
            .values()
            .filter(|a| a.state == "resolved")
            .map(|a| (a.last_seen_ms, a.id.clone()))
            .collect();
        if resolved_ids.len() > RESOLVED_KEPT {
            let mut sorted = resolved_ids;
            sorted.sort();
            for (_, id) in sorted.iter().take(sorted.len() - RESOLVED_KEPT) {
                self.state.alerts.remove(id);
            }
        }
        events
    }

    /// Open alerts first (most severe, then newest), then resolved ones (newest first).
    pub fn list(&self) -> Vec<Alert> {
        let rank = |s: &str| SEVERITIES.iter().position(|x| *x == s).unwrap_or(0);
        let mut v: Vec<Alert> = self.state.alerts.values().cloned().collect();
        v.sort_by(|a, b| {
            (b.state == "open")
                .cmp(&(a.state == "open"))
                .then(rank(&b.severity).cmp(&rank(&a.severity)))
                .then(b.last_seen_ms.cmp(&a.last_seen_ms))
        });
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::aggregate::{Delta, ExchangeKeys};

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
        assert_eq!(ev[0].event, "open");
        let a = &ev[0].alert;
        assert_eq!(
            (a.rule_id.as_str(), a.key.as_str(), a.severity.as_str()),
            ("flood", "10.0.0.1", "high")
        );
        assert_eq!(a.technique.id, "AML.T0024.002");
        assert_eq!(a.conditions[0].value, 110.0);
        assert_eq!(a.evidence["requests_1m"], 110.0);
        let id = a.id.clone();
        // Still true: same alert, updated.
        assert!(d.evaluate(&agg, at(10)).is_empty());
        assert_eq!(d.state.alerts[&id].updates, 1);
        // The window slides past the burst; resolves after the grace period.
        assert!(d.evaluate(&agg, at(65)).is_empty(), "grace period");
        let ev = d.evaluate(&agg, at(200));
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].event, "resolve");
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
        let mut fired_at = None;
        for s in (0..=200).step_by(10) {
            requests(&mut agg, "10.0.0.1", 5, at(s));
            if !d.evaluate(&agg, at(s)).is_empty() && fired_at.is_none() {
                fired_at = Some(s);
            }
        }
        // The 1m window first exceeds 10 requests at 20 s; two minutes later it fires.
        assert_eq!(fired_at, Some(140));
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
