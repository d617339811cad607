//! The agent -> collector wire format: batches of alert events and per-client summaries, as
//! the agent's sink (`sinks::ship`) sends them and the collector receives them. Its own
//! module so the sending and the receiving side both import it downward.
//!
//! Exactly once: every record carries its position in the agent's stream (`seq`, from the
//! spool) and the stream's id (created with the spool). The collector keeps the highest
//! position it accepted per agent and stream, so a batch sent again after a lost answer is
//! acknowledged without being counted twice. Summaries also carry their period, which the
//! collector accepts once per agent (an agent restarted from an older state snapshot may
//! build a period again).
//!
//! Summaries: every 10 seconds (the agent's finest window bucket), the counts each client
//! added in the period just completed, for the `top_clients` heaviest clients of each key
//! kind (address, group, identity, forwarded), and the rest of the period summed per kind.
//! The collector adds them up across hosts, so a client spread over many hosts is seen whole.
//!
//! Early parts ([`early`]): when the agent raises alerts, it ships what the alerting clients
//! did in the period so far at once (`[start + j, start + k)`, after the period's earlier
//! parts), and the rest of the period (`[start + k, start + 10)`, those clients' counts less
//! what the parts carried) when it ends, so the fleet rules see a bot within seconds of the
//! host seeing it, not at the period's end.

pub mod early;
pub mod partition;
pub mod sketch;

use std::{collections::BTreeMap, io::Write as _, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::{
    detect::{self, Alert, AlertEvent},
    model::aggregate::{Aggregator, Counts},
    model::keys::By,
};

/// Version of the batch format; the collector refuses others.
pub const WIRE_VERSION: u32 = 1;
/// Seconds per summary period: the agent's 10-second window buckets.
pub const PERIOD_SECS: u64 = 10;
/// Limits the collector enforces (and the agent stays within).
pub const MAX_RECORDS_PER_BATCH: usize = 10_000;
pub const MAX_CLIENTS_PER_SUMMARY: usize = 40_000;
pub const MAX_NAME_LEN: usize = 128;
pub const MAX_KEY_LEN: usize = 256;

/// Bytes one host can move in one direction in one summary period: a 400 Gbit/s link for
/// 10 s. A summary claiming more (for one client, or for all clients of a key kind) did not
/// come from real traffic; it is refused before it can be added to anything.
pub const MAX_BYTES_PER_PERIOD: u64 = 50_000_000_000 * PERIOD_SECS;
/// Requests, connections and server-sent events one host can see in one period (10 million
/// a second, far above any inference server).
pub const MAX_EVENTS_PER_PERIOD: u64 = 10_000_000 * PERIOD_SECS;
/// The first counter of `c` beyond the bounds of `secs` seconds of a period, by name.
pub fn implausible_counts(c: &Counts, secs: u64) -> Option<&'static str> {
    let bytes = MAX_BYTES_PER_PERIOD / PERIOD_SECS * secs;
    let events = MAX_EVENTS_PER_PERIOD / PERIOD_SECS * secs;
    [
        ("bytes_in", c.bytes_in, bytes),
        ("bytes_out", c.bytes_out, bytes),
        ("requests", c.requests, events),
        ("connections", c.connections, events),
        ("events_out", c.events_out, events),
    ]
    .into_iter()
    .find(|(_, v, max)| v > max)
    .map(|(name, _, _)| name)
}

/// Agent and collector names: what a token is registered under.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

// --- wire format ----------------------------------------------------------------------------

