//! Span export over OTLP, on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set and `OTEL_SDK_DISABLED` is not `true`. The
//! exporter reads the usual variables itself (`OTEL_EXPORTER_OTLP_HEADERS`, `..._TIMEOUT`,
//! `OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf` (default) or `http/json`), the resource
//! reads `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`, and the sampler
//! `OTEL_TRACES_SAMPLER`. Spans leave in batches from a background task; [`shutdown`] sends
//! what is left.
//!
//! Also the bridge between tracing's spans and a job's [`TraceContext`]: the current span's
//! context for a message being published ([`current`]), and a message's context as the
//! parent of the handler's span ([`set_parent`]).

use std::sync::OnceLock;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing::Subscriber;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt as _};
use tracing_subscriber::registry::LookupSpan;

use crate::trace::TraceContext;

/// The provider, kept to flush it at exit.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether the environment asks for export.
fn wanted() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The layer that turns tracing's spans into exported ones, or `None` when export is off or
/// the exporter cannot be built (said on stderr: logging is not up yet).
pub(crate) fn layer<S>(service: &str) -> Option<OpenTelemetryLayer<S, SdkTracer>>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    if !wanted() {
        return None;
    }
    let protocol = match std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .as_deref()
    {
        Ok("http/json") => Protocol::HttpJson,
        _ => Protocol::HttpBinary,
    };
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("apiary: OpenTelemetry export is off: {e}");
            return None;
        }
    };
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_string());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("apiary");
    let _ = PROVIDER.set(provider);
    Some(tracing_opentelemetry::layer().with_tracer(tracer))
}

/// Sends the spans still buffered and stops the exporter. Call once, before exit.
pub fn shutdown() {
    if let Some(Err(e)) = PROVIDER.get().map(SdkTracerProvider::shutdown) {
        tracing::warn!(error = %e, "OpenTelemetry: could not flush the last spans");
    }
}

/// The current span's context, for a message published inside it: `None` when no exported
/// span is current.
pub fn current() -> Option<TraceContext> {
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return None;
    }
    let traceparent = format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    );
    let state = sc.trace_state().header();
    TraceContext::parse(&traceparent, Some(&state))
}

/// Makes `parent` (a message's context) the parent of `span`, so the handler's span joins
/// the producer's trace.
pub fn set_parent(span: &tracing::Span, parent: &TraceContext) {
    let p = &parent.traceparent;
    let (Ok(trace_id), Ok(span_id), Ok(flags)) = (
        TraceId::from_hex(&p[3..35]),
        SpanId::from_hex(&p[36..52]),
        u8::from_str_radix(&p[53..55], 16),
    ) else {
        return;
    };
    let state = parent
        .tracestate
        .as_deref()
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let sc = SpanContext::new(trace_id, span_id, TraceFlags::new(flags), true, state);
    let cx = opentelemetry::Context::new().with_remote_span_context(sc);
    let _ = span.set_parent(cx);
}
