//! `[tracing]`: spans exported over OTLP HTTP/protobuf.

use serde::Deserialize;

/// `[tracing]`: spans exported over OTLP HTTP/protobuf. `otlp_endpoint` (e.g.
/// `http://collector:4318`, `/v1/traces` appended unless the path already ends so) wins over
/// the standard `OTEL_EXPORTER_OTLP_ENDPOINT`; with neither, no OpenTelemetry layer exists.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans (default `stevedore`).
    pub service_name: Option<String>,
}
