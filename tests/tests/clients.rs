//! Per-client counters against ground truth: hundreds of clients over IPv4 and IPv6, bounded
//! memory, and an agent killed with SIGKILL in the middle of traffic.

use std::{process::Command, thread, time::Duration};

use sensor_tests::*;

fn group_v4(ip: &str) -> String {
    let octets: Vec<&str> = ip.split('.').collect();
    format!("{}.{}.{}.0/24", octets[0], octets[1], octets[2])
}

/// Ops for client number `i`: a mix of small and large downloads and uploads, a different
/// volume per client, all on one keep-alive connection.
fn client_ops(i: usize, source: &str, base: &str, body: &str) -> Vec<Vec<String>> {
    (0..=(i % 4))
        .map(|k| {
            let mut o = op(&["--interface", source]);
            match (i + k) % 3 {
                0 => o.push(format!("{base}/{}", SMALL.0)),
                1 => {
                    o.extend(op(&["-X", "PUT", "--data-binary", body]));
                    o.push(format!("{base}/upload/c{i}"));
                }
                _ if i.is_multiple_of(10) => o.push(format!("{base}/{}", BIG.0)),
                _ => o.push(format!("{base}/{}", SMALL.0)),
            }
            o
        })
        .collect()
}

/// Runs `jobs` (each: a curl command and its operations) on `threads` workers.
fn run_parallel(jobs: Vec<(Command, Vec<Vec<String>>)>, threads: usize) -> Vec<Transfer> {
    let mut buckets: Vec<Vec<(Command, Vec<Vec<String>>)>> =
        (0..threads).map(|_| Vec::new()).collect();
    for (i, job) in jobs.into_iter().enumerate() {
        buckets[i % threads].push(job);
    }
    let workers: Vec<_> = buckets
        .into_iter()
        .map(|jobs| {
            thread::spawn(move || {
                jobs.into_iter()
                    .flat_map(|(cmd, ops)| curl(cmd, &ops))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    workers
        .into_iter()
        .flat_map(|w| w.join().expect("curl worker"))
        .collect()
}

fn assert_clients(what: &str, truth: &ClientTruth, seen: &ClientTruth) {
    assert_eq!(truth.len(), seen.len(), "{what}: number of clients");
    for (client, t) in truth {
        assert_eq!(
            seen.get(client),
            Some(t),
            "{what}: client {client} (bytes in, bytes out, requests, connections)"
        );
    }
}

/// 200 IPv4 clients in two /24s on loopback and 40 IPv6 clients in two /56s behind a veth pair,
/// each with its own known volume: every per-client and per-group total is exact, and every
/// window holds all of it (everything was sent within the last minute).
#[test]
fn hundreds_of_clients_are_exact_per_client_and_group() {
    if !privileged("hundreds_of_clients_are_exact_per_client_and_group") {
        return;
    }
    let cg = Cgroup::new("clients");
    let server = Netns::new("csrv");
    let client = Netns::new("ccli");
    veth_pair(&server, "10.213.1.1", &client, "10.213.1.2");
    server.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:1::1/48",
        "dev",
        "veth-a",
        "nodad",
    ]);
    let mut v6_sources = Vec::new();
    for x in 1..=20 {
        for prefix in ["fd00:1::1", "fd00:1:0:100::"] {
            let addr = format!("{prefix}:{x:x}").replace(":::", "::");
            client.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{addr}/48"),
                "dev",
                "veth-b",
                "nodad",
            ]);
            v6_sources.push(addr);
        }
    }
    let port = 8080;
    let nginx = Nginx::start(
        &cg,
        Some(&server),
        &[format!("127.0.0.1:{port}"), format!("[fd00:1::1]:{port}")],
    );
    let agent = Agent::start(&cg, &[port], 200);
    wait_for("nginx in the namespace", Duration::from_secs(10), || {
        let ok = server
            .command("curl")
            .args(["-sf", "-o", "/dev/null"])
            .arg(format!("http://127.0.0.1:{port}/"))
            .status();
        // 403/404 still proves it listens; -f fails only on >= 400, so accept any exit but 7.
        match ok.map(|s| s.code()) {
            Ok(Some(7)) | Err(_) => Err("not listening".to_owned()),
            _ => Ok(()),
        }
    });
    let tmp = TempDir::new("client-bodies");
    let body = {
        let p = tmp.path.join("body.bin");
        std::fs::write(&p, vec![b'x'; 5_000]).expect("body");
        format!("@{}", p.display())
    };
    let mut jobs = Vec::new();
    for i in 0..200 {
        let source = format!("127.0.{}.{}", 3 + i / 100, 1 + i % 100);
        let ops = client_ops(i, &source, &format!("http://127.0.0.1:{port}"), &body);
        jobs.push((server.command("curl"), ops));
    }
    for (j, source) in v6_sources.iter().enumerate() {
        let ops = client_ops(j, source, &format!("http://[fd00:1::1]:{port}"), &body);
        jobs.push((client.command("curl"), ops));
    }
    let transfers = run_parallel(jobs, 8);
    let truth = nginx.truth(&transfers);
    let by_address = per_client(&truth, &transfers, str::to_owned);
    assert_eq!(by_address.len(), 240);
    let by_group = per_client(&truth, &transfers, |ip| {
        if ip.contains(':') {
            if ip.starts_with("fd00:1:0:100:") {
                "fd00:1:0:100::/56".into()
            } else {
                "fd00:1::/56".into()
            }
        } else {
            group_v4(ip)
        }
    });
    assert_eq!(by_group.len(), 4, "{:?}", by_group.keys());
    let seen = wait_for(
        "every client's connections closed and accounted",
        Duration::from_secs(30),
        || {
            // 127.0.0.1 is the readiness probe above, not one of the clients.
            let rows: Vec<_> = agent
                .clients("address")
                .into_iter()
                .filter(|r| r["client"] != "127.0.0.1")
                .collect();
            let all_closed = rows.iter().all(|r| r["open_connections"] == 0);
            let seen = sensor_per_client(&rows, None);
            if all_closed && seen == by_address {
                Ok(rows)
            } else {
                let diff: Vec<_> = seen
                    .iter()
                    .filter(|(k, v)| by_address.get(*k) != Some(*v))
                    .collect();
                Err(format!(
                    "{} clients, all closed: {all_closed}, differing: {diff:?}",
                    rows.len()
                ))
            }
        },
    );
    assert_clients("per address", &by_address, &sensor_per_client(&seen, None));
    for window in ["1m", "10m", "1h"] {
        assert_clients(
            &format!("window {window}"),
            &by_address,
            &sensor_per_client(&seen, Some(window)),
        );
    }
    for row in &seen {
        let client = row["client"].as_str().expect("client");
        if !client.contains(':') {
            assert_eq!(row["group"], group_v4(client));
        }
        assert_eq!(
            row["peak_open_connections"], 1,
            "{client}: one connection at a time"
        );
    }
    let groups: Vec<_> = agent
        .clients("group")
        .into_iter()
        .filter(|r| r["client"] != "127.0.0.0/24")
        .collect();
    assert_clients("per group", &by_group, &sensor_per_client(&groups, None));
}

