//! Identity behind a proxy: real OpenAI SDK clients with different API keys, through a real
//! nginx reverse proxy (adding X-Forwarded-For, pooling upstream connections), to an
//! OpenAI-compatible server on loopback that the sensor watches. Per-identity and
//! per-forwarded-client counts must equal what the server itself read and wrote; spoofed
//! forwarding is ignored; raw keys appear nowhere.

use std::{collections::BTreeMap, process::Command, time::Duration};

use sensor_tests::*;

/// (requests, bytes_in, bytes_out, events_out)
type Truth = BTreeMap<String, (u64, u64, u64, u64)>;

fn rows_by(agent: &Agent, by: &str) -> Truth {
    agent
        .clients(by)
        .iter()
        .map(|r| {
            let n = |k: &str| r[k].as_u64().unwrap_or(u64::MAX);
            (
                r["client"].as_str().unwrap_or("?").to_owned(),
                (
                    n("requests"),
                    n("bytes_in"),
                    n("bytes_out"),
                    n("events_out"),
                ),
            )
        })
        .collect()
}

#[test]
fn identities_behind_a_proxy_are_exact_and_keys_never_leak() {
    if !privileged("identities_behind_a_proxy_are_exact_and_keys_never_leak") {
        return;
    }
    let cg = Cgroup::new("inference");
    let proxy_cg = Cgroup::new("proxy");
    let (stub_port, proxy_port, metrics_port) = (free_port(), free_port(), free_port());
    let tmp = TempDir::new("identity");
    let ledger = tmp.path.join("ledger.jsonl");
    let _stub = OpenAiStub::start(&cg, stub_port, &ledger);
    let _proxy = Nginx::proxy(
        &proxy_cg,
        &[format!("127.0.0.1:{proxy_port}")],
        &format!("127.0.0.1:{stub_port}"),
    );
    let token = tmp.path.join("metrics.token");
    std::fs::write(&token, "scrape-token-for-test\n").expect("token");
    let config = tmp.path.join("sensor.toml");
    std::fs::write(
        &config,
        format!(
            "[identity]\ntrusted_proxies = [\"127.0.0.1\"]\n\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\
             bearer_token_file = \"{}\"\n",
            token.display()
        ),
    )
    .expect("config");
    let agent = Agent::start_with(
        &cg,
        &[stub_port],
        200,
        &["--config", config.to_str().expect("utf-8")],
    );

    // Distinctive raw keys, to search for afterwards.
    let salt = std::process::id();
    let (alpha, beta, gamma) = (
        format!("sk-test-alpha-{salt}-7f3a9c"),
        format!("sk-test-beta-{salt}-c01d4e"),
        format!("sk-test-gamma-{salt}-99b2e0"),
    );
    let via_proxy = serde_json::json!([
        {"key": alpha, "source": "127.0.0.21", "requests": 3, "stream": true},
        {"key": alpha, "source": "127.0.0.22", "requests": 2, "stream": false},
        {"key": beta, "source": "127.0.0.23", "requests": 3, "stream": true,
         "headers": {"X-Forwarded-For": "6.6.6.6"}},
    ]);
    let direct = serde_json::json!([
        {"key": gamma, "source": "127.0.0.24", "requests": 2, "stream": false,
         "headers": {"X-Forwarded-For": "6.6.6.6"}},
    ]);
    for (base, specs) in [
        (format!("http://127.0.0.1:{proxy_port}/v1"), via_proxy),
        (format!("http://127.0.0.1:{stub_port}/v1"), direct),
    ] {
        run_ok(
            Command::new(python())
                .arg(peers().join("openai_clients.py"))
                .arg(base)
                .arg(specs.to_string()),
        );
    }

    // Ground truth: what the server read and wrote for each request.
    let entries: Vec<serde_json::Value> = std::fs::read_to_string(&ledger)
        .expect("ledger")
        .lines()
        .map(|l| serde_json::from_str(l).expect("ledger line"))
        .collect();
    assert_eq!(entries.len(), 10);
    let id_args = ["--state-dir".as_ref(), agent.state_dir.as_os_str()];
    let id_of = |key: &str| identity_of(&id_args, key);
    let mut by_identity = Truth::new();
    let mut by_forwarded = Truth::new();
    for e in &entries {
        let n = |k: &str| e[k].as_u64().expect("ledger number");
        let add = |t: &mut Truth, k: String| {
            let v = t.entry(k).or_default();
            v.0 += 1;
            v.1 += n("bytes_in");
            v.2 += n("bytes_out");
            v.3 += n("events");
        };
        add(&mut by_identity, id_of(e["key"].as_str().expect("key")));
        if e["peer"] == "127.0.0.1" {
            let xff = e["xff"].as_str().expect("proxy adds X-Forwarded-For");
            let client = xff.rsplit(',').next().expect("hop").trim().to_owned();
            add(&mut by_forwarded, client);
        }
    }
    assert_eq!(by_identity.len(), 3);
    assert_eq!(
        by_forwarded.keys().collect::<Vec<_>>(),
        ["127.0.0.21", "127.0.0.22", "127.0.0.23"]
    );
    assert!(
        by_identity.values().any(|t| t.3 > 0),
        "streamed replies sent events"
    );

    wait_for(
        "per-identity counts equal to the server's",
        Duration::from_secs(20),
        || {
            let seen = rows_by(&agent, "identity");
            if seen == by_identity {
                Ok(())
            } else {
                Err(format!("truth {by_identity:?}\nseen  {seen:?}"))
            }
        },
    );
    wait_for(
        "per-forwarded-client counts equal to the server's",
        Duration::from_secs(20),
        || {
            let seen = rows_by(&agent, "forwarded");
            if seen == by_forwarded {
                Ok(())
            } else {
                Err(format!("truth {by_forwarded:?}\nseen  {seen:?}"))
            }
        },
    );
    let identities = agent.clients("identity");
    let alpha_row = identities
        .iter()
        .find(|r| r["client"] == id_of(&alpha))
        .expect("alpha row");
    assert_eq!(
        alpha_row["distinct_addresses"], 2,
        "alpha came from two addresses"
    );
    // The proxy's address carries every proxied request; its rows name an identity.
    let addresses = agent.clients("address");
    assert!(
        addresses
            .iter()
            .any(|r| r["client"] == "127.0.0.1" && r["identity"].is_string())
    );
    let health = agent.health();
    assert_eq!(health["heads"]["malformed"], 0);
    assert_eq!(health["heads"]["with_credential"], 10);
    assert_eq!(health["heads"]["forwarded"], 8);

    // Raw keys appear nowhere: logs, API, metrics, state files.
    let mut haystack = agent.log();
    for by in ["address", "group", "identity", "forwarded"] {
        haystack.push_str(&serde_json::to_string(&agent.clients(by)).expect("json"));
    }
    haystack.push_str(&run_ok(
        Command::new(sensor_bin())
            .args(["conns", "--json", "--socket"])
            .arg(&agent.socket),
    ));
    haystack.push_str(&health.to_string());
    haystack.push_str(&run_ok(
        Command::new("curl")
            .args(["-sf", "-H", "Authorization: Bearer scrape-token-for-test"])
            .arg(format!("http://127.0.0.1:{metrics_port}/metrics")),
    ));
    for entry in std::fs::read_dir(&agent.state_dir)
        .expect("state dir")
        .flatten()
    {
        haystack.push_str(&String::from_utf8_lossy(
            &std::fs::read(entry.path()).expect("state file"),
        ));
    }
    assert!(
        haystack.contains(&id_of(&alpha)),
        "the search does cover the outputs"
    );
    for key in [&alpha, &beta, &gamma] {
        assert!(!haystack.contains(key.as_str()), "raw key {key} leaked");
        assert!(
            !haystack.contains(&key[8..]),
            "part of raw key {key} leaked"
        );
    }
}
