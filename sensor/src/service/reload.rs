//! SIGHUP: re-read the configuration and work out what the running agent can apply.
//!
//! Which keys apply live is listed once, in `compare`: watched ports (the kernel's port map), the
//! poll and snapshot intervals, the closed-connection retention, the detection rules and
//! allow-lists, and the identity proxies and names. Everything else (cgroup, map sizes, socket,
//! directories, client bounds, metrics, the identity secret and head size, the detection
//! interval) takes a restart; the agent says so and keeps its current value.
//! Counters are never touched: the aggregator and the connection table stay as they are.

use std::fmt::Debug;

use log::{error, info, warn};

use crate::{
    cli::{RunArgs, effective_config},
    config::Config,
};

/// One configuration key whose value differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// `section.key`.
    pub key: &'static str,
    pub old: String,
    pub new: String,
    /// Applied without a restart.
    pub live: bool,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} -> {}", self.key, self.old, self.new)
    }
}

fn change<T: Debug + PartialEq>(
    out: &mut Vec<Change>,
    key: &'static str,
    old: &T,
    new: &T,
    live: bool,
) {
    if old != new {
        out.push(Change {
            key,
            old: format!("{old:?}"),
            new: format!("{new:?}"),
            live,
        });
    }
}

/// Every key that differs between the running and the new configuration.
pub fn diff(old: &Config, new: &Config) -> Vec<Change> {
    compare(old, new).0
}

/// The configuration the agent runs on after a reload: `running`, with the live keys of `new`.
pub fn apply_live(running: &Config, new: &Config) -> Config {
    compare(running, new).1
}

/// The one list of keys, live and restart-bound: every difference between `old` and `new`,
/// and `old` with the live keys taken from `new`.
fn compare(old: &Config, new: &Config) -> (Vec<Change>, Config) {
    let mut out = Vec::new();
    // `old` with each listed key taken from `new`, in turn: first the live ones (what the agent
    // runs on next), then the rest (to find keys listed nowhere).
    let mut listed = old.clone();
    macro_rules! keys {
        ($live:expr; $($section:ident . $key:ident),+ $(,)?) => {
            $(
                change(
                    &mut out,
                    concat!(stringify!($section), ".", stringify!($key)),
                    &old.$section.$key,
                    &new.$section.$key,
                    $live,
                );
                listed.$section.$key.clone_from(&new.$section.$key);
            )+
        };
    }
    keys!(true;
        capture.ports,
        capture.poll_interval_ms,
        state.snapshot_interval_secs,
        connections.closed_retention_secs,
        connections.closed_retention_max,
        detect.rules,
        detect.allow_addresses,
        detect.allow_identities,
        detect.resolve_after_secs,
        detect.suppress_secs,
        detect.baseline_min_minutes,
        detect.alerts_file,
        identity.trusted_proxies,
        identity.names,
    );
    let live = listed.clone();
    keys!(false;
        capture.cgroup,
        capture.max_connections,
        capture.ring_buffer_bytes,
        capture.request_ring_bytes,
        capture.live_slots,
        capture.live_read,
        api.socket,
        clients.max_clients,
        clients.group_prefix_v4,
        clients.group_prefix_v6,
        state.dir,
        state.bpf_pin_dir,
        metrics.listen,
        metrics.bearer_token_file,
        metrics.top_clients,
        identity.secret_file,
        identity.head_bytes,
        detect.interval_secs,
        detect.time_scale,
    );
    // A key added to Config but not listed above still shows up, as needing a restart.
    if listed != *new {
        out.push(Change {
            key: "(unlisted settings)",
            old: "(running)".into(),
            new: "(file)".into(),
            live: false,
        });
    }
    (out, live)
}

/// Handles SIGHUP: reads and validates the configuration (flags still override the file) and
/// logs every difference. Returns the configuration to run on when something can be applied
/// live; `None` when nothing changes (no file, an invalid file, or only restart-bound keys).
pub fn reread(args: &RunArgs, running: &Config) -> Option<Config> {
    let Some(path) = &args.config else {
        warn!("SIGHUP: the agent runs without --config; nothing to reload");
        return None;
    };
    let new = match effective_config(args) {
        Ok(c) => c,
        Err(e) => {
            error!(
                "reload of {} failed, still running on the previous configuration: {e:#}",
                path.display()
            );
            return None;
        }
    };
    let changes = diff(running, &new);
    if changes.is_empty() {
        info!("reloaded {}: no changes", path.display());
        return None;
    }
    for c in &changes {
        if c.live {
            info!("reload: applied {c}");
        } else {
            warn!(
                "reload: {c} needs a restart (systemctl restart sensor); keeping {}",
                c.old
            );
        }
    }
    let live = changes.iter().filter(|c| c.live).count();
    info!(
        "reloaded {}: {live} change(s) applied, {} waiting for a restart",
        path.display(),
        changes.len() - live
    );
    (live > 0).then(|| apply_live(running, &new))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text, "t.toml").unwrap()
    }

    #[test]
    fn identical_configs_have_no_changes() {
        let c = parse("");
        assert!(diff(&c, &c.clone()).is_empty());
    }

    #[test]
    fn live_and_restart_bound_keys_are_told_apart() {
        let old = parse("[capture]\nports = [80]\n");
        let new = parse(
            "[capture]\nports = [80, 8081]\ncgroup = \"system.slice\"\npoll_interval_ms = 250\n\
             max_connections = 10\n[connections]\nclosed_retention_secs = 60\n\
             [state]\nsnapshot_interval_secs = 2\n[api]\nsocket = \"/run/x.sock\"\n",
        );
        let changes = diff(&old, &new);
        let live: Vec<&str> = changes.iter().filter(|c| c.live).map(|c| c.key).collect();
        let restart: Vec<&str> = changes.iter().filter(|c| !c.live).map(|c| c.key).collect();
        assert_eq!(
            live,
            [
                "capture.ports",
                "capture.poll_interval_ms",
                "state.snapshot_interval_secs",
                "connections.closed_retention_secs"
            ]
        );
        assert_eq!(
            restart,
            ["capture.cgroup", "capture.max_connections", "api.socket"]
        );
        assert_eq!(changes[0].to_string(), "capture.ports: [80] -> [80, 8081]");
    }

    #[test]
    fn applying_keeps_restart_bound_values() {
        let old = parse("[capture]\nports = [80]\n");
        let new = parse("[capture]\nports = [81]\nmax_connections = 10\n");
        let next = apply_live(&old, &new);
        assert_eq!(next.capture.ports, [81]);
        assert_eq!(next.capture.max_connections, old.capture.max_connections);
        // Against the configuration now running, the restart-bound change is still pending.
        let pending = diff(&next, &new);
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].key, "capture.max_connections");
        assert!(!pending[0].live);
    }
}
