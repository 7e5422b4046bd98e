//! The prefix cache: what prompts shared with earlier requests left in the KV cache — a
//! system prompt, a conversation's earlier turns — kept after those requests end and
//! restored instead of prefilled again.
//!
//! Token sequences are cut into blocks of [`BLOCK`] tokens. Block `i` is named by a hash
//! chained over blocks `0..=i` (xxh3 of its tokens, seeded with its parent's name), so a
//! name stands for the whole prefix up to the block's end: two prompts share a cached block
//! exactly when they agree on every token before its end. A lookup walks the prompt's chain
//! for as long as its blocks are held. Each entry keeps its tokens and its parent's name,
//! compared on lookup, so a hash collision can never hand one prefix another's keys.
//!
//! Memory is bounded by a budget in bytes; the least recently used block is evicted first.
//! A lookup or store stamps a chain's blocks deepest first, so a prefix's later blocks
//! always look older than its earlier ones and go first: eviction shortens cached prefixes
//! from their ends rather than cutting a chain in the middle (which would leave its
//! descendants unreachable, taking memory until they aged out).
//!
//! The payload is what a block holds: its keys and values for the real engine, nothing
//! for the simulated one (which only needs to know what would have been a hit).

use std::collections::HashMap;

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Tokens per block: the unit of reuse. A prompt reuses whole blocks, so up to this many
/// tokens of a shared prefix are prefilled again.
pub const BLOCK: usize = 32;

/// The chain's root: the "parent" of every prompt's first block.
const ROOT: u64 = 0x5377_6974_6368_7964; // "Switchyd"

struct Entry<P> {
    parent: u64,
    tokens: Box<[u32]>,
    payload: P,
    bytes: usize,
    used: u64,
}

/// Blocks of earlier prompts' keys and values, by prefix, within a memory budget.
pub struct PrefixCache<P> {
    entries: HashMap<u64, Entry<P>>,
    budget: usize,
    bytes: usize,
    clock: u64,
}

/// The names of `tokens`' whole blocks, each with its parent's name.
pub fn chain(tokens: &[u32]) -> Vec<(u64, u64)> {
    let mut parent = ROOT;
    let mut bytes = [0u8; BLOCK * 4];
    tokens
        .chunks_exact(BLOCK)
        .map(|block| {
            for (b, t) in bytes.chunks_exact_mut(4).zip(block) {
                b.copy_from_slice(&t.to_le_bytes());
            }
            let name = xxh3_64_with_seed(&bytes, parent);
            let link = (name, parent);
            parent = name;
            link
        })
        .collect()
}

