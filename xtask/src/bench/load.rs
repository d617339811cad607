//! A small HTTP/1.1 load generator for the agent-CPU measurement: many clients, each with its
//! own loopback source address (127.20.x.y), paced to a total request rate, bounded in time.
//!
//! wrk cannot bind source addresses, so this is what spreads the load over thousands of
//! distinct clients. Blocking sockets on a few threads suffice on loopback: each request is one
//! round trip of a small reply.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use socket2::{Domain, Socket, Type};

use super::procs::{check_interrupted, interrupted};

/// Source address of client `i`: 250 clients per /24 in 127.20.0.0/16 (and beyond).
pub fn client_addr(i: usize) -> Ipv4Addr {
    let net = i / 250;
    Ipv4Addr::new(
        127,
        20 + (net / 256) as u8,
        (net % 256) as u8,
        (1 + i % 250) as u8,
    )
}

#[derive(Clone)]
pub struct Spec {
    pub target: SocketAddrV4,
    pub path: String,
    pub clients: usize,
    /// Requests per second over all threads.
    pub rate: u64,
    pub duration: Duration,
    pub threads: usize,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    pub requests: u64,
    pub errors: u64,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on opening every keep-alive client's connection.
const CONNECT_ALL_TIMEOUT: Duration = Duration::from_secs(60);

fn connect_from(src: Ipv4Addr, target: SocketAddrV4) -> anyhow::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((src, 0)).into())?;
    socket.connect_timeout(&SocketAddr::V4(target).into(), IO_TIMEOUT)?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Reads one HTTP/1.1 response with a Content-Length body; true when it was a 200.
fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<bool> {
    buf.clear();
    let mut chunk = [0u8; 8192];
    let (head_end, body_len) = loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed mid-response");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..pos]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .context("response without content-length")?;
            break (pos + 4, len);
        }
        if buf.len() > 64 * 1024 {
            bail!("response head too large");
        }
    };
    while buf.len() < head_end + body_len {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed mid-body");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(buf.starts_with(b"HTTP/1.1 200"))
}

/// Paces request `k` of a thread running at `per_thread` requests per second.
fn pace(start: Instant, k: u64, per_thread: f64) {
    let due = start + Duration::from_secs_f64(k as f64 / per_thread);
    let now = Instant::now();
    if due > now {
        std::thread::sleep(due - now);
    }
}

/// Keep-alive clients: every client holds one open connection.
pub struct KeepAlive {
    pools: Vec<Vec<Option<TcpStream>>>,
}

impl KeepAlive {
    /// Opens one connection per client (not part of the timed run).
    pub fn connect(spec: &Spec) -> anyhow::Result<Self> {
        let threads = spec.threads.max(1);
        let mut pools: Vec<Vec<Option<TcpStream>>> = (0..threads).map(|_| Vec::new()).collect();
        let deadline = Instant::now() + CONNECT_ALL_TIMEOUT;
        for i in 0..spec.clients {
            if i % 500 == 0 {
                check_interrupted()?;
                if Instant::now() > deadline {
                    bail!(
                        "opening {} client connections took over {CONNECT_ALL_TIMEOUT:?} \
                         ({i} open)",
                        spec.clients
                    );
                }
            }
            let stream = connect_from(client_addr(i), spec.target)
                .with_context(|| format!("client {i} ({}) connecting", client_addr(i)))?;
            pools[i % threads].push(Some(stream));
        }
        Ok(Self { pools })
    }

