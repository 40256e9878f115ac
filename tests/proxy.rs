//! Pull-through cache against a scripted fake upstream (axum on 127.0.0.1:0 inside the test,
//! counting every request): the failure modes and protocol details a real registry will not
//! produce on demand. The real-registry tests are in `tests/proxy_upstream.rs`.
//!
//! Every Stevedore here runs on a config file whose upstreams all point at the fake on
//! loopback (checked by `Stevedore::start`), with `[proxy] default_upstream` set explicitly.

mod common;

use std::time::{Duration, Instant};

use common::data::{bytes, sha256};
use common::fake::{Bearer, Fake, FakeImage, Plan};
use common::http::{
    assert_content, assert_json_error, client, content_length_header, get_manifest, hdr, read, Read, MANIFEST_ACCEPT,
};
use common::oci::{MT_CONFIG, MT_MANIFEST};
use common::stevedore::{config, Dialect, Stevedore, DIALECTS};
use common::store::{ingests_left, stored_blob, stored_blobs, stored_repos};
use common::wait_until;
use serde_json::json;

/// Waits for the fill's spool files (and, on S3, its objects and multipart upload) to be gone,
/// then checks `digest` was not committed.
async fn assert_not_committed(sd: &Stevedore, digest: &str, what: &str) {
    let clean = wait_until(Duration::from_secs(5), || ingests_left(sd).is_empty()).await;
    assert!(clean, "{what}: ingest leftovers: {:?}", ingests_left(sd));
    assert!(stored_blob(sd, digest).is_none(), "{what}: {digest} was committed under blobs/");
    assert!(!stored_blobs(sd).iter().any(|f| f == digest), "{what}: {digest} listed under blobs/");
}

/// Waits for `digest` to be committed and checks the stored bytes' hash.
async fn assert_committed(sd: &Stevedore, digest: &str, what: &str) {
    let there = wait_until(Duration::from_secs(20), || stored_blob(sd, digest).is_some()).await;
    assert!(there, "{what}: {digest} never appeared under blobs/");
    let data = stored_blob(sd, digest).unwrap();
    assert_eq!(sha256(&data), digest, "{what}: committed file hash");
}

/// Waits until a HEAD of the blob at `url` answers from the cache (`x-stevedore-cache: hit`).
/// A fill commits after its last byte went out, and a request before the commit joins the
/// fill (`joined`) instead of hitting the cache: a test that asserts `hit` waits for this
/// first. (Before the commit, a HEAD is answered with an upstream HEAD, never a GET.)
async fn wait_cached(http: &reqwest::Client, url: &str, what: &str) {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let h = read(http.head(url)).await;
        if h.status == 200 && h.cache() == "hit" {
            return;
        }
        assert!(
            Instant::now() < end,
            "{what}: {url} not served from the cache within 20 s (last HEAD: {} {:?})",
            h.status,
            h.cache()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An upstream that sends wrong bytes for a digest: the client never gets a complete body,
/// nothing is committed, and the next request starts a fresh fill that succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_upstream_bytes_are_never_served_whole_nor_committed_and_the_next_request_refills() {
    let fake = Fake::start().await;
    let sd = Stevedore::start(&config("up.test", &[("up.test", &fake.url(), "")]));
    let http = client();
    for (seed, chunked) in [(101u64, false), (102, true)] {
        let what = if chunked { "wrong bytes, chunked" } else { "wrong bytes, Content-Length" };
        let good = bytes(seed, 2_500_000);
        let d = fake.add_blob(&good);
        let mut bad = good.clone();
        for b in &mut bad[2_000_000..2_000_064] {
            *b ^= 0xff;
        }
        let mut plan = Plan::new(bad).slow(256 * 1024, Duration::from_millis(5));
        if chunked {
            plan = plan.chunked();
        }
        fake.plan(&d, plan);
        fake.plan(&d, Plan::new(good.clone()));
        let path = format!("/v2/team/app/blobs/{d}?ns=up.test");
        let upstream_path = format!("/v2/team/app/blobs/{d}");

        let r = read(http.get(sd.url(&path))).await;
        if (200..300).contains(&r.status) {
            assert!(
                r.error.is_some(),
                "{what}: a complete {}-byte body (hashing to {}) was served for {d} although \
                 the upstream sent wrong bytes",
                r.body.len(),
                sha256(&r.body)
            );
            assert!(r.body.len() <= good.len(), "{what}: more bytes than the blob");
            if !chunked {
                assert!(
                    r.body.len() < good.len(),
                    "{what}: the whole announced length was delivered before verification"
                );
            }
        } else {
            assert!(r.status >= 400 && r.status != 500, "{what}: status {} ({})", r.status, r.text());
        }
        assert_eq!(fake.count("GET", &upstream_path), 1, "{what}: upstream GETs");
        assert_not_committed(&sd, &d, what).await;

        // The failed fill is gone: the next request starts a fresh one, which succeeds.
        let r = read(http.get(sd.url(&path))).await;
        assert_content(&r, &d, &good, &format!("{what}: second request"));
        assert_eq!(r.cache(), "miss", "{what}: second request outcome");
        assert_eq!(fake.count("GET", &upstream_path), 2, "{what}: the second request must start a new upstream GET");
        assert_committed(&sd, &d, what).await;
    }
}

/// A manifest whose bytes do not match the digest the upstream names (by digest, or in
/// `Docker-Content-Digest` for a tag) is refused and not cached; once the upstream is
/// fixed, the next request fetches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_manifest_bytes_are_refused_and_not_cached() {
    let fake = Fake::start().await;
    let sd = Stevedore::start(&config("up.test", &[("up.test", &fake.url(), "")]));
    let http = client();
    let img = fake.add_image("team/app", "latest", 111, &[1000]);
    let other = fake.add_image("team/scratch", "latest", 112, &[1000]);
    fake.add_manifest_as(&img.digest, MT_MANIFEST, &other.manifest);
    let by_digest = sd.url(&Dialect::Ns.path("up.test", "team/app", &format!("manifests/{}", img.digest)));
    let by_tag = sd.url(&Dialect::Ns.path("up.test", "team/app", "manifests/latest"));
    for (what, url) in [("by digest", &by_digest), ("by tag", &by_tag)] {
        let r = get_manifest(&http, url.clone()).await;
        assert_json_error(&r, 502, "UNAVAILABLE", &format!("wrong manifest bytes {what}"));
    }
    assert!(stored_blobs(&sd).is_empty(), "wrong manifest bytes were stored");
    assert!(stored_repos(&sd).is_empty(), "wrong manifest bytes were recorded");

    fake.add_manifest(MT_MANIFEST, &img.manifest);
    let r = get_manifest(&http, by_tag).await;
    assert_content(&r, &img.digest, &img.manifest, "by tag once the upstream is fixed");
    assert_eq!(r.cache(), "miss");
    let r = get_manifest(&http, by_digest).await;
    assert_content(&r, &img.digest, &img.manifest, "by digest once the upstream is fixed");
    assert_eq!(r.cache(), "hit");
}

