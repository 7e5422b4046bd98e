//! SLO-aware tier choice: a rule with a latency objective (`slo: { ttft_p95_ms: N }`) takes
//! the cheapest pool of its route that is expected to meet it. A pool *spills* — goes to
//! the back of the route, behind the dearer tiers — when it misses the objective, and comes
//! back when it has recovered:
//!
//! - **Signals, per pool:** the time to first token of its recent streamed answers (the
//!   last `--slo-window-s`, 10 s by default; at least [`MIN_SAMPLES`] of them for a
//!   percentile), and its load now:
//!   requests in flight and queued on its live workers against their capacity (their
//!   maximum concurrency), so a saturating load step is seen before the slow answers are.
//! - **Spill** when the 95th percentile is above the objective, or the pool is over full
//!   (more requests in flight and queued than its capacity: requests are queueing; a pool
//!   just at capacity is not, and the load the router knows is up to a heartbeat old).
//! - **Return** (hysteresis) only once the percentile is at most 70 % of the objective (or
//!   its slow samples have aged out) and the load is below 80 % of capacity, and at least
//!   `--slo-cooldown-s` (5 s) after it spilled: a pool at the edge does not flap.
//!
//! A spilled pool stays on the route, last: when the dearer tiers have no worker it is
//! still used. The pools moved are in the access line (`spilled`), in `switchyard explain`
//! and `/admin/explain`, and `switchyard_router_pool_spilling{pool}` is 1 while a pool is
//! spilled for some objective.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Answers in the window needed for a percentile.
pub const MIN_SAMPLES: usize = 10;
/// Answers kept per pool at most (the newest).
const MAX_SAMPLES: usize = 1024;

#[derive(Default)]
struct PoolSamples {
    /// When each answer's first token came, and how long it took.
    ttft: VecDeque<(Instant, Duration)>,
}

impl PoolSamples {
    fn trim(&mut self, now: Instant, window: Duration) {
        while self
            .ttft
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > window)
        {
            self.ttft.pop_front();
        }
    }

    fn p95(&self) -> Option<Duration> {
        if self.ttft.len() < MIN_SAMPLES {
            return None;
        }
        let mut v: Vec<Duration> = self.ttft.iter().map(|(_, d)| *d).collect();
        v.sort_unstable();
        let i = ((v.len() as f64 * 0.95).ceil() as usize).clamp(1, v.len()) - 1;
        Some(v[i])
    }
}

/// Whether a pool is spilled for one objective, and since when.
#[derive(Clone, Copy)]
struct Spill {
    spilling: bool,
    changed: Instant,
}

/// What the router knows of a pool against an objective (for `explain`).
#[derive(Debug, Clone, Serialize)]
pub struct PoolView {
    pub pool: Arc<str>,
    /// The 95th percentile of its recent streamed answers' time to first token (`null`:
    /// fewer than [`MIN_SAMPLES`] in the window).
    pub ttft_p95_ms: Option<f64>,
    pub samples: usize,
    /// Load on its live workers against their capacity (`null`: no capacity known).
    pub utilization: Option<f64>,
    pub spilling: bool,
}

/// The route for one request: the pools in the order to try, and those moved back.
pub struct Ordered {
    pub targets: Vec<Arc<str>>,
    pub spilled: Vec<Arc<str>>,
}

pub struct SloTracker {
    /// How far back a pool's answers count.
    window: Duration,
    /// Least time a pool stays spilled.
    cooldown: Duration,
    samples: Mutex<HashMap<Arc<str>, PoolSamples>>,
    /// Spill state by (pool, objective in ms).
    spills: Mutex<HashMap<(Arc<str>, u64), Spill>>,
}

impl SloTracker {
    pub fn new(window: Duration, cooldown: Duration) -> Self {
        Self {
            window,
            cooldown,
            samples: Mutex::default(),
            spills: Mutex::default(),
        }
    }

    /// A streamed answer from `pool` whose first token took `ttft`.
    pub fn record(&self, pool: &Arc<str>, ttft: Duration) {
        let now = Instant::now();
        let mut all = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let s = all.entry(Arc::clone(pool)).or_default();
        s.trim(now, self.window);
        if s.ttft.len() == MAX_SAMPLES {
            s.ttft.pop_front();
        }
        s.ttft.push_back((now, ttft));
    }

    fn p95(&self, pool: &str, now: Instant) -> (Option<Duration>, usize) {
        let mut all = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        match all.get_mut(pool) {
            Some(s) => {
                s.trim(now, self.window);
                (s.p95(), s.ttft.len())
            }
            None => (None, 0),
        }
    }

    /// `targets` ordered for `objective`: the pools expected to meet it in route order, then
    /// the spilled ones in route order. `utilization` gives a pool's load against capacity.
    /// The state changes (spill, return) happen here, as requests need them.
    pub fn order(
        &self,
        targets: &[Arc<str>],
        objective: Duration,
        utilization: &dyn Fn(&str) -> Option<f64>,
    ) -> Ordered {
        let views = self.views(targets, objective, utilization, true);
        let (meet, spilled): (Vec<&PoolView>, Vec<&PoolView>) =
            views.iter().partition(|v| !v.spilling);
        let spilled: Vec<Arc<str>> = spilled.into_iter().map(|v| Arc::clone(&v.pool)).collect();
        Ordered {
            targets: meet
                .into_iter()
                .map(|v| Arc::clone(&v.pool))
                .chain(spilled.iter().cloned())
                .collect(),
            spilled,
        }
    }

