//! Local API: HTTP/1.1 over a root-only unix socket, serving JSON to the CLI (and to
//! `curl --unix-socket`).
//!
//! Access control is the socket itself (mode 0600, owned by the agent's user) plus a peer
//! credential check, so nothing else on the host can read what clients do.

use std::{os::unix::fs::PermissionsExt as _, path::Path, time::Duration};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::{UnixListener, UnixStream};

use crate::{
    agent::shared::{AgentState, SharedState},
    model::aggregate::Now,
    model::report::{Query, client_rows},
    net::server::{self, Limits, Reply},
    sinks::SinkHealth,
};

/// The request head within 8 KiB and 5 seconds, the whole exchange within 15; one request per
/// connection (the CLI makes one call per connection).
const LIMITS: Limits = Limits {
    header_timeout: IO_TIMEOUT,
    max_head: 8192,
    keep_alive: false,
    deadline: Some(EXCHANGE_TIMEOUT),
};
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// One exchange, both sides: the server drops a connection after it, the CLI gives up.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(15);
/// Connections served at once (the socket is root-only; this only bounds a runaway script).
const MAX_CONNECTIONS: usize = 64;

#[derive(Serialize)]
struct Health<'a> {
    status: &'static str,
    started: String,
    cgroup: &'a str,
    ports: &'a [u16],
    continued_from_pinned_state: bool,
    live_read: &'static str,
    live_read_reason: &'a str,
    heads: crate::agent::identity::HeadStats,
    detect: crate::detect::DetectCounters,
    open_alerts: usize,
    /// The agent's clock (unix ms), sped up by `time_scale` in evaluations.
    clock_ms: u64,
    time_scale: u64,
    live_connections: usize,
    closed_connections_total: u64,
    loss: std::collections::BTreeMap<&'static str, u64>,
    /// Alert events the alert log could not take (the outputs still got them).
    alert_log_lost: u64,
    /// Alert events on their way to the alert log: every event of an alert the API shows is
    /// in the log once this is 0.
    alert_log_queued: usize,
    /// Early parts of periods shipped to the collector since start (docs/collector.md).
    early_parts_shipped: u64,
    clients: ClientsHealth,
    /// Per SIEM output: sent, retried, spooled, pending, dropped, last error.
    outputs: Vec<crate::sinks::OutputStats>,
}

/// How much of the per-client state is exact, and what was folded away.
#[derive(Serialize)]
struct ClientsHealth {
    max_clients: usize,
    tracked_addresses: usize,
    tracked_groups: usize,
    folded_addresses: u64,
    folded_groups: u64,
    folded_bytes_in: u64,
    folded_bytes_out: u64,
    folded_requests: u64,
    /// Everything observed, exact clients and folded remainder together.
    total_bytes_in: u64,
    total_bytes_out: u64,
    total_requests: u64,
}

/// Binds the socket, replacing a stale one, with root-only permissions.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating socket directory {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another agent is serving {}; stop it or choose another socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(listener)
}

/// Serves the API; `sinks` are the running sinks' counters (in `/v1/health`).
pub async fn serve(listener: UnixListener, state: SharedState, sinks: SinkHealth) {
    // SAFETY: geteuid has no preconditions.
    let own_uid = unsafe { libc::geteuid() };
    server::serve_unix(listener, LIMITS, MAX_CONNECTIONS, move |stream| {
        // The socket's mode already keeps others out; the peer check also covers a socket
        // whose permissions were loosened by hand.
        let allowed = stream
            .peer_cred()
            .is_ok_and(|peer| peer.uid() == 0 || peer.uid() == own_uid);
        let (state, sinks) = (state.clone(), sinks.clone());
        move |req| {
            let reply = handle(&req, allowed, &state, &sinks);
            async move { reply }
        }
    })
    .await;
}

