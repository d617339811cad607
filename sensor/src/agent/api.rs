//! Local API: HTTP/1.1 over a root-only unix socket, serving JSON to the CLI (and to
//! `curl --unix-socket`).
//!
//! Access control is the socket itself (mode 0600, owned by the agent's user) plus a peer
//! credential check, so nothing else on the host can read what clients do.

use std::{
    io::{Read as _, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use log::{debug, warn};
use serde::Serialize;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
};

use crate::{
    model::aggregate::{Aggregator, Now},
    model::conntable::ConnTable,
    model::report::{Query, client_rows},
    sinks::SinkHealth,
};

const MAX_REQUEST_HEAD: usize = 8192;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// What the agent shares with the API.
pub struct AgentState {
    pub table: ConnTable,
    pub agg: Aggregator,
    pub max_clients: usize,
    pub loss: Vec<(&'static str, u64)>,
    pub started: SystemTime,
    pub cgroup: String,
    pub ports: Vec<u16>,
    /// The programs were already attached (pinned) when this agent started.
    pub continued_from_pinned_state: bool,
    /// How live connections are read from the kernel (`iterator` or `map`), and why.
    pub live_read: &'static str,
    pub live_read_reason: String,
    /// Request heads parsed for identity.
    pub heads: crate::agent::identity::HeadStats,
    pub detector: crate::detect::Detector,
    /// Start (unix s) of the last summary period shipped to the collector.
    pub shipped_through: u64,
}

pub type SharedState = Arc<Mutex<AgentState>>;

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
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let (state, sinks) = (state.clone(), sinks.clone());
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, state, &sinks).await {
                        debug!("api request failed: {e:#}");
                    }
                });
            }
            Err(e) => {
                warn!("api accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(
    mut stream: UnixStream,
    state: SharedState,
    sinks: &SinkHealth,
) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    let own_uid = unsafe { libc::geteuid() };
    let peer = stream.peer_cred()?;
    if peer.uid() != 0 && peer.uid() != own_uid {
        return respond(&mut stream, 403, "{\"error\":\"forbidden\"}").await;
    }
    let head = tokio::time::timeout(IO_TIMEOUT, read_head(&mut stream))
        .await
        .context("request timed out")??;
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return respond(&mut stream, 405, "{\"error\":\"only GET\"}").await;
    }
    let (route, query) = path.split_once('?').unwrap_or((path, ""));
    let reply = {
        let state = state
            .lock()
            .map_err(|_| anyhow::anyhow!("agent state poisoned"))?;
        route_request(&state, sinks, route, query)
    };
    match reply {
        Ok(body) => respond(&mut stream, 200, &body).await,
        Err((status, message)) => {
            let body = serde_json::json!({ "error": message }).to_string();
            respond(&mut stream, status, &body).await
        }
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
                    .filter(|a| a.state == "open")
                    .count(),
                clock_ms: Now::system().unix_ms,
                time_scale: crate::model::aggregate::Now::scale(),
                live_connections: state.table.live_count(),
                closed_connections_total: state.table.closed_total,
                loss: state.loss.iter().copied().collect(),
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

async fn read_head(stream: &mut UnixStream) -> anyhow::Result<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST_HEAD {
            anyhow::bail!("request head too large");
        }
    }
    let head = String::from_utf8_lossy(&buf);
    Ok(head.lines().next().unwrap_or("").to_owned())
}

async fn respond(stream: &mut UnixStream, status: u16, body: &str) -> anyhow::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Internal Server Error",
    };
    let reply = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

/// Client side: GETs `path` from the agent's socket and returns the body.
pub fn get(socket: &Path, path: &str) -> anyhow::Result<String> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the agent at {} (is `sensor run` running, and are you root?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: sensor\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .context("malformed reply from the agent")?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        anyhow::bail!("agent answered {status}: {body}");
    }
    Ok(body.to_owned())
}
