//! Hardening from the security review (issue #23): the admin endpoint exists only with
//! client authentication or an admin token, glob patterns cost linear time and are bounded,
//! `/token` takes credentials only from the `Authorization` header or a POST form, and the
//! access log never carries a password, in any encoding. Real parts on loopback: the
//! `stevedore` binary, CNCF Distribution as the upstream.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::json;

use common::distribution::Distribution;
use common::http::{assert_json_error, client, client_with_timeout, hdr, jwt_claims, read};
use common::oci;
use common::stevedore::{config, write_htpasswd, Stevedore};

const ALICE: (&str, &str) = ("alice", "alice-pw-Zq8");
const ADMIN_TOKEN: &str = "admin-token-Hq2-0123456789abcdef";

/// `[auth]` with alice's htpasswd file in `dir`, then `extra`.
fn auth_section(dir: &Path, users: &[(&str, &str)], extra: &str) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let f = write_htpasswd(&dir.join("htpasswd"), users);
    let (keys, tables) = match extra.find("\n[") {
        Some(i) => extra.split_at(i),
        None => (extra, ""),
    };
    format!("[auth]\nhtpasswd = {:?}\n{keys}\n{tables}\n", f.display().to_string())
}

/// `POST /admin/prefetch` does not exist on an open registry (404, nothing fetched, and the
/// start-up warning says what is open); with `auth.admin_token_file` it takes that Bearer token
/// and nothing else; tag patterns over the limits are refused with 400 before any fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_exists_only_with_auth_or_an_admin_token() {
    let upstream = Distribution::start(false);
    let up = upstream.url().trim_start_matches("http://").to_string();
    let small = oci::make_image(7901, 2, 20_000, "amd64", "linux");
    upstream.registry().push_image("small", &small, Some("latest")).await;
    let http = client();
    let body = json!({"references": [format!("{up}/small:latest")]}).to_string();
    upstream.settle();
    let gets = upstream.blob_gets("small");

    // Open registry: no admin endpoint at all.
    let sd = Stevedore::builder().config(&config(&up, &[(&up, &upstream.url(), "")])).rust_log("warn").start();
    let r =
        read(http.post(sd.url("/admin/prefetch")).header("content-type", "application/json").body(body.clone())).await;
    assert_eq!(r.status, 404, "POST /admin/prefetch on an open registry: {}", r.text());
    upstream.settle();
    assert_eq!(upstream.blob_gets("small"), gets, "an open registry's admin endpoint reached the upstream");
    let log = sd.problems();
    let warning = log.lines().find(|l| l.contains("open registry")).unwrap_or_else(|| panic!("no warning:\n{log}"));
    for what in ["pull", "push", "/metrics", "/admin"] {
        assert!(warning.contains(what), "the open-registry warning does not name {what}: {warning}");
    }
    drop(sd);

    // An admin token: that Bearer token only.
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).unwrap();
    let cfg = config(&up, &[(&up, &upstream.url(), "")])
        + &format!("\n[auth]\nadmin_token_file = {:?}\n", token_file.display().to_string());
    let sd = Stevedore::builder().dir(dir.path()).config(&cfg).start();
    let post =
        |b: &str| http.post(sd.url("/admin/prefetch")).header("content-type", "application/json").body(b.to_string());
    let r = read(post(&body)).await;
    assert_json_error(&r, 401, "UNAUTHORIZED", "a prefetch without the admin token");
    assert!(hdr(&r.headers, "www-authenticate").is_some_and(|c| c.starts_with("Bearer ")), "{:?}", r.headers);
    let r = read(post(&body).bearer_auth("admin-token-Hq2-0123456789abcdeX")).await;
    assert_json_error(&r, 401, "UNAUTHORIZED", "a prefetch with a wrong admin token");
    let r = read(post(&body).basic_auth("admin", Some(ADMIN_TOKEN))).await;
    assert_json_error(&r, 401, "UNAUTHORIZED", "the admin token as a Basic password");
    // Patterns over the limits: 400, whoever asks.
    let stars = format!("{up}/small:{}", "*x".repeat(17));
    let long = format!("{up}/small:v{}*", "1".repeat(256));
    for (p, what) in [(&stars, "17 stars"), (&long, "over 256 bytes")] {
        let r = read(post(&json!({"references": [p]}).to_string()).bearer_auth(ADMIN_TOKEN)).await;
        assert_eq!(r.status, 400, "a pattern with {what}: {}", r.text());
    }
    upstream.settle();
    assert_eq!(upstream.blob_gets("small"), gets, "a refused prefetch reached the upstream");
    let r = read(post(&body).bearer_auth(ADMIN_TOKEN)).await;
    assert_eq!(r.status, 200, "a prefetch with the admin token: {}", r.text());
    let blobs = common::store::blob_files(sd.root());
    for b in small.blobs() {
        assert!(blobs.contains(&b.digest), "blob {} was not prefetched", b.digest);
    }
    assert!(!sd.log_text().contains(ADMIN_TOKEN), "the admin token is in the log");
}

