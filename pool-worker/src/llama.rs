//! A llama forward pass over a ragged batch, for continuous batching.
//!
//! One call to [`Llama::forward`] runs any mix of sequences — prompt chunks being prefilled
//! and single tokens being decoded — through the model at once: every weight matrix is
//! applied to all their rows in one matrix product, while attention runs per sequence
//! against that sequence's own [`KvCache`]. The logits of each sequence's last row come back.
//!
//! GGUF weights stay quantized. On CPU, Q8_0, Q4_x and Q5_x matrices are held as 8-bit
//! blocks ([`Q8Matrix`]; 4- and 5-bit types take about twice their file size): products over
//! few rows (decode) multiply every row in one pass over the blocks, and products over many
//! rows (prefill) dequantize the matrix for the duration of the product and use the blocked
//! f32 GEMM, an order of magnitude faster per row. k-quant matrices keep candle's quantized
//! kernels. On CUDA candle's kernels multiply the weights as stored. Safetensors weights are
//! held as dense f32, or on CPU as 8-bit blocks when asked (`--quantize q8_0`). The query,
//! key and value projections, and the gate and up projections, are stacked into one matrix
//! each where their weights allow ([`Stacked`]).
//!
//! Two architectures share this forward: llama (SmolLM2, Llama, TinyLlama) and qwen2 (the
//! same blocks with biases on the query, key and value projections). Weights come from GGUF
//! ([`Llama::from_gguf`]: `blk.N.attn_q.weight`, `llama.attention.head_count`, ...) or from a
//! Hugging Face directory of safetensors ([`Llama::from_safetensors`]:
//! `model.layers.N.self_attn.q_proj.weight`, config.json). Rotary embeddings take the form
//! the weights were stored for: interleaved pairs for GGUF llama (llama.cpp's converter
//! reorders the query and key rows), halves for qwen2 and for every safetensors checkpoint.

use std::sync::Arc;

use std::collections::HashMap;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, Module, Result, Tensor};
use model_meta::{HfModel, rope_inv_freq};

use rayon::prelude::*;

use crate::cpu_ops::{self, CausalSoftmax};
use crate::q8::{self, Q8Matrix};

/// Query rows of one sequence whose attention is computed together.
const QUERY_BLOCK: usize = 128;

/// Products over at least this many rows dequantize the weights and use f32 GEMM.
const DEQUANTIZE_ROWS: usize = 16;

/// The architectures this forward runs.
pub const ARCHITECTURES: [&str; 2] = ["llama", "qwen2"];

/// Model dimensions, from GGUF metadata or config.json.
#[derive(Debug, Clone)]
pub struct Config {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub eps: f64,
    /// Rotary inverse frequencies, one per pair of a head's dimensions (rope scaling
    /// already applied).
    pub inv_freq: Vec<f32>,
    /// Rotary pairs are adjacent dimensions (GGUF llama) rather than the two halves.
    pub rope_interleaved: bool,
    pub context_length: usize,
}

fn check_shape(heads: usize, kv_heads: usize, head_dim: usize, hidden: usize) -> Result<()> {
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || head_dim * heads != hidden
    {
        candle_core::bail!(
            "unsupported attention shape: {heads} heads, {kv_heads} kv heads, head size {head_dim}, hidden {hidden}"
        );
    }
    Ok(())
}

impl Config {
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "llama".into());
        if !ARCHITECTURES.contains(&arch.as_str()) {
            candle_core::bail!(
                "GGUF architecture `{arch}` is not supported (supported: {})",
                ARCHITECTURES.join(", ")
            );
        }
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
        check_shape(heads, kv_heads, head_dim, hidden)?;
        let base = get("rope.freq_base")
            .and_then(|v| v.to_f32())
            .unwrap_or(10_000.0);
        let mut inv_freq = rope_inv_freq(base, head_dim);
        // Linear position scaling divides every frequency; other kinds (yarn, ...) change
        // attention in ways this forward does not, so they are refused. Llama 3's scaling
        // comes as the rope_freqs tensor (see `Llama::from_gguf`).
        match get("rope.scaling.type").and_then(|v| v.to_string().cloned()) {
            Err(_) => {}
            Ok(kind) if kind == "none" => {}
            Ok(kind) if kind == "linear" => {
                let factor = get("rope.scaling.factor")?.to_f32()?;
                if factor.is_nan() || factor <= 0.0 {
                    candle_core::bail!("GGUF rope scaling factor {factor} is not positive");
                }
                inv_freq.iter_mut().for_each(|f| *f /= factor);
            }
            Ok(kind) => candle_core::bail!(
                "GGUF rope scaling `{kind}` is not supported (none, linear, Llama 3's rope_freqs)"
            ),
        }
        Ok(Self {
            hidden,
            heads,
            kv_heads,
            head_dim,
            layers: u("block_count")?,
            eps: f64::from(get("attention.layer_norm_rms_epsilon")?.to_f32()?),
            inv_freq,
            // llama.cpp runs qwen2 with the halves ("neox") form, llama interleaved
            rope_interleaved: arch == "llama",
            context_length: u("context_length")?,
        })
    }

    /// From a Hugging Face model's config.json (checked by [`HfModel::open`]).
    pub fn from_hf(model: &HfModel) -> Result<Self> {
        let c = &model.config;
        let heads = c.num_attention_heads;
        let kv_heads = c.num_key_value_heads.unwrap_or(heads);
        let head_dim = c.head_dim.unwrap_or(c.hidden_size / heads.max(1));
        check_shape(heads, kv_heads, head_dim, c.hidden_size)?;
        let mut inv_freq = rope_inv_freq(c.rope_theta as f32, head_dim);
        if let Some(scaling) = &c.rope_scaling {
            scaling.apply(&mut inv_freq);
        }
        Ok(Self {
            hidden: c.hidden_size,
            heads,
            kv_heads,
            head_dim,
            layers: c.num_hidden_layers,
            eps: c.rms_norm_eps,
            inv_freq,
            rope_interleaved: false,
            context_length: c.max_position_embeddings,
        })
    }
}

