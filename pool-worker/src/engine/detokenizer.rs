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
fn partial_stop_len(text: &str, stops: &[String]) -> usize {
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

/// Stop sequences: how much of `text` may be sent, and whether a stop ends it. The text is
/// cut at the first stop. Only the text a new stop could end in is searched: what was not
/// sent yet (from byte `sent_len`), plus the longest stop's length before it. Text that may
/// be the start of a stop is held back until the next tokens show whether it is one: a
/// client never sees part of a stop sequence.
pub(super) fn visible_text(text: &str, sent_len: usize, stops: &[String]) -> (usize, bool) {
    let longest = stops.iter().map(String::len).max().unwrap_or(0);
    let mut from = sent_len.saturating_sub(longest);
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    let stop_at = stops
        .iter()
        .filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i))
        .min();
    match stop_at {
        Some(at) => (at, true),
        None => (text.len() - partial_stop_len(text, stops), false),
    }
}

#[cfg(test)]
mod tests {
    use super::visible_text;

    /// Text that may begin a stop is held back; a whole stop cuts the text and ends it.
    #[test]
    fn stops_cut_the_text_and_their_beginnings_are_held_back() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        assert_eq!(visible_text("hello EN", 0, &stops), (6, false));
        assert_eq!(visible_text("hello END more", 6, &stops), (6, true));
        assert_eq!(visible_text("a\n", 0, &stops), (1, false));
        assert_eq!(visible_text("plain", 3, &[]), (5, false));
    }
}
