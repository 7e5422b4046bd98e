//! The checked, compiled rule set and the matcher.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use globset::GlobSet;
use serde::Serialize;

use crate::features::{ModalitySet, RequestFeatures};
use crate::spec::{Auth, Capacity, Endpoint, RetryOn, SelectPolicy};

/// A configured tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tenant {
    pub name: Arc<str>,
    pub limits: Limits,
    /// Models the tenant may use (`None`: every one).
    pub models: Option<Vec<String>>,
    /// Pools the tenant's requests may run on (`None`: every one).
    pub pools: Option<Vec<String>>,
}

impl Tenant {
    /// Whether the tenant may use `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| x == model))
    }
}

/// A tenant's limits (`None`: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Limits {
    pub requests_per_minute: Option<std::num::NonZeroU32>,
    pub tokens_per_minute: Option<std::num::NonZeroU32>,
    pub max_concurrent: Option<std::num::NonZeroU32>,
    /// Spend per UTC day, in billionths of a dollar.
    pub budget_nano_usd_per_day: Option<std::num::NonZeroU64>,
    /// Spend per calendar month (UTC), in billionths of a dollar.
    pub budget_nano_usd_per_month: Option<std::num::NonZeroU64>,
    pub breaker: Option<BreakerLimits>,
}

/// A tenant's circuit breaker, checked (see `LimitsSpec::breaker`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BreakerLimits {
    pub error_percent: u32,
    pub min_requests: u32,
    pub window_s: u32,
    pub open_s: u32,
}

/// The SHA-256 of an API key: what the rules hold and look keys up by.
pub type KeyDigest = [u8; 32];

/// The digest of `key`.
pub fn key_digest(key: &str) -> KeyDigest {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes()).into()
}

/// A pool as the rules define it.
#[derive(Debug, Clone, Serialize)]
pub struct Pool {
    pub name: Arc<str>,
    pub class: String,
    pub capacity: Capacity,
    pub cost_per_hour: f64,
    pub labels: BTreeMap<String, String>,
    /// Static workers (OpenAI-compatible servers that do not register), `host:port`.
    pub workers: Vec<String>,
    /// The models the static workers serve; empty: every model the file declares (and,
    /// in a file that declares none, any model).
    pub models: Vec<String>,
    /// How the router picks one of the pool's eligible workers.
    pub select: SelectPolicy,
    /// How the router connects to the pool's workers (plain HTTP, no credentials when
    /// `None`).
    pub upstream: Option<Arc<Upstream>>,
}

/// How the router connects to a pool's workers, checked and read at load.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Upstream {
    /// HTTPS, when set.
    pub tls: Option<UpstreamTls>,
    /// The whole `Authorization` value the router sends (`Bearer <key>`).
    pub authorization: Option<String>,
}

/// HTTPS to a pool's workers: DER-encoded certificates and key, checked at load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTls {
    /// CA certificates the workers' must chain to; empty: the system's roots.
    pub ca_der: Vec<Vec<u8>>,
    /// Client certificate chain and private key, for mTLS.
    pub client: Option<(Vec<Vec<u8>>, Vec<u8>)>,
    pub server_name: Option<String>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("tls", &self.tls.is_some())
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<set>"),
            )
            .finish()
    }
}

impl Serialize for Upstream {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Upstream", 4)?;
        st.serialize_field("tls", &self.tls.is_some())?;
        st.serialize_field(
            "server_name",
            &self.tls.as_ref().and_then(|t| t.server_name.as_deref()),
        )?;
        st.serialize_field(
            "mtls",
            &self.tls.as_ref().is_some_and(|t| t.client.is_some()),
        )?;
        // the key itself never leaves the router
        st.serialize_field("api_key", &self.authorization.is_some())?;
        st.end()
    }
}

impl Serialize for Capacity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            Capacity::Spot => "spot",
            Capacity::OnDemand => "on_demand",
        })
    }
}

