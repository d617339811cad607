//! Early parts: a period shipped in two when the agent raises an alert.
//!
//! A fleet alert needs the collector to hold the bot's counts, and summaries leave at the end
//! of their 10-second period: a bot that starts just after a period boundary reaches the
//! fleet rules about 10 seconds after the host saw it. So when a rule run on the host raises
//! an alert, the agent ships at once the period so far for the alerting clients only
//! (`[start, start + k)`, their exact counts, no remainder and no sketch), and at the period's
//! end the rest (`[start + k, start + 10)`): every client as usual, the early part's clients
//! with what they did after it. The two parts add up to the period exactly; the collector
//! accepts at most these two per period and agent (a part must start where the last one
//! merged ended).
//!
//! One early part per period: an alert raised after it in the same period reaches the
//! collector with the period's end, as before. Only to a collector that said it takes parts
//! (an earlier one refuses summaries shorter than a period).

use super::{ClientDelta, PERIOD_SECS, Summary};
use crate::model::{aggregate::Aggregator, keys::By};

pub use crate::model::shipped::{Early, EarlyRow};

/// Alerting clients kept for one early part, at most (one rule run raising more alerts than
/// this ships the rest at the period's end).
pub const MAX_KEYS: usize = 1000;

/// The agent's early parts: which alerting clients want one, and what the current period's
/// carried.
#[derive(Debug, Default)]
pub struct EarlyParts {
    /// Alerting clients waiting for the early part of the period starting at `wanted_s`.
    wanted: Vec<(By, String)>,
    wanted_s: u64,
    /// What the latest early part carried (the rest of its period ships less it).
    pub shipped: Option<Early>,
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
        let room = MAX_KEYS.saturating_sub(self.wanted.len());
        self.wanted.extend(keys.into_iter().take(room));
    }

    /// The early part to ship at `now_s`: when alerts want one in this period, none was
    /// shipped in it yet, and the collector takes parts (`accepted`; until it says so, the
    /// wish waits, within the period).
    pub fn take(&mut self, agg: &Aggregator, now_s: u64, accepted: bool) -> Option<Summary> {
        let start = now_s / PERIOD_SECS * PERIOD_SECS;
        if self.wanted_s != start || self.wanted.is_empty() || !accepted {
            return None;
        }
        let keys = std::mem::take(&mut self.wanted);
        if self.shipped.as_ref().is_some_and(|e| e.start_s == start) {
            return None;
        }
        let (summary, early) = early_part(agg, now_s, &keys)?;
        self.shipped = Some(early);
        Some(summary)
    }

    /// What the early part of the period starting at `start_s` carried, if one was shipped.
    pub fn of(&self, start_s: u64) -> Option<&Early> {
        self.shipped.as_ref().filter(|e| e.start_s == start_s)
    }
}

