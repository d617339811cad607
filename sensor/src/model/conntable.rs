//! The agent's view of connections: live ones (polled from the kernel map) and recently closed
//! ones (final records from the ring buffer), rendered as the public JSON rows.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant, SystemTime},
};

use crate::model::aggregate::{Aggregator, ClientSlots, Counts, Delta, ExchangeKeys, Now};
use crate::model::packed;

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
    /// Identity of the current exchange's API credential, where known.
    pub identity: Option<String>,
    /// The client behind a trusted proxy for the current exchange, where known.
    pub forwarded_for: Option<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    pub requests: u64,
    /// Server-sent events in streamed replies (see docs/counters.md).
    pub events_out: u64,
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

pub fn row(cookie: u64, s: &ConnStats, open: bool, keys: Option<&ExchangeKeys>) -> ConnRow {
    ConnRow {
        cookie,
        local: socket_addr(s.local_addr, s.local_port).to_string(),
        remote: socket_addr(s.remote_addr, s.remote_port).to_string(),
        identity: keys.and_then(|k| k.identity.clone()),
        forwarded_for: keys.and_then(|k| k.forwarded.map(|ip| ip.to_string())),
        bytes_in: s.bytes_in,
        bytes_out: s.bytes_out,
        packets_in: s.packets_in,
        packets_out: s.packets_out,
        requests: s.requests,
        events_out: s.events_out,
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

/// A connection's record as the table keeps it: the kernel's `ConnStats` without its request
/// parser's state (224 of its 344 bytes), which the agent neither shows nor saves. Tens of
/// thousands are held (live, and closed ones listed for a while).
#[derive(Debug, Clone, Copy)]
struct Kept {
    local_addr: [u8; 16],
    remote_addr: [u8; 16],
    local_port: u16,
    remote_port: u16,
    family: u16,
    proto: u8,
    closed: u8,
    bytes_in: u64,
    bytes_out: u64,
    packets_in: u64,
    packets_out: u64,
    requests: u64,
    first_seen_ns: u64,
    last_seen_ns: u64,
    in_seq_base: u32,
    out_seq_base: u32,
    events_out: u64,
    exchange_flags: u32,
}

impl From<&ConnStats> for Kept {
    fn from(s: &ConnStats) -> Self {
        Self {
            local_addr: s.local_addr,
            remote_addr: s.remote_addr,
            local_port: s.local_port,
            remote_port: s.remote_port,
            family: s.family,
            proto: s.proto,
            closed: s.closed,
            bytes_in: s.bytes_in,
            bytes_out: s.bytes_out,
            packets_in: s.packets_in,
            packets_out: s.packets_out,
            requests: s.requests,
            first_seen_ns: s.first_seen_ns,
            last_seen_ns: s.last_seen_ns,
            in_seq_base: s.in_seq_base,
            out_seq_base: s.out_seq_base,
            events_out: s.events_out,
            exchange_flags: s.exchange_flags,
        }
    }
}

impl Kept {
    /// The record as the kernel's type: what snapshots and rows take (the parser's state,
    /// never saved, is the default).
    fn stats(&self) -> ConnStats {
        ConnStats {
            local_addr: self.local_addr,
            remote_addr: self.remote_addr,
            local_port: self.local_port,
            remote_port: self.remote_port,
            family: self.family,
            proto: self.proto,
            closed: self.closed,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            packets_in: self.packets_in,
            packets_out: self.packets_out,
            requests: self.requests,
            first_seen_ns: self.first_seen_ns,
            last_seen_ns: self.last_seen_ns,
            in_seq_base: self.in_seq_base,
            out_seq_base: self.out_seq_base,
            events_out: self.events_out,
            exchange_flags: self.exchange_flags,
            ..Default::default()
        }
    }

    fn remote_ip(&self) -> IpAddr {
        socket_addr(self.remote_addr, self.remote_port).ip()
    }
}

/// A connection not yet closed: its last accounted counters, and where its client's entries
/// are (so a poll's observation of it formats and hashes no key).
struct Live {
    stats: Kept,
    slots: ClientSlots,
}

impl Live {
    fn new(stats: &ConnStats) -> Self {
        Self {
            stats: stats.into(),
            slots: ClientSlots::default(),
        }
    }
}

struct Closed {
    cookie: u64,
    stats: Kept,
    keys: Option<ExchangeKeys>,
    at: Instant,
}

/// Where a connection's counters stand in the current exchange.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub events_out: u64,
}

impl Progress {
    fn of(s: &ConnStats) -> Self {
        Self {
            bytes_in: s.bytes_in,
            bytes_out: s.bytes_out,
            events_out: s.events_out,
        }
    }

    /// (what `to` adds beyond `self`, what `self` has beyond `to`), per field.
    fn diff(self, to: Progress) -> (Counts, Counts) {
        let gain = |a: u64, b: u64| b.saturating_sub(a);
        (
            Counts {
                bytes_in: gain(self.bytes_in, to.bytes_in),
                bytes_out: gain(self.bytes_out, to.bytes_out),
                events_out: gain(self.events_out, to.events_out),
                ..Default::default()
            },
            Counts {
                bytes_in: gain(to.bytes_in, self.bytes_in),
                bytes_out: gain(to.bytes_out, self.bytes_out),
                events_out: gain(to.events_out, self.events_out),
                ..Default::default()
            },
        )
    }

    fn max(self, o: Progress) -> Self {
        Self {
            bytes_in: self.bytes_in.max(o.bytes_in),
            bytes_out: self.bytes_out.max(o.bytes_out),
            events_out: self.events_out.max(o.events_out),
        }
    }
}

/// The current exchange of a connection whose requests carry an identity or a forwarded
/// client: its keys and how much of the connection's counters is already attributed to them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Exchange {
    pub keys: ExchangeKeys,
    pub attributed: Progress,
    /// Identities seen on this connection (a proxy's pooled connection carries many), each
    /// counted once as a connection of that identity.
    pub identities: Vec<String>,
    pub forwarded: Vec<IpAddr>,
}

