//! Per-client rows as the views, the local API and the metrics show them, with the sorting,
//! windowing and filtering they share.

use std::{cmp::Ordering, collections::BTreeMap};

use serde::{Deserialize, Serialize};

use crate::{
    model::aggregate::{Aggregator, ClientStats, Counts, Now, Window},
    model::keys::By,
};

/// Counters of one sliding window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowCounts {
    pub requests: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub connections: u64,
    #[serde(default)]
    pub events_out: u64,
}

impl From<Counts> for WindowCounts {
    fn from(c: Counts) -> Self {
        Self {
            requests: c.requests,
            bytes_in: c.bytes_in,
            bytes_out: c.bytes_out,
            connections: c.connections,
            events_out: c.events_out,
        }
    }
}

/// One client (an address, or an address group) as `sensor clients --json` shows it. Field
/// names are a public interface: add fields, never rename or remove them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientRow {
    /// The address; with `--by group` the group, `--by identity` the identity, `--by forwarded`
    /// the forwarded client address.
    pub client: String,
    /// The address group (address and forwarded rows; else the same as `client`).
    pub group: String,
    /// The API identity: for identity rows the row's own, for others the latest seen.
    pub identity: Option<String>,
    /// The client behind a trusted proxy: for forwarded rows the row's own, for others the
    /// latest seen.
    pub forwarded_for: Option<String>,
    pub requests: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Connections opened (for identity and forwarded rows: connections that carried them).
    pub connections: u64,
    /// Server-sent events in streamed replies (an estimate of output token chunks).
    pub events_out: u64,
    /// Distinct client addresses an identity was used from (null for other rows).
    pub distinct_addresses: Option<u64>,
    pub open_connections: u64,
    pub peak_open_connections: u64,
    pub first_seen: String,
    pub last_seen: String,
    pub active_seconds: u64,
    /// bytes_out / bytes_in; null before any byte came in.
    pub out_in_ratio: Option<f64>,
    /// Mean gap between consecutive requests; null before two requests.
    pub interval_mean_ms: Option<f64>,
    /// Coefficient of variation of those gaps (low = machine-regular); null before three.
    pub interval_cv: Option<f64>,
    /// Keyed "1m", "10m", "1h".
    pub windows: BTreeMap<String, WindowCounts>,
}

/// Sortable columns.
pub const SORT_FIELDS: &[&str] = &[
    "bytes_out",
    "bytes_in",
    "requests",
    "connections",
    "events_out",
    "open_connections",
    "peak_open_connections",
    "active_seconds",
    "out_in_ratio",
    "interval_mean_ms",
    "interval_cv",
    "last_seen",
    "first_seen",
    "client",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub by: By,
    /// One of `SORT_FIELDS`; descending, except `client` (ascending).
    pub sort: String,
    /// Sort and limit by this window's counters instead of the totals.
    pub window: Option<Window>,
    pub limit: Option<usize>,
    /// Substring of the client or group.
    pub filter: Option<String>,
}

