//! Several replicas on one S3 bucket (moto), coordinated through Redis (Debian's
//! `redis-server`), in front of a real upstream (Distribution): `tests/common/fleet.rs`.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::distribution::Distribution;
use common::fleet::{pull, push_generated, Fleet, Pull, SECRET};
use common::http::{client, client_with_timeout, read};
use common::pause::Pauses;
use common::wait_until;

/// Without Redis a second replica refuses to start beside a live one (naming it and the
/// fix), and starts when the operator allows it; a replica that was SIGKILLed does not count
/// as live (its heartbeat names a dead process of this host).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replica_without_redis_refuses_to_start_unless_allowed() {
    let up = Distribution::start(false);
    let upstream = format!("127.0.0.1:{}", up.port);
    let mut fleet = Fleet::start_with(1, &upstream, "", false);
    let first = fleet.at(0).bucket.as_ref().unwrap().objects("meta/replicas/");
    assert_eq!(first.len(), 1, "the first replica's heartbeat is in the bucket: {first:?}");

    let second = fleet.add_slot();
    let cfg = fleet.config_of(second);
    let err = match fleet.try_spawn(second, &cfg) {
        Ok(_) => panic!("a second replica without redis started beside a live one"),
        Err(log) => log,
    };
    assert!(err.contains("another replica is serving this store"), "{err}");
    assert!(err.contains("[redis] url") && err.contains("cluster.allow_without_redis"), "{err}");

    let allowed = fleet.try_spawn(second, &format!("{cfg}allow_without_redis = true\n"));
    let allowed = allowed.unwrap_or_else(|log| panic!("allowed replica did not start: {log}"));
    assert!(allowed.log_text().contains("each replica fetches and evicts on its own"), "{}", allowed.log_text());
    drop(allowed);

    // SIGKILL the first: its heartbeat stays, but names a dead process.
    fleet.kill(0);
    let alone = fleet.try_spawn(second, &cfg);
    assert!(
        alone.is_ok(),
        "a dead replica's heartbeat kept a new one from starting: {}",
        alone.err().unwrap_or_default()
    );
}

