//! HTTP on loopback: the reqwest client every test uses, reading a response to its end (or
//! as far as it went), checks on distribution-spec answers, and [`Registry`], the one OCI
//! distribution client of the tests (Stevedore and CNCF Distribution alike).

use futures::StreamExt;
use reqwest::header::{HeaderMap, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::{Body, Client, Method, Response, StatusCode};
use serde_json::Value;
use std::fmt;
use std::time::{Duration, Instant};

use super::data::sha256;
use super::oci::Image;

/// A client for talking to Stevedore and upstreams on loopback: no proxy from the
/// environment, no redirects, and a 30 s bound on every request so nothing hangs a test.
pub fn client() -> Client {
    client_with_timeout(Duration::from_secs(30))
}

/// [`client`] with another bound on each whole request.
pub fn client_with_timeout(timeout: Duration) -> Client {
    builder(timeout).build().expect("reqwest client")
}

/// What every test client shares: loopback only (no proxy from the environment), no
/// redirects, bounded connects and requests.
fn builder(timeout: Duration) -> reqwest::ClientBuilder {
    // Stevedore builds reqwest without a crypto provider and installs ring (src/upstream).
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
}

/// [`client`] connecting from another loopback address (`127.0.0.2`, …): another client
/// address as the server sees it.
pub fn client_from(ip: &str) -> Client {
    let ip: std::net::IpAddr = ip.parse().expect("an IP address");
    builder(Duration::from_secs(30)).local_address(ip).build().expect("reqwest client")
}

/// [`client`] for an HTTPS server whose certificate `ca_pem` issued: that CA is the only one
/// trusted.
pub fn client_trusting(ca_pem: &str) -> Client {
    let certs = reqwest::Certificate::from_pem_bundle(ca_pem.as_bytes()).expect("CA PEM");
    builder(Duration::from_secs(30)).tls_certs_only(certs).build().expect("reqwest client")
}

/// [`client_trusting`] that presents a client certificate: `identity_pem` holds the
/// certificate (chain) and its private key, PEM.
pub fn client_with_identity(ca_pem: &str, identity_pem: &str) -> Client {
    let certs = reqwest::Certificate::from_pem_bundle(ca_pem.as_bytes()).expect("CA PEM");
    let id = reqwest::Identity::from_pem(identity_pem.as_bytes()).expect("client certificate and key PEM");
    builder(Duration::from_secs(30)).tls_certs_only(certs).identity(id).build().expect("reqwest client")
}

/// A header's value (lossily decoded), if present.
pub fn hdr(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// The `Content-Length` header as sent (reqwest's `content_length()` reports 0 for HEAD).
pub fn content_length_header(h: &HeaderMap) -> Option<u64> {
    hdr(h, "content-length").and_then(|v| v.parse().ok())
}

/// An error with its whole source chain: "error sending request" alone says little.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Accept header for manifests, as a pulling client sends it.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// A response read to its end, or as far as it went.
pub struct Read {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// The body stream's error, if it broke.
    pub error: Option<String>,
    /// When the first non-empty body chunk arrived.
    pub first_byte: Option<Instant>,
    pub done: Instant,
}

impl Read {
    pub fn cache(&self) -> String {
        hdr(&self.headers, "x-stevedore-cache").unwrap_or_default()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `req` and reads the body chunk by chunk, keeping what arrived if the stream breaks.
pub async fn read(req: reqwest::RequestBuilder) -> Read {
    let resp = req.send().await.expect("request failed before a response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut body = Vec::new();
    let mut error = None;
    let mut first_byte = None;
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => {
                if !c.is_empty() && first_byte.is_none() {
                    first_byte = Some(Instant::now());
                }
                body.extend_from_slice(&c);
            }
            Err(e) => {
                error = Some(error_chain(&e));
                break;
            }
        }
    }
    Read { status, headers, body, error, first_byte, done: Instant::now() }
}

/// `GET url` with the manifest [`MANIFEST_ACCEPT`] header, read to its end.
pub async fn get_manifest(http: &Client, url: String) -> Read {
    read(http.get(url).header("accept", MANIFEST_ACCEPT)).await
}

/// The answer is a distribution-spec error: `status`, JSON, `errors[0].code == code`.
pub fn assert_json_error(r: &Read, status: u16, code: &str, what: &str) {
    assert_eq!(r.status, status, "{what}: status (body {})", r.text());
    assert!(r.error.is_none(), "{what}: error body broke: {:?}", r.error);
    let ct = hdr(&r.headers, "content-type").unwrap_or_default();
    assert!(ct.starts_with("application/json"), "{what}: Content-Type {ct:?} (body {})", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {}", r.text()));
    assert_eq!(v["errors"][0]["code"].as_str(), Some(code), "{what}: error code in {v}");
    assert!(v["errors"][0]["message"].is_string(), "{what}: error without message: {v}");
}

/// A 200 carrying exactly `body`, with `digest` in `Docker-Content-Digest`.
pub fn assert_content(r: &Read, digest: &str, body: &[u8], what: &str) {
    assert_eq!(r.status, 200, "{what}: status (body {})", r.text());
    assert!(r.error.is_none(), "{what}: body broke: {:?}", r.error);
    assert_eq!(hdr(&r.headers, "docker-content-digest").as_deref(), Some(digest), "{what}: Docker-Content-Digest");
    assert_eq!(sha256(&r.body), digest, "{what}: served bytes hash");
    assert!(r.body == body, "{what}: served bytes differ");
}

/// A `WWW-Authenticate: Bearer realm="…",service="…"[,scope="…"][,error="…"]` challenge.
#[derive(Clone, Debug)]
pub struct Challenge {
    pub realm: String,
    pub service: String,
    pub scope: Option<String>,
    pub error: Option<String>,
}

impl Challenge {
    /// The Bearer challenge in `h`, if there is one.
    pub fn of(h: &HeaderMap) -> Option<Challenge> {
        let v = hdr(h, "www-authenticate")?;
        let rest = v.strip_prefix("Bearer ")?;
        let mut params = std::collections::BTreeMap::new();
        let mut s = rest;
        while let Some((key, after)) = s.split_once("=\"") {
            let (val, tail) = after.split_once('"')?;
            params.insert(key.trim_start_matches(',').trim().to_string(), val.to_string());
            s = tail;
        }
        Some(Challenge {
            realm: params.remove("realm")?,
            service: params.remove("service")?,
            scope: params.remove("scope"),
            error: params.remove("error"),
        })
    }
}

/// The claims of a JWT (its middle part), unverified: what a token says it grants.
pub fn jwt_claims(token: &str) -> Value {
    use base64::Engine as _;
    let part = token.split('.').nth(1).expect("a JWT has three parts");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).expect("JWT claims are base64url");
    serde_json::from_slice(&raw).expect("JWT claims are JSON")
}

/// `Transport`: no (complete) response — expected while the server is being killed.
/// `Protocol`: the server answered, but not as the spec says — always a finding.
#[derive(Debug, Clone)]
pub enum HttpErr {
    Transport(String),
    Protocol(String),
}

impl fmt::Display for HttpErr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpErr::Transport(s) => write!(f, "transport error: {s}"),
            HttpErr::Protocol(s) => write!(f, "protocol error: {s}"),
        }
    }
}

