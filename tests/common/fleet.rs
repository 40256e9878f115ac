//! Several Stevedore replicas on one S3 bucket (moto), coordinated through one Redis, in
//! front of one upstream: the replica tests' set-up. Every replica is started by the one
//! launcher ([`super::stevedore::Builder`]) with its own scratch root, the bucket of the
//! fleet's first root ([`super::stevedore::Builder::bucket_of`]), and
//! `cluster.advertise` naming the port it listens on.

use std::path::PathBuf;

use super::proc;
use super::redis::Redis;
use super::s3::Backend;
use super::stevedore::{config, Stevedore};

/// The fleet's shared secret (`cluster.secret`).
pub const SECRET: &str = "fleet-secret-0123456789abcdef";

pub struct Fleet {
    pub redis: Option<Redis>,
    /// The upstream's `host:port` (also its endpoint on loopback).
    pub upstream: String,
    /// Extra TOML appended to every replica's config.
    pub extra: String,
    dir: tempfile::TempDir,
    /// Each replica's port and root, by index (kept across restarts).
    slots: Vec<(u16, PathBuf)>,
    pub replicas: Vec<Option<Stevedore>>,
}

impl Fleet {
    /// `n` replicas with Redis in front of `upstream` (`127.0.0.1:PORT`).
    pub fn start(n: usize, upstream: &str, extra: &str) -> Fleet {
        Fleet::start_with(n, upstream, extra, true)
    }

    /// As [`Fleet::start`]; without Redis when `redis` is false.
    pub fn start_with(n: usize, upstream: &str, extra: &str, redis: bool) -> Fleet {
        let dir = tempfile::Builder::new().prefix("fleet-").tempdir().expect("tempdir");
        let slots = (0..n).map(|i| (proc::closed_port(), dir.path().join(format!("r{i}")))).collect();
        let mut f = Fleet {
            redis: redis.then(Redis::start),
            upstream: upstream.to_string(),
            extra: extra.to_string(),
            dir,
            slots,
            replicas: Vec::new(),
        };
        for i in 0..n {
            let r = f.spawn(i);
            f.replicas.push(Some(r));
        }
        f
    }

    /// The config replica `i` runs on.
    pub fn config_of(&self, i: usize) -> String {
        let (port, _) = &self.slots[i];
        let mut c = config(&self.upstream, &[(&self.upstream, &format!("http://{}", self.upstream), "")]);
        if let Some(r) = &self.redis {
            c.push_str(&format!("\n[redis]\nurl = \"{}\"\ntimeout = \"1s\"\n", r.url()));
        }
        c.push_str(&format!(
            "\n[cluster]\nsecret = \"{SECRET}\"\nadvertise = \"http://127.0.0.1:{port}\"\nlease_ttl = \"3s\"\nheartbeat_interval = \"1s\"\n"
        ));
        c.push_str(&self.extra);
        c
    }

    /// Starts replica `i` (on its port, root and the fleet's bucket); panics if it does not
    /// start.
    pub fn spawn(&self, i: usize) -> Stevedore {
        self.try_spawn(i, &self.config_of(i)).unwrap_or_else(|log| panic!("replica {i}: {log}"))
    }

    /// Starts replica `i` on `config`; `Err` with its log when it exits during start-up.
    pub fn try_spawn(&self, i: usize, config: &str) -> Result<Stevedore, String> {
        let (port, root) = &self.slots[i];
        std::fs::create_dir_all(root).unwrap();
        Stevedore::builder()
            .backend(Backend::S3)
            .dir(&self.dir.path().join(format!("d{i}")))
            .root(root)
            .bucket_of(&self.slots[0].1)
            .port(*port)
            .config(config)
            .try_start()
    }

    /// Adds a replica slot (not started) and returns its index.
    pub fn add_slot(&mut self) -> usize {
        let i = self.slots.len();
        self.slots.push((proc::closed_port(), self.dir.path().join(format!("r{i}"))));
        self.replicas.push(None);
        i
    }

    /// Replica `i`, running.
    pub fn at(&self, i: usize) -> &Stevedore {
        self.replicas[i].as_ref().expect("replica is running")
    }

    /// SIGKILLs replica `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut r) = self.replicas[i].take() {
            r.kill();
        }
    }

    /// Starts replica `i` again (after [`Fleet::kill`]).
    pub fn restart(&mut self, i: usize) {
        assert!(self.replicas[i].is_none(), "replica {i} still runs");
        let r = self.spawn(i);
        self.replicas[i] = Some(r);
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn root_of(&self, i: usize) -> &PathBuf {
        &self.slots[i].1
    }
}
