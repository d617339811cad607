//! A terminal for the full-screen views' tests: tmux runs the program, keys are typed with
//! `send-keys` and the screen is read with `capture-pane`.

use std::{
    path::PathBuf,
    process::{Command, Output},
    time::Duration,
};

use crate::{TempDir, wait_for};

/// How long a screen may take to show what a test waits for.
pub const WAIT: Duration = Duration::from_secs(20);

/// A tmux server of the test's own (its socket in the test's temporary directory), killed on
/// drop.
pub struct Tmux {
    server: PathBuf,
    session: String,
    dir: TempDir,
}

impl Tmux {
    /// Runs `command` in a detached 200x50 session; its stderr and exit status go to files.
    pub fn start(name: &str, command: &str) -> Self {
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

    pub fn tmux(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.server)
            .args(args)
            .output()
            .expect("spawn tmux (is it installed? `cargo xtask setup`)")
    }

    pub fn screen(&self) -> Result<String, String> {
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

    pub fn send(&self, key: &str) {
        let out = self.tmux(&["send-keys", "-t", &self.session, key]);
        assert!(
            out.status.success(),
            "send-keys {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Types `text` as is (no key names).
    pub fn send_literal(&self, text: &str) {
        let out = self.tmux(&["send-keys", "-l", "-t", &self.session, text]);
        assert!(
            out.status.success(),
            "send-keys -l {text}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn alive(&self) -> bool {
        self.tmux(&["has-session", "-t", &self.session])
            .status
            .success()
    }

    pub fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path.join(name)).unwrap_or_default()
    }

    /// Waits until the screen satisfies `check`, which explains what it misses.
    pub fn wait_screen(&self, what: &str, check: impl Fn(&Screen) -> Result<(), String>) {
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
pub struct Screen {
    pub header: String,
    pub status: String,
    pub rows: Vec<Vec<String>>,
}

impl Screen {
    pub fn parse(text: &str) -> Self {
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

    pub fn first_client(&self) -> Option<&str> {
        self.rows
            .first()
            .and_then(|r| r.first())
            .map(String::as_str)
    }

    pub fn row(&self, client: &str) -> Option<&Vec<String>> {
        self.rows
            .iter()
            .find(|r| r.first().map(String::as_str) == Some(client))
    }

    /// The header names the sort column and the table starts with `client`.
    pub fn sorted(&self, field: &str, client: &str) -> Result<(), String> {
        if !self.header.contains(&format!("| sort {field} |")) {
            return Err(format!("header does not say `sort {field}`"));
        }
        match self.first_client() {
            Some(first) if first == client => Ok(()),
            other => Err(format!("first row {other:?}, want {client}")),
        }
    }
}
