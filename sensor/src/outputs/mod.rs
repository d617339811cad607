//! SIEM outputs: every alert event (open, update, resolve) shipped to the receivers listed
//! under `[[outputs]]`, in order, each by a task of its own so the agent's loop never waits.
//!
//! - A [`Format`] renders one event (CEF, LEEF 2.0, JSON, ECS, OCSF, Splunk HEC, webhook body).
//! - An [`Output`] delivers a batch of events (syslog over UDP/TCP/TLS, a rotated JSON lines
//!   file, Splunk HEC, a webhook) and says how many were sent, rejected or must be retried.
//! - Network outputs append every event to a durable, bounded [`spool::Spool`] on disk first
//!   and deliver from it with retries and exponential backoff: a receiver outage loses
//!   nothing, and when the bound is hit the oldest are dropped and counted.
//! - Every event carries an idempotent id (alert id, event, the alert's update count), the
//!   same at every output and on every retry, so a deduplicating receiver never counts twice.

pub mod cef;
pub mod ecs;
pub mod file;
pub mod hec;
pub mod http;
pub mod leef;
pub mod ocsf;
pub mod ship;
pub mod spool;
pub mod syslog;
pub mod webhook;

use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use log::{info, warn};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::detect::{Alert, AlertEvent, event_id};

/// Errors of the outputs module; the agent reports them with context (anyhow at the edges).
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Config(String),
    #[error("receiver answered HTTP {status}: {reason}")]
    Http { status: u16, reason: String },
    #[error("{0}")]
    Protocol(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl OutputError {
    pub fn io(what: impl Into<String>, e: std::io::Error) -> Self {
        Self::Io(what.into(), e)
    }
}

// --- configuration ------------------------------------------------------------------------

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

    fn is_network(&self) -> bool {
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
                    && (!syslog::valid_sd_name(sd) || !sd.contains('@'))
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

// --- events -------------------------------------------------------------------------------

/// One alert event as outputs carry it, and as the webhook posts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Idempotent: `<alert id>:<event>:<updates>`, the same at every output and every retry.
    pub id: String,
    /// Position in this output's stream (1, 2, ...): delivery order.
    pub seq: u64,
    /// open, update or resolve.
    pub event: String,
    pub alert: Alert,
}

impl Record {
    pub fn new(e: &AlertEvent) -> Self {
        Self {
            id: event_id(&e.alert, e.event),
            seq: 0,
            event: e.event.to_owned(),
            alert: e.alert.clone(),
        }
    }

    /// When the event happened (unix ms): the resolution for a resolve, else the last match.
    pub fn time_ms(&self) -> u64 {
        if self.event == "resolve"
            && let Some(t) = self
                .alert
                .resolved_at
                .as_deref()
                .and_then(|s| humantime::parse_rfc3339_weak(s).ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        {
            return t.as_millis() as u64;
        }
        self.alert.last_seen_ms
    }

    pub fn time_rfc3339(&self) -> String {
        rfc3339_ms(self.time_ms())
    }

    /// The alert's key as an IP address, when it is one (address and forwarded keys).
    pub fn source_ip(&self) -> Option<std::net::IpAddr> {
        match self.alert.key_kind.as_str() {
            "address" | "forwarded" => self.alert.key.parse().ok(),
            _ => None,
        }
    }

    /// (requests, bytes in, bytes out) of the alert's window (1h for totals-only rules).
    pub fn counters(&self) -> (u64, u64, u64) {
        let e = &self.alert.evidence;
        let w = match self.alert.window.as_str() {
            w @ ("1m" | "10m" | "1h") => w,
            _ => "1h",
        };
        let get = |k: String| e.get(&k).copied().unwrap_or(0.0).max(0.0) as u64;
        (
            get(format!("requests_{w}")),
            get(format!("bytes_in_{w}")),
            get(format!("bytes_out_{w}")),
        )
    }
}

pub fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Renders one event in one format (a syslog MSG, a JSON line, an HTTP body).
pub trait Format: Send + Sync {
    fn format(&self, rec: &Record) -> String;
}

/// The whole record as JSON (syslog `message = "json"`, webhook bodies).
pub struct JsonFormat;

impl Format for JsonFormat {
    fn format(&self, rec: &Record) -> String {
        serde_json::to_string(rec).unwrap_or_default()
    }
}

/// What one delivery attempt achieved: the first `sent` records of the batch arrived, the
/// `rejected` after them were refused for good (dropped and counted); with `error`, the rest
/// is retried after a backoff.
#[derive(Debug, Default)]
pub struct Delivery {
    pub sent: usize,
    pub rejected: usize,
    pub error: Option<OutputError>,
    /// The receiver asked to wait at least this long (HTTP Retry-After).
    pub retry_after: Option<Duration>,
}

impl Delivery {
    pub fn all(n: usize) -> Self {
        Self {
            sent: n,
            ..Self::default()
        }
    }

    pub fn failed(sent: usize, error: OutputError) -> Self {
        Self {
            sent,
            error: Some(error),
            ..Self::default()
        }
    }
}

/// A transport: delivers batches of records, in order.
pub trait Output: Send + 'static {
    /// What it delivers: alert events ([`Record`]) for SIEM outputs.
    type Item: spool::Spooled;
    /// Records per delivery attempt.
    fn batch_max(&self) -> usize {
        1
    }
    fn deliver<'a>(
        &'a mut self,
        batch: &'a [Self::Item],
    ) -> impl Future<Output = Delivery> + Send + 'a;
}