/// More distinct clients than the memory bound: the heaviest stay exact, the folded remainder
/// is counted, and exact + folded equals everything sent.
#[test]
fn bounded_memory_keeps_the_heaviest_clients_exact() {
    if !privileged("bounded_memory_keeps_the_heaviest_clients_exact") {
        return;
    }
    let cg = Cgroup::new("bounded");
    let port = free_port();
    let nginx = Nginx::start(&cg, None, &[format!("127.0.0.1:{port}")]);
    let dir = TempDir::new("bounded-config");
    let config = dir.path.join("sensor.toml");
    std::fs::write(&config, "[clients]\nmax_clients = 20\n").expect("config");
    let agent = Agent::start_with(
        &cg,
        &[port],
        200,
        &["--config", config.to_str().expect("utf-8")],
    );
    let url = |f: &str| format!("http://127.0.0.1:{port}/{f}");
    let light = |i: usize| {
        (
            Command::new("curl"),
            vec![op(&[
                "--interface",
                &format!("127.0.6.{}", i + 1),
                &url(SMALL.0),
            ])],
        )
    };
    let heavy = |i: usize| {
        (
            Command::new("curl"),
            vec![op(&[
                "--interface",
                &format!("127.0.5.{}", i + 1),
                &url(BIG.0),
            ])],
        )
    };
    // Light clients before and after the heavy ones, so the table overflows on both sides.
    let mut transfers = run_parallel((0..75).map(light).collect(), 4);
    transfers.extend(run_parallel((0..10).map(heavy).collect(), 4));
    transfers.extend(run_parallel((75..150).map(light).collect(), 4));
    let truth = per_client(&nginx.truth(&transfers), &transfers, str::to_owned);
    let total_out: u64 = truth.values().map(|t| t.1).sum();
    let health = wait_for("all traffic accounted", Duration::from_secs(30), || {
        let h = agent.health();
        if h["clients"]["total_bytes_out"] == total_out {
            Ok(h)
        } else {
            Err(format!("{}", h["clients"]))
        }
    });
    let clients = &health["clients"];
    assert!(
        clients["tracked_addresses"].as_u64().expect("tracked") <= 22,
        "{clients}"
    );
    assert!(
        clients["folded_addresses"].as_u64().expect("folded") >= 138,
        "{clients}"
    );
    assert_eq!(clients["total_requests"], 160);
    let seen = sensor_per_client(&agent.clients("address"), None);
    for i in 0..10 {
        let ip = format!("127.0.5.{}", i + 1);
        assert_eq!(seen.get(&ip), truth.get(&ip), "heavy client {ip} is exact");
    }
}

