//! Exact token counts for the tokenizers [`crate::tokenizer_from_gguf`] builds (GPT-2 style:
//! every digit on its own, the GPT-2 split pattern, byte-level BPE), without the
//! allocations of a full `encode`.
//!
//! `Tokenizer::encode_fast` builds a normalized string with alignments for every pre-token
//! and a `Token` with its own `String` for every token; counting a 400 KB prompt spends most
//! of its time in malloc. Here pre-tokens are slices of the input found by one regex scan,
//! and each distinct pre-token goes through the tokenizer's own BPE model once per call
//! (a prompt repeats its words), so the count is the one `encode` gives.

use std::collections::HashMap;

use regex_automata::{Anchored, Input, meta};
use tokenizers::{Model, Tokenizer};

/// The GPT-2 split pattern without its `\s+(?!\S)` look-ahead (`regex-automata` has none):
/// [`ByteLevelCounter::segment`] gives back a whitespace run's last character where the
/// look-ahead would have, so the pre-tokens are the same.
const SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";

/// Working memory a counting thread reuses across the texts it counts: pre-token counts
/// keyed by the input's own slices, and the split pattern's search cache.
#[derive(Default)]
pub struct WordCounts<'t> {
    words: HashMap<&'t str, u32, ahash::RandomState>,
    search: Option<meta::Cache>,
}

/// Counts tokens as the GGUF-built tokenizer would; see the module docs.
pub struct ByteLevelCounter {
    split: meta::Regex,
    /// GPT-2's byte-to-character table of the byte-level pre-tokenizer.
    byte_char: [char; 256],
    /// Added (special) tokens: a text holding one is left to the full tokenizer.
    added: Vec<String>,
    /// The distinct first bytes of `added`.
    first_bytes: Vec<u8>,
}

impl ByteLevelCounter {
    /// For tokenizers whose pipeline is the one counted here: no normalizer, the `smollm`
    /// pre-tokenizer ([`crate::smollm_pre_tokenizer`]), a BPE model. `None` for any other
    /// (the caller counts with `encode`).
    pub fn new(tokenizer: &Tokenizer) -> Option<Self> {
        let same_pre = match (
            tokenizer.get_pre_tokenizer(),
            serde_json::to_value(crate::smollm_pre_tokenizer()),
        ) {
            (Some(pre), Ok(want)) => serde_json::to_value(pre).is_ok_and(|v| v == want),
            _ => false,
        };
        let bpe = matches!(tokenizer.get_model(), tokenizers::ModelWrapper::BPE(_));
        if !same_pre || !bpe || tokenizer.get_normalizer().is_some() {
            return None;
        }
        let mut added: Vec<String> = tokenizer
            .get_added_tokens_decoder()
            .values()
            .map(|t| t.content.clone())
            .filter(|t| !t.is_empty())
            .collect();
        added.sort();
        added.dedup();
        let mut first_bytes: Vec<u8> = added.iter().filter_map(|t| t.bytes().next()).collect();
        first_bytes.sort_unstable();
        first_bytes.dedup();
        Some(Self {
            split: meta::Regex::new(SPLIT).ok()?,
            byte_char: gpt2_byte_chars(),
            added,
            first_bytes,
        })
    }

