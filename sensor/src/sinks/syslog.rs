//! Syslog (RFC 5424) over UDP (RFC 5426), TCP or TLS (RFC 5425), with octet-counting framing
//! (`<length> <message>`, RFC 5425 / RFC 6587) on TCP and TLS.
//!
//! `<PRI>1 TIMESTAMP HOSTNAME APP-NAME - MSGID [alert@32473 id=".." rule=".." ...] MSG`
//!
//! PRI: the configured facility (local0) and a severity from the alert's (critical: crit,
//! high: err, medium: warning, low: notice; a resolve is informational). MSGID is the event
//! (open, update, resolve); the structured data carries the key evidence; MSG is CEF, LEEF 2.0
//! or the record as JSON.
//!
//! TCP and TLS connections are kept open between messages; before each write the connection
//! is checked for a close by the receiver, so a restarted receiver costs a reconnect, not an
//! event. Syslog has no acknowledgements: a successful write only means the kernel took the
//! bytes, and a receiver that dies before reading them loses them. So the messages written on
//! a connection in the last seconds are written again on the next connection after a failure
//! (at-least-once; receivers deduplicate by the record id in the structured data). UDP has no
//! delivery feedback at all: a datagram to a stopped receiver is lost.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::{
    config::OutputConfig,
    delivery::{Delivery, Output},
    error::OutputError,
    http,
};
use crate::formats::{Format, JsonFormat, Record, cef::Cef, leef::Leef};

pub const DEFAULT_SD_ID: &str = "alert@32473";
pub const DEFAULT_APP_NAME: &str = "sensor";

