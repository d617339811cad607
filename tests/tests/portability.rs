//! Portability: the agent probes what the kernel allows, picks a live-read path that works,
//! says which, and a start the kernel refuses leaves nothing attached or pinned.

use std::{path::Path, process::Command, time::Duration};

use sensor_tests::*;

/// `sensor doctor --json` for `cgroup`.
fn doctor(cgroup: &Cgroup, extra: &[&str]) -> (bool, serde_json::Value) {
    let out = Command::new(sensor_bin())
        .args(["doctor", "--json", "--cgroup"])
        .arg(&cgroup.path)
        .args(extra)
        .output()
        .expect("sensor doctor");
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor JSON: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), report)
}

/// Whether the kernel loads the iterator, by the doctor's own probe of the real program.
fn iterator_loads(report: &serde_json::Value) -> bool {
    report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == "iterator path: sensor_conns")
        .map(|c| c["status"] == "ok")
        .expect("the doctor probes the iterator")
}

/// The doctor's verdict and the path it predicts are what the agent then does; both say why.
#[test]
fn doctor_predicts_the_agents_live_read_path() {
    if !privileged("doctor_predicts_the_agents_live_read_path") {
        return;
    }
    let cg = Cgroup::new("doctor");
    let (ok, report) = doctor(&cg, &["--live-read", "auto"]);
    assert!(ok, "the agent can run on the test machine: {report:#}");
    assert_eq!(report["can_run"], true);
    let predicted = report["live_read"].as_str().expect("a path").to_owned();
    assert_eq!(
        predicted,
        if iterator_loads(&report) {
            "iterator"
        } else {
            "map"
        }
    );
    for name in ["btf", "cgroup v2", "capabilities", "map: ring buffer"] {
        let check = report["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no check {name}: {report:#}"));
        assert_eq!(check["status"], "ok", "{check}");
    }
    println!(
        "doctor on kernel {}: live read {predicted} ({})",
        report["kernel"], report["live_read_reason"]
    );
    for (name, n) in verifier_headroom(&report) {
        println!("{name}: the verifier processed {n} instructions");
    }

    let port = free_port();
    let _nginx = Nginx::start(&cg, None, &[format!("127.0.0.1:{port}")]);
    let agent = Agent::start_with(&cg, &[port], 200, &["--live-read", "auto"]);
    let health = agent.health();
    assert_eq!(health["live_read"], predicted.as_str(), "{health}");
    assert!(
        health["live_read_reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("auto: ")),
        "{health}"
    );
    let status = run_ok(
        Command::new(sensor_bin())
            .args(["status", "--socket"])
            .arg(&agent.socket),
    );
    assert!(
        status.contains(&format!("live read:    {predicted} (auto: ")),
        "{status}"
    );
    // And it counts: one request, exactly, on whichever path it took.
    let transfers = curl(
        Command::new("curl"),
        &[op(&[&format!("http://127.0.0.1:{port}/{}", SMALL.0)])],
    );
    let conns = agent.wait_closed(1, |_| true);
    assert_eq!(conns[0].requests, 1);
    assert_eq!(conns[0].bytes_out, transfers[0].received);
}

