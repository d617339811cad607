//! Opt-in Prometheus `/metrics` listener (`[metrics] listen`), with bearer-token
//! authentication and bounded cardinality.
//!
//! Host totals cover everything observed, folded clients included. Per-client series exist only
//! for the `top_clients` heaviest addresses by bytes out, so the number of series is bounded
//! whatever the number of clients: a per-address label on every client is what makes eBPF
//! network exporters unusable at scale. Per-client series therefore come and go as the top N
//! changes; a client that drops out and comes back continues its counters, a client that was
//! folded away (see `aggregate`) and comes back starts again from zero (a counter reset).
//!
//! The HTTP side is a deliberately small HTTP/1.1 subset (one request per connection, no
//! bodies), like the local API: bounded request head, read and write timeouts, a bounded number
//! of connections at once, and every malformed request answered with an error status.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, UNIX_EPOCH},
};

use log::{debug, info, warn};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

use crate::{
    agent::api::{AgentState, SharedState},
    model::aggregate::{ClientStats, ClientTable},
};

/// The exposition format served.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Request heads larger than this are refused (431).
const MAX_REQUEST_HEAD: usize = 8192;
/// The whole request head must arrive within this (slow clients get 408).
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// After replying, how long unread client bytes are drained so the reply is not lost to a reset.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(500);
const MAX_DRAIN: usize = 64 * 1024;
/// Connections served at once; further ones wait in the listen backlog.
const MAX_CONCURRENT: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot read the metrics bearer token file {}", path.display())]
    TokenUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the metrics bearer token file {} is empty", path.display())]
    TokenEmpty { path: PathBuf },
    #[error("cannot listen for metrics on {addr}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// Reads the bearer token: the file's content without surrounding whitespace.
pub fn read_token(path: &Path) -> Result<Vec<u8>, MetricsError> {
    let text = std::fs::read_to_string(path).map_err(|source| MetricsError::TokenUnreadable {
        path: path.to_owned(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(MetricsError::TokenEmpty {
            path: path.to_owned(),
        });
    }
    let mode = std::fs::metadata(path).map_or(0, |m| m.permissions().mode());
    if mode & 0o077 != 0 {
        warn!(
            "the metrics bearer token file {} is accessible to other users (mode {:o}); \
             consider chmod 600",
            path.display(),
            mode & 0o777
        );
    }
    Ok(token.as_bytes().to_vec())
}

/// A bound metrics listener, ready to serve.
pub struct Server {
    listener: TcpListener,
    token: Vec<u8>,
    top_n: usize,
    auth_failures: Arc<AtomicU64>,
}

impl Server {
    /// Reads the token and binds `listen`; both fail with an error naming the file or address.
    pub async fn bind(config: &crate::config::Metrics) -> Result<Self, MetricsError> {
        let token = read_token(&config.bearer_token_file)?;
        let listener =
            TcpListener::bind(&config.listen)
                .await
                .map_err(|source| MetricsError::Bind {
                    addr: config.listen.clone(),
                    source,
                })?;
        Ok(Self {
            listener,
            token,
            top_n: config.top_clients,
            auth_failures: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    pub async fn serve(self, state: SharedState) {
        if let Some(addr) = self.local_addr() {
            info!("Prometheus metrics on http://{addr}/metrics");
        }
        let ctx = Arc::new(Context {
            token: self.token,
            top_n: self.top_n,
            auth_failures: self.auth_failures,
            state,
        });
        let slots = Arc::new(Semaphore::new(MAX_CONCURRENT));
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return; // the semaphore is never closed
            };
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, &ctx).await {
                            debug!("metrics request from {peer} failed: {e}");
                        }
                        drop(permit);
                    });
                }
                Err(e) => {
                    warn!("metrics accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

struct Context {
    token: Vec<u8>,
    top_n: usize,
    auth_failures: Arc<AtomicU64>,
    state: SharedState,
}

enum Head {
    Complete(Vec<u8>),
    TooLarge,
    /// The peer closed before sending a complete head; holds what it sent.
    Truncated(Vec<u8>),
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Head::Truncated(buf));
        }
        let scan_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&buf[scan_from..]) {
            buf.truncate(scan_from + end);
            return Ok(Head::Complete(buf));
        }
        if buf.len() > MAX_REQUEST_HEAD {
            return Ok(Head::TooLarge);
        }
    }
}