/// Distinct identities remembered per connection.
const MAX_KEYS_PER_CONNECTION: usize = 64;

/// How long a reaped connection's cookie is remembered, in real seconds, so a late duplicate of
/// its final record (the ring buffer and the map race by microseconds, and a live read holds
/// what it read for at most a poll) is never counted twice. Records the kernel map still holds
/// keep their tombstone whatever its age (`expire_tombstones`). A connection's tombstone is
/// most of what it leaves behind: at 10 000 new connections a second this window is 300 000
/// of them.
const TOMBSTONE_SECS: u64 = 30;

/// `TOMBSTONE_SECS` on the agent's clock, which an evaluation speeds up (`Now::scale`): the
/// race it covers runs in real time.
fn tombstone_window_secs() -> u64 {
    TOMBSTONE_SECS.saturating_mul(Now::scale())
}

/// Connections as the agent has accounted them, and the recently closed ones for display.
///
/// Every observation of a connection (a poll of the kernel map, or a close record) is turned
/// into a delta against what was already accounted, so observing the same counters twice adds
/// nothing: the map poll, the ring buffer and a restart can overlap freely.
/// Maps keyed by socket cookie (kernel-made, so a fast hasher is safe): several lookups per
/// polled connection and per request event.
type CookieMap<V> = HashMap<u64, V, foldhash::fast::RandomState>;

#[derive(Default)]
pub struct ConnTable {
    /// Last accounted counters of connections not yet closed.
    live: CookieMap<Live>,
    /// Closed connections accounted since the last reap: to delete from the kernel map once
    /// a snapshot holds them.
    unreaped: Vec<u64>,
    /// Closed and accounted cookies -> unix seconds when accounted.
    tombstones: CookieMap<u64>,
    /// Tombstones restored from a snapshot whose kernel records may still exist: an agent that
    /// died between saving a snapshot and deleting the records it accounts leaves them in the
    /// kernel map. Seen again, they are deleted without being counted (before the tombstone
    /// expires and they would count twice).
    restored: CookieMap<()>,
    closed: VecDeque<Closed>,
    /// Current exchange per connection (HTTP/1.x connections with identity or forwarding).
    exchanges: CookieMap<Exchange>,
    retention: Duration,
    max_closed: usize,
    /// Connections closed since start (all of them, also those no longer retained).
    pub closed_total: u64,
}

/// What a snapshot keeps of the connection table.
#[derive(Default, Serialize, Deserialize)]
pub struct ConnState {
    #[serde(deserialize_with = "saved_live")]
    pub live: Vec<(u64, ConnStats)>,
    #[serde(deserialize_with = "saved_tombstones")]
    pub tombstones: Vec<(u64, u64)>,
    #[serde(default)]
    pub exchanges: Vec<(u64, Exchange)>,
}

/// A `ConnState` borrowed from the table (`ConnTable::saved`): the same encoding.
pub struct SavedConns<'a>(&'a ConnTable);

impl Serialize for SavedConns<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;

        /// A sequence encoded from an iterator, as the `Vec` of `ConnState` would be.
        struct Seq<F>(F);
        impl<I, F> Serialize for Seq<F>
        where
            F: Fn() -> I,
            I: Iterator<Item: Serialize>,
        {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq((self.0)())
            }
        }

        let t = self.0;
        let mut st = s.serialize_struct("ConnState", 3)?;
        st.serialize_field(
            "live",
            &Seq(|| {
                t.live
                    .iter()
                    .map(|(c, l)| (*c, SavedStats(l.stats.stats())))
            }),
        )?;
        st.serialize_field("tombstones", &SavedTombstones(&t.tombstones))?;
        st.serialize_field("exchanges", &Seq(|| t.exchanges.iter()))?;
        st.end()
    }
}

/// A connection's record in a snapshot. In JSON its fields; in format 4 one MessagePack `bin`:
/// the two addresses' 16 bytes each, then every other saved field in declaration order as a
/// LEB128 varint (`integer-encoding`). Through serde field by field a record cost ~1 300
/// instructions, and a snapshot under a new-connection load holds every connection closed
/// since the last one (callgrind, `cargo xtask bench --phases profile --profile-load close`).
struct SavedStats(ConnStats);

thread_local! {
    /// `SavedStats`' encoding buffer, reused from record to record.
    static STATS: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Serialize for SavedStats {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() || crate::model::aggregate::writing_format_3() {
            return self.0.serialize(s);
        }
        STATS.with_borrow_mut(|buf| {
            buf.clear();
            encode_stats(buf, &self.0);
            s.serialize_bytes(buf)
        })
    }
}