/// One POST to the collector's `/v1/ingest` (JSON, gzip-compressed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    pub version: u32,
    /// The agent's name; must be the name its token is registered under.
    pub agent: String,
    /// Id of the agent's spool stream (hex): positions restart only with a new stream.
    pub stream: String,
    pub records: Vec<ShipRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShipRecord {
    /// Idempotent: `<agent>:<alert event id>` or `<agent>:summary:<period start>`.
    pub id: String,
    /// Position in the agent's stream (1, 2, ...).
    pub seq: u64,
    pub payload: Payload,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Payload {
    Alert { event: String, alert: Box<Alert> },
    Summary(Summary),
}

/// What the agent's clients did in one 10-second period, or in one of its parts when early
/// parts were shipped ([`early`]): a span within the period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Summary {
    /// Unix seconds; the summary covers [start_s, start_s + period_s), within one period.
    pub start_s: u64,
    pub period_s: u64,
    pub clients: Vec<ClientDelta>,
    /// Per key kind, the period's counts of the clients left out of `clients`.
    #[serde(default)]
    pub rest: BTreeMap<String, Counts>,
    /// Per key kind, the count-min sketch of every client's period counts (named or not):
    /// what the collector finds thin clients with ([`sketch`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sketch: BTreeMap<String, Vec<sketch::Cell>>,
    /// Which secret placed the sketch's cells (a fingerprint of its subkey): the collector
    /// adds up only sketches of one key, so agents with another identity secret (a mistake,
    /// or a rotation under way) do not blur each other's.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sketch_key: String,
    /// Partitioned shipping ([`partition`]), in partition 0's part of a summary only: per key
    /// kind, the counts of the rows shipped in the other partitions' parts. Never merged
    /// (their partitions merge those rows); it lets the collector still check that the
    /// sketch, which covers the whole summary, sums to the kind's total.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub elsewhere: BTreeMap<String, Counts>,
}

/// One client's counts in a period, and its state at the period's end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientDelta {
    /// address, group, identity or forwarded.
    pub by: String,
    pub key: String,
    pub counts: Counts,
    pub open_connections: u64,
    #[serde(default)]
    pub identity: Option<String>,
    #[serde(default)]
    pub forwarded: Option<String>,
}

impl ShipRecord {
    pub fn alert(agent: &str, e: &AlertEvent) -> Self {
        Self {
            id: format!("{agent}:{}", detect::event_id(&e.alert, e.event.as_str())),
            seq: 0,
            payload: Payload::Alert {
                event: e.event.as_str().to_owned(),
                alert: Box::new((*e.alert).clone()),
            },
        }
    }

    pub fn summary(agent: &str, s: Summary) -> Self {
        Self {
            id: format!("{agent}:summary:{}", s.start_s),
            seq: 0,
            payload: Payload::Summary(s),
        }
    }
}

/// `records` as sent at `now_s`: summaries older than the collector's sketch window lose
/// their sketch (it would be ignored; after an outage it would double what the spool holds
/// on the wire for nothing).
pub fn for_sending(records: &[ShipRecord], now_s: u64) -> Vec<ShipRecord> {
    records
        .iter()
        .map(|r| {
            let mut r = r.clone();
            if let Payload::Summary(s) = &mut r.payload
                && s.start_s + sketch::WINDOW_SECS + PERIOD_SECS < now_s
            {
                s.sketch.clear();
            }
            r
        })
        .collect()
}

/// A batch that could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("encoding a batch: {0}")]
    Json(#[from] serde_json::Error),
    #[error("compressing a batch: {0}")]
    Compress(#[from] std::io::Error),
}

/// Gzip of the batch's JSON.
pub fn encode(batch: &Batch) -> Result<Vec<u8>, EncodeError> {
    let json = serde_json::to_vec(batch)?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&json)?;
    Ok(gz.finish()?)
}

// --- summaries ------------------------------------------------------------------------------

/// Which clients below the `top_clients` cut a summary still names: a fixed share of all
/// keys, chosen by HMAC under the fleet's identity secret, and the clients whose sketch cells
/// the collector named hot ([`sketch`]). A ring that keeps every member below the cut on
/// every host (tens of thousands of modest keys) still reaches the fleet rules through its
/// sampled members, each with its exact counts; a single key spread thinly over the fleet,
/// through its hot cells. The choice is the same on every agent sharing the secret (so a
/// sampled key's fleet totals are complete), the same for a key over time, and cannot be
/// predicted (or avoided) by a client without the secret.
pub struct Sample {
    /// Keyed with a subkey of the identity secret, so that no place derives from any
    /// identity's id (a client could otherwise present a credential whose id is another
    /// key's rank).
    mac: hmac::Hmac<sha2::Sha256>,
    /// Keys sampled per 10 000.
    per_10k: u32,
    /// Sampled rows per key kind and period, at most: past it only the lowest ranks are named
    /// (a smaller share, for that period), so that a host under pressure samples a subset of
    /// what the others sample. Rows named for hot cells have the same bound, the same way.
    max_rows: usize,
    /// The collector's latest hot cells (set by the shipping sink).
    hot: Arc<sketch::Hot>,
    /// Fingerprint of the subkey: `Summary::sketch_key`.
    sketch_key: String,
}