/// Length of the head (through its blank line) if `buf` contains one; bare-LF lines are accepted.
fn head_end(buf: &[u8]) -> Option<usize> {
    (0..buf.len()).find_map(|i| {
        if buf[i..].starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if buf[i..].starts_with(b"\n\n") {
            Some(i + 2)
        } else {
            None
        }
    })
}

async fn handle(mut stream: TcpStream, ctx: &Context) -> std::io::Result<()> {
    let reply = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Err(_) => Reply::error(408, "request head not received in time\n"),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(Head::TooLarge)) => Reply::error(431, "request head too large\n"),
        Ok(Ok(Head::Truncated(partial))) if partial.is_empty() => return Ok(()),
        Ok(Ok(Head::Truncated(_))) => Reply::error(400, "incomplete request\n"),
        Ok(Ok(Head::Complete(head))) => answer(&head, &ctx.token, &ctx.auth_failures, || {
            let state = ctx.state.lock().ok()?;
            let mut body = render(&state, ctx.top_n);
            drop(state);
            render_listener(&mut body, ctx.auth_failures.load(Ordering::Relaxed));
            Some(body)
        }),
    };
    let bytes = reply.to_bytes();
    tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&bytes))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out"))??;
    stream.shutdown().await?;
    // Read what the client may still send (a body, the rest of an oversized head), so closing
    // with unread data does not reset the connection before the client read the reply.
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < MAX_DRAIN {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
    Ok(())
}

/// An HTTP reply; `head_only` for HEAD requests.
#[derive(Debug, PartialEq, Eq)]
struct Reply {
    status: u16,
    content_type: &'static str,
    extra_headers: Vec<(&'static str, &'static str)>,
    body: String,
    head_only: bool,
}

impl Reply {
    fn error(status: u16, body: &str) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            extra_headers: Vec::new(),
            body: body.to_owned(),
            head_only: false,
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            431 => "Request Header Fields Too Large",
            _ => "Internal Server Error",
        };
        let mut head = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\nConnection: close\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.extra_headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

/// A request head, as much of it as the listener needs.
#[derive(Debug, PartialEq, Eq)]
struct Request<'a> {
    method: &'a str,
    target: &'a str,
    authorization: Option<&'a str>,
}

/// Parses a request head; `None` when it is not a well-formed HTTP/1.x head.
fn parse_request(head: &[u8]) -> Option<Request<'_>> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let mut request_line = lines.next()?.split(' ');
    let (method, target, version) = (
        request_line.next()?,
        request_line.next()?,
        request_line.next()?,
    );
    let valid_method = !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase());
    if request_line.next().is_some()
        || !valid_method
        || !target.starts_with('/')
        || !matches!(version, "HTTP/1.0" | "HTTP/1.1")
    {
        return None;
    }
    let mut authorization = None;
    for line in lines.take_while(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':')?;
        if name.is_empty()
            || name
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return None;
        }
        if name.eq_ignore_ascii_case("authorization") {
            if authorization.is_some() {
                return None; // ambiguous: which one to check?
            }
            authorization = Some(value.trim());
        }
    }
    Some(Request {
        method,
        target,
        authorization,
    })
}

/// Compares in time that depends only on the length of `presented`, never on where it differs
/// from `expected` (nor on `expected`'s length beyond equality of lengths).
fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
    if expected.is_empty() {
        return false;
    }
    let mut diff = u8::from(presented.len() != expected.len());
    for (i, b) in presented.iter().enumerate() {
        diff |= b ^ expected[i % expected.len()];
    }
    std::hint::black_box(diff) == 0
}

