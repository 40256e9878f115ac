//! Client authentication and authorization (`[auth]`): htpasswd users over HTTP Basic, the
//! Docker token flow (`/token`, ES256 JWTs), access rules per repository pattern, anonymous
//! pull on and off, `/metrics` restricted, and the namespace rule on top (an upstream's name is
//! never writable, logged in or not). Real parts on loopback: the `stevedore` binary, skopeo as
//! a client, CNCF Distribution as the upstream; tokens forged here with the server's key (and
//! with another key) to check what the server refuses.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use common::data::sha256;
use common::distribution::Distribution;
use common::http::{
    assert_content, assert_json_error, client, get_manifest, hdr, jwt_claims, read, Challenge, Registry,
};
use common::oci;
use common::skopeo_cli::Skopeo;
use common::stevedore::{config, write_htpasswd, Stevedore};

const ALICE: (&str, &str) = ("alice", "alice-pw-Zq8");
const BOB: (&str, &str) = ("bob", "bob-pw-Xr4");
const ROOT: (&str, &str) = ("root", "root-pw-Wc1");
const CAROL: (&str, &str) = ("carol", "carol-pw-Vb7");

/// A plain local registry (no default upstream) with users alice, bob, root and carol and the
/// `[auth]` lines `extra`, in `dir`.
fn local(dir: &Path, extra: &str) -> Stevedore {
    let cfg = format!("[proxy]\ndefault_upstream = \"\"\n{}", auth_section(dir, extra));
    // Info, for the start-up summary.
    Stevedore::builder().dir(dir).config(&cfg).rust_log("warn,stevedore=info").start()
}

/// `[auth]` with the four users' htpasswd file in `dir`, then `extra`.
fn auth_section(dir: &Path, extra: &str) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let f = write_htpasswd(&dir.join("htpasswd"), &[ALICE, BOB, ROOT, CAROL]);
    // `extra` may open sub-tables ([auth.groups], [[auth.rules]]): plain keys go first.
    let (keys, tables) = match extra.find("\n[") {
        Some(i) => extra.split_at(i),
        None => (extra, ""),
    };
    format!("[auth]\nhtpasswd = {:?}\n{keys}\n{tables}\n", f.display().to_string())
}

/// `POST url` with an `application/x-www-form-urlencoded` body.
fn form(url: String, pairs: &[(&str, &str)]) -> reqwest::RequestBuilder {
    let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish();
    client().post(url).header("content-type", "application/x-www-form-urlencoded").body(body)
}

fn body_json(r: &common::http::Read) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.text()))
}

/// `401 UNAUTHORIZED` with a Bearer challenge pointing at this server's `/token`.
fn assert_challenge(r: &common::http::Read, sd: &Stevedore, scope: Option<&str>, what: &str) -> Challenge {
    assert_json_error(r, 401, "UNAUTHORIZED", what);
    let c = Challenge::of(&r.headers).unwrap_or_else(|| panic!("{what}: no Bearer challenge in {:?}", r.headers));
    assert_eq!(c.realm, sd.url("/token"), "{what}: realm");
    assert_eq!(c.service, "stevedore", "{what}: service");
    assert_eq!(c.scope.as_deref(), scope, "{what}: scope");
    c
}

