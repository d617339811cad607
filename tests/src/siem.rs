//! SIEM-side peers shared by the output and collector tests: test certificates, an rsyslogd
//! of the test's own, and JSON lines readers.

use std::{
    fs,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::Duration,
};

use serde_json::Value;

use crate::{run_ok, wait_for};

pub fn read_jsonl(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}

// --- rsyslog --------------------------------------------------------------------------------

pub struct Certs {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A self-signed CA and a server certificate for "syslog.test" and 127.0.0.1.
pub fn make_certs(dir: &Path) -> Certs {
    let p = |n: &str| dir.join(n);
    run_ok(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes"])
            .args([
                "-keyout",
                p("ca.key").to_str().expect("utf-8"),
                "-out",
                p("ca.pem").to_str().expect("utf-8"),
                "-days",
                "2",
                "-subj",
                "/CN=sensor test CA",
            ]),
    );
    run_ok(
        Command::new("openssl")
            .args(["req", "-newkey", "rsa:2048", "-nodes"])
            .args([
                "-keyout",
                p("server.key").to_str().expect("utf-8"),
                "-out",
                p("server.csr").to_str().expect("utf-8"),
                "-subj",
                "/CN=syslog.test",
            ]),
    );
    fs::write(
        p("ext.cnf"),
        "subjectAltName=DNS:syslog.test,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         extendedKeyUsage=serverAuth\n",
    )
    .expect("ext.cnf");
    run_ok(Command::new("openssl").args(["x509", "-req"]).args([
        "-in",
        p("server.csr").to_str().expect("utf-8"),
        "-CA",
        p("ca.pem").to_str().expect("utf-8"),
        "-CAkey",
        p("ca.key").to_str().expect("utf-8"),
        "-CAcreateserial",
        "-out",
        p("server.pem").to_str().expect("utf-8"),
        "-days",
        "2",
        "-extfile",
        p("ext.cnf").to_str().expect("utf-8"),
    ]));
    Certs {
        ca: p("ca.pem"),
        cert: p("server.pem"),
        key: p("server.key"),
    }
}

/// A free port on 127.0.0.1 for TCP and UDP, below the ephemeral range: client sockets of
/// concurrent tests take ephemeral ports, which a listener must not collide with.
pub fn listen_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().wrapping_mul(2_654_435_761);
    loop {
        let n = seed.wrapping_add(SEQ.fetch_add(1, Ordering::Relaxed).wrapping_mul(7919));
        let port = 20_000 + (n % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
}

/// An rsyslogd of the test's own (own config, pid file and work directory), writing what it
/// parsed from each message as JSON to `out`.
pub struct Rsyslog {
    child: Option<Child>,
    conf: PathBuf,
    pid: PathBuf,
    log: PathBuf,
    pub out: PathBuf,
    pub tcp_port: u16,
}

impl Rsyslog {
    pub fn start(
        dir: &Path,
        name: &str,
        tcp_port: u16,
        udp_port: Option<u16>,
        tls: Option<&Certs>,
    ) -> Self {
        let dir = dir.join(name);
        fs::create_dir_all(dir.join("work")).expect("rsyslog dir");
        let out = dir.join("received.jsonl");
        let mut conf = format!(
            // LEEF's attribute delimiter is a tab, which rsyslog escapes (#011) unless told.
            "global(workDirectory=\"{}\" maxMessageSize=\"64k\" parser.escapeControlCharacterTab=\"off\"",
            dir.join("work").display()
        );
        if let Some(c) = tls {
            conf.push_str(&format!(
                "\n  defaultNetstreamDriverCAFile=\"{}\"\n  defaultNetstreamDriverCertFile=\"{}\"\n  \
                 defaultNetstreamDriverKeyFile=\"{}\"",
                c.ca.display(),
                c.cert.display(),
                c.key.display()
            ));
        }
        conf.push_str(")\n");
        if tls.is_some() {
            conf.push_str(
                "module(load=\"imtcp\" streamDriver.name=\"gtls\" streamDriver.mode=\"1\" \
                 streamDriver.authMode=\"anon\")\n",
            );
        } else {
            conf.push_str("module(load=\"imtcp\")\n");
        }
        conf.push_str(&format!(
            "module(load=\"mmpstrucdata\")\ninput(type=\"imtcp\" address=\"127.0.0.1\" port=\"{tcp_port}\" ruleset=\"r\")\n"
        ));
        if let Some(udp) = udp_port {
            conf.push_str(&format!(
                "module(load=\"imudp\")\ninput(type=\"imudp\" address=\"127.0.0.1\" port=\"{udp}\" ruleset=\"r\")\n"
            ));
        }
        conf.push_str(&format!(
            r#"template(name="fields" type="list" option.jsonf="on") {{
  property(outname="pri" name="pri" format="jsonf")
  property(outname="version" name="protocol-version" format="jsonf")
  property(outname="timestamp" name="timereported" dateFormat="rfc3339" format="jsonf")
  property(outname="hostname" name="hostname" format="jsonf")
  property(outname="app" name="app-name" format="jsonf")
  property(outname="procid" name="procid" format="jsonf")
  property(outname="msgid" name="msgid" format="jsonf")
  property(outname="sd" name="structured-data" format="jsonf")
  property(outname="msg" name="msg" format="jsonf")
  property(outname="input" name="inputname" format="jsonf")
  property(outname="sdparsed" name="$!rfc5424-sd" format="jsonf")
}}
ruleset(name="r") {{
  action(type="mmpstrucdata")
  action(type="omfile" file="{}" template="fields")
}}
"#,
            out.display()
        ));
        let conf_path = dir.join("rsyslog.conf");
        fs::write(&conf_path, conf).expect("rsyslog.conf");
        let mut r = Self {
            child: None,
            conf: conf_path,
            pid: dir.join("rsyslogd.pid"),
            log: dir.join("rsyslogd.log"),
            out,
            tcp_port,
        };
        r.spawn();
        r
    }

