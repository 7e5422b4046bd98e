//! The rules file as written: raw YAML types. Nothing here is trusted; `compile` checks it.
//!
//! These types are also the source of the JSON Schema (`docs/rules.schema.json`, see
//! [`json_schema`]): a key added here appears there when the schema is regenerated.
//! The `schemars` attributes state what the schema can check by itself (ranges, non-empty
//! lists); `compile` checks the same and more (references, shadowing).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_saphyr::Spanned;

/// The JSON Schema (draft 2020-12) of the rules file, generated from [`RulesSpec`].
/// `docs/rules.schema.json` is this text; `UPDATE_SCHEMA=1 cargo test -p routing-rules schema`
/// rewrites it.
pub fn json_schema() -> String {
    let schema = schemars::generate::SchemaSettings::draft2020_12()
        .for_deserialize()
        .into_generator()
        .into_root_schema_for::<RulesSpec>();
    format!("{:#}\n", schema.as_value())
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(
    title = "Switchyard rules file (version 1)",
    description = "Reference: docs/rules.md. The router validates more than this schema can say (references, shadowed rules, ranges); use `switchyard rules check`.",
    extend("$id" = "https://switchyard.dev/schemas/rules-v1.json")
)]
pub struct RulesSpec {
    #[schemars(extend("const" = 1))]
    pub version: u32,
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, ModelSpec>")]
    pub models: BTreeMap<String, Spanned<ModelSpec>>,
    #[schemars(
        with = "BTreeMap<String, PoolSpec>",
        extend("minProperties" = 1, "propertyNames" = { "pattern": "^[A-Za-z0-9._-]+$" })
    )]
    pub pools: BTreeMap<String, Spanned<PoolSpec>>,
    #[serde(default)]
    #[schemars(with = "Vec<RuleSpec>")]
    pub rules: Vec<Spanned<RuleSpec>>,
    #[serde(default)]
    #[schemars(with = "Option<RouteSpec>")]
    pub default: Option<Spanned<RouteSpec>>,
    #[serde(default)]
    #[schemars(with = "Option<RetrySpec>")]
    pub retry: Option<Spanned<RetrySpec>>,
    /// Whether a request needs a configured tenant's key (`required`: anything else gets
    /// 401 `invalid_api_key`) or not (`optional`, the default: a request without one is
    /// its own tenant, named after its key's hash, or `anonymous` without a key).
    #[serde(default)]
    pub auth: Auth,
    /// Tenants by name: their API keys (never the key itself: its SHA-256, or where to
    /// read it) and limits.
    #[serde(default)]
    #[schemars(
        with = "BTreeMap<String, TenantSpec>",
        extend("propertyNames" = { "pattern": "^[A-Za-z0-9._-]+$" })
    )]
    pub tenants: BTreeMap<String, Spanned<TenantSpec>>,
}

/// Whether requests need a configured tenant's key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Auth {
    #[default]
    Optional,
    Required,
}

/// A tenant: who it is (its keys) and what it may use (its limits).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    #[schemars(length(min = 1))]
    pub keys: Vec<KeySpec>,
    #[serde(default)]
    pub limits: LimitsSpec,
    /// Models the tenant may use (default: every one). Another model is answered as
    /// OpenAI answers a model a key has no access to: 404 `model_not_found`.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// Pools the tenant's requests may run on (default: every one). A matched rule's route
    /// keeps only these, in its order (`[l40s-ondemand, h100-ondemand]`: never on spot
    /// capacity; `[cpu]`: only the cheap pool); when none is left, 403 `pool_not_allowed`.
    #[serde(default)]
    pub pools: Option<Vec<String>>,
}

/// One API key, without the key in the file: its SHA-256 (hex), or the environment
/// variable or file (a mounted secret) it is read from when the rules load.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum KeySpec {
    Sha256(#[schemars(pattern("^[0-9a-fA-F]{64}$"))] String),
    Env(String),
    File(String),
}

