//! The events outputs deliver, and the [`Format`]s that render them.

pub mod cef;
pub mod ecs;
pub mod leef;
pub mod ocsf;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{
    detect::{Alert, AlertEvent, event_id},
    model::aggregate::Window,
};

/// One alert event as outputs carry it, and as the webhook posts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Idempotent: `<alert id>:<event>:<updates>`, the same at every output and every retry.
    pub id: String,
    /// Position in this output's stream (1, 2, ...): delivery order.
    pub seq: u64,
    /// open, update or resolve.
    pub event: String,
    pub alert: Alert,
}

impl Record {
    pub fn new(e: &AlertEvent) -> Self {
        Self {
            id: event_id(&e.alert, e.event.as_str()),
            seq: 0,
            event: e.event.as_str().to_owned(),
            alert: (*e.alert).clone(),
        }
    }

    /// When the event happened (unix ms): the resolution for a resolve, else the last match.
    pub fn time_ms(&self) -> u64 {
        if self.event == "resolve"
            && let Some(t) = self
                .alert
                .resolved_at
                .as_deref()
                .and_then(|s| humantime::parse_rfc3339_weak(s).ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        {
            return t.as_millis() as u64;
        }
        self.alert.last_seen_ms
    }

    pub fn time_rfc3339(&self) -> String {
        rfc3339_ms(self.time_ms())
    }

    /// The alert's key as an IP address, when it is one (address and forwarded keys).
    pub fn source_ip(&self) -> Option<std::net::IpAddr> {
        match self.alert.key_kind.as_ref() {
            "address" | "forwarded" => self.alert.key.parse().ok(),
            _ => None,
        }
    }

    /// (requests, bytes in, bytes out) of the alert's window (1h for totals-only rules).
    pub fn counters(&self) -> (u64, u64, u64) {
        let w = Window::parse(&self.alert.window).unwrap_or(Window::OneHour);
        let e = self.alert.evidence.window(w);
        let count = |v: f64| v.max(0.0) as u64;
        (count(e.requests), count(e.bytes_in), count(e.bytes_out))
    }
}

pub fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Renders one event in one format (a syslog MSG, a JSON line, an HTTP body).
pub trait Format: Send + Sync {
    fn format(&self, rec: &Record) -> String;
}

/// The whole record as JSON (syslog `message = "json"`, webhook bodies).
pub struct JsonFormat;

impl Format for JsonFormat {
    fn format(&self, rec: &Record) -> String {
        serde_json::to_string(rec).unwrap_or_default()
    }
}
