//! Trust: nobody can change what is served for an upstream's name, upstream credentials go
//! only where configured, and hostile clients (slow headers, stalled bodies, made-up methods)
//! cannot hurt the others. Real parts on loopback: the `stevedore` binary, CNCF Distribution as
//! the upstream, small axum servers for token realms and CDNs (one bound on 127.0.0.2, a
//! different host), raw TCP clients for the slow ones.

mod common;

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use axum::Router;
use futures::StreamExt as _;
use serde_json::json;

use common::data::sha256;
use common::distribution::Distribution;
use common::http::{assert_content, assert_json_error, client, get_manifest, hdr, read, MANIFEST_ACCEPT};
use common::oci;
use common::stevedore::{config, Stevedore};

const ALIAS: &str = "upstream.test";

/// The request path for `rest` (`manifests/latest`, `blobs/<digest>`) in one dialect.
type PathFor = Box<dyn Fn(&str) -> String>;

/// `config(...)` with `[proxy] local_namespaces` and extra top-level TOML.
fn with_local(cfg: String, local: &[&str], extra: &str) -> String {
    let list = local.iter().map(|l| format!("{l:?}")).collect::<Vec<_>>().join(", ");
    format!("{}\n{extra}\n", cfg.replacen("[proxy]\n", &format!("[proxy]\nlocal_namespaces = [{list}]\n"), 1))
}

/// Every write a client can make, anonymously, through every dialect that names the upstream
/// (plain default-upstream name, `?ns=` with the host and with an alias, the alias as a path
/// prefix, the on-disk cache name `127.0.0.1-PORT/…`): 403 DENIED, nothing stored, nothing
/// sent upstream. Afterwards every dialect still gets the upstream's digests and bytes. A
/// name in `local_namespaces` is pushable and pullable and never reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_dialect_can_write_an_upstream_name_and_mirrors_keep_the_upstream_digests() {
    let reg = Distribution::start(false);
    let up = reg.url().trim_start_matches("http://").to_string(); // 127.0.0.1:PORT
    let cache_ns = up.replace(':', "-");
    let small = oci::make_image(9101, 2, 50_000, "amd64", "linux");
    reg.registry().push_image("small", &small, Some("latest")).await;
    let cfg = config(&up, &[(&up, &reg.url(), &format!("aliases = [\"{ALIAS}\"]"))]);
    let sd = Stevedore::start(&with_local(cfg, &["team/*"], ""));
    let http = client();
    reg.settle();
    let writes_before = write_lines(&reg);

    // The attacker's content: a blob and a manifest of their own.
    let evil = b"not what the upstream has".to_vec();
    let ed = sha256(&evil);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": oci::MT_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": ed, "size": evil.len()},
        "layers": [],
    }))
    .unwrap();
    let md = sha256(&manifest);
    let uuid = "0b9e9c5e-1e4a-4a7c-9f0e-2d0c7a1d3b11";
    let dialects: Vec<(String, PathFor)> = vec![
        ("plain".into(), Box::new(|rest: &str| format!("/v2/small/{rest}"))),
        ("ns=host:port".into(), {
            let up = up.clone();
            Box::new(move |rest: &str| format!("/v2/small/{rest}?ns={up}"))
        }),
        ("ns=alias".into(), Box::new(|rest: &str| format!("/v2/small/{rest}?ns={ALIAS}"))),
        ("alias prefix".into(), Box::new(|rest: &str| format!("/v2/{ALIAS}/small/{rest}"))),
        ("cache name".into(), {
            let ns = cache_ns.clone();
            Box::new(move |rest: &str| format!("/v2/{ns}/small/{rest}"))
        }),
        ("plain outside local_namespaces".into(), Box::new(|rest: &str| format!("/v2/other/app/{rest}"))),
    ];
    for (dialect, p) in &dialects {
        let url = |rest: &str| sd.url(&p(rest));
        let with_digest = |rest: &str| {
            let u = url(rest);
            let sep = if u.contains('?') { '&' } else { '?' };
            format!("{u}{sep}digest={ed}")
        };
        let attempts = vec![
            ("POST upload", http.post(url("blobs/uploads/")).header("content-length", "0")),
            ("monolithic POST", http.post(with_digest("blobs/uploads/")).body(evil.clone())),
            ("PATCH upload", http.patch(url(&format!("blobs/uploads/{uuid}"))).body(evil.clone())),
            ("PUT upload", http.put(with_digest(&format!("blobs/uploads/{uuid}"))).body(evil.clone())),
            (
                "PUT manifest",
                http.put(url("manifests/latest")).header("content-type", oci::MT_MANIFEST).body(manifest.clone()),
            ),
            (
                "PUT manifest by digest",
                http.put(url(&format!("manifests/{md}")))
                    .header("content-type", oci::MT_MANIFEST)
                    .body(manifest.clone()),
            ),
            ("DELETE tag", http.delete(url("manifests/latest"))),
            ("DELETE manifest", http.delete(url(&format!("manifests/{}", small.manifest.digest)))),
            ("DELETE blob", http.delete(url(&format!("blobs/{}", small.layers[0].digest)))),
        ];
        for (what, req) in attempts {
            let what = format!("{what} via {dialect}");
            let r = read(req).await;
            assert_json_error(&r, 403, "DENIED", &what);
            let detail =
                serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["errors"][0]["detail"].to_string();
            assert!(detail.contains("read-only") && detail.contains(&up), "{what}: detail {detail}");
            if dialect.starts_with("plain") {
                assert!(detail.contains("proxy.local_namespaces"), "{what}: detail {detail}");
            }
        }
    }
    // A host with a port cannot be a path prefix at all (':' is not in the name grammar).
    let r = read(
        http.put(sd.url(&format!("/v2/{up}/small/manifests/latest")))
            .header("content-type", oci::MT_MANIFEST)
            .body(manifest.clone()),
    )
    .await;
    assert_json_error(&r, 400, "NAME_INVALID", "PUT via host:port prefix");
    assert!(common::store::blob_files(sd.root()).is_empty(), "a denied write stored content");
    reg.settle();
    assert_eq!(write_lines(&reg), writes_before, "writes reached the upstream:\n{}", reg.access_log());

    // Every mirror dialect still gets exactly the upstream's image.
    for (dialect, p) in dialects.iter().take(5) {
        let r = get_manifest(&http, sd.url(&p("manifests/latest"))).await;
        assert_content(&r, &small.manifest.digest, &small.manifest.data, &format!("manifest via {dialect}"));
        for b in small.blobs() {
            let r = read(http.get(sd.url(&p(&format!("blobs/{}", b.digest))))).await;
            assert_content(&r, &b.digest, &b.data, &format!("blob via {dialect}"));
        }
    }

    // A name in local_namespaces: pushable (also deeper names), pullable, never upstream.
    let mine = oci::make_image(9102, 1, 20_000, "amd64", "linux");
    let pusher = sd.registry();
    for repo in ["team/app", "team/a/b"] {
        pusher.push_image(repo, &mine, Some("v1")).await;
        let r = get_manifest(&http, sd.url(&format!("/v2/{repo}/manifests/v1"))).await;
        assert_content(&r, &mine.manifest.digest, &mine.manifest.data, &format!("local {repo}"));
    }
    reg.settle();
    assert!(reg.requests_for("team/app").is_empty(), "a local name reached the upstream");
    assert_eq!(write_lines(&reg), writes_before, "a local push reached the upstream");
    // The start-up summary says which names are local and that the registry is open.
    let log = sd.problems();
    assert!(log.contains("no client authentication"), "start-up summary:\n{log}");
}

