//! Elastic Common Schema (ECS 8.11) documents, one JSON line per alert event, for Filebeat,
//! Fluent Bit or Vector to ship into Elasticsearch / OpenSearch / any ECS-aware SIEM.
//!
//! ECS fields where ECS has them (`@timestamp`, `event.*`, `rule.*`, `source.*`,
//! `destination.bytes`, `threat.*`, `host.name`, `observer.*`, `user.id`), and the whole
//! record under the custom `sensor` namespace (`sensor.alert`, `sensor.event_id` ...).

use serde_json::{Value, json};

use super::{Format, Record, cef};

pub const ECS_VERSION: &str = "8.11.0";

/// `event.severity` (0-100, as Elastic's detection rules use it).
pub fn severity(s: &str) -> u8 {
    match s {
        "low" => 21,
        "medium" => 47,
        "high" => 73,
        "critical" => 99,
        _ => 47,
    }
}

pub fn document(rec: &Record) -> Value {
    let a = &rec.alert;
    let (requests, bytes_in, bytes_out) = rec.counters();
    let event_type = match rec.event.as_str() {
        "open" => "start",
        "resolve" => "end",
        _ => "info",
    };
    let mut event = json!({
        "kind": "alert",
        "category": ["network", "intrusion_detection"],
        "type": [event_type, "indicator"],
        "action": format!("alert-{}", rec.event),
        "id": rec.id,
        "sequence": rec.seq,
        "severity": severity(&a.severity),
        "risk_score": f64::from(severity(&a.severity)),
        "start": a.first_seen,
        "created": rec.time_rfc3339(),
        "dataset": "sensor.alerts",
        "module": "sensor",
        "provider": "sensor",
        "reason": cef::summary(rec),
    });
    if let Some(end) = &a.resolved_at {
        event["end"] = json!(end);
    }
    let mut source = json!({ "bytes": bytes_in });
    if let Some(ip) = rec.source_ip() {
        source["ip"] = json!(ip.to_string());
        source["address"] = json!(ip.to_string());
    }
    let mut doc = json!({
        "@timestamp": rec.time_rfc3339(),
        "ecs": { "version": ECS_VERSION },
        "message": cef::summary(rec),
        "event": event,
        "rule": {
            "id": a.rule_id,
            "name": a.rule_name,
            "category": "model-extraction",
            "ruleset": "sensor",
        },
        "source": source,
        "destination": { "bytes": bytes_out },
        "network": { "bytes": bytes_in + bytes_out, "transport": "tcp", "protocol": "http" },
        "threat": {
            "framework": a.technique.framework,
            "technique": {
                "id": [a.technique.id],
                "name": [a.technique.name],
            },
        },
        "host": { "name": a.host, "hostname": a.host },
        "observer": {
            "hostname": a.host,
            "type": "sensor",
            "vendor": cef::VENDOR,
            "product": cef::PRODUCT,
            "version": env!("CARGO_PKG_VERSION"),
        },
        "sensor": {
            "event_id": rec.id,
            "event": rec.event,
            "sequence": rec.seq,
            "requests": requests,
            "alert": serde_json::to_value(a).unwrap_or(Value::Null),
        },
    });
    if a.key_kind == "identity" {
        doc["user"] = json!({ "id": a.key });
    }
    doc
}

pub struct Ecs;

impl Format for Ecs {
    fn format(&self, rec: &Record) -> String {
        document(rec).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::tests::record;

    #[test]
    fn ecs_fields() {
        let r = record("address", "10.1.2.3");
        let d: Value = serde_json::from_str(&Ecs.format(&r)).expect("json");
        assert_eq!(d["@timestamp"], r.time_rfc3339());
        assert_eq!(d["event"]["kind"], "alert");
        assert_eq!(d["event"]["id"], r.id);
        assert_eq!(d["event"]["severity"], 73);
        assert_eq!(d["rule"]["id"], "request-flood");
        assert_eq!(d["rule"]["name"], "Sustained request flood");
        assert_eq!(d["source"]["ip"], "10.1.2.3");
        assert_eq!(d["source"]["bytes"], 48_000);
        assert_eq!(d["destination"]["bytes"], 9_600_000);
        assert_eq!(d["threat"]["framework"], "MITRE ATLAS");
        assert_eq!(d["threat"]["technique"]["id"][0], "AML.T0024.002");
        assert_eq!(d["threat"]["technique"]["name"][0], "Extract AI Model");
        assert_eq!(d["host"]["name"], "gpu-host-1");
        assert_eq!(d["sensor"]["alert"]["id"], r.alert.id);
        assert_eq!(d["sensor"]["alert"]["evidence"]["requests_1m"], 240.0);
        assert!(d.get("user").is_none());
    }

    #[test]
    fn identity_keys_have_no_source_ip() {
        let d = document(&record("identity", "k-0011"));
        assert!(d["source"].get("ip").is_none());
        assert_eq!(d["user"]["id"], "k-0011");
    }
}
