//! Sinks: every alert event (open, update, resolve) delivered to the receivers listed under
//! `[[outputs]]` (and, on an agent with `[ship]`, alerts and summaries to the collector), in
//! order, each by a task of its own so the agent's loop never waits. Shaped like Vector's
//! sinks:
//!
//! - [`sink::Sink`]: a destination; `deliver` takes a batch and says what arrived
//!   ([`sink::Delivered`]) or why it failed ([`sink::Failed`]). Each sink classifies its
//!   receiver's answers itself (refused for good, or retry); [`retry::Retry`] only decides
//!   the waiting (exponential backoff, at least the receiver's Retry-After).
//! - [`spool::Spool`]: network sinks append every item to a durable, bounded spool on disk
//!   first and deliver from it: a receiver outage loses nothing, and when the bound is hit
//!   the oldest are dropped and counted.
//! - [`engine::worker`]: the delivery engine, generic over `Sink`: spool, deliver in order,
//!   retry, count ([`stats::OutputStats`], owned per sink).
//! - [`fanout::Outputs`]: the running sinks; offers every input to each, and hands their
//!   counters to whoever serves them ([`Outputs::stats`], [`Outputs::health`]).
//! - [`config::SinkConfig`]: `[[outputs]]` as an internally tagged enum (`type`), one variant
//!   per sink; errors name the output and the key.
//! - One folder per sink: `syslog/`, `hec/`, `file/` (ecs-file, ocsf-file), `webhook/`,
//!   `ship/` (the collector, configured by `[ship]`), `nats/` (the collector's JetStream
//!   transport, `[ship] transport = "nats"`), each with its `config.rs` (the typed
//!   config, `deny_unknown_fields`, its validation), its `sink.rs` (the sink, its request and
//!   the classification of its receiver's answers) and a `mod.rs` that wires the two.
//!
//! Within this module, imports go one way: `error`, `spool`, `stats`, `sink`, `retry`,
//! `engine`, `running`, `configure`, the sink folders, `config`, `fanout`.
//!
//! Every event carries an idempotent id (alert id, event, the alert's update count), the same
//! at every sink and on every retry, so a deduplicating receiver never counts twice.
//!
//! # Adding a sink
//!
//! 1. A folder `sinks/<name>/`: `config.rs` with the config struct
//!    (`#[serde(deny_unknown_fields)]`, a `name: Option<String>`, and for a network sink the
//!    spool and retry keys, read through [`configure::DeliveryKeys`]) and its `validate`;
//!    `sink.rs` with the sink implementing [`sink::Sink`]; `mod.rs` implementing
//!    [`configure::Configure`] for the config (`start`: open the spool, build the sink,
//!    [`running::Running::spawn`]).
//! 2. One variant in [`config::SinkConfig`] (`#[serde(rename = "<type>")]`) and its line in
//!    `SinkConfig::parts`.
//! 3. Its keys in docs/outputs.md.

pub mod config;
pub mod configure;
pub mod engine;
pub mod error;
pub mod fanout;
pub mod file;
pub mod hec;
pub mod nats;
pub mod retry;
pub mod running;
pub mod ship;
pub mod sink;
pub mod spool;
pub mod stats;
pub mod syslog;
pub mod webhook;

// What the rest of the crate uses.
pub use crate::formats::{Record, rfc3339_ms};
pub use config::{SinkConfig, deserialize_error, locate, validate};
pub use fanout::Outputs;
pub use stats::{OutputStats, SinkHealth};

#[cfg(test)]
pub mod tests {
    use serde::Deserialize;

    use std::{
        sync::{Arc, Mutex},
        time::Duration,
    };

