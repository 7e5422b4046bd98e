//! A tiny random-weight llama GGUF for fast tests.
//!
//! The file is a real GGUF that candle's `quantized_llama` loads: llama architecture,
//! a byte-level BPE vocabulary (the 256 byte symbols plus ChatML specials) stored in
//! `tokenizer.ggml.*`, a ChatML chat template, and deterministic pseudo-random F32 weights.
//! It lets the integration tests run the real worker code path in milliseconds.
//!
//! [`write_random_llama`] writes the same kind of file at any [`LlamaShape`], e.g.
//! [`LlamaShape::SMOLLM2_135M`] quantized to Q4_1: a model with exactly the real one's
//! tensor shapes and quantization, for throughput benchmarks on machines that cannot fetch
//! the real weights (its text is nonsense; its speed is the real model's).
//!
//! [`write_random_hf`] writes a random model as a Hugging Face directory (config.json,
//! bf16 safetensors, tokenizer.json, tokenizer_config.json), llama or qwen2, and
//! [`hf_to_gguf`] converts such a directory to GGUF the way llama.cpp's converter does, so
//! tests can check both loaders against a reference implementation and each other.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{RngExt, SeedableRng};

use crate::template::CHATML;

/// Special tokens of the tiny vocabulary, appended after the 256 byte symbols.
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// The dimensions and weight type of a random llama.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LlamaShape {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub layers: usize,
    pub ffn: usize,
    /// Vocabulary size; at least the 256 byte symbols plus [`SPECIALS`]. Entries beyond
    /// those are filler tokens no text encodes to (they only give the embedding and output
    /// matrices their real size).
    pub vocab: usize,
    /// Weight type of the matrices (norms stay F32). Quantized types need `hidden` and
    /// `ffn` to be multiples of the type's block size.
    pub dtype: GgmlDType,
}

impl LlamaShape {
    /// The tiny test model: 2 layers, hidden size 32, F32.
    pub const TINY: Self = Self {
        hidden: 32,
        heads: 4,
        kv_heads: 2,
        layers: 2,
        ffn: 64,
        vocab: 256 + SPECIALS.len(),
        dtype: GgmlDType::F32,
    };
    /// A 2-layer model whose sizes (hidden 64, FFN 128) are whole blocks of every GGUF
    /// quantization: for tests of the quantized paths.
    pub const fn small(dtype: GgmlDType) -> Self {
        Self {
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            layers: 2,
            ffn: 128,
            vocab: 300,
            dtype,
        }
    }
    /// SmolLM2-135M-Instruct's shapes, Q4_1 like the GGUF the CPU pools serve.
    pub const SMOLLM2_135M: Self = Self {
        hidden: 576,
        heads: 9,
        kv_heads: 3,
        layers: 30,
        ffn: 1536,
        vocab: 49152,
        dtype: GgmlDType::Q4_1,
    };
}

/// Writes the tiny model to `path`. `context_length` is what the metadata advertises.
pub fn write_tiny_llama(path: &Path, context_length: u32) -> candle_core::Result<()> {
    write_random_llama(path, &LlamaShape::TINY, context_length)
}