impl Sample {
    pub fn new(secret: &[u8], percent: u32, max_rows: usize, hot: Arc<sketch::Hot>) -> Self {
        use hmac::Mac as _;
        let subkey = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(secret)
            .map(|mut m| {
                m.update(b"sensor ship sample v1");
                m.finalize().into_bytes().to_vec()
            })
            .unwrap_or_default();
        // HMAC takes keys of any length; an error here is impossible.
        let mac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(&subkey)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        let sketch_key: String = {
            use hmac::Mac as _;
            let mut m = mac.clone();
            m.update(b"sketch key fingerprint");
            m.finalize().into_bytes()[..8]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        hot.set_key(&sketch_key);
        Self {
            mac,
            per_10k: percent.min(100) * 100,
            max_rows,
            hot,
            sketch_key: sketch_key.clone(),
        }
    }

    /// Whether the collector said lately that it takes early parts ([`early`]).
    pub fn takes_parts(&self) -> bool {
        self.hot.takes_parts()
    }

    /// No sampling: only the heaviest clients are named.
    #[cfg(test)]
    pub fn off() -> Self {
        Self::new(&[0; 16], 0, 0, Arc::default())
    }

    /// The key's rank in the sample and its sketch cells.
    fn place(&self, by: By, key: &str) -> sketch::Place {
        use hmac::Mac as _;
        let mut m = self.mac.clone();
        m.update(b"ship-place\0");
        m.update(by.name().as_bytes());
        m.update(b"\0");
        m.update(key.as_bytes());
        sketch::Place::from_mac(&m.finalize().into_bytes().into())
    }
}

/// The summary of the 10-second period starting at `start_s`, or None when nothing happened
/// and no connection is open: the `top` heaviest clients of each key kind and those of the
/// rest that `sample` picks (keyed sample, hot cells), each with its counts, the remainder
/// summed, and every client in the kind's sketch. After an early part of the same period
/// (`early`), the rest of it: the early parts' clients count what they did after them.
pub fn summarize(
    agg: &Aggregator,
    start_s: u64,
    top: usize,
    sample: &Sample,
    early: Option<&early::Early>,
) -> Option<Summary> {
    let period = start_s / PERIOD_SECS;
    let early = early.filter(|e| e.start_s == period * PERIOD_SECS);
    let shipped = early.map(early::Early::shipped).unwrap_or_default();
    let hot = sample.hot.current(start_s + PERIOD_SECS);
    // Only for a collector that said it reads sketches (an earlier one refuses the field).
    let with_sketch = sample.hot.supported();
    let mut clients = Vec::new();
    let mut rest = BTreeMap::new();
    let mut sketches = BTreeMap::new();
    for by in By::ALL {
        let mut rows: Vec<(&str, Counts, u64)> = agg
            .table(by)
            .clients
            .iter()
            .filter_map(|(k, c)| {
                let mut counts = c.windows().ten_seconds(period);
                if let Some(before) = shipped.get(&(by, k)) {
                    counts.saturating_sub(*before);
                }
                (!counts.is_zero() || c.open_connections() > 0).then_some((
                    k,
                    counts,
                    c.open_connections(),
                ))
            })
            .collect();
        // Heaviest first: bytes, then requests, then the key (a stable order).
        rows.sort_by(|a, b| {
            (b.1.bytes_in + b.1.bytes_out, b.1.requests)
                .cmp(&(a.1.bytes_in + a.1.bytes_out, a.1.requests))
                .then_with(|| a.0.cmp(b.0))
        });
        let hot = hot.get(&by);
        let mut sketch = sketch::Builder::default();
        let mut left = Counts::default();
        let mut named = Vec::with_capacity(rows.len().min(top));
        // Below the cut: sampled rows (by rank), then rows whose cells are all hot (hottest
        // first), together within `max_rows`; the rest is summed.
        let mut extra = Vec::new();
        for (i, row) in rows.into_iter().enumerate() {
            if i < top && !with_sketch {
                named.push(row);
                continue;
            }
            let place = sample.place(by, row.0);
            if with_sketch && !row.1.is_zero() {
                sketch.add(&place, &row.1);
            }
            if i < top {
                named.push(row);
            } else if shipped.contains_key(&(by, row.0)) {
                // The clients of the period's early parts come first below the cut: a client
                // cannot fold its rest (or its open connections) away by going quiet once
                // it alerted, within the bound below.
                extra.push(((0, 0), row));
            } else if place.rank < sample.per_10k {
                extra.push(((1, place.rank), row));
            } else if let Some(heat) = sketch::heat_rank(hot, &place) {
                extra.push(((2, heat), row));
            } else {
                left += row.1;
            }
        }
        if extra.len() > sample.max_rows {
            // A host under pressure names a subset of what the others name.
            extra.sort_by_key(|(order, _)| *order);
            for (_, row) in extra.drain(sample.max_rows..) {
                left += row.1;
            }
        }
        named.extend(extra.into_iter().map(|(_, row)| row));
        for (key, counts, open) in named {
            let c = &agg.table(by).clients[key];
            clients.push(ClientDelta {
                by: by.name().to_owned(),
                key: key.to_owned(),
                counts,
                open_connections: open,
                identity: c.last_identity().map(str::to_owned),
                forwarded: c.last_forwarded().map(|ip| ip.to_string()),
            });
        }
        if !left.is_zero() {
            rest.insert(by.name().to_owned(), left);
        }
        let cells = sketch.finish();
        if !cells.is_empty() {
            sketches.insert(by.name().to_owned(), cells);
        }
    }
    let before = early.map_or(0, |e| e.period_s);
    (!clients.is_empty() || !rest.is_empty()).then(|| Summary {
        start_s: period * PERIOD_SECS + before,
        period_s: PERIOD_SECS - before,
        clients,
        rest,
        sketch: sketches,
        sketch_key: if with_sketch {
            sample.sketch_key.clone()
        } else {
            String::new()
        },
        elsewhere: BTreeMap::new(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::aggregate::{Delta, Now};

    /// One request of `n` bytes in and `10 n` out (also the ship sink's fixture).
    pub(crate) fn bytes(n: u64) -> Delta {
        Delta {
            counts: Counts {
                requests: 1,
                bytes_in: n,
                bytes_out: 10 * n,
                ..Counts::default()
            },
            ..Delta::default()
        }
    }

    #[test]
    fn summaries_cover_one_period_and_cut_to_top() {
        let mut agg = Aggregator::new(100, 24, 56);
        let t = 1_800_000_000u64; // a multiple of 10
        let at = |s: u64| Now { unix_ms: s * 1000 };
        for i in 1..=5u8 {
            let ip = std::net::IpAddr::from([10, 0, 0, i]);
            agg.apply(ip, &bytes(u64::from(i) * 100), at(t + 3));
            // The next period: not part of the summary of `t`.
            agg.apply(ip, &bytes(1), at(t + 12));
        }
        let s = summarize(&agg, t, 2, &Sample::off(), None).expect("summary");
        assert_eq!((s.start_s, s.period_s), (t, 10));
        let addrs: Vec<_> = s
            .clients
            .iter()
            .filter(|c| c.by == "address")
            .map(|c| (c.key.as_str(), c.counts.bytes_in))
            .collect();
        assert_eq!(addrs, vec![("10.0.0.5", 500), ("10.0.0.4", 400)]);
        assert_eq!(s.rest["address"].bytes_in, 300 + 200 + 100);
        // Group: all five in one /24, whole.
        let g: Vec<_> = s.clients.iter().filter(|c| c.by == "group").collect();
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].counts.bytes_in, 1500);
        assert_eq!(g[0].counts.requests, 5);
        assert!(summarize(&agg, t - 10, 2, &Sample::off(), None).is_none());
    }

    /// A ring of modest keys below the cut on every host: a tenth of them (the same tenth on
    /// every agent sharing the secret) is named with exact counts; every byte is still in the
    /// named rows or the remainder, and another secret picks other keys.
    #[test]
    fn a_keyed_sample_names_clients_below_the_cut_the_same_on_every_host() {
        let t = 1_800_000_000u64;
        let at = Now {
            unix_ms: (t + 3) * 1000,
        };
        let host = |ring_bytes: u64| {
            let mut agg = Aggregator::new(20_000, 24, 56);
            // 50 heavy clients take the top; 3000 ring members stay below them.
            for i in 0..50u32 {
                agg.apply(
                    std::net::IpAddr::from([10, 9, 0, i as u8]),
                    &bytes(10_000),
                    at,
                );
            }
            for i in 0..3000u32 {
                let [_, _, a, b] = i.to_be_bytes();
                agg.apply(
                    std::net::IpAddr::from([10, 1, a, b]),
                    &bytes(ring_bytes),
                    at,
                );
            }
            agg
        };
        let secret = [7u8; 32];
        let sample = Sample::new(&secret, 10, 2000, Arc::default());
        let names = |agg: &Aggregator, sample: &Sample| {
            let s = summarize(agg, t, 50, sample, None).expect("summary");
            let named: Vec<(String, u64)> = s
                .clients
                .iter()
                .filter(|c| c.by == "address" && c.key.starts_with("10.1."))
                .map(|c| (c.key.clone(), c.counts.bytes_in))
                .collect();
            let shipped: u64 = s
                .clients
                .iter()
                .filter(|c| c.by == "address")
                .map(|c| c.counts.bytes_in)
                .sum::<u64>()
                + s.rest.get("address").map_or(0, |r| r.bytes_in);
            (named, shipped)
        };
        let (a, total_a) = names(&host(100), &sample);
        let (b, total_b) = names(&host(70), &sample);
        assert!((200..=400).contains(&a.len()), "about a tenth: {}", a.len());
        assert!(a.iter().all(|(_, n)| *n == 100), "exact counts");
        assert_eq!(total_a, 50 * 10_000 + 3000 * 100, "nothing lost");
        assert_eq!(total_b, 50 * 10_000 + 3000 * 70);
        let keys = |v: &[(String, u64)]| v.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
        assert_eq!(keys(&a), keys(&b), "the same members on every host");
        let (other, _) = names(
            &host(100),
            &Sample::new(&[8u8; 32], 10, 2000, Arc::default()),
        );
        assert_ne!(keys(&a), keys(&other), "another secret, other members");
        // Past the bound only the lowest ranks are named: a host with more clients names a
        // subset of what a host with fewer names, so every key it names is named everywhere.
        let capped = Sample::new(&secret, 10, 100, Arc::default());
        let (c1, t1) = names(&host(100), &capped);
        assert!(c1.len() <= 100 && c1.len() >= 20, "{}", c1.len());
        assert_eq!(t1, total_a);
        let small = {
            let mut agg = Aggregator::new(20_000, 24, 56);
            for i in 0..50u32 {
                agg.apply(
                    std::net::IpAddr::from([10, 9, 0, i as u8]),
                    &bytes(10_000),
                    at,
                );
            }
            for i in 0..600u32 {
                let [_, _, a, b] = i.to_be_bytes();
                agg.apply(std::net::IpAddr::from([10, 1, a, b]), &bytes(100), at);
            }
            agg
        };
        let (c2, _) = names(&small, &capped);
        let in_small: std::collections::HashSet<String> = keys(&c2).into_iter().collect();
        for k in keys(&c1) {
            let [_, _, a, b] = k
                .split('.')
                .map(|p| p.parse::<u8>().expect("octet"))
                .collect::<Vec<_>>()[..]
            else {
                panic!("{k}")
            };
            if u32::from(a) * 256 + u32::from(b) < 600 {
                assert!(in_small.contains(&k), "{k} named on the busy host only");
            }
        }
        assert!(names(&host(100), &Sample::off()).0.is_empty());
    }

    /// A client below the cut (and not sampled) is folded into `rest` until the collector
    /// names its cells hot; then it is named with its exact counts, on every host sharing the
    /// secret. Every row of the sketch sums to the kind's shipped counts.
    #[test]
    fn hot_cells_name_a_thin_client_below_the_cut() {
        let t = 1_800_000_000u64;
        let at = Now {
            unix_ms: (t + 3) * 1000,
        };
        let mut agg = Aggregator::new(1000, 24, 56);
        for i in 1..=5u8 {
            agg.apply(std::net::IpAddr::from([10, 9, 0, i]), &bytes(10_000), at);
        }
        let thin = std::net::IpAddr::from([10, 1, 0, 7]);
        agg.apply(thin, &bytes(50), at);
        let hot = Arc::<sketch::Hot>::default();
        let sample = Sample::new(&[7u8; 32], 0, 100, hot.clone());
        let named = |s: &Summary| s.clients.iter().any(|c| c.key == "10.1.0.7");
        let before = summarize(&agg, t, 2, &sample, None).expect("summary");
        assert!(!named(&before), "below the cut, not sampled");
        assert!(
            before.sketch.is_empty() && before.sketch_key.is_empty(),
            "no sketch until the collector says it reads them"
        );
        hot.set_supported();
        let before = summarize(&agg, t, 2, &sample, None).expect("summary");
        assert_eq!(before.sketch_key.len(), 16);
        let address = &before.sketch["address"];
        let mut rows = [(0u64, 0u64); sketch::ROWS];
        for &(i, r, b) in address {
            rows[i as usize / sketch::WIDTH].0 += r;
            rows[i as usize / sketch::WIDTH].1 += b;
        }
        assert_eq!(rows, [(6, 5 * 110_000 + 550); sketch::ROWS]);
        // The collector names the thin client's cells (and only those).
        let cells = sample.place(By::Address, "10.1.0.7").cells;
        hot.set(
            &sketch::HotCells::from([("address".to_owned(), cells.to_vec())]),
            t + 10,
        );
        let after = summarize(&agg, t, 2, &sample, None).expect("summary");
        let row = after.clients.iter().find(|c| c.key == "10.1.0.7");
        assert_eq!(row.map(|c| c.counts.bytes_in), Some(50), "named, exact");
        assert_eq!(
            after.clients.iter().filter(|c| c.by == "address").count(),
            3,
            "the top two and the hot one"
        );
        assert_eq!(after.rest["address"].bytes_in, 3 * 10_000);
        // Hot cells of another kind, or expired, name nothing.
        hot.set(
            &sketch::HotCells::from([("identity".to_owned(), cells.to_vec())]),
            t + 10,
        );
        assert!(!named(
            &summarize(&agg, t, 2, &sample, None).expect("summary")
        ));
        hot.set(
            &sketch::HotCells::from([("address".to_owned(), cells.to_vec())]),
            t - sketch::HOT_TTL_SECS,
        );
        assert!(!named(
            &summarize(&agg, t, 2, &sample, None).expect("summary")
        ));
    }

    #[test]
    fn batches_round_trip_through_gzip() {
        let rec = ShipRecord::summary(
            "host-a",
            Summary {
                start_s: 10,
                period_s: 10,
                clients: vec![ClientDelta {
                    by: "address".into(),
                    key: "10.0.0.1".into(),
                    counts: Counts {
                        requests: 3,
                        ..Counts::default()
                    },
                    open_connections: 1,
                    identity: Some("k-0123456789ab".into()),
                    forwarded: None,
                }],
                rest: BTreeMap::new(),
                sketch: Default::default(),
                sketch_key: String::new(),
                elsewhere: Default::default(),
            },
        );
        let batch = Batch {
            version: WIRE_VERSION,
            agent: "host-a".into(),
            stream: "00ff".into(),
            records: vec![rec],
        };
        let gz = encode(&batch).expect("encode");
        let mut json = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut json)
            .expect("gunzip");
        let back: Batch = serde_json::from_slice(&json).expect("decode");
        assert_eq!(back, batch);
        assert_eq!(back.records[0].id, "host-a:summary:10");
    }
}
