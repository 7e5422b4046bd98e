//! `worker-bench`: the worker engine's throughput, measured the way a pool sees it.
//!
//! Loads a model into the real engine (the same code `switchyard-worker` serves with) on a
//! device and measures, through the engine's job queue:
//!
//! - prefill: time to the first token (TTFT) for prompts of the given lengths, and prompt
//!   tokens per second (best of `--rounds`, after one warm-up job);
//! - decode: N concurrent streams of `--decode-tokens` tokens each (end-of-sequence
//!   ignored, so every stream generates exactly that many): aggregate tokens per second and
//!   each stream's mean time per token after its first (both include the other streams'
//!   prefills), and the steady state: tokens per second and per-stream time per token
//!   while every stream is decoding (from the last first token to the first stream's end);
//! - prefix reuse (`--shared-prefix N`): a prompt of N shared tokens (a long system prompt)
//!   and a short question of its own, sent first once and then with other questions: the
//!   first TTFT (everything prefilled) against the later ones (the shared part restored
//!   from the prefix cache). Every other measurement's prompt starts differently, so no
//!   other figure includes a cache hit;
//! - load time and peak resident memory (VmHWM);
//! - on CPU, beside each prefill figure, the machine's f32 GEMM rate measured just before
//!   it (`machine_gemm_gflops`): prefill is bound by that product, and on a shared host it
//!   moves by a quarter between runs, so figures from different runs are compared through
//!   it.
//!
//! `--synthetic smollm2-135m` writes a random-weight model with SmolLM2-135M's exact shapes
//! and Q4_1 quantization instead of reading a file: the speed is the real model's, the text
//! is nonsense. Prints one JSON object to stdout (and a readable summary to stderr).
//!
//! ```text
//! worker-bench --model models/SmolLM2-135M-Instruct.Q4_1.gguf --prompts 512,2048 --streams 1,4,8
//! worker-bench --synthetic smollm2-135m --device cuda
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use pool_worker::engine::{Backend, Engine, Event, GenParams, Job, Quantize, parse_device};
use serde_json::json;
use tokio::sync::mpsc;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Measure the worker engine's prefill and decode throughput"
)]
struct Args {
    /// GGUF model file, or a Hugging Face model directory.
    #[arg(
        long,
        conflicts_with = "synthetic",
        required_unless_present = "synthetic"
    )]
    model: Option<PathBuf>,
    /// Write and load a random-weight model of a known shape: `smollm2-135m` or `tiny`.
    #[arg(long, value_parser = ["smollm2-135m", "tiny"])]
    synthetic: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// A Hugging Face checkpoint's weights: `none` (f32) or `q8_0` (8-bit blocks, CPU).
    #[arg(long, default_value = "none")]
    quantize: Quantize,
    /// Prompt lengths, in tokens, for the prefill measurement.
    #[arg(long, value_delimiter = ',', default_value = "512,2048")]
    prompts: Vec<usize>,
    /// Concurrent stream counts for the decode measurement.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    streams: Vec<usize>,
    /// Tokens each decode stream generates.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Prefill repetitions; the best is reported.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Shared prompt tokens for the prefix reuse measurement (0: skip it).
    #[arg(long, default_value_t = 2048)]
    shared_prefix: usize,
    /// The engine's prefix cache, MiB (as `switchyard-worker --prefix-cache-mib`).
    #[arg(long, default_value_t = 256)]
    prefix_cache_mib: usize,
}

/// What one job reported, with timestamps relative to `start` (its submission, or the
/// start of a group of concurrent jobs).
struct JobTiming {
    first: Option<Duration>,
    done: Duration,
    completion_tokens: usize,
    /// Text pieces streamed (one per token, but for partial UTF-8 held back).
    pieces: usize,
    /// When each piece arrived.
    stamps: Vec<Duration>,
}

async fn run_job(
    engine: &Engine,
    prompt: Vec<u32>,
    max_tokens: usize,
    start: Instant,
) -> anyhow::Result<JobTiming> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    engine.submit(Job {
        prompt,
        params: GenParams {
            max_tokens,
            temperature: None,
            top_p: None,
            seed: 7,
            stop: vec![],
            ignore_eos: true,
            continues_words: 0,
            replay_tokens: 0,
        },
        events: tx,
    })?;
    let mut pieces = 0;
    let mut stamps = Vec::with_capacity(max_tokens);
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(_) => {
                pieces += 1;
                stamps.push(start.elapsed());
            }
            Event::Done(usage) => {
                let done = start.elapsed();
                return Ok(JobTiming {
                    first: stamps.first().copied().or(Some(done)),
                    done,
                    completion_tokens: usage.completion_tokens,
                    pieces,
                    stamps,
                });
            }
            Event::Failed(e) => bail!("engine failed: {e}"),
        }
    }
    bail!("engine stopped")
}

