//! The collector's figures: ingest rate on one core, and the time from an extraction bot's
//! first request to the agent's alert and to the collector's fleet alert.
//!
//! The collector runs pinned to CPU 0 (`taskset`), its load generator (`sensor
//! bench-collector`, synthetic agents through the real TLS, token, gzip, validation, journal
//! and merge path) on CPU 1; the collector's CPU time comes from /proc, so the rate per core
//! is records merged per second of its CPU time.

use std::{
    fs,
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use super::{
    Bench, load,
    procs::{self, Agent, AgentSpec, Proc, check_interrupted, run_bounded},
};

/// One ingest run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ingest {
    pub seconds: f64,
    pub batches: u64,
    pub summaries: u64,
    /// Client rows merged (one client's counts of one 10-second period from one agent).
    pub rows: u64,
    pub compressed_bytes: u64,
    pub collector_cpu_s: f64,
    pub rss_kib: u64,
}

impl Ingest {
    pub fn rows_per_s(&self) -> f64 {
        self.rows as f64 / self.seconds.max(1e-9)
    }

    pub fn rows_per_cpu_s(&self) -> f64 {
        self.rows as f64 / self.collector_cpu_s.max(1e-9)
    }

    pub fn cpu_pct(&self) -> f64 {
        100.0 * self.collector_cpu_s / self.seconds.max(1e-9)
    }
}

/// One extraction bot: seconds from its first request to each alert.
#[derive(Debug, Clone, Copy, Default)]
pub struct AlertTime {
    pub agent_s: f64,
    pub fleet_s: f64,
    /// The bot's request rate.
    pub rate: f64,
}

pub const AGENTS: usize = 16;
/// Extraction bots timed per transport, each against a new agent.
pub const TRIALS: usize = 3;
const READER: &str = "bench-reader-token-0123456789";

pub(super) struct Collector {
    pub(super) proc_: Proc,
    pub(super) url: String,
    pub(super) ca: PathBuf,
    pub(super) agent_tokens: Vec<(String, String)>,
}

fn openssl(args: &[&str]) -> anyhow::Result<()> {
    let out = run_bounded(Command::new("openssl").args(args), Duration::from_secs(60))?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A CA (`ca.pem`) and a server certificate for 127.0.0.1 it signed (`cert.pem`, `key.pem`)
/// in `dir`: the collector's, and the NATS server's in the JetStream phase.
pub(super) fn tls_material(dir: &std::path::Path) -> anyhow::Result<()> {
    let p = |n: &str| dir.join(n).to_string_lossy().into_owned();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.pem"),
        "-days",
        "2",
        "-subj",
        "/CN=bench CA",
    ])?;
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &p("key.pem"),
        "-out",
        &p("srv.csr"),
        "-subj",
        "/CN=collector.bench",
    ])?;
    fs::write(dir.join("ext"), "subjectAltName=IP:127.0.0.1\n")?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("srv.csr"),
        "-CA",
        &p("ca.pem"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-out",
        &p("cert.pem"),
        "-days",
        "2",
        "-extfile",
        &p("ext"),
    ])?;
    Ok(())
}