/// A tenant's limits; each is off when absent. Over one, a request gets 429 with
/// `Retry-After` and OpenAI's `x-ratelimit-*` headers.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// Requests admitted per minute (a token bucket: the whole minute's worth may come at once).
    #[schemars(range(min = 1))]
    pub requests_per_minute: Option<u32>,
    /// Prompt tokens admitted per minute (the classifier's count: exact, or its bound).
    #[schemars(range(min = 1))]
    pub tokens_per_minute: Option<u32>,
    /// Requests in flight at once.
    #[schemars(range(min = 1))]
    pub max_concurrent: Option<u32>,
    /// Dollars the tenant may spend per UTC day, by the router's cost accounting (pool price
    /// × each request's share of its worker's time). Once spent: 429 `insufficient_quota`
    /// until midnight UTC.
    #[schemars(range(min = 0.000000001))]
    pub budget_usd_per_day: Option<f64>,
    /// Dollars the tenant may spend per calendar month (UTC), counted like the daily budget.
    /// Once spent: 429 `insufficient_quota` until the 1st of next month.
    #[schemars(range(min = 0.000000001))]
    pub budget_usd_per_month: Option<f64>,
    /// Sheds this tenant alone while its requests fail: once `error_percent` of at least
    /// `min_requests` answers in the last `window_s` seconds were 5xx (its runaway
    /// generations timing out, say), its new requests get 503 with `Retry-After` for
    /// `open_s` seconds; then one request at a time probes, and a success closes it again.
    pub breaker: Option<BreakerSpec>,
}

/// A tenant's circuit breaker (see [`LimitsSpec::breaker`]).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BreakerSpec {
    /// Share of failed (5xx) answers that opens the breaker, in percent.
    #[schemars(range(min = 1, max = 100))]
    pub error_percent: u32,
    /// Answers in the window before the share counts.
    #[serde(default = "default_breaker_min_requests")]
    #[schemars(range(min = 1))]
    pub min_requests: u32,
    /// Seconds of answers the share is taken over.
    #[serde(default = "default_breaker_window_s")]
    #[schemars(range(min = 1, max = 3600))]
    pub window_s: u32,
    /// Seconds the breaker stays open before it lets a probe through.
    #[serde(default = "default_breaker_open_s")]
    #[schemars(range(min = 1, max = 3600))]
    pub open_s: u32,
}