/// A rule pattern built to make a backtracking matcher explode (8 `*` against a 75-character
/// name it does not match) is answered at once, and the server stays responsive meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backtracking_glob_costs_linear_time() {
    let dir = tempfile::tempdir().unwrap();
    let rules = format!(
        "anonymous = \"none\"\n[[auth.rules]]\nrepositories = [\"team/*\", \"{}b\"]\nusers = [\"alice\"]\nactions = [\"pull\"]\n",
        "*a".repeat(8)
    );
    let cfg = format!("[proxy]\ndefault_upstream = \"\"\n{}", auth_section(dir.path(), &[ALICE], &rules));
    let sd = Stevedore::builder().dir(dir.path()).config(&cfg).start();
    let name = "a".repeat(75);
    let http = client_with_timeout(Duration::from_secs(10));
    let start = Instant::now();
    let (denied, health) = tokio::join!(
        read(http.get(sd.url(&format!("/v2/{name}/tags/list"))).basic_auth(ALICE.0, Some(ALICE.1))),
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let t = Instant::now();
            let r = client_with_timeout(Duration::from_secs(10)).get(sd.url("/healthz")).send().await;
            (r.map(|r| r.status().as_u16()).map_err(|e| e.to_string()), t.elapsed())
        }
    );
    assert_eq!(health.0, Ok(200), "/healthz while a rule is matched");
    assert!(health.1 < Duration::from_secs(2), "/healthz took {:?} while a rule was matched", health.1);
    assert_json_error(&denied, 403, "DENIED", "a name no rule grants");
    assert!(start.elapsed() < Duration::from_secs(3), "matching one name took {:?}", start.elapsed());
    // The same rules still grant what they name.
    let r = read(http.get(sd.url("/v2/team/app/tags/list")).basic_auth(ALICE.0, Some(ALICE.1))).await;
    assert_ne!(r.status, 403, "team/app is granted: {}", r.text());
}

/// Patterns over 256 bytes or with more than 16 `*` are refused at load, naming the key.
#[test]
fn glob_patterns_over_the_limits_are_refused_at_load() {
    let stars = "*x".repeat(17);
    let long = format!("v{}*", "1".repeat(256));
    let up = |extra: &str| config("up.test", &[("up.test", "http://127.0.0.1:9", extra)]);
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (up(&format!("immutable_tags = [\"{stars}\"]")), "upstreams.immutable_tags"),
        (up(&format!("immutable_tags = [\"{long}\"]")), "upstreams.immutable_tags"),
        (
            up("").replacen("[proxy]\n", &format!("[proxy]\nlocal_namespaces = [\"team/{stars}\"]\n"), 1),
            "proxy.local_namespaces",
        ),
        (
            up("")
                + &auth_section(
                    &dir.path().join("a"),
                    &[ALICE],
                    &format!(
                        "[[auth.rules]]\nrepositories = [\"{long}\"]\nusers = [\"alice\"]\nactions = [\"pull\"]\n"
                    ),
                ),
            "auth.rules",
        ),
    ];
    for (i, (cfg, key)) in cases.iter().enumerate() {
        let r = Stevedore::builder().dir(&dir.path().join(format!("s{i}"))).config(cfg).try_start();
        let log = match r {
            Ok(_) => panic!("case {i}: a config with a pattern over the limits was accepted ({key})"),
            Err(log) => log,
        };
        assert!(log.contains(key), "case {i}: the refusal does not name {key}:\n{log}");
    }
}

