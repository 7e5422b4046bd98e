//! 8-bit products for decode on CPU, batched over rows.
//!
//! A decode step multiplies every weight matrix by a handful of rows, one per running
//! sequence. candle's quantized product handles one row at a time, so four sequences cost
//! four passes over the weights and a step grows linearly with the batch. [`Q8Matrix`] takes
//! every row in one pass: each block of 32 weights is loaded and widened once and
//! multiplied into up to four activation rows, whose sums run as independent chains.
//!
//! The format is GGUF's Q8_0 (blocks of 32 signed 8-bit values and one scale) with the
//! scales in f32. Activations are quantized the same way (as candle's Q8_0 product does),
//! widened to 16 bits so that each pair of products is one `pmaddwd` on AVX2, through
//! `wide`'s portable vectors (scalar code where the target has no SIMD).

use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;
use wide::{f32x8, i8x16, i16x16};

/// Values per block (one scale each).
pub const BLOCK: usize = 32;

/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 32;

/// A weight matrix (rows, cols) in 8-bit blocks.
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    /// Row-major, two vectors per block.
    qs: Vec<i8x16>,
    /// One scale per block, row-major.
    scales: Vec<f32>,
}

/// Quantizes one block: the scale maps the largest magnitude to 127.
fn quantize_block(values: &[f32], out: &mut [i16; BLOCK]) -> f32 {
    let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d == 0.0 { 0.0 } else { d.recip() };
    for (q, v) in out.iter_mut().zip(values) {
        *q = (v * inv).round() as i16;
    }
    d
}

impl Q8Matrix {
    /// Quantizes `(rows, cols)` f32 weights, `cols` a multiple of [`BLOCK`]. Weights
    /// dequantized from GGUF's Q8_0 come back as the same values.
    pub fn quantize(weights: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if !cols.is_multiple_of(BLOCK) || weights.len() != rows * cols {
            candle_core::bail!("cannot make {rows}×{cols} Q8 blocks of {BLOCK}");
        }
        let blocks = rows * cols / BLOCK;
        let mut qs = Vec::with_capacity(blocks * 2);
        let mut scales = Vec::with_capacity(blocks);
        let mut q = [0i16; BLOCK];
        for block in weights.chunks_exact(BLOCK) {
            scales.push(quantize_block(block, &mut q));
            for half in q.chunks_exact(16) {
                qs.push(i8x16::new(std::array::from_fn(|i| half[i] as i8)));
            }
        }
        Ok(Self {
            rows,
            cols,
            qs,
            scales,
        })
    }

    /// From a CPU f32 tensor (rows, cols), read in place (an embedding-sized matrix is not
    /// copied again at load).
    pub fn from_tensor(w: &Tensor) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        let w = w.contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("8-bit blocks are for CPU weights");
        };
        let start = layout.start_offset();
        let data = cpu
            .as_slice::<f32>()?
            .get(start..start + rows * cols)
            .ok_or_else(|| candle_core::Error::Msg("weight storage too short".into()))?;
        Self::quantize(data, rows, cols)
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The matrices' rows one after another (one product for several projections of the
    /// same input).
    pub fn stack(parts: Vec<Q8Matrix>) -> Result<Self> {
        let cols = parts.first().map_or(0, |m| m.cols);
        if let Some(m) = parts.iter().find(|m| m.cols != cols) {
            candle_core::bail!("cannot stack a {}-column matrix on {cols} columns", m.cols);
        }
        let mut out = Self {
            rows: 0,
            cols,
            qs: Vec::with_capacity(parts.iter().map(|m| m.qs.len()).sum()),
            scales: Vec::with_capacity(parts.iter().map(|m| m.scales.len()).sum()),
        };
        for m in parts {
            out.rows += m.rows;
            out.qs.extend(m.qs);
            out.scales.extend(m.scales);
        }
        Ok(out)
    }

    /// The weights as an f32 tensor (rows, cols), for products over many rows (prefill).
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        // block by block into fresh memory (no zero-filled buffer to overwrite)
        let mut blocks: Vec<[f32; BLOCK]> = Vec::new();
        self.qs
            .par_chunks_exact(2)
            .zip(self.scales.par_iter())
            .with_min_len(64)
            .map(|(q, d)| {
                let (lo, hi) = (q[0].to_array(), q[1].to_array());
                let mut out = [0f32; BLOCK];
                for (o, q) in out.iter_mut().zip(lo.iter().chain(&hi)) {
                    *o = d * f32::from(*q);
                }
                out
            })
            .collect_into_vec(&mut blocks);
        Tensor::from_vec(blocks.into_flattened(), (self.rows, self.cols), device)
    }

    /// `x` (m, cols) → (m, rows), every row of `x` in one pass over the weights.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let (m, cols) = x.dims2()?;
        if cols != self.cols {
            candle_core::bail!(
                "product of (_, {cols}) with a ({}, {}) matrix",
                self.rows,
                self.cols
            );
        }
        if m == 0 {
            return Tensor::zeros((0, self.rows), candle_core::DType::F32, &Device::Cpu);
        }
        let x = x.flatten_all()?.to_vec1::<f32>()?;
        let per_row = cols / BLOCK;
        // activations in the weights' block format, widened to 16 bits
        let mut xq = Vec::with_capacity(m * per_row * 2);
        let mut xs = Vec::with_capacity(m * per_row);
        let mut q = [0i16; BLOCK];
        for block in x.chunks_exact(BLOCK) {
            xs.push(quantize_block(block, &mut q));
            xq.push(i16x16::new(std::array::from_fn(|i| q[i])));
            xq.push(i16x16::new(std::array::from_fn(|i| q[16 + i])));
        }
        let row_q = |r: usize| &xq[r * per_row * 2..(r + 1) * per_row * 2];
        let row_s = |r: usize| &xs[r * per_row..(r + 1) * per_row];
        // out_t: (rows, m), weight rows split over the threads
        let mut out_t = vec![0f32; self.rows * m];
        out_t
            .par_chunks_mut(ROWS_PER_TASK * m)
            .enumerate()
            .for_each(|(task, dst)| {
                for (k, out) in dst.chunks_exact_mut(m).enumerate() {
                    let j = task * ROWS_PER_TASK + k;
                    let wq = &self.qs[j * per_row * 2..(j + 1) * per_row * 2];
                    let ws = &self.scales[j * per_row..(j + 1) * per_row];
                    let mut r = 0;
                    while r < m {
                        // up to four rows per pass over the weight row
                        r += match m - r {
                            1 => dot_into::<1>(wq, ws, &row_q, &row_s, r, out),
                            2 => dot_into::<2>(wq, ws, &row_q, &row_s, r, out),
                            3 => dot_into::<3>(wq, ws, &row_q, &row_s, r, out),
                            _ => dot_into::<4>(wq, ws, &row_q, &row_s, r, out),
                        };
                    }
                }
            });
        let out = if m == 1 {
            out_t
        } else {
            let mut out = vec![0f32; m * self.rows];
            for (j, row) in out_t.chunks_exact(m).enumerate() {
                for (r, v) in row.iter().enumerate() {
                    out[r * self.rows + j] = *v;
                }
            }
            out
        };
        Tensor::from_vec(out, (m, self.rows), &Device::Cpu)
    }
}

