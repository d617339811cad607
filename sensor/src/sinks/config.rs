//! `[[outputs]]` entries as written, and their validation.

use std::path::PathBuf;

use serde::Deserialize;

use super::http;

/// One `[[outputs]]` entry as written. Keys are optional; which apply depends on `type`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// syslog, ecs-file, ocsf-file, hec or webhook.
    #[serde(rename = "type")]
    pub kind: String,
    /// Names the output in logs, `/v1/health` and its spool directory (default: type-N).
    pub name: Option<String>,
    // syslog
    pub address: Option<String>,
    pub protocol: Option<String>,
    pub message: Option<String>,
    pub facility: Option<String>,
    pub app_name: Option<String>,
    pub sd_id: Option<String>,
    // TLS (syslog over TLS, https URLs)
    pub ca_file: Option<PathBuf>,
    pub server_name: Option<String>,
    // files
    pub path: Option<PathBuf>,
    pub max_file_bytes: Option<u64>,
    pub keep_files: Option<usize>,
    // HTTP (hec, webhook)
    pub url: Option<String>,
    pub token_file: Option<PathBuf>,
    pub sourcetype: Option<String>,
    pub source: Option<String>,
    pub index: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub batch_max_events: Option<usize>,
    // delivery
    pub spool_dir: Option<PathBuf>,
    pub spool_max_bytes: Option<u64>,
    pub retry_max_secs: Option<u64>,
    pub timeout_secs: Option<u64>,
}

pub const TYPES: [&str; 5] = ["syslog", "ecs-file", "ocsf-file", "hec", "webhook"];

/// Keys every type accepts.
const COMMON_KEYS: [&str; 2] = ["type", "name"];
/// Keys of network outputs (spool and retries).
const DELIVERY_KEYS: [&str; 4] = [
    "spool_dir",
    "spool_max_bytes",
    "retry_max_secs",
    "timeout_secs",
];

fn type_keys(kind: &str) -> &'static [&'static str] {
    match kind {
        "syslog" => &[
            "address",
            "protocol",
            "message",
            "facility",
            "app_name",
            "sd_id",
            "ca_file",
            "server_name",
        ],
        "ecs-file" | "ocsf-file" => &["path", "max_file_bytes", "keep_files"],
        "hec" => &[
            "url",
            "token_file",
            "sourcetype",
            "source",
            "index",
            "batch_max_events",
            "ca_file",
            "server_name",
        ],
        "webhook" => &["url", "secret_file", "ca_file", "server_name"],
        _ => &[],
    }
}

/// A validation error: the output (0-based index among `[[outputs]]`), the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("outputs[{index}]: {message}")]
pub struct ConfigError {
    pub index: usize,
    pub key: &'static str,
    pub message: String,
}

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

