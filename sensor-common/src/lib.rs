//! Types shared by the kernel programs (`sensor-ebpf`) and the agent (`sensor`).
//!
//! Every type is `#[repr(C)]` with explicit padding and no `bool`, so both sides agree on the
//! layout byte for byte; the size assertions below break the build if a field changes.
#![no_std]

/// Default capacity of the live-connection map (entries, one per open watched connection).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 65_536;
/// Default size of the ring buffer that carries closed-connection records (bytes, power of two):
/// about 15 000 records of `LIVE_RECORD_BYTES` (and an 8-byte header each). A close that does
/// not fit waits in the closed-record map for the agent's next poll.
pub const DEFAULT_RING_BYTES: u32 = 1 << 21;
/// Default size of the ring buffer that carries request events (bytes, power of two):
/// ~7 500 events with a 500-byte head, 150 ms of 50 000 requests/s. 8 MiB before: the
/// agent's RSS counts a ring's pages twice (they are mapped twice), and the ring was a quarter
/// of the agent's RSS under load (BENCHMARKS.md).
pub const DEFAULT_REQUEST_RING_BYTES: u32 = 1 << 22;
/// Most slots of the array the iterator hands live records through by default (`LiveSlot`s,
/// 136 bytes each: 4.25 MiB). The agent sizes it for `max_connections`, up to this unless
/// `[capture] live_slots` says otherwise; records beyond go through the iterator's seq_file,
/// whose reads restart the walk of a bucket (see `LIVE_RECORD_BYTES`).
pub const DEFAULT_LIVE_SLOTS_MAX: u32 = 32_768;

/// Version of the kernel/agent interface (map layouts). Pinned state from another version is
/// replaced, never reused.
pub const ABI_VERSION: u32 = 10;

/// Most bytes of an HTTP/1.x request head the agent may ask the kernel to copy per request
/// (`[identity] head_bytes`). Heads longer than one event's `HEAD_CHUNK` come in several events.
pub const HEAD_BYTES_MAX: u32 = 64 * 1024;
/// Default `[identity] head_bytes`: uvicorn/h11 (vLLM, TGI's router, most Python servers)
/// refuses heads over 16 KiB, so a credential it accepts is never beyond the copy.
pub const DEFAULT_HEAD_BYTES: u32 = 16 * 1024;
/// Head bytes one request event carries at most (besides a method prefix); a head longer than
/// the first event's comes in further events. A typical head (a few hundred bytes) is one
/// event cut at its end, so the size only matters for long heads.
pub const HEAD_CHUNK: usize = 16 * 1024;
/// Longest request method the kernel keeps while it is split over segments (`G` | `ET /`); a
/// longer run of method characters counts as a request.
pub const METHOD_MAX: usize = 16;
/// Capacity of `RequestEvent::head`: a chunk and the method bytes that came in earlier segments.
pub const HEAD_EVENT_MAX: usize = HEAD_CHUNK + METHOD_MAX;
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

/// `Frame::mode`: not looking for a request start: the framing of the current request is not
/// known (a chunked or otherwise unframed body), so the next request starts a turn after the
/// server's reply.
pub const MODE_IDLE: u8 = 0;
/// `Frame::mode`: the client's next bytes start a request (after the server answered, at the
/// connection's start, or where the previous request's body ended), parsed from `cursor`.
pub const MODE_ARMED: u8 = 1;
/// `Frame::mode`: the turn's first bytes were not a request (a body after `100 Continue`
/// or an early reply, unframed): every later segment start is a candidate request start.
pub const MODE_BODY: u8 = 2;
/// `Frame::mode`: inside a request head: scanned for its end and its framing fields
/// (`Content-Length`, `Transfer-Encoding`).
pub const MODE_HEAD: u8 = 3;
/// `Frame::mode`: inside a `Content-Length` body, which ends at `Frame::req_end`; the next
/// request starts there.
pub const MODE_SKIP: u8 = 4;
/// `Frame::mode` flag: the current turn has been counted (a re-parse must not count it
/// again).
pub const MODE_COUNTED: u8 = 0x10;

/// `Frame::framing`: a `Content-Length` field was seen (its value is `content_length`).
pub const FRAMING_LENGTH: u8 = 1;
/// `Frame::framing`: the head's framing is not followed (a `Transfer-Encoding`, an invalid or
/// conflicting `Content-Length`): the request's end is found from turn-taking.
pub const FRAMING_UNKNOWN: u8 = 2;

