//! Element-wise CPU kernels for the prefill, each one pass where candle takes several.
//!
//! A prefill's attention scores are its largest element-wise work: for a 1k-token prompt,
//! about 200 million scores per forward. candle scales them (one pass), adds a causal mask
//! (another, over a mask tensor built for the purpose), then runs a softmax whose `exp` is
//! scalar and which exponentiates the masked half too. [`CausalSoftmax`] does all of it in
//! one pass per row, exponentiating only the keys the row may see, with `wide`'s 8-lane
//! `exp`. [`SiluMul`] does the same for the feed-forward gate, `silu(gate) · up`, and
//! [`SiluMulHalves`] for a gate and up projection computed as one stacked product.
//!
//! All three are candle custom ops, so they take and return ordinary tensors. They have CPU
//! kernels only: `silu_mul*` fall back to candle's ops on other devices, and the forward
//! uses `CausalSoftmax` on CPU only (the CUDA path keeps candle's kernels).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, InplaceOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use wide::f32x8;

/// The fewest score rows one parallel task of [`CausalSoftmax`] takes.
const ROWS_PER_TASK_MIN: usize = 4;

fn offsets(layout: &Layout) -> Result<(usize, usize)> {
    layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("expected a contiguous tensor".into()))
}

fn too_short() -> candle_core::Error {
    candle_core::Error::Msg("tensor storage too short".into())
}

/// The f32 values of a contiguous CPU tensor.
fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let (start, end) = offsets(layout)?;
    storage
        .as_slice::<f32>()?
        .get(start..end)
        .ok_or_else(too_short)
}

/// The f32 values of a contiguous CPU tensor, to overwrite.
fn contiguous_f32_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout) -> Result<&'a mut [f32]> {
    let (start, end) = offsets(layout)?;
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("expected f32 values");
    };
    data.get_mut(start..end).ok_or_else(too_short)
}

fn lanes(v: &[f32]) -> f32x8 {
    f32x8::new(std::array::from_fn(|i| v[i]))
}

/// Softmax over the last dimension of `scale · scores`, where each row sees only a prefix
/// of its keys: row `r` is query `r % queries` of its block and sees the first
/// `first_visible + r % queries` keys (all of them when that is more). Keys past the
/// prefix get probability 0 — the causal mask, without a mask tensor.
#[derive(Debug, Clone, Copy)]
pub struct CausalSoftmax {
    /// Multiplies the scores (1/√d).
    pub scale: f32,
    /// Query rows per block; the rows of a block see one key more each.
    pub queries: usize,
    /// Keys the first query of a block sees.
    pub first_visible: usize,
}

impl CausalSoftmax {
    /// The softmax of `scores` (CPU, f32), written over their values (pass a tensor nothing
    /// else shares, such as a product just computed).
    pub fn apply(&self, scores: Tensor) -> Result<Tensor> {
        let scores = scores.contiguous()?;
        scores.inplace_op1(self)?;
        Ok(scores)
    }

    fn visible(&self, row: usize, keys: usize) -> usize {
        self.first_visible
            .saturating_add(row % self.queries.max(1))
            .min(keys)
    }
}

/// `row[..n] = softmax(scale · row[..n])` and `row[n..] = 0`.
fn softmax_prefix(row: &mut [f32], n: usize, scale: f32) {
    let (row, masked) = row.split_at_mut(n.min(row.len()));
    masked.fill(0.0);
    if row.is_empty() {
        return;
    }
    let split = row.len() - row.len() % 8;
    let (head, tail) = row.split_at_mut(split);
    let mut max8 = f32x8::splat(f32::NEG_INFINITY);
    for c in head.chunks_exact(8) {
        max8 = max8.max(lanes(c));
    }
    let max = max8
        .to_array()
        .iter()
        .chain(tail.iter())
        .fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    let (m8, s8) = (f32x8::splat(max), f32x8::splat(scale));
    let mut sum8 = f32x8::ZERO;
    for c in head.chunks_exact_mut(8) {
        let e = ((lanes(c) - m8) * s8).exp();
        sum8 += e;
        c.copy_from_slice(&e.to_array());
    }
    let mut sum = sum8.reduce_add();
    for v in tail.iter_mut() {
        *v = ((*v - max) * scale).exp();
        sum += *v;
    }
    let inv = sum.recip();
    let inv8 = f32x8::splat(inv);
    for c in head.chunks_exact_mut(8) {
        c.copy_from_slice(&(lanes(c) * inv8).to_array());
    }
    for v in tail {
        *v *= inv;
    }
}

