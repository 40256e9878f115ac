//! Shared support for every integration test (not a test target itself). Each test file
//! compiles this module on its own (`mod common;`), so most files use only part of it.
//!
//! - [`server`]: the `stevedore` binary on a temporary store, command-line arguments only.
//! - [`stevedore`]: the binary on a config file, its JSON access log captured; config helpers.
//! - [`data`]: deterministic bytes, digests, a small PRNG.
//! - [`http`]: the loopback reqwest client, response reading and checks, and a strict
//!   distribution-spec client ([`http::Registry`]).
//! - [`oci`]: images (gzip ustar layers, config, manifest, index) and OCI image layouts.
//! - [`push`]: pushing blobs, manifests and images to a registry.
//! - [`distribution`]: CNCF Distribution (`docker-registry`) as a real upstream.
//! - [`fake`]: a scripted fake upstream (axum, in process).
//! - [`store`]: checks on Stevedore's on-disk store.
//! - [`tls`]: a test CA and a server certificate for 127.0.0.1 (rcgen), an HTTPS probe.
//! - [`proc`]: daemons, bounded commands, required tools, the engine sandbox.
//! - [`engines`]: containerd, dockerd and podman; [`skopeo_cli`]: isolated skopeo runs.
#![allow(dead_code)]

pub mod data;
pub mod distribution;
pub mod engines;
pub mod fake;
pub mod http;
pub mod oci;
pub mod proc;
pub mod push;
pub mod server;
pub mod skopeo_cli;
pub mod stevedore;
pub mod store;
pub mod tls;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use server::Server;

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
