//! The status page (`/status`) rendered by a real browser (Debian's `/usr/bin/chromium`,
//! headless; installed by `scripts/install-test-deps.sh`) and `/status.json` field by field,
//! against the real binary pulling through CNCF Distribution. The screenshots are kept as
//! artifacts in `$CARGO_TARGET_TMPDIR/artifacts/` (under the target directory).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::distribution::Distribution;
use common::http::{assert_content, client, get_manifest, read};
use common::oci;
use common::proc;
use common::stevedore::{config, Dialect, Stevedore};
use serde_json::Value;

const HOST: &str = "upstream.test";

/// Where the test keeps what a person may want to look at afterwards.
fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Headless chromium on `url` with `args` (`--dump-dom`, `--screenshot=…`), bounded.
fn chromium(url: &str, args: &[&str]) -> proc::Out {
    let bin = proc::tool("chromium");
    let home = tempfile::Builder::new().prefix("chromium-home-").tempdir().unwrap();
    let mut cmd = Command::new(bin);
    proc::isolate_env(&mut cmd, home.path());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        "--window-size=1280,2000",
    ])
    .arg(format!("--user-data-dir={}", home.path().join("profile").display()))
    .args(args)
    .arg(url);
    proc::run_ok("chromium", cmd, Duration::from_secs(120))
}

/// The page's DOM as chromium built it.
fn dom(url: &str) -> String {
    chromium(url, &["--dump-dom"]).stdout
}

/// A screenshot of the page, kept under `name`; checked to be a PNG of some size.
fn screenshot(url: &str, name: &str) -> PathBuf {
    let path = artifacts().join(name);
    let _ = std::fs::remove_file(&path);
    chromium(url, &[&format!("--screenshot={}", path.display())]);
    let png = std::fs::read(&path).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", path.display()));
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{} is not a PNG", path.display());
    assert!(png.len() > 10_000, "screenshot of {} bytes: an empty page?", png.len());
    path
}

/// The text of the element with `id` in `dom` (its content up to the next tag).
fn by_id(dom: &str, id: &str) -> String {
    let at = dom.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("no #{id} in the page:\n{dom}"));
    let rest = &dom[at..];
    let start = rest.find('>').unwrap() + 1;
    let end = rest[start..].find('<').unwrap() + start;
    rest[start..end].trim().to_string()
}

/// The upstream's row in the page (from `data-host` to the end of the row).
fn upstream_row(dom: &str) -> String {
    let at = dom.find(&format!("data-host=\"{HOST}\"")).unwrap_or_else(|| panic!("no row for {HOST}:\n{dom}"));
    let end = dom[at..].find("</tr>").unwrap() + at;
    dom[at..end].to_string()
}

