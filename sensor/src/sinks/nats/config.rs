//! The `[ship]` keys of the JetStream transport (`transport = "nats"`) and their validation.
//! `sinks::ship` hands them over as [`NatsKeys`] (this folder does not import it).

use std::path::Path;

use crate::{
    net::nats::{parse_servers, valid_name, valid_subject},
    ship::partition::MAX_PARTITIONS,
};

/// What the JetStream transport takes from `[ship]` (and the keys it must find empty).
#[derive(Debug, Clone, Copy)]
pub struct NatsKeys<'a> {
    pub url: &'a str,
    pub credentials_file: &'a Path,
    pub ca_file: &'a Path,
    pub client_cert_file: &'a Path,
    pub client_key_file: &'a Path,
    pub token_file: &'a Path,
    pub server_name: &'a str,
    pub stream: &'a str,
    pub subject_prefix: &'a str,
    /// As many as the collectors' (1: unpartitioned).
    pub partitions: u32,
    pub batch_max_records: usize,
    pub timeout_secs: u64,
}

/// Checks the keys `transport = "nats"` uses, as (key, message).
pub fn validate(c: &NatsKeys<'_>) -> Result<(), (&'static str, String)> {
    parse_servers(c.url).map_err(|e| ("url", e))?;
    if c.credentials_file.as_os_str().is_empty() {
        return Err((
            "credentials_file",
            "shipping over NATS needs a credentials_file (`<user>:<password>` or an nkey seed)"
                .into(),
        ));
    }
    if !c.token_file.as_os_str().is_empty() {
        return Err((
            "token_file",
            "only for transport = \"https\" (NATS uses credentials_file)".into(),
        ));
    }
    if !c.server_name.is_empty() {
        return Err((
            "server_name",
            "not supported with NATS: the certificate must name the host in url".into(),
        ));
    }
    if !(1..=MAX_PARTITIONS).contains(&c.partitions) {
        return Err(("partitions", format!("must be 1..={MAX_PARTITIONS}")));
    }
    if !valid_name(c.stream) {
        return Err(("stream", "1-64 letters, digits, - and _".into()));
    }
    // Partition streams are named `<stream>-p<N>` (N up to 63), also at most 64 characters.
    if c.partitions > 1 && c.stream.len() > 60 {
        return Err((
            "stream",
            "at most 60 characters with partitions (streams are named <stream>-p<N>)".into(),
        ));
    }
    if !valid_subject(c.subject_prefix) {
        return Err((
            "subject_prefix",
            "tokens of letters, digits, - and _ joined by dots (no wildcards)".into(),
        ));
    }
    Ok(())
}
