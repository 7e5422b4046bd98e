//! Attention against the sequences' caches: per prompt chunk (blocks of queries, causal),
//! and for decode rows either straight from the caches' memory (CPU) or as one padded
//! batch (GPUs).

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::{Item, KvCache, Llama};
use crate::cpu_ops::CausalSoftmax;

/// Query rows of one sequence whose attention is computed together.
const QUERY_BLOCK: usize = 128;

impl Llama {
    /// Attention for a batch of decode steps (one new row per sequence): `q` (heads, B, d),
    /// `k`/`v` (kv, B, d). Each sequence's keys are padded to the longest and masked, and
    /// one batched product serves them all. Returns (B, heads·d).
    pub(super) fn attend_decode_batch(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        items: &mut [Item<'_>],
        l: usize,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let b = items.len();
        let longest = items.iter().map(|i| i.cache.len + 1).max().unwrap_or(1);
        let mut keys = Vec::with_capacity(b);
        let mut values = Vec::with_capacity(b);
        let mut mask = vec![0f32; b * longest];
        for (i, item) in items.iter_mut().enumerate() {
            let start = item.cache.len;
            let total = start + 1;
            let (kc, vc) = &item.cache.layers[l];
            kc.slice_set(&k.narrow(1, i, 1)?.contiguous()?, 1, start)?;
            vc.slice_set(&v.narrow(1, i, 1)?.contiguous()?, 1, start)?;
            keys.push(
                kc.narrow(1, 0, total)?
                    .pad_with_zeros(1, 0, longest - total)?,
            );
            values.push(
                vc.narrow(1, 0, total)?
                    .pad_with_zeros(1, 0, longest - total)?,
            );
            mask[i * longest + total..(i + 1) * longest].fill(f32::NEG_INFINITY);
        }
        let keys = Tensor::stack(&keys, 0)?; // (B, kv, longest, d)
        let values = Tensor::stack(&values, 0)?;
        let group = cfg.heads / cfg.kv_heads;
        let q = q
            .transpose(0, 1)?
            .contiguous()?
            .reshape((b, cfg.kv_heads, group, cfg.head_dim))?;
        let scale = 1.0 / (cfg.head_dim as f64).sqrt();
        let scores = (q.matmul(&keys.t()?)? * scale)?; // (B, kv, group, longest)
        let mask = Tensor::from_vec(mask, (b, 1, 1, longest), &self.device)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
        probs.matmul(&values)?.reshape((b, cfg.hidden)) // (B, kv, group, d) → (B, hidden)
    }

    /// CPU attention for the batch's decode items (one new row each): appends their keys
    /// and values to layer `l` of their caches, then computes every (sequence, head) pair
    /// in parallel straight from the caches' memory. A handful of tensor operations per
    /// layer instead of a dozen per sequence, which dominated small decode steps. Returns
    /// (decode items, hidden) row-major, in batch order; empty when there are none.
    pub(super) fn attend_decode_rows_cpu(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        items: &mut [Item<'_>],
        l: usize,
    ) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let d = cfg.head_dim;
        let rows = q.dim(1)?;
        let mut decode = Vec::new(); // (batch row, cache length after this token)
        let mut row = 0;
        for item in items.iter() {
            if item.tokens.len() == 1 {
                decode.push((row, item.cache.len + 1));
            }
            row += item.tokens.len();
        }
        if decode.is_empty() {
            return Ok(Vec::new());
        }
        // (heads, rows, d) and (kv, rows, d), flattened
        let q = q.flatten_all()?.to_vec1::<f32>()?;
        let k = k.flatten_all()?.to_vec1::<f32>()?;
        let v = v.flatten_all()?.to_vec1::<f32>()?;
        let gather = |all: &[f32], r: usize| -> Vec<f32> {
            (0..cfg.kv_heads)
                .flat_map(|h| {
                    all[(h * rows + r) * d..(h * rows + r + 1) * d]
                        .iter()
                        .copied()
                })
                .collect()
        };
        let decoding = items.iter().filter(|i| i.tokens.len() == 1);
        for (item, &(r, total)) in decoding.zip(&decode) {
            let (kc, vc) = &item.cache.layers[l];
            let shape = (cfg.kv_heads, 1, d);
            kc.slice_set(
                &Tensor::from_vec(gather(&k, r), shape, &self.device)?,
                1,
                total - 1,
            )?;
            vc.slice_set(
                &Tensor::from_vec(gather(&v, r), shape, &self.device)?,
                1,
                total - 1,
            )?;
        }
        // every decode item's cache, read in place: (kv, capacity, d) keys and values
        let mut guards = Vec::with_capacity(decode.len());
        for item in items.iter().filter(|i| i.tokens.len() == 1) {
            let (kc, vc) = &item.cache.layers[l];
            guards.push((
                kc.storage_and_layout(),
                vc.storage_and_layout(),
                item.cache.capacity,
            ));
        }
        let mut caches = Vec::with_capacity(guards.len());
        for ((ks, kl), (vs, vl), capacity) in &guards {
            let (candle_core::Storage::Cpu(kc), candle_core::Storage::Cpu(vc)) = (&**ks, &**vs)
            else {
                candle_core::bail!("CPU attention over a cache on another device");
            };
            let keys = &kc.as_slice::<f32>()?[kl.start_offset()..];
            let values = &vc.as_slice::<f32>()?[vl.start_offset()..];
            caches.push((keys, values, *capacity));
        }
        let group = cfg.heads / cfg.kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; decode.len() * cfg.heads * d];
        out.par_chunks_mut(d).enumerate().for_each(|(task, out)| {
            let (i, h) = (task / cfg.heads, task % cfg.heads);
            let ((r, total), (keys, values, capacity)) = (decode[i], caches[i]);
            let base = (h / group) * capacity * d;
            let query = &q[(h * rows + r) * d..(h * rows + r + 1) * d];
            let mut scores: Vec<f32> = (0..total)
                .map(|t| {
                    let key = &keys[base + t * d..base + (t + 1) * d];
                    query.iter().zip(key).map(|(a, b)| a * b).sum::<f32>() * scale
                })
                .collect();
            let max = scores.iter().fold(f32::NEG_INFINITY, |m, s| m.max(*s));
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            for (t, p) in scores.iter().enumerate() {
                let value = &values[base + t * d..base + (t + 1) * d];
                for (o, x) in out.iter_mut().zip(value) {
                    *o += p * x;
                }
            }
            for o in out.iter_mut() {
                *o /= sum;
            }
        });
        Ok(out)
    }

