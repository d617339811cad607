//! SIEM outputs checked by real receivers: the agent raises real alerts (an OpenAI-compatible
//! stub in a test cgroup, an extraction bot driven by tests/peers/scenarios.py, the agent's
//! clock sped up 10x) and ships every alert event to
//!
//! - rsyslog (its own instances: imtcp plain and with TLS through the gtls driver, imudp),
//!   which parses the RFC 5424 header and structured data (mmpstrucdata) and writes what it
//!   understood to a file; the CEF payloads are parsed again by liblognorm's `lognormalizer`;
//! - ECS and OCSF JSON lines files: OCSF validated against the OCSF schema (ocsf-json-schema
//!   and jsonschema), ECS checked against the documented types of the fields used;
//! - a Splunk HEC and a webhook receiver (tests/peers/siem_receiver.py) that check the
//!   documented envelope and signature and answer 503 at first: the agent must retry;
//! - a syslog receiver stopped during traffic and restarted: nothing lost, nothing twice.
//!
//! Ground truth is the agent's own alerts.jsonl: every event there must arrive exactly once
//! (by its idempotent id), in order. Every wait polls a condition with a deadline.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    io::BufRead as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use sensor_tests::{siem::*, *};
use serde_json::Value;

const SCALE: u64 = 10;

fn peers() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers")
}

/// One alert event as the agent recorded it in alerts.jsonl.
#[derive(Debug, Clone)]
struct Expected {
    id: String,
    event: String,
    alert: Value,
}

impl Expected {
    fn time_ms(&self) -> u64 {
        if self.event == "resolve" {
            let t = self.alert["resolved_at"].as_str().expect("resolved_at");
            return rfc3339_ms(t);
        }
        self.alert["last_seen_ms"].as_u64().expect("last_seen_ms")
    }

    fn str(&self, key: &str) -> String {
        self.alert[key].as_str().unwrap_or_default().to_owned()
    }

    /// (requests, bytes in, bytes out) of the alert's window, as the outputs report them.
    fn counters(&self) -> (u64, u64, u64) {
        let w = match self.alert["window"].as_str() {
            Some(w @ ("1m" | "10m" | "1h")) => w.to_owned(),
            _ => "1h".to_owned(),
        };
        let e = &self.alert["evidence"];
        let get = |k: &str| e[format!("{k}_{w}")].as_f64().unwrap_or(0.0) as u64;
        (get("requests"), get("bytes_in"), get("bytes_out"))
    }

    fn is_address(&self) -> bool {
        matches!(
            self.alert["key_kind"].as_str(),
            Some("address" | "forwarded")
        ) && self.str("key").parse::<std::net::IpAddr>().is_ok()
    }
}

/// "2026-01-01T00:00:00.123Z" -> unix ms (UTC, as the agent writes them).
fn rfc3339_ms(t: &str) -> u64 {
    let out = run_ok(Command::new("date").args(["-u", "-d", t, "+%s%3N"]));
    out.trim().parse().expect("date +%s%3N")
}

/// The stub server, the agent with `outputs` configured, in a cgroup of their own.
struct Run {
    stub: Child,
    agent: Agent,
    port: u16,
    _cg: Cgroup,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.stub.kill();
        let _ = self.stub.wait();
    }
}

impl Run {
    fn start(name: &str, tmp: &TempDir, outputs: &str) -> Self {
        let cg = Cgroup::new(name);
        let port = free_port();
        let mut stub = cg
            .command("python3")
            .arg(peers().join("openai_stub.py"))
            .arg(port.to_string())
            .arg(tmp.path.join("ledger.jsonl"))
            .stdout(Stdio::piped())
            .spawn()
            .expect("stub");
        let mut ready = String::new();
        std::io::BufReader::new(stub.stdout.take().expect("stdout"))
            .read_line(&mut ready)
            .expect("stub output");
        assert_eq!(ready.trim(), "ready");
        // Fast evaluations and a short resolve grace (scaled: 3 s real), so a bot of a few
        // scaled minutes yields opens, updates and resolves.
        let config = tmp.path.join("sensor.toml");
        fs::write(
            &config,
            format!(
                "[detect]\ntime_scale = {SCALE}\ninterval_secs = 1\nresolve_after_secs = 30\n\n{outputs}"
            ),
        )
        .expect("config");
        let agent = Agent::start_with(
            &cg,
            &[port],
            200,
            &["--config", config.to_str().expect("utf-8")],
        );
        Self {
            stub,
            agent,
            port,
            _cg: cg,
        }
    }

