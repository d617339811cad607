//! Agent configuration: an embedded default, overridden by an optional TOML file and flags.
//!
//! Errors name the file, the line and the key, because an operator fixing a config on a host
//! should not have to guess.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// The defaults, documented; `sensor run` without `--config` uses exactly this.
pub const DEFAULT_CONFIG: &str = include_str!("default-config.toml");

/// Where installs (`sensor install`, the Debian package) keep the identity secret: /etc is
/// read-only for the hardened service, so the installer creates it there once.
pub const INSTALLED_SECRET: &str = "/etc/sensor/identity.key";

/// The configuration an install writes to /etc/sensor/sensor.toml: the defaults, with the
/// identity secret in /etc (a development `sensor run` keeps it in its state directory).
pub fn installed_config() -> String {
    DEFAULT_CONFIG.replacen(
        "secret_file = \"\"",
        &format!("secret_file = \"{INSTALLED_SECRET}\""),
        1,
    )
}

/// Largest `[capture] live_slots` (68 MiB of slots): the array is kernel memory held for the
/// agent's life, and a walk that writes only to slots must stay under the kernel's limit of
/// objects per read of an iterator (MAX_ITER_OBJECTS, 1 000 000).
pub const LIVE_SLOTS_LIMIT: u32 = 1 << 19;
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub capture: Capture,
    #[serde(default)]
    pub api: Api,
    #[serde(default)]
    pub connections: Connections,
    #[serde(default)]
    pub clients: Clients,
    #[serde(default)]
    pub state: State,
    #[serde(default)]
    pub metrics: Metrics,
    #[serde(default)]
    pub identity: Identity,
    #[serde(default)]
    pub detect: Detect,
    /// Shipping to a collector (`[ship]`), off by default: see docs/collector.md.
    #[serde(default)]
    pub ship: crate::sinks::ship::ShipConfig,
    /// SIEM outputs (`[[outputs]]`), none by default: see docs/outputs.md.
    #[serde(default)]
    pub outputs: Vec<crate::sinks::SinkConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Detect {
    pub interval_secs: u64,
    pub resolve_after_secs: u64,
    pub suppress_secs: u64,
    pub allow_addresses: Vec<String>,
    pub allow_identities: Vec<String>,
    pub alerts_file: PathBuf,
    pub baseline_min_minutes: u64,
    pub time_scale: u64,
    /// `[detect.signals]`: the score's and the ring rule's scales, learning mode.
    pub signals: crate::detect::SignalConfig,
    pub rules: Vec<crate::detect::RuleConfig>,
}

impl Default for Detect {
    fn default() -> Self {
        Self {
            interval_secs: 1,
            resolve_after_secs: 120,
            suppress_secs: 600,
            allow_addresses: Vec::new(),
            allow_identities: Vec::new(),
            alerts_file: PathBuf::new(),
            baseline_min_minutes: 30,
            time_scale: 1,
            signals: crate::detect::SignalConfig::default(),
            rules: default_rules(),
        }
    }
}

impl Detect {
    /// Validation errors as (key, message).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let d = self;
        if d.interval_secs == 0 {
            return Err(("interval_secs", "must be at least 1".into()));
        }
        at_most_a_year("interval_secs", d.interval_secs)?;
        at_most_a_year("resolve_after_secs", d.resolve_after_secs)?;
        at_most_a_year("suppress_secs", d.suppress_secs)?;
        at_most_a_year(
            "baseline_min_minutes",
            d.baseline_min_minutes.saturating_mul(60),
        )?;
        if d.time_scale == 0 || d.time_scale > 1000 {
            return Err(("time_scale", "must be 1..=1000".into()));
        }
        d.signals.validate()?;
        for a in &d.allow_addresses {
            if let Err(e) = a.parse::<sensor_http::Cidr>() {
                return Err(("allow_addresses", e.to_string()));
            }
        }
        let mut ids = std::collections::HashSet::new();
        for rule in &d.rules {
            if let Err(e) = crate::detect::Rule::from_config(rule) {
                return Err((e.key, e.to_string()));
            }
            if !ids.insert(rule.id.as_str()) {
                return Err(("id", format!("rule id `{}` is used twice", rule.id)));
            }
        }
        Ok(())
    }
}