fn authorized(header: Option<&str>, token: &[u8]) -> bool {
    let Some((scheme, credentials)) = header.and_then(|h| h.split_once(' ')) else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer") && constant_time_eq(credentials.trim().as_bytes(), token)
}

/// Answers one request head: 400 malformed, 401 unauthenticated (counted), 405, 404, or the
/// metrics `body()` renders (500 if it cannot).
fn answer(
    head: &[u8],
    token: &[u8],
    auth_failures: &AtomicU64,
    body: impl FnOnce() -> Option<String>,
) -> Reply {
    let Some(req) = parse_request(head) else {
        return Reply::error(400, "malformed request\n");
    };
    if !authorized(req.authorization, token) {
        auth_failures.fetch_add(1, Ordering::Relaxed);
        let mut reply = Reply::error(401, "a valid bearer token is required\n");
        reply
            .extra_headers
            .push(("WWW-Authenticate", "Bearer realm=\"sensor\""));
        return reply;
    }
    let head_only = match req.method {
        "GET" => false,
        "HEAD" => true,
        _ => {
            let mut reply = Reply::error(405, "only GET and HEAD\n");
            reply.extra_headers.push(("Allow", "GET, HEAD"));
            return reply;
        }
    };
    let path = req.target.split_once('?').map_or(req.target, |(p, _)| p);
    if path != "/metrics" {
        return Reply::error(404, "not found; metrics are at /metrics\n");
    }
    match body() {
        Some(body) => Reply {
            status: 200,
            content_type: CONTENT_TYPE,
            extra_headers: Vec::new(),
            body,
            head_only,
        },
        None => Reply::error(500, "agent state unavailable\n"),
    }
}

/// Escapes a label value (exposition format 0.0.4): backslash, double quote, line feed.
pub fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes HELP text: backslash and line feed.
fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

#[derive(Clone, Copy)]
pub(crate) enum Kind {
    Counter,
    Gauge,
}

/// Labels of a sample without labels.
pub(crate) const NO_LABELS: [(&str, &str); 0] = [];

/// Writes HELP and TYPE, then one sample per `(labels, value)`; nothing when there are none.
pub(crate) fn family<'a, L, V>(
    out: &mut String,
    name: &str,
    kind: Kind,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) where
    L: AsRef<[(&'a str, &'a str)]>,
    V: std::fmt::Display,
{
    let mut samples = samples.into_iter().peekable();
    if samples.peek().is_none() {
        return;
    }
    let kind = match kind {
        Kind::Counter => "counter",
        Kind::Gauge => "gauge",
    };
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        out.push_str(name);
        let labels = labels.as_ref();
        if !labels.is_empty() {
            out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{k}=\"{}\"", escape_label(v));
            }
            out.push('}');
        }
        let _ = writeln!(out, " {value}");
    }
}

/// The `n` heaviest clients by bytes out (ties: by client, ascending), heaviest first: the same
/// order as `sensor clients` (sort `bytes_out`).
fn top_clients(table: &ClientTable, n: usize) -> Vec<(&str, &ClientStats)> {
    let order = |a: &(&str, &ClientStats), b: &(&str, &ClientStats)| {
        b.1.totals
            .bytes_out
            .cmp(&a.1.totals.bytes_out)
            .then_with(|| a.0.cmp(b.0))
    };
    let mut all: Vec<(&str, &ClientStats)> = table
        .clients
        .iter()
        .map(|(k, c)| (k.as_str(), &**c))
        .collect();
    if n == 0 {
        return Vec::new();
    }
    if all.len() > n {
        all.select_nth_unstable_by(n - 1, order);
        all.truncate(n);
    }
    all.sort_by(order);
    all
}

