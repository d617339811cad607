//! The agent as an operator meets it: clean attach and detach, and clear errors.

use std::{process::Command, time::Duration};

use sensor_tests::*;

#[test]
fn attaches_to_its_cgroup_and_detaches_on_sigterm() {
    if !privileged("attaches_to_its_cgroup_and_detaches_on_sigterm") {
        return;
    }
    let cg = Cgroup::new("lifecycle");
    let agent = Agent::start(&cg, &[free_port()], 200);
    assert_eq!(
        attached_programs(&cg),
        ["sensor_egress", "sensor_ingress", "sensor_sockops"]
    );
    let health = agent.health();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["cgroup"], cg.path.display().to_string());
    drop(agent); // SIGTERM, then waits for exit
    wait_for("programs to detach", Duration::from_secs(10), || {
        let names = attached_programs(&cg);
        if names.is_empty() {
            Ok(())
        } else {
            Err(format!("{names:?}"))
        }
    });
}

fn sensor_run_fails(args: &[&str], prefix: &[&str]) -> String {
    let mut cmd = match prefix.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(sensor_bin());
            c
        }
        None => Command::new(sensor_bin()),
    };
    let dir = TempDir::new("err");
    let out = cmd
        .arg("run")
        .args(args)
        .arg("--socket")
        .arg(dir.path.join("s.sock"))
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run sensor");
    assert!(
        !out.status.success(),
        "sensor run should fail with {args:?}"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn config_errors_name_file_line_and_key() {
    // Parsing happens before anything privileged: runs as any user.
    let dir = TempDir::new("config");
    let path = dir.path.join("sensor.toml");
    std::fs::write(
        &path,
        "[capture]\nports = [8000]\npoll_interval_ms = \"soon\"\n",
    )
    .expect("write");
    let err = sensor_run_fails(&["--config", path.to_str().expect("utf-8")], &[]);
    let want = format!("{}:3: capture.poll_interval_ms: ", path.display());
    assert!(err.contains(&want), "want {want:?} in: {err}");

    std::fs::write(
        &path,
        "[capture]\nports = [8000]\n\n[api]\nsockett = \"/x\"\n",
    )
    .expect("write");
    let err = sensor_run_fails(&["--config", path.to_str().expect("utf-8")], &[]);
    let want = format!("{}:5: api.sockett: ", path.display());
    assert!(err.contains(&want), "want {want:?} in: {err}");
}

#[test]
fn missing_capabilities_and_bad_cgroup_are_clear_errors() {
    if !privileged("missing_capabilities_and_bad_cgroup_are_clear_errors") {
        return;
    }
    // Root without capabilities (empty bounding set), as in a locked-down container.
    let err = sensor_run_fails(
        &["--ports", "8000"],
        &["setpriv", "--bounding-set=-all", "--"],
    );
    assert!(
        err.contains("missing capabilities CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN"),
        "{err}"
    );

    let err = sensor_run_fails(&["--cgroup", "/sys/fs/cgroup/no-such-cgroup-here"], &[]);
    assert!(
        err.contains("does not exist or is not a directory in the cgroup v2 hierarchy"),
        "{err}"
    );

    let err = sensor_run_fails(&["--ports", "80,http"], &[]);
    assert!(err.contains("`http` is not a port"), "{err}");
}

/// A full connection map is loss the operator can see: connections beyond the bound are not
/// counted, and `conn_map_full` says how many.
#[test]
fn full_connection_map_is_counted_loss() {
    if !privileged("full_connection_map_is_counted_loss") {
        return;
    }
    let cg = Cgroup::new("mapfull");
    let port = free_port();
    let _nginx = Nginx::start(&cg, None, &[format!("127.0.0.1:{port}")]);
    let dir = TempDir::new("mapfull-config");
    let config = dir.path.join("sensor.toml");
    std::fs::write(&config, "[capture]\nmax_connections = 2\n").expect("config");
    let agent = Agent::start_with(
        &cg,
        &[port],
        200,
        &["--config", config.to_str().expect("utf-8")],
    );
    // Five connections held open at once.
    let held = HeldConnections::open(port, 5);
    wait_for(
        "two counted and three lost connections",
        Duration::from_secs(10),
        || {
            let open = agent.conns().iter().filter(|c| c.state == "open").count();
            let lost = agent.health()["loss"]["conn_map_full"]
                .as_u64()
                .unwrap_or(0);
            if (open, lost) == (2, 3) {
                Ok(())
            } else {
                Err(format!("open {open}, lost {lost}"))
            }
        },
    );
    drop(held);
}

/// Pinned state left by an incompatible sensor version is replaced, with a log line saying so;
/// `--fresh` starts from zero.
#[test]
fn incompatible_pinned_state_is_replaced_and_fresh_starts_from_zero() {
    if !privileged("incompatible_pinned_state_is_replaced_and_fresh_starts_from_zero") {
        return;
    }
    let cg = Cgroup::new("pins");
    let port = free_port();
    let _nginx = Nginx::start(&cg, None, &[format!("127.0.0.1:{port}")]);
    let mut agent = Agent::start(&cg, &[port], 200);
    curl(
        Command::new("curl"),
        &[op(&[&format!("http://127.0.0.1:{port}/{}", SMALL.0)])],
    );
    wait_for(
        "the request in the per-client view",
        Duration::from_secs(10),
        || match agent.clients("address").as_slice() {
            [c] if c["requests"] == 1 && c["open_connections"] == 0 => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    agent.kill9();
    // A map pinned by an "older version" of the sensor.
    let old = agent.pin_dir.join("abi1-0123456789abcdef");
    std::fs::create_dir_all(&old).expect("old pin dir");
    run_ok(
        Command::new("bpftool")
            .args(["map", "create"])
            .arg(old.join("CONNS"))
            .args([
                "type", "hash", "key", "8", "value", "8", "entries", "4", "name", "CONNS",
            ]),
    );
    agent.restart();
    assert!(!old.exists(), "old pinned state removed");
    let log = agent.log();
    assert!(
        log.contains(&format!("removing pinned sensor state {}", old.display())),
        "{log}"
    );
    // Saved per-client state survived the kill.
    assert_eq!(agent.clients("address")[0]["requests"], 1);

    agent.kill9();
    agent.restart_with(&["--fresh"]);
    assert!(
        agent.clients("address").is_empty(),
        "--fresh starts from zero"
    );
    assert_eq!(agent.health()["continued_from_pinned_state"], false);
}

/// A reader token never crosses the network in clear: `--collector http://` to anything but a
/// loopback address is refused before a connection is made (10.255.255.1 would hang if dialed).
#[test]
fn collector_views_refuse_a_token_over_plain_http() {
    let dir = TempDir::new("clear");
    let token = dir.path.join("reader.token");
    std::fs::write(&token, "r-secret\n").expect("write");
    for view in ["clients", "alerts"] {
        let out = Command::new(sensor_bin())
            .args([view, "--collector", "http://10.255.255.1:9443"])
            .arg("--token-file")
            .arg(&token)
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("run sensor");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{view}: {err}");
        assert!(err.contains("would travel in clear"), "{view}: {err}");
    }
}

/// Ring sizes are fixed when the pinned state is created: an agent restarted on it with
/// another size says the new one applies only once the state is replaced, and keeps counting.
#[test]
fn a_changed_ring_size_on_pinned_state_is_named() {
    if !privileged("a_changed_ring_size_on_pinned_state_is_named") {
        return;
    }
    let cg = Cgroup::new("ringsize");
    let port = free_port();
    let _nginx = Nginx::start(&cg, None, &[format!("127.0.0.1:{port}")]);
    let mut agent = Agent::start(&cg, &[port], 200);
    agent.kill9();
    let tmp = TempDir::new("ringsize");
    let config = tmp.path.join("sensor.toml");
    std::fs::write(&config, "[capture]\nrequest_ring_bytes = 131072\n").expect("config");
    agent.restart_with(&["--config", config.to_str().expect("utf-8")]);
    assert_eq!(agent.health()["continued_from_pinned_state"], true);
    let log = agent.log();
    assert!(
        log.contains("request_ring_bytes = 131072 applies when the pinned state is replaced")
            && log.contains("the running ring keeps 4194304 bytes"),
        "{log}"
    );
    assert!(!log.contains("ring_buffer_bytes = "), "{log}");
}
