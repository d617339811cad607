//! Agents and the collector over NATS JetStream (issue #17, first slice): real nats-server
//! processes (JetStream on, file storage in the test's temp dir, TLS with the test CA,
//! per-agent users and permissions), real agents in their own cgroups with their own nginx,
//! and `sensor collector` consuming the stream. Ground truth is nginx's log and curl's own
//! measurements; the fleet view (through `sensor clients --collector`) must equal their sum.
//!
//! - Exact through JetStream, and across a kill -9 of the collector mid-run: every summary
//!   counts once, every record is merged once and in order per agent (the received log).
//! - Server-side permissions: an agent publishing on another agent's subject with its own
//!   credentials is refused by the server (its log, the agent's error, nothing merged).
//! - A three-node cluster (stream replicated 3 times): kill -9 of one node mid-run loses
//!   and doubles nothing; every agent alert reaches rsyslog once, in order.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use sensor_tests::natsjwt::Operator;
use sensor_tests::{
    fleet::{
        ThinTraffic, Traffic, fleet_row, fleet_truth, partition_of, requests_to,
        sources_by_partition,
    },
    siem::*,
    *,
};
use serde_json::Value;

const READER_TOKEN: &str = "reader-token-soc-0123456789";
const COLLECTOR_PASSWORD: &str = "collector-password-0123456789";

/// How an agent authenticates to NATS.
enum Cred {
    Password(String),
    /// The seed; the server holds the public key.
    Nkey(String),
    /// A `.creds` file (decentralized auth): the user JWT carries the permissions.
    Creds(String),
}

struct User {
    agent: &'static str,
    cred: Cred,
}

impl User {
    fn password(agent: &'static str) -> Self {
        Self {
            agent,
            cred: Cred::Password(format!("pw-{agent}-0123456789")),
        }
    }

    fn nkey(agent: &'static str) -> Self {
        let seed = nkeys::KeyPair::new_user().seed().expect("nkey seed");
        Self {
            agent,
            cred: Cred::Nkey(seed),
        }
    }

    /// A user of `operator`'s account with the agent's permissions in its JWT.
    fn creds(agent: &'static str, operator: &Operator) -> Self {
        let (publish, subscribe) = agent_permissions(agent);
        Self {
            agent,
            cred: Cred::Creds(operator.user_creds(agent, &publish, &subscribe)),
        }
    }

    /// The agent's credentials file, as `[ship] credentials_file` reads it.
    fn credentials(&self) -> String {
        match &self.cred {
            Cred::Password(p) => format!("{}:{p}\n", self.agent),
            Cred::Nkey(seed) => format!("{seed}\n"),
            Cred::Creds(creds) => creds.clone(),
        }
    }

    /// The server's entry (for users the server configuration lists).
    fn server_entry(&self) -> String {
        let who = match &self.cred {
            Cred::Password(p) => format!("user: \"{}\", password: \"{p}\"", self.agent),
            Cred::Nkey(seed) => format!(
                "nkey: \"{}\"",
                nkeys::KeyPair::from_seed(seed).expect("seed").public_key()
            ),
            Cred::Creds(_) => panic!(
                "{}: a JWT user is not listed in the server's config",
                self.agent
            ),
        };
        let (publish, subscribe) = agent_permissions(self.agent);
        format!(
            "{{ {who}, permissions: {{ publish: {{ allow: [{}] }}, subscribe: {{ allow: [{}] }} }} }}",
            quoted(&publish),
            quoted(&subscribe)
        )
    }
}

