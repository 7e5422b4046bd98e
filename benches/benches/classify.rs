//! Classification of chat bodies (JSON parse + token count) at 1k / 10k / 100k / 1M tokens.
//! Uses SmolLM2's real tokenizer (`models/`, see scripts/fetch-model.sh).
//! Run: `cargo bench -p benches --bench classify`.
//!
//! Two rule sets: `bounded` has thresholds far from the request sizes, so the byte-length
//! bound decides; `exact` puts a threshold inside every request's bound, forcing the
//! tokenizer to run.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use router::classify::{Counter, count_tokens, parse};
use routing_rules::{Endpoint, TokenizerRef, compile};

fn model() -> Option<PathBuf> {
    model_meta::workspace_smollm2()
}

fn rules(cut: u64) -> routing_rules::CompiledRules {
    let y = format!(
        "version: 1\npools:\n  a: {{ class: cpu, capacity: on_demand, cost_per_hour: 1 }}\n  b: {{ class: h100, capacity: on_demand, cost_per_hour: 1 }}\nrules:\n  - name: small\n    when: {{ prompt_tokens: {{ at_most: {cut} }} }}\n    route: [a]\n  - name: rest\n    route: [b]\n"
    );
    match compile(&y, std::path::Path::new(".")) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    }
}

/// English-like prose: ~4.5 bytes per token with SmolLM2's tokenizer. `salt` makes each
/// body distinct, so the counter's cache of long texts does not answer for it.
fn body(approx_tokens: usize, salt: u64) -> Vec<u8> {
    let sentence = "The quick brown fox jumps over the lazy dog while the router counts tokens. ";
    let text = format!(
        "Request {salt}. {}",
        sentence.repeat((approx_tokens * 9 / 2) / sentence.len() + 1)
    );
    serde_json::to_vec(&serde_json::json!({
        "model": "smollm2", "max_tokens": 64,
        "messages": [{ "role": "user", "content": text }]
    }))
    .unwrap_or_default()
}

fn bench(c: &mut Criterion) {
    let Some(path) = model() else {
        eprintln!("SKIPPED: SmolLM2 GGUF not found (scripts/fetch-model.sh)");
        return;
    };
    let counter = match Counter::load(&TokenizerRef::Gguf(path)) {
        Ok(c) => Arc::new(c),
        Err(e) => panic!("{e}"),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("{e}"),
    };
    let mut g = c.benchmark_group("classify");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    let mut salt = 0u64;
    for tokens in [1_000usize, 10_000, 100_000, 1_000_000] {
        let b = body(tokens, 0);
        g.throughput(Throughput::Bytes(b.len() as u64));
        // a threshold inside the bound forces exact counting; one far below it does not
        let exact = rules(tokens as u64);
        let bounded = rules(10);
        // `exact`: a text never seen before; `exact-cached`: the same text again (a
        // conversation's history resent), answered by the counter's cache
        for (name, r, fresh) in [
            ("bounded", &bounded, false),
            ("exact", &exact, true),
            ("exact-cached", &exact, false),
        ] {
            g.bench_with_input(BenchmarkId::new(name, tokens), &b, |bench, b| {
                bench.iter_batched(
                    || {
                        salt += 1;
                        if fresh { body(tokens, salt) } else { b.clone() }
                    },
                    |b| {
                        let mut p = match parse(Endpoint::ChatCompletions, black_box(&b)) {
                            Ok(p) => p,
                            Err(e) => panic!("{e}"),
                        };
                        let exact = rt.block_on(count_tokens(
                            &mut p,
                            None,
                            Some(Arc::clone(&counter)),
                            r,
                            Duration::from_secs(60),
                        ));
                        black_box((p.features.prompt_tokens, exact))
                    },
                    criterion::BatchSize::PerIteration,
                )
            });
        }
    }
    g.finish();
}

/// The two exact counts side by side on one thread, over the same texts (100k tokens of
/// prose; this workspace's sources, as many bytes):
/// `tokenizers`' own `encode_fast` (the baseline) and `model_meta`'s `ByteLevelCounter`.
fn counters(c: &mut Criterion) {
    let Some(path) = model() else {
        return;
    };
    let tokenizer = match model_meta::load_tokenizer(&model_meta::TokenizerSource::Gguf(path)) {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    let Some(fast) = model_meta::count::ByteLevelCounter::new(&tokenizer) else {
        panic!("SmolLM2's tokenizer is the pipeline ByteLevelCounter counts");
    };
    let sentence = "The quick brown fox jumps over the lazy dog while the router counts tokens. ";
    let prose = sentence.repeat(100_000 * 9 / 2 / sentence.len());
    // this workspace's own sources and docs: code and prose with a large vocabulary
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut sources = String::new();
    for dir in [
        "router/src",
        "pool-worker/src",
        "routing-rules/src",
        "model-meta/src",
        "docs",
    ] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for e in entries.flatten() {
            sources.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    let mut cut = sources.len().min(prose.len());
    while !sources.is_char_boundary(cut) {
        cut -= 1;
    }
    sources.truncate(cut);
    // the sources quote chat-template markers, which the fast count leaves to `encode`
    let sources = sources.replace("<|", "< |");
    for text in [&prose, &sources] {
        let want = tokenizer
            .encode_fast(text.as_str(), false)
            .map(|e| e.len() as u64);
        let mut words = model_meta::count::WordCounts::default();
        let got = fast.count(&tokenizer, text, &mut words);
        assert_eq!(got, want.ok(), "the two counts differ");
    }
    let mut g = c.benchmark_group("count-one-thread");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    for (name, text) in [("prose-100k", &prose), ("sources", &sources)] {
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_with_input(BenchmarkId::new("encode_fast", name), text, |b, text| {
            b.iter(|| {
                tokenizer
                    .encode_fast(black_box(text.as_str()), false)
                    .map(|e| e.len())
            })
        });
        g.bench_with_input(
            BenchmarkId::new("byte_level_counter", name),
            text,
            |b, text| {
                b.iter(|| {
                    let mut words = model_meta::count::WordCounts::default();
                    fast.count(&tokenizer, black_box(text.as_str()), &mut words)
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench, counters);
criterion_main!(benches);