/// Secrets never reach the log.
fn assert_log_clean(sd: &Stevedore, secrets: &[&str]) {
    let log = sd.log_text();
    for s in secrets {
        assert!(!log.contains(s), "the log contains a secret ({}…)", &s[..s.len().min(8)]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_gets_401_with_the_challenge() {
    let dir = tempfile::tempdir().unwrap();
    let sd = local(dir.path(), "");
    let http = client();
    let url = |p: &str| sd.url(p);

    let r = read(http.get(url("/v2/"))).await;
    assert_challenge(&r, &sd, None, "GET /v2/ anonymously");
    assert_eq!(hdr(&r.headers, "docker-distribution-api-version").as_deref(), Some("registry/2.0"));
    for (user, pw, what) in [("alice", "wrong-pw-Kk2", "a wrong password"), ("mallory", "x-pw-Jj3", "an unknown user")]
    {
        let r = read(http.get(url("/v2/")).basic_auth(user, Some(pw))).await;
        assert_challenge(&r, &sd, None, &format!("GET /v2/ with {what}"));
        let r = read(http.get(url("/v2/team/app/tags/list")).basic_auth(user, Some(pw))).await;
        assert_challenge(&r, &sd, Some("repository:team/app:pull"), &format!("tags with {what}"));
        let r = read(http.post(url("/v2/team/app/blobs/uploads/")).basic_auth(user, Some(pw))).await;
        assert_challenge(&r, &sd, Some("repository:team/app:pull,push"), &format!("upload with {what}"));
        // The token endpoint refuses it too, with a Basic challenge.
        let r =
            read(http.get(url("/token?service=stevedore&scope=repository:team/app:pull")).basic_auth(user, Some(pw)))
                .await;
        assert_json_error(&r, 401, "UNAUTHORIZED", &format!("token with {what}"));
        assert!(hdr(&r.headers, "www-authenticate").unwrap_or_default().starts_with("Basic "), "{what}");
    }
    let r = read(http.get(url("/v2/")).header("authorization", "Basic not-base64!")).await;
    assert_challenge(&r, &sd, None, "a malformed Authorization header");
    let r = read(http.get(url("/v2/")).basic_auth(ALICE.0, Some(ALICE.1))).await;
    assert_eq!(r.status, 200, "the right password: {}", r.text());
    // Health checks stay open; /metrics is open by default.
    for p in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(read(http.get(url(p))).await.status, 200, "{p}");
    }
    let log = sd.problems();
    assert!(log.contains("client authentication is on"), "start-up summary:\n{log}");
    assert!(!log.contains("open registry"), "start-up summary:\n{log}");
    assert_log_clean(&sd, &[ALICE.1, "wrong-pw-Kk2", "x-pw-Jj3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_flow_pushes_and_pulls_and_grants_only_what_was_asked() {
    let dir = tempfile::tempdir().unwrap();
    let sd = local(dir.path(), "");
    let reg = sd.registry();
    let img = oci::make_image(7101, 2, 30_000, "amd64", "linux");

    // Anonymous push: the challenge names the scope; alice's token grants exactly it.
    let (c, r) = reg.token_flow(Method::POST, "/v2/team/app/blobs/uploads/", Some(ALICE)).await;
    assert_eq!(c.scope.as_deref(), Some("repository:team/app:pull,push"));
    assert_eq!(c.realm, sd.url("/token"));
    assert_eq!(r.status, 200, "token: {}", r.text());
    assert_eq!(hdr(&r.headers, "cache-control").as_deref(), Some("no-store"));
    let v = body_json(&r);
    let token = v["token"].as_str().unwrap().to_string();
    assert_eq!(v["access_token"].as_str(), Some(token.as_str()));
    assert_eq!(v["expires_in"], 300);
    assert!(v["issued_at"].as_str().is_some_and(|s| s.ends_with('Z') && s.len() == 20), "issued_at {v}");
    let claims = jwt_claims(&token);
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["iss"], "stevedore");
    assert_eq!(claims["aud"], "stevedore");
    assert_eq!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(), 300);
    assert_eq!(claims["access"], json!([{"type": "repository", "name": "team/app", "actions": ["pull", "push"]}]));
    let header: Value = {
        use base64::Engine as _;
        let h = token.split('.').next().unwrap();
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(h).unwrap()).unwrap()
    };
    assert_eq!(header["alg"], "ES256");

    let bearer = sd.registry().bearer_auth(&token);
    bearer.push_image("team/app", &img, Some("v1")).await;
    let r = read(bearer.req(Method::GET, "/v2/team/app/manifests/v1").header("accept", oci::MT_MANIFEST)).await;
    assert_content(&r, &img.manifest.digest, &img.manifest.data, "pull with the token");
    for b in img.blobs() {
        bearer.assert_blob("team/app", &b.digest, &b.data).await;
    }
    assert_eq!(bearer.tags("team/app").await, ["v1"]);
    assert_eq!(read(bearer.req(Method::GET, "/v2/")).await.status, 200, "GET /v2/ with a token (docker login)");

    // The OAuth2 form containerd posts.
    let r = read(form(
        sd.url("/token"),
        &[
            ("grant_type", "password"),
            ("username", ALICE.0),
            ("password", ALICE.1),
            ("service", "stevedore"),
            ("client_id", "containerd"),
            ("scope", "repository:team/app:pull repository:team/other:pull"),
        ],
    ))
    .await;
    assert_eq!(r.status, 200, "POST /token: {}", r.text());
    let t = body_json(&r)["access_token"].as_str().unwrap().to_string();
    let access = jwt_claims(&t)["access"].clone();
    assert_eq!(access.as_array().map(Vec::len), Some(2), "both scopes granted: {access}");
    bearer.clone().bearer_auth(&t).assert_blob("team/app", &img.layers[0].digest, &img.layers[0].data).await;
    let r = read(form(
        sd.url("/token"),
        &[("grant_type", "password"), ("username", ALICE.0), ("password", "wrong-pw-Kk2"), ("service", "stevedore")],
    ))
    .await;
    assert_json_error(&r, 401, "UNAUTHORIZED", "POST /token with a wrong password");

    // Anonymous (auth.anonymous = "pull"): asked pull and push, granted pull only.
    let (_, r) = reg.token_flow(Method::POST, "/v2/team/app/blobs/uploads/", None).await;
    assert_eq!(r.status, 200, "anonymous token: {}", r.text());
    let anon = body_json(&r)["token"].as_str().unwrap().to_string();
    let claims = jwt_claims(&anon);
    assert_eq!(claims["sub"], "");
    assert_eq!(claims["access"], json!([{"type": "repository", "name": "team/app", "actions": ["pull"]}]));
    let anon_reg = sd.registry().bearer_auth(&anon);
    anon_reg.assert_blob("team/app", &img.layers[0].digest, &img.layers[0].data).await;
    let r = read(anon_reg.req(Method::POST, "/v2/team/app/blobs/uploads/")).await;
    assert_challenge(&r, &sd, Some("repository:team/app:pull,push"), "push with an anonymous token");
    // Anonymous pulls need no token at all.
    sd.registry().assert_blob("team/app", &img.layers[0].digest, &img.layers[0].data).await;
    // A wrong service is refused.
    let r = read(client().get(sd.url("/token?service=elsewhere&scope=repository:team/app:pull"))).await;
    assert_eq!(r.status, 400, "another service: {}", r.text());

    assert_log_clean(&sd, &[ALICE.1, &token, &anon, &t]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_push_gets_denied() {
    let dir = tempfile::tempdir().unwrap();
    let rules = r#"anonymous = "none"
[[auth.rules]]
repositories = ["team/*"]
users = ["alice"]
actions = ["pull", "push"]
[auth.groups]
readers = ["bob"]
[[auth.rules]]
repositories = ["team/*"]
groups = ["readers"]
actions = ["pull"]
"#;
    let sd = local(dir.path(), rules);
    let img = oci::make_image(7201, 1, 20_000, "amd64", "linux");
    sd.registry().basic_auth(ALICE.0, ALICE.1).push_image("team/app", &img, Some("v1")).await;

    let bob = sd.registry().basic_auth(BOB.0, BOB.1);
    bob.assert_blob("team/app", &img.layers[0].digest, &img.layers[0].data).await;
    let r = read(bob.req(Method::POST, "/v2/team/app/blobs/uploads/")).await;
    assert_json_error(&r, 403, "DENIED", "bob's push with Basic");
    assert!(body_json(&r)["errors"][0]["detail"].as_str().unwrap().contains("bob"), "{}", r.text());
    let r = read(
        bob.req(Method::PUT, "/v2/team/app/manifests/v2")
            .header("content-type", oci::MT_MANIFEST)
            .body(img.manifest.data.clone()),
    )
    .await;
    assert_json_error(&r, 403, "DENIED", "bob's manifest PUT");

    // Through the token flow: asked pull and push, granted pull; pushing with it is DENIED.
    let token = sd.registry().login_token(Method::POST, "/v2/team/app/blobs/uploads/", Some(BOB)).await;
    assert_eq!(jwt_claims(&token)["access"], json!([{"type": "repository", "name": "team/app", "actions": ["pull"]}]));
    let bob_t = sd.registry().bearer_auth(&token);
    bob_t.assert_blob("team/app", &img.layers[0].digest, &img.layers[0].data).await;
    let r = read(bob_t.req(Method::POST, "/v2/team/app/blobs/uploads/")).await;
    assert_json_error(&r, 403, "DENIED", "bob's push with a token");

    // alice may not delete; carol (a user no rule names) may do nothing; others' repositories.
    let stored = common::store::blob_files(sd.root());
    let alice = sd.registry().basic_auth(ALICE.0, ALICE.1);
    let r = read(alice.req(Method::DELETE, &format!("/v2/team/app/manifests/{}", img.manifest.digest))).await;
    assert_json_error(&r, 403, "DENIED", "alice's delete");
    let r = read(alice.req(Method::POST, "/v2/other/app/blobs/uploads/")).await;
    assert_json_error(&r, 403, "DENIED", "alice's push outside team/*");
    let carol = sd.registry().basic_auth(CAROL.0, CAROL.1);
    let r = read(carol.req(Method::GET, &format!("/v2/team/app/blobs/{}", img.layers[0].digest))).await;
    assert_json_error(&r, 403, "DENIED", "carol's pull");
    assert_eq!(common::store::blob_files(sd.root()), stored, "a denied request changed the store");
}

/// A PKCS#8 PEM ECDSA P-256 key (what `auth.token_key_file` holds) and its DER.
fn test_key() -> (String, Vec<u8>) {
    let k = rcgen::KeyPair::generate().expect("P-256 key");
    (k.serialize_pem(), k.serialize_der())
}

/// A token signed with `der`: `claims` over a valid default set.
fn forge(der: &[u8], claims: Value) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let mut c = json!({
        "iss": "stevedore", "sub": "alice", "aud": "stevedore", "exp": now + 300, "nbf": now, "iat": now,
        "jti": "forged", "access": [{"type": "repository", "name": "team/a", "actions": ["pull"]}],
    });
    for (k, v) in claims.as_object().unwrap() {
        c[k] = v.clone();
    }
    let key = jsonwebtoken::EncodingKey::from_ec_der(der);
    jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256), &c, &key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_foreign_and_misdirected_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (pem, der) = test_key();
    let key_file = dir.path().join("token.pem");
    std::fs::write(&key_file, pem).unwrap();
    let sd = local(
        dir.path(),
        &format!("anonymous = \"none\"\ntoken_ttl = \"2s\"\ntoken_key_file = {:?}", key_file.display().to_string()),
    );
    let img = oci::make_image(7301, 1, 10_000, "amd64", "linux");
    let alice = sd.registry().basic_auth(ALICE.0, ALICE.1);
    for repo in ["team/a", "team/b"] {
        alice.push_image(repo, &img, Some("v1")).await;
    }
    let tags = |t: &str, repo: &str| {
        let reg = sd.registry().bearer_auth(t);
        let path = format!("/v2/{repo}/tags/list");
        async move { read(reg.req(Method::GET, &path)).await }
    };

    // A token for team/a on team/b: 401 asking for a token with team/b's scope.
    let token = sd.registry().login_token(Method::GET, "/v2/team/a/tags/list", Some(ALICE)).await;
    let issued = Instant::now();
    assert_eq!(tags(&token, "team/a").await.status, 200);
    let r = tags(&token, "team/b").await;
    let c = assert_challenge(&r, &sd, Some("repository:team/b:pull"), "a token for team/a on team/b");
    assert_eq!(c.error.as_deref(), Some("insufficient_scope"));

    // Tokens made here with the server's key: accepted while valid, so the refusals below are
    // about the claims.
    let ok = forge(&der, json!({}));
    assert_eq!(tags(&ok, "team/a").await.status, 200, "a valid token signed with the configured key");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let (_, other_der) = test_key();
    for (what, t) in [
        ("expired", forge(&der, json!({"exp": now - 60, "nbf": now - 360, "iat": now - 360}))),
        ("not yet valid", forge(&der, json!({"nbf": now + 120}))),
        ("another audience", forge(&der, json!({"aud": "other-registry"}))),
        ("another issuer", forge(&der, json!({"iss": "someone-else"}))),
        ("signed by another key", forge(&other_der, json!({}))),
        ("garbage", "eyJhbGciOiJub25lIn0.e30.".to_string()),
    ] {
        let r = tags(&t, "team/a").await;
        let c = assert_challenge(&r, &sd, Some("repository:team/a:pull"), what);
        assert_eq!(c.error.as_deref(), Some("invalid_token"), "{what}");
    }

    // The server's own token expires (token_ttl = 2s, plus the 5 s leeway): refused then.
    let start = Instant::now();
    let mut last = 200;
    while start.elapsed() < Duration::from_secs(20) {
        last = tags(&token, "team/a").await.status;
        if last == 401 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(last, 401, "the token was still accepted {:?} after it was issued", start.elapsed());
    assert!(issued.elapsed() >= Duration::from_secs(2), "refused before its lifetime (token_ttl) was over");
    let r = tags(&token, "team/a").await;
    assert_eq!(Challenge::of(&r.headers).and_then(|c| c.error).as_deref(), Some("invalid_token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_none_refuses_anonymous_pulls_and_the_catalog_shows_only_what_a_user_may_pull() {
    let dir = tempfile::tempdir().unwrap();
    let rules = r#"anonymous = "none"
metrics = "admin"
[[auth.rules]]
repositories = ["team/*"]
users = ["alice"]
actions = ["pull", "push"]
[[auth.rules]]
repositories = ["other/*"]
users = ["bob"]
actions = ["pull"]
[[auth.rules]]
repositories = ["*"]
users = ["root"]
actions = ["pull", "push", "delete", "admin"]
"#;
    let sd = local(dir.path(), rules);
    let img = oci::make_image(7401, 1, 10_000, "amd64", "linux");
    let root = sd.registry().basic_auth(ROOT.0, ROOT.1);
    for repo in ["team/a", "other/b"] {
        root.push_image(repo, &img, Some("v1")).await;
    }
    let http = client();

    let r = get_manifest(&http, sd.url("/v2/team/a/manifests/v1")).await;
    let c = assert_challenge(&r, &sd, Some("repository:team/a:pull"), "an anonymous pull");
    let r = sd.registry().fetch_token(&c, None).await;
    assert_json_error(&r, 401, "UNAUTHORIZED", "an anonymous token");
    let r = read(http.get(sd.url(&format!("/v2/team/a/blobs/{}", img.layers[0].digest)))).await;
    assert_challenge(&r, &sd, Some("repository:team/a:pull"), "an anonymous blob pull");
    let r = read(http.get(sd.url("/v2/_catalog"))).await;
    assert_challenge(&r, &sd, Some("registry:catalog:*"), "an anonymous catalog");

    let catalog = |reg: Registry| async move {
        let r = read(reg.req(Method::GET, "/v2/_catalog")).await;
        assert_eq!(r.status, 200, "catalog: {}", r.text());
        body_json(&r)["repositories"].clone()
    };
    assert_eq!(catalog(sd.registry().basic_auth(ALICE.0, ALICE.1)).await, json!(["team/a"]));
    assert_eq!(catalog(sd.registry().basic_auth(BOB.0, BOB.1)).await, json!(["other/b"]));
    assert_eq!(catalog(root.clone()).await, json!(["other/b", "team/a"]));
    assert_eq!(catalog(sd.registry().basic_auth(CAROL.0, CAROL.1)).await, json!([]));
    // With tokens: the catalog scope, then filtered by the rules.
    let t = sd.registry().login_token(Method::GET, "/v2/_catalog", Some(ALICE)).await;
    assert_eq!(jwt_claims(&t)["access"], json!([{"type": "registry", "name": "catalog", "actions": ["*"]}]));
    assert_eq!(catalog(sd.registry().bearer_auth(&t)).await, json!(["team/a"]));
    let repo_token = sd.registry().login_token(Method::GET, "/v2/team/a/tags/list", Some(ALICE)).await;
    let r = read(sd.registry().bearer_auth(&repo_token).req(Method::GET, "/v2/_catalog")).await;
    assert_challenge(&r, &sd, Some("registry:catalog:*"), "a repository token on the catalog");

    // A cross-repository mount needs pull on `from`: alice (no pull on other/*) gets an upload
    // session instead, root gets the blob mounted.
    let secret = b"a blob only other/* may read".to_vec();
    let sd_digest = root.push_blob("other/b", &secret).await;
    let mount = format!("/v2/team/a/blobs/uploads/?mount={sd_digest}&from=other/b");
    let alice = sd.registry().basic_auth(ALICE.0, ALICE.1);
    let r = read(alice.req(Method::POST, &mount).header("content-length", "0")).await;
    assert_eq!(r.status, 202, "alice's mount from other/b: {}", r.text());
    let r = read(alice.req(Method::GET, &format!("/v2/team/a/blobs/{sd_digest}"))).await;
    assert_eq!(r.status, 404, "the blob reached team/a: {}", r.text());
    let r = read(root.req(Method::POST, &mount).header("content-length", "0")).await;
    assert_eq!(r.status, 201, "root's mount from other/b: {}", r.text());

    // /metrics: administrators only; health checks stay open.
    let r = read(http.get(sd.url("/metrics"))).await;
    assert_json_error(&r, 401, "UNAUTHORIZED", "anonymous /metrics");
    assert!(hdr(&r.headers, "www-authenticate").unwrap_or_default().starts_with("Basic "));
    let r = read(http.get(sd.url("/metrics")).basic_auth(ALICE.0, Some(ALICE.1))).await;
    assert_json_error(&r, 403, "DENIED", "alice's /metrics");
    let r = read(http.get(sd.url("/metrics")).basic_auth(ROOT.0, Some(ROOT.1))).await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("stevedore_requests_total"), "{}", r.text());
    for p in ["/healthz", "/readyz"] {
        assert_eq!(read(http.get(sd.url(p))).await.status, 200, "{p}");
    }
    let log = sd.problems();
    assert!(log.contains("anonymous clients may do nothing"), "start-up summary:\n{log}");
    assert!(log.contains("alice may pull, push on team/*"), "start-up summary:\n{log}");
}

#[test]
fn skopeo_pushes_and_pulls_through_the_token_flow() {
    let dir = tempfile::tempdir().unwrap();
    let sd = local(dir.path(), "anonymous = \"none\"");
    let sk = Skopeo::new();
    let host = sd.host();
    let img = oci::make_image(7501, 2, 200_000, "amd64", "linux");
    let src = dir.path().join("src");
    oci::write_image_layout(&src, &img, "v1");
    let creds = format!("{}:{}", ALICE.0, ALICE.1);
    let dst = format!("docker://{host}/team/app:v1");

    // Without credentials, and with a wrong password: refused.
    for extra in [vec![], vec!["--dest-creds", "alice:wrong-pw-Kk2"]] {
        let mut args = vec!["copy", "--dest-tls-verify=false", "--retry-times=0"];
        args.extend(extra.iter().copied());
        let src_ref = format!("oci:{}:v1", src.display());
        args.extend([src_ref.as_str(), dst.as_str()]);
        let out = sk.run_unchecked(&args);
        assert!(!out.status.success(), "skopeo pushed with {extra:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("401") || err.to_lowercase().contains("unauthorized"), "{err}");
    }
    assert!(common::store::blob_files(sd.root()).is_empty(), "a refused push stored content");

    let mark = sd.requests().len();
    sk.copy(&["--dest-creds", &creds], &format!("oci:{}:v1", src.display()), &dst);
    let out = dir.path().join("out");
    sk.copy(&["--src-creds", &creds], &dst, &format!("oci:{}:v1", out.display()));
    let (_, digest) = oci::layout_ref(&out, "v1");
    assert_eq!(digest, img.manifest.digest, "the manifest after the round trip");
    for b in img.blobs() {
        assert!(oci::layout_blob(&out, &b.digest) == b.data, "blob {} after the round trip", b.digest);
    }
    // skopeo logged in through the token endpoint and then used Bearer tokens.
    let reqs = sd.requests_since(mark);
    let tokens = reqs.iter().filter(|a| a.path() == "/token" && a.status == 200).count();
    assert!(tokens >= 2, "token requests:\n{}", common::stevedore::show(&reqs));
    assert!(reqs.iter().any(|a| a.method == "PUT" && a.path() == "/v2/team/app/manifests/v1" && a.status == 201));
    assert!(reqs
        .iter()
        .all(|a| a.path() != "/token" || a.query("scope").is_none_or(|s| s.starts_with("repository:team/app:"))));
    let r =
        common::rt().block_on(read(client().get(sd.url("/v2/team/app/tags/list")).basic_auth(ALICE.0, Some(ALICE.1))));
    assert_eq!(body_json(&r)["tags"], json!(["v1"]));
    assert_log_clean(&sd, &[ALICE.1]);
}

/// The namespace rule wins over the rules: with every user allowed to push everywhere, a
/// logged-in user still cannot write an upstream's name through any dialect (403 DENIED), an
/// anonymous client is asked to log in first (401 with the challenge), and mirror clients keep
/// getting the upstream's digests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisoning_an_upstream_name_while_logged_in_is_denied() {
    let upstream = Distribution::start(false);
    let up = upstream.url().trim_start_matches("http://").to_string();
    let cache_ns = up.replace(':', "-");
    let small = oci::make_image(7601, 2, 30_000, "amd64", "linux");
    upstream.registry().push_image("small", &small, Some("latest")).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&up, &[(&up, &upstream.url(), "")]).replacen(
        "[proxy]\n",
        "[proxy]\nlocal_namespaces = [\"team/*\"]\n",
        1,
    ) + &auth_section(dir.path(), "");
    let sd = Stevedore::builder().dir(dir.path()).config(&cfg).rust_log("warn,stevedore=info").start();
    let http = client();
    upstream.settle();
    let writes_before = write_lines(&upstream);

    let evil = b"the attacker's config".to_vec();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": oci::MT_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&evil), "size": evil.len()},
        "layers": [],
    }))
    .unwrap();
    // (dialect, the name in the path, path for `rest`)
    let paths: Vec<(&str, String, PathFor)> = vec![
        ("plain", "small".into(), Box::new(|rest: &str| format!("/v2/small/{rest}"))),
        ("ns=", "small".into(), {
            let up = up.clone();
            Box::new(move |rest: &str| format!("/v2/small/{rest}?ns={up}"))
        }),
        ("cache name", format!("{cache_ns}/small"), {
            let ns = cache_ns.clone();
            Box::new(move |rest: &str| format!("/v2/{ns}/small/{rest}"))
        }),
    ];
    let alice_token = sd.registry().login_token(Method::POST, "/v2/small/blobs/uploads/", Some(ALICE)).await;
    assert_eq!(
        jwt_claims(&alice_token)["access"][0]["actions"],
        json!(["pull", "push"]),
        "the rules (none: users push) grant push; the namespace rule refuses it"
    );
    for (dialect, name, p) in &paths {
        let token = sd.registry().login_token(Method::POST, &p("blobs/uploads/"), Some(ALICE)).await;
        let attempts: Vec<(&str, Method, String, &str)> = vec![
            ("POST upload", Method::POST, p("blobs/uploads/"), "pull,push"),
            ("PUT manifest", Method::PUT, p("manifests/latest"), "pull,push"),
            ("DELETE manifest", Method::DELETE, p(&format!("manifests/{}", small.manifest.digest)), "delete"),
        ];
        for (what, method, path, actions) in attempts {
            let what = format!("{what} via {dialect}");
            let req = |rb: reqwest::RequestBuilder| {
                rb.header("content-type", oci::MT_MANIFEST).body(if method == Method::PUT {
                    manifest.clone()
                } else {
                    vec![]
                })
            };
            let r = read(req(http.request(method.clone(), sd.url(&path)))).await;
            assert_challenge(&r, &sd, Some(&format!("repository:{name}:{actions}")), &format!("{what}, anonymous"));
            let r = read(req(http.request(method.clone(), sd.url(&path)).basic_auth(ALICE.0, Some(ALICE.1)))).await;
            assert_json_error(&r, 403, "DENIED", &format!("{what}, Basic"));
            assert!(r.text().contains("read-only"), "{what}: {}", r.text());
            if method != Method::DELETE {
                let r = read(req(http.request(method.clone(), sd.url(&path)).bearer_auth(&token))).await;
                assert_json_error(&r, 403, "DENIED", &format!("{what}, token"));
            }
        }
    }
    assert!(common::store::blob_files(sd.root()).is_empty(), "a denied write stored content");
    upstream.settle();
    assert_eq!(write_lines(&upstream), writes_before, "writes reached the upstream");

    // Mirror clients (anonymous pull) get exactly the upstream's image, in every dialect.
    for (dialect, _, p) in &paths {
        let r = get_manifest(&http, sd.url(&p("manifests/latest"))).await;
        assert_content(&r, &small.manifest.digest, &small.manifest.data, &format!("manifest via {dialect}"));
        for b in small.blobs() {
            let r = read(http.get(sd.url(&p(&format!("blobs/{}", b.digest))))).await;
            assert_content(&r, &b.digest, &b.data, &format!("blob via {dialect}"));
        }
    }
    // A local namespace stays pushable for a user, not for anonymous clients.
    let mine = oci::make_image(7602, 1, 10_000, "amd64", "linux");
    sd.registry().basic_auth(ALICE.0, ALICE.1).push_image("team/app", &mine, Some("v1")).await;
    let r = read(http.post(sd.url("/v2/team/app/blobs/uploads/"))).await;
    assert_challenge(&r, &sd, Some("repository:team/app:pull,push"), "an anonymous push to a local name");
}