/// Access-log lines of writes Distribution answered.
fn write_lines(reg: &Distribution) -> usize {
    reg.access_log()
        .lines()
        .filter(|l| ["\"PUT ", "\"POST ", "\"PATCH ", "\"DELETE "].iter().any(|m| l.contains(m)))
        .count()
}

/// What a tiny server saw: (method, path and query, Authorization).
type Seen = Arc<Mutex<Vec<(String, String, Option<String>)>>>;

#[derive(Clone)]
struct Mini {
    seen: Seen,
    /// The upstream's challenge realm.
    realm: String,
    /// Where the upstream redirects blob GETs.
    cdn: String,
    manifest: Vec<u8>,
    blob: Vec<u8>,
}

const TOKEN: &str = "tok-trust";

/// Starts `app` on `ip:0`; returns its `ip:port`.
async fn serve(ip: &str, app: Router) -> String {
    let l = tokio::net::TcpListener::bind(format!("{ip}:0")).await.expect("bind (is 127.0.0.2 up on lo?)");
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    addr
}

fn record(st: &Mini, req: &Request) {
    let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
    let pq = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    st.seen.lock().unwrap().push((req.method().to_string(), pq, auth));
}

/// An upstream that wants a Bearer token from `realm` and redirects blob GETs to `cdn`.
async fn upstream(State(st): State<Mini>, req: Request) -> Response {
    record(&st, &req);
    let authorized = req.headers().get("authorization").is_some_and(|v| v == format!("Bearer {TOKEN}").as_str());
    if !authorized {
        let mut r = Response::new(Body::from(r#"{"errors":[{"code":"UNAUTHORIZED","message":"x"}]}"#));
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        let c = format!(r#"Bearer realm="{}",service="mini""#, st.realm);
        r.headers_mut().insert("www-authenticate", HeaderValue::from_str(&c).unwrap());
        return r;
    }
    let path = req.uri().path();
    if path.ends_with("/manifests/latest") {
        let mut r = Response::new(Body::from(st.manifest.clone()));
        r.headers_mut().insert("content-type", HeaderValue::from_static(oci::MT_MANIFEST));
        r.headers_mut().insert("docker-content-digest", HeaderValue::from_str(&sha256(&st.manifest)).unwrap());
        return r;
    }
    if let Some((_, d)) = path.rsplit_once("/blobs/") {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
        r.headers_mut().insert("location", HeaderValue::from_str(&format!("{}/first/{d}", st.cdn)).unwrap());
        return r;
    }
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::NOT_FOUND;
    r
}

/// A token server (any credentials) and, on the same server, a CDN that redirects once more
/// within itself before serving the blob.
async fn realm_and_cdn(State(st): State<Mini>, req: Request) -> Response {
    record(&st, &req);
    let path = req.uri().path().to_string();
    if path == "/token" {
        return Response::new(Body::from(format!(r#"{{"token":"{TOKEN}","expires_in":300}}"#)));
    }
    if let Some(d) = path.strip_prefix("/first/") {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::FOUND;
        r.headers_mut().insert("location", HeaderValue::from_str(&format!("/second/{d}")).unwrap());
        return r;
    }
    if path.starts_with("/second/") {
        return Response::new(Body::from(st.blob.clone()));
    }
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::NOT_FOUND;
    r
}

/// A realm on another host (127.0.0.2) gets neither the credentials nor any request unless it
/// is listed in `upstreams.token_realms`; listed, it works, and blob redirects to a CDN on that
/// host are followed without credentials on every hop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_go_only_to_the_upstream_and_listed_realms() {
    let other_seen: Seen = Arc::default();
    let up_seen: Seen = Arc::default();
    let blob = b"blob behind a CDN".to_vec();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": oci::MT_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&blob), "size": blob.len()},
        "layers": [],
    }))
    .unwrap();
    let mini = |seen: &Seen, realm: &str, cdn: &str| Mini {
        seen: seen.clone(),
        realm: realm.to_string(),
        cdn: cdn.to_string(),
        manifest: manifest.clone(),
        blob: blob.clone(),
    };
    let other = serve("127.0.0.2", Router::new().fallback(realm_and_cdn).with_state(mini(&other_seen, "", ""))).await;
    let realm = format!("http://{other}/token");
    let cdn = format!("http://{other}");
    let up = serve("127.0.0.1", Router::new().fallback(upstream).with_state(mini(&up_seen, &realm, &cdn))).await;
    let creds = "username = \"alice\"\npassword = \"pw-never-leaves\"";

    // Not listed: refused before any request is sent there; the client learns why.
    let sd = Stevedore::start(&config("", &[("auth.test", &format!("http://{up}"), creds)]));
    let http = client();
    let r = get_manifest(&http, sd.url("/v2/team/app/manifests/latest?ns=auth.test")).await;
    assert_json_error(&r, 502, "UNAVAILABLE", "manifest behind a foreign realm");
    assert!(r.text().contains(&realm), "the error names the realm: {}", r.text());
    assert!(other_seen.lock().unwrap().is_empty(), "the foreign realm got requests: {:?}", other_seen.lock().unwrap());
    let leaked: Vec<_> = up_seen.lock().unwrap().iter().filter(|s| s.2.is_some()).cloned().collect();
    assert!(leaked.is_empty(), "credentials sent although no challenge asked for them: {leaked:?}");
    assert!(!sd.problems().contains("pw-never-leaves"), "the password is in the log");
    drop(sd);

    // Listed: the token comes from there (with the credentials), and the blob is fetched from
    // the CDN through two redirects, neither carrying credentials.
    let extra = format!("{creds}\ntoken_realms = [\"http://{other}\"]");
    let sd = Stevedore::start(&config("", &[("auth.test", &format!("http://{up}"), &extra)]));
    let r = get_manifest(&http, sd.url("/v2/team/app/manifests/latest?ns=auth.test")).await;
    assert_content(&r, &sha256(&manifest), &manifest, "manifest with a listed realm");
    let r = read(http.get(sd.url(&format!("/v2/team/app/blobs/{}?ns=auth.test", sha256(&blob))))).await;
    assert_content(&r, &sha256(&blob), &blob, "blob through the CDN");
    let seen = other_seen.lock().unwrap().clone();
    let token_reqs: Vec<_> = seen.iter().filter(|s| s.1.starts_with("/token")).collect();
    assert_eq!(token_reqs.len(), 1, "{seen:?}");
    assert!(token_reqs[0].2.as_deref().is_some_and(|a| a.starts_with("Basic ")), "{seen:?}");
    let cdn_hops: Vec<_> = seen.iter().filter(|s| !s.1.starts_with("/token")).collect();
    assert_eq!(cdn_hops.len(), 2, "CDN hops: {seen:?}");
    assert!(cdn_hops.iter().all(|s| s.2.is_none()), "credentials sent to the CDN: {cdn_hops:?}");
}

/// The realm is pinned by origin (scheme, host and port), not by host: a realm on another
/// port of the upstream's own host gets no request and no credentials unless it is listed in
/// `upstreams.token_realms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_realm_on_another_port_of_the_upstream_host_gets_no_credentials() {
    let other_seen: Seen = Arc::default();
    let up_seen: Seen = Arc::default();
    let blob = b"config behind a realm on another port".to_vec();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": oci::MT_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&blob), "size": blob.len()},
        "layers": [],
    }))
    .unwrap();
    let mini = |seen: &Seen, realm: &str| Mini {
        seen: seen.clone(),
        realm: realm.to_string(),
        cdn: String::new(),
        manifest: manifest.clone(),
        blob: blob.clone(),
    };
    let other = serve("127.0.0.1", Router::new().fallback(realm_and_cdn).with_state(mini(&other_seen, ""))).await;
    let realm = format!("http://{other}/token");
    let up = serve("127.0.0.1", Router::new().fallback(upstream).with_state(mini(&up_seen, &realm))).await;
    let creds = "username = \"alice\"\npassword = \"pw-port-pinned\"";

    let sd = Stevedore::start(&config("", &[("auth.test", &format!("http://{up}"), creds)]));
    let http = client();
    let r = get_manifest(&http, sd.url("/v2/team/app/manifests/latest?ns=auth.test")).await;
    assert_json_error(&r, 502, "UNAVAILABLE", "manifest behind a realm on another port");
    let seen = other_seen.lock().unwrap().clone();
    assert!(seen.is_empty(), "a realm on another port of the upstream's host got requests: {seen:?}");
    drop(sd);

    // Listed: it gets the token request, with the credentials.
    let extra = format!("{creds}\ntoken_realms = [\"http://{other}\"]");
    let sd = Stevedore::start(&config("", &[("auth.test", &format!("http://{up}"), &extra)]));
    let r = get_manifest(&http, sd.url("/v2/team/app/manifests/latest?ns=auth.test")).await;
    assert_content(&r, &sha256(&manifest), &manifest, "manifest with the realm listed");
    let seen = other_seen.lock().unwrap().clone();
    assert!(
        seen.iter().any(|s| s.1.starts_with("/token") && s.2.as_deref().is_some_and(|a| a.starts_with("Basic "))),
        "{seen:?}"
    );
}