/// The upstream connection breaks mid-blob: the client's stream breaks, nothing is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_dropped_mid_blob_breaks_the_client_stream_and_commits_nothing() {
    let fake = Fake::start().await;
    let sd = Stevedore::start(&config("up.test", &[("up.test", &fake.url(), "")]));
    let http = client();
    let good = bytes(201, 3_000_000);
    let d = fake.add_blob(&good);
    fake.plan(&d, Plan::new(good.clone()).slow(256 * 1024, Duration::from_millis(20)).drop_after(1_500_000));
    let path = format!("/v2/up.test/team/app/blobs/{d}");
    let r = read(http.get(sd.url(&path))).await;
    if (200..300).contains(&r.status) {
        assert!(
            r.error.is_some(),
            "the client got a clean end ({} bytes) although the upstream dropped the connection",
            r.body.len()
        );
        assert!(r.body.len() <= 1_500_000, "more bytes than the upstream sent");
        assert!(good.starts_with(&r.body), "the bytes served are not the upstream's");
    } else {
        assert!(r.status >= 400 && r.status != 500, "status {} ({})", r.status, r.text());
    }
    assert_eq!(fake.count("GET", &format!("/v2/team/app/blobs/{d}")), 1);
    assert_not_committed(&sd, &d, "dropped connection").await;

    let r = read(http.get(sd.url(&path))).await;
    assert_content(&r, &d, &good, "after the drop");
    assert_eq!(fake.count("GET", &format!("/v2/team/app/blobs/{d}")), 2);
    assert_committed(&sd, &d, "after the drop").await;
}

/// 16 clients (all three dialects) ask for one slow 8 MiB blob at once: one upstream GET,
/// everyone gets the right bytes, and followers stream before the fill has finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_clients_share_one_slow_fill_and_stream_before_it_ends() {
    let fake = Fake::start().await;
    let sd = Stevedore::start(&config("up.test", &[("up.test", &fake.url(), "")]));
    let http = client();
    let data = bytes(301, 8 << 20);
    let d = fake.add_blob(&data);
    // 32 chunks of 256 KiB, 80 ms apart: about 2.5 s.
    fake.plan(&d, Plan::new(data.clone()).slow(256 * 1024, Duration::from_millis(80)));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let dialect = DIALECTS[i % 3];
        let url = sd.url(&dialect.path("up.test", "team/app", &format!("blobs/{d}")));
        let http = http.clone();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            (dialect, started, read(http.get(url)).await)
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    assert_eq!(
        fake.count("GET", &format!("/v2/team/app/blobs/{d}")),
        1,
        "upstream GETs for one blob asked by 16 clients:\n  {}",
        fake.dump()
    );
    let ends = fake.sent_all(&d);
    assert_eq!(ends.len(), 1, "complete upstream answers");
    let fill_end = ends[0];
    let mut outcomes = Vec::new();
    for (i, (dialect, started, r)) in results.iter().enumerate() {
        let what = format!("client {i} ({dialect:?})");
        assert!(*started < fill_end, "{what} started after the fill ended");
        assert_content(r, &d, &data, &what);
        let first = r.first_byte.expect("no body bytes");
        assert!(
            first < fill_end,
            "{what}: first bytes arrived {:?} after the upstream sent its last byte",
            first - fill_end
        );
        outcomes.push(r.cache());
    }
    let misses = outcomes.iter().filter(|o| *o == "miss").count();
    let joined = outcomes.iter().filter(|o| *o == "joined").count();
    assert_eq!((misses, joined), (1, 15), "x-stevedore-cache outcomes: {outcomes:?}");
    assert_committed(&sd, &d, "shared fill").await;
}