impl InplaceOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let keys = layout.dims().last().copied().unwrap_or(0);
        let x = contiguous_f32_mut(storage, layout)?;
        if keys > 0 {
            x.par_chunks_exact_mut(keys)
                .enumerate()
                .with_min_len(ROWS_PER_TASK_MIN)
                .for_each(|(row, x)| softmax_prefix(x, self.visible(row, keys), self.scale));
        }
        Ok(())
    }
}

/// `silu(gate) · up` element-wise, for two tensors of one shape.
#[derive(Debug, Clone, Copy)]
pub struct SiluMul;

/// Values per parallel task of [`SiluMul`].
const SILU_CHUNK: usize = 8 * 1024;

/// `out = silu(g) · u`, element-wise.
fn silu_mul_to(out: &mut [f32], g: &[f32], u: &[f32]) {
    let split = out.len() - out.len() % 8;
    let (head, tail) = out.split_at_mut(split);
    for ((o, g), u) in head
        .chunks_exact_mut(8)
        .zip(g.chunks_exact(8))
        .zip(u.chunks_exact(8))
    {
        let x = lanes(g);
        let silu = x / (f32x8::ONE + (-x).exp());
        o.copy_from_slice(&(silu * lanes(u)).to_array());
    }
    for ((o, g), u) in tail.iter_mut().zip(&g[split..]).zip(&u[split..]) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("silu-mul of shapes {:?} and {:?}", l1.shape(), l2.shape());
        }
        let (gate, up) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
        let mut out = vec![0f32; gate.len()];
        out.par_chunks_mut(SILU_CHUNK)
            .zip(gate.par_chunks(SILU_CHUNK).zip(up.par_chunks(SILU_CHUNK)))
            .for_each(|(o, (g, u))| silu_mul_to(o, g, u));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `silu(gate) · up`: one fused pass on CPU, candle's ops elsewhere.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.device().is_cpu() && gate.dtype() == candle_core::DType::F32 {
        gate.contiguous()?
            .apply_op2_no_bwd(&up.contiguous()?, &SiluMul)
    } else {
        candle_nn::ops::silu(gate)? * up
    }
}

/// `silu(gate) · up` for rows holding the gate and then the up projection side by side
/// (one stacked product): (rows, 2·n) → (rows, n).
#[derive(Debug, Clone, Copy)]
pub struct SiluMulHalves;

impl CustomOp1 for SiluMulHalves {
    fn name(&self) -> &'static str {
        "silu-mul-halves"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, width) = layout.shape().dims2()?;
        if width % 2 != 0 {
            candle_core::bail!("silu-mul-halves of an odd width {width}");
        }
        let n = width / 2;
        let x = contiguous_f32(storage, layout)?;
        let mut out = vec![0f32; rows * n];
        if n > 0 {
            out.par_chunks_exact_mut(n)
                .zip(x.par_chunks_exact(width))
                .with_min_len((SILU_CHUNK / width).max(1))
                .for_each(|(o, row)| {
                    let (g, u) = row.split_at(n);
                    silu_mul_to(o, g, u);
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, n))))
    }
}

