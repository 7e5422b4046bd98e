//! The simulated-hardware backend: no weights, filler tokens at a hardware profile's pace.

use std::sync::Arc;
use std::time::Instant;

use super::prefix::PrefixCache;
use super::{EngineStats, Event, Queued, Usage};

/// How the simulated-hardware backend behaves: time to first token and decode speed per
/// stream, as a hardware class would (e.g. an H100 serving a 70B model).
#[derive(Debug, Clone, Copy)]
pub struct SimProfile {
    pub ttft: std::time::Duration,
    pub tokens_per_s: f64,
    /// Prompt tokens prefilled per second (0: prefill takes no time beyond `ttft`): a
    /// long prompt's first token comes later, as on real hardware.
    pub prefill_tokens_per_s: f64,
    /// Keys and values one token takes in the prefix cache, bytes: with the cache's budget,
    /// how many prompt tokens it holds. Prompt tokens found there cost no prefill time.
    pub kv_bytes_per_token: usize,
}

impl SimProfile {
    /// A 70B-class model's keys and values in f16 with grouped queries (80 layers, 8 key
    /// and value heads of 128): 320 KiB per token.
    pub const KV_BYTES_70B: usize = 80 * 8 * 128 * 2 * 2;
}

/// The filler, one word per streamed event, over and over.
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

/// What each filler word costs in the model tokenizer's tokens (at least 1): the sim
/// spends `max_tokens` and reports usage in them, so its counts agree with what a router
/// counts of its text with the same tokenizer (a resumed stream's budget, its usage).
pub(super) fn word_costs(tokenizer: &tokenizers::Tokenizer) -> [usize; 8] {
    WORDS.map(|w| tokenizer.encode(w, false).map_or(1, |e| e.len().max(1)))
}

/// Streams running at once, and a wake-up for a job waiting for one to end.
type Slots = Arc<(std::sync::Mutex<usize>, std::sync::Condvar)>;