/// A client hanging up mid-fill does not stop the fill: the blob is committed, and the next
/// GET is a hit without another upstream GET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_hanging_up_mid_fill_still_commits_the_blob() {
    use futures::StreamExt;
    let fake = Fake::start().await;
    let sd = Stevedore::start(&config("up.test", &[("up.test", &fake.url(), "")]));
    let http = client();
    // 6 MiB in 128 KiB chunks 50 ms apart: about 2.3 s; readers see bytes after the first MiB.
    let data = bytes(401, 6 << 20);
    let d = fake.add_blob(&data);
    fake.plan(&d, Plan::new(data.clone()).slow(128 * 1024, Duration::from_millis(50)));
    let path = format!("/v2/team/app/blobs/{d}?ns=up.test");
    let resp = http.get(sd.url(&path)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut stream = resp.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match stream.next().await {
                Some(Ok(c)) if c.is_empty() => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("no first chunk within 15 s");
    assert!(matches!(first, Some(Ok(_))), "first chunk: {first:?}");
    drop(stream);
    let hung_up = Instant::now();

    assert_committed(&sd, &d, "after the hang-up").await;
    let ends = fake.sent_all(&d);
    assert_eq!(ends.len(), 1);
    assert!(
        hung_up < ends[0],
        "the client hung up only after the upstream had sent everything; not a mid-fill hang-up"
    );
    let r = read(http.get(sd.url(&path))).await;
    assert_content(&r, &d, &data, "after the hang-up");
    assert_eq!(r.cache(), "hit");
    assert_eq!(fake.count("GET", &format!("/v2/team/app/blobs/{d}")), 1, "upstream GETs");
}

/// Range requests on a miss: joining a running fill, and starting one. The upstream is
/// always asked for the whole blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_requests_on_a_miss_get_exactly_the_requested_bytes() {
    let fake = Fake::start().await;
    let sd = Stevedore::start(&config("up.test", &[("up.test", &fake.url(), "")]));
    let http = client();
    let n = 4usize << 20;

    // A: a full GET starts the fill; a Range request joins it while it runs.
    let a = bytes(501, n);
    let da = fake.add_blob(&a);
    // 32 chunks 60 ms apart: about 1.9 s.
    fake.plan(&da, Plan::new(a.clone()).slow(128 * 1024, Duration::from_millis(60)));
    let url_a = sd.url(&format!("/v2/team/app/blobs/{da}?ns=up.test"));
    let leader = {
        let (http, url) = (http.clone(), url_a.clone());
        tokio::spawn(async move { read(http.get(url)).await })
    };
    let upstream_a = format!("/v2/team/app/blobs/{da}");
    assert!(
        wait_until(Duration::from_secs(10), || fake.count("GET", &upstream_a) == 1).await,
        "the fill never started"
    );
    let sent = Instant::now();
    let r = read(http.get(&url_a).header("range", "bytes=100-199")).await;
    assert!(
        fake.sent_all(&da).first().is_none_or(|end| sent < *end),
        "the Range request was sent after the fill ended"
    );
    assert_eq!(r.status, 206, "Range on a running fill: {}", r.text());
    assert!(r.error.is_none(), "{:?}", r.error);
    assert_eq!(r.cache(), "joined");
    assert_eq!(hdr(&r.headers, "content-range").as_deref(), Some(format!("bytes 100-199/{n}").as_str()));
    assert_eq!(content_length_header(&r.headers), Some(100));
    assert!(r.body == a[100..200], "Range bytes differ");
    let full = leader.await.unwrap();
    assert_content(&full, &da, &a, "leader of A");

    // B: a Range request starts the fill itself; the whole blob is still committed.
    let b = bytes(502, n);
    let db = fake.add_blob(&b);
    fake.plan(&db, Plan::new(b.clone()).slow(256 * 1024, Duration::from_millis(20)));
    let url_b = sd.url(&format!("/v2/up.test/team/app/blobs/{db}"));
    let r = read(http.get(&url_b).header("range", "bytes=100-199")).await;
    assert_eq!(r.status, 206, "Range starting a fill: {}", r.text());
    assert!(r.error.is_none(), "{:?}", r.error);
    assert_eq!(r.cache(), "miss");
    assert_eq!(hdr(&r.headers, "content-range").as_deref(), Some(format!("bytes 100-199/{n}").as_str()));
    assert!(r.body == b[100..200], "Range bytes differ");
    assert_committed(&sd, &db, "blob B").await;

    // C: a suffix range on a miss (reaches the blob's end, so it completes after the commit).
    let c = bytes(503, n);
    let dc = fake.add_blob(&c);
    let r = read(http.get(sd.url(&format!("/v2/team/app/blobs/{dc}?ns=up.test"))).header("range", "bytes=-100")).await;
    assert_eq!(r.status, 206, "suffix Range on a miss: {}", r.text());
    assert!(r.error.is_none(), "{:?}", r.error);
    assert_eq!(hdr(&r.headers, "content-range").as_deref(), Some(format!("bytes {}-{}/{n}", n - 100, n - 1).as_str()));
    assert!(r.body == c[n - 100..], "suffix Range bytes differ");
    assert_committed(&sd, &dc, "blob C").await;

    for d in [&da, &db, &dc] {
        assert_eq!(fake.count("GET", &format!("/v2/team/app/blobs/{d}")), 1, "upstream GETs for {d}");
    }
    assert_eq!(fake.count_where(|r| r.range.is_some()), 0, "Stevedore sent a Range upstream:\n  {}", fake.dump());
}

/// HEAD on a missing blob is a HEAD upstream (no download), answered with the size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_blob_on_a_miss_asks_upstream_with_head_not_get() {
    let fake = Fake::start().await;
    let sd = Stevedore::start(&config("up.test", &[("up.test", &fake.url(), "")]));
    let http = client();
    let data = bytes(601, 1_234_567);
    let d = fake.add_blob(&data);
    let upstream = format!("/v2/team/app/blobs/{d}");
    for dialect in DIALECTS {
        let url = sd.url(&dialect.path("up.test", "team/app", &format!("blobs/{d}")));
        let r = read(http.head(url)).await;
        assert_eq!(r.status, 200, "HEAD {dialect:?}");
        assert_eq!(content_length_header(&r.headers), Some(data.len() as u64), "HEAD {dialect:?}: Content-Length");
        assert_eq!(hdr(&r.headers, "docker-content-digest").as_deref(), Some(d.as_str()));
        assert!(r.body.is_empty());
    }
    assert_eq!(fake.count("GET", &upstream), 0, "HEAD made an upstream GET");
    // The upstream's answer is reused for head_cache_ttl (30 s here).
    assert_eq!(fake.count("HEAD", &upstream), 1, "upstream HEADs:\n  {}", fake.dump());
    assert!(stored_blob(&sd, &d).is_none(), "HEAD downloaded the blob");

    let missing = sha256(b"not upstream");
    let r = read(http.head(sd.url(&format!("/v2/team/app/blobs/{missing}?ns=up.test")))).await;
    assert_eq!(r.status, 404, "HEAD of a blob the upstream lacks");
    assert_eq!(fake.count("HEAD", &format!("/v2/team/app/blobs/{missing}")), 1);
    assert_eq!(fake.count_where(|r| r.method == "GET"), 0);
}

