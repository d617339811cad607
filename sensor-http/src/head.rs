//! Bounded parsing of an HTTP/1.x request head (RFC 9112 request line and field lines).
//!
//! Built to be hard to shake off: blank lines before the request line are skipped (RFC 9112
//! 2.2, as nginx does), field lines a server would ignore are skipped and counted instead of
//! voiding the head, and a head with more lines than examined keeps what was seen.

use std::{borrow::Cow, fmt};

/// Field lines examined at most; a head with more keeps the fields before the cut
/// (`RequestHead::fields_cut`).
pub const MAX_HEADERS: usize = 4096;

/// Credential carriers one policy may name.
pub const MAX_CARRIERS: usize = 16;

/// What the sensor needs from a request head. Borrowed from the input buffer; credentials are
/// only exposed to be hashed (`Debug` never shows them).
#[derive(Clone, PartialEq, Eq)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    /// The request target (path and query).
    pub path: &'a str,
    pub host: Option<&'a str>,
    /// The field lines examined (without the request line and the blank line).
    fields: &'a [u8],
    /// The buffer ended before the blank line closing the head; fields after the cut are
    /// missing.
    pub truncated: bool,
    /// More than `MAX_HEADERS` field lines: the fields after the limit were not examined.
    pub fields_cut: bool,
    /// Field lines that were not well-formed (no colon, a bad name or value, obs-fold): skipped,
    /// as servers that ignore invalid header lines do.
    pub skipped_fields: u32,
}

impl fmt::Debug for RequestHead<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestHead")
            .field("method", &self.method)
            .field("path", &self.path.split('?').next())
            .field("host", &self.host)
            .field("fields", &"<redacted>")
            .field("truncated", &self.truncated)
            .field("fields_cut", &self.fields_cut)
            .field("skipped_fields", &self.skipped_fields)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum HeadError {
    #[error("empty or incomplete request line")]
    IncompleteRequestLine,
    #[error("malformed request line")]
    RequestLine,
    #[error("unsupported HTTP version")]
    Version,
}

/// RFC 9110 token characters (method and field names).
fn is_tchar(b: u8) -> bool {
    TCHAR[usize::from(b)]
}

/// `is_tchar` as a table: the agent parses every request head, field by field.
const TCHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    t
};

/// Field value characters: visible ASCII, space, tab, and obs-text (RFC 9110 5.5).
#[cfg(test)]
fn is_field_value_char(b: u8) -> bool {
    b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80
}

/// Whether every byte of `v` is a field value character: no control byte but tab, no DEL.
/// Without an early exit, so that the compiler checks many bytes at a time.
fn is_field_value(v: &[u8]) -> bool {
    v.iter().fold(true, |ok, &b| {
        ok & ((b >= 0x20 && b != 0x7f) | (b == b'\t'))
    })
}