    /// The extraction bot (8 parallel connections, continuous streamed replies).
    fn bot(&self, tmp: &TempDir, scaled_minutes: f64) -> Child {
        Command::new("python3")
            .arg(peers().join("scenarios.py"))
            .args([
                "--port",
                &self.port.to_string(),
                "--scale",
                &SCALE.to_string(),
            ])
            .args([
                "--minutes",
                &scaled_minutes.to_string(),
                "--only",
                "bot",
                "--labels",
            ])
            .arg(tmp.path.join("labels.json"))
            .spawn()
            .expect("scenarios.py")
    }

    /// Waits for the bot to finish and every alert to resolve; returns alerts.jsonl.
    fn finish(&self, mut bot: Child) -> Vec<Expected> {
        let status = wait_for("the bot to finish", Duration::from_secs(120), || {
            bot.try_wait()
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "running".to_owned())
        });
        assert!(status.success(), "scenarios.py failed");
        wait_for(
            "every alert to open and resolve",
            Duration::from_secs(60),
            || {
                let alerts = self.agent.api("/v1/alerts");
                let alerts = alerts.as_array().cloned().unwrap_or_default();
                let open = alerts.iter().filter(|a| a["state"] == "open").count();
                if !alerts.is_empty() && open == 0 {
                    Ok(())
                } else {
                    Err(format!("{} alerts, {open} open", alerts.len()))
                }
            },
        );
        let expected: Vec<Expected> = self
            .agent
            .alert_log()
            .into_iter()
            .map(|l| {
                let alert = l["alert"].clone();
                let event = l["event"].as_str().expect("event").to_owned();
                Expected {
                    id: format!(
                        "{}:{event}:{}",
                        alert["id"].as_str().expect("id"),
                        alert["updates"]
                    ),
                    event,
                    alert,
                }
            })
            .collect();
        let events: HashSet<&str> = expected.iter().map(|e| e.event.as_str()).collect();
        assert!(
            events.contains("open") && events.contains("resolve"),
            "opens and resolves: {events:?}"
        );
        expected
    }

    fn output(&self, name: &str) -> Value {
        let health = self.agent.health();
        health["outputs"]
            .as_array()
            .and_then(|o| o.iter().find(|o| o["name"] == name).cloned())
            .unwrap_or_else(|| panic!("output {name} not in /v1/health: {health}"))
    }

    /// Waits until `name` has delivered everything it spooled.
    fn wait_delivered(&self, name: &str, count: usize) -> Value {
        wait_for(
            &format!("output {name} to deliver {count} events"),
            Duration::from_secs(60),
            || {
                let o = self.output(name);
                if o["pending"] == 0 && o["sent"] == count as u64 && o["spooled"] == count as u64 {
                    Ok(o)
                } else {
                    Err(o.to_string())
                }
            },
        )
    }
}

/// Asserts `got` (ids in arrival order) is exactly `expected`'s ids, each once, in order.
fn assert_exactly_once_in_order(what: &str, got: &[String], expected: &[Expected]) {
    let mut seen = HashSet::new();
    let dups: Vec<&String> = got.iter().filter(|id| !seen.insert(*id)).collect();
    assert!(dups.is_empty(), "{what}: duplicates {dups:?}");
    let want: Vec<&str> = expected.iter().map(|e| e.id.as_str()).collect();
    let got: Vec<&str> = got.iter().map(String::as_str).collect();
    assert_eq!(got, want, "{what}: every event once, in order");
}

fn syslog_severity(e: &Expected) -> u64 {
    if e.event == "resolve" {
        return 6;
    }
    match e.alert["severity"].as_str() {
        Some("critical") => 2,
        Some("high") => 3,
        Some("medium") => 4,
        _ => 5,
    }
}

fn cef_severity(s: &str) -> &'static str {
    match s {
        "low" => "3",
        "medium" => "5",
        "high" => "8",
        "critical" => "10",
        _ => "5",
    }
}