/// Where a model's tokenizer comes from (paths resolved against the rules file's directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum TokenizerRef {
    Gguf(PathBuf),
    Json(PathBuf),
}

#[derive(Debug, Clone, Serialize)]
pub struct Model {
    pub name: String,
    pub tokenizer: TokenizerRef,
    pub context_window: u32,
    pub default_max_tokens: u32,
    pub image_tokens: u32,
    pub audio_tokens: u32,
}

/// Inclusive token range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Range {
    pub at_least: u64,
    pub at_most: u64,
}

impl Range {
    pub fn contains(&self, v: u64) -> bool {
        self.at_least <= v && v <= self.at_most
    }
    pub fn covers(&self, other: &Range) -> bool {
        self.at_least <= other.at_least && other.at_most <= self.at_most
    }
}

/// Retry policy for a route. [`RetryPolicy::try_new`] is the one place its invariants are
/// checked; the compiler builds every policy through it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Retries allowed as a fraction of requests.
    pub budget_ratio: f64,
    /// Retries always allowed per second regardless of the ratio.
    pub budget_floor: u32,
    pub on: Vec<RetryOn>,
    #[serde(with = "millis")]
    pub backoff: Duration,
    /// A stream whose worker fails mid-answer is resumed on another worker, as a
    /// continuation of what the client already has (when `on` includes `reset`).
    pub resume: bool,
    /// An attempt with no first token after this is also started on the next pool of the
    /// route (deadline escalation); `None`: never.
    #[serde(with = "opt_millis")]
    pub escalate_after: Option<Duration>,
}

mod opt_millis {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }
}

mod millis {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            budget_ratio: 0.2,
            budget_floor: 10,
            on: vec![
                RetryOn::Connect,
                RetryOn::Reset,
                RetryOn::Status5xx,
                RetryOn::Preempted,
                RetryOn::Timeout,
            ],
            backoff: Duration::from_millis(0),
            resume: true,
            escalate_after: None,
        }
    }
}

/// One value a validated constructor refused. `field` is the key as the rules file names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}, got {value}")]
pub struct InvalidValue {
    pub field: &'static str,
    pub value: String,
    pub reason: String,
}

impl InvalidValue {
    /// The problem without the field name (the caller's path names it).
    pub fn message(&self) -> String {
        format!("{}, got {}", self.reason, self.value)
    }
}

/// Why [`RetryPolicy::try_new`] refused its arguments: every bad value, in argument order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid retry policy: {}", .problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct InvalidRetryPolicy {
    pub problems: Vec<InvalidValue>,
}

impl RetryPolicy {
    /// Most attempts a policy may allow.
    pub const MAX_ATTEMPTS: u32 = 10;
    /// Longest backoff between attempts.
    pub const MAX_BACKOFF: Duration = Duration::from_millis(10_000);

    /// A policy whose values are in range: `max_attempts` in `1..=MAX_ATTEMPTS`,
    /// `budget_ratio` a finite number within `0..=1`, `backoff` at most [`Self::MAX_BACKOFF`].
    pub fn try_new(
        max_attempts: u32,
        budget_ratio: f64,
        budget_floor: u32,
        on: Vec<RetryOn>,
        backoff: Duration,
    ) -> Result<Self, InvalidRetryPolicy> {
        let mut problems = Vec::new();
        if !(1..=Self::MAX_ATTEMPTS).contains(&max_attempts) {
            problems.push(InvalidValue {
                field: "max_attempts",
                value: max_attempts.to_string(),
                reason: format!("must be 1..={}", Self::MAX_ATTEMPTS),
            });
        }
        // NaN and the infinities fall outside the range too.
        if !(0.0..=1.0).contains(&budget_ratio) {
            problems.push(InvalidValue {
                field: "budget_ratio",
                value: budget_ratio.to_string(),
                reason: "must be within 0..=1".into(),
            });
        }
        if backoff > Self::MAX_BACKOFF {
            problems.push(InvalidValue {
                field: "backoff_ms",
                value: backoff.as_millis().to_string(),
                reason: format!("must be at most {}", Self::MAX_BACKOFF.as_millis()),
            });
        }
        if !problems.is_empty() {
            return Err(InvalidRetryPolicy { problems });
        }
        Ok(Self {
            max_attempts,
            budget_ratio,
            budget_floor,
            on,
            backoff,
            resume: true,
            escalate_after: None,
        })
    }