/// With Redis, replicas start beside each other, record heartbeats, and their internal
/// endpoints answer only requests carrying the fleet's secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_redis_start_together_and_peer_endpoints_need_the_secret() {
    let up = Distribution::start(false);
    let upstream = format!("127.0.0.1:{}", up.port);
    let fleet = Fleet::start(3, &upstream, "");
    let bucket = fleet.at(0).bucket.as_ref().unwrap();
    let seen = wait_until(Duration::from_secs(10), || bucket.objects("meta/replicas/").len() == 3).await;
    assert!(seen, "three heartbeats: {:?}", bucket.objects("meta/replicas/"));

    let http = client();
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..fleet.len() {
        let url = fleet.at(i).url("/_stevedore/cluster/ping");
        let anon = read(http.get(&url)).await;
        assert_eq!(anon.status, 401, "replica {i}: ping without the secret: {}", anon.text());
        let wrong = read(http.get(&url).bearer_auth("not-the-fleet-secret")).await;
        assert_eq!(wrong.status, 401, "replica {i}: ping with a wrong secret");
        let ok = read(http.get(&url).bearer_auth(SECRET)).await;
        assert_eq!(ok.status, 200, "replica {i}: ping with the secret: {}", ok.text());
        let v: serde_json::Value = serde_json::from_slice(&ok.body).unwrap();
        ids.insert(v["replica"].as_str().unwrap().to_string());
        // Not a registry route: /v2 never reaches it, and the catalog does not list it.
        let v2 = read(http.get(fleet.at(i).url("/v2/_stevedore/cluster/ping"))).await;
        assert_ne!(v2.status, 200, "replica {i}: the peer endpoint is reachable under /v2");
    }
    assert_eq!(ids.len(), 3, "three distinct replica ids: {ids:?}");
    let end = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = read(http.get(fleet.at(0).url("/metrics"))).await.text();
        let cluster: Vec<&str> = metrics.lines().filter(|l| l.starts_with("stevedore_cluster")).collect();
        if cluster.contains(&"stevedore_cluster_redis_up 1") && cluster.contains(&"stevedore_cluster_replicas 3") {
            break;
        }
        assert!(std::time::Instant::now() < end, "cluster metrics: {cluster:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const MIB: u64 = 1 << 20;
/// The test hook that slows every fill down to so many bytes a second.
const FILL_RATE: &str = "STEVEDORE_TEST_FILL_BYTES_PER_SEC";

fn blob_url(fleet: &Fleet, i: usize, repo: &str, d: &str) -> String {
    fleet.url_of(i, &format!("/v2/{repo}/blobs/{d}"))
}

/// The log lines of replica `i` that record a committed fill of `digest`.
fn fills_committed(fleet: &Fleet, i: usize, digest: &str) -> usize {
    fleet.at(i).log_text().lines().filter(|l| l.contains("fill committed") && l.contains(digest)).count()
}

/// 16 concurrent cold GETs of one 256 MiB blob, spread over three replicas, cost exactly one
/// upstream GET: one replica fills (its clients: `miss`, `joined`), the other two relay its
/// growing fill (`peer`) and their clients get bytes long before the fill ends. Every
/// response hashes right, the bucket holds the blob intact, and nothing of the fill is left
/// (ingest objects, multipart uploads).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_cold_pulls_over_three_replicas_cost_one_upstream_get() {
    const SIZE: u64 = 256 * MIB;
    const CLIENTS: usize = 16;
    let t0 = std::time::Instant::now();
    let up = Distribution::start(false);
    let upstream = format!("127.0.0.1:{}", up.port);
    let pusher = common::http::Registry::with_timeout(&up.url(), Duration::from_secs(180));
    let digest = push_generated(&pusher, "fleet/big", 0x14_0001, SIZE).await;
    eprintln!("pushed {} MiB upstream at {:.1} s", SIZE / MIB, t0.elapsed().as_secs_f64());
    let fleet = Fleet::start(3, &upstream, "");
    up.settle();
    let gets_before = up.blob_gets("fleet/big");

    let http = client_with_timeout(Duration::from_secs(240));
    let pulls = futures::future::join_all((0..CLIENTS).map(|c| {
        let (http, url) = (http.clone(), fleet.at(c % 3).url(&format!("/v2/fleet/big/blobs/{digest}")));
        async move { (c % 3, pull(&http, &url, None).await) }
    }))
    .await;
    eprintln!("16 pulls done at {:.1} s", t0.elapsed().as_secs_f64());

    for (r, p) in &pulls {
        assert!(p.complete(&digest, SIZE), "a client of replica {r}: {p:?}");
        assert_eq!(p.content_length, Some(SIZE), "Content-Length on replica {r} ({})", p.cache);
    }
    up.settle();
    assert_eq!(up.blob_gets("fleet/big") - gets_before, 1, "upstream blob GETs:\n{}", up.requests_for("fleet/big"));

    let misses: Vec<&(usize, Pull)> = pulls.iter().filter(|(_, p)| p.cache == "miss").collect();
    assert_eq!(
        misses.len(),
        1,
        "one client started the fill: {:?}",
        pulls.iter().map(|(r, p)| (r, &p.cache)).collect::<Vec<_>>()
    );
    let (leader, leader_pull) = (misses[0].0, &misses[0].1);
    // The clients had the verified bytes; the commit follows.
    wait_until(Duration::from_secs(15), || fills_committed(&fleet, leader, &digest) == 1).await;
    assert_eq!(fills_committed(&fleet, leader, &digest), 1, "the leader's log records its fill");
    let mut relayed = 0;
    for (r, p) in pulls.iter().filter(|(r, _)| *r != leader) {
        assert_eq!(p.cache, "peer", "a client of replica {r} (the leader is {leader})");
        assert_eq!(fills_committed(&fleet, *r, &digest), 0, "replica {r} filled too");
        let first = p.first_byte.expect("bytes arrived");
        assert!(
            first < leader_pull.done,
            "a client of replica {r} got its first byte {:?} after the leader's client had the whole blob",
            first - leader_pull.done
        );
        relayed += 1;
    }
    for (r, p) in pulls.iter().filter(|(r, _)| *r == leader) {
        assert!(p.cache == "miss" || p.cache == "joined", "a client of the leader {r}: {}", p.cache);
    }
    let (mut streams, mut served) = (0.0, 0.0);
    for i in 0..3 {
        streams += fleet.metric(i, "stevedore_cluster_peer_streams_total").await;
        served += fleet.metric(i, "stevedore_cluster_peer_served_total").await;
    }
    assert_eq!((streams, served), (relayed as f64, relayed as f64), "peer streams relayed and served");
    assert_eq!(fleet.metric(leader, "stevedore_cluster_peer_served_total").await, relayed as f64);

    let bucket = fleet.at(0).bucket.as_ref().unwrap();
    assert!(bucket.blobs().contains(&digest), "the blob is in the bucket: {:?}", bucket.blobs());
    assert_eq!(bucket.assert_blobs_intact(), 1);
    let clean = wait_until(Duration::from_secs(15), || {
        bucket.objects("ingest/").is_empty() && bucket.multipart_uploads().is_empty()
    })
    .await;
    assert!(clean, "left behind: {:?} {:?}", bucket.objects("ingest/"), bucket.multipart_uploads());
    assert!(fleet.redis.as_ref().unwrap().keys("stevedore:fill:*").is_empty(), "the fill's lease was released");
    eprintln!("done at {:.1} s", t0.elapsed().as_secs_f64());
}

