//! Collector configuration: an embedded default, overridden by a TOML file; errors name the
//! file, line and key like the agent's.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{Clients, ConfigError, Detect, Invalid, check, from_toml, in_table};

pub const DEFAULT_COLLECTOR_CONFIG: &str = include_str!("../collector-default.toml");

/// Where the packaged unit (packaging/sensor-collector.service) hands the service its
/// certificate, key and tokens (systemd credentials).
#[cfg(test)]
pub const CREDENTIALS: &str = "/run/credentials/sensor-collector.service";

/// The configuration the Debian package installs as /etc/sensor/collector.toml: the defaults,
/// reading the certificate, key and tokens from the unit's credentials.
#[cfg(test)]
pub fn packaged_config() -> String {
    DEFAULT_COLLECTOR_CONFIG
        .replacen(
            "tls_cert_file = \"/etc/sensor/collector/cert.pem\"",
            &format!("tls_cert_file = \"{CREDENTIALS}/cert.pem\""),
            1,
        )
        .replacen(
            "tls_key_file = \"/etc/sensor/collector/key.pem\"",
            &format!("tls_key_file = \"{CREDENTIALS}/key.pem\""),
            1,
        )
        .replacen(
            "tokens_file = \"/etc/sensor/collector/tokens\"",
            &format!("tokens_file = \"{CREDENTIALS}/tokens\""),
            1,
        )
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    #[serde(default)]
    pub listen: Listen,
    #[serde(default)]
    pub state: State,
    #[serde(default)]
    pub nats: Nats,
    #[serde(default = "default_clients")]
    pub clients: Clients,
    #[serde(default = "default_detect")]
    pub detect: Detect,
    /// `[sketch]`: when the fleet names thin clients back to the agents.
    #[serde(default)]
    pub sketch: crate::ship::sketch::SketchConfig,
    #[serde(default)]
    pub outputs: Vec<crate::sinks::SinkConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    pub address: String,
    pub tls_cert_file: PathBuf,
    pub tls_key_file: PathBuf,
    pub client_ca_file: PathBuf,
    pub tokens_file: PathBuf,
    pub max_body_bytes: usize,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            address: "0.0.0.0:9443".into(),
            tls_cert_file: "/etc/sensor/collector/cert.pem".into(),
            tls_key_file: "/etc/sensor/collector/key.pem".into(),
            client_ca_file: PathBuf::new(),
            tokens_file: "/etc/sensor/collector/tokens".into(),
            max_body_bytes: 8 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct State {
    pub dir: PathBuf,
    pub snapshot_interval_secs: u64,
    pub received_log: PathBuf,
}

impl Default for State {
    fn default() -> Self {
        Self {
            dir: "/var/lib/sensor-collector".into(),
            snapshot_interval_secs: 10,
            received_log: PathBuf::new(),
        }
    }
}

/// `[nats]`: consuming agents' batches from a JetStream stream (off while `url` is empty).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Nats {
    pub url: String,
    pub credentials_file: PathBuf,
    pub ca_file: PathBuf,
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
    pub stream: String,
    pub subject_prefix: String,
    pub replicas: usize,
    pub max_age_secs: u64,
    pub consumer: String,
    /// Partitions of the records by client key: as many as the agents' `[ship] partitions`.
    pub partitions: u32,
    /// With partitions: this collector's name in the group (empty: the host name).
    pub instance: String,
    /// With partitions: how long a lease lives without renewal.
    pub lease_ttl_secs: u64,
}

impl Default for Nats {
    fn default() -> Self {
        Self {
            url: String::new(),
            credentials_file: PathBuf::new(),
            ca_file: PathBuf::new(),
            client_cert_file: PathBuf::new(),
            client_key_file: PathBuf::new(),
            stream: "SENSOR".into(),
            subject_prefix: "sensor.ship".into(),
            replicas: 1,
            max_age_secs: 7 * 86_400,
            consumer: "sensor-collector".into(),
            partitions: 1,
            instance: String::new(),
            lease_ttl_secs: 10,
        }
    }
}

