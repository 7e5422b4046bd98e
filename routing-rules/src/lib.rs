//! The Switchyard rules language.
//!
//! YAML spec ([`spec`]) → validated and compiled ([`compile`] → [`CompiledRules`]) →
//! matched ([`CompiledRules::route`]) → swapped atomically ([`RulesStore`]).
//! Pure: no sockets. The reference with worked examples is `docs/rules.md`.

mod compile;
mod compiled;
mod features;
mod problem;
pub mod spec;
mod store;

pub use compile::{MAX_FILE_BYTES, VERSION, compile, compile_file};

/// The JSON Schema of the rules file, for editors (`switchyard rules schema`): the committed
/// `docs/rules.schema.json`, which a test keeps equal to [`json_schema`]'s output.
pub const JSON_SCHEMA: &str = include_str!("../../docs/rules.schema.json");
pub use compiled::{
    BreakerLimits, CompiledRules, Conditions, InvalidRetryPolicy, InvalidValue, KeyDigest, Limits,
    Model, Pool, Range, RetryPolicy, RouteDecision, Rule, Tenant, TokenizerRef, key_digest,
};
pub use features::{ModalitySet, RequestFeatures};
pub use problem::{Problem, RulesError};
pub use spec::{Auth, Capacity, Endpoint, Modality, RetryOn, SelectPolicy, json_schema};
pub use store::{Loaded, ReloadOutcome, RulesStore};

#[cfg(test)]
mod schema_tests;
#[cfg(test)]
mod tests;
