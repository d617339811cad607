//! OCSF 1.5.0 Detection Finding (class 2004, category Findings) events, one JSON line each,
//! for OCSF-native lakes and SIEMs (Amazon Security Lake, Splunk, Sentinel ...).
//!
//! activity_id: open = 1 Create, update = 2 Update, resolve = 3 Close; type_uid = class_uid *
//! 100 + activity_id. severity_id: low 2, medium 3, high 4, critical 5. status_id: open 1 New,
//! update 2 In Progress, resolve 4 Resolved. Times are epoch milliseconds. The ATLAS technique
//! goes to `finding_info.attacks`; the whole alert to `unmapped`.

use serde_json::{Value, json};

use super::{Format, Record, cef};

pub const OCSF_VERSION: &str = "1.5.0";
pub const CLASS_UID: u32 = 2004;
pub const CATEGORY_UID: u32 = 2;

pub fn activity(event: &str) -> (u32, &'static str) {
    match event {
        "open" => (1, "Create"),
        "update" => (2, "Update"),
        "resolve" => (3, "Close"),
        _ => (99, "Other"),
    }
}

pub fn severity(s: &str) -> (u32, &'static str) {
    match s {
        "low" => (2, "Low"),
        "medium" => (3, "Medium"),
        "high" => (4, "High"),
        "critical" => (5, "Critical"),
        _ => (0, "Unknown"),
    }
}

pub fn status(event: &str) -> (u32, &'static str) {
    match event {
        "open" => (1, "New"),
        "update" => (2, "In Progress"),
        "resolve" => (4, "Resolved"),
        _ => (0, "Unknown"),
    }
}

pub fn finding(rec: &Record) -> Value {
    let a = &rec.alert;
    let (activity_id, activity_name) = activity(&rec.event);
    let (severity_id, severity_name) = severity(&a.severity);
    let (status_id, status_name) = status(&rec.event);
    let (requests, bytes_in, bytes_out) = rec.counters();
    let time = rec.time_ms();
    let mut evidence = json!({
        "name": a.key_kind,
        "uid": a.key,
        "data": {
            "key_kind": a.key_kind,
            "key": a.key,
            "window": a.window,
            "requests": requests,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "evidence": a.evidence,
            "conditions": a.conditions,
        },
    });
    let mut observables = Vec::new();
    if let Some(ip) = rec.source_ip() {
        evidence["src_endpoint"] = json!({ "ip": ip.to_string() });
        observables.push(json!({
            "name": "evidences[0].src_endpoint.ip",
            "type_id": 2,
            "type": "IP Address",
            "value": ip.to_string(),
        }));
    }
    if a.key_kind == "identity" {
        // An identity is a keyed hash of the API credential.
        evidence["user"] = json!({ "uid": a.key, "credential_uid": a.key });
        observables.push(json!({
            "name": "evidences[0].user.credential_uid",
            "type_id": 19,
            "type": "User Credential ID",
            "value": a.key,
        }));
    }
    let mut f = json!({
        "class_uid": CLASS_UID,
        "class_name": "Detection Finding",
        "category_uid": CATEGORY_UID,
        "category_name": "Findings",
        "activity_id": activity_id,
        "activity_name": activity_name,
        "type_uid": CLASS_UID * 100 + activity_id,
        "type_name": format!("Detection Finding: {activity_name}"),
        "severity_id": severity_id,
        "severity": severity_name,
        "status_id": status_id,
        "status": status_name,
        "time": time,
        "start_time": a.first_seen_ms,
        "end_time": a.last_seen_ms,
        "count": requests,
        "is_alert": a.mode == crate::detect::Mode::Alert,
        "message": cef::summary(rec),
        "finding_info": {
            "uid": a.id,
            "title": a.rule_name,
            "desc": cef::summary(rec),
            "types": ["Model Extraction"],
            "created_time": a.first_seen_ms,
            "first_seen_time": a.first_seen_ms,
            "last_seen_time": a.last_seen_ms,
            "modified_time": time,
            "analytic": {
                "uid": a.rule_id,
                "name": a.rule_name,
                "type_id": 1,
                "type": "Rule",
            },
            "attacks": [{
                "technique": { "uid": a.technique.id, "name": a.technique.name },
                "tactic": { "uid": "AML.TA0010", "name": "Exfiltration" },
            }],
            "product": { "name": cef::PRODUCT, "vendor_name": cef::VENDOR },
        },
        "metadata": {
            "version": OCSF_VERSION,
            "uid": rec.id,
            "sequence": rec.seq,
            "log_name": "alerts",
            "product": {
                "name": cef::PRODUCT,
                "vendor_name": cef::VENDOR,
                "version": env!("CARGO_PKG_VERSION"),
            },
        },
        "device": { "hostname": a.host, "name": a.host, "type_id": 1, "type": "Server" },
        "evidences": [evidence],
        "unmapped": { "sensor": { "event": rec.event, "alert": a } },
    });
    if !observables.is_empty() {
        f["observables"] = Value::Array(observables);
    }
    f
}

pub struct Ocsf;

impl Format for Ocsf {
    fn format(&self, rec: &Record) -> String {
        finding(rec).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::tests::record;

    #[test]
    fn detection_finding_fields() {
        let mut r = record("address", "10.1.2.3");
        let f: Value = serde_json::from_str(&Ocsf.format(&r)).expect("json");
        assert_eq!(f["class_uid"], 2004);
        assert_eq!(f["category_uid"], 2);
        assert_eq!(f["activity_id"], 1);
        assert_eq!(f["type_uid"], 200401);
        assert_eq!(f["severity_id"], 4);
        assert_eq!(f["status_id"], 1);
        assert_eq!(f["time"], 1_800_000_002_000u64);
        assert_eq!(f["finding_info"]["uid"], r.alert.id);
        assert_eq!(f["finding_info"]["analytic"]["uid"], "request-flood");
        assert_eq!(f["finding_info"]["created_time"], 1_800_000_000_000u64);
        assert_eq!(
            f["finding_info"]["attacks"][0]["technique"]["uid"],
            "AML.T0024.002"
        );
        assert_eq!(f["metadata"]["version"], "1.5.0");
        assert_eq!(f["metadata"]["uid"], r.id);
        assert_eq!(f["evidences"][0]["src_endpoint"]["ip"], "10.1.2.3");
        r.event = "resolve".into();
        r.alert.resolved_at = Some(crate::sinks::rfc3339_ms(1_800_000_100_000));
        let f = finding(&r);
        assert_eq!(
            (f["activity_id"].clone(), f["type_uid"].clone()),
            (json!(3), json!(200403))
        );
        assert_eq!(f["status_id"], 4);
        assert_eq!(f["time"], 1_800_000_100_000u64);
        r.event = "update".into();
        assert_eq!(finding(&r)["type_uid"], 200402);
    }
}