impl HttpErr {
    pub fn is_transport(&self) -> bool {
        matches!(self, HttpErr::Transport(_))
    }
}

impl From<reqwest::Error> for HttpErr {
    fn from(e: reqwest::Error) -> Self {
        HttpErr::Transport(error_chain(&e))
    }
}

pub type Res<T> = Result<T, HttpErr>;

fn protocol<T>(msg: String) -> Res<T> {
    Err(HttpErr::Protocol(msg))
}

/// `resp` if its status is `want`, else a protocol error `"{what}: expected <want>, got
/// <status>: <body>"`.
async fn expect_status(resp: reqwest::Response, want: StatusCode, what: &str) -> Res<reqwest::Response> {
    let st = resp.status();
    if st == want {
        return Ok(resp);
    }
    let body = resp.text().await.unwrap_or_default();
    protocol(format!("{what}: expected {}, got {st}: {body}", want.as_u16()))
}

/// Parses an upload `Range: 0-<last>` header into the number of bytes stored.
pub fn parse_range(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get("range")?.to_str().ok()?.trim();
    let (a, b) = v.split_once('-')?;
    if a != "0" {
        return None;
    }
    Some(b.parse::<u64>().ok()? + 1)
}

/// The tests' one distribution-spec client, in three layers over the same requests:
///
/// - raw: [`Registry::req`] builds any request (credentials added), [`Registry::send`] and
///   `get`/`head`/`delete`/`post`/`put_manifest`/`patch_chunk`/`finish_upload` send one and
///   hand back the response (panicking only when no response came);
/// - fallible (`try_*`): the spec's flows, strict about statuses and headers, returning
///   [`HttpErr`] so a caller can tell a lost connection from a wrong answer (crash tests);
/// - checked: the same flows panicking on any deviation (`start_upload`, `push_blob`,
///   `upload_blob`, `push_manifest`, `push_image`, `assert_blob`, `tags`, `referrers`).
#[derive(Clone)]
pub struct Registry {
    pub client: Client,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// Credentials sent pre-emptively with every request.
    creds: Option<Creds>,
}

