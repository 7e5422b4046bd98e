//! The worker's part of a request's trace (OpenTelemetry over OTLP when configured: see
//! [`proto::otel`]). The router's attempt span is the parent (its `traceparent`); under it:
//!
//! ```text
//! POST /v1/chat/completions   (model, prompt and completion tokens, finish reason)
//! ├── tokenize
//! ├── queue                    waiting for a batch slot
//! ├── prefill                  taken into a batch → first token
//! └── decode                   first token → last
//! ```
//!
//! The engine stamps each phase's start ([`crate::engine::Timing`]); the spans are written
//! when the answer ends, from those stamps, so the engine's loop does no tracing work.

use std::time::Instant;

use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::SdkTracer;
use proto::otel::{Otel, wall};

use crate::engine::Usage;

pub struct WorkerTrace {
    tracer: SdkTracer,
    cx: Context,
}

impl WorkerTrace {
    /// Starts the request's span under the caller's `traceparent`.
    pub fn start(
        otel: &Otel,
        headers: &axum::http::HeaderMap,
        name: &'static str,
        model: &str,
    ) -> Self {
        let parent = proto::otel::extract(headers);
        let span = otel
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_attributes([KeyValue::new("gen_ai.request.model", model.to_string())])
            .start_with_context(&otel.tracer, &parent);
        Self {
            tracer: otel.tracer.clone(),
            cx: parent.with_span(span),
        }
    }

    /// Adds an attribute to the request's span.
    pub fn attribute(&self, kv: KeyValue) {
        self.cx.span().set_attribute(kv);
    }

    /// A finished phase, `from` → `to`.
    pub fn stage(&self, name: &'static str, from: Instant, to: Instant, attributes: Vec<KeyValue>) {
        let mut span = self
            .tracer
            .span_builder(name)
            .with_start_time(wall(from))
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &self.cx);
        span.end_with_timestamp(wall(to));
    }

    /// Ends the request: its engine phases from `usage`'s stamps, then its own span.
    pub fn finish(self, usage: Option<&Usage>, error: Option<&str>) {
        let now = Instant::now();
        let span = self.cx.span();
        if let Some(u) = usage {
            let t = &u.timing;
            if let (Some(q), Some(a)) = (t.queued, t.admitted) {
                self.stage("queue", q, a, Vec::new());
            }
            if let Some(a) = t.admitted {
                self.stage("prefill", a, t.first_token.unwrap_or(now), Vec::new());
            }
            if let Some(f) = t.first_token {
                let n = i64::try_from(u.completion_tokens).unwrap_or(i64::MAX);
                self.stage(
                    "decode",
                    f,
                    now,
                    vec![KeyValue::new("gen_ai.usage.output_tokens", n)],
                );
            }
            let int = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
            span.set_attributes([
                KeyValue::new("gen_ai.usage.input_tokens", int(u.prompt_tokens)),
                KeyValue::new("gen_ai.usage.output_tokens", int(u.completion_tokens)),
                KeyValue::new(
                    "gen_ai.response.finish_reasons",
                    if u.finish_length { "length" } else { "stop" },
                ),
            ]);
        }
        if let Some(e) = error {
            span.set_status(Status::error(e.to_string()));
        }
        span.end();
    }
}