/// The leader is SIGKILLed mid-fill: every client (of the survivors and of the dead leader)
/// gets a complete, correct blob or a clean error (no response, a cut body, a 5xx with the
/// spec's error body — never a clean short end) and succeeds on retry at a surviving replica;
/// a survivor takes the lease over; the upstream sees at most two GETs; every blob in the
/// bucket hashes to its name.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_killed_mid_fill_is_taken_over() {
    const SIZE: u64 = 24 * MIB;
    let up = Distribution::start(false);
    let upstream = format!("127.0.0.1:{}", up.port);
    let digest = push_generated(&up.registry(), "fleet/slow", 0x14_0002, SIZE).await;
    // Fills run at 6 MiB/s: the first takes 4 s, time enough to kill its replica.
    let rate = (6 * MIB).to_string();
    let mut fleet = Fleet::start_env(3, &upstream, "", true, &[(FILL_RATE, &rate)]);
    up.settle();
    let gets_before = up.blob_gets("fleet/slow");

    let http = client_with_timeout(Duration::from_secs(60));
    let urls: Vec<String> = (0..3).map(|i| fleet.url_of(i, &format!("/v2/fleet/slow/blobs/{digest}"))).collect();
    let killed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX));
    let first = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..6)
        .map(|c| {
            let (http, urls, killed, first, digest) =
                (http.clone(), urls.clone(), killed.clone(), first.clone(), digest.clone());
            tokio::spawn(async move {
                let mut tries = Vec::new();
                let mut r = c % 3;
                for _ in 0..4 {
                    let p = pull(&http, &urls[r], Some(&first)).await;
                    let ok = p.complete(&digest, SIZE);
                    tries.push((r, p));
                    if ok {
                        break;
                    }
                    // Retry where the load balancer would send it: a replica still serving.
                    if killed.load(std::sync::atomic::Ordering::SeqCst) == r {
                        r = (r + 1) % 3;
                    }
                }
                tries
            })
        })
        .collect();

    // Kill the lease's holder once clients receive bytes of its fill.
    let lease = format!("fill:{digest}");
    let mut leader = None;
    let seen = wait_until(Duration::from_secs(20), || {
        leader = fleet.lease_holder(&lease);
        leader.is_some() && first.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    assert!(seen, "a fill started (lease holder {leader:?})");
    let leader = leader.unwrap();
    assert_eq!(fills_committed(&fleet, leader, &digest), 0, "the fill was over before the kill");
    killed.store(leader, std::sync::atomic::Ordering::SeqCst);
    fleet.kill(leader);

    let mut errors = 0;
    for c in clients {
        let tries = c.await.unwrap();
        let (r, last) = tries.last().unwrap();
        assert!(last.complete(&digest, SIZE), "client's last try (replica {r}) failed: {tries:#?}");
        for (r, p) in &tries[..tries.len() - 1] {
            assert!(p.clean_error(), "a failed try at replica {r} was not a clean error: {p:?}");
            errors += 1;
        }
    }
    eprintln!("{errors} tries failed cleanly and were retried");
    let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let mut takeovers = 0.0;
    for &i in &survivors {
        takeovers += fleet.metric(i, "stevedore_cluster_takeovers_total").await;
    }
    let logged = survivors.iter().any(|&i| fleet.at(i).log_text().contains("taking over the fill"));
    assert!(takeovers >= 1.0 && logged, "a survivor took the lease over ({takeovers} takeovers counted)");
    // The clients had the verified bytes; the commit follows.
    let committed = || survivors.iter().map(|&i| fills_committed(&fleet, i, &digest)).sum::<usize>();
    wait_until(Duration::from_secs(15), || committed() >= 1).await;
    let committed = committed();
    assert_eq!(committed, 1, "one survivor filled the blob");
    up.settle();
    let gets = up.blob_gets("fleet/slow") - gets_before;
    assert!((1..=2).contains(&gets), "{gets} upstream blob GETs:\n{}", up.requests_for("fleet/slow"));
    let bucket = fleet.at(survivors[0]).bucket.as_ref().unwrap();
    assert!(bucket.blobs().contains(&digest));
    assert_eq!(bucket.assert_blobs_intact(), 1);
}

/// Redis killed mid-run: the replicas keep serving cold and warm pulls, each on its own (at
/// most one upstream GET per replica per blob); once Redis is back, a new cold blob pulled on
/// every replica costs one upstream GET again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_serve_without_redis_and_coordinate_again_when_it_returns() {
    const SIZE: u64 = 2 * MIB;
    let up = Distribution::start(false);
    let upstream = format!("127.0.0.1:{}", up.port);
    let reg = up.registry();
    let warm = push_generated(&reg, "fleet/warm", 0x14_0010, SIZE).await;
    let down = push_generated(&reg, "fleet/down", 0x14_0011, SIZE).await;
    let back = push_generated(&reg, "fleet/back", 0x14_0012, SIZE).await;
    let mut fleet = Fleet::start(3, &upstream, "");
    let http = client();

    // Six concurrent pulls, two per replica.
    async fn pull_all(http: &reqwest::Client, urls: Vec<String>) -> Vec<Pull> {
        futures::future::join_all(urls.iter().map(|u| pull(http, u, None))).await
    }

    let w = pull(&http, &blob_url(&fleet, 0, "fleet/warm", &warm), None).await;
    assert!(w.complete(&warm, SIZE), "{w:?}");
    up.settle();
    assert_eq!(up.blob_gets("fleet/warm"), 1);

    fleet.redis.as_mut().unwrap().kill();
    assert!(
        fleet.wait_metric("stevedore_cluster_redis_up", 0.0, Duration::from_secs(15)).await,
        "every replica noticed redis is gone"
    );
    let urls: Vec<String> = (0..6).map(|c| blob_url(&fleet, c % 3, "fleet/down", &down)).collect();
    for p in pull_all(&http, urls).await {
        assert!(p.complete(&down, SIZE), "a cold pull without redis: {p:?}");
    }
    for i in 0..3 {
        let p = pull(&http, &blob_url(&fleet, i, "fleet/warm", &warm), None).await;
        assert!(p.complete(&warm, SIZE) && p.cache == "hit", "a warm pull without redis at replica {i}: {p:?}");
    }
    up.settle();
    let gets = up.blob_gets("fleet/down");
    assert!((1..=3).contains(&gets), "{gets} upstream GETs without redis:\n{}", up.requests_for("fleet/down"));
    // Each GET is one replica's fill (the commits follow the clients' last bytes).
    let commits = || (0..3).map(|i| fills_committed(&fleet, i, &down)).collect::<Vec<_>>();
    wait_until(Duration::from_secs(15), || commits().iter().sum::<usize>() == gets).await;
    let per_replica = commits();
    assert_eq!(per_replica.iter().sum::<usize>(), gets, "fills committed per replica: {per_replica:?}");
    assert!(per_replica.iter().all(|n| *n <= 1), "a replica fetched one blob twice: {per_replica:?}");
    eprintln!("without redis: {gets} upstream GETs, fills per replica {per_replica:?}");
    assert_eq!(up.blob_gets("fleet/warm"), 1, "warm pulls went upstream");

    fleet.redis.as_mut().unwrap().up();
    assert!(
        fleet.wait_metric("stevedore_cluster_redis_up", 1.0, Duration::from_secs(20)).await,
        "every replica reconnected to redis"
    );
    let urls: Vec<String> = (0..6).map(|c| blob_url(&fleet, c % 3, "fleet/back", &back)).collect();
    for p in pull_all(&http, urls).await {
        assert!(p.complete(&back, SIZE), "a cold pull after redis returned: {p:?}");
    }
    up.settle();
    assert_eq!(up.blob_gets("fleet/back"), 1, "coordination resumed:\n{}", up.requests_for("fleet/back"));
    let bucket = fleet.at(0).bucket.as_ref().unwrap();
    assert_eq!(bucket.assert_blobs_intact(), 3);
}

