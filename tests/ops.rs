//! The operator surface of the real binary: health, readiness, metrics, the access log,
//! `check-config`, `--version`, start-up errors and graceful shutdown on SIGTERM.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{data, Stevedore};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_stevedore"))
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let s = Stevedore::local();
    let c = common::http::client();
    let r = c.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = c.get(s.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    let blob = b"metrics please".to_vec();
    let d = data::sha256(&blob);
    let r = c.post(s.url(&format!("/v2/ops/blobs/uploads/?digest={d}"))).body(blob.clone()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let r = c.get(s.url(&format!("/v2/ops/blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().to_vec(), blob);
    let r = c.get(s.url("/v2/ops/manifests/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);

    let r = c.get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let line = |prefix: &str| text.lines().find(|l| l.starts_with(prefix)).map(str::to_string);
    let counted = |route: &str, method: &str, status: &str| {
        text.lines().any(|l| {
            l.starts_with("stevedore_requests_total{")
                && l.contains(&format!("route=\"{route}\""))
                && l.contains(&format!("method=\"{method}\""))
                && l.contains(&format!("status=\"{status}\""))
        })
    };
    assert!(counted("upload", "POST", "201"), "upload not counted:\n{text}");
    assert!(counted("blob", "GET", "200"), "blob GET not counted:\n{text}");
    assert!(counted("manifest", "GET", "404"), "manifest 404 not counted:\n{text}");
    let served = line("stevedore_served_bytes_total").expect("served bytes metric");
    let served: f64 = served.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(served >= blob.len() as f64, "served bytes {served}");
}

#[test]
fn check_config_accepts_the_shipped_configs_and_names_the_bad_key() {
    for f in ["config/stevedore.toml", "config/multi-upstream.toml"] {
        let out = bin().args(["check-config", "--config", f]).output().unwrap();
        assert!(out.status.success(), "{f}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    for (text, key) in [
        ("[proxy]\ndefault_upstream = \"quay.io\"\n", "proxy.default_upstream"),
        ("[storage]\nrooot = \"/x\"\n", "rooot"),
        ("[uploads]\nsession_ttl = \"soon\"\n", "session_ttl"),
    ] {
        std::fs::write(&bad, text).unwrap();
        let out = bin().args(["check-config", "--config"]).arg(&bad).output().unwrap();
        assert!(!out.status.success(), "{text:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "error for {text:?} does not name {key}: {err}");
        // `serve` refuses the same config before binding anything.
        let out = bin().args(["serve", "--listen", "127.0.0.1:0", "--config"]).arg(&bad).output().unwrap();
        assert!(!out.status.success(), "serve started with {text:?}");
    }
    let out = bin().arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("stevedore "));
}

/// The JSON access line of the `nth` (0-based) request for `method uri`, waiting up to 10 s for
/// it: lines are written when the response body is done.
async fn access_line(sd: &Stevedore, method: &str, uri: &str, nth: usize) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let hit = sd
            .access_lines()
            .into_iter()
            .filter(|f| f["uri"].as_str() == Some(uri) && f["method"].as_str() == Some(method))
            .nth(nth);
        if let Some(v) = hit {
            return v;
        }
        assert!(Instant::now() < deadline, "no access line for {method} {uri} #{nth}:\n{}", sd.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One line per request once its body is done: the bytes actually sent, the time to the end
/// and to the head, and whether the body went out whole (a client that hangs up mid-blob
/// shows as `complete: false`).
#[tokio::test]
async fn access_log_names_the_request_and_its_outcome() {
    let sd = Stevedore::builder().rust_log("info").start();
    let addr = sd.addr.clone();
    let c = common::http::client();

    let r = c.get(format!("http://{addr}/v2/acc/tags/list?n=5")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let body = r.bytes().await.unwrap();
    let v = access_line(&sd, "GET", "/v2/acc/tags/list?n=5", 0).await;
    assert_eq!(v["status"], 404);
    assert_eq!(v["bytes"], body.len() as u64);
    assert_eq!(v["complete"], true);
    assert!(v["ms"].as_f64().unwrap() >= v["head_ms"].as_f64().unwrap());

    // A blob larger than the loopback socket buffers can hold, so a client that stops
    // reading really cuts the body short.
    let blob = data::bytes(7, 64 << 20);
    let d = data::sha256(&blob);
    let r = c.post(format!("http://{addr}/v2/acc/blobs/uploads/?digest={d}")).body(blob.clone()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let uri = format!("/v2/acc/blobs/{d}");

    let got = c.get(format!("http://{addr}{uri}")).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(got.len(), blob.len());
    let v = access_line(&sd, "GET", &uri, 0).await;
    assert_eq!(
        (v["status"].as_u64(), v["bytes"].as_u64(), v["complete"].as_bool()),
        (Some(200), Some(blob.len() as u64), Some(true))
    );

    let r = c.head(format!("http://{addr}{uri}")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v = access_line(&sd, "HEAD", &uri, 0).await;
    assert_eq!((v["bytes"].as_u64(), v["complete"].as_bool()), (Some(0), Some(true)));

    // Read the head and a little of the body, then hang up.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(s, "GET {uri} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let n = s.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    }
    let v = access_line(&sd, "GET", &uri, 1).await;
    assert_eq!(v["status"], 200);
    assert_eq!(v["complete"], false, "{v}");
    assert!(v["bytes"].as_u64().unwrap() < blob.len() as u64, "{v}");
}

/// `RUST_LOG` takes `level` and `target=level` directives; a malformed one is reported and the
/// defaults apply, and text logs carry no colour codes when stderr is not a terminal.
#[tokio::test]
async fn rust_log_directives_and_plain_text_logs() {
    let run = |filter: &'static str| async move {
        let mut sd = Stevedore::builder().rust_log(filter).text_logs().start();
        let r = common::http::client().get(sd.url("/v2/logs/tags/list")).send().await.unwrap();
        assert_eq!(r.status(), 404);
        r.bytes().await.unwrap();
        // The access line is written once the body is done: wait for it.
        let logged = common::wait_until(Duration::from_secs(10), || sd.log_text().contains("/v2/logs/tags/list")).await;
        sd.kill();
        let text = sd.log_text();
        assert!(logged, "{filter}: no access line within 10 s: {text}");
        text
    };

    let text = run("warn,stevedore::access=info").await;
    assert!(!text.contains('\x1b'), "colour codes in a log file: {text:?}");
    assert!(text.contains("/v2/logs/tags/list"), "access line missing: {text}");
    assert!(!text.contains("stevedore started"), "info line outside stevedore::access: {text}");

    let text = run("stevedore=loud").await;
    assert!(text.contains("RUST_LOG=\"stevedore=loud\" ignored"), "{text}");
    assert!(text.contains("stevedore started"), "defaults (info) not applied: {text}");
}

#[test]
fn sigterm_stops_the_server_cleanly() {
    let mut s = Stevedore::local();
    let status = s.terminate(Duration::from_secs(10)).expect("still running 10 s after SIGTERM");
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
}

/// The series counted on every request (`stevedore_requests_total`,
/// `stevedore_cache_requests_total`, `stevedore_served_bytes*`) are exact when the requests
/// come at once over several connections (the server's worker threads each keep their own
/// handles on them, `src/metrics.rs`): every request counted once, in the same series.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_request_metrics_are_exact_under_concurrent_requests() {
    use common::fake::Fake;
    use common::stevedore::config;
    const TASKS: usize = 8;
    const EACH: usize = 40;
    let fake = Fake::start().await;
    let img = fake.add_image("team/app", "1", 2611, &[3000]);
    let (layer, layer_bytes) = img.blobs[1].clone();
    let sd = Stevedore::start(&config("up.test", &[("up.test", &fake.url(), "")]));
    let c = common::http::client();
    let manifest = sd.url("/v2/team/app/manifests/1?ns=up.test");
    let blob = sd.url(&format!("/v2/team/app/blobs/{layer}?ns=up.test"));
    let accept = common::http::MANIFEST_ACCEPT;
    // The misses: the manifest and the layer are in the store before the load.
    let r = c.get(&manifest).header("accept", accept).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().to_vec(), img.manifest);
    let r = c.get(&blob).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().to_vec(), layer_bytes);
    let metrics = || {
        let (c, url) = (&c, sd.url("/metrics"));
        async move { c.get(url).send().await.unwrap().text().await.unwrap() }
    };
    let value = |text: &str, name: &str, labels: &[&str]| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    // Fills commit after their readers are done; the hits start once nothing is in flight.
    let start = Instant::now();
    while value(&metrics().await, "stevedore_fills_in_flight", &[]) != 0.0 {
        assert!(start.elapsed() < Duration::from_secs(30), "fills in flight after 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = metrics().await;

    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (c, manifest, blob, layer_bytes) =
            (common::http::client(), manifest.clone(), blob.clone(), layer_bytes.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..EACH {
                let r = c.head(&manifest).header("accept", accept).send().await.unwrap();
                assert_eq!(r.status(), 200);
                assert_eq!(r.headers()["x-stevedore-cache"], "hit");
                let r = c.get(&blob).send().await.unwrap();
                assert_eq!(r.status(), 200);
                assert_eq!(r.headers()["x-stevedore-cache"], "hit");
                assert_eq!(r.bytes().await.unwrap().to_vec(), layer_bytes);
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t).await.expect("load within 120 s").unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(120));
    let n = (TASKS * EACH) as f64;

    // The access line (and its counts) is written once the body is out: wait for the last.
    let start = Instant::now();
    let after = loop {
        let after = metrics().await;
        let source = ["source=\"cache\""];
        let got = value(&after, "stevedore_served_bytes_by_source_total", &source)
            - value(&before, "stevedore_served_bytes_by_source_total", &source);
        if got >= n * layer_bytes.len() as f64 || start.elapsed() > Duration::from_secs(10) {
            break after;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let delta = |name: &str, labels: &[&str]| value(&after, name, labels) - value(&before, name, labels);
    let req = |route: &str, method: &str| {
        let (r, m) = (format!("route=\"{route}\""), format!("method=\"{method}\""));
        delta("stevedore_requests_total", &[&r, &m, "status=\"200\""])
    };
    assert_eq!(req("manifest", "HEAD"), n, "HEAD manifest requests counted:\n{after}");
    assert_eq!(req("blob", "GET"), n, "GET blob requests counted:\n{after}");
    let hits = |kind: &str| {
        let k = format!("kind=\"{kind}\"");
        delta("stevedore_cache_requests_total", &["upstream=\"up.test\"", &k, "outcome=\"hit\""])
    };
    assert_eq!(hits("manifest"), n, "manifest hits counted:\n{after}");
    assert_eq!(hits("blob"), n, "blob hits counted:\n{after}");
    let bytes = n * layer_bytes.len() as f64;
    // (This total counts every GET answered 200, the `/metrics` bodies read here too.)
    assert!(delta("stevedore_served_bytes_total", &[]) >= bytes, "served bytes:\n{after}");
    assert_eq!(
        delta("stevedore_served_bytes_by_source_total", &["source=\"cache\""]),
        bytes,
        "bytes served from the cache:\n{after}"
    );
    assert_eq!(delta("stevedore_served_bytes_by_source_total", &["source=\"upstream\""]), 0.0);
    // One series per label set, however many threads counted into it.
    let series = after.lines().filter(|l| l.starts_with("stevedore_requests_total{")).count();
    let distinct: std::collections::BTreeSet<&str> = after
        .lines()
        .filter(|l| l.starts_with("stevedore_requests_total{"))
        .filter_map(|l| l.rsplit_once(' ').map(|(k, _)| k))
        .collect();
    assert_eq!(series, distinct.len(), "a series listed twice:\n{after}");
}
