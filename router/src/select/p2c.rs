//! Power of two choices: two eligible workers drawn at random, the less loaded wins.
//! Nearly as good as least-loaded at spreading load, without the herd that always picking
//! the minimum causes when loads are stale (Mitzenmacher), and constant time in large pools.

use std::sync::Arc;

use rand::RngExt;

use super::Policy;
use crate::registry::Worker;

pub struct PowerOfTwo;

/// Pools beyond this size are sampled rather than scanned.
const SAMPLE_ABOVE: usize = 16;
/// Random draws before falling back to the scan (a pool mostly draining, ejected or
/// serving other models).
const DRAWS: usize = 12;

impl Policy for PowerOfTwo {
    fn name(&self) -> &'static str {
        "power_of_two"
    }

    fn select(
        &self,
        workers: &[Arc<Worker>],
        eligible: &dyn Fn(&Worker) -> bool,
    ) -> Option<Arc<Worker>> {
        if workers.len() > SAMPLE_ABOVE
            && let Some(w) = sample_two(workers, eligible)
        {
            return Some(w);
        }
        scan(workers, eligible)
    }
}

fn less_loaded<'a>(a: &'a Arc<Worker>, b: &'a Arc<Worker>) -> Arc<Worker> {
    Arc::clone(if b.load() < a.load() { b } else { a })
}

/// Two distinct eligible workers found by random draws; `None` when [`DRAWS`] draws did
/// not find two.
fn sample_two(workers: &[Arc<Worker>], eligible: &dyn Fn(&Worker) -> bool) -> Option<Arc<Worker>> {
    let mut rng = rand::rng();
    let mut first: Option<usize> = None;
    for _ in 0..DRAWS {
        let i = rng.random_range(0..workers.len());
        if first == Some(i) || !eligible(&workers[i]) {
            continue;
        }
        match first {
            None => first = Some(i),
            Some(a) => return Some(less_loaded(&workers[a], &workers[i])),
        }
    }
    None
}

/// The exact form: two distinct draws among all eligible workers, without collecting
/// them (the pool is walked to count, then to find the two drawn indices).
fn scan(workers: &[Arc<Worker>], eligible: &dyn Fn(&Worker) -> bool) -> Option<Arc<Worker>> {
    let n = workers.iter().filter(|w| eligible(w)).count();
    let nth = |k: usize| workers.iter().filter(|w| eligible(w)).nth(k);
    match n {
        0 => None,
        1 => nth(0).cloned(),
        n => {
            let mut rng = rand::rng();
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            Some(less_loaded(nth(a)?, nth(b)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{ask, pool_of};
    use super::super::{Reach, pick};
    use super::*;

    #[test]
    fn large_pool_prefers_the_less_loaded_and_skips_tried_workers() {
        let (r, leases) = pool_of(100);
        for l in &leases[50..] {
            r.heartbeat(l, &crate::registry::Heartbeat::running(100))
                .unwrap(); // w050..w099 busy
        }
        let snap = r.snapshot();
        let tried: Vec<String> = vec!["w001".into(), "w002".into()];
        let mut idle = 0;
        for _ in 0..2000 {
            let w = pick(&snap, "p", &PowerOfTwo, &ask("m", &tried), Reach::Healthy).unwrap();
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
