//! Early parts: a period shipped in parts when the agent raises alerts.
//!
//! A fleet alert needs the collector to hold the bot's counts, and summaries leave at the end
//! of their 10-second period: a bot that starts just after a period boundary reaches the
//! fleet rules about 10 seconds after the host saw it. So when a rule run on the host raises
//! alerts, the agent ships at its next shipping tick what the alerting clients did since the
//! period's last part (`[start + j, start + k)`, `j` where the last part ended, `k` the
//! seconds begun): their exact counts and sketch cells, no remainder. At the period's end it
//! ships the rest (`[start + k, start + 10)`): every client as usual, the early parts'
//! clients with what they did after them, always named. The parts add up to the period
//! exactly; the collector merges a part only if it starts where the agent's last merged one
//! ended or later, so none overlaps another.
//!
//! At most one part a second (the shipping tick), each of at most [`MAX_KEYS`] clients: a
//! decoy that alerts first does not hold a later bot's part back. Only to a collector that
//! said lately that it takes parts (an earlier one refuses summaries shorter than a period).

use std::collections::{HashMap, HashSet};

use super::{ClientDelta, PERIOD_SECS, Sample, Summary, sketch};
use crate::model::{
    aggregate::{Aggregator, Counts},
    keys::By,
};

pub use crate::model::shipped::{Early, EarlyRow};

/// Alerting clients kept for one early part, at most (one rule run raising more alerts than
/// this ships the others at the period's end).
pub const MAX_KEYS: usize = 1000;

/// The agent's early parts: which alerting clients want one, and what the current period's
/// parts carried.
#[derive(Debug, Default)]
pub struct EarlyParts {
    /// Alerting clients waiting for an early part of the period starting at `wanted_s`.
    wanted: HashSet<(By, String)>,
    wanted_s: u64,
    /// What the period's early parts carried so far (its rest ships less it).
    shipped: Option<Early>,
    /// Early parts shipped since the agent started.
    pub count: u64,
}

impl EarlyParts {
    pub fn restore(shipped: Option<Early>) -> Self {
        Self {
            shipped,
            ..Self::default()
        }
    }

    /// Alerts were raised at `now_s` for `keys`.
    pub fn want(&mut self, now_s: u64, keys: impl IntoIterator<Item = (By, String)>) {
        let start = now_s / PERIOD_SECS * PERIOD_SECS;
        if self.wanted_s != start {
            self.wanted.clear();
            self.wanted_s = start;
        }
        for key in keys {
            if self.wanted.len() >= MAX_KEYS {
                break;
            }
            self.wanted.insert(key);
        }
    }

    /// The early part to ship at `now_s`, and what the period's parts carry with it: when
    /// alerts want one in this period and the collector takes parts (`accepted`; until it
    /// says so, the wish waits, within the period). Once it is recorded and spooled,
    /// [`Self::shipped`].
    pub fn take(
        &mut self,
        agg: &Aggregator,
        now_s: u64,
        accepted: bool,
        sample: &Sample,
    ) -> Option<(Summary, Early)> {
        let start = now_s / PERIOD_SECS * PERIOD_SECS;
        if self.wanted_s != start || self.wanted.is_empty() || !accepted {
            return None;
        }
        let part = early_part(agg, now_s, &self.wanted, sample, self.of(start))?;
        // Clients that did nothing since the period's last part (or that the part could not
        // carry) keep their wish.
        let shipped: HashSet<(&str, &str)> = part
            .0
            .clients
            .iter()
            .map(|c| (c.by.as_str(), c.key.as_str()))
            .collect();
        self.wanted
            .retain(|(by, key)| !shipped.contains(&(by.name(), key.as_str())));
        Some(part)
    }

    /// The early part whose period's record is `carried` was recorded and spooled.
    pub fn shipped(&mut self, carried: Early) {
        self.shipped = Some(carried);
        self.count += 1;
    }

    /// What the early parts of the period starting at `start_s` carried, if any was shipped.
    pub fn of(&self, start_s: u64) -> Option<&Early> {
        self.shipped.as_ref().filter(|e| e.start_s == start_s)
    }
}

