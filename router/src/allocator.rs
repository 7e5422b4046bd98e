//! The global allocator's settings. With the `mimalloc` feature (the default) the router
//! allocates with mimalloc. Its defaults suit a process that keeps growing; the router does
//! most of its allocating at start (the tokenizers) and then runs in a small steady state,
//! so two settings are changed:
//!
//! - `MIMALLOC_ARENA_EAGER_COMMIT=0`: arenas are committed as they are used, not whole;
//! - `MIMALLOC_PURGE_DELAY=0`: freed pages go back to the OS at once, not a second later
//!   (an idle router never frees again, so delayed purges never happen).
//!
//! Measured with SmolLM2's tokenizer loaded (`benches/load.py --variant`, 2026-12-02, one
//! core): mimalloc's defaults give 1.17× glibc's requests per CPU-second but 66 MB idle
//! RSS; tuned, 1.0× glibc's throughput with 24 MB idle and 29 MB under load (glibc: 38 and
//! 51 MB, 68 MB after the run). mimalloc reads its options from the environment at its first
//! allocation, before `main`, so [`tune`] sets them and re-executes the process (same
//! pid, same arguments). An operator's own `MIMALLOC_*` settings are left alone.

/// The settings, as environment variables.
pub const SETTINGS: [(&str, &str); 2] = [
    ("MIMALLOC_ARENA_EAGER_COMMIT", "0"),
    ("MIMALLOC_PURGE_DELAY", "0"),
];

/// Marks a process that was re-executed already (or must not be).
const TUNED: &str = "SWITCHYARD_ALLOCATOR_TUNED";

/// Re-executes the process with [`SETTINGS`] unless they are set already. Returns only
/// when it did not re-execute (settings in place, or `exec` failed: the router then runs
/// with mimalloc's defaults).
pub fn tune() {
    if std::env::var_os(TUNED).is_some() {
        return;
    }
    let missing: Vec<_> = SETTINGS
        .iter()
        .filter(|(k, _)| std::env::var_os(k).is_none())
        .collect();
    if missing.is_empty() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        cmd.arg0(arg0);
    }
    cmd.args(args).env(TUNED, "1");
    for (k, v) in missing {
        cmd.env(k, v);
    }
    // only returns on failure
    let e = cmd.exec();
    eprintln!(
        "switchyard: could not re-execute with the allocator's settings ({e}); running with its defaults"
    );
}
