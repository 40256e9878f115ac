//! Replicas sharing one bucket and one Redis (`tests/common/fleet.rs`) keep the promises a
//! lone replica keeps about everything but blob fills: one upstream GET per manifest digest
//! and one HEAD per tag per `tag_ttl` across the fleet, one token fetch per upstream scope,
//! no replica serving what another deleted, upload sessions written through any replica,
//! tokens one replica issued accepted by all, one lifecycle pass at a time, and no replica
//! sweeping another's live session.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::data::{bytes, sha256};
use common::distribution::Distribution;
use common::fake::{Bearer, Fake};
use common::fleet::Fleet;
use common::http::{client, hdr, read, Registry};
use common::oci::make_image;
use common::stevedore::{cli, write_htpasswd};
use common::wait_until;
use reqwest::{Body, Method};

/// Three replicas in front of `upstream`, with `proxy` lines in `[proxy]`, `upstream_extra`
/// in the upstream's `[[upstreams]]` table and `extra` at the end of every config.
fn fleet(upstream: &str, proxy: &str, upstream_extra: &str, extra: &str) -> Fleet {
    let mut f = Fleet::start(0, upstream, extra);
    for _ in 0..3 {
        let i = f.add_slot();
        let cfg = f
            .config_of(i)
            .replacen("head_cache_ttl = \"30s\"\n", &format!("head_cache_ttl = \"30s\"\n{proxy}\n"), 1)
            .replacen("read_timeout = \"20s\"\n", &format!("read_timeout = \"20s\"\n{upstream_extra}\n"), 1);
        let r = f.try_spawn(i, &cfg).unwrap_or_else(|log| panic!("replica {i}: {log}"));
        f.replicas[i] = Some(r);
    }
    f
}

async fn metrics_of(f: &Fleet, i: usize) -> String {
    read(client().get(f.at(i).url("/metrics"))).await.text()
}

/// The value of the sample `name` (with its labels, as Prometheus renders them), if any.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?.split(' ').nth(1)?.parse().ok()
}

/// Requests `GET|HEAD /v2/<repo>/manifests/<reference>` in the upstream's access log.
fn manifest_requests(up: &Distribution, method: &str, repo: &str, reference: &str) -> usize {
    up.count(&format!("\"{method} /v2/{repo}/manifests/{reference} "))
}

/// A manifest GET by digest and a tag's revalidation HEAD reach the upstream once for the
/// whole fleet, whichever replicas the concurrent clients reach; a new tag is fetched once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_and_tag_revalidations_go_upstream_once_across_the_fleet() {
    let up = Distribution::start(false);
    let upstream = format!("127.0.0.1:{}", up.port);
    let (a, b) = (make_image(71, 1, 2000, "amd64", "linux"), make_image(72, 1, 2000, "amd64", "linux"));
    up.registry().push_image("lib/app", &a, Some("v1")).await;
    up.registry().push_image("lib/app", &b, None).await;
    // The tag's age is the store's (S3 Last-Modified: whole seconds), so a tag revalidated a
    // moment ago is far from its 3 s.
    let f = fleet(&upstream, "", "tag_ttl = \"3s\"", "");
    up.settle();
    let (tag_gets0, digest_gets0) =
        (manifest_requests(&up, "GET", "lib/app", "v1"), manifest_requests(&up, "GET", "lib/app", &b.manifest.digest));

    // Six clients, two per replica, at once: the tag (never seen), then a digest.
    for (reference, digest) in [("v1", &a.manifest.digest), (b.manifest.digest.as_str(), &b.manifest.digest)] {
        let mut tasks = Vec::new();
        for k in 0..6 {
            let reg = f.at(k % 3).registry();
            let reference = reference.to_string();
            tasks.push(tokio::spawn(async move { reg.try_get_manifest("lib/app", &reference).await }));
        }
        for t in tasks {
            let (status, dcd, _, _) = t.await.unwrap().unwrap();
            assert_eq!(status, 200, "GET lib/app:{reference}");
            assert_eq!(dcd.as_deref(), Some(digest.as_str()), "lib/app:{reference}");
        }
    }
    up.settle();
    assert_eq!(
        manifest_requests(&up, "GET", "lib/app", "v1") - tag_gets0,
        1,
        "GETs of the new tag upstream:\n{}",
        up.requests_for("lib/app")
    );
    assert_eq!(
        manifest_requests(&up, "GET", "lib/app", &b.manifest.digest) - digest_gets0,
        1,
        "GETs of the digest upstream:\n{}",
        up.requests_for("lib/app")
    );

    // Once the tag is older than tag_ttl: one HEAD for the fleet, no GET (it did not change).
    let heads0 = manifest_requests(&up, "HEAD", "lib/app", "v1");
    tokio::time::sleep(Duration::from_millis(4200)).await;
    let mut tasks = Vec::new();
    for k in 0..6 {
        let reg = f.at(k % 3).registry();
        tasks.push(tokio::spawn(async move { reg.try_get_manifest("lib/app", "v1").await }));
    }
    for t in tasks {
        let (status, dcd, _, _) = t.await.unwrap().unwrap();
        assert_eq!(status, 200);
        assert_eq!(dcd.as_deref(), Some(a.manifest.digest.as_str()));
    }
    up.settle();
    assert_eq!(
        manifest_requests(&up, "HEAD", "lib/app", "v1") - heads0,
        1,
        "revalidations of the tag upstream:\n{}",
        up.requests_for("lib/app")
    );
    assert_eq!(manifest_requests(&up, "GET", "lib/app", "v1") - tag_gets0, 1, "the unchanged tag was fetched again");

    // The fleet view: the leases, by kind, across the replicas.
    let mut taken = 0.0;
    for i in 0..3 {
        let m = metrics_of(&f, i).await;
        for kind in ["manifest", "tag"] {
            taken += metric(&m, &format!("stevedore_cluster_leases_taken_total{{kind=\"{kind}\"}}")).unwrap_or(0.0);
        }
    }
    assert!(taken >= 3.0, "manifest and tag leases taken across the fleet: {taken}");
}