/// The upstream answers 503, then is gone: a tag cached earlier is served stale with a
/// Warning; by-digest manifests and blobs are served without asking the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_outage_serves_cached_tags_stale_and_digests_without_contact() {
    let mut fake = Fake::start().await;
    let sd = Stevedore::start(&config("up.test", &[("up.test", &fake.url(), "tag_ttl = \"0s\"")]));
    let http = client();
    let img = fake.add_image("team/app", "latest", 7, &[300_000, 100_000]);
    let r = get_manifest(&http, sd.url(&Dialect::Ns.path("up.test", "team/app", "manifests/latest"))).await;
    assert_content(&r, &img.digest, &img.manifest, "first pull");
    assert_eq!(r.cache(), "miss");
    for (d, b) in &img.blobs {
        let url = sd.url(&Dialect::Ns.path("up.test", "team/app", &format!("blobs/{d}")));
        let r = read(http.get(&url)).await;
        assert_content(&r, d, b, "first pull blob");
        // The outage below must find the blob committed, not a fill finishing.
        wait_cached(&http, &url, "first pull blob").await;
    }

    for phase in ["503", "stopped"] {
        if phase == "503" {
            fake.fail_with(Some(503));
        } else {
            fake.stop().await;
        }
        for dialect in DIALECTS {
            let what = format!("{phase}: tag via {dialect:?}");
            let url = sd.url(&dialect.path("up.test", "team/app", "manifests/latest"));
            let r = tokio::time::timeout(Duration::from_secs(25), get_manifest(&http, url.clone()))
                .await
                .unwrap_or_else(|_| panic!("{what}: no answer within 25 s"));
            assert_content(&r, &img.digest, &img.manifest, &what);
            assert_eq!(r.cache(), "stale", "{what}: x-stevedore-cache");
            let warning = hdr(&r.headers, "warning").unwrap_or_default();
            assert!(warning.starts_with("110 "), "{what}: Warning header {warning:?}");
            let h = read(http.head(url).header("accept", MANIFEST_ACCEPT)).await;
            assert_eq!(h.status, 200, "{what}: HEAD");
            assert_eq!(h.cache(), "stale", "{what}: HEAD x-stevedore-cache");
            assert!(hdr(&h.headers, "warning").is_some(), "{what}: HEAD Warning");
        }
        let before = fake.total();
        for dialect in DIALECTS {
            let what = format!("{phase}: by digest via {dialect:?}");
            let m =
                get_manifest(&http, sd.url(&dialect.path("up.test", "team/app", &format!("manifests/{}", img.digest))))
                    .await;
            assert_content(&m, &img.digest, &img.manifest, &what);
            assert_eq!(m.cache(), "hit", "{what}");
            assert!(hdr(&m.headers, "warning").is_none(), "{what}: Warning on a digest");
            for (d, b) in &img.blobs {
                let url = sd.url(&dialect.path("up.test", "team/app", &format!("blobs/{d}")));
                let r = read(http.get(&url)).await;
                assert_content(&r, d, b, &what);
                assert_eq!(r.cache(), "hit", "{what}");
                let h = read(http.head(&url)).await;
                assert_eq!(h.status, 200, "{what}: HEAD blob");
            }
        }
        assert_eq!(fake.total(), before, "{phase}: by-digest requests contacted the upstream:\n  {}", fake.dump());
    }

    // A tag that was never cached: a clean error, promptly.
    let r = tokio::time::timeout(
        Duration::from_secs(25),
        get_manifest(&http, sd.url(&Dialect::Ns.path("up.test", "team/app", "manifests/never-cached"))),
    )
    .await
    .expect("no answer within 25 s for an uncached tag while the upstream is down");
    assert_json_error(&r, 502, "UNAVAILABLE", "uncached tag, upstream down");
}

/// Content cached by digest is served without asking the upstream, whatever the dialect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_content_by_digest_never_contacts_the_upstream() {
    let fake = Fake::start().await;
    let sd = Stevedore::start(&config("up.test", &[("up.test", &fake.url(), "tag_ttl = \"1h\"")]));
    let http = client();
    let img = fake.add_image("team/app", "latest", 8, &[200_000, 50_000]);
    let r = get_manifest(&http, sd.url(&Dialect::Prefix.path("up.test", "team/app", "manifests/latest"))).await;
    assert_content(&r, &img.digest, &img.manifest, "first pull");
    for (d, b) in &img.blobs {
        let url = sd.url(&Dialect::Prefix.path("up.test", "team/app", &format!("blobs/{d}")));
        let r = read(http.get(&url)).await;
        assert_content(&r, d, b, "first pull blob");
        assert_eq!(r.cache(), "miss");
        wait_cached(&http, &url, "first pull blob").await;
    }
    let before = fake.total();
    for round in 0..2 {
        for dialect in DIALECTS {
            let what = format!("round {round}, {dialect:?}");
            let murl = sd.url(&dialect.path("up.test", "team/app", &format!("manifests/{}", img.digest)));
            let m = get_manifest(&http, murl.clone()).await;
            assert_content(&m, &img.digest, &img.manifest, &what);
            assert_eq!(m.cache(), "hit", "{what}: manifest by digest");
            if matches!(dialect, Dialect::Ns) {
                assert_eq!(hdr(&m.headers, "oci-namespace").as_deref(), Some("up.test"), "{what}: OCI-Namespace echo");
            }
            let h = read(http.head(murl).header("accept", MANIFEST_ACCEPT)).await;
            assert_eq!(h.status, 200, "{what}: HEAD manifest");
            assert_eq!(content_length_header(&h.headers), Some(img.manifest.len() as u64));
            for (d, b) in &img.blobs {
                let url = sd.url(&dialect.path("up.test", "team/app", &format!("blobs/{d}")));
                let r = read(http.get(&url)).await;
                assert_content(&r, d, b, &what);
                assert_eq!(r.cache(), "hit", "{what}: blob");
                let h = read(http.head(&url)).await;
                assert_eq!(h.status, 200, "{what}: HEAD blob");
                assert_eq!(h.cache(), "hit", "{what}: HEAD blob");
                assert_eq!(content_length_header(&h.headers), Some(b.len() as u64));
            }
            // The tag is younger than tag_ttl: served from the cache as well.
            let t = get_manifest(&http, sd.url(&dialect.path("up.test", "team/app", "manifests/latest"))).await;
            assert_content(&t, &img.digest, &img.manifest, &what);
            assert_eq!(t.cache(), "hit", "{what}: fresh tag");
        }
    }
    assert_eq!(fake.total(), before, "cached content contacted the upstream:\n  {}", fake.dump());
    assert_eq!(stored_repos(&sd).into_iter().collect::<Vec<_>>(), vec!["up.test/team/app".to_string()]);
}

