//! The forward against candle's reference models, and the loaders' refusals.

use candle_core::quantized::{GgmlDType, gguf_file};
use candle_core::{DType, Device, Tensor};
use model_meta::HfModel;

use super::linear::{DEQUANTIZE_ROWS, Linear, Stacked, Weights};
use super::*;
use crate::q8::Q8Matrix;
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
    let step =
        |tokens: &[u32], cache: &mut KvCache| model.forward(&mut [Item { tokens, cache }]).unwrap();
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
    let config = |dir: &std::path::Path| std::fs::read_to_string(dir.join("config.json")).unwrap();
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

/// A cache rebuilt from copied-out blocks gives the logits the original cache gives: the
/// prefix cache's copy and restore lose nothing (Q4_1, the real pools' weight type).
#[test]
fn a_cache_restored_from_blocks_equals_the_one_it_was_copied_from() {
    let path = model_file(
        "restore",
        &LlamaShape::small(candle_core::quantized::GgmlDType::Q4_1),
    );
    let model = ours(&path);
    let prompt: Vec<u32> = (10..110).collect(); // 100 tokens
    let mut full = model.new_cache();
    model
        .forward(&mut [Item {
            tokens: &prompt,
            cache: &mut full,
        }])
        .unwrap();
    // blocks of 32, 32 and 16 tokens copied out, the last 20 not
    let blocks = [
        full.copy_out(0, 32).unwrap(),
        full.copy_out(32, 32).unwrap(),
        full.copy_out(64, 16).unwrap(),
    ];
    assert_eq!(blocks.iter().map(KvBlock::tokens).sum::<usize>(), 80);
    let cfg = &model.cfg;
    assert_eq!(
        blocks[0].bytes(),
        cfg.layers * 2 * cfg.kv_heads * 32 * cfg.head_dim * 4
    );
    assert!(full.copy_out(90, 32).is_err(), "past what the cache holds");
    let refs: Vec<&KvBlock> = blocks.iter().collect();
    let mut restored = model.cache_from(&refs).unwrap();
    assert_eq!(restored.len(), 80);
    // the rest of the prompt on the restored cache, then one decode step on both
    let rest = model
        .forward(&mut [Item {
            tokens: &prompt[80..],
            cache: &mut restored,
        }])
        .unwrap();
    let mut again = model.new_cache();
    let whole = model
        .forward(&mut [Item {
            tokens: &prompt,
            cache: &mut again,
        }])
        .unwrap();
    assert!(gap(&rest, &whole) < 1e-4, "gap {}", gap(&rest, &whole));
    let next = |cache: &mut KvCache| {
        model
            .forward(&mut [Item {
                tokens: &[7],
                cache,
            }])
            .unwrap()
    };
    let (a, b) = (next(&mut restored), next(&mut full));
    assert!(gap(&a, &b) < 1e-4, "gap {}", gap(&a, &b));
    // blocks outlive the cache they came from, and a block from another model is refused
    drop(full);
    assert!(model.cache_from(&refs).is_ok());
    let three = LlamaShape {
        layers: 3,
        ..LlamaShape::TINY
    };
    let other = ours(&model_file("restore-other", &three));
    let err = other.cache_from(&refs).err().map(|e| e.to_string());
    assert!(err.unwrap_or_default().contains("layer count"));
}