/// `silu(gate) · up` from one (rows, 2·n) product holding gate then up: one fused pass on
/// CPU, candle's ops elsewhere.
pub fn silu_mul_halves(gate_up: &Tensor) -> Result<Tensor> {
    let n = gate_up.dim(1)? / 2;
    if gate_up.device().is_cpu() && gate_up.dtype() == candle_core::DType::F32 {
        gate_up.contiguous()?.apply_op1_no_bwd(&SiluMulHalves)
    } else {
        candle_nn::ops::silu(&gate_up.narrow(1, 0, n)?)? * gate_up.narrow(1, n, n)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device};

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 20.0
            })
            .collect()
    }

    fn max_gap(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Against candle's scale + mask + softmax on the same scores: two blocks of 5 queries
    /// over 21 keys (odd lengths exercise the scalar tails), the first query seeing 13.
    #[test]
    fn causal_softmax_matches_masked_softmax() {
        let (blocks, queries, keys, first_visible) = (2, 5, 21, 13);
        let scores = Tensor::from_vec(
            values(blocks * queries * keys, 3),
            (blocks, queries, keys),
            &Device::Cpu,
        )
        .unwrap();
        let scale = 0.125f32;
        let mask: Vec<f32> = (0..queries)
            .flat_map(|i| {
                (0..keys).map(move |j| {
                    if j < first_visible + i {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (queries, keys), &Device::Cpu).unwrap();
        let expected = candle_nn::ops::softmax_last_dim(
            &(scores.clone() * scale as f64)
                .unwrap()
                .broadcast_add(&mask)
                .unwrap(),
        )
        .unwrap();
        let op = CausalSoftmax {
            scale,
            queries,
            first_visible,
        };
        let got = op.apply(scores.copy().unwrap()).unwrap();
        let (e, g) = (
            expected.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        for (i, (e, g)) in e.iter().zip(&g).enumerate() {
            assert!((e - g).abs() < 1e-6, "element {i}: {e} vs {g}");
        }
        // every row sums to one over exactly its visible keys
        let sums = got.sum(D::Minus1).unwrap().flatten_all().unwrap();
        for s in sums.to_vec1::<f32>().unwrap() {
            assert!((s - 1.0).abs() < 1e-5, "{s}");
        }
        // every row seeing every key: the plain softmax
        let full = CausalSoftmax {
            scale,
            queries: 1,
            first_visible: keys,
        }
        .apply(scores.copy().unwrap())
        .unwrap();
        let plain = candle_nn::ops::softmax_last_dim(&(scores * scale as f64).unwrap()).unwrap();
        let gap = max_gap(&full, &plain);
        assert!(gap < 1e-6, "{gap}");
    }

    #[test]
    fn silu_mul_matches_candle() {
        let n = SILU_CHUNK + 13;
        let gate = Tensor::from_vec(values(n, 5), (1, n), &Device::Cpu).unwrap();
        let up = Tensor::from_vec(values(n, 6), (1, n), &Device::Cpu).unwrap();
        let expected = (candle_nn::ops::silu(&gate).unwrap() * &up)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let got = silu_mul(&gate, &up)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (i, (e, g)) in expected.iter().zip(&got).enumerate() {
            assert!(
                (e - g).abs() <= 1e-5 * e.abs().max(1.0),
                "element {i}: {e} vs {g}"
            );
        }
        let other = Tensor::zeros((2, n), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(silu_mul(&gate, &other).is_err());
        // gate and up side by side in rows: the same values
        let (rows, width) = (3, 40);
        let g = Tensor::from_vec(values(rows * width, 7), (rows, width), &Device::Cpu).unwrap();
        let u = Tensor::from_vec(values(rows * width, 8), (rows, width), &Device::Cpu).unwrap();
        let halves = silu_mul_halves(&Tensor::cat(&[&g, &u], 1).unwrap()).unwrap();
        assert_eq!(halves.dims(), &[rows, width]);
        let separate = silu_mul(&g, &u).unwrap();
        let gap = max_gap(&halves, &separate);
        assert!(gap == 0.0, "{gap}");
    }
}
