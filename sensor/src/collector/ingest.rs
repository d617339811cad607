//! What the collector accepts: bearer tokens (by role and name) and batches (decompressed
//! within a bound, parsed strictly, every field checked). Anything else is refused with an
//! error that says what is wrong, and counted; nothing an agent sends can crash the collector.

use std::{io::Read as _, net::IpAddr, path::Path};

use sha2::{Digest as _, Sha256};

use crate::ship::{
    Batch, MAX_CLIENTS_PER_SUMMARY, MAX_KEY_LEN, MAX_RECORDS_PER_BATCH, PERIOD_SECS, Payload,
    WIRE_VERSION, valid_name,
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
}

/// Decompresses (gzip, or identity) at most `max_bytes` and parses and validates the batch.
pub fn decode(
    body: &[u8],
    encoding: Option<&str>,
    max_bytes: usize,
    agent: &str,
    now_s: u64,
) -> Result<Batch, IngestError> {
    let json = match encoding.map(str::trim) {
        None | Some("identity") => body.to_vec(),
        Some(e) if e.eq_ignore_ascii_case("gzip") => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(body)
                .take(max_bytes as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| IngestError::Malformed(format!("gzip: {e}")))?;
            if out.len() > max_bytes {
                return Err(IngestError::TooLarge(format!(
                    "the batch decompresses to more than {max_bytes} bytes"
                )));
            }
            out
        }
        Some(other) => {
            return Err(IngestError::Malformed(format!(
                "Content-Encoding `{other}` is not supported (gzip or identity)"
            )));
        }
    };
    let batch: Batch =
        serde_json::from_slice(&json).map_err(|e| IngestError::Malformed(format!("batch: {e}")))?;
    validate(&batch, agent, now_s)?;
    Ok(batch)
}

fn valid_text(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control)
}

/// How far an agent's clock may run ahead of the collector's: a period further in the future
/// would hold back every later summary of that agent (periods are merged once, in order).
pub const MAX_CLOCK_AHEAD_SECS: u64 = 86_400;

/// Checks everything the merge relies on; errors name the record and field.
pub fn validate(b: &Batch, agent: &str, now_s: u64) -> Result<(), IngestError> {
    let bad = |m: String| Err(IngestError::Malformed(m));
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
                    || crate::model::keys::By::parse(&alert.key_kind).is_none()
                    || alert.conditions.len() > 64
                {
                    return bad(format!(
                        "{}: id, rule_id, key_kind or key out of bounds",
                        at("alert")
                    ));
                }
            }
            Payload::Summary(s) => {
                if s.period_s != PERIOD_SECS || s.start_s % PERIOD_SECS != 0 {
                    return bad(format!(
                        "{}: periods are {PERIOD_SECS} s, starting at multiples of {PERIOD_SECS}",
                        at("summary.start_s")
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
                for kind in s.rest.keys() {
                    if crate::model::keys::By::parse(kind).is_none() {
                        return bad(format!("{}: unknown key kind `{kind}`", at("summary.rest")));
                    }
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
                }
            }
        }
    }
    Ok(())
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
                        },
                    )
                },
                ShipRecord {
                    seq: 2,
                    ..ShipRecord::alert(
                        "host-a",
                        &crate::detect::AlertEvent {
                            event: crate::detect::EventKind::Open,
                            alert: crate::sinks::tests::alert("address", "10.1.2.3"),
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
        // Unknown fields are refused (strict parsing).
        let json = br#"{"version":1,"agent":"host-a","stream":"ab","records":[],"extra":1}"#;
        assert!(decode(json, None, 1 << 20, "host-a", NOW).is_err());
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
