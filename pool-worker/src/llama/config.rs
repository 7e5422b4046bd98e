//! Model dimensions and rotary frequencies, whichever format they came from (the loaders
//! in `gguf` and `safetensors` build a [`Config`]).

use candle_core::Result;

use super::Arch;

/// Model dimensions, from GGUF metadata or config.json.
#[derive(Debug, Clone)]
pub struct Config {
    pub arch: Arch,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub eps: f64,
    /// Rotary inverse frequencies, one per pair of a head's dimensions (rope scaling
    /// already applied).
    pub inv_freq: Vec<f32>,
    /// Rotary pairs are adjacent dimensions (GGUF llama) rather than the two halves.
    pub rope_interleaved: bool,
    pub context_length: usize,
}

pub(super) fn check_shape(
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    hidden: usize,
) -> Result<()> {
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || head_dim * heads != hidden
    {
        candle_core::bail!(
            "unsupported attention shape: {heads} heads, {kv_heads} kv heads, head size {head_dim}, hidden {hidden}"
        );
    }
    Ok(())
}