/// Writes a random-weight llama of the given shape to `path`.
pub fn write_random_llama(
    path: &Path,
    shape: &LlamaShape,
    context_length: u32,
) -> candle_core::Result<()> {
    let LlamaShape {
        hidden,
        heads,
        kv_heads,
        layers,
        ffn,
        vocab: vocab_size,
        dtype,
    } = *shape;
    let (tokens, types) = tiny_vocab(vocab_size);
    let eos = (256 + SPECIALS.len() - 1) as u32; // <|im_end|>
    let vocab = tokens.len();

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5717c4);
    let dev = Device::Cpu;
    let mut tensor = |shape: &[usize], scale: f32| -> candle_core::Result<QTensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
        QTensor::quantize(&Tensor::from_vec(data, shape, &dev)?, dtype)
    };
    let ones = |n: usize| -> candle_core::Result<QTensor> {
        QTensor::quantize(
            &Tensor::ones(n, candle_core::DType::F32, &dev)?,
            GgmlDType::F32,
        )
    };
    // Matrix weights: ±0.2 at the tiny model's sizes (the values the tests were written
    // against), ±1/√fan_in beyond, so deep wide models keep finite activations.
    let w = |fan_in: usize| -> f32 {
        if fan_in <= 64 {
            0.2
        } else {
            (fan_in as f32).sqrt().recip()
        }
    };
    let head_dim = hidden / heads;
    let kv_dim = head_dim * kv_heads;
    let mut named: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), tensor(&[vocab, hidden], 0.5)?),
        ("output_norm.weight".into(), ones(hidden)?),
        ("output.weight".into(), tensor(&[vocab, hidden], 0.5)?),
    ];
    for l in 0..layers {
        let p = format!("blk.{l}");
        named.push((
            format!("{p}.attn_q.weight"),
            tensor(&[hidden, hidden], w(hidden))?,
        ));
        named.push((
            format!("{p}.attn_k.weight"),
            tensor(&[kv_dim, hidden], w(hidden))?,
        ));
        named.push((
            format!("{p}.attn_v.weight"),
            tensor(&[kv_dim, hidden], w(hidden))?,
        ));
        named.push((
            format!("{p}.attn_output.weight"),
            tensor(&[hidden, hidden], w(hidden))?,
        ));
        named.push((
            format!("{p}.ffn_gate.weight"),
            tensor(&[ffn, hidden], w(hidden))?,
        ));
        named.push((
            format!("{p}.ffn_up.weight"),
            tensor(&[ffn, hidden], w(hidden))?,
        ));
        named.push((
            format!("{p}.ffn_down.weight"),
            tensor(&[hidden, ffn], w(ffn))?,
        ));
        named.push((format!("{p}.attn_norm.weight"), ones(hidden)?));
        named.push((format!("{p}.ffn_norm.weight"), ones(hidden)?));
    }

    let s = |v: &str| Value::String(v.to_string());
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", s("llama")),
        ("general.name", s("tiny-llama")),
        ("llama.context_length", Value::U32(context_length)),
        ("llama.embedding_length", Value::U32(hidden as u32)),
        ("llama.block_count", Value::U32(layers as u32)),
        ("llama.feed_forward_length", Value::U32(ffn as u32)),
        ("llama.attention.head_count", Value::U32(heads as u32)),
        ("llama.attention.head_count_kv", Value::U32(kv_heads as u32)),
        ("llama.rope.dimension_count", Value::U32(head_dim as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("smollm")),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.iter().map(|t| Value::I32(*t)).collect()),
        ),
        ("tokenizer.ggml.merges", Value::Array(Vec::new())),
        ("tokenizer.ggml.eos_token_id", Value::U32(eos)),
        ("tokenizer.ggml.bos_token_id", Value::U32(eos - 2)),
        ("tokenizer.chat_template", s(CHATML)),
    ];
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = named.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut buf = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &md, &ts)?;
    let mut file = std::fs::File::create(path)?;
    file.write_all(buf.get_ref())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GgufInfo, TokenizerSource, load_tokenizer, read_gguf};

    #[test]
    fn tiny_model_round_trips_metadata_and_tokenizer() {
        let dir = std::env::temp_dir().join(format!("tiny-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tiny.gguf");
        write_tiny_llama(&path, 2048).unwrap();
        let info = GgufInfo::from_content(&read_gguf(&path).unwrap()).unwrap();
        assert_eq!(info.architecture, "llama");
        assert_eq!(info.context_length, 2048);
        let tok = load_tokenizer(&TokenizerSource::Gguf(path.clone())).unwrap();
        let enc = tok
            .encode("<|im_start|>user\nhé 42<|im_end|>", false)
            .unwrap();
        // the two specials are single tokens; with no merges every other byte is one token
        assert_eq!(enc.get_ids().len(), 2 + "user\nhé 42".len());
        let text = tok.decode(enc.get_ids(), false).unwrap();
        assert_eq!(text, "<|im_start|>user\nhé 42<|im_end|>");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The family of a random Hugging Face model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfArch {
    /// Llama: no attention biases, GGUF pre-tokenizer `llama-bpe`.
    Llama,
    /// Qwen2: biases on the query, key and value projections, pre-tokenizer `qwen2`.
    Qwen2,
}

impl HfArch {
    fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
        }
    }
    fn pre_tokenizer(self) -> &'static str {
        match self {
            Self::Llama => "llama-bpe",
            Self::Qwen2 => "qwen2",
        }
    }
}

