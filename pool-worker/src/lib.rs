//! `switchyard-worker`: a candle inference server for one Switchyard pool.
//!
//! Modules, in the order a request goes through them:
//!
//! - [`api`]: the OpenAI-compatible HTTP API — parses and validates the request, holds the
//!   answer until the first token (the commit point), streams or returns the rest.
//! - [`engine`]: the model side. `engine::prompt` renders the chat template and tokenizes
//!   ([`engine::Prompt`]); the [`engine::Engine`] handle queues the job; the scheduler
//!   actor runs continuous batching over [`llama`]'s forward; the detokenizer turns tokens
//!   into text and cuts it at stop sequences. `engine::load` reads a model (GGUF or
//!   safetensors) at start; `engine::sim` stands in for the model on simulated hardware.
//! - [`llama`]: the batched forward pass (llama and qwen2, [`llama::Arch`]), its weights,
//!   KV caches and attention.
//! - [`q8`]: batched 8-bit products for decode on CPU.
//! - [`cpu_ops`]: fused element-wise CPU kernels for the prefill (causal softmax, SiLU gate).
//! - [`error`]: the worker's errors and their OpenAI-shaped bodies.
//! - [`metrics`]: every `/metrics` figure, registered in one place.
//! - [`registration`]: gRPC registration and heartbeats with the router ([`routers`]: one
//!   per router replica).
//! - [`sidecar`]: `--engine-url` mode, registering an external engine (vLLM, sglang, TGI,
//!   llama.cpp) in this process's place.

pub mod api;
pub mod cpu_ops;
pub mod engine;
pub mod error;
pub mod gpu;
pub mod llama;
pub mod metrics;
pub mod q8;
pub mod registration;
pub mod routers;
pub mod sidecar;
pub mod trace;

/// Makes candle's CPU thread count a constant: re-executes this program once with
/// `RAYON_NUM_THREADS` set (to the cores this process may use) unless it is set already.
///
/// candle looks the count up on every CPU product, and without the variable it derives it
/// from `/proc/cpuinfo` and the affinity mask each time: a file read per matrix product, in
/// every decode step. Measured with `worker-bench` on SmolLM2 (2-core machine), decode at
/// 4 streams went from 47–65 to 36 ms per token with the variable set. Setting it in this
/// process would need unsafe code (`std::env::set_var`), so the process replaces itself
/// (same pid, arguments and descriptors). If that fails the worker goes on as it is.
#[cfg(unix)]
pub fn pin_cpu_thread_count() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("RAYON_NUM_THREADS", threads.to_string())
        .exec();
    eprintln!("warning: could not re-execute with RAYON_NUM_THREADS={threads}: {err}");
}

/// Elsewhere the worker runs with candle's own thread count lookup.
#[cfg(not(unix))]
pub fn pin_cpu_thread_count() {}