/// The embedded default rule set (what `[[detect.rules]]` in the default config lists).
pub fn default_rules() -> Vec<crate::detect::RuleConfig> {
    #[derive(Deserialize)]
    struct Only {
        detect: OnlyDetect,
    }
    #[derive(Deserialize)]
    struct OnlyDetect {
        rules: Vec<crate::detect::RuleConfig>,
    }
    // The embedded config is checked by a unit test; an error here cannot reach users.
    toml::from_str::<Only>(DEFAULT_CONFIG).map_or_else(|_| Vec::new(), |o| o.detect.rules)
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Identity {
    pub head_bytes: u32,
    pub secret_file: PathBuf,
    /// The backend's credential carriers in order of precedence ("authorization", "basic",
    /// a header name, "query:NAME"); unset: any common carrier, ambiguous when they disagree.
    pub credential: Option<Vec<String>>,
    pub trusted_proxies: Vec<String>,
    /// How many trusted proxies append to the forwarding header before this host: the client
    /// is that many entries from the right.
    pub trusted_hops: usize,
    /// "x-forwarded-for" or "forwarded".
    pub forwarded_header: String,
    pub names: std::collections::BTreeMap<String, String>,
}

impl Default for Identity {
    fn default() -> Self {
        Self {
            head_bytes: sensor_common::DEFAULT_HEAD_BYTES,
            secret_file: PathBuf::new(),
            credential: None,
            trusted_proxies: Vec::new(),
            trusted_hops: 1,
            forwarded_header: "x-forwarded-for".into(),
            names: std::collections::BTreeMap::new(),
        }
    }
}

/// Most trusted proxies in a row `trusted_hops` may name.
const MAX_TRUSTED_HOPS: usize = 32;

impl Identity {
    /// The trusted proxies as networks (validated at load).
    pub fn trusted(&self) -> Vec<sensor_http::Cidr> {
        self.trusted_proxies
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect()
    }

    /// How credentials are chosen (validated at load).
    pub fn credential_policy(&self) -> sensor_http::CredentialPolicy {
        match &self.credential {
            None => sensor_http::CredentialPolicy::default(),
            Some(list) => sensor_http::CredentialPolicy {
                carriers: list.iter().filter_map(|c| c.parse().ok()).collect(),
                ordered: true,
            },
        }
    }

    /// The forwarding header (validated at load).
    pub fn forwarded_header(&self) -> sensor_http::ForwardedHeader {
        if self.forwarded_header.eq_ignore_ascii_case("forwarded") {
            sensor_http::ForwardedHeader::Forwarded
        } else {
            sensor_http::ForwardedHeader::XForwardedFor
        }
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.head_bytes > sensor_common::HEAD_BYTES_MAX {
            return Err((
                "head_bytes",
                format!(
                    "{} is more than {}",
                    self.head_bytes,
                    sensor_common::HEAD_BYTES_MAX
                ),
            ));
        }
        if let Some(list) = &self.credential {
            if list.is_empty() {
                return Err((
                    "credential",
                    "name the backend's carriers (e.g. [\"x-api-key\"]), or leave the key out \
                     for the default"
                        .into(),
                ));
            }
            if list.len() > sensor_http::MAX_CARRIERS {
                return Err((
                    "credential",
                    format!("at most {} carriers", sensor_http::MAX_CARRIERS),
                ));
            }
            for c in list {
                if let Err(e) = c.parse::<sensor_http::Carrier>() {
                    return Err(("credential", format!("{c:?}: {e}")));
                }
            }
        }
        for proxy in &self.trusted_proxies {
            if let Err(e) = proxy.parse::<sensor_http::Cidr>() {
                return Err(("trusted_proxies", e.to_string()));
            }
        }
        if !(1..=MAX_TRUSTED_HOPS).contains(&self.trusted_hops) {
            return Err(("trusted_hops", format!("must be 1..={MAX_TRUSTED_HOPS}")));
        }
        let header = self.forwarded_header.to_ascii_lowercase();
        if header != "x-forwarded-for" && header != "forwarded" {
            return Err((
                "forwarded_header",
                "must be \"x-forwarded-for\" or \"forwarded\"".into(),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Clients {
    pub max_clients: usize,
    pub group_prefix_v4: u8,
    pub group_prefix_v6: u8,
}

impl Default for Clients {
    fn default() -> Self {
        Self {
            max_clients: 10_000,
            group_prefix_v4: 24,
            group_prefix_v6: 56,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct State {
    pub dir: PathBuf,
    pub bpf_pin_dir: PathBuf,
    pub snapshot_interval_secs: u64,
}

impl Default for State {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/sensor"),
            bpf_pin_dir: PathBuf::from("/sys/fs/bpf/sensor"),
            snapshot_interval_secs: 5,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    pub listen: String,
    pub bearer_token_file: PathBuf,
    pub top_clients: usize,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            listen: String::new(),
            bearer_token_file: PathBuf::new(),
            top_clients: 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Capture {
    pub ports: Vec<u16>,
    pub cgroup: String,
    pub poll_interval_ms: u64,
    pub max_connections: u32,
    pub ring_buffer_bytes: u32,
    pub request_ring_bytes: u32,
    /// Slots of the array the iterator hands live records through (0: sized for
    /// `max_connections`, see `kernel::live_slots`).
    pub live_slots: u32,
    /// How live connections are read from the kernel (see `LiveRead`).
    pub live_read: LiveRead,
}

/// `[capture] live_read`: the path by which the agent reads live connections.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LiveRead {
    /// The iterator where the kernel loads it, else the map (probed at start).
    #[default]
    Auto,
    /// Socket storage read through a BPF iterator (a tracing program); fails where refused.
    Iterator,
    /// A cookie-keyed map read with batch lookups; needs no tracing program.
    Map,
}

impl std::fmt::Display for LiveRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LiveRead::Auto => "auto",
            LiveRead::Iterator => "iterator",
            LiveRead::Map => "map",
        })
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Api {
    pub socket: PathBuf,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Connections {
    pub closed_retention_secs: u64,
    pub closed_retention_max: usize,
}

impl Default for Capture {
    fn default() -> Self {
        Self {
            ports: vec![8000, 8080, 11434, 80, 443],
            cgroup: String::new(),
            poll_interval_ms: 1000,
            max_connections: sensor_common::DEFAULT_MAX_CONNECTIONS,
            ring_buffer_bytes: sensor_common::DEFAULT_RING_BYTES,
            request_ring_bytes: sensor_common::DEFAULT_REQUEST_RING_BYTES,
            live_slots: 0,
            live_read: LiveRead::Auto,
        }
    }
}

impl Default for Api {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/sensor/sensor.sock"),
        }
    }
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            closed_retention_secs: 300,
            closed_retention_max: 10_000,
        }
    }
}

/// A configuration error, located in its source.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    /// The key at fault as a dotted path from the file's root (`ship.top_clients`,
    /// `outputs[1].protocol`), when it is known.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    /// `file:line: section.key: message`, the form editors and `grep -n` use.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file, self.line)?;
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// `table.key`, or `key` at the root.
fn dotted(table: &str, key: &str) -> String {
    if table.is_empty() {
        key.to_owned()
    } else {
        format!("{table}.{key}")
    }
}

/// Deserializes a config `text`, locating a syntax or type error in `file`.
pub(crate) fn from_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    file: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        // An error inside an `[[outputs]]` table: the sinks know which key it is about.
        if let Some(o) = crate::sinks::deserialize_error(text, &e) {
            return ConfigError {
                file: file.to_owned(),
                line: crate::sinks::locate(text, o.index, &o.key),
                key: Some(format!("outputs[{}].{}", o.index, o.key)),
                message: o.message,
            };
        }
        let offset = e.span().map_or(0, |s| s.start);
        let line = line_of(text, offset);
        let key = path_at(text, offset)
            .or_else(|| key_on_line(text, line).map(|k| dotted(&table_above(text, line), &k)))
            .or_else(|| unknown_field(e.message()));
        ConfigError {
            file: file.to_owned(),
            line,
            key,
            message: e.message().trim().to_owned(),
        }
    })
}

/// A validation error: the table it is in (dotted, e.g. `ship`), the key and the message.
pub(crate) type Invalid = (&'static str, &'static str, String);

pub(crate) use crate::sinks::configure::at_most_a_year;

/// Puts a table's validation error (key, message) in that table.
pub(crate) fn in_table(table: &'static str) -> impl Fn((&'static str, String)) -> Invalid {
    move |(key, message)| (table, key, message)
}