/// An https upstream whose realm is plain http is refused even when listed: no request to it.
/// The upstream is Distribution over TLS with token auth (the realm it announces is ours).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_cannot_send_credentials_to_an_http_realm() {
    let dir = tempfile::Builder::new().prefix("trust-downgrade-").tempdir().unwrap();
    let pki = common::tls::TestPki::new(&dir.path().join("pki"));
    let seen: Seen = Arc::default();
    let st = Mini { seen: seen.clone(), realm: String::new(), cdn: String::new(), manifest: vec![], blob: vec![] };
    let realm_addr = serve("127.0.0.1", Router::new().fallback(realm_and_cdn).with_state(st)).await;
    let realm = format!("http://{realm_addr}/token");
    let port = common::proc::closed_port();
    let cfg = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
         http:\n  addr: 127.0.0.1:{port}\n  secret: s\n  tls:\n    certificate: {}\n    key: {}\n\
         auth:\n  token:\n    realm: {realm}\n    service: trust-test\n    issuer: trust-test\n    rootcertbundle: {}\n",
        dir.path().join("storage").display(),
        pki.cert_file.display(),
        pki.key_file.display(),
        pki.ca_file.display()
    );
    std::fs::write(dir.path().join("config.yml"), cfg).unwrap();
    let mut cmd = common::proc::with_pdeathsig(common::proc::tool("docker-registry"));
    cmd.arg("serve").arg(dir.path().join("config.yml"));
    let _reg = common::proc::Daemon::spawn_logs("docker-registry", cmd, &dir.path().join("reg.log"), None);
    let probe = common::http::client_trusting(&pki.ca_pem);
    let url = format!("https://127.0.0.1:{port}");
    let mut challenge = None;
    for _ in 0..200 {
        if let Ok(r) = probe.get(format!("{url}/v2/")).send().await {
            challenge = hdr(r.headers(), "www-authenticate");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let challenge = challenge.expect("Distribution over TLS with token auth did not answer");
    assert!(challenge.contains(&realm), "Distribution's challenge: {challenge}");

    let extra = format!(
        "username = \"alice\"\npassword = \"pw\"\nca_file = \"{}\"\ntoken_realms = [\"http://{realm_addr}\"]",
        pki.ca_file.display()
    );
    let sd = Stevedore::start(&config("", &[("tls.test", &url, &extra)]));
    let r = get_manifest(&client(), sd.url("/v2/team/app/manifests/latest?ns=tls.test")).await;
    assert_json_error(&r, 502, "UNAVAILABLE", "manifest behind an http realm");
    assert!(r.text().contains("downgrade") && r.text().contains(&realm_addr), "{}", r.text());
    assert!(seen.lock().unwrap().is_empty(), "the http realm got requests: {:?}", seen.lock().unwrap());
}

/// Reads from `s` until EOF or error; returns when that happened, or None after `limit`.
fn wait_closed(s: &mut TcpStream, limit: Duration) -> Option<Instant> {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some(Instant::now()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return Some(Instant::now()),
        }
    }
    None
}

