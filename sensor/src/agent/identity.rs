//! Identity of the client behind each HTTP/1.x request: the keyed hash of its API credential
//! (named, if configured) and the address a trusted proxy forwarded. Raw credentials and heads
//! are never stored, logged or shown: the head is parsed in place and dropped.

use std::{
    collections::{BTreeMap, HashMap},
    io::Read as _,
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use sensor_common::{EVENT_HEAD, HEAD_BYTES_MAX, HEAD_DONE, HEAD_REWIND, HEAD_UNSEEN};
use sensor_http::{
    Cidr, Credential, CredentialPolicy, ForwardedHeader, HeadScan, IdentityKey, forwarded_client,
    parse_head_with,
};
use serde::Serialize;

use crate::{
    config::Config,
    model::{aggregate::ExchangeKeys, conntable::Progress},
};

const SECRET_FILE: &str = "identity.key";
const SECRET_BYTES: usize = 32;

/// The identity of requests whose credential carriers disagree (see docs/identity.md): one
/// bucket for all of them, so a client that adds a random credential in a carrier the backend
/// ignores cannot spread its requests over identities of its choosing.
pub const AMBIGUOUS: &str = "ambiguous-credential";

/// Counts of request heads the agent parsed, for `/v1/health`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct HeadStats {
    pub parsed: u64,
    /// Not an HTTP/1.x request line: rejected and counted, never fatal.
    pub malformed: u64,
    /// The copy ended inside the head (`head_bytes`), or more field lines than are examined:
    /// fields after the cut were not seen, and forwarding is not believed.
    pub truncated: u64,
    pub with_credential: u64,
    /// Credential carriers that disagree: counted under the `ambiguous-credential` identity.
    pub ambiguous: u64,
    pub forwarded: u64,
    /// Requests counted from turn-taking whose first bytes passed unseen: no head at all.
    pub unseen: u64,
    /// Field lines that were not well-formed, skipped (the rest of the head still counts).
    pub skipped_fields: u64,
    /// Requests whose head waits to be complete (a gauge): each holds its head's bytes until
    /// TCP has accepted them or the connection closes.
    pub pending: u64,
}

/// A request the agent has a complete view of: apply it to the connection table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub cookie: u64,
    pub peer: IpAddr,
    pub start: Progress,
    pub keys: ExchangeKeys,
    pub ts_ns: u64,
}

/// A request whose head is still arriving, or may still be replaced: the kernel sends the
/// head in chunks, and sends bytes again when TCP dropped the copy it sent first.
struct Pending {
    peer: IpAddr,
    start: Progress,
    ts_ns: u64,
    /// Client payload offset of `buf[0]`.
    head_from: u64,
    buf: Vec<u8>,
    /// The kernel sends no more of this head (unless it rewinds).
    done: bool,
    /// Counted from turn-taking: no head was seen.
    unseen: bool,
}

pub struct Identities {
    key: IdentityKey,
    trusted: Vec<Cidr>,
    trusted_hops: usize,
    forwarded_header: ForwardedHeader,
    policy: CredentialPolicy,
    names: BTreeMap<String, String>,
    pending: HashMap<u64, Pending, foldhash::fast::RandomState>,
    /// Head buffers of finished requests, reused by the next ones: one allocation and free
    /// less per request (thousands a second under load).
    spare: Vec<Vec<u8>>,
    /// Capacity of the buffers in `spare`, in bytes.
    spare_bytes: usize,
    pub stats: HeadStats,
}

