//! Bounded parsing of an HTTP/1.x request head (RFC 9112 request line and field lines).

use std::fmt;

/// Field lines examined at most; a head with more is rejected as malformed.
pub const MAX_HEADERS: usize = 64;

/// What the sensor needs from a request head. Borrowed from the input buffer; the credential
/// is only exposed to be hashed (its `Debug` output is redacted).
#[derive(Clone, PartialEq, Eq)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub host: Option<&'a str>,
    pub x_forwarded_for: Option<&'a str>,
    pub forwarded: Option<&'a str>,
    credential: Option<&'a [u8]>,
    /// The buffer ended before the blank line closing the head; fields after the cut are
    /// missing.
    pub truncated: bool,
}

impl<'a> RequestHead<'a> {
    /// The API credential (Bearer token or API key), to be hashed and dropped; never store it.
    pub fn credential(&self) -> Option<&'a [u8]> {
        self.credential
    }
}

impl fmt::Debug for RequestHead<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestHead")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("host", &self.host)
            .field("x_forwarded_for", &self.x_forwarded_for)
            .field("forwarded", &self.forwarded)
            .field("credential", &self.credential.map(|_| "<redacted>"))
            .field("truncated", &self.truncated)
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
    #[error("malformed field line")]
    FieldLine,
    #[error("more than {MAX_HEADERS} field lines")]
    TooManyFields,
}

/// RFC 9110 token characters (method and field names).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Field value characters: visible ASCII, space, tab, and obs-text (RFC 9110 5.5).
fn is_field_value_char(b: u8) -> bool {
    b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80
}

/// Splits off the next line (without CR LF); None when no complete line remains.
fn next_line(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = buf.iter().position(|&b| b == b'\n')?;
    let line = &buf[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    Some((line, &buf[end + 1..]))
}

fn ascii(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok().filter(|s| s.is_ascii())
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

/// Parses the head at the start of `buf`. Bytes after the head (a body) are ignored.
pub fn parse_head(buf: &[u8]) -> Result<RequestHead<'_>, HeadError> {
    let (line, mut rest) = next_line(buf).ok_or(HeadError::IncompleteRequestLine)?;
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
    let mut head = RequestHead {
        method: ascii(method).ok_or(HeadError::RequestLine)?,
        path: ascii(target).ok_or(HeadError::RequestLine)?,
        host: None,
        x_forwarded_for: None,
        forwarded: None,
        credential: None,
        truncated: true,
    };
    // Precedence when several credentials are present: Authorization, x-api-key, api-key.
    let mut credential_rank = u8::MAX;
    for _ in 0..=MAX_HEADERS {
        let Some((line, after)) = next_line(rest) else {
            // The buffer was cut inside the head: keep what was complete.
            return Ok(head);
        };
        rest = after;
        if line.is_empty() {
            head.truncated = false;
            return Ok(head);
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(HeadError::FieldLine)?;
        let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Err(HeadError::FieldLine);
        }
        if !value.iter().all(|&b| is_field_value_char(b)) {
            return Err(HeadError::FieldLine);
        }
        if name.eq_ignore_ascii_case(b"host") {
            head.host = ascii(value).or(head.host);
        } else if name.eq_ignore_ascii_case(b"x-forwarded-for") {
            head.x_forwarded_for = ascii(value).or(head.x_forwarded_for);
        } else if name.eq_ignore_ascii_case(b"forwarded") {
            head.forwarded = ascii(value).or(head.forwarded);
        } else if name.eq_ignore_ascii_case(b"authorization") {
            if let Some(token) = bearer_token(value)
                && credential_rank > 0
            {
                head.credential = Some(token);
                credential_rank = 0;
            }
        } else if name.eq_ignore_ascii_case(b"x-api-key") {
            if credential_rank > 1 && !value.is_empty() {
                head.credential = Some(value);
                credential_rank = 1;
            }
        } else if name.eq_ignore_ascii_case(b"api-key") && credential_rank > 2 && !value.is_empty()
        {
            head.credential = Some(value);
            credential_rank = 2;
        }
    }
    Err(HeadError::TooManyFields)
}

/// The token of `Bearer <token>` (scheme case-insensitive).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = trim(token);
    (!token.is_empty() && token.len() < value.len()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_style_request() {
        let raw = b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.example\r\n\
            Authorization: Bearer sk-test-123\r\nX-Forwarded-For: 203.0.113.9, 10.0.0.2\r\n\
            Content-Type: application/json\r\n\r\n{\"model\":\"m\"}";
        let h = parse_head(raw).expect("parses");
        assert_eq!(h.method, "POST");
        assert_eq!(h.path, "/v1/chat/completions");
        assert_eq!(h.host, Some("api.example"));
        assert_eq!(h.x_forwarded_for, Some("203.0.113.9, 10.0.0.2"));
        assert_eq!(h.credential(), Some(&b"sk-test-123"[..]));
        assert!(!h.truncated);
        assert!(
            !format!("{h:?}").contains("sk-test"),
            "Debug never shows the credential"
        );
    }

    #[test]
    fn api_key_headers_and_precedence() {
        let h = parse_head(b"GET / HTTP/1.1\r\napi-key: a\r\nx-api-key: b\r\n\r\n").expect("ok");
        assert_eq!(h.credential(), Some(&b"b"[..]));
        let h = parse_head(b"GET / HTTP/1.1\r\nx-api-key: b\r\nauthorization: bearer c\r\n\r\n")
            .expect("ok");
        assert_eq!(h.credential(), Some(&b"c"[..]));
        let h = parse_head(b"GET / HTTP/1.1\r\nAuthorization: Basic Zm9v\r\n\r\n").expect("ok");
        assert_eq!(h.credential(), None, "only Bearer tokens are credentials");
        let h = parse_head(b"GET / HTTP/1.1\r\nAuthorization: Bearer \r\n\r\n").expect("ok");
        assert_eq!(h.credential(), None);
    }

    #[test]
    fn truncated_heads_keep_complete_fields() {
        let h = parse_head(b"GET /x HTTP/1.1\r\nHost: a\r\nAuthoriz").expect("ok");
        assert!(h.truncated);
        assert_eq!(h.host, Some("a"));
        assert_eq!(h.credential(), None);
    }

    #[test]
    fn malformed_heads_are_errors() {
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
            parse_head(b"GET /x HTTP/1.1\r\nNoColon\r\n\r\n"),
            Err(HeadError::FieldLine)
        );
        assert_eq!(
            parse_head(b"GET /x HTTP/1.1\r\nA: b\x01\r\n\r\n"),
            Err(HeadError::FieldLine)
        );
        assert_eq!(
            parse_head(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n"),
            Err(HeadError::RequestLine)
        );
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "A: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(parse_head(many.as_bytes()), Err(HeadError::TooManyFields));
    }
}