/// Clients that send half a request line, nothing at all, or half an HTTP/2 preface are
/// disconnected after `server.header_read_timeout`, while other clients are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off_while_others_are_served() {
    let cfg = with_local(config("", &[]), &[], "[server]\nheader_read_timeout = \"1s\"\nbody_idle_timeout = \"1s\"");
    let sd = Stevedore::start(&cfg);
    let http = client();
    let mut stalled = Vec::new();
    for first in [&b"GET /v2/ HT"[..], b"", b"PRI * HTTP/2"] {
        let connected = Instant::now();
        let mut s = TcpStream::connect(&sd.addr).unwrap();
        s.write_all(first).unwrap();
        stalled.push((String::from_utf8_lossy(first).to_string(), s, connected));
    }
    // Served while those stall.
    for _ in 0..5 {
        let r = read(http.get(sd.url("/v2/"))).await;
        assert_eq!(r.status, 200);
    }
    tokio::task::block_in_place(|| {
        for (what, mut s, connected) in stalled {
            let closed = wait_closed(&mut s, Duration::from_secs(10));
            let took = closed.unwrap_or_else(|| panic!("{what:?}: still open after 10 s")) - connected;
            assert!(took >= Duration::from_millis(900), "{what:?}: closed after {took:?}, before the timeout");
        }
    });
    // A new connection: the pooled one sat idle past `header_read_timeout` meanwhile, and the
    // server closing it can cross a request sent on it (a keep-alive race, not this test's).
    let r = read(client().get(sd.url("/v2/"))).await;
    assert_eq!(r.status, 200, "served after the slow clients");
}

