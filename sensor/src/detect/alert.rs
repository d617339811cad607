//! Alerts as every output carries them: `sensor alerts --json`, the JSON lines file, the
//! state snapshot, the SIEM formats and the collector. Field names and values are a public
//! interface: the typed fields here serialize to the same JSON the string fields did.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::aggregate::{ClientStats, Now, Window};

pub const TECHNIQUE_ID: &str = "AML.T0024.002";
pub const TECHNIQUE_NAME: &str = "Extract AI Model";

/// Where an alert is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    Open,
    Resolved,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Open => "open",
            AlertState::Resolved => "resolved",
        }
    }
}

impl std::fmt::Display for AlertState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rule's mode: raise alerts, or only record what it would raise (for rollout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Alert,
    Log,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "alert" => Some(Mode::Alert),
            "log" => Some(Mode::Log),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Alert => "alert",
            Mode::Log => "log",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Open,
    Update,
    Resolve,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Open => "open",
            EventKind::Update => "update",
            EventKind::Resolve => "resolve",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name the agent's own code gives (a key kind, window, metric, operator, signal, the
/// technique): borrowed from the code, not allocated per alert. An alert held ~30 strings,
/// most of them these; with 20 000 alerts open the strings were a fifth of the agent's
/// memory. Read back (a snapshot, the collector's ingest) they are owned as before.
pub type Label = std::borrow::Cow<'static, str>;

/// A condition as evaluated when the alert last fired: the threshold crossed and the value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Crossed {
    pub metric: Label,
    pub window: Option<Label>,
    pub op: Label,
    pub threshold: f64,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Technique {
    pub framework: Label,
    pub id: Label,
    pub name: Label,
}

/// One window's counters in an alert's evidence.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WindowEvidence {
    pub requests: f64,
    pub bytes_in: f64,
    pub bytes_out: f64,
    pub events_out: f64,
}

/// The key's counters when the alert last fired. On the wire a flat map of numbers
/// (`requests_1m`, `bytes_out_total`, ...), as it always was: keys absent from a received
/// map read as 0 (the cadence ones stay absent), unknown keys are dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(into = "BTreeMap<String, f64>", from = "BTreeMap<String, f64>")]
pub struct Evidence {
    /// In `Window::ALL` order: 1m, 10m, 1h.
    pub windows: [WindowEvidence; 3],
    pub requests_total: f64,
    pub bytes_out_total: f64,
    pub connections_total: f64,
    pub open_connections: f64,
    pub peak_open_connections: f64,
    /// Only once the key has made enough requests to have a cadence.
    pub interval_cv: Option<f64>,
    pub interval_mean_ms: Option<f64>,
    pub distinct_addresses: f64,
}

fn window_index(w: Window) -> usize {
    match w {
        Window::OneMinute => 0,
        Window::TenMinutes => 1,
        Window::OneHour => 2,
    }
}

impl Evidence {
    pub fn of(c: &ClientStats, now: Now) -> Self {
        let mut e = Evidence {
            requests_total: c.totals().requests as f64,
            bytes_out_total: c.totals().bytes_out as f64,
            connections_total: c.totals().connections as f64,
            open_connections: c.open_connections() as f64,
            peak_open_connections: c.peak_open_connections() as f64,
            interval_cv: c.gaps().cv(),
            interval_mean_ms: c.gaps().mean_ms(),
            distinct_addresses: c.seen_from().len() as f64,
            ..Default::default()
        };
        for w in Window::ALL {
            let t = c.windows().get(now.secs(), w);
            e.windows[window_index(w)] = WindowEvidence {
                requests: t.requests as f64,
                bytes_in: t.bytes_in as f64,
                bytes_out: t.bytes_out as f64,
                events_out: t.events_out as f64,
            };
        }
        e
    }

    pub fn window(&self, w: Window) -> WindowEvidence {
        self.windows[window_index(w)]
    }

    /// The scalar (not per-window) entries under their wire names.
    fn scalars(&mut self) -> [(&'static str, &mut f64); 6] {
        [
            ("requests_total", &mut self.requests_total),
            ("bytes_out_total", &mut self.bytes_out_total),
            ("connections_total", &mut self.connections_total),
            ("open_connections", &mut self.open_connections),
            ("peak_open_connections", &mut self.peak_open_connections),
            ("distinct_addresses", &mut self.distinct_addresses),
        ]
    }
}

impl From<Evidence> for BTreeMap<String, f64> {
    fn from(mut e: Evidence) -> Self {
        let mut m = BTreeMap::new();
        for w in Window::ALL {
            let v = e.window(w);
            m.insert(format!("requests_{}", w.name()), v.requests);
            m.insert(format!("bytes_in_{}", w.name()), v.bytes_in);
            m.insert(format!("bytes_out_{}", w.name()), v.bytes_out);
            m.insert(format!("events_out_{}", w.name()), v.events_out);
        }
        if let Some(cv) = e.interval_cv {
            m.insert("interval_cv".into(), cv);
        }
        if let Some(mean) = e.interval_mean_ms {
            m.insert("interval_mean_ms".into(), mean);
        }
        for (name, v) in e.scalars() {
            m.insert(name.into(), *v);
        }
        m
    }
}

impl From<BTreeMap<String, f64>> for Evidence {
    fn from(m: BTreeMap<String, f64>) -> Self {
        let get = |k: &str| m.get(k).copied().unwrap_or(0.0);
        let mut e = Evidence {
            interval_cv: m.get("interval_cv").copied(),
            interval_mean_ms: m.get("interval_mean_ms").copied(),
            ..Default::default()
        };
        for w in Window::ALL {
            e.windows[window_index(w)] = WindowEvidence {
                requests: get(&format!("requests_{}", w.name())),
                bytes_in: get(&format!("bytes_in_{}", w.name())),
                bytes_out: get(&format!("bytes_out_{}", w.name())),
                events_out: get(&format!("events_out_{}", w.name())),
            };
        }
        for (name, v) in e.scalars() {
            *v = get(name);
        }
        e
    }
}

/// One signal's contribution to a score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Part {
    pub signal: Label,
    /// The signal's value (tokens/minute, a share, a ratio, a count: see `why`).
    pub value: f64,
    pub points: f64,
    /// The value in words.
    pub why: String,
}

