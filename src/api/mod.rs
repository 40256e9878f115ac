//! HTTP front: every `/v2/…` request is parsed into a [`routes::Route`] and dispatched on
//! (route, method) to the handler modules. Handlers return `ApiResult`; errors are rendered by
//! [`crate::error::ApiError`] only.

mod access;
mod admin;
pub mod blobs;
mod headers;
pub mod listing;
pub mod manifests;
mod ops;
mod peer;
pub mod routes;
mod state;
mod status;
mod token;
pub mod uploads;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;

use crate::error::{ApiError, ApiResult, Code};
use crate::registry::{Missing, RegistryError, StoreError, Target};
use routes::Route;

pub use state::{App, AppState};

/// The production router; tests and `main` build exactly this.
pub fn router(state: AppState) -> Router {
    let mut router = Router::new()
        .route("/v2", any(dispatch))
        .route("/v2/", any(dispatch))
        .route("/v2/{*rest}", any(dispatch))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/status", get(status::page::html))
        .route("/status.json", get(status::page::json))
        .route("/token", get(token::token_endpoint).post(token::token_endpoint))
        .route("/_stevedore/cluster/{*rest}", any(peer::dispatch));
    // The admin endpoints exist only when a caller can be told apart from anyone: client
    // authentication (admin by the rules) or an admin token. Otherwise 404, like any path.
    if state.auth.is_some() || state.admin_token.is_some() {
        router = router.route("/admin/prefetch", post(admin_prefetch));
    }
    let mut router = router.with_state(state.clone());
    // Only when a limit is configured: a middleware layer costs every request (and every poll
    // of its future) even when it lets everything through.
    if let Some(limiter) = &state.rate_limiter {
        let limited =
            crate::limits::RateLimited { limiter: limiter.clone(), cluster: state.registry.cluster().clone() };
        router = router.layer(axum::middleware::from_fn_with_state(limited, crate::limits::rate_limit));
    }
    router
        .layer(axum::middleware::from_fn(ops::access_log))
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .layer(tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer::new([axum::http::header::AUTHORIZATION]))
}

async fn admin_prefetch(State(app): State<AppState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let mut resp = admin::respond(admin::prefetch(&app, &parts, body).await);
    resp.extensions_mut().insert(RouteKind("admin"));
    resp
}