/// Splits off the next line (without CR LF); None when no complete line remains.
#[inline]
fn next_line(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = memchr::memchr(b'\n', buf)?;
    let line = &buf[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    Some((line, &buf[end + 1..]))
}

/// `bytes` as text when every byte is ASCII. One pass: `str::from_utf8` and then `is_ascii`
/// walked each value twice, and UTF-8 validation of short strings was a tenth of the
/// parser's instructions.
fn ascii(bytes: &[u8]) -> Option<&str> {
    if !bytes.is_ascii() {
        return None;
    }
    // SAFETY: every byte is ASCII (checked above), and ASCII is valid UTF-8.
    Some(unsafe { std::str::from_utf8_unchecked(bytes) })
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// A well-formed field line's name and (trimmed) value; None for lines a server ignores.
///
/// The name is what precedes the first byte that is not a token character, which must be the
/// colon: the same line a search for the first colon followed by a check of the name accepts
/// (a colon is not a token character), in one pass over the name instead of two.
#[inline]
fn field(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = line.iter().position(|&b| !is_tchar(b))?;
    if colon == 0 || line[colon] != b':' {
        return None;
    }
    let value = trim(&line[colon + 1..]);
    is_field_value(value).then_some((&line[..colon], value))
}

/// `method SP target SP version` of a request line: a token, visible ASCII, HTTP/1.x. One pass
/// over each part: a part ends at the first byte it may not hold, which must be the space.
fn request_line(line: &[u8]) -> Result<(&[u8], &[u8]), HeadError> {
    let m = line.iter().position(|&b| !is_tchar(b));
    let Some(m) = m.filter(|&m| m > 0 && line[m] == b' ') else {
        return Err(HeadError::RequestLine);
    };
    let rest = &line[m + 1..];
    let t = rest.iter().position(|&b| !(0x21..=0x7e).contains(&b));
    let Some(t) = t.filter(|&t| t > 0 && rest[t] == b' ') else {
        return Err(HeadError::RequestLine);
    };
    let version = &rest[t + 1..];
    if version != b"HTTP/1.1" && version != b"HTTP/1.0" {
        // A fourth part is a malformed line, not another version.
        return Err(if version.contains(&b' ') {
            HeadError::RequestLine
        } else {
            HeadError::Version
        });
    }
    Ok((&line[..m], &rest[..t]))
}

/// Parses the head at the start of `buf`. Blank lines before the request line are skipped;
/// bytes after the head (a body) are ignored.
pub fn parse_head(buf: &[u8]) -> Result<RequestHead<'_>, HeadError> {
    parse_head_with(buf, |_, _| {})
}

/// `parse_head`, handing each well-formed field line examined (name, trimmed value) to
/// `visit` as it goes: the agent takes credential and forwarding from the same pass instead
/// of walking the lines again (see `HeadScan`).
pub fn parse_head_with<'a>(
    buf: &'a [u8],
    mut visit: impl FnMut(&'a [u8], &'a [u8]),
) -> Result<RequestHead<'a>, HeadError> {
    let mut buf = buf;
    while let [b'\r' | b'\n', rest @ ..] = buf {
        buf = rest;
    }
    let (line, rest) = next_line(buf).ok_or(HeadError::IncompleteRequestLine)?;
    let (method, target) = request_line(line)?;
    // Both are ASCII by `request_line`'s checks; `ascii` checks again, cheaply.
    let mut head = RequestHead {
        method: ascii(method).ok_or(HeadError::RequestLine)?,
        path: ascii(target).ok_or(HeadError::RequestLine)?,
        host: None,
        fields: &[],
        truncated: true,
        fields_cut: false,
        skipped_fields: 0,
    };
    let start = rest;
    let mut cursor = rest;
    let mut lines = 0;
    // Without a complete next line the buffer was cut inside the head: what was complete stays.
    while let Some((line, after)) = next_line(cursor) {
        if line.is_empty() {
            head.truncated = false;
            break;
        }
        if lines == MAX_HEADERS {
            head.fields_cut = true;
            break;
        }
        lines += 1;
        cursor = after;
        match field(line) {
            Some((name, value)) => {
                if name.eq_ignore_ascii_case(b"host") && head.host.is_none() {
                    head.host = ascii(value);
                }
                visit(name, value);
            }
            None => head.skipped_fields += 1,
        }
    }
    head.fields = &start[..start.len() - cursor.len()];
    Ok(head)
}

impl<'a> RequestHead<'a> {
    /// The well-formed field lines examined, in order: (name, trimmed value).
    pub fn fields(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        let mut rest = self.fields;
        std::iter::from_fn(move || {
            loop {
                let (line, after) = next_line(rest)?;
                rest = after;
                if let Some(f) = field(line) {
                    return Some(f);
                }
            }
        })
    }

    /// Every value of the forwarding header `header`, all of its lines joined in order with
    /// ", " (a proxy that appends its own line after the client's keeps the order). None when
    /// the head has no such line, and always None for a truncated or cut head: a line a
    /// proxy appended at the end may be missing, and what remains is the client's to write.
    pub fn forwarded_list(&self, header: ForwardedHeader) -> Option<String> {
        let mut fwd = ForwardedScan::new(header);
        self.fields().for_each(|(n, v)| fwd.field(n, v));
        fwd.finish(self)
    }

    /// The API credential under `policy`, to be hashed and dropped; never store it.
    pub fn credential(&self, policy: &CredentialPolicy) -> Credential<'a> {
        let mut cred = CredentialScan::new(policy);
        self.fields().for_each(|(n, v)| cred.field(n, v));
        cred.finish(self.path)
    }
}

/// Credential and forwarded list of one head from a single pass over its field lines
/// (`parse_head_with`): what `RequestHead::credential` and `RequestHead::forwarded_list` give,
/// without walking the lines three times for every request the agent sees.
pub struct HeadScan<'a, 'p> {
    cred: CredentialScan<'a, 'p>,
    fwd: ForwardedScan,
}

