//! The agent's view of connections: live ones (polled from the kernel map) and recently closed
//! ones (final records from the ring buffer), rendered as the public JSON rows.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant, SystemTime},
};

use sensor_common::{ConnStats, PROTO_HTTP1, PROTO_OTHER};
use serde::{Deserialize, Serialize};

/// One connection as `sensor conns --json` and the local API show it. The field names are a
/// public interface: add fields, never rename or remove them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnRow {
    /// The kernel's socket cookie: unique per connection for the life of the boot.
    pub cookie: u64,
    /// This host's address and port, "ip:port" ("[ip6]:port" for IPv6).
    pub local: String,
    /// The client's address and port.
    pub remote: String,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    pub requests: u64,
    /// "http1", "other" (requests are turns) or "unknown" (no client payload yet).
    pub protocol: String,
    /// "open" or "closed".
    pub state: String,
    /// RFC 3339, UTC.
    pub first_seen: String,
    pub last_seen: String,
}

/// Converts the kernel's CLOCK_BOOTTIME stamps to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock;

impl Clock {
    pub fn boottime_ns() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid pointer to a timespec; CLOCK_BOOTTIME always exists on Linux.
        unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
    }

    pub fn wall(boot_ns: u64) -> SystemTime {
        let now_boot = Self::boottime_ns();
        let now = SystemTime::now();
        if boot_ns <= now_boot {
            now - Duration::from_nanos(now_boot - boot_ns)
        } else {
            now + Duration::from_nanos(boot_ns - now_boot)
        }
    }

    pub fn rfc3339(boot_ns: u64) -> String {
        humantime::format_rfc3339_millis(Self::wall(boot_ns)).to_string()
    }
}

pub fn socket_addr(addr: [u8; 16], port: u16) -> SocketAddr {
    let ip = Ipv6Addr::from(addr);
    // Dual-stack sockets and our own IPv4 encoding both use IPv4-mapped addresses.
    let ip: IpAddr = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
    SocketAddr::new(ip, port)
}

pub fn row(cookie: u64, s: &ConnStats, open: bool) -> ConnRow {
    ConnRow {
        cookie,
        local: socket_addr(s.local_addr, s.local_port).to_string(),
        remote: socket_addr(s.remote_addr, s.remote_port).to_string(),
        bytes_in: s.bytes_in,
        bytes_out: s.bytes_out,
        packets_in: s.packets_in,
        packets_out: s.packets_out,
        requests: s.requests,
        protocol: match s.proto {
            PROTO_HTTP1 => "http1",
            PROTO_OTHER => "other",
            _ => "unknown",
        }
        .to_owned(),
        state: if open { "open" } else { "closed" }.to_owned(),
        first_seen: Clock::rfc3339(s.first_seen_ns),
        last_seen: Clock::rfc3339(s.last_seen_ns),
    }
}

struct Closed {
    cookie: u64,
    stats: ConnStats,
    at: Instant,
}

/// Live and recently closed connections, bounded by retention time and count.
pub struct ConnTable {
    live: HashMap<u64, ConnStats>,
    closed: VecDeque<Closed>,
    /// Cookies of retained closed connections: a poll that raced with the close must not
    /// bring them back as open.
    closed_cookies: HashSet<u64>,
    retention: Duration,
    max_closed: usize,
    /// Connections closed since start (all of them, also those no longer retained).
    pub closed_total: u64,
}

impl ConnTable {
    pub fn new(retention: Duration, max_closed: usize) -> Self {
        Self {
            live: HashMap::new(),
            closed: VecDeque::new(),
            closed_cookies: HashSet::new(),
            retention,
            max_closed,
            closed_total: 0,
        }
    }

    /// Replaces the live set with a fresh read of the kernel map.
    pub fn set_live(&mut self, snapshot: impl IntoIterator<Item = (u64, ConnStats)>) {
        self.live = snapshot
            .into_iter()
            .filter(|(cookie, _)| !self.closed_cookies.contains(cookie))
            .collect();
    }

    /// Records the final counters of a connection that closed.
    pub fn close(&mut self, cookie: u64, stats: ConnStats, now: Instant) {
        self.live.remove(&cookie);
        if !self.closed_cookies.insert(cookie) {
            return;
        }
        self.closed_total += 1;
        self.closed.push_back(Closed {
            cookie,
            stats,
            at: now,
        });
        self.expire(now);
    }

    pub fn expire(&mut self, now: Instant) {
        while let Some(front) = self.closed.front() {
            let too_old = now.duration_since(front.at) > self.retention;
            if !too_old && self.closed.len() <= self.max_closed {
                break;
            }
            self.closed_cookies.remove(&front.cookie);
            self.closed.pop_front();
        }
    }

    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    pub fn rows(&self) -> Vec<ConnRow> {
        let mut rows: Vec<ConnRow> = self
            .live
            .iter()
            .map(|(cookie, s)| row(*cookie, s, true))
            .chain(self.closed.iter().map(|c| row(c.cookie, &c.stats, false)))
            .collect();
        rows.sort_by_key(|r| r.cookie);
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(port: u16) -> ConnStats {
        let mut s = ConnStats {
            remote_port: port,
            local_port: 8080,
            ..Default::default()
        };
        s.local_addr[10] = 0xff;
        s.local_addr[11] = 0xff;
        s.local_addr[12] = 127;
        s.local_addr[15] = 1;
        s.remote_addr = Ipv6Addr::LOCALHOST.octets();
        s
    }

    #[test]
    fn addresses_render_as_ip_port() {
        let r = row(1, &stats(40000), true);
        assert_eq!(r.local, "127.0.0.1:8080");
        assert_eq!(r.remote, "[::1]:40000");
        assert_eq!(r.state, "open");
    }

    #[test]
    fn closed_connection_is_not_resurrected_by_a_racing_poll() {
        let now = Instant::now();
        let mut t = ConnTable::new(Duration::from_secs(60), 10);
        t.set_live([(1, stats(1)), (2, stats(2))]);
        t.close(1, stats(1), now);
        t.set_live([(1, stats(1)), (2, stats(2))]);
        let rows = t.rows();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].state, "closed");
        assert_eq!(rows[1].state, "open");
        // A duplicate close (ring buffer and reap) counts once.
        t.close(1, stats(1), now);
        assert_eq!(t.closed_total, 1);
    }

    #[test]
    fn closed_retention_is_bounded() {
        let now = Instant::now();
        let mut t = ConnTable::new(Duration::from_secs(60), 3);
        for c in 0..10 {
            t.close(c, stats(c as u16), now);
        }
        assert_eq!(t.rows().len(), 3);
        assert_eq!(t.closed_total, 10);
        t.expire(now + Duration::from_secs(61));
        assert!(t.rows().is_empty());
    }
}