/// Weight types multiplied as [`Q8Matrix`] blocks on CPU: Q8_0 itself, and the types
/// without a vectorised CPU dot product in candle (SmolLM2's GGUF is Q4_1). The k-quants
/// keep candle's kernels and their smaller size.
const CPU_Q8_TYPES: [GgmlDType; 5] = [
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
];

/// How a weight matrix is multiplied.
enum Weights {
    /// candle's product: dense matrices, every matrix on GPUs, and the quantized types
    /// candle multiplies well on CPU (the k-quants). `quantized` keeps quantized weights
    /// for dequantizing before many-row products on CPU.
    Candle {
        direct: QMatMul,
        quantized: Option<Arc<QTensor>>,
    },
    /// CPU 8-bit blocks, every decode row in one pass ([`Q8Matrix`]).
    Q8(Q8Matrix),
}

/// A weight matrix, kept quantized (GGUF, or safetensors asked to be) or dense, with an
/// optional bias.
struct Linear {
    weights: Weights,
    bias: Option<Tensor>,
}

/// Whether CPU decode products use [`Q8Matrix`]; `SWITCHYARD_Q8=0` keeps candle's
/// product instead (for side-by-side timing).
fn q8_enabled() -> bool {
    std::env::var("SWITCHYARD_Q8").map_or(true, |v| v != "0")
}

/// candle's product over `weight` as stored.
fn candle_weights(weight: QTensor) -> Result<Weights> {
    let dense = matches!(
        weight.dtype(),
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
    );
    let weight = Arc::new(weight);
    Ok(Weights::Candle {
        direct: QMatMul::from_arc(Arc::clone(&weight))?,
        quantized: (!dense).then_some(weight),
    })
}

impl Linear {
    /// On CPU, weights of the [`CPU_Q8_TYPES`] become [`Q8Matrix`] blocks (every 4- and
    /// 5-bit level is kept to within half an 8-bit step). `cargo bench -p benches --bench
    /// decode` compares the products.
    fn new(weight: QTensor, device: &Device) -> Result<Self> {
        Self::quantized(weight, None, device)
    }

    /// The output matrix when it is the embedding matrix: `weight` as stored, and
    /// `dequantized`, the f32 copy the embedding lookup keeps.
    fn tied(weight: QTensor, dequantized: &Tensor, device: &Device) -> Result<Self> {
        Self::quantized(weight, Some(dequantized), device)
    }

    /// `weight` as stored; `f32_copy`, when the caller already has one, saves dequantizing
    /// it again.
    fn quantized(weight: QTensor, f32_copy: Option<&Tensor>, device: &Device) -> Result<Self> {
        let cols = weight.shape().dims().last().copied().unwrap_or(0);
        let blocks = device.is_cpu() && cols.is_multiple_of(q8::BLOCK);
        let as_f32 = || match f32_copy {
            Some(t) => Ok(t.clone()),
            None => weight.dequantize(device),
        };
        let weights = if blocks && q8_enabled() && CPU_Q8_TYPES.contains(&weight.dtype()) {
            Weights::Q8(Q8Matrix::from_tensor(&as_f32()?)?)
        } else if blocks
            && [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1].contains(&weight.dtype())
        {
            // candle has no SIMD dot product for these; its Q8_0 product is faster
            candle_weights(QTensor::quantize(&as_f32()?, GgmlDType::Q8_0)?)?
        } else {
            candle_weights(weight)?
        };
        Ok(Self {
            weights,
            bias: None,
        })
    }

    /// A dense f32 matrix (out, in).
    fn dense(weight: Tensor) -> Self {
        Self {
            weights: Weights::Candle {
                direct: QMatMul::Tensor(weight),
                quantized: None,
            },
            bias: None,
        }
    }