impl Nats {
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        use crate::net::nats::{parse_servers, valid_name, valid_subject};
        if !self.enabled() {
            return Ok(());
        }
        parse_servers(&self.url).map_err(|e| ("url", e))?;
        if self.credentials_file.as_os_str().is_empty() {
            return Err((
                "credentials_file",
                "consuming from NATS needs a credentials_file (`<user>:<password>` or an nkey seed)"
                    .into(),
            ));
        }
        if self.client_cert_file.as_os_str().is_empty()
            != self.client_key_file.as_os_str().is_empty()
        {
            return Err((
                "client_cert_file",
                "client_cert_file and client_key_file go together".into(),
            ));
        }
        if !valid_name(&self.stream) {
            return Err(("stream", "1-64 letters, digits, - and _".into()));
        }
        if !valid_name(&self.consumer) {
            return Err(("consumer", "1-64 letters, digits, - and _".into()));
        }
        let max = crate::ship::partition::MAX_PARTITIONS;
        if !(1..=max).contains(&self.partitions) {
            return Err(("partitions", format!("must be 1..={max}")));
        }
        // Partition streams and consumers are named `<name>-p<N>` (N up to 63), also at
        // most 64 characters.
        if self.partitions > 1 && self.stream.len() > 60 {
            return Err((
                "stream",
                "at most 60 characters with partitions (streams are named <stream>-p<N>)".into(),
            ));
        }
        if self.partitions > 1 && self.consumer.len() > 60 {
            return Err((
                "consumer",
                "at most 60 characters with partitions (consumers are named <consumer>-p<N>)"
                    .into(),
            ));
        }
        if !self.instance.is_empty() && !valid_name(&self.instance) {
            return Err(("instance", "1-64 letters, digits, - and _".into()));
        }
        // The lease is renewed every fifth of it and given up 4 s before it can expire.
        if !(6..=600).contains(&self.lease_ttl_secs) {
            return Err(("lease_ttl_secs", "must be 6..=600".into()));
        }
        if !valid_subject(&self.subject_prefix) {
            return Err((
                "subject_prefix",
                "tokens of letters, digits, - and _ joined by dots (no wildcards)".into(),
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(("replicas", "must be 1..=5 (JetStream's bound)".into()));
        }
        crate::config::at_most_a_year("max_age_secs", self.max_age_secs)?;
        if self.max_age_secs < 60 {
            return Err(("max_age_secs", "must be at least 60".into()));
        }
        Ok(())
    }
}

fn default_clients() -> Clients {
    Clients {
        max_clients: 100_000,
        ..Clients::default()
    }
}

/// The fleet rules of the embedded collector config (used when `[detect]` is absent).
fn default_detect() -> Detect {
    #[derive(Deserialize)]
    struct Only {
        detect: Detect,
    }
    // The embedded config is checked by a unit test; an error here cannot reach users.
    toml::from_str::<Only>(DEFAULT_COLLECTOR_CONFIG)
        .map_or_else(|_| Detect::default(), |o| o.detect)
}

/// Metrics fleet rules cannot use: they need every request's timing or every source address,
/// which summaries do not carry.
pub const PER_HOST_METRICS: [&str; 2] = ["interval_cv", "distinct_addresses"];

impl CollectorConfig {
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let mut config: Self = from_toml(text, file)?;
        // A [detect] table without rules keeps the fleet rules (not the agent's defaults).
        let has_rules = toml::from_str::<toml::Table>(text).is_ok_and(|t| {
            t.get("detect")
                .and_then(toml::Value::as_table)
                .is_some_and(|d| d.contains_key("rules"))
        });
        if !has_rules {
            config.detect.rules = default_detect().rules;
        }
        check(
            text,
            file,
            config.validate(),
            &config.outputs,
            &config.state.dir,
            &[],
        )?;
        Ok(config)
    }

    pub fn embedded() -> Result<Self, ConfigError> {
        Self::parse(DEFAULT_COLLECTOR_CONFIG, "<embedded collector default>")
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        Ok(Self::parse(&text, &path.display().to_string())?)
    }

