//! The rules file as written: raw YAML types. Nothing here is trusted; `compile` checks it.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesSpec {
    pub version: u32,
    #[serde(default)]
    pub models: BTreeMap<String, Spanned<ModelSpec>>,
    pub pools: BTreeMap<String, Spanned<PoolSpec>>,
    #[serde(default)]
    pub rules: Vec<Spanned<RuleSpec>>,
    #[serde(default)]
    pub default: Option<Spanned<RouteSpec>>,
    #[serde(default)]
    pub retry: Option<Spanned<RetrySpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub tokenizer: TokenizerSpec,
    pub context_window: u32,
    #[serde(default)]
    pub default_max_tokens: Option<u32>,
    #[serde(default)]
    pub image_tokens: Option<u32>,
    #[serde(default)]
    pub audio_tokens: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum TokenizerSpec {
    /// A GGUF file whose metadata holds the tokenizer.
    Gguf(String),
    /// A Hugging Face tokenizer.json.
    Json(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capacity {
    Spot,
    OnDemand,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    pub class: String,
    pub capacity: Capacity,
    pub cost_per_hour: f64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub workers: Vec<String>,
    /// The models the static `workers` serve (default: every model the file declares).
    #[serde(default)]
    pub models: Vec<String>,
    /// How a worker of this pool is chosen (default `power_of_two`).
    #[serde(default)]
    pub select: Option<SelectPolicy>,
}

/// How a worker of a pool is chosen among the eligible ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectPolicy {
    /// Two eligible workers drawn at random, the less loaded wins.
    #[default]
    PowerOfTwo,
    /// Every eligible worker looked at, the least loaded wins (ties at random).
    LeastLoaded,
}

impl SelectPolicy {
    /// Its name in the rules file (and as a metric label).
    pub fn name(self) -> &'static str {
        match self {
            Self::PowerOfTwo => "power_of_two",
            Self::LeastLoaded => "least_loaded",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    #[serde(default)]
    pub when: Option<WhenSpec>,
    pub route: Spanned<Vec<String>>,
    #[serde(default)]
    pub fallback_on_demand: bool,
    #[serde(default)]
    pub retry: Option<Spanned<RetrySpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub route: Spanned<Vec<String>>,
    #[serde(default)]
    pub fallback_on_demand: bool,
    #[serde(default)]
    pub retry: Option<Spanned<RetrySpec>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhenSpec {
    pub context_tokens: Option<Spanned<RangeSpec>>,
    pub prompt_tokens: Option<Spanned<RangeSpec>>,
    pub modality: Option<Spanned<ModalitySpec>>,
    pub model: Option<Spanned<Vec<String>>>,
    pub tenant: Option<Vec<String>>,
    pub headers: Option<BTreeMap<String, Vec<String>>>,
    pub stream: Option<bool>,
    pub endpoint: Option<Vec<Endpoint>>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeSpec {
    pub at_least: Option<u64>,
    pub at_most: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Modality {
    Text,
    Image,
    Audio,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModalitySpec {
    #[serde(default)]
    pub any_of: Vec<Modality>,
    #[serde(default)]
    pub none_of: Vec<Modality>,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    Connect,
    Reset,
    #[serde(rename = "status_5xx")]
    Status5xx,
    Preempted,
    Timeout,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    pub max_attempts: Option<u32>,
    pub budget_ratio: Option<f64>,
    pub budget_floor: Option<u32>,
    pub on: Option<Vec<RetryOn>>,
    pub backoff_ms: Option<u64>,
}