/// A token an upstream's realm issued for a scope is fetched once for the fleet: the other
/// replicas take it from Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tokens_are_fetched_once_for_the_fleet() {
    let fake = Fake::start().await;
    fake.require_bearer(Bearer { token: "fleet-token-1".into(), delay: Duration::from_millis(0) });
    let imgs: Vec<_> = (0..3).map(|i| fake.add_image("team/tok", &format!("t{i}"), 80 + i as u64, &[100])).collect();
    let upstream = fake.addr.to_string();
    let f = fleet(&upstream, "", "", "");
    // One replica after the other, each a manifest of its own in one repository (one scope).
    for (i, img) in imgs.iter().enumerate() {
        let (status, dcd, _, body) = f.at(i).registry().try_get_manifest("team/tok", &format!("t{i}")).await.unwrap();
        assert_eq!(status, 200, "replica {i}: {}", String::from_utf8_lossy(&body));
        assert_eq!(dcd.as_deref(), Some(img.digest.as_str()));
    }
    assert_eq!(fake.token_queries().len(), 1, "token requests: {:?}", fake.token_queries());
    let mut shared = 0.0;
    for i in 1..3 {
        let m = metrics_of(&f, i).await;
        shared +=
            metric(&m, &format!("stevedore_cluster_tokens_shared_total{{upstream=\"{upstream}\"}}")).unwrap_or(0.0);
    }
    assert!(shared >= 2.0, "replicas 1 and 2 used the shared token: {shared}");
    // The token is in Redis under a hashed name, never under the upstream's credentials.
    let keys = f.redis.as_ref().unwrap().keys("stevedore:token:*");
    assert_eq!(keys.len(), 1, "{keys:?}");
}

