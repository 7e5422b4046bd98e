//! Logs: one JSON object per line (the access line is the event whose `message` is
//! `request`), or coloured text when stderr is a terminal. Lines are written by a
//! background thread, in batches: a request never waits on stderr. When the writer falls behind by
//! more than [`BUFFERED_LINES`] lines, new lines are dropped rather than blocking the
//! event loop, and counted in `switchyard_router_log_lines_dropped_total`.

use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock};

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Lines the writer thread may fall behind by before lines are dropped.
pub const BUFFERED_LINES: usize = 64 * 1024;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Text when stderr is a terminal, else JSON.
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable text (colour only on a terminal).
    Text,
}

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();
static GUARD: Mutex<Option<WorkerGuard>> = Mutex::new(None);

/// Lines dropped because the writer fell behind, since start.
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Writes out every line logged so far and stops the writer: later lines are dropped.
/// For the last moments of the process.
pub fn flush() {
    let guard = GUARD.lock().map(|mut g| g.take()).unwrap_or_default();
    drop(guard);
}

/// Exits the process after writing out the lines logged so far (`std::process::exit`
/// alone would lose the lines still queued, such as the error that explains the exit).
pub fn exit(code: i32) -> ! {
    flush();
    std::process::exit(code)
}

/// Installs the global subscriber (`RUST_LOG` filters, default `info`) and its writer
/// thread; [`flush`] or [`exit`] write out what is queued.
pub fn init(format: LogFormat) {
    let terminal = std::io::stderr().is_terminal();
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name("switchyard-log")
        // buffered: the writer thread writes what has queued up in one go, and flushes
        // whenever the queue is empty (a line never waits for more to come)
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    let _ = DROPPED.set(writer.error_counter());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let json = match format {
        LogFormat::Auto => !terminal,
        LogFormat::Json => true,
        LogFormat::Text => false,
    };
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(terminal && !json);
    if json {
        fmt.json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init();
    } else {
        fmt.init();
    }
    if let Ok(mut g) = GUARD.lock() {
        *g = Some(guard);
    }
}
