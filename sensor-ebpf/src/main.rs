//! Kernel programs of the traffic sensor.
//!
//! * `sensor_sockops` (sock_ops, cgroup): opens a record when a connection to a watched local
//!   port is established and, when the connection closes, marks it closed and pushes its final
//!   counters to the agent through the `CLOSED` ring buffer. The agent frees the record once it
//!   has durably accounted it, so a crashed agent finds every closed connection on restart.
//! * `sensor_ingress` / `sensor_egress` (cgroup_skb): count payload bytes, segments and requests
//!   of every packet of a recorded connection.
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
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd},
};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE, seq_file,
    },
    btf_maps::SkStorage,
    helpers::{
        bpf_get_socket_cookie, bpf_ktime_get_boot_ns, bpf_seq_write, bpf_sk_fullsock,
        bpf_sk_storage_delete, bpf_sk_storage_get, bpf_skb_load_bytes, bpf_tcp_sock,
    },
    macros::{btf_map, cgroup_skb, map, sock_ops},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{SkBuffContext, SockOpsContext},
};
use aya_log_ebpf::warn;
use sensor_common::{
    CONFIG_HEAD_BYTES, CONFIG_MAX_CONNECTIONS, CONFIG_SLOTS, ClosedConn, ConnStats,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_REQUEST_RING_BYTES, DEFAULT_RING_BYTES,
    EXCHANGE_RESPONSE_PENDING, EXCHANGE_SSE, HEAD_MAX, LIVE_READ_ITERATOR, LIVE_READ_MAP, Loss,
    NO_EXCHANGE_PENDING, PROTO_HTTP1, PROTO_OTHER, PROTO_UNKNOWN, RequestEvent, SSE_SCAN_MAX,
};

/// cgroup_skb verdict that lets the packet through.
const ALLOW: i32 = 1;
const AF_INET: u16 = 2;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_HOPOPTS: u8 = 0;
const IPV6_HEADER_LEN: usize = 40;
// Copy sizes are powers of two so that `load_into` can bound lengths with a mask.
const _: () = assert!(HEAD_MAX.is_power_of_two() && SSE_SCAN_MAX.is_power_of_two());
/// Largest header length before TCP that is parsed: an IPv6 header and a hop-by-hop header of
/// up to 64 bytes (BIG TCP's is 8); IPv4 headers are at most 60.
const MAX_L4_OFFSET: usize = IPV6_HEADER_LEN + 64;
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

/// Closed connections, keyed by socket cookie: the final record, kept until the agent has
/// accounted it durably and deletes it. The agent sizes it at load time.
#[map]
static CONNS: HashMap<u64, ConnStats> = HashMap::with_max_entries(DEFAULT_MAX_CONNECTIONS, 0);

/// Final counters of closed connections, read by the agent.
#[map]
static CLOSED: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// Request start events, for inter-request timing in the agent. Records are as long as the
/// head they carry (`RequestEvent` cut after `head_len` bytes of `head`).
#[map]
static REQUESTS: RingBuf = RingBuf::with_byte_size(DEFAULT_REQUEST_RING_BYTES, 0);

/// Per-CPU space where a request event is put together before it is copied to `REQUESTS`:
/// a variable-length record needs `bpf_ringbuf_output`, and a compact ring (a typical request
/// head is ~100 bytes, not the 1 KiB maximum) runs through far fewer cache lines per request.
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
    bytes: [u8; SSE_SCAN_MAX],
    /// Matches found by a scan. Kept in memory rather than in a register: the verifier does
    /// not track memory contents, so a count does not multiply the paths it explores.
    found: u64,
}

