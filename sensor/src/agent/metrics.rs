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
//! The HTTP side is hyper (`net::server`), like the local API and the collector: one request
//! per connection, a bounded request head, header and whole-connection timeouts, a bounded
//! number of connections at once, and every malformed request answered with an error status.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, UNIX_EPOCH},
};

use hyper::{
    Method, Request, StatusCode,
    header::{self, HeaderValue},
};
use log::info;
use tokio::net::TcpListener;

use crate::{
    agent::shared::{AgentState, SharedState},
    model::aggregate::{ClientStats, ClientTable},
    net::{
        prometheus::{CONTENT_TYPE, Exposition, NO_LABELS},
        server::{self, Bearer, Limits, Reply},
    },
};

/// Connections: a request head larger than 8 KiB is refused (431), one not complete within 5
/// seconds is dropped, and the reply must be written within 10 more; one request each.
const LIMITS: Limits = Limits {
    header_timeout: Duration::from_secs(5),
    max_head: 8192,
    keep_alive: false,
    deadline: Some(Duration::from_secs(15)),
};
/// Connections served at once; further ones wait in the listen backlog.
const MAX_CONCURRENT: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(transparent)]
    Token(#[from] crate::net::NetError),
    #[error("cannot listen for metrics on {addr}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// Reads the bearer token (the one secret reader: surrounding whitespace dropped, a file
/// others can read warned about).
pub fn read_token(path: &Path) -> Result<Vec<u8>, MetricsError> {
    Ok(crate::net::secrets::read_secret(path, "metrics bearer token file")?.into_bytes())
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
        let token = crate::net::secrets::read_secret(
            &config.bearer_token_file,
            "metrics bearer token file",
        )?
        .into_bytes();
        if config
            .listen
            .parse::<SocketAddr>()
            .is_ok_and(|a| !a.ip().is_loopback())
        {
            log::warn!(
                "metrics listener on {} serves plain HTTP: scrapers' bearer tokens cross the \
                 network in clear; listen on loopback behind a TLS-terminating proxy",
                config.listen
            );
        }
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
        server::serve_tcp(self.listener, LIMITS, MAX_CONCURRENT, move |_peer| {
            let ctx = ctx.clone();
            move |req| {
                let reply = ctx.respond(&req);
                async move { reply }
            }
        })
        .await;
    }
}

struct Context {
    token: Vec<u8>,
    top_n: usize,
    auth_failures: Arc<AtomicU64>,
    state: SharedState,
}

impl Context {
    fn respond<B>(&self, req: &Request<B>) -> Reply {
        answer(req, &self.token, &self.auth_failures, || {
            // Gathered under the lock, encoded after it.
            let state = self.state.lock().ok()?;
            let mut exposition = families(&state, self.top_n);
            drop(state);
            listener_families(&mut exposition, self.auth_failures.load(Ordering::Relaxed));
            exposition.encode().ok()
        })
    }
}

/// A plain-text reply; nothing here may be cached (counters, or a refusal).
fn text(status: StatusCode, content_type: &'static str, body: impl Into<bytes::Bytes>) -> Reply {
    let mut r = server::reply(status, content_type, body);
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn error(status: StatusCode, message: &'static str) -> Reply {
    text(status, "text/plain; charset=utf-8", message)
}

/// Answers one request (hyper already answered a malformed one with 400 or 431): 400 for an
/// ambiguous token, 401 unauthenticated (counted), 405, 404, or the metrics `body()` renders
/// (500 if it cannot).
fn answer<B>(
    req: &Request<B>,
    token: &[u8],
    auth_failures: &AtomicU64,
    body: impl FnOnce() -> Option<String>,
) -> Reply {
    match server::bearer(req.headers(), token) {
        Bearer::Accepted => {}
        Bearer::Ambiguous => return error(StatusCode::BAD_REQUEST, "malformed request\n"),
        Bearer::Refused => {
            auth_failures.fetch_add(1, Ordering::Relaxed);
            let mut reply = error(
                StatusCode::UNAUTHORIZED,
                "a valid bearer token is required\n",
            );
            reply.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"sensor\""),
            );
            return reply;
        }
    }
    // hyper sends no body in reply to HEAD.
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let mut reply = error(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        reply
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return reply;
    }
    if req.uri().path() != "/metrics" {
        return error(
            StatusCode::NOT_FOUND,
            "not found; metrics are at /metrics\n",
        );
    }
    match body() {
        Some(body) => text(StatusCode::OK, CONTENT_TYPE, body),
        None => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "agent state unavailable\n",
        ),
    }
}

