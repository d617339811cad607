//! sd_notify(3) without libsystemd: one datagram per state change to `$NOTIFY_SOCKET`.
//!
//! The protocol is newline-separated `KEY=value` assignments in a single datagram on a unix
//! socket whose address systemd passes in the environment (a path, or an abstract name written
//! with a leading `@`). Outside systemd (no `$NOTIFY_SOCKET`) every call is a no-op.

use std::{
    os::{linux::net::SocketAddrExt as _, unix::net::SocketAddr, unix::net::UnixDatagram},
    time::Duration,
};

use log::{debug, warn};

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET `{0}` is neither an absolute path nor an abstract name (@...)")]
    BadAddress(String),
    #[error("notification socket {address}: {source}")]
    Io {
        address: String,
        source: std::io::Error,
    },
}

/// The service manager's notification socket, when there is one.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr, String)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`. A malformed socket
    /// address is logged and treated as absent: the agent must run with or without systemd.
    pub fn from_env() -> Self {
        let watchdog = watchdog_period(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        let target = match std::env::var("NOTIFY_SOCKET") {
            Ok(address) => match connect(&address) {
                Ok((socket, addr)) => Some((socket, addr, address)),
                Err(e) => {
                    warn!("systemd notifications disabled: {e}");
                    None
                }
            },
            Err(_) => None,
        };
        Self { target, watchdog }
    }

    /// A notifier that sends nothing (tests, and runs outside systemd).
    #[cfg(test)]
    pub fn disabled() -> Self {
        Self {
            target: None,
            watchdog: None,
        }
    }

    /// How often to send `WATCHDOG=1`: half the interval systemd asked for, when it asked.
    pub fn watchdog_period(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends `fields`; failures are logged, never fatal (systemd may be restarting).
    pub fn send(&self, fields: &[(&str, &str)]) {
        let Some((socket, addr, address)) = &self.target else {
            return;
        };
        let text = message(fields);
        if let Err(source) = socket.send_to_addr(text.as_bytes(), addr) {
            let e = NotifyError::Io {
                address: address.clone(),
                source,
            };
            warn!("cannot notify systemd ({}): {e}", text.replace('\n', " "));
        } else {
            debug!("notified systemd: {}", text.replace('\n', " "));
        }
    }

    /// `READY=1`: the programs are attached and the API listens.
    pub fn ready(&self, status: &str) {
        self.send(&[("READY", "1"), ("STATUS", status)]);
    }

    /// `RELOADING=1` while a SIGHUP is handled (followed by `ready`).
    pub fn reloading(&self) {
        let now = monotonic_usec().to_string();
        self.send(&[
            ("RELOADING", "1"),
            ("MONOTONIC_USEC", &now),
            ("STATUS", "reloading the configuration"),
        ]);
    }

    pub fn stopping(&self) {
        self.send(&[
            ("STOPPING", "1"),
            ("STATUS", "saving state and detaching programs"),
        ]);
    }

    pub fn watchdog(&self) {
        self.send(&[("WATCHDOG", "1")]);
    }
}

/// One notification datagram: `KEY=value` lines. Newlines inside a value would start a new
/// assignment, so they are replaced by spaces.
pub fn message(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| format!("{k}={}", v.replace('\n', " ")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The socket address in `$NOTIFY_SOCKET`: `/path` or `@abstract`.
pub fn parse_address(address: &str) -> Result<SocketAddr, NotifyError> {
    let bad = || NotifyError::BadAddress(address.to_owned());
    if let Some(name) = address.strip_prefix('@') {
        SocketAddr::from_abstract_name(name.as_bytes()).map_err(|_| bad())
    } else if address.starts_with('/') {
        SocketAddr::from_pathname(address).map_err(|_| bad())
    } else {
        Err(bad())
    }
}

fn connect(address: &str) -> Result<(UnixDatagram, SocketAddr), NotifyError> {
    let addr = parse_address(address)?;
    let socket = UnixDatagram::unbound().map_err(|source| NotifyError::Io {
        address: address.to_owned(),
        source,
    })?;
    Ok((socket, addr))
}

/// Half of `$WATCHDOG_USEC`, if the watchdog is meant for this process (`$WATCHDOG_PID` unset
/// or equal to `pid`), as sd_watchdog_enabled(3) decides.
pub fn watchdog_period(
    usec: Option<&str>,
    watchdog_pid: Option<&str>,
    pid: u32,
) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    if let Some(for_pid) = watchdog_pid
        && for_pid.trim().parse::<u32>().ok() != Some(pid)
    {
        return None;
    }
    Some(Duration::from_micros(usec / 2))
}

/// CLOCK_MONOTONIC in microseconds (systemd pairs it with `RELOADING=1`).
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(ts.tv_nsec as u64 / 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_newline_separated_assignments() {
        assert_eq!(message(&[("READY", "1")]), "READY=1");
        assert_eq!(
            message(&[("READY", "1"), ("STATUS", "ports 80\n443")]),
            "READY=1\nSTATUS=ports 80 443"
        );
    }

    #[test]
    fn addresses_are_paths_or_abstract_names() {
        let path = parse_address("/run/systemd/notify").unwrap();
        assert_eq!(
            path.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        let abs = parse_address("@/org/freedesktop/systemd1/notify/123").unwrap();
        assert_eq!(
            abs.as_abstract_name(),
            Some(&b"/org/freedesktop/systemd1/notify/123"[..])
        );
        assert!(parse_address("relative/path").is_err());
        assert!(parse_address("").is_err());
    }

    #[test]
    fn watchdog_runs_at_half_the_interval_for_this_pid_only() {
        assert_eq!(
            watchdog_period(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_period(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_period(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_period(None, None, 7), None);
        assert_eq!(watchdog_period(Some("0"), None, 7), None);
        assert_eq!(watchdog_period(Some("soon"), None, 7), None);
    }

    #[test]
    fn datagrams_reach_a_listening_socket() {
        let dir = std::env::temp_dir().join(format!("sensor-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        let (socket, addr) = connect(path.to_str().unwrap()).unwrap();
        let notifier = Notifier {
            target: Some((socket, addr, path.display().to_string())),
            watchdog: None,
        };
        notifier.ready("attached");
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=attached");
        notifier.watchdog();
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
        let _ = std::fs::remove_dir_all(&dir);
        Notifier::disabled().ready("nothing happens");
    }
}
