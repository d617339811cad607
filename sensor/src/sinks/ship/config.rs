//! `[ship]`: where and how the agent ships to a collector (off while `url` is empty): over
//! HTTPS to `sensor collector`, or to a NATS JetStream stream the collectors consume.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ship::{MAX_CLIENTS_PER_SUMMARY, valid_name};

/// How records travel to the collectors.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// POST to the collector's `/v1/ingest` (`url` is https://...).
    #[default]
    Https,
    /// Publish to a JetStream stream (`url` lists tls://host:port servers).
    Nats,
}

/// `[ship]`: where and how the agent ships to a collector (off while `url` is empty).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ShipConfig {
    pub transport: Transport,
    pub url: String,
    pub token_file: PathBuf,
    /// NATS: `<user>:<password>` or an nkey user seed.
    pub credentials_file: PathBuf,
    /// NATS: the JetStream stream the subject belongs to (publishes elsewhere are refused).
    pub stream: String,
    /// NATS: records go to `<subject_prefix>.<agent name>`.
    pub subject_prefix: String,
    /// NATS: partitions of the records by client key (`crate::ship::partition`), as many as
    /// the collectors'; 1: unpartitioned.
    pub partitions: u32,
    pub ca_file: PathBuf,
    pub server_name: String,
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
    pub agent_name: String,
    pub top_clients: usize,
    /// Share (%) of the clients below `top_clients` still named in summaries, chosen by the
    /// identity secret ([`crate::ship::Sample`]); 0: none.
    pub sample_percent: u32,
    /// Sampled clients per key kind and period, at most.
    pub sample_max_clients: usize,
    pub batch_max_records: usize,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    pub retry_max_secs: u64,
    pub timeout_secs: u64,
}

impl Default for ShipConfig {
    fn default() -> Self {
        Self {
            transport: Transport::Https,
            url: String::new(),
            token_file: PathBuf::new(),
            credentials_file: PathBuf::new(),
            stream: "SENSOR".into(),
            subject_prefix: "sensor.ship".into(),
            partitions: 1,
            ca_file: PathBuf::new(),
            server_name: String::new(),
            client_cert_file: PathBuf::new(),
            client_key_file: PathBuf::new(),
            agent_name: String::new(),
            top_clients: 200,
            sample_percent: 10,
            sample_max_clients: 2000,
            batch_max_records: 100,
            spool_dir: PathBuf::new(),
            spool_max_bytes: 256 * 1024 * 1024,
            retry_max_secs: 30,
            timeout_secs: 10,
        }
    }
}

pub(super) fn opt_path(p: &Path) -> Option<&Path> {
    (!p.as_os_str().is_empty()).then_some(p)
}

