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
    let eos = (tokens.len() - 1) as u32; // <|im_end|>
    while tokens.len() < vocab_size {
        tokens.push(format!("<filler{}>", tokens.len()));
        types.push(1);
    }
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
