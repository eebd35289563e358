//! OpenTelemetry traces over OTLP: the tracer behind the `tracing` spans of a delivery, its
//! dedup steps, its API calls and its event publish, configured the way every OpenTelemetry
//! SDK is, by the standard `OTEL_*` variables.
//!
//! Invariants:
//! - off unless `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set
//!   (and neither `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none`); when off, no span
//!   beyond the delivery's (which the logs need) is created, so it costs nothing;
//! - an exporter that is down or slow never slows the worker: spans are exported by the
//!   SDK's batch processor on its own thread, and a span that finds [`QUEUE`] spans waiting
//!   is dropped and counted (`provisioner_trace_spans_dropped_total{reason="queue_full"}`),
//!   as is every span of a batch the exporter could not deliver (`reason="export_failed"`);
//! - the protocol (`OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf`, the default, or `grpc`),
//!   sampler (`OTEL_TRACES_SAMPLER[_ARG]`), resource (`OTEL_SERVICE_NAME`,
//!   `OTEL_RESOURCE_ATTRIBUTES`), timeouts and headers are read by the SDK itself; what
//!   it would take silently (an unknown protocol or sampler, a ratio that is not one,
//!   compression this build lacks) stops start-up, naming the variable.

use std::fmt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, Span, SpanData, SpanExporter,
    SpanProcessor, Tracer,
};

/// Spans waiting for export at most: past this a span is dropped (and counted), so memory
/// stays bounded whatever the exporter does. The SDK's own queue is as large, so it never
/// drops one itself (unseen by the metric).
pub const QUEUE: usize = 2048;

static ON: AtomicBool = AtomicBool::new(false);
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();
static DROPPED_QUEUE_FULL: AtomicU64 = AtomicU64::new(0);
static DROPPED_EXPORT_FAILED: AtomicU64 = AtomicU64::new(0);
/// Spans handed to the batch processor and not yet through an export.
static PENDING: AtomicUsize = AtomicUsize::new(0);

/// Whether traces are exported: the spans only traces need are created only then.
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Spans lost so far: (the queue was full, the export failed).
pub fn spans_dropped() -> (u64, u64) {
    (
        DROPPED_QUEUE_FULL.load(Ordering::Relaxed),
        DROPPED_EXPORT_FAILED.load(Ordering::Relaxed),
    )
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Whether the environment asks for trace export.
pub fn wanted() -> bool {
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let exporter_none =
        env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
    let endpoint = env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some();
    endpoint && !disabled && !exporter_none
}

/// What the SDK would take silently, checked first: each wrong value is an error naming
/// its variable (and never quoting an endpoint, which may hold credentials).
fn check_env() -> Result<(), String> {
    for var in [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ] {
        if let Some(url) = env(var) {
            let usable = reqwest::Url::parse(url.trim())
                .ok()
                .is_some_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
            if !usable {
                return Err(format!("{var}: not an http(s) URL"));
            }
        }
    }
    for var in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(p) = env(var)
            && !matches!(
                p.trim().to_ascii_lowercase().as_str(),
                "grpc" | "http/protobuf"
            )
        {
            return Err(format!("{var}: {p:?} is not grpc or http/protobuf"));
        }
    }
    for var in [
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
        "OTEL_EXPORTER_OTLP_COMPRESSION",
    ] {
        if let Some(c) = env(var).filter(|c| !c.trim().eq_ignore_ascii_case("none")) {
            return Err(format!(
                "{var}: {c:?}: this build sends traces uncompressed (none)"
            ));
        }
    }
    const SAMPLERS: [&str; 6] = [
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    ];
    if let Some(sampler) = env("OTEL_TRACES_SAMPLER") {
        let sampler = sampler.trim().to_ascii_lowercase();
        if !SAMPLERS.contains(&sampler.as_str()) {
            return Err(format!(
                "OTEL_TRACES_SAMPLER: {sampler:?} is not one of {}",
                SAMPLERS.join(", ")
            ));
        }
        if sampler.ends_with("traceidratio") {
            let ratio = env("OTEL_TRACES_SAMPLER_ARG").and_then(|a| a.trim().parse::<f64>().ok());
            if !ratio.is_some_and(|r| (0.0..=1.0).contains(&r)) {
                return Err("OTEL_TRACES_SAMPLER_ARG: a ratio from 0 to 1 is needed".to_owned());
            }
        }
    }
    if env("OTEL_BSP_SCHEDULE_DELAY").is_some_and(|d| d.trim() == "0") {
        return Err("OTEL_BSP_SCHEDULE_DELAY: 0 would export in a busy loop".to_owned());
    }
    Ok(())
}

/// Where traces go, for the start-up line: scheme, host and port only.
pub fn describe() -> String {
    let endpoint = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .and_then(|e| reqwest::Url::parse(e.trim()).ok())
        .map(|u| {
            format!(
                "{}://{}:{}",
                u.scheme(),
                u.host_str().unwrap_or_default(),
                u.port_or_known_default().unwrap_or_default()
            )
        })
        .unwrap_or_default();
    let protocol = env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| "http/protobuf".to_owned());
    let sampler = env("OTEL_TRACES_SAMPLER").unwrap_or_else(|| "parentbased_always_on".to_owned());
    format!("{endpoint} ({protocol}, sampler {sampler})")
}

