//! Classification: what a request is, as the rules see it.
//!
//! [`Classifier`] is the one classifier. Live traffic ([`crate::proxy`]), `POST
//! /admin/explain` and `switchyard rules explain` all go through it, so a rule on the
//! tenant or on a header gives the same decision in all three. Two steps, so the proxy can
//! refuse an unknown model before paying for a count:
//!
//! 1. [`Classifier::parse`]: one JSON parse of the body ([`parse`]), and the request head
//!    (tenant from the API key, the headers the rules test).
//! 2. [`Classifier::count`]: prompt tokens, as exact as the rules need ([`count`]).

mod count;
mod parse;

use std::time::Duration;

use http::HeaderMap;
use routing_rules::{CompiledRules, Endpoint, RequestFeatures, RouteDecision};
use serde_json::Value;

pub use count::{Counter, Counters, PIECE_BYTES, count_tokens, load_counters, min_pretokens};
pub use parse::{Parsed, endpoint_of, parse};

use crate::error::ProxyError;

/// Classifies requests against one rule set and its models' tokenizers.
pub struct Classifier<'a> {
    pub rules: &'a CompiledRules,
    pub counters: &'a Counters,
    /// How long an exact count may take before the bound is used instead.
    pub budget: Duration,
}

/// What classification found.
#[derive(Debug, Clone, Default)]
pub struct Classified {
    pub features: RequestFeatures,
    /// Whether `prompt_tokens` is the tokenizer's exact count (else a bound that gives the
    /// same decision, or the upper bound when the count ran out of time).
    pub exact: bool,
    /// A lower bound on the prompt's tokens (the count itself when exact): what the router
    /// may hold against the model's context window.
    pub prompt_tokens_lower: u64,
    /// The prompt text's block names, for pools that select `cache_aware`
    /// ([`crate::select::prefix_chain`]); empty when no pool does.
    pub prefix: Vec<u64>,
}

impl Classifier<'_> {
    /// Step 1: the body parsed, and the head read — the tenant (from `authorization`) and
    /// every header a rule tests. Nothing is counted yet.
    pub fn parse(
        &self,
        endpoint: Endpoint,
        head: &HeaderMap,
        body: &[u8],
    ) -> Result<Parsed, ProxyError> {
        let mut parsed = parse(endpoint, body)?;
        self.read_head(&mut parsed, head);
        Ok(parsed)
    }

    /// The head's part of step 1: the tenant (from `authorization`) and every header a
    /// rule tests. (The proxy parses large bodies off the event loop, then calls this.)
    pub fn read_head(&self, parsed: &mut Parsed, head: &HeaderMap) {
        let tenant = crate::tenants::tenant_of(
            self.rules,
            head.get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok()),
        );
        self.read_head_with_tenant(parsed, head, tenant);
    }

    /// [`Self::read_head`] with the tenant already known (the proxy identifies it before
    /// the body is read, and does not hash the key twice).
    pub fn read_head_with_tenant(
        &self,
        parsed: &mut Parsed,
        head: &HeaderMap,
        tenant: Option<String>,
    ) {
        let f = &mut parsed.features;
        f.tenant = tenant;
        for name in self.rules.header_names() {
            if let Some(v) = head.get(name.as_str()).and_then(|v| v.to_str().ok()) {
                f.headers.push((name.clone(), v.to_string()));
            }
        }
    }

    /// Step 2: token counts, exact only where a rule threshold lies inside the bounds.
    pub async fn count(&self, mut parsed: Parsed) -> Classified {
        let model = self.rules.model(&parsed.features.model);
        let counter = self.counters.get(&parsed.features.model).cloned();
        let exact = count_tokens(&mut parsed, model, counter, self.rules, self.budget).await;
        let prefix = match self.rules.selects_by_prefix() {
            true => crate::select::prefix_chain(&parsed.features.model, &parsed.texts),
            false => Vec::new(),
        };
        Classified {
            features: parsed.features,
            exact,
            prompt_tokens_lower: parsed.prompt_tokens_lower,
            prefix,
        }
    }

    /// Both steps: what `rules explain` and `POST /admin/explain` use.
    pub async fn classify(
        &self,
        endpoint: Endpoint,
        head: &HeaderMap,
        body: &[u8],
    ) -> Result<Classified, ProxyError> {
        let parsed = self.parse(endpoint, head, body)?;
        Ok(self.count(parsed).await)
    }

    /// Classifies and routes, forwarding nothing.
    pub async fn explain(
        &self,
        endpoint: Endpoint,
        head: &HeaderMap,
        body: &[u8],
    ) -> Result<Explained, ProxyError> {
        let classified = self.classify(endpoint, head, body).await?;
        let decision = self.rules.route(&classified.features);
        Ok(Explained {
            classified,
            decision,
        })
    }
}

/// What the router reads from a request and which rule it matches.
pub struct Explained {
    pub classified: Classified,
    pub decision: RouteDecision,
}

impl Explained {
    /// The JSON both explain paths print. The tenant is the derived id, never the key.
    pub fn to_json(&self) -> Value {
        let f = &self.classified.features;
        serde_json::json!({
            "features": {
                "model": f.model, "modalities": f.modalities.names(), "prompt_tokens": f.prompt_tokens,
                "prompt_tokens_exact": self.classified.exact, "max_tokens": f.max_tokens,
                "context_tokens": f.context_tokens(), "stream": f.stream,
                "tenant": f.tenant, "headers": f.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            },
            "decision": self.decision,
        })
    }
}