fn handle<B>(req: &Request<B>, allowed: bool, state: &SharedState, sinks: &SinkHealth) -> Reply {
    if !allowed {
        return server::json_error(StatusCode::FORBIDDEN, "forbidden");
    }
    if req.method() != Method::GET {
        return server::json_error(StatusCode::METHOD_NOT_ALLOWED, "only GET");
    }
    let reply = match state.lock() {
        Ok(state) => route_request(
            &state,
            sinks,
            req.uri().path(),
            req.uri().query().unwrap_or(""),
        ),
        Err(_) => Err((500, "agent state poisoned".into())),
    };
    match reply {
        Ok(body) => server::reply(StatusCode::OK, "application/json", body),
        Err((status, message)) => server::json_error(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &message,
        ),
    }
}

/// Answers one API route from the agent's state.
pub fn route_request(
    state: &AgentState,
    sinks: &SinkHealth,
    route: &str,
    query: &str,
) -> Result<String, (u16, String)> {
    let json = |r: serde_json::Result<String>| r.map_err(|e| (500, e.to_string()));
    match route {
        "/v1/conns" => json(serde_json::to_string(&state.table.rows())),
        "/v1/clients" => {
            let q = Query::parse(query).map_err(|e| (400, e.to_string()))?;
            json(serde_json::to_string(&client_rows(
                &state.agg,
                &q,
                Now::system(),
            )))
        }
        "/v1/alerts" => json(serde_json::to_string(&state.detector.list())),
        "/v1/baseline" => json(serde_json::to_string(state.detector.baseline())),
        "/v1/health" => {
            let (a, g) = (&state.agg.addresses, &state.agg.groups);
            json(serde_json::to_string(&Health {
                status: "ok",
                started: humantime::format_rfc3339_millis(state.started).to_string(),
                cgroup: &state.cgroup,
                ports: &state.ports,
                continued_from_pinned_state: state.continued_from_pinned_state,
                live_read: state.live_read,
                live_read_reason: &state.live_read_reason,
                heads: state.heads,
                detect: state.detector.state.counters,
                open_alerts: state
                    .detector
                    .state
                    .alerts
                    .values()
                    .filter(|a| a.is_open())
                    .count(),
                clock_ms: Now::system().unix_ms,
                time_scale: crate::model::aggregate::Now::scale(),
                live_connections: state.table.live_count(),
                closed_connections_total: state.table.closed_total,
                loss: state.loss.iter().copied().collect(),
                alert_log_lost: state.alert_log_lost,
                alert_log_queued: state
                    .alert_log_queued
                    .load(std::sync::atomic::Ordering::Relaxed),
                early_parts_shipped: state.early.count,
                clients: ClientsHealth {
                    max_clients: state.max_clients,
                    tracked_addresses: a.clients.len(),
                    tracked_groups: g.clients.len(),
                    folded_addresses: a.folded.clients,
                    folded_groups: g.folded.clients,
                    folded_bytes_in: a.folded.totals.bytes_in,
                    folded_bytes_out: a.folded.totals.bytes_out,
                    folded_requests: a.folded.totals.requests,
                    total_bytes_in: a.grand_total().bytes_in,
                    total_bytes_out: a.grand_total().bytes_out,
                    total_requests: a.grand_total().requests,
                },
                outputs: sinks.stats(),
            }))
        }
        _ => Err((404, "no such endpoint".into())),
    }
}

/// Client side: GETs `path` from the agent's socket and returns the body.
pub fn get(socket: &Path, path: &str) -> anyhow::Result<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the client runtime")?;
    runtime.block_on(async {
        tokio::time::timeout(EXCHANGE_TIMEOUT, fetch(socket, path))
            .await
            .with_context(|| format!("the agent at {} did not answer in time", socket.display()))?
    })
}

async fn fetch(socket: &Path, path: &str) -> anyhow::Result<String> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "cannot reach the agent at {} (is `sensor run` running, and are you root?)",
            socket.display()
        )
    })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("talking to the agent")?;
    // Drives the connection while the request is sent and the body read.
    tokio::spawn(connection);
    let request = Request::get(path)
        .header(header::HOST, "sensor")
        .body(Empty::<Bytes>::new())
        .with_context(|| format!("API path {path}"))?;
    let response = sender
        .send_request(request)
        .await
        .context("malformed reply from the agent")?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .context("reading the agent's reply")?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    if status != StatusCode::OK {
        anyhow::bail!("agent answered {}: {body}", status.as_u16());
    }
    Ok(body)
}
