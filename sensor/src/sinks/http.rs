//! Transport helpers: host:port and URL parsing, TLS client configuration (rustls, with a CA
//! file or the system's roots), connecting with a deadline, and a minimal HTTP/1.1 POST (one
//! request per connection) for the HEC and webhook outputs.

use std::{path::Path, sync::Arc, time::Duration};

use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

use super::error::OutputError;

/// Splits "host:port", "[v6]:port" or "v6-without-brackets" is refused. Returns (host, port).
pub fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
    let host = if let Some(inner) = host.strip_prefix('[') {
        inner.strip_suffix(']')?.to_owned()
    } else {
        if host.contains(':') {
            return None;
        }
        host.to_owned()
    };
    (!host.is_empty()).then_some((host, port))
}

/// An http:// or https:// URL, as far as a POST needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, starting with '/'.
    pub path: String,
}

impl Url {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("`{s}` is not an http:// or https:// URL"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err("credentials in the URL are not supported (use token_file)".into());
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if authority.ends_with(']') || !authority.contains(':') {
            let host = authority.trim_start_matches('[').trim_end_matches(']');
            (host.to_owned(), default_port)
        } else if authority.starts_with('[') || authority.matches(':').count() == 1 {
            split_host_port(authority).ok_or_else(|| format!("bad host:port in `{s}`"))?
        } else {
            return Err(format!("bad host in `{s}` (IPv6 addresses go in brackets)"));
        };
        if host.is_empty() {
            return Err(format!("no host in `{s}`"));
        }
        if path.chars().any(|c| c.is_control() || c == ' ') {
            return Err(format!("bad path in `{s}`"));
        }
        Ok(Self {
            tls,
            host,
            port,
            path: path.to_owned(),
        })
    }

    /// "host:port" with IPv6 in brackets (for the Host header and connecting).
    pub fn authority(&self) -> String {
        join_host_port(&self.host, self.port)
    }
}

pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A TLS connector trusting `ca_file` (PEM, one or more certificates), else the system roots.
pub fn tls_connector(ca_file: Option<&Path>) -> Result<TlsConnector, OutputError> {
    tls_connector_with_identity(ca_file, None)
}

/// A client certificate chain and its private key (PEM files), for mutual TLS.
#[derive(Debug, Clone, Copy)]
pub struct ClientIdentity<'a> {
    pub cert_file: &'a Path,
    pub key_file: &'a Path,
}

/// Reads a PEM certificate chain (at least one certificate).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, OutputError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| OutputError::Tls(format!("reading {}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| OutputError::Tls(format!("reading {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(OutputError::Tls(format!(
            "{} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> Result<rustls_pki_types::PrivateKeyDer<'static>, OutputError> {
    rustls_pki_types::PrivateKeyDer::from_pem_file(path)
        .map_err(|e| OutputError::Tls(format!("reading the private key {}: {e}", path.display())))
}