/// A start the kernel refuses, at whatever step, detaches and unpins what it attached and
/// pinned: the cgroup has no programs and the pin directory is gone. Refusals: a connection
/// map larger than the kernel allocates (every kernel), and the iterator forced where the
/// kernel refuses it (machines that refuse it; elsewhere that start succeeds).
#[test]
fn refused_starts_leave_nothing_behind() {
    if !privileged("refused_starts_leave_nothing_behind") {
        return;
    }
    let cg = Cgroup::new("refused");
    let dir = TempDir::new("refused");
    let config = dir.path.join("sensor.toml");
    // 2^31 entries: the kernel's hash map refuses it (E2BIG) while the maps before it in the
    // object are already created and pinned.
    std::fs::write(&config, "[capture]\nmax_connections = 2147483648\n").expect("config");
    let pins = Path::new("/sys/fs/bpf").join(format!("sensor-test-refused-{}", std::process::id()));
    let run = |extra: &[&str]| {
        let mut cmd = Command::new(sensor_bin());
        cmd.args(["run", "--ports", "8000", "--cgroup"])
            .arg(&cg.path);
        if !extra.contains(&"--socket") {
            cmd.arg("--socket").arg(dir.path.join("s.sock"));
        }
        cmd.arg("--state-dir")
            .arg(dir.path.join("state"))
            .arg("--pin-dir")
            .arg(&pins)
            .args(extra)
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("sensor run")
    };
    let assert_clean = |what: &str| {
        assert!(
            attached_programs(&cg).is_empty(),
            "{what}: {:?}",
            attached_programs(&cg)
        );
        assert!(!pins.exists(), "{what}: {} left behind", pins.display());
    };

    let out = run(&["--config", config.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("cannot start capture"), "{err}");
    assert_clean("oversized map");

    // Refusals after the packet programs are attached: the kernel refuses the sock_ops link
    // (another tool holds the cgroup's sock_ops slot exclusively), and a start that fails
    // after the attach (its API socket cannot be created).
    let ours = |cg: &Cgroup| -> Vec<String> {
        attached_programs(cg)
            .into_iter()
            .filter(|p| p.starts_with("sensor_"))
            .collect()
    };
    {
        let _exclusive = ExclusiveSockOps::attach(&cg);
        let out = run(&[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("attach of program sensor_sockops"), "{err}");
        assert!(ours(&cg).is_empty(), "sock_ops refused: {:?}", ours(&cg));
        assert!(
            !pins.exists(),
            "sock_ops refused: {} left behind",
            pins.display()
        );
    }
    let not_a_dir = dir.path.join("file");
    std::fs::write(&not_a_dir, "").expect("file");
    let socket = not_a_dir.join("s.sock");
    let out = run(&["--socket", socket.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("creating socket directory"), "{err}");
    assert!(
        err.contains("detaching and unpinning what this start attached"),
        "{err}"
    );
    assert_clean("API socket refused after the attach");

    let (_, report) = doctor(&cg, &[]);
    if iterator_loads(&report) {
        // Here the forced iterator starts (the suite runs on it); the oversized map above is
        // this machine's refusal.
        println!("this kernel loads the iterator: its refusal is checked where it is refused");
    } else {
        let out = run(&["--live-read", "iterator"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains("the kernel refused the socket-storage map iterator"),
            "{err}"
        );
        assert!(
            err.contains("live_read = \"auto\""),
            "names the way out: {err}"
        );
        assert!(err.contains("sensor doctor"), "{err}");
        assert_clean("iterator refused");
    }
    // A refused start does not touch state pinned by an earlier, healthy run (here: an agent
    // killed with SIGKILL, whose programs keep counting until it restarts).
    let other = Cgroup::new("refused-other");
    let port = free_port();
    let mut agent = Agent::start(&cg, &[port], 200);
    agent.kill9();
    let pinned: Vec<_> = std::fs::read_dir(&agent.pin_dir)
        .expect("pinned state")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(pinned.len(), 1, "{pinned:?}");
    let refused = Command::new(sensor_bin())
        .args(["run", "--ports", "8000", "--cgroup"])
        .arg(&other.path)
        .arg("--socket")
        .arg(dir.path.join("s2.sock"))
        .arg("--state-dir")
        .arg(&agent.state_dir)
        .arg("--pin-dir")
        .arg(&agent.pin_dir)
        .args(["--config", config.to_str().expect("utf-8")])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("sensor run");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    assert!(err.contains("cannot start capture"), "{err}");
    assert!(
        attached_programs(&other).is_empty(),
        "{:?}",
        attached_programs(&other)
    );
    assert!(pinned[0].exists(), "the earlier run's state is kept");
    assert_eq!(
        attached_programs(&cg).len(),
        3,
        "the earlier run's programs stay attached"
    );
    agent.restart();
    assert_eq!(agent.health()["continued_from_pinned_state"], true);
    drop(agent);
    wait_for("programs to detach", Duration::from_secs(10), || {
        let names = attached_programs(&cg);
        if names.is_empty() {
            Ok(())
        } else {
            Err(format!("{names:?}"))
        }
    });
}

/// `sensor doctor` exits non-zero and says what is missing where the agent cannot run.
#[test]
fn doctor_fails_where_the_agent_cannot_run() {
    if !privileged("doctor_fails_where_the_agent_cannot_run") {
        return;
    }
    let out = Command::new("setpriv")
        .args(["--bounding-set=-all", "--"])
        .arg(sensor_bin())
        .arg("doctor")
        .output()
        .expect("setpriv sensor doctor");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(69), "{text}");
    assert!(text.contains("MISSING"), "{text}");
    assert!(
        text.contains("missing CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN"),
        "{text}"
    );
    assert!(
        text.contains("verdict: the agent cannot run here"),
        "{text}"
    );
}

/// Closed records waiting for the agent never take the room of live ones: with the agent down
/// (nobody deletes closed records), more short connections close than `max_connections`, and
/// a connection opened after them is still recorded. The closes beyond the closed-record map's
/// room still reach the agent through the ring buffer: every request is counted,
/// `closed_map_full` says how many closed records the map could not keep, and `conn_map_full`
/// (connections not counted) stays 0. On both paths.
/// A close whose final record fits neither the closed-record map nor the ring buffer is
/// counted in `closed_lost`: with the agent stopped, `max_connections = 4` and a one-page
/// close ring, more short connections open and close than both hold. The connections the
/// agent shows plus those it counts as lost are every connection made; none is counted as not
/// tracked (`conn_map_full`: they were live one at a time). On both paths.
#[test]
fn closes_that_fit_nowhere_are_counted_as_lost() {
    if !privileged("closes_that_fit_nowhere_are_counted_as_lost") {
        return;
    }
    // SAFETY: sysconf(3) has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).expect("page size");
    // A close record is 128 bytes and an 8-byte header: more closes than the page holds.
    let connections = page / 136 + 20;
    for live_read in ["auto", "map"] {
        let cg = Cgroup::new("nowhere");
        let port = free_port();
        let _nginx = Nginx::start(&cg, None, &[format!("127.0.0.1:{port}")]);
        let dir = TempDir::new("nowhere-config");
        let config = dir.path.join("sensor.toml");
        std::fs::write(
            &config,
            format!("[capture]\nmax_connections = 4\nring_buffer_bytes = {page}\n"),
        )
        .expect("config");
        let agent = Agent::start_with(
            &cg,
            &[port],
            200,
            &[
                "--config",
                config.to_str().expect("utf-8"),
                "--live-read",
                live_read,
            ],
        );
        // SAFETY: kill(2) on the agent's pid, which this test started.
        assert_eq!(unsafe { libc::kill(agent.pid() as i32, libc::SIGSTOP) }, 0);
        let ops: Vec<Vec<String>> = (0..connections)
            .map(|i| {
                let mut o = op(&["--interface", "127.0.3.2", "-H", "Connection: close"]);
                o.push(format!("http://127.0.0.1:{port}/{}?n={i}", SMALL.0));
                o
            })
            .collect();
        assert_eq!(curl(Command::new("curl"), &ops).len(), connections);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(agent.pid() as i32, libc::SIGCONT) }, 0);
        wait_for(
            "every connection shown or counted as lost",
            Duration::from_secs(15),
            || {
                let seen = agent
                    .conns()
                    .iter()
                    .filter(|c| c.remote.starts_with("127.0.3.2:") && c.state == "closed")
                    .count() as u64;
                let loss = &agent.health()["loss"];
                let lost = loss["closed_lost"].as_u64().unwrap_or(0);
                let uncounted = loss["conn_map_full"].as_u64().unwrap_or(u64::MAX);
                if lost > 0 && uncounted == 0 && seen + lost == connections as u64 {
                    Ok(())
                } else {
                    Err(format!(
                        "{live_read}: {seen} shown + {lost} closed_lost of {connections}, \
                         conn_map_full {uncounted}"
                    ))
                }
            },
        );
    }
}

#[test]
fn closed_records_never_crowd_out_live_ones() {
    if !privileged("closed_records_never_crowd_out_live_ones") {
        return;
    }
    for live_read in ["auto", "map"] {
        let cg = Cgroup::new("crowd");
        let port = free_port();
        let _nginx = Nginx::start(&cg, None, &[format!("127.0.0.1:{port}")]);
        let dir = TempDir::new("crowd-config");
        let config = dir.path.join("sensor.toml");
        std::fs::write(&config, "[capture]\nmax_connections = 4\n").expect("config");
        let mut agent = Agent::start_with(
            &cg,
            &[port],
            200,
            &[
                "--config",
                config.to_str().expect("utf-8"),
                "--live-read",
                live_read,
            ],
        );
        agent.kill9();
        let url = format!("http://127.0.0.1:{port}/{}", SMALL.0);
        for _ in 0..6 {
            curl(Command::new("curl"), &[op(&[&url])]);
        }
        let held = HeldConnections::open(port, 1);
        let remote = format!("127.0.0.1:{}", held.ports[0]);
        agent.restart();
        wait_for(
            "the live connection and every short one",
            Duration::from_secs(15),
            || {
                let conns = agent.conns();
                let open = conns
                    .iter()
                    .any(|c| c.state == "open" && c.remote == remote);
                let requests: u64 = agent
                    .clients("address")
                    .iter()
                    .map(|c| c["requests"].as_u64().unwrap_or(0))
                    .sum();
                let loss = &agent.health()["loss"];
                let kept_out = loss["closed_map_full"].as_u64().unwrap_or(0);
                let uncounted = loss["conn_map_full"].as_u64().unwrap_or(u64::MAX);
                let lost = loss["closed_lost"].as_u64().unwrap_or(u64::MAX);
                if open && requests == 6 && kept_out == 2 && uncounted == 0 && lost == 0 {
                    Ok(())
                } else {
                    Err(format!(
                        "{live_read}: open {open}, requests {requests}, closed_map_full \
                         {kept_out}, conn_map_full {uncounted}, closed_lost {lost}"
                    ))
                }
            },
        );
        drop(held);
    }
}