/// Checks one received message field by field against the alert event it carries.
fn check_rfc5424(m: &Value, e: &Expected) {
    let ctx = format!("{m}");
    assert_eq!(m["version"], "1", "{ctx}");
    // local0 (16).
    assert_eq!(m["pri"], (16 * 8 + syslog_severity(e)).to_string(), "{ctx}");
    assert_eq!(
        m["timestamp"].as_str().map(rfc3339_ms),
        Some(e.time_ms()),
        "{ctx}"
    );
    assert_eq!(m["hostname"], e.alert["host"], "{ctx}");
    assert_eq!(m["app"], "sensor", "{ctx}");
    assert_eq!(m["procid"], "-", "{ctx}");
    assert_eq!(m["msgid"], e.event.as_str(), "{ctx}");
    let s = sd(m);
    let (requests, bytes_in, bytes_out) = e.counters();
    assert_eq!(s["id"], e.id.as_str(), "{ctx}");
    assert_eq!(s["event"], e.event.as_str(), "{ctx}");
    assert_eq!(s["alert"], e.alert["id"], "{ctx}");
    assert_eq!(s["rule"], e.alert["rule_id"], "{ctx}");
    assert_eq!(s["key_kind"], e.alert["key_kind"], "{ctx}");
    assert_eq!(s["key"], e.alert["key"], "{ctx}");
    assert_eq!(s["severity"], e.alert["severity"], "{ctx}");
    assert_eq!(s["window"], e.alert["window"], "{ctx}");
    assert_eq!(s["requests"], requests.to_string(), "{ctx}");
    assert_eq!(s["bytes_in"], bytes_in.to_string(), "{ctx}");
    assert_eq!(s["bytes_out"], bytes_out.to_string(), "{ctx}");
    assert_eq!(s["technique"], "AML.T0024.002", "{ctx}");
}

/// Checks a lognormalizer parse of a CEF payload against the alert event.
fn check_cef(parsed: &Value, e: &Expected) {
    let ctx = format!("{parsed}");
    assert_eq!(parsed["DeviceVendor"], "sensor", "{ctx}");
    assert_eq!(parsed["DeviceProduct"], "sensor", "{ctx}");
    assert_eq!(parsed["SignatureID"], e.alert["rule_id"], "{ctx}");
    assert_eq!(parsed["Name"], e.alert["rule_name"], "{ctx}");
    assert_eq!(
        parsed["Severity"],
        cef_severity(&e.str("severity")),
        "{ctx}"
    );
    let x = &parsed["Extensions"];
    let (requests, bytes_in, bytes_out) = e.counters();
    assert_eq!(x["rt"], e.time_ms().to_string(), "{ctx}");
    assert_eq!(x["start"], e.alert["first_seen_ms"].to_string(), "{ctx}");
    assert_eq!(x["end"], e.alert["last_seen_ms"].to_string(), "{ctx}");
    assert_eq!(x["act"], e.event.as_str(), "{ctx}");
    assert_eq!(x["externalId"], e.id.as_str(), "{ctx}");
    assert_eq!(x["dvchost"], e.alert["host"], "{ctx}");
    assert_eq!(x["cnt"], requests.to_string(), "{ctx}");
    assert_eq!(x["in"], bytes_in.to_string(), "{ctx}");
    assert_eq!(x["out"], bytes_out.to_string(), "{ctx}");
    assert_eq!(x["cs1"], e.alert["rule_id"], "{ctx}");
    assert_eq!(x["cs1Label"], "ruleId", "{ctx}");
    assert_eq!(x["cs2"], e.alert["key_kind"], "{ctx}");
    assert_eq!(x["cs2Label"], "keyKind", "{ctx}");
    assert_eq!(x["cs3"], e.alert["key"], "{ctx}");
    assert_eq!(x["cs3Label"], "identity", "{ctx}");
    assert_eq!(x["cs4"], "AML.T0024.002", "{ctx}");
    assert_eq!(x["cs4Label"], "mitreAtlasTechniqueId", "{ctx}");
    assert_eq!(x["cs5"], "Extract AI Model", "{ctx}");
    assert_eq!(x["cs6"], e.alert["id"], "{ctx}");
    if e.is_address() {
        assert_eq!(x["src"], e.alert["key"], "{ctx}");
    } else {
        assert!(x.get("src").is_none(), "{ctx}");
    }
    if e.alert["key_kind"] == "identity" {
        assert_eq!(x["suser"], e.alert["key"], "{ctx}");
    }
}

