//! TLS on the serving side (`[server.tls]`), against the real binary on 127.0.0.1 with a test CA
//! made here (rcgen): pushes and pulls over TLS, HTTP/2 by ALPN, clients that do not trust
//! the CA, certificates reloaded from disk (polled and on SIGHUP) without a restart and without
//! cutting open connections, a bad replacement that keeps the old pair, stalled handshakes,
//! client certificates (mTLS), the plain listener beside TLS, start-up failures on bad files.
//! The real clients over TLS (skopeo, containerd, podman, docker) are at the end.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::data::sha256;
use common::http::{client_trusting, client_with_identity, error_chain, Registry};
use common::oci;
use common::stevedore::{cli, Stevedore};
use common::tls::{pem_der, served_cert, TestPki};

/// `[server.tls]` for `pki`'s files, plus `extra` lines in that section.
fn tls_config(pki: &TestPki, server_extra: &str, tls_extra: &str) -> String {
    format!(
        "[storage]\nfsync = false\n\n[proxy]\ndefault_upstream = \"\"\n\n[server]\n{server_extra}\n\n\
         [server.tls]\ncert = {:?}\nkey = {:?}\n{tls_extra}\n",
        pki.cert_file, pki.key_file
    )
}

fn start(dir: &Path, pki: &TestPki, server_extra: &str, tls_extra: &str) -> Stevedore {
    Stevedore::builder()
        .dir(&dir.join("stevedore"))
        .config(&tls_config(pki, server_extra, tls_extra))
        .https(&pki.ca_pem)
        .rust_log("warn,stevedore=info,stevedore::server=debug")
        .start()
}

/// Writes a new certificate and key over `pki`'s files (in place, key last).
fn swap_files(pki: &TestPki, cert: &str, key: &str) {
    std::fs::write(&pki.cert_file, cert).unwrap();
    std::fs::write(&pki.key_file, key).unwrap();
}