impl<'a, 'p> HeadScan<'a, 'p> {
    pub fn new(policy: &'p CredentialPolicy, header: ForwardedHeader) -> Self {
        Self {
            cred: CredentialScan::new(policy),
            fwd: ForwardedScan::new(header),
        }
    }

    /// One well-formed field line, in order. This and the line helpers it and the parser call
    /// are `#[inline]`: the agent's parser is in another crate, and the calls per field line
    /// were an eighth of parsing an SDK's 16-field head (callgrind).
    #[inline]
    pub fn field(&mut self, name: &'a [u8], value: &'a [u8]) {
        self.cred.field(name, value);
        self.fwd.field(name, value);
    }

    /// The credential and the forwarded list of `head`, the head the lines came from.
    pub fn finish(mut self, head: &RequestHead<'a>) -> (Credential<'a>, Option<String>) {
        (self.cred.finish(head.path), self.fwd.finish(head))
    }
}

/// Collects the lines of one forwarding header, joined in order.
struct ForwardedScan {
    name: &'static [u8],
    list: Option<String>,
}

impl ForwardedScan {
    fn new(header: ForwardedHeader) -> Self {
        Self {
            name: header.name().as_bytes(),
            list: None,
        }
    }

    #[inline]
    fn field(&mut self, name: &[u8], value: &[u8]) {
        if !name.eq_ignore_ascii_case(self.name) {
            return;
        }
        let v = String::from_utf8_lossy(value);
        match &mut self.list {
            Some(l) => {
                l.push_str(", ");
                l.push_str(&v);
            }
            None => self.list = Some(v.into_owned()),
        }
    }

    /// None for a truncated or cut head: a line a proxy appended at the end may be missing,
    /// and what remains is the client's to write.
    fn finish(self, head: &RequestHead<'_>) -> Option<String> {
        if head.truncated || head.fields_cut {
            return None;
        }
        self.list
    }
}

/// What each carrier of a policy held across a head's lines. On the stack: a policy names at
/// most `MAX_CARRIERS` (the agent's config refuses more; any beyond are ignored here).
struct CredentialScan<'a, 'p> {
    policy: &'p CredentialPolicy,
    /// One bit per length of a field name some carrier reads (`name_bit`): every other line
    /// is passed over without comparing its name to each carrier's (most lines of a head).
    names: u64,
    /// Some carrier reads the query string.
    query: bool,
    /// Some carrier saw a value in a field line.
    any: bool,
    seen: [Seen<'a>; MAX_CARRIERS],
}

/// A field name's bit in `CredentialScan::names`: names of 63 bytes or more share one.
fn name_bit(len: usize) -> u64 {
    1 << len.min(63)
}

impl<'a, 'p> CredentialScan<'a, 'p> {
    fn new(policy: &'p CredentialPolicy) -> Self {
        let (mut names, mut query) = (0, false);
        for carrier in policy.carriers.iter().take(MAX_CARRIERS) {
            match carrier {
                Carrier::Bearer | Carrier::Basic => names |= name_bit(AUTHORIZATION.len()),
                Carrier::Header(h) => names |= name_bit(h.len()),
                Carrier::Query(_) => query = true,
            }
        }
        Self {
            policy,
            names,
            query,
            any: false,
            seen: std::array::from_fn(|_| Seen::None),
        }
    }

    #[inline]
    fn field(&mut self, name: &'a [u8], value: &'a [u8]) {
        if self.names & name_bit(name.len()) == 0 {
            return;
        }
        for (carrier, seen) in self.policy.carriers.iter().zip(self.seen.iter_mut()) {
            if let Some(v) = carrier.carried_in(name, value) {
                seen.add(v);
                self.any = true;
            }
        }
    }