    /// Attention for one sequence: `q` (heads, n, d) for its new rows, `k`/`v` (kv, n, d)
    /// appended to layer `l` of its cache. Returns (n, heads·d).
    pub(super) fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        l: usize,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let n = q.dim(1)?;
        let start = cache.len;
        let total = start + n;
        let (k_all, v_all) = {
            let (kc, vc) = &cache.layers[l];
            kc.slice_set(k, 1, start)?;
            vc.slice_set(v, 1, start)?;
            (kc.narrow(1, 0, total)?, vc.narrow(1, 0, total)?)
        };
        // Grouped-query attention without copying keys: the query heads sharing a kv head
        // are stacked as rows, (kv, group·rows, d). Queries go in blocks, each against only
        // the keys it may see (causality halves a prefill's work), which also keeps the
        // score matrices small enough to stay in cache.
        let group = cfg.heads / cfg.kv_heads;
        let scale = 1.0 / (cfg.head_dim as f64).sqrt();
        let q = q.contiguous()?;
        let mut outs = Vec::with_capacity(n.div_ceil(QUERY_BLOCK));
        let mut first = 0;
        while first < n {
            let len = QUERY_BLOCK.min(n - first);
            let keys = start + first + len;
            let q_block = q.narrow(1, first, len)?.contiguous()?.reshape((
                cfg.kv_heads,
                group * len,
                cfg.head_dim,
            ))?;
            let scores = q_block.matmul(&k_all.narrow(1, 0, keys)?.t()?)?;
            let probs = if self.device.is_cpu() {
                // scale, causal mask and softmax in one pass: row i of the block sees
                // keys ..=start+first+i
                CausalSoftmax {
                    scale: scale as f32,
                    queries: len,
                    first_visible: start + first + 1,
                }
                .apply(scores)?
            } else {
                let scores = (scores * scale)?;
                let scores = match mask {
                    Some(mask) => scores
                        .reshape((cfg.kv_heads, group, len, keys))?
                        .broadcast_add(&mask.narrow(0, first, len)?.narrow(1, 0, keys)?)?
                        .reshape((cfg.kv_heads, group * len, keys))?,
                    None => scores,
                };
                candle_nn::ops::softmax_last_dim(&scores)?
            };
            let out = probs.matmul(&v_all.narrow(1, 0, keys)?)?; // (kv, group·len, d)
            outs.push(
                out.reshape((cfg.heads, len, cfg.head_dim))?
                    .transpose(0, 1)?
                    .contiguous()?
                    .reshape((len, cfg.hidden))?,
            );
            first += len;
        }
        if outs.len() == 1 {
            return outs
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("no rows".into()));
        }
        Tensor::cat(&outs, 0)
    }
}
