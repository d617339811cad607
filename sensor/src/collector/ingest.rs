//! What the collector accepts: bearer tokens (by role and name) and batches (decompressed
//! within a bound, parsed strictly, every field checked). Anything else is refused with an
//! error that says what is wrong, and counted; nothing an agent sends can crash the collector.

use std::{collections::BTreeMap, io::Read as _, net::IpAddr, path::Path};

use sha2::{Digest as _, Sha256};

use crate::model::aggregate::Counts;
use crate::ship::{
    Batch, MAX_CLIENTS_PER_SUMMARY, MAX_KEY_LEN, MAX_RECORDS_PER_BATCH, PERIOD_SECS, Payload,
    WIRE_VERSION, sketch, valid_name,
};

// --- tokens ---------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// May POST batches under its name.
    Agent,
    /// May read the fleet view.
    Reader,
}

#[derive(Debug, Clone)]
pub struct Token {
    pub role: Role,
    pub name: String,
    /// SHA-256 of the token: the raw token is not kept once the file is read.
    hash: [u8; 32],
}

#[derive(Debug, Default)]
pub struct Tokens {
    tokens: Vec<Token>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{file}:{line}: {message}")]
pub struct TokensError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Tokens {
    pub fn parse(text: &str, file: &str) -> Result<Self, TokensError> {
        let mut tokens = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |message: String| TokensError {
                file: file.to_owned(),
                line: i + 1,
                message,
            };
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [role, name, secret] = fields[..] else {
                return Err(err("expected `agent|reader <name> <token>`".into()));
            };
            let role = match role {
                "agent" => Role::Agent,
                "reader" => Role::Reader,
                other => return Err(err(format!("role `{other}` is not agent or reader"))),
            };
            if !valid_name(name) {
                return Err(err(format!(
                    "name `{name}`: 1-128 letters, digits, -, _ and ."
                )));
            }
            let hash = match secret.strip_prefix("sha256:") {
                Some(hex) => parse_hex32(hex)
                    .ok_or_else(|| err("sha256: must be followed by 64 hex digits".into()))?,
                None if secret.len() < 16 => {
                    return Err(err("tokens must be at least 16 characters".into()));
                }
                None => sha256(secret.as_bytes()),
            };
            if tokens.iter().any(|t: &Token| t.hash == hash) {
                return Err(err("the same token is listed twice".into()));
            }
            if tokens
                .iter()
                .any(|t: &Token| t.role == role && t.name == name)
            {
                return Err(err(format!("{name} is listed twice")));
            }
            tokens.push(Token {
                role,
                name: name.to_owned(),
                hash,
            });
        }
        Ok(Self { tokens })
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read tokens file {}: {e}", path.display()))?;
        let tokens = Self::parse(&text, &path.display().to_string())?;
        if tokens.tokens.is_empty() {
            anyhow::bail!("tokens file {} lists no token", path.display());
        }
        Ok(tokens)
    }

    /// The token `presented` is, compared in constant time against every entry.
    pub fn check(&self, presented: &str) -> Option<&Token> {
        let hash = sha256(presented.as_bytes());
        let mut found = None;
        for t in &self.tokens {
            let diff = t
                .hash
                .iter()
                .zip(hash.iter())
                .fold(0u8, |d, (a, b)| d | (a ^ b));
            if diff == 0 {
                found = Some(t);
            }
        }
        found
    }
}

pub use crate::net::secrets::bearer;

// --- batches --------------------------------------------------------------------------------

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IngestError {
    /// HTTP 413.
    #[error("{0}")]
    TooLarge(String),
    /// HTTP 400.
    #[error("{0}")]
    Malformed(String),
    /// HTTP 403: the batch claims another agent's name.
    #[error("{0}")]
    WrongAgent(String),
    /// HTTP 400, counted apart: well-formed, but no real host could have sent it (more bytes
    /// than a link carries in the period, alert times from the far future ...).
    #[error("{0}")]
    Implausible(String),
    /// HTTP 503: the collector's memory budget for requests in flight is spent; retry later.
    #[error("{0}")]
    Busy(String),
}

/// Decompresses (gzip, or identity) at most `max_bytes` and parses and validates the batch.
pub fn decode(
    body: &[u8],
    encoding: Option<&str>,
    max_bytes: usize,
    agent: &str,
    now_s: u64,
) -> Result<Batch, IngestError> {
    decode_reserving(body, encoding, max_bytes, &mut |_| true, agent, now_s)
}

/// Decompression works in steps of this many bytes, each reserved before it is held.
const INFLATE_STEP: usize = 64 * 1024;

/// As [`decode`], reserving every decompressed step with `reserve` first (the collector's
/// budget shared by all requests in flight): a refusal stops decompression at once.
pub fn decode_reserving(
    body: &[u8],
    encoding: Option<&str>,
    max_bytes: usize,
    reserve: &mut dyn FnMut(usize) -> bool,
    agent: &str,
    now_s: u64,
) -> Result<Batch, IngestError> {
    let inflated;
    let json = match encoding.map(str::trim) {
        None | Some("identity") => body,
        Some(e) if e.eq_ignore_ascii_case("gzip") => {
            inflated = inflate(body, max_bytes, reserve)?;
            &inflated[..]
        }
        Some(other) => {
            return Err(IngestError::Malformed(format!(
                "Content-Encoding `{other}` is not supported (gzip or identity)"
            )));
        }
    };
    let mut batch: Batch =
        serde_json::from_slice(json).map_err(|e| IngestError::Malformed(format!("batch: {e}")))?;
    validate(&batch, agent, now_s)?;
    sanitize(&mut batch, agent);
    Ok(batch)
}

