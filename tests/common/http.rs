//! HTTP on loopback: the reqwest client every test uses, reading a response to its end (or
//! as far as it went), checks on distribution-spec answers, and [`Registry`], a small OCI
//! distribution client strict about status codes and headers.

use futures::StreamExt;
use reqwest::header::{HeaderMap, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::{Body, Client, StatusCode};
use std::fmt;
use std::time::{Duration, Instant};

use super::data::sha256;

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

/// [`client`] for an HTTPS server whose certificate `ca_pem` issued: that CA is the only one
/// trusted.
pub fn client_trusting(ca_pem: &str) -> Client {
    let certs = reqwest::Certificate::from_pem_bundle(ca_pem.as_bytes()).expect("CA PEM");
    builder(Duration::from_secs(30)).tls_certs_only(certs).build().expect("reqwest client")
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

#[derive(Clone)]
pub struct Registry {
    pub client: Client,
    /// `http://127.0.0.1:PORT`
    pub base: String,
}

impl Registry {
    pub fn new(base: &str) -> Registry {
        // Upper bound for any single request (a 1 GiB upload included): nothing hangs forever.
        let client = client_with_timeout(Duration::from_secs(180));
        Registry { client, base: base.trim_end_matches('/').to_string() }
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

    fn location(resp: &reqwest::Response, what: &str) -> Res<String> {
        match hdr(resp.headers(), "location") {
            Some(l) if !l.is_empty() => Ok(l),
            _ => protocol(format!("{what}: {} without Location", resp.status())),
        }
    }

    /// `POST /v2/<repo>/blobs/uploads/` → 202 + Location.
    pub async fn start_upload(&self, repo: &str) -> Res<String> {
        let resp = self
            .client
            .post(self.url(&format!("/v2/{repo}/blobs/uploads/")))
            .header(CONTENT_LENGTH, "0")
            .send()
            .await?;
        let resp = expect_status(resp, StatusCode::ACCEPTED, &format!("POST uploads for {repo}")).await?;
        Self::location(&resp, "POST uploads")
    }

    /// `PATCH <loc>` with `Content-Range: start-end` → 202; returns (new Location, stored length
    /// from `Range`), and checks `Range` says `start + len` bytes are stored.
    pub async fn patch(&self, loc: &str, start: u64, len: u64, body: Body) -> Res<(String, u64)> {
        let end = start + len - 1;
        let resp = self
            .client
            .patch(self.url(loc))
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_LENGTH, len.to_string())
            .header("content-range", format!("{start}-{end}"))
            .body(body)
            .send()
            .await?;
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

    /// `PUT <loc>?digest=<d>` with an optional final chunk → 201 + Location + digest header.
    pub async fn finish(&self, loc: &str, digest: &str, body: Option<(u64, Body)>) -> Res<()> {
        let mut req = self.client.put(self.url(&Self::with_query(loc, &format!("digest={digest}"))));
        req = match body {
            Some((len, b)) => {
                req.header(CONTENT_TYPE, "application/octet-stream").header(CONTENT_LENGTH, len.to_string()).body(b)
            }
            None => req.header(CONTENT_LENGTH, "0"),
        };
        let resp = req.send().await?;
        let resp = expect_status(resp, StatusCode::CREATED, &format!("PUT {loc}?digest={digest}")).await?;
        if let Some(d) = hdr(resp.headers(), "docker-content-digest") {
            if d != digest {
                return protocol(format!("PUT {loc}: Docker-Content-Digest {d}, expected {digest}"));
            }
        }
        Ok(())
    }

    /// Monolithic `POST /v2/<repo>/blobs/uploads/?digest=<d>` with the whole blob → 201.
    pub async fn post_monolithic(&self, repo: &str, digest: &str, data: Vec<u8>) -> Res<()> {
        let resp = self
            .client
            .post(self.url(&format!("/v2/{repo}/blobs/uploads/?digest={digest}")))
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(data)
            .send()
            .await?;
        expect_status(resp, StatusCode::CREATED, &format!("monolithic POST {repo} {digest}")).await?;
        Ok(())
    }

    /// `GET <loc>` on an upload session: (status, stored length from Range if 204).
    pub async fn session_status(&self, loc: &str) -> Res<(StatusCode, Option<u64>)> {
        let resp = self.client.get(self.url(loc)).send().await?;
        let st = resp.status();
        let n = parse_range(resp.headers());
        let _ = resp.bytes().await;
        Ok((st, n))
    }

    /// `GET /v2/<repo>/blobs/<digest>`: (status, body).
    pub async fn get_blob(&self, repo: &str, digest: &str) -> Res<(StatusCode, Vec<u8>)> {
        let resp = self.client.get(self.url(&format!("/v2/{repo}/blobs/{digest}"))).send().await?;
        let st = resp.status();
        let body = resp.bytes().await?;
        Ok((st, body.to_vec()))
    }

    /// Streams `GET /v2/<repo>/blobs/<digest>` through SHA-256 without buffering the body:
    /// (status, Content-Length header, bytes received, `sha256:<hex>` of the body).
    pub async fn get_blob_hashed(&self, repo: &str, digest: &str) -> Res<(StatusCode, Option<u64>, u64, String)> {
        use sha2::{Digest, Sha256};
        let resp = self.client.get(self.url(&format!("/v2/{repo}/blobs/{digest}"))).send().await?;
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

    pub async fn head_blob(&self, repo: &str, digest: &str) -> Res<StatusCode> {
        let resp = self.client.head(self.url(&format!("/v2/{repo}/blobs/{digest}"))).send().await?;
        Ok(resp.status())
    }

    /// `PUT /v2/<repo>/manifests/<reference>` → 201; checks Docker-Content-Digest if present.
    pub async fn put_manifest(&self, repo: &str, reference: &str, media_type: &str, data: Vec<u8>) -> Res<()> {
        let digest = sha256(&data);
        let resp = self
            .client
            .put(self.url(&format!("/v2/{repo}/manifests/{reference}")))
            .header(CONTENT_TYPE, media_type)
            .body(data)
            .send()
            .await?;
        let resp = expect_status(resp, StatusCode::CREATED, &format!("PUT manifest {repo}:{reference}")).await?;
        if let Some(d) = hdr(resp.headers(), "docker-content-digest") {
            if d != digest {
                return protocol(format!(
                    "PUT manifest {repo}:{reference}: Docker-Content-Digest {d}, expected {digest}"
                ));
            }
        }
        Ok(())
    }

    /// `GET /v2/<repo>/manifests/<reference>` accepting OCI and Docker types:
    /// (status, Docker-Content-Digest, Content-Type, body).
    pub async fn get_manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Res<(StatusCode, Option<String>, Option<String>, Vec<u8>)> {
        let resp = self
            .client
            .get(self.url(&format!("/v2/{repo}/manifests/{reference}")))
            .header("accept", MANIFEST_ACCEPT)
            .send()
            .await?;
        let st = resp.status();
        let dcd = hdr(resp.headers(), "docker-content-digest");
        let ct = hdr(resp.headers(), "content-type");
        let body = resp.bytes().await?.to_vec();
        Ok((st, dcd, ct, body))
    }
}