/// The request path for `rest` (`manifests/latest`, `blobs/uploads/`) in one dialect.
type PathFor = Box<dyn Fn(&str) -> String>;

/// Access-log lines of writes Distribution answered.
fn write_lines(reg: &Distribution) -> usize {
    reg.access_log()
        .lines()
        .filter(|l| ["\"PUT ", "\"POST ", "\"PATCH ", "\"DELETE "].iter().any(|m| l.contains(m)))
        .count()
}

/// Bound on one engine command.
const ENGINE_LIMIT: Duration = Duration::from_secs(120);

/// A registry that needs a login for everything (`anonymous = "none"`), holding `team/app:v1`
/// (a real image: gzip tar layers an engine can unpack), pushed by alice.
fn engine_setup(dir: &Path) -> (Stevedore, oci::Image) {
    common::proc::require_root();
    let sd = local(&dir.join("stevedore"), "anonymous = \"none\"");
    let img = oci::build("authapp", 7701, 48 * 1024, true);
    common::rt().block_on(sd.registry().basic_auth(ALICE.0, ALICE.1).push_image("team/app", &img, Some("v1")));
    (sd, img)
}

/// The config digest of the manifest stored at `repo:tag` (engines may rewrite manifests, the
/// config stays the image's).
fn config_digest(sd: &Stevedore, repo: &str, tag: &str) -> String {
    let reg = sd.registry().basic_auth(ALICE.0, ALICE.1);
    let (st, _, _, body) = common::rt().block_on(reg.try_get_manifest(repo, tag)).expect("GET manifest");
    assert_eq!(st.as_u16(), 200, "{repo}:{tag}");
    let v: Value = serde_json::from_slice(&body).unwrap();
    v["config"]["digest"].as_str().unwrap_or_default().to_string()
}