fn default_breaker_min_requests() -> u32 {
    20
}
fn default_breaker_window_s() -> u32 {
    30
}
fn default_breaker_open_s() -> u32 {
    10
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub tokenizer: TokenizerSpec,
    #[schemars(range(min = 1))]
    pub context_window: u32,
    #[serde(default)]
    pub default_max_tokens: Option<u32>,
    #[serde(default)]
    pub image_tokens: Option<u32>,
    #[serde(default)]
    pub audio_tokens: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum TokenizerSpec {
    /// A GGUF file whose metadata holds the tokenizer.
    Gguf(String),
    /// A Hugging Face tokenizer.json.
    Json(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Capacity {
    Spot,
    OnDemand,
}

/// How the router picks a worker among a pool's eligible ones.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, serde::Serialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum SelectPolicy {
    /// Two eligible workers at random; the less loaded one wins.
    #[default]
    PowerOfTwo,
    /// Every eligible worker is scanned; the least loaded wins, ties broken at random.
    LeastLoaded,
    /// Requests that start with the same text (a tenant's system prompt, a conversation's
    /// earlier turns) go to the worker that served that start last, whose prefix cache
    /// likely still holds it — unless that worker is busier than the pool's bound on load
    /// allows, when the less loaded of two (as `power_of_two`) takes it and becomes an
    /// owner too.
    CacheAware,
}

impl SelectPolicy {
    /// The name as written in the rules file; also a metric label.
    pub fn name(self) -> &'static str {
        match self {
            Self::PowerOfTwo => "power_of_two",
            Self::LeastLoaded => "least_loaded",
            Self::CacheAware => "cache_aware",
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    #[schemars(length(min = 1), extend("examples" = ["h100", "l40s", "cpu"]))]
    pub class: String,
    pub capacity: Capacity,
    #[schemars(range(min = 0))]
    pub cost_per_hour: f64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    #[schemars(inner(pattern("^.+:[0-9]+$")))]
    pub workers: Vec<String>,
    /// The models the static `workers` serve (default: every model the file declares).
    #[serde(default)]
    #[schemars(inner(length(min = 1)))]
    pub models: Vec<String>,
    /// How a worker of this pool is picked for a request.
    #[serde(default)]
    pub select: SelectPolicy,
    /// How the router connects to this pool's workers, static and registered: HTTPS and
    /// the credentials the router sends (the client's own key is never passed on).
    #[serde(default)]
    pub upstream: Option<UpstreamSpec>,
}

/// How the router connects to a pool's workers.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSpec {
    /// HTTPS to the workers, their certificate verified against `ca_file` (default: the
    /// system's roots) for `server_name`.
    #[serde(default)]
    pub tls: bool,
    /// CA certificates (PEM) the workers' certificates must chain to. Relative paths are
    /// from the rules file's directory.
    pub ca_file: Option<String>,
    /// A client certificate (PEM) for workers that want mTLS, with `client_key`.
    pub client_cert: Option<String>,
    /// The client certificate's private key (PEM, PKCS#8 or RSA/EC).
    pub client_key: Option<String>,
    /// The name checked on the worker's certificate and sent as SNI and `Host` (default: the
    /// host a static `workers` entry names; a registered worker's IP address otherwise).
    pub server_name: Option<String>,
    /// Sent to the workers as `Authorization: Bearer <key>`: `{ env: VAR }` or
    /// `{ file: path }` (a mounted secret), read when the rules load.
    pub api_key: Option<SecretSpec>,
}

/// Where a secret comes from: never the rules file itself.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum SecretSpec {
    Env(String),
    File(String),
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    #[schemars(length(min = 1))]
    pub name: String,
    #[serde(default)]
    pub when: Option<WhenSpec>,
    #[schemars(with = "Vec<String>", length(min = 1))]
    pub route: Spanned<Vec<String>>,
    #[serde(default)]
    pub fallback_on_demand: bool,
    #[serde(default)]
    #[schemars(with = "Option<RetrySpec>")]
    pub retry: Option<Spanned<RetrySpec>>,
    /// A latency objective: the route's pools are taken cheapest first among those
    /// expected to meet it; one that misses it spills to the next until it recovers.
    #[serde(default)]
    pub slo: Option<SloSpec>,
}

/// A rule's latency objective.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SloSpec {
    /// The 95th percentile of the time to first token, per pool, over the last seconds.
    #[schemars(range(min = 1, max = 600000))]
    pub ttft_p95_ms: u64,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    #[schemars(with = "Vec<String>", length(min = 1))]
    pub route: Spanned<Vec<String>>,
    #[serde(default)]
    pub fallback_on_demand: bool,
    #[serde(default)]
    #[schemars(with = "Option<RetrySpec>")]
    pub retry: Option<Spanned<RetrySpec>>,
    #[serde(default)]
    pub slo: Option<SloSpec>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WhenSpec {
    #[schemars(with = "Option<RangeSpec>")]
    pub context_tokens: Option<Spanned<RangeSpec>>,
    #[schemars(with = "Option<RangeSpec>")]
    pub prompt_tokens: Option<Spanned<RangeSpec>>,
    #[schemars(with = "Option<ModalitySpec>")]
    pub modality: Option<Spanned<ModalitySpec>>,
    #[schemars(with = "Option<Vec<String>>", length(min = 1))]
    pub model: Option<Spanned<Vec<String>>>,
    #[schemars(length(min = 1))]
    pub tenant: Option<Vec<String>>,
    pub headers: Option<BTreeMap<String, Vec<String>>>,
    pub stream: Option<bool>,
    #[schemars(length(min = 1))]
    pub endpoint: Option<Vec<Endpoint>>,
}

#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("minProperties" = 1))]
pub struct RangeSpec {
    pub at_least: Option<u64>,
    pub at_most: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Modality {
    Text,
    Image,
    Audio,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModalitySpec {
    #[serde(default)]
    pub any_of: Vec<Modality>,
    #[serde(default)]
    pub none_of: Vec<Modality>,
}

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Deserialize,
    serde::Serialize,
    JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    Connect,
    Reset,
    #[serde(rename = "status_5xx")]
    Status5xx,
    Preempted,
    Timeout,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts in all, the first included.
    #[schemars(range(min = 1, max = 10))]
    pub max_attempts: Option<u32>,
    /// Retries allowed as a fraction of requests.
    #[schemars(range(min = 0, max = 1))]
    pub budget_ratio: Option<f64>,
    /// Retries always allowed per second regardless of the ratio.
    pub budget_floor: Option<u32>,
    pub on: Option<Vec<RetryOn>>,
    #[schemars(range(max = 10000))]
    pub backoff_ms: Option<u64>,
    /// Resume a stream whose worker fails mid-answer on another worker, as a continuation
    /// of the text already sent (default true; needs `reset` in `on`).
    pub resume: Option<bool>,
    /// Deadline escalation: an attempt with no first token this long after it started is
    /// also started on the next pool of the route; the first to produce a token is
    /// served and the other cancelled (a hedge, taken from the retry budget).
    #[schemars(range(min = 1, max = 60000))]
    pub escalate_after_ms: Option<u64>,
}
