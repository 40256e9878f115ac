//! A minimal pusher for a real registry (CNCF Distribution): `POST` an upload, `PUT` the blob
//! to the returned `Location` with `?digest=` (Distribution has no monolithic
//! `POST ?digest=`), `PUT` manifests. Optional Basic credentials are sent pre-emptively.

use reqwest::StatusCode;

use super::data::sha256;
use super::http::{client, hdr};
use super::oci::Image;

pub struct Pusher {
    http: reqwest::Client,
    /// `http://127.0.0.1:PORT`
    base: String,
    creds: Option<(String, String)>,
}

impl Pusher {
    pub fn new(base: &str, creds: Option<(&str, &str)>) -> Pusher {
        Pusher::with_client(base, creds, client())
    }

    /// A pusher sending through `http` (e.g. one trusting a test CA for an https `base`).
    pub fn with_client(base: &str, creds: Option<(&str, &str)>, http: reqwest::Client) -> Pusher {
        Pusher {
            http,
            base: base.trim_end_matches('/').to_string(),
            creds: creds.map(|(u, p)| (u.to_string(), p.to_string())),
        }
    }

    fn req(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, url);
        match &self.creds {
            Some((u, p)) => r.basic_auth(u, Some(p)),
            None => r,
        }
    }

    fn absolute(&self, loc: &str) -> String {
        if loc.starts_with("http://") || loc.starts_with("https://") {
            loc.to_string()
        } else {
            format!("{}{loc}", self.base)
        }
    }

    /// Uploads `data` to `repo`; returns its digest.
    pub async fn blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256(data);
        let start = self
            .req(reqwest::Method::POST, &format!("{}/v2/{repo}/blobs/uploads/", self.base))
            .header("content-length", "0")
            .send()
            .await
            .expect("POST upload");
        let st = start.status();
        let loc = hdr(start.headers(), "location");
        let body = start.text().await.unwrap_or_default();
        assert_eq!(st, StatusCode::ACCEPTED, "POST {repo} upload: {body}");
        let loc = self.absolute(&loc.expect("upload Location"));
        let sep = if loc.contains('?') { '&' } else { '?' };
        let put = self
            .req(reqwest::Method::PUT, &format!("{loc}{sep}digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .expect("PUT upload");
        let st = put.status();
        let body = put.text().await.unwrap_or_default();
        assert_eq!(st, StatusCode::CREATED, "PUT {repo} blob {digest}: {body}");
        digest
    }

    /// Puts a manifest under `reference` (tag or digest).
    pub async fn manifest(&self, repo: &str, reference: &str, media_type: &str, data: &[u8]) {
        let resp = self
            .req(reqwest::Method::PUT, &format!("{}/v2/{repo}/manifests/{reference}", self.base))
            .header("content-type", media_type)
            .body(data.to_vec())
            .send()
            .await
            .expect("PUT manifest");
        let st = resp.status();
        let dcd = hdr(resp.headers(), "docker-content-digest");
        let body = resp.text().await.unwrap_or_default();
        assert_eq!(st, StatusCode::CREATED, "PUT {repo}:{reference}: {body}");
        assert_eq!(dcd.as_deref(), Some(sha256(data).as_str()), "PUT {repo}:{reference}: Docker-Content-Digest");
    }

    /// Pushes `img`'s blobs, then its manifest under `tag`, or by digest when `tag` is `None`.
    pub async fn image(&self, repo: &str, img: &Image, tag: Option<&str>) {
        for b in img.blobs() {
            self.blob(repo, &b.data).await;
        }
        let reference = tag.unwrap_or(&img.manifest.digest);
        self.manifest(repo, reference, &img.manifest.media_type, &img.manifest.data).await;
    }
}
