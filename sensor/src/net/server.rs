//! Server plumbing over hyper: every listener of the agent (the local API on a unix socket,
//! `/metrics` over TCP) and the collector's HTTPS connections go through `serve_connection`,
//! so request parsing, header bounds and timeouts are hyper's and configured in one place.

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    HeaderMap, Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderValue},
    server::conn::http1,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener, UnixStream},
    sync::Semaphore,
};

/// A complete reply: every body served here is rendered before it is sent.
pub type Reply = Response<Full<Bytes>>;

/// Bounds on one connection.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The request head must arrive within this; a slower client is disconnected.
    pub header_timeout: Duration,
    /// hyper's read buffer: a request head that does not fit gets 431 (hyper's minimum: 8 KiB).
    pub max_head: usize,
    /// Whether a connection may carry more than one request.
    pub keep_alive: bool,
    /// The whole connection, reply written included: a client that stops reading cannot hold a
    /// connection slot for ever. `None`: no bound (the caller bounds what it waits for).
    pub deadline: Option<Duration>,
}

/// Serves HTTP/1.1 on one connection: each request is answered by `handle`.
pub async fn serve_connection<I, H, F>(io: I, limits: &Limits, handle: H) -> Result<(), ServeError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Send + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let reply = handle(req);
        async move { Ok::<_, Infallible>(reply.await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_head)
        .keep_alive(limits.keep_alive);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    match limits.deadline {
        None => connection.await.map_err(ServeError::Http),
        Some(deadline) => match tokio::time::timeout(deadline, connection).await {
            Ok(served) => served.map_err(ServeError::Http),
            Err(_) => Err(ServeError::Deadline(deadline)),
        },
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Http(hyper::Error),
    #[error("connection not done within {0:?}")]
    Deadline(Duration),
}

/// Accepts TCP connections and serves each with the handler `per_connection(peer)` returns;
/// at most `max_connections` at once, further ones wait in the listen backlog.
pub async fn serve_tcp<P, H, F>(
    listener: TcpListener,
    limits: Limits,
    max_connections: usize,
    per_connection: P,
) where
    P: Fn(SocketAddr) -> H,
    H: Fn(Request<Incoming>) -> F + Send + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return; // the semaphore is never closed
        };
        match listener.accept().await {
            Ok((stream, peer)) => {
                let handle = per_connection(peer);
                tokio::spawn(async move {
                    if let Err(e) = serve_connection(stream, &limits, handle).await {
                        debug!("connection from {peer}: {e}");
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Accepts unix-socket connections, like `serve_tcp`; `per_connection` sees the stream (for
/// its peer credentials) before anything is read from it.
pub async fn serve_unix<P, H, F>(
    listener: UnixListener,
    limits: Limits,
    max_connections: usize,
    per_connection: P,
) where
    P: Fn(&UnixStream) -> H,
    H: Fn(Request<Incoming>) -> F + Send + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let handle = per_connection(&stream);
                tokio::spawn(async move {
                    if let Err(e) = serve_connection(stream, &limits, handle).await {
                        debug!("local connection: {e}");
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A reply with a body and its content type.
pub fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// `{"error": message}` with `status`.
pub fn json_error(status: StatusCode, message: &str) -> Reply {
    reply(
        status,
        "application/json",
        serde_json::json!({ "error": message }).to_string(),
    )
}

/// What a request's `Authorization` header says about a bearer token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bearer {
    /// `Bearer <token>` with the expected token (scheme case-insensitive).
    Accepted,
    /// No header, another scheme, or another token.
    Refused,
    /// More than one `Authorization` header: which one would count is ambiguous.
    Ambiguous,
}

/// Checks `Authorization: Bearer <token>` against `token`, in constant time.
pub fn bearer(headers: &HeaderMap, token: &[u8]) -> Bearer {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return if headers.contains_key(header::AUTHORIZATION) {
            Bearer::Ambiguous
        } else {
            Bearer::Refused
        };
    };
    let Some((scheme, credentials)) = value.to_str().ok().and_then(|v| v.trim().split_once(' '))
    else {
        return Bearer::Refused;
    };
    if scheme.eq_ignore_ascii_case("bearer")
        && constant_time_eq(credentials.trim().as_bytes(), token)
    {
        Bearer::Accepted
    } else {
        Bearer::Refused
    }
}

/// Compares in time that depends only on the length of `presented`, never on where it differs
/// from `expected` (nor on `expected`'s length beyond equality of lengths).
pub fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
    if expected.is_empty() {
        return false;
    }
    let mut diff = u8::from(presented.len() != expected.len());
    for (i, b) in presented.iter().enumerate() {
        diff |= b ^ expected[i % expected.len()];
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret2", b"secret"));
        assert!(!constant_time_eq(b"secre", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(!constant_time_eq(b"", b""));
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(
                header::AUTHORIZATION,
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn bearer_header() {
        assert_eq!(bearer(&headers(&["Bearer tok"]), b"tok"), Bearer::Accepted);
        assert_eq!(
            bearer(&headers(&["bearer  tok "]), b"tok"),
            Bearer::Accepted
        );
        for refused in [&[][..], &["Bearer tok2"], &["Basic dG9rOg=="], &["Bearer"]] {
            assert_eq!(
                bearer(&headers(refused), b"tok"),
                Bearer::Refused,
                "{refused:?}"
            );
        }
        assert_eq!(
            bearer(&headers(&["Bearer tok", "Bearer x"]), b"tok"),
            Bearer::Ambiguous
        );
    }
}
