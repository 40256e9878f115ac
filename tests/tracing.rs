//! OpenTelemetry traces across tiers: a small OTLP/HTTP receiver in the test (protobuf
//! decoded with `prost` and `opentelemetry-proto`'s types), two Stevedore processes — a site
//! pulling through a regional one, which pulls through CNCF Distribution — and one traced
//! client pull: every span of both processes is in the client's trace, and the regional's
//! request span is a child of the site's upstream request span (`traceparent` propagated).
//! A Stevedore without `[tracing]` exports nothing.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use common::distribution::Distribution;
use common::http::{assert_content, client, read, MANIFEST_ACCEPT};
use common::oci;
use common::stevedore::{config, Dialect, Stevedore};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;

/// One received span: its service, name, ids and string/int attributes.
#[derive(Clone, Debug)]
struct Got {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attrs: BTreeMap<String, String>,
}

type Spans = Arc<Mutex<Vec<Got>>>;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

async fn receive(State(spans): State<Spans>, body: Bytes) -> &'static str {
    let req = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export request");
    let mut got = spans.lock().unwrap();
    for rs in req.resource_spans {
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
            .map(|a| text(&a.value))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                got.push(Got {
                    service: service.clone(),
                    name: s.name.clone(),
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent: hex(&s.parent_span_id),
                    attrs: s.attributes.iter().map(|a| (a.key.clone(), text(&a.value))).collect(),
                });
            }
        }
    }
    ""
}

/// The receiver: `POST /v1/traces` (OTLP/HTTP, protobuf). Returns its base URL.
async fn receiver() -> (String, Spans) {
    let spans: Spans = Arc::default();
    let app = axum::Router::new().route("/v1/traces", axum::routing::post(receive)).with_state(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, spans)
}

