//! The scheduler: one actor thread owns the weights, the queue and the running batch. Each
//! step admits queued jobs up to `max_batch`, runs one batched forward pass, samples a token
//! for every sequence whose prompt is complete and streams its text.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use candle_core::Device;
use candle_transformers::generation::LogitsProcessor;
use tokio::sync::mpsc;

use super::detokenizer::{TextDecoder, visible_text};
use super::prefix::PrefixCache;
use super::{EngineStats, Event, GenParams, Job, LoadedModel, Queued, Usage};
use crate::llama::{Item, KvBlock, KvCache, Llama};

/// Prompt tokens one sequence may prefill in a step shared with decoding sequences: bounds
/// the step's time, so running streams keep getting tokens during long prefills.
const PREFILL_CHUNK: usize = 512;

/// Prompt tokens one sequence may prefill in a step of its own on CPU (no sequence is
/// decoding, so no one waits on the step). Fewer, larger chunks dequantize each weight
/// matrix fewer times: `worker-bench` prefills 1k and 2k prompts about 9% faster than in
/// 512-token chunks, for ~55 MiB more peak memory at 2k. (On GPUs the causal mask is a
/// host-built (chunk × context) tensor, so chunks stay 512 there.)
const PREFILL_CHUNK_ALONE: usize = 2048;

pub(super) struct Actor {
    pub(super) weights: Llama,
    pub(super) model: Arc<LoadedModel>,
    pub(super) stats: Arc<EngineStats>,
    pub(super) max_batch: usize,
    /// Keys and values of earlier prompts (and answers), reused by prompts that start the
    /// same way.
    pub(super) prefix: PrefixCache<KvBlock>,
}

/// A running sequence.
struct Seq {
    events: mpsc::UnboundedSender<Event>,
    params: GenParams,
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// Prompt tokens restored from the prefix cache.
    reused: usize,
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
    /// When the prompt was complete and the first token was about to be sampled.
    first_token_at: Option<Instant>,
}

impl Seq {
    fn prefilling(&self) -> bool {
        self.prefilled < self.prompt.len()
    }

    /// Whether the prompt left is a continued answer's start, fed one token per step as
    /// decode fed it ([`GenParams::replay_tokens`]).
    fn replaying(&self) -> bool {
        self.prefilling() && self.prefilled >= self.prompt.len() - self.params.replay_tokens
    }