/// podman login over plain HTTP on loopback (an insecure registry), then pull, push and pull
/// again, all through the token flow; a wrong password does not log in.
#[test]
fn podman_logs_in_pushes_and_pulls() {
    let dir = tempfile::tempdir().unwrap();
    let (sd, img) = engine_setup(dir.path());
    let host = sd.host();
    let p = common::engines::Podman::new(&dir.path().join("podman"), &host);
    let policy = p.policy().display().to_string();
    let run = |what: &str, args: &[&str]| common::proc::run_ok(what, p.podman(args), ENGINE_LIMIT);
    let out = common::proc::run(
        "podman login (wrong)",
        p.podman(&["login", "--tls-verify=false", "-u", "alice", "-p", "wrong-pw-Kk2", &host]),
        ENGINE_LIMIT,
    );
    assert!(!out.status.success(), "podman logged in with a wrong password:\n{}", out.describe());
    let out = common::proc::run(
        "podman pull (no login)",
        p.podman(&["pull", "--tls-verify=false", "--signature-policy", &policy, &format!("{host}/team/app:v1")]),
        ENGINE_LIMIT,
    );
    assert!(!out.status.success(), "podman pulled without logging in:\n{}", out.describe());

    let mark = sd.requests().len();
    run("podman login", &["login", "--tls-verify=false", "-u", ALICE.0, "-p", ALICE.1, &host]);
    run("podman pull", &["pull", "--tls-verify=false", "--signature-policy", &policy, &format!("{host}/team/app:v1")]);
    run(
        "podman push",
        &[
            "push",
            "--tls-verify=false",
            "--signature-policy",
            &policy,
            &format!("{host}/team/app:v1"),
            &format!("docker://{host}/team/podman:v1"),
        ],
    );
    run("podman rmi", &["rmi", "-a", "-f"]);
    run(
        "podman pull again",
        &["pull", "--tls-verify=false", "--signature-policy", &policy, &format!("{host}/team/podman:v1")],
    );
    let inspect =
        run("podman inspect", &["image", "inspect", "--format", "{{.Id}}", &format!("{host}/team/podman:v1")]);
    assert_eq!(format!("sha256:{}", inspect.stdout.trim()), img.config.digest, "image id (config digest)");
    assert_eq!(config_digest(&sd, "team/podman", "v1"), img.config.digest, "what podman pushed");
    let reqs = sd.requests_since(mark);
    assert!(
        reqs.iter().any(|a| a.path() == "/token" && a.status == 200),
        "podman used no token:\n{}",
        common::stevedore::show(&reqs)
    );
    assert!(reqs.iter().any(|a| a.method == "PUT" && a.path() == "/v2/team/podman/manifests/v1" && a.status == 201));
    assert_log_clean(&sd, &[ALICE.1]);
}

