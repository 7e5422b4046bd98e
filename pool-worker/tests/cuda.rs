//! The CUDA path, checked against the CPU path. Compiled only with `--features cuda`, and
//! then it needs a GPU: run `cargo test -p pool-worker --features cuda --test cuda` on a
//! GPU machine (CI machines have none and never build the feature).
#![cfg(feature = "cuda")]

use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::{GgmlDType, gguf_file};
use model_meta::tiny::{LlamaShape, write_random_llama};
use pool_worker::engine::{Backend, Engine, Event, GenParams, Job, Quantize, parse_device};
use pool_worker::llama::{Item, Llama};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cuda-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("model.gguf")
}

fn load(path: &Path, device: &Device) -> Llama {
    let mut file = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    Llama::from_gguf(&content, &mut file, device).unwrap()
}

/// The worker's model on one device: a prompt prefilled in two chunks, three decode steps,
/// a step mixing a decode and a prefill, then two batched decode steps. Logits of every step.
fn logits(path: &Path, device: &Device, prompt: &[u32]) -> Vec<Vec<f32>> {
    let model = load(path, device);
    let mut out = Vec::new();
    let mut push = |t: candle_core::Tensor| {
        for row in t.to_device(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap() {
            out.push(row);
        }
    };
    let mut cache = model.new_cache();
    let half = prompt.len() / 2;
    model
        .forward(&mut [Item {
            tokens: &prompt[..half],
            cache: &mut cache,
        }])
        .unwrap();
    push(
        model
            .forward(&mut [Item {
                tokens: &prompt[half..],
                cache: &mut cache,
            }])
            .unwrap(),
    );
    for step in 0..3u32 {
        push(
            model
                .forward(&mut [Item {
                    tokens: &[step + 40],
                    cache: &mut cache,
                }])
                .unwrap(),
        );
    }
    let mut other = model.new_cache();
    push(
        model
            .forward(&mut [
                Item {
                    tokens: &[7],
                    cache: &mut cache,
                },
                Item {
                    tokens: &prompt[..5],
                    cache: &mut other,
                },
            ])
            .unwrap(),
    );
    // all-decode steps: on the GPU these take the padded batch attention
    for step in 0..2u32 {
        push(
            model
                .forward(&mut [
                    Item {
                        tokens: &[step + 8],
                        cache: &mut cache,
                    },
                    Item {
                        tokens: &[step + 60],
                        cache: &mut other,
                    },
                ])
                .unwrap(),
        );
    }
    out
}

/// Largest |cpu − gpu| relative to the largest |cpu| logit, over every step.
fn relative_gap(cpu: &[Vec<f32>], gpu: &[Vec<f32>]) -> f32 {
    assert_eq!(cpu.len(), gpu.len());
    let mut gap = 0f32;
    let mut scale = 0f32;
    for (c, g) in cpu.iter().zip(gpu) {
        assert_eq!(c.len(), g.len());
        for (a, b) in c.iter().zip(g) {
            assert!(b.is_finite(), "GPU logit is not finite");
            gap = gap.max((a - b).abs());
            scale = scale.max(a.abs());
        }
    }
    gap / scale.max(1e-6)
}

#[test]
fn cuda_f32_logits_match_cpu() {
    let path = scratch("f32");
    write_random_llama(&path, &LlamaShape::TINY, 2048).unwrap();
    let prompt: Vec<u32> = (10..90).collect();
    let cpu = logits(&path, &Device::Cpu, &prompt);
    let gpu = logits(&path, &parse_device("cuda").unwrap(), &prompt);
    let gap = relative_gap(&cpu, &gpu);
    assert!(
        gap < 1e-3,
        "f32 CPU and CUDA logits differ by {gap} (relative)"
    );
}

#[test]
fn cuda_q4_1_logits_match_cpu() {
    // Quantized like the GGUF the pools serve. On CPU the worker re-encodes Q4_1 as Q8_0 and
    // quantizes activations; candle's CUDA kernels use Q4_1 as stored: a few percent of the
    // logit range.
    let shape = LlamaShape {
        hidden: 128,
        heads: 4,
        kv_heads: 2,
        layers: 3,
        ffn: 256,
        vocab: 512,
        dtype: GgmlDType::Q4_1,
    };
    let path = scratch("q4_1");
    write_random_llama(&path, &shape, 2048).unwrap();
    let prompt: Vec<u32> = (10..200).collect();
    let cpu = logits(&path, &Device::Cpu, &prompt);
    let gpu = logits(&path, &parse_device("cuda").unwrap(), &prompt);
    let gap = relative_gap(&cpu, &gpu);
    assert!(
        gap < 0.05,
        "Q4_1 CPU and CUDA logits differ by {gap} (relative)"
    );
}

#[tokio::test]
async fn engine_on_cuda_streams_every_requested_token() {
    let path = scratch("engine");
    write_random_llama(&path, &LlamaShape::TINY, 2048).unwrap();
    let device = parse_device("cuda:0").unwrap();
    let engine = Engine::load(
        &path,
        None,
        "tiny".into(),
        Backend::Real(device, Quantize::None),
        4,
        4,
        64 << 20,
    )
    .unwrap();
    engine.warm_up().await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    engine
        .submit(Job {
            prompt: (10..50).collect(),
            params: GenParams {
                max_tokens: 24,
                temperature: Some(0.8),
                top_p: Some(0.95),
                seed: 3,
                stop: vec![],
                ignore_eos: true,
                continues_words: 0,
                replay_tokens: 0,
            },
            events: tx,
        })
        .unwrap();
    let mut text = String::new();
    loop {
        match rx.recv().await.expect("engine stopped") {
            Event::Text(t) => text.push_str(&t),
            Event::Done(usage) => {
                assert_eq!(usage.completion_tokens, 24);
                assert_eq!(usage.prompt_tokens, 40);
                break;
            }
            Event::Failed(e) => panic!("CUDA generation failed: {e}"),
        }
    }
    assert!(!text.is_empty());
}

#[test]
fn unknown_cuda_ordinal_is_a_clear_error() {
    let err = parse_device("cuda:99").unwrap_err().to_string();
    assert!(err.contains("CUDA device 99"), "{err}");
}
