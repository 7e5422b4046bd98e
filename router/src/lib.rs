//! `switchyard`: the tiered LLM request router.
//!
//! ## The data plane, in the order a request meets it
//!
//! | stage | module | job |
//! | --- | --- | --- |
//! | hooks | [`proxy`] | pingora's `ProxyHttp`: the lifecycle, one call per stage |
//! | context | [`ctx`] | the per-request context every stage reads and fills |
//! | admit | [`admit`] | header limit, loop guard, endpoint (`/v1/models` answered) |
//! | body | [`body`] | the body read whole under the cap, budget ([`budget`]) and deadline |
//! | classify | [`classify`] | the one classifier: parse, tenant, headers, token counts |
//! | route | `routing_rules` | `CompiledRules::route`: rule → ordered target pools |
//! | failover | [`failover`] | the attempt loop: tiers, retry budget, outcomes |
//! | select | [`select`] | eligibility and the selection policies (one file each) |
//! | attempt | [`attempt`] | one request to one worker, up to its response header |
//! | relay | [`relay`] | the answer streamed back; usage counted ([`usage`]); a stream broken mid-answer resumed ([`resume`]) |
//! | respond | [`respond`] | answers the router gives itself ([`error`] holds the error model) |
//! | log | [`log`] | metrics ([`metrics`]) and the access line |
//!
//! ## The control plane
//!
//! [`grpc`] (worker registration) over [`registry`] (leases, health, snapshots), [`health`]
//! (active checks of static workers), [`admin`] (the admin API), [`state`] (what all of
//! them share) and [`reload`] (what a new rule set changes beyond the rules).
//! [`logging`] writes every log line (JSON, off the event loop); [`trace`] each request's
//! OpenTelemetry spans.

pub mod admin;
pub mod admit;
pub mod allocator;
pub mod attempt;
pub mod body;
pub mod budget;
pub mod classify;
pub mod conn;
pub mod cost;
pub mod ctx;
pub mod drift;
pub mod error;
pub mod failover;
pub mod grpc;
pub mod health;
pub mod log;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod registry;
pub mod relay;
pub mod reload;
pub mod respond;
pub mod resume;
pub mod select;
pub mod shared_limits;
pub mod slo;
pub mod state;
pub mod tenants;
pub mod trace;
pub mod upstream;
pub mod usage;