/// An upload PATCH whose body stops arriving is cut after `server.body_idle_timeout`; the
/// session stays at its last complete chunk and the upload resumes and finishes from there.
/// A body that keeps arriving slowly (each gap shorter than the timeout) is never cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upload_bodies_are_cut_and_the_session_resumes() {
    let cfg = with_local(config("", &[]), &[], "[server]\nbody_idle_timeout = \"1s\"");
    let sd = Stevedore::start(&cfg);
    let http = client();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (a, b) = data.split_at(100_000);
    let r = read(http.post(sd.url("/v2/team/slow/blobs/uploads/")).header("content-length", "0")).await;
    assert_eq!(r.status, 202, "{}", r.text());
    let loc = hdr(&r.headers, "location").unwrap();
    let loc = if loc.starts_with("http") { loc } else { sd.url(&loc) };
    let r = read(http.patch(&loc).header("content-range", format!("0-{}", a.len() - 1)).body(a.to_vec())).await;
    assert_eq!(r.status, 202, "{}", r.text());
    let loc = hdr(&r.headers, "location").map(|l| if l.starts_with("http") { l } else { sd.url(&l) }).unwrap();

    // The second chunk: headers and half the body, then silence.
    let path = reqwest::Url::parse(&loc).unwrap();
    let pq = format!("{}{}", path.path(), path.query().map(|q| format!("?{q}")).unwrap_or_default());
    let head = format!(
        "PATCH {pq} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\
         Content-Range: {}-{}\r\n\r\n",
        sd.addr,
        b.len(),
        a.len(),
        data.len() - 1
    );
    let answer = tokio::task::block_in_place(|| {
        let mut s = TcpStream::connect(&sd.addr).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&b[..b.len() / 2]).unwrap();
        let start = Instant::now();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).unwrap_or(0);
        (start.elapsed(), String::from_utf8_lossy(&buf[..n]).to_string())
    });
    assert!(answer.0 < Duration::from_secs(9), "the stalled PATCH was not cut: {answer:?}");
    assert!(
        answer.1.is_empty() || answer.1.starts_with("HTTP/1.1 400"),
        "the stalled PATCH: expected a 400 or a closed connection, got {:?}",
        answer.1
    );
    // The session is back at the end of the first chunk.
    let want = format!("0-{}", a.len() - 1);
    let mut range = None;
    for _ in 0..100 {
        let r = read(http.get(&loc)).await;
        range = hdr(&r.headers, "range");
        if r.status == 204 && range.as_deref() == Some(want.as_str()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(range.as_deref(), Some(want.as_str()), "session range after the cut");
    // Resume with a body that trickles (gaps of 300 ms, under the 1 s timeout), then finish.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = b.chunks(50_000).map(|c| Ok(c.to_vec())).collect();
    let stream = futures::stream::iter(chunks).then(|c| async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        c
    });
    let r = read(
        http.patch(&loc)
            .header("content-range", format!("{}-{}", a.len(), data.len() - 1))
            .header("content-length", b.len().to_string())
            .body(reqwest::Body::wrap_stream(stream)),
    )
    .await;
    assert_eq!(r.status, 202, "slow but steady PATCH: {}", r.text());
    let loc = hdr(&r.headers, "location").map(|l| if l.starts_with("http") { l } else { sd.url(&l) }).unwrap();
    let d = sha256(&data);
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = read(http.put(format!("{loc}{sep}digest={d}"))).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = read(http.get(sd.url(&format!("/v2/team/slow/blobs/{d}")))).await;
    assert_content(&r, &d, &data, "the resumed upload");
}