/// `docker login` over plain HTTP on loopback (docker trusts 127.0.0.0/8 as insecure), then
/// pull, tag, push; a wrong password does not log in.
#[test]
fn docker_logs_in_pushes_and_pulls() {
    let dir = tempfile::tempdir().unwrap();
    let (sd, img) = engine_setup(dir.path());
    let host = sd.host();
    let d = common::engines::Dockerd::start(&dir.path().join("docker"), &sd.url(""));
    let run = |what: &str, args: &[&str]| common::proc::run_ok(what, d.docker(args), ENGINE_LIMIT);
    let out = common::proc::run(
        "docker login (wrong)",
        d.docker(&["login", "-u", "alice", "-p", "wrong-pw-Kk2", &host]),
        ENGINE_LIMIT,
    );
    assert!(!out.status.success(), "docker logged in with a wrong password:\n{}", out.describe());

    let mark = sd.requests().len();
    let login = run("docker login", &["login", "-u", ALICE.0, "-p", ALICE.1, &host]);
    assert!(login.stdout.contains("Login Succeeded"), "{}", login.describe());
    run("docker pull", &["pull", &format!("{host}/team/app:v1")]);
    run("docker tag", &["tag", &format!("{host}/team/app:v1"), &format!("{host}/team/docker:v1")]);
    run("docker push", &["push", &format!("{host}/team/docker:v1")]);
    let inspect = run("docker inspect", &["image", "inspect", "--format", "{{.Id}}", &format!("{host}/team/app:v1")]);
    assert_eq!(inspect.stdout.trim(), img.config.digest, "image id (config digest)");
    assert_eq!(config_digest(&sd, "team/docker", "v1"), img.config.digest, "what docker pushed");
    let reqs = sd.requests_since(mark);
    assert!(
        reqs.iter().any(|a| a.path() == "/v2/" && a.status == 401),
        "docker login did not follow the challenge:\n{}",
        common::stevedore::show(&reqs)
    );
    assert!(
        reqs.iter().any(|a| a.path() == "/token" && a.status == 200),
        "docker used no token:\n{}",
        common::stevedore::show(&reqs)
    );
    assert_log_clean(&sd, &[ALICE.1]);
}