/// Prompts made so far: each starts at another place in the text, so no two share a
/// prefix (the prefix cache must not serve one measurement from another's prompt).
static PROMPTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Prompt token ids of exactly `n` tokens: English text, tokenized, repeated, starting at
/// a place no earlier prompt started at.
fn prompt_of(engine: &Engine, n: usize) -> anyhow::Result<Vec<u32>> {
    const TEXT: &str = "The router classifies each request by its context length and modality \
        and sends it to the cheapest pool of hardware that can serve it, retrying on an \
        on-demand pool when a spot worker is preempted before the first token. ";
    let ids = engine
        .model
        .tokenizer
        .encode(TEXT, false)
        .map_err(|e| anyhow::anyhow!("tokenize: {e}"))?
        .get_ids()
        .to_vec();
    let skip = PROMPTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(ids.iter().copied().cycle().skip(skip).take(n).collect())
}

/// This machine's f32 GEMM rate right now, in GFLOP/s: the best of five candle products of
/// a prefill's shape (1024 rows × 576 → 1536, SmolLM2's gate/up). CPU prefill is bound by
/// this product, and a shared host's rate moves by a quarter between runs, so each prefill
/// figure is reported beside the rate measured just before it. `None` off CPU.
fn gemm_gflops(device: &candle_core::Device) -> anyhow::Result<Option<f64>> {
    if !device.is_cpu() {
        return Ok(None);
    }
    let (m, k, n) = (1024, 576, 1536);
    let a = candle_core::Tensor::randn(0f32, 1.0, (m, k), device)?;
    let b = candle_core::Tensor::randn(0f32, 1.0, (k, n), device)?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        std::hint::black_box(a.matmul(&b)?);
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(Some(2.0 * (m * k * n) as f64 / best / 1e9))
}

fn peak_rss_kib() -> Option<u64> {
    rss_kib("VmHWM:")
}