    /// The clients take turns, one request each, at the paced rate, for the spec's duration.
    pub fn run(&mut self, spec: &Spec) -> Outcome {
        let threads = self.pools.len().max(1);
        let per_thread = spec.rate as f64 / threads as f64;
        let results: Vec<Outcome> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .pools
                .iter_mut()
                .enumerate()
                .map(|(t, pool)| {
                    // Pool slot j holds client t + j * threads (`connect`).
                    let requests: Vec<Vec<u8>> = (0..pool.len())
                        .map(|j| sdk_request(&spec.path, t + j * threads, false))
                        .collect();
                    s.spawn(move || {
                        let mut out = Outcome::default();
                        let mut buf = Vec::with_capacity(16 * 1024);
                        let start = Instant::now();
                        let mut k: u64 = 0;
                        while start.elapsed() < spec.duration && !interrupted() && !pool.is_empty()
                        {
                            pace(start, k, per_thread);
                            let len = pool.len();
                            let j = (k as usize) % len;
                            let slot = &mut pool[j];
                            k += 1;
                            let Some(stream) = slot else {
                                continue;
                            };
                            let ok = stream.write_all(&requests[j]).is_ok()
                                && read_response(stream, &mut buf).unwrap_or(false);
                            if ok {
                                out.requests += 1;
                            } else {
                                out.errors += 1;
                                *slot = None;
                            }
                        }
                        out.elapsed = start.elapsed();
                        out
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        });
        merge(&results)
    }
}

/// One new connection per request (`Connection: close`), cycling through the clients' source
/// addresses; the server closes first, so TIME_WAIT stays on the server side.
pub fn new_connections(spec: &Spec) -> Outcome {
    let requests: Vec<Vec<u8>> = (0..spec.clients.max(1))
        .map(|i| sdk_request(&spec.path, i, true))
        .collect();
    let requests = &requests;
    let threads = spec.threads.max(1);
    let per_thread = spec.rate as f64 / threads as f64;
    let results: Vec<Outcome> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut out = Outcome::default();
                    let mut buf = Vec::with_capacity(16 * 1024);
                    let start = Instant::now();
                    let mut k: u64 = 0;
                    while start.elapsed() < spec.duration && !interrupted() {
                        pace(start, k, per_thread);
                        let client = (t + threads * k as usize) % spec.clients.max(1);
                        k += 1;
                        let ok = connect_from(client_addr(client), spec.target)
                            .and_then(|mut stream| {
                                stream.write_all(&requests[client])?;
                                read_response(&mut stream, &mut buf)
                            })
                            .unwrap_or(false);
                        if ok {
                            out.requests += 1;
                        } else {
                            out.errors += 1;
                        }
                    }
                    out.elapsed = start.elapsed();
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    merge(&results)
}

/// Client `i`'s request: the head the OpenAI Python SDK sends (its field lines in its order,
/// but as a GET without Content-Length, since nginx serves the reply as a file), with an API
/// key of the client's own, so that the agent parses, hashes and counts what an inference
/// API's clients send.
pub fn sdk_request(path: &str, i: usize, close: bool) -> Vec<u8> {
    let connection = if close { "close" } else { "keep-alive" };
    // 48 key characters that differ from client to client (not secret: bench clients).
    let key: String = (0..48u64)
        .map(|n| {
            let x = (i as u64 + 1)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .rotate_left(n as u32 + 7);
            char::from(
                b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                    [(x % 62) as usize],
            )
        })
        .collect();
    format!(
        "GET {path} HTTP/1.1\r\nHost: bench\r\nAccept-Encoding: gzip, deflate\r\n\
         Connection: {connection}\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nUser-Agent: OpenAI/Python 1.51.0\r\n\
         X-Stainless-Lang: python\r\nX-Stainless-Package-Version: 1.51.0\r\n\
         X-Stainless-OS: Linux\r\nX-Stainless-Arch: x64\r\nX-Stainless-Runtime: CPython\r\n\
         X-Stainless-Runtime-Version: 3.11.7\r\n\
         Authorization: Bearer sk-proj-{key}\r\nX-Stainless-Async: false\r\n\
         X-Stainless-Retry-Count: 0\r\n\r\n"
    )
    .into_bytes()
}

fn merge(results: &[Outcome]) -> Outcome {
    Outcome {
        requests: results.iter().map(|r| r.requests).sum(),
        errors: results.iter().map(|r| r.errors).sum(),
        elapsed: results
            .iter()
            .map(|r| r.elapsed)
            .max()
            .unwrap_or(Duration::ZERO),
    }
}

/// One request from `src`, on a connection kept open (returned) or closed by the server.
pub fn one_request(
    src: Ipv4Addr,
    target: SocketAddrV4,
    path: &str,
    close: bool,
) -> anyhow::Result<TcpStream> {
    let mut stream = connect_from(src, target)?;
    let connection = if close { "close" } else { "keep-alive" };
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: {connection}\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    if !read_response(&mut stream, &mut buf)? {
        bail!("request from {src} did not get a 200");
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdk_heads_have_fifteen_fields_and_a_key_per_client() {
        let a = String::from_utf8(sdk_request("/reply.json", 0, false)).expect("ascii");
        let b = String::from_utf8(sdk_request("/reply.json", 1, true)).expect("ascii");
        let (head, rest) = a.split_once("\r\n\r\n").expect("blank line");
        assert!(rest.is_empty());
        assert_eq!(head.lines().count(), 16, "{head}");
        assert_eq!(a.len(), 499);
        let key = |h: &str| {
            h.lines()
                .find_map(|l| l.strip_prefix("Authorization: Bearer ").map(str::to_owned))
                .expect("key")
        };
        assert_ne!(key(&a), key(&b));
        assert!(b.contains("Connection: close\r\n"));
    }
}