/// containerd (`ctr --user`, plain HTTP) pulls with a login and is refused without one.
#[test]
fn containerd_pulls_with_a_login() {
    let dir = tempfile::tempdir().unwrap();
    let (sd, img) = engine_setup(dir.path());
    let host = sd.host();
    let c = common::engines::Containerd::start(&dir.path().join("containerd"));
    let reference = format!("{host}/team/app:v1");
    let out = common::proc::run(
        "ctr pull (no login)",
        c.ctr("anon", &["images", "pull", "--plain-http", &reference]),
        ENGINE_LIMIT,
    );
    assert!(!out.status.success(), "ctr pulled without logging in:\n{}", out.describe());
    let mark = sd.requests().len();
    let user = format!("{}:{}", ALICE.0, ALICE.1);
    common::proc::run_ok(
        "ctr pull",
        c.ctr("authed", &["images", "pull", "--plain-http", "--user", &user, &reference]),
        ENGINE_LIMIT,
    );
    let ls = common::proc::run_ok("ctr images ls", c.ctr("authed", &["images", "ls"]), ENGINE_LIMIT);
    assert!(ls.stdout.contains(&img.manifest.digest), "ctr images ls:\n{}", ls.stdout);
    let reqs = sd.requests_since(mark);
    assert!(
        reqs.iter().any(|a| a.path() == "/token" && a.status == 200),
        "containerd used no token:\n{}",
        common::stevedore::show(&reqs)
    );
    assert!(reqs.iter().any(|a| a.path() == format!("/v2/team/app/blobs/{}", img.layers[0].digest) && a.status == 200));
}

