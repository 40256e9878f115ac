//! Memory bound: 1 GiB blobs go through the server in bounded memory.
//!
//! The bytes are generated on the fly and streamed (`reqwest::Body::wrap_stream`); neither the
//! test nor the server may hold a blob in memory. One blob is pushed as `POST` + a single
//! `PUT` carrying the whole body, one as 64 MiB `PATCH`es; both are pulled back streaming
//! through SHA-256, and the server's peak RSS (VmHWM) must stay under 64 MiB.
//!
//! `tests/memory_s3.rs` runs the same on the S3 backend (moto). moto keeps every object in
//! Python's memory and is slow for big ones, so there the blobs are [`S3_BLOB`] unless
//! `STEVEDORE_S3_MEMORY_MIB` says otherwise (1024 for the full 1 GiB); and many concurrent
//! uploads must stay within the configured part budget.

mod common;

use common::data;
use common::http::Registry;
use common::s3::{suite_backend, Backend};
use common::Stevedore;
use reqwest::{Body, StatusCode};
use std::time::Instant;

const CHUNK: u64 = 64 << 20;
/// The blob size on S3 (moto), by default.
const S3_BLOB: u64 = 256 << 20;

/// The size of each blob moved: 1 GiB on the filesystem.
fn blob_size() -> u64 {
    match suite_backend() {
        Backend::Fs => 1 << 30,
        Backend::S3 => std::env::var("STEVEDORE_S3_MEMORY_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(|m: u64| m << 20)
            .unwrap_or(S3_BLOB),
    }
}
const HWM_LIMIT: u64 = 64 << 20;

fn mib(n: u64) -> f64 {
    n as f64 / (1 << 20) as f64
}

async fn pull_and_check(reg: &Registry, repo: &str, digest: &str) {
    let size = blob_size();
    let (st, cl, n, got) = reg.try_get_blob_hashed(repo, digest).await.expect("GET blob");
    assert_eq!(st, StatusCode::OK, "GET /v2/{repo}/blobs/{digest}");
    assert_eq!(cl, Some(size), "Content-Length of the blob");
    assert_eq!(n, size, "bytes received");
    assert_eq!(got, digest, "digest of the bytes pulled back");
}

#[test]
fn one_gib_blobs_stream_through_in_bounded_memory() {
    let t0 = Instant::now();
    let size = blob_size();
    eprintln!("memory: {:?} backend, blobs of {} MiB", suite_backend(), size >> 20);
    let server = Stevedore::local();
    // A 1 GiB request may take minutes on a busy machine.
    let reg = Registry::with_timeout(&server.url(""), std::time::Duration::from_secs(180));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (seed_mono, seed_chunked) = (0x5eed_0001, 0x5eed_0002);

    // Digests first (computed from the generator, in 1 MiB pieces, in parallel).
    let h1 = std::thread::spawn(move || data::stream_digest(seed_mono, 0, size));
    let h2 = std::thread::spawn(move || data::stream_digest(seed_chunked, 0, size));
    let (digest_mono, digest_chunked) = (h1.join().unwrap(), h2.join().unwrap());
    eprintln!("memory: digests computed at {:.1} s", t0.elapsed().as_secs_f64());

    rt.block_on(async {
        // POST, then one PUT with the whole body.
        let loc = reg.try_start_upload("mem/mono").await.expect("POST upload");
        let body = Body::wrap_stream(data::byte_stream(seed_mono, 0, size));
        reg.try_finish(&loc, &digest_mono, Some((size, body))).await.expect("PUT the whole blob");
        eprintln!(
            "memory: monolithic push done at {:.1} s, VmHWM {:.1} MiB",
            t0.elapsed().as_secs_f64(),
            mib(server.vm_hwm())
        );

        // POST, 16 PATCHes of 64 MiB, PUT ?digest=.
        let mut loc = reg.try_start_upload("mem/chunked").await.expect("POST upload");
        let mut off = 0;
        while off < size {
            let body = Body::wrap_stream(data::byte_stream(seed_chunked, off, CHUNK.min(size - off)));
            let (nl, stored) = reg.try_patch(&loc, off, CHUNK.min(size - off), body).await.expect("PATCH a chunk");
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
        "server peak RSS (VmHWM) {:.1} MiB is not under {} MiB while moving {} MiB blobs",
        mib(hwm),
        mib(HWM_LIMIT),
        size >> 20
    );
}

/// On S3, parts wait for the process-wide budget: 24 sessions each receiving a 12 MiB PATCH at
/// once (5 MiB parts, each in memory while it is sent) in a server whose budget is 10 MiB (two
/// parts) stay far below what 24 sessions × a part would take. On the filesystem there is no
/// part buffer: the same load checks that nothing is held per session either.
#[test]
fn many_concurrent_uploads_stay_within_the_part_budget() {
    const SESSIONS: u64 = 24;
    const BLOB: u64 = 12 << 20;
    const LIMIT: u64 = 64 << 20;
    let mut b = Stevedore::builder();
    if suite_backend() == Backend::S3 {
        b = b.s3_setting("buffer_memory = \"10MiB\"");
    }
    let server = b.start();
    let reg = Registry::with_timeout(&server.url(""), std::time::Duration::from_secs(180));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let pushes = (0..SESSIONS).map(|i| {
            let reg = reg.clone();
            async move {
                let seed = 0xb0d9_e700 + i;
                let digest = data::stream_digest(seed, 0, BLOB);
                let loc = reg.try_start_upload("mem/many").await.expect("POST upload");
                let body = Body::wrap_stream(data::byte_stream(seed, 0, BLOB));
                let (loc, stored) = reg.try_patch(&loc, 0, BLOB, body).await.expect("PATCH");
                assert_eq!(stored, BLOB);
                reg.try_finish(&loc, &digest, None).await.expect("PUT ?digest");
                digest
            }
        });
        let digests = futures::future::join_all(pushes).await;
        for d in &digests {
            let (st, _, n, got) = reg.try_get_blob_hashed("mem/many", d).await.expect("GET blob");
            assert_eq!((st, n, &got), (StatusCode::OK, BLOB, d));
        }
    });
    let hwm = server.vm_hwm();
    eprintln!("memory: {SESSIONS} concurrent uploads, server VmHWM {:.1} MiB", mib(hwm));
    assert!(hwm < LIMIT, "server peak RSS {:.1} MiB with {SESSIONS} concurrent uploads", mib(hwm));
}
