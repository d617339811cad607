//! Types shared by the kernel programs (`sensor-ebpf`) and the agent (`sensor`).
//!
//! Every type is `#[repr(C)]` with explicit padding and no `bool`, so both sides agree on the
//! layout byte for byte; the size assertions below break the build if a field changes.
#![no_std]

/// Default capacity of the live-connection map (entries, one per open watched connection).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 65_536;
/// Default size of the ring buffer that carries closed-connection records (bytes, power of two).
pub const DEFAULT_RING_BYTES: u32 = 1 << 22;
/// Default size of the ring buffer that carries request events (bytes, power of two).
pub const DEFAULT_REQUEST_RING_BYTES: u32 = 1 << 23;

/// Version of the kernel/agent interface (map layouts). Pinned state from another version is
/// replaced, never reused.
pub const ABI_VERSION: u32 = 6;

/// Most bytes of an HTTP/1.x request head the kernel copies to the agent per request.
pub const HEAD_MAX: usize = 1024;
/// Bytes of an egress segment scanned for server-sent events, and of a response head scanned
/// for `text/event-stream`.
pub const SSE_SCAN_MAX: usize = 512;

/// `CONFIG` slots (u32 each), written by the agent.
pub const CONFIG_HEAD_BYTES: u32 = 0;
/// Most live connections with a record (`[capture] max_connections`); 0 = the default.
pub const CONFIG_MAX_CONNECTIONS: u32 = 1;
pub const CONFIG_SLOTS: u32 = 4;

/// `ConnStats::exchange_flags`: the current exchange's response has not started yet.
pub const EXCHANGE_RESPONSE_PENDING: u32 = 1;
/// `ConnStats::exchange_flags`: the current response is `text/event-stream`.
pub const EXCHANGE_SSE: u32 = 2;

/// `ConnStats::proto`: nothing seen from the client yet.
pub const PROTO_UNKNOWN: u8 = 0;
/// `ConnStats::proto`: the first client payload began with an HTTP/1.x request method.
pub const PROTO_HTTP1: u8 = 1;
/// `ConnStats::proto`: anything else (TLS, HTTP/2, ...): requests are counted as turns.
pub const PROTO_OTHER: u8 = 2;

/// `ConnStats::req_start` when no new exchange is expected (the client is mid-request).
pub const NO_EXCHANGE_PENDING: u64 = u64::MAX;

/// Map names, shared so the agent and the kernel object cannot drift apart.
pub const MAP_CONNS: &str = "CONNS";
pub const MAP_OPEN: &str = "OPEN";
pub const MAP_SOCKS: &str = "SOCKS";
pub const MAP_LIVE: &str = "LIVE";
pub const MAP_CLOSED: &str = "CLOSED";
pub const MAP_REQUESTS: &str = "REQUESTS";
pub const MAP_CONFIG: &str = "CONFIG";
pub const MAP_SCRATCH: &str = "SCRATCH";
pub const MAP_PORTS: &str = "PORTS";
pub const MAP_LOSS: &str = "LOSS";

/// How the agent reads live connections; the kernel programs keep records where that path
/// reads them. Chosen by the agent at load time (the read-only global `GLOBAL_LIVE_READ`), so
/// the verifier prunes the other path's code.
///
/// Socket storage (`SOCKS`) read through the `sensor_conns` iterator: the packet programs reach
/// the record through the packet's socket, no hash lookup. Needs a tracing program (the
/// iterator), which some kernels, lockdown modes and container policies refuse.
pub const LIVE_READ_ITERATOR: u32 = 0;
/// Live records in the cookie-keyed `OPEN` map (closed ones in `CONNS`, as on the iterator
/// path); the agent reads both with batch lookups. No tracing program at all.
pub const LIVE_READ_MAP: u32 = 1;
/// Symbol of the read-only global that holds the `LIVE_READ_*` path.
pub const GLOBAL_LIVE_READ: &str = "LIVE_READ";

