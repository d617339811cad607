//! Rings: many modest keys that behave alike and share infrastructure or timing, with a
//! combined volume of extraction scale even when every member is far below any per-key
//! limit (a "hydra" of accounts).
//!
//! Members are API identities, and addresses that carry no identity (where request heads are
//! not visible). A member is harvesting over the last hour (>= 10 requests, replies at least
//! as large as requests and on average at least `ring_min_reply_tokens` estimated tokens, at
//! least 10 minutes old) and still active (a request in the last 10 minutes). The reply floor
//! keeps out load-balancer health checks: several monitors in one network polling every few
//! seconds are persistent, alike and, counted by their ~150-byte `200 OK` heads alone, pull
//! a few thousand "tokens" a minute together, yet carry no model output. Members are linked when their mean request and reply sizes over the hour match
//! (within one 15% step of a log scale, chained) and they share
//!
//! - a start: first seen within 3 minutes of each other (an orchestrator starting its
//!   accounts). Keys first seen in the detector's first 5 minutes are left out: at a cold
//!   start every client "starts" at once; or
//! - a network (the /24 or /56 of their latest source), when each is also persistent (active
//!   in >= 80% of the minutes of the hour it was seen) and they come from at least two
//!   addresses: people behind one NAT pause, an account farm does not; and identities all
//!   behind one address are a shared egress, judged per identity.
//!
//! A ring alerts when it has `ring_min_members` members and together they pulled
//! `ring_tokens_per_minute` estimated output tokens a minute over the last 10 minutes: a set
//! of people who happen to look alike pulls what people read, not extraction volume.
//!
//! Alerts carry the ring (`explain.ring`): members, what they share, combined volume and the
//! heaviest member's share. The ring key is its basis (`net:<group>` or `sync:<minute of the
//! window's start>`) and its earliest member, stable while the ring runs.
//!
//! The rule runs in two steps: `harvest` turns the eligible keys of one aggregate into
//! self-contained `Candidate`s, `find_among` links candidates into rings. On one host (and a
//! lone collector) both run over the same aggregate; a collector group runs `harvest` in each
//! partition and `find_among` once over the union, so a ring spread over partitions is found
//! as a whole.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};

use super::{
    alert::{Crossed, Evidence, RingInfo, WindowEvidence},
    signals::{self, IdentitiesBehind, SignalConfig},
};
use crate::model::{
    aggregate::{Aggregator, ClientStats, Now, Window},
    keys::By,
};

/// Log-scale step of the size match (15%).
const SHAPE_STEP: f64 = 0.139_761_942; // ln(1.15)
/// A synchronized start: first seen within this span.
const SYNC_SPAN_MS: u64 = 180_000;
/// Keys first seen this soon after the detector started are not judged by their start.
const COLD_START_MS: u64 = 300_000;
/// Members listed in an alert.
const MAX_LISTED: usize = 100;
/// Members the synchronized-start sweep may visit in one evaluation (summed over the windows
/// it links). Its cost grows with the candidates times the members of a window; past this it
/// stops, and the evaluation says it is incomplete (nothing resolved on it) instead of
/// holding the detector for seconds: candidates may be chosen by a hostile agent.
pub const MAX_LINK_WORK: usize = 2_000_000;

/// An eligible key, with everything the linking step needs (so it can travel between
/// collectors).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub key: String,
    /// The key's kind (`identity` or `address`).
    pub kind: String,
    pub first_seen_ms: u64,
    /// The size match's log-scale cell of (mean request, mean reply) over the hour.
    pub cell: (i64, i64),
    /// The network of its latest source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub source: Option<IpAddr>,
    pub tokens_10m: f64,
    pub persistent: bool,
    /// Its counters for the ring's evidence (left out where the aggregate is at hand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Evidence>,
}

/// The rings of one evaluation, and whether it looked at every candidate (when not, open
/// ring alerts are kept, not resolved).
pub struct Found {
    pub rings: Vec<Ring>,
    pub complete: bool,
}

/// A ring found in one evaluation.
pub struct Ring {
    pub key: String,
    pub info: RingInfo,
    pub evidence: Evidence,
    pub crossed: Vec<Crossed>,
}

/// Union-find over member indices.
struct Sets(Vec<usize>);