fn lognormalize(tmp: &Path, payloads: &[String]) -> Vec<Value> {
    let rules = tmp.join("cef.rulebase");
    fs::write(&rules, "version=2\nrule=:%.:cef%\n").expect("rulebase");
    let input = tmp.join("cef-payloads.txt");
    fs::write(&input, payloads.join("\n") + "\n").expect("payloads");
    let out = run_ok(
        Command::new("sh")
            .arg("-c")
            .arg("exec lognormalizer -r \"$1\" -e json < \"$2\"")
            .arg("sh")
            .arg(&rules)
            .arg(&input),
    );
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("lognormalizer: {e}: {l}")))
        .collect()
}

#[test]
fn syslog_cef_and_leef_reach_rsyslog_over_tcp_tls_and_udp() {
    if !privileged("syslog_cef_and_leef_reach_rsyslog_over_tcp_tls_and_udp") {
        return;
    }
    let tmp = TempDir::new("out-syslog");
    let certs = make_certs(&tmp.path);
    let (tcp, udp, tls) = (listen_port(), listen_port(), listen_port());
    let plain = Rsyslog::start(&tmp.path, "plain", tcp, Some(udp), None);
    let secure = Rsyslog::start(&tmp.path, "tls", tls, None, Some(&certs));
    let outputs = format!(
        r#"[[outputs]]
type = "syslog"
name = "tcp-cef"
address = "127.0.0.1:{tcp}"
protocol = "tcp"
message = "cef"

[[outputs]]
type = "syslog"
name = "tls-cef"
address = "127.0.0.1:{tls}"
protocol = "tls"
message = "cef"
ca_file = "{}"
server_name = "syslog.test"

[[outputs]]
type = "syslog"
name = "udp-leef"
address = "127.0.0.1:{udp}"
protocol = "udp"
message = "leef"
facility = "local0"
"#,
        certs.ca.display()
    );
    let run = Run::start("out-syslog", &tmp, &outputs);
    let bot = run.bot(&tmp, 2.5);
    let expected = run.finish(bot);
    let n = expected.len();
    for name in ["tcp-cef", "tls-cef", "udp-leef"] {
        run.wait_delivered(name, n);
    }
    // The plain instance receives TCP (CEF) and UDP (LEEF) messages.
    let by_input = |r: &Rsyslog, input: &str| -> Vec<Value> {
        r.received()
            .into_iter()
            .filter(|m| m["input"] == input)
            .collect()
    };
    let msgs = wait_for(
        "rsyslog to write every message",
        Duration::from_secs(30),
        || {
            let (t, u, s) = (
                by_input(&plain, "imtcp"),
                by_input(&plain, "imudp"),
                by_input(&secure, "imtcp"),
            );
            if t.len() >= n && u.len() >= n && s.len() >= n {
                Ok((t, u, s))
            } else {
                Err(format!(
                    "tcp {} udp {} tls {} of {n}",
                    t.len(),
                    u.len(),
                    s.len()
                ))
            }
        },
    );
    let (tcp_msgs, udp_msgs, tls_msgs) = msgs;
    let ids = |v: &[Value]| -> Vec<String> {
        v.iter()
            .map(|m| sd(m)["id"].as_str().unwrap_or("?").to_owned())
            .collect()
    };
    assert_exactly_once_in_order("syslog tcp", &ids(&tcp_msgs), &expected);
    assert_exactly_once_in_order("syslog tls", &ids(&tls_msgs), &expected);
    assert_exactly_once_in_order("syslog udp", &ids(&udp_msgs), &expected);
    for (m, e) in tcp_msgs
        .iter()
        .chain(&tls_msgs)
        .chain(&udp_msgs)
        .zip(expected.iter().cycle())
    {
        check_rfc5424(m, e);
    }
    // CEF payloads, parsed by liblognorm.
    for (what, msgs) in [("tcp", &tcp_msgs), ("tls", &tls_msgs)] {
        let payloads: Vec<String> = msgs
            .iter()
            .map(|m| m["msg"].as_str().unwrap_or("").trim_start().to_owned())
            .collect();
        assert!(
            payloads
                .iter()
                .all(|p| p.starts_with("CEF:0|sensor|sensor|")),
            "{what}: {payloads:?}"
        );
        let parsed = lognormalize(&tmp.path, &payloads);
        assert_eq!(parsed.len(), n, "{what}: one parse per message");
        for (p, e) in parsed.iter().zip(&expected) {
            assert!(
                p.get("originalmsg").is_none(),
                "{what}: lognormalizer could not parse: {p}"
            );
            check_cef(p, e);
        }
    }
    // LEEF 2.0 payloads: header, tab-delimited attributes.
    for (m, e) in udp_msgs.iter().zip(&expected) {
        let msg = m["msg"].as_str().unwrap_or("").trim_start();
        let header = format!(
            "LEEF:2.0|sensor|sensor|{}|{}|x09|",
            env!("CARGO_PKG_VERSION"),
            e.str("rule_id")
        );
        let attrs = msg
            .strip_prefix(&header)
            .unwrap_or_else(|| panic!("LEEF header: {msg}"));
        let kv: BTreeMap<&str, &str> = attrs
            .split('\t')
            .map(|a| {
                a.split_once('=')
                    .unwrap_or_else(|| panic!("LEEF attribute {a}"))
            })
            .collect();
        let (requests, bytes_in, bytes_out) = e.counters();
        assert_eq!(kv["eventId"], e.id);
        assert_eq!(kv["devTime"], e.time_ms().to_string());
        assert_eq!(kv["srcBytes"], bytes_in.to_string());
        assert_eq!(kv["dstBytes"], bytes_out.to_string());
        assert_eq!(kv["requests"], requests.to_string());
        assert_eq!(kv["ruleName"], e.str("rule_name"));
        assert_eq!(kv["techniqueId"], "AML.T0024.002");
        if e.is_address() {
            assert_eq!(kv["src"], e.str("key"));
        }
    }
    for name in ["tcp-cef", "tls-cef", "udp-leef"] {
        let o = run.output(name);
        assert_eq!(
            (o["dropped"].as_u64(), o["retried"].as_u64()),
            (Some(0), Some(0)),
            "{o}"
        );
    }
}