/// Waits (bounded) until `done` holds for the spans received so far.
async fn wait_spans(spans: &Spans, limit: Duration, done: impl Fn(&[Got]) -> bool) -> Vec<Got> {
    let start = std::time::Instant::now();
    loop {
        let now = spans.lock().unwrap().clone();
        if done(&now) || start.elapsed() > limit {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pull_through_two_tiers_is_one_trace() {
    let (otlp, spans) = receiver().await;
    let reg = Distribution::start(false);
    let img = oci::make_image(2603, 2, 100_000, "amd64", "linux");
    reg.registry().push_image("team/app", &img, Some("1.0")).await;
    // The batch processor exports every 200 ms (OTEL_BSP_SCHEDULE_DELAY), not every 5 s.
    let regional = Stevedore::builder()
        .config(&format!(
            "{}\n[tracing]\notlp_endpoint = \"{otlp}\"\nservice_name = \"regional\"\n",
            config("upstream.test", &[("upstream.test", &reg.url(), "")])
        ))
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .start();
    let site = Stevedore::builder()
        .config(&format!(
            "{}\n[tracing]\notlp_endpoint = \"{otlp}/v1/traces\"\nservice_name = \"site\"\n",
            config("regional.test", &[("regional.test", &regional.url(""), "")])
        ))
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .start();

    // One pull (manifest, config, layers) by a traced client: one traceparent on each request.
    let http = client();
    let traceparent = format!("00-{TRACE}-{CLIENT_SPAN}-01");
    let url = |rest: &str| site.url(&Dialect::Plain.path("regional.test", "team/app", rest));
    let r = read(http.get(url("manifests/1.0")).header("accept", MANIFEST_ACCEPT).header("traceparent", &traceparent))
        .await;
    assert_content(&r, &img.manifest.digest, &img.manifest.data, "manifest through two tiers");
    for b in img.blobs() {
        let r = read(http.get(url(&format!("blobs/{}", b.digest))).header("traceparent", &traceparent)).await;
        assert_content(&r, &b.digest, &b.data, "blob through two tiers");
    }
    let requests = 1 + img.blobs().len();

    let got = wait_spans(&spans, Duration::from_secs(30), |s| {
        let server = |svc: &str| s.iter().filter(|g| g.service == svc && g.name.starts_with("GET ")).count();
        // Each tier fills each blob once; a fill's span ends after its commit.
        let fills = s.iter().filter(|g| g.name == "fill").count();
        server("site") >= requests && server("regional") >= requests && fills >= 2 * img.blobs().len()
    })
    .await;
    let show = || {
        got.iter()
            .map(|g| format!("{} {} {} {}<-{}", g.service, g.name, g.trace_id, g.span_id, g.parent))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(got.iter().any(|g| g.service == "site"), "no span from the site:\n{}", show());
    assert!(got.iter().any(|g| g.service == "regional"), "no span from the regional:\n{}", show());
    // One trace: every span of both processes is in the client's trace.
    let other: Vec<&Got> = got.iter().filter(|g| g.trace_id != TRACE).collect();
    assert!(other.is_empty(), "spans outside the client's trace: {other:?}\n{}", show());
    // The site's request spans are children of the client's span; the regional's request
    // spans children of the site's upstream request spans.
    let site_requests: Vec<&Got> = got.iter().filter(|g| g.service == "site" && g.name.starts_with("GET ")).collect();
    assert!(site_requests.iter().all(|g| g.parent == CLIENT_SPAN), "{}", show());
    let site_upstream: Vec<&str> = got
        .iter()
        .filter(|g| g.service == "site" && g.name == "upstream request")
        .map(|g| g.span_id.as_str())
        .collect();
    assert!(!site_upstream.is_empty(), "no upstream request span at the site:\n{}", show());
    let regional_requests: Vec<&Got> =
        got.iter().filter(|g| g.service == "regional" && g.name.starts_with("GET ")).collect();
    assert!(
        regional_requests.iter().all(|g| site_upstream.contains(&g.parent.as_str())),
        "a regional request span is not a child of a site upstream request span:\n{}",
        show()
    );
    // The cache outcome and the bytes are attributes of the request spans.
    let manifest_span = site_requests.iter().find(|g| g.name == "GET manifest").expect("the manifest request span");
    assert_eq!(manifest_span.attrs.get("stevedore.cache").map(String::as_str), Some("miss"), "{manifest_span:?}");
    assert_eq!(
        manifest_span.attrs.get("stevedore.bytes").map(String::as_str),
        Some(img.manifest.data.len().to_string().as_str()),
        "{manifest_span:?}"
    );
    assert!(got.iter().any(|g| g.service == "regional" && g.name == "fill"), "no fill span:\n{}", show());
    // Every span of the regional is below one of the site's upstream request spans.
    let ids: std::collections::HashSet<&str> = got.iter().map(|g| g.span_id.as_str()).collect();
    let orphans: Vec<&Got> =
        got.iter().filter(|g| g.parent != CLIENT_SPAN && !ids.contains(g.parent.as_str())).collect();
    assert!(orphans.is_empty(), "spans whose parent was not exported: {orphans:?}\n{}", show());
}

/// An upstream that answers 404 to everything and keeps each request's `traceparent`.
async fn recording_upstream() -> (String, Arc<Mutex<Vec<Option<String>>>>) {
    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().fallback(move |h: axum::http::HeaderMap| {
        let s = s.clone();
        async move {
            s.lock().unwrap().push(h.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_string));
            axum::http::StatusCode::NOT_FOUND
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

/// Without `[tracing] otlp_endpoint` and `OTEL_EXPORTER_OTLP_ENDPOINT` nothing is installed:
/// a client's `traceparent` goes no further. `OTEL_EXPORTER_OTLP_ENDPOINT` alone turns it on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_is_traced_or_propagated() {
    let (otlp, spans) = receiver().await;
    let (up, seen) = recording_upstream().await;
    let traceparent = format!("00-{TRACE}-{CLIENT_SPAN}-01");
    let cfg = config("up.test", &[("up.test", &up, "")]);
    let off = Stevedore::builder().config(&cfg).env("OTEL_BSP_SCHEDULE_DELAY", "200").start();
    let r = client().get(off.url("/v2/a/manifests/1")).header("traceparent", &traceparent).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let sent = seen.lock().unwrap().clone();
    assert!(!sent.is_empty(), "the upstream was not asked");
    assert!(sent.iter().all(Option::is_none), "traceparent sent upstream without tracing: {sent:?}");
    drop(off);

    let on = Stevedore::builder()
        .config(&format!("{cfg}\n[tracing]\nservice_name = \"from-env\"\n"))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .start();
    seen.lock().unwrap().clear();
    let r = client().get(on.url("/v2/a/manifests/2")).header("traceparent", &traceparent).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let sent = seen.lock().unwrap().clone();
    assert!(
        !sent.is_empty() && sent.iter().all(|t| t.as_deref().is_some_and(|t| t.contains(TRACE))),
        "the upstream requests do not carry the client's trace: {sent:?}"
    );
    let got = wait_spans(&spans, Duration::from_secs(30), |s| s.iter().any(|g| g.service == "from-env")).await;
    assert!(got.iter().any(|g| g.service == "from-env"), "OTEL_EXPORTER_OTLP_ENDPOINT did not turn tracing on");
    assert!(got.iter().all(|g| g.service == "from-env" && g.trace_id == TRACE), "{got:?}");
}
