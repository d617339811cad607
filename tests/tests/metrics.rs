//! The Prometheus listener against real traffic: host totals equal ground truth (folded
//! clients included), the exposition passes `promtool check metrics`, per-client series stay
//! within `top_clients`, and the bearer token is enforced and its failures counted.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    process::Command,
    time::Duration,
};

use sensor_tests::*;

const POLL_MS: u64 = 200;
const SOURCES: u32 = 20;
const MAX_CLIENTS: usize = 5;
const TOP_CLIENTS: usize = 3;

/// One sample: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Reads the samples of an exposition (label values here are addresses and plain words).
fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("sample value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let labels = rest
                        .strip_suffix('}')
                        .expect("closing brace")
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once("=\"").expect("label");
                            (k.to_owned(), v.trim_end_matches('"').to_owned())
                        })
                        .collect();
                    (name, labels)
                }
                None => (series, BTreeMap::new()),
            };
            (
                name.to_owned(),
                labels,
                value.parse().expect("numeric value"),
            )
        })
        .collect()
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<u64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    samples
        .iter()
        .find(|s| s.0 == name && s.1 == want)
        .map(|s| s.2 as u64)
}

/// An HTTP exchange through curl: (status, head, body).
fn http_get(url: &str, header_file: Option<&Path>) -> (u16, String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--show-error", "-i", "--max-time", "10"]);
    if let Some(file) = header_file {
        cmd.arg("-H").arg(format!("@{}", file.display()));
    }
    let out = run_ok(cmd.arg(url));
    let (head, body) = out.split_once("\r\n\r\n").expect("HTTP reply");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    (status, head.to_owned(), body.to_owned())
}

/// Sends raw bytes to the listener and returns the status line of its reply.
fn raw_request(addr: &str, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics listener");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(bytes).expect("send");
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.lines().next().unwrap_or("").to_owned()
}