/// Program names (the function names in `sensor-ebpf`).
pub const PROG_INGRESS: &str = "sensor_ingress";
pub const PROG_EGRESS: &str = "sensor_egress";
pub const PROG_SOCKOPS: &str = "sensor_sockops";
/// Iterator over the live records in `SOCKS` (`bpf_sk_storage_map` iterator).
pub const PROG_ITER: &str = "sensor_conns";

/// Per-connection counters: with the socket cookie, the socket storage (`SOCKS`) of a live
/// connection on the iterator path, the value of the `OPEN` map (keyed by socket cookie) on the
/// map path; the value of the `CONNS` map (keyed by socket cookie) once it closed.
///
/// Addresses are 16 bytes in network order; IPv4 is stored as an IPv4-mapped IPv6 address.
/// "in" is client -> this host, "out" is this host -> client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct ConnStats {
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    /// `AF_INET` or `AF_INET6` of the socket (a dual-stack socket may carry IPv4 traffic).
    pub family: u16,
    /// One of the `PROTO_*` constants.
    pub proto: u8,
    /// 1 once the connection closed. The kernel keeps the record and the agent deletes it after
    /// it has durably accounted it, so totals survive an agent crash at any moment.
    pub closed: u8,
    /// TCP payload bytes, each sequence number counted once (retransmissions excluded).
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// TCP segments as the kernel counts them (`ss -ti` segs_in / segs_out): a GRO/GSO packet
    /// counts as the number of segments it carries.
    pub packets_in: u64,
    pub packets_out: u64,
    /// HTTP/1.x requests, or request turns for other protocols (see docs/counters.md).
    pub requests: u64,
    /// `CLOCK_BOOTTIME` nanoseconds.
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// Sequence numbers of the first payload byte each way (ISN + 1).
    pub in_seq_base: u32,
    pub out_seq_base: u32,
    /// Ingress payload offset at which the next exchange is expected to start, or
    /// `NO_EXCHANGE_PENDING`.
    pub req_start: u64,
    /// Server-sent events (`data:` lines) in `text/event-stream` replies (see docs/counters.md).
    pub events_out: u64,
    /// `EXCHANGE_*` bits of the current request/response exchange.
    pub exchange_flags: u32,
    pub _pad: u32,
}

/// A connection record: the value of the `SOCKS` socket storage (live connections, read by the
/// agent through the `sensor_conns` iterator), and a record on the `CLOSED` ring buffer (the
/// final counters of a connection that closed).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClosedConn {
    pub cookie: u64,
    pub stats: ConnStats,
}

/// A record on the `REQUESTS` ring buffer: one request (or turn) began. Feeds the
/// inter-request timing statistics; the counts themselves are in `ConnStats`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestEvent {
    pub cookie: u64,
    /// `CLOCK_BOOTTIME` nanoseconds.
    pub ts_ns: u64,
    pub remote_addr: [u8; 16],
    /// The connection's counters where this exchange begins: the request's first byte, and
    /// the reply bytes and events sent before it. Exchanges split a connection's totals exactly.
    pub bytes_in_start: u64,
    pub bytes_out_start: u64,
    pub events_out_start: u64,
    /// Bytes of `head` that hold the start of the request (0 for non-HTTP turns).
    pub head_len: u16,
    pub _pad: [u8; 6],
    /// The first bytes of the request: head, possibly followed by the start of a body, which
    /// the agent discards unread.
    pub head: [u8; HEAD_MAX],
}

impl Default for RequestEvent {
    fn default() -> Self {
        Self {
            cookie: 0,
            ts_ns: 0,
            remote_addr: [0; 16],
            bytes_in_start: 0,
            bytes_out_start: 0,
            events_out_start: 0,
            head_len: 0,
            _pad: [0; 6],
            head: [0; HEAD_MAX],
        }
    }
}