/// `RequestEvent::kind`: a request (or turn) began; `head` holds its first bytes.
pub const EVENT_REQUEST: u8 = 0;
/// `RequestEvent::kind`: more bytes of the current request's head, at `head_offset`.
pub const EVENT_HEAD: u8 = 1;
/// `RequestEvent::flags`: the kernel copies no more of this head (its blank line is in this
/// event, the `head_bytes` bound was reached, or bytes were missed), unless a later event of
/// the same request rewinds it.
pub const HEAD_DONE: u8 = 1;
/// `RequestEvent::flags`: the request was counted from turn-taking; its first bytes passed
/// unseen (the handshake's final packet, a gap, or a long run of blank lines): no head.
pub const HEAD_UNSEEN: u8 = 2;
/// `RequestEvent::flags`: replaces every head byte from `head_offset` on. Bytes sent before
/// came from a segment TCP did not accept (a forged or corrupt copy) and are void.
pub const HEAD_REWIND: u8 = 4;

/// Map names, shared so the agent and the kernel object cannot drift apart.
pub const MAP_CONNS: &str = "CONNS";
pub const MAP_OPEN: &str = "OPEN";
pub const MAP_SOCKS: &str = "SOCKS";
pub const MAP_LIVE: &str = "LIVE";
pub const MAP_CLOSED: &str = "CLOSED";
pub const MAP_REQUESTS: &str = "REQUESTS";
pub const MAP_LIVE_RECORDS: &str = "LIVE_RECORDS";
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
/// map path; once it closed, its first `CLOSED_STATS_BYTES` are the value of the `CONNS` map
/// (`ClosedStats`, keyed by socket cookie).
///
/// Addresses are 16 bytes in network order; IPv4 is stored as an IPv4-mapped IPv6 address.
/// "in" is client -> this host, "out" is this host -> client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct ConnStats {
    #[cfg_attr(feature = "user", serde(with = "addr16"))]
    pub local_addr: [u8; 16],
    #[cfg_attr(feature = "user", serde(with = "addr16"))]
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
    /// Server-sent events (`data:` lines) in `text/event-stream` replies (see docs/counters.md).
    pub events_out: u64,
    /// `EXCHANGE_*` bits of the current request/response exchange.
    pub exchange_flags: u32,
    pub _pad: u32,
    /// The kernel's request parser; not part of what the agent reports or saves.
    #[cfg_attr(feature = "user", serde(skip))]
    pub parse: ParseState,
}

/// Where the kernel's request parser stands on a connection. Positions are client payload
/// offsets (bytes past ISN + 1), the same scale as `bytes_in` and TCP's `bytes_received`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParseState {
    /// The parser as it stands.
    pub live: Frame,
    /// The parser as it stood at a point where TCP had accepted every byte it had read: a
    /// segment that sends again bytes the parser read but TCP has not accepted (TCP dropped the
    /// first copy: corrupt or forged) makes it go back here and read the new copy.
    pub snap: Frame,
    /// End of the furthest segment that was in order when it passed (TCP may still have it in
    /// its backlog); segments up to here are parsed, later ones wait for TCP.
    pub in_order_end: u64,
    /// One past the position of a FIN seen in order + 1 (0: none): TCP counts an accepted FIN
    /// as one byte of `bytes_received`, which is not payload.
    pub fin_end: u64,
    /// Requests counted since `snap` was taken (taken back if the parser goes back to it).
    pub since_snap: u64,
    /// The kernel tick (`jiffies`) in which `last_seen_ns` was last read from the clock: bulk
    /// data refreshes it once per tick, not per packet (see docs/counters.md).
    pub clock_tick: u64,
}

/// The request parser's position and state (see `ParseState`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frame {
    /// Where the current exchange began (the first client byte after the server's last reply,
    /// where the previous request's body ended, or the segment start a body-mode candidate
    /// began at): the request's `bytes_in_start`.
    pub turn_start: u64,
    /// The first byte of the method being parsed (after blank lines).
    pub req_begin: u64,
    /// The next byte the parser examines.
    pub cursor: u64,
    /// `MODE_SKIP`: where the current request's body ends.
    pub req_end: u64,
    /// Head capture of the current request: its first byte, the next byte to copy, and where
    /// copying stops (the head's end once found, at most `head_from + head_bytes`).
    pub head_from: u64,
    pub head_next: u64,
    pub head_limit: u64,
    /// The head's `Content-Length` (valid with `FRAMING_LENGTH`), and the value being read.
    pub content_length: u64,
    pub length_value: u64,
    /// Method bytes seen so far (they may come in earlier segments than the rest of the head).
    pub method: [u8; METHOD_MAX],
    /// `MODE_*`.
    pub mode: u8,
    pub method_len: u8,
    /// Head scanner: where in a line it is (`LINE_*` in the kernel crate), how many bytes of a
    /// field name matched, which names still match, `FRAMING_*` bits, and the digits of the
    /// `Content-Length` value read (high bit: whitespace after them).
    pub line: u8,
    pub name_len: u8,
    pub names: u8,
    pub framing: u8,
    pub digits: u8,
    /// The current request's head events: 0 before the first, 1 while they go on, 2 after the last.
    pub head_events: u8,
}

