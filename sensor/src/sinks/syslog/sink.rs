//! The syslog connection: TCP and TLS connections are kept open between messages; before each
//! write the connection is checked for a close by the receiver, so a restarted receiver costs
//! a reconnect, not an event. Syslog has no acknowledgements: a successful write only means
//! the kernel took the bytes, and a receiver that dies before reading them loses them. So the
//! messages written on a connection in the last seconds are written again on the next
//! connection after a failure (at-least-once; receivers deduplicate by the record id in the
//! structured data). UDP has no delivery feedback at all: a datagram to a stopped receiver is
//! lost.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::{
    config::{Protocol, SyslogConfig, split_host_port},
    encoder::{Rfc5424, octet_counted},
};
use crate::{
    formats::Record,
    net::{NetError, client, tls},
    sinks::{
        error::SinkError,
        sink::{Delivered, Failed, Sink},
    },
};

enum Conn {
    Udp(UdpSocket),
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

pub struct SyslogSink {
    host: String,
    port: u16,
    protocol: Protocol,
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

impl SyslogSink {
    pub fn new(c: &SyslogConfig, render: Rfc5424, timeout: Duration) -> Result<Self, SinkError> {
        let (host, port) = split_host_port(&c.address)
            .ok_or_else(|| SinkError::Config(format!("`{}` is not host:port", c.address)))?;
        let tls = if c.protocol == Protocol::Tls {
            let name = tls::server_name(c.server_name.as_deref().unwrap_or(&host))?;
            Some((tls::connector(c.ca_file.as_deref(), None)?, name))
        } else {
            None
        };
        Ok(Self {
            host,
            port,
            protocol: c.protocol,
            tls,
            timeout,
            render,
            conn: None,
            recent: std::collections::VecDeque::new(),
            replay: false,
        })
    }

    async fn connect(&self) -> Result<Conn, SinkError> {
        let target = client::join_host_port(&self.host, self.port);
        if self.protocol == Protocol::Udp {
            let addr = tokio::net::lookup_host((self.host.as_str(), self.port))
                .await
                .map_err(|e| SinkError::io(format!("resolving {target}"), e))?
                .next()
                .ok_or_else(|| SinkError::Config(format!("{target} resolves to nothing")))?;
            let bind = if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            let sock = UdpSocket::bind(bind)
                .await
                .map_err(|e| SinkError::io("binding a UDP socket", e))?;
            sock.connect(addr)
                .await
                .map_err(|e| SinkError::io(format!("connecting to {target}"), e))?;
            return Ok(Conn::Udp(sock));
        }
        let tcp = client::connect(&self.host, self.port, self.timeout).await?;
        match &self.tls {
            None => Ok(Conn::Tcp(tcp)),
            Some((connector, name)) => {
                let tls = tokio::time::timeout(self.timeout, connector.connect(name.clone(), tcp))
                    .await
                    .map_err(|_| SinkError::Timeout(self.timeout))?
                    .map_err(|e| NetError::Tls(format!("handshake with {target}: {e}")))?;
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

    async fn send(&mut self, rec: &Record) -> Result<(), SinkError> {
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
    async fn write(&mut self, msg: &str) -> Result<(), SinkError> {
        let timeout = self.timeout;
        let target = self.target();
        let Some(conn) = self.conn.as_mut() else {
            return Err(SinkError::Protocol("not connected".into()));
        };
        let io = |e| SinkError::io(format!("sending to {target}"), e);
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
            Err(_) => Err(SinkError::Timeout(timeout)),
        };
        self.conn = None;
        self.replay = true;
        result
    }
}

impl Sink for SyslogSink {
    type Item = Record;

    fn target(&self) -> String {
        format!(
            "{}://{}",
            self.protocol.as_str(),
            client::join_host_port(&self.host, self.port)
        )
    }

    fn batch_max(&self) -> usize {
        64
    }

    async fn deliver(&mut self, batch: &[Record]) -> Result<Delivered, Failed> {
        for (i, rec) in batch.iter().enumerate() {
            if let Err(e) = self.send(rec).await {
                return Err(Failed::after(i, e));
            }
        }
        Ok(Delivered::all(batch.len()))
    }
}
