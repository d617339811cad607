//! The collector with real agents: separate agent processes, each scoped to its own cgroup with
//! its own nginx, ship to one `sensor collector` over HTTPS. Ground truth is nginx's own log
//! and curl's own measurements; the fleet view must equal their sum over hosts.
//!
//! - A client split across three hosts crosses a fleet threshold that no agent crosses.
//! - Outage: the collector and its rsyslog receiver are stopped during traffic and restarted:
//!   every summary counts once (merged totals equal ground truth), every record arrives once
//!   and in order per agent (the collector's received log), and every agent alert reaches
//!   rsyslog exactly once, in order.
//! - Mutual TLS required; bad tokens, wrong roles and another agent's name refused and counted;
//!   fuzzed batches answered 400/413, counted, and the collector keeps serving.
//! - Hostile peers (issue #13): floods of unauthenticated TLS connections from one and from
//!   many addresses do not starve a valid reader; one agent's token cannot wrap another
//!   host's counters, forge its alerts' host or SIEM fields, or use another host's
//!   certificate; gzip bombs in parallel stay within the collector's memory budget.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use sensor_tests::{
    fleet::{ThinTraffic, fleet_row, fleet_truth},
    siem::*,
    tmux::Tmux,
    *,
};
use serde_json::Value;

const AGENT_TOKENS: [(&str, &str); 4] = [
    ("host-a", "agent-token-host-a-0123456789"),
    ("host-b", "agent-token-host-b-0123456789"),
    ("host-c", "agent-token-host-c-0123456789"),
    ("host-fuzz", "agent-token-host-fuzz-0123456"),
];
const READER_TOKEN: &str = "reader-token-soc-0123456789";

struct Collector {
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    pub port: u16,
    ca: PathBuf,
    reader_token: PathBuf,
    /// Client certificate and key, when the collector requires mutual TLS.
    client: Option<(PathBuf, PathBuf)>,
    received_log: PathBuf,
}

impl Collector {
    /// `extra` is appended to the config (rules, outputs); `client_ca` turns mutual TLS on.
    fn start(dir: &Path, certs: &Certs, client_ca: bool, extra: &str) -> Self {
        Self::start_with(dir, certs, client_ca, 1, extra)
    }

    /// As `start`, with the fleet rules' tick every `rules_secs` seconds.
    fn start_with(
        dir: &Path,
        certs: &Certs,
        client_ca: bool,
        rules_secs: u64,
        extra: &str,
    ) -> Self {
        fs::create_dir_all(dir).expect("collector dir");
        let mut tokens: String = AGENT_TOKENS
            .iter()
            .map(|(name, token)| format!("agent {name} {token}\n"))
            .collect();
        // The reader's token as its hash: the file need not hold it in clear.
        let hash = run_ok(
            Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s '{READER_TOKEN}' | sha256sum")),
        );
        let hash = hash.split_whitespace().next().expect("sha256sum");
        tokens.push_str(&format!("reader soc sha256:{hash}\n"));
        fs::write(dir.join("tokens"), tokens).expect("tokens");
        let reader_token = dir.join("reader.token");
        fs::write(&reader_token, READER_TOKEN).expect("reader token");
        let port = listen_port();
        let received_log = dir.join("received.jsonl");
        let client =
            client_ca.then(|| make_client_cert(certs.ca.parent().expect("cert dir"), "viewer"));
        let config = dir.join("collector.toml");
        fs::write(
            &config,
            format!(
                "[listen]\naddress = \"127.0.0.1:{port}\"\ntls_cert_file = \"{}\"\n\
                 tls_key_file = \"{}\"\ntokens_file = \"{}\"\nclient_ca_file = \"{}\"\n\n\
                 [state]\ndir = \"{}\"\nsnapshot_interval_secs = 2\nreceived_log = \"{}\"\n\n\
                 [detect]\ninterval_secs = {rules_secs}\n\n{extra}",
                certs.cert.display(),
                certs.key.display(),
                dir.join("tokens").display(),
                if client_ca {
                    certs.ca.display().to_string()
                } else {
                    String::new()
                },
                dir.join("state").display(),
                received_log.display(),
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
            client,
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

    /// SIGTERM, as an operator stopping the service; waits for the exit.
    fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            terminate(child, "the collector");
        }
    }

    /// SIGKILL: no snapshot, no draining; the journal must cover what was acknowledged.
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

    /// curl to the collector with its CA (and the client certificate, when required).
    fn curl(&self) -> Command {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "--max-time", "10", "--cacert"])
            .arg(&self.ca);
        if let Some((cert, key)) = &self.client {
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        cmd
    }