/// While one replica fills a blob, ranged GETs on another are relayed with the leader's
/// answer while the fill runs: 206 with the bytes and `Content-Range`, or 416 with the
/// spec's error and `Content-Range: bytes */<size>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranged_pulls_are_relayed_from_the_leader() {
    const SIZE: u64 = 8 * MIB;
    let seed = 0x14_0020;
    let up = Distribution::start(false);
    let upstream = format!("127.0.0.1:{}", up.port);
    let digest = push_generated(&up.registry(), "fleet/range", seed, SIZE).await;
    // A 2 s fill.
    let rate = (4 * MIB).to_string();
    let fleet = Fleet::start_env(2, &upstream, "", true, &[(FILL_RATE, &rate)]);
    up.settle();
    let http = client();
    let whole = {
        let (http, url) = (http.clone(), blob_url(&fleet, 0, "fleet/range", &digest));
        tokio::spawn(async move { pull(&http, &url, None).await })
    };
    let lease = format!("fill:{digest}");
    assert!(wait_until(Duration::from_secs(10), || fleet.lease_holder(&lease) == Some(0)).await, "replica 0 fills");

    let url = blob_url(&fleet, 1, "fleet/range", &digest);
    let beyond = read(http.get(&url).header("range", format!("bytes={SIZE}-"))).await;
    common::http::assert_json_error(&beyond, 416, "RANGE_INVALID", "a range past the end, relayed");
    assert_eq!(common::http::hdr(&beyond.headers, "content-range"), Some(format!("bytes */{SIZE}")));
    assert_eq!(beyond.cache(), "peer", "the 416 came from the leader");
    let part = read(http.get(&url).header("range", "bytes=1000-2999")).await;
    assert_eq!(part.status, 206, "{}", part.text());
    assert_eq!(part.cache(), "peer");
    assert_eq!(common::http::hdr(&part.headers, "content-range"), Some(format!("bytes 1000-2999/{SIZE}")));
    assert_eq!(common::http::hdr(&part.headers, "docker-content-digest"), Some(digest.clone()));
    assert!(part.body == common::data::bytes_at(seed, 1000, 2000), "the range's bytes");

    let whole = whole.await.unwrap();
    assert!(whole.complete(&digest, SIZE), "{whole:?}");
    // A range's last byte, as every reader's, waits for the whole blob's verification.
    let first = part.first_byte.expect("the range's bytes");
    assert!(first < whole.done && beyond.done < whole.done, "the ranges were answered while the fill ran");
    up.settle();
    assert_eq!(up.blob_gets("fleet/range"), 1, "{}", up.requests_for("fleet/range"));
}

/// A stand-in for a replica that lies: answers every request with `size` zero bytes as the
/// blob it was asked for, in the headers a replica's fill endpoint sends. Returns its URL
/// and the number of requests it received.
async fn lying_peer(size: u64) -> (String, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                seen.fetch_add(1, Ordering::SeqCst);
                let text = String::from_utf8_lossy(&head).into_owned();
                // The relay names the repository in its query (`?host=…&name=…`).
                let path = text.split(' ').nth(1).and_then(|p| p.split('?').next());
                let digest = path.and_then(|p| p.rsplit('/').next()).unwrap_or("").to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {size}\r\ndocker-content-digest: {digest}\r\n\
                     x-stevedore-peer: fill\r\ncontent-type: application/octet-stream\r\nconnection: close\r\n\r\n"
                );
                if sock.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
                let zeros = vec![0u8; 64 << 10];
                let mut left = size as usize;
                while left > 0 {
                    let n = left.min(zeros.len());
                    if sock.write_all(&zeros[..n]).await.is_err() {
                        return;
                    }
                    left -= n;
                }
            });
        }
    });
    (url, hits)
}

