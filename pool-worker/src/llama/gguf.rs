//! The GGUF loader: llama.cpp's tensor names (`blk.N.attn_q.weight`, ...) and metadata
//! (`llama.attention.head_count`, ...) into a [`Config`] and a [`Llama`].

use candle_core::quantized::gguf_file;
use candle_core::{Device, Result, Tensor};
use model_meta::rope_inv_freq;

use super::config::check_shape;
use super::embedding::Embeddings;
use super::linear::Linear;
use super::{Arch, Config, Layer, Llama};

impl Config {
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        // a file without the key is taken for llama
        let name = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok());
        let arch = match name {
            Some(name) => {
                Arch::parse(name).map_err(|e| candle_core::Error::Msg(format!("GGUF {e}")))?
            }
            None => Arch::Llama,
        };
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
            arch,
            hidden,
            heads,
            kv_heads,
            head_dim,
            layers: u("block_count")?,
            eps: f64::from(get("attention.layer_norm_rms_epsilon")?.to_f32()?),
            inv_freq,
            rope_interleaved: arch.gguf_rope_interleaved(),
            context_length: u("context_length")?,
        })
    }
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
        let embeddings = Embeddings::from_gguf(&token_embd, device)?;
        let output = if has("output.weight") {
            Linear::new(q("output.weight")?, device)?
        } else {
            // tied embeddings: the output matrix is the table, in its own form
            let f32_copy = match &embeddings {
                Embeddings::Dense(t) => t.clone(),
                Embeddings::Quantized { .. } => token_embd.dequantize(device)?,
            };
            Linear::tied(token_embd, &f32_copy, device)?
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
}