/// A blob link, a manifest and a tag deleted through one replica are 404 on the others right
/// after (their caches hear of it), and a repository created on one is in the others' catalog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_on_one_replica_are_not_served_by_another() {
    let up = Distribution::start(false);
    let upstream = format!("127.0.0.1:{}", up.port);
    let f = fleet(&upstream, "local_namespaces = [\"team/*\"]", "", "");
    let regs: Vec<Registry> = (0..3).map(|i| f.at(i).registry()).collect();
    // The others' catalogs are built (walked) before the repository exists.
    for r in &regs[1..] {
        assert_eq!(r.get("/v2/_catalog").await.status(), 200);
    }
    let img = make_image(90, 1, 3000, "amd64", "linux");
    regs[0].push_image("team/app", &img, Some("v1")).await;
    let layer = &img.layers[0];
    for r in &regs[1..] {
        // Cached there now: the link, the size, the manifest.
        r.assert_blob("team/app", &layer.digest, &layer.data).await;
        let (st, dcd, _, _) = r.try_get_manifest("team/app", "v1").await.unwrap();
        assert_eq!((st.as_u16(), dcd.as_deref()), (200, Some(img.manifest.digest.as_str())));
        let cat = read(r.req(Method::GET, "/v2/_catalog")).await.text();
        assert!(cat.contains("team/app"), "a repository pushed through replica 0 is not in a catalog: {cat}");
    }

    let blob = format!("/v2/team/app/blobs/{}", layer.digest);
    assert_eq!(regs[0].delete(&blob).await.status(), 202);
    for (i, r) in regs.iter().enumerate() {
        assert_eq!(r.get(&blob).await.status(), 404, "replica {i} serves a blob deleted on replica 0");
        assert_eq!(r.head(&blob).await.status(), 404, "replica {i} answers HEAD for a deleted blob");
    }

    let manifest = format!("/v2/team/app/manifests/{}", img.manifest.digest);
    assert_eq!(regs[1].delete(&manifest).await.status(), 202);
    for (i, r) in regs.iter().enumerate() {
        assert_eq!(r.get(&manifest).await.status(), 404, "replica {i} serves a manifest deleted on replica 1");
        assert_eq!(
            r.get("/v2/team/app/manifests/v1").await.status(),
            404,
            "replica {i} resolves a tag of a deleted manifest"
        );
    }
    let heard = {
        let m = metrics_of(&f, 2).await;
        metric(&m, "stevedore_cluster_events_total{direction=\"received\",event=\"link_gone\"}").unwrap_or(0.0)
    };
    assert!(heard >= 1.0, "replica 2 heard no link_gone event");
}

/// A chunked push whose PATCHes and PUT reach different replicas completes and reads back
/// identical from every replica; two PATCHes at one offset on two replicas at once get what
/// they get on one replica: the second waits for the first, then 416 at the new offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_push_across_replicas_completes_and_pulls_back_identical() {
    let up = Distribution::start(false);
    let upstream = format!("127.0.0.1:{}", up.port);
    let f = fleet(&upstream, "local_namespaces = [\"team/*\"]", "", "");
    let regs: Vec<Registry> = (0..3).map(|i| f.at(i).registry()).collect();

    // 6 MiB in three chunks: the third crosses the first 5 MiB… part (8 MiB parts by default:
    // the pieces carry every byte from one replica to the next).
    let data = bytes(404, (6 << 20) + 12345);
    let digest = sha256(&data);
    let cuts = [0, 2 << 20, (4 << 20) + 777, data.len()];
    let mut loc = regs[0].start_upload("team/push").await;
    for (k, w) in cuts.windows(2).enumerate() {
        let r = &regs[(k + 1) % 3];
        let chunk = data[w[0]..w[1]].to_vec();
        let (next, stored) = r
            .try_patch(&loc, w[0] as u64, chunk.len() as u64, Body::from(chunk))
            .await
            .unwrap_or_else(|e| panic!("PATCH {k} on replica {}: {e}", (k + 1) % 3));
        assert_eq!(stored, w[1] as u64);
        loc = next;
    }
    let status = regs[1].try_session_status(&loc).await.unwrap();
    assert_eq!(status.1, Some(data.len() as u64), "the session's offset seen from replica 1");
    regs[1].try_finish(&loc, &digest, None).await.unwrap_or_else(|e| panic!("PUT on replica 1: {e}"));
    for r in &regs {
        r.assert_blob("team/push", &digest, &data).await;
    }

    // Two PATCHes at offset 0 of one session, on replicas 1 and 2: the first holds the
    // session's lease while its body streams.
    let loc = regs[0].start_upload("team/push").await;
    let id = loc.rsplit('/').next().unwrap().split('?').next().unwrap().to_string();
    let chunk = bytes(405, 300_000);
    let (tx, first) = regs[1].patch_fed(&loc, 0, chunk.len() as u64);
    tx.send(Bytes::copy_from_slice(&chunk[..100_000])).await.unwrap();
    let redis = f.redis.as_ref().unwrap();
    let lease = format!("stevedore:upload:{id}");
    assert!(
        wait_until(Duration::from_secs(10), || redis.keys(&lease).len() == 1).await,
        "the first PATCH holds no lease on the session"
    );
    let second = {
        let (reg, loc, c) = (regs[2].clone(), loc.clone(), chunk.clone());
        tokio::spawn(async move { reg.patch_chunk(&loc, 0, &c).await })
    };
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics_of(&f, 2).await;
        if metric(&m, "stevedore_cluster_lease_waiting{kind=\"upload\"}") == Some(1.0) {
            break;
        }
        assert!(Instant::now() < end, "replica 2 never waited for replica 1's lease on the session");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tx.send(Bytes::copy_from_slice(&chunk[100_000..])).await.unwrap();
    drop(tx);
    let (_, stored) = first.await.unwrap().unwrap_or_else(|e| panic!("the first PATCH: {e}"));
    assert_eq!(stored, chunk.len() as u64);
    let second = second.await.unwrap();
    assert_eq!(second.status(), 416, "the second PATCH at offset 0");
    assert_eq!(hdr(second.headers(), "range").as_deref(), Some(format!("0-{}", chunk.len() - 1).as_str()));
    let status = regs[0].try_session_status(&loc).await.unwrap();
    assert_eq!(status.1, Some(chunk.len() as u64), "the session holds the first PATCH once");
}

