//! The reloadable store: the compiled set behind `ArcSwap`, with a generation number, and
//! a watcher that reloads on change and keeps the last good set on any error.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

use crate::compile::{compile_bytes, read_bounded};
use crate::compiled::CompiledRules;
use crate::problem::RulesError;

/// A compiled rule set and the generation it was published as.
#[derive(Debug)]
pub struct Loaded {
    pub generation: u64,
    pub rules: CompiledRules,
}

/// What a reload did.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// A new set is live under this generation.
    Applied(u64),
    /// The file is unchanged since the last load.
    Unchanged,
}

/// The live rule set. Readers call [`RulesStore::load`] (lock-free); one writer reloads.
#[derive(Debug)]
pub struct RulesStore {
    path: PathBuf,
    current: ArcSwap<Loaded>,
    next_generation: AtomicU64,
    last_seen: std::sync::Mutex<Option<Vec<u8>>>,
}

impl RulesStore {
    /// Compiles `path`; fails if the first load does not compile.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, RulesError> {
        let path = path.into();
        let bytes = read_bounded(&path)?;
        let rules = compile_bytes(&bytes, &path)?;
        Ok(Self {
            path,
            current: ArcSwap::from_pointee(Loaded {
                generation: 1,
                rules,
            }),
            next_generation: AtomicU64::new(2),
            last_seen: std::sync::Mutex::new(Some(bytes)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The live set. Cheap: one atomic load and a reference-count increment.
    pub fn load(&self) -> Arc<Loaded> {
        self.current.load_full()
    }

    pub fn generation(&self) -> u64 {
        self.current.load().generation
    }

    /// Re-reads the file. On any error the live set stays as it was.
    pub fn reload(&self) -> Result<ReloadOutcome, RulesError> {
        let bytes = read_bounded(&self.path)?;
        let mut last = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_deref() == Some(bytes.as_slice()) {
            return Ok(ReloadOutcome::Unchanged);
        }
        let compiled = compile_bytes(&bytes, &self.path);
        // Remember the bytes either way so a broken file is reported once, not every poll.
        *last = Some(bytes);
        let rules = compiled?;
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        self.current.store(Arc::new(Loaded { generation, rules }));
        Ok(ReloadOutcome::Applied(generation))
    }

    /// Watches the file's directory (editors rename on save; Kubernetes ConfigMaps swap a
    /// symlink) with a poll backstop, and calls `on_result` after each reload attempt that
    /// saw a change. Runs on its own thread until `stop` is set.
    pub fn watch<F>(
        self: &Arc<Self>,
        poll: Duration,
        stop: Arc<std::sync::atomic::AtomicBool>,
        on_result: F,
    ) -> std::io::Result<std::thread::JoinHandle<()>>
    where
        F: Fn(&Result<ReloadOutcome, RulesError>) + Send + 'static,
    {
        use notify::{RecursiveMode, Watcher};
        let store = Arc::clone(self);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let file_name = self.path.file_name().map(|f| f.to_os_string());
        let dir = self
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if let Ok(ev) = ev {
                // Only events on the rules file itself (or the ConfigMap `..data` swap).
                let relevant = ev.paths.iter().any(|p| {
                    p.file_name().map(|f| f.to_os_string()) == file_name
                        || p.file_name()
                            .is_some_and(|f| f.to_string_lossy().starts_with(".."))
                });
                if relevant {
                    let _ = tx.send(());
                }
            }
        })
        .map_err(std::io::Error::other)?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(std::io::Error::other)?;
        std::thread::Builder::new()
            .name("rules-watch".into())
            .spawn(move || {
                let _watcher = watcher;
                let mut last_mtime = mtime(&store.path);
                while !stop.load(Ordering::Relaxed) {
                    let evented = rx.recv_timeout(poll).is_ok();
                    let now = mtime(&store.path);
                    if !evented && now == last_mtime {
                        continue;
                    }
                    // Debounce: editors write in several steps.
                    std::thread::sleep(Duration::from_millis(50));
                    while rx.try_recv().is_ok() {}
                    last_mtime = mtime(&store.path);
                    let result = store.reload();
                    if !matches!(result, Ok(ReloadOutcome::Unchanged)) {
                        on_result(&result);
                    }
                }
            })
    }
}

fn mtime(path: &Path) -> Option<(SystemTime, u64)> {
    std::fs::metadata(path)
        .ok()
        .and_then(|m| Some((m.modified().ok()?, m.len())))
}
