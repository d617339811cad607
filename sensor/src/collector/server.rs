//! The collector's HTTPS listener (hyper over rustls): authentication, bounded bodies,
//! routing. Every request carries a bearer token; agents may only POST their own batches,
//! readers may only read.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use log::{debug, warn};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{
    admission::Ticket,
    budget::Reservation,
    certname,
    ingest::{self, IngestError, Role},
    shared::Shared,
};
use crate::{
    model::aggregate::Now,
    model::report::{Query, client_rows},
    net::{
        prometheus,
        server::{self, Limits},
        tls::{read_certs, read_key},
    },
};

/// A peer that has not finished its TLS handshake by then is cut off: a slow (or silent)
/// handshake would otherwise hold a connection slot.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Request heads: within 10 seconds, at most 64 KiB; bodies have their own timeout. hyper
/// starts the head timeout whenever the connection waits for a head, so it is also the
/// keep-alive idle timeout.
const LIMITS: Limits = Limits {
    header_timeout: Duration::from_secs(10),
    max_head: 64 * 1024,
    keep_alive: true,
    deadline: None,
};
const BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Decompressed bytes allowed per compressed byte of the body bound (`max_body_bytes`).
pub const DECOMPRESSION_RATIO: usize = 16;

fn bump(a: &AtomicU64) -> u64 {
    a.fetch_add(1, Ordering::Relaxed) + 1
}

/// Logs the 1st, 2nd, 4th, 8th ... occurrence: a flood of bad requests cannot flood the log.
fn log_sparsely(n: u64, msg: impl FnOnce() -> String) {
    if n.is_power_of_two() {
        warn!("{} ({n} so far)", msg());
    }
}

