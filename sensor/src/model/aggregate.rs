//! Per-client aggregation: connection deltas -> per-address and per-group totals, sliding
//! windows, concurrency, and request timing, in bounded memory.
//!
//! Memory bound: each table keeps at most `max_clients` entries (plus a 10% batch slack). When it
//! overflows, the lightest idle entries (no open connection; by bytes in + out) are folded into
//! a counted remainder, then, only if that is not enough, the lightest active ones. A client
//! that is never among those keeps exact counters; the heaviest clients, the ones that matter
//! for extraction, are therefore exact.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    ops::AddAssign,
    sync::atomic::{AtomicU64, Ordering},
};

use crate::model::{clientmap::Handle, packed};
use serde::{Deserialize, Serialize};

/// Counters kept per client, in totals and in each window bucket. In JSON (the views, format 2
/// snapshots) zero fields are left out (most window buckets are mostly zero); in binary
/// formats (format 3 snapshots, positional) they are five numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Connections opened.
    pub connections: u64,
    /// Server-sent events in streamed replies.
    pub events_out: u64,
}

/// `Counts` as JSON has it: named fields, zeros left out.
#[derive(Serialize, Deserialize)]
struct NamedCounts {
    #[serde(default, skip_serializing_if = "is_zero")]
    requests: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    bytes_in: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    bytes_out: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    connections: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    events_out: u64,
}

/// A positional format cannot leave fields out: the five numbers in order.
type CountsTuple = (u64, u64, u64, u64, u64);

impl Serialize for Counts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let Self {
            requests,
            bytes_in,
            bytes_out,
            connections,
            events_out,
        } = *self;
        if s.is_human_readable() {
            NamedCounts {
                requests,
                bytes_in,
                bytes_out,
                connections,
                events_out,
            }
            .serialize(s)
        } else {
            (requests, bytes_in, bytes_out, connections, events_out).serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for Counts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let n = NamedCounts::deserialize(d)?;
            Ok(Self {
                requests: n.requests,
                bytes_in: n.bytes_in,
                bytes_out: n.bytes_out,
                connections: n.connections,
                events_out: n.events_out,
            })
        } else {
            let (requests, bytes_in, bytes_out, connections, events_out) =
                CountsTuple::deserialize(d)?;
            Ok(Self {
                requests,
                bytes_in,
                bytes_out,
                connections,
                events_out,
            })
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Saturating: counts added from outside (a collector adding agents' summaries) must never
/// wrap, which would turn a huge value into a small one and zero a client's totals.
impl AddAssign for Counts {
    fn add_assign(&mut self, o: Self) {
        self.requests = self.requests.saturating_add(o.requests);
        self.bytes_in = self.bytes_in.saturating_add(o.bytes_in);
        self.bytes_out = self.bytes_out.saturating_add(o.bytes_out);
        self.connections = self.connections.saturating_add(o.connections);
        self.events_out = self.events_out.saturating_add(o.events_out);
    }
}

impl Counts {
    pub fn is_zero(&self) -> bool {
        *self == Self::default()
    }

    /// Takes `o` back out (a correction), never below zero.
    pub fn saturating_sub(&mut self, o: Self) {
        self.requests = self.requests.saturating_sub(o.requests);
        self.bytes_in = self.bytes_in.saturating_sub(o.bytes_in);
        self.bytes_out = self.bytes_out.saturating_sub(o.bytes_out);
        self.connections = self.connections.saturating_sub(o.connections);
        self.events_out = self.events_out.saturating_sub(o.events_out);
    }
}

/// The sliding windows a view can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    OneMinute,
    TenMinutes,
    OneHour,
}

impl Window {
    pub const ALL: [Window; 3] = [Window::OneMinute, Window::TenMinutes, Window::OneHour];

    pub fn name(self) -> &'static str {
        match self {
            Window::OneMinute => "1m",
            Window::TenMinutes => "10m",
            Window::OneHour => "1h",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|w| w.name() == s)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Bucket {
    /// Which period (unix seconds / period length) the counts belong to.
    epoch: u64,
    counts: Counts,
}

const TEN_SECONDS: usize = 6;
const MINUTES: usize = 60;

/// Sliding windows: the last minute at 10-second resolution, the last 10 minutes and hour at
/// one-minute resolution. Each includes the current, partly elapsed, bucket.
///
/// Only buckets that hold something are stored (at most 6 and 60), oldest first: most
/// clients are active in a few periods of the hour, and a full ring of 66 buckets per client
/// (2640 bytes) dominated the agent's memory.
///
/// In JSON, the two lists of buckets. In a snapshot (format 4), both rings in one MessagePack
/// `bin` of varints (`encode_rings`); format 3 snapshots hold the two lists, which still read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Windows {
    tens: Vec<Bucket>,
    minutes: Vec<Bucket>,
}

/// `Windows` as JSON and format 3 snapshots have it.
#[derive(Deserialize)]
struct WindowsLists {
    #[serde(deserialize_with = "sorted")]
    tens: Vec<Bucket>,
    #[serde(deserialize_with = "sorted")]
    minutes: Vec<Bucket>,
}

impl<'de> Deserialize<'de> for Windows {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let l = WindowsLists::deserialize(d)?;
            return Ok(Self {
                tens: l.tens,
                minutes: l.minutes,
            });
        }
        // Format 3's array of the two lists.
        let lists = |(mut tens, mut minutes): (Vec<Bucket>, Vec<Bucket>)| {
            tens.sort_unstable_by_key(|b| b.epoch);
            minutes.sort_unstable_by_key(|b| b.epoch);
            Windows { tens, minutes }
        };
        packed::bin_or_seq(d, "a client's windows", decode_rings, lists)
    }
}

/// Both rings into `out`, each as its bucket count and then, per bucket, the distance in
/// periods from the bucket before (wrapping; the first bucket's from 0, so its epoch) and its
/// five counts, every number as a LEB128 varint (`integer-encoding`). A client active for an
/// hour holds 66 buckets: serde's walk over them value by value was most of a snapshot's work,
/// and MessagePack's own integers through rmp still cost ~30 instructions a number
/// (`sensor bench-aggregate --history-minutes 60 --snapshots 5`, BENCHMARKS.md).
fn encode_rings(out: &mut Vec<u8>, tens: &[Bucket], minutes: &[Bucket]) {
    // 2 counts and 6 numbers per bucket.
    let mut p = packed::Packer::new(out, 2 + (tens.len() + minutes.len()) * 6);
    for ring in [tens, minutes] {
        p.put(ring.len() as u64);
        let mut prev = 0u64;
        for b in ring {
            p.put(b.epoch.wrapping_sub(prev));
            prev = b.epoch;
            let c = b.counts;
            for v in [
                c.requests,
                c.bytes_in,
                c.bytes_out,
                c.connections,
                c.events_out,
            ] {
                p.put(v);
            }
        }
    }
    p.finish();
}

/// `encode_rings` read back; a ring longer than its span, a malformed or cut number, or bytes
/// left over make the snapshot unreadable.
fn decode_rings(bytes: &[u8]) -> Result<Windows, String> {
    let mut u = packed::Unpacker::new(bytes, "windows");
    let mut rings = [Vec::new(), Vec::new()];
    for (ring, span) in rings.iter_mut().zip([TEN_SECONDS, MINUTES]) {
        let n = u.get()?;
        if n > span as u64 {
            return Err(format!("windows: {n} buckets in a ring of {span}"));
        }
        let mut prev = 0u64;
        for _ in 0..n {
            let epoch = prev.wrapping_add(u.get()?);
            prev = epoch;
            let counts = Counts {
                requests: u.get()?,
                bytes_in: u.get()?,
                bytes_out: u.get()?,
                connections: u.get()?,
                events_out: u.get()?,
            };
            ring.push(Bucket { epoch, counts });
        }
        ring.sort_unstable_by_key(|b| b.epoch);
    }
    u.end("the rings")?;
    let [tens, minutes] = rings;
    Ok(Windows { tens, minutes })
}

/// Buckets oldest first, whatever order a snapshot lists them in (snapshots of the earlier
/// fixed rings list them in slot order): `sum_recent` relies on it.
fn sorted<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Bucket>, D::Error> {
    let mut v = Vec::<Bucket>::deserialize(d)?;
    v.sort_unstable_by_key(|b| b.epoch);
    Ok(v)
}

/// Adds to the bucket of `epoch` in `ring` (newest last), dropping buckets `span` or more
/// periods old. Grows one bucket at a time: the few buckets most clients hold stay exact.
fn add_to(ring: &mut Vec<Bucket>, epoch: u64, span: usize, c: Counts) {
    if let Some(last) = ring.last_mut()
        && last.epoch == epoch
    {
        last.counts += c;
        return;
    }
    // Time may step back (clock adjustments): add to an existing bucket of that period.
    if let Some(b) = ring.iter_mut().find(|b| b.epoch == epoch) {
        b.counts += c;
        return;
    }
    ring.retain(|b| b.epoch + span as u64 > epoch && b.epoch <= epoch + span as u64);
    // Snapshots of the earlier fixed rings list buckets in slot order.
    if !ring.is_sorted_by_key(|b| b.epoch) {
        ring.sort_unstable_by_key(|b| b.epoch);
    }
    while ring.len() >= span {
        // Only reachable after a clock step: keep the newest.
        ring.remove(0);
    }
    if ring.len() == ring.capacity() {
        ring.reserve_exact(1);
    }
    let at = ring.partition_point(|b| b.epoch < epoch);
    ring.insert(at, Bucket { epoch, counts: c });
}

/// The buckets of the last `span` periods up to `epoch`. Buckets are kept sorted (oldest
/// first), so the walk starts at the newest and stops at the first one too old: the 10-minute
/// window reads at most 10 of the hour's 60 buckets (detection reads windows for every key at
/// every evaluation).
fn sum_recent(ring: &[Bucket], epoch: u64, span: u64) -> Counts {
    let mut total = Counts::default();
    for b in ring.iter().rev() {
        if b.epoch > epoch {
            continue;
        }
        if b.epoch + span <= epoch {
            break;
        }
        total += b.counts;
    }
    total
}

impl Windows {
    pub fn add(&mut self, now_s: u64, c: Counts) {
        add_to(&mut self.tens, now_s / 10, TEN_SECONDS, c);
        add_to(&mut self.minutes, now_s / 60, MINUTES, c);
    }