/// With `[redis]` and `[auth]`, every replica needs the one token key (`auth.token_key_file`),
/// and a token one replica issued is accepted by the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_issued_by_one_replica_are_accepted_by_another() {
    let up = Distribution::start(false);
    let upstream = format!("127.0.0.1:{}", up.port);
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = write_htpasswd(&dir.path().join("htpasswd"), &[("alice", "alice-pw-Zq8")]);
    let auth = format!(
        "\n[auth]\nhtpasswd = {:?}\nanonymous = \"none\"\ntoken_key_file = {:?}\n\
         [[auth.rules]]\nrepositories = [\"team/*\"]\nusers = [\"*\"]\nactions = [\"pull\", \"push\"]\n",
        htpasswd.display().to_string(),
        dir.path().join("token.pem").display().to_string()
    );
    let mut f = fleet(&upstream, "local_namespaces = [\"team/*\"]", "", &auth);

    let token = f
        .at(0)
        .registry()
        .login_token(Method::POST, "/v2/team/app/blobs/uploads/", Some(("alice", "alice-pw-Zq8")))
        .await;
    let data = bytes(500, 10_000);
    let digest = f.at(1).registry().bearer_auth(&token).push_blob("team/app", &data).await;
    f.at(2).registry().bearer_auth(&token).assert_blob("team/app", &digest, &data).await;
    let anon = f.at(2).registry().get(&format!("/v2/team/app/blobs/{digest}")).await;
    assert_eq!(anon.status(), 401, "without the token");

    // A replica of this fleet without the shared key refuses to start, naming the key.
    let i = f.add_slot();
    let key_line = format!("token_key_file = {:?}\n", dir.path().join("token.pem").display().to_string());
    let cfg = f.config_of(i);
    assert!(cfg.contains(&key_line), "{cfg}");
    match f.try_spawn(i, &cfg.replacen(&key_line, "", 1)) {
        Ok(_) => panic!("a replica with [redis] and [auth] but no auth.token_key_file started"),
        Err(log) => assert!(log.contains("auth.token_key_file"), "{log}"),
    }
}

