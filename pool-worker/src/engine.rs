//! The inference engine: one scheduler thread owns the model and runs continuous batching.
//!
//! Requests arrive on a bounded queue (full → the HTTP layer answers 429); each carries its
//! own event channel. Every scheduler step is one batched forward pass ([`Llama::forward`])
//! over all running sequences — each decoding sequence contributes its last token, and at
//! most one sequence contributes a chunk of its prompt (512 tokens while others decode,
//! 2048 on CPU when it runs alone) — and new requests join at the next step, up to
//! `max_batch` sequences. The first event of a job is sent only after its
//! prefill succeeded and its first token was sampled — the commit point the router's
//! failover relies on.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use candle_core::Device;
use candle_core::quantized::gguf_file;
use candle_transformers::generation::LogitsProcessor;
use model_meta::{ChatTemplate, GgufInfo, HfModel, Tokenizer};
use tokio::sync::mpsc;

use crate::error::WorkerError;
use crate::llama::{Item, KvCache, Llama};

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
    /// "stop" or "length".
    #[serde(skip)]
    pub finish_length: bool,
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

/// Live counters the heartbeat and `/metrics` report.
#[derive(Debug)]
pub struct EngineStats {
    pub queued: AtomicUsize,
    pub in_flight: AtomicUsize,
    pub tokens_generated: AtomicU64,
    /// Tokens per second of the last finished job, ×1000.
    pub last_tps_milli: AtomicU64,
    /// Sequences in the last batched step.
    pub batch_size: AtomicUsize,
    /// Tokens held in the running sequences' KV caches.
    pub kv_tokens: AtomicUsize,
    /// Time to first token of the last started job, in microseconds.
    pub last_ttft_us: AtomicU64,
    /// Fault injection (slow hardware): the engine sleeps this long before each token it
    /// produces, holding its slot. 0 = off; set only through the worker's `/admin/faults`.
    pub fault_token_delay_ms: AtomicU32,
    /// Time from queueing to the first token (queue wait + prefill), seconds.
    pub ttft: prometheus::Histogram,
    /// Time a request waited in the queue for a batch slot, seconds.
    pub queue_wait: prometheus::Histogram,
}

impl EngineStats {
    pub fn new() -> prometheus::Result<Self> {
        let buckets = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ];
        Ok(Self {
            queued: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            tokens_generated: AtomicU64::new(0),
            last_tps_milli: AtomicU64::new(0),
            batch_size: AtomicUsize::new(0),
            kv_tokens: AtomicUsize::new(0),
            last_ttft_us: AtomicU64::new(0),
            fault_token_delay_ms: AtomicU32::new(0),
            ttft: prometheus::Histogram::with_opts(
                prometheus::HistogramOpts::new(
                    "switchyard_worker_ttft_seconds",
                    "Time from queueing a request to its first token (queue wait and prefill).",
                )
                .buckets(buckets.clone()),
            )?,
            queue_wait: prometheus::Histogram::with_opts(
                prometheus::HistogramOpts::new(
                    "switchyard_worker_queue_wait_seconds",
                    "Time a request waited for a batch slot.",
                )
                .buckets(buckets),
            )?,
        })
    }
}

/// A loaded model: tokenizer, template and limits. The weights live in the actor thread.
pub struct LoadedModel {
    pub name: String,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub eos: Vec<u32>,
    pub max_context: usize,
    /// Input modalities accepted: "text", and for the simulated backend "image", "audio".
    pub modalities: Vec<String>,
    /// Tokens come from the simulated-hardware backend, not the model.
    pub simulated: bool,
}

/// How the simulated-hardware backend behaves: time to first token and decode speed per
/// stream, as a hardware class would (e.g. an H100 serving a 70B model).
#[derive(Debug, Clone, Copy)]
pub struct SimProfile {
    pub ttft: std::time::Duration,
    pub tokens_per_s: f64,
}

/// Parses a device name: `cpu`, `cuda` or `cuda:N` (CUDA needs the `cuda` cargo feature).
pub fn parse_device(spec: &str) -> Result<Device, WorkerError> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map_err(|_| WorkerError::Model(format!("bad cuda ordinal in `{s}`")))?,
                None => 0,
            };
            Device::new_cuda(n).map_err(|e| {
                WorkerError::Model(format!(
                    "CUDA device {n}: {e} (the worker must be built with --features cuda)"
                ))
            })
        }
        other => Err(WorkerError::Model(format!(
            "unknown device `{other}` (cpu, cuda, cuda:N)"
        ))),
    }
}

