//! Parses a `/v2/…` path into a typed [`Route`]. Repository names contain `/`, so the
//! endpoint is recognised from the end of the path and everything before it is the name.

use crate::error::{ApiError, Code};
use crate::oci::name::ReferenceError;
use crate::oci::{Digest, Reference, RepoName};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`
    Base,
    /// `/v2/_catalog`
    Catalog,
    /// `/v2/<name>/tags/list`
    Tags(RepoName),
    /// `/v2/<name>/manifests/<reference>`
    Manifest(RepoName, Reference),
    /// `/v2/<name>/manifests/<reference>` where the reference is neither a valid tag nor a
    /// digest (`.INVALID_MANIFEST_NAME`): no such manifest for GET, HEAD and DELETE (404
    /// `MANIFEST_UNKNOWN`, as the spec's conformance suite wants), `TAG_INVALID` for PUT.
    ManifestBadTag(RepoName, String),
    /// `/v2/<name>/blobs/<digest>`
    Blob(RepoName, Digest),
    /// `/v2/<name>/blobs/uploads/`
    UploadStart(RepoName),
    /// `/v2/<name>/blobs/uploads/<id>`; the id is checked by the handler (unknown → 404).
    Upload(RepoName, String),
    /// `/v2/<name>/referrers/<digest>`
    Referrers(RepoName, Digest),
}

impl Route {
    /// The repository the route addresses.
    pub fn name(&self) -> Option<&RepoName> {
        match self {
            Route::Base | Route::Catalog => None,
            Route::Tags(n) | Route::UploadStart(n) => Some(n),
            Route::Manifest(n, _)
            | Route::ManifestBadTag(n, _)
            | Route::Blob(n, _)
            | Route::Upload(n, _)
            | Route::Referrers(n, _) => Some(n),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Catalog => "catalog",
            Route::Tags(_) => "tags",
            Route::Manifest(..) | Route::ManifestBadTag(..) => "manifest",
            Route::Blob(..) => "blob",
            Route::UploadStart(_) | Route::Upload(..) => "upload",
            Route::Referrers(..) => "referrers",
        }
    }
}

fn name(segs: &[&str]) -> Result<RepoName, ApiError> {
    let joined = segs.join("/");
    joined.parse().map_err(|e: crate::oci::name::NameError| Code::NameInvalid.with_detail(e.to_string()))
}

fn digest(s: &str) -> Result<Digest, ApiError> {
    s.parse().map_err(|e: crate::oci::digest::DigestError| Code::DigestInvalid.with_detail(e.to_string()))
}

/// Parses the raw (still percent-encoded) request path.
pub fn parse(path: &str) -> Result<Route, ApiError> {
    let not_found = || ApiError::new(Code::NameUnknown).detail("no such endpoint");
    let rest = match path {
        "/v2" | "/v2/" => return Ok(Route::Base),
        _ => path.strip_prefix("/v2/").ok_or_else(not_found)?,
    };
    if rest == "_catalog" {
        return Ok(Route::Catalog);
    }
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    let at = |i: usize| if i < n { segs[n - 1 - i] } else { "" };
    if n >= 3 && at(2) == "blobs" && at(1) == "uploads" {
        let name = name(&segs[..n - 3])?;
        return Ok(if at(0).is_empty() { Route::UploadStart(name) } else { Route::Upload(name, at(0).to_string()) });
    }
    if n >= 3 {
        match (at(1), at(0)) {
            ("tags", "list") => return Ok(Route::Tags(name(&segs[..n - 2])?)),
            ("blobs", "uploads") => return Ok(Route::UploadStart(name(&segs[..n - 2])?)),
            ("blobs", d) => {
                let name = name(&segs[..n - 2])?;
                return Ok(Route::Blob(name, digest(d)?));
            }
            ("manifests", r) => {
                let name = name(&segs[..n - 2])?;
                return match r.parse() {
                    Ok(reference) => Ok(Route::Manifest(name, reference)),
                    Err(ReferenceError::Digest(e)) => Err(Code::DigestInvalid.with_detail(e.to_string())),
                    Err(ReferenceError::Tag(_)) => Ok(Route::ManifestBadTag(name, r.to_string())),
                };
            }
            ("referrers", d) => {
                let name = name(&segs[..n - 2])?;
                return Ok(Route::Referrers(name, digest(d)?));
            }
            _ => {}
        }
    }
    Err(not_found())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn code(path: &str) -> &'static str {
        parse(path).unwrap_err().code.describe().0
    }

    #[test]
    fn routes() {
        let n = |s: &str| s.parse::<RepoName>().unwrap();
        assert_eq!(parse("/v2/").unwrap(), Route::Base);
        assert_eq!(parse("/v2/_catalog").unwrap(), Route::Catalog);
        assert_eq!(parse("/v2/a/b/tags/list").unwrap(), Route::Tags(n("a/b")));
        assert_eq!(parse(&format!("/v2/a/blobs/{D}")).unwrap(), Route::Blob(n("a"), D.parse().unwrap()));
        assert_eq!(parse("/v2/a/blobs/uploads/").unwrap(), Route::UploadStart(n("a")));
        assert_eq!(parse("/v2/a/blobs/uploads").unwrap(), Route::UploadStart(n("a")));
        assert_eq!(parse("/v2/a/blobs/uploads/xyz").unwrap(), Route::Upload(n("a"), "xyz".into()));
        assert_eq!(
            parse("/v2/docker.io/library/nginx/manifests/latest").unwrap(),
            Route::Manifest(n("docker.io/library/nginx"), "latest".parse().unwrap())
        );
        // a repository may itself be called "blobs" or "manifests"
        assert_eq!(
            parse("/v2/manifests/manifests/v1").unwrap(),
            Route::Manifest(n("manifests"), "v1".parse().unwrap())
        );
        assert_eq!(parse(&format!("/v2/a/referrers/{D}")).unwrap(), Route::Referrers(n("a"), D.parse().unwrap()));
    }

    #[test]
    fn errors() {
        assert_eq!(code(&format!("/v2/A/blobs/{D}")), "NAME_INVALID");
        assert_eq!(code(&format!("/v2/a/../b/blobs/{D}")), "NAME_INVALID");
        assert_eq!(code(&format!("/v2/%2e%2e/blobs/{D}")), "NAME_INVALID");
        assert_eq!(code("/v2/a/blobs/sha256:abc"), "DIGEST_INVALID");
        assert_eq!(code("/v2/a/manifests/sha256:abc"), "DIGEST_INVALID");
        assert_eq!(parse("/v2/a/manifests/-bad").unwrap(), Route::ManifestBadTag("a".parse().unwrap(), "-bad".into()));
        assert_eq!(
            parse("/v2/a/manifests/.INVALID_MANIFEST_NAME").unwrap(),
            Route::ManifestBadTag("a".parse().unwrap(), ".INVALID_MANIFEST_NAME".into())
        );
        assert_eq!(code("/v2/a"), "NAME_UNKNOWN");
        assert_eq!(code("/v3/"), "NAME_UNKNOWN");
        assert_eq!(code("/v2/a/tags"), "NAME_UNKNOWN");
    }

    proptest! {
        #[test]
        fn never_panics(p in "/v2/[a-zA-Z0-9._:/%-]{0,80}") {
            let _ = parse(&p);
        }
    }
}