    /// Adds counts that happened at `at_s`, observed at `now_s` (the collector merging a
    /// late summary): only into the rings whose span still covers `at_s`, so that a period
    /// delivered after an outage lands in its own bucket and never pushes newer ones out.
    pub fn add_late(&mut self, now_s: u64, at_s: u64, c: Counts) {
        let at_s = at_s.min(now_s);
        if at_s / 10 + TEN_SECONDS as u64 > now_s / 10 {
            add_to(&mut self.tens, at_s / 10, TEN_SECONDS, c);
        }
        if at_s / 60 + MINUTES as u64 > now_s / 60 {
            add_to(&mut self.minutes, at_s / 60, MINUTES, c);
        }
    }

    /// Takes `c` back out of the current buckets (a correction of something just added).
    pub fn retract(&mut self, now_s: u64, c: Counts) {
        for (ring, epoch) in [
            (&mut self.tens, now_s / 10),
            (&mut self.minutes, now_s / 60),
        ] {
            if let Some(slot) = ring.iter_mut().find(|b| b.epoch == epoch) {
                slot.counts.saturating_sub(c);
            }
        }
    }

    #[cfg(test)]
    fn get(&self, now_s: u64, w: Window) -> Counts {
        WindowsRef::held(self).get(now_s, w)
    }
}

/// A client's windows as read: its own buckets, or, for a compact client (see `Light`), the
/// one 10-second period and minute that hold all of its counts, which are its totals.
#[derive(Debug, Clone, Copy)]
pub struct WindowsRef<'a>(Rings<'a>);

#[derive(Debug, Clone, Copy)]
enum Rings<'a> {
    Held(&'a Windows),
    Single {
        tens: [Bucket; 1],
        minutes: [Bucket; 1],
    },
    Empty,
}

impl<'a> WindowsRef<'a> {
    fn held(w: &'a Windows) -> Self {
        Self(Rings::Held(w))
    }

    /// All of `counts` in the 10-second period `period` (unix seconds / 10).
    fn single(period: u64, counts: Counts) -> Self {
        Self(Rings::Single {
            tens: [Bucket {
                epoch: period,
                counts,
            }],
            minutes: [Bucket {
                epoch: period / 6,
                counts,
            }],
        })
    }

    fn rings(&self) -> (&[Bucket], &[Bucket]) {
        match &self.0 {
            Rings::Held(w) => (&w.tens, &w.minutes),
            Rings::Single { tens, minutes } => (tens, minutes),
            Rings::Empty => (&[], &[]),
        }
    }

    /// Counts of the 10-second period `epoch` (unix seconds / 10), if still held.
    pub fn ten_seconds(&self, epoch: u64) -> Counts {
        self.rings()
            .0
            .iter()
            .find(|b| b.epoch == epoch)
            .map_or_else(Counts::default, |b| b.counts)
    }

    /// Counts of the minute `minutes_ago` complete minutes before the current one (0 = the
    /// last complete minute).
    pub fn minute(&self, now_s: u64, minutes_ago: u64) -> Counts {
        let epoch = (now_s / 60).saturating_sub(minutes_ago + 1);
        self.rings()
            .1
            .iter()
            .find(|b| b.epoch == epoch)
            .map_or_else(Counts::default, |b| b.counts)
    }

    /// Minutes of the last `span` (the current one included) in which the client made a
    /// request: how sustained its activity is. People pause; harvesting scripts do not.
    pub fn active_minutes(&self, now_s: u64, span: u64) -> u64 {
        let epoch = now_s / 60;
        self.rings()
            .1
            .iter()
            .filter(|b| b.epoch <= epoch && b.epoch + span > epoch && b.counts.requests > 0)
            .count() as u64
    }

    pub fn get(&self, now_s: u64, w: Window) -> Counts {
        let (tens, minutes) = self.rings();
        match w {
            Window::OneMinute => sum_recent(tens, now_s / 10, TEN_SECONDS as u64),
            Window::TenMinutes => sum_recent(minutes, now_s / 60, 10),
            Window::OneHour => sum_recent(minutes, now_s / 60, MINUTES as u64),
        }
    }
}

/// Exponentially decayed moments of the gaps between requests: the regularity of roughly
/// the last time constant, which forgets. A running CV over every gap since first seen
/// (`Gaps::cv`) never forgets: one busy hour and a week of health checks blend, and a bot
/// that was regular yesterday stays "regular" while it jitters today.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Decayed {
    /// Decayed count of gaps, sum of gaps and sum of squared gaps (seconds of the kernel's
    /// clock: the CV is a ratio, so the agent's sped-up evaluation clock does not matter).
    w: f64,
    s1: f64,
    s2: f64,
    /// When the sums were last decayed (unix ms of the agent's clock).
    at_ms: u64,
}

/// Gaps weighing less than this (about this many within the time constant) have no CV yet.
const DECAYED_MIN_WEIGHT: f64 = 5.0;

impl Decayed {
    fn factor(&self, now_ms: u64, tau_ms: f64) -> f64 {
        (-(now_ms.saturating_sub(self.at_ms) as f64) / tau_ms).exp()
    }

    fn add(&mut self, gap_s: f64, now_ms: u64, tau_ms: f64) {
        let f = self.factor(now_ms, tau_ms);
        self.w = self.w * f + 1.0;
        self.s1 = self.s1 * f + gap_s;
        self.s2 = self.s2 * f + gap_s * gap_s;
        self.at_ms = self.at_ms.max(now_ms);
    }

    /// CV of the recent gaps, if enough of them are recent at `now_ms`.
    fn cv(&self, now_ms: u64, tau_ms: f64) -> Option<f64> {
        if self.w * self.factor(now_ms, tau_ms) < DECAYED_MIN_WEIGHT || self.s1 <= 0.0 {
            return None;
        }
        let mean = self.s1 / self.w;
        // Unbiased for the effective count; never negative from rounding.
        let var = ((self.s2 / self.w - mean * mean) * self.w / (self.w - 1.0)).max(0.0);
        Some(var.sqrt() / mean)
    }

    fn mean_s(&self) -> Option<f64> {
        (self.w > 0.0).then(|| self.s1 / self.w)
    }
}

/// Time constants of `Gaps::recent`: about 10 minutes and about an hour.
const RECENT_TAU_MS: [f64; 2] = [600_000.0, 3_600_000.0];

/// Running mean and variance of the gaps between consecutive requests (Welford), and the
/// same over the last ~10 minutes and ~hour (decayed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Gaps {
    pub n: u64,
    pub mean_ns: f64,
    m2: f64,
    /// CLOCK_BOOTTIME of the latest request; 0 when unknown (e.g. after a reboot).
    pub last_request_ns: u64,
    /// Decayed over ~10 minutes and ~1 hour (`RECENT_TAU_MS`).
    #[serde(default)]
    pub recent: [Decayed; 2],
}

impl Gaps {
    pub fn request(&mut self, ts_ns: u64) {
        self.request_at(ts_ns, None);
    }

    /// A request at kernel time `ts_ns`, observed at the agent's `now_ms` (which decays the
    /// recent moments; `None` keeps only the running ones).
    pub fn request_at(&mut self, ts_ns: u64, now_ms: Option<u64>) {
        if self.last_request_ns != 0 && ts_ns >= self.last_request_ns {
            let gap = (ts_ns - self.last_request_ns) as f64;
            self.n += 1;
            let d = gap - self.mean_ns;
            self.mean_ns += d / self.n as f64;
            self.m2 += d * (gap - self.mean_ns);
            if let Some(now_ms) = now_ms {
                for (r, tau) in self.recent.iter_mut().zip(RECENT_TAU_MS) {
                    r.add(gap / 1e9, now_ms, tau);
                }
            }
        }
        self.last_request_ns = self.last_request_ns.max(ts_ns);
    }

    /// CV of the gaps of about the last 10 minutes (`Window::TenMinutes`, and for 1m) or
    /// hour; None until enough recent gaps.
    pub fn cv_recent(&self, w: Window, now_ms: u64) -> Option<f64> {
        let i = usize::from(w == Window::OneHour);
        self.recent[i].cv(now_ms, RECENT_TAU_MS[i])
    }

    /// Mean recent gap (ms), same windows as `cv_recent`.
    pub fn mean_recent_ms(&self, w: Window) -> Option<f64> {
        let i = usize::from(w == Window::OneHour);
        self.recent[i].mean_s().map(|s| s * 1000.0)
    }

    /// Coefficient of variation (stddev / mean) of the gaps; None before two gaps.
    pub fn cv(&self) -> Option<f64> {
        (self.n >= 2 && self.mean_ns > 0.0)
            .then(|| (self.m2 / (self.n - 1) as f64).sqrt() / self.mean_ns)
    }

    pub fn mean_ms(&self) -> Option<f64> {
        (self.n >= 1).then(|| self.mean_ns / 1e6)
    }
}

/// One client's statistics: a compact record while it fits one (`Light`), the full one
/// (`Full`) from the first time it does not. Both are exact: a client becomes full before
/// any change the compact record cannot hold, and reads see the same values either way.
///
/// Most of a large table is clients seen once or twice (scans, floods, crawlers): a compact
/// record is 56 bytes in the table; a full one is a further 248 bytes on the heap, its window
/// buckets (48 bytes each) once its traffic spans more than one 10-second period, and, for
/// the few clients with an identity, forwarded client or sources behind them, those (`Seen`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClientStats(Repr);

#[derive(Debug, Clone, PartialEq)]
enum Repr {
    Light(Light),
    Full(Box<Full>),
}

impl Default for ClientStats {
    fn default() -> Self {
        Self(Repr::Light(Light::new(0)))
    }
}

/// Every statistic of a client.
#[derive(Debug, Clone, Default, PartialEq)]
struct Full {
    /// Unix milliseconds.
    first_seen_ms: u64,
    last_seen_ms: u64,
    totals: Counts,
    open_connections: u64,
    peak_open_connections: u64,
    /// Distinct seconds in which the agent observed traffic from the client (poll resolution).
    active_seconds: u64,
    last_active_s: u64,
    /// The windows' buckets, unless `single` holds them.
    windows: Windows,
    /// 1 + the 10-second period holding every count of the windows, which are then exactly
    /// the totals, as long as they are (`windows` is then empty, nothing allocated); 0 when
    /// `windows` holds the buckets.
    single: u64,
    gaps: Gaps,
    /// Who was seen behind the client; most clients have nothing.
    seen: Option<Box<Seen>>,
}

