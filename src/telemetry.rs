//! OpenTelemetry traces (issue 26): spans exported over OTLP HTTP/protobuf when
//! `[tracing] otlp_endpoint` (or else `OTEL_EXPORTER_OTLP_ENDPOINT`) is set; W3C
//! `traceparent` accepted from clients and sent on upstream requests, so a pull through
//! site → regional → upstream is one trace.
//!
//! Without an endpoint nothing is installed: no OpenTelemetry layer in the subscriber, and
//! [`enabled`] is false so the request, auth, store, fill and upstream spans are not even
//! created ([`span`] gives `Span::none()`). Depends on nothing of the crate but the config.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::TracingConfig;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// The target of the exported spans (enabled at INFO whatever `RUST_LOG` says).
pub const TARGET: &str = "stevedore::trace";

/// Whether spans are exported (an OpenTelemetry layer is installed).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The OTLP traces URL: `[tracing] otlp_endpoint`, else `OTEL_EXPORTER_OTLP_ENDPOINT`; with
/// `/v1/traces` appended unless the path already ends so.
pub fn endpoint(cfg: &TracingConfig) -> Option<String> {
    let base = cfg
        .otlp_endpoint
        .clone()
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())?;
    Some(if base.trim_end_matches('/').ends_with("/v1/traces") {
        base
    } else {
        format!("{}/v1/traces", base.trim_end_matches('/'))
    })
}

/// Exports on drop what is still buffered (at shutdown).
pub struct Guard(SdkTracerProvider);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = self.0.shutdown() {
            eprintln!("stevedore: flushing the last spans: {e}");
        }
    }
}

/// The subscriber layer exporting spans to `endpoint`, and the guard that flushes them. Must
/// be called within a Tokio runtime (the exporter's batches are sent from a task of it).
pub fn layer<S>(endpoint: &str, cfg: &TracingConfig) -> anyhow::Result<(impl tracing_subscriber::Layer<S>, Guard)>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| anyhow::anyhow!("tracing: HTTP client: {e}"))?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(http)
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| anyhow::anyhow!("tracing: OTLP exporter for {endpoint}: {e}"))?;
    let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
        exporter,
        opentelemetry_sdk::runtime::Tokio,
    )
    .build();
    let name = cfg.service_name.clone().unwrap_or_else(|| "stevedore".to_string());
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(name).build())
        .build();
    let tracer = provider.tracer("stevedore");
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    ENABLED.store(true, Ordering::Relaxed);
    Ok((tracing_opentelemetry::layer().with_tracer(tracer), Guard(provider)))
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (http::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(&value)) {
            self.0.insert(k, v);
        }
    }
}

/// The span of one request, a child of the client's `traceparent` when it sent one;
/// `Span::none()` when tracing is off.
pub fn request_span(method: &http::Method, path: &str, headers: &http::HeaderMap) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        "request",
        otel.name = %format!("{method} {}", route_of(path)),
        otel.kind = "server",
        http.request.method = %method,
        url.path = %path,
        http.response.status_code = tracing::field::Empty,
        stevedore.cache = tracing::field::Empty,
        stevedore.bytes = tracing::field::Empty,
    );
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let _ = span.set_parent(parent);
    span
}

/// A low-cardinality span name for a path: the endpoint kind, not the repository.
fn route_of(path: &str) -> &'static str {
    if !path.starts_with("/v2") {
        return "other";
    }
    if path.contains("/blobs/uploads") {
        "upload"
    } else if path.contains("/blobs/") {
        "blob"
    } else if path.contains("/manifests/") {
        "manifest"
    } else if path.ends_with("/tags/list") {
        "tags"
    } else {
        "v2"
    }
}

/// A span named `name` (an `internal` step: auth, store read, fill), or `Span::none()` when
/// tracing is off.
#[macro_export]
macro_rules! trace_span {
    ($name:literal $(, $($field:tt)*)?) => {
        if $crate::telemetry::enabled() {
            tracing::info_span!(target: $crate::telemetry::TARGET, $name $(, $($field)*)?)
        } else {
            tracing::Span::none()
        }
    };
}

/// Adds the current span's context as `traceparent` to an outgoing request's headers.
pub fn inject(headers: &mut http::HeaderMap) {
    if !enabled() {
        return;
    }
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}
