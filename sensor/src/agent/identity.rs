//! Identity of the client behind each HTTP/1.x request: the keyed hash of its API credential
//! (named, if configured) and the address a trusted proxy forwarded. Raw credentials and heads
//! are never stored, logged or shown: the head is parsed in place and dropped.

use std::{
    collections::BTreeMap,
    io::Read as _,
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use sensor_http::{Cidr, IdentityKey, forwarded_client, parse_head};
use serde::Serialize;

use crate::{config::Config, model::aggregate::ExchangeKeys};

const SECRET_FILE: &str = "identity.key";
const SECRET_BYTES: usize = 32;

/// Counts of request heads the agent parsed, for `/v1/health`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct HeadStats {
    pub parsed: u64,
    /// Not a well-formed HTTP/1.x head: rejected and counted, never fatal.
    pub malformed: u64,
    /// The copy ended inside the head; fields after the cut were not seen.
    pub truncated: u64,
    pub with_credential: u64,
    pub forwarded: u64,
}

pub struct Identities {
    key: IdentityKey,
    trusted: Vec<Cidr>,
    names: BTreeMap<String, String>,
    pub stats: HeadStats,
}

/// Where the secret lives: the configured file, or identity.key in the state directory.
pub fn secret_path(config: &Config) -> PathBuf {
    if config.identity.secret_file.as_os_str().is_empty() {
        config.state.dir.join(SECRET_FILE)
    } else {
        config.identity.secret_file.clone()
    }
}

/// Reads the secret; when `create` and it does not exist, generates one (mode 0600).
pub fn load_secret(path: &Path, create: bool) -> anyhow::Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(secret) if secret.len() >= 16 => {
            let mode = std::fs::metadata(path)?.permissions().mode();
            if mode & 0o077 != 0 {
                log::warn!(
                    "identity secret {} is readable by others (mode {mode:o}); chmod 600 it",
                    path.display()
                );
            }
            Ok(secret)
        }
        Ok(_) => anyhow::bail!(
            "identity secret {} is shorter than 16 bytes",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            let mut secret = vec![0u8; SECRET_BYTES];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut secret))
                .context("reading /dev/urandom")?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating identity secret {}", path.display()))?;
            std::io::Write::write_all(&mut file, &secret)?;
            log::info!("generated a new identity secret at {}", path.display());
            Ok(secret)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read identity secret {}", path.display())),
    }
}

impl Identities {
    pub fn new(secret: &[u8], config: &Config) -> Self {
        Self {
            key: IdentityKey::new(secret),
            trusted: config.identity.trusted(),
            names: config.identity.names.clone(),
            stats: HeadStats::default(),
        }
    }

    /// Applies reloaded trusted proxies and names (the secret stays).
    pub fn reconfigure(&mut self, config: &Config) {
        self.trusted = config.identity.trusted();
        self.names = config.identity.names.clone();
    }

    /// The identity shown for a credential: its configured name, else its keyed hash.
    pub fn identity_of(&self, credential: &[u8]) -> String {
        let id = self.key.id(credential);
        self.names.get(&id).cloned().unwrap_or(id)
    }

    /// Keys of a request from `peer` whose copied head is `head` (empty for non-HTTP turns).
    pub fn keys(&mut self, peer: IpAddr, head: &[u8]) -> ExchangeKeys {
        if head.is_empty() {
            return ExchangeKeys::default();
        }
        let parsed = match parse_head(head) {
            Ok(h) => h,
            Err(e) => {
                self.stats.malformed += 1;
                log::debug!("malformed request head from {peer}: {e}");
                return ExchangeKeys::default();
            }
        };
        self.stats.parsed += 1;
        if parsed.truncated {
            self.stats.truncated += 1;
        }
        let identity = parsed.credential().map(|c| self.identity_of(c));
        if identity.is_some() {
            self.stats.with_credential += 1;
        }
        let forwarded = forwarded_client(
            peer,
            parsed.x_forwarded_for,
            parsed.forwarded,
            &self.trusted,
        );
        if forwarded.is_some() {
            self.stats.forwarded += 1;
        }
        ExchangeKeys {
            identity,
            forwarded,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text, "t.toml").expect("config")
    }

    #[test]
    fn keys_from_heads() {
        let c = config("[identity]\ntrusted_proxies = [\"127.0.0.1\"]\n");
        let mut ids = Identities::new(b"0123456789abcdef", &c);
        let head = b"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer sk-live-abc\r\n\
                     X-Forwarded-For: 6.6.6.6, 127.0.0.9\r\n\r\n{\"messages\":[]}";
        let keys = ids.keys("127.0.0.1".parse().expect("ip"), head);
        let id = keys.identity.clone().expect("identity");
        assert!(id.starts_with("k-") && !id.contains("sk-live"));
        assert_eq!(keys.forwarded, Some("127.0.0.9".parse().expect("ip")));
        // Not from the trusted proxy: forwarding ignored, identity kept.
        let keys = ids.keys("127.0.0.50".parse().expect("ip"), head);
        assert_eq!(keys.forwarded, None);
        assert_eq!(keys.identity.as_deref(), Some(id.as_str()));
        assert_eq!(
            ids.keys("127.0.0.1".parse().expect("ip"), b"\x16\x03\x01junk\n"),
            ExchangeKeys::default()
        );
        assert_eq!(ids.stats.malformed, 1);
        assert_eq!(ids.stats.with_credential, 2);
    }

    #[test]
    fn names_replace_hashes() {
        let base = config("");
        let probe = Identities::new(b"0123456789abcdef", &base);
        let id = probe.identity_of(b"sk-batch");
        let c = config(&format!("[identity.names]\n\"{id}\" = \"batch-job\"\n"));
        let ids = Identities::new(b"0123456789abcdef", &c);
        assert_eq!(ids.identity_of(b"sk-batch"), "batch-job");
    }

    #[test]
    fn secret_is_generated_once_with_private_mode() {
        let dir = std::env::temp_dir().join(format!("sensor-secret-test-{}", std::process::id()));
        let path = dir.join("identity.key");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            load_secret(&path, false).is_err(),
            "not created unless asked"
        );
        let a = load_secret(&path, true).expect("generated");
        let b = load_secret(&path, true).expect("read back");
        assert_eq!(a, b);
        assert_eq!(a.len(), SECRET_BYTES);
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