/// Renders the agent's metrics in the Prometheus text exposition format 0.0.4.
///
/// Host totals (`sensor_bytes_total`, `sensor_requests_total`, `sensor_connections_*`) are the
/// grand totals, folded clients included; per-client series (`sensor_client_*`) exist only for
/// the `top_n` heaviest addresses by bytes out.
pub fn render(state: &AgentState, top_n: usize) -> String {
    use Kind::{Counter, Gauge};
    let mut out = String::with_capacity(4096 + top_n * 512);
    let (addresses, groups) = (&state.agg.addresses, &state.agg.groups);
    let total = addresses.grand_total();
    let live = state.table.live_count() as u64;

    family(
        &mut out,
        "sensor_up",
        Gauge,
        "1 while the agent is running and serving metrics.",
        [(NO_LABELS, 1)],
    );
    family(
        &mut out,
        "sensor_build_info",
        Gauge,
        "The agent's version, as a label; the value is always 1.",
        [([("version", env!("CARGO_PKG_VERSION"))], 1)],
    );
    let started = state
        .started
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    family(
        &mut out,
        "sensor_start_time_seconds",
        Gauge,
        "When this agent process started, in seconds since the Unix epoch.",
        [(NO_LABELS, format!("{started:.3}"))],
    );
    family(
        &mut out,
        "sensor_bytes_total",
        Counter,
        "TCP payload bytes on watched connections (in: client to this host, out: this host to \
         client), all clients including folded ones.",
        [
            ([("direction", "in")], total.bytes_in),
            ([("direction", "out")], total.bytes_out),
        ],
    );
    family(
        &mut out,
        "sensor_requests_total",
        Counter,
        "Requests (HTTP/1.x) or request turns (other protocols) on watched connections.",
        [(NO_LABELS, total.requests)],
    );
    family(
        &mut out,
        "sensor_connections_opened_total",
        Counter,
        "Watched connections opened.",
        [(NO_LABELS, total.connections)],
    );
    family(
        &mut out,
        "sensor_connections_open",
        Gauge,
        "Watched connections open now.",
        [(NO_LABELS, live)],
    );
    family(
        &mut out,
        "sensor_connections_closed_total",
        Counter,
        "Watched connections closed (opened minus open now).",
        [(NO_LABELS, total.connections.saturating_sub(live))],
    );
    family(
        &mut out,
        "sensor_loss_total",
        Counter,
        "Events the kernel programs lost or skipped, by kind (see docs/counters.md).",
        state.loss.iter().map(|(kind, n)| ([("kind", *kind)], *n)),
    );
    family(
        &mut out,
        "sensor_clients_max",
        Gauge,
        "Configured bound on clients kept exactly, per table (clients.max_clients).",
        [(NO_LABELS, state.max_clients as u64)],
    );
    family(
        &mut out,
        "sensor_clients_tracked",
        Gauge,
        "Clients kept exactly, by address or by address group.",
        [
            ([("by", "address")], addresses.clients.len() as u64),
            ([("by", "group")], groups.clients.len() as u64),
        ],
    );
    family(
        &mut out,
        "sensor_clients_folded_total",
        Counter,
        "Clients folded into the counted remainder to keep memory bounded (a client folded \
         twice counts twice).",
        [
            ([("by", "address")], addresses.folded.clients),
            ([("by", "group")], groups.folded.clients),
        ],
    );

    let top = top_clients(addresses, top_n);
    family(
        &mut out,
        "sensor_client_bytes_total",
        Counter,
        "TCP payload bytes of one client address; only the top clients by bytes out have \
         series, so series come and go as the top changes.",
        top.iter().flat_map(|(client, c)| {
            [
                (
                    [("client", *client), ("direction", "in")],
                    c.totals.bytes_in,
                ),
                (
                    [("client", *client), ("direction", "out")],
                    c.totals.bytes_out,
                ),
            ]
        }),
    );
    let per_client = |value: fn(&ClientStats) -> u64| {
        top.iter()
            .map(move |(client, c)| ([("client", *client)], value(c)))
    };
    family(
        &mut out,
        "sensor_client_requests_total",
        Counter,
        "Requests of one client address (top clients by bytes out only).",
        per_client(|c| c.totals.requests),
    );
    family(
        &mut out,
        "sensor_client_connections_opened_total",
        Counter,
        "Connections opened by one client address (top clients by bytes out only).",
        per_client(|c| c.totals.connections),
    );
    family(
        &mut out,
        "sensor_client_connections_open",
        Gauge,
        "Connections of one client address open now (top clients by bytes out only).",
        per_client(|c| c.open_connections),
    );
    family(
        &mut out,
        "sensor_client_events_total",
        Counter,
        "Server-sent events streamed to one client address (top clients by bytes out only).",
        per_client(|c| c.totals.events_out),
    );
    render_keyed(&mut out, "identity", &state.agg.identities, top_n);
    render_keyed(&mut out, "forwarded", &state.agg.forwarded, top_n);
    out
}

