//! The agent as a systemd service: the unit passes `systemd-analyze verify` and scores within
//! the exposure target, and in a booted Debian (systemd-nspawn) `sensor install` and the .deb
//! run it with the real systemd: ready only once attached, counting traffic made in the
//! container, reloading on SIGHUP (bad configs kept out), fed watchdog, clean stop, clear start
//! failures, and an uninstall that leaves no trace.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use sensor_tests::{systemd::*, *};

/// The unit's exposure target (`systemd-analyze security`, 0 best, 10 worst).
const EXPOSURE_TARGET: f64 = 2.5;
/// What installs write to /etc/sensor/sensor.toml: the defaults with the secret in /etc.
const DEFAULT_CONFIG: &str = include_str!("../../packaging/sensor.toml");
const CONFIG: &str = "/etc/sensor/sensor.toml";

/// "→ Overall exposure level for sensor.service: 1.9 OK 🙂" -> 1.9
fn exposure(report: &str) -> f64 {
    report
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for "))
        .and_then(|(_, rest)| rest.split_once(": "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            } else {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}

/// Staged install (`--root`), the unit checked by systemd's own tools, and a clean removal.
#[test]
fn unit_verifies_and_meets_the_exposure_target() {
    if !privileged("unit_verifies_and_meets_the_exposure_target") {
        return;
    }
    let dir = TempDir::new("stage");
    let stage = |p: &str| dir.path.join(p.trim_start_matches('/'));
    let out = run_ok(
        Command::new(sensor_bin())
            .args(["install", "--root"])
            .arg(&dir.path),
    );
    assert!(out.contains("created"), "{out}");
    assert_eq!(mode(&stage("/usr/local/bin/sensor")), 0o755);
    assert_eq!(mode(&stage("/etc/systemd/system/sensor.service")), 0o644);
    assert_eq!(mode(&stage(CONFIG)), 0o644);
    assert_eq!(
        std::fs::read_to_string(stage(CONFIG)).expect("config"),
        DEFAULT_CONFIG
    );
    let key_path = stage("/etc/sensor/identity.key");
    assert_eq!(mode(&key_path), 0o600);
    let key = std::fs::read_to_string(&key_path).expect("key");
    assert!(
        key.len() == 65 && key.trim_end().chars().all(|c| c.is_ascii_hexdigit()),
        "{key:?}"
    );
    assert_eq!(mode(&stage("/var/lib/sensor")), 0o700);

    // A second install keeps the operator's configuration and the secret.
    std::fs::write(stage(CONFIG), "# mine\n").expect("edit config");
    let out = run_ok(
        Command::new(sensor_bin())
            .args(["install", "--root"])
            .arg(&dir.path),
    );
    assert!(
        out.contains(&format!("kept existing {}", stage(CONFIG).display())),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(stage(CONFIG)).expect("config"),
        "# mine\n"
    );
    assert_eq!(std::fs::read_to_string(&key_path).expect("key"), key);

    // systemd's checks, on the installed unit pointed at the staged binary.
    let unit = std::fs::read_to_string(stage("/etc/systemd/system/sensor.service"))
        .expect("unit")
        .replace(
            "ExecStart=/usr/local/bin/sensor ",
            &format!("ExecStart={} ", stage("/usr/local/bin/sensor").display()),
        );
    let checked = TempDir::new("unit");
    let unit_path = checked.path.join("sensor.service");
    std::fs::write(&unit_path, unit).expect("unit copy");
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .output()
        .expect("systemd-analyze verify");
    assert!(
        verify.status.success(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let report = run_ok(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(&unit_path),
    );
    let score = exposure(&report);
    eprintln!(
        "systemd-analyze security --offline=true: exposure {score} (target <= {EXPOSURE_TARGET})"
    );
    assert!(score <= EXPOSURE_TARGET, "exposure {score}:\n{report}");

    run_ok(
        Command::new(sensor_bin())
            .args(["uninstall", "--purge", "--root"])
            .arg(&dir.path),
    );
    assert_eq!(files_under(&dir.path), Vec::<String>::new());
}

#[test]
fn check_config_reports_every_error_with_file_line_and_key() {
    // Reads a file only: runs as any user.
    let dir = TempDir::new("check");
    let path = dir.path.join("sensor.toml");
    let p = path.display().to_string();
    std::fs::write(&path, DEFAULT_CONFIG).expect("config");
    let out = Command::new(sensor_bin())
        .args(["check-config", &p])
        .output()
        .expect("check-config");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("{p}: OK")));

    std::fs::write(
        &path,
        "[capture]\nports = [8000, 0]\npoll_interval_ms = \"soon\"\n\n[api]\nsockett = \"/x\"\n",
    )
    .expect("config");
    let out = Command::new(sensor_bin())
        .args(["check-config", &p])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("check-config");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        format!("{p}:2: capture.ports: port 0 cannot be watched"),
        format!("{p}:3: capture.poll_interval_ms: invalid type"),
        format!("{p}:6: api.sockett: unknown field"),
        format!("{p}: 3 errors"),
    ] {
        assert!(err.contains(&want), "want {want:?} in:\n{err}");
    }
}

// ---- inside a booted Debian ----

/// Programs attached to the container's root cgroup, as the host's kernel lists them.
fn attached(c: &Container) -> Vec<String> {
    let out = run_ok(
        Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(c.host_cgroup()),
    );
    let progs: Vec<serde_json::Value> = serde_json::from_str(out.trim()).unwrap_or_default();
    let mut names: Vec<String> = progs
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

const OURS: [&str; 3] = ["sensor_egress", "sensor_ingress", "sensor_sockops"];

fn show(c: &Container, property: &str) -> String {
    c.sh_ok(&format!(
        "systemctl show sensor.service -p {property} --value"
    ))
    .trim()
    .to_owned()
}

fn json(c: &Container, cmd: &str) -> serde_json::Value {
    let out = c.sh_ok(cmd);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("`{cmd}`: {e}: {out}"))
}

/// One HTTP GET with curl inside the container: (client "ip:port", bytes received).
fn get(c: &Container, url: &str) -> (String, u64) {
    let out = c.sh_ok(&format!(
        "curl -s -o /dev/null -w '%{{local_ip}} %{{local_port}} %{{size_header}} \
         %{{size_download}} %{{http_code}}' {url}"
    ));
    let f: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(f.len(), 5, "curl: {out}");
    assert_eq!(f[4], "200", "{url}: HTTP {}", f[4]);
    let n = |s: &str| s.parse::<u64>().expect("curl number");
    (join_host_port(f[0], f[1]), n(f[2]) + n(f[3]))
}

/// Waits until the agent lists the connection from `client` as closed; returns its row.
fn counted(c: &Container, client: &str) -> serde_json::Value {
    wait_for(
        &format!("the connection from {client} in `sensor conns`"),
        Duration::from_secs(20),
        || {
            let conns = json(c, "sensor conns --json");
            conns
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .find(|r| r["remote"] == client && r["state"] == "closed")
                        .cloned()
                })
                .ok_or_else(|| format!("{conns}"))
        },
    )
}