    pub fn spawn(&mut self) {
        let _ = fs::remove_file(&self.pid);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("rsyslog log");
        let log2 = log.try_clone().expect("log");
        let child = Command::new("rsyslogd")
            .arg("-n")
            .arg("-f")
            .arg(&self.conf)
            .arg("-i")
            .arg(&self.pid)
            .stdout(log)
            .stderr(log2)
            .spawn()
            .expect("rsyslogd (apt-get install rsyslog rsyslog-gnutls)");
        let port = self.tcp_port;
        self.child = Some(child);
        wait_for("rsyslogd to listen", Duration::from_secs(20), || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "rsyslogd exited ({status}): {}",
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            TcpStream::connect(("127.0.0.1", port))
                .map(|_| ())
                .map_err(|e| {
                    format!(
                        "{e}; rsyslogd said: {}",
                        fs::read_to_string(&self.log).unwrap_or_default()
                    )
                })
        });
    }

    /// SIGTERM, as an operator's restart does; waits for the exit.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            crate::terminate(child, "rsyslogd");
        }
    }

    pub fn received(&self) -> Vec<Value> {
        read_jsonl(&self.out)
    }

    /// The id of each received message, from rsyslog's parse of the structured data.
    pub fn ids(&self) -> Vec<String> {
        self.received()
            .iter()
            .map(|m| sd(m)["id"].as_str().unwrap_or("?").to_owned())
            .collect()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// rsyslog's parse of the structured data element `alert@32473`.
pub fn sd(m: &Value) -> Value {
    let parsed: Value =
        serde_json::from_str(m["sdparsed"].as_str().unwrap_or("{}")).unwrap_or_default();
    parsed["alert@32473"].clone()
}

/// A client certificate for `name` signed by the CA `make_certs` made in `dir` (mutual TLS).
/// Returns (certificate, key).
pub fn make_client_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let p = |n: &str| dir.join(n);
    let (key, csr, cert, ext) = (
        p(&format!("{name}.key")),
        p(&format!("{name}.csr")),
        p(&format!("{name}.pem")),
        p(&format!("{name}.ext")),
    );
    let s = |p: &Path| p.to_str().expect("utf-8").to_owned();
    run_ok(
        Command::new("openssl")
            .args(["req", "-newkey", "rsa:2048", "-nodes", "-keyout"])
            .args([s(&key), "-out".into(), s(&csr), "-subj".into()])
            .arg(format!("/CN={name}")),
    );
    fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .expect("client ext");
    run_ok(Command::new("openssl").args(["x509", "-req", "-in"]).args([
        s(&csr),
        "-CA".into(),
        s(&p("ca.pem")),
        "-CAkey".into(),
        s(&p("ca.key")),
        "-CAcreateserial".into(),
        "-out".into(),
        s(&cert),
        "-days".into(),
        "2".into(),
        "-extfile".into(),
        s(&ext),
    ]));
    (cert, key)
}