impl ShipConfig {
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }

    /// Validation errors as (key, message).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !self.enabled() {
            return Ok(());
        }
        match self.transport {
            Transport::Https => {
                let url =
                    crate::net::client::parse_url(&self.url).map_err(|e| ("url", e.to_string()))?;
                if url.scheme() != "https" {
                    return Err((
                        "url",
                        "the collector URL must be https:// (tokens never travel in clear)".into(),
                    ));
                }
                if self.token_file.as_os_str().is_empty() {
                    return Err(("token_file", "shipping needs a token_file".into()));
                }
                if opt_path(&self.credentials_file).is_some() {
                    return Err((
                        "credentials_file",
                        "only for transport = \"nats\" (HTTPS uses token_file)".into(),
                    ));
                }
                if self.partitions != 1 {
                    return Err((
                        "partitions",
                        "only for transport = \"nats\" (one HTTPS collector takes everything)"
                            .into(),
                    ));
                }
            }
            Transport::Nats => crate::sinks::nats::config::validate(&self.nats_keys())?,
        }
        if opt_path(&self.client_cert_file).is_some() != opt_path(&self.client_key_file).is_some() {
            return Err((
                "client_cert_file",
                "client_cert_file and client_key_file go together".into(),
            ));
        }
        if !self.agent_name.is_empty() && !valid_name(&self.agent_name) {
            return Err((
                "agent_name",
                "names are 1-128 letters, digits, -, _ and .".into(),
            ));
        }
        if !(1..=MAX_CLIENTS_PER_SUMMARY / 4).contains(&self.top_clients) {
            return Err((
                "top_clients",
                format!("must be 1..={}", MAX_CLIENTS_PER_SUMMARY / 4),
            ));
        }
        if self.sample_percent > 100 {
            return Err(("sample_percent", "must be 0..=100".into()));
        }
        if self.top_clients + self.sample_max_clients > MAX_CLIENTS_PER_SUMMARY / 4 {
            return Err((
                "sample_max_clients",
                format!(
                    "top_clients + sample_max_clients must be at most {}",
                    MAX_CLIENTS_PER_SUMMARY / 4
                ),
            ));
        }
        if !(1..=1000).contains(&self.batch_max_records) {
            return Err(("batch_max_records", "must be 1..=1000".into()));
        }
        if self.spool_max_bytes < 4096 {
            return Err(("spool_max_bytes", "must be at least 4096".into()));
        }
        crate::sinks::configure::at_most_a_year("retry_max_secs", self.retry_max_secs)?;
        crate::sinks::configure::at_most_a_year("timeout_secs", self.timeout_secs)?;
        if self.retry_max_secs == 0 {
            return Err(("retry_max_secs", "must be at least 1".into()));
        }
        if self.timeout_secs == 0 {
            return Err(("timeout_secs", "must be at least 1".into()));
        }
        Ok(())
    }

    /// What the JetStream transport reads.
    pub fn nats_keys(&self) -> crate::sinks::nats::config::NatsKeys<'_> {
        crate::sinks::nats::config::NatsKeys {
            url: &self.url,
            credentials_file: &self.credentials_file,
            ca_file: &self.ca_file,
            client_cert_file: &self.client_cert_file,
            client_key_file: &self.client_key_file,
            token_file: &self.token_file,
            server_name: &self.server_name,
            stream: &self.stream,
            subject_prefix: &self.subject_prefix,
            partitions: self.partitions,
            batch_max_records: self.batch_max_records,
            timeout_secs: self.timeout_secs,
        }
    }

    pub fn spool_dir(&self, state_dir: &Path) -> PathBuf {
        opt_path(&self.spool_dir).map_or_else(
            || state_dir.join("spool").join("collector"),
            Path::to_path_buf,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation() {
        let ok = ShipConfig {
            url: "https://collector.example.net:9443/v1/ingest".into(),
            token_file: "/etc/sensor/ship.token".into(),
            ..ShipConfig::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        let plain = ShipConfig {
            url: "http://collector:9443/v1/ingest".into(),
            ..ok.clone()
        };
        assert_eq!(plain.validate().map_err(|e| e.0), Err("url"));
        let half = ShipConfig {
            client_cert_file: "/c.pem".into(),
            ..ok.clone()
        };
        assert_eq!(half.validate().map_err(|e| e.0), Err("client_cert_file"));
        assert!(ShipConfig::default().validate().is_ok());
    }

    #[test]
    fn nats_keys_are_checked() {
        let ok = ShipConfig {
            transport: Transport::Nats,
            url: "tls://nats-1.example.net:4222,tls://nats-2.example.net:4222".into(),
            credentials_file: "/etc/sensor/nats.creds".into(),
            ..ShipConfig::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        let key = |c: ShipConfig| c.validate().map_err(|e| e.0);
        for (c, k) in [
            (
                ShipConfig {
                    url: "nats://127.0.0.1:4222".into(),
                    ..ok.clone()
                },
                "url",
            ),
            (
                ShipConfig {
                    credentials_file: "".into(),
                    ..ok.clone()
                },
                "credentials_file",
            ),
            (
                ShipConfig {
                    token_file: "/t".into(),
                    ..ok.clone()
                },
                "token_file",
            ),
            (
                ShipConfig {
                    server_name: "x".into(),
                    ..ok.clone()
                },
                "server_name",
            ),
            (
                ShipConfig {
                    stream: "a.b".into(),
                    ..ok.clone()
                },
                "stream",
            ),
            (
                ShipConfig {
                    subject_prefix: "sensor.>".into(),
                    ..ok.clone()
                },
                "subject_prefix",
            ),
            (
                ShipConfig {
                    partitions: 0,
                    ..ok.clone()
                },
                "partitions",
            ),
            (
                ShipConfig {
                    partitions: 65,
                    ..ok.clone()
                },
                "partitions",
            ),
            (
                ShipConfig {
                    partitions: 2,
                    stream: "S".repeat(61),
                    ..ok.clone()
                },
                "stream",
            ),
        ] {
            assert_eq!(key(c.clone()), Err(k), "{c:?}");
        }
        // The HTTPS transport refuses the NATS credentials (one of the two is a mistake).
        let https = ShipConfig {
            url: "https://collector.example.net:9443/v1/ingest".into(),
            token_file: "/t".into(),
            credentials_file: "/c".into(),
            ..ShipConfig::default()
        };
        assert_eq!(key(https.clone()), Err("credentials_file"));
        let https = ShipConfig {
            credentials_file: "".into(),
            partitions: 4,
            ..https
        };
        assert_eq!(key(https), Err("partitions"));
        // Partitioned NATS, and the longest stream name that leaves room for `-p63`.
        let parts = ShipConfig {
            partitions: 64,
            stream: "S".repeat(60),
            ..ok.clone()
        };
        assert_eq!(parts.validate(), Ok(()));
    }
}
