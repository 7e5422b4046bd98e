//! A llama forward pass over a ragged batch, for continuous batching.
//!
//! One call to [`Llama::forward`] runs any mix of sequences — prompt chunks being prefilled
//! and single tokens being decoded — through the model at once: every weight matrix is
//! applied to all their rows in one matrix product, while attention runs per sequence
//! against that sequence's own [`KvCache`]. The logits of each sequence's last row come back.
//!
//! GGUF weights stay quantized. On CPU, Q8_0, Q4_x and Q5_x matrices are held as 8-bit
//! blocks ([`Q8Matrix`](crate::q8::Q8Matrix); 4- and 5-bit types take about twice their file size): products over
//! few rows (decode) multiply every row in one pass over the blocks, and products over many
//! rows (prefill) dequantize the matrix for the duration of the product and use the blocked
//! f32 GEMM, an order of magnitude faster per row. k-quant matrices keep candle's quantized
//! kernels. On CUDA candle's kernels multiply the weights as stored. Safetensors weights are
//! held as dense f32, or on CPU as 8-bit blocks when asked (`--quantize q8_0`). The query,
//! key and value projections, and the gate and up projections, are stacked into one matrix
//! each where their weights allow (`linear::Stacked`).
//!
//! Two architectures share this forward: llama (SmolLM2, Llama, TinyLlama) and qwen2 (the
//! same blocks with biases on the query, key and value projections). Weights come from GGUF
//! ([`Llama::from_gguf`]: `blk.N.attn_q.weight`, `llama.attention.head_count`, ...) or from a
//! Hugging Face directory of safetensors ([`Llama::from_safetensors`]:
//! `model.layers.N.self_attn.q_proj.weight`, config.json). Rotary embeddings take the form
//! the weights were stored for: interleaved pairs for GGUF llama (llama.cpp's converter
//! reorders the query and key rows), halves for qwen2 and for every safetensors checkpoint.
//!
//! Modules, in the order a model goes through them:
//! - [`arch`]: the architectures this forward runs ([`Arch`]) — and how to add one.
//! - `gguf` and `safetensors`: loaders ([`Llama::from_gguf`], [`Llama::from_safetensors`])
//!   and the [`Config`] each format gives.
//! - `config`: model dimensions and rotary frequencies ([`Config`]).
//! - `linear`: weight matrices and their products, quantized or dense, stacked where they
//!   can be.
//! - `kv_cache`: one sequence's keys and values ([`KvCache`]).
//! - this module: the batched forward pass ([`Llama::forward`]).
//! - `attention`: attention for prompt chunks and decode rows, against the caches.

pub mod arch;
mod attention;
mod config;
mod embedding;
mod gguf;
mod kv_cache;
mod linear;
mod safetensors;
#[cfg(test)]
mod tests;

use candle_core::{DType, Device, Result, Tensor};

use crate::cpu_ops;

pub use arch::Arch;
pub use config::Config;
use embedding::Embeddings;
pub use kv_cache::{KvBlock, KvCache};
use linear::{Linear, Stacked};

