//! What ships for operators besides the binary: `deploy/prometheus/alerts.yml` checked and
//! unit-tested with Debian's `promtool` (package `prometheus`, installed by
//! `scripts/install-test-deps.sh` with its service never started), the Grafana dashboard
//! `deploy/grafana/stevedore.json`, and every metric name both use present in `/metrics` of
//! the real binary after a workload (pulls through Distribution, a rate-limiting upstream,
//! TLS serving, a cap).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::distribution::Distribution;
use common::http::{assert_content, client_trusting, get_manifest, read};
use common::oci;
use common::proc;
use common::stevedore::{config, Dialect, Stevedore};
use common::tls::TestPki;

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(rel)
}

fn promtool(args: &[&str]) -> proc::Out {
    let mut cmd = Command::new(proc::tool("promtool"));
    cmd.args(args).current_dir(deploy("prometheus"));
    proc::run_ok("promtool", cmd, Duration::from_secs(60))
}

/// `stevedore_…` names in `text` (PromQL expressions, rule files).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("stevedore_") {
        let start = i + at;
        let word_start = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if word_start {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

/// The PromQL of every panel of the dashboard.
fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(deploy("grafana/stevedore.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(d["uid"], "stevedore");
    let panels = d["panels"].as_array().expect("panels");
    let mut exprs = Vec::new();
    for p in panels {
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel {} has no targets", p["title"]));
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            exprs.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    exprs
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let out = promtool(&["check", "rules", "alerts.yml"]);
    assert!(out.stdout.contains("SUCCESS: 5 rules found"), "{}", out.describe());
    let out = promtool(&["test", "rules", "alerts_test.yml"]);
    assert!(out.stdout.contains("SUCCESS"), "{}", out.describe());
    // Every alert has a unit test.
    let rules = std::fs::read_to_string(deploy("prometheus/alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(deploy("prometheus/alerts_test.yml")).unwrap();
    let alerts: Vec<&str> = rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).collect();
    assert_eq!(
        alerts,
        [
            "StevedoreUpstreamDown",
            "StevedoreStoreOverHighWatermark",
            "StevedoreFillErrors",
            "StevedoreReplicaMissing",
            "StevedoreCertificateExpiring"
        ]
    );
    for a in alerts {
        assert!(tests.contains(&format!("alertname: {a}")), "no promtool test for {a}");
    }
}

#[test]
fn the_dashboard_covers_what_operators_ask() {
    let text = std::fs::read_to_string(deploy("grafana/stevedore.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).unwrap();
    let titles: Vec<String> =
        d["panels"].as_array().unwrap().iter().map(|p| p["title"].as_str().unwrap().to_lowercase()).collect();
    for want in [
        "hit ratio",
        "bytes saved",
        "fills",
        "upstream errors",
        "latency",
        "rate limit",
        "store usage",
        "evictions",
        "gc",
        "replicas",
    ] {
        assert!(titles.iter().any(|t| t.contains(want)), "no panel about {want}: {titles:?}");
    }
}

/// An upstream that rate-limits everything: 429 with Docker Hub's `ratelimit-remaining`.
async fn rate_limiting_upstream() -> String {
    use axum::http::StatusCode;
    let app = axum::Router::new()
        .fallback(|| async { (StatusCode::TOO_MANY_REQUESTS, [("ratelimit-remaining", "0;w=21600")], "slow down") });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_rules_use_is_in_metrics_after_a_workload() {
    let mut used = BTreeSet::new();
    for e in dashboard_exprs() {
        used.extend(metric_names(&e));
    }
    used.extend(metric_names(&std::fs::read_to_string(deploy("prometheus/alerts.yml")).unwrap()));
    assert!(used.len() >= 15, "{used:?}");

    const HOST: &str = "upstream.test";
    const LIMITED: &str = "limited.test";
    let reg = Distribution::start(false);
    let img = oci::make_image(2602, 2, 200_000, "amd64", "linux");
    reg.registry().push_image("team/app", &img, Some("1.0")).await;
    let limited = rate_limiting_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("pki"));
    let cfg = format!(
        "{}\n[cache]\nmax_size = \"1GiB\"\n\n[server.tls]\ncert = {:?}\nkey = {:?}\n",
        config(HOST, &[(HOST, &reg.url(), ""), (LIMITED, &limited, "")]),
        pki.cert_file,
        pki.key_file
    );
    let sd = Stevedore::builder().dir(&dir.path().join("stevedore")).config(&cfg).https(&pki.ca_pem).start();
    let http = client_trusting(&pki.ca_pem);

    // Pulls: misses (fills), then hits; a tag the upstream lacks; a rate-limited upstream.
    for _ in 0..2 {
        let url = |rest: &str| sd.url(&Dialect::Prefix.path(HOST, "team/app", rest));
        let r = get_manifest(&http, url("manifests/1.0")).await;
        assert_content(&r, &img.manifest.digest, &img.manifest.data, "manifest");
        for b in img.blobs().into_iter().filter(|b| b.digest != img.manifest.digest) {
            let r = read(http.get(url(&format!("blobs/{}", b.digest)))).await;
            assert_content(&r, &b.digest, &b.data, "blob");
        }
        // Fills commit after their readers are done: none in flight before the next round.
        let start = std::time::Instant::now();
        loop {
            let s: serde_json::Value = http.get(sd.url("/status.json")).send().await.unwrap().json().await.unwrap();
            if s["fills"].as_array().is_some_and(|f| f.is_empty()) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "fills in flight after 30 s: {s:#}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let r = get_manifest(&http, sd.url(&Dialect::Prefix.path(HOST, "team/app", "manifests/nope"))).await;
    assert_eq!(r.status, 404);
    let r = get_manifest(&http, sd.url(&Dialect::Prefix.path(LIMITED, "x/y", "manifests/1"))).await;
    assert_eq!(r.status, 429, "{}", r.text());

    let text = http.get(sd.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let exported: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();
    let missing: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(missing.is_empty(), "used by the dashboard or the rules, not in /metrics: {missing:?}\n{text}");

    // The figures behind the new metrics are right, not just present.
    let value = |prefix: &str| -> f64 {
        let l = text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix} in\n{text}"));
        l.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let expiry = value("stevedore_tls_certificate_expiry_seconds");
    // rcgen's certificates are valid until 4096-01-01 (unix 67_090_118_400).
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((expiry - (67_090_118_400.0 - now)).abs() < 120.0, "certificate expiry {expiry} s");
    assert_eq!(value(&format!("stevedore_upstream_ratelimit_remaining{{upstream=\"{LIMITED}\"}}")), 0.0);
    assert!(value(&format!("stevedore_upstream_ratelimit_waits_total{{upstream=\"{LIMITED}\"}}")) >= 1.0);
    assert_eq!(value(&format!("stevedore_upstream_reachable{{upstream=\"{HOST}\"}}")), 1.0);
    let pulled = img.blobs().iter().map(|b| b.data.len() as f64).sum::<f64>() + img.manifest.data.len() as f64;
    assert_eq!(value("stevedore_served_bytes_by_source_total{source=\"cache\"}"), pulled);
    assert_eq!(value("stevedore_served_bytes_by_source_total{source=\"upstream\"}"), pulled);
    assert_eq!(value("stevedore_cache_max_bytes"), (1u64 << 30) as f64);
}
