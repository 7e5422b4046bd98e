//! Selection: which worker of a pool takes a request.
//!
//! [`takes`] is the one eligibility rule (live, serves the model with these modalities,
//! not already tried for this request), used by selection and by `POST /admin/explain`.
//! A [`Policy`] then chooses among the eligible workers; each policy is one file here and a
//! pool names its policy in the rules file (`select:`).
//!
//! ## Adding a selection policy
//!
//! 1. A file here with a type implementing [`Policy`] (`name()` is its metric label and
//!    its name in the rules file).
//! 2. A variant of `routing_rules::SelectPolicy` (the rules language) and its arm in
//!    [`policy_for`].
//! 3. A unit test beside it, and a line in `docs/rules.md`.

mod cache_aware;
mod least_loaded;
mod p2c;

use std::sync::Arc;

use routing_rules::ModalitySet;

pub use cache_aware::{CacheAware, Placement, PrefixIndex, prefix_chain};
pub use least_loaded::LeastLoaded;
pub use p2c::PowerOfTwo;

use crate::registry::{Snapshot, Worker, WorkerState};

/// What one selection asks for.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub model: &'a str,
    pub modalities: ModalitySet,
    /// Workers already tried for this request.
    pub tried: &'a [String],
    /// The request continues an answer another worker began ([`crate::resume`]): only
    /// engines that take a continuation qualify.
    pub continuation: bool,
}

/// Whether `w` may take this request: live (not draining), serving the model with these
/// modalities, and not already tried for it. Health (ejection, failed checks) is judged
/// separately, by [`Reach`].
pub fn takes(w: &Worker, ask: &Ask) -> bool {
    w.state == WorkerState::Live
        && w.accepts(ask.model, ask.modalities)
        && !ask.tried.contains(&w.id)
        && (!ask.continuation || w.continues())
}

/// Which workers a selection may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Only workers in good health (not ejected, not failing their health check).
    Healthy,
    /// Unhealthy ones too: the last resort when no pool on the route has a healthy one.
    AnyLive,
}

impl Reach {
    fn admits(self, w: &Worker) -> bool {
        self == Self::AnyLive || !w.health.is_excluded()
    }
}

/// A way of choosing one worker among a pool's eligible ones.
pub trait Policy: Send + Sync {
    /// The policy's name: its metric label and its name in the rules file.
    fn name(&self) -> &'static str;

    /// Chooses one of `workers` for which `eligible` holds, or `None` when none does.
    /// Runs on the request path, once per attempt: it must not block, and should not
    /// allocate for large pools.
    fn select(
        &self,
        workers: &[Arc<Worker>],
        eligible: &dyn Fn(&Worker) -> bool,
    ) -> Option<Arc<Worker>>;
}

/// The policy a pool's rules name, for the policies that look at load alone; `None` for
/// `cache_aware`, which is made per request ([`CacheAware::new`]) from the request's
/// prefix and the router's [`PrefixIndex`].
pub fn policy_for(kind: routing_rules::SelectPolicy) -> Option<&'static dyn Policy> {
    match kind {
        routing_rules::SelectPolicy::PowerOfTwo => Some(&PowerOfTwo),
        routing_rules::SelectPolicy::LeastLoaded => Some(&LeastLoaded),
        routing_rules::SelectPolicy::CacheAware => None,
    }
}

/// A worker of `pool` for `ask` within `reach`, chosen by `policy`.
pub fn pick(
    snapshot: &Snapshot,
    pool: &str,
    policy: &dyn Policy,
    ask: &Ask,
    reach: Reach,
) -> Option<Arc<Worker>> {
    let workers = snapshot.by_pool.get(pool)?;
    policy.select(workers, &|w| takes(w, ask) && reach.admits(w))
}

/// A worker of `pool`: a healthy one if any, else an unhealthy one (so that, looked at
/// alone, ejection never empties a pool). The failover loop instead first looks for a
/// healthy worker in every pool of the route.
pub fn pick_in_pool(
    snapshot: &Snapshot,
    pool: &str,
    policy: &dyn Policy,
    ask: &Ask,
) -> Option<Arc<Worker>> {
    pick(snapshot, pool, policy, ask, Reach::Healthy)
        .or_else(|| pick(snapshot, pool, policy, ask, Reach::AnyLive))
}

/// How many of `pool`'s workers could take `ask` now: healthy ones, and all live ones.
pub fn count(snapshot: &Snapshot, pool: &str, ask: &Ask) -> (usize, usize) {
    let workers = snapshot
        .by_pool
        .get(pool)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let live = workers.iter().filter(|w| takes(w, ask)).count();
    let healthy = workers
        .iter()
        .filter(|w| takes(w, ask) && Reach::Healthy.admits(w))
        .count();
    (healthy, live)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::registry::{Registry, ServedModel};

    /// A registry with `n` workers of pool `p` serving model `m`; returns the leases.
    pub fn pool_of(n: usize) -> (Arc<Registry>, Vec<String>) {
        let r = Registry::new(Duration::from_secs(2), Duration::from_secs(6));
        let models = vec![ServedModel {
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
                    "switchyard".into(),
                )
                .unwrap()
            })
            .collect();
        (r, leases)
    }

    pub fn ask<'a>(model: &'a str, tried: &'a [String]) -> Ask<'a> {
        Ask {
            model,
            modalities: ModalitySet::default(),
            tried,
            continuation: false,
        }
    }

    /// Every policy, on pools small and large: only eligible workers, never a tried one,
    /// the only live worker found among 100.
    #[test]
    fn every_policy_finds_only_eligible_workers() {
        for policy in [&PowerOfTwo as &dyn Policy, &LeastLoaded] {
            for n in [1, 5, 100] {
                let (r, leases) = pool_of(n);
                for l in &leases[1..] {
                    r.drain(l).unwrap();
                }
                let snap = r.snapshot();
                for _ in 0..50 {
                    let w = pick_in_pool(&snap, "p", policy, &ask("m", &[])).unwrap();
                    assert_eq!(w.id, "w000", "{} of {n}", policy.name());
                }
                let tried = ["w000".to_string()];
                assert!(pick_in_pool(&snap, "p", policy, &ask("m", &tried)).is_none());
                assert!(pick_in_pool(&snap, "p", policy, &ask("other", &[])).is_none());
            }
        }
    }

    #[test]
    fn unhealthy_workers_are_reached_only_when_asked() {
        let (r, _) = pool_of(2);
        let snap = r.snapshot();
        for w in snap.workers() {
            for _ in 0..crate::registry::EJECT_AFTER {
                w.health.record_failure();
            }
        }
        let a = ask("m", &[]);
        assert!(pick(&snap, "p", &PowerOfTwo, &a, Reach::Healthy).is_none());
        assert!(pick(&snap, "p", &PowerOfTwo, &a, Reach::AnyLive).is_some());
        assert!(pick_in_pool(&snap, "p", &PowerOfTwo, &a).is_some());
        assert_eq!(count(&snap, "p", &a), (0, 2));
    }
}
