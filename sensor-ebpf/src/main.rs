//! Kernel programs of the traffic sensor.
//!
//! * `sensor_sockops` (sock_ops, cgroup): opens a record when a connection to a watched local
//!   port is established and, when the connection closes, marks it closed and pushes its final
//!   counters to the agent through the `CLOSED` ring buffer. The agent frees the record once it
//!   has durably accounted it, so a crashed agent finds every closed connection on restart.
//! * `sensor_ingress` / `sensor_egress` (cgroup_skb): count payload bytes and requests of every
//!   packet of a recorded connection with data or a FIN, copying TCP's own segment counts into
//!   its record; pure ACKs return before the record lookup (see `packet`).
//! * `sensor_conns` (iterator over `SOCKS`): how the agent reads live records on the iterator
//!   path. It is a tracing program, which some kernels refuse; on the map path it is never
//!   loaded and live records sit in `OPEN` instead (see `LIVE_READ`).
//!
//! A passive sensor never drops or alters traffic: every program returns "allow" on every path.
#![no_std]
#![no_main]
// The bpf target has no `AtomicU64` read-modify-write methods; the intrinsics lower to the
// kernel's BPF atomic instructions (BPF_ATOMIC add and cmpxchg, kernel >= 5.12).
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "core_intrinsics is the only way to BPF atomics"
)]

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd, atomic_xchg},
};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        __sk_buff, BPF_ANY, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_NOEXIST,
        BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE, BPF_TCP_LISTEN, BPF_TCP_NEW_SYN_RECV,
        BPF_TCP_TIME_WAIT, bpf_tcp_sock, seq_file,
    },
    btf_maps::SkStorage,
    helpers::{
        bpf_get_socket_cookie, bpf_jiffies64, bpf_ktime_get_boot_ns, bpf_ktime_get_ns, bpf_loop,
        bpf_seq_write, bpf_sk_storage_delete, bpf_sk_storage_get, bpf_skb_load_bytes, bpf_tcp_sock,
    },
    macros::{btf_map, cgroup_skb, map, sock_ops},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{SkBuffContext, SockOpsContext},
};
use aya_log_ebpf::warn;
use sensor_common::{
    CONFIG_HEAD_BYTES, CONFIG_MAX_CONNECTIONS, CONFIG_SLOTS, ClosedConn, ClosedRecord, ClosedStats,
    ConnStats, DEFAULT_MAX_CONNECTIONS, DEFAULT_REQUEST_RING_BYTES, DEFAULT_RING_BYTES, EVENT_HEAD,
    EVENT_REQUEST, EXCHANGE_RESPONSE_PENDING, EXCHANGE_SSE, FRAMING_LENGTH, FRAMING_UNKNOWN, Frame,
    HEAD_BYTES_MAX, HEAD_CHUNK, HEAD_DONE, HEAD_EVENT_MAX, HEAD_REWIND, HEAD_UNSEEN,
    LIVE_READ_ITERATOR, LIVE_READ_MAP, LIVE_RECORD_BYTES, LiveSlot, LiveWalkEnd, Loss, METHOD_MAX,
    MODE_ARMED, MODE_BODY, MODE_COUNTED, MODE_HEAD, MODE_IDLE, MODE_SKIP, PROTO_HTTP1, PROTO_OTHER,
    PROTO_UNKNOWN, RequestEvent, SSE_SCAN_MAX,
};

/// cgroup_skb verdict that lets the packet through.
const ALLOW: i32 = 1;
const AF_INET: u16 = 2;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_DSTOPTS: u8 = 60;
/// IPv6 extension headers followed before TCP.
const MAX_EXT_HEADERS: usize = 4;
const IPV6_HEADER_LEN: usize = 40;
const TCP_FIN: u8 = 0x01;
const TCP_ACK: u8 = 0x10;
/// The state bits of `ParseState::mode` (the rest are flags).
const MODE_STATE: u8 = 0x0f;
// Copy sizes are powers of two so that `load_into` can bound lengths with a mask.
const _: () = assert!(HEAD_CHUNK.is_power_of_two() && SSE_SCAN_MAX.is_power_of_two());
const _: () = assert!(core::mem::size_of::<ClosedConn>() % 8 == 0);
/// Largest header length before TCP that is parsed: an IPv6 header and up to 512 bytes of
/// extension headers (BIG TCP's hop-by-hop header is 8, a destination-options header usually
/// 8 or 16); IPv4 headers are at most 60.
const MAX_L4_OFFSET: usize = IPV6_HEADER_LEN + 512;
/// Attempts at the compare-and-swap that advances a byte counter; two CPUs racing on one
/// direction of one connection is rare, three rounds always settle it in practice.
const CAS_ATTEMPTS: usize = 3;

/// Where live records are kept and how the agent reads them (`LIVE_READ_*`), written by the
/// agent at load time. A read-only global: the kernel freezes it, the verifier reads it as a
/// constant and removes the branches of the other path, so the choice costs nothing per packet.
#[unsafe(no_mangle)]
static LIVE_READ: u32 = LIVE_READ_ITERATOR;

/// True on the map path (live records in `OPEN`), false on the iterator path (`SOCKS`).
#[inline(always)]
fn map_path() -> bool {
    // SAFETY: a plain read of a global; volatile so the compiler keeps the load of the value
    // the agent sets instead of folding in the default.
    unsafe { core::ptr::read_volatile(&raw const LIVE_READ) == LIVE_READ_MAP }
}

/// Live connections on the iterator path: the record (socket cookie and counters) lives in the
/// socket's own storage, which the packet programs reach through the socket the packet points
/// to (no hash lookup). The agent reads them through the `sensor_conns` iterator; the kernel
/// frees a record with its socket.
#[btf_map]
static SOCKS: SkStorage<ClosedConn> = SkStorage::new();

/// Number of records in `SOCKS` (slot 0), bounded by `CONFIG_MAX_CONNECTIONS`.
#[map]
static LIVE: Array<u64> = Array::with_max_entries(1, 0);

/// Live connections on the map path, keyed by socket cookie; the close moves the record to
/// `CONNS`. A map of its own, bounded by `max_connections` like `LIVE` on the iterator path, so
/// closed records waiting for the agent can never crowd out live ones. Not preallocated: a
/// deleted element is freed after an RCU grace period instead of being reused at once, so a
/// packet program that found the record just before the close never writes into another
/// connection's record. The agent sizes it at load time.
#[map]
static OPEN: HashMap<u64, ConnStats> =
    HashMap::with_max_entries(DEFAULT_MAX_CONNECTIONS, BPF_F_NO_PREALLOC);

/// Closed connections, keyed by socket cookie: the final record without its parser state
/// (`ClosedStats`), kept until the agent has accounted it durably and deletes it. The agent
/// sizes it at load time. Preallocated (a close then takes a free element instead of
/// allocating one, which measured slower).
#[map]
static CONNS: HashMap<u64, ClosedStats> = HashMap::with_max_entries(DEFAULT_MAX_CONNECTIONS, 0);

/// Final counters of closed connections, read by the agent.
#[map]
static CLOSED: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// Live records on the iterator path, written by `sensor_conns` during a walk (the walk's n-th
/// record in slot n) and read by the agent, which maps the array into its memory, right after
/// it. The agent sizes it (`DEFAULT_LIVE_SLOTS_MAX` by default; one slot on the map path, where
/// it is unused).
#[map]
static LIVE_RECORDS: Array<LiveSlot> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Which walk holds `LIVE_RECORDS`: its session, when it took it, and how many records it has
/// written to slots (0..count). A walk takes the array at
/// its first record if no other walk holds it (or the holder took it over `LIVE_CLAIM_NS` ago:
/// a reader that closed the link before the end never gives it back), and gives it back at its
/// end. A walk that finds it held writes its records to the seq_file, so two readers of the
/// link never write each other's slots.
#[map]
static LIVE_OWNER: Array<[u64; 3]> = Array::with_max_entries(1, 0);

/// How long a walk may hold `LIVE_RECORDS` before another may take it (a walk of every slot
/// takes milliseconds).
const LIVE_CLAIM_NS: u64 = 1_000_000_000;

/// Request start events, for inter-request timing in the agent. Records are as long as the
/// head they carry (`RequestEvent` cut after `head_len` bytes of `head`).
#[map]
static REQUESTS: RingBuf = RingBuf::with_byte_size(DEFAULT_REQUEST_RING_BYTES, 0);

/// Per-CPU space where a request event is put together before it is copied to `REQUESTS`:
/// a variable-length record needs `bpf_ringbuf_output`, and a compact ring (a typical request
/// head is a few hundred bytes, not the 16 KiB maximum) runs through far fewer cache lines
/// per request. Used by the ingress program only.
#[map]
static REQUEST_SCRATCH: PerCpuArray<RequestEvent> = PerCpuArray::with_max_entries(1, 0);

/// Watched local ports: index = port, value 1 = watched. Filled by the agent.
#[map]
static PORTS: Array<u8> = Array::with_max_entries(65_536, 0);

/// Settings the agent writes, indexed by `sensor_common::CONFIG_*`.
#[map]
static CONFIG: Array<u32> = Array::with_max_entries(CONFIG_SLOTS, 0);

/// Per-CPU scratch space for scanning reply bytes (too large for the 512-byte stack).
#[repr(C)]
struct Scratch {
    /// Two words of slack after the copied bytes: the word-wise scans read them (zeroed).
    bytes: [u8; SSE_SCAN_MAX + 16],
    /// Matches found by a scan. Kept in memory rather than in a register: the verifier does
    /// not track memory contents, so a count does not multiply the paths it explores.
    found: u64,
    /// Bytes in `bytes`, handed to the scans through memory for the same reason: a length in
    /// a register is one scalar with the caller's, and every loop exit would narrow the
    /// caller's copy differently, making the verifier walk the rest of the program once per
    /// exit.
    len: u64,
}

#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Loss and skip counters, indexed by `sensor_common::Loss`.
#[map]
static LOSS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Loss::SLOTS, 0);

/// Why a packet could not be parsed; every case is counted as `Loss::Unparsed`.
struct Unparsed;

fn count_loss(kind: Loss) {
    if let Some(slot) = LOSS.get_ptr_mut(kind as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *slot += 1 };
    }
}

fn socks() -> *mut c_void {
    (&raw const SOCKS).cast_mut().cast()
}

/// The connection record in a socket's storage, if the socket has one.
///
/// SAFETY: `sk` is a socket pointer the verifier knows as such (non-null).
#[inline(always)]
unsafe fn record_of(sk: *mut c_void) -> *mut ClosedConn {
    // SAFETY: per the contract; no value and no flags: look up only.
    unsafe { bpf_sk_storage_get(socks(), sk, core::ptr::null_mut(), 0) }.cast()
}

/// Takes a slot for a new live record; false when `max_connections` are live already.
fn take_live_slot() -> bool {
    let Some(live) = LIVE.get_ptr_mut(0) else {
        return false;
    };
    let max = match CONFIG.get(CONFIG_MAX_CONNECTIONS) {
        Some(&n) if n > 0 => u64::from(n),
        _ => u64::from(DEFAULT_MAX_CONNECTIONS),
    };
    // SAFETY: live points into a map value. Add, then check (the bpf target has no fetch-add):
    // two connections racing for the last slot may both be refused, never both admitted.
    unsafe {
        atomic_add(live, 1);
        if read_shared(live) > max {
            atomic_add(live, u64::MAX);
            return false;
        }
    }
    true
}

/// Gives back a slot taken by `take_live_slot`.
fn release_live_slot() {
    if let Some(live) = LIVE.get_ptr_mut(0) {
        // SAFETY: live points into a map value; adding u64::MAX subtracts one.
        unsafe { atomic_add(live, u64::MAX) };
    }
}

fn watched(port: u32) -> bool {
    matches!(PORTS.get(port), Some(&1))
}

fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// The kernel's tick count (`jiffies`): a load, where a clock read goes through the clock
/// source (about as much as the rest of a bulk packet's work in a VM).
fn tick() -> u64 {
    // SAFETY: helper without arguments (a privileged helper: the agent loads with CAP_BPF).
    unsafe { bpf_jiffies64() }
}

/// Whether a client packet may begin a request whose event carries this packet's
/// `last_seen_ns` as the request's time: on HTTP and unclassified connections any may. On
/// other protocols the turn (`other_turn`) and a reclassification (`client_segment`) read the
/// clock themselves: a reply arming the turn on another CPU meanwhile cannot date it early.
#[inline(always)]
fn may_begin_request(stats: &ConnStats) -> bool {
    stats.proto != PROTO_OTHER
}

/// Atomically adds to a `u64` field of a map value.
///
/// SAFETY: `field` points into a live map value (8-byte aligned).
unsafe fn atomic_add(field: *mut u64, value: u64) {
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, value) };
}

/// Compare-and-swap on a `u64` field of a map value; true when `new` was stored.
///
/// SAFETY: as `atomic_add`.
unsafe fn atomic_replace(field: *mut u64, current: u64, new: u64) -> bool {
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
            field, current, new,
        )
    }
    .1
}

/// Reads a `u64` field that other CPUs may update.
///
/// SAFETY: as `atomic_add`.
unsafe fn read_shared(field: *const u64) -> u64 {
    unsafe { core::ptr::read_volatile(field) }
}

// --- sock_ops: connection lifecycle -------------------------------------------------------

#[sock_ops]
pub fn sensor_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            // Logged from here, not from open_connection: its record takes most of the 512
            // bytes of stack the whole call chain may use.
            if let Some(port) = open_connection(&ctx) {
                no_room(&ctx, port);
            }
        }
        // args[1] is the new state (include/net/tcp_states.h).
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => close_connection(&ctx),
        _ => {}
    }
    // sock_ops return values are ignored for these callbacks; 1 means "ok".
    1
}