/// Per-identity (`sensor_identity_*`, label `identity`) or per-forwarded-client
/// (`sensor_forwarded_*`, label `client`) series for the top N by bytes out.
fn render_keyed(out: &mut String, kind: &str, table: &ClientTable, top_n: usize) {
    let top = top_clients(table, top_n);
    let label = if kind == "identity" {
        "identity"
    } else {
        "client"
    };
    let what = if kind == "identity" {
        "one API identity (keyed hash of the credential, or its configured name)"
    } else {
        "one client address behind a trusted proxy"
    };
    family(
        out,
        &format!("sensor_{kind}_bytes_total"),
        Kind::Counter,
        &format!("TCP payload bytes of the exchanges of {what}; top {top_n} by bytes out only."),
        top.iter().flat_map(|(key, c)| {
            [
                ([(label, *key), ("direction", "in")], c.totals.bytes_in),
                ([(label, *key), ("direction", "out")], c.totals.bytes_out),
            ]
        }),
    );
    let series = |value: fn(&ClientStats) -> u64| {
        top.iter().map(move |(key, c)| ([(label, *key)], value(c)))
    };
    family(
        out,
        &format!("sensor_{kind}_requests_total"),
        Kind::Counter,
        &format!("Requests of {what}; top {top_n} by bytes out only."),
        series(|c| c.totals.requests),
    );
    family(
        out,
        &format!("sensor_{kind}_events_total"),
        Kind::Counter,
        &format!("Server-sent events streamed to {what}; top {top_n} by bytes out only."),
        series(|c| c.totals.events_out),
    );
}