#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Loss and skip counters, indexed by `sensor_common::Loss`.
#[map]
static LOSS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Loss::SLOTS, 0);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client -> this host.
    In,
    /// This host -> client.
    Out,
}

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
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => open_connection(&ctx),
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
// A subprogram of its own: each record copy gets its own 512-byte stack frame instead of
// sharing the caller's.
#[inline(never)]
fn open_connection(ctx: &SockOpsContext) {
    if !watched(ctx.local_port()) {
        return;
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
    let now = now_ns();
    let mut record = ClosedConn {
        // SAFETY: the context is a sock_ops context, which bpf_get_socket_cookie accepts.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        stats: ConnStats {
            local_addr,
            remote_addr,
            local_port: ctx.local_port() as u16,
            // remote_port holds the port in network order in its upper half on little endian
            // (sock_ops_convert_ctx_access shifts it); ntohl gives the host-order port.
            remote_port: u32::from_be(ctx.remote_port()) as u16,
            family,
            proto: PROTO_UNKNOWN,
            closed: 0,
            bytes_in: 0,
            bytes_out: 0,
            // The handshake segments were counted by the kernel before the record existed.
            packets_in: u64::from(segs_in),
            packets_out: u64::from(segs_out),
            requests: 0,
            first_seen_ns: now,
            last_seen_ns: now,
            in_seq_base: rcv_nxt,
            out_seq_base: snd_nxt,
            req_start: 0,
            events_out: 0,
            exchange_flags: 0,
            _pad: 0,
        },
    };
    let recorded = if map_path() {
        record_in_map(ctx, &record)
    } else {
        record_in_storage(ctx, &mut record)
    };
    if !recorded {
        count_loss(Loss::ConnMapFull);
        warn!(
            ctx,
            "no room for a connection record: port {} not counted", record.stats.local_port
        );
    }
}

/// Map path: the live record goes into OPEN under the socket's cookie. False when
/// `max_connections` are live already.
#[inline(always)]
fn record_in_map(ctx: &SockOpsContext, record: &ClosedConn) -> bool {
    // NOEXIST: a cookie is never reused while the kernel runs, so an existing entry would be a
    // second callback for the same socket, whose counts must not restart.
    if OPEN
        .insert(&record.cookie, &record.stats, u64::from(BPF_NOEXIST))
        .is_err()
    {
        return false;
    }
    if watch_close(ctx) {
        return true;
    }
    let _ = OPEN.remove(&record.cookie);
    false
}