/// A connection record: the value of the `SOCKS` socket storage (live connections, read by the
/// agent through the `sensor_conns` iterator). The iterator's records and those of the
/// `CLOSED` ring buffer (the final counters of a connection that closed) are its first
/// `LIVE_RECORD_BYTES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClosedConn {
    pub cookie: u64,
    pub stats: ConnStats,
}

/// Bytes of a record the agent reads from the `sensor_conns` iterator (from the `LIVE_RECORDS`
/// array, or its seq_file for records beyond the array) and the `CLOSED` ring:
/// the `ClosedConn` up to the kernel's parser state (the cookie and everything the agent
/// reports), which is the larger part of the record and of no use to the agent. The kernel's
/// seq_file hands the reader at most 32 KiB per read and restarts its walk of a socket-storage
/// bucket at every read, so the records' size sets how often a walk of every live connection
/// starts over; on the ring it sets how many closes fit.
pub const LIVE_RECORD_BYTES: usize =
    core::mem::offset_of!(ClosedConn, stats) + core::mem::offset_of!(ConnStats, parse);

/// One slot of the `LIVE_RECORDS` array: the `seq_num`-th record of an iterator walk, tagged
/// with the walk's session (`bpf_iter_meta::session_id`, unique per open of the iterator) so
/// the agent can tell its walk's records from an earlier or concurrent walk's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveSlot {
    pub session: u64,
    pub record: [u8; LIVE_RECORD_BYTES],
}
const _: () = assert!(core::mem::size_of::<LiveSlot>() == 8 + LIVE_RECORD_BYTES);

/// What the iterator writes to its seq_file when a walk ends, after the records that did not go
/// into the array: the walk's session, `bpf_iter_meta::seq_num` at the end (the last record's
/// number, one less than the records handed over, or 0 when there was none), and how many
/// records it wrote to slots 0.. (0 when another walk held the array and every record went to
/// the seq_file).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveWalkEnd {
    pub session: u64,
    pub last: u64,
    pub in_slots: u64,
}
const _: () = assert!(core::mem::size_of::<LiveWalkEnd>() == 24);

/// A record on the `REQUESTS` ring buffer: a request (or turn) began (`EVENT_REQUEST`), or more
/// bytes of its head (`EVENT_HEAD`). Feeds identity and the inter-request timing statistics;
/// the counts themselves are in `ConnStats`. Records are cut after `head_skip + head_len` bytes
/// of `head`.
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
    /// Client payload offset of the first head byte this record carries.
    pub head_offset: u64,
    /// Bytes of `head`, from `head_skip`, that hold request bytes (0 for non-HTTP turns).
    pub head_len: u16,
    /// `EVENT_*`.
    pub kind: u8,
    /// `HEAD_*` bits.
    pub flags: u8,
    /// Where the request bytes begin in `head` (bytes before it are unused).
    pub head_skip: u8,
    pub _pad: [u8; 3],
    /// Request bytes: the head, possibly followed by the start of a body, which the agent
    /// discards unread.
    pub head: [u8; HEAD_EVENT_MAX],
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
            head_offset: 0,
            head_len: 0,
            kind: EVENT_REQUEST,
            flags: 0,
            head_skip: 0,
            _pad: [0; 3],
            head: [0; HEAD_EVENT_MAX],
        }
    }
}

impl RequestEvent {
    /// The request bytes this record carries (bounded by the array whatever the fields say).
    pub fn head_bytes(&self) -> &[u8] {
        let from = usize::from(self.head_skip).min(HEAD_EVENT_MAX);
        let to = (from + usize::from(self.head_len)).min(HEAD_EVENT_MAX);
        &self.head[from..to]
    }
}