/// 200 requests with made-up methods leave `stevedore_requests_total` with method labels from
/// the fixed set only; an invalid manifest reference is an unknown manifest (404), local or
/// proxied, and reaches no upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_methods_do_not_grow_metrics_and_invalid_references_are_unknown() {
    let fake = common::fake::Fake::start().await;
    let sd = Stevedore::start(&config("up.test", &[("up.test", &fake.url(), "")]));
    let http = client();
    for i in 0..200 {
        let m = reqwest::Method::from_bytes(format!("XM{i}").as_bytes()).unwrap();
        let path = if i % 2 == 0 { "/v2/" } else { "/v2/small/manifests/latest" };
        let r = read(http.request(m, sd.url(path))).await;
        assert!(r.status >= 400 && r.status < 500, "XM{i} {path}: {}", r.status);
    }
    let metrics = read(http.get(sd.url("/metrics"))).await.text();
    let methods: BTreeSet<String> = metrics
        .lines()
        .filter(|l| l.starts_with("stevedore_requests_total{"))
        .filter_map(|l| l.split("method=\"").nth(1)?.split('"').next().map(str::to_string))
        .collect();
    let allowed: BTreeSet<String> =
        ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "other"].iter().map(|s| s.to_string()).collect();
    assert!(methods.contains("other"), "made-up methods are not counted: {methods:?}\n{metrics}");
    assert!(methods.is_subset(&allowed), "method labels {methods:?}");
    let series = metrics.lines().filter(|l| l.starts_with("stevedore_requests_total{")).count();
    assert!(series <= 12, "{series} request series:\n{metrics}");

    for path in ["/v2/small/manifests/.INVALID_MANIFEST_NAME", "/v2/small/manifests/.INVALID_MANIFEST_NAME?ns=up.test"]
    {
        let r = read(http.get(sd.url(path)).header("accept", MANIFEST_ACCEPT)).await;
        assert_json_error(&r, 404, "MANIFEST_UNKNOWN", &format!("GET {path}"));
        let r = read(http.head(sd.url(path))).await;
        assert_eq!(r.status, 404, "HEAD {path}");
    }
    let r = read(http.put(sd.url("/v2/team/app/manifests/.INVALID_MANIFEST_NAME?ns=up.test"))).await;
    assert_json_error(&r, 403, "DENIED", "PUT of a bad tag into an upstream namespace");
    assert_eq!(fake.total(), 0, "requests reached the upstream:\n  {}", fake.dump());
}

/// `POST /v2/<repo>/blobs/uploads/` from `reg`: the Location on 202, the answer otherwise.
async fn open_session(reg: &common::http::Registry, repo: &str) -> Result<String, common::http::Read> {
    let r = read(reg.req(reqwest::Method::POST, &format!("/v2/{repo}/blobs/uploads/"))).await;
    match (r.status, hdr(&r.headers, "location")) {
        (202, Some(loc)) => Ok(loc),
        _ => Err(r),
    }
}

fn assert_too_many(r: &common::http::Read, what: &str) {
    assert_json_error(r, 429, "TOOMANYREQUESTS", what);
    let after: u64 = hdr(&r.headers, "retry-after").and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(after >= 1, "{what}: Retry-After {:?}", hdr(&r.headers, "retry-after"));
}

