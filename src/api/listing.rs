//! Discovery: `GET /v2/<name>/tags/list`, `GET /v2/_catalog`, `GET /v2/<name>/referrers/<digest>`.

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Value};

use super::App;
use super::{headers, Query};
use crate::error::{ApiError, ApiResult, Code};
use crate::oci::manifest::OCI_INDEX;
use crate::oci::{Digest, RepoName};
use crate::registry::Target;

/// One page of a sorted list after `last`, at most `n` long, and the `Link` to the next page.
fn page(all: Vec<String>, q: &Query, path: &str) -> Result<(Vec<String>, Option<String>), ApiError> {
    let n = match q.get("n") {
        None => None,
        Some(s) => Some(
            s.parse::<usize>()
                .map_err(|_| Code::PaginationNumberInvalid.with_detail("n must be a non-negative integer"))?,
        ),
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

pub async fn tags(app: &App, asked: &RepoName, target: &Target, q: &Query) -> ApiResult {
    let all = app.registry.tags(target).await?;
    let name = target_name(asked, target);
    let (tags, link) = page(all, q, &format!("/v2/{name}/tags/list"))?;
    Ok(listing(json!({ "name": name, "tags": tags }), link))
}

/// The name the client used.
fn target_name(asked: &RepoName, t: &Target) -> String {
    match t {
        Target::Local(n) => n.to_string(),
        Target::Proxy { plain: true, .. } => asked.to_string(),
        Target::Proxy { repo, ns_echo: Some(_), .. } => repo.remote.to_string(),
        Target::Proxy { repo, ns_echo: None, .. } => format!("{}/{}", repo.upstream.host, repo.remote),
    }
}

/// Repositories in one catalog page when the client gives no `n` (a `Link` leads on).
const CATALOG_PAGE: usize = 1000;

/// One page of the repositories the caller may pull (with auth on, the others are left out;
/// a page may then be shorter than `n` and still have a `Link` to the next).
pub async fn catalog(app: &App, q: &Query, caller: &crate::auth::Caller) -> ApiResult {
    let n = match q.get("n") {
        None => CATALOG_PAGE,
        Some(s) => s
            .parse::<usize>()
            .map_err(|_| Code::PaginationNumberInvalid.with_detail("n must be a non-negative integer"))?
            .min(CATALOG_PAGE * 10),
    };
    let (mut repos, more) = app.registry.catalog(q.get("last"), n).await?;
    // Where the next page starts: after the last name looked at, shown or not.
    let scanned = repos.last().cloned();
    repos.retain(|r| caller.may_list(r));
    let link = match scanned {
        Some(last) if more => {
            let last: String = form_urlencoded::byte_serialize(last.as_bytes()).collect();
            Some(format!("</v2/_catalog?n={n}&last={last}>; rel=\"next\""))
        }
        _ => None,
    };
    Ok(listing(json!({ "repositories": repos }), link))
}

pub async fn referrers(app: &App, target: &Target, subject: &Digest, q: &Query) -> ApiResult {
    let mut manifests = app.registry.referrers(target, subject).await?;
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