/// Bytes of spare head buffers kept, and the largest buffer kept (a typical head; bigger
/// ones are freed). Bounded by bytes, not by count: every connection's head waits for the
/// live read that settles it, so with thousands of kept-alive clients thousands of buffers
/// are freed at one read and wanted again within the second (a bound of 64 buffers left
/// most requests allocating one). The spares are what those heads held a moment before;
/// 1 MiB keeps ten thousand short heads' buffers and little of the agent's memory budget.
const SPARE_BYTES: usize = 1 << 20;
const SPARE_MAX_BYTES: usize = 4096;

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
        let mut ids = Self {
            key: IdentityKey::new(secret),
            trusted: Vec::new(),
            trusted_hops: 1,
            forwarded_header: ForwardedHeader::default(),
            policy: CredentialPolicy::default(),
            names: BTreeMap::new(),
            pending: HashMap::default(),
            spare: Vec::new(),
            spare_bytes: 0,
            stats: HeadStats::default(),
        };
        ids.reconfigure(config);
        ids
    }

    /// Applies reloaded identity settings (the secret stays).
    pub fn reconfigure(&mut self, config: &Config) {
        let id = &config.identity;
        self.trusted = id.trusted();
        self.trusted_hops = id.trusted_hops;
        self.forwarded_header = id.forwarded_header();
        self.policy = id.credential_policy();
        self.names = id.names.clone();
    }

    /// The identity shown for a credential: its configured name, else its keyed hash.
    pub fn identity_of(&self, credential: &[u8]) -> String {
        let id = self.key.id(credential);
        self.names.get(&id).cloned().unwrap_or(id)
    }

    /// Takes one request record from the kernel; pushes to `ready` the requests now complete,
    /// in order (a new request completes the connection's previous one).
    pub fn on_event(
        &mut self,
        ev: &crate::kernel::RequestRecord<'_>,
        peer: IpAddr,
        ready: &mut Vec<Ready>,
    ) {
        let bytes = ev.head_bytes();
        if ev.kind == EVENT_HEAD {
            let Some(p) = self.pending.get_mut(&ev.cookie) else {
                return;
            };
            let at = ev.head_offset.saturating_sub(p.head_from) as usize;
            if ev.head_offset < p.head_from || at > p.buf.len() {
                // A gap (lost records): the head stops where it was complete.
                p.done = true;
                return;
            }
            if ev.flags & HEAD_REWIND != 0 || at < p.buf.len() {
                // Bytes the kernel sent from a copy TCP did not keep: replaced from here on.
                p.buf.truncate(at);
            }
            let room = (HEAD_BYTES_MAX as usize).saturating_sub(p.buf.len());
            p.buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
            p.done |= ev.flags & HEAD_DONE != 0;
            return;
        }
        let start = Progress {
            bytes_in: ev.bytes_in_start,
            bytes_out: ev.bytes_out_start,
            events_out: ev.events_out_start,
        };
        if ev.flags & HEAD_REWIND != 0
            && self
                .pending
                .get(&ev.cookie)
                .is_some_and(|p| p.start.bytes_in >= start.bytes_in)
        {
            // The kernel read the pending request (the same one, or one it found after this
            // one's start) from a copy TCP did not keep: this one replaces it.
            self.pending.remove(&ev.cookie);
            self.stats.pending = self.pending.len() as u64;
        } else {
            ready.extend(self.finish(ev.cookie));
        }
        let next = Pending {
            peer,
            start,
            ts_ns: ev.ts_ns,
            head_from: ev.head_offset,
            buf: {
                let mut buf = match self.spare.pop() {
                    Some(b) => {
                        self.spare_bytes -= b.capacity();
                        b
                    }
                    None => Vec::new(),
                };
                buf.extend_from_slice(bytes);
                buf
            },
            done: ev.flags & HEAD_DONE != 0,
            unseen: ev.flags & HEAD_UNSEEN != 0,
        };
        let complete = next.buf.is_empty() && next.done;
        self.pending.insert(ev.cookie, next);
        self.stats.pending = self.pending.len() as u64;
        if complete {
            // A turn without head bytes (not HTTP, identity off, or unseen): nothing to wait
            // for.
            ready.extend(self.finish(ev.cookie));
        }
    }

    /// The connection's counters as last read: a head whose bytes TCP has all accepted can no
    /// longer be replaced, so its request is complete.
    pub fn settle(&mut self, cookie: u64, bytes_in: u64) -> Option<Ready> {
        let p = self.pending.get(&cookie)?;
        if p.done && bytes_in >= p.head_from + p.buf.len() as u64 {
            return self.finish(cookie);
        }
        None
    }

    /// The connection closed: its last request is complete with what arrived.
    pub fn close(&mut self, cookie: u64) -> Option<Ready> {
        self.finish(cookie)
    }

    fn finish(&mut self, cookie: u64) -> Option<Ready> {
        let mut p = self.pending.remove(&cookie)?;
        self.stats.pending = self.pending.len() as u64;
        let keys = if p.unseen {
            self.stats.unseen += 1;
            ExchangeKeys::default()
        } else {
            self.keys(p.peer, &p.buf)
        };
        let cap = p.buf.capacity();
        if cap > 0 && cap <= SPARE_MAX_BYTES && self.spare_bytes + cap <= SPARE_BYTES {
            // The head may carry a credential: nothing of it stays in a kept buffer (zeroize's
            // writes are not optimised away, and `Vec::zeroize` clears the length too).
            zeroize::Zeroize::zeroize(&mut p.buf);
            self.spare.push(std::mem::take(&mut p.buf));
            self.spare_bytes += cap;
        }
        Some(Ready {
            cookie,
            peer: p.peer,
            start: p.start,
            keys,
            ts_ns: p.ts_ns,
        })
    }

    /// Keys of a request from `peer` whose head bytes are `head` (empty for non-HTTP turns).
    pub fn keys(&mut self, peer: IpAddr, head: &[u8]) -> ExchangeKeys {
        if head.is_empty() {
            return ExchangeKeys::default();
        }
        // One pass over the field lines gives the head, its credential and its forwarded list.
        let mut scan = HeadScan::new(&self.policy, self.forwarded_header);
        let parsed = match parse_head_with(head, |n, v| scan.field(n, v)) {
            Ok(h) => h,
            Err(e) => {
                self.stats.malformed += 1;
                log::debug!("malformed request head from {peer}: {e}");
                return ExchangeKeys::default();
            }
        };
        self.stats.parsed += 1;
        self.stats.skipped_fields += u64::from(parsed.skipped_fields);
        if parsed.truncated || parsed.fields_cut {
            self.stats.truncated += 1;
        }
        let (credential, list) = scan.finish(&parsed);
        let identity = match credential {
            Credential::None => None,
            Credential::One(c) => {
                self.stats.with_credential += 1;
                Some(self.identity_of(&c))
            }
            Credential::Ambiguous => {
                self.stats.ambiguous += 1;
                Some(AMBIGUOUS.to_owned())
            }
        };
        let forwarded = forwarded_client(
            peer,
            list.as_deref(),
            self.forwarded_header,
            &self.trusted,
            self.trusted_hops,
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

    /// A request event at the start of a connection whose whole head is `head`.
    fn event(cookie: u64, head: &[u8]) -> crate::kernel::RequestRecord<'_> {
        crate::kernel::RequestRecord {
            cookie,
            ts_ns: 1,
            remote_addr: [0; 16],
            bytes_in_start: 0,
            bytes_out_start: 0,
            events_out_start: 0,
            head_offset: 0,
            kind: sensor_common::EVENT_REQUEST,
            flags: HEAD_DONE,
            head,
        }
    }

    /// Spare buffers are bounded by their bytes, however many heads were pending at once, and
    /// an empty head keeps none.
    #[test]
    fn spare_buffers_are_bounded_by_bytes() {
        let c = config("");
        let mut ids = Identities::new(b"0123456789abcdef", &c);
        let peer: IpAddr = "127.0.0.1".parse().expect("ip");
        let mut head = b"GET / HTTP/1.1\r\nx-filler: ".to_vec();
        head.resize(1000, b'a');
        head.extend_from_slice(b"\r\n\r\n");
        let pending = SPARE_BYTES / head.len() + 100;
        let mut ready = Vec::new();
        for cookie in 0..pending as u64 {
            ids.on_event(&event(cookie, &head), peer, &mut ready);
        }
        for cookie in 0..pending as u64 {
            assert!(ids.close(cookie).is_some());
        }
        assert!(ids.spare_bytes <= SPARE_BYTES, "{}", ids.spare_bytes);
        assert!(ids.spare.len() < pending);
        assert_eq!(
            ids.spare_bytes,
            ids.spare.iter().map(Vec::capacity).sum::<usize>()
        );
        // Taken again by the next heads, and the count follows.
        let kept = ids.spare.len();
        for cookie in 0..10 {
            ids.on_event(&event(cookie, &head), peer, &mut ready);
        }
        assert_eq!(ids.spare.len(), kept - 10);
        assert_eq!(
            ids.spare_bytes,
            ids.spare.iter().map(Vec::capacity).sum::<usize>()
        );
        // A turn without head bytes finishes at once and keeps no buffer.
        let mut fresh = Identities::new(b"0123456789abcdef", &c);
        fresh.on_event(&event(1, b""), peer, &mut ready);
        assert!(fresh.spare.is_empty());
    }

    /// Head buffers are reused from request to request: a shorter head after a longer one
    /// carries nothing of it.
    #[test]
    fn reused_head_buffers_start_empty() {
        let c = config("");
        let mut ids = Identities::new(b"0123456789abcdef", &c);
        let peer: IpAddr = "127.0.0.1".parse().expect("ip");
        let long = b"GET / HTTP/1.1\r\nx-api-key: first-key-that-is-long\r\n\r\n";
        let mut ready = Vec::new();
        ids.on_event(&event(1, long), peer, &mut ready);
        let first = ids.close(1).expect("ready").keys;
        assert!(first.identity.is_some());
        assert_eq!(ids.spare.len(), 1);
        ids.on_event(&event(2, b"GET / HTTP/1.1\r\n\r\n"), peer, &mut ready);
        assert_eq!(ids.close(2).expect("ready").keys, ExchangeKeys::default());
        ids.on_event(&event(3, long), peer, &mut ready);
        assert_eq!(ids.close(3).expect("ready").keys, first);
        assert_eq!(ids.stats.malformed, 0);
        // The kept buffers hold nothing of the heads they carried, credentials included.
        for buf in &ids.spare {
            assert!(buf.is_empty());
            // SAFETY: the buffer's own allocation; `Vec::zeroize` wrote zeros over all its
            // `capacity` bytes, so every one is initialised.
            let kept = unsafe { std::slice::from_raw_parts(buf.as_ptr(), buf.capacity()) };
            assert!(!kept.windows(5).any(|w| w == b"first"), "{kept:?}");
        }
    }

    /// A request event the kernel read again from the copy TCP kept (`HEAD_REWIND`) replaces
    /// the pending request that started at or after it (read from a dropped copy, e.g. the
    /// last of forged pipelined requests): that one is never counted under its identity.
    #[test]
    fn a_rewound_request_replaces_requests_read_from_a_dropped_copy() {
        let c = config("");
        let mut ids = Identities::new(b"0123456789abcdef", &c);
        let peer: IpAddr = "127.0.0.1".parse().expect("ip");
        let event = |start: u64, flags: u8, head: &'static [u8]| crate::kernel::RequestRecord {
            bytes_in_start: start,
            head_offset: start,
            flags,
            ..event(7, head)
        };
        let mut ready = Vec::new();
        ids.on_event(
            &event(0, HEAD_DONE, b"GET / HTTP/1.1\r\n\r\n"),
            peer,
            &mut ready,
        );
        // Forged: a pipelined request with another key, after the first.
        ids.on_event(
            &event(
                18,
                HEAD_DONE,
                b"GET / HTTP/1.1\r\nx-api-key: forged\r\n\r\n",
            ),
            peer,
            &mut ready,
        );
        assert_eq!(ready.len(), 1, "the first request is complete");
        // The real bytes at 18, read again: the forged request is dropped, not finished.
        ids.on_event(
            &event(18, HEAD_DONE | HEAD_REWIND, b"PUT /x HTTP/1.1\r\n\r\n"),
            peer,
            &mut ready,
        );
        assert_eq!(ready.len(), 1);
        let last = ids.close(7).expect("the real request");
        assert_eq!(last.start.bytes_in, 18);
        assert_eq!(last.keys, ExchangeKeys::default());
        assert_eq!(
            ids.stats.with_credential, 0,
            "the forged key was never read"
        );
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