/// What a random Hugging Face model looks like beyond its [`LlamaShape`].
#[derive(Debug, Clone, Copy)]
pub struct HfOptions {
    pub arch: HfArch,
    /// The output matrix is the embedding matrix (no `lm_head.weight`).
    pub tie_embeddings: bool,
    /// Llama 3's rope scaling (factor 8 over an original context of 64 positions, so the
    /// scaling shows at test sizes).
    pub llama3_rope: bool,
    pub context_length: u32,
    pub rope_theta: f32,
}

/// The tiny vocabulary: the 256 byte symbols, [`SPECIALS`], then fillers up to `size`.
/// Returns the tokens and their GGUF token types.
fn tiny_vocab(size: usize) -> (Vec<String>, Vec<i32>) {
    let mut symbols: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .collect();
    symbols.sort_unstable();
    let mut tokens: Vec<String> = symbols.iter().map(|c| c.to_string()).collect();
    let mut types = vec![1i32; tokens.len()];
    for s in SPECIALS {
        tokens.push(s.to_string());
        types.push(3);
    }
    while tokens.len() < size {
        tokens.push(format!("<filler{}>", tokens.len()));
        types.push(1);
    }
    (tokens, types)
}

fn json_err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// The rope scaling [`write_random_hf`] writes when `llama3_rope` is set.
fn test_rope_scaling() -> crate::RopeScaling {
    crate::RopeScaling {
        rope_type: Some("llama3".into()),
        legacy_type: None,
        factor: Some(8.0),
        low_freq_factor: Some(1.0),
        high_freq_factor: Some(4.0),
        original_max_position_embeddings: Some(64),
    }
}