    pub fn retries_on(&self, reason: RetryOn) -> bool {
        self.on.contains(&reason)
    }

    /// Whether a stream broken mid-answer is resumed on another worker.
    pub fn resumes(&self) -> bool {
        self.resume && self.retries_on(RetryOn::Reset)
    }
}

/// Conditions of one rule; `None` means "any".
///
/// # Adding a rule predicate
///
/// Each of these is one place; a predicate missing from any of them is a bug.
///
/// 1. **Spec**: an `Option<...>` field in [`crate::spec::WhenSpec`] (with `schemars`
///    attributes for what the schema can check, e.g. `length(min = 1)`).
/// 2. **Compile check**: `Compiler::conditions` in `compile.rs` validates it, reports
///    problems with their path, and fills the field below.
/// 3. **Field here**: an `Option<...>` field on `Conditions`, `None` meaning "any".
/// 4. **Matcher**: a branch in `Conditions::eval` (pushes the predicate's name to `held`),
///    one more `&&` in [`Conditions::is_catch_all`], and one in [`Conditions::covers`]
///    (conservative: it may say "no" wrongly, never "yes") so shadowed rules are still found.
/// 5. **Docs**: a row in the `when` table of `docs/rules.md`.
/// 6. **Schema**: regenerate with `UPDATE_SCHEMA=1 cargo test -p routing-rules schema`
///    and commit `docs/rules.schema.json`.
/// 7. **Golden fixture**: `tests/fixtures/invalid/NAME.yaml` for each new problem message
///    (`BLESS=1 cargo test -p routing-rules` writes its `.expected`), and a routing case in
///    `src/tests.rs` that the predicate decides.
#[derive(Debug, Clone, Default)]
pub struct Conditions {
    pub context_tokens: Option<Range>,
    pub prompt_tokens: Option<Range>,
    pub modality_any_of: Option<ModalitySet>,
    pub modality_none_of: Option<ModalitySet>,
    pub model: Option<(Vec<String>, GlobSet)>,
    pub tenant: Option<Vec<String>>,
    pub headers: Option<BTreeMap<String, Vec<String>>>,
    pub stream: Option<bool>,
    pub endpoint: Option<Vec<Endpoint>>,
}