    /// Takes the values out of the slots: a second call would see none. Both callers own the
    /// scan and call this once (`HeadScan::finish`, `RequestHead::credential`).
    fn finish(&mut self, path: &'a str) -> Credential<'a> {
        let query = if self.query {
            memchr::memchr(b'?', path.as_bytes()).map(|q| &path[q + 1..])
        } else {
            None
        };
        if !self.any && query.is_none() {
            // Nothing any carrier could decide on (most requests without a key).
            return Credential::None;
        }
        let policy = self.policy;
        let n = policy.carriers.len().min(MAX_CARRIERS);
        if let Some(query) = query {
            for (carrier, seen) in policy.carriers.iter().zip(self.seen.iter_mut()) {
                if let Carrier::Query(param) = carrier {
                    for pair in query.split('&') {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        if percent_decode(k.as_bytes()).as_ref() == param.as_bytes() {
                            let v = percent_decode(v.as_bytes());
                            if !v.is_empty() {
                                seen.add(v);
                            }
                        }
                    }
                }
            }
        }
        let seen = self.seen.iter_mut().take(n).map(std::mem::take);
        if policy.ordered {
            // The operator named the backend's carriers in order: the first present decides.
            for s in seen {
                match s {
                    Seen::None => {}
                    Seen::One(v) => return Credential::One(v),
                    Seen::Conflict => return Credential::Ambiguous,
                }
            }
            return Credential::None;
        }
        // Any carrier may be the backend's: several that disagree are ambiguous (a client
        // could otherwise pick its own identity with a carrier the backend ignores).
        let mut found: Option<Cow<'a, [u8]>> = None;
        for s in seen {
            match s {
                Seen::None => {}
                Seen::Conflict => return Credential::Ambiguous,
                Seen::One(v) => match &found {
                    Some(f) if f.as_ref() != v.as_ref() => return Credential::Ambiguous,
                    Some(_) => {}
                    None => found = Some(v),
                },
            }
        }
        found.map_or(Credential::None, Credential::One)
    }
}

/// What a carrier held across a head's lines.
#[derive(Default)]
enum Seen<'a> {
    #[default]
    None,
    One(Cow<'a, [u8]>),
    /// Different values in several lines of one carrier.
    Conflict,
}

impl<'a> Seen<'a> {
    fn add(&mut self, v: Cow<'a, [u8]>) {
        *self = match std::mem::replace(self, Seen::None) {
            Seen::None => Seen::One(v),
            Seen::One(old) if old == v => Seen::One(old),
            _ => Seen::Conflict,
        };
    }
}

/// The credential of one request under a policy.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential<'a> {
    None,
    /// The credential bytes (a Bearer token, an API key, decoded Basic `user:password`, a
    /// decoded query value).
    One(Cow<'a, [u8]>),
    /// Carriers disagree (or one carrier repeats with different values): which one the
    /// backend uses cannot be told from the request.
    Ambiguous,
}

impl fmt::Debug for Credential<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Credential::None => "None",
            Credential::One(_) => "One(<redacted>)",
            Credential::Ambiguous => "Ambiguous",
        })
    }
}

/// Where a backend takes its API credential from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Carrier {
    /// `Authorization: Bearer <token>`.
    Bearer,
    /// `Authorization: Basic <base64>` (the decoded `user:password` is the credential).
    Basic,
    /// A header whose whole value is the key (lower-case name): `x-api-key`, `api-key`, ...
    Header(String),
    /// A query parameter of the request target (`?key=...`), percent-decoded.
    Query(String),
}

#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
#[error(
    "not a credential carrier: use \"authorization\" (Bearer), \"basic\", a header name, or \
     \"query:NAME\""
)]
pub struct CarrierError;

impl std::str::FromStr for Carrier {
    type Err = CarrierError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        if let Some(param) = lower.strip_prefix("query:") {
            return (!param.is_empty() && param.bytes().all(is_tchar))
                .then(|| Carrier::Query(param.to_owned()))
                .ok_or(CarrierError);
        }
        match lower.as_str() {
            "authorization" | "bearer" => Ok(Carrier::Bearer),
            "basic" => Ok(Carrier::Basic),
            name if !name.is_empty() && name.bytes().all(is_tchar) => {
                Ok(Carrier::Header(name.to_owned()))
            }
            _ => Err(CarrierError),
        }
    }
}

impl fmt::Display for Carrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Carrier::Bearer => f.write_str("authorization"),
            Carrier::Basic => f.write_str("basic"),
            Carrier::Header(h) => f.write_str(h),
            Carrier::Query(q) => write!(f, "query:{q}"),
        }
    }
}

impl Carrier {
    /// The credential this field line carries for this carrier, if any.
    #[inline]
    fn carried_in<'a>(&self, name: &[u8], value: &'a [u8]) -> Option<Cow<'a, [u8]>> {
        match self {
            Carrier::Bearer | Carrier::Basic if name.eq_ignore_ascii_case(AUTHORIZATION) => {
                let (scheme, rest) = split_scheme(value)?;
                let rest = trim(rest);
                if rest.is_empty() {
                    return None;
                }
                match self {
                    Carrier::Bearer if scheme.eq_ignore_ascii_case(b"bearer") => {
                        Some(Cow::Borrowed(rest))
                    }
                    Carrier::Basic if scheme.eq_ignore_ascii_case(b"basic") => {
                        base64_decode(rest).map(Cow::Owned)
                    }
                    _ => None,
                }
            }
            Carrier::Header(h) if name.eq_ignore_ascii_case(h.as_bytes()) => {
                (!value.is_empty()).then_some(Cow::Borrowed(value))
            }
            _ => None,
        }
    }
}

