//! Logs: one JSON object per line (the access line is the event whose `message` is
//! `request`), or coloured text when stderr is a terminal. Lines are written by a
//! background thread in batches: a request never waits on stderr, and the writer wakes once
//! per [`GATHER`] at most, however many lines came meanwhile. When more than
//! [`BUFFERED_BYTES`] wait to be written, new lines are dropped rather than blocking the
//! event loop, and counted in `switchyard_router_log_lines_dropped_total`.
//!
//! Why not `tracing-appender`'s non-blocking writer: it sends each line through a channel
//! and wakes its thread for it, so under load every access line cost a wake-up, spinning
//! (`sched_yield`) and its own `write(2)`: 4.2 of the router's 10.7 system calls per
//! request at 32 concurrent clients (`strace -c`), more than the proxying itself added.
//! Here a line is a copy into a buffer under a lock held for that copy; the thread is
//! woken only when the buffer goes from empty to not empty.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Bytes of lines the writer thread may fall behind by before lines are dropped.
pub const BUFFERED_BYTES: usize = 16 * 1024 * 1024;

/// How long the writer lets lines gather after the first one before writing them out:
/// the most a line waits for stderr (while stderr keeps up).
pub const GATHER: Duration = Duration::from_millis(10);

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

/// Lines waiting for the writer thread.
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    /// No more lines: the thread writes what is pending and ends.
    closed: bool,
}

/// The buffer shared by the event loops (which append lines) and the writer thread.
#[derive(Default)]
struct Batch {
    pending: Mutex<Pending>,
    wake: Condvar,
    dropped: AtomicU64,
}

impl Batch {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues one line (tracing's formatter hands over each event whole).
    fn push(&self, line: &[u8]) {
        let mut p = self.lock();
        if p.closed || p.bytes.len() + line.len() > BUFFERED_BYTES {
            drop(p);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let was_empty = p.bytes.is_empty();
        p.bytes.extend_from_slice(line);
        drop(p);
        if was_empty {
            self.wake.notify_one();
        }
    }

    /// The writer thread: waits for a first line, lets more gather for [`GATHER`], writes
    /// them all with one `write`; until closed and drained.
    fn run(&self, out: &mut dyn Write) {
        let mut spare = Vec::new();
        loop {
            let mut p = self.lock();
            while p.bytes.is_empty() && !p.closed {
                p = self.wake.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            if p.bytes.is_empty() {
                return;
            }
            if !p.closed {
                drop(p);
                std::thread::sleep(GATHER);
                p = self.lock();
            }
            std::mem::swap(&mut p.bytes, &mut spare);
            drop(p);
            // a failing stderr loses these lines, never the process
            let _ = out.write_all(&spare).and_then(|()| out.flush());
            spare.clear();
            // do not keep a burst's buffer for ever
            if spare.capacity() > 1024 * 1024 {
                spare = Vec::new();
            }
        }
    }

    /// Ends the writer: what is pending is written, later lines are dropped.
    fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }
}

/// `tracing`'s writer: each event's formatted line goes to the shared [`Batch`].
#[derive(Clone)]
struct BatchWriter(Arc<Batch>);

/// One event's writer.
struct Line<'a>(&'a Batch);

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Line(&self.0)
    }
}

static BATCH: OnceLock<Arc<Batch>> = OnceLock::new();
static THREAD: Mutex<Option<std::thread::JoinHandle<()>>> = Mutex::new(None);