impl Bench<'_> {
    fn start_collector(&self, name: &str) -> anyhow::Result<Collector> {
        let dir = self.dir.join(name);
        fs::create_dir_all(&dir)?;
        tls_material(&dir)?;
        self.start_collector_in(&dir, "", 0, "warn")
    }

    /// A collector of its own in `dir` (which holds [`tls_material`]), pinned to `cpu`, with
    /// `extra` appended to its configuration (e.g. `[nats]`).
    pub(super) fn start_collector_in(
        &self,
        dir: &std::path::Path,
        extra: &str,
        cpu: usize,
        log: &str,
    ) -> anyhow::Result<Collector> {
        let p = |n: &str| dir.join(n).to_string_lossy().into_owned();
        let agent_tokens: Vec<(String, String)> = (1..=AGENTS)
            .map(|i| {
                (
                    format!("bench-{i}"),
                    format!("bench-agent-token-{i}-0123456789"),
                )
            })
            .collect();
        let mut tokens: String = agent_tokens
            .iter()
            .map(|(n, t)| format!("agent {n} {t}\n"))
            .collect();
        tokens.push_str(&format!("reader bench-reader {READER}\n"));
        fs::write(dir.join("tokens"), tokens)?;
        let port = procs::free_port()?;
        fs::write(
            dir.join("collector.toml"),
            format!(
                "[listen]\naddress = \"127.0.0.1:{port}\"\ntls_cert_file = \"{}\"\n\
                 tls_key_file = \"{}\"\ntokens_file = \"{}\"\n\n[state]\ndir = \"{}\"\n\n{extra}",
                p("cert.pem"),
                p("key.pem"),
                p("tokens"),
                p("state"),
            ),
        )?;
        let mut proc_ = Proc::spawn(
            Command::new("taskset")
                .args(["-c", &cpu.to_string()])
                .arg(&self.bin)
                .args(["collector", "--config"])
                .arg(dir.join("collector.toml"))
                .env("RUST_LOG", log),
            &dir.join("collector.log"),
        )?;
        procs::wait_listening(port, "the collector", &mut proc_)?;
        Ok(Collector {
            proc_,
            url: format!("https://127.0.0.1:{port}"),
            ca: dir.join("ca.pem"),
            agent_tokens,
        })
    }

    /// Records per second the collector merges on one core.
    pub(super) fn collector_ingest(&self, results: &mut super::Results) -> anyhow::Result<()> {
        let c = self.start_collector("collector-ingest")?;
        let tokens = self.dir.join("collector-ingest").join("bench.tokens");
        let lines: String = c
            .agent_tokens
            .iter()
            .map(|(n, t)| format!("{n} {t}\n"))
            .collect();
        fs::write(&tokens, lines)?;
        let pid = c.proc_.pid();
        // The collector's taskset child is the collector itself (taskset execs it).
        let (u0, s0) = procs::cpu_seconds(pid)?;
        let seconds = self.opts.seconds.max(5) * 2;
        let out = run_bounded(
            Command::new("taskset")
                .args(["-c", "1"])
                .arg(&self.bin)
                .args(["bench-collector", "--url"])
                .arg(format!("{}/v1/ingest", c.url))
                .arg("--ca-file")
                .arg(&c.ca)
                .arg("--tokens-file")
                .arg(&tokens)
                .args(["--seconds", &seconds.to_string()]),
            Duration::from_secs(seconds + 60),
        )?;
        if !out.status.success() {
            bail!(
                "sensor bench-collector failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let (u1, s1) = procs::cpu_seconds(pid)?;
        let v: Value =
            serde_json::from_slice(&out.stdout).context("bench-collector's JSON line")?;
        let ingest = Ingest {
            seconds: v["seconds"].as_f64().unwrap_or(0.0),
            batches: v["batches"].as_u64().unwrap_or(0),
            summaries: v["records"].as_u64().unwrap_or(0),
            rows: v["rows"].as_u64().unwrap_or(0),
            compressed_bytes: v["compressed_bytes"].as_u64().unwrap_or(0),
            collector_cpu_s: (u1 - u0) + (s1 - s0),
            rss_kib: procs::status_kib(pid, "VmRSS")?,
        };
        eprintln!(
            "bench: collector merged {:.0} rows/s ({:.0} per CPU-second, {:.0} % of one core)",
            ingest.rows_per_s(),
            ingest.rows_per_cpu_s(),
            ingest.cpu_pct()
        );
        results.ingest = Some(ingest);
        Ok(())
    }

    /// An extraction bot against nginx with the default rules: seconds to the agent's alert
    /// and to the collector's fleet alert (the agent ships to it).
    pub(super) fn time_to_alert(&self, results: &mut super::Results) -> anyhow::Result<()> {
        let c = self.start_collector("collector-alert")?;
        let dir = self.dir.join("alert-agent");
        fs::create_dir_all(&dir)?;
        let mut configs = Vec::new();
        for (trial, (name, token)) in c.agent_tokens.iter().take(TRIALS).enumerate() {
            let token_file = dir.join(format!("ship-{trial}.token"));
            fs::write(&token_file, token)?;
            let config = dir.join(format!("sensor-{trial}.toml"));
            fs::write(
                &config,
                format!(
                    "[ship]\nurl = \"{}/v1/ingest\"\ntoken_file = \"{}\"\nca_file = \"{}\"\n\
                     agent_name = \"{name}\"\n",
                    c.url,
                    token_file.display(),
                    c.ca.display()
                ),
            )?;
            configs.push(config);
        }
        results.alert_times = self.alert_trials(&c, &configs, 40)?;
        Ok(())
    }

    /// Extraction bots (from 127.`net`.0.1, .2, ...), each against a new agent shipping to
    /// `c`, with a config of its own from `configs`: each under its own name, as a new host
    /// (an agent under the name of one just stopped, without its state, would have the
    /// period of its predecessor's early part refused as overlapping).
    pub(super) fn alert_trials(
        &self,
        c: &Collector,
        configs: &[std::path::PathBuf],
        net: u8,
    ) -> anyhow::Result<Vec<AlertTime>> {
        let mut times = Vec::new();
        for (trial, config) in (0..).zip(configs) {
            check_interrupted()?;
            let agent = procs::start_agent(&AgentSpec {
                wrapper: &[],
                bin: &self.bin,
                cgroup: &self.cgroup.path,
                ports: &[self.http_port],
                config: Some(config),
                live_read: &self.live_read,
            })?;
            let src = Ipv4Addr::new(127, net, 0, 1 + trial);
            let t = self.one_bot(&agent, c, src)?;
            eprintln!(
                "bench: bot at {:.0} req/s: agent alert after {:.2} s, fleet alert after {:.2} s",
                t.rate, t.agent_s, t.fleet_s
            );
            times.push(t);
            agent.stop(procs::AGENT_PATIENCE)?;
        }
        Ok(times)
    }

    fn one_bot(&self, agent: &Agent, c: &Collector, src: Ipv4Addr) -> anyhow::Result<AlertTime> {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let target = self.target();
        let bot = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if load::one_request(src, target, super::REPLY_PATH, true).is_ok() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        let t0 = Instant::now();
        let result = (|| {
            let key = src.to_string();
            let mut agent_s = None;
            let deadline = t0 + Duration::from_secs(60);
            loop {
                check_interrupted()?;
                if agent_s.is_none() {
                    let alerts: Value =
                        serde_json::from_str(&procs::api_get(&agent.socket, "/v1/alerts")?)?;
                    if has_alert(&alerts, &key, false) {
                        agent_s = Some(t0.elapsed().as_secs_f64());
                    }
                }
                if let Some(agent_s) = agent_s
                    && has_alert(&self.collector_alerts(c)?, &key, true)
                {
                    let fleet_s = t0.elapsed().as_secs_f64();
                    let rate = sent.load(Ordering::Relaxed) as f64 / fleet_s;
                    return Ok(AlertTime {
                        agent_s,
                        fleet_s,
                        rate,
                    });
                }
                if Instant::now() >= deadline {
                    bail!("no alert for {key} within 60 s (agent: {agent_s:?})");
                }
                procs::sleep(Duration::from_millis(20))?;
            }
        })();
        stop.store(true, Ordering::Relaxed);
        let _ = bot.join();
        result
    }

    pub(super) fn collector_alerts(&self, c: &Collector) -> anyhow::Result<Value> {
        collector_get(c, "/v1/alerts")
    }
}

/// GET `path` at the collector with the reader token.
pub(super) fn collector_get(c: &Collector, path: &str) -> anyhow::Result<Value> {
    let out = run_bounded(
        Command::new("curl")
            .args(["-sf", "--max-time", "5", "--cacert"])
            .arg(&c.ca)
            .arg("-H")
            .arg(format!("Authorization: Bearer {READER}"))
            .arg(format!("{}{path}", c.url)),
        Duration::from_secs(10),
    )?;
    if !out.status.success() {
        bail!("GET {path} at the collector failed");
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// An open alert for `key`: a fleet rule's (ids `fleet-...`) or any other.
fn has_alert(alerts: &Value, key: &str, fleet: bool) -> bool {
    alerts.as_array().is_some_and(|a| {
        a.iter().any(|a| {
            a["key"] == key
                && a["rule_id"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("fleet-") == fleet)
        })
    })
}