/// The next early part of the period holding `now_s` for `keys` (the alerting clients) after
/// the period's earlier parts (`before`), and the period's record with it; None when none of
/// them did anything since, when a part already covers this second, or when less than a
/// second of the period is left (its end ships the rest as soon).
pub fn early_part<'k>(
    agg: &Aggregator,
    now_s: u64,
    keys: impl IntoIterator<Item = &'k (By, String)>,
    sample: &Sample,
    before: Option<&Early>,
) -> Option<(Summary, Early)> {
    let period = now_s / PERIOD_SECS;
    let start_s = period * PERIOD_SECS;
    let before = before.filter(|e| e.start_s == start_s);
    let from = before.map_or(0, |e| e.period_s);
    // The seconds begun so far: the collector merges a part at its last moment, which stays
    // in this period.
    let to = now_s - start_s + 1;
    if to >= PERIOD_SECS || to <= from {
        return None;
    }
    let carried = before.map(Early::shipped).unwrap_or_default();
    let mut clients = Vec::new();
    let mut rows = Vec::new();
    let mut seen = HashSet::new();
    // What the collector takes of a part: the period's bound scaled to the seconds since its
    // start, per client and per kind. A client past it (a catch-up after a restart lands the
    // downtime's bytes at once) comes with the rest, whose bound is the whole period's.
    let mut per_kind: HashMap<By, Counts> = HashMap::new();
    // With the collector reading sketches, the part's rows in their cells: the parts'
    // sketches then cover the period's counts exactly, as one summary's would.
    let with_sketch = sample.hot.supported();
    let mut sketches: HashMap<By, sketch::Builder> = Default::default();
    for (by, key) in keys {
        if !seen.insert((*by, key.as_str())) {
            continue;
        }
        let Some(c) = agg.table(*by).clients.get(key.as_str()) else {
            continue;
        };
        let mut counts = c.windows().ten_seconds(period);
        if let Some(done) = carried.get(&(*by, key.as_str())) {
            counts.saturating_sub(*done);
        }
        if counts.is_zero() || super::implausible_counts(&counts, to).is_some() {
            continue;
        }
        let mut sum = per_kind.get(by).copied().unwrap_or_default();
        sum += counts;
        if super::implausible_counts(&sum, to).is_some() {
            continue;
        }
        per_kind.insert(*by, sum);
        if with_sketch {
            sketches
                .entry(*by)
                .or_default()
                .add(&sample.place(*by, key), &counts);
        }
        clients.push(ClientDelta {
            by: by.name().to_owned(),
            key: key.clone(),
            counts,
            open_connections: c.open_connections(),
            identity: c.last_identity().map(str::to_owned),
            forwarded: c.last_forwarded().map(|ip| ip.to_string()),
        });
        rows.push(EarlyRow {
            by: by.name().to_owned(),
            key: key.clone(),
            counts,
        });
    }
    if clients.is_empty() {
        return None;
    }
    clients.sort_by(|a, b| (&a.by, &a.key).cmp(&(&b.by, &b.key)));
    let summary = Summary {
        start_s: start_s + from,
        period_s: to - from,
        clients,
        rest: Default::default(),
        sketch: sketches
            .into_iter()
            .map(|(by, b)| (by.name().to_owned(), b.finish()))
            .filter(|(_, cells)| !cells.is_empty())
            .collect(),
        sketch_key: if with_sketch {
            sample.sketch_key.clone()
        } else {
            String::new()
        },
        elsewhere: Default::default(),
    };
    let mut record = before.cloned().unwrap_or(Early {
        start_s,
        period_s: 0,
        rows: Vec::new(),
    });
    record.period_s = to;
    record.add(rows);
    Some((summary, record))
}

/// Whether a summary's span is one the collector accepts: within one period, 1 to 10 s.
pub fn valid_span(start_s: u64, period_s: u64) -> bool {
    let Some(end) = start_s.checked_add(period_s) else {
        return false;
    };
    (1..=PERIOD_SECS).contains(&period_s) && start_s / PERIOD_SECS == (end - 1) / PERIOD_SECS
}

