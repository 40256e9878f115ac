//! Several replicas on one S3 bucket (moto), coordinated through Redis (Debian's
//! `redis-server`), in front of a real upstream (Distribution): `tests/common/fleet.rs`.

mod common;

use std::time::Duration;

use common::distribution::Distribution;
use common::fleet::{Fleet, SECRET};
use common::http::{client, read};
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
