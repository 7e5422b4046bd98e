//! The last stage: metrics and one access-log line per request, from the context.

use routing_rules::CompiledRules;

use crate::ctx::RequestCtx;
use crate::state::Shared;

/// The `tenant` label for a request: a configured tenant, a tenant a rule names,
/// `anonymous` without an API key, `other` for any other key. Labels take only values the
/// operator configured, so a client sending random keys cannot grow `/metrics` without
/// bound.
pub fn tenant_label<'a>(rules: &'a CompiledRules, tenant: Option<&str>) -> &'a str {
    let Some(t) = tenant else {
        return "anonymous";
    };
    if let Some(configured) = rules.tenant(t) {
        return &configured.name;
    }
    rules
        .rules()
        .iter()
        .filter_map(|r| r.when.tenant.as_ref())
        .flatten()
        .find(|named| named.as_str() == t)
        .map_or("other", String::as_str)
}

/// The `model` label for a request: a model the rules declare, else `other` (a model only
/// some worker serves, or none): like tenants, labels take only configured values.
pub fn model_label<'a>(rules: &'a CompiledRules, model: &str) -> &'a str {
    rules.model(model).map_or("other", |m| m.name.as_str())
}

/// Records the request's metrics and writes its access line: one JSON object (with
/// `--log-format json`, the default off a terminal) whose `message` is `request`. Fields:
/// `request_id`, `status`, `model`, `tenant` (the key's derived id, never the key), `rule`,
/// `pool` and `worker` that answered, `attempts`, `resumed` (streams continued on another
/// worker after theirs failed mid-answer), `spilled` (pools moved back for the rule's latency
/// objective), `failures` (`pool/worker:reason`, space
/// separated), `prompt_tokens` and whether `exact`, `completion_tokens`, `ttft_ms`, `ms`,
/// `cost_usd` (every attempt's share), `error`.
///
/// Returns the request's cost in dollars; `trace_id` is the request's trace, when traced.
pub fn record(
    shared: &Shared,
    ctx: &RequestCtx,
    e: Option<&pingora::Error>,
    trace_id: Option<&str>,
) -> f64 {
    let m = &shared.metrics;
    let pool = ctx.pool.as_deref().unwrap_or("none");
    let rule = ctx.decision.as_ref().map(|d| &*d.rule).unwrap_or("none");
    let elapsed = ctx.started.elapsed();
    let features = &ctx.classified.features;
    let mut cost_usd = 0.0;
    if ctx.endpoint.is_some() {
        let rules = shared.rules.load();
        let model = model_label(&rules.rules, ctx.model());
        let context = crate::metrics::Metrics::context_bucket(features.prompt_tokens);
        m.requests
            .with_label_values(&[pool, rule, model, status_label(ctx.status)])
            .inc();
        m.duration
            .with_label_values(&[pool, model, context])
            .observe(elapsed.as_secs_f64());
        if let Some(ttft) = ctx.ttft {
            m.ttft
                .with_label_values(&[pool, model, context])
                .observe(ttft.as_secs_f64());
        }
        if ctx.pool.is_some() {
            m.prompt_tokens
                .with_label_values(&[pool, model])
                .inc_by(features.prompt_tokens);
            if let Some(n) = ctx.completion_tokens {
                m.completion_tokens
                    .with_label_values(&[pool, model])
                    .inc_by(n);
            }
        }
        // Every attempt's pool is charged its share of the worker's time, failed attempts
        // included: the worker spent it.
        let tenant = tenant_label(&rules.rules, features.tenant.as_deref());
        if ctx.decision.is_some() {
            shared.drift.record(tenant, model, features);
        }
        let price = |p: &str| rules.rules.pool(p).map(|p| p.cost_per_hour);
        if ctx.pool.is_some() || !ctx.worker_seconds.is_empty() {
            shared.ledger.record(
                crate::cost::minute_now(),
                &crate::cost::Charge {
                    tenant,
                    model,
                    answered_by: ctx.pool.as_deref(),
                    prompt_tokens: features.prompt_tokens,
                    completion_tokens: ctx.completion_tokens.unwrap_or(0),
                    attempts: &ctx.worker_seconds,
                },
                price,
            );
        }
        if !ctx.worker_seconds.is_empty() {
            for (p, secs) in &ctx.worker_seconds {
                if let Some(price) = price(p) {
                    let usd = crate::cost::worker_cost(price, *secs);
                    cost_usd += usd;
                    m.cost.with_label_values(&[p, tenant, model]).inc_by(usd);
                }
            }
            // a configured tenant's daily budget is charged what this request cost
            if ctx.admitted.is_some() {
                shared.limiters.charge(tenant, cost_usd);
            }
        }
        // and its breaker counts the answer
        if let Some(a) = &ctx.admitted {
            a.answered(ctx.status);
        }
    }
    let worker = ctx.worker.as_deref();
    tracing::info!(
        request_id = ctx.request_id,
        status = ctx.status,
        model = crate::error::echo(ctx.model()),
        tenant = features.tenant.as_deref(),
        rule,
        pool,
        worker,
        attempts = ctx.attempts,
        resumed = ctx.resumed,
        spilled = %Spilled(&ctx.spilled),
        failures = %Failures(&ctx.failures),
        prompt_tokens = features.prompt_tokens,
        exact = ctx.classified.exact,
        completion_tokens = ctx.completion_tokens,
        ttft_ms = ctx.ttft.map(|t| t.as_secs_f64() * 1000.0),
        ms = elapsed.as_secs_f64() * 1000.0,
        cost_usd,
        error = e.map(tracing::field::display),
        trace_id,
        "request"
    );
    cost_usd
}

/// The status as a label value, formatted once per process, not per request.
fn status_label(status: u16) -> &'static str {
    static LABELS: std::sync::LazyLock<Vec<String>> =
        std::sync::LazyLock::new(|| (0..600).map(|s: u16| s.to_string()).collect());
    LABELS
        .get(usize::from(status))
        .map_or("other", String::as_str)
}

/// The pools a request's route moved back for its latency objective, space separated.
struct Spilled<'a>(&'a [std::sync::Arc<str>]);

impl std::fmt::Display for Spilled<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(p)?;
        }
        Ok(())
    }
}

/// A request's failed attempts, `pool/worker:reason` space separated, formatted only when
/// the line is written.
struct Failures<'a>(&'a [(std::sync::Arc<str>, String, &'static str)]);

impl std::fmt::Display for Failures<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (pool, worker, reason)) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{pool}/{worker}:{reason}")?;
        }
        Ok(())
    }
}