impl Sets {
    fn new(n: usize) -> Self {
        Self((0..n).collect())
    }

    fn find(&mut self, mut i: usize) -> usize {
        while self.0[i] != i {
            self.0[i] = self.0[self.0[i]];
            i = self.0[i];
        }
        i
    }

    fn join(&mut self, a: usize, b: usize) {
        let (a, b) = (self.find(a), self.find(b));
        if a != b {
            self.0[a] = b;
        }
    }
}

/// The latest source address of an identity (the address itself for address keys).
fn latest_source(by: By, key: &str, c: &ClientStats) -> Option<IpAddr> {
    match by {
        By::Identity => c
            .source_seen_s()
            .iter()
            .max_by_key(|(_, t)| *t)
            .map(|(ip, _)| *ip),
        _ => key.parse().ok(),
    }
}

fn eligible(
    agg: &Aggregator,
    by: By,
    key: &str,
    c: &ClientStats,
    cfg: &SignalConfig,
    now: Now,
) -> Option<Candidate> {
    let t = c.windows().get(now.secs(), Window::OneHour);
    let ten = c.windows().get(now.secs(), Window::TenMinutes);
    let age_ms = now.unix_ms.saturating_sub(c.first_seen_ms());
    if t.requests < 10 || ten.requests == 0 || age_ms < 10 * 60_000 || t.bytes_out < t.bytes_in {
        return None;
    }
    if signals::est_tokens(&t) < cfg.ring_min_reply_tokens * t.requests as f64 {
        return None;
    }
    let req = signals::request_bytes(&t).max(1.0);
    let rep = signals::reply_bytes(&t).max(1.0);
    let cell = (
        (req.ln() / SHAPE_STEP).floor() as i64,
        (rep.ln() / SHAPE_STEP).floor() as i64,
    );
    let source = latest_source(by, key, c);
    Some(Candidate {
        key: key.to_owned(),
        kind: by.name().to_owned(),
        first_seen_ms: c.first_seen_ms(),
        cell,
        group: source.map(|ip| agg.group(ip)),
        source,
        tokens_10m: signals::est_tokens(&ten),
        persistent: signals::duty(c, now, Window::OneHour) >= 0.8,
        evidence: None,
    })
}

/// Components of the members in `idx` linked by matching shape (adjacent cells).
fn shape_components(members: &[Candidate], idx: &[usize]) -> Vec<Vec<usize>> {
    let mut by_cell: HashMap<(i64, i64), Vec<usize>> = HashMap::new();
    for (pos, &i) in idx.iter().enumerate() {
        by_cell.entry(members[i].cell).or_default().push(pos);
    }
    let mut sets = Sets::new(idx.len());
    for (cell, here) in &by_cell {
        for w in here.windows(2) {
            sets.join(w[0], w[1]);
        }
        for (di, dj) in [(0, 1), (1, -1), (1, 0), (1, 1)] {
            if let Some(there) = by_cell.get(&(cell.0 + di, cell.1 + dj)) {
                sets.join(here[0], there[0]);
            }
        }
    }
    let mut comps: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (pos, &i) in idx.iter().enumerate() {
        comps.entry(sets.find(pos)).or_default().push(i);
    }
    comps.into_values().collect()
}

/// Rings among the keys of one aggregate.
pub fn find(
    agg: &Aggregator,
    behind: &IdentitiesBehind,
    allowed: &dyn Fn(By, &str) -> bool,
    cfg: &SignalConfig,
    started_ms: u64,
    now: Now,
) -> Found {
    let members = harvest(agg, behind, allowed, cfg, now);
    // Evidence only for the members of rings found (rare), straight from the aggregate.
    let evidence = |m: &Candidate| {
        By::parse(&m.kind)
            .and_then(|by| agg.table(by).clients.get(&m.key))
            .map(|c| Evidence::of(c, now))
            .unwrap_or_default()
    };
    find_among(&members, &evidence, cfg, started_ms)
}

