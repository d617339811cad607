//! The per-key extraction score: a sum of points from signals that each say a little about
//! extraction, so that no single threshold decides and a key just under every rule still
//! adds up. Every point is explained (`Explanation` on the alert, `sensor alerts --explain`).
//!
//! | signal | points | why |
//! |---|---|---|
//! | `output` | 0-5: 1 at the floor of sustained estimated output tokens/minute, +1 per doubling | distillation needs volume |
//! | `persistence` | 0-3: share of the last hour's minutes with requests (0.5 -> 0, 0.9 -> full), times the share of the hour observed | people pause; harvesters run unbroken for hours |
//! | `long_outputs` | +1 when est. output tokens over the hour >= 4x the prompt tokens (request bytes / 5); -1 when <= 0.5x | harvesting long outputs from short prompts; agents send big contexts for short answers |
//! | `parallel` | +1 with >= 3 open connections | scripts fan out |
//! | `regular` | +1 when the CV of the last ~10 minutes' gaps < 0.35 | scripts are regular (jitter defeats it: one point, never alone) |
//! | `sources` | +1 for an identity used from >= 5 addresses in the last hour | rotation |
//!
//! An address or forwarded client shared by `SHARED_EGRESS_IDENTITIES` identities or more
//! scores 0: it is many people, judged per identity.

use super::{
    alert::{Explanation, Part},
    signals::{self, IdentitiesBehind, SHARED_EGRESS_IDENTITIES, SignalConfig},
};
use crate::model::{
    aggregate::{ClientStats, Now, Window},
    keys::By,
};

/// Minutes over which a young key's output rate is averaged at least: a few long replies in
/// a key's first minute are not a sustained rate.
const MIN_RATE_SPAN_MINUTES: u64 = 10;

fn clamp01(x: f64) -> f64 {
    if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) }
}

/// The parts of one key's score as they are added. Detection asks for the score of every key
/// at every evaluation (the `score` metric) and needs the words only for the few that alert:
/// `explain` off, only the sum is kept and no text is formatted.
struct Parts {
    explain: bool,
    parts: Vec<Part>,
    total: f64,
}

impl Parts {
    fn add(&mut self, signal: &'static str, value: f64, points: f64, why: impl FnOnce() -> String) {
        let points = (points * 100.0).round() / 100.0;
        self.total += points;
        if self.explain {
            self.parts.push(Part {
                signal: signal.into(),
                value: (value * 1000.0).round() / 1000.0,
                points,
                why: why(),
            });
        }
    }

    fn finish(self) -> Explanation {
        if self.explain {
            return Explanation::scored(self.parts);
        }
        Explanation {
            score: (self.total * 100.0).round() / 100.0,
            ..Explanation::default()
        }
    }
}

/// The score of one key, with its parts.
pub fn score(
    c: &ClientStats,
    by: By,
    key: &str,
    behind: &IdentitiesBehind,
    cfg: &SignalConfig,
    now: Now,
) -> Explanation {
    scored(c, by, key, behind, cfg, now, true)
}

/// The score of one key alone: `score(..).score`, without formatting its explanation.
pub fn points(
    c: &ClientStats,
    by: By,
    key: &str,
    behind: &IdentitiesBehind,
    cfg: &SignalConfig,
    now: Now,
) -> f64 {
    scored(c, by, key, behind, cfg, now, false).score
}

