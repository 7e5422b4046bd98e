//! A llama forward pass over a ragged batch, for continuous batching.
//!
//! One call to [`Llama::forward`] runs any mix of sequences — prompt chunks being prefilled
//! and single tokens being decoded — through the model at once: every weight matrix is
//! applied to all their rows in one matrix product, while attention runs per sequence
//! against that sequence's own [`KvCache`]. The logits of each sequence's last row come back.
//!
//! Weights stay quantized. On CPU, products over many rows (prefill) dequantize the matrix
//! for the duration of the product and use the blocked f32 GEMM, an order of magnitude
//! faster per row than candle's quantized dot products; products over few rows (decode)
//! use those dot products on the quantized weights. Memory stays at the quantized size plus
//! one matrix in f32 at a time. On CUDA candle's kernels multiply the weights as stored.
//!
//! Tensor names and metadata keys are GGUF's llama conventions (`blk.N.attn_q.weight`,
//! `llama.attention.head_count`, ...); rotary embeddings are the interleaved form GGUF
//! llama weights are stored for.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, Module, Result, Tensor};

/// Query rows of one sequence whose attention is computed together.
const QUERY_BLOCK: usize = 128;

/// Products over at least this many rows dequantize the weights and use f32 GEMM.
const DEQUANTIZE_ROWS: usize = 16;

/// Model dimensions read from GGUF metadata.
#[derive(Debug, Clone)]
pub struct Config {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub eps: f64,
    pub rope_base: f32,
    pub context_length: usize,
}

impl Config {
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "llama".into());
        let get = |key: &str| {
            content
                .metadata
                .get(&format!("{arch}.{key}"))
                .ok_or_else(|| {
                    candle_core::Error::Msg(format!("GGUF metadata `{arch}.{key}` missing"))
                })
        };
        let u = |key: &str| -> Result<usize> { Ok(get(key)?.to_u32()? as usize) };
        let hidden = u("embedding_length")?;
        let heads = u("attention.head_count")?;
        let kv_heads = u("attention.head_count_kv").unwrap_or(heads);
        let head_dim = u("rope.dimension_count").unwrap_or(hidden / heads.max(1));
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || head_dim * heads != hidden {
            candle_core::bail!(
                "unsupported attention shape: {heads} heads, {kv_heads} kv heads, head size {head_dim}, hidden {hidden}"
            );
        }
        Ok(Self {
            hidden,
            heads,
            kv_heads,
            head_dim,
            layers: u("block_count")?,
            eps: f64::from(get("attention.layer_norm_rms_epsilon")?.to_f32()?),
            rope_base: get("rope.freq_base")
                .and_then(|v| v.to_f32())
                .unwrap_or(10_000.0),
            context_length: u("context_length")?,
        })
    }
}

/// Weight types without a vectorised CPU dot product in candle (its x86 kernels cover Q4_0,
/// Q8_0 and the k-quants). SmolLM2's GGUF is Q4_1.
const CPU_SLOW_TYPES: [GgmlDType; 3] = [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1];

/// A weight matrix, kept quantized.
struct Linear {
    weight: Arc<QTensor>,
    direct: QMatMul,
    quantized: bool,
}

impl Linear {
    /// On CPU, weights of the [`CPU_SLOW_TYPES`] are re-encoded as Q8_0 (blocks of 32
    /// 8-bit values with one scale: every 4- and 5-bit level is kept to within half an
    /// 8-bit step). `cargo bench -p benches --bench decode`: a 1536×576 decode product
    /// takes 105 µs as Q4_1 and 61 µs as Q8_0 here, for 1.7× the memory of Q4_1.
    fn new(weight: QTensor, device: &Device) -> Result<Self> {
        let weight = if device.is_cpu()
            && CPU_SLOW_TYPES.contains(&weight.dtype())
            && weight
                .shape()
                .dims()
                .last()
                .is_some_and(|k| k % GgmlDType::Q8_0.block_size() == 0)
        {
            QTensor::quantize(&weight.dequantize(device)?, GgmlDType::Q8_0)?
        } else {
            weight
        };
        let quantized = !matches!(
            weight.dtype(),
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        );
        let weight = Arc::new(weight);
        Ok(Self {
            direct: QMatMul::from_arc(Arc::clone(&weight))?,
            weight,
            quantized,
        })
    }