/// The route kind a response answered, for logs and metrics.
#[derive(Clone, Copy)]
pub struct RouteKind(pub &'static str);

async fn dispatch(State(app): State<AppState>, req: Request) -> Response {
    let (mut resp, kind) = match routes::parse(req.uri().path()) {
        Ok(route) => {
            let kind = route.kind();
            // For the status page's most pulled repositories.
            let pulled = match (&route, req.method()) {
                (Route::Manifest(n, _), &Method::GET) => Some(n.to_string()),
                _ => None,
            };
            let resp = handle(&app, route, req).await;
            if let (Some(n), true) = (pulled, resp.status().is_success()) {
                crate::status::get().pulled(&n);
            }
            (resp, kind)
        }
        Err(e) => (e.into_response(), "invalid"),
    };
    resp.headers_mut().insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
    resp.extensions_mut().insert(RouteKind(kind));
    resp
}

async fn handle(app: &App, route: Route, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let q = Query::parse(parts.uri.query());
    let h = &parts.headers;
    let head = parts.method == Method::HEAD;
    let target = route.name().map(|n| app.registry.resolve(n, q.get("ns")));
    let ns_echo = match &target {
        Some(Target::Proxy { ns_echo: Some(ns), .. }) => Some(ns.clone()),
        _ => None,
    };
    // Writes go to local repositories only; an upstream's namespace is read-only, whichever
    // way a client names it (`registry::Registry::writable`).
    // Who is asking and whether it may (`auth`); the namespace rule below still applies.
    let caller = match &app.auth {
        None => crate::auth::Caller::open(),
        Some(auth) => match tracing::Instrument::instrument(
            auth.authorize(&parts, &access::need(&route, &parts.method, target.as_ref())),
            crate::trace_span!("auth"),
        )
        .await
        {
            Ok(c) => c,
            Err(e) => return e.into_response(),
        },
    };
    let name = route.name().cloned();
    let local = || match (&name, &target) {
        (Some(name), Some(t)) => app.registry.writable(name, t).map_err(ApiError::from),
        _ => Err(ApiError::new(Code::Unsupported)),
    };
    let t = || target.as_ref().expect("routes with a name have a target");
    let res: ApiResult = async {
        match (route, &parts.method) {
            (Route::Base, &Method::GET | &Method::HEAD) => Ok(headers::json_response("{}".into())),
            (Route::Catalog, &Method::GET) => listing::catalog(app, &q, &caller).await,
            (Route::Tags(n), &Method::GET) => listing::tags(app, &n, t(), &q).await,
            (Route::Referrers(_, d), &Method::GET) => listing::referrers(app, t(), &d, &q).await,
            (Route::Manifest(_, r), &Method::GET | &Method::HEAD) => manifests::get(app, t(), &r, head).await,
            (Route::Manifest(_, r), &Method::PUT) => manifests::put(app, &local()?, &r, &q, h, body).await,
            (Route::Manifest(_, r), &Method::DELETE) => manifests::delete(app, &local()?, &r).await,
            // Not a tag and not a digest: nothing can be stored under it.
            (Route::ManifestBadTag(_, r), &Method::GET | &Method::HEAD) => {
                Err(Code::ManifestUnknown.with_detail(format!("{r:?} is not a tag or a digest")))
            }
            (Route::ManifestBadTag(_, r), &Method::DELETE) => {
                local()?;
                Err(Code::ManifestUnknown.with_detail(format!("{r:?} is not a tag or a digest")))
            }
            (Route::ManifestBadTag(_, r), &Method::PUT) => {
                local()?;
                Err(Code::TagInvalid.with_detail(format!("{r:?}: {}", crate::oci::name::TagError)))
            }
            (Route::Blob(_, d), &Method::GET | &Method::HEAD) => blobs::get(app, t(), &d, h, head).await,
            (Route::Blob(_, d), &Method::DELETE) => blobs::delete(app, &local()?, &d).await,
            (Route::UploadStart(_), &Method::POST) => {
                let client = parts.extensions.get::<crate::limits::ClientAddr>().copied();
                let q = mountable(app, q, &caller);
                uploads::start(app, &local()?, client, &q, h, body).await
            }
            (Route::Upload(_, id), &Method::GET) => uploads::status(app, &local()?, &id).await,
            (Route::Upload(_, id), &Method::PATCH) => uploads::patch(app, &local()?, &id, h, body).await,
            (Route::Upload(_, id), &Method::PUT) => uploads::finish(app, &local()?, &id, &q, h, body).await,
            (Route::Upload(_, id), &Method::DELETE) => uploads::cancel(app, &local()?, &id).await,
            (route, method) => Err(ApiError::new(Code::Unsupported)
                .detail(format!("{method} is not supported on the {} endpoint", route.kind()))),
        }
    }
    .await;
    let mut resp = res.unwrap_or_else(IntoResponse::into_response);
    if let Some(ns) = ns_echo {
        headers::set(resp.headers_mut(), headers::OCI_NAMESPACE, ns);
    }
    resp
}

/// A mount (`?mount=&from=`) only from a repository the caller may pull; else the query
/// without `mount`, so a plain upload session starts.
fn mountable(app: &App, q: Query, caller: &crate::auth::Caller) -> Query {
    let Some(from) = q.get("from").and_then(|f| f.parse::<crate::oci::RepoName>().ok()) else { return q };
    let full = access::full_name(&app.registry.resolve(&from, None));
    if q.get("mount").is_none() || caller.may(from.as_str(), &full, crate::config::Action::Pull) {
        return q;
    }
    Query(q.0.into_iter().filter(|(k, _)| k != "mount").collect())
}

/// The registry's answer as the client sees it: the one place registry errors become wire
/// errors.
impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        match e {
            RegistryError::Unknown(m, detail) => ApiError::new(missing(m)).detail(detail),
            RegistryError::Unsatisfiable(size) => ApiError::new(Code::RangeInvalid)
                .detail(format!("blob has {size} bytes"))
                .header(axum::http::header::CONTENT_RANGE, format!("bytes */{size}")),
            RegistryError::Denied(why) => ApiError::new(Code::Denied).detail(why),
            RegistryError::Upstream(m, u) => upstream_error(&u, missing(m)),
            RegistryError::Store(s) => s.into(),
            RegistryError::StoreShared { full: true, why } => store_full(&why),
            RegistryError::StoreShared { full: false, why } => ApiError::internal(why),
            RegistryError::Busy(why) => {
                ApiError::new(Code::Unavailable).detail(why).header(axum::http::header::RETRY_AFTER, 1)
            }
            RegistryError::Fill(why) => {
                ApiError::new(Code::Unavailable).status(axum::http::StatusCode::BAD_GATEWAY).detail(why)
            }
            RegistryError::Internal(why) => ApiError::internal(why),
            RegistryError::ManifestInvalid(why) => Code::ManifestInvalid.with_detail(why),
            RegistryError::DigestInvalid(why) => Code::DigestInvalid.with_detail(why),
            RegistryError::TagInvalid(why) => Code::TagInvalid.with_detail(why),
            RegistryError::ManifestBlobUnknown(d) => {
                Code::ManifestBlobUnknown.with_detail(serde_json::json!({ "digest": d.to_string() }))
            }
        }
    }
}