/// The field the `Bearer` and `Basic` carriers read.
const AUTHORIZATION: &[u8] = b"authorization";

/// `scheme SP rest` of an Authorization value.
fn split_scheme(value: &[u8]) -> Option<(&[u8], &[u8])> {
    let sp = value.iter().position(|&b| b == b' ' || b == b'\t')?;
    Some((&value[..sp], &value[sp + 1..]))
}

/// Percent-decodes `%XX` (other bytes as they are): the same key spelled with escapes is the
/// same key.
fn percent_decode(s: &[u8]) -> Cow<'_, [u8]> {
    if !s.contains(&b'%') {
        return Cow::Borrowed(s);
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%'
            && let (Some(&a), Some(&b)) = (s.get(i + 1), s.get(i + 2))
            && let (Some(a), Some(b)) = (hex(a), hex(b))
        {
            out.push(a * 16 + b);
            i += 3;
            continue;
        }
        out.push(s[i]);
        i += 1;
    }
    Cow::Owned(out)
}

/// Decodes standard base64 (padding optional); None when it is not base64. Decoding makes the
/// credential canonical: spellings that decode alike (unused trailing bits) are one key.
fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    let s = s.strip_suffix(b"==").or(s.strip_suffix(b"=")).unwrap_or(s);
    let val = |b: u8| -> Option<u32> {
        Some(match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32)
    };
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut acc = 0u32;
        for (i, &b) in chunk.iter().enumerate() {
            acc |= val(b)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

/// Which carriers a backend's credential may come in, and how to choose between them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialPolicy {
    pub carriers: Vec<Carrier>,
    /// The operator listed the backend's carriers in order of precedence: the first present
    /// decides. Otherwise (the default) any carrier may be the backend's, and carriers that
    /// disagree make the request ambiguous rather than letting the client choose.
    pub ordered: bool,
}

impl Default for CredentialPolicy {
    fn default() -> Self {
        Self {
            carriers: vec![
                Carrier::Bearer,
                Carrier::Basic,
                Carrier::Header("x-api-key".into()),
                Carrier::Header("api-key".into()),
                Carrier::Header("x-goog-api-key".into()),
                Carrier::Query("key".into()),
            ],
            ordered: false,
        }
    }
}

