//! Traces across the router–worker hop, the OpenTelemetry way: OTLP export configured by
//! OpenTelemetry's own environment variables, and W3C trace context (`traceparent`) read
//! from a request and written for the next hop. Router and worker share it, so both ends
//! of the hop agree on what a trace is.
//!
//! Tracing is off unless an OTLP endpoint is given (the `--otlp-endpoint` flag, or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), and stays off
//! with `OTEL_SDK_DISABLED=true`. Spans go out over OTLP/HTTP (protobuf) in batches from
//! the SDK's own thread (`OTEL_BSP_*` tune it), never from the event loop. Sampling follows
//! `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (default: the caller's decision when
//! it sent a `traceparent`, else every request); `service.name` is `OTEL_SERVICE_NAME`,
//! else the program's own name.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

pub use opentelemetry::Context;

/// A process's tracer; spans still queued are sent by [`Otel::shutdown`].
pub struct Otel {
    provider: SdkTracerProvider,
    pub tracer: SdkTracer,
}

impl Otel {
    /// The tracer when tracing is on (see the module docs); `endpoint` is the flag's base
    /// URL (`/v1/traces` is added, as for `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub fn from_env(service: &'static str, endpoint: Option<&str>) -> Result<Option<Otel>, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let endpoint = endpoint.filter(|e| !e.trim().is_empty());
        if endpoint.is_none()
            && var("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
            && var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
        {
            return Ok(None);
        }
        use opentelemetry_otlp::WithExportConfig;
        let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_http();
        if let Some(base) = endpoint {
            exporter = exporter.with_endpoint(format!("{}/v1/traces", base.trim_end_matches('/')));
        }
        let exporter = exporter
            .build()
            .map_err(|e| format!("the OTLP exporter: {e}"))?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        if var("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(service);
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        let tracer = provider.tracer(service);
        Ok(Some(Otel { provider, tracer }))
    }

    /// Sends the spans still queued (bounded by the SDK's export timeout).
    pub fn shutdown(&self) {
        let _ = self.provider.shutdown();
    }
}

/// The trace context a request's `traceparent` / `tracestate` headers carry: the parent of
/// the request's span. Empty (the request starts a trace) when absent or malformed.
pub fn extract(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers))
}

/// The wall-clock time of an instant (earlier or now): spans are stamped from the
/// monotonic instants the code measures with.
pub fn wall(at: std::time::Instant) -> std::time::SystemTime {
    let now = std::time::SystemTime::now();
    now.checked_sub(at.elapsed()).unwrap_or(now)
}

/// The `traceparent` header value naming `span` as the next hop's parent.
pub fn traceparent(span: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        span.trace_id(),
        span.span_id(),
        span.trace_flags().to_u8()
    )
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TraceContextExt;

    #[test]
    fn trace_context_round_trips_and_bad_headers_start_a_new_trace() {
        let mut h = http::HeaderMap::new();
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        h.insert("traceparent", tp.parse().unwrap_or_else(|_| unreachable!()));
        let cx = super::extract(&h);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(super::traceparent(&sc), tp);
        for bad in [
            "",
            "00-zz-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        ] {
            h.insert(
                "traceparent",
                bad.parse().unwrap_or_else(|_| unreachable!()),
            );
            assert!(
                !super::extract(&h).span().span_context().is_valid(),
                "{bad:?}"
            );
        }
    }
}
