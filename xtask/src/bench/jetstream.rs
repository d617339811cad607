//! The collector through NATS JetStream (issue #17): how fast one collector, and a group of
//! two sharing partitions, merge a backlog of agents' batches from JetStream, per second of
//! their CPU; and the time from an extraction bot's first request to the fleet alert when
//! the agent ships over NATS.
//!
//! Each run has a nats-server of its own (JetStream, file store in the bench's directory, TLS
//! with a CA of the run, one user for every synthetic agent and one for the collectors, with
//! the permissions docs/fleet.md gives them). The collectors start, create their streams and
//! (partitioned) settle on their leases; then they are stopped (SIGSTOP) while `sensor
//! bench-collector --nats-url` publishes the backlog through the agents' own JetStream sink,
//! and continued (SIGCONT): the wall time runs from there until every published message is
//! merged (`/v1/health` `nats.messages`), the CPU time is each collector's from /proc over
//! the same span. Each collector is pinned to a CPU of its own where there are two; the
//! nats-server is not pinned.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use super::{
    Bench,
    fleet::{self, AGENTS, Collector},
    procs::{self, Proc, check_interrupted, run_bounded},
};

const STREAM: &str = "SENSOR";
const PREFIX: &str = "sensor.ship";
const AGENT_USER: &str = "bench-agent";
const AGENT_PASSWORD: &str = "bench-agent-password-0123456789";
const COLLECTOR_PASSWORD: &str = "bench-collector-password-0123456789";
/// `[nats] lease_ttl_secs` of the group: long enough that the collectors keep their leases
/// while stopped for the publishing (renewed every fifth, valid until 4 s before expiry),
/// short enough that a newcomer gets its share within a renewal period.
const LEASE_TTL_SECS: u64 = 60;
/// Longest the collectors may stay stopped: well within a lease.
const MAX_STOPPED: Duration = Duration::from_secs(35);
/// Summaries per batch and client rows per summary (as `sensor bench-collector` defaults).
const RECORDS: usize = 20;
const ROWS: usize = 200;

/// One collector of a JetStream run.
#[derive(Debug, Clone, Default)]
pub struct JsCollector {
    pub instance: String,
    /// Its partitions (empty: unpartitioned).
    pub held: Vec<u32>,
    pub messages: u64,
    /// Client rows of the messages it merged.
    pub rows: u64,
    pub cpu_s: f64,
    pub rss_kib: u64,
}

impl JsCollector {
    pub fn rows_per_cpu_s(&self) -> f64 {
        self.rows as f64 / self.cpu_s.max(1e-9)
    }
}

/// One backlog merged from JetStream.
#[derive(Debug, Clone, Default)]
pub struct JsIngest {
    pub partitions: u32,
    pub agents: usize,
    pub summaries: u64,
    pub rows: u64,
    pub messages: u64,
    pub compressed_bytes: u64,
    /// Publishing the backlog (the collectors stopped meanwhile).
    pub publish_s: f64,
    /// From the collectors' continuing to the last message merged.
    pub wall_s: f64,
    pub collectors: Vec<JsCollector>,
}

impl JsIngest {
    pub fn cpu_s(&self) -> f64 {
        self.collectors.iter().map(|c| c.cpu_s).sum()
    }

    pub fn rows_per_cpu_s(&self) -> f64 {
        self.rows as f64 / self.cpu_s().max(1e-9)
    }

    pub fn rows_per_s(&self) -> f64 {
        self.rows as f64 / self.wall_s.max(1e-9)
    }
}

/// A nats-server of the bench's.
pub(super) struct NatsServer {
    _proc: Proc,
    pub(super) url: String,
}

/// The accounts block: every synthetic agent shares one user (publish on the agents'
/// subjects, replies in the agents' inboxes, the hot sketch cells); the collectors share
/// another (as tests/tests/nats.rs and docs/fleet.md give them).
fn accounts(partitions: u32) -> String {
    let mut acks = vec![format!("\"$JS.ACK.{STREAM}.>\"")];
    if partitions > 1 {
        acks.extend((0..partitions).map(|p| format!("\"$JS.ACK.{STREAM}-p{p}.>\"")));
        acks.push(format!("\"$JS.ACK.{STREAM}-alerts.>\""));
    }
    let shared = format!(
        "\"$KV.{STREAM}-leases.>\", \"$KV.{STREAM}-ckpt.>\", \"{PREFIX}-view.>\", \
         \"_INBOX_sensor_collector.>\""
    );
    format!(
        "accounts {{\n  SENSOR {{\n    jetstream: enabled\n    users: [\n      \
         {{ user: \"{AGENT_USER}\", password: \"{AGENT_PASSWORD}\", permissions: {{ \
         publish: {{ allow: [\"{PREFIX}.*\", \"{PREFIX}.*.*\"] }}, \
         subscribe: {{ allow: [\"_INBOX.>\", \"{PREFIX}-hot\"] }} }} }}\n      \
         {{ user: \"collector\", password: \"{COLLECTOR_PASSWORD}\", permissions: {{ \
         publish: {{ allow: [\"$JS.API.>\", {acks}, \"{PREFIX}-hot\", \"{PREFIX}-alerts.>\", \
         \"$JS.FC.KV_{STREAM}-leases.>\", \"$JS.FC.KV_{STREAM}-ckpt.>\", {shared}] }}, \
         subscribe: {{ allow: [{shared}] }} }} }}\n    ]\n  }}\n}}\n",
        acks = acks.join(", ")
    )
}