/// Escapes an SD-PARAM value: '"', '\' and ']' get a backslash.
pub fn escape_param(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// HOSTNAME, APP-NAME: printable ASCII without spaces, bounded, or "-".
fn header_field(s: &str, max: usize) -> String {
    let v: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if v.is_empty() { "-".into() } else { v }
}

pub fn facility_code(name: &str) -> u8 {
    super::config::FACILITIES
        .iter()
        .position(|f| *f == name)
        .map_or(16, |i| i as u8)
}

/// Syslog severity for an event.
pub fn severity_code(rec: &Record) -> u8 {
    if rec.event == "resolve" {
        return 6;
    }
    match rec.alert.severity.as_str() {
        "critical" => 2,
        "high" => 3,
        "medium" => 4,
        _ => 5,
    }
}

/// Renders RFC 5424 messages.
pub struct Rfc5424 {
    pub facility: u8,
    pub app_name: String,
    pub sd_id: String,
    pub msg: Box<dyn Format>,
}

impl Rfc5424 {
    /// The structured data element with the key evidence.
    pub fn structured_data(&self, rec: &Record) -> String {
        let a = &rec.alert;
        let (requests, bytes_in, bytes_out) = rec.counters();
        let params: [(&str, String); 16] = [
            ("id", rec.id.clone()),
            ("seq", rec.seq.to_string()),
            ("event", rec.event.clone()),
            ("alert", a.id.clone()),
            ("rule", a.rule_id.clone()),
            ("key_kind", a.key_kind.clone()),
            ("key", a.key.clone()),
            ("severity", a.severity.clone()),
            ("mode", a.mode.to_string()),
            ("window", a.window.clone()),
            ("requests", requests.to_string()),
            ("bytes_in", bytes_in.to_string()),
            ("bytes_out", bytes_out.to_string()),
            ("first_seen", a.first_seen.clone()),
            ("last_seen", a.last_seen.clone()),
            ("technique", a.technique.id.clone()),
        ];
        let mut sd = format!("[{}", self.sd_id);
        for (name, value) in params {
            sd.push(' ');
            sd.push_str(name);
            sd.push_str("=\"");
            sd.push_str(&escape_param(&value));
            sd.push('"');
        }
        sd.push(']');
        sd
    }

    pub fn render(&self, rec: &Record) -> String {
        let pri = u16::from(self.facility) * 8 + u16::from(severity_code(rec));
        format!(
            "<{pri}>1 {} {} {} - {} {} {}",
            rec.time_rfc3339(),
            header_field(&rec.alert.host, 255),
            header_field(&self.app_name, 48),
            header_field(&rec.event, 32),
            self.structured_data(rec),
            self.msg.format(rec)
        )
    }
}

/// Octet-counting framing: the message's length in bytes, a space, the message.
pub fn octet_counted(msg: &str) -> String {
    format!("{} {msg}", msg.len())
}

enum Conn {
    Udp(UdpSocket),
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

pub struct SyslogOutput {
    host: String,
    port: u16,
    protocol: String,
    tls: Option<(TlsConnector, rustls_pki_types::ServerName<'static>)>,
    timeout: Duration,
    render: Rfc5424,
    conn: Option<Conn>,
    /// Messages written on the current connection recently, oldest first, written again on
    /// the next connection if this one fails (see the module docs).
    recent: std::collections::VecDeque<(std::time::Instant, String)>,
    /// The connection was lost: replay `recent` on the next one.
    replay: bool,
}

/// How long, and how many, written messages stay eligible for a replay after a failure.
const REPLAY_WINDOW: Duration = Duration::from_secs(10);
const REPLAY_MAX: usize = 512;

impl SyslogOutput {
    pub fn new(c: &OutputConfig, timeout: Duration) -> Result<Self, OutputError> {
        let address = c.address.as_deref().unwrap_or_default();
        let (host, port) = http::split_host_port(address)
            .ok_or_else(|| OutputError::Config(format!("`{address}` is not host:port")))?;
        let protocol = c.protocol.clone().unwrap_or_else(|| "tcp".into());
        let tls = if protocol == "tls" {
            let name = http::server_name(c.server_name.as_deref().unwrap_or(&host))?;
            Some((http::tls_connector(c.ca_file.as_deref())?, name))
        } else {
            None
        };
        let msg: Box<dyn Format> = match c.message.as_deref().unwrap_or("cef") {
            "leef" => Box::new(Leef),
            "json" => Box::new(JsonFormat),
            _ => Box::new(Cef),
        };
        Ok(Self {
            host,
            port,
            protocol,
            tls,
            timeout,
            render: Rfc5424 {
                facility: facility_code(c.facility.as_deref().unwrap_or("local0")),
                app_name: c
                    .app_name
                    .clone()
                    .unwrap_or_else(|| DEFAULT_APP_NAME.into()),
                sd_id: c.sd_id.clone().unwrap_or_else(|| DEFAULT_SD_ID.into()),
                msg,
            },
            conn: None,
            recent: std::collections::VecDeque::new(),
            replay: false,
        })
    }

    pub fn target(&self) -> String {
        format!(
            "{}://{}",
            self.protocol,
            http::join_host_port(&self.host, self.port)
        )
    }

    async fn connect(&self) -> Result<Conn, OutputError> {
        let target = http::join_host_port(&self.host, self.port);
        if self.protocol == "udp" {
            let addr = tokio::net::lookup_host((self.host.as_str(), self.port))
                .await
                .map_err(|e| OutputError::io(format!("resolving {target}"), e))?
                .next()
                .ok_or_else(|| OutputError::Config(format!("{target} resolves to nothing")))?;
            let bind = if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            let sock = UdpSocket::bind(bind)
                .await
                .map_err(|e| OutputError::io("binding a UDP socket", e))?;
            sock.connect(addr)
                .await
                .map_err(|e| OutputError::io(format!("connecting to {target}"), e))?;
            return Ok(Conn::Udp(sock));
        }
        let tcp = http::connect(&self.host, self.port, self.timeout).await?;
        match &self.tls {
            None => Ok(Conn::Tcp(tcp)),
            Some((connector, name)) => {
                let tls = tokio::time::timeout(self.timeout, connector.connect(name.clone(), tcp))
                    .await
                    .map_err(|_| OutputError::Timeout(self.timeout))?
                    .map_err(|e| OutputError::Tls(format!("handshake with {target}: {e}")))?;
                Ok(Conn::Tls(Box::new(tls)))
            }
        }
    }

    /// False when the receiver has closed the connection (or sent something unexpected).
    async fn still_open(conn: &mut Conn) -> bool {
        let mut buf = [0u8; 512];
        let read = match conn {
            Conn::Udp(_) => return true,
            Conn::Tcp(s) => tokio::time::timeout(Duration::ZERO, s.read(&mut buf)).await,
            Conn::Tls(s) => tokio::time::timeout(Duration::ZERO, s.read(&mut buf)).await,
        };
        // Elapsed: nothing to read, the connection is idle and open.
        read.is_err()
    }

    async fn send(&mut self, rec: &Record) -> Result<(), OutputError> {
        if let Some(conn) = self.conn.as_mut()
            && !Self::still_open(conn).await
        {
            self.conn = None;
            self.replay = true;
        }
        if self.conn.is_none() {
            self.conn = Some(self.connect().await?);
        }
        let stream = !matches!(self.conn, Some(Conn::Udp(_)));
        if self.replay && stream {
            let now = std::time::Instant::now();
            self.recent
                .retain(|(at, _)| now.duration_since(*at) <= REPLAY_WINDOW);
            let again: Vec<String> = self.recent.iter().map(|(_, m)| m.clone()).collect();
            for msg in &again {
                self.write(msg).await?;
            }
        }
        self.replay = false;
        let msg = self.render.render(rec);
        self.write(&msg).await?;
        if stream {
            self.recent.push_back((std::time::Instant::now(), msg));
            while self.recent.len() > REPLAY_MAX {
                self.recent.pop_front();
            }
        }
        Ok(())
    }

    /// Writes one message on the current connection; on failure the connection is dropped and
    /// the next one starts with a replay.
    async fn write(&mut self, msg: &str) -> Result<(), OutputError> {
        let timeout = self.timeout;
        let target = self.target();
        let Some(conn) = self.conn.as_mut() else {
            return Err(OutputError::Protocol("not connected".into()));
        };
        let io = |e| OutputError::io(format!("sending to {target}"), e);
        let written = tokio::time::timeout(timeout, async {
            match conn {
                Conn::Udp(s) => s.send(msg.as_bytes()).await.map(|_| ()),
                Conn::Tcp(s) => s.write_all(octet_counted(msg).as_bytes()).await,
                Conn::Tls(s) => {
                    s.write_all(octet_counted(msg).as_bytes()).await?;
                    s.flush().await
                }
            }
        })
        .await;
        let result = match written {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => Err(io(e)),
            Err(_) => Err(OutputError::Timeout(timeout)),
        };
        self.conn = None;
        self.replay = true;
        result
    }
}

impl Output for SyslogOutput {
    type Item = Record;
    fn batch_max(&self) -> usize {
        64
    }

    async fn deliver(&mut self, batch: &[Record]) -> Delivery {
        for (i, rec) in batch.iter().enumerate() {
            if let Err(e) = self.send(rec).await {
                return Delivery::failed(i, e);
            }
        }
        Delivery::all(batch.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::config::valid_sd_name;
    use crate::sinks::tests::record;

    fn renderer(msg: Box<dyn Format>) -> Rfc5424 {
        Rfc5424 {
            facility: facility_code("local0"),
            app_name: "sensor".into(),
            sd_id: DEFAULT_SD_ID.into(),
            msg,
        }
    }

    #[test]
    fn rfc5424_header_and_structured_data() {
        let r = record("address", "10.1.2.3");
        let line = renderer(Box::new(Cef)).render(&r);
        // local0 (16) * 8 + err (3) = 131
        let expected_head = format!(
            "<131>1 {} gpu-host-1 sensor - open [alert@32473 id=\"{}\" seq=\"7\" event=\"open\" ",
            r.time_rfc3339(),
            r.id
        );
        assert!(line.starts_with(&expected_head), "{line}");
        assert!(line.contains(" requests=\"240\" bytes_in=\"48000\" bytes_out=\"9600000\" "));
        assert!(
            line.contains("technique=\"AML.T0024.002\"] CEF:0|sensor|sensor|"),
            "{line}"
        );
        assert!(r.time_rfc3339().ends_with('Z'));
    }

    #[test]
    fn sd_param_escaping() {
        assert_eq!(escape_param(r#"a"b\c]d"#), r#"a\"b\\c\]d"#);
        let mut r = record("identity", "k-1");
        r.alert.rule_id = "r]\"x".into();
        let sd = renderer(Box::new(JsonFormat)).structured_data(&r);
        assert!(sd.contains(r#"rule="r\]\"x""#), "{sd}");
        assert!(valid_sd_name("alert@32473"));
        assert!(!valid_sd_name("a b"));
        assert!(!valid_sd_name("a=b"));
    }

    #[test]
    fn severities_and_framing() {
        let mut r = record("address", "10.1.2.3");
        assert_eq!(severity_code(&r), 3);
        r.alert.severity = "critical".into();
        assert_eq!(severity_code(&r), 2);
        r.event = "resolve".into();
        assert_eq!(severity_code(&r), 6);
        assert_eq!(octet_counted("héllo"), "6 héllo");
        assert_eq!(facility_code("auth"), 4);
        let mut r = record("address", "10.1.2.3");
        r.alert.host = "host with spaces".into();
        let line = renderer(Box::new(Leef)).render(&r);
        assert!(line.contains(" hostwithspaces sensor - open "), "{line}");
        assert!(line.contains("] LEEF:2.0|"));
    }
}
