//! Rules: as written in the config (`[[detect.rules]]`), and validated into typed conditions
//! the detector evaluates.

use serde::{Deserialize, Serialize};

use super::{
    alert::Mode,
    signals::{self, minutes},
};
use crate::model::{
    aggregate::{ClientStats, Counts, Now, Window},
    keys::By,
};

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
    ActiveMinutes,
    ReplyBytes,
    RequestBytes,
    PromptGrowth,
    OutputTokens,
    Identities,
    Score,
}

impl Metric {
    const ALL: [(&'static str, Metric); 19] = [
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
        ("active_minutes", Metric::ActiveMinutes),
        ("reply_bytes", Metric::ReplyBytes),
        ("request_bytes", Metric::RequestBytes),
        ("prompt_growth", Metric::PromptGrowth),
        ("output_tokens", Metric::OutputTokens),
        ("identities", Metric::Identities),
        ("score", Metric::Score),
    ];

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().find(|(n, _)| *n == s).map(|(_, m)| *m)
    }

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, m)| *m == self)
            .map_or("?", |(n, _)| n)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
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

    pub fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Op::Gt => a > b,
            Op::Ge => a >= b,
            Op::Lt => a < b,
            Op::Le => a <= b,
        }
    }

    pub fn symbol(self) -> &'static str {
        match self {
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Lt => "<",
            Op::Le => "<=",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Condition {
    pub metric: Metric,
    pub window: Option<Window>,
    pub op: Op,
    pub value: f64,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub id: String,
    pub name: String,
    pub keys: Vec<By>,
    pub severity: String,
    pub mode: Mode,
    pub for_ms: u64,
    pub when: Vec<Condition>,
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

pub const SEVERITIES: [&str; 4] = ["low", "medium", "high", "critical"];

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
        let mode = Mode::parse(&c.mode)
            .ok_or_else(|| err("mode", format!("`{}` is not alert or log", c.mode)))?;
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
            mode,
            for_ms: (c.for_minutes * 60_000.0) as u64,
            when,
        })
    }
}

impl Rule {
    /// The shortest window among the conditions (`None`: totals only); names the alert's
    /// window and the period its id is stable for.
    pub fn shortest_window(&self) -> Option<Window> {
        self.when
            .iter()
            .filter_map(|c| c.window)
            .min_by_key(|w| match w {
                Window::OneMinute => 1,
                Window::TenMinutes => 10,
                Window::OneHour => 60,
            })
    }

    /// Whether a condition reads the active addresses of a group (costly to gather).
    pub fn reads_active_addresses(&self) -> bool {
        self.when
            .iter()
            .any(|c| c.metric == Metric::ActiveAddresses)
    }

    /// Start (unix seconds) of the period the alert id of a match at `now` names.
    pub fn window_start(&self, now: Now) -> u64 {
        let span_ms = match self.shortest_window() {
            Some(Window::OneMinute) | None => 60_000,
            Some(Window::TenMinutes) => 600_000,
            Some(Window::OneHour) => 3_600_000,
        };
        now.unix_ms / span_ms * span_ms / 1000
    }
}

/// One key's window sums, read at most once per evaluation (indexed by `Window`).
#[derive(Debug, Default)]
pub struct WindowMemo([Option<Counts>; 3]);

/// What a condition reads besides the key's own counters.
pub struct Inputs<'a> {
    pub now: Now,
    /// Active addresses per group, for the window a condition names (10m when none).
    pub active: &'a super::ActiveAddresses,
    /// The population's 99th percentile of requests per minute, once enough history is
    /// learned (`None` before: baseline conditions never hold).
    pub baseline_p99: Option<f64>,
    /// Identities seen from each address in the last hour.
    pub behind: &'a super::signals::IdentitiesBehind,
    pub signals: &'a super::signals::SignalConfig,
}

impl Inputs<'_> {
    /// The value of `cond`'s metric for one key. `memo` holds the key's window sums once
    /// read (a fresh one per key): most rules read the same one or two windows.
    pub fn value(
        &self,
        cond: &Condition,
        c: &ClientStats,
        key: &str,
        by: By,
        memo: &mut WindowMemo,
    ) -> f64 {
        let mut counts = |w: Option<Window>| -> Counts {
            w.map_or(c.totals(), |w| {
                let slot = &mut memo.0[w as usize];
                *slot.get_or_insert_with(|| c.windows().get(self.now.secs(), w))
            })
        };
        let w = cond.window;
        match cond.metric {
            Metric::Requests => counts(w).requests as f64,
            Metric::BytesIn => counts(w).bytes_in as f64,
            Metric::BytesOut => counts(w).bytes_out as f64,
            Metric::EventsOut => counts(w).events_out as f64,
            Metric::Connections => counts(w).connections as f64,
            Metric::OpenConnections => c.open_connections() as f64,
            Metric::PeakOpenConnections => c.peak_open_connections() as f64,
            Metric::OutInRatio => {
                let t = counts(w);
                ratio(t.bytes_out, t.bytes_in)
            }
            // Windowed: the last ~10 minutes (1m, 10m) or ~hour; without a window, every
            // gap since first seen, as before (kept for configs that say so).
            Metric::IntervalCv => match w {
                Some(w) => c.gaps().cv_recent(w, self.now.unix_ms),
                None => c.gaps().cv(),
            }
            .unwrap_or(f64::INFINITY),
            Metric::DistinctAddresses => match w {
                Some(w) => c.distinct_sources(self.now.secs(), minutes(w) * 60) as f64,
                None => c.seen_from().len() as f64,
            },
            Metric::ActiveMinutes => c
                .windows()
                .active_minutes(self.now.secs(), minutes(w.unwrap_or(Window::TenMinutes)))
                as f64,
            Metric::ReplyBytes => signals::reply_bytes(&counts(w)),
            Metric::RequestBytes => signals::request_bytes(&counts(w)),
            Metric::PromptGrowth => signals::prompt_growth(c, self.now),
            Metric::OutputTokens => signals::est_tokens(&counts(w)),
            Metric::Identities => f64::from(self.behind.of(by, key)),
            Metric::Score => super::score::points(c, by, key, self.behind, self.signals, self.now),
            Metric::ActiveAddresses => match by {
                By::Group => self.active.in_window(w.unwrap_or(Window::TenMinutes), key) as f64,
                _ => 1.0,
            },
            Metric::BaselineRatio => match self.baseline_p99 {
                Some(p99) => counts(Some(Window::OneMinute)).requests as f64 / p99.max(1.0),
                None => f64::NAN,
            },
        }
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        if a == 0 { 0.0 } else { f64::INFINITY }
    } else {
        a as f64 / b as f64
    }
}
