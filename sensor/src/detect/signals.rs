//! Signals derived from a key's counters that forget and accumulate: activity over windows,
//! request shape (sizes, out/in), estimated output tokens, identities behind an address, and
//! the settings that scale them (`[detect.signals]`).

use std::{collections::HashMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::model::{
    aggregate::{Aggregator, ClientStats, Counts, Now, Window},
    keys::By,
};

/// `[detect.signals]`: the scales of the score and the ring rule, and the learning mode.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignalConfig {
    /// Sustained estimated output tokens per minute at which a key's volume earns its first
    /// score point; each doubling earns one more (up to 4).
    pub output_floor_tokens_per_minute: f64,
    /// A ring needs at least this many member keys...
    pub ring_min_members: usize,
    /// ...and together at least this many estimated output tokens per minute over 10 minutes.
    pub ring_tokens_per_minute: f64,
    /// A ring member pulls long outputs: at least this many estimated output tokens per
    /// request on average over the hour. Replies shorter than this are mostly the response
    /// head (a health check's `200 OK` is ~150 bytes, ~30 "tokens"), not distillation data.
    pub ring_min_reply_tokens: f64,
    /// Learning mode: until the population baseline has `baseline_min_minutes` of history,
    /// every match is recorded as log-only (`"mode": "log"`), not alerted.
    pub learning: bool,
    /// The built-in ring rule (`extraction-ring`, see detect/ring.rs).
    pub rings: bool,
}

impl Default for SignalConfig {
    fn default() -> Self {
        Self {
            output_floor_tokens_per_minute: 1000.0,
            ring_min_members: 5,
            ring_tokens_per_minute: 4000.0,
            ring_min_reply_tokens: 64.0,
            learning: false,
            rings: true,
        }
    }
}

impl SignalConfig {
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(self.output_floor_tokens_per_minute.is_finite()
            && self.output_floor_tokens_per_minute > 0.0)
        {
            return Err((
                "output_floor_tokens_per_minute",
                "must be a positive number".into(),
            ));
        }
        if self.ring_min_members < 2 {
            return Err(("ring_min_members", "must be at least 2".into()));
        }
        if !(self.ring_tokens_per_minute.is_finite() && self.ring_tokens_per_minute >= 0.0) {
            return Err(("ring_tokens_per_minute", "must be a number >= 0".into()));
        }
        if !(self.ring_min_reply_tokens.is_finite() && self.ring_min_reply_tokens >= 0.0) {
            return Err(("ring_min_reply_tokens", "must be a number >= 0".into()));
        }
        Ok(())
    }
}

/// Bytes a streamed token chunk takes on the wire at most, text and framing (an OpenAI-style
/// `chat.completion.chunk` event is ~170-250): the estimate takes this off per event, and
/// what remains is from replies that were not streamed.
const EVENT_BYTES: f64 = 250.0;
/// Bytes of reply text per token, roughly, for replies that were not streamed.
const BYTES_PER_TOKEN: f64 = 5.0;

/// Estimated output tokens: one per server-sent event of streamed replies, plus the bytes
/// that are not accounted for by events at about 5 bytes a token (a key that mixes streamed
/// and plain replies is underestimated by up to the slack of `EVENT_BYTES`). Bytes alone would weigh
/// a streamed reply ~40x a plain one of the same text, so chat UIs (which stream) would
/// look heavier than scripts (which often do not).
pub fn est_tokens(c: &Counts) -> f64 {
    let events = c.events_out as f64;
    events + (c.bytes_out as f64 - EVENT_BYTES * events).max(0.0) / BYTES_PER_TOKEN
}

fn ratio(a: f64, b: f64) -> f64 {
    if b <= 0.0 {
        if a <= 0.0 { 0.0 } else { f64::INFINITY }
    } else {
        a / b
    }
}

/// Window length in minutes.
pub fn minutes(w: Window) -> u64 {
    match w {
        Window::OneMinute => 1,
        Window::TenMinutes => 10,
        Window::OneHour => 60,
    }
}

