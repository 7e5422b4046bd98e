//! The safetensors loader: a Hugging Face model directory (config.json and
//! `model.layers.N.self_attn.q_proj.weight`, ...) into a [`Config`] and a [`Llama`].

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use model_meta::{HfModel, rope_inv_freq};

use super::config::check_shape;
use super::linear::{Linear, Weights};
use super::{Arch, Config, Layer, Llama};
use crate::q8::{self, Q8Matrix};

impl Config {
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
            arch: Arch::parse(&model.architecture)?,
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

impl Llama {
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
        let qkv_bias = cfg.arch.qkv_bias();
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
                wq: proj("self_attn.q_proj", qkv_bias)?,
                wk: proj("self_attn.k_proj", qkv_bias)?,
                wv: proj("self_attn.v_proj", qkv_bias)?,
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
                cfg.arch,
                unused
                    .iter()
                    .take(4)
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Self::assemble(
            cfg,
            super::embedding::Embeddings::Dense(embeddings),
            layers,
            norm,
            linear(output)?,
            device,
        )
    }
}
