//! One-shot commands writing into a reader that has gone away (`sensor alerts | head -1`) end
//! as Unix tools do: the exit status they would have had anyway, and no panic ("failed printing
//! to stdout: Broken pipe").
//!
//! Needs no privileges: the agent is a stand-in serving canned replies on a unix socket, or
//! absent. Deterministic: the reader either closes before the command starts (every write
//! fails with EPIPE), or reads one byte of an output far larger than the pipe buffer and
//! closes (the rest cannot fit, so a later write fails).

use std::{
    ffi::OsString,
    io::{Read as _, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixListener},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use sensor_tests::{TempDir, sensor_bin};

/// Bytes of the large reply: sixteen times Linux's default pipe buffer (64 KiB).
const LARGE: usize = 1 << 20;

#[derive(Clone, Copy)]
enum Reader {
    /// The read end is closed before the command runs.
    ClosedBeforeWrite,
    /// One byte is read, then the read end is closed.
    ClosesAfterOneByte,
}

struct Ran {
    code: Option<i32>,
    stderr: String,
}

fn args(list: &[&str]) -> Vec<OsString> {
    list.iter().map(OsString::from).collect()
}

/// Runs `sensor <args>` with standard output going to `reader`.
fn run(args: &[OsString], stdin: Option<&str>, reader: Reader) -> Ran {
    let (read_end, write_end) = std::io::pipe().expect("pipe");
    let mut cmd = Command::new(sensor_bin());
    cmd.args(args)
        .stdout(write_end)
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut read_end = match reader {
        Reader::ClosedBeforeWrite => {
            drop(read_end);
            None
        }
        Reader::ClosesAfterOneByte => Some(read_end),
    };
    let mut child = cmd.spawn().expect("spawning sensor");
    // The command keeps its copy of the write end; only the child may hold one.
    drop(cmd);
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).expect("writing stdin");
    }
    if let Some(mut r) = read_end.take() {
        let mut one = [0u8; 1];
        r.read_exact(&mut one).expect("the command wrote nothing");
        drop(r);
    }
    let out = child.wait_with_output().expect("waiting for sensor");
    Ran {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The exit status with a reader that reads everything (the reference).
fn reference_code(args: &[OsString], stdin: Option<&str>) -> Option<i32> {
    let mut child = Command::new(sensor_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("spawning sensor");
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).expect("writing stdin");
    }
    child
        .wait_with_output()
        .expect("waiting for sensor")
        .status
        .code()
}

fn assert_clean(what: &[OsString], ran: &Ran, code: Option<i32>) {
    assert!(
        !ran.stderr.contains("panicked"),
        "{what:?} panicked:\n{}",
        ran.stderr
    );
    assert_eq!(ran.code, code, "{what:?}: exit status\n{}", ran.stderr);
}

/// A stand-in for the agent's API: answers every request with `body`, until dropped.
struct FakeAgent {
    socket: PathBuf,
    _dir: TempDir,
}

impl FakeAgent {
    fn serve(body: String) -> Self {
        let dir = TempDir::new("pipes-agent");
        let socket = dir.path.join("sensor.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                // The request head ends with an empty line; the client sends no body.
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read_exact(&mut byte).is_ok() {
                    head.push(byte[0]);
                }
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(reply.as_bytes());
            }
        });
        Self { socket, _dir: dir }
    }

    fn args(&self, list: &[&str]) -> Vec<OsString> {
        let mut a = args(list);
        a.push("--socket".into());
        a.push(self.socket.clone().into());
        a
    }
}

/// Views of the agent's API, larger than the pipe buffer, into a reader that reads one byte
/// and leaves: exit 0, no panic.
#[test]
fn large_views_into_a_reader_that_leaves_exit_zero() {
    // A JSON object: `status --json` parses it, the other `--json` views print it as it is.
    let agent = FakeAgent::serve(format!("{{\"pad\":\"{}\"}}", "x".repeat(LARGE)));
    for view in [
        &["conns", "--json"][..],
        &["clients", "--json"],
        &["alerts", "--json"],
        &["status", "--json"],
    ] {
        let a = agent.args(view);
        let ran = run(&a, None, Reader::ClosesAfterOneByte);
        assert_clean(&a, &ran, Some(0));
    }
}

