//! IBM QRadar Log Event Extended Format, LEEF 2.0, as the MSG of a syslog message.
//!
//! `LEEF:2.0|sensor|sensor|<version>|<rule id>|x09|<key=value><TAB><key=value>...`
//!
//! The sixth header field names the attribute delimiter, a tab (`x09`). Header fields escape
//! `\` and `|`; attribute values cannot carry the delimiter, so tabs and line breaks in them
//! become spaces. `devTime` is in epoch milliseconds (`devTimeFormat` is not needed for it).

use super::{Format, Record, cef};

pub struct Leef;

fn escape_header(s: &str) -> String {
    cef::escape_header(s)
}

/// Tabs (the delimiter), line breaks and every other control or Unicode separator become
/// spaces: a value cannot start another attribute or line.
fn clean_value(s: &str) -> String {
    s.chars()
        .map(|c| if cef::is_breaking(c) { ' ' } else { c })
        .collect()
}

/// LEEF `sev`: 1-10.
pub fn severity(s: &str) -> u8 {
    cef::severity(s).max(1)
}

/// The attributes, in order (values not yet cleaned).
pub fn attributes(rec: &Record) -> Vec<(&'static str, String)> {
    let a = &rec.alert;
    let (requests, bytes_in, bytes_out) = rec.counters();
    let mut attrs: Vec<(&'static str, String)> = vec![
        ("devTime", rec.time_ms().to_string()),
        ("cat", "model-extraction".into()),
        ("sev", severity(&a.severity).to_string()),
    ];
    if let Some(ip) = rec.source_ip() {
        attrs.push(("src", ip.to_string()));
    }
    if a.key_kind == "identity" {
        attrs.push(("usrName", a.key.clone()));
    }
    attrs.extend([
        ("srcBytes", bytes_in.to_string()),
        ("dstBytes", bytes_out.to_string()),
        ("identHostName", a.host.clone()),
        ("event", rec.event.clone()),
        ("eventId", rec.id.clone()),
        ("alertId", a.id.clone()),
        ("sequence", rec.seq.to_string()),
        ("ruleId", a.rule_id.clone()),
        ("ruleName", a.rule_name.clone()),
        ("keyKind", a.key_kind.to_string()),
        ("key", a.key.clone()),
        ("severity", a.severity.clone()),
        ("requests", requests.to_string()),
        ("window", a.window.to_string()),
        ("startTime", a.first_seen_ms.to_string()),
        ("endTime", a.last_seen_ms.to_string()),
        ("techniqueId", a.technique.id.to_string()),
        ("techniqueName", a.technique.name.to_string()),
        ("framework", a.technique.framework.to_string()),
    ]);
    attrs
}

impl Format for Leef {
    fn format(&self, rec: &Record) -> String {
        let a = &rec.alert;
        let header = format!(
            "LEEF:2.0|{}|{}|{}|{}|x09|",
            escape_header(cef::VENDOR),
            escape_header(cef::PRODUCT),
            escape_header(env!("CARGO_PKG_VERSION")),
            escape_header(&a.rule_id),
        );
        let attrs: Vec<String> = attributes(rec)
            .into_iter()
            .map(|(k, v)| format!("{k}={}", clean_value(&v)))
            .collect();
        header + &attrs.join("\t")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::tests::record;

    #[test]
    fn alert_as_leef() {
        let mut r = record("address", "10.1.2.3");
        r.alert.rule_name = "Tab\there | pipe = eq".into();
        r.alert.rule_id = r"a|b\c".into();
        let line = Leef.format(&r);
        let (header, attrs) = line.split_at(line.find("x09|").expect("delimiter field") + 4);
        assert_eq!(
            header,
            format!(
                "LEEF:2.0|sensor|sensor|{}|a\\|b\\\\c|x09|",
                env!("CARGO_PKG_VERSION")
            )
        );
        let pairs: Vec<(&str, &str)> = attrs
            .split('\t')
            .map(|kv| kv.split_once('=').expect("key=value"))
            .collect();
        let get = |k: &str| pairs.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
        assert_eq!(get("src"), Some("10.1.2.3"));
        assert_eq!(get("srcBytes"), Some("48000"));
        assert_eq!(get("dstBytes"), Some("9600000"));
        assert_eq!(get("sev"), Some("8"));
        assert_eq!(get("devTime"), Some("1800000002000"));
        assert_eq!(
            get("ruleName"),
            Some("Tab here | pipe = eq"),
            "tab cleaned, = kept"
        );
        assert_eq!(get("techniqueId"), Some("AML.T0024.002"));
        assert_eq!(get("eventId"), Some(r.id.as_str()));
        assert!(!line.contains('\n'));
    }

    #[test]
    fn hostile_text_cannot_forge_attributes_or_lines() {
        let mut r = record("address", "10.1.2.3");
        r.alert.rule_name = "n\u{0}\u{b}\u{2028}\tsrc=6.6.6.6\u{85}".into();
        r.alert.rule_id = "id|x\u{2029}\ny".into();
        r.alert.host = "h\tsev=1".into();
        let line = Leef.format(&r);
        assert!(
            !line.chars().any(|c| c != '\t' && cef::is_breaking(c)),
            "{line:?}"
        );
        let attrs = &line[line.find("x09|").expect("delimiter field") + 4..];
        let keys: Vec<&str> = attrs
            .split('\t')
            .map(|kv| kv.split_once('=').expect("key=value").0)
            .collect();
        assert_eq!(keys.iter().filter(|k| **k == "src").count(), 1);
        assert_eq!(keys.iter().filter(|k| **k == "sev").count(), 1);
        assert_eq!(
            keys,
            attributes(&r).iter().map(|(k, _)| *k).collect::<Vec<_>>()
        );
    }

    #[test]
    fn identity_keys() {
        let line = Leef.format(&record("identity", "k-01"));
        assert!(line.contains("\tusrName=k-01\t"), "{line}");
        assert!(!line.contains("\tsrc="));
    }
}