/// Redis is coordination, never trusted with where clients' bytes or the fleet's secret go:
/// a fill lease naming a holder the store's replica registry does not know is never
/// contacted (the replica fills on its own, verified), and a registered peer whose relayed
/// bytes do not hash to the digest never gives a client a complete response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_holders_are_checked_against_the_registry_and_relayed_bytes_are_verified() {
    const SIZE: u64 = 2 * MIB;
    let up = Distribution::start(false);
    let upstream = format!("127.0.0.1:{}", up.port);
    let forged = push_generated(&up.registry(), "fleet/forged", 0x14_0030, SIZE).await;
    let lying = push_generated(&up.registry(), "fleet/lying", 0x14_0031, SIZE).await;
    let fleet = Fleet::start(1, &upstream, "");
    up.settle();
    let redis = fleet.redis.as_ref().unwrap();
    let (peer, hits) = lying_peer(SIZE).await;
    let http = client();

    // A lease value written into Redis by something that is not a replica.
    let stranger = uuid::Uuid::new_v4();
    let set =
        redis.command(&["SET", &format!("stevedore:fill:{forged}"), &format!("{stranger} {peer} tok"), "PX", "60000"]);
    assert!(set.contains("OK"), "{set}");
    let got = pull(&http, &blob_url(&fleet, 0, "fleet/forged", &forged), None).await;
    assert!(got.complete(&forged, SIZE), "{got:?}");
    assert_eq!(got.cache, "miss", "filled by the replica itself");
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the unregistered holder was contacted");
    assert_eq!(fleet.metric(0, "stevedore_cluster_unregistered_holders_total").await, 1.0);
    up.settle();
    assert_eq!(up.blob_gets("fleet/forged"), 1, "{}", up.requests_for("fleet/forged"));

    // A registered replica (a fresh heartbeat in the store, another host) that lies.
    let liar = uuid::Uuid::now_v7();
    let heartbeat = serde_json::json!({
        "replica": liar.to_string(), "advertise": peer, "host": "elsewhere", "pid": 1, "redis": true,
        "started_unix_ms": 0u64,
    });
    let bucket = fleet.at(0).bucket.as_ref().unwrap();
    bucket.put(&format!("meta/replicas/{liar}"), heartbeat.to_string().as_bytes());
    let lease = format!("stevedore:fill:{lying}");
    let set = redis.command(&["SET", &lease, &format!("{liar} {peer} tok"), "PX", "60000"]);
    assert!(set.contains("OK"), "{set}");
    let got = pull(&http, &blob_url(&fleet, 0, "fleet/lying", &lying), None).await;
    assert_eq!(hits.load(Ordering::SeqCst), 1, "the registered holder was asked");
    assert_eq!(got.cache, "peer", "{got:?}");
    assert!(got.clean_error(), "a peer's wrong bytes reached a client as a complete blob: {got:?}");
    assert!(got.len < SIZE, "the client got every byte: {got:?}");
    assert_eq!(fleet.metric(0, "stevedore_cluster_relay_mismatches_total").await, 1.0);
    assert!(!bucket.blobs().iter().any(|k| k.contains(&lying[7..])), "the relayed bytes were stored");
    // Once the lease is let go, the replica fills the blob itself.
    redis.command(&["DEL", &lease]);
    let got = pull(&http, &blob_url(&fleet, 0, "fleet/lying", &lying), None).await;
    assert!(got.complete(&lying, SIZE), "{got:?}");
    bucket.delete(&format!("meta/replicas/{liar}"));
}

/// A relay carries the repository (issue #23, defect 2, across replicas): while replica 0
/// fills a layer for `private/app` (held mid-fill), a GET of the same digest on replica 1
/// under `public/app`, where the upstream does not have it, is 404 BLOB_UNKNOWN with no
/// bytes (not relayed); a GET of `private/app` on replica 1 is relayed (`peer`) without any
/// upstream check; both get the blob's bytes once the fill goes on, from one upstream GET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_of_another_repositorys_fill_needs_the_upstream_to_have_it_there() {
    use common::fake::{Fake, Plan};
    let fake = Fake::start().await;
    let fleet = Fleet::start(2, &fake.addr.to_string(), "");
    let data = common::data::bytes(0x23_0002, 4 << 20);
    let d = fake.add_blob(&data);
    fake.blob_only_in(&d, "private/app");
    let (plan, gate) = Plan::new(data.clone()).hold_after(1 << 20);
    fake.plan(&d, plan);
    let http = client();
    let head = |url: String| {
        let http = http.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(30), http.get(url).send())
                .await
                .expect("a response head within 30 s")
                .expect("a response")
        }
    };
    let alice = head(blob_url(&fleet, 0, "private/app", &d)).await;
    assert_eq!(alice.status(), 200, "the filling replica's client");
    let alice = tokio::spawn(alice.bytes());

    let bob = head(blob_url(&fleet, 1, "public/app", &d)).await;
    let cache = common::http::hdr(bob.headers(), "x-stevedore-cache").unwrap_or_default();
    assert_eq!(bob.status(), 404, "another repository's fill was relayed (x-stevedore-cache: {cache})");
    let body = tokio::time::timeout(Duration::from_secs(10), bob.text()).await.expect("the 404 body").unwrap();
    assert!(body.contains("BLOB_UNKNOWN") && body.len() < 4096, "{body}");

    let carol = head(blob_url(&fleet, 1, "private/app", &d)).await;
    assert_eq!(
        (carol.status().as_u16(), common::http::hdr(carol.headers(), "x-stevedore-cache").as_deref()),
        (200, Some("peer")),
        "the same repository on the other replica"
    );
    let carol = tokio::spawn(carol.bytes());
    gate.send(true).unwrap();
    for (who, body) in [("alice", alice), ("carol", carol)] {
        let got = tokio::time::timeout(Duration::from_secs(60), body).await.expect("the body").unwrap().unwrap();
        assert_eq!(common::data::sha256(&got), d, "{who}'s bytes");
    }
    assert_eq!(fake.count("GET", &format!("/v2/private/app/blobs/{d}")), 1, "upstream GETs:\n  {}", fake.dump());
    assert_eq!(
        fake.count("HEAD", &format!("/v2/private/app/blobs/{d}")),
        0,
        "a same-repository relay checked upstream"
    );
}

/// How long a test waits for a replica to reach a pause point.
const REACH: Duration = Duration::from_secs(30);