fn inflate(
    body: &[u8],
    max_bytes: usize,
    reserve: &mut dyn FnMut(usize) -> bool,
) -> Result<Vec<u8>, IngestError> {
    let mut out = Vec::new();
    let mut gz = flate2::read::GzDecoder::new(body);
    loop {
        if out.len() > max_bytes {
            return Err(IngestError::TooLarge(format!(
                "the batch decompresses to more than {max_bytes} bytes"
            )));
        }
        let step = INFLATE_STEP.min(max_bytes + 1 - out.len());
        // Grow the buffer by doubling (linear copying in all), and reserve what it will
        // allocate before it does.
        let cap = out.capacity();
        if cap < out.len() + step {
            let new_cap = (cap * 2).max(out.len() + step).min(max_bytes + 1);
            if !reserve(new_cap - cap) {
                return Err(IngestError::Busy(
                    "the collector is decompressing too much at once; retry later".into(),
                ));
            }
            out.reserve_exact(new_cap - out.len());
        }
        let before = out.len();
        (&mut gz)
            .take(step as u64)
            .read_to_end(&mut out)
            .map_err(|e| IngestError::Malformed(format!("gzip: {e}")))?;
        if out.len() - before < step {
            return Ok(out);
        }
    }
}

fn valid_text(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control)
}

// --- plausibility ----------------------------------------------------------------------------

pub use crate::ship::{MAX_BYTES_PER_PERIOD, MAX_EVENTS_PER_PERIOD};
/// Connections open at once on one host (TCP's port space times a generous fan-in).
pub const MAX_OPEN_CONNECTIONS: u64 = 1 << 24;

use crate::ship::implausible_counts;

/// How far an agent's clock may run ahead of the collector's: a period further in the future
/// would hold back every later summary of that agent (periods are merged once, in order).
pub const MAX_CLOCK_AHEAD_SECS: u64 = 86_400;