/// Writes a random model of `shape` as a Hugging Face directory `dir`. Weights are stored
/// as bf16, as checkpoints usually are; `shape.dtype` is ignored.
pub fn write_random_hf(
    dir: &Path,
    shape: &LlamaShape,
    opts: &HfOptions,
) -> candle_core::Result<()> {
    std::fs::create_dir_all(dir)?;
    let (tokens, types) = tiny_vocab(shape.vocab);
    let vocab = tokens.len();
    let eos = (256 + SPECIALS.len() - 1) as u32; // <|im_end|>
    let head_dim = shape.hidden / shape.heads;
    let kv_dim = head_dim * shape.kv_heads;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x9f_2ca1);
    let dev = Device::Cpu;
    let mut named: HashMap<String, Tensor> = HashMap::new();
    let mut put = |name: String, dims: &[usize], scale: f32| -> candle_core::Result<()> {
        let n: usize = dims.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
        let t = Tensor::from_vec(data, dims, &dev)?.to_dtype(candle_core::DType::BF16)?;
        named.insert(name, t);
        Ok(())
    };
    let w = |fan_in: usize| (fan_in as f32).sqrt().recip();
    put(
        "model.embed_tokens.weight".into(),
        &[vocab, shape.hidden],
        0.5,
    )?;
    if !opts.tie_embeddings {
        put("lm_head.weight".into(), &[vocab, shape.hidden], 0.5)?;
    }
    for l in 0..shape.layers {
        let p = format!("model.layers.{l}");
        let h = shape.hidden;
        put(format!("{p}.self_attn.q_proj.weight"), &[h, h], w(h))?;
        put(format!("{p}.self_attn.k_proj.weight"), &[kv_dim, h], w(h))?;
        put(format!("{p}.self_attn.v_proj.weight"), &[kv_dim, h], w(h))?;
        put(format!("{p}.self_attn.o_proj.weight"), &[h, h], w(h))?;
        put(format!("{p}.mlp.gate_proj.weight"), &[shape.ffn, h], w(h))?;
        put(format!("{p}.mlp.up_proj.weight"), &[shape.ffn, h], w(h))?;
        put(
            format!("{p}.mlp.down_proj.weight"),
            &[h, shape.ffn],
            w(shape.ffn),
        )?;
        // norms near 1, so a norm weight that is ignored or misplaced changes the logits
        put(format!("{p}.input_layernorm.weight"), &[h], 0.3)?;
        put(format!("{p}.post_attention_layernorm.weight"), &[h], 0.3)?;
        if opts.arch == HfArch::Qwen2 {
            put(format!("{p}.self_attn.q_proj.bias"), &[h], 0.5)?;
            put(format!("{p}.self_attn.k_proj.bias"), &[kv_dim], 0.5)?;
            put(format!("{p}.self_attn.v_proj.bias"), &[kv_dim], 0.5)?;
        }
    }
    put("model.norm.weight".into(), &[shape.hidden], 0.3)?;
    for (name, t) in named.iter_mut() {
        if name.ends_with("norm.weight") {
            *t =
                (t.to_dtype(candle_core::DType::F32)? + 1.0)?.to_dtype(candle_core::DType::BF16)?;
        }
    }
    candle_core::safetensors::save(&named, dir.join("model.safetensors"))?;

    let mut config = serde_json::json!({
        "architectures": [match opts.arch {
            HfArch::Llama => "LlamaForCausalLM",
            HfArch::Qwen2 => "Qwen2ForCausalLM",
        }],
        "model_type": opts.arch.name(),
        "hidden_size": shape.hidden,
        "intermediate_size": shape.ffn,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "num_hidden_layers": shape.layers,
        "rms_norm_eps": 1e-6,
        "rope_theta": opts.rope_theta,
        "max_position_embeddings": opts.context_length,
        "vocab_size": vocab,
        "tie_word_embeddings": opts.tie_embeddings,
        "hidden_act": "silu",
        "bos_token_id": eos - 2,
        "eos_token_id": eos,
        "torch_dtype": "bfloat16",
        // qwen2's config carries these even when the window is off
        "use_sliding_window": false,
        "sliding_window": opts.context_length,
        "max_window_layers": shape.layers,
    });
    if opts.llama3_rope {
        let s = test_rope_scaling();
        config["rope_scaling"] = serde_json::json!({
            "rope_type": s.rope_type,
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        });
    }
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).map_err(json_err);
    std::fs::write(dir.join("config.json"), pretty(&config)?)?;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        pretty(&serde_json::json!({
            "bos_token": SPECIALS[0],
            "eos_token": {"content": SPECIALS[2], "special": true},
            "chat_template": CHATML,
        }))?,
    )?;
    std::fs::write(
        dir.join("generation_config.json"),
        pretty(&serde_json::json!({ "eos_token_id": [eos, eos - 2] }))?,
    )?;
    let tokenizer =
        crate::gguf_tokenizer::bpe_tokenizer(&tokens, &[], &types, Some(opts.arch.pre_tokenizer()))
            .map_err(json_err)?;
    tokenizer
        .save(dir.join("tokenizer.json"), true)
        .map_err(json_err)?;
    Ok(())
}

/// llama.cpp's reordering of llama's query and key rows: each head's two rotary halves
/// become interleaved pairs, for GGUF's interleaved rope.
fn interleave_heads(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    w.reshape((heads, 2, out / heads / 2, inp))?
        .transpose(1, 2)?
        .reshape((out, inp))
}

