//! Model metadata shared by the router and the worker.
//!
//! - [`load_tokenizer`]: a real `tokenizers` tokenizer from a `tokenizer.json`, or built from
//!   the BPE vocabulary and merges stored in a GGUF file's metadata (GGUF files such as
//!   SmolLM2's ship no tokenizer.json).
//! - [`ChatTemplate`]: the model's own Jinja chat template, rendered with minijinja.
//! - [`GgufInfo`]: the few metadata values both sides need (context length, EOS, template).
//! - [`HfModel`]: the same for a Hugging Face model directory (config.json, safetensors).
//! - [`tiny`]: writes a tiny random-weight llama GGUF for fast tests.
//! - [`count::ByteLevelCounter`]: exact token counts for GGUF-built tokenizers, fast.

pub mod count;
mod gguf_tokenizer;
mod hf;
mod template;
pub mod tiny;

use std::path::{Path, PathBuf};

pub use gguf_tokenizer::{smollm_pre_tokenizer, tokenizer_from_gguf};
pub use hf::{
    HF_ARCHITECTURES, HfConfig, HfModel, RopeScaling, TokenIds, is_hf_model, rope_inv_freq,
};
pub use template::{ChatMessage, ChatTemplate};
pub use tokenizers::Tokenizer;

use candle_core::quantized::gguf_file;

/// The SmolLM2 GGUF that `scripts/fetch-model.sh` puts in this workspace's `models/`
/// (`SWITCHYARD_SMOLLM2` names another), if it is there: for the tests and benches that
/// need a real model and skip without one.
pub fn workspace_smollm2() -> Option<PathBuf> {
    let p = std::env::var_os("SWITCHYARD_SMOLLM2")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    p.exists().then_some(p)
}

/// Errors loading model metadata. All are caused by the model files (operator side).
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a readable GGUF file: {reason}")]
    Gguf { path: PathBuf, reason: String },
    #[error("GGUF metadata key `{key}` is missing or has the wrong type")]
    MissingKey { key: String },
    #[error("unsupported tokenizer model `{model}` (supported: gpt2-style BPE)")]
    UnsupportedTokenizer { model: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("model config: {0}")]
    Config(String),
}

/// Where a model's tokenizer comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    /// A Hugging Face `tokenizer.json`.
    Json(PathBuf),
    /// The tokenizer stored in a GGUF file's metadata.
    Gguf(PathBuf),
}

/// Loads a tokenizer from either source.
pub fn load_tokenizer(source: &TokenizerSource) -> Result<Tokenizer, MetaError> {
    match source {
        TokenizerSource::Json(path) => Tokenizer::from_file(path)
            .map_err(|e| MetaError::Tokenizer(format!("{}: {e}", path.display()))),
        TokenizerSource::Gguf(path) => {
            let content = read_gguf(path)?;
            tokenizer_from_gguf(&content)
        }
    }
}

/// Reads only the header and metadata of a GGUF file (tensors stay on disk).
pub fn read_gguf(path: &Path) -> Result<gguf_file::Content, MetaError> {
    let mut file = std::fs::File::open(path).map_err(|source| MetaError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    gguf_file::Content::read(&mut file).map_err(|e| MetaError::Gguf {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The metadata values the worker and router need from a GGUF file.
#[derive(Debug, Clone)]
pub struct GgufInfo {
    pub architecture: String,
    /// `general.name`, if present.
    pub name: Option<String>,
    pub context_length: usize,
    pub eos_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub chat_template: Option<String>,
}

impl GgufInfo {
    pub fn from_content(content: &gguf_file::Content) -> Result<Self, MetaError> {
        let md = &content.metadata;
        let get_str = |k: &str| md.get(k).and_then(|v| v.to_string().ok()).cloned();
        let get_u32 = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let architecture = get_str("general.architecture").ok_or(MetaError::MissingKey {
            key: "general.architecture".into(),
        })?;
        let context_length = get_u32(&format!("{architecture}.context_length"))
            .or_else(|| {
                md.get(&format!("{architecture}.context_length"))
                    .and_then(|v| v.to_u64().ok())
                    .map(|v| v as u32)
            })
            .ok_or(MetaError::MissingKey {
                key: format!("{architecture}.context_length"),
            })? as usize;
        Ok(Self {
            name: get_str("general.name"),
            context_length,
            eos_token_id: get_u32("tokenizer.ggml.eos_token_id"),
            bos_token_id: get_u32("tokenizer.ggml.bos_token_id"),
            chat_template: get_str("tokenizer.chat_template"),
            architecture,
        })
    }
}