/// One transformer layer's weights as loaded.
struct Layer {
    attn_norm: Tensor,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// One transformer layer as the forward runs it.
struct Block {
    attn_norm: Tensor,
    /// Query, key and value.
    qkv: Stacked,
    wo: Linear,
    ffn_norm: Tensor,
    /// The feed-forward gate and up projections.
    gate_up: Stacked,
    down: Linear,
}

impl Block {
    fn new(l: Layer) -> Result<Self> {
        // the fused SiLU gate reads gate and up as the two halves of one product
        if l.gate.rows() != l.up.rows() {
            candle_core::bail!(
                "gate ({}) and up ({}) projections differ in width",
                l.gate.rows(),
                l.up.rows()
            );
        }
        Ok(Self {
            attn_norm: l.attn_norm,
            qkv: Stacked::new(vec![l.wq, l.wk, l.wv])?,
            wo: l.wo,
            ffn_norm: l.ffn_norm,
            gate_up: Stacked::new(vec![l.gate, l.up])?,
            down: l.down,
        })
    }
}

/// One sequence's part of a batch: the tokens to run (a prompt chunk, or the last sampled
/// token) and its cache. Positions continue from what the cache holds.
pub struct Item<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

pub struct Llama {
    pub cfg: Config,
    embeddings: Embeddings,
    layers: Vec<Block>,
    norm: Tensor,
    output: Linear,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    /// Decode steps of several sequences attend in one padded batch (a handful of kernel
    /// launches instead of a dozen per sequence). On by default on GPUs, where launches
    /// dominate small decode steps; off on CPU, where decode rows attend straight from
    /// their caches' memory instead ([`Llama::attend_decode_rows_cpu`], no padding).
    batched_decode: bool,
}

impl Llama {
    fn assemble(
        cfg: Config,
        embeddings: Embeddings,
        layers: Vec<Layer>,
        norm: Tensor,
        output: Linear,
        device: &Device,
    ) -> Result<Self> {
        let half = cfg.inv_freq.len();
        let inv_freq = Tensor::from_vec(cfg.inv_freq.clone(), (1, half), device)?;
        let positions = Tensor::arange(0u32, cfg.context_length as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((cfg.context_length, 1))?;
        let angles = positions.matmul(&inv_freq)?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
            embeddings,
            layers: layers.into_iter().map(Block::new).collect::<Result<_>>()?,
            norm,
            output,
            device: device.clone(),
            // SWITCHYARD_BATCHED_DECODE=0|1 overrides the default (for side-by-side timing).
            batched_decode: match std::env::var("SWITCHYARD_BATCHED_DECODE").as_deref() {
                Ok("0") => false,
                Ok("1") => true,
                _ => !device.is_cpu(),
            },
            cfg,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Chooses the decode attention form (see the field); for tests and benchmarks.
    pub fn with_batched_decode(mut self, on: bool) -> Self {
        self.batched_decode = on;
        self
    }

    /// An empty cache for a new sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: Vec::new(),
            len: 0,
            capacity: 0,
            limit: usize::MAX,
        }
    }

    /// A new sequence's cache holding `blocks`' keys and values, in order: a cached prefix
    /// restored instead of prefilled.
    pub fn cache_from(&self, blocks: &[&KvBlock]) -> Result<KvCache> {
        let mut cache = self.new_cache();
        cache.extend_from(blocks, &self.cfg, &self.device)?;
        Ok(cache)
    }