/// The TLS server configuration: certificate and key, and a client CA for mutual TLS.
pub fn tls_acceptor(
    cert_file: &Path,
    key_file: &Path,
    client_ca: Option<&Path>,
) -> anyhow::Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots.add(cert).map_err(|e| {
                    anyhow::anyhow!("certificate in client_ca_file {}: {e}", ca.display())
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| anyhow::anyhow!("client_ca_file {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(read_certs(cert_file)?, read_key(key_file)?)
        .map_err(|e| {
            anyhow::anyhow!(
                "certificate {} / key {}: {e}",
                cert_file.display(),
                key_file.display()
            )
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// What a connection's requests need to know about it.
struct Peer {
    addr: SocketAddr,
    ticket: Ticket,
    /// Names of the verified client certificate (mutual TLS), else None.
    cert_names: Option<Vec<String>>,
}

pub async fn serve(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("collector accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Admission before any TLS work: a peer over its bound costs one accept and a close.
        let ticket = match shared.admission.admit(addr.ip()) {
            Ok(t) => t,
            Err(e) => {
                let n = shared.admission.refused.load(Ordering::Relaxed);
                log_sparsely(n, || format!("closed a connection from {addr}: {e}"));
                drop(tcp);
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let evicted = ticket.evicted.clone();
            tokio::select! {
                () = connection(tcp, addr, ticket, acceptor, shared) => {}
                // Evicted while still unauthenticated: dropping the future closes the socket.
                () = evicted.notified() => debug!("evicted an unauthenticated connection from {addr}"),
            }
        });
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    ticket: Ticket,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
) {
    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let n = bump(&shared.counters.tls_failures);
            log_sparsely(n, || format!("TLS handshake with {addr} failed: {e}"));
            return;
        }
        Err(_) => {
            bump(&shared.counters.tls_failures);
            return;
        }
    };
    let cert_names = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(<[_]>::first)
        .map(|c| certname::names(c));
    let peer = Arc::new(Peer {
        addr,
        ticket,
        cert_names,
    });
    let respond = move |req| {
        let shared = shared.clone();
        let peer = peer.clone();
        async move { handle(req, &shared, &peer).await }
    };
    if let Err(e) = server::serve_connection(tls, &LIMITS, respond).await {
        debug!("connection from {addr}: {e}");
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn json(status: StatusCode, body: String) -> Reply {
    reply(status, "application/json", body)
}

fn error(status: StatusCode, message: &str) -> Reply {
    json(status, serde_json::json!({ "error": message }).to_string())
}

async fn handle(req: Request<Incoming>, shared: &Shared, p: &Peer) -> Reply {
    let peer = p.addr;
    let presented = ingest::bearer(
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    );
    let Some(token) = presented.and_then(|t| shared.tokens.check(t)) else {
        let n = bump(&shared.counters.unauthorized);
        log_sparsely(n, || {
            format!(
                "refused {} {} from {peer}: {} token",
                req.method(),
                req.uri().path(),
                if presented.is_some() { "unknown" } else { "no" }
            )
        });
        let mut r = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        // Closed after the answer: a peer without a valid token must not keep a connection
        // (and its slot) by sending a bad request now and then.
        r.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        return r;
    };
    p.ticket.authenticated();
    let (role, name) = (token.role, token.name.clone());
    let forbidden = |what: &str| {
        let n = bump(&shared.counters.forbidden);
        log_sparsely(n, || format!("refused {what} to `{name}` from {peer}"));
        error(StatusCode::FORBIDDEN, &format!("this token may not {what}"))
    };
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    match (req.method(), path.as_str()) {
        (&Method::POST, "/v1/ingest") => {
            if role != Role::Agent {
                return forbidden("send batches");
            }
            // Mutual TLS: the certificate must have been issued for this agent, so a token
            // leaked from one host cannot be used from another host's (or any) certificate.
            if let Some(names) = &p.cert_names
                && !names.iter().any(|n| n == &name)
            {
                return forbidden(&format!(
                    "send batches with a client certificate for {names:?}"
                ));
            }
            if shared.group().is_some() {
                // Partitioned collectors merge what the partition streams carry; a batch
                // merged here would be in no partition (and counted twice once shipped there).
                return error(
                    StatusCode::CONFLICT,
                    "this collector shares partitions over NATS JetStream: ship with `transport = \"nats\"`",
                );
            }
            ingest(req, shared, &name, peer).await
        }
        (&Method::GET, "/v1/clients" | "/v1/alerts" | "/v1/health" | "/metrics") => {
            if role != Role::Reader {
                return forbidden("read the fleet view");
            }
            if let Some(group) = shared.group()
                && matches!(path.as_str(), "/v1/clients" | "/v1/alerts")
            {
                return gather(group, &path, &query).await;
            }
            read(shared, &path, &query)
        }
        (_, "/v1/ingest" | "/v1/clients" | "/v1/alerts" | "/v1/health" | "/metrics") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "wrong method")
        }
        _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

async fn ingest(req: Request<Incoming>, shared: &Shared, agent: &str, peer: SocketAddr) -> Reply {
    let encoding = req
        .headers()
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // Everything this request holds in memory (body, decompressed JSON) is reserved in the
    // budget shared by all requests in flight first.
    let mut reservation = shared.budget.reservation();
    let body = match tokio::time::timeout(
        BODY_TIMEOUT,
        read_body(req.into_body(), shared.max_body, &mut reservation),
    )
    .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return refuse(shared, agent, peer, &e),
        Err(_) => {
            bump(&shared.counters.malformed);
            return error(StatusCode::REQUEST_TIMEOUT, "body not received in time");
        }
    };
    // Decompressing up to 128 MiB takes a while: off the async workers, so that a few large
    // batches cannot stall every other connection.
    let max = shared.max_body.saturating_mul(DECOMPRESSION_RATIO);
    let name = agent.to_owned();
    let decoded = tokio::task::spawn_blocking(move || {
        let r = ingest::decode_reserving(
            &body,
            encoding.as_deref(),
            max,
            &mut |n| reservation.grow(n),
            &name,
            Now::system().secs(),
        );
        (r, reservation)
    })
    .await;
    // Held until the batch is merged: the parsed batch is about as large as its JSON.
    let (batch, _reservation) = match decoded {
        Ok((Ok(b), reservation)) => (b, reservation),
        Ok((Err(e), _)) => return refuse(shared, agent, peer, &e),
        Err(e) => {
            warn!("decoding a batch from `{agent}` failed: {e}");
            return error(StatusCode::INTERNAL_SERVER_ERROR, "decoding failed");
        }
    };
    match shared.accept(&batch) {
        Ok(applied) => {
            bump(&shared.counters.batches);
            shared
                .counters
                .records
                .fetch_add(applied.accepted as u64, Ordering::Relaxed);
            shared
                .counters
                .duplicates
                .fetch_add(applied.duplicates as u64, Ordering::Relaxed);
            json(
                StatusCode::OK,
                serde_json::to_string(&applied).unwrap_or_default(),
            )
        }
        Err(e) => {
            warn!("cannot accept a batch from `{agent}`: {e:#}");
            // Not journaled, not applied: the agent keeps it and retries.
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the collector cannot store batches now",
            )
        }
    }
}

/// The request body, at most `max` bytes, each frame reserved in the budget before it is kept.
async fn read_body(
    mut body: Incoming,
    max: usize,
    reservation: &mut Reservation,
) -> Result<Vec<u8>, IngestError> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| IngestError::Malformed(format!("reading the body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if out.len() + data.len() > max {
            return Err(IngestError::TooLarge(format!(
                "bodies are at most {max} bytes"
            )));
        }
        if !reservation.grow(data.len()) {
            return Err(IngestError::Busy(
                "the collector holds too many request bodies at once; retry later".into(),
            ));
        }
        out.extend_from_slice(&data);
    }
    Ok(out)
}

/// The answer to a refused batch, counted by reason (and logged sparsely).
fn refuse(shared: &Shared, agent: &str, peer: SocketAddr, e: &IngestError) -> Reply {
    let c = &shared.counters;
    let (counter, status) = match e {
        IngestError::TooLarge(_) => (&c.too_large, StatusCode::PAYLOAD_TOO_LARGE),
        IngestError::Malformed(_) => (&c.malformed, StatusCode::BAD_REQUEST),
        IngestError::Implausible(_) => {
            // Refused as malformed (the agent drops just that record), and counted apart.
            bump(&c.implausible);
            (&c.malformed, StatusCode::BAD_REQUEST)
        }
        IngestError::WrongAgent(_) => (&c.forbidden, StatusCode::FORBIDDEN),
        IngestError::Busy(_) => (&c.busy, StatusCode::SERVICE_UNAVAILABLE),
    };
    let n = bump(counter);
    log_sparsely(n, || {
        format!("refused a batch from `{agent}` ({peer}): {e}")
    });
    let mut r = error(status, &e.to_string());
    if status == StatusCode::SERVICE_UNAVAILABLE {
        // Not the batch's fault: the agent keeps it and retries (never drops it).
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("2"));
    }
    r
}

/// The fleet view of several collectors: each partition's holder answers for its partition
/// (a partition without one, during a failover, makes it a 503: never a partial view).
async fn gather(group: &super::partitioned::Status, path: &str, query: &str) -> Reply {
    let body = if path == "/v1/clients" {
        let q = match Query::parse(query) {
            Ok(q) => q,
            Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        group
            .clients(&q, query)
            .await
            .map(|rows| serde_json::to_string(&rows))
    } else {
        group.alerts().await.map(|a| serde_json::to_string(&a))
    };
    match body {
        Ok(Ok(b)) => json(StatusCode::OK, b),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        Err(e) => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("2"));
            r
        }
    }
}

fn read(shared: &Shared, path: &str, query: &str) -> Reply {
    let now = Now::system();
    let body = match path {
        "/v1/clients" => {
            let q = match Query::parse(query) {
                Ok(q) => q,
                Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
            };
            shared.with_fleet(|f| {
                f.state.refresh_open(now);
                serde_json::to_string(&client_rows(&f.state.agg, &q, now))
            })
        }
        "/v1/alerts" => shared.with_fleet(|f| serde_json::to_string(&f.state.alerts(&f.detector))),
        "/metrics" => {
            return match shared
                .with_fleet(|f| {
                    super::metrics::families(
                        &shared.counters,
                        f,
                        &f.outputs.stats(),
                        shared.group().map(|g| &**g),
                    )
                })
                .and_then(|families| Ok(families.encode()?))
            {
                Ok(text) => reply(StatusCode::OK, prometheus::CONTENT_TYPE, text),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}")),
            };
        }
        _ => shared.health(),
    };
    match body {
        Ok(Ok(b)) => json(StatusCode::OK, b),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}")),
    }
}
