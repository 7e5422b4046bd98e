//! Decode-shaped matrix products on CPU (one SmolLM2-135M FFN matrix, 1536 × 576) at 1, 4
//! and 8 rows (the rows of a continuous batch): candle's quantized product as Q4_1
//! (SmolLM2's GGUF type, no SIMD kernel) and as Q8_0, against the worker's batched 8-bit
//! product (`pool_worker::q8::Q8Matrix`, what the worker multiplies decode rows with on CPU).
#![allow(clippy::unwrap_used)]

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};

fn weights(n: usize, k: usize) -> Vec<f32> {
    let mut s = 12345u32;
    (0..n * k)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.1
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let (n, k) = (1536, 576);
    let w = weights(n, k);
    let t = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
    let q41 = QMatMul::from_qtensor(QTensor::quantize(&t, GgmlDType::Q4_1).unwrap()).unwrap();
    let q80 = QMatMul::from_qtensor(QTensor::quantize(&t, GgmlDType::Q8_0).unwrap()).unwrap();
    let ours = pool_worker::q8::Q8Matrix::from_tensor(&t).unwrap();
    let mut g = c.benchmark_group("decode_matmul_1536x576");
    for rows in [1usize, 4, 8] {
        let x: Vec<f32> = (0..rows * k).map(|i| (i % 13) as f32 * 0.01).collect();
        let xt = Tensor::from_vec(x, (rows, k), &Device::Cpu).unwrap();
        g.bench_function(format!("candle_q4_1/{rows}"), |b| {
            b.iter(|| q41.forward(&xt).unwrap())
        });
        g.bench_function(format!("candle_q8_0/{rows}"), |b| {
            b.iter(|| q80.forward(&xt).unwrap())
        });
        g.bench_function(format!("worker_q8/{rows}"), |b| {
            b.iter(|| ours.matmul(&xt).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
