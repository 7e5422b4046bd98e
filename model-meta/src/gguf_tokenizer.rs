//! Builds a `tokenizers` BPE tokenizer from GGUF metadata (`tokenizer.ggml.*`).
//!
//! GPT-2 style byte-level BPE (the `gpt2` tokenizer model): vocabulary from
//! `tokenizer.ggml.tokens`, merges from `tokenizer.ggml.merges`, control and user-defined
//! token types (3 and 4) become special added tokens. The pre-tokenizer follows
//! `tokenizer.ggml.pre` as llama.cpp does: `smollm` splits digits individually and then
//! applies GPT-2's byte-level split; `gpt-2` / `default` (or no key) apply the byte-level
//! split alone; `llama-bpe` (Llama 3) and `qwen2` split with their own patterns (the ones
//! their `tokenizer.json` files carry; Qwen2's also NFC-normalises). Other pre-tokenizers
//! split text differently and are refused, so a model is never served with the wrong
//! tokens: give those models their `tokenizer.json`.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

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

/// llama.cpp's `smollm` pre-tokenizer: every digit on its own, then GPT-2's byte-level split.
pub fn smollm_pre_tokenizer() -> PreTokenizerWrapper {
    let steps: Vec<PreTokenizerWrapper> = vec![
        Digits::new(true).into(),
        ByteLevel::new(false, true, true).into(),
    ];
    Sequence::new(steps).into()
}

