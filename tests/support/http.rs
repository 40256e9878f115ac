//! A small OCI distribution client over reqwest, strict about status codes and headers.

use reqwest::header::{HeaderMap, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::{Body, Client, StatusCode};
use std::fmt;
use std::time::Duration;

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
        // Include the source chain: "error sending request" alone says little.
        let mut s = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(inner) = src {
            s.push_str(": ");
            s.push_str(&inner.to_string());
            src = inner.source();
        }
        HttpErr::Transport(s)
    }
}

pub type Res<T> = Result<T, HttpErr>;

fn protocol<T>(msg: String) -> Res<T> {
    Err(HttpErr::Protocol(msg))
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

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

#[derive(Clone)]
pub struct Registry {
    pub client: Client,
    /// `http://127.0.0.1:PORT`
    pub base: String,
}

impl Registry {
    pub fn new(base: &str) -> Registry {
        let client = Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            // Upper bound for any single request (a 1 GiB upload included): nothing hangs forever.
            .timeout(Duration::from_secs(180))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("reqwest client");
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
        match header(resp.headers(), "location") {
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
        if resp.status() != StatusCode::ACCEPTED {
            let st = resp.status();
            let body = resp.text().await.unwrap_or_default();
            return protocol(format!("POST uploads for {repo}: expected 202, got {st}: {body}"));
        }
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
        let st = resp.status();
        if st != StatusCode::ACCEPTED {
            let body = resp.text().await.unwrap_or_default();
            return protocol(format!("PATCH {loc} bytes {start}-{end}: expected 202, got {st}: {body}"));
        }
        let new_loc = Self::location(&resp, "PATCH")?;
        match parse_range(resp.headers()) {
            Some(n) if n == start + len => Ok((new_loc, n)),
            other => protocol(format!(
                "PATCH {loc} bytes {start}-{end}: Range header {:?} (parsed {other:?}), expected 0-{end}",
                header(resp.headers(), "range")
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
        let st = resp.status();
        if st != StatusCode::CREATED {
            let body = resp.text().await.unwrap_or_default();
            return protocol(format!("PUT {loc}?digest={digest}: expected 201, got {st}: {body}"));
        }
        if let Some(d) = header(resp.headers(), "docker-content-digest") {
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
        let st = resp.status();
        if st != StatusCode::CREATED {
            let body = resp.text().await.unwrap_or_default();
            return protocol(format!("monolithic POST {repo} {digest}: expected 201, got {st}: {body}"));
        }
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
        use futures::StreamExt;
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
        let digest = super::data::sha256_digest(&data);
        let resp = self
            .client
            .put(self.url(&format!("/v2/{repo}/manifests/{reference}")))
            .header(CONTENT_TYPE, media_type)
            .body(data)
            .send()
            .await?;
        let st = resp.status();
        if st != StatusCode::CREATED {
            let body = resp.text().await.unwrap_or_default();
            return protocol(format!("PUT manifest {repo}:{reference}: expected 201, got {st}: {body}"));
        }
        if let Some(d) = header(resp.headers(), "docker-content-digest") {
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
            .header(
                "accept",
                "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, \
                 application/vnd.docker.distribution.manifest.v2+json, \
                 application/vnd.docker.distribution.manifest.list.v2+json",
            )
            .send()
            .await?;
        let st = resp.status();
        let dcd = header(resp.headers(), "docker-content-digest");
        let ct = header(resp.headers(), "content-type");
        let body = resp.bytes().await?.to_vec();
        Ok((st, dcd, ct, body))
    }
}