/// A ring: keys that behave alike and share infrastructure or timing, alerted together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RingInfo {
    /// Member keys' kind (identity or address) and the keys, heaviest first (at most 100).
    pub member_kind: String,
    pub members: Vec<String>,
    pub member_count: u64,
    /// What ties the members together: the shared network, a synchronized start, the
    /// matching request and reply sizes.
    pub shared: Vec<String>,
    /// The members together over the last 10 minutes.
    pub requests_10m: u64,
    pub bytes_out_10m: u64,
    pub tokens_per_minute: f64,
    /// The heaviest member's share of the combined output: small when every member is.
    pub max_member_share: f64,
}

/// Why an alert fired beyond its crossed conditions: the key's score with every signal's
/// points, and for ring alerts the ring.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    pub score: f64,
    pub parts: Vec<Part>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring: Option<RingInfo>,
}

impl Explanation {
    pub fn scored(parts: Vec<Part>) -> Self {
        let score = parts.iter().map(|p| p.points).sum::<f64>();
        Self {
            score: (score * 100.0).round() / 100.0,
            parts,
            ring: None,
        }
    }
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
    pub key_kind: Label,
    pub key: String,
    pub severity: String,
    pub mode: Mode,
    pub state: AlertState,
    /// The shortest window among the rule's conditions ("1m" ...), or "total".
    pub window: Label,
    /// The key's counters when the alert last fired.
    pub evidence: Evidence,
    pub conditions: Vec<Crossed>,
    /// Population baseline at that time (requests and bytes out per minute), if learned.
    pub baseline: Option<super::baseline::BaselineView>,
    pub first_seen: String,
    pub last_seen: String,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub resolved_at: Option<String>,
    pub host: String,
    pub technique: Technique,
    /// How many evaluations found the condition still true.
    pub updates: u64,
    /// The score and its signals (and the ring) when the alert last fired; absent from
    /// alerts of older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explain: Option<Explanation>,
}

impl Alert {
    pub fn is_open(&self) -> bool {
        self.state == AlertState::Open
    }
}

/// One event of an alert (open, update, resolve): the id outputs and the collector
/// deduplicate on.
pub fn event_id(alert: &Alert, event: &str) -> String {
    format!("{}:{event}:{}", alert.id, alert.updates)
}

/// What happened to an alert, for the JSON lines file and the shipping outputs. The alert is
/// shared with the detector's copy (copied only if the detector changes it while the event is
/// still on its way): an evaluation that opened 20 000 alerts made a copy of each, ~50 MB at
/// once, which the allocator kept.
#[derive(Debug, Clone, Serialize)]
pub struct AlertEvent {
    pub event: EventKind,
    pub alert: std::sync::Arc<Alert>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The evidence map as the string-keyed version wrote it, key for key and byte for byte.
    #[test]
    fn evidence_keeps_its_wire_form() {
        let text = r#"{"bytes_in_10m":1.0,"bytes_in_1h":2.0,"bytes_in_1m":3.0,"bytes_out_10m":4.0,"bytes_out_1h":5.0,"bytes_out_1m":6.0,"bytes_out_total":7.0,"connections_total":8.0,"distinct_addresses":9.0,"events_out_10m":10.0,"events_out_1h":11.0,"events_out_1m":12.0,"interval_cv":0.5,"interval_mean_ms":250.0,"open_connections":13.0,"peak_open_connections":14.0,"requests_10m":15.0,"requests_1h":16.0,"requests_1m":17.0,"requests_total":18.0}"#;
        let e: Evidence = serde_json::from_str(text).expect("evidence");
        assert_eq!(e.window(Window::OneMinute).requests, 17.0);
        assert_eq!(e.window(Window::TenMinutes).bytes_in, 1.0);
        assert_eq!(e.interval_cv, Some(0.5));
        assert_eq!(serde_json::to_string(&e).expect("json"), text);
        // Without a cadence the two interval keys are absent, as before.
        let none = Evidence::default();
        let s = serde_json::to_string(&none).expect("json");
        assert!(!s.contains("interval"), "{s}");
        assert_eq!(s.matches(':').count(), 18);
    }

    #[test]
    fn states_modes_and_events_serialize_as_their_names() {
        let j = |v: serde_json::Result<String>| v.expect("json");
        assert_eq!(j(serde_json::to_string(&AlertState::Open)), "\"open\"");
        assert_eq!(
            j(serde_json::to_string(&AlertState::Resolved)),
            "\"resolved\""
        );
        assert_eq!(j(serde_json::to_string(&Mode::Log)), "\"log\"");
        assert_eq!(j(serde_json::to_string(&EventKind::Resolve)), "\"resolve\"");
    }
}