/// Starts a nats-server with JetStream in `dir` (which holds [`fleet::tls_material`]).
pub(super) fn start_nats(dir: &Path, partitions: u32) -> anyhow::Result<NatsServer> {
    let port = procs::free_port()?;
    let conf = dir.join("nats.conf");
    fs::write(
        &conf,
        format!(
            "server_name: \"bench\"\nlisten: \"127.0.0.1:{port}\"\n\
             jetstream {{\n  store_dir: \"{}\"\n  max_memory_store: 64MB\n  max_file_store: 4GB\n}}\n\
             tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  timeout: 5\n}}\n{}",
            dir.join("nats-store").display(),
            dir.join("cert.pem").display(),
            dir.join("key.pem").display(),
            accounts(partitions),
        ),
    )?;
    fs::write(
        dir.join("agent.creds"),
        format!("{AGENT_USER}:{AGENT_PASSWORD}\n"),
    )?;
    fs::write(
        dir.join("collector.creds"),
        format!("collector:{COLLECTOR_PASSWORD}\n"),
    )?;
    let log = dir.join("nats.log");
    let mut proc_ = Proc::spawn(Command::new("nats-server").arg("-c").arg(&conf), &log)
        .context("starting nats-server (`cargo xtask setup` installs it)")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("Server is ready")
    {
        check_interrupted()?;
        if let Some(status) = proc_.child.try_wait()? {
            bail!(
                "nats-server exited ({status}): {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if Instant::now() >= deadline {
            bail!("nats-server was not ready within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(NatsServer {
        _proc: proc_,
        url: format!("tls://127.0.0.1:{port}"),
    })
}

/// The `[nats]` section of a collector of `partitions` (instance `instance` of a group).
pub(super) fn nats_section(
    dir: &Path,
    nats: &NatsServer,
    partitions: u32,
    instance: &str,
) -> String {
    let mut s = format!(
        "[nats]\nurl = \"{}\"\ncredentials_file = \"{}\"\nca_file = \"{}\"\npartitions = {partitions}\n",
        nats.url,
        dir.join("collector.creds").display(),
        dir.join("ca.pem").display(),
    );
    if partitions > 1 {
        s.push_str(&format!(
            "instance = \"{instance}\"\nlease_ttl_secs = {LEASE_TTL_SECS}\n"
        ));
    }
    s
}

/// Copies the run's TLS material and credentials into a collector's own directory.
fn collector_dir(run: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let dir = run.join(name);
    fs::create_dir_all(&dir)?;
    for f in ["ca.pem", "cert.pem", "key.pem"] {
        fs::copy(run.join(f), dir.join(f)).with_context(|| format!("copying {f}"))?;
    }
    Ok(dir)
}

fn signal(pid: u32, sig: libc::c_int) -> anyhow::Result<()> {
    let pid = libc::pid_t::try_from(pid).context("pid")?;
    // SAFETY: kill has no memory preconditions; the pid is a child of ours, not yet reaped.
    if unsafe { libc::kill(pid, sig) } != 0 {
        bail!("signal {sig} to {pid}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The collectors of a run, continued (SIGCONT) when dropped before they were (an error
/// while they are stopped): their Proc guards then stop them normally.
struct Stopped<'a>(&'a [Collector], bool);

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        if self.1 {
            for c in self.0 {
                let _ = signal(c.proc_.pid(), libc::SIGCONT);
            }
        }
    }
}

fn health(c: &Collector) -> anyhow::Result<Value> {
    fleet::collector_get(c, "/v1/health")
}

fn held(h: &Value) -> Vec<u32> {
    h["partitions"]["held"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_u64)
                .filter_map(|p| u32::try_from(p).ok())
                .collect()
        })
        .unwrap_or_default()
}