    /// Runs every item's tokens, appends them to the items' caches and returns the logits
    /// of each item's last token: (items, vocab).
    pub fn forward(&self, items: &mut [Item<'_>]) -> Result<Tensor> {
        let cfg = &self.cfg;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for item in items.iter_mut() {
            if item.tokens.is_empty() {
                candle_core::bail!("empty batch item");
            }
            let start = item.cache.len;
            if start + item.tokens.len() > cfg.context_length {
                candle_core::bail!(
                    "sequence of {} tokens exceeds the context window of {}",
                    start + item.tokens.len(),
                    cfg.context_length
                );
            }
            item.cache.reserve(item.tokens.len(), cfg, &self.device)?;
            ids.extend_from_slice(item.tokens);
            positions.extend((start..start + item.tokens.len()).map(|p| p as u32));
        }
        let rows = ids.len();
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        let cos = self.cos.index_select(&positions, 0)?;
        let sin = self.sin.index_select(&positions, 0)?;
        // Causal masks, once per prompt chunk: row i (position start+i) sees keys ..=start+i.
        // On CPU the softmax applies causality itself (`CausalSoftmax`).
        let masks = items
            .iter()
            .map(|item| {
                let (start, n) = (item.cache.len, item.tokens.len());
                if n == 1 || self.device.is_cpu() {
                    return Ok(None);
                }
                let total = start + n;
                let mask: Vec<f32> = (0..n)
                    .flat_map(|i| {
                        (0..total).map(move |j| {
                            if j > start + i {
                                f32::NEG_INFINITY
                            } else {
                                0.0
                            }
                        })
                    })
                    .collect();
                Tensor::from_vec(mask, (n, total), &self.device).map(Some)
            })
            .collect::<Result<Vec<_>>>()?;
        let all_decode =
            self.batched_decode && items.len() > 1 && items.iter().all(|i| i.tokens.len() == 1);
        let mut x = self.embeddings.lookup(&ids, &self.device)?; // (rows, hidden)
        for (l, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, cfg.eps as f32)?;
            let rope = |t: Tensor, heads: usize| -> Result<Tensor> {
                // (rows, heads·d) → (1, heads, rows, d): every row at its own position.
                let t = t
                    .reshape((rows, heads, cfg.head_dim))?
                    .transpose(0, 1)?
                    .unsqueeze(0)?
                    .contiguous()?;
                if cfg.rope_interleaved {
                    candle_nn::rotary_emb::rope_i(&t, &cos, &sin)?.squeeze(0)
                } else {
                    candle_nn::rotary_emb::rope(&t, &cos, &sin)?.squeeze(0)
                }
            };
            let [q, k, v] = match <[Tensor; 3]>::try_from(layer.qkv.forward(&h)?) {
                Ok(qkv) => qkv,
                Err(_) => candle_core::bail!("expected q, k and v"),
            };
            let q = rope(q, cfg.heads)?; // (heads, rows, d)
            let k = rope(k, cfg.kv_heads)?; // (kv, rows, d)
            let v = v
                .reshape((rows, cfg.kv_heads, cfg.head_dim))?
                .transpose(0, 1)?; // (kv, rows, d)
            let attn = if all_decode {
                self.attend_decode_batch(&q, &k, &v, items, l)?
            } else {
                // On CPU the decode rows attend together, reading their caches in place.
                let decoded = match self.device.is_cpu() {
                    true => self.attend_decode_rows_cpu(&q, &k, &v, items, l)?,
                    false => Vec::new(),
                };
                if decoded.len() == rows * cfg.hidden {
                    Tensor::from_vec(decoded, (rows, cfg.hidden), &self.device)?
                } else {
                    let mut outs = Vec::with_capacity(items.len());
                    let (mut row, mut decode_row) = (0, 0);
                    for (item, mask) in items.iter_mut().zip(&masks) {
                        let n = item.tokens.len();
                        if n == 1 && !decoded.is_empty() {
                            let at = decode_row * cfg.hidden;
                            outs.push(Tensor::from_slice(
                                &decoded[at..at + cfg.hidden],
                                (1, cfg.hidden),
                                &self.device,
                            )?);
                            decode_row += 1;
                        } else {
                            outs.push(self.attend(
                                &q.narrow(1, row, n)?,
                                &k.narrow(1, row, n)?.contiguous()?,
                                &v.narrow(1, row, n)?.contiguous()?,
                                mask.as_ref(),
                                item.cache,
                                l,
                            )?);
                        }
                        row += n;
                    }
                    Tensor::cat(&outs, 0)? // (rows, hidden)
                }
            };
            x = (x + layer.wo.forward(&attn)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, cfg.eps as f32)?;
            let gated = match &layer.gate_up {
                // gate and up side by side in one product's rows
                Stacked::One { w, .. } => cpu_ops::silu_mul_halves(&w.forward(&h)?)?,
                each => match each.forward(&h)?.as_slice() {
                    [gate, up] => cpu_ops::silu_mul(gate, up)?,
                    _ => candle_core::bail!("expected gate and up"),
                },
            };
            x = (x + layer.down.forward(&gated)?)?;
        }
        let mut last = Vec::with_capacity(items.len());
        let mut row = 0;
        for item in items.iter_mut() {
            row += item.tokens.len();
            last.push((row - 1) as u32);
            item.cache.len += item.tokens.len();
        }
        let last = Tensor::new(last.as_slice(), &self.device)?;
        let x = x.index_select(&last, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, cfg.eps as f32)?;
        self.output.forward(&x)
    }
}