/// What a model's files give the engine, whichever format they are in.
struct ModelParts {
    tokenizer: Tokenizer,
    chat_template: Option<String>,
    bos_token: String,
    eos_token: String,
    /// Token ids that end generation, from the model's metadata.
    eos: Vec<u32>,
    context_length: usize,
    /// `None` when no weights were asked for (the simulated backend).
    weights: Option<Llama>,
}

/// Reads a GGUF file or a Hugging Face model directory (`config.json` + safetensors; a
/// `.safetensors` path names its directory). `tokenizer_json` overrides the model's own
/// tokenizer. Weights are loaded onto `device` when one is given; `quantize` applies to a
/// Hugging Face checkpoint (a GGUF file's weights are already quantized as stored).
fn read_model(
    path: &Path,
    tokenizer_json: Option<&Path>,
    device: Option<&Device>,
    quantize: Quantize,
) -> Result<ModelParts, WorkerError> {
    let load_err = |e: candle_core::Error| WorkerError::Model(format!("{}: {e}", path.display()));
    let meta_err = |e: model_meta::MetaError| WorkerError::Model(e.to_string());
    let json = |p: &Path| {
        model_meta::load_tokenizer(&model_meta::TokenizerSource::Json(p.to_path_buf()))
            .map_err(meta_err)
    };
    if model_meta::is_hf_model(path) {
        let hf = HfModel::open(path).map_err(meta_err)?;
        let tokenizer = json(tokenizer_json.unwrap_or(&hf.tokenizer_path()))?;
        let weights = device
            .map(|d| Llama::from_safetensors(&hf, d, quantize == Quantize::Q8_0).map_err(load_err))
            .transpose()?;
        return Ok(ModelParts {
            tokenizer,
            bos_token: hf.bos_token.clone().unwrap_or_default(),
            eos_token: hf.eos_token.clone().unwrap_or_default(),
            eos: hf.eos_token_ids.clone(),
            context_length: hf.config.max_position_embeddings,
            chat_template: hf.chat_template,
            weights,
        });
    }
    if quantize != Quantize::None {
        return Err(WorkerError::Model(format!(
            "{}: --quantize is for Hugging Face checkpoints; a GGUF file's weights are used as stored",
            path.display()
        )));
    }
    let mut file = std::fs::File::open(path)
        .map_err(|e| WorkerError::Model(format!("{}: {e}", path.display())))?;
    let content = gguf_file::Content::read(&mut file).map_err(load_err)?;
    let info = GgufInfo::from_content(&content).map_err(meta_err)?;
    let tokenizer = match tokenizer_json {
        Some(p) => json(p)?,
        None => model_meta::tokenizer_from_gguf(&content).map_err(meta_err)?,
    };
    let token_text = |id: Option<u32>| {
        id.and_then(|i| tokenizer.id_to_token(i))
            .unwrap_or_default()
    };
    let (bos_token, eos_token) = (token_text(info.bos_token_id), token_text(info.eos_token_id));
    let weights = device
        .map(|d| Llama::from_gguf(&content, &mut file, d).map_err(load_err))
        .transpose()?;
    Ok(ModelParts {
        tokenizer,
        chat_template: info.chat_template,
        bos_token,
        eos_token,
        eos: info.eos_token_id.into_iter().collect(),
        context_length: info.context_length,
        weights,
    })
}

/// How a Hugging Face checkpoint's weights are held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Quantize {
    /// As f32 (GGUF weights always stay as stored).
    #[default]
    None,
    /// CPU only: the projection and output matrices as 8-bit blocks (GGUF's Q8_0 with f32
    /// scales): a quarter of their f32 memory, and the batched 8-bit decode product.
    Q8_0,
}