/// Locates a validation error (table, key, message) and the `[[outputs]]` list's errors in
/// `file`.
pub(crate) fn check(
    text: &str,
    file: &str,
    validated: Result<(), Invalid>,
    outputs: &[crate::sinks::SinkConfig],
    state_dir: &Path,
    taken: &[PathBuf],
) -> Result<(), ConfigError> {
    validated.map_err(|(table, key, message)| {
        let offset = find_key(text, table, key);
        // The full path where the key was found (`detect.rules[0].when[0].metric`).
        let path = offset
            .and_then(|o| path_at(text, o))
            .filter(|p| p.ends_with(key))
            .unwrap_or_else(|| dotted(table, key));
        ConfigError {
            file: file.to_owned(),
            line: offset.map_or(1, |o| line_of(text, o)),
            key: Some(path),
            message,
        }
    })?;
    crate::sinks::validate(outputs, state_dir, taken).map_err(|e| ConfigError {
        file: file.to_owned(),
        line: crate::sinks::locate(text, e.index, &e.key),
        key: Some(format!("outputs[{}].{}", e.index, e.key)),
        message: e.message,
    })
}

impl Clients {
    /// Validation errors as (key, message).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.max_clients == 0 {
            return Err(("max_clients", "must be at least 1".into()));
        }
        if self.group_prefix_v4 > 32 {
            return Err(("group_prefix_v4", "must be 0..=32".into()));
        }
        if self.group_prefix_v6 > 128 {
            return Err(("group_prefix_v6", "must be 0..=128".into()));
        }
        Ok(())
    }
}