fn missing(m: Missing) -> Code {
    match m {
        Missing::Blob => Code::BlobUnknown,
        Missing::Manifest => Code::ManifestUnknown,
        Missing::Name => Code::NameUnknown,
    }
}

/// An upstream's trouble as the client sees it. `missing` is the code for "not there".
fn upstream_error(e: &crate::registry::UpstreamError, missing: Code) -> ApiError {
    use crate::registry::UpstreamError as U;
    match e {
        U::NotFound => ApiError::new(missing).detail("not found locally or upstream"),
        U::Offline => ApiError::new(missing).detail(e.to_string()),
        U::RateLimited => ApiError::new(Code::TooManyRequests).detail("the upstream registry is rate limiting"),
        e => ApiError::new(Code::Unavailable).status(axum::http::StatusCode::BAD_GATEWAY).detail(e.to_string()),
    }
}

/// Decoded query parameters, in order, repeated keys kept.
pub struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Query {
        Query(form_urlencoded::parse(q.unwrap_or("").as_bytes()).into_owned().collect())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0.iter().filter(move |(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        use StoreError::*;
        match e {
            UploadUnknown => ApiError::new(Code::BlobUploadUnknown),
            InvalidOffset { expected, got } => {
                Code::RangeInvalid.with_detail(format!("upload is at offset {expected}, chunk starts at {got}"))
            }
            DigestMismatch { expected, actual } => {
                Code::DigestInvalid.with_detail(format!("content digest is {actual}, expected {expected}"))
            }
            SizeMismatch { expected, actual } => {
                Code::SizeInvalid.with_detail(format!("content size is {actual}, expected {expected}"))
            }
            SessionBusy => ApiError::new(Code::TooManyRequests)
                .detail("the upload session is being written by another request; retry when it is done")
                .header(axum::http::header::RETRY_AFTER, 5),
            RemovalBusy => ApiError::new(Code::Unavailable)
                .status(axum::http::StatusCode::SERVICE_UNAVAILABLE)
                .detail("another replica is removing this content; nothing was stored, retry")
                .header(axum::http::header::RETRY_AFTER, 1),
            e if e.is_full() => store_full(&e),
            Io(e) => ApiError::internal(e),
        }
    }
}

/// `507 UNAVAILABLE`: nothing can be written (content already stored is still served).
fn store_full(e: &dyn std::fmt::Display) -> ApiError {
    tracing::warn!(error = %e, "the store is full: a write was refused");
    crate::metrics::store_write_failed();
    ApiError::new(Code::Unavailable)
        .status(axum::http::StatusCode::INSUFFICIENT_STORAGE)
        .detail("the registry's storage is full; content already stored is still served")
}
