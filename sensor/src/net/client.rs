//! An HTTP/1.1 client (hyper over tokio-rustls) for the HEC, webhook and collector sinks and
//! the `--collector` views: one request per connection, the whole exchange within a timeout,
//! and connecting with a deadline (syslog uses that too).

use std::{path::Path, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    HeaderMap, Method, Request,
    header::{CONNECTION, HOST, USER_AGENT},
};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;
use url::Url;

use super::{
    NetError,
    tls::{self, ClientIdentity},
};

/// Large enough for a fleet-wide client list from the collector.
const MAX_RESPONSE: usize = 64 * 1024 * 1024;

/// "host:port" with IPv6 addresses in brackets.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Connects to host:port (resolving names) within `timeout`.
pub async fn connect(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, NetError> {
    let target = join_host_port(host, port);
    let stream = tokio::time::timeout(timeout, TcpStream::connect((host, port)))
        .await
        .map_err(|_| NetError::Timeout(timeout))?
        .map_err(|e| NetError::io(format!("connecting to {target}"), e))?;
    // Small requests: do not wait for more bytes before sending.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Parses an http:// or https:// URL without credentials (tokens live in files).
pub fn parse_url(s: &str) -> Result<Url, NetError> {
    let url = Url::parse(s).map_err(|e| NetError::Config(format!("`{s}` is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(NetError::Config(format!(
            "`{s}` is not an http:// or https:// URL"
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(NetError::Config(
            "credentials in the URL are not supported (use token_file)".into(),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(NetError::Config(format!("no host in `{s}`")));
    }
    Ok(url)
}

/// Whether a token may travel to `url`: https, or plain http to a loopback address (a local
/// forwarder on this host; the bytes never leave it). A token sent in clear over a network
/// is a token anyone on the path can replay.
pub fn may_carry_token(url: &Url) -> bool {
    url.scheme() == "https"
        || match url.host() {
            Some(url::Host::Ipv4(a)) => a.is_loopback(),
            Some(url::Host::Ipv6(a)) => a.is_loopback(),
            Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
            None => false,
        }
}

/// The host of a parsed URL as one connects to it and names it in TLS (IPv6 without brackets).
fn host_of(url: &Url) -> String {
    match url.host() {
        Some(url::Host::Ipv6(a)) => a.to_string(),
        Some(h) => h.to_string(),
        None => String::new(),
    }
}

/// How to verify the server (and present ourselves) on https URLs.
#[derive(Debug, Clone, Copy, Default)]
pub struct TlsOptions<'a> {
    /// PEM CA file; the system roots when absent.
    pub ca_file: Option<&'a Path>,
    /// The name the server's certificate must carry; the URL's host when absent.
    pub server_name: Option<&'a str>,
    pub identity: Option<ClientIdentity<'a>>,
}

/// A response, its body read whole.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Response {
    /// Retry-After in seconds, if given as a number.
    pub fn retry_after(&self) -> Option<Duration> {
        self.headers
            .get(hyper::header::RETRY_AFTER)?
            .to_str()
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
            .map(Duration::from_secs)
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Aborts the task driving a connection when the exchange ends or is dropped (timeout).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An HTTP endpoint (its URL) with its TLS settings.
pub struct HttpClient {
    url: Url,
    host: String,
    port: u16,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    timeout: Duration,
}

impl HttpClient {
    pub fn new(url: &str, tls: TlsOptions<'_>, timeout: Duration) -> Result<Self, NetError> {
        let url = parse_url(url)?;
        let host = host_of(&url);
        let port = url.port_or_known_default().unwrap_or(80);
        let tls = if url.scheme() == "https" {
            let name = tls::server_name(tls.server_name.unwrap_or(&host))?;
            Some((tls::connector(tls.ca_file, tls.identity)?, name))
        } else {
            None
        };
        Ok(Self {
            url,
            host,
            port,
            tls,
            timeout,
        })
    }

    pub fn url(&self) -> &Url {
        &self.url
    }

    /// "host:port", IPv6 in brackets.
    pub fn authority(&self) -> String {
        join_host_port(&self.host, self.port)
    }

    /// The URL's path and query.
    pub fn path_and_query(&self) -> &str {
        &self.url[url::Position::BeforePath..url::Position::AfterQuery]
    }

    /// `scheme://host:port/path?query`, the port always written: where it delivers.
    pub fn target(&self) -> String {
        format!(
            "{}://{}{}",
            self.url.scheme(),
            self.authority(),
            self.path_and_query()
        )
    }

    /// GETs `path` (path and query, replacing the URL's) with `headers`.
    pub async fn get(&self, path: &str, headers: &[(&str, String)]) -> Result<Response, NetError> {
        self.timed(self.exchange(Method::GET, path, headers, Bytes::new()))
            .await
    }

    /// POSTs `body` to the URL with `headers`.
    pub async fn post(
        &self,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> Result<Response, NetError> {
        let body = Bytes::copy_from_slice(body);
        self.timed(self.exchange(Method::POST, self.path_and_query(), headers, body))
            .await
    }

    /// The whole exchange (connect, TLS, request, response) within the timeout.
    async fn timed(
        &self,
        exchange: impl Future<Output = Result<Response, NetError>>,
    ) -> Result<Response, NetError> {
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| NetError::Timeout(self.timeout))?
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<Response, NetError> {
        let authority = self.authority();
        let tcp = connect(&self.host, self.port, self.timeout).await?;
        let io: Box<dyn Stream> = match &self.tls {
            Some((connector, name)) => Box::new(
                connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| NetError::Tls(format!("{authority}: {e}")))?,
            ),
            None => Box::new(tcp),
        };
        let talk = |e: hyper::Error| NetError::Protocol(format!("talking to {authority}: {e}"));
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(talk)?;
        // The connection's I/O runs beside the request; an error there surfaces in the
        // request's result, so the task's own result is not needed.
        let _driver = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &authority)
            .header(USER_AGENT, concat!("sensor/", env!("CARGO_PKG_VERSION")))
            .header(CONNECTION, "close");
        for (name, value) in headers {
            request = request.header(*name, value.as_str());
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| NetError::Protocol(format!("a request to {authority}: {e}")))?;
        let response = sender.send_request(request).await.map_err(talk)?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| NetError::Protocol(format!("reading the answer of {authority}: {e}")))?
            .to_bytes();
        Ok(Response {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(url: &str) -> HttpClient {
        HttpClient::new(url, TlsOptions::default(), Duration::from_secs(1)).expect("client")
    }

    #[test]
    fn urls() {
        let c = HttpClient::new(
            "https://splunk.example.net:8088/services/collector/event",
            TlsOptions {
                ca_file: None,
                server_name: Some("splunk"),
                identity: None,
            },
            Duration::from_secs(1),
        );
        // Without system roots the TLS connector cannot be built; the URL part is what counts.
        if let Ok(c) = c {
            assert_eq!(
                c.target(),
                "https://splunk.example.net:8088/services/collector/event"
            );
        }
        let c = client("http://[::1]:9000/hook?x=1");
        assert_eq!((c.host.as_str(), c.port), ("::1", 9000));
        assert_eq!(c.path_and_query(), "/hook?x=1");
        assert_eq!(c.authority(), "[::1]:9000");
        let c = client("http://example.net");
        assert_eq!((c.port, c.path_and_query()), (80, "/"));
        assert_eq!(c.target(), "http://example.net:80/");
        assert!(parse_url("ftp://x/").is_err());
        assert!(parse_url("http://u:p@x/").is_err());
        for (u, ok) in [
            ("https://siem.example.net/x", true),
            ("http://127.0.0.1:8088/x", true),
            ("http://127.9.9.9/x", true),
            ("http://[::1]:8088/x", true),
            ("http://localhost/x", true),
            ("http://siem.example.net/x", false),
            ("http://10.0.0.1/x", false),
            ("http://[fd00::1]/x", false),
            ("http://localhost.evil.net/x", false),
        ] {
            assert_eq!(may_carry_token(&parse_url(u).expect("url")), ok, "{u}");
        }
        assert!(parse_url("http://::1:80/").is_err());
    }

    #[tokio::test]
    async fn posts_and_reads_chunked_answers() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            // Head and the 5-byte body.
            while !got.windows(9).any(|w| w == b"\r\n\r\nhello") {
                let n = s.read(&mut buf).await.expect("read");
                assert!(n > 0, "closed early");
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(
                b"HTTP/1.1 503 Busy\r\nRetry-After: 3\r\nTransfer-Encoding: chunked\r\n\r\n\
                  5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            )
            .await
            .expect("write");
            String::from_utf8_lossy(&got).into_owned()
        });
        let c = client(&format!("http://127.0.0.1:{port}/in?a=b"));
        let r = c
            .post(&[("X-Test", "1".into())], b"hello")
            .await
            .expect("post");
        assert_eq!((r.status, r.body.as_str()), (503, "hello world"));
        assert_eq!(r.retry_after(), Some(Duration::from_secs(3)));
        let head = server.await.expect("server").to_ascii_lowercase();
        assert!(head.starts_with("post /in?a=b http/1.1\r\n"), "{head}");
        assert!(head.contains("\r\nx-test: 1\r\n"), "{head}");
        assert!(head.contains("\r\ncontent-length: 5\r\n"), "{head}");
    }
}
