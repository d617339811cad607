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

/// (requests, bytes_in, bytes_out) per client key, from what real client sockets sent.
type ClientTruth3 = BTreeMap<String, (u64, u64, u64)>;

fn rows3(agent: &Agent, by: &str) -> ClientTruth3 {
    rows_by(agent, by)
        .into_iter()
        .map(|(k, (r, i, o, _))| (k, (r, i, o)))
        .collect()
}

/// Runs one adversarial client connection to completion; adds its totals under `key`.
fn run_client(truth: &mut ClientTruth3, key: &str, port: u16, requests: serde_json::Value) {
    let client = EvasionClient::run(&serde_json::json!({
        "host": "127.0.0.1", "port": port, "requests": requests,
    }));
    let r = client.report.clone();
    client.finish();
    let e = truth.entry(key.to_owned()).or_default();
    e.0 += r.requests;
    e.1 += r.sent;
    e.2 += r.received;
}

fn agent_with_identity(cg: &Cgroup, port: u16, tmp: &TempDir, identity: &str) -> Agent {
    let config = tmp.path.join("sensor.toml");
    std::fs::write(&config, format!("[identity]\n{identity}")).expect("config");
    Agent::start_with(
        cg,
        &[port],
        200,
        &["--config", config.to_str().expect("utf-8")],
    )
}

fn wait_rows(agent: &Agent, by: &str, truth: &ClientTruth3) {
    wait_for(
        &format!("per-{by} counts equal to the clients'"),
        Duration::from_secs(20),
        || {
            let seen = rows3(agent, by);
            if &seen == truth {
                Ok(())
            } else {
                Err(format!("truth {truth:?}\nseen  {seen:?}"))
            }
        },
    );
}

/// A client cannot shake off its identity: a first segment of one byte, blank lines before
/// the request line, 70 header lines or 8 KiB of padding before the credential (sent whole
/// and in 1 KiB segments), the key in `x-goog-api-key`, `?key=` (percent-encoded) or HTTP
/// Basic, and a segment forged with another key that TCP drops. A client that adds a random
/// Bearer to its real `x-api-key` lands in one `ambiguous-credential` bucket under the default
/// policy instead of a new identity per request. Per-identity counts equal what the clients
/// sent and received; no raw key appears anywhere.
#[test]
fn identity_survives_segmentation_padding_and_other_carriers() {
    if !privileged("identity_survives_segmentation_padding_and_other_carriers") {
        return;
    }
    let cg = Cgroup::new("idevasion");
    let port = free_port();
    let tmp = TempDir::new("idevasion");
    let _nginx = Nginx::start(&cg, None, &[format!("127.0.0.1:{port}")]);
    let agent = agent_with_identity(&cg, port, &tmp, "trusted_proxies = [\"127.0.0.1\"]\n");
    let id_args = ["--state-dir".as_ref(), agent.state_dir.as_os_str()];
    let id_of = |key: &str| identity_of(&id_args, key);
    let salt = std::process::id();
    let key = |name: &str| format!("sk-{name}-{salt}-5e1d");
    let small = format!("/{}", SMALL.0);
    let mut truth = ClientTruth3::new();

    let alpha = key("alpha");
    let auth = format!("Authorization: Bearer {alpha}\r\n");
    let plain = http_get(&small, &auth);
    let fill: String = (0..70).map(|i| format!("X-Fill-{i}: v\r\n")).collect();
    let pad: String = (0..8)
        .map(|i| format!("X-Pad-{i}: {}\r\n", "p".repeat(1000)))
        .collect();
    let padded = http_get(&small, &format!("{pad}{auth}"));
    let pieces: Vec<String> = padded
        .as_bytes()
        .chunks(1024)
        .map(|c| String::from_utf8(c.to_vec()).expect("ascii"))
        .collect();
    run_client(
        &mut truth,
        &id_of(&alpha),
        port,
        serde_json::json!([
            {"pieces": ["G", &plain[1..]]},
            {"pieces": [http_get(&small, &format!("{fill}{auth}"))]},
            {"pieces": [padded]},
            {"pieces": pieces},
            {"pieces": ["\r\n", plain.clone()]},
        ]),
    );
    let beta = key("beta");
    let req = http_get(&small, &format!("X-Goog-Api-Key: {beta}\r\n"));
    run_client(
        &mut truth,
        &id_of(&beta),
        port,
        serde_json::json!([{"pieces": [req]}, {"pieces": [req]}]),
    );
    let gamma = key("gamma");
    let req = http_get(
        &format!("{small}?alt=json&key={}", gamma.replacen('g', "%67", 1)),
        "",
    );
    run_client(
        &mut truth,
        &id_of(&gamma),
        port,
        serde_json::json!([{"pieces": [req]}, {"pieces": [req]}]),
    );
    let delta = format!("{}:pw", key("delta"));
    let basic = base64(delta.as_bytes());
    let req = http_get(&small, &format!("Authorization: Basic {basic}\r\n"));
    run_client(
        &mut truth,
        &id_of(&delta),
        port,
        serde_json::json!([{"pieces": [req]}, {"pieces": [req]}]),
    );
    let epsilon = key("epsilon");
    let requests: Vec<serde_json::Value> = (0..3)
        .map(|i| {
            serde_json::json!({"pieces": [http_get(
                &small,
                &format!("x-api-key: {epsilon}\r\nAuthorization: Bearer random-{salt}-{i}\r\n"),
            )]})
        })
        .collect();
    run_client(&mut truth, "ambiguous-credential", port, requests.into());
    let pi = key("pi");
    let forged = http_get(
        &small,
        &format!("Authorization: Bearer {}\r\n", key("forged")),
    );
    run_client(
        &mut truth,
        &id_of(&pi),
        port,
        serde_json::json!([
            {"forge": {"seq_offset": 0, "ack_offset": 1 << 20, "payload": forged},
             "pieces": [http_get(&small, &format!("Authorization: Bearer {pi}\r\n"))]},
        ]),
    );

    wait_rows(&agent, "identity", &truth);
    wait_heads(
        &agent,
        &[
            ("ambiguous", 3),
            ("malformed", 0),
            ("truncated", 0),
            ("unseen", 0),
        ],
    );
    assert!(!rows3(&agent, "identity").contains_key(&id_of(&key("forged"))));

    let mut haystack = agent.log();
    haystack.push_str(&serde_json::to_string(&agent.clients("identity")).expect("json"));
    haystack.push_str(&agent.health().to_string());
    for k in [&alpha, &beta, &gamma, &delta, &epsilon, &pi] {
        assert!(!haystack.contains(k.as_str()), "raw key {k} leaked");
    }
}

