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
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    p.exists().then_some(p)
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

/// English-like prose: ~4.5 bytes per token with SmolLM2's tokenizer.
fn body(approx_tokens: usize) -> Vec<u8> {
    let sentence = "The quick brown fox jumps over the lazy dog while the router counts tokens. ";
    let text = sentence.repeat((approx_tokens * 9 / 2) / sentence.len() + 1);
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
    for tokens in [1_000usize, 10_000, 100_000, 1_000_000] {
        let b = body(tokens);
        g.throughput(Throughput::Bytes(b.len() as u64));
        // a threshold inside the bound forces exact counting; one far below it does not
        let exact = rules(tokens as u64);
        let bounded = rules(10);
        for (name, r) in [("bounded", &bounded), ("exact", &exact)] {
            g.bench_with_input(BenchmarkId::new(name, tokens), &b, |bench, b| {
                bench.iter(|| {
                    let mut p = match parse(Endpoint::ChatCompletions, black_box(b)) {
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
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