/// What a [`Registry`] sends in `Authorization`.
#[derive(Clone)]
enum Creds {
    Basic(String, String),
    Bearer(String),
}

impl Registry {
    /// A client for `base` bounding every request to 60 s.
    pub fn new(base: &str) -> Registry {
        Registry::with_timeout(base, Duration::from_secs(60))
    }

    /// A client for `base` with another bound on each whole request (a 1 GiB upload needs
    /// more than a minute on a busy machine).
    pub fn with_timeout(base: &str, timeout: Duration) -> Registry {
        Registry::with_client(base, client_with_timeout(timeout))
    }

    /// A client for `base` sending through `client` (e.g. one trusting a test CA).
    pub fn with_client(base: &str, client: Client) -> Registry {
        Registry { client, base: base.trim_end_matches('/').to_string(), creds: None }
    }

    /// A client for an HTTPS `base` whose certificate `ca_pem` issued (the only CA trusted);
    /// HTTP/2 when the server offers it by ALPN.
    pub fn https(base: &str, ca_pem: &str) -> Registry {
        Registry::with_client(base, client_trusting(ca_pem))
    }

    /// Sends Basic credentials with every request.
    pub fn basic_auth(mut self, user: &str, password: &str) -> Registry {
        self.creds = Some(Creds::Basic(user.to_string(), password.to_string()));
        self
    }

    /// Sends `Authorization: Bearer <token>` with every request.
    pub fn bearer_auth(mut self, token: &str) -> Registry {
        self.creds = Some(Creds::Bearer(token.to_string()));
        self
    }

    /// This client without credentials.
    pub fn anonymous(mut self) -> Registry {
        self.creds = None;
        self
    }

    /// The Docker token flow as clients run it: `method path` without credentials must be
    /// answered `401` with a `Bearer` challenge; the token is then fetched from the
    /// challenge's realm for its service and scope, with Basic `login` (none: anonymous).
    /// Returns the challenge and the token endpoint's answer.
    pub async fn token_flow(&self, method: Method, path: &str, login: Option<(&str, &str)>) -> (Challenge, Read) {
        let r = read(self.client.request(method.clone(), self.url(path)).header(CONTENT_LENGTH, "0")).await;
        assert_eq!(r.status, 401, "{method} {path} without credentials: {}", r.text());
        let c = Challenge::of(&r.headers).unwrap_or_else(|| panic!("{method} {path}: no Bearer challenge"));
        (c.clone(), self.fetch_token(&c, login).await)
    }