/// Who was seen behind a client.
#[derive(Debug, Clone, Default, PartialEq)]
struct Seen {
    /// The most recent API identity seen from this client (for address and forwarded rows).
    last_identity: Option<String>,
    /// The most recent forwarded client address (for address and identity rows).
    last_forwarded: Option<IpAddr>,
    /// Distinct client addresses this key was used from (identity rows), up to
    /// `MAX_SEEN_FROM`; `seen_from_more` says when there were more. Sorted, without
    /// duplicates: most keys have one or two, and a B-tree's node (~200 bytes for one
    /// address) was a tenth of the agent's heap with ten thousand identities.
    seen_from: Vec<IpAddr>,
    seen_from_more: bool,
    /// When (unix seconds, the agent's clock) each source address was last seen, for
    /// distinct sources over a window: `seen_from` never forgets, so a key shared by a
    /// roaming user for a month would look like a rotation ring. Bounded like `seen_from`;
    /// entries older than an hour go first. Sorted by address, one entry an address.
    source_seen_s: Vec<(IpAddr, u64)>,
}

/// A client as snapshots hold it (the layout of `ClientStats` before compact records),
/// written from either record without copying.
#[derive(Serialize)]
struct Saved<'a> {
    first_seen_ms: u64,
    last_seen_ms: u64,
    totals: Counts,
    open_connections: u64,
    peak_open_connections: u64,
    active_seconds: u64,
    last_active_s: u64,
    windows: SavedWindows<'a>,
    gaps: Gaps,
    last_identity: Option<&'a str>,
    last_forwarded: Option<IpAddr>,
    seen_from: &'a [IpAddr],
    seen_from_more: bool,
    /// A map, as the `BTreeMap` it was.
    #[serde(skip_serializing_if = "no_sources", serialize_with = "as_map")]
    source_seen_s: &'a [(IpAddr, u64)],
}

fn no_sources(m: &&[(IpAddr, u64)]) -> bool {
    m.is_empty()
}

fn as_map<S: serde::Serializer>(m: &&[(IpAddr, u64)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(m.iter().map(|(k, v)| (k, v)))
}

/// In JSON the two lists; in a snapshot `encode_rings`' `bin`.
struct SavedWindows<'a> {
    tens: &'a [Bucket],
    minutes: &'a [Bucket],
}

/// `SavedWindows` as JSON has it.
#[derive(Serialize)]
struct SavedLists<'a> {
    tens: &'a [Bucket],
    minutes: &'a [Bucket],
}

thread_local! {
    /// `SavedWindows`' encoding buffer, reused from client to client.
    static RINGS: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(test)]
thread_local! {
    static FORMAT_3_WINDOWS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with snapshots writing windows and connection records as format 3 did (the
/// tests of reading it).
#[cfg(test)]
pub(crate) fn with_format_3<R>(f: impl FnOnce() -> R) -> R {
    FORMAT_3_WINDOWS.set(true);
    let r = f();
    FORMAT_3_WINDOWS.set(false);
    r
}

/// Whether this snapshot is written as format 3 (`with_format_3`; never outside tests).
pub(crate) fn writing_format_3() -> bool {
    #[cfg(test)]
    return FORMAT_3_WINDOWS.get();
    #[cfg(not(test))]
    false
}

impl Serialize for SavedWindows<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() || writing_format_3() {
            return SavedLists {
                tens: self.tens,
                minutes: self.minutes,
            }
            .serialize(s);
        }
        RINGS.with_borrow_mut(|buf| {
            buf.clear();
            encode_rings(buf, self.tens, self.minutes);
            s.serialize_bytes(buf)
        })
    }
}

/// A client as snapshots hold it, read.
#[derive(Deserialize)]
struct Loaded {
    first_seen_ms: u64,
    last_seen_ms: u64,
    totals: Counts,
    open_connections: u64,
    peak_open_connections: u64,
    active_seconds: u64,
    last_active_s: u64,
    windows: Windows,
    gaps: Gaps,
    #[serde(default)]
    last_identity: Option<String>,
    #[serde(default)]
    last_forwarded: Option<IpAddr>,
    #[serde(default)]
    seen_from: BTreeSet<IpAddr>,
    #[serde(default)]
    seen_from_more: bool,
    #[serde(default)]
    source_seen_s: BTreeMap<IpAddr, u64>,
}

impl From<Loaded> for Full {
    fn from(mut l: Loaded) -> Self {
        let mut single = 0;
        if let ([t], [m]) = (l.windows.tens.as_slice(), l.windows.minutes.as_slice())
            && t.counts == l.totals
            && m.counts == l.totals
            && m.epoch == t.epoch / 6
            && let Some(p) = t.epoch.checked_add(1)
        {
            single = p;
            l.windows = Windows::default();
        }
        // Bounded as `note_source` bounds them, whatever the snapshot holds.
        let over = l.seen_from.len() > MAX_SEEN_FROM;
        let seen = Seen {
            last_identity: l.last_identity,
            last_forwarded: l.last_forwarded,
            seen_from: l.seen_from.into_iter().take(MAX_SEEN_FROM).collect(),
            seen_from_more: l.seen_from_more || over,
            source_seen_s: l.source_seen_s.into_iter().take(MAX_SEEN_FROM).collect(),
        };
        Self {
            first_seen_ms: l.first_seen_ms,
            last_seen_ms: l.last_seen_ms,
            totals: l.totals,
            open_connections: l.open_connections,
            peak_open_connections: l.peak_open_connections,
            active_seconds: l.active_seconds,
            last_active_s: l.last_active_s,
            windows: l.windows,
            single,
            gaps: l.gaps,
            seen: (seen != Seen::default()).then(|| Box::new(seen)),
        }
    }
}

/// A client with at most one request timed, all of its counted traffic in one 10-second
/// period, nothing annotated (identity, forwarded client, sources), and counters that fit
/// the narrower fields. Its windows are that one period (and minute) holding its totals; its
/// gaps are none. Any change beyond that makes it `Full` first.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Light {
    first_seen_ms: u64,
    /// CLOCK_BOOTTIME of its request; 0 when none (or unknown).
    last_request_ns: u64,
    /// requests, bytes_in, bytes_out, connections, events_out.
    totals: [u32; 5],
    /// last_seen_ms - first_seen_ms.
    last_seen_after_ms: u32,
    open_connections: u16,
    peak_open_connections: u16,
    active_seconds: u32,
    last_active_s: u32,
    /// The 10-second period (unix s / 10) of all its counted traffic; `NO_PERIOD` before any.
    period: u32,
}

/// `Light::period` of a client that has counted nothing yet.
const NO_PERIOD: u32 = u32::MAX;

impl Light {
    fn new(now_ms: u64) -> Self {
        Self {
            first_seen_ms: now_ms,
            last_request_ns: 0,
            totals: [0; 5],
            last_seen_after_ms: 0,
            open_connections: 0,
            peak_open_connections: 0,
            active_seconds: 0,
            last_active_s: 0,
            period: NO_PERIOD,
        }
    }

    fn totals(&self) -> Counts {
        let [requests, bytes_in, bytes_out, connections, events_out] = self.totals.map(u64::from);
        Counts {
            requests,
            bytes_in,
            bytes_out,
            connections,
            events_out,
        }
    }

    fn windows(&self) -> WindowsRef<'_> {
        if self.period == NO_PERIOD {
            WindowsRef(Rings::Empty)
        } else {
            WindowsRef::single(u64::from(self.period), self.totals())
        }
    }

    /// The same client as a full record.
    fn to_full(self) -> Full {
        Full {
            first_seen_ms: self.first_seen_ms,
            last_seen_ms: self.first_seen_ms + u64::from(self.last_seen_after_ms),
            totals: self.totals(),
            open_connections: self.open_connections.into(),
            peak_open_connections: self.peak_open_connections.into(),
            active_seconds: self.active_seconds.into(),
            last_active_s: self.last_active_s.into(),
            single: if self.period == NO_PERIOD {
                0
            } else {
                u64::from(self.period) + 1
            },
            gaps: Gaps {
                last_request_ns: self.last_request_ns,
                ..Gaps::default()
            },
            ..Full::default()
        }
    }

    /// The compact record of `f`, if it has one (exactly the same statistics).
    fn of(f: &Full) -> Option<Self> {
        let narrow = |c: &Counts| -> Option<[u32; 5]> {
            Some([
                c.requests.try_into().ok()?,
                c.bytes_in.try_into().ok()?,
                c.bytes_out.try_into().ok()?,
                c.connections.try_into().ok()?,
                c.events_out.try_into().ok()?,
            ])
        };
        let g = &f.gaps;
        let no_gaps = g.n == 0
            && g.mean_ns.to_bits() == 0
            && g.m2.to_bits() == 0
            && g.recent.iter().all(|d| {
                d.w.to_bits() == 0 && d.s1.to_bits() == 0 && d.s2.to_bits() == 0 && d.at_ms == 0
            });
        let annotated = f.seen.as_deref().is_some_and(|s| *s != Seen::default());
        if !no_gaps || annotated {
            return None;
        }
        let period = match (f.windows.tens.as_slice(), f.windows.minutes.as_slice()) {
            _ if f.single > 0 => u32::try_from(f.single - 1)
                .ok()
                .filter(|p| *p != NO_PERIOD)?,
            ([], []) if f.totals.is_zero() => NO_PERIOD,
            ([t], [m])
                if t.counts == f.totals && m.counts == f.totals && m.epoch == t.epoch / 6 =>
            {
                u32::try_from(t.epoch).ok().filter(|p| *p != NO_PERIOD)?
            }
            _ => return None,
        };
        Some(Self {
            first_seen_ms: f.first_seen_ms,
            last_request_ns: g.last_request_ns,
            totals: narrow(&f.totals)?,
            last_seen_after_ms: f
                .last_seen_ms
                .checked_sub(f.first_seen_ms)?
                .try_into()
                .ok()?,
            open_connections: f.open_connections.try_into().ok()?,
            peak_open_connections: f.peak_open_connections.try_into().ok()?,
            active_seconds: f.active_seconds.try_into().ok()?,
            last_active_s: f.last_active_s.try_into().ok()?,
            period,
        })
    }

    /// `ClientTable::apply`, if the result is still light.
    fn apply(mut self, mut counts: Counts, opened: bool, closed: bool, now: Now) -> Option<Self> {
        if opened {
            counts.connections = 1;
            self.open_connections = self.open_connections.checked_add(1)?;
            self.peak_open_connections = self.peak_open_connections.max(self.open_connections);
        }
        if closed {
            self.open_connections = self.open_connections.saturating_sub(1);
        }
        if !counts.is_zero() {
            let s = now.secs();
            let period = u32::try_from(s / 10).ok().filter(|p| *p != NO_PERIOD)?;
            if self.period != NO_PERIOD && self.period != period {
                return None;
            }
            self.period = period;
            let add = [
                counts.requests,
                counts.bytes_in,
                counts.bytes_out,
                counts.connections,
                counts.events_out,
            ];
            for (t, a) in self.totals.iter_mut().zip(add) {
                *t = u32::try_from(u64::from(*t).checked_add(a)?).ok()?;
            }
            let last_seen =
                (self.first_seen_ms + u64::from(self.last_seen_after_ms)).max(now.unix_ms);
            self.last_seen_after_ms = last_seen.checked_sub(self.first_seen_ms)?.try_into().ok()?;
            if s != u64::from(self.last_active_s) {
                self.active_seconds = self.active_seconds.checked_add(1)?;
                self.last_active_s = s.try_into().ok()?;
            }
        }
        Some(self)
    }

    /// `Gaps::request_at`, if no gap results (a first request, or one out of order).
    fn request(mut self, ts_ns: u64) -> Option<Self> {
        if self.last_request_ns != 0 && ts_ns >= self.last_request_ns {
            return None;
        }
        self.last_request_ns = self.last_request_ns.max(ts_ns);
        Some(self)
    }

    /// `ClientTable::retract`, if the windows still hold exactly the totals afterwards: the
    /// counts come out of the client's one period.
    fn retract(mut self, c: Counts, now: Now) -> Option<Self> {
        if self.period == NO_PERIOD || c.is_zero() {
            // Nothing counted yet: all zero, nothing to take.
            return Some(self);
        }
        if u64::from(self.period) != now.secs() / 10 {
            return None;
        }
        let mut t = self.totals();
        t.saturating_sub(c);
        self.totals = [
            t.requests,
            t.bytes_in,
            t.bytes_out,
            t.connections,
            t.events_out,
        ]
        .map(|v| v as u32);
        Some(self)
    }
}

