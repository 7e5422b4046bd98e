//! The registry at fleet scale: worker selection (power of two choices) in a pool of 10,
//! 100 and 1,000 workers out of 5,000 registered, a heartbeat, and a registration (which
//! republishes the snapshot the request path reads).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use router::registry::{Registry, ServedModel};
use router::select::{Ask, LeastLoaded, Policy, PowerOfTwo, pick_in_pool};
use routing_rules::ModalitySet;

const TOTAL: usize = 5_000;

/// 5,000 workers: pools `p10`, `p100`, `p1000` of those sizes, the rest in `bulk`.
fn fleet() -> (Arc<Registry>, Vec<String>) {
    let r = Registry::new(Duration::from_secs(2), Duration::from_secs(6));
    let models = vec![ServedModel {
        name: "m".into(),
        max_context: 8192,
        modalities: vec!["text".into()],
    }];
    let mut leases = Vec::with_capacity(TOTAL);
    let sizes = [
        ("p10", 10),
        ("p100", 100),
        ("p1000", 1000),
        ("bulk", TOTAL - 1110),
    ];
    let mut i = 0u32;
    for (pool, n) in sizes {
        let pool: Arc<str> = pool.into();
        for _ in 0..n {
            let addr = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8000));
            leases.push(
                r.register(
                    format!("w{i}"),
                    Arc::clone(&pool),
                    addr,
                    models.clone(),
                    "cpu".into(),
                    "switchyard".into(),
                )
                .unwrap(),
            );
            i += 1;
        }
    }
    (r, leases)
}

fn bench(c: &mut Criterion) {
    let (registry, leases) = fleet();
    let text = ModalitySet::default();
    let mut g = c.benchmark_group("registry_5000_workers");
    let ask = Ask {
        model: "m",
        modalities: text,
        tried: &[],
        continuation: false,
    };
    for policy in [&PowerOfTwo as &dyn Policy, &LeastLoaded] {
        for pool in ["p10", "p100", "p1000"] {
            let id = BenchmarkId::new(format!("pick_{}", policy.name()), pool);
            g.bench_with_input(id, pool, |b, pool| {
                b.iter(|| {
                    let snap = registry.snapshot();
                    pick_in_pool(&snap, pool, policy, &ask).unwrap()
                })
            });
        }
    }
    g.bench_function("heartbeat", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % leases.len();
            registry
                .heartbeat(&leases[i], &router::registry::Heartbeat::running(3))
                .unwrap()
        })
    });
    g.bench_function("register_and_publish", |b| {
        let pool: Arc<str> = "p10".into();
        b.iter(|| {
            registry.register(
                "churn".into(),
                Arc::clone(&pool),
                SocketAddr::from(([127, 0, 0, 1], 9)),
                Vec::new(),
                "cpu".into(),
                "switchyard".into(),
            )
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
