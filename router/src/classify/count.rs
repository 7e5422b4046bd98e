//! Token counting: a bound from byte length, the model's real tokenizer only where a rule
//! threshold falls inside the bound, off the event loop under a time budget.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use model_meta::count::WordCounts;
use routing_rules::{CompiledRules, Model, TokenizerRef};

use super::Parsed;

/// A model's tokenizer and what bounds it allows.
pub struct Counter {
    tokenizer: model_meta::Tokenizer,
    /// Longest token, in bytes: `ceil(bytes / this)` is a lower bound on the count.
    max_token_bytes: u64,
    /// The allocation-free exact count, for tokenizers with the `smollm` pre-tokenizer
    /// (digits one by one, then GPT-2's split). With that pre-tokenizer every run of
    /// letters and every digit is also at least one token: a much tighter lower bound than
    /// the byte length gives.
    fast: Option<model_meta::count::ByteLevelCounter>,
    /// Counts of long texts seen recently, by hash: a conversation resends its history
    /// (and its system prompt) every turn, so only the new message is counted again.
    cache: std::sync::Mutex<lru::LruCache<(usize, u64), u64>>,
    /// Keys the cache with a per-process random seed: texts cannot be crafted to collide.
    hasher: std::collections::hash_map::RandomState,
}

/// Texts shorter than this are counted, not cached.
const CACHE_MIN_BYTES: usize = 1024;
/// Cached counts per model.
const CACHE_ENTRIES: usize = 4096;

impl Counter {
    pub fn load(source: &TokenizerRef) -> Result<Self, String> {
        let src = match source {
            TokenizerRef::Gguf(p) => model_meta::TokenizerSource::Gguf(p.clone()),
            TokenizerRef::Json(p) => model_meta::TokenizerSource::Json(p.clone()),
        };
        let tokenizer = model_meta::load_tokenizer(&src).map_err(|e| e.to_string())?;
        // Byte-level vocabularies write one byte per char; others are at most 4 bytes per char.
        let max_token_bytes = tokenizer
            .get_vocab(true)
            .keys()
            .map(|t| t.chars().count() as u64 * 4)
            .max()
            .unwrap_or(64)
            .max(1);
        // the smollm pipeline (from GGUF, or a tokenizer.json that says the same)
        let fast = model_meta::count::ByteLevelCounter::new(&tokenizer);
        Ok(Self {
            tokenizer,
            max_token_bytes,
            fast,
            cache: std::sync::Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::MIN.saturating_add(CACHE_ENTRIES - 1),
            )),
            hasher: std::collections::hash_map::RandomState::new(),
        })
    }

    pub fn count(&self, texts: &[String]) -> u64 {
        let mut words = WordCounts::default();
        texts.iter().map(|t| self.count_piece(t, &mut words)).sum()
    }

    /// `words` caches pre-token counts across the pieces one thread counts.
    fn count_piece<'t>(&self, t: &'t str, words: &mut WordCounts<'t>) -> u64 {
        if let Some(n) = self
            .fast
            .as_ref()
            .and_then(|f| f.count(&self.tokenizer, t, words))
        {
            return n;
        }
        self.tokenizer
            .encode_fast(t, false)
            .map(|e| e.len() as u64)
            .unwrap_or(t.len() as u64)
    }

    /// The exact count, or `None` once `deadline` passes. Long texts are cut into pieces
    /// of about [`PIECE_BYTES`] at word boundaries (just before a space that starts a
    /// word, where the pre-tokenizer splits anyway, so the pieces' counts add up to the
    /// whole's) and counted on up to `threads` threads, each checking the deadline between
    /// pieces: a count that cannot finish in time stops instead of burning a core.
    pub fn count_within(
        &self,
        texts: &[String],
        deadline: std::time::Instant,
        threads: usize,
    ) -> Option<u64> {
        use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
        // each long text hashed once, for the lookup and for storing its count
        let keys: Vec<Option<(usize, u64)>> = texts
            .iter()
            .map(|t| {
                (t.len() >= CACHE_MIN_BYTES)
                    .then(|| (t.len(), std::hash::BuildHasher::hash_one(&self.hasher, t)))
            })
            .collect();
        // Long texts counted before come from the cache; the rest is cut into pieces.
        let mut cached = 0;
        let mut pieces: Vec<(usize, &str)> = Vec::new();
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            for (i, t) in texts.iter().enumerate() {
                match keys[i].and_then(|k| cache.get(&k).copied()) {
                    Some(n) => cached += n,
                    None => pieces.extend(word_pieces(t).map(|p| (i, p))),
                }
            }
        }
        let per_text: Vec<AtomicU64> = texts.iter().map(|_| AtomicU64::new(0)).collect();
        let next = AtomicUsize::new(0);
        let late = AtomicBool::new(false);
        let work = || {
            let mut words = WordCounts::default();
            loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= pieces.len() || late.load(Relaxed) {
                    return;
                }
                if std::time::Instant::now() > deadline {
                    late.store(true, Relaxed);
                    return;
                }
                let (text, piece) = pieces[i];
                per_text[text].fetch_add(self.count_piece(piece, &mut words), Relaxed);
            }
        };
        let threads = threads.clamp(1, pieces.len().max(1));
        std::thread::scope(|s| {
            for _ in 1..threads {
                s.spawn(work);
            }
            work();
        });
        if late.into_inner() {
            return None;
        }
        let counted: Vec<u64> = per_text.into_iter().map(AtomicU64::into_inner).collect();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let mut fresh = std::collections::HashSet::new();
        for &(i, _) in &pieces {
            if fresh.insert(i)
                && let Some(k) = keys[i]
            {
                cache.put(k, counted[i]);
            }
        }
        Some(cached + counted.iter().sum::<u64>())
    }
}

