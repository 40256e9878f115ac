//! Discovery: `GET /v2/<name>/tags/list`, `GET /v2/_catalog`, `GET /v2/<name>/referrers/<digest>`.

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Value};

use super::{headers, Query};
use crate::app::App;
use crate::error::{ApiError, ApiResult, Code};
use crate::oci::manifest::OCI_INDEX;
use crate::oci::{Digest, RepoName};

/// One page of a sorted list after `last`, at most `n` long, and the `Link` to the next page.
fn page(all: Vec<String>, q: &Query, path: &str) -> Result<(Vec<String>, Option<String>), ApiError> {
    let n = match q.get("n") {
        None => None,
        Some(s) => Some(s.parse::<usize>().map_err(|_| Code::PaginationNumberInvalid.with_detail("n must be a non-negative integer"))?),
    };
    let mut items: Vec<String> = match q.get("last") {
        Some(last) => all.into_iter().filter(|t| t.as_str() > last).collect(),
        None => all,
    };
    let mut link = None;
    if let Some(n) = n {
        if items.len() > n {
            items.truncate(n);
            if let Some(last) = items.last() {
                let last: String = form_urlencoded::byte_serialize(last.as_bytes()).collect();
                link = Some(format!("<{path}?n={n}&last={last}>; rel=\"next\""));
            }
        }
    }
    Ok((items, link))
}

fn listing(body: Value, link: Option<String>) -> Response {
    let mut r = headers::json_response(body.to_string());
    if let Some(l) = link {
        headers::set(r.headers_mut(), "link", l);
    }
    r
}

pub async fn tags(app: &App, repo: &RepoName, q: &Query) -> ApiResult {
    let Some(tags) = app.store.list_tags(repo).await? else {
        return Err(ApiError::new(Code::NameUnknown).detail(repo.to_string()));
    };
    let all = tags.into_iter().map(|t| t.as_str().to_string()).collect();
    let (tags, link) = page(all, q, &format!("/v2/{repo}/tags/list"))?;
    Ok(listing(json!({ "name": repo.as_str(), "tags": tags }), link))
}

pub async fn catalog(app: &App, q: &Query) -> ApiResult {
    let (repos, link) = page(app.store.catalog().await?, q, "/v2/_catalog")?;
    Ok(listing(json!({ "repositories": repos }), link))
}

pub async fn referrers(app: &App, repo: &RepoName, subject: &Digest, q: &Query) -> ApiResult {
    let mut manifests = app.store.referrers(repo, subject).await?;
    let filter = q.get("artifactType");
    if let Some(t) = filter {
        manifests.retain(|d| d["artifactType"].as_str() == Some(t));
    }
    let body = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests });
    let mut r = headers::response(StatusCode::OK, Body::from(body.to_string()));
    headers::set(r.headers_mut(), "content-type", OCI_INDEX);
    if filter.is_some() {
        headers::set(r.headers_mut(), headers::OCI_FILTERS_APPLIED, "artifactType");
    }
    Ok(r)
}