impl Config {
    /// Parses and validates `text`, reporting errors against `file`.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let config: Config = from_toml(text, file)?;
        let ship_spool: Vec<PathBuf> = config
            .ship
            .enabled()
            .then(|| config.ship.spool_dir(&config.state.dir))
            .into_iter()
            .collect();
        check(
            text,
            file,
            config.validate(),
            &config.outputs,
            &config.state.dir,
            &ship_spool,
        )?;
        Ok(config)
    }

    /// The embedded default configuration.
    pub fn embedded() -> Result<Self, ConfigError> {
        Self::parse(DEFAULT_CONFIG, "<embedded default>")
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        Ok(Self::parse(&text, &path.display().to_string())?)
    }

    fn validate(&self) -> Result<(), Invalid> {
        let c = &self.capture;
        if c.ports.is_empty() {
            return Err((
                "capture",
                "ports",
                "at least one port must be watched".into(),
            ));
        }
        if c.ports.contains(&0) {
            return Err(("capture", "ports", "port 0 cannot be watched".into()));
        }
        if c.poll_interval_ms == 0 || c.poll_interval_ms > 3_600_000 {
            return Err((
                "capture",
                "poll_interval_ms",
                format!("{} is outside 1..=3600000", c.poll_interval_ms),
            ));
        }
        if c.max_connections == 0 {
            return Err(("capture", "max_connections", "must be at least 1".into()));
        }
        // The request ring must hold the largest request event (a head chunk of 16 KiB).
        for (key, bytes, least) in [
            ("ring_buffer_bytes", c.ring_buffer_bytes, 4096),
            ("request_ring_bytes", c.request_ring_bytes, 65536),
        ] {
            if bytes < least || !bytes.is_power_of_two() {
                return Err((
                    "capture",
                    key,
                    format!("{bytes} is not a power of two >= {least}"),
                ));
            }
        }
        if c.live_slots > LIVE_SLOTS_LIMIT {
            return Err((
                "capture",
                "live_slots",
                format!("{} is outside 0..={LIVE_SLOTS_LIMIT}", c.live_slots),
            ));
        }
        if self.api.socket.as_os_str().is_empty() {
            return Err(("api", "socket", "must not be empty".into()));
        }
        at_most_a_year("poll_interval_ms", c.poll_interval_ms / 1000)
            .map_err(in_table("capture"))?;
        at_most_a_year(
            "closed_retention_secs",
            self.connections.closed_retention_secs,
        )
        .map_err(in_table("connections"))?;
        at_most_a_year("snapshot_interval_secs", self.state.snapshot_interval_secs)
            .map_err(in_table("state"))?;
        self.clients.validate().map_err(in_table("clients"))?;
        if self.state.snapshot_interval_secs == 0 {
            return Err((
                "state",
                "snapshot_interval_secs",
                "must be at least 1".into(),
            ));
        }
        if !self.state.bpf_pin_dir.is_absolute() {
            return Err((
                "state",
                "bpf_pin_dir",
                "must be an absolute path on a bpffs".into(),
            ));
        }
        self.detect.validate().map_err(in_table("detect"))?;
        self.identity.validate().map_err(in_table("identity"))?;
        self.ship.validate().map_err(in_table("ship"))?;
        let m = &self.metrics;
        if !m.listen.is_empty() {
            if m.listen.parse::<std::net::SocketAddr>().is_err() {
                return Err((
                    "metrics",
                    "listen",
                    format!("`{}` is not an ip:port", m.listen),
                ));
            }
            if m.bearer_token_file.as_os_str().is_empty() {
                return Err((
                    "metrics",
                    "bearer_token_file",
                    "the metrics listener requires a bearer token file".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Parses a port list such as "8000,8080".
pub fn parse_ports(list: &str) -> Result<Vec<u16>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("`{p}` is not a port (1-65535)")),
            Ok(port) => Ok(port),
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|ports| {
            if ports.is_empty() {
                Err("no ports given".into())
            } else {
                Ok(ports)
            }
        })
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The key assigned on 1-based `line`, if the line is `key = value`.
fn key_on_line(text: &str, line: usize) -> Option<String> {
    let content = text.lines().nth(line.checked_sub(1)?)?;
    let (key, _) = content.split_once('=')?;
    let key = key.trim().trim_matches('"');
    (!key.is_empty() && !key.starts_with('[') && !key.starts_with('#')).then(|| key.to_owned())
}

/// The `[table]` or `[[table]]` header last opened before 1-based `line` ("" for the root):
/// a syntax error leaves no document to take the path from.
fn table_above(text: &str, line: usize) -> String {
    text.lines()
        .take(line.saturating_sub(1))
        .filter_map(|l| {
            let l = l.trim();
            let name = l
                .strip_prefix("[[")
                .and_then(|r| r.split_once("]]"))
                .or_else(|| l.strip_prefix('[').and_then(|r| r.split_once(']')))?
                .0;
            Some(name.trim().to_owned())
        })
        .last()
        .unwrap_or_default()
}

fn unknown_field(message: &str) -> Option<String> {
    let rest = message.split_once("unknown field `")?.1;
    Some(rest.split_once('`')?.0.to_owned())
}

/// Dotted path of the key whose name or value holds `offset` (`capture.poll_interval_ms`,
/// `detect.rules[2].threshold`): toml's errors carry a span, not a path.
fn path_at(text: &str, offset: usize) -> Option<String> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    path_in_table(doc.as_table(), offset, "")
}

fn path_in_table(table: &dyn toml_edit::TableLike, offset: usize, prefix: &str) -> Option<String> {
    let holds = |span: Option<std::ops::Range<usize>>| span.is_some_and(|s| s.contains(&offset));
    table.iter().find_map(|(name, item)| {
        let path = dotted(prefix, name);
        if holds(table.get_key_value(name).and_then(|(k, _)| k.span())) {
            return Some(path);
        }
        match item {
            toml_edit::Item::Value(v) => path_in_value(v, offset, path),
            toml_edit::Item::Table(t) => {
                path_in_table(t, offset, &path).or_else(|| holds(t.span()).then_some(path))
            }
            toml_edit::Item::ArrayOfTables(a) => a.iter().enumerate().find_map(|(i, t)| {
                let path = format!("{path}[{i}]");
                path_in_table(t, offset, &path).or_else(|| holds(t.span()).then_some(path))
            }),
            toml_edit::Item::None => None,
        }
    })
}

fn path_in_value(value: &toml_edit::Value, offset: usize, path: String) -> Option<String> {
    let inner = match value {
        toml_edit::Value::InlineTable(t) => path_in_table(t, offset, &path),
        toml_edit::Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, v)| path_in_value(v, offset, format!("{path}[{i}]"))),
        _ => None,
    };
    inner.or_else(|| {
        value
            .span()
            .is_some_and(|s| s.contains(&offset))
            .then_some(path)
    })
}