/// The header forwarded client addresses are read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, ...`.
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for=proxy1`.
    Forwarded,
}

impl ForwardedHeader {
    pub fn name(self) -> &'static str {
        match self {
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::Forwarded => "forwarded",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tables and the vectorizable check say what RFC 9110's definitions say, byte for byte.
    #[test]
    fn character_classes_match_the_rfc_definitions() {
        for b in 0..=255u8 {
            let tchar = b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            assert_eq!(is_tchar(b), tchar, "{b:#x}");
            assert_eq!(is_field_value(&[b]), is_field_value_char(b), "{b:#x}");
            assert_eq!(
                is_field_value(&[b'a', b, b'z']),
                is_field_value_char(b),
                "{b:#x}"
            );
        }
        assert!(is_field_value(b""));
    }

    fn one(c: Credential<'_>) -> Vec<u8> {
        match c {
            Credential::One(v) => v.into_owned(),
            other => panic!("expected one credential, got {other:?}"),
        }
    }

    fn ordered(list: &[&str]) -> CredentialPolicy {
        CredentialPolicy {
            carriers: list.iter().map(|s| s.parse().expect("carrier")).collect(),
            ordered: true,
        }
    }

    #[test]
    fn openai_style_request() {
        let raw = b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.example\r\n\
            Authorization: Bearer sk-test-123\r\nX-Forwarded-For: 203.0.113.9, 10.0.0.2\r\n\
            Content-Type: application/json\r\n\r\n{\"model\":\"m\"}";
        let h = parse_head(raw).expect("parses");
        assert_eq!(h.method, "POST");
        assert_eq!(h.path, "/v1/chat/completions");
        assert_eq!(h.host, Some("api.example"));
        assert_eq!(
            h.forwarded_list(ForwardedHeader::XForwardedFor).as_deref(),
            Some("203.0.113.9, 10.0.0.2")
        );
        let policy = CredentialPolicy::default();
        assert_eq!(one(h.credential(&policy)), b"sk-test-123");
        assert!(!h.truncated);
        assert!(!format!("{h:?}").contains("sk-test"));
        assert!(!format!("{:?}", h.credential(&policy)).contains("sk-test"));
    }

    #[test]
    fn leading_blank_lines_are_skipped() {
        let h = parse_head(b"\r\n\r\n\nGET /x HTTP/1.1\r\nx-api-key: k\r\n\r\n").expect("ok");
        assert_eq!(h.path, "/x");
        assert_eq!(one(h.credential(&CredentialPolicy::default())), b"k");
    }

    #[test]
    fn carriers_are_recognised() {
        let p = CredentialPolicy::default();
        for (raw, key) in [
            (&b"GET / HTTP/1.1\r\nx-api-key: a1\r\n\r\n"[..], &b"a1"[..]),
            (b"GET / HTTP/1.1\r\napi-key: a2\r\n\r\n", b"a2"),
            (b"GET / HTTP/1.1\r\nX-Goog-Api-Key: a3\r\n\r\n", b"a3"),
            (b"GET /v1/m?alt=json&key=a%344 HTTP/1.1\r\n\r\n", b"a44"),
            (
                b"GET / HTTP/1.1\r\nAuthorization: Basic dXNlcjpzZWNyZXQ=\r\n\r\n",
                b"user:secret",
            ),
            (
                b"GET / HTTP/1.1\r\nauthorization: bearer  tok \r\n\r\n",
                b"tok",
            ),
        ] {
            let h = parse_head(raw).expect("parses");
            assert_eq!(
                one(h.credential(&p)),
                key,
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        let h = parse_head(b"GET / HTTP/1.1\r\nAuthorization: Bearer \r\n\r\n").expect("ok");
        assert_eq!(h.credential(&p), Credential::None);
        // Basic spellings that decode alike are one key.
        let a = parse_head(b"GET / HTTP/1.1\r\nAuthorization: Basic YQ==\r\n\r\n").expect("ok");
        let b = parse_head(b"GET / HTTP/1.1\r\nAuthorization: Basic YR\r\n\r\n").expect("ok");
        assert_eq!(one(a.credential(&p)), one(b.credential(&p)));
    }

    #[test]
    fn a_second_carrier_cannot_choose_the_identity() {
        let raw = b"GET / HTTP/1.1\r\nx-api-key: real\r\nAuthorization: Bearer random-1\r\n\r\n";
        let h = parse_head(raw).expect("ok");
        // Default: the client cannot tell which one counts, so neither does.
        assert_eq!(
            h.credential(&CredentialPolicy::default()),
            Credential::Ambiguous
        );
        // Configured: the backend's carrier decides, whatever else the client sends.
        assert_eq!(one(h.credential(&ordered(&["x-api-key"]))), b"real");
        assert_eq!(
            one(h.credential(&ordered(&["x-api-key", "authorization"]))),
            b"real"
        );
        // The same key in two carriers is one key.
        let h = parse_head(b"GET / HTTP/1.1\r\napi-key: k\r\nAuthorization: Bearer k\r\n\r\n")
            .expect("ok");
        assert_eq!(one(h.credential(&CredentialPolicy::default())), b"k");
        // One carrier repeated with different values is ambiguous even when configured.
        let h = parse_head(b"GET / HTTP/1.1\r\nx-api-key: a\r\nx-api-key: b\r\n\r\n").expect("ok");
        assert_eq!(
            h.credential(&ordered(&["x-api-key"])),
            Credential::Ambiguous
        );
    }

    /// A Host value with bytes beyond ASCII (UTF-8 or not: obs-text a server may accept) is no
    /// host, and the head still parses; a request line with such a byte is refused.
    #[test]
    fn non_ascii_host_is_no_host_and_non_ascii_targets_are_refused() {
        for value in [&b"caf\xc3\xa9.example"[..], b"\xff\xfe", b"a\x80"] {
            let mut head = b"GET /x HTTP/1.1\r\nHost: ".to_vec();
            head.extend_from_slice(value);
            head.extend_from_slice(b"\r\nX-Api-Key: k\r\n\r\n");
            let h = parse_head(&head).expect("parses");
            assert_eq!(h.host, None, "{value:?}");
            assert!(!h.truncated);
            assert_eq!(h.fields().count(), 2);
        }
        for line in [
            &b"GET /caf\xc3\xa9 HTTP/1.1\r\n\r\n"[..],
            b"G\xffT / HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(parse_head(line), Err(HeadError::RequestLine), "{line:?}");
        }
    }

    #[test]
    fn truncated_heads_keep_complete_fields_but_no_forwarding() {
        let h = parse_head(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\nAuthoriz")
            .expect("ok");
        assert!(h.truncated);
        assert_eq!(h.host, Some("a"));
        assert_eq!(h.credential(&CredentialPolicy::default()), Credential::None);
        assert_eq!(h.forwarded_list(ForwardedHeader::XForwardedFor), None);
    }

    #[test]
    fn forwarding_lines_are_joined_in_order() {
        let h = parse_head(
            b"GET / HTTP/1.1\r\nX-Forwarded-For: 6.6.6.6\r\nA: b\r\nx-forwarded-for: 1.2.3.4, 5.6.7.8\r\n\r\n",
        )
        .expect("ok");
        assert_eq!(
            h.forwarded_list(ForwardedHeader::XForwardedFor).as_deref(),
            Some("6.6.6.6, 1.2.3.4, 5.6.7.8")
        );
        assert_eq!(h.forwarded_list(ForwardedHeader::Forwarded), None);
    }

    #[test]
    fn bad_field_lines_are_skipped_not_fatal() {
        let raw = b"GET /x HTTP/1.1\r\nNoColon\r\nBad Name: v\r\nA: b\x01\r\n folded\r\n\
                    x-api-key: k\r\n\r\n";
        let h = parse_head(raw).expect("ok");
        assert_eq!(h.skipped_fields, 4);
        assert_eq!(one(h.credential(&CredentialPolicy::default())), b"k");
    }

    #[test]
    fn many_fields_degrade_to_what_was_seen() {
        let raw = format!(
            "GET / HTTP/1.1\r\nx-api-key: k\r\n{}\r\n",
            "A: b\r\n".repeat(MAX_HEADERS + 10)
        );
        let h = parse_head(raw.as_bytes()).expect("ok");
        assert!(h.fields_cut);
        assert_eq!(one(h.credential(&CredentialPolicy::default())), b"k");
        // Far more lines than the old limit of 64 before the key: still found.
        let raw = format!(
            "GET / HTTP/1.1\r\n{}x-api-key: k\r\n\r\n",
            "A: b\r\n".repeat(1000)
        );
        let h = parse_head(raw.as_bytes()).expect("ok");
        assert!(!h.fields_cut && !h.truncated);
        assert_eq!(one(h.credential(&CredentialPolicy::default())), b"k");
    }

    #[test]
    fn malformed_request_lines_are_errors() {
        assert_eq!(
            parse_head(b"GET /x HTTP/1.1"),
            Err(HeadError::IncompleteRequestLine)
        );
        assert_eq!(
            parse_head(b"GET  /x HTTP/1.1\r\n\r\n"),
            Err(HeadError::RequestLine)
        );
        assert_eq!(
            parse_head(b"GET /x HTTP/2\r\n\r\n"),
            Err(HeadError::Version)
        );
        assert_eq!(
            parse_head(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n"),
            Err(HeadError::RequestLine)
        );
    }

    #[test]
    fn carriers_parse_from_config_names() {
        assert_eq!("Authorization".parse(), Ok(Carrier::Bearer));
        assert_eq!("basic".parse(), Ok(Carrier::Basic));
        assert_eq!("X-Api-Key".parse(), Ok(Carrier::Header("x-api-key".into())));
        assert_eq!("query:key".parse(), Ok(Carrier::Query("key".into())));
        assert_eq!("query:".parse::<Carrier>(), Err(CarrierError));
        assert_eq!("bad name".parse::<Carrier>(), Err(CarrierError));
    }

    /// A field line as RFC 9110 defines it, in the two passes the parser used to make: the
    /// name is everything before the first colon and must be a non-empty token.
    fn field_by_definition(line: &[u8]) -> Option<(&[u8], &[u8])> {
        let colon = line.iter().position(|&b| b == b':')?;
        let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
        (!name.is_empty()
            && name.iter().all(|&b| is_tchar(b))
            && value.iter().all(|&b| is_field_value_char(b)))
        .then_some((name, value))
    }

    /// The request line as the parser used to split it: exactly three parts around spaces.
    fn request_line_by_definition(line: &[u8]) -> Result<(&[u8], &[u8]), HeadError> {
        let mut parts = line.split(|&b| b == b' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(HeadError::RequestLine);
        };
        if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
            return Err(HeadError::RequestLine);
        }
        if target.is_empty() || !target.iter().all(|&b| (0x21..=0x7e).contains(&b)) {
            return Err(HeadError::RequestLine);
        }
        if version != b"HTTP/1.1" && version != b"HTTP/1.0" {
            return Err(HeadError::Version);
        }
        Ok((method, target))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 20_000,
            failure_persistence: None,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// The one-pass request line split gives what splitting at every space does,
        /// errors included.
        #[test]
        fn request_lines_split_as_defined(
            parts in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::sample::select(vec![
                        b"GET".to_vec(), b"POST".to_vec(), b"/v1/x?key=1".to_vec(),
                        b"HTTP/1.1".to_vec(), b"HTTP/1.0".to_vec(), b"HTTP/2".to_vec(),
                        Vec::new(), b"\x7f".to_vec(), b"a\tb".to_vec(), b"\xc3\xa9".to_vec(),
                        b"(x)".to_vec(),
                    ]),
                    proptest::collection::vec(proptest::prelude::any::<u8>(), 0..6),
                ],
                0..5,
            ),
        ) {
            let line = parts.join(&b' ');
            proptest::prop_assert_eq!(request_line(&line), request_line_by_definition(&line));
        }

        /// The one-pass field split accepts and splits exactly the lines the definition does,
        /// for lines made of the bytes that decide it (colons, blanks, controls, DEL, obs-text,
        /// token and non-token characters).
        #[test]
        fn field_lines_split_as_defined(line in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::sample::select(b":: \t\r\x7f\x00\x80\xffaZ9-_\"(@/,=".to_vec()),
                proptest::prelude::any::<u8>(),
            ],
            0..24,
        )) {
            proptest::prop_assert_eq!(field(&line), field_by_definition(&line));
        }
    }

    /// Lines are passed over by the length of their name: a line of a carrier's name length
    /// that is another field, and a carrier whose name is longer than the length bits, still
    /// give what comparing every name would.
    #[test]
    fn carriers_are_found_whatever_the_other_names_lengths() {
        let policy = CredentialPolicy::default();
        // `x-stainless-os` has the length of `x-goog-api-key`.
        let head =
            parse_head(b"GET / HTTP/1.1\r\nX-Stainless-OS: Linux\r\nX-Goog-Api-Key: g1\r\n\r\n")
                .expect("head");
        assert_eq!(one(head.credential(&policy)), b"g1");
        // `cache-control` has the length of `authorization`.
        let head = parse_head(
            b"GET / HTTP/1.1\r\nCache-Control: Bearer no\r\nAuthorization: Bearer b1\r\n\r\n",
        )
        .expect("head");
        assert_eq!(one(head.credential(&policy)), b"b1");
        // Names of 63 bytes or more share a length bit: a longer name of the same prefix is
        // still another field.
        let long = "x-".to_owned() + &"k".repeat(80);
        let policy = CredentialPolicy {
            carriers: vec![Carrier::Header(long.clone())],
            ordered: false,
        };
        let longer = format!("GET / HTTP/1.1\r\n{long}k: no\r\n\r\n");
        let head = parse_head(longer.as_bytes()).expect("head");
        assert_eq!(head.credential(&policy), Credential::None);
        let text = format!(
            "GET / HTTP/1.1\r\nX-{}: no\r\n{long}: yes\r\n\r\n",
            "j".repeat(80)
        );
        let head = parse_head(text.as_bytes()).expect("head");
        assert_eq!(one(head.credential(&policy)), b"yes");
        // No carrier saw anything, no query: nothing, without looking further.
        let head = parse_head(b"GET /v1/models HTTP/1.1\r\nHost: h\r\n\r\n").expect("head");
        assert_eq!(
            head.credential(&CredentialPolicy::default()),
            Credential::None
        );
        // Only the query holds it.
        let head = parse_head(b"GET /v1/models?key=q1 HTTP/1.1\r\nHost: h\r\n\r\n").expect("head");
        assert_eq!(one(head.credential(&CredentialPolicy::default())), b"q1");
    }
}
