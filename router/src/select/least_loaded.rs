//! Least loaded: every eligible worker looked at, the least loaded wins (ties at random).
//! Best for small pools of slow, uneven requests (LLM decode), where one extra request on
//! a busy worker costs seconds; linear in the pool's size.

use std::sync::Arc;

use rand::RngExt;

use super::Policy;
use crate::registry::Worker;

pub struct LeastLoaded;

impl Policy for LeastLoaded {
    fn name(&self) -> &'static str {
        "least_loaded"
    }

    fn select(
        &self,
        workers: &[Arc<Worker>],
        eligible: &dyn Fn(&Worker) -> bool,
    ) -> Option<Arc<Worker>> {
        let mut rng = rand::rng();
        let mut best: Option<(&Arc<Worker>, u32)> = None;
        let mut ties = 0u32;
        for w in workers.iter().filter(|w| eligible(w)) {
            let load = w.load();
            match best {
                Some((_, b)) if load > b => {}
                Some((_, b)) if load == b => {
                    // reservoir sampling over the ties: each tied worker equally likely
                    ties += 1;
                    if rng.random_range(0..=ties) == 0 {
                        best = Some((w, load));
                    }
                }
                _ => {
                    best = Some((w, load));
                    ties = 0;
                }
            }
        }
        best.map(|(w, _)| Arc::clone(w))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{ask, pool_of};
    use super::super::{Reach, pick};
    use super::*;

    #[test]
    fn the_least_loaded_wins_and_ties_spread() {
        let (r, leases) = pool_of(4);
        for (i, l) in leases.iter().enumerate() {
            r.heartbeat(l, &crate::registry::Heartbeat::running([5, 1, 1, 9][i]))
                .unwrap();
        }
        let snap = r.snapshot();
        let mut seen = std::collections::HashMap::new();
        for _ in 0..400 {
            let w = pick(&snap, "p", &LeastLoaded, &ask("m", &[]), Reach::Healthy).unwrap();
            *seen.entry(w.id.clone()).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 2, "only the two workers at load 1: {seen:?}");
        assert!(seen.values().all(|&n| n > 120), "ties spread: {seen:?}");
    }
}
