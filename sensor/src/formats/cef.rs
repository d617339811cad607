//! ArcSight Common Event Format (CEF:0), as the MSG of a syslog message.
//!
//! `CEF:0|sensor|sensor|<version>|<rule id>|<rule name>|<severity 0-10>| <extension>`
//!
//! Header fields escape `\` and `|`; extension values escape `\`, `=` and line breaks
//! (`\n`, `\r`). One space follows the seventh `|`: CEF parsers trim it, and liblognorm's
//! (rsyslog mmnormalize, lognormalizer) would otherwise lose the first key's first character.

use crate::formats::{Format, Record};

pub const VENDOR: &str = "sensor";
pub const PRODUCT: &str = "sensor";

/// Characters a receiver may take for the end of a line or a field separator besides `\n`
/// and `\r` (other C0/C1 controls, NUL for C-string parsers, Unicode line and paragraph
/// separators): they become spaces, so text from an alert cannot forge a line or a field.
pub fn is_breaking(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

/// Escapes a header field: backslash and pipe; line breaks and other controls become spaces
/// (not allowed).
pub fn escape_header(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '|' => out.push_str("\\|"),
            c if is_breaking(c) => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Escapes an extension value: backslash, equals sign, and line breaks; other controls
/// become spaces.
pub fn escape_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '=' => out.push_str("\\="),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if is_breaking(c) => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// CEF severity 0-10 for the alert's severity.
pub fn severity(s: &str) -> u8 {
    match s {
        "low" => 3,
        "medium" => 5,
        "high" => 8,
        "critical" => 10,
        _ => 5,
    }
}

/// The extension's key-value pairs, in order (values unescaped).
pub fn extension(rec: &Record) -> Vec<(&'static str, String)> {
    let a = &rec.alert;
    let (requests, bytes_in, bytes_out) = rec.counters();
    let mut ext: Vec<(&'static str, String)> = vec![
        ("rt", rec.time_ms().to_string()),
        ("start", a.first_seen_ms.to_string()),
        ("end", a.last_seen_ms.to_string()),
        ("act", rec.event.clone()),
        ("cat", "model-extraction".into()),
        ("externalId", rec.id.clone()),
        ("dvchost", a.host.clone()),
    ];
    match rec.source_ip() {
        Some(std::net::IpAddr::V4(ip)) => ext.push(("src", ip.to_string())),
        Some(std::net::IpAddr::V6(ip)) => {
            ext.push(("c6a2", ip.to_string()));
            ext.push(("c6a2Label", "Source IPv6 Address".into()));
        }
        None => {}
    }
    if a.key_kind == "identity" {
        ext.push(("suser", a.key.clone()));
    }
    ext.extend([
        ("cnt", requests.to_string()),
        ("in", bytes_in.to_string()),
        ("out", bytes_out.to_string()),
        ("cs1", a.rule_id.clone()),
        ("cs1Label", "ruleId".into()),
        ("cs2", a.key_kind.to_string()),
        ("cs2Label", "keyKind".into()),
        ("cs3", a.key.clone()),
        ("cs3Label", "identity".into()),
        ("cs4", a.technique.id.to_string()),
        ("cs4Label", "mitreAtlasTechniqueId".into()),
        ("cs5", a.technique.name.to_string()),
        ("cs5Label", "mitreAtlasTechniqueName".into()),
        ("cs6", a.id.clone()),
        ("cs6Label", "alertId".into()),
        ("cn1", rec.seq.to_string()),
        ("cn1Label", "sequence".into()),
        ("msg", summary(rec)),
    ]);
    ext
}

/// One line a person reads first.
pub fn summary(rec: &Record) -> String {
    let a = &rec.alert;
    let (requests, _, bytes_out) = rec.counters();
    format!(
        "{} {}: {} {} ({} requests, {} bytes out in {}) - {} {}",
        a.rule_name,
        rec.event,
        a.key_kind,
        a.key,
        requests,
        bytes_out,
        a.window,
        a.technique.id,
        a.technique.name
    )
}

pub struct Cef;

impl Format for Cef {
    fn format(&self, rec: &Record) -> String {
        let a = &rec.alert;
        let mut out = format!(
            "CEF:0|{}|{}|{}|{}|{}|{}| ",
            escape_header(VENDOR),
            escape_header(PRODUCT),
            escape_header(env!("CARGO_PKG_VERSION")),
            escape_header(&a.rule_id),
            escape_header(&a.rule_name),
            severity(&a.severity)
        );
        let ext: Vec<String> = extension(rec)
            .into_iter()
            .map(|(k, v)| format!("{k}={}", escape_value(&v)))
            .collect();
        out.push_str(&ext.join(" "));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::tests::record;

    /// Splits a CEF line back into header fields and extension pairs, honouring escapes.
    pub fn parse(line: &str) -> (Vec<String>, Vec<(String, String)>) {
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut chars = line.chars();
        while fields.len() < 7 {
            match chars.next() {
                Some('\\') => {
                    if let Some(c) = chars.next() {
                        cur.push(c);
                    }
                }
                Some('|') => fields.push(std::mem::take(&mut cur)),
                Some(c) => cur.push(c),
                None => break,
            }
        }
        let rest: String = chars.collect();
        // Extension: keys are [A-Za-z0-9_]+ followed by an unescaped '='.
        let mut pairs: Vec<(String, String)> = Vec::new();
        let mut key = String::new();
        let mut val = String::new();
        let mut in_key = true;
        let mut it = rest.trim_start().chars().peekable();
        while let Some(c) = it.next() {
            if in_key {
                if c == '=' {
                    in_key = false;
                } else {
                    key.push(c);
                }
                continue;
            }
            match c {
                '\\' => match it.next() {
                    Some('n') => val.push('\n'),
                    Some('r') => val.push('\r'),
                    Some(c) => val.push(c),
                    None => {}
                },
                ' ' => {
                    // A space ends the value if a key= follows.
                    let ahead: String = it.clone().take_while(|c| *c != ' ').collect();
                    if let Some((k, _)) = ahead.split_once('=')
                        && !k.is_empty()
                        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                        && !k.ends_with('\\')
                    {
                        pairs.push((std::mem::take(&mut key), std::mem::take(&mut val)));
                        in_key = true;
                        continue;
                    }
                    val.push(' ');
                }
                c => val.push(c),
            }
        }
        if !key.is_empty() {
            pairs.push((key, val));
        }
        (fields, pairs)
    }

    #[test]
    fn header_and_extension_escaping() {
        assert_eq!(escape_header(r"a|b\c"), r"a\|b\\c");
        assert_eq!(escape_header("x\ny"), "x y");
        assert_eq!(escape_value(r"a=b\c"), r"a\=b\\c");
        assert_eq!(escape_value("l1\nl2\r"), r"l1\nl2\r");
        assert_eq!(
            escape_value("p|ipe"),
            "p|ipe",
            "pipes are not escaped in extensions"
        );
    }

    #[test]
    fn alert_as_cef() {
        let mut r = record("address", "10.1.2.3");
        r.alert.rule_name = r"Flood | with \ and = signs".into();
        r.alert.rule_id = "flood|x".into();
        let line = Cef.format(&r);
        assert!(line.starts_with("CEF:0|sensor|sensor|"), "{line}");
        assert!(
            line.contains(r"|flood\|x|Flood \| with \\ and = signs|8| rt="),
            "{line}"
        );
        let (fields, pairs) = parse(&line);
        assert_eq!(fields[0], "CEF:0");
        assert_eq!(fields[4], "flood|x");
        assert_eq!(fields[5], r"Flood | with \ and = signs");
        assert_eq!(fields[6], "8");
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("{k} missing in {line}"))
        };
        assert_eq!(get("src"), "10.1.2.3");
        assert_eq!(get("cnt"), "240");
        assert_eq!(get("in"), "48000");
        assert_eq!(get("out"), "9600000");
        assert_eq!(get("rt"), "1800000002000");
        assert_eq!(get("start"), "1800000000000");
        assert_eq!(get("cs1"), "flood|x");
        assert_eq!(get("cs1Label"), "ruleId");
        assert_eq!(get("cs4"), "AML.T0024.002");
        assert_eq!(get("externalId"), r.id);
        assert_eq!(get("msg"), summary(&r));
        assert!(get("msg").contains("Flood | with \\ and = signs"));
    }

    #[test]
    fn keys_that_are_not_addresses() {
        let r = record("identity", "k-0011aabbccdd");
        let (_, pairs) = parse(&Cef.format(&r));
        assert!(!pairs.iter().any(|(k, _)| k == "src"));
        assert!(pairs.contains(&("suser".into(), "k-0011aabbccdd".into())));
        let r = record("address", "2001:db8::1");
        let (_, pairs) = parse(&Cef.format(&r));
        assert!(pairs.contains(&("c6a2".into(), "2001:db8::1".into())));
    }

    #[test]
    fn other_controls_and_unicode_separators_cannot_break_lines_or_fields() {
        let mut r = record("group", "10.0.0.0/24");
        let hostile = "x\u{0}y\u{b}z\u{c}w\u{85}v\u{2028}CEF:0|forged|\u{2029}cs1=evil\u{1b}[2J";
        r.alert.rule_name = hostile.into();
        r.alert.rule_id = hostile.into();
        r.alert.host = hostile.into();
        let line = Cef.format(&r);
        assert!(!line.chars().any(is_breaking), "{line:?}");
        let (fields, pairs) = parse(&line);
        assert_eq!(fields.len(), 7);
        assert_eq!(fields[6], "8", "the severity stays the seventh field");
        assert_eq!(pairs.iter().filter(|(k, _)| k == "cs1").count(), 1);
    }

    #[test]
    fn values_with_newlines_and_equals_round_trip() {
        let mut r = record("group", "10.0.0.0/24");
        r.alert.host = "evil=host\nsrc=6.6.6.6".into();
        let line = Cef.format(&r);
        assert!(!line.contains('\n'), "one line");
        let (_, pairs) = parse(&line);
        let host = pairs.iter().find(|(k, _)| k == "dvchost").expect("dvchost");
        assert_eq!(host.1, "evil=host\nsrc=6.6.6.6");
        assert!(!pairs.iter().any(|(k, _)| k == "src"), "no injected key");
    }
}