    /// Tokens in `text`, or `None` when the text holds an added token (the caller counts
    /// it with the full tokenizer) or the model fails on a pre-token.
    pub fn count<'t>(
        &self,
        tokenizer: &Tokenizer,
        text: &'t str,
        words: &mut WordCounts<'t>,
    ) -> Option<u64> {
        if self.holds_added_token(text) {
            return None;
        }
        let model = tokenizer.get_model();
        let mut total = 0u64;
        // Digits(individual): every numeric character is a pre-token of its own, and the
        // split pattern runs on the text between them.
        let mut start = 0;
        if text.bytes().any(|b| b.is_ascii_digit() || b >= 0x80) {
            for (i, c) in text.char_indices() {
                if c.is_numeric() {
                    total += self.segment(model, &text[start..i], words)?;
                    let end = i + c.len_utf8();
                    total += self.word(model, &text[i..end], words)?;
                    start = end;
                }
            }
        }
        total += self.segment(model, &text[start..], words)?;
        Some(total)
    }

    /// Whether an added token occurs in `text`: one scan for the bytes added tokens start
    /// with (`<` for most models), then a comparison where one is found.
    fn holds_added_token(&self, text: &str) -> bool {
        let b = text.as_bytes();
        let found = |i: usize| self.added.iter().any(|t| b[i..].starts_with(t.as_bytes()));
        match self.first_bytes[..] {
            [] => false,
            [x] => memchr::memchr_iter(x, b).any(found),
            [x, y] => memchr::memchr2_iter(x, y, b).any(found),
            [x, y, z] => memchr::memchr3_iter(x, y, z, b).any(found),
            _ => (0..b.len()).any(|i| self.first_bytes.contains(&b[i]) && found(i)),
        }
    }

    /// Tokens of a digit-free stretch: the split pattern's pre-tokens, one after another.
    fn segment<'t>(
        &self,
        model: &impl Model,
        seg: &'t str,
        words: &mut WordCounts<'t>,
    ) -> Option<u64> {
        let mut total = 0u64;
        let mut pos = 0;
        while pos < seg.len() {
            // pre-tokens cover the text: the next one starts where this one ends
            let mut end = match ascii_pretoken(seg.as_bytes(), pos) {
                Some(end) => end,
                None => {
                    let input = Input::new(seg).range(pos..).anchored(Anchored::Yes);
                    let cache = words
                        .search
                        .get_or_insert_with(|| self.split.create_cache());
                    self.split.search_with(cache, &input)?.end()
                }
            };
            // `\s+(?!\S)`: a run of two or more whitespace characters followed by more text
            // leaves its last character to the next pre-token (" word", or a lone "\n").
            let s = &seg[pos..end];
            if end < seg.len()
                && s.chars().all(char::is_whitespace)
                && let Some((last, _)) = s.char_indices().last().filter(|(i, _)| *i > 0)
            {
                end = pos + last;
            }
            total += self.word(model, &seg[pos..end], words)?;
            pos = end;
        }
        Some(total)
    }

    /// Tokens of one pre-token: the BPE model on its byte-level characters.
    fn word<'t>(&self, model: &impl Model, w: &'t str, words: &mut WordCounts<'t>) -> Option<u64> {
        if let Some(&n) = words.words.get(w) {
            return Some(u64::from(n));
        }
        let mapped: String = w.bytes().map(|b| self.byte_char[usize::from(b)]).collect();
        let n = u32::try_from(model.tokenize(&mapped).ok()?.len()).ok()?;
        words.words.insert(w, n);
        Some(u64::from(n))
    }
}

/// The end of the split pattern's pre-token at `pos` when ASCII alone decides it (the
/// pattern's alternatives in their order, on ASCII's letters, whitespace and the rest), or
/// `None` where a non-ASCII character could change it (the regex takes those). Digits never
/// occur here: they were split off before.
fn ascii_pretoken(b: &[u8], pos: usize) -> Option<usize> {
    #[derive(PartialEq)]
    enum Class {
        Letter,
        Space,
        Other,
    }
    let class = |i: usize| -> Option<Option<Class>> {
        let Some(&c) = b.get(i) else {
            return Some(None); // end of text
        };
        if !c.is_ascii() {
            return None; // undecided
        }
        Some(Some(if c.is_ascii_alphabetic() {
            Class::Letter
        } else if matches!(c, b' ' | b'\t' | b'\n' | b'\x0B' | b'\x0C' | b'\r') {
            Class::Space
        } else {
            Class::Other
        }))
    };
    let run = |mut i: usize, of: Class| -> Option<usize> {
        loop {
            match class(i)? {
                Some(c) if c == of => i += 1,
                _ => return Some(i),
            }
        }
    };
    let c = b[pos];
    if c == b'\'' {
        let rest = &b[pos + 1..];
        for contraction in [&b"s"[..], b"t", b"re", b"ve", b"m", b"ll", b"d"] {
            if rest.starts_with(contraction) {
                return Some(pos + 1 + contraction.len());
            }
        }
    }
    let start = if c == b' ' { pos + 1 } else { pos };
    match class(start)? {
        Some(Class::Letter) => run(start, Class::Letter),
        Some(Class::Other) => run(start, Class::Other),
        // a space before whitespace or the end, or whitespace: `\s+`
        _ if c == b' ' || class(pos)? == Some(Class::Space) => run(pos, Class::Space),
        _ => None,
    }
}

