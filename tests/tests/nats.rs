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
    time::Duration,
};

use sensor_tests::{
    fleet::{ThinTraffic, fleet_row, fleet_truth},
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

    /// The agent's credentials file, as `[ship] credentials_file` reads it.
    fn credentials(&self) -> String {
        match &self.cred {
            Cred::Password(p) => format!("{}:{p}\n", self.agent),
            Cred::Nkey(seed) => format!("{seed}\n"),
        }
    }

    /// The server's entry: publish on its own subject only, replies in its own inbox only,
    /// and the collector's hot sketch cells.
    fn server_entry(&self) -> String {
        let who = match &self.cred {
            Cred::Password(p) => format!("user: \"{}\", password: \"{p}\"", self.agent),
            Cred::Nkey(seed) => format!(
                "nkey: \"{}\"",
                nkeys::KeyPair::from_seed(seed).expect("seed").public_key()
            ),
        };
        format!(
            "{{ {who}, permissions: {{ publish: {{ allow: [\"sensor.ship.{a}\"] }}, \
             subscribe: {{ allow: [\"_INBOX.{a}.>\", \"sensor.ship-hot\"] }} }} }}",
            a = self.agent
        )
    }
}

/// The accounts block every server of a test shares: the agents and the collector.
fn accounts(users: &[User]) -> String {
    let mut entries: Vec<String> = users.iter().map(User::server_entry).collect();
    entries.push(format!(
        "{{ user: \"collector\", password: \"{COLLECTOR_PASSWORD}\", permissions: {{ \
         publish: {{ allow: [\"$JS.API.>\", \"$JS.ACK.SENSOR.>\", \"sensor.ship-hot\"] }}, \
         subscribe: {{ allow: [\"_INBOX_sensor_collector.sensor-collector.>\"] }} }} }}"
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
    /// `extra` is appended to the config (outputs).
    fn start(dir: &Path, certs: &Certs, nats_urls: &str, replicas: usize, extra: &str) -> Self {
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
        let creds = dir.join("nats.creds");
        fs::write(&creds, format!("collector:{COLLECTOR_PASSWORD}\n")).expect("creds");
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
                 replicas = {replicas}\n\n[detect]\ninterval_secs = 1\n\n{extra}",
                certs.cert.display(),
                certs.key.display(),
                dir.join("tokens").display(),
                dir.join("state").display(),
                received_log.display(),
                creds.display(),
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

    fn try_get(&self, path: &str) -> Result<Value, String> {
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
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    }

    fn health(&self) -> Value {
        self.try_get("/v1/health")
            .unwrap_or_else(|e| panic!("{e}\n{}", self.log_text()))
    }

    /// `sensor clients --collector ... --json`: the real CLI against the fleet view.
    fn clients_cli(&self, by: &str) -> Vec<Value> {
        let out = run_ok(
            Command::new(sensor_bin())
                .args(["clients", "--json", "--by", by, "--collector"])
                .arg(self.url())
                .arg("--token-file")
                .arg(&self.reader_token)
                .arg("--ca-file")
                .arg(&self.ca),
        );
        serde_json::from_str(&out).expect("clients JSON")
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
        Self::start_with(dir, name, user, nats_urls, ca, "")
    }

    /// `extra` follows the agent's `[ship]` keys (more keys, or more tables).
    fn start_with(
        dir: &Path,
        name: &str,
        user: &User,
        nats_urls: &str,
        ca: &Path,
        extra: &str,
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
                 when = [{{ metric = \"requests\", window = \"1m\", op = \">\", value = 12 }}]\n",
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

    /// The agent's delivery counters for the collector.
    fn shipping(&self) -> Value {
        self.agent.health()["outputs"]
            .as_array()
            .and_then(|o| o.iter().find(|s| s["name"] == "collector").cloned())
            .unwrap_or(Value::Null)
    }
}

/// Waits until the fleet view (through the real CLI) shows exactly `truth` for its clients.
fn wait_fleet_equals(c: &Collector, truth: &ClientTruth) {
    wait_for(
        "the fleet view to equal the summed ground truth",
        Duration::from_secs(90),
        || {
            let rows = c.clients_cli("address");
            for (client, t) in truth {
                let seen = fleet_row(&rows, client);
                if seen != Some(*t) {
                    return Err(format!("{client}: fleet {seen:?}, truth {t:?}"));
                }
            }
            Ok(())
        },
    );
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
        &accounts(&users),
        listen_port(),
        None,
    );
    let mut collector = Collector::start(&tmp.path.join("collector"), &certs, &nats.url(), 1, "");
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
    let tmp = TempDir::new("nats-perms");
    let certs = make_certs(&tmp.path);
    let users = [User::password("host-a"), User::nkey("host-b")];
    let nats = NatsServer::start(
        &tmp.path.join("nats"),
        "n1",
        &certs,
        &accounts(&users),
        listen_port(),
        None,
    );
    let collector = Collector::start(&tmp.path.join("collector"), &certs, &nats.url(), 1, "");
    let honest = Host::start(&tmp.path, "host-a", &users[0], &nats.url(), &certs.ca);
    // host-a's credentials, host-b's name: publishes on sensor.ship.host-b.
    let impostor = Host::start(&tmp.path, "host-b", &users[0], &nats.url(), &certs.ca);
    let honest_t = honest.requests("127.0.0.81", 6);
    let impostor_t = impostor.requests("127.0.0.82", 6);
    let truth = fleet_truth(&[(&honest.nginx, honest_t.as_slice())]);
    wait_fleet_equals(&collector, &truth);

    let err = wait_for(
        "the impostor's publish to be refused",
        Duration::from_secs(40),
        || {
            let s = impostor.shipping();
            let e = s["last_error"].as_str().unwrap_or("").to_owned();
            if s["retried"].as_u64().unwrap_or(0) >= 2
                && e.contains("Permissions Violation for Publish to \"sensor.ship.host-b\"")
            {
                Ok(s)
            } else {
                Err(s.to_string())
            }
        },
    );
    assert_eq!(err["sent"], 0, "{err}");
    let log = nats.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("Publish Violation") && l.contains("sensor.ship.host-b")),
        "the server logs the refused publish:\n{log}"
    );
    // Nothing of the impostor's reached the stream or the fleet view.
    let health = collector.health();
    assert_eq!(
        agents_in_health(&health),
        ["host-a".to_owned()].into_iter().collect(),
        "{health}"
    );
    assert!(
        fleet_row(&collector.clients_cli("address"), "127.0.0.82").is_none(),
        "{impostor_t:?}"
    );
    assert_each_record_once_in_order(&collector, &["host-a"]);
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
    let acc = accounts(&users);
    let ports: Vec<u16> = (0..3).map(|_| listen_port()).collect();
    let routes: Vec<u16> = (0..3).map(|_| listen_port()).collect();
    let mut nodes: Vec<NatsServer> = (0..3)
        .map(|i| {
            NatsServer::start(
                &tmp.path.join(format!("n{i}")),
                &format!("n{i}"),
                &certs,
                &acc,
                ports[i],
                Some((routes[i], &routes)),
            )
        })
        .collect();
    let urls = nodes
        .iter()
        .map(NatsServer::url)
        .collect::<Vec<_>>()
        .join(",");
    let rsyslog = Rsyslog::start(&tmp.path, "rsyslog", listen_port(), None, None);
    let collector = Collector::start(
        &tmp.path.join("collector"),
        &certs,
        &urls,
        3,
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
                let expected: Vec<String> = read_jsonl(&h.agent.state_dir.join("alerts.jsonl"))
                    .iter()
                    .map(|e| {
                        format!(
                            "{name}:{}:{}:{}",
                            e["alert"]["id"].as_str().unwrap_or("?"),
                            e["event"].as_str().unwrap_or("?"),
                            e["alert"]["updates"]
                        )
                    })
                    .collect();
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
        &accounts(&users),
        listen_port(),
        None,
    );
    let collector = Collector::start(
        &tmp.path.join("collector"),
        &certs,
        &nats.url(),
        1,
        ThinTraffic::COLLECTOR,
    );
    let extra = ThinTraffic::agent_config(&tmp.path);
    let hosts: Vec<Host> = users
        .iter()
        .map(|u| Host::start_with(&tmp.path, u.agent, u, &nats.url(), &certs.ca, &extra))
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
