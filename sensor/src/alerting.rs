//! Detection as the agent and the collector both run it: the detector's settings from
//! `[detect]`, the host name alerts carry, and the alert log. Kept below both so neither
//! imports the other.

use std::path::{Path, PathBuf};

use log::{info, warn};

use crate::{
    config,
    detect::{self, AlertEvent, EventKind, Mode},
};

/// Detection settings from the config (validated at load).
pub fn detect_settings(d: &config::Detect, host: String) -> anyhow::Result<detect::Settings> {
    let rules = d
        .rules
        .iter()
        .map(detect::Rule::from_config)
        .collect::<Result<Vec<_>, _>>()?;
    let allow_networks = d
        .allow_addresses
        .iter()
        .map(|a| a.parse())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(detect::Settings {
        rules,
        allow_networks,
        allow_identities: d.allow_identities.iter().cloned().collect(),
        resolve_after_ms: d.resolve_after_secs * 1000,
        suppress_ms: d.suppress_secs * 1000,
        baseline_min_minutes: d.baseline_min_minutes,
        host,
        signals: d.signals.clone(),
    })
}

/// The host name alerts and shipped summaries are attributed to.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// The alert log: `[detect] alerts_file`, else `alerts.jsonl` in the state directory.
pub fn alerts_path(d: &config::Detect, state_dir: &Path) -> PathBuf {
    if d.alerts_file.as_os_str().is_empty() {
        state_dir.join("alerts.jsonl")
    } else {
        d.alerts_file.clone()
    }
}

/// Logs alert changes and appends them to the JSON lines file.
pub fn record_alerts(path: &Path, events: &[AlertEvent]) {
    if events.is_empty() {
        return;
    }
    let mut lines = String::new();
    for e in events {
        let a = &e.alert;
        if e.event != EventKind::Update {
            let what = if a.mode == Mode::Log {
                "log-only match"
            } else {
                "alert"
            };
            info!(
                "{what} {} {}: {} {} {} ({}) [{}]",
                e.event, a.rule_id, a.key_kind, a.key, a.rule_name, a.severity, a.id
            );
        }
        if let Ok(line) = serde_json::to_string(e) {
            lines.push_str(&line);
            lines.push('\n');
        }
    }
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, lines.as_bytes()));
    if let Err(e) = written {
        warn!("cannot append alerts to {}: {e}", path.display());
    }
}