/// As [`tls_connector`], presenting `identity` when the server asks for a certificate.
pub fn tls_connector_with_identity(
    ca_file: Option<&Path>,
    identity: Option<ClientIdentity<'_>>,
) -> Result<TlsConnector, OutputError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in read_certs(path)? {
                roots.add(cert).map_err(|e| {
                    OutputError::Tls(format!("certificate in {}: {e}", path.display()))
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(OutputError::Tls(
                    "no system CA certificates found; set ca_file".into(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| OutputError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let config = match identity {
        Some(id) => config
            .with_client_auth_cert(read_certs(id.cert_file)?, read_key(id.key_file)?)
            .map_err(|e| {
                OutputError::Tls(format!(
                    "client certificate {} / key {}: {e}",
                    id.cert_file.display(),
                    id.key_file.display()
                ))
            })?,
        None => config.with_no_client_auth(),
    };
    Ok(TlsConnector::from(Arc::new(config)))
}

pub fn server_name(name: &str) -> Result<ServerName<'static>, OutputError> {
    ServerName::try_from(name.to_owned())
        .map_err(|e| OutputError::Tls(format!("`{name}` is not a valid TLS server name: {e}")))
}

/// Connects to host:port (resolving names) within `timeout`.
pub async fn connect(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, OutputError> {
    let target = join_host_port(host, port);
    let stream = tokio::time::timeout(timeout, TcpStream::connect((host, port)))
        .await
        .map_err(|_| OutputError::Timeout(timeout))?
        .map_err(|e| OutputError::io(format!("connecting to {target}"), e))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// An HTTP endpoint to POST to.
pub struct Client {
    pub url: Url,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    timeout: Duration,
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Retry-After in seconds, if given as a number.
    pub fn retry_after(&self) -> Option<Duration> {
        self.header("retry-after")?
            .trim()
            .parse::<u64>()
            .ok()
            .map(Duration::from_secs)
    }
}

/// Large enough for a fleet-wide client list from the collector.
const MAX_RESPONSE: usize = 64 * 1024 * 1024;

impl Client {
    pub fn new(
        url: &str,
        ca_file: Option<&Path>,
        server_name_override: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, OutputError> {
        Self::with_identity(url, ca_file, server_name_override, None, timeout)
    }

    /// As [`Client::new`], with a client certificate for mutual TLS.
    pub fn with_identity(
        url: &str,
        ca_file: Option<&Path>,
        server_name_override: Option<&str>,
        identity: Option<ClientIdentity<'_>>,
        timeout: Duration,
    ) -> Result<Self, OutputError> {
        let url = Url::parse(url).map_err(OutputError::Config)?;
        let tls = if url.tls {
            let name = server_name(server_name_override.unwrap_or(&url.host))?;
            Some((tls_connector_with_identity(ca_file, identity)?, name))
        } else {
            None
        };
        Ok(Self { url, tls, timeout })
    }

    /// GETs `path` (path and query, replacing the URL's) with `headers`.
    pub async fn get(
        &self,
        path: &str,
        headers: &[(&str, String)],
    ) -> Result<Response, OutputError> {
        tokio::time::timeout(self.timeout, self.exchange_with("GET", path, headers, None))
            .await
            .map_err(|_| OutputError::Timeout(self.timeout))?
    }

    /// POSTs `body` with `headers`; the whole exchange within the timeout.
    pub async fn post(
        &self,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> Result<Response, OutputError> {
        tokio::time::timeout(
            self.timeout,
            self.exchange_with("POST", &self.url.path, headers, Some(body)),
        )
        .await
        .map_err(|_| OutputError::Timeout(self.timeout))?
    }

    async fn exchange_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Option<&[u8]>,
    ) -> Result<Response, OutputError> {
        let tcp = connect(&self.url.host, self.url.port, self.timeout).await?;
        let mut stream: Box<dyn Stream> = match &self.tls {
            Some((connector, name)) => Box::new(
                connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| OutputError::Tls(format!("{}: {e}", self.url.authority())))?,
            ),
            None => Box::new(tcp),
        };
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: sensor/{}\r\n\
             Connection: close\r\n",
            self.url.authority(),
            env!("CARGO_PKG_VERSION"),
        );
        if let Some(body) = body {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        for (name, value) in headers {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let io = |e| OutputError::io(format!("talking to {}", self.url.authority()), e);
        stream.write_all(head.as_bytes()).await.map_err(io)?;
        if let Some(body) = body {
            stream.write_all(body).await.map_err(io)?;
        }
        stream.flush().await.map_err(io)?;
        let mut raw = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => {
                    raw.extend_from_slice(&chunk[..n]);
                    if raw.len() > MAX_RESPONSE {
                        break;
                    }
                    if response_complete(&raw) {
                        break;
                    }
                }
                // A TLS peer closing without close_notify, after a complete response.
                Err(_) if response_complete(&raw) => break,
                Err(e) => return Err(io(e)),
            }
        }
        parse_response(&raw)
    }
}

fn split_head(raw: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some((&raw[..i], &raw[i + 4..]))
}

/// True once a response with Content-Length (or chunked, terminated) has fully arrived.
fn response_complete(raw: &[u8]) -> bool {
    let Some((head, body)) = split_head(raw) else {
        return false;
    };
    let head = String::from_utf8_lossy(head).to_ascii_lowercase();
    for line in head.lines() {
        if let Some(v) = line.strip_prefix("content-length:") {
            return v.trim().parse::<usize>().is_ok_and(|n| body.len() >= n);
        }
        if line.starts_with("transfer-encoding:") && line.contains("chunked") {
            return body.ends_with(b"0\r\n\r\n");
        }
    }
    false
}

pub fn parse_response(raw: &[u8]) -> Result<Response, OutputError> {
    let (head, body) =
        split_head(raw).ok_or_else(|| OutputError::Protocol("incomplete HTTP response".into()))?;
    let head = String::from_utf8_lossy(head);
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| OutputError::Protocol(format!("bad status line `{status_line}`")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_vec()
    };
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = body.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&body[..i]);
        let size_hex = size_text.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_hex, 16) else {
            break;
        };
        body = &body[i + 2..];
        if size == 0 || body.len() < size {
            out.extend_from_slice(&body[..size.min(body.len())]);
            break;
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).unwrap_or(&[]);
    }
    out
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Reads a secret (token, key) from a file: its contents without trailing whitespace.
pub fn read_secret(path: &Path, what: &str) -> Result<String, OutputError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| OutputError::io(format!("reading the {what} {}", path.display()), e))?;
    let secret = text.trim_end().to_owned();
    if secret.is_empty() {
        return Err(OutputError::Config(format!(
            "the {what} {} is empty",
            path.display()
        )));
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u =
            Url::parse("https://splunk.example.net:8088/services/collector/event").expect("url");
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path.as_str()),
            (
                true,
                "splunk.example.net",
                8088,
                "/services/collector/event"
            )
        );
        let u = Url::parse("http://[::1]:9000/hook?x=1").expect("v6");
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("::1", 9000, "/hook?x=1")
        );
        assert_eq!(u.authority(), "[::1]:9000");
        let u = Url::parse("http://example.net").expect("no path");
        assert_eq!((u.port, u.path.as_str()), (80, "/"));
        assert!(Url::parse("ftp://x/").is_err());
        assert!(Url::parse("http://u:p@x/").is_err());
        assert!(Url::parse("http://::1:80/").is_err());
    }

    #[test]
    fn host_ports() {
        assert_eq!(split_host_port("h:514"), Some(("h".into(), 514)));
        assert_eq!(split_host_port("[::1]:6514"), Some(("::1".into(), 6514)));
        assert_eq!(split_host_port("::1:514"), None);
        assert_eq!(split_host_port("h"), None);
        assert_eq!(split_host_port("h:0"), None);
    }

    #[test]
    fn responses() {
        let r = parse_response(
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 3\r\nContent-Length: 2\r\n\r\n{}",
        )
        .expect("parse");
        assert_eq!((r.status, r.body.as_str()), (503, "{}"));
        assert_eq!(r.retry_after(), Some(Duration::from_secs(3)));
        let r = parse_response(
            b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
        .expect("chunked");
        assert_eq!(r.body, "hello world");
        assert!(response_complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!response_complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"
        ));
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn hex_digits() {
        assert_eq!(hex(&[0, 15, 16, 255]), "000f10ff");
    }
}