/// `["a", "b"]` as the server configuration's list items `"a", "b"`.
fn quoted(subjects: &[String]) -> String {
    subjects
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// An agent's permissions (publish, subscribe): publish on its own subjects only
/// (`sensor.ship.<agent>` unpartitioned, `sensor.ship.<partition>.<agent>` with partitions:
/// one token wildcard, agent names in these tests have no dots), replies in its own inbox
/// only, and the collector's hot sketch cells. Nothing of the collectors' leases,
/// checkpoints or views.
fn agent_permissions(agent: &str) -> (Vec<String>, Vec<String>) {
    (
        vec![
            format!("sensor.ship.{agent}"),
            format!("sensor.ship.*.{agent}"),
        ],
        vec![format!("_INBOX.{agent}.>"), "sensor.ship-hot".to_owned()],
    )
}

/// The collectors' permissions (publish, subscribe; all collectors share one user): the
/// JetStream API, acknowledgements on the stream (`SENSOR`, or `SENSOR-p<N>` for each of
/// `partitions` and `SENSOR-alerts`), the hot sketch cells, and for several collectors
/// (docs/fleet.md, "Permissions of the collectors' users") the alerts stream's subjects
/// (`sensor.ship-alerts.>`), the lease bucket, the checkpoint bucket (with the flow control
/// of their ordered consumers), the view subjects, and replies to the other collectors'
/// view requests in the collectors' inboxes.
fn collector_permissions(partitions: u32) -> (Vec<String>, Vec<String>) {
    let mut publish = vec!["$JS.API.>".to_owned(), "$JS.ACK.SENSOR.>".to_owned()];
    if partitions > 1 {
        publish.extend((0..partitions).map(|p| format!("$JS.ACK.SENSOR-p{p}.>")));
        // The alerts stream's forwarder (one durable consumer).
        publish.push("$JS.ACK.SENSOR-alerts.>".to_owned());
    }
    let shared = [
        "$KV.SENSOR-leases.>",
        "$KV.SENSOR-ckpt.>",
        "sensor.ship-view.>",
        "_INBOX_sensor_collector.>",
    ]
    .map(str::to_owned);
    publish.extend(
        [
            "sensor.ship-hot",
            "sensor.ship-alerts.>",
            "$JS.FC.KV_SENSOR-leases.>",
            "$JS.FC.KV_SENSOR-ckpt.>",
        ]
        .map(str::to_owned),
    );
    publish.extend(shared.iter().cloned());
    (publish, shared.to_vec())
}

/// The accounts block every server of a test shares: the agents and the collectors.
fn accounts(users: &[User], partitions: u32) -> String {
    let mut entries: Vec<String> = users.iter().map(User::server_entry).collect();
    let (publish, subscribe) = collector_permissions(partitions);
    entries.push(format!(
        "{{ user: \"collector\", password: \"{COLLECTOR_PASSWORD}\", permissions: {{ \
         publish: {{ allow: [{}] }}, subscribe: {{ allow: [{}] }} }} }}",
        quoted(&publish),
        quoted(&subscribe)
    ));
    format!(
        "accounts {{\n  SENSOR {{\n    jetstream: enabled\n    users: [\n      {}\n    ]\n  }}\n}}\n",
        entries.join("\n      ")
    )
}

/// One nats-server with JetStream (its store in the test's dir), TLS with the test CA.
struct NatsServer {
    child: Option<Child>,
    conf: PathBuf,
    log: PathBuf,
    port: u16,
}

impl NatsServer {
    /// `cluster`: this node's route port and all nodes' route ports.
    fn start(
        dir: &Path,
        name: &str,
        certs: &Certs,
        accounts: &str,
        port: u16,
        cluster: Option<(u16, &[u16])>,
    ) -> Self {
        fs::create_dir_all(dir).expect("nats dir");
        let cluster = cluster.map_or_else(String::new, |(own, all)| {
            let routes: Vec<String> = all
                .iter()
                .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
                .collect();
            format!(
                "cluster {{\n  name: \"sensor-test\"\n  listen: \"127.0.0.1:{own}\"\n  routes: [{}]\n}}\n",
                routes.join(", ")
            )
        });
        let conf = dir.join("nats.conf");
        fs::write(
            &conf,
            format!(
                "server_name: \"{name}\"\nlisten: \"127.0.0.1:{port}\"\n\
                 jetstream {{\n  store_dir: \"{}\"\n  max_memory_store: 64MB\n  max_file_store: 1GB\n}}\n\
                 tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  timeout: 5\n}}\n{cluster}{accounts}",
                dir.join("store").display(),
                certs.cert.display(),
                certs.key.display(),
            ),
        )
        .expect("nats.conf");
        let mut s = Self {
            child: None,
            conf,
            log: dir.join("nats.log"),
            port,
        };
        s.spawn();
        s
    }

    /// `n` nodes clustered (`n0`, `n1` ... in `dir`), and the URLs of all of them as clients
    /// are given them (comma-separated).
    fn cluster(dir: &Path, certs: &Certs, accounts: &str, n: usize) -> (Vec<Self>, String) {
        let ports: Vec<u16> = (0..n).map(|_| listen_port()).collect();
        let routes: Vec<u16> = (0..n).map(|_| listen_port()).collect();
        let nodes: Vec<Self> = (0..n)
            .map(|i| {
                Self::start(
                    &dir.join(format!("n{i}")),
                    &format!("n{i}"),
                    certs,
                    accounts,
                    ports[i],
                    Some((routes[i], &routes)),
                )
            })
            .collect();
        let urls = nodes.iter().map(Self::url).collect::<Vec<_>>().join(",");
        (nodes, urls)
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("nats log");
        let before = self.log_text().matches("Server is ready").count();
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server (cargo xtask setup installs it)");
        self.child = Some(child);
        wait_for("nats-server to be ready", Duration::from_secs(20), || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("nats-server exited ({status}): {}", self.log_text());
            }
            if self.log_text().matches("Server is ready").count() > before {
                Ok(())
            } else {
                Err("not yet".into())
            }
        });
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `sensor collector` with its HTTPS listener (readers only) and `[nats]`.
struct Collector {
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    port: u16,
    ca: PathBuf,
    reader_token: PathBuf,
    received_log: PathBuf,
}

impl Collector {
    /// `nats_extra` follows the `[nats]` keys (partitions, instance ...), `extra` is appended
    /// to the config (outputs).
    fn start(
        dir: &Path,
        certs: &Certs,
        nats_urls: &str,
        replicas: usize,
        nats_extra: &str,
        extra: &str,
    ) -> Self {
        let creds = format!("collector:{COLLECTOR_PASSWORD}\n");
        Self::start_as(dir, certs, nats_urls, replicas, nats_extra, extra, &creds)
    }

    /// `start` with the NATS credentials file `creds`.
    fn start_as(
        dir: &Path,
        certs: &Certs,
        nats_urls: &str,
        replicas: usize,
        nats_extra: &str,
        extra: &str,
        creds: &str,
    ) -> Self {
        fs::create_dir_all(dir).expect("collector dir");
        let hash = run_ok(
            Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s '{READER_TOKEN}' | sha256sum")),
        );
        let hash = hash.split_whitespace().next().expect("sha256sum");
        fs::write(dir.join("tokens"), format!("reader soc sha256:{hash}\n")).expect("tokens");
        let reader_token = dir.join("reader.token");
        fs::write(&reader_token, READER_TOKEN).expect("reader token");
        let creds_file = dir.join("nats.creds");
        fs::write(&creds_file, creds).expect("creds");
        let port = listen_port();
        let received_log = dir.join("received.jsonl");
        let config = dir.join("collector.toml");
        fs::write(
            &config,
            format!(
                "[listen]\naddress = \"127.0.0.1:{port}\"\ntls_cert_file = \"{}\"\n\
                 tls_key_file = \"{}\"\ntokens_file = \"{}\"\n\n\
                 [state]\ndir = \"{}\"\nsnapshot_interval_secs = 2\nreceived_log = \"{}\"\n\n\
                 [nats]\nurl = \"{nats_urls}\"\ncredentials_file = \"{}\"\nca_file = \"{}\"\n\
                 replicas = {replicas}\n{nats_extra}\n[detect]\ninterval_secs = 1\n\n{extra}",
                certs.cert.display(),
                certs.key.display(),
                dir.join("tokens").display(),
                dir.join("state").display(),
                received_log.display(),
                creds_file.display(),
                certs.ca.display(),
            ),
        )
        .expect("collector.toml");
        let mut c = Self {
            child: None,
            config,
            log: dir.join("collector.log"),
            port,
            ca: certs.ca.clone(),
            reader_token,
            received_log,
        };
        c.spawn();
        c
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("collector log");
        let child = Command::new(sensor_bin())
            .arg("collector")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn sensor collector");
        self.child = Some(child);
        wait_for("the collector to serve", Duration::from_secs(20), || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("collector exited ({status}): {}", self.log_text());
            }
            self.try_get("/v1/health").map(|_| ())
        });
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// GET `path` with the reader token: the body.
    fn try_fetch(&self, path: &str) -> Result<Vec<u8>, String> {
        let out = Command::new("curl")
            .args(["-s", "-f", "--max-time", "10", "--cacert"])
            .arg(&self.ca)
            .arg("-H")
            .arg(format!("Authorization: Bearer {READER_TOKEN}"))
            .arg(format!("{}{path}", self.url()))
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("curl {path}: {}", out.status));
        }
        Ok(out.stdout)
    }

    fn try_get(&self, path: &str) -> Result<Value, String> {
        serde_json::from_slice(&self.try_fetch(path)?).map_err(|e| e.to_string())
    }

    /// `/metrics` (Prometheus text).
    fn metrics(&self) -> String {
        let body = self
            .try_fetch("/metrics")
            .unwrap_or_else(|e| panic!("{e}\n{}", self.log_text()));
        String::from_utf8_lossy(&body).into_owned()
    }

    fn health(&self) -> Value {
        self.try_get("/v1/health")
            .unwrap_or_else(|e| panic!("{e}\n{}", self.log_text()))
    }

    /// `sensor clients --collector ... --json`: the real CLI against the fleet view.
    fn clients_cli(&self, by: &str) -> Vec<Value> {
        self.try_clients_cli(by)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.log_text()))
    }

    /// [`Collector::clients_cli`], its failure (a 503 while a partition changes hands, or
    /// the collector down) as an error.
    fn try_clients_cli(&self, by: &str) -> Result<Vec<Value>, String> {
        let out = Command::new(sensor_bin())
            .args(["clients", "--json", "--by", by, "--collector"])
            .arg(self.url())
            .arg("--token-file")
            .arg(&self.reader_token)
            .arg("--ca-file")
            .arg(&self.ca)
            .output()
            .map_err(|e| format!("spawning sensor clients: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "sensor clients --collector {}: {}: {}",
                self.url(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("clients JSON: {e}"))
    }

    /// `/v1/health`'s `partitions` (several collectors): count, instance, held, and the
    /// counters taken, lost, released, checkpoints.
    fn partitions(&self) -> Result<Partitions, String> {
        let h = self.try_get("/v1/health")?;
        let p = &h["partitions"];
        let n = |k: &str| {
            p[k].as_u64()
                .ok_or_else(|| format!("/v1/health partitions.{k}: {h}"))
        };
        Ok(Partitions {
            count: n("count")?,
            instance: p["instance"].as_str().unwrap_or_default().to_owned(),
            held: p["held"]
                .as_array()
                .ok_or_else(|| format!("/v1/health partitions.held: {h}"))?
                .iter()
                .filter_map(Value::as_u64)
                .collect(),
            taken: n("taken")?,
            lost: n("lost")?,
            released: n("released")?,
            checkpoints: n("checkpoints")?,
            ring_rounds: n("ring_rounds")?,
        })
    }

    fn received(&self) -> Vec<Value> {
        read_jsonl(&self.received_log)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A collector's share of the partitions, from its `/v1/health`.
#[derive(Debug, Clone)]
struct Partitions {
    count: u64,
    instance: String,
    held: BTreeSet<u64>,
    taken: u64,
    lost: u64,
    released: u64,
    checkpoints: u64,
    /// Complete rounds of the ring rule over every partition (run by partition 0's holder).
    ring_rounds: u64,
}

/// One inference host: a cgroup, an nginx on its own port, an agent shipping to JetStream as
/// `name` with `user`'s credentials.
struct Host {
    name: String,
    nginx: Nginx,
    agent: Agent,
    port: u16,
    _cg: Cgroup,
}

impl Host {
    fn start(dir: &Path, name: &str, user: &User, nats_urls: &str, ca: &Path) -> Self {
        Self::start_with(dir, name, user, nats_urls, ca, "", 12)
    }

    /// `extra` follows the agent's `[ship]` keys (more keys, or more tables); its rule
    /// `host-flood` fires past `host_flood` requests a minute from one address.
    fn start_with(
        dir: &Path,
        name: &str,
        user: &User,
        nats_urls: &str,
        ca: &Path,
        extra: &str,
        host_flood: u32,
    ) -> Self {
        let cg = Cgroup::new(&format!("nats-{name}-{}", user.agent));
        let port = free_port();
        let nginx = Nginx::start(&cg, None, &[format!("127.0.0.1:{port}")]);
        let creds = dir.join(format!("{name}-as-{}.creds", user.agent));
        fs::write(&creds, user.credentials()).expect("agent credentials");
        let config = dir.join(format!("{name}-as-{}.toml", user.agent));
        fs::write(
            &config,
            format!(
                "[ship]\ntransport = \"nats\"\nurl = \"{nats_urls}\"\ncredentials_file = \"{}\"\n\
                 ca_file = \"{}\"\nagent_name = \"{name}\"\nretry_max_secs = 1\ntimeout_secs = 3\n{extra}\n\
                 [detect]\ninterval_secs = 1\n\n[[detect.rules]]\nid = \"host-flood\"\n\
                 name = \"Request flood on one host\"\nkeys = [\"address\"]\nseverity = \"high\"\n\
                 when = [{{ metric = \"requests\", window = \"1m\", op = \">\", value = {host_flood} }}]\n",
                creds.display(),
                ca.display(),
            ),
        )
        .expect("agent config");
        let agent = Agent::start_with(
            &cg,
            &[port],
            200,
            &["--config", config.to_str().expect("utf-8")],
        );
        Self {
            name: name.to_owned(),
            nginx,
            agent,
            port,
            _cg: cg,
        }
    }

    /// `n` requests for the small file from `source`, on one keep-alive connection.
    fn requests(&self, source: &str, n: usize) -> Vec<Transfer> {
        let url = format!("http://127.0.0.1:{}/{}", self.port, SMALL.0);
        let ops: Vec<Vec<String>> = (0..n)
            .map(|_| op(&["--interface", source, url.as_str()]))
            .collect();
        curl(Command::new("curl"), &ops)
    }

    /// The ids the SIEM gets for this agent's alert events (`<agent>:<alert id>:<event>:
    /// <updates>`), in the order of its alerts.jsonl.
    fn alert_event_ids(&self) -> Vec<String> {
        self.agent
            .alert_log()
            .iter()
            .map(|e| {
                format!(
                    "{}:{}:{}:{}",
                    self.name,
                    e["alert"]["id"].as_str().unwrap_or("?"),
                    e["event"].as_str().unwrap_or("?"),
                    e["alert"]["updates"]
                )
            })
            .collect()
    }

    /// The agent's delivery counters for the collector.
    fn shipping(&self) -> Value {
        self.agent.health()["outputs"]
            .as_array()
            .and_then(|o| o.iter().find(|s| s["name"] == "collector").cloned())
            .unwrap_or(Value::Null)
    }
}

/// Waits until the fleet view (through the real CLI) shows exactly `truth` for its clients
/// (a view refused meanwhile, 503 during a failover, is asked again).
fn wait_fleet_equals(c: &Collector, truth: &ClientTruth) {
    try_wait_for(
        "the fleet view to equal the summed ground truth",
        Duration::from_secs(90),
        || {
            let rows = c.try_clients_cli("address")?;
            for (client, t) in truth {
                let seen = fleet_row(&rows, client);
                if seen != Some(*t) {
                    return Err(format!("{client}: fleet {seen:?}, truth {t:?}"));
                }
            }
            Ok(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", log_tails(&[c])));
}

/// Every record the collector merged, per agent: each position once, 1, 2, 3 ... in order.
fn assert_each_record_once_in_order(c: &Collector, agents: &[&str]) {
    let received = c.received();
    let mut per_agent: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in &received {
        per_agent
            .entry(r["agent"].as_str().unwrap_or("?").to_owned())
            .or_default()
            .push(r["seq"].as_u64().expect("seq"));
    }
    let names: BTreeSet<&str> = per_agent.keys().map(String::as_str).collect();
    assert_eq!(names, agents.iter().copied().collect(), "agents merged");
    for (agent, seqs) in &per_agent {
        let want: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, &want, "{agent}: each position once, in order");
    }
}

fn agents_in_health(h: &Value) -> BTreeSet<String> {
    h["agents"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The partition share of several collectors: each holds `ceil(count / collectors)`, none
/// holds a partition another holds, together they hold every partition; and each one's
/// counters add up (held = taken - lost - released).
fn check_split(shares: &[&Partitions], count: u64) -> Result<(), String> {
    let each = count.div_ceil(shares.len() as u64);
    let mut all = BTreeSet::new();
    for p in shares {
        if p.count != count {
            return Err(format!(
                "{} counts {} partitions, not {count}",
                p.instance, p.count
            ));
        }
        if p.held.len() as u64 != each {
            return Err(format!("{} holds {:?}, not {each}", p.instance, p.held));
        }
        if !p.held.is_disjoint(&all) {
            return Err(format!(
                "{} holds one of {all:?} too: {:?}",
                p.instance, p.held
            ));
        }
        all.extend(p.held.iter().copied());
    }
    if all != (0..count).collect() {
        return Err(format!("partitions held: {all:?}"));
    }
    for p in shares {
        assert_eq!(
            p.held.len() as u64 + p.lost + p.released,
            p.taken,
            "held = taken - lost - released: {p:?}"
        );
    }
    Ok(())
}

/// Waits until `a` and `b` share the `count` partitions ([`check_split`]).
fn wait_shares(
    a: &Collector,
    b: &Collector,
    count: u64,
    what: &str,
) -> Result<(Partitions, Partitions), String> {
    try_wait_for(what, Duration::from_secs(60), || {
        let (pa, pb) = (a.partitions()?, b.partitions()?);
        check_split(&[&pa, &pb], count)?;
        Ok((pa, pb))
    })
}

/// [`log_tails`] and the NATS nodes' warnings and errors, for failure messages.
fn diagnosis(cs: &[&Collector], nodes: &[NatsServer]) -> String {
    let mut out = log_tails(cs);
    for n in nodes {
        let log = n.log_text();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| {
                (l.contains("[ERR]") || l.contains("[WRN]"))
                    && !l.contains("Error trying to connect to route")
            })
            .collect();
        out.push_str(&format!(
            "\n--- {} (last warnings and errors) ---\n{}",
            n.log.display(),
            lines[lines.len().saturating_sub(30)..].join("\n")
        ));
    }
    out
}

/// The end of each collector's log, for failure messages.
fn log_tails(cs: &[&Collector]) -> String {
    cs.iter()
        .map(|c| {
            let log = c.log_text();
            let lines: Vec<&str> = log.lines().collect();
            format!(
                "--- {} (last lines) ---\n{}",
                c.log.display(),
                lines[lines.len().saturating_sub(60)..].join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The agents' alerts of rule `rule` (each agent's alert ids once, from its alerts.jsonl)
/// and the collector's fleet view of them (`/v1/alerts`), as sorted ids.
fn agent_alert_ids(hosts: &[Host], rule: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for h in hosts {
        let own: BTreeSet<String> = h
            .agent
            .alert_log()
            .iter()
            .filter(|e| e["alert"]["rule_id"] == rule)
            .filter_map(|e| e["alert"]["id"].as_str().map(str::to_owned))
            .collect();
        ids.extend(own);
    }
    ids.sort();
    ids
}

fn fleet_alert_ids(c: &Collector, rule: &str) -> Result<Vec<String>, String> {
    let alerts = c.try_get("/v1/alerts")?;
    let mut ids: Vec<String> = alerts
        .as_array()
        .ok_or_else(|| format!("/v1/alerts: {alerts}"))?
        .iter()
        .filter(|a| a["rule_id"] == rule)
        .filter_map(|a| a["id"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    Ok(ids)
}

/// Three agents (two with passwords, one with an nkey) publish to JetStream; the collector
/// consumes. The fleet view equals nginx's ground truth; then the collector is killed (-9)
/// while agents go on shipping, and restarted: still exact, every record merged once.
#[test]
fn agents_ship_through_jetstream_exactly_across_a_collector_kill() {
    if !privileged("agents_ship_through_jetstream_exactly_across_a_collector_kill") {
        return;
    }
    let tmp = TempDir::new("nats-exact");
    let certs = make_certs(&tmp.path);
    let users = [
        User::password("host-a"),
        User::nkey("host-b"),
        User::password("host-c"),
    ];
    let nats = NatsServer::start(
        &tmp.path.join("nats"),
        "n1",
        &certs,
        &accounts(&users, 1),
        listen_port(),
        None,
    );
    let mut collector =
        Collector::start(&tmp.path.join("collector"), &certs, &nats.url(), 1, "", "");
    let hosts: Vec<Host> = users
        .iter()
        .map(|u| Host::start(&tmp.path, u.agent, u, &nats.url(), &certs.ca))
        .collect();

    // Phase 1: a client split across the three hosts, another on one host only.
    let mut transfers: Vec<Vec<Transfer>> =
        hosts.iter().map(|h| h.requests("127.0.0.77", 12)).collect();
    transfers[0].extend(hosts[0].requests("127.0.0.78", 5));
    let parts = |t: &[Vec<Transfer>]| -> ClientTruth {
        let p: Vec<(&Nginx, &[Transfer])> = hosts
            .iter()
            .zip(t)
            .map(|(h, t)| (&h.nginx, t.as_slice()))
            .collect();
        fleet_truth(&p)
    };
    let truth = parts(&transfers);
    assert_eq!(truth["127.0.0.77"].2, 36);
    wait_fleet_equals(&collector, &truth);
    let health = collector.health();
    assert_eq!(
        agents_in_health(&health),
        ["host-a", "host-b", "host-c"]
            .into_iter()
            .map(String::from)
            .collect(),
        "{health}"
    );
    assert!(
        health["nats"]["messages"].as_u64().unwrap_or(0) >= 3,
        "{health}"
    );
    for h in &hosts {
        let s = h.shipping();
        assert_eq!(s["type"], "jetstream", "{s}");
        assert!(s["sent"].as_u64().unwrap_or(0) >= 1, "{s}");
        assert_eq!(s["dropped"], 0, "{s}");
    }

    // Phase 2: more traffic, and the collector killed while it merges it; phase 3 while it
    // is down. The stream holds everything; the restarted collector resumes at its journal.
    for (h, t) in hosts.iter().zip(transfers.iter_mut()) {
        t.extend(h.requests("127.0.0.77", 7));
    }
    wait_for(
        "the collector to merge part of phase 2",
        Duration::from_secs(30),
        || {
            let n = collector.health()["nats"]["messages"].as_u64().unwrap_or(0);
            if n > health["nats"]["messages"].as_u64().unwrap_or(0) {
                Ok(())
            } else {
                Err(format!("{n} messages"))
            }
        },
    );
    collector.kill9();
    let sent_at_kill: Vec<u64> = hosts
        .iter()
        .map(|h| h.shipping()["sent"].as_u64().unwrap_or(0))
        .collect();
    for (h, t) in hosts.iter().zip(transfers.iter_mut()) {
        t.extend(h.requests("127.0.0.79", 4));
    }
    // The agents go on publishing into the stream while no collector runs.
    wait_for(
        "the agents to publish while the collector is down",
        Duration::from_secs(40),
        || {
            for (h, before) in hosts.iter().zip(&sent_at_kill) {
                let s = h.shipping();
                if s["sent"].as_u64().unwrap_or(0) <= *before || s["pending"] != 0 {
                    return Err(format!("{s}"));
                }
            }
            Ok(())
        },
    );
    collector.spawn();
    let truth = parts(&transfers);
    assert_eq!(truth["127.0.0.77"].2, 36 + 21);
    assert_eq!(truth["127.0.0.79"].2, 12);
    wait_fleet_equals(&collector, &truth);
    // A little longer: nothing arrives twice later either.
    std::thread::sleep(Duration::from_secs(3));
    let rows = collector.clients_cli("address");
    for (client, t) in &truth {
        assert_eq!(fleet_row(&rows, client), Some(*t), "{client}");
    }
    let health = collector.health();
    for a in health["agents"].as_array().expect("agents") {
        assert_eq!(a["gaps"], 0, "{a}");
    }
    assert_eq!(health["ingest"]["malformed"], 0, "{health}");
    assert_each_record_once_in_order(&collector, &["host-a", "host-b", "host-c"]);
}

/// Server-side permissions: host-a's credentials may publish on sensor.ship.host-a only. An
/// agent holding them but shipping as host-b is refused by the server (its log names the
/// violation, the agent's error shows it, nothing is stored or merged), while the honest
/// host-a ships normally.
#[test]
fn an_agent_cannot_publish_on_another_agents_subject() {
    if !privileged("an_agent_cannot_publish_on_another_agents_subject") {
        return;
    }
    an_impostor_is_refused("nats-perms", 1, Auth::Listed);
}

/// The same with decentralized auth (operator mode): every user, the collector's too, has
/// a `.creds` file whose JWT, signed by the account, carries its permissions; the server
/// knows only the operator and the account. host-a ships; host-a's `.creds` shipping as
/// host-b is refused.
#[test]
fn an_agent_with_a_creds_file_cannot_publish_as_another() {
    if !privileged("an_agent_with_a_creds_file_cannot_publish_as_another") {
        return;
    }
    an_impostor_is_refused("nats-perms-jwt", 1, Auth::Operator);
}

/// The same with four partitions (several collectors): host-a's credentials may publish on
/// `sensor.ship.<partition>.host-a` only; shipping as host-b (`sensor.ship.p<N>.host-b`) is
/// refused by the server whatever the partition.
#[test]
fn a_partitioned_agent_cannot_publish_as_another_agent() {
    if !privileged("a_partitioned_agent_cannot_publish_as_another_agent") {
        return;
    }
    an_impostor_is_refused("nats-perms-partitioned", 4, Auth::Listed);
}

/// How a test's nats-server knows its users.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Auth {
    /// Listed in its configuration (passwords, nkeys).
    Listed,
    /// Decentralized: an operator, an account, user JWTs in `.creds` files.
    Operator,
}

/// host-a ships honestly; an agent with host-a's credentials ships as host-b. With
/// `partitions` > 1 both agents and the one collector are partitioned (the collector holds
/// every partition).
fn an_impostor_is_refused(name: &str, partitions: u32, auth: Auth) {
    let tmp = TempDir::new(name);
    let certs = make_certs(&tmp.path);
    let operator = Operator::default();
    let (users, trust, collector_creds) = match auth {
        Auth::Listed => {
            let users = [User::password("host-a"), User::nkey("host-b")];
            let trust = accounts(&users, partitions);
            (users, trust, format!("collector:{COLLECTOR_PASSWORD}\n"))
        }
        Auth::Operator => {
            let (publish, subscribe) = collector_permissions(partitions);
            (
                [
                    User::creds("host-a", &operator),
                    User::creds("host-b", &operator),
                ],
                operator.server_config(),
                operator.user_creds("collector", &publish, &subscribe),
            )
        }
    };
    let nats = NatsServer::start(
        &tmp.path.join("nats"),
        "n1",
        &certs,
        &trust,
        listen_port(),
        None,
    );
    let (nats_extra, ship_extra) = if partitions > 1 {
        (
            format!("partitions = {partitions}\ninstance = \"c1\"\n"),
            format!("partitions = {partitions}\n"),
        )
    } else {
        (String::new(), String::new())
    };
    let collector = Collector::start_as(
        &tmp.path.join("collector"),
        &certs,
        &nats.url(),
        1,
        &nats_extra,
        "",
        &collector_creds,
    );
    let honest = Host::start_with(
        &tmp.path,
        "host-a",
        &users[0],
        &nats.url(),
        &certs.ca,
        &ship_extra,
        12,
    );
    // host-a's credentials, host-b's name: publishes on sensor.ship[.p<N>].host-b.
    let impostor = Host::start_with(
        &tmp.path,
        "host-b",
        &users[0],
        &nats.url(),
        &certs.ca,
        &ship_extra,
        12,
    );
    let honest_t = honest.requests("127.0.0.81", 6);
    let impostor_t = impostor.requests("127.0.0.82", 6);
    let truth = fleet_truth(&[(&honest.nginx, honest_t.as_slice())]);
    wait_fleet_equals(&collector, &truth);

    // The refused subject: host-b's own, or one of its partitions' (`sensor.ship.p<N>.host-b`).
    let refused = |subject: &str| {
        if partitions > 1 {
            subject
                .strip_prefix("sensor.ship.p")
                .and_then(|rest| rest.split_once('.'))
                .is_some_and(|(p, agent)| {
                    agent == "host-b" && p.parse::<u32>().is_ok_and(|p| p < partitions)
                })
        } else {
            subject == "sensor.ship.host-b"
        }
    };
    // The subject between the quotes after `marker` in `text`.
    let quoted_after = |text: &str, marker: &str| -> Option<String> {
        let rest = &text[text.find(marker)? + marker.len()..];
        let rest = rest.strip_prefix('"')?;
        Some(rest[..rest.find('"')?].to_owned())
    };
    let err = wait_for(
        "the impostor's publish to be refused",
        Duration::from_secs(40),
        || {
            let s = impostor.shipping();
            let e = s["last_error"].as_str().unwrap_or("");
            let subject = quoted_after(e, "Permissions Violation for Publish to ");
            if s["retried"].as_u64().unwrap_or(0) >= 2 && subject.as_deref().is_some_and(refused) {
                Ok(s)
            } else {
                Err(s.to_string())
            }
        },
    );
    assert_eq!(err["sent"], 0, "{err}");
    let log = nats.log_text();
    assert!(
        log.lines().any(|l| l.contains("Publish Violation")
            && l.split(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ','))
                .any(refused)),
        "the server logs the refused publish:\n{log}"
    );
    // Nothing of the impostor's reached the stream or the fleet view.
    let health = collector.health();
    if partitions > 1 {
        // Agents the collector knows: none but host-a (the list may be per partition).
        let agents = agents_in_health(&health);
        assert!(!agents.contains("host-b"), "{health}");
    } else {
        assert_eq!(
            agents_in_health(&health),
            ["host-a".to_owned()].into_iter().collect(),
            "{health}"
        );
    }
    assert!(
        fleet_row(&collector.clients_cli("address"), "127.0.0.82").is_none(),
        "{impostor_t:?}"
    );
    if partitions <= 1 {
        assert_each_record_once_in_order(&collector, &["host-a"]);
    }
}

/// A three-node cluster, the stream on all three: one node is killed (-9) while agents
/// publish and the collector consumes; the fleet view still equals the ground truth, every
/// record merged once.
#[test]
fn a_three_node_cluster_loses_nothing_when_a_node_dies() {
    if !privileged("a_three_node_cluster_loses_nothing_when_a_node_dies") {
        return;
    }
    let tmp = TempDir::new("nats-cluster");
    let certs = make_certs(&tmp.path);
    let users = [
        User::password("host-a"),
        User::nkey("host-b"),
        User::password("host-c"),
    ];
    let (mut nodes, urls) = NatsServer::cluster(&tmp.path, &certs, &accounts(&users, 1), 3);
    let rsyslog = Rsyslog::start(&tmp.path, "rsyslog", listen_port(), None, None);
    let collector = Collector::start(
        &tmp.path.join("collector"),
        &certs,
        &urls,
        3,
        "",
        &format!(
            "[[outputs]]\ntype = \"syslog\"\nname = \"siem\"\naddress = \"127.0.0.1:{}\"\n\
             protocol = \"tcp\"\nretry_max_secs = 1\n",
            rsyslog.tcp_port
        ),
    );
    let hosts: Vec<Host> = users
        .iter()
        .map(|u| Host::start(&tmp.path, u.agent, u, &urls, &certs.ca))
        .collect();
    let mut transfers: Vec<Vec<Transfer>> =
        hosts.iter().map(|h| h.requests("127.0.0.91", 10)).collect();
    let parts = |t: &[Vec<Transfer>]| -> ClientTruth {
        let p: Vec<(&Nginx, &[Transfer])> = hosts
            .iter()
            .zip(t)
            .map(|(h, t)| (&h.nginx, t.as_slice()))
            .collect();
        fleet_truth(&p)
    };
    wait_fleet_equals(&collector, &parts(&transfers));

    // One node dies while traffic goes on; the stream's other two replicas carry on.
    for (h, t) in hosts.iter().zip(transfers.iter_mut()) {
        t.extend(h.requests("127.0.0.91", 5));
    }
    nodes[0].kill9();
    for (h, t) in hosts.iter().zip(transfers.iter_mut()) {
        t.extend(h.requests("127.0.0.92", 5));
    }
    let truth = parts(&transfers);
    assert_eq!(truth["127.0.0.91"].2, 45);
    wait_fleet_equals(&collector, &truth);
    std::thread::sleep(Duration::from_secs(3));
    let rows = collector.clients_cli("address");
    for (client, t) in &truth {
        assert_eq!(fleet_row(&rows, client), Some(*t), "{client}");
    }
    let health = collector.health();
    for a in health["agents"].as_array().expect("agents") {
        assert_eq!(a["gaps"], 0, "{a}");
    }
    assert_each_record_once_in_order(&collector, &["host-a", "host-b", "host-c"]);

    // Every agent's alert events (15 requests from 127.0.0.91 on each host cross its rule),
    // published around the node's death, reach rsyslog once each, in each agent's order.
    wait_for(
        "rsyslog to hold every agent alert event once, in order",
        Duration::from_secs(60),
        || {
            let ids = rsyslog.ids();
            for h in &hosts {
                let name = h.name.as_str();
                let expected = h.alert_event_ids();
                let got: Vec<&String> = ids
                    .iter()
                    .filter(|id| id.starts_with(&format!("{name}:")))
                    .collect();
                if expected.is_empty() || got != expected.iter().collect::<Vec<_>>() {
                    return Err(format!("{name}: got {got:?}, expected {expected:?}"));
                }
            }
            Ok(())
        },
    );
}

/// Several collectors over JetStream (issue #17, docs/fleet.md "Several collectors"): a
/// three-node cluster (streams, lease bucket and checkpoints replicated 3 times), three
/// agents shipping in four partitions, two collectors `c1` and `c2` sharing them.
///
/// - They split the partitions two and two; the fleet view from either equals nginx's
///   summed ground truth (each asks the other for its partitions).
/// - c2 is killed (-9) while it merges, traffic goes on, and one NATS node is killed (-9)
///   while c1 takes c2's partitions over (after their leases expire): c1 then holds all four
///   and its view is exact again (c2's partitions loaded from their checkpoints and the
///   streams replayed after them); meanwhile c1's view is refused or whole, never missing a
///   partition's clients.
/// - The node and c2 come back (c2 with its instance name and state dir): c1 gives two
///   partitions back (after checkpointing them), and both views are exact, agents' alerts
///   included.
///
/// Records merged after c2's last checkpoint are merged again by c1 from that checkpoint's
/// state, so the two received logs may list such a record twice between them: together
/// they hold every agent's positions at least once, and the exactly-once guarantee is the
/// one of the merged state, which the exact fleet views check.
#[test]
fn collectors_share_partitions_and_take_over_from_a_killed_one() {
    if !privileged("collectors_share_partitions_and_take_over_from_a_killed_one") {
        return;
    }
    const P: u32 = 4;
    let count = u64::from(P);
    let tmp = TempDir::new("nats-collectors");
    let certs = make_certs(&tmp.path);
    let users = [
        User::password("host-a"),
        User::nkey("host-b"),
        User::password("host-c"),
    ];
    let (mut nodes, urls) = NatsServer::cluster(&tmp.path, &certs, &accounts(&users, P), 3);
    let nats_extra = |instance: &str| {
        format!("partitions = {P}\ninstance = \"{instance}\"\nlease_ttl_secs = 10\n")
    };
    // Both collectors name the same SIEM: the holder of partition 0 forwards the alerts
    // stream to it, whichever collector that is at the time.
    let rsyslog = Rsyslog::start(&tmp.path, "rsyslog", listen_port(), None, None);
    // A fleet rule the heavy client crosses in phase 2, around c2's kill: its alert must
    // reach the SIEM too, once by id, whoever merged it.
    let outputs = format!(
        "[[outputs]]\ntype = \"syslog\"\nname = \"siem\"\naddress = \"127.0.0.1:{}\"\n\
         protocol = \"tcp\"\nretry_max_secs = 1\n\n\
         [[detect.rules]]\nid = \"fleet-heavy\"\nname = \"Heavy across the fleet\"\n\
         keys = [\"address\"]\nseverity = \"high\"\n\
         when = [{{ metric = \"requests\", window = \"1h\", op = \">=\", value = 60 }}]\n",
        rsyslog.tcp_port
    );
    let c1 = Collector::start(
        &tmp.path.join("c1"),
        &certs,
        &urls,
        3,
        &nats_extra("c1"),
        &outputs,
    );
    let mut c2 = Collector::start(
        &tmp.path.join("c2"),
        &certs,
        &urls,
        3,
        &nats_extra("c2"),
        &outputs,
    );
    let ship = format!("partitions = {P}\n");
    let hosts: Vec<Host> = users
        .iter()
        .map(|u| Host::start_with(&tmp.path, u.agent, u, &urls, &certs.ca, &ship, 12))
        .collect();
    // Two client addresses in each partition, each sending to every host in phases; a third
    // in each sends in the background all along (a request every 6 s to each host: below the
    // agents' rule, past the fleet rule after two minutes), through both kills and restarts.
    let sources = sources_by_partition(P, 3);
    let all: Vec<&str> = sources
        .iter()
        .flat_map(|s| &s[..2])
        .map(String::as_str)
        .collect();
    let background: Vec<String> = sources.iter().map(|s| s[2].clone()).collect();
    let ports: Vec<u16> = hosts.iter().map(|h| h.port).collect();
    let traffic_started = Instant::now();
    let traffic = {
        let background = background.clone();
        Traffic::start(&ports, Duration::from_secs(6), move |port, _| {
            background
                .iter()
                .flat_map(|s| requests_to(port, s, 1))
                .collect()
        })
    };
    let mut transfers: Vec<Vec<Transfer>> = hosts.iter().map(|_| Vec::new()).collect();
    let send = |transfers: &mut Vec<Vec<Transfer>>, from: &[&str], n: usize| {
        for (h, t) in hosts.iter().zip(transfers.iter_mut()) {
            for source in from {
                t.extend(h.requests(source, n));
            }
        }
    };
    let parts = |t: &[Vec<Transfer>]| -> ClientTruth {
        let p: Vec<(&Nginx, &[Transfer])> = hosts
            .iter()
            .zip(t)
            .map(|(h, t)| (&h.nginx, t.as_slice()))
            .collect();
        fleet_truth(&p)
    };
    // Phase 1: the partitions split 2 / 2, every partition has clients, both views exact.
    send(&mut transfers, &all, 4);
    let truth = parts(&transfers);
    for source in &all {
        assert_eq!(truth[*source].2, 12, "{source}: {truth:?}");
    }
    let (p1, p2) = wait_shares(
        &c1,
        &c2,
        count,
        "c1 and c2 to hold two partitions each, all four between them",
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", diagnosis(&[&c1, &c2], &nodes)));
    assert_eq!((p1.instance.as_str(), p2.instance.as_str()), ("c1", "c2"));
    wait_fleet_equals(&c1, &truth);
    wait_fleet_equals(&c2, &truth);
    // A checkpoint of c2's partitions with phase 1 in it (every snapshot_interval_secs).
    let since = c2
        .partitions()
        .unwrap_or_else(|e| panic!("{e}"))
        .checkpoints;
    wait_for(
        "c2 to checkpoint its partitions after phase 1",
        Duration::from_secs(60),
        || {
            let p = c2.partitions()?;
            if p.checkpoints >= since + p2.held.len() as u64 {
                Ok(())
            } else {
                Err(format!("{p:?}"))
            }
        },
    );

    // Phase 2: a client of one of c2's partitions crosses every agent's rule (15 requests
    // a minute on each host), and c2 is killed (-9) while it merges the phase.
    let c2_part = *p2.held.first().expect("c2 holds partitions");
    let heavy = sources[c2_part as usize][0].as_str();
    let merged = |c: &Collector| c.health()["nats"]["messages"].as_u64().unwrap_or(0);
    let before = merged(&c2);
    send(&mut transfers, &[heavy], 15);
    send(&mut transfers, &all, 2);
    wait_for(
        "c2 to merge part of phase 2",
        Duration::from_secs(30),
        || {
            let n = merged(&c2);
            if n > before {
                Ok(())
            } else {
                Err(format!("{n} messages"))
            }
        },
    );
    let c1_before = c1.partitions().unwrap_or_else(|e| panic!("{e}"));
    c2.kill9();

    // Phase 3 while c2 is down; one NATS node dies while c1 takes over (the leases of c2's
    // partitions expire within lease_ttl_secs).
    send(&mut transfers, &all, 3);
    nodes[0].kill9();
    let phase1 = truth;
    let took = try_wait_for(
        "c1 to take c2's partitions over",
        Duration::from_secs(60),
        || {
            // Meanwhile the view from c1 is refused (503: a partition without an owner) or
            // whole: every client merged before the kill is in it.
            if let Ok(rows) = c1.try_clients_cli("address") {
                for client in phase1.keys() {
                    assert!(
                        fleet_row(&rows, client).is_some(),
                        "c1's view left out {client} (partition {}): {rows:?}",
                        partition_of("address", client, P)
                    );
                }
            }
            let p = c1.partitions()?;
            if p.held.len() as u64 == count && p.taken >= c1_before.taken + 2 {
                Ok(p)
            } else {
                Err(format!("{p:?}"))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", diagnosis(&[&c1, &c2], &nodes)));
    check_split(&[&took], count).unwrap_or_else(|e| panic!("{e}"));
    let truth = parts(&transfers);
    assert_eq!(truth[heavy].2, 3 * (4 + 15 + 2 + 3), "{truth:?}");
    wait_fleet_equals(&c1, &truth);

    // The node comes back; phase 4 with the cluster whole again.
    nodes[0].spawn();
    send(&mut transfers, &all, 2);
    wait_fleet_equals(&c1, &parts(&transfers));

    // c2 comes back (same instance, same state dir): c1 releases two partitions to it after
    // checkpointing them, c2 loads them and catches up.
    let c1_before = c1.partitions().unwrap_or_else(|e| panic!("{e}"));
    c2.spawn();
    let (p1, p2) = wait_shares(
        &c1,
        &c2,
        count,
        "c1 to give two partitions back to the restarted c2",
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", diagnosis(&[&c1, &c2], &nodes)));
    assert!(
        p1.released >= c1_before.released + 2,
        "c1 gives partitions back by releasing them (after a checkpoint), not by losing \
         them: {c1_before:?} -> {p1:?}\n{}",
        diagnosis(&[&c1, &c2], &nodes)
    );
    assert!(p2.taken >= 2, "{p2:?}");
    // Phase 5 under the new split: both views exact.
    send(&mut transfers, &all, 3);
    let truth = parts(&transfers);
    let light = all.iter().find(|s| **s != heavy).expect("a light client");
    assert_eq!(truth[*light].2, 3 * (4 + 2 + 3 + 2 + 3), "{truth:?}");
    wait_fleet_equals(&c2, &truth);
    wait_fleet_equals(&c1, &truth);

    // Traffic over several minutes: the background goes on to three minutes, then stops;
    // both views count all of it, exactly.
    std::thread::sleep(Duration::from_secs(180).saturating_sub(traffic_started.elapsed()));
    for (t, b) in transfers.iter_mut().zip(traffic.stop()) {
        t.extend(b);
    }
    let truth = parts(&transfers);
    for b in &background {
        assert!(
            truth[b.as_str()].2 >= 3 * 25,
            "{b}: {:?}",
            truth[b.as_str()]
        );
    }
    wait_fleet_equals(&c2, &truth);
    wait_fleet_equals(&c1, &truth);

    // Every agent alert (the heavy client on each host, and any other) in both views, each
    // agent's alert once.
    let alerts = wait_for(
        "every agent alert in the fleet view of both collectors",
        Duration::from_secs(60),
        || {
            let want = agent_alert_ids(&hosts, "host-flood");
            let (a1, a2) = (
                fleet_alert_ids(&c1, "host-flood")?,
                fleet_alert_ids(&c2, "host-flood")?,
            );
            if a1 == want && a2 == want {
                Ok(want)
            } else {
                Err(format!("agents {want:?}, c1 {a1:?}, c2 {a2:?}"))
            }
        },
    );
    let on_heavy = c1
        .try_get("/v1/alerts")
        .unwrap_or_else(|e| panic!("{e}"))
        .as_array()
        .map_or(0, |a| {
            a.iter()
                .filter(|a| a["rule_id"] == "host-flood" && a["key"] == heavy)
                .count()
        });
    assert_eq!(
        on_heavy,
        hosts.len(),
        "each agent's alert on {heavy}: {alerts:?}"
    );

    // A little longer: nothing arrives twice later either, from either collector.
    std::thread::sleep(Duration::from_secs(3));
    for c in [&c1, &c2] {
        let rows = c.clients_cli("address");
        for (client, t) in &truth {
            assert_eq!(fleet_row(&rows, client), Some(*t), "{}: {client}", c.url());
        }
        let health = c.health();
        assert_eq!(health["ingest"]["malformed"], 0, "{health}");
        for a in health["agents"].as_array().into_iter().flatten() {
            assert_eq!(a["gaps"], 0, "{a}");
        }
    }
    check_split(
        &[
            &c1.partitions().unwrap_or_else(|e| panic!("{e}")),
            &c2.partitions().unwrap_or_else(|e| panic!("{e}")),
        ],
        count,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // Between them the received logs hold every agent's positions (at least once: see above).
    wait_for(
        "the received logs to hold every agent's positions 1, 2, 3 ...",
        Duration::from_secs(30),
        || {
            let mut per_agent: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
            for r in c1.received().iter().chain(c2.received().iter()) {
                per_agent
                    .entry(r["agent"].as_str().unwrap_or("?").to_owned())
                    .or_default()
                    .insert(r["seq"].as_u64().unwrap_or(0));
            }
            let names: BTreeSet<&str> = per_agent.keys().map(String::as_str).collect();
            if names != users.iter().map(|u| u.agent).collect() {
                return Err(format!("agents merged: {names:?}"));
            }
            for (agent, seqs) in &per_agent {
                let last = seqs.last().copied().unwrap_or(0);
                if seqs.len() as u64 != last || seqs.first() != Some(&1) {
                    let missing: Vec<u64> = (1..=last).filter(|s| !seqs.contains(s)).collect();
                    return Err(format!("{agent}: positions missing {missing:?}"));
                }
            }
            Ok(())
        },
    );
    // Every agent alert event reached the SIEM, through the alerts stream and its one
    // forwarder, across c2's kill, the node's and the move of partition 0. Replays after a
    // takeover republish with the same ids (dropped by the stream's de-duplication); the
    // one copy a receiver may see twice is an event a dying forwarder sent before storing
    // its position (docs/fleet.md): the same id, for the receiver to drop.
    wait_for(
        "rsyslog to hold every agent alert event",
        Duration::from_secs(60),
        || {
            let got: BTreeSet<String> = rsyslog.ids().into_iter().collect();
            for h in &hosts {
                let name = h.name.as_str();
                let expected: BTreeSet<String> = h.alert_event_ids().into_iter().collect();
                let seen: BTreeSet<String> = got
                    .iter()
                    .filter(|id| id.starts_with(&format!("{name}:")))
                    .cloned()
                    .collect();
                if expected.is_empty() || seen != expected {
                    return Err(format!("{name}: got {seen:?}, expected {expected:?}"));
                }
            }
            Ok(())
        },
    );
    // The fleet rule's alerts: one on the heavy client (3 hosts x 21 requests by the end of
    // phase 2, around c2's kill; a light client makes 42 in all) and one on each background
    // client (past 60 after two minutes), the same in both views, and each one's opening in
    // the SIEM, from whichever collector merged it.
    let mut keyed: Vec<String> = background.iter().map(|b| format!(":{b}:")).collect();
    keyed.push(format!(":{heavy}:"));
    let fleet = wait_for(
        "the fleet rule's alerts in both views",
        Duration::from_secs(60),
        || {
            let (a1, a2) = (
                fleet_alert_ids(&c1, "fleet-heavy")?,
                fleet_alert_ids(&c2, "fleet-heavy")?,
            );
            let one_each = keyed
                .iter()
                .all(|k| a1.iter().filter(|id| id.contains(k.as_str())).count() == 1);
            if one_each && a1.len() == keyed.len() && a1 == a2 {
                Ok(a1)
            } else {
                Err(format!("c1 {a1:?}, c2 {a2:?}"))
            }
        },
    );
    wait_for(
        "each fleet alert's opening in rsyslog",
        Duration::from_secs(60),
        || {
            let ids = rsyslog.ids();
            match fleet
                .iter()
                .find(|f| !ids.iter().any(|id| id.starts_with(&format!("{f}:open:"))))
            {
                Some(f) => Err(format!("{f} not in {ids:?}")),
                None => Ok(()),
            }
        },
    );
    // The ring rule ran over every partition's candidates after the last move.
    let rounds = |c: &Collector| c.partitions().map(|p| p.ring_rounds).unwrap_or(0);
    let before = rounds(&c1) + rounds(&c2);
    wait_for(
        "a complete round of the ring rule over every partition",
        Duration::from_secs(30),
        || {
            let now = rounds(&c1) + rounds(&c2);
            if now > before {
                Ok(())
            } else {
                Err(format!("{now} rounds"))
            }
        },
    );
    // The collectors' own metrics show the failovers: c1 took c2's partitions over (more
    // than its own two) and released two back; c2 (restarted) took two; their exposition
    // agrees with their health.
    for c in [&c1, &c2] {
        let p = c.partitions().unwrap_or_else(|e| panic!("{e}"));
        let text = c.metrics();
        for (event, n) in [
            ("taken", p.taken),
            ("lost", p.lost),
            ("released", p.released),
        ] {
            let line = format!("sensor_collector_partition_changes_total{{event=\"{event}\"}} {n}");
            assert!(
                text.lines().any(|l| l == line),
                "{}: no `{line}` in\n{text}",
                p.instance
            );
        }
        let held = format!("sensor_collector_partitions_held {}", p.held.len());
        assert!(
            text.lines().any(|l| l == held),
            "{}: no `{held}`",
            p.instance
        );
        assert!(text.contains("sensor_collector_ring_rounds_total{result=\"complete\"}"));
    }
    let (p1, p2) = (
        c1.partitions().unwrap_or_else(|e| panic!("{e}")),
        c2.partitions().unwrap_or_else(|e| panic!("{e}")),
    );
    assert!(p1.taken >= 4 && p1.released >= 2, "c1: {p1:?}");
    assert!(p2.taken >= 2, "c2 after its restart: {p2:?}");
    let ids = rsyslog.ids();
    let distinct: BTreeSet<&String> = ids.iter().collect();
    let twice = ids.len() - distinct.len();
    eprintln!("rsyslog: {} events, {twice} sent twice", distinct.len());
    // Sent twice or not, no client's alert was opened twice under two ids.
    let openings: Vec<&&String> = distinct
        .iter()
        .filter(|id| id.starts_with("fleet-heavy:") && id.contains(":open:"))
        .collect();
    assert_eq!(openings.len(), keyed.len(), "{openings:?}");
    // The collectors' and agents' permissions were enough, and nobody tried more.
    for n in &nodes {
        let log = n.log_text();
        assert!(!log.contains("Permissions Violation"), "{log}");
    }
}

/// The thin-client test of tests/tests/collector.rs over JetStream: the collector publishes
/// the hot sketch cells on `sensor.ship-hot` (only it may, by the server's permissions), the
/// agents subscribe and name the client below every host's cut; its fleet rule fires.
#[test]
fn a_thin_client_is_found_through_jetstream() {
    if !privileged("a_thin_client_is_found_through_jetstream") {
        return;
    }
    let tmp = TempDir::new("nats-sketch");
    let certs = make_certs(&tmp.path);
    let users = [
        User::password("host-a"),
        User::password("host-b"),
        User::nkey("host-c"),
    ];
    let nats = NatsServer::start(
        &tmp.path.join("nats"),
        "n1",
        &certs,
        &accounts(&users, 1),
        listen_port(),
        None,
    );
    let collector = Collector::start(
        &tmp.path.join("collector"),
        &certs,
        &nats.url(),
        1,
        "",
        ThinTraffic::COLLECTOR,
    );
    let extra = ThinTraffic::agent_config(&tmp.path);
    let hosts: Vec<Host> = users
        .iter()
        .map(|u| {
            Host::start_with(
                &tmp.path,
                u.agent,
                u,
                &nats.url(),
                &certs.ca,
                &extra,
                ThinTraffic::HOST_FLOOD,
            )
        })
        .collect();
    let traffic = ThinTraffic::start(&hosts.iter().map(|h| h.port).collect::<Vec<_>>());
    let found = try_wait_for(
        "the thin client named in the fleet view and the fleet alert on it",
        Duration::from_secs(120),
        || {
            ThinTraffic::found(
                &collector.clients_cli("address"),
                &collector.try_get("/v1/alerts")?,
            )
        },
    );
    let transfers = traffic.stop();
    found.unwrap_or_else(|e| panic!("{e}\n{}", collector.log_text()));
    let parts: Vec<(&Nginx, &[Transfer])> = hosts
        .iter()
        .zip(&transfers)
        .map(|(h, t)| (&h.nginx, t.as_slice()))
        .collect();
    let truth = fleet_truth(&parts);
    // Once the last periods are merged (the heavy clients exact), the rows hold.
    wait_for(
        "the heavy clients' fleet rows to equal nginx's",
        Duration::from_secs(90),
        || {
            let rows = collector.clients_cli("address");
            for heavy in ThinTraffic::HEAVY {
                let seen = fleet_row(&rows, heavy);
                if seen != Some(truth[heavy]) {
                    return Err(format!("{heavy}: fleet {seen:?}, truth {:?}", truth[heavy]));
                }
            }
            Ok(())
        },
    );
    ThinTraffic::check_rows(&collector.clients_cli("address"), &truth);
    assert!(
        !nats.log_text().contains("Permissions Violation"),
        "{}",
        nats.log_text()
    );
}