/// Pieces of [`Counter::count_within`]'s parallel count.
pub const PIECE_BYTES: usize = 32 * 1024;

/// `text` cut into pieces of about [`PIECE_BYTES`], each cut just before a space that
/// follows a non-space and precedes a non-space (`"word| next"`), so no pre-token spans a
/// cut; where no such place comes within 2 × [`PIECE_BYTES`], at a character boundary.
fn word_pieces(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let b = rest.as_bytes();
        let mut cut = rest.len();
        if b.len() > PIECE_BYTES {
            let mut i = PIECE_BYTES;
            while i + 1 < b.len() {
                if b[i] == b' '
                    && !b[i - 1].is_ascii_whitespace()
                    && !b[i + 1].is_ascii_whitespace()
                {
                    cut = i;
                    break;
                }
                // No word boundary for a while (CJK prose, base64, minified JSON): cut at
                // a character boundary, so the deadline is still checked; the count may be
                // off by a token at such a cut.
                if i >= 2 * PIECE_BYTES && rest.is_char_boundary(i) {
                    cut = i;
                    break;
                }
                i += 1;
            }
        }
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        Some(piece)
    })
}

/// Tokenizers for the models in the live rules, keyed by model name.
pub type Counters = HashMap<String, Arc<Counter>>;

/// Loads the tokenizer of every model the rules name. Errors are returned per model.
pub fn load_counters(rules: &CompiledRules, previous: &Counters) -> (Counters, Vec<String>) {
    let mut out = HashMap::new();
    let mut errors = Vec::new();
    for (name, m) in rules.models() {
        match Counter::load(&m.tokenizer) {
            Ok(c) => {
                out.insert(name.clone(), Arc::new(c));
            }
            Err(e) => {
                errors.push(format!("model `{name}`: {e}"));
                if let Some(old) = previous.get(name) {
                    out.insert(name.clone(), Arc::clone(old));
                }
            }
        }
    }
    (out, errors)
}

/// Threads one long count may use: the cores (a long prompt's count is split over them).
fn counting_threads() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, usize::from))
}

/// Counting threads allowed at once, over all counts: one per core.
fn counting_permits() -> Arc<tokio::sync::Semaphore> {
    static PERMITS: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    Arc::clone(PERMITS.get_or_init(|| Arc::new(tokio::sync::Semaphore::new(counting_threads()))))
}