// --- files, HEC, webhook --------------------------------------------------------------------

/// ECS field types (ECS reference, field details) of the fields the ECS output uses.
const ECS_TYPES: &[(&str, &str)] = &[
    ("@timestamp", "date"),
    ("ecs.version", "keyword"),
    ("message", "match_only_text"),
    ("event.kind", "keyword"),
    ("event.category", "keyword"),
    ("event.type", "keyword"),
    ("event.action", "keyword"),
    ("event.id", "keyword"),
    ("event.sequence", "long"),
    ("event.severity", "long"),
    ("event.risk_score", "float"),
    ("event.start", "date"),
    ("event.end", "date"),
    ("event.created", "date"),
    ("event.dataset", "keyword"),
    ("event.module", "keyword"),
    ("event.provider", "keyword"),
    ("event.reason", "keyword"),
    ("rule.id", "keyword"),
    ("rule.name", "keyword"),
    ("rule.category", "keyword"),
    ("rule.ruleset", "keyword"),
    ("source.ip", "ip"),
    ("source.address", "keyword"),
    ("source.bytes", "long"),
    ("destination.bytes", "long"),
    ("network.bytes", "long"),
    ("network.transport", "keyword"),
    ("network.protocol", "keyword"),
    ("threat.framework", "keyword"),
    ("threat.technique.id", "keyword"),
    ("threat.technique.name", "keyword"),
    ("host.name", "keyword"),
    ("host.hostname", "keyword"),
    ("observer.hostname", "keyword"),
    ("observer.type", "keyword"),
    ("observer.vendor", "keyword"),
    ("observer.product", "keyword"),
    ("observer.version", "keyword"),
    ("user.id", "keyword"),
];

/// Whether `v` (or each element of an array, as ECS allows for any field) has ECS type `ty`.
fn ecs_type_ok(v: &Value, ty: &str) -> bool {
    if let Value::Array(items) = v {
        return items.iter().all(|i| ecs_type_ok(i, ty));
    }
    match ty {
        "keyword" | "match_only_text" => v.is_string(),
        "long" => v.is_i64() || v.is_u64(),
        "float" => v.is_number(),
        "ip" => v
            .as_str()
            .is_some_and(|s| s.parse::<std::net::IpAddr>().is_ok()),
        "date" => v.as_str().is_some_and(|s| {
            Command::new("date")
                .args(["-u", "-d", s, "+%s"])
                .output()
                .is_ok_and(|o| o.status.success())
                && s.contains('T')
        }),
        _ => false,
    }
}