/// Requests for a namespace, in `{ns}` and `{prefix}` form, whose host is not configured.
async fn unconfigured_requests(
    sd: &Stevedore,
    http: &reqwest::Client,
    img: &FakeImage,
    prefix: bool,
) -> Vec<(String, &'static str, Read)> {
    let host = "unconfigured.example";
    let p = |rest: &str| {
        if prefix {
            format!("/v2/{host}/team/app/{rest}")
        } else {
            format!("/v2/team/app/{rest}?ns={host}")
        }
    };
    let blob = &img.blobs[1].0;
    let mut out = Vec::new();
    for (path, code) in [
        (p("manifests/latest"), "MANIFEST_UNKNOWN"),
        (p(&format!("manifests/{}", img.digest)), "MANIFEST_UNKNOWN"),
        (p(&format!("blobs/{blob}")), "BLOB_UNKNOWN"),
        (p("tags/list"), "NAME_UNKNOWN"),
    ] {
        let r = get_manifest(http, sd.url(&path)).await;
        out.push((format!("GET {path}"), code, r));
        // (HEAD is not an endpoint of tags/list.)
        if !path.contains("/tags/list") {
            let r = read(http.head(sd.url(&path))).await;
            out.push((format!("HEAD {path}"), "", r));
        }
    }
    out
}

fn check_unconfigured(fake: &Fake, results: &[(String, &'static str, Read)]) {
    let statuses: Vec<String> =
        results.iter().map(|(what, _, r)| format!("{what} -> {} {}", r.status, r.cache())).collect();
    assert_eq!(
        fake.total(),
        0,
        "a namespace naming an unconfigured host caused upstream requests:\n  {}\nanswers:\n  {}",
        fake.dump(),
        statuses.join("\n  ")
    );
    for (what, code, r) in results {
        if what.starts_with("HEAD") {
            assert_eq!(r.status, 404, "{what}");
        } else {
            assert_json_error(r, 404, code, what);
        }
    }
}

/// `?ns=` naming a host that is not configured never leaves the machine: clean 404s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ns_naming_an_unconfigured_host_makes_no_outbound_request() {
    let fake = Fake::start().await;
    let sd = Stevedore::start(&config("configured.test", &[("configured.test", &fake.url(), "")]));
    let http = client();
    // The default upstream has the image, under both names: any leak would be served.
    let img = fake.add_image("team/app", "latest", 9, &[1000]);
    fake.set_tag("unconfigured.example/team/app", "latest", &img.digest);
    let results = unconfigured_requests(&sd, &http, &img, false).await;
    check_unconfigured(&fake, &results);
}

/// A path prefix naming a host that is not configured never leaves the machine either, even
/// with a default upstream configured: clean 404s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_prefix_naming_an_unconfigured_host_makes_no_outbound_request() {
    let fake = Fake::start().await;
    let sd = Stevedore::start(&config("configured.test", &[("configured.test", &fake.url(), "")]));
    let http = client();
    let img = fake.add_image("team/app", "latest", 10, &[1000]);
    fake.set_tag("unconfigured.example/team/app", "latest", &img.digest);
    let results = unconfigured_requests(&sd, &http, &img, true).await;
    check_unconfigured(&fake, &results);
}

/// Repository names may have dots in any component (GitLab groups: `group.name/project`).
/// With `?ns=` naming a configured upstream, such a name is that upstream's repository and
/// is pulled through like any other; only without a namespace does a host-like first
/// component mean "a registry that is not configured".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ns_pulls_repositories_whose_first_component_has_a_dot() {
    let fake = Fake::start().await;
    let sd = Stevedore::start(&config("up.test", &[("up.test", &fake.url(), "")]));
    let http = client();
    let img = fake.add_image("group.name/project", "latest", 13, &[1000]);
    for dialect in [Dialect::Ns, Dialect::Prefix] {
        let what = format!("group.name/project via {dialect:?}");
        let r = get_manifest(&http, sd.url(&dialect.path("up.test", "group.name/project", "manifests/latest"))).await;
        assert_content(&r, &img.digest, &img.manifest, &what);
        let (d, b) = &img.blobs[1];
        let r = read(http.get(sd.url(&dialect.path("up.test", "group.name/project", &format!("blobs/{d}"))))).await;
        assert_content(&r, d, b, &format!("{what}: blob"));
    }
    assert_eq!(fake.count("GET", "/v2/group.name/project/manifests/latest"), 1, "{}", fake.dump());
    assert_eq!(stored_repos(&sd).into_iter().collect::<Vec<_>>(), vec!["up.test/group.name/project".to_string()]);
}