    fn try_get(&self, path: &str) -> Result<Value, String> {
        let out = self
            .curl()
            .arg("-f")
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

    fn get(&self, path: &str) -> Value {
        self.try_get(path)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.log_text()))
    }

    /// HTTP status of a request with `token` and curl `args`.
    fn status(&self, token: Option<&str>, args: &[&str]) -> u16 {
        let mut cmd = self.curl();
        cmd.args(["-o", "/dev/null", "-w", "%{http_code}"]);
        if let Some(t) = token {
            cmd.arg("-H").arg(format!("Authorization: Bearer {t}"));
        }
        cmd.args(args);
        let out = cmd.output().expect("curl");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }

    /// `sensor clients --collector ... --json`: the real CLI against the fleet view.
    fn clients_cli(&self, by: &str) -> Vec<Value> {
        let mut cmd = Command::new(sensor_bin());
        cmd.args(["clients", "--json", "--by", by, "--collector"])
            .arg(self.url())
            .arg("--token-file")
            .arg(&self.reader_token)
            .arg("--ca-file")
            .arg(&self.ca);
        if let Some((cert, key)) = &self.client {
            cmd.arg("--client-cert")
                .arg(cert)
                .arg("--client-key")
                .arg(key);
        }
        let out = run_ok(&mut cmd);
        serde_json::from_str(&out).expect("clients JSON")
    }

    /// `GET /metrics` with the reader token: the exposition text.
    fn metrics(&self) -> String {
        let out = self
            .curl()
            .arg("-f")
            .arg("-H")
            .arg(format!("Authorization: Bearer {READER_TOKEN}"))
            .arg(format!("{}/metrics", self.url()))
            .output()
            .expect("curl");
        assert!(out.status.success(), "GET /metrics: {}", out.status);
        String::from_utf8(out.stdout).expect("utf-8 exposition")
    }

    fn received(&self) -> Vec<Value> {
        read_jsonl(&self.received_log)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One inference host: a cgroup, an nginx on its own port, an agent shipping as `name`.
struct Host {
    nginx: Nginx,
    agent: Agent,
    port: u16,
    _cg: Cgroup,
}

impl Host {
    fn start(dir: &Path, name: &str, token: &str, collector: &Collector, mtls: bool) -> Self {
        Self::start_shipping(dir, name, token, collector, mtls, "", 15)
    }

    /// `ship` is added to the agent's `[ship]` table; its rule `host-flood` fires past
    /// `host_flood` requests a minute from one address.
    fn start_shipping(
        dir: &Path,
        name: &str,
        token: &str,
        collector: &Collector,
        mtls: bool,
        ship: &str,
        host_flood: u32,
    ) -> Self {
        let cg = Cgroup::new(&format!("col-{name}"));
        let port = free_port();
        let nginx = Nginx::start(&cg, None, &[format!("127.0.0.1:{port}")]);
        let token_file = dir.join(format!("{name}.token"));
        fs::write(&token_file, token).expect("agent token");
        let client = if mtls {
            let (cert, key) = make_client_cert(collector.ca.parent().expect("cert dir"), name);
            format!(
                "client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
                cert.display(),
                key.display()
            )
        } else {
            String::new()
        };
        let config = dir.join(format!("{name}.toml"));
        fs::write(
            &config,
            format!(
                "[ship]\nurl = \"{}/v1/ingest\"\ntoken_file = \"{}\"\nca_file = \"{}\"\n\
                 agent_name = \"{name}\"\nretry_max_secs = 1\n{client}{ship}\n\
                 [detect]\ninterval_secs = 1\n\n[[detect.rules]]\nid = \"host-flood\"\n\
                 name = \"Request flood on one host\"\nkeys = [\"address\"]\nseverity = \"high\"\n\
                 when = [{{ metric = \"requests\", window = \"1m\", op = \">\", value = {host_flood} }}]\n",
                collector.url(),
                token_file.display(),
                collector.ca.display(),
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
/// The collector's `fleet-flood` alert on `key`, waited for up to `deadline`.
fn wait_fleet_alert(c: &Collector, key: &str, deadline: Duration) -> Value {
    wait_for("the fleet alert", deadline, || {
        let alerts = c.get("/v1/alerts");
        alerts
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|a| a["rule_id"] == "fleet-flood" && a["key"] == key)
                    .cloned()
            })
            .ok_or_else(|| alerts.to_string())
    })
}

fn wait_fleet_equals(c: &Collector, truth: &ClientTruth) {
    wait_for(
        "the fleet view to equal the summed ground truth",
        Duration::from_secs(60),
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

/// Three agents, one client split across them: 12 requests on each host stay under the
/// hosts' rule (more than 15 a minute) and cross the fleet rule (more than 30 a minute).
#[test]
fn a_client_split_across_hosts_crosses_the_fleet_threshold() {
    if !privileged("a_client_split_across_hosts_crosses_the_fleet_threshold") {
        return;
    }
    let tmp = TempDir::new("collector-fleet");
    let certs = make_certs(&tmp.path);
    let collector = Collector::start(
        &tmp.path.join("collector"),
        &certs,
        false,
        "[[detect.rules]]\nid = \"fleet-flood\"\nname = \"Request flood over several hosts\"\n\
         keys = [\"address\"]\nseverity = \"high\"\n\
         when = [{ metric = \"requests\", window = \"1m\", op = \">\", value = 30 }]\n",
    );
    let hosts: Vec<Host> = AGENT_TOKENS[..3]
        .iter()
        .map(|(name, token)| Host::start(&tmp.path, name, token, &collector, false))
        .collect();
    let split: Vec<Vec<Transfer>> = hosts.iter().map(|h| h.requests("127.0.0.77", 12)).collect();
    // A second client on one host only: its fleet row is that host's.
    let single = hosts[0].requests("127.0.0.78", 5);
    let mut parts: Vec<(&Nginx, &[Transfer])> = hosts
        .iter()
        .zip(&split)
        .map(|(h, t)| (&h.nginx, t.as_slice()))
        .collect();
    parts.push((&hosts[0].nginx, single.as_slice()));
    let truth = fleet_truth(&parts);
    assert_eq!(truth["127.0.0.77"].2, 36);
    assert_eq!(truth["127.0.0.77"].3, 3, "one connection per host");
    wait_fleet_equals(&collector, &truth);

    let alert = wait_fleet_alert(&collector, "127.0.0.77", Duration::from_secs(30));
    assert!(alert["host"].as_str().unwrap_or("").starts_with("fleet@"));
    assert_eq!(alert["technique"]["id"], "AML.T0024.002");
    assert!(alert["evidence"]["requests_1m"].as_f64().unwrap_or(0.0) >= 36.0);
    let fleet_alerts = collector.get("/v1/alerts");
    assert!(
        !fleet_alerts
            .as_array()
            .expect("alerts")
            .iter()
            .any(|a| a["key"] == "127.0.0.78"),
        "the single-host client stays under the fleet rule"
    );
    // No agent crossed its own threshold, so no agent alert reached the collector either.
    for h in &hosts {
        let alerts = h.agent.api("/v1/alerts");
        assert_eq!(
            alerts.as_array().map(Vec::len),
            Some(0),
            "agent alerts: {alerts}"
        );
    }
    let health = collector.get("/v1/health");
    assert_eq!(
        health["agents"].as_array().map(Vec::len),
        Some(3),
        "{health}"
    );
    for a in health["agents"].as_array().expect("agents") {
        assert_eq!(a["duplicates"], 0, "{a}");
        assert_eq!(a["gaps"], 0, "{a}");
    }
    assert_eq!(health["ingest"]["unauthorized"], 0);
    assert_eq!(health["ingest"]["malformed"], 0);
    // `sensor top --collector` in a real terminal shows the fleet rows.
    let command = format!(
        "'{}' top --collector '{}' --token-file '{}' --ca-file '{}' --interval-ms 200",
        sensor_bin().display(),
        collector.url(),
        collector.reader_token.display(),
        collector.ca.display()
    );
    let tmux = Tmux::start("fleet-top", &command);
    tmux.wait_screen("the fleet's rows in `sensor top`", |s| {
        let row = s.row("127.0.0.77").ok_or("no row for 127.0.0.77")?;
        if row.get(2).map(String::as_str) != Some("36") {
            return Err(format!("127.0.0.77: {row:?}, want 36 requests"));
        }
        if !s.header.contains(&collector.url()) {
            return Err("header does not name the collector".into());
        }
        Ok(())
    });
    tmux.send("q");
    // Prometheus: valid exposition (promtool), fleet totals equal ground truth, per-agent
    // records equal what the collector's audit log says it accepted.
    let text = collector.metrics();
    let (status, remarks) = promtool_check(&text);
    assert!(
        status.success(),
        "promtool check metrics: {remarks}\n{text}"
    );
    let sample = |series: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v as u64)
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    };
    let all: u64 = truth.values().map(|t| t.2).sum();
    assert_eq!(sample("sensor_collector_requests_total"), all);
    let out_bytes: u64 = truth.values().map(|t| t.1).sum();
    assert_eq!(
        sample("sensor_collector_bytes_total{direction=\"out\"}"),
        out_bytes
    );
    let received = collector.received();
    for (name, _) in &AGENT_TOKENS[..3] {
        let logged = received.iter().filter(|r| r["agent"] == *name).count() as u64;
        assert_eq!(
            sample(&format!(
                "sensor_collector_agent_records_total{{agent=\"{name}\"}}"
            )),
            logged,
            "{name}"
        );
    }
    assert_eq!(
        collector.status(None, &[&format!("{}/metrics", collector.url())]),
        401
    );
    assert_eq!(
        collector.status(
            Some(AGENT_TOKENS[0].1),
            &[&format!("{}/metrics", collector.url())]
        ),
        403
    );

    // Group rows are merged too: the two clients share 127.0.0.0/24.
    let groups = collector.clients_cli("group");
    let g = fleet_row(&groups, "127.0.0.0/24").expect("group row");
    let (t77, t78) = (truth["127.0.0.77"], truth["127.0.0.78"]);
    assert_eq!(
        g,
        (t77.0 + t78.0, t77.1 + t78.1, t77.2 + t78.2, t77.3 + t78.3)
    );
}

/// Fleet rules run when summaries arrive, not only at their tick: with the tick an hour
/// apart, a summary crossing a fleet rule gives the fleet alert within seconds (the bench's
/// time to the fleet alert is the agents' period and this, not the tick's phase).
#[test]
fn fleet_rules_run_when_summaries_arrive() {
    if !privileged("fleet_rules_run_when_summaries_arrive") {
        return;
    }
    let tmp = TempDir::new("collector-prompt");
    let certs = make_certs(&tmp.path);
    let collector = Collector::start_with(
        &tmp.path.join("collector"),
        &certs,
        false,
        3600,
        "[[detect.rules]]\nid = \"fleet-flood\"\nname = \"Request flood over several hosts\"\n\
         keys = [\"address\"]\nseverity = \"high\"\n\
         when = [{ metric = \"requests\", window = \"1m\", op = \">\", value = 30 }]\n",
    );
    // The tick's first run (at start) is over before anything is merged.
    std::thread::sleep(Duration::from_secs(1));
    let batch = summary_batch(
        "host-a",
        "aa",
        1,
        "10.7.7.7",
        serde_json::json!({"requests": 100, "bytes_out": 1000}),
    );
    assert_eq!(collector.post(AGENT_TOKENS[0].1, &batch, None).0, 200);
    // Far less than the tick: a run after the merge (at most a second after the last run).
    wait_fleet_alert(&collector, "10.7.7.7", Duration::from_secs(10));
}

/// A host alert ships the period so far (an early part): the fleet alert comes within the
/// same 10-second period, not after its end. A decoy crosses the host's rule first, in the
/// period's first second; the bot follows once the decoy's part is out, and gets a part of
/// its own. The collector's rule tick is an hour, so only early parts merged before the
/// period ends can raise the alerts then. After the period, the parts and the rest sum to
/// nginx's ground truth, with nothing counted twice.
#[test]
fn a_host_alert_ships_its_period_so_far() {
    if !privileged("a_host_alert_ships_its_period_so_far") {
        return;
    }
    let tmp = TempDir::new("collector-early");
    let certs = make_certs(&tmp.path);
    // The host's threshold: whatever the early part carries after the host alert (counted
    // by then: more than 15) crosses the fleet rule.
    let collector = Collector::start_with(
        &tmp.path.join("collector"),
        &certs,
        false,
        3600,
        "[[detect.rules]]\nid = \"fleet-flood\"\nname = \"Request flood over several hosts\"\n\
         keys = [\"address\"]\nseverity = \"high\"\n\
         when = [{ metric = \"requests\", window = \"1m\", op = \">\", value = 15 }]\n",
    );
    let (name, token) = AGENT_TOKENS[0];
    let host = Host::start(&tmp.path, name, token, &collector, false);
    // Traffic from another client first: the collector's first answer tells the agent it
    // takes early parts (an agent that has not heard yet waits, within the period).
    let warm = host.requests("127.0.0.80", 2);
    wait_for(
        "the agent's first delivery",
        Duration::from_secs(30),
        || {
            let s = host.shipping();
            (s["sent"].as_u64().unwrap_or(0) > 0)
                .then_some(())
                .ok_or_else(|| s.to_string())
        },
    );
    // The start of a period (agents and collector share this clock).
    let period_end = wait_for("a period's first second", Duration::from_secs(15), || {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock");
        (now.as_secs().is_multiple_of(10) && now.subsec_millis() < 500)
            .then_some(now.as_secs() + 10)
            .ok_or_else(|| format!("{}", now.as_secs_f64()))
    });
    let decoy = host.requests("127.0.0.78", 20);
    wait_for("the decoy's early part", Duration::from_secs(10), || {
        let h = host.agent.health();
        (h["early_parts_shipped"] == 1)
            .then_some(())
            .ok_or_else(|| h["early_parts_shipped"].to_string())
    });
    let bot = host.requests("127.0.0.79", 40);
    for key in ["127.0.0.78", "127.0.0.79"] {
        let alert = wait_fleet_alert(&collector, key, Duration::from_secs(30));
        let raised_ms = alert["first_seen_ms"].as_u64().expect("first_seen_ms");
        assert!(
            raised_ms < period_end * 1000,
            "the fleet alert on {key} was raised at {raised_ms} ms, at or after its period's \
             end {period_end} s: {alert}"
        );
    }
    assert_eq!(host.agent.health()["early_parts_shipped"], 2);
    let truth = fleet_truth(&[
        (&host.nginx, bot.as_slice()),
        (&host.nginx, decoy.as_slice()),
        (&host.nginx, warm.as_slice()),
    ]);
    assert_eq!(truth["127.0.0.79"].2, 40);
    wait_fleet_equals(&collector, &truth);
    let health = collector.get("/v1/health");
    let agent = &health["agents"][0];
    assert_eq!(agent["duplicates"], 0, "{agent}");
    assert_eq!(agent["gaps"], 0, "{agent}");
    assert_eq!(health["ingest"]["malformed"], 0, "{health}");
}

/// Issue #13's fleet blind spot: a client kept below every host's `top_clients` cut (and
/// outside the keyed sample) used to reach the collector only folded into `rest`. The agents'
/// sketches let the collector find it: its cells turn hot, the agents name it, and the fleet
/// rule fires on it; a quieter client below the hot threshold stays folded. Nothing is lost:
/// named rows and the folded remainder still sum to nginx's ground truth.
#[test]
fn a_thin_client_below_every_hosts_cut_is_found_by_the_sketch() {
    if !privileged("a_thin_client_below_every_hosts_cut_is_found_by_the_sketch") {
        return;
    }
    let tmp = TempDir::new("collector-sketch");
    let certs = make_certs(&tmp.path);
    let collector = Collector::start(
        &tmp.path.join("collector"),
        &certs,
        false,
        ThinTraffic::COLLECTOR,
    );
    // Two heavier clients take each host's top two; no sample.
    let ship = ThinTraffic::agent_config(&tmp.path);
    let hosts: Vec<Host> = AGENT_TOKENS[..3]
        .iter()
        .map(|(name, token)| {
            Host::start_shipping(
                &tmp.path,
                name,
                token,
                &collector,
                false,
                &ship,
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
                &collector.get("/v1/alerts"),
            )
        },
    );
    let transfers = traffic.stop();
    let (thin_row, alert) = found.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        alert["evidence"]["requests_1m"].as_f64().unwrap_or(0.0) > 100.0,
        "{alert}"
    );
    // Every host named the thin client once its cells were hot: its row sums several hosts.
    assert!(thin_row.2 > 12, "{thin_row:?}");
    let parts: Vec<(&Nginx, &[Transfer])> = hosts
        .iter()
        .zip(&transfers)
        .map(|(h, t)| (&h.nginx, t.as_slice()))
        .collect();
    let truth = fleet_truth(&parts);
    let all: u64 = truth.values().map(|t| t.2).sum();
    // Nothing lost: named rows plus the folded remainder equal nginx's count, once the last
    // periods are shipped.
    wait_for(
        "the fleet's request total to equal nginx's",
        Duration::from_secs(60),
        || {
            let text = collector.metrics();
            let total = text
                .lines()
                .find_map(|l| l.strip_prefix("sensor_collector_requests_total "))
                .and_then(|v| v.parse::<f64>().ok())
                .map_or(0, |v| v as u64);
            if total == all {
                Ok(())
            } else {
                Err(format!("fleet {total}, nginx {all}"))
            }
        },
    );
    ThinTraffic::check_rows(&collector.clients_cli("address"), &truth);
    let health = collector.get("/v1/health");
    assert_eq!(health["ingest"]["malformed"], 0, "{health}");
}

/// A valid batch (JSON) for the fuzzing agent, to mutate.
fn fuzz_seed() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let start = now / 10 * 10;
    serde_json::json!({
        "version": 1,
        "agent": "host-fuzz",
        "stream": "abcdef",
        "records": [{
            "id": format!("host-fuzz:summary:{start}"),
            "seq": 1,
            "payload": {"summary": {
                "start_s": start, "period_s": 10,
                "clients": [{"by": "address", "key": "10.9.9.9",
                             "counts": {"requests": 1, "bytes_out": 100},
                             "open_connections": 0}],
                "rest": {}
            }}
        }]
    })
    .to_string()
}