/// Two replicas on one bucket for the removal tests (issue #22, "another replica's
/// removal"): replica 0 pushes (no cap, no GC, its pause point `fleet.removal_wait` armed:
/// a make-reachable that finds a digest's removal lease held); replica 1 removes (`cache`
/// as its `[cache]` section, `points` armed). Both see `local/*` as local repositories.
fn removal_fleet(upstream: &str, cache: &str, points: &[&str]) -> (Fleet, Pauses, Pauses) {
    let mut fleet = Fleet::start_env(0, upstream, "", true, &[]);
    let mut pauses = Vec::new();
    let setups = [
        ("fleet.removal_wait".to_string(), "check_interval = \"1h\"\ngc_interval = \"0s\"\n".to_string()),
        (points.join(","), cache.to_string()),
    ];
    for (i, (armed, cache)) in setups.iter().enumerate() {
        let slot = fleet.add_slot();
        pauses.push(Pauses::in_dir(&fleet.root_of(slot).join("pause")));
        fleet.env = vec![
            ("STEVEDORE_PAUSE".to_string(), armed.clone()),
            ("STEVEDORE_PAUSE_DIR".to_string(), pauses[i].dir().to_str().unwrap().to_string()),
        ];
        let cfg = fleet.config_of(slot).replacen("[proxy]\n", "[proxy]\nlocal_namespaces = [\"local/*\"]\n", 1)
            + &format!("\n[cache]\naccess_flush_interval = \"1s\"\n{cache}");
        let r = fleet.try_spawn(slot, &cfg).unwrap_or_else(|log| panic!("replica {slot}: {log}"));
        fleet.replicas[slot] = Some(r);
    }
    let b = pauses.pop().unwrap();
    let a = pauses.pop().unwrap();
    (fleet, a, b)
}

/// Waits (bounded) until none of `digests` is in the fleet's bucket.
async fn gone_from_bucket(fleet: &Fleet, digests: &[String]) -> bool {
    let bucket = fleet.at(0).bucket.as_ref().unwrap();
    wait_until(REACH, || {
        let blobs = bucket.blobs();
        !digests.iter().any(|d| blobs.contains(d))
    })
    .await
}

/// Replica 0 pushes `data` (digest `d`) to `local/app` while replica 1 is paused in a removal
/// of `d` (its lease `remove:<d>` held, its re-check done): the push must wait for the
/// removal (pause point `fleet.removal_wait`) rather than answer before the delete. Then
/// replica 1 goes on and finishes (`removed`: every digest its removal deletes), and the push
/// goes on. Returns the push's status and whether it waited.
async fn push_during_removal(
    fleet: &Fleet,
    a: &Pauses,
    b: &Pauses,
    b_point: &str,
    d: &str,
    data: Vec<u8>,
    removed: &[String],
) -> (u16, bool) {
    let reg = fleet.at(0).registry();
    let mut push = tokio::spawn({
        let (reg, d) = (reg.clone(), d.to_string());
        async move {
            let loc = reg.start_upload("local/app").await;
            reg.finish_upload(&loc, &d, data).await.status().as_u16()
        }
    });
    // Either the push waits for the removal's lease (fixed) or it answers at once.
    let mut answered = None;
    let waited = wait_until(REACH, || {
        if push.is_finished() {
            answered = Some(());
        }
        answered.is_some() || a.is_reached("fleet.removal_wait")
    })
    .await;
    assert!(waited, "the push neither answered nor waited for the removal within {REACH:?}");
    let waited = answered.is_none();
    if waited {
        assert!(!push.is_finished(), "the push answered while it waits for the removal");
    }
    b.go(b_point).await;
    let lease = format!("stevedore:remove:{d}");
    let redis = fleet.redis.as_ref().unwrap();
    let free = wait_until(REACH, || redis.keys(&lease).is_empty()).await;
    assert!(free, "the removal's lease {lease} was not released");
    assert!(
        gone_from_bucket(fleet, removed).await,
        "the removal did not finish: {:?}",
        fleet.at(0).bucket.as_ref().unwrap().blobs()
    );
    if waited {
        a.go("fleet.removal_wait").await;
    }
    let status = tokio::time::timeout(REACH, &mut push).await.expect("the push answers").unwrap();
    (status, waited)
}

/// Every replica serves `img`'s manifest (by digest) and blobs from `local/app`, byte for byte.
async fn pulls_back_everywhere(fleet: &Fleet, img: &common::oci::Image, what: &str) {
    let http = client();
    for i in 0..fleet.len() {
        let r = common::http::get_manifest(
            &http,
            fleet.url_of(i, &format!("/v2/local/app/manifests/{}", img.manifest.digest)),
        )
        .await;
        common::http::assert_content(
            &r,
            &img.manifest.digest,
            &img.manifest.data,
            &format!("{what}: manifest from replica {i}"),
        );
        for blob in img.blobs() {
            let r = read(http.get(blob_url(fleet, i, "local/app", &blob.digest))).await;
            common::http::assert_content(
                &r,
                &blob.digest,
                &blob.data,
                &format!("{what}: blob {} from replica {i}", blob.digest),
            );
        }
    }
}

