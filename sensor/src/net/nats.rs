//! NATS connections for the JetStream transport of the ship format (agents publish, the
//! collector consumes): server lists, credentials files, TLS with the crate's own rustls
//! configuration, and the server's last error. A publish the server refuses (permissions) is
//! only reported as an asynchronous `-ERR`, so it is kept here for the sink to show beside
//! the acknowledgement that never came.

use std::{
    fmt,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::{ConnectOptions, Event, ServerAddr};
use log::{info, warn};

use super::{
    NetError, secrets,
    tls::{self, ClientIdentity},
};

/// Parses `tls://host:port[, tls://host:port ...]` (any servers of a cluster; the client
/// learns the others from them). TLS only: credentials never travel in clear.
pub fn parse_servers(list: &str) -> Result<Vec<ServerAddr>, String> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let addr: ServerAddr = part.parse().map_err(|e| format!("`{part}`: {e}"))?;
        if addr.scheme() != "tls" {
            return Err(format!(
                "`{part}`: NATS servers must be tls://host:port (credentials never travel in clear)"
            ));
        }
        if addr.has_user_pass() {
            return Err(format!(
                "`{part}`: credentials go in credentials_file, not in the URL"
            ));
        }
        out.push(addr);
    }
    if out.is_empty() {
        return Err("at least one tls://host:port".into());
    }
    Ok(out)
}

/// Tokens of letters, digits, `-` and `_`, joined by dots: a literal subject (no wildcards,
/// no spaces), at most 200 characters.
pub fn valid_subject(s: &str) -> bool {
    s.len() <= 200
        && s.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Stream and consumer names: 1-64 letters, digits, `-` and `_` (JetStream puts them in API
/// subjects, so no dots, wildcards or spaces).
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// How a client authenticates: a NATS user and password, an nkey (the seed signs the
/// server's nonce; the server holds only the public key), or a `.creds` file of
/// decentralized auth (a user JWT signed by its account, and the user's seed).
#[derive(Clone)]
pub enum Credentials {
    UserPassword { user: String, password: String },
    Nkey { seed: String },
    Creds { creds: String, public: String },
}

const JWT_BEGIN: &str = "-----BEGIN NATS USER JWT-----";
const SEED_BEGIN: &str = "-----BEGIN USER NKEY SEED-----";

impl fmt::Debug for Credentials {
    /// Never the password or the seed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UserPassword { user, .. } => write!(f, "user `{user}`"),
            Self::Nkey { seed } => match nkeys::KeyPair::from_seed(seed) {
                Ok(kp) => write!(f, "nkey {}", kp.public_key()),
                Err(_) => f.write_str("nkey"),
            },
            Self::Creds { public, .. } => write!(f, "user JWT of {public}"),
        }
    }
}

impl Credentials {
    /// Reads a credentials file: an nkey user seed (`SU...`, as `nk -gen user` writes it),
    /// `<user>:<password>` on one line, or a `.creds` file (as `nsc` writes it).
    pub fn read(path: &Path) -> Result<Self, NetError> {
        let secret = secrets::read_secret(path, "NATS credentials file")?;
        Self::parse(&secret).map_err(|m| NetError::Config(format!("{}: {m}", path.display())))
    }

    fn parse(secret: &str) -> Result<Self, String> {
        if secret.contains(JWT_BEGIN) {
            return Self::parse_creds(secret);
        }
        if secret.starts_with("SU") && !secret.contains(':') {
            return match nkeys::KeyPair::from_seed(secret) {
                Ok(_) => Ok(Self::Nkey {
                    seed: secret.to_owned(),
                }),
                Err(e) => Err(format!("not a valid nkey user seed: {e}")),
            };
        }
        match secret.split_once(':') {
            Some((user, password))
                if !user.is_empty()
                    && !password.is_empty()
                    && !secret.contains(['\n', '\r'])
                    && !user.contains(char::is_whitespace) =>
            {
                Ok(Self::UserPassword {
                    user: user.to_owned(),
                    password: password.to_owned(),
                })
            }
            _ => Err(
                "expected `<user>:<password>` on one line, an nkey user seed (SU...), or a .creds file"
                    .into(),
            ),
        }
    }