/// Waits (bounded) until a new connection is served `want` (DER), trusting `ca_pem`.
fn wait_served(sd: &Stevedore, ca_pem: &str, want: &[u8], what: &str) {
    let ok = common::wait_until_blocking(Duration::from_secs(20), || {
        served_cert(sd.port(), ca_pem).ok().as_deref() == Some(want)
    });
    assert!(ok, "{what}: the new certificate was not served within 20 s; log:\n{}", sd.problems());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_and_pull_over_tls_with_http2_by_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("pki"));
    let sd = start(dir.path(), &pki, "", "");
    assert!(sd.log_text().contains("TLS: serving \\\"127.0.0.1\\\""), "start-up summary: {}", sd.log_text());
    let reg = sd.registry();
    let img = oci::build("tls", 7, 256 * 1024, false);
    reg.push_image("team/app", &img, Some("v1")).await;
    let (st, dcd, _, body) = reg.try_get_manifest("team/app", "v1").await.unwrap();
    assert_eq!((st.as_u16(), dcd.as_deref()), (200, Some(img.manifest.digest.as_str())));
    assert_eq!(sha256(&body), img.manifest.digest);
    for b in img.blobs() {
        reg.assert_blob("team/app", &b.digest, &b.data).await;
    }
    // ALPN chose HTTP/2 for a client that offers it, HTTP/1.1 for one that does not.
    let resp = reg.get("/v2/").await;
    assert_eq!((resp.status().as_u16(), resp.version()), (200, reqwest::Version::HTTP_2));
    let h1 = reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(pki.ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let resp = h1.get(sd.url("/v2/")).send().await.unwrap();
    assert_eq!((resp.status().as_u16(), resp.version()), (200, reqwest::Version::HTTP_11));
    assert_eq!(common::tls::https_get_status(sd.port(), "/v2/", &pki.ca_pem), Some(200), "TLS without ALPN");
    // The listener speaks TLS only.
    assert_eq!(common::proc::http_get_status(sd.port(), "/v2/"), None, "plain HTTP on the TLS listener");
    // A client that does not trust the CA gets no answer: the handshake fails.
    let other = TestPki::new(&dir.path().join("other-ca"));
    let e = client_trusting(&other.ca_pem).get(sd.url("/v2/")).send().await.unwrap_err();
    let chain = error_chain(&e);
    assert!(chain.contains("certificate") || chain.contains("Unknown"), "untrusted CA: {chain}");
    assert!(served_cert(sd.port(), &other.ca_pem).is_err());
    // Every request above was served over TLS and logged.
    let reqs = sd.requests_since(0);
    assert!(reqs.iter().any(|a| a.method == "PUT" && a.path() == "/v2/team/app/manifests/v1" && a.status == 201));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_listener_beside_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("pki"));
    let sd = start(dir.path(), &pki, "plain_listen = \"127.0.0.1:0\"", "");
    let plain_addr = sd.plain_addr.clone().expect("the plain listener's address line");
    assert_ne!(plain_addr, sd.addr);
    let img = oci::build("plain", 8, 64 * 1024, false);
    sd.registry().push_image("team/app", &img, Some("v1")).await;
    // The same content on the plain listener, and a push there is seen over TLS.
    let plain = Registry::new(&sd.plain_url(""));
    let (st, dcd, _, _) = plain.try_get_manifest("team/app", "v1").await.unwrap();
    assert_eq!((st.as_u16(), dcd.as_deref()), (200, Some(img.manifest.digest.as_str())));
    let other = oci::build("plain2", 9, 32 * 1024, false);
    plain.push_image("team/other", &other, Some("v2")).await;
    let (st, dcd, _, _) = sd.registry().try_get_manifest("team/other", "v2").await.unwrap();
    assert_eq!((st.as_u16(), dcd.as_deref()), (200, Some(other.manifest.digest.as_str())));
    // The plain listener does not speak TLS, the TLS one does not speak plain HTTP.
    let port: u16 = plain_addr.rsplit(':').next().unwrap().parse().unwrap();
    assert!(served_cert(port, &pki.ca_pem).is_err(), "TLS on the plain listener");
    assert_eq!(common::proc::http_get_status(sd.port(), "/v2/"), None);
    assert_eq!(common::proc::http_get_status(port, "/v2/"), Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_swapped_on_disk_reaches_new_connections_and_open_ones_stay() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("pki"));
    let sd = start(dir.path(), &pki, "", "reload_interval = \"200ms\"");
    let old = pem_der(&std::fs::read_to_string(&pki.cert_file).unwrap());
    assert_eq!(served_cert(sd.port(), &pki.ca_pem).unwrap(), old);
    // An open connection of a client that trusts the first CA only.
    let before = sd.registry();
    assert_eq!(before.get("/v2/").await.status(), 200);
    // A certificate from another CA, so the first client could not open a new connection.
    let ca2 = TestPki::new(&dir.path().join("ca2"));
    let (cert2, key2) = ca2.server_pem();
    swap_files(&pki, &cert2, &key2);
    wait_served(&sd, &ca2.ca_pem, &pem_der(&cert2), "after the swap");
    assert!(sd.log_text().contains("TLS certificate reloaded"), "{}", sd.problems());
    // New connections get the new certificate; the open connection was not cut.
    let fresh = Registry::https(&sd.url(""), &ca2.ca_pem);
    let img = oci::build("swap", 10, 64 * 1024, false);
    fresh.push_image("team/app", &img, Some("v1")).await;
    let (st, dcd, _, _) = before.try_get_manifest("team/app", "v1").await.expect("the open connection still serves");
    assert_eq!((st.as_u16(), dcd.as_deref()), (200, Some(img.manifest.digest.as_str())));
    assert!(served_cert(sd.port(), &pki.ca_pem).is_err(), "a new connection trusting only the old CA");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_replacement_keeps_the_old_certificate_serving() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("pki"));
    let sd = start(dir.path(), &pki, "", "reload_interval = \"200ms\"");
    let old_cert = std::fs::read_to_string(&pki.cert_file).unwrap();
    let old_key = std::fs::read_to_string(&pki.key_file).unwrap();
    let old = pem_der(&old_cert);
    let (new_cert, new_key) = pki.server_pem();
    let failures = |sd: &Stevedore| sd.log_text().matches("TLS files did not load").count();
    // A key that does not match, then a certificate file that is not PEM, then a missing key.
    let steps: [(&str, &str, &str); 3] = [
        ("a key that does not match", &old_cert, &new_key),
        ("a certificate that is not PEM", "not a certificate\n", &old_key),
        ("a missing key", &new_cert, ""),
    ];
    for (i, (what, cert, key)) in steps.into_iter().enumerate() {
        std::fs::write(&pki.cert_file, cert).unwrap();
        if key.is_empty() {
            std::fs::remove_file(&pki.key_file).unwrap();
        } else {
            std::fs::write(&pki.key_file, key).unwrap();
        }
        let ok = common::wait_until_blocking(Duration::from_secs(20), || failures(&sd) > i);
        assert!(ok, "{what}: no reload failure logged; log:\n{}", sd.problems());
        assert_eq!(served_cert(sd.port(), &pki.ca_pem).unwrap(), old, "{what}: the old certificate is served");
        let img = oci::build(&format!("bad{i}"), 20 + i as u64, 32 * 1024, false);
        sd.registry().push_image("team/app", &img, Some("v1")).await;
    }
    let log = sd.log_text();
    for secret in [&old_key, &new_key] {
        assert!(!log.contains(secret.lines().nth(1).unwrap()), "key material in the log");
    }
    // The good pair is taken as soon as it is complete.
    swap_files(&pki, &new_cert, &new_key);
    wait_served(&sd, &pki.ca_pem, &pem_der(&new_cert), "after the fix");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("pki"));
    // No polling: only SIGHUP reloads.
    let sd = start(dir.path(), &pki, "", "reload_interval = \"0s\"");
    let old = pem_der(&std::fs::read_to_string(&pki.cert_file).unwrap());
    let (cert2, key2) = pki.server_pem();
    swap_files(&pki, &cert2, &key2);
    // Without the signal nothing changes (a request in between shows the server is serving).
    assert_eq!(sd.registry().get("/v2/").await.status(), 200);
    assert_eq!(served_cert(sd.port(), &pki.ca_pem).unwrap(), old);
    sd.hup();
    wait_served(&sd, &pki.ca_pem, &pem_der(&cert2), "after SIGHUP");
    assert_eq!(sd.registry().get("/v2/").await.status(), 200, "still running after SIGHUP");
    // A bad pair on SIGHUP: logged, the current one kept.
    std::fs::write(&pki.key_file, "garbage\n").unwrap();
    sd.hup();
    let ok = common::wait_until_blocking(Duration::from_secs(20), || sd.log_text().contains("TLS files did not load"));
    assert!(ok, "no reload failure logged:\n{}", sd.problems());
    assert_eq!(served_cert(sd.port(), &pki.ca_pem).unwrap(), pem_der(&cert2));
}

