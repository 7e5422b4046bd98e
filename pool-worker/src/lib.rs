//! `switchyard-worker`: a candle inference server for one Switchyard pool.
//!
//! - [`engine`]: the model actor (GGUF llama via candle, tokenizer from GGUF metadata).
//! - [`api`]: the OpenAI-compatible HTTP API, with the commit point.
//! - [`registration`]: gRPC registration and heartbeats with the router.

pub mod api;
pub mod engine;
pub mod error;
pub mod llama;
pub mod registration;