/// With the backend's carrier configured (`credential = ["x-api-key"]`), a random Bearer the
/// client adds changes nothing. The forwarded client is the configured hop from the right of
/// all X-Forwarded-For lines joined in order (a proxy that appends its own line after the
/// client's), and never comes from a head cut by `head_bytes`: a client that pads its request
/// past the copy, so that only the line it wrote itself is seen, gets no forwarded address.
#[test]
fn configured_carrier_and_trusted_hop_cannot_be_chosen_by_the_client() {
    if !privileged("configured_carrier_and_trusted_hop_cannot_be_chosen_by_the_client") {
        return;
    }
    let cg = Cgroup::new("idconfig");
    let port = free_port();
    let tmp = TempDir::new("idconfig");
    let _nginx = Nginx::start(&cg, None, &[format!("127.0.0.1:{port}")]);
    let agent = agent_with_identity(
        &cg,
        port,
        &tmp,
        "head_bytes = 4096\ncredential = [\"x-api-key\"]\ntrusted_proxies = [\"127.0.0.1\"]\n\
         trusted_hops = 1\n",
    );
    let id_args = ["--state-dir".as_ref(), agent.state_dir.as_os_str()];
    let id_of = |key: &str| identity_of(&id_args, key);
    let salt = std::process::id();
    let small = format!("/{}", SMALL.0);
    let mut by_identity = ClientTruth3::new();
    let mut by_forwarded = ClientTruth3::new();

    let real = format!("sk-real-{salt}-77aa");
    let requests: Vec<serde_json::Value> = (0..3)
        .map(|i| {
            serde_json::json!({"pieces": [http_get(
                &small,
                &format!("Authorization: Bearer random-{salt}-{i}\r\nx-api-key: {real}\r\n"),
            )]})
        })
        .collect();
    run_client(&mut by_identity, &id_of(&real), port, requests.into());

    // Padded past head_bytes: only the client's own line is within the copy.
    let padded_key = format!("sk-padded-{salt}-77ab");
    let pad: String = (0..6)
        .map(|i| format!("X-Pad-{i}: {}\r\n", "p".repeat(1000)))
        .collect();
    let padded = http_get(
        &small,
        &format!(
            "x-api-key: {padded_key}\r\nX-Forwarded-For: 6.6.6.6\r\n{pad}X-Forwarded-For: 203.0.113.7\r\n"
        ),
    );
    run_client(
        &mut by_identity,
        &id_of(&padded_key),
        port,
        serde_json::json!([{"pieces": [padded]}, {"pieces": [padded]}]),
    );
    // Within the copy: the appended line is the last hop.
    let hop_key = format!("sk-hop-{salt}-77ac");
    let req = http_get(
        &small,
        &format!(
            "X-Forwarded-For: 6.6.6.6\r\nx-api-key: {hop_key}\r\nX-Forwarded-For: 203.0.113.8\r\n"
        ),
    );
    let mut hop = ClientTruth3::new();
    run_client(
        &mut hop,
        "203.0.113.8",
        port,
        serde_json::json!([{"pieces": [req]}, {"pieces": [req]}]),
    );
    by_identity.insert(id_of(&hop_key), hop["203.0.113.8"]);
    by_forwarded.extend(hop);

    wait_rows(&agent, "identity", &by_identity);
    wait_rows(&agent, "forwarded", &by_forwarded);
    wait_heads(
        &agent,
        &[("truncated", 2), ("ambiguous", 0), ("forwarded", 2)],
    );
}