/// Whether the peer closed `s` (EOF or reset); `false` while it is open and silent.
fn closed(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 512];
    let r = match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    };
    s.set_nonblocking(false).unwrap();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_tls_handshakes_are_cut_while_other_clients_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("pki"));
    let sd = start(dir.path(), &pki, "header_read_timeout = \"5s\"", "");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], sd.port()));
    // Silent after connecting; half a ClientHello record; a whole handshake but no request.
    let mut silent = TcpStream::connect(addr).unwrap();
    let mut partial = TcpStream::connect(addr).unwrap();
    partial.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00]).unwrap();
    let opened = Instant::now();
    // Meanwhile other clients are served at once.
    let img = oci::build("stall", 11, 64 * 1024, false);
    sd.registry().push_image("team/app", &img, Some("v1")).await;
    let (st, _, _, _) = sd.registry().try_get_manifest("team/app", "v1").await.unwrap();
    assert_eq!(st.as_u16(), 200);
    assert!(
        opened.elapsed() < Duration::from_secs(4) && !closed(&mut silent) && !closed(&mut partial),
        "served while the stalled handshakes were still open"
    );
    // Then the stalled ones are cut (the first-request deadline covers the handshake).
    for (what, s) in [("silent", &mut silent), ("partial ClientHello", &mut partial)] {
        let ok = common::wait_until_blocking(Duration::from_secs(20), || closed(s));
        assert!(ok, "{what}: the stalled handshake was not cut");
    }
    assert!(opened.elapsed() >= Duration::from_secs(5), "cut before server.header_read_timeout");
    assert_eq!(sd.registry().get("/v2/").await.status(), 200);
}

