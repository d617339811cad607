//! A real nats-server for the collector's tests.

use std::time::{Duration, Instant};

/// A nats-server with JetStream on a free port, its store in a temporary directory;
/// killed when dropped.
pub struct NatsServer {
    child: std::process::Child,
    dir: std::path::PathBuf,
    pub url: String,
}

impl NatsServer {
    /// A server, or None when nats-server is not installed and `SENSOR_REQUIRE_NATS` is not
    /// set (the test command sets it: there a missing server fails the test).
    pub fn start_or_skip(name: &str) -> Option<Self> {
        let server = Self::start(name);
        if server.is_none() {
            assert!(
                std::env::var_os("SENSOR_REQUIRE_NATS").is_none(),
                "SENSOR_REQUIRE_NATS is set but nats-server could not be started"
            );
            eprintln!("skipped: no nats-server");
        }
        server
    }

    fn start(name: &str) -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let dir = std::env::temp_dir().join(format!("{name}-{}-{port}", std::process::id()));
        let child = std::process::Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let server = Self {
            child,
            dir,
            url: format!("nats://127.0.0.1:{port}"),
        };
        let ready = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if ready.elapsed() > Duration::from_secs(10) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(server)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
