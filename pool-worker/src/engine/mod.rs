//! The inference engine: one scheduler thread owns the model and runs continuous batching.
//!
//! Requests arrive on a bounded queue (full → the HTTP layer answers 429); each carries its
//! own event channel. Every scheduler step is one batched forward pass
//! ([`Llama::forward`](crate::llama::Llama::forward)) over all running sequences — each decoding sequence contributes its last token, and
//! prompts waiting to be prefilled contribute chunks, first come first served, up to 512
//! tokens in all while others decode (2048 on CPU when none does): short prompts that
//! arrive together are prefilled in one step — and new requests join at the next step, up to
//! `max_batch` sequences. The first event of a job is sent only after its
//! prefill succeeded and its first token was sampled — the commit point the router's
//! failover relies on.
//!
//! Modules, in the order a request goes through them:
//! - `load`: reading a model's files ([`LoadedModel`], [`Quantize`], [`parse_device`]).
//! - `prompt`: a request's [`Prompt`] through the chat template and tokenizer.
//! - this module: the [`Engine`] handle, which queues [`Job`]s.
//! - `scheduler`: the actor loop — admission, batched steps, sampling.
//! - `detokenizer`: incremental text and stop sequences.
//! - `sim`: the simulated-hardware backend, which replaces the model and scheduler.

mod detokenizer;
mod load;
mod prefix;
mod prompt;
mod scheduler;
mod sim;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::Instant;

use candle_core::Device;
use tokio::sync::mpsc;

use crate::error::WorkerError;
use crate::metrics::WorkerMetrics;

pub use detokenizer::TextDecoder;
pub use load::{LoadedModel, Quantize, parse_device};
pub use prompt::Prompt;
use scheduler::Actor;
pub use sim::SimProfile;
use sim::run_sim;

/// Sampling and stopping parameters for one job.
#[derive(Debug, Clone)]
pub struct GenParams {
    pub max_tokens: usize,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: u64,
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens (benchmarks only; not an API option).
    pub ignore_eos: bool,
    /// Words of the answer the prompt already ends with (a continuation,
    /// `continue_final_message`): the simulated backend's filler goes on from there. The
    /// model reads them in its prompt.
    pub continues_words: usize,
    /// Tokens at the prompt's end (a continued answer's start) fed one per step, as decode
    /// fed them when the answer was generated, instead of prefilled with the rest: the
    /// cache then holds what the uninterrupted generation's did, so a greedy continuation
    /// picks the tokens it would have (prefill's many-row products differ from decode's in
    /// the last bits, enough to flip a near tie). 0: the whole prompt is prefilled.
    pub replay_tokens: usize,
}

/// What a job reports, in order: zero or more `Text`, then exactly one `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    Text(String),
    Done(Usage),
    Failed(String),
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    /// What of the prompt came from the prefix cache, as OpenAI's API reports it.
    pub prompt_tokens_details: PromptTokensDetails,
    /// "stop" or "length".
    #[serde(skip)]
    pub finish_length: bool,
    /// When each phase began, for the request's trace.
    #[serde(skip)]
    pub timing: Timing,
}

/// `usage.prompt_tokens_details`, as OpenAI's API has it.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose keys and values were reused from the prefix cache, not computed.
    pub cached_tokens: usize,
}

/// When a request's phases began: queued, taken into a batch (prefill), first token.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    pub queued: Option<std::time::Instant>,
    pub admitted: Option<std::time::Instant>,
    pub first_token: Option<std::time::Instant>,
}

pub struct Job {
    pub prompt: Vec<u32>,
    pub params: GenParams,
    /// Unbounded: the engine never waits for a client, so one slow reader cannot stall the
    /// other sequences of its batch (a job's events are bounded by its `max_tokens`).
    pub events: mpsc::UnboundedSender<Event>,
}

/// A job and when it was queued.
type Queued = (Job, Instant);

/// What the engine reports as it runs: its `/metrics` figures, and what heartbeats carry.
#[derive(Debug)]
pub struct EngineStats {
    /// Every metric `/metrics` exports.
    pub metrics: WorkerMetrics,
    /// Decode speed of the last finished job, tokens per second ×1000: the heartbeat's
    /// `tokens_per_second`, the router's view of this worker (not a metric).
    pub last_tps_milli: AtomicU64,
    /// Fault injection (slow hardware): the engine sleeps this long before each token it
    /// produces, holding its slot. 0 = off; set only through the worker's `/admin/faults`.
    pub fault_token_delay_ms: AtomicU32,
}

impl EngineStats {
    pub fn new() -> prometheus::Result<Self> {
        Ok(Self {
            metrics: WorkerMetrics::new()?,
            last_tps_milli: AtomicU64::new(0),
            fault_token_delay_ms: AtomicU32::new(0),
        })
    }

    /// Requests waiting for the engine.
    pub fn queued(&self) -> usize {
        usize::try_from(self.metrics.queue_depth.get()).unwrap_or(0)
    }