/// The early part of the period holding `now_s` for `keys` (the alerting clients), and what
/// it carries; None when none of them did anything in the period yet, or when less than a
/// second of the period is left (its end ships it whole as soon).
pub fn early_part(agg: &Aggregator, now_s: u64, keys: &[(By, String)]) -> Option<(Summary, Early)> {
    let period = now_s / PERIOD_SECS;
    let start_s = period * PERIOD_SECS;
    // The seconds begun so far: the collector merges a part at its last moment, which stays
    // in this period.
    let period_s = now_s - start_s + 1;
    if period_s >= PERIOD_SECS {
        return None;
    }
    let mut clients = Vec::new();
    let mut rows = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (by, key) in keys {
        if !seen.insert((*by, key.as_str())) {
            continue;
        }
        let Some(c) = agg.table(*by).clients.get(key.as_str()) else {
            continue;
        };
        let counts = c.windows().ten_seconds(period);
        if counts.is_zero() {
            continue;
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
    let summary = Summary {
        start_s,
        period_s,
        clients,
        rest: Default::default(),
        sketch: Default::default(),
        sketch_key: String::new(),
        elsewhere: Default::default(),
    };
    Some((
        summary,
        Early {
            start_s,
            period_s,
            rows,
        },
    ))
}

/// Whether a summary's span is one the collector accepts: a whole period, its early part
/// (from the period's start) or its rest (to the period's end).
pub fn valid_span(start_s: u64, period_s: u64) -> bool {
    let Some(end) = start_s.checked_add(period_s) else {
        return false;
    };
    if period_s == PERIOD_SECS {
        return start_s.is_multiple_of(PERIOD_SECS);
    }
    (1..PERIOD_SECS).contains(&period_s)
        && (start_s.is_multiple_of(PERIOD_SECS) || end.is_multiple_of(PERIOD_SECS))
}

/// Whether a summary is an early part (the rest of its period is still to come).
pub fn is_early(s: &Summary) -> bool {
    s.period_s < PERIOD_SECS && s.start_s.is_multiple_of(PERIOD_SECS)
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
        let (part, early) = early_part(&agg, t + 2, &keys).expect("early part");
        assert_eq!((part.start_s, part.period_s), (t, 3));
        assert!(is_early(&part) && valid_span(part.start_s, part.period_s));
        assert_eq!(
            part.clients.len(),
            1,
            "the alerting client once, no unknown key"
        );
        assert_eq!(part.clients[0].counts.bytes_in, 200);
        assert!(part.rest.is_empty() && part.sketch.is_empty());
        // More after the early part.
        agg.apply(bot, &bytes(100), at(t + 6, 0));
        agg.apply(other, &bytes(5), at(t + 7, 0));
        let hot = std::sync::Arc::<crate::ship::sketch::Hot>::default();
        hot.set_supported();
        let sample = Sample::new(&[7u8; 32], 0, 100, hot);
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
        // The rest's sketch covers the rest's rows.
        let mut sum = [0u64; crate::ship::sketch::ROWS];
        for &(i, r, _) in &rest.sketch["address"] {
            sum[i as usize / crate::ship::sketch::WIDTH] += r;
        }
        assert_eq!(sum, [3; crate::ship::sketch::ROWS]);
        // Another period's summary ignores it.
        agg.apply(bot, &bytes(1), at(t + 11, 0));
        let next = summarize(&agg, t + 10, 10, &Sample::off(), Some(&early)).expect("next");
        assert_eq!((next.start_s, next.period_s), (t + 10, 10));
        assert_eq!(row(&next, "address", "10.0.0.9").bytes_in, 1);
    }

    #[test]
    fn no_early_part_in_the_last_second_or_without_activity() {
        let t = 1_800_000_000u64;
        let mut agg = Aggregator::new(100, 24, 56);
        let keys = vec![(By::Address, "10.0.0.9".to_owned())];
        assert!(early_part(&agg, t + 3, &keys).is_none());
        agg.apply(std::net::IpAddr::from([10, 0, 0, 9]), &bytes(1), at(t, 10));
        assert!(early_part(&agg, t + 9, &keys).is_none());
        let (p, _) = early_part(&agg, t, &keys).expect("first second");
        assert_eq!(p.period_s, 1);
    }

    /// One early part per period, only once the collector takes parts, and only for the
    /// period the alerts were raised in.
    #[test]
    fn one_early_part_per_period_once_the_collector_takes_them() {
        let t = 1_800_000_000u64;
        let mut agg = Aggregator::new(100, 24, 56);
        let ip = |i| std::net::IpAddr::from([10, 0, 0, i]);
        agg.apply(ip(9), &bytes(100), at(t + 1, 0));
        agg.apply(ip(8), &bytes(100), at(t + 1, 0));
        let key = |i: u8| (By::Address, format!("10.0.0.{i}"));
        let mut parts = EarlyParts::default();
        parts.want(t + 1, [key(9)]);
        assert!(parts.take(&agg, t + 1, false).is_none(), "not taken yet");
        let p = parts
            .take(&agg, t + 2, true)
            .expect("once the collector takes parts");
        assert_eq!((p.start_s, p.period_s, p.clients.len()), (t, 3, 1));
        assert_eq!(parts.of(t).map(|e| e.rows.len()), Some(1));
        assert!(parts.of(t + 10).is_none());
        parts.want(t + 4, [key(8)]);
        assert!(parts.take(&agg, t + 4, true).is_none(), "one per period");
        // A wish from an earlier period is not shipped in a later one.
        parts.want(t + 15, [key(8)]);
        agg.apply(ip(8), &bytes(1), at(t + 21, 0));
        assert!(parts.take(&agg, t + 21, true).is_none());
        parts.want(t + 21, (0..2000).map(|_| key(8)));
        assert_eq!(parts.wanted.len(), MAX_KEYS);
        let p = parts.take(&agg, t + 21, true).expect("next period");
        assert_eq!((p.start_s, p.clients.len()), (t + 20, 1));
    }

    #[test]
    fn spans_are_a_period_or_one_of_its_two_parts() {
        let t = 1_800_000_000u64;
        for (start, len, ok) in [
            (t, 10, true),
            (t + 1, 10, false),
            (t, 3, true),
            (t + 3, 7, true),
            (t + 3, 6, false),
            (t + 3, 8, false),
            (t, 0, false),
            (t + 9, 1, true),
            (t, 11, false),
            (u64::MAX - 3, 3, false),
        ] {
            assert_eq!(valid_span(start, len), ok, "{start} {len}");
        }
    }
}