/// Llama 3's split (`llama-bpe`): letters with one leading non-letter, numbers in runs of
/// up to three digits, punctuation runs, newlines, whitespace.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: Llama 3's with every digit on its own.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A regex split (pieces kept), then the byte-level mapping without GPT-2's own split.
fn split_then_bytes(pattern: &str) -> Result<PreTokenizerWrapper, MetaError> {
    let split = Split::new(
        SplitPattern::Regex(pattern.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| MetaError::Tokenizer(e.to_string()))?;
    let steps: Vec<PreTokenizerWrapper> =
        vec![split.into(), ByteLevel::new(false, true, false).into()];
    Ok(Sequence::new(steps).into())
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
    let merges = strings(content, "tokenizer.ggml.merges")?;
    let pre = content
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned();
    bpe_tokenizer(&tokens, &merges, &token_types(content), pre.as_deref())
}

/// A byte-level BPE tokenizer from GGUF's parts: tokens by id, merges as "a b", token types
/// (control and user-defined become special tokens) and the `tokenizer.ggml.pre` name.
pub(crate) fn bpe_tokenizer(
    tokens: &[String],
    merges: &[String],
    types: &[i32],
    pre: Option<&str>,
) -> Result<Tokenizer, MetaError> {
    let merges = merges
        .iter()
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
    // Llama 3 looks a whole pre-token up in the vocabulary before merging (as its
    // tokenizer.json's `ignore_merges` and llama.cpp do)
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(matches!(pre, Some("llama-bpe" | "llama3")))
        .build()
        .map_err(|e| MetaError::Tokenizer(e.to_string()))?;
    let pre_tokenizer = match pre {
        Some("smollm") => smollm_pre_tokenizer(),
        None | Some("default" | "gpt-2" | "gpt2") => {
            PreTokenizerWrapper::from(ByteLevel::new(false, true, true))
        }
        Some("llama-bpe" | "llama3") => split_then_bytes(LLAMA3_SPLIT)?,
        Some("qwen2") => split_then_bytes(QWEN2_SPLIT)?,
        Some(other) => {
            return Err(MetaError::UnsupportedTokenizer {
                model: format!(
                    "gpt2 with the `{other}` pre-tokenizer (supported from GGUF: smollm, gpt-2, \
                     llama-bpe, qwen2; give this model its tokenizer.json)"
                ),
            });
        }
    };
    let mut tokenizer = Tokenizer::new(bpe);
    if pre == Some("qwen2") {
        tokenizer
            .with_normalizer(Some(NFC))
            .map_err(|e| MetaError::Tokenizer(e.to_string()))?;
    }
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let special: Vec<AddedToken> = types
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::count::{ByteLevelCounter, WordCounts};

    fn tiny_with_pre(pre: Option<&str>) -> Result<Tokenizer, MetaError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        crate::tiny::write_tiny_llama(&path, 64).unwrap();
        let mut content = crate::read_gguf(&path).unwrap();
        match pre {
            Some(p) => content
                .metadata
                .insert("tokenizer.ggml.pre".into(), Value::String(p.into())),
            None => content.metadata.remove("tokenizer.ggml.pre"),
        };
        tokenizer_from_gguf(&content)
    }

    /// The pre-tokenizer follows `tokenizer.ggml.pre`: digits one by one for `smollm`, in
    /// runs for `gpt-2` (and no key), and pre-tokenizers this builder does not know are
    /// refused rather than guessed.
    #[test]
    fn the_pre_tokenizer_follows_the_gguf_metadata() {
        let pieces = |t: &Tokenizer| {
            let pre = t.get_pre_tokenizer().unwrap();
            let mut s = tokenizers::PreTokenizedString::from("year 2026");
            tokenizers::PreTokenizer::pre_tokenize(pre, &mut s).unwrap();
            s.get_splits(
                tokenizers::OffsetReferential::Original,
                tokenizers::OffsetType::Byte,
            )
            .len()
        };
        let smollm = tiny_with_pre(Some("smollm")).unwrap();
        assert_eq!(pieces(&smollm), 6, "year, the space, then 2 0 2 6");
        for pre in [None, Some("gpt-2"), Some("default")] {
            let gpt2 = tiny_with_pre(pre).unwrap();
            assert_eq!(pieces(&gpt2), 2, "{pre:?}: year, then \" 2026\"");
            // the fast count emulates smollm only, so it stands aside here
            assert!(ByteLevelCounter::new(&gpt2).is_none());
        }
        let counter = ByteLevelCounter::new(&smollm).unwrap();
        let mut words = WordCounts::default();
        assert_eq!(
            counter.count(&smollm, "year 2026", &mut words),
            Some(smollm.encode_fast("year 2026", false).unwrap().len() as u64)
        );
        for pre in ["tekken", "deepseek-llm"] {
            let err = tiny_with_pre(Some(pre)).unwrap_err().to_string();
            assert!(err.contains(pre) && err.contains("tokenizer.json"), "{err}");
        }
    }

    /// Llama 3 takes a pre-token that is in the vocabulary whole, before any merge; the
    /// others merge. Vocabulary: bytes, "ab", "abc"; the only merge is "a b".
    #[test]
    fn llama3_looks_words_up_before_merging() {
        let build = |pre: &str| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tiny.gguf");
            crate::tiny::write_tiny_llama(&path, 64).unwrap();
            let mut content = crate::read_gguf(&path).unwrap();
            let md = &mut content.metadata;
            let mut tokens = md["tokenizer.ggml.tokens"].to_vec().unwrap().clone();
            tokens.extend([Value::String("ab".into()), Value::String("abc".into())]);
            let mut types = md["tokenizer.ggml.token_type"].to_vec().unwrap().clone();
            types.extend([Value::I32(1), Value::I32(1)]);
            md.insert("tokenizer.ggml.tokens".into(), Value::Array(tokens));
            md.insert("tokenizer.ggml.token_type".into(), Value::Array(types));
            md.insert(
                "tokenizer.ggml.merges".into(),
                Value::Array(vec![Value::String("a b".into())]),
            );
            md.insert("tokenizer.ggml.pre".into(), Value::String(pre.into()));
            tokenizer_from_gguf(&content).unwrap()
        };
        let ids = |t: &Tokenizer| t.encode("abc", false).unwrap().get_ids().len();
        assert_eq!(ids(&build("llama-bpe")), 1, "abc is one vocabulary entry");
        assert_eq!(ids(&build("qwen2")), 2, "merged: ab, c");
        assert_eq!(ids(&build("smollm")), 2, "merged: ab, c");
    }

    fn split(t: &Tokenizer, text: &str) -> Vec<String> {
        let pre = t.get_pre_tokenizer().unwrap();
        let mut s = tokenizers::PreTokenizedString::from(text);
        tokenizers::PreTokenizer::pre_tokenize(pre, &mut s).unwrap();
        s.get_splits(
            tokenizers::OffsetReferential::Original,
            tokenizers::OffsetType::Byte,
        )
        .into_iter()
        .map(|(piece, _, _)| piece.to_string())
        .collect()
    }

    /// Llama 3 and Qwen2 split as their published patterns do: numbers in threes or one
    /// digit at a time, punctuation keeps one leading space, contractions of any case
    /// split off, newlines go apart from the spaces that follow them. Pieces are shown in
    /// byte-level symbols (Ġ is a space, Ċ a newline).
    #[test]
    fn llama3_and_qwen2_split_as_their_patterns() {
        let text = "I'M 12345 $x\n\n  ok";
        let llama3 = tiny_with_pre(Some("llama-bpe")).unwrap();
        assert_eq!(
            split(&llama3, text),
            ["I", "'M", "Ġ", "123", "45", "Ġ$", "x", "ĊĊ", "Ġ", "Ġok"]
        );
        let qwen2 = tiny_with_pre(Some("qwen2")).unwrap();
        assert_eq!(
            split(&qwen2, text),
            [
                "I", "'M", "Ġ", "1", "2", "3", "4", "5", "Ġ$", "x", "ĊĊ", "Ġ", "Ġok"
            ]
        );
        // Qwen2 normalises to NFC first: e + combining acute is one letter é
        let enc = qwen2.encode("e\u{301}", false).unwrap();
        assert_eq!(qwen2.decode(enc.get_ids(), false).unwrap(), "\u{e9}");
        // neither is the smollm pipeline the fast counter emulates
        assert!(ByteLevelCounter::new(&llama3).is_none());
        assert!(ByteLevelCounter::new(&qwen2).is_none());
    }
}