/// Checks everything the merge relies on; errors name the record and field.
pub fn validate(b: &Batch, agent: &str, now_s: u64) -> Result<(), IngestError> {
    let bad = |m: String| Err(IngestError::Malformed(m));
    let implausible = |m: String| Err(IngestError::Implausible(format!("implausible: {m}")));
    if b.version != WIRE_VERSION {
        return bad(format!(
            "version {} is not supported (this collector speaks {WIRE_VERSION})",
            b.version
        ));
    }
    if b.agent != agent {
        return Err(IngestError::WrongAgent(format!(
            "the token is registered for `{agent}`, the batch says `{}`",
            b.agent
        )));
    }
    if b.stream.is_empty()
        || b.stream.len() > 64
        || !b.stream.bytes().all(|c| c.is_ascii_hexdigit())
    {
        return bad("stream: 1-64 hex digits".into());
    }
    if b.records.len() > MAX_RECORDS_PER_BATCH {
        return Err(IngestError::TooLarge(format!(
            "{} records (at most {MAX_RECORDS_PER_BATCH} per batch)",
            b.records.len()
        )));
    }
    let prefix = format!("{agent}:");
    let mut last_seq = 0;
    for (i, r) in b.records.iter().enumerate() {
        let at = |field: &str| format!("records[{i}].{field}");
        if !valid_text(&r.id, 512) || !r.id.starts_with(&prefix) {
            return bad(format!(
                "{}: must start with `{prefix}` (1-512 characters)",
                at("id")
            ));
        }
        if r.seq == 0 || r.seq <= last_seq {
            return bad(format!("{}: positions must increase from 1", at("seq")));
        }
        last_seq = r.seq;
        match &r.payload {
            Payload::Alert { event, alert } => {
                if !["open", "update", "resolve"].contains(&event.as_str()) {
                    return bad(format!(
                        "{}: `{event}` is not open, update or resolve",
                        at("event")
                    ));
                }
                if !valid_text(&alert.id, 512)
                    || !valid_text(&alert.rule_id, 128)
                    || !valid_text(&alert.key, MAX_KEY_LEN)
                    || !(crate::model::keys::By::parse(&alert.key_kind).is_some()
                        || alert.key_kind == "ring")
                    || alert.conditions.len() > 64
                    || !explain_in_bounds(alert.explain.as_ref())
                {
                    return bad(format!(
                        "{}: id, rule_id, key_kind or key out of bounds",
                        at("alert")
                    ));
                }
                // As far ahead as a summary period may end.
                let limit_ms = now_s
                    .saturating_add(MAX_CLOCK_AHEAD_SECS + PERIOD_SECS)
                    .saturating_mul(1000);
                if alert.first_seen_ms > alert.last_seen_ms || alert.last_seen_ms > limit_ms {
                    return implausible(format!(
                        "{}: first_seen_ms after last_seen_ms, or more than a day ahead",
                        at("alert")
                    ));
                }
                let finite = BTreeMap::<String, f64>::from(alert.evidence)
                    .values()
                    .all(|v| v.is_finite())
                    && alert
                        .conditions
                        .iter()
                        .all(|c| c.value.is_finite() && c.threshold.is_finite())
                    && alert.explain.as_ref().is_none_or(explain_finite);
                if !finite {
                    return implausible(format!("{}: numbers must be finite", at("alert")));
                }
            }
            Payload::Summary(s) => {
                if !crate::ship::early::valid_span(s.start_s, s.period_s) {
                    return bad(format!(
                        "{}: periods are {PERIOD_SECS} s, starting at multiples of \
                         {PERIOD_SECS}, or one's early part (from its start) or rest (to its end)",
                        at("summary.start_s")
                    ));
                }
                // An early part names its alerting clients and nothing else, with what they did
                // in its period so far (its counts may have begun before its span: a client's
                // first part carries the period from its start), so a period's parts together
                // claim at most a few times a period's bound, of the agent's own traffic.
                let early = crate::ship::early::is_early(s);
                let secs = if early {
                    s.start_s % PERIOD_SECS + s.period_s
                } else {
                    PERIOD_SECS
                };
                if early && (!s.rest.is_empty() || s.clients.len() > crate::ship::early::MAX_KEYS) {
                    return bad(format!(
                        "{}: an early part carries at most {} clients and no rest",
                        at("summary"),
                        crate::ship::early::MAX_KEYS
                    ));
                }
                if s.start_s > now_s + MAX_CLOCK_AHEAD_SECS {
                    return bad(format!(
                        "{}: {} is more than a day ahead of the collector's clock ({now_s})",
                        at("summary.start_s"),
                        s.start_s
                    ));
                }
                if s.clients.len() > MAX_CLIENTS_PER_SUMMARY {
                    return Err(IngestError::TooLarge(format!(
                        "{}: more than {MAX_CLIENTS_PER_SUMMARY} clients",
                        at("summary.clients")
                    )));
                }
                // Per key kind, the period's sum over the host (clients and the rest): each
                // client may be plausible while their sum is not.
                let mut per_kind: BTreeMap<&str, Counts> = BTreeMap::new();
                for (kind, counts) in &s.rest {
                    if crate::model::keys::By::parse(kind).is_none() {
                        return bad(format!("{}: unknown key kind `{kind}`", at("summary.rest")));
                    }
                    if let Some(f) = implausible_counts(counts, secs) {
                        return implausible(format!("{}.{f}", at(&format!("summary.rest.{kind}"))));
                    }
                    *per_kind.entry(kind).or_default() += *counts;
                }
                // Partitioned shipping: rows of this summary merged by other partitions. Not
                // merged here, but part of what the sketch covers (and of the period's sum).
                for (kind, counts) in &s.elsewhere {
                    if crate::model::keys::By::parse(kind).is_none() {
                        return bad(format!(
                            "{}: unknown key kind `{kind}`",
                            at("summary.elsewhere")
                        ));
                    }
                    if let Some(f) = implausible_counts(counts, secs) {
                        return implausible(format!(
                            "{}.{f}",
                            at(&format!("summary.elsewhere.{kind}"))
                        ));
                    }
                    *per_kind.entry(kind).or_default() += *counts;
                }
                for (j, c) in s.clients.iter().enumerate() {
                    let at = |f: &str| format!("records[{i}].summary.clients[{j}].{f}");
                    let Some(by) = crate::model::keys::By::parse(&c.by) else {
                        return bad(format!("{}: unknown key kind `{}`", at("by"), c.by));
                    };
                    if !valid_text(&c.key, MAX_KEY_LEN) {
                        return bad(format!(
                            "{}: 1-{MAX_KEY_LEN} printable characters",
                            at("key")
                        ));
                    }
                    let must_be_ip = matches!(
                        by,
                        crate::model::keys::By::Address | crate::model::keys::By::Forwarded
                    );
                    if must_be_ip && c.key.parse::<IpAddr>().is_err() {
                        return bad(format!("{}: `{}` is not an IP address", at("key"), c.key));
                    }
                    if c.identity
                        .as_deref()
                        .is_some_and(|s| !valid_text(s, MAX_KEY_LEN))
                    {
                        return bad(format!("{}: out of bounds", at("identity")));
                    }
                    if c.forwarded
                        .as_deref()
                        .is_some_and(|s| s.parse::<IpAddr>().is_err())
                    {
                        return bad(format!("{}: not an IP address", at("forwarded")));
                    }
                    if let Some(f) = implausible_counts(&c.counts, secs) {
                        return implausible(format!("{}.{f}", at("counts")));
                    }
                    if c.open_connections > MAX_OPEN_CONNECTIONS {
                        return implausible(at("open_connections"));
                    }
                    *per_kind.entry(c.by.as_str()).or_default() += c.counts;
                }
                for (kind, sum) in &per_kind {
                    if let Some(f) = implausible_counts(sum, secs) {
                        return implausible(format!(
                            "{}: the period's {f} over all `{kind}` clients",
                            at("summary")
                        ));
                    }
                }
                if s.sketch_key.len() > 16 || !s.sketch_key.bytes().all(|c| c.is_ascii_hexdigit()) {
                    return bad(format!(
                        "{}: at most 16 hex digits",
                        at("summary.sketch_key")
                    ));
                }
                for (kind, cells) in &s.sketch {
                    let at = at(&format!("summary.sketch.{kind}"));
                    let sum = per_kind.get(kind.as_str()).copied().unwrap_or_default();
                    if let Err(m) = sketch_matches(kind, cells, &sum) {
                        return bad(format!("{at}: {m}"));
                    }
                }
            }
        }
    }
    Ok(())
}