/// Every field a snapshot keeps, in declaration order (all named: a new field of `ConnStats`
/// does not compile here until it is saved or left out on purpose).
fn encode_stats(out: &mut Vec<u8>, c: &ConnStats) {
    let ConnStats {
        local_addr,
        remote_addr,
        local_port,
        remote_port,
        family,
        proto,
        closed,
        bytes_in,
        bytes_out,
        packets_in,
        packets_out,
        requests,
        first_seen_ns,
        last_seen_ns,
        in_seq_base,
        out_seq_base,
        events_out,
        exchange_flags,
        _pad,
        // The kernel's parser state: not saved (as in JSON).
        parse: _,
    } = *c;
    let mut p = packed::Packer::new(out, 16 + STATS_NUMBERS);
    p.bytes(&local_addr);
    p.bytes(&remote_addr);
    for v in [
        u64::from(local_port),
        u64::from(remote_port),
        u64::from(family),
        u64::from(proto),
        u64::from(closed),
        bytes_in,
        bytes_out,
        packets_in,
        packets_out,
        requests,
        first_seen_ns,
        last_seen_ns,
        u64::from(in_seq_base),
        u64::from(out_seq_base),
        events_out,
        u64::from(exchange_flags),
        u64::from(_pad),
    ] {
        p.put(v);
    }
    p.finish();
}

/// Numbers `encode_stats` writes after the addresses.
const STATS_NUMBERS: usize = 17;

/// `encode_stats` read back: a number out of its field's range, a cut or malformed number, or
/// bytes left over make the snapshot unreadable.
fn decode_stats(bytes: &[u8]) -> Result<ConnStats, String> {
    let mut u = packed::Unpacker::new(bytes, "connection");
    let c = ConnStats {
        local_addr: u.bytes()?,
        remote_addr: u.bytes()?,
        local_port: u.small()?,
        remote_port: u.small()?,
        family: u.small()?,
        proto: u.small()?,
        closed: u.small()?,
        bytes_in: u.get()?,
        bytes_out: u.get()?,
        packets_in: u.get()?,
        packets_out: u.get()?,
        requests: u.get()?,
        first_seen_ns: u.get()?,
        last_seen_ns: u.get()?,
        in_seq_base: u.small()?,
        out_seq_base: u.small()?,
        events_out: u.get()?,
        exchange_flags: u.small()?,
        _pad: u.small()?,
        parse: Default::default(),
    };
    u.end("the record")?;
    Ok(c)
}

/// A snapshot's connection record: format 4's `bin`, or format 3's array of the fields.
struct LoadedStats(ConnStats);

impl<'de> Deserialize<'de> for LoadedStats {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        packed::bin_or_seq(d, "a connection record", decode_stats, |c: ConnStats| c)
            .map(LoadedStats)
    }
}

/// `ConnState::live` read: JSON's records, or a snapshot's in either format.
fn saved_live<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<(u64, ConnStats)>, D::Error> {
    if d.is_human_readable() {
        return Vec::<(u64, ConnStats)>::deserialize(d);
    }
    let v = Vec::<(u64, LoadedStats)>::deserialize(d)?;
    Ok(v.into_iter().map(|(c, s)| (c, s.0)).collect())
}

/// The tombstones (cookie, unix seconds of the close) in a snapshot. In JSON pairs; in format
/// 4 one `bin`: their number, then per tombstone the differences from the one before of its
/// cookie and of its time, zigzag LEB128 varints (cookies of one boot are close together, and
/// so are the times). Under a new-connection load a snapshot holds the last `TOMBSTONE_SECS`
/// of closes, and serde's pairs were most of the connection table's encoding.
struct SavedTombstones<'a>(&'a CookieMap<u64>);

impl Serialize for SavedTombstones<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() || crate::model::aggregate::writing_format_3() {
            return s.collect_seq(self.0.iter().map(|(c, t)| (*c, *t)));
        }
        STATS.with_borrow_mut(|buf| {
            buf.clear();
            let mut p = packed::Packer::new(buf, 1 + self.0.len() * 2);
            p.put(self.0.len() as u64);
            let (mut cookie, mut time) = (0u64, 0u64);
            for (c, t) in self.0.iter() {
                p.put_signed(c.wrapping_sub(cookie) as i64);
                p.put_signed(t.wrapping_sub(time) as i64);
                (cookie, time) = (*c, *t);
            }
            p.finish();
            s.serialize_bytes(buf)
        })
    }
}

/// `SavedTombstones` read back; a count beyond what the bytes can hold, a malformed number or
/// bytes left over make the snapshot unreadable.
fn decode_tombstones(bytes: &[u8]) -> Result<Vec<(u64, u64)>, String> {
    let mut u = packed::Unpacker::new(bytes, "tombstones");
    let n = u.get()?;
    // Two bytes at least per tombstone: no room is reserved for what the bytes cannot hold.
    if n > u.remaining() as u64 / 2 {
        return Err(format!("tombstones: {n} in {} bytes", u.remaining()));
    }
    let mut out = Vec::with_capacity(n as usize);
    let (mut cookie, mut time) = (0u64, 0u64);
    for _ in 0..n {
        cookie = cookie.wrapping_add(u.get_signed()? as u64);
        time = time.wrapping_add(u.get_signed()? as u64);
        out.push((cookie, time));
    }
    u.end("them")?;
    Ok(out)
}

/// `ConnState::tombstones` read: JSON's pairs, format 3's pairs or format 4's `bin`.
fn saved_tombstones<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<(u64, u64)>, D::Error> {
    if d.is_human_readable() {
        return Vec::<(u64, u64)>::deserialize(d);
    }
    packed::bin_or_seq(d, "tombstones", decode_tombstones, |v: Vec<(u64, u64)>| v)
}

