//! One sequence's keys and values, per layer, grown by half again, up to what the sequence
//! can ever hold.

use candle_core::{DType, Device, Result, Tensor};

use super::Config;

/// One sequence's keys and values for every layer, grown by half again when full (so a
/// long generation reallocates a few times, not at every step), never beyond its limit.
pub struct KvCache {
    /// Per layer: (kv_heads, capacity, head_dim) keys and values.
    pub(super) layers: Vec<(Tensor, Tensor)>,
    pub(super) len: usize,
    pub(super) capacity: usize,
    /// Tokens the sequence can ever hold (its prompt and its answer's budget): growth
    /// stops there, so a cache never holds room its sequence cannot use.
    pub(super) limit: usize,
}

impl KvCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Caps growth at `tokens` (see the field).
    pub fn set_limit(&mut self, tokens: usize) {
        self.limit = tokens;
    }

    /// Makes room for `extra` more tokens, reallocating to half again the size (at least
    /// what is needed, at most the limit) when full.
    pub(super) fn reserve(&mut self, extra: usize, cfg: &Config, device: &Device) -> Result<()> {
        let needed = self.len + extra;
        if needed <= self.capacity && !self.layers.is_empty() {
            return Ok(());
        }
        let capacity = (self.capacity + self.capacity / 2)
            .max(needed)
            .next_multiple_of(64)
            .min(self.limit.max(needed));
        let shape = (cfg.kv_heads, capacity, cfg.head_dim);
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let k = Tensor::zeros(shape, DType::F32, device)?;
            let v = Tensor::zeros(shape, DType::F32, device)?;
            if let Some((old_k, old_v)) = self.layers.get(l)
                && self.len > 0
            {
                k.slice_set(&old_k.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                v.slice_set(&old_v.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
            }
            layers.push((k, v));
        }
        self.layers = layers;
        self.capacity = capacity;
        Ok(())
    }
}

/// A run of consecutive tokens' keys and values for every layer, copied out of a
/// [`KvCache`]: what the prefix cache keeps between requests.
pub struct KvBlock {
    /// Per layer: (kv_heads, tokens, head_dim) keys and values.
    layers: Vec<(Tensor, Tensor)>,
    tokens: usize,
}

impl KvBlock {
    /// Tokens held.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }
}

impl KvCache {
    /// A copy of the keys and values of tokens `start..start + len`.
    pub fn copy_out(&self, start: usize, len: usize) -> Result<KvBlock> {
        if start + len > self.len {
            candle_core::bail!(
                "tokens {start}..{} are not in a cache of {}",
                start + len,
                self.len
            );
        }
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| {
                // a copy of its own: a view would keep the whole cache's memory alive
                Ok((
                    k.narrow(1, start, len)?.force_contiguous()?,
                    v.narrow(1, start, len)?.force_contiguous()?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(KvBlock {
            layers,
            tokens: len,
        })
    }

    /// Appends `blocks`, in order, after the tokens held: the cache then holds what running
    /// those blocks' tokens would have put there.
    pub(super) fn extend_from(
        &mut self,
        blocks: &[&KvBlock],
        cfg: &Config,
        device: &Device,
    ) -> Result<()> {
        let extra: usize = blocks.iter().map(|b| b.tokens).sum();
        if blocks.is_empty() || extra == 0 {
            return Ok(());
        }
        if blocks.iter().any(|b| b.layers.len() != cfg.layers) {
            candle_core::bail!("a cached block has another model's layer count");
        }
        self.reserve(extra, cfg, device)?;
        for (l, (k, v)) in self.layers.iter().enumerate() {
            let keys: Vec<&Tensor> = blocks.iter().map(|b| &b.layers[l].0).collect();
            let values: Vec<&Tensor> = blocks.iter().map(|b| &b.layers[l].1).collect();
            k.slice_set(&Tensor::cat(&keys, 1)?, 1, self.len)?;
            v.slice_set(&Tensor::cat(&values, 1)?, 1, self.len)?;
        }
        self.len += extra;
        Ok(())
    }
}