/// Outage of the collector and its SIEM receiver during traffic; tokens and roles; mutual
/// TLS; fuzzed batches.
#[test]
fn outage_loses_nothing_and_bad_clients_are_refused() {
    if !privileged("outage_loses_nothing_and_bad_clients_are_refused") {
        return;
    }
    let tmp = TempDir::new("collector-outage");
    let certs = make_certs(&tmp.path);
    let mut rsyslog = Rsyslog::start(&tmp.path, "rsyslog", listen_port(), None, None);
    let mut collector = Collector::start(
        &tmp.path.join("collector"),
        &certs,
        true,
        &format!(
            "[[outputs]]\ntype = \"syslog\"\nname = \"siem\"\naddress = \"127.0.0.1:{}\"\n\
             protocol = \"tcp\"\nretry_max_secs = 1\n",
            rsyslog.tcp_port
        ),
    );
    let a = Host::start(&tmp.path, "host-a", AGENT_TOKENS[0].1, &collector, true);
    // An agent whose token the collector does not know.
    let b = Host::start(
        &tmp.path,
        "host-b",
        "not-a-registered-token-0000",
        &collector,
        true,
    );

    // Before the outage: an alert at host-a (20 requests > 15) and summaries.
    let before = a.requests("127.0.0.61", 20);
    wait_for(
        "host-a's first alert at rsyslog",
        Duration::from_secs(40),
        || {
            let ids = rsyslog.ids();
            if ids
                .iter()
                .any(|id| id.starts_with("host-a:host-flood:address:127.0.0.61:"))
            {
                Ok(())
            } else {
                Err(format!("{ids:?}"))
            }
        },
    );

    collector.stop();
    rsyslog.stop();
    let during = a.requests("127.0.0.62", 20);
    let b_transfers = b.requests("127.0.0.63", 3);
    wait_for("host-a to spool and retry", Duration::from_secs(40), || {
        let s = a.shipping();
        let (retried, pending) = (s["retried"].as_u64(), s["pending"].as_u64());
        if retried >= Some(2) && pending >= Some(2) {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    rsyslog.spawn();
    collector.spawn();

    // Every count exactly once: the merged totals equal ground truth (host-b never got in).
    let truth = fleet_truth(&[(&a.nginx, before.as_slice()), (&a.nginx, during.as_slice())]);
    wait_fleet_equals(&collector, &truth);
    let rows = collector.clients_cli("address");
    assert!(
        fleet_row(&rows, "127.0.0.63").is_none(),
        "host-b's traffic must not be merged"
    );

    // Every record once, in order, per agent and stream: positions 1, 2, 3 ...
    let received = collector.received();
    let a_recs: Vec<&Value> = received.iter().filter(|r| r["agent"] == "host-a").collect();
    let seqs: Vec<u64> = a_recs
        .iter()
        .map(|r| r["seq"].as_u64().expect("seq"))
        .collect();
    let want: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, want, "host-a's records: each once, in order");
    let ids: HashSet<&str> = a_recs
        .iter()
        .map(|r| r["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids.len(), a_recs.len(), "record ids unique");
    assert!(a_recs.iter().any(|r| r["kind"] == "summary"));

    // Every alert event of host-a reaches rsyslog exactly once, in order, by id.
    let alerts_file = a.agent.state_dir.join("alerts.jsonl");
    wait_for(
        "rsyslog to hold each of host-a's alert events once, in order",
        Duration::from_secs(60),
        || {
            let expected: Vec<String> = read_jsonl(&alerts_file)
                .iter()
                .map(|e| {
                    format!(
                        "host-a:{}:{}:{}",
                        e["alert"]["id"].as_str().unwrap_or("?"),
                        e["event"].as_str().unwrap_or("?"),
                        e["alert"]["updates"]
                    )
                })
                .collect();
            // The syslog output replays its last messages after a reconnect (TCP syslog has
            // no acknowledgements): receivers deduplicate by id.
            let mut seen = HashSet::new();
            let got: Vec<String> = rsyslog
                .ids()
                .into_iter()
                .filter(|id| seen.insert(id.clone()))
                .collect();
            if expected.len() >= 2 && got == expected {
                Ok(())
            } else {
                Err(format!("got {got:?}\nexpected {expected:?}"))
            }
        },
    );

    // host-b: refused (401), counted, and its records kept in its spool for retries.
    wait_for(
        "host-b refused, counted, and still retrying",
        Duration::from_secs(30),
        || {
            let health = collector.get("/v1/health");
            let sb = b.shipping();
            let refused = health["ingest"]["unauthorized"].as_u64() >= Some(1);
            let kept = sb["sent"] == 0
                && sb["pending"].as_u64() >= Some(1)
                && sb["last_error"].as_str().unwrap_or("").contains("401");
            if refused && kept {
                Ok(())
            } else {
                Err(format!("collector: {}; host-b: {sb}", health["ingest"]))
            }
        },
    );
    assert!(!b_transfers.is_empty());

    // Roles: a reader cannot send, an agent cannot read nor send as another agent.
    let ingest = format!("{}/v1/ingest", collector.url());
    let clients = format!("{}/v1/clients", collector.url());
    let seed_file = tmp.path.join("seed.json");
    fs::write(&seed_file, fuzz_seed()).expect("seed");
    let data = format!("@{}", seed_file.display());
    assert_eq!(
        collector.status(Some(READER_TOKEN), &["--data-binary", &data, &ingest]),
        403
    );
    assert_eq!(collector.status(Some(AGENT_TOKENS[0].1), &[&clients]), 403);
    assert_eq!(
        collector.status(Some(AGENT_TOKENS[0].1), &["--data-binary", &data, &ingest]),
        403,
        "host-a's token with host-fuzz's name"
    );
    assert_eq!(collector.status(None, &[&clients]), 401);
    assert_eq!(
        collector.status(Some("wrong-token-000000000000"), &[&clients]),
        401
    );
    // Mutual TLS: without a client certificate there is no TLS session at all.
    let no_cert = Command::new("curl")
        .args(["-s", "--max-time", "10", "--cacert"])
        .arg(&certs.ca)
        .arg("-H")
        .arg(format!("Authorization: Bearer {READER_TOKEN}"))
        .arg(&clients)
        .status()
        .expect("curl");
    assert!(
        !no_cert.success(),
        "a client without a certificate must be refused"
    );

    // Fuzzed batches: mutated JSON (some gzip-compressed) from a valid agent.
    let before_health = collector.get("/v1/health");
    let seed = fuzz_seed().into_bytes();
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // Mutual TLS binds an agent token to its host's certificate: host-fuzz posts with its own.
    let fuzz_cert = make_client_cert(&tmp.path, "host-fuzz");
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--max-time", "10", "--cacert"])
        .arg(&collector.ca)
        .arg("--cert")
        .arg(&fuzz_cert.0)
        .arg("--key")
        .arg(&fuzz_cert.1);
    let rounds = 200;
    for i in 0..rounds {
        let mut body = seed.clone();
        for _ in 0..(1 + next() % 4) {
            let at = (next() as usize) % body.len();
            body[at] = (next() % 256) as u8;
        }
        if i % 7 == 0 {
            body.truncate((next() as usize) % body.len());
        }
        let path = tmp.path.join(format!("fuzz-{i}.json"));
        fs::write(&path, &body).expect("fuzz body");
        if i > 0 {
            cmd.arg("--next");
            cmd.arg("--cacert").arg(&collector.ca);
            cmd.arg("--cert")
                .arg(&fuzz_cert.0)
                .arg("--key")
                .arg(&fuzz_cert.1);
        }
        if i % 3 == 0 {
            let gz = tmp.path.join(format!("fuzz-{i}.gz"));
            run_ok(Command::new("sh").arg("-c").arg(format!(
                "gzip -c '{}' > '{}'",
                path.display(),
                gz.display()
            )));
            cmd.args(["-H", "Content-Encoding: gzip"])
                .arg("--data-binary");
            cmd.arg(format!("@{}", gz.display()));
        } else {
            cmd.arg("--data-binary").arg(format!("@{}", path.display()));
        }
        cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}\\n", "-H"])
            .arg(format!("Authorization: Bearer {}", AGENT_TOKENS[3].1))
            .arg(&ingest);
    }
    let out = run_ok(&mut cmd);
    let codes: Vec<u16> = out.lines().map(|l| l.trim().parse().unwrap_or(0)).collect();
    assert_eq!(codes.len(), rounds, "{out}");
    let mut by_code: BTreeMap<u16, usize> = BTreeMap::new();
    for c in &codes {
        *by_code.entry(*c).or_default() += 1;
    }
    assert!(
        codes.iter().all(|c| [200, 400, 403, 413].contains(c)),
        "fuzzed batches: {by_code:?}"
    );
    assert!(
        by_code.get(&400).copied().unwrap_or(0) > rounds / 2,
        "{by_code:?}"
    );
    let after = collector.get("/v1/health");
    let delta = |k: &str| {
        after["ingest"][k].as_u64().unwrap_or(0) - before_health["ingest"][k].as_u64().unwrap_or(0)
    };
    assert_eq!(
        delta("malformed") + delta("too_large") + delta("forbidden"),
        (by_code.get(&400).copied().unwrap_or(0)
            + by_code.get(&413).copied().unwrap_or(0)
            + by_code.get(&403).copied().unwrap_or(0)) as u64,
        "every refused batch counted: {by_code:?}"
    );
    // Still serving, and the real agent's view unchanged.
    wait_fleet_equals(&collector, &truth);

    // A crash (SIGKILL) while host-a ships: acknowledged batches come back from the journal,
    // unacknowledged ones are sent again; still every count exactly once.
    let crash = a.requests("127.0.0.64", 7);
    collector.kill9();
    let after_crash = a.requests("127.0.0.64", 6);
    collector.spawn();
    let truth = fleet_truth(&[
        (&a.nginx, before.as_slice()),
        (&a.nginx, during.as_slice()),
        (&a.nginx, crash.as_slice()),
        (&a.nginx, after_crash.as_slice()),
    ]);
    wait_fleet_equals(&collector, &truth);
}

// --- hostile peers (issue #13) ----------------------------------------------------------------

impl Collector {
    fn pid(&self) -> u32 {
        self.child.as_ref().expect("collector running").id()
    }

    /// Peak resident memory of the collector (VmHWM), in bytes.
    fn peak_rss(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmHWM")
            * 1024
    }

    /// POSTs `body` (JSON) to /v1/ingest with `token`, and with a client certificate when
    /// given; returns the status and the answer.
    fn post(&self, token: &str, body: &str, cert: Option<&(PathBuf, PathBuf)>) -> (u16, String) {
        let dir = self.log.parent().expect("collector dir");
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let (req, resp) = (
            dir.join(format!("post-{n}.json")),
            dir.join(format!("post-{n}.out")),
        );
        fs::write(&req, body).expect("request body");
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "--max-time", "10", "--cacert"])
            .arg(&self.ca);
        if let Some((c, k)) = cert {
            cmd.arg("--cert").arg(c).arg("--key").arg(k);
        }
        let out = cmd
            .args(["-o"])
            .arg(&resp)
            .args([
                "-w",
                "%{http_code}",
                "-H",
                "Content-Type: application/json",
                "-H",
            ])
            .arg(format!("Authorization: Bearer {token}"))
            .arg("--data-binary")
            .arg(format!("@{}", req.display()))
            .arg(format!("{}/v1/ingest", self.url()))
            .output()
            .expect("curl");
        let code = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        (code, fs::read_to_string(&resp).unwrap_or_default())
    }
}

fn hostile_peer() -> Command {
    let mut cmd = Command::new(python());
    cmd.arg(peers().join("hostile_tls.py"));
    cmd
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A batch of `agent` with one summary for `key` at the current period.
fn summary_batch(agent: &str, stream: &str, seq: u64, key: &str, counts: Value) -> String {
    let start = now_s() / 10 * 10 - 10;
    serde_json::json!({
        "version": 1, "agent": agent, "stream": stream,
        "records": [{
            "id": format!("{agent}:summary:{start}"), "seq": seq,
            "payload": {"summary": {
                "start_s": start, "period_s": 10,
                "clients": [{"by": "address", "key": key, "counts": counts, "open_connections": 0}],
                "rest": {}
            }}
        }]
    })
    .to_string()
}

/// A batch of `agent` with one alert event whose text fields are `text` and host `host`.
fn alert_batch(agent: &str, stream: &str, seq: u64, host: &str, text: &str) -> String {
    let ms = now_s() * 1000;
    serde_json::json!({
        "version": 1, "agent": agent, "stream": stream,
        "records": [{
            "id": format!("{agent}:forged:open:0"), "seq": seq,
            "payload": {"alert": {"event": "open", "alert": {
                "id": "forged", "rule_id": "host-flood", "rule_name": text,
                "key_kind": "address", "key": "10.9.9.9", "severity": "high",
                "mode": "alert", "state": "open", "window": "1m",
                "evidence": {"requests_1m": 20.0}, "conditions": [], "baseline": null,
                "first_seen": "x", "last_seen": "x", "first_seen_ms": ms, "last_seen_ms": ms,
                "resolved_at": null, "host": host,
                "technique": {"framework": "MITRE ATLAS", "id": "AML.T0024.002", "name": text},
                "updates": 0
            }}}
        }]
    })
    .to_string()
}

/// A CEF line's header fields (unescaped) and its extension's keys with their raw values, as
/// a receiver splits them: 7 unescaped `|`, then `key=` where `=` is not escaped.
fn cef_fields(line: &str) -> (Vec<String>, Vec<(String, String)>) {
    let mut header = Vec::new();
    let mut cur = String::new();
    let mut chars = line.trim_start().chars();
    while header.len() < 7 {
        match chars.next() {
            Some('\\') => cur.extend(chars.next()),
            Some('|') => header.push(std::mem::take(&mut cur)),
            Some(c) => cur.push(c),
            None => break,
        }
    }
    let ext: Vec<char> = chars.collect();
    // Each unescaped '=' preceded by a word that starts after a space (or the start).
    let mut keys: Vec<(String, usize, usize)> = Vec::new();
    for (i, &c) in ext.iter().enumerate() {
        if c != '=' || (i > 0 && ext[i - 1] == '\\') {
            continue;
        }
        let start = ext[..i]
            .iter()
            .rposition(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
            .map_or(0, |p| p + 1);
        if start < i && (start == 0 || ext[start - 1] == ' ') {
            keys.push((ext[start..i].iter().collect(), start, i + 1));
        }
    }
    let pairs = (0..keys.len())
        .map(|n| {
            let end = keys.get(n + 1).map_or(ext.len(), |k| k.1.saturating_sub(1));
            let value: String = ext[keys[n].2..end.max(keys[n].2)].iter().collect();
            (keys[n].0.clone(), value)
        })
        .collect();
    (header, pairs)
}

/// Issue #13, 1: 400 bad-token TLS connections and 100 silent TCP connections from one address,
/// and 300 more from six other loopback addresses (each connection sending a bad-token GET
/// every 3 s, as in the report), while a reader from its own address asks every half second
/// and must be answered within 5 s.
/// Before: the 512 slots were taken and the reader waited until curl gave up.
#[test]
fn hostile_connection_floods_do_not_starve_readers() {
    if !privileged("hostile_connection_floods_do_not_starve_readers") {
        return;
    }
    let tmp = TempDir::new("collector-flood");
    let certs = make_certs(&tmp.path);
    let collector = Collector::start(&tmp.path.join("collector"), &certs, false, "");
    let mut specs = vec![
        "127.0.0.66:400:badtoken".to_owned(),
        "127.0.0.66:100:silent".to_owned(),
    ];
    specs.extend((1..=6).map(|i| format!("127.0.1.{i}:50:badtoken")));
    let flood_secs = 25;
    let flood = hostile_peer()
        .args([
            "flood",
            "127.0.0.1",
            &collector.port.to_string(),
            &flood_secs.to_string(),
        ])
        .args(&specs)
        .stdout(Stdio::piped())
        .spawn()
        .expect("hostile flood");
    // Killed if an assertion fails while it runs.
    struct Kill<'a>(&'a mut Option<Child>);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            if let Some(mut c) = self.0.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let mut flood = Some(flood);
    let guard = Kill(&mut flood);
    // Let the flood take what it can.
    std::thread::sleep(Duration::from_secs(5));
    // Before, the reader was not answered at all (curl gave up after 10 s); 5 s leaves room
    // for a loaded test machine.
    let deadline = Duration::from_secs(5);
    let mut latencies = Vec::new();
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(12) {
        let out = collector
            .curl()
            .args([
                "--interface",
                "127.0.0.200",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{time_total}",
                "-H",
            ])
            .arg(format!("Authorization: Bearer {READER_TOKEN}"))
            .arg(format!("{}/v1/health", collector.url()))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (code, secs) = text.split_once(' ').unwrap_or(("0", "99"));
        let secs: f64 = secs.parse().unwrap_or(99.0);
        assert_eq!(
            code,
            "200",
            "the reader must be served under the flood ({text})\n{}",
            collector.log_text()
        );
        assert!(
            secs < deadline.as_secs_f64(),
            "reader answered in {secs:.3} s (deadline {deadline:?})"
        );
        latencies.push(secs);
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = guard
        .0
        .take()
        .expect("flood")
        .wait_with_output()
        .expect("flood");
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    latencies.sort_by(f64::total_cmp);
    eprintln!(
        "reader under the flood: {} requests, p50 {:.1} ms, max {:.1} ms; flood {stats}",
        latencies.len(),
        latencies[latencies.len() / 2] * 1000.0,
        latencies[latencies.len() - 1] * 1000.0
    );
    let health = collector.get("/v1/health");
    // The flood was at least as strong as the one that took every slot before: more
    // connections at once than the old 512 slots.
    let opened =
        stats["connected"].as_u64().unwrap_or(0) + stats["silent_connected"].as_u64().unwrap_or(0);
    assert!(opened > 512, "{stats}");
    assert!(
        health["ingest"]["unauthorized"].as_u64() >= Some(1),
        "{health}"
    );
    assert!(
        health["connections"]["refused"].as_u64() >= Some(1),
        "{health}"
    );
    // A bad token loses its connection with the answer: none is answered twice.
    assert!(stats["answers"].as_u64() >= Some(1), "{stats}");
    assert_eq!(stats["kept_after_401"], 0, "{stats}");
}

/// Issue #13, 2: one agent's token cannot zero another host's client (wrapping addition),
/// cannot forward alerts as another host or forge SIEM lines and fields, and (mutual TLS)
/// cannot be used with another host's certificate.
#[test]
fn one_agent_cannot_rewrite_the_fleet() {
    if !privileged("one_agent_cannot_rewrite_the_fleet") {
        return;
    }
    let tmp = TempDir::new("collector-hostile-agent");
    let certs = make_certs(&tmp.path);
    let rsyslog = Rsyslog::start(&tmp.path, "rsyslog", listen_port(), None, None);
    let collector = Collector::start(
        &tmp.path.join("collector"),
        &certs,
        false,
        &format!(
            "[[outputs]]\ntype = \"syslog\"\nname = \"siem\"\naddress = \"127.0.0.1:{}\"\n\
             protocol = \"tcp\"\nmessage = \"cef\"\nretry_max_secs = 1\n",
            rsyslog.tcp_port
        ),
    );
    let (a, b) = (AGENT_TOKENS[0].1, AGENT_TOKENS[1].1);
    let honest = summary_batch(
        "host-a",
        "aa",
        1,
        "10.9.9.9",
        serde_json::json!({"requests": 100, "bytes_out": 1000}),
    );
    assert_eq!(collector.post(a, &honest, None).0, 200);
    // host-b sends 2^64 - 1000 bytes for the same client: with wrapping addition the fleet's
    // total became 0.
    let evil = summary_batch(
        "host-b",
        "bb",
        1,
        "10.9.9.9",
        serde_json::json!({"requests": 1, "bytes_out": u64::MAX - 999}),
    );
    let (code, answer) = collector.post(b, &evil, None);
    assert_eq!(code, 400, "{answer}");
    assert!(answer.contains("implausible"), "{answer}");
    let health = collector.get("/v1/health");
    assert_eq!(health["ingest"]["implausible"], 1, "{health}");
    let rows = collector.get("/v1/clients?by=address");
    let row = rows
        .as_array()
        .and_then(|r| r.iter().find(|r| r["client"] == "10.9.9.9").cloned())
        .unwrap_or_else(|| panic!("10.9.9.9 in {rows}"));
    assert_eq!(row["bytes_out"], 1000, "{row}");
    assert_eq!(row["requests"], 100, "{row}");

    // An alert claiming host-a's name, with text that would forge a syslog line, CEF header
    // fields and extension keys.
    let forged = "Flood\r\n<13>1 2026-01-01T00:00:00Z host-a sensor - - - CEF:0|x|y|1|z|w|10| src=6.6.6.6\u{2028}cs1=evil\u{0}";
    let (code, answer) = collector.post(b, &alert_batch("host-b", "bb", 2, "host-a", forged), None);
    assert_eq!(code, 200, "{answer}");
    wait_for(
        "the forwarded alert at rsyslog",
        Duration::from_secs(30),
        || {
            let got = rsyslog.ids();
            if got.iter().any(|i| i.starts_with("host-b:forged")) {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        },
    );
    // A forged line would arrive with the real one.
    std::thread::sleep(Duration::from_secs(1));
    let msgs = rsyslog.received();
    assert_eq!(msgs.len(), 1, "one alert, one syslog message: {msgs:?}");
    let m = &msgs[0];
    assert_eq!(
        m["hostname"], "host-b",
        "the sending agent's name, not the claimed host: {m}"
    );
    let msg = m["msg"].as_str().expect("msg");
    assert!(
        msg.trim_start().starts_with("CEF:0|sensor|sensor|"),
        "{msg}"
    );
    assert!(
        !msg.chars().any(|c| c.is_control() || c == '\u{2028}'),
        "{msg:?}"
    );
    let (header, keys) = cef_fields(msg);
    assert_eq!(header.len(), 7, "{msg}");
    assert_eq!(
        header[6], "8",
        "the severity stays the seventh header field: {msg}"
    );
    let count = |k: &str| keys.iter().filter(|(key, _)| key == k).count();
    assert_eq!(
        (count("src"), count("cs1"), count("dvchost")),
        (1, 1, 1),
        "{keys:?}"
    );
    assert!(
        keys.contains(&("dvchost".into(), "host-b".into())),
        "{keys:?}"
    );
    assert!(
        keys.contains(&("src".into(), "10.9.9.9".into())),
        "no forged source: {keys:?}"
    );

    // Mutual TLS: host-a's token with a certificate issued for another name is refused.
    let tmp2 = tmp.path.join("mtls");
    fs::create_dir_all(&tmp2).expect("dir");
    let mtls = Collector::start(&tmp2.join("collector"), &certs, true, "");
    let viewer = mtls.client.clone().expect("viewer cert");
    let own = make_client_cert(&tmp.path, "host-a");
    let batch = summary_batch(
        "host-a",
        "cc",
        1,
        "10.9.9.8",
        serde_json::json!({"requests": 1}),
    );
    let (code, answer) = mtls.post(a, &batch, Some(&viewer));
    assert_eq!(code, 403, "{answer}");
    assert!(answer.contains("client certificate"), "{answer}");
    assert_eq!(mtls.post(a, &batch, Some(&own)).0, 200);
}

/// Issue #13, 3: 24 gzip bombs (137 KB, each inflating past the 128 MiB bound) posted at once
/// with a valid agent token. Before: each request held up to 256 MiB while decompressing, on
/// every worker at once. Now every request reserves from one budget (136 MiB by default).
#[test]
fn parallel_gzip_bombs_stay_within_the_memory_budget() {
    if !privileged("parallel_gzip_bombs_stay_within_the_memory_budget") {
        return;
    }
    let tmp = TempDir::new("collector-bombs");
    let certs = make_certs(&tmp.path);
    let collector = Collector::start(&tmp.path.join("collector"), &certs, false, "");
    let bomb = tmp.path.join("bomb.gz");
    run_ok(Command::new("sh").arg("-c").arg(format!(
        "head -c 140000000 /dev/zero | tr '\\0' ' ' | gzip -9 > '{}'",
        bomb.display()
    )));
    let before = collector.get("/v1/health");
    let n = 24;
    let out = run_ok(
        hostile_peer()
            .args([
                "bombs",
                "127.0.0.1",
                &collector.port.to_string(),
                AGENT_TOKENS[2].1,
            ])
            .arg(&bomb)
            .arg(n.to_string()),
    );
    let codes: Vec<u16> = serde_json::from_str(out.trim()).expect("codes");
    assert_eq!(codes.len(), n);
    assert!(codes.iter().all(|c| [413, 503].contains(c)), "{codes:?}");
    let after = collector.get("/v1/health");
    let delta = |k: &str| {
        after["ingest"][k].as_u64().unwrap_or(0) - before["ingest"][k].as_u64().unwrap_or(0)
    };
    assert_eq!(delta("too_large") + delta("busy"), n as u64, "{after}");
    let peak = collector.peak_rss();
    // The documented default (max_body_bytes 8 MiB x 17) where the health lacks it.
    let budget = after["memory_budget"]["capacity_bytes"]
        .as_u64()
        .unwrap_or(136 << 20);
    eprintln!(
        "gzip bombs: {codes:?}; collector peak RSS {} MiB (budget {} MiB)",
        peak >> 20,
        budget >> 20
    );
    assert!(
        peak < budget + (120 << 20),
        "peak RSS {} MiB beyond the budget {} MiB",
        peak >> 20,
        budget >> 20
    );
    assert_eq!(
        after["memory_budget"]["used_bytes"], 0,
        "every reservation released"
    );
    // Still accepting real batches.
    let ok = summary_batch(
        "host-c",
        "cc",
        1,
        "10.9.9.7",
        serde_json::json!({"requests": 3}),
    );
    assert_eq!(collector.post(AGENT_TOKENS[2].1, &ok, None).0, 200);
}