/// Whether a summary is an early part (it does not reach its period's end: the rest follows).
pub fn is_early(s: &Summary) -> bool {
    !(s.start_s + s.period_s).is_multiple_of(PERIOD_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::aggregate::Now;
    use crate::ship::{Sample, summarize, tests::bytes};

    fn at(s: u64, ms: u64) -> Now {
        Now {
            unix_ms: s * 1000 + ms,
        }
    }

    /// The early part carries the alerting client's period so far; the rest carries what it
    /// did after, and every other client whole: the two parts sum to the whole period, for
    /// every client and kind, with the sketch covering the rest exactly.
    #[test]
    fn the_two_parts_add_up_to_the_period() {
        let t = 1_800_000_000u64;
        let bot = std::net::IpAddr::from([10, 0, 0, 9]);
        let other = std::net::IpAddr::from([10, 0, 0, 1]);
        let mut agg = Aggregator::new(100, 24, 56);
        agg.apply(bot, &bytes(100), at(t + 1, 0));
        agg.apply(bot, &bytes(100), at(t + 2, 500));
        agg.apply(other, &bytes(7), at(t + 2, 0));
        let whole = summarize(&agg, t, 10, &Sample::off(), None).expect("summary");
        let keys = vec![
            (By::Address, "10.0.0.9".to_owned()),
            (By::Address, "10.0.0.9".to_owned()),
            (By::Address, "10.0.0.77".to_owned()),
        ];
        let hot = std::sync::Arc::<crate::ship::sketch::Hot>::default();
        hot.set_supported();
        let sample = Sample::new(&[7u8; 32], 0, 100, hot);
        let (part, early) = early_part(&agg, t + 2, &keys, &sample, None).expect("early part");
        assert_eq!((part.start_s, part.period_s), (t, 3));
        assert!(is_early(&part) && valid_span(part.start_s, part.period_s));
        assert_eq!(
            part.clients.len(),
            1,
            "the alerting client once, no unknown key"
        );
        assert_eq!(part.clients[0].counts.bytes_in, 200);
        assert!(part.rest.is_empty());
        assert_eq!(part.sketch_key.len(), 16);
        // More after the early part.
        agg.apply(bot, &bytes(100), at(t + 6, 0));
        agg.apply(other, &bytes(5), at(t + 7, 0));
        let rest = summarize(&agg, t, 10, &sample, Some(&early)).expect("rest");
        assert_eq!((rest.start_s, rest.period_s), (t + 3, 7));
        assert!(!is_early(&rest) && valid_span(rest.start_s, rest.period_s));
        let row = |s: &Summary, by: &str, key: &str| {
            s.clients
                .iter()
                .find(|c| c.by == by && c.key == key)
                .map(|c| c.counts)
                .unwrap_or_default()
        };
        assert_eq!(row(&rest, "address", "10.0.0.9").bytes_in, 100);
        assert_eq!(row(&rest, "address", "10.0.0.1").bytes_in, 12);
        let whole_now = summarize(&agg, t, 10, &Sample::off(), None).expect("summary");
        for c in &whole_now.clients {
            let mut sum = row(&part, &c.by, &c.key);
            sum += row(&rest, &c.by, &c.key);
            assert_eq!(sum, c.counts, "{} {}", c.by, c.key);
        }
        // The group (not alerting) is whole in the rest.
        assert_eq!(row(&rest, "group", "10.0.0.0/24").requests, 5);
        assert_ne!(whole, whole_now);
        // Each part's sketch covers its rows (2 requests early, 3 in the rest), and the two
        // add up, cell by cell, to the whole period's.
        let rows = |s: &Summary| {
            let mut sum = [0u64; crate::ship::sketch::ROWS];
            for &(i, r, _) in &s.sketch["address"] {
                sum[i as usize / crate::ship::sketch::WIDTH] += r;
            }
            sum
        };
        assert_eq!(rows(&part), [2; crate::ship::sketch::ROWS]);
        assert_eq!(rows(&rest), [3; crate::ship::sketch::ROWS]);
        let cells = |s: &Summary| {
            let mut m = std::collections::BTreeMap::new();
            for &(i, r, b) in &s.sketch["address"] {
                let e: &mut (u64, u64) = m.entry(i).or_default();
                (e.0, e.1) = (e.0 + r, e.1 + b);
            }
            m
        };
        let whole_sketch = summarize(&agg, t, 10, &sample, None).expect("summary");
        let mut both = cells(&part);
        for (i, (r, b)) in cells(&rest) {
            let e = both.entry(i).or_default();
            (e.0, e.1) = (e.0 + r, e.1 + b);
        }
        assert_eq!(both, cells(&whole_sketch));
        // Below the cut in the rest, the early part's client is still named (with a top of
        // one, the other client is the heaviest after the early part), within the bound of
        // rows named below the cut.
        agg.apply(other, &bytes(1000), at(t + 8, 0));
        let named_below = Sample::new(&[7u8; 32], 0, 1, Default::default());
        let cut = summarize(&agg, t, 1, &named_below, Some(&early)).expect("rest");
        assert_eq!(row(&cut, "address", "10.0.0.9").bytes_in, 100);
        assert_eq!(row(&cut, "address", "10.0.0.1").bytes_in, 1012);
        assert!(!cut.rest.contains_key("address"), "{:?}", cut.rest);
        // Another period's summary ignores it.
        agg.apply(bot, &bytes(1), at(t + 11, 0));
        let next = summarize(&agg, t + 10, 10, &Sample::off(), Some(&early)).expect("next");
        assert_eq!((next.start_s, next.period_s), (t + 10, 10));
        assert_eq!(row(&next, "address", "10.0.0.9").bytes_in, 1);
    }

    /// A client past what a part of its seconds may claim (a catch-up after a restart) is
    /// left to the rest, whose bound is the whole period's.
    #[test]
    fn a_part_stays_within_its_seconds_bound() {
        let t = 1_800_000_000u64;
        let mut agg = Aggregator::new(100, 24, 56);
        let huge = crate::model::aggregate::Delta {
            counts: Counts {
                bytes_out: crate::ship::MAX_BYTES_PER_PERIOD / 10 * 2 + 1,
                ..Counts::default()
            },
            ..Default::default()
        };
        agg.apply(std::net::IpAddr::from([10, 0, 0, 9]), &huge, at(t, 100));
        agg.apply(std::net::IpAddr::from([10, 0, 0, 8]), &bytes(1), at(t, 100));
        let keys = vec![
            (By::Address, "10.0.0.9".to_owned()),
            (By::Address, "10.0.0.8".to_owned()),
        ];
        let (p, _) = early_part(&agg, t + 1, &keys, &Sample::off(), None).expect("part");
        let named: Vec<&str> = p.clients.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(named, ["10.0.0.8"]);
        let (p, _) = early_part(&agg, t + 2, &keys, &Sample::off(), None).expect("part");
        assert_eq!(p.clients.len(), 2, "within 3 s of the bound");
    }

    #[test]
    fn no_early_part_in_the_last_second_or_without_activity() {
        let t = 1_800_000_000u64;
        let mut agg = Aggregator::new(100, 24, 56);
        let keys = vec![(By::Address, "10.0.0.9".to_owned())];
        assert!(early_part(&agg, t + 3, &keys, &Sample::off(), None).is_none());
        agg.apply(std::net::IpAddr::from([10, 0, 0, 9]), &bytes(1), at(t, 10));
        assert!(early_part(&agg, t + 9, &keys, &Sample::off(), None).is_none());
        let (p, _) = early_part(&agg, t, &keys, &Sample::off(), None).expect("first second");
        assert_eq!(p.period_s, 1);
    }

    /// Parts once the collector takes them, at most one a second, each with what its clients
    /// did since the period's last part (a decoy alerting first does not hold a later bot
    /// back), and only in the period the alerts were raised in.
    #[test]
    fn parts_follow_each_other_within_a_period() {
        let t = 1_800_000_000u64;
        let mut agg = Aggregator::new(100, 24, 56);
        let ip = |i| std::net::IpAddr::from([10, 0, 0, i]);
        agg.apply(ip(9), &bytes(100), at(t + 1, 0));
        agg.apply(ip(8), &bytes(100), at(t + 1, 0));
        let key = |i: u8| (By::Address, format!("10.0.0.{i}"));
        let mut parts = EarlyParts::default();
        let off = Sample::off();
        parts.want(t + 1, [key(9)]);
        assert!(
            parts.take(&agg, t + 1, false, &off).is_none(),
            "not taken yet"
        );
        let (p, carried) = parts
            .take(&agg, t + 2, true, &off)
            .expect("once the collector takes parts");
        assert!(parts.of(t).is_none(), "not recorded yet");
        parts.shipped(carried);
        assert_eq!(parts.count, 1);
        assert_eq!((p.start_s, p.period_s, p.clients.len()), (t, 3, 1));
        assert!(parts.of(t + 10).is_none());
        // The decoy (10.0.0.9) took the first part; the bot (10.0.0.8) alerts later in the
        // same second: its part waits for the next second, then covers what follows.
        parts.want(t + 2, [key(8), key(9)]);
        assert!(
            parts.take(&agg, t + 2, true, &off).is_none(),
            "one a second"
        );
        agg.apply(ip(9), &bytes(5), at(t + 4, 0));
        let (p, carried) = parts.take(&agg, t + 4, true, &off).expect("next second");
        parts.shipped(carried);
        assert_eq!((p.start_s, p.period_s), (t + 3, 2));
        let got: Vec<(&str, u64)> = p
            .clients
            .iter()
            .map(|c| (c.key.as_str(), c.counts.bytes_in))
            .collect();
        assert_eq!(
            got,
            [("10.0.0.8", 100), ("10.0.0.9", 5)],
            "since the last part"
        );
        let rec = parts.of(t).expect("record");
        assert_eq!(rec.period_s, 5);
        let shipped = rec.shipped();
        assert_eq!(shipped[&(By::Address, "10.0.0.9")].bytes_in, 105);
        assert_eq!(shipped[&(By::Address, "10.0.0.8")].bytes_in, 100);
        // The rest ships what is left of each.
        agg.apply(ip(8), &bytes(7), at(t + 8, 0));
        let rest = summarize(&agg, t, 10, &off, parts.of(t)).expect("rest");
        assert_eq!((rest.start_s, rest.period_s), (t + 5, 5));
        let r: Vec<(&str, u64)> = rest
            .clients
            .iter()
            .filter(|c| c.by == "address")
            .map(|c| (c.key.as_str(), c.counts.bytes_in))
            .collect();
        assert_eq!(r, [("10.0.0.8", 7)]);
        // A wish from an earlier period is not shipped in a later one.
        parts.want(t + 15, [key(8)]);
        agg.apply(ip(8), &bytes(1), at(t + 21, 0));
        assert!(parts.take(&agg, t + 21, true, &off).is_none());
        parts.want(t + 21, (0..2000).map(|_| key(8)));
        assert_eq!(parts.wanted.len(), 1, "once each");
        parts.want(t + 21, (0..2000u32).map(|i| (By::Identity, i.to_string())));
        assert_eq!(parts.wanted.len(), MAX_KEYS);
        let (p, _) = parts.take(&agg, t + 21, true, &off).expect("next period");
        assert_eq!((p.start_s, p.clients.len()), (t + 20, 1));
        assert_eq!(parts.wanted.len(), MAX_KEYS - 1, "the idle ones wait");
        // A client alerting before it did anything in the period keeps its wish.
        parts.want(t + 31, [key(7)]);
        assert!(parts.take(&agg, t + 31, true, &off).is_none());
        agg.apply(ip(7), &bytes(1), at(t + 32, 0));
        let (p, _) = parts.take(&agg, t + 32, true, &off).expect("once it did");
        assert_eq!((p.start_s, p.period_s), (t + 30, 3));
    }

    #[test]
    fn spans_stay_within_one_period() {
        let t = 1_800_000_000u64;
        for (start, len, ok) in [
            (t, 10, true),
            (t + 1, 10, false),
            (t, 3, true),
            (t + 3, 7, true),
            (t + 3, 6, true),
            (t + 3, 8, false),
            (t, 0, false),
            (t + 9, 1, true),
            (t, 11, false),
            (u64::MAX - 3, 4, false),
        ] {
            assert_eq!(valid_span(start, len), ok, "{start} {len}");
        }
    }
}