/// Offset where `key` is assigned in `table` (dotted; its sub-tables and inline tables are
/// searched too, first match), else the table's header (the key kept an invalid default),
/// else none. Located by table because one key name can appear in several (`top_clients` is in
/// `[metrics]` and `[ship]`).
fn find_key(text: &str, table: &str, key: &str) -> Option<usize> {
    // The text has parsed already; a failure here only loses the line.
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut current: &dyn toml_edit::TableLike = doc.as_table();
    let mut header = None;
    for name in table.split('.').filter(|n| !n.is_empty()) {
        let Some((k, item)) = current.get_key_value(name) else {
            return header;
        };
        header = item
            .as_table()
            .and_then(toml_edit::Table::span)
            .or_else(|| k.span())
            .map(|s| s.start)
            .or(header);
        let Some(t) = item.as_table_like() else {
            return header;
        };
        current = t;
    }
    key_in_table(current, key).or(header)
}

/// Offset of `key` in `table`, else in its sub-tables, arrays of tables and inline tables.
fn key_in_table(table: &dyn toml_edit::TableLike, key: &str) -> Option<usize> {
    if let Some(span) = table.get_key_value(key).and_then(|(k, _)| k.span()) {
        return Some(span.start);
    }
    table.iter().find_map(|(_, item)| key_in_item(item, key))
}

