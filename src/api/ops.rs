//! Operator endpoints (`/healthz`, `/readyz`, `/metrics`) and the access log.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::{Frame, SizeHint};

use super::{headers, AppState, RouteKind};

/// 200 while the store can serve what it holds, else 503. A store that cannot be written
/// (a full disk) still serves cache hits: that is a metric (`stevedore_store_writable`) and a
/// note in the answer, not an outage. Says so when the registry is offline.
pub async fn readyz(State(app): State<AppState>) -> Response {
    if !app.registry.readable().await {
        return (StatusCode::SERVICE_UNAVAILABLE, "store is not readable\n").into_response();
    }
    let writable = app.registry.writable_store().await;
    crate::metrics::store_writable(writable);
    let mut body = String::from("ready");
    if app.registry.is_offline() {
        body.push_str(" (offline: serving from the store only)");
    }
    if !writable {
        body.push_str(" (store is not writable: serving what it holds)");
    }
    body.push('\n');
    (StatusCode::OK, body).into_response()
}

pub async fn metrics(State(app): State<AppState>, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    if let Err(e) = crate::auth::metrics_gate(app.auth.as_deref(), &parts).await {
        return e.into_response();
    }
    crate::metrics::refresh();
    crate::metrics::ingest_bytes(app.registry.ingest_bytes());
    match &app.metrics {
        Some(h) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], h.render()).into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response(),
    }
}

/// One log line per request, written when the response body has been sent (or given up on):
/// method, path and query, status, body bytes actually sent, time to the response head and to
/// the end, whether the body went out whole, cache outcome.
pub async fn access_log(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let uri = req.uri().clone();
    // The request's span (a child of the client's `traceparent`); none without `[tracing]`.
    let span = crate::telemetry::request_span(&method, uri.path(), req.headers());
    let resp = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    let head = start.elapsed();
    let status = resp.status().as_u16();
    span.record("http.response.status_code", status);
    let route = resp.extensions().get::<RouteKind>().map_or("other", |k| k.0);
    crate::metrics::request(route, &method, status, head);
    let line = AccessLine {
        span,
        start,
        head,
        cache: resp.headers().get(headers::CACHE_OUTCOME).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string(),
        counts_as_served: method == Method::GET && resp.status().is_success(),
        // A HEAD response, or one announced empty, is whole without a body.
        whole_without_body: method == Method::HEAD || resp.body().is_end_stream(),
        announced: resp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok()),
        method,
        uri: redacted_uri(&uri),
        status,
    };
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, Body::new(LoggedBody { inner: body, sent: 0, line: Some(line) }))
}

/// Query parameters whose values never reach the log: these names, and names ending in `_`
/// and one of them (`access_token`, `client_secret`, `refresh_token`), in any case.
const SECRET_PARAMS: [&str; 3] = ["password", "secret", "token"];

/// `uri` as the access log writes it: the value of every secret query parameter
/// ([`SECRET_PARAMS`], its name percent-decoded) replaced with `REDACTED`.
pub fn redacted_uri(uri: &axum::http::Uri) -> String {
    let text = uri.to_string();
    let Some((head, query)) = text.split_once('?') else { return text };
    let secret = |name: &str| {
        let name = name.to_ascii_lowercase();
        SECRET_PARAMS.iter().any(|s| name == *s || name.strip_suffix(s).is_some_and(|p| p.ends_with('_')))
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| {
            let raw_name = pair.split_once('=').map_or(pair, |(n, _)| n);
            let name: String = form_urlencoded::parse(raw_name.as_bytes()).map(|(k, _)| k.into_owned()).collect();
            if secret(&name) {
                format!("{raw_name}=REDACTED")
            } else {
                pair.to_string()
            }
        })
        .collect();
    format!("{head}?{}", pairs.join("&"))
}

/// What the access log says about a request, kept until its body is done.
struct AccessLine {
    /// Ends (and is exported) once the body is done.
    span: tracing::Span,
    start: Instant,
    head: Duration,
    method: Method,
    /// The request URI with secret query parameters' values replaced ([`redacted_uri`]).
    uri: String,
    status: u16,
    cache: String,
    counts_as_served: bool,
    whole_without_body: bool,
    /// The Content-Length announced, if any.
    announced: Option<u64>,
}

impl AccessLine {
    /// `complete`: the body reached its end (false: the client went away or the stream broke).
    fn write(self, sent: u64, complete: bool) {
        self.span.record("stevedore.bytes", sent);
        if self.counts_as_served {
            crate::metrics::served_bytes(sent);
            crate::metrics::served_by_source(&self.cache, sent);
        }
        tracing::info!(
            target: "stevedore::access",
            method = %self.method,
            uri = %self.uri,
            status = self.status,
            bytes = sent,
            ms = self.start.elapsed().as_secs_f64() * 1000.0,
            head_ms = self.head.as_secs_f64() * 1000.0,
            complete,
            cache = %self.cache,
            "request"
        );
    }
}

/// A response body that counts what it yields and writes the access line at its end, on an
/// error, or when dropped before the end.
struct LoggedBody {
    inner: Body,
    sent: u64,
    line: Option<AccessLine>,
}

impl HttpBody for LoggedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                self.sent += frame.data_ref().map_or(0, |d| d.len() as u64);
                if self.inner.is_end_stream() {
                    self.finish(true);
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish(false),
            Poll::Ready(None) => self.finish(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl LoggedBody {
    fn finish(&mut self, complete: bool) {
        if let Some(line) = self.line.take() {
            line.write(self.sent, complete);
        }
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some(line) = self.line.take() {
            // hyper may stop polling once the announced length is out.
            let complete = line.whole_without_body || line.announced == Some(self.sent);
            line.write(self.sent, complete);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_query_values_are_redacted() {
        let r = |u: &str| redacted_uri(&u.parse().unwrap());
        assert_eq!(r("/v2/"), "/v2/");
        assert_eq!(r("/token?service=s&scope=repository:a:pull"), "/token?service=s&scope=repository:a:pull");
        assert_eq!(
            r("/token?username=alice&password=p%26w&Secret=x&token&access_token=t&n=1"),
            "/token?username=alice&password=REDACTED&Secret=REDACTED&token=REDACTED&access_token=REDACTED&n=1"
        );
        assert_eq!(r("/x?pass%77ord=p&tokens=1&mytoken=2"), "/x?pass%77ord=REDACTED&tokens=1&mytoken=2");
        assert_eq!(r("http://h:1/v2/?password=p"), "http://h:1/v2/?password=REDACTED");
    }
}
