//! Benchmarks live in `benches/`: criterion micro-benches (`cargo bench -p benches`).