    /// Every pool of `targets` as the router sees it against `objective` (`update`: apply
    /// the spill and return rules now).
    pub fn views(
        &self,
        targets: &[Arc<str>],
        objective: Duration,
        utilization: &dyn Fn(&str) -> Option<f64>,
        update: bool,
    ) -> Vec<PoolView> {
        let now = Instant::now();
        let key_ms = objective.as_millis() as u64;
        targets
            .iter()
            .map(|pool| {
                let (p95, samples) = self.p95(pool, now);
                let util = utilization(pool);
                let mut spills = self.spills.lock().unwrap_or_else(|p| p.into_inner());
                let state = spills.entry((Arc::clone(pool), key_ms)).or_insert(Spill {
                    spilling: false,
                    changed: now,
                });
                if update {
                    let breach =
                        p95.is_some_and(|p| p > objective) || util.is_some_and(|u| u > 1.0);
                    let recovered = p95
                        .is_none_or(|p| p.as_secs_f64() <= objective.as_secs_f64() * 0.7)
                        && util.is_none_or(|u| u < 0.8);
                    if !state.spilling && breach {
                        *state = Spill {
                            spilling: true,
                            changed: now,
                        };
                    } else if state.spilling
                        && recovered
                        && now.duration_since(state.changed) >= self.cooldown
                    {
                        *state = Spill {
                            spilling: false,
                            changed: now,
                        };
                    }
                }
                PoolView {
                    pool: Arc::clone(pool),
                    ttft_p95_ms: p95.map(|d| d.as_secs_f64() * 1000.0),
                    samples,
                    utilization: util,
                    spilling: state.spilling,
                }
            })
            .collect()
    }

    /// Pools spilled for some objective now.
    pub fn spilling_pools(&self) -> Vec<Arc<str>> {
        let spills = self.spills.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Arc<str>> = spills
            .iter()
            .filter(|(_, s)| s.spilling)
            .map(|((p, _), _)| Arc::clone(p))
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// A pool's load against its capacity, from a registry snapshot: requests in flight and
/// queued on its live workers over the sum of their maximum concurrency (`None` when no
/// live worker reports one).
pub fn utilization(snapshot: &crate::registry::Snapshot, pool: &str) -> Option<f64> {
    let workers = snapshot.by_pool.get(pool)?;
    let (mut load, mut capacity) = (0u64, 0u64);
    for w in workers
        .iter()
        .filter(|w| w.state == crate::registry::WorkerState::Live)
    {
        let max = w.max_concurrency.load(std::sync::atomic::Ordering::Relaxed);
        if max > 0 {
            load += u64::from(w.load());
            capacity += u64::from(max);
        }
    }
    (capacity > 0).then(|| load as f64 / capacity as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools() -> Vec<Arc<str>> {
        vec![Arc::from("cpu"), Arc::from("l40s")]
    }

    #[test]
    fn a_slow_pool_spills_behind_the_next_and_returns_after_recovering() {
        let t = SloTracker::new(Duration::from_secs(10), Duration::from_secs(5));
        let objective = Duration::from_millis(400);
        let idle = |_: &str| Some(0.0);
        let cpu: Arc<str> = Arc::from("cpu");
        // unknown: route order
        assert_eq!(t.order(&pools(), objective, &idle).targets, pools());
        for _ in 0..20 {
            t.record(&cpu, Duration::from_millis(900));
        }
        let o = t.order(&pools(), objective, &idle);
        assert_eq!(&*o.targets[0], "l40s", "spilled");
        assert_eq!(o.spilled, vec![Arc::clone(&cpu)]);
        // fast answers again, but within the cooldown: still spilled
        for _ in 0..200 {
            t.record(&cpu, Duration::from_millis(50));
        }
        assert_eq!(&*t.order(&pools(), objective, &idle).targets[0], "l40s");
        assert_eq!(t.spilling_pools(), vec![Arc::clone(&cpu)]);
    }

    #[test]
    fn a_full_pool_spills_before_its_answers_slow_down() {
        let t = SloTracker::new(Duration::from_secs(10), Duration::from_secs(5));
        let full = |p: &str| Some(if p == "cpu" { 1.5 } else { 0.1 });
        let o = t.order(&pools(), Duration::from_millis(400), &full);
        assert_eq!(&*o.targets[0], "l40s");
        // a near-miss (between 70 % and 100 % of the objective) does not bring it back
        let busy = |p: &str| Some(if p == "cpu" { 0.9 } else { 0.1 });
        assert_eq!(
            &*t.order(&pools(), Duration::from_millis(400), &busy).targets[0],
            "l40s"
        );
        // another objective has its own state
        let o = t.order(&pools(), Duration::from_millis(5000), &busy);
        assert_eq!(&*o.targets[0], "cpu");
    }

    #[test]
    fn the_percentile_needs_enough_samples() {
        let mut s = PoolSamples::default();
        let now = Instant::now();
        for i in 0..9 {
            s.ttft.push_back((now, Duration::from_millis(i)));
        }
        assert_eq!(s.p95(), None);
        s.ttft.push_back((now, Duration::from_millis(1000)));
        assert_eq!(s.p95(), Some(Duration::from_millis(1000)));
        for _ in 0..90 {
            s.ttft.push_back((now, Duration::from_millis(1)));
        }
        // 100 samples: the 95th is a fast one
        assert!(s.p95().unwrap() < Duration::from_millis(10));
    }
}