/// Issue #22, "another replica's removal": replica 1's eviction has decided to evict a
/// pulled-through image, re-checked it (no use since its scan) and is about to delete it,
/// when a client of replica 0 pushes one of its layers to a local repository, then a
/// manifest using it. The push waits for the eviction's removal lease (it does not answer
/// 201 before the delete); once the eviction is done, it stores the layer again, and the
/// image pulls back whole from both replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_waits_for_another_replicas_eviction_and_stays_stored() {
    use common::fake::Fake;
    let fake = Fake::start().await;
    let old = fake.add_image("team/a", "v1", 0x22_0101, &[200_000, 200_000]);
    let new = fake.add_image("team/b", "v1", 0x22_0102, &[200_000]);
    let cache = "max_size = \"500KiB\"\ncheck_interval = \"1s\"\ngc_interval = \"0s\"\n";
    let (fleet, a, b) = removal_fleet(&fake.addr.to_string(), cache, &["evict.before_delete"]);
    let http = client();
    // Through replica 1: the old image, then the new one; past the high mark, the old one
    // (least recently used) is evicted.
    for (repo, img) in [("team/a", &old), ("team/b", &new)] {
        let r = common::http::get_manifest(&http, fleet.url_of(1, &format!("/v2/{repo}/manifests/v1"))).await;
        common::http::assert_content(&r, &img.digest, &img.manifest, repo);
        for (d, body) in &img.blobs {
            common::http::assert_content(&read(http.get(blob_url(&fleet, 1, repo, d))).await, d, body, repo);
        }
    }
    b.reached("evict.before_delete", REACH).await;
    let mut evicted: Vec<String> = old.blobs.iter().map(|(d, _)| d.clone()).collect();
    evicted.push(old.digest.clone());

    // The CI job on replica 0 pushes an image built FROM the old one: its first layer first.
    let (layer_d, layer) = old.blobs[1].clone();
    let (status, waited) =
        push_during_removal(&fleet, &a, &b, "evict.before_delete", &layer_d, layer.clone(), &evicted).await;
    assert_eq!(status, 201, "the push of {layer_d} during the other replica's eviction");
    let r = read(http.get(blob_url(&fleet, 0, "local/app", &layer_d))).await;
    common::http::assert_content(&r, &layer_d, &layer, "a layer pushed (201) while another replica evicted it");

    let config = common::oci::Blob::new(common::oci::MT_CONFIG, common::data::bytes(0x22_0103, 500));
    let reg = fleet.at(0).registry();
    reg.upload_blob("local/app", &config.data).await;
    let img = image_of(config, vec![common::oci::Blob::new(common::oci::MT_LAYER_GZIP, layer)]);
    let put = reg.put_manifest("local/app", "v1", common::oci::MT_MANIFEST, &img.manifest.data).await;
    assert_eq!(put.status().as_u16(), 201, "a manifest using the layer pushed during the eviction");
    pulls_back_everywhere(&fleet, &img, "the image built FROM the evicted one").await;
    assert!(waited, "the push did not wait for the other replica's removal (pause point fleet.removal_wait)");
}

/// A removal fleet (replica 1 running the online GC each second, `gc_grace` 2 s) where
/// replica 0 pushed an image of `seed` and deleted its manifest, and replica 1's GC is paused
/// at `gc.before_delete` about to delete the first piece of it. The fleet, its pauses, the image.
async fn gc_paused_on_a_deleted_image(upstream: &str, seed: u64) -> (Fleet, Pauses, Pauses, common::oci::Image) {
    let cache = "gc_interval = \"1s\"\ngc_grace = \"2s\"\n";
    let (fleet, a, b) = removal_fleet(upstream, cache, &["gc.before_delete"]);
    let reg = fleet.at(0).registry();
    let img = common::oci::make_image(seed, 2, 50_000, "amd64", "linux");
    reg.push_image("local/app", &img, Some("v1")).await;
    let r = reg.delete(&format!("/v2/local/app/manifests/{}", img.manifest.digest)).await;
    assert_eq!(r.status().as_u16(), 202, "deleting the manifest");
    b.reached("gc.before_delete", REACH).await;
    (fleet, a, b, img)
}

/// The bytes of `img`'s piece `d` (its manifest or one of its blobs).
fn piece_of(img: &common::oci::Image, d: &str) -> Vec<u8> {
    if d == img.manifest.digest {
        img.manifest.data.clone()
    } else {
        img.blobs().iter().find(|b| b.digest == d).expect("the GC removes one of the image's digests").data.clone()
    }
}

/// The same with replica 1's online GC: a deleted image's content, past `gc_grace`, is being
/// deleted (lease held, re-checked, paused at `gc.before_delete`) when a client of replica 0
/// pushes the image again as docker does. The blob whose removal is under way waits for it;
/// the image then pulls back whole from both replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_push_waits_for_another_replicas_gc_and_stays_stored() {
    use common::fake::Fake;
    let fake = Fake::start().await;
    // Replica 1's GC: past the grace period, the content goes; it is paused before deleting
    // the first piece, whose removal lease names it.
    let (fleet, a, b, img) = gc_paused_on_a_deleted_image(&fake.addr.to_string(), 0x22_0201).await;
    let reg = fleet.at(0).registry();
    let redis = fleet.redis.as_ref().unwrap();
    let leases = redis.keys("stevedore:remove:*");
    assert!(leases.len() <= 1, "removal leases held by the paused GC: {leases:?}");
    // Without a lease to name it: the first digest of the bucket's listing (the GC's order).
    let d = match leases.first() {
        Some(l) => l.strip_prefix("stevedore:remove:").unwrap().to_string(),
        None => img.digests().into_iter().min().unwrap(),
    };
    let data = piece_of(&img, &d);
    let (status, waited) =
        push_during_removal(&fleet, &a, &b, "gc.before_delete", &d, data.clone(), &img.digests()).await;
    assert_eq!(status, 201, "the push of {d} during the other replica's GC");
    let r = read(client().get(blob_url(&fleet, 0, "local/app", &d))).await;
    common::http::assert_content(&r, &d, &data, "a blob pushed (201) while another replica's GC deleted it");
    // The rest of docker's push: whatever is missing, then the manifest.
    for blob in img.blobs() {
        if reg.head(&format!("/v2/local/app/blobs/{}", blob.digest)).await.status().as_u16() != 200 {
            reg.upload_blob("local/app", &blob.data).await;
        }
    }
    let put = reg.put_manifest("local/app", "v1", &img.manifest.media_type, &img.manifest.data).await;
    assert_eq!(put.status().as_u16(), 201, "the re-pushed manifest");
    pulls_back_everywhere(&fleet, &img, "an image re-pushed while another replica's GC ran").await;
    assert_eq!(leases.len(), 1, "the paused GC held the removal lease of what it deletes: {leases:?}");
    assert!(waited, "the push did not wait for the other replica's removal (pause point fleet.removal_wait)");
}