impl OutputConfig {
    fn set_keys(&self) -> Vec<&'static str> {
        let mut keys = Vec::new();
        let mut add = |k: &'static str, set: bool| {
            if set {
                keys.push(k);
            }
        };
        add("name", self.name.is_some());
        add("address", self.address.is_some());
        add("protocol", self.protocol.is_some());
        add("message", self.message.is_some());
        add("facility", self.facility.is_some());
        add("app_name", self.app_name.is_some());
        add("sd_id", self.sd_id.is_some());
        add("ca_file", self.ca_file.is_some());
        add("server_name", self.server_name.is_some());
        add("path", self.path.is_some());
        add("max_file_bytes", self.max_file_bytes.is_some());
        add("keep_files", self.keep_files.is_some());
        add("url", self.url.is_some());
        add("token_file", self.token_file.is_some());
        add("sourcetype", self.sourcetype.is_some());
        add("source", self.source.is_some());
        add("index", self.index.is_some());
        add("secret_file", self.secret_file.is_some());
        add("batch_max_events", self.batch_max_events.is_some());
        add("spool_dir", self.spool_dir.is_some());
        add("spool_max_bytes", self.spool_max_bytes.is_some());
        add("retry_max_secs", self.retry_max_secs.is_some());
        add("timeout_secs", self.timeout_secs.is_some());
        keys
    }

    pub(super) fn is_network(&self) -> bool {
        matches!(self.kind.as_str(), "syslog" | "hec" | "webhook")
    }

    /// The name it is known by: `name`, else `<type>-<n>` (1-based among all outputs).
    pub fn display_name(&self, index: usize) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("{}-{}", self.kind, index + 1))
    }

    fn validate(&self, index: usize) -> Result<(), ConfigError> {
        let err = |key: &'static str, message: String| ConfigError {
            index,
            key,
            message,
        };
        if !TYPES.contains(&self.kind.as_str()) {
            return Err(err(
                "type",
                format!("`{}` is not one of {}", self.kind, TYPES.join(", ")),
            ));
        }
        for key in self.set_keys() {
            let allowed = COMMON_KEYS.contains(&key)
                || type_keys(&self.kind).contains(&key)
                || (self.is_network() && DELIVERY_KEYS.contains(&key));
            if !allowed {
                return Err(err(
                    key,
                    format!("`{key}` does not apply to type {}", self.kind),
                ));
            }
        }
        if let Some(name) = &self.name
            && (name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
                || name.starts_with('.'))
        {
            return Err(err("name", "names are letters, digits, -, _ and .".into()));
        }
        let positive = |key: &'static str, v: Option<u64>| match v {
            Some(0) => Err(err(key, "must be at least 1".into())),
            _ => Ok(()),
        };
        positive("spool_max_bytes", self.spool_max_bytes)?;
        positive("retry_max_secs", self.retry_max_secs)?;
        positive("timeout_secs", self.timeout_secs)?;
        positive("max_file_bytes", self.max_file_bytes)?;
        positive("batch_max_events", self.batch_max_events.map(|n| n as u64))?;
        if let Some(n) = self.keep_files
            && !(1..=1000).contains(&n)
        {
            return Err(err("keep_files", "must be 1..=1000".into()));
        }
        match self.kind.as_str() {
            "syslog" => {
                let Some(address) = &self.address else {
                    return Err(err("address", "syslog needs an address (host:port)".into()));
                };
                if http::split_host_port(address).is_none() {
                    return Err(err("address", format!("`{address}` is not host:port")));
                }
                let protocol = self.protocol.as_deref().unwrap_or("tcp");
                if !["udp", "tcp", "tls"].contains(&protocol) {
                    return Err(err(
                        "protocol",
                        format!("`{protocol}` is not udp, tcp or tls"),
                    ));
                }
                if protocol != "tls" {
                    if self.ca_file.is_some() {
                        return Err(err("ca_file", "only applies to protocol = \"tls\"".into()));
                    }
                    if self.server_name.is_some() {
                        return Err(err(
                            "server_name",
                            "only applies to protocol = \"tls\"".into(),
                        ));
                    }
                }
                let message = self.message.as_deref().unwrap_or("cef");
                if !["cef", "leef", "json"].contains(&message) {
                    return Err(err(
                        "message",
                        format!("`{message}` is not cef, leef or json"),
                    ));
                }
                if let Some(f) = &self.facility
                    && !FACILITIES.contains(&f.as_str())
                {
                    return Err(err(
                        "facility",
                        format!("`{f}` is not a syslog facility (e.g. local0, auth)"),
                    ));
                }
                if let Some(a) = &self.app_name
                    && (a.is_empty() || a.len() > 48 || !a.bytes().all(|b| (33..=126).contains(&b)))
                {
                    return Err(err(
                        "app_name",
                        "1 to 48 printable ASCII characters without spaces".into(),
                    ));
                }
                if let Some(sd) = &self.sd_id
                    && (!valid_sd_name(sd) || !sd.contains('@'))
                {
                    return Err(err(
                        "sd_id",
                        format!(
                            "`{sd}` is not an SD-ID of the form name@<private enterprise number>"
                        ),
                    ));
                }
            }
            "ecs-file" | "ocsf-file" => {
                match &self.path {
                    None => return Err(err("path", format!("{} needs a path", self.kind))),
                    Some(p) if !p.is_absolute() => {
                        return Err(err("path", "must be an absolute path".into()));
                    }
                    Some(_) => {}
                };
            }
            "hec" | "webhook" => {
                let Some(url) = &self.url else {
                    return Err(err("url", format!("{} needs a url", self.kind)));
                };
                let parsed = http::Url::parse(url).map_err(|e| err("url", e))?;
                if !parsed.tls && (self.ca_file.is_some() || self.server_name.is_some()) {
                    let key = if self.ca_file.is_some() {
                        "ca_file"
                    } else {
                        "server_name"
                    };
                    return Err(err(key, "only applies to https URLs".into()));
                }
                if self.kind == "hec" && self.token_file.is_none() {
                    return Err(err(
                        "token_file",
                        "hec needs a token_file (the HEC token)".into(),
                    ));
                }
            }
            _ => {}
        }
        if let Some(f) = &self.ca_file
            && f.as_os_str().is_empty()
        {
            return Err(err("ca_file", "must not be empty".into()));
        }
        Ok(())
    }
}

/// Validates every output and that names are unique.
pub fn validate(outputs: &[OutputConfig]) -> Result<(), ConfigError> {
    let mut names = std::collections::HashSet::new();
    for (i, o) in outputs.iter().enumerate() {
        o.validate(i)?;
        let name = o.display_name(i);
        if !names.insert(name.clone()) {
            return Err(ConfigError {
                index: i,
                key: "name",
                message: format!("output name `{name}` is used twice"),
            });
        }
    }
    Ok(())
}

/// 1-based line of `key` inside the `index`-th `[[outputs]]` table of `text`, or of the
/// table's header when the key is not written there.
pub fn locate(text: &str, index: usize, key: &str) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    let headers: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.trim() == "[[outputs]]")
        .map(|(i, _)| i)
        .collect();
    let Some(&start) = headers.get(index) else {
        return 1;
    };
    let end = lines
        .iter()
        .enumerate()
        .skip(start + 1)
        .find(|(_, l)| l.trim_start().starts_with('['))
        .map_or(lines.len(), |(i, _)| i);
    (start + 1..end)
        .find(|&i| {
            lines[i]
                .trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .unwrap_or(start)
        + 1
}

/// SD-NAME: 1-32 printable US-ASCII characters except '=', ' ', ']' and '"'.
pub fn valid_sd_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| (33..=126).contains(&b) && !matches!(b, b'=' | b']' | b'"'))
}