/// Set when the subscriber writes JSON lines to [`BATCH`] (see [`write_json_line`]).
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes one JSON log line straight into the log writer's buffer, in the shape
/// `tracing`'s JSON formatter gives an event (`timestamp`, `level`, `message`, the fields,
/// `target`), without going through `tracing`. `fields` must serialize as a JSON object.
/// Returns false, writing nothing, when logs are not JSON lines (text logs, or logging not
/// set up): the caller emits a `tracing` event instead. The caller checks that the event
/// is enabled (`tracing::enabled!`), so `RUST_LOG` filters both alike.
pub fn write_json_line<T: serde::Serialize>(
    level: tracing::Level,
    message: &str,
    target: &str,
    fields: &T,
) -> bool {
    let Some(batch) = BATCH.get().filter(|_| JSON.load(Ordering::Relaxed)) else {
        return false;
    };
    thread_local! {
        static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    LINE.with(|b| {
        let Ok(mut line) = b.try_borrow_mut() else {
            return false;
        };
        let written = json_line(level, message, target, fields, &mut line);
        if written {
            batch.push(&line);
        }
        written
    })
}

/// [`write_json_line`]'s line, into `line`.
pub(crate) fn json_line<T: serde::Serialize>(
    level: tracing::Level,
    message: &str,
    target: &str,
    fields: &T,
    line: &mut Vec<u8>,
) -> bool {
    line.clear();
    let now = time::OffsetDateTime::now_utc();
    let head = write!(
        line,
        "{{\"timestamp\":\"{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z\",\"level\":\"{level}\",\"message\":",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.microsecond(),
    );
    if head.is_err() || serde_json::to_writer(&mut *line, message).is_err() {
        return false;
    }
    // the fields' object, serialized in place: its braces become the line's commas
    let start = line.len();
    if serde_json::to_writer(&mut *line, fields).is_err()
        || !(line[start..].starts_with(b"{") && line.ends_with(b"}"))
    {
        return false;
    }
    line.pop();
    if line.len() == start + 1 {
        line.pop();
    } else {
        line[start] = b',';
    }
    line.extend_from_slice(b",\"target\":");
    if serde_json::to_writer(&mut *line, target).is_err() {
        return false;
    }
    line.extend_from_slice(b"}\n");
    true
}

/// Lines dropped because the writer fell behind, since start.
pub fn dropped_lines() -> u64 {
    BATCH.get().map_or(0, |b| b.dropped.load(Ordering::Relaxed))
}

/// Writes out every line logged so far and stops the writer: later lines are dropped.
/// For the last moments of the process.
pub fn flush() {
    if let Some(b) = BATCH.get() {
        b.close();
    }
    let thread = THREAD.lock().map(|mut t| t.take()).unwrap_or_default();
    if let Some(t) = thread {
        let _ = t.join();
    }
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
    let batch = Arc::clone(BATCH.get_or_init(Arc::default));
    let writer = BatchWriter(Arc::clone(&batch));
    let spawned = std::thread::Builder::new()
        .name("switchyard-log".into())
        .spawn(move || batch.run(&mut std::io::stderr()));
    match spawned {
        Ok(t) => {
            if let Ok(mut slot) = THREAD.lock() {
                *slot = Some(t);
            }
        }
        Err(e) => eprintln!("switchyard: cannot start the log writer thread: {e}"),
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let json = match format {
        LogFormat::Auto => !terminal,
        LogFormat::Json => true,
        LogFormat::Text => false,
    };
    JSON.store(json, Ordering::Relaxed);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stderr stand-in that keeps each `write_all` apart.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut w) = self.0.lock() {
                match w.last_mut() {
                    Some(last) if !last.ends_with(b"\n") => last.extend_from_slice(buf),
                    _ => w.push(buf.to_vec()),
                }
            }
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            if let Ok(mut w) = self.0.lock() {
                w.push(Vec::new());
            }
            Ok(())
        }
    }

    #[test]
    fn lines_that_come_together_leave_in_one_write_in_order_and_close_drains() {
        let batch = Arc::new(Batch::default());
        let out = Writes::default();
        let thread = {
            let (batch, mut out) = (Arc::clone(&batch), out.clone());
            std::thread::spawn(move || batch.run(&mut out))
        };
        for i in 0..100 {
            batch.push(format!("line {i}\n").as_bytes());
        }
        std::thread::sleep(GATHER * 5);
        batch.push(b"last\n");
        batch.close();
        thread.join().unwrap();
        batch.push(b"after close\n");
        let writes: Vec<Vec<u8>> = out
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|w| !w.is_empty())
            .cloned()
            .collect();
        let all: String = writes.iter().map(|w| String::from_utf8_lossy(w)).collect();
        let expected: String =
            (0..100).map(|i| format!("line {i}\n")).collect::<String>() + "last\n";
        assert_eq!(all, expected, "every line, in order, nothing after close");
        assert!(
            writes.len() <= 3,
            "101 lines in at most a few writes, not one each: {}",
            writes.len()
        );
        assert_eq!(
            batch.dropped.load(Ordering::Relaxed),
            1,
            "the line after close"
        );
    }

    #[test]
    fn a_writer_that_falls_behind_drops_lines_and_counts_them() {
        // no thread: nothing is written out, so the budget fills
        let batch = Batch::default();
        let line = vec![b'x'; 1024];
        let fit = BUFFERED_BYTES / line.len();
        for _ in 0..fit + 10 {
            batch.push(&line);
        }
        assert_eq!(batch.lock().bytes.len(), fit * line.len());
        assert_eq!(batch.dropped.load(Ordering::Relaxed), 10);
    }
}