/// A connection carrying these keys closed.
fn close_exchange_connections(ex: &Exchange, agg: &mut Aggregator, now: Now) {
    let closed = Delta {
        closed: true,
        ..Default::default()
    };
    for id in &ex.identities {
        let keys = ExchangeKeys {
            identity: Some(id.clone()),
            forwarded: None,
        };
        agg.apply_exchange(&keys, &closed, now);
    }
    for ip in &ex.forwarded {
        let keys = ExchangeKeys {
            identity: None,
            forwarded: Some(*ip),
        };
        agg.apply_exchange(&keys, &closed, now);
    }
}

fn remote_ip(s: &ConnStats) -> IpAddr {
    socket_addr(s.remote_addr, s.remote_port).ip()
}

impl ConnTable {
    pub fn new(retention: Duration, max_closed: usize) -> Self {
        Self {
            retention,
            max_closed,
            ..Default::default()
        }
    }

    /// Changes how long, and how many, closed connections stay listed (SIGHUP reload).
    pub fn set_retention(&mut self, retention: Duration, max_closed: usize) {
        self.retention = retention;
        self.max_closed = max_closed;
    }

    /// Accounts one observation of a connection's counters into `agg`.
    pub fn observe(&mut self, cookie: u64, stats: &ConnStats, agg: &mut Aggregator, now: Now) {
        if self.tombstones.contains_key(&cookie) {
            if stats.closed != 0 && self.restored.remove(&cookie).is_some() {
                self.unreaped.push(cookie);
            }
            return;
        }
        let mut fresh = ClientSlots::default();
        let (previous, slots) = match self.live.get_mut(&cookie) {
            Some(Live { stats, slots }) => (Some(&*stats), slots),
            None => (None, &mut fresh),
        };
        let delta = Delta {
            counts: Counts {
                requests: stats
                    .requests
                    .saturating_sub(previous.map_or(0, |p| p.requests)),
                bytes_in: stats
                    .bytes_in
                    .saturating_sub(previous.map_or(0, |p| p.bytes_in)),
                bytes_out: stats
                    .bytes_out
                    .saturating_sub(previous.map_or(0, |p| p.bytes_out)),
                events_out: stats
                    .events_out
                    .saturating_sub(previous.map_or(0, |p| p.events_out)),
                connections: 0,
            },
            opened: previous.is_none(),
            closed: stats.closed != 0,
        };
        agg.apply_cached(remote_ip(stats), slots, &delta, now);
        if let Some(ex) = self.exchanges.get_mut(&cookie) {
            let current = Progress::of(stats);
            let (gain, _) = ex.attributed.diff(current);
            ex.attributed = ex.attributed.max(current);
            let gain = Delta {
                counts: gain,
                ..Default::default()
            };
            agg.apply_exchange(&ex.keys, &gain, now);
        }
        if stats.closed != 0 {
            let keys = self.exchanges.remove(&cookie).map(|ex| {
                close_exchange_connections(&ex, agg, now);
                ex.keys
            });
            self.live.remove(&cookie);
            self.tombstones.insert(cookie, now.secs());
            self.unreaped.push(cookie);
            self.closed_total += 1;
            self.closed.push_back(Closed {
                cookie,
                stats: stats.into(),
                keys,
                at: Instant::now(),
            });
            self.expire(Instant::now());
        } else {
            // Counters only grow; keep the larger of each in case observations cross.
            let entry = &mut self
                .live
                .entry(cookie)
                .or_insert(Live {
                    stats: stats.into(),
                    slots: fresh,
                })
                .stats;
            entry.bytes_in = entry.bytes_in.max(stats.bytes_in);
            entry.bytes_out = entry.bytes_out.max(stats.bytes_out);
            entry.requests = entry.requests.max(stats.requests);
            entry.packets_in = entry.packets_in.max(stats.packets_in);
            entry.packets_out = entry.packets_out.max(stats.packets_out);
            entry.last_seen_ns = entry.last_seen_ns.max(stats.last_seen_ns);
            entry.events_out = entry.events_out.max(stats.events_out);
            entry.proto = stats.proto;
        }
    }