/// Index into the per-CPU `LOSS` array: every way the kernel side can lose or skip data.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// A close notification did not fit in the ring buffer (the agent finds the closed record in
    /// the map at its next poll: a delay, not a loss).
    RingBufFull = 0,
    /// A new watched connection found the live-connection table full (`max_connections`): it
    /// is not counted at all.
    ConnMapFull = 1,
    /// A packet of a watched connection whose headers could not be read (counted, not parsed).
    Unparsed = 2,
    /// A request event did not fit in its ring buffer: the request is counted, but its time is
    /// missing from the inter-request statistics.
    RequestEventsDropped = 3,
    /// A closed connection's final record did not fit in the closed-record map (it holds
    /// `max_connections` until the agent has saved them): it reaches the agent through the
    /// ring buffer, counted exactly, but an agent crash before that drain would lose it.
    /// Exposure, not a loss.
    ClosedMapFull = 4,
    /// A closed connection's final record fit neither the closed-record map nor the ring
    /// buffer: what the connection carried since the agent's last read of it is lost.
    ClosedLost = 5,
}

impl Loss {
    pub const ALL: [Loss; 6] = [
        Loss::RingBufFull,
        Loss::ConnMapFull,
        Loss::Unparsed,
        Loss::RequestEventsDropped,
        Loss::ClosedMapFull,
        Loss::ClosedLost,
    ];
    /// Number of slots in the `LOSS` map.
    pub const SLOTS: u32 = 8;

    pub const fn name(self) -> &'static str {
        match self {
            Loss::RingBufFull => "ringbuf_full",
            Loss::ConnMapFull => "conn_map_full",
            Loss::Unparsed => "unparsed_packets",
            Loss::RequestEventsDropped => "request_events_dropped",
            Loss::ClosedMapFull => "closed_map_full",
            Loss::ClosedLost => "closed_lost",
        }
    }
}

const _: () = assert!(core::mem::size_of::<Frame>() == 96);
const _: () = assert!(core::mem::size_of::<ParseState>() == 2 * 96 + 32);
const _: () = assert!(core::mem::size_of::<ConnStats>() == 120 + 224);
const _: () = assert!(core::mem::align_of::<ConnStats>() == 8);
const _: () = assert!(core::mem::size_of::<ClosedConn>() == 8 + 120 + 224);
// The parser state is the record's tail: the live record is a prefix of `ClosedConn`.
const _: () = assert!(
    core::mem::offset_of!(ConnStats, parse) + core::mem::size_of::<ParseState>()
        == core::mem::size_of::<ConnStats>()
);
const _: () = assert!(LIVE_RECORD_BYTES == 128 && LIVE_RECORD_BYTES.is_multiple_of(8));

/// A record on the `CLOSED` ring: the first `LIVE_RECORD_BYTES` of a `ClosedConn`, as words
/// (the kernel copies them from the connection's record; the agent decodes them as a live
/// record).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ClosedRecord {
    pub words: [u64; LIVE_RECORD_BYTES / 8],
}

const _: () = assert!(core::mem::size_of::<ClosedRecord>() == LIVE_RECORD_BYTES);

/// Bytes of a `ConnStats` the closed-record map (`CONNS`) keeps: everything up to the
/// kernel's parser state, which the agent does not read. The map is preallocated for
/// `max_connections` records, and the close copies one in: a third of the whole record.
pub const CLOSED_STATS_BYTES: usize = core::mem::offset_of!(ConnStats, parse);

/// A value of `CONNS`: the first `CLOSED_STATS_BYTES` of a closed connection's `ConnStats`, as
/// words (the agent decodes them as a `ConnStats` with a zero parser state).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClosedStats {
    pub words: [u64; CLOSED_STATS_BYTES / 8],
}

const _: () = assert!(core::mem::size_of::<ClosedStats>() == CLOSED_STATS_BYTES);
const _: () = assert!(CLOSED_STATS_BYTES == 120 && LIVE_RECORD_BYTES == 8 + CLOSED_STATS_BYTES);
// `ConnStats` is 8-byte aligned, so its prefix can be read as `ClosedStats` in place.
const _: () = assert!(core::mem::align_of::<ConnStats>() == core::mem::align_of::<ClosedStats>());
const _: () = assert!(core::mem::size_of::<RequestEvent>() == 72 + HEAD_EVENT_MAX);
const _: () = assert!(HEAD_EVENT_MAX.is_multiple_of(8) && HEAD_CHUNK.is_power_of_two());
const _: () = assert!(METHOD_MAX.is_power_of_two() && METHOD_MAX <= 255);

