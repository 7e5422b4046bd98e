//! Incremental detokenization, and the search for stop sequences in the text it gives.

use model_meta::Tokenizer;

/// Incremental detokenisation: `text` is the decoded text of `tokens[..read_offset]`. Each
/// new token decodes only the window from `prefix_offset` (a few tokens of context, so
/// word-initial spaces come out right) with and without the new tokens, and keeps the
/// difference — constant work per token instead of re-decoding everything generated. An
/// incomplete UTF-8 sequence (decoded as U+FFFD) waits for the token that completes it.
#[derive(Debug, Default)]
pub struct TextDecoder {
    text: String,
    prefix_offset: usize,
    read_offset: usize,
}

impl TextDecoder {
    /// `tokens` are all tokens so far; the last one is new.
    pub fn push(&mut self, tok: &Tokenizer, tokens: &[u32]) -> tokenizers::Result<()> {
        let prefix = tok.decode(&tokens[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode(&tokens[self.prefix_offset..], true)?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            self.text.push_str(&full[prefix.len()..]);
            self.prefix_offset = self.read_offset;
            self.read_offset = tokens.len();
        }
        Ok(())
    }

    /// Takes in whatever is still pending (an incomplete UTF-8 sequence stays U+FFFD).
    pub fn finish(&mut self, tok: &Tokenizer, tokens: &[u32]) -> tokenizers::Result<()> {
        if self.read_offset < tokens.len() {
            let prefix = tok.decode(&tokens[self.prefix_offset..self.read_offset], true)?;
            let full = tok.decode(&tokens[self.prefix_offset..], true)?;
            let mut at = prefix.len().min(full.len());
            while !full.is_char_boundary(at) {
                at -= 1;
            }
            self.text.push_str(&full[at..]);
            self.prefix_offset = tokens.len();
            self.read_offset = tokens.len();
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Bytes at the end of `text` that could be the start of one of `stops`.
pub(super) fn partial_stop_len(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .filter_map(|s| {
            (1..s.len())
                .rev()
                .filter(|&k| s.is_char_boundary(k))
                .find(|&k| text.ends_with(&s[..k]))
        })
        .max()
        .unwrap_or(0)
}