impl std::str::FromStr for Quantize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "q8_0" => Ok(Self::Q8_0),
            other => Err(format!("unknown quantization `{other}` (none, q8_0)")),
        }
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
    /// the actor thread. `queue_capacity` bounds waiting jobs.
    pub fn load(
        path: &Path,
        tokenizer_json: Option<&Path>,
        name: String,
        backend: Backend,
        queue_capacity: usize,
        max_batch: usize,
    ) -> Result<Self, WorkerError> {
        let (device, quantize, sim) = match backend {
            Backend::Real(d, q) => (d, q, None),
            Backend::Sim(p) => (Device::Cpu, Quantize::None, Some(p)),
        };
        let parts = read_model(
            path,
            tokenizer_json,
            sim.is_none().then_some(&device),
            quantize,
        )?;
        let tokenizer = parts.tokenizer;
        let template = ChatTemplate::new(
            parts.chat_template.as_deref(),
            parts.bos_token,
            parts.eos_token.clone(),
        )
        .map_err(|e| WorkerError::Model(e.to_string()))?;
        let mut eos = parts.eos;
        for t in [
            parts.eos_token.as_str(),
            "<|im_end|>",
            "<|endoftext|>",
            "<|eot_id|>",
            "</s>",
        ] {
            if let Some(id) = tokenizer.token_to_id(t)
                && !eos.contains(&id)
            {
                eos.push(id);
            }
        }
        let weights = parts.weights;
        let info_context = parts.context_length;
        let model = Arc::new(LoadedModel {
            name,
            tokenizer,
            template,
            eos,
            max_context: weights
                .as_ref()
                .map_or(info_context, |w| w.cfg.context_length),
            modalities: if sim.is_some() {
                vec!["text".into(), "image".into(), "audio".into()]
            } else {
                vec!["text".into()]
            },
            simulated: sim.is_some(),
        });
        let stats = Arc::new(EngineStats::new().map_err(|e| WorkerError::Engine(e.to_string()))?);
        let (queue, rx) = std::sync::mpsc::sync_channel::<Queued>(queue_capacity);
        let spawned = match (weights, sim) {
            (Some(weights), _) => {
                let actor = Actor {
                    weights,
                    model: Arc::clone(&model),
                    stats: Arc::clone(&stats),
                    max_batch: max_batch.max(1),
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
                });
                let stats = Arc::clone(&stats);
                std::thread::Builder::new()
                    .name("sim-engine".into())
                    .spawn(move || run_sim(rx, profile, stats))
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
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        self.queue.try_send((job, Instant::now())).map_err(|e| {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
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
        let prompt = self
            .model
            .tokenizer
            .encode("Hello", false)
            .map_err(|e| WorkerError::Engine(e.to_string()))?
            .get_ids()
            .to_vec();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let params = GenParams {
            max_tokens: 1,
            temperature: None,
            top_p: None,
            seed: 0,
            stop: vec![],
            ignore_eos: false,
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

/// The simulated backend: every job streams on its own thread at the profile's pace, so the
/// worker behaves like hardware with many concurrent streams.
fn run_sim(rx: std::sync::mpsc::Receiver<Queued>, profile: SimProfile, stats: Arc<EngineStats>) {
    const WORDS: [&str; 8] = [
        "simulated ",
        "tokens ",
        "from ",
        "the ",
        "sim ",
        "backend ",
        "of ",
        "switchyard. ",
    ];
    while let Ok((job, queued_at)) = rx.recv() {
        stats.queued.fetch_sub(1, Ordering::Relaxed);
        stats.queue_wait.observe(queued_at.elapsed().as_secs_f64());
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let stats = Arc::clone(&stats);
        let spawned = std::thread::Builder::new()
            .name("sim-stream".into())
            .spawn(move || {
                std::thread::sleep(profile.ttft);
                stats.ttft.observe(queued_at.elapsed().as_secs_f64());
                let per_token =
                    std::time::Duration::from_secs_f64(1.0 / profile.tokens_per_s.max(0.001));
                let mut n = 0;
                for i in 0..job.params.max_tokens {
                    if i > 0 {
                        std::thread::sleep(per_token);
                    }
                    if job
                        .events
                        .send(Event::Text(WORDS[i % WORDS.len()].to_string()))
                        .is_err()
                    {
                        break;
                    }
                    n += 1;
                }
                stats
                    .tokens_generated
                    .fetch_add(n as u64, Ordering::Relaxed);
                let _ = job.events.send(Event::Done(Usage {
                    prompt_tokens: job.prompt.len(),
                    completion_tokens: n,
                    total_tokens: job.prompt.len() + n,
                    finish_length: true,
                }));
                stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            });
        if spawned.is_err() {
            tracing::error!("sim backend: cannot start a stream thread");
        }
    }
}

/// Prompt tokens one sequence may prefill in a step shared with decoding sequences: bounds
/// the step's time, so running streams keep getting tokens during long prefills.
const PREFILL_CHUNK: usize = 512;

/// Prompt tokens one sequence may prefill in a step of its own on CPU (no sequence is
/// decoding, so no one waits on the step). Fewer, larger chunks dequantize each weight
/// matrix fewer times: `worker-bench` prefills 1k and 2k prompts about 9% faster than in
/// 512-token chunks, for ~55 MiB more peak memory at 2k. (On GPUs the causal mask is a
/// host-built (chunk × context) tensor, so chunks stay 512 there.)
const PREFILL_CHUNK_ALONE: usize = 2048;

struct Actor {
    weights: Llama,
    model: Arc<LoadedModel>,
    stats: Arc<EngineStats>,
    max_batch: usize,
}

/// A running sequence.
struct Seq {
    events: mpsc::UnboundedSender<Event>,
    params: GenParams,
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    cache: KvCache,
    sampler: LogitsProcessor,
    generated: Vec<u32>,
    /// The text of `generated`, decoded incrementally.
    text: TextDecoder,
    /// Bytes of `text` already sent.
    sent_len: usize,
    budget: usize,
    started: Instant,
    queued_at: Instant,
}

impl Seq {
    fn prefilling(&self) -> bool {
        self.prefilled < self.prompt.len()
    }
}

/// Incremental detokenisation: `text` is the decoded text of `tokens[..read_offset]`. Each
/// new token decodes only the window from `prefix_offset` (a few tokens of context, so
/// word-initial spaces come out right) with and without the new tokens, and keeps the
/// difference — constant work per token instead of re-decoding everything generated. An
/// incomplete UTF-8 sequence (decoded as U+FFFD) waits for the token that completes it.
#[derive(Debug, Default)]
pub struct TextDecoder {
    text: String,
    prefix_offset: usize,
    read_offset: usize,
}

impl TextDecoder {
    /// `tokens` are all tokens so far; the last one is new.
    pub fn push(&mut self, tok: &Tokenizer, tokens: &[u32]) -> tokenizers::Result<()> {
        let prefix = tok.decode(&tokens[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode(&tokens[self.prefix_offset..], true)?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            self.text.push_str(&full[prefix.len()..]);
            self.prefix_offset = self.read_offset;
            self.read_offset = tokens.len();
        }
        Ok(())
    }

    /// Takes in whatever is still pending (an incomplete UTF-8 sequence stays U+FFFD).
    pub fn finish(&mut self, tok: &Tokenizer, tokens: &[u32]) -> tokenizers::Result<()> {
        if self.read_offset < tokens.len() {
            let prefix = tok.decode(&tokens[self.prefix_offset..self.read_offset], true)?;
            let full = tok.decode(&tokens[self.prefix_offset..], true)?;
            let mut at = prefix.len().min(full.len());
            while !full.is_char_boundary(at) {
                at -= 1;
            }
            self.text.push_str(&full[at..]);
            self.prefix_offset = tokens.len();
            self.read_offset = tokens.len();
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Bytes at the end of `text` that could be the start of one of `stops`.
fn partial_stop_len(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .filter_map(|s| {
            (1..s.len())
                .rev()
                .filter(|&k| s.is_char_boundary(k))
                .find(|&k| text.ends_with(&s[..k]))
        })
        .max()
        .unwrap_or(0)
}

/// What happened to a sequence after a token.
enum Next {
    Continue,
    Finished {
        finish_length: bool,
    },
    /// The client went away: stop without a final event.
    Gone,
}

impl Actor {
    fn run(mut self, rx: std::sync::mpsc::Receiver<Queued>) {
        let mut running: Vec<Seq> = Vec::new();
        loop {
            if running.is_empty() {
                match rx.recv() {
                    Ok((job, at)) => self.admit(job, at, &mut running),
                    Err(_) => return,
                }
            }
            while running.len() < self.max_batch {
                match rx.try_recv() {
                    Ok((job, at)) => self.admit(job, at, &mut running),
                    Err(_) => break,
                }
            }
            running.retain(|seq| {
                let open = !seq.events.is_closed();
                if !open {
                    self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
                }
                open
            });
            if running.is_empty() {
                continue;
            }
            let delay = self.stats.fault_token_delay_ms.load(Ordering::Relaxed);
            if delay > 0 {
                std::thread::sleep(std::time::Duration::from_millis(u64::from(delay)));
            }
            self.step(&mut running);
            self.stats.kv_tokens.store(
                running.iter().map(|s| s.cache.len()).sum(),
                Ordering::Relaxed,
            );
        }
    }

    fn admit(&self, job: Job, queued_at: Instant, running: &mut Vec<Seq>) {
        self.stats.queued.fetch_sub(1, Ordering::Relaxed);
        self.stats
            .queue_wait
            .observe(queued_at.elapsed().as_secs_f64());
        if job.events.is_closed() {
            return; // client went away while queued
        }
        if job.prompt.is_empty() {
            let _ = job.events.send(Event::Failed("empty prompt".into()));
            return;
        }
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let budget = job
            .params
            .max_tokens
            .min(self.model.max_context.saturating_sub(job.prompt.len()));
        running.push(Seq {
            sampler: LogitsProcessor::new(
                job.params.seed,
                job.params.temperature,
                job.params.top_p,
            ),
            events: job.events,
            prompt: job.prompt,
            prefilled: 0,
            cache: self.weights.new_cache(),
            generated: Vec::with_capacity(budget),
            text: TextDecoder::default(),
            sent_len: 0,
            budget,
            params: job.params,
            started: Instant::now(),
            queued_at,
        });
    }

    /// One batched forward pass over the running sequences, then one token for each
    /// sequence whose prompt is complete.
    fn step(&mut self, running: &mut Vec<Seq>) {
        // Every decoding sequence, and at most one prompt chunk; in `running` order, which
        // is the order of the logits' rows.
        let mut chosen: Vec<usize> = (0..running.len())
            .filter(|&i| !running[i].prefilling())
            .collect();
        let chunk = match chosen.is_empty() && self.weights.device().is_cpu() {
            true => PREFILL_CHUNK_ALONE,
            false => PREFILL_CHUNK,
        };
        if let Some(i) = (0..running.len()).find(|&i| running[i].prefilling()) {
            chosen.push(i);
            chosen.sort_unstable();
        }
        self.stats.batch_size.store(chosen.len(), Ordering::Relaxed);
        let logits = {
            let mut items: Vec<Item<'_>> = running
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| chosen.contains(i))
                .map(|(_, seq)| {
                    let tokens: &[u32] = if seq.prefilling() {
                        let end = (seq.prefilled + chunk).min(seq.prompt.len());
                        &seq.prompt[seq.prefilled..end]
                    } else {
                        match seq.generated.last() {
                            Some(t) => std::slice::from_ref(t),
                            None => &seq.prompt[seq.prompt.len() - 1..],
                        }
                    };
                    Item {
                        tokens,
                        cache: &mut seq.cache,
                    }
                })
                .collect();
            self.weights
                .forward(&mut items)
                .and_then(|l| l.to_device(&Device::Cpu))
        };
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("batched forward failed: {e}");
                for &i in chosen.iter().rev() {
                    let seq = running.swap_remove(i);
                    let _ = seq.events.send(Event::Failed(e.to_string()));
                    self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
                }
                return;
            }
        };
        let mut done: Vec<usize> = Vec::new();
        for (row, &i) in chosen.iter().enumerate() {
            let seq = &mut running[i];
            if seq.prefilling() {
                let end = (seq.prefilled + chunk).min(seq.prompt.len());
                seq.prefilled = end;
                if seq.prefilling() {
                    continue; // more prompt to go; these logits are not needed
                }
                self.stats
                    .last_ttft_us
                    .store(seq.started.elapsed().as_micros() as u64, Ordering::Relaxed);
                self.stats
                    .ttft
                    .observe(seq.queued_at.elapsed().as_secs_f64());
                if seq.budget == 0 {
                    self.finish(seq, false);
                    done.push(i);
                    continue;
                }
            }
            let next = logits
                .get(row)
                .and_then(|l| seq.sampler.sample(&l))
                .map_err(|e| e.to_string())
                .map(|t| self.accept(seq, t));
            match next {
                Ok(Next::Continue) => {}
                Ok(Next::Finished { finish_length }) => {
                    self.finish(seq, finish_length);
                    done.push(i);
                }
                Ok(Next::Gone) => done.push(i),
                Err(e) => {
                    let _ = seq.events.send(Event::Failed(e));
                    done.push(i);
                }
            }
        }
        done.sort_unstable();
        for i in done.into_iter().rev() {
            running.swap_remove(i);
            self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Takes a sampled token: streams its text and says whether the sequence goes on.
    fn accept(&self, seq: &mut Seq, token: u32) -> Next {
        if !seq.params.ignore_eos && self.model.eos.contains(&token) {
            return self.flush(seq, false);
        }
        seq.generated.push(token);
        if let Err(e) = seq.text.push(&self.model.tokenizer, &seq.generated) {
            let _ = seq.events.send(Event::Failed(e.to_string()));
            return Next::Gone;
        }
        // Stop sequences: cut the text at the first one and finish. Only the text a new
        // stop could end in is searched: what was not sent yet, plus the longest stop's
        // length before it. Text that may be the start of a stop is held back until the
        // next tokens show whether it is one: a client never sees part of a stop sequence.
        let stops = &seq.params.stop;
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        let text = seq.text.as_str();
        let mut from = seq.sent_len.saturating_sub(longest);
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        let stop_at = stops
            .iter()
            .filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        let visible_end = stop_at.unwrap_or_else(|| text.len() - partial_stop_len(text, stops));
        if !self.send_text(seq, visible_end) {
            return Next::Gone;
        }
        if stop_at.is_some() {
            return Next::Finished {
                finish_length: false,
            };
        }
        if seq.generated.len() >= seq.budget {
            return self.flush(seq, true);
        }
        Next::Continue
    }

    /// Sends `seq`'s text up to byte `end` (what was not sent yet); false when the client
    /// is gone.
    fn send_text(&self, seq: &mut Seq, end: usize) -> bool {
        if end <= seq.sent_len {
            return true;
        }
        let piece = seq.text.as_str()[seq.sent_len..end].to_string();
        seq.sent_len = end;
        seq.events.send(Event::Text(piece)).is_ok()
    }

    /// The sequence ends without a stop sequence: what was held back (a possible start of
    /// a stop, an incomplete UTF-8 sequence) is sent as it is.
    fn flush(&self, seq: &mut Seq, finish_length: bool) -> Next {
        if let Err(e) = seq.text.finish(&self.model.tokenizer, &seq.generated) {
            let _ = seq.events.send(Event::Failed(e.to_string()));
            return Next::Gone;
        }
        let end = seq.text.as_str().len();
        if !self.send_text(seq, end) {
            return Next::Gone;
        }
        Next::Finished { finish_length }
    }

    fn finish(&self, seq: &Seq, finish_length: bool) {
        let n = seq.generated.len();
        self.stats
            .tokens_generated
            .fetch_add(n as u64, Ordering::Relaxed);
        let secs = seq.started.elapsed().as_secs_f64().max(1e-6);
        self.stats
            .last_tps_milli
            .store((n as f64 / secs * 1000.0) as u64, Ordering::Relaxed);
        let _ = seq.events.send(Event::Done(Usage {
            prompt_tokens: seq.prompt.len(),
            completion_tokens: n,
            total_tokens: seq.prompt.len() + n,
            finish_length,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        let err = parse_device("cuda").err().map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(err.contains("--features cuda"), "{err}");
    }

    #[test]
    fn bad_device_names_are_refused_clearly() {
        let err = |s: &str| {
            parse_device(s)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(
            err("tpu").contains("unknown device `tpu`"),
            "{}",
            err("tpu")
        );
        assert!(
            err("cuda:x").contains("bad cuda ordinal"),
            "{}",
            err("cuda:x")
        );
        assert!(parse_device("cpu").is_ok());
    }

    /// `--quantize` parses its two names, and a GGUF file (already quantized as stored)
    /// refuses it by name instead of ignoring it.
    #[test]
    fn quantize_applies_to_hugging_face_checkpoints_only() {
        assert_eq!("q8_0".parse::<Quantize>(), Ok(Quantize::Q8_0));
        assert_eq!("none".parse::<Quantize>(), Ok(Quantize::None));
        assert!(
            "q4".parse::<Quantize>()
                .unwrap_err()
                .contains("(none, q8_0)")
        );
        let dir = std::env::temp_dir().join(format!("engine-quantize-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.gguf");
        model_meta::tiny::write_tiny_llama(&path, 256).unwrap();
        let err = read_model(&path, None, Some(&Device::Cpu), Quantize::Q8_0)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("--quantize is for Hugging Face checkpoints"),
            "{err}"
        );
        assert!(read_model(&path, None, Some(&Device::Cpu), Quantize::None).is_ok());
        // a Hugging Face checkpoint takes it
        let hf = dir.join("hf");
        let opts = model_meta::tiny::HfOptions {
            arch: model_meta::tiny::HfArch::Llama,
            tie_embeddings: true,
            llama3_rope: false,
            context_length: 256,
            rope_theta: 10_000.0,
        };
        model_meta::tiny::write_random_hf(&hf, &model_meta::tiny::LlamaShape::TINY, &opts).unwrap();
        assert!(read_model(&hf, None, Some(&Device::Cpu), Quantize::Q8_0).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A CPU engine over a random model of `shape`, in a fresh directory (returned, for
    /// removal at the end of the test).
    fn engine_for(
        name: &str,
        shape: &model_meta::tiny::LlamaShape,
    ) -> (std::path::PathBuf, Engine) {
        let dir = std::env::temp_dir().join(format!("engine-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.gguf");
        model_meta::tiny::write_random_llama(&path, shape, 2048).unwrap();
        let engine = Engine::load(
            &path,
            None,
            name.into(),
            Backend::Real(Device::Cpu, Quantize::None),
            8,
            4,
        )
        .unwrap();
        (dir, engine)
    }

    /// A job that generates exactly `max_tokens` tokens (end-of-sequence ignored).
    fn job(
        prompt: std::ops::Range<u32>,
        max_tokens: usize,
        temperature: Option<f64>,
        seed: u64,
        events: mpsc::UnboundedSender<Event>,
    ) -> Job {
        Job {
            prompt: prompt.collect(),
            params: GenParams {
                max_tokens,
                temperature,
                top_p: None,
                seed,
                stop: vec![],
                ignore_eos: true,
            },
            events,
        }
    }

    /// Token by token, the incremental text equals decoding the whole sequence at once —
    /// spaces, accents, CJK and emoji split over byte tokens included (SmolLM2's real
    /// tokenizer; skipped where the model file is absent).
    #[test]
    fn incremental_text_equals_the_whole_decode() {
        let Some(path) = model_meta::workspace_smollm2() else {
            eprintln!("SKIPPED: SmolLM2 GGUF not found (run scripts/fetch-model.sh)");
            return;
        };
        let content = model_meta::read_gguf(&path).unwrap();
        let tok = model_meta::tokenizer_from_gguf(&content).unwrap();
        let text = "Héllo wörld —  東京は 🚀🦀 done.\n\n  indented  `code` 123,456";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        let mut d = TextDecoder::default();
        let mut seen = Vec::new();
        for n in 1..=ids.len() {
            d.push(&tok, &ids[..n]).unwrap();
            assert!(!d.as_str().contains('\u{FFFD}'), "{:?}", d.as_str());
            seen.push(d.as_str().len());
        }
        assert_eq!(d.as_str(), tok.decode(&ids, true).unwrap());
        assert_eq!(d.as_str(), text);
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "text only grows");
    }

    /// Runs a job to the end: (streamed text, usage).
    async fn run_job(engine: &Engine, mut j: Job) -> (String, Usage) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        j.events = tx;
        engine.submit(j).unwrap();
        let mut text = String::new();
        loop {
            match rx.recv().await.unwrap() {
                Event::Text(t) => text.push_str(&t),
                Event::Done(u) => return (text, u),
                Event::Failed(e) => panic!("{e}"),
            }
        }
    }

    /// A stop sequence cuts the text just before its first occurrence and finishes with
    /// "stop" — also when it spans token boundaries (greedy decoding repeats the same text).
    #[tokio::test]
    async fn stop_sequences_cut_the_text_before_their_first_occurrence() {
        let (dir, engine) = engine_for("stop", &model_meta::tiny::LlamaShape::TINY);
        let (unused, _) = mpsc::unbounded_channel();
        let (full, usage) = run_job(&engine, job(10..30, 40, None, 0, unused.clone())).await;
        assert!(usage.finish_length && full.chars().count() > 12, "{full:?}");
        // a stop string from the middle of the text
        let start = full.char_indices().nth(8).unwrap().0;
        let end = full.char_indices().nth(11).unwrap().0;
        let stop = full[start..end].to_string();
        let mut j = job(10..30, 40, None, 0, unused);
        j.params.stop = vec![stop.clone()];
        let (cut, usage) = run_job(&engine, j).await;
        assert_eq!(cut, full[..full.find(&stop).unwrap()], "stop {stop:?}");
        assert!(!usage.finish_length, "finished by the stop sequence");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A Q4_1 model (the real pools' weight type) runs through the engine, and
    /// `ignore_eos` makes a stream produce exactly `max_tokens` tokens.
    #[tokio::test]
    async fn quantized_model_generates_exactly_max_tokens_when_eos_is_ignored() {
        let shape = model_meta::tiny::LlamaShape::small(candle_core::quantized::GgmlDType::Q4_1);
        let (dir, engine) = engine_for("q41", &shape);
        let (tx, mut rx) = mpsc::unbounded_channel();
        engine.submit(job(10..40, 9, None, 1, tx)).unwrap();
        let usage = loop {
            match rx.recv().await.unwrap() {
                Event::Text(_) => {}
                Event::Done(u) => break u,
                Event::Failed(e) => panic!("{e}"),
            }
        };
        assert_eq!(usage.completion_tokens, 9);
        assert_eq!(usage.prompt_tokens, 30);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Continuous batching: requests submitted together run in the same steps — every one
    /// has its first token before any of them finishes (one at a time, the first would
    /// finish before the second started).
    #[tokio::test]
    async fn concurrent_requests_share_the_batch() {
        let (dir, engine) = engine_for("batch", &model_meta::tiny::LlamaShape::TINY);
        let mut receivers = Vec::new();
        for seed in 0..3u64 {
            let (tx, rx) = mpsc::unbounded_channel();
            engine
                .submit(job(10..30, 200, Some(1.0), seed, tx))
                .unwrap();
            receivers.push(rx);
        }
        let mut firsts = Vec::new();
        let mut dones = Vec::new();
        let timings = futures::future::join_all(receivers.into_iter().map(|mut rx| async move {
            let mut first = None;
            loop {
                match rx.recv().await.unwrap() {
                    Event::Text(_) => {
                        first.get_or_insert_with(Instant::now);
                    }
                    Event::Done(u) => return (first.unwrap(), Instant::now(), u),
                    Event::Failed(e) => panic!("{e}"),
                }
            }
        }))
        .await;
        for (first, done, usage) in timings {
            assert_eq!(usage.completion_tokens, 200);
            firsts.push(first);
            dones.push(done);
        }
        let last_first = firsts.iter().max().unwrap();
        let first_done = dones.iter().min().unwrap();
        assert!(
            last_first < first_done,
            "a request finished before another had started"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A long prompt prefilled alone (one 2048-token chunk on CPU) and the same prompt
    /// prefilled while another stream decodes (512-token chunks) give the same greedy
    /// tokens: every prompt token enters the cache exactly once whatever the chunking.
    #[tokio::test]
    async fn prompt_chunking_does_not_change_the_tokens() {
        let (dir, engine) = engine_for("chunks", &model_meta::tiny::LlamaShape::TINY);
        let long = |events| Job {
            prompt: (0..2000u32).map(|i| (i * 7 + 3) % 200 + 10).collect(),
            ..job(0..0, 8, None, 0, events)
        };
        let tokens = |mut rx: mpsc::UnboundedReceiver<Event>| async move {
            let mut text = String::new();
            loop {
                match rx.recv().await.unwrap() {
                    Event::Text(t) => text.push_str(&t),
                    Event::Done(u) => return (text, u.prompt_tokens, u.completion_tokens),
                    Event::Failed(e) => panic!("{e}"),
                }
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        engine.submit(long(tx)).unwrap();
        let alone = tokens(rx).await;
        // a stream that is decoding when the long prompt arrives
        let (busy_tx, mut busy_rx) = mpsc::unbounded_channel();
        engine.submit(job(10..30, 1000, None, 0, busy_tx)).unwrap();
        while !matches!(busy_rx.recv().await, Some(Event::Text(_))) {}
        let (tx, rx) = mpsc::unbounded_channel();
        engine.submit(long(tx)).unwrap();
        let shared = tokens(rx).await;
        assert_eq!((alone.1, alone.2), (2000, 8));
        assert_eq!(alone, shared);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A client that does not read its stream holds nothing up: the other sequence of the
    /// batch finishes.
    #[tokio::test]
    async fn a_client_that_stops_reading_does_not_stall_the_batch() {
        let (dir, engine) = engine_for("slow", &model_meta::tiny::LlamaShape::TINY);
        let (idle_tx, _idle_rx) = mpsc::unbounded_channel(); // never read
        engine.submit(job(10..30, 400, None, 0, idle_tx)).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        engine.submit(job(10..30, 400, None, 0, tx)).unwrap();
        let finished = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                match rx.recv().await {
                    Some(Event::Done(u)) => return u.completion_tokens,
                    Some(Event::Failed(e)) => panic!("{e}"),
                    Some(Event::Text(_)) => {}
                    None => panic!("engine stopped"),
                }
            }
        })
        .await
        .expect("the reading client's stream finished");
        assert_eq!(finished, 400);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
