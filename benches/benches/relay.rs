//! What the relay does to each streamed frame: usage counting alone (every stream), and
//! with mid-stream resume tracking (every resumable stream: whole frames only, the text
//! read), side by side. A frame is a typical chat chunk of one token; a chunk carries one
//! frame, or eight. Run: `cargo bench -p benches --bench relay`.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use router::resume::Track;
use router::usage::UsageScan;

fn frame(i: usize) -> String {
    format!(
        "data: {}\n\n",
        serde_json::json!({
            "id": "chatcmpl-5e0f90298fb174c8302949ec056f369b", "object": "chat.completion.chunk",
            "created": 1796622896, "model": "smollm2",
            "choices": [{ "index": 0, "delta": { "content": format!(" word{i}") }, "finish_reason": null }],
        })
    )
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("relay_frames");
    for per_chunk in [1usize, 8] {
        let chunks: Vec<Bytes> = (0..64)
            .map(|k| {
                Bytes::from(
                    (0..per_chunk)
                        .map(|i| frame(k * per_chunk + i))
                        .collect::<String>(),
                )
            })
            .collect();
        g.throughput(Throughput::Elements((64 * per_chunk) as u64));
        g.bench_function(format!("usage_only/{per_chunk}_per_chunk"), |b| {
            b.iter(|| {
                let mut usage = UsageScan::default();
                for c in &chunks {
                    usage.feed(black_box(c));
                }
                black_box(usage.completion_tokens)
            })
        });
        g.bench_function(
            format!("usage_and_resume_tracking/{per_chunk}_per_chunk"),
            |b| {
                b.iter(|| {
                    let mut usage = UsageScan::default();
                    let mut track = Track::default();
                    for c in &chunks {
                        if let Some(out) = track.feed(black_box(c.clone())) {
                            usage.feed(&out);
                        }
                    }
                    black_box((usage.completion_tokens, track.text.len()))
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