/// Upload session caps: one address opening sessions by the thousand hits its own cap, all
/// addresses together hit the global one (also across a restart: sessions live in the store),
/// finished or cancelled sessions stop counting, and pulls carry on throughout. Blobs larger
/// than `uploads.max_size` get 413 SIZE_INVALID, announced or streamed, and the session keeps
/// what it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_session_caps_and_the_size_cap_refuse_with_the_spec_errors() {
    const PER_CLIENT: usize = 1000;
    const TOTAL: usize = 1500;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let cfg = format!(
        "[proxy]\ndefault_upstream = \"\"\n[storage]\nfsync = false\n\
         [uploads]\nmax_sessions = {TOTAL}\nmax_sessions_per_client = {PER_CLIENT}\nmax_size = \"1MiB\"\n"
    );
    let mut sd = Stevedore::builder().config(&cfg).root(&root).start();
    let base = sd.url("");
    let a = common::http::Registry::with_client(&base, common::http::client_from("127.0.0.1"));
    let b = common::http::Registry::with_client(&base, common::http::client_from("127.0.0.2"));
    let c = common::http::Registry::with_client(&base, common::http::client_from("127.0.0.3"));
    let small = common::data::bytes(9001, 4096);
    let small_digest = c.push_blob("pulls/here", &small).await;

    let t0 = Instant::now();
    let mut a_sessions = Vec::new();
    for i in 0..PER_CLIENT {
        let loc = open_session(&a, "caps/a").await.unwrap_or_else(|r| panic!("session {i} from A: {}", r.status));
        a_sessions.push(loc);
        if i % 250 == 0 {
            // Other clients are served while one opens sessions by the thousand.
            c.assert_blob("pulls/here", &small_digest, &small).await;
        }
    }
    let r = open_session(&a, "caps/a").await.expect_err("session past the per-client cap");
    assert_too_many(&r, "session past uploads.max_sessions_per_client");
    assert!(r.text().contains("max_sessions_per_client"), "the refusal names the key: {}", r.text());
    let mut b_sessions = Vec::new();
    for i in 0..TOTAL - PER_CLIENT - 1 {
        b_sessions
            .push(open_session(&b, "caps/b").await.unwrap_or_else(|r| panic!("session {i} from B: {}", r.status)));
    }
    eprintln!("{} sessions opened in {:.1} s", TOTAL - 1, t0.elapsed().as_secs_f64());
    // One session left in all (the pushed blob's session has ended): C takes it, then the
    // global cap holds for everyone.
    let c_loc = open_session(&c, "caps/c").await.unwrap_or_else(|r| panic!("C's session: {} {}", r.status, r.text()));
    let r = open_session(&c, "caps/c").await.expect_err("session past the global cap");
    assert_too_many(&r, "session past uploads.max_sessions");
    assert!(r.text().contains("uploads.max_sessions"), "{}", r.text());
    c.assert_blob("pulls/here", &small_digest, &small).await;

    // Finishing or cancelling frees a place.
    let r = a.send(a.req(reqwest::Method::DELETE, &a_sessions.pop().unwrap())).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let loc = open_session(&a, "caps/a").await.unwrap_or_else(|r| panic!("after a cancel: {}", r.status));
    assert_eq!(open_session(&b, "caps/b").await.expect_err("still full").status, 429);
    let data = common::data::bytes(9002, 1000);
    a.try_finish(&loc, &sha256(&data), Some((data.len() as u64, data.clone().into()))).await.unwrap();
    open_session(&b, "caps/b").await.unwrap_or_else(|r| panic!("after a finish: {}", r.status));

    // Sessions live in the store: after a restart the global cap still holds.
    sd.kill();
    let sd = Stevedore::builder().config(&cfg).root(&root).start();
    let base = sd.url("");
    let c = common::http::Registry::with_client(&base, common::http::client_from("127.0.0.3"));
    let r = open_session(&c, "caps/c").await.expect_err("the cap after a restart");
    assert_too_many(&r, "session past uploads.max_sessions after a restart");
    c.assert_blob("pulls/here", &small_digest, &small).await;
    let r = c.send(c.req(reqwest::Method::DELETE, &common::http::Registry::path_of(&c_loc))).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);

    // The size cap: exactly 1 MiB is fine; one byte more is refused, announced or streamed.
    let one_mib = common::data::bytes(9003, 1 << 20);
    c.push_blob("caps/c", &one_mib).await;
    let over = common::data::bytes(9004, (1 << 20) + 1);
    let r = read(
        c.req(reqwest::Method::POST, &format!("/v2/caps/c/blobs/uploads/?digest={}", sha256(&over)))
            .header("content-type", "application/octet-stream")
            .body(over.clone()),
    )
    .await;
    assert_json_error(&r, 413, "SIZE_INVALID", "monolithic push over uploads.max_size");
    assert!(r.text().contains("uploads.max_size"), "{}", r.text());
    let loc = open_session(&c, "caps/c").await.unwrap_or_else(|r| panic!("{}", r.status));
    let (loc, _) = c.try_patch(&loc, 0, 1000, over[..1000].to_vec().into()).await.unwrap();
    // Streamed (no length announced): cut at the cap, the chunk rolled back.
    let stream = futures::stream::iter(
        over[1000..].chunks(64 << 10).map(|c| Ok::<_, std::io::Error>(c.to_vec())).collect::<Vec<_>>(),
    );
    let r = read(
        c.req(reqwest::Method::PATCH, &loc)
            .header("content-type", "application/octet-stream")
            .body(reqwest::Body::wrap_stream(stream)),
    )
    .await;
    assert_json_error(&r, 413, "SIZE_INVALID", "streamed PATCH past uploads.max_size");
    let (st, stored) = c.try_session_status(&loc).await.unwrap();
    assert_eq!((st, stored), (StatusCode::NO_CONTENT, Some(1000)), "the session keeps its acknowledged bytes");
    let assert_refused = read(c.req(reqwest::Method::GET, &format!("/v2/caps/c/blobs/{}", sha256(&over)))).await;
    assert_eq!(assert_refused.status, 404, "an over-size blob was stored");
}

/// `[server.rate_limit]`: a client past its burst gets 429 TOOMANYREQUESTS with Retry-After
/// while another address and health checks are served; after Retry-After it is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_request_rate_gets_429_and_the_others_do_not() {
    let cfg = "[proxy]\ndefault_upstream = \"\"\n[server.rate_limit]\nrequests_per_second = 2\nburst = 20\n";
    let sd = Stevedore::builder().config(cfg).start();
    let a = common::http::client_from("127.0.0.1");
    let b = common::http::client_from("127.0.0.2");
    let mut served = 0;
    let refused = loop {
        let r = read(a.get(sd.url("/v2/"))).await;
        if r.status == 429 {
            break r;
        }
        assert_eq!(r.status, 200, "GET /v2/ before the limit");
        served += 1;
        assert!(served <= 25, "no 429 after {served} requests with a burst of 20");
    };
    assert!((19..=21).contains(&served), "{served} requests before the first 429 (burst 20)");
    assert_too_many(&refused, "a client over its rate");
    assert!(refused.text().contains("server.rate_limit"), "{}", refused.text());
    assert_eq!(read(a.get(sd.url("/healthz"))).await.status, 200, "health checks are never limited");
    for _ in 0..5 {
        assert_eq!(read(b.get(sd.url("/v2/"))).await.status, 200, "another address is served");
    }
    let after: u64 = hdr(&refused.headers, "retry-after").unwrap().parse().unwrap();
    assert!(after <= 1, "Retry-After {after} s for a rate of 2/s");
    tokio::time::sleep(Duration::from_secs(after)).await;
    assert_eq!(read(a.get(sd.url("/v2/"))).await.status, 200, "served again after Retry-After");
}