    /// `GET <realm>?service=…&scope=…` with Basic `login` (none: anonymous), read to the end.
    pub async fn fetch_token(&self, c: &Challenge, login: Option<(&str, &str)>) -> Read {
        let mut q: Vec<(&str, &str)> = vec![("service", c.service.as_str())];
        if let Some(s) = &c.scope {
            q.push(("scope", s.as_str()));
        }
        if let Some((u, _)) = login {
            q.push(("account", u));
        }
        let mut rb = self.client.get(&c.realm).query(&q);
        if let Some((u, p)) = login {
            rb = rb.basic_auth(u, Some(p));
        }
        read(rb).await
    }

    /// [`Registry::token_flow`] that must succeed: the token.
    pub async fn login_token(&self, method: Method, path: &str, login: Option<(&str, &str)>) -> String {
        let (c, r) = self.token_flow(method, path, login).await;
        assert_eq!(r.status, 200, "token from {} for {:?}: {}", c.realm, c.scope, r.text());
        let v: Value = serde_json::from_slice(&r.body).expect("token answer is JSON");
        v["token"].as_str().expect("token in the answer").to_string()
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        let rest = self.base.split_once("://").map_or(self.base.as_str(), |(_, r)| r);
        rest.split('/').next().unwrap_or_default().to_string()
    }

    /// Absolute URL for a path or a (possibly relative) Location.
    pub fn url(&self, loc: &str) -> String {
        if loc.starts_with("http://") || loc.starts_with("https://") {
            loc.to_string()
        } else {
            format!("{}{}", self.base, loc)
        }
    }

    /// The path (and query) of a Location, so it stays valid when the server restarts on
    /// another port.
    pub fn path_of(loc: &str) -> String {
        for scheme in ["http://", "https://"] {
            if let Some(rest) = loc.strip_prefix(scheme) {
                return match rest.find('/') {
                    Some(i) => rest[i..].to_string(),
                    None => "/".to_string(),
                };
            }
        }
        loc.to_string()
    }

    fn with_query(loc: &str, q: &str) -> String {
        if loc.contains('?') {
            format!("{loc}&{q}")
        } else {
            format!("{loc}?{q}")
        }
    }