impl Conditions {
    /// Evaluates every condition; returns the names of those tested, or `None` if one fails.
    fn eval(&self, f: &RequestFeatures) -> Option<Vec<&'static str>> {
        let mut held = Vec::new();
        if let Some(r) = &self.context_tokens {
            r.contains(f.context_tokens()).then_some(())?;
            held.push("context_tokens");
        }
        if let Some(r) = &self.prompt_tokens {
            r.contains(f.prompt_tokens).then_some(())?;
            held.push("prompt_tokens");
        }
        if let Some(any) = self.modality_any_of {
            f.modalities.intersects(any).then_some(())?;
            held.push("modality.any_of");
        }
        if let Some(none) = self.modality_none_of {
            (!f.modalities.intersects(none)).then_some(())?;
            held.push("modality.none_of");
        }
        if let Some((_, globs)) = &self.model {
            globs.is_match(&f.model).then_some(())?;
            held.push("model");
        }
        if let Some(tenants) = &self.tenant {
            f.tenant
                .as_ref()
                .is_some_and(|t| tenants.iter().any(|x| x == t))
                .then_some(())?;
            held.push("tenant");
        }
        if let Some(headers) = &self.headers {
            let all = headers.iter().all(|(name, values)| {
                f.headers
                    .iter()
                    .any(|(n, v)| n == name && values.iter().any(|x| x == v))
            });
            all.then_some(())?;
            held.push("headers");
        }
        if let Some(stream) = self.stream {
            (f.stream == stream).then_some(())?;
            held.push("stream");
        }
        if let Some(endpoints) = &self.endpoint {
            f.endpoint
                .is_some_and(|e| endpoints.contains(&e))
                .then_some(())?;
            held.push("endpoint");
        }
        Some(held)
    }

    pub fn is_catch_all(&self) -> bool {
        self.context_tokens.is_none()
            && self.prompt_tokens.is_none()
            && self.modality_any_of.is_none()
            && self.modality_none_of.is_none()
            && self.model.is_none()
            && self.tenant.is_none()
            && self.headers.is_none()
            && self.stream.is_none()
            && self.endpoint.is_none()
    }

    /// True when every request these conditions `other` accept is also accepted by `self`
    /// (conservative: may say false for some subsumed pairs, never true wrongly).
    pub fn covers(&self, other: &Conditions) -> bool {
        fn opt<T>(a: &Option<T>, b: &Option<T>, f: impl Fn(&T, &T) -> bool) -> bool {
            match (a, b) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(a), Some(b)) => f(a, b),
            }
        }
        let subset = |a: &Vec<String>, b: &Vec<String>| b.iter().all(|x| a.contains(x));
        // Modalities: compare the exact sets of modality combinations each side accepts.
        let accepts = |c: &Conditions, m: ModalitySet| {
            c.modality_any_of.is_none_or(|a| m.intersects(a))
                && c.modality_none_of.is_none_or(|n| !m.intersects(n))
        };
        let modality_ok = (0u8..8)
            .map(ModalitySet::from_bits)
            .all(|m| !accepts(other, m) || accepts(self, m));
        opt(&self.context_tokens, &other.context_tokens, Range::covers)
            && opt(&self.prompt_tokens, &other.prompt_tokens, Range::covers)
            && modality_ok
            && opt(&self.model, &other.model, |a, b| {
                a.0.iter().any(|g| g == "*") || subset(&a.0, &b.0)
            })
            && opt(&self.tenant, &other.tenant, subset)
            && opt(&self.headers, &other.headers, |a, b| {
                a.iter()
                    .all(|(k, va)| b.get(k).is_some_and(|vb| subset(va, vb)))
            })
            && opt(&self.stream, &other.stream, |a, b| a == b)
            && opt(&self.endpoint, &other.endpoint, |a, b| {
                b.iter().all(|x| a.contains(x))
            })
    }
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub name: Arc<str>,
    pub when: Conditions,
    pub targets: Arc<[Arc<str>]>,
    pub retry: RetryPolicy,
    /// The rule's latency objective: time to first token, 95th percentile.
    pub slo_ttft_p95: Option<Duration>,
}

/// The outcome of matching one request.
#[derive(Debug, Clone, Serialize)]
pub struct RouteDecision {
    /// The rule that matched, or `default`.
    pub rule: Arc<str>,
    /// Pools to try, in order.
    pub targets: Arc<[Arc<str>]>,
    pub retry: RetryPolicy,
    /// The rule's latency objective (time to first token, 95th percentile): the router
    /// takes the cheapest pool of `targets` expected to meet it.
    #[serde(with = "opt_millis")]
    pub slo_ttft_p95: Option<Duration>,
    /// The conditions that held for the matched rule.
    pub matched: Vec<&'static str>,
}

/// A rule set that passed validation. Built only by [`crate::compile`].
#[derive(Debug, Clone)]
pub struct CompiledRules {
    pub(crate) pools: Vec<Pool>,
    pub(crate) models: BTreeMap<String, Model>,
    pub(crate) rules: Vec<Rule>,
    pub(crate) default: Option<Rule>,
    pub(crate) context_cuts: Vec<u64>,
    pub(crate) prompt_cuts: Vec<u64>,
    pub(crate) header_names: Vec<String>,
    pub(crate) auth: Auth,
    pub(crate) tenants: Vec<Tenant>,
    /// Key digest → index in `tenants`.
    pub(crate) keys: std::collections::HashMap<KeyDigest, usize>,
}