/// SIGKILL the agent while clients keep sending, let traffic continue while it is down, restart
/// it: every client's totals are exact, including connections that opened and closed while no
/// agent ran and a streamed reply that spans the outage.
#[test]
fn agent_killed_mid_traffic_restarts_without_loss() {
    if !privileged("agent_killed_mid_traffic_restarts_without_loss") {
        return;
    }
    let cg = Cgroup::new("restart");
    let port = free_port();
    let nginx = Nginx::start(&cg, None, &[format!("127.0.0.1:{port}")]);
    let mut agent = Agent::start(&cg, &[port], 200);
    let url = |f: &str| format!("http://127.0.0.1:{port}/{f}");
    // A reply streamed over about five seconds, across the kill and the restart.
    let stream = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            CURL_WRITE_OUT,
            "--interface",
            "127.0.7.100",
        ])
        .arg(url(&format!("stream/{}", BIG.0)))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl");
    let tmp = TempDir::new("restart-bodies");
    let body = {
        let p = tmp.path.join("body.bin");
        std::fs::write(&p, vec![b'y'; 20_000]).expect("body");
        format!("@{}", p.display())
    };
    let jobs: Vec<_> = (0..240)
        .map(|i| {
            let source = format!("127.0.7.{}", 1 + i % 4);
            (
                Command::new("curl"),
                client_ops(i, &source, &format!("http://127.0.0.1:{port}"), &body),
            )
        })
        .collect();
    let traffic = thread::spawn(move || run_parallel(jobs, 4));
    wait_for(
        "traffic seen by the first agent",
        Duration::from_secs(20),
        || {
            let reqs: u64 = agent
                .clients("address")
                .iter()
                .filter_map(|r| r["requests"].as_u64())
                .sum();
            if reqs >= 30 {
                Ok(())
            } else {
                Err(format!("{reqs} requests"))
            }
        },
    );
    agent.kill9();
    let at_kill = nginx.records().len();
    wait_for(
        "traffic while no agent runs",
        Duration::from_secs(20),
        || {
            let n = nginx.records().len();
            if n >= at_kill + 60 {
                Ok(())
            } else {
                Err(format!("{} requests since the kill", n - at_kill))
            }
        },
    );
    agent.restart();
    assert_eq!(agent.health()["continued_from_pinned_state"], true);
    let mut transfers = traffic.join().expect("traffic");
    let out = stream.wait_with_output().expect("stream");
    assert!(out.status.success());
    transfers.extend(parse_transfers(&String::from_utf8_lossy(&out.stdout)));
    let truth = per_client(&nginx.truth(&transfers), &transfers, str::to_owned);
    wait_for(
        "per-client totals equal to ground truth",
        Duration::from_secs(30),
        || {
            let seen = sensor_per_client(&agent.clients("address"), None);
            if seen == truth {
                Ok(())
            } else {
                Err(format!("truth {truth:?}\nseen {seen:?}"))
            }
        },
    );
}