/// A client connected to a local port: record it if the port is watched.
///
/// Runs when the server side reaches ESTABLISHED (tcp_init_transfer), before the payload of
/// the handshake's final ACK, if any, is queued: rcv_nxt and snd_nxt are then ISN + 1 each way.
/// Returns the port of a watched connection that found no room for its record.
// A subprogram of its own, so its locals do not add to its caller's stack.
#[inline(never)]
fn open_connection(ctx: &SockOpsContext) -> Option<u16> {
    if !watched(ctx.local_port()) {
        return None;
    }
    let ops = ctx.ops;
    // SAFETY: ops is the context pointer the kernel passed; the fields are readable for
    // full sockets, which PASSIVE_ESTABLISHED always has.
    let (rcv_nxt, snd_nxt, segs_in, segs_out) = unsafe {
        (
            (*ops).rcv_nxt,
            (*ops).snd_nxt,
            (*ops).segs_in,
            (*ops).segs_out,
        )
    };
    let family = ctx.family() as u16;
    let (local_addr, remote_addr) = if family == AF_INET {
        (v4_mapped(ctx.local_ip4()), v4_mapped(ctx.remote_ip4()))
    } else {
        // SAFETY: context pointer; each word is read with its own constant ctx offset, which
        // the verifier requires (copying the array would go through a derived pointer).
        unsafe {
            (
                ip6_bytes(read_words(&raw const (*ops).local_ip6)),
                ip6_bytes(read_words(&raw const (*ops).remote_ip6)),
            )
        }
    };
    let port = ctx.local_port() as u16;
    // SAFETY: the context is a sock_ops context, which bpf_get_socket_cookie accepts.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // The record is made zeroed where it lives and filled in place: it is larger than the
    // 512 bytes of stack the whole call chain may use.
    let stats = if map_path() {
        new_in_map(cookie)
    } else {
        new_in_storage(ctx, cookie)
    };
    if stats.is_null() {
        count_loss(Loss::ConnMapFull);
        return Some(port);
    }
    let now = now_ns();
    // SAFETY: stats points at the new, zeroed record (a live map value).
    unsafe {
        (*stats).local_addr = local_addr;
        (*stats).remote_addr = remote_addr;
        (*stats).local_port = port;
        // remote_port holds the port in network order in its upper half on little endian
        // (sock_ops_convert_ctx_access shifts it); ntohl gives the host-order port.
        (*stats).remote_port = u32::from_be(ctx.remote_port()) as u16;
        (*stats).family = family;
        (*stats).proto = PROTO_UNKNOWN;
        // The handshake segments were counted by the kernel before the record existed.
        (*stats).packets_in = u64::from(segs_in);
        (*stats).packets_out = u64::from(segs_out);
        (*stats).first_seen_ns = now;
        (*stats).last_seen_ns = now;
        (*stats).in_seq_base = rcv_nxt;
        (*stats).out_seq_base = snd_nxt;
        // The client's first bytes start the first request.
        (*stats).parse.live.mode = MODE_ARMED;
    }
    if watch_close(ctx) {
        return None;
    }
    if map_path() {
        let _ = OPEN.remove(&cookie);
    } else {
        // SAFETY: context pointer; sk is the full socket new_in_storage found non-null.
        let sk: *mut c_void = unsafe { (*ctx.ops).__bindgen_anon_2.sk }.cast();
        if !sk.is_null() {
            // SAFETY: a non-null full socket.
            unsafe { bpf_sk_storage_delete(socks(), sk) };
            release_live_slot();
        }
    }
    count_loss(Loss::ConnMapFull);
    Some(port)
}

/// An all-zero record, the initial value of a new `OPEN` entry (read-only data).
static ZERO_STATS: [u64; core::mem::size_of::<ConnStats>() / 8] =
    [0; core::mem::size_of::<ConnStats>() / 8];
const _: () = assert!(core::mem::size_of::<ConnStats>() % 8 == 0);

/// Logs a connection that found no room for its record (the log record is built on the
/// stack).
#[inline(never)]
fn no_room(ctx: &SockOpsContext, port: u16) {
    warn!(
        ctx,
        "no room for a connection record: port {} not counted", port
    );
}

/// Map path: a zeroed live record in OPEN under the socket's cookie; null when
/// `max_connections` are live already.
#[inline(always)]
fn new_in_map(cookie: u64) -> *mut ConnStats {
    // SAFETY: ZERO_STATS has ConnStats' size and 8-byte alignment, and all zero is a valid
    // ConnStats.
    let zero = unsafe { &*(&raw const ZERO_STATS).cast::<ConnStats>() };
    // NOEXIST: a cookie is never reused while the kernel runs, so an existing entry would be a
    // second callback for the same socket, whose counts must not restart.
    if OPEN.insert(&cookie, zero, u64::from(BPF_NOEXIST)).is_err() {
        return core::ptr::null_mut();
    }
    OPEN.get_ptr_mut(&cookie).unwrap_or(core::ptr::null_mut())
}