fn requests_from_localhost(c: &Container) -> u64 {
    let rows = json(c, "sensor clients --json --limit 1000000");
    rows.as_array()
        .and_then(|a| a.iter().find(|r| r["client"] == "127.0.0.1"))
        .and_then(|r| r["requests"].as_u64())
        .unwrap_or(0)
}

fn config_with(replacements: &[(&str, &str)]) -> String {
    DEFAULT_CONFIG
        .lines()
        .map(|l| {
            replacements
                .iter()
                .find(|(key, _)| l.starts_with(&format!("{key} = ")))
                .map_or_else(|| l.to_owned(), |(key, value)| format!("{key} = {value}"))
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn line_of(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| l.starts_with(&format!("{key} = ")))
        .map(|i| i + 1)
        .expect("key in config")
}

fn journal(c: &Container) -> String {
    c.sh_ok("journalctl -u sensor.service --no-pager -o cat")
}

/// A second nginx server on 8081, which the default configuration does not watch.
fn serve_8081(c: &Container) {
    c.write(
        "/etc/nginx/sites-enabled/extra-8081",
        b"server { listen 8081; listen [::]:8081; root /var/www/html; }\n",
        0o644,
    );
    c.sh_ok("systemctl reload nginx");
    wait_for("nginx on 8081", Duration::from_secs(10), || {
        let r = c.sh("curl -sf -o /dev/null http://127.0.0.1:8081/index.nginx-debian.html");
        if r.ok() { Ok(()) } else { Err(r.stderr) }
    });
}

#[test]
fn source_install_runs_under_systemd() {
    if !privileged("source_install_runs_under_systemd") {
        return;
    }
    let started = Instant::now();
    let c = Container::boot("src");
    eprintln!("container booted in {:.1?}", started.elapsed());
    let bin = std::fs::read(sensor_bin()).expect("sensor binary");
    c.write("/root/sensor", &bin, 0o755);

    // Install, enable, start: `systemctl start` returns once READY=1 came, i.e. attached and
    // listening.
    let out = c.sh_ok("/root/sensor install --enable --now");
    assert!(out.contains("created /etc/sensor/sensor.toml"), "{out}");
    assert_eq!(c.sh_ok("systemctl is-enabled sensor").trim(), "enabled");
    assert_eq!(c.sh_ok("systemctl is-active sensor").trim(), "active");
    assert_eq!(
        attached(&c),
        OURS,
        "programs attached when systemd says ready"
    );
    c.sh_ok("systemd-analyze verify /etc/systemd/system/sensor.service");
    let report = c.sh_ok("systemd-analyze security --no-pager sensor.service");
    let score = exposure(&report);
    eprintln!("systemd-analyze security (running unit in the container): exposure {score}");
    assert!(score <= EXPOSURE_TARGET, "{report}");
    assert_eq!(
        c.sh_ok("stat -c '%a %U' /usr/local/bin/sensor /etc/sensor/sensor.toml /etc/sensor/identity.key /var/lib/sensor"),
        "755 root\n644 root\n600 root\n700 root\n"
    );
    assert_eq!(c.sh_ok(&format!("cat {CONFIG}")), DEFAULT_CONFIG);
    // Root with CAP_NET_ADMIN (12), CAP_PERFMON (38) and CAP_BPF (39) only.
    let caps = c.sh_ok(
        "grep -E '^Cap(Eff|Bnd|Amb)' /proc/$(systemctl show -p MainPID --value sensor)/status",
    );
    assert_eq!(
        caps.split_whitespace().collect::<Vec<_>>(),
        [
            "CapEff:",
            "000000c000001000",
            "CapBnd:",
            "000000c000001000",
            "CapAmb:",
            "0000000000000000"
        ]
    );
    assert!(
        show(&c, "StatusText").starts_with("attached to /sys/fs/cgroup, watching ports"),
        "{}",
        show(&c, "StatusText")
    );

    let status = json(&c, "sensor status --json");
    assert_eq!(status["running"], true);
    assert_eq!(status["cgroup"], "/sys/fs/cgroup");
    assert_eq!(
        status["ports"],
        serde_json::json!([8000, 8080, 11434, 80, 443])
    );
    let text = c.sh_ok("sensor status");
    assert!(
        text.starts_with("sensor: running (/run/sensor/sensor.sock)"),
        "{text}"
    );

    // Traffic made in the container, counted exactly (nginx listens on 80, a watched port).
    let (client, received) = get(&c, "http://127.0.0.1/");
    let row = counted(&c, &client);
    assert_eq!(row["local"], "127.0.0.1:80");
    assert_eq!(
        (row["bytes_out"].as_u64(), row["requests"].as_u64()),
        (Some(received), Some(1))
    );
    assert_eq!(requests_from_localhost(&c), 1);

    // Reload: 8081 is not watched yet, then is, without a restart and without losing counts.
    serve_8081(&c);
    let (unwatched, _) = get(&c, "http://127.0.0.1:8081/index.nginx-debian.html");
    let (marker, _) = get(&c, "http://127.0.0.1/");
    counted(&c, &marker);
    let conns = json(&c, "sensor conns --json");
    assert!(
        !conns.to_string().contains(&format!("\"{unwatched}\"")),
        "8081 counted before it was watched: {conns}"
    );
    let before = requests_from_localhost(&c);
    let pid = show(&c, "MainPID");
    let config = config_with(&[
        ("ports", "[8000, 8080, 11434, 80, 443, 8081]"),
        ("poll_interval_ms", "500"),
        ("max_connections", "1000"),
    ]);
    c.write(CONFIG, config.as_bytes(), 0o644);
    c.sh_ok("systemctl reload sensor");
    wait_for("the reload to apply", Duration::from_secs(10), || {
        let ports = json(&c, "sensor status --json")["ports"].clone();
        if ports == serde_json::json!([8000, 8080, 11434, 80, 443, 8081]) {
            Ok(())
        } else {
            Err(ports.to_string())
        }
    });
    let log = journal(&c);
    for want in [
        "reload: applied capture.ports: [8000, 8080, 11434, 80, 443] -> [8000, 8080, 11434, 80, 443, 8081]",
        "reload: applied capture.poll_interval_ms: 1000 -> 500",
        "reload: capture.max_connections: 65536 -> 1000 needs a restart",
    ] {
        assert!(log.contains(want), "want {want:?} in the journal:\n{log}");
    }
    assert_eq!(show(&c, "MainPID"), pid, "a reload is not a restart");
    let (client, received) = get(&c, "http://127.0.0.1:8081/index.nginx-debian.html");
    let row = counted(&c, &client);
    assert_eq!(row["local"], "127.0.0.1:8081");
    assert_eq!(row["bytes_out"].as_u64(), Some(received));
    assert_eq!(
        requests_from_localhost(&c),
        before + 1,
        "counters kept across the reload"
    );

    // A broken configuration: check-config names the line; a reload keeps the running one.
    let broken = config_with(&[
        ("ports", "[8000, 8080, 11434, 80, 443, 8081]"),
        ("poll_interval_ms", "\"soon\""),
    ]);
    let line = line_of(&broken, "poll_interval_ms");
    let located = format!("{CONFIG}:{line}: capture.poll_interval_ms: ");
    c.write(CONFIG, broken.as_bytes(), 0o644);
    let check = c.sh("sensor check-config");
    assert_eq!(check.status.code(), Some(1), "{}", check.stdout);
    assert!(check.stderr.contains(&located), "{}", check.stderr);
    c.sh_ok("systemctl reload sensor");
    wait_for(
        "the failed reload in the journal",
        Duration::from_secs(10),
        || {
            let log = journal(&c);
            if log.contains("still running on the previous configuration") && log.contains(&located)
            {
                Ok(())
            } else {
                Err(log)
            }
        },
    );
    assert_eq!(c.sh_ok("systemctl is-active sensor").trim(), "active");
    assert_eq!(show(&c, "MainPID"), pid);
    let (client, _) = get(&c, "http://127.0.0.1:8081/index.nginx-debian.html");
    counted(&c, &client);

    // The watchdog is fed from the main loop; a stuck agent is killed and restarted, and the
    // new one continues from the pinned kernel state.
    c.write(CONFIG, config.as_bytes(), 0o644);
    c.write(
        "/etc/systemd/system/sensor.service.d/test-watchdog.conf",
        b"[Service]\nWatchdogSec=2s\nWatchdogSignal=SIGKILL\nRestartSec=1s\n",
        0o644,
    );
    c.sh_ok("systemctl daemon-reload && systemctl restart sensor");
    let pid = show(&c, "MainPID");
    let mut pings = Vec::new();
    wait_for("three watchdog pings", Duration::from_secs(10), || {
        let t = show(&c, "WatchdogTimestampMonotonic");
        if pings.last() != Some(&t) {
            pings.push(t);
        }
        if pings.len() >= 3 {
            Ok(())
        } else {
            Err(format!("{pings:?}"))
        }
    });
    assert_eq!(
        (show(&c, "MainPID"), show(&c, "NRestarts")),
        (pid.clone(), "0".into())
    );
    let before = requests_from_localhost(&c);
    c.sh_ok(&format!("kill -STOP {pid}"));
    wait_for(
        "a restart after the watchdog timeout",
        Duration::from_secs(30),
        || {
            let (now, state) = (show(&c, "MainPID"), show(&c, "ActiveState"));
            if now != pid && now != "0" && state == "active" {
                Ok(())
            } else {
                Err(format!("pid {now}, {state}"))
            }
        },
    );
    assert!(journal(&c).contains("Watchdog timeout"), "{}", journal(&c));
    assert_eq!(
        json(&c, "sensor status --json")["continued_from_pinned_state"],
        true
    );
    assert_eq!(
        requests_from_localhost(&c),
        before,
        "counters survive the watchdog kill"
    );
    c.sh_ok("rm -r /etc/systemd/system/sensor.service.d && systemctl daemon-reload");
    c.sh_ok("systemctl restart sensor");

    // A clean stop detaches everything.
    c.sh_ok("systemctl stop sensor");
    assert_eq!(
        attached(&c),
        Vec::<String>::new(),
        "programs detached on stop"
    );
    assert_eq!(files_under(&c.bpffs), Vec::<String>::new(), "no pins left");
    let down = c.sh("sensor status");
    assert!(
        !down.ok() && down.stdout.contains("not running"),
        "{}",
        down.stdout
    );

    // A broken configuration fails the start, says where in the journal, and is not retried.
    c.write(CONFIG, broken.as_bytes(), 0o644);
    let start = c.sh("systemctl start sensor");
    assert!(!start.ok(), "start with a broken config must fail");
    assert!(
        journal(&c).contains(&format!("Error: {located}")),
        "{}",
        journal(&c)
    );
    assert_eq!(
        (
            show(&c, "ActiveState"),
            show(&c, "SubState"),
            show(&c, "ExecMainStatus")
        ),
        ("failed".into(), "failed".into(), "78".into()),
        "exit 78 (EX_CONFIG) is not restarted"
    );
    c.write(CONFIG, config.as_bytes(), 0o644);
    c.sh_ok("systemctl start sensor");
    assert_eq!(attached(&c), OURS);

    // Uninstall: stopped, disabled, unit and binary gone; configuration and state kept.
    let out = c.sh_ok("sensor uninstall");
    assert!(out.contains("kept /etc/sensor/sensor.toml"), "{out}");
    assert_eq!(attached(&c), Vec::<String>::new());
    assert!(
        !c.sh("systemctl cat sensor.service").ok(),
        "unit still known"
    );
    assert_eq!(
        c.sh_ok(
            "ls /usr/local/bin /etc/systemd/system/multi-user.target.wants | grep -c sensor || true"
        )
        .trim(),
        "0"
    );
    c.sh_ok("test -f /etc/sensor/sensor.toml && test -f /etc/sensor/identity.key && test -d /var/lib/sensor");
    // --purge: nothing of the sensor is left (the copy used to install it aside).
    c.sh_ok("/root/sensor uninstall --purge");
    let left = c.sh_ok(
        "find / -xdev -name '*sensor*' -not -path /root/sensor; ls -d /run/sensor 2>/dev/null; \
         systemctl list-units --all --no-legend 'sensor*'",
    );
    assert_eq!(left.trim(), "", "left behind: {left}");
    assert_eq!(files_under(&c.bpffs), Vec::<String>::new());
    assert!(!c.bpffs.join("sensor").exists(), "pin directory removed");
    eprintln!("source install test took {:.1?}", started.elapsed());
}

/// Where systemd does not run (a chroot, an image being built): installed and enabled for the
/// next boot; starting now is refused with a reason.
#[test]
fn source_install_without_systemd_enables_for_next_boot() {
    if !privileged("source_install_without_systemd_enables_for_next_boot") {
        return;
    }
    let tree = Overlay::new("src-offline");
    std::fs::write(
        tree.path("/root/sensor"),
        std::fs::read(sensor_bin()).expect("binary"),
    )
    .expect("copy binary");
    std::fs::set_permissions(
        tree.path("/root/sensor"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    let now = run_without_systemd(&tree, &["/root/sensor", "install", "--enable", "--now"]);
    assert!(!now.ok(), "--now without systemd must fail");
    assert!(
        now.stderr.contains("--now needs a running systemd"),
        "{}",
        now.stderr
    );
    assert!(
        !tree.path("/usr/local/bin/sensor").exists(),
        "nothing installed on refusal"
    );
    let run = run_without_systemd(&tree, &["/root/sensor", "install", "--enable"]);
    assert!(run.ok(), "{}\n{}", run.stdout, run.stderr);
    let wants = tree.path("/etc/systemd/system/multi-user.target.wants/sensor.service");
    assert!(
        wants.is_symlink(),
        "enabled for the next boot: {}",
        run.stdout
    );
    assert_eq!(mode(&tree.path("/etc/sensor/identity.key")), 0o600);
    let run = run_without_systemd(&tree, &["/root/sensor", "uninstall", "--purge"]);
    assert!(run.ok(), "{}\n{}", run.stdout, run.stderr);
    assert!(!wants.exists() && !wants.is_symlink(), "disabled");
    for gone in [
        "/usr/local/bin/sensor",
        "/etc/systemd/system/sensor.service",
        "/etc/sensor",
    ] {
        assert!(!tree.path(gone).exists(), "{gone} left behind");
    }
}

#[test]
fn debian_package_installs_enables_and_purges() {
    if !privileged("debian_package_installs_enables_and_purges") {
        return;
    }
    let started = Instant::now();
    let deb = deb_package();
    let deb_bytes = std::fs::read(&deb).expect("the .deb");

    // Without systemd running (a chroot, an image build): installs and enables, starts nothing.
    let offline = Overlay::new("deb-offline");
    std::fs::write(offline.path("/root/sensor.deb"), &deb_bytes).expect("copy .deb");
    let run = run_without_systemd(&offline, &["dpkg", "-i", "/root/sensor.deb"]);
    assert!(
        run.ok(),
        "dpkg -i without systemd: {}\n{}",
        run.stdout,
        run.stderr
    );
    assert!(
        run.stderr.contains("systemd is not running"),
        "{}",
        run.stderr
    );
    let wants = offline.path("/etc/systemd/system/multi-user.target.wants/sensor.service");
    assert!(wants.is_symlink(), "enabled for the next boot");
    assert_eq!(mode(&offline.path("/etc/sensor/identity.key")), 0o600);
    drop(offline);

    let c = Container::boot("deb");
    c.write("/root/sensor.deb", &deb_bytes, 0o644);
    c.sh_ok("DEBIAN_FRONTEND=noninteractive dpkg -i /root/sensor.deb");
    assert_eq!(c.sh_ok("systemctl is-enabled sensor").trim(), "enabled");
    wait_for(
        "the packaged service to be active",
        Duration::from_secs(30),
        || {
            let state = c.sh("systemctl is-active sensor").stdout;
            if state.trim() == "active" {
                Ok(())
            } else {
                Err(state)
            }
        },
    );
    assert_eq!(attached(&c), OURS);
    assert!(
        c.sh_ok("cat /lib/systemd/system/sensor.service")
            .contains("\nExecStart=/usr/bin/sensor run --config /etc/sensor/sensor.toml\n")
    );
    assert_eq!(c.sh_ok(&format!("cat {CONFIG}")), DEFAULT_CONFIG);
    assert!(
        c.sh_ok("dpkg-query -W -f='${Conffiles}' sensor")
            .contains(CONFIG),
        "the default config is a conffile"
    );
    assert_eq!(
        c.sh_ok("stat -c '%a %U' /usr/bin/sensor /etc/sensor/identity.key /var/lib/sensor"),
        "755 root\n600 root\n700 root\n"
    );
    let (client, received) = get(&c, "http://127.0.0.1/");
    assert_eq!(counted(&c, &client)["bytes_out"].as_u64(), Some(received));

    // The source installer leaves a packaged sensor alone.
    for cmd in ["sensor install --now", "sensor uninstall"] {
        let r = c.sh(cmd);
        assert!(!r.ok() && r.stderr.contains("apt"), "`{cmd}`: {}", r.stderr);
    }

    // An edited conffile survives reinstalling.
    c.sh_ok(&format!(
        "sed -i 's/^poll_interval_ms = .*/poll_interval_ms = 700/' {CONFIG}"
    ));
    c.sh_ok("DEBIAN_FRONTEND=noninteractive dpkg -i --force-confold /root/sensor.deb");
    assert!(
        c.sh_ok(&format!("cat {CONFIG}"))
            .contains("poll_interval_ms = 700")
    );
    wait_for(
        "the service after reinstall",
        Duration::from_secs(30),
        || {
            let state = c.sh("systemctl is-active sensor").stdout;
            if state.trim() == "active" {
                Ok(())
            } else {
                Err(state)
            }
        },
    );

    // Remove: stopped and detached, configuration kept. Purge: nothing left.
    c.sh_ok("dpkg -r sensor");
    assert_eq!(attached(&c), Vec::<String>::new());
    assert!(!c.bpffs.join("sensor").exists(), "pin directory removed");
    c.sh_ok("test ! -e /usr/bin/sensor && test ! -e /lib/systemd/system/sensor.service");
    c.sh_ok("test -f /etc/sensor/sensor.toml && test -f /etc/sensor/identity.key");
    c.sh_ok("dpkg -P sensor");
    let left = c.sh_ok(
        "find / -xdev -name '*sensor*' -not -path /root/sensor.deb; \
         systemctl list-units --all --no-legend 'sensor*'",
    );
    assert_eq!(left.trim(), "", "left behind: {left}");
    assert_eq!(files_under(&c.bpffs), Vec::<String>::new());
    eprintln!("package test took {:.1?}", started.elapsed());
}

/// The collector as the packaged unit runs it: no root, no capability, key and tokens handed
/// over as systemd credentials; the agent installed beside it ships to it, and the fleet view
/// counts the container's traffic exactly.
#[test]
fn collector_runs_unprivileged_under_systemd_and_receives_the_agent() {
    if !privileged("collector_runs_unprivileged_under_systemd_and_receives_the_agent") {
        return;
    }
    let certs_dir = TempDir::new("collector-certs");
    let certs = sensor_tests::siem::make_certs(&certs_dir.path);
    let read = |p: &Path| std::fs::read(p).expect("cert file");
    let c = Container::boot("collector");
    let bin = std::fs::read(sensor_bin()).expect("sensor binary");
    c.write("/usr/bin/sensor", &bin, 0o755);
    c.write(
        "/etc/systemd/system/sensor-collector.service",
        include_bytes!("../../packaging/sensor-collector.service"),
        0o644,
    );
    c.write(
        "/etc/sensor/collector.toml",
        include_bytes!("../../packaging/collector.toml"),
        0o644,
    );
    c.write("/etc/sensor/collector/cert.pem", &read(&certs.cert), 0o644);
    c.write("/etc/sensor/collector/key.pem", &read(&certs.key), 0o600);
    let agent_token = "container-agent-token-0123456789";
    let reader_token = "container-reader-token-0123456789";
    c.write(
        "/etc/sensor/collector/tokens",
        format!("agent container {agent_token}\nreader soc {reader_token}\n").as_bytes(),
        0o600,
    );
    c.write("/root/reader.token", reader_token.as_bytes(), 0o600);
    c.write("/etc/sensor/collector-ca.pem", &read(&certs.ca), 0o644);
    c.write("/etc/sensor/ship.token", agent_token.as_bytes(), 0o600);
    c.sh_ok("systemctl daemon-reload && systemctl start sensor-collector");
    assert_eq!(
        c.sh_ok("systemctl is-active sensor-collector").trim(),
        "active"
    );
    c.sh_ok("systemd-analyze verify /etc/systemd/system/sensor-collector.service");
    let report = c.sh_ok("systemd-analyze security --no-pager sensor-collector.service");
    let score = exposure(&report);
    eprintln!("systemd-analyze security sensor-collector.service: exposure {score}");
    assert!(score <= EXPOSURE_TARGET, "{report}");
    // Not root, and no capability at all.
    let status = c.sh_ok(
        "grep -E '^(Uid|CapEff|CapBnd|CapAmb)' \
         /proc/$(systemctl show -p MainPID --value sensor-collector)/status",
    );
    let fields: Vec<&str> = status.split_whitespace().collect();
    assert_eq!(fields[0], "Uid:");
    assert_ne!(
        fields[1], "0",
        "the collector must not run as root: {status}"
    );
    for cap in ["CapEff:", "CapBnd:", "CapAmb:"] {
        let at = fields.iter().position(|f| *f == cap).expect("cap line");
        assert_eq!(fields[at + 1], "0000000000000000", "{status}");
    }

    // The agent, installed from source, shipping to the collector on this host.
    c.sh_ok("/usr/bin/sensor install --enable --now");
    let config = config_with(&[
        ("url", "\"https://127.0.0.1:9443/v1/ingest\""),
        ("token_file", "\"/etc/sensor/ship.token\""),
        ("ca_file", "\"/etc/sensor/collector-ca.pem\""),
        ("agent_name", "\"container\""),
    ]);
    c.write(CONFIG, config.as_bytes(), 0o644);
    c.sh_ok("systemctl restart sensor");
    let (client, received) = get(&c, "http://127.0.0.1/");
    counted(&c, &client);
    let fleet = "sensor clients --json --collector https://127.0.0.1:9443 \
                 --token-file /root/reader.token --ca-file /etc/sensor/collector-ca.pem";
    wait_for(
        "the container's request in the collector's fleet view",
        Duration::from_secs(40),
        || {
            let rows = json(&c, fleet);
            let row = rows
                .as_array()
                .and_then(|a| a.iter().find(|r| r["client"] == "127.0.0.1"))
                .ok_or_else(|| rows.to_string())?;
            let seen = (row["requests"].as_u64(), row["bytes_out"].as_u64());
            if seen == (Some(requests_from_localhost(&c)), Some(received)) {
                Ok(())
            } else {
                Err(format!("{seen:?}, want (1, {received}): {row}"))
            }
        },
    );
    let journal = c.sh_ok("journalctl -u sensor-collector.service --no-pager -o cat");
    assert!(
        journal.contains("collector listening on https://0.0.0.0:9443"),
        "{journal}"
    );
    c.sh_ok("systemctl stop sensor-collector");
    assert_eq!(
        c.sh("systemctl is-active sensor-collector").stdout.trim(),
        "inactive"
    );
}