    /// The prompt tokens this step feeds: up to `chunk` of the prompt, stopping where a
    /// replayed answer starts; then that answer one token at a time.
    fn prompt_step(&self, chunk: usize) -> std::ops::Range<usize> {
        let start = self.prefilled;
        let replay_from = self.prompt.len() - self.params.replay_tokens;
        let end = if start >= replay_from {
            start + 1
        } else {
            (start + chunk).min(replay_from)
        };
        start..end.min(self.prompt.len())
    }
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
    pub(super) fn run(mut self, rx: std::sync::mpsc::Receiver<Queued>) {
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
                    self.stats.metrics.in_flight.dec();
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
            let kv_tokens: usize = running.iter().map(|s| s.cache.len()).sum();
            self.stats.metrics.kv_cache_tokens.set(kv_tokens as i64);
        }
    }

    fn admit(&mut self, job: Job, queued_at: Instant, running: &mut Vec<Seq>) {
        self.stats.metrics.queue_depth.dec();
        self.stats
            .metrics
            .queue_wait
            .observe(queued_at.elapsed().as_secs_f64());
        if job.events.is_closed() {
            return; // client went away while queued
        }
        if job.prompt.is_empty() {
            let _ = job.events.send(Event::Failed("empty prompt".into()));
            return;
        }
        self.stats.metrics.in_flight.inc();
        let mut job = job;
        job.params.replay_tokens = job.params.replay_tokens.min(job.prompt.len());
        let budget = job
            .params
            .max_tokens
            .min(self.model.max_context.saturating_sub(job.prompt.len()));
        // At least the last prompt token runs (its logits give the first token), and a
        // replayed answer runs as decode ran it, so neither comes from the prefix cache.
        let limit = job.prompt.len() - job.params.replay_tokens.max(1);
        let (mut cache, reused) = self.restore(&job.prompt, limit);
        cache.set_limit(job.prompt.len() + budget);
        let m = &self.stats.metrics;
        m.prefix_hit_tokens.inc_by(reused as u64);
        m.prefix_miss_tokens
            .inc_by((job.prompt.len() - reused) as u64);
        running.push(Seq {
            sampler: LogitsProcessor::new(
                job.params.seed,
                job.params.temperature,
                job.params.top_p,
            ),
            events: job.events,
            prompt: job.prompt,
            prefilled: reused,
            reused,
            cache,
            generated: Vec::with_capacity(budget),
            text: TextDecoder::default(),
            sent_len: 0,
            budget,
            params: job.params,
            started: Instant::now(),
            queued_at,
            first_token_at: None,
        });
    }

    /// One batched forward pass over the running sequences, then one token for each
    /// sequence whose prompt is complete.
    fn step(&mut self, running: &mut Vec<Seq>) {
        // Every decoding (or replaying) sequence, and prompt chunks of up to `chunk`
        // tokens in all, first come first served: several short prompts that arrive
        // together are prefilled in one step (one pass over the weights), not one a step.
        // In `running` order, which is the order of the logits' rows.
        let mut chosen: Vec<usize> = (0..running.len())
            .filter(|&i| !running[i].prefilling() || running[i].replaying())
            .collect();
        let chunk = match chosen.is_empty() && self.weights.device().is_cpu() {
            true => PREFILL_CHUNK_ALONE,
            false => PREFILL_CHUNK,
        };
        // each prefilling sequence's chunk this step (0: none)
        let mut allot = vec![0; running.len()];
        let mut left = chunk;
        for (i, seq) in running.iter().enumerate() {
            if left == 0 {
                break;
            }
            if seq.prefilling() && !seq.replaying() {
                allot[i] = left;
                left -= seq.prompt_step(left).len();
                chosen.push(i);
            }
        }
        chosen.sort_unstable();
        self.stats.metrics.batch_size.set(chosen.len() as i64);
        let logits = {
            let mut items: Vec<Item<'_>> = running
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| chosen.contains(i))
                .map(|(i, seq)| {
                    let tokens: &[u32] = if seq.prefilling() {
                        &seq.prompt[seq.prompt_step(allot[i].max(1))]
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
                    self.stats.metrics.in_flight.dec();
                }
                return;
            }
        };
        let mut done: Vec<usize> = Vec::new();
        for (row, &i) in chosen.iter().enumerate() {
            let seq = &mut running[i];
            if seq.prefilling() {
                seq.prefilled = seq.prompt_step(allot[i].max(1)).end;
                if seq.prefilling() {
                    continue; // more prompt to go; these logits are not needed
                }
                self.keep(&seq.prompt, &seq.cache);
                let m = &self.stats.metrics;
                m.prefill.observe(seq.started.elapsed().as_secs_f64());
                m.ttft.observe(seq.queued_at.elapsed().as_secs_f64());
                seq.first_token_at = Some(Instant::now());
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
            let seq = running.swap_remove(i);
            self.stats.metrics.in_flight.dec();
            // the answer too: a conversation's next turn starts with this one's prompt
            // and answer
            if self.prefix.enabled() && !seq.generated.is_empty() {
                let mut tokens = seq.prompt;
                tokens.extend_from_slice(&seq.generated);
                self.keep(&tokens, &seq.cache);
            }
        }
    }

    /// A new sequence's cache: the longest cached prefix of `prompt` ending at or before
    /// `limit`, restored, and how many tokens it holds. An empty cache when nothing is
    /// cached or restoring fails (the prompt is then prefilled whole).
    fn restore(&mut self, prompt: &[u32], limit: usize) -> (KvCache, usize) {
        if !self.prefix.enabled() {
            return (self.weights.new_cache(), 0);
        }
        let blocks = self.prefix.lookup(prompt, limit);
        if blocks.is_empty() {
            return (self.weights.new_cache(), 0);
        }
        match self.weights.cache_from(&blocks) {
            Ok(cache) => {
                let n = cache.len();
                (cache, n)
            }
            Err(e) => {
                tracing::warn!("cannot restore a cached prefix, prefilling it instead: {e}");
                (self.weights.new_cache(), 0)
            }
        }
    }

    /// Keeps the whole blocks of `tokens` that `cache` holds in the prefix cache.
    fn keep(&mut self, tokens: &[u32], cache: &KvCache) {
        if !self.prefix.enabled() {
            return;
        }
        let kept = self.prefix.store(tokens, cache.len(), |start, len| {
            cache.copy_out(start, len).map(|b| {
                let bytes = b.bytes();
                (b, bytes)
            })
        });
        if let Err(e) = kept {
            tracing::warn!("cannot keep a prefix for reuse: {e}");
        }
        let m = &self.stats.metrics;
        m.prefix_cache_bytes.set(self.prefix.bytes() as i64);
        m.prefix_cache_blocks.set(self.prefix.blocks() as i64);
    }

    /// Takes a sampled token: streams its text and says whether the sequence goes on.
    fn accept(&self, seq: &mut Seq, token: u32) -> Next {
        if !seq.params.ignore_eos && self.model.eos.contains(&token) {
            return self.flush(seq, false);
        }
        seq.generated.push(token);
        // counted as generated, whether or not the client stays for it
        self.stats.metrics.generated_tokens.inc();
        if let Err(e) = seq.text.push(&self.model.tokenizer, &seq.generated) {
            let _ = seq.events.send(Event::Failed(e.to_string()));
            return Next::Gone;
        }
        let (visible_end, stopped) =
            visible_text(seq.text.as_str(), seq.sent_len, &seq.params.stop);
        if !self.send_text(seq, visible_end) {
            return Next::Gone;
        }
        if stopped {
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
        if let Some(first) = seq.first_token_at
            && n > 1
        {
            let per_token = first.elapsed().as_secs_f64() / (n - 1) as f64;
            self.stats.metrics.time_per_output_token.observe(per_token);
        }
        let secs = seq.started.elapsed().as_secs_f64().max(1e-6);
        self.stats
            .last_tps_milli
            .store((n as f64 / secs * 1000.0) as u64, Ordering::Relaxed);
        let _ = seq.events.send(Event::Done(Usage {
            prompt_tokens: seq.prompt.len(),
            completion_tokens: n,
            total_tokens: seq.prompt.len() + n,
            prompt_tokens_details: super::PromptTokensDetails {
                cached_tokens: seq.reused,
            },
            finish_length,
            timing: super::Timing {
                queued: Some(seq.queued_at),
                admitted: Some(seq.started),
                first_token: seq.first_token_at,
            },
        }));
    }
}
