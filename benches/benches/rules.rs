//! Rule matching over 50 rules (criterion). Run: `cargo bench -p benches --bench rules`.

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use routing_rules::{Endpoint, Modality, RequestFeatures, compile};

fn fifty_rules() -> String {
    let mut y = String::from(
        "version: 1\npools:\n  a: { class: cpu, capacity: on_demand, cost_per_hour: 1 }\n  b: { class: l40s, capacity: on_demand, cost_per_hour: 2 }\nrules:\n",
    );
    for i in 0..49 {
        y.push_str(&format!(
            "  - name: r{i}\n    when: {{ context_tokens: {{ at_least: {}, at_most: {} }}, tenant: [t{i}] }}\n    route: [a, b]\n",
            i * 100,
            i * 100 + 99
        ));
    }
    y.push_str("  - name: rest\n    route: [b]\n");
    y
}

fn bench(c: &mut Criterion) {
    let rules = match compile(&fifty_rules(), Path::new(".")) {
        Ok(r) => r,
        Err(e) => panic!("bench rules must compile: {e}"),
    };
    let f = RequestFeatures {
        endpoint: Some(Endpoint::ChatCompletions),
        model: "m".into(),
        tenant: Some("t48".into()),
        modalities: [Modality::Text].into_iter().collect(),
        prompt_tokens: 4850,
        max_tokens: 0,
        stream: false,
        headers: Vec::new(),
    };
    c.bench_function("route_50_rules_last_match", |b| {
        b.iter(|| black_box(rules.route(black_box(&f))))
    });
    let miss = RequestFeatures {
        tenant: Some("nobody".into()),
        ..f.clone()
    };
    c.bench_function("route_50_rules_default", |b| {
        b.iter(|| black_box(rules.route(black_box(&miss))))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