/// Waits until `/v1/health`'s head counters hold `want`.
fn wait_heads(agent: &Agent, want: &[(&str, u64)]) {
    wait_for("the head counters", Duration::from_secs(10), || {
        let heads = agent.health()["heads"].clone();
        if want.iter().all(|(k, v)| heads[*k] == *v) {
            Ok(())
        } else {
            Err(format!("want {want:?}, heads {heads}"))
        }
    });
}

/// Standard base64 with padding (the test's own, to build HTTP Basic credentials).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Short connections at a high rate (wrk, one request per connection), each request with the
/// same API key: every request nginx served is attributed to the key, and no head stays
/// pending once the load has ended. Before, a request whose event and whose connection's close
/// both landed while the agent was between its reads of the two rings waited for a close that
/// was already accounted: lost to its identity, its head held for good.
#[test]
fn short_connections_at_a_high_rate_keep_every_request_identified() {
    if !privileged("short_connections_at_a_high_rate_keep_every_request_identified") {
        return;
    }
    let cg = Cgroup::new("shortconns");
    let port = free_port();
    let nginx = Nginx::start(&cg, None, &[format!("127.0.0.1:{port}")]);
    let agent = Agent::start(&cg, &[port], 200);
    let key = format!("sk-short-{}-5d1e", std::process::id());
    run_ok(Command::new("wrk").args([
        "-t1",
        "-c8",
        "-d2s",
        "-H",
        "Connection: close",
        "-H",
        &format!("Authorization: Bearer {key}"),
        &format!("http://127.0.0.1:{port}/{}", SMALL.0),
    ]));
    let id = identity_of(&["--state-dir".as_ref(), agent.state_dir.as_os_str()], &key);
    let (served, identified, heads) =
        wait_for("every request identified", Duration::from_secs(30), || {
            let served = nginx.records().len() as u64;
            let identified = rows_by(&agent, "identity")
                .get(&id)
                .map_or(0, |&(requests, ..)| requests);
            let heads = agent.health()["heads"].clone();
            if served > 1000 && identified == served && heads["pending"] == 0 {
                Ok((served, identified, heads))
            } else {
                Err(format!(
                    "nginx served {served}, {identified} identified, heads {heads}"
                ))
            }
        });
    assert_eq!(
        heads["parsed"], served,
        "{identified} identified; heads {heads}"
    );
    assert_eq!(heads["with_credential"], served);
    assert_eq!(agent.health()["loss"]["request_events_dropped"], 0);
}