/// The simulated backend: every job streams on its own thread at the profile's pace, up to
/// `max_batch` at once, as the real engine batches; later jobs wait in the queue (which the
/// HTTP layer bounds with 429s), so a saturated simulated pool queues like real hardware.
pub(super) fn run_sim(
    rx: std::sync::mpsc::Receiver<Queued>,
    profile: SimProfile,
    stats: Arc<EngineStats>,
    max_context: usize,
    costs: [usize; 8],
    max_batch: usize,
    prefix_cache_bytes: usize,
) {
    let slots: Slots = Arc::default();
    // What a real engine's prefix cache would hold: blocks without keys and values, each
    // charged the profile's bytes. A prompt is kept when its job starts (the real engine
    // keeps it once prefilled, a prefill's time later; answers are not kept).
    let mut prefix: PrefixCache<()> = PrefixCache::new(prefix_cache_bytes);
    let block_bytes = super::prefix::BLOCK * profile.kv_bytes_per_token.max(1);
    let max_batch = max_batch.max(1);
    while let Ok((job, queued_at)) = rx.recv() {
        {
            let (running, freed) = &*slots;
            let mut n = running.lock().unwrap_or_else(|p| p.into_inner());
            while *n >= max_batch {
                n = freed.wait(n).unwrap_or_else(|p| p.into_inner());
            }
            *n += 1;
        }
        stats.metrics.queue_depth.dec();
        stats
            .metrics
            .queue_wait
            .observe(queued_at.elapsed().as_secs_f64());
        stats.metrics.in_flight.inc();
        let reused = if prefix.enabled() && !job.events.is_closed() {
            let prompt = &job.prompt;
            let reused =
                prefix.lookup(prompt, prompt.len().saturating_sub(1)).len() * super::prefix::BLOCK;
            let _ = prefix.store::<()>(prompt, prompt.len(), |_, _| Ok(((), block_bytes)));
            let m = &stats.metrics;
            m.prefix_hit_tokens.inc_by(reused as u64);
            m.prefix_miss_tokens.inc_by((prompt.len() - reused) as u64);
            m.prefix_cache_bytes.set(prefix.bytes() as i64);
            m.prefix_cache_blocks.set(prefix.blocks() as i64);
            reused
        } else {
            0
        };
        let stats_on_error = Arc::clone(&stats);
        let stats = Arc::clone(&stats);
        let slot = Arc::clone(&slots);
        let spawned = std::thread::Builder::new()
            .name("sim-stream".into())
            .spawn(move || {
                // the slot frees when this stream ends, however it ends
                struct Release(Slots);
                impl Drop for Release {
                    fn drop(&mut self) {
                        let (running, freed) = &*self.0;
                        *running.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
                        freed.notify_one();
                    }
                }
                let _slot = Release(slot);
                // a client gone while the job waited for its slot (an escalation's loser, a
                // client that gave up) costs nothing more
                if job.events.is_closed() {
                    stats.metrics.in_flight.dec();
                    return;
                }
                let started = Instant::now();
                let prefill = if profile.prefill_tokens_per_s > 0.0 {
                    std::time::Duration::from_secs_f64(
                        (job.prompt.len() - reused) as f64 / profile.prefill_tokens_per_s,
                    )
                } else {
                    std::time::Duration::ZERO
                };
                // time to first token, cut short if the client leaves meanwhile
                let first_at = started + profile.ttft + prefill;
                while Instant::now() < first_at {
                    if job.events.is_closed() {
                        stats.metrics.in_flight.dec();
                        return;
                    }
                    let left = first_at.saturating_duration_since(Instant::now());
                    std::thread::sleep(left.min(std::time::Duration::from_millis(20)));
                }
                let m = &stats.metrics;
                m.prefill.observe(started.elapsed().as_secs_f64());
                m.ttft.observe(queued_at.elapsed().as_secs_f64());
                let first_token_at = Instant::now();
                let per_token =
                    std::time::Duration::from_secs_f64(1.0 / profile.tokens_per_s.max(0.001));
                // tokens spent, as the model's tokenizer counts the words sent
                let mut n = 0;
                // as a real model, bounded by what the context window leaves
                let budget = job
                    .params
                    .max_tokens
                    .min(max_context.saturating_sub(job.prompt.len()));
                let mut i = 0;
                while n < budget {
                    if job.events.is_closed() {
                        break; // client gone
                    }
                    let w = (job.params.continues_words + i) % WORDS.len();
                    // a word comes when its tokens would have been generated (the first
                    // token at the time to first token)
                    let wait = costs[w] - usize::from(i == 0);
                    std::thread::sleep(per_token * u32::try_from(wait).unwrap_or(u32::MAX));
                    if job.events.send(Event::Text(WORDS[w].to_string())).is_err() {
                        break;
                    }
                    i += 1;
                    n += costs[w];
                    m.generated_tokens.inc_by(costs[w] as u64);
                }
                // the last word may run past the budget: usage stops at it, as a model's would
                let n = n.min(budget);
                if n > 1 {
                    let per_token = first_token_at.elapsed().as_secs_f64() / (n - 1) as f64;
                    m.time_per_output_token.observe(per_token);
                }
                // the heartbeat's decode speed, as the real engine reports it
                let secs = started.elapsed().as_secs_f64().max(1e-6);
                stats.last_tps_milli.store(
                    (n as f64 / secs * 1000.0) as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
                let _ = job.events.send(Event::Done(Usage {
                    prompt_tokens: job.prompt.len(),
                    completion_tokens: n,
                    total_tokens: job.prompt.len() + n,
                    prompt_tokens_details: super::PromptTokensDetails {
                        cached_tokens: reused,
                    },
                    finish_length: n >= budget,
                    timing: super::Timing {
                        queued: Some(queued_at),
                        admitted: Some(started),
                        first_token: Some(first_token_at),
                    },
                }));
                m.in_flight.dec();
            });
        if spawned.is_err() {
            tracing::error!("sim backend: cannot start a stream thread");
            stats_on_error.metrics.in_flight.dec();
            let (running, _) = &*slots;
            *running.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        }
    }
}
