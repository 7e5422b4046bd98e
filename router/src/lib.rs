//! `switchyard`: the tiered LLM request router.
//!
//! The request path follows the stages of a request: [`proxy`] (the pingora hooks) →
//! [`classify`] (one parse, token bounds, exact counts only where a rule needs them) →
//! routing (`routing_rules::CompiledRules::route`) → [`upstream`] (worker choice, retry
//! budget) → forwarding with failover (in [`proxy`]). The control plane: [`grpc`] (worker
//! registry service) over [`registry`] (leases and snapshots), [`admin`], [`metrics`].

pub mod admin;
pub mod budget;
pub mod classify;
pub mod error;
pub mod grpc;
pub mod health;
pub mod metrics;
pub mod proxy;
pub mod registry;
pub mod state;
pub mod upstream;