impl ClientStats {
    fn new(now: Now) -> Self {
        Self(Repr::Light(Light::new(now.unix_ms)))
    }

    fn from_full(f: Full) -> Self {
        match Light::of(&f) {
            Some(l) => Self(Repr::Light(l)),
            None => Self(Repr::Full(Box::new(f))),
        }
    }

    /// The full record, made so first if the client is light.
    fn full(&mut self) -> &mut Full {
        if let Repr::Light(l) = self.0 {
            self.0 = Repr::Full(Box::new(l.to_full()));
        }
        match &mut self.0 {
            Repr::Full(f) => f,
            Repr::Light(_) => unreachable!("made full above"),
        }
    }

    /// Changes a light client with `op` if it stays light, else its full record with `full`.
    fn update(&mut self, op: impl FnOnce(Light) -> Option<Light>, full: impl FnOnce(&mut Full)) {
        if let Repr::Light(l) = &mut self.0
            && let Some(next) = op(*l)
        {
            *l = next;
            return;
        }
        full(self.full());
    }

    /// Whether the client holds only a compact record.
    pub fn is_compact(&self) -> bool {
        matches!(self.0, Repr::Light(_))
    }

    /// Unix milliseconds.
    pub fn first_seen_ms(&self) -> u64 {
        match &self.0 {
            Repr::Light(l) => l.first_seen_ms,
            Repr::Full(f) => f.first_seen_ms,
        }
    }

    pub fn last_seen_ms(&self) -> u64 {
        match &self.0 {
            Repr::Light(l) => l.first_seen_ms + u64::from(l.last_seen_after_ms),
            Repr::Full(f) => f.last_seen_ms,
        }
    }

    pub fn totals(&self) -> Counts {
        match &self.0 {
            Repr::Light(l) => l.totals(),
            Repr::Full(f) => f.totals,
        }
    }

    pub fn open_connections(&self) -> u64 {
        match &self.0 {
            Repr::Light(l) => l.open_connections.into(),
            Repr::Full(f) => f.open_connections,
        }
    }

    pub fn peak_open_connections(&self) -> u64 {
        match &self.0 {
            Repr::Light(l) => l.peak_open_connections.into(),
            Repr::Full(f) => f.peak_open_connections,
        }
    }

    /// Distinct seconds in which the agent observed traffic from the client (poll resolution).
    pub fn active_seconds(&self) -> u64 {
        match &self.0 {
            Repr::Light(l) => l.active_seconds.into(),
            Repr::Full(f) => f.active_seconds,
        }
    }

    pub fn windows(&self) -> WindowsRef<'_> {
        match &self.0 {
            Repr::Light(l) => l.windows(),
            Repr::Full(f) => f.windows(),
        }
    }

    pub fn gaps(&self) -> Gaps {
        match &self.0 {
            Repr::Light(l) => Gaps {
                last_request_ns: l.last_request_ns,
                ..Gaps::default()
            },
            Repr::Full(f) => f.gaps,
        }
    }

    /// The most recent API identity seen from this client (for address and forwarded rows).
    pub fn last_identity(&self) -> Option<&str> {
        match &self.0 {
            Repr::Light(_) => None,
            Repr::Full(f) => f.seen.as_ref()?.last_identity.as_deref(),
        }
    }

    /// The most recent forwarded client address (for address and identity rows).
    pub fn last_forwarded(&self) -> Option<IpAddr> {
        match &self.0 {
            Repr::Light(_) => None,
            Repr::Full(f) => f.seen.as_ref()?.last_forwarded,
        }
    }

    /// Distinct client addresses this key was used from (identity rows), up to
    /// `MAX_SEEN_FROM`; `seen_from_more` says when there were more.
    pub fn seen_from(&self) -> &[IpAddr] {
        match &self.0 {
            Repr::Light(_) => &[],
            Repr::Full(f) => f.seen.as_ref().map_or(&[], |s| &s.seen_from),
        }
    }

    pub fn seen_from_more(&self) -> bool {
        match &self.0 {
            Repr::Light(_) => false,
            Repr::Full(f) => f.seen.as_ref().is_some_and(|s| s.seen_from_more),
        }
    }

    /// When (unix seconds, the agent's clock) each source address was last seen (see
    /// `seen_from`), at most `MAX_SEEN_FROM` of them, by address.
    pub fn source_seen_s(&self) -> &[(IpAddr, u64)] {
        match &self.0 {
            Repr::Light(_) => &[],
            Repr::Full(f) => f.seen.as_ref().map_or(&[], |s| &s.source_seen_s),
        }
    }

    /// Distinct source addresses seen in the last `span_s` seconds.
    pub fn distinct_sources(&self, now_s: u64, span_s: u64) -> usize {
        self.source_seen_s()
            .iter()
            .filter(|(_, t)| t.saturating_add(span_s) > now_s)
            .count()
    }

    /// Eviction order: idle before active, then light before heavy.
    fn weight(&self) -> (bool, u64) {
        let t = self.totals();
        (
            self.open_connections() > 0,
            t.bytes_in.saturating_add(t.bytes_out),
        )
    }
}

impl Serialize for ClientStats {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let windows = self.windows();
        let (tens, minutes) = windows.rings();
        Saved {
            first_seen_ms: self.first_seen_ms(),
            last_seen_ms: self.last_seen_ms(),
            totals: self.totals(),
            open_connections: self.open_connections(),
            peak_open_connections: self.peak_open_connections(),
            active_seconds: self.active_seconds(),
            last_active_s: match &self.0 {
                Repr::Light(l) => l.last_active_s.into(),
                Repr::Full(f) => f.last_active_s,
            },
            windows: SavedWindows { tens, minutes },
            gaps: self.gaps(),
            last_identity: self.last_identity(),
            last_forwarded: self.last_forwarded(),
            seen_from: self.seen_from(),
            seen_from_more: self.seen_from_more(),
            source_seen_s: self.source_seen_s(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for ClientStats {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Loaded::deserialize(d).map(|l| Self::from_full(l.into()))
    }
}

/// Distinct source addresses remembered per identity.
pub const MAX_SEEN_FROM: usize = 1024;

impl Seen {
    fn note_source(&mut self, ip: IpAddr, now: Now) {
        if let Err(at) = self.seen_from.binary_search(&ip) {
            if self.seen_from.len() < MAX_SEEN_FROM {
                self.seen_from.insert(at, ip);
            } else {
                self.seen_from_more = true;
            }
        }
        let now_s = now.secs();
        let sources = &mut self.source_seen_s;
        match sources.binary_search_by_key(&ip, |(k, _)| *k) {
            Ok(at) => sources[at].1 = now_s,
            Err(_) => {
                if sources.len() >= MAX_SEEN_FROM {
                    sources.retain(|(_, t)| t.saturating_add(3600) > now_s);
                }
                if sources.len() < MAX_SEEN_FROM {
                    let at = sources.partition_point(|(k, _)| *k < ip);
                    sources.insert(at, (ip, now_s));
                }
            }
        }
    }
}

/// What was folded away to keep memory bounded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Folded {
    /// Entries folded (a client folded twice counts twice).
    pub clients: u64,
    /// Their counters at the time they were folded.
    pub totals: Counts,
}

/// Clients by key (see `model::clientmap`): a million compact clients take ~100 bytes each.
pub type ClientMap = crate::model::clientmap::ClientMap<ClientStats>;

/// One table of clients (by address, or by address group), bounded.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClientTable {
    pub clients: ClientMap,
    pub folded: Folded,
    #[serde(skip)]
    max: usize,
}

/// A change to one connection's counters, as observed by the agent.
#[derive(Debug, Clone, Copy, Default)]
pub struct Delta {
    pub counts: Counts,
    /// First observation of the connection.
    pub opened: bool,
    /// Final observation of the connection.
    pub closed: bool,
}

static CLOCK_SCALE: AtomicU64 = AtomicU64::new(1);
static CLOCK_ORIGIN_MS: AtomicU64 = AtomicU64::new(0);

/// Wall-clock time of an observation.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub unix_ms: u64,
}

impl Now {
    /// Wall-clock time, sped up by the clock scale (1 outside evaluations and demos).
    pub fn system() -> Self {
        let real = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let scale = CLOCK_SCALE.load(Ordering::Relaxed);
        let origin = CLOCK_ORIGIN_MS.load(Ordering::Relaxed);
        if scale <= 1 || origin == 0 {
            return Self { unix_ms: real };
        }
        Self {
            unix_ms: origin + real.saturating_sub(origin) * scale,
        }
    }