    /// Output width.
    fn rows(&self) -> usize {
        match &self.weights {
            Weights::Q8(m) => m.rows(),
            Weights::Candle { direct, .. } => match direct {
                QMatMul::QTensor(t) => t.shape().dims().first().copied().unwrap_or(0),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
                    t.dims().first().copied().unwrap_or(0)
                }
            },
        }
    }

    /// The matrix, when it is held dense.
    fn dense_matrix(&self) -> Option<&Tensor> {
        match &self.weights {
            Weights::Candle {
                direct: QMatMul::Tensor(t),
                quantized: None,
            } => Some(t),
            _ => None,
        }
    }

    fn device(&self) -> Device {
        match &self.weights {
            Weights::Q8(_) => Device::Cpu,
            Weights::Candle { direct, .. } => match direct {
                QMatMul::QTensor(t) => t.device(),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.device().clone(),
            },
        }
    }

    fn with_bias(mut self, bias: Option<Tensor>) -> Self {
        self.bias = bias;
        self
    }

    /// `x`: (rows, in) → (rows, out). Many rows (prefill) on CPU: quantized weights are
    /// dequantized for this product and the blocked f32 GEMM does it.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let many = x.dim(0)? >= DEQUANTIZE_ROWS;
        let y = match &self.weights {
            Weights::Q8(w) if many => x.matmul(&w.dequantize(x.device())?.t()?)?,
            Weights::Q8(w) => w.matmul(&x.contiguous()?)?,
            Weights::Candle {
                quantized: Some(w), ..
            } if many && x.device().is_cpu() => x.matmul(&w.dequantize(x.device())?.t()?)?,
            Weights::Candle { direct, .. } => direct.forward(x)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

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

/// Projections of one input (query/key/value; gate/up), stacked into one matrix when their
/// weights allow it (8-bit blocks, or dense): one product instead of three or two — one
/// parallel region per decode step instead of several, and the prefill's activations
/// packed once for the GEMM.
enum Stacked {
    /// One matrix; the output's columns split into the parts' widths.
    One { w: Linear, widths: Vec<usize> },
    /// Weights that do not stack (candle's quantized types): one product each.
    Each(Vec<Linear>),
}

impl Stacked {
    fn new(parts: Vec<Linear>) -> Result<Self> {
        let q8 = parts.iter().all(|p| matches!(p.weights, Weights::Q8(_)));
        let dense = parts.iter().all(|p| p.dense_matrix().is_some());
        if !q8 && !dense {
            return Ok(Self::Each(parts));
        }
        let widths: Vec<usize> = parts.iter().map(Linear::rows).collect();
        let bias = match parts.iter().any(|p| p.bias.is_some()) {
            false => None,
            true => {
                let biases = parts
                    .iter()
                    .zip(&widths)
                    .map(|(p, &n)| match &p.bias {
                        Some(b) => Ok(b.clone()),
                        None => Tensor::zeros(n, DType::F32, &p.device()),
                    })
                    .collect::<Result<Vec<_>>>()?;
                Some(Tensor::cat(&biases, 0)?)
            }
        };
        let weights = if q8 {
            let blocks = parts
                .into_iter()
                .filter_map(|p| match p.weights {
                    Weights::Q8(m) => Some(m),
                    Weights::Candle { .. } => None,
                })
                .collect();
            Weights::Q8(Q8Matrix::stack(blocks)?)
        } else {
            let ws: Vec<&Tensor> = parts.iter().filter_map(Linear::dense_matrix).collect();
            Linear::dense(Tensor::cat(&ws, 0)?).weights
        };
        Ok(Self::One {
            w: Linear { weights, bias },
            widths,
        })
    }

    /// `x` (rows, in) → one (rows, width) output per part.
    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Self::Each(parts) => parts.iter().map(|p| p.forward(x)).collect(),
            Self::One { w, widths } => {
                let y = w.forward(x)?;
                let mut at = 0;
                widths
                    .iter()
                    .map(|&n| {
                        at += n;
                        y.narrow(1, at - n, n)
                    })
                    .collect()
            }
        }
    }
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

/// A safetensors checkpoint's tensors, taken out one by one as f32 on the model's device.
struct SafetensorsStore<'a> {
    tensors: HashMap<String, Tensor>,
    dir: &'a std::path::Path,
    device: &'a Device,
}

impl SafetensorsStore<'_> {
    fn take(&mut self, name: &str) -> Result<Tensor> {
        self.take_if_present(name)?.ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: tensor `{name}` missing", self.dir.display()))
        })
    }

    fn take_if_present(&mut self, name: &str) -> Result<Option<Tensor>> {
        self.tensors
            .remove(name)
            .map(|t| t.to_dtype(DType::F32)?.to_device(self.device))
            .transpose()
    }
}

