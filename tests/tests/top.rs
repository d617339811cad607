//! `sensor top` in a real terminal: tmux runs it against the real agent watching a real nginx,
//! keys are typed with `send-keys` and the screen is read with `capture-pane`.

use std::{
    path::PathBuf,
    process::{Command, Output},
    time::Duration,
};

use sensor_tests::*;

const POLL_MS: u64 = 200;
const WAIT: Duration = Duration::from_secs(20);
/// Client A: many small requests. Client B: a few big downloads.
const A: &str = "127.0.0.2";
const B: &str = "127.0.0.3";
const A_REQUESTS: usize = 30;
const B_REQUESTS: usize = 2;

/// A tmux server of the test's own (its socket in the test's temporary directory), killed on
/// drop.
struct Tmux {
    server: PathBuf,
    session: String,
    dir: TempDir,
}

impl Tmux {
    /// Runs `command` in a detached 200x50 session; its stderr and exit status go to files.
    fn start(name: &str, command: &str) -> Self {
        let dir = TempDir::new("tmux");
        let server = dir.path.join("tmux.sock");
        let session = name.to_owned();
        let wrapped = format!(
            "{command} 2>'{d}/stderr'; echo $? >'{d}/status'",
            d = dir.path.display()
        );
        let tmux = Self {
            server,
            session,
            dir,
        };
        let out = tmux.tmux(&[
            "new-session",
            "-d",
            "-s",
            &tmux.session,
            "-x",
            "200",
            "-y",
            "50",
            &wrapped,
        ]);
        assert!(
            out.status.success(),
            "tmux new-session: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tmux
    }

    fn tmux(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.server)
            .args(args)
            .output()
            .expect("spawn tmux (is it installed? `cargo xtask setup`)")
    }

    fn screen(&self) -> Result<String, String> {
        let out = self.tmux(&["capture-pane", "-p", "-t", &self.session]);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "capture-pane: {}; program stderr: {}",
                String::from_utf8_lossy(&out.stderr).trim(),
                self.file("stderr")
            ))
        }
    }

    fn send(&self, key: &str) {
        let out = self.tmux(&["send-keys", "-t", &self.session, key]);
        assert!(
            out.status.success(),
            "send-keys {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Types `text` as is (no key names).
    fn send_literal(&self, text: &str) {
        let out = self.tmux(&["send-keys", "-l", "-t", &self.session, text]);
        assert!(
            out.status.success(),
            "send-keys -l {text}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn alive(&self) -> bool {
        self.tmux(&["has-session", "-t", &self.session])
            .status
            .success()
    }

    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path.join(name)).unwrap_or_default()
    }

    /// Waits until the screen satisfies `check`, which explains what it misses.
    fn wait_screen(&self, what: &str, check: impl Fn(&Screen) -> Result<(), String>) {
        wait_for(what, WAIT, || {
            let text = self.screen()?;
            let screen = Screen::parse(&text);
            check(&screen).map_err(|e| format!("{e}; screen:\n{text}"))
        });
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-session", "-t", &self.session]);
        let _ = self.tmux(&["kill-server"]);
    }
}

/// What `sensor top` shows: its header line, the status line under it (errors), and the
/// table's rows, split on whitespace.
struct Screen {
    header: String,
    status: String,
    rows: Vec<Vec<String>>,
}

impl Screen {
    fn parse(text: &str) -> Self {
        let lines: Vec<&str> = text.lines().collect();
        let header = lines.first().copied().unwrap_or_default().to_owned();
        let status = lines.get(1).copied().unwrap_or_default().to_owned();
        let rows = lines
            .iter()
            .skip_while(|l| !l.starts_with("CLIENT"))
            .skip(1)
            .take_while(|l| !l.trim().is_empty())
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .collect();
        Self {
            header,
            status,
            rows,
        }
    }

    fn first_client(&self) -> Option<&str> {
        self.rows
            .first()
            .and_then(|r| r.first())
            .map(String::as_str)
    }

    fn row(&self, client: &str) -> Option<&Vec<String>> {
        self.rows
            .iter()
            .find(|r| r.first().map(String::as_str) == Some(client))
    }

    /// The header names the sort column and the table starts with `client`.
    fn sorted(&self, field: &str, client: &str) -> Result<(), String> {
        if !self.header.contains(&format!("| sort {field} |")) {
            return Err(format!("header does not say `sort {field}`"));
        }
        match self.first_client() {
            Some(first) if first == client => Ok(()),
            other => Err(format!("first row {other:?}, want {client}")),
        }
    }
}