    pub fn scale() -> u64 {
        CLOCK_SCALE.load(Ordering::Relaxed).max(1)
    }

    /// Speeds the agent's clock up `scale` times from now on, so that windows, sustained-rate
    /// rules and baselines of an evaluation run take minutes instead of hours.
    pub fn set_scale(scale: u64) {
        let real = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        CLOCK_ORIGIN_MS.store(real, Ordering::Relaxed);
        CLOCK_SCALE.store(scale.max(1), Ordering::Relaxed);
    }

    pub fn secs(self) -> u64 {
        self.unix_ms / 1000
    }
}

impl ClientTable {
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            ..Default::default()
        }
    }

    pub fn set_max(&mut self, max: usize) {
        self.max = max.max(1);
    }

    fn entry(&mut self, key: &str, now: Now) -> &mut ClientStats {
        // One probe; the key is copied only when it is new.
        self.clients
            .get_or_insert_with(key, || ClientStats::new(now))
    }

    pub fn apply(&mut self, key: &str, delta: &Delta, now: Now) {
        self.entry(key, now).update(
            |l| l.apply(delta.counts, delta.opened, delta.closed, now),
            |c| c.apply(delta, now),
        );
        self.bound();
    }

    /// As `apply`, through `handle` (see `ClientMap::get_or_insert_cached`): `key` is
    /// formatted only when the handle is stale.
    pub fn apply_cached<K: AsRef<str>>(
        &mut self,
        handle: &mut Option<Handle>,
        key: impl FnOnce() -> K,
        delta: &Delta,
        now: Now,
    ) {
        self.clients
            .get_or_insert_cached(handle, key, || ClientStats::new(now))
            .update(
                |l| l.apply(delta.counts, delta.opened, delta.closed, now),
                |c| c.apply(delta, now),
            );
        self.bound();
    }

    /// Merges counts another observer (an agent, at the collector) saw at `at`.
    pub fn merge(&mut self, key: &str, counts: Counts, at: Now, now: Now) {
        self.entry(key, at).full().merge(counts, at, now);
        self.bound();
    }

    /// Sets the connections open now (the collector's sum over agents).
    pub fn set_open(&mut self, key: &str, open: u64) {
        if let Some(c) = self.clients.get_mut(key) {
            c.update(
                |mut l| {
                    l.open_connections = open.try_into().ok()?;
                    l.peak_open_connections = l.peak_open_connections.max(l.open_connections);
                    Some(l)
                },
                |c| {
                    c.open_connections = open;
                    c.peak_open_connections = c.peak_open_connections.max(open);
                },
            );
        }
    }

    /// As `request`, through `handle` (see `apply_cached`).
    pub fn request_cached<K: AsRef<str>>(
        &mut self,
        handle: &mut Option<Handle>,
        key: impl FnOnce() -> K,
        ts_ns: u64,
        now: Now,
    ) {
        self.clients
            .get_or_insert_cached(handle, key, || ClientStats::new(now))
            .update(
                |l| l.request(ts_ns),
                |c| c.gaps.request_at(ts_ns, Some(now.unix_ms)),
            );
        self.bound();
    }

    pub fn request(&mut self, key: &str, ts_ns: u64, now: Now) {
        self.entry(key, now).update(
            |l| l.request(ts_ns),
            |c| c.gaps.request_at(ts_ns, Some(now.unix_ms)),
        );
        self.bound();
    }

    /// Takes back counts attributed to `key` a moment ago (see `ConnTable::on_request`).
    pub fn retract(&mut self, key: &str, c: Counts, now: Now) {
        if let Some(stats) = self.clients.get_mut(key) {
            stats.update(|l| l.retract(c, now), |stats| stats.retract(c, now));
        }
    }

    /// Records who was seen behind this key.
    pub fn annotate(
        &mut self,
        key: &str,
        identity: Option<&str>,
        forwarded: Option<IpAddr>,
        source: Option<IpAddr>,
        now: Now,
    ) {
        let c = self.entry(key, now);
        if identity.is_none() && forwarded.is_none() && source.is_none() {
            return;
        }
        let c: &mut Seen = c.full().seen.get_or_insert_default();
        if let Some(id) = identity
            && c.last_identity.as_deref() != Some(id)
        {
            c.last_identity = Some(id.to_owned());
        }
        if forwarded.is_some() {
            c.last_forwarded = forwarded;
        }
        if let Some(ip) = source {
            c.note_source(ip, now);
        }
    }

    /// Folds the lightest entries once the table exceeds its bound by the slack.
    fn bound(&mut self) {
        let slack = (self.max / 10).max(1);
        if self.clients.len() <= self.max + slack {
            return;
        }
        // Ties go by key, as they always did.
        let mut by_weight: Vec<((bool, u64), &str, usize)> = self
            .clients
            .iter()
            .enumerate()
            .map(|(i, (k, c))| (c.weight(), k, i))
            .collect();
        let excess = by_weight.len() - self.max;
        by_weight.select_nth_unstable(excess - 1);
        let victims: Vec<usize> = by_weight[..excess].iter().map(|(_, _, i)| *i).collect();
        let folded = &mut self.folded;
        self.clients.remove_positions(victims, |c| {
            folded.clients += 1;
            folded.totals += c.totals();
        });
    }

    /// Sum over exact entries and the folded remainder: equals everything observed.
    pub fn grand_total(&self) -> Counts {
        let mut t = self.folded.totals;
        for c in self.clients.values() {
            t += c.totals();
        }
        t
    }
}

impl Full {
    fn single(&self) -> Option<u64> {
        self.single.checked_sub(1)
    }

    fn windows(&self) -> WindowsRef<'_> {
        match self.single() {
            Some(p) => WindowsRef::single(p, self.totals),
            None => WindowsRef::held(&self.windows),
        }
    }

    /// The windows' buckets, made from the single period first if that held them.
    fn rings(&mut self) -> &mut Windows {
        if let Some(p) = self.single() {
            self.single = 0;
            // As `Windows::add` makes them (one bucket each, no spare capacity).
            self.windows.add(p * 10, self.totals);
        }
        &mut self.windows
    }

    /// Adds counts of `now_s` to the totals and the windows.
    fn add(&mut self, now_s: u64, counts: Counts) {
        let period = now_s / 10;
        let nothing = self.single == 0
            && self.windows.tens.is_empty()
            && self.windows.minutes.is_empty()
            && self.totals.is_zero();
        if nothing || self.single() == Some(period) {
            self.single = period + 1;
        } else {
            self.rings().add(now_s, counts);
        }
        self.totals += counts;
    }

    /// Takes `c` back out of the totals and the current buckets.
    fn retract(&mut self, c: Counts, now: Now) {
        if self.single() != Some(now.secs() / 10) {
            self.rings().retract(now.secs(), c);
        }
        self.totals.saturating_sub(c);
    }

    fn apply(&mut self, delta: &Delta, now: Now) {
        let c = self;
        let mut counts = delta.counts;
        if delta.opened {
            counts.connections = 1;
            c.open_connections += 1;
            c.peak_open_connections = c.peak_open_connections.max(c.open_connections);
        }
        if delta.closed {
            c.open_connections = c.open_connections.saturating_sub(1);
        }
        if !counts.is_zero() {
            c.add(now.secs(), counts);
            c.last_seen_ms = c.last_seen_ms.max(now.unix_ms);
            if now.secs() != c.last_active_s {
                c.active_seconds += 1;
                c.last_active_s = now.secs();
            }
        }
    }

    fn merge(&mut self, counts: Counts, at: Now, now: Now) {
        let c = self;
        c.first_seen_ms = c.first_seen_ms.min(at.unix_ms);
        if !counts.is_zero() {
            c.rings().add_late(now.secs(), at.secs(), counts);
            c.totals += counts;
            c.last_seen_ms = c.last_seen_ms.max(at.unix_ms);
            if at.secs() / 10 != c.last_active_s / 10 {
                // Resolution of merged activity: the 10-second summary period.
                c.active_seconds += 10;
                c.last_active_s = at.secs();
            }
        }
    }
}

/// Who an exchange (one request and its reply) belongs to, beyond the connection's peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExchangeKeys {
    /// Identity of the API credential (name if configured, else "k-" + keyed hash).
    pub identity: Option<String>,
    /// The client behind a trusted proxy.
    pub forwarded: Option<IpAddr>,
}

impl ExchangeKeys {
    pub fn is_empty(&self) -> bool {
        self.identity.is_none() && self.forwarded.is_none()
    }
}

/// Address-group key: the network of `ip` at the configured prefix, e.g. "10.1.2.0/24".
pub fn group_of(ip: IpAddr, v4_prefix: u8, v6_prefix: u8) -> String {
    Key::group(ip, v4_prefix, v6_prefix).as_str().to_owned()
}

/// A table key (an address, or an address group) formatted on the stack: the agent looks
/// keys up once per observation and per request event, so they are formatted without
/// allocating, and IPv4 (most clients) without `core::fmt`. The text is exactly what
/// `IpAddr`'s `Display` gives, plus "/prefix" for groups.
pub struct Key {
    // The longest: "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255/128" (49 bytes).
    buf: [u8; 56],
    len: usize,
}

impl Key {
    fn new() -> Self {
        Self {
            buf: [0; 56],
            len: 0,
        }
    }

    pub fn address(ip: IpAddr) -> Self {
        let mut k = Self::new();
        k.push_ip(ip);
        k
    }

    pub fn group(ip: IpAddr, v4_prefix: u8, v6_prefix: u8) -> Self {
        let (net, p) = match ip {
            IpAddr::V4(a) => {
                let p = v4_prefix.min(32);
                let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
                (IpAddr::V4(std::net::Ipv4Addr::from(u32::from(a) & mask)), p)
            }
            IpAddr::V6(a) => {
                let p = v6_prefix.min(128);
                let mask = if p == 0 { 0 } else { u128::MAX << (128 - p) };
                (
                    IpAddr::V6(std::net::Ipv6Addr::from(u128::from(a) & mask)),
                    p,
                )
            }
        };
        let mut k = Self::new();
        k.push_ip(net);
        k.push(b"/");
        k.push_decimal(p);
        k
    }