/// [`dot`] of one weight row with activation rows `r..r + R`, into `out[r..r + R]`.
/// Returns `R`.
#[inline(always)]
fn dot_into<'a, const R: usize>(
    wq: &[i8x16],
    ws: &[f32],
    row_q: &impl Fn(usize) -> &'a [i16x16],
    row_s: &impl Fn(usize) -> &'a [f32],
    r: usize,
    out: &mut [f32],
) -> usize {
    let o = dot::<R>(
        wq,
        ws,
        std::array::from_fn(|i| row_q(r + i)),
        std::array::from_fn(|i| row_s(r + i)),
    );
    out[r..r + R].copy_from_slice(&o);
    R
}

/// One weight row against `R` activation rows: each weight block is widened once and used
/// `R` times; per block and row, two `pmaddwd`-style products give eight 32-bit partial
/// sums, scaled into eight f32 lanes (no horizontal sum until the end of the row).
#[inline(always)]
fn dot<const R: usize>(wq: &[i8x16], ws: &[f32], xq: [&[i16x16]; R], xs: [&[f32]; R]) -> [f32; R] {
    let mut acc = [f32x8::ZERO; R];
    for (b, (w, &wd)) in wq.chunks_exact(2).zip(ws).enumerate() {
        let lo = i16x16::from_i8x16(w[0]);
        let hi = i16x16::from_i8x16(w[1]);
        for r in 0..R {
            let s = lo.dot(xq[r][2 * b]) + hi.dot(xq[r][2 * b + 1]);
            let scale = f32x8::splat(wd * xs[r][b]);
            acc[r] = f32x8::from_i32x8(s).mul_add(scale, acc[r]);
        }
    }
    acc.map(|a| a.reduce_add())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    /// Every batch size from 1 to 9 rows (the 4-row kernel, its remainders, and several
    /// passes) gives candle's Q8_0 product on the same weights, row by row.
    #[test]
    fn products_match_candle_q8_0_for_every_batch_size() {
        let (rows, cols) = (70, 96);
        let w = Tensor::from_vec(random(rows * cols, 1), (rows, cols), &Device::Cpu).unwrap();
        let q8_0 = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let reference = QMatMul::from_qtensor(q8_0).unwrap();
        // from GGUF's Q8_0 values: the same blocks
        let ours = Q8Matrix::from_tensor(&reference_weights(&reference)).unwrap();
        for m in 1..=9 {
            let x =
                Tensor::from_vec(random(m * cols, 10 + m as u64), (m, cols), &Device::Cpu).unwrap();
            let expected = reference.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            let got = ours.matmul(&x).unwrap().to_vec2::<f32>().unwrap();
            for (e, g) in expected.iter().flatten().zip(got.iter().flatten()) {
                // candle stores the activations' scales as f16; ours are f32
                assert!(
                    (e - g).abs() < 2e-3 * e.abs().max(1.0),
                    "{m} rows: {e} vs {g}"
                );
            }
        }
    }

    fn reference_weights(q: &QMatMul) -> Tensor {
        match q {
            QMatMul::QTensor(t) => t.dequantize(&Device::Cpu).unwrap(),
            _ => panic!("expected a quantized matrix"),
        }
    }

    #[test]
    fn dequantize_returns_the_quantized_values() {
        let (rows, cols) = (3, 64);
        let w = random(rows * cols, 7);
        let m = Q8Matrix::quantize(&w, rows, cols).unwrap();
        let back = m.dequantize(&Device::Cpu).unwrap();
        let back = back.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in w.iter().zip(&back) {
            assert!((a - b).abs() <= 0.5 / 127.0 * 0.5 + 1e-6, "{a} vs {b}");
        }
        // and quantizing them again changes nothing
        let again = Q8Matrix::quantize(&back, rows, cols)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in back.iter().zip(&again) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert!(Q8Matrix::quantize(&w[..60], 1, 60).is_err());
    }
}