/// Reads through someone else's fill (issue #23, defect 2): bob may pull only
/// `up.test/public/*`, alice everything. While alice's pull of a private layer is held mid-fill,
/// bob's GET of the same digest under `public/app` (where the upstream does not have it) is
/// 404 BLOB_UNKNOWN with no bytes, not a join; alice's second GET of the same repository joins
/// without any upstream check, and her bytes are the blob's. After the fill, bob still gets 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_another_repositorys_fill_needs_the_upstream_to_have_it_there() {
    use common::fake::{Fake, Plan};
    const ALICE: (&str, &str) = ("alice", "alice-pw-J1n");
    const BOB: (&str, &str) = ("bob", "bob-pw-J2n");
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = common::stevedore::write_htpasswd(&dir.path().join("htpasswd"), &[ALICE, BOB]);
    let cfg = format!(
        "{}\n[auth]\nhtpasswd = {:?}\nanonymous = \"none\"\n\n\
         [[auth.rules]]\nrepositories = [\"*\"]\nusers = [\"alice\"]\nactions = [\"pull\"]\n\n\
         [[auth.rules]]\nrepositories = [\"up.test/public/*\"]\nusers = [\"bob\"]\nactions = [\"pull\"]\n",
        config("up.test", &[("up.test", &fake.url(), "")]),
        htpasswd.display().to_string()
    );
    let sd = Stevedore::builder().dir(dir.path()).config(&cfg).start();
    let http = client();
    let data = common::data::bytes(2301, 4 << 20);
    let d = fake.add_blob(&data);
    fake.blob_only_in(&d, "private/app");
    let (plan, gate) = Plan::new(data.clone()).hold_after(1 << 20);
    fake.plan(&d, plan);
    let private = sd.url(&format!("/v2/private/app/blobs/{d}?ns=up.test"));
    let public = sd.url(&format!("/v2/public/app/blobs/{d}?ns=up.test"));

    // Alice's pull: the response head means the fill runs (held after 1 MiB).
    let alice =
        tokio::time::timeout(Duration::from_secs(30), http.get(&private).basic_auth(ALICE.0, Some(ALICE.1)).send())
            .await
            .expect("alice's response head")
            .unwrap();
    assert_eq!(alice.status(), 200, "alice's pull of the private layer");
    let alice_body = tokio::spawn(alice.bytes());

    // Bob, under a repository he may pull, where the upstream does not have the digest.
    let bob = tokio::time::timeout(Duration::from_secs(30), http.get(&public).basic_auth(BOB.0, Some(BOB.1)).send())
        .await
        .expect("bob's response head (bounded)")
        .unwrap();
    let (status, cache) = (bob.status().as_u16(), hdr(bob.headers(), "x-stevedore-cache").unwrap_or_default());
    assert_eq!(status, 404, "bob read a private layer through alice's fill (x-stevedore-cache: {cache})");
    let body = tokio::time::timeout(Duration::from_secs(10), bob.text()).await.expect("bob's error body").unwrap();
    assert!(body.contains("BLOB_UNKNOWN") && body.len() < 4096, "bob's 404 body: {body}");
    assert_eq!(
        fake.count("HEAD", &format!("/v2/public/app/blobs/{d}")),
        1,
        "bob's join checks the upstream once:\n  {}",
        fake.dump()
    );

    // Alice again, same repository: joins (its response head arrives while the fill is held)
    // with no check upstream.
    let again =
        tokio::time::timeout(Duration::from_secs(30), http.get(&private).basic_auth(ALICE.0, Some(ALICE.1)).send())
            .await
            .expect("alice's second response head")
            .unwrap();
    assert_eq!(
        (again.status().as_u16(), hdr(again.headers(), "x-stevedore-cache").as_deref()),
        (200, Some("joined")),
        "alice's second pull of the same repository"
    );
    let again = tokio::spawn(again.bytes());
    gate.send(true).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), alice_body).await.expect("alice's body").unwrap().unwrap();
    assert_eq!(sha256(&got), d, "alice's bytes");
    let again =
        tokio::time::timeout(Duration::from_secs(30), again).await.expect("alice's second body").unwrap().unwrap();
    assert_eq!(sha256(&again), d, "alice's second pull's bytes");
    assert_eq!(fake.count("HEAD", &format!("/v2/private/app/blobs/{d}")), 0, "a same-repository join checked upstream");
    assert_eq!(fake.count("GET", &format!("/v2/private/app/blobs/{d}")), 1, "upstream GETs");

    // Committed now: bob still gets 404 (the stored content's check).
    let r = read(http.get(&public).basic_auth(BOB.0, Some(BOB.1))).await;
    assert_json_error(&r, 404, "BLOB_UNKNOWN", "bob's GET after the fill");
    assert!(r.body.len() < 4096, "bob's 404 body has {} bytes", r.body.len());
}