/// Over TLS too, an upload whose body stops arriving is cut after `server.body_idle_timeout`,
/// and the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_body_over_tls_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("pki"));
    let sd = start(dir.path(), &pki, "body_idle_timeout = \"1s\"", "");
    let loc = sd.registry().start_upload("team/slow").await;
    let path = Registry::path_of(&loc);
    let (port, ca) = (sd.port(), pki.ca_pem.clone());
    let (took, answer) = tokio::task::spawn_blocking(move || {
        let mut s = common::tls::tls_stream(port, &ca);
        let head = format!(
            "PATCH {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/octet-stream\r\n\
             Content-Length: 100000\r\nContent-Range: 0-99999\r\n\r\n"
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&[7u8; 50_000]).unwrap();
        s.flush().unwrap();
        let start = Instant::now();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).unwrap_or(0);
        (start.elapsed(), String::from_utf8_lossy(&buf[..n]).to_string())
    })
    .await
    .unwrap();
    assert!(took < Duration::from_secs(9), "the stalled PATCH over TLS was not cut: {answer:?}");
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 400"), "the stalled PATCH: {answer:?}");
    assert_eq!(sd.registry().get("/v2/").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_hold_connection_slots_only_until_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("pki"));
    let sd = start(dir.path(), &pki, "header_read_timeout = \"2s\"\nmax_connections = 2", "");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], sd.port()));
    let mut stalled: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // Both slots are held: this client waits in the backlog until the deadline frees them.
    let resp = client_trusting(&pki.ca_pem).get(sd.url("/v2/")).send().await.expect("served once a slot is free");
    assert_eq!(resp.status(), 200);
    for s in &mut stalled {
        assert!(common::wait_until_blocking(Duration::from_secs(20), || closed(s)), "a stalled handshake was not cut");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_required() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("pki"));
    let clients = TestPki::new(&dir.path().join("client-ca"));
    let extra = format!("client_ca = {:?}\nclient_auth = \"required\"", clients.ca_file);
    let sd = start(dir.path(), &pki, "plain_listen = \"127.0.0.1:0\"", &extra);
    assert!(sd.log_text().contains("client certificates required"), "{}", sd.log_text());
    // No certificate: the handshake fails (the client sees the alert or, under TLS 1.3, a
    // closed connection), no request is served.
    assert!(client_trusting(&pki.ca_pem).get(sd.url("/v2/")).send().await.is_err());
    assert!(common::tls::https_get_status(sd.port(), "/v2/", &pki.ca_pem).is_none());
    // A certificate from a CA other than client_ca (here: the server's CA) is refused too.
    let (wrong, _, _) = pki.client_pem("mallory");
    assert!(client_with_identity(&pki.ca_pem, &wrong).get(sd.url("/v2/")).send().await.is_err());
    // One from client_ca is accepted; its subject reaches the request.
    let (alice, _, _) = clients.client_pem("alice.ci");
    let reg = Registry::with_client(&sd.url(""), client_with_identity(&pki.ca_pem, &alice));
    let img = oci::build("mtls", 12, 64 * 1024, false);
    reg.push_image("team/app", &img, Some("v1")).await;
    let (st, dcd, _, _) = reg.try_get_manifest("team/app", "v1").await.unwrap();
    assert_eq!((st.as_u16(), dcd.as_deref()), (200, Some(img.manifest.digest.as_str())));
    let log = sd.log_text();
    assert!(log.contains("client_cert=\\\"alice.ci\\\"") || log.contains("\"client_cert\":\"alice.ci\""), "{log}");
    assert!(!log.contains("mallory\""), "a refused certificate's subject was taken: {log}");
    let reqs = sd.requests_since(0);
    assert!(reqs.iter().any(|a| a.method == "PUT" && a.status == 201), "{}", common::stevedore::show(&reqs));
    // The refused clients' requests never reached the router.
    assert!(!reqs.iter().any(|a| a.path() == "/v2/"), "{}", common::stevedore::show(&reqs));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_optional() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("pki"));
    let clients = TestPki::new(&dir.path().join("client-ca"));
    let extra = format!("client_ca = {:?}", clients.ca_file);
    let sd = start(dir.path(), &pki, "", &extra);
    assert!(sd.log_text().contains("client certificates optional"), "{}", sd.log_text());
    assert_eq!(client_trusting(&pki.ca_pem).get(sd.url("/v2/")).send().await.unwrap().status(), 200);
    let (bob, _, _) = clients.client_pem("bob");
    let with = client_with_identity(&pki.ca_pem, &bob);
    assert_eq!(with.get(sd.url("/v2/")).send().await.unwrap().status(), 200);
    let ok = common::wait_until_blocking(Duration::from_secs(10), || sd.log_text().contains("bob"));
    assert!(ok, "the client certificate's subject was not seen:\n{}", sd.log_text());
    // A certificate that does not verify is refused, not ignored.
    let (wrong, _, _) = pki.client_pem("mallory");
    assert!(client_with_identity(&pki.ca_pem, &wrong).get(sd.url("/v2/")).send().await.is_err());
}