    /// A `.creds` file: the user JWT and the seed, each on the line after its BEGIN marker.
    /// Checked now (a JWT of three parts, a valid user seed) so that a broken file fails the
    /// start; the server checks the JWT's signatures and permissions.
    fn parse_creds(secret: &str) -> Result<Self, String> {
        let after = |marker: &str| {
            let mut lines = secret.lines().skip_while(|l| l.trim() != marker);
            lines.next()?;
            lines
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(str::to_owned)
        };
        let jwt = after(JWT_BEGIN).ok_or(".creds: no JWT after its BEGIN line")?;
        if jwt.split('.').count() != 3 || jwt.starts_with('-') {
            return Err(".creds: the user JWT is not a JWT".into());
        }
        let seed = after(SEED_BEGIN).ok_or(".creds: no USER NKEY SEED block")?;
        let kp = nkeys::KeyPair::from_seed(&seed)
            .map_err(|e| format!(".creds: not a valid nkey user seed: {e}"))?;
        if !seed.starts_with("SU") {
            return Err(".creds: the seed is not a user seed (SU...)".into());
        }
        Ok(Self::Creds {
            creds: secret.to_owned(),
            public: kp.public_key(),
        })
    }
}

/// What a NATS client needs to connect, checked when the agent or collector starts.
pub struct Endpoint {
    servers: Vec<ServerAddr>,
    credentials: Credentials,
    tls: async_nats::rustls::ClientConfig,
    /// The connection's name in the server's monitoring (`connz`) and logs.
    name: String,
    /// Replies (JetStream acknowledgements, fetched messages) arrive under this prefix: one
    /// per client, so that server permissions can keep every client to its own inbox.
    inbox_prefix: String,
    last_error: Arc<Mutex<Option<String>>>,
}

/// The settings of an [`Endpoint`].
pub struct EndpointOptions<'a> {
    pub servers: &'a str,
    pub credentials_file: &'a Path,
    pub ca_file: Option<&'a Path>,
    pub identity: Option<ClientIdentity<'a>>,
    pub name: &'a str,
    pub inbox_prefix: String,
}

impl Endpoint {
    /// Reads the credentials and TLS material now: a missing file fails the start, not a
    /// delivery later.
    pub fn new(o: EndpointOptions<'_>) -> Result<Self, NetError> {
        Ok(Self {
            servers: parse_servers(o.servers).map_err(NetError::Config)?,
            credentials: Credentials::read(o.credentials_file)?,
            tls: tls::client_config(o.ca_file, o.identity)?,
            name: o.name.to_owned(),
            inbox_prefix: o.inbox_prefix,
            last_error: Arc::default(),
        })
    }

