//! Memory bound: 1 GiB blobs go through the server in bounded memory.
//!
//! The bytes are generated on the fly and streamed (`reqwest::Body::wrap_stream`); neither the
//! test nor the server may hold a blob in memory. One blob is pushed as `POST` + a single
//! `PUT` carrying the whole body, one as 64 MiB `PATCH`es; both are pulled back streaming
//! through SHA-256, and the server's peak RSS (VmHWM) must stay under 64 MiB.

mod common;

use common::data;
use common::http::Registry;
use common::Stevedore;
use reqwest::{Body, StatusCode};
use std::time::Instant;

const GIB: u64 = 1 << 30;
const CHUNK: u64 = 64 << 20;
const HWM_LIMIT: u64 = 64 << 20;

fn mib(n: u64) -> f64 {
    n as f64 / (1 << 20) as f64
}

async fn pull_and_check(reg: &Registry, repo: &str, digest: &str) {
    let (st, cl, n, got) = reg.try_get_blob_hashed(repo, digest).await.expect("GET blob");
    assert_eq!(st, StatusCode::OK, "GET /v2/{repo}/blobs/{digest}");
    assert_eq!(cl, Some(GIB), "Content-Length of the 1 GiB blob");
    assert_eq!(n, GIB, "bytes received");
    assert_eq!(got, digest, "digest of the bytes pulled back");
}

#[test]
fn one_gib_blobs_stream_through_in_bounded_memory() {
    let t0 = Instant::now();
    let server = Stevedore::local();
    // A 1 GiB request may take minutes on a busy machine.
    let reg = Registry::with_timeout(&server.url(""), std::time::Duration::from_secs(180));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (seed_mono, seed_chunked) = (0x5eed_0001, 0x5eed_0002);

    // Digests first (computed from the generator, in 1 MiB pieces, in parallel).
    let h1 = std::thread::spawn(move || data::stream_digest(seed_mono, 0, GIB));
    let h2 = std::thread::spawn(move || data::stream_digest(seed_chunked, 0, GIB));
    let (digest_mono, digest_chunked) = (h1.join().unwrap(), h2.join().unwrap());
    eprintln!("memory: digests computed at {:.1} s", t0.elapsed().as_secs_f64());

    rt.block_on(async {
        // POST, then one PUT with the whole body.
        let loc = reg.try_start_upload("mem/mono").await.expect("POST upload");
        let body = Body::wrap_stream(data::byte_stream(seed_mono, 0, GIB));
        reg.try_finish(&loc, &digest_mono, Some((GIB, body))).await.expect("PUT 1 GiB");
        eprintln!(
            "memory: monolithic push done at {:.1} s, VmHWM {:.1} MiB",
            t0.elapsed().as_secs_f64(),
            mib(server.vm_hwm())
        );

        // POST, 16 PATCHes of 64 MiB, PUT ?digest=.
        let mut loc = reg.try_start_upload("mem/chunked").await.expect("POST upload");
        let mut off = 0;
        while off < GIB {
            let body = Body::wrap_stream(data::byte_stream(seed_chunked, off, CHUNK));
            let (nl, stored) = reg.try_patch(&loc, off, CHUNK, body).await.expect("PATCH 64 MiB");
            loc = nl;
            off = stored;
        }
        reg.try_finish(&loc, &digest_chunked, None).await.expect("PUT ?digest");
        eprintln!(
            "memory: chunked push done at {:.1} s, VmHWM {:.1} MiB",
            t0.elapsed().as_secs_f64(),
            mib(server.vm_hwm())
        );

        // Pull both back concurrently, hashing as the bytes arrive.
        tokio::join!(
            pull_and_check(&reg, "mem/mono", &digest_mono),
            pull_and_check(&reg, "mem/chunked", &digest_chunked)
        );
    });

    let hwm = server.vm_hwm();
    eprintln!("memory: done in {:.1} s, server VmHWM {:.1} MiB", t0.elapsed().as_secs_f64(), mib(hwm));
    assert!(
        hwm < HWM_LIMIT,
        "server peak RSS (VmHWM) {:.1} MiB is not under {} MiB while moving 1 GiB blobs",
        mib(hwm),
        mib(HWM_LIMIT)
    );
}