/// Fills in token counts: a bound from byte length, exact counting only where a rule
/// threshold falls inside the bound. Returns whether the count is exact.
pub async fn count_tokens(
    parsed: &mut Parsed,
    model: Option<&Model>,
    counter: Option<Arc<Counter>>,
    rules: &CompiledRules,
    budget: Duration,
) -> bool {
    let (image_tokens, audio_tokens, default_max) = model
        .map(|m| {
            (
                u64::from(m.image_tokens),
                u64::from(m.audio_tokens),
                u64::from(m.default_max_tokens),
            )
        })
        .unwrap_or((765, 750, 256));
    // Counts come from the client: every sum saturates (a `u64::MAX` max_tokens must not wrap
    // to a small context).
    let fixed = parsed
        .fixed_tokens
        .saturating_add(parsed.images.saturating_mul(image_tokens))
        .saturating_add(parsed.audios.saturating_mul(audio_tokens));
    let max_tokens = parsed.requested_max_tokens.unwrap_or(default_max);
    let f = &mut parsed.features;
    f.max_tokens = max_tokens;
    let bytes: u64 = parsed.texts.iter().map(|t| t.len() as u64).sum();
    let Some(counter) = counter else {
        // No tokenizer for this model: ~4 bytes per token, the usual estimate.
        f.prompt_tokens = fixed.saturating_add(bytes.div_ceil(4));
        parsed.prompt_tokens_lower = fixed;
        return false;
    };
    // Byte-level BPE: at most one token per byte; at least one per longest-token bytes.
    let hi = fixed
        .saturating_add(bytes)
        .saturating_add(parsed.texts.len() as u64);
    let lo = fixed.saturating_add(if counter.fast.is_some() {
        parsed
            .texts
            .iter()
            .map(|t| min_pretokens(t.as_bytes()))
            .sum()
    } else {
        bytes.div_ceil(counter.max_token_bytes)
    });
    let needs_exact = CompiledRules::needs_exact(rules.prompt_cuts(), lo, hi)
        || CompiledRules::needs_exact(
            rules.context_cuts(),
            lo.saturating_add(max_tokens),
            hi.saturating_add(max_tokens),
        );
    if !needs_exact {
        f.prompt_tokens = lo;
        parsed.prompt_tokens_lower = lo;
        return false;
    }
    let texts = std::mem::take(&mut parsed.texts);
    // At most one counting thread per core runs at once over all counts (a count takes a
    // permit per thread it uses and holds them to its end). So a flood of long prompts
    // costs bounded CPU and threads: without the bound every one started its own count and
    // thread (each thread with its own malloc arena: hundreds of MB of RSS after a burst
    // of 400 KB prompts); with it, the ones that find no permit within the budget take the
    // bound, and a count past its deadline stops between pieces.
    let deadline = std::time::Instant::now() + budget;
    let counted = tokio::time::timeout(budget, async move {
        // one permit to start; a thread more for each further permit free now
        let permits = counting_permits();
        let mut held = vec![Arc::clone(&permits).acquire_owned().await.ok()?];
        while held.len() < counting_threads() {
            match Arc::clone(&permits).try_acquire_owned() {
                Ok(p) => held.push(p),
                Err(_) => break,
            }
        }
        tokio::task::spawn_blocking(move || {
            let n = counter.count_within(&texts, deadline, held.len());
            drop(held);
            n
        })
        .await
        .ok()
        .flatten()
    });
    match counted.await {
        Ok(Some(n)) => {
            parsed.features.prompt_tokens = fixed.saturating_add(n);
            parsed.prompt_tokens_lower = parsed.features.prompt_tokens;
            true
        }
        // Over budget (pathological input) or failed: take the upper bound, which routes
        // to the pool that can hold the most.
        _ => {
            parsed.features.prompt_tokens = hi;
            parsed.prompt_tokens_lower = lo;
            false
        }
    }
}