    fn validate(&self) -> Result<(), Invalid> {
        let l = &self.listen;
        if l.address.parse::<std::net::SocketAddr>().is_err() {
            return Err((
                "listen",
                "address",
                format!("`{}` is not an ip:port", l.address),
            ));
        }
        for (key, p) in [
            ("tls_cert_file", &l.tls_cert_file),
            ("tls_key_file", &l.tls_key_file),
            ("tokens_file", &l.tokens_file),
        ] {
            if p.as_os_str().is_empty() {
                return Err((
                    "listen",
                    key,
                    "must be set: the collector only serves HTTPS with tokens".into(),
                ));
            }
        }
        if !(1024..=256 * 1024 * 1024).contains(&l.max_body_bytes) {
            return Err((
                "listen",
                "max_body_bytes",
                "must be 1024..=268435456".into(),
            ));
        }
        crate::config::at_most_a_year("snapshot_interval_secs", self.state.snapshot_interval_secs)
            .map_err(in_table("state"))?;
        if self.state.snapshot_interval_secs == 0 {
            return Err((
                "state",
                "snapshot_interval_secs",
                "must be at least 1".into(),
            ));
        }
        self.nats.validate().map_err(in_table("nats"))?;
        self.clients.validate().map_err(in_table("clients"))?;
        self.detect.validate().map_err(in_table("detect"))?;
        for rule in &self.detect.rules {
            for w in &rule.when {
                if PER_HOST_METRICS.contains(&w.metric.as_str()) {
                    return Err((
                        "detect",
                        "metric",
                        format!(
                            "rule `{}`: `{}` is per host only (summaries do not carry it); \
                             use it in the agents' rules",
                            rule.id, w.metric
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_config_parses_with_fleet_rules() {
        let c = CollectorConfig::embedded().expect("embedded");
        assert_eq!(c.listen, Listen::default());
        assert_eq!(c.state, State::default());
        assert_eq!(c.nats, Nats::default());
        assert_eq!(c.clients.max_clients, 100_000);
        assert!(c.detect.rules.iter().all(|r| r.id.starts_with("fleet-")));
        assert_eq!(c.detect.rules.len(), 3);
        // Without [detect], the embedded fleet rules apply.
        let c = CollectorConfig::parse("[state]\ndir = \"/tmp/x\"\n", "c.toml").expect("min");
        assert_eq!(c.detect.rules.len(), 3);
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let e = CollectorConfig::parse("[listen]\naddress = \"nope\"\n", "c.toml").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (2, Some("listen.address")));
        assert!(e.to_string().starts_with("c.toml:2: listen.address"), "{e}");
        let e = CollectorConfig::parse("[listen]\nbogus = 1\n", "c.toml").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (2, Some("listen.bogus")));
        let nats = "[nats]\nurl = \"tls://127.0.0.1:4222\"\ncredentials_file = \"/c\"\n";
        assert!(CollectorConfig::parse(nats, "c.toml").is_ok());
        for (extra, key) in [
            ("replicas = 7\n", "nats.replicas"),
            ("consumer = \"a.b\"\n", "nats.consumer"),
            ("subject_prefix = \"s.*\"\n", "nats.subject_prefix"),
            ("max_age_secs = 1\n", "nats.max_age_secs"),
            ("client_key_file = \"/k\"\n", "nats.client_cert_file"),
            ("partitions = 0\n", "nats.partitions"),
            ("partitions = 65\n", "nats.partitions"),
            ("partitions = 4\ninstance = \"a.b\"\n", "nats.instance"),
            (
                "partitions = 4\nlease_ttl_secs = 5\n",
                "nats.lease_ttl_secs",
            ),
            (
                "partitions = 4\nstream = \"SSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSS\"\n",
                "nats.stream",
            ),
        ] {
            let e = CollectorConfig::parse(&format!("{nats}{extra}"), "c.toml").unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{extra}: {e}");
        }
        let e = CollectorConfig::parse("[nats]\nurl = \"nats://h:4222\"\n", "c.toml").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (2, Some("nats.url")), "{e}");
        let text = "[detect]\n\n[[detect.rules]]\nid = \"x\"\nname = \"x\"\nkeys = [\"address\"]\n\
                    when = [{ metric = \"interval_cv\", op = \"<\", value = 0.3 }]\n";
        let e = CollectorConfig::parse(text, "c.toml").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("detect.rules[0].when[0].metric"));
        assert!(e.message.contains("per host"), "{e}");
    }

    #[test]
    fn packaged_config_reads_the_units_credentials() {
        let packaged = include_str!("../../../packaging/collector.toml");
        assert_eq!(
            packaged,
            packaged_config(),
            "regenerate packaging/collector.toml"
        );
        let c = CollectorConfig::parse(packaged, "collector.toml").expect("valid");
        assert!(c.listen.tls_key_file.starts_with(CREDENTIALS));
        assert!(c.listen.tls_cert_file.starts_with(CREDENTIALS));
        assert!(c.listen.tokens_file.starts_with(CREDENTIALS));
    }

    #[test]
    fn documented_defaults_are_the_embedded_ones() {
        let docs = include_str!("../../../docs/collector.md");
        assert!(
            docs.contains(DEFAULT_COLLECTOR_CONFIG),
            "docs/collector.md must quote sensor/src/collector-default.toml verbatim"
        );
    }
}
