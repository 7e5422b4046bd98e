//! Fuzzes the rules parser and compiler: any input must give Ok or an error, never a panic.
//! Run: `cd routing-rules/fuzz && cargo fuzz run parse ../tests/fixtures/corpus`.
//! The corpus is replayed by `cargo test -p routing-rules` (corpus_of_hostile_files_never_panics).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = routing_rules::compile(text, std::path::Path::new("."));
    }
});