/// Eviction and GC run on one replica at a time: while the `lifecycle` lease is held
/// elsewhere (here, by the test), the replicas skip their passes and `stevedore gc` on the
/// bucket refuses to run, naming the holder; once it is free, passes run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_and_gc_run_on_one_replica_at_a_time() {
    let up = Distribution::start(false);
    let upstream = format!("127.0.0.1:{}", up.port);
    let f = fleet(&upstream, "", "", "\n[cache]\ncheck_interval = \"300ms\"\n");
    let redis = f.redis.as_ref().unwrap();
    let skipped = |m: &str| metric(m, "stevedore_cluster_lifecycle_skipped_total{pass=\"eviction\"}").unwrap_or(0.0);
    let taken = |m: &str| metric(m, "stevedore_cluster_leases_taken_total{kind=\"lifecycle\"}").unwrap_or(0.0);

    // Passes run: every replica either takes the lease for one or finds another's (a pass on
    // a busy moto may outlast the interval, so one replica may keep finding it held).
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let mut all = true;
        for i in 0..3 {
            let m = metrics_of(&f, i).await;
            all &= taken(&m) + skipped(&m) >= 1.0;
        }
        if all {
            break;
        }
        assert!(Instant::now() < end, "not every replica tried a lifecycle pass");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Held elsewhere: skipped everywhere, and the CLI refuses.
    let holder = "someone-else http://127.0.0.1:9 tok";
    let set = redis.command(&["SET", "stevedore:lifecycle", holder, "PX", "60000"]);
    assert!(set.contains("OK"), "{set}");
    let before: Vec<(f64, f64)> = {
        let mut v = Vec::new();
        for i in 0..3 {
            let m = metrics_of(&f, i).await;
            v.push((skipped(&m), taken(&m)));
        }
        v
    };
    for (i, (s0, _)) in before.iter().enumerate() {
        let end = Instant::now() + Duration::from_secs(10);
        while skipped(&metrics_of(&f, i).await) < s0 + 2.0 {
            assert!(Instant::now() < end, "replica {i} does not skip its passes while another holds the lease");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let config = f.at(0).config.clone().expect("the replica's config file");
    let scratch = tempfile::tempdir().unwrap();
    let gc = cli(
        &["gc", "--config", config.to_str().unwrap(), "--root", scratch.path().to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert!(!gc.status.success(), "gc ran while another held the lease: {}", gc.describe());
    assert!(gc.stderr.contains("someone-else"), "{}", gc.describe());
    for (i, (_, t0)) in before.iter().enumerate() {
        assert_eq!(taken(&metrics_of(&f, i).await), *t0, "replica {i} took the lifecycle lease while it was held");
    }

    // Free again: passes run again (on one replica or another).
    redis.command(&["DEL", "stevedore:lifecycle"]);
    let t0: f64 = before.iter().map(|(_, t)| t).sum();
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let mut t = 0.0;
        for i in 0..3 {
            t += taken(&metrics_of(&f, i).await);
        }
        if t > t0 {
            break;
        }
        assert!(Instant::now() < end, "no replica runs a pass once the lease is free");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A replica's sweep never removes a session another replica is writing, however long its
/// PATCH takes past `uploads.session_ttl` (the session's recorded activity is its last
/// checkpoint; the lease says it is live).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeps_leave_another_replicas_live_session_alone() {
    let up = Distribution::start(false);
    let upstream = format!("127.0.0.1:{}", up.port);
    let f = fleet(
        &upstream,
        "local_namespaces = [\"team/*\"]",
        "",
        "\n[uploads]\nsession_ttl = \"2s\"\nsweep_interval = \"200ms\"\n",
    );
    let regs: Vec<Registry> = (0..3).map(|i| f.at(i).registry()).collect();
    // Past one 8 MiB part: the session's multipart upload is created and recorded (a sweep
    // removing the session would abort it, and the push could not complete).
    let data = bytes(606, (8 << 20) + 100_000);
    let digest = sha256(&data);
    let cut = (8 << 20) + 50_000;
    let loc = regs[0].start_upload("team/slow").await;
    let (tx, patch) = regs[0].patch_fed(&loc, 0, data.len() as u64);
    for piece in data[..cut].chunks(1 << 20) {
        tx.send(Bytes::copy_from_slice(piece)).await.unwrap();
    }
    let bucket = f.at(0).bucket.as_ref().unwrap();
    let id = loc.rsplit('/').next().unwrap().split('?').next().unwrap().to_string();
    let recorded = wait_until(Duration::from_secs(20), || {
        bucket
            .get(&format!("ingest/{id}/state.json"))
            .is_some_and(|s| String::from_utf8_lossy(&s).contains("\"upload\":\""))
    })
    .await;
    assert!(recorded, "the session's multipart upload was never recorded");
    // Past the session's TTL (the point of the test), the body still streaming: the other
    // replicas sweep every 200 ms meanwhile.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    tx.send(Bytes::copy_from_slice(&data[cut..])).await.unwrap();
    drop(tx);
    let (loc, stored) = patch.await.unwrap().unwrap_or_else(|e| panic!("the slow PATCH: {e}"));
    assert_eq!(stored, data.len() as u64);
    regs[0].try_finish(&loc, &digest, None).await.unwrap_or_else(|e| panic!("PUT: {e}"));
    regs[2].assert_blob("team/slow", &digest, &data).await;

    // An idle session is swept (by one replica or another) once past the TTL.
    let idle = regs[1].start_upload("team/slow").await;
    let gone = async {
        let end = Instant::now() + Duration::from_secs(15);
        while Instant::now() < end {
            if regs[2].try_session_status(&idle).await.unwrap().0 == 404 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    };
    assert!(gone.await, "an idle session was never swept");
}