/// Iterator path: the live record goes into the socket's own storage. False when
/// `max_connections` are live already or the kernel has no storage for it.
#[inline(always)]
fn record_in_storage(ctx: &SockOpsContext, record: &mut ClosedConn) -> bool {
    // SAFETY: context pointer; sk is the full socket (NULL otherwise).
    let sk: *mut c_void = unsafe { (*ctx.ops).__bindgen_anon_2.sk }.cast();
    if sk.is_null() || !take_live_slot() {
        return false;
    }
    // SAFETY: sk is a non-null full socket; the initial value is a stack copy of the record.
    let created = unsafe {
        bpf_sk_storage_get(
            socks(),
            sk,
            core::ptr::from_mut(record).cast(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
    };
    if created.is_null() {
        release_live_slot();
        return false;
    }
    if watch_close(ctx) {
        return true;
    }
    // SAFETY: as above.
    unsafe { bpf_sk_storage_delete(socks(), sk) };
    release_live_slot();
    false
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
    // SAFETY: record points into the socket's live storage.
    unsafe {
        (*record).stats.last_seen_ns = now_ns();
        (*record).stats.closed = 1;
        let cookie = (*record).cookie;
        // The final record stays in CONNS until the agent has accounted it durably.
        if CONNS
            .insert(&cookie, &(*record).stats, u64::from(BPF_ANY))
            .is_err()
        {
            count_loss(Loss::ConnMapFull);
        }
        match CLOSED.reserve::<ClosedConn>(0) {
            Some(mut entry) => {
                entry.write(*record);
                entry.submit(0);
            }
            // The agent's next poll finds the closed record in CONNS: a delay, not a loss.
            None => count_loss(Loss::RingBufFull),
        }
        // Later packets (a reset after the close) are not counted, and the iterator no longer
        // lists the connection as live.
        if bpf_sk_storage_delete(socks(), sk) == 0 {
            release_live_slot();
        }
    }
}

/// `close_connection` on the map path: the final record moves from OPEN to CONNS.
fn close_in_map(ctx: &SockOpsContext) {
    // SAFETY: the context is a sock_ops context, which bpf_get_socket_cookie accepts.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(stats) = OPEN.get_ptr_mut(&cookie) else {
        return;
    };
    // SAFETY: pointer into a live map value, which stays valid (RCU) until this program ends
    // even after the remove below.
    unsafe {
        (*stats).last_seen_ns = now_ns();
        (*stats).closed = 1;
        // The final record stays in CONNS until the agent has accounted it durably.
        if CONNS.insert(&cookie, &*stats, u64::from(BPF_ANY)).is_err() {
            count_loss(Loss::ConnMapFull);
        }
        match CLOSED.reserve::<ClosedConn>(0) {
            Some(mut entry) => {
                entry.write(ClosedConn {
                    cookie,
                    stats: *stats,
                });
                entry.submit(0);
            }
            // The agent's next poll finds the closed record in CONNS: a delay, not a loss.
            None => count_loss(Loss::RingBufFull),
        }
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

/// Iterator over `SOCKS` (`bpf_iter__bpf_sk_storage_map`): writes every live record, as
/// `ClosedConn` bytes, to the reader. The agent opens the pinned link to read them.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/bpf_sk_storage_map")]
pub extern "C" fn sensor_conns(ctx: *mut c_void) -> i32 {
    // The context is { meta, map, sk, value }, each 8 bytes; value is NULL at the end.
    let args = ctx.cast::<u64>();
    // SAFETY: context reads at constant offsets, as the verifier requires.
    let (meta, value) = unsafe {
        (
            core::ptr::read_volatile(args) as *const IterMeta,
            core::ptr::read_volatile(args.add(3)) as *const c_void,
        )
    };
    if meta.is_null() || value.is_null() {
        return 0;
    }
    // SAFETY: meta is the kernel's iterator metadata; value is a SOCKS value.
    unsafe {
        let seq = (*meta).seq;
        bpf_seq_write(seq, value, core::mem::size_of::<ClosedConn>() as u32);
    }
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
    if count_packet(&ctx, Direction::In).is_err() {
        count_loss(Loss::Unparsed);
    }
    ALLOW
}

#[cgroup_skb(egress)]
pub fn sensor_egress(ctx: SkBuffContext) -> i32 {
    if count_packet(&ctx, Direction::Out).is_err() {
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
        match ip6[6] {
            IPPROTO_TCP => IPV6_HEADER_LEN,
            // BIG TCP: a GSO/GRO buffer over 64 KiB carries a hop-by-hop header (with the
            // jumbo payload option) before TCP. Other extension headers are not followed;
            // such packets count as unparsed.
            IPPROTO_HOPOPTS => {
                // Next header at 0, length in 8-byte units after the first 8 at 1.
                let hop: [u8; 8] = load(ctx, IPV6_HEADER_LEN)?;
                if hop[0] != IPPROTO_TCP {
                    return Err(Unparsed);
                }
                IPV6_HEADER_LEN + (usize::from(hop[1]) + 1) * 8
            }
            _ => return Err(Unparsed),
        }
    } else {
        return Err(Unparsed);
    };
    if l4_offset < 20 || l4_offset > MAX_L4_OFFSET {
        return Err(Unparsed);
    }
    // Sequence number at 4..8, data offset in the high nibble of byte 12.
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
    })
}

fn count_packet(ctx: &SkBuffContext, direction: Direction) -> Result<(), Unparsed> {
    // SAFETY: context pointer; local_port is the socket's bound port in host order.
    let local_port = unsafe { (*ctx.skb.skb).local_port };
    if !watched(local_port) {
        return Ok(());
    }
    let Some((cookie, stats)) = record_of_packet(ctx) else {
        // The listener's own packets, or a connection established before the sensor attached.
        return Ok(());
    };
    let segment = parse(ctx)?;
    // SAFETY: stats points into a live map value; fields are only updated atomically or as
    // single aligned stores, which tolerate concurrent readers.
    unsafe {
        let (packets, bytes, seq_base) = match direction {
            Direction::In => (
                &raw mut (*stats).packets_in,
                &raw mut (*stats).bytes_in,
                (*stats).in_seq_base,
            ),
            Direction::Out => (
                &raw mut (*stats).packets_out,
                &raw mut (*stats).bytes_out,
                (*stats).out_seq_base,
            ),
        };
        atomic_add(packets, segment.segments);
        (*stats).last_seen_ns = now_ns();
        if segment.payload_len == 0 {
            return Ok(());
        }
        let (start, new_data) = advance(bytes, seq_base, &segment);
        match direction {
            Direction::In => track_request(ctx, cookie, &mut *stats, start, &segment)?,
            Direction::Out if new_data => {
                // A reply although no exchange start was ever seen: the client's first payload
                // came in the packet that completed the handshake (its final ACK was lost),
                // which passed these programs before the record existed. The server answering
                // means that exchange happened: count it, and classify at the next one.
                if (*stats).proto == PROTO_UNKNOWN && (*stats).req_start == 0 {
                    let mut seen = read_shared(&raw const (*stats).bytes_in);
                    if seen == 0 {
                        // Nothing else came since: TCP has those bytes, in order, from ISN + 1
                        // (the base of bytes_in), so its count is the exact high-water mark.
                        seen = tcp_bytes_received(ctx);
                        if seen > 0 {
                            atomic_replace(&raw mut (*stats).bytes_in, 0, seen);
                        }
                    }
                    if seen > 0 {
                        atomic_add(&raw mut (*stats).requests, 1);
                        (*stats).req_start = NO_EXCHANGE_PENDING;
                    }
                }
                // New reply data: the next client payload starts a new exchange.
                if (*stats).req_start == NO_EXCHANGE_PENDING {
                    (*stats).req_start = read_shared(&raw const (*stats).bytes_in);
                }
                if (*stats).proto == PROTO_HTTP1 {
                    count_events(ctx, &mut *stats, &segment);
                }
            }
            Direction::Out => {}
        }
    }
    Ok(())
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

/// Payload bytes the kernel's TCP has received in order on the packet's connection
/// (`tcp_sock.bytes_received`), 0 where the packet has no full TCP socket.
#[inline(never)]
fn tcp_bytes_received(ctx: &SkBuffContext) -> u64 {
    // SAFETY: context pointer; sk is readable by cgroup_skb programs (may be NULL). The
    // helpers return NULL for sockets that are not full TCP sockets.
    unsafe {
        let sk = (*ctx.skb.skb).__bindgen_anon_2.sk;
        if sk.is_null() {
            return 0;
        }
        let full = bpf_sk_fullsock(sk);
        if full.is_null() {
            return 0;
        }
        let tp = bpf_tcp_sock(full);
        if tp.is_null() {
            return 0;
        }
        (*tp).bytes_received
    }
}

/// Advances a direction's byte counter to the end of this segment, if that is further than
/// what was seen: each sequence number counts once, so retransmissions add nothing and a segment
/// that arrives after a gap counts the gap, which the retransmission then fills.
///
/// The counter is the payload offset (bytes past ISN + 1) of the highest byte seen: its low
/// 32 bits extend the 32-bit sequence space, so transfers over 4 GiB count right.
/// Returns the segment's start offset and whether it carried new data.
///
/// SAFETY: `counter` points into a live map value.
unsafe fn advance(counter: *mut u64, seq_base: u32, segment: &Segment) -> (i64, bool) {
    let mut start = 0i64;
    for _ in 0..CAS_ATTEMPTS {
        // SAFETY: per the function contract.
        let current = unsafe { read_shared(counter) };
        let distance = segment
            .seq
            .wrapping_sub(seq_base)
            .wrapping_sub(current as u32) as i32;
        start = current as i64 + i64::from(distance);
        let end = start + i64::from(segment.payload_len);
        if end <= current as i64 {
            return (start, false);
        }
        // SAFETY: per the function contract.
        if unsafe { atomic_replace(counter, current, end as u64) } {
            return (start, true);
        }
    }
    (start, false)
}

/// Counts a request when client payload starts a new exchange (see docs/counters.md).
///
/// `req_start` arms when the server sends new data: it is the client's byte offset at that
/// moment, and client payload at or past it may start the next exchange.
/// * HTTP/1.x: the first armed segment that begins with a request method is a request. Other
///   armed segments (a body still arriving after an early reply, a body after "100 Continue")
///   leave it armed. Checking every armed segment, not only the one at `req_start`, also finds
///   a request whose first segment was lost and arrives after later ones.
/// * Other protocols: the first armed client payload is a turn.
/// * Unknown (no payload yet): the payload at offset 0 decides which of the two it is.
fn track_request(
    ctx: &SkBuffContext,
    cookie: u64,
    stats: &mut ConnStats,
    start: i64,
    segment: &Segment,
) -> Result<(), Unparsed> {
    let pending = stats.req_start;
    if pending == NO_EXCHANGE_PENDING || start < pending as i64 {
        return Ok(());
    }
    let counts = match stats.proto {
        PROTO_HTTP1 => starts_with_method(ctx, segment)?,
        PROTO_OTHER => true,
        // The first exchange start seen (offset 0, or the next one when the first came with the
        // handshake); wait for it if it was lost.
        _ if start == pending as i64 => {
            let http = starts_with_method(ctx, segment)?;
            stats.proto = if http { PROTO_HTTP1 } else { PROTO_OTHER };
            true
        }
        _ => false,
    };
    if counts {
        stats.req_start = NO_EXCHANGE_PENDING;
        stats.exchange_flags = EXCHANGE_RESPONSE_PENDING;
        // SAFETY: field of a live map value.
        unsafe { atomic_add(&raw mut stats.requests, 1) };
        report_request(ctx, cookie, stats, start, segment);
    }
    Ok(())
}

/// Copies up to `cap` payload bytes at `offset` into `dst`, at most `available`; returns the
/// number copied. Bounding the length to 1..=cap in one place keeps the verifier satisfied.
///
/// SAFETY: `dst` points to at least `BUF` writable bytes (ring buffer or map memory), and
/// `cap <= BUF`.
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

/// Tells the agent that an exchange began: when, where in the connection's counters, and, for
/// HTTP/1.x, the first bytes of the request (for identity; the agent reads only the head).
fn report_request(
    ctx: &SkBuffContext,
    cookie: u64,
    stats: &ConnStats,
    start: i64,
    segment: &Segment,
) {
    let Some(ev) = REQUEST_SCRATCH.get_ptr_mut(0) else {
        count_loss(Loss::RequestEventsDropped);
        return;
    };
    let head_cap = match CONFIG.get(CONFIG_HEAD_BYTES) {
        Some(&n) if stats.proto == PROTO_HTTP1 => n as usize,
        _ => 0,
    };
    // SAFETY: ev points to this CPU's scratch RequestEvent; every field up to `head` and the
    // first head_len bytes of `head` are written before the copy, which takes only those.
    let len = unsafe {
        (*ev).cookie = cookie;
        (*ev).ts_ns = stats.last_seen_ns;
        (*ev).remote_addr = stats.remote_addr;
        (*ev).bytes_in_start = start as u64;
        (*ev).bytes_out_start = read_shared(&raw const stats.bytes_out);
        (*ev).events_out_start = stats.events_out;
        (*ev)._pad = [0; 6];
        let cap = if head_cap > HEAD_MAX {
            HEAD_MAX
        } else {
            head_cap
        };
        let copied = load_into::<HEAD_MAX>(
            ctx,
            segment.payload_offset,
            (&raw mut (*ev).head).cast::<u8>(),
            cap,
            segment.payload_len,
        );
        (*ev).head_len = copied as u16;
        let mut len = HEAD_OFFSET + copied;
        if len > core::mem::size_of::<RequestEvent>() {
            len = core::mem::size_of::<RequestEvent>();
        }
        len
    };
    // SAFETY: the first `len` bytes of the scratch event (at most its size) are initialized.
    let record = unsafe { core::slice::from_raw_parts(ev.cast::<u8>().cast_const(), len) };
    if REQUESTS.output::<[u8]>(record, 0).is_err() {
        count_loss(Loss::RequestEventsDropped);
    }
}

/// Offset of `RequestEvent::head`: the fixed part of a request record.
const HEAD_OFFSET: usize = core::mem::offset_of!(RequestEvent, head);

/// Counts server-sent events in a new reply segment of an HTTP/1.x connection.
///
/// The first reply segment after a request holds the response head: the exchange is SSE when
/// it names `event-stream`. In SSE replies every `data:` at a line start (or segment start)
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
        if head {
            let sse = names_event_stream(base, n);
            stats.exchange_flags = if sse { EXCHANGE_SSE } else { 0 };
            if !sse {
                return;
            }
        }
        (*scratch).found = 0;
        count_data_lines(base, n, &raw mut (*scratch).found);
        let events = core::ptr::read_volatile(&raw const (*scratch).found);
        if events > 0 {
            atomic_add(&raw mut stats.events_out, events);
        }
    }
}