    /// Requests being generated.
    pub fn in_flight(&self) -> usize {
        usize::try_from(self.metrics.in_flight.get()).unwrap_or(0)
    }
}

/// Which backend produces tokens.
pub enum Backend {
    /// candle on a device; a Hugging Face checkpoint's weights held as [`Quantize`] says.
    Real(Device, Quantize),
    /// No weights: streams filler tokens at the profile's pace. For capacity drills, fleet
    /// tests far beyond this machine, and pools this machine has no hardware for.
    Sim(SimProfile),
}

/// Handle to the engine actor.
#[derive(Clone)]
pub struct Engine {
    pub model: Arc<LoadedModel>,
    pub stats: Arc<EngineStats>,
    queue: std::sync::mpsc::SyncSender<Queued>,
}

impl Engine {
    /// Loads a model (a GGUF file, or a Hugging Face directory of safetensors) and starts
    /// the actor thread. `queue_capacity` bounds waiting jobs; `prefix_cache_bytes` bounds
    /// the keys and values kept for reuse by later prompts (0: none kept).
    pub fn load(
        path: &Path,
        tokenizer_json: Option<&Path>,
        name: String,
        backend: Backend,
        queue_capacity: usize,
        max_batch: usize,
        prefix_cache_bytes: usize,
    ) -> Result<Self, WorkerError> {
        let (device, quantize, sim) = match backend {
            Backend::Real(d, q) => (d, q, None),
            Backend::Sim(p) => (Device::Cpu, Quantize::None, Some(p)),
        };
        let (model, weights) = load::open_model(
            path,
            tokenizer_json,
            name,
            sim.is_none().then_some(&device),
            quantize,
        )?;
        let model = Arc::new(model);
        let stats = Arc::new(EngineStats::new().map_err(|e| WorkerError::Engine(e.to_string()))?);
        let (queue, rx) = std::sync::mpsc::sync_channel::<Queued>(queue_capacity);
        let spawned = match (weights, sim) {
            (Some(weights), _) => {
                let actor = Actor {
                    weights,
                    model: Arc::clone(&model),
                    stats: Arc::clone(&stats),
                    max_batch: max_batch.max(1),
                    prefix: prefix::PrefixCache::new(prefix_cache_bytes),
                };
                // The engine loop runs on a worker of the thread pool its products use, so
                // each parallel product starts on this thread at once instead of waking
                // the pool and sleeping until it finishes.
                let pool = rayon::ThreadPoolBuilder::new()
                    .thread_name(|i| format!("engine-{i}"))
                    .build()
                    .map_err(|e| WorkerError::Model(format!("cannot start engine threads: {e}")))?;
                std::thread::Builder::new()
                    .name("engine".into())
                    .spawn(move || pool.install(move || actor.run(rx)))
            }
            (None, profile) => {
                let profile = profile.unwrap_or(SimProfile {
                    ttft: std::time::Duration::ZERO,
                    tokens_per_s: 100.0,
                    prefill_tokens_per_s: 0.0,
                    kv_bytes_per_token: SimProfile::KV_BYTES_70B,
                });
                let stats = Arc::clone(&stats);
                let max_context = model.max_context;
                let costs = sim::word_costs(&model.tokenizer);
                std::thread::Builder::new()
                    .name("sim-engine".into())
                    .spawn(move || {
                        run_sim(
                            rx,
                            profile,
                            stats,
                            max_context,
                            costs,
                            max_batch,
                            prefix_cache_bytes,
                        )
                    })
            }
        };
        spawned.map_err(|e| WorkerError::Model(format!("cannot start engine thread: {e}")))?;
        Ok(Self {
            model,
            stats,
            queue,
        })
    }

    /// Queues a job; `Err(QueueFull)` when the bounded queue is full.
    pub fn submit(&self, job: Job) -> Result<(), WorkerError> {
        self.stats.metrics.queue_depth.inc();
        self.queue.try_send((job, Instant::now())).map_err(|e| {
            self.stats.metrics.queue_depth.dec();
            match e {
                std::sync::mpsc::TrySendError::Full(_) => WorkerError::QueueFull,
                std::sync::mpsc::TrySendError::Disconnected(_) => {
                    WorkerError::Engine("engine stopped".into())
                }
            }
        })
    }

    /// Runs a one-token generation so the first real request does not pay for lazy setup.
    pub async fn warm_up(&self) -> Result<(), WorkerError> {
        let prompt = self.model.tokenize(Prompt::Text("Hello".into()))?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let params = GenParams {
            max_tokens: 1,
            temperature: None,
            top_p: None,
            seed: 0,
            stop: vec![],
            ignore_eos: false,
            continues_words: 0,
            replay_tokens: 0,
        };
        self.submit(Job {
            prompt,
            params,
            events: tx,
        })?;
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Text(_) => {}
                Event::Done(_) => return Ok(()),
                Event::Failed(e) => return Err(WorkerError::Engine(e)),
            }
        }
        Err(WorkerError::Engine("engine stopped during warm-up".into()))
    }
}
