//! Usage on every answer: completion tokens read as an answer passes ([`UsageScan`]), and
//! streams made to report them. A stream reports usage only when the client sets
//! `stream_options.include_usage`; without it the router would count no completion
//! tokens, so no tokens per second or cost per token, for most streams. So when a client
//! leaves `stream_options` out, the router asks the worker for usage
//! ([`ask_for_usage`]) and takes the usage frame out of the stream the client gets
//! ([`HideUsage`]): the client sees the stream it asked for, the router counts it.

use bytes::{Bytes, BytesMut};

/// What the router puts at the start of a body's object to ask for usage.
const ASK: &[u8] = br#""stream_options":{"include_usage":true},"#;

/// `body` (a JSON object with at least one member, as a parsed request is) with
/// `stream_options.include_usage` set; `None` when the body does not start as an object.
pub fn ask_for_usage(body: &[u8]) -> Option<Bytes> {
    let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[open] != b'{' {
        return None;
    }
    let mut out = BytesMut::with_capacity(body.len() + ASK.len());
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(ASK);
    out.extend_from_slice(&body[open + 1..]);
    Some(out.freeze())
}

/// Takes the usage frame (`"choices": []` with a `usage` object) out of a server-sent
/// event stream, passing every other frame on unchanged. Chunks that end on a frame
/// boundary and hold no usage frame (nearly all of them) pass without a copy; a frame
/// split across chunks is held until it is whole.
#[derive(Default)]
pub struct HideUsage {
    /// The start of a frame whose end has not arrived.
    pending: BytesMut,
    /// Set when a stream's frames could not be told apart within [`Self::MAX_FRAME`]:
    /// from then on everything passes unchanged.
    passthrough: bool,
}

impl HideUsage {
    /// The longest frame held back to look at; a longer run without a frame boundary is
    /// passed on as it is (and the usage frame, if any, with it).
    const MAX_FRAME: usize = 64 * 1024;

    /// What of `chunk` the client gets now (`None`: nothing yet).
    pub fn filter(&mut self, chunk: Bytes) -> Option<Bytes> {
        if self.passthrough {
            return Some(chunk);
        }
        if self.pending.is_empty() && ends_a_frame(&chunk) && !has_usage(&chunk) {
            return Some(chunk);
        }
        self.pending.extend_from_slice(&chunk);
        let Some(end) = last_frame_end(&self.pending) else {
            if self.pending.len() > Self::MAX_FRAME {
                self.passthrough = true;
                return Some(self.pending.split().freeze());
            }
            return None;
        };
        let whole = self.pending.split_to(end).freeze();
        if !has_usage(&whole) {
            return Some(whole);
        }
        let mut out = BytesMut::with_capacity(whole.len());
        let mut start = 0;
        for end in frame_ends(&whole) {
            let frame = &whole[start..end];
            if !is_usage_frame(frame) {
                out.extend_from_slice(frame);
            }
            start = end;
        }
        (!out.is_empty()).then(|| out.freeze())
    }

    /// Whatever is still held when the stream ends (an unfinished last frame).
    pub fn finish(&mut self) -> Option<Bytes> {
        (!self.pending.is_empty()).then(|| self.pending.split().freeze())
    }
}

/// Whether `buf` ends with a frame boundary (an empty line: `\n\n` or `\r\n\r\n`).
fn ends_a_frame(buf: &[u8]) -> bool {
    buf.ends_with(b"\n\n") || buf.ends_with(b"\r\n\r\n")
}

/// The offsets just past each frame boundary in `buf`, in order.
fn frame_ends(buf: &[u8]) -> impl Iterator<Item = usize> + '_ {
    memchr::memchr_iter(b'\n', buf)
        .filter(move |&i| ends_a_frame(&buf[..=i]))
        .map(|i| i + 1)
}

/// The offset just past the last frame boundary in `buf`.
fn last_frame_end(buf: &[u8]) -> Option<usize> {
    memchr::memrchr_iter(b'\n', buf)
        .find(|&i| ends_a_frame(&buf[..=i]))
        .map(|i| i + 1)
}