impl Default for Query {
    fn default() -> Self {
        Self {
            by: By::Address,
            sort: "bytes_out".into(),
            window: None,
            limit: None,
            filter: None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueryError {
    #[error("unknown sort field `{0}` (one of: {fields})", fields = SORT_FIELDS.join(", "))]
    Sort(String),
    #[error("unknown window `{0}` (1m, 10m or 1h)")]
    Window(String),
    #[error("unknown grouping `{0}` (address, group, identity or forwarded)")]
    By(String),
    #[error("bad limit `{0}`")]
    Limit(String),
}

impl Query {
    /// Parses `by=group&sort=requests&window=1m&limit=10&filter=10.0.`.
    pub fn parse(query: &str) -> Result<Self, QueryError> {
        let mut q = Query::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            match k {
                "by" => q.by = By::parse(&v).ok_or(QueryError::By(v))?,
                "sort" => {
                    if !SORT_FIELDS.contains(&v.as_str()) {
                        return Err(QueryError::Sort(v));
                    }
                    q.sort = v;
                }
                "window" => q.window = Some(Window::parse(&v).ok_or(QueryError::Window(v))?),
                "limit" => q.limit = Some(v.parse().map_err(|_| QueryError::Limit(v))?),
                "filter" if !v.is_empty() => q.filter = Some(v),
                _ => {}
            }
        }
        Ok(q)
    }

    pub fn to_query_string(&self) -> String {
        let mut parts = vec![
            format!("by={}", self.by.name()),
            format!("sort={}", self.sort),
        ];
        if let Some(w) = self.window {
            parts.push(format!("window={}", w.name()));
        }
        if let Some(l) = self.limit {
            parts.push(format!("limit={l}"));
        }
        if let Some(f) = &self.filter {
            parts.push(format!("filter={}", percent_encode(f)));
        }
        parts.join("&")
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b':' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn rfc3339_ms(unix_ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms);
    humantime::format_rfc3339_millis(t).to_string()
}

fn row(key: &str, group: String, by: By, c: &ClientStats, now: Now) -> ClientRow {
    let t = &c.totals();
    ClientRow {
        client: key.to_owned(),
        group,
        identity: match by {
            By::Identity => Some(key.to_owned()),
            _ => c.last_identity().map(str::to_owned),
        },
        forwarded_for: match by {
            By::Forwarded => Some(key.to_owned()),
            _ => c.last_forwarded().map(|ip| ip.to_string()),
        },
        requests: t.requests,
        bytes_in: t.bytes_in,
        bytes_out: t.bytes_out,
        connections: t.connections,
        events_out: t.events_out,
        distinct_addresses: (by == By::Identity).then_some(c.seen_from().len() as u64),
        open_connections: c.open_connections(),
        peak_open_connections: c.peak_open_connections(),
        first_seen: rfc3339_ms(c.first_seen_ms()),
        last_seen: rfc3339_ms(c.last_seen_ms()),
        active_seconds: c.active_seconds(),
        out_in_ratio: (t.bytes_in > 0).then(|| t.bytes_out as f64 / t.bytes_in as f64),
        interval_mean_ms: c.gaps().mean_ms(),
        interval_cv: c.gaps().cv(),
        windows: Window::ALL
            .iter()
            .map(|w| (w.name().to_owned(), c.windows().get(now.secs(), *w).into()))
            .collect(),
    }
}

fn sort_key(r: &ClientRow, field: &str, window: Option<Window>) -> f64 {
    let w = window.and_then(|w| r.windows.get(w.name()));
    match field {
        "bytes_out" => w.map_or(r.bytes_out, |w| w.bytes_out) as f64,
        "bytes_in" => w.map_or(r.bytes_in, |w| w.bytes_in) as f64,
        "requests" => w.map_or(r.requests, |w| w.requests) as f64,
        "connections" => w.map_or(r.connections, |w| w.connections) as f64,
        "events_out" => w.map_or(r.events_out, |w| w.events_out) as f64,
        "open_connections" => r.open_connections as f64,
        "peak_open_connections" => r.peak_open_connections as f64,
        "active_seconds" => r.active_seconds as f64,
        "out_in_ratio" => r.out_in_ratio.unwrap_or(-1.0),
        "interval_mean_ms" => r.interval_mean_ms.unwrap_or(-1.0),
        // Regular clients first: sort by CV ascending is what analysts want, so negate.
        "interval_cv" => -r.interval_cv.unwrap_or(f64::INFINITY),
        _ => 0.0,
    }
}

/// The rows a query selects, sorted and limited.
pub fn client_rows(agg: &Aggregator, q: &Query, now: Now) -> Vec<ClientRow> {
    let table = agg.table(q.by);
    let grouped = matches!(q.by, By::Address | By::Forwarded);
    let mut rows: Vec<ClientRow> = table
        .clients
        .iter()
        .filter(|(key, _)| {
            q.filter.as_deref().is_none_or(|f| {
                key.contains(f)
                    || (grouped && key.parse().is_ok_and(|ip| agg.group(ip).contains(f)))
            })
        })
        .map(|(key, c)| {
            let group = match key.parse() {
                Ok(ip) if grouped => agg.group(ip),
                _ => key.to_owned(),
            };
            row(key, group, q.by, c, now)
        })
        .collect();
    sort_and_limit(&mut rows, q);
    rows
}

/// Orders rows as `q` asks and keeps its `limit`: also how rows gathered from several
/// collectors' partitions (disjoint keys, each its own top) become the fleet's top.
pub fn sort_and_limit(rows: &mut Vec<ClientRow>, q: &Query) {
    match q.sort.as_str() {
        "client" => rows.sort_by(|a, b| a.client.cmp(&b.client)),
        "first_seen" => rows.sort_by(|a, b| b.first_seen.cmp(&a.first_seen)),
        "last_seen" => rows.sort_by(|a, b| b.last_seen.cmp(&a.last_seen)),
        field => rows.sort_by(|a, b| {
            sort_key(b, field, q.window)
                .partial_cmp(&sort_key(a, field, q.window))
                .unwrap_or(Ordering::Equal)
                .then_with(|| a.client.cmp(&b.client))
        }),
    }
    if let Some(limit) = q.limit {
        rows.truncate(limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::aggregate::Delta;

    #[test]
    fn query_round_trip_and_errors() {
        let q =
            Query::parse("by=group&sort=requests&window=10m&limit=5&filter=10.0.%2F").expect("q");
        assert_eq!(q.by, By::Group);
        assert_eq!(q.sort, "requests");
        assert_eq!(q.window, Some(Window::TenMinutes));
        assert_eq!(q.limit, Some(5));
        assert_eq!(q.filter.as_deref(), Some("10.0./"));
        assert_eq!(Query::parse(&q.to_query_string()).expect("again"), q);
        for by in By::ALL {
            let q = Query {
                by,
                ..Default::default()
            };
            assert_eq!(Query::parse(&q.to_query_string()).expect("by").by, by);
        }
        assert!(matches!(
            Query::parse("sort=nope"),
            Err(QueryError::Sort(_))
        ));
        assert!(matches!(
            Query::parse("window=2m"),
            Err(QueryError::Window(_))
        ));
    }

    #[test]
    fn rows_sort_filter_limit() {
        let mut agg = Aggregator::new(100, 24, 56);
        let now = Now::system();
        for (ip, out) in [("10.0.0.1", 5u64), ("10.0.0.2", 50), ("10.9.0.1", 500)] {
            let d = Delta {
                counts: Counts {
                    requests: 1,
                    bytes_in: 1,
                    bytes_out: out,
                    connections: 0,
                    events_out: 0,
                },
                opened: true,
                closed: false,
            };
            agg.apply(ip.parse().expect("ip"), &d, now);
        }
        let rows = client_rows(&agg, &Query::default(), now);
        let order: Vec<&str> = rows.iter().map(|r| r.client.as_str()).collect();
        assert_eq!(order, ["10.9.0.1", "10.0.0.2", "10.0.0.1"]);
        assert_eq!(rows[0].windows["1m"].bytes_out, 500);
        assert_eq!(rows[0].group, "10.9.0.0/24");
        let q = Query {
            filter: Some("10.0.0.0/24".into()),
            limit: Some(1),
            ..Default::default()
        };
        let rows = client_rows(&agg, &q, now);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].client, "10.0.0.2");
        let groups = client_rows(
            &agg,
            &Query {
                by: By::Group,
                ..Default::default()
            },
            now,
        );
        assert_eq!(groups[1].client, "10.0.0.0/24");
        assert_eq!(groups[1].bytes_out, 55);
        assert_eq!(groups[1].connections, 2);
    }
}
