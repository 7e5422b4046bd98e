//! The last stage: metrics and one access-log line per request, from the context.

use routing_rules::CompiledRules;

use crate::ctx::RequestCtx;
use crate::state::Shared;

/// The `tenant` label for a request: a tenant the rules name, `anonymous` without an API
/// key, `other` for any other key. Labels take only values the operator configured, so
/// a client sending random keys cannot grow `/metrics` without bound.
pub fn tenant_label<'a>(rules: &'a CompiledRules, tenant: Option<&str>) -> &'a str {
    let Some(t) = tenant else {
        return "anonymous";
    };
    rules
        .rules()
        .iter()
        .filter_map(|r| r.when.tenant.as_ref())
        .flatten()
        .find(|named| named.as_str() == t)
        .map_or("other", String::as_str)
}

pub fn record(shared: &Shared, ctx: &RequestCtx, e: Option<&pingora::Error>) {
    let m = &shared.metrics;
    let pool = ctx.pool.as_deref().unwrap_or("none");
    let rule = ctx.decision.as_ref().map(|d| &*d.rule).unwrap_or("none");
    let elapsed = ctx.started.elapsed();
    let features = &ctx.classified.features;
    if ctx.endpoint.is_some() {
        m.requests
            .with_label_values(&[pool, rule, &ctx.status.to_string()])
            .inc();
        m.duration
            .with_label_values(&[pool])
            .observe(elapsed.as_secs_f64());
        if ctx.pool.is_some() {
            m.prompt_tokens
                .with_label_values(&[pool])
                .inc_by(features.prompt_tokens);
            if let Some(n) = ctx.completion_tokens {
                m.completion_tokens.with_label_values(&[pool]).inc_by(n);
            }
        }
        // Every attempt's pool is charged its share of the worker's time, failed attempts
        // included: the worker spent it.
        if !ctx.worker_seconds.is_empty() {
            let rules = shared.rules.load();
            let tenant = tenant_label(&rules.rules, features.tenant.as_deref());
            for (p, secs) in &ctx.worker_seconds {
                if let Some(price) = rules.rules.pool(p).map(|p| p.cost_per_hour) {
                    m.cost
                        .with_label_values(&[p, tenant])
                        .inc_by(price * secs / 3600.0);
                }
            }
        }
    }
    let failures: Vec<String> = ctx
        .failures
        .iter()
        .map(|(pool, worker, reason)| format!("{pool}/{worker}:{reason}"))
        .collect();
    tracing::info!(
        status = ctx.status,
        model = crate::error::echo(ctx.model()),
        tenant = features.tenant.as_deref().unwrap_or("-"),
        rule,
        pool,
        attempts = ctx.attempts,
        failures = failures.join(" "),
        prompt_tokens = features.prompt_tokens,
        exact = ctx.classified.exact,
        ms = elapsed.as_secs_f64() * 1000.0,
        error = e.map(|e| e.to_string()).unwrap_or_default(),
        "request"
    );
}