/// A summary's sketch of one key kind: known kind, cells in range and in order, and every
/// row summing to the kind's shipped counts (each client adds its counts to one cell per
/// row), so a sketch can only redistribute what the summary already claims.
fn sketch_matches(kind: &str, cells: &[sketch::Cell], sum: &Counts) -> Result<(), String> {
    if crate::model::keys::By::parse(kind).is_none() {
        return Err(format!("unknown key kind `{kind}`"));
    }
    if !cells.windows(2).all(|w| w[0].0 < w[1].0)
        || cells.last().is_some_and(|c| c.0 >= sketch::CELLS)
    {
        return Err(format!(
            "cells must be in increasing order below {}",
            sketch::CELLS
        ));
    }
    let mut rows = [(0u64, 0u64); sketch::ROWS];
    for &(i, r, b) in cells {
        let row = &mut rows[i as usize / sketch::WIDTH];
        row.0 = row.0.saturating_add(r);
        row.1 = row.1.saturating_add(b);
    }
    let want = (sum.requests, sum.bytes_in.saturating_add(sum.bytes_out));
    if rows.iter().any(|row| *row != want) {
        return Err(format!(
            "every row must sum to the kind's requests and bytes {want:?}"
        ));
    }
    Ok(())
}

/// Most signals a score explains, members a ring lists, and ties it names: what an agent's
/// detection produces, with room to spare.
const MAX_EXPLAIN_PARTS: usize = 32;
const MAX_RING_MEMBERS: usize = 100;
const MAX_RING_SHARED: usize = 16;

fn explain_in_bounds(e: Option<&crate::detect::Explanation>) -> bool {
    let Some(e) = e else { return true };
    e.parts.len() <= MAX_EXPLAIN_PARTS
        && e.ring.as_ref().is_none_or(|r| {
            r.members.len() <= MAX_RING_MEMBERS
                && r.shared.len() <= MAX_RING_SHARED
                && r.members.iter().all(|m| valid_text(m, MAX_KEY_LEN))
                && r.member_count >= r.members.len() as u64
        })
}

fn explain_finite(e: &crate::detect::Explanation) -> bool {
    e.score.is_finite()
        && e.parts
            .iter()
            .all(|p| p.value.is_finite() && p.points.is_finite())
        && e.ring
            .as_ref()
            .is_none_or(|r| r.tokens_per_minute.is_finite() && r.max_member_share.is_finite())
}

// --- sanitising ----------------------------------------------------------------------------

/// Longest free text kept from an agent's alert (rule names, technique names ...).
pub const MAX_TEXT_LEN: usize = 256;

