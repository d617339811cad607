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
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use log::{debug, warn};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{
    ingest::{self, IngestError, Role},
    shared::Shared,
};
use crate::{
    model::aggregate::Now,
    model::report::{Query, client_rows},
    net::{
        prometheus,
        server::{self, Limits},
    },
    sinks::http::{read_certs, read_key},
};

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Request heads: within 10 seconds, at most 64 KiB; bodies have their own timeout.
const LIMITS: Limits = Limits {
    header_timeout: Duration::from_secs(10),
    max_head: 64 * 1024,
    keep_alive: true,
    deadline: None,
};
const BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 512;

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

pub async fn serve(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("collector accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    let n = bump(&shared.counters.tls_failures);
                    log_sparsely(n, || format!("TLS handshake with {peer} failed: {e}"));
                    return;
                }
                Err(_) => {
                    bump(&shared.counters.tls_failures);
                    return;
                }
            };
            let respond = move |req| {
                let shared = shared.clone();
                async move { handle(req, &shared, peer).await }
            };
            if let Err(e) = server::serve_connection(tls, &LIMITS, respond).await {
                debug!("connection from {peer}: {e}");
            }
        });
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

async fn handle(req: Request<Incoming>, shared: &Shared, peer: SocketAddr) -> Reply {
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
        return r;
    };
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
            ingest(req, shared, &name, peer).await
        }
        (&Method::GET, "/v1/clients" | "/v1/alerts" | "/v1/health" | "/metrics") => {
            if role != Role::Reader {
                return forbidden("read the fleet view");
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
    let limited = Limited::new(req.into_body(), shared.max_body);
    let body = match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                bump(&shared.counters.too_large);
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("bodies are at most {} bytes", shared.max_body),
                );
            }
            bump(&shared.counters.malformed);
            return error(StatusCode::BAD_REQUEST, &format!("reading the body: {e}"));
        }
        Err(_) => {
            bump(&shared.counters.malformed);
            return error(StatusCode::REQUEST_TIMEOUT, "body not received in time");
        }
    };
    let batch = match ingest::decode(
        &body,
        encoding.as_deref(),
        shared.max_body.saturating_mul(16),
        agent,
        Now::system().secs(),
    ) {
        Ok(b) => b,
        Err(e) => {
            let (counter, status) = match &e {
                IngestError::TooLarge(_) => {
                    (&shared.counters.too_large, StatusCode::PAYLOAD_TOO_LARGE)
                }
                IngestError::Malformed(_) => (&shared.counters.malformed, StatusCode::BAD_REQUEST),
                IngestError::WrongAgent(_) => (&shared.counters.forbidden, StatusCode::FORBIDDEN),
            };
            let n = bump(counter);
            log_sparsely(n, || {
                format!("refused a batch from `{agent}` ({peer}): {e}")
            });
            return error(status, &e.to_string());
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
            let outputs = crate::sinks::health();
            return match shared
                .with_fleet(|f| super::metrics::families(&shared.counters, f, &outputs))
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