fn scored(
    c: &ClientStats,
    by: By,
    key: &str,
    behind: &IdentitiesBehind,
    cfg: &SignalConfig,
    now: Now,
    explain: bool,
) -> Explanation {
    let mut parts = Parts {
        explain,
        parts: Vec::new(),
        total: 0.0,
    };
    let identities = behind.of(by, key);
    if by == By::Group {
        parts.add("group", 0.0, 0.0, || {
            String::from("a network is judged by its addresses and identities, and rings")
        });
        return parts.finish();
    }
    if identities >= SHARED_EGRESS_IDENTITIES {
        parts.add("shared_egress", f64::from(identities), 0.0, || {
            format!("{identities} identities behind this key: judged per identity")
        });
        return parts.finish();
    }
    let hour = c.windows().get(now.secs(), Window::OneHour);
    let age = signals::age_minutes(c, now, 60);
    let rate = signals::est_tokens(&hour) / age.max(MIN_RATE_SPAN_MINUTES) as f64;
    let level = rate / cfg.output_floor_tokens_per_minute;
    let output = if level > 0.0 {
        (level.log2() + 1.0).clamp(0.0, 5.0)
    } else {
        0.0
    };
    parts.add("output", rate, output, || {
        format!(
            "{rate:.0} est. output tokens/min over {age} min (floor {:.0})",
            cfg.output_floor_tokens_per_minute
        )
    });
    let duty = signals::duty(c, now, Window::OneHour);
    let persistence = 3.0 * clamp01((duty - 0.5) / 0.4) * age as f64 / 60.0;
    parts.add("persistence", duty, persistence, || {
        format!(
            "active in {:.0}% of the last {age} min",
            (duty * 100.0).min(100.0)
        )
    });
    // In tokens both ways: bytes would count a streamed reply's framing as output.
    let out_in = if hour.bytes_in > 0 {
        signals::est_tokens(&hour) / (hour.bytes_in as f64 / 5.0)
    } else {
        0.0
    };
    if hour.requests > 0 && out_in >= 4.0 {
        parts.add("long_outputs", out_in, 1.0, || {
            format!("{out_in:.1} est. output tokens per prompt token")
        });
    } else if hour.requests > 0 && out_in <= 0.5 {
        parts.add("long_outputs", out_in, -1.0, || {
            format!("{out_in:.2} est. output tokens per prompt token: context-heavy")
        });
    }
    if c.open_connections() >= 3 {
        parts.add("parallel", c.open_connections() as f64, 1.0, || {
            format!("{} open connections", c.open_connections())
        });
    }
    if let Some(cv) = c.gaps().cv_recent(Window::TenMinutes, now.unix_ms)
        && cv < 0.35
    {
        parts.add("regular", cv, 1.0, || {
            format!("gaps between requests vary by {:.0}% (10 min)", cv * 100.0)
        });
    }
    if by == By::Identity {
        let sources = c.distinct_sources(now.secs(), 3600);
        if sources >= 5 {
            parts.add("sources", sources as f64, 1.0, || {
                format!("used from {sources} addresses in the last hour")
            });
        }
    }
    parts.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::aggregate::{Aggregator, Counts, Delta};

    fn at(s: u64) -> Now {
        Now {
            unix_ms: 1_800_000_000_000 + s * 1000,
        }
    }

    /// `per_min` requests of `tokens` plain-reply tokens in each of `minutes` minutes, with
    /// the given minutes skipped.
    fn traffic(per_min: u64, tokens: u64, minutes: u64, skip: impl Fn(u64) -> bool) -> ClientStats {
        let mut agg = Aggregator::new(100, 24, 56);
        let ip = "10.0.0.1".parse().expect("ip");
        for m in 0..minutes {
            if skip(m) {
                continue;
            }
            let d = Delta {
                counts: Counts {
                    requests: per_min,
                    bytes_in: per_min * 300,
                    bytes_out: per_min * tokens * 5,
                    ..Default::default()
                },
                ..Default::default()
            };
            agg.apply(ip, &d, at(m * 60 + 1));
        }
        agg.addresses.clients["10.0.0.1"].clone()
    }

    fn total(c: &ClientStats, minutes: u64) -> f64 {
        score(
            c,
            By::Address,
            "10.0.0.1",
            &IdentitiesBehind::default(),
            &SignalConfig::default(),
            at(minutes * 60 - 1),
        )
        .score
    }

    #[test]
    fn an_unbroken_hour_at_a_fast_human_rate_adds_up_a_pausing_person_does_not() {
        // 4 requests a minute of 600 tokens, every minute for an hour: no single rule.
        let slow = traffic(4, 600, 60, |_| false);
        assert!(total(&slow, 60) >= 5.5, "{}", total(&slow, 60));
        // The same person's pace with a break every few minutes.
        let human = traffic(4, 600, 60, |m| m % 3 == 2 || (20..30).contains(&m));
        assert!(total(&human, 60) < 5.0, "{}", total(&human, 60));
        // Ten minutes of it are not yet an hour.
        let young = traffic(4, 600, 10, |_| false);
        assert!(total(&young, 10) < 5.0, "{}", total(&young, 10));
    }

    #[test]
    fn shared_egress_is_judged_per_identity() {
        let c = traffic(100, 600, 20, |_| false);
        let mut agg = Aggregator::new(100, 24, 56);
        let ip: std::net::IpAddr = "10.0.0.1".parse().expect("ip");
        for i in 0..3 {
            agg.request_keys(
                ip,
                &crate::model::aggregate::ExchangeKeys {
                    identity: Some(format!("k-{i}")),
                    forwarded: None,
                },
                1,
                at(1000),
            );
        }
        let behind = IdentitiesBehind::count(&agg, at(1100));
        let e = score(
            &c,
            By::Address,
            "10.0.0.1",
            &behind,
            &SignalConfig::default(),
            at(1100),
        );
        assert_eq!(e.score, 0.0);
        assert_eq!(e.parts[0].signal, "shared_egress");
    }

    #[test]
    fn points_alone_equal_the_explained_score() {
        let cfg = SignalConfig::default();
        let none = IdentitiesBehind::default();
        for (per_min, tokens, minutes) in [(4, 600, 60), (100, 20, 30), (1, 5000, 90), (1, 1, 5)] {
            let c = traffic(per_min, tokens, minutes, |m| m % 7 == 3);
            for by in [By::Address, By::Group, By::Identity, By::Forwarded] {
                let now = at(minutes * 60 - 1);
                let explained = score(&c, by, "10.0.0.1", &none, &cfg, now);
                assert_eq!(
                    points(&c, by, "10.0.0.1", &none, &cfg, now),
                    explained.score
                );
                assert!(!explained.parts.is_empty());
            }
        }
    }
}
