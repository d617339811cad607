//! `type = "syslog"`: where to send and how to render.

use std::path::PathBuf;

use serde::Deserialize;

use crate::{
    formats::{Format, JsonFormat, cef::Cef, leef::Leef},
    sinks::configure::{DeliveryKeys, Invalid, ca_file_set},
};

pub const DEFAULT_SD_ID: &str = "alert@32473";
pub const DEFAULT_APP_NAME: &str = "sensor";

pub const FACILITIES: [&str; 24] = [
    "kern",
    "user",
    "mail",
    "daemon",
    "auth",
    "syslog",
    "lpr",
    "news",
    "uucp",
    "cron",
    "authpriv",
    "ftp",
    "ntp",
    "security",
    "console",
    "solaris-cron",
    "local0",
    "local1",
    "local2",
    "local3",
    "local4",
    "local5",
    "local6",
    "local7",
];

/// `protocol`: udp, tcp (default) or tls.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(try_from = "String")]
pub enum Protocol {
    Udp,
    #[default]
    Tcp,
    Tls,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
            Self::Tls => "tls",
        }
    }
}

impl TryFrom<String> for Protocol {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "udp" => Ok(Self::Udp),
            "tcp" => Ok(Self::Tcp),
            "tls" => Ok(Self::Tls),
            _ => Err(format!("`{s}` is not udp, tcp or tls")),
        }
    }
}

/// `message`: the MSG part, cef (default), leef or json.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(try_from = "String")]
pub enum Message {
    #[default]
    Cef,
    Leef,
    Json,
}

impl TryFrom<String> for Message {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "cef" => Ok(Self::Cef),
            "leef" => Ok(Self::Leef),
            "json" => Ok(Self::Json),
            _ => Err(format!("`{s}` is not cef, leef or json")),
        }
    }
}

impl Message {
    pub fn format(self) -> Box<dyn Format> {
        match self {
            Self::Cef => Box::new(Cef),
            Self::Leef => Box::new(Leef),
            Self::Json => Box::new(JsonFormat),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SyslogConfig {
    pub name: Option<String>,
    /// `host:port` (`[v6]:port`).
    pub address: String,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub message: Message,
    pub facility: Option<String>,
    pub app_name: Option<String>,
    pub sd_id: Option<String>,
    /// TLS only: the CA(s) of the receiver's certificate (else the system roots).
    pub ca_file: Option<PathBuf>,
    /// TLS only: the name the receiver's certificate carries (else the address's host).
    pub server_name: Option<String>,
    pub spool_dir: Option<PathBuf>,
    pub spool_max_bytes: Option<u64>,
    pub retry_max_secs: Option<u64>,
    pub timeout_secs: Option<u64>,
}

/// Splits "host:port" or "[v6]:port" (a bare IPv6 address is refused). Returns (host, port).
pub fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
    let host = if let Some(inner) = host.strip_prefix('[') {
        inner.strip_suffix(']')?.to_owned()
    } else {
        if host.contains(':') {
            return None;
        }
        host.to_owned()
    };
    (!host.is_empty()).then_some((host, port))
}

/// SD-NAME: 1-32 printable US-ASCII characters except '=', ' ', ']' and '"'.
pub fn valid_sd_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| (33..=126).contains(&b) && !matches!(b, b'=' | b']' | b'"'))
}

impl SyslogConfig {
    pub fn delivery(&self) -> DeliveryKeys<'_> {
        DeliveryKeys {
            spool_dir: self.spool_dir.as_deref(),
            spool_max_bytes: self.spool_max_bytes,
            retry_max_secs: self.retry_max_secs,
            timeout_secs: self.timeout_secs,
        }
    }
}

impl SyslogConfig {
    /// Checks what serde cannot (ranges, formats, keys that go together).
    pub fn validate(&self) -> Result<(), Invalid> {
        self.delivery().validate()?;
        if split_host_port(&self.address).is_none() {
            return Err(("address", format!("`{}` is not host:port", self.address)));
        }
        if self.protocol != Protocol::Tls {
            if self.ca_file.is_some() {
                return Err(("ca_file", "only applies to protocol = \"tls\"".into()));
            }
            if self.server_name.is_some() {
                return Err(("server_name", "only applies to protocol = \"tls\"".into()));
            }
        }
        if let Some(f) = &self.facility
            && !FACILITIES.contains(&f.as_str())
        {
            return Err((
                "facility",
                format!("`{f}` is not a syslog facility (e.g. local0, auth)"),
            ));
        }
        if let Some(a) = &self.app_name
            && (a.is_empty() || a.len() > 48 || !a.bytes().all(|b| (33..=126).contains(&b)))
        {
            return Err((
                "app_name",
                "1 to 48 printable ASCII characters without spaces".into(),
            ));
        }
        if let Some(sd) = &self.sd_id
            && (!valid_sd_name(sd) || !sd.contains('@'))
        {
            return Err((
                "sd_id",
                format!("`{sd}` is not an SD-ID of the form name@<private enterprise number>"),
            ));
        }
        ca_file_set(self.ca_file.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ports() {
        assert_eq!(split_host_port("h:514"), Some(("h".into(), 514)));
        assert_eq!(split_host_port("[::1]:6514"), Some(("::1".into(), 6514)));
        assert_eq!(split_host_port("::1:514"), None);
        assert_eq!(split_host_port("h"), None);
        assert_eq!(split_host_port("h:0"), None);
    }
}