    /// A request began on `cookie` at `start`, with `keys` from its head. Closes the previous
    /// exchange at exactly that point: what the connection carried before `start` belongs to
    /// the previous request, the rest to this one.
    #[expect(
        clippy::too_many_arguments,
        reason = "one event's fields, passed through"
    )]
    pub fn on_request(
        &mut self,
        cookie: u64,
        peer: IpAddr,
        start: Progress,
        keys: ExchangeKeys,
        ts_ns: u64,
        agg: &mut Aggregator,
        now: Now,
    ) {
        // A kept-alive connection's peer entries are where its last poll found them.
        match self.live.get_mut(&cookie) {
            Some(live) => agg.request_keys_cached(peer, &mut live.slots, &keys, ts_ns, now),
            None => agg.request_keys(peer, &keys, ts_ns, now),
        }
        if self.tombstones.contains_key(&cookie) {
            return;
        }
        let previous = self.exchanges.remove(&cookie);
        if previous.is_none() && keys.is_empty() {
            return;
        }
        let mut ex = previous.unwrap_or_default();
        let (gain, overshoot) = ex.attributed.diff(start);
        agg.apply_exchange(
            &ex.keys,
            &Delta {
                counts: gain,
                ..Default::default()
            },
            now,
        );
        // A poll that read the counters just after this request started attributed its first
        // bytes to the previous exchange: move them.
        agg.retract_exchange(&ex.keys, overshoot, now);
        let opened = ExchangeKeys {
            identity: keys
                .identity
                .clone()
                .filter(|id| !ex.identities.contains(id)),
            forwarded: keys.forwarded.filter(|ip| !ex.forwarded.contains(ip)),
        };
        agg.apply_exchange(
            &opened,
            &Delta {
                opened: true,
                ..Default::default()
            },
            now,
        );
        if let Some(id) = opened.identity
            && ex.identities.len() < MAX_KEYS_PER_CONNECTION
        {
            ex.identities.push(id);
        }
        if let Some(ip) = opened.forwarded
            && ex.forwarded.len() < MAX_KEYS_PER_CONNECTION
        {
            ex.forwarded.push(ip);
        }
        let request = Counts {
            requests: 1,
            ..overshoot
        };
        agg.apply_exchange(
            &keys,
            &Delta {
                counts: request,
                ..Default::default()
            },
            now,
        );
        ex.keys = keys;
        ex.attributed = ex.attributed.max(start);
        self.exchanges.insert(cookie, ex);
    }

    /// After a full read of the kernel map: live connections the kernel no longer holds can no
    /// longer be observed (the kernel state was replaced); close them without new counts.
    /// Their exchanges are closed too.
    pub fn forget_missing(
        &mut self,
        present: &HashSet<u64, foldhash::fast::RandomState>,
        agg: &mut Aggregator,
        now: Now,
    ) {
        let gone: Vec<u64> = self
            .live
            .keys()
            .filter(|c| !present.contains(c))
            .copied()
            .collect();
        for cookie in gone {
            if let Some(ex) = self.exchanges.remove(&cookie) {
                close_exchange_connections(&ex, agg, now);
            }
            if let Some(mut live) = self.live.remove(&cookie) {
                agg.apply_cached(
                    live.stats.remote_ip(),
                    &mut live.slots,
                    &Delta {
                        closed: true,
                        ..Default::default()
                    },
                    now,
                );
            }
        }
    }

    /// Closed connections accounted since the last call: the kernel may now delete them.
    pub fn take_unreaped(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.unreaped)
    }

    /// Gives back cookies whose deletion could not happen (the snapshot failed).
    pub fn restore_unreaped(&mut self, mut cookies: Vec<u64>) {
        cookies.append(&mut self.unreaped);
        self.unreaped = cookies;
    }

    pub fn expire(&mut self, now: Instant) {
        while let Some(front) = self.closed.front() {
            let too_old = now.duration_since(front.at) > self.retention;
            if !too_old && self.closed.len() <= self.max_closed {
                break;
            }
            self.closed.pop_front();
        }
    }

    /// Forgets tombstones older than `TOMBSTONE_SECS` (real seconds), except those of records still waiting
    /// to be deleted from the kernel map: while snapshots fail (a full disk) the records stay
    /// in the kernel, and without their tombstone they would be counted again.
    pub fn expire_tombstones(&mut self, now: Now) {
        let pending: HashSet<u64, foldhash::fast::RandomState> =
            self.unreaped.iter().copied().collect();
        let window = tombstone_window_secs();
        self.tombstones
            .retain(|c, at| now.secs().saturating_sub(*at) < window || pending.contains(c));
        let tombstones = &self.tombstones;
        self.restored.retain(|c, ()| tombstones.contains_key(c));
    }

    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    pub fn state(&self) -> ConnState {
        ConnState {
            live: self
                .live
                .iter()
                .map(|(c, l)| (*c, l.stats.stats()))
                .collect(),
            tombstones: self.tombstones.iter().map(|(c, t)| (*c, *t)).collect(),
            exchanges: self
                .exchanges
                .iter()
                .map(|(c, e)| (*c, e.clone()))
                .collect(),
        }
    }

    /// What `state` gives, encoded straight from the table (a snapshot under a new-connection
    /// load holds hundreds of thousands of tombstones: no copy of them per snapshot).
    pub fn saved(&self) -> SavedConns<'_> {
        SavedConns(self)
    }

    pub fn restore(&mut self, state: &ConnState) {
        self.live = state.live.iter().map(|(c, s)| (*c, Live::new(s))).collect();
        self.tombstones = state.tombstones.iter().copied().collect();
        self.restored = state.tombstones.iter().map(|(c, _)| (*c, ())).collect();
        self.exchanges = state.exchanges.iter().cloned().collect();
    }

    pub fn rows(&self) -> Vec<ConnRow> {
        let mut rows: Vec<ConnRow> = self
            .live
            .iter()
            .map(|(cookie, l)| {
                row(
                    *cookie,
                    &l.stats.stats(),
                    true,
                    self.exchanges.get(cookie).map(|e| &e.keys),
                )
            })
            .chain(
                self.closed
                    .iter()
                    .map(|c| row(c.cookie, &c.stats.stats(), false, c.keys.as_ref())),
            )
            .collect();
        rows.sort_by_key(|r| r.cookie);
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// A snapshot's connection record reads back exactly, whatever its fields hold.
        #[test]
        fn snapshot_records_read_back_exactly(
            addrs in proptest::prelude::any::<[u8; 32]>(),
            small in proptest::prelude::any::<(u16, u16, u16, u8, u8)>(),
            wide in proptest::prelude::any::<[u64; 8]>(),
            narrow in proptest::prelude::any::<[u32; 4]>(),
        ) {
            let c = ConnStats {
                local_addr: addrs[..16].try_into().expect("16"),
                remote_addr: addrs[16..].try_into().expect("16"),
                local_port: small.0,
                remote_port: small.1,
                family: small.2,
                proto: small.3,
                closed: small.4,
                bytes_in: wide[0],
                bytes_out: wide[1],
                packets_in: wide[2],
                packets_out: wide[3],
                requests: wide[4],
                first_seen_ns: wide[5],
                last_seen_ns: wide[6],
                in_seq_base: narrow[0],
                out_seq_base: narrow[1],
                events_out: wide[7],
                exchange_flags: narrow[2],
                _pad: narrow[3],
                parse: Default::default(),
            };
            let mut bytes = Vec::new();
            encode_stats(&mut bytes, &c);
            proptest::prop_assert_eq!(decode_stats(&bytes), Ok(c));
            // Through MessagePack, as a snapshot holds it.
            let packed = rmp_serde::to_vec(&SavedStats(c)).expect("encode");
            let back: LoadedStats = rmp_serde::from_slice(&packed).expect("decode");
            proptest::prop_assert_eq!(back.0, c);
        }
    }

    proptest::proptest! {
        /// Tombstones read back exactly, whatever the cookies and times (any order, far apart).
        #[test]
        fn snapshot_tombstones_read_back_exactly(
            pairs in proptest::collection::hash_map(proptest::prelude::any::<u64>(), proptest::prelude::any::<u64>(), 0..200),
        ) {
            let map: CookieMap<u64> = pairs.iter().map(|(c, t)| (*c, *t)).collect();
            let packed = rmp_serde::to_vec(&SavedTombstones(&map)).expect("encode");
            let mut back = rmp_serde::from_slice::<Tombstones>(&packed).expect("decode").0;
            back.sort_unstable();
            let mut expected: Vec<(u64, u64)> = pairs.into_iter().collect();
            expected.sort_unstable();
            proptest::prop_assert_eq!(back, expected);
        }
    }

    /// `ConnState::tombstones` alone, as a snapshot reads it.
    #[derive(Deserialize)]
    struct Tombstones(#[serde(deserialize_with = "saved_tombstones")] Vec<(u64, u64)>);

    #[test]
    fn malformed_tombstones_are_refused() {
        let map: CookieMap<u64> = [(4096, 1_800_000_000), (4097, 1_800_000_001)]
            .into_iter()
            .collect();
        let packed = rmp_serde::to_vec(&SavedTombstones(&map)).expect("encode");
        // Format 3's pairs still read.
        let pairs: Vec<(u64, u64)> = map.iter().map(|(c, t)| (*c, *t)).collect();
        let old = rmp_serde::to_vec(&pairs).expect("encode");
        assert_eq!(
            rmp_serde::from_slice::<Tombstones>(&old).expect("decode").0,
            pairs
        );
        // The bin's payload (after its 2-byte header): cut, padded, a count it cannot hold.
        let raw = &packed[2..];
        assert!(decode_tombstones(&raw[..raw.len() - 1]).is_err());
        let mut trailing = raw.to_vec();
        trailing.push(0);
        assert!(
            decode_tombstones(&trailing)
                .unwrap_err()
                .contains("after them")
        );
        assert!(
            decode_tombstones(&[0xff, 0xff, 0xff, 0xff, 0x0f])
                .unwrap_err()
                .contains("in 0 bytes")
        );
    }

    #[test]
    fn malformed_snapshot_records_are_refused() {
        let c = ConnStats {
            local_port: 8080,
            bytes_out: 1 << 40,
            ..Default::default()
        };
        let mut bytes = Vec::new();
        encode_stats(&mut bytes, &c);
        assert!(decode_stats(&bytes[..bytes.len() - 1]).is_err());
        assert!(
            decode_stats(&bytes[..20])
                .unwrap_err()
                .contains("cut short")
        );
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(
            decode_stats(&trailing)
                .unwrap_err()
                .contains("after the record")
        );
        // A port beyond 16 bits (8080 is the two bytes after the addresses).
        assert_eq!(bytes[32..34], [0x90, 0x3f]);
        let mut wide = bytes[..32].to_vec();
        wide.extend([0x80, 0x80, 0x04]);
        wide.extend(&bytes[34..]);
        assert!(
            decode_stats(&wide)
                .unwrap_err()
                .contains("65536 out of range")
        );
        // Format 3's array of fields still reads.
        let fields = rmp_serde::to_vec(&c).expect("encode");
        let back: LoadedStats = rmp_serde::from_slice(&fields).expect("decode");
        assert_eq!(back.0, c);
    }

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

    fn now() -> Now {
        Now {
            unix_ms: 1_000_000_000,
        }
    }

    #[test]
    fn addresses_render_as_ip_port() {
        let r = row(1, &stats(40000), true, None);
        assert_eq!(r.local, "127.0.0.1:8080");
        assert_eq!(r.remote, "[::1]:40000");
        assert_eq!(r.state, "open");
    }

    #[test]
    fn observations_are_idempotent() {
        let mut agg = Aggregator::new(100, 24, 56);
        let mut t = ConnTable::new(Duration::from_secs(60), 10);
        let mut s = stats(1);
        s.bytes_in = 100;
        s.requests = 1;
        t.observe(7, &s, &mut agg, now());
        t.observe(7, &s, &mut agg, now());
        s.bytes_in = 150;
        s.closed = 1;
        t.observe(7, &s, &mut agg, now());
        // A late duplicate of the close record, and a stale poll.
        t.observe(7, &s, &mut agg, now());
        s.closed = 0;
        t.observe(7, &s, &mut agg, now());
        let c = &agg.addresses.clients["::1"];
        assert_eq!(c.totals().bytes_in, 150);
        assert_eq!(c.totals().requests, 1);
        assert_eq!(c.totals().connections, 1);
        assert_eq!(c.open_connections(), 0);
        assert_eq!(t.take_unreaped(), vec![7]);
        assert_eq!(t.closed_total, 1);
        assert_eq!(t.rows().len(), 1);
    }

    #[test]
    fn state_round_trip_keeps_deltas_exact() {
        let mut agg = Aggregator::new(100, 24, 56);
        let mut t = ConnTable::new(Duration::from_secs(60), 10);
        let mut s = stats(1);
        s.bytes_out = 1000;
        t.observe(9, &s, &mut agg, now());
        let saved = serde_json::to_string(&t.state()).expect("serialize");
        let mut restored = ConnTable::new(Duration::from_secs(60), 10);
        restored.restore(&serde_json::from_str(&saved).expect("deserialize"));
        s.bytes_out = 1500;
        restored.observe(9, &s, &mut agg, now());
        assert_eq!(agg.addresses.clients["::1"].totals().bytes_out, 1500);
        assert_eq!(agg.addresses.clients["::1"].totals().connections, 1);
    }

    #[test]
    fn records_left_by_a_crash_after_the_snapshot_are_deleted_not_counted() {
        let mut agg = Aggregator::new(100, 24, 56);
        let mut t = ConnTable::new(Duration::from_secs(60), 10);
        let mut s = stats(1);
        s.closed = 1;
        s.bytes_in = 100;
        t.observe(7, &s, &mut agg, now());
        assert_eq!(t.take_unreaped(), [7]);
        // The snapshot holds the tombstone; the agent dies before deleting the record.
        let saved = t.state();
        let mut agg2 = Aggregator::new(100, 24, 56);
        let mut restarted = ConnTable::new(Duration::from_secs(60), 10);
        restarted.restore(&saved);
        restarted.observe(7, &s, &mut agg2, now());
        restarted.observe(7, &s, &mut agg2, now());
        assert_eq!(restarted.take_unreaped(), [7], "queued for deletion once");
        assert_eq!(restarted.closed_total, 0, "not counted again");
        assert!(agg2.addresses.clients.is_empty(), "not counted again");
    }

    /// Snapshots that keep failing (a full disk) keep the closed records in the kernel; their
    /// tombstones must outlive them, or each record is counted again once they expire.
    #[test]
    fn failing_snapshots_never_count_a_closed_record_twice() {
        let mut agg = Aggregator::new(100, 24, 56);
        let mut t = ConnTable::new(Duration::from_secs(60), 10);
        let mut s = stats(1);
        s.closed = 1;
        s.bytes_in = 100;
        t.observe(7, &s, &mut agg, now());
        let mut later = now();
        for _ in 0..5 {
            // One snapshot attempt as the agent makes it: the saving fails.
            later.unix_ms += 60_000;
            t.expire_tombstones(later);
            let reaped = t.take_unreaped();
            assert_eq!(reaped, [7]);
            t.restore_unreaped(reaped);
            // The record is still in the kernel map and read again.
            t.observe(7, &s, &mut agg, later);
        }
        assert_eq!(agg.addresses.clients["::1"].totals().bytes_in, 100);
        assert_eq!(agg.addresses.clients["::1"].totals().connections, 1);
        assert_eq!(t.closed_total, 1);
        // Once deleted from the kernel, the tombstone may go.
        assert_eq!(t.take_unreaped(), [7]);
        later.unix_ms += 1000 * (tombstone_window_secs() + 1);
        t.expire_tombstones(later);
        assert!(t.tombstones.is_empty());
    }

    fn stats_from(ip: [u8; 4], port: u16) -> ConnStats {
        let mut s = stats(port);
        s.remote_addr = std::net::Ipv4Addr::from(ip).to_ipv6_mapped().octets();
        s
    }

    /// Cached client entries give exactly what lookups by key give, also while the tables
    /// fold entries away (which moves the others) and connections open, grow and close.
    #[test]
    fn cached_client_entries_count_as_lookups() {
        let mut agg = Aggregator::new(5, 24, 56);
        let mut reference = Aggregator::new(5, 24, 56);
        let mut t = ConnTable::new(Duration::from_secs(60), 10);
        let mut last: HashMap<u64, ConnStats> = HashMap::new();
        let mut x: u64 = 3;
        for _ in 0..5_000 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let cookie = 1 + (x >> 40) % 40;
            let ip = [10, 0, ((x >> 20) % 3) as u8, (cookie % 13) as u8];
            let mut s = *last.entry(cookie).or_insert_with(|| stats_from(ip, 1));
            s.bytes_in += (x >> 50) % 100;
            s.requests += (x >> 45) % 2;
            s.closed = u8::from((x >> 33).is_multiple_of(9));
            let previous = t.live.get(&cookie).map(|l| l.stats);
            let tombstoned = t.tombstones.contains_key(&cookie);
            t.observe(cookie, &s, &mut agg, now());
            if !tombstoned {
                let delta = Delta {
                    counts: Counts {
                        requests: s.requests - previous.map_or(0, |p| p.requests),
                        bytes_in: s.bytes_in - previous.map_or(0, |p| p.bytes_in),
                        ..Default::default()
                    },
                    opened: previous.is_none(),
                    closed: s.closed != 0,
                };
                reference.apply(remote_ip(&s), &delta, now());
            }
            if s.closed != 0 {
                // The cookie's connection is gone; a new one (a new cookie) takes its number.
                last.remove(&cookie);
                t.tombstones.remove(&cookie);
            } else {
                last.insert(cookie, s);
            }
        }
        assert!(agg.addresses.folded.clients > 0, "entries moved");
        let json = |a: &Aggregator| serde_json::to_string(a).expect("serialize");
        assert_eq!(json(&agg), json(&reference));
    }

    /// A cookie seen again with another peer (a reused number) never counts on the old one.
    #[test]
    fn a_cookie_with_another_peer_counts_on_the_new_peer() {
        let mut agg = Aggregator::new(100, 24, 56);
        let mut t = ConnTable::new(Duration::from_secs(60), 10);
        let mut a = stats_from([10, 0, 0, 1], 1);
        a.bytes_in = 10;
        t.observe(5, &a, &mut agg, now());
        let mut b = stats_from([10, 0, 1, 2], 1);
        b.bytes_in = 25;
        t.observe(5, &b, &mut agg, now());
        assert_eq!(agg.addresses.clients["10.0.0.1"].totals().bytes_in, 10);
        assert_eq!(agg.addresses.clients["10.0.1.2"].totals().bytes_in, 15);
        assert_eq!(agg.groups.clients["10.0.1.0/24"].totals().bytes_in, 15);
        // Requests through the cached entries of the new peer.
        t.on_request(
            5,
            remote_ip(&b),
            Progress::of(&b),
            ExchangeKeys::default(),
            1,
            &mut agg,
            now(),
        );
        assert_eq!(agg.addresses.clients.len(), 2);
        // And the close lands there too.
        b.closed = 1;
        t.observe(5, &b, &mut agg, now());
        assert_eq!(agg.addresses.clients["10.0.1.2"].open_connections(), 0);
        assert_eq!(t.live_count(), 0);
    }

    /// A restored table re-resolves its entries (handles are not saved).
    #[test]
    fn restored_connections_find_their_clients_again() {
        let mut agg = Aggregator::new(100, 24, 56);
        let mut t = ConnTable::new(Duration::from_secs(60), 10);
        let mut s = stats_from([10, 0, 0, 9], 1);
        s.bytes_in = 10;
        t.observe(3, &s, &mut agg, now());
        let saved = serde_json::to_string(&agg).expect("serialize");
        let mut agg: Aggregator = serde_json::from_str(&saved).expect("deserialize");
        let mut restored = ConnTable::new(Duration::from_secs(60), 10);
        restored.restore(&t.state());
        s.bytes_in = 30;
        restored.observe(3, &s, &mut agg, now());
        assert_eq!(agg.addresses.clients.len(), 1);
        assert_eq!(agg.addresses.clients["10.0.0.9"].totals().bytes_in, 30);
        assert_eq!(agg.addresses.clients["10.0.0.9"].totals().connections, 1);
    }

    /// The table keeps records without the kernel's parser state; what it saves is the
    /// kernel's record as before, every saved field intact.
    #[test]
    fn saved_live_records_keep_every_saved_field() {
        let mut agg = Aggregator::new(100, 24, 56);
        let mut t = ConnTable::new(Duration::from_secs(60), 10);
        let mut s = stats_from([10, 0, 0, 4], 4321);
        s.family = 2;
        s.proto = PROTO_HTTP1;
        (s.bytes_in, s.bytes_out, s.packets_in, s.packets_out) = (1, 2, 3, 4);
        (s.requests, s.first_seen_ns, s.last_seen_ns, s.events_out) = (5, 6, 7, 8);
        (s.in_seq_base, s.out_seq_base, s.exchange_flags) = (9, 10, 11);
        s.parse.fin_end = 12;
        t.observe(1, &s, &mut agg, now());
        let expected = ConnStats {
            parse: Default::default(),
            ..s
        };
        assert_eq!(t.state().live, vec![(1, expected)]);
        assert_eq!(
            serde_json::to_string(&t.state().live).expect("serialize"),
            serde_json::to_string(&vec![(1u64, s)]).expect("serialize"),
            "the snapshot's text is unchanged"
        );
    }

    /// The borrowed encoding is the copied one's, byte for byte.
    #[test]
    fn saved_conns_encode_as_conn_state() {
        let mut agg = Aggregator::new(100, 24, 56);
        let mut t = ConnTable::new(Duration::from_secs(60), 10);
        for c in 0..20u64 {
            let mut s = stats_from([10, 0, 0, c as u8], 1000 + c as u16);
            s.bytes_in = c * 10;
            s.closed = u8::from(c % 3 == 0);
            t.observe(c, &s, &mut agg, now());
            let keys = ExchangeKeys {
                identity: (c % 2 == 0).then(|| format!("id-{c}")),
                forwarded: None,
            };
            t.on_request(
                c,
                remote_ip(&s),
                Progress::default(),
                keys,
                1,
                &mut agg,
                now(),
            );
        }
        assert!(!t.exchanges.is_empty() && !t.tombstones.is_empty());
        assert_eq!(
            serde_json::to_string(&t.saved()).expect("serialize"),
            serde_json::to_string(&t.state()).expect("serialize")
        );
    }

    #[test]
    fn closed_retention_is_bounded() {
        let mut agg = Aggregator::new(100, 24, 56);
        let mut t = ConnTable::new(Duration::from_secs(60), 3);
        for c in 0..10 {
            let mut s = stats(c as u16);
            s.closed = 1;
            t.observe(c, &s, &mut agg, now());
        }
        assert_eq!(t.rows().len(), 3);
        assert_eq!(t.closed_total, 10);
        t.expire(Instant::now() + Duration::from_secs(61));
        assert!(t.rows().is_empty());
    }
}
