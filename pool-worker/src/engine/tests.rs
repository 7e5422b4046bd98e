//! The engine without HTTP: devices, loading, detokenization, stops and batching.

use std::time::Instant;

use candle_core::Device;
use tokio::sync::mpsc;

use super::load::read_model;
use super::*;

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_says_how_to_get_it() {
    let err = parse_device("cuda").err().map(|e| e.to_string());
    let err = err.unwrap_or_default();
    assert!(err.contains("--features cuda"), "{err}");
}

#[test]
fn bad_device_names_are_refused_clearly() {
    let err = |s: &str| {
        parse_device(s)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert!(
        err("tpu").contains("unknown device `tpu`"),
        "{}",
        err("tpu")
    );
    assert!(
        err("cuda:x").contains("bad cuda ordinal"),
        "{}",
        err("cuda:x")
    );
    assert!(parse_device("cpu").is_ok());
}

/// `--quantize` parses its two names, and a GGUF file (already quantized as stored)
/// refuses it by name instead of ignoring it.
#[test]
fn quantize_applies_to_hugging_face_checkpoints_only() {
    assert_eq!("q8_0".parse::<Quantize>(), Ok(Quantize::Q8_0));
    assert_eq!("none".parse::<Quantize>(), Ok(Quantize::None));
    assert!(
        "q4".parse::<Quantize>()
            .unwrap_err()
            .contains("(none, q8_0)")
    );
    let dir = std::env::temp_dir().join(format!("engine-quantize-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    model_meta::tiny::write_tiny_llama(&path, 256).unwrap();
    let err = read_model(&path, None, Some(&Device::Cpu), Quantize::Q8_0)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("--quantize is for Hugging Face checkpoints"),
        "{err}"
    );
    assert!(read_model(&path, None, Some(&Device::Cpu), Quantize::None).is_ok());
    // a Hugging Face checkpoint takes it
    let hf = dir.join("hf");
    let opts = model_meta::tiny::HfOptions {
        arch: model_meta::tiny::HfArch::Llama,
        tie_embeddings: true,
        llama3_rope: false,
        context_length: 256,
        rope_theta: 10_000.0,
    };
    model_meta::tiny::write_random_hf(&hf, &model_meta::tiny::LlamaShape::TINY, &opts).unwrap();
    assert!(read_model(&hf, None, Some(&Device::Cpu), Quantize::Q8_0).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A CPU engine over a random model of `shape`, in a fresh directory (returned, for
/// removal at the end of the test).
fn engine_for(name: &str, shape: &model_meta::tiny::LlamaShape) -> (std::path::PathBuf, Engine) {
    engine_with_cache(name, shape, 64 << 20)
}

/// [`engine_for`] with a prefix cache of `prefix_cache_bytes`.
fn engine_with_cache(
    name: &str,
    shape: &model_meta::tiny::LlamaShape,
    prefix_cache_bytes: usize,
) -> (std::path::PathBuf, Engine) {
    let dir = std::env::temp_dir().join(format!("engine-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    model_meta::tiny::write_random_llama(&path, shape, 2048).unwrap();
    let engine = Engine::load(
        &path,
        None,
        name.into(),
        Backend::Real(Device::Cpu, Quantize::None),
        8,
        4,
        prefix_cache_bytes,
    )
    .unwrap();
    (dir, engine)
}

/// A job that generates exactly `max_tokens` tokens (end-of-sequence ignored).
fn job(
    prompt: std::ops::Range<u32>,
    max_tokens: usize,
    temperature: Option<f64>,
    seed: u64,
    events: mpsc::UnboundedSender<Event>,
) -> Job {
    Job {
        prompt: prompt.collect(),
        params: GenParams {
            max_tokens,
            temperature,
            top_p: None,
            seed,
            stop: vec![],
            ignore_eos: true,
            continues_words: 0,
            replay_tokens: 0,
        },
        events,
    }
}

/// Token by token, the incremental text equals decoding the whole sequence at once —
/// spaces, accents, CJK and emoji split over byte tokens included (SmolLM2's real
/// tokenizer; skipped where the model file is absent).
#[test]
fn incremental_text_equals_the_whole_decode() {
    let Some(path) = model_meta::workspace_smollm2() else {
        eprintln!("SKIPPED: SmolLM2 GGUF not found (run scripts/fetch-model.sh)");
        return;
    };
    let content = model_meta::read_gguf(&path).unwrap();
    let tok = model_meta::tokenizer_from_gguf(&content).unwrap();
    let text = "Héllo wörld —  東京は 🚀🦀 done.\n\n  indented  `code` 123,456";
    let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
    let mut d = TextDecoder::default();
    let mut seen = Vec::new();
    for n in 1..=ids.len() {
        d.push(&tok, &ids[..n]).unwrap();
        assert!(!d.as_str().contains('\u{FFFD}'), "{:?}", d.as_str());
        seen.push(d.as_str().len());
    }
    assert_eq!(d.as_str(), tok.decode(&ids, true).unwrap());
    assert_eq!(d.as_str(), text);
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "text only grows");
}

/// Runs a job to the end: (streamed text, usage).
async fn run_job(engine: &Engine, mut j: Job) -> (String, Usage) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    j.events = tx;
    engine.submit(j).unwrap();
    let mut text = String::new();
    loop {
        match rx.recv().await.unwrap() {
            Event::Text(t) => text.push_str(&t),
            Event::Done(u) => return (text, u),
            Event::Failed(e) => panic!("{e}"),
        }
    }
}

/// A stop sequence cuts the text just before its first occurrence and finishes with
/// "stop" — also when it spans token boundaries (greedy decoding repeats the same text).
#[tokio::test]
async fn stop_sequences_cut_the_text_before_their_first_occurrence() {
    let (dir, engine) = engine_for("stop", &model_meta::tiny::LlamaShape::TINY);
    let (unused, _) = mpsc::unbounded_channel();
    let (full, usage) = run_job(&engine, job(10..30, 40, None, 0, unused.clone())).await;
    assert!(usage.finish_length && full.chars().count() > 12, "{full:?}");
    // a stop string from the middle of the text
    let start = full.char_indices().nth(8).unwrap().0;
    let end = full.char_indices().nth(11).unwrap().0;
    let stop = full[start..end].to_string();
    let mut j = job(10..30, 40, None, 0, unused);
    j.params.stop = vec![stop.clone()];
    let (cut, usage) = run_job(&engine, j).await;
    assert_eq!(cut, full[..full.find(&stop).unwrap()], "stop {stop:?}");
    assert!(!usage.finish_length, "finished by the stop sequence");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A Q4_1 model (the real pools' weight type) runs through the engine, and
/// `ignore_eos` makes a stream produce exactly `max_tokens` tokens.
#[tokio::test]
async fn quantized_model_generates_exactly_max_tokens_when_eos_is_ignored() {
    let shape = model_meta::tiny::LlamaShape::small(candle_core::quantized::GgmlDType::Q4_1);
    let (dir, engine) = engine_for("q41", &shape);
    let (tx, mut rx) = mpsc::unbounded_channel();
    engine.submit(job(10..40, 9, None, 1, tx)).unwrap();
    let usage = loop {
        match rx.recv().await.unwrap() {
            Event::Text(_) => {}
            Event::Done(u) => break u,
            Event::Failed(e) => panic!("{e}"),
        }
    };
    assert_eq!(usage.completion_tokens, 9);
    assert_eq!(usage.prompt_tokens, 30);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Continuous batching: requests submitted together run in the same steps — every one
/// has its first token before any of them finishes (one at a time, the first would
/// finish before the second started).
#[tokio::test]
async fn concurrent_requests_share_the_batch() {
    let (dir, engine) = engine_for("batch", &model_meta::tiny::LlamaShape::TINY);
    let mut receivers = Vec::new();
    for seed in 0..3u64 {
        let (tx, rx) = mpsc::unbounded_channel();
        engine
            .submit(job(10..30, 200, Some(1.0), seed, tx))
            .unwrap();
        receivers.push(rx);
    }
    let mut firsts = Vec::new();
    let mut dones = Vec::new();
    let timings = futures::future::join_all(receivers.into_iter().map(|mut rx| async move {
        let mut first = None;
        loop {
            match rx.recv().await.unwrap() {
                Event::Text(_) => {
                    first.get_or_insert_with(Instant::now);
                }
                Event::Done(u) => return (first.unwrap(), Instant::now(), u),
                Event::Failed(e) => panic!("{e}"),
            }
        }
    }))
    .await;
    for (first, done, usage) in timings {
        assert_eq!(usage.completion_tokens, 200);
        firsts.push(first);
        dones.push(done);
    }
    let last_first = firsts.iter().max().unwrap();
    let first_done = dones.iter().min().unwrap();
    assert!(
        last_first < first_done,
        "a request finished before another had started"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A long prompt prefilled alone (one 2048-token chunk on CPU) and the same prompt
/// prefilled while another stream decodes (512-token chunks) give the same greedy
/// tokens: every prompt token enters the cache exactly once whatever the chunking.
#[tokio::test]
async fn prompt_chunking_does_not_change_the_tokens() {
    let (dir, engine) = engine_for("chunks", &model_meta::tiny::LlamaShape::TINY);
    let long = |events| Job {
        prompt: (0..2000u32).map(|i| (i * 7 + 3) % 200 + 10).collect(),
        ..job(0..0, 8, None, 0, events)
    };
    let tokens = |mut rx: mpsc::UnboundedReceiver<Event>| async move {
        let mut text = String::new();
        loop {
            match rx.recv().await.unwrap() {
                Event::Text(t) => text.push_str(&t),
                Event::Done(u) => return (text, u.prompt_tokens, u.completion_tokens),
                Event::Failed(e) => panic!("{e}"),
            }
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    engine.submit(long(tx)).unwrap();
    let alone = tokens(rx).await;
    // a stream that is decoding when the long prompt arrives
    let (busy_tx, mut busy_rx) = mpsc::unbounded_channel();
    engine.submit(job(10..30, 1000, None, 0, busy_tx)).unwrap();
    while !matches!(busy_rx.recv().await, Some(Event::Text(_))) {}
    let (tx, rx) = mpsc::unbounded_channel();
    engine.submit(long(tx)).unwrap();
    let shared = tokens(rx).await;
    assert_eq!((alone.1, alone.2), (2000, 8));
    assert_eq!(alone, shared);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A client that does not read its stream holds nothing up: the other sequence of the
/// batch finishes.
#[tokio::test]
async fn a_client_that_stops_reading_does_not_stall_the_batch() {
    let (dir, engine) = engine_for("slow", &model_meta::tiny::LlamaShape::TINY);
    let (idle_tx, _idle_rx) = mpsc::unbounded_channel(); // never read
    engine.submit(job(10..30, 400, None, 0, idle_tx)).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    engine.submit(job(10..30, 400, None, 0, tx)).unwrap();
    let finished = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            match rx.recv().await {
                Some(Event::Done(u)) => return u.completion_tokens,
                Some(Event::Failed(e)) => panic!("{e}"),
                Some(Event::Text(_)) => {}
                None => panic!("engine stopped"),
            }
        }
    })
    .await
    .expect("the reading client's stream finished");
    assert_eq!(finished, 400);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A finished request is in the prefill and time-per-token histograms (observed before its
/// `Done` event is sent).
#[tokio::test]
async fn finished_requests_fill_the_latency_histograms() {
    let (dir, engine) = engine_for("metrics", &model_meta::tiny::LlamaShape::TINY);
    let (unused, _) = mpsc::unbounded_channel();
    let (_, usage) = run_job(&engine, job(10..30, 5, None, 0, unused)).await;
    assert_eq!(usage.completion_tokens, 5);
    let m = &engine.stats.metrics;
    assert_eq!(m.prefill.get_sample_count(), 1);
    assert_eq!(m.ttft.get_sample_count(), 1);
    assert_eq!(m.time_per_output_token.get_sample_count(), 1);
    assert_eq!(m.generated_tokens.get(), 5);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The simulated backend runs at most `max_batch` streams at once, as the real engine
/// batches: with one slot, the second job's first token comes after the first job ends.
#[tokio::test]
async fn the_sim_backend_queues_beyond_its_batch() {
    let dir = std::env::temp_dir().join(format!("engine-sim-batch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    model_meta::tiny::write_tiny_llama(&path, 256).unwrap();
    let profile = SimProfile {
        ttft: std::time::Duration::from_millis(20),
        tokens_per_s: 1000.0,
        prefill_tokens_per_s: 0.0,
        kv_bytes_per_token: SimProfile::KV_BYTES_70B,
    };
    let engine = Engine::load(
        &path,
        None,
        "sim".into(),
        Backend::Sim(profile),
        8,
        1,
        1 << 20,
    )
    .unwrap();
    let mut rxs = Vec::new();
    for _ in 0..2 {
        let (tx, rx) = mpsc::unbounded_channel();
        engine.submit(job(10..20, 40, None, 1, tx)).unwrap();
        rxs.push(rx);
    }
    let ends = futures::future::join_all(rxs.into_iter().map(|mut rx| async move {
        let (mut first, mut done) = (None, None);
        while let Some(e) = rx.recv().await {
            match e {
                Event::Text(_) => {
                    first.get_or_insert_with(Instant::now);
                }
                Event::Done(_) => done = Some(Instant::now()),
                Event::Failed(e) => panic!("{e}"),
            }
        }
        (first.unwrap(), done.unwrap())
    }))
    .await;
    assert!(
        ends[1].0 > ends[0].1,
        "the second started after the first ended"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Greedy text of `prompt`, `max_tokens` tokens.
async fn greedy(engine: &Engine, prompt: Vec<u32>, max_tokens: usize) -> (String, Usage) {
    let (tx, _) = mpsc::unbounded_channel();
    let mut j = job(0..0, max_tokens, None, 0, tx);
    j.prompt = prompt;
    run_job(engine, j).await
}

/// A prompt sent again reuses its whole blocks from the prefix cache — all but the last
/// token's block, which must run for its logits — and answers the same; a prompt sharing
/// only a start reuses that start's blocks. The counters say so.
#[tokio::test]
async fn a_repeated_prompt_reuses_its_prefix_and_answers_the_same() {
    let (dir, engine) = engine_for("prefix", &model_meta::tiny::LlamaShape::TINY);
    let m = &engine.stats.metrics;
    let prompt: Vec<u32> = (10..110).collect(); // 100 tokens: 3 whole blocks and 4 more
    let (first, _) = greedy(&engine, prompt.clone(), 12).await;
    assert_eq!(m.prefix_hit_tokens.get(), 0);
    assert_eq!(m.prefix_miss_tokens.get(), 100);
    // the prompt (3 blocks) and then prompt and answer (112 tokens, of which 111 in the
    // cache: still 3 blocks) were kept
    assert_eq!(m.prefix_cache_blocks.get(), 3);
    assert!(m.prefix_cache_bytes.get() > 0);
    let (again, usage) = greedy(&engine, prompt.clone(), 12).await;
    assert_eq!(again, first);
    assert_eq!(usage.prompt_tokens, 100, "usage counts the whole prompt");
    assert_eq!(usage.prompt_tokens_details.cached_tokens, 96);
    assert_eq!(m.prefix_hit_tokens.get(), 96);
    assert_eq!(m.prefix_miss_tokens.get(), 104);
    // the same first 70 tokens: two blocks in common
    let mut other = prompt[..70].to_vec();
    other.extend(200..240);
    greedy(&engine, other, 4).await;
    assert_eq!(m.prefix_hit_tokens.get(), 96 + 64);
    // a prompt of exactly one block reuses nothing: its last token must run
    greedy(&engine, prompt[..32].to_vec(), 2).await;
    assert_eq!(m.prefix_hit_tokens.get(), 96 + 64);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Under continuous batching: a long prompt whose start is cached joins while another
/// sequence decodes, prefills the rest in chunks beside it, and answers what an engine
/// without a prefix cache answers; so does the decoding sequence.
#[tokio::test]
async fn a_cached_prefix_joins_a_running_batch_and_answers_as_without_the_cache() {
    let shape = model_meta::tiny::LlamaShape::TINY;
    let (dir, engine) = engine_for("prefix-batch", &shape);
    let (plain_dir, plain) = engine_with_cache("prefix-plain", &shape, 0);
    let long: Vec<u32> = (10..250).cycle().take(700).collect();
    let mut shared = long[..600].to_vec();
    shared.extend((20..170).rev()); // 750 tokens: more than one 512-token chunk left
    let decoding: Vec<u32> = (30..60).collect();
    // reference answers, no cache anywhere
    let (want_shared, _) = greedy(&plain, shared.clone(), 8).await;
    let (want_decoding, _) = greedy(&plain, decoding.clone(), 200).await;
    assert_eq!(plain.stats.metrics.prefix_cache_blocks.get(), 0);
    assert_eq!(plain.stats.metrics.prefix_hit_tokens.get(), 0);
    // the cached engine has seen `long`, then runs both at once
    greedy(&engine, long, 1).await;
    let hits = engine.stats.metrics.prefix_hit_tokens.get();
    // submitted together: the short prompt is prefilled first, then the long one's rest
    // in chunks while the first decodes
    let (a, b) = tokio::join!(greedy(&engine, decoding, 200), greedy(&engine, shared, 8));
    assert_eq!(a.0, want_decoding);
    assert_eq!(b.0, want_shared);
    assert_eq!(
        engine.stats.metrics.prefix_hit_tokens.get() - hits,
        576,
        "18 blocks of the 600 shared tokens"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&plain_dir).unwrap();
}
