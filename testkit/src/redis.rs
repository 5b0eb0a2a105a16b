//! A real `redis-server` on a free port of 127.0.0.1, its files in a temporary directory.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a started server may take to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A `redis-server` child process; killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    extra: Vec<String>,
    port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts `redis-server` (must be on `PATH`) with AOF (`appendfsync always`), so that a test
    /// can [`kill`](Self::kill) and [`restart`](Self::restart) it without losing writes.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A server without persistence, for tests that never restart it.
    pub fn ephemeral() -> Self {
        Self::start_with(&["--appendonly", "no"])
    }

    /// [`RedisServer::start`] with extra `redis-server` arguments (later ones win).
    pub fn start_with(extra: &[&str]) -> Self {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut dir = tempfile::tempdir().expect("temp dir");
        let mut last = String::new();
        // A free port can be taken between probing and binding: then try another.
        for _ in 0..10 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let mut server = RedisServer { child: None, extra: extra.clone(), port, dir };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => {
                    last = e;
                    dir = server.take_dir();
                }
            }
        }
        panic!("could not start redis-server: {last}");
    }

    fn take_dir(mut self) -> tempfile::TempDir {
        self.stop();
        std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"))
    }

    fn spawn(&mut self) -> Result<(), String> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            // No other port will help: fail at once, saying what to install.
            Err(e) if e.kind() == ErrorKind::NotFound => {
                panic!("redis-server is not on PATH (`make setup` installs it): {e}")
            }
            Err(e) => return Err(format!("spawn redis-server: {e}")),
        };
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(format!("redis-server exited with {status}"));
            }
            if self.ping() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("redis-server did not answer PING within {START_TIMEOUT:?}"))
    }

    /// Whether the server answers `PING` now.
    pub fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut reply = [0u8; 5];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut reply).is_ok() && reply == *b"+PONG"
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// Kills the server without letting it save (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        self.stop();
    }

    /// Starts it again on the same port and data directory (replaying the AOF).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn().expect("redis-server restarts");
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_until_killed_and_keeps_its_port_on_restart() {
        let mut redis = RedisServer::start();
        assert!(redis.ping());
        let port = redis.port();
        redis.kill();
        assert!(!redis.ping(), "a killed server still answers");
        redis.restart();
        assert_eq!(redis.port(), port);
        assert!(redis.ping());
    }

    #[test]
    fn drop_stops_the_server() {
        let redis = RedisServer::ephemeral();
        let port = redis.port();
        drop(redis);
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "port {port} still served");
    }
}