    fn location(resp: &Response, what: &str) -> Res<String> {
        match hdr(resp.headers(), "location") {
            Some(l) if !l.is_empty() => Ok(l),
            _ => protocol(format!("{what}: {} without Location", resp.status())),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Requests (every flow below is built from these)

    /// `method` on a path or Location, with the credentials if any.
    pub fn req(&self, method: Method, loc: &str) -> reqwest::RequestBuilder {
        let r = self.client.request(method, self.url(loc));
        match &self.creds {
            Some(Creds::Basic(u, p)) => r.basic_auth(u, Some(p)),
            Some(Creds::Bearer(t)) => r.bearer_auth(t),
            None => r,
        }
    }

    /// `POST /v2/<repo>/blobs/uploads/` opening a session.
    fn upload_start_req(&self, repo: &str) -> reqwest::RequestBuilder {
        self.req(Method::POST, &format!("/v2/{repo}/blobs/uploads/")).header(CONTENT_LENGTH, "0")
    }

    /// Monolithic `POST /v2/<repo>/blobs/uploads/?digest=<d>` with the whole blob.
    fn monolithic_req(&self, repo: &str, digest: &str, data: Vec<u8>) -> reqwest::RequestBuilder {
        self.req(Method::POST, &format!("/v2/{repo}/blobs/uploads/?digest={digest}"))
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(data)
    }

    /// `PATCH <loc>` with `Content-Range: start-(start+len-1)`.
    fn patch_req(&self, loc: &str, start: u64, len: u64, body: Body) -> reqwest::RequestBuilder {
        self.req(Method::PATCH, loc)
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_LENGTH, len.to_string())
            .header("content-range", format!("{start}-{}", start + len - 1))
            .body(body)
    }

    /// `PUT <loc>?digest=<d>` closing a session, with the final chunk if any.
    fn finish_req(&self, loc: &str, digest: &str, body: Option<(u64, Body)>) -> reqwest::RequestBuilder {
        let req = self.req(Method::PUT, &Self::with_query(loc, &format!("digest={digest}")));
        match body {
            Some((len, b)) => {
                req.header(CONTENT_TYPE, "application/octet-stream").header(CONTENT_LENGTH, len.to_string()).body(b)
            }
            None => req.header(CONTENT_LENGTH, "0"),
        }
    }

    /// `PUT /v2/<repo>/manifests/<reference>`.
    fn manifest_put_req(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: Vec<u8>,
    ) -> reqwest::RequestBuilder {
        self.req(Method::PUT, &format!("/v2/{repo}/manifests/{reference}")).header(CONTENT_TYPE, media_type).body(body)
    }

    /// `GET /v2/<repo>/manifests/<reference>` accepting OCI and Docker types.
    fn manifest_get_req(&self, repo: &str, reference: &str) -> reqwest::RequestBuilder {
        self.req(Method::GET, &format!("/v2/{repo}/manifests/{reference}")).header("accept", MANIFEST_ACCEPT)
    }

    // -----------------------------------------------------------------------------------------
    // Raw: the response as it came

    /// Sends `rb`; panics only when no response came.
    pub async fn send(&self, rb: reqwest::RequestBuilder) -> Response {
        match rb.send().await {
            Ok(r) => r,
            Err(e) => panic!("request to {} failed: {}", self.base, error_chain(&e)),
        }
    }

    pub async fn get(&self, path: &str) -> Response {
        self.send(self.req(Method::GET, path)).await
    }

    pub async fn head(&self, path: &str) -> Response {
        self.send(self.req(Method::HEAD, path)).await
    }

    pub async fn delete(&self, path: &str) -> Response {
        self.send(self.req(Method::DELETE, path)).await
    }

    pub async fn post(&self, path: &str, body: Vec<u8>) -> Response {
        self.send(self.req(Method::POST, path).body(body)).await
    }

    /// `PUT /v2/<repo>/manifests/<reference>`, whatever the answer.
    pub async fn put_manifest(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) -> Response {
        self.send(self.manifest_put_req(repo, reference, media_type, body.to_vec())).await
    }

    /// `PATCH <loc>` with `chunk` at `start` (`Content-Range`), whatever the answer.
    pub async fn patch_chunk(&self, loc: &str, start: usize, chunk: &[u8]) -> Response {
        self.send(self.patch_req(loc, start as u64, chunk.len() as u64, Body::from(chunk.to_vec()))).await
    }

    /// `PUT <loc>?digest=<d>` with `body` as the final chunk (may be empty), whatever the answer.
    pub async fn finish_upload(&self, loc: &str, digest: &str, body: Vec<u8>) -> Response {
        let len = body.len() as u64;
        self.send(self.finish_req(loc, digest, Some((len, Body::from(body))))).await
    }

    // -----------------------------------------------------------------------------------------
    // Fallible: strict about the answer, transport errors apart

    /// `POST /v2/<repo>/blobs/uploads/` → 202 with a Location under
    /// `/v2/<repo>/blobs/uploads/<Docker-Upload-UUID>` and `Range: 0-0`; returns the Location.
    pub async fn try_start_upload(&self, repo: &str) -> Res<String> {
        let what = format!("POST /v2/{repo}/blobs/uploads/");
        let resp = self.upload_start_req(repo).send().await?;
        let resp = expect_status(resp, StatusCode::ACCEPTED, &what).await?;
        let loc = Self::location(&resp, &what)?;
        let uuid = hdr(resp.headers(), "docker-upload-uuid").unwrap_or_default();
        let path = Self::path_of(&loc);
        let path = path.split('?').next().unwrap_or_default();
        if uuid.is_empty() || path != format!("/v2/{repo}/blobs/uploads/{uuid}") {
            return protocol(format!("{what}: Location {loc:?} does not name session {uuid:?} of {repo}"));
        }
        match hdr(resp.headers(), "range").as_deref() {
            Some("0-0") => Ok(loc),
            other => protocol(format!("{what}: Range {other:?} on a new session, expected \"0-0\"")),
        }
    }

    /// [`Registry::try_patch`] of `len` bytes at `start`, running in the background, whose
    /// body the test feeds piece by piece through the sender (the body ends when it is
    /// dropped): a client that sends part of a chunk and pauses or stalls.
    pub fn patch_fed(
        &self,
        loc: &str,
        start: u64,
        len: u64,
    ) -> (tokio::sync::mpsc::Sender<bytes::Bytes>, tokio::task::JoinHandle<Res<(String, u64)>>) {
        let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
        let body =
            futures::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx)) },
            );
        let (reg, loc) = (self.clone(), loc.to_string());
        let patch = tokio::spawn(async move { reg.try_patch(&loc, start, len, Body::wrap_stream(body)).await });
        (tx, patch)
    }

    /// `PATCH <loc>` with `Content-Range: start-end` → 202; returns (new Location, stored
    /// length from `Range`), and checks `Range` says `start + len` bytes are stored.
    pub async fn try_patch(&self, loc: &str, start: u64, len: u64, body: Body) -> Res<(String, u64)> {
        let end = start + len - 1;
        let resp = self.patch_req(loc, start, len, body).send().await?;
        let resp = expect_status(resp, StatusCode::ACCEPTED, &format!("PATCH {loc} bytes {start}-{end}")).await?;
        let new_loc = Self::location(&resp, "PATCH")?;
        match parse_range(resp.headers()) {
            Some(n) if n == start + len => Ok((new_loc, n)),
            other => protocol(format!(
                "PATCH {loc} bytes {start}-{end}: Range header {:?} (parsed {other:?}), expected 0-{end}",
                hdr(resp.headers(), "range")
            )),
        }
    }

    /// `PUT <loc>?digest=<d>` with an optional final chunk → 201 with `digest` in
    /// `Docker-Content-Digest`.
    pub async fn try_finish(&self, loc: &str, digest: &str, body: Option<(u64, Body)>) -> Res<()> {
        let what = format!("PUT {loc}?digest={digest}");
        let resp = self.finish_req(loc, digest, body).send().await?;
        let resp = expect_status(resp, StatusCode::CREATED, &what).await?;
        match hdr(resp.headers(), "docker-content-digest") {
            Some(d) if d == digest => Ok(()),
            other => protocol(format!("{what}: Docker-Content-Digest {other:?}, expected {digest}")),
        }
    }

    /// Monolithic `POST /v2/<repo>/blobs/uploads/?digest=<d>` with the whole blob → 201 with
    /// Location `/v2/<repo>/blobs/<d>` and `digest` in `Docker-Content-Digest`.
    pub async fn try_post_monolithic(&self, repo: &str, digest: &str, data: Vec<u8>) -> Res<()> {
        let what = format!("monolithic POST {repo} {digest}");
        let resp = self.monolithic_req(repo, digest, data).send().await?;
        let resp = expect_status(resp, StatusCode::CREATED, &what).await?;
        let loc = Self::location(&resp, &what)?;
        if Self::path_of(&loc) != format!("/v2/{repo}/blobs/{digest}") {
            return protocol(format!("{what}: Location {loc:?}"));
        }
        match hdr(resp.headers(), "docker-content-digest") {
            Some(d) if d == digest => Ok(()),
            other => protocol(format!("{what}: Docker-Content-Digest {other:?}")),
        }
    }

    /// `GET <loc>` on an upload session: (status, stored length from Range).
    pub async fn try_session_status(&self, loc: &str) -> Res<(StatusCode, Option<u64>)> {
        let resp = self.req(Method::GET, loc).send().await?;
        let st = resp.status();
        let n = parse_range(resp.headers());
        let _ = resp.bytes().await;
        Ok((st, n))
    }

    /// `GET /v2/<repo>/blobs/<digest>`: (status, body).
    pub async fn try_get_blob(&self, repo: &str, digest: &str) -> Res<(StatusCode, Vec<u8>)> {
        let resp = self.req(Method::GET, &format!("/v2/{repo}/blobs/{digest}")).send().await?;
        let st = resp.status();
        let body = resp.bytes().await?;
        Ok((st, body.to_vec()))
    }

    /// Streams `GET /v2/<repo>/blobs/<digest>` through SHA-256 without buffering the body:
    /// (status, Content-Length header, bytes received, `sha256:<hex>` of the body).
    pub async fn try_get_blob_hashed(&self, repo: &str, digest: &str) -> Res<(StatusCode, Option<u64>, u64, String)> {
        use sha2::{Digest, Sha256};
        let resp = self.req(Method::GET, &format!("/v2/{repo}/blobs/{digest}")).send().await?;
        let st = resp.status();
        let cl = resp.content_length();
        let mut h = Sha256::new();
        let mut n = 0u64;
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            n += chunk.len() as u64;
            h.update(&chunk);
        }
        Ok((st, cl, n, format!("sha256:{}", super::data::hex(&h.finalize()))))
    }

    pub async fn try_head_blob(&self, repo: &str, digest: &str) -> Res<StatusCode> {
        let resp = self.req(Method::HEAD, &format!("/v2/{repo}/blobs/{digest}")).send().await?;
        Ok(resp.status())
    }

    /// `PUT /v2/<repo>/manifests/<reference>` → 201 with Location
    /// `/v2/<repo>/manifests/<digest>` and the digest of `data` in `Docker-Content-Digest`.
    pub async fn try_put_manifest(&self, repo: &str, reference: &str, media_type: &str, data: Vec<u8>) -> Res<String> {
        let digest = sha256(&data);
        let what = format!("PUT manifest {repo}:{reference}");
        let resp = self.manifest_put_req(repo, reference, media_type, data).send().await?;
        let resp = expect_status(resp, StatusCode::CREATED, &what).await?;
        let loc = Self::location(&resp, &what)?;
        if Self::path_of(&loc) != format!("/v2/{repo}/manifests/{digest}") {
            return protocol(format!("{what}: Location {loc:?}, expected /v2/{repo}/manifests/{digest}"));
        }
        match hdr(resp.headers(), "docker-content-digest") {
            Some(d) if d == digest => Ok(digest),
            other => protocol(format!("{what}: Docker-Content-Digest {other:?}, expected {digest}")),
        }
    }

    /// `GET /v2/<repo>/manifests/<reference>` accepting OCI and Docker types:
    /// (status, Docker-Content-Digest, Content-Type, body).
    pub async fn try_get_manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Res<(StatusCode, Option<String>, Option<String>, Vec<u8>)> {
        let resp = self.manifest_get_req(repo, reference).send().await?;
        let st = resp.status();
        let dcd = hdr(resp.headers(), "docker-content-digest");
        let ct = hdr(resp.headers(), "content-type");
        let body = resp.bytes().await?.to_vec();
        Ok((st, dcd, ct, body))
    }

    // -----------------------------------------------------------------------------------------
    // Checked: the flows above, panicking on any deviation

    /// Opens an upload session ([`Registry::try_start_upload`]); returns its Location.
    pub async fn start_upload(&self, repo: &str) -> String {
        self.try_start_upload(repo).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Monolithic sha256 push ([`Registry::try_post_monolithic`]); returns the digest.
    pub async fn push_blob(&self, repo: &str, content: &[u8]) -> String {
        self.push_blob_as(repo, content, &sha256(content)).await
    }

    /// Monolithic push under an explicit `digest` (any algorithm); returns it.
    pub async fn push_blob_as(&self, repo: &str, content: &[u8], digest: &str) -> String {
        self.try_post_monolithic(repo, digest, content.to_vec()).await.unwrap_or_else(|e| panic!("{e}"));
        digest.to_string()
    }

    /// `POST` a session, then one `PUT ?digest=` with the whole blob: the push every
    /// registry takes (CNCF Distribution has no monolithic `POST`). Returns the digest.
    pub async fn upload_blob(&self, repo: &str, content: &[u8]) -> String {
        let digest = sha256(content);
        let loc = self.start_upload(repo).await;
        let body = Some((content.len() as u64, Body::from(content.to_vec())));
        self.try_finish(&loc, &digest, body).await.unwrap_or_else(|e| panic!("{e}"));
        digest
    }

    /// Puts a manifest under `reference` (tag or digest) ([`Registry::try_put_manifest`]);
    /// returns its digest.
    pub async fn push_manifest(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) -> String {
        self.try_put_manifest(repo, reference, media_type, body.to_vec()).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Pushes `img`'s blobs ([`Registry::upload_blob`]), then its manifest under `tag`, or by
    /// digest when `tag` is `None`.
    pub async fn push_image(&self, repo: &str, img: &Image, tag: Option<&str>) {
        for b in img.blobs() {
            self.upload_blob(repo, &b.data).await;
        }
        let reference = tag.unwrap_or(&img.manifest.digest);
        self.push_manifest(repo, reference, &img.manifest.media_type, &img.manifest.data).await;
    }

    /// GETs a blob and asserts 200, exactly `content`, and `digest` in Docker-Content-Digest.
    pub async fn assert_blob(&self, repo: &str, digest: &str, content: &[u8]) {
        let r = read(self.req(Method::GET, &format!("/v2/{repo}/blobs/{digest}"))).await;
        assert_eq!(r.status, 200, "GET /v2/{repo}/blobs/{digest}: {}", r.text());
        assert!(r.error.is_none(), "GET /v2/{repo}/blobs/{digest}: body broke: {:?}", r.error);
        assert_eq!(r.body.len(), content.len(), "blob {digest} length");
        assert!(r.body == content, "blob {digest} content differs");
        assert_eq!(hdr(&r.headers, "docker-content-digest").as_deref(), Some(digest), "blob {digest}");
    }

    /// `GET /v2/<repo>/tags/list` → 200; the `tags` array.
    pub async fn tags(&self, repo: &str) -> Vec<String> {
        let r = read(self.req(Method::GET, &format!("/v2/{repo}/tags/list"))).await;
        assert_eq!(r.status, 200, "GET /v2/{repo}/tags/list: {}", r.text());
        let v: Value = serde_json::from_slice(&r.body).expect("tags list is JSON");
        v["tags"]
            .as_array()
            .unwrap_or_else(|| panic!("tags is not an array: {v}"))
            .iter()
            .map(|t| t.as_str().expect("tag is a string").to_string())
            .collect()
    }

    /// `GET /v2/<repo>/referrers/<subject>[?artifactType=]` → 200, an OCI image index
    /// (Content-Type, schemaVersion, mediaType, a `manifests` array); (headers, body).
    pub async fn referrers(&self, repo: &str, subject: &str, artifact_type: Option<&str>) -> (HeaderMap, Value) {
        const INDEX: &str = "application/vnd.oci.image.index.v1+json";
        let mut rb = self.req(Method::GET, &format!("/v2/{repo}/referrers/{subject}"));
        if let Some(t) = artifact_type {
            rb = rb.query(&[("artifactType", t)]);
        }
        let r = read(rb).await;
        assert_eq!(r.status, 200, "referrers of {subject} in {repo}: {}", r.text());
        let ct = hdr(&r.headers, "content-type").unwrap_or_default();
        assert!(ct.starts_with(INDEX), "referrers Content-Type: {ct}");
        let v: Value = serde_json::from_slice(&r.body).expect("referrers body is JSON");
        assert_eq!(v["schemaVersion"], 2, "referrers: {v}");
        assert_eq!(v["mediaType"], INDEX, "referrers: {v}");
        assert!(v["manifests"].is_array(), "referrers manifests must be an array: {v}");
        (r.headers, v)
    }
}
