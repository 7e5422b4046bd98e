//! One sequence's keys and values, per layer, grown by doubling.

use candle_core::{DType, Device, Result, Tensor};

use super::Config;

/// One sequence's keys and values for every layer, grown by doubling.
pub struct KvCache {
    /// Per layer: (kv_heads, capacity, head_dim) keys and values.
    pub(super) layers: Vec<(Tensor, Tensor)>,
    pub(super) len: usize,
    pub(super) capacity: usize,
}

impl KvCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes room for `extra` more tokens, reallocating to double the size when full.
    pub(super) fn reserve(&mut self, extra: usize, cfg: &Config, device: &Device) -> Result<()> {
        let needed = self.len + extra;
        if needed <= self.capacity && !self.layers.is_empty() {
            return Ok(());
        }
        let capacity = needed.next_power_of_two().max(64);
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