/// `/token` takes credentials from the `Authorization` header or a POST form only, never from
/// the query string; no password reaches the access log (text and JSON), raw, percent-encoded
/// or inside base64, and the values of `password`, `secret`, `token` parameters are replaced
/// with `REDACTED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_credentials_never_come_from_the_query_nor_reach_the_log() {
    for text in [false, true] {
        token_credentials_case(text).await;
    }
}

async fn token_credentials_case(text_logs: bool) {
    let fmt = if text_logs { "text" } else { "json" };
    let pw = "Pw d/&=+%Zq8-seCret";
    let wrong = "Wr ong/&=+%Kk3-guess";
    let other = "Ot her+Secret%9";
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[proxy]\ndefault_upstream = \"\"\n{}",
        auth_section(dir.path(), &[("alice", pw)], "anonymous = \"none\"")
    );
    let mut b = Stevedore::builder().dir(dir.path()).config(&cfg).rust_log("info");
    if text_logs {
        b = b.text_logs();
    }
    let sd = b.start();
    let http = client();
    let q = |pairs: &[(&str, &str)]| form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish();
    let scope = [("service", "stevedore"), ("scope", "repository:team/app:pull")];

    // Credentials in the query string: ignored (GET and POST), so no login.
    for p in [pw, wrong] {
        let query = q(&[scope[0], scope[1], ("username", "alice"), ("password", p)]);
        let r = read(http.get(sd.url(&format!("/token?{query}")))).await;
        assert_json_error(&r, 401, "UNAUTHORIZED", &format!("{fmt}: GET /token with credentials in the query"));
        let r = read(
            http.post(sd.url(&format!("/token?{query}")))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(q(&[("grant_type", "password"), scope[0], scope[1]])),
        )
        .await;
        assert_json_error(&r, 401, "UNAUTHORIZED", &format!("{fmt}: POST /token with credentials in the query"));
    }
    // The form body and the header work.
    let r = read(http.post(sd.url("/token")).header("content-type", "application/x-www-form-urlencoded").body(q(&[
        ("grant_type", "password"),
        ("username", "alice"),
        ("password", pw),
        scope[0],
        scope[1],
    ])))
    .await;
    assert_eq!(r.status, 200, "{fmt}: the OAuth2 form: {}", r.text());
    let r = read(http.get(sd.url(&format!("/token?{}", q(&scope)))).basic_auth("alice", Some(pw))).await;
    assert_eq!(r.status, 200, "{fmt}: Basic: {}", r.text());
    let token = serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["token"].as_str().unwrap().to_string();
    assert_eq!(jwt_claims(&token)["sub"], "alice");
    // Secrets in any query: the access log shows REDACTED.
    let query = q(&[("password", pw), ("secret", other), ("token", &token), ("n", "1")]);
    let r = read(http.get(sd.url(&format!("/v2/?{query}"))).basic_auth("alice", Some(pw))).await;
    assert_eq!(r.status, 200, "{fmt}: /v2/ with a query");
    let marker = format!("/healthz?mark={fmt}");
    let _ = read(http.get(sd.url(&marker))).await;
    let end = Instant::now() + Duration::from_secs(10);
    while !sd.log_text().contains(&marker) {
        assert!(Instant::now() < end, "{fmt}: the marker request is not in the log");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let log = sd.log_text();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let pct = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let pct20 = |s: &str| pct(s).replace('+', "%20");
    for secret in [pw, wrong, other, token.as_str()] {
        for (how, s) in [
            ("raw", secret.to_string()),
            ("form-encoded", pct(secret)),
            ("percent-encoded", pct20(secret)),
            ("base64", b64(secret)),
            ("base64 user:password", b64(&format!("alice:{secret}"))),
        ] {
            assert!(!log.contains(&s), "{fmt}: the log contains a secret ({how}: {}…)", &s[..s.len().min(6)]);
        }
    }
    assert!(log.contains("password=REDACTED"), "{fmt}: no password=REDACTED in the log:\n{log}");
    assert!(log.contains("secret=REDACTED") && log.contains("token=REDACTED"), "{fmt}: not redacted:\n{log}");
}