/// The eligible keys of one aggregate, allow-listed ones left out.
pub fn harvest(
    agg: &Aggregator,
    behind: &IdentitiesBehind,
    allowed: &dyn Fn(By, &str) -> bool,
    cfg: &SignalConfig,
    now: Now,
) -> Vec<Candidate> {
    let mut members = Vec::new();
    // Every key each evaluation, as the rules' walk: paced the same way.
    let mut pace = crate::pace::Pace::new();
    for (key, c) in &agg.identities.clients {
        pace.step();
        if let Some(m) = eligible(agg, By::Identity, key, c, cfg, now) {
            members.push(m);
        }
    }
    for (key, c) in &agg.addresses.clients {
        pace.step();
        // Addresses with identities are judged through them.
        if behind.of(By::Address, key) == 0
            && c.last_identity().is_none()
            && let Some(m) = eligible(agg, By::Address, key, c, cfg, now)
        {
            members.push(m);
        }
    }
    members.retain(|m| By::parse(&m.kind).is_none_or(|by| !allowed(by, &m.key)));
    members
}

/// Rings among candidates: by synchronized start, then by shared network among those left,
/// each split by shape. `evidence` gives a member's counters.
pub fn find_among(
    members: &[Candidate],
    evidence: &dyn Fn(&Candidate) -> Evidence,
    cfg: &SignalConfig,
    started_ms: u64,
) -> Found {
    let mut rings = Vec::new();
    let mut taken = vec![false; members.len()];
    let mut work = 0usize;
    let mut complete = true;

    // Synchronized starts: every window of SYNC_SPAN_MS starting at a member's start.
    let mut order: Vec<usize> = (0..members.len())
        .filter(|&i| members[i].first_seen_ms >= started_ms.saturating_add(COLD_START_MS))
        .collect();
    order.sort_by_key(|&i| members[i].first_seen_ms);
    let mut end = 0;
    // The window end of the last run judged: a later anchor with the same end sees a subset
    // of that run (less what became rings), whose components are parts of components that
    // were too small or too light, so too small or too light themselves (both criteria only
    // grow with members): skipping it changes nothing, and makes a crowd started together
    // cost one pass instead of one per member.
    let mut judged_end = None;
    for (pos, &anchor) in order.iter().enumerate() {
        if taken[anchor] {
            continue;
        }
        let first = members[anchor].first_seen_ms;
        end = end.max(pos);
        while end + 1 < order.len() && members[order[end + 1]].first_seen_ms <= first + SYNC_SPAN_MS
        {
            end += 1;
        }
        if judged_end == Some(end) {
            continue;
        }
        judged_end = Some(end);
        work += end + 1 - pos;
        if work > MAX_LINK_WORK {
            complete = false;
            break;
        }
        let run: Vec<usize> = order[pos..=end]
            .iter()
            .copied()
            .filter(|&i| !taken[i])
            .collect();
        if run.len() < cfg.ring_min_members {
            continue;
        }
        for comp in shape_components(members, &run) {
            let spread = comp
                .iter()
                .map(|&i| members[i].first_seen_ms)
                .max()
                .unwrap_or(first)
                - first;
            let basis = format!("sync:{}", first / 60_000 * 60);
            let shared = format!("first seen within {} s of each other", spread / 1000);
            if let Some(r) = ring(members, &comp, basis, shared, evidence, cfg) {
                for &i in &comp {
                    taken[i] = true;
                }
                rings.push(r);
            }
        }
    }

    // Shared networks, among members not already in a ring.
    let mut by_group: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, m) in members.iter().enumerate() {
        if let Some(g) = &m.group
            && !taken[i]
            && m.persistent
        {
            by_group.entry(g.as_str()).or_default().push(i);
        }
    }
    for (group, idx) in by_group {
        if idx.len() < cfg.ring_min_members {
            continue;
        }
        for comp in shape_components(members, &idx) {
            // Identities all behind one address are a shared egress (an office NAT), judged
            // per identity as the score rule does (score.rs): people from one population
            // converge to the same mean sizes within an hour, so "alike and persistent behind
            // one address" is what a busy office looks like too. A network ring spans
            // addresses.
            if distinct_sources(members, &comp) < 2 {
                continue;
            }
            let shared = format!("network {group}, each active in >= 80% of its minutes");
            if let Some(r) = ring(
                members,
                &comp,
                format!("net:{group}"),
                shared,
                evidence,
                cfg,
            ) {
                rings.push(r);
            }
        }
    }
    Found { rings, complete }
}