fn check_ecs(doc: &Value, e: &Expected) {
    let ctx = doc.to_string();
    let known: HashSet<&str> = ECS_TYPES.iter().map(|(f, _)| *f).collect();
    // Every ECS field present has its documented type; everything else is in `sensor`.
    fn leaves(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
        match v {
            Value::Object(m) if prefix != "sensor" => {
                for (k, x) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    leaves(&p, x, out);
                }
            }
            _ => out.push((prefix.to_owned(), v.clone())),
        }
    }
    let mut fields = Vec::new();
    leaves("", doc, &mut fields);
    for (field, value) in &fields {
        if field == "sensor" {
            continue;
        }
        assert!(
            known.contains(field.as_str()),
            "{field} is not a documented ECS field used: {ctx}"
        );
        let ty = ECS_TYPES
            .iter()
            .find(|(f, _)| f == field)
            .map(|(_, t)| *t)
            .unwrap_or("");
        assert!(
            ecs_type_ok(value, ty),
            "{field} = {value} is not an ECS {ty}: {ctx}"
        );
    }
    let (_, bytes_in, bytes_out) = e.counters();
    assert_eq!(doc["event"]["kind"], "alert", "{ctx}");
    assert_eq!(doc["event"]["id"], e.id.as_str(), "{ctx}");
    assert_eq!(doc["rule"]["id"], e.alert["rule_id"], "{ctx}");
    assert_eq!(doc["rule"]["name"], e.alert["rule_name"], "{ctx}");
    assert_eq!(doc["source"]["bytes"], bytes_in, "{ctx}");
    assert_eq!(doc["destination"]["bytes"], bytes_out, "{ctx}");
    assert_eq!(doc["threat"]["framework"], "MITRE ATLAS", "{ctx}");
    assert_eq!(
        doc["threat"]["technique"]["id"][0], "AML.T0024.002",
        "{ctx}"
    );
    assert_eq!(
        doc["threat"]["technique"]["name"][0], "Extract AI Model",
        "{ctx}"
    );
    assert_eq!(doc["host"]["name"], e.alert["host"], "{ctx}");
    assert_eq!(doc["sensor"]["alert"], e.alert, "{ctx}");
    assert_eq!(
        rfc3339_ms(doc["@timestamp"].as_str().unwrap_or("")),
        e.time_ms(),
        "{ctx}"
    );
    if e.is_address() {
        assert_eq!(doc["source"]["ip"], e.alert["key"], "{ctx}");
    } else {
        assert!(doc["source"].get("ip").is_none(), "{ctx}");
    }
}

