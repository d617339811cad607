//! Compatibility of the per-client tables with the format and behaviour of the code before
//! the compact client records: `testdata/agg-v2-*` were written by that code (main at
//! 009119f, with this file as first committed, run with WRITE_AGG_FIXTURES=1) from the
//! scenario below. Loading them must give back the same snapshot, and the same scenario run
//! by this code must write the same snapshot, rows and statistics.

use std::net::IpAddr;

use serde_json::{Value, json};

use crate::model::{
    aggregate::{Aggregator, ClientTable, Counts, Delta, ExchangeKeys, Now, Window},
    keys::By,
    report::{Query, client_rows},
};

const T0_MS: u64 = 1_800_000_000_000;

fn at(ms: u64) -> Now {
    Now {
        unix_ms: T0_MS + ms,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn counts(requests: u64, bytes_in: u64, bytes_out: u64) -> Counts {
    Counts {
        requests,
        bytes_in,
        bytes_out,
        connections: 0,
        events_out: 0,
    }
}

fn delta(c: Counts, opened: bool, closed: bool) -> Delta {
    Delta {
        counts: c,
        opened,
        closed,
    }
}

/// Every kind of client the tables hold: one-request clients, clients active over many
/// periods, counters beyond 32 bits, many open connections, clocks stepping back, identities
/// and forwarded clients, merged and retracted counts, IPv6.
pub(crate) fn scenario() -> Aggregator {
    let mut agg = Aggregator::new(100_000, 24, 56);
    // One short connection with one request each.
    for i in 0..200u64 {
        let a = ip(&format!("10.0.{}.{}", i / 50, i % 50));
        let now = at(i * 7);
        agg.apply(a, &delta(counts(1, 120, 1_500), true, false), now);
        agg.request(a, 1_000_000_000 + i * 1_000, now);
        agg.apply(a, &delta(Counts::default(), false, true), now);
    }
    // Regular clients: a request every 3 s for 5 minutes, over one long connection.
    for c in 0..5u64 {
        let a = ip(&format!("10.1.0.{c}"));
        agg.apply(a, &delta(Counts::default(), true, false), at(0));
        for k in 0..100u64 {
            let now = at(k * 3_000 + c * 11);
            agg.request(a, 5_000_000_000 + k * 3_000_000_000 + c * 17 * k * k, now);
            agg.apply(a, &delta(counts(1, 300 + k, 4_000 + c), false, false), now);
        }
    }
    // Counters beyond 32 bits.
    let big = ip("10.2.0.1");
    agg.apply(
        big,
        &delta(counts(1, 10, 5_000_000_000), true, true),
        at(1_000),
    );
    agg.apply(
        ip("10.2.0.9"),
        &delta(counts(1, 1 << 33, 1), true, false),
        at(1_001),
    );
    // Many concurrent connections.
    let many = ip("10.2.0.2");
    for k in 0..70_000u64 {
        agg.apply(
            many,
            &delta(Counts::default(), true, false),
            at(2_000 + k / 100),
        );
    }
    for _ in 0..3 {
        agg.apply(many, &delta(counts(1, 1, 1), false, true), at(2_500));
    }
    // The clock steps back and forth.
    let stepping = ip("10.2.0.3");
    for (ms, r) in [(100_000u64, 1u64), (70_000, 2), (105_000, 3), (100_500, 4)] {
        agg.apply(stepping, &delta(counts(r, r, r), false, false), at(ms));
        agg.request(stepping, 9_000_000_000 + ms * 1_000, at(ms));
    }
    // Open, never closed, never a byte.
    agg.apply(
        ip("10.2.0.4"),
        &delta(Counts::default(), true, false),
        at(3_000),
    );
    // Counts taken back in the same period, and in a later one.
    let corrected = ip("10.2.0.5");
    agg.apply(corrected, &delta(counts(2, 50, 60), true, false), at(4_000));
    agg.addresses
        .retract("10.2.0.5", counts(1, 20, 20), at(4_500));
    let later = ip("10.2.0.6");
    agg.apply(later, &delta(counts(2, 50, 60), true, false), at(4_000));
    agg.addresses
        .retract("10.2.0.6", counts(1, 20, 20), at(75_000));
    let zeroed = ip("10.2.0.7");
    agg.apply(zeroed, &delta(counts(2, 50, 60), true, false), at(4_000));
    agg.addresses
        .retract("10.2.0.7", counts(9, 900, 900), at(4_001));
    // Identities and forwarded clients behind a proxy.
    let proxy = ip("10.3.0.1");
    for k in 0..40u64 {
        let keys = ExchangeKeys {
            identity: Some(format!("k-{:016x}", k % 3)),
            forwarded: (k % 4 != 0).then(|| ip(&format!("192.0.2.{}", k % 7))),
        };
        let now = at(10_000 + k * 1_500);
        agg.apply(proxy, &delta(counts(1, 200, 2_000), k == 0, false), now);
        agg.request_keys(proxy, &keys, 20_000_000_000 + k * 1_500_000_000, now);
        agg.apply_exchange(&keys, &delta(counts(1, 200, 2_000), k % 5 == 0, false), now);
        if k % 9 == 0 {
            agg.retract_exchange(&keys, counts(0, 10, 10), now);
        }
    }
    let direct = ExchangeKeys {
        identity: Some("alice".into()),
        forwarded: None,
    };
    let alice = ip("10.3.0.2");
    agg.apply(alice, &delta(counts(1, 1, 1), true, false), at(50_000));
    agg.request_keys(alice, &direct, 99_000_000_000, at(50_000));
    agg.apply_exchange(&direct, &delta(counts(1, 1, 1), true, false), at(50_000));
    // What a collector does: counts merged late, connections set.
    let t = agg.table_mut(By::Address);
    t.merge("10.4.0.1", counts(3, 30, 300), at(20_000), at(200_000));
    t.merge("10.4.0.1", counts(1, 1, 1), at(190_000), at(200_000));
    t.merge("10.4.0.2", counts(5, 5, 5), at(199_000), at(200_000));
    t.set_open("10.4.0.2", 4);
    t.set_open("10.4.0.2", 2);
    t.set_open("10.0.0.1", 3);
    // IPv6, short and long.
    for (k, s) in ["2001:db8::1", "2a02:1234:5678:9abc:def0:1234:5678:9abc"]
        .iter()
        .enumerate()
    {
        let a = ip(s);
        let now = at(60_000 + k as u64);
        agg.apply(a, &delta(counts(1, 64, 640), true, false), now);
        agg.request(a, 7_000_000_000, now);
    }
    agg
}

/// A bounded table: the lightest clients folded.
pub(crate) fn bounded_scenario() -> Aggregator {
    let mut agg = Aggregator::new(50, 24, 56);
    for i in 0..300u64 {
        let a = ip(&format!("172.16.{}.{}", i / 100, i % 100));
        let now = at(i * 13);
        agg.apply(a, &delta(counts(1, 100 + i, 1_000 + i), true, false), now);
        agg.request(a, 1_000_000_000 + i * 1_000, now);
        if i % 3 == 0 {
            agg.request(a, 1_000_500_000 + i * 1_000, now);
        }
        agg.apply(a, &delta(Counts::default(), false, i % 4 != 0), now);
    }
    agg
}

/// When the scenario's statistics are read.
pub(crate) const READ_AT_MS: u64 = 200_000;

/// Everything the rest of the sensor reads of the tables, as JSON.
pub(crate) fn observed(agg: &Aggregator) -> Value {
    let now = at(READ_AT_MS);
    let mut out = serde_json::Map::new();
    for by in By::ALL {
        let rows = client_rows(
            agg,
            &Query {
                by,
                ..Default::default()
            },
            now,
        );
        out.insert(format!("rows_{}", by.name()), json!(rows));
        let table: &ClientTable = agg.table(by);
        let mut stats = serde_json::Map::new();
        for (key, c) in &table.clients {
            let g = c.gaps();
            let w = &c.windows();
            let s = now.secs();
            stats.insert(
                key.to_string(),
                json!({
                    "tens": (0..8).map(|k| w.ten_seconds(s / 10 - k)).collect::<Vec<_>>(),
                    "minutes": (0..61).map(|k| w.minute(s, k)).collect::<Vec<_>>(),
                    "windows": Window::ALL.iter().map(|x| w.get(s, *x)).collect::<Vec<_>>(),
                    "active_minutes": [w.active_minutes(s, 10), w.active_minutes(s, 60)],
                    "cv_recent": [g.cv_recent(Window::TenMinutes, now.unix_ms),
                                  g.cv_recent(Window::OneHour, now.unix_ms)],
                    "mean_recent_ms": [g.mean_recent_ms(Window::TenMinutes),
                                       g.mean_recent_ms(Window::OneHour)],
                    "cv": g.cv(),
                    "mean_ms": g.mean_ms(),
                    "n": g.n,
                    "last_request_ns": g.last_request_ns,
                    "distinct_sources": [c.distinct_sources(s, 60), c.distinct_sources(s, 3600)],
                    "seen_from": c.seen_from().iter().collect::<Vec<_>>(),
                    "seen_from_more": c.seen_from_more(),
                    "source_seen_s": c.source_seen_s().iter().collect::<Vec<_>>(),
                    "last_identity": c.last_identity(),
                    "last_forwarded": c.last_forwarded(),
                    "totals": c.totals(),
                    "open": c.open_connections(),
                    "peak": c.peak_open_connections(),
                    "active_seconds": c.active_seconds(),
                    "first_seen_ms": c.first_seen_ms(),
                    "last_seen_ms": c.last_seen_ms(),
                }),
            );
        }
        out.insert(format!("stats_{}", by.name()), Value::Object(stats));
        out.insert(
            format!("grand_total_{}", by.name()),
            json!(table.grand_total()),
        );
        out.insert(format!("folded_{}", by.name()), json!(table.folded));
    }
    Value::Object(out)
}

/// The same after a restart on another boot: connections closed, request clocks forgotten.
pub(crate) fn restarted(mut agg: Aggregator) -> Aggregator {
    agg.close_all_connections();
    agg.reset_request_clocks();
    let now = at(READ_AT_MS);
    agg.apply(ip("10.0.0.1"), &delta(counts(1, 1, 1), true, false), now);
    agg.request(ip("10.0.0.1"), 5, now);
    agg.request(ip("10.1.0.1"), 5, now);
    agg
}

fn fixture(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/model/testdata")
        .join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if name.ends_with(".gz") {
        serde_json::from_reader(flate2::read::GzDecoder::new(&bytes[..])).expect("fixture")
    } else {
        serde_json::from_slice(&bytes).expect("fixture")
    }
}

/// A snapshot's aggregates as the agent loads them.
fn load(v: &Value, max_clients: usize) -> Aggregator {
    let mut agg: Aggregator = serde_json::from_value(v.clone()).expect("loads");
    agg.configure(max_clients, 24, 56);
    agg
}

fn compact_share(agg: &Aggregator) -> (usize, usize) {
    let all = By::ALL.iter().map(|b| agg.table(*b).clients.len()).sum();
    let compact = By::ALL
        .iter()
        .flat_map(|b| agg.table(*b).clients.values())
        .filter(|c| c.is_compact())
        .count();
    (compact, all)
}

/// Field by field, for a readable failure. serde_json reads a float to within a unit in the
/// last place, not always exactly: floats compare to within a few of those.
pub(crate) fn assert_same(what: &str, got: &Value, expected: &Value) {
    assert_close(what, got, expected, (4.0 * f64::EPSILON, 0.0));
}

/// As `assert_same`, floats to within `rel` times the expected value plus `abs`.
fn assert_close(what: &str, got: &Value, expected: &Value, (rel, abs): (f64, f64)) {
    let assert_same = |what: &str, got: &Value, expected: &Value| {
        assert_close(what, got, expected, (rel, abs));
    };
    if got == expected {
        return;
    }
    if let (Some(g), Some(e)) = (got.as_f64(), expected.as_f64())
        && got.is_f64()
        && (g - e).abs() <= rel * e.abs() + abs
    {
        return;
    }
    if let (Value::Object(g), Value::Object(e)) = (got, expected) {
        for (k, ev) in e {
            assert_same(&format!("{what}.{k}"), g.get(k).unwrap_or(&Value::Null), ev);
        }
        if let Some(k) = g.keys().find(|k| !e.contains_key(*k)) {
            panic!("{what}.{k}: not written by main");
        }
        return;
    }
    if let (Value::Array(g), Value::Array(e)) = (got, expected) {
        for (i, (gv, ev)) in g.iter().zip(e).enumerate() {
            assert_same(&format!("{what}[{i}]"), gv, ev);
        }
        assert_eq!(g.len(), e.len(), "{what}: length");
        return;
    }
    let short = |v: &Value| v.to_string().chars().take(300).collect::<String>();
    panic!("{what}: {} != {} (main)", short(got), short(expected));
}

#[test]
fn snapshots_written_by_main_load_and_save_unchanged() {
    for (name, max) in [
        ("agg-v2-scenario.json", 100_000),
        ("agg-v2-bounded.json", 50),
    ] {
        let saved = fixture(name);
        let agg = load(&saved, max);
        let (compact, all) = compact_share(&agg);
        assert!(compact > all / 2, "{name}: {compact} of {all} compact");
        assert!(compact < all, "{name}: some full");
        assert_same(name, &json!(agg), &saved);
    }
}

const LOADED: (f64, f64) = (1e-3, 1e-6);

/// What main read from its tables in memory, read from their snapshots. The gaps' moments
/// come back from JSON to within a unit in the last place (serde_json, as on main), which the
/// CVs, small differences of large sums, magnify: floats compare to within 0.1 % or 1e-6.
#[test]
fn snapshots_written_by_main_read_the_same() {
    let agg = load(&fixture("agg-v2-scenario.json"), 100_000);
    assert_close(
        "observed",
        &observed(&agg),
        &fixture("agg-v2-scenario-observed.json.gz"),
        LOADED,
    );
    assert_close(
        "restarted",
        &observed(&restarted(agg)),
        &fixture("agg-v2-scenario-restarted.json.gz"),
        LOADED,
    );
    let bounded = load(&fixture("agg-v2-bounded.json"), 50);
    assert_close(
        "bounded",
        &observed(&bounded),
        &fixture("agg-v2-bounded-observed.json.gz"),
        LOADED,
    );
}

#[test]
fn the_scenario_counts_as_on_main() {
    let agg = scenario();
    let (compact, all) = compact_share(&agg);
    assert!(compact > all / 2, "{compact} of {all} compact");
    assert!(
        !agg.addresses.clients["10.2.0.1"].is_compact(),
        "beyond 32 bits"
    );
    assert!(
        !agg.addresses.clients["10.2.0.2"].is_compact(),
        "70 000 open"
    );
    assert!(
        agg.addresses.clients["10.0.1.1"].is_compact(),
        "one request"
    );
    assert!(
        agg.addresses.clients["10.2.0.5"].is_compact(),
        "retracted in place"
    );
    assert!(
        !agg.addresses.clients["10.2.0.6"].is_compact(),
        "retracted later"
    );
    assert_same("snapshot", &json!(agg), &fixture("agg-v2-scenario.json"));
    assert_same(
        "observed",
        &observed(&agg),
        &fixture("agg-v2-scenario-observed.json.gz"),
    );
    assert_same(
        "restarted",
        &observed(&restarted(agg)),
        &fixture("agg-v2-scenario-restarted.json.gz"),
    );
    let bounded = bounded_scenario();
    assert_same("bounded", &json!(bounded), &fixture("agg-v2-bounded.json"));
    assert_same(
        "bounded observed",
        &observed(&bounded),
        &fixture("agg-v2-bounded-observed.json.gz"),
    );
}
