//! Shared support for every integration test (not a test target itself). Each test file
//! compiles this module on its own (`mod common;`), so most files use only part of it.
//!
//! - [`stevedore`]: the one launcher ([`stevedore::Stevedore`]): the real binary on a config
//!   file or on command-line arguments only, a given store root, its logs captured; config
//!   helpers.
//! - [`data`]: deterministic bytes, digests, a small PRNG.
//! - [`http`]: the loopback reqwest client, response reading and checks, and the one
//!   distribution-spec client ([`http::Registry`]: raw requests, strict flows, pushes).
//! - [`oci`]: images (gzip ustar layers, config, manifest, index) and OCI image layouts.
//! - [`distribution`]: CNCF Distribution (`docker-registry`) as a real upstream.
//! - [`fleet`]: several replicas on one bucket with Redis, in front of one upstream.
//! - [`fake`]: a scripted fake upstream (axum, in process).
//! - [`store`]: checks on Stevedore's on-disk store.
//! - [`redis`]: Debian's `redis-server` for the replica tests (start, kill, start again).
//! - [`s3`]: moto (S3) for the `*_s3` twin binaries, and checks on a store's bucket.
//! - [`tls`]: a test CA and server and client certificates for 127.0.0.1 (rcgen), an HTTPS
//!   probe, the certificate a new connection is served, a cert-dir (`ca.crt`) for clients.
//! - [`pause`]: the binary's named pause points (feature `test-hooks`), from the test side.
//! - [`proc`]: daemons, bounded commands, required tools, the engine sandbox.
//! - [`engines`]: containerd, dockerd and podman; [`skopeo_cli`]: isolated skopeo runs.
#![allow(dead_code)]

pub mod data;
pub mod distribution;
pub mod engines;
pub mod fake;
pub mod fleet;
pub mod http;
pub mod oci;
pub mod pause;
pub mod proc;
pub mod redis;
pub mod s3;
pub mod skopeo_cli;
pub mod stevedore;
pub mod store;
pub mod tls;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use stevedore::Stevedore;

/// A small runtime for async helpers called from synchronous tests (pushing, probes).
pub fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("tokio runtime")
    })
}

/// Polls `cond` every 20 ms until it holds or `limit` passes; returns whether it held.
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`wait_until`] with an async condition (a request): polls `cond` every 20 ms until it
/// holds or `limit` passes; returns whether it held.
pub async fn wait_until_async<F: std::future::Future<Output = bool>>(
    limit: Duration,
    mut cond: impl FnMut() -> F,
) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`wait_until`] for synchronous code: polls `cond` every 10 ms until it holds or `limit`
/// passes; returns whether it held.
pub fn wait_until_blocking(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for a log to settle: until `probe` reports `(ready, length)` with `ready` true and
/// the same `length` for `quiet` (a log still being written keeps growing). Polls every
/// 10 ms; panics after `limit`.
pub fn wait_log_settled(limit: Duration, quiet: Duration, mut probe: impl FnMut() -> (bool, usize), what: &str) {
    let end = Instant::now() + limit;
    let (mut last, mut since) = (None, Instant::now());
    loop {
        let (ready, len) = probe();
        if last != Some(len) {
            (last, since) = (Some(len), Instant::now());
        } else if ready && since.elapsed() >= quiet {
            return;
        }
        assert!(Instant::now() < end, "{what} did not settle within {limit:?} (ready: {ready}, length {len})");
        std::thread::sleep(Duration::from_millis(10));
    }
}