/// An admin prefetch goes on when its client hangs up, and a SIGTERM stops the server within
/// `server.shutdown_grace` even while a prefetch runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetch_survives_its_client_but_not_a_sigterm() {
    let upstream = Distribution::start(false);
    let up = upstream.url().trim_start_matches("http://").to_string();
    let small = oci::make_image(7911, 2, 20_000, "amd64", "linux");
    upstream.registry().push_image("small", &small, Some("latest")).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, ADMIN_TOKEN).unwrap();
    let cfg = config(&up, &[(&up, &upstream.url(), "")])
        + &format!(
            "\n[server]\nshutdown_grace = \"1s\"\n[auth]\nadmin_token_file = {:?}\n",
            token_file.display().to_string()
        );
    let body = json!({"references": [format!("{up}/small:latest")]}).to_string();
    let post = |sd: &Stevedore, timeout: Duration| {
        client_with_timeout(timeout)
            .post(sd.url("/admin/prefetch"))
            .header("content-type", "application/json")
            .bearer_auth(ADMIN_TOKEN)
            .body(body.clone())
            .send()
    };

    // The client hangs up while the prefetch is held; let go, it completes.
    let sd = Stevedore::builder()
        .dir(&dir.path().join("a"))
        .config(&cfg)
        .env("STEVEDORE_PAUSE", "prefetch.reference")
        .start();
    let pauses = common::pause::Pauses::of_root(sd.root());
    let gone = tokio::spawn(post(&sd, Duration::from_millis(500)));
    pauses.reached("prefetch.reference", Duration::from_secs(10)).await;
    assert!(gone.await.unwrap().is_err(), "the client did not give up");
    pauses.go("prefetch.reference").await;
    let end = Instant::now() + Duration::from_secs(20);
    let want: Vec<String> = small.blobs().iter().map(|b| b.digest.clone()).collect();
    while !want.iter().all(|d| common::store::blob_files(sd.root()).contains(d)) {
        assert!(Instant::now() < end, "the prefetch did not complete after its client hung up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(sd);

    // SIGTERM while a prefetch is held: the process exits within the grace period.
    let mut sd = Stevedore::builder()
        .dir(&dir.path().join("b"))
        .config(&cfg)
        .env("STEVEDORE_PAUSE", "prefetch.reference")
        .start();
    let pauses = common::pause::Pauses::of_root(sd.root());
    let _held = tokio::spawn(post(&sd, Duration::from_secs(30)));
    pauses.reached("prefetch.reference", Duration::from_secs(10)).await;
    let start = Instant::now();
    let status = tokio::task::block_in_place(|| sd.terminate(Duration::from_secs(6)));
    assert!(status.is_some(), "SIGTERM did not stop the server within 6 s while a prefetch ran");
    assert!(start.elapsed() < Duration::from_secs(4), "SIGTERM took {:?} (grace 1s)", start.elapsed());
}

/// An upload's status needs push, as in Distribution: a user who may only pull the
/// repository learns nothing about another user's upload session there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_status_needs_push() {
    const BOB: (&str, &str) = ("bob", "bob-pw-Xr4");
    let dir = tempfile::tempdir().unwrap();
    let rules = "anonymous = \"none\"\n[[auth.rules]]\nrepositories = [\"team/*\"]\nusers = [\"alice\"]\nactions = [\"pull\"]\n\
                 [[auth.rules]]\nrepositories = [\"team/*\"]\nusers = [\"bob\"]\nactions = [\"pull\", \"push\"]\n";
    let cfg = format!("[proxy]\ndefault_upstream = \"\"\n{}", auth_section(dir.path(), &[ALICE, BOB], rules));
    let sd = Stevedore::builder().dir(dir.path()).config(&cfg).start();
    let http = client();
    let r = read(http.post(sd.url("/v2/team/app/blobs/uploads/")).basic_auth(BOB.0, Some(BOB.1))).await;
    assert_eq!(r.status, 202, "bob opens an upload: {}", r.text());
    let location = hdr(&r.headers, "location").expect("a Location");
    let url = if location.starts_with("http") { location.clone() } else { sd.url(&location) };
    let r = read(http.get(&url).basic_auth(ALICE.0, Some(ALICE.1))).await;
    assert_json_error(&r, 403, "DENIED", "alice (pull only) asks for bob's upload status");
    let r = read(http.get(&url).basic_auth(BOB.0, Some(BOB.1))).await;
    assert_eq!(r.status, 204, "bob's own upload status: {}", r.text());
}