/// Whether `buf` may hold a usage frame: a `usage` key whose value is an object. (In
/// JSON text the bytes `"usage":{` can only be a key and its object: a quote inside a
/// string is escaped.)
fn has_usage(buf: &[u8]) -> bool {
    FINDERS.usage.find(buf).is_some() || FINDERS.usage_spaced.find(buf).is_some()
}

/// A usage frame: usage, and no choices (the frame OpenAI's streams end with when asked).
fn is_usage_frame(frame: &[u8]) -> bool {
    has_usage(frame)
        && (FINDERS.no_choices.find(frame).is_some()
            || FINDERS.no_choices_spaced.find(frame).is_some())
}

/// The searches every relayed answer goes through, built once (a `memmem::find` builds
/// its searcher on every call).
struct Finders {
    usage: memchr::memmem::Finder<'static>,
    usage_spaced: memchr::memmem::Finder<'static>,
    no_choices: memchr::memmem::Finder<'static>,
    no_choices_spaced: memchr::memmem::Finder<'static>,
    completion_tokens: memchr::memmem::Finder<'static>,
}

static FINDERS: std::sync::LazyLock<Finders> = std::sync::LazyLock::new(|| Finders {
    usage: memchr::memmem::Finder::new(br#""usage":{"#),
    usage_spaced: memchr::memmem::Finder::new(br#""usage": {"#),
    no_choices: memchr::memmem::Finder::new(br#""choices":[]"#),
    no_choices_spaced: memchr::memmem::Finder::new(br#""choices": []"#),
    completion_tokens: memchr::memmem::Finder::new(UsageScan::KEY),
});

/// Finds `"completion_tokens": N` in a relayed answer (the last one wins: a stream's usage
/// chunk comes last), across chunk boundaries, without buffering the answer.
#[derive(Default)]
pub struct UsageScan {
    /// The end of the previous chunk, for a key split across two chunks.
    tail: Vec<u8>,
    pub completion_tokens: Option<u64>,
}

impl UsageScan {
    const KEY: &'static [u8] = b"\"completion_tokens\":";
    const KEEP: usize = 48;

    pub fn feed(&mut self, chunk: &[u8]) {
        if !self.tail.is_empty() {
            let mut seam = std::mem::take(&mut self.tail);
            seam.extend_from_slice(&chunk[..chunk.len().min(Self::KEEP)]);
            if let Some(n) = Self::find(&seam) {
                self.completion_tokens = Some(n);
            }
            seam.truncate(seam.len() - chunk.len().min(Self::KEEP));
            self.tail = seam;
        }
        if let Some(n) = Self::find(chunk) {
            self.completion_tokens = Some(n);
        }
        // keep the last KEEP bytes of (tail + chunk): a key may span several small chunks
        if chunk.len() >= Self::KEEP {
            self.tail.clear();
        }
        self.tail
            .extend_from_slice(&chunk[chunk.len().saturating_sub(Self::KEEP)..]);
        let excess = self.tail.len().saturating_sub(Self::KEEP);
        self.tail.drain(..excess);
    }

    /// The last complete `"completion_tokens": N` in `buf`.
    fn find(buf: &[u8]) -> Option<u64> {
        let mut found = None;
        for at in FINDERS.completion_tokens.find_iter(buf) {
            let rest = &buf[at + Self::KEY.len()..];
            let rest = &rest[rest.iter().take_while(|b| b.is_ascii_whitespace()).count()..];
            let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
            // a number cut by the end of the buffer is read again from the seam
            if digits > 0 && digits < rest.len() {
                found = std::str::from_utf8(&rest[..digits])
                    .ok()
                    .and_then(|d| d.parse().ok());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::{HideUsage, UsageScan, ask_for_usage};

    #[test]
    fn completion_tokens_are_found_in_one_chunk_and_across_chunks() {
        let answer = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":345,"total_tokens":357}}"#;
        for split in 0..answer.len() {
            let mut u = UsageScan::default();
            u.feed(&answer[..split]);
            u.feed(&answer[split..]);
            assert_eq!(u.completion_tokens, Some(345), "split at {split}");
        }
        for size in 1..12 {
            let mut u = UsageScan::default();
            for c in answer.chunks(size) {
                u.feed(c);
            }
            assert_eq!(u.completion_tokens, Some(345), "{size}-byte chunks");
        }
        let mut u = UsageScan::default();
        u.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n");
        assert_eq!(u.completion_tokens, None, "no usage, no count");
        u.feed(b"data: {\"usage\":{\"completion_tokens\": 7}}\n\ndata: [DONE]\n\n");
        assert_eq!(u.completion_tokens, Some(7));
    }

    /// A stream as a worker sends it when asked for usage.
    const ASKED: &str = concat!(
        "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"usage: {\\\"x\\\":1}\"}}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n",
        "data: [DONE]\n\n",
    );

    /// What the client should get: the same stream without the usage frame.
    fn expected() -> String {
        ASKED
            .split_inclusive("\n\n")
            .filter(|f| !f.contains("\"choices\":[]"))
            .collect()
    }

    fn hide_all(chunks: impl IntoIterator<Item = Bytes>) -> (String, usize) {
        let mut h = HideUsage::default();
        let mut out = Vec::new();
        let mut writes = 0;
        for c in chunks {
            if let Some(b) = h.filter(c) {
                out.extend_from_slice(&b);
                writes += 1;
            }
        }
        if let Some(b) = h.finish() {
            out.extend_from_slice(&b);
            writes += 1;
        }
        (String::from_utf8(out).unwrap(), writes)
    }

    #[test]
    fn the_usage_frame_is_taken_out_however_the_stream_is_cut() {
        // frame by frame, as workers write
        let frames = ASKED
            .split_inclusive("\n\n")
            .map(|f| Bytes::from(f.to_string()));
        let (got, writes) = hide_all(frames);
        assert_eq!(got, expected());
        assert_eq!(writes, 4, "every other frame is written as it comes");
        // all at once, and every two-piece cut
        assert_eq!(
            hide_all([Bytes::from_static(ASKED.as_bytes())]).0,
            expected()
        );
        for cut in 0..ASKED.len() {
            let (a, b) = ASKED.as_bytes().split_at(cut);
            let got = hide_all([Bytes::copy_from_slice(a), Bytes::copy_from_slice(b)]).0;
            assert_eq!(got, expected(), "cut at {cut}");
        }
        // CRLF framing
        let crlf = ASKED.replace("\n\n", "\r\n\r\n");
        let got = hide_all([Bytes::from(crlf.clone())]).0;
        assert_eq!(got, expected().replace("\n\n", "\r\n\r\n"));
    }

    #[test]
    fn a_stream_without_frame_boundaries_passes_unchanged_in_bounded_memory() {
        let blob = Bytes::from(vec![b'x'; 100 * 1024]);
        let (got, _) = hide_all(blob.chunks(1000).map(Bytes::copy_from_slice));
        assert_eq!(got.len(), blob.len());
    }

    #[test]
    fn usage_is_asked_for_at_the_start_of_the_object() {
        let body = br#"  {"model":"m","stream":true,"messages":[]}"#;
        let asked = ask_for_usage(body).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&asked).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");
        assert_eq!(v["stream"], true);
        assert_eq!(ask_for_usage(b"[1]"), None);
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::UsageScan;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// However an answer is cut into chunks, its completion tokens are found.
        #[test]
        fn usage_is_found_across_any_chunking(
            n in 0u64..10_000_000,
            pad in "[a-z ,:{}\"]{0,200}",
            cuts in proptest::collection::vec(1usize..40, 1..20),
        ) {
            let answer = format!(r#"{{"id":"x","text":"{pad}","usage":{{"prompt_tokens":3,"completion_tokens":{n},"total_tokens":9}}}}"#);
            let bytes = answer.as_bytes();
            let mut u = UsageScan::default();
            let mut at = 0;
            for c in cuts.iter().cycle() {
                if at >= bytes.len() {
                    break;
                }
                let end = (at + c).min(bytes.len());
                u.feed(&bytes[at..end]);
                at = end;
            }
            prop_assert_eq!(u.completion_tokens, Some(n));
        }

        /// Arbitrary bytes never panic the scanner, and it never keeps more than its seam.
        #[test]
        fn arbitrary_bytes_are_scanned_in_bounded_memory(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..30),
        ) {
            let mut u = UsageScan::default();
            for c in &chunks {
                u.feed(c);
                prop_assert!(u.tail.len() <= UsageScan::KEEP);
            }
        }
    }
}
