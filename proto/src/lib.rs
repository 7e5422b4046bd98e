//! The worker registry protocol, package `switchyard.registry.v1`.
//!
//! Generated at build time from `proto/registry.proto` by protox + tonic-prost-build.

#[allow(clippy::all, clippy::unwrap_used, clippy::expect_used, missing_docs)]
pub mod registry {
    pub mod v1 {
        tonic::include_proto!("switchyard.registry.v1");
    }
}

pub use registry::v1::*;

pub mod host;
pub mod otel;