/// Appends the listener's own metrics.
fn render_listener(out: &mut String, auth_failures: u64) {
    family(
        out,
        "sensor_metrics_auth_failures_total",
        Kind::Counter,
        "Requests to the metrics listener rejected for a missing or wrong bearer token.",
        [(NO_LABELS, auth_failures)],
    );
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::{
        model::aggregate::{Aggregator, Counts, Delta, Now},
        model::conntable::ConnTable,
    };

    fn state(max_clients: usize) -> AgentState {
        AgentState {
            shipped_through: 0,
            table: ConnTable::new(Duration::from_secs(60), 10),
            agg: Aggregator::new(max_clients, 24, 56),
            max_clients,
            loss: vec![("ringbuf_full", 0), ("conn_map_full", 3)],
            started: UNIX_EPOCH + Duration::from_millis(1_700_000_000_250),
            cgroup: "/sys/fs/cgroup".into(),
            ports: vec![8080],
            continued_from_pinned_state: false,
            live_read: "iterator",
            live_read_reason: String::new(),
            heads: Default::default(),
            detector: crate::detect::Detector::without_rules(),
        }
    }

    fn traffic(bytes_out: u64) -> Delta {
        Delta {
            counts: Counts {
                requests: 2,
                bytes_in: 10,
                bytes_out,
                connections: 0,
                events_out: 0,
            },
            opened: true,
            closed: false,
        }
    }

    /// A sample: name, labels, value.
    type Sample = (String, BTreeMap<String, String>, String);

    /// A strict reader of the subset of the format `render` writes: checks that every family
    /// has HELP then TYPE before its samples, that samples of a family are contiguous, and
    /// unescapes label values.
    fn parse(text: &str) -> (Vec<Sample>, BTreeMap<String, String>) {
        assert!(text.ends_with('\n'), "ends with a line feed");
        let mut samples = Vec::new();
        let mut types = BTreeMap::new();
        let mut helped = BTreeSet::new();
        let mut current: Option<String> = None;
        let mut finished = BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, _) = rest.split_once(' ').expect("help text");
                assert!(helped.insert(name.to_owned()), "one HELP for {name}");
                if let Some(prev) = current.replace(name.to_owned()) {
                    finished.insert(prev);
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("type");
                assert_eq!(current.as_deref(), Some(name), "TYPE follows HELP");
                assert!(types.insert(name.to_owned(), kind.to_owned()).is_none());
                continue;
            }
            assert!(!line.starts_with('#') && !line.is_empty(), "line: {line:?}");
            let name_end = line.find(['{', ' ']).expect("name");
            let name = &line[..name_end];
            assert_eq!(current.as_deref(), Some(name), "sample in its family");
            assert!(!finished.contains(name));
            let mut labels = BTreeMap::new();
            let mut rest = &line[name_end..];
            if let Some(r) = rest.strip_prefix('{') {
                let mut chars = r.char_indices();
                let mut key = String::new();
                let end;
                loop {
                    let (i, c) = chars.next().expect("unterminated labels");
                    match c {
                        '}' => {
                            end = i + 1;
                            break;
                        }
                        ',' => {}
                        '=' => {
                            assert_eq!(chars.next().map(|x| x.1), Some('"'));
                            let mut value = String::new();
                            loop {
                                match chars.next().expect("unterminated value").1 {
                                    '"' => break,
                                    '\\' => match chars.next().expect("escape").1 {
                                        'n' => value.push('\n'),
                                        c @ ('\\' | '"') => value.push(c),
                                        c => panic!("bad escape \\{c}"),
                                    },
                                    '\n' => panic!("raw line feed in a value"),
                                    c => value.push(c),
                                }
                            }
                            labels.insert(std::mem::take(&mut key), value);
                        }
                        c => key.push(c),
                    }
                }
                rest = &r[end..];
            }
            let value = rest.strip_prefix(' ').expect("value").to_owned();
            assert!(value.parse::<f64>().is_ok(), "numeric value: {line}");
            samples.push((name.to_owned(), labels, value));
        }
        assert_eq!(helped.len(), types.len());
        for (name, kind) in &types {
            assert!(
                name.ends_with("_total") == (kind == "counter"),
                "{name} is a {kind}"
            );
        }
        (samples, types)
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> u64 {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let found: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.0 == name && s.1 == want)
            .collect();
        assert_eq!(found.len(), 1, "{name}{labels:?}");
        found[0].2.parse().expect("integer value")
    }

    fn client_labels(samples: &[Sample]) -> BTreeSet<String> {
        samples
            .iter()
            .filter_map(|s| s.1.get("client").cloned())
            .collect()
    }

    #[test]
    fn format_has_help_type_and_host_totals() {
        let mut s = state(100);
        let now = Now::system();
        s.agg
            .apply("10.0.0.1".parse().expect("ip"), &traffic(500), now);
        s.agg
            .apply("2001:db8::1".parse().expect("ip"), &traffic(70), now);
        let mut text = render(&s, 20);
        render_listener(&mut text, 4);
        let (samples, types) = parse(&text);
        assert_eq!(types["sensor_bytes_total"], "counter");
        assert_eq!(types["sensor_connections_open"], "gauge");
        assert_eq!(value(&samples, "sensor_up", &[]), 1);
        assert!(text.contains("\nsensor_start_time_seconds 1700000000.250\n"));
        assert_eq!(
            value(&samples, "sensor_bytes_total", &[("direction", "out")]),
            570
        );
        assert_eq!(
            value(&samples, "sensor_bytes_total", &[("direction", "in")]),
            20
        );
        assert_eq!(value(&samples, "sensor_requests_total", &[]), 4);
        assert_eq!(value(&samples, "sensor_connections_opened_total", &[]), 2);
        assert_eq!(
            value(&samples, "sensor_loss_total", &[("kind", "conn_map_full")]),
            3
        );
        assert_eq!(
            value(&samples, "sensor_loss_total", &[("kind", "ringbuf_full")]),
            0
        );
        assert_eq!(
            value(&samples, "sensor_clients_tracked", &[("by", "group")]),
            2
        );
        assert_eq!(
            value(
                &samples,
                "sensor_client_bytes_total",
                &[("client", "2001:db8::1"), ("direction", "out")]
            ),
            70
        );
        assert_eq!(
            value(
                &samples,
                "sensor_client_connections_open",
                &[("client", "10.0.0.1")]
            ),
            1
        );
        assert_eq!(
            value(&samples, "sensor_metrics_auth_failures_total", &[]),
            4
        );
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut s = state(100);
        let weird = "a\"b\\c\nd";
        s.agg.addresses.apply(weird, &traffic(5), Now::system());
        let text = render(&s, 5);
        assert!(
            text.contains(r#"sensor_client_requests_total{client="a\"b\\c\nd"} 2"#),
            "{text}"
        );
        let (samples, _) = parse(&text);
        assert_eq!(client_labels(&samples), BTreeSet::from([weird.to_owned()]));
        assert_eq!(escape_help("a\\b\nc"), "a\\\\b\\nc");
    }

    #[test]
    fn per_client_series_are_bounded_to_the_top_n_by_bytes_out() {
        let mut s = state(1000);
        let now = Now::system();
        for i in 1..=50u64 {
            let ip = format!("10.0.{}.{}", i / 200, i % 200);
            s.agg
                .apply(ip.parse().expect("ip"), &traffic(i * 1000), now);
        }
        let (samples, _) = parse(&render(&s, 3));
        assert_eq!(
            client_labels(&samples),
            BTreeSet::from(["10.0.0.50".into(), "10.0.0.49".into(), "10.0.0.48".into()])
        );
        // Heaviest first.
        let first = samples
            .iter()
            .find(|s| s.0 == "sensor_client_bytes_total")
            .expect("client series");
        assert_eq!(first.1["client"], "10.0.0.50");
        let (samples, types) = parse(&render(&s, 0));
        assert!(client_labels(&samples).is_empty());
        assert!(!types.contains_key("sensor_client_bytes_total"));
        let (samples, _) = parse(&render(&s, 500));
        assert_eq!(client_labels(&samples).len(), 50);
    }

    #[test]
    fn host_totals_include_folded_clients() {
        let mut s = state(5);
        let now = Now::system();
        let mut expected = Counts::default();
        for i in 1..=40u64 {
            let d = traffic(i * 7);
            expected += d.counts;
            expected.connections += 1;
            s.agg
                .apply(format!("192.0.2.{i}").parse().expect("ip"), &d, now);
        }
        assert!(s.agg.addresses.folded.clients > 0, "some clients folded");
        let (samples, _) = parse(&render(&s, 3));
        assert_eq!(
            value(&samples, "sensor_bytes_total", &[("direction", "out")]),
            expected.bytes_out
        );
        assert_eq!(
            value(&samples, "sensor_bytes_total", &[("direction", "in")]),
            expected.bytes_in
        );
        assert_eq!(
            value(&samples, "sensor_requests_total", &[]),
            expected.requests
        );
        assert_eq!(
            value(&samples, "sensor_connections_opened_total", &[]),
            expected.connections
        );
        assert_eq!(
            value(
                &samples,
                "sensor_clients_folded_total",
                &[("by", "address")]
            ),
            s.agg.addresses.folded.clients
        );
        assert!(value(&samples, "sensor_clients_tracked", &[("by", "address")]) <= 6);
        assert_eq!(client_labels(&samples).len(), 3);
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret2", b"secret"));
        assert!(!constant_time_eq(b"secre", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(!constant_time_eq(b"", b""));
    }

    fn ask(head: &str, failures: &AtomicU64) -> Reply {
        answer(head.as_bytes(), b"tok", failures, || Some("x 1\n".into()))
    }

    #[test]
    fn http_answers() {
        let failures = AtomicU64::new(0);
        let ok = ask(
            "GET /metrics HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer tok\r\n\r\n",
            &failures,
        );
        assert_eq!((ok.status, ok.content_type), (200, CONTENT_TYPE));
        let bytes = String::from_utf8(ok.to_bytes()).expect("utf-8");
        assert!(bytes.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(bytes.contains("\r\nContent-Length: 4\r\n"));
        assert!(bytes.ends_with("\r\n\r\nx 1\n"));
        // Scheme is case-insensitive, header names too; a query string is ignored.
        assert_eq!(
            ask(
                "GET /metrics?x=1 HTTP/1.0\nauthorization: bearer  tok \n\n",
                &failures
            )
            .status,
            200
        );
        let head = ask(
            "HEAD /metrics HTTP/1.1\r\nAuthorization: Bearer tok\r\n\r\n",
            &failures,
        );
        assert!(
            String::from_utf8(head.to_bytes())
                .expect("utf-8")
                .ends_with("\r\n\r\n")
        );
        assert_eq!(failures.load(Ordering::Relaxed), 0);

        for unauthenticated in [
            "GET /metrics HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nAuthorization: Bearer tok2\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nAuthorization: Basic dG9rOg==\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nAuthorization: Bearer\r\n\r\n",
            "GET /other HTTP/1.1\r\n\r\n",
        ] {
            let r = ask(unauthenticated, &failures);
            assert_eq!(r.status, 401, "{unauthenticated:?}");
            assert!(
                String::from_utf8(r.to_bytes())
                    .expect("utf-8")
                    .contains("\r\nWWW-Authenticate: Bearer realm=\"sensor\"\r\n")
            );
        }
        assert_eq!(failures.load(Ordering::Relaxed), 5);

        let auth = "Authorization: Bearer tok\r\n";
        assert_eq!(
            ask(&format!("GET /nope HTTP/1.1\r\n{auth}\r\n"), &failures).status,
            404
        );
        assert_eq!(
            ask(&format!("POST /metrics HTTP/1.1\r\n{auth}\r\n"), &failures).status,
            405
        );
        for malformed in [
            "\r\n\r\n",
            "GET\r\n\r\n",
            "GET /metrics\r\n\r\n",
            "GET /metrics HTTP/2.0\r\n\r\n",
            "GET  /metrics HTTP/1.1\r\n\r\n",
            "get /metrics HTTP/1.1\r\n\r\n",
            "GET metrics HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1 x\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nno colon\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nAuthorization: Bearer tok\r\nAuthorization: Bearer x\r\n\r\n",
        ] {
            assert_eq!(ask(malformed, &failures).status, 400, "{malformed:?}");
        }
        let invalid_utf8 = answer(b"GET /\xff HTTP/1.1\r\n\r\n", b"tok", &failures, || None);
        assert_eq!(invalid_utf8.status, 400);
        assert_eq!(
            failures.load(Ordering::Relaxed),
            5,
            "400s are not auth failures"
        );
        let unavailable = answer(
            format!("GET /metrics HTTP/1.1\r\n{auth}\r\n").as_bytes(),
            b"tok",
            &failures,
            || None,
        );
        assert_eq!(unavailable.status, 500);
    }

    #[test]
    fn head_detection() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
    }

    #[test]
    fn token_file_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("sensor-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let missing = dir.join("missing");
        let err = read_token(&missing).expect_err("missing file");
        assert!(err.to_string().contains(&missing.display().to_string()));
        let empty = dir.join("empty");
        std::fs::write(&empty, " \n").expect("write");
        let err = read_token(&empty).expect_err("empty file");
        assert_eq!(
            err.to_string(),
            format!("the metrics bearer token file {} is empty", empty.display())
        );
        let good = dir.join("good");
        std::fs::write(&good, "  s3cret\n").expect("write");
        assert_eq!(read_token(&good).expect("token"), b"s3cret");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