impl<P> PrefixCache<P> {
    /// An empty cache holding at most `budget` bytes (0: nothing is ever kept).
    pub fn new(budget: usize) -> Self {
        Self {
            entries: HashMap::new(),
            budget,
            bytes: 0,
            clock: 0,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Blocks held.
    pub fn blocks(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache keeps anything at all.
    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// Whether `entry` is block `block` of a chain whose previous block is `parent`.
    fn matches(entry: &Entry<P>, parent: u64, block: &[u32]) -> bool {
        entry.parent == parent && *entry.tokens == *block
    }

    /// Blocks of the longest cached prefix of `tokens` that ends at or before `limit`
    /// tokens, in order (their tokens: `BLOCK` × their number). Marks them used.
    pub fn lookup(&mut self, tokens: &[u32], limit: usize) -> Vec<&P> {
        let limit = limit.min(tokens.len());
        let links = chain(&tokens[..limit - limit % BLOCK]);
        let mut held = 0;
        for (i, &(name, parent)) in links.iter().enumerate() {
            let block = &tokens[i * BLOCK..(i + 1) * BLOCK];
            match self.entries.get(&name) {
                Some(e) if Self::matches(e, parent, block) => held += 1,
                _ => break,
            }
        }
        self.touch(&links[..held]);
        links[..held]
            .iter()
            .filter_map(|(name, _)| self.entries.get(name).map(|e| &e.payload))
            .collect()
    }

    /// Keeps `tokens`' whole blocks up to `upto` tokens: `make(start, len)` gives the
    /// payload and its size in bytes for each block not held yet. Stops early, keeping what
    /// it has, when the budget cannot fit the next block without evicting this prefix's own
    /// blocks, or when `make` fails (its error is returned).
    pub fn store<E>(
        &mut self,
        tokens: &[u32],
        upto: usize,
        mut make: impl FnMut(usize, usize) -> Result<(P, usize), E>,
    ) -> Result<(), E> {
        if !self.enabled() {
            return Ok(());
        }
        let upto = upto.min(tokens.len());
        let links = chain(&tokens[..upto - upto % BLOCK]);
        // what is held of the chain is fresh, so the evictions below take other prefixes
        let held: Vec<(u64, u64)> = links
            .iter()
            .copied()
            .filter(|(name, _)| self.entries.contains_key(name))
            .collect();
        self.touch(&held);
        let mut outcome = Ok(());
        for (i, &(name, parent)) in links.iter().enumerate() {
            let block = &tokens[i * BLOCK..(i + 1) * BLOCK];
            match self.entries.get(&name) {
                Some(e) if Self::matches(e, parent, block) => continue,
                Some(_) => break, // a hash collision: keep the prefix held
                None => {}
            }
            let (payload, bytes) = match make(i * BLOCK, BLOCK) {
                Ok(made) => made,
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            };
            if !self.make_room(bytes, &links) {
                break;
            }
            self.bytes += bytes;
            self.clock += 1;
            self.entries.insert(
                name,
                Entry {
                    parent,
                    tokens: block.into(),
                    payload,
                    bytes,
                    used: self.clock,
                },
            );
        }
        let kept = links
            .iter()
            .take_while(|(name, _)| self.entries.contains_key(name))
            .count();
        self.touch(&links[..kept]);
        outcome
    }

    /// Evicts least recently used blocks until `bytes` more fit, never one of `keep`'s;
    /// false when they cannot fit.
    fn make_room(&mut self, bytes: usize, keep: &[(u64, u64)]) -> bool {
        if bytes > self.budget {
            return false;
        }
        while self.bytes + bytes > self.budget {
            let Some((&oldest, _)) = self.entries.iter().min_by_key(|(_, e)| e.used) else {
                return false;
            };
            if keep.iter().any(|&(name, _)| name == oldest) {
                return false;
            }
            if let Some(e) = self.entries.remove(&oldest) {
                self.bytes -= e.bytes;
            }
        }
        true
    }

    /// Marks a chain's blocks used now, deepest first (see the module's notes on eviction).
    fn touch(&mut self, links: &[(u64, u64)]) {
        for (name, _) in links.iter().rev() {
            self.clock += 1;
            if let Some(e) = self.entries.get_mut(name) {
                e.used = self.clock;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(seed: u32, n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| seed * 100_000 + i).collect()
    }

    /// Stores every block with its start as payload, each `size` bytes.
    fn store(c: &mut PrefixCache<usize>, t: &[u32], size: usize) {
        c.store::<()>(t, t.len(), |start, _| Ok((start, size)))
            .unwrap();
    }

    #[test]
    fn the_longest_shared_prefix_comes_back_in_whole_blocks() {
        let mut c = PrefixCache::new(1 << 20);
        let a = tokens(1, 100); // 3 whole blocks
        store(&mut c, &a, 10);
        assert_eq!(c.blocks(), 3);
        assert_eq!(c.bytes(), 30);
        // the same start, then a different ending
        let mut b = a[..70].to_vec();
        b.extend(tokens(2, 50));
        let got: Vec<usize> = c.lookup(&b, b.len()).into_iter().copied().collect();
        assert_eq!(
            got,
            vec![0, 32],
            "blocks 0 and 1 are shared; block 2 differs"
        );
        // a limit below a block's end stops before it
        assert_eq!(c.lookup(&a, 95).len(), 2);
        assert_eq!(c.lookup(&a, 96).len(), 3);
        assert!(c.lookup(&a, 31).is_empty());
        // a different first token shares nothing, even with every later token equal
        let mut d = a.clone();
        d[0] += 1;
        assert!(c.lookup(&d, d.len()).is_empty());
        // storing again adds only what is missing
        let mut made = 0;
        c.store::<()>(&b, b.len(), |s, _| {
            made += 1;
            Ok((s, 10))
        })
        .unwrap();
        assert_eq!(
            made, 1,
            "b's block 2 is new (its 24 last tokens make no whole block)"
        );
        assert_eq!(c.lookup(&b, b.len()).len(), 3);
    }

    #[test]
    fn the_budget_holds_and_the_least_recently_used_prefix_goes_first() {
        let mut c = PrefixCache::new(60); // six blocks of 10
        let (a, b, d) = (tokens(1, 96), tokens(2, 96), tokens(3, 96));
        store(&mut c, &a, 10);
        store(&mut c, &b, 10);
        assert_eq!(c.bytes(), 60);
        c.lookup(&a, a.len()); // a is now the more recent
        store(&mut c, &d, 10);
        assert!(c.bytes() <= 60);
        assert_eq!(
            c.lookup(&a, a.len()).len(),
            3,
            "a was used last: kept whole"
        );
        assert_eq!(c.lookup(&d, d.len()).len(), 3, "d was just stored");
        assert!(c.lookup(&b, b.len()).is_empty(), "b was evicted");
    }

    #[test]
    fn eviction_shortens_prefixes_from_their_ends() {
        let mut c = PrefixCache::new(50);
        let (a, b) = (tokens(1, 96), tokens(2, 96));
        store(&mut c, &a, 10);
        store(&mut c, &b, 10); // needs one more block than fits: a's last goes
        assert_eq!(c.lookup(&a, a.len()).len(), 2, "a lost its last block only");
        assert_eq!(c.lookup(&b, b.len()).len(), 3);
        assert_eq!(c.bytes(), 50);
    }

    #[test]
    fn a_prefix_larger_than_the_budget_keeps_what_fits_and_nothing_is_kept_at_zero() {
        let mut c = PrefixCache::new(25);
        let a = tokens(1, 160);
        store(&mut c, &a, 10);
        assert_eq!(c.lookup(&a, a.len()).len(), 2, "two blocks fit, in order");
        let mut off = PrefixCache::new(0);
        store(&mut off, &a, 10);
        assert_eq!(off.blocks(), 0);
        assert!(off.lookup(&a, a.len()).is_empty());
    }

    #[test]
    fn a_failing_payload_keeps_the_blocks_before_it() {
        let mut c = PrefixCache::new(1000);
        let a = tokens(1, 128);
        let r = c.store(&a, a.len(), |start, _| match start {
            64 => Err("copy failed"),
            s => Ok((s, 10)),
        });
        assert_eq!(r, Err("copy failed"));
        assert_eq!(c.lookup(&a, a.len()).len(), 2);
    }

    #[test]
    fn names_are_stable_and_chained() {
        let a = tokens(1, 64);
        let links = chain(&a);
        assert_eq!(links.len(), 2);
        assert_eq!(links[0].1, ROOT);
        assert_eq!(links[1].1, links[0].0);
        assert_eq!(chain(&a), links, "the same tokens, the same names");
        // block 1's tokens alone, at the start, are another prefix
        assert_ne!(chain(&a[32..])[0].0, links[1].0);
    }
}