    /// `x`: (rows, in) → (rows, out). Many rows (prefill) on CPU: the weights are
    /// dequantized for this product and the blocked f32 GEMM does it.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.quantized && x.device().is_cpu() && x.dim(0)? >= DEQUANTIZE_ROWS {
            let w = self.weight.dequantize(x.device())?;
            x.matmul(&w.t()?)
        } else {
            self.direct.forward(x)
        }
    }
}

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

/// One sequence's keys and values for every layer, grown by doubling.
pub struct KvCache {
    /// Per layer: (kv_heads, capacity, head_dim) keys and values.
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes room for `extra` more tokens, reallocating to double the size when full.
    fn reserve(&mut self, extra: usize, cfg: &Config, device: &Device) -> Result<()> {
        let needed = self.len + extra;
        if needed <= self.capacity && !self.layers.is_empty() {
            return Ok(());
        }
        let capacity = needed.next_power_of_two().max(64);
        let shape = (cfg.kv_heads, capacity, cfg.head_dim);
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let k = Tensor::zeros(shape, DType::F32, device)?;
            let v = Tensor::zeros(shape, DType::F32, device)?;
            if let Some((old_k, old_v)) = self.layers.get(l)
                && self.len > 0
            {
                k.slice_set(&old_k.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                v.slice_set(&old_v.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
            }
            layers.push((k, v));
        }
        self.layers = layers;
        self.capacity = capacity;
        Ok(())
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
    embeddings: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Linear,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    /// Decode steps of several sequences attend in one padded batch (a handful of kernel
    /// launches instead of a dozen per sequence). On by default on GPUs, where launches
    /// dominate small decode steps; off on CPU, where the per-sequence form avoids the
    /// padding copies.
    batched_decode: bool,
}

impl Llama {
    pub fn from_gguf<R: std::io::Read + std::io::Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
    ) -> Result<Self> {
        let cfg = Config::from_gguf(content)?;
        let mut q = |name: &str| content.tensor(reader, name, device);
        let token_embd = q("token_embd.weight")?;
        let embeddings = token_embd.dequantize(device)?;
        let output = if content.tensor_infos.contains_key("output.weight") {
            q("output.weight")?
        } else {
            token_embd // tied embeddings
        };
        let norm = q("output_norm.weight")?.dequantize(device)?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let mut w = |n: &str| q(&format!("blk.{i}.{n}.weight"));
            layers.push(Layer {
                attn_norm: w("attn_norm")?.dequantize(device)?,
                wq: Linear::new(w("attn_q")?, device)?,
                wk: Linear::new(w("attn_k")?, device)?,
                wv: Linear::new(w("attn_v")?, device)?,
                wo: Linear::new(w("attn_output")?, device)?,
                ffn_norm: w("ffn_norm")?.dequantize(device)?,
                gate: Linear::new(w("ffn_gate")?, device)?,
                up: Linear::new(w("ffn_up")?, device)?,
                down: Linear::new(w("ffn_down")?, device)?,
            });
        }
        let half = cfg.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| cfg.rope_base.powf(-((2 * i) as f32) / cfg.head_dim as f32))
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let positions = Tensor::arange(0u32, cfg.context_length as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((cfg.context_length, 1))?;
        let angles = positions.matmul(&inv_freq)?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
            embeddings,
            layers,
            norm,
            output: Linear::new(output, device)?,
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
        }
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
        let ids = Tensor::new(ids.as_slice(), &self.device)?;
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        let cos = self.cos.index_select(&positions, 0)?;
        let sin = self.sin.index_select(&positions, 0)?;
        // Causal masks, once per prompt chunk: row i (position start+i) sees keys ..=start+i.
        let masks = items
            .iter()
            .map(|item| {
                let (start, n) = (item.cache.len, item.tokens.len());
                if n == 1 {
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
        let mut x = self.embeddings.index_select(&ids, 0)?; // (rows, hidden)
        for (l, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, cfg.eps as f32)?;
            let rope = |t: Tensor, heads: usize| -> Result<Tensor> {
                // (rows, heads·d) → (1, heads, rows, d): every row at its own position.
                let t = t
                    .reshape((rows, heads, cfg.head_dim))?
                    .transpose(0, 1)?
                    .unsqueeze(0)?
                    .contiguous()?;
                candle_nn::rotary_emb::rope_i(&t, &cos, &sin)?.squeeze(0)
            };
            let q = rope(layer.wq.forward(&h)?, cfg.heads)?; // (heads, rows, d)
            let k = rope(layer.wk.forward(&h)?, cfg.kv_heads)?; // (kv, rows, d)
            let v = layer
                .wv
                .forward(&h)?
                .reshape((rows, cfg.kv_heads, cfg.head_dim))?
                .transpose(0, 1)?; // (kv, rows, d)
            let attn = if all_decode {
                self.attend_decode_batch(&q, &k, &v, items, l)?
            } else {
                let mut outs = Vec::with_capacity(items.len());
                let mut row = 0;
                for (item, mask) in items.iter_mut().zip(&masks) {
                    let n = item.tokens.len();
                    outs.push(self.attend(
                        &q.narrow(1, row, n)?,
                        &k.narrow(1, row, n)?.contiguous()?,
                        &v.narrow(1, row, n)?.contiguous()?,
                        mask.as_ref(),
                        item.cache,
                        l,
                    )?);
                    row += n;
                }
                Tensor::cat(&outs, 0)? // (rows, hidden)
            };
            x = (x + layer.wo.forward(&attn)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, cfg.eps as f32)?;
            let gated =
                (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
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

    /// Attention for a batch of decode steps (one new row per sequence): `q` (heads, B, d),
    /// `k`/`v` (kv, B, d). Each sequence's keys are padded to the longest and masked, and
    /// one batched product serves them all. Returns (B, heads·d).
    fn attend_decode_batch(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        items: &mut [Item<'_>],
        l: usize,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let b = items.len();
        let longest = items.iter().map(|i| i.cache.len + 1).max().unwrap_or(1);
        let mut keys = Vec::with_capacity(b);
        let mut values = Vec::with_capacity(b);
        let mut mask = vec![0f32; b * longest];
        for (i, item) in items.iter_mut().enumerate() {
            let start = item.cache.len;
            let total = start + 1;
            let (kc, vc) = &item.cache.layers[l];
            kc.slice_set(&k.narrow(1, i, 1)?.contiguous()?, 1, start)?;
            vc.slice_set(&v.narrow(1, i, 1)?.contiguous()?, 1, start)?;
            keys.push(
                kc.narrow(1, 0, total)?
                    .pad_with_zeros(1, 0, longest - total)?,
            );
            values.push(
                vc.narrow(1, 0, total)?
                    .pad_with_zeros(1, 0, longest - total)?,
            );
            mask[i * longest + total..(i + 1) * longest].fill(f32::NEG_INFINITY);
        }
        let keys = Tensor::stack(&keys, 0)?; // (B, kv, longest, d)
        let values = Tensor::stack(&values, 0)?;
        let group = cfg.heads / cfg.kv_heads;
        let q = q
            .transpose(0, 1)?
            .contiguous()?
            .reshape((b, cfg.kv_heads, group, cfg.head_dim))?;
        let scale = 1.0 / (cfg.head_dim as f64).sqrt();
        let scores = (q.matmul(&keys.t()?)? * scale)?; // (B, kv, group, longest)
        let mask = Tensor::from_vec(mask, (b, 1, 1, longest), &self.device)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
        probs.matmul(&values)?.reshape((b, cfg.hidden)) // (B, kv, group, d) → (B, hidden)
    }

    /// Attention for one sequence: `q` (heads, n, d) for its new rows, `k`/`v` (kv, n, d)
    /// appended to layer `l` of its cache. Returns (n, heads·d).
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        l: usize,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let n = q.dim(1)?;
        let start = cache.len;
        let total = start + n;
        let (k_all, v_all) = {
            let (kc, vc) = &cache.layers[l];
            kc.slice_set(k, 1, start)?;
            vc.slice_set(v, 1, start)?;
            (kc.narrow(1, 0, total)?, vc.narrow(1, 0, total)?)
        };
        // Grouped-query attention without copying keys: the query heads sharing a kv head
        // are stacked as rows, (kv, group·rows, d). Queries go in blocks, each against only
        // the keys it may see (causality halves a prefill's work), which also keeps the
        // score matrices small enough to stay in cache.
        let group = cfg.heads / cfg.kv_heads;
        let scale = 1.0 / (cfg.head_dim as f64).sqrt();
        let q = q.contiguous()?;
        let mut outs = Vec::with_capacity(n.div_ceil(QUERY_BLOCK));
        let mut first = 0;
        while first < n {
            let len = QUERY_BLOCK.min(n - first);
            let keys = start + first + len;
            let q_block = q.narrow(1, first, len)?.contiguous()?.reshape((
                cfg.kv_heads,
                group * len,
                cfg.head_dim,
            ))?;
            let scores = (q_block.matmul(&k_all.narrow(1, 0, keys)?.t()?)? * scale)?;
            let scores = match mask {
                Some(mask) => scores
                    .reshape((cfg.kv_heads, group, len, keys))?
                    .broadcast_add(&mask.narrow(0, first, len)?.narrow(1, 0, keys)?)?
                    .reshape((cfg.kv_heads, group * len, keys))?,
                None => scores,
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let out = probs.matmul(&v_all.narrow(1, 0, keys)?)?; // (kv, group·len, d)
            outs.push(
                out.reshape((cfg.heads, len, cfg.head_dim))?
                    .transpose(0, 1)?
                    .contiguous()?
                    .reshape((len, cfg.hidden))?,
            );
            first += len;
        }
        if outs.len() == 1 {
            return outs
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("no rows".into()));
        }
        Tensor::cat(&outs, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_transformers::models::quantized_llama::ModelWeights;
    use model_meta::tiny::{LlamaShape, write_random_llama};

    fn model_file(name: &str, shape: &LlamaShape) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("llama-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.gguf");
        write_random_llama(&path, shape, 1024).unwrap();
        path
    }

    fn ours(path: &std::path::Path) -> Llama {
        let mut f = std::fs::File::open(path).unwrap();
        let c = gguf_file::Content::read(&mut f).unwrap();
        Llama::from_gguf(&c, &mut f, &Device::Cpu).unwrap()
    }

    fn reference(path: &std::path::Path) -> ModelWeights {
        let mut f = std::fs::File::open(path).unwrap();
        let c = gguf_file::Content::read(&mut f).unwrap();
        ModelWeights::from_gguf(c, &mut f, &Device::Cpu).unwrap()
    }

    fn gap(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        a.iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

    /// Prefill in chunks and decode, against candle's reference llama: same logits.
    #[test]
    fn matches_candle_quantized_llama_for_prefill_and_decode() {
        for (name, shape) in [
            ("f32", LlamaShape::TINY),
            ("q8", LlamaShape::small(GgmlDType::Q8_0)),
            (
                // re-encoded as Q8_0 on CPU; the reference multiplies Q4_1 as stored
                "q4_1",
                LlamaShape::small(GgmlDType::Q4_1),
            ),
        ] {
            let path = model_file(name, &shape);
            let model = ours(&path);
            let mut reference = reference(&path);
            let prompt: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 250).collect();
            let expected = reference
                .forward(
                    &Tensor::new(prompt.as_slice(), &Device::Cpu)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap(),
                    0,
                )
                .unwrap();
            // our prefill in two chunks (25 + 15 tokens): the cache carries the first
            let mut cache = model.new_cache();
            model
                .forward(&mut [Item {
                    tokens: &prompt[..25],
                    cache: &mut cache,
                }])
                .unwrap();
            let got = model
                .forward(&mut [Item {
                    tokens: &prompt[25..],
                    cache: &mut cache,
                }])
                .unwrap();
            // Quantized: both sides quantize activations (Q8_0 here, Q8_1 in the
            // reference's Q4_1 product), so a few percent of the logit range.
            let tol = match name {
                "f32" => 1e-4,
                "q8" => 2e-2,
                _ => 3e-2,
            };
            let g = gap(&expected, &got);
            assert!(g < tol, "{name}: prefill logits differ by {g}");
            for (step, token) in [5u32, 77, 200].into_iter().enumerate() {
                let expected = reference
                    .forward(
                        &Tensor::new(&[token], &Device::Cpu)
                            .unwrap()
                            .unsqueeze(0)
                            .unwrap(),
                        prompt.len() + step,
                    )
                    .unwrap();
                let got = model
                    .forward(&mut [Item {
                        tokens: &[token],
                        cache: &mut cache,
                    }])
                    .unwrap();
                let g = gap(&expected, &got);
                assert!(g < tol, "{name}: decode step {step} logits differ by {g}");
            }
            assert_eq!(cache.len(), prompt.len() + 3);
        }
    }

    /// A sequence's logits do not depend on what else is in the batch.
    #[test]
    fn batched_sequences_match_sequences_run_alone() {
        let path = model_file("batch", &LlamaShape::TINY);
        let model = ours(&path);
        let a: Vec<u32> = (10..50).collect();
        let b: Vec<u32> = (100..107).collect();
        let alone = |prompt: &[u32], next: u32| {
            let mut cache = model.new_cache();
            model
                .forward(&mut [Item {
                    tokens: prompt,
                    cache: &mut cache,
                }])
                .unwrap();
            model
                .forward(&mut [Item {
                    tokens: &[next],
                    cache: &mut cache,
                }])
                .unwrap()
        };
        let b_alone = alone(&b, 4);
        let mut ca = model.new_cache();
        let mut cb = model.new_cache();
        // prefill of one and decode of the other share a step; then both decode together
        model
            .forward(&mut [Item {
                tokens: &a,
                cache: &mut ca,
            }])
            .unwrap();
        model
            .forward(&mut [
                Item {
                    tokens: &[3],
                    cache: &mut ca,
                },
                Item {
                    tokens: &b,
                    cache: &mut cb,
                },
            ])
            .unwrap();
        let both = model
            .forward(&mut [
                Item {
                    tokens: &[4],
                    cache: &mut cb,
                },
                Item {
                    tokens: &[9],
                    cache: &mut ca,
                },
            ])
            .unwrap();
        let b_batched = both.get(0).unwrap();
        assert!(gap(&b_alone.squeeze(0).unwrap(), &b_batched) < 1e-4);
        // a's step-3 logits: recompute a alone through the same tokens
        let mut c = model.new_cache();
        model
            .forward(&mut [Item {
                tokens: &a,
                cache: &mut c,
            }])
            .unwrap();
        model
            .forward(&mut [Item {
                tokens: &[3],
                cache: &mut c,
            }])
            .unwrap();
        let a9 = model
            .forward(&mut [Item {
                tokens: &[9],
                cache: &mut c,
            }])
            .unwrap();
        assert!(gap(&a9.squeeze(0).unwrap(), &both.get(1).unwrap()) < 1e-4);
    }

    #[test]
    fn a_sequence_past_the_context_window_is_an_error() {
        let path = model_file("ctx", &LlamaShape::TINY);
        let model = ours(&path);
        let mut cache = model.new_cache();
        let long: Vec<u32> = vec![5; 1025];
        let err = model
            .forward(&mut [Item {
                tokens: &long,
                cache: &mut cache,
            }])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("context window of 1024"), "{err}");
    }

    /// The padded batch form of decode attention (the GPU default) gives the per-sequence
    /// form's logits, for sequences of different lengths.
    #[test]
    fn batched_decode_attention_matches_per_sequence_attention() {
        let path = model_file("padded", &LlamaShape::TINY);
        let run = |batched: bool| {
            let model = ours(&path).with_batched_decode(batched);
            let prompts: [Vec<u32>; 3] = [(10..50).collect(), (60..63).collect(), vec![7]];
            let mut caches: Vec<KvCache> = prompts.iter().map(|_| model.new_cache()).collect();
            for (p, c) in prompts.iter().zip(caches.iter_mut()) {
                model
                    .forward(&mut [Item {
                        tokens: p,
                        cache: c,
                    }])
                    .unwrap();
            }
            let mut out = Vec::new();
            for step in 0..3u32 {
                let tokens = [[step + 1], [step + 20], [step + 90]];
                let mut items: Vec<Item<'_>> = tokens
                    .iter()
                    .zip(caches.iter_mut())
                    .map(|(t, c)| Item {
                        tokens: t,
                        cache: c,
                    })
                    .collect();
                out.push(model.forward(&mut items).unwrap());
            }
            out
        };
        for (a, b) in run(false).iter().zip(&run(true)) {
            let g = gap(a, b);
            assert!(g < 1e-5, "padded batch attention differs by {g}");
        }
    }
}