/// The tracer for the `tracing` layer when the environment asks for export; `Err` with
/// why when it asks but a variable is wrong or the exporter cannot be built.
/// Must run inside the Tokio runtime (the gRPC client lives on it).
pub fn init() -> Result<Option<Tracer>, String> {
    if !wanted() {
        return Ok(None);
    }
    check_env()?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .build()
        // The exporter's own words may quote the endpoint: only the variable is named.
        .map_err(|_| {
            "OTEL_EXPORTER_OTLP_ENDPOINT: the OTLP trace exporter cannot be built for it".to_owned()
        })?;
    let batch = BatchSpanProcessor::builder(Counted(exporter))
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(QUEUE)
                .build(),
        )
        .build();
    let mut resource = Resource::builder();
    // OTEL_SERVICE_NAME and a service.name in OTEL_RESOURCE_ATTRIBUTES win (the SDK reads
    // them); otherwise the SDK would say "unknown_service".
    let named = env("OTEL_SERVICE_NAME").is_some()
        || env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
    if !named {
        resource = resource.with_service_name("group-provisioner");
    }
    resource = resource.with_attribute(KeyValue::new("service.version", crate::VERSION));
    if crate::COMMIT != "unknown" {
        resource = resource.with_attribute(KeyValue::new("vcs.ref.head.revision", crate::COMMIT));
    }
    let provider = SdkTracerProvider::builder()
        .with_span_processor(Bounded(batch))
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("group-provisioner");
    let _ = PROVIDER.set(provider);
    ON.store(true, Ordering::Relaxed);
    Ok(Some(tracer))
}

/// Export what is queued, waiting at most `timeout`: at exit, after the last delivery.
pub fn shutdown(timeout: Duration) {
    if let Some(provider) = PROVIDER.get() {
        let _ = provider.shutdown_with_timeout(timeout);
    }
}

/// The W3C `traceparent` of the current `tracing` span, when it is an exported trace's.
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// The W3C `traceparent` naming `span`, when it is an exported trace's.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if !enabled() || span.is_none() {
        return None;
    }
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let cx = span.context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// The client span of one HTTP request (HTTP client conventions), a child of the current
/// span; none when traces are not exported or there is no current span (a child made a
/// root would start a trace of its own, and its `traceparent` would name the wrong one). Its `traceparent` goes out with the request.
pub fn http_client_span(method: &str, url: &reqwest::Url) -> tracing::Span {
    if !enabled() || tracing::Span::current().is_none() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "http request",
        otel.name = format!("{method} {}", url.path()),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        http.request.method = method,
        server.address = url.host_str(),
        server.port = url.port_or_known_default(),
        url.full = url.as_str(),
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    )
}

/// What an HTTP request came to: its status, or `error` (a transport failure: no status).
pub fn record_http_result(span: &tracing::Span, status: Option<u16>) {
    if span.is_none() {
        return;
    }
    match status {
        Some(code) => {
            span.record("http.response.status_code", code);
            if code >= 400 {
                span.record("error.type", code.to_string());
                span.record("otel.status_code", "error");
            }
        }
        None => {
            span.record("error.type", "transport");
            span.record("otel.status_code", "error");
        }
    }
}

/// The producer span of one event publish (messaging conventions), a child of the current
/// span; none when traces are not exported. Its `traceparent` goes out in the event.
pub fn publish_span(exchange: &str, routing_key: &str) -> tracing::Span {
    if !enabled() || tracing::Span::current().is_none() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "publish",
        otel.name = format!("publish {exchange}"),
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        messaging.system = "rabbitmq",
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = exchange,
        messaging.rabbitmq.destination.routing_key = routing_key,
        error.type = tracing::field::Empty,
    )
}

/// The client span of one dedup step against Redis (its script runs as one `EVALSHA`),
/// none when traces are not exported.
fn db_span(name: &'static str) -> tracing::Span {
    if !enabled() || tracing::Span::current().is_none() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "redis",
        otel.name = name,
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        db.system.name = "redis",
        db.operation.name = "EVALSHA",
        error.type = tracing::field::Empty,
    )
}

/// Run one dedup step in its span; a step that failed (Redis did not answer, or answered
/// what the store refuses) says so there.
pub async fn db_step<T, E>(
    name: &'static str,
    step: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let span = db_span(name);
    let result = tracing::Instrument::instrument(step, span.clone()).await;
    if result.is_err() && !span.is_none() {
        span.record("error.type", "redis");
        span.record("otel.status_code", "error");
    }
    result
}

/// Make `span` the child of the trace a command's `traceparent` names (when traces are
/// exported and the header is valid); otherwise it starts a trace of its own.
pub fn set_remote_parent(span: &tracing::Span, traceparent: Option<&str>) {
    if !enabled() {
        return;
    }
    let Some(tp) = traceparent else { return };
    use opentelemetry::propagation::TextMapPropagator as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let carrier = std::collections::HashMap::from([("traceparent".to_owned(), tp.to_owned())]);
    let cx = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The batch processor behind a bound on the spans waiting, counting what it turns away.
#[derive(Debug)]
struct Bounded(BatchSpanProcessor);

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.0.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if PENDING.fetch_add(1, Ordering::AcqRel) >= QUEUE {
            PENDING.fetch_sub(1, Ordering::AcqRel);
            DROPPED_QUEUE_FULL.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.0.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }
}

/// The OTLP exporter, releasing each batch from [`PENDING`] and counting failed ones.
struct Counted<E>(E);

impl<E> fmt::Debug for Counted<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Counted")
    }
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let result = self.0.export(batch).await;
        let _ = PENDING.fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
            Some(p.saturating_sub(n))
        });
        if let Err(e) = &result {
            let failed = DROPPED_EXPORT_FAILED.fetch_add(n as u64, Ordering::Relaxed);
            // Said once, then again every 10,000 spans lost: enough to see why.
            if failed == 0 || failed / 10_000 != (failed + n as u64) / 10_000 {
                tracing::warn!(
                    error = %e,
                    spans_lost = failed + n as u64,
                    "trace export failed; spans are dropped (provisioner_trace_spans_dropped_total)"
                );
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }
}