/// `POST /admin/prefetch` needs a login with `admin` on the repositories it names: anonymous
/// callers are asked to log in (401, Basic challenge), a user without `admin` is denied (403),
/// and neither makes the server contact the upstream; an admin's prefetch fills the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_prefetch_endpoint_needs_admin() {
    let upstream = Distribution::start(false);
    let up = upstream.url().trim_start_matches("http://").to_string();
    let small = oci::make_image(7801, 2, 20_000, "amd64", "linux");
    upstream.registry().push_image("small", &small, Some("latest")).await;
    let dir = tempfile::tempdir().unwrap();
    let rules = r#"[[auth.rules]]
repositories = ["*"]
users = ["root"]
actions = ["pull", "admin"]
"#;
    let cfg = config(&up, &[(&up, &upstream.url(), "")]) + &auth_section(dir.path(), rules);
    let sd = Stevedore::builder().dir(dir.path()).config(&cfg).start();
    let http = client();
    let body = json!({"references": [format!("{up}/small:latest")]}).to_string();
    let post = || http.post(sd.url("/admin/prefetch")).header("content-type", "application/json").body(body.clone());
    upstream.settle();
    let gets = upstream.blob_gets("small");

    let r = read(post()).await;
    assert_json_error(&r, 401, "UNAUTHORIZED", "an anonymous prefetch");
    assert!(hdr(&r.headers, "www-authenticate").unwrap_or_default().starts_with("Basic "), "{:?}", r.headers);
    let r = read(post().basic_auth(ALICE.0, Some(ALICE.1))).await;
    assert_json_error(&r, 403, "DENIED", "alice has no admin");
    let r = read(post().basic_auth(ROOT.0, Some("wrong-pw-Qq1"))).await;
    assert_json_error(&r, 401, "UNAUTHORIZED", "a wrong password");
    upstream.settle();
    assert_eq!(upstream.blob_gets("small"), gets, "a refused prefetch reached the upstream");

    let r = read(post().basic_auth(ROOT.0, Some(ROOT.1))).await;
    assert_eq!(r.status, 200, "root's prefetch: {}", r.text());
    let report = body_json(&r);
    assert_eq!(report["ok"].as_array().map(Vec::len), Some(1), "{report}");
    let blobs = common::store::blob_files(sd.root());
    for b in small.blobs() {
        assert!(blobs.contains(&b.digest), "blob {} was not prefetched: {report}", b.digest);
    }
}