    use super::{
        config::ConfigError,
        error::SinkError,
        retry::Retry,
        sink::{Delivered, Failed, Sink},
        stats::SharedStats,
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
            key_kind: key_kind.to_owned().into(),
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

    /// An event is in the spool on disk when `publish` returns, before the sink's task runs:
    /// a crash right after (kill -9, here: the runtime never polls the task) loses nothing.
    #[test]
    fn published_events_are_on_disk_before_publish_returns() {
        let dir = std::env::temp_dir().join(format!("sensor-publish-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // A current-thread runtime that is never driven: the sinks' tasks never run.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _guard = rt.enter();
        let configs = parse(
            "[[outputs]]\ntype = \"webhook\"\nname = \"w\"\nurl = \"http://127.0.0.1:1/hook\"\n",
        )
        .expect("config");
        let outputs = Outputs::start(&configs, &dir).expect("start");
        let events: Vec<_> = (0..3)
            .map(|i| crate::detect::AlertEvent {
                event: crate::detect::EventKind::Open,
                alert: alert("address", &format!("10.0.0.{i}")).into(),
            })
            .collect();
        outputs.publish(&events);
        let on_disk =
            spool::Spool::<Record>::open(&dir.join("spool").join("w"), 1 << 20).expect("reopen");
        let keys: Vec<String> = on_disk
            .peek(10)
            .iter()
            .map(|r| r.alert.key.clone())
            .collect();
        assert_eq!(keys, ["10.0.0.0", "10.0.0.1", "10.0.0.2"]);
        assert_eq!(outputs.stats()[0].spooled, 3);
        drop(outputs);
        drop(_guard);
        drop(rt);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn parse(text: &str) -> Result<Vec<SinkConfig>, ConfigError> {
        #[derive(Deserialize)]
        struct Only {
            outputs: Vec<SinkConfig>,
        }
        let o: Only = toml::from_str(text)
            .map_err(|e| deserialize_error(text, &e).expect("an error in an output"))?;
        validate(&o.outputs, std::path::Path::new("/var/lib/sensor"), &[]).map(|()| o.outputs)
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
            // The token would cross the network in clear.
            (
                "type = \"hec\"\nurl = \"http://h:8088/\"\ntoken_file = \"/t\"\n",
                "url",
            ),
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
            assert_eq!((err.index, err.key.as_str()), (1, key), "{body}: {err}");
        }
        let dup = "[[outputs]]\ntype = \"ecs-file\"\npath = \"/a\"\nname = \"x\"\n\
                   [[outputs]]\ntype = \"ocsf-file\"\npath = \"/b\"\nname = \"x\"\n";
        assert_eq!(parse(dup).expect_err("dup").key, "name");
        // Two spools in one directory: written, or written as another's default.
        let shared = "[[outputs]]\ntype = \"webhook\"\nurl = \"https://a/\"\nspool_dir = \"/s\"\n\
                      [[outputs]]\ntype = \"syslog\"\naddress = \"h:514\"\nspool_dir = \"/s/./\"\n";
        let err = parse(shared).expect_err("shared");
        assert_eq!((err.index, err.key.as_str()), (1, "spool_dir"), "{err}");
        let shadow = "[[outputs]]\ntype = \"webhook\"\nurl = \"https://a/\"\nname = \"w\"\n\
                      [[outputs]]\ntype = \"syslog\"\naddress = \"h:514\"\n\
                      spool_dir = \"/var/lib/sensor/spool/w\"\n";
        assert_eq!(parse(shadow).expect_err("shadow").key, "spool_dir");
        let dotted = "[[outputs]]\ntype = \"webhook\"\nurl = \"https://a/\"\nspool_dir = \"/s/x\"\n\
                      [[outputs]]\ntype = \"syslog\"\naddress = \"h:514\"\n\
                      spool_dir = \"/s/y/../x\"\n";
        assert_eq!(parse(dotted).expect_err("dotted").key, "spool_dir");
        let apart = "[[outputs]]\ntype = \"webhook\"\nurl = \"https://a/\"\nspool_dir = \"/s1\"\n\
                     [[outputs]]\ntype = \"syslog\"\naddress = \"h:514\"\nspool_dir = \"/s2\"\n";
        assert!(parse(apart).is_ok());
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

    /// Fails its first `fail` attempts, refuses records whose id is in `refuse`.
    struct Flaky {
        fail: usize,
        refuse: Vec<String>,
        got: Arc<Mutex<Vec<String>>>,
    }

    impl Sink for Flaky {
        type Item = Record;
        fn target(&self) -> String {
            "flaky".into()
        }

        fn batch_max(&self) -> usize {
            2
        }

        async fn deliver(&mut self, batch: &[Record]) -> Result<Delivered, Failed> {
            if self.fail > 0 {
                self.fail -= 1;
                return Err(Failed::after(
                    0,
                    SinkError::Protocol("receiver down".into()),
                ));
            }
            let mut got = self.got.lock().expect("lock");
            for (i, r) in batch.iter().enumerate() {
                if self.refuse.contains(&r.id) {
                    return Ok(Delivered::rejected(i, 1));
                }
                got.push(r.id.clone());
            }
            Ok(Delivered::all(batch.len()))
        }
    }

    async fn drive(out: Flaky, n: u32) -> (Vec<String>, OutputStats) {
        let got = out.got.clone();
        let stats: SharedStats = Arc::default();
        let queue = engine::Queue::new(spool::Spool::memory(1 << 20), stats.clone());
        let task = tokio::spawn(engine::worker(
            out,
            queue.clone(),
            Retry::new(Duration::from_millis(20)),
        ));
        for i in 1..=n {
            let mut r = record("address", "10.0.0.1");
            r.id = format!("e{i}");
            queue.push(r).expect("spooled");
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
        queue.close();
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

    /// The fan-out pushes on its own thread while the task delivers: once everything is
    /// sent, `pending` must read 0. (A stale length written after the task's last ack left a
    /// CI run waiting forever on `pending: 2` with `sent == spooled`; the window is narrow,
    /// so this guards the invariant rather than reproducing that run every time.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pending_is_zero_once_everything_is_sent() {
        let stats: SharedStats = Arc::default();
        let queue = engine::Queue::new(spool::Spool::memory(1 << 24), stats.clone());
        let out = Flaky {
            fail: 0,
            refuse: vec![],
            got: Arc::default(),
        };
        let task = tokio::spawn(engine::worker(
            out,
            queue.clone(),
            Retry::new(Duration::from_millis(20)),
        ));
        let n = 20_000u64;
        let pusher = {
            let queue = queue.clone();
            std::thread::spawn(move || {
                for i in 1..=n {
                    let mut r = record("address", "10.0.0.1");
                    r.id = format!("e{i}");
                    queue.push(r).expect("spooled");
                }
            })
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let s = loop {
            let s = stats.lock().expect("lock").clone();
            if s.sent == n {
                break s;
            }
            assert!(tokio::time::Instant::now() < deadline, "stuck: {s:?}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        pusher.join().expect("pusher");
        assert_eq!((s.spooled, s.pending), (n, 0), "{s:?}");
        queue.close();
        task.await.expect("worker");
    }

    #[test]
    fn counters_follow_the_alert_window() {
        let r = record("address", "10.0.0.1");
        assert_eq!(r.counters(), (240, 48_000, 9_600_000));
        assert_eq!(r.source_ip(), Some("10.0.0.1".parse().expect("ip")));
        assert_eq!(record("identity", "k-1").source_ip(), None);
    }
}