#[test]
fn metrics_match_ground_truth_and_pass_promtool() {
    if !privileged("metrics_match_ground_truth_and_pass_promtool") {
        return;
    }
    let cg = Cgroup::new("metrics");
    let port = free_port();
    let metrics_port = free_port();
    let nginx = Nginx::start(&cg, None, &[format!("127.0.0.1:{port}")]);

    let dir = TempDir::new("metrics-config");
    let token = format!("tok-{}-{}", std::process::id(), port);
    let token_file = dir.path.join("token");
    std::fs::write(&token_file, format!("{token}\n")).expect("token file");
    std::fs::write(
        dir.path.join("auth.header"),
        format!("Authorization: Bearer {token}\n"),
    )
    .expect("header file");
    std::fs::write(
        dir.path.join("wrong.header"),
        format!("Authorization: Bearer {token}x\n"),
    )
    .expect("header file");
    let config = dir.path.join("sensor.toml");
    std::fs::write(
        &config,
        format!(
            "[clients]\nmax_clients = {MAX_CLIENTS}\n\n[metrics]\n\
             listen = \"127.0.0.1:{metrics_port}\"\nbearer_token_file = \"{}\"\n\
             top_clients = {TOP_CLIENTS}\n",
            token_file.display()
        ),
    )
    .expect("config file");
    let config = config.to_str().expect("utf-8 path");
    let agent = Agent::start_with(&cg, &[port], POLL_MS, &["--config", config]);

    let url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let auth = dir.path.join("auth.header");
    let wrong = dir.path.join("wrong.header");
    wait_for("the metrics listener", Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", metrics_port))
            .map(drop)
            .map_err(|e| e.to_string())
    });

    // Source s makes s keep-alive requests, every fourth one also a large download: distinct
    // volumes, so the top clients are well defined. One source after the other: with 20
    // clients active at once and a bound of 5, a client could be folded while it was still
    // light (its connection then counts in the folded remainder), which is the bound working,
    // not what this test checks.
    let workers: Vec<_> = (1..=SOURCES)
        .map(|s| {
            let source = format!("127.0.2.{s}");
            let run = move || {
                let mut ops: Vec<Vec<String>> = (0..s)
                    .map(|_| {
                        op(&[
                            "--interface",
                            &source,
                            &format!("http://127.0.0.1:{port}/{}", SMALL.0),
                        ])
                    })
                    .collect();
                if s % 4 == 0 {
                    ops.push(op(&[
                        "--interface",
                        &source,
                        &format!("http://127.0.0.1:{port}/{}", BIG.0),
                    ]));
                }
                curl(Command::new("curl"), &ops)
            };
            run()
        })
        .collect();
    let transfers: Vec<Transfer> = workers.into_iter().flatten().collect();
    let truth = nginx.truth(&transfers);
    let truth_in: u64 = truth.values().map(|t| t.0).sum();
    let truth_out: u64 = truth.values().map(|t| t.1).sum();
    let truth_requests: u64 = truth.values().map(|t| t.2).sum();
    assert_eq!(truth_requests, transfers.len() as u64);

    let (text, scraped) = wait_for(
        "host totals in /metrics to equal ground truth",
        Duration::from_secs(30),
        || {
            let (status, _, body) = http_get(&url, Some(&auth));
            if status != 200 {
                return Err(format!("status {status}: {body}"));
            }
            let s = samples(&body);
            let seen = (
                value(&s, "sensor_bytes_total", &[("direction", "in")]),
                value(&s, "sensor_bytes_total", &[("direction", "out")]),
                value(&s, "sensor_requests_total", &[]),
                value(&s, "sensor_connections_open", &[]),
            );
            let want = (
                Some(truth_in),
                Some(truth_out),
                Some(truth_requests),
                Some(0),
            );
            if seen == want {
                Ok((body, s))
            } else {
                Err(format!("(in, out, requests, open) {seen:?}, want {want:?}"))
            }
        },
    );
    let connections = SOURCES as u64;
    assert_eq!(
        value(&scraped, "sensor_connections_opened_total", &[]),
        Some(connections)
    );
    assert_eq!(
        value(&scraped, "sensor_connections_closed_total", &[]),
        Some(connections)
    );
    assert_eq!(value(&scraped, "sensor_up", &[]), Some(1));

    // The real scrape is valid exposition format, lint included.
    let (status, remarks) = promtool_check(&text);
    assert!(
        status.success() && remarks.is_empty(),
        "promtool check metrics: {status}: {remarks}\n{text}"
    );

    // Clients were folded, host totals above still matched; per-client series are bounded
    // and are the heaviest clients by bytes out, with their exact counters.
    let folded = value(
        &scraped,
        "sensor_clients_folded_total",
        &[("by", "address")],
    );
    assert!(folded.is_some_and(|f| f > 0), "folded: {folded:?}");
    let tracked = value(&scraped, "sensor_clients_tracked", &[("by", "address")]);
    assert!(
        tracked.is_some_and(|t| t as usize <= MAX_CLIENTS + 1),
        "tracked: {tracked:?}"
    );
    let labelled: BTreeSet<&str> = scraped
        .iter()
        .filter_map(|s| s.1.get("client").map(String::as_str))
        .collect();
    assert!(
        labelled.len() <= TOP_CLIENTS,
        "{} client label values: {labelled:?}",
        labelled.len()
    );
    let top = agent.api(&format!("/v1/clients?sort=bytes_out&limit={TOP_CLIENTS}"));
    let top = top.as_array().expect("client rows");
    assert_eq!(top.len(), TOP_CLIENTS);
    let mut truth_by_address: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    for (conn, t) in &truth {
        let e = truth_by_address
            .entry(conn.rsplit_once(':').expect("ip:port").0.to_owned())
            .or_default();
        e.0 += t.0;
        e.1 += t.1;
        e.2 += t.2;
    }
    for row in top {
        let client = row["client"].as_str().expect("client");
        assert!(labelled.contains(client), "{client} not in {labelled:?}");
        let (bytes_in, bytes_out, requests) = truth_by_address[client];
        let series = |name: &str, extra: &[(&str, &str)]| {
            let mut labels = vec![("client", client)];
            labels.extend_from_slice(extra);
            value(&scraped, name, &labels)
        };
        assert_eq!(
            series("sensor_client_bytes_total", &[("direction", "out")]),
            Some(bytes_out),
            "{client}"
        );
        assert_eq!(
            series("sensor_client_bytes_total", &[("direction", "in")]),
            Some(bytes_in),
            "{client}"
        );
        assert_eq!(
            series("sensor_client_requests_total", &[]),
            Some(requests),
            "{client}"
        );
        assert_eq!(series("sensor_client_connections_open", &[]), Some(0));
        assert_eq!(
            series("sensor_client_connections_opened_total", &[]),
            Some(1)
        );
    }
    let health = agent.health();
    for (kind, n) in health["loss"].as_object().expect("loss counters") {
        assert_eq!(
            value(&scraped, "sensor_loss_total", &[("kind", kind)]),
            n.as_u64(),
            "loss {kind}"
        );
    }

    // Authentication: no token and a wrong token are refused, and counted.
    let failures = |s: &[Sample]| value(s, "sensor_metrics_auth_failures_total", &[]);
    let before = failures(&scraped).expect("auth failure counter");
    for header in [None, Some(wrong.as_path())] {
        let (status, head, body) = http_get(&url, header);
        assert_eq!(status, 401, "{header:?}: {head}");
        assert!(
            head.lines().any(|l| l
                .to_ascii_lowercase()
                .starts_with("www-authenticate: bearer")),
            "{head}"
        );
        assert!(!body.contains("sensor_bytes_total"), "{body}");
    }
    // Malformed and oversized requests get an error status, and the agent carries on.
    let addr = format!("127.0.0.1:{metrics_port}");
    assert_eq!(
        raw_request(&addr, b"\x16\x03\x01garbage\r\n\r\n"),
        "HTTP/1.1 400 Bad Request"
    );
    let mut huge = b"GET /metrics HTTP/1.1\r\nX-Filler: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 20_000));
    assert_eq!(
        raw_request(&addr, &huge),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    let (status, _, body) = http_get(&url, Some(&auth));
    assert_eq!(status, 200);
    assert_eq!(failures(&samples(&body)), Some(before + 2));
}

/// The token is read before anything is attached: an unreadable or empty token file stops the
/// agent with an error naming the file (needs no privileges).
#[test]
fn bad_token_file_is_a_clear_error() {
    let dir = TempDir::new("metrics-token");
    let token_file = dir.path.join("token");
    let config = dir.path.join("sensor.toml");
    std::fs::write(
        &config,
        format!(
            "[metrics]\nlisten = \"127.0.0.1:{}\"\nbearer_token_file = \"{}\"\n",
            free_port(),
            token_file.display()
        ),
    )
    .expect("config file");
    let run = || {
        let out = Command::new(sensor_bin())
            .arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--socket")
            .arg(dir.path.join("s.sock"))
            .arg("--pin-dir")
            .arg("/sys/fs/bpf/sensor-test-never-created")
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("run sensor");
        assert!(!out.status.success(), "sensor run should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run();
    let want = format!(
        "cannot read the metrics bearer token file {}",
        token_file.display()
    );
    assert!(err.contains(&want), "want {want:?} in: {err}");
    std::fs::write(&token_file, " \n").expect("empty token");
    let err = run();
    let want = format!(
        "the metrics bearer token file {} is empty",
        token_file.display()
    );
    assert!(err.contains(&want), "want {want:?} in: {err}");
}