/// The `n` heaviest clients by bytes out (ties: by client, ascending), heaviest first: the same
/// order as `sensor clients` (sort `bytes_out`).
fn top_clients(table: &ClientTable, n: usize) -> Vec<(&str, &ClientStats)> {
    let order = |a: &(&str, &ClientStats), b: &(&str, &ClientStats)| {
        b.1.totals()
            .bytes_out
            .cmp(&a.1.totals().bytes_out)
            .then_with(|| a.0.cmp(b.0))
    };
    let mut all: Vec<(&str, &ClientStats)> = table.clients.iter().collect();
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

/// Gathers the agent's metrics (encoded by `Exposition::encode` in the text format 0.0.4).
///
/// Host totals (`sensor_bytes_total`, `sensor_requests_total`, `sensor_connections_*`) are the
/// grand totals, folded clients included; per-client series (`sensor_client_*`) exist only for
/// the `top_n` heaviest addresses by bytes out.
pub fn families(state: &AgentState, top_n: usize) -> Exposition {
    let mut out = Exposition::default();
    let (addresses, groups) = (&state.agg.addresses, &state.agg.groups);
    let total = addresses.grand_total();
    let live = state.table.live_count() as u64;

    out.gauge(
        "sensor_up",
        "1 while the agent is running and serving metrics.",
        [(NO_LABELS, 1u64)],
    );
    out.gauge(
        "sensor_build_info",
        "The agent's version, as a label; the value is always 1.",
        [([("version", env!("CARGO_PKG_VERSION"))], 1u64)],
    );
    let started = state
        .started
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    out.gauge(
        "sensor_start_time_seconds",
        "When this agent process started, in seconds since the Unix epoch.",
        [(NO_LABELS, started)],
    );
    out.counter(
        "sensor_bytes_total",
        "TCP payload bytes on watched connections (in: client to this host, out: this host to \
         client), all clients including folded ones.",
        [
            ([("direction", "in")], total.bytes_in),
            ([("direction", "out")], total.bytes_out),
        ],
    );
    out.counter(
        "sensor_requests_total",
        "Requests (HTTP/1.x) or request turns (other protocols) on watched connections.",
        [(NO_LABELS, total.requests)],
    );
    out.counter(
        "sensor_connections_opened_total",
        "Watched connections opened.",
        [(NO_LABELS, total.connections)],
    );
    out.gauge(
        "sensor_connections_open",
        "Watched connections open now.",
        [(NO_LABELS, live)],
    );
    out.counter(
        "sensor_connections_closed_total",
        "Watched connections closed (opened minus open now).",
        [(NO_LABELS, total.connections.saturating_sub(live))],
    );
    out.counter(
        "sensor_loss_total",
        "Events the kernel programs lost or skipped, by kind (see docs/counters.md).",
        state.loss.iter().map(|(kind, n)| ([("kind", *kind)], *n)),
    );
    out.counter(
        "sensor_alert_log_lost_total",
        "Alert events the alert log (alerts.jsonl) could not take; the outputs still got them.",
        [(NO_LABELS, state.alert_log_lost)],
    );
    out.counter(
        "sensor_early_parts_shipped_total",
        "Early parts of summary periods shipped to the collector when alerts were raised.",
        [(NO_LABELS, state.early.count)],
    );
    out.gauge(
        "sensor_clients_max",
        "Configured bound on clients kept exactly, per table (clients.max_clients).",
        [(NO_LABELS, state.max_clients as u64)],
    );
    out.gauge(
        "sensor_clients_tracked",
        "Clients kept exactly, by address or by address group.",
        [
            ([("by", "address")], addresses.clients.len() as u64),
            ([("by", "group")], groups.clients.len() as u64),
        ],
    );
    out.counter(
        "sensor_clients_folded_total",
        "Clients folded into the counted remainder to keep memory bounded (a client folded \
         twice counts twice).",
        [
            ([("by", "address")], addresses.folded.clients),
            ([("by", "group")], groups.folded.clients),
        ],
    );

    let top = top_clients(addresses, top_n);
    out.counter(
        "sensor_client_bytes_total",
        "TCP payload bytes of one client address; only the top clients by bytes out have \
         series, so series come and go as the top changes.",
        top.iter().flat_map(|(client, c)| {
            [
                (
                    [("client", *client), ("direction", "in")],
                    c.totals().bytes_in,
                ),
                (
                    [("client", *client), ("direction", "out")],
                    c.totals().bytes_out,
                ),
            ]
        }),
    );
    let per_client = |value: fn(&ClientStats) -> u64| {
        top.iter()
            .map(move |(client, c)| ([("client", *client)], value(c)))
    };
    out.counter(
        "sensor_client_requests_total",
        "Requests of one client address (top clients by bytes out only).",
        per_client(|c| c.totals().requests),
    );
    out.counter(
        "sensor_client_connections_opened_total",
        "Connections opened by one client address (top clients by bytes out only).",
        per_client(|c| c.totals().connections),
    );
    out.gauge(
        "sensor_client_connections_open",
        "Connections of one client address open now (top clients by bytes out only).",
        per_client(|c| c.open_connections()),
    );
    out.counter(
        "sensor_client_events_total",
        "Server-sent events streamed to one client address (top clients by bytes out only).",
        per_client(|c| c.totals().events_out),
    );
    keyed_families(&mut out, "identity", &state.agg.identities, top_n);
    keyed_families(&mut out, "forwarded", &state.agg.forwarded, top_n);
    out
}

/// Per-identity (`sensor_identity_*`, label `identity`) or per-forwarded-client
/// (`sensor_forwarded_*`, label `client`) series for the top N by bytes out.
fn keyed_families(out: &mut Exposition, kind: &'static str, table: &ClientTable, top_n: usize) {
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
    out.counter(
        &format!("sensor_{kind}_bytes_total"),
        &format!("TCP payload bytes of the exchanges of {what}; top {top_n} by bytes out only."),
        top.iter().flat_map(|(key, c)| {
            [
                ([(label, *key), ("direction", "in")], c.totals().bytes_in),
                ([(label, *key), ("direction", "out")], c.totals().bytes_out),
            ]
        }),
    );
    let series = |value: fn(&ClientStats) -> u64| {
        top.iter().map(move |(key, c)| ([(label, *key)], value(c)))
    };
    out.counter(
        &format!("sensor_{kind}_requests_total"),
        &format!("Requests of {what}; top {top_n} by bytes out only."),
        series(|c| c.totals().requests),
    );
    out.counter(
        &format!("sensor_{kind}_events_total"),
        &format!("Server-sent events streamed to {what}; top {top_n} by bytes out only."),
        series(|c| c.totals().events_out),
    );
}

/// Appends the listener's own metrics.
fn listener_families(out: &mut Exposition, auth_failures: u64) {
    out.counter(
        "sensor_metrics_auth_failures_total",
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
            early: Default::default(),
            alert_log_lost: 0,
            alert_log_queued: Default::default(),
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
        let mut exposition = families(&s, 20);
        listener_families(&mut exposition, 4);
        let text = exposition.encode().expect("encode");
        let (samples, types) = parse(&text);
        assert_eq!(types["sensor_bytes_total"], "counter");
        assert_eq!(types["sensor_connections_open"], "gauge");
        assert_eq!(value(&samples, "sensor_up", &[]), 1);
        assert!(text.contains("\nsensor_start_time_seconds 1700000000.25\n"));
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

    /// Gathers and encodes, as the listener does.
    fn render(state: &AgentState, top_n: usize) -> String {
        families(state, top_n).encode().expect("encode")
    }

    fn ask(method: &str, target: &str, auth: &[&str], failures: &AtomicU64) -> Reply {
        let mut req = Request::builder().method(method).uri(target);
        for value in auth {
            req = req.header(header::AUTHORIZATION, *value);
        }
        let req = req.body(()).expect("request");
        answer(&req, b"tok", failures, || Some("x 1\n".into()))
    }

    #[test]
    fn http_answers() {
        let failures = AtomicU64::new(0);
        let ok = ask("GET", "/metrics", &["Bearer tok"], &failures);
        assert_eq!(ok.status(), 200);
        assert_eq!(ok.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        assert_eq!(ok.headers()[header::CACHE_CONTROL], "no-store");
        // Scheme is case-insensitive; a query string is ignored.
        assert_eq!(
            ask("GET", "/metrics?x=1", &["bearer  tok "], &failures).status(),
            200
        );
        assert_eq!(
            ask("HEAD", "/metrics", &["Bearer tok"], &failures).status(),
            200
        );
        assert_eq!(failures.load(Ordering::Relaxed), 0);

        for (target, auth) in [
            ("/metrics", &[][..]),
            ("/metrics", &["Bearer tok2"]),
            ("/metrics", &["Basic dG9rOg=="]),
            ("/metrics", &["Bearer"]),
            ("/other", &[]),
        ] {
            let r = ask("GET", target, auth, &failures);
            assert_eq!(r.status(), 401, "{target} {auth:?}");
            assert_eq!(
                r.headers()[header::WWW_AUTHENTICATE],
                "Bearer realm=\"sensor\""
            );
        }
        assert_eq!(failures.load(Ordering::Relaxed), 5);

        assert_eq!(
            ask("GET", "/nope", &["Bearer tok"], &failures).status(),
            404
        );
        let post = ask("POST", "/metrics", &["Bearer tok"], &failures);
        assert_eq!(post.status(), 405);
        assert_eq!(post.headers()[header::ALLOW], "GET, HEAD");
        assert_eq!(
            ask("GET", "/metrics", &["Bearer tok", "Bearer x"], &failures).status(),
            400
        );
        assert_eq!(
            failures.load(Ordering::Relaxed),
            5,
            "400s are not auth failures"
        );
        let req = Request::get("/metrics")
            .header(header::AUTHORIZATION, "Bearer tok")
            .body(())
            .expect("request");
        assert_eq!(answer(&req, b"tok", &failures, || None).status(), 500);
    }

    /// Sends raw bytes to a real listener and returns its whole reply.
    async fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.write_all(bytes).await.expect("send");
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut reply)).await;
        String::from_utf8_lossy(&reply).into_owned()
    }

    /// The listener over a real socket: hyper parses, bounds and answers malformed requests.
    #[tokio::test]
    async fn listener_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let server = Server {
            listener,
            token: b"tok".to_vec(),
            top_n: 5,
            auth_failures: Arc::new(AtomicU64::new(0)),
        };
        let state = Arc::new(std::sync::Mutex::new(state(10)));
        tokio::spawn(server.serve(state));

        let ok = exchange(
            addr,
            b"GET /metrics HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer tok\r\n\r\n",
        )
        .await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        let (head, body) = ok.split_once("\r\n\r\n").expect("head and body");
        let head = head.to_ascii_lowercase();
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
        assert!(
            head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())),
            "{head}"
        );
        assert!(
            body.contains("\nsensor_metrics_auth_failures_total 0\n"),
            "{body}"
        );
        let head_only = exchange(
            addr,
            b"HEAD /metrics HTTP/1.0\r\nAuthorization: Bearer tok\r\n\r\n",
        )
        .await;
        assert!(head_only.starts_with("HTTP/1.0 200 OK\r\n"), "{head_only}");
        assert!(head_only.ends_with("\r\n\r\n"), "no body: {head_only}");

        for malformed in [
            &b"GET\r\n\r\n"[..],
            b"GET /metrics\r\n\r\n",
            b"GET /metrics HTTP/2.0\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1 x\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01garbage\r\n\r\n",
        ] {
            let reply = exchange(addr, malformed).await;
            assert!(
                reply.starts_with("HTTP/1.1 400 Bad Request\r\n"),
                "{}: {reply}",
                String::from_utf8_lossy(malformed)
            );
        }
        let mut huge = b"GET /metrics HTTP/1.1\r\nX-Filler: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 20_000));
        let reply = exchange(addr, &huge).await;
        assert!(
            reply.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{reply}"
        );
        let after = exchange(
            addr,
            b"GET /metrics HTTP/1.1\r\nAuthorization: Bearer tok\r\n\r\n",
        )
        .await;
        assert!(
            after.contains("\nsensor_metrics_auth_failures_total 0\n"),
            "malformed requests are not auth failures: {after}"
        );
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