// The scans below keep no state from one position to the next except the position itself:
// the verifier walks a bounded loop once per iteration, and state carried across iterations
// (a partial-match length, say) multiplies the paths it must explore past its limit.

/// Whether `pattern` starts at `base + i`.
///
/// SAFETY: `i + pattern.len() <= SSE_SCAN_MAX` and `base` points at SSE_SCAN_MAX bytes.
#[inline(always)]
unsafe fn matches_at(base: *const u8, i: usize, pattern: &[u8]) -> bool {
    let mut k = 0;
    while k < pattern.len() {
        // SAFETY: per the contract.
        if unsafe { *base.add(i + k) } != pattern[k] {
            return false;
        }
        k += 1;
    }
    true
}

/// Whether the first `n` bytes at `base` contain `event-stream`.
///
/// Looks for the pattern's `-` eight bytes at a time (a word-wide zero-byte test) and compares
/// the whole pattern only around the few `-` a response head holds: about a tenth of the work
/// of trying every offset.
#[inline(never)]
fn names_event_stream(base: *const u8, n: usize) -> bool {
    const PATTERN: &[u8; 12] = b"event-stream";
    /// Offset of `-` in the pattern.
    const DASH_AT: usize = 5;
    const WORDS: usize = SSE_SCAN_MAX / 8;
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let mut w = 0;
    while w < WORDS && w * 8 < n {
        // SAFETY: w * 8 + 8 <= SSE_SCAN_MAX; the scratch buffer is 8-byte aligned.
        let word = unsafe { core::ptr::read_volatile(base.add(w * 8).cast::<u64>()) };
        let x = word ^ (ONES * u64::from(b'-'));
        // Non-zero iff some byte of x is zero, i.e. some byte of the word is `-`.
        if x.wrapping_sub(ONES) & !x & HIGHS != 0 {
            let mut k = 0;
            while k < 8 {
                let p = w * 8 + k;
                if p >= DASH_AT
                    && p - DASH_AT + PATTERN.len() <= n
                    && p - DASH_AT + PATTERN.len() <= SSE_SCAN_MAX
                    // SAFETY: bounded by the checks above.
                    && unsafe { matches_at(base, p - DASH_AT, PATTERN) }
                {
                    return true;
                }
                k += 1;
            }
        }
        w += 1;
    }
    false
}