/// Replica 1's GC holds the removal lease of a deleted image's piece (paused at
/// `gc.before_delete`) when Redis stops answering. Its renewals go unanswered; once
/// `lease_ttl` has passed since the last one Redis confirmed, Redis would have dropped the
/// lease, and another replica, seeing no holder, goes on: replica 0 stores that piece again
/// (201). The GC, resumed, must take its lease for lost and delete nothing. (Before, a lease
/// counted as held until a renewal was answered "expired", which an unanswered Redis never
/// does; a starved process's late renewal left the same window.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_whose_lease_redis_stopped_confirming_deletes_nothing() {
    use common::fake::Fake;
    let fake = Fake::start().await;
    let (mut fleet, _a, b, img) = gc_paused_on_a_deleted_image(&fake.addr.to_string(), 0x22_0202).await;
    let reg = fleet.at(0).registry();
    let leases = fleet.redis.as_ref().unwrap().keys("stevedore:remove:*");
    assert_eq!(leases.len(), 1, "the paused GC holds the removal lease of what it deletes: {leases:?}");
    let d = leases[0].strip_prefix("stevedore:remove:").unwrap().to_string();
    let data = piece_of(&img, &d);
    fleet.redis.as_mut().unwrap().kill();
    let stopped = std::time::Instant::now();
    // Replica 0, on its own without Redis, stores the piece again.
    let put = if d == img.manifest.digest {
        reg.put_manifest("local/app", "v1", &img.manifest.media_type, &data).await.status().as_u16()
    } else {
        let loc = reg.start_upload("local/app").await;
        reg.finish_upload(&loc, &d, data.clone()).await.status().as_u16()
    };
    assert_eq!(put, 201, "storing {d} again on replica 0 without Redis");
    // Past the lease's time to live since Redis last confirmed it (before it stopped).
    let ttl = Duration::from_secs(3);
    tokio::time::sleep(ttl.saturating_sub(stopped.elapsed())).await;
    b.go("gc.before_delete").await;
    // The GC goes on; what replica 0 stored stays readable, byte for byte, on both.
    let end = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < end {
        for i in 0..2 {
            let url = match d == img.manifest.digest {
                true => fleet.url_of(i, &format!("/v2/local/app/manifests/{d}")),
                false => blob_url(&fleet, i, "local/app", &d),
            };
            let r = read(client().get(url).header("accept", img.manifest.media_type.as_str())).await;
            common::http::assert_content(
                &r,
                &d,
                &data,
                &format!("{d}, stored (201) while a GC whose lease had lapsed ran (replica {i})"),
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An image of `config` and `layers` (its manifest built from them).
fn image_of(config: common::oci::Blob, layers: Vec<common::oci::Blob>) -> common::oci::Image {
    use common::oci::{Blob, Image, MT_MANIFEST};
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": config.descriptor(),
        "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
    });
    let manifest = Blob::new(MT_MANIFEST, serde_json::to_vec(&manifest).unwrap());
    Image { config, layers, manifest, diff_ids: Vec::new(), files: Vec::new() }
}

/// Replica 1's GC is about to remove a deleted image's content (paused at `gc.before_remove`,
/// past `gc_grace`) when Redis stops answering. Without Redis it cannot take the removal
/// leases that make a push on another replica wait for it, so it removes nothing: the
/// image's blobs stay in the bucket while Redis is down, pass after pass. Once Redis answers
/// again the GC takes the leases and reclaims them. (Before, a claim Redis did not answer
/// counted as "on your own" and the GC deleted without a lease: a push on replica 0, seeing
/// no lease, was told "stored" for a blob deleted right after.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gc_that_cannot_take_its_removal_leases_removes_nothing_until_redis_answers() {
    use common::fake::Fake;
    let fake = Fake::start().await;
    let cache = "gc_interval = \"1s\"\ngc_grace = \"2s\"\n";
    let (mut fleet, _a, b) = removal_fleet(&fake.addr.to_string(), cache, &["gc.before_remove"]);
    let reg = fleet.at(0).registry();
    let img = common::oci::make_image(0x22_0203, 2, 50_000, "amd64", "linux");
    reg.push_image("local/app", &img, Some("v1")).await;
    let r = reg.delete(&format!("/v2/local/app/manifests/{}", img.manifest.digest)).await;
    assert_eq!(r.status().as_u16(), 202, "deleting the manifest");
    b.reached("gc.before_remove", REACH).await;
    fleet.redis.as_mut().unwrap().kill();
    b.go("gc.before_remove").await;
    let bucket = fleet.at(0).bucket.clone().unwrap();
    let layers: Vec<String> = img.blobs().iter().map(|b| b.digest.clone()).collect();
    // Several passes (one a second) without Redis: every blob stays.
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < end {
        let blobs = bucket.blobs();
        let gone: Vec<&String> = layers.iter().filter(|d| !blobs.contains(d)).collect();
        assert!(gone.is_empty(), "the GC deleted {gone:?} while Redis did not answer (no removal lease)");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fleet.redis.as_mut().unwrap().up();
    assert!(
        gone_from_bucket(&fleet, &layers).await,
        "the GC did not reclaim the image once Redis answered: {:?}",
        bucket.blobs()
    );
}
