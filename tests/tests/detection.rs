//! Detection evaluated on labelled traffic: normal interactive users, an allow-listed batch
//! job, and four kinds of extractors, driven as real HTTP traffic over loopback against an
//! OpenAI-compatible server, with the agent's clock sped up like the traffic's. With the
//! embedded default rules every attack must be detected and nobody else alerted on.
//!
//! The test command runs a short version (8 scaled minutes, about a minute of real time);
//! `cargo xtask eval` runs it longer and writes the table in docs/detection.md.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
    time::Duration,
};

use sensor_tests::*;

const SCALE: u64 = 10;

fn group24(ip: &str) -> String {
    let o: Vec<&str> = ip.split('.').collect();
    format!("{}.{}.{}.0/24", o[0], o[1], o[2])
}

#[test]
fn labelled_scenarios_are_detected_without_false_alerts() {
    if !privileged("labelled_scenarios_are_detected_without_false_alerts") {
        return;
    }
    let minutes: f64 = std::env::var("SENSOR_EVAL_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(8.0);
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
    std::fs::write(
        &config,
        format!(
            "[identity]\nsecret_file = \"{}\"\n\n[detect]\ntime_scale = {SCALE}\n\
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
    run_ok(
        Command::new("python3")
            .arg(peers().join("scenarios.py"))
            .args(["--port", &port.to_string(), "--scale", &SCALE.to_string()])
            .args(["--minutes", &minutes.to_string(), "--labels"])
            .arg(&labels_path),
    );
    let labels: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&labels_path).expect("labels"))
            .expect("labels json");

    // Which scenario each alert key belongs to.
    let mut owner: BTreeMap<(String, String), String> = BTreeMap::new();
    for (name, l) in &labels {
        let addresses: Vec<&str> = l["addresses"]
            .as_array()
            .expect("addresses")
            .iter()
            .filter_map(|a| a.as_str())
            .collect();
        for a in &addresses {
            owner.insert(("address".into(), (*a).to_owned()), name.clone());
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
    let attacks: BTreeSet<String> = labels
        .iter()
        .filter(|(_, l)| l["kind"] == "attack")
        .map(|(n, _)| n.clone())
        .collect();
    // Give the detector two more evaluations for the traffic's last moments.
    let alerts = wait_for(
        "every attack scenario to be alerted on",
        Duration::from_secs(15),
        || {
            let alerts: Vec<serde_json::Value> =
                serde_json::from_value(agent.api("/v1/alerts")).map_err(|e| e.to_string())?;
            let detected: BTreeSet<String> = alerts
                .iter()
                .filter(|a| a["mode"] == "alert")
                .filter_map(|a| {
                    owner
                        .get(&(
                            a["key_kind"].as_str()?.to_owned(),
                            a["key"].as_str()?.to_owned(),
                        ))
                        .cloned()
                })
                .collect();
            if attacks.is_subset(&detected) {
                Ok(alerts)
            } else {
                Err(format!("detected {detected:?} of {attacks:?}"))
            }
        },
    );

    let mut table = String::from(
        "| scenario | kind | clients | requests | detected | time to detect | rules | false alerts |\n|---|---|---|---|---|---|---|---|\n",
    );
    let mut false_alerts = Vec::new();
    for (name, l) in &labels {
        let mine: Vec<&serde_json::Value> = alerts
            .iter()
            .filter(|a| a["mode"] == "alert")
            .filter(|a| {
                owner.get(&(
                    a["key_kind"].as_str().unwrap_or("").to_owned(),
                    a["key"].as_str().unwrap_or("").to_owned(),
                )) == Some(name)
            })
            .collect();
        let kind = l["kind"].as_str().unwrap_or("?");
        let ttd = mine
            .iter()
            .filter_map(|a| a["first_seen_ms"].as_u64())
            .min()
            .map(|t| t.saturating_sub(start_ms) / 1000);
        let rules: BTreeSet<&str> = mine.iter().filter_map(|a| a["rule_id"].as_str()).collect();
        let false_count = if kind == "attack" { 0 } else { mine.len() };
        if kind != "attack" {
            false_alerts.extend(mine.iter().map(|a| a["id"].to_string()));
        }
        table.push_str(&format!(
            "| {name} | {kind} | {} | {} | {} | {} | {} | {false_count} |\n",
            l["addresses"].as_array().map_or(0, Vec::len),
            l["requests"],
            if kind == "attack" {
                if mine.is_empty() { "no" } else { "yes" }
            } else {
                "-"
            },
            match (kind, ttd) {
                ("attack", Some(s)) => format!("{s} s"),
                _ => "-".into(),
            },
            rules.into_iter().collect::<Vec<_>>().join(", "),
        ));
    }
    eprintln!("\n{table}");
    if let Some(report) = std::env::var_os("SENSOR_EVAL_REPORT") {
        std::fs::write(&report, &table).expect("write report");
    }
    assert!(
        false_alerts.is_empty(),
        "false alerts: {false_alerts:?}\n{table}"
    );
}