/// Distinct source addresses of the members in `comp` (a member whose source is unknown
/// counts as one of its own).
fn distinct_sources(members: &[Candidate], comp: &[usize]) -> usize {
    let mut known: Vec<IpAddr> = comp.iter().filter_map(|&i| members[i].source).collect();
    let unknown = comp.len() - known.len();
    known.sort_unstable();
    known.dedup();
    known.len() + unknown
}

/// The ring of `comp`, if it is big enough and pulls enough together.
fn ring(
    members: &[Candidate],
    comp: &[usize],
    basis: String,
    shared: String,
    evidence_of: &dyn Fn(&Candidate) -> Evidence,
    cfg: &SignalConfig,
) -> Option<Ring> {
    if comp.len() < cfg.ring_min_members {
        return None;
    }
    let tokens: f64 = comp.iter().map(|&i| members[i].tokens_10m).sum();
    let per_minute = tokens / 10.0;
    if per_minute < cfg.ring_tokens_per_minute {
        return None;
    }
    let mut sorted: Vec<&Candidate> = comp.iter().map(|&i| &members[i]).collect();
    // Ties broken by key: the same ring lists the same members wherever it is found.
    sorted.sort_by(|a, b| {
        b.tokens_10m
            .total_cmp(&a.tokens_10m)
            .then_with(|| a.key.cmp(&b.key))
    });
    let mut evidence = Evidence::default();
    let mut sources = std::collections::BTreeSet::new();
    for m in &sorted {
        let e = m.evidence.unwrap_or_else(|| evidence_of(m));
        for (sum, one) in evidence.windows.iter_mut().zip(e.windows) {
            *sum = WindowEvidence {
                requests: sum.requests + one.requests,
                bytes_in: sum.bytes_in + one.bytes_in,
                bytes_out: sum.bytes_out + one.bytes_out,
                events_out: sum.events_out + one.events_out,
            };
        }
        evidence.requests_total += e.requests_total;
        evidence.bytes_out_total += e.bytes_out_total;
        evidence.connections_total += e.connections_total;
        evidence.open_connections += e.open_connections;
        evidence.peak_open_connections += e.peak_open_connections;
        if let Some(ip) = m.source {
            sources.insert(ip);
        }
    }
    evidence.distinct_addresses = sources.len() as f64;
    let ten = evidence.window(Window::TenMinutes);
    let (req_mean, rep_mean) = (
        ten.bytes_in / ten.requests.max(1.0),
        ten.bytes_out / ten.requests.max(1.0),
    );
    let kinds: std::collections::BTreeSet<&str> = sorted.iter().map(|m| m.kind.as_str()).collect();
    let info = RingInfo {
        member_kind: kinds.into_iter().collect::<Vec<_>>().join(","),
        members: sorted
            .iter()
            .take(MAX_LISTED)
            .map(|m| m.key.clone())
            .collect(),
        member_count: sorted.len() as u64,
        shared: vec![
            shared,
            format!(
                "requests of ~{req_mean:.0} bytes and replies of ~{rep_mean:.0} bytes (within 15%)"
            ),
            format!("{} source addresses", sources.len()),
        ],
        requests_10m: ten.requests as u64,
        bytes_out_10m: ten.bytes_out as u64,
        tokens_per_minute: (per_minute * 10.0).round() / 10.0,
        max_member_share: sorted.first().map_or(0.0, |m| {
            (m.tokens_10m / tokens.max(1.0) * 1000.0).round() / 1000.0
        }),
    };
    let crossed = vec![
        Crossed {
            metric: "ring_members".into(),
            window: Some("10m".into()),
            op: ">=".into(),
            threshold: cfg.ring_min_members as f64,
            value: sorted.len() as f64,
        },
        Crossed {
            metric: "ring_output_tokens_per_minute".into(),
            window: Some("10m".into()),
            op: ">=".into(),
            threshold: cfg.ring_tokens_per_minute,
            value: info.tokens_per_minute,
        },
    ];
    // Two rings can share a basis (two farms started in the same window, two shapes in one
    // network): the earliest member, which stays while the ring runs, tells them apart.
    let earliest = sorted
        .iter()
        .min_by_key(|m| (m.first_seen_ms, &m.key))
        .map_or("", |m| m.key.as_str());
    Some(Ring {
        key: format!("{basis}:{earliest}"),
        info,
        evidence,
        crossed,
    })
}