/// GPT-2's reversible byte-to-character table: printable Latin-1 bytes are themselves, the
/// rest map to U+0100 onwards in byte order.
fn gpt2_byte_chars() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        table[usize::from(b)] = if printable(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or(char::REPLACEMENT_CHARACTER);
            next += 1;
            c
        };
    }
    table
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rand::{RngExt, SeedableRng};

    fn tokenizers() -> Vec<Tokenizer> {
        let dir = tempfile::tempdir().unwrap();
        let tiny = dir.path().join("tiny.gguf");
        crate::tiny::write_tiny_llama(&tiny, 64).unwrap();
        let mut out = vec![crate::load_tokenizer(&crate::TokenizerSource::Gguf(tiny)).unwrap()];
        if let Some(smol) = crate::workspace_smollm2() {
            out.push(crate::load_tokenizer(&crate::TokenizerSource::Gguf(smol)).unwrap());
        } else {
            eprintln!("SmolLM2 GGUF absent: checking the tiny tokenizer only");
        }
        out
    }

    fn assert_same(tok: &Tokenizer, counter: &ByteLevelCounter, text: &str) {
        let want = tok.encode_fast(text, false).unwrap().len() as u64;
        let mut words = WordCounts::default();
        let got = counter.count(tok, text, &mut words);
        assert_eq!(got, Some(want), "text {text:?}");
    }

    /// The fast count equals `encode` on texts made to hit every branch of the pipeline:
    /// whitespace runs of every kind before letters, digits and punctuation, contractions,
    /// Unicode digits, letters and spaces, emoji, and real prose.
    #[test]
    fn counts_equal_the_full_tokenizer() {
        let pool: Vec<&str> = vec![
            " ",
            "  ",
            "   ",
            "\n",
            "\n\n",
            "\t",
            "\r\n",
            " \n",
            "\u{a0}",
            "\u{3000}",
            "\u{2028}",
            "a",
            "word",
            "The",
            "naïve",
            "Ünïcödé",
            "日本語",
            "Привет",
            "مرحبا",
            "é",
            "e\u{301}",
            "1",
            "42",
            "2026",
            "٣",
            "Ⅻ",
            "½",
            "'s",
            "'t",
            "'re",
            "'ve",
            "'m",
            "'ll",
            "'d",
            "'x",
            "'",
            "\"",
            ".",
            ",",
            "!?",
            "...",
            "--",
            "()",
            "{}",
            "<",
            ">",
            "|",
            "$",
            "€",
            "🙂",
            "👍🏽",
            "👨‍👩‍👧",
            "\u{200d}",
            "_",
            "/",
            "\\",
            "#",
            "@",
            "%",
        ];
        let prose = include_str!("../../README.md");
        for tok in tokenizers() {
            let counter = ByteLevelCounter::new(&tok).unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            for _ in 0..3000 {
                let n = rng.random_range(1..40);
                let text: String = (0..n)
                    .map(|_| pool[rng.random_range(0..pool.len())])
                    .collect();
                assert_same(&tok, &counter, &text);
            }
            assert_same(&tok, &counter, prose);
            assert_same(&tok, &counter, "");
            assert_same(&tok, &counter, "   trailing   ");
        }
    }

    #[test]
    fn a_text_with_an_added_token_is_left_to_the_tokenizer() {
        for tok in tokenizers() {
            let counter = ByteLevelCounter::new(&tok).unwrap();
            let Some(special) = counter.added.first().cloned() else {
                continue;
            };
            let text = format!("hello {special} world");
            let mut words = WordCounts::default();
            assert_eq!(counter.count(&tok, &text, &mut words), None);
        }
    }
}