/// Minutes since the key was first seen (at least 1), capped at `cap`.
pub fn age_minutes(c: &ClientStats, now: Now, cap: u64) -> u64 {
    (now.unix_ms.saturating_sub(c.first_seen_ms()) / 60_000 + 1).min(cap)
}

/// Mean request size (bytes in per request) over a window.
pub fn request_bytes(t: &Counts) -> f64 {
    ratio(t.bytes_in as f64, t.requests as f64)
}

/// Mean reply size (bytes out per request) over a window.
pub fn reply_bytes(t: &Counts) -> f64 {
    ratio(t.bytes_out as f64, t.requests as f64)
}

/// Share of the observed minutes of a window in which the key made requests (1.0: every
/// minute). A key younger than the window is judged over its age.
pub fn duty(c: &ClientStats, now: Now, w: Window) -> f64 {
    let span = minutes(w);
    let observed = age_minutes(c, now, span);
    c.windows().active_minutes(now.secs(), span) as f64 / observed as f64
}

/// Mean request size over the last 10 minutes relative to the last hour: above 1 when
/// prompts grow (agents carrying their context along), about 1 for a stream of
/// independent prompts.
pub fn prompt_growth(c: &ClientStats, now: Now) -> f64 {
    let recent = request_bytes(&c.windows().get(now.secs(), Window::TenMinutes));
    let hour = request_bytes(&c.windows().get(now.secs(), Window::OneHour));
    if hour > 0.0 { recent / hour } else { 1.0 }
}

/// Per evaluation: how many API identities were seen from each source address in the last
/// hour. An address with several is a shared egress (an office NAT, a proxy, a frontend
/// pool): its traffic is many people's, and it is judged per identity. Keyed by the address
/// itself: counting formats nothing and allocates nothing per identity (it runs over every
/// identity at every evaluation); a lookup parses the table's key, and only when some
/// address has identities at all.
#[derive(Default)]
pub struct IdentitiesBehind(HashMap<IpAddr, u32, foldhash::fast::RandomState>);

impl IdentitiesBehind {
    pub fn count(agg: &Aggregator, now: Now) -> Self {
        let mut m: HashMap<IpAddr, u32, foldhash::fast::RandomState> = HashMap::default();
        let now_s = now.secs();
        let mut pace = crate::pace::Pace::new();
        for c in agg.identities.clients.values() {
            pace.step();
            for (ip, t) in c.source_seen_s() {
                if t.saturating_add(3600) > now_s {
                    *m.entry(*ip).or_insert(0) += 1;
                }
            }
        }
        Self(m)
    }

    /// Identities behind a key: for address and forwarded keys, those seen from it; an
    /// identity is one; a group counts none (it is judged by its addresses).
    pub fn of(&self, by: By, key: &str) -> u32 {
        match by {
            By::Identity => 1,
            By::Group => 0,
            By::Address | By::Forwarded => {
                if self.0.is_empty() {
                    return 0;
                }
                key.parse::<IpAddr>()
                    .ok()
                    .and_then(|ip| self.0.get(&ip).copied())
                    .unwrap_or(0)
            }
        }
    }
}

/// An address shared by this many identities or more is a shared egress.
pub const SHARED_EGRESS_IDENTITIES: u32 = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_estimated_alike_for_streamed_and_plain_replies() {
        // 100 tokens streamed: ~100 events of ~200 bytes each.
        let streamed = Counts {
            bytes_out: 100 * 200,
            events_out: 100,
            ..Default::default()
        };
        // The same 100 tokens as one JSON reply: ~500 bytes of text.
        let plain = Counts {
            bytes_out: 500,
            ..Default::default()
        };
        let (s, p) = (est_tokens(&streamed), est_tokens(&plain));
        assert!((100.0..=130.0).contains(&s), "{s}");
        assert!((90.0..=110.0).contains(&p), "{p}");
    }
}