#[test]
fn check_config_and_serve_fail_clearly_on_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("pki"));
    let good = dir.path().join("good.toml");
    std::fs::write(&good, tls_config(&pki, "", "")).unwrap();
    common::stevedore::cli_ok(&["check-config", "--config", good.to_str().unwrap()], Duration::from_secs(20));
    let (_, other_key) = pki.server_pem();
    let other = dir.path().join("other.key");
    std::fs::write(&other, &other_key).unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "garbage\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let key_pem = std::fs::read_to_string(&pki.key_file).unwrap();
    let cases = [
        (missing.clone(), pki.key_file.clone(), "server.tls.cert", "missing.pem"),
        (garbage.clone(), pki.key_file.clone(), "server.tls.cert", "no PEM certificate"),
        (pki.cert_file.clone(), garbage.clone(), "server.tls.key", "no PEM private key"),
        (pki.cert_file.clone(), other.clone(), "server.tls.key", "does not match"),
    ];
    for (cert, key, config_key, why) in cases {
        let cfg = dir.path().join("bad.toml");
        std::fs::write(
            &cfg,
            format!("[proxy]\ndefault_upstream = \"\"\n[server.tls]\ncert = {cert:?}\nkey = {key:?}\n"),
        )
        .unwrap();
        let root = dir.path().join("data");
        for args in [
            vec!["check-config", "--config", cfg.to_str().unwrap()],
            vec![
                "serve",
                "--config",
                cfg.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--root",
                root.to_str().unwrap(),
            ],
        ] {
            let out = cli(&args, Duration::from_secs(20));
            let text = format!("{}{}", out.stdout, out.stderr);
            assert!(!out.status.success(), "{args:?} with {why}: succeeded:\n{text}");
            assert!(text.contains(config_key) && text.contains(why), "{args:?}: {text}");
            for k in [&key_pem, &other_key] {
                assert!(!text.contains(k.lines().nth(1).unwrap()), "key material in the output: {text}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Real clients over TLS, trusting the test CA the way their users configure it.

/// Bound on any one client command.
const LIMIT: Duration = Duration::from_secs(120);

/// Stevedore over TLS with `img` pushed as `team/base:v1`.
fn client_world(dir: &Path, img: &oci::Image) -> (TestPki, Stevedore) {
    let pki = TestPki::new(&dir.join("pki"));
    let sd = start(dir, &pki, "", "");
    common::rt().block_on(sd.registry().push_image("team/base", img, Some("v1")));
    (pki, sd)
}

/// Asserts `repo:tag` on `sd` is `img`: the same manifest digest when `same_manifest`, else
/// (a client that writes its own manifest) the same config and every layer served intact.
fn assert_pushed(sd: &Stevedore, repo: &str, tag: &str, img: &oci::Image, same_manifest: bool, client: &str) {
    common::rt().block_on(async {
        let reg = sd.registry();
        let (st, dcd, _, body) = reg.try_get_manifest(repo, tag).await.unwrap();
        assert_eq!(st.as_u16(), 200, "{client}: {repo}:{tag} was not pushed");
        assert_eq!(dcd.as_deref(), Some(sha256(&body).as_str()), "{client}: digest header");
        if same_manifest {
            assert_eq!(dcd.as_deref(), Some(img.manifest.digest.as_str()), "{client}: pushed manifest digest");
        }
        let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(m["config"]["digest"].as_str(), Some(img.config.digest.as_str()), "{client}: config digest in {m}");
        let layers = m["layers"].as_array().expect("layers");
        assert_eq!(layers.len(), img.layers.len(), "{client}: layers in {m}");
        for l in layers {
            let d = l["digest"].as_str().unwrap();
            let (st, _, n, got) = reg.try_get_blob_hashed(repo, d).await.unwrap();
            assert_eq!((st.as_u16(), got.as_str()), (200, d), "{client}: layer {d}");
            assert_eq!(Some(n), l["size"].as_u64(), "{client}: layer {d} size");
        }
    });
    let reqs = sd.requests_since(0);
    assert!(
        reqs.iter().any(|a| a.method == "PUT" && a.path() == format!("/v2/{repo}/manifests/{tag}") && a.status == 201),
        "{client}: no manifest PUT for {repo}:{tag}:\n{}",
        common::stevedore::show(&reqs)
    );
}

#[test]
fn skopeo_pushes_and_pulls_over_tls_with_a_cert_dir() {
    let dir = tempfile::tempdir().unwrap();
    let img = oci::build("skopeo-tls", 31, 64 * 1024, false);
    let (pki, sd) = client_world(dir.path(), &img);
    let certs = pki.cert_dir(&dir.path().join("certs"));
    let certs = certs.to_str().unwrap();
    let layout = dir.path().join("layout");
    oci::write_image_layout(&layout, &img, "v1");
    let sk = common::skopeo_cli::Skopeo::new();
    let dest = format!("docker://{}/team/skopeo:v1", sd.addr);
    sk.run(&["copy", "--retry-times=0", "--dest-cert-dir", certs, &format!("oci:{}:v1", layout.display()), &dest]);
    assert_pushed(&sd, "team/skopeo", "v1", &img, true, "skopeo");
    let out = dir.path().join("out");
    sk.run(&["copy", "--retry-times=0", "--src-cert-dir", certs, &dest, &format!("oci:{}:v1", out.display())]);
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"].as_str(), Some(img.manifest.digest.as_str()), "skopeo: pulled digest");
    // Without the CA, skopeo refuses the certificate (verification is on).
    let refused = sk.run_unchecked(&["inspect", "--raw", "--retry-times=0", &dest]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && (err.contains("x509") || err.contains("certificate")),
        "skopeo without the CA: {err}"
    );
}

#[test]
fn containerd_pulls_and_pushes_over_tls_with_hosts_toml_ca() {
    common::proc::require_root();
    let dir = tempfile::tempdir().unwrap();
    let img = oci::build("ctr-tls", 32, 64 * 1024, false);
    let (pki, sd) = client_world(dir.path(), &img);
    let ctd = common::engines::Containerd::start(&dir.path().join("containerd"));
    let hosts = |name: &str, ca: bool| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(d.join(&sd.addr)).unwrap();
        let ca_line = if ca { format!("  ca = {:?}\n", pki.ca_file) } else { String::new() };
        std::fs::write(
            d.join(&sd.addr).join("hosts.toml"),
            format!(
                "server = \"https://{a}\"\n\n[host.\"https://{a}\"]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n{ca_line}",
                a = sd.addr
            ),
        )
        .unwrap();
        d
    };
    let with_ca = hosts("certs.d", true);
    let base = format!("{}/team/base:v1", sd.addr);
    let pull = |ns: &str, hosts: &Path| {
        ctd.ctr(ns, &["images", "pull", "--hosts-dir", hosts.to_str().unwrap(), "--snapshotter", "native", &base])
    };
    common::proc::run_ok("containerd: ctr images pull over TLS", pull("tls", &with_ca), LIMIT);
    let ls = common::proc::run_ok("ctr images ls", ctd.ctr("tls", &["images", "ls"]), LIMIT);
    assert!(
        ls.stdout.lines().any(|l| l.starts_with(&base) && l.contains(&img.manifest.digest)),
        "containerd: {base} with {} not in:\n{}",
        img.manifest.digest,
        ls.stdout
    );
    let pushed = format!("{}/team/ctr:v2", sd.addr);
    common::proc::run_ok("ctr images tag", ctd.ctr("tls", &["images", "tag", &base, &pushed]), LIMIT);
    common::proc::run_ok(
        "containerd: ctr images push over TLS",
        ctd.ctr("tls", &["images", "push", "--hosts-dir", with_ca.to_str().unwrap(), &pushed]),
        LIMIT,
    );
    assert_pushed(&sd, "team/ctr", "v2", &img, true, "containerd");
    // Without `ca`, containerd refuses the certificate.
    let no_ca = hosts("certs-no-ca.d", false);
    let refused = common::proc::run("containerd without the CA", pull("no-ca", &no_ca), LIMIT);
    assert!(
        !refused.status.success() && (refused.stderr.contains("x509") || refused.stderr.contains("certificate")),
        "containerd without the CA:\n{}",
        refused.describe()
    );
}

#[test]
fn podman_pulls_and_pushes_over_tls_with_certs_d() {
    common::proc::require_root();
    let dir = tempfile::tempdir().unwrap();
    let img = oci::build("podman-tls", 33, 64 * 1024, false);
    let (pki, sd) = client_world(dir.path(), &img);
    let p = common::engines::Podman::new(&dir.path().join("podman"), &sd.addr);
    let base = format!("{}/team/base:v1", sd.addr);
    let pushed = format!("{}/team/podman:v3", sd.addr);
    // /etc/containers/certs.d/<host:port>/ca.crt, on the sandbox's overlay of /etc.
    let script = format!(
        "set -e\nmkdir -p /etc/containers/certs.d/{a}\ncp {ca:?} /etc/containers/certs.d/{a}/ca.crt\n\
         $PODMAN pull --signature-policy {policy:?} {base}\n\
         $PODMAN image inspect --format '{{{{.Digest}}}}' {base}\n\
         $PODMAN tag {base} {pushed}\n$PODMAN push {pushed}\n",
        a = sd.addr,
        ca = pki.ca_file,
        policy = p.policy(),
    );
    let out = common::proc::run_ok("podman: pull and push over TLS", p.shell(&script), LIMIT);
    assert!(out.stdout.contains(&img.manifest.digest), "podman: pulled digest:\n{}", out.describe());
    assert_pushed(&sd, "team/podman", "v3", &img, false, "podman");
    // Without certs.d, podman refuses the certificate.
    let refused = common::proc::run(
        "podman without the CA",
        p.podman(&["pull", "--signature-policy", p.policy().to_str().unwrap(), &pushed]),
        LIMIT,
    );
    assert!(
        !refused.status.success() && (refused.stderr.contains("x509") || refused.stderr.contains("certificate")),
        "podman without the CA:\n{}",
        refused.describe()
    );
}

#[test]
fn docker_pulls_and_pushes_over_tls_with_certs_d() {
    common::proc::require_root();
    let dir = tempfile::tempdir().unwrap();
    let img = oci::build("docker-tls", 34, 64 * 1024, false);
    let (pki, sd) = client_world(dir.path(), &img);
    // /etc/docker/certs.d/<host:port>/ca.crt in the daemon's sandbox. (dockerd counts
    // 127.0.0.0/8 as an insecure registry and skips verification there; TLS is still all the
    // listener speaks, so a pull or push that works went over TLS.)
    let ca_path = format!("docker/certs.d/{}/ca.crt", sd.addr);
    let d = common::engines::Dockerd::start_with_etc(
        &dir.path().join("docker"),
        &sd.url(""),
        &[(ca_path.as_str(), pki.ca_pem.as_str())],
    );
    let base = format!("{}/team/base:v1", sd.addr);
    let pull = common::proc::run_ok("docker: pull over TLS", d.docker(&["pull", &base]), LIMIT);
    assert!(pull.stdout.contains(&format!("Digest: {}", img.manifest.digest)), "docker pull:\n{}", pull.describe());
    let pushed = format!("{}/team/docker:v4", sd.addr);
    common::proc::run_ok("docker tag", d.docker(&["tag", &base, &pushed]), LIMIT);
    common::proc::run_ok("docker: push over TLS", d.docker(&["push", &pushed]), LIMIT);
    assert_pushed(&sd, "team/docker", "v4", &img, false, "docker");
}

/// TLS and users together: podman logs in over TLS (trusting the test CA through certs.d),
/// the Bearer realm it is sent to is this server's `https://…/token`, and it pushes and pulls
/// through the token flow; without a login it is refused.
#[test]
fn podman_logs_in_over_tls_and_pushes_and_pulls_with_tokens() {
    common::proc::require_root();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("pki"));
    let users = common::stevedore::write_htpasswd(&dir.path().join("htpasswd"), &[("alice", "alice-pw-Tl5")]);
    let cfg = tls_config(&pki, "", "")
        + &format!("\n[auth]\nhtpasswd = {:?}\nanonymous = \"none\"\n", users.display().to_string());
    let sd = Stevedore::builder()
        .dir(&dir.path().join("stevedore"))
        .config(&cfg)
        .https(&pki.ca_pem)
        .rust_log("warn,stevedore=info,stevedore::access=info")
        .start();
    let img = oci::build("podman-tls-login", 35, 64 * 1024, false);
    common::rt().block_on(sd.registry().basic_auth("alice", "alice-pw-Tl5").push_image("team/base", &img, Some("v1")));
    // The challenge names the https realm of this listener.
    let r = common::rt().block_on(common::http::read(client_trusting(&pki.ca_pem).get(sd.url("/v2/"))));
    assert_eq!(r.status, 401, "{}", r.text());
    let challenge = r.headers.get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert!(challenge.contains(&format!("realm=\"https://{}/token\"", sd.addr)), "{challenge}");

    let p = common::engines::Podman::new(&dir.path().join("podman"), &sd.addr);
    let base = format!("{}/team/base:v1", sd.addr);
    let pushed = format!("{}/team/podman:v4", sd.addr);
    let certs = format!(
        "set -e\nmkdir -p /etc/containers/certs.d/{a}\ncp {ca:?} /etc/containers/certs.d/{a}/ca.crt\n",
        a = sd.addr,
        ca = pki.ca_file
    );
    let policy = p.policy();
    let refused = common::proc::run(
        "podman pull without a login",
        p.shell(&format!("{certs}$PODMAN pull --signature-policy {policy:?} {base}\n")),
        LIMIT,
    );
    assert!(!refused.status.success(), "podman pulled without a login:\n{}", refused.describe());
    let mark = sd.requests().len();
    let script = format!(
        "{certs}$PODMAN login -u alice -p alice-pw-Tl5 {a}\n\
         $PODMAN pull --signature-policy {policy:?} {base}\n\
         $PODMAN image inspect --format '{{{{.Digest}}}}' {base}\n\
         $PODMAN tag {base} {pushed}\n$PODMAN push --signature-policy {policy:?} {pushed}\n",
        a = sd.addr,
    );
    let out = common::proc::run_ok("podman: login, pull and push over TLS", p.shell(&script), LIMIT);
    assert!(out.stdout.contains(&img.manifest.digest), "podman: pulled digest:\n{}", out.describe());
    let reqs = sd.requests_since(mark);
    assert!(
        reqs.iter().any(|a| a.path() == "/token" && a.status == 200),
        "podman fetched no token:\n{}",
        common::stevedore::show(&reqs)
    );
    let reg = sd.registry().basic_auth("alice", "alice-pw-Tl5");
    let (st, _, _, body) = common::rt().block_on(reg.try_get_manifest("team/podman", "v4")).unwrap();
    assert_eq!(st.as_u16(), 200, "podman's push: {}", String::from_utf8_lossy(&body));
    let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(m["config"]["digest"].as_str(), Some(img.config.digest.as_str()), "podman pushed {m}");
    assert!(!sd.log_text().contains("alice-pw-Tl5"), "the password reached the log");
}