/// An upstream's namespace is read-only: every write is 403 DENIED, nothing reaches the
/// upstream or the store. Plain names outside `proxy.local_namespaces` are the default
/// upstream's, so read-only too (tests/trust.rs covers the rest: cache names, local namespaces).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_into_an_upstream_namespace_are_denied() {
    let fake = Fake::start().await;
    let sd = Stevedore::start(&config("up.test", &[("up.test", &fake.url(), "")]));
    let http = client();
    let blob = b"layer bytes".to_vec();
    let d = sha256(&blob);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": d, "size": blob.len()},
        "layers": [],
    }))
    .unwrap();
    let md = sha256(&manifest);
    let uuid = "0b9e9c5e-1e4a-4a7c-9f0e-2d0c7a1d3b11";
    for dialect in DIALECTS {
        let p = |rest: &str| sd.url(&dialect.path("up.test", "team/app", rest));
        let with_digest = |rest: &str| {
            let u = p(rest);
            let sep = if u.contains('?') { '&' } else { '?' };
            format!("{u}{sep}digest={d}")
        };
        let attempts = vec![
            ("POST upload", http.post(p("blobs/uploads/")).header("content-length", "0")),
            ("monolithic POST", http.post(with_digest("blobs/uploads/")).body(blob.clone())),
            ("PATCH upload", http.patch(p(&format!("blobs/uploads/{uuid}"))).body(blob.clone())),
            ("PUT upload", http.put(with_digest(&format!("blobs/uploads/{uuid}"))).body(blob.clone())),
            (
                "PUT manifest by tag",
                http.put(p("manifests/v1")).header("content-type", MT_MANIFEST).body(manifest.clone()),
            ),
            (
                "PUT manifest by digest",
                http.put(p(&format!("manifests/{md}"))).header("content-type", MT_MANIFEST).body(manifest.clone()),
            ),
            ("DELETE manifest", http.delete(p(&format!("manifests/{md}")))),
            ("DELETE tag", http.delete(p("manifests/v1"))),
            ("DELETE blob", http.delete(p(&format!("blobs/{d}")))),
        ];
        for (what, req) in attempts {
            let what = format!("{what} via {dialect:?}");
            let r = read(req).await;
            assert_json_error(&r, 403, "DENIED", &what);
        }
    }
    assert_eq!(fake.total(), 0, "writes reached the upstream:\n  {}", fake.dump());
    assert!(stored_blobs(&sd).is_empty(), "a denied write stored content");
    assert!(stored_repos(&sd).is_empty(), "a denied write created a repository");
}

/// `?ns=` that names a configured upstream is echoed as `OCI-Namespace` on every answer:
/// content, upstream errors and denied writes alike; an `ns` that was not honoured is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_namespace_is_echoed_on_every_answer_to_an_honoured_ns() {
    let fake = Fake::start().await;
    let sd = Stevedore::start(&config("up.test", &[("up.test", &fake.url(), "")]));
    let http = client();
    let img = fake.add_image("team/app", "latest", 12, &[1000]);
    let (d, _) = &img.blobs[1];
    let ns = |rest: &str| sd.url(&Dialect::Ns.path("up.test", "team/app", rest));
    let cases = vec![
        ("GET manifest", http.get(ns("manifests/latest")).header("accept", MANIFEST_ACCEPT), 200),
        ("GET blob", http.get(ns(&format!("blobs/{d}"))), 200),
        ("HEAD blob", http.head(ns(&format!("blobs/{d}"))), 200),
        ("GET unknown tag", http.get(ns("manifests/nope")).header("accept", MANIFEST_ACCEPT), 404),
        ("prefix and ns together", http.get(sd.url("/v2/up.test/team/app/manifests/latest?ns=up.test")), 200),
        ("POST upload (denied)", http.post(ns("blobs/uploads/")).header("content-length", "0"), 403),
        (
            "PUT manifest (denied)",
            http.put(ns("manifests/v1")).header("content-type", MT_MANIFEST).body(img.manifest.clone()),
            403,
        ),
        ("DELETE blob (denied)", http.delete(ns(&format!("blobs/{d}"))), 403),
    ];
    let mut missing = Vec::new();
    for (what, req, status) in cases {
        let r = read(req).await;
        assert_eq!(r.status, status, "{what}: {}", r.text());
        let echo = hdr(&r.headers, "oci-namespace");
        if echo.as_deref() != Some("up.test") {
            missing.push(format!("{what} -> {} with OCI-Namespace {echo:?}", r.status));
        }
    }
    // Not honoured (unconfigured host): no echo.
    let r = get_manifest(&http, sd.url("/v2/team/app/manifests/latest?ns=unconfigured.example")).await;
    assert_eq!(r.status, 404);
    assert_eq!(hdr(&r.headers, "oci-namespace"), None, "echo of an ns that was not honoured");
    assert!(missing.is_empty(), "answers to ?ns=up.test without the echo:\n  {}", missing.join("\n  "));
}