/// Index into the per-CPU `LOSS` array: every way the kernel side can lose or skip data.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// A close notification did not fit in the ring buffer (the agent finds the closed record in
    /// the map at its next poll: a delay, not a loss).
    RingBufFull = 0,
    /// A new watched connection found the connection map full: it is not counted at all.
    ConnMapFull = 1,
    /// A packet of a watched connection whose headers could not be read (counted, not parsed).
    Unparsed = 2,
    /// A request event did not fit in its ring buffer: the request is counted, but its time is
    /// missing from the inter-request statistics.
    RequestEventsDropped = 3,
}

impl Loss {
    pub const ALL: [Loss; 4] = [
        Loss::RingBufFull,
        Loss::ConnMapFull,
        Loss::Unparsed,
        Loss::RequestEventsDropped,
    ];
    /// Number of slots in the `LOSS` map.
    pub const SLOTS: u32 = 8;

    pub const fn name(self) -> &'static str {
        match self {
            Loss::RingBufFull => "ringbuf_full",
            Loss::ConnMapFull => "conn_map_full",
            Loss::Unparsed => "unparsed_packets",
            Loss::RequestEventsDropped => "request_events_dropped",
        }
    }
}

const _: () = assert!(core::mem::size_of::<ConnStats>() == 128);
const _: () = assert!(core::mem::align_of::<ConnStats>() == 8);
const _: () = assert!(core::mem::size_of::<ClosedConn>() == 136);
const _: () = assert!(core::mem::size_of::<RequestEvent>() == 64 + HEAD_MAX);

#[cfg(feature = "user")]
mod user {
    // SAFETY: both are repr(C), contain only integers and byte arrays, and have no padding
    // (the size assertions above pin that), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::ConnStats {}
    unsafe impl aya::Pod for super::ClosedConn {}
    unsafe impl aya::Pod for super::RequestEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Field offsets the kernel object was compiled with; a reorder would silently corrupt reads.
    #[test]
    fn layout_is_stable() {
        assert_eq!(core::mem::offset_of!(ConnStats, local_port), 32);
        assert_eq!(core::mem::offset_of!(ConnStats, bytes_in), 40);
        assert_eq!(core::mem::offset_of!(ConnStats, first_seen_ns), 80);
        assert_eq!(core::mem::offset_of!(ConnStats, in_seq_base), 96);
        assert_eq!(core::mem::offset_of!(ConnStats, req_start), 104);
        assert_eq!(core::mem::offset_of!(ConnStats, events_out), 112);
        assert_eq!(core::mem::offset_of!(RequestEvent, head_len), 56);
        assert_eq!(core::mem::offset_of!(RequestEvent, head), 64);
        assert_eq!(core::mem::offset_of!(ClosedConn, stats), 8);
    }

    /// Records cross the kernel boundary as raw bytes: a byte copy must give the same value back.
    #[test]
    fn closed_conn_round_trips_through_bytes() {
        let rec = ClosedConn {
            cookie: 0x0102_0304_0506_0708,
            stats: ConnStats {
                local_addr: [7; 16],
                remote_addr: [9; 16],
                local_port: 8080,
                remote_port: 51000,
                family: 10,
                proto: PROTO_HTTP1,
                closed: 1,
                bytes_in: 1,
                bytes_out: 2,
                packets_in: 3,
                packets_out: 4,
                requests: 5,
                first_seen_ns: 6,
                last_seen_ns: 7,
                in_seq_base: 8,
                out_seq_base: 9,
                req_start: NO_EXCHANGE_PENDING,
                events_out: 10,
                exchange_flags: EXCHANGE_SSE,
                _pad: 0,
            },
        };
        let mut bytes = [0u8; core::mem::size_of::<ClosedConn>()];
        // SAFETY: ClosedConn is repr(C) without padding; copying its bytes is well defined.
        unsafe {
            core::ptr::copy_nonoverlapping(
                (&rec as *const ClosedConn).cast::<u8>(),
                bytes.as_mut_ptr(),
                bytes.len(),
            );
        }
        // SAFETY: bytes has the exact size and any bit pattern is a valid ClosedConn.
        let back: ClosedConn = unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast()) };
        assert_eq!(back, rec);
    }
}