/// `s` without control characters or Unicode line and paragraph separators (each becomes a
/// space), cut to `max` bytes on a character boundary. Such characters are how text forges
/// a second line or field in a SIEM format whose receiver splits on them; no legitimate
/// alert text carries them.
pub fn clean_text(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars() {
        let c = if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
            ' '
        } else {
            c
        };
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

/// One of `allowed`, or `fallback`: fields with a fixed vocabulary keep it.
fn one_of(s: &str, allowed: &[&str], fallback: &str) -> String {
    if allowed.contains(&s) { s } else { fallback }.to_owned()
}

/// Rewrites an accepted batch's agent-written text so that it can neither impersonate
/// another host nor forge SIEM fields: each alert's `host` becomes the authenticated agent
/// name (the token's), fixed-vocabulary fields are checked (mode, state and evidence are
/// typed by the wire format itself), and free text is cleaned.
/// Runs before the batch is journaled, so a replay forwards the same cleaned alert.
pub fn sanitize(b: &mut Batch, agent: &str) {
    for r in &mut b.records {
        let Payload::Alert { alert, .. } = &mut r.payload else {
            continue;
        };
        let a = &mut **alert;
        a.host = agent.to_owned();
        a.rule_name = clean_text(&a.rule_name, MAX_TEXT_LEN);
        a.severity = one_of(
            &a.severity,
            &["low", "medium", "high", "critical"],
            "medium",
        );
        a.window = one_of(&a.window, &["1m", "10m", "1h", "total"], "total").into();
        a.first_seen = clean_text(&a.first_seen, 64);
        a.last_seen = clean_text(&a.last_seen, 64);
        a.resolved_at = a.resolved_at.as_deref().map(|t| clean_text(t, 64));
        a.technique.framework = clean_text(&a.technique.framework, 64).into();
        a.technique.id = clean_text(&a.technique.id, 64).into();
        a.technique.name = clean_text(&a.technique.name, MAX_TEXT_LEN).into();
        for c in &mut a.conditions {
            c.metric = clean_text(&c.metric, 64).into();
            c.op = clean_text(&c.op, 8).into();
            c.window = c.window.as_deref().map(|w| clean_text(w, 16).into());
        }
        if let Some(e) = &mut a.explain {
            for p in &mut e.parts {
                p.signal = clean_text(&p.signal, 64).into();
                p.why = clean_text(&p.why, MAX_TEXT_LEN);
            }
            if let Some(r) = &mut e.ring {
                r.member_kind = clean_text(&r.member_kind, 64);
                for m in &mut r.members {
                    *m = clean_text(m, MAX_KEY_LEN);
                }
                for s in &mut r.shared {
                    *s = clean_text(s, MAX_TEXT_LEN);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::aggregate::Counts,
        ship::{ClientDelta, ShipRecord, Summary, encode},
    };

    const NOW: u64 = 1_800_000_100;

    fn batch() -> Batch {
        Batch {
            version: WIRE_VERSION,
            agent: "host-a".into(),
            stream: "0123abcd".into(),
            records: vec![
                ShipRecord {
                    seq: 1,
                    ..ShipRecord::summary(
                        "host-a",
                        Summary {
                            start_s: 1_800_000_000,
                            period_s: 10,
                            clients: vec![ClientDelta {
                                by: "address".into(),
                                key: "10.1.2.3".into(),
                                counts: Counts {
                                    requests: 4,
                                    bytes_in: 100,
                                    bytes_out: 4000,
                                    connections: 1,
                                    events_out: 0,
                                },
                                open_connections: 1,
                                identity: None,
                                forwarded: None,
                            }],
                            rest: Default::default(),
                            sketch: Default::default(),
                            sketch_key: String::new(),
                            elsewhere: Default::default(),
                        },
                    )
                },
                ShipRecord {
                    seq: 2,
                    ..ShipRecord::alert(
                        "host-a",
                        &crate::detect::AlertEvent {
                            event: crate::detect::EventKind::Open,
                            alert: crate::detect::Alert {
                                // The collector sets it to the token's agent name.
                                host: "host-a".into(),
                                ..crate::sinks::tests::alert("address", "10.1.2.3")
                            }
                            .into(),
                        },
                    )
                },
            ],
        }
    }

    #[test]
    fn valid_batches_decode() {
        let b = batch();
        let gz = encode(&b).expect("encode");
        assert_eq!(
            decode(&gz, Some("gzip"), 1 << 20, "host-a", NOW),
            Ok(b.clone())
        );
        let json = serde_json::to_vec(&b).expect("json");
        assert_eq!(decode(&json, None, 1 << 20, "host-a", NOW), Ok(b));
    }

    /// The sketch may only redistribute what the summary claims: each row sums to the kind's
    /// requests and bytes, cells in order and in range.
    #[test]
    fn sketches_must_match_the_summary() {
        let with = |cells: Vec<sketch::Cell>| {
            let mut b = batch();
            if let Payload::Summary(s) = &mut b.records[0].payload {
                s.sketch.insert("address".into(), cells);
            }
            validate(&b, "host-a", NOW)
        };
        let w = sketch::WIDTH as u32;
        let good: Vec<sketch::Cell> = (0..sketch::ROWS as u32)
            .map(|r| (r * w + 5, 4, 4100))
            .collect();
        assert_eq!(with(good.clone()), Ok(()));
        let mut split = good.clone();
        split[0] = (1, 1, 100);
        split.insert(1, (2, 3, 4000));
        assert_eq!(with(split), Ok(()), "a row may spread over cells");
        let mut inflated = good.clone();
        inflated[3].2 = 1_000_000;
        assert!(matches!(with(inflated), Err(IngestError::Malformed(m)) if m.contains("sum")));
        let mut outside = good.clone();
        outside[3].0 = sketch::CELLS;
        assert!(with(outside).is_err());
        let mut unordered = good;
        unordered.swap(0, 1);
        assert!(with(unordered).is_err());
    }

    /// What `summarize` builds passes validation for every key kind: identities, forwarded
    /// clients, clients with only an open connection, sampled and cut rows.
    #[test]
    fn real_summaries_with_sketches_validate() {
        use crate::model::aggregate::ExchangeKeys;
        use crate::model::aggregate::{Aggregator, Delta, Now};
        let t = NOW / 10 * 10 - 10;
        let at = Now {
            unix_ms: (t + 2) * 1000,
        };
        let mut agg = Aggregator::new(1000, 24, 56);
        for i in 0..40u8 {
            let ip = std::net::IpAddr::from([10, 0, i / 8, i]);
            let d = Delta {
                counts: Counts {
                    requests: 1 + u64::from(i),
                    bytes_in: 100 * u64::from(i),
                    bytes_out: 1000 * u64::from(i),
                    connections: u64::from(i % 2),
                    events_out: u64::from(i % 3),
                },
                ..Delta::default()
            };
            agg.apply(ip, &d, at);
            let keys = ExchangeKeys {
                identity: Some(format!("k-{:012x}", i % 7)),
                forwarded: (i % 3 == 0).then(|| std::net::IpAddr::from([192, 0, 2, i])),
            };
            agg.apply_exchange(&keys, &d, at);
        }
        agg.table_mut(crate::model::keys::By::Address)
            .set_open("10.0.0.0", 1);
        let hot = std::sync::Arc::<sketch::Hot>::default();
        hot.set_supported();
        let sample = crate::ship::Sample::new(&[3u8; 32], 20, 5, hot);
        let s = crate::ship::summarize(&agg, t, 3, &sample, None).expect("summary");
        assert_eq!(
            s.sketch.len(),
            4,
            "every kind sketched: {:?}",
            s.sketch.keys()
        );
        let mut b = batch();
        b.records[0].payload = Payload::Summary(s);
        assert_eq!(validate(&b, "host-a", NOW), Ok(()));
        // Split into partitions, every part validates: partition 0's sketch covers the
        // rows shipped elsewhere through `elsewhere`, without which it would not sum.
        let parts = crate::ship::partition::split(&b.records, 4);
        let mut rows = 0;
        for (i, records) in parts.into_iter().enumerate() {
            let part = Batch {
                records,
                ..b.clone()
            };
            assert_eq!(validate(&part, "host-a", NOW), Ok(()), "partition {i}");
            if let Payload::Summary(s) = &part.records[0].payload {
                rows += s.clients.len();
                if i == 0 {
                    assert!(!s.elsewhere.is_empty());
                    let mut without = part.clone();
                    if let Payload::Summary(s) = &mut without.records[0].payload {
                        s.elsewhere.clear();
                    }
                    assert!(
                        matches!(validate(&without, "host-a", NOW), Err(IngestError::Malformed(m)) if m.contains("sum"))
                    );
                }
            }
        }
        let Payload::Summary(whole) = &b.records[0].payload else {
            panic!("a summary")
        };
        assert_eq!(rows, whole.clients.len());
    }

    #[test]
    fn bad_batches_are_refused_with_reasons() {
        let gz = encode(&batch()).expect("encode");
        assert!(matches!(
            decode(&gz, Some("gzip"), 1 << 20, "host-b", NOW),
            Err(IngestError::WrongAgent(_))
        ));
        assert!(matches!(
            decode(&gz, Some("gzip"), 64, "host-a", NOW),
            Err(IngestError::TooLarge(_))
        ));
        assert!(matches!(
            decode(&gz, Some("br"), 1 << 20, "host-a", NOW),
            Err(IngestError::Malformed(_))
        ));
        let mut b = batch();
        b.records[1].seq = 1;
        assert!(
            matches!(validate(&b, "host-a", NOW), Err(IngestError::Malformed(m)) if m.contains("records[1].seq"))
        );
        let mut b = batch();
        if let Payload::Summary(s) = &mut b.records[0].payload {
            s.clients[0].key = "not-an-ip".into();
        }
        assert!(
            matches!(validate(&b, "host-a", NOW), Err(IngestError::Malformed(m)) if m.contains("clients[0].key"))
        );
        let mut b = batch();
        b.records[0].id = "host-b:summary:1".into();
        assert!(validate(&b, "host-a", NOW).is_err());
        let mut b = batch();
        b.version = 2;
        assert!(validate(&b, "host-a", NOW).is_err());
        // A period more than a day ahead of the collector's clock.
        let b = batch();
        assert!(validate(&b, "host-a", 1_800_000_000 - MAX_CLOCK_AHEAD_SECS).is_ok());
        assert!(matches!(
            validate(&b, "host-a", 1_800_000_000 - MAX_CLOCK_AHEAD_SECS - 1),
            Err(IngestError::Malformed(m)) if m.contains("ahead")
        ));
        // A period, its early part or its rest; nothing across periods or in their middle.
        for (start, len, ok) in [
            (1_800_000_000, 10, true),
            (1_800_000_000, 4, true),
            (1_800_000_004, 6, true),
            (1_800_000_004, 10, false),
            (1_800_000_004, 3, true),
            (1_800_000_004, 7, false),
            (1_800_000_000, 0, false),
        ] {
            let mut b = batch();
            if let Payload::Summary(s) = &mut b.records[0].payload {
                (s.start_s, s.period_s) = (start, len);
            }
            b.records[0].id = format!("host-a:summary:{start}");
            let r = validate(&b, "host-a", NOW);
            assert_eq!(r.is_ok(), ok, "{start} {len}: {r:?}");
            if !ok {
                assert!(
                    matches!(r, Err(IngestError::Malformed(m)) if m.contains("summary.start_s"))
                );
            }
        }
        // An early part with a remainder, or more clients than an agent names in one.
        let early = |f: &dyn Fn(&mut Summary)| {
            let mut b = batch();
            if let Payload::Summary(s) = &mut b.records[0].payload {
                s.period_s = 4;
                f(s);
            }
            validate(&b, "host-a", NOW)
        };
        assert!(early(&|_| {}).is_ok());
        let r = early(&|s| {
            s.rest.insert("address".into(), s.clients[0].counts);
        });
        assert!(matches!(r, Err(IngestError::Malformed(m)) if m.contains("early part")));
        // Its counts are bounded by its seconds: 4 s of the period's bound, not all 10.
        let r = early(&|s| {
            s.clients[0].counts.bytes_out = MAX_BYTES_PER_PERIOD / 10 * 4;
        });
        assert!(r.is_ok(), "{r:?}");
        let r = early(&|s| {
            s.clients[0].counts.bytes_out = MAX_BYTES_PER_PERIOD / 10 * 4 + 1;
        });
        assert!(
            matches!(&r, Err(IngestError::Implausible(m)) if m.contains("bytes_out")),
            "{r:?}"
        );
        let r = early(&|s| {
            let c = s.clients[0].clone();
            s.clients = (0..=crate::ship::early::MAX_KEYS)
                .map(|i| ClientDelta {
                    key: format!("10.1.{}.{}", i / 256, i % 256),
                    ..c.clone()
                })
                .collect();
        });
        assert!(matches!(r, Err(IngestError::Malformed(m)) if m.contains("early part")));
        // Unknown fields are refused (strict parsing).
        let json = br#"{"version":1,"agent":"host-a","stream":"ab","records":[],"extra":1}"#;
        assert!(decode(json, None, 1 << 20, "host-a", NOW).is_err());
    }

    fn alert_mut(b: &mut Batch) -> &mut crate::detect::Alert {
        match &mut b.records[1].payload {
            Payload::Alert { alert, .. } => alert,
            Payload::Summary(_) => unreachable!("record 1 is an alert"),
        }
    }

    #[test]
    fn ring_alerts_and_explanations_pass_bounded_and_cleaned() {
        use crate::detect::alert::{Explanation, Part, RingInfo};
        let ring = RingInfo {
            member_kind: "identity".into(),
            members: vec!["key-a".into(), "key-b".into()],
            member_count: 2,
            shared: vec!["network 10.1.2.0/24\n<13>forged".into()],
            requests_10m: 10,
            bytes_out_10m: 1000,
            tokens_per_minute: 40.0,
            max_member_share: 0.5,
        };
        let mut b = batch();
        let a = alert_mut(&mut b);
        a.key_kind = "ring".into();
        a.key = "ring:key-a".into();
        a.explain = Some(Explanation {
            score: 6.0,
            parts: vec![Part {
                signal: "output".into(),
                value: 1.0,
                points: 6.0,
                why: "long\u{2028}outputs".into(),
            }],
            ring: Some(ring.clone()),
        });
        // An agent's ring alert is a valid record (it once made the whole batch a 400).
        assert_eq!(validate(&b, "host-a", NOW), Ok(()));
        sanitize(&mut b, "host-a");
        let e = alert_mut(&mut b).explain.clone().expect("explain kept");
        assert_eq!(e.parts[0].why, "long outputs");
        let r = e.ring.expect("ring kept");
        assert!(!r.shared[0].contains('\n'), "{:?}", r.shared);

        // More members than any agent lists, a count below the list, and NaN are refused.
        let mut b = batch();
        alert_mut(&mut b).explain = Some(Explanation {
            ring: Some(RingInfo {
                members: vec!["k".into(); MAX_RING_MEMBERS + 1],
                member_count: u64::MAX,
                ..ring.clone()
            }),
            ..Explanation::default()
        });
        assert!(validate(&b, "host-a", NOW).is_err());
        let mut b = batch();
        alert_mut(&mut b).explain = Some(Explanation {
            ring: Some(RingInfo {
                member_count: 1,
                ..ring.clone()
            }),
            ..Explanation::default()
        });
        assert!(validate(&b, "host-a", NOW).is_err());
        let mut b = batch();
        alert_mut(&mut b).explain = Some(Explanation {
            score: f64::NAN,
            ..Explanation::default()
        });
        assert!(matches!(
            validate(&b, "host-a", NOW),
            Err(IngestError::Implausible(_))
        ));
        // Other key kinds stay refused.
        let mut b = batch();
        alert_mut(&mut b).key_kind = "rings".into();
        assert!(validate(&b, "host-a", NOW).is_err());
    }

    fn summary_counts(b: &mut Batch) -> &mut ClientDelta {
        match &mut b.records[0].payload {
            Payload::Summary(s) => &mut s.clients[0],
            Payload::Alert { .. } => unreachable!("record 0 is a summary"),
        }
    }

    #[test]
    fn implausible_counters_are_refused_and_named() {
        // 2^64 - 1000 bytes: once added with wrapping arithmetic, it zeroed another host's
        // client. No link carries that in 10 s.
        let mut b = batch();
        summary_counts(&mut b).counts.bytes_out = u64::MAX - 1000;
        assert!(matches!(
            validate(&b, "host-a", NOW),
            Err(IngestError::Implausible(m)) if m.contains("clients[0].counts.bytes_out")
        ));
        let mut b = batch();
        summary_counts(&mut b).counts.requests = MAX_EVENTS_PER_PERIOD + 1;
        assert!(matches!(
            validate(&b, "host-a", NOW),
            Err(IngestError::Implausible(_))
        ));
        let mut b = batch();
        summary_counts(&mut b).open_connections = MAX_OPEN_CONNECTIONS + 1;
        assert!(matches!(
            validate(&b, "host-a", NOW),
            Err(IngestError::Implausible(_))
        ));
        // At the bound: accepted. Each client plausible but the host's sum not: refused.
        let mut b = batch();
        summary_counts(&mut b).counts.bytes_in = MAX_BYTES_PER_PERIOD;
        assert_eq!(validate(&b, "host-a", NOW), Ok(()));
        if let Payload::Summary(s) = &mut b.records[0].payload {
            s.rest.insert(
                "address".into(),
                Counts {
                    bytes_in: 1,
                    ..Counts::default()
                },
            );
        }
        assert!(matches!(
            validate(&b, "host-a", NOW),
            Err(IngestError::Implausible(m)) if m.contains("over all `address` clients")
        ));
        // Alerts: times from the far future, last before first, non-finite evidence.
        let mut b = batch();
        if let Payload::Alert { alert, .. } = &mut b.records[1].payload {
            alert.last_seen_ms = (NOW + 2 * MAX_CLOCK_AHEAD_SECS) * 1000;
        }
        assert!(matches!(
            validate(&b, "host-a", NOW),
            Err(IngestError::Implausible(_))
        ));
        let mut b = batch();
        if let Payload::Alert { alert, .. } = &mut b.records[1].payload {
            alert.evidence.requests_total = f64::NAN;
        }
        assert!(matches!(
            validate(&b, "host-a", NOW),
            Err(IngestError::Implausible(_))
        ));
    }

    #[test]
    fn alerts_take_the_token_name_and_lose_forging_characters() {
        let mut b = batch();
        if let Payload::Alert { alert, .. } = &mut b.records[1].payload {
            alert.host = "host-b".into();
            alert.rule_name = "Flood\r\n<13>1 - host-b sensor - - CEF:0|x\u{2028}|y\u{0}".into();
            alert.severity = "high\nsev=1".into();
            alert.window = "1m|x".into();
            alert.technique.name = "t\u{85}u".into();
        }
        let json = serde_json::to_vec(&b).expect("json");
        let b = decode(&json, None, 1 << 20, "host-a", NOW).expect("accepted");
        let Payload::Alert { alert, .. } = &b.records[1].payload else {
            panic!("alert")
        };
        assert_eq!(
            alert.host, "host-a",
            "the authenticated name, not the claimed one"
        );
        assert_eq!(
            alert.rule_name,
            "Flood  <13>1 - host-b sensor - - CEF:0|x |y "
        );
        assert_eq!(
            (alert.severity.as_str(), alert.window.as_ref()),
            ("medium", "total")
        );
        assert_eq!(alert.technique.name, "t u");
        assert_eq!(clean_text("ééé", 5), "éé", "cut on a character boundary");
    }

    #[test]
    fn decompression_stops_when_the_shared_budget_is_spent() {
        let b = batch();
        let gz = encode(&b).expect("encode");
        let mut reserved = 0usize;
        let mut within = |n: usize| {
            reserved += n;
            reserved <= 1 << 20
        };
        assert_eq!(
            decode_reserving(&gz, Some("gzip"), 1 << 20, &mut within, "host-a", NOW),
            Ok(b.clone())
        );
        assert!(reserved > 0, "decompressed bytes are reserved");
        assert!(matches!(
            decode_reserving(&gz, Some("gzip"), 1 << 20, &mut |_| false, "host-a", NOW),
            Err(IngestError::Busy(_))
        ));
        // A bomb reserves no more than its bound (plus one step) before it is refused.
        let zeros = vec![b' '; 4 << 20];
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut gz, &zeros).expect("write");
        let gz = gz.finish().expect("finish");
        let mut reserved = 0usize;
        let r = decode_reserving(
            &gz,
            Some("gzip"),
            1 << 20,
            &mut |n| {
                reserved += n;
                true
            },
            "host-a",
            NOW,
        );
        assert!(matches!(r, Err(IngestError::TooLarge(_))));
        assert!(reserved <= (1 << 20) + 1, "{reserved}");
    }

    #[test]
    fn zip_bombs_stop_at_the_bound() {
        let zeros = vec![b' '; 4 << 20];
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut gz, &zeros).expect("write");
        let gz = gz.finish().expect("finish");
        assert!(gz.len() < 64 * 1024);
        assert!(matches!(
            decode(&gz, Some("gzip"), 1 << 20, "host-a", NOW),
            Err(IngestError::TooLarge(_))
        ));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Arbitrary bytes, and valid batches with bytes flipped, never panic the decoder.
        #[test]
        fn fuzzed_bodies_never_panic(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            flips in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 0..8),
            gzip in proptest::prelude::any::<bool>(),
        ) {
            let _ = decode(&raw, Some("gzip"), 1 << 20, "host-a", NOW);
            let _ = decode(&raw, None, 1 << 20, "host-a", NOW);
            let mut body = if gzip {
                encode(&batch()).expect("encode")
            } else {
                serde_json::to_vec(&batch()).expect("json")
            };
            for (at, x) in flips {
                let n = body.len();
                body[at % n] ^= x;
            }
            let _ = decode(&body, gzip.then_some("gzip"), 1 << 20, "host-a", NOW);
        }
    }

    #[test]
    fn tokens_by_role_hashed_and_checked() {
        let hashed = hex::encode(sha256(b"reader-token-0123456789"));
        let text =
            format!("# comment\nagent host-a agent-token-0123456789\nreader soc sha256:{hashed}\n");
        let t = Tokens::parse(&text, "tokens").expect("parse");
        let a = t.check("agent-token-0123456789").expect("agent");
        assert_eq!((a.role, a.name.as_str()), (Role::Agent, "host-a"));
        let r = t.check("reader-token-0123456789").expect("reader");
        assert_eq!(r.role, Role::Reader);
        assert!(t.check("agent-token-012345678").is_none());
        assert!(t.check("").is_none());
        let e = Tokens::parse("agent host-a short\n", "tokens").unwrap_err();
        assert_eq!(e.line, 1);
        let e = Tokens::parse("\nadmin x 0123456789abcdef0\n", "tokens").unwrap_err();
        assert_eq!(e.line, 2);
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(None), None);
    }
}