impl CompiledRules {
    /// First matching rule wins; then the default route. Total: a file without a catch-all
    /// must have a default (validation), so every request gets a decision.
    /// The decision for `f`, its route cut to the pools its tenant may use (see
    /// `TenantSpec::pools`; an empty route then means none is allowed).
    pub fn route(&self, f: &RequestFeatures) -> RouteDecision {
        let mut d = self.route_any_tenant(f);
        if let Some(allowed) = f
            .tenant
            .as_deref()
            .and_then(|t| self.tenant(t))
            .and_then(|t| t.pools.as_ref())
        {
            let kept: Vec<Arc<str>> = d
                .targets
                .iter()
                .filter(|p| allowed.iter().any(|a| a == &***p))
                .cloned()
                .collect();
            if kept.len() != d.targets.len() {
                d.targets = Arc::from(kept);
            }
        }
        d
    }

    fn route_any_tenant(&self, f: &RequestFeatures) -> RouteDecision {
        for rule in &self.rules {
            if let Some(matched) = rule.when.eval(f) {
                return RouteDecision {
                    rule: rule.name.clone(),
                    targets: rule.targets.clone(),
                    retry: rule.retry.clone(),
                    slo_ttft_p95: rule.slo_ttft_p95,
                    matched,
                };
            }
        }
        match &self.default {
            Some(d) => RouteDecision {
                rule: d.name.clone(),
                targets: d.targets.clone(),
                retry: d.retry.clone(),
                slo_ttft_p95: d.slo_ttft_p95,
                matched: Vec::new(),
            },
            // unreachable after validation; an empty route means "no capacity" upstream
            None => RouteDecision {
                rule: Arc::from("default"),
                targets: Arc::from(Vec::new()),
                retry: RetryPolicy::default(),
                slo_ttft_p95: None,
                matched: Vec::new(),
            },
        }
    }

    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }
    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| &*p.name == name)
    }
    /// Whether some pool selects its workers by the prompt's prefix (`cache_aware`): the
    /// router then names each request's prompt blocks.
    pub fn selects_by_prefix(&self) -> bool {
        self.pools
            .iter()
            .any(|p| p.select == SelectPolicy::CacheAware)
    }
    pub fn models(&self) -> &BTreeMap<String, Model> {
        &self.models
    }
    pub fn model(&self, name: &str) -> Option<&Model> {
        self.models.get(name)
    }
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }
    /// Whether requests need a configured tenant's key.
    pub fn auth(&self) -> Auth {
        self.auth
    }
    pub fn tenants(&self) -> &[Tenant] {
        &self.tenants
    }
    pub fn tenant(&self, name: &str) -> Option<&Tenant> {
        self.tenants.iter().find(|t| &*t.name == name)
    }
    /// The tenant an API key belongs to, by the key's digest.
    pub fn tenant_by_key(&self, digest: &KeyDigest) -> Option<&Tenant> {
        self.keys.get(digest).and_then(|&i| self.tenants.get(i))
    }

    /// Context-token values where the decision can change: for a cut `c`, requests with
    /// context `< c` and `>= c` may route differently. Sorted, deduplicated.
    pub fn context_cuts(&self) -> &[u64] {
        &self.context_cuts
    }
    /// Same as [`Self::context_cuts`] for prompt tokens.
    pub fn prompt_cuts(&self) -> &[u64] {
        &self.prompt_cuts
    }
    /// True when some cut `c` satisfies `lo < c <= hi`: values in `[lo, hi]` may route
    /// differently, so the classifier must count exactly.
    pub fn needs_exact(cuts: &[u64], lo: u64, hi: u64) -> bool {
        let i = cuts.partition_point(|c| *c <= lo);
        cuts.get(i).is_some_and(|c| *c <= hi)
    }
    /// Lower-case header names that some rule tests.
    pub fn header_names(&self) -> &[String] {
        &self.header_names
    }
}
