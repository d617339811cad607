//! The adaptive population baseline: percentiles of per-key per-minute activity over the last
//! hour, the basis of baseline rules and of a rate limit recommendation.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::model::aggregate::{Aggregator, Now};

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
pub struct Baseline {
    last_minute: u64,
    /// Per complete minute: (requests, bytes_out) of each active address and identity.
    minutes: VecDeque<Vec<(u64, u64)>>,
    pub view: BaselineView,
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
    pub fn update(&mut self, agg: &Aggregator, now: Now) {
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
                let m = c.windows().minute(now.secs(), 0);
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

    /// The 99th percentile of requests per minute, once `min_minutes` of history are learned.
    pub fn requests_p99(&self, min_minutes: u64) -> Option<f64> {
        (self.view.history_minutes >= min_minutes).then_some(self.view.requests_per_minute.p99)
    }
}