/// `tag_ttl = "0s"`: every tag GET revalidates with a HEAD; an unchanged digest makes no
/// manifest GET; a changed one is fetched (by digest) and served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_are_revalidated_with_head_and_follow_upstream_changes() {
    let fake = Fake::start().await;
    let sd = Stevedore::start(&config("", &[("mut.test", &fake.url(), "tag_ttl = \"0s\"")]));
    let http = client();
    let tag_path = "/v2/rv/app/manifests/latest";
    let url = sd.url(&Dialect::Ns.path("mut.test", "rv/app", "manifests/latest"));
    let one = fake.add_image("rv/app", "latest", 31, &[1000]);
    let r = get_manifest(&http, url.clone()).await;
    assert_content(&r, &one.digest, &one.manifest, "first GET");
    assert_eq!(r.cache(), "miss");
    assert_eq!((fake.count("GET", tag_path), fake.count("HEAD", tag_path)), (1, 0));
    for k in 1..=3 {
        let r = get_manifest(&http, url.clone()).await;
        assert_content(&r, &one.digest, &one.manifest, &format!("GET {k} after"));
        assert_eq!(r.cache(), "revalidated", "GET {k} after");
        assert_eq!(
            (fake.count("HEAD", tag_path), fake.count("GET", tag_path)),
            (k, 1),
            "after GET {k}: (HEADs, GETs) of the tag:\n  {}",
            fake.dump()
        );
    }
    assert_eq!(fake.count_where(|r| r.method == "GET"), 1, "{}", fake.dump());

    // The tag moves upstream.
    let two = fake.add_image("rv/app", "latest", 32, &[1000]);
    let r = get_manifest(&http, url.clone()).await;
    assert_content(&r, &two.digest, &two.manifest, "after the tag moved");
    assert_eq!(r.cache(), "revalidated");
    assert_eq!(fake.count("HEAD", tag_path), 4);
    assert_eq!(
        fake.count("GET", &format!("/v2/rv/app/manifests/{}", two.digest)),
        1,
        "new manifest fetched by digest:\n  {}",
        fake.dump()
    );
    let r = get_manifest(&http, url.clone()).await;
    assert_content(&r, &two.digest, &two.manifest, "after the move, again");
    assert_eq!(fake.count("HEAD", tag_path), 5);
    assert_eq!(fake.count_where(|r| r.method == "GET"), 2, "{}", fake.dump());
    // The old manifest is still there by digest.
    let r = get_manifest(&http, sd.url(&Dialect::Ns.path("mut.test", "rv/app", &format!("manifests/{}", one.digest))))
        .await;
    assert_content(&r, &one.digest, &one.manifest, "old manifest by digest");
}

/// `immutable_tags = ["v*"]`: a `v1` tag is never revalidated, even with `tag_ttl = "0s"`;
/// other tags still are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immutable_tags_are_never_revalidated() {
    let fake = Fake::start().await;
    let sd = Stevedore::start(&config(
        "imm.test",
        &[("imm.test", &fake.url(), "tag_ttl = \"0s\"\nimmutable_tags = [\"v*\"]")],
    ));
    let http = client();
    let one = fake.add_image("im/app", "v1", 41, &[1000]);
    fake.set_tag("im/app", "latest", &one.digest);
    let v1 = "/v2/im/app/manifests/v1";
    for (i, dialect) in [Dialect::Ns, Dialect::Prefix, Dialect::Plain, Dialect::Ns].into_iter().enumerate() {
        let r = get_manifest(&http, sd.url(&dialect.path("imm.test", "im/app", "manifests/v1"))).await;
        assert_content(&r, &one.digest, &one.manifest, &format!("v1 GET {i}"));
        assert_eq!(r.cache(), if i == 0 { "miss" } else { "hit" }, "v1 GET {i}");
    }
    // Upstream moves v1 (it should not, but if it does, the cache keeps what it has).
    let two = fake.add_image("im/app", "v1", 42, &[1000]);
    let r = get_manifest(&http, sd.url(&Dialect::Ns.path("imm.test", "im/app", "manifests/v1"))).await;
    assert_content(&r, &one.digest, &one.manifest, "v1 after the upstream moved it");
    assert_eq!(r.cache(), "hit");
    assert_eq!((fake.count("GET", v1), fake.count("HEAD", v1)), (1, 0), "v1 requests upstream:\n  {}", fake.dump());
    assert_eq!(fake.count("GET", &format!("/v2/im/app/manifests/{}", two.digest)), 0);

    // Control: `latest` does not match v* and is revalidated.
    let latest = sd.url(&Dialect::Ns.path("imm.test", "im/app", "manifests/latest"));
    let r = get_manifest(&http, latest.clone()).await;
    assert_eq!(r.cache(), "miss");
    let r = get_manifest(&http, latest).await;
    assert_eq!(r.cache(), "revalidated");
    assert_eq!(fake.count("HEAD", "/v2/im/app/manifests/latest"), 1);
}

/// Bearer auth: a 401 challenge sends Stevedore to the realm for a pull-scoped token, which
/// is fetched once for concurrent pulls and then reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_is_fetched_once_for_concurrent_pulls_with_pull_scope() {
    let fake = Fake::start().await;
    fake.require_bearer(Bearer { token: "tok-7f3a".into(), delay: Duration::from_millis(300) });
    let sd = Stevedore::start(&config("", &[("auth.test", &fake.url(), "")]));
    let http = client();
    let img = fake.add_image("team/app", "latest", 51, &[400_000, 300_000, 200_000, 100_000]);
    // Cold: five blob fills at once, none with a token yet.
    let mut tasks = Vec::new();
    for (d, b) in img.blobs.clone() {
        let url = sd.url(&Dialect::Ns.path("auth.test", "team/app", &format!("blobs/{d}")));
        let http = http.clone();
        tasks.push(tokio::spawn(async move { (d, b, read(http.get(url)).await) }));
    }
    for t in tasks {
        let (d, b, r) = t.await.unwrap();
        assert_content(&r, &d, &b, "blob behind Bearer auth");
    }
    let queries = fake.token_queries();
    assert_eq!(queries.len(), 1, "token requests for 5 concurrent pulls: {queries:?}");
    let params: Vec<(String, String)> =
        reqwest::Url::parse(&format!("http://x/?{}", queries[0])).unwrap().query_pairs().into_owned().collect();
    let get = |k: &str| params.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    assert_eq!(get("scope"), Some("repository:team/app:pull"), "{params:?}");
    assert_eq!(get("service"), Some("fake"), "{params:?}");
    for (d, _) in &img.blobs {
        assert_eq!(
            fake.count_where(|r| r.method == "GET"
                && r.path == format!("/v2/team/app/blobs/{d}")
                && r.authorization.as_deref() == Some("Bearer tok-7f3a")),
            1,
            "authorized GETs of {d}:\n  {}",
            fake.dump()
        );
    }
    // The cached token serves the manifest too.
    let r = get_manifest(&http, sd.url(&Dialect::Ns.path("auth.test", "team/app", "manifests/latest"))).await;
    assert_content(&r, &img.digest, &img.manifest, "manifest behind Bearer auth");
    assert_eq!(fake.token_queries().len(), 1, "token refetched");
    // Another repository needs its own scope.
    let other = fake.add_image("team/other", "latest", 52, &[1000]);
    let r = get_manifest(&http, sd.url(&Dialect::Ns.path("auth.test", "team/other", "manifests/latest"))).await;
    assert_content(&r, &other.digest, &other.manifest, "second repository");
    let queries = fake.token_queries();
    assert_eq!(queries.len(), 2, "{queries:?}");
    assert!(
        queries[1].contains("scope=repository%3Ateam%2Fother%3Apull")
            || queries[1].contains("scope=repository:team/other:pull"),
        "second scope: {}",
        queries[1]
    );
}

