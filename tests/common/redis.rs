//! Redis for the replica tests: Debian's `redis-server` (installed by
//! `scripts/install-test-deps.sh`) on 127.0.0.1 on a free port, no persistence, its own
//! directory; stopped and started again on the same port to test a Redis restart.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use super::proc::{self, Daemon};

pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    daemon: Option<Daemon>,
    starts: u32,
}

impl Redis {
    /// Starts `redis-server` on a free port; panics (with the install hint) if it is missing.
    pub fn start() -> Redis {
        let dir = tempfile::Builder::new().prefix("redis-").tempdir().expect("tempdir").keep();
        let mut r = Redis { port: proc::closed_port(), dir, daemon: None, starts: 0 };
        r.up();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts the server (again) on its port and waits for `PING`.
    pub fn up(&mut self) {
        assert!(self.daemon.is_none(), "redis is already running");
        let bin = proc::tool("redis-server");
        self.starts += 1;
        let log = self.dir.join(format!("redis-{}.log", self.starts));
        let mut cmd = proc::with_pdeathsig(bin);
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        cmd.args(["--dir", self.dir.to_str().unwrap(), "--protected-mode", "no"]);
        let mut d = Daemon::spawn("redis-server", cmd, &log);
        let port = self.port;
        d.wait_ready(Duration::from_secs(20), || ping(port));
        self.daemon = Some(d);
    }

    /// SIGKILLs the server: everything it held is gone (no persistence).
    pub fn kill(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
    }

    /// One command (RESP arrays of bulk strings); the raw reply.
    pub fn command(&self, args: &[&str]) -> String {
        command(self.port, args).unwrap_or_else(|| panic!("redis on port {} did not answer {args:?}", self.port))
    }

    /// Keys matching `pattern`.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let reply = self.command(&["KEYS", pattern]);
        // *N\r\n$len\r\nkey\r\n...
        reply
            .split("\r\n")
            .skip(1)
            .collect::<Vec<_>>()
            .chunks(2)
            .filter_map(|c| c.get(1).map(|s| s.to_string()))
            .filter(|s| !s.is_empty())
            .collect()
    }
}

fn ping(port: u16) -> bool {
    command(port, &["PING"]).is_some_and(|r| r.starts_with("+PONG"))
}

fn command(port: u16, args: &[&str]) -> Option<String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = vec![0u8; 1 << 16];
    let n = s.read(&mut buf).ok()?;
    (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).into_owned())
}