impl Bench<'_> {
    /// Both JetStream ingest runs: one collector (unpartitioned), then two sharing 4
    /// partitions.
    pub(super) fn jetstream_ingest(&self, results: &mut super::Results) -> anyhow::Result<()> {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        for (partitions, instances) in [(1u32, &["c1"][..]), (4, &["c1", "c2"][..])] {
            check_interrupted()?;
            let run = self.jetstream_run(partitions, instances, cores)?;
            eprintln!(
                "bench: JetStream, {} collector(s), {} partition(s): {} rows merged in {:.2} s, \
                 {:.0} rows per CPU-second in total ({})",
                run.collectors.len(),
                run.partitions,
                run.rows,
                run.wall_s,
                run.rows_per_cpu_s(),
                run.collectors
                    .iter()
                    .map(|c| format!("{} {:.0}", c.instance, c.rows_per_cpu_s()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            results.jetstream.push(run);
        }
        self.jetstream_alert(results)
    }

    /// Extraction bots against agents shipping over NATS to one collector (unpartitioned):
    /// seconds to the agent's and to the fleet's alert.
    pub(super) fn jetstream_alert(&self, results: &mut super::Results) -> anyhow::Result<()> {
        let dir = self.dir.join("jetstream-alert");
        fs::create_dir_all(&dir)?;
        fleet::tls_material(&dir)?;
        let nats = start_nats(&dir, 1)?;
        let cdir = collector_dir(&dir, "c1")?;
        let c = self.start_collector_in(&cdir, &nats_section(&dir, &nats, 1, "c1"), 0, "warn")?;
        let mut configs = Vec::new();
        for trial in 1..=fleet::TRIALS {
            let config = dir.join(format!("sensor-{trial}.toml"));
            fs::write(
                &config,
                format!(
                    "[ship]\ntransport = \"nats\"\nurl = \"{}\"\ncredentials_file = \"{}\"\n\
                     ca_file = \"{}\"\nagent_name = \"bench-{trial}\"\n",
                    nats.url,
                    dir.join("agent.creds").display(),
                    dir.join("ca.pem").display(),
                ),
            )?;
            configs.push(config);
        }
        results.jetstream_alert_times = self.alert_trials(&c, &configs, 41)?;
        Ok(())
    }

    fn jetstream_run(
        &self,
        partitions: u32,
        instances: &[&str],
        cores: usize,
    ) -> anyhow::Result<JsIngest> {
        let dir = self.dir.join(format!("jetstream-p{partitions}"));
        fs::create_dir_all(&dir)?;
        fleet::tls_material(&dir)?;
        let nats = start_nats(&dir, partitions)?;
        let mut collectors = Vec::new();
        for (i, instance) in instances.iter().enumerate() {
            let cdir = collector_dir(&dir, instance)?;
            let extra = nats_section(&dir, &nats, partitions, instance);
            collectors.push(self.start_collector_in(&cdir, &extra, i % cores, "info")?);
        }
        // Ready: the streams exist, and a group has settled on its leases (an even share).
        let share = partitions as usize / instances.len();
        let deadline = Instant::now() + Duration::from_secs(LEASE_TTL_SECS + 30);
        let mut holdings: Vec<Vec<u32>>;
        loop {
            check_interrupted()?;
            let logs: Vec<String> = instances
                .iter()
                .map(|i| fs::read_to_string(dir.join(i).join("collector.log")).unwrap_or_default())
                .collect();
            holdings = collectors
                .iter()
                .map(|c| health(c).map(|h| held(&h)))
                .collect::<Result<_, _>>()?;
            let ready = if partitions > 1 {
                holdings.iter().all(|h| h.len() == share)
                    && holdings.iter().map(Vec::len).sum::<usize>() == partitions as usize
            } else {
                logs.iter()
                    .all(|l| l.contains("consuming JetStream stream"))
            };
            if ready {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "the JetStream collectors were not ready (holding {holdings:?}); logs in {}",
                    dir.display()
                );
            }
            procs::sleep(Duration::from_millis(250))?;
        }

        for c in &collectors {
            signal(c.proc_.pid(), libc::SIGSTOP)?;
        }
        let mut stopped = Stopped(&collectors, true);
        let stopped_at = Instant::now();
        let batches = self.jetstream_batches();
        let out = run_bounded(
            Command::new(&self.bin)
                .args([
                    "bench-collector",
                    "--nats-url",
                    &nats.url,
                    "--credentials-file",
                ])
                .arg(dir.join("agent.creds"))
                .arg("--ca-file")
                .arg(dir.join("ca.pem"))
                .args([
                    "--partitions",
                    &partitions.to_string(),
                    "--stream",
                    STREAM,
                    "--subject-prefix",
                    PREFIX,
                    "--agents",
                    &AGENTS.to_string(),
                    "--batches",
                    &batches.to_string(),
                    "--records",
                    &RECORDS.to_string(),
                    "--rows",
                    &ROWS.to_string(),
                ]),
            MAX_STOPPED + Duration::from_secs(30),
        )?;
        if !out.status.success() {
            bail!(
                "sensor bench-collector --nats-url failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: Value = serde_json::from_slice(&out.stdout)
            .context("bench-collector's JSON line (JetStream)")?;
        if stopped_at.elapsed() > MAX_STOPPED {
            bail!(
                "publishing the backlog took {:.0} s, longer than the collectors may stay \
                 stopped with their leases ({} s): fewer batches",
                stopped_at.elapsed().as_secs_f64(),
                MAX_STOPPED.as_secs()
            );
        }
        let by_partition: Vec<(u64, u64)> = v["partitions"]
            .as_array()
            .context("partitions in bench-collector's JSON")?
            .iter()
            .map(|p| {
                (
                    p["messages"].as_u64().unwrap_or(0),
                    p["rows"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        let messages = v["messages"].as_u64().unwrap_or(0);
        let cpu0: Vec<(f64, f64)> = collectors
            .iter()
            .map(|c| procs::cpu_seconds(c.proc_.pid()))
            .collect::<Result<_, _>>()?;

        for c in &collectors {
            signal(c.proc_.pid(), libc::SIGCONT)?;
        }
        stopped.1 = false;
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(300);
        let (wall_s, cpu1) = loop {
            check_interrupted()?;
            let merged: u64 = collectors
                .iter()
                .map(|c| health(c).map(|h| h["nats"]["messages"].as_u64().unwrap_or(0)))
                .sum::<anyhow::Result<u64>>()?;
            if merged >= messages {
                let wall_s = t0.elapsed().as_secs_f64();
                let cpu1: Vec<(f64, f64)> = collectors
                    .iter()
                    .map(|c| procs::cpu_seconds(c.proc_.pid()))
                    .collect::<Result<_, _>>()?;
                break (wall_s, cpu1);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the collectors merged {merged} of {messages} messages within 300 s; logs in {}",
                    dir.display()
                );
            }
            procs::sleep(Duration::from_millis(100))?;
        };

        let mut run = JsIngest {
            partitions,
            agents: AGENTS,
            summaries: v["records"].as_u64().unwrap_or(0),
            rows: v["rows"].as_u64().unwrap_or(0),
            messages,
            compressed_bytes: v["compressed_bytes"].as_u64().unwrap_or(0),
            publish_s: v["seconds"].as_f64().unwrap_or(0.0),
            wall_s,
            collectors: Vec::new(),
        };
        for (((c, instance), (before, after)), settled) in collectors
            .iter()
            .zip(instances)
            .zip(cpu0.iter().zip(&cpu1))
            .zip(&holdings)
        {
            let h = health(c)?;
            let held_now = held(&h);
            if held_now != *settled {
                bail!(
                    "{instance} held partitions {settled:?}, then {held_now:?}: a hand-over mid-run"
                );
            }
            let ingest = &h["ingest"];
            for k in ["malformed", "forbidden", "too_large", "implausible"] {
                let n = ingest[k].as_u64().unwrap_or(0);
                if n > 0 {
                    bail!(
                        "{instance} refused {n} messages ({k}); log in {}",
                        dir.display()
                    );
                }
            }
            let parts: Vec<usize> = if partitions > 1 {
                settled.iter().map(|p| *p as usize).collect()
            } else {
                vec![0]
            };
            let (want, rows) = parts
                .iter()
                .filter_map(|p| by_partition.get(*p))
                .fold((0, 0), |(m, r), (pm, pr)| (m + pm, r + pr));
            let merged = h["nats"]["messages"].as_u64().unwrap_or(0);
            if merged != want {
                bail!(
                    "{instance} merged {merged} messages, its partitions {parts:?} hold {want}; \
                     log in {}",
                    dir.display()
                );
            }
            run.collectors.push(JsCollector {
                instance: (*instance).to_owned(),
                held: if partitions > 1 {
                    settled.clone()
                } else {
                    Vec::new()
                },
                messages: merged,
                rows,
                cpu_s: (after.0 - before.0) + (after.1 - before.1),
                rss_kib: procs::status_kib(c.proc_.pid(), "VmRSS")?,
            });
        }
        Ok(run)
    }

    /// Batches per synthetic agent: `--jetstream-rows` client rows in all.
    fn jetstream_batches(&self) -> u64 {
        let per_batch = (AGENTS * RECORDS * ROWS) as u64;
        self.opts.jetstream_rows.div_ceil(per_batch).max(1)
    }
}