/// A line of `/proc/self/status` in KiB (`VmRSS:` resident now, `VmHWM:` the peak).
fn rss_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pool_worker::pin_cpu_thread_count();
    let args = Args::parse();
    let scratch = std::env::temp_dir().join(format!("worker-bench-{}", std::process::id()));
    let (path, label) = match (&args.model, args.synthetic.as_deref()) {
        (Some(p), _) => (p.clone(), p.display().to_string()),
        (None, Some(kind)) => {
            std::fs::create_dir_all(&scratch)?;
            let shape = match kind {
                "tiny" => model_meta::tiny::LlamaShape::TINY,
                _ => model_meta::tiny::LlamaShape::SMOLLM2_135M,
            };
            let p = scratch.join(format!("{kind}.gguf"));
            let t = Instant::now();
            model_meta::tiny::write_random_llama(&p, &shape, 8192)
                .context("write synthetic model")?;
            eprintln!(
                "wrote synthetic {kind} in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            (p, format!("synthetic {kind} (random weights, real shapes)"))
        }
        (None, None) => bail!("--model or --synthetic"),
    };
    let device = parse_device(&args.device)?;
    let t = Instant::now();
    let max_streams = args.streams.iter().copied().max().unwrap_or(1);
    let engine = Engine::load(
        &path,
        None,
        "bench".into(),
        Backend::Real(device.clone(), args.quantize),
        max_streams + 4,
        max_streams,
        args.prefix_cache_mib << 20,
    )?;
    engine.warm_up().await?;
    let load_s = t.elapsed().as_secs_f64();
    let (rss_loaded, peak_loaded) = (rss_kib("VmRSS:"), peak_rss_kib());
    eprintln!(
        "model: {label} on {}; load + warm-up {load_s:.2} s; resident then {} MiB (peak so far {} MiB)",
        args.device,
        rss_loaded.unwrap_or(0) / 1024,
        peak_loaded.unwrap_or(0) / 1024,
    );

    let mut prefill = Vec::new();
    for &n in &args.prompts {
        if n + 1 > engine.model.max_context {
            eprintln!(
                "prefill {n}: skipped (context window {})",
                engine.model.max_context
            );
            continue;
        }
        let gemm = gemm_gflops(&device)?;
        let mut best: Option<Duration> = None;
        for _ in 0..args.rounds.max(1) {
            let timing = run_job(&engine, prompt_of(&engine, n)?, 1, Instant::now()).await?;
            let ttft = timing.first.unwrap_or(timing.done);
            best = Some(best.map_or(ttft, |b| b.min(ttft)));
        }
        let ttft = best.unwrap_or_default().as_secs_f64();
        let machine = gemm.map_or(String::new(), |g| {
            format!(" (machine f32 GEMM {g:.0} GFLOP/s just before)")
        });
        eprintln!(
            "prefill {n:>5} tokens: TTFT {:8.1} ms = {:8.0} prompt tok/s{machine}",
            ttft * 1e3,
            n as f64 / ttft
        );
        prefill.push(json!({
            "prompt_tokens": n,
            "ttft_ms": ttft * 1e3,
            "prompt_tok_per_s": n as f64 / ttft,
            "machine_gemm_gflops": gemm,
        }));
    }

    let shared = match args.shared_prefix {
        0 => None,
        n if n + 64 > engine.model.max_context => {
            eprintln!(
                "prefix reuse {n}: skipped (context window {})",
                engine.model.max_context
            );
            None
        }
        n => {
            // a long system prompt, then each request's own 32-token question
            let system = prompt_of(&engine, n)?;
            let mut ttfts = Vec::new();
            for _ in 0..4 {
                let mut prompt = system.clone();
                prompt.extend(prompt_of(&engine, 32)?);
                let timing = run_job(&engine, prompt, 1, Instant::now()).await?;
                ttfts.push(timing.first.unwrap_or(timing.done).as_secs_f64());
            }
            let first = ttfts[0];
            let mut later = ttfts[1..].to_vec();
            later.sort_by(f64::total_cmp);
            let median = later[later.len() / 2];
            eprintln!(
                "prefix reuse: {n} shared + 32 own tokens: first TTFT {:.1} ms, later (median of {}) {:.1} ms: {:.1}x lower",
                first * 1e3,
                later.len(),
                median * 1e3,
                first / median
            );
            Some(json!({
                "shared_tokens": n,
                "own_tokens": 32,
                "first_ttft_ms": first * 1e3,
                "later_ttft_ms": later.iter().map(|t| t * 1e3).collect::<Vec<_>>(),
                "first_over_later_median": first / median,
            }))
        }
    };

    let mut decode = Vec::new();
    for &streams in &args.streams {
        let start = Instant::now();
        let jobs = (0..streams)
            .map(|_| {
                let prompt = prompt_of(&engine, 32)?;
                Ok(run_job(&engine, prompt, args.decode_tokens, start))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let timings = futures::future::try_join_all(jobs).await?;
        let wall = start.elapsed().as_secs_f64();
        let total: usize = timings.iter().map(|t| t.completion_tokens).sum();
        let per_token_ms: Vec<f64> = timings
            .iter()
            .filter(|t| t.pieces > 1)
            .filter_map(|t| {
                let first = t.first?;
                Some((t.done - first).as_secs_f64() * 1e3 / (t.completion_tokens - 1) as f64)
            })
            .collect();
        let mean_tpot = per_token_ms.iter().sum::<f64>() / per_token_ms.len().max(1) as f64;
        let worst_ttft = timings
            .iter()
            .filter_map(|t| t.first)
            .max()
            .unwrap_or_default()
            .as_secs_f64();
        // Steady state: from the last stream's first token to the first stream's end,
        // when every stream is decoding and no prompt is being prefilled.
        let window_start = timings.iter().filter_map(|t| t.first).max();
        let window_end = timings
            .iter()
            .filter_map(|t| t.stamps.last().copied())
            .min();
        let (steady_tok_s, steady_ms) = match (window_start, window_end) {
            (Some(a), Some(b)) if b > a => {
                let pieces = timings
                    .iter()
                    .flat_map(|t| &t.stamps)
                    .filter(|s| **s > a && **s <= b)
                    .count();
                let secs = (b - a).as_secs_f64();
                let per_stream = pieces as f64 / streams as f64;
                (pieces as f64 / secs, secs * 1e3 / per_stream.max(1.0))
            }
            _ => (f64::NAN, f64::NAN),
        };
        eprintln!(
            "decode {streams} stream(s): {:7.1} tok/s aggregate, {:6.1} ms/token per stream, worst TTFT {:7.1} ms; steady (all decoding): {:7.1} tok/s, {:6.1} ms/token per stream",
            total as f64 / wall,
            mean_tpot,
            worst_ttft * 1e3,
            steady_tok_s,
            steady_ms
        );
        decode.push(json!({
            "streams": streams,
            "tokens": total,
            "wall_s": wall,
            "aggregate_tok_per_s": total as f64 / wall,
            "per_stream_ms_per_token": mean_tpot,
            "worst_ttft_ms": worst_ttft * 1e3,
            "steady_tok_per_s": steady_tok_s,
            "steady_ms_per_token_per_stream": steady_ms,
        }));
    }
    let rss = peak_rss_kib();
    eprintln!("peak RSS: {} MiB", rss.map_or(0, |k| k / 1024));
    println!(
        "{}",
        json!({
            "model": label,
            "device": args.device,
            "quantize": format!("{:?}", args.quantize),
            "load_s": load_s,
            "rss_after_load_kib": rss_loaded,
            "peak_rss_after_load_kib": peak_loaded,
            "prefill": prefill,
            "prefix_reuse": shared,
            "decode": decode,
            "peak_rss_kib": rss,
        })
    );
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}