fn key_in_item(item: &toml_edit::Item, key: &str) -> Option<usize> {
    match item {
        toml_edit::Item::Table(t) => key_in_table(t, key),
        toml_edit::Item::ArrayOfTables(a) => a.iter().find_map(|t| key_in_table(t, key)),
        toml_edit::Item::Value(v) => key_in_value(v, key),
        toml_edit::Item::None => None,
    }
}

fn key_in_value(value: &toml_edit::Value, key: &str) -> Option<usize> {
    match value {
        toml_edit::Value::InlineTable(t) => key_in_table(t, key),
        toml_edit::Value::Array(a) => a.iter().find_map(|v| key_in_value(v, key)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_matches_code_defaults() {
        let embedded = Config::embedded().expect("embedded config parses");
        assert_eq!(embedded.capture, Capture::default());
        assert_eq!(embedded.api, Api::default());
        assert_eq!(embedded.connections, Connections::default());
        assert_eq!(embedded.clients, Clients::default());
        assert_eq!(embedded.state, State::default());
        assert_eq!(embedded.metrics, Metrics::default());
        assert_eq!(embedded.identity, Identity::default());
        assert_eq!(embedded.detect, Detect::default());
        assert_eq!(embedded.ship, crate::sinks::ship::ShipConfig::default());
        assert!(
            embedded.detect.rules.len() >= 8,
            "the default rules are embedded"
        );
    }

    #[test]
    fn documented_defaults_are_the_embedded_ones() {
        let docs = include_str!("../../docs/configuration.md");
        assert!(
            docs.contains(DEFAULT_CONFIG),
            "docs/configuration.md must quote sensor/src/default-config.toml verbatim"
        );
    }

    #[test]
    fn packaged_config_is_the_installed_one() {
        let packaged = include_str!("../../packaging/sensor.toml");
        assert_eq!(
            packaged,
            installed_config(),
            "regenerate packaging/sensor.toml"
        );
        let c = Config::parse(packaged, "packaging/sensor.toml").expect("parses");
        assert_eq!(c.identity.secret_file, PathBuf::from(INSTALLED_SECRET));
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("", "x.toml").expect("empty config parses");
        assert_eq!(c.capture.ports, vec![8000, 8080, 11434, 80, 443]);
    }

    #[test]
    fn type_error_names_file_line_and_key() {
        let text = "[capture]\nports = [8080]\npoll_interval_ms = \"fast\"\n";
        let err = Config::parse(text, "/etc/sensor/sensor.toml").unwrap_err();
        assert_eq!(err.file, "/etc/sensor/sensor.toml");
        assert_eq!(err.line, 3);
        assert_eq!(err.key.as_deref(), Some("capture.poll_interval_ms"));
        assert!(
            err.to_string()
                .starts_with("/etc/sensor/sensor.toml:3: capture.poll_interval_ms: ")
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let text = "[capture]\n\nprots = [8080]\n";
        let err = Config::parse(text, "s.toml").unwrap_err();
        assert_eq!(err.line, 3);
        assert_eq!(err.key.as_deref(), Some("capture.prots"));
    }

    #[test]
    fn invalid_value_is_located() {
        let text = "[capture]\nports = [8080]\nring_buffer_bytes = 5000\n";
        let err = Config::parse(text, "s.toml").unwrap_err();
        assert_eq!(
            (err.line, err.key.as_deref()),
            (3, Some("capture.ring_buffer_bytes"))
        );
        let text = "[capture]\nrequest_ring_bytes = 65536\n\nrequest_ring_bytes_x = 1\n";
        assert_eq!(Config::parse(text, "s.toml").unwrap_err().line, 4);
        for bad in ["4096", "100000"] {
            let text = format!("[capture]\nports = [8080]\nrequest_ring_bytes = {bad}\n");
            let err = Config::parse(&text, "s.toml").unwrap_err();
            assert_eq!(
                (err.line, err.key.as_deref()),
                (3, Some("capture.request_ring_bytes")),
                "{bad}"
            );
        }
        let err = Config::parse("[capture]\nports = [0]\n", "s.toml").unwrap_err();
        assert_eq!((err.line, err.key.as_deref()), (2, Some("capture.ports")));
        for bad in ["524289", "-1", "\"many\""] {
            let text = format!("[capture]\nports = [8080]\n\nlive_slots = {bad}\n");
            let err = Config::parse(&text, "s.toml").unwrap_err();
            assert_eq!(
                (err.line, err.key.as_deref()),
                (4, Some("capture.live_slots")),
                "{bad}"
            );
        }
        for good in ["0", "1", "524288"] {
            let text = format!("[capture]\nlive_slots = {good}\n");
            assert!(Config::parse(&text, "s.toml").is_ok(), "{good}");
        }
    }

    /// One key name in two tables: the error is at the invalid table's line, not at the
    /// first `top_clients =` in the file.
    #[test]
    fn invalid_value_is_located_in_its_table() {
        let text = "[metrics]\ntop_clients = 20\n\n[ship]\n\
                    url = \"https://collector.example.net:9443/v1/ingest\"\n\
                    token_file = \"/etc/sensor/ship.token\"\ntop_clients = 0\n";
        let err = Config::parse(text, "s.toml").unwrap_err();
        assert_eq!(
            (err.line, err.key.as_deref()),
            (7, Some("ship.top_clients"))
        );
        assert!(
            err.to_string().starts_with("s.toml:7: ship.top_clients: "),
            "{err}"
        );
        // The same in dotted keys and in an inline table.
        let dotted = "ship.url = \"https://c:1/v1/ingest\"\nship.token_file = \"/t\"\n\
                      ship.top_clients = 0\n\n[metrics]\ntop_clients = 20\n";
        let err = Config::parse(dotted, "s.toml").unwrap_err();
        assert_eq!(
            (err.line, err.key.as_deref()),
            (3, Some("ship.top_clients"))
        );
        let inline = "metrics = { top_clients = 20 }\n\
                      ship = { url = \"https://c:1/v1/ingest\", token_file = \"/t\",\
                      top_clients = 0 }\n";
        let err = Config::parse(inline, "s.toml").unwrap_err();
        assert_eq!(
            (err.line, err.key.as_deref()),
            (2, Some("ship.top_clients"))
        );
    }

    /// A key that kept an invalid default is not in the text: its table's header.
    #[test]
    fn missing_key_is_located_at_its_table() {
        let text = "[ship]\ntoken_file = \"/t\"\n\n[metrics]\nlisten = \"127.0.0.1:9465\"\n";
        let err = Config::parse(text, "s.toml").unwrap_err();
        assert_eq!(
            (err.line, err.key.as_deref()),
            (4, Some("metrics.bearer_token_file"))
        );
        // `[ship]` is not enabled (no url), so its token_file is not the missing key.
        let text = "[metrics]\nbearer_token_file = \"/m\"\n\n[ship]\n\
                    url = \"https://c:1/v1/ingest\"\n";
        let err = Config::parse(text, "s.toml").unwrap_err();
        assert_eq!((err.line, err.key.as_deref()), (4, Some("ship.token_file")));
    }

    /// Keys inside `[[detect.rules]]` and their inline `when` tables are found under
    /// `[detect]` (the first such key: errors do not say which rule).
    #[test]
    fn rule_errors_are_located_in_the_rules() {
        let text = "[detect]\ninterval_secs = 2\n\n[[detect.rules]]\nid = \"a\"\nname = \"a\"\n\
                    keys = [\"address\"]\n\
                    when = [{ metric = \"bogus\", op = \">\", value = 1 }]\n";
        let err = Config::parse(text, "s.toml").unwrap_err();
        assert_eq!(
            (err.line, err.key.as_deref()),
            (8, Some("detect.rules[0].when[0].metric")),
            "{err}"
        );
    }

    #[test]
    fn metrics_listener_needs_a_token() {
        let text = "[metrics]\nlisten = \"127.0.0.1:9465\"\n";
        let err = Config::parse(text, "s.toml").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("metrics.bearer_token_file"));
    }

    #[test]
    fn identity_settings() {
        let text = "[identity]\ntrusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\"]\n\n\
                    [identity.names]\n\"k-0011aabbccdd\" = \"batch\"\n";
        let c = Config::parse(text, "s.toml").expect("parses");
        assert_eq!(c.identity.trusted().len(), 2);
        assert_eq!(c.identity.names["k-0011aabbccdd"], "batch");
        let err = Config::parse(
            "[identity]\ntrusted_proxies = [\"10.0.0.0/40\"]\n",
            "s.toml",
        )
        .unwrap_err();
        assert_eq!(
            (err.line, err.key.as_deref()),
            (2, Some("identity.trusted_proxies"))
        );
    }

    #[test]
    fn rule_errors_are_located() {
        let text = "[detect]\n\n[[detect.rules]]\nid = \"x\"\nname = \"X\"\nkeys = [\"address\"]\n\
                    when = [{ metric = \"requests\", window = \"2m\", op = \">\", value = 1 }]\n";
        let err = Config::parse(text, "s.toml").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("detect.rules[0].when[0].window"));
        assert!(err.message.contains("rule `x`"), "{err}");
        let text = "[[detect.rules]]\nid = \"x\"\nname = \"X\"\nkeys = [\"address\"]\nseverity = \"dire\"\n\
                    when = [{ metric = \"requests\", op = \">\", value = 1 }]\n";
        let err = Config::parse(text, "s.toml").unwrap_err();
        assert_eq!(
            (err.line, err.key.as_deref()),
            (5, Some("detect.rules[0].severity"))
        );
    }

    #[test]
    fn output_errors_name_file_line_and_key() {
        let text = "[detect]\ntime_scale = 10\n\n[[outputs]]\ntype = \"ecs-file\"\npath = \"/tmp/e.jsonl\"\n\n\
                    [[outputs]]\ntype = \"syslog\"\naddress = \"127.0.0.1:514\"\nprotocol = \"quic\"\n";
        let err = Config::parse(text, "/etc/sensor/sensor.toml").unwrap_err();
        assert_eq!(
            (err.line, err.key.as_deref()),
            (11, Some("outputs[1].protocol"))
        );
        assert!(
            err.to_string()
                .starts_with("/etc/sensor/sensor.toml:11: outputs[1].protocol: `quic`"),
            "{err}"
        );
        // A type error inside an output table, and an unknown key.
        let err = Config::parse(
            "[[outputs]]\ntype = \"hec\"\nbatch_max_events = \"many\"\n",
            "s.toml",
        )
        .unwrap_err();
        assert_eq!(
            (err.line, err.key.as_deref()),
            (3, Some("outputs[0].batch_max_events"))
        );
        let err =
            Config::parse("[[outputs]]\ntype = \"hec\"\nurll = \"x\"\n", "s.toml").unwrap_err();
        assert_eq!((err.line, err.key.as_deref()), (3, Some("outputs[0].urll")));
        // A required key that is missing points at its table.
        let err =
            Config::parse("[api]\n\n[[outputs]]\ntype = \"webhook\"\n", "s.toml").unwrap_err();
        assert_eq!((err.line, err.key.as_deref()), (3, Some("outputs[0].url")));
        let ok = Config::parse(text.replace("quic", "tls").as_str(), "s.toml").expect("valid");
        assert_eq!(ok.outputs.len(), 2);
        assert!(Config::embedded().expect("embedded").outputs.is_empty());
    }

    #[test]
    fn port_lists() {
        assert_eq!(parse_ports("8000, 8080").unwrap(), vec![8000, 8080]);
        assert!(parse_ports("80,x").is_err());
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("").is_err());
        assert!(parse_ports("70000").is_err());
    }
}
