//! `sensor top` in a real terminal: tmux runs it against the real agent watching a real nginx,
//! keys are typed with `send-keys` and the screen is read with `capture-pane`.

use std::process::Command;

use sensor_tests::{tmux::*, *};

const POLL_MS: u64 = 200;
/// Client A: many small requests. Client B: a few big downloads.
const A: &str = "127.0.0.2";
const B: &str = "127.0.0.3";
const A_REQUESTS: usize = 30;
const B_REQUESTS: usize = 2;

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