#[test]
fn top_shows_live_clients_and_follows_keys() {
    if !privileged("top_shows_live_clients_and_follows_keys") {
        return;
    }
    let cg = Cgroup::new("top");
    let port = free_port();
    let _nginx = Nginx::start(&cg, None, &[format!("127.0.0.1:{port}")]);
    let mut agent = Agent::start(&cg, &[port], POLL_MS);

    // A: many small requests on one keep-alive connection; B: two 2 MB downloads.
    let url = |path: &str| format!("http://127.0.0.1:{port}/{path}");
    let small: Vec<Vec<String>> = (0..A_REQUESTS)
        .map(|_| op(&["--interface", A, &url(SMALL.0)]))
        .collect();
    let big: Vec<Vec<String>> = (0..B_REQUESTS)
        .map(|_| op(&["--interface", B, &url(BIG.0)]))
        .collect();
    assert_eq!(curl(Command::new("curl"), &small).len(), A_REQUESTS);
    assert_eq!(curl(Command::new("curl"), &big).len(), B_REQUESTS);
    wait_for("the agent to count both clients", WAIT, || {
        let rows = agent.api("/v1/clients?sort=client");
        let requests = |ip: &str| {
            rows.as_array()
                .and_then(|rows| rows.iter().find(|r| r["client"] == ip))
                .and_then(|r| r["requests"].as_u64())
        };
        match (requests(A), requests(B)) {
            (Some(a), Some(b)) if a == A_REQUESTS as u64 && b == B_REQUESTS as u64 => Ok(()),
            other => Err(format!("requests (A, B) = {other:?}; rows: {rows}")),
        }
    });

    let command = format!(
        "'{}' top --socket '{}' --interval-ms {POLL_MS}",
        sensor_bin().display(),
        agent.socket.display()
    );
    let tmux = Tmux::start("top", &command);

    // Both clients, with their request counts; the default sort is bytes out.
    tmux.wait_screen("rows for both clients", |s| {
        for (ip, requests) in [(A, A_REQUESTS), (B, B_REQUESTS)] {
            let row = s.row(ip).ok_or(format!("no row for {ip}"))?;
            if row.get(2) != Some(&requests.to_string()) {
                return Err(format!("{ip}: {row:?}, want {requests} requests"));
            }
        }
        if !s.header.contains(&agent.socket.display().to_string()) {
            return Err("header does not name the agent's socket".into());
        }
        s.sorted("bytes_out", B)
    });

    tmux.send("r");
    tmux.wait_screen("`r`: A (most requests) first", |s| s.sorted("requests", A));

    tmux.send("o");
    tmux.wait_screen("`o`: B (most bytes out) first", |s| {
        s.sorted("bytes_out", B)
    });

    tmux.send("/");
    tmux.send_literal(A);
    tmux.send("Enter");
    tmux.wait_screen("`/` filter: only A", |s| {
        if !s.header.contains(&format!("| filter {A} |")) {
            return Err(format!("header does not say `filter {A}`"));
        }
        match s.rows.as_slice() {
            [row] if row.first().map(String::as_str) == Some(A) => Ok(()),
            other => Err(format!("rows {other:?}")),
        }
    });
    tmux.send("/");
    tmux.send("Escape");
    tmux.wait_screen("Esc clears the filter", |s| {
        if s.header.contains("| filter - |") && s.rows.len() == 2 {
            Ok(())
        } else {
            Err("filter still applied".into())
        }
    });

    // The traffic is seconds old: the last minute holds all of it.
    tmux.send("w");
    tmux.wait_screen("`w`: the 1m window", |s| {
        if !s.header.contains("| window 1m |") {
            return Err("header does not say `window 1m`".into());
        }
        let row = s.row(A).ok_or(format!("no row for {A}"))?;
        if row.get(2) == Some(&A_REQUESTS.to_string()) {
            Ok(())
        } else {
            Err(format!("{A}: {row:?}"))
        }
    });

    tmux.send("g");
    tmux.wait_screen("`g`: one row for the group 127.0.0.0/24", |s| {
        if !s.header.contains("| by group |") {
            return Err("header does not say `by group`".into());
        }
        match s.rows.as_slice() {
            [row] if row.first().map(String::as_str) == Some("127.0.0.0/24") => {
                let total = (A_REQUESTS + B_REQUESTS).to_string();
                if row.get(2) == Some(&total) {
                    Ok(())
                } else {
                    Err(format!("group row {row:?}, want {total} requests"))
                }
            }
            other => Err(format!("rows {other:?}")),
        }
    });

    // An agent that goes away is an error on screen, not a crash; it clears once it is back.
    agent.kill9();
    tmux.wait_screen("the error of an unreachable agent", |s| {
        if s.status.contains("agent unreachable") {
            Ok(())
        } else {
            Err("no error shown".into())
        }
    });
    agent.restart();
    tmux.wait_screen("the error to clear after the agent's restart", |s| {
        if s.status.trim().is_empty() {
            Ok(())
        } else {
            Err("error still shown".into())
        }
    });

    tmux.send("q");
    wait_for("`q` to end the session", WAIT, || {
        if tmux.alive() {
            Err(format!("still running; screen:\n{}", tmux.screen()?))
        } else {
            Ok(())
        }
    });
    assert_eq!(
        tmux.file("status").trim(),
        "0",
        "sensor top exit status; stderr: {}",
        tmux.file("stderr")
    );
}