// --- counters -----------------------------------------------------------------------------

/// Per-output counters, served in `/v1/health` under `outputs`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OutputStats {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Where it delivers (address, URL or path).
    pub target: String,
    /// Events the receiver accepted.
    pub sent: u64,
    /// Failed delivery attempts that were retried later.
    pub retried: u64,
    /// Events appended to the spool (on disk for network outputs).
    pub spooled: u64,
    /// Events waiting in the spool now.
    pub pending: u64,
    /// Events lost: oldest dropped at the spool bound, refused by the receiver (HTTP 400), or
    /// not queued because the output's queue was full.
    pub dropped: u64,
    /// Events the receiver refused for good (part of `dropped`).
    pub rejected: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub last_sent_at: Option<String>,
}

pub type SharedStats = Arc<Mutex<OutputStats>>;

fn update(stats: &SharedStats, f: impl FnOnce(&mut OutputStats)) {
    if let Ok(mut s) = stats.lock() {
        f(&mut s);
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

// --- the running outputs ------------------------------------------------------------------

/// Events queued per output between the agent's loop and the output's task.
const QUEUE: usize = 4096;
const DEFAULT_SPOOL_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// File outputs keep undelivered lines in memory only (the file is the durable copy).
const MEMORY_SPOOL_MAX_BYTES: u64 = 16 * 1024 * 1024;
const DEFAULT_RETRY_MAX_SECS: u64 = 60;
pub const DEFAULT_TIMEOUT_SECS: u64 = 10;

struct Running {
    name: String,
    tx: mpsc::Sender<Record>,
    stats: SharedStats,
}

/// Shipping to a collector (`[ship]`, see `ship`): alerts and summaries.
struct Shipping {
    agent: String,
    tx: mpsc::Sender<crate::wire::ShipRecord>,
    stats: SharedStats,
}

/// The configured outputs, started: the agent publishes events, the API reads counters.
#[derive(Default)]
pub struct Outputs {
    running: Vec<Running>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    ship: Option<Shipping>,
}

impl Outputs {
    /// Builds and starts every output (spools are opened here: an unusable spool directory or
    /// a missing token file fails the agent's start, not later).
    pub fn start(configs: &[OutputConfig], state_dir: &Path) -> anyhow::Result<Self> {
        let mut outputs = Self::default();
        for (i, c) in configs.iter().enumerate() {
            let name = c.display_name(i);
            outputs
                .start_one(c, &name, state_dir)
                .map_err(|e| anyhow::anyhow!("output `{name}`: {e:#}"))?;
        }
        Ok(outputs)
    }

    fn start_one(&mut self, c: &OutputConfig, name: &str, state_dir: &Path) -> anyhow::Result<()> {
        let timeout = Duration::from_secs(c.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS));
        let spool = if c.is_network() {
            let dir = c
                .spool_dir
                .clone()
                .unwrap_or_else(|| state_dir.join("spool").join(name));
            spool::Spool::open(&dir, c.spool_max_bytes.unwrap_or(DEFAULT_SPOOL_MAX_BYTES))?
        } else {
            spool::Spool::memory(MEMORY_SPOOL_MAX_BYTES)
        };
        let retry_max = Duration::from_secs(c.retry_max_secs.unwrap_or(DEFAULT_RETRY_MAX_SECS));
        let stats: SharedStats = Arc::new(Mutex::new(OutputStats {
            name: name.to_owned(),
            kind: c.kind.clone(),
            ..OutputStats::default()
        }));
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = match c.kind.as_str() {
            "syslog" => {
                let out = syslog::SyslogOutput::new(c, timeout)?;
                set_target(&stats, out.target());
                tokio::spawn(worker(out, spool, rx, stats.clone(), retry_max))
            }
            "ecs-file" | "ocsf-file" => {
                let format: Box<dyn Format> = if c.kind == "ecs-file" {
                    Box::new(ecs::Ecs)
                } else {
                    Box::new(ocsf::Ocsf)
                };
                let out = file::FileOutput::new(c, format)?;
                set_target(&stats, out.target());
                tokio::spawn(worker(out, spool, rx, stats.clone(), retry_max))
            }
            "hec" => {
                let out = hec::HecOutput::new(c, timeout)?;
                set_target(&stats, out.target());
                tokio::spawn(worker(out, spool, rx, stats.clone(), retry_max))
            }
            "webhook" => {
                let out = webhook::WebhookOutput::new(c, timeout)?;
                set_target(&stats, out.target());
                tokio::spawn(worker(out, spool, rx, stats.clone(), retry_max))
            }
            other => anyhow::bail!("unknown output type `{other}`"),
        };
        info!("output `{name}` ({}) started", c.kind);
        self.running.push(Running {
            name: name.to_owned(),
            tx,
            stats,
        });
        self.tasks.push(task);
        Ok(())
    }

    /// Starts shipping to the collector `c` describes, as agent `agent` (the spool is opened
    /// and the token read here: problems fail the agent's start).
    pub fn start_shipping(
        &mut self,
        c: &ship::ShipConfig,
        agent: &str,
        state_dir: &Path,
    ) -> anyhow::Result<()> {
        let dir = c.spool_dir(state_dir);
        let spool = spool::Spool::open(&dir, c.spool_max_bytes)?;
        let stream = ship::stream_id(&dir)?;
        let out = ship::ShipOutput::new(c, agent, stream)?;
        let stats: SharedStats = Arc::new(Mutex::new(OutputStats {
            name: "collector".into(),
            kind: "collector".into(),
            target: out.target(),
            ..OutputStats::default()
        }));
        let (tx, rx) = mpsc::channel(QUEUE);
        let retry_max = Duration::from_secs(c.retry_max_secs);
        self.tasks.push(tokio::spawn(worker(
            out,
            spool,
            rx,
            stats.clone(),
            retry_max,
        )));
        info!("shipping to the collector at {} as `{agent}`", c.url);
        self.ship = Some(Shipping {
            agent: agent.to_owned(),
            tx,
            stats,
        });
        Ok(())
    }

    /// Queues alert events for every output; never waits (a full queue drops and counts).
    pub fn publish(&self, events: &[AlertEvent]) {
        for e in events {
            self.queue(&Record::new(e));
            if let Some(ship) = &self.ship {
                ship_one(ship, crate::wire::ShipRecord::alert(&ship.agent, e));
            }
        }
    }

    /// Queues already-built records (the collector forwarding agents' alerts).
    pub fn publish_records(&self, records: &[Record]) {
        for rec in records {
            self.queue(rec);
        }
    }

    /// Queues one event for every SIEM output.
    fn queue(&self, rec: &Record) {
        for r in &self.running {
            if let Err(err) = r.tx.try_send(rec.clone()) {
                update(&r.stats, |s| s.dropped += 1);
                warn!("output `{}`: event {} not queued: {err}", r.name, rec.id);
            }
        }
    }

    /// Queues a per-client summary for the collector (when shipping is on).
    pub fn ship_summary(&self, summary: crate::wire::Summary) {
        if let Some(ship) = &self.ship {
            ship_one(ship, crate::wire::ShipRecord::summary(&ship.agent, summary));
        }
    }

    pub fn shipping(&self) -> bool {
        self.ship.is_some()
    }

    /// Makes these outputs' counters the ones `/v1/health` shows (see [`health`]).
    pub fn register(&self) {
        if let Ok(mut r) = REGISTRY.lock() {
            *r = self
                .running
                .iter()
                .map(|r| r.stats.clone())
                .chain(self.ship.as_ref().map(|s| s.stats.clone()))
                .collect();
        }
    }

    /// Stops taking events and lets each output deliver what it holds, for at most `grace`
    /// (a network output's spool keeps the rest for the next start).
    pub async fn shutdown(mut self, grace: Duration) {
        self.running.clear();
        self.ship = None;
        let tasks = std::mem::take(&mut self.tasks);
        let all = async {
            for t in tasks {
                let _ = t.await;
            }
        };
        let _ = tokio::time::timeout(grace, all).await;
    }
}

fn ship_one(ship: &Shipping, rec: crate::wire::ShipRecord) {
    if let Err(err) = ship.tx.try_send(rec) {
        update(&ship.stats, |s| s.dropped += 1);
        warn!("collector: record not queued: {err}");
    }
}

/// The running outputs' counters, for `/v1/health` (one agent per process).
static REGISTRY: Mutex<Vec<SharedStats>> = Mutex::new(Vec::new());

/// A copy of every running output's counters.
pub fn health() -> Vec<OutputStats> {
    REGISTRY
        .lock()
        .map(|r| {
            r.iter()
                .filter_map(|s| s.lock().ok().map(|s| s.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn set_target(stats: &SharedStats, target: String) {
    update(stats, |s| s.target = target);
}

/// Backoff after `failures` consecutive failures: 1 s, 2 s, 4 s ... up to `max`.
pub fn backoff(failures: u32, max: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    Duration::from_millis(1000u64.saturating_mul(1 << exp)).min(max)
}

/// One output's task: spool what arrives, deliver in order, retry with backoff.
pub async fn worker<O: Output>(
    mut out: O,
    mut spool: spool::Spool<O::Item>,
    mut rx: mpsc::Receiver<O::Item>,
    stats: SharedStats,
    retry_max: Duration,
) {
    let name = stats.lock().map(|s| s.name.clone()).unwrap_or_default();
    let mut failures: u32 = 0;
    let mut next_attempt = tokio::time::Instant::now();
    let mut closed = false;
    update(&stats, |s| s.pending = spool.len() as u64);
    loop {
        // Take in everything queued, without waiting.
        loop {
            match rx.try_recv() {
                Ok(rec) => append(&mut spool, rec, &stats, &name),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if spool.is_empty() {
            if closed {
                return;
            }
            match rx.recv().await {
                Some(rec) => append(&mut spool, rec, &stats, &name),
                None => closed = true,
            }
            continue;
        }
        if tokio::time::Instant::now() < next_attempt {
            if closed {
                // Shutting down while the receiver is away: the spool keeps the rest.
                return;
            }
            tokio::select! {
                rec = rx.recv() => match rec {
                    Some(rec) => append(&mut spool, rec, &stats, &name),
                    None => closed = true,
                },
                _ = tokio::time::sleep_until(next_attempt) => {}
            }
            continue;
        }
        let batch = spool.peek(out.batch_max().max(1));
        let d = out.deliver(&batch).await;
        let done = (d.sent + d.rejected).min(batch.len());
        if done > 0
            && let Err(e) = spool.ack(spool::Spooled::seq(&batch[done - 1]))
        {
            warn!("output `{name}`: cannot record delivery in the spool: {e}");
        }
        update(&stats, |s| {
            s.sent += d.sent as u64;
            s.rejected += d.rejected as u64;
            s.dropped += d.rejected as u64;
            s.pending = spool.len() as u64;
            if d.sent > 0 {
                s.last_sent_at = Some(now_rfc3339());
            }
        });
        match d.error {
            None if done == 0 => {
                // Nothing done and no error: a misbehaving output; do not spin.
                failures += 1;
                next_attempt = tokio::time::Instant::now() + backoff(failures, retry_max);
            }
            None => failures = 0,
            Some(e) => {
                failures += 1;
                let wait = backoff(failures, retry_max).max(d.retry_after.unwrap_or_default());
                next_attempt = tokio::time::Instant::now() + wait;
                let msg = e.to_string();
                if failures == 1 || failures.is_power_of_two() {
                    warn!(
                        "output `{name}`: delivery failed ({msg}); {} event(s) spooled, retrying in {:?}",
                        spool.len(),
                        wait
                    );
                }
                update(&stats, |s| {
                    s.retried += 1;
                    s.last_error = Some(msg);
                    s.last_error_at = Some(now_rfc3339());
                });
            }
        }
    }
}

fn append<T: spool::Spooled>(spool: &mut spool::Spool<T>, rec: T, stats: &SharedStats, name: &str) {
    match spool.append(rec) {
        Ok(dropped) => update(stats, |s| {
            s.spooled += 1;
            s.dropped += dropped;
            s.pending = spool.len() as u64;
        }),
        Err(e) => {
            warn!("output `{name}`: cannot spool an event: {e}");
            update(stats, |s| {
                s.dropped += 1;
                s.last_error = Some(format!("spool: {e}"));
                s.last_error_at = Some(now_rfc3339());
            });
        }
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::detect::Technique;

    /// A sample alert for the formatters' tests.
    pub fn alert(key_kind: &str, key: &str) -> Alert {
        let mut evidence = std::collections::BTreeMap::new();
        evidence.insert("requests_1m".into(), 240.0);
        evidence.insert("bytes_in_1m".into(), 48_000.0);
        evidence.insert("bytes_out_1m".into(), 9_600_000.0);
        evidence.insert("requests_total".into(), 1000.0);
        Alert {
            id: format!("request-flood:{key_kind}:{key}:1800000000"),
            rule_id: "request-flood".into(),
            rule_name: "Sustained request flood".into(),
            key_kind: key_kind.into(),
            key: key.into(),
            severity: "high".into(),
            mode: "alert".into(),
            state: "open".into(),
            window: "1m".into(),
            evidence,
            conditions: Vec::new(),
            baseline: None,
            first_seen: rfc3339_ms(1_800_000_000_000),
            last_seen: rfc3339_ms(1_800_000_002_000),
            first_seen_ms: 1_800_000_000_000,
            last_seen_ms: 1_800_000_002_000,
            resolved_at: None,
            host: "gpu-host-1".into(),
            technique: Technique {
                framework: "MITRE ATLAS".into(),
                id: "AML.T0024.002".into(),
                name: "Extract AI Model".into(),
            },
            updates: 0,
        }
    }

    pub fn record(key_kind: &str, key: &str) -> Record {
        let a = alert(key_kind, key);
        Record {
            id: event_id(&a, "open"),
            seq: 7,
            event: "open".into(),
            alert: a,
        }
    }

    fn parse(text: &str) -> Result<Vec<OutputConfig>, ConfigError> {
        #[derive(Deserialize)]
        struct Only {
            outputs: Vec<OutputConfig>,
        }
        let o: Only = toml::from_str(text).expect("toml");
        validate(&o.outputs).map(|()| o.outputs)
    }

    #[test]
    fn valid_outputs() {
        let text = r#"
[[outputs]]
type = "syslog"
address = "siem.example.net:6514"
protocol = "tls"
message = "leef"
ca_file = "/etc/sensor/ca.pem"

[[outputs]]
type = "ecs-file"
path = "/var/log/sensor/ecs.jsonl"

[[outputs]]
type = "hec"
url = "https://splunk.example.net:8088/services/collector/event"
token_file = "/etc/sensor/hec.token"

[[outputs]]
type = "webhook"
url = "http://127.0.0.1:9000/hook"
"#;
        let o = parse(text).expect("valid");
        assert_eq!(o.len(), 4);
        assert_eq!(o[1].display_name(1), "ecs-file-2");
    }

    #[test]
    fn errors_name_output_and_key() {
        let cases = [
            ("type = \"kafka\"\n", "type"),
            ("type = \"syslog\"\n", "address"),
            ("type = \"syslog\"\naddress = \"nohost\"\n", "address"),
            (
                "type = \"syslog\"\naddress = \"h:514\"\nprotocol = \"sctp\"\n",
                "protocol",
            ),
            (
                "type = \"syslog\"\naddress = \"h:514\"\nmessage = \"xml\"\n",
                "message",
            ),
            (
                "type = \"syslog\"\naddress = \"h:514\"\nca_file = \"/ca.pem\"\n",
                "ca_file",
            ),
            (
                "type = \"syslog\"\naddress = \"h:514\"\npath = \"/x\"\n",
                "path",
            ),
            (
                "type = \"syslog\"\naddress = \"h:514\"\nfacility = \"local9\"\n",
                "facility",
            ),
            ("type = \"ecs-file\"\npath = \"rel.jsonl\"\n", "path"),
            (
                "type = \"ecs-file\"\npath = \"/a\"\nspool_dir = \"/s\"\n",
                "spool_dir",
            ),
            ("type = \"hec\"\nurl = \"http://h:8088/\"\n", "token_file"),
            ("type = \"webhook\"\nurl = \"ftp://h/\"\n", "url"),
            (
                "type = \"webhook\"\nurl = \"http://h/\"\nca_file = \"/ca.pem\"\n",
                "ca_file",
            ),
            (
                "type = \"webhook\"\nurl = \"http://h/\"\nspool_max_bytes = 0\n",
                "spool_max_bytes",
            ),
        ];
        for (body, key) in cases {
            let text =
                format!("[[outputs]]\ntype = \"ocsf-file\"\npath = \"/o\"\n\n[[outputs]]\n{body}");
            let err = parse(&text).expect_err(body);
            assert_eq!((err.index, err.key), (1, key), "{body}: {err}");
        }
        let dup = "[[outputs]]\ntype = \"ecs-file\"\npath = \"/a\"\nname = \"x\"\n\
                   [[outputs]]\ntype = \"ocsf-file\"\npath = \"/b\"\nname = \"x\"\n";
        assert_eq!(parse(dup).expect_err("dup").key, "name");
    }

    #[test]
    fn locate_finds_the_key_in_its_table() {
        let text = "[[outputs]]\ntype = \"syslog\"\naddress = \"a:1\"\n\n[[outputs]]\ntype = \"syslog\"\n\
                    protocol = \"x\"\naddress = \"b:1\"\n";
        assert_eq!(locate(text, 1, "address"), 8);
        assert_eq!(locate(text, 0, "address"), 3);
        assert_eq!(
            locate(text, 1, "facility"),
            5,
            "absent key: the table header"
        );
    }

    #[test]
    fn event_ids_are_stable_and_distinct() {
        let mut a = alert("address", "10.0.0.1");
        let open = event_id(&a, "open");
        assert_eq!(open, event_id(&a, "open"));
        a.updates = 12;
        assert_ne!(
            event_id(&a, "update"),
            event_id(&alert("address", "10.0.0.1"), "update")
        );
        assert_ne!(event_id(&a, "update"), event_id(&a, "resolve"));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let max = Duration::from_secs(60);
        assert_eq!(backoff(1, max), Duration::from_secs(1));
        assert_eq!(backoff(2, max), Duration::from_secs(2));
        assert_eq!(backoff(4, max), Duration::from_secs(8));
        assert_eq!(backoff(30, max), max);
    }

    /// Fails its first `fail` attempts, refuses records whose id is in `refuse`.
    struct Flaky {
        fail: usize,
        refuse: Vec<String>,
        got: Arc<Mutex<Vec<String>>>,
    }

    impl Output for Flaky {
        type Item = Record;
        fn batch_max(&self) -> usize {
            2
        }

        async fn deliver(&mut self, batch: &[Record]) -> Delivery {
            if self.fail > 0 {
                self.fail -= 1;
                return Delivery::failed(0, OutputError::Protocol("receiver down".into()));
            }
            let mut got = self.got.lock().expect("lock");
            for (i, r) in batch.iter().enumerate() {
                if self.refuse.contains(&r.id) {
                    return Delivery {
                        sent: i,
                        rejected: 1,
                        ..Delivery::default()
                    };
                }
                got.push(r.id.clone());
            }
            Delivery::all(batch.len())
        }
    }

    async fn drive(out: Flaky, n: u32) -> (Vec<String>, OutputStats) {
        let got = out.got.clone();
        let stats: SharedStats = Arc::default();
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(worker(
            out,
            spool::Spool::memory(1 << 20),
            rx,
            stats.clone(),
            Duration::from_millis(20),
        ));
        for i in 1..=n {
            let mut r = record("address", "10.0.0.1");
            r.id = format!("e{i}");
            tx.send(r).await.expect("send");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let s = stats.lock().expect("lock").clone();
            if s.sent + s.dropped == u64::from(n) && s.pending == 0 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "stuck: {s:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(tx);
        task.await.expect("worker");
        let s = stats.lock().expect("lock").clone();
        let got = got.lock().expect("lock").clone();
        (got, s)
    }

    #[tokio::test]
    async fn worker_retries_in_order_and_counts() {
        let out = Flaky {
            fail: 3,
            refuse: vec!["e3".into()],
            got: Arc::default(),
        };
        let (got, s) = drive(out, 5).await;
        assert_eq!(
            got,
            ["e1", "e2", "e4", "e5"],
            "in order, the refused one dropped"
        );
        assert_eq!((s.sent, s.retried, s.spooled), (4, 3, 5));
        assert_eq!((s.dropped, s.rejected), (1, 1));
        assert_eq!(s.last_error.as_deref(), Some("receiver down"));
    }

    #[test]
    fn counters_follow_the_alert_window() {
        let r = record("address", "10.0.0.1");
        assert_eq!(r.counters(), (240, 48_000, 9_600_000));
        assert_eq!(r.source_ip(), Some("10.0.0.1".parse().expect("ip")));
        assert_eq!(record("identity", "k-1").source_ip(), None);
    }
}
