//! `sensor status`: is the agent running, and how is it doing (from the API's `/v1/health`).

use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::{
    agent::api,
    cli::StatusArgs,
    stdout::{outln, print_out},
};

/// Exits non-zero (through the error) when the agent cannot be reached.
pub fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let body = match api::get(&args.socket, "/v1/health") {
        Ok(body) => body,
        Err(e) => {
            if args.json {
                let down = serde_json::json!({
                    "running": false,
                    "socket": args.socket.display().to_string(),
                    "error": format!("{e:#}"),
                });
                outln!("{down}")?;
            } else {
                outln!("sensor: not running ({})", args.socket.display())?;
            }
            return Err(e);
        }
    };
    let mut health: Value = serde_json::from_str(&body)?;
    let uptime = uptime(&health, SystemTime::now());
    if args.json {
        if let Some(obj) = health.as_object_mut() {
            obj.insert("running".into(), true.into());
            obj.insert("socket".into(), args.socket.display().to_string().into());
            obj.insert("uptime_secs".into(), uptime.map(|d| d.as_secs()).into());
        }
        outln!("{health}")
    } else {
        print_out(&render(&health, &args.socket.display().to_string(), uptime))
    }
}

fn uptime(health: &Value, now: SystemTime) -> Option<Duration> {
    let started = humantime::parse_rfc3339_weak(health["started"].as_str()?).ok()?;
    now.duration_since(started).ok()
}

/// The human-readable report.
pub fn render(h: &Value, socket: &str, uptime: Option<Duration>) -> String {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let ports: Vec<String> = h["ports"]
        .as_array()
        .map(|a| a.iter().map(|p| p.to_string()).collect())
        .unwrap_or_default();
    let loss: Vec<String> = h["loss"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k} {}", n(v))).collect())
        .unwrap_or_default();
    let c = &h["clients"];
    let uptime = uptime.map_or_else(
        || "unknown".to_owned(),
        |d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string(),
    );
    format!(
        "sensor: running ({socket})\n\
         \x20 uptime:       {uptime} (since {started})\n\
         \x20 cgroup:       {cgroup}\n\
         \x20 ports:        {ports}\n\
         \x20 live read:    {live_read} ({live_read_reason})\n\
         \x20 connections:  {live} live, {closed} closed\n\
         \x20 clients:      {addrs} addresses, {groups} groups (max {max}); folded {fa} addresses\n\
         \x20 loss:         {loss}\n",
        started = h["started"].as_str().unwrap_or("?"),
        cgroup = h["cgroup"].as_str().unwrap_or("?"),
        ports = ports.join(", "),
        live_read = h["live_read"].as_str().unwrap_or("?"),
        live_read_reason = h["live_read_reason"].as_str().unwrap_or("?"),
        live = n(&h["live_connections"]),
        closed = n(&h["closed_connections_total"]),
        addrs = n(&c["tracked_addresses"]),
        groups = n(&c["tracked_groups"]),
        max = n(&c["max_clients"]),
        fa = n(&c["folded_addresses"]),
        loss = if loss.is_empty() {
            "-".to_owned()
        } else {
            loss.join(", ")
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_shows_attach_point_ports_counts_and_loss() {
        let h = serde_json::json!({
            "status": "ok",
            "started": "2026-01-01T00:00:00.000Z",
            "cgroup": "/sys/fs/cgroup",
            "ports": [80, 8000],
            "live_read": "map",
            "live_read_reason": "auto: the kernel refused the iterator",
            "live_connections": 3,
            "closed_connections_total": 12,
            "loss": {"conn_map_full": 0, "ringbuf_full": 2},
            "clients": {"tracked_addresses": 5, "tracked_groups": 2, "max_clients": 10000,
                        "folded_addresses": 0},
        });
        let now = humantime::parse_rfc3339("2026-01-01T01:02:03Z").unwrap();
        let up = uptime(&h, now);
        assert_eq!(up, Some(Duration::from_secs(3723)));
        let text = render(&h, "/run/sensor/sensor.sock", up);
        assert!(
            text.starts_with("sensor: running (/run/sensor/sensor.sock)\n"),
            "{text}"
        );
        assert!(text.contains("uptime:       1h 2m 3s"), "{text}");
        assert!(text.contains("cgroup:       /sys/fs/cgroup\n"), "{text}");
        assert!(text.contains("ports:        80, 8000\n"), "{text}");
        assert!(
            text.contains("live read:    map (auto: the kernel refused the iterator)\n"),
            "{text}"
        );
        assert!(text.contains("3 live, 12 closed"), "{text}");
        assert!(text.contains("5 addresses, 2 groups (max 10000)"), "{text}");
        assert!(text.contains("conn_map_full 0, ringbuf_full 2"), "{text}");
    }
}