/// A cached token the upstream stops accepting (rotated signing key, revocation, a shorter
/// real lifetime than announced) is replaced: a 401 for a token means fetch a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_token_the_upstream_rejects_is_fetched_again() {
    let fake = Fake::start().await;
    fake.require_bearer(Bearer { token: "tok-one".into(), delay: Duration::ZERO });
    let sd = Stevedore::start(&config("", &[("auth.test", &fake.url(), "")]));
    let http = client();
    let img = fake.add_image("team/app", "latest", 53, &[20_000, 10_000]);
    let url = |rest: &str| sd.url(&Dialect::Ns.path("auth.test", "team/app", rest));
    let r = get_manifest(&http, url("manifests/latest")).await;
    assert_content(&r, &img.digest, &img.manifest, "manifest");
    let (d0, b0) = &img.blobs[0];
    let r = read(http.get(url(&format!("blobs/{d0}")))).await;
    assert_content(&r, d0, b0, "blob with the cached token");
    assert_eq!(fake.token_queries().len(), 1);

    // The upstream now accepts (and issues) only a new token.
    fake.require_bearer(Bearer { token: "tok-two".into(), delay: Duration::ZERO });
    let (d1, b1) = &img.blobs[1];
    let r = read(http.get(url(&format!("blobs/{d1}")))).await;
    let tokens = fake.token_queries().len();
    assert_content(
        &r,
        d1,
        b1,
        &format!(
            "blob after the upstream rejected the cached token ({tokens} token requests in all):\n  {}",
            fake.dump()
        ),
    );
    assert_eq!(tokens, 2, "token requests");
}

/// `library/` is added to single-component names for Docker Hub only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_prefix_is_added_only_for_docker_io_single_component_names() {
    let fake = Fake::start().await;
    let sd = Stevedore::start(&config("docker.io", &[("docker.io", &fake.url(), ""), ("other.test", &fake.url(), "")]));
    let http = client();
    let official = fake.add_image("library/alpine", "latest", 61, &[1000]);
    let bare = fake.add_image("alpine", "latest", 62, &[1000]);
    let team = fake.add_image("team/app", "latest", 63, &[1000]);

    let r = get_manifest(&http, sd.url("/v2/alpine/manifests/latest")).await;
    assert_content(&r, &official.digest, &official.manifest, "plain alpine");
    assert_eq!(fake.count("GET", "/v2/library/alpine/manifests/latest"), 1, "{}", fake.dump());
    assert_eq!(fake.count("GET", "/v2/alpine/manifests/latest"), 0, "{}", fake.dump());
    let (d, b) = &official.blobs[1];
    let r = read(http.get(sd.url(&format!("/v2/alpine/blobs/{d}")))).await;
    assert_content(&r, d, b, "plain alpine blob");
    assert_eq!(fake.count("GET", &format!("/v2/library/alpine/blobs/{d}")), 1, "{}", fake.dump());
    // The other dialects name the same cached repository.
    for path in [
        "/v2/docker.io/alpine/manifests/latest",
        "/v2/alpine/manifests/latest?ns=docker.io",
        "/v2/docker.io/library/alpine/manifests/latest",
    ] {
        let r = get_manifest(&http, sd.url(path)).await;
        assert_content(&r, &official.digest, &official.manifest, path);
        assert_eq!(r.cache(), "hit", "{path}");
    }
    // Two components: no library/.
    let r = get_manifest(&http, sd.url("/v2/team/app/manifests/latest?ns=docker.io")).await;
    assert_content(&r, &team.digest, &team.manifest, "team/app on docker.io");
    assert_eq!(fake.count("GET", "/v2/team/app/manifests/latest"), 1, "{}", fake.dump());
    // Another upstream: no library/ either.
    let r = get_manifest(&http, sd.url("/v2/alpine/manifests/latest?ns=other.test")).await;
    assert_content(&r, &bare.digest, &bare.manifest, "alpine on other.test");
    assert_eq!(fake.count("GET", "/v2/alpine/manifests/latest"), 1, "{}", fake.dump());
    assert_eq!(
        fake.count_where(|r| r.path.starts_with("/v2/library/library/")
            || r.path.starts_with("/v2/library/team/")
            || r.path.starts_with("/v2/docker.io/")),
        0,
        "{}",
        fake.dump()
    );
    assert_eq!(
        stored_repos(&sd).into_iter().collect::<Vec<_>>(),
        vec!["docker.io/library/alpine".to_string(), "docker.io/team/app".to_string(), "other.test/alpine".to_string(),]
    );
}