/// Waits (bounded) until `/status.json` shows no fill in flight.
pub async fn fills_done(http: &reqwest::Client, sd: &Stevedore) {
    let start = std::time::Instant::now();
    loop {
        let s: Value = http.get(sd.url("/status.json")).send().await.unwrap().json().await.unwrap();
        if s["fills"].as_array().is_some_and(|f| f.is_empty()) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "fills still in flight after 30 s: {s:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_a_browser_and_json_field_by_field() {
    let reg = Distribution::start(false);
    let img = oci::make_image(2601, 2, 300_000, "amd64", "linux");
    reg.registry().push_image("team/app", &img, Some("1.0")).await;
    let cfg = format!(
        "{}\n[cache]\nmax_size = \"1GiB\"\nhigh_watermark = 0.9\nlow_watermark = 0.8\n",
        config(HOST, &[(HOST, &reg.url(), "tag_ttl = \"5m\"")])
    );
    let sd = Stevedore::start(&cfg);
    let http = client();

    // Before any pull: the upstream is not contacted by rendering.
    let before: Value = http.get(sd.url("/status.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(before["upstreams"][0]["host"], HOST);
    assert_eq!(before["upstreams"][0]["reachable"], Value::Null, "{before:#}");
    assert_eq!(before["cache"]["hits"], 0);

    // The same image pulled twice: all misses, then all hits.
    let url = |rest: &str| sd.url(&Dialect::Prefix.path(HOST, "team/app", rest));
    let mut expected_misses = Vec::new();
    for round in 0..2 {
        let r = get_manifest(&http, url("manifests/1.0")).await;
        assert_content(&r, &img.manifest.digest, &img.manifest.data, "manifest");
        let mut outcomes = vec![r.cache()];
        for b in img.blobs().into_iter().filter(|b| b.digest != img.manifest.digest) {
            let r = read(http.get(url(&format!("blobs/{}", b.digest)))).await;
            assert_content(&r, &b.digest, &b.data, "blob");
            outcomes.push(r.cache());
        }
        let want = if round == 0 { "miss" } else { "hit" };
        assert!(outcomes.iter().all(|o| o == want), "round {round}: {outcomes:?}");
        expected_misses = outcomes;
        // A fill commits after its readers have the last byte: wait until none is in flight
        // (as the page says), so the second round hits rather than joins.
        fills_done(&http, &sd).await;
    }
    let n = expected_misses.len() as u64;
    let blob_bytes: u64 =
        img.blobs().iter().filter(|b| b.digest != img.manifest.digest).map(|b| b.data.len() as u64).sum();
    let pulled_bytes = blob_bytes + img.manifest.data.len() as u64;

    // /status.json, field by field.
    let r = http.get(sd.url("/status.json")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let s: Value = r.json().await.unwrap();
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(s["uptime_seconds"].as_u64().is_some(), "{s:#}");
    assert_eq!(s["store"]["backend"], "fs");
    let used = &s["store"]["used_bytes"];
    let proxied = used["proxied"].as_u64().unwrap();
    assert!(proxied >= blob_bytes && proxied <= pulled_bytes + 4096, "proxied {proxied}, pulled {pulled_bytes}: {s:#}");
    assert_eq!((used["pushed"].as_u64(), used["imported"].as_u64()), (Some(0), Some(0)), "{s:#}");
    assert_eq!(s["store"]["max_size"], 1u64 << 30);
    let (high, low) = (s["store"]["high_watermark"].as_u64().unwrap(), s["store"]["low_watermark"].as_u64().unwrap());
    assert!((high as f64 - 0.9 * (1u64 << 30) as f64).abs() < 2.0, "high {high}");
    assert!((low as f64 - 0.8 * (1u64 << 30) as f64).abs() < 2.0, "low {low}");
    let c = &s["cache"];
    assert_eq!((c["hits"].as_u64(), c["misses"].as_u64()), (Some(n), Some(n)), "{s:#}");
    assert_eq!(c["hit_ratio_1h"].as_f64(), Some(0.5), "{s:#}");
    assert_eq!(c["bytes_from_cache"].as_u64(), Some(pulled_bytes), "{s:#}");
    assert_eq!(c["bytes_from_upstream"].as_u64(), Some(pulled_bytes), "{s:#}");
    let ups = s["upstreams"].as_array().unwrap();
    assert_eq!(ups.len(), 1, "{s:#}");
    assert_eq!(ups[0]["host"], HOST);
    assert_eq!(ups[0]["reachable"], true, "{s:#}");
    assert_eq!(ups[0]["last_error"], Value::Null, "{s:#}");
    assert_eq!(ups[0]["ratelimit_remaining"], Value::Null, "Distribution sends no rate limit: {s:#}");
    assert_eq!(s["fills"], serde_json::json!([]), "no fill in flight after the pulls: {s:#}");
    let lc = &s["lifecycle"];
    assert!(lc["last_run"].is_null() || lc["last_run"].as_u64().is_some(), "{s:#}");
    assert_eq!((lc["evicted_bytes"].as_u64(), lc["gc_reclaimed_bytes"].as_u64()), (Some(0), Some(0)));
    let replicas = s["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 1, "{s:#}");
    assert_eq!(replicas[0]["heartbeat_age_seconds"], 0);
    assert!(replicas[0]["id"].as_str().is_some_and(|id| !id.is_empty()));
    assert_eq!(s["top_repositories"], serde_json::json!([{"name": format!("{HOST}/team/app"), "pulls": 2}]), "{s:#}");

    // The page in a browser: the hits and misses, the used bytes, the upstream reachable.
    let page = sd.url("/status");
    let d = dom(&page);
    assert_eq!(by_id(&d, "hits"), n.to_string(), "hits on the page");
    assert_eq!(by_id(&d, "misses"), n.to_string(), "misses on the page");
    assert_eq!(by_id(&d, "hit-ratio"), "50.0%");
    assert!(by_id(&d, "used-proxied").ends_with("KiB"), "used bytes: {}", by_id(&d, "used-proxied"));
    assert_ne!(by_id(&d, "used-bytes"), "0 B");
    let row = upstream_row(&d);
    assert!(row.contains(">reachable<") && !row.contains("unreachable"), "upstream row: {row}");
    assert!(d.contains("class=\"miss\"") && d.contains("class=\"hit\""), "the chart has no hit or miss bar");
    assert!(d.contains(&format!("{HOST}/team/app")), "most pulled repository missing");
    assert!(!d.contains("<script"), "the page has a script");
    let shot = screenshot(&page, "status.png");
    eprintln!("status page screenshot: {}", shot.display());

    // The upstream stopped: a miss fails, and the page says so (rendering contacts nothing).
    drop(reg);
    let r = get_manifest(&http, url("manifests/2.0")).await;
    assert!(r.status >= 400, "a pull with the upstream stopped: {}", r.status);
    let s: Value = http.get(sd.url("/status.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(s["upstreams"][0]["reachable"], false, "{s:#}");
    assert!(s["upstreams"][0]["last_error"].as_str().is_some_and(|e| e.contains("unreachable")), "{s:#}");
    let d = dom(&page);
    let row = upstream_row(&d);
    assert!(row.contains(">unreachable<"), "upstream row with the upstream stopped: {row}");
    screenshot(&page, "status-upstream-down.png");
}

/// A fill in flight with three clients streaming it: `/status.json` lists it once, with its
/// repository, the bytes received so far and two followers (the clients besides the first),
/// and nothing once it has committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_in_flight_shows_its_bytes_and_followers() {
    let reg = Distribution::start(false);
    let img = oci::make_image(2602, 1, 1_500_000, "amd64", "linux");
    reg.registry().push_image("team/slow", &img, Some("1.0")).await;
    // The fill is slowed to ~3 s, so the page sees it while the clients stream it.
    let sd = Stevedore::builder()
        .config(&config(HOST, &[(HOST, &reg.url(), "")]))
        .env("STEVEDORE_TEST_FILL_BYTES_PER_SEC", "500000")
        .start();
    let http = client();
    let layer = &img.layers[0];
    let url = sd.url(&Dialect::Prefix.path(HOST, "team/slow", &format!("blobs/{}", layer.digest)));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move { read(http.get(url)).await })
        })
        .collect();
    let start = std::time::Instant::now();
    let seen = loop {
        let s: Value = http.get(sd.url("/status.json")).send().await.unwrap().json().await.unwrap();
        let fills = s["fills"].as_array().cloned().unwrap_or_default();
        if let [f] = fills.as_slice() {
            if f["followers"] == 2 && f["bytes"].as_u64().is_some_and(|b| b > 0) {
                break f.clone();
            }
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no fill with two followers in 20 s: {s:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(seen["digest"], layer.digest.as_str(), "{seen:#}");
    assert_eq!(seen["repository"], format!("{HOST}/team/slow"), "{seen:#}");
    assert!(seen["bytes"].as_u64().unwrap() < layer.data.len() as u64, "the fill was over already: {seen:#}");
    for c in clients {
        let r = c.await.unwrap();
        assert_content(&r, &layer.digest, &layer.data, "blob streamed from the fill");
    }
    fills_done(&http, &sd).await;
}

/// `auth.status`: `admin` by default once users exist (anonymous callers get a 401 with a
/// challenge), `open` when set so.
#[tokio::test]
async fn status_is_gated_by_auth_status() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = common::stevedore::write_htpasswd(&dir.path().join("htpasswd"), &[("alice", "pw")]);
    let auth = format!("[proxy]\ndefault_upstream = \"\"\n\n[auth]\nhtpasswd = \"{}\"\n", htpasswd.display());
    let sd = Stevedore::start(&auth);
    let http = client();
    for path in ["/status", "/status.json"] {
        let r = http.get(sd.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} without credentials");
    }
    drop(sd);
    let sd = Stevedore::start(&format!("{auth}status = \"open\"\n"));
    for path in ["/status", "/status.json"] {
        let r = http.get(sd.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path} with auth.status = open");
    }
}