/// Adds to `*found` the number of `data:` at a line start (or at offset 0) in the first `n`
/// bytes at `base`.
///
/// SAFETY: `found` points to writable map memory.
#[inline(never)]
unsafe fn count_data_lines(base: *const u8, n: usize, found: *mut u64) {
    const PATTERN: &[u8; 5] = b"data:";
    let mut i = 0;
    while i + PATTERN.len() <= SSE_SCAN_MAX && i + PATTERN.len() <= n {
        // SAFETY: i - 1 < i, and i + 5 is bounded by the loop condition.
        let line_start = i == 0 || unsafe { *base.add(i - 1) } == b'\n';
        if line_start && unsafe { matches_at(base, i, PATTERN) } {
            // SAFETY: per the contract.
            unsafe { core::ptr::write_volatile(found, core::ptr::read_volatile(found) + 1) };
        }
        i += 1;
    }
}

/// Whether the payload begins with an HTTP/1.x request method and a space (RFC 9110 methods).
fn starts_with_method(ctx: &SkBuffContext, segment: &Segment) -> Result<bool, Unparsed> {
    if segment.payload_len < 4 {
        return Ok(false);
    }
    let head: [u8; 4] = load(ctx, segment.payload_offset)?;
    Ok(matches!(
        &head,
        b"GET " | b"POST" | b"PUT " | b"HEAD" | b"DELE" | b"PATC" | b"OPTI" | b"CONN" | b"TRAC"
    ))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