/// `sensor top` without a terminal prints one plain snapshot (header, titles, rows) and ends;
/// a snapshot larger than the pipe buffer into a reader that reads one byte and leaves exits
/// 0 without a panic.
#[test]
fn top_without_a_terminal_prints_one_snapshot_and_survives_a_reader_that_leaves() {
    let row = |i: usize| {
        format!(
            "{{\"client\":\"10.0.{}.{}\",\"group\":\"10.0.{}.0/24\",\"identity\":null,\
             \"forwarded_for\":null,\"requests\":{i},\"bytes_in\":1,\"bytes_out\":2,\
             \"connections\":1,\"events_out\":0,\"distinct_addresses\":null,\
             \"open_connections\":0,\"peak_open_connections\":1,\
             \"first_seen\":\"2026-01-01T00:00:00.000Z\",\
             \"last_seen\":\"2026-01-01T00:00:01.000Z\",\"active_seconds\":1,\
             \"out_in_ratio\":2.0,\"interval_mean_ms\":null,\"interval_cv\":null,\
             \"windows\":{{}}}}",
            i / 250,
            i % 250,
            i / 250
        )
    };
    let rows: Vec<String> = (0..LARGE / 100).map(row).collect();
    let agent = FakeAgent::serve(format!("[{}]", rows.join(",")));
    let a = agent.args(&["top"]);
    // With a reader that reads everything: one snapshot, every row.
    let out = Command::new(sensor_bin())
        .args(&a)
        .stdin(Stdio::null())
        .output()
        .expect("sensor top");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    assert!(
        lines.next().is_some_and(|l| l.starts_with("sensor top | ")),
        "{text:.300}"
    );
    assert!(lines.next().is_some_and(|l| l.starts_with("CLIENT")));
    assert_eq!(lines.count(), rows.len());
    assert!(text.len() > LARGE / 16, "larger than the pipe buffer");
    let ran = run(&a, None, Reader::ClosesAfterOneByte);
    assert_clean(&a, &ran, Some(0));
}

/// Every view of the agent's API into a reader that closed before the command wrote: exit 0,
/// no panic.
#[test]
fn views_into_a_closed_reader_exit_zero() {
    // An empty list: the tables print their header (alerts: "no alerts").
    let agent = FakeAgent::serve("[]".into());
    for view in [
        &["conns"][..],
        &["conns", "--json"],
        &["clients"],
        &["clients", "--json"],
        &["clients", "--by", "group", "--window", "10m"],
        &["alerts"],
        &["alerts", "--json"],
        &["status"],
        &["status", "--json"],
        &["top"],
    ] {
        let a = agent.args(view);
        let ran = run(&a, None, Reader::ClosedBeforeWrite);
        assert_clean(&a, &ran, Some(0));
    }
}

/// Without an agent the views fail with an error (exit 1, "Error: cannot reach the agent"),
/// whether or not their reader is still there; `status` first prints "not running" into the
/// closed pipe. Never a panic.
#[test]
fn views_without_an_agent_fail_cleanly_into_a_closed_reader() {
    let dir = TempDir::new("pipes-noagent");
    let missing = dir.path.join("absent.sock");
    for view in [
        &["conns"][..],
        &["clients"],
        &["alerts"],
        &["status"],
        &["status", "--json"],
        &["top"],
    ] {
        let mut a = args(view);
        a.push("--socket".into());
        a.push(missing.clone().into());
        let ran = run(&a, None, Reader::ClosedBeforeWrite);
        assert_clean(&a, &ran, Some(1));
        assert!(
            ran.stderr.contains("Error:") && ran.stderr.contains("cannot reach the agent"),
            "{a:?}:\n{}",
            ran.stderr
        );
    }
}

fn write_file(path: &Path, text: &[u8], mode: u32) {
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Commands that need no agent, into a reader that closed before they wrote: the exit status
/// a reading reader gets (0; `doctor` 0 or 69 by what this machine allows), no panic.
#[test]
fn local_commands_into_a_closed_reader_keep_their_exit_status() {
    let dir = TempDir::new("pipes-local");
    let default_config =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../sensor/src/default-config.toml");
    let secret = dir.path.join("identity.key");
    write_file(&secret, &[7u8; 32], 0o600);
    let config = dir.path.join("sensor.toml");
    write_file(
        &config,
        format!(
            "[identity]\nsecret_file = {:?}\n",
            secret.display().to_string()
        )
        .as_bytes(),
        0o644,
    );
    let mut check = args(&["check-config"]);
    check.push(default_config.into());
    let mut identity = args(&["identity", "--config"]);
    identity.push(config.into());
    let cases: [(Vec<OsString>, Option<&str>, Option<i32>); 4] = [
        (check, None, Some(0)),
        (identity, Some("sk-pipe-test-key\n"), Some(0)),
        (args(&["bench-aggregate", "--keys", "100"]), None, Some(0)),
        (args(&["doctor", "--json"]), None, None),
    ];
    for (a, stdin, code) in cases {
        let code = code.or_else(|| {
            let c = reference_code(&a, stdin);
            assert!(matches!(c, Some(0 | 69)), "{a:?}: {c:?}");
            c
        });
        let ran = run(&a, stdin, Reader::ClosedBeforeWrite);
        assert_clean(&a, &ran, code);
    }
}
