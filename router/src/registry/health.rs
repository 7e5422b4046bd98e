//! Outlier detection: consecutive failures eject a worker for a while (Envoy-style), and
//! active health checks of static workers mark them down.
//!
//! An ejection ends by itself; the worker is then on probation (half-open): the next
//! request it gets is the probe. A success clears the probation and the ejection count; a
//! failure ejects it again at once, for longer each time (up to [`EJECT_MAX`]). So a dead
//! worker costs one failed attempt per ejection period, not three.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One worker's health, shared by every snapshot of it.
#[derive(Debug, Default)]
pub struct Health {
    consecutive_failures: AtomicU32,
    times_ejected: AtomicU32,
    /// Milliseconds since `EPOCH` until which the worker is ejected.
    ejected_until_ms: AtomicU64,
    /// Ejected since its last success: once the ejection ends, one failure ejects again.
    probation: AtomicBool,
    /// A probe (the first request after an ejection ended) is in flight.
    probing: AtomicBool,
    /// The last active health check failed (static workers only).
    down: AtomicBool,
}

/// Failures in a row that eject a worker.
pub const EJECT_AFTER: u32 = 3;
/// Base ejection time; it grows with each ejection, up to `EJECT_MAX`.
pub const EJECT_BASE: Duration = Duration::from_secs(5);
pub const EJECT_MAX: Duration = Duration::from_secs(60);

fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl Health {
    /// A request succeeded: failures, probation and the ejection count start over.
    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if self.probation.swap(false, Ordering::Relaxed) {
            self.times_ejected.store(0, Ordering::Relaxed);
        }
    }

    /// Returns true when this failure ejected the worker: the [`EJECT_AFTER`]th in a row,
    /// or the first after an ejection ended (the probe failed).
    pub fn record_failure(&self) -> bool {
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let probe_failed = self.probation.load(Ordering::Relaxed) && !self.is_ejected();
        if n < EJECT_AFTER && !probe_failed {
            return false;
        }
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.probation.store(true, Ordering::Relaxed);
        let times = self
            .times_ejected
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let d = EJECT_BASE.saturating_mul(times).min(EJECT_MAX);
        self.ejected_until_ms
            .store(now_ms() + d.as_millis() as u64, Ordering::Relaxed);
        true
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms()
    }

    /// Records an active health check's outcome; returns whether the state changed.
    pub fn set_down(&self, down: bool) -> bool {
        self.down.swap(down, Ordering::Relaxed) != down
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Out of selection: failed its health check, or ejected after failures. The failover
    /// loop reaches such a worker only when no pool of the route has a healthy one.
    pub fn is_excluded(&self) -> bool {
        self.is_down() || self.is_ejected()
    }

    /// Leave to send a request: always, unless the worker is on probation after an ejection,
    /// where one request at a time probes it (the others look elsewhere: `None`). The
    /// guard ends the probe when the attempt ends.
    pub fn probe(&self) -> Option<Probe<'_>> {
        if !self.probation.load(Ordering::Relaxed) || self.is_ejected() {
            return Some(Probe(None));
        }
        self.probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .ok()
            .map(|_| Probe(Some(&self.probing)))
    }

    /// Ends the current ejection now (tests: what the passing of time does).
    #[cfg(test)]
    pub fn end_ejection(&self) {
        self.ejected_until_ms.store(0, Ordering::Relaxed);
    }
}

/// An attempt's leave from [`Health::probe`]; a probe ends when it is dropped.
pub struct Probe<'a>(Option<&'a AtomicBool>);

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        if let Some(flag) = self.0 {
            flag.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_failures_eject_and_success_resets() {
        let h = Health::default();
        assert!(!h.record_failure());
        h.record_success();
        assert!(!h.record_failure());
        assert!(!h.record_failure());
        assert!(!h.is_ejected());
        assert!(h.record_failure(), "the third failure in a row ejects");
        assert!(h.is_ejected());
    }

    /// After an ejection ends, the next request is a probe: one failure ejects again (for
    /// longer), one success restores the worker fully.
    #[test]
    fn a_failed_probe_ejects_at_once_and_a_good_one_restores() {
        let h = Health::default();
        for _ in 0..EJECT_AFTER {
            h.record_failure();
        }
        h.end_ejection();
        assert!(!h.is_excluded(), "half-open: the probe may go");
        {
            let probe = h.probe();
            assert!(probe.is_some());
            assert!(h.probe().is_none(), "one probe at a time");
        }
        assert!(h.probe().is_some(), "the probe ended");
        assert!(h.record_failure(), "a failed probe ejects at once");
        let second = h.ejected_until_ms.load(Ordering::Relaxed) - now_ms();
        assert!(
            second > EJECT_BASE.as_millis() as u64,
            "longer: {second} ms"
        );
        h.end_ejection();
        h.record_success();
        assert!(!h.record_failure(), "restored: three failures again");
        assert!(!h.record_failure());
        assert!(h.record_failure());
        let again = h.ejected_until_ms.load(Ordering::Relaxed) - now_ms();
        assert!(
            again <= EJECT_BASE.as_millis() as u64,
            "count reset: {again} ms"
        );
    }
}