/// Iterator path: a zeroed live record in the socket's own storage; null when
/// `max_connections` are live already, the kernel has no storage for it, or the socket has a
/// record already (a second callback, whose counts must not restart).
#[inline(always)]
fn new_in_storage(ctx: &SockOpsContext, cookie: u64) -> *mut ConnStats {
    // SAFETY: context pointer; sk is the full socket (NULL otherwise).
    let sk: *mut c_void = unsafe { (*ctx.ops).__bindgen_anon_2.sk }.cast();
    if sk.is_null() || !take_live_slot() {
        return core::ptr::null_mut();
    }
    // SAFETY: sk is a non-null full socket; no initial value: the kernel zeroes new storage.
    let record: *mut ClosedConn = unsafe {
        bpf_sk_storage_get(
            socks(),
            sk,
            core::ptr::null_mut(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
    }
    .cast();
    if record.is_null() {
        release_live_slot();
        return core::ptr::null_mut();
    }
    // SAFETY: record points into the socket's live storage.
    unsafe {
        if (*record).cookie != 0 {
            release_live_slot();
            return core::ptr::null_mut();
        }
        (*record).cookie = cookie;
        &raw mut (*record).stats
    }
}

/// Asks for state callbacks on this socket only, to see it close.
fn watch_close(ctx: &SockOpsContext) -> bool {
    ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
        .is_ok()
}

/// The connection reached TCP_CLOSE (normal close, reset, or moving to TIME_WAIT): mark the
/// record closed and push its final counters. Every packet of the connection has passed the
/// cgroup_skb programs by now: the last one (FIN or ACK) is filtered before TCP processes it.
/// The record stays in the map until the agent has accounted it durably and deletes it.
// A subprogram of its own: each record copy gets its own 512-byte stack frame instead of
// sharing the caller's.
#[inline(never)]
fn close_connection(ctx: &SockOpsContext) {
    if map_path() {
        close_in_map(ctx);
        return;
    }
    // SAFETY: context pointer; sk is the full socket (NULL otherwise).
    let sk: *mut c_void = unsafe { (*ctx.ops).__bindgen_anon_2.sk }.cast();
    if sk.is_null() {
        return;
    }
    // SAFETY: non-null full socket.
    let record = unsafe { record_of(sk) };
    if record.is_null() {
        return;
    }
    // SAFETY: context pointer; bytes_received is readable for full sockets.
    let rcvd = unsafe { (*ctx.ops).bytes_received };
    // SAFETY: record points into the socket's live storage.
    unsafe {
        // TCP's final counts: what it accepted, including bytes no later packet reported, and
        // its segments each way, including pure ACKs no data packet copied.
        note_received(&mut (*record).stats, rcvd);
        final_segments(ctx, &raw mut (*record).stats);
        (*record).stats.last_seen_ns = now_ns();
        (*record).stats.closed = 1;
        let cookie = (*record).cookie;
        // The final record stays in CONNS until the agent has accounted it durably.
        // The record's prefix, read in place (ConnStats starts with what ClosedStats holds).
        let closed = &*(&raw const (*record).stats).cast::<ClosedStats>();
        let kept = CONNS.insert(&cookie, closed, u64::from(BPF_ANY)).is_ok();
        let sent = match CLOSED.reserve::<ClosedRecord>(0) {
            Some(mut entry) => {
                // Copied straight from the record, not through the stack (512 bytes for the
                // whole call chain): its first LIVE_RECORD_BYTES, without the parser state.
                // Word by word: both are 8-byte aligned (a copy through byte pointers became
                // single-byte loads and stores).
                core::ptr::copy_nonoverlapping(
                    record.cast_const().cast::<ClosedRecord>(),
                    entry.as_mut_ptr(),
                    1,
                );
                entry.submit(0);
                true
            }
            None => false,
        };
        count_close(kept, sent);
        // Later packets (a reset after the close) are not counted, and the iterator no longer
        // lists the connection as live.
        if bpf_sk_storage_delete(socks(), sk) == 0 {
            release_live_slot();
        }
    }
}

/// Where a final record went, as a loss counter. `kept`: it is in CONNS; `sent`: it is in the
/// close ring. Both: nothing to count. Only in the ring: delivered exactly, but exposed to an
/// agent crash until the agent writes it down. Only in CONNS: the agent's next poll finds it,
/// a delay. In neither: the record is gone.
#[inline(always)]
fn count_close(kept: bool, sent: bool) {
    match (kept, sent) {
        (true, true) => {}
        (false, true) => count_loss(Loss::ClosedMapFull),
        (true, false) => count_loss(Loss::RingBufFull),
        (false, false) => count_loss(Loss::ClosedLost),
    }
}

/// TCP's segment counts at the close into the record: every segment of the connection has
/// passed the packet programs and TCP's count by now.
///
/// SAFETY: `stats` points into a live record.
#[inline(always)]
unsafe fn final_segments(ctx: &SockOpsContext, stats: *mut ConnStats) {
    // SAFETY: context pointer; segs_in and segs_out are readable for full sockets. `stats`
    // per the function contract.
    unsafe {
        let (segs_in, segs_out) = ((*ctx.ops).segs_in, (*ctx.ops).segs_out);
        note_segments(&raw mut (*stats).packets_in, segs_in);
        note_segments(&raw mut (*stats).packets_out, segs_out);
    }
}

/// `close_connection` on the map path: the final record moves from OPEN to CONNS.
fn close_in_map(ctx: &SockOpsContext) {
    // SAFETY: the context is a sock_ops context, which bpf_get_socket_cookie accepts.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(stats) = OPEN.get_ptr_mut(&cookie) else {
        return;
    };
    // SAFETY: context pointer; bytes_received is readable for full sockets.
    let rcvd = unsafe { (*ctx.ops).bytes_received };
    // SAFETY: pointer into a live map value, which stays valid (RCU) until this program ends
    // even after the remove below.
    unsafe {
        // TCP's final counts, as in `close_connection`.
        note_received(&mut *stats, rcvd);
        final_segments(ctx, stats);
        (*stats).last_seen_ns = now_ns();
        (*stats).closed = 1;
        // The final record stays in CONNS until the agent has accounted it durably.
        let kept = CONNS
            .insert(
                &cookie,
                &*stats.cast_const().cast::<ClosedStats>(),
                u64::from(BPF_ANY),
            )
            .is_ok();
        let sent = match CLOSED.reserve::<ClosedRecord>(0) {
            Some(mut entry) => {
                // Copied straight from the map value, not through the stack (512 bytes for
                // the whole call chain): the cookie, then the stats up to the parser state.
                let out = entry.as_mut_ptr().cast::<u64>();
                *out = cookie;
                // Word by word, as above.
                core::ptr::copy_nonoverlapping(
                    stats.cast_const().cast::<u64>(),
                    out.add(1),
                    LIVE_RECORD_BYTES / 8 - 1,
                );
                entry.submit(0);
                true
            }
            None => false,
        };
        count_close(kept, sent);
        // Later packets (a reset after the close) find no record and are not counted, and
        // the agent's read no longer lists the connection as live.
        let _ = OPEN.remove(&cookie);
    }
}

/// `struct bpf_iter_meta` (include/linux/bpf.h).
#[repr(C)]
struct IterMeta {
    seq: *mut seq_file,
    session_id: u64,
    seq_num: u64,
}

/// Iterator over `SOCKS` (`bpf_iter__bpf_sk_storage_map`): hands every live record to the
/// reader, as the first `LIVE_RECORD_BYTES` of its `ClosedConn` (the parser state left out).
/// The agent opens the pinned link to read them.
///
/// Records go into the `LIVE_RECORDS` array, not the seq_file: a read of the seq_file returns
/// at most its 32 KiB buffer, and every read restarts the kernel's walk of the current
/// socket-storage bucket from its head (`bpf_sk_storage_map_seq_find_next` skips the elements
/// already shown), so a walk handed out 128 bytes at a time steps over a bucket's elements
/// quadratically often. Writing only a 24-byte end to the seq_file, one read walks every element
/// once. A record the array has no slot for goes to the seq_file as before, so none is lost.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/bpf_sk_storage_map")]
pub extern "C" fn sensor_conns(ctx: *mut c_void) -> i32 {
    // The context is { meta, map, sk, value }, each 8 bytes; value is NULL at the end.
    let args = ctx.cast::<u64>();
    // SAFETY: context reads at constant offsets, as the verifier requires.
    let (meta, value) = unsafe {
        (
            core::ptr::read_volatile(args) as *const IterMeta,
            core::ptr::read_volatile(args.add(3)) as *const [u64; LIVE_RECORD_BYTES / 8],
        )
    };
    if meta.is_null() {
        return 0;
    }
    // SAFETY: meta is the kernel's iterator metadata, readable for the program's run. seq_num
    // numbers the session's objects from 0 (bpf_seq_read counts up when it finds the next one;
    // an object whose output did not fit is shown again in the next read under its number).
    let (seq, session, index) = unsafe { ((*meta).seq, (*meta).session_id, (*meta).seq_num) };
    let Some(owner) = LIVE_OWNER.get_ptr_mut(0) else {
        // Never (slot 0 of an array); the record still reaches the reader.
        if !value.is_null() {
            // SAFETY: as below.
            unsafe { bpf_seq_write(seq, value.cast(), LIVE_RECORD_BYTES as u32) };
        }
        return 0;
    };
    let owner = owner.cast::<u64>();
    if value.is_null() {
        // The walk's end: at the stop, seq_num is still the last object's (0 if none). The
        // count of records in slots is read before the array is given back.
        // SAFETY: owner is LIVE_OWNER's value: three u64s.
        let end = unsafe {
            let written = read_shared(owner.add(2));
            let held = atomic_replace(owner, session, 0);
            LiveWalkEnd {
                session,
                last: index,
                in_slots: if held { written } else { 0 },
            }
        };
        // SAFETY: `end` is on the stack for the call.
        unsafe {
            bpf_seq_write(
                seq,
                (&raw const end).cast(),
                core::mem::size_of::<LiveWalkEnd>() as u32,
            )
        };
        return 0;
    }
    // SAFETY: owner is LIVE_OWNER's value: two u64s.
    unsafe {
        if index == 0 {
            let holder = read_shared(owner);
            if holder != session {
                let now = bpf_ktime_get_ns();
                let since = read_shared(owner.add(1));
                if (holder == 0 || now.wrapping_sub(since) > LIVE_CLAIM_NS)
                    && atomic_replace(owner, holder, session)
                {
                    core::ptr::write_volatile(owner.add(1), now);
                    core::ptr::write_volatile(owner.add(2), 0);
                }
            }
        }
    }
    // SAFETY: as above.
    let holds = unsafe { read_shared(owner) } == session;
    if holds
        && index <= u64::from(u32::MAX)
        && let Some(slot) = LIVE_RECORDS.get_ptr_mut(index as u32)
    {
        // SAFETY: slot is a LIVE_RECORDS value; value a SOCKS value (a ClosedConn, larger than
        // LIVE_RECORD_BYTES), readable for the program's run. Word by word: a copy of the
        // array would become a call to the BPF `memcpy` subprogram. The slot's session is
        // cleared before the record is written and set after, each by an exchange (a BPF
        // atomic with fetch, fully ordered on every JIT): a reader that sees the session
        // before and after its read of the record read no other walk's bytes.
        unsafe {
            let tag = &raw mut (*slot).session;
            atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(tag, 0);
            let to = (&raw mut (*slot).record).cast::<u64>();
            let from = value.cast::<u64>();
            for i in 0..LIVE_RECORD_BYTES / 8 {
                core::ptr::write_volatile(to.add(i), core::ptr::read_volatile(from.add(i)));
            }
            atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(tag, session);
            core::ptr::write_volatile(owner.add(2), index + 1);
        }
        return 0;
    }
    // SAFETY: as above.
    unsafe { bpf_seq_write(seq, value.cast(), LIVE_RECORD_BYTES as u32) };
    0
}

fn v4_mapped(addr_be: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[10] = 0xff;
    out[11] = 0xff;
    let b = addr_be.to_ne_bytes();
    out[12] = b[0];
    out[13] = b[1];
    out[14] = b[2];
    out[15] = b[3];
    out
}

/// Reads a 4-word context field word by word.
///
/// SAFETY: `field` points at a `[u32; 4]` field of the program context.
#[inline(always)]
unsafe fn read_words(field: *const [u32; 4]) -> [u32; 4] {
    let words = field.cast::<u32>();
    unsafe {
        [
            core::ptr::read_volatile(words),
            core::ptr::read_volatile(words.add(1)),
            core::ptr::read_volatile(words.add(2)),
            core::ptr::read_volatile(words.add(3)),
        ]
    }
}

fn ip6_bytes(words_be: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words_be[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

// --- cgroup_skb: per-packet counting ------------------------------------------------------

#[cgroup_skb(ingress)]
pub fn sensor_ingress(ctx: SkBuffContext) -> i32 {
    if count_ingress(&ctx).is_err() {
        count_loss(Loss::Unparsed);
    }
    ALLOW
}

#[cgroup_skb(egress)]
pub fn sensor_egress(ctx: SkBuffContext) -> i32 {
    if count_egress(&ctx).is_err() {
        count_loss(Loss::Unparsed);
    }
    ALLOW
}

/// Reads a `T` at `offset` from the packet (which starts at the network header).
///
/// Headers are in the buffer's linear part on every path the programs see, so the read is
/// direct (bounds-checked against `data_end`, no helper call). Anything outside the linear
/// part (payload in paged fragments of a large or GSO buffer) is read with
/// bpf_skb_load_bytes, which fails instead of reading past the end.
#[inline(always)]
fn load<T: Copy>(ctx: &SkBuffContext, offset: usize) -> Result<T, Unparsed> {
    let skb = ctx.skb.skb;
    // SAFETY: context pointer; data and data_end are readable by cgroup_skb programs.
    let (start, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    if start + offset + core::mem::size_of::<T>() <= end {
        // SAFETY: the verifier-checked range [start + offset, + size_of::<T>()) lies inside
        // the linear packet data, which stays valid while the program runs.
        return Ok(unsafe { core::ptr::read_unaligned((start + offset) as *const T) });
    }
    ctx.load::<T>(offset).map_err(|_| Unparsed)
}

/// TCP header facts of one packet. cgroup_skb buffers start at the network header.
struct Segment {
    seq: u32,
    payload_offset: usize,
    payload_len: u32,
    /// Segments the buffer carries (GSO/GRO aggregate several), as the kernel's segs_in/out.
    segments: u64,
    /// 1 when the segment carries a FIN (a u8, not a bool: a bool's niche would give the
    /// `Result<Segment, _>` a BTF layout the kernel refuses).
    fin: u8,
}

fn parse(ctx: &SkBuffContext) -> Result<Segment, Unparsed> {
    let skb = ctx.skb.skb;
    // SAFETY: skb is the context pointer; these __sk_buff fields are readable by cgroup_skb.
    let (protocol, gso_segs) = unsafe { ((*skb).protocol, (*skb).gso_segs) };
    // Multi-byte reads only: the verifier cannot follow the bounds check LLVM emits for a
    // single-byte direct read (`data_end > ptr`), and fewer reads are cheaper anyway.
    let l4_offset = if protocol == u32::from(ETH_P_IP.to_be()) {
        // Version/IHL at 0, protocol at 9.
        let ip: [u8; 10] = load(ctx, 0)?;
        if ip[9] != IPPROTO_TCP {
            return Err(Unparsed);
        }
        usize::from(ip[0] & 0x0f) * 4
    } else if protocol == u32::from(ETH_P_IPV6.to_be()) {
        // Next header at 6.
        let ip6: [u8; 8] = load(ctx, 0)?;
        // Extension headers before TCP are followed: hop-by-hop (BIG TCP puts one in GSO/GRO
        // buffers over 64 KiB), routing and destination options, which any client may add to
        // its packets (IPV6_DSTOPTS on its socket). Each has its next header at 0 and its
        // length in 8-byte units after the first 8 at 1. Fragment headers are gone by the time
        // TCP sees a packet (reassembly); others (ESP, AH) make the packet unparsed.
        let mut next = ip6[6];
        let mut offset = IPV6_HEADER_LEN;
        for _ in 0..MAX_EXT_HEADERS {
            if next == IPPROTO_TCP {
                break;
            }
            if next != IPPROTO_HOPOPTS && next != IPPROTO_ROUTING && next != IPPROTO_DSTOPTS {
                return Err(Unparsed);
            }
            let ext: [u8; 8] = load(ctx, offset)?;
            next = ext[0];
            offset += (usize::from(ext[1]) + 1) * 8;
            if offset > MAX_L4_OFFSET {
                return Err(Unparsed);
            }
        }
        if next != IPPROTO_TCP {
            return Err(Unparsed);
        }
        offset
    } else {
        return Err(Unparsed);
    };
    if l4_offset < 20 || l4_offset > MAX_L4_OFFSET {
        return Err(Unparsed);
    }
    // Sequence number at 4..8, data offset in the high nibble of byte 12, flags at 13.
    let tcp: [u8; 14] = load(ctx, l4_offset)?;
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let payload_offset = l4_offset + usize::from(tcp[12] >> 4) * 4;
    // skb->len is the network-layer length: ip_rcv trims ingress padding, and a GSO buffer's
    // length covers all its segments.
    let payload_len = ctx.len().saturating_sub(payload_offset as u32);
    Ok(Segment {
        seq,
        payload_offset,
        payload_len,
        segments: u64::from(if gso_segs == 0 { 1 } else { gso_segs }),
        fin: tcp[13] & TCP_FIN,
    })
}

/// A packet of a recorded connection: its record, TCP facts, and what TCP has accepted from
/// the client so far (`NOT_READ` for pure ACKs and packets without a full TCP socket).
struct Packet {
    cookie: u64,
    stats: *mut ConnStats,
    segment: Segment,
    received: u64,
}

/// The record and facts of a packet on a watched port; None for packets of connections
/// without a record (the listener's own, or connections older than the sensor).
#[inline(always)]
fn packet<const INGRESS: bool>(ctx: &SkBuffContext) -> Result<Option<Packet>, Unparsed> {
    // SAFETY: context pointer; local_port is the socket's bound port in host order.
    let local_port = unsafe { (*ctx.skb.skb).local_port };
    if !watched(local_port) || !may_have_record(ctx) {
        return Ok(None);
    }
    if skips_pure_ack::<INGRESS>(ctx) {
        return Ok(None);
    }
    let Some((cookie, stats)) = record_of_packet(ctx) else {
        return Ok(None);
    };
    let segment = parse(ctx)?;
    // What TCP itself has accepted from the client, in order: it advances only for data that
    // passed its checks (checksum, sequence window, PAWS, ACK), none of which have run yet for
    // an ingress packet (cgroup_skb ingress runs from tcp_filter, before tcp_rcv_established).
    // Read where it matters: packets with payload or a FIN.
    let received = if segment.payload_len > 0 || segment.fin != 0 {
        tcp_bytes_received(ctx)
    } else {
        NOT_READ
    };
    // The clock is read for packets with data or a FIN only: a bulk transfer's pure ACKs are
    // most of its packets, and a clock read costs as much as the rest of such a packet's work.
    // Of those, bulk data (replies, streamed events, non-HTTP traffic) reads it once per kernel
    // tick; a client packet on an HTTP connection always does, since a request's event
    // carries `last_seen_ns` as the request's time (timing rules read the gaps).
    if received != NOT_READ {
        // SAFETY: stats points into a live map value; fields are only updated atomically or
        // as single aligned stores, which tolerate concurrent readers (two CPUs racing here
        // store two clock readings of the same moment).
        unsafe {
            let now_tick = tick();
            if (INGRESS && may_begin_request(&*stats)) || (*stats).parse.clock_tick != now_tick {
                (*stats).last_seen_ns = now_ns();
                (*stats).parse.clock_tick = now_tick;
            }
            note_received(&mut *stats, received);
        }
    }
    Ok(Some(Packet {
        cookie,
        stats,
        segment,
        received,
    }))
}

fn count_ingress(ctx: &SkBuffContext) -> Result<(), Unparsed> {
    let Some(pkt) = packet::<true>(ctx)? else {
        return Ok(());
    };
    let rcvd = pkt.received;
    if rcvd == NOT_READ || (pkt.segment.payload_len == 0 && pkt.segment.fin == 0) {
        // A client ACK of everything the server sent (`skips_pure_ack`): its segment counts.
        copy_segments(ctx, pkt.stats, pkt.segment.segments as u32);
        return Ok(());
    }
    // SAFETY: as in `packet`.
    let parsed = client_segment(
        ctx,
        pkt.cookie,
        unsafe { &mut *pkt.stats },
        &pkt.segment,
        rcvd,
    );
    copy_segments(ctx, pkt.stats, pkt.segment.segments as u32);
    parsed
}

fn count_egress(ctx: &SkBuffContext) -> Result<(), Unparsed> {
    let Some(pkt) = packet::<false>(ctx)? else {
        return Ok(());
    };
    copy_segments(ctx, pkt.stats, 0);
    // SAFETY: as in `packet`.
    let stats = unsafe { &mut *pkt.stats };
    let rcvd = pkt.received;
    if rcvd == NOT_READ {
        return Ok(());
    }
    if pkt.segment.payload_len == 0 {
        return Ok(());
    }
    // The host's own data: its sequence numbers come from the local TCP, so the high-water
    // mark counts each byte sent once.
    // SAFETY: field of a live map value.
    if unsafe { advance(&raw mut stats.bytes_out, stats.out_seq_base, &pkt.segment) } {
        server_replied(pkt.cookie, stats, rcvd);
        if stats.proto == PROTO_HTTP1 {
            count_events(ctx, stats, &pkt.segment);
        }
    }
    Ok(())
}

/// Whether the packet's socket can be a recorded connection, from its state alone: a
/// listener (a SYN, and the handshake's final ACK, which is filtered with the listener before
/// the connection's socket exists), a request socket (SYN-ACK), a TIME_WAIT socket (its last
/// ACKs) or a closed one has none: a record is made when the connection's own socket becomes
/// ESTABLISHED (or SYN_RECV with Fast Open) and is gone once it reaches TCP_CLOSE (which moving
/// to TIME_WAIT passes through). Those packets, four of the ten of a short connection, then
/// cost neither a socket cookie (which a request socket would have to be given) nor a hash
/// lookup that misses.
#[inline(always)]
fn may_have_record(ctx: &SkBuffContext) -> bool {
    // SAFETY: context pointer; sk is readable by cgroup_skb programs (may be NULL). `state`
    // is part of sock_common, readable on any socket the pointer may be (the verifier allows
    // it on PTR_TO_SOCK_COMMON).
    unsafe {
        let sk = (*ctx.skb.skb).__bindgen_anon_2.sk;
        if sk.is_null() {
            return false;
        }
        let state = (*sk).state;
        !(state == BPF_TCP_LISTEN
            || state == BPF_TCP_NEW_SYN_RECV
            || state == BPF_TCP_TIME_WAIT
            || state == BPF_TCP_CLOSE)
    }
}

/// The live record of the connection a packet belongs to: its cookie and counters.
#[inline(always)]
fn record_of_packet(ctx: &SkBuffContext) -> Option<(u64, *mut ConnStats)> {
    if map_path() {
        // SAFETY: cgroup_skb context, accepted by the helper; returns the socket's cookie.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        return OPEN.get_ptr_mut(&cookie).map(|stats| (cookie, stats));
    }
    // SAFETY: context pointer; sk is readable by cgroup_skb programs (may be NULL).
    let sk: *mut c_void = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk }.cast();
    if sk.is_null() {
        return None;
    }
    // SAFETY: non-null socket pointer from the context.
    let record = unsafe { record_of(sk) };
    if record.is_null() {
        return None;
    }
    // SAFETY: record points into the socket's live storage.
    Some(unsafe { ((*record).cookie, &raw mut (*record).stats) })
}

/// `Packet::received` when TCP's count was not read (a pure ACK) or cannot be (no full TCP
/// socket). A sentinel, not an Option: the compiler's code for the Option confused the
/// verifier about an argument register.
const NOT_READ: u64 = u64::MAX;

/// Whether `packet` stops at this packet: a pure ACK (no payload, no FIN; most of a bulk
/// transfer's packets: every other one in the direction the data does not travel) changes
/// nothing the record holds but the segment counts, which are TCP's own and copied by the
/// connection's next data packet and by its close, so it returns before the cookie and the hash
/// lookup. Except a client ACK that acknowledges everything the server sent: the one that
/// leaves a connection idle after a reply, so an idle connection's live counts are TCP's
/// (docs/counters.md); and a packet that takes TCP's count across a multiple of 2^24.
///
/// Reads only what it needs, without `parse`'s loop over IPv6 extension headers: a packet with
/// any (or one this cannot read) goes on to `parse` and the lookup, as every packet did before.
/// A small subprogram without loops: 6.1's verifier, which walks the request parser once per
/// distinct state reaching it, close to its limit of a million instructions, sees the same
/// states there as without this check.
#[inline(never)]
fn skips_pure_ack<const INGRESS: bool>(ctx: &SkBuffContext) -> bool {
    let skb = ctx.skb.skb;
    // SAFETY: context pointer; protocol is readable by cgroup_skb programs.
    let protocol = unsafe { (*skb).protocol };
    let l4_offset = if protocol == u32::from(ETH_P_IP.to_be()) {
        let Ok(ip) = load::<[u8; 10]>(ctx, 0) else {
            return false;
        };
        if ip[9] != IPPROTO_TCP {
            return false;
        }
        u32::from(ip[0] & 0x0f) * 4
    } else if protocol == u32::from(ETH_P_IPV6.to_be()) {
        let Ok(ip6) = load::<[u8; 8]>(ctx, 0) else {
            return false;
        };
        if ip6[6] != IPPROTO_TCP {
            return false;
        }
        IPV6_HEADER_LEN as u32
    } else {
        return false;
    };
    if l4_offset < 20 {
        return false;
    }
    // Acknowledgment number at 8..12, data offset in the high nibble of byte 12, flags at 13.
    let Ok(tcp) = load::<[u8; 14]>(ctx, l4_offset as usize & 0x3f) else {
        return false;
    };
    let headers = l4_offset + u32::from(tcp[12] >> 4) * 4;
    if ctx.len() > headers || tcp[13] & TCP_FIN != 0 {
        return false;
    }
    let tp = tcp_sock_of(ctx);
    if tp.is_null() {
        // No full TCP socket: no record either.
        return true;
    }
    // SAFETY: tp is a full TCP socket, readable for the program's run.
    let (segs_in, segs_out, snd_nxt) = unsafe { ((*tp).segs_in, (*tp).segs_out, (*tp).snd_nxt) };
    // A packet that takes TCP's count across a multiple of 2^24 is copied whatever it is, so a
    // peer cannot stretch the distance between two copies to the 2^31 past which
    // `note_segments` would no longer follow TCP's 32-bit count (a flood of empty segments).
    // Egress packets were counted by TCP before they reach this program, ingress ones not yet.
    if !INGRESS {
        return segs_out & SEGS_COPY_MASK != 0;
    }
    if segs_in.wrapping_add(1) & SEGS_COPY_MASK == 0 {
        return false;
    }
    if tcp[13] & TCP_ACK == 0 {
        return true;
    }
    // The client acknowledges everything the server sent: at or beyond `snd_nxt`, not equal,
    // since TCP advances `snd_nxt` only after a segment went out (`tcp_event_new_data_sent`
    // after `tcp_transmit_skb`), and over loopback or a veth the client's ACK of it can reach
    // this program first, from the softirq the transmit ran.
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    (ack.wrapping_sub(snd_nxt) as i32) < 0
}

/// `skips_pure_ack` copies the segment counts when TCP's crosses a multiple of this + 1.
const SEGS_COPY_MASK: u32 = (1 << 24) - 1;

/// The packet's full TCP socket (`bpf_tcp_sock`), null where it has none.
#[inline(always)]
fn tcp_sock_of(ctx: &SkBuffContext) -> *mut bpf_tcp_sock {
    // SAFETY: context pointer; sk is readable by cgroup_skb programs (may be NULL).
    // bpf_tcp_sock takes any socket and returns NULL unless it is a full TCP socket (it runs
    // sk_fullsock itself), so no bpf_sk_fullsock call first: one helper call less per packet.
    unsafe {
        let sk = (*ctx.skb.skb).__bindgen_anon_2.sk;
        if sk.is_null() {
            return core::ptr::null_mut();
        }
        bpf_tcp_sock(sk)
    }
}

/// Payload bytes the kernel's TCP has received in order on the packet's connection
/// (`tcp_sock.bytes_received`, which a FIN also advances by one), `NOT_READ` where the packet
/// has no full TCP socket.
#[inline(never)]
fn tcp_bytes_received(ctx: &SkBuffContext) -> u64 {
    let tp = tcp_sock_of(ctx);
    if tp.is_null() {
        return NOT_READ;
    }
    // SAFETY: tp is a full TCP socket, readable for the program's run.
    unsafe { (*tp).bytes_received }
}

/// Copies TCP's own segment counts into the record: `segs_in` plus `ahead` segments it has not
/// counted yet (an ingress packet is filtered before `tcp_segs_in`), and `segs_out` (an egress
/// packet is filtered after `tcp_transmit_skb` counted it). Called after the request parser, so
/// the verifier walks that parser with the same states as before the counts were TCP's.
#[inline(never)]
fn copy_segments(ctx: &SkBuffContext, stats: *mut ConnStats, ahead: u32) {
    let tp = tcp_sock_of(ctx);
    if tp.is_null() {
        return;
    }
    // SAFETY: tp is a full TCP socket, readable for the program's run; stats a live record.
    unsafe {
        note_segments(
            &raw mut (*stats).packets_in,
            (*tp).segs_in.wrapping_add(ahead),
        );
        note_segments(&raw mut (*stats).packets_out, (*tp).segs_out);
    }
}

/// Advances a segment counter to TCP's 32-bit count `segs`, extending it to 64 bits: the
/// counter's low 32 bits follow TCP's (both start at the handshake's count), so it moves by
/// the forward distance between them. Updates come with every data packet, the close and
/// every 2^24th segment (`skips_pure_ack`), far less than 2^31 segments apart. A plain store, as in `note_received`: two CPUs racing
/// may leave the smaller of two of TCP's counts for a moment; readers keep the largest.
///
/// SAFETY: `field` points into a live record.
#[inline(always)]
unsafe fn note_segments(field: *mut u64, segs: u32) {
    // SAFETY: per the function contract; a single aligned load and store.
    unsafe {
        let current = read_shared(field);
        let forward = segs.wrapping_sub(current as u32);
        if (forward as i32) > 0 {
            core::ptr::write_volatile(field, current + u64::from(forward));
        }
    }
}

/// Payload bytes in TCP's `bytes_received` (`rcvd`): TCP counts an accepted FIN as a byte too.
#[inline(always)]
fn payload_received(stats: &ConnStats, rcvd: u64) -> u64 {
    let fin_end = stats.parse.fin_end;
    if fin_end != 0 && rcvd == fin_end {
        rcvd - 1
    } else {
        rcvd
    }
}

/// Advances `bytes_in` to what TCP has accepted. Client bytes are counted from TCP's own count,
/// never from the sequence numbers of packets that TCP may still reject: a segment forged far
/// ahead (or one TCP drops for a bad checksum or ACK) adds nothing and hides nothing.
///
/// SAFETY: none beyond `stats` being a live record. A plain store, not a compare-and-swap:
/// it may race with another CPU's and leave the smaller of two of TCP's counts for a moment,
/// which the next packet (or the close) corrects; readers keep the largest they saw.
#[inline(always)]
unsafe fn note_received(stats: &mut ConnStats, rcvd: u64) {
    let data = payload_received(stats, rcvd);
    let field = &raw mut stats.bytes_in;
    // SAFETY: field of a live map value; a single aligned store.
    unsafe {
        if data > read_shared(field) {
            core::ptr::write_volatile(field, data);
        }
    }
}

/// Advances a direction's byte counter to the end of this segment, if that is further than
/// what was seen: each sequence number counts once, so retransmissions add nothing. Used for
/// the host's own (egress) data only. Returns whether the segment carried new data.
///
/// The counter is the payload offset (bytes past ISN + 1) of the highest byte seen: its low
/// 32 bits extend the 32-bit sequence space, so transfers over 4 GiB count right.
///
/// SAFETY: `counter` points into a live map value.
unsafe fn advance(counter: *mut u64, seq_base: u32, segment: &Segment) -> bool {
    for _ in 0..CAS_ATTEMPTS {
        // SAFETY: per the function contract.
        let current = unsafe { read_shared(counter) };
        let distance = segment
            .seq
            .wrapping_sub(seq_base)
            .wrapping_sub(current as u32) as i32;
        let end = current as i64 + i64::from(distance) + i64::from(segment.payload_len);
        if end <= current as i64 {
            return false;
        }
        // SAFETY: per the function contract.
        if unsafe { atomic_replace(counter, current, end as u64) } {
            return true;
        }
    }
    false
}

/// Where the client segment being handled lies in the client's stream, what TCP has accepted,
/// and what the head functions pass each other. Kept in per-CPU map memory (ingress only) and
/// read where needed instead of carried in registers: the verifier narrows a register's range
/// at every comparison, and each distinct narrowing of a value that is still live when a
/// subprogram is called makes it walk that subprogram (and all after it) once more.
#[repr(C)]
struct Pos {
    /// The segment's first and last + 1 payload offsets.
    start: i64,
    end: i64,
    /// What TCP has accepted (`bytes_received`) before this segment.
    rcvd: i64,
    cookie: u64,
    /// Offset of the segment's payload in the packet.
    payload: u64,
    /// The parser's cursor when it began reading this segment.
    before: u64,
    /// `HEAD_*` flags for the next head event.
    flags: u64,
    /// Method bytes from earlier segments that lead the request event.
    prefix: u64,
    /// `TURN_*`: what `parse_turn` decided.
    verdict: u64,
    /// The head scanner's next index into `bytes`, and one past the head's last byte there
    /// (0: the head does not end in them).
    index: u64,
    head_end: u64,
    /// How many of `bytes` hold the segment's bytes, and which of them are line feeds (one
    /// bit each): the head scanner's inputs, passed in memory (see `scan_step`).
    scan_n: u64,
    scan_lf: u64,
    /// The parser's cursor at `bytes[0]` (kept here across the scan, not in a register).
    scan_from: i64,
    /// Bytes of the segment the head scanner reads.
    bytes: [u64; SCAN_WORDS],
}

#[map]
static POS: PerCpuArray<Pos> = PerCpuArray::with_max_entries(1, 0);

/// Reads a field of `Pos` (see there why through memory), or of the connection's `Frame` in
/// the head scanner, which keeps no value of it in a register from one step to the next (see
/// `scan_head`).
///
/// SAFETY: `field` points into this CPU's `POS` value or another live map value.
#[inline(always)]
unsafe fn get<T: Copy>(field: *const T) -> T {
    unsafe { core::ptr::read_volatile(field) }
}

/// Writes a field of `Pos` or, in the head scanner, of the `Frame` (see `get`).
///
/// SAFETY: as `get`.
#[inline(always)]
unsafe fn put<T: Copy>(field: *mut T, value: T) {
    unsafe { core::ptr::write_volatile(field, value) }
}

/// A client segment with payload (or a FIN) on a recorded connection.
///
/// Only segments TCP will take next are looked at: those starting at or before what TCP has
/// accepted (`rcvd`) or at the end of an earlier such segment still in TCP's backlog. A
/// segment beyond (out of order, or forged out of the window) waits: its bytes count when TCP
/// accepts them, and it never moves the parser. A segment that re-sends bytes the parser has
/// consumed while TCP has not accepted them means the earlier copy was dropped by TCP (a
/// corrupt or forged segment): the parser goes back and reads the copy TCP will keep.
// A subprogram of its own, called last: the verifier walks it once per packet program path
// that reaches it, not once per path times everything after.
#[inline(never)]
fn client_segment(
    ctx: &SkBuffContext,
    cookie: u64,
    stats: &mut ConnStats,
    segment: &Segment,
    rcvd: u64,
) -> Result<(), Unparsed> {
    let Some(pos) = POS.get_ptr_mut(0) else {
        return Ok(());
    };
    // Position of the segment in the client's byte stream, relative to what TCP accepted (the
    // sequence space is 32 bits wide, TCP's count 64).
    let distance = segment
        .seq
        .wrapping_sub(stats.in_seq_base)
        .wrapping_sub(rcvd as u32) as i32;
    let start = rcvd as i64 + i64::from(distance);
    let end = start + i64::from(segment.payload_len);
    let rcvd = rcvd as i64;
    // SAFETY: this CPU's POS value.
    unsafe {
        put(&raw mut (*pos).start, start);
        put(&raw mut (*pos).end, end);
        put(&raw mut (*pos).rcvd, rcvd);
        put(&raw mut (*pos).cookie, cookie);
        put(&raw mut (*pos).payload, segment.payload_offset as u64);
    }
    let p = &mut stats.parse;
    let frontier = if (p.in_order_end as i64) > rcvd {
        p.in_order_end as i64
    } else {
        rcvd
    };
    if start > frontier || (end <= rcvd && segment.fin == 0) {
        return Ok(());
    }
    if end > p.in_order_end as i64 {
        p.in_order_end = end as u64;
    }
    if segment.fin != 0 {
        p.fin_end = end as u64 + 1;
    }
    if end <= rcvd {
        return Ok(());
    }
    let f = &stats.parse.live;
    if stats.proto == PROTO_OTHER
        && f.mode == MODE_BODY | MODE_COUNTED
        && start < f.cursor as i64
        && rcvd < f.cursor as i64
    {
        // The connection was classified as non-HTTP from a copy of its first bytes that TCP
        // has not accepted; this segment carries them again: classify from it instead. Its
        // request is dated now (`packet` read the clock for non-HTTP only once per tick).
        stats.proto = PROTO_UNKNOWN;
        stats.last_seen_ns = now_ns();
    }
    if stats.proto == PROTO_OTHER {
        other_turn(cookie, stats);
        return Ok(());
    }
    http_turn(ctx, stats, pos)
}

/// Non-HTTP protocols: the first client payload after server payload is a turn.
fn other_turn(cookie: u64, stats: &mut ConnStats) {
    let mode = stats.parse.live.mode;
    if mode & MODE_STATE == MODE_ARMED && mode & MODE_COUNTED == 0 {
        stats.parse.live.mode = MODE_IDLE;
        // SAFETY: field of a live map value.
        unsafe { atomic_add(&raw mut stats.requests, 1) };
        // The turn's time: this packet's, read now (`packet` reads the clock for non-HTTP
        // data once per tick only).
        stats.last_seen_ns = now_ns();
        report_turn(cookie, stats, 0);
    }
}

/// Most steps of the framing loop per segment (`bpf_loop`): each step reads a request start
/// (up to 64 bytes of blank lines and method), up to 64 bytes of a head, or a body's bytes in
/// the segment, so a buffer of 1 MiB of the smallest requests nginx answers (18 bytes each,
/// two steps) is followed to its end: more than the largest GSO/GRO buffer (64 KiB, 512 KiB
/// with BIG TCP). The loop's cost is what the segment holds, not this bound.
const FRAME_STEPS: u32 = 1 << 17;

/// What the framing loop's callback needs: `bpf_loop` passes it one pointer, to the caller's
/// stack, where the packet context pointer keeps its type (a map could not hold it).
#[repr(C)]
struct StepArgs {
    skb: *mut __sk_buff,
    stats: *mut ConnStats,
    pos: *mut Pos,
}

/// HTTP/1.x (or not yet classified): follows the client's bytes request by request. At a
/// request start (the connection's first bytes, the first after the server's reply, or where
/// the previous request's body ended) it reads the method and counts the request; then it
/// reads the head to its end, finding `Content-Length` (and `Transfer-Encoding`), and copies
/// the head to the agent; then it skips the body to where the next request starts, however
/// many requests a segment holds and however they are split over segments. A request whose
/// end it cannot know (a chunked body) ends its framing: the next request is found from
/// turn-taking, as before pipelining was followed.
#[inline(never)]
fn http_turn(ctx: &SkBuffContext, stats: &mut ConnStats, pos: *mut Pos) -> Result<(), Unparsed> {
    // SAFETY: this CPU's POS value.
    let (start, rcvd) = unsafe {
        put(&raw mut (*pos).flags, 0);
        put(&raw mut (*pos).prefix, 0);
        put(&raw mut (*pos).verdict, TURN_UNDECIDED);
        (get(&raw const (*pos).start), get(&raw const (*pos).rcvd))
    };
    let p = &mut stats.parse;
    let cursor = p.live.cursor as i64;
    if cursor <= rcvd {
        // TCP has accepted every byte the parser read: a point to come back to.
        p.snap = p.live;
        p.since_snap = 0;
    } else if start < cursor {
        // The parser read bytes TCP has not accepted, and this segment carries them again: TCP
        // dropped the copy the parser read (corrupt, or forged with a bad ACK). Back to the
        // last point where TCP had accepted all the parser read, if this segment reaches back
        // to it; requests counted since then are taken back and read again from this copy.
        if start <= p.snap.cursor as i64 {
            p.live = p.snap;
            let undo = p.since_snap;
            p.since_snap = 0;
            if undo > 0 {
                // SAFETY: field of a live map value.
                unsafe { atomic_add(&raw mut stats.requests, undo.wrapping_neg()) };
            }
            // SAFETY: this CPU's POS value.
            unsafe { put(&raw mut (*pos).flags, u64::from(HEAD_REWIND)) };
        } else {
            // Both copies waited in TCP's backlog: the rest of this turn counts from
            // turn-taking (the server's next reply starts the next one).
            p.live.mode = MODE_IDLE;
            return Ok(());
        }
    }
    let f = &mut stats.parse.live;
    if f.mode & MODE_STATE == MODE_BODY
        && start >= f.cursor as i64
        && start >= rcvd
        && stats.proto == PROTO_HTTP1
    {
        // After an unframed body turn, a segment start may begin the next request (an early
        // reply).
        arm(f, start as u64);
    }
    // SAFETY: this CPU's POS value.
    unsafe { put(&raw mut (*pos).before, f.cursor) };
    let mut args = StepArgs {
        skb: ctx.skb.skb,
        stats: core::ptr::from_mut(stats),
        pos,
    };
    // SAFETY: bpf_loop calls frame_step with a pointer to `args`, which outlives the call.
    unsafe {
        bpf_loop(
            FRAME_STEPS,
            frame_step as *const () as *mut c_void,
            (&raw mut args).cast(),
            0,
        )
    };
    // SAFETY: this CPU's POS value.
    if unsafe { get(&raw const (*pos).verdict) } == TURN_UNPARSED {
        return Err(Unparsed);
    }
    if stats.parse.live.mode & MODE_STATE == MODE_HEAD {
        // The head goes on in the next segment: send what this one holds of it.
        flush_head(ctx, stats, pos);
    }
    Ok(())
}

/// The framing loop's body: one step; 0 to go on, 1 to stop (`bpf_loop`).
#[inline(never)]
extern "C" fn frame_step(_index: u32, data: *mut c_void) -> i64 {
    let args = data.cast::<StepArgs>();
    // SAFETY: `data` is the StepArgs http_turn passed to bpf_loop.
    let (skb, stats, pos) = unsafe { ((*args).skb, (*args).stats, (*args).pos) };
    let ctx = SkBuffContext::new(skb);
    // SAFETY: stats is the connection's live record, pos this CPU's POS value.
    if frame_one(&ctx, unsafe { &mut *stats }, pos) {
        0
    } else {
        1
    }
}

/// One step of the framing loop; false when this segment has nothing more to give.
#[inline(always)]
fn frame_one(ctx: &SkBuffContext, stats: &mut ConnStats, pos: *mut Pos) -> bool {
    // SAFETY: this CPU's POS value.
    let (start, end, rcvd) = unsafe {
        (
            get(&raw const (*pos).start),
            get(&raw const (*pos).end),
            get(&raw const (*pos).rcvd),
        )
    };
    let f = &mut stats.parse.live;
    let cursor = f.cursor as i64;
    let state = f.mode & MODE_STATE;
    if state == MODE_SKIP {
        // A body: its bytes are not read, only counted off; body bytes TCP took out of order
        // (never seen here) change nothing.
        let cursor = if cursor < start && start <= rcvd {
            start
        } else {
            cursor
        };
        if cursor < start || cursor >= end {
            return false;
        }
        let req_end = f.req_end as i64;
        if req_end <= end {
            arm(f, req_end as u64);
        } else {
            f.cursor = end as u64;
        }
        return true;
    }
    if cursor < start || cursor >= end {
        return false;
    }
    // Bytes TCP accepted that the parser never saw (they came out of order): what they held
    // is unknown; the server's reply counts the turn.
    if cursor < rcvd {
        return false;
    }
    if state == MODE_ARMED {
        return request_start(ctx, stats, pos);
    }
    if state == MODE_HEAD {
        return head_bytes(ctx, stats, pos);
    }
    false
}

/// The next request starts at `at`.
#[inline(always)]
fn arm(f: &mut Frame, at: u64) {
    f.turn_start = at;
    f.req_begin = at;
    f.cursor = at;
    f.method_len = 0;
    f.mode = MODE_ARMED;
}

/// A step at a request start: reads blank lines and the method.
#[inline(never)]
fn request_start(ctx: &SkBuffContext, stats: &mut ConnStats, pos: *mut Pos) -> bool {
    match parse_turn(ctx, &mut stats.parse.live, pos) {
        Ok(Turn::Undecided) => true,
        Ok(Turn::Request) => {
            stats.proto = PROTO_HTTP1;
            if stats.parse.live.mode & MODE_COUNTED == 0 {
                // SAFETY: field of a live map value.
                unsafe { atomic_add(&raw mut stats.requests, 1) };
                stats.parse.since_snap += 1;
                stats.exchange_flags = EXCHANGE_RESPONSE_PENDING;
            }
            start_request(stats, pos);
            true
        }
        Ok(Turn::NotRequest) => {
            let counted = stats.parse.live.mode & MODE_COUNTED;
            if stats.proto == PROTO_UNKNOWN {
                stats.proto = PROTO_OTHER;
                stats.parse.live.mode = MODE_BODY | MODE_COUNTED;
                if counted == 0 {
                    // SAFETY: field of a live map value.
                    unsafe { atomic_add(&raw mut stats.requests, 1) };
                    stats.parse.since_snap += 1;
                    // SAFETY: this CPU's POS value.
                    let cookie = unsafe { get(&raw const (*pos).cookie) };
                    report_turn(cookie, stats, 0);
                }
                return false;
            }
            stats.parse.live.mode = MODE_BODY | counted;
            false
        }
        Err(Unparsed) => false,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Turn {
    Undecided,
    Request,
    NotRequest,
}

/// Bytes the request-start parser reads per round, and rounds per step (more blank lines take
/// more steps of the framing loop).
const PARSE_LOAD: usize = 16;
// `parse_turn` holds the bytes in whole words.
const _: () = assert!(PARSE_LOAD.is_multiple_of(8));
const PARSE_ROUNDS: usize = 4;

/// RFC 9112 method characters as nginx accepts them: upper-case letters, `_` and `-`.
#[inline(always)]
fn method_byte(b: u8) -> bool {
    b.is_ascii_uppercase() || b == b'_' || b == b'-'
}

/// Feeds the segment's bytes from the parser's cursor to the request-start parser: blank lines
/// (CR, LF) before the method are skipped (RFC 9112 2.2; nginx skips any number), method
/// characters are kept, a space after at least one decides a request, anything else decides
/// "not a request". The method may come split over any number of segments.
///
/// The parser state lives in the record, not in registers: the verifier then sees one state
/// per loop position instead of one per partial match.
#[inline(never)]
fn parse_turn(ctx: &SkBuffContext, p: &mut Frame, pos: *mut Pos) -> Result<Turn, Unparsed> {
    // Zeroed by volatile word stores: LLVM turns a zeroed stack array (or plain zero stores)
    // into a call to the BPF `memset` subprogram, a byte loop, which showed in profiles.
    let mut words = [0u64; PARSE_LOAD / 8];
    for i in 0..PARSE_LOAD / 8 {
        // SAFETY: i indexes `words`.
        unsafe { core::ptr::write_volatile(words.as_mut_ptr().add(i), 0) };
    }
    let buf = words.as_mut_ptr().cast::<u8>();
    // The outcome is written to memory and read once at the end: one exit, so the verifier
    // joins the paths from every byte position instead of walking the caller once per exit.
    // SAFETY: this CPU's POS value.
    unsafe { put(&raw mut (*pos).verdict, TURN_UNDECIDED) };
    'rounds: for _ in 0..PARSE_ROUNDS {
        // SAFETY: fields of live map values; volatile so each round reads what the last wrote.
        let (cursor, start, end, payload) = unsafe {
            (
                core::ptr::read_volatile(&raw const p.cursor) as i64,
                get(&raw const (*pos).start),
                get(&raw const (*pos).end),
                get(&raw const (*pos).payload),
            )
        };
        if cursor >= end || cursor < start {
            break;
        }
        let offset = payload as usize + (cursor - start) as usize;
        // SAFETY: buf has PARSE_LOAD bytes.
        let n =
            unsafe { load_into::<PARSE_LOAD>(ctx, offset, buf, PARSE_LOAD, (end - cursor) as u32) };
        if n == 0 {
            // SAFETY: this CPU's POS value.
            unsafe { put(&raw mut (*pos).verdict, TURN_UNPARSED) };
            break;
        }
        let mut i = 0;
        while i < PARSE_LOAD && i < n {
            // SAFETY: i < PARSE_LOAD, the size of `words` in bytes.
            let b = unsafe { *buf.add(i) };
            // SAFETY: as above.
            let k = unsafe { core::ptr::read_volatile(&raw const p.method_len) };
            let at = unsafe { core::ptr::read_volatile(&raw const p.cursor) } + 1;
            let verdict = if k == 0 && (b == b'\r' || b == b'\n') {
                p.req_begin = at;
                TURN_UNDECIDED
            } else if method_byte(b) {
                p.method[usize::from(k) & (METHOD_MAX - 1)] = b;
                p.method_len = k + 1;
                if usize::from(k) + 1 >= METHOD_MAX {
                    TURN_REQUEST
                } else {
                    TURN_UNDECIDED
                }
            } else if b == b' ' && k > 0 {
                TURN_REQUEST
            } else {
                TURN_NOT_REQUEST
            };
            p.cursor = at;
            if verdict != TURN_UNDECIDED {
                // SAFETY: this CPU's POS value.
                unsafe { put(&raw mut (*pos).verdict, verdict) };
                break 'rounds;
            }
            i += 1;
        }
    }
    // SAFETY: this CPU's POS value.
    match unsafe { get(&raw const (*pos).verdict) } {
        TURN_REQUEST => Ok(Turn::Request),
        TURN_NOT_REQUEST => Ok(Turn::NotRequest),
        TURN_UNPARSED => Err(Unparsed),
        _ => Ok(Turn::Undecided),
    }
}

const TURN_UNDECIDED: u64 = 0;
const TURN_REQUEST: u64 = 1;
const TURN_NOT_REQUEST: u64 = 2;
const TURN_UNPARSED: u64 = 3;

/// Head bytes the agent asks for (`[identity] head_bytes`), 0 when identity is off.
#[inline(always)]
fn head_bytes_wanted() -> u64 {
    match CONFIG.get(CONFIG_HEAD_BYTES) {
        Some(&n) if n as u64 <= HEAD_BYTES_MAX as u64 => u64::from(n),
        Some(_) => HEAD_BYTES_MAX as u64,
        None => 0,
    }
}

/// `Frame::head_events`: the request event is still to be sent, the head's events go on, the
/// last one was sent.
const HEAD_EVENTS_FIRST: u8 = 0;
const HEAD_EVENTS_OPEN: u8 = 1;
const HEAD_EVENTS_DONE: u8 = 2;

/// A request was counted: its head is read from here (the rest of the request line first) and
/// copied from its first byte. The request event goes out once the head's end is found, or at
/// the end of the segment, whichever comes first, so a head is not sent with the requests
/// after it.
#[inline(always)]
fn start_request(stats: &mut ConnStats, pos: *mut Pos) {
    let wanted = head_bytes_wanted();
    let f = &mut stats.parse.live;
    let begin = f.req_begin;
    // SAFETY: this CPU's POS value.
    let before = unsafe { get(&raw const (*pos).before) };
    // Method bytes from earlier segments (fewer than METHOD_MAX, or the parser would have
    // decided there).
    let prefix = if begin < before && wanted > 0 {
        before - begin
    } else {
        0
    };
    f.head_from = begin;
    f.head_next = begin + prefix;
    f.head_limit = begin + wanted;
    f.head_events = HEAD_EVENTS_FIRST;
    // SAFETY: this CPU's POS value.
    unsafe { put(&raw mut (*pos).prefix, prefix) };
    f.mode = MODE_HEAD;
    f.line = LINE_OTHER;
    f.framing = 0;
    f.content_length = 0;
}

/// Bytes of a segment the head scanner reads per step.
const SCAN_BYTES: usize = 64;
const SCAN_WORDS: usize = SCAN_BYTES / 8;

/// `Frame::line`: the head scanner is at a line's first byte; after a CR there; in a field
/// name that may still be `Content-Length` or `Transfer-Encoding`; in a `Content-Length`
/// value; anywhere else in a line (the request line, other fields).
const LINE_START: u8 = 0;
const LINE_CR: u8 = 1;
const LINE_NAME: u8 = 2;
const LINE_LENGTH: u8 = 3;
const LINE_OTHER: u8 = 4;
/// `Frame::names`: which field names still match.
const NAME_LENGTH: u8 = 1;
const NAME_TRANSFER: u8 = 2;
/// The field names the scanner follows, lower case with their colon (nginx compares names
/// without case; a name with anything before its colon is another field, which nginx ignores).
const LENGTH_FIELD: &[u8] = b"content-length:";
const TRANSFER_FIELD: &[u8] = b"transfer-encoding:";
/// The same names padded to 32 bytes, read at any index below 32 without a bounds check the
/// compiler could move away from the read (older verifiers, 6.1, do not see a bound that was
/// checked on a copy of the index).
static LENGTH_NAME: [u8; 32] = padded(LENGTH_FIELD);
static TRANSFER_NAME: [u8; 32] = padded(TRANSFER_FIELD);

/// A field-name byte as the scanner compares it: upper case folded to lower, and a space or
/// tab to a colon. nginx (since 1.21.1) refuses any name with a space or tab in it ("client
/// sent invalid header line": 400, and it closes), so no byte after such a head is a request
/// of its. Read as another field, `Content-Length : 5` would leave its body to be taken for
/// the next request; folded, the space ends the name, and the colon left in the value leaves
/// the framing unknown (`length_byte`), as `Transfer-Encoding : x` does at once. In other
/// names a colon mismatches as the space did. One read of this table, not a branch: on this
/// verifier (6.18) it costs `sensor_ingress` 7k more instructions (173k to 180k); a compare
/// for the space cost 45k, a check where the colon belongs 76k (`sensor doctor`).
static NAME_FOLD: [u8; 256] = name_fold();

const fn name_fold() -> [u8; 256] {
    let mut out = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        out[i] = if b.is_ascii_uppercase() {
            b | 0x20
        } else if b == b' ' || b == b'\t' {
            b':'
        } else {
            b
        };
        i += 1;
    }
    out
}

const fn padded(name: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < name.len() {
        out[i] = name[i];
        i += 1;
    }
    out
}
/// Most digits of a `Content-Length` followed (nginx refuses values past 2^63).
const LENGTH_DIGITS: u8 = 18;

/// A step inside a head: reads up to `SCAN_BYTES` of it, and at its end decides where the
/// request ends.
#[inline(never)]
fn head_bytes(ctx: &SkBuffContext, stats: &mut ConnStats, pos: *mut Pos) -> bool {
    // SAFETY: this CPU's POS value.
    let (start, end, payload) = unsafe {
        (
            get(&raw const (*pos).start),
            get(&raw const (*pos).end),
            get(&raw const (*pos).payload),
        )
    };
    let cursor = stats.parse.live.cursor as i64;
    // SAFETY: this CPU's POS value; `bytes` holds SCAN_BYTES.
    let n = unsafe {
        load_into::<SCAN_BYTES>(
            ctx,
            payload as usize + (cursor - start) as usize,
            (&raw mut (*pos).bytes).cast(),
            SCAN_BYTES,
            (end - cursor) as u32,
        )
    };
    if n == 0 {
        // SAFETY: this CPU's POS value.
        unsafe { put(&raw mut (*pos).verdict, TURN_UNPARSED) };
        return false;
    }
    // One bit per byte read that is a line feed: the scanner jumps from a line's interesting
    // start to its end without looking at the bytes between.
    let mut lf = 0u64;
    let mut w = 0;
    while w < SCAN_WORDS {
        // SAFETY: w < SCAN_WORDS.
        let word = unsafe { get((&raw const (*pos).bytes).cast::<u64>().add(w)) };
        let high = zero_bytes(word ^ (ONES * u64::from(b'\n')));
        // Byte j's high bit to bit j (no two products overlap, so nothing carries).
        let bits = (((high >> 7) & ONES).wrapping_mul(0x0102_0408_1020_4080)) >> 56;
        lf |= bits << (8 * w);
        w += 1;
    }
    if n < SCAN_BYTES {
        lf &= (1u64 << n) - 1;
    }
    // SAFETY: this CPU's POS value.
    unsafe {
        put(&raw mut (*pos).index, 0);
        put(&raw mut (*pos).head_end, 0);
        put(&raw mut (*pos).scan_n, n as u64);
        put(&raw mut (*pos).scan_lf, lf);
        put(&raw mut (*pos).scan_from, cursor);
    }
    scan_head(&mut stats.parse.live, pos);
    // Read again from memory, not kept in a register across the scan (see `scan_head`).
    // SAFETY: this CPU's POS value.
    let (index, head_end, cursor) = unsafe {
        (
            get(&raw const (*pos).index),
            get(&raw const (*pos).head_end),
            get(&raw const (*pos).scan_from),
        )
    };
    let f = &mut stats.parse.live;
    if head_end == 0 {
        f.cursor = cursor as u64 + index;
        return true;
    }
    let head_end = cursor as u64 + head_end;
    f.cursor = head_end;
    if head_end < f.head_limit {
        f.head_limit = head_end;
    }
    flush_head(ctx, stats, pos);
    let f = &mut stats.parse.live;
    if f.head_events == HEAD_EVENTS_OPEN {
        f.head_limit = f.head_next;
        f.head_events = HEAD_EVENTS_DONE;
        // SAFETY: this CPU's POS value.
        let cookie = unsafe { get(&raw const (*pos).cookie) };
        report_head_done(cookie, stats);
    }
    let f = &mut stats.parse.live;
    if f.framing & FRAMING_UNKNOWN != 0 {
        // Where this request ends is not followed (chunked): the next one is found from
        // turn-taking.
        f.mode = MODE_IDLE;
        return false;
    }
    let length = if f.framing & FRAMING_LENGTH != 0 {
        f.content_length
    } else {
        0
    };
    if length == 0 {
        arm(f, head_end);
    } else {
        f.req_end = head_end + length;
        f.mode = MODE_SKIP;
    }
    true
}

/// `x`, read back from a stack copy with a volatile load: the compiler cannot assume anything
/// about the value (its range, or a comparison made before), so a mask or bound applied to it
/// is kept for the verifier. To the verifier it is the same scalar (8-byte spill and fill).
#[inline(always)]
fn opaque(x: u64) -> u64 {
    // SAFETY: a local.
    unsafe { core::ptr::read_volatile(&x) }
}

/// The lowest set bit's index of `x` (not 0), without branches.
#[inline(always)]
fn lowest_bit(x: u64) -> u64 {
    let mut v = (x & x.wrapping_neg()).wrapping_sub(1);
    v -= (v >> 1) & 0x5555_5555_5555_5555;
    v = (v & 0x3333_3333_3333_3333) + ((v >> 2) & 0x3333_3333_3333_3333);
    v = (v + (v >> 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    v.wrapping_mul(ONES) >> 56
}

/// Reads head bytes `index..n` of `Pos::bytes` (line feeds marked in `lf`), one `scan_step`
/// at a time: follows lines, matches field names, reads `Content-Length` values, and stops
/// just past the blank line that ends the head (`Pos::head_end`).
///
/// The loop only calls: each step is a subprogram whose state lives in memory (`Pos`, the
/// frame), so every path through a step comes back to the loop's head in the same verifier
/// state (the call leaves r1-r5 unset and r0 tested; nothing else changes). Written as one
/// loop with the step inlined, the paths through a step left different values in registers
/// that were dead at the loop's head, and 6.18's verifier, which compares states inside a
/// loop before it cleans them of dead registers, pruned none of them: it walked the 64 steps
/// once per combination, past its limit on one 6.18 build ("BPF program is too large.
/// Processed 1000001 insn") and at 60 % of it on another.
#[inline(always)]
fn scan_head(f: &mut Frame, pos: *mut Pos) {
    let f: *mut Frame = f;
    for _ in 0..SCAN_BYTES {
        if !scan_step(f, pos) {
            break;
        }
    }
}

/// One step of the head scanner: a byte, or a whole line it does not read; false when the
/// bytes are done or the head ended. Lines end at LF (nginx also takes a bare LF). Inputs in
/// memory: `Pos::scan_n` bytes of `Pos::bytes`, their line feeds in `Pos::scan_lf`.
#[inline(never)]
fn scan_step(f: *mut Frame, pos: *mut Pos) -> bool {
    // SAFETY: this CPU's POS value; fields of a live map value.
    let (bytes, n, lf, i, line) = unsafe {
        (
            (&raw const (*pos).bytes).cast::<u8>(),
            get(&raw const (*pos).scan_n),
            get(&raw const (*pos).scan_lf),
            get(&raw const (*pos).index),
            get(&raw const (*f).line),
        )
    };
    if i >= n {
        return false;
    }
    // The mask is what bounds the read of `bytes` below for the verifier. The compiler
    // knows `i < n <= SCAN_BYTES` and drops a mask of `i` itself as redundant, leaving
    // the bound to that comparison: older verifiers (6.1) learn nothing about either
    // register from a comparison of two non-constant registers, and refused the
    // unbounded index ("math between map_value pointer and register with unbounded min
    // value"). The mask applies to a copy the compiler knows nothing about.
    let i = opaque(i) & (SCAN_BYTES as u64 - 1);
    if line == LINE_OTHER {
        return to_line_end(f, pos, n, lf, i);
    }
    // SAFETY: i < SCAN_BYTES, the size of `bytes`.
    let b = unsafe { *bytes.add(i as usize) };
    // SAFETY: as above.
    unsafe { put(&raw mut (*pos).index, i + 1) };
    if b == b'\n' {
        if line == LINE_START || line == LINE_CR {
            // SAFETY: as above.
            unsafe { put(&raw mut (*pos).head_end, i + 1) };
            return false;
        }
        if line == LINE_LENGTH {
            end_length(f);
        }
        // SAFETY: as above.
        unsafe { put(&raw mut (*f).line, LINE_START) };
        return true;
    }
    if line == LINE_CR {
        // A CR not followed by LF where a line starts: nginx refuses the request (and
        // closes the connection); nothing to follow.
        unknown_framing(f);
    } else if line == LINE_LENGTH {
        length_byte(f, b);
    } else {
        if line == LINE_START {
            if b == b'\r' {
                // SAFETY: as above.
                unsafe { put(&raw mut (*f).line, LINE_CR) };
                return true;
            }
            // SAFETY: as above.
            unsafe {
                put(&raw mut (*f).name_len, 0);
                put(&raw mut (*f).names, NAME_LENGTH | NAME_TRANSFER);
            }
        }
        name_byte(f, b);
    }
    // A line the scanner has no more use for (most field names are decided at their first
    // byte) is skipped to its end in the same step: one step a line, not two.
    // SAFETY: as above.
    if unsafe { get(&raw const (*f).line) } != LINE_OTHER {
        return true;
    }
    let next = i + 1;
    if next >= n {
        // The bytes are done (the index is already `next`).
        return false;
    }
    to_line_end(f, pos, n, lf, opaque(next) & (SCAN_BYTES as u64 - 1))
}

/// Moves the scanner from byte `i` (< `n`) past the end of its line, in one move; false when
/// the line does not end in the bytes read (the index is then `n`).
#[inline(always)]
fn to_line_end(f: *mut Frame, pos: *mut Pos, n: u64, lf: u64, i: u64) -> bool {
    let rest = lf >> i;
    if rest == 0 {
        // SAFETY: this CPU's POS value.
        unsafe { put(&raw mut (*pos).index, n) };
        return false;
    }
    // SAFETY: this CPU's POS value; a field of a live map value.
    unsafe {
        put(&raw mut (*pos).index, i + lowest_bit(rest) + 1);
        put(&raw mut (*f).line, LINE_START);
    }
    true
}

/// The request's end is not followed (see `FRAMING_UNKNOWN`); the rest of the line is skipped.
#[inline(always)]
fn unknown_framing(f: *mut Frame) {
    // SAFETY: a live map value (`scan_head`).
    unsafe {
        put(
            &raw mut (*f).framing,
            get(&raw const (*f).framing) | FRAMING_UNKNOWN,
        );
        put(&raw mut (*f).line, LINE_OTHER);
    }
}

/// One byte of a field name.
#[inline(always)]
fn name_byte(f: *mut Frame, b: u8) {
    // SAFETY: a byte indexes the 256 entries.
    let lower = unsafe {
        core::ptr::read_volatile((&raw const NAME_FOLD).cast::<u8>().add(usize::from(b)))
    };
    // SAFETY: a live map value (`scan_head`).
    let k = usize::from(unsafe { get(&raw const (*f).name_len) }) & 31;
    // Both reads before any comparison of `k` (see `LENGTH_NAME`).
    // SAFETY: k < 32, the arrays' size.
    let (length, transfer) = unsafe {
        (
            core::ptr::read_volatile((&raw const LENGTH_NAME).cast::<u8>().add(k)),
            core::ptr::read_volatile((&raw const TRANSFER_NAME).cast::<u8>().add(k)),
        )
    };
    // SAFETY: as above.
    let mut names = unsafe { get(&raw const (*f).names) };
    if k >= LENGTH_FIELD.len() || length != lower {
        names &= !NAME_LENGTH;
    }
    if k >= TRANSFER_FIELD.len() || transfer != lower {
        names &= !NAME_TRANSFER;
    }
    // SAFETY: as above.
    unsafe {
        put(&raw mut (*f).names, names);
        put(&raw mut (*f).name_len, (k + 1) as u8);
    }
    let line = if names == 0 {
        LINE_OTHER
    } else if names & NAME_LENGTH != 0 && k + 1 == LENGTH_FIELD.len() {
        // SAFETY: as above.
        unsafe {
            put(&raw mut (*f).digits, 0);
            put(&raw mut (*f).length_value, 0);
        }
        LINE_LENGTH
    } else if names & NAME_TRANSFER != 0 && k + 1 == TRANSFER_FIELD.len() {
        // Any transfer coding (chunked, or one nginx refuses): the body's end is not followed.
        unknown_framing(f);
        return;
    } else {
        LINE_NAME
    };
    // SAFETY: as above.
    unsafe { put(&raw mut (*f).line, line) };
}

/// One byte of a `Content-Length` value: digits between optional spaces or tabs; anything
/// else (which nginx refuses, closing the connection) leaves the framing unknown.
#[inline(always)]
fn length_byte(f: *mut Frame, b: u8) {
    // SAFETY: a live map value (`scan_head`).
    let digits = unsafe { get(&raw const (*f).digits) };
    if b == b' ' || b == b'\t' || b == b'\r' {
        if digits != 0 {
            // SAFETY: as above.
            unsafe { put(&raw mut (*f).digits, digits | 0x80) };
        }
        return;
    }
    if b.is_ascii_digit() && digits < LENGTH_DIGITS {
        // SAFETY: as above.
        unsafe {
            let value = get(&raw const (*f).length_value);
            put(&raw mut (*f).length_value, value * 10 + u64::from(b - b'0'));
            put(&raw mut (*f).digits, digits + 1);
        }
        return;
    }
    unknown_framing(f);
}

/// The end of a `Content-Length` line: the value counts if it had digits and is the head's
/// first. nginx refuses a second `Content-Length`, equal or not ("client sent duplicate
/// header line": 400, and it closes the connection), so the bytes after such a head are no
/// request of its: the framing is left unknown, and the server's reply decides.
#[inline(always)]
fn end_length(f: *mut Frame) {
    // SAFETY: a live map value (`scan_head`).
    unsafe {
        let framing = get(&raw const (*f).framing);
        let value = get(&raw const (*f).length_value);
        if get(&raw const (*f).digits) & 0x7f == 0 || framing & FRAMING_LENGTH != 0 {
            put(&raw mut (*f).framing, framing | FRAMING_UNKNOWN);
            return;
        }
        put(&raw mut (*f).content_length, value);
        put(&raw mut (*f).framing, framing | FRAMING_LENGTH);
    }
}

/// Head chunks one segment can carry (a GSO/GRO buffer holds up to 64 KiB).
const CHUNKS_PER_SEGMENT: usize = (HEAD_BYTES_MAX as usize).div_ceil(HEAD_CHUNK);

/// Sends the current request's head bytes this segment holds (up to where the copy stops):
/// the request event first if it has not gone out yet.
#[inline(never)]
fn flush_head(ctx: &SkBuffContext, stats: &mut ConnStats, pos: *mut Pos) {
    if stats.parse.live.head_events == HEAD_EVENTS_FIRST {
        emit_head::<true>(ctx, stats, pos);
    }
    for _ in 0..CHUNKS_PER_SEGMENT {
        if !emit_head::<false>(ctx, stats, pos) {
            break;
        }
    }
}

/// Sends the next chunk of the current head from the segment (if it holds the byte at
/// `head_next`), advancing `head_next`; false when there is nothing more to send from it. The
/// first chunk of a request (`FIRST`, a request event) also carries the method bytes from
/// earlier segments, and goes out even without head bytes (identity off).
#[inline(never)]
fn emit_head<const FIRST: bool>(ctx: &SkBuffContext, stats: &mut ConnStats, pos: *mut Pos) -> bool {
    // SAFETY: this CPU's POS value.
    let (start, end, cookie, flags, prefix, payload) = unsafe {
        (
            get(&raw const (*pos).start),
            get(&raw const (*pos).end),
            get(&raw const (*pos).cookie),
            get(&raw const (*pos).flags) as u8,
            get(&raw const (*pos).prefix) as usize & (METHOD_MAX - 1),
            get(&raw const (*pos).payload),
        )
    };
    let prefix = if FIRST { prefix } else { 0 };
    let p = &mut stats.parse.live;
    let next = p.head_next as i64;
    let limit = p.head_limit as i64;
    if !FIRST && (p.head_events != HEAD_EVENTS_OPEN || next >= limit || next < start || next >= end)
    {
        return false;
    }
    let Some(ev) = REQUEST_SCRATCH.get_ptr_mut(0) else {
        count_loss(Loss::RequestEventsDropped);
        return false;
    };
    let stop = if end < limit { end } else { limit };
    let available = if stop > next && next >= start {
        (stop - next) as u32
    } else {
        0
    };
    // SAFETY: ev points to this CPU's scratch event (ingress only: egress, which softirqs may
    // interrupt, never touches it); every field and the first head_len bytes of `head` are
    // written before the copy, which takes only those.
    let len = unsafe {
        (*ev).cookie = cookie;
        (*ev).ts_ns = stats.last_seen_ns;
        (*ev).remote_addr = stats.remote_addr;
        (*ev).bytes_in_start = p.turn_start;
        (*ev).bytes_out_start = read_shared(&raw const stats.bytes_out);
        (*ev).events_out_start = stats.events_out;
        (*ev).kind = if FIRST { EVENT_REQUEST } else { EVENT_HEAD };
        (*ev).head_skip = 0;
        zero_pad(&raw mut (*ev)._pad);
        let head = (&raw mut (*ev).head).cast::<u8>();
        if prefix > 0 {
            core::ptr::copy_nonoverlapping(p.method.as_ptr(), head, METHOD_MAX);
        }
        let copied = if available > 0 {
            load_into::<HEAD_CHUNK>(
                ctx,
                payload as usize + (next - start) as usize,
                head.add(prefix),
                HEAD_CHUNK,
                available,
            )
        } else {
            0
        };
        let len = prefix + copied;
        (*ev).head_offset = p.head_next - prefix as u64;
        p.head_next = (*ev).head_offset + len as u64;
        let done = p.head_next >= p.head_limit;
        p.head_events = if done {
            HEAD_EVENTS_DONE
        } else {
            HEAD_EVENTS_OPEN
        };
        (*ev).flags = flags | if done { HEAD_DONE } else { 0 };
        (*ev).head_len = len as u16;
        // Read back from memory and bounded here, where the verifier sees it: the compiler
        // knows `len` fits from comparisons between registers, which older verifiers (6.1)
        // do not track, and would drop a bound on the value it computed.
        usize::from(core::ptr::read_volatile(&raw const (*ev).head_len))
    };
    // SAFETY: this CPU's POS value: later events are neither rewinds nor first.
    unsafe {
        put(&raw mut (*pos).flags, 0);
        put(&raw mut (*pos).prefix, 0);
    }
    let len = if len > HEAD_EVENT_MAX {
        HEAD_EVENT_MAX
    } else {
        len
    };
    let len = HEAD_OFFSET + len;
    // SAFETY: the first `len` bytes of the scratch event (at most its size) are initialized.
    let record = unsafe { core::slice::from_raw_parts(ev.cast::<u8>().cast_const(), len) };
    if REQUESTS.output::<[u8]>(record, 0).is_err() {
        count_loss(Loss::RequestEventsDropped);
    }
    let p = &stats.parse.live;
    p.head_events == HEAD_EVENTS_OPEN && (p.head_next as i64) < stop
}

/// Copies up to `cap` payload bytes at `offset` into `dst`, at most `available`; returns the
/// number copied. Bounding the length to 1..=cap in one place keeps the verifier satisfied.
///
/// SAFETY: `dst` points to at least `BUF` writable bytes (ring buffer, map or stack memory),
/// and `cap <= BUF`.
unsafe fn load_into<const BUF: usize>(
    ctx: &SkBuffContext,
    offset: usize,
    dst: *mut u8,
    cap: usize,
    available: u32,
) -> usize {
    let mut n = available as usize;
    if n > cap {
        n = cap;
    }
    if n == 0 {
        return 0;
    }
    // Restate 1 <= n <= BUF in a form the verifier tracks through compiler rewrites (an AND
    // bound survives where a compare may be folded away). BUF is a power of two.
    let n = ((n - 1) & (BUF - 1)) + 1;
    // SAFETY: per the contract, dst has room for n <= cap bytes; the helper bounds-checks the
    // packet side.
    let ret =
        unsafe { bpf_skb_load_bytes(ctx.skb.skb.cast(), offset as u32, dst.cast(), n as u32) };
    if ret == 0 { n } else { 0 }
}

/// The fixed part of a `RequestEvent`, for events without head bytes: written in place in the
/// ring buffer, not in the per-CPU scratch event (egress may run in process context, where an
/// ingress softirq could reuse it).
#[repr(C)]
struct TurnEvent {
    cookie: u64,
    ts_ns: u64,
    remote_addr: [u8; 16],
    bytes_in_start: u64,
    bytes_out_start: u64,
    events_out_start: u64,
    head_offset: u64,
    head_len: u16,
    kind: u8,
    flags: u8,
    head_skip: u8,
    _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<TurnEvent>() == HEAD_OFFSET);
const _: () = assert!(
    core::mem::offset_of!(TurnEvent, head_offset)
        == core::mem::offset_of!(RequestEvent, head_offset)
        && core::mem::offset_of!(TurnEvent, head_skip)
            == core::mem::offset_of!(RequestEvent, head_skip)
);

/// Tells the agent that a turn (or a request whose bytes passed unseen) began.
///
/// Written where it lives in the ring buffer: no copy from the stack, and no `memset` call for
/// a zeroed stack struct's padding.
fn report_turn(cookie: u64, stats: &ConnStats, flags: u8) {
    let Some(mut entry) = REQUESTS.reserve::<TurnEvent>(0) else {
        count_loss(Loss::RequestEventsDropped);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: the reserved entry holds a TurnEvent; every field is written before the submit;
    // bytes_out is a field of a live map value.
    unsafe {
        (*ev).cookie = cookie;
        (*ev).ts_ns = stats.last_seen_ns;
        (*ev).remote_addr = stats.remote_addr;
        (*ev).bytes_in_start = stats.parse.live.turn_start;
        (*ev).bytes_out_start = read_shared(&raw const stats.bytes_out);
        (*ev).events_out_start = stats.events_out;
        (*ev).head_offset = stats.parse.live.turn_start;
        (*ev).head_len = 0;
        (*ev).kind = EVENT_REQUEST;
        (*ev).flags = flags | HEAD_DONE;
        (*ev).head_skip = 0;
        zero_pad(&raw mut (*ev)._pad);
    }
    entry.submit(0);
}

/// Zeroes an event's three padding bytes one store each: `= [0; 3]` (alignment 1) becomes a
/// call to the BPF `memset` subprogram, a byte loop.
///
/// SAFETY: `pad` points to writable event memory.
#[inline(always)]
unsafe fn zero_pad(pad: *mut [u8; 3]) {
    let p = pad.cast::<u8>();
    // SAFETY: per the contract, three writable bytes.
    unsafe {
        core::ptr::write_volatile(p, 0);
        core::ptr::write_volatile(p.add(1), 0);
        core::ptr::write_volatile(p.add(2), 0);
    }
}

/// Tells the agent that no more head bytes of the current request will come.
///
/// The event is written where it lives in the ring buffer, not built on the stack: `head_bytes`
/// (one caller; this is inlined there) is the fifth frame of the packet program's deepest call chain
/// (`sensor_ingress`, `client_segment`, `http_turn`, the `bpf_loop` callback `frame_step`,
/// `head_bytes`, then `flush_head` and `emit_head`), and the verifier adds the frames of that
/// chain, each rounded up to 32 bytes, against the 512 bytes of BPF stack. 6.1 counts the
/// callback as called from the frame that passes it to `bpf_loop`; with the 80-byte event on
/// its stack `head_bytes` took 144 bytes and the chain 576 (6.1 stopped at the shorter branch
/// to `scan_head`: "combined stack size of 6 calls is 544. Too large"). Without it the chain
/// takes 128 + 96 + 32 + 32 + 96 + 32 + 96 = 512 bytes, the whole budget: a frame on it that
/// grows past its 32-byte step is refused there (the kernels test loads the program on 6.1).
fn report_head_done(cookie: u64, stats: &ConnStats) {
    let Some(mut entry) = REQUESTS.reserve::<TurnEvent>(0) else {
        count_loss(Loss::RequestEventsDropped);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: the reserved entry holds a TurnEvent; every field is written before the submit.
    unsafe {
        (*ev).cookie = cookie;
        (*ev).ts_ns = stats.last_seen_ns;
        (*ev).remote_addr = stats.remote_addr;
        (*ev).bytes_in_start = stats.parse.live.turn_start;
        // Volatile: LLVM folds two adjacent zero stores into a `memset` call.
        core::ptr::write_volatile(&raw mut (*ev).bytes_out_start, 0);
        core::ptr::write_volatile(&raw mut (*ev).events_out_start, 0);
        (*ev).head_offset = stats.parse.live.head_next;
        (*ev).head_len = 0;
        (*ev).kind = EVENT_HEAD;
        (*ev).flags = HEAD_DONE;
        (*ev).head_skip = 0;
        zero_pad(&raw mut (*ev)._pad);
    }
    entry.submit(0);
}

/// New server data.
///
/// While the client's requests are framed (the parser is at a request start, in a head, or in
/// a body of known length), a reply changes nothing: the requests the client sent before it
/// (pipelined) are already followed. Otherwise the client's next bytes start a new turn.
///
/// If the parser never saw bytes TCP accepted where a request starts (the request came in the
/// packet that completed the handshake, before the record existed; or after a gap filled out
/// of order), the server answering shows a request came: it is counted from turn-taking,
/// without a head.
// A subprogram of its own: its branches join before the SSE scan, which the verifier then
// walks once instead of once per branch taken here.
#[inline(never)]
fn server_replied(cookie: u64, stats: &mut ConnStats, rcvd: u64) {
    let at = payload_received(stats, rcvd);
    let f = &mut stats.parse.live;
    let state = f.mode & MODE_STATE;
    let counted = f.mode & MODE_COUNTED != 0;
    // What TCP accepted beyond the parser's position (`at` leaves out the byte TCP counts for
    // a FIN: a client that half-closes after pipelined requests is answered after its FIN).
    let stale = if state == MODE_SKIP {
        at > f.req_end
    } else {
        f.cursor < at
    };
    if stale && !counted && (state == MODE_ARMED || state == MODE_SKIP) {
        if state == MODE_SKIP {
            f.turn_start = f.req_end;
        }
        // SAFETY: field of a live map value.
        unsafe { atomic_add(&raw mut stats.requests, 1) };
        // The request's time is its answer's: read now, not the tick's first reply packet.
        stats.last_seen_ns = now_ns();
        report_turn(cookie, stats, HEAD_UNSEEN);
        stats.exchange_flags = EXCHANGE_RESPONSE_PENDING;
    }
    let f = &mut stats.parse.live;
    let framed = state == MODE_ARMED || state == MODE_HEAD || state == MODE_SKIP;
    if framed && !stale {
        return;
    }
    arm(f, at);
    if f.head_events == HEAD_EVENTS_OPEN {
        // The server answers once it has the whole head: whatever was not copied by now
        // will not be.
        f.head_limit = f.head_next;
        f.head_events = HEAD_EVENTS_DONE;
        report_head_done(cookie, stats);
    }
}

/// Offset of `RequestEvent::head`: the fixed part of a request record.
const HEAD_OFFSET: usize = core::mem::offset_of!(RequestEvent, head);

/// High bit of each byte of `x` that is zero, exactly (no false positives above a zero byte).
#[inline(always)]
fn zero_bytes(x: u64) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    !(((x & LOW7).wrapping_add(LOW7)) | x | LOW7)
}

/// Counts server-sent events in a new reply segment of an HTTP/1.x connection.
///
/// The first reply segment after a request holds the response head: the exchange is SSE when
/// its `Content-Type` is `text/event-stream` (`head_names_event_stream`). In SSE replies every `data:` at a line start (or segment start)
/// within the first `SSE_SCAN_MAX` bytes of a segment counts one event. An estimate of output
/// token chunks; see docs/counters.md for what it misses.
fn count_events(ctx: &SkBuffContext, stats: &mut ConnStats, segment: &Segment) {
    let head = stats.exchange_flags & EXCHANGE_RESPONSE_PENDING != 0;
    if !head && stats.exchange_flags & EXCHANGE_SSE == 0 {
        return;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: scratch is this CPU's map value; nothing else touches it while we run.
    unsafe {
        let base = (&raw mut (*scratch).bytes).cast::<u8>();
        let n = load_into::<SSE_SCAN_MAX>(
            ctx,
            segment.payload_offset,
            base,
            SSE_SCAN_MAX,
            segment.payload_len,
        );
        zero_tail(base, n);
        if head {
            core::ptr::write_volatile(&raw mut (*scratch).len, n as u64);
            let sse = head_names_event_stream(base, &raw const (*scratch).len);
            stats.exchange_flags = if sse {
                EXCHANGE_SSE
            } else if n >= 10 && interim_status(core::ptr::read_volatile(base.cast::<[u8; 10]>())) {
                // 100 Continue or 103 Early Hints: the final head comes in a later segment.
                EXCHANGE_RESPONSE_PENDING
            } else {
                0
            };
            if !sse {
                return;
            }
        }
        (*scratch).found = 0;
        core::ptr::write_volatile(&raw mut (*scratch).len, n as u64);
        count_data_lines(base, &raw const (*scratch).len, &raw mut (*scratch).found);
        let events = core::ptr::read_volatile(&raw const (*scratch).found);
        if events > 0 {
            atomic_add(&raw mut stats.events_out, events);
        }
    }
}

// The scans below go eight bytes at a time, with masks rather than a branch per byte, and
// carry nothing from one word to the next but masks: the verifier walks a bounded loop once
// per iteration, and every branch whose paths do not join again multiplies what it walks.
// The bytes past the copied ones are zeroed first, so no pattern (none holds a zero byte) is
// found in stale bytes and no bound is checked per position.

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Words of `Scratch::bytes` the scans look at.
const SSE_WORDS: usize = SSE_SCAN_MAX / 8;

/// The eight bytes starting `k` bytes into word `w` (k < 16), from aligned words.
///
/// SAFETY: words `w..=w + 2` are readable.
#[inline(always)]
unsafe fn window(words: *const u64, w: usize, k: usize) -> u64 {
    // SAFETY: per the contract.
    unsafe {
        let a = core::ptr::read_volatile(words.add(w + k / 8));
        if k % 8 == 0 {
            return a;
        }
        let b = core::ptr::read_volatile(words.add(w + k / 8 + 1));
        (a >> (8 * (k % 8))) | (b << (64 - 8 * (k % 8)))
    }
}

/// High bit of byte `j` set where `pattern` starts at byte `8 * w + j` (little endian).
///
/// SAFETY: as `window`.
#[inline(always)]
unsafe fn pattern_starts(words: *const u64, w: usize, pattern: &[u8]) -> u64 {
    let mut m = HIGHS;
    let mut k = 0;
    while k < pattern.len() {
        // SAFETY: per the contract.
        let x = unsafe { window(words, w, k) } ^ (ONES * u64::from(pattern[k]));
        m &= zero_bytes(x);
        k += 1;
    }
    m
}

/// Zeroes the bytes after the first `n` of the scratch buffer to the end of the next word
/// (at least 9 bytes): every position a scan may start a pattern at, at or past `n`, lies in
/// the word holding byte `n - 1` or before, so each such start meets a zero first (see above).
/// Two word stores, not a `write_bytes`, which became a call to the BPF `memset` subprogram (a
/// byte loop) for the unaligned range.
///
/// SAFETY: `base` points at this CPU's `Scratch::bytes` (8-byte aligned), `n <= SSE_SCAN_MAX`.
#[inline(always)]
unsafe fn zero_tail(base: *mut u8, n: usize) {
    let n = n & (2 * SSE_SCAN_MAX - 1);
    if n <= SSE_SCAN_MAX {
        let words = base.cast::<u64>();
        let w = n / 8;
        // The low `n % 8` bytes of word `w` (little endian) are copied bytes and stay.
        let keep = (n % 8) as u64;
        let mask = if keep == 0 {
            0
        } else {
            u64::MAX >> (64 - 8 * keep)
        };
        // SAFETY: w <= SSE_SCAN_MAX / 8, and the buffer has two words of slack past
        // SSE_SCAN_MAX: words w and w + 1 lie in it.
        unsafe {
            let first = core::ptr::read_volatile(words.add(w));
            core::ptr::write_volatile(words.add(w), first & mask);
            core::ptr::write_volatile(words.add(w + 1), 0);
        }
    }
}

/// Whether a status line starts `HTTP/1.x 1`: an interim (1xx) response, whose head ends before
/// the final response's.
#[inline(always)]
fn interim_status(b: [u8; 10]) -> bool {
    b[..7] == *b"HTTP/1." && b[8] == b' ' && b[9] == b'1'
}

/// Whether a response head in the first `*len` bytes at `base` has a `Content-Type` of
/// `text/event-stream` (any case, after optional spaces or tabs, followed by a parameter, space
/// or the line's end).
///
/// Reads the head's lines only: word by word for line feeds, looking at the line after a word's
/// last line feed (a `Content-Type` line is longer than a word, so it cannot begin after an
/// earlier one in the same word), and stops at the blank line that ends the head or at the
/// first `Content-Type` field. So `event-stream` in another field or in the body (a reply that
/// echoes what the client sent) does not make a reply SSE, and the body's bytes are not read.
/// The bytes after the first `*len` are zeroed (see `zero_tail`), so no line feed is found
/// there.
#[inline(never)]
fn head_names_event_stream(base: *const u8, len: *const u64) -> bool {
    // SAFETY: len points into this CPU's scratch value (see `Scratch::len`).
    let n = unsafe { core::ptr::read_volatile(len) } as usize;
    let words = base.cast::<u64>();
    // Line feeds and carriage returns of the previous word (none when it had no line feed: a
    // blank line's CR or first LF there would need a line feed before it in that word too).
    let mut prev_lf = 0u64;
    let mut prev_cr = 0u64;
    let mut value = 0usize;
    let mut w = 0;
    while w < SSE_WORDS && w * 8 < n {
        // SAFETY: w < SSE_WORDS; the scratch buffer is 8-byte aligned.
        let word = unsafe { core::ptr::read_volatile(words.add(w)) };
        let lf = zero_bytes(word ^ (ONES * u64::from(b'\n')));
        if lf == 0 {
            prev_lf = 0;
            prev_cr = 0;
            w += 1;
            continue;
        }
        let cr = zero_bytes(word ^ (ONES * u64::from(b'\r')));
        // A line feed one byte after a line feed, or after a CR that follows one: the blank
        // line that ends the head (nginx, like RFC 9112, also takes a bare LF as a line end).
        let lf_before = (lf << 8) | (prev_lf >> 56);
        let lf_two_before = (lf << 16) | (prev_lf >> 48);
        let cr_before = (cr << 8) | (prev_cr >> 56);
        if lf & (lf_before | (cr_before & lf_two_before)) != 0 {
            return false;
        }
        prev_lf = lf;
        prev_cr = cr;
        // One past the word's last line feed: the high bits at and below it, counted.
        let mut below = lf | (lf >> 8);
        below |= below >> 16;
        below |= below >> 32;
        let line = w * 8 + ((((below >> 7) & ONES).wrapping_mul(ONES)) >> 56) as usize;
        // SAFETY: the reads lie in the first n bytes (line + 13 <= n), whose words are in the
        // buffer.
        if line + CONTENT_TYPE.len() <= n
            && unsafe {
                folded_is(bytes_at(words, line), CONTENT_TYPE_HEAD)
                    && folded_is(bytes_at(words, line + 5), CONTENT_TYPE_TAIL)
            }
        {
            value = line + CONTENT_TYPE.len();
            break;
        }
        w += 1;
    }
    // SAFETY: value <= n, as checked above; the buffer is the scratch one.
    value != 0 && unsafe { value_is_event_stream(words, value, n) }
}

const CONTENT_TYPE: &[u8; 13] = b"content-type:";
const EVENT_STREAM: &[u8; 17] = b"text/event-stream";

/// Bytes 0..8 and 5..13 of `content-type:` and 0..8 and 8..16 of `text/event-stream`, as
/// little-endian words, with the letters' case bit (see `folded_is`).
const CONTENT_TYPE_HEAD: (u64, u64) = word_of(CONTENT_TYPE, 0);
const CONTENT_TYPE_TAIL: (u64, u64) = word_of(CONTENT_TYPE, 5);
const EVENT_STREAM_HEAD: (u64, u64) = word_of(EVENT_STREAM, 0);
const EVENT_STREAM_MID: (u64, u64) = word_of(EVENT_STREAM, 8);

/// Eight bytes of `pattern` from `at` as a little-endian word, and the word's letter bits
/// (0x20 where a byte is a lower-case letter).
const fn word_of(pattern: &[u8], at: usize) -> (u64, u64) {
    let mut word = 0u64;
    let mut letters = 0u64;
    let mut i = 0;
    while i < 8 {
        let b = pattern[at + i];
        word |= (b as u64) << (8 * i);
        if b.is_ascii_lowercase() {
            letters |= 0x20 << (8 * i);
        }
        i += 1;
    }
    (word, letters)
}

/// Whether the eight bytes in `x` are the pattern word's, letters in any case: setting a
/// letter's case bit makes it lower case, and only its two cases become that letter; other
/// bytes must match exactly.
#[inline(always)]
fn folded_is(x: u64, (word, letters): (u64, u64)) -> bool {
    x | letters == word
}

/// The eight bytes at `pos` of the scratch buffer.
///
/// SAFETY: `words` is the scratch buffer; `pos < SSE_SCAN_MAX`, so words `pos / 8` and the one
/// after lie in it (the mask restates that bound where the verifier sees it).
#[inline(always)]
unsafe fn bytes_at(words: *const u64, pos: usize) -> u64 {
    let w = opaque((pos / 8) as u64) as usize & (SSE_WORDS - 1);
    let shift = pos % 8;
    // SAFETY: per the contract; w + 1 <= SSE_WORDS, inside the buffer's slack.
    unsafe {
        let a = core::ptr::read_volatile(words.add(w));
        if shift == 0 {
            return a;
        }
        let b = core::ptr::read_volatile(words.add(w + 1));
        (a >> (8 * shift)) | (b << (64 - 8 * shift))
    }
}

/// Whether the field value at `value` (just past `content-type:`) is `text/event-stream`:
/// after at most seven spaces or tabs, the media type in any case, then a parameter (`;`), a
/// space or tab, or the line's end. A value cut by the end of the scanned bytes is not.
///
/// SAFETY: `words` is the scratch buffer, `value <= n <= SSE_SCAN_MAX`.
#[inline(always)]
unsafe fn value_is_event_stream(words: *const u64, value: usize, n: usize) -> bool {
    // The media type and one byte after it, at the least.
    let need = EVENT_STREAM.len() + 1;
    if value + need > n {
        return false;
    }
    // SAFETY: value < n.
    let x = unsafe { bytes_at(words, value) };
    let blank =
        zero_bytes(x ^ (ONES * u64::from(b' '))) | zero_bytes(x ^ (ONES * u64::from(b'\t')));
    let other = !blank & HIGHS;
    if other == 0 {
        return false;
    }
    let at = value + (lowest_bit(other) / 8) as usize;
    if at + need > n {
        return false;
    }
    // SAFETY: at + 17 < n: every read starts inside the first n bytes.
    let (head, mid, last) = unsafe {
        (
            bytes_at(words, at),
            bytes_at(words, at + 8),
            bytes_at(words, at + 16),
        )
    };
    let m = (last & 0xff) as u8;
    let after = ((last >> 8) & 0xff) as u8;
    folded_is(head, EVENT_STREAM_HEAD)
        && folded_is(mid, EVENT_STREAM_MID)
        && m | 0x20 == b'm'
        && matches!(after, b';' | b' ' | b'\t' | b'\r' | b'\n')
}

/// Adds to `*found` the number of `data:` at a line start (or at offset 0) in the first
/// `*len` bytes at `base`.
///
/// SAFETY: `found` points to writable map memory.
#[inline(never)]
unsafe fn count_data_lines(base: *const u8, len: *const u64, found: *mut u64) {
    const PATTERN: &[u8; 5] = b"data:";
    // SAFETY: len points into this CPU's scratch value (see `Scratch::len`).
    let n = unsafe { core::ptr::read_volatile(len) } as usize;
    let words = base.cast::<u64>();
    // A line feed "before" offset 0: the segment's start counts as a line start.
    let mut prev_lf = 0x80u64 << 56;
    let mut w = 0;
    while w < SSE_WORDS && w * 8 < n {
        // SAFETY: words w ..= w + 1 lie in the buffer and its slack.
        let (word, starts) = unsafe {
            (
                core::ptr::read_volatile(words.add(w)),
                pattern_starts(words, w, PATTERN),
            )
        };
        let lf = zero_bytes(word ^ (ONES * u64::from(b'\n')));
        let line = (lf << 8) | (prev_lf >> 56);
        // Set high bits, counted without a branch.
        let events = (((starts & line) >> 7) & ONES).wrapping_mul(ONES) >> 56;
        // SAFETY: per the contract.
        unsafe { core::ptr::write_volatile(found, core::ptr::read_volatile(found) + events) };
        prev_lf = lf;
        w += 1;
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
