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
    let untried: Vec<&Arc<Worker>> = snapshot
        .routable(pool, model)
        .filter(|w| w.accepts(model, modalities) && !tried.iter().any(|t| *t == w.id))
        .collect();
    let healthy: Vec<&Arc<Worker>> = untried
        .iter()
        .copied()
        .filter(|w| !w.health.is_ejected())
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
pub struct InFlight(Arc<Worker>);

impl InFlight {
    pub fn new(w: Arc<Worker>) -> Self {
        w.router_in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(w)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .router_in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
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
}