    pub fn as_str(&self) -> &str {
        let bytes = &self.buf[..self.len.min(self.buf.len())];
        debug_assert!(bytes.is_ascii());
        // SAFETY: only ASCII is ever written (digits, '.', '/', and the ASCII text of an
        // IPv6 address's Display), so any prefix is valid UTF-8.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }

    /// Appends what fits (every key does: the longest is 49 bytes).
    fn push(&mut self, bytes: &[u8]) {
        let start = self.len.min(self.buf.len());
        let n = bytes.len().min(self.buf.len() - start);
        self.buf[start..start + n].copy_from_slice(&bytes[..n]);
        self.len = start + n;
    }

    fn push_decimal(&mut self, v: u8) {
        let (digits, len) = OCTET_TEXT[usize::from(v)];
        self.push(&digits[..usize::from(len)]);
    }

    fn push_ip(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(a) => {
                // Each octet's text from a table into a local buffer, copied once: under a
                // new connection per request this ran for every key of every connection,
                // digit by digit (about a twentieth of the agent's instructions).
                let mut text = [0u8; 16];
                let mut n = 0;
                for (i, octet) in a.octets().into_iter().enumerate() {
                    let (digits, len) = OCTET_TEXT[usize::from(octet)];
                    // n <= 12 here (three octets of at most 3 digits and a dot each).
                    text[n..n + 3].copy_from_slice(&digits);
                    n += usize::from(len);
                    if i < 3 {
                        text[n] = b'.';
                        n += 1;
                    }
                }
                let start = self.len;
                if let Some(slot) = self.buf.get_mut(start..start + text.len()) {
                    // A fixed-size copy (no call to memcpy), of which the first n bytes count.
                    slot.copy_from_slice(&text);
                    self.len = start + n;
                } else {
                    self.push(&text[..n]);
                }
            }
            IpAddr::V6(a) => {
                use std::fmt::Write as _;
                let _ = write!(self, "{a}");
            }
        }
    }
}

/// The decimal text of every octet value: its digits, left-aligned, and how many there are.
static OCTET_TEXT: [([u8; 3], u8); 256] = {
    let mut t = [([0u8; 3], 0u8); 256];
    let mut v = 0;
    while v < 256 {
        let b = v as u8;
        t[v] = if b >= 100 {
            ([b'0' + b / 100, b'0' + b / 10 % 10, b'0' + b % 10], 3)
        } else if b >= 10 {
            ([b'0' + b / 10, b'0' + b % 10, 0], 2)
        } else {
            ([b'0' + b, 0, 0], 1)
        };
        v += 1;
    }
    t
};

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Write for Key {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        if self.len + s.len() > self.buf.len() {
            return Err(std::fmt::Error);
        }
        self.push(s.as_bytes());
        Ok(())
    }
}

/// Where one peer's entries stand in the address and group tables (a connection keeps this
/// between polls). Handles of another peer are never used: `ip` is checked first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientSlots {
    ip: Option<IpAddr>,
    address: Option<Handle>,
    group: Option<Handle>,
}

impl ClientSlots {
    /// Forgets the handles unless they are `ip`'s.
    fn reset_unless(&mut self, ip: IpAddr) {
        if self.ip != Some(ip) {
            *self = Self {
                ip: Some(ip),
                ..Default::default()
            };
        }
    }
}

/// Both client tables, fed from connection deltas and request events.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Aggregator {
    pub addresses: ClientTable,
    pub groups: ClientTable,
    /// Keyed by API identity (keyed hash of the credential, or its configured name).
    #[serde(default)]
    pub identities: ClientTable,
    /// Keyed by the client address a trusted proxy forwarded.
    #[serde(default)]
    pub forwarded: ClientTable,
    #[serde(skip)]
    v4_prefix: u8,
    #[serde(skip)]
    v6_prefix: u8,
}

impl Aggregator {
    pub fn new(max_clients: usize, v4_prefix: u8, v6_prefix: u8) -> Self {
        Self {
            addresses: ClientTable::new(max_clients),
            groups: ClientTable::new(max_clients),
            identities: ClientTable::new(max_clients),
            forwarded: ClientTable::new(max_clients),
            v4_prefix,
            v6_prefix,
        }
    }

    /// Re-applies settings that are not persisted (after loading a snapshot).
    pub fn configure(&mut self, max_clients: usize, v4_prefix: u8, v6_prefix: u8) {
        for table in self.tables_mut() {
            table.set_max(max_clients);
        }
        self.v4_prefix = v4_prefix;
        self.v6_prefix = v6_prefix;
    }

    pub fn group(&self, ip: IpAddr) -> String {
        group_of(ip, self.v4_prefix, self.v6_prefix)
    }

    /// The group key of `ip`, formatted on the stack.
    pub fn group_key(&self, ip: IpAddr) -> Key {
        Key::group(ip, self.v4_prefix, self.v6_prefix)
    }

    pub fn apply(&mut self, ip: IpAddr, delta: &Delta, now: Now) {
        if delta.counts.is_zero() && !delta.opened && !delta.closed {
            return;
        }
        let group = Key::group(ip, self.v4_prefix, self.v6_prefix);
        self.addresses.apply(Key::address(ip).as_str(), delta, now);
        self.groups.apply(group.as_str(), delta, now);
    }

    /// As `apply`, through the entries `slots` remembers for `ip` (a connection's peer,
    /// observed every poll): no key formatted or hashed while they stay valid.
    pub fn apply_cached(&mut self, ip: IpAddr, slots: &mut ClientSlots, delta: &Delta, now: Now) {
        if delta.counts.is_zero() && !delta.opened && !delta.closed {
            return;
        }
        slots.reset_unless(ip);
        let (v4, v6) = (self.v4_prefix, self.v6_prefix);
        self.addresses
            .apply_cached(&mut slots.address, || Key::address(ip), delta, now);
        self.groups
            .apply_cached(&mut slots.group, || Key::group(ip, v4, v6), delta, now);
    }

    pub fn request(&mut self, ip: IpAddr, ts_ns: u64, now: Now) {
        let group = Key::group(ip, self.v4_prefix, self.v6_prefix);
        self.addresses
            .request(Key::address(ip).as_str(), ts_ns, now);
        self.groups.request(group.as_str(), ts_ns, now);
    }

    /// The table of one key kind.
    pub fn table(&self, by: crate::model::keys::By) -> &ClientTable {
        use crate::model::keys::By;
        match by {
            By::Address => &self.addresses,
            By::Group => &self.groups,
            By::Identity => &self.identities,
            By::Forwarded => &self.forwarded,
        }
    }

    pub fn table_mut(&mut self, by: crate::model::keys::By) -> &mut ClientTable {
        use crate::model::keys::By;
        match by {
            By::Address => &mut self.addresses,
            By::Group => &mut self.groups,
            By::Identity => &mut self.identities,
            By::Forwarded => &mut self.forwarded,
        }
    }

    fn tables_mut(&mut self) -> [&mut ClientTable; 4] {
        [
            &mut self.addresses,
            &mut self.groups,
            &mut self.identities,
            &mut self.forwarded,
        ]
    }

    /// Accounts part of an exchange to its identity and forwarded client.
    pub fn apply_exchange(&mut self, keys: &ExchangeKeys, delta: &Delta, now: Now) {
        if delta.counts.is_zero() && !delta.opened && !delta.closed {
            return;
        }
        if let Some(id) = &keys.identity {
            self.identities.apply(id, delta, now);
        }
        if let Some(ip) = keys.forwarded {
            self.forwarded.apply(&ip.to_string(), delta, now);
        }
    }

    /// Takes back counts just attributed to an exchange (a correction).
    pub fn retract_exchange(&mut self, keys: &ExchangeKeys, c: Counts, now: Now) {
        if let Some(id) = &keys.identity {
            self.identities.retract(id, c, now);
        }
        if let Some(ip) = keys.forwarded {
            self.forwarded.retract(&ip.to_string(), c, now);
        }
    }

    /// A request began: timing for every key, and who is behind whom.
    pub fn request_keys(&mut self, peer: IpAddr, keys: &ExchangeKeys, ts_ns: u64, now: Now) {
        self.request_keys_cached(peer, &mut ClientSlots::default(), keys, ts_ns, now);
    }

    /// As `request_keys`, through the entries `slots` remembers for `peer`.
    pub fn request_keys_cached(
        &mut self,
        peer: IpAddr,
        slots: &mut ClientSlots,
        keys: &ExchangeKeys,
        ts_ns: u64,
        now: Now,
    ) {
        slots.reset_unless(peer);
        let (v4, v6) = (self.v4_prefix, self.v6_prefix);
        self.addresses
            .request_cached(&mut slots.address, || Key::address(peer), ts_ns, now);
        self.groups
            .request_cached(&mut slots.group, || Key::group(peer, v4, v6), ts_ns, now);
        let id = keys.identity.as_deref();
        // `request` made the entry; annotating it with nothing is a no-op.
        if id.is_some() || keys.forwarded.is_some() {
            self.addresses
                .annotate(Key::address(peer).as_str(), id, keys.forwarded, None, now);
        }
        if let Some(id) = id {
            self.identities.request(id, ts_ns, now);
            let source = keys.forwarded.unwrap_or(peer);
            self.identities
                .annotate(id, None, keys.forwarded, Some(source), now);
        }
        if let Some(ip) = keys.forwarded {
            let key = ip.to_string();
            self.forwarded.request(&key, ts_ns, now);
            self.forwarded.annotate(&key, id, None, None, now);
        }
    }

    /// After a reboot no connection of the saved state can still be open.
    pub fn close_all_connections(&mut self) {
        for table in self.tables_mut() {
            for c in table.clients.values_mut() {
                c.update(
                    |mut l| {
                        l.open_connections = 0;
                        Some(l)
                    },
                    |f| f.open_connections = 0,
                );
            }
        }
    }

