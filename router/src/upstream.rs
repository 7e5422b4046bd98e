//! Choosing a worker: first target pool with a live worker, power-of-two-choices on load
//! within it, never a worker already tried. And the retry budget.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngExt;
use routing_rules::ModalitySet;

use crate::registry::{Snapshot, Worker};

/// Picks a worker of `pool` for `model`, skipping `tried` ids (P2C on load). Ejected
/// workers are skipped unless every candidate is ejected: ejection never empties a pool.
pub fn pick(
    snapshot: &Snapshot,
    pool: &str,
    model: &str,
    modalities: ModalitySet,
    tried: &[String],
) -> Option<Arc<Worker>> {
    if let Some(w) = sample_two(snapshot, pool, model, modalities, tried) {
        return Some(w);
    }
    scan(snapshot, pool, model, modalities, tried)
}

/// Whether `w` may take this request: live (not draining), serving `model` with these
/// modalities, and not already tried for it. Ejection is judged separately.
pub fn takes(w: &Worker, model: &str, modalities: ModalitySet, tried: &[String]) -> bool {
    w.state == crate::registry::WorkerState::Live
        && w.accepts(model, modalities)
        && !tried.contains(&w.id)
}

/// Pools beyond this size are sampled rather than scanned.
const SAMPLE_ABOVE: usize = 16;
/// Random draws before falling back to the scan (a pool mostly draining, ejected or serving
/// other models).
const DRAWS: usize = 12;

/// Power of two choices by sampling: two distinct healthy candidates drawn at random, the
/// less loaded wins. Constant time in the pool's size; `None` when the pool is small or two
/// candidates were not found in [`DRAWS`] draws.
fn sample_two(
    snapshot: &Snapshot,
    pool: &str,
    model: &str,
    modalities: ModalitySet,
    tried: &[String],
) -> Option<Arc<Worker>> {
    let workers = snapshot.by_pool.get(pool)?;
    let n = workers.len();
    if n <= SAMPLE_ABOVE {
        return None;
    }
    let mut rng = rand::rng();
    let mut first: Option<usize> = None;
    for _ in 0..DRAWS {
        let i = rng.random_range(0..n);
        if first == Some(i) {
            continue;
        }
        let w = &workers[i];
        if !takes(w, model, modalities, tried) || w.health.is_excluded() {
            continue;
        }
        match first {
            None => first = Some(i),
            Some(a) => {
                let (wa, wb) = (&workers[a], w);
                return Some(Arc::clone(if wb.load() < wa.load() { wb } else { wa }));
            }
        }
    }
    None
}

/// The exact form: every eligible worker collected, two drawn from them.
fn scan(
    snapshot: &Snapshot,
    pool: &str,
    model: &str,
    modalities: ModalitySet,
    tried: &[String],
) -> Option<Arc<Worker>> {
    let untried: Vec<&Arc<Worker>> = snapshot
        .by_pool
        .get(pool)
        .into_iter()
        .flatten()
        .filter(|w| takes(w, model, modalities, tried))
        .collect();
    let healthy: Vec<&Arc<Worker>> = untried
        .iter()
        .copied()
        .filter(|w| !w.health.is_excluded())
        .collect();
    let candidates = if healthy.is_empty() { untried } else { healthy };
    match candidates.len() {
        0 => None,
        1 => Some(Arc::clone(candidates[0])),
        n => {
            let mut rng = rand::rng();
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (wa, wb) = (candidates[a], candidates[b]);
            Some(Arc::clone(if wb.load() < wa.load() { wb } else { wa }))
        }
    }
}

/// Retries allowed as a ratio of requests plus a floor, over a sliding 10-second window.
pub struct RetryBudget {
    window: Duration,
    state: Mutex<(Instant, u64, u64)>, // window start, requests, retries
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(10),
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }
}

impl RetryBudget {
    fn with<R>(&self, f: impl FnOnce(&mut (Instant, u64, u64)) -> R) -> R {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.0.elapsed() > self.window {
            *s = (Instant::now(), 0, 0);
        }
        f(&mut s)
    }

    pub fn record_request(&self) {
        self.with(|s| s.1 += 1);
    }

    /// Takes one retry from the budget if there is room.
    pub fn try_retry(&self, ratio: f64, floor: u32) -> bool {
        self.with(|s| {
            let allowed = u64::from(floor) + (s.1 as f64 * ratio) as u64;
            if s.2 < allowed {
                s.2 += 1;
                true
            } else {
                false
            }
        })
    }
}

/// Decrements a worker's router-side in-flight count when dropped.
pub struct InFlight {
    worker: Arc<Worker>,
    share_start: f64,
    done: bool,
}

impl InFlight {
    pub fn new(worker: Arc<Worker>) -> Self {
        worker
            .router_in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let share_start = worker.share.start(Instant::now());
        Self {
            worker,
            share_start,
            done: false,
        }
    }

    /// Ends the request; returns its share of the worker's time in seconds.
    pub fn finish(mut self) -> f64 {
        self.end()
    }

    fn end(&mut self) -> f64 {
        if std::mem::replace(&mut self.done, true) {
            return 0.0;
        }
        self.worker
            .router_in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.worker.share.end(Instant::now(), self.share_start)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_floor_plus_ratio() {
        let b = RetryBudget::default();
        for _ in 0..100 {
            b.record_request();
        }
        let granted = (0..100).filter(|_| b.try_retry(0.2, 3)).count();
        assert_eq!(granted, 23);
    }

    /// A registry with `n` workers of pool `p` serving model `m`; returns the leases.
    fn pool_of(n: usize) -> (Arc<crate::registry::Registry>, Vec<String>) {
        let r = crate::registry::Registry::new(Duration::from_secs(2), Duration::from_secs(6));
        let models = vec![crate::registry::ServedModel {
            name: "m".into(),
            max_context: 4096,
            modalities: vec![],
        }];
        let leases = (0..n)
            .map(|i| {
                r.register(
                    format!("w{i:03}"),
                    "p".into(),
                    std::net::SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)),
                    models.clone(),
                    "cpu".into(),
                )
            })
            .collect();
        (r, leases)
    }

    #[test]
    fn large_pool_finds_its_only_live_worker() {
        let (r, leases) = pool_of(100);
        for l in &leases[1..] {
            r.drain(l).unwrap();
        }
        let snap = r.snapshot();
        for _ in 0..50 {
            let w = pick(&snap, "p", "m", ModalitySet::default(), &[]).unwrap();
            assert_eq!(w.id, "w000");
        }
        assert!(pick(&snap, "p", "m", ModalitySet::default(), &["w000".into()]).is_none());
        assert!(pick(&snap, "p", "other-model", ModalitySet::default(), &[]).is_none());
    }

    #[test]
    fn large_pool_prefers_the_less_loaded_and_skips_tried_workers() {
        let (r, leases) = pool_of(100);
        for l in &leases[50..] {
            r.heartbeat(l, 100).unwrap(); // w050..w099 busy
        }
        let snap = r.snapshot();
        let tried: Vec<String> = vec!["w001".into(), "w002".into()];
        let mut idle = 0;
        for _ in 0..2000 {
            let w = pick(&snap, "p", "m", ModalitySet::default(), &tried).unwrap();
            assert!(!tried.contains(&w.id));
            if w.load() == 0 {
                idle += 1;
            }
        }
        // two draws, the less loaded wins: an idle worker 3 times in 4
        assert!(
            (1350..=1650).contains(&idle),
            "{idle} of 2000 picks were idle workers"
        );
    }
}