pub struct Llama {
    pub cfg: Config,
    embeddings: Tensor,
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
    pub fn from_gguf<R: std::io::Read + std::io::Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
    ) -> Result<Self> {
        let mut cfg = Config::from_gguf(content)?;
        let mut q = |name: &str| content.tensor(reader, name, device);
        let has = |name: &str| content.tensor_infos.contains_key(name);
        let token_embd = q("token_embd.weight")?;
        let embeddings = token_embd.dequantize(device)?;
        let output = if has("output.weight") {
            Linear::new(q("output.weight")?, device)?
        } else {
            // tied embeddings: 8-bit blocks come from the f32 copy already made
            Linear::tied(token_embd, &embeddings, device)?
        };
        let norm = q("output_norm.weight")?.dequantize(device)?;
        // Llama 3's rope scaling, stored by llama.cpp's converter as per-pair divisors
        if has("rope_freqs.weight") {
            let factors = q("rope_freqs.weight")?
                .dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            if factors.len() != cfg.inv_freq.len() {
                candle_core::bail!(
                    "rope_freqs.weight has {} values for {} rotary pairs",
                    factors.len(),
                    cfg.inv_freq.len()
                );
            }
            for (f, d) in cfg.inv_freq.iter_mut().zip(factors) {
                *f /= d;
            }
        }
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let mut w = |n: &str| q(&format!("blk.{i}.{n}.weight"));
            let attn_norm = w("attn_norm")?.dequantize(device)?;
            let ffn_norm = w("ffn_norm")?.dequantize(device)?;
            let mut linear = |n: &str| Linear::new(w(n)?, device);
            let mut layer = Layer {
                attn_norm,
                wq: linear("attn_q")?,
                wk: linear("attn_k")?,
                wv: linear("attn_v")?,
                wo: linear("attn_output")?,
                ffn_norm,
                gate: linear("ffn_gate")?,
                up: linear("ffn_up")?,
                down: linear("ffn_down")?,
            };
            // qwen2's biases on the query, key and value projections
            let mut bias = |n: &str| -> Result<Option<Tensor>> {
                let name = format!("blk.{i}.{n}.bias");
                match has(&name) {
                    true => Ok(Some(q(&name)?.dequantize(device)?)),
                    false => Ok(None),
                }
            };
            layer.wq = layer.wq.with_bias(bias("attn_q")?);
            layer.wk = layer.wk.with_bias(bias("attn_k")?);
            layer.wv = layer.wv.with_bias(bias("attn_v")?);
            layers.push(layer);
        }
        Self::assemble(cfg, embeddings, layers, norm, output, device)
    }

    /// Loads a Hugging Face model directory's safetensors (llama or qwen2). Weights are held
    /// as dense f32 whatever their stored type (bf16, f16, f32), or with `q8` (CPU only) the
    /// projection and output matrices as 8-bit blocks ([`Q8Matrix`], a quarter of their f32
    /// memory); embeddings and norms stay f32, so a tied output matrix becomes an 8-bit
    /// copy next to them (as for GGUF).
    pub fn from_safetensors(model: &HfModel, device: &Device, q8: bool) -> Result<Self> {
        if q8 && !device.is_cpu() {
            candle_core::bail!("8-bit blocks (q8_0) are for CPU; on a GPU weights stay dense");
        }
        let cfg = Config::from_hf(model)?;
        // a matrix whose rows are not whole blocks stays dense
        let linear = |w: Tensor| -> Result<Linear> {
            match q8 && w.dim(1)?.is_multiple_of(q8::BLOCK) {
                true => Ok(Linear {
                    weights: Weights::Q8(Q8Matrix::from_tensor(&w)?),
                    bias: None,
                }),
                false => Ok(Linear::dense(w)),
            }
        };
        let mut store = SafetensorsStore {
            tensors: HashMap::new(),
            dir: &model.dir,
            device,
        };
        for file in &model.weights {
            store
                .tensors
                .extend(candle_core::safetensors::load(file, &Device::Cpu)?);
        }
        let embeddings = store.take("model.embed_tokens.weight")?;
        let norm = store.take("model.norm.weight")?;
        let output = if model.config.tie_word_embeddings {
            embeddings.clone()
        } else {
            store.take("lm_head.weight")?
        };
        // qwen2 always has query, key and value biases; any other bias is used where the
        // checkpoint has one (llama's attention_bias / mlp_bias)
        let qwen2 = model.architecture == "qwen2";
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = format!("model.layers.{i}");
            let mut proj = |n: &str, bias_required: bool| -> Result<Linear> {
                let weight = store.take(&format!("{p}.{n}.weight"))?;
                let bias = match bias_required {
                    true => Some(store.take(&format!("{p}.{n}.bias"))?),
                    false => store.take_if_present(&format!("{p}.{n}.bias"))?,
                };
                Ok(linear(weight)?.with_bias(bias))
            };
            layers.push(Layer {
                wq: proj("self_attn.q_proj", qwen2)?,
                wk: proj("self_attn.k_proj", qwen2)?,
                wv: proj("self_attn.v_proj", qwen2)?,
                wo: proj("self_attn.o_proj", false)?,
                gate: proj("mlp.gate_proj", false)?,
                up: proj("mlp.up_proj", false)?,
                down: proj("mlp.down_proj", false)?,
                attn_norm: store.take(&format!("{p}.input_layernorm.weight"))?,
                ffn_norm: store.take(&format!("{p}.post_attention_layernorm.weight"))?,
            });
        }
        // A tensor left over is a part of the model this forward would ignore: refuse
        // rather than serve wrong logits (old checkpoints' rotary caches excepted).
        let mut unused: Vec<&String> = store
            .tensors
            .keys()
            .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
            .collect();
        if !unused.is_empty() {
            unused.sort();
            candle_core::bail!(
                "{}: {} tensors this {} forward does not use, e.g. {}",
                model.dir.display(),
                unused.len(),
                model.architecture,
                unused
                    .iter()
                    .take(4)
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Self::assemble(cfg, embeddings, layers, norm, linear(output)?, device)
    }

    fn assemble(
        cfg: Config,
        embeddings: Tensor,
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

    /// CPU attention for the batch's decode items (one new row each): appends their keys
    /// and values to layer `l` of their caches, then computes every (sequence, head) pair
    /// in parallel straight from the caches' memory. A handful of tensor operations per
    /// layer instead of a dozen per sequence, which dominated small decode steps. Returns
    /// (decode items, hidden) row-major, in batch order; empty when there are none.
    fn attend_decode_rows_cpu(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        items: &mut [Item<'_>],
        l: usize,
    ) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let d = cfg.head_dim;
        let rows = q.dim(1)?;
        let mut decode = Vec::new(); // (batch row, cache length after this token)
        let mut row = 0;
        for item in items.iter() {
            if item.tokens.len() == 1 {
                decode.push((row, item.cache.len + 1));
            }
            row += item.tokens.len();
        }
        if decode.is_empty() {
            return Ok(Vec::new());
        }
        // (heads, rows, d) and (kv, rows, d), flattened
        let q = q.flatten_all()?.to_vec1::<f32>()?;
        let k = k.flatten_all()?.to_vec1::<f32>()?;
        let v = v.flatten_all()?.to_vec1::<f32>()?;
        let gather = |all: &[f32], r: usize| -> Vec<f32> {
            (0..cfg.kv_heads)
                .flat_map(|h| {
                    all[(h * rows + r) * d..(h * rows + r + 1) * d]
                        .iter()
                        .copied()
                })
                .collect()
        };
        let decoding = items.iter().filter(|i| i.tokens.len() == 1);
        for (item, &(r, total)) in decoding.zip(&decode) {
            let (kc, vc) = &item.cache.layers[l];
            let shape = (cfg.kv_heads, 1, d);
            kc.slice_set(
                &Tensor::from_vec(gather(&k, r), shape, &self.device)?,
                1,
                total - 1,
            )?;
            vc.slice_set(
                &Tensor::from_vec(gather(&v, r), shape, &self.device)?,
                1,
                total - 1,
            )?;
        }
        // every decode item's cache, read in place: (kv, capacity, d) keys and values
        let mut guards = Vec::with_capacity(decode.len());
        for item in items.iter().filter(|i| i.tokens.len() == 1) {
            let (kc, vc) = &item.cache.layers[l];
            guards.push((
                kc.storage_and_layout(),
                vc.storage_and_layout(),
                item.cache.capacity,
            ));
        }
        let mut caches = Vec::with_capacity(guards.len());
        for ((ks, kl), (vs, vl), capacity) in &guards {
            let (candle_core::Storage::Cpu(kc), candle_core::Storage::Cpu(vc)) = (&**ks, &**vs)
            else {
                candle_core::bail!("CPU attention over a cache on another device");
            };
            let keys = &kc.as_slice::<f32>()?[kl.start_offset()..];
            let values = &vc.as_slice::<f32>()?[vl.start_offset()..];
            caches.push((keys, values, *capacity));
        }
        let group = cfg.heads / cfg.kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; decode.len() * cfg.heads * d];
        out.par_chunks_mut(d).enumerate().for_each(|(task, out)| {
            let (i, h) = (task / cfg.heads, task % cfg.heads);
            let ((r, total), (keys, values, capacity)) = (decode[i], caches[i]);
            let base = (h / group) * capacity * d;
            let query = &q[(h * rows + r) * d..(h * rows + r + 1) * d];
            let mut scores: Vec<f32> = (0..total)
                .map(|t| {
                    let key = &keys[base + t * d..base + (t + 1) * d];
                    query.iter().zip(key).map(|(a, b)| a * b).sum::<f32>() * scale
                })
                .collect();
            let max = scores.iter().fold(f32::NEG_INFINITY, |m, s| m.max(*s));
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            for (t, p) in scores.iter().enumerate() {
                let value = &values[base + t * d..base + (t + 1) * d];
                for (o, x) in out.iter_mut().zip(value) {
                    *o += p * x;
                }
            }
            for o in out.iter_mut() {
                *o /= sum;
            }
        });
        Ok(out)
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
            let scores = q_block.matmul(&k_all.narrow(1, 0, keys)?.t()?)?;
            let probs = if self.device.is_cpu() {
                // scale, causal mask and softmax in one pass: row i of the block sees
                // keys ..=start+first+i
                CausalSoftmax {
                    scale: scale as f32,
                    queries: len,
                    first_visible: start + first + 1,
                }
                .apply(scores)?
            } else {
                let scores = (scores * scale)?;
                let scores = match mask {
                    Some(mask) => scores
                        .reshape((cfg.kv_heads, group, len, keys))?
                        .broadcast_add(&mask.narrow(0, first, len)?.narrow(1, 0, keys)?)?
                        .reshape((cfg.kv_heads, group * len, keys))?,
                    None => scores,
                };
                candle_nn::ops::softmax_last_dim(&scores)?
            };
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
    use model_meta::tiny::{
        HfArch, HfOptions, LlamaShape, hf_to_gguf, write_random_hf, write_random_llama,
    };

    /// A path inside a temporary directory that is removed when the test ends.
    struct Scratch {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
    }

    impl Scratch {
        fn new(name: &str, file: &str) -> Self {
            let dir = tempfile::Builder::new().prefix(name).tempdir().unwrap();
            let path = dir.path().join(file);
            Self { _dir: dir, path }
        }
    }

    impl std::ops::Deref for Scratch {
        type Target = std::path::Path;
        fn deref(&self) -> &std::path::Path {
            &self.path
        }
    }

    impl AsRef<std::path::Path> for Scratch {
        fn as_ref(&self) -> &std::path::Path {
            &self.path
        }
    }

    fn model_file(name: &str, shape: &LlamaShape) -> Scratch {
        let file = Scratch::new(&format!("llama-{name}"), "m.gguf");
        write_random_llama(&file, shape, 1024).unwrap();
        file
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
            // longer than two query blocks, so blocks start mid-chunk and mid-prompt
            let prompt: Vec<u32> = (0..300).map(|i| (i * 7 + 3) % 250).collect();
            let expected = reference
                .forward(
                    &Tensor::new(prompt.as_slice(), &Device::Cpu)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap(),
                    0,
                )
                .unwrap();
            // our prefill in two chunks (170 + 130 tokens): the cache carries the first
            let mut cache = model.new_cache();
            model
                .forward(&mut [Item {
                    tokens: &prompt[..170],
                    cache: &mut cache,
                }])
                .unwrap();
            let got = model
                .forward(&mut [Item {
                    tokens: &prompt[170..],
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

    fn hf_dir(name: &str, opts: &HfOptions) -> Scratch {
        let dir = Scratch::new(&format!("hf-{name}"), "model");
        write_random_hf(&dir, &LlamaShape::small(GgmlDType::F32), opts).unwrap();
        dir
    }

    fn from_hf(dir: &std::path::Path) -> Llama {
        Llama::from_safetensors(&HfModel::open(dir).unwrap(), &Device::Cpu, false).unwrap()
    }

    const LLAMA3: HfOptions = HfOptions {
        arch: HfArch::Llama,
        tie_embeddings: false,
        llama3_rope: true,
        context_length: 512,
        rope_theta: 500_000.0,
    };
    const QWEN2: HfOptions = HfOptions {
        arch: HfArch::Qwen2,
        tie_embeddings: true,
        llama3_rope: false,
        context_length: 512,
        rope_theta: 1_000_000.0,
    };

    /// Our prefill (in two chunks) and three decode steps; `reference` gives the logits of
    /// the same tokens at a position. Asserts every step's logits agree within `tol`.
    fn agrees_with(
        model: &Llama,
        mut reference: impl FnMut(&[u32], usize) -> Tensor,
        tol: f32,
        what: &str,
    ) {
        let prompt: Vec<u32> = (0..90).map(|i| (i * 7 + 3) % 250).collect();
        let mut cache = model.new_cache();
        let step = |tokens: &[u32], cache: &mut KvCache| {
            model.forward(&mut [Item { tokens, cache }]).unwrap()
        };
        step(&prompt[..50], &mut cache);
        let got = step(&prompt[50..], &mut cache);
        let g = gap(&reference(&prompt, 0).flatten_all().unwrap(), &got);
        assert!(g < tol, "{what}: prefill logits differ by {g}");
        for (i, token) in [5u32, 77, 200].into_iter().enumerate() {
            let got = step(&[token], &mut cache);
            let expected = reference(&[token], prompt.len() + i);
            let g = gap(&expected.flatten_all().unwrap(), &got);
            assert!(g < tol, "{what}: decode step {i} logits differ by {g}");
        }
    }

    /// Safetensors llama (Llama 3 rope scaling, separate output matrix) against candle's
    /// reference llama, and qwen2 (biases, tied embeddings) against candle's qwen2, on the
    /// same random bf16 checkpoint: prefill at positions past the scaling's original
    /// context and decode give the same logits.
    #[test]
    fn safetensors_models_match_candle_reference_implementations() {
        use candle_transformers::models::{llama, qwen2};
        let tensors = |dir: &std::path::Path| {
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
        };
        let config =
            |dir: &std::path::Path| std::fs::read_to_string(dir.join("config.json")).unwrap();
        let ids = |t: &[u32]| Tensor::new(t, &Device::Cpu).unwrap().unsqueeze(0).unwrap();

        let dir = hf_dir("llama3", &LLAMA3);
        let cfg: llama::LlamaConfig = serde_json::from_str(&config(&dir)).unwrap();
        let cfg = cfg.into_config(false);
        let vb = candle_nn::VarBuilder::from_tensors(tensors(&dir), DType::F32, &Device::Cpu);
        let reference = llama::Llama::load(vb, &cfg).unwrap();
        let mut cache = llama::Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();
        agrees_with(
            &from_hf(&dir),
            |t, pos| reference.forward(&ids(t), pos, &mut cache).unwrap(),
            1e-4,
            "llama",
        );

        let dir = hf_dir("qwen2", &QWEN2);
        let cfg: qwen2::Config = serde_json::from_str(&config(&dir)).unwrap();
        let vb = candle_nn::VarBuilder::from_tensors(tensors(&dir), DType::F32, &Device::Cpu);
        let mut reference = qwen2::ModelForCausalLM::new(&cfg, vb).unwrap();
        agrees_with(
            &from_hf(&dir),
            |t, pos| reference.forward(&ids(t), pos).unwrap(),
            1e-4,
            "qwen2",
        );
    }

    /// `--quantize q8_0`: every projection and the output matrix (tied or not) become 8-bit
    /// blocks, and the model gives the f32 model's logits within quantization error.
    #[test]
    fn safetensors_weights_quantize_to_8_bit_blocks() {
        for (name, opts) in [("llama3-q8", LLAMA3), ("qwen2-q8", QWEN2)] {
            let dir = hf_dir(name, &opts);
            let dense = from_hf(&dir);
            let q8 =
                Llama::from_safetensors(&HfModel::open(&dir).unwrap(), &Device::Cpu, true).unwrap();
            let blocks = |l: &Linear| matches!(l.weights, Weights::Q8(_));
            let stacked = |s: &Stacked| matches!(s, Stacked::One { w, .. } if blocks(w));
            assert!(blocks(&q8.output), "{name}: output");
            for b in &q8.layers {
                assert!(stacked(&b.qkv) && stacked(&b.gate_up), "{name}");
                assert!(blocks(&b.wo) && blocks(&b.down), "{name}");
            }
            assert!(!blocks(&dense.output));
            let mut cache = dense.new_cache();
            agrees_with(
                &q8,
                |tokens, _| {
                    dense
                        .forward(&mut [Item {
                            tokens,
                            cache: &mut cache,
                        }])
                        .unwrap()
                },
                2e-2,
                name,
            );
        }
    }

    /// The same checkpoint converted to GGUF as llama.cpp converts it (query and key rows
    /// reordered for interleaved rope, Llama 3 scaling as rope_freqs, qwen2 biases) runs
    /// to the same logits: F32 exactly, Q8_0 within quantization error.
    #[test]
    fn gguf_conversions_match_their_safetensors() {
        for (name, opts) in [("llama3", LLAMA3), ("qwen2", QWEN2)] {
            let dir = hf_dir(&format!("{name}-conv"), &opts);
            let hf = from_hf(&dir);
            for (dtype, tol) in [(GgmlDType::F32, 1e-4), (GgmlDType::Q8_0, 2e-2)] {
                let gguf = dir.join(format!("m-{dtype:?}.gguf"));
                hf_to_gguf(&dir, &gguf, dtype).unwrap();
                let converted = ours(&gguf);
                assert_eq!(converted.cfg.rope_interleaved, name == "llama3");
                let mut cache = hf.new_cache();
                agrees_with(
                    &converted,
                    |t, _| {
                        hf.forward(&mut [Item {
                            tokens: t,
                            cache: &mut cache,
                        }])
                        .unwrap()
                    },
                    tol,
                    &format!("{name} {dtype:?}"),
                );
            }
        }
    }

    /// A llama checkpoint with an attention bias (`attention_bias: true`) is run with it,
    /// and a tensor the forward has no place for is refused by name instead of ignored.
    #[test]
    fn safetensors_biases_are_used_and_unknown_tensors_refused() {
        let dir = hf_dir("extra", &LLAMA3);
        let file = dir.join("model.safetensors");
        let original = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
        let with = |extra: &str, len: usize| {
            let mut t = original.clone();
            let bias = Tensor::full(0.5f32, len, &Device::Cpu).unwrap();
            t.insert(extra.to_string(), bias);
            candle_core::safetensors::save(&t, &file).unwrap();
        };
        let prompt: Vec<u32> = (1..20).collect();
        let logits = |m: &Llama| {
            let mut cache = m.new_cache();
            m.forward(&mut [Item {
                tokens: &prompt,
                cache: &mut cache,
            }])
            .unwrap()
        };
        let plain = logits(&from_hf(&dir));
        with("model.layers.1.self_attn.q_proj.bias", 64);
        let biased = logits(&from_hf(&dir));
        assert!(gap(&plain, &biased) > 1e-3, "the bias changed nothing");
        with("model.layers.0.mlp.experts.weight", 8);
        let err = Llama::from_safetensors(&HfModel::open(&dir).unwrap(), &Device::Cpu, false)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("`model.layers.0.mlp.experts.weight`"), "{err}");
    }

    /// Stacked projections (8-bit blocks, and dense with a bias on one part only) give each
    /// part's own product, for decode-sized and prefill-sized inputs.
    #[test]
    fn stacked_products_equal_separate_ones() {
        let dev = Device::Cpu;
        let matrix = |rows: usize, seed: f64| {
            Tensor::arange(0f32, (rows * 64) as f32, &dev)
                .unwrap()
                .affine(0.37, seed)
                .unwrap()
                .sin()
                .unwrap()
                .reshape((rows, 64))
                .unwrap()
        };
        let shapes = [(96usize, 0.1), (32, 0.2), (64, 0.3)];
        let parts = |q8: bool| -> Vec<Linear> {
            shapes
                .iter()
                .enumerate()
                .map(|(i, &(rows, seed))| {
                    let w = matrix(rows, seed);
                    let l = match q8 {
                        true => Linear {
                            weights: Weights::Q8(Q8Matrix::from_tensor(&w).unwrap()),
                            bias: None,
                        },
                        false => Linear::dense(w),
                    };
                    // a bias on the middle part only
                    l.with_bias((i == 1).then(|| Tensor::full(0.25f32, rows, &dev).unwrap()))
                })
                .collect()
        };
        for q8 in [true, false] {
            let stacked = Stacked::new(parts(q8)).unwrap();
            assert!(matches!(stacked, Stacked::One { .. }));
            for rows in [1, 3, DEQUANTIZE_ROWS + 5] {
                let x = matrix(rows, 0.9);
                let got = stacked.forward(&x).unwrap();
                for (part, got) in parts(q8).iter().zip(&got) {
                    let expected = part.forward(&x).unwrap();
                    let g = gap(&expected, &got.contiguous().unwrap());
                    assert!(g < 1e-5, "q8 {q8}, {rows} rows: {g}");
                }
            }
        }
    }

    #[test]
    fn unsupported_gguf_architectures_are_refused_by_name() {
        let path = model_file("arch", &LlamaShape::TINY);
        let mut f = std::fs::File::open(&path).unwrap();
        let mut c = gguf_file::Content::read(&mut f).unwrap();
        c.metadata.insert(
            "general.architecture".into(),
            gguf_file::Value::String("phi3".into()),
        );
        let err = Llama::from_gguf(&c, &mut f, &Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("`phi3` is not supported"), "{err}");
    }

    /// GGUF linear rope scaling divides every frequency; yarn is refused by name.
    #[test]
    fn gguf_rope_scaling_is_applied_or_refused() {
        let path = model_file("scaling", &LlamaShape::TINY);
        let mut f = std::fs::File::open(&path).unwrap();
        let mut c = gguf_file::Content::read(&mut f).unwrap();
        let plain = Config::from_gguf(&c).unwrap().inv_freq;
        let s = |v: &str| gguf_file::Value::String(v.into());
        c.metadata
            .insert("llama.rope.scaling.type".into(), s("linear"));
        c.metadata.insert(
            "llama.rope.scaling.factor".into(),
            gguf_file::Value::F32(4.0),
        );
        let linear = Config::from_gguf(&c).unwrap().inv_freq;
        for (p, l) in plain.iter().zip(&linear) {
            assert!((p / 4.0 - l).abs() < 1e-9, "{p} / 4 vs {l}");
        }
        c.metadata
            .insert("llama.rope.scaling.type".into(), s("yarn"));
        let err = Config::from_gguf(&c).unwrap_err().to_string();
        assert!(err.contains("`yarn` is not supported"), "{err}");
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

    /// The padded batch form of decode attention (the GPU default) gives the CPU form's
    /// logits (decode rows read from their caches), for sequences of different lengths.
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
