//! Detection evaluated on labelled traffic, driven as real HTTP traffic over loopback against
//! an OpenAI-compatible server with the agent's clock sped up like the traffic's.
//!
//! Two sets (tests/peers/scenarios.py): the **held-out** set (the default, and what CI runs)
//! draws its parameters from ranges and a seed family the rules were never tuned on, with a
//! new seed every run unless `SENSOR_EVAL_SEED` is set (the seed is printed, so a failure
//! reproduces); the **tuning** set (`SENSOR_EVAL_SET=tuning`) is what the defaults were tuned
//! on. With the embedded default rules every attack must be detected, the un-listed nightly
//! eval job alerted on (docs/detection.md says why), and nobody else.
//!
//! CI runs 70 scaled minutes at 30x (about 2.5 real minutes); `cargo xtask eval` runs both
//! sets longer and writes the tables in docs/detection.md.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
    time::{Duration, Instant},
};

use sensor_tests::*;

const SCALE: u64 = 30;

fn group24(ip: &str) -> String {
    let o: Vec<&str> = ip.split('.').collect();
    format!("{}.{}.{}.0/24", o[0], o[1], o[2])
}

fn git_revision() -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let rev = Command::new("git")
        .args(["-C", root, "rev-parse", "--short=10", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let dirty = Command::new("git")
        .args(["-C", root, "status", "--porcelain", "--untracked-files=no"])
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    if dirty { format!("{rev}-dirty") } else { rev }
}

/// The scenarios an alert belongs to: by its key, or for a ring by its members.
fn owners_of(
    alert: &serde_json::Value,
    owner: &BTreeMap<(String, String), String>,
) -> BTreeSet<String> {
    let kind = alert["key_kind"].as_str().unwrap_or("");
    let mut found = BTreeSet::new();
    if kind == "ring" {
        let ring = &alert["explain"]["ring"];
        let member_kind = ring["member_kind"].as_str().unwrap_or("");
        for m in ring["members"].as_array().into_iter().flatten() {
            let m = m.as_str().unwrap_or("");
            for k in member_kind.split(',') {
                if let Some(o) = owner.get(&(k.to_owned(), m.to_owned())) {
                    found.insert(o.clone());
                }
            }
        }
    } else if let Some(o) = owner.get(&(
        kind.to_owned(),
        alert["key"].as_str().unwrap_or("").to_owned(),
    )) {
        found.insert(o.clone());
    }
    if found.is_empty() {
        found.insert("(unattributed)".into());
    }
    found
}

#[test]
fn labelled_scenarios_are_detected_without_false_alerts() {
    if !privileged("labelled_scenarios_are_detected_without_false_alerts") {
        return;
    }
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let minutes: f64 = env("SENSOR_EVAL_MINUTES")
        .and_then(|m| m.parse().ok())
        .unwrap_or(70.0);
    let set = env("SENSOR_EVAL_SET").unwrap_or_else(|| "heldout".into());
    let seed: u64 = env("SENSOR_EVAL_SEED")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            if set == "tuning" {
                1
            } else {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(7, |d| d.as_secs() % 100_000)
            }
        });
    eprintln!(
        "detection evaluation: set {set}, seed {seed} (reproduce with SENSOR_EVAL_SET={set} \
         SENSOR_EVAL_SEED={seed}), {minutes} scaled minutes at {SCALE}x"
    );
    let cg = Cgroup::new("detect");
    let port = free_port();
    let tmp = TempDir::new("detect");
    let _stub = OpenAiStub::start(&cg, port, &tmp.path.join("ledger.jsonl"));

    // A fixed identity secret, so the batch job's identity can be allow-listed up front.
    let secret = tmp.path.join("identity.key");
    std::fs::write(&secret, [7u8; 32]).expect("secret");
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let base = tmp.path.join("base.toml");
    std::fs::write(
        &base,
        format!("[identity]\nsecret_file = \"{}\"\n", secret.display()),
    )
    .expect("config");
    let batch_id = identity_of(&["--config".as_ref(), base.as_os_str()], "sk-batch-job");
    let config = tmp.path.join("sensor.toml");
    // Evaluations every real second (30 scaled seconds): the default 2 s would be a minute.
    std::fs::write(
        &config,
        format!(
            "[identity]\nsecret_file = \"{}\"\n\n[detect]\ntime_scale = {SCALE}\ninterval_secs = 1\n\
             allow_addresses = [\"127.0.21.0/24\"]\nallow_identities = [\"{batch_id}\"]\n",
            secret.display()
        ),
    )
    .expect("config");
    let agent = Agent::start_with(
        &cg,
        &[port],
        200,
        &["--config", config.to_str().expect("utf-8")],
    );
    let start_ms = agent.health()["clock_ms"].as_u64().expect("clock");

    let labels_path = tmp.path.join("labels.json");
    let started = Instant::now();
    run_ok(
        Command::new("python3")
            .arg(peers().join("scenarios.py"))
            .args(["--port", &port.to_string(), "--scale", &SCALE.to_string()])
            .args(["--minutes", &minutes.to_string(), "--set", &set])
            .args(["--seed", &seed.to_string(), "--labels"])
            .arg(&labels_path),
    );
    eprintln!("traffic ran {:.0?}", started.elapsed());
    let labels: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&labels_path).expect("labels"))
            .expect("labels json");

    // Which scenario each alert key belongs to.
    let mut owner: BTreeMap<(String, String), String> = BTreeMap::new();
    for (name, l) in &labels {
        for a in l["addresses"]
            .as_array()
            .expect("addresses")
            .iter()
            .filter_map(|a| a.as_str())
        {
            owner.insert(("address".into(), a.to_owned()), name.clone());
            owner.insert(("group".into(), group24(a)), name.clone());
        }
        for k in l["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .filter_map(|k| k.as_str())
        {
            owner.insert(
                (
                    "identity".into(),
                    identity_of(&["--config".as_ref(), config.as_os_str()], k),
                ),
                name.clone(),
            );
        }
    }
    let must_alert: BTreeSet<String> = labels
        .iter()
        .filter(|(_, l)| l["kind"] == "attack" || l["kind"] == "unlisted")
        .map(|(n, _)| n.clone())
        .collect();
    // Give the detector a few more evaluations for the traffic's last moments.
    let deadline = Instant::now() + Duration::from_secs(5);
    let alerts: Vec<serde_json::Value> = loop {
        let alerts: Vec<serde_json::Value> =
            serde_json::from_value(agent.api("/v1/alerts")).expect("alerts");
        let detected: BTreeSet<String> = alerts
            .iter()
            .filter(|a| a["mode"] == "alert")
            .flat_map(|a| owners_of(a, &owner))
            .collect();
        if must_alert.is_subset(&detected) || Instant::now() > deadline {
            break alerts;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let alerts: Vec<&serde_json::Value> = alerts.iter().filter(|a| a["mode"] == "alert").collect();

    let mut table = format!(
        "Set **{set}**, seed {seed}, revision `{}`, {minutes} scaled minutes at {SCALE}x.\n\n\
         | scenario | kind | clients | requests | alerted | time to detect | rules | false alerts |\n\
         |---|---|---|---|---|---|---|---|\n",
        git_revision()
    );
    let (mut attacks, mut caught, mut on_attacks, mut false_total) = (0, 0, 0, 0);
    let mut missed = Vec::new();
    let mut false_alerts = Vec::new();
    let mut ttds = Vec::new();
    for (name, l) in &labels {
        let mine: Vec<&&serde_json::Value> = alerts
            .iter()
            .filter(|a| owners_of(a, &owner).contains(name))
            .collect();
        let kind = l["kind"].as_str().unwrap_or("?");
        // From the scenario's own start (some begin minutes in).
        let offset_ms = (l["params"]["start"].as_f64().unwrap_or(0.0) * 60_000.0) as u64;
        let ttd = mine
            .iter()
            .filter_map(|a| a["first_seen_ms"].as_u64())
            .min()
            .map(|t| t.saturating_sub(start_ms + offset_ms) / 1000);
        let rules: BTreeSet<&str> = mine.iter().filter_map(|a| a["rule_id"].as_str()).collect();
        let expected = kind == "attack" || kind == "unlisted";
        let false_count = if expected { 0 } else { mine.len() };
        if kind == "attack" {
            attacks += 1;
            on_attacks += mine.len();
            if mine.is_empty() {
                missed.push(name.clone());
            } else {
                caught += 1;
                ttds.extend(ttd);
            }
        } else if !expected {
            false_total += mine.len();
            false_alerts.extend(mine.iter().map(|a| {
                format!(
                    "{name}: {} {} {}",
                    a["rule_id"], a["key_kind"], a["explain"]
                )
            }));
        } else if mine.is_empty() {
            missed.push(name.clone());
        }
        table.push_str(&format!(
            "| {name} | {kind} | {} | {} | {} | {} | {} | {false_count} |\n",
            l["addresses"]
                .as_array()
                .map_or(0, Vec::len)
                .max(l["keys"].as_array().map_or(0, Vec::len)),
            l["requests"],
            match (expected, mine.is_empty()) {
                (true, false) => "yes",
                (true, true) => "**no**",
                (false, true) => "-",
                (false, false) => "**yes**",
            },
            match (expected, ttd) {
                (true, Some(s)) => format!("{:.1} min", s as f64 / 60.0),
                _ => "-".into(),
            },
            rules.into_iter().collect::<Vec<_>>().join(", "),
        ));
    }
    let unattributed: Vec<String> = alerts
        .iter()
        .filter(|a| owners_of(a, &owner).contains("(unattributed)"))
        .map(|a| format!("{} {} {}", a["rule_id"], a["key_kind"], a["key"]))
        .collect();
    ttds.sort_unstable();
    let median = ttds
        .get(ttds.len() / 2)
        .map_or("-".into(), |s| format!("{:.1} min", *s as f64 / 60.0));
    let precision = if on_attacks + false_total == 0 {
        1.0
    } else {
        on_attacks as f64 / (on_attacks + false_total) as f64
    };
    table.push_str(&format!(
        "\nRecall {caught}/{attacks} attacks; precision {precision:.2} (alerts on attacks / \
         alerts on attacks and legitimate traffic); {false_total} false alerts; median time to \
         detect {median}.\n"
    ));
    eprintln!("\n{table}");
    if let Some(report) = std::env::var_os("SENSOR_EVAL_REPORT") {
        std::fs::write(&report, &table).expect("write report");
    }
    assert!(
        missed.is_empty() && false_alerts.is_empty() && unattributed.is_empty(),
        "set {set} seed {seed}: missed {missed:?}; false alerts {false_alerts:#?}; \
         unattributed {unattributed:?}\n{table}"
    );
}