#[test]
fn ecs_ocsf_hec_and_webhook_outputs_are_valid_and_retried() {
    if !privileged("ecs_ocsf_hec_and_webhook_outputs_are_valid_and_retried") {
        return;
    }
    let tmp = TempDir::new("out-files");
    let token = "11111111-2222-3333-4444-555555555555";
    let token_file = tmp.path.join("hec.token");
    fs::write(&token_file, format!("{token}\n")).expect("token");
    let secret_file = tmp.path.join("webhook.secret");
    fs::write(&secret_file, "s3cret-for-hmac\n").expect("secret");
    let receiver_dir = tmp.path.join("receiver");
    fs::create_dir_all(&receiver_dir).expect("receiver dir");
    let rport = listen_port();
    let mut receiver = Command::new("python3")
        .arg(peers().join("siem_receiver.py"))
        .arg(rport.to_string())
        .arg(&receiver_dir)
        .args(["--token", token, "--busy", "2", "--secret-file"])
        .arg(&secret_file)
        .stdout(Stdio::piped())
        .spawn()
        .expect("siem_receiver.py");
    let mut ready = String::new();
    std::io::BufReader::new(receiver.stdout.take().expect("stdout"))
        .read_line(&mut ready)
        .expect("receiver output");
    assert_eq!(ready.trim(), "ready");
    let (ecs, ocsf) = (
        tmp.path.join("ecs/alerts.jsonl"),
        tmp.path.join("ocsf/alerts.jsonl"),
    );
    let outputs = format!(
        r#"[[outputs]]
type = "ecs-file"
name = "ecs"
path = "{}"

[[outputs]]
type = "ocsf-file"
name = "ocsf"
path = "{}"

[[outputs]]
type = "hec"
name = "splunk"
url = "http://127.0.0.1:{rport}/services/collector/event"
token_file = "{}"
batch_max_events = 4
retry_max_secs = 2

[[outputs]]
type = "webhook"
name = "hook"
url = "http://127.0.0.1:{rport}/hook"
secret_file = "{}"
retry_max_secs = 2
"#,
        ecs.display(),
        ocsf.display(),
        token_file.display(),
        secret_file.display()
    );
    let run = Run::start("out-files", &tmp, &outputs);
    let bot = run.bot(&tmp, 2.5);
    let expected = run.finish(bot);
    let n = expected.len();
    let splunk = run.wait_delivered("splunk", n);
    let hook = run.wait_delivered("hook", n);
    run.wait_delivered("ecs", n);
    run.wait_delivered("ocsf", n);

    // HEC: 503 twice (Server is busy), then accepted; the agent retried, lost nothing.
    let answers: Vec<Value> = read_jsonl(&receiver_dir.join("answers.jsonl"));
    let hec_status: Vec<u64> = answers
        .iter()
        .filter(|a| a["route"] == "hec")
        .filter_map(|a| a["status"].as_u64())
        .collect();
    assert_eq!(&hec_status[..2], &[503, 503], "{hec_status:?}");
    assert!(hec_status[2..].iter().all(|s| *s == 200), "{hec_status:?}");
    assert!(splunk["retried"].as_u64() >= Some(2), "{splunk}");
    assert_eq!(splunk["dropped"], 0, "{splunk}");
    assert!(
        splunk["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("503")),
        "{splunk}"
    );
    let hec = read_jsonl(&receiver_dir.join("hec.jsonl"));
    let ids: Vec<String> = hec
        .iter()
        .map(|e| e["event"]["id"].as_str().unwrap_or("?").to_owned())
        .collect();
    assert_exactly_once_in_order("HEC", &ids, &expected);
    for (h, e) in hec.iter().zip(&expected) {
        assert_eq!(h["sourcetype"], "sensor:alert");
        assert_eq!(h["source"], "sensor");
        assert_eq!(h["host"], e.alert["host"]);
        assert_eq!(
            (h["time"].as_f64().unwrap_or(0.0) * 1000.0).round() as u64,
            e.time_ms()
        );
        assert_eq!(h["event"]["alert"], e.alert);
        assert_eq!(h["event"]["event"], e.event.as_str());
    }
    // Webhook: signed bodies (the receiver checked each HMAC), retried after 503s.
    assert!(hook["retried"].as_u64() >= Some(2), "{hook}");
    let hooks = read_jsonl(&receiver_dir.join("webhook.jsonl"));
    let ids: Vec<String> = hooks
        .iter()
        .map(|h| h["body"]["id"].as_str().unwrap_or("?").to_owned())
        .collect();
    assert_exactly_once_in_order("webhook", &ids, &expected);
    for (h, e) in hooks.iter().zip(&expected) {
        assert_eq!(h["event_id_header"], e.id.as_str());
        assert_eq!(h["content_type"], "application/json");
        assert_eq!(h["body"]["alert"], e.alert);
    }
    // OCSF: valid Detection Findings by the OCSF schema, one per event, in order.
    let validation = Command::new(python())
        .arg(peers().join("ocsf_validate.py"))
        .arg("1.5.0")
        .arg(&ocsf)
        .output()
        .expect("ocsf_validate.py");
    assert!(
        validation.status.success(),
        "OCSF schema validation failed:\n{}{}",
        String::from_utf8_lossy(&validation.stdout),
        String::from_utf8_lossy(&validation.stderr)
    );
    let findings = read_jsonl(&ocsf);
    let ids: Vec<String> = findings
        .iter()
        .map(|f| f["metadata"]["uid"].as_str().unwrap_or("?").to_owned())
        .collect();
    assert_exactly_once_in_order("OCSF", &ids, &expected);
    for (f, e) in findings.iter().zip(&expected) {
        let activity = match e.event.as_str() {
            "open" => 1,
            "update" => 2,
            _ => 3,
        };
        assert_eq!(f["activity_id"], activity);
        assert_eq!(f["type_uid"], 200_400 + activity);
        assert_eq!(f["time"], e.time_ms());
        assert_eq!(f["finding_info"]["uid"], e.alert["id"]);
        assert_eq!(f["finding_info"]["analytic"]["uid"], e.alert["rule_id"]);
    }
    // ECS: documented types, values from the alert.
    let docs = read_jsonl(&ecs);
    let ids: Vec<String> = docs
        .iter()
        .map(|d| d["event"]["id"].as_str().unwrap_or("?").to_owned())
        .collect();
    assert_exactly_once_in_order("ECS", &ids, &expected);
    for (d, e) in docs.iter().zip(&expected) {
        check_ecs(d, e);
    }
    let _ = receiver.kill();
    let _ = receiver.wait();
}

// --- outage ---------------------------------------------------------------------------------

#[test]
fn syslog_receiver_outage_loses_nothing_and_duplicates_nothing() {
    if !privileged("syslog_receiver_outage_loses_nothing_and_duplicates_nothing") {
        return;
    }
    let tmp = TempDir::new("out-outage");
    let tcp = listen_port();
    let mut rsyslog = Rsyslog::start(&tmp.path, "plain", tcp, None, None);
    let outputs = format!(
        r#"[[outputs]]
type = "syslog"
name = "siem"
address = "127.0.0.1:{tcp}"
protocol = "tcp"
message = "json"
retry_max_secs = 2
"#
    );
    let run = Run::start("out-outage", &tmp, &outputs);
    let bot = run.bot(&tmp, 3.0);
    // The first alerts arrive; then the receiver goes away during the traffic.
    wait_for(
        "the first alerts at rsyslog",
        Duration::from_secs(60),
        || {
            let n = rsyslog.received().len();
            if n > 0 {
                Ok(())
            } else {
                Err("none yet".into())
            }
        },
    );
    rsyslog.stop();
    let before = rsyslog.received().len();
    // Events keep coming (updates, then resolves after the bot stops): they wait in the spool.
    let spooled = wait_for(
        "events to wait in the spool",
        Duration::from_secs(90),
        || {
            let o = run.output("siem");
            if o["pending"].as_u64() >= Some(1) && o["retried"].as_u64() >= Some(1) {
                Ok(o)
            } else {
                Err(o.to_string())
            }
        },
    );
    assert!(spooled["last_error"].as_str().is_some(), "{spooled}");
    rsyslog.spawn();
    let expected = run.finish(bot);
    let n = expected.len();
    let siem = run.wait_delivered("siem", n);
    assert_eq!(siem["dropped"], 0, "{siem}");
    let ids = wait_for(
        "rsyslog to write every event",
        Duration::from_secs(30),
        || {
            let ids = rsyslog.ids();
            let unique = ids.iter().collect::<HashSet<_>>().len();
            if unique >= n {
                Ok(ids)
            } else {
                Err(format!("{unique} of {n}"))
            }
        },
    );
    assert!(before < n, "some events happened during the outage");
    // Syslog has no acknowledgements: after a lost connection the output writes its recent
    // messages again, and a receiver deduplicates by id. Exactly once by id, in order.
    let mut seen = HashSet::new();
    let unique: Vec<String> = ids
        .into_iter()
        .filter(|id| seen.insert(id.clone()))
        .collect();
    assert_exactly_once_in_order("syslog across an outage", &unique, &expected);
    // The JSON MSG carries the whole record (the first copy of each replayed message).
    let mut first = HashSet::new();
    let received: Vec<Value> = rsyslog
        .received()
        .into_iter()
        .filter(|m| first.insert(sd(m)["id"].to_string()))
        .collect();
    for (m, e) in received.iter().zip(&expected) {
        check_rfc5424(m, e);
        let body: Value =
            serde_json::from_str(m["msg"].as_str().unwrap_or("").trim_start()).expect("JSON MSG");
        assert_eq!(body["id"], e.id.as_str());
        assert_eq!(body["alert"], e.alert);
    }
}
