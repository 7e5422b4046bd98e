//! Builds a `tokenizers` BPE tokenizer from GGUF metadata (`tokenizer.ggml.*`).
//!
//! GPT-2 style byte-level BPE (the `gpt2` tokenizer model, used by SmolLM2, Qwen2, Llama 3):
//! vocabulary from `tokenizer.ggml.tokens`, merges from `tokenizer.ggml.merges`, control and
//! user-defined token types (3 and 4) become special added tokens. The pre-tokenizer splits
//! digits individually and then applies the byte-level split, as llama.cpp's `smollm` /
//! `gpt2` pre-tokenizers do.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use crate::MetaError;

const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

fn strings(content: &Content, key: &str) -> Result<Vec<String>, MetaError> {
    let missing = || MetaError::MissingKey { key: key.into() };
    let values = content
        .metadata
        .get(key)
        .ok_or_else(missing)?
        .to_vec()
        .map_err(|_| missing())?;
    values
        .iter()
        .map(|v| v.to_string().cloned().map_err(|_| missing()))
        .collect()
}

fn token_types(content: &Content) -> Vec<i32> {
    let Some(Ok(values)) = content
        .metadata
        .get("tokenizer.ggml.token_type")
        .map(Value::to_vec)
    else {
        return Vec::new();
    };
    values
        .iter()
        .map(|v| {
            v.to_i32()
                .or_else(|_| v.to_u32().map(|u| u as i32))
                .unwrap_or(1)
        })
        .collect()
}

/// Builds the tokenizer stored in a GGUF file's metadata.
pub fn tokenizer_from_gguf(content: &Content) -> Result<Tokenizer, MetaError> {
    let model = content
        .metadata
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if model != "gpt2" {
        return Err(MetaError::UnsupportedTokenizer { model });
    }
    let tokens = strings(content, "tokenizer.ggml.tokens")?;
    let merges = strings(content, "tokenizer.ggml.merges")?
        .into_iter()
        .filter_map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect::<Vec<_>>();
    let vocab: ahash::AHashMap<String, u32> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), id as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| MetaError::Tokenizer(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let pre: Vec<PreTokenizerWrapper> = vec![
        Digits::new(true).into(),
        ByteLevel::new(false, true, true).into(),
    ];
    tokenizer.with_pre_tokenizer(Some(Sequence::new(pre)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let special: Vec<AddedToken> = token_types(content)
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == CONTROL || **t == USER_DEFINED)
        .filter_map(|(id, _)| tokens.get(id))
        .map(|t| AddedToken::from(t.clone(), true))
        .collect();
    tokenizer
        .add_special_tokens(special)
        .map_err(|e| MetaError::Tokenizer(e.to_string()))?;
    Ok(tokenizer)
}