/// A lower bound on the tokens of `text` under a GPT-2 style pre-tokenizer with individual
/// digits: each ASCII digit is a pre-token, and each maximal run of letters that holds an
/// ASCII letter lies in pre-tokens of its own. Non-ASCII bytes join runs (they may be
/// letters) but never start a count, so the bound holds for any text.
///
/// Every request's texts pass through this (it is the prompt's token estimate when no rule
/// needs an exact count), so it is written to be cheap: ASCII text (the usual case) is
/// counted over pairs of neighbouring bytes, which the compiler vectorizes, and other text
/// by a loop without branches on the bytes. Both agree with [`tests::min_pretokens_ref`].
pub fn min_pretokens(text: &[u8]) -> u64 {
    if text.is_ascii() {
        // an ASCII letter starts a run when the byte before it is not a letter
        let starts_run = |prev: u8, b: u8| b.is_ascii_alphabetic() & !prev.is_ascii_alphabetic();
        let first = text.first().map_or(0, |&b| {
            u64::from(b.is_ascii_alphabetic() | b.is_ascii_digit())
        });
        let mut n = first;
        // in blocks, so the per-block sum fits a u32 and the loop stays vectorizable
        for (prev, next) in text
            .chunks(4096)
            .zip(text[1.min(text.len())..].chunks(4096))
        {
            let block: u32 = prev
                .iter()
                .zip(next)
                .map(|(&p, &b)| u32::from(starts_run(p, b)) + u32::from(b.is_ascii_digit()))
                .sum();
            n += u64::from(block);
        }
        return n;
    }
    // Non-ASCII bytes are transparent: a letter starts a count when the last ASCII byte
    // before it (if any) is not a letter.
    let mut n = 0u64;
    let mut prev_letter = false;
    for &b in text {
        let letter = b.is_ascii_alphabetic();
        n += u64::from(letter & !prev_letter) + u64::from(b.is_ascii_digit());
        prev_letter = if b >= 0x80 { prev_letter } else { letter };
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bound as first written: a run of letters and non-ASCII bytes is counted once if
    /// it holds an ASCII letter; each ASCII digit counts.
    pub fn min_pretokens_ref(text: &[u8]) -> u64 {
        let mut n = 0u64;
        let mut in_run = false;
        let mut counted = false;
        for &b in text {
            if b.is_ascii_alphabetic() || b >= 0x80 {
                if !in_run {
                    in_run = true;
                    counted = false;
                }
                if b.is_ascii_alphabetic() && !counted {
                    n += 1;
                    counted = true;
                }
            } else {
                in_run = false;
                if b.is_ascii_digit() {
                    n += 1;
                }
            }
        }
        n
    }

    proptest::proptest! {
        #[test]
        fn the_fast_bound_is_the_reference_bound(
            text in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::sample::select(b"aZ09 ,.\n-_'".to_vec()),
                    proptest::num::u8::ANY,
                ],
                0..9000,
            )
        ) {
            proptest::prop_assert_eq!(min_pretokens(&text), min_pretokens_ref(&text));
        }
    }

    #[test]
    fn the_fast_bound_agrees_on_edges() {
        for t in [
            &b""[..],
            b"a",
            b"1",
            b" ",
            b"ab1cd",
            b"1a",
            b"a\xc3\xa9b",
            b"\xc3\xa9a",
            b"a \xc3\xa9 b",
            b"x1y2z3",
            b"The fox, 42 times",
        ] {
            assert_eq!(
                min_pretokens(t),
                min_pretokens_ref(t),
                "{:?}",
                String::from_utf8_lossy(t)
            );
        }
        let long = "word 12 ".repeat(3000);
        assert_eq!(
            min_pretokens(long.as_bytes()),
            min_pretokens_ref(long.as_bytes())
        );
        assert_eq!(min_pretokens(long.as_bytes()), 3000 * 3);
    }

    #[test]
    fn word_bound_never_exceeds_the_real_count() {
        let dir = std::env::temp_dir().join(format!("classify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tiny.gguf");
        model_meta::tiny::write_tiny_llama(&path, 512).unwrap();
        let c = Counter::load(&TokenizerRef::Gguf(path)).unwrap();
        for t in [
            "Hello, world! 12345 héllo   wörld",
            "a",
            "",
            "x1y2z3",
            "don't stop-me_now",
            "—.— aéb ééé",
        ] {
            let exact = c.count(&[t.to_string()]);
            assert!(
                min_pretokens(t.as_bytes()) <= exact,
                "{t}: {} > {exact}",
                min_pretokens(t.as_bytes())
            );
        }
        assert_eq!(min_pretokens(b"The fox, 42 times"), 3 + 2);
        // and with a real merge table, when SmolLM2 is present
        if let Some(real) = model_meta::workspace_smollm2() {
            let c = Counter::load(&TokenizerRef::Gguf(real)).unwrap();
            let text = "Hello, world! The capital of France is Paris; it's 2026. naïve café — déjà vu, x1y2 ".repeat(50);
            let exact = c.count(std::slice::from_ref(&text));
            let lo = min_pretokens(text.as_bytes());
            assert!(
                lo <= exact && exact <= text.len() as u64,
                "{lo} <= {exact} <= {}",
                text.len()
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Counting a long prompt in pieces on several threads gives the same count as one
    /// pass over the whole text (SmolLM2's real tokenizer: spaces, punctuation, digits,
    /// accents, newlines, double spaces), a text counted before is not counted again, and
    /// a count past its deadline gives up.
    #[test]
    fn counting_in_pieces_is_exact_and_stops_at_the_deadline() {
        let Some(real) = model_meta::workspace_smollm2() else {
            eprintln!("SKIPPED: SmolLM2 GGUF not found (run scripts/fetch-model.sh)");
            return;
        };
        let c = Counter::load(&TokenizerRef::Gguf(real)).unwrap();
        let text = "Hello,  world!\nThe capital of France is Paris; it's 2026. naïve café — déjà vu, x1y2 \t end. "
            .repeat(2000);
        assert!(word_pieces(&text).count() > 4, "several pieces");
        assert_eq!(word_pieces(&text).collect::<String>(), text);
        let whole = c.count(std::slice::from_ref(&text));
        let far = std::time::Instant::now() + Duration::from_secs(60);
        let texts = vec![text.clone(), "short one".to_string()];
        assert_eq!(
            c.count_within(&texts, far, 3),
            Some(whole + c.count(&["short one".to_string()]))
        );
        // counted once, a long text comes from the cache: even past the deadline
        let past = std::time::Instant::now();
        assert_eq!(
            c.count_within(std::slice::from_ref(&text), past, 2),
            Some(whole)
        );
        let other = format!("{text} and one more sentence.");
        assert_eq!(c.count_within(std::slice::from_ref(&other), past, 2), None);
    }
}
