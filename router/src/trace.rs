//! A request's trace (OpenTelemetry, exported over OTLP when configured: see
//! [`proto::otel`]). One server span per request, with a child span per stage as it
//! happens:
//!
//! ```text
//! POST /v1/chat/completions            (request id, model, tenant, rule, pool, tokens, cost)
//! ├── classify                          (prompt tokens, exact or bound)
//! ├── route                             (rule, target pools)
//! ├── attempt l40s-spot                 (worker; failed: preempted)
//! ├── attempt l40s-ondemand             (worker; ok)  ← the worker's spans continue here
//! └── relay                             (first byte → last byte, completion tokens)
//! ```
//!
//! Each attempt sends the worker a `traceparent` naming the attempt's span, so the worker's
//! own spans (queue, prefill, decode) sit under the attempt that reached it. With tracing
//! off, a request carries no trace (`RequestCtx::trace` is `None`) and costs nothing here;
//! the client's `traceparent` is then passed on unchanged.

use std::time::Instant;

use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, Span};
use proto::otel::{Otel, wall};

pub struct RequestTrace {
    tracer: SdkTracer,
    /// The caller's context with the request's span in it: every stage's parent.
    cx: Context,
    /// The attempt in progress, and when the winning attempt's answer began.
    attempt: Option<Span>,
    relay_from: Option<Instant>,
}

impl RequestTrace {
    /// Starts the request's span, under the caller's `traceparent` when it sent one.
    pub fn start(otel: &Otel, headers: &http::HeaderMap, method: &str, path: &str) -> Self {
        let parent = proto::otel::extract(headers);
        let span = otel
            .tracer
            .span_builder(format!("{method} {path}"))
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", method.to_string()),
                KeyValue::new("url.path", path.to_string()),
            ])
            .start_with_context(&otel.tracer, &parent);
        Self {
            tracer: otel.tracer.clone(),
            cx: parent.with_span(span),
            attempt: None,
            relay_from: None,
        }
    }

    /// Whether this request's trace is sampled (else its spans are dropped at once).
    pub fn sampled(&self) -> bool {
        self.cx.span().span_context().is_sampled()
    }

    /// A stage that began at `started` and ends now.
    pub fn stage(&self, name: &'static str, started: Instant, attributes: Vec<KeyValue>) {
        let mut span = self
            .tracer
            .span_builder(name)
            .with_start_time(wall(started))
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &self.cx);
        span.end();
    }

    /// Starts an attempt's span; the `traceparent` to send the worker.
    pub fn start_attempt(&mut self, pool: &str, worker: &str, n: u32) -> String {
        self.end_attempt(Some("abandoned"));
        let span = self
            .tracer
            .span_builder(format!("attempt {pool}"))
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("switchyard.pool", pool.to_string()),
                KeyValue::new("switchyard.worker", worker.to_string()),
                KeyValue::new("switchyard.attempt", i64::from(n)),
            ])
            .start_with_context(&self.tracer, &self.cx);
        let traceparent = proto::otel::traceparent(span.span_context());
        self.attempt = Some(span);
        traceparent
    }

    /// Ends the attempt in progress: `Some(reason)` when it failed (and will be retried or
    /// reported), `None` when the worker answered.
    pub fn end_attempt(&mut self, failed: Option<&'static str>) {
        if let Some(mut span) = self.attempt.take() {
            match failed {
                Some(reason) => {
                    span.set_attribute(KeyValue::new("switchyard.outcome", reason));
                    span.set_status(Status::error(reason));
                }
                None => span.set_attribute(KeyValue::new("switchyard.outcome", "ok")),
            }
            span.end();
        }
    }

    /// The winning attempt's answer begins: its attempt span ends, the relay's begins.
    pub fn answered(&mut self) {
        self.end_attempt(None);
        self.relay_from = Some(Instant::now());
    }

    /// The answer has been relayed (or cut): the relay stage ends.
    pub fn relayed(&mut self, completion_tokens: Option<u64>) {
        if let Some(from) = self.relay_from.take() {
            let tokens = completion_tokens.map(|n| {
                KeyValue::new(
                    "gen_ai.usage.output_tokens",
                    i64::try_from(n).unwrap_or(i64::MAX),
                )
            });
            self.stage("relay", from, tokens.into_iter().collect());
        }
    }

    /// The trace's id, for the access line (a trace is found from its request's log).
    pub fn trace_id(&self) -> String {
        self.cx.span().span_context().trace_id().to_string()
    }

    /// Ends the request's span (and an attempt still open, which the request abandoned).
    pub fn finish(mut self, attributes: Vec<KeyValue>, status: u16, error: Option<String>) {
        self.end_attempt(Some("abandoned"));
        let span = self.cx.span();
        span.set_attributes(attributes);
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if status >= 500 || error.is_some() {
            span.set_status(Status::error(error.unwrap_or_default()));
        }
        span.end();
    }
}

/// Ends `trace` with what the request came to: the same facts as its access line.
pub fn finish(
    trace: RequestTrace,
    shared: &crate::state::Shared,
    ctx: &crate::ctx::RequestCtx,
    cost_usd: f64,
    e: Option<&pingora::Error>,
) {
    let features = &ctx.classified.features;
    let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let mut attributes = vec![
        KeyValue::new("switchyard.request_id", ctx.request_id.clone()),
        KeyValue::new("switchyard.attempts", i64::from(ctx.attempts)),
        KeyValue::new("switchyard.cost_usd", cost_usd),
        KeyValue::new("switchyard.router", shared.hop_id.clone()),
    ];
    if !ctx.model().is_empty() {
        attributes.push(KeyValue::new(
            "gen_ai.request.model",
            crate::error::echo(ctx.model()),
        ));
        attributes.push(KeyValue::new(
            "gen_ai.usage.input_tokens",
            int(features.prompt_tokens),
        ));
    }
    if let Some(t) = &features.tenant {
        attributes.push(KeyValue::new("switchyard.tenant", t.clone()));
    }
    if let Some(d) = &ctx.decision {
        attributes.push(KeyValue::new("switchyard.rule", d.rule.to_string()));
    }
    if let Some(p) = &ctx.pool {
        attributes.push(KeyValue::new("switchyard.pool", p.to_string()));
    }
    if let Some(n) = ctx.completion_tokens {
        attributes.push(KeyValue::new("gen_ai.usage.output_tokens", int(n)));
    }
    if let Some(t) = ctx.ttft {
        attributes.push(KeyValue::new(
            "switchyard.ttft_ms",
            t.as_secs_f64() * 1000.0,
        ));
    }
    trace.finish(attributes, ctx.status, e.map(|e| e.to_string()));
}