    /// The servers, for `/v1/health`, status and logs.
    pub fn target(&self) -> String {
        self.servers
            .iter()
            .map(ServerAddr::as_url_str)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Connects to one of the servers within `timeout`. Once connected, the client reconnects
    /// by itself (to any server of the cluster) and keeps what it has not sent.
    pub async fn connect(&self, timeout: Duration) -> Result<async_nats::Client, NetError> {
        let options = match &self.credentials {
            Credentials::UserPassword { user, password } => {
                ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            Credentials::Nkey { seed } => ConnectOptions::with_nkey(seed.clone()),
            Credentials::Creds { creds, .. } => ConnectOptions::with_credentials(creds)
                .map_err(|e| NetError::Config(format!("the .creds file: {e}")))?,
        };
        let last = self.last_error.clone();
        let name = self.name.clone();
        let options = options
            .tls_client_config(self.tls.clone())
            .require_tls(true)
            .name(&self.name)
            .custom_inbox_prefix(&self.inbox_prefix)
            .connection_timeout(timeout)
            .event_callback(move |event| {
                let last = last.clone();
                let name = name.clone();
                async move {
                    match event {
                        Event::ServerError(e) => {
                            warn!("NATS ({name}): the server reported: {e}");
                            if let Ok(mut l) = last.lock() {
                                *l = Some(e.to_string());
                            }
                        }
                        Event::Connected => info!("NATS ({name}): connected"),
                        Event::Disconnected => warn!("NATS ({name}): disconnected"),
                        other => log::debug!("NATS ({name}): {other}"),
                    }
                }
            });
        match tokio::time::timeout(timeout, options.connect(self.servers.clone())).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => Err(NetError::Protocol(format!(
                "connecting to NATS {}: {e}",
                self.target()
            ))),
            Err(_) => Err(NetError::Timeout(timeout)),
        }
    }

    /// The server's latest error (`-ERR`), once: a permissions violation shows here.
    pub fn take_server_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|mut l| l.take())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_are_tls_only() {
        let s = parse_servers("tls://127.0.0.1:4222, tls://nats-2.example.net:4223").expect("ok");
        assert_eq!(s.len(), 2);
        assert_eq!((s[1].host(), s[1].port()), ("nats-2.example.net", 4223));
        assert!(parse_servers("nats://127.0.0.1:4222").is_err());
        assert!(parse_servers("tls://u:p@127.0.0.1:4222").is_err());
        assert!(parse_servers(" , ").is_err());
    }

    #[test]
    fn subjects_and_names() {
        assert!(valid_subject("sensor.ship"));
        assert!(valid_subject("sensor.ship.host-a_1"));
        for bad in ["", "a..b", "a.*", "a.>", "a b", ".a", "a."] {
            assert!(!valid_subject(bad), "{bad}");
        }
        assert!(valid_name("SENSOR_ship-1"));
        for bad in ["", "a.b", "a*", "a b"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn credentials_files() {
        let seed = nkeys::KeyPair::new_user().seed().expect("seed");
        assert!(matches!(
            Credentials::parse(&seed),
            Ok(Credentials::Nkey { .. })
        ));
        let Ok(Credentials::UserPassword { user, password }) = Credentials::parse("host-a:pa:ss")
        else {
            panic!("user and password")
        };
        assert_eq!((user.as_str(), password.as_str()), ("host-a", "pa:ss"));
        assert!(Credentials::parse("SUAXXXX").is_err(), "a broken seed");
        assert!(Credentials::parse("no-colon").is_err());
        assert!(Credentials::parse(":pw").is_err());
        assert!(Credentials::parse("a:b\nc:d").is_err());
        let shown = format!("{:?}", Credentials::parse(&seed).expect("seed"));
        assert!(shown.starts_with("nkey U"), "{shown}");
        assert!(!shown.contains(&seed));
        assert_eq!(
            format!("{:?}", Credentials::parse("u:secret").expect("u")),
            "user `u`"
        );
        // A .creds file as nsc writes it; shown by the user's public key, never the seed.
        let kp = nkeys::KeyPair::new_user();
        let seed = kp.seed().expect("seed");
        let creds = format!(
            "-----BEGIN NATS USER JWT-----\neyJ0eXAi.eyJqdGki.c2ln\n------END NATS USER JWT------\n\n\
             ****** IMPORTANT ******\n\n-----BEGIN USER NKEY SEED-----\n{seed}\n\
             ------END USER NKEY SEED------\n"
        );
        let parsed = Credentials::parse(creds.trim()).expect("creds");
        let shown = format!("{parsed:?}");
        assert_eq!(shown, format!("user JWT of {}", kp.public_key()));
        assert!(!shown.contains(&seed));
        for broken in [
            creds.replace("eyJ0eXAi.eyJqdGki.c2ln", "not-a-jwt"),
            creds.replace(&seed, "SUAXXXX"),
            creds.replace(&seed, &nkeys::KeyPair::new_account().seed().expect("seed")),
            creds.replace(
                "-----BEGIN USER NKEY SEED-----",
                "-----BEGIN SOMETHING-----",
            ),
        ] {
            assert!(Credentials::parse(broken.trim()).is_err(), "{broken}");
        }
    }
}
