//! SIEM outputs: every alert event (open, update, resolve) shipped to the receivers listed
//! under `[[outputs]]`, in order, each by a task of its own so the agent's loop never waits.
//!
//! - A [`Format`] renders one event (CEF, LEEF 2.0, JSON, ECS, OCSF, Splunk HEC, webhook body).
//! - A [`delivery::Output`] delivers a batch of events (syslog over UDP/TCP/TLS, a rotated
//!   JSON lines file, Splunk HEC, a webhook) and says how many were sent, rejected or must be
//!   retried.
//! - Each output kind is a module of its own; what they share sits below them, in
//!   [`error`], [`config`], [`record`] and [`delivery`], and this module only runs them.
//! - Network outputs append every event to a durable, bounded [`spool::Spool`] on disk first
//!   and deliver from it with retries and exponential backoff: a receiver outage loses
//!   nothing, and when the bound is hit the oldest are dropped and counted.
//! - Every event carries an idempotent id (alert id, event, the alert's update count), the
//!   same at every output and on every retry, so a deduplicating receiver never counts twice.

pub mod config;
pub mod delivery;
pub mod error;
pub mod file;
pub mod hec;
pub mod http;
pub mod ship;
pub mod spool;
pub mod syslog;
pub mod webhook;

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use log::{info, warn};
use tokio::sync::mpsc;

use crate::detect::AlertEvent;

// What the rest of the crate uses, by the names it had when all of it was in this file.
pub use crate::formats::{Format, Record, rfc3339_ms};
pub use config::{OutputConfig, locate, validate};
use delivery::update;
pub use delivery::{OutputStats, SharedStats, worker};

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
    tx: mpsc::Sender<crate::ship::ShipRecord>,
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
                    Box::new(crate::formats::ecs::Ecs)
                } else {
                    Box::new(crate::formats::ocsf::Ocsf)
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
                ship_one(ship, crate::ship::ShipRecord::alert(&ship.agent, e));
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
    pub fn ship_summary(&self, summary: crate::ship::Summary) {
        if let Some(ship) = &self.ship {
            ship_one(ship, crate::ship::ShipRecord::summary(&ship.agent, summary));
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

fn ship_one(ship: &Shipping, rec: crate::ship::ShipRecord) {
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

#[cfg(test)]
pub mod tests {
    use serde::Deserialize;

    use super::{
        config::ConfigError,
        delivery::{Delivery, Output, backoff},
        error::OutputError,
        *,
    };
    use crate::detect::{Alert, AlertState, Mode, Technique, event_id};

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
            mode: Mode::Alert,
            state: AlertState::Open,
            window: "1m".into(),
            evidence: evidence.into(),
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
            explain: None,
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
