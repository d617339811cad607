//! RFC 5424 messages for alert events, and octet-counting framing.

use super::config::{DEFAULT_APP_NAME, DEFAULT_SD_ID, FACILITIES, SyslogConfig};
use crate::formats::{Format, Record};

/// Escapes an SD-PARAM value: '"', '\' and ']' get a backslash.
pub fn escape_param(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// HOSTNAME, APP-NAME: printable ASCII without spaces, bounded, or "-".
fn header_field(s: &str, max: usize) -> String {
    let v: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if v.is_empty() { "-".into() } else { v }
}

pub fn facility_code(name: &str) -> u8 {
    FACILITIES
        .iter()
        .position(|f| *f == name)
        .map_or(16, |i| i as u8)
}

/// Syslog severity for an event.
pub fn severity_code(rec: &Record) -> u8 {
    if rec.event == "resolve" {
        return 6;
    }
    match rec.alert.severity.as_str() {
        "critical" => 2,
        "high" => 3,
        "medium" => 4,
        _ => 5,
    }
}

/// Renders RFC 5424 messages.
pub struct Rfc5424 {
    pub facility: u8,
    pub app_name: String,
    pub sd_id: String,
    pub msg: Box<dyn Format>,
}

impl Rfc5424 {
    /// The renderer `c` describes (defaults: local0, `sensor`, `alert@32473`).
    pub fn new(c: &SyslogConfig) -> Self {
        Self {
            facility: facility_code(c.facility.as_deref().unwrap_or("local0")),
            app_name: c
                .app_name
                .clone()
                .unwrap_or_else(|| DEFAULT_APP_NAME.into()),
            sd_id: c.sd_id.clone().unwrap_or_else(|| DEFAULT_SD_ID.into()),
            msg: c.message.format(),
        }
    }

    /// The structured data element with the key evidence.
    pub fn structured_data(&self, rec: &Record) -> String {
        let a = &rec.alert;
        let (requests, bytes_in, bytes_out) = rec.counters();
        let params: [(&str, String); 16] = [
            ("id", rec.id.clone()),
            ("seq", rec.seq.to_string()),
            ("event", rec.event.clone()),
            ("alert", a.id.clone()),
            ("rule", a.rule_id.clone()),
            ("key_kind", a.key_kind.to_string()),
            ("key", a.key.clone()),
            ("severity", a.severity.clone()),
            ("mode", a.mode.to_string()),
            ("window", a.window.to_string()),
            ("requests", requests.to_string()),
            ("bytes_in", bytes_in.to_string()),
            ("bytes_out", bytes_out.to_string()),
            ("first_seen", a.first_seen.clone()),
            ("last_seen", a.last_seen.clone()),
            ("technique", a.technique.id.to_string()),
        ];
        let mut sd = format!("[{}", self.sd_id);
        for (name, value) in params {
            sd.push(' ');
            sd.push_str(name);
            sd.push_str("=\"");
            sd.push_str(&escape_param(&value));
            sd.push('"');
        }
        sd.push(']');
        sd
    }

    pub fn render(&self, rec: &Record) -> String {
        let pri = u16::from(self.facility) * 8 + u16::from(severity_code(rec));
        format!(
            "<{pri}>1 {} {} {} - {} {} {}",
            rec.time_rfc3339(),
            header_field(&rec.alert.host, 255),
            header_field(&self.app_name, 48),
            header_field(&rec.event, 32),
            self.structured_data(rec),
            self.msg.format(rec)
        )
    }
}

/// Octet-counting framing: the message's length in bytes, a space, the message.
pub fn octet_counted(msg: &str) -> String {
    format!("{} {msg}", msg.len())
}

#[cfg(test)]
mod tests {
    use super::{super::config::valid_sd_name, *};
    use crate::formats::{JsonFormat, cef::Cef, leef::Leef};
    use crate::sinks::tests::record;

    fn renderer(msg: Box<dyn Format>) -> Rfc5424 {
        Rfc5424 {
            facility: facility_code("local0"),
            app_name: "sensor".into(),
            sd_id: DEFAULT_SD_ID.into(),
            msg,
        }
    }

    #[test]
    fn rfc5424_header_and_structured_data() {
        let r = record("address", "10.1.2.3");
        let line = renderer(Box::new(Cef)).render(&r);
        // local0 (16) * 8 + err (3) = 131
        let expected_head = format!(
            "<131>1 {} gpu-host-1 sensor - open [alert@32473 id=\"{}\" seq=\"7\" event=\"open\" ",
            r.time_rfc3339(),
            r.id
        );
        assert!(line.starts_with(&expected_head), "{line}");
        assert!(line.contains(" requests=\"240\" bytes_in=\"48000\" bytes_out=\"9600000\" "));
        assert!(
            line.contains("technique=\"AML.T0024.002\"] CEF:0|sensor|sensor|"),
            "{line}"
        );
        assert!(r.time_rfc3339().ends_with('Z'));
    }

    #[test]
    fn sd_param_escaping() {
        assert_eq!(escape_param(r#"a"b\c]d"#), r#"a\"b\\c\]d"#);
        let mut r = record("identity", "k-1");
        r.alert.rule_id = "r]\"x".into();
        let sd = renderer(Box::new(JsonFormat)).structured_data(&r);
        assert!(sd.contains(r#"rule="r\]\"x""#), "{sd}");
        assert!(valid_sd_name("alert@32473"));
        assert!(!valid_sd_name("a b"));
        assert!(!valid_sd_name("a=b"));
    }

    #[test]
    fn severities_and_framing() {
        let mut r = record("address", "10.1.2.3");
        assert_eq!(severity_code(&r), 3);
        r.alert.severity = "critical".into();
        assert_eq!(severity_code(&r), 2);
        r.event = "resolve".into();
        assert_eq!(severity_code(&r), 6);
        assert_eq!(octet_counted("héllo"), "6 héllo");
        assert_eq!(facility_code("auth"), 4);
        let mut r = record("address", "10.1.2.3");
        r.alert.host = "host with spaces".into();
        let line = renderer(Box::new(Leef)).render(&r);
        assert!(line.contains(" hostwithspaces sensor - open "), "{line}");
        assert!(line.contains("] LEEF:2.0|"));
    }
}