/// Converts a Hugging Face directory written by [`write_random_hf`] to a GGUF file at `out`,
/// with matrices of type `dtype`: names mapped as llama.cpp's converter maps them, llama's
/// query and key rows reordered for interleaved rope, Llama 3 rope scaling stored as
/// `rope_freqs.weight`, and the tokenizer stored in `tokenizer.ggml.*`.
pub fn hf_to_gguf(dir: &Path, out: &Path, dtype: GgmlDType) -> candle_core::Result<()> {
    let model = crate::HfModel::open(dir).map_err(json_err)?;
    let cfg = &model.config;
    let arch = model.architecture.as_str();
    let heads = cfg.num_attention_heads;
    let kv_heads = cfg.num_key_value_heads.unwrap_or(heads);
    let head_dim = cfg.hidden_size / heads;
    let mut tensors = HashMap::new();
    for file in &model.weights {
        tensors.extend(candle_core::safetensors::load(file, &Device::Cpu)?);
    }
    let mut named: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in tensors {
        let t = t.to_dtype(candle_core::DType::F32)?;
        let gguf = name
            .replace("model.embed_tokens", "token_embd")
            .replace("model.norm", "output_norm")
            .replace("lm_head", "output")
            .replace("model.layers.", "blk.")
            .replace("self_attn.q_proj", "attn_q")
            .replace("self_attn.k_proj", "attn_k")
            .replace("self_attn.v_proj", "attn_v")
            .replace("self_attn.o_proj", "attn_output")
            .replace("mlp.gate_proj", "ffn_gate")
            .replace("mlp.up_proj", "ffn_up")
            .replace("mlp.down_proj", "ffn_down")
            .replace("post_attention_layernorm", "ffn_norm")
            .replace("input_layernorm", "attn_norm");
        let t = match (arch, gguf.rsplit('.').nth(1)) {
            ("llama", Some("attn_q")) if gguf.ends_with(".weight") => interleave_heads(&t, heads)?,
            ("llama", Some("attn_k")) if gguf.ends_with(".weight") => {
                interleave_heads(&t, kv_heads)?
            }
            _ => t,
        };
        let ty = if t.rank() == 2 { dtype } else { GgmlDType::F32 };
        named.push((gguf, QTensor::quantize(&t, ty)?));
    }
    if let Some(scaling) = &cfg.rope_scaling {
        let base = crate::rope_inv_freq(cfg.rope_theta as f32, head_dim);
        let mut scaled = base.clone();
        scaling.apply(&mut scaled);
        let factors: Vec<f32> = base.iter().zip(&scaled).map(|(b, s)| b / s).collect();
        let n = factors.len();
        named.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(&Tensor::from_vec(factors, n, &Device::Cpu)?, GgmlDType::F32)?,
        ));
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let (tokens, types) = tiny_vocab(cfg.vocab_size);
    let s = |v: &str| Value::String(v.to_string());
    let u = |v: usize| Value::U32(v as u32);
    let key = |k: &str| format!("{arch}.{k}");
    let eos = model.eos_token_ids.iter().copied().max().unwrap_or(0);
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s(arch)),
        ("general.name".into(), s(&format!("tiny-{arch}"))),
        (key("context_length"), u(cfg.max_position_embeddings)),
        (key("embedding_length"), u(cfg.hidden_size)),
        (key("block_count"), u(cfg.num_hidden_layers)),
        (key("feed_forward_length"), u(cfg.intermediate_size)),
        (key("attention.head_count"), u(heads)),
        (key("attention.head_count_kv"), u(kv_heads)),
        (key("rope.dimension_count"), u(head_dim)),
        (key("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        (
            "tokenizer.ggml.pre".into(),
            s(if arch == "qwen2" {
                "qwen2"
            } else {
                "llama-bpe"
            }),
        ),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.iter().map(|t| Value::I32(*t)).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(Vec::new())),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)),
        ("tokenizer.chat_template".into(), s(CHATML)),
    ];
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = named.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut buf = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &md, &ts)?;
    std::fs::write(out, buf.get_ref())?;
    Ok(())
}