    /// Forgets request timestamps that refer to another boot's clock.
    pub fn reset_request_clocks(&mut self) {
        for table in self.tables_mut() {
            for c in table.clients.values_mut() {
                c.update(
                    |mut l| {
                        l.last_request_ns = 0;
                        Some(l)
                    },
                    |f| f.gaps.last_request_ns = 0,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A saved client listing more sources than the bound (a hostile or corrupt state file)
    /// is cut to the bound on load and says there were more.
    #[test]
    fn sources_beyond_the_bound_are_cut_on_load() {
        let mut v = serde_json::to_value(ClientStats::default()).expect("json");
        let ips: Vec<String> = (0..MAX_SEEN_FROM as u32 + 100)
            .map(|n| std::net::Ipv4Addr::from(0x0a00_0000 + n).to_string())
            .collect();
        v["seen_from"] = serde_json::json!(ips);
        v["source_seen_s"] = ips.iter().map(|ip| (ip.clone(), 5)).collect();
        let c: ClientStats = serde_json::from_value(v).expect("client");
        assert_eq!(c.seen_from().len(), MAX_SEEN_FROM);
        assert!(c.seen_from_more());
        assert_eq!(c.source_seen_s().len(), MAX_SEEN_FROM);
        assert!(c.seen_from().is_sorted() && c.source_seen_s().is_sorted());
    }

    /// The sorted lists of sources keep what the B-trees they replaced kept (the earlier
    /// code, kept here as the model), through more addresses than the bound and hours of
    /// time: the same addresses, times and overflow flag, in the same order.
    #[test]
    fn sources_are_kept_as_the_btrees_kept_them() {
        use std::collections::{BTreeMap, BTreeSet};
        let mut seen = Seen::default();
        let (mut set, mut map, mut more) = (BTreeSet::new(), BTreeMap::new(), false);
        // A deterministic walk over 1 500 addresses (more than MAX_SEEN_FROM), v4 and v6.
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for step in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = (x % 1500) as u32;
            let ip: IpAddr = if n.is_multiple_of(3) {
                std::net::Ipv6Addr::from(u128::from(n) << 64).into()
            } else {
                std::net::Ipv4Addr::from(0x0a00_0000 + n).into()
            };
            let now = Now {
                unix_ms: 1_800_000_000_000 + step * 900,
            };
            seen.note_source(ip, now);
            if set.len() < MAX_SEEN_FROM {
                set.insert(ip);
            } else if !set.contains(&ip) {
                more = true;
            }
            let now_s = now.secs();
            if map.len() >= MAX_SEEN_FROM && !map.contains_key(&ip) {
                map.retain(|_, t: &mut u64| t.saturating_add(3600) > now_s);
            }
            if map.len() < MAX_SEEN_FROM || map.contains_key(&ip) {
                map.insert(ip, now_s);
            }
        }
        assert_eq!(seen.seen_from, set.into_iter().collect::<Vec<_>>());
        assert_eq!(seen.seen_from_more, more);
        assert!(more);
        assert_eq!(seen.source_seen_s, map.into_iter().collect::<Vec<_>>());
    }

    /// The early-stopping window sums equal a sum over every bucket, whatever the order of
    /// arrival (time stepping back included) and for a snapshot listing buckets unsorted.
    #[test]
    fn window_sums_stop_early_and_stay_exact() {
        let naive = |w: &Windows, now_s: u64, win: Window| {
            let (ring, epoch, span) = match win {
                Window::OneMinute => (&w.tens, now_s / 10, TEN_SECONDS as u64),
                Window::TenMinutes => (&w.minutes, now_s / 60, 10),
                Window::OneHour => (&w.minutes, now_s / 60, MINUTES as u64),
            };
            let mut t = Counts::default();
            for b in ring {
                if b.epoch <= epoch && b.epoch + span > epoch {
                    t += b.counts;
                }
            }
            t
        };
        let mut seed = 12345u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            seed >> 33
        };
        let mut w = Windows::default();
        let mut now = 1_800_000_000u64;
        for _ in 0..2000 {
            // Mostly forward, sometimes a step back (a clock adjustment).
            now = if next() % 20 == 0 {
                now - next() % 120
            } else {
                now + next() % 40
            };
            let c = Counts {
                requests: 1,
                bytes_in: next() % 1000,
                ..Counts::default()
            };
            w.add(now, c);
            for win in Window::ALL {
                assert_eq!(w.get(now, win), naive(&w, now, win), "{win:?} at {now}");
            }
        }
        let mut shuffled = w.clone();
        shuffled.minutes.reverse();
        shuffled.tens.reverse();
        let back: Windows =
            serde_json::from_str(&serde_json::to_string(&shuffled).expect("json")).expect("load");
        for win in Window::ALL {
            assert_eq!(back.get(now, win), w.get(now, win), "{win:?}");
        }
    }

    fn now(s: u64) -> Now {
        Now { unix_ms: s * 1000 }
    }

    #[test]
    fn record_sizes() {
        assert_eq!(std::mem::size_of::<Light>(), 56);
        assert_eq!(std::mem::size_of::<ClientStats>(), 64);
        assert_eq!(std::mem::size_of::<Full>(), 248);
    }

    /// Random changes to a table whose clients are compact where they can be, and to one
    /// whose clients are all full records (the code before compact records): both save and
    /// read the same, after every change.
    #[test]
    fn compact_records_change_as_full_ones() {
        let mut seed = 0x5eed_u64;
        let mut next = move |n: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        };
        let mut compact = ClientTable::new(10_000);
        let mut full = ClientTable::new(10_000);
        let mut t_ms = 1_800_000_000_000u64;
        let mut ts_ns = 1_000_000_000u64;
        let mut compact_seen = 0;
        for step in 0..10_000u64 {
            t_ms = match next(20) {
                0 => t_ms.saturating_sub(next(30_000)),
                1..=3 => t_ms + next(15_000),
                _ => t_ms + next(300),
            };
            let at = Now { unix_ms: t_ms };
            let key = format!("10.0.{}.{}", next(6), next(250));
            if compact
                .clients
                .get(&key)
                .is_some_and(ClientStats::is_compact)
            {
                compact_seen += 1;
            }
            let big = |n: u64| match n {
                0 => u64::from(u32::MAX) - 1,
                1 => u64::from(u32::MAX) + 1,
                n => n * 17,
            };
            let counts = Counts {
                requests: next(3),
                bytes_in: big(next(2_000)),
                bytes_out: big(next(2_000)),
                connections: next(2),
                events_out: next(4) / 3,
            };
            let op = next(100);
            for t in [&mut compact, &mut full] {
                match op {
                    0..=39 => t.apply(
                        &key,
                        &Delta {
                            counts: if op % 4 == 0 {
                                Counts::default()
                            } else {
                                counts
                            },
                            opened: op % 3 == 0,
                            closed: op % 5 == 0,
                        },
                        at,
                    ),
                    40..=69 => {
                        let ts = match op % 10 {
                            0 => 0,
                            1 => ts_ns.saturating_sub(5_000_000),
                            _ => ts_ns,
                        };
                        t.request(&key, ts, at);
                    }
                    70..=79 => t.retract(&key, counts, at),
                    80..=84 => t.set_open(&key, if op == 80 { 70_000 } else { op % 3 }),
                    85..=87 => t.annotate(
                        &key,
                        (op == 85).then_some("k-1"),
                        (op == 86).then(|| "192.0.2.1".parse().expect("ip")),
                        (op == 87).then(|| "192.0.2.2".parse().expect("ip")),
                        at,
                    ),
                    88..=89 => t.merge(
                        &key,
                        counts,
                        Now {
                            unix_ms: t_ms - 5_000,
                        },
                        at,
                    ),
                    _ => t.apply(
                        &key,
                        &Delta {
                            counts: Counts::default(),
                            opened: false,
                            closed: true,
                        },
                        at,
                    ),
                }
            }
            ts_ns += next(3_000_000_000);
            for c in full.clients.values_mut() {
                c.full().rings();
            }
            assert_eq!(compact.clients.len(), full.clients.len());
            if !full.clients.contains_key(&key) {
                continue;
            }
            let key_of = |t: &ClientTable| serde_json::to_value(&t.clients[&key]).expect("json");
            assert_eq!(key_of(&compact), key_of(&full), "{key} at step {step}");
            let (c, f) = (&compact.clients[&key], &full.clients[&key]);
            for w in Window::ALL {
                assert_eq!(c.windows().get(at.secs(), w), f.windows().get(at.secs(), w));
            }
            assert_eq!(
                c.windows().minute(at.secs(), 0),
                f.windows().minute(at.secs(), 0)
            );
            assert_eq!(
                c.windows().ten_seconds(at.secs() / 10),
                f.windows().ten_seconds(at.secs() / 10)
            );
            assert_eq!(
                c.windows().active_minutes(at.secs(), 10),
                f.windows().active_minutes(at.secs(), 10)
            );
            assert_eq!(c.gaps(), f.gaps());
            assert_eq!(c.weight(), f.weight());
        }
        assert_eq!(
            serde_json::to_value(&compact).expect("json"),
            serde_json::to_value(&full).expect("json")
        );
        assert!(
            compact_seen > 1_000,
            "changes to compact records: {compact_seen}"
        );
        // Loading makes records compact again where they can be, and changes nothing.
        let loaded: ClientTable =
            serde_json::from_value(serde_json::to_value(&full).expect("json")).expect("load");
        assert!(loaded.clients.values().any(|c| c.is_compact()));
        assert_eq!(
            serde_json::to_value(&loaded).expect("json"),
            serde_json::to_value(&full).expect("json")
        );
    }

    fn bytes(n: u64) -> Delta {
        Delta {
            counts: Counts {
                requests: 1,
                bytes_in: n,
                bytes_out: 2 * n,
                connections: 0,
                events_out: 0,
            },
            ..Default::default()
        }
    }

    #[test]
    fn windows_slide() {
        let mut w = Windows::default();
        let t0 = 1_000_000_020; // 20 s into a minute
        w.add(
            t0,
            Counts {
                requests: 1,
                ..Default::default()
            },
        );
        w.add(
            t0 + 30,
            Counts {
                requests: 2,
                ..Default::default()
            },
        );
        assert_eq!(w.get(t0 + 30, Window::OneMinute).requests, 3);
        // 65 s later the first request is out of the 1-minute window (10-s resolution).
        assert_eq!(w.get(t0 + 65, Window::OneMinute).requests, 2);
        assert_eq!(w.get(t0 + 65, Window::TenMinutes).requests, 3);
        assert_eq!(w.get(t0 + 11 * 60, Window::TenMinutes).requests, 0);
        assert_eq!(w.get(t0 + 11 * 60, Window::OneHour).requests, 3);
        assert_eq!(w.get(t0 + 61 * 60, Window::OneHour).requests, 0);
        // A bucket slot reused an hour later starts from zero.
        w.add(
            t0 + 3600,
            Counts {
                requests: 5,
                ..Default::default()
            },
        );
        assert_eq!(w.get(t0 + 3600, Window::OneHour).requests, 5);
    }

    /// Every window equals the brute-force sum of what was added in its span, and each
    /// client holds no more buckets than its windows need.
    #[test]
    fn sparse_windows_match_brute_force() {
        let mut w = Windows::default();
        let mut added: Vec<(u64, u64)> = Vec::new();
        let mut t = 1_700_000_000u64;
        let mut x: u64 = 7;
        for i in 0..3_000u64 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            // Irregular gaps from 0 to ~4 minutes, so buckets are skipped and reused.
            t += (x >> 56) % if i % 10 == 0 { 250 } else { 20 };
            let n = 1 + (x >> 60);
            w.add(
                t,
                Counts {
                    requests: n,
                    ..Default::default()
                },
            );
            added.push((t, n));
            assert!(w.tens.len() <= TEN_SECONDS && w.minutes.len() <= MINUTES);
            if i % 97 == 0 {
                let expect = |from: u64, to: u64| {
                    added
                        .iter()
                        .filter(|(at, _)| *at >= from && *at <= to)
                        .map(|(_, n)| *n)
                        .sum::<u64>()
                };
                let tens_start = (t / 10 - (TEN_SECONDS as u64 - 1)) * 10;
                let min_start = |k: u64| (t / 60 - (k - 1)) * 60;
                assert_eq!(w.get(t, Window::OneMinute).requests, expect(tens_start, t));
                assert_eq!(
                    w.get(t, Window::TenMinutes).requests,
                    expect(min_start(10), t)
                );
                assert_eq!(w.get(t, Window::OneHour).requests, expect(min_start(60), t));
            }
        }
    }