impl ConnStats {
    /// The record a `CONNS` value holds, with a zero parser state.
    pub fn from_closed(closed: &ClosedStats) -> Self {
        let mut stats = Self::default();
        // SAFETY: ConnStats is repr(C) plain data of integers and byte arrays with no padding;
        // its first CLOSED_STATS_BYTES are what ClosedStats holds (offset_of above), and any
        // bytes are a valid value.
        unsafe {
            core::ptr::copy_nonoverlapping(
                closed.words.as_ptr().cast::<u8>(),
                core::ptr::from_mut(&mut stats).cast::<u8>(),
                CLOSED_STATS_BYTES,
            );
        }
        stats
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: both are repr(C), contain only integers and byte arrays, and have no padding
    // (the size assertions above pin that), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::ConnStats {}
    unsafe impl aya::Pod for super::ParseState {}
    unsafe impl aya::Pod for super::Frame {}
    unsafe impl aya::Pod for super::ClosedConn {}
    unsafe impl aya::Pod for super::RequestEvent {}
    unsafe impl aya::Pod for super::ClosedStats {}
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
        assert_eq!(core::mem::offset_of!(ConnStats, events_out), 104);
        assert_eq!(core::mem::offset_of!(ConnStats, exchange_flags), 112);
        assert_eq!(core::mem::offset_of!(ConnStats, parse), 120);
        assert_eq!(core::mem::offset_of!(Frame, method), 72);
        assert_eq!(core::mem::offset_of!(Frame, mode), 88);
        assert_eq!(core::mem::offset_of!(ParseState, snap), 96);
        assert_eq!(core::mem::offset_of!(ParseState, since_snap), 208);
        assert_eq!(core::mem::offset_of!(ParseState, clock_tick), 216);
        assert_eq!(core::mem::offset_of!(RequestEvent, head_offset), 56);
        assert_eq!(core::mem::offset_of!(RequestEvent, head_len), 64);
        assert_eq!(core::mem::offset_of!(RequestEvent, head_skip), 68);
        assert_eq!(core::mem::offset_of!(RequestEvent, head), 72);
        assert_eq!(core::mem::offset_of!(ClosedConn, stats), 8);
    }

    /// A closed record's map value is the record's prefix: read back, it is the record with a
    /// zero parser state.
    #[test]
    fn closed_stats_are_the_record_without_its_parser_state() {
        let mut stats = ConnStats {
            local_addr: [7; 16],
            remote_addr: [9; 16],
            local_port: 8080,
            remote_port: 51000,
            bytes_in: 11,
            bytes_out: 22,
            requests: 3,
            events_out: 4,
            exchange_flags: 5,
            closed: 1,
            ..Default::default()
        };
        stats.parse.since_snap = 9;
        // SAFETY: ConnStats starts with the CLOSED_STATS_BYTES that ClosedStats holds, and
        // both are 8-byte aligned plain data.
        let closed = unsafe { *core::ptr::from_ref(&stats).cast::<ClosedStats>() };
        let back = ConnStats::from_closed(&closed);
        stats.parse = ParseState::default();
        assert_eq!(back, stats);
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
                events_out: 10,
                exchange_flags: EXCHANGE_SSE,
                _pad: 0,
                parse: ParseState {
                    live: Frame {
                        turn_start: 11,
                        req_begin: 12,
                        cursor: 13,
                        req_end: 14,
                        head_from: 15,
                        head_next: 16,
                        head_limit: 17,
                        content_length: 18,
                        length_value: 19,
                        method: *b"PROPFIND\0\0\0\0\0\0\0\0",
                        mode: MODE_BODY | MODE_COUNTED,
                        method_len: 8,
                        line: 1,
                        name_len: 2,
                        names: 3,
                        framing: FRAMING_LENGTH,
                        digits: 4,
                        head_events: 1,
                    },
                    snap: Frame {
                        mode: MODE_SKIP,
                        req_end: 20,
                        ..Frame::default()
                    },
                    in_order_end: 21,
                    fin_end: 22,
                    since_snap: 23,
                    clock_tick: 24,
                },
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

/// A 16-byte address as an array of numbers in human-readable formats (JSON, as before), as
/// one byte string in binary ones: the agent's snapshot holds two per live connection, and
/// sixteen numbers each were most of what it wrote for them.
#[cfg(feature = "user")]
mod addr16 {
    use serde::{Deserialize as _, Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(a: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            serde::Serialize::serialize(a, s)
        } else {
            s.serialize_bytes(a)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 16], D::Error> {
        if d.is_human_readable() {
            return <[u8; 16]>::deserialize(d);
        }
        struct Bytes;
        impl de::Visitor<'_> for Bytes {
            type Value = [u8; 16];
            fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str("16 bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                v.try_into().map_err(|_| E::invalid_length(v.len(), &self))
            }
        }
        d.deserialize_bytes(Bytes)
    }
}
