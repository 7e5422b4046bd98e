//! The model architectures this forward runs, parsed once from the model's files (GGUF
//! `general.architecture`, config.json `model_type`) into [`Arch`]. Everything that
//! differs between architectures asks an `Arch` method instead of comparing names.
//!
//! # Adding a model architecture
//!
//! An architecture whose blocks are llama's (RMS norm, rotary attention with grouped
//! keys and values, SiLU-gated feed-forward) with different details:
//!
//! 1. Add a variant to [`Arch`] here, with its name in [`Arch::NAMES`] and
//!    [`Arch::name`]; [`Arch::parse`] then accepts it.
//! 2. Answer every `match` on `Arch` in this file ([`Arch::gguf_rope_interleaved`],
//!    [`Arch::qkv_bias`]); the compiler lists each one. A new difference (another norm,
//!    a bias elsewhere, ...) becomes a new method here, asked where the forward or a
//!    loader (`gguf.rs`, `safetensors.rs`) needs it — never a name compare.
//! 3. Safetensors only: `model_meta::HF_ARCHITECTURES` (model-meta/src/hf.rs) refuses a
//!    config.json before the worker sees it; add the name there too.
//! 4. Test it as `tests.rs` tests qwen2: a random checkpoint from `model_meta::tiny`
//!    against candle's reference implementation, from safetensors and converted to GGUF.
//!
//! An architecture with other blocks (mixture of experts, sliding-window attention, ...)
//! needs changes to the forward in `mod.rs` and `attention.rs` as well.

use std::fmt;

/// An architecture this forward runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama, Llama 2 and 3, SmolLM2, TinyLlama.
    Llama,
    /// Qwen2 and 2.5: llama's blocks with biases on the query, key and value projections.
    Qwen2,
}

impl Arch {
    /// Every supported architecture's name, as the model files give it.
    pub const NAMES: [&'static str; 2] = ["llama", "qwen2"];

    /// The name the model files give it (GGUF `general.architecture` and metadata key
    /// prefix, config.json `model_type`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
        }
    }

    /// The architecture called `name`; an unknown one is an error naming it and the
    /// supported ones.
    pub fn parse(name: &str) -> candle_core::Result<Self> {
        match name {
            "llama" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            other => candle_core::bail!(
                "architecture `{other}` is not supported (supported: {})",
                Self::NAMES.join(", ")
            ),
        }
    }

    /// Whether a GGUF file's rotary pairs are adjacent dimensions: llama.cpp's converter
    /// reorders llama's query and key rows for that form, and runs qwen2 in the halves
    /// ("neox") form. Safetensors checkpoints always use halves.
    pub fn gguf_rope_interleaved(self) -> bool {
        match self {
            Self::Llama => true,
            Self::Qwen2 => false,
        }
    }

    /// Whether the query, key and value projections always have biases (other biases are
    /// used where a checkpoint has them).
    pub fn qkv_bias(self) -> bool {
        match self {
            Self::Llama => false,
            Self::Qwen2 => true,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::Arch;

    #[test]
    fn names_round_trip_and_unknown_ones_are_named() {
        for name in Arch::NAMES {
            assert_eq!(Arch::parse(name).map(Arch::name).ok(), Some(name));
        }
        let err = Arch::parse("phi3").err().map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(err.contains("`phi3` is not supported"), "{err}");
        assert!(err.contains("llama, qwen2"), "{err}");
    }
}