    #[test]
    fn windows_round_trip_sparse() {
        let mut w = Windows::default();
        w.add(
            1_000,
            Counts {
                bytes_out: 7,
                ..Default::default()
            },
        );
        let json = serde_json::to_string(&w).expect("serialize");
        assert!(json.len() < 200, "{json}");
        let back: Windows = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, w);
    }

    fn bucket(epoch: u64, n: u64) -> Bucket {
        Bucket {
            epoch,
            counts: Counts {
                requests: n,
                bytes_in: n << 7,
                bytes_out: u64::MAX - n,
                connections: n & 1,
                events_out: n << 40,
            },
        }
    }

    proptest::proptest! {
        /// A snapshot's rings read back exactly, oldest first, whatever the epochs (far
        /// apart, repeated, out of order, near u64::MAX) and counts.
        #[test]
        fn snapshot_rings_read_back_exactly(
            tens in proptest::collection::vec((proptest::prelude::any::<u64>(), 0u64..1 << 20), 0..=TEN_SECONDS),
            minutes in proptest::collection::vec((proptest::prelude::any::<u64>(), 0u64..1 << 20), 0..=MINUTES),
        ) {
            let tens: Vec<Bucket> = tens.into_iter().map(|(e, n)| bucket(e, n)).collect();
            let minutes: Vec<Bucket> = minutes.into_iter().map(|(e, n)| bucket(e, n)).collect();
            let mut bytes = Vec::new();
            encode_rings(&mut bytes, &tens, &minutes);
            let back = decode_rings(&bytes).expect("decodes");
            let sorted = |mut v: Vec<Bucket>| {
                v.sort_by_key(|b| b.epoch);
                v
            };
            // Equal epochs keep no order of their own: compare as multisets.
            let key = |v: &[Bucket]| {
                let mut k: Vec<_> = v.iter().map(|b| (b.epoch, b.counts.requests)).collect();
                k.sort_unstable();
                k
            };
            proptest::prop_assert_eq!(key(&back.tens), key(&sorted(tens)));
            proptest::prop_assert_eq!(key(&back.minutes), key(&sorted(minutes)));
            proptest::prop_assert!(back.tens.is_sorted_by_key(|b| b.epoch));
        }
    }

    #[test]
    fn snapshot_rings_through_msgpack_and_refused_when_malformed() {
        let mut w = Windows::default();
        // A client making one short request every 10 s for an hour.
        for s in (0..3_600).step_by(10) {
            let c = Counts {
                requests: 1,
                bytes_in: 120 + s % 7,
                bytes_out: 1_500 + s,
                connections: 1,
                events_out: 0,
            };
            w.add(1_800_000_000 + s, c);
        }
        assert_eq!((w.tens.len(), w.minutes.len()), (TEN_SECONDS, MINUTES));
        let saved = SavedWindows {
            tens: &w.tens,
            minutes: &w.minutes,
        };
        let bytes = rmp_serde::to_vec(&saved).expect("encode");
        let back: Windows = rmp_serde::from_slice(&bytes).expect("decode");
        assert_eq!(back, w);
        // Format 3's two lists (structs as arrays) read as the same windows.
        let lists = rmp_serde::to_vec(&(&w.tens, &w.minutes)).expect("encode");
        assert!(
            bytes.len() * 3 < lists.len() * 2,
            "{} {}",
            bytes.len(),
            lists.len()
        );
        let back: Windows = rmp_serde::from_slice(&lists).expect("decode");
        assert_eq!(back, w);
        // Malformed: cut short, a bucket too many, a byte left over, not an integer.
        let mut raw = Vec::new();
        encode_rings(&mut raw, &w.tens, &w.minutes);
        assert!(decode_rings(&raw[..raw.len() - 1]).is_err());
        let mut long = w.tens.clone();
        long.push(bucket(1, 1));
        let mut over = Vec::new();
        encode_rings(&mut over, &long, &[]);
        assert!(
            decode_rings(&over)
                .unwrap_err()
                .contains("buckets in a ring of 6")
        );
        let mut trailing = raw.clone();
        trailing.push(0);
        assert!(
            decode_rings(&trailing)
                .unwrap_err()
                .contains("after the rings")
        );
        assert!(decode_rings(&[0xff; 11]).unwrap_err().contains("malformed"));
    }

    #[test]
    fn connections_and_concurrency() {
        let mut t = ClientTable::new(10);
        let open = Delta {
            opened: true,
            ..Default::default()
        };
        let close = Delta {
            closed: true,
            ..Default::default()
        };
        t.apply("a", &open, now(1));
        t.apply("a", &open, now(2));
        t.apply("a", &close, now(3));
        t.apply("a", &open, now(4));
        let c = &t.clients["a"];
        assert_eq!(c.totals().connections, 3);
        assert_eq!(c.open_connections(), 2);
        assert_eq!(c.peak_open_connections(), 2);
    }

    #[test]
    fn regular_requests_have_low_cv() {
        let mut g = Gaps::default();
        for i in 0..10 {
            g.request(1_000_000_000 + i * 100_000_000);
        }
        assert_eq!(g.n, 9);
        assert!((g.mean_ms().expect("mean") - 100.0).abs() < 1e-6);
        assert!(g.cv().expect("cv") < 1e-9);
        let mut irregular = Gaps::default();
        for ts in [1, 2, 50, 51, 400, 401, 2000] {
            irregular.request(ts * 1_000_000);
        }
        assert!(irregular.cv().expect("cv") > 1.0);
    }

    #[test]
    fn bounded_table_keeps_heavy_clients_exact_and_counts_the_rest() {
        let mut t = ClientTable::new(10);
        for heavy in 0..5 {
            t.apply(&format!("heavy{heavy}"), &bytes(1_000_000), now(1));
        }
        let mut expected_total = Counts::default();
        for heavy in 0..5 {
            expected_total += t.clients[&format!("heavy{heavy}")].totals();
        }
        for light in 0..1000 {
            let d = bytes(10);
            expected_total += d.counts;
            t.apply(&format!("light{light}"), &d, now(2));
        }
        assert!(t.clients.len() <= 11, "bound holds: {}", t.clients.len());
        for heavy in 0..5 {
            assert_eq!(
                t.clients[&format!("heavy{heavy}")].totals().bytes_in,
                1_000_000
            );
        }
        assert!(t.folded.clients >= 989);
        assert_eq!(
            t.grand_total(),
            expected_total,
            "nothing lost: exact + folded"
        );
    }

    #[test]
    fn active_clients_are_folded_last() {
        let mut t = ClientTable::new(2);
        let open = Delta {
            opened: true,
            ..Default::default()
        };
        t.apply("active", &open, now(1));
        for light in 0..10 {
            t.apply(&format!("idle{light}"), &bytes(10), now(2));
        }
        assert!(
            t.clients.contains_key("active"),
            "a client with an open connection stays"
        );
        assert_eq!(t.clients["active"].totals().connections, 1);
    }

    /// The stack-formatted keys are exactly the text the tables always used.
    #[test]
    fn keys_match_display_and_the_group_format() {
        let reference_group = |ip: IpAddr, p4: u8, p6: u8| match ip {
            IpAddr::V4(a) => {
                let p = p4.min(32);
                let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
                format!("{}/{p}", std::net::Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let p = p6.min(128);
                let mask = if p == 0 { 0 } else { u128::MAX << (128 - p) };
                format!("{}/{p}", std::net::Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        let mut ips: Vec<IpAddr> = [
            "0.0.0.0",
            "255.255.255.255",
            "1.2.3.4",
            "10.0.100.9",
            "127.20.39.250",
            "::",
            "::1",
            "2001:db8::1",
            "::ffff:1.2.3.4",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "fe80::1:2:3:4",
        ]
        .iter()
        .map(|s| s.parse().expect("ip"))
        .collect();
        // Every octet value in every position, and a spread of addresses.
        for v in 0..=255u8 {
            ips.push(IpAddr::V4(std::net::Ipv4Addr::new(v, 255 - v, v / 3, v)));
        }
        let mut x: u32 = 0x9e37_79b9;
        for _ in 0..2000 {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ips.push(IpAddr::V4(std::net::Ipv4Addr::from(x)));
            ips.push(IpAddr::V4(std::net::Ipv4Addr::from(x % 1000)));
        }
        for ip in ips {
            assert_eq!(Key::address(ip).as_str(), ip.to_string());
            for (p4, p6) in [(24, 56), (0, 0), (32, 128), (8, 64), (200, 200)] {
                assert_eq!(
                    Key::group(ip, p4, p6).as_str(),
                    reference_group(ip, p4, p6),
                    "{ip} /{p4} /{p6}"
                );
            }
        }
    }

    #[test]
    fn groups() {
        assert_eq!(
            group_of("10.1.2.3".parse().expect("ip"), 24, 56),
            "10.1.2.0/24"
        );
        assert_eq!(
            group_of("2001:db8:1:2ff::1".parse().expect("ip"), 24, 56),
            "2001:db8:1:200::/56"
        );
        assert_eq!(
            group_of("10.1.2.3".parse().expect("ip"), 0, 56),
            "0.0.0.0/0"
        );
    }
}
