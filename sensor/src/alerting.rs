//! Detection as the agent and the collector both run it: the detector's settings from
//! `[detect]`, the host name alerts carry, and the alert log. Kept below both so neither
//! imports the other.

use std::path::{Path, PathBuf};

use log::{info, warn};

use crate::{
    config,
    detect::{self, AlertEvent, EventKind, Mode},
    sinks::file::sink::RotatingFile,
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

/// The alert log is rotated past this size (`PATH.1` ... `PATH.4`, the oldest dropped), so a
/// flapping rule or a hostile peer's flood of alerts cannot fill the state directory's disk.
pub const ALERT_LOG_MAX_BYTES: u64 = 64 * 1024 * 1024;
pub const ALERT_LOG_KEEP: usize = 4;

/// Logs alert changes and appends them to the JSON lines file (rotated as the file sink's
/// files are). Returns how many events could not be written (counted by the caller).
pub fn record_alerts(path: &Path, events: &[AlertEvent]) -> u64 {
    record_alerts_bounded(path, events, ALERT_LOG_MAX_BYTES)
}

fn record_alerts_bounded(path: &Path, events: &[AlertEvent], max_bytes: u64) -> u64 {
    let mut file = RotatingFile::new(path, max_bytes, ALERT_LOG_KEEP);
    let mut lost = 0;
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
        let written = serde_json::to_string(e)
            .map_err(|e| e.to_string())
            .and_then(|line| file.write_line(&line).map_err(|e| e.to_string()));
        if let Err(err) = written {
            if lost == 0 {
                warn!("cannot append alerts to {}: {err}", path.display());
            }
            lost += 1;
        }
    }
    lost
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alert_log_rotates_and_keeps_every_event() {
        let dir = std::env::temp_dir().join(format!("sensor-alertlog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("alerts.jsonl");
        let event = AlertEvent {
            event: EventKind::Open,
            alert: crate::sinks::tests::alert("address", "10.1.2.3"),
        };
        let line = serde_json::to_string(&event).expect("json").len() as u64 + 1;
        // Three events per file: ten events fill the file and three rotated ones.
        for _ in 0..10 {
            assert_eq!(
                record_alerts_bounded(&path, std::slice::from_ref(&event), 3 * line),
                0
            );
        }
        let lines = |p: &Path| std::fs::read_to_string(p).map_or(0, |t| t.lines().count());
        let rotated = |n: usize| PathBuf::from(format!("{}.{n}", path.display()));
        assert_eq!(lines(&path), 1);
        assert_eq!(
            (lines(&rotated(1)), lines(&rotated(2)), lines(&rotated(3))),
            (3, 3, 3)
        );
        assert!(!rotated(5).exists());
        // An unwritable log loses events, and says how many.
        let blocked = dir.join("not-a-dir");
        std::fs::write(&blocked, "").expect("file");
        assert_eq!(
            record_alerts(&blocked.join("a.jsonl"), &[event.clone(), event]),
            2
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
